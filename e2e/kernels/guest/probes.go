package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// probeBytes is what a FIONREAD probe writes before asking.
const probeBytes = 1000

func runProbes() {
	if err := rlimit.RemoveMemlock(); err != nil {
		report("memlock", "no: "+err.Error())
	}
	var uts unix.Utsname
	if unix.Uname(&uts) == nil {
		report("kernel", unix.ByteSliceToString(uts.Release[:]))
	}
	report("tcx_link", errValue(probeTCX()))
	report("sockmap_link", errValue(probeSockmapLink()))
	report("tp_btf_sock_recv_length", errValue(probeTracing(ebpf.AttachTraceRawTp, "sock_recv_length")))
	report("fentry_tcp_recvmsg", errValue(probeTracing(ebpf.AttachTraceFEntry, "tcp_recvmsg")))
	report("fionread_member_redirected_only", fionreadProbe(progRedirect))
	report("fionread_member_stack_only_no_prog", fionreadProbe(progNone))
	report("fionread_member_stack_only_skmsg_pass", fionreadProbe(progPass))
	report("fionread_member_stack_then_redirected", mixedProbe())
	report("blocking_recv_signal_plain", signalProbe(false))
	report("blocking_recv_signal_member", signalProbe(true))
	report("ktls_plain", ktlsPlainProbe())
	report("ktls_member", ktlsMemberProbe(progPass, false, false))
	report("ktls_member_no_prog", ktlsMemberProbe(progNone, false, false))
	report("ktls_member_removed", ktlsMemberProbe(progPass, false, true))
	report("ktls_member_removed_before_ulp", ktlsMemberProbe(progPass, true, false))
}

// probeTCX attaches a pass-through tc program to lo's egress with a tcx
// link (6.6+) and detaches it again.
func probeTCX() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, -1), // TCX_NEXT
			asm.Return(),
		},
	})
	if err != nil {
		return fmt.Errorf("load tc program: %w", err)
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: 1, Program: prog, Attach: ebpf.AttachTCXEgress})
	if err != nil {
		return err
	}
	return l.Close()
}

func newSockhash() (*ebpf.Map, error) {
	return ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SockHash, KeySize: 4, ValueSize: 4, MaxEntries: 8})
}

// skMsgProgram loads an sk_msg program for m: redirect sends every message
// into the ingress queue of the socket at key 1 (as sockbypass's program
// does to a pair's peer); otherwise it returns SK_PASS.
// With onlySize, only messages of exactly probeBytes are redirected and the
// others pass (so one sender can put bytes on both of the reader's queues).
func skMsgProgram(m *ebpf.Map, redirect, onlySize bool) (*ebpf.Program, error) {
	insns := asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()} // SK_PASS
	if redirect {
		insns = asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
		if onlySize {
			insns = append(insns,
				asm.LoadMem(asm.R2, asm.R1, 68, asm.Word), // sk_msg_md.size
				asm.JNE.Imm(asm.R2, probeBytes, "pass"),
			)
		}
		insns = append(insns,
			asm.StoreImm(asm.RFP, -4, 1, asm.Word),
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.LoadMapPtr(asm.R2, m.FD()),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, -4),
			asm.Mov.Imm(asm.R4, 1), // BPF_F_INGRESS
			asm.FnMsgRedirectHash.Call(),
			asm.Return(),
		)
		if onlySize {
			insns = append(insns, asm.Mov.Imm(asm.R0, 1).WithSymbol("pass"), asm.Return())
		}
	}
	return ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SkMsg, License: "GPL", Instructions: insns})
}

// probeSockmapLink attaches an sk_msg program to a sockhash with a BPF
// link (6.10+), as sockbypass does where it can.
func probeSockmapLink() error {
	m, err := newSockhash()
	if err != nil {
		return fmt.Errorf("create sockhash: %w", err)
	}
	defer m.Close()
	prog, err := skMsgProgram(m, false, false)
	if err != nil {
		return fmt.Errorf("load sk_msg program: %w", err)
	}
	defer prog.Close()
	l, err := link.AttachRawLink(link.RawLinkOptions{Target: m.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict})
	if err != nil {
		return err
	}
	return l.Close()
}

// probeTracing loads and attaches an empty BTF tracing program.
func probeTracing(at ebpf.AttachType, to string) error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.Tracing,
		AttachType:   at,
		AttachTo:     to,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("load: %w", err)
	}
	defer prog.Close()
	l, err := link.AttachTracing(link.TracingOptions{Program: prog})
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	return l.Close()
}

