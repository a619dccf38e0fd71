package soak

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// paired: echo connections between non-blocking sockets of two enabled
// cgroups (and within one), short transfers and long-lived connections.
func setupPaired(k *kind) error { return setupPlainPair(k) }

func runPaired(ctx context.Context, k *kind) {
	addr := loAddr(k.e.reg.port(k.name))
	s, err := k.echoServer(k.lo("srv"), addr, nil)
	if err != nil {
		k.fail(err)
		return
	}
	defer k.closeServer(s)
	workers(ctx, 3, 20*time.Millisecond, 1, func(rng *rand.Rand) {
		from := k.lo("cli")
		if rng.IntN(4) == 0 {
			from = k.lo("srv") // both ends in one cgroup
		}
		if rng.IntN(10) == 0 {
			k.longLived(ctx, rng, from, addr, 5+rng.IntN(20), 50*time.Millisecond)
			return
		}
		k.echoOnce(rng, from, addr, nil)
	})
}

// probation: a server cgroup enabled with the default probation; its
// listener is made anew every 10 s, so each starts on probation.
func setupProbation(k *kind) error {
	if err := k.newStatic("srv", &dataplane.EnableOptions{}); err != nil {
		return err
	}
	return k.newStatic("cli", noProbation)
}

func runProbation(ctx context.Context, k *kind) {
	for ctx.Err() == nil {
		addr := loAddr(k.e.reg.port(k.name))
		s, err := k.echoServer(k.lo("srv"), addr, nil)
		if err != nil {
			k.fail(err)
			sleep(ctx, time.Second)
			continue
		}
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		workers(lctx, 1, 20*time.Millisecond, 2, func(rng *rand.Rand) { k.echoOnce(rng, k.lo("cli"), addr, nil) })
		cancel()
		k.closeServer(s)
		k.churnEvents.Add(1)
	}
}

// blocking: blocking sockets (no O_NONBLOCK, raw syscalls) at either or
// both ends, in enabled cgroups: never accelerated, every byte intact.
func setupBlocking(k *kind) error { return setupPlainPair(k) }

func runBlocking(ctx context.Context, k *kind) {
	bAddr := loAddr(k.e.reg.port(k.name))
	bs, err := k.blockingServer(k.lo("srv"), bAddr)
	if err != nil {
		k.fail(err)
		return
	}
	defer bs.close()
	gAddr := loAddr(k.e.reg.port(k.name))
	gs, err := k.echoServer(k.lo("srv"), gAddr, nil)
	if err != nil {
		k.fail(err)
		return
	}
	defer k.closeServer(gs)
	workers(ctx, 2, 20*time.Millisecond, 3, func(rng *rand.Rand) {
		data := payload(rng, payloadSize(rng))
		switch rng.IntN(3) {
		case 0: // blocking client, blocking server
			k.result(k.blockingExchange(k.lo("cli"), bAddr, data), len(data))
		case 1: // blocking client, non-blocking server
			k.result(k.blockingExchange(k.lo("cli"), gAddr, data), len(data))
		default: // non-blocking client, blocking server
			k.echoOnce(rng, k.lo("cli"), bAddr, nil)
		}
	})
}

// blockingExchange is exchange over a blocking socket with raw syscalls.
func (k *kind) blockingExchange(from where, addr netip.AddrPort, data []byte) error {
	fd, err := k.e.dialBlocking(from, addr, connDeadline)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	werr := make(chan error, 1)
	go func() {
		for off := 0; off < len(data); {
			n, err := unix.Write(fd, data[off:min(off+32<<10, len(data))])
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				werr <- fmt.Errorf("blocking write at %d of %d: %w", off, len(data), err)
				return
			}
			off += n
		}
		werr <- unix.Shutdown(fd, unix.SHUT_WR)
	}()
	buf := make([]byte, 64<<10)
	got := 0
	var rerr error
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			rerr = fmt.Errorf("blocking read at %d of %d: %w", got, len(data), err)
			break
		}
		if n == 0 {
			break
		}
		if got+n > len(data) {
			rerr = integrityf("blocking echo sent %d bytes more than the %d written", got+n-len(data), len(data))
			break
		}
		if d := firstDiff(buf[:n], data[got:got+n]); d < n {
			rerr = integrityf("blocking echo byte %d of %d differs", got+d, len(data))
			break
		}
		got += n
	}
	if err := <-werr; err != nil && rerr == nil {
		return err
	}
	if rerr != nil {
		return rerr
	}
	if got != len(data) {
		return integrityf("blocking echo ended after %d of %d bytes", got, len(data))
	}
	return nil
}

