package node

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// nonRootUID is the uid the non-root pods run as.
const nonRootUID = 1000

// runAsNonRoot gives p the pod-level securityContext of most production
// pods: runAsUser/runAsGroup 1000, runAsNonRoot.
func runAsNonRoot(p *corev1.Pod) *corev1.Pod {
	p.Spec.SecurityContext = &corev1.PodSecurityContext{
		RunAsUser:    new(int64(nonRootUID)),
		RunAsGroup:   new(int64(nonRootUID)),
		RunAsNonRoot: new(true),
	}
	return p
}

// nonRoot is (3b): a server and a client pod that run as uid 1000
// (runAsUser, runAsNonRoot) in the accelerated namespace. The server
// listens with a socket that is blocking at listen() and made non-blocking
// after it (redis, Java NIO): sock_ops records such a listener as blocking
// (or not at all, when the pod's cgroup is enabled after it listened), so
// only the daemon's read of the uid-1000 process's listener in /proc
// (CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, hostPID: readPodListeners) can let
// its accepted sockets pair. Their connections must be redirected, every
// byte intact.
func (h *harness) nonRoot() {
	t := h.t
	s := h.newSampler()
	defer s.close()
	srv := server(accelNS, "server-nonroot", false)
	srv.Spec.Containers[0].Args = append(srv.Spec.Containers[0].Args, "-nonblock-after-listen")
	srv = h.createPod(runAsNonRoot(srv))
	s.watch(srv)
	uids := h.podUIDs(srv)
	if uids["server"] != strconv.Itoa(nonRootUID) {
		t.Errorf("accel/server-nonroot: the node sees its processes with uids %v, want the server's %d", uids, nonRootUID)
	}
	const dur = "10s"
	cl := client(accelNS, "client-nonroot", srv.Status.PodIP+":8080", "-conn-time", "2s", "-duration", dur)
	cl = h.createPod(runAsNonRoot(cl))
	s.watch(cl)
	r := h.finalResult(cl, "client", 90*time.Second)
	time.Sleep(time.Second) // a last sample
	_, _, ms, _ := s.get(srv.UID)
	_, _, mc, _ := s.get(cl.UID)
	warnings := h.listenerWarnings(srv)
	sha := r.SentSHA
	if len(sha) > 12 {
		sha = sha[:12]
	}
	h.rep.add("(3b) accel/server-nonroot + accel/client-nonroot (runAsUser %d, runAsNonRoot; processes seen with uids %v; the server's listener made non-blocking after listen()): server redirected %d B, client %d B (cross-netns %d); client sent %d B over %d conns in %s, intact=%v (sha256 %s…); the daemon logged %d 'cannot read the listeners' warnings for the server's pod",
		nonRootUID, uids, ms.RedirectedBytes, mc.RedirectedBytes, mc.RedirectedCrossNetns, r.Sent, r.Conns, dur, r.Intact, sha, warnings)
	if ms.RedirectedBytes == 0 || mc.RedirectedBytes == 0 {
		t.Errorf("non-root pods not accelerated: server redirected %d B, client %d B (the daemon logged %d warnings that it cannot read the server's listeners)",
			ms.RedirectedBytes, mc.RedirectedBytes, warnings)
	}
	// The later steps expect accel/server-a as the only running
	// selected pod.
	h.deletePod(accelNS, srv.Name, 1)
	h.deletePod(accelNS, cl.Name, 1)
}

// podUIDs returns the uid of each process in p's cgroup, as the node's
// /proc shows it (the Uid line's real uid), by its nodeapp role (its
// first argument: pause, server, ...).
func (h *harness) podUIDs(p *corev1.Pod) map[string]string {
	uids := map[string]string{}
	filepath.WalkDir(h.podCgroup(p), func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		data, _ := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		for _, pid := range strings.Fields(string(data)) {
			status, err := os.ReadFile("/proc/" + pid + "/status")
			if err != nil {
				continue
			}
			cmdline, _ := os.ReadFile("/proc/" + pid + "/cmdline")
			role := pid
			if args := strings.Split(string(cmdline), "\x00"); len(args) > 1 {
				role = args[1]
			}
			for _, line := range strings.Split(string(status), "\n") {
				if v, ok := strings.CutPrefix(line, "Uid:"); ok {
					if f := strings.Fields(v); len(f) > 0 {
						uids[role] = f[0]
					}
				}
			}
		}
		return nil
	})
	return uids
}

// listenerWarnings counts the DaemonSet pod's "cannot read the listeners"
// warnings that name p's cgroup.
func (h *harness) listenerWarnings(p *corev1.Pod) int {
	dp := h.daemonPod()
	if dp == nil {
		return 0
	}
	log, err := h.containerLog(dp, "sockbypass", 1<<22)
	if err != nil {
		h.t.Logf("daemon log: %v", err)
		return 0
	}
	n := 0
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, "cannot read the listeners") && strings.Contains(line, string(p.UID)) {
			if n++; n == 1 {
				h.t.Logf("%s", line)
			}
		}
	}
	return n
}
