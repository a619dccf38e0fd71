package soak

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/netnsutil"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// env is the soak's world: a pinned dataplane of its own (a private pin
// directory on bpffs), its cgroups (all below one parent cgroup of its
// own), network namespaces and pods, the gate through which every socket
// is created, and what each port, cgroup and namespace is for, so that an
// entry left in a map can be put down to a workload. Everything it makes
// is removed when the test ends, failed or not.
type env struct {
	t      *testing.T
	cfg    config
	log    *zap.Logger
	dp     *dataplane.Dataplane
	mounts cgroup.Mounts
	// parent is the directory of the soak's parent cgroup.
	parent string
	gate   gate
	reg    registry
	// lo is the network namespace of the loopback workloads (127.0.0.1).
	lo *netns

	mu sync.Mutex
	// live holds what is still to be removed: pods, cgroups, namespaces
	// (by name), removed in reverse order of creation at the end.
	live  map[string]func() error
	order []string
	// namespaces are the soak's live network namespaces, by path.
	namespaces map[string]*netns
	started    time.Time
}

// gate serialises everything that depends on which cgroup this process is
// in. A socket belongs for its whole life to the cgroup its creator was in
// when it was created (and an accepted socket to its listener's), and
// moving the process applies to all of its threads: so sockets are created
// one at a time, with the process moved into the socket's cgroup and back.
// Enable and RefreshNodeAddrs scan the processes of enabled cgroups (their
// listeners, their namespaces' addresses) and must never find this process
// in one, so they run under the gate too, with the process at home.
type gate struct {
	mu   sync.Mutex
	home string
}

func writeProcs(dir string) error {
	return os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
}

// in runs fn with the process in the cgroup at dir and the calling
// thread in nsn (nil: this namespace), then moves the process home.
func (g *gate) in(dir string, nsn *netns, fn func() error) (err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := writeProcs(dir); err != nil {
		return fmt.Errorf("move this process into %s: %w", dir, err)
	}
	defer func() {
		if herr := writeProcs(g.home); herr != nil {
			err = errors.Join(err, fmt.Errorf("move this process back to %s: %w", g.home, herr))
		}
	}()
	if nsn == nil {
		return fn()
	}
	return nsn.ns.Do(func(ns.NetNS) error { return fn() })
}

// atHome runs fn under the gate with the process in its own cgroup.
func (g *gate) atHome(fn func() error) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return fn()
}

// registry says which workload each port, cgroup, namespace and address
// belongs to.
type registry struct {
	mu      sync.Mutex
	cgroups map[uint64]cgInfo
	netns   map[uint64]string // netns cookie -> kind
	nsIno   map[uint64]string // netns inode -> kind (TC registry keys)
	addrs   map[netip.Addr]string
	// next is each kind's next server port (see port).
	next map[string]int
	// notes say what a server address was for (its listener's variant,
	// its cgroup's mode and how it was removed).
	notes map[netip.AddrPort]string
	// nsNotes say the same of a network namespace (by cookie), for
	// entries keyed by addresses that several namespaces use.
	nsNotes map[uint64]string
}

type cgInfo struct {
	kind, name, path string
	// churned: created and removed while the load runs (its slot is
	// kept by design, see the report).
	churned bool
	// note: how it was enabled and removed.
	note string
	// passOK, when set, is why its members may send bytes through the
	// stack by design (their peer is gone, or they are leaving).
	passOK string
}

// Server ports: each kind has a range of its own below the ephemeral
// range (32768-60999), so that a port in a map's key names its kind.
const (
	portBase    = 20000
	portsOfKind = 900
)

func (r *registry) port(kind string) uint16 {
	r.mu.Lock()
	defer r.mu.Unlock()
	i := kindIndex(kind)
	n := r.next[kind]
	r.next[kind] = n + 1
	return uint16(portBase + i*portsOfKind + n%portsOfKind)
}

// kindOfPort returns the kind whose range holds port, or "".
func kindOfPort(port uint16) string {
	if port == meshSidecarPort || port == meshAppPort {
		return "mesh"
	}
	if port < portBase {
		return ""
	}
	i := (int(port) - portBase) / portsOfKind
	if i < len(allKinds) {
		return allKinds[i]
	}
	return ""
}

