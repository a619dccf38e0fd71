package soak

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// The workload kinds, in the order of their port ranges (see kindOfPort).
// SOAK_ONLY takes a comma-separated list of them.
var allKinds = []string{
	"paired",      // echo over non-blocking sockets of enabled cgroups (no probation): pairs from the first connection
	"probation",   // the same to a server cgroup enabled with the default probation, its listener made anew every 10 s
	"blocking",    // blocking sockets (raw syscalls, no O_NONBLOCK) as client, server or both
	"accountonly", // an account-only cgroup's listener, from a cgroup not enabled, an accelerated one and an account-only one
	"aborted",     // handshakes that never finish (raw SYNs, answered or not), connect then RST or FIN before accept
	"rst",         // connections reset in the middle of a transfer, by either end
	"backlog",     // connects to a listener with backlog 1 that never accepts, made anew every 5 s
	"reuseport",   // an SO_REUSEPORT group whose members come and go
	"rcvlowat",    // listeners and clients with stack-reader options (SO_RCVLOWAT, TCP_INQ, SO_OOBINLINE), before and after joining
	"pods",        // pairs of pods (netns + veth + cgroup) created and deleted while connecting pod to pod
	"cgroups",     // cgroups created, enabled (each mode), used and deleted (disabled before or after, sockets open or not)
	"toggle",      // long-lived connections while their cgroups are disabled, enabled and the install upgraded
	"mesh",        // an intercept-mode sidecar pod (connect4 to 127.0.0.1:15001, SO_ORIGINAL_DST), created and deleted
}

func kindIndex(name string) int {
	for i, k := range allKinds {
		if k == name {
			return i
		}
	}
	panic("unknown kind " + name)
}

// kindStats counts one kind's connections.
type kindStats struct {
	conns     atomic.Int64 // attempted
	ok        atomic.Int64 // completed with every byte checked
	expected  atomic.Int64 // ended by an error the kind provokes (reset, timeout)
	failed    atomic.Int64 // ended by an error the kind does not expect
	integrity atomic.Int64 // a byte missing, extra or different
	bytes     atomic.Int64 // bytes sent and checked

	mu       sync.Mutex
	failures []string // the first few of each
	badBytes []string
	// known are the errors that match a known error (knownErrors), by
	// its index.
	known map[int][]string
}

const keepErrors = 20

// kind is one workload kind's run: its cgroups and what it counted.
type kind struct {
	name string
	e    *env
	st   kindStats
	// tolerant: resets and timeouts are what the kind provokes.
	tolerant bool
	static   map[string]cgroup.Cgroup
	notes    []string
	mu       sync.Mutex
	// churned holds the counters of the kind's cgroups that were
	// removed, read when they went (their slots may be reused later).
	churned map[uint64]dataplane.CgroupCounters
	// churnEvents counts what the kind's churn did: pod pairs and
	// cgroups created and removed, toggles of its cgroups.
	churnEvents atomic.Int64
}

func (k *kind) logger() *zap.Logger { return k.e.log.With(zap.String("kind", k.name)) }

// result records how a connection ended.
func (k *kind) result(err error, n int) {
	k.st.conns.Add(1)
	switch {
	case err == nil:
		k.st.ok.Add(1)
		k.st.bytes.Add(int64(n))
	case isIntegrity(err):
		k.st.integrity.Add(1)
		k.st.mu.Lock()
		if len(k.st.badBytes) < keepErrors {
			k.st.badBytes = append(k.st.badBytes, err.Error())
		}
		k.st.mu.Unlock()
		k.logger().Error("bytes did not arrive intact", zap.Error(err))
	case k.tolerant && (isReset(err) || isTimeout(err)):
		k.st.expected.Add(1)
	default:
		k.fail(err)
	}
}

// fail records an error that is not a connection's result (setup, a
// server's handler, the churn itself).
func (k *kind) fail(err error) {
	if i := knownErrorOf(k.name, err); i >= 0 {
		k.st.mu.Lock()
		if k.st.known == nil {
			k.st.known = map[int][]string{}
		}
		k.st.known[i] = append(k.st.known[i], err.Error())
		k.st.mu.Unlock()
		k.logger().Warn("known error", zap.Error(err))
		return
	}
	k.st.failed.Add(1)
	k.st.mu.Lock()
	if len(k.st.failures) < keepErrors {
		k.st.failures = append(k.st.failures, err.Error())
	}
	k.st.mu.Unlock()
	k.logger().Warn("unexpected error", zap.Error(err))
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, unix.ETIMEDOUT) || errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// newStatic makes and enables one of the kind's cgroups before the
// baseline (nil opts: leave it not enabled).
func (k *kind) newStatic(role string, opts *dataplane.EnableOptions) error {
	cg, err := k.e.newCgroup(k.name, role, false)
	if err != nil {
		return err
	}
	if opts != nil {
		if err := k.e.enable(cg, *opts); err != nil {
			return err
		}
	}
	k.static[role] = cg
	return nil
}

// allowPass records why the members of the kind's cgroup role may send
// bytes through the stack by design.
func (k *kind) allowPass(role, why string) {
	k.e.reg.setPassOK(k.static[role].ID, why)
}

// forget records the counters of a churned cgroup once it is gone.
func (k *kind) forget(id uint64) {
	c, err := k.e.dp.Counters()
	if err != nil {
		k.fail(fmt.Errorf("read the counters of cgroup %d: %w", id, err))
		return
	}
	if cc, ok := c[id]; ok {
		k.mu.Lock()
		k.churned[id] = cc
		k.mu.Unlock()
	}
}

