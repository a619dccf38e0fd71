package soak

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// pods: two lifecycles, half a cycle apart, each making a pair of pods
// joined by a veth (10.27.N.1 and 10.27.N.2), enabling both (one with TC
// accounting on its veth every other time), connecting pod to pod for
// 10 s, then deleting them in one of three ways (see podRemovals).
func runPods(ctx context.Context, k *kind) {
	var wg sync.WaitGroup
	for slot := 0; slot < 2; slot++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if slot == 1 {
				sleep(ctx, 5*time.Second)
			}
			for n := 0; ctx.Err() == nil; n++ {
				if err := k.podPairCycle(ctx, slot, n); err != nil {
					k.fail(err)
					sleep(ctx, time.Second)
				}
			}
		}()
	}
	wg.Wait()
}

var podRemovals = []string{
	"disabled, then deleted",
	"deleted while enabled, then disabled by id",
	"disabled with its listener and a connection open, which close while it is disabled, then deleted",
}

func (k *kind) podPairCycle(ctx context.Context, slot, n int) (err error) {
	e := k.e
	idx := 1 + slot*120 + n%120
	name := fmt.Sprintf("p%d-%d", slot, n)
	removal := n % len(podRemovals)
	a, err := e.newPod(k.name, name+"a", true)
	if err != nil {
		return err
	}
	b, err := e.newPod(k.name, name+"b", true)
	if err != nil {
		e.deletePod(a)
		k.forget(a.cg.ID)
		return err
	}
	addrA := netip.AddrFrom4([4]byte{10, 27, byte(idx), 1})
	addrB := netip.AddrFrom4([4]byte{10, 27, byte(idx), 2})
	vethA, vethB := fmt.Sprintf("sk27a%d", idx), fmt.Sprintf("sk27b%d", idx)
	tcNote := ""
	if n%2 == 1 {
		tcNote = ", TC on its veth"
	}
	e.reg.setCgroupNote(a.cg.ID, "client pod"+tcNote+", "+podRemovals[removal])
	e.reg.setCgroupNote(b.cg.ID, "server pod, "+podRemovals[removal])
	e.reg.noteNetns(a.netns.cookie, fmt.Sprintf("pod %sa: client pod%s, %s", name, tcNote, podRemovals[removal]))
	e.reg.noteNetns(b.netns.cookie, fmt.Sprintf("pod %sb: server pod, %s", name, podRemovals[removal]))
	var s *server
	defer func() {
		if s != nil {
			k.closeServer(s)
		}
		if removal != 1 {
			e.dp.Disable(a.cg.ID)
			e.dp.Disable(b.cg.ID)
		}
		err = joinErr(err, e.deletePod(a), e.deletePod(b))
		if removal == 1 {
			_, err1 := e.dp.Disable(a.cg.ID)
			_, err2 := e.dp.Disable(b.cg.ID)
			err = joinErr(err, err1, err2)
		}
		err = joinErr(err, e.refreshNodeAddrs())
		k.forget(a.cg.ID)
		k.forget(b.cg.ID)
		k.churnEvents.Add(1)
	}()
	if err := linkPods(a, addrA, vethA, b, addrB, vethB); err != nil {
		return err
	}
	e.reg.addAddr(addrA, k.name)
	e.reg.addAddr(addrB, k.name)
	optsA := dataplane.EnableOptions{NoProbation: true}
	if n%2 == 1 {
		optsA.TCDevices = []dataplane.TCDevice{{NetnsPath: a.netns.ns.Path(), Name: vethA}}
	}
	if err := e.enable(a.cg, optsA); err != nil {
		return err
	}
	if err := e.enable(b.cg, dataplane.EnableOptions{NoProbation: true}); err != nil {
		return err
	}
	if err := e.refreshNodeAddrs(); err != nil {
		return err
	}
	addr := netip.AddrPortFrom(addrB, k.e.reg.port(k.name))
	e.reg.noteAddr(addr, fmt.Sprintf("pods %s, %s", name, podRemovals[removal]))
	if s, err = k.echoServer(where{cg: b.cg, ns: b.netns}, addr, nil); err != nil {
		return err
	}
	from := where{cg: a.cg, ns: a.netns}
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	workers(lctx, 2, 20*time.Millisecond, uint64(10+slot), func(rng *rand.Rand) {
		if rng.IntN(8) == 0 {
			k.longLived(lctx, rng, from, addr, 3+rng.IntN(10), 100*time.Millisecond)
			return
		}
		k.echoOnce(rng, from, addr, nil)
	})
	cancel()
	if removal == 2 {
		k.acrossDisable(from, addr, a.cg.ID, b.cg.ID)
	}
	return nil
}

