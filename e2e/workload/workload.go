// Package workload drives TCP traffic over a connected socket pair of
// non-blocking sockets, read and written the way event loops do (a call
// that would block waits in poll(2)), on dedicated OS threads (no Go
// netpoller in the measured path), for the benchmarks and the demo:
// request/response latency and stream throughput. Non-blocking, because
// sockbypass never accelerates blocking sockets (a blocking recv on a
// sockhash member returns EAGAIN when a signal interrupts its wait). Every workload checks the bytes it
// receives, so a fast wrong answer is an error, not a result.
package workload

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/semantics"
)

// Pair is a connected TCP socket pair made of non-blocking file
// descriptors: C the connecting side, S the accepted one. It is the socket
// pair of the transparency cases (internal/semantics), made the same way.
type Pair = semantics.Pair

// Connect makes a TCP connection over 127.0.0.1 whose two sockets belong to
// cg (the listener is created in cg, so the accepted socket is in cg too).
// A warm-up connection comes first, as a long-running server has served
// one before (see semantics.ConnOpts.WarmUp): with sockbypass's defaults
// a listener's first connection stays plain.
func Connect(cg cgroup.Cgroup) (Pair, error) {
	var p Pair
	var err error
	if rerr := cg.RunIn(func() { p, err = semantics.Connect(semantics.NonBlocking, semantics.ConnOpts{WarmUp: true}) }); rerr != nil {
		return Pair{}, rerr
	}
	return p, err
}

// ConnectTo makes a TCP connection whose listening side is created by
// listenIn (which runs its function where the server lives: a cgroup, a
// namespace) on addr, and whose connecting side is created by the calling
// context, or by dialIn when it is not nil; after a warm-up connection,
// as Connect.
func ConnectTo(dialIn func(func()), addr [4]byte, listenIn func(func())) (Pair, error) {
	return semantics.Connect(semantics.NonBlocking, semantics.ConnOpts{Addr: addr, ListenIn: listenIn, DialIn: dialIn, WarmUp: true})
}

// listenOn makes a listening socket on addr (any port) for ConnRate, which
// connects to it again and again in the measured path: non-blocking unless
// blocking.
func listenOn(addr [4]byte, blocking bool) (int, error) {
	flags := unix.SOCK_STREAM | unix.SOCK_CLOEXEC | unix.SOCK_NONBLOCK
	if blocking {
		flags = unix.SOCK_STREAM | unix.SOCK_CLOEXEC
	}
	lfd, err := unix.Socket(unix.AF_INET, flags, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.Bind(lfd, &unix.SockaddrInet4{Addr: addr}); err != nil {
		unix.Close(lfd)
		return -1, err
	}
	if err := unix.Listen(lfd, 1); err != nil {
		unix.Close(lfd)
		return -1, err
	}
	return lfd, nil
}

// onThread runs fn on a locked OS thread, pinned to cpu when cpu >= 0.
func onThread(cpu int, fn func() error) <-chan error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if cpu >= 0 {
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				done <- fmt.Errorf("pin to CPU %d: %w", cpu, err)
				return
			}
		}
		done <- fn()
	}()
	return done
}

// waitFD waits in poll(2) until fd has one of events (or an error or hang
// up, which the next call then reports).
func waitFD(fd int, events int16) error {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: events}}
	for {
		_, err := unix.Poll(pfd, -1)
		if err != unix.EINTR {
			return err
		}
	}
}

// retryable reports whether a read or write should be retried: EINTR at
// once, EAGAIN (a non-blocking socket with nothing to read, or no room to
// write) once poll says fd is ready for events.
func retryable(err error, fd int, events int16) bool {
	switch err {
	case unix.EINTR:
		return true
	case unix.EAGAIN:
		return waitFD(fd, events) == nil
	}
	return false
}

func readFull(fd int, buf []byte) error {
	for off := 0; off < len(buf); {
		n, err := unix.Read(fd, buf[off:])
		if retryable(err, fd, unix.POLLIN) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return errors.New("unexpected EOF")
		}
		off += n
	}
	return nil
}

func writeFull(fd int, buf []byte) error {
	for off := 0; off < len(buf); {
		n, err := unix.Write(fd, buf[off:])
		if retryable(err, fd, unix.POLLOUT) {
			continue
		}
		if err != nil {
			return err
		}
		off += n
	}
	return nil
}

