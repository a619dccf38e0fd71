package suite

import (
	"context"
	"time"
)

// Config bounds a suite run.
type Config struct {
	// Runs is the number of runs per mode (median reported); at least 1.
	Runs int
	// Duration is the length of one timed run (whole seconds for the tools
	// that only take seconds, at least 1 s).
	Duration time.Duration
	// Smoke makes every run as short as the tools allow (a CI check, not a
	// measurement): byte-bounded streams, small request counts.
	Smoke bool
	// Progress, when set, receives one line per run.
	Progress func(format string, args ...any)
}

// seconds is Duration in whole seconds, at least 1.
func (c Config) seconds() int {
	s := int(c.Duration.Round(time.Second) / time.Second)
	if s < 1 {
		return 1
	}
	return s
}

// Case is one workload with its parameters on one topology.
type Case struct {
	// Name identifies the case: "<topology>/<workload>-<params>".
	Name string
	// Topology is TopoLoopback or TopoVeth.
	Topology string
	// Workload is the program family: sockperf, iperf3, connrate, redis, nginx.
	Workload string
	// Size is the message, write or body size in bytes, when it has one.
	Size int
	// Metrics are the metrics every run reports, headline first.
	Metrics []MetricSpec
	// Blocking, when set, says why the workload's sockets block (and so
	// are never accelerated: a blocking recv on a sockhash member may
	// return EAGAIN): its accelerated runs must take the normal path.
	Blocking string
	// BlockingConns is, for a blocking workload, how many connections
	// each run makes: every one of them must be counted as blocking
	// (sockets_blocking), the reason it stays plain.
	BlockingConns int
	// MinRedirected is, for a workload that does not block, the smallest
	// share of the accelerated runs' payload that must be redirected:
	// redirected / (redirected + TCP payload through the stack), per
	// case from measured values (see the case constructors).
	MinRedirected float64
	// ShortLived, for a workload of short connections (one request per
	// connection): its listener learns that its connections are
	// short-lived and leaves most of them plain, where pairing would cost
	// more than it gains. The accelerated runs must have left at least
	// MinShortLived of their connections plain that way.
	ShortLived bool
	// start starts the servers of one mode and returns the instance that
	// runs the clients.
	start func(ctx context.Context, rc *runContext) (instance, error)
}

// Kinds of cases (Case.Kind), the order the report lists them in.
const (
	// KindAccelerated: a workload sockbypass pairs (non-blocking
	// sockets); it must redirect MinRedirected of its payload.
	KindAccelerated = "accelerated"
	// KindShortLived: short connections, which sockbypass leaves mostly
	// plain once their listener is known to serve short-lived ones.
	KindShortLived = "short-lived, mostly plain"
	// KindControl: a workload with blocking sockets, which sockbypass
	// never pairs: what an enabled cgroup costs plain sockets.
	KindControl = "control: blocking, plain"
)

// Kind says which of KindAccelerated, KindShortLived, KindControl c is.
func (c Case) Kind() string {
	switch {
	case c.Blocking != "":
		return KindControl
	case c.ShortLived:
		return KindShortLived
	}
	return KindAccelerated
}

// kindRank orders kinds in reports: accelerated workloads lead.
func kindRank(kind string) int {
	switch kind {
	case KindAccelerated:
		return 0
	case KindShortLived:
		return 1
	}
	return 2
}

// runContext is what a case needs to start one mode.
type runContext struct {
	env  *Env
	topo *Topology
	mode *Mode
	cfg  Config
	// dir is a temporary directory of this case and mode.
	dir string
}

// instance is a case started in one mode: servers up, ready for runs.
// runChecker is an instance with an integrity check after each run, which
// runs after the run's counters were read: its own clients (redis-cli, a
// blocking client that leaves the fast path) are not the benchmark's
// traffic.
type runChecker interface {
	check(ctx context.Context) (string, error)
}

type instance interface {
	// run runs the client once, verifies what it can, and returns the
	// measurements.
	run(ctx context.Context) (Sample, error)
	// verify runs the final integrity checks of the mode, after the runs.
	verify(ctx context.Context) ([]string, error)
	// stop stops the servers.
	stop() error
}