// acrossDisable opens a connection to addr from w, checks a round trip,
// disables the cgroups ids, checks another round trip and closes it: the
// connection's sockets close while their cgroups are disabled.
func (k *kind) acrossDisable(from where, addr netip.AddrPort, ids ...uint64) {
	c, err := k.e.dial(from, addr, connectTimeout, nil)
	if err != nil {
		k.result(err, 0)
		return
	}
	defer c.Close()
	rng := rand.New(rand.NewPCG(uint64(addr.Port()), 1))
	msg := payload(rng, 1+rng.IntN(16<<10))
	err1 := roundTrip(c, msg, time.Now().Add(connDeadline))
	for _, id := range ids {
		if _, err := k.e.dp.Disable(id); err != nil {
			k.fail(err)
		}
	}
	err2 := roundTrip(c, msg, time.Now().Add(connDeadline))
	k.result(joinErr(err1, err2), 2*len(msg))
}

func joinErr(errs ...error) error { return errors.Join(errs...) }

// linkPods joins two pods with a veth pair and gives each its address
// (/24).
func linkPods(a *pod, addrA netip.Addr, nameA string, b *pod, addrB netip.Addr, nameB string) error {
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: nameA}, PeerName: nameB}
	err := a.netns.ns.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		peer, err := netlink.LinkByName(nameB)
		if err != nil {
			return err
		}
		return netlink.LinkSetNsFd(peer, int(b.netns.ns.Fd()))
	})
	if err != nil {
		return fmt.Errorf("create veth %s/%s: %w", nameA, nameB, err)
	}
	for _, side := range []struct {
		p    *pod
		name string
		addr netip.Addr
	}{{a, nameA, addrA}, {b, nameB, addrB}} {
		err := side.p.netns.ns.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName(side.name)
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: side.addr.AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
				return err
			}
			return netlink.LinkSetUp(l)
		})
		if err != nil {
			return fmt.Errorf("configure %s: %w", side.name, err)
		}
	}
	return nil
}

// cgroups: one cgroup a second (about), enabled in one of four modes,
// with a listener and a few connections inside it, then removed in one of
// four ways: disabled, then removed; removed while enabled, then disabled
// by id; removed with a connection still open; or disabled with its
// listener and a connection open, which then close while it is disabled.
func runCgroups(ctx context.Context, k *kind) {
	modes := []struct {
		name string
		opts dataplane.EnableOptions
	}{
		{"no probation", dataplane.EnableOptions{NoProbation: true}},
		{"probation", dataplane.EnableOptions{}},
		{"account-only", dataplane.EnableOptions{AccountOnly: true}},
		{"all connections", dataplane.EnableOptions{NoProbation: true, AllConnections: true}},
	}
	rng := rand.New(rand.NewPCG(12, 12))
	for n := 0; ctx.Err() == nil; n++ {
		mode := modes[n%len(modes)]
		removal := (n / len(modes)) % len(cgroupRemovals)
		if err := k.cgroupCycle(ctx, rng, n, mode.name, mode.opts, removal); err != nil {
			k.fail(fmt.Errorf("cgroup %d (%s, %s): %w", n, mode.name, cgroupRemovals[removal], err))
		}
		sleep(ctx, time.Duration(200+rng.IntN(600))*time.Millisecond)
	}
}

var cgroupRemovals = []string{
	"disabled, then removed",
	"removed while enabled, the install upgraded, then disabled by id",
	"removed with a connection open, disabled after it closed",
	"disabled with its listener and a connection open, which close while it is disabled",
}

