// Package readtrace holds the tp_btf/sock_recv_length program (one per
// install) that follows what the members of the sockhash read: it
// publishes a socket as a redirect target once it has been seen reading
// with recvmsg (its copied_seq and the redirected bytes it has read, for
// the sender's ordering and back-pressure), and marks it a stack reader
// when it reads with MSG_WAITALL or MSG_OOB. Loading and attaching are
// internal/dataplane's.
package readtrace

import (
	"fmt"

	"github.com/cilium/ebpf"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel readtrace readtrace.c -- -I../bpf -I../bpf/include

// ProgramName is the name of the tracing program in its collection.
const ProgramName = "sockbypass_recv_length"

// LoadSpec returns the collection spec of the read tracer. It fails only
// when the embedded object cannot be parsed.
func LoadSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadReadtrace()
	if err != nil {
		return nil, fmt.Errorf("load tp_btf/sock_recv_length spec: %w", err)
	}
	return spec, nil
}
