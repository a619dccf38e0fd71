// Package semantics holds the transparency cases: small programs that use a
// TCP connection the way real applications do (MSG_PEEK, MSG_WAITALL,
// SO_RCVLOWAT, splice, half-close, ...) and describe what they observed.
// Each case runs once over a plain connection and once over an accelerated
// one, with blocking sockets and with non-blocking sockets; an application
// cannot tell the difference when both descriptions are equal. The test
// suite and `sockbypass doctor` both run them.
package semantics

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// Mode is how the sockets of a case block.
type Mode string

// Modes.
const (
	// Blocking: the listener, the connecting and the accepted sockets
	// are blocking file descriptors (with send and receive timeouts).
	Blocking Mode = "blocking"
	// NonBlocking: the listener is non-blocking before listen(), the
	// connecting socket before connect() (EINPROGRESS, then POLLOUT and
	// SO_ERROR), and accept4 gives non-blocking sockets; cases wait with
	// poll.
	NonBlocking Mode = "non-blocking"
)

// AllModes returns the modes every case runs in, in order.
func AllModes() []Mode { return []Mode{Blocking, NonBlocking} }

// Pair is a connected TCP socket pair: C the connecting side, S the
// accepted side, both in Mode.
type Pair struct {
	C, S int
	Mode Mode
}

// Close closes both sockets (ignoring errors: a case may have closed one).
func (p *Pair) Close() {
	if p.C >= 0 {
		unix.Close(p.C)
		p.C = -1
	}
	if p.S >= 0 {
		unix.Close(p.S)
		p.S = -1
	}
}

// ConnOpts lets a case act on the sockets while its connection is made,
// before the pair could join the sockhash.
type ConnOpts struct {
	// Port is the listener's port (SO_REUSEADDR); 0 picks a free one.
	Port int
	// Listener is called on the listening socket before listen(); the
	// accepted socket inherits what it sets.
	Listener func(fd int) error
	// AfterListen, when set, is applied to the listening socket after
	// listen() and before the client connects.
	AfterListen func(fd int) error
	// Client is called on the connecting socket before connect().
	Client func(fd int) error
	// Connected is called on the connecting socket once it is connected,
	// before the server accepts.
	Connected func(fd int) error
	// Addr is the IPv4 address to listen on; zero means 127.0.0.1.
	Addr [4]byte
	// ListenIn and DialIn, when set, run the function that creates the
	// listening socket, or the connecting one, where that side lives (a
	// cgroup, a network namespace); unset, it runs in the calling context.
	ListenIn, DialIn func(func())
	// WarmUp: before the connection, another one to the same listener
	// carries a byte each way and closes, as a long-running server's
	// first request does: the server's read ends the listener's probation
	// (sockbypass's default, see "Probation" in bpf/sockbypass.h), so the
	// connection returned may pair. Benchmarks set it; the transparency
	// cases measure a listener's first connection.
	WarmUp bool
}

// opTimeout bounds every blocking call or wait of a case.
const opTimeout = 5 * time.Second

// errTimedOut is what a wait returns at its deadline.
var errTimedOut = errors.New("timed out")

// Connect makes a TCP connection in mode over o.Addr (127.0.0.1 by
// default), both sides in the calling thread's network namespace and this
// process's cgroup (the caller moves the process into the cgroup under
// test) unless o.ListenIn or o.DialIn put a side elsewhere. Blocking
// sockets get send and receive timeouts so that no case can hang; every
// wait of the connection itself is bounded too.
func Connect(mode Mode, o ConnOpts) (Pair, error) {
	if o.Addr == ([4]byte{}) {
		o.Addr = [4]byte{127, 0, 0, 1}
	}
	here := func(fn func()) { fn() }
	if o.ListenIn == nil {
		o.ListenIn = here
	}
	if o.DialIn == nil {
		o.DialIn = here
	}

	flags := unix.SOCK_STREAM | unix.SOCK_CLOEXEC
	if mode == NonBlocking {
		flags |= unix.SOCK_NONBLOCK
	}
	tv := unix.NsecToTimeval(opTimeout.Nanoseconds())
	lfd := -1
	var err error
	o.ListenIn(func() { lfd, err = listenFD(flags, mode, tv, o) })
	if err != nil {
		return Pair{}, err
	}
	defer unix.Close(lfd)
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		return Pair{}, err
	}
	if o.WarmUp {
		w := Pair{C: -1, S: -1, Mode: mode}
		o.DialIn(func() { w.C, err = dialFD(flags, sa, o) })
		if err == nil {
			w.S, err = acceptFD(lfd, mode)
		}
		if err == nil {
			err = WarmUp(w)
		}
		w.Close()
		if err != nil {
			return Pair{}, fmt.Errorf("warm-up connection: %w", err)
		}
	}
	p := Pair{C: -1, S: -1, Mode: mode}
	o.DialIn(func() { p.C, err = dialFD(flags, sa, o) })
	if err != nil {
		return Pair{}, err
	}
	if p.S, err = acceptFD(lfd, mode); err != nil {
		p.Close()
		return Pair{}, err
	}
	for _, fd := range []int{p.C, p.S} {
		if mode == Blocking {
			unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
			unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
		}
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}
	return p, nil
}

