package lock

import (
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
