// Package skmsg holds the sk_msg program that redirects each message of a
// socket in the sockhash to its local peer, or lets it pass to the TCP stack.
package skmsg

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/sockbypass/sockbypass/internal/bpfload"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel skmsg skmsg.c -- -I../bpf -I../bpf/include

// ProgramName is the name of the sk_msg program in its collection.
const ProgramName = "sockbypass_skmsg"

// LoadSpec returns the collection spec of the sk_msg program and the maps it
// declares (sockhash, cgroup_counters, sock_state).
func LoadSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadSkmsg()
	if err != nil {
		return nil, fmt.Errorf("load sk_msg spec: %w", err)
	}
	return spec, nil
}

// Load loads the sk_msg program using maps (by name) instead of creating its
// own. It returns the program, which the caller owns.
func Load(maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	spec, err := LoadSpec()
	if err != nil {
		return nil, err
	}
	var objs skmsgPrograms
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: bpfload.FitReplacements(spec, maps)}); err != nil {
		return nil, fmt.Errorf("load sk_msg program: %w", err)
	}
	return objs.SockbypassSkmsg, nil
}
