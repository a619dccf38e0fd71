package node

import (
	"fmt"
	"net"
	"path/filepath"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
)

// helmConfig returns a Helm action configuration for the node's API
// server, releases stored as Secrets (Helm's default driver).
func (h *harness) helmConfig() *action.Configuration {
	h.t.Helper()
	flags := genericclioptions.NewConfigFlags(false)
	kc, ns := h.node.Kubeconfig, systemNS
	flags.KubeConfig, flags.Namespace = &kc, &ns
	cfg := new(action.Configuration)
	if err := cfg.Init(flags, systemNS, "secret", func(format string, v ...any) {
		h.t.Logf("helm: "+format, v...)
	}); err != nil {
		h.t.Fatalf("helm init: %v", err)
	}
	return cfg
}

func (h *harness) values(cleanupOnUninstall bool) map[string]any {
	if h.metricsPort == 0 {
		l, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			h.t.Fatal(err)
		}
		h.metricsPort = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	return map[string]any{
		"image":              map[string]any{"repository": sockbypassRepo, "tag": sockbypassTag, "pullPolicy": "Never"},
		"podToPod":           true,
		"mesh":               map[string]any{"enabled": true, "name": "istio", "intercept": true},
		"metrics":            map[string]any{"port": h.metricsPort},
		"rescanInterval":     "1s",
		"cleanupOnUninstall": cleanupOnUninstall,
	}
}

// helmInstall installs deploy/helm/sockbypass as `helm install --wait
// --create-namespace` would, and waits for the DaemonSet pod to be Ready.
func (h *harness) helmInstall(cleanupOnUninstall bool) {
	h.t.Helper()
	t0 := time.Now()
	ch, err := loader.Load(filepath.Join(repoRoot(h.t), "deploy", "helm", "sockbypass"))
	if err != nil {
		h.t.Fatal(err)
	}
	inst := action.NewInstall(h.helmConfig())
	inst.ReleaseName, inst.Namespace, inst.CreateNamespace = "sockbypass", systemNS, true
	inst.Wait, inst.Timeout = true, 3*time.Minute
	rel, err := inst.RunWithContext(h.ctx, ch, h.values(cleanupOnUninstall))
	if err != nil {
		h.t.Fatalf("helm install: %v\n%s\nkubelet:\n%s", err, h.daemonPodStatus(), h.node.KubeletLog(4000))
	}
	h.rep.add("(2) helm install %s (chart %s %s, cleanupOnUninstall=%v): release %s v%d deployed, DaemonSet Ready in %v",
		rel.Name, rel.Chart.Metadata.Name, rel.Chart.Metadata.Version, cleanupOnUninstall, rel.Info.Status, rel.Version, time.Since(t0).Round(time.Millisecond))
	if err := h.readyz(); err != nil {
		h.t.Errorf("DaemonSet pod Ready but its /readyz: %v", err)
	}
}

// helmUninstall runs `helm uninstall` and waits until the DaemonSet pod
// is gone.
func (h *harness) helmUninstall() {
	h.t.Helper()
	t0 := time.Now()
	un := action.NewUninstall(h.helmConfig())
	un.Wait, un.Timeout = true, 2*time.Minute
	if _, err := un.Run("sockbypass"); err != nil {
		h.t.Fatalf("helm uninstall: %v", err)
	}
	h.waitNoDaemonPod()
	h.rep.add("(7) helm uninstall: release removed, DaemonSet pod gone in %v", time.Since(t0).Round(time.Millisecond))
}

func (h *harness) waitNoDaemonPod() {
	h.t.Helper()
	if err := waitFor(h, 90*time.Second, func() error {
		pods, err := h.node.Admin.CoreV1().Pods(systemNS).List(h.ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=sockbypass"})
		if err != nil {
			return err
		}
		if len(pods.Items) > 0 {
			return fmt.Errorf("%d sockbypass pods left", len(pods.Items))
		}
		return nil
	}); err != nil {
		h.t.Fatal(err)
	}
}

// daemonPodStatus describes the DaemonSet's pods (for failures).
func (h *harness) daemonPodStatus() string {
	pods, err := h.node.Admin.CoreV1().Pods(systemNS).List(h.ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	s := ""
	for _, p := range pods.Items {
		s += fmt.Sprintf("pod %s: %s\n", p.Name, podStatus(&p))
		if rs, err := h.containerLog(&p, "sockbypass", 4000); err == nil {
			s += rs + "\n"
		}
	}
	ds, err := h.node.Admin.AppsV1().DaemonSets(systemNS).List(h.ctx, metav1.ListOptions{})
	if err == nil {
		for _, d := range ds.Items {
			s += fmt.Sprintf("daemonset %s: desired %d ready %d\n", d.Name, d.Status.DesiredNumberScheduled, d.Status.NumberReady)
		}
	}
	return s
}
