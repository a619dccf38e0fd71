package node

import (
	"bytes"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/postrender"
	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"

	"github.com/sockbypass/sockbypass/e2e/node/cluster"
)

// dropSysResource is a Helm post-renderer (helm install --post-renderer)
// for a host whose root lacks CAP_SYS_RESOURCE in its bounding set, as
// this sandboxed VM's does: runc cannot grant a container a capability
// the node does not have ("unable to apply caps: operation not
// permitted"). sockbypass needs it only on kernels before 5.11 (the
// memlock limit); everything else of the chart is left as it is.
type dropSysResource struct{ dropped int }

var sysResourceLine = regexp.MustCompile(`(?m)^\s*- SYS_RESOURCE\s*\n`)

// Run implements postrender.PostRenderer.
func (d *dropSysResource) Run(in *bytes.Buffer) (*bytes.Buffer, error) {
	d.dropped += len(sysResourceLine.FindAll(in.Bytes(), -1))
	return bytes.NewBuffer(sysResourceLine.ReplaceAll(in.Bytes(), nil)), nil
}

// postRenderer returns the post-renderer this host needs, or nil.
func (h *harness) postRenderer() postrender.PostRenderer {
	if cluster.HasCapSysResource() {
		return nil
	}
	if !h.saidSysResource {
		h.saidSysResource = true
		h.rep.add("(2) this host's root has no CAP_SYS_RESOURCE (bounding set): a Helm post-renderer drops SYS_RESOURCE from the DaemonSet's capabilities (needed only before kernel 5.11); the rest of the chart is as rendered")
	}
	return &dropSysResource{}
}

// waitDaemonSetReady waits until the DaemonSet has its pod on the node,
// up to date and Ready (helm's --wait counts a DaemonSet whose
// controller has not created the pod yet as ready).
func (h *harness) waitDaemonSetReady(timeout time.Duration) *appsv1.DaemonSet {
	h.t.Helper()
	var ds *appsv1.DaemonSet
	if err := waitFor(h, timeout, func() error {
		var err error
		ds, err = h.node.Admin.AppsV1().DaemonSets(systemNS).Get(h.ctx, "sockbypass", metav1.GetOptions{})
		if err != nil {
			return err
		}
		st := ds.Status
		if st.ObservedGeneration < ds.Generation || st.DesiredNumberScheduled != 1 || st.UpdatedNumberScheduled != 1 || st.NumberReady != 1 {
			return fmt.Errorf("DaemonSet: desired %d, updated %d, ready %d (generation %d observed %d)",
				st.DesiredNumberScheduled, st.UpdatedNumberScheduled, st.NumberReady, ds.Generation, st.ObservedGeneration)
		}
		return nil
	}); err != nil {
		h.t.Fatalf("%v\n%s\nkubelet:\n%s", err, h.daemonPodStatus(), h.node.KubeletLog(3000))
	}
	return ds
}

// helmConfig returns a Helm action configuration for the node's API
// server, releases stored as Secrets (Helm's default driver).
func (h *harness) helmConfig() *action.Configuration {
	h.t.Helper()
	flags := genericclioptions.NewConfigFlags(false)
	kc, ns := h.node.Kubeconfig, systemNS
	// Helm's discovery cache in the test's directory, not ~/.kube.
	cache := filepath.Join(h.dir, "kube-cache")
	flags.KubeConfig, flags.Namespace, flags.CacheDir = &kc, &ns, &cache
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
	inst.Wait, inst.Timeout = true, scaled(3*time.Minute)
	inst.PostRenderer = h.postRenderer()
	rel, err := inst.RunWithContext(h.ctx, ch, h.values(cleanupOnUninstall))
	if err != nil {
		h.t.Fatalf("helm install: %v\n%s\nkubelet:\n%s", err, h.daemonPodStatus(), h.node.KubeletLog(4000))
	}
	helmDone := time.Since(t0)
	h.waitDaemonSetReady(2 * time.Minute)
	h.rep.add("(2) helm install %s (chart %s %s, cleanupOnUninstall=%v): release %s v%d (helm --wait returned after %v); DaemonSet pod Ready %v after the install began",
		rel.Name, rel.Chart.Metadata.Name, rel.Chart.Metadata.Version, cleanupOnUninstall, rel.Info.Status, rel.Version,
		helmDone.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	// The kubelet saw /readyz answer 200; so must the test (retried: the
	// probe, too, tolerates a slow answer on a busy host).
	if err := waitFor(h, 20*time.Second, h.readyz); err != nil {
		h.t.Errorf("DaemonSet pod Ready but its /readyz: %v", err)
	}
}

// helmUninstall runs `helm uninstall` and waits until the DaemonSet pod
// is gone.
func (h *harness) helmUninstall() {
	h.t.Helper()
	t0 := time.Now()
	un := action.NewUninstall(h.helmConfig())
	un.Wait, un.Timeout = true, scaled(2*time.Minute)
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
		rs, err := h.containerLog(&p, "sockbypass", 4000)
		if err != nil {
			rs = err.Error()
		}
		s += rs + "\n"
	}
	ds, err := h.node.Admin.AppsV1().DaemonSets(systemNS).List(h.ctx, metav1.ListOptions{})
	if err == nil {
		for _, d := range ds.Items {
			s += fmt.Sprintf("daemonset %s: desired %d ready %d\n", d.Name, d.Status.DesiredNumberScheduled, d.Status.NumberReady)
		}
	}
	return s
}
