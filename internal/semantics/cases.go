package semantics

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Expectation says how sockbypass keeps a case the same as plain TCP with
// non-blocking sockets (blocking sockets are never accelerated).
type Expectation string

// Expectations.
const (
	// FastPath: the case behaves like plain TCP on the redirected path.
	FastPath Expectation = "preserved"
	// Fallback: sockbypass keeps the connection on the normal TCP path
	// before a byte could be delivered differently, and counts it.
	Fallback Expectation = "falls back automatically"
	// Limitation: the kernel offers no hook to catch the case in time;
	// sockbypass cannot keep it, and doctor reports it.
	Limitation Expectation = "known limitation"
	// NotAccelerated: what every case expects with blocking sockets,
	// which are never accelerated (WhyBlocking).
	NotAccelerated Expectation = "not accelerated"
)

// Env is what a case gets from the harness.
type Env struct {
	// Mode is how the case's sockets block.
	Mode Mode
	// Connect returns a new connected pair in the mode under test.
	Connect func(ConnOpts) (Pair, error)
	// Disrupt, when set, is called by the cases that check that changes
	// to the installation (disable, uninstall) lose nothing.
	Disrupt func() error
	// StackPort is a server port listed in the accelerated cgroup's stack
	// ports (the plain run uses it too).
	StackPort int
}

// Case is one transparency case.
type Case struct {
	Name string
	// Expect is how sockbypass keeps it with non-blocking sockets, How
	// says by which mechanism (or, for a limitation, why it cannot).
	Expect Expectation
	How    string
	// Counter names the counter the accelerated non-blocking run moves
	// (see CounterValue; "" for none): a Fallback case falls back only
	// when it moves.
	Counter string
	// PassesLater declares that the case's members stop redirecting
	// mid-connection by design (they leave the sockhash, or pass under
	// back-pressure), which Counter counts: their later bytes take the
	// stack (PassedBytes). A run of any other case that redirected bytes
	// is preserved only when no byte of a member took the stack.
	PassesLater bool
	Run         func(env *Env) (string, error)
	// Limit is, for a Limitation, what the accelerated non-blocking run
	// observes: any other difference from plain TCP is BROKEN.
	Limit string
}

const (
	howJoined       = "both ends join the sockhash at ESTABLISHED or neither does (pair handshake); a member redirects every byte from the first one, so it never holds stack bytes"
	howStackOptions = "its accepted sockets inherit the option, which sock_ops reads from the socket at PASSIVE_ESTABLISHED: they decline the pair handshake and the connection stays plain TCP; the listener (marked a stack reader at listen(), or by its first such socket) offers no pair to later ones"
	howWaitall      = "members are non-blocking (blocking sockets never join): recv(MSG_WAITALL) on a non-blocking socket returns what is queued, as on plain TCP; the pair stays redirected"
)

// howLeaving says how a member that stops being safe leaves, found by how.
func howLeaving(how string) string {
	return how + ": its peer stops redirecting to it, and once it has read what was redirected to it, it and its peer leave the sockhash (the member's later bytes are plain TCP's)"
}

// howSplice says why the splice readers of what cannot be kept.
func howSplice(what string) string {
	return "doctor measures a listener's first connection with --no-probation, the proxy starting to copy once the client's first bytes are queued: they are redirected before the first splice, which reads only the stack queue and sees the FIN and no data (" + what + "); by default a new listener's connections stay plain until one is read with recvmsg, and a splice keeps the listener's and the process's later connections plain; list the proxy's own port in --stack-ports to keep them plain from the start"
}

