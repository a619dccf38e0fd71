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

// Expectation says how sockbypass keeps a case the same as plain TCP.
type Expectation string

// Expectations.
const (
	// FastPath: the case behaves like plain TCP on the redirected path.
	FastPath Expectation = "preserved"
	// Fallback: sockbypass keeps the connection (or that direction) on
	// the normal TCP path before a byte could be delivered differently,
	// and counts it.
	Fallback Expectation = "falls back automatically"
	// Limitation: the kernel offers no hook to catch the case in time;
	// sockbypass cannot keep it, and doctor reports it.
	Limitation Expectation = "known limitation"
)

// Env is what a case gets from the harness.
type Env struct {
	// Connect returns a new connected pair in the mode under test.
	Connect func() (Pair, error)
	// Disrupt, when set, is called by the cases that check that changes
	// to the installation (disable, uninstall) lose nothing.
	Disrupt func() error
}

// Case is one transparency case.
type Case struct {
	Name string
	// Expect is how sockbypass keeps it, How says by which mechanism (or,
	// for a limitation, why it cannot).
	Expect Expectation
	How    string
	// Counter names the fallback counter a Fallback case moves ("" for
	// none).
	Counter string
	Run     func(env *Env) (string, error)
}

// Cases returns every case, in a stable order.
func Cases() []Case {
	return []Case{
		{"reads and writes of many sizes", FastPath, "redirected bytes arrive whole and in order", "", caseSizes},
		{"MSG_PEEK", FastPath, "the kernel peeks the redirected queue", "", casePeek},
		{"FIONREAD", FastPath, "the kernel counts the redirected queue", "", caseFionread},
		{"poll and epoll readiness", FastPath, "readiness follows the redirected queue", "", casePoll},
		{"half-close (shutdown SHUT_WR), reply after EOF", FastPath, "the FIN takes the stack after every redirected byte", "", caseHalfClose},
		{"RST after data", FastPath, "the RST takes the stack after the redirected bytes", "", caseRST},
		{"close right after a large write", FastPath, "redirected bytes stay queued at the reader after the writer closes", "", caseCloseAfterWrite},
		{"sendfile into the socket", FastPath, "sendfile pages go through sk_msg like sendmsg", "", caseSendfile},
		{"short connections writing right after connect, records in order", FastPath, "a sender moves to redirect only when the reader has read every byte it sent through the stack", "", caseShortConns},
		{"MSG_WAITALL from the first read", Fallback, "tp_btf/sock_recv_length marks the reader a stack reader at its first read", "waitall", caseWaitallFirst},
		{"SO_RCVLOWAT", Fallback, "cgroup/setsockopt marks the reader a stack reader before it reads", "rcvlowat", caseRcvlowat},
		{"TCP_INQ", Fallback, "cgroup/setsockopt marks the reader a stack reader before it reads", "tcp_inq", caseTCPInq},
		{"MSG_OOB with SO_OOBINLINE", Fallback, "cgroup/setsockopt marks the reader a stack reader before it reads", "oobinline", caseOOBInline},
		{"splice(2) from the socket (never read with recvmsg)", Fallback, "a socket becomes a redirect target only once seen reading with recvmsg", "", caseSpliceOnly},
		{"Go io.Copy TCP->TCP proxy (splice)", Fallback, "a socket becomes a redirect target only once seen reading with recvmsg", "", caseGoProxy},
		{"a stalled reader makes its writer block (flow control)", FastPath, "a sender stops redirecting when 8 MiB it redirected are unread; its next bytes take the stack, whose flow control blocks it", "", caseStalledReader},
		{"slow reader holding 4+ MiB across disable and uninstall", FastPath, "sockets are never removed from the sockhash; they leave it when they close", "", caseSlowReaderDisrupt},
		{"MSG_WAITALL after plain reads", Limitation, "no hook sees recv flags before the read; tp_btf/sock_recv_length fires after it: that read may return short, later ones fall back", "waitall", caseWaitallLater},
		{"MSG_OOB without SO_OOBINLINE", Limitation, "no hook sees send flags before sk_msg: the urgent byte arrives inline", "", caseOOB},
		{"recv, then splice(2) on the same socket", Limitation, "no hook sees splice before it reads: bytes redirected after the first recv are invisible to splice (HAProxy splice mode, a Go proxy that reads then io.Copy)", "", caseRecvThenSplice},
	}
}

// run connects, runs fn, closes.
func run(env *Env, fn func(p *Pair) (string, error)) (string, error) {
	p, err := env.Connect()
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
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
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
			)
			if err == nil {
				echo, err = readN(p.C, size)
			}
			if err != nil {
				return "", fmt.Errorf("size %d: %w", size, err)
			}
			out = append(out, fmt.Sprintf("%d:%v/%v", size, bytes.Equal(got, data), bytes.Equal(echo, data)))
		}
		return strings.Join(out, " "), nil
	})
}

