package k8s

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
)

const uid = types.UID("0b3c1d2e-4f5a-6b7c-8d9e-0f1a2b3c4d5e")

// TestPodCgroupBothDriversAnyRoot: the paths are those kubelet makes
// (pkg/kubelet/cm: the systemd driver escapes "-" in the pod UID to "_"
// and nests slices by their dashed names).
func TestPodCgroupBothDriversAnyRoot(t *testing.T) {
	for _, c := range []struct {
		kubepods string
		qos      corev1.PodQOSClass
		want     string
	}{
		{"kubepods.slice", corev1.PodQOSBurstable, "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b3c1d2e_4f5a_6b7c_8d9e_0f1a2b3c4d5e.slice"},
		{"kubepods.slice", corev1.PodQOSBestEffort, "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b3c1d2e_4f5a_6b7c_8d9e_0f1a2b3c4d5e.slice"},
		{"kubepods.slice", corev1.PodQOSGuaranteed, "kubepods.slice/kubepods-pod0b3c1d2e_4f5a_6b7c_8d9e_0f1a2b3c4d5e.slice"},
		{"kubepods", corev1.PodQOSBurstable, "kubepods/burstable/pod0b3c1d2e-4f5a-6b7c-8d9e-0f1a2b3c4d5e"},
		{"kubepods", corev1.PodQOSBestEffort, "kubepods/besteffort/pod0b3c1d2e-4f5a-6b7c-8d9e-0f1a2b3c4d5e"},
		{"kubepods", corev1.PodQOSGuaranteed, "kubepods/pod0b3c1d2e-4f5a-6b7c-8d9e-0f1a2b3c4d5e"},
		// --cgroup-root=/kubelet.slice (kind with systemd), /kubelet (cgroupfs)
		{"kubelet.slice/kubelet-kubepods.slice", corev1.PodQOSBurstable, "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod0b3c1d2e_4f5a_6b7c_8d9e_0f1a2b3c4d5e.slice"},
		{"kubelet.slice/kubelet-kubepods.slice", corev1.PodQOSGuaranteed, "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod0b3c1d2e_4f5a_6b7c_8d9e_0f1a2b3c4d5e.slice"},
		{"kubelet/kubepods", corev1.PodQOSBestEffort, "kubelet/kubepods/besteffort/pod0b3c1d2e-4f5a-6b7c-8d9e-0f1a2b3c4d5e"},
	} {
		if got := PodCgroup(c.kubepods, uid, c.qos); got != c.want {
			t.Errorf("PodCgroup(%s, %s) = %s, want %s", c.kubepods, c.qos, got, c.want)
		}
	}
	got := PodCgroupCandidates([]string{"kubepods"}, uid, "")
	if len(got) != 3 || !slices.Contains(got, "kubepods/pod"+string(uid)) {
		t.Errorf("candidates without a QoS class: %v, want all three", got)
	}
	if got := PodCgroupCandidates([]string{"kubepods", "kubepods.slice"}, uid, corev1.PodQOSBestEffort); len(got) != 2 {
		t.Errorf("candidates with a QoS class: %v, want one per root", got)
	}
}

func TestFindKubepods(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{
		"kubepods.slice/kubepods-burstable.slice",
		"kubelet.slice/kubelet-kubepods.slice",
		"kubelet/kubepods/burstable",
		"system.slice/containerd.service/kubepods", // inside a service: not entered
		"user.slice/user-0.slice/session-1.scope",
		"a/b/c/kubepods", // too deep
	} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	got, err := FindKubepods(root, 2)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	want := []string{"kubelet.slice/kubelet-kubepods.slice", "kubelet/kubepods", "kubepods.slice"}
	if !slices.Equal(got, want) {
		t.Errorf("FindKubepods = %v, want %v", got, want)
	}
	if _, err := FindKubepods(filepath.Join(root, "missing"), 2); err == nil {
		t.Error("a missing root is not an error")
	}
}

func pod(ns string, ann map[string]string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: ns, Annotations: ann, UID: uid}}
}

func namespace(name string, l map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l}}
}