// rawServer is an echo server with a blocking listener and blocking
// accepted sockets (raw syscalls).
type rawServer struct {
	fd   int
	stop atomic.Bool
	wg   sync.WaitGroup
}

func (k *kind) blockingServer(w where, addr netip.AddrPort) (*rawServer, error) {
	fd, err := k.e.rawListen(w, addr, false, 128)
	if err != nil {
		return nil, err
	}
	// accept returns EAGAIN every 200 ms, to see stop.
	if err := setTimeouts(fd, 200*time.Millisecond); err != nil {
		unix.Close(fd)
		return nil, err
	}
	s := &rawServer{fd: fd}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for !s.stop.Load() {
			cfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
			if err != nil {
				continue
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer unix.Close(cfd)
				if err := blockingEcho(cfd); err != nil {
					k.fail(fmt.Errorf("blocking echo server %s: %w", addr, err))
				}
			}()
		}
	}()
	return s, nil
}

func (s *rawServer) close() {
	s.stop.Store(true)
	s.wg.Wait()
	unix.Close(s.fd)
}

func blockingEcho(fd int) error {
	if err := setTimeouts(fd, connDeadline); err != nil {
		return err
	}
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return unix.Shutdown(fd, unix.SHUT_WR)
		}
		for off := 0; off < n; {
			m, err := unix.Write(fd, buf[off:n])
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				return err
			}
			off += m
		}
	}
}

// accountonly: a listener of an account-only cgroup, connected to from a
// cgroup that is not enabled, from an accelerated one and from an
// account-only one.
func setupAccountOnly(k *kind) error {
	if err := k.newStatic("srv", &dataplane.EnableOptions{AccountOnly: true}); err != nil {
		return err
	}
	if err := k.newStatic("cli-ao", &dataplane.EnableOptions{AccountOnly: true}); err != nil {
		return err
	}
	if err := k.newStatic("cli-acc", noProbation); err != nil {
		return err
	}
	return k.newStatic("cli-plain", nil)
}

func runAccountOnly(ctx context.Context, k *kind) {
	addr := loAddr(k.e.reg.port(k.name))
	s, err := k.echoServer(k.lo("srv"), addr, nil)
	if err != nil {
		k.fail(err)
		return
	}
	defer k.closeServer(s)
	clients := []string{"cli-plain", "cli-acc", "cli-ao"}
	workers(ctx, 2, 20*time.Millisecond, 4, func(rng *rand.Rand) {
		k.echoOnce(rng, k.lo(clients[rng.IntN(len(clients))]), addr, nil)
	})
}

// halfOpenSource is the loopback address the aborted handshakes' SYNs
// come from when nothing answers their SYN-ACKs: the loopback namespace
// drops the RSTs sent to it (iptables), so the server's request sockets
// stay until they time out.
var halfOpenSource = netip.AddrFrom4([4]byte{127, 0, 0, 99})

// dropRSTsTo makes n drop the RSTs it sends to addr.
func dropRSTsTo(n *netns, addr netip.Addr) error {
	out, err := exec.Command("nsenter", "--net="+n.ns.Path(), "iptables", "-w", "-A", "OUTPUT", "-d", addr.String()+"/32",
		"-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP").CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables in %s: %v: %s", n.ns.Path(), err, out)
	}
	return nil
}

