package cgroup

import (
	"fmt"

	"github.com/cilium/ebpf"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel release release.c -- -I../bpf -I../bpf/include

// ReleaseProgram is the name of the cgroup/sock_release accounting
// program: when a TCP socket of an accelerated cgroup closes, it counts
// the payload the socket sent through the stack to a local peer, from the
// socket's own counters (one run per socket, where the cgroup_skb/egress
// program runs once per packet).
const ReleaseProgram = "sockbypass_account_release"

// LoadReleaseSpec returns the collection spec of the release accounting
// program. It fails only when the embedded object cannot be parsed.
func LoadReleaseSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadRelease()
	if err != nil {
		return nil, fmt.Errorf("load cgroup/sock_release accounting spec: %w", err)
	}
	return spec, nil
}
