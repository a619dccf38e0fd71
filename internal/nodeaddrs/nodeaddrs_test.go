package nodeaddrs

import (
	"net/netip"
	"testing"
)

func TestOnlyNodeWideAddressesAreCollected(t *testing.T) {
	o := Owners{}
	for _, a := range []string{"127.0.0.1", "::1", "169.254.1.1", "fe80::1", "224.0.0.1", "0.0.0.0", "10.0.0.5", "fd00::5", "::ffff:10.0.0.6"} {
		o.Add(netip.MustParseAddr(a), 7)
	}
	if len(o) != 3 {
		t.Errorf("collected %v, want 10.0.0.5, fd00::5 and 10.0.0.6 only", o)
	}
	if _, ok := o[netip.MustParseAddr("10.0.0.6")]; !ok {
		t.Errorf("an IPv4-mapped address was not stored as IPv4: %v", o)
	}
	o.Add(netip.MustParseAddr("10.0.0.5"), 8)
	if len(o[netip.MustParseAddr("10.0.0.5")]) != 2 {
		t.Errorf("a second owner was not recorded")
	}
}
