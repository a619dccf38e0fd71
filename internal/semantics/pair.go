// Package semantics holds the transparency cases: small programs that use a
// TCP connection the way real applications do (MSG_PEEK, MSG_WAITALL,
// SO_RCVLOWAT, splice, half-close, ...) and describe what they observed.
// Each case runs once over a plain connection and once over an accelerated
// one; an application cannot tell the difference when both descriptions are
// equal. The test suite and `sockbypass doctor` both run them.
package semantics

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// Pair is a connected TCP socket pair of blocking file descriptors: C the
// connecting side, S the accepted side.
type Pair struct {
	C, S int
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

// opTimeout bounds every blocking call of a case.
const opTimeout = 5 * time.Second

// ConnectLoopback makes a TCP connection over 127.0.0.1 in the calling
// thread's network namespace and this process's cgroup (the caller moves
// the process into the cgroup under test). Both sockets get send and
// receive timeouts so that no case can hang.
func ConnectLoopback() (Pair, error) {
	lfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return Pair{}, err
	}
	defer unix.Close(lfd)
	if err := unix.Bind(lfd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return Pair{}, err
	}
	if err := unix.Listen(lfd, 16); err != nil {
		return Pair{}, err
	}
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		return Pair{}, err
	}
	cfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return Pair{}, err
	}
	if err := unix.Connect(cfd, sa); err != nil {
		unix.Close(cfd)
		return Pair{}, err
	}
	sfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
	if err != nil {
		unix.Close(cfd)
		return Pair{}, err
	}
	tv := unix.NsecToTimeval(opTimeout.Nanoseconds())
	for _, fd := range []int{cfd, sfd} {
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}
	return Pair{C: cfd, S: sfd}, nil
}

// retry reports whether a blocking call should be retried: EINTR, and
// EAGAIN that a sockmap socket returns when a signal interrupts its wait
// (a timeout also gives EAGAIN; callers bound their loops by time).
func retry(err error) bool { return err == unix.EINTR || err == unix.EAGAIN }

func writeAll(fd int, b []byte) error {
	deadline := time.Now().Add(opTimeout)
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if retry(err) && time.Now().Before(deadline) {
			continue
		}
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		b = b[n:]
	}
	return nil
}

// readN reads exactly n bytes, or fails with what it got.
func readN(fd int, n int) ([]byte, error) {
	out := make([]byte, 0, n)
	buf := make([]byte, 64<<10)
	deadline := time.Now().Add(opTimeout)
	for len(out) < n {
		m, err := unix.Read(fd, buf[:min(len(buf), n-len(out))])
		if retry(err) && time.Now().Before(deadline) {
			continue
		}
		if err != nil {
			return out, fmt.Errorf("read after %d of %d bytes: %w", len(out), n, err)
		}
		if m == 0 {
			return out, fmt.Errorf("EOF after %d of %d bytes", len(out), n)
		}
		out = append(out, buf[:m]...)
	}
	return out, nil
}

// readToEOF reads until EOF and returns the bytes and the error that ended
// the read ("" for a clean EOF).
func readToEOF(fd int) ([]byte, string) {
	var out []byte
	buf := make([]byte, 64<<10)
	deadline := time.Now().Add(opTimeout)
	for {
		m, err := unix.Read(fd, buf)
		if retry(err) && time.Now().Before(deadline) {
			continue
		}
		if err != nil {
			return out, errName(err)
		}
		if m == 0 {
			return out, ""
		}
		out = append(out, buf[:m]...)
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

// WarmUp makes one round trip (a byte each way, read with plain blocking
// reads). Afterwards both ends have been seen reading and every byte sent
// through the stack has been read, so an accelerated pair redirects from
// the next byte on: cases call it to exercise the fast path.
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
