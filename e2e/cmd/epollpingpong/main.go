// Command epollpingpong is a TCP ping-pong with non-blocking sockets driven
// by epoll, the way event-loop servers (nginx, redis, envoy) do their I/O:
// the workload sockbypass accelerates, next to sockperf and iperf3 (blocking
// sockets, left plain: the controls) in the e2e suite. Both ends run on one
// locked thread each and wait only in epoll_wait.
//
//	epollpingpong server -addr 127.0.0.1:5001
//	epollpingpong client -addr 127.0.0.1:5001 -size 64 -duration 2s
//
// The server echoes whatever it reads on every connection until it is
// killed. The client sends a size-byte message (a sequence number and a
// pattern), waits for the whole echo, checks it byte for byte, and repeats
// for the duration after a warm-up; it prints the round-trip percentiles
// in microseconds ("percentile P = US", P 0 for the minimum and 100 for the
// maximum) and exits 1 at the first wrong byte.
package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"sort"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	runtime.LockOSThread()
	var err error
	switch os.Args[1] {
	case "server":
		fs := flag.NewFlagSet("server", flag.ExitOnError)
		addr := fs.String("addr", "127.0.0.1:5001", "address to listen on")
		fs.Parse(os.Args[2:])
		err = serve(*addr)
	case "client":
		fs := flag.NewFlagSet("client", flag.ExitOnError)
		addr := fs.String("addr", "127.0.0.1:5001", "server address")
		size := fs.Int("size", 64, "message size in bytes (at least 8)")
		dur := fs.Duration("duration", 2*time.Second, "length of the measured run")
		warm := fs.Duration("warmup", 200*time.Millisecond, "round trips before the measured run, not recorded")
		fs.Parse(os.Args[2:])
		err = client(*addr, *size, *dur, *warm)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "epollpingpong:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: epollpingpong server -addr IP:PORT | client -addr IP:PORT -size N -duration D")
	os.Exit(2)
}

func sockaddr(addr string) (*unix.SockaddrInet4, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		return nil, fmt.Errorf("address %q: want IPv4:port", addr)
	}
	return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}, nil
}

// epollWait waits for events on ep, retrying when a signal interrupts it.
func epollWait(ep int, events []unix.EpollEvent) (int, error) {
	for {
		n, err := unix.EpollWait(ep, events, -1)
		if err == unix.EINTR {
			continue
		}
		return n, err
	}
}

// conn is a server connection and what it still has to echo.
type conn struct {
	fd      int
	pending []byte
}

func serve(addr string) error {
	sa, err := sockaddr(addr)
	if err != nil {
		return err
	}
	lfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	unix.SetsockoptInt(lfd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	if err := unix.Bind(lfd, sa); err != nil {
		return fmt.Errorf("bind %s: %w", addr, err)
	}
	if err := unix.Listen(lfd, 128); err != nil {
		return err
	}
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, lfd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(lfd)}); err != nil {
		return err
	}
	conns := map[int32]*conn{}
	drop := func(c *conn) {
		unix.EpollCtl(ep, unix.EPOLL_CTL_DEL, c.fd, nil)
		unix.Close(c.fd)
		delete(conns, int32(c.fd))
	}
	// flush writes what c has pending and says whether it must wait for
	// room (EPOLLOUT).
	flush := func(c *conn) (bool, error) {
		for len(c.pending) > 0 {
			n, err := unix.Write(c.fd, c.pending)
			if err == unix.EAGAIN {
				return true, nil
			}
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return false, err
			}
			c.pending = c.pending[n:]
		}
		c.pending = nil
		return false, nil
	}
	buf := make([]byte, 256<<10)
	events := make([]unix.EpollEvent, 64)
	for {
		n, err := epollWait(ep, events)
		if err != nil {
			return err
		}
		for _, ev := range events[:n] {
			if ev.Fd == int32(lfd) {
				for {
					fd, _, err := unix.Accept4(lfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
					if err != nil {
						break // EAGAIN: accepted them all
					}
					unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
					if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}); err != nil {
						unix.Close(fd)
						continue
					}
					conns[int32(fd)] = &conn{fd: fd}
				}
				continue
			}
			c := conns[ev.Fd]
			if c == nil {
				continue
			}
			if len(c.pending) == 0 && ev.Events&(unix.EPOLLIN|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
				m, err := unix.Read(c.fd, buf)
				if err == unix.EAGAIN || err == unix.EINTR {
					continue
				}
				if err != nil || m == 0 {
					drop(c)
					continue
				}
				c.pending = append([]byte(nil), buf[:m]...)
			}
			wait, err := flush(c)
			if err != nil {
				drop(c)
				continue
			}
			// Level-triggered: while an echo is pending, wait for room
			// only (reading more would grow the backlog without bound).
			want := uint32(unix.EPOLLIN)
			if wait {
				want = unix.EPOLLOUT
			}
			unix.EpollCtl(ep, unix.EPOLL_CTL_MOD, c.fd, &unix.EpollEvent{Events: want, Fd: int32(c.fd)})
		}
	}
}

