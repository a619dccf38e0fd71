package suite

import (
	"context"
	"crypto/rand"
	"encoding/csv"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// redisMetrics are the metrics of a redis-benchmark case.
var redisMetrics = []MetricSpec{
	{Name: "GET req/s", Unit: "req/s"},
	{Name: "SET req/s", Unit: "req/s"},
	{Name: "GET p99", Unit: "us", LowerIsBetter: true},
}

// redisValueSize is the value size of the benchmark (-d).
const redisValueSize = 64

// redisCase is redis-benchmark SET and GET against redis-server, with
// pipeline requests per round trip (1: no pipelining).
func redisCase(topo string, pipeline int) Case {
	return Case{
		Name:     fmt.Sprintf("%s/redis-P%d", topo, pipeline),
		Topology: topo, Workload: "redis", Metrics: redisMetrics,
		MinRedirected: minRedirected,
		start: func(ctx context.Context, rc *runContext) (instance, error) {
			return startRedis(ctx, rc, pipeline)
		},
	}
}

type redisInstance struct {
	rc       *runContext
	server   *proc
	port     int
	pipeline int
	runs     int
}

func startRedis(ctx context.Context, rc *runContext, pipeline int) (instance, error) {
	port, err := freePort(rc.topo.Server, rc.topo.ServerIP)
	if err != nil {
		return nil, err
	}
	srv, err := startListening(ctx, procSpec{
		args: []string{"redis-server", "--port", strconv.Itoa(port), "--bind", rc.topo.ServerIP,
			"--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no", "--dir", rc.dir},
		netns: rc.topo.Server, mode: rc.mode, dir: rc.dir,
	}, port)
	if err != nil {
		return nil, err
	}
	return &redisInstance{rc: rc, server: srv, port: port, pipeline: pipeline}, nil
}

// requests is the -n of one run, sized so that SET and GET together last
// about the run duration on a 2-core machine.
func (r *redisInstance) requests() int {
	if r.rc.cfg.Smoke {
		return 2000 * r.pipeline
	}
	perSec := 30000 // each of SET and GET, unpipelined
	if r.pipeline > 1 {
		perSec = 250000
	}
	return perSec * r.rc.cfg.seconds()
}

func (r *redisInstance) run(ctx context.Context) (Sample, error) {
	out, err := runProc(ctx, procSpec{
		args: []string{"redis-benchmark", "-h", r.rc.topo.ServerIP, "-p", strconv.Itoa(r.port),
			"-t", "set,get", "-n", strconv.Itoa(r.requests()), "-c", "20", "-P", strconv.Itoa(r.pipeline),
			"-r", "100000", "-d", strconv.Itoa(redisValueSize), "--csv"},
		netns: r.rc.topo.Client, mode: r.rc.mode, dir: r.rc.dir,
	}, time.Duration(r.rc.cfg.seconds())*time.Second*4+30*time.Second)
	if err != nil {
		return Sample{}, err
	}
	s, err := parseRedisBenchmark(out)
	if err != nil {
		return s, err
	}
	r.runs++
	return s, nil
}

// check reads back values written with redis-cli after each run.
func (r *redisInstance) check(ctx context.Context) (string, error) {
	return r.readBack(ctx, fmt.Sprintf("sbv:%d:", r.runs))
}

// parseRedisBenchmark reads the --csv output of redis-benchmark 7.
func parseRedisBenchmark(out string) (Sample, error) {
	s := Sample{Values: map[string]float64{}}
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, `"`) {
			lines = append(lines, l)
		}
	}
	recs, err := csv.NewReader(strings.NewReader(strings.Join(lines, "\n"))).ReadAll()
	if err != nil || len(recs) < 2 {
		return s, fmt.Errorf("redis-benchmark output: %v:\n%s", err, tail(out, 2000))
	}
	col := map[string]int{}
	for i, name := range recs[0] {
		col[name] = i
	}
	for _, rec := range recs[1:] {
		get := func(name string) float64 {
			i, ok := col[name]
			if !ok || i >= len(rec) {
				return 0
			}
			v, _ := strconv.ParseFloat(rec[i], 64)
			return v
		}
		switch rec[0] {
		case "SET":
			s.Values["SET req/s"] = get("rps")
		case "GET":
			s.Values["GET req/s"] = get("rps")
			s.Values["GET p99"] = get("p99_latency_ms") * 1000
		}
	}
	if s.Values["SET req/s"] == 0 || s.Values["GET req/s"] == 0 {
		return s, fmt.Errorf("redis-benchmark reported no SET or GET rate:\n%s", tail(out, 2000))
	}
	return s, nil
}