// Cases returns every case, in a stable order.
func Cases() []Case {
	return []Case{
		{Name: "reads and writes of many sizes", Expect: FastPath, How: howJoined + "; redirected bytes arrive whole and in order", Run: caseSizes},
		{Name: "MSG_PEEK", Expect: FastPath, How: "the kernel peeks the redirected queue, which holds every byte of a member", Run: casePeek},
		{Name: "FIONREAD", Expect: FastPath, How: "FIONREAD counts the redirected queue, which holds every byte of a member", Run: caseFionread},
		{Name: "FIONREAD on the first bytes of a connection, before any read", Expect: FastPath, How: "the pair joins before the first byte (client at ACTIVE_ESTABLISHED, server at PASSIVE_ESTABLISHED), and a client that sends before its server joined gives the pair up: first bytes never sit on the stack of a member", Run: caseFionreadFirst},
		{Name: "FIONREAD on a reader that set SO_RCVLOWAT before connect", Expect: Fallback, How: "sock_ops reads the option from the client socket at ACTIVE_ESTABLISHED: it declines the pair handshake and the connection stays plain TCP", Counter: "rcvlowat", Run: caseFionreadRcvlowat},
		{Name: "poll and epoll readiness", Expect: FastPath, How: "readiness follows the redirected queue, which holds every byte of a member", Run: casePoll},
		{Name: "half-close (shutdown SHUT_WR), reply after EOF", Expect: FastPath, How: "the FIN takes the stack after every redirected byte; the reader empties the redirected queue first", Run: caseHalfClose},
		{Name: "RST after data", Expect: FastPath, How: "the RST takes the stack after the redirected bytes", Run: caseRST},
		{Name: "close right after a large write", Expect: FastPath, How: "redirected bytes stay queued at the reader after the writer closes", Run: caseCloseAfterWrite},
		{Name: "sendfile into the socket", Expect: FastPath, How: "sendfile pages go through sk_msg like sendmsg", Run: caseSendfile},
		{Name: "short connections writing right after connect, records in order", Expect: FastPath, How: "the pair handshake: a client that writes before its server joined gives the pair up atomically and the server stays out; otherwise every byte is redirected from the first", Run: caseShortConns},
		{Name: "MSG_WAITALL from the first read", Expect: FastPath, How: howWaitall, Run: caseWaitallFirst},
		{Name: "SO_RCVLOWAT set on the listener", Expect: Fallback, How: howStackOptions, Counter: "rcvlowat", Run: caseRcvlowat},
		{Name: "SO_RCVLOWAT set on the listener after listen()", Expect: Fallback, How: howStackOptions, Counter: "rcvlowat", Run: caseRcvlowatAfterListen},
		{Name: "TCP_INQ set on the listener", Expect: Fallback, How: howStackOptions, Counter: "tcp_inq", Run: caseTCPInq},
		{Name: "MSG_OOB with SO_OOBINLINE set on the listener", Expect: Fallback, How: howStackOptions, Counter: "oobinline", Run: caseOOBInline},
		{Name: "splice(2) from the socket (never read with recvmsg)", Expect: Fallback, How: "the stack-read tracer (tp_btf/tcp_rcv_space_adjust) sees the first splice, even of an empty queue: a member with nothing redirected unread leaves the sockhash with its pair, its bytes take the stack and splice reads them (bytes redirected before the first splice stall: see the Go proxy row)", Counter: "splice_readers", PassesLater: true, Run: caseSpliceOnly},
		{Name: "Go io.Copy TCP->TCP proxy (splice)", Expect: Limitation, How: howSplice("Go's io.Copy between two TCPConns splices"), Run: caseGoProxy,
			Limit: `proxy copied 0; server got 0 bytes sha256:e3b0c44298fc, equal=false, end""`},
		{Name: "Go io.Copy TCP->TCP proxy (splice) with its port in --stack-ports", Expect: Fallback, How: "sock_ops leaves out of the pair handshake a connection whose server port the cgroup of either end lists in --stack-ports, and every connection a process makes while it listens on a stack port of its cgroup (the proxy's to its server): they stay plain TCP, and splice reads them", Counter: "stack_port", Run: caseGoProxyStackPort},
		{Name: "a stalled reader makes its writer block (flow control)", Expect: FastPath, How: "a sender stops redirecting when 64 MiB it redirected are unread; its next bytes take the stack, whose flow control blocks it", Counter: "backpressure", PassesLater: true, Run: caseStalledReader},
		{Name: "slow reader holding 4+ MiB across disable and uninstall", Expect: FastPath, How: "sockets are never removed from the sockhash; they leave it when they close", Run: caseSlowReaderDisrupt},
		{Name: "MSG_WAITALL after plain reads", Expect: FastPath, How: howWaitall, Run: caseWaitallLater},
		{Name: "SO_RCVLOWAT set after the connection is established", Expect: Fallback, How: howLeaving("the option is read from the member's socket at the next message either end sends (its sk_msg, its peer's, or sock_ops on its stack packets), which marks it leaving"), Counter: "late_stack_options", PassesLater: true, Run: caseRcvlowatLate},
		{Name: "SO_RCVLOWAT set after bytes were redirected", Expect: FastPath, How: howLeaving("the option is read from the member's socket at the next message either end sends (its sk_msg, its peer's, or sock_ops on its stack packets), which marks it leaving"), Counter: "members_left", PassesLater: true, Run: caseRcvlowatAfterBytes},
		{Name: "TCP_INQ set after the connection is established", Expect: Fallback, How: howLeaving("the option is read from the member's socket at the next message either end sends (its sk_msg, its peer's, or sock_ops on its stack packets), which marks it leaving"), Counter: "late_stack_options", PassesLater: true, Run: caseTCPInqLate},
		{Name: "write after shutdown(SHUT_WR)", Expect: FastPath, How: "sk_msg passes every message of a socket that is not ESTABLISHED or CLOSE_WAIT: the stack refuses it with EPIPE, as plain TCP does, and nothing reaches the peer after the FIN", Run: caseWriteAfterShutdown},
		{Name: "server made blocking after bytes were redirected, FIONREAD on later bytes", Expect: FastPath, How: howLeaving("the client's sk_msg sees the server's file turn blocking"), Counter: "members_left", PassesLater: true, Run: caseServerBlockingLater},
		{Name: "client made blocking after bytes were redirected, sends, then FIONREAD on the reply", Expect: FastPath, How: howLeaving("the client's own sk_msg sees its file turn blocking"), Counter: "late_blocking", PassesLater: true, Run: caseClientBlockingLater},
		{Name: "MSG_OOB without SO_OOBINLINE", Expect: Limitation, How: "no hook sees send flags before sk_msg: the urgent byte is redirected inline", Run: caseOOB,
			Limit: `stream="abcde" urgent=error EAGAIN`},
		{Name: "recv, then splice(2) on the same socket", Expect: Fallback, How: "the stack-read tracer (tp_btf/tcp_rcv_space_adjust) sees the splice: a member with nothing redirected unread leaves the sockhash with its pair, its later bytes take the stack and splice reads them (with redirected bytes unread it would stall: splice_stalled)", Counter: "splice_readers", PassesLater: true, Run: caseRecvThenSplice},
	}
}