// tcpPair returns a connected loopback TCP pair: the client's and the
// accepted socket's descriptors, blocking.
func tcpPair() (client, server int, err error) {
	ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, -1, err
	}
	defer unix.Close(ln)
	lo := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	if err := unix.Bind(ln, lo); err != nil {
		return -1, -1, err
	}
	if err := unix.Listen(ln, 4); err != nil {
		return -1, -1, err
	}
	sa, err := unix.Getsockname(ln)
	if err != nil {
		return -1, -1, err
	}
	client, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, -1, err
	}
	if err := unix.Connect(client, sa); err != nil {
		unix.Close(client)
		return -1, -1, err
	}
	server, _, err = unix.Accept4(ln, unix.SOCK_CLOEXEC)
	if err != nil {
		unix.Close(client)
		return -1, -1, err
	}
	return client, server, nil
}

type progKind int

const (
	progNone     progKind = iota // sockhash with no program
	progPass                     // sk_msg returning SK_PASS: sends take the stack
	progRedirect                 // sk_msg redirecting to key 1's ingress (the server)
	progSplit                    // progRedirect for messages of probeBytes, SK_PASS for others
)

// memberPair makes a connected pair and puts both ends in a fresh sockhash
// (client at key 0, server at key 1) with the given sk_msg program
// attached first (legacy attach, every kernel has it). close releases all.
func memberPair(kind progKind) (client, server int, closeAll func(), err error) {
	client, server, _, closeAll, err = memberPairMap(kind)
	return client, server, closeAll, err
}

// memberPairMap is memberPair that also returns the sockhash.
func memberPairMap(kind progKind) (client, server int, m *ebpf.Map, closeAll func(), err error) {
	var closers []func()
	cleanup := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	defer func() {
		if err != nil {
			cleanup()
		}
	}()
	m, err = newSockhash()
	if err != nil {
		return -1, -1, nil, nil, fmt.Errorf("create sockhash: %w", err)
	}
	closers = append(closers, func() { m.Close() })
	if kind != progNone {
		prog, err := skMsgProgram(m, kind != progPass, kind == progSplit)
		if err != nil {
			return -1, -1, nil, nil, fmt.Errorf("load sk_msg: %w", err)
		}
		closers = append(closers, func() { prog.Close() })
		opts := link.RawAttachProgramOptions{Target: m.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict}
		if err := link.RawAttachProgram(opts); err != nil {
			return -1, -1, nil, nil, fmt.Errorf("attach sk_msg: %w", err)
		}
		closers = append(closers, func() {
			link.RawDetachProgram(link.RawDetachProgramOptions{Target: m.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict})
		})
	}
	client, server, err = tcpPair()
	if err != nil {
		return -1, -1, nil, nil, fmt.Errorf("connect: %w", err)
	}
	closers = append(closers, func() { unix.Close(client); unix.Close(server) })
	if err := m.Update(uint32(0), uint32(client), ebpf.UpdateAny); err != nil {
		return -1, -1, nil, nil, fmt.Errorf("insert client: %w", err)
	}
	if err := m.Update(uint32(1), uint32(server), ebpf.UpdateAny); err != nil {
		return -1, -1, nil, nil, fmt.Errorf("insert server: %w", err)
	}
	return client, server, m, cleanup, nil
}

// fionreadProbe writes probeBytes from the client of a member pair and
// reports what FIONREAD says on the server, then how much a read gets.
func fionreadProbe(kind progKind) string {
	client, server, closeAll, err := memberPair(kind)
	if err != nil {
		return "error: " + err.Error()
	}
	defer closeAll()
	if n, err := unix.Write(client, make([]byte, probeBytes)); err != nil || n != probeBytes {
		return fmt.Sprintf("error: write %d: %v", n, err)
	}
	waitDelivered(client)
	return fionreadAfterWrite(server, probeBytes)
}

// waitDelivered waits (at most 5 s: qemu without KVM is slow) until
// nothing written to fd is unacknowledged (SIOCOUTQ 0): every byte that
// took the stack is queued at the reader. Redirected bytes never enter
// the send queue; they are queued at the reader when write returns.
func waitDelivered(fd int) {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if n, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ); err != nil || n == 0 {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// fionreadAfterWrite reports whether fd is readable, FIONREAD and what one
// non-blocking read returns, once what was written to fd was delivered.
func fionreadAfterWrite(fd, wrote int) string {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 2000)
	readable := err == nil && n == 1
	inq, ierr := unix.IoctlGetInt(fd, unix.SIOCINQ)
	buf := make([]byte, 4*wrote)
	got, _, rerr := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
	var parts []string
	if ierr != nil {
		parts = append(parts, "fionread_error="+ierr.Error())
	} else {
		parts = append(parts, fmt.Sprintf("fionread=%d", inq))
	}
	parts = append(parts, fmt.Sprintf("wrote=%d", wrote), fmt.Sprintf("poll_readable=%t", readable))
	if rerr != nil {
		parts = append(parts, "read_error="+errnoName(rerr))
	} else {
		parts = append(parts, fmt.Sprintf("read=%d", got))
	}
	return strings.Join(parts, " ")
}

