// Package skmsg holds the sk_msg program that redirects each message of a
// socket in the sockhash to its local peer, or lets it pass to the TCP
// stack. Loading and attaching are internal/dataplane's.
package skmsg

import (
	"fmt"

	"github.com/cilium/ebpf"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel skmsg skmsg.c -- -I../bpf -I../bpf/include

// ProgramName is the name of the sk_msg program in its collection.
const ProgramName = "sockbypass_skmsg"

// LoadSpec returns the collection spec of the sk_msg program and the maps it
// declares (every shared map). It fails only when the embedded object
// cannot be parsed.
func LoadSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadSkmsg()
	if err != nil {
		return nil, fmt.Errorf("load sk_msg spec: %w", err)
	}
	return spec, nil
}
