package suite

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sockbypass/sockbypass/e2e/workload"
)

const sockperfOutput = `sockperf: [Total Run] RunTime=1.001 sec; Warm up time=400 msec; SentMessages=43211; ReceivedMessages=43210
sockperf: ====> avg-rtt=50.822 (std-dev=20.892)
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Round trip is 50.822 usec
sockperf: ---> <MAX> observation = 1687.636
sockperf: ---> percentile 99.999 = 1687.636
sockperf: ---> percentile 99.990 =  845.345
sockperf: ---> percentile 99.900 =  162.691
sockperf: ---> percentile 99.000 =   84.715
sockperf: ---> percentile 90.000 =   60.569
sockperf: ---> percentile 75.000 =   54.851
sockperf: ---> percentile 50.000 =   48.622
sockperf: ---> percentile 25.000 =   45.467
sockperf: ---> <MIN> observation =    8.142
`

func TestParseSockperf(t *testing.T) {
	s, err := parseSockperf(sockperfOutput)
	if err != nil {
		t.Fatal(err)
	}
	if s.Values["p50 RTT"] != 48.622 || s.Values["p99 RTT"] != 84.715 || s.Values["p99.9 RTT"] != 162.691 {
		t.Errorf("values %v", s.Values)
	}
	if len(s.Percentiles) != 10 || s.Percentiles[0].P != 0 || s.Percentiles[9].P != 100 {
		t.Errorf("percentiles %v", s.Percentiles)
	}
	bad := strings.Replace(sockperfOutput, "# dropped messages = 0", "# dropped messages = 3", 1)
	if _, err := parseSockperf(bad); err == nil {
		t.Error("dropped messages accepted")
	}
}

const wrkOutput = `Running 1s test @ http://127.0.0.1:11113/body
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   460.89us  163.07us   2.62ms   76.43%
    Req/Sec    22.57k   768.71    23.28k    90.00%
  Latency Distribution
     50%  440.00us
     75%  520.00us
     90%  610.00us
     99%    1.20ms
  22480 requests in 1.00s, 2.15GB read
Requests/sec:  22455.48
Transfer/sec:      2.15GB
`

func TestParseWrk(t *testing.T) {
	r, err := parseWrk(wrkOutput)
	if err != nil {
		t.Fatal(err)
	}
	if r.reqPerSec != 22455.48 || r.requests != 22480 || r.p50 != 440 || r.p99 != 1200 {
		t.Errorf("parsed %+v", r)
	}
	withErrors := strings.Replace(wrkOutput, "Requests/sec", "  Non-2xx or 3xx responses: 7\nRequests/sec", 1)
	if _, err := parseWrk(withErrors); err == nil {
		t.Error("error statuses accepted")
	}
	withSockErr := strings.Replace(wrkOutput, "Requests/sec", "  Socket errors: connect 0, read 2, write 0, timeout 0\nRequests/sec", 1)
	if _, err := parseWrk(withSockErr); err == nil {
		t.Error("socket errors accepted")
	}
}

const redisOutput = `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","66844.91","0.185","0.048","0.175","0.303","0.399","4.895"
"GET","78988.94","0.156","0.040","0.159","0.239","0.271","3.031"
`

func TestParseRedisBenchmark(t *testing.T) {
	s, err := parseRedisBenchmark("noise\n" + redisOutput)
	if err != nil {
		t.Fatal(err)
	}
	if s.Values["SET req/s"] != 66844.91 || s.Values["GET req/s"] != 78988.94 || s.Values["GET p99"] != 271 {
		t.Errorf("values %v", s.Values)
	}
	if _, err := parseRedisBenchmark("ERROR: connection refused\n"); err == nil {
		t.Error("no output accepted")
	}
}

func TestMedianSpread(t *testing.T) {
	m, s := workload.MedianSpread([]float64{3, 1, 2})
	if m != 2 || s != 100 {
		t.Errorf("median %v spread %v", m, s)
	}
	m, _ = workload.MedianSpread([]float64{4, 1, 2, 3})
	if m != 2.5 {
		t.Errorf("median %v", m)
	}
	samples := []Sample{{Values: map[string]float64{"x": 5}}, {Values: map[string]float64{"x": 1}}, {Values: map[string]float64{"x": 3}}}
	if i := medianRun(samples, "x"); i != 2 {
		t.Errorf("median run %d", i)
	}
}

