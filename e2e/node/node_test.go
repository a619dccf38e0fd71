package node

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sockbypass/sockbypass/e2e/node/cluster"
	"github.com/sockbypass/sockbypass/e2e/node/ociimage"
	"github.com/sockbypass/sockbypass/internal/k8s"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// The images the test builds and imports.
const (
	sockbypassRepo = "localhost/sockbypass-e2e/sockbypass"
	sockbypassTag  = "e2e"
	appImage       = "localhost/sockbypass-e2e/app:1"
	nodeName       = "sockbypass-node-e2e"
	systemNS       = "sockbypass-system"
	accelNS        = "accel"
	plainNS        = "plain"
)

// SkipMessage starts the message of a TestNode that did not run for want
// of the cached builds (scripts/testreport prints a banner for it).
const SkipMessage = "NODE E2E DID NOT RUN: no cached"

func cacheDir() string {
	if c := os.Getenv("SOCKBYPASS_K8S_CACHE"); c != "" {
		return c
	}
	return "/var/cache/sockbypass-k8s"
}

// recordingT is TestNode's *testing.T that also keeps the messages that
// failed the test, so that its last lines (after the node's logs) say
// them again: a record that keeps only a log's head and tail (CI's does)
// still says why the node test failed.
type recordingT struct {
	*testing.T
	mu     sync.Mutex
	failed []string
}

func (r *recordingT) keep(msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failed = append(r.failed, strings.TrimSpace(msg))
}

// Errorf records the message and fails the test.
func (r *recordingT) Errorf(format string, args ...any) {
	r.Helper()
	r.keep(fmt.Sprintf(format, args...))
	r.T.Errorf(format, args...)
}

// Error records the message and fails the test.
func (r *recordingT) Error(args ...any) {
	r.Helper()
	r.keep(fmt.Sprintln(args...))
	r.T.Error(args...)
}

// Fatalf records the message and ends the test.
func (r *recordingT) Fatalf(format string, args ...any) {
	r.Helper()
	r.keep(fmt.Sprintf(format, args...))
	r.T.Fatalf(format, args...)
}

// Fatal records the message and ends the test.
func (r *recordingT) Fatal(args ...any) {
	r.Helper()
	r.keep(fmt.Sprintln(args...))
	r.T.Fatal(args...)
}

// sayFailures logs the recorded messages once more, each cut to its first
// lines (a kubelet log attached to one stays above).
func (r *recordingT) sayFailures() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.failed) == 0 {
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "TestNode failed (%d message(s), repeated from above):", len(r.failed))
	for _, m := range r.failed {
		lines := strings.Split(m, "\n")
		if len(lines) > 3 {
			lines = append(lines[:3], "[…]")
		}
		b.WriteString("\n  - " + strings.Join(lines, "\n    "))
	}
	r.T.Log(b.String())
}

// report collects the run's steps, results and timings.
type report struct {
	t     testing.TB
	start time.Time
	lines []string
}

func (r *report) add(format string, args ...any) {
	line := fmt.Sprintf("[%6.1fs] ", time.Since(r.start).Seconds()) + fmt.Sprintf(format, args...)
	r.lines = append(r.lines, line)
	r.t.Log(line)
}

func (r *report) print() {
	out := "# node e2e report (" + time.Now().UTC().Format(time.RFC3339) + ", " + runtime.Version() + ")\n" + strings.Join(r.lines, "\n") + "\n"
	fmt.Print("\n" + out)
	if dir := os.Getenv("SOCKBYPASS_NODE_REPORT_DIR"); dir != "" {
		os.MkdirAll(dir, 0o755)
		os.WriteFile(filepath.Join(dir, "report.md"), []byte(out), 0o644)
	}
}

func repoRoot(t testing.TB) string {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Clean(filepath.Join(wd, "..", ".."))
}

// goBuild builds a static binary of pkg into out.
func goBuild(t testing.TB, out, pkg string) {
	t.Helper()
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
}