func (r *registry) addCgroup(id uint64, info cgInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cgroups[id] = info
}

func (r *registry) setCgroupNote(id uint64, note string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.cgroups[id]
	c.note = note
	r.cgroups[id] = c
}

func (r *registry) setPassOK(id uint64, why string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.cgroups[id]
	c.passOK = why
	r.cgroups[id] = c
}

func (r *registry) noteNetns(cookie uint64, note string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nsNotes[cookie] = note
}

func (r *registry) netnsNote(cookie uint64) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nsNotes[cookie]
}

func (r *registry) noteAddr(a netip.AddrPort, note string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.notes[a] = note
}

// noteOf returns the note of the first of addrs that has one.
func (r *registry) noteOf(addrs ...netip.AddrPort) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range addrs {
		if n, ok := r.notes[a]; ok {
			return n
		}
	}
	return ""
}

func (r *registry) cgroup(id uint64) (cgInfo, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c, ok := r.cgroups[id]
	return c, ok
}

func (r *registry) cgroupIDs() []uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ids []uint64
	for id := range r.cgroups {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids
}

func (r *registry) addNetns(n *netns, kind string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.netns[n.cookie] = kind
	r.nsIno[n.ino] = kind
}

func (r *registry) kindOfNetns(cookie uint64) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.netns[cookie]
}

func (r *registry) kindOfNsIno(ino uint64) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nsIno[ino]
}

func (r *registry) addAddr(a netip.Addr, kind string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.addrs[a] = kind
}

func (r *registry) kindOfAddr(a netip.Addr) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.addrs[a]
}

// newEnv installs the dataplane in a private pin directory and makes the
// parent cgroup and the loopback namespace. Every removal is registered
// with t.Cleanup.
func newEnv(t *testing.T, cfg config, log *zap.Logger) *env {
	t.Helper()
	testutil.RequirePrivileged(t)
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		t.Fatal(err)
	}
	if mounts.V2 == "" {
		t.Fatal(cgroup.ErrNoCgroup2)
	}
	home, err := selfCgroup(mounts)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, cfg: cfg, log: log, mounts: mounts, gate: gate{home: home}, live: map[string]func() error{}, namespaces: map[string]*netns{}, started: time.Now(),
		reg: registry{cgroups: map[uint64]cgInfo{}, netns: map[uint64]string{}, nsIno: map[uint64]string{}, addrs: map[netip.Addr]string{}, next: map[string]int{}, notes: map[netip.AddrPort]string{}, nsNotes: map[uint64]string{}}}

	pinDir := testutil.NewPinDir(t)
	dlog := log.Named("dataplane").WithOptions(zap.IncreaseLevel(zap.WarnLevel))
	dp, err := dataplane.OpenOrCreate(dataplane.Options{PinDir: pinDir, Logger: dlog})
	if err != nil {
		t.Fatal(err)
	}
	e.dp = dp
	t.Cleanup(func() {
		if d, err := dataplane.Open(dataplane.Options{PinDir: pinDir}); err == nil {
			if err := d.Uninstall(); err != nil {
				t.Errorf("uninstall %s: %v", pinDir, err)
			}
		}
		dp.Close()
	})

	e.parent = filepath.Join(mounts.V2, fmt.Sprintf("sockbypass-soak-%d-%x", os.Getpid(), rand.Uint32()))
	if err := os.Mkdir(e.parent, 0o755); err != nil {
		t.Fatal(err)
	}
	// Registered after the dataplane's, so it runs before it: pods,
	// namespaces and cgroups go, then the pins.
	t.Cleanup(func() {
		if err := e.removeAll(); err != nil {
			t.Errorf("remove what the soak made: %v", err)
		}
		if err := removeCgroupDir(e.parent); err != nil {
			t.Errorf("remove the soak's parent cgroup: %v", err)
		}
	})
	e.lo, err = e.newNetns("lo", "loopback")
	if err != nil {
		t.Fatal(err)
	}
	e.log.Info("soak environment", zap.String("pin_dir", pinDir), zap.String("parent_cgroup", e.parent),
		zap.String("loopback_netns", e.lo.ns.Path()), zap.String("home_cgroup", home))
	return e
}

