package soak

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
)

// where a socket is created: its cgroup and network namespace.
type where struct {
	cg cgroup.Cgroup
	ns *netns
}

// socket creates a TCP socket in w (flags: unix.SOCK_NONBLOCK or 0).
func (e *env) socket(w where, flags int) (int, error) {
	var fd int
	err := e.gate.in(w.cg.Path, w.ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|flags, 0)
		return err
	})
	return fd, err
}

func sockaddr(a netip.AddrPort) *unix.SockaddrInet4 {
	return &unix.SockaddrInet4{Addr: a.Addr().As4(), Port: int(a.Port())}
}

// listen makes a non-blocking listener on addr, created in w, after
// before(fd) (options set before listen(); nil for none). Go's listeners
// set SO_REUSEADDR and use the largest backlog.
func (e *env) listen(w where, addr netip.AddrPort, before func(fd int) error) (*net.TCPListener, error) {
	var l net.Listener
	err := e.gate.in(w.cg.Path, w.ns, func() error {
		lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
			if before == nil {
				return nil
			}
			var serr error
			if err := c.Control(func(fd uintptr) { serr = before(int(fd)) }); err != nil {
				return err
			}
			return serr
		}}
		var err error
		l, err = lc.Listen(context.Background(), "tcp4", addr.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %s in %s: %w", addr, w.cg.Path, err)
	}
	return l.(*net.TCPListener), nil
}

// rawListen makes a listener with raw syscalls: blocking or not, with the
// given backlog.
func (e *env) rawListen(w where, addr netip.AddrPort, nonblock bool, backlog int) (int, error) {
	flags := 0
	if nonblock {
		flags = unix.SOCK_NONBLOCK
	}
	fd, err := e.socket(w, flags)
	if err != nil {
		return -1, err
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if err := unix.Bind(fd, sockaddr(addr)); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind %s: %w", addr, err)
	}
	if err := unix.Listen(fd, backlog); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// dial connects from w to addr with a non-blocking socket created in w,
// within timeout, after before(fd) (nil for none), and returns it as a Go
// connection (the same socket and file description: O_NONBLOCK stays).
func (e *env) dial(w where, addr netip.AddrPort, timeout time.Duration, before func(fd int) error) (*net.TCPConn, error) {
	fd, err := e.socket(w, unix.SOCK_NONBLOCK)
	if err != nil {
		return nil, err
	}
	if before != nil {
		if err := before(fd); err != nil {
			unix.Close(fd)
			return nil, err
		}
	}
	err = unix.Connect(fd, sockaddr(addr))
	if errors.Is(err, unix.EINPROGRESS) {
		err = waitConnected(fd, timeout)
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	f := os.NewFile(uintptr(fd), "soak")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// waitConnected waits until a non-blocking connect on fd completes.
func waitConnected(fd int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return unix.ETIMEDOUT
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(pfd, int(left.Milliseconds())+1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n > 0 {
			v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
			if err != nil {
				return err
			}
			if v != 0 {
				return unix.Errno(v)
			}
			return nil
		}
	}
}

// dialBlocking connects from w to addr with a blocking socket (raw
// syscalls, no O_NONBLOCK ever), whose sends, receives and connect time
// out after timeout (SO_SNDTIMEO, SO_RCVTIMEO).
func (e *env) dialBlocking(w where, addr netip.AddrPort, timeout time.Duration) (int, error) {
	fd, err := e.socket(w, 0)
	if err != nil {
		return -1, err
	}
	if err := setTimeouts(fd, timeout); err != nil {
		unix.Close(fd)
		return -1, err
	}
	for {
		err = unix.Connect(fd, sockaddr(addr))
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("connect to %s (blocking): %w", addr, err)
	}
	return fd, nil
}

func setTimeouts(fd int, d time.Duration) error {
	tv := unix.NsecToTimeval(d.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
		return err
	}
	return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
}

// integrityError is a byte that did not arrive intact: missing, extra,
// or different. Every other error is a connection error.
type integrityError struct{ msg string }

func (e *integrityError) Error() string { return e.msg }

func integrityf(format string, args ...any) error {
	return &integrityError{msg: fmt.Sprintf(format, args...)}
}

func isIntegrity(err error) bool {
	var ie *integrityError
	return errors.As(err, &ie)
}

// isReset reports whether err is what a connection reset or aborted by
// its peer gives.
func isReset(err error) bool {
	return errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EPIPE) || errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, unix.ECONNREFUSED) || errors.Is(err, unix.ECONNABORTED)
}

// pattern is the source of every payload: a payload is a slice of it at a
// random offset, so it needs no allocation and a shifted or repeated byte
// shows.
var pattern = func() []byte {
	b := make([]byte, 8<<20)
	r := rand.New(rand.NewPCG(27, 27))
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b
}()

// payload returns n bytes of pattern at a random offset.
func payload(rng *rand.Rand, n int) []byte {
	off := rng.IntN(len(pattern) - n)
	return pattern[off : off+n]
}

// payloadSize draws a message size: mostly small, sometimes up to 2 MiB.
func payloadSize(rng *rand.Rand) int {
	switch p := rng.IntN(100); {
	case p < 55:
		return 1 + rng.IntN(4<<10)
	case p < 88:
		return 4<<10 + rng.IntN(60<<10)
	case p < 98:
		return 64<<10 + rng.IntN(448<<10)
	default:
		return 1<<20 + rng.IntN(1<<20)
	}
}

// exchange writes data to c in chunks of up to chunk bytes while reading
// what an echo server sends back, half-closes, and expects the echo to be
// exactly data followed by EOF. A byte missing, extra or different is an
// integrityError (with its offset and the two sha256s).
func exchange(c *net.TCPConn, data []byte, chunk int, deadline time.Time) error {
	c.SetDeadline(deadline)
	werr := make(chan error, 1)
	go func() {
		for off := 0; off < len(data); {
			end := min(off+chunk, len(data))
			n, err := c.Write(data[off:end])
			off += n
			if err != nil {
				werr <- fmt.Errorf("write at %d of %d: %w", off, len(data), err)
				return
			}
		}
		werr <- c.CloseWrite()
	}()
	got, rerr := readAll(c, data)
	if err := <-werr; err != nil && rerr == nil {
		return err
	}
	if rerr != nil {
		return rerr
	}
	if got != len(data) {
		return integrityf("echo ended after %d of %d bytes", got, len(data))
	}
	return nil
}

// readAll reads c until EOF, comparing with want as it goes; it returns
// how many bytes it read.
func readAll(c net.Conn, want []byte) (int, error) {
	buf := make([]byte, 64<<10)
	got := 0
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if got+n > len(want) {
				return got, integrityf("echo sent %d bytes, %d more than the %d written", got+n, got+n-len(want), len(want))
			}
			if !bytes.Equal(buf[:n], want[got:got+n]) {
				return got, integrityf("echo byte %d of %d differs (sha256 of the %d bytes written %x)", got+firstDiff(buf[:n], want[got:got+n]), len(want), len(want), sha256.Sum256(want))
			}
			got += n
		}
		if errors.Is(err, io.EOF) {
			return got, nil
		}
		if err != nil {
			return got, fmt.Errorf("read at %d of %d: %w", got, len(want), err)
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

// roundTrip writes msg and reads its echo back (a message of a long-lived
// connection), comparing it byte for byte.
func roundTrip(c net.Conn, msg []byte, deadline time.Time) error {
	c.SetDeadline(deadline)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		werr <- err
	}()
	got := make([]byte, len(msg))
	_, rerr := io.ReadFull(c, got)
	if err := <-werr; err != nil {
		return fmt.Errorf("write %d bytes: %w", len(msg), err)
	}
	if rerr != nil {
		return fmt.Errorf("read the echo of %d bytes: %w", len(msg), rerr)
	}
	if !bytes.Equal(got, msg) {
		return integrityf("echo of a %d-byte message differs at byte %d", len(msg), firstDiff(got, msg))
	}
	return nil
}

// echo writes back what it reads from c until EOF, then half-closes and
// closes c. Reads and writes use Read and Write (never io.Copy between two
// TCP connections, which splices).
func echo(c net.Conn, deadline time.Time) error {
	defer c.Close()
	c.SetDeadline(deadline)
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, io.EOF) {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// server accepts on a listener until it is closed and runs handle on
// each connection, in a goroutine of its own.
type server struct {
	l    net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	open map[net.Conn]struct{}
}

func serve(l net.Listener, handle func(net.Conn)) *server {
	s := &server{l: l, open: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				// ECONNABORTED and friends: the next one.
				time.Sleep(time.Millisecond)
				continue
			}
			s.mu.Lock()
			s.open[c] = struct{}{}
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				handle(c)
				c.Close()
				s.mu.Lock()
				delete(s.open, c)
				s.mu.Unlock()
			}()
		}
	}()
	return s
}