// run connects with o, runs fn, closes.
func run(env *Env, o ConnOpts, fn func(p *Pair) (string, error)) (string, error) {
	p, err := env.Connect(o)
	if err != nil {
		return "", fmt.Errorf("connect: %w", err)
	}
	defer p.Close()
	return fn(&p)
}

// parallel runs fns concurrently and returns the first error.
func parallel(fns ...func() error) error {
	errs := make([]error, len(fns))
	var wg sync.WaitGroup
	for i, fn := range fns {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = fn() }()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

func digest(b []byte) string {
	h := sha256.Sum256(b)
	return fmt.Sprintf("%d bytes sha256:%x", len(b), h[:6])
}

func caseSizes(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		var out []string
		for i, size := range []int{1, 2, 7, 100, 1000, 1460, 4096, 4097, 65535, 65536, 65537, 1<<20 + 3, 4 << 20} {
			data := pattern(byte(i), size)
			var got, echo []byte
			err := parallel(
				func() error { return writeAll(p.C, data) },
				func() (err error) {
					if got, err = readN(p.S, size); err != nil {
						return err
					}
					return writeAll(p.S, got)
				},
				func() (err error) { echo, err = readN(p.C, size); return err },
			)
			if err != nil {
				return "", fmt.Errorf("size %d: %w", size, err)
			}
			out = append(out, fmt.Sprintf("%d:%v/%v", size, bytes.Equal(got, data), bytes.Equal(echo, data)))
		}
		return strings.Join(out, " "), nil
	})
}

// waitReadable polls fd for POLLIN for up to timeout (0: just look) and
// returns its revents (0 when it did not become readable).
func waitReadable(fd int, timeout time.Duration) (int16, error) {
	re, err := waitFD(fd, unix.POLLIN, time.Now().Add(timeout))
	if err == errTimedOut {
		return 0, nil
	}
	return re, err
}

// arriveTimeout bounds the wait for bytes sent to be queued at their
// reader.
const arriveTimeout = 2 * time.Second

// arrived waits until fd has at least n bytes queued (FIONREAD), for up
// to arriveTimeout, and returns how many it has. It does not fail: when
// the bytes never show, the case observes what there is, which then
// differs from plain TCP.
func arrived(fd, n int) (int, error) {
	deadline := time.Now().Add(arriveTimeout)
	for {
		queued, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
		if err != nil || queued >= n || time.Now().After(deadline) {
			return queued, err
		}
		if _, err := waitReadable(fd, time.Millisecond); err != nil {
			return queued, err
		}
	}
}

// settle waits until fd is readable and the n bytes sent to it are
// queued.
func settle(fd, n int) error {
	re, err := waitReadable(fd, opTimeout)
	if err != nil {
		return err
	}
	if re == 0 {
		return fmt.Errorf("not readable within %v", opTimeout)
	}
	_, err = arrived(fd, n)
	return err
}

func casePeek(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := writeAll(p.C, []byte("hello world")); err != nil {
			return "", err
		}
		if err := settle(p.S, 11); err != nil {
			return "", err
		}
		buf := make([]byte, 5)
		n, _, err := unix.Recvfrom(p.S, buf, unix.MSG_PEEK)
		if err != nil {
			return "", err
		}
		all, err := readN(p.S, 11)
		return fmt.Sprintf("peek=%q then read=%q", buf[:n], all), err
	})
}

// fionread reports FIONREAD of fd once the n bytes sent to it have
// arrived (or arriveTimeout has passed).
func fionread(fd, n int) (string, error) {
	if err := settle(fd, n); err != nil {
		return "", err
	}
	n, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
	return fmt.Sprintf("FIONREAD=%d", n), err
}

func caseFionread(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := writeAll(p.C, pattern(1, 1000)); err != nil {
			return "", err
		}
		return fionread(p.S, 1000)
	})
}

// caseFionreadFirst: the client's first bytes leave right after connect,
// before the server accepts; the server asks FIONREAD before any read.
func caseFionreadFirst(env *Env) (string, error) {
	first := ConnOpts{Connected: func(fd int) error { return writeAll(fd, pattern(16, 1000)) }}
	return run(env, first, func(p *Pair) (string, error) {
		out, err := fionread(p.S, 1000)
		if err != nil {
			return "", err
		}
		if err := writeAll(p.C, pattern(17, 500)); err != nil {
			return "", err
		}
		more, err := fionread(p.S, 1500)
		return out + ", then " + more, err
	})
}

// caseFionreadRcvlowat: a client that set SO_RCVLOWAT before connect asks
// FIONREAD of the server's first bytes.
func caseFionreadRcvlowat(env *Env) (string, error) {
	lowat := ConnOpts{Client: func(fd int) error { return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 500) }}
	return run(env, lowat, func(p *Pair) (string, error) {
		if err := writeAll(p.S, pattern(18, 1000)); err != nil {
			return "", err
		}
		out, err := fionread(p.C, 1000)
		if err != nil {
			return "", err
		}
		if _, err := readN(p.C, 1000); err != nil {
			return "", err
		}
		if err := writeAll(p.S, pattern(19, 700)); err != nil {
			return "", err
		}
		more, err := fionread(p.C, 700)
		return out + ", after reading it and 700 more " + more, err
	})
}