// TestNode is make node-e2e: a one-node cluster of real parts (package
// cluster), sockbypass installed on it with its Helm chart, and what
// must hold on such a node.
func TestNode(tt *testing.T) {
	t := &recordingT{T: tt}
	bins, missing := cluster.CachedBinaries(cacheDir())
	if len(missing) > 0 {
		// Building them takes too long for every CI run: the test runs
		// where `make node-e2e` (e2e/node/build.sh) has cached them,
		// and says plainly when it does not, in CI too.
		t.Skipf("SKIPPED: %s builds (%s): run `make node-e2e` once (builds kubelet, kube-apiserver, controller manager, scheduler %s, containerd %s and runc %s into %s)",
			SkipMessage, strings.Join(missing, ", "), cluster.KubeVersion, cluster.ContainerdVersion, cluster.RuncVersion, cacheDir())
	}
	testutil.RequirePrivileged(t)
	if err := readTimeScale(); err != nil {
		t.Fatal(err)
	}
	tools := []string{"etcd", "iptables", "ip"}
	if cgroupDriver() == "cgroupfs" {
		tools = append(tools, "unshare", "nsenter")
	} else if _, err := os.Stat("/run/systemd/system"); err != nil {
		t.Fatalf("%s=systemd, but systemd is not PID 1 here (no /run/systemd/system): use make node-e2e-systemd", envCgroupDriver)
	}
	for _, tool := range tools {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Fatalf("%s not found (e2e/node/build.sh installs etcd-server and iptables): %v", tool, err)
		}
		if tool == "etcd" {
			bins.Etcd = p
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), scaled(12*time.Minute))
	defer cancel()
	rep := &report{t: t, start: time.Now()}
	defer rep.print()
	log := zap.NewExample()
	dir := t.TempDir()

	// Static binaries, CNI plugins, images.
	tb := time.Now()
	bin := filepath.Join(dir, "bin")
	bins.CNIDir = filepath.Join(dir, "cni-bin")
	what := "built static sockbypass, nodeapp, CNI bridge/host-local/loopback and 3 OCI images"
	if pre := os.Getenv(envPrebuilt); pre != "" {
		// Built on the host by e2e/node/guest/run.sh.
		bin, bins.CNIDir = pre, filepath.Join(pre, "cni-bin")
		what = "took static sockbypass, nodeapp, CNI bridge/host-local/loopback from " + pre + ", built 3 OCI images"
	} else {
		goBuild(t, filepath.Join(bin, "sockbypass"), "./cmd/sockbypass")
		goBuild(t, filepath.Join(bin, "nodeapp"), "./e2e/node/cmd/nodeapp")
		for _, p := range []string{"main/bridge", "ipam/host-local", "main/loopback"} {
			goBuild(t, filepath.Join(bins.CNIDir, filepath.Base(p)), "github.com/containernetworking/plugins/plugins/"+p)
		}
	}
	images := []ociimage.Image{
		{Name: cluster.PauseImage, Files: []ociimage.File{{Path: "/nodeapp", Source: filepath.Join(bin, "nodeapp"), Mode: 0o755}}, Entrypoint: []string{"/nodeapp", "pause"}},
		{Name: appImage, Files: []ociimage.File{{Path: "/nodeapp", Source: filepath.Join(bin, "nodeapp"), Mode: 0o755}}, Entrypoint: []string{"/nodeapp"}, Dirs: []string{"/tmp"}},
		// As deploy/Dockerfile: the static binary only.
		{Name: sockbypassRepo + ":" + sockbypassTag, Files: []ociimage.File{{Path: "/sockbypass", Source: filepath.Join(bin, "sockbypass"), Mode: 0o755}},
			Entrypoint: []string{"/sockbypass", "daemon", "--config", "/etc/sockbypass/config.yaml"}},
	}
	var tarballs []string
	for i, im := range images {
		p := filepath.Join(dir, fmt.Sprintf("image-%d.tar", i))
		if _, err := im.WriteFile(p); err != nil {
			t.Fatal(err)
		}
		tarballs = append(tarballs, p)
	}
	rep.add("%s in %v", what, time.Since(tb).Round(time.Millisecond))

	// The node.
	tn := time.Now()
	node, err := cluster.Start(ctx, cluster.Options{Name: nodeName, Dir: filepath.Join(dir, "node"), Binaries: bins, Log: log,
		CgroupDriver: cgroupDriver(), TimeScale: timeScale})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("node logs:\n%s", node.Logs(6000))
			if d, err := time.ParseDuration(os.Getenv("SOCKBYPASS_NODE_PAUSE_ON_FAIL")); err == nil {
				// Time to look at the failed node before it goes.
				t.Logf("node kept for %v (holder pid %d)", d, node.HolderPID())
				time.Sleep(d)
			}
			if keep := os.Getenv("SOCKBYPASS_NODE_KEEP_LOGS"); keep != "" {
				// The node's logs and the pods' (for a failure to look into).
				exec.Command("cp", "-r", filepath.Join(dir, "node"), keep).Run()
			}
		}
		if err := node.Stop(); err != nil {
			t.Error(err)
		}
		t.sayFailures()
	})
	for _, p := range tarballs {
		if err := node.Ctr(ctx, nil, "images", "import", "--no-unpack=false", p); err != nil {
			t.Fatal(err)
		}
	}
	if err := node.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	for _, tm := range node.Timings {
		rep.add("  %s: %v", tm.Step, tm.D.Round(time.Millisecond))
	}
	rep.add("(1) node up in %v: etcd, kube-apiserver, controller manager, scheduler, containerd %s + runc %s, kubelet %s; Node Ready",
		time.Since(tn).Round(time.Millisecond), cluster.ContainerdVersion, cluster.RuncVersion, cluster.KubeVersion)
	v2, _ := cluster.Cgroup2Mount()
	rep.add("(1) cgroup driver %s (kubelet cgroupDriver, containerd runc SystemdCgroup=%v), pod cgroups under %s; timeouts x%d",
		cgroupDriver(), cgroupDriver() == "systemd", filepath.Join(v2, node.KubepodsDir), timeScale)

	h := &harness{t: t, ctx: ctx, node: node, rep: rep, bin: bin, dir: dir}
	h.run()
}

