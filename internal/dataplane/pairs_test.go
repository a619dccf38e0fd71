package dataplane

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
)

// entries counts the entries of the pinned map name.
func entries(t *testing.T, dp *Dataplane, name string) int {
	t.Helper()
	m := dp.maps[name]
	key := make([]byte, m.KeySize())
	n := 0
	it := m.Iterate()
	var val []byte
	for it.Next(&key, &val) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatalf("iterate %s: %v", name, err)
	}
	return n
}

// settlesTo waits until the pinned map name holds want entries, and fails
// the test with what it holds after the deadline.
func settlesTo(t *testing.T, dp *Dataplane, name string, want int, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := entries(t, dp, name)
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s holds %d entries 5 s after the last connection closed, want %d", what, name, n, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// churn opens n connections from cg (the test's own cgroup when cg is
// nil) to addr and closes each at once; blocking: without O_NONBLOCK.
func churn(t *testing.T, cg *cgroup.Cgroup, addr string, n int, blocking bool) {
	t.Helper()
	for i := 0; i < n; i++ {
		switch {
		case blocking && cg != nil:
			testutil.BlockingDialIn(t, *cg, addr).Close()
		case cg != nil:
			testutil.DialIn(t, *cg, "tcp4", addr).Close()
		default:
			c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
		}
	}
}

// acceptAndClose accepts every connection on l and closes it.
func acceptAndClose(l net.Listener) {
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

// TestPairsLeakNothing: every kind of connection to a listener of an
// enabled cgroup, closed at once, leaves `pairs` as it found it: from a
// cgroup that is not enabled, from a blocking client, from an enabled
// client, to an account-only listener and to an accelerated one.
func TestPairsLeakNothing(t *testing.T) {
	dp := install(t)
	accel := enabledCgroup(t, dp)
	dry := testutil.NewCgroup(t)
	if _, err := dp.Enable(dry, EnableOptions{AccountOnly: true, NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	plain := testutil.NewCgroup(t)
	const n = 200
	for _, srv := range []struct {
		name string
		cg   cgroup.Cgroup
	}{{"accelerated", accel}, {"account-only", dry}} {
		l := testutil.ListenIn(t, srv.cg, "tcp4", "127.0.0.1:0")
		acceptAndClose(l)
		for _, cl := range []struct {
			name     string
			cg       cgroup.Cgroup
			blocking bool
		}{{"not enabled", plain, false}, {"blocking", accel, true}, {"enabled", accel, false}, {"account-only", dry, false}} {
			base := entries(t, dp, PinPairs)
			churn(t, &cl.cg, l.Addr().String(), n, cl.blocking)
			settlesTo(t, dp, PinPairs, base, fmt.Sprintf("%d connections from a %s client to an %s listener", n, cl.name, srv.name))
		}
	}
}

// sendSYNs sends n bare SYNs from a raw socket to the IPv4 loopback
// address addr, from source ports firstPort and up: the listener answers
// each with a SYN-ACK, which finds no socket and is reset; the handshake
// never completes (an aborted handshake, as a port scan or a SYN flood
// makes).
func sendSYNs(t *testing.T, addr *net.TCPAddr, firstPort, n int) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		t.Fatalf("raw socket: %v", err)
	}
	defer unix.Close(fd)
	src, dst := [4]byte{127, 0, 0, 1}, [4]byte(addr.IP.To4())
	for i := 0; i < n; i++ {
		seg := make([]byte, 20)
		binary.BigEndian.PutUint16(seg[0:], uint16(firstPort+i))
		binary.BigEndian.PutUint16(seg[2:], uint16(addr.Port))
		binary.BigEndian.PutUint32(seg[4:], uint32(1000+i)) // sequence
		seg[12] = 5 << 4                                    // data offset: 5 words
		seg[13] = 0x02                                      // SYN
		binary.BigEndian.PutUint16(seg[14:], 65535)         // window
		binary.BigEndian.PutUint16(seg[16:], tcpChecksum(src, dst, seg))
		if err := unix.Sendto(fd, seg, 0, &unix.SockaddrInet4{Addr: dst}); err != nil {
			t.Fatalf("send SYN %d: %v", i, err)
		}
	}
}

// tcpChecksum is the TCP checksum of seg (checksum field zero) over the
// IPv4 pseudo-header.
func tcpChecksum(src, dst [4]byte, seg []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(b[i])<<8 | uint32(b[i+1])
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(src[:])
	add(dst[:])
	sum += uint32(unix.IPPROTO_TCP) + uint32(len(seg))
	add(seg)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// TestAbortedHandshakesAreReaped: SYNs whose handshake never completes
// leave their offer in pairs (no socket exists to remove it) until
// ReapPairs removes it; a fresh offer and a live pair's are kept.
func TestAbortedHandshakesAreReaped(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	base := entries(t, dp, PinPairs)
	sendSYNs(t, l.Addr().(*net.TCPAddr), 40000, 100)
	waitFor(t, 5*time.Second, func() bool { return entries(t, dp, PinPairs) == base+100 })
	// A live pair whose client has not sent yet keeps its entry (JOINED)
	// until its first message.
	c := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	waitJoined(t, dp, c)
	if n, err := dp.ReapPairs(time.Hour); err != nil || n != 0 {
		t.Fatalf("ReapPairs(1h) right after the SYNs: %d removed, %v; want none", n, err)
	}
	time.Sleep(10 * time.Millisecond) // the offers must be older than the age below
	n, err := dp.ReapPairs(5 * time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if n != 100 {
		t.Errorf("ReapPairs removed %d offers, want the 100 aborted handshakes", n)
	}
	if st, ok, _ := dp.PairState(keyOf(c)); !ok || st != PairJoined {
		t.Errorf("the live pair's handshake: state %d, recorded %v; want JOINED kept", st, ok)
	}
	// The live pair still works, redirected.
	before := counterOf(t, dp, cg.ID)
	msg := []byte("hello after reaping")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	s.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(s, got); err != nil || string(got) != string(msg) {
		t.Fatalf("read %q, %v", got, err)
	}
	if d := counterOf(t, dp, cg.ID).Sub(before); d.RedirectedBytes != uint64(len(msg)) {
		t.Errorf("redirected %d bytes, want %d", d.RedirectedBytes, len(msg))
	}
	c.Close()
	settlesTo(t, dp, PinPairs, base, "after the client closed")
}

// TestFullPairsRefusesNewPairs: a flood of aborted handshakes that fills
// pairs never breaks a live pair: new connections are offered no pair,
// stay plain TCP and are counted (pairs_full); once reaped, connections
// pair again.
func TestFullPairsRefusesNewPairs(t *testing.T) {
	dp := installSized(t, 1024) // pairs: 65536 entries (the minimum)
	cg := enabledCgroup(t, dp)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	// A live pair whose client has not sent yet: its entry must survive
	// the flood.
	live := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	liveSrv, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer liveSrv.Close()
	waitJoined(t, dp, live)
	capacity := int(dp.maps[PinPairs].MaxEntries())
	flood := capacity + 1000
	for i := 0; i < flood; i += 20000 {
		// Source ports 1024-65535 repeat: vary the listener instead.
		fl := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
		sendSYNs(t, fl.Addr().(*net.TCPAddr), 30000, min(20000, flood-i))
	}
	waitFor(t, 10*time.Second, func() bool { return entries(t, dp, PinPairs) >= capacity })
	before := counterOf(t, dp, cg.ID)
	c := testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	echoBoth(t, c, s, []byte("plain while full"))
	d := counterOf(t, dp, cg.ID).Sub(before)
	if d.PairsFull == 0 || d.RedirectedBytes != 0 {
		t.Errorf("a connection while pairs is full: pairs_full %d, redirected %d; want counted and plain", d.PairsFull, d.RedirectedBytes)
	}
	c.Close()
	s.Close()
	// The live pair survived the flood: its first message is redirected.
	before = counterOf(t, dp, cg.ID)
	echoBoth(t, live, liveSrv, []byte("live pair"))
	if d := counterOf(t, dp, cg.ID).Sub(before); d.RedirectedBytes == 0 || d.PassedBytes != 0 {
		t.Errorf("the live pair after the flood: redirected %d, passed %d; want redirected only", d.RedirectedBytes, d.PassedBytes)
	}
	time.Sleep(10 * time.Millisecond)
	if n, err := dp.ReapPairs(5 * time.Millisecond); err != nil || n < capacity-10 {
		t.Fatalf("ReapPairs: %d removed, %v; want the flood's offers that fit (%d)", n, err, capacity)
	}
	before = counterOf(t, dp, cg.ID)
	c = testutil.DialIn(t, cg, "tcp4", l.Addr().String())
	s, err = l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	defer c.Close()
	echoBoth(t, c, s, []byte("paired again"))
	if d := counterOf(t, dp, cg.ID).Sub(before); d.RedirectedBytes == 0 {
		t.Errorf("after reaping: redirected %d bytes, want the connection paired", d.RedirectedBytes)
	}
}

// echoBoth sends msg from c to s and back, and fails the test unless both
// arrive intact.
func echoBoth(t *testing.T, c, s net.Conn, msg []byte) {
	t.Helper()
	for _, dir := range [][2]net.Conn{{c, s}, {s, c}} {
		if _, err := dir[0].Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		dir[1].SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(dir[1], got); err != nil || string(got) != string(msg) {
			t.Fatalf("read %q, %v; want %q", got, err, msg)
		}
	}
}
