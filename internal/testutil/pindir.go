package testutil

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/sockbypass/sockbypass/internal/bpffs"
)

// NewPinDir returns a pin directory path of its own for tb, under bpffs (not
// yet created), and removes whatever is pinned below it when tb ends.
func NewPinDir(tb testing.TB) string {
	tb.Helper()
	RequirePrivileged(tb)
	if err := bpffs.Ensure(bpffs.DefaultPinDir); err != nil {
		tb.Fatal(err)
	}
	dir := filepath.Join(bpffs.DefaultRoot, fmt.Sprintf("sockbypass-test-%d-%x", os.Getpid(), rand.Uint32()))
	tb.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			tb.Errorf("remove pins in %s: %v", dir, err)
		}
		// Temporary directories of an interrupted creation (bpffs refuses dots in names).
		matches, _ := filepath.Glob(dir + "-tmp-*")
		for _, m := range matches {
			os.RemoveAll(m)
		}
	})
	return dir
}
