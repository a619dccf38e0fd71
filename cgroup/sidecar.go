// Package mesh holds the sidecar-mode programs: cgroup/connect4, connect6 and
// cgroup/getsockopt for intercepting connect() without iptables, and
// cgroup_skb/egress for pairing app and sidecar sockets under iptables
// REDIRECT. One instance of each is attached per enabled cgroup in sidecar
// mode.
package mesh

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/sockbypass/sockbypass/internal/bpfload"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel mesh mesh.c -- -I../../bpf -I../../bpf/include

// Program names, with the attach type each needs.
const (
	Connect4Program   = "sockbypass_connect4"
	Connect6Program   = "sockbypass_connect6"
	GetsockoptProgram = "sockbypass_getsockopt"
	EgressProgram     = "sockbypass_mesh_egress"
)

// Programs lists the programs with their cgroup attach types.
var Programs = []struct {
	Name   string
	Attach ebpf.AttachType
	// Suffix names the link pin next to the cgroup's sock_ops link.
	Suffix string
}{
	{Connect4Program, ebpf.AttachCGroupInet4Connect, "connect4"},
	{Connect6Program, ebpf.AttachCGroupInet6Connect, "connect6"},
	{GetsockoptProgram, ebpf.AttachCGroupGetsockopt, "getsockopt"},
	{EgressProgram, ebpf.AttachCGroupInetEgress, "egress"},
}

// Load loads the program name for the enabled cgroup cgroupID, using maps
// (by name). The caller owns the program.
func Load(name string, cgroupID uint64, maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	spec, err := loadMesh()
	if err != nil {
		return nil, fmt.Errorf("load mesh spec: %w", err)
	}
	if err := spec.Variables["enabled_cgroup_id"].Set(cgroupID); err != nil {
		return nil, err
	}
	for n := range spec.Programs {
		if n != name {
			delete(spec.Programs, n)
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: bpfload.FitReplacements(spec, maps)})
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", name, err)
	}
	defer coll.Close()
	return coll.DetachProgram(name), nil
}
