package suite

import (
	"context"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Run runs cases one after the other and returns the report. A failing
// case is recorded and the others still run, unless ctx ends.
func (env *Env) Run(ctx context.Context, cases []Case, cfg Config, label string) *Report {
	r := &Report{
		Started: time.Now(), Kernel: kernelRelease(), CPUs: runtime.NumCPU(),
		Runs: cfg.Runs, RunSeconds: cfg.seconds(), Smoke: cfg.Smoke, Label: label,
	}
	used := map[string]bool{}
	for _, c := range cases {
		used[c.Topology] = true
	}
	for _, name := range []string{TopoLoopback, TopoVeth} {
		if t := env.Topologies[name]; t != nil && used[name] {
			r.Topologies = append(r.Topologies, TopologyInfo{Name: t.Name, Description: t.Description, CrossNetns: t.CrossNetns})
		}
	}
	for _, c := range cases {
		if ctx.Err() != nil {
			r.Failures = append(r.Failures, c.Name+": not run: "+ctx.Err().Error())
			continue
		}
		res, err := env.RunCase(ctx, c, cfg)
		if err != nil {
			r.Failures = append(r.Failures, err.Error())
		}
		r.Cases = append(r.Cases, res)
	}
	r.ElapsedSeconds = time.Since(r.Started).Seconds()
	return r
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return strings.TrimRight(string(u.Release[:]), "\x00")
}
