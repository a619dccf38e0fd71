// Package sockops holds the sock_ops program that inserts the TCP sockets of
// an enabled cgroup into the sockhash when they reach ESTABLISHED, and the
// Go side of the structs every program shares (bpf/sockbypass.h), which
// bpf2go generates from the object's BTF (types.go names them).
//
// One instance of the program is loaded per enabled cgroup, with the
// cgroup's id set as a constant, so every socket records which enabled
// cgroup it belongs to and counters can be kept per cgroup. Loading and
// attaching are internal/dataplane's.
package sockops

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// bpf2go writes the Go side of every map's key and value struct
// (cgroup_counters, cgroup_config, sock_state, ...: -type cannot name
// these, a map has the same name) and of those named with -type.
//
//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel -type sock_key -type cidr -type node_addr_key -type node_addr -type endpoint_key -type pair -type fallback_event sockops sockops.c -- -I../bpf -I../bpf/include

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel stackread stackread.c -- -I../bpf -I../bpf/include

// ProgramName is the name of the sock_ops program in its collection.
const ProgramName = "sockbypass_sockops"

// StackReadProgramName is the name of the stack-read tracer (stackread.c),
// one for the node, on the tcp_rcv_space_adjust tracepoint: it ends
// listeners' probation and learns the processes that splice (see
// "Probation" in bpf/sockbypass.h).
const StackReadProgramName = "sockbypass_stack_read"

// CgroupIDConstant and CgroupSlotConstant are the names of the constants
// that hold the enabled cgroup's id and its slot (the index of its counters
// and settings, see "Slots" in bpf/sockbypass.h), in every per-cgroup
// program (sock_ops and the cgroup package's).
const (
	CgroupIDConstant   = "enabled_cgroup_id"
	CgroupSlotConstant = "cgroup_slot"
)

// LoadSpec returns the collection spec of the sock_ops program and the
// maps it declares (every shared map of bpf/sockbypass.h). It fails only
// when the embedded object cannot be parsed.
func LoadSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadSockops()
	if err != nil {
		return nil, fmt.Errorf("load sock_ops spec: %w", err)
	}
	return spec, nil
}

// LoadStackReadSpec returns the collection spec of the stack-read tracer,
// which uses the shared maps of bpf/sockbypass.h (replace them with the
// pinned ones when loading).
func LoadStackReadSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadStackread()
	if err != nil {
		return nil, fmt.Errorf("load stack-read tracer spec: %w", err)
	}
	return spec, nil
}
