package k8s

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/config"
	"github.com/sockbypass/sockbypass/internal/daemon"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/dptest"
)

const node = "node-a"

// mkCgroups creates the cgroup directories rel (relative to the cgroup v2
// mount, parents first) and removes them, deepest first, when t ends.
func mkCgroups(t *testing.T, mounts cgroup.Mounts, rel string) {
	t.Helper()
	var created []string
	dir := mounts.V2
	for _, part := range strings.Split(rel, "/") {
		dir = filepath.Join(dir, part)
		if err := os.Mkdir(dir, 0o755); err == nil {
			created = append(created, dir)
		} else if !os.IsExist(err) {
			t.Fatal(err)
		}
	}
	for _, d := range created {
		t.Cleanup(func() {
			if err := os.Remove(d); err != nil && !os.IsNotExist(err) {
				t.Errorf("remove %s: %v", d, err)
			}
		})
	}
}

type testPod struct {
	ns, name   string
	node       string
	qos        corev1.PodQOSClass
	ann        map[string]string
	containers []string
	phase      corev1.PodPhase
}

// create creates the pod and sets its status as the kubelet would
// (phase, QoS class); it returns the pod with its UID.
func (p testPod) create(t *testing.T, c kubernetes.Interface) *corev1.Pod {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: p.ns, Name: p.name, Annotations: p.ann},
		Spec:       corev1.PodSpec{NodeName: p.node},
	}
	if pod.Spec.NodeName == "" {
		pod.Spec.NodeName = node
	}
	// The API server derives status.qosClass from the resources.
	var res corev1.ResourceRequirements
	switch p.qos {
	case corev1.PodQOSGuaranteed:
		l := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("64Mi")}
		res = corev1.ResourceRequirements{Requests: l, Limits: l}
	case corev1.PodQOSBurstable:
		res = corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m")}}
	}
	for _, n := range append([]string{"app"}, p.containers...) {
		pod.Spec.Containers = append(pod.Spec.Containers, corev1.Container{Name: n, Image: "example/" + n, Resources: res})
	}
	ctx := context.Background()
	created, err := c.CoreV1().Pods(p.ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", p.ns, p.name, err)
	}
	phase := p.phase
	if phase == "" {
		phase = corev1.PodRunning
	}
	if created.Status.QOSClass != p.qos {
		t.Fatalf("pod %s/%s: QoS class %q, want %q", p.ns, p.name, created.Status.QOSClass, p.qos)
	}
	created.Status.Phase = phase
	updated, err := c.CoreV1().Pods(p.ns).UpdateStatus(ctx, created, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("status of pod %s/%s: %v", p.ns, p.name, err)
	}
	return updated
}

// enabledModes returns the enabled cgroups by path (relative to the
// mount), with their sidecar mode ("none", "redirect", "intercept").
func enabledModes(t *testing.T, dp *dataplane.Dataplane, mounts cgroup.Mounts) map[string]string {
	t.Helper()
	st, err := dp.Status()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, cg := range st.Cgroups {
		rel, _ := filepath.Rel(mounts.V2, cg.Path)
		mode := cg.Mesh
		if mode == "" {
			mode = "none"
		}
		out[rel] = mode
	}
	return out
}