func casePoll(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		before, err := waitReadable(p.S, 0)
		if err != nil {
			return "", err
		}
		ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			return "", err
		}
		defer unix.Close(ep)
		if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, p.S, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(p.S)}); err != nil {
			return "", err
		}
		events := make([]unix.EpollEvent, 4)
		idle, _ := unix.EpollWait(ep, events, 0)
		if err := writeAll(p.C, []byte{1}); err != nil {
			return "", err
		}
		after, err := waitReadable(p.S, opTimeout)
		if err != nil {
			return "", err
		}
		ready, _ := unix.EpollWait(ep, events, int(opTimeout/time.Millisecond))
		if _, err := readN(p.S, 1); err != nil {
			return "", err
		}
		drained, _ := waitReadable(p.S, 0)
		return fmt.Sprintf("poll idle=%#x after write=%#x after read=%#x; epoll idle=%d ready=%d", before, after, drained, idle, ready), nil
	})
}

func caseHalfClose(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		data := pattern(3, 300_001)
		var got []byte
		var end string
		err := parallel(
			func() error {
				if err := writeAll(p.C, data); err != nil {
					return err
				}
				return unix.Shutdown(p.C, unix.SHUT_WR)
			},
			func() error {
				got, end = readToEOF(p.S)
				if err := writeAll(p.S, []byte("reply after EOF")); err != nil {
					return err
				}
				return unix.Shutdown(p.S, unix.SHUT_WR)
			},
		)
		if err != nil {
			return "", err
		}
		reply, replyEnd := readToEOF(p.C)
		return fmt.Sprintf("server got %s then EOF%q; client got %q then EOF%q", digest(got), end, reply, replyEnd), nil
	})
}

func caseRST(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		data := pattern(4, 1000)
		if err := writeAll(p.C, data); err != nil {
			return "", err
		}
		if err := unix.SetsockoptLinger(p.C, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
			return "", err
		}
		unix.Close(p.C)
		p.C = -1
		// Read once the RST has arrived: the reader finds the data and
		// the reset both queued.
		if err := waitTCPState(p.S, tcpClose); err != nil {
			return "", err
		}
		got, end := readToEOF(p.S)
		return fmt.Sprintf("read %s then %q", digest(got), end), nil
	})
}

// waitTCPState waits, for up to opTimeout, until fd's TCP state is state.
func waitTCPState(fd int, state uint8) error {
	deadline := time.Now().Add(opTimeout)
	for {
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return err
		}
		if info.State == state {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("TCP state %d, not %d, after %v", info.State, state, opTimeout)
		}
		time.Sleep(time.Millisecond)
	}
}

// tcpClose is TCP_CLOSE, the state a socket is in once reset.
const tcpClose = 7

func caseCloseAfterWrite(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		data := pattern(5, 4<<20)
		var got []byte
		var end string
		err := parallel(
			func() error {
				if err := writeAll(p.C, data); err != nil {
					return err
				}
				unix.Close(p.C)
				p.C = -1
				return nil
			},
			func() error {
				// The reader starts late (the writer may have closed
				// already): whatever the delay, it reads everything.
				time.Sleep(100 * time.Millisecond)
				got, end = readToEOF(p.S)
				return nil
			},
		)
		return fmt.Sprintf("read %s, equal=%v, then EOF%q", digest(got), bytes.Equal(got, data), end), err
	})
}

func caseSendfile(env *Env) (string, error) {
	f, err := os.CreateTemp("", "sockbypass-sendfile-")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	data := pattern(6, 1<<20+11)
	if _, err := f.Write(data); err != nil {
		return "", err
	}
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		var got []byte
		var end string
		err := parallel(
			func() error {
				var off int64
				w := newWaiter()
				for off < int64(len(data)) {
					_, err := unix.Sendfile(p.C, int(f.Fd()), &off, len(data)-int(off))
					if retry(err) {
						if werr := w.wait(p.C, unix.POLLOUT); werr != nil {
							return fmt.Errorf("sendfile: %w (%w)", err, werr)
						}
						continue
					}
					if err != nil {
						return fmt.Errorf("sendfile: %w", err)
					}
					w.progress()
				}
				return unix.Shutdown(p.C, unix.SHUT_WR)
			},
			func() error { got, end = readToEOF(p.S); return nil },
		)
		return fmt.Sprintf("read %s, equal=%v, then EOF%q", digest(got), bytes.Equal(got, data), end), err
	})
}

