// Package kubernetes holds the manifests that run sockbypass as a DaemonSet;
// this test decodes them strictly into the Kubernetes API types and checks
// that they agree with each other, with deploy/Dockerfile and with the
// daemon's own configuration parser.
package kubernetes

import (
	"bufio"
	"encoding/json"
	"maps"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/sockbypass/sockbypass/internal/config"
)

const (
	namespace     = "sockbypass-system"
	configKey     = "config.yaml"
	containerName = "sockbypass"
)

// documents splits a multi-document YAML file, dropping empty documents.
func documents(t *testing.T, file string) [][]byte {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var docs [][]byte
	for _, doc := range regexp.MustCompile(`(?m)^---[ \t]*$`).Split(string(data), -1) {
		if strings.TrimSpace(stripComments(doc)) != "" {
			docs = append(docs, []byte(doc))
		}
	}
	return docs
}

func stripComments(doc string) string {
	var b strings.Builder
	sc := bufio.NewScanner(strings.NewReader(doc))
	for sc.Scan() {
		if line := sc.Text(); !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// decodeStrict decodes one YAML document into out, refusing unknown and
// duplicate fields, after checking its apiVersion and kind.
func decodeStrict(t *testing.T, file string, doc []byte, apiVersion, kind string, out any) {
	t.Helper()
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	if meta.APIVersion != apiVersion || meta.Kind != kind {
		t.Fatalf("%s: got %s %s, want %s %s", file, meta.APIVersion, meta.Kind, apiVersion, kind)
	}
	if err := yaml.UnmarshalStrict(doc, out); err != nil {
		t.Fatalf("%s: %s: %v", file, kind, err)
	}
}

type manifests struct {
	ns        corev1.Namespace
	sa        corev1.ServiceAccount
	role      rbacv1.ClusterRole
	binding   rbacv1.ClusterRoleBinding
	quota     corev1.ResourceQuota
	cm        corev1.ConfigMap
	ds        appsv1.DaemonSet
	container corev1.Container
}

func load(t *testing.T) *manifests {
	t.Helper()
	m := &manifests{}

	docs := documents(t, "namespace.yaml")
	if len(docs) != 2 {
		t.Fatalf("namespace.yaml: %d documents, want a Namespace and a ServiceAccount", len(docs))
	}
	decodeStrict(t, "namespace.yaml", docs[0], "v1", "Namespace", &m.ns)
	decodeStrict(t, "namespace.yaml", docs[1], "v1", "ServiceAccount", &m.sa)

	docs = documents(t, "rbac.yaml")
	if len(docs) != 2 {
		t.Fatalf("rbac.yaml: %d documents, want a ClusterRole and a ClusterRoleBinding", len(docs))
	}
	decodeStrict(t, "rbac.yaml", docs[0], "rbac.authorization.k8s.io/v1", "ClusterRole", &m.role)
	decodeStrict(t, "rbac.yaml", docs[1], "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", &m.binding)

	docs = documents(t, "resourcequota.yaml")
	if len(docs) != 1 {
		t.Fatalf("resourcequota.yaml: %d documents, want 1", len(docs))
	}
	decodeStrict(t, "resourcequota.yaml", docs[0], "v1", "ResourceQuota", &m.quota)

	docs = documents(t, "configmap.yaml")
	if len(docs) != 1 {
		t.Fatalf("configmap.yaml: %d documents, want 1", len(docs))
	}
	decodeStrict(t, "configmap.yaml", docs[0], "v1", "ConfigMap", &m.cm)

	docs = documents(t, "daemonset.yaml")
	if len(docs) != 1 {
		t.Fatalf("daemonset.yaml: %d documents, want 1", len(docs))
	}
	decodeStrict(t, "daemonset.yaml", docs[0], "apps/v1", "DaemonSet", &m.ds)

	cs := m.ds.Spec.Template.Spec.Containers
	if len(cs) != 1 || cs[0].Name != containerName {
		t.Fatalf("DaemonSet containers = %d, want one named %s", len(cs), containerName)
	}
	if n := len(m.ds.Spec.Template.Spec.InitContainers); n != 0 {
		t.Errorf("DaemonSet has %d init containers, want none", n)
	}
	m.container = cs[0]
	return m
}

func TestDecodeIsStrict(t *testing.T) {
	var ds appsv1.DaemonSet
	typo := []byte("apiVersion: apps/v1\nkind: DaemonSet\nspec:\n  template:\n    spec:\n      hostNetwrok: true\n")
	if err := yaml.UnmarshalStrict(typo, &ds); err == nil || !strings.Contains(err.Error(), "hostNetwrok") {
		t.Errorf("a misspelt field was accepted: %v", err)
	}
	dup := []byte("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  name: b\n")
	var cm corev1.ConfigMap
	if err := yaml.UnmarshalStrict(dup, &cm); err == nil {
		t.Error("a duplicate field was accepted")
	}
}

func TestNamespaceAndServiceAccount(t *testing.T) {
	m := load(t)
	if m.ns.Name != namespace {
		t.Errorf("Namespace %q, want %q", m.ns.Name, namespace)
	}
	// hostNetwork, hostPath and added capabilities are refused below the
	// "privileged" Pod Security level.
	if got := m.ns.Labels["pod-security.kubernetes.io/enforce"]; got != "privileged" {
		t.Errorf("Namespace pod-security enforce = %q, want privileged", got)
	}
	for _, obj := range []struct{ kind, ns string }{
		{"ServiceAccount", m.sa.Namespace},
		{"ConfigMap", m.cm.Namespace},
		{"DaemonSet", m.ds.Namespace},
	} {
		if obj.ns != namespace {
			t.Errorf("%s in namespace %q, want %q", obj.kind, obj.ns, namespace)
		}
	}
	spec := m.ds.Spec.Template.Spec
	if spec.ServiceAccountName != m.sa.Name {
		t.Errorf("serviceAccountName %q, want %q", spec.ServiceAccountName, m.sa.Name)
	}
	// The daemon watches pods and namespaces: its token is mounted.
	if (m.sa.AutomountServiceAccountToken != nil && !*m.sa.AutomountServiceAccountToken) ||
		(spec.AutomountServiceAccountToken != nil && !*spec.AutomountServiceAccountToken) {
		t.Error("the service account token must be mounted: the daemon selects pods from the API server")
	}
	checkRBAC(t, m.role, m.binding, m.sa)
	checkNodeName(t, m.container)
	checkQuota(t, m.quota, spec.PriorityClassName, namespace)
}

func TestDaemonSetScheduling(t *testing.T) {
	m := load(t)
	ds := m.ds
	sel := ds.Spec.Selector
	if sel == nil || len(sel.MatchLabels) == 0 {
		t.Fatal("DaemonSet has no selector")
	}
	if !labels.SelectorFromSet(sel.MatchLabels).Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("selector %v does not select the template labels %v", sel.MatchLabels, ds.Spec.Template.Labels)
	}
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("hostNetwork must be true: the metrics port is served on the node IP")
	}
	if !spec.HostPID {
		t.Error("hostPID must be true: the daemon reads the pods' listeners in /proc")
	}
	if spec.HostIPC {
		t.Error("hostIPC is not needed")
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q", spec.PriorityClassName)
	}
	if spec.TerminationGracePeriodSeconds == nil || *spec.TerminationGracePeriodSeconds < 6 {
		t.Errorf("terminationGracePeriodSeconds %v: the daemon takes up to 5 s to stop serving", spec.TerminationGracePeriodSeconds)
	}
	us := ds.Spec.UpdateStrategy
	if us.Type != appsv1.RollingUpdateDaemonSetStrategyType || us.RollingUpdate == nil ||
		us.RollingUpdate.MaxUnavailable == nil || *us.RollingUpdate.MaxUnavailable != intstr.FromInt32(1) {
		t.Errorf("updateStrategy %+v, want RollingUpdate with maxUnavailable 1", us)
	}
	everywhere := slices.ContainsFunc(spec.Tolerations, func(tol corev1.Toleration) bool {
		return tol.Operator == corev1.TolerationOpExists && tol.Key == "" && tol.Effect == ""
	})
	if !everywhere {
		t.Errorf("tolerations %+v do not tolerate every taint", spec.Tolerations)
	}
	if got := m.container.Image; got == "" {
		t.Error("no image")
	}
}

