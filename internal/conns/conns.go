// Package conns lists the TCP connections of the enabled cgroups and what
// sockbypass does with each (`sockbypass conns`): paired (every message
// redirected to the local peer, with the bytes this end redirected), or
// plain TCP and why.
//
// It joins three sources:
//
//   - the kernel's socket diagnostics (internal/sockdiag), in every network
//     namespace that the processes of the enabled cgroups use and in the
//     caller's own: each socket's addresses, cookie, inode, cgroup and its
//     sock_state storage, dumped with the pinned sock_state map;
//   - the pinned maps (internal/dataplane): sockhash membership, pair
//     handshakes, listeners, the cgroups' settings;
//   - /proc: the process that holds each socket (socket inode -> pid,
//     comm) and whether its file blocks (/proc/PID/fdinfo).
//
// The datapath keeps no reason per plain socket: the reason is derived
// from the flags in its storage, its peer (found by the mirrored 4-tuple),
// the listener's flags and the settings, in the order of Reasons. A socket
// that never got storage (a connection that was not offered a pair, or
// one made before its cgroup was enabled) is explained by what can still
// be seen of it.
package conns

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/internal/nodeaddrs"
	"github.com/sockbypass/sockbypass/internal/sockdiag"
)

// States of a connection's socket.
const (
	// StatePaired: in the sockhash with its peer; every message it sends
	// is redirected into the peer's receive queue.
	StatePaired = "paired"
	// StatePairing: in the sockhash, its pair handshake not finished
	// (the server has not decided yet).
	StatePairing = "pairing"
	// StateLeaving: in the sockhash, but it or its peer stopped being a
	// safe member: nothing more is redirected and it leaves once its
	// redirected bytes are read.
	StateLeaving = "leaving"
	// StatePlain: plain TCP (Reason says why).
	StatePlain = "plain"
)

// Reason is why a connection is plain (or leaving).
type Reason struct {
	// Code is the short name shown and filtered on (--state CODE).
	Code string
	// Text says what it means.
	Text string
}

// Reasons lists every reason, in the order they are tested.
var Reasons = []Reason{
	{"left-blocking", "was paired, left when it turned blocking"},
	{"left-reader-option", "was paired, left when it set SO_RCVLOWAT, TCP_INQ or SO_OOBINLINE"},
	{"left-with-peer", "was paired, left with its peer (which turned blocking or set a reader option)"},
	{"account-only", "its cgroup is enabled with --account-only: counted, not accelerated (detail: whether it would pair)"},
	{"mode-change", "made while its cgroup was account-only: it stays as it began"},
	{"stack-process", "made by a process listening on a stack port (a splicing proxy), or connected to one (detail: the peer)"},
	{"stack-port", "its server port is a stack port (--stack-ports)"},
	{"reader-option", "it, its peer or its listener set SO_RCVLOWAT, TCP_INQ or SO_OOBINLINE"},
	{"shared-endpoint", "sidecar mode: its app endpoint is shared by several sockets"},
	{"remote-peer", "its peer is not local (another node, or a namespace of no enabled cgroup)"},
	{"peer-closed", "its peer on this node is gone"},
	{"peer-not-enabled", "its peer is in no enabled cgroup"},
	{"blocking", "its file is blocking (a blocking recv on a member may return EAGAIN)"},
	{"peer-blocking", "its peer's file is blocking"},
	{"blocking-listener", "its server's listener blocks, or the listener's accepted sockets turned blocking"},
	{"probation", "its server's listener was on probation when it was accepted: a new listener's connections stay plain until one is read (--no-probation pairs them)"},
	{"short-lived-listener", "its server's listener has short-lived connections (--all-connections pairs them)"},
	{"predates-enable", "made before its cgroup (or its peer's) was enabled"},
	{"declined", "the pair did not form: the client sent before its server joined, their sequence numbers did not match, or the sockhash was full"},
}