func caseShortConns(env *Env) (string, error) {
	const conns, records = 60, 12
	for i := 0; i < conns; i++ {
		var want bytes.Buffer
		for r := 0; r < records; r++ {
			fmt.Fprintf(&want, "conn %03d record %03d|", i, r)
		}
		rec := want.Bytes()
		size := len(rec) / records
		// The first record right after connect, before the server
		// accepts; the rest while the reader reads.
		first := ConnOpts{Connected: func(fd int) error { return writeAll(fd, rec[:size]) }}
		out, err := run(env, first, func(p *Pair) (string, error) {
			var got bytes.Buffer
			var end string
			err := parallel(
				func() error {
					for r := 1; r < records; r++ {
						if err := writeAll(p.C, rec[r*size:(r+1)*size]); err != nil {
							return err
						}
						if r%4 == 0 {
							time.Sleep(time.Millisecond)
						}
					}
					return unix.Shutdown(p.C, unix.SHUT_WR)
				},
				func() error {
					b, e := readToEOF(p.S)
					got.Write(b)
					end = e
					return nil
				},
			)
			if err != nil {
				return "", err
			}
			if !bytes.Equal(got.Bytes(), rec) || end != "" {
				return fmt.Sprintf("connection %d: records out of order or lost: %q (%s)", i, got.String(), end), nil
			}
			return "", nil
		})
		if err != nil || out != "" {
			return out, err
		}
	}
	return fmt.Sprintf("%d connections x %d records in order", conns, records), nil
}

// recvWaitall calls recv(MSG_WAITALL) on a thread with signals blocked: a
// signal (Go's preemption signal) ends a blocking MSG_WAITALL early even on
// plain TCP.
func recvWaitall(fd, n int) (int, error) {
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // the thread exits with the goroutine: its mask dies with it
		var all, old unix.Sigset_t
		for i := range all.Val {
			all.Val[i] = ^uint64(0)
		}
		unix.PthreadSigmask(unix.SIG_BLOCK, &all, &old)
		buf := make([]byte, n)
		got, _, err := unix.Recvfrom(fd, buf, unix.MSG_WAITALL)
		done <- result{got, err}
	}()
	r := <-done
	return r.n, r.err
}

// waitallRound writes 100 bytes, then 100 more, while the reader asks for
// all 200 with MSG_WAITALL; it returns what that read got, and reads the
// rest. A non-blocking reader reads once the socket is readable, and the
// second 100 bytes leave only after that read returned. A blocking reader
// waits in its read for both: the second 100 bytes leave 100 ms after the
// first, while it waits (whenever they arrive, it gets 200).
func waitallRound(p *Pair) (n int, err error) {
	firstRead := make(chan struct{})
	err = parallel(
		func() error {
			if err := writeAll(p.C, pattern(7, 100)); err != nil {
				return err
			}
			if p.Mode == NonBlocking {
				select {
				case <-firstRead:
				case <-time.After(opTimeout):
					return fmt.Errorf("the reader did not read within %v", opTimeout)
				}
			} else {
				time.Sleep(100 * time.Millisecond)
			}
			return writeAll(p.C, pattern(8, 100))
		},
		func() (err error) {
			if p.Mode == NonBlocking {
				if _, err := waitReadable(p.S, opTimeout); err != nil {
					return err
				}
			}
			n, err = recvWaitall(p.S, 200)
			close(firstRead)
			if err != nil {
				return err
			}
			_, err = readN(p.S, 200-n)
			return err
		},
	)
	return n, err
}

func caseWaitallFirst(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		var results []string
		for round := 0; round < 3; round++ {
			n, err := waitallRound(p)
			if err != nil {
				return "", err
			}
			results = append(results, fmt.Sprintf("recv(200, MSG_WAITALL)=%d", n))
		}
		return strings.Join(results, " "), nil
	})
}

func caseWaitallLater(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		n, err := waitallRound(p)
		return fmt.Sprintf("recv(200, MSG_WAITALL)=%d", n), err
	})
}

func setRcvlowat(fd int) error {
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1000)
}

// rcvlowatRounds: the reader has SO_RCVLOWAT 1000; the writer sends 600
// bytes, then 400 more. Once the 600 have arrived, the reader looks
// whether the socket is readable: if so it reads what is there before the
// 400 leave; if not, the 400 leave and it waits for the socket to become
// readable and reads what is there.
func rcvlowatRounds(p *Pair) (string, error) {
	var results []string
	for round := 0; round < 2; round++ {
		var early int16
		var n int
		looked := make(chan struct{})
		err := parallel(
			func() error {
				if err := writeAll(p.C, pattern(9, 600)); err != nil {
					return err
				}
				select {
				case <-looked:
				case <-time.After(opTimeout):
					return fmt.Errorf("the reader did not look within %v", opTimeout)
				}
				return writeAll(p.C, pattern(10, 400))
			},
			func() (err error) {
				read := func() (err error) {
					buf := make([]byte, 4096)
					n, _, err = unix.Recvfrom(p.S, buf, unix.MSG_DONTWAIT)
					return err
				}
				_, err = arrived(p.S, 600)
				if err == nil {
					early, err = waitReadable(p.S, 0)
				}
				if err == nil && early&unix.POLLIN != 0 {
					err = read()
				}
				close(looked)
				if err != nil {
					return err
				}
				if early&unix.POLLIN == 0 {
					if _, err = waitReadable(p.S, 2*time.Second); err != nil {
						return err
					}
					if err = read(); err != nil {
						return err
					}
				}
				_, err = readN(p.S, 1000-n)
				return err
			},
		)
		if err != nil {
			return "", err
		}
		results = append(results, fmt.Sprintf("readable with 600 of 1000 bytes=%v, first read=%d", early&unix.POLLIN != 0, n))
		if err := writeAll(p.S, []byte("ok")); err != nil {
			return "", err
		}
		if _, err := readN(p.C, 2); err != nil {
			return "", err
		}
	}
	return strings.Join(results, "; "), nil
}

