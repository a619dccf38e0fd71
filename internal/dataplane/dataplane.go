// Package dataplane owns every BPF object of sockbypass: the sockhash, the
// per-socket state and per-cgroup counters, the sk_msg program on the
// sockhash and one sock_ops program per enabled cgroup, with their links.
//
// All of it is pinned under one pin directory (default
// /sys/fs/bpf/sockbypass), so acceleration outlives the process that set it
// up and can be inspected with bpftool:
//
//	<pin dir>/sockhash          BPF_MAP_TYPE_SOCKHASH  struct sock_key -> socket
//	<pin dir>/cgroup_counters   BPF_MAP_TYPE_PERCPU_ARRAY slot -> struct cgroup_counters
//	<pin dir>/cgroup_config     BPF_MAP_TYPE_ARRAY slot -> struct cgroup_config (an enabled cgroup's settings)
//	<pin dir>/cgroup_slots      BPF_MAP_TYPE_HASH enabled cgroup id -> its slot (see slots.go)
//	<pin dir>/sock_state        BPF_MAP_TYPE_SK_STORAGE  socket -> struct sock_state
//	<pin dir>/sk_msg            the sk_msg program
//	<pin dir>/sk_msg_link       its sockmap link (absent on kernels without one)
//	<pin dir>/socket_cgroups    BPF_MAP_TYPE_LRU_HASH socket cookie -> cgroup id
//	<pin dir>/tc_devices        BPF_MAP_TYPE_HASH registry of TC attachments
//	<pin dir>/tc_users          BPF_MAP_TYPE_HASH which cgroup uses which TC device
//	<pin dir>/node_addrs        BPF_MAP_TYPE_HASH unique node addresses -> owning netns (pod-to-pod pairing)
//	<pin dir>/orig_dsts         BPF_MAP_TYPE_HASH sidecar mode: app endpoint -> original destination (handshakes in flight)
//	<pin dir>/intercepts        BPF_MAP_TYPE_ARRAY sidecar mode: slot -> its orig_dsts entries (the intercept quota)
//	<pin dir>/mesh_endpoints    BPF_MAP_TYPE_HASH sidecar mode: app endpoint -> sockets using it
//	<pin dir>/mesh_syns         BPF_MAP_TYPE_LRU_HASH sidecar mode: SYN tuple after NAT -> app socket key
//	<pin dir>/mesh_clients      BPF_MAP_TYPE_LRU_HASH sidecar mode: connecting endpoint -> socket key (pod to pod)
//	<pin dir>/inbound_pods      BPF_MAP_TYPE_HASH sidecar mode: pod address -> its sidecar's inbound port
//	<pin dir>/layout_version    BPF_MAP_TYPE_ARRAY the pin layout version (LayoutVersion)
//	<pin dir>/cgroups/<id>      cgroup link of the sock_ops program of cgroup <id>
//	<pin dir>/cgroups/<id>-<program>  cgroup links of its other programs (cgroupPrograms)
//	<pin dir>/tc/<netns>-<ifindex>  tcx link (or, with clsact, the TC program)
//
// The maps whose entries follow sockets are sized from the sockhash
// capacity (SizesFor).
//
// Changes take an exclusive flock on the pin directory, reads a shared one,
// so the CLI and a daemon can work side by side. Creation is atomic: the
// state is built and pinned in a temporary directory that is then renamed.
package dataplane

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/bpffs"
	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/internal/logrepeat"
	"github.com/sockbypass/sockbypass/skmsg"
	"github.com/sockbypass/sockbypass/sockops"
)

// Names below the pin directory.
const (
	PinSockhash      = "sockhash"
	PinCounters      = "cgroup_counters"
	PinSockState     = "sock_state"
	PinSkMsg         = "sk_msg"
	PinSkMsgLink     = "sk_msg_link"
	PinStackRead     = "stack_read"
	PinStackReadLink = "stack_read_link"
	PinSocketCgs     = "socket_cgroups"
	PinNodeAddrs     = "node_addrs"
	PinOrigDsts      = "orig_dsts"
	PinIntercepts    = "intercepts"
	PinMeshEndpoints = "mesh_endpoints"
	PinMeshSyns      = "mesh_syns"
	PinMeshClients   = "mesh_clients"
	PinInboundPods   = "inbound_pods"
	PinCgroupConfig  = "cgroup_config"
	PinCgroupSlots   = "cgroup_slots"
	PinPairs         = "pairs"
	PinOfferHints    = "offer_hints"
	PinOfferEpoch    = "offer_epoch"
	PinListeners     = "listeners"
	PinStackProcs    = "stack_procs"
	PinEvents        = "events"
	DirCgroups       = "cgroups"

	// legacyPinRecvLink is the read-progress tracer's link of layouts 4
	// and before (senders now read their peer's progress themselves):
	// uninstall still removes it.
	legacyPinRecvLink = "recv_trace_link"
)

