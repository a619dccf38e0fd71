// Package bpfstats reads what each BPF program costs while a benchmark
// runs: the kernel's run count and run time per program (BPF statistics,
// kernel.bpf_stats_enabled), for the per-hook cost table of the cost
// benchmarks. Statistics are collected only between Enable and its Close.
package bpfstats

import (
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
	"sort"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Enable starts collecting run time statistics for every BPF program of the
// node until the returned Closer is closed.
func Enable() (io.Closer, error) {
	c, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
	if err != nil {
		return nil, fmt.Errorf("enable BPF run time statistics: %w", err)
	}
	return c, nil
}

// Cost is the accumulated cost of one program.
type Cost struct {
	// Program is the program's name, prefixed with its hook when known.
	Program string
	Runs    uint64
	Runtime time.Duration
}

// PerRun is the mean run time of one run (0 without runs).
func (c Cost) PerRun() time.Duration {
	if c.Runs == 0 {
		return 0
	}
	return c.Runtime / time.Duration(c.Runs)
}

// Snapshot is the costs of programs so far, by program id.
type Snapshot map[ebpf.ProgramID]Cost

// Take reads the costs of the programs run by every link pinned under
// pinDir (recursively), plus the programs in extra (by name).
func Take(pinDir string, extra map[string]*ebpf.Program) (Snapshot, error) {
	s := Snapshot{}
	if pinDir != "" {
		err := filepath.WalkDir(pinDir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			l, err := link.LoadPinnedLink(path, nil)
			if err != nil {
				return nil // a map or a program pin
			}
			defer l.Close()
			info, err := l.Info()
			if err != nil {
				return fmt.Errorf("link %s: %w", path, err)
			}
			prog, err := ebpf.NewProgramFromID(info.Program)
			if err != nil {
				return fmt.Errorf("program of link %s: %w", path, err)
			}
			defer prog.Close()
			return s.add(info.Program, "", prog)
		})
		if err != nil {
			return nil, err
		}
	}
	for name, prog := range extra {
		pi, err := prog.Info()
		if err != nil {
			return nil, err
		}
		id, _ := pi.ID()
		if err := s.add(id, name, prog); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func (s Snapshot) add(id ebpf.ProgramID, name string, prog *ebpf.Program) error {
	if _, ok := s[id]; ok {
		return nil
	}
	st, err := prog.Stats()
	if err != nil {
		return fmt.Errorf("program %d: %w", id, err)
	}
	if name == "" {
		pi, err := prog.Info()
		if err != nil {
			return fmt.Errorf("program %d: %w", id, err)
		}
		name = fmt.Sprintf("%s %s", pi.Type, pi.Name)
	}
	s[id] = Cost{Program: name, Runs: st.RunCount, Runtime: st.Runtime}
	return nil
}

// Since is what each program of s cost after before was taken, by name;
// programs that did not run are left out.
func (s Snapshot) Since(before Snapshot) []Cost {
	var out []Cost
	for id, c := range s {
		b := before[id]
		d := Cost{Program: c.Program, Runs: c.Runs - b.Runs, Runtime: c.Runtime - b.Runtime}
		if d.Runs > 0 {
			out = append(out, d)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Program < out[j].Program })
	return out
}

// Print writes costs as a markdown table.
func Print(w io.Writer, costs []Cost) {
	fmt.Fprintln(w, "| program | runs | ns per run | total ms |")
	fmt.Fprintln(w, "|---|---:|---:|---:|")
	for _, c := range costs {
		fmt.Fprintf(w, "| %s | %d | %d | %.1f |\n", c.Program, c.Runs, c.PerRun().Nanoseconds(), float64(c.Runtime)/float64(time.Millisecond))
	}
}