// listenFD makes Connect's listening socket on o.Addr and o.Port (with
// o.Listener applied before listen), and returns it.
func listenFD(flags int, mode Mode, tv unix.Timeval, o ConnOpts) (int, error) {
	lfd, err := unix.Socket(unix.AF_INET, flags, 0)
	if err != nil {
		return -1, err
	}
	if mode == Blocking {
		unix.SetsockoptTimeval(lfd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv) // bounds accept
	}
	if o.Port != 0 {
		if err := unix.SetsockoptInt(lfd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return closeFail(lfd, err)
		}
	}
	if err := unix.Bind(lfd, &unix.SockaddrInet4{Port: o.Port, Addr: o.Addr}); err != nil {
		return closeFail(lfd, err)
	}
	if o.Listener != nil {
		if err := o.Listener(lfd); err != nil {
			return closeFail(lfd, fmt.Errorf("listener: %w", err))
		}
	}
	if err := unix.Listen(lfd, 16); err != nil {
		return closeFail(lfd, err)
	}
	if o.AfterListen != nil {
		if err := o.AfterListen(lfd); err != nil {
			return closeFail(lfd, fmt.Errorf("listener after listen: %w", err))
		}
	}
	return lfd, nil
}

// dialFD makes Connect's connecting socket (with o.Client applied before
// connect and o.Connected after), connects it to sa and returns it.
func dialFD(flags int, sa unix.Sockaddr, o ConnOpts) (int, error) {
	cfd, err := unix.Socket(unix.AF_INET, flags, 0)
	if err != nil {
		return -1, err
	}
	if o.Client != nil {
		if err := o.Client(cfd); err != nil {
			return closeFail(cfd, fmt.Errorf("client: %w", err))
		}
	}
	if err := connectFD(cfd, sa); err != nil {
		return closeFail(cfd, err)
	}
	if o.Connected != nil {
		if err := o.Connected(cfd); err != nil {
			return closeFail(cfd, fmt.Errorf("connected: %w", err))
		}
	}
	return cfd, nil
}

// closeFail closes fd, a socket that could not be set up, and returns err.
func closeFail(fd int, err error) (int, error) {
	unix.Close(fd)
	return -1, err
}

func connectFD(fd int, sa unix.Sockaddr) error {
	err := unix.Connect(fd, sa)
	if err == unix.EINTR {
		// An interrupted blocking connect goes on in the background.
		err = unix.EINPROGRESS
	}
	if err == unix.EINPROGRESS || err == unix.EALREADY {
		if _, werr := waitFD(fd, unix.POLLOUT, time.Now().Add(opTimeout)); werr != nil {
			return fmt.Errorf("connect: %w", werr)
		}
		soerr, gerr := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if gerr != nil {
			return fmt.Errorf("connect: SO_ERROR: %w", gerr)
		}
		if soerr != 0 {
			return fmt.Errorf("connect: %w", unix.Errno(soerr))
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	return nil
}

func acceptFD(lfd int, mode Mode) (int, error) {
	flags := unix.SOCK_CLOEXEC
	if mode == NonBlocking {
		flags |= unix.SOCK_NONBLOCK
	}
	w := newWaiter()
	for {
		fd, _, err := unix.Accept4(lfd, flags)
		if retry(err) {
			if werr := w.wait(lfd, unix.POLLIN); werr != nil {
				return -1, fmt.Errorf("accept: %w", werr)
			}
			continue
		}
		if err != nil {
			return -1, fmt.Errorf("accept: %w", err)
		}
		return fd, nil
	}
}

// retry reports whether a call should be retried after waiting: EINTR,
// and EAGAIN (a non-blocking socket that is not ready, a blocking one whose
// timeout expired; callers bound their loops by time).
func retry(err error) bool { return err == unix.EINTR || err == unix.EAGAIN }

// waitFD polls fd for events until deadline and returns its revents
// (POLLERR and POLLHUP end the wait too), or errTimedOut.
func waitFD(fd int, events int16, deadline time.Time) (int16, error) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: events}}
	for {
		left := time.Until(deadline)
		if left < 0 {
			left = 0
		}
		n, err := unix.Poll(fds, int((left+time.Millisecond-1)/time.Millisecond))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, err
		}
		if n == 0 {
			return 0, errTimedOut
		}
		return fds[0].Revents, nil
	}
}

