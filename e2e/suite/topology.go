package suite

import (
	"fmt"
	"net"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/sockbypass/sockbypass/internal/netnsutil"
)

// Topology names.
const (
	TopoLoopback = "loopback"
	TopoVeth     = "veth"
)

// Topology is where the two ends of a workload run: the network namespace
// of the servers, that of the clients, and the address clients connect to.
type Topology struct {
	// Name is TopoLoopback or TopoVeth.
	Name string
	// Server and Client are the network namespaces of each end (the same
	// one over loopback).
	Server, Client ns.NetNS
	// ServerIP is the address servers listen on and clients dial.
	ServerIP string
	// CrossNetns is true when the two ends are in different namespaces:
	// sockbypass pairs them only through addresses it knows are unique on
	// the node (pod to pod), so the suite registers the namespaces.
	CrossNetns bool
	// Description says what the topology models.
	Description string
}

// newNetNS creates a network namespace with lo up; undo deletes it.
func newNetNS(undo *cleanups) (ns.NetNS, error) {
	netns, remove, err := netnsutil.New("sockbypass-e2e")
	if err != nil {
		return nil, err
	}
	undo.push(remove)
	return netns, nil
}

// newLoopbackTopology is the sidecar case: both ends in one network
// namespace (one pod), over 127.0.0.1.
func newLoopbackTopology(undo *cleanups) (*Topology, error) {
	netns, err := newNetNS(undo)
	if err != nil {
		return nil, err
	}
	return &Topology{
		Name: TopoLoopback, Server: netns, Client: netns, ServerIP: "127.0.0.1",
		Description: "one network namespace, 127.0.0.1 (app and sidecar in one pod)",
	}, nil
}

// Addresses of the veth topology.
const (
	vethClientName = "sbe2e-c"
	vethServerName = "sbe2e-s"
	vethClientCIDR = "10.199.0.1/24"
	vethServerCIDR = "10.199.0.2/24"
)

// newVethTopology is two pods on one node: a client namespace and a server
// namespace joined by a veth pair.
func newVethTopology(undo *cleanups) (*Topology, error) {
	client, err := newNetNS(undo)
	if err != nil {
		return nil, err
	}
	server, err := newNetNS(undo)
	if err != nil {
		return nil, err
	}
	err = client.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: vethClientName},
			PeerName:      vethServerName,
			PeerNamespace: netlink.NsFd(int(server.Fd())),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth pair: %w", err)
		}
		return configureLink(vethClientName, vethClientCIDR)
	})
	if err != nil {
		return nil, err
	}
	err = server.Do(func(ns.NetNS) error { return configureLink(vethServerName, vethServerCIDR) })
	if err != nil {
		return nil, err
	}
	ip, _, _ := net.ParseCIDR(vethServerCIDR)
	return &Topology{
		Name: TopoVeth, Server: server, Client: client, ServerIP: ip.String(), CrossNetns: true,
		Description: "two network namespaces joined by a veth pair (two pods on one node)",
	}, nil
}

// configureLink gives the link name of the current namespace its address
// and brings it up.
func configureLink(name, cidr string) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	if err := netlink.AddrAdd(link, addr); err != nil {
		return fmt.Errorf("address %s on %s: %w", cidr, name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up %s: %w", name, err)
	}
	return nil
}
