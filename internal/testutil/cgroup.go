package testutil

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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

// currentCgroup returns the absolute cgroup v2 directory of this process.
func currentCgroup() (string, error) {
	mounts, err := cgroup.ReadMounts()
	if err != nil {
		return "", err
	}
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rel, ok := strings.CutPrefix(sc.Text(), "0::"); ok {
			return filepath.Join(mounts.V2, rel), nil
		}
	}
	return "", fmt.Errorf("this process has no cgroup v2 membership")
}

func moveSelf(dir string) error {
	return os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
}

// InCgroup runs fn with this process moved into cg, then moves it back.
// Sockets created by fn belong to cg for their whole life (and so do the
// sockets that listeners created in fn accept), which lets one test process
// own sockets in several cgroups.
func InCgroup(tb testing.TB, cg cgroup.Cgroup, fn func()) {
	tb.Helper()
	cgroupMoveMu.Lock()
	defer cgroupMoveMu.Unlock()
	orig, err := currentCgroup()
	if err != nil {
		tb.Fatal(err)
	}
	if err := moveSelf(cg.Path); err != nil {
		tb.Fatalf("move test process into %s: %v", cg.Path, err)
	}
	defer func() {
		if err := moveSelf(orig); err != nil {
			tb.Errorf("move test process back to %s: %v", orig, err)
		}
	}()
	fn()
}