// harness holds what the steps of TestNode share.
type harness struct {
	t    *recordingT
	ctx  context.Context
	node *cluster.Node
	rep  *report
	// bin holds the static binaries (sockbypass, nodeapp); dir is the
	// test's directory.
	bin, dir string
	// metricsPort is the DaemonSet's metrics (and probe) port.
	metricsPort int
	// saidSysResource: the report says why SYS_RESOURCE is dropped.
	saidSysResource bool
}

func (h *harness) run() {
	t := h.t
	admin := h.node.Admin
	// Namespaces: one selected by its label, one not.
	for _, ns := range []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: accelNS, Labels: map[string]string{"sockbypass.io/accelerate": "enabled"}}},
		{ObjectMeta: metav1.ObjectMeta{Name: plainNS}},
	} {
		if _, err := admin.CoreV1().Namespaces().Create(h.ctx, ns, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, ns := range []string{accelNS, plainNS, "kube-system"} {
		h.waitServiceAccount(ns)
	}

	// (1) a pod runs.
	tp := time.Now()
	serverA := h.createPod(server(accelNS, "server-a", true))
	h.rep.add("(1) first pod (%s, Guaranteed) Running in %v, IP %s", "accel/server-a", time.Since(tp).Round(time.Millisecond), serverA.Status.PodIP)
	h.checkPodCgroup(serverA)

	// (2) sockbypass from its Helm chart, as the DaemonSet pod.
	h.helmInstall(false)

	// (3) selection and traffic.
	h.traffic(serverA)
	if t.Failed() {
		return
	}
	h.nonRoot()
	// (4) churn, (5) restarts, (6) readiness and Events, (7) uninstall.
	h.churn(serverA)
	h.restart(serverA)
	h.noLeaks(serverA)
	h.readiness()
	h.uninstall(serverA)
}

func (h *harness) waitServiceAccount(ns string) {
	err := cluster.WaitFor(h.ctx, scaled(60*time.Second), func() error {
		_, err := h.node.Admin.CoreV1().ServiceAccounts(ns).Get(h.ctx, "default", metav1.GetOptions{})
		return err
	})
	if err != nil {
		h.t.Fatalf("namespace %s has no default service account: %v", ns, err)
	}
}

func server(ns, name string, guaranteed bool) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeName:                      nodeName,
			AutomountServiceAccountToken:  new(false),
			TerminationGracePeriodSeconds: new(int64(2)),
			Containers: []corev1.Container{{
				Name: "server", Image: appImage, ImagePullPolicy: corev1.PullNever,
				Args: []string{"server", "-port", "8080"},
			}},
		},
	}
	if guaranteed {
		rl := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("64Mi")}
		p.Spec.Containers[0].Resources = corev1.ResourceRequirements{Requests: rl, Limits: rl}
	}
	return p
}