func TestHostMounts(t *testing.T) {
	m := load(t)
	volumes := map[string]corev1.Volume{}
	for _, v := range m.ds.Spec.Template.Spec.Volumes {
		volumes[v.Name] = v
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, vm := range m.container.VolumeMounts {
		if _, ok := volumes[vm.Name]; !ok {
			t.Errorf("volumeMount %q has no volume", vm.Name)
		}
		mounts[vm.MountPath] = vm
	}
	want := []struct {
		hostPath    string
		hostType    corev1.HostPathType
		propagation corev1.MountPropagationMode
	}{
		// Bidirectional would need a privileged container; pins reach the
		// host's bpffs through the bind mount anyway.
		{"/sys/fs/bpf", corev1.HostPathDirectoryOrCreate, corev1.MountPropagationHostToContainer},
		{"/sys/fs/cgroup", corev1.HostPathDirectory, corev1.MountPropagationNone},
		// The daemon's ownership marker, where the node's CLI looks (the
		// root filesystem is read-only).
		{"/run/sockbypass", corev1.HostPathDirectoryOrCreate, corev1.MountPropagationNone},
	}
	hostPaths := 0
	for _, v := range volumes {
		if v.HostPath != nil {
			hostPaths++
		}
	}
	if hostPaths != len(want) {
		t.Errorf("%d hostPath volumes, want %d", hostPaths, len(want))
	}
	for _, w := range want {
		// Mounted where the host has it: the daemon finds the cgroup2
		// mount in /proc/self/mountinfo and pins under /sys/fs/bpf.
		vm, ok := mounts[w.hostPath]
		if !ok {
			t.Errorf("nothing mounted at %s", w.hostPath)
			continue
		}
		hp := volumes[vm.Name].HostPath
		if hp == nil || hp.Path != w.hostPath || hp.Type == nil || *hp.Type != w.hostType {
			t.Errorf("volume %q = %+v, want hostPath %s type %s", vm.Name, hp, w.hostPath, w.hostType)
		}
		if vm.ReadOnly || vm.SubPath != "" {
			t.Errorf("%s must be mounted read-write, whole", w.hostPath)
		}
		if vm.MountPropagation == nil || *vm.MountPropagation != w.propagation {
			t.Errorf("%s propagation %s, want %s", w.hostPath, deref(vm.MountPropagation), w.propagation)
		}
	}
}

func deref[T any](p *T) any {
	if p == nil {
		return "unset"
	}
	return *p
}

func TestSecurityContext(t *testing.T) {
	m := load(t)
	sc := m.container.SecurityContext
	if sc == nil {
		t.Fatal("no securityContext")
	}
	isTrue := func(b *bool) bool { return b != nil && *b }
	// Kubernetes allows Bidirectional propagation only in privileged
	// containers, so a privileged container would need none of the rest.
	if sc.Privileged == nil || *sc.Privileged {
		t.Error("privileged must be explicitly false")
	}
	for _, vm := range m.container.VolumeMounts {
		if vm.MountPropagation != nil && *vm.MountPropagation == corev1.MountPropagationBidirectional {
			t.Errorf("%s: Bidirectional propagation is refused for unprivileged containers", vm.MountPath)
		}
	}
	if sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Error("runAsUser must be 0")
	}
	if sc.RunAsNonRoot != nil && *sc.RunAsNonRoot {
		t.Error("runAsNonRoot contradicts runAsUser 0")
	}
	if !isTrue(sc.ReadOnlyRootFilesystem) {
		t.Error("readOnlyRootFilesystem must be true")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation must be false")
	}
	if sc.Capabilities == nil {
		t.Fatal("no capabilities")
	}
	var add []string
	for _, c := range sc.Capabilities.Add {
		add = append(add, string(c))
	}
	slices.Sort(add)
	if want := []string{"BPF", "DAC_READ_SEARCH", "NET_ADMIN", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"}; !slices.Equal(add, want) {
		t.Errorf("capabilities.add = %v, want exactly %v", add, want)
	}
	if d := sc.Capabilities.Drop; len(d) != 1 || d[0] != "ALL" {
		t.Errorf("capabilities.drop = %v, want [ALL]", d)
	}
	// The runtimes' default AppArmor profile denies writes and locks under
	// /sys/fs/bpf.
	if sc.AppArmorProfile == nil || sc.AppArmorProfile.Type != corev1.AppArmorProfileTypeUnconfined {
		t.Errorf("appArmorProfile %+v, want Unconfined", sc.AppArmorProfile)
	}
}

