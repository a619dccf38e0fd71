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
// which process holds it.
func TestClaimNameExcludesASecondRun(t *testing.T) {
	name := "claim-test-" + strconv.Itoa(os.Getpid())
	first, err := claimName(context.Background(), name, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(first.Name())
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	if second, err := claimName(ctx, name, zap.NewNop()); err == nil {
		second.Close()
		t.Fatal("a second run got the node name while the first held it")
	} else if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), first.Name()) {
		t.Fatalf("second run: %v, want the lock named and the deadline", err)
	}
	first.Close()
	second, err := claimName(context.Background(), name, zap.NewNop())
	if err != nil {
		t.Fatalf("after the first let go: %v", err)
	}
	defer second.Close()
	holder, _ := os.ReadFile(second.Name())
	if got, want := strings.TrimSpace(string(holder)), "pid "+strconv.Itoa(os.Getpid()); got != want {
		t.Errorf("lock file says %q, want %q", got, want)
	}
}
