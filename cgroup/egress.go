package cgroup

import (
	"fmt"

	"github.com/cilium/ebpf"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel egress egress.c -- -I../bpf -I../bpf/include

// EgressProgram is the name of the cgroup_skb/egress accounting program:
// it counts the TCP bytes an enabled cgroup's sockets send through the
// stack to a local peer, on any device.
const EgressProgram = "sockbypass_account_egress"

// LoadEgressSpec returns the collection spec of the accounting program. It
// fails only when the embedded object cannot be parsed.
func LoadEgressSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadEgress()
	if err != nil {
		return nil, fmt.Errorf("load cgroup_skb/egress accounting spec: %w", err)
	}
	return spec, nil
}