// CPUs says where the two ends of a workload run.
type CPUs struct {
	// Client and Server are CPU numbers, or -1 to leave the thread
	// unpinned.
	Client, Server int
}

// Unpinned leaves both ends to the scheduler.
var Unpinned = CPUs{-1, -1}

// RR runs request/response over p for dur: the client sends msgSize bytes,
// the server echoes them, the client checks them. It returns the round-trip
// times. It half-closes and drains p when done.
func RR(p Pair, msgSize int, dur time.Duration, cpus CPUs) ([]time.Duration, error) {
	server := onThread(cpus.Server, func() error {
		buf := make([]byte, msgSize)
		for {
			if err := readFull(p.S, buf); err != nil {
				if err.Error() == "unexpected EOF" {
					return nil // client finished
				}
				return fmt.Errorf("server read: %w", err)
			}
			if err := writeFull(p.S, buf); err != nil {
				return fmt.Errorf("server write: %w", err)
			}
		}
	})
	var lat []time.Duration
	client := onThread(cpus.Client, func() error {
		msg := bytes.Repeat([]byte("sockbypass-rr-0123456789abcdef"), msgSize/30+1)[:msgSize]
		reply := make([]byte, msgSize)
		lat = make([]time.Duration, 0, 1<<16)
		deadline := time.Now().Add(dur)
		for i := 0; ; i++ {
			msg[0] = byte(i)
			t0 := time.Now()
			if err := writeFull(p.C, msg); err != nil {
				return fmt.Errorf("client write: %w", err)
			}
			if err := readFull(p.C, reply); err != nil {
				return fmt.Errorf("client read: %w", err)
			}
			t1 := time.Now()
			lat = append(lat, t1.Sub(t0))
			if !bytes.Equal(reply, msg) {
				return fmt.Errorf("reply %d differs from request", i)
			}
			if t1.After(deadline) {
				break
			}
		}
		return unix.Shutdown(p.C, unix.SHUT_WR)
	})
	select {
	case err := <-client:
		if err != nil {
			unix.Shutdown(p.C, unix.SHUT_RDWR)
			<-server
			return nil, err
		}
		if err := <-server; err != nil {
			return nil, err
		}
	case err := <-server:
		if err != nil {
			// The server failed: unblock the client and report.
			unix.Shutdown(p.C, unix.SHUT_RDWR)
			<-client
			return nil, err
		}
		// The server saw the client's half-close: the client is done.
		if err := <-client; err != nil {
			return nil, err
		}
	}
	return lat, nil
}

// Stream writes writeSize-byte chunks from client to server for dur and
// returns the throughput in bytes per second, measured at the reader. The
// reader checks that it got exactly what was written, in order.
func Stream(p Pair, writeSize int, dur time.Duration, cpus CPUs) (float64, error) {
	type result struct {
		n       int64
		elapsed time.Duration
	}
	var got result
	var sent int64
	start := time.Now()
	reader := onThread(cpus.Server, func() error {
		buf := make([]byte, 256<<10)
		for {
			n, err := unix.Read(p.S, buf)
			if retryable(err, p.S, unix.POLLIN) {
				continue
			}
			if err != nil {
				return fmt.Errorf("reader: %w", err)
			}
			if n == 0 {
				got.elapsed = time.Since(start)
				return nil
			}
			// Every chunk is filled with one byte value, the chunk
			// number; spot-check the first and last byte of the read.
			if err := checkStream(buf[:n], got.n, writeSize); err != nil {
				return err
			}
			got.n += int64(n)
		}
	})
	writer := onThread(cpus.Client, func() error {
		chunk := make([]byte, writeSize)
		deadline := time.Now().Add(dur)
		for i := 0; time.Now().Before(deadline); i++ {
			for j := range chunk {
				chunk[j] = byte(i)
			}
			if err := writeFull(p.C, chunk); err != nil {
				return fmt.Errorf("writer: %w", err)
			}
			sent += int64(writeSize)
		}
		return unix.Shutdown(p.C, unix.SHUT_WR)
	})
	select {
	case err := <-writer:
		if err != nil {
			unix.Shutdown(p.S, unix.SHUT_RDWR)
			<-reader
			return 0, err
		}
		if err := <-reader; err != nil {
			return 0, err
		}
	case err := <-reader:
		if err != nil {
			// The reader failed: unblock the writer and report.
			unix.Shutdown(p.C, unix.SHUT_RDWR)
			<-writer
			return 0, err
		}
		if err := <-writer; err != nil {
			return 0, err
		}
	}
	if got.n != sent {
		return 0, fmt.Errorf("stream: wrote %d bytes, reader got %d", sent, got.n)
	}
	return float64(got.n) / got.elapsed.Seconds(), nil
}