// mapNames are the maps every program shares, by their name in the C code.
var mapNames = []string{PinSockhash, PinCounters, PinSockState, PinSocketCgs, PinCgroupConfig, PinCgroupSlots, PinNodeAddrs, PinOrigDsts, PinIntercepts, PinMeshEndpoints, PinMeshSyns, PinMeshClients, PinInboundPods, PinTCDevices, PinTCUsers, PinPairs, PinOfferHints, PinOfferEpoch, PinListeners, PinStackProcs, PinEvents}

// SizesFor returns the capacity of the shared maps whose entries follow
// sockets, for a sockhash of capacity n, so that no pod's live sockets can
// evict another pod's entries:
//
//   - socket_cgroups: one entry per sockhash member, twice n;
//   - pairs: one per handshake in flight and per joined pair whose client
//     has not sent yet, twice n (at least 65536);
//   - mesh_endpoints (a hash: one per app socket of a sidecar-mode pod,
//     however many): twice n (at least 65536);
//   - orig_dsts, mesh_syns, mesh_clients: one per handshake in flight, n
//     (at least 65536).
func SizesFor(n uint32) map[string]uint32 {
	atLeast := func(v, min uint32) uint32 { return max(v, min) }
	return map[string]uint32{
		PinSocketCgs:     atLeast(2*n, 4096),
		PinPairs:         atLeast(2*n, 65536),
		PinMeshEndpoints: atLeast(2*n, 65536),
		PinMeshClients:   atLeast(n, 65536),
		PinOrigDsts:      atLeast(n, 65536),
		PinMeshSyns:      atLeast(n, 65536),
	}
}

// ErrNotInstalled is returned by Open when nothing is pinned in the pin
// directory.
var ErrNotInstalled = errors.New("sockbypass is not installed (nothing pinned); run: sockbypass enable --cgroup PATH")

// Options configure Open and OpenOrCreate.
type Options struct {
	// PinDir is the pin directory; "" means bpffs.DefaultPinDir.
	PinDir string
	// Logger receives structured logs; nil means no logs.
	Logger *zap.Logger
	// SockhashMaxEntries sizes the sockhash when it is created; 0 keeps
	// the default (65536). Sockets beyond it stay on the TCP stack.
	SockhashMaxEntries uint32
	// LegacySkMsgAttach attaches the sk_msg program with BPF_PROG_ATTACH
	// even where sockmap links exist (the path kernels before 6.10 take);
	// tests use it to cover that path.
	LegacySkMsgAttach bool
	// LegacyTC attaches TC programs with clsact + cls_bpf even where tcx
	// links exist (the path kernels before 6.6 take).
	LegacyTC bool
}

// Dataplane is an open handle on the pinned state. Close releases the handle
// and leaves the state in place.
type Dataplane struct {
	pinDir   string
	log      *zap.Logger
	legacyTC bool
	// maps shared by every program, by name.
	maps map[string]*ebpf.Map
	// listenerWarnings: a cgroup whose listeners cannot be read warns
	// once per error, not at every rescan.
	listenerWarnings logrepeat.Warner
}