func caseRcvlowat(env *Env) (string, error) {
	return run(env, ConnOpts{Listener: setRcvlowat}, rcvlowatRounds)
}

func caseRcvlowatAfterListen(env *Env) (string, error) {
	return run(env, ConnOpts{AfterListen: setRcvlowat}, rcvlowatRounds)
}

func caseRcvlowatLate(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := setRcvlowat(p.S); err != nil {
			return "", err
		}
		return rcvlowatRounds(p)
	})
}

// caseRcvlowatAfterBytes: bytes are redirected both ways, then the
// reader sets SO_RCVLOWAT.
func caseRcvlowatAfterBytes(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := setRcvlowat(p.S); err != nil {
			return "", err
		}
		return rcvlowatRounds(p)
	})
}

// caseWriteAfterShutdown: the client writes, shuts its side down and
// writes again; the server reads to EOF, then once more.
func caseWriteAfterShutdown(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := writeAll(p.C, []byte("before-fin")); err != nil {
			return "", err
		}
		if err := unix.Shutdown(p.C, unix.SHUT_WR); err != nil {
			return "", err
		}
		got, end := readToEOF(p.S)
		_, werr := unix.SendmsgN(p.C, []byte("after-fin"), nil, nil, unix.MSG_NOSIGNAL)
		time.Sleep(20 * time.Millisecond)
		buf := make([]byte, 64)
		n, rerr := unix.Read(p.S, buf)
		return fmt.Sprintf("server got %q then EOF%q; write after SHUT_WR: %v; server then read %q (%v)", got, end, werr, buf[:max(n, 0)], rerr), nil
	})
}

// acceptGrace is ACCEPT_GRACE_NS of bpf/sockbypass.h.
const acceptGrace = 10 * time.Millisecond

// fionreadRounds: the writer sends 1000 bytes three times; the reader
// asks FIONREAD once they arrived, then reads them.
func fionreadRounds(writer, reader int) (string, error) {
	var out []string
	for round := 0; round < 3; round++ {
		data := pattern(byte(40+round), 1000)
		if err := writeAll(writer, data); err != nil {
			return "", err
		}
		n, err := fionread(reader, len(data))
		if err != nil {
			return "", err
		}
		got, err := readN(reader, len(data))
		if err != nil {
			return "", err
		}
		out = append(out, fmt.Sprintf("%s, read equal=%v", n, bytes.Equal(got, data)))
	}
	return strings.Join(out, "; "), nil
}

// caseServerBlockingLater: bytes are redirected both ways, then the
// server's socket is made blocking (as a server that makes its accepted
// sockets blocking) and the client sends.
func caseServerBlockingLater(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := unix.SetNonblock(p.S, false); err != nil {
			return "", err
		}
		// Later in its life than right after accept(): a peer found
		// blocking within ACCEPT_GRACE_NS (10 ms) of its file's discovery
		// is not taken for blocking yet (see bpf/sockbypass.h).
		time.Sleep(2 * acceptGrace)
		return fionreadRounds(p.C, p.S)
	})
}

// caseClientBlockingLater: bytes are redirected both ways, then the
// client's socket is made blocking (as a client that connects with a
// timeout, then blocks); it sends a request and reads the reply.
func caseClientBlockingLater(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := unix.SetNonblock(p.C, false); err != nil {
			return "", err
		}
		if err := writeAll(p.C, []byte("request")); err != nil {
			return "", err
		}
		if _, err := readN(p.S, 7); err != nil {
			return "", err
		}
		return fionreadRounds(p.S, p.C)
	})
}

func setTCPInq(fd int) error { return unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_INQ, 1) }

// tcpInqRounds: the reader has TCP_INQ; it reads 60 of 100 bytes and
// reports the TCP_CM_INQ it got.
func tcpInqRounds(p *Pair) (string, error) {
	var results []string
	for round := 0; round < 2; round++ {
		if err := writeAll(p.C, pattern(11, 100)); err != nil {
			return "", err
		}
		if err := settle(p.S, 100); err != nil {
			return "", err
		}
		buf := make([]byte, 60)
		oob := make([]byte, 64)
		n, oobn, _, _, err := unix.Recvmsg(p.S, buf, oob, 0)
		if err != nil {
			return "", err
		}
		inq := "absent"
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				if m.Header.Level == unix.SOL_TCP && m.Header.Type == unix.TCP_CM_INQ && len(m.Data) >= 4 {
					inq = fmt.Sprint(int32(uint32(m.Data[0]) | uint32(m.Data[1])<<8 | uint32(m.Data[2])<<16 | uint32(m.Data[3])<<24))
				}
			}
		}
		if _, err := readN(p.S, 100-n); err != nil {
			return "", err
		}
		results = append(results, fmt.Sprintf("read=%d inq=%s", n, inq))
	}
	return strings.Join(results, "; "), nil
}

