// Package netnsutil makes private network namespaces for the commands and
// tests that need one (doctor, the e2e suite, privileged tests): a named
// namespace under /run/netns with its loopback up, and its removal. It
// keeps test-only packages out of the sockbypass binary.
package netnsutil

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// New creates a network namespace named prefix-PID-RANDOM under /run/netns,
// brings its loopback up, and returns it with the function that closes and
// removes it. The calling goroutine's thread is back in its own namespace
// on return.
func New(prefix string) (ns.NetNS, func() error, error) {
	name := fmt.Sprintf("%s-%d-%x", prefix, os.Getpid(), rand.Uint32())
	if err := create(name); err != nil {
		return nil, nil, fmt.Errorf("create network namespace %s: %w", name, err)
	}
	remove := func() error { return netns.DeleteNamed(name) }
	n, err := ns.GetNS("/run/netns/" + name)
	if err != nil {
		return nil, nil, errors.Join(fmt.Errorf("open network namespace %s: %w", name, err), remove())
	}
	closeAndRemove := func() error { return errors.Join(n.Close(), remove()) }
	if err := n.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	}); err != nil {
		return nil, nil, errors.Join(fmt.Errorf("bring up lo in %s: %w", name, err), closeAndRemove())
	}
	return n, closeAndRemove, nil
}

// create makes the named namespace on a thread of its own, which it puts
// back where it was; a thread that cannot be put back is discarded (its
// goroutine exits locked to it).
func create(name string) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		h, err := netns.NewNamed(name) // also moves this thread into it
		if err == nil {
			h.Close()
		}
		if serr := netns.Set(orig); serr != nil {
			errc <- errors.Join(err, serr)
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}