// configMount returns the config volume's mount and the path of the file
// that holds the ConfigMap's key.
func configMount(t *testing.T, m *manifests) (corev1.VolumeMount, string) {
	t.Helper()
	for _, v := range m.ds.Spec.Template.Spec.Volumes {
		if v.ConfigMap == nil {
			continue
		}
		if v.ConfigMap.Name != m.cm.Name {
			t.Fatalf("volume %q refers to ConfigMap %q, want %q", v.Name, v.ConfigMap.Name, m.cm.Name)
		}
		if v.ConfigMap.Optional != nil && *v.ConfigMap.Optional {
			t.Errorf("the ConfigMap volume must not be optional")
		}
		file := configKey
		if len(v.ConfigMap.Items) > 0 {
			file = ""
			for _, it := range v.ConfigMap.Items {
				if it.Key == configKey {
					file = it.Path
				}
			}
			if file == "" {
				t.Fatalf("volume %q does not project key %s", v.Name, configKey)
			}
		}
		for _, vm := range m.container.VolumeMounts {
			if vm.Name == v.Name {
				if vm.SubPath != "" {
					file = "" // the file is mounted at MountPath itself
				}
				return vm, filepath.Join(vm.MountPath, file)
			}
		}
		t.Fatalf("ConfigMap volume %q is not mounted", v.Name)
	}
	t.Fatal("no ConfigMap volume")
	return corev1.VolumeMount{}, ""
}