func selfCgroup(m cgroup.Mounts) (string, error) {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rel, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(m.V2, rel), nil
		}
	}
	return "", errors.New("this process has no cgroup v2 membership in /proc/self/cgroup")
}

// track registers a removal under name; untrack runs it and forgets it.
func (e *env) track(name string, remove func() error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.live[name] = remove
	e.order = append(e.order, name)
}

func (e *env) untrack(name string) error {
	e.mu.Lock()
	remove, ok := e.live[name]
	delete(e.live, name)
	e.mu.Unlock()
	if !ok {
		return nil
	}
	return remove()
}

// removeAll removes what is still tracked, newest first.
func (e *env) removeAll() error {
	e.mu.Lock()
	order := append([]string(nil), e.order...)
	e.mu.Unlock()
	var errs error
	for i := len(order) - 1; i >= 0; i-- {
		errs = errors.Join(errs, e.untrack(order[i]))
	}
	return errs
}

// newCgroup makes a cgroup below the parent, named kind-name, and records
// it for kind.
func (e *env) newCgroup(kind, name string, churned bool) (cgroup.Cgroup, error) {
	dir := filepath.Join(e.parent, kind+"-"+name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return cgroup.Cgroup{}, fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	e.track("cgroup "+dir, func() error { return removeCgroupDir(dir) })
	cg, err := e.mounts.Resolve(dir)
	if err != nil {
		return cgroup.Cgroup{}, err
	}
	e.reg.addCgroup(cg.ID, cgInfo{kind: kind, name: name, path: dir, churned: churned})
	return cg, nil
}

// removeCgroup removes a cgroup that newCgroup made.
func (e *env) removeCgroup(cg cgroup.Cgroup) error {
	return e.untrack("cgroup " + cg.Path)
}

func removeCgroupDir(dir string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := os.Remove(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", dir, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var cgroupIDInError = regexp.MustCompile(`cgroup id (\d+)`)

// describe adds to an error that names a cgroup id which of the soak's
// cgroups it is, and whether its directory still exists.
func (e *env) describe(err error) error {
	if err == nil {
		return nil
	}
	m := cgroupIDInError.FindStringSubmatch(err.Error())
	if m == nil {
		return err
	}
	id, _ := strconv.ParseUint(m[1], 10, 64)
	info, ok := e.reg.cgroup(id)
	if !ok {
		return err
	}
	dir := "exists"
	if _, serr := os.Stat(info.path); serr != nil {
		dir = "is gone"
	}
	return fmt.Errorf("%w [cgroup id %d is %s %s (%s); its directory %s]", err, id, info.kind, info.name, info.note, dir)
}

// enable enables cg under the gate (Enable scans the cgroup's processes).
func (e *env) enable(cg cgroup.Cgroup, opts dataplane.EnableOptions) error {
	return e.gate.atHome(func() error {
		_, err := e.dp.Enable(cg, opts)
		return err
	})
}

// refreshNodeAddrs syncs node_addrs with the pods' namespaces, under the
// gate (it scans the processes of the enabled cgroups).
func (e *env) refreshNodeAddrs() error {
	return e.gate.atHome(func() error {
		_, err := e.dp.RefreshNodeAddrs()
		return err
	})
}

// rescan does what the daemon does at each rescan besides enabling and
// disabling its cgroups (internal/daemon, reconcile): it records the
// listeners of the enabled cgroups' processes, reaps the pair handshakes
// older than reapAge that no socket will remove, forgets the listeners and
// sidecar endpoints of cgroups that were disabled and removed, and syncs
// the node addresses. Under the gate: it scans the enabled cgroups'
// processes.
func (e *env) rescan(reapAge time.Duration) error {
	return e.gate.atHome(func() error {
		_, err1 := e.dp.RefreshListeners()
		_, err2 := e.dp.ReapPairs(reapAge)
		_, err3 := e.dp.ForgetRemovedCgroups()
		_, err4 := e.dp.RefreshNodeAddrs()
		return errors.Join(err1, err2, err3, err4)
	})
}

// rescanEvery runs rescan every interval until stop is closed, as the
// daemon does (rescanInterval, 2 s by default).
func (e *env) rescanEvery(interval, reapAge time.Duration, stop <-chan struct{}) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			if err := e.rescan(reapAge); err != nil {
				e.log.Warn("rescan", zap.Error(err))
			}
		}
	}()
	return done
}