// Conn is one TCP socket of a connection of an enabled cgroup (each end of
// a local connection is a Conn of its own).
type Conn struct {
	// Local and Remote are its addresses.
	Local  netip.AddrPort `json:"local"`
	Remote netip.AddrPort `json:"remote"`
	// TCPState is its TCP state ("ESTABLISHED", "CLOSE-WAIT", ...).
	TCPState string `json:"tcp_state"`
	// Netns is the inode of its network namespace (as
	// `readlink /proc/PID/ns/net` shows it: net:[INODE]).
	Netns uint64 `json:"netns"`
	// PodUID is the Kubernetes pod of its cgroup, when the cgroup is a
	// kubelet pod cgroup.
	PodUID string `json:"pod_uid,omitempty"`
	// CgroupID and Cgroup are its cgroup v2 id and path, relative to the
	// cgroup v2 mount ("/app.slice/web", as stats shows it).
	CgroupID uint64 `json:"cgroup_id"`
	Cgroup   string `json:"cgroup"`
	// PID and Comm are the process that holds it (0 and "" when no
	// process holds it any more, or none could be read).
	PID  int    `json:"pid,omitempty"`
	Comm string `json:"comm,omitempty"`
	// State is StatePaired, StatePairing, StateLeaving or StatePlain.
	State string `json:"state"`
	// Reason is the Code of a Reason for StatePlain and StateLeaving.
	Reason string `json:"reason,omitempty"`
	// Detail adds what is known beyond State and Reason.
	Detail string `json:"detail,omitempty"`
	// RedirectedBytes are the bytes this socket redirected to its peer
	// since it joined the sockhash (its sock_state's redirected_sent).
	RedirectedBytes uint64 `json:"redirected_bytes"`
	// Cookie and Inode identify the socket (SO_COOKIE, socket:[INODE]).
	Cookie uint64 `json:"cookie"`
	Inode  uint64 `json:"inode"`
}

// Options configure Collect.
type Options struct {
	// Mounts is where the cgroup v2 hierarchy is mounted.
	Mounts cgroup.Mounts
	// Logger receives debug logs of what was walked, and warnings for
	// what could not be read; nil means none.
	Logger *zap.Logger
}