// TestReportFiles writes a report with every kind of case and checks the
// files and the table.
func TestReportFiles(t *testing.T) {
	lat, err := parseSockperf(sockperfOutput)
	if err != nil {
		t.Fatal(err)
	}
	r := &Report{
		Runs: 3, RunSeconds: 2, CPUs: 2, Kernel: "test", Label: "test",
		Topologies: []TopologyInfo{{Name: TopoLoopback, Description: "lo"}, {Name: TopoVeth, Description: "veth", CrossNetns: true}},
		Cases: []CaseResult{
			{Name: "loopback/sockperf-64B-1cpu", Topology: TopoLoopback, Workload: "sockperf", Size: 64, Kind: KindControl,
				Metrics:          []MetricResult{newMetricResult(sockperfMetrics[0], []float64{10, 11, 12}, []float64{6, 7, 8})},
				PlainPercentiles: lat.Percentiles, AccelPercentiles: lat.Percentiles,
				AccelTraffic: Traffic{RedirectedBytes: 1 << 20}, Paired: true},
			{Name: "loopback/iperf3-16KiB", Topology: TopoLoopback, Workload: "iperf3", Size: 16 << 10, Kind: KindControl,
				Metrics: []MetricResult{newMetricResult(iperfMetrics[0], []float64{10}, []float64{15})}},
			{Name: "loopback/connrate-wrk-nginx", Topology: TopoLoopback, Workload: "connrate", Kind: KindShortLived,
				Metrics: []MetricResult{newMetricResult(connRateMetrics[0], []float64{100}, []float64{99})}},
			{Name: "loopback/epoll-pingpong-64B-1cpu", Topology: TopoLoopback, Workload: "epoll-pingpong", Size: 64, Kind: KindAccelerated,
				Metrics:          []MetricResult{newMetricResult(sockperfMetrics[0], []float64{10}, []float64{7})},
				PlainPercentiles: lat.Percentiles, AccelPercentiles: lat.Percentiles,
				AccelTraffic: Traffic{RedirectedBytes: 1 << 20}, Paired: true},
			{Name: "loopback/iperf3-1KiB", Topology: TopoLoopback, Workload: "iperf3", Size: 1 << 10, Kind: KindControl,
				Metrics: []MetricResult{newMetricResult(iperfMetrics[0], []float64{2}, []float64{3})}},
			{Name: "veth/iperf3-16KiB", Topology: TopoVeth, Workload: "iperf3", Size: 16 << 10, Kind: KindControl,
				Metrics: []MetricResult{newMetricResult(iperfMetrics[0], []float64{5}, []float64{5})},
				Note:    "not accelerated: iperf3 connects with blocking sockets"},
			{Name: "veth/redis-P1", Topology: TopoVeth, Workload: "redis", Kind: KindAccelerated, Error: "veth/redis-P1: boom"},
		},
		Failures: []string{"veth/redis-P1: boom"},
	}
	dir := t.TempDir()
	files, err := r.WriteFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"results.json", "results.md", "latency-loopback-sockperf-64B-1cpu.png", "latency-loopback-epoll-pingpong-64B-1cpu.png", "throughput-loopback.png", "throughput-veth.png"} {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
	if len(files) != 6 {
		t.Errorf("files %v", files)
	}
	md, _ := os.ReadFile(filepath.Join(dir, "results.md"))
	for _, want := range []string{
		"| sockperf-64B-1cpu | control: blocking, plain | p50 RTT | 11.00 us | 7.00 us | 0.64x (better) | 18% / 29% | 1.0 MiB (100%) |",
		"| iperf3-16KiB | control: blocking, plain | throughput | 10.00 Gbit/s | 15.00 Gbit/s | 1.50x (better) |",
		"| epoll-pingpong-64B-1cpu | accelerated | p50 RTT | 10.00 us | 7.00 us | 0.70x (better) |",
		"| connrate-wrk-nginx | short-lived, mostly plain | connections/s |",
		"| 5.00 Gbit/s | 1.00x (same) |",
		"not accelerated: iperf3 connects with blocking sockets",
		"| redis-P1 | accelerated | FAILED |",
		"## Failures",
	} {
		if !strings.Contains(string(md), want) {
			t.Errorf("results.md lacks %q:\n%s", want, md)
		}
	}
	// Each topology's table leads with the accelerated workloads, then
	// the short-lived, then the controls, each in the order they ran.
	order := []string{"| epoll-pingpong-64B-1cpu |", "| connrate-wrk-nginx |", "| sockperf-64B-1cpu |", "| iperf3-16KiB |", "| iperf3-1KiB |"}
	last := -1
	for _, row := range order {
		i := strings.Index(string(md), row)
		if i < last {
			t.Errorf("row %s is out of order (want %q):\n%s", row, order, md)
		}
		last = i
	}
}

