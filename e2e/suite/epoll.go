package suite

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"time"
)

// epollCase is e2e/cmd/epollpingpong: ping-pong over TCP with size-byte
// messages, non-blocking sockets driven by epoll at both ends (the way
// event-loop servers do I/O), every echo checked. It is the suite's
// accelerated latency workload; sockperf, whose sockets block, is its
// control.
func epollCase(topo string, size int, cpus cpuPlacement) Case {
	return Case{
		Name:     fmt.Sprintf("%s/epoll-pingpong-%s-%s", topo, sizeLabel(size), cpus.Name),
		Topology: topo, Workload: "epoll-pingpong", Size: size, Metrics: sockperfMetrics,
		MinRedirected: minRedirected,
		start: func(ctx context.Context, rc *runContext) (instance, error) {
			return startEpollPingPong(ctx, rc, size, cpus)
		},
	}
}

type epollInstance struct {
	rc     *runContext
	bin    string
	server *proc
	port   int
	size   int
	cpus   cpuPlacement
}

func startEpollPingPong(ctx context.Context, rc *runContext, size int, cpus cpuPlacement) (instance, error) {
	bin, err := rc.env.epollPingPong()
	if err != nil {
		return nil, err
	}
	port, err := freePort(rc.topo.Server, rc.topo.ServerIP)
	if err != nil {
		return nil, err
	}
	srv, err := startListening(ctx, procSpec{
		args:  []string{bin, "server", "-addr", serverAddr(rc, port)},
		netns: rc.topo.Server, mode: rc.mode, cpus: cpus.Server, dir: rc.dir,
	}, port)
	if err != nil {
		return nil, err
	}
	return &epollInstance{rc: rc, bin: bin, server: srv, port: port, size: size, cpus: cpus}, nil
}

func (s *epollInstance) run(ctx context.Context) (Sample, error) {
	dur, warm := s.rc.cfg.Duration, 200*time.Millisecond
	if s.rc.cfg.Smoke {
		dur, warm = 300*time.Millisecond, 50*time.Millisecond
	}
	out, err := runProc(ctx, procSpec{
		args: []string{s.bin, "client", "-addr", serverAddr(s.rc, s.port), "-size", strconv.Itoa(s.size),
			"-duration", dur.String(), "-warmup", warm.String()},
		netns: s.rc.topo.Client, mode: s.rc.mode, cpus: s.cpus.Client, dir: s.rc.dir,
	}, dur+warm+30*time.Second)
	if err != nil {
		return Sample{}, err
	}
	return parseEpollPingPong(out)
}

var (
	epollPct    = regexp.MustCompile(`epollpingpong: percentile ([0-9.]+) = ([0-9.]+)`)
	epollRounds = regexp.MustCompile(`epollpingpong: (\d+) round trips of \d+ bytes in .*, every echo checked`)
)

// parseEpollPingPong reads the client's percentiles (microseconds, full
// round trip); the client checked every echo (it exits 1 otherwise).
func parseEpollPingPong(out string) (Sample, error) {
	s := Sample{Values: map[string]float64{}}
	s.addPercentiles(epollPct.FindAllStringSubmatch(out, -1))
	sortPercentiles(s.Percentiles)
	m := epollRounds.FindStringSubmatch(out)
	if len(s.Values) != 3 || m == nil {
		return s, fmt.Errorf("epollpingpong printed no percentiles:\n%s", tail(out, 2000))
	}
	s.Checks = append(s.Checks, "epoll-pingpong: every echo equal to its message")
	return s, nil
}

func (s *epollInstance) verify(context.Context) ([]string, error) { return nil, nil }

func (s *epollInstance) stop() error { return s.server.stop() }

// epollBuild builds e2e/cmd/epollpingpong once per suite.
type epollBuild struct {
	once sync.Once
	bin  string
	err  error
}

// epollPingPong returns the path of the epollpingpong program, built into
// the suite's temporary directory with the go command the first time.
func (env *Env) epollPingPong() (string, error) {
	env.epoll.once.Do(func() {
		gocmd, err := exec.LookPath("go")
		if err != nil {
			gocmd = "/usr/local/go/bin/go"
		}
		bin := filepath.Join(env.TempDir, "epollpingpong")
		cmd := exec.Command(gocmd, "build", "-o", bin, "github.com/sockbypass/sockbypass/e2e/cmd/epollpingpong")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			env.epoll.err = fmt.Errorf("build e2e/cmd/epollpingpong (the go command, from within the module): %w\n%s", err, out)
			return
		}
		env.epoll.bin = bin
	})
	return env.epoll.bin, env.epoll.err
}