func (k *kind) cgroupCycle(ctx context.Context, rng *rand.Rand, n int, mode string, opts dataplane.EnableOptions, removal int) (err error) {
	e := k.e
	name := fmt.Sprintf("c%d", n)
	cg, err := e.newCgroup(k.name, name, true)
	if err != nil {
		return err
	}
	note := mode + ", " + cgroupRemovals[removal]
	e.reg.setCgroupNote(cg.ID, note)
	defer func() {
		k.forget(cg.ID)
		k.churnEvents.Add(1)
	}()
	if err := e.enable(cg, opts); err != nil {
		e.removeCgroup(cg)
		return err
	}
	w := where{cg: cg, ns: e.lo}
	// An address of its own (127.1.x.y), so that what a map keeps names
	// the cgroup.
	addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 1, byte(n / 250 % 250), byte(1 + n%250)}), e.reg.port(k.name))
	e.reg.noteAddr(addr, name+": "+note)
	s, err := k.echoServer(w, addr, nil)
	if err != nil {
		e.dp.Disable(cg.ID)
		e.removeCgroup(cg)
		return err
	}
	for i := 0; i < 2+rng.IntN(4); i++ {
		k.echoOnce(rng, w, addr, nil)
	}
	switch removal {
	case 0:
		k.closeServer(s)
		_, err1 := e.dp.Disable(cg.ID)
		return joinErr(err1, e.removeCgroup(cg))
	case 1:
		k.closeServer(s)
		err1 := e.removeCgroup(cg)
		// An upgrade while the removed cgroup is still enabled (the
		// daemon notices a removed cgroup at its next rescan).
		if _, err := e.dp.Upgrade(); err != nil {
			k.fail(fmt.Errorf("upgrade after %s was removed while enabled: %w", name, e.describe(err)))
		}
		_, err2 := e.dp.Disable(cg.ID)
		return joinErr(err1, err2)
	case 2:
		c, err := e.dial(w, addr, connectTimeout, nil)
		if err != nil {
			k.closeServer(s)
			e.removeCgroup(cg)
			e.dp.Disable(cg.ID)
			return err
		}
		msg := payload(rng, 1+rng.IntN(16<<10))
		err1 := roundTrip(c, msg, time.Now().Add(connDeadline))
		err2 := e.removeCgroup(cg)
		err3 := roundTrip(c, msg, time.Now().Add(connDeadline))
		c.Close()
		k.result(joinErr(err1, err3), 2*len(msg))
		k.closeServer(s)
		_, err4 := e.dp.Disable(cg.ID)
		return joinErr(err2, err4)
	default:
		k.acrossDisable(w, addr, cg.ID)
		k.closeServer(s)
		return e.removeCgroup(cg)
	}
}

