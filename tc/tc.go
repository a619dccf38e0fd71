// Package tc holds the TC egress program that counts, per enabled cgroup,
// the TCP traffic that still crosses the stack, and attaches it to network
// interfaces: with a tcx link where the kernel has them (6.6+), else with a
// clsact qdisc and a direct-action cls_bpf filter.
package tc

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/sockbypass/sockbypass/internal/bpfload"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel tc tc.c -- -I../bpf -I../bpf/include

// ProgramName is the name of the TC program in its collection.
const ProgramName = "sockbypass_tc_egress"

// L2LenConstant is the name of the constant that holds the link-layer
// header length of the interface.
const L2LenConstant = "l2_len"

// LoadSpec returns the collection spec of the TC program and the maps it
// declares.
func LoadSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadTc()
	if err != nil {
		return nil, fmt.Errorf("load tc spec: %w", err)
	}
	return spec, nil
}

// Load loads the TC program for an interface whose packets start with l2Len
// bytes of link-layer header, using maps (by name) instead of creating its
// own. It returns the program, which the caller owns.
func Load(l2Len uint32, maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	spec, err := LoadSpec()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[L2LenConstant].Set(l2Len); err != nil {
		return nil, fmt.Errorf("set %s: %w", L2LenConstant, err)
	}
	var objs tcPrograms
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: bpfload.FitReplacements(spec, maps)}); err != nil {
		return nil, fmt.Errorf("load tc program: %w", err)
	}
	return objs.SockbypassTcEgress, nil
}
