package lock

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

func TestExclusiveExcludesShared(t *testing.T) {
	dir := t.TempDir()
	ex, err := Exclusive(dir)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan struct{})
	go func() {
		sh, err := Shared(dir)
		if err != nil {
			t.Error(err)
		}
		close(got)
		sh.Unlock()
	}()
	select {
	case <-got:
		t.Fatal("shared lock granted while an exclusive one is held")
	case <-time.After(100 * time.Millisecond):
	}
	ex.Unlock()
	select {
	case <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("shared lock not granted after the exclusive one was released")
	}
	var nilLock *Dir
	if err := nilLock.Unlock(); err != nil {
		t.Errorf("Unlock on nil: %v", err)
	}
}

func TestLockMissingDirNamesIt(t *testing.T) {
	_, err := Exclusive("/nonexistent/sockbypass")
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/sockbypass") {
		t.Errorf("error %v does not name the directory", err)
	}
}

func TestDaemonClaimIsExclusiveAndReleased(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatalf("needs root to write %s", OwnerDir)
		}
		t.Skipf("needs root to write %s", OwnerDir)
	}
	pinDir := fmt.Sprintf("/sys/fs/bpf/sockbypass-locktest-%d", os.Getpid())
	if _, ok, err := DaemonOwner(pinDir); ok || err != nil {
		t.Fatalf("owner before any claim: %v %v", ok, err)
	}
	o, err := ClaimDaemon(pinDir, "--config /etc/x.yaml")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Release() })
	info, ok, err := DaemonOwner(pinDir)
	if !ok || err != nil || info.Pid != os.Getpid() || info.Config != "--config /etc/x.yaml" {
		t.Fatalf("owner while claimed: %+v %v %v", info, ok, err)
	}
	if _, err := ClaimDaemon(pinDir, "other"); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("pid %d", os.Getpid())) {
		t.Errorf("second claim: %v, want a refusal naming pid %d", err, os.Getpid())
	}
	if err := o.Release(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(DaemonMarker(pinDir)); !os.IsNotExist(err) {
		t.Errorf("marker left after release: %v", err)
	}
	// A marker nobody holds (a daemon killed with SIGKILL) is stale.
	if err := os.WriteFile(DaemonMarker(pinDir), []byte("1\nx\ny\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(DaemonMarker(pinDir))
	if _, ok, _ := DaemonOwner(pinDir); ok {
		t.Errorf("a stale marker counts as a live daemon")
	}
}
