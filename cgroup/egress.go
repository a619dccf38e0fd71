package cgroup

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/sockbypass/sockbypass/internal/bpfload"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel egress egress.c -- -I../bpf -I../bpf/include

// EgressProgram is the name of the cgroup_skb/egress accounting program.
const EgressProgram = "sockbypass_account_egress"

// egressCgroupIDConstant holds the enabled cgroup's id in the program.
const egressCgroupIDConstant = "enabled_cgroup_id"

// LoadEgress loads the cgroup_skb/egress accounting program for the enabled
// cgroup cgroupID, using maps (by name). It counts the TCP bytes the
// cgroup's sockets send through the stack to a local peer, on any device.
// The caller owns the program.
func LoadEgress(cgroupID uint64, maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	spec, err := loadEgress()
	if err != nil {
		return nil, fmt.Errorf("load cgroup egress spec: %w", err)
	}
	if err := spec.Variables[egressCgroupIDConstant].Set(cgroupID); err != nil {
		return nil, fmt.Errorf("set %s: %w", egressCgroupIDConstant, err)
	}
	var objs egressPrograms
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: bpfload.FitReplacements(spec, maps)}); err != nil {
		return nil, fmt.Errorf("load cgroup_skb/egress accounting program: %w", err)
	}
	return objs.SockbypassAccountEgress, nil
}
