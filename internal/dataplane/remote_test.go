package dataplane

import (
	"net"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// TestOnlyPeersThatMayBeLocalAreInserted: a connection between two
// different non-loopback addresses cannot have both ends in one network
// namespace's sockhash pairing, so its sockets stay out (and pay nothing);
// a connection to the socket's own address is inserted and redirected.
func TestOnlyPeersThatMayBeLocalAreInserted(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	netns := testutil.NewNetNS(t)
	err := netns.Do(func(ns.NetNS) error {
		// A veth pair inside the namespace: both addresses are local.
		dummy := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "sbx0"}, PeerName: "sbx1"}
		if err := netlink.LinkAdd(dummy); err != nil {
			return err
		}
		for _, a := range []string{"10.99.0.1/24", "10.99.0.2/24"} {
			addr, _ := netlink.ParseAddr(a)
			if err := netlink.AddrAdd(dummy, addr); err != nil {
				return err
			}
		}
		return netlink.LinkSetUp(dummy)
	})
	if err != nil {
		t.Fatal(err)
	}
	transfer := func(from, to string) CgroupCounters {
		t.Helper()
		var l net.Listener
		var c net.Conn
		var err error
		testutil.InCgroup(t, cg, func() {
			testutil.InNetNS(t, netns, func() {
				if l, err = net.Listen("tcp4", to+":0"); err != nil {
					return
				}
				d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
				c, err = d.Dial("tcp4", l.Addr().String())
			})
		})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		defer c.Close()
		transfer.ServeEcho(l)
		before := counterOf(t, dp, cg.ID)
		if err := transfer.RoundTrip(c, transfer.Pattern(21, 256<<10), transfer.Options{WriteSize: 4096}); err != nil {
			t.Fatal(err)
		}
		return counterOf(t, dp, cg.ID).Sub(before)
	}

	// Sockets are counted at ESTABLISHED, before the round trip's delta:
	// read the totals instead.
	total := func() CgroupCounters { return counterOf(t, dp, cg.ID) }
	d := transfer("10.99.0.1", "10.99.0.2")
	if d.RedirectedBytes != 0 {
		t.Errorf("two different addresses were redirected: %+v", d)
	}
	if tot := total(); tot.SocketsRemote != 2 || tot.SocketsInserted != 0 {
		t.Errorf("after 10.99.0.1 -> 10.99.0.2: %d remote, %d inserted; want 2 and 0", tot.SocketsRemote, tot.SocketsInserted)
	}
	d = transfer("10.99.0.1", "10.99.0.1")
	if d.RedirectedBytes == 0 {
		t.Errorf("a connection to the socket's own address was not redirected: %+v", d)
	}
	if tot := total(); tot.SocketsInserted != 2 {
		t.Errorf("after 10.99.0.1 -> 10.99.0.1: %d inserted, want 2", tot.SocketsInserted)
	}
}
