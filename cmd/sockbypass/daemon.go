package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/metrics"
	"github.com/sockbypass/sockbypass/internal/stats"
)

var daemonCommand = command{
	summary: "run in the foreground: serve Prometheus metrics of the pinned state",
	usage:   "daemon [--metrics-addr HOST:PORT] [--cgroup PATH ...]",
	run:     runDaemon,
}

func runDaemon(e *env, args []string) error {
	var pinDir, logLevel, metricsAddr string
	var cgroups stringList
	fs := newFlagSet("daemon", e, &pinDir, &logLevel)
	fs.StringVar(&metricsAddr, "metrics-addr", "127.0.0.1:9464", "address to serve /metrics and /healthz on; empty disables it")
	fs.Var(&cgroups, "cgroup", "cgroup to enable at start (repeatable), with TC accounting on lo")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	resolved, err := resolveAll(cgroups)
	if err != nil {
		return err
	}
	dp, err := openDataplane(e, true, 0)
	if err != nil {
		return err
	}
	defer dp.Close()
	for _, cg := range resolved {
		if _, err := dp.Enable(cg, dataplane.EnableOptions{TCDevices: []dataplane.TCDevice{dataplane.DefaultTCDevice}}); err != nil {
			return err
		}
	}
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var srv *http.Server
	if metricsAddr != "" {
		ln, err := net.Listen("tcp", metricsAddr)
		if err != nil {
			return fmt.Errorf("--metrics-addr %s: %w", metricsAddr, err)
		}
		srv = newMetricsServer(dp, mounts.V2)
		go func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				e.log.Error("metrics server", zap.Error(err))
				stop()
			}
		}()
		e.log.Info("serving metrics", zap.String("addr", ln.Addr().String()))
		fmt.Fprintf(e.stdout, "sockbypass daemon: serving metrics on http://%s/metrics (pin directory %s)\n", ln.Addr(), e.pinDir)
	}
	<-ctx.Done()
	if srv != nil {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(shutdownCtx)
	}
	e.log.Info("daemon exiting; acceleration stays in place", zap.String("pin_dir", e.pinDir))
	return nil
}

// newMetricsServer serves /metrics (read from dp at each scrape) and
// /healthz (200 while the pinned state can be read).
func newMetricsServer(dp *dataplane.Dataplane, cgroup2Mount string) *http.Server {
	source := func() (*stats.Report, error) {
		st, err := dp.Status()
		if err != nil {
			return nil, err
		}
		return stats.FromStatus(st, cgroup2Mount, time.Now()), nil
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(metrics.NewCollector(source))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if _, err := dp.Status(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
}
