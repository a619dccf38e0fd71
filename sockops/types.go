package sockops

import (
	"encoding/binary"
	"net/netip"
)

// The structs of bpf/sockbypass.h that user space reads or writes, as
// bpf2go generates them from the compiled object (sockops_bpfel.go): the
// C header is their one definition. internal/dataplane's layout test
// compares each with the BTF of the map it is used with.
type (
	// SockKey is struct sock_key, the sockhash key of a TCP socket:
	// addresses in network byte order (see AddrToC), IPv4 as IPv4-mapped
	// IPv6 with Family AF_INET; ports in host byte order.
	SockKey = sockopsSockKey
	// SockState is struct sock_state, a socket's storage (sock_state map).
	SockState = sockopsSockState
	// CgroupCounters is struct cgroup_counters, what the datapath counts
	// per enabled cgroup and CPU (cgroup_counters map).
	CgroupCounters = sockopsCgroupCounters
	// CgroupConfig is struct cgroup_config, an enabled cgroup's settings
	// (cgroup_config map).
	CgroupConfig = sockopsCgroupConfig
	// Cidr is struct cidr, an excluded destination range of CgroupConfig.
	Cidr = sockopsCidr
	// NodeAddrKey is struct node_addr_key, the key of node_addrs and
	// inbound_pods.
	NodeAddrKey = sockopsNodeAddrKey
	// NodeAddr is struct node_addr, which namespace owns a node address.
	NodeAddr = sockopsNodeAddr
	// EndpointKey is struct endpoint_key: {netns, address, port}, the key
	// of listeners and mesh_endpoints.
	EndpointKey = sockopsEndpointKey
	// Pair is struct pair, a pair handshake's state.
	Pair = sockopsPair
	// FallbackEvent is struct fallback_event, a record of the events ring.
	FallbackEvent = sockopsFallbackEvent
)

// AddrToC returns a as the C structs hold an address: its 16 bytes (IPv4
// as IPv4-mapped IPv6) in network order, in four __u32 words.
func AddrToC(a netip.Addr) [4]uint32 {
	b := a.As16()
	var w [4]uint32
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

// AddrFromC is the inverse of AddrToC; IPv4-mapped addresses come back as
// IPv4.
func AddrFromC(w [4]uint32) netip.Addr {
	var b [16]byte
	for i, v := range w {
		binary.NativeEndian.PutUint32(b[4*i:], v)
	}
	return netip.AddrFrom16(b).Unmap()
}

// Local returns the socket's local address and port.
func (k SockKey) Local() netip.AddrPort {
	return netip.AddrPortFrom(AddrFromC(k.LocalIp), k.LocalPort)
}

// Remote returns the socket's remote address and port.
func (k SockKey) Remote() netip.AddrPort {
	return netip.AddrPortFrom(AddrFromC(k.RemoteIp), k.RemotePort)
}