func TestConfigMapMountAndArgs(t *testing.T) {
	m := load(t)
	if _, ok := m.cm.Data[configKey]; !ok || len(m.cm.Data) != 1 {
		t.Fatalf("ConfigMap keys %v, want only %s", slices.Sorted(maps.Keys(m.cm.Data)), configKey)
	}
	vm, file := configMount(t, m)
	if !vm.ReadOnly {
		t.Error("the ConfigMap must be mounted read-only")
	}
	if file != "/etc/sockbypass/config.yaml" {
		t.Errorf("config file at %s, want /etc/sockbypass/config.yaml", file)
	}
	argv := append(slices.Clone(m.container.Command), m.container.Args...)
	want := []string{"/sockbypass", "daemon", "--config", file}
	if !slices.Equal(argv, want) {
		t.Errorf("command+args = %q, want %q", argv, want)
	}
}

// listensOn reports whether a server listening on host (from HOST:PORT)
// is reached by a probe to probeHost ("" for the pod IP).
func listensOn(host, probeHost string) bool {
	if host == "" || net.ParseIP(host).IsUnspecified() {
		return true
	}
	return probeHost == host
}

// TestDockerfileEntrypoint checks that the image runs what the DaemonSet
// runs, so that dropping command from the manifest would change nothing.
func TestDockerfileEntrypoint(t *testing.T) {
	m := load(t)
	data, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	var entrypoint []string
	for line := range strings.Lines(string(data)) {
		if rest, ok := strings.CutPrefix(line, "ENTRYPOINT "); ok {
			if err := json.Unmarshal([]byte(rest), &entrypoint); err != nil {
				t.Fatalf("ENTRYPOINT must be in exec (JSON) form: %v", err)
			}
		}
	}
	argv := append(slices.Clone(m.container.Command), m.container.Args...)
	if !slices.Equal(entrypoint, argv) {
		t.Errorf("Dockerfile ENTRYPOINT %q, DaemonSet runs %q", entrypoint, argv)
	}
}