func client(ns, name, target string, args ...string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeName:                      nodeName,
			RestartPolicy:                 corev1.RestartPolicyNever,
			AutomountServiceAccountToken:  new(false),
			TerminationGracePeriodSeconds: new(int64(5)),
			Containers: []corev1.Container{{
				Name: "client", Image: appImage, ImagePullPolicy: corev1.PullNever,
				Args: append([]string{"client", "-target", target}, args...),
			}},
		},
	}
}

// createPod creates the pod and waits until it runs (or, for a pod that
// ends, until it started), returning it as it is then.
func (h *harness) createPod(p *corev1.Pod) *corev1.Pod {
	h.t.Helper()
	h.create(p)
	return h.waitPod(p.Namespace, p.Name, func(p *corev1.Pod) bool {
		return p.Status.Phase == corev1.PodRunning || p.Status.Phase == corev1.PodSucceeded
	}, 90*time.Second)
}

func (h *harness) waitPod(ns, name string, ok func(*corev1.Pod) bool, timeout time.Duration) *corev1.Pod {
	h.t.Helper()
	var last *corev1.Pod
	err := cluster.WaitFor(h.ctx, scaled(timeout), func() error {
		p, err := h.node.Admin.CoreV1().Pods(ns).Get(h.ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		last = p
		if p.Status.Phase == corev1.PodFailed {
			return fmt.Errorf("pod %s/%s failed: %s", ns, name, podStatus(p))
		}
		if ok(p) {
			return nil
		}
		return fmt.Errorf("pod %s/%s: %s", ns, name, podStatus(p))
	})
	if err != nil {
		h.t.Fatalf("%v\nkubelet:\n%s", err, h.node.KubeletLog(4000))
	}
	return last
}

func podStatus(p *corev1.Pod) string {
	s := string(p.Status.Phase)
	for _, c := range append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
		switch {
		case c.State.Waiting != nil:
			s += fmt.Sprintf(" %s waiting %s %s", c.Name, c.State.Waiting.Reason, c.State.Waiting.Message)
		case c.State.Terminated != nil:
			s += fmt.Sprintf(" %s terminated %s (exit %d) %s", c.Name, c.State.Terminated.Reason, c.State.Terminated.ExitCode, c.State.Terminated.Message)
		case c.State.Running != nil:
			s += fmt.Sprintf(" %s running ready=%v", c.Name, c.Ready)
		}
	}
	for _, c := range p.Status.Conditions {
		if c.Status != corev1.ConditionTrue && c.Message != "" {
			s += fmt.Sprintf(" [%s: %s]", c.Type, c.Message)
		}
	}
	return s
}