func (o Options) normalize() Options {
	if o.PinDir == "" {
		o.PinDir = bpffs.DefaultPinDir
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	return o
}

// Open opens the state pinned in opts.PinDir. It returns ErrNotInstalled
// when nothing is pinned there, and an error naming the pin when the pinned
// maps do not match what this binary expects.
func Open(opts Options) (*Dataplane, error) {
	opts = opts.normalize()
	if _, err := os.Stat(pinPath(opts.PinDir, PinSockhash)); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", opts.PinDir, ErrNotInstalled)
	}
	if err := checkLayout(opts.PinDir); err != nil {
		return nil, err
	}
	spec, err := skmsg.LoadSpec()
	if err != nil {
		return nil, err
	}
	d := &Dataplane{pinDir: opts.PinDir, log: opts.Logger, legacyTC: opts.LegacyTC, maps: map[string]*ebpf.Map{}}
	for _, name := range mapNames {
		path := pinPath(opts.PinDir, name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			d.Close()
			return nil, fmt.Errorf("open pinned map %s: %w", path, err)
		}
		d.maps[name] = m
		if err := compatible(spec.Maps[name], m); err != nil {
			d.Close()
			return nil, fmt.Errorf("%w: pinned map %s: %v; remove it with: sockbypass uninstall --bpffs-dir %s", ErrIncompatible, path, err, opts.PinDir)
		}
	}
	return d, nil
}

// compatible checks that a pinned map has the shape of spec.
func compatible(spec *ebpf.MapSpec, m *ebpf.Map) error {
	if m.Type() != spec.Type || m.KeySize() != spec.KeySize || m.ValueSize() != spec.ValueSize {
		return fmt.Errorf("it is %s key %d value %d, this binary needs %s key %d value %d",
			m.Type(), m.KeySize(), m.ValueSize(), spec.Type, spec.KeySize, spec.ValueSize)
	}
	return nil
}

// OpenOrCreate opens the pinned state, creating and pinning it first when
// there is none. Creation is atomic: of two concurrent creators one wins and
// the other opens what the winner pinned.
func OpenOrCreate(opts Options) (*Dataplane, error) {
	opts = opts.normalize()
	d, err := Open(opts)
	if !errors.Is(err, ErrNotInstalled) {
		return d, err
	}
	if err := create(opts); err != nil {
		return nil, err
	}
	return Open(opts)
}

// create builds the shared maps and the sk_msg program in a temporary
// directory next to opts.PinDir and renames it into place.
func create(opts Options) (err error) {
	if err := bpffs.Ensure(opts.PinDir); err != nil {
		return err
	}
	parent := filepath.Dir(opts.PinDir)
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", parent, err)
	}
	tmp := fmt.Sprintf("%s-tmp-%d-%x", opts.PinDir, os.Getpid(), rand.Uint32())
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", tmp, err)
	}
	// Whatever happens, the temporary directory goes; closing our handles
	// then frees the objects unless they were renamed into place.
	defer os.RemoveAll(tmp)

	spec, err := skmsg.LoadSpec()
	if err != nil {
		return err
	}
	if opts.SockhashMaxEntries != 0 {
		spec.Maps[PinSockhash].MaxEntries = opts.SockhashMaxEntries
	}
	for name, n := range SizesFor(spec.Maps[PinSockhash].MaxEntries) {
		spec.Maps[name].MaxEntries = n
	}
	maps := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range maps {
			m.Close()
		}
	}()
	for _, name := range mapNames {
		m, err := ebpf.NewMap(spec.Maps[name])
		if err != nil {
			return fmt.Errorf("create map %s: %w", name, err)
		}
		maps[name] = m
		if err := m.Pin(pinPath(tmp, name)); err != nil {
			return fmt.Errorf("pin map %s: %w", name, err)
		}
	}

	layout, err := createLayoutMap()
	if err != nil {
		return err
	}
	defer layout.Close()
	if err := layout.Pin(pinPath(tmp, PinLayout)); err != nil {
		return fmt.Errorf("pin layout version: %w", err)
	}

	prog, err := loadSkMsg(maps)
	if err != nil {
		return err
	}
	defer prog.Close()
	if err := prog.Pin(pinPath(tmp, PinSkMsg)); err != nil {
		return fmt.Errorf("pin sk_msg program: %w", err)
	}
	for _, dir := range []string{DirCgroups, DirTC} {
		if err := os.Mkdir(pinPath(tmp, dir), 0o700); err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
	}

	attach, err := attachSkMsg(maps[PinSockhash], prog, pinPath(tmp, PinSkMsgLink), opts.LegacySkMsgAttach)
	if err != nil {
		return err
	}
	tracer, err := loadStackRead(maps)
	if err != nil {
		return err
	}
	defer tracer.Close()
	if err := tracer.Pin(pinPath(tmp, PinStackRead)); err != nil {
		return fmt.Errorf("pin stack-read tracer: %w", err)
	}
	if err := attachStackRead(tracer, pinPath(tmp, PinStackReadLink)); err != nil {
		if attach == attachLegacy {
			detachSkMsgLegacy(maps[PinSockhash], prog)
		}
		return err
	}

	if err := os.Rename(tmp, opts.PinDir); err != nil {
		// Another creator won the race: ours is freed on return.
		if errors.Is(err, os.ErrExist) || errors.Is(err, errNotEmpty) {
			opts.Logger.Info("pinned state was created concurrently; using it", zap.String("pin_dir", opts.PinDir))
			if attach == attachLegacy {
				detachSkMsgLegacy(maps[PinSockhash], prog)
			}
			return nil
		}
		if attach == attachLegacy {
			detachSkMsgLegacy(maps[PinSockhash], prog)
		}
		return fmt.Errorf("move pinned state into %s: %w", opts.PinDir, err)
	}
	opts.Logger.Info("created pinned state", zap.String("pin_dir", opts.PinDir), zap.String("sk_msg_attach", attach))
	return nil
}

