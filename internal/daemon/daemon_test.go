package daemon

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/config"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	tu "github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/dptest"
)

// installWithoutGlobs installs a dataplane of the test's own and returns
// it with a configuration that names no cgroup (the source selects).
func installWithoutGlobs(t *testing.T) (*dataplane.Dataplane, *config.Config) {
	t.Helper()
	tu.RequirePrivileged(t)
	dp := dptest.Install(t)
	cfg, err := config.Parse([]byte("cgroups: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	return dp, cfg
}

// listSource is a Source with a fixed selection, recording failures.
type listSource struct {
	targets   []Target
	pending   []string
	mu        sync.Mutex
	failed    map[string]error
	fallbacks []string
}

func (s *listSource) Targets(cgroup.Mounts, *config.Config) ([]Target, []string, error) {
	return s.targets, s.pending, nil
}

func (s *listSource) EnableFailed(t Target, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failed[t.Owner] = err
}

func (s *listSource) Changed() <-chan struct{} { return nil }

// TestEnableFailureIsCountedReportedAndNotReady: a selected cgroup that
// cannot be enabled (here: removed after it was resolved, as a pod that
// goes away between the informer and the attach) is counted in
// sockbypass_enable_failures_total, reported to its source (the pod's
// Event) and keeps the daemon from being Ready; the others are enabled.
func TestEnableFailureIsCountedReportedAndNotReady(t *testing.T) {
	dp, cfg := installWithoutGlobs(t)
	good := tu.NewCgroup(t)
	gone := tu.NewCgroup(t)
	if err := os.Remove(gone.Path); err != nil {
		t.Fatal(err)
	}
	src := &listSource{failed: map[string]error{}, targets: []Target{
		{Cgroup: good, Owner: "default/good"},
		{Cgroup: gone, Owner: "default/gone"},
	}}
	d := New(dp, cfg, zap.NewNop())
	d.SetSource(src)
	if err := d.Ready(); !errors.Is(err, ErrNotReconciled) {
		t.Errorf("Ready before the first reconcile: %v", err)
	}
	res, err := d.Reconcile()
	if err == nil || !strings.Contains(err.Error(), gone.Path) {
		t.Errorf("Reconcile: %v, want the failure naming %s", err, gone.Path)
	}
	if len(res.Enabled) != 1 || res.Enabled[0] != good.ID {
		t.Errorf("enabled %v, want only %d", res.Enabled, good.ID)
	}
	if n := testutil.ToFloat64(d.health.enableFailures); n != 1 {
		t.Errorf("sockbypass_enable_failures_total = %v, want 1", n)
	}
	if src.failed["default/gone"] == nil || src.failed["default/good"] != nil {
		t.Errorf("failures reported to the source: %v", src.failed)
	}
	if err := d.Ready(); err == nil || !strings.Contains(err.Error(), gone.Path) {
		t.Errorf("Ready after a failed enable: %v", err)
	}

	// Once the selection no longer names it: Ready. A pending pod (no
	// cgroup on the node) is not.
	src.targets = src.targets[:1]
	if _, err := d.Reconcile(); err != nil {
		t.Fatal(err)
	}
	if err := d.Ready(); err != nil {
		t.Errorf("Ready: %v", err)
	}
	src.pending = []string{"default/nowhere"}
	d.Reconcile()
	if err := d.Ready(); err == nil || !strings.Contains(err.Error(), "default/nowhere") {
		t.Errorf("Ready with a pending pod: %v", err)
	}
	// Every reconcile counts, the failed one too.
	if n := testutil.ToFloat64(d.health.reconciles); n != 3 {
		t.Errorf("sockbypass_reconciles_total = %v after 3 reconciles", n)
	}
}

// Fallback implements FallbackReporter.
func (s *listSource) Fallback(t Target, e dataplane.FallbackEvent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fallbacks = append(s.fallbacks, t.Owner+": "+e.String())
}

// TestFallbackEventsAreLoggedAndReported: a member that sets SO_RCVLOWAT
// after it joined is logged with its ports, cgroup and owner, and reported
// to the source (the pod's Event), within seconds.
func TestFallbackEventsAreLoggedAndReported(t *testing.T) {
	dp, cfg := installWithoutGlobs(t)
	cg := tu.NewCgroup(t)
	src := &listSource{failed: map[string]error{}, targets: []Target{{Cgroup: cg, Owner: "default/app"}}}
	core, logs := observer.New(zap.InfoLevel)
	d := New(dp, cfg, zap.New(core))
	d.SetSource(src)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.Run(ctx, nil, nil); close(done) }()
	defer func() { cancel(); <-done }()
	waitUntil(t, 5*time.Second, func() bool { return d.Ready() == nil })

	l := tu.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	accepted := make(chan net.Conn, 2)
	go func() {
		for i := 0; i < 2; i++ {
			c, _ := l.Accept()
			accepted <- c
		}
	}()
	// dialOneByte connects and sends one byte, which the server reads.
	dialOneByte := func() (net.Conn, net.Conn) {
		c := tu.DialIn(t, cg, "tcp4", l.Addr().String())
		t.Cleanup(func() { c.Close() })
		s := <-accepted
		if s == nil {
			t.Fatal("accept failed")
		}
		t.Cleanup(func() { s.Close() })
		if _, err := c.Write([]byte{1}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Read(make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		return c, s
	}
	// A new listener's first connection stays plain (probation) until
	// its server reads it; the second joins at ESTABLISHED (both ends).
	dialOneByte()
	c, s := dialOneByte()
	rc, _ := c.(*net.TCPConn).SyscallConn()
	rc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVLOWAT, 10) })
	// Seen at the next message (the server's: it takes the stack).
	if _, err := s.Write([]byte("0123456789")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}

	local := c.LocalAddr().String()
	var line observer.LoggedEntry
	waitUntil(t, 5*time.Second, func() bool {
		for _, e := range logs.FilterField(zap.String("reason", dataplane.EventLateStackOption)).All() {
			line = e
			return true
		}
		return false
	})
	fields := line.ContextMap()
	if fields["local"] != local || fields["owner"] != "default/app" || fields["option"] != "SO_RCVLOWAT" || fields["cgroup"] != cg.Path {
		t.Errorf("logged %q %v; want local %s, owner default/app, option SO_RCVLOWAT, cgroup %s", line.Message, fields, local, cg.Path)
	}
	src.mu.Lock()
	defer src.mu.Unlock()
	if len(src.fallbacks) != 1 || !strings.HasPrefix(src.fallbacks[0], "default/app: connection "+local) {
		t.Errorf("reported to the source: %q; want one report on default/app naming %s", src.fallbacks, local)
	}
}

// waitUntil polls cond every 10 ms until it holds or timeout passes.
func waitUntil(t *testing.T, timeout time.Duration, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(timeout); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("condition not met within %v", timeout)
		}
	}
}
