// Package nodeaddrs finds the addresses of the network namespaces that the
// processes of enabled cgroups live in, and which namespace owns each. An
// address owned by exactly one namespace on the node is unique: sockbypass
// may pair its connections across namespaces (pod to pod). An address seen
// in several namespaces (pods on separate networks that reuse addresses) is
// ambiguous and never paired across namespaces. Loopback, link-local and
// multicast addresses are always namespace-local and never collected.
package nodeaddrs

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strconv"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
)

// Owners maps each address to the cookies of the network namespaces that
// have it.
type Owners map[netip.Addr]map[uint64]bool

// Add records that the namespace with cookie has addr, unless addr is
// namespace-local by nature.
func (o Owners) Add(addr netip.Addr, cookie uint64) {
	addr = addr.Unmap()
	if !Collectable(addr) {
		return
	}
	if o[addr] == nil {
		o[addr] = map[uint64]bool{}
	}
	o[addr][cookie] = true
}

// Merge adds the owners of other to o.
func (o Owners) Merge(other Owners) {
	for addr, cookies := range other {
		for c := range cookies {
			if o[addr] == nil {
				o[addr] = map[uint64]bool{}
			}
			o[addr][c] = true
		}
	}
}

// Collectable reports whether addr can identify a namespace on the node:
// not loopback, link-local, multicast or unspecified.
func Collectable(addr netip.Addr) bool {
	return addr.IsValid() && !addr.IsLoopback() && !addr.IsLinkLocalUnicast() &&
		!addr.IsLinkLocalMulticast() && !addr.IsMulticast() && !addr.IsUnspecified()
}

// ErrPermission is returned (joined with the owners found) when a
// namespace could not be entered for lack of privileges (CAP_SYS_ADMIN for
// setns, CAP_SYS_PTRACE and the host PID namespace for /proc/PID/ns/net):
// its addresses are then not paired across namespaces.
var ErrPermission = errors.New("cannot enter the network namespaces of pod processes: needs CAP_SYS_ADMIN, CAP_SYS_PTRACE and the host PID namespace")

// Collect gathers the addresses of the network namespaces of every process
// in cgroups (and the cgroups below them). Processes and namespaces that
// vanish meanwhile are skipped; a namespace that cannot be entered for lack
// of privileges makes Collect return ErrPermission (wrapping the first such
// namespace's path and errno) with what it found.
func Collect(cgroups []cgroup.Cgroup) (Owners, error) {
	owners := Owners{}
	var permErr error
	denied := func(err error) {
		if permErr == nil {
			permErr = fmt.Errorf("%w: %w", ErrPermission, err)
		}
	}
	seen := map[uint64]bool{} // namespace inode
	for _, cg := range cgroups {
		pids, err := cg.Procs()
		if err != nil {
			return nil, fmt.Errorf("list processes of %s: %w", cg.Path, err)
		}
		for _, pid := range pids {
			path := "/proc/" + strconv.Itoa(pid) + "/ns/net"
			var st unix.Stat_t
			if err := unix.Stat(path, &st); err != nil {
				if isPermission(err) {
					denied(&os.PathError{Op: "stat", Path: path, Err: err})
				}
				continue
			}
			if seen[st.Ino] {
				continue
			}
			seen[st.Ino] = true
			if err := collectNetns(path, owners); err != nil {
				if isPermission(err) {
					denied(err)
				}
				continue // or the process exited while we looked
			}
		}
	}
	return owners, permErr
}

func isPermission(err error) bool {
	return errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM)
}

// CollectNetns adds to owners the addresses of the network namespaces at
// paths (bind mounts such as /run/netns/NAME, or /proc/PID/ns/net).
// Namespaces that vanish meanwhile are skipped.
func CollectNetns(owners Owners, paths []string) {
	for _, p := range paths {
		collectNetns(p, owners)
	}
}

// collectNetns adds the addresses of the namespace at path. Its errors
// wrap the errno (EPERM, EACCES, ENOENT), so that callers can tell a
// namespace they may not enter from one that went away.
func collectNetns(path string, owners Owners) error {
	return inNetns(path, func() error {
		cookie, err := NetnsCookie()
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok {
				owners.Add(ip, cookie)
			}
		}
		return nil
	})
}

// inNetns runs fn on a locked OS thread inside the network namespace at
// path, then returns the thread to its namespace. If the thread cannot go
// back, it stays locked so that the runtime ends it with its goroutine.
// (containernetworking's ns package wraps setns errors with %v, losing the
// errno.)
func inNetns(path string, fn func() error) error {
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(target)
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			done <- &os.PathError{Op: "open", Path: "/proc/thread-self/ns/net", Err: err}
			return
		}
		defer unix.Close(self)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- &os.PathError{Op: "setns", Path: path, Err: err}
			return
		}
		ferr := fn()
		if err := unix.Setns(self, unix.CLONE_NEWNET); err != nil {
			done <- errors.Join(ferr, fmt.Errorf("return from network namespace %s: %w", path, err))
			return // the thread stays locked and ends with this goroutine
		}
		runtime.UnlockOSThread()
		done <- ferr
	}()
	return <-done
}

// NetnsCookie returns the cookie of the calling thread's network namespace.
func NetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
}