// toggle: long-lived connections (and short ones) between two enabled
// cgroups while, every 2 to 4 s, one of them is disabled or enabled
// again (in another mode for a while), or the whole install is upgraded
// in place; now and then the listener is replaced, once while its cgroup
// is disabled, once while it is enabled. At the end both are enabled as
// setup left them, then the last listener closes.
func runToggle(ctx context.Context, k *kind) {
	e := k.e
	srv, cli := k.static["srv"], k.static["cli"]
	const churn = "disabled, enabled and upgraded every 2 to 4 s with connections open"
	e.reg.setCgroupNote(srv.ID, churn)
	e.reg.setCgroupNote(cli.ID, churn)
	var cur atomic.Pointer[netip.AddrPort]
	var servers sync.WaitGroup
	var current *server
	var currentAddr netip.AddrPort
	srvState := "enabled"
	// replace makes a new listener and closes the current one (its
	// connections end on their own, waited for in the background).
	replace := func() {
		addr := loAddr(e.reg.port(k.name))
		e.reg.noteAddr(addr, "listener made while the server's cgroup was "+srvState)
		s, err := k.echoServer(k.lo("srv"), addr, nil)
		if err != nil {
			k.fail(err)
			return
		}
		old, oldAddr := current, currentAddr
		current, currentAddr = s, addr
		cur.Store(&addr)
		if old != nil {
			// Closed half a second later, so that a client that read the
			// old address just before does not find it closed.
			e.reg.noteAddr(oldAddr, e.reg.noteOf(oldAddr)+", closed while it was "+srvState)
			servers.Add(1)
			go func() {
				defer servers.Done()
				time.Sleep(500 * time.Millisecond)
				k.closeServer(old)
			}()
		}
	}
	replace()
	if current == nil {
		return
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		workers(ctx, 3, 20*time.Millisecond, 13, func(rng *rand.Rand) {
			addr := *cur.Load()
			if rng.IntN(3) > 0 {
				k.longLived(ctx, rng, k.lo("cli"), addr, 20+rng.IntN(40), 100*time.Millisecond)
				return
			}
			k.echoOnce(rng, k.lo("cli"), addr, nil)
		})
	}()
	setSrv := func(state string, err error) error {
		if err == nil {
			srvState = state
		}
		return err
	}
	actions := []struct {
		name string
		do   func() error
	}{
		{"disable server", func() error { _, err := e.dp.Disable(srv.ID); return setSrv("disabled", err) }},
		{"enable server", func() error { return setSrv("enabled", e.enable(srv, *noProbation)) }},
		{"disable client", func() error { _, err := e.dp.Disable(cli.ID); return err }},
		{"enable client", func() error { return e.enable(cli, *noProbation) }},
		{"upgrade", func() error { _, err := e.dp.Upgrade(); return err }},
		{"server account-only", func() error {
			return setSrv("account-only", e.enable(srv, dataplane.EnableOptions{AccountOnly: true}))
		}},
		{"server accelerated", func() error { return setSrv("enabled", e.enable(srv, *noProbation)) }},
		{"disable server, new listener", func() error {
			_, err := e.dp.Disable(srv.ID)
			err = setSrv("disabled", err)
			replace()
			return err
		}},
		{"enable server, new listener", func() error {
			err := setSrv("enabled", e.enable(srv, *noProbation))
			replace()
			return err
		}},
	}
	rng := rand.New(rand.NewPCG(14, 14))
	for i := 0; ctx.Err() == nil; i++ {
		sleep(ctx, time.Duration(2000+rng.IntN(2000))*time.Millisecond)
		if ctx.Err() != nil {
			break
		}
		a := actions[i%len(actions)]
		start := time.Now()
		if err := a.do(); err != nil {
			k.fail(fmt.Errorf("%s: %w", a.name, e.describe(err)))
		}
		k.churnEvents.Add(1)
		k.logger().Debug("toggle", zap.String("action", a.name), zap.Duration("took", time.Since(start)))
	}
	wg.Wait()
	// As setup left them, then the last listener goes.
	for _, cg := range []cgroup.Cgroup{srv, cli} {
		if err := e.enable(cg, *noProbation); err != nil {
			k.fail(fmt.Errorf("enable %s again: %w", cg.Path, err))
		}
	}
	srvState = "enabled"
	e.reg.noteAddr(currentAddr, e.reg.noteOf(currentAddr)+", closed at the end, enabled")
	k.closeServer(current)
	servers.Wait()
}

// Sidecar ports: the istio preset's outbound port, and the port the apps
// connect to (their original destination).
const (
	meshSidecarPort = 15001
	meshAppPort     = 80
)

// mesh: a pod in intercept mode (the istio preset: its connects go to
// 127.0.0.1:15001, where the "sidecar", a listener of the pod, answers
// SO_ORIGINAL_DST and echoes), 2 apps connecting to 10.66.x.y:80 for 15
// s; then the pod is deleted (disabled first, or removed and disabled by
// id) and made anew.
func runMesh(ctx context.Context, k *kind) {
	for n := 0; ctx.Err() == nil; n++ {
		if err := k.meshCycle(ctx, n); err != nil {
			k.fail(err)
			sleep(ctx, time.Second)
		}
	}
}

var meshRemovals = []string{
	"disabled, then deleted",
	"deleted while enabled, then disabled by id",
	"disabled with an app connection open, which closes while it is disabled, then deleted",
}