// Collect lists the connections of the enabled cgroups (and the sockets
// of disabled cgroups that are still accelerated), sorted by cgroup, then
// addresses. It holds a shared lock on the pin directory meanwhile.
func Collect(dp *dataplane.Dataplane, opts Options) ([]Conn, error) {
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	l, err := lock.Shared(dp.PinDir())
	if err != nil {
		return nil, err
	}
	defer l.Unlock()

	settings, err := dp.SlotSettings()
	if err != nil {
		return nil, err
	}
	tree, pids, err := walkEnabled(opts.Mounts, settings)
	if err != nil {
		return nil, err
	}
	c := &collector{dp: dp, log: log, settings: settings, tree: tree}
	if err := c.dumpNamespaces(pids); err != nil {
		return nil, err
	}
	c.findPeers()
	c.findOwners(pids)
	out := make([]Conn, 0, len(c.kept))
	var unknown []uint64
	for _, r := range c.kept {
		conn, err := c.describe(r)
		if err != nil {
			return nil, err
		}
		if conn.Cgroup == "" && conn.CgroupID != 0 {
			unknown = append(unknown, conn.CgroupID)
		}
		out = append(out, conn)
	}
	// Cgroups outside the enabled trees (disabled ones whose sockets are
	// still accelerated): one walk for all.
	if len(unknown) > 0 {
		paths, err := opts.Mounts.PathsByID(unknown)
		if err != nil {
			return nil, err
		}
		for i := range out {
			if p, ok := paths[out[i].CgroupID]; ok && out[i].Cgroup == "" {
				out[i].Cgroup = relPath(opts.Mounts.V2, p)
				out[i].PodUID = podUID(out[i].Cgroup)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Cgroup != b.Cgroup {
			return a.Cgroup < b.Cgroup
		}
		if a.Local != b.Local {
			return a.Local.Compare(b.Local) < 0
		}
		return a.Remote.Compare(b.Remote) < 0
	})
	log.Debug("connections collected", zap.Int("connections", len(out)), zap.Int("namespaces", len(c.namespaces)), zap.Int("sockets_seen", len(c.all)))
	return out, nil
}

// cgInfo is a cgroup in the tree of an enabled cgroup.
type cgInfo struct {
	rel string
	// enabled is the id of the innermost enabled cgroup it is in (its
	// programs handle its sockets).
	enabled uint64
}

// walkEnabled walks the trees of the enabled cgroups: every cgroup in
// them by id, and the processes in them.
func walkEnabled(mounts cgroup.Mounts, settings map[uint64]dataplane.SlotSettings) (map[uint64]cgInfo, []int, error) {
	var ids []uint64
	for id, s := range settings {
		if s.Enabled {
			ids = append(ids, id)
		}
	}
	tree := map[uint64]cgInfo{}
	if len(ids) == 0 {
		return tree, nil, nil
	}
	paths, err := mounts.PathsByID(ids)
	if err != nil {
		return nil, nil, err
	}
	// Outer cgroups first, so that the innermost enabled one wins.
	roots := make([]string, 0, len(paths))
	for _, p := range paths {
		roots = append(roots, p)
	}
	sort.Slice(roots, func(i, j int) bool { return len(roots[i]) < len(roots[j]) })
	seenPid := map[int]bool{}
	var pids []int
	for _, root := range roots {
		var rootID uint64
		err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, os.ErrNotExist) {
					return nil // removed meanwhile
				}
				return err
			}
			if !d.IsDir() {
				return nil
			}
			var st unix.Stat_t
			if unix.Stat(path, &st) != nil {
				return nil
			}
			if path == root {
				rootID = st.Ino
			}
			tree[st.Ino] = cgInfo{rel: relPath(mounts.V2, path), enabled: rootID}
			data, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for _, f := range strings.Fields(string(data)) {
				if pid, err := strconv.Atoi(f); err == nil && !seenPid[pid] {
					seenPid[pid] = true
					pids = append(pids, pid)
				}
			}
			return nil
		})
		if err != nil {
			return nil, nil, fmt.Errorf("walk enabled cgroup %s: %w", root, err)
		}
	}
	return tree, pids, nil
}

// relPath is path relative to the cgroup v2 mount, as stats and status
// show it: "/app.slice/web" ("/" for the root).
func relPath(mount, path string) string {
	rel, err := filepath.Rel(mount, path)
	if err != nil || rel == "." {
		return "/"
	}
	return "/" + rel
}

var podRE = regexp.MustCompile(`pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})`)

// podUID returns the pod UID in a kubelet pod cgroup path (both drivers:
// kubepods/burstable/pod<uid> and kubepods-burstable-pod<uid_with_underscores>.slice),
// "" for other cgroups.
func podUID(rel string) string {
	m := podRE.FindAllStringSubmatch(rel, -1)
	if len(m) == 0 {
		return ""
	}
	return strings.ReplaceAll(m[len(m)-1][1], "_", "-")
}

// netnsInfo is a network namespace walked.
type netnsInfo struct {
	ino    uint64
	path   string
	cookie uint64 // 0 until needed and read
	read   bool
}

// sockRec is a socket seen in a namespace, with what is known about it.
type sockRec struct {
	s      sockdiag.Socket
	ns     *netnsInfo
	st     *dataplane.SockState
	cg     *cgInfo // nil outside the enabled trees
	owner  *owner
	peer   *sockRec
	member bool
}

// owner is the process holding a socket, by one of its fds.
type owner struct {
	pid  int
	fd   string
	comm string
}

type tupleKey struct {
	ns            uint64
	local, remote netip.AddrPort
}

type portKey struct {
	ns   uint64
	port uint16
}