// waiter waits for a socket between the retries of one operation, within
// opTimeout of the operation's start.
type waiter struct {
	deadline time.Time
	idle     int
}

func newWaiter() *waiter { return &waiter{deadline: time.Now().Add(opTimeout)} }

// progress tells the waiter the last call moved data.
func (w *waiter) progress() { w.idle = 0 }

// wait waits until fd is ready for events (or reports an error or hang
// up). A socket that polls ready and still says EAGAIN (a splice reader
// whose bytes sit in the redirected queue) is retried every millisecond.
func (w *waiter) wait(fd int, events int16) error {
	if !time.Now().Before(w.deadline) {
		return errTimedOut
	}
	if w.idle++; w.idle > 2 {
		time.Sleep(time.Millisecond)
	}
	_, err := waitFD(fd, events, w.deadline)
	return err
}

func writeAll(fd int, b []byte) error {
	w := newWaiter()
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if retry(err) {
			if werr := w.wait(fd, unix.POLLOUT); werr != nil {
				return fmt.Errorf("write with %d bytes left: %w (%w)", len(b), err, werr)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		w.progress()
		b = b[n:]
	}
	return nil
}

// readN reads exactly n bytes, or fails with what it got.
func readN(fd int, n int) ([]byte, error) {
	out := make([]byte, 0, n)
	buf := make([]byte, 64<<10)
	w := newWaiter()
	for len(out) < n {
		m, err := unix.Read(fd, buf[:min(len(buf), n-len(out))])
		if retry(err) {
			if werr := w.wait(fd, unix.POLLIN); werr != nil {
				return out, fmt.Errorf("read after %d of %d bytes: %w (%w)", len(out), n, err, werr)
			}
			continue
		}
		if err != nil {
			return out, fmt.Errorf("read after %d of %d bytes: %w", len(out), n, err)
		}
		if m == 0 {
			return out, fmt.Errorf("EOF after %d of %d bytes", len(out), n)
		}
		w.progress()
		out = append(out, buf[:m]...)
	}
	return out, nil
}

// readToEOF reads until EOF and returns the bytes and the error that ended
// the read ("" for a clean EOF, "timed out" when the deadline passed).
func readToEOF(fd int) ([]byte, string) {
	var out []byte
	buf := make([]byte, 64<<10)
	end := untilEOF(fd, func() (int, error) {
		m, err := unix.Read(fd, buf)
		if m > 0 {
			out = append(out, buf[:m]...)
		}
		return m, err
	})
	return out, end
}

// untilEOF calls read, which reads from fd, until it returns 0 bytes (EOF),
// waiting for fd between the retries of a call that would block, within
// opTimeout of the last progress (see waiter). It returns "" at EOF, or
// the error that ended the reading ("timed out" at the deadline).
func untilEOF(fd int, read func() (int, error)) string {
	w := newWaiter()
	for {
		n, err := read()
		if retry(err) {
			if werr := w.wait(fd, unix.POLLIN); werr != nil {
				return werr.Error()
			}
			continue
		}
		if err != nil {
			return errName(err)
		}
		if n == 0 {
			return ""
		}
		w.progress()
	}
}

// errName names an errno for outcomes (stable across runs).
func errName(err error) string {
	var errno unix.Errno
	if errors.As(err, &errno) {
		return unix.ErrnoName(errno)
	}
	return err.Error()
}

// WarmUp makes one round trip (a byte each way). Members redirect from the
// first byte, so it is not needed for the fast path; cases call it for a
// connection whose ends have both written and read already.
func WarmUp(p Pair) error {
	if err := writeAll(p.C, []byte{'w'}); err != nil {
		return err
	}
	if _, err := readN(p.S, 1); err != nil {
		return err
	}
	if err := writeAll(p.S, []byte{'u'}); err != nil {
		return err
	}
	_, err := readN(p.C, 1)
	return err
}

// pattern returns n bytes that differ from offset to offset.
func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	x := uint32(seed) | 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}
