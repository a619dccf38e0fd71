package suite

import (
	"context"
	"fmt"
)

// nginxMetrics are the metrics of a wrk-against-nginx case.
var nginxMetrics = []MetricSpec{
	{Name: "requests/s", Unit: "req/s"},
	{Name: "p99 latency", Unit: "us", LowerIsBetter: true},
}

// connRateMetrics are the metrics of the connection-rate case.
var connRateMetrics = []MetricSpec{
	{Name: "connections/s", Unit: "conn/s"},
	{Name: "p99 latency", Unit: "us", LowerIsBetter: true},
}

// nginxCase is wrk against nginx serving a random body of bodySize bytes
// over keep-alive connections, with sendfile on or off.
func nginxCase(topo string, bodySize int, sendfile bool) Case {
	sf := "nosendfile"
	if sendfile {
		sf = "sendfile"
	}
	return Case{
		Name:     fmt.Sprintf("%s/nginx-%s-%s", topo, sizeLabel(bodySize), sf),
		Topology: topo, Workload: "nginx", Size: bodySize, Metrics: nginxMetrics,
		MinRedirected: minRedirected,
		start: func(ctx context.Context, rc *runContext) (instance, error) {
			srv, err := startNginx(ctx, rc, bodySize, sendfile)
			if err != nil {
				return nil, err
			}
			return &httpInstance{rc: rc, srv: srv, path: "/body", metric: "requests/s"}, nil
		},
	}
}

// connRateCase is short connections per second: wrk sends every request
// on a new connection (Connection: close) to nginx answering 3 bytes, so
// the connect, accept and close dominate, sock_ops included. nginx's
// listener learns that its connections are short-lived and leaves most of
// them plain: the case measures what sockbypass costs them.
func connRateCase(topo string) Case {
	return Case{
		Name:     topo + "/connrate-wrk-nginx",
		Topology: topo, Workload: "connrate", Metrics: connRateMetrics,
		ShortLived: true,
		start: func(ctx context.Context, rc *runContext) (instance, error) {
			srv, err := startNginx(ctx, rc, 0, true)
			if err != nil {
				return nil, err
			}
			return &httpInstance{rc: rc, srv: srv, path: "/close", close: true, metric: "connections/s"}, nil
		},
	}
}

// httpInstance runs wrk against one nginx.
type httpInstance struct {
	rc     *runContext
	srv    *nginxServer
	path   string
	close  bool
	metric string
}

// checksPerRun is how many bodies each run fetches and checksums.
const checksPerRun = 4

func (h *httpInstance) run(ctx context.Context) (Sample, error) {
	r, _, err := runWrk(ctx, h.rc, wrkOptions{url: h.srv.url(h.rc, h.path), close: h.close, seconds: h.rc.cfg.seconds()})
	if err != nil {
		return Sample{}, err
	}
	check, err := httpChecksums(h.rc, h.srv.port, h.path, h.srv.bodies[h.path], checksPerRun)
	if err != nil {
		return Sample{}, err
	}
	return Sample{
		Values: map[string]float64{h.metric: r.reqPerSec, "p99 latency": r.p99},
		Checks: []string{check, "wrk: no error status, no socket error"},
	}, nil
}

func (h *httpInstance) verify(ctx context.Context) ([]string, error) {
	check, err := wrkVerify(ctx, h.rc, h.srv.url(h.rc, h.path), h.srv.bodies[h.path], h.close)
	if err != nil {
		return nil, err
	}
	return []string{check}, nil
}

func (h *httpInstance) stop() error { return h.srv.stop() }