type collector struct {
	dp       *dataplane.Dataplane
	log      *zap.Logger
	settings map[uint64]dataplane.SlotSettings
	tree     map[uint64]cgInfo

	namespaces []*netnsInfo
	all        []*sockRec // every connected socket seen
	kept       []*sockRec // those listed
	listening  map[portKey]bool
	byTuple    map[tupleKey]*sockRec
}

// dumpNamespaces dumps the sockets of the namespaces of pids and of the
// caller's own, with their storage.
func (c *collector) dumpNamespaces(pids []int) error {
	seen := map[uint64]bool{}
	add := func(path string) {
		var st unix.Stat_t
		if unix.Stat(path, &st) != nil || seen[st.Ino] {
			return
		}
		seen[st.Ino] = true
		c.namespaces = append(c.namespaces, &netnsInfo{ino: st.Ino, path: path})
	}
	add("/proc/self/ns/net")
	for _, pid := range pids {
		add("/proc/" + strconv.Itoa(pid) + "/ns/net")
	}
	stateMap := c.dp.SockStateMap()
	info, err := stateMap.Info()
	if err != nil {
		return fmt.Errorf("read sock_state map info: %w", err)
	}
	stateMapID, _ := info.ID()
	req := sockdiag.Request{States: sockdiag.ConnectedStates | 1<<sockdiag.StateListen, StorageMapFDs: []int{stateMap.FD()}}
	c.listening = map[portKey]bool{}
	c.byTuple = map[tupleKey]*sockRec{}
	for i, n := range c.namespaces {
		var socks []sockdiag.Socket
		var err error
		if i == 0 {
			socks, err = sockdiag.Dump(req) // our own namespace
		} else {
			socks, err = sockdiag.DumpNetns(n.path, req)
		}
		if err != nil {
			if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
				c.log.Debug("network namespace gone while listing it", zap.String("netns", n.path))
				continue
			}
			return fmt.Errorf("list the TCP sockets of network namespace %s: %w", n.path, err)
		}
		c.log.Debug("network namespace listed", zap.String("netns", n.path), zap.Uint64("inode", n.ino), zap.Int("sockets", len(socks)))
		for _, s := range socks {
			if s.State == sockdiag.StateListen {
				c.listening[portKey{n.ino, s.Local.Port()}] = true
				continue
			}
			r := &sockRec{s: s, ns: n}
			for _, stg := range s.Storages {
				if stg.MapID != uint32(stateMapID) {
					continue
				}
				st, err := dataplane.DecodeSockState(stg.Value)
				if err != nil {
					return err
				}
				r.st = &st
			}
			if cg, ok := c.tree[s.CgroupID]; ok {
				r.cg = &cg
			}
			c.all = append(c.all, r)
			c.byTuple[tupleKey{n.ino, s.Local, s.Remote}] = r
			if r.st != nil && r.st.Flags&dataplane.SockFlagInserted != 0 {
				cookie, ok, err := c.dp.MemberCookie(r.st.Key)
				if err != nil {
					return err
				}
				r.member = ok && cookie == s.Cookie
			}
			// Listed: the sockets of the enabled trees, and those of
			// other cgroups that are still accelerated (disabled
			// cgroups).
			if r.cg != nil || r.member {
				c.kept = append(c.kept, r)
			}
		}
	}
	return nil
}

// findPeers links each listed socket to its peer: the socket with the
// mirrored 4-tuple in its namespace, else the only one in another
// namespace (pod to pod).
func (c *collector) findPeers() {
	var cross map[[2]netip.AddrPort][]*sockRec
	for _, r := range c.kept {
		if p := c.byTuple[tupleKey{r.ns.ino, r.s.Remote, r.s.Local}]; p != nil {
			r.peer = p
			continue
		}
		if r.s.Remote.Addr().IsLoopback() {
			continue
		}
		if cross == nil {
			cross = map[[2]netip.AddrPort][]*sockRec{}
			for _, s := range c.all {
				k := [2]netip.AddrPort{s.s.Local, s.s.Remote}
				cross[k] = append(cross[k], s)
			}
		}
		var found []*sockRec
		for _, s := range cross[[2]netip.AddrPort{r.s.Remote, r.s.Local}] {
			if s.ns != r.ns {
				found = append(found, s)
			}
		}
		if len(found) == 1 {
			r.peer = found[0]
		}
	}
}

