package node

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/sockbypass/sockbypass/e2e/node/ociimage"
)

// create submits the pod and returns it as the API server stored it. An
// error the API server may answer under load (a timeout, a refused
// connection, an internal error) is retried for up to 30 s and said in
// the report; a pod a timed-out request did store is taken as created.
func (h *harness) create(p *corev1.Pod) *corev1.Pod {
	h.t.Helper()
	pods := h.node.Admin.CoreV1().Pods(p.Namespace)
	deadline := time.Now().Add(scaled(30 * time.Second))
	for try := 1; ; try++ {
		got, err := pods.Create(h.ctx, p, metav1.CreateOptions{})
		if err == nil {
			return got
		}
		if try > 1 && apierrors.IsAlreadyExists(err) {
			if got, gerr := pods.Get(h.ctx, p.Name, metav1.GetOptions{}); gerr == nil {
				return got
			}
		}
		if apierrors.IsInvalid(err) || apierrors.IsAlreadyExists(err) || time.Now().After(deadline) || h.ctx.Err() != nil {
			h.t.Fatalf("create pod %s/%s (try %d): %v", p.Namespace, p.Name, try, err)
		}
		h.rep.add("create pod %s/%s: try %d failed (%v), trying again in 1s", p.Namespace, p.Name, try, err)
		time.Sleep(time.Second)
	}
}

func (h *harness) deletePod(ns, name string, grace int64) {
	h.t.Helper()
	if err := h.node.Admin.CoreV1().Pods(ns).Delete(h.ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		h.t.Fatalf("delete pod %s/%s: %v", ns, name, err)
	}
}

func running(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning }

// churn is (4): pods created and deleted while traffic flows.
func (h *harness) churn(serverA *corev1.Pod) {
	t := h.t
	s := h.newSampler()
	defer s.close()
	target := serverA.Status.PodIP + ":8080"
	long := h.create(client(accelNS, "client-long", target, "-conn-time", "1s", "-duration", secs(25)))
	s.watch(long)
	if _, err := s.waitRedirected(long.UID, 20*time.Second); err != nil {
		t.Fatal(err)
	}

	// A new pod, while client-long's traffic flows.
	t0 := time.Now()
	fresh := h.create(client(accelNS, "client-new", target, "-conn-time", "1s", "-duration", secs(10)))
	s.watch(fresh)
	fresh = h.waitPod(accelNS, fresh.Name, running, 60*time.Second)
	tRunning := time.Now()
	tRed, err := s.waitRedirected(fresh.UID, 20*time.Second)
	if err != nil {
		t.Error(err)
	} else {
		first, _, _, _ := s.get(fresh.UID)
		h.rep.add("(4) new pod accel/client-new (while accel/client-long streams): Running %v after creation; its cgroup seen enabled %v and its first redirected bytes seen %v after creation (status polled every 500 ms)",
			tRunning.Sub(t0).Round(time.Millisecond), first.Sub(t0).Round(time.Millisecond), tRed.Sub(t0).Round(time.Millisecond))
		if tRed.Sub(tRunning) > scaled(10*time.Second) {
			t.Errorf("client-new accelerated only %v after it ran", tRed.Sub(tRunning))
		}
	}

	// A pod deleted while traffic flows: its cgroup is disabled.
	serverB := h.createPod(server(accelNS, "server-b", false))
	s.watch(serverB)
	cg := h.podCgroup(serverB)
	if err := waitFor(h, 20*time.Second, func() error {
		if f, _, _, _ := s.get(serverB.UID); f.IsZero() {
			return fmt.Errorf("accel/server-b not enabled")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	h.deletePod(accelNS, "server-b", 1)
	var disabledAfter time.Duration
	if err := waitFor(h, 30*time.Second, func() error {
		doc, err := h.status()
		if err != nil {
			return err
		}
		if _, ok := doc.cgroupOf(serverB.UID); ok {
			return fmt.Errorf("accel/server-b's cgroup still enabled after its deletion")
		}
		disabledAfter = time.Since(t1)
		return nil
	}); err != nil {
		t.Error(err)
	}
	// The kubelet removes the pod cgroup once the pod is gone; on this
	// hybrid host the v2 directory is runc's, removed with its container.
	removed := waitFor(h, 20*time.Second, func() error {
		if _, err := os.Stat(cg); err == nil {
			return fmt.Errorf("%s still there", cg)
		}
		return nil
	})
	removedText := fmt.Sprintf("removed %v after the delete", time.Since(t1).Round(time.Millisecond))
	if removed != nil {
		removedText = removed.Error()
	}
	h.rep.add("(4) deleted pod accel/server-b: its cgroup no longer enabled %v after the delete; its cgroup2 directory %s",
		disabledAfter.Round(time.Millisecond), removedText)
	if doc, err := h.status(); err == nil {
		for _, c := range doc.Disabled {
			if uidInPath(c.Path, serverB.UID) {
				h.rep.add("(4)   accel/server-b listed as disabled with %d live sockets (connections still open)", c.LiveSockets)
			}
		}
	}
	h.containerRestart(s)
	for _, p := range []*corev1.Pod{long, fresh} {
		r := h.finalResult(p, "client", 60*time.Second)
		_, _, m, _ := s.get(p.UID)
		h.rep.add("(4)   %s/%s: %d connections, %d B each way, intact=%v, redirected %d B", p.Namespace, p.Name, r.Conns, r.Sent, r.Intact, m.RedirectedBytes)
	}
}

// containerRestart kills a server container's process (SIGKILL by PID,
// found in its container cgroup): the kubelet starts it again in the same
// pod cgroup, whose new connections are accelerated again; no byte of the
// client's connections is ever wrong.
func (h *harness) containerRestart(s *sampler) {
	t := h.t
	serverR := h.createPod(server(accelNS, "server-r", false))
	s.watch(serverR)
	clientR := h.create(client(accelNS, "client-r", serverR.Status.PodIP+":8080", "-conn-time", "1s", "-duration", secs(15)))
	s.watch(clientR)
	if _, err := s.waitRedirected(serverR.UID, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	pid := 0
	entries, _ := os.ReadDir(h.podCgroup(serverR))
	for _, e := range entries {
		data, _ := os.ReadFile(filepath.Join(h.podCgroup(serverR), e.Name(), "cgroup.procs"))
		for _, f := range strings.Fields(string(data)) {
			cmdline, _ := os.ReadFile("/proc/" + f + "/cmdline")
			if strings.Contains(string(cmdline), "server") {
				fmt.Sscan(f, &pid)
			}
		}
	}
	if pid == 0 {
		t.Fatalf("no server process in %s", h.podCgroup(serverR))
	}
	t0 := time.Now()
	if err := syscallKill(pid); err != nil {
		t.Fatal(err)
	}
	restarted := h.waitPod(accelNS, "server-r", func(p *corev1.Pod) bool {
		return len(p.Status.ContainerStatuses) == 1 && p.Status.ContainerStatuses[0].RestartCount > 0 && p.Status.ContainerStatuses[0].State.Running != nil
	}, 60*time.Second)
	tRunning := time.Since(t0)
	_, _, before, _ := s.get(serverR.UID)
	growErr := s.waitGrowth(serverR.UID, before.RedirectedBytes, 20*time.Second)
	tGrown := time.Since(t0)
	r := h.finalResultBroken(clientR, "client", 60*time.Second, true)
	h.rep.add("(4) accel/server-r's container killed (pid %d): running again (restart %d) %v later in the same pod cgroup, redirecting again %v after the kill; client-r: %d connections, %d broken by the kill, corrupt=%v",
		pid, restarted.Status.ContainerStatuses[0].RestartCount, tRunning.Round(time.Millisecond), tGrown.Round(time.Millisecond), r.Conns, r.Broken, r.Corrupt)
	if growErr != nil {
		t.Errorf("server-r not accelerated after its container restarted: %v", growErr)
	}
	h.deletePod(accelNS, "server-r", 1)
}

func (h *harness) daemonPod() *corev1.Pod {
	h.t.Helper()
	pods, err := h.node.Admin.CoreV1().Pods(systemNS).List(h.ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=sockbypass"})
	if err != nil {
		h.t.Fatal(err)
	}
	for i := range pods.Items {
		if pods.Items[i].DeletionTimestamp == nil {
			return &pods.Items[i]
		}
	}
	return nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// waitNewDaemonPod waits for a Ready DaemonSet pod other than old.
func (h *harness) waitNewDaemonPod(old *corev1.Pod, timeout time.Duration) *corev1.Pod {
	h.t.Helper()
	var got *corev1.Pod
	if err := waitFor(h, timeout, func() error {
		p := h.daemonPod()
		if p == nil || p.UID == old.UID {
			return fmt.Errorf("no new DaemonSet pod yet")
		}
		if !podReady(p) {
			return fmt.Errorf("new DaemonSet pod %s: %s", p.Name, podStatus(p))
		}
		got = p
		return nil
	}); err != nil {
		h.t.Fatalf("%v\n%s", err, h.daemonPodStatus())
	}
	return got
}

// restart is (5): the DaemonSet pod deleted, then rolled to a new image,
// under a live connection.
func (h *harness) restart(serverA *corev1.Pod) {
	t := h.t
	s := h.newSampler()
	defer s.close()
	target := serverA.Status.PodIP + ":8080"
	// One connection for the whole run (-conn-time 0).
	live := h.create(client(accelNS, "client-live", target, "-conn-time", "0", "-duration", secs(45)))
	s.watch(live)
	if _, err := s.waitRedirected(live.UID, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	grows := func(what string) {
		t0 := time.Now()
		_, _, before, _ := s.get(live.UID)
		err := s.waitGrowth(live.UID, before.RedirectedBytes, 20*time.Second)
		_, _, after, _ := s.get(live.UID)
		h.rep.add("(5)   %s: accel/client-live's live connection redirected %d more B within %v", what, after.RedirectedBytes-before.RedirectedBytes, time.Since(t0).Round(time.Millisecond))
		if err != nil {
			t.Errorf("%s: the live connection is no longer redirected: %v", what, err)
		}
	}

	old := h.daemonPod()
	t0 := time.Now()
	h.deletePod(systemNS, old.Name, 15)
	fresh := h.waitNewDaemonPod(old, 90*time.Second)
	h.rep.add("(5) DaemonSet pod %s deleted: %s Ready %v later", old.Name, fresh.Name, time.Since(t0).Round(time.Millisecond))
	grows("after the restart")

	// A rolling update to a new image: the same binary under another tag.
	im := ociimage.Image{Name: sockbypassRepo + ":" + sockbypassTag + "-2", Files: []ociimage.File{{Path: "/sockbypass", Source: h.sockbypassBin(), Mode: 0o755}},
		Entrypoint: []string{"/sockbypass", "daemon", "--config", "/etc/sockbypass/config.yaml"}}
	tarball := filepath.Join(h.t.TempDir(), "sockbypass-2.tar")
	if _, err := im.WriteFile(tarball); err != nil {
		t.Fatal(err)
	}
	if err := h.node.Ctr(h.ctx, nil, "images", "import", tarball); err != nil {
		t.Fatal(err)
	}
	ch, err := loader.Load(filepath.Join(repoRoot(t), "deploy", "helm", "sockbypass"))
	if err != nil {
		t.Fatal(err)
	}
	up := action.NewUpgrade(h.helmConfig())
	up.Namespace, up.Wait, up.Timeout = systemNS, true, scaled(3*time.Minute)
	up.PostRenderer = h.postRenderer()
	vals := h.values(false)
	vals["image"].(map[string]any)["tag"] = sockbypassTag + "-2"
	t1 := time.Now()
	rel, err := up.RunWithContext(h.ctx, "sockbypass", ch, vals)
	if err != nil {
		t.Fatalf("helm upgrade: %v\n%s", err, h.daemonPodStatus())
	}
	rolled := h.waitNewDaemonPod(fresh, 90*time.Second)
	h.rep.add("(5) helm upgrade to image tag %s-2 (release v%d): %s Ready %v later", sockbypassTag, rel.Version, rolled.Name, time.Since(t1).Round(time.Millisecond))
	grows("after the rolling update")
	r := h.finalResult(live, "client", 90*time.Second)
	_, _, m, _ := s.get(live.UID)
	h.rep.add("(5)   accel/client-live: %d connection(s), %d B each way through both restarts, intact=%v (sha256 %s…), redirected %d B",
		r.Conns, r.Sent, r.Intact, r.SentSHA[:min(12, len(r.SentSHA))], m.RedirectedBytes)
	if r.Conns != 1 {
		t.Errorf("client-live made %d connections, want 1 (the connection broke)", r.Conns)
	}
}

// noLeaks checks, once every client has finished, that the node is back
// to its one selected running pod: only accel/server-a's cgroup enabled,
// no cgroup left disabled with live sockets, no socket in the sockhash.
func (h *harness) noLeaks(serverA *corev1.Pod) {
	var last string
	err := waitFor(h, 20*time.Second, func() error {
		doc, err := h.status()
		if err != nil {
			return err
		}
		var enabled []string
		for _, c := range doc.Cgroups {
			enabled = append(enabled, c.Cgroup)
		}
		last = fmt.Sprintf("enabled %v, %d disabled with live sockets, %d live sockets", enabled, len(doc.Disabled), doc.LiveSockets)
		if _, ok := doc.cgroupOf(serverA.UID); !ok || len(doc.Cgroups) != 1 || len(doc.Disabled) != 0 || doc.LiveSockets != 0 {
			return fmt.Errorf("after every client finished: %s", last)
		}
		return nil
	})
	if err != nil {
		h.t.Error(err)
		return
	}
	h.rep.add("(4) every client finished: only accel/server-a's cgroup enabled, none left disabled, 0 sockets in the sockhash (%s)", last)
}

// readiness is (6): a selected pod that cannot be enabled makes the
// DaemonSet pod not Ready and gets an Event; its deletion makes it Ready
// again.
func (h *harness) readiness() {
	t := h.t
	bad := server(accelNS, "bad-sidecar", false)
	bad.Annotations = map[string]string{"sockbypass.io/sidecar": "bogus"}
	t0 := time.Now()
	bad = h.createPod(bad)
	var notReady time.Duration
	if err := waitFor(h, 30*time.Second, func() error {
		if err := h.readyz(); err == nil {
			return fmt.Errorf("/readyz still 200")
		}
		notReady = time.Since(t0)
		return nil
	}); err != nil {
		t.Error(err)
	}
	var event *corev1.Event
	if err := waitFor(h, 30*time.Second, func() error {
		evs, err := h.node.Admin.CoreV1().Events(accelNS).List(h.ctx, metav1.ListOptions{
			FieldSelector: fields.Set{"involvedObject.name": bad.Name, "reason": "SockbypassBadSidecar"}.String()})
		if err != nil {
			return err
		}
		if len(evs.Items) == 0 {
			return fmt.Errorf("no SockbypassBadSidecar Event on accel/bad-sidecar")
		}
		event = &evs.Items[0]
		return nil
	}); err != nil {
		t.Error(err)
	}
	var dsNotReady time.Duration
	if err := waitFor(h, 40*time.Second, func() error {
		p := h.daemonPod()
		if p != nil && podReady(p) {
			return fmt.Errorf("DaemonSet pod still Ready")
		}
		dsNotReady = time.Since(t0)
		return nil
	}); err != nil {
		t.Error(err)
	}
	if event != nil {
		h.rep.add("(6) pod accel/bad-sidecar (sockbypass.io/sidecar: bogus): /readyz 503 after %v, DaemonSet pod not Ready after %v, Event %s %s: %s",
			notReady.Round(time.Millisecond), dsNotReady.Round(time.Millisecond), event.Type, event.Reason, event.Message)
	}
	t1 := time.Now()
	h.deletePod(accelNS, bad.Name, 1)
	if err := waitFor(h, 60*time.Second, func() error {
		p := h.daemonPod()
		if p == nil || !podReady(p) {
			return fmt.Errorf("DaemonSet pod not Ready again")
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	h.rep.add("(6) bad pod deleted: DaemonSet pod Ready again %v later", time.Since(t1).Round(time.Millisecond))
}

// uninstall is (7): helm uninstall keeps acceleration in place by
// default; with cleanupOnUninstall it leaves nothing pinned.
func (h *harness) uninstall(serverA *corev1.Pod) {
	t := h.t
	h.helmUninstall()
	doc, err := h.status()
	if err != nil {
		t.Errorf("after helm uninstall (cleanupOnUninstall=false): %v", err)
	} else {
		_, ok := doc.cgroupOf(serverA.UID)
		h.rep.add("(7) after helm uninstall (default): installed=%v, %d cgroups still enabled (accel/server-a among them: %v)", doc.Installed, len(doc.Cgroups), ok)
		if !ok {
			t.Errorf("helm uninstall without cleanupOnUninstall removed acceleration")
		}
	}
	h.helmInstall(true)
	h.helmUninstall()
	out, err := h.node.InMountNS(h.ctx, "sh", "-c", "ls -A /sys/fs/bpf; ls -A /sys/fs/bpf/sockbypass 2>/dev/null | wc -l")
	doc, serr := h.status()
	installed := serr == nil && doc.Installed
	h.rep.add("(7) after helm uninstall (cleanupOnUninstall=true): installed=%v (status error: %v); node bpffs: %q", installed, serr, string(out))
	if err != nil || installed {
		t.Errorf("helm uninstall with cleanupOnUninstall left sockbypass installed (%v)", err)
	}
}

func syscallKill(pid int) error { return syscall.Kill(pid, syscall.SIGKILL) }