const (
	attachLink   = "link"
	attachLegacy = "legacy"
)

// attachSkMsg attaches prog to sockhash with a sockmap link pinned at
// linkPin, or with the legacy BPF_PROG_ATTACH on kernels without sockmap
// links (before 6.10).
func attachSkMsg(sockhash *ebpf.Map, prog *ebpf.Program, linkPin string, forceLegacy bool) (string, error) {
	var l link.Link
	err := ebpf.ErrNotSupported
	if !forceLegacy {
		l, err = link.AttachRawLink(link.RawLinkOptions{
			Target:  sockhash.FD(),
			Program: prog,
			Attach:  ebpf.AttachSkMsgVerdict,
		})
	}
	if err == nil {
		defer l.Close()
		if err := l.Pin(linkPin); err != nil {
			return "", fmt.Errorf("pin sk_msg link: %w", err)
		}
		return attachLink, nil
	}
	if !errors.Is(err, ebpf.ErrNotSupported) && !errors.Is(err, errInvalid) {
		return "", fmt.Errorf("attach sk_msg program to sockhash: %w", err)
	}
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  sockhash.FD(),
		Program: prog,
		Attach:  ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return "", fmt.Errorf("attach sk_msg program to sockhash (legacy): %w", err)
	}
	return attachLegacy, nil
}

func detachSkMsgLegacy(sockhash *ebpf.Map, prog *ebpf.Program) error {
	return link.RawDetachProgram(link.RawDetachProgramOptions{
		Target:  sockhash.FD(),
		Program: prog,
		Attach:  ebpf.AttachSkMsgVerdict,
	})
}

// PinDir returns the pin directory of d.
func (d *Dataplane) PinDir() string { return d.pinDir }

// SockhashCapacity returns the pinned sockhash's max_entries: fixed when
// the state is created (Options.SockhashMaxEntries), kept by Upgrade.
func (d *Dataplane) SockhashCapacity() (uint32, error) {
	m, ok := d.maps[PinSockhash]
	if !ok {
		return 0, fmt.Errorf("the sockhash of %s is not open", d.pinDir)
	}
	return m.MaxEntries(), nil
}

// Close releases d's handles. The pinned state stays.
func (d *Dataplane) Close() error {
	for _, m := range d.maps {
		m.Close()
	}
	d.maps = nil
	return nil
}

// EnableOptions are the settings of an enabled cgroup.
type EnableOptions struct {
	// TCDevices are the interfaces whose egress is accounted for the
	// cgroup (none when empty).
	TCDevices []TCDevice
	// AccountOnly counts the cgroup's traffic without accelerating it: a
	// dry run that shows what acceleration would take off the stack.
	AccountOnly bool
	// Mesh, when set, puts the cgroup (a pod with a sidecar) in sidecar
	// mode.
	Mesh *MeshOptions
	// StackPorts are server ports whose connections stay plain TCP (at
	// most 16): for servers and proxies that read with splice(2) (a Go
	// io.Copy TCP proxy, HAProxy in splice mode), which cannot read
	// redirected bytes. A connection is left out when its server port is
	// listed by the cgroup of either end.
	StackPorts []uint16
	// AllConnections pairs every connection to the cgroup's listeners,
	// including those of listeners whose connections are short-lived
	// (by default such connections stay plain TCP, where pairing would
	// cost more than it gains: see "Short-lived listeners" in
	// bpf/sockbypass.h).
	AllConnections bool
	// NoProbation pairs connections to the cgroup's listeners from the
	// first one. By default a new listener is on probation: its
	// connections stay plain TCP until one of its accepted sockets has
	// been read with recvmsg without blocking, since splice readers (a Go
	// io.Copy proxy) and blocking readers cannot read redirected bytes
	// (see "Probation" in bpf/sockbypass.h). Set it only when every
	// server of the cgroup reads with recvmsg on non-blocking sockets.
	NoProbation bool
}