// findOwners finds the process of each listed socket and of its peer:
// first among the processes of the enabled cgroups, then, for sockets
// still without one (a process moved out, a descriptor passed on), among
// every process.
func (c *collector) findOwners(pids []int) {
	want := map[uint64][]*sockRec{}
	for _, r := range c.all {
		if r.s.Inode != 0 {
			want[r.s.Inode] = append(want[r.s.Inode], r)
		}
	}
	// The listed sockets and their peers (named in reasons).
	needed := map[*sockRec]bool{}
	for _, r := range c.kept {
		if r.s.Inode != 0 {
			needed[r] = true
		}
		if r.peer != nil && r.peer.s.Inode != 0 {
			needed[r.peer] = true
		}
	}
	missing := len(needed)
	walked := map[int]bool{}
	comms := map[int]string{}
	walk := func(pid int) {
		walked[pid] = true
		dir := "/proc/" + strconv.Itoa(pid) + "/fd/"
		entries, err := os.ReadDir(dir)
		if err != nil {
			return // exited, or a kernel thread
		}
		var buf [64]byte
		for _, e := range entries {
			n, err := unix.Readlink(dir+e.Name(), buf[:])
			if err != nil || n < 9 || string(buf[:8]) != "socket:[" {
				continue
			}
			ino, err := strconv.ParseUint(string(buf[8:n-1]), 10, 64)
			if err != nil {
				continue
			}
			for _, r := range want[ino] {
				if r.owner != nil {
					continue
				}
				comm, ok := comms[pid]
				if !ok {
					b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
					comm = strings.TrimSpace(string(b))
					comms[pid] = comm
				}
				r.owner = &owner{pid: pid, fd: e.Name(), comm: comm}
				if needed[r] {
					missing--
				}
			}
		}
	}
	for _, pid := range pids {
		walk(pid)
	}
	if missing <= 0 {
		return
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		c.log.Warn("cannot list processes: connections show no process", zap.Error(err))
		return
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || walked[pid] {
			continue
		}
		walk(pid)
		if missing <= 0 {
			return
		}
	}
}

// cookieOf returns the cookie of the namespace n (0 when it cannot be
// read: it went away).
func (c *collector) cookieOf(n *netnsInfo) uint64 {
	if n.read {
		return n.cookie
	}
	n.read = true
	netns, err := ns.GetNS(n.path)
	if err != nil {
		return 0
	}
	defer netns.Close()
	netns.Do(func(ns.NetNS) error {
		n.cookie, err = nodeaddrs.NetnsCookie()
		return err
	})
	return n.cookie
}

// blocking reports whether the file of r's owner is blocking (false when
// no owner is known).
func blocking(r *sockRec) bool {
	if r == nil || r.owner == nil {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(r.owner.pid) + "/fdinfo/" + r.owner.fd)
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			f, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
			return err == nil && f&unix.O_NONBLOCK == 0
		}
	}
	return false
}

// cgroupOf returns the settings of the enabled cgroup whose programs
// handle r's sockets (the one its storage names, else the innermost
// enabled cgroup it is in).
func (c *collector) cgroupOf(r *sockRec) (dataplane.SlotSettings, bool) {
	if r == nil {
		return dataplane.SlotSettings{}, false
	}
	if r.st != nil && r.st.Flags&dataplane.SockFlagHandled != 0 {
		if s, ok := c.settings[r.st.CgroupId]; ok {
			return s, true
		}
	}
	if r.cg != nil {
		s, ok := c.settings[r.cg.enabled]
		return s, ok
	}
	return dataplane.SlotSettings{}, false
}