func waitReadable(fd int, timeout time.Duration) (int16, error) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, int(timeout/time.Millisecond))
		if err == unix.EINTR {
			continue
		}
		return fds[0].Revents, err
	}
}

func casePeek(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := writeAll(p.C, []byte("hello world")); err != nil {
			return "", err
		}
		if _, err := waitReadable(p.S, opTimeout); err != nil {
			return "", err
		}
		time.Sleep(20 * time.Millisecond)
		buf := make([]byte, 5)
		n, _, err := unix.Recvfrom(p.S, buf, unix.MSG_PEEK)
		if err != nil {
			return "", err
		}
		all, err := readN(p.S, 11)
		return fmt.Sprintf("peek=%q then read=%q", buf[:n], all), err
	})
}

func caseFionread(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := writeAll(p.C, pattern(1, 1000)); err != nil {
			return "", err
		}
		if _, err := waitReadable(p.S, opTimeout); err != nil {
			return "", err
		}
		time.Sleep(20 * time.Millisecond)
		n, err := unix.IoctlGetInt(p.S, unix.SIOCINQ)
		return fmt.Sprintf("FIONREAD=%d", n), err
	})
}

func casePoll(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
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
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
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
	return run(env, func(p *Pair) (string, error) {
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
		time.Sleep(50 * time.Millisecond)
		got, end := readToEOF(p.S)
		return fmt.Sprintf("read %s then %q", digest(got), end), nil
	})
}

