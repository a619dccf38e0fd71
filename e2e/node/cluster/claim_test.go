package cluster

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

// TestClaimNameExcludesASecondRun: while one run holds a node name, a
// second waits and gives up when its context ends, naming the lock; once
// the first lets go, the second gets the name and its lock file says
// which process holds it; the last to let go leaves no file behind.
func TestClaimNameExcludesASecondRun(t *testing.T) {
	name := "claim-test-" + strconv.Itoa(os.Getpid())
	first, err := claimName(context.Background(), name, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	path := first.Name()
	defer os.Remove(path)
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	if second, err := claimName(ctx, name, zap.NewNop()); err == nil {
		second.Close()
		t.Fatal("a second run got the node name while the first held it")
	} else if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), first.Name()) {
		t.Fatalf("second run: %v, want the lock named and the deadline", err)
	}
	// The first lets go between the second's open and its flock: the
	// second must not hold a lock on the removed file, next to which a
	// third run would lock a new one.
	beforeFlock = func() {
		beforeFlock = nil
		releaseClaim(first)
	}
	defer func() { beforeFlock = nil }()
	second, err := claimName(context.Background(), name, zap.NewNop())
	if err != nil {
		t.Fatalf("after the first let go: %v", err)
	}
	holder, _ := os.ReadFile(path)
	if got, want := strings.TrimSpace(string(holder)), "pid "+strconv.Itoa(os.Getpid()); got != want {
		t.Errorf("lock file says %q, want %q", got, want)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel2()
	if third, err := claimName(ctx2, name, zap.NewNop()); err == nil {
		third.Close()
		t.Fatal("a third run got the node name while the second held it")
	}
	releaseClaim(second)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("lock file left after the last run let go: %v", err)
	}
}