// cgroupConfig is struct cgroup_config (generated by bpf2go).
type cgroupConfig = sockops.CgroupConfig

// cgroup_config.flags (CGROUP_*).
const (
	cgroupAccountOnly    = 1 << 0
	cgroupAllConnections = 1 << 1
	cgroupNoProbation    = 1 << 2
)

// Enable attaches a sock_ops program to cg, so every TCP socket of cg (and
// of the cgroups below it) that reaches ESTABLISHED from now on is inserted
// into the sockhash and accelerated (or only counted, with AccountOnly),
// and accounts the egress of opts.TCDevices for it. It is idempotent: it
// reports false when cg was already enabled, and then converges on opts:
// the mode is updated for new connections, and cg's TC devices become
// exactly opts.TCDevices (cg stops asking for the others; a device is
// detached once no enabled cgroup asks for it, since devices are shared
// node-wide). On error nothing that this call attached is left attached.
func (d *Dataplane) Enable(cg cgroup.Cgroup, opts EnableOptions) (changed bool, err error) {
	devs := make([]resolvedDevice, 0, len(opts.TCDevices))
	for _, td := range opts.TCDevices {
		r, err := resolveTCDevice(td)
		if err != nil {
			return false, fmt.Errorf("enable %s: %w", cg.Path, err)
		}
		devs = append(devs, r)
	}

	l, err := lock.Exclusive(d.pinDir)
	if err != nil {
		return false, err
	}
	defer l.Unlock()

	// Undo, on error, whatever this call attached.
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()

	cfg := cgroupConfig{}
	if opts.AccountOnly {
		cfg.Flags |= cgroupAccountOnly
	}
	if opts.AllConnections {
		cfg.Flags |= cgroupAllConnections
	}
	if opts.NoProbation {
		cfg.Flags |= cgroupNoProbation
	}
	if opts.Mesh != nil {
		if err := opts.Mesh.fill(&cfg); err != nil {
			return false, fmt.Errorf("enable %s: %w", cg.Path, err)
		}
	}
	if len(opts.StackPorts) > len(cfg.StackPorts) {
		return false, fmt.Errorf("enable %s: %d stack ports given, at most %d", cg.Path, len(opts.StackPorts), len(cfg.StackPorts))
	}
	for _, p := range opts.StackPorts {
		if p == 0 {
			// The datapath reads the list up to its first 0.
			return false, fmt.Errorf("enable %s: stack port 0 is not a port; list server ports from 1 to 65535", cg.Path)
		}
	}
	copy(cfg.StackPorts[:], opts.StackPorts)
	slot, fresh, err := d.assignSlot(cg.ID)
	if err != nil {
		return false, fmt.Errorf("enable %s: %w", cg.Path, err)
	}
	if fresh {
		undo = append(undo, func() { d.releaseSlot(cg.ID) })
	}
	var oldCfg cgroupConfig
	if err := d.maps[PinCgroupConfig].Lookup(slot, &oldCfg); err != nil {
		return false, fmt.Errorf("enable %s: read cgroup config: %w", cg.Path, err)
	}
	if err := d.maps[PinCgroupConfig].Put(slot, cfg); err != nil {
		return false, fmt.Errorf("enable %s: write cgroup config: %w", cg.Path, err)
	}
	undo = append(undo, func() { d.maps[PinCgroupConfig].Put(slot, oldCfg) })

	_, statErr := os.Stat(d.cgroupLinkPin(cg.ID))
	already := statErr == nil
	// Every program of the table that applies to the settings (sidecar
	// rows follow the mode, the accounting rows account-only), attached
	// before those that no longer apply are detached: a change of mode
	// leaves no moment without accounting. This also completes a cgroup
	// enabled before a program was added.
	undoPrograms, err := d.convergePrograms(cg, slot, cfg)
	undo = append(undo, undoPrograms...)
	if err != nil {
		return false, fmt.Errorf("enable %s: %w", cg.Path, err)
	}

	var tcAdded []string
	wantDev := map[tcDeviceKey]bool{}
	for _, dev := range devs {
		wantDev[dev.key] = true
		attached, err := d.attachTC(dev)
		if err != nil {
			return false, fmt.Errorf("enable %s: %w", cg.Path, err)
		}
		if attached {
			key := dev.key
			undo = append(undo, func() {
				var v tcDeviceValue
				if d.maps[PinTCDevices].Lookup(key, &v) == nil {
					d.detachTC(key, v)
				}
			})
		}
		if d.isTCUser(cg.ID, dev.key) {
			continue
		}
		if err := d.addTCUser(cg.ID, dev.key); err != nil {
			return false, fmt.Errorf("enable %s: record tc device: %w", cg.Path, err)
		}
		tcAdded = append(tcAdded, dev.String())
		key := tcUserKey{CgroupId: cg.ID, Dev: dev.key}
		undo = append(undo, func() { d.maps[PinTCUsers].Delete(key) })
	}

	// The devices are exactly those given: the cgroup stops asking for
	// the others, and a device no enabled cgroup asks for any more is
	// detached (last, since it cannot be undone).
	var tcDropped int
	detached, err := d.releaseTCUsers(func(k tcUserKey) bool {
		drop := k.CgroupId == cg.ID && !wantDev[k.Dev]
		if drop {
			tcDropped++
		}
		return drop
	})
	if err != nil {
		return false, fmt.Errorf("enable %s: release tc devices: %w", cg.Path, err)
	}

	// Servers that were listening before this call: their listeners
	// must be known non-blocking for accepted sockets to pair.
	if _, err := d.refreshListeners([]cgroup.Cgroup{cg}, false); err != nil {
		d.listenerWarnings.Warn(d.log, cg.Path, "cannot read the listeners of the cgroup's processes: their connections take the normal TCP path", err, zap.String("cgroup", cg.Path))
	} else {
		d.listenerWarnings.Clear(cg.Path)
	}

	if already {
		// Info shows what changed; an enable that changes nothing (the
		// daemon's every rescan) is debug.
		if oldCfg == cfg && len(tcAdded) == 0 && tcDropped == 0 {
			d.log.Debug("cgroup already enabled, nothing changed", zap.String("cgroup", cg.Path), zap.Uint64("cgroup_id", cg.ID))
			return false, nil
		}
		d.log.Info("cgroup settings changed", zap.String("cgroup", cg.Path), zap.Uint64("cgroup_id", cg.ID),
			zap.Bool("settings_changed", oldCfg != cfg), zap.Strings("tc_devices_added", tcAdded),
			zap.Int("tc_devices_dropped", tcDropped), zap.Stringers("tc_devices_detached", detached))
		return false, nil
	}
	d.log.Info("enabled cgroup", zap.String("cgroup", cg.Path), zap.Uint64("cgroup_id", cg.ID))
	return true, nil
}

