package suite

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// iperfMetrics are the metrics of a stream case.
var iperfMetrics = []MetricSpec{
	{Name: "throughput", Unit: "Gbit/s"},
	{Name: "CPU per GB", Unit: "CPU-s/GB", LowerIsBetter: true},
}

// iperfCase is one iperf3 TCP stream with size-byte writes. iperf3
// cannot check what it received, and needs not here: its sockets block,
// so what the case proves is that sockbypass leaves it alone (no socket
// inserted, no byte redirected, both its connections, control and data,
// counted in sockets_blocking); its bytes are plain TCP's.
func iperfCase(topo string, size int) Case {
	return Case{
		Name:     fmt.Sprintf("%s/iperf3-%s", topo, sizeLabel(size)),
		Topology: topo, Workload: "iperf3", Size: size, Metrics: iperfMetrics,
		Blocking: "iperf3 connects with blocking sockets", BlockingConns: 2,
		start: func(ctx context.Context, rc *runContext) (instance, error) {
			return startIperf(ctx, rc, size)
		},
	}
}

type iperfInstance struct {
	rc     *runContext
	server *proc
	port   int
	size   int
}

func startIperf(ctx context.Context, rc *runContext, size int) (instance, error) {
	port, err := freePort(rc.topo.Server, rc.topo.ServerIP)
	if err != nil {
		return nil, err
	}
	srv, err := startListening(ctx, procSpec{
		args:  []string{"iperf3", "-s", "-B", rc.topo.ServerIP, "-p", strconv.Itoa(port)},
		netns: rc.topo.Server, mode: rc.mode, dir: rc.dir,
	}, port)
	if err != nil {
		return nil, err
	}
	return &iperfInstance{rc: rc, server: srv, port: port, size: size}, nil
}

// smokeStreamBytes bounds a smoke-test stream.
const smokeStreamBytes = "64M"

func (s *iperfInstance) run(ctx context.Context) (Sample, error) {
	secs := s.rc.cfg.seconds()
	args := []string{"iperf3", "-c", s.rc.topo.ServerIP, "-p", strconv.Itoa(s.port), "-l", strconv.Itoa(s.size), "-J"}
	if s.rc.cfg.Smoke {
		args = append(args, "-n", smokeStreamBytes)
	} else {
		args = append(args, "-t", strconv.Itoa(secs))
	}
	cpu0, err := cpuBusy()
	if err != nil {
		return Sample{}, err
	}
	out, err := runProc(ctx, procSpec{args: args, netns: s.rc.topo.Client, mode: s.rc.mode, dir: s.rc.dir},
		time.Duration(secs)*time.Second+30*time.Second)
	if err != nil {
		return Sample{}, err
	}
	cpu1, err := cpuBusy()
	if err != nil {
		return Sample{}, err
	}
	var doc struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				Bytes         float64 `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return Sample{}, fmt.Errorf("iperf3 output: %w: %s", err, tail(out, 2000))
	}
	if doc.Error != "" {
		return Sample{}, fmt.Errorf("iperf3: %s", doc.Error)
	}
	rx := doc.End.SumReceived
	if rx.Bytes == 0 {
		return Sample{}, fmt.Errorf("iperf3 received nothing: %s", tail(out, 2000))
	}
	return Sample{Values: map[string]float64{
		"throughput": rx.BitsPerSecond / 1e9,
		"CPU per GB": (cpu1 - cpu0) / (rx.Bytes / 1e9),
	}}, nil
}

func (s *iperfInstance) verify(context.Context) ([]string, error) { return nil, nil }

func (s *iperfInstance) stop() error { return s.server.stop() }