// TestPodSelectionAgainstARealAPIServer runs the pod source against a real
// kube-apiserver (and etcd), as the daemon's user with only the RBAC of
// deploy/kubernetes: pods created with labels and annotations get their
// cgroups (made here as both kubelet drivers lay them out) enabled, and
// disabled when they go; kube-system, opted-out and other nodes' pods are
// never touched; only a pod with a sidecar gets sidecar mode (intercept,
// as configured); a running pod without its cgroup keeps the daemon not
// Ready and gets an Event, as does a failed enable.
func TestPodSelectionAgainstARealAPIServer(t *testing.T) {
	testutil.RequirePrivileged(t)
	api := testutil.StartAPIServer(t)
	admin := api.Admin(t)
	api.GrantDaemon(t, "../../deploy/kubernetes/rbac.yaml")
	ctx := context.Background()

	mounts, err := cgroup.ReadMounts()
	if err != nil {
		t.Fatal(err)
	}
	parent := testutil.NewCgroup(t)
	rel := strings.TrimPrefix(parent.Rel, "/")
	systemd := path.Join(rel, "kubepods.slice")
	cgroupfs := path.Join(rel, "kubepods")

	for name, l := range map[string]map[string]string{
		"apps":        {NamespaceLabel: "enabled"},
		"plain":       nil,
		"kube-system": {NamespaceLabel: "enabled"},
	} {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l}}
		if _, err := admin.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !strings.Contains(err.Error(), "already exists") {
			t.Fatal(err)
		}
		if name == "kube-system" {
			if _, err := admin.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}

	// Pods, and their cgroups where the kubelet would put them.
	type placed struct {
		pod *corev1.Pod
		rel string
	}
	place := func(p testPod, kubepods string) placed {
		pod := p.create(t, admin)
		rel := PodCgroup(kubepods, pod.UID, p.qos)
		mkCgroups(t, mounts, rel)
		return placed{pod, rel}
	}
	web := place(testPod{ns: "apps", name: "web", qos: corev1.PodQOSBurstable}, systemd)
	meshed := place(testPod{ns: "apps", name: "meshed", qos: corev1.PodQOSGuaranteed, containers: []string{"istio-proxy"}}, cgroupfs)
	annotated := place(testPod{ns: "plain", name: "annotated", qos: corev1.PodQOSBestEffort, ann: map[string]string{PodAnnotation: "true"}}, systemd)
	ignored := place(testPod{ns: "plain", name: "ignored", qos: corev1.PodQOSBurstable}, cgroupfs)
	optOut := place(testPod{ns: "apps", name: "opt-out", qos: corev1.PodQOSBestEffort, ann: map[string]string{PodAnnotation: "false"}}, systemd)
	system := place(testPod{ns: "kube-system", name: "etcd-node-a", qos: corev1.PodQOSBurstable, ann: map[string]string{PodAnnotation: "true"}}, cgroupfs)
	elsewhere := place(testPod{ns: "apps", name: "elsewhere", node: "node-b", qos: corev1.PodQOSBurstable}, systemd)

	cfg, err := config.Parse([]byte(fmt.Sprintf(`cgroups: []
mesh:
  name: istio
  intercept: true
kubernetes:
  kubepods: [%s, %s]
  nodeName: %s
`, systemd, cgroupfs, node)))
	if err != nil {
		t.Fatal(err)
	}
	dp := dptest.Install(t)
	runCtx, cancel := context.WithCancel(ctx)
	t.Cleanup(cancel)
	log := zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	src := NewSource(api.Daemon(t), node, log)
	if err := src.Start(runCtx, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	d := daemon.New(dp, cfg, log)
	d.SetSource(src)

	// converge reconciles until check passes (informer events are
	// asynchronous).
	converge := func(what string, check func(map[string]string) error) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			d.Reconcile()
			err := check(enabledModes(t, dp, mounts))
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %v", what, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	want := func(modes map[string]string, enabled map[string]string, never ...placed) error {
		for rel, mode := range enabled {
			if modes[rel] != mode {
				return fmt.Errorf("%s: mode %q, want %q (enabled: %v)", rel, modes[rel], mode, modes)
			}
		}
		for _, p := range never {
			if m, ok := modes[p.rel]; ok {
				return fmt.Errorf("%s/%s (%s) enabled in mode %s, must not be", p.pod.Namespace, p.pod.Name, p.rel, m)
			}
		}
		if len(modes) != len(enabled) {
			return fmt.Errorf("enabled %v, want %v", modes, enabled)
		}
		return nil
	}
	converge("initial selection", func(m map[string]string) error {
		return want(m, map[string]string{web.rel: "none", meshed.rel: "intercept", annotated.rel: "none"}, ignored, optOut, system, elsewhere)
	})
	if err := d.Ready(); err != nil {
		t.Errorf("Ready: %v", err)
	}

	// A pod that goes is disabled; a namespace that opts in brings its
	// pods.
	if err := admin.CoreV1().Pods("apps").Delete(ctx, "web", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	plain, err := admin.CoreV1().Namespaces().Get(ctx, "plain", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	plain.Labels = map[string]string{NamespaceLabel: "enabled"}
	if _, err := admin.CoreV1().Namespaces().Update(ctx, plain, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	converge("after deleting apps/web and labelling plain", func(m map[string]string) error {
		return want(m, map[string]string{meshed.rel: "intercept", annotated.rel: "none", ignored.rel: "none"}, web, optOut, system, elsewhere)
	})

	// A running, selected pod whose cgroup is nowhere (another
	// --cgroup-root, a cgroup v1 node): not Ready, and an Event says why.
	lost := testPod{ns: "apps", name: "lost", qos: corev1.PodQOSBurstable}.create(t, admin)
	deadline := time.Now().Add(20 * time.Second)
	for {
		d.Reconcile()
		if err := d.Ready(); err != nil && strings.Contains(err.Error(), "apps/lost") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a selected pod without a cgroup left the daemon Ready: %v", d.Ready())
		}
		time.Sleep(100 * time.Millisecond)
	}
	waitEvent(t, admin, lost, ReasonCgroupNotFound, "no pod cgroup on node "+node)

	// A failed enable: an Event on the pod (the daemon counts it; see
	// internal/daemon).
	src.EnableFailed(daemon.Target{Owner: "apps/meshed"}, errors.New("enable /sys/fs/cgroup/x: attach sock_ops: operation not permitted"))
	waitEvent(t, admin, meshed.pod, ReasonEnableFailed, "operation not permitted")
	// A connection of the pod that left the fast path: a Normal Event.
	src.Fallback(daemon.Target{Owner: "apps/meshed"}, dataplane.FallbackEvent{Reason: dataplane.EventLateBlocking,
		Local: netip.MustParseAddrPort("127.0.0.1:6379"), Remote: netip.MustParseAddrPort("127.0.0.1:40000")})
	waitEventOfType(t, admin, meshed.pod, corev1.EventTypeNormal, ReasonFallback, "127.0.0.1:6379 -> 127.0.0.1:40000 turned blocking")

	if err := admin.CoreV1().Pods("apps").Delete(ctx, "lost", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(20 * time.Second)
	for d.Reconcile(); d.Ready() != nil; d.Reconcile() {
		if time.Now().After(deadline) {
			t.Fatalf("not Ready once the pod without a cgroup is gone: %v", d.Ready())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func waitEvent(t *testing.T, c kubernetes.Interface, pod *corev1.Pod, reason, text string) {
	t.Helper()
	waitEventOfType(t, c, pod, corev1.EventTypeWarning, reason, text)
}

// waitEventOfType waits for an Event of type typ (Normal, Warning) on pod
// with reason and a message containing text.
func waitEventOfType(t *testing.T, c kubernetes.Interface, pod *corev1.Pod, typ, reason, text string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		evs, err := c.CoreV1().Events(pod.Namespace).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range evs.Items {
			if ev.InvolvedObject.UID == pod.UID && ev.Reason == reason && ev.Type == typ && strings.Contains(ev.Message, text) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s %s Event on %s/%s mentioning %q; events: %+v", typ, reason, pod.Namespace, pod.Name, text, evs.Items)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestFallbackEventsOnThePod: a fallback event of a pod's cgroup becomes a
// Normal Event on the pod naming the connection; a second one of the same
// kind within a minute is not written but counted in the next.
func TestFallbackEventsOnThePod(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "web", UID: "uid-web"}}
	client := fake.NewSimpleClientset(pod)
	// The fake API server does not implement generateName.
	names := 0
	client.PrependReactor("create", "events", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if ev := a.(k8stesting.CreateAction).GetObject().(*corev1.Event); ev.Name == "" {
			names++
			ev.Name = fmt.Sprintf("%s%d", ev.GenerateName, names)
		}
		return false, nil, nil
	})
	src := NewSource(client, "node-a", zaptest.NewLogger(t))
	if err := src.pods.GetStore().Add(pod); err != nil {
		t.Fatal(err)
	}
	target := daemon.Target{Owner: "apps/web"}
	ev := dataplane.FallbackEvent{Reason: dataplane.EventLateBlocking,
		Local: netip.MustParseAddrPort("127.0.0.1:6379"), Remote: netip.MustParseAddrPort("127.0.0.1:40000")}
	src.Fallback(target, ev)
	ev.Remote = netip.MustParseAddrPort("127.0.0.1:40002")
	src.Fallback(target, ev) // within the minute: counted, not written
	evs, err := client.CoreV1().Events("apps").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(evs.Items) != 1 {
		t.Fatalf("%d Events, want 1: %+v", len(evs.Items), evs.Items)
	}
	e := evs.Items[0]
	if e.Reason != ReasonFallback || e.Type != corev1.EventTypeNormal || e.InvolvedObject.UID != pod.UID ||
		!strings.Contains(e.Message, "127.0.0.1:6379 -> 127.0.0.1:40000 turned blocking") {
		t.Errorf("Event %s %s on %s: %q", e.Type, e.Reason, e.InvolvedObject.UID, e.Message)
	}
	src.mu.Lock()
	src.fallbacks[string(pod.UID)+"/"+ev.Reason].at = time.Now().Add(-2 * fallbackEventEvery)
	src.mu.Unlock()
	src.Fallback(target, ev)
	evs, _ = client.CoreV1().Events("apps").List(context.Background(), metav1.ListOptions{})
	if len(evs.Items) != 2 || !strings.Contains(evs.Items[1].Message, "and 1 more like it") {
		t.Errorf("after the minute: %d Events, last %q; want 2, the last counting 1 more", len(evs.Items), evs.Items[len(evs.Items)-1].Message)
	}
	// A target that is no pod (a cgroup named by the configuration): nothing.
	src.Fallback(daemon.Target{}, ev)
}
