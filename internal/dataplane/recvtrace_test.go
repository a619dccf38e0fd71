package dataplane

import (
	"io"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// TestRecvTraceOnlyWhileNeeded: the read-progress tracer runs on every
// recvmsg of the node, so it is attached only while a cgroup is enabled or
// an accelerated socket still lives (it paces that socket's writer).
func TestRecvTraceOnlyWhileNeeded(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	if !dp.RecvTraceAttached() {
		t.Fatal("tracer not attached with a cgroup enabled")
	}

	// A live pair outlives the disable: the tracer stays for it.
	c, s := acceptedPair(t, cg, "tcp4", "127.0.0.1:0")
	if _, err := dp.Disable(cg.ID); err != nil {
		t.Fatal(err)
	}
	if !dp.RecvTraceAttached() {
		t.Fatal("tracer detached while an accelerated socket lives")
	}
	st, err := dp.Status()
	if err != nil || !st.RecvTraceAttached || st.LiveSockets != 2 {
		t.Fatalf("status: attached=%v live=%d err=%v; want true and 2", st.RecvTraceAttached, st.LiveSockets, err)
	}
	// Status says what it costs: with BPF statistics on, the member's
	// reads are counted runs.
	stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
	if err != nil {
		t.Fatal(err)
	}
	before := st.RecvTraceCost
	if before == nil {
		t.Fatal("status gives no cost for the attached tracer")
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(s, buf); err != nil {
		t.Fatal(err)
	}
	st, err = dp.Status()
	stats.Close()
	if err != nil || st.RecvTraceCost == nil || st.RecvTraceCost.Runs <= before.Runs || st.RecvTraceCost.RunTimeNs <= before.RunTimeNs {
		t.Fatalf("status cost %+v (before %+v), %v: want runs and run time to grow", st.RecvTraceCost, before, err)
	}

	// The pair closes: the next release (the daemon's rescan) detaches it.
	c.Close()
	s.Close()
	waitFor(t, 5*time.Second, func() bool { socks, err := dp.Sockets(); return err == nil && len(socks) == 0 })
	if err := dp.ReleaseIdle(); err != nil {
		t.Fatal(err)
	}
	if dp.RecvTraceAttached() {
		t.Fatal("tracer still attached with no cgroup enabled and no socket left")
	}
	if st, _ := dp.Status(); st.RecvTraceAttached {
		t.Fatal("status says the tracer is attached")
	}

	// Enabling again attaches it again, and connections are paced again.
	enabledCgroup(t, dp)
	if !dp.RecvTraceAttached() {
		t.Fatal("tracer not attached again by enable")
	}
}