func (k *kind) meshCycle(ctx context.Context, n int) (err error) {
	e := k.e
	removal := n % len(meshRemovals)
	p, err := e.newPod(k.name, fmt.Sprintf("m%d", n), true)
	if err != nil {
		return err
	}
	e.reg.setCgroupNote(p.cg.ID, "intercept mode, "+meshRemovals[removal])
	e.reg.noteNetns(p.netns.cookie, fmt.Sprintf("mesh pod m%d: intercept mode, %s", n, meshRemovals[removal]))
	var s *server
	defer func() {
		if s != nil {
			k.closeServer(s)
		}
		if removal != 1 {
			e.dp.Disable(p.cg.ID)
		}
		err = joinErr(err, e.deletePod(p))
		if removal == 1 {
			_, derr := e.dp.Disable(p.cg.ID)
			err = joinErr(err, derr)
		}
		k.forget(p.cg.ID)
		k.churnEvents.Add(1)
	}()
	mesh := dataplane.MeshPresets["istio"]
	mesh.Intercept = true
	if err := e.enable(p.cg, dataplane.EnableOptions{Mesh: &mesh, NoProbation: true}); err != nil {
		return err
	}
	w := where{cg: p.cg, ns: p.netns}
	l, err := e.listen(w, loAddr(meshSidecarPort), nil)
	if err != nil {
		return err
	}
	s = serve(l, func(c net.Conn) { k.serverCheck(sidecar(c.(*net.TCPConn))) })
	lctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	workers(lctx, 2, 20*time.Millisecond, uint64(20+n), func(rng *rand.Rand) {
		c, err := k.appDial(w, rng)
		if err != nil {
			k.result(err, 0)
			return
		}
		defer c.Close()
		data := payload(rng, payloadSize(rng))
		k.result(exchange(c, data, 1+rng.IntN(64<<10), time.Now().Add(connDeadline)), len(data))
	})
	cancel()
	if removal == 2 {
		rng := rand.New(rand.NewPCG(uint64(n), 2))
		c, err := k.appDial(w, rng)
		if err != nil {
			k.result(err, 0)
			return nil
		}
		msg := payload(rng, 1+rng.IntN(16<<10))
		err1 := roundTrip(c, msg, time.Now().Add(connDeadline))
		_, err2 := e.dp.Disable(p.cg.ID)
		err3 := roundTrip(c, msg, time.Now().Add(connDeadline))
		c.Close()
		k.result(joinErr(err1, err3), 2*len(msg))
		if err2 != nil {
			return err2
		}
	}
	return nil
}

// appDial connects an app of the pod at w to a random 10.66.x.y:80,
// which intercept mode sends to the sidecar, and tells the sidecar where
// it meant to go.
func (k *kind) appDial(w where, rng *rand.Rand) (*net.TCPConn, error) {
	dst := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 66, byte(rng.IntN(256)), byte(1 + rng.IntN(254))}), meshAppPort)
	c, err := k.e.dial(w, dst, connectTimeout, nil)
	if err != nil {
		return nil, err
	}
	if got := c.RemoteAddr().String(); got != loAddr(meshSidecarPort).String() {
		c.Close()
		return nil, fmt.Errorf("the app's connect to %s went to %s, not to the sidecar", dst, got)
	}
	hdr := make([]byte, 6)
	a4 := dst.Addr().As4()
	copy(hdr, a4[:])
	binary.BigEndian.PutUint16(hdr[4:], dst.Port())
	c.SetDeadline(time.Now().Add(connDeadline))
	if _, err := c.Write(hdr); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// sidecar is the sidecar's end of an intercepted connection: it checks
// SO_ORIGINAL_DST against what the app says it connected to, then echoes.
func sidecar(c *net.TCPConn) error {
	dst, err := origDst(c)
	if err != nil {
		return fmt.Errorf("SO_ORIGINAL_DST: %w", err)
	}
	c.SetDeadline(time.Now().Add(connDeadline))
	var want [6]byte
	if _, err := readFullConn(c, want[:]); err != nil {
		return err
	}
	if got := netip.AddrPortFrom(netip.AddrFrom4([4]byte(want[:4])), binary.BigEndian.Uint16(want[4:])); got != dst {
		return integrityf("SO_ORIGINAL_DST says %s, the app connected to %s", dst, got)
	}
	return echo(c, time.Now().Add(connDeadline))
}

func readFullConn(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := c.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// origDst asks the sidecar's accepted socket where the app was going
// (SO_ORIGINAL_DST: a struct sockaddr_in).
func origDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var errno unix.Errno
	buf := make([]byte, 16)
	rc.Control(func(fd uintptr) {
		n := uint32(len(buf))
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IP, unix.SO_ORIGINAL_DST,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	})
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), binary.BigEndian.Uint16(buf[2:4])), nil
}