func TestProbesAndMetrics(t *testing.T) {
	m := load(t)
	cfg, err := config.Parse([]byte(m.cm.Data[configKey]))
	if err != nil {
		t.Fatalf("ConfigMap %s: %v", configKey, err)
	}
	addr := cfg.Metrics()
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("metricsAddr %q: %v", addr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		t.Fatalf("metricsAddr %q: %v", addr, err)
	}

	var metrics *corev1.ContainerPort
	for i, p := range m.container.Ports {
		if p.Name == "metrics" {
			metrics = &m.container.Ports[i]
		}
	}
	if metrics == nil {
		t.Fatal("no containerPort named metrics")
	}
	if int(metrics.ContainerPort) != port {
		t.Errorf("containerPort metrics = %d, metricsAddr port = %d", metrics.ContainerPort, port)
	}
	// With hostNetwork, hostPort must equal containerPort.
	if metrics.HostPort != 0 && metrics.HostPort != metrics.ContainerPort {
		t.Errorf("hostPort %d != containerPort %d", metrics.HostPort, metrics.ContainerPort)
	}
	ann := m.ds.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != portStr {
		t.Errorf("prometheus.io annotations %v, want scrape true on port %s", ann, portStr)
	}

	for name, p := range map[string]*corev1.Probe{"liveness": m.container.LivenessProbe, "readiness": m.container.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("%s probe: want an HTTP GET", name)
			continue
		}
		g := p.HTTPGet
		// Liveness: the pins can be read; readiness: the selection is
		// applied (a refused reload or an unmatched node is not Ready).
		wantPath := map[string]string{"liveness": "/healthz", "readiness": "/readyz"}[name]
		if g.Path != wantPath {
			t.Errorf("%s probe path %q, want %s", name, g.Path, wantPath)
		}
		probed := g.Port.IntValue()
		if g.Port.Type == intstr.String {
			if g.Port.StrVal != metrics.Name {
				t.Errorf("%s probe port %q is not the metrics port", name, g.Port.StrVal)
			}
			probed = int(metrics.ContainerPort)
		}
		if probed != port {
			t.Errorf("%s probe port %d, metricsAddr port %d", name, probed, port)
		}
		if g.Scheme != "" && g.Scheme != corev1.URISchemeHTTP {
			t.Errorf("%s probe scheme %s", name, g.Scheme)
		}
		// The kubelet probes the pod IP (the node IP with hostNetwork)
		// unless host is set: the daemon must listen there.
		if !listensOn(host, g.Host) {
			t.Errorf("%s probe goes to host %q (empty: the node IP) but metricsAddr listens on %q", name, g.Host, host)
		}
	}
}

// TestConfigSelection checks that the ConfigMap selects pods from the API
// server (not by cgroup globs, which would take every pod of every
// namespace), never kube-system, with the daemon's own parser.
func TestConfigSelection(t *testing.T) {
	m := load(t)
	cfg, err := config.Parse([]byte(m.cm.Data[configKey]))
	if err != nil {
		t.Fatalf("ConfigMap %s: %v", configKey, err)
	}
	checkSelection(t, cfg)
}