// podCgroup returns the pod's cgroup directory under the cgroup2 mount, as
// the kubelet lays it out: <root>/kubepods/<qos>/pod<uid> (cgroupfs
// driver, --cgroup-root /<node>) or
// kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice
// (systemd driver).
func (h *harness) podCgroup(p *corev1.Pod) string {
	v2, err := cluster.Cgroup2Mount()
	if err != nil {
		h.t.Fatal(err)
	}
	return filepath.Join(v2, k8s.PodCgroup(h.node.KubepodsDir, p.UID, p.Status.QOSClass))
}

// checkPodCgroup reports where the kubelet's pod cgroup landed: the
// cgroup2 mount must hold it, with the pod's processes below it.
func (h *harness) checkPodCgroup(p *corev1.Pod) {
	dir := h.podCgroup(p)
	entries, err := os.ReadDir(dir)
	if err != nil {
		h.t.Fatalf("the kubelet-made pod cgroup of %s/%s is not under the cgroup2 mount: %v", p.Namespace, p.Name, err)
	}
	var containers []string
	procs := 0
	for _, e := range entries {
		if e.IsDir() {
			// cgroupfs: <id>; systemd: cri-containerd-<id>.scope.
			id := strings.TrimPrefix(e.Name(), "cri-containerd-")
			containers = append(containers, e.Name()[:len(e.Name())-len(id)]+id[:min(12, len(id))])
			data, _ := os.ReadFile(filepath.Join(dir, e.Name(), "cgroup.procs"))
			procs += len(strings.Fields(string(data)))
		}
	}
	if procs == 0 {
		h.t.Fatalf("pod cgroup %s has no process in its container cgroups %v", dir, containers)
	}
	h.rep.add("(1) pod cgroup in the cgroup2 mount: %s (containers %v, %d processes)", dir, containers, procs)
}

// readClientResults reads a client pod's JSON lines from the kubelet's
// container log (podLogsDirectory/<ns>_<pod>_<uid>/<container>/0.log).
func (h *harness) clientResults(p *corev1.Pod, container string) ([]connResult, error) {
	pattern := filepath.Join(h.node.PodLogsDir(), fmt.Sprintf("%s_%s_%s", p.Namespace, p.Name, p.UID), container, "*.log")
	files, _ := filepath.Glob(pattern)
	if len(files) == 0 {
		return nil, fmt.Errorf("no log at %s", pattern)
	}
	slices.Sort(files)
	var out []connResult
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			return nil, err
		}
		s := bufio.NewScanner(fh)
		s.Buffer(make([]byte, 1<<20), 1<<20)
		for s.Scan() {
			// CRI log lines: TIME STREAM P|F MESSAGE
			fields := strings.SplitN(s.Text(), " ", 4)
			if len(fields) < 4 || !strings.HasPrefix(fields[3], "{\"conn\"") {
				continue
			}
			var r connResult
			if err := json.Unmarshal([]byte(fields[3]), &r); err != nil {
				fh.Close()
				return nil, fmt.Errorf("%s: %v", f, err)
			}
			out = append(out, r)
		}
		fh.Close()
	}
	return out, nil
}

// connResult is a line of `nodeapp client` (e2e/node/cmd/nodeapp).
type connResult struct {
	Conn       int     `json:"conn"`
	Local      string  `json:"local"`
	Seconds    float64 `json:"seconds"`
	Sent       int64   `json:"sent"`
	Received   int64   `json:"received"`
	SentSHA    string  `json:"sent_sha256"`
	RecvSHA    string  `json:"received_sha256"`
	Intact     bool    `json:"intact"`
	Error      string  `json:"error"`
	Final      bool    `json:"final"`
	Connected  bool    `json:"connected"`
	Conns      int     `json:"conns"`
	DialErrors int     `json:"dial_errors"`
	Corrupt    bool    `json:"corrupt"`
	Broken     int     `json:"broken"`
}