// clientConn is the client's connection with its epoll instance.
type clientConn struct {
	fd, ep int
	events []unix.EpollEvent
	want   uint32
}

// wait waits until the connection is ready for ev (EPOLLIN or EPOLLOUT).
func (c *clientConn) wait(ev uint32) error {
	if c.want != ev {
		if err := unix.EpollCtl(c.ep, unix.EPOLL_CTL_MOD, c.fd, &unix.EpollEvent{Events: ev, Fd: int32(c.fd)}); err != nil {
			return err
		}
		c.want = ev
	}
	_, err := epollWait(c.ep, c.events)
	return err
}

func (c *clientConn) writeAll(b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(c.fd, b)
		if err == unix.EAGAIN {
			if err := c.wait(unix.EPOLLOUT); err != nil {
				return err
			}
			continue
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		b = b[n:]
	}
	return nil
}

func (c *clientConn) readFull(b []byte) error {
	for off := 0; off < len(b); {
		n, err := unix.Read(c.fd, b[off:])
		if err == unix.EAGAIN {
			if err := c.wait(unix.EPOLLIN); err != nil {
				return err
			}
			continue
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if n == 0 {
			return errors.New("the server closed the connection")
		}
		off += n
	}
	return nil
}

func dial(addr string) (*clientConn, error) {
	sa, err := sockaddr(addr)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	c := &clientConn{fd: fd, ep: ep, events: make([]unix.EpollEvent, 1), want: unix.EPOLLOUT}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLOUT, Fd: int32(fd)}); err != nil {
		return nil, err
	}
	if err := unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
		return nil, fmt.Errorf("connect %s: %w", addr, err)
	}
	if err := c.wait(unix.EPOLLOUT); err != nil {
		return nil, err
	}
	if soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || soerr != 0 {
		return nil, fmt.Errorf("connect %s: %v %v", addr, unix.Errno(soerr), err)
	}
	return c, nil
}

func client(addr string, size int, dur, warm time.Duration) error {
	if size < 8 {
		return errors.New("-size must be at least 8")
	}
	c, err := dial(addr)
	if err != nil {
		return err
	}
	defer unix.Close(c.fd)
	msg := bytes.Repeat([]byte("epoll-pingpong-0123456789abcdef"), size/31+1)[:size]
	reply := make([]byte, size)
	rtts := make([]time.Duration, 0, 1<<18)
	start := time.Now()
	measureFrom, end := start.Add(warm), start.Add(warm+dur)
	for seq := uint64(0); ; seq++ {
		binary.LittleEndian.PutUint64(msg, seq)
		t0 := time.Now()
		if err := c.writeAll(msg); err != nil {
			return err
		}
		if err := c.readFull(reply); err != nil {
			return err
		}
		t1 := time.Now()
		if !bytes.Equal(reply, msg) {
			return fmt.Errorf("echo %d differs from the message sent", seq)
		}
		if t0.After(measureFrom) {
			rtts = append(rtts, t1.Sub(t0))
		}
		if t1.After(end) {
			break
		}
	}
	if len(rtts) == 0 {
		return errors.New("no round trip in the measured run")
	}
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	fmt.Printf("epollpingpong: %d round trips of %d bytes in %v, every echo checked\n", len(rtts), size, dur)
	for _, p := range []float64{0, 25, 50, 75, 90, 99, 99.9, 99.99, 100} {
		i := int(float64(len(rtts)-1) * p / 100)
		fmt.Printf("epollpingpong: percentile %.3f = %.3f\n", p, float64(rtts[i])/float64(time.Microsecond))
	}
	return nil
}
