package cgroup

import (
	"fmt"

	"github.com/cilium/ebpf"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel setsockopt setsockopt.c -- -I../bpf -I../bpf/include

// SetsockoptProgram is the name of the cgroup/setsockopt program: it sees
// SO_RCVLOWAT, TCP_INQ and SO_OOBINLINE, which keep a connection plain TCP
// when set before it joins a pair.
const SetsockoptProgram = "sockbypass_setsockopt"

// LoadSetsockoptSpec returns the collection spec of the setsockopt program.
// It fails only when the embedded object cannot be parsed.
func LoadSetsockoptSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadSetsockopt()
	if err != nil {
		return nil, fmt.Errorf("load cgroup/setsockopt spec: %w", err)
	}
	return spec, nil
}
