package suite

import (
	"context"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// cpuPlacement pins the two ends of a latency case.
type cpuPlacement struct {
	// Name is "1cpu" (both ends on CPU 0) or "2cpu" (server CPU 0,
	// client CPU 1).
	Name           string
	Server, Client string
}

// The CPU placements of the latency cases.
var (
	OneCPU = cpuPlacement{Name: "1cpu", Server: "0", Client: "0"}
	TwoCPU = cpuPlacement{Name: "2cpu", Server: "0", Client: "1"}
)

// sockperfMetrics are the metrics of a ping-pong case (full round trip).
var sockperfMetrics = []MetricSpec{
	{Name: "p50 RTT", Unit: "us", LowerIsBetter: true},
	{Name: "p99 RTT", Unit: "us", LowerIsBetter: true},
	{Name: "p99.9 RTT", Unit: "us", LowerIsBetter: true},
}

// sockperfCase is sockperf ping-pong over TCP with size-byte messages.
func sockperfCase(topo string, size int, cpus cpuPlacement) Case {
	return Case{
		Name:     fmt.Sprintf("%s/sockperf-%s-%s", topo, sizeLabel(size), cpus.Name),
		Topology: topo, Workload: "sockperf", Size: size, Metrics: sockperfMetrics,
		// sockperf --nonblocked would pair, but its idle servers spin (the
		// suite keeps the plain and the accelerated server up at once):
		// the Go-native workloads measure non-blocking request/response.
		Blocking: "sockperf uses blocking sockets", BlockingConns: 1,
		start: func(ctx context.Context, rc *runContext) (instance, error) {
			return startSockperf(ctx, rc, size, cpus)
		},
	}
}

type sockperfInstance struct {
	rc     *runContext
	server *proc
	port   int
	size   int
	cpus   cpuPlacement
}

func startSockperf(ctx context.Context, rc *runContext, size int, cpus cpuPlacement) (instance, error) {
	port, err := freePort(rc.topo.Server, rc.topo.ServerIP)
	if err != nil {
		return nil, err
	}
	srv, err := startListening(ctx, procSpec{
		args:  []string{"sockperf", "server", "--tcp", "-i", rc.topo.ServerIP, "-p", strconv.Itoa(port)},
		netns: rc.topo.Server, mode: rc.mode, cpus: cpus.Server, dir: rc.dir,
	}, port)
	if err != nil {
		return nil, err
	}
	return &sockperfInstance{rc: rc, server: srv, port: port, size: size, cpus: cpus}, nil
}

func (s *sockperfInstance) run(ctx context.Context) (Sample, error) {
	secs := s.rc.cfg.seconds()
	out, err := runProc(ctx, procSpec{
		args: []string{"sockperf", "ping-pong", "--tcp", "-i", s.rc.topo.ServerIP, "-p", strconv.Itoa(s.port),
			"-m", strconv.Itoa(s.size), "-t", strconv.Itoa(secs), "--full-rtt"},
		netns: s.rc.topo.Client, mode: s.rc.mode, cpus: s.cpus.Client, dir: s.rc.dir,
	}, time.Duration(secs)*time.Second+30*time.Second)
	if err != nil {
		return Sample{}, err
	}
	return parseSockperf(out)
}

var (
	sockperfPct  = regexp.MustCompile(`---> percentile\s+([0-9.]+)\s*=\s*([0-9.]+)`)
	sockperfMin  = regexp.MustCompile(`---> <MIN> observation\s*=\s*([0-9.]+)`)
	sockperfMax  = regexp.MustCompile(`---> <MAX> observation\s*=\s*([0-9.]+)`)
	sockperfLoss = regexp.MustCompile(`# dropped messages = (\d+); # duplicated messages = (\d+); # out-of-order messages = (\d+)`)
)

// parseSockperf reads the percentiles (microseconds, full round trip) and
// checks that no message was dropped, duplicated or reordered.
func parseSockperf(out string) (Sample, error) {
	s := Sample{Values: map[string]float64{}}
	if m := sockperfMin.FindStringSubmatch(out); m != nil {
		v, _ := strconv.ParseFloat(m[1], 64)
		s.Percentiles = append(s.Percentiles, Percentile{P: 0, Us: v})
	}
	s.addPercentiles(sockperfPct.FindAllStringSubmatch(out, -1))
	if m := sockperfMax.FindStringSubmatch(out); m != nil {
		v, _ := strconv.ParseFloat(m[1], 64)
		s.Percentiles = append(s.Percentiles, Percentile{P: 100, Us: v})
	}
	sortPercentiles(s.Percentiles)
	if len(s.Values) != 3 {
		return s, fmt.Errorf("sockperf printed no percentiles:\n%s", tail(out, 2000))
	}
	m := sockperfLoss.FindStringSubmatch(out)
	if m == nil {
		return s, fmt.Errorf("sockperf printed no message accounting:\n%s", tail(out, 2000))
	}
	if m[1] != "0" || m[2] != "0" || m[3] != "0" {
		return s, fmt.Errorf("sockperf: %s", strings.TrimSpace(m[0]))
	}
	s.Checks = append(s.Checks, "sockperf: no dropped, duplicated or out-of-order messages")
	return s, nil
}

func (s *sockperfInstance) verify(context.Context) ([]string, error) { return nil, nil }

func (s *sockperfInstance) stop() error { return s.server.stop() }

// serverAddr is host:port of a server of the topology.
func serverAddr(rc *runContext, port int) string {
	return net.JoinHostPort(rc.topo.ServerIP, strconv.Itoa(port))
}

// addPercentiles adds the latency percentiles matched (each: the percentile
// and its round trip in microseconds, as sockperf and epollpingpong print
// them, "50.000" and so on) to s, with the p50, p99 and p99.9 as values.
func (s *Sample) addPercentiles(matches [][]string) {
	for _, m := range matches {
		p, _ := strconv.ParseFloat(m[1], 64)
		v, _ := strconv.ParseFloat(m[2], 64)
		s.Percentiles = append(s.Percentiles, Percentile{P: p, Us: v})
		switch m[1] {
		case "50.000":
			s.Values["p50 RTT"] = v
		case "99.000":
			s.Values["p99 RTT"] = v
		case "99.900":
			s.Values["p99.9 RTT"] = v
		}
	}
}
