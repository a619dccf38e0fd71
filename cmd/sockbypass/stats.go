package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"

	"go.uber.org/zap"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/conns"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/stats"
)

var statsCommand = command{
	summary: "per cgroup: live sockets, bytes redirected vs through the stack, bypass ratio",
	usage:   "stats [--json] [--watch INTERVAL [--count N]]   (INTERVAL >= 100ms, N >= 1)",
	run:     runStats,
}

func runStats(e *env, args []string) error {
	var pinDir, logLevel string
	var asJSON bool
	var watch time.Duration
	var count int
	fs := newFlagSet("stats", e, &pinDir, &logLevel)
	fs.BoolVar(&asJSON, "json", false, "print JSON (one document per line with --watch)")
	fs.DurationVar(&watch, "watch", 0, "print again every INTERVAL, at least 100ms (e.g. 2s), until interrupted (default: print once)")
	fs.IntVar(&count, "count", 0, "with --watch: stop after N reports, N >= 1 (default: until interrupted)")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	if flagSet(fs, "watch") && watch < 100*time.Millisecond {
		return usagef("--watch %v: use an interval of at least 100ms (leave --watch out to print once)", watch)
	}
	if flagSet(fs, "count") && (count < 1 || !flagSet(fs, "watch")) {
		return usagef("--count %d: needs --watch and a number of reports of at least 1 (leave --count out to watch until interrupted)", count)
	}
	dp, err := openDataplane(e, false, 0)
	if errors.Is(err, dataplane.ErrNotInstalled) {
		return fmt.Errorf("%w (pin directory %s)", err, e.pinDir)
	}
	if err != nil {
		return err
	}
	defer dp.Close()
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return err
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(stop)
	// Stack bytes count when their socket closes: the live sockets'
	// are sampled, and the figures never go back from one report to
	// the next.
	var live conns.StackSampler
	for n := 1; ; n++ {
		st, err := dp.Status()
		if err != nil {
			return err
		}
		if err := live.AddLive(dp, mounts, st); err != nil {
			e.log.Warn("cannot sample the live sockets: stack bytes show closed sockets only", zap.Error(err))
		}
		r := stats.FromStatus(st, mounts.V2, time.Now())
		if asJSON {
			enc := json.NewEncoder(e.stdout)
			if watch == 0 {
				enc.SetIndent("", "  ")
			}
			if err := enc.Encode(r); err != nil {
				return err
			}
		} else {
			if watch > 0 {
				fmt.Fprintf(e.stdout, "%s\n", r.Time.Format(time.RFC3339))
			}
			printStats(e.stdout, r)
		}
		if watch == 0 || (count > 0 && n >= count) {
			return nil
		}
		select {
		case <-stop:
			return nil
		case <-time.After(watch):
		}
	}
}

func printStats(w io.Writer, r *stats.Report) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	tc := len(r.TCDevices) > 0
	head := "CGROUP\tMODE\tLIVE\tREDIRECTED\tSTACK (LOCAL PEERS)\tBYPASS\tREDIRECT FAILURES\t"
	if tc {
		head += "TC EGRESS\t"
	}
	fmt.Fprintln(tw, head)
	row := func(name, mode, live string, f stats.Figures, bypass string) {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s / %d msgs\t%s / %d pkts\t%s\t%d\t", name, mode, live,
			stats.HumanBytes(f.RedirectedBytes), f.RedirectedMsgs, stats.HumanBytes(f.StackEgressBytes), f.StackEgressPackets,
			bypass, f.RedirectFailures)
		if tc {
			fmt.Fprintf(tw, "%s / %d pkts\t", stats.HumanBytes(f.TCEgressBytes), f.TCEgressPackets)
		}
		fmt.Fprintln(tw)
	}
	for _, c := range r.Cgroups {
		bypass := ratio(c.BypassRatio)
		if c.Mode == "account-only" {
			// A dry run: what acceleration would take off the stack.
			bypass = fmt.Sprintf("would %s (%s, %d pairs)", ratio(c.WouldBypassRatio), stats.HumanBytes(c.WouldRedirectBytes), c.WouldPairs)
		}
		row(c.Cgroup, c.Mode, fmt.Sprint(c.LiveSockets), c.Figures, bypass)
	}
	for _, c := range r.DisabledCgroups {
		row(c.Cgroup, "disabled, live sockets", fmt.Sprint(c.LiveSockets), c.Figures, ratio(c.BypassRatio))
	}
	row("(no enabled cgroup)", "-", "-", r.Unattributed, "-")
	tw.Flush()
}

func ratio(r *float64) string {
	if r == nil {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", *r*100)
}
