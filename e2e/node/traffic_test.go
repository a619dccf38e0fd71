package node

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sockbypass/sockbypass/e2e/node/cluster"
)

// waitFor is cluster.WaitFor with the timeout scaled (timeScale).
func waitFor(h *harness, timeout time.Duration, f func() error) error {
	return cluster.WaitFor(h.ctx, scaled(timeout), f)
}

// containerLog returns the end of a container's log (CRI format).
func (h *harness) containerLog(p *corev1.Pod, container string, max int) (string, error) {
	files, _ := filepath.Glob(filepath.Join(h.node.PodLogsDir(), fmt.Sprintf("%s_%s_%s", p.Namespace, p.Name, p.UID), container, "*.log"))
	if len(files) == 0 {
		return "", fmt.Errorf("no log for %s/%s %s", p.Namespace, p.Name, container)
	}
	sort.Strings(files)
	data, err := os.ReadFile(files[len(files)-1])
	if len(data) > max {
		data = data[len(data)-max:]
	}
	return string(data), err
}

// sampler polls `sockbypass status --json` every 500 ms and keeps, per
// pod UID, when its cgroup was first seen enabled and the most it
// redirected.
type sampler struct {
	h    *harness
	stop chan struct{}
	done chan struct{}

	mu       sync.Mutex
	pods     map[types.UID]string // uid -> ns/name
	first    map[types.UID]time.Time
	lastSeen map[types.UID]time.Time
	max      map[types.UID]cgroupStats
	touched  map[types.UID]bool // in cgroups or disabled_cgroups
	errs     int
	lastErr  error
}

func (h *harness) newSampler() *sampler {
	s := &sampler{h: h, stop: make(chan struct{}), done: make(chan struct{}),
		pods: map[types.UID]string{}, first: map[types.UID]time.Time{}, lastSeen: map[types.UID]time.Time{},
		max: map[types.UID]cgroupStats{}, touched: map[types.UID]bool{}}
	go s.loop()
	return s
}

func (s *sampler) watch(p *corev1.Pod) {
	s.mu.Lock()
	s.pods[p.UID] = p.Namespace + "/" + p.Name
	s.mu.Unlock()
}

