package semantics

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// Verdicts of a case in one mode on this kernel.
const (
	// VerdictPreserved: the accelerated run observed what the plain run
	// did, bytes were redirected, and no byte of a member took the stack
	// (PassedBytes 0) unless the case's members leave mid-connection by
	// design (Case.PassesLater, its counter moved).
	VerdictPreserved = "preserved"
	// VerdictFallback: a case that needs the stack observed what the plain
	// run did because its connection stayed on the stack (nothing
	// redirected, the case's fallback counted).
	VerdictFallback = "falls back automatically"
	// VerdictNotAccelerated: the accelerated run observed what the plain
	// run did, but not on the fast path throughout: it redirected
	// nothing, or bytes of its members took the stack where the case
	// expects none. The case says nothing about the fast path (Result.Why
	// says, from the counters, why it was not taken).
	VerdictNotAccelerated = "not accelerated"
	// VerdictKnown: the accelerated run differs from the plain run
	// exactly as the case's pinned limitation says.
	VerdictKnown = "broken: known limitation"
	// VerdictNotMeasured: the plain run could not reach the case's
	// precondition on this machine (Result.Why says which).
	VerdictNotMeasured = "not measured"
	// VerdictBroken: the accelerated run differs from the plain run
	// otherwise, or failed.
	VerdictBroken = "BROKEN"
)

// WhyBlocking is why no case is accelerated with blocking sockets: the
// Why of a run that redirected nothing and whose sockets the datapath
// counted blocking (sockets_blocking).
const WhyBlocking = "blocking sockets are never accelerated: a blocking recv on a sockhash member returns EAGAIN when a signal interrupts it"

// WhyNothingCounted is the Why of a run that redirected nothing while no
// counter says why: the datapath did not see the case's sockets (the
// cgroup is not enabled, or its programs are not attached).
const WhyNothingCounted = "nothing was redirected, and no counter says why: the datapath did not see the sockets"

// ErrNotMeasured marks a run that could not reach its case's precondition.
var ErrNotMeasured = errors.New("precondition not reached")

func notMeasured(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrNotMeasured, fmt.Sprintf(format, args...))
}

// Result is one case run plain and accelerated in one mode.
type Result struct {
	// Case names the case; Mode says how its sockets block; Expect is
	// what sockbypass promises for it in that mode (NotAccelerated for
	// every blocking run).
	Case        string      `json:"case"`
	Mode        Mode        `json:"mode"`
	Expect      Expectation `json:"expected"`
	How         string      `json:"how"`
	Plain       string      `json:"plain"`
	Accelerated string      `json:"accelerated"`
	// Same reports whether the two runs observed the same thing.
	Same bool `json:"same"`
	// Counters moved by the accelerated run.
	RedirectedBytes  uint64 `json:"redirected_bytes"`
	PassedBytes      uint64 `json:"passed_bytes"`
	Fallbacks        uint64 `json:"fallbacks"`
	LateStackOptions uint64 `json:"late_stack_options"`
	SocketsBlocking  uint64 `json:"sockets_blocking"`
	SocketsUnpaired  uint64 `json:"sockets_unpaired"`
	PairsAbandoned   uint64 `json:"pairs_abandoned"`
	SocketsStackPort uint64 `json:"sockets_stack_port"`
	// Counter is the case's counter (Case.Counter), Counted how much the
	// accelerated run moved it.
	Counter string `json:"counter,omitempty"`
	Counted uint64 `json:"counted,omitempty"`
	// Verdict is one of the Verdict constants.
	Verdict string `json:"verdict"`
	// Why says why a case was not accelerated or not measured.
	Why string `json:"why,omitempty"`
	// Err is set when the accelerated run failed outright.
	Err string `json:"error,omitempty"`
}

// Setup is what the harness runs cases in: connections made in the plain
// and in the accelerated cgroup, a disruption of the installation, and the
// accelerated cgroup's counters.
type Setup struct {
	Plain, Accelerated func(Mode, ConnOpts) (Pair, error)
	// StackPort is a server port the accelerated cgroup lists in its
	// stack ports (enable --stack-ports).
	StackPort int
	// Disrupt disables, uninstalls and installs again (an upgrade).
	Disrupt  func() error
	Counters func() (dataplane.CgroupCounters, error)
	// ForgetSplicer, when set, makes the datapath forget that this
	// process splices (the splice cases teach it; the next case must
	// start afresh).
	ForgetSplicer func() error
}