func caseTCPInq(env *Env) (string, error) {
	return run(env, ConnOpts{Listener: setTCPInq}, tcpInqRounds)
}

func caseTCPInqLate(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := setTCPInq(p.S); err != nil {
			return "", err
		}
		return tcpInqRounds(p)
	})
}

// sendWithUrgent sends "ab", "c" as urgent data, "de".
func sendWithUrgent(fd int) error {
	if err := writeAll(fd, []byte("ab")); err != nil {
		return err
	}
	if err := unix.Sendto(fd, []byte("c"), unix.MSG_OOB, nil); err != nil {
		return fmt.Errorf("send MSG_OOB: %w", err)
	}
	time.Sleep(10 * time.Millisecond)
	return writeAll(fd, []byte("de"))
}

// drain reads fd until everything its peer writer wrote has been
// delivered (see delivered) and nothing is left to read in line, or EOF,
// an error, or opTimeout.
func drain(fd, writer int) []byte {
	var out []byte
	buf := make([]byte, 64)
	deadline := time.Now().Add(opTimeout)
	for time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
		if n > 0 {
			out = append(out, buf[:n]...)
			continue
		}
		if !retry(err) {
			return out
		}
		// Nothing in line: done once nothing is on its way either.
		if unsent, err := unix.IoctlGetInt(writer, unix.SIOCOUTQ); err != nil || unsent == 0 {
			if re, err := waitReadable(fd, 0); err != nil || re&unix.POLLIN == 0 {
				return out
			}
			continue
		}
		waitReadable(fd, time.Millisecond)
	}
	return out
}

func caseOOBInline(env *Env) (string, error) {
	inline := ConnOpts{Listener: func(fd int) error { return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_OOBINLINE, 1) }}
	return run(env, inline, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := sendWithUrgent(p.C); err != nil {
			return "", err
		}
		return fmt.Sprintf("stream=%q", drain(p.S, p.C)), nil
	})
}

func caseOOB(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := sendWithUrgent(p.C); err != nil {
			return "", err
		}
		normal := drain(p.S, p.C)
		buf := make([]byte, 4)
		n, _, err := unix.Recvfrom(p.S, buf, unix.MSG_OOB|unix.MSG_DONTWAIT)
		urgent := "error " + errName(err)
		if err == nil {
			urgent = fmt.Sprintf("%q", buf[:n])
		}
		return fmt.Sprintf("stream=%q urgent=%s", normal, urgent), nil
	})
}

// spliceAll reads fd to EOF through a pipe with splice(2).
func spliceAll(fd int) ([]byte, string) {
	var pipe [2]int
	if err := unix.Pipe2(pipe[:], unix.O_CLOEXEC); err != nil {
		return nil, errName(err)
	}
	defer unix.Close(pipe[0])
	defer unix.Close(pipe[1])
	var out []byte
	buf := make([]byte, 64<<10)
	end := untilEOF(fd, func() (int, error) {
		n, err := unix.Splice(fd, nil, pipe[1], nil, 64<<10, unix.SPLICE_F_MOVE)
		for left := n; left > 0; {
			m, err := unix.Read(pipe[0], buf[:min(int(left), len(buf))])
			if err != nil {
				return 0, err // a failed drain of the pipe ends the read
			}
			out = append(out, buf[:m]...)
			left -= int64(m)
		}
		return int(n), err
	})
	return out, end
}

// spliceFirst makes one splice from fd before the writer starts (it then
// closes started): a non-blocking socket with nothing queued returns
// EAGAIN at once. The splice rows measure a reader that splices an idle
// socket, every run; a socket with redirected bytes waiting at its first
// splice is the Go proxy row.
func spliceFirst(fd int, started chan<- struct{}) {
	defer close(started)
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil || flags&unix.O_NONBLOCK == 0 {
		return // a blocking splice would wait for the writer
	}
	var pipe [2]int
	if err := unix.Pipe2(pipe[:], unix.O_CLOEXEC); err != nil {
		return
	}
	unix.Splice(fd, nil, pipe[1], nil, 1, unix.SPLICE_F_NONBLOCK)
	unix.Close(pipe[0])
	unix.Close(pipe[1])
}

func caseSpliceOnly(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		data := pattern(12, 1<<20)
		var got []byte
		var end string
		started := make(chan struct{})
		err := parallel(
			func() error {
				<-started
				for i := 0; i < 4; i++ {
					if err := writeAll(p.C, data[i<<18:(i+1)<<18]); err != nil {
						return err
					}
					time.Sleep(5 * time.Millisecond)
				}
				return unix.Shutdown(p.C, unix.SHUT_WR)
			},
			func() error { spliceFirst(p.S, started); got, end = spliceAll(p.S); return nil },
		)
		return fmt.Sprintf("spliced %s, equal=%v, end%q", digest(got), bytes.Equal(got, data), end), err
	})
}

func caseRecvThenSplice(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		data := pattern(13, 256<<10)
		var got []byte
		var end string
		started := make(chan struct{})
		err := parallel(
			func() error {
				<-started
				if err := writeAll(p.C, data); err != nil {
					return err
				}
				return unix.Shutdown(p.C, unix.SHUT_WR)
			},
			func() error { spliceFirst(p.S, started); got, end = spliceAll(p.S); return nil },
		)
		return fmt.Sprintf("spliced %s, equal=%v, end%q", digest(got), bytes.Equal(got, data), end), err
	})
}