// isServer reports whether r is the accepted end of its connection.
func (c *collector) isServer(r *sockRec) bool {
	if r.st != nil {
		switch {
		case r.st.Flags&dataplane.SockFlagAccepted != 0:
			return true
		case r.st.Flags&dataplane.SockFlagPairClient != 0:
			return false
		}
	}
	local := c.listening[portKey{r.ns.ino, r.s.Local.Port()}]
	if r.peer != nil && c.listening[portKey{r.peer.ns.ino, r.s.Remote.Port()}] && !local {
		return false
	}
	return local
}

// describe builds the Conn of r.
func (c *collector) describe(r *sockRec) (Conn, error) {
	conn := Conn{Local: r.s.Local, Remote: r.s.Remote, TCPState: sockdiag.StateName(r.s.State), Netns: r.ns.ino,
		CgroupID: r.s.CgroupID, Cookie: r.s.Cookie, Inode: r.s.Inode}
	if r.cg != nil {
		conn.Cgroup = r.cg.rel
		conn.PodUID = podUID(r.cg.rel)
	}
	if r.owner != nil {
		conn.PID, conn.Comm = r.owner.pid, r.owner.comm
	}
	if r.member {
		conn.RedirectedBytes = r.st.RedirectedSent
		conn.State, conn.Reason, conn.Detail = c.memberState(r)
		if s, ok := c.cgroupOf(r); !ok || !s.Enabled {
			conn.Detail = join(conn.Detail, "its cgroup is disabled: accelerated until it closes")
		}
		return conn, nil
	}
	conn.State = StatePlain
	var err error
	conn.Reason, conn.Detail, err = c.plainReason(r)
	return conn, err
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

// memberState says how far a sockhash member is.
func (c *collector) memberState(r *sockRec) (state, reason, detail string) {
	f := r.st.Flags
	var peerFlags uint64
	if r.peer != nil && r.peer.st != nil {
		peerFlags = r.peer.st.Flags
	}
	switch {
	case f&dataplane.SockFlagLeaving != 0 && f&dataplane.SockFlagLateOption != 0:
		return StateLeaving, "left-reader-option", "leaves once its redirected bytes are read"
	case f&dataplane.SockFlagLeaving != 0:
		return StateLeaving, "left-blocking", "leaves once its redirected bytes are read"
	case peerFlags&dataplane.SockFlagLeaving != 0:
		return StateLeaving, "left-with-peer", "its peer is leaving"
	case f&dataplane.SockFlagPaired != 0:
		return StatePaired, "", ""
	case f&dataplane.SockFlagPairClient != 0:
		// A client is paired once its server joined; it marks itself
		// at its first message.
		st, ok, err := c.dp.PairState(r.st.Key)
		if err == nil && ok && st == dataplane.PairJoined {
			return StatePaired, "", ""
		}
		return StatePairing, "", "waiting for its server to join"
	}
	return StatePairing, "", ""
}

// plainReason says why r is plain TCP (see Reasons).
func (c *collector) plainReason(r *sockRec) (code, detail string, err error) {
	var f uint64
	if r.st != nil {
		f = r.st.Flags
	}
	var peerFlags uint64
	if r.peer != nil && r.peer.st != nil {
		peerFlags = r.peer.st.Flags
	}
	own, _ := c.cgroupOf(r)
	peerCg, peerEnabled := c.cgroupOf(r.peer)
	if r.peer != nil && r.peer.cg == nil && !r.peer.member {
		peerEnabled = false
	}
	wasMember := f&(dataplane.SockFlagPeerRemoved|dataplane.SockFlagPassed) != 0 || (r.st != nil && r.st.RedirectedSent > 0)
	switch {
	case f&dataplane.SockFlagLeaving != 0 && f&dataplane.SockFlagLateOption != 0:
		return "left-reader-option", "", nil
	case f&dataplane.SockFlagLeaving != 0:
		return "left-blocking", "", nil
	case wasMember || peerFlags&dataplane.SockFlagLeaving != 0:
		return "left-with-peer", "", nil
	case own.AccountOnly:
		if f&dataplane.SockFlagWouldPair != 0 {
			return "account-only", "would pair", nil
		}
		return "account-only", "", nil
	case f&dataplane.SockFlagWouldPair != 0:
		return "mode-change", "would have paired in the account-only run it began in", nil
	case f&dataplane.SockFlagStackProcess != 0:
		return "stack-process", "", nil
	case f&dataplane.SockFlagAmbiguous != 0:
		return "shared-endpoint", "", nil
	}
	server := c.isServer(r)
	serverPort := r.s.Remote.Port()
	if server {
		serverPort = r.s.Local.Port()
	}
	for _, s := range []dataplane.SlotSettings{own, peerCg} {
		for _, p := range s.StackPorts {
			if p == serverPort {
				return "stack-port", fmt.Sprintf("port %d", p), nil
			}
		}
	}
	if f&dataplane.SockFlagStackReader != 0 {
		return "reader-option", "", nil
	}
	// The client declines for these; its server only sees the decline.
	if peerFlags&dataplane.SockFlagStackProcess != 0 {
		return "stack-process", peerDetail(r.peer), nil
	}
	if peerFlags&dataplane.SockFlagStackReader != 0 {
		return "reader-option", peerDetail(r.peer), nil
	}
	if r.peer == nil {
		if r.s.Remote.Addr().IsLoopback() || r.s.Remote.Addr() == r.s.Local.Addr() {
			return "peer-closed", "", nil
		}
		return "remote-peer", "", nil
	}
	if f&dataplane.SockFlagRemotePeer != 0 {
		return "remote-peer", "", nil
	}
	if !peerEnabled {
		return "peer-not-enabled", peerDetail(r.peer), nil
	}
	if blocking(r) {
		return "blocking", "", nil
	}
	if blocking(r.peer) {
		return "peer-blocking", peerDetail(r.peer), nil
	}
	// The server's listener, as sock_ops recorded it.
	srv := r
	if !server {
		srv = r.peer
	}
	if srv.st != nil && srv.st.Flags&(dataplane.SockFlagProbation|dataplane.SockFlagProbationChild) != 0 {
		return "probation", fmt.Sprintf("listener on port %d", srv.s.Local.Port()), nil
	}
	lflags, ok, err := c.dp.ListenerFlags(c.cookieOf(srv.ns), srv.s.Local.Addr(), srv.s.Local.Port())
	if err != nil {
		return "", "", err
	}
	serverCg := own
	if !server {
		serverCg = peerCg
	}
	if ok {
		switch {
		case lflags&dataplane.ListenerStackReader != 0:
			return "reader-option", "its server's listener set one", nil
		case lflags&(dataplane.ListenerNonblock|dataplane.ListenerBlockingChildren) != dataplane.ListenerNonblock:
			return "blocking-listener", fmt.Sprintf("listener on port %d", srv.s.Local.Port()), nil
		case lflags&dataplane.ListenerShortMask >= dataplane.ShortStreak*dataplane.ListenerShortOne && !serverCg.AllConnections:
			return "short-lived-listener", fmt.Sprintf("listener on port %d", srv.s.Local.Port()), nil
		}
	}
	if r.st == nil && (r.peer.st == nil || r.peer.st.Flags&dataplane.SockFlagHandled == 0) {
		return "predates-enable", "", nil
	}
	return "declined", "", nil
}

// peerDetail names r's process.
func peerDetail(r *sockRec) string {
	if r == nil || r.owner == nil {
		return ""
	}
	return fmt.Sprintf("peer %d/%s", r.owner.pid, r.owner.comm)
}

// FindReason returns the reason with the code, and whether there is one.
func FindReason(code string) (Reason, bool) {
	for _, r := range Reasons {
		if r.Code == code {
			return r, true
		}
	}
	return Reason{}, false
}
