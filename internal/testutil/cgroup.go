package testutil

import (
	"os"
	"sync"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
)

// cgroupMoveMu serialises moving this process between cgroups.
var cgroupMoveMu sync.Mutex

// NewCgroup creates a fresh cgroup v2 directory for tb and removes it when
// tb ends.
func NewCgroup(tb testing.TB) cgroup.Cgroup {
	tb.Helper()
	RequirePrivileged(tb)
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		tb.Fatal(err)
	}
	if mounts.V2 == "" {
		tb.Fatal(cgroup.ErrNoCgroup2)
	}
	dir, err := os.MkdirTemp(mounts.V2, "sockbypass-test-")
	if err != nil {
		tb.Fatalf("create test cgroup: %v", err)
	}
	tb.Cleanup(func() { removeCgroup(tb, dir) })
	cg, err := mounts.Resolve(dir)
	if err != nil {
		tb.Fatal(err)
	}
	return cg
}

func removeCgroup(tb testing.TB, dir string) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(dir)
		if err == nil || os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			tb.Errorf("remove test cgroup %s: %v", dir, err)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// InCgroup runs fn with this process moved into cg, then moves it back
// (see cgroup.Cgroup.RunIn). Calls are serialised.
func InCgroup(tb testing.TB, cg cgroup.Cgroup, fn func()) {
	tb.Helper()
	cgroupMoveMu.Lock()
	defer cgroupMoveMu.Unlock()
	if err := cg.RunIn(fn); err != nil {
		tb.Fatal(err)
	}
}
