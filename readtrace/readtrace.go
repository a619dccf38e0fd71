// Package fallback holds the programs that decide, before a byte could be
// delivered differently, which sockets may receive redirected bytes: a
// cgroup/setsockopt program (one per enabled cgroup) that sees SO_RCVLOWAT,
// TCP_INQ and SO_OOBINLINE, and a tp_btf/sock_recv_length program (one per
// install) that publishes a socket as a redirect target once it has been
// seen reading with recvmsg, or marks it a stack reader when it reads with
// MSG_WAITALL or MSG_OOB.
package fallback

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/sockbypass/sockbypass/internal/bpfload"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel fallback fallback.c -- -I../../bpf -I../../bpf/include

// Program names in the collection.
const (
	SetsockoptProgram = "sockbypass_setsockopt"
	RecvProgram       = "sockbypass_recv_length"
)

// CgroupIDConstant is the name of the constant that holds the enabled
// cgroup's id in the setsockopt program.
const CgroupIDConstant = "enabled_cgroup_id"

// LoadSpec returns the collection spec of the fallback programs.
func LoadSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadFallback()
	if err != nil {
		return nil, fmt.Errorf("load fallback spec: %w", err)
	}
	return spec, nil
}

// LoadSetsockopt loads the cgroup/setsockopt program for the enabled cgroup
// cgroupID, using maps (by name). The caller owns the program.
func LoadSetsockopt(cgroupID uint64, maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	spec, err := LoadSpec()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[CgroupIDConstant].Set(cgroupID); err != nil {
		return nil, fmt.Errorf("set %s: %w", CgroupIDConstant, err)
	}
	delete(spec.Programs, RecvProgram)
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: bpfload.FitReplacements(spec, maps)})
	if err != nil {
		return nil, fmt.Errorf("load cgroup/setsockopt program: %w", err)
	}
	defer coll.Close()
	return coll.DetachProgram(SetsockoptProgram), nil
}

// LoadRecv loads the tp_btf/sock_recv_length program, using maps (by
// name). The caller owns the program.
func LoadRecv(maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	spec, err := LoadSpec()
	if err != nil {
		return nil, err
	}
	delete(spec.Programs, SetsockoptProgram)
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: bpfload.FitReplacements(spec, maps)})
	if err != nil {
		return nil, fmt.Errorf("load tp_btf/sock_recv_length program: %w", err)
	}
	defer coll.Close()
	return coll.DetachProgram(RecvProgram), nil
}
