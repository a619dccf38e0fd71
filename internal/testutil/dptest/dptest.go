// Package dptest installs a dataplane of a test's own, for the tests of the
// packages that drive internal/dataplane (the daemon, the Kubernetes
// source, the e2e suite). It is apart from internal/testutil because
// internal/dataplane's own tests use testutil and cannot import a package
// that imports internal/dataplane.
package dptest

import (
	"testing"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// Install creates a pinned dataplane in a pin directory of tb's own (see
// testutil.NewPinDir; it skips or fails tb without privileges) and, when tb
// ends, uninstalls whatever is still pinned there and closes it. It fails
// tb when the dataplane cannot be created.
func Install(tb testing.TB) *dataplane.Dataplane {
	tb.Helper()
	pinDir := testutil.NewPinDir(tb)
	dp, err := dataplane.OpenOrCreate(dataplane.Options{PinDir: pinDir})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if d, err := dataplane.Open(dataplane.Options{PinDir: pinDir}); err == nil {
			if err := d.Uninstall(); err != nil {
				tb.Errorf("uninstall: %v", err)
			}
		}
		dp.Close()
	})
	return dp
}
