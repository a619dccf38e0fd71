// Package minimal holds the yardsticks of the per-message cost benchmark.
// The minimal redirector is a sock_ops program that inserts every
// established IPv4 socket of one cgroup into a private sockhash, and an
// sk_msg program that redirects each message to the socket with the
// mirrored 4-tuple. It has none of sockbypass's rules (pairing, blocking
// readers, back-pressure, accounting), so it shows the lowest cost a
// sockmap redirect can have on this machine and kernel. The empty hooks
// are programs that return at once on the hooks sockbypass attaches to a
// cgroup: the floor under any design that uses them. Benchmarks only.
package minimal

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel minimal minimal.c -- -I../../bpf/include

// Redirector is the minimal redirector attached to one cgroup. Nothing is
// pinned: Close removes all of it.
type Redirector struct {
	objs     minimalObjects
	cgLink   link.Link
	attached bool
}

// Attach loads the minimal redirector and attaches it to the cgroup v2
// directory cgroupPath. Connections made in that cgroup afterwards are
// redirected.
func Attach(cgroupPath string) (r *Redirector, err error) {
	r = &Redirector{}
	if err := loadMinimalObjects(&r.objs, nil); err != nil {
		return nil, fmt.Errorf("load the minimal redirector: %w", err)
	}
	defer func() {
		if err != nil {
			r.Close()
		}
	}()
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: r.objs.MinimalSockhash.FD(), Program: r.objs.MinimalSkmsg, Attach: ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return nil, fmt.Errorf("attach the minimal sk_msg program: %w", err)
	}
	r.attached = true
	r.cgLink, err = link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: ebpf.AttachCGroupSockOps, Program: r.objs.MinimalSockops})
	if err != nil {
		return nil, fmt.Errorf("attach the minimal sock_ops program to %s: %w", cgroupPath, err)
	}
	return r, nil
}

// Close detaches and frees the redirector. Sockets still in its sockhash
// stay redirected until they close.
func (r *Redirector) Close() error {
	var errs []error
	if r.cgLink != nil {
		errs = append(errs, r.cgLink.Close())
	}
	if r.attached {
		errs = append(errs, link.RawDetachProgram(link.RawDetachProgramOptions{
			Target: r.objs.MinimalSockhash.FD(), Program: r.objs.MinimalSkmsg, Attach: ebpf.AttachSkMsgVerdict,
		}))
	}
	errs = append(errs, r.objs.Close())
	return errors.Join(errs...)
}

// SocketsInserted is the number of sockets in the redirector's sockhash.
func (r *Redirector) SocketsInserted() (int, error) {
	var n int
	var k [16]byte
	var v uint64
	it := r.objs.MinimalSockhash.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// Programs are the redirector's programs by hook, for cost statistics.
func (r *Redirector) Programs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{"minimal sock_ops": r.objs.MinimalSockops, "minimal sk_msg": r.objs.MinimalSkmsg}
}

// EmptyHooks are the empty hooks attached to one cgroup: sock_ops and
// cgroup/sock_release programs that return at once (the hooks sockbypass
// attaches to an accelerated cgroup).
type EmptyHooks struct {
	objs  minimalObjects
	links []link.Link
}

// AttachEmptyHooks loads the empty hooks and attaches them to the cgroup v2
// directory cgroupPath.
func AttachEmptyHooks(cgroupPath string) (h *EmptyHooks, err error) {
	h = &EmptyHooks{}
	if err := loadMinimalObjects(&h.objs, nil); err != nil {
		return nil, fmt.Errorf("load the empty hooks: %w", err)
	}
	defer func() {
		if err != nil {
			h.Close()
		}
	}()
	for _, a := range []struct {
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{h.objs.EmptySockops, ebpf.AttachCGroupSockOps},
		{h.objs.EmptyRelease, ebpf.AttachCgroupInetSockRelease},
	} {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: a.attach, Program: a.prog})
		if err != nil {
			return nil, fmt.Errorf("attach the empty %s program to %s: %w", a.attach, cgroupPath, err)
		}
		h.links = append(h.links, l)
	}
	return h, nil
}

// Close detaches and frees the empty hooks.
func (h *EmptyHooks) Close() error {
	var errs []error
	for _, l := range h.links {
		errs = append(errs, l.Close())
	}
	errs = append(errs, h.objs.Close())
	return errors.Join(errs...)
}

// Programs are the empty hooks' programs by hook, for cost statistics.
func (h *EmptyHooks) Programs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{
		"empty sock_ops":            h.objs.EmptySockops,
		"empty cgroup/sock_release": h.objs.EmptyRelease,
	}
}
