package suite

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/bpffs"
	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// Env is what every case runs in: a sockbypass install of its own (pin
// directory under bpffs), a plain cgroup and an enabled one, and the
// topologies. Close removes all of it.
type Env struct {
	// DP is the dataplane of the suite's own pin directory.
	DP *dataplane.Dataplane
	// Plain is the cgroup of plain runs: not enabled.
	Plain *Mode
	// Accel is the cgroup of accelerated runs: enabled.
	Accel *Mode
	// Topologies are the topologies cases run on, by name.
	Topologies map[string]*Topology
	// TempDir holds config files, bodies and logs of the programs.
	TempDir string

	// epoll is e2e/cmd/epollpingpong, built on first use.
	epoll epollBuild

	undo cleanups
}

// NewEnv creates the pin directory, the two cgroups, enables the
// accelerated one, and builds the loopback and veth topologies. On error
// it removes what it created.
func NewEnv() (env *Env, err error) {
	env = &Env{Topologies: map[string]*Topology{}}
	defer func() {
		if err != nil {
			env.Close()
			env = nil
		}
	}()
	tmp, err := os.MkdirTemp("", "sockbypass-e2e-")
	if err != nil {
		return nil, err
	}
	env.TempDir = tmp
	env.undo.push(func() error { return os.RemoveAll(tmp) })
	// nginx workers run as an unprivileged user and read the bodies here.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, err
	}

	if err := bpffs.Ensure(bpffs.DefaultPinDir); err != nil {
		return nil, err
	}
	pinDir := filepath.Join(bpffs.DefaultRoot, fmt.Sprintf("sockbypass-e2e-%d-%x", os.Getpid(), rand.Uint32()))
	env.undo.push(func() error {
		matches, _ := filepath.Glob(pinDir + "-tmp-*")
		for _, m := range matches {
			os.RemoveAll(m)
		}
		return os.RemoveAll(pinDir)
	})
	dp, err := dataplane.OpenOrCreate(dataplane.Options{PinDir: pinDir})
	if err != nil {
		return nil, fmt.Errorf("install sockbypass in %s: %w", pinDir, err)
	}
	env.DP = dp
	env.undo.push(func() error {
		if err := dp.Uninstall(); err != nil {
			return fmt.Errorf("uninstall %s: %w", pinDir, err)
		}
		return nil
	})

	if env.Plain, err = env.newMode("plain", false); err != nil {
		return nil, err
	}
	if env.Accel, err = env.newMode("accel", true); err != nil {
		return nil, err
	}
	if _, err := dp.Enable(env.Accel.Cgroup, dataplane.EnableOptions{NoProbation: true}); err != nil {
		return nil, fmt.Errorf("enable %s: %w", env.Accel.Cgroup.Path, err)
	}

	lo, err := newLoopbackTopology(&env.undo)
	if err != nil {
		return nil, err
	}
	veth, err := newVethTopology(&env.undo)
	if err != nil {
		return nil, err
	}
	env.Topologies[lo.Name] = lo
	env.Topologies[veth.Name] = veth
	// Pod-to-pod pairing needs the addresses of the pod namespaces; none of
	// the enabled cgroup's processes exist yet, so name the namespaces.
	if _, err := dp.RefreshNodeAddrs(veth.Server.Path(), veth.Client.Path()); err != nil {
		return nil, fmt.Errorf("register the veth namespaces' addresses: %w", err)
	}
	// What the accelerated cgroup still sends through the stack, on every
	// device of both topologies (the denominator of the redirected share
	// each case must reach), is counted at its sockets by its
	// cgroup_skb/egress program: no TC program slows the plain runs.
	return env, nil
}

// newMode creates a fresh cgroup v2 directory for one mode and opens it for
// CLONE_INTO_CGROUP.
func (env *Env) newMode(name string, accel bool) (*Mode, error) {
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return nil, err
	}
	if mounts.V2 == "" {
		return nil, cgroup.ErrNoCgroup2
	}
	dir, err := os.MkdirTemp(mounts.V2, "sockbypass-e2e-"+name+"-")
	if err != nil {
		return nil, fmt.Errorf("create cgroup: %w", err)
	}
	env.undo.push(func() error { return removeCgroupDir(dir) })
	cg, err := mounts.Resolve(dir)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	env.undo.push(f.Close)
	return &Mode{Name: name, Accelerated: accel, Cgroup: cg, dir: f}, nil
}

// removeCgroupDir removes a cgroup directory, waiting for its last
// processes to be reaped.
func removeCgroupDir(dir string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(dir)
		if err == nil || os.IsNotExist(err) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", dir, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Close stops everything the suite created and removes every trace:
// topologies, install, cgroups, temporary files.
func (env *Env) Close() error {
	return env.undo.run()
}