// aborted: handshakes that never finish and connections aborted before
// they are accepted, each variant to a listener of its own (so that what
// a map keeps names the variant).
func runAborted(ctx context.Context, k *kind) {
	if err := dropRSTsTo(k.e.lo, halfOpenSource); err != nil {
		k.note("SYNs from %s are answered with RST: %v", halfOpenSource, err)
	}
	variants := []string{
		"raw SYNs from " + halfOpenSource.String() + ", SYN-ACKs unanswered (half-open until they time out)",
		"raw SYNs from 127.0.0.1, SYN-ACKs answered with RST by the stack",
		"connect, then close with SO_LINGER 0 (RST) before accept",
		"connect, then close (FIN) before accept",
		"connect, a few bytes, then RST before accept",
	}
	addrs := make([]netip.AddrPort, len(variants))
	for i, v := range variants {
		addrs[i] = loAddr(k.e.reg.port(k.name))
		k.e.reg.noteAddr(addrs[i], v)
		l, err := k.e.listen(k.lo("srv"), addrs[i], nil)
		if err != nil {
			k.fail(err)
			return
		}
		s := serve(l, func(c net.Conn) {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.Copy(io.Discard, c)
		})
		defer k.closeServer(s)
	}
	workers(ctx, 1, 30*time.Millisecond, 5, func(rng *rand.Rand) {
		v := rng.IntN(len(variants))
		addr := addrs[v]
		switch v {
		case 0:
			k.result(k.e.sendSYNs(k.lo("cli"), halfOpenSource, addr, 4, rng), 0)
		case 1:
			k.result(k.e.sendSYNs(k.lo("cli"), netip.AddrFrom4([4]byte{127, 0, 0, 1}), addr, 4, rng), 0)
		default:
			c, err := k.e.dial(k.lo("cli"), addr, connectTimeout, nil)
			if err != nil {
				k.result(err, 0)
				return
			}
			if v == 4 {
				c.Write(payload(rng, 1+rng.IntN(4<<10)))
			}
			if v != 3 {
				c.SetLinger(0)
			}
			k.result(c.Close(), 0)
		}
	})
}

// rst: connections reset in the middle of a transfer. The client's first
// 13 bytes say what happens: a command, where in pattern its bytes come
// from, and after how many bytes the reset comes.
const (
	rstByServer = 'S' // the server reads n bytes, then resets
	rstByClient = 'C' // the client writes n bytes, then resets
	rstInEcho   = 'E' // the server echoes; the client resets after reading n
	rstHeader   = 13
)

func setupRST(k *kind) error {
	if err := setupPlainPair(k); err != nil {
		return err
	}
	for _, role := range []string{"srv", "cli"} {
		k.allowPass(role, "the other end of the pair was reset: a member whose peer is gone sends through the stack (by design)")
	}
	return nil
}

func runRST(ctx context.Context, k *kind) {
	addr := loAddr(k.e.reg.port(k.name))
	l, err := k.e.listen(k.lo("srv"), addr, nil)
	if err != nil {
		k.fail(err)
		return
	}
	s := serve(l, func(c net.Conn) { k.serverCheck(rstServe(c.(*net.TCPConn))) })
	defer k.closeServer(s)
	workers(ctx, 2, 20*time.Millisecond, 6, func(rng *rand.Rand) {
		c, err := k.e.dial(k.lo("cli"), addr, connectTimeout, nil)
		if err != nil {
			k.result(err, 0)
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(connDeadline))
		size := 1 + rng.IntN(1<<20)
		off := rng.IntN(len(pattern) - size)
		data := pattern[off : off+size]
		n := rng.IntN(size + 1)
		cmd := []byte{rstByServer, rstByClient, rstInEcho}[rng.IntN(3)]
		hdr := make([]byte, rstHeader)
		hdr[0] = cmd
		binary.LittleEndian.PutUint64(hdr[1:], uint64(off))
		binary.LittleEndian.PutUint32(hdr[9:], uint32(n))
		if _, err := c.Write(hdr); err != nil {
			k.result(err, 0)
			return
		}
		switch cmd {
		case rstByServer:
			_, werr := c.Write(data)
			_, rerr := readAll(c, nil)
			switch {
			case isIntegrity(rerr):
				k.result(rerr, 0)
			case werr != nil && !isReset(werr):
				k.result(werr, 0)
			case rerr != nil && !isReset(rerr):
				k.result(rerr, 0)
			default:
				k.result(nil, n)
			}
		case rstByClient:
			if _, err := c.Write(data[:n]); err != nil {
				k.result(err, 0)
				return
			}
			c.SetLinger(0)
			k.result(c.Close(), n)
		default:
			werr := make(chan error, 1)
			go func() { _, err := c.Write(data); werr <- err }()
			got := make([]byte, n)
			_, rerr := io.ReadFull(c, got)
			c.SetLinger(0)
			c.Close()
			<-werr // the reset ends it
			switch {
			case rerr != nil:
				k.result(rerr, 0)
			case firstDiff(got, data[:n]) < n:
				k.result(integrityf("echo byte %d of the %d read before the reset differs", firstDiff(got, data[:n]), n), n)
			default:
				k.result(nil, n)
			}
		}
	})
}