func TestDecide(t *testing.T) {
	istio, err := labels.Parse("istio-injection=enabled")
	if err != nil {
		t.Fatal(err)
	}
	def := DefaultRules()
	mesh := DefaultRules()
	mesh.NamespaceSelectors = append(mesh.NamespaceSelectors, istio)
	all := DefaultRules()
	all.AllPods = true
	on := map[string]string{NamespaceLabel: "enabled"}
	off := map[string]string{NamespaceLabel: "disabled"}
	hostNet := pod("apps", nil)
	hostNet.Spec.HostNetwork = true
	hostNetIn := pod("apps", map[string]string{PodAnnotation: "true"})
	hostNetIn.Spec.HostNetwork = true
	done := pod("apps", nil)
	done.Status.Phase = corev1.PodSucceeded
	for _, c := range []struct {
		name  string
		rules Rules
		pod   *corev1.Pod
		ns    *corev1.Namespace
		want  bool
	}{
		{"unlabelled namespace, no annotation", def, pod("apps", nil), namespace("apps", nil), false},
		{"namespace label", def, pod("apps", nil), namespace("apps", on), true},
		{"pod annotation", def, pod("apps", map[string]string{PodAnnotation: "true"}), namespace("apps", nil), true},
		{"pod annotation, namespace not known yet", def, pod("apps", map[string]string{PodAnnotation: "true"}), nil, true},
		{"pod opts out of a labelled namespace", def, pod("apps", map[string]string{PodAnnotation: "false"}), namespace("apps", on), false},
		{"disabled namespace wins over the pod", def, pod("apps", map[string]string{PodAnnotation: "true"}), namespace("apps", off), false},
		{"kube-system, even labelled and annotated", all, pod("kube-system", map[string]string{PodAnnotation: "true"}), namespace("kube-system", on), false},
		{"kube-system with all pods", all, pod("kube-system", nil), namespace("kube-system", nil), false},
		{"all pods", all, pod("apps", nil), namespace("apps", nil), true},
		{"all pods, but opted out", all, pod("apps", map[string]string{PodAnnotation: "false"}), namespace("apps", nil), false},
		{"istio-injection with the mesh selector", mesh, pod("apps", nil), namespace("apps", map[string]string{"istio-injection": "enabled"}), true},
		{"istio-injection without it", def, pod("apps", nil), namespace("apps", map[string]string{"istio-injection": "enabled"}), false},
		{"host network in a labelled namespace", def, hostNet, namespace("apps", on), false},
		{"host network, annotated", def, hostNetIn, namespace("apps", on), true},
		{"finished pod", def, done, namespace("apps", on), false},
	} {
		if got := c.rules.Decide(c.pod, c.ns); got.Selected != c.want {
			t.Errorf("%s: selected %v (%s), want %v", c.name, got.Selected, got.Reason, c.want)
		}
	}
}

func TestSidecar(t *testing.T) {
	always := corev1.ContainerRestartPolicyAlways
	with := func(init bool, restart *corev1.ContainerRestartPolicy, names ...string) *corev1.Pod {
		p := pod("apps", nil)
		for _, n := range names {
			c := corev1.Container{Name: n, RestartPolicy: restart}
			if init {
				p.Spec.InitContainers = append(p.Spec.InitContainers, c)
			} else {
				p.Spec.Containers = append(p.Spec.Containers, c)
			}
		}
		return p
	}
	annotated := with(false, nil, "app")
	annotated.Annotations = map[string]string{SidecarAnnotation: "kuma"}
	none := with(false, nil, "app", "istio-proxy")
	none.Annotations = map[string]string{SidecarAnnotation: "none"}
	for _, c := range []struct {
		name string
		pod  *corev1.Pod
		want string
	}{
		{"plain app", with(false, nil, "app"), ""},
		{"istio sidecar container", with(false, nil, "app", "istio-proxy"), "istio"},
		{"linkerd sidecar container", with(false, nil, "linkerd-proxy", "app"), "linkerd"},
		{"native sidecar (init, restartPolicy Always)", with(true, &always, "istio-proxy"), "istio"},
		{"init container that exits (istio-init style)", with(true, nil, "istio-proxy"), ""},
		{"istio-init only", with(true, nil, "istio-init"), ""},
		{"annotation", annotated, "kuma"},
		{"annotation none", none, ""},
	} {
		if got := Sidecar(c.pod); got != c.want {
			t.Errorf("%s: Sidecar = %q, want %q", c.name, got, c.want)
		}
	}
}

// TestMeshOnlyWithASidecar: intercept mode (connects sent to
// 127.0.0.1:15001) is never given to a pod without a sidecar, and only
// the configured mesh gets the configured (intercept) options.
func TestMeshOnlyWithASidecar(t *testing.T) {
	intercept, err := MeshFor("istio", "", nil)
	if err != nil || intercept == nil || intercept.Intercept {
		t.Fatalf("istio preset: %+v, %v; want redirect mode", intercept, err)
	}
	configured := *intercept
	configured.Intercept = true
	if m, _ := MeshFor("", "istio", &configured); m != nil {
		t.Errorf("a pod without a sidecar got sidecar mode %+v", m)
	}
	if m, _ := MeshFor("istio", "istio", &configured); m == nil || !m.Intercept {
		t.Errorf("an istio pod did not get the configured intercept mode: %+v", m)
	}
	if m, _ := MeshFor("linkerd", "istio", &configured); m == nil || m.Intercept || m.OutboundPort != 4140 {
		t.Errorf("a linkerd pod got %+v, want linkerd's preset in redirect mode", m)
	}
	if _, err := MeshFor("consul", "", nil); err == nil {
		t.Error("an unknown mesh annotation is not an error")
	}
}