// Env returns the environment a case gets: plain or accelerated, in mode.
func (s Setup) Env(accelerated bool, mode Mode) *Env {
	connect := s.Plain
	var disrupt func() error
	if accelerated {
		connect, disrupt = s.Accelerated, s.Disrupt
	}
	return &Env{
		Mode:      mode,
		Connect:   func(o ConnOpts) (Pair, error) { return connect(mode, o) },
		Disrupt:   disrupt,
		StackPort: s.StackPort,
	}
}

func fallbackTotal(c dataplane.CgroupCounters) uint64 {
	return c.FallbackRcvlowat + c.FallbackTCPInq + c.FallbackOOBInline + c.FallbackWaitall + c.FallbackOOBRead
}

// CounterValue is the counter a case names (Case.Counter) in c.
func CounterValue(c dataplane.CgroupCounters, name string) uint64 {
	switch name {
	case "rcvlowat":
		return c.FallbackRcvlowat
	case "tcp_inq":
		return c.FallbackTCPInq
	case "oobinline":
		return c.FallbackOOBInline
	case "waitall":
		return c.FallbackWaitall
	case "oob_read":
		return c.FallbackOOBRead
	case "late_stack_options":
		return c.LateStackOptions
	case "stack_port":
		return c.SocketsStackPort
	case "late_blocking":
		return c.LateBlocking
	case "splice_readers":
		return c.SpliceReaders
	case "members_left":
		return c.MembersLeft
	case "backpressure":
		return c.PassedBackpressure
	}
	return 0
}

// RunCase runs c in mode plain, then accelerated, and classifies it.
func RunCase(c Case, mode Mode, s Setup) Result {
	r := Result{Case: c.Name, Mode: mode, Expect: c.Expect, How: c.How, Counter: c.Counter}
	if mode == Blocking {
		// The case's expectation is for non-blocking sockets; blocking
		// ones are never accelerated.
		r.Expect = NotAccelerated
	}
	plain, err := c.Run(s.Env(false, mode))
	r.Plain = plain
	if err != nil {
		r.Verdict = VerdictNotMeasured
		r.Why = fmt.Sprintf("the plain run did not get there: %v", err)
		return r
	}
	before, err := s.Counters()
	if err != nil {
		r.Err = err.Error()
		r.Verdict = VerdictBroken
		return r
	}
	accel, err := c.Run(s.Env(true, mode))
	after, cerr := s.Counters()
	if s.ForgetSplicer != nil {
		if ferr := s.ForgetSplicer(); ferr != nil && cerr == nil {
			cerr = ferr
		}
	}
	r.Accelerated = accel
	if err != nil {
		r.Err = fmt.Sprintf("accelerated run: %v", err)
	} else if cerr != nil {
		r.Err = cerr.Error()
	}
	var d dataplane.CgroupCounters
	if after.RedirectedBytes >= before.RedirectedBytes { // a re-install resets counters
		d = after.Sub(before)
	}
	r.RedirectedBytes, r.PassedBytes, r.Fallbacks = d.RedirectedBytes, d.PassedBytes, fallbackTotal(d)
	r.LateStackOptions, r.SocketsBlocking = d.LateStackOptions, d.SocketsBlocking
	r.SocketsUnpaired, r.PairsAbandoned, r.SocketsStackPort = d.SocketsUnpaired, d.PairsAbandoned, d.SocketsStackPort
	r.Counted = CounterValue(d, c.Counter)
	r.Same = r.Err == "" && plain == accel
	// Bytes of members that took the stack are the case's only when its
	// members leave mid-connection by design and its counter says they
	// did.
	stackBytesExplained := r.PassedBytes == 0 || (c.PassesLater && r.Counted > 0)
	switch {
	case r.Err != "":
		r.Verdict = VerdictBroken
	case !r.Same && c.Expect == Limitation && mode == NonBlocking && accel == c.Limit:
		r.Verdict = VerdictKnown
	case !r.Same:
		r.Verdict = VerdictBroken
	case r.RedirectedBytes > 0 && stackBytesExplained:
		r.Verdict = VerdictPreserved
	case r.RedirectedBytes > 0:
		r.Verdict = VerdictNotAccelerated
		r.Why = whyStackBytes(c, d)
	case mode == NonBlocking && c.Expect == Fallback && d.SocketsBlocking == 0 && (c.Counter == "" || r.Counted > 0):
		r.Verdict = VerdictFallback
	default:
		r.Verdict = VerdictNotAccelerated
		r.Why = whyNotAccelerated(d)
	}
	return r
}