// redisCheckSizes are the value sizes (bytes before hex encoding) written
// and read back after each run.
var redisCheckSizes = []int{16, 1024, 16384, 65536}

// readBack writes values of several sizes with redis-cli, reads them back
// with MGET, and compares; then checks that a value the benchmark wrote
// has its size (-d). Both clients run in the mode's cgroup. redis-cli
// connects non-blocking and then blocks (hiredis's blocking context): its
// connections join, then leave the fast path (late_blocking), so they run
// after the run's counters were read.
func (r *redisInstance) readBack(ctx context.Context, prefix string) (string, error) {
	const n = 32
	keys := make([]string, n)
	vals := make([]string, n)
	var cmds strings.Builder
	for i := range keys {
		raw := make([]byte, redisCheckSizes[i%len(redisCheckSizes)])
		rand.Read(raw)
		keys[i] = prefix + strconv.Itoa(i)
		vals[i] = hex.EncodeToString(raw)
		fmt.Fprintf(&cmds, "SET %s %s\n", keys[i], vals[i])
	}
	base := []string{"redis-cli", "-h", r.rc.topo.ServerIP, "-p", strconv.Itoa(r.port)}
	cli := func(stdin string, args ...string) (string, error) {
		spec := procSpec{args: append(append([]string(nil), base...), args...), netns: r.rc.topo.Client, mode: r.rc.mode, dir: r.rc.dir}
		if stdin != "" {
			spec.stdin = strings.NewReader(stdin)
		}
		return runProc(ctx, spec, 30*time.Second)
	}
	out, err := cli(cmds.String())
	if err != nil {
		return "", err
	}
	if got := strings.Count(out, "OK"); got != n {
		return "", fmt.Errorf("redis-cli SET: %d OK of %d:\n%s", got, n, tail(out, 500))
	}
	out, err = cli("", append([]string{"--raw", "MGET"}, keys...)...)
	if err != nil {
		return "", err
	}
	got := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(got) != n {
		return "", fmt.Errorf("redis-cli MGET returned %d values, want %d", len(got), n)
	}
	for i := range got {
		if got[i] != vals[i] {
			return "", fmt.Errorf("redis value %s read back differs (%d bytes, want %d)", keys[i], len(got[i]), len(vals[i]))
		}
	}
	// SCAN prints the next cursor, then the keys of this batch.
	var key string
	for cursor, tries := "0", 0; key == "" && tries < 50; tries++ {
		out, err = cli("", "--raw", "SCAN", cursor, "MATCH", "key:*", "COUNT", "1000")
		if err != nil {
			return "", err
		}
		scanned := strings.Fields(out)
		if len(scanned) == 0 {
			return "", fmt.Errorf("redis-cli SCAN: %s", tail(out, 500))
		}
		if len(scanned) > 1 {
			key = scanned[1]
		}
		if cursor = scanned[0]; cursor == "0" {
			break
		}
	}
	if key == "" {
		return "", fmt.Errorf("no key written by redis-benchmark found")
	}
	l, err := cli("", "--raw", "STRLEN", key)
	if err != nil {
		return "", err
	}
	if strings.TrimSpace(l) != strconv.Itoa(redisValueSize) {
		return "", fmt.Errorf("benchmark value %s has %s bytes, want %d", key, strings.TrimSpace(l), redisValueSize)
	}
	return fmt.Sprintf("redis-cli: %d values (16 B to 64 KiB) read back identical after each run", n), nil
}

func (r *redisInstance) verify(context.Context) ([]string, error) { return nil, nil }

func (r *redisInstance) stop() error { return r.server.stop() }