// rstServe is the server end of rst.
func rstServe(c *net.TCPConn) error {
	c.SetDeadline(time.Now().Add(connDeadline))
	hdr := make([]byte, rstHeader)
	if _, err := io.ReadFull(c, hdr); err != nil {
		return err
	}
	off := int(binary.LittleEndian.Uint64(hdr[1:]))
	n := int(binary.LittleEndian.Uint32(hdr[9:]))
	if off < 0 || off+n > len(pattern) {
		return integrityf("rst header names bytes %d+%d, outside the pattern", off, n)
	}
	switch hdr[0] {
	case rstByServer:
		got := make([]byte, n)
		if _, err := io.ReadFull(c, got); err != nil {
			return err
		}
		if d := firstDiff(got, pattern[off:off+n]); d < n {
			return integrityf("byte %d of the %d read before the server's reset differs", d, n)
		}
		c.SetLinger(0)
		return nil
	case rstByClient:
		// Everything up to the reset must be the pattern, and no more
		// than n bytes.
		got, err := readAll(c, pattern[off:off+n])
		if isIntegrity(err) {
			return err
		}
		if got > n {
			return integrityf("read %d bytes before the client's reset, it wrote %d", got, n)
		}
		return nil
	case rstInEcho:
		return echo(c, time.Now().Add(connDeadline))
	}
	return integrityf("rst header command %q", hdr[0])
}

// serverCheck records what a server end found: bytes not intact, or an
// error other than the resets and timeouts of a tolerant kind.
func (k *kind) serverCheck(err error) {
	switch {
	case err == nil:
	case isIntegrity(err):
		k.st.integrity.Add(1)
		k.st.mu.Lock()
		if len(k.st.badBytes) < keepErrors {
			k.st.badBytes = append(k.st.badBytes, "server: "+err.Error())
		}
		k.st.mu.Unlock()
	case k.tolerant && (isReset(err) || isTimeout(err)):
	default:
		k.fail(fmt.Errorf("server: %w", err))
	}
}

// backlog: connects (and bare SYNs) to a listener with backlog 1 that
// never accepts: two connections fill its queue, later SYNs are dropped.
// The listener is closed (resetting its queue) and made anew every 5 s.
func runBacklog(ctx context.Context, k *kind) {
	for ctx.Err() == nil {
		addr := loAddr(k.e.reg.port(k.name))
		k.e.reg.noteAddr(addr, "backlog 1, never accepting")
		fd, err := k.e.rawListen(k.lo("srv"), addr, true, 1)
		if err != nil {
			k.fail(err)
			sleep(ctx, time.Second)
			continue
		}
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		workers(lctx, 1, 20*time.Millisecond, 7, func(rng *rand.Rand) {
			if rng.IntN(4) == 0 {
				k.result(k.e.sendSYNs(k.lo("cli"), netip.AddrFrom4([4]byte{127, 0, 0, 1}), addr, 2, rng), 0)
				return
			}
			c, err := k.e.dial(k.lo("cli"), addr, 300*time.Millisecond, nil)
			if err != nil {
				k.result(err, 0)
				return
			}
			c.SetDeadline(time.Now().Add(time.Second))
			n, err := c.Write(payload(rng, 1+rng.IntN(16<<10)))
			sleep(lctx, time.Duration(rng.IntN(100))*time.Millisecond)
			c.Close()
			k.result(err, n)
		})
		cancel()
		unix.Close(fd)
		k.churnEvents.Add(1)
	}
}

// reuseport: an SO_REUSEPORT group on one port whose members listen and
// close (with the connections in their queue) every 0.3 to 1.5 s; a new
// group on a new port every 30 s.
func runReuseport(ctx context.Context, k *kind) {
	reuse := func(fd int) error { return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) }
	for ctx.Err() == nil {
		addr := loAddr(k.e.reg.port(k.name))
		var members []*server
		add := func() {
			s, err := k.echoServer(k.lo("srv"), addr, reuse)
			if err != nil {
				k.fail(err)
				return
			}
			members = append(members, s)
			k.churnEvents.Add(1)
		}
		add()
		gctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			workers(gctx, 2, 10*time.Millisecond, 8, func(rng *rand.Rand) { k.echoOnce(rng, k.lo("cli"), addr, nil) })
		}()
		rng := rand.New(rand.NewPCG(8, 8))
		for gctx.Err() == nil {
			sleep(gctx, 300*time.Millisecond+time.Duration(rng.IntN(1200))*time.Millisecond)
			if len(members) < 4 && (len(members) <= 1 || rng.IntN(2) == 0) {
				add()
			} else if len(members) > 1 {
				i := rng.IntN(len(members))
				members[i].close(100 * time.Millisecond)
				members = append(members[:i], members[i+1:]...)
				k.churnEvents.Add(1)
			}
		}
		wg.Wait()
		cancel()
		for _, m := range members {
			m.close(serverGrace)
		}
	}
}