// checkStream checks that b, found at stream offset off, holds the chunk
// numbers a writer of writeSize-byte chunks put there.
func checkStream(b []byte, off int64, writeSize int) error {
	for _, i := range []int{0, len(b) - 1} {
		pos := off + int64(i)
		if want := byte(pos / int64(writeSize)); b[i] != want {
			return fmt.Errorf("stream byte %d is %d, want %d: bytes lost or reordered", pos, b[i], want)
		}
	}
	return nil
}

// Percentile returns the p-th percentile (0..100) of d, sorting d.
func Percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	idx := int(float64(len(d)-1) * p / 100)
	return d[idx]
}

// ConnRate opens TCP connections over 127.0.0.1 one after another for dur,
// on one locked thread (pinned to cpu when cpu >= 0), each used once: the
// client sends msgSize bytes, the server answers as many, both close. It
// checks every answer and returns connections per second. Its sockets
// belong to the cgroup the process is in when it is called.
func ConnRate(msgSize int, dur time.Duration, cpu int) (float64, error) {
	r, err := ConnRateWith(ConnRateOpts{Size: msgSize, CPU: cpu}, dur)
	return r.Rate, err
}

// StallAfter is how long a connection of ConnRateWith may take before it
// counts as stalled: a SYN or a segment retransmitted after a drop (the
// first SYN retransmission comes after 1 s), not anything the datapath's
// work per connection could explain.
const StallAfter = 200 * time.Millisecond

// ConnRateResult is what ConnRateWith measured.
type ConnRateResult struct {
	// Rate is connections per second.
	Rate float64
	// Connections is how many connections the run made.
	Connections int
	// Slowest is the longest connection (connect to close).
	Slowest time.Duration
	// Stalled counts the connections that took longer than StallAfter.
	Stalled int
}

// ConnRateOpts says how ConnRateWith makes its connections.
type ConnRateOpts struct {
	// Size is the request and response size in bytes.
	Size int
	// CPU pins the measuring thread (client and server alike), or -1.
	CPU int
	// Blocking makes the client and the accepted sockets blocking file
	// descriptors (the listener too), as a thread-per-connection program
	// has them: sockbypass leaves such connections plain. Otherwise they
	// are non-blocking, as an event loop's, and may pair.
	Blocking bool
	// GoSockopts sets, on the client socket once connected and on the
	// accepted socket, the five options Go's net package sets on every
	// dialed and accepted connection (TCP_NODELAY 1, SO_KEEPALIVE 1,
	// TCP_KEEPIDLE 15, TCP_KEEPINTVL 15, TCP_KEEPCNT 9: see goSockopts).
	// Real programs set options on each connection, and every setsockopt
	// in a cgroup with a cgroup/setsockopt program attached pays the
	// kernel's hook: without them the loop would hide such a cost.
	GoSockopts bool
	// Addr is the IPv4 address to listen on; zero means 127.0.0.1.
	Addr [4]byte
	// ListenIn, when set, runs the function that creates the listening
	// socket where the server lives (a cgroup, a network namespace): the
	// accepted sockets belong to the listener's cgroup and namespace.
	ListenIn func(func())
	// DialIn, when set, runs the measuring loop (which creates the
	// client sockets) where the client lives, such as a network
	// namespace's ns.NetNS.Do; it must run its function on one locked
	// thread.
	DialIn func(func())

	// checkConn, when set (by tests), is called for every connection
	// with the client and the accepted socket, once both are set up and
	// before any byte is exchanged; an error ends the run.
	checkConn func(cfd, sfd int) error
}

