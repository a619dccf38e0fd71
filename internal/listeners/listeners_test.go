package listeners

import (
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/sockbypass/sockbypass/internal/nodeaddrs"
)

func TestParseProcAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:1F90":                         "127.0.0.1:8080",
		"00000000:0050":                         "0.0.0.0:80",
		"00000000000000000000000000000000:1F90": "[::]:8080",
		"0000000000000000FFFF00000100007F:0016": "127.0.0.1:22", // ::ffff:127.0.0.1
		"000080FE00000000FF005450B6AD1DFE:0016": "[fe80::5054:ff:fe1d:adb6]:22",
	} {
		got, err := ParseProcAddr(in)
		if err != nil || got != netip.MustParseAddrPort(want) {
			t.Errorf("ParseProcAddr(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0100007F", "0100007F:zz", "01007F:0050"} {
		if _, err := ParseProcAddr(bad); err == nil {
			t.Errorf("ParseProcAddr(%q) accepted", bad)
		}
	}
}

// TestCollectFindsOwnListener: a listener of this process is found with its
// address and blocking mode (Go's are non-blocking). Needs no privileges.
func TestCollectFindsOwnListener(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	want := l.Addr().(*net.TCPAddr).AddrPort()
	found, err := Collect([]int{os.Getpid()})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		if f.Addr == want.Addr() && f.Port == want.Port() {
			if !f.NonBlocking {
				t.Errorf("%v reported blocking; Go listeners are non-blocking", want)
			}
			if own, err := nodeaddrs.NetnsCookie(); err != nil || f.NetnsCookie != own {
				t.Errorf("%v has netns cookie %d, want this namespace's %d (%v)", want, f.NetnsCookie, own, err)
			}
			return
		}
	}
	t.Fatalf("listener %v not found in %+v", want, found)
}