// rcvlowat: the late variant has cgroups of its own: a member that sets
// SO_RCVLOWAT after it joined is leaving, and both ends send through the
// stack while the pair dissolves (by design: see "Leaving" in
// docs/ARCHITECTURE.md).
func setupRcvlowat(k *kind) error {
	if err := setupPlainPair(k); err != nil {
		return err
	}
	for _, role := range []string{"late-srv", "late-cli"} {
		if err := k.newStatic(role, noProbation); err != nil {
			return err
		}
		k.allowPass(role, "a member that set SO_RCVLOWAT after it joined leaves its pair; both ends send through the stack meanwhile (by design)")
	}
	return nil
}

// rcvlowat: listeners and clients that set a stack-reader option
// (SO_RCVLOWAT, TCP_INQ, SO_OOBINLINE), before listen, after listen,
// before connect, or on an accepted member after its first bytes: each
// connection stays (or turns) plain TCP, and every byte arrives. A new
// listener every 3 s, each with one of the variants.
func runRcvlowat(ctx context.Context, k *kind) {
	setInt := func(level, opt int) func(int) error {
		return func(fd int) error { return unix.SetsockoptInt(fd, level, opt, 1) }
	}
	variants := []struct {
		name                 string
		beforeListen         func(int) error
		afterListen          func(int) error
		beforeConnect        func(int) error
		lateOnAcceptedMember bool
	}{
		{name: "SO_RCVLOWAT before listen", beforeListen: setInt(unix.SOL_SOCKET, unix.SO_RCVLOWAT)},
		{name: "SO_RCVLOWAT after listen", afterListen: setInt(unix.SOL_SOCKET, unix.SO_RCVLOWAT)},
		{name: "TCP_INQ before listen", beforeListen: setInt(unix.SOL_TCP, unix.TCP_INQ)},
		{name: "SO_OOBINLINE before listen", beforeListen: setInt(unix.SOL_SOCKET, unix.SO_OOBINLINE)},
		{name: "SO_RCVLOWAT on the client before connect", beforeConnect: setInt(unix.SOL_SOCKET, unix.SO_RCVLOWAT)},
		{name: "SO_RCVLOWAT on an accepted member after its first bytes", lateOnAcceptedMember: true},
	}
	for i := 0; ctx.Err() == nil; i++ {
		v := variants[i%len(variants)]
		srv, cli := "srv", "cli"
		if v.lateOnAcceptedMember {
			srv, cli = "late-srv", "late-cli"
		}
		addr := loAddr(k.e.reg.port(k.name))
		k.e.reg.noteAddr(addr, v.name)
		l, err := k.e.listen(k.lo(srv), addr, v.beforeListen)
		if err != nil {
			k.fail(fmt.Errorf("%s: %w", v.name, err))
			sleep(ctx, time.Second)
			continue
		}
		if v.afterListen != nil {
			rc, _ := l.SyscallConn()
			var serr error
			rc.Control(func(fd uintptr) { serr = v.afterListen(int(fd)) })
			if serr != nil {
				k.fail(fmt.Errorf("%s: %w", v.name, serr))
			}
		}
		s := serve(l, func(c net.Conn) {
			if v.lateOnAcceptedMember {
				k.serverCheck(lateOptionEcho(c.(*net.TCPConn)))
				return
			}
			k.serverCheck(echo(c, time.Now().Add(connDeadline)))
		})
		lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		workers(lctx, 1, 20*time.Millisecond, 9, func(rng *rand.Rand) { k.echoOnce(rng, k.lo(cli), addr, v.beforeConnect) })
		cancel()
		k.closeServer(s)
		k.churnEvents.Add(1)
	}
}

// lateOptionEcho echoes the first bytes it reads, sets SO_RCVLOWAT (a
// member then leaves its pair), and echoes the rest.
func lateOptionEcho(c *net.TCPConn) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(connDeadline))
	buf := make([]byte, 64<<10)
	set := false
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return werr
			}
			if !set {
				rc, _ := c.SyscallConn()
				var serr error
				rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1) })
				if serr != nil {
					return serr
				}
				set = true
			}
		}
		if errors.Is(err, io.EOF) {
			return c.CloseWrite()
		}
		if err != nil {
			return err
		}
	}
}