// goSockopts are the options Go's net package sets on every TCP
// connection it dials or accepts, in its order (newTCPConn: setNoDelay,
// then SetKeepAliveConfig with the defaults of net.Dialer and
// net.ListenConfig: 15 s idle, 15 s interval, 9 probes).
var goSockopts = []struct {
	name       string
	level, opt int
	value      int
}{
	{"TCP_NODELAY", unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
	{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
	{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15},
	{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
	{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9},
}

// setGoSockopts sets goSockopts on fd; an error names the option.
func setGoSockopts(fd int) error {
	for _, o := range goSockopts {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.value); err != nil {
			return fmt.Errorf("setsockopt %s=%d: %w", o.name, o.value, err)
		}
	}
	return nil
}

// ConnRateWith is ConnRate with the sockets placed and made as o says; it
// also reports the slowest connection and how many stalled.
func ConnRateWith(o ConnRateOpts, dur time.Duration) (ConnRateResult, error) {
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
	lfd := -1
	var err error
	o.ListenIn(func() { lfd, err = listenOn(o.Addr, o.Blocking) })
	if err != nil {
		return ConnRateResult{}, err
	}
	defer unix.Close(lfd)
	if err := unix.Listen(lfd, 128); err != nil {
		return ConnRateResult{}, err
	}
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		return ConnRateResult{}, err
	}
	var res ConnRateResult
	var n int
	var elapsed time.Duration
	err = <-onThread(-1, func() error {
		var loopErr error
		o.DialIn(func() {
			if loopErr = pinThread(o.CPU); loopErr != nil {
				return
			}
			req := bytes.Repeat([]byte("c"), o.Size)
			buf := make([]byte, o.Size)
			start := time.Now()
			deadline := start.Add(dur)
			t0 := start
			for ; ; n++ {
				req[0] = byte(n)
				if err := oneConnection(lfd, sa, req, buf, &o); err != nil {
					loopErr = fmt.Errorf("connection %d: %w", n, err)
					return
				}
				t1 := time.Now()
				d := t1.Sub(t0)
				res.Slowest = max(res.Slowest, d)
				if d > StallAfter {
					res.Stalled++
				}
				t0 = t1
				if n%16 == 0 && t1.After(deadline) {
					break
				}
			}
			elapsed = time.Since(start)
		})
		return loopErr
	})
	if err != nil {
		return ConnRateResult{}, err
	}
	res.Connections = n + 1
	res.Rate = float64(res.Connections) / elapsed.Seconds()
	return res, nil
}

// pinThread pins the calling thread to cpu (cpu >= 0).
func pinThread(cpu int) error {
	if cpu < 0 {
		return nil
	}
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin to CPU %d: %w", cpu, err)
	}
	return nil
}

// oneConnection connects to the listener lfd (at sa), sends req, has the
// server echo it, checks it, and closes both ends. With o.Blocking, the
// client and the accepted socket are blocking (the connect returns once
// the handshake is done, so the accept finds the connection queued); with
// o.GoSockopts, each gets Go's options, the client once connected (a
// non-blocking connect has completed once the listener has the connection
// queued).
func oneConnection(lfd int, sa unix.Sockaddr, req, buf []byte, o *ConnRateOpts) error {
	flags := unix.SOCK_CLOEXEC | unix.SOCK_NONBLOCK
	if o.Blocking {
		flags = unix.SOCK_CLOEXEC
	}
	cfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|flags, 0)
	if err != nil {
		return err
	}
	defer unix.Close(cfd)
	if err := unix.Connect(cfd, sa); err != nil && err != unix.EINPROGRESS {
		return err
	}
	if !o.Blocking {
		if err := waitFD(lfd, unix.POLLIN); err != nil {
			return err
		}
	}
	if o.GoSockopts {
		if err := setGoSockopts(cfd); err != nil {
			return fmt.Errorf("client: %w", err)
		}
	}
	sfd, _, err := unix.Accept4(lfd, flags)
	if err != nil {
		return err
	}
	defer unix.Close(sfd)
	if o.GoSockopts {
		if err := setGoSockopts(sfd); err != nil {
			return fmt.Errorf("server: %w", err)
		}
	}
	if o.checkConn != nil {
		if err := o.checkConn(cfd, sfd); err != nil {
			return err
		}
	}
	if err := writeFull(cfd, req); err != nil {
		return fmt.Errorf("client write: %w", err)
	}
	if err := readFull(sfd, buf); err != nil {
		return fmt.Errorf("server read: %w", err)
	}
	if err := writeFull(sfd, buf); err != nil {
		return fmt.Errorf("server write: %w", err)
	}
	if err := readFull(cfd, buf); err != nil {
		return fmt.Errorf("client read: %w", err)
	}
	if !bytes.Equal(buf, req) {
		return errors.New("answer differs from the request")
	}
	return nil
}