func errnoName(err error) string {
	var e unix.Errno
	if errors.As(err, &e) {
		if name := unix.ErrnoName(e); name != "" {
			return name
		}
	}
	return err.Error()
}

// waitInRead waits (at most 3 s) until thread tid sleeps in read(2) on
// fd: /proc/self/task/TID/syscall names the read, and its state is S
// (sleeping, not still on its way in).
func waitInRead(tid, fd int) {
	path := fmt.Sprintf("/proc/self/task/%d/", tid)
	want := fmt.Sprintf("%d 0x%x ", unix.SYS_READ, fd)
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); {
		call, err := os.ReadFile(path + "syscall")
		if err != nil {
			return
		}
		if strings.HasPrefix(string(call), want) && taskSleeping(path+"stat") {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// taskSleeping reports whether the task whose stat file is path is in
// state S (interruptible sleep).
func taskSleeping(path string) bool {
	stat, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	// "TID (COMM) STATE ...": COMM may hold spaces and parentheses.
	i := strings.LastIndexByte(string(stat), ')')
	return i >= 0 && i+2 < len(stat) && stat[i+2] == 'S'
}

// mixedProbe puts stack bytes (500, sent first) and then redirected bytes
// (probeBytes) on one member and reports FIONREAD and the order the reads
// return them in (plain TCP: everything, in order).
func mixedProbe() string {
	client, server, closeAll, err := memberPair(progSplit)
	if err != nil {
		return "error: " + err.Error()
	}
	defer closeAll()
	const stackBytes = 500
	if n, err := unix.Write(client, make([]byte, stackBytes)); err != nil || n != stackBytes {
		return fmt.Sprintf("error: write %d: %v", n, err)
	}
	waitDelivered(client)
	if n, err := unix.Write(client, make([]byte, probeBytes)); err != nil || n != probeBytes {
		return fmt.Sprintf("error: write %d: %v", n, err)
	}
	waitDelivered(client)
	parts := []string{fmt.Sprintf("stack=%d redirected=%d", stackBytes, probeBytes)}
	if inq, err := unix.IoctlGetInt(server, unix.SIOCINQ); err != nil {
		parts = append(parts, "fionread_error="+errnoName(err))
	} else {
		parts = append(parts, fmt.Sprintf("fionread=%d", inq))
	}
	var reads []string
	buf := make([]byte, 4*probeBytes)
	for range 4 {
		n, _, err := unix.Recvfrom(server, buf, unix.MSG_DONTWAIT)
		if err != nil {
			reads = append(reads, errnoName(err))
			break
		}
		reads = append(reads, fmt.Sprint(n))
	}
	return strings.Join(append(parts, "reads="+strings.Join(reads, ",")), " ")
}

// signalProbe blocks in read(2) on the server of a blocking pair (a member
// of a sockhash with sockbypass-like redirecting sk_msg when member is
// set), interrupts it with a signal whose handler has SA_RESTART (the Go
// runtime's), and reports whether the read returned (and with what) or was
// restarted.
func signalProbe(member bool) string {
	var client, server int
	var closeAll func()
	var err error
	if member {
		client, server, closeAll, err = memberPair(progRedirect)
	} else {
		client, server, err = tcpPair()
		closeAll = func() { unix.Close(client); unix.Close(server) }
	}
	if err != nil {
		return "error: " + err.Error()
	}
	defer closeAll()

	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGUSR1)
	defer signal.Stop(sigs)
	type result struct {
		n   int
		err error
	}
	tids := make(chan int, 1)
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tids <- unix.Gettid()
		buf := make([]byte, 64)
		n, err := unix.Read(server, buf)
		done <- result{n, err}
	}()
	tid := <-tids
	waitInRead(tid, server)
	describe := func(r result) string {
		if r.err != nil {
			return errnoName(r.err)
		}
		return fmt.Sprintf("n=%d", r.n)
	}
	select {
	case r := <-done:
		return "returned before any signal: " + describe(r)
	default:
	}
	if err := unix.Tgkill(os.Getpid(), tid, unix.SIGUSR1); err != nil {
		return "error: tgkill: " + err.Error()
	}
	select {
	case r := <-done:
		return "returned on the signal: " + describe(r)
	case <-time.After(700 * time.Millisecond):
	}
	// Still blocked: the read was restarted. Release it with a byte.
	unix.Write(client, []byte{'x'})
	select {
	case r := <-done:
		return "restarted (kept blocking after the signal; then data: " + describe(r) + ")"
	case <-time.After(3 * time.Second):
		return "stuck: still blocked after the signal and a written byte"
	}
}