// TestVerdict checks the counter rules of a case without running one: the
// privileged TestSuiteQuick feeds them real counters.
func TestVerdict(t *testing.T) {
	blocking := iperfCase(TopoVeth, 16<<10)
	paired := redisCase(TopoVeth, 16)
	for _, tc := range []struct {
		name         string
		c            Case
		plain, accel Traffic
		wantErr      string
	}{
		{"blocking, left alone", blocking, Traffic{}, Traffic{StackEgressBytes: 64 << 20, SocketsBlocking: 4}, ""},
		{"blocking, redirected", blocking, Traffic{}, Traffic{RedirectedBytes: 1, SocketsInserted: 2, SocketsBlocking: 4}, "blocking sockets must never join"},
		{"blocking, inserted only", blocking, Traffic{}, Traffic{SocketsInserted: 1, SocketsBlocking: 4}, "blocking sockets must never join"},
		{"blocking, not counted as blocking", blocking, Traffic{}, Traffic{StackEgressBytes: 64 << 20, SocketsBlocking: 3}, "sockets_blocking moved by 3, want 4"},
		{"plain accelerated", paired, Traffic{RedirectedBytes: 10}, Traffic{RedirectedBytes: 100}, "plain runs were accelerated"},
		{"paired, all redirected", paired, Traffic{}, Traffic{RedirectedBytes: 1000}, ""},
		{"paired, 1% through the stack", paired, Traffic{}, Traffic{RedirectedBytes: 990, StackEgressBytes: 10}, ""},
		{"paired, 2% through the stack", paired, Traffic{}, Traffic{RedirectedBytes: 980, StackEgressBytes: 20}, "redirected 98.00% of their payload"},
		{"not paired", paired, Traffic{}, Traffic{StackEgressBytes: 1000}, "redirected 0.00%"},
		{"nothing sent", paired, Traffic{}, Traffic{}, "redirected 0.00%"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := CaseResult{PlainTraffic: tc.plain, AccelTraffic: tc.accel}
			err := tc.c.verdict(&res, 2)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("verdict: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("verdict: %v, want an error with %q", err, tc.wantErr)
			}
		})
	}
}

// TestParseEpollPingPong reads the epollpingpong client's output, and
// fails on output without its percentiles.
func TestParseEpollPingPong(t *testing.T) {
	out := `epollpingpong: 153395 round trips of 64 bytes in 1s, every echo checked
epollpingpong: percentile 0.000 = 5.214
epollpingpong: percentile 50.000 = 5.827
epollpingpong: percentile 99.000 = 28.989
epollpingpong: percentile 99.900 = 44.316
epollpingpong: percentile 100.000 = 4430.460
`
	s, err := parseEpollPingPong(out)
	if err != nil {
		t.Fatal(err)
	}
	if s.Values["p50 RTT"] != 5.827 || s.Values["p99 RTT"] != 28.989 || s.Values["p99.9 RTT"] != 44.316 || len(s.Percentiles) != 5 || len(s.Checks) != 1 {
		t.Errorf("parsed %+v", s)
	}
	if _, err := parseEpollPingPong("epollpingpong: echo 3 differs from the message sent\n"); err == nil {
		t.Error("output without percentiles parsed")
	}
}

// TestCaseKinds: the blocking programs are the controls, the short
// connections short-lived, the event-loop programs accelerated; the full
// suite starts with an accelerated ping-pong.
func TestCaseKinds(t *testing.T) {
	want := map[string]string{"sockperf": KindControl, "iperf3": KindControl, "connrate": KindShortLived,
		"epoll-pingpong": KindAccelerated, "redis": KindAccelerated, "nginx": KindAccelerated}
	for _, c := range AllCases() {
		if k, ok := want[c.Workload]; ok && c.Kind() != k {
			t.Errorf("%s: kind %q, want %q", c.Name, c.Kind(), k)
		}
	}
	if c := FullCases()[0]; c.Workload != "epoll-pingpong" {
		t.Errorf("the full suite starts with %s, want the epoll ping-pong", c.Name)
	}
}
