package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"gopkg.in/yaml.v3"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/config"
	"github.com/sockbypass/sockbypass/internal/conns"
	"github.com/sockbypass/sockbypass/internal/daemon"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/lock"
	"github.com/sockbypass/sockbypass/internal/metrics"
	"github.com/sockbypass/sockbypass/internal/privilege"
	"github.com/sockbypass/sockbypass/internal/stats"
)

var daemonCommand = command{
	summary: "run in the foreground: keep the configured cgroups enabled, serve metrics",
	usage:   "daemon --config FILE [--cleanup-on-exit] | daemon [--cgroup PATH ...] [--tc-dev DEV ...] [--no-probation] [--metrics-addr HOST:PORT]",
	run:     runDaemon,
}

func runDaemon(e *env, args []string) error {
	var pinDir, logLevel, configPath, metricsAddr string
	var cgroups, tcDevs stringList
	var cleanupOnExit bool
	fs := newFlagSet("daemon", e, &pinDir, &logLevel)
	fs.StringVar(&configPath, "config", "", "YAML configuration (see README); reloaded when it changes, and on SIGHUP")
	fs.BoolVar(&cleanupOnExit, "cleanup-on-exit", false, "uninstall everything on SIGTERM/SIGINT (default: leave acceleration in place)")
	fs.Var(&cgroups, "cgroup", "without --config: cgroup path or glob to keep enabled (repeatable); like cgroups in a config file, the daemon then owns the pin directory: it disables every enabled cgroup that no --cgroup names")
	fs.Var(&tcDevs, "tc-dev", "without --config: interface whose egress TC also accounts (repeatable; none by default)")
	var noProbation bool
	fs.BoolVar(&noProbation, "no-probation", false, "without --config: pair a new listener's first connections too (as enable --no-probation)")
	fs.StringVar(&metricsAddr, "metrics-addr", config.DefaultMetricsAddr, "without --config: address of /metrics and /healthz; empty disables")
	// The daemon logs at info unless told otherwise (--log-level, or
	// logLevel in the file): what it changes is its output.
	lf := fs.Lookup("log-level")
	lf.Usage, lf.DefValue = "log level: debug, info, warn or error; without it, logLevel of --config", "info"
	logLevel = "info"
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	// Flags that cannot be parsed are a bad command line (exit 2); what
	// the configuration checks against the system exits 1.
	if err := checkCgroupArgs(cgroups); err != nil {
		return err
	}
	for _, d := range tcDevs {
		if _, err := dataplane.ParseTCDevice(d); err != nil {
			return usagef("--tc-dev: %v", err)
		}
	}
	load := func() (*config.Config, error) { return config.Load(configPath) }
	if configPath == "" {
		if len(tcDevs) > 0 || len(cgroups) > 0 || metricsAddr != config.DefaultMetricsAddr || noProbation {
			data, err := flagsConfig(cgroups, tcDevs, metricsAddr, noProbation)
			if err != nil {
				return err
			}
			load = func() (*config.Config, error) {
				cfg, err := config.Parse(data)
				if err != nil {
					// No file was involved: name the flag, not a line.
					key := ""
					msg := flagConfigError.ReplaceAllStringFunc(err.Error(), func(m string) string {
						key = flagConfigError.FindStringSubmatch(m)[1]
						return configFlags[key]
					})
					if key == "metricsAddr" { // not HOST:PORT: a bad command line
						return nil, usageError{msg}
					}
					return nil, errors.New(msg)
				}
				return cfg, nil
			}
		} else {
			load = func() (*config.Config, error) { return config.Parse([]byte("cgroups: []\n")) }
		}
	} else if len(cgroups) > 0 || len(tcDevs) > 0 || noProbation {
		return usagef("--config and --cgroup/--tc-dev/--no-probation contradict each other: put the cgroups and settings in the file")
	} else if flagSet(fs, "metrics-addr") {
		return usagef("--config and --metrics-addr contradict each other: set metricsAddr in the file")
	}
	cfg, err := load()
	if err != nil {
		return err
	}
	if !flagSet(fs, "log-level") { // the file decides (default info)
		e.log = newLogger(e.stderr, cfg.Level())
	}

	if err := privilege.Check(); err != nil {
		return err
	}
	if err := privilege.CheckKernel(); err != nil {
		return err
	}
	// Everything that can fail on its own goes before the pinned state is
	// touched (adoption replaces every program).
	var metricsLn net.Listener
	if addr := cfg.Metrics(); addr != "" {
		if metricsLn, err = net.Listen("tcp", addr); err != nil {
			return fmt.Errorf("metrics address %s: %w", addr, err)
		}
		defer metricsLn.Close()
	}
	// A daemon with a selection owns the pin directory: it disables what
	// its selection does not name, so the CLI's enable refuses to race it
	// (see lock.DaemonOwner). The marker goes when the daemon exits.
	if configPath != "" || len(cgroups) > 0 {
		what := "--config " + configPath
		if configPath == "" {
			what = "--cgroup " + strings.Join(cgroups, " --cgroup ")
		}
		owner, err := lock.ClaimDaemon(e.pinDir, what)
		if err != nil {
			return err
		}
		defer owner.Release()
	}
	opts := dataplane.Options{PinDir: e.pinDir, Logger: e.log, SockhashMaxEntries: cfg.SockhashSize.Value}
	dp, err := dataplane.Open(opts)
	adopted := err == nil
	if errors.Is(err, dataplane.ErrNotInstalled) {
		dp, err = dataplane.OpenOrCreate(opts)
	}
	if err != nil {
		return err
	}
	defer dp.Close()
	if adopted {
		// A restart, or a newer binary over running state: take over the
		// pins and run this binary's programs, replaced in place.
		rep, err := dp.Upgrade()
		if err != nil {
			return fmt.Errorf("adopt pinned state in %s: %w", e.pinDir, err)
		}
		e.log.Info("adopted pinned state", zap.String("pin_dir", e.pinDir), zap.Int("cgroups", rep.Cgroups), zap.Int("tc_devices", rep.TCDevices))
		if want := cfg.SockhashSize.Value; cfg.SockhashSize.Line != 0 {
			if capacity, err := dp.SockhashCapacity(); err == nil && capacity != want {
				e.log.Warn("sockhashSize ignored: the pinned sockhash keeps the capacity it was created with; to resize it, stop the daemon, run sockbypass uninstall and start it again",
					zap.Uint32("sockhash_size", want), zap.Uint32("capacity", capacity), zap.String("pin_dir", e.pinDir))
			}
		}
	}
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reload := make(chan struct{}, 1)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				select {
				case reload <- struct{}{}:
				default:
				}
			}
		}
	}()

	// The daemon's readiness and failure counters are served beside the
	// datapath's metrics; without a configuration (metrics only) Ready is
	// whether the pins can be read.
	var dmn *daemon.Daemon
	if configPath != "" || len(cgroups) > 0 {
		dmn = daemon.New(dp, cfg, e.log)
		if err := attachKubernetes(ctx, e, dmn, cfg); err != nil {
			return err
		}
	}
	if configPath != "" {
		// A ConfigMap update reaches the file (the kubelet swaps the
		// volume's ..data symlink) but sends no signal: reload on change.
		go daemon.WatchFile(ctx, configPath, time.Second, reload)
	}

	var srv *http.Server
	if ln := metricsLn; ln != nil {
		srv = newMetricsServer(dp, mounts.V2, dmn, e.log)
		go func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				e.log.Error("metrics server", zap.Error(err))
				stop()
			}
		}()
		fmt.Fprintf(e.stdout, "sockbypass daemon: serving metrics on http://%s/metrics (pin directory %s)\n", ln.Addr(), e.pinDir)
	}

	if dmn == nil {
		// Metrics only (neither --config nor --cgroup): leave the cgroups
		// enabled by hand alone.
		<-ctx.Done()
	} else {
		dmn.Run(ctx, reload, load)
	}

	if srv != nil {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(shutdownCtx)
	}
	if cleanupOnExit {
		e.log.Info("--cleanup-on-exit: uninstalling; live connections keep their acceleration until they close")
		return dp.Uninstall()
	}
	e.log.Info("daemon exiting; acceleration stays in place", zap.String("pin_dir", e.pinDir))
	return nil
}

