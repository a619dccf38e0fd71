package metrics

import (
	"errors"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/stats"
)

func TestCollectorNamesAndLabels(t *testing.T) {
	report := &stats.Report{
		Cgroups: []stats.Cgroup{{Cgroup: "/pods/a", LiveSockets: 3,
			Figures: stats.FiguresOf(dataplane.CgroupCounters{RedirectedBytes: 900, StackEgressBytes: 100, FallbackWaitall: 2})}},
		Unattributed: stats.FiguresOf(dataplane.CgroupCounters{StackEgressBytes: 7}),
	}
	c := NewCollector(func() (*stats.Report, error) { return report, nil })
	if err := testutil.CollectAndCompare(c, strings.NewReader(`
# HELP sockbypass_redirected_bytes_total Bytes redirected socket to socket, skipping the TCP/IP stack.
# TYPE sockbypass_redirected_bytes_total counter
sockbypass_redirected_bytes_total{cgroup="(none)"} 0
sockbypass_redirected_bytes_total{cgroup="/pods/a"} 900
# HELP sockbypass_bypass_ratio Redirected bytes / (redirected + stack egress bytes), 0 to 1; absent before any traffic.
# TYPE sockbypass_bypass_ratio gauge
sockbypass_bypass_ratio{cgroup="(none)"} 0
sockbypass_bypass_ratio{cgroup="/pods/a"} 0.9
# HELP sockbypass_live_sockets Sockets of the cgroup in the sockhash now.
# TYPE sockbypass_live_sockets gauge
sockbypass_live_sockets{cgroup="/pods/a"} 3
`), "sockbypass_redirected_bytes_total", "sockbypass_bypass_ratio", "sockbypass_live_sockets"); err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(c, "sockbypass_fallbacks_total"); n != 10 {
		t.Errorf("%d fallback series, want 5 reasons x 2 label values", n)
	}
	problems, err := testutil.CollectAndLint(c)
	if err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}

func TestCollectorReportsDownWhenTheStateCannotBeRead(t *testing.T) {
	c := NewCollector(func() (*stats.Report, error) { return nil, errors.New("gone") })
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP sockbypass_up 1 when the pinned datapath could be read at this scrape.
# TYPE sockbypass_up gauge
sockbypass_up 0
`), "sockbypass_up"); err != nil {
		t.Error(err)
	}
}