// Disable detaches cg's sock_ops program: new sockets of cg are no longer
// accelerated. Sockets already in the sockhash stay there and keep being
// redirected until they close, so no byte in flight is lost. It reports
// false when cg was not enabled.
func (d *Dataplane) Disable(cgroupID uint64) (bool, error) {
	l, err := lock.Exclusive(d.pinDir)
	if err != nil {
		return false, err
	}
	defer l.Unlock()
	return d.disableLocked(cgroupID)
}

func (d *Dataplane) disableLocked(cgroupID uint64) (bool, error) {
	if _, err := os.Stat(d.cgroupLinkPin(cgroupID)); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	// Every program of the table, sock_ops (what marks the cgroup
	// enabled) last, so that a failure leaves the cgroup listed.
	for i := len(cgroupPrograms) - 1; i >= 0; i-- {
		if err := d.detachCgroupProgram(cgroupID, cgroupPrograms[i]); err != nil {
			return false, fmt.Errorf("disable cgroup id %d: %w", cgroupID, err)
		}
	}
	if _, err := d.releaseTCUsers(func(k tcUserKey) bool { return k.CgroupId == cgroupID }); err != nil {
		return false, fmt.Errorf("disable cgroup id %d: %w", cgroupID, err)
	}
	// The cgroup keeps its slot: its live sockets still count there.
	if slot, ok, err := d.slotOf(cgroupID); err != nil {
		return false, fmt.Errorf("disable cgroup id %d: %w", cgroupID, err)
	} else if ok {
		if err := d.maps[PinCgroupConfig].Put(slot, cgroupConfig{}); err != nil {
			return false, fmt.Errorf("disable cgroup id %d: clear its settings: %w", cgroupID, err)
		}
		if err := d.forgetListeners(slot); err != nil {
			return false, fmt.Errorf("disable cgroup id %d: %w", cgroupID, err)
		}
		if err := d.forgetIntercepts(slot); err != nil {
			return false, fmt.Errorf("disable cgroup id %d: %w", cgroupID, err)
		}
	}
	d.log.Info("disabled cgroup", zap.Uint64("cgroup_id", cgroupID))
	return true, nil
}