func caseCloseAfterWrite(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
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
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		var got []byte
		var end string
		err := parallel(
			func() error {
				var off int64
				for off < int64(len(data)) {
					_, err := unix.Sendfile(p.C, int(f.Fd()), &off, len(data)-int(off))
					if retry(err) {
						continue
					}
					if err != nil {
						return fmt.Errorf("sendfile: %w", err)
					}
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
		out, err := run(env, func(p *Pair) (string, error) {
			var want, got bytes.Buffer
			for r := 0; r < records; r++ {
				fmt.Fprintf(&want, "conn %03d record %03d|", i, r)
			}
			rec := want.Bytes()
			size := len(rec) / records
			var end string
			err := parallel(
				func() error {
					// The first record right after connect, the rest
					// while the reader reads.
					for r := 0; r < records; r++ {
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
// signal (Go's preemption signal) ends MSG_WAITALL early even on plain TCP.
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

// waitallRound writes 100 bytes, then 100 more 50 ms later, while the
// reader asks for all 200 with MSG_WAITALL; it returns what the read got.
func waitallRound(p *Pair) (n int, err error) {
	err = parallel(
		func() error {
			if err := writeAll(p.C, pattern(7, 100)); err != nil {
				return err
			}
			time.Sleep(50 * time.Millisecond)
			return writeAll(p.C, pattern(8, 100))
		},
		func() (err error) {
			n, err = recvWaitall(p.S, 200)
			return err
		},
	)
	return n, err
}

func caseWaitallFirst(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
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
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		n, err := waitallRound(p)
		return fmt.Sprintf("recv(200, MSG_WAITALL)=%d", n), err
	})
}

func caseRcvlowat(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
		if err := unix.SetsockoptInt(p.S, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1000); err != nil {
			return "", err
		}
		var results []string
		for round := 0; round < 2; round++ {
			var early int16
			var n int
			err := parallel(
				func() error {
					if err := writeAll(p.C, pattern(9, 600)); err != nil {
						return err
					}
					time.Sleep(100 * time.Millisecond)
					return writeAll(p.C, pattern(10, 400))
				},
				func() (err error) {
					time.Sleep(50 * time.Millisecond)
					if early, err = waitReadable(p.S, 0); err != nil {
						return err
					}
					if _, err = waitReadable(p.S, 2*time.Second); err != nil {
						return err
					}
					buf := make([]byte, 4096)
					n, _, err = unix.Recvfrom(p.S, buf, unix.MSG_DONTWAIT)
					return err
				},
			)
			if err != nil {
				return "", err
			}
			results = append(results, fmt.Sprintf("readable with 600 of 1000 bytes=%v, first read=%d", early&unix.POLLIN != 0, n))
			// The reply direction keeps the fast path.
			if err := writeAll(p.S, []byte("ok")); err != nil {
				return "", err
			}
			if _, err := readN(p.C, 2); err != nil {
				return "", err
			}
		}
		return strings.Join(results, "; "), nil
	})
}

func caseTCPInq(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
		if err := unix.SetsockoptInt(p.S, unix.SOL_TCP, unix.TCP_INQ, 1); err != nil {
			return "", err
		}
		var results []string
		for round := 0; round < 2; round++ {
			if err := writeAll(p.C, pattern(11, 100)); err != nil {
				return "", err
			}
			if _, err := waitReadable(p.S, opTimeout); err != nil {
				return "", err
			}
			time.Sleep(20 * time.Millisecond)
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

// drain reads what arrives within a short quiet period.
func drain(fd int) []byte {
	var out []byte
	buf := make([]byte, 64)
	for {
		if re, _ := waitReadable(fd, 100*time.Millisecond); re&unix.POLLIN == 0 {
			return out
		}
		n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
		if n <= 0 || err != nil {
			return out
		}
		out = append(out, buf[:n]...)
	}
}

func caseOOBInline(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
		if err := unix.SetsockoptInt(p.S, unix.SOL_SOCKET, unix.SO_OOBINLINE, 1); err != nil {
			return "", err
		}
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := sendWithUrgent(p.C); err != nil {
			return "", err
		}
		time.Sleep(50 * time.Millisecond)
		return fmt.Sprintf("stream=%q", drain(p.S)), nil
	})
}

func caseOOB(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		if err := sendWithUrgent(p.C); err != nil {
			return "", err
		}
		time.Sleep(50 * time.Millisecond)
		normal := drain(p.S)
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
	deadline := time.Now().Add(opTimeout)
	for {
		n, err := unix.Splice(fd, nil, pipe[1], nil, 64<<10, unix.SPLICE_F_MOVE)
		if retry(err) && time.Now().Before(deadline) {
			continue
		}
		if err != nil {
			return out, errName(err)
		}
		if n == 0 {
			return out, ""
		}
		for n > 0 {
			m, err := unix.Read(pipe[0], buf[:min(int(n), len(buf))])
			if err != nil {
				return out, errName(err)
			}
			out = append(out, buf[:m]...)
			n -= int64(m)
		}
	}
}

func caseSpliceOnly(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
		data := pattern(12, 1<<20)
		var got []byte
		var end string
		err := parallel(
			func() error {
				for i := 0; i < 4; i++ { // in steps, so the sender checks the reader often
					if err := writeAll(p.C, data[i<<18:(i+1)<<18]); err != nil {
						return err
					}
					time.Sleep(5 * time.Millisecond)
				}
				return unix.Shutdown(p.C, unix.SHUT_WR)
			},
			func() error { got, end = spliceAll(p.S); return nil },
		)
		return fmt.Sprintf("spliced %s, equal=%v, end%q", digest(got), bytes.Equal(got, data), end), err
	})
}

func caseRecvThenSplice(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		data := pattern(13, 256<<10)
		var got []byte
		var end string
		err := parallel(
			func() error {
				if err := writeAll(p.C, data); err != nil {
					return err
				}
				return unix.Shutdown(p.C, unix.SHUT_WR)
			},
			func() error { got, end = spliceAll(p.S); return nil },
		)
		return fmt.Sprintf("spliced %s, equal=%v, end%q", digest(got), bytes.Equal(got, data), end), err
	})
}

// fileConn wraps a duplicate of fd as a *net.TCPConn; fd itself stays
// owned by the caller (an os.File on it would close it when collected).
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
	in, err := env.Connect() // client -> proxy
	if err != nil {
		return "", err
	}
	defer in.Close()
	out, err := env.Connect() // proxy -> server
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
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		// A big receive buffer so the writer can queue 6 MiB unread.
		unix.SetsockoptInt(p.S, unix.SOL_SOCKET, unix.SO_RCVBUF, 16<<20)
		data := pattern(15, 6<<20)
		written := make(chan error, 1)
		go func() {
			err := writeAll(p.C, data)
			if err == nil {
				err = unix.Shutdown(p.C, unix.SHUT_WR)
			}
			written <- err
		}()
		time.Sleep(200 * time.Millisecond)
		queued, _ := unix.IoctlGetInt(p.S, unix.SIOCINQ)
		if env.Disrupt != nil {
			if err := env.Disrupt(); err != nil {
				return "", fmt.Errorf("disrupt: %w", err)
			}
		}
		got, end := readToEOF(p.S)
		if err := <-written; err != nil {
			return "", err
		}
		return fmt.Sprintf("reader had >=4MiB queued=%v; read %s, equal=%v, then EOF%q", queued >= 4<<20, digest(got), bytes.Equal(got, data), end), nil
	})
}

// caseStalledReader: a reader that stops reading makes its writer block,
// as TCP's flow control does, instead of letting it queue without bound.
func caseStalledReader(env *Env) (string, error) {
	return run(env, func(p *Pair) (string, error) {
		if err := WarmUp(*p); err != nil {
			return "", err
		}
		unix.SetNonblock(p.C, true)
		defer unix.SetNonblock(p.C, false)
		chunk := make([]byte, 64<<10)
		var queued int
		deadline := time.Now().Add(2 * time.Second)
		for queued < 64<<20 && time.Now().Before(deadline) {
			n, err := unix.Write(p.C, chunk)
			if err == unix.EAGAIN {
				break // the writer would block
			}
			if err != nil {
				return "", err
			}
			queued += n
		}
		return fmt.Sprintf("writer blocks before 24 MiB are queued: %v", queued < 24<<20), nil
	})
}
