package testutil

import (
	"runtime"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/sockbypass/sockbypass/internal/netnsutil"
)

// NewNetNS creates a network namespace with its loopback up, and deletes it
// when tb ends.
func NewNetNS(tb testing.TB) ns.NetNS {
	tb.Helper()
	RequirePrivileged(tb)
	netns, remove, err := netnsutil.New("sockbypass-test")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := remove(); err != nil {
			tb.Errorf("remove network namespace %s: %v", netns.Path(), err)
		}
	})
	return netns
}

// InNetNS runs fn on a locked OS thread inside netns. Sockets that fn
// creates belong to netns; the goroutines fn starts do not run in it.
func InNetNS(tb testing.TB, netns ns.NetNS, fn func()) {
	tb.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	err := netns.Do(func(ns.NetNS) error {
		fn()
		return nil
	})
	if err != nil {
		tb.Fatalf("enter %s: %v", netns.Path(), err)
	}
}