// finalResult waits for the client pod to finish and returns its final
// line, failing the test unless every byte came back intact.
func (h *harness) finalResult(p *corev1.Pod, container string, timeout time.Duration) connResult {
	h.t.Helper()
	return h.finalResultBroken(p, container, timeout, false)
}

// finalResultBroken is finalResult for a client whose server is killed
// on purpose (allowBroken): connections that ended in an error are
// allowed, a byte read that differs from the byte sent never is.
func (h *harness) finalResultBroken(p *corev1.Pod, container string, timeout time.Duration, allowBroken bool) connResult {
	h.t.Helper()
	p = h.waitPod(p.Namespace, p.Name, func(p *corev1.Pod) bool {
		for _, c := range p.Status.ContainerStatuses {
			if c.Name == container && c.State.Terminated != nil {
				return true
			}
		}
		return false
	}, timeout)
	rs, err := h.clientResults(p, container)
	if err != nil {
		h.t.Fatal(err)
	}
	for _, r := range rs {
		if r.Final {
			if allowBroken {
				if r.Corrupt || r.Conns <= r.Broken {
					h.t.Errorf("%s/%s: %d connections, %d broken, corrupt=%v", p.Namespace, p.Name, r.Conns, r.Broken, r.Corrupt)
				}
				return r
			}
			if !r.Intact || r.Sent == 0 {
				h.t.Errorf("%s/%s: bytes not intact: sent %d (sha256 %s), received %d (sha256 %s), %d connections",
					p.Namespace, p.Name, r.Sent, r.SentSHA, r.Received, r.RecvSHA, r.Conns)
			}
			return r
		}
	}
	h.t.Fatalf("%s/%s: no final line among %d", p.Namespace, p.Name, len(rs))
	return connResult{}
}

// cgroupStats is the part of `sockbypass status --json` the test reads.
type cgroupStats struct {
	Cgroup               string `json:"cgroup"`
	Path                 string `json:"path"`
	ID                   uint64 `json:"id"`
	Mode                 string `json:"mode"`
	LiveSockets          int64  `json:"live_sockets"`
	RedirectedBytes      int64  `json:"redirected_bytes"`
	RedirectedCrossNetns int64  `json:"redirected_cross_netns_bytes"`
	StackEgressBytes     int64  `json:"stack_egress_bytes"`
	MeshPaired           int64  `json:"mesh_paired"`
	MeshIntercepted      int64  `json:"mesh_intercepted"`
	MeshOrigDstAnswers   int64  `json:"mesh_orig_dst_answers"`
	SocketsInserted      int64  `json:"sockets_inserted"`
}

type statusDoc struct {
	Installed   bool          `json:"installed"`
	LiveSockets int64         `json:"live_sockets"`
	Cgroups     []cgroupStats `json:"cgroups"`
	Disabled    []cgroupStats `json:"disabled_cgroups"`
}

// status runs the host's sockbypass binary (the one in the image) in the
// node's mount namespace, where the DaemonSet pod pinned everything.
func (h *harness) status() (*statusDoc, error) {
	out, err := h.node.InMountNS(h.ctx, h.sockbypassBin(), "status", "--json")
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return nil, fmt.Errorf("sockbypass status: %v: %s", err, ee.Stderr)
		}
		return nil, err
	}
	var doc statusDoc
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("sockbypass status --json: %v: %s", err, out)
	}
	return &doc, nil
}

func (h *harness) sockbypassBin() string {
	return filepath.Join(h.bin, "sockbypass")
}

// cgroupOf returns the status entry of the pod's cgroup, if enabled.
func (doc *statusDoc) cgroupOf(uid types.UID) (cgroupStats, bool) {
	for _, c := range doc.Cgroups {
		if uidInPath(c.Path, uid) {
			return c, true
		}
	}
	return cgroupStats{}, false
}

func (h *harness) readyz() error {
	return cluster.Healthz(fmt.Sprintf("http://127.0.0.1:%d/readyz", h.metricsPort))
}