// TestKustomization checks that kustomization.yaml lists every manifest of
// this directory, and only those.
func TestKustomization(t *testing.T) {
	var k struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Resources  []string `json:"resources"`
		Images     []struct {
			Name    string `json:"name"`
			NewName string `json:"newName,omitempty"`
			NewTag  string `json:"newTag,omitempty"`
			Digest  string `json:"digest,omitempty"`
		} `json:"images"`
	}
	docs := documents(t, "kustomization.yaml")
	if len(docs) != 1 {
		t.Fatalf("kustomization.yaml: %d documents", len(docs))
	}
	if err := yaml.UnmarshalStrict(docs[0], &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Errorf("kustomization.yaml: %s %s", k.APIVersion, k.Kind)
	}
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	files = slices.DeleteFunc(files, func(f string) bool { return f == "kustomization.yaml" })
	res := slices.Sorted(slices.Values(k.Resources))
	if !slices.Equal(res, files) {
		t.Errorf("kustomization resources %v, manifests in the directory %v", res, files)
	}
	m := load(t)
	for _, img := range k.Images {
		if img.Name != m.container.Image && !strings.HasPrefix(m.container.Image, img.Name+":") {
			t.Errorf("kustomization image %q does not match the container image %q", img.Name, m.container.Image)
		}
		if img.NewTag == "" || img.NewTag == "latest" {
			t.Errorf("kustomization image tag %q: use the release's tag", img.NewTag)
		}
	}
	checkImage(t, m.container)
}

// TestPodToPodOverlay checks the opt-in overlay in ../kubernetes-pod-to-pod:
// its patch targets this DaemonSet and container, keeps hostPID, and keeps
// every base capability (strategic merge replaces capabilities.add whole)
// plus exactly SYS_PTRACE and SYS_ADMIN.
func TestPodToPodOverlay(t *testing.T) {
	m := load(t)
	const dir = "../kubernetes-pod-to-pod"
	var k struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Resources  []string `json:"resources"`
		Patches    []struct {
			Path string `json:"path"`
		} `json:"patches"`
	}
	docs := documents(t, filepath.Join(dir, "kustomization.yaml"))
	if len(docs) != 1 {
		t.Fatalf("overlay kustomization: %d documents", len(docs))
	}
	if err := yaml.UnmarshalStrict(docs[0], &k); err != nil {
		t.Fatalf("overlay kustomization: %v", err)
	}
	if !slices.Equal(k.Resources, []string{"../kubernetes"}) || len(k.Patches) != 1 {
		t.Fatalf("overlay kustomization: resources %v, patches %v", k.Resources, k.Patches)
	}
	patchFile := filepath.Join(dir, k.Patches[0].Path)
	docs = documents(t, patchFile)
	if len(docs) != 1 {
		t.Fatalf("%s: %d documents", patchFile, len(docs))
	}
	var patch appsv1.DaemonSet
	decodeStrict(t, patchFile, docs[0], "apps/v1", "DaemonSet", &patch)
	if patch.Name != m.ds.Name || patch.Namespace != m.ds.Namespace {
		t.Errorf("patch targets %s/%s, want %s/%s", patch.Namespace, patch.Name, m.ds.Namespace, m.ds.Name)
	}
	spec := patch.Spec.Template.Spec
	if !spec.HostPID {
		t.Error("the overlay must set hostPID: pod processes must be visible in /proc")
	}
	if len(spec.Containers) != 1 || spec.Containers[0].Name != m.container.Name {
		t.Fatalf("patch containers %v, want only %s", spec.Containers, m.container.Name)
	}
	sc := spec.Containers[0].SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("patch has no capabilities")
	}
	var want, got []string
	for _, c := range m.container.SecurityContext.Capabilities.Add {
		want = append(want, string(c))
	}
	want = append(want, "SYS_ADMIN", "SYS_PTRACE")
	for _, c := range sc.Capabilities.Add {
		got = append(got, string(c))
	}
	slices.Sort(want)
	want = slices.Compact(want)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("overlay capabilities.add = %v, want %v", got, want)
	}
}
