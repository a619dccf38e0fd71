package dataplane

import (
	"crypto/sha256"
	"io"
	"net"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// install creates a pinned dataplane of the test's own and uninstalls it at
// the end of the test.
func install(t *testing.T) *Dataplane {
	t.Helper()
	pinDir := testutil.NewPinDir(t)
	dp, err := OpenOrCreate(Options{PinDir: pinDir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if d, err := Open(Options{PinDir: pinDir}); err == nil {
			if err := d.Uninstall(); err != nil {
				t.Errorf("uninstall: %v", err)
			}
		}
		dp.Close()
	})
	return dp
}

// enabledCgroup creates a cgroup and enables it in dp.
func enabledCgroup(t *testing.T, dp *Dataplane) cgroup.Cgroup {
	t.Helper()
	cg := testutil.NewCgroup(t)
	if _, err := dp.Enable(cg, EnableOptions{}); err != nil {
		t.Fatal(err)
	}
	return cg
}

func counterOf(t *testing.T, dp *Dataplane, id uint64) CgroupCounters {
	t.Helper()
	c, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c[id]
}

// sumServer accepts connections on l; for each it reads until EOF, then
// writes back the sha256 of what it read and closes.
func sumServer(t *testing.T, l net.Listener) {
	t.Helper()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				h := sha256.New()
				if _, err := io.Copy(h, c); err != nil {
					return
				}
				c.Write(h.Sum(nil))
			}()
		}
	}()
}

// sendAndSum sends payload over c, half-closes, and returns the digest the
// server sent back.
func sendAndSum(t *testing.T, c net.Conn, payload []byte) []byte {
	t.Helper()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read digest: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write %d bytes: %v", len(payload), err)
	}
	return got
}

func listenIn(t *testing.T, cg cgroup.Cgroup, network, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	var err error
	testutil.InCgroup(t, cg, func() { l, err = net.Listen(network, addr) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func dialIn(t *testing.T, cg cgroup.Cgroup, network, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	var err error
	testutil.InCgroup(t, cg, func() { c, err = net.DialTimeout(network, addr, 5*time.Second) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