func (k *kind) note(format string, args ...any) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.notes = append(k.notes, fmt.Sprintf(format, args...))
}

// workload is what a kind does.
type workload struct {
	// tolerant: the kind provokes resets and timeouts.
	tolerant bool
	// neverRedirects: its connections are never accelerated (blocking
	// sockets, account-only listeners): no byte may be redirected.
	neverRedirects bool
	// setup makes the kind's static cgroups (enabled as the baseline
	// sees them); nothing else may exist yet.
	setup func(k *kind) error
	// run loads until ctx is done, then closes and removes everything
	// it made beyond its static cgroups (which it leaves as setup left
	// them), and returns.
	run func(ctx context.Context, k *kind)
}

var workloads = map[string]workload{
	"paired":      {setup: setupPaired, run: runPaired},
	"probation":   {setup: setupProbation, run: runProbation},
	"blocking":    {neverRedirects: true, setup: setupBlocking, run: runBlocking},
	"accountonly": {neverRedirects: true, setup: setupAccountOnly, run: runAccountOnly},
	"aborted":     {tolerant: true, setup: setupPlainPair, run: runAborted},
	"rst":         {tolerant: true, setup: setupRST, run: runRST},
	"backlog":     {tolerant: true, setup: setupPlainPair, run: runBacklog},
	"reuseport":   {tolerant: true, setup: setupPlainPair, run: runReuseport},
	"rcvlowat":    {setup: setupRcvlowat, run: runRcvlowat},
	"pods":        {setup: func(*kind) error { return nil }, run: runPods},
	"cgroups":     {setup: func(*kind) error { return nil }, run: runCgroups},
	"toggle":      {setup: setupPlainPair, run: runToggle},
	"mesh":        {setup: func(*kind) error { return nil }, run: runMesh},
}

var noProbation = &dataplane.EnableOptions{NoProbation: true}

// setupPlainPair: a server and a client cgroup, both enabled without
// probation.
func setupPlainPair(k *kind) error {
	if err := k.newStatic("srv", noProbation); err != nil {
		return err
	}
	return k.newStatic("cli", noProbation)
}

// Timeouts: every connection has a deadline; connects to a listener
// that accepts are local and immediate.
const (
	connDeadline   = 30 * time.Second
	connectTimeout = 10 * time.Second
	serverGrace    = 5 * time.Second
)

func (k *kind) lo(role string) where { return where{cg: k.static[role], ns: k.e.lo} }

func loAddr(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), port)
}

// workers runs n copies of fn until ctx is done, each with its own
// random source, pausing a random 0 to pace between iterations.
func workers(ctx context.Context, n int, pace time.Duration, seed uint64, fn func(rng *rand.Rand)) {
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(i)))
			for ctx.Err() == nil {
				fn(rng)
				if pace > 0 {
					sleep(ctx, time.Duration(rng.Int64N(int64(pace))))
				}
			}
		}(i)
	}
	wg.Wait()
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// echoServer listens in w on addr and echoes every connection.
func (k *kind) echoServer(w where, addr netip.AddrPort, before func(fd int) error) (*server, error) {
	l, err := k.e.listen(w, addr, before)
	if err != nil {
		return nil, err
	}
	return serve(l, func(c net.Conn) {
		if err := echo(c, time.Now().Add(connDeadline)); err != nil && !(k.tolerant && (isReset(err) || isTimeout(err))) {
			k.fail(fmt.Errorf("echo server %s: %w", addr, err))
		}
	}), nil
}

// closeServer closes s and notes connections it had to close.
func (k *kind) closeServer(s *server) {
	if n := s.close(serverGrace); n > 0 && !k.tolerant {
		k.fail(fmt.Errorf("server %s: %d connections still open %v after its clients stopped", s.l.Addr(), n, serverGrace))
	}
}

// echoOnce dials addr from w and checks one echoed transfer of a random
// size.
func (k *kind) echoOnce(rng *rand.Rand, from where, addr netip.AddrPort, before func(fd int) error) {
	c, err := k.e.dial(from, addr, connectTimeout, before)
	if err != nil {
		k.result(err, 0)
		return
	}
	defer c.Close()
	data := payload(rng, payloadSize(rng))
	k.result(exchange(c, data, 1+rng.IntN(64<<10), time.Now().Add(connDeadline)), len(data))
}

// longLived dials addr from w and exchanges msgs messages over the one
// connection, pausing between them, then closes it.
func (k *kind) longLived(ctx context.Context, rng *rand.Rand, from where, addr netip.AddrPort, msgs int, pause time.Duration) {
	c, err := k.e.dial(from, addr, connectTimeout, nil)
	if err != nil {
		k.result(err, 0)
		return
	}
	defer c.Close()
	total := 0
	for i := 0; i < msgs && ctx.Err() == nil; i++ {
		msg := payload(rng, 1+rng.IntN(64<<10))
		if err := roundTrip(c, msg, time.Now().Add(connDeadline)); err != nil {
			k.result(err, total)
			return
		}
		total += len(msg)
		sleep(ctx, time.Duration(rng.Int64N(int64(pause))))
	}
	c.CloseWrite()
	c.SetDeadline(time.Now().Add(connDeadline))
	if n, err := readAll(c, nil); err != nil || n != 0 {
		k.result(fmt.Errorf("after the last message: %d bytes, %w", n, err), total)
		return
	}
	k.result(nil, total)
}

// sortedNotes returns the kind's notes, sorted.
func (k *kind) sortedNotes() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := append([]string(nil), k.notes...)
	sort.Strings(n)
	return n
}