// fileConn wraps a duplicate of fd as a *net.TCPConn; fd itself stays
// owned by the caller (an os.File on it would close it when collected).
// The duplicate shares fd's file: net.FileConn makes it non-blocking.
func fileConn(fd int) (*net.TCPConn, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(dup), "tcp")
	defer f.Close() // net.FileConn made its own duplicate
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func caseGoProxy(env *Env) (string, error) {
	return goProxy(env, ConnOpts{}, func() (Pair, error) { return env.Connect(ConnOpts{}) })
}

// caseGoProxyStackPort: only the proxy's own port is a stack port, and the
// proxy connects to its server while it listens there, as a real proxy
// does.
func caseGoProxyStackPort(env *Env) (string, error) {
	var out Pair
	var outErr error
	in := ConnOpts{Port: env.StackPort, Connected: func(int) error {
		out, outErr = env.Connect(ConnOpts{})
		return outErr
	}}
	return goProxy(env, in, func() (Pair, error) { return out, outErr })
}

// goProxy: a client sends 1 MiB through a Go proxy (io.Copy between the
// socket it accepted and its socket to the server): the client's
// connection is made with o, then dial returns the proxy's to the server.
// The proxy starts copying once the client's first bytes are queued.
func goProxy(env *Env, o ConnOpts, dial func() (Pair, error)) (string, error) {
	in, err := env.Connect(o) // client -> proxy
	if err != nil {
		return "", err
	}
	defer in.Close()
	out, err := dial() // proxy -> server
	if err != nil {
		return "", err
	}
	defer out.Close()
	proxyIn, err := fileConn(in.S)
	if err != nil {
		return "", err
	}
	defer proxyIn.Close()
	proxyOut, err := fileConn(out.C)
	if err != nil {
		return "", err
	}
	defer proxyOut.Close()

	data := pattern(14, 1<<20)
	var got []byte
	var end string
	var copied int64
	err = parallel(
		func() error {
			if err := writeAll(in.C, data); err != nil {
				return err
			}
			return unix.Shutdown(in.C, unix.SHUT_WR)
		},
		func() (err error) {
			// The client's first bytes are queued before the proxy's
			// first splice, every run: the order a busy proxy sees, and
			// one verdict instead of a race.
			fds := []unix.PollFd{{Fd: int32(in.S), Events: unix.POLLIN}}
			if _, err := unix.Poll(fds, int(opTimeout/time.Millisecond)); err != nil {
				return fmt.Errorf("wait for the client's first bytes: %w", err)
			}
			proxyIn.SetDeadline(time.Now().Add(opTimeout))
			copied, err = io.Copy(proxyOut, proxyIn) // splice on Linux
			proxyOut.CloseWrite()
			return err
		},
		func() error { got, end = readToEOF(out.S); return nil },
	)
	return fmt.Sprintf("proxy copied %d; server got %s, equal=%v, end%q", copied, digest(got), bytes.Equal(got, data), end), err
}

func caseSlowReaderDisrupt(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		// A big receive buffer so the writer can queue 6 MiB unread.
		if err := unix.SetsockoptInt(p.S, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20); err != nil {
			unix.SetsockoptInt(p.S, unix.SOL_SOCKET, unix.SO_RCVBUF, 16<<20)
		}
		data := pattern(15, 6<<20)
		written := make(chan error, 1)
		go func() {
			err := writeAll(p.C, data)
			if err == nil {
				err = unix.Shutdown(p.C, unix.SHUT_WR)
			}
			written <- err
		}()
		queued, _ := arrived(p.S, 4<<20)
		if queued < 4<<20 {
			got, _ := readToEOF(p.S)
			<-written
			return fmt.Sprintf("%d bytes queued", queued), notMeasured("the reader had %d bytes queued, not 4 MiB (read %d in all)", queued, len(got))
		}
		if env.Disrupt != nil {
			if err := env.Disrupt(); err != nil {
				return "", fmt.Errorf("disrupt: %w", err)
			}
		}
		got, end := readToEOF(p.S)
		if err := <-written; err != nil {
			return "", err
		}
		return fmt.Sprintf("reader had 4+ MiB queued; read %s, equal=%v, then EOF%q", digest(got), bytes.Equal(got, data), end), nil
	})
}

// caseStalledReader: a reader that stops reading makes its writer block,
// as TCP's flow control does, instead of letting it queue without bound.
// The writer sends with MSG_DONTWAIT until the socket would block.
func caseStalledReader(env *Env) (string, error) {
	return run(env, ConnOpts{}, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		chunk := make([]byte, 64<<10)
		var queued int
		deadline := time.Now().Add(2 * time.Second)
		for queued < 256<<20 && time.Now().Before(deadline) {
			n, err := unix.SendmsgN(p.C, chunk, nil, nil, unix.MSG_DONTWAIT)
			if err == unix.EAGAIN {
				break // the writer would block
			}
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return "", err
			}
			queued += n
		}
		return fmt.Sprintf("writer blocks before 128 MiB are queued: %v", queued < 128<<20), nil
	})
}
