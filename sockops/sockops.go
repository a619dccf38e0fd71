// Package sockops holds the sock_ops program that inserts the TCP sockets of
// an enabled cgroup into the sockhash when they reach ESTABLISHED.
//
// One instance of the program is loaded per enabled cgroup, with the
// cgroup's id set as a constant, so every socket records which enabled
// cgroup it belongs to and counters can be kept per cgroup.
package sockops

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/sockbypass/sockbypass/internal/bpfload"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel sockops sockops.c -- -I../bpf -I../bpf/include

// ProgramName is the name of the sock_ops program in its collection.
const ProgramName = "sockbypass_sockops"

// CgroupIDConstant is the name of the constant that holds the enabled
// cgroup's id.
const CgroupIDConstant = "enabled_cgroup_id"

// LoadSpec returns the collection spec of the sock_ops program and the maps
// it declares (sockhash, cgroup_counters, sock_state).
func LoadSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadSockops()
	if err != nil {
		return nil, fmt.Errorf("load sock_ops spec: %w", err)
	}
	return spec, nil
}

// Load loads the sock_ops program for the cgroup with id cgroupID, using
// maps (by name) instead of creating its own. It returns the program, which
// the caller owns.
func Load(cgroupID uint64, maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	spec, err := LoadSpec()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[CgroupIDConstant].Set(cgroupID); err != nil {
		return nil, fmt.Errorf("set %s: %w", CgroupIDConstant, err)
	}
	var objs sockopsPrograms
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: bpfload.FitReplacements(spec, maps)}); err != nil {
		return nil, fmt.Errorf("load sock_ops program: %w", err)
	}
	return objs.SockbypassSockops, nil
}