// flagConfigError matches what config.Parse says about a key the daemon's
// flags set; configFlags names the flag.
var (
	flagConfigError = regexp.MustCompile(`line \d+: (cgroups|tcDevices|metricsAddr)`)
	configFlags     = map[string]string{"cgroups": "--cgroup", "tcDevices": "--tc-dev", "metricsAddr": "--metrics-addr"}
)

// flagsConfig writes the daemon flags as a configuration file.
func flagsConfig(cgroups, tcDevs []string, metricsAddr string, noProbation bool) ([]byte, error) {
	doc := map[string]any{"cgroups": cgroups, "metricsAddr": metricsAddr}
	if noProbation {
		doc["noProbation"] = true
	}
	if cgroups == nil {
		doc["cgroups"] = []string{}
	}
	if len(tcDevs) > 0 {
		doc["tcDevices"] = tcDevs
	}
	return yaml.Marshal(doc)
}

// newMetricsServer serves /metrics (read from dp at each scrape, and the
// daemon's own counters), /healthz (liveness: 200 while the pinned state
// can be read) and /readyz (200 only while the daemon's current selection
// is applied; see daemon.Ready).
func newMetricsServer(dp *dataplane.Dataplane, cgroup2Mount string, dmn *daemon.Daemon, log *zap.Logger) *http.Server {
	// Stack bytes count when their socket closes: each scrape samples
	// the live sockets', and the counters never go backwards.
	var live conns.StackSampler
	source := func() (*stats.Report, error) {
		st, err := dp.Status()
		if err != nil {
			return nil, err
		}
		if err := live.AddLive(dp, cgroup.Mounts{V2: cgroup2Mount}, st); err != nil {
			log.Warn("cannot sample the live sockets: stack bytes show closed sockets only (and never go back)", zap.Error(err))
		}
		return stats.FromStatus(st, cgroup2Mount, time.Now()), nil
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(metrics.NewCollector(source))
	if dmn != nil {
		reg.MustRegister(dmn.Collectors()...)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		_, err := dp.Status()
		if err == nil && dmn != nil {
			err = dmn.Ready()
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
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
