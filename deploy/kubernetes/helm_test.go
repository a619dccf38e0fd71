package kubernetes

import (
	"bytes"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"

	"github.com/sockbypass/sockbypass/internal/config"
)

const chartDir = "../helm/sockbypass"

// renderChart renders deploy/helm/sockbypass with the helm library (what
// `helm template` runs) and decodes every object strictly by kind.
func renderChart(t *testing.T, values map[string]any) *manifests {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	vals, err := chartutil.ToRenderValues(ch, values, chartutil.ReleaseOptions{Name: "sockbypass", Namespace: namespace, IsInstall: true}, chartutil.DefaultCapabilities)
	if err != nil {
		t.Fatal(err)
	}
	out, err := engine.Render(ch, vals)
	if err != nil {
		t.Fatalf("render chart: %v", err)
	}
	m := &manifests{}
	seen := map[string]int{}
	for name, text := range out {
		if !strings.HasSuffix(name, ".yaml") {
			continue
		}
		for _, doc := range bytes.Split([]byte(text), []byte("\n---")) {
			if strings.TrimSpace(stripComments(string(doc))) == "" {
				continue
			}
			var meta struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
			}
			if err := yaml.Unmarshal(doc, &meta); err != nil {
				t.Fatalf("%s: %v\n%s", name, err, doc)
			}
			seen[meta.Kind]++
			switch meta.Kind {
			case "ServiceAccount":
				decodeStrict(t, name, doc, "v1", "ServiceAccount", &m.sa)
			case "ConfigMap":
				decodeStrict(t, name, doc, "v1", "ConfigMap", &m.cm)
			case "DaemonSet":
				decodeStrict(t, name, doc, "apps/v1", "DaemonSet", &m.ds)
			case "ClusterRole":
				decodeStrict(t, name, doc, "rbac.authorization.k8s.io/v1", "ClusterRole", &m.role)
			case "ClusterRoleBinding":
				decodeStrict(t, name, doc, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", &m.binding)
			case "ResourceQuota":
				decodeStrict(t, name, doc, "v1", "ResourceQuota", &m.quota)
			case "PodMonitor":
			default:
				t.Errorf("%s: unexpected kind %s", name, meta.Kind)
			}
		}
	}
	for _, kind := range []string{"ServiceAccount", "ConfigMap", "DaemonSet", "ClusterRole", "ClusterRoleBinding"} {
		if seen[kind] != 1 {
			t.Fatalf("chart renders %d %s, want 1", seen[kind], kind)
		}
	}
	cs := m.ds.Spec.Template.Spec.Containers
	if len(cs) != 1 || cs[0].Name != containerName {
		t.Fatalf("DaemonSet containers = %d, want one named %s", len(cs), containerName)
	}
	m.container = cs[0]
	return m
}

