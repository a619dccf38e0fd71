package cgroup

import (
	"fmt"

	"github.com/cilium/ebpf"
)

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target bpfel sidecar sidecar.c -- -I../bpf -I../bpf/include

// The sidecar-mode programs, attached per enabled cgroup in sidecar mode:
// cgroup/connect4, connect6 and getsockopt intercept connect() without
// iptables and answer SO_ORIGINAL_DST; cgroup_skb/egress pairs app and
// sidecar sockets under iptables REDIRECT through their SYN after NAT.
const (
	Connect4Program      = "sockbypass_connect4"
	Connect6Program      = "sockbypass_connect6"
	GetsockoptProgram    = "sockbypass_getsockopt"
	SidecarEgressProgram = "sockbypass_mesh_egress"
)

// InterceptQuotaConstant names the constant of the connect programs that
// bounds the cgroup's intercepted handshakes in flight (see orig_dsts in
// bpf/sockbypass.h): the loader sets it.
const InterceptQuotaConstant = "intercept_quota"

// LoadSidecarSpec returns the collection spec of the sidecar-mode programs.
// It fails only when the embedded object cannot be parsed.
func LoadSidecarSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadSidecar()
	if err != nil {
		return nil, fmt.Errorf("load sidecar-mode spec: %w", err)
	}
	return spec, nil
}