// whyStackBytes explains, from the counters, why a run that redirected
// bytes is not preserved: bytes of its members took the stack.
func whyStackBytes(c Case, d dataplane.CgroupCounters) string {
	why := fmt.Sprintf("%d bytes were redirected, but %d bytes of members took the stack", d.RedirectedBytes, d.PassedBytes)
	if c.PassesLater {
		return why + fmt.Sprintf(" and %s, which counts the members leaving, did not move", c.Counter)
	}
	return why + ": the members of this case never leave the sockhash"
}

// whyNotAccelerated explains, from the counters only, why a run
// redirected nothing: WhyBlocking when sockets were counted blocking,
// WhyNothingCounted when no counter moved.
func whyNotAccelerated(d dataplane.CgroupCounters) string {
	if d.SocketsBlocking > 0 {
		return WhyBlocking
	}
	var why []string
	if n := fallbackTotal(d); n > 0 {
		why = append(why, fmt.Sprintf("%d socket(s) asked for stack-reader semantics before joining", n))
	}
	if d.SocketsStackPort > 0 {
		why = append(why, fmt.Sprintf("%d socket(s) on a stack port", d.SocketsStackPort))
	}
	if d.PairsAbandoned > 0 {
		why = append(why, fmt.Sprintf("%d client(s) sent before their server joined the pair", d.PairsAbandoned))
	}
	if d.SocketsUnpaired > 0 {
		why = append(why, fmt.Sprintf("%d socket(s) left unpaired", d.SocketsUnpaired))
	}
	if len(why) == 0 {
		return WhyNothingCounted
	}
	return "nothing was redirected: " + strings.Join(why, ", ")
}

// RunAll runs every case in every mode (each case blocking, then
// non-blocking) and calls each, when set, with every result as it is
// known.
func RunAll(s Setup, each func(Result)) []Result {
	var out []Result
	for _, c := range Cases() {
		for _, mode := range AllModes() {
			r := RunCase(c, mode, s)
			if each != nil {
				each(r)
			}
			out = append(out, r)
		}
	}
	return out
}

// StackPort is the server port Install lists in the accelerated cgroup's
// stack ports (each case runs in a private network namespace).
const StackPort = 7443

// Install creates a private installation at pinDir with accel enabled (with
// StackPort as its one stack port) and plain not, and returns the setup
// whose connections are made in netns.
// Its Disrupt disables, uninstalls and installs again (an upgrade); its
// counters carry across. close uninstalls.
func Install(pinDir string, plain, accel cgroup.Cgroup, netns ns.NetNS) (s Setup, close func(), err error) {
	dp, err := dataplane.OpenOrCreate(dataplane.Options{PinDir: pinDir})
	if err != nil {
		return Setup{}, nil, err
	}
	close = func() {
		if d, err := dataplane.Open(dataplane.Options{PinDir: pinDir}); err == nil {
			d.Uninstall()
		}
		dp.Close()
	}
	// Each case makes a listener of its own and measures how its first
	// connection behaves once accelerated: no probation (which would keep
	// that connection plain; see "Probation" in bpf/sockbypass.h).
	opts := dataplane.EnableOptions{StackPorts: []uint16{StackPort}, NoProbation: true}
	if _, err := dp.Enable(accel, opts); err != nil {
		close()
		return Setup{}, nil, err
	}
	connectIn := func(cg cgroup.Cgroup) func(Mode, ConnOpts) (Pair, error) {
		return func(mode Mode, o ConnOpts) (p Pair, err error) {
			rerr := cg.RunIn(func() {
				err = netns.Do(func(ns.NetNS) error {
					p, err = Connect(mode, o)
					return err
				})
			})
			return p, errors.Join(rerr, err)
		}
	}
	var carried dataplane.CgroupCounters
	disrupt := func() error {
		if c, err := dp.Counters(); err == nil {
			carried.Add(c[accel.ID])
		}
		if _, err := dp.Disable(accel.ID); err != nil {
			return err
		}
		if err := dp.Uninstall(); err != nil {
			return err
		}
		if dp, err = dataplane.OpenOrCreate(dataplane.Options{PinDir: pinDir}); err != nil {
			return err
		}
		_, err := dp.Enable(accel, opts)
		return err
	}
	return Setup{
		Plain:       connectIn(plain),
		Accelerated: connectIn(accel),
		StackPort:   StackPort,
		Disrupt:     disrupt,
		Counters: func() (dataplane.CgroupCounters, error) {
			c, err := dp.Counters()
			sum := carried
			sum.Add(c[accel.ID])
			return sum, err
		},
		ForgetSplicer: func() error { return dp.ForgetSplicer(uint32(os.Getpid())) },
	}, close, nil
}