// netns is a network namespace of the soak's.
type netns struct {
	ns     ns.NetNS
	cookie uint64 // SO_NETNS_COOKIE, as in the maps' keys
	ino    uint64 // inode, as in the TC registry
	name   string
}

func (e *env) newNetns(name, kind string) (*netns, error) {
	n, remove, err := netnsutil.New("sbsoak-" + name)
	if err != nil {
		return nil, err
	}
	nsn := &netns{ns: n, name: name}
	e.track("netns "+n.Path(), func() error {
		e.mu.Lock()
		delete(e.namespaces, n.Path())
		e.mu.Unlock()
		return remove()
	})
	err = n.Do(func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		nsn.cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netns cookie of %s: %w", n.Path(), err)
	}
	var st unix.Stat_t
	if err := unix.Stat(n.Path(), &st); err != nil {
		return nil, err
	}
	nsn.ino = st.Ino
	e.reg.addNetns(nsn, kind)
	e.mu.Lock()
	e.namespaces[n.Path()] = nsn
	e.mu.Unlock()
	return nsn, nil
}

// liveNamespaces returns the paths of the soak's live namespaces.
func (e *env) liveNamespaces() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var paths []string
	for p := range e.namespaces {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	return paths
}

func (e *env) removeNetns(n *netns) error {
	return e.untrack("netns " + n.ns.Path())
}

// pod is a network namespace with a cgroup and a process living in both,
// the way a Kubernetes pod looks to sockbypass.
type pod struct {
	name  string
	netns *netns
	cg    cgroup.Cgroup
	proc  *exec.Cmd
}

// newPod makes a pod for kind: namespace, cgroup, and a sleeping process
// in both (started by this test, ended by its pid).
func (e *env) newPod(kind, name string, churned bool) (*pod, error) {
	p := &pod{name: name}
	var err error
	if p.netns, err = e.newNetns(name, kind); err != nil {
		return nil, err
	}
	if p.cg, err = e.newCgroup(kind, name, churned); err != nil {
		return nil, err
	}
	cgDir, err := os.Open(p.cg.Path)
	if err != nil {
		return nil, err
	}
	defer cgDir.Close()
	p.proc = exec.Command("nsenter", "--net="+p.netns.ns.Path(), "sleep", "3600")
	p.proc.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgDir.Fd())}
	if err := p.proc.Start(); err != nil {
		return nil, fmt.Errorf("start the process of pod %s: %w", name, err)
	}
	proc := p.proc
	e.track("process of pod "+name, func() error {
		proc.Process.Kill()
		proc.Wait()
		return nil
	})
	// nsenter starts in the cgroup but in this namespace: wait until it
	// has entered the pod's.
	deadline := time.Now().Add(5 * time.Second)
	for {
		var want, got unix.Stat_t
		if unix.Stat(p.netns.ns.Path(), &want) == nil && unix.Stat(fmt.Sprintf("/proc/%d/ns/net", proc.Process.Pid), &got) == nil && want.Ino == got.Ino && want.Dev == got.Dev {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the process of pod %s did not enter its network namespace within 5 s", name)
		}
		time.Sleep(2 * time.Millisecond)
	}
	return p, nil
}

// delete ends the pod's process, removes its namespace and its cgroup
// (enabled or not: the caller decides whether it disables it first).
func (e *env) deletePod(p *pod) error {
	return errors.Join(e.untrack("process of pod "+p.name), e.removeNetns(p.netns), e.removeCgroup(p.cg))
}