// EnabledCgroupIDs returns the ids of the enabled cgroups.
func (d *Dataplane) EnabledCgroupIDs() ([]uint64, error) {
	entries, err := os.ReadDir(d.pin(DirCgroups))
	if err != nil {
		return nil, fmt.Errorf("list enabled cgroups: %w", err)
	}
	var ids []uint64
	for _, e := range entries {
		id, err := strconv.ParseUint(e.Name(), 10, 64)
		if err != nil {
			continue
		}
		ids = append(ids, id)
	}
	return ids, nil
}

// Uninstall detaches every program and removes every pin. Sockets already
// in the sockhash are not removed from it (that would discard the bytes
// their readers have not read yet): they keep their redirection until they
// close, and the kernel frees the sockhash after the last one. On return d
// is closed.
func (d *Dataplane) Uninstall() error {
	l, err := lock.Exclusive(d.pinDir)
	if err != nil {
		return err
	}
	defer l.Unlock()
	defer d.Close()

	ids, err := d.EnabledCgroupIDs()
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, id := range ids {
		if _, err := d.disableLocked(id); err != nil {
			return fmt.Errorf("uninstall: %w", err)
		}
	}
	if _, err := d.releaseTCUsers(func(tcUserKey) bool { return true }); err != nil {
		return fmt.Errorf("uninstall: %w", err)
	}
	// Link pins no program of this binary names (one it no longer
	// attaches) are detached all the same: uninstall leaves nothing.
	if entries, err := os.ReadDir(d.pin(DirCgroups)); err == nil {
		for _, e := range entries {
			path := filepath.Join(d.pin(DirCgroups), e.Name())
			if err := unpinLink(path); err != nil {
				return fmt.Errorf("uninstall: unpin %s: %w", path, err)
			}
		}
	}

	// Installs of layout 4 and before pinned a read-progress tracer.
	if l, err := link.LoadPinnedLink(d.pin(legacyPinRecvLink), nil); err == nil {
		err = l.Unpin()
		l.Close()
		if err != nil {
			return fmt.Errorf("uninstall: unpin %s: %w", legacyPinRecvLink, err)
		}
	}

	if err := unpinLink(d.pin(PinStackReadLink)); err != nil {
		return fmt.Errorf("uninstall: unpin %s: %w", d.pin(PinStackReadLink), err)
	}

	linkPin := d.pin(PinSkMsgLink)
	progPin := d.pin(PinSkMsg)
	if l, err := link.LoadPinnedLink(linkPin, nil); err == nil {
		err = l.Unpin()
		l.Close()
		if err != nil {
			return fmt.Errorf("uninstall: unpin %s: %w", linkPin, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("uninstall: open %s: %w", linkPin, err)
	} else if prog, err := ebpf.LoadPinnedProgram(progPin, nil); err == nil {
		err = detachSkMsgLegacy(d.maps[PinSockhash], prog)
		prog.Close()
		if err != nil {
			return fmt.Errorf("uninstall: detach sk_msg program: %w", err)
		}
	}

	for _, name := range append([]string{PinSkMsg, PinStackRead, DirCgroups, DirTC, PinLayout}, mapNames...) {
		path := d.pin(name)
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("uninstall: remove %s: %w", path, err)
		}
	}
	if err := os.Remove(d.pinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("uninstall: remove %s: %w", d.pinDir, err)
	}
	d.log.Info("uninstalled", zap.String("pin_dir", d.pinDir))
	return nil
}