func (s *sampler) loop() {
	defer close(s.done)
	for {
		doc, err := s.h.status()
		now := time.Now()
		s.mu.Lock()
		if err != nil {
			s.errs++
			s.lastErr = err
		} else {
			for uid := range s.pods {
				if c, ok := doc.cgroupOf(uid); ok {
					if _, seen := s.first[uid]; !seen {
						s.first[uid] = now
					}
					s.lastSeen[uid] = now
					s.touched[uid] = true
					m := s.max[uid]
					if c.RedirectedBytes > m.RedirectedBytes {
						m.RedirectedBytes = c.RedirectedBytes
					}
					if c.RedirectedCrossNetns > m.RedirectedCrossNetns {
						m.RedirectedCrossNetns = c.RedirectedCrossNetns
					}
					if c.MeshIntercepted > m.MeshIntercepted {
						m.MeshIntercepted = c.MeshIntercepted
					}
					if c.MeshOrigDstAnswers > m.MeshOrigDstAnswers {
						m.MeshOrigDstAnswers = c.MeshOrigDstAnswers
					}
					if c.MeshPaired > m.MeshPaired {
						m.MeshPaired = c.MeshPaired
					}
					m.Cgroup, m.Path, m.Mode, m.ID = c.Cgroup, c.Path, c.Mode, c.ID
					s.max[uid] = m
				}
				for _, c := range doc.Disabled {
					if uidInPath(c.Path, uid) {
						s.touched[uid] = true
					}
				}
			}
		}
		s.mu.Unlock()
		select {
		case <-s.stop:
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func (s *sampler) close() {
	close(s.stop)
	<-s.done
}

func (s *sampler) get(uid types.UID) (first time.Time, lastSeen time.Time, max cgroupStats, touched bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.first[uid], s.lastSeen[uid], s.max[uid], s.touched[uid]
}

// waitRedirected waits until the pod's cgroup has redirected bytes, and
// returns when it was seen so.
func (s *sampler) waitRedirected(uid types.UID, timeout time.Duration) (time.Time, error) {
	if err := s.waitAbove(uid, 0, scaled(timeout)); err != nil {
		return time.Time{}, fmt.Errorf("no redirected bytes for %w", err)
	}
	return time.Now(), nil
}

// waitGrowth waits until the pod's cgroup has redirected more than from
// bytes.
func (s *sampler) waitGrowth(uid types.UID, from int64, timeout time.Duration) error {
	if err := s.waitAbove(uid, from, scaled(timeout)); err != nil {
		return fmt.Errorf("nothing more than %d B redirected by %w", from, err)
	}
	return nil
}

// waitAbove polls until the pod's cgroup has redirected more than from
// bytes; its error names the pod, the timeout and the sampler's errors.
func (s *sampler) waitAbove(uid types.UID, from int64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		m := s.max[uid]
		s.mu.Unlock()
		if m.RedirectedBytes > from {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Errorf("%s within %v (status errors %d, last %v)", s.pods[uid], timeout, s.errs, s.lastErr)
}

func sidecarPod(ns, name, target string, duration string) *corev1.Pod {
	always := corev1.ContainerRestartPolicyAlways
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeName:                      nodeName,
			RestartPolicy:                 corev1.RestartPolicyNever,
			AutomountServiceAccountToken:  new(false),
			TerminationGracePeriodSeconds: new(int64(5)),
			// A native sidecar named as Istio's: sockbypass puts the pod
			// in sidecar mode (intercept: connect4 to 127.0.0.1:15001).
			InitContainers: []corev1.Container{{
				Name: "istio-proxy", Image: appImage, ImagePullPolicy: corev1.PullNever,
				Args:            []string{"sidecar", "-port", "15001"},
				RestartPolicy:   &always,
				SecurityContext: &corev1.SecurityContext{RunAsUser: new(int64(1337)), RunAsGroup: new(int64(1337))},
			}},
			Containers: []corev1.Container{{
				Name: "app", Image: appImage, ImagePullPolicy: corev1.PullNever,
				Args: []string{"client", "-target", target, "-conn-time", "2s", "-duration", duration},
			}},
		},
	}
}

// traffic is (3): who is accelerated and who is not, every byte intact.
func (h *harness) traffic(serverA *corev1.Pod) {
	t := h.t
	s := h.newSampler()
	defer s.close()
	s.watch(serverA)
	// The server pod was running before the install: enabled at start.
	if err := waitFor(h, 20*time.Second, func() error {
		if f, _, _, _ := s.get(serverA.UID); f.IsZero() {
			return fmt.Errorf("accel/server-a's cgroup not enabled")
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, h.daemonPodStatus())
	}
	h.rep.add("(3) accel/server-a (running before the install) enabled by the DaemonSet pod")

	serverP := h.createPod(server(plainNS, "server-p", false))
	serverK := server("kube-system", "server-k", false)
	serverK.Annotations = map[string]string{"sockbypass.io/accelerate": "true"}
	serverK = h.createPod(serverK)
	s.watch(serverP)
	s.watch(serverK)
	target := func(p *corev1.Pod) string { return p.Status.PodIP + ":8080" }

	dur := secs(12)
	clientA := client(accelNS, "client-a", target(serverA), "-conn-time", "2s", "-duration", dur)
	clientP := client(plainNS, "client-p", target(serverP), "-conn-time", "2s", "-duration", dur)
	clientK := client("kube-system", "client-k", target(serverK), "-conn-time", "2s", "-duration", dur)
	clientK.Annotations = map[string]string{"sockbypass.io/accelerate": "true"}
	clientAnn := client(plainNS, "client-annotated", target(serverA), "-conn-time", "2s", "-duration", dur)
	clientAnn.Annotations = map[string]string{"sockbypass.io/accelerate": "true"}
	mesh := sidecarPod(accelNS, "app-sidecar", target(serverA), dur)
	t0 := time.Now()
	var pods []*corev1.Pod
	for _, p := range []*corev1.Pod{clientA, clientP, clientK, clientAnn, mesh} {
		h.create(p)
	}
	for _, p := range []*corev1.Pod{clientA, clientP, clientK, clientAnn, mesh} {
		got := h.waitPod(p.Namespace, p.Name, func(p *corev1.Pod) bool { return p.UID != "" }, 10*time.Second)
		s.watch(got)
		pods = append(pods, got)
	}
	// While they stream: stats and conns as the operator sees them.
	time.Sleep(time.Until(t0.Add(scaled(7 * time.Second))))
	h.statsOutput()
	results := map[string]connResult{}
	for _, p := range pods {
		c := "client"
		if p.Name == "app-sidecar" {
			c = "app"
		}
		results[p.Name] = h.finalResult(p, c, 90*time.Second)
	}
	h.rep.add("(3) 5 client pods ran %s each, all finished %v after creation", dur, time.Since(t0).Round(time.Millisecond))
	time.Sleep(time.Second)

	check := func(p *corev1.Pod, wantAccel bool, what string) {
		first, _, m, touched := s.get(p.UID)
		r := results[p.Name]
		name := p.Namespace + "/" + p.Name
		switch {
		case wantAccel && m.RedirectedBytes == 0:
			t.Errorf("%s (%s): not accelerated (enabled: %v, redirected %d)", name, what, !first.IsZero(), m.RedirectedBytes)
		case !wantAccel && touched:
			t.Errorf("%s (%s): touched by sockbypass (its cgroup was enabled: %s, redirected %d)", name, what, m.Cgroup, m.RedirectedBytes)
		}
		extra := ""
		if m.MeshIntercepted > 0 || m.MeshOrigDstAnswers > 0 || m.MeshPaired > 0 {
			extra = fmt.Sprintf(", mesh: %d intercepted, %d SO_ORIGINAL_DST answers, %d paired", m.MeshIntercepted, m.MeshOrigDstAnswers, m.MeshPaired)
		}
		if r.Sent > 0 {
			extra += fmt.Sprintf("; client sent %d B over %d conns, intact=%v (sha256 %s…)", r.Sent, r.Conns, r.Intact, r.SentSHA[:12])
		}
		h.rep.add("(3)   %-28s %-40s redirected %10d B (cross-netns %d)%s", name, what, m.RedirectedBytes, m.RedirectedCrossNetns, extra)
	}
	check(serverA, true, "labelled namespace, server")
	check(pods[0], true, "labelled namespace, client")
	check(pods[3], true, "annotated pod in unlabelled namespace")
	check(pods[4], true, "app + native istio-proxy sidecar")
	check(serverP, false, "unlabelled namespace, server")
	check(pods[1], false, "unlabelled namespace, client")
	check(serverK, false, "kube-system, annotated server")
	check(pods[2], false, "kube-system, annotated client")
	// The cgroups sockbypass found and enabled for the selected pods:
	// each must be the kubelet's pod cgroup, as its driver names it.
	h.rep.add("(3) pod cgroups sockbypass enabled (status --json), each the kubelet's %s-driver pod cgroup:", cgroupDriver())
	for _, p := range []*corev1.Pod{serverA, pods[0], pods[3], pods[4]} {
		_, _, m, _ := s.get(p.UID)
		want := h.podCgroup(p)
		h.rep.add("(3)   %-28s %-10s %s (cgroup id %d)", p.Namespace+"/"+p.Name, m.Mode, m.Path, m.ID)
		if m.Path != want {
			t.Errorf("%s/%s: sockbypass enabled %q, the kubelet's pod cgroup is %q", p.Namespace, p.Name, m.Path, want)
		}
	}
	// The app connected to server-a's pod IP; only sockbypass's
	// connect4 (intercept mode: no iptables in this pod) can have taken
	// it to the sidecar, which relays after SO_ORIGINAL_DST.
	log, err := h.containerLog(pods[4], "istio-proxy", 1<<20)
	relays := strings.Count(log, `"relay":"`+target(serverA)+`","from":"127.0.0.1:`)
	_, _, m, _ := s.get(pods[4].UID)
	h.rep.add("(3)   accel/app-sidecar: the sidecar relayed %d intercepted connections to %s after SO_ORIGINAL_DST; app<->sidecar redirected %d B (the pod's redirected minus cross-netns); mesh counters: intercepted %d, SO_ORIGINAL_DST answers %d, paired %d",
		relays, target(serverA), m.RedirectedBytes-m.RedirectedCrossNetns, m.MeshIntercepted, m.MeshOrigDstAnswers, m.MeshPaired)
	if err != nil || relays == 0 || relays != results["app-sidecar"].Conns {
		t.Errorf("app-sidecar: %d of the app's %d connections went through the sidecar (%v)", relays, results["app-sidecar"].Conns, err)
	}
	// What the operator sees of it (status --json, the figures the
	// metrics serve too): every relayed connection was intercepted and
	// answered.
	if m.MeshIntercepted < int64(relays) || m.MeshOrigDstAnswers < int64(relays) {
		t.Errorf("app-sidecar: status --json shows %d connects intercepted and %d SO_ORIGINAL_DST answers; the sidecar relayed %d", m.MeshIntercepted, m.MeshOrigDstAnswers, relays)
	}
	if m.RedirectedBytes-m.RedirectedCrossNetns == 0 {
		t.Errorf("app-sidecar: nothing redirected between the app and its sidecar")
	}
	// What the daemon said about the pods it could not fully read (not a
	// failure here: reported for whoever reads the report).
	if dp := h.daemonPod(); dp != nil {
		if log, err := h.containerLog(dp, "sockbypass", 1<<22); err == nil {
			n, first := 0, ""
			for _, line := range strings.Split(log, "\n") {
				if strings.Contains(line, "cannot read the listeners") {
					if n++; first == "" {
						first = line
					}
				}
			}
			if n > 0 {
				h.rep.add("(3)   the DaemonSet pod logged %d times that it cannot read a pod's listeners, first: %s", n, first)
			}
		}
	}
	if out, err := h.node.InMountNS(h.ctx, h.sockbypassBin(), "stats", "--json"); err == nil {
		var doc statusDoc
		if json.Unmarshal(out, &doc) == nil {
			if c, ok := doc.cgroupOf(pods[4].UID); ok {
				h.rep.add("(3)   stats --json for accel/app-sidecar now: mesh intercepted %d, orig dst answers %d, paired %d", c.MeshIntercepted, c.MeshOrigDstAnswers, c.MeshPaired)
			}
		}
	}
}

// statsOutput prints `sockbypass stats` and `sockbypass conns --state
// paired` as the operator sees them on the node, with each pod UID in a
// cgroup path replaced by the pod's name.
func (h *harness) statsOutput() {
	pods, _ := h.node.Admin.CoreV1().Pods("").List(h.ctx, metav1.ListOptions{})
	name := func(out []byte) string {
		text := string(out)
		for _, p := range pods.Items {
			text = strings.ReplaceAll(text, "pod"+string(p.UID), "pod("+p.Namespace+"/"+p.Name+")")
			// The systemd driver's slice names the UID with underscores.
			text = strings.ReplaceAll(text, "pod"+strings.ReplaceAll(string(p.UID), "-", "_"), "pod("+p.Namespace+"/"+p.Name+")")
			text = strings.ReplaceAll(text, string(p.UID), p.Namespace+"/"+p.Name) // the POD column
		}
		return text
	}
	out, err := h.node.InMountNS(h.ctx, h.sockbypassBin(), "stats")
	if err != nil {
		h.t.Errorf("sockbypass stats: %v", err)
		return
	}
	h.rep.add("(3) sockbypass stats while the clients stream (pod UIDs named):\n%s", name(out))
	out, err = h.node.InMountNS(h.ctx, h.sockbypassBin(), "conns", "--state", "paired")
	if err != nil {
		h.t.Errorf("sockbypass conns: %v", err)
		return
	}
	lines := strings.Split(name(out), "\n")
	if len(lines) > 14 {
		lines = append(lines[:14], fmt.Sprintf("... (%d lines)", len(lines)))
	}
	h.rep.add("(3) sockbypass conns --state paired (first lines):\n%s", strings.Join(lines, "\n"))
}