// close closes the listener, waits up to grace for the handlers, then
// closes the connections still open and waits for the handlers to end.
// It returns how many connections it had to close.
func (s *server) close(grace time.Duration) int {
	s.l.Close()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return 0
	case <-time.After(grace):
	}
	s.mu.Lock()
	n := len(s.open)
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
	<-done
	return n
}

// sendSYNs sends n bare SYNs from src (a random port each) to dst with a
// raw socket created in w: handshakes that the client side never goes on
// with.
func (e *env) sendSYNs(w where, src netip.Addr, dst netip.AddrPort, n int, rng *rand.Rand) error {
	var fd int
	err := e.gate.in(w.cg.Path, w.ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		if err != nil {
			return err
		}
		// The kernel writes the IP header; bind sets its source.
		return unix.Bind(fd, &unix.SockaddrInet4{Addr: src.As4()})
	})
	if err != nil {
		if fd > 0 {
			unix.Close(fd)
		}
		return fmt.Errorf("raw socket: %w", err)
	}
	defer unix.Close(fd)
	for i := 0; i < n; i++ {
		seg := synSegment(src, uint16(40000+rng.IntN(20000)), dst, rng.Uint32())
		if err := unix.Sendto(fd, seg, 0, &unix.SockaddrInet4{Addr: dst.Addr().As4()}); err != nil {
			return fmt.Errorf("send a SYN to %s: %w", dst, err)
		}
	}
	return nil
}

// synSegment is a 20-byte TCP header with SYN set and its checksum.
func synSegment(src netip.Addr, sport uint16, dst netip.AddrPort, seq uint32) []byte {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dst.Port())
	binary.BigEndian.PutUint32(h[4:], seq)
	h[12] = 5 << 4 // data offset: 5 words
	h[13] = 0x02   // SYN
	binary.BigEndian.PutUint16(h[14:], 65535)
	// Checksum over the pseudo header and the segment.
	s, d := src.As4(), dst.Addr().As4()
	pseudo := append(append(append([]byte{}, s[:]...), d[:]...), 0, unix.IPPROTO_TCP, 0, 20)
	binary.BigEndian.PutUint16(h[16:], checksum(append(pseudo, h...)))
	return h
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