// TestHelmChart renders the chart and applies the checks the plain
// manifests pass: RBAC, node name, quota, image tag, selection; and that
// its DaemonSet is the plain one's pod (same capabilities, mounts, probes).
func TestHelmChart(t *testing.T) {
	m := renderChart(t, nil)
	plain := load(t)
	spec := m.ds.Spec.Template.Spec
	checkRBAC(t, m.role, m.binding, m.sa)
	checkNodeName(t, m.container)
	if m.quota.Name == "" {
		t.Error("no ResourceQuota for system-node-critical")
	} else {
		checkQuota(t, m.quota, spec.PriorityClassName, namespace)
	}
	checkImage(t, m.container)
	if !strings.HasSuffix(m.container.Image, ":0.17.0") {
		t.Errorf("image %s: the tag defaults to the chart's appVersion", m.container.Image)
	}
	cfg, err := config.Parse([]byte(m.cm.Data[configKey]))
	if err != nil {
		t.Fatalf("chart ConfigMap: %v\n%s", err, m.cm.Data[configKey])
	}
	checkSelection(t, cfg)

	pc := plain.container
	if !slices.Equal(m.container.SecurityContext.Capabilities.Add, pc.SecurityContext.Capabilities.Add) {
		t.Errorf("chart capabilities %v, manifests %v", m.container.SecurityContext.Capabilities.Add, pc.SecurityContext.Capabilities.Add)
	}
	if !slices.Equal(append(m.container.Command, m.container.Args...), append(pc.Command, pc.Args...)) {
		t.Errorf("chart runs %v %v, manifests %v %v", m.container.Command, m.container.Args, pc.Command, pc.Args)
	}
	for name, pair := range map[string][2]*corev1.Probe{"liveness": {m.container.LivenessProbe, pc.LivenessProbe}, "readiness": {m.container.ReadinessProbe, pc.ReadinessProbe}} {
		if pair[0] == nil || pair[0].HTTPGet == nil || pair[0].HTTPGet.Path != pair[1].HTTPGet.Path {
			t.Errorf("%s probe differs from the manifests'", name)
		}
	}
	if len(m.container.VolumeMounts) != len(pc.VolumeMounts) || spec.HostNetwork != plain.ds.Spec.Template.Spec.HostNetwork ||
		spec.HostPID != plain.ds.Spec.Template.Spec.HostPID {
		t.Errorf("chart mounts %v / hostNetwork %v / hostPID %v differ from the manifests'", m.container.VolumeMounts, spec.HostNetwork, spec.HostPID)
	}

	// Values: mesh (intercept only when asked), cleanup on uninstall, a tag.
	m = renderChart(t, map[string]any{
		"image":              map[string]any{"tag": "1.2.3"},
		"mesh":               map[string]any{"enabled": true, "name": "istio", "intercept": true},
		"cleanupOnUninstall": true,
		"metrics":            map[string]any{"serviceMonitor": map[string]any{"enabled": true}},
	})
	if !strings.HasSuffix(m.container.Image, ":1.2.3") {
		t.Errorf("image %s, want tag 1.2.3", m.container.Image)
	}
	if !slices.Contains(m.container.Args, "--cleanup-on-exit") {
		t.Errorf("cleanupOnUninstall: args %v lack --cleanup-on-exit", m.container.Args)
	}
	cfg, err = config.Parse([]byte(m.cm.Data[configKey]))
	if err != nil {
		t.Fatalf("chart ConfigMap with mesh: %v", err)
	}
	if cfg.MeshOptions() == nil || !cfg.MeshOptions().Intercept {
		t.Errorf("mesh values not in the ConfigMap: %s", m.cm.Data[configKey])
	}
}

// TestHelmChartPrivilegeValues: readPodListeners (default true) adds
// hostPID, DAC_READ_SEARCH and SYS_PTRACE, and false drops them; podToPod
// adds hostPID, SYS_ADMIN and SYS_PTRACE; each capability once.
func TestHelmChartPrivilegeValues(t *testing.T) {
	base := []string{"BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"}
	for _, c := range []struct {
		readPodListeners, podToPod bool
		hostPID                    bool
		extra                      []string
	}{
		{true, false, true, []string{"DAC_READ_SEARCH", "SYS_PTRACE"}},
		{false, false, false, nil},
		{true, true, true, []string{"DAC_READ_SEARCH", "SYS_ADMIN", "SYS_PTRACE"}},
		{false, true, true, []string{"SYS_ADMIN", "SYS_PTRACE"}},
	} {
		m := renderChart(t, map[string]any{"readPodListeners": c.readPodListeners, "podToPod": c.podToPod})
		var got []string
		for _, cp := range m.container.SecurityContext.Capabilities.Add {
			got = append(got, string(cp))
		}
		want := append(append([]string{}, base...), c.extra...)
		if !slices.Equal(got, want) {
			t.Errorf("readPodListeners=%v podToPod=%v: capabilities.add = %v, want %v", c.readPodListeners, c.podToPod, got, want)
		}
		if hp := m.ds.Spec.Template.Spec.HostPID; hp != c.hostPID {
			t.Errorf("readPodListeners=%v podToPod=%v: hostPID = %v, want %v", c.readPodListeners, c.podToPod, hp, c.hostPID)
		}
		if d := m.container.SecurityContext.Capabilities.Drop; len(d) != 1 || d[0] != "ALL" {
			t.Errorf("readPodListeners=%v podToPod=%v: capabilities.drop = %v", c.readPodListeners, c.podToPod, d)
		}
	}
}
