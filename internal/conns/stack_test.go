package conns

import (
	"bytes"
	"io"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/sockdiag"
)

// stackOf returns the cgroup's stack bytes and packets as stats shows
// them: what closed sockets counted plus the sampled live ones.
func stackOf(t *testing.T, dp *dataplane.Dataplane, mounts cgroup.Mounts, s *StackSampler, id uint64) (bytes, packets uint64) {
	t.Helper()
	st, err := dp.Status()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.AddLive(dp, mounts, st); err != nil {
		t.Fatal(err)
	}
	for _, c := range st.Cgroups {
		if c.ID == id {
			return c.Counters.StackEgressBytes, c.Counters.StackEgressPackets
		}
	}
	t.Fatalf("cgroup id %d not in status", id)
	return 0, 0
}

// TestStackBytesSampledWhileOpen: the stack bytes of an accelerated
// cgroup's live connection (blocking, so plain) show in the figures before
// it closes, exactly what the applications wrote; after it closes the
// release program has counted them, and they are not counted twice.
func TestStackBytesSampledWhileOpen(t *testing.T) {
	dp, cg, mounts := setup(t)
	client, server := blockingConn(t, cg)

	const up, down = 777777, 123457
	go func() {
		io.CopyN(io.Discard, server, up)
		server.Write(bytes.Repeat([]byte("d"), down))
	}()
	if _, err := client.Write(bytes.Repeat([]byte("u"), up)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(client, make([]byte, down)); err != nil {
		t.Fatal(err)
	}

	var s StackSampler
	sample, closed, err := SampleStack(dp, mounts)
	if err != nil {
		t.Fatal(err)
	}
	if got := sample[cg.ID]; got.Bytes != up+down || got.Sockets != 2 || got.Packets == 0 || closed[cg.ID].StackEgressBytes != 0 {
		t.Errorf("open: sampled %+v, closed sockets counted %d bytes; want %d bytes of 2 sockets in some packets, none closed",
			got, closed[cg.ID].StackEgressBytes, up+down)
	}
	openBytes, openPackets := stackOf(t, dp, mounts, &s, cg.ID)
	if openBytes != up+down {
		t.Errorf("open: stats show %d stack bytes, want the %d written", openBytes, up+down)
	}

	// The client closes first: its socket lingers in FIN-WAIT-2, held by
	// no file, counted by the release program (close() ran it), and
	// must not be sampled as well; the server's is still live.
	client.Close()
	c, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c[cg.ID].StackEgressBytes != up {
		t.Errorf("client closed: the release program counted %d bytes, want its %d", c[cg.ID].StackEgressBytes, up)
	}
	if b, _ := stackOf(t, dp, mounts, &s, cg.ID); b != up+down {
		t.Errorf("client closed, server open: stats show %d stack bytes, want %d (each socket once)", b, up+down)
	}
	server.Close()
	c, err = dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c[cg.ID].StackEgressBytes != up+down {
		t.Errorf("closed: the release program counted %d bytes, want %d", c[cg.ID].StackEgressBytes, up+down)
	}
	closedBytes, closedPackets := stackOf(t, dp, mounts, &s, cg.ID)
	if closedBytes != up+down || closedPackets < openPackets {
		t.Errorf("closed: stats show %d bytes in %d packets, want %d (not counted twice) in at least the %d packets shown open",
			closedBytes, closedPackets, up+down, openPackets)
	}
	t.Logf("open: %d bytes in %d packets sampled; closed: %d bytes in %d packets counted", openBytes, openPackets, closedBytes, closedPackets)
}

// TestSocketStackTakesTheQueuedFINOut: the bytes a socket wrote are what it
// transmitted once plus what is queued, without a FIN that shutdown queued.
func TestSocketStackTakesTheQueuedFINOut(t *testing.T) {
	for _, tc := range []struct {
		state         uint8
		info          unix.TCPInfo
		bytes, pakets uint64
	}{
		{sockdiag.StateEstablished, unix.TCPInfo{Bytes_sent: 1000, Bytes_retrans: 100, Notsent_bytes: 50, Data_segs_out: 10, Total_retrans: 1}, 950, 9},
		{sockdiag.StateFinWait1, unix.TCPInfo{Bytes_sent: 1000, Notsent_bytes: 51, Data_segs_out: 10}, 1050, 10},
		{sockdiag.StateFinWait1, unix.TCPInfo{Bytes_sent: 1000, Data_segs_out: 10}, 1000, 10},
		{sockdiag.StateLastAck, unix.TCPInfo{Bytes_sent: 10, Notsent_bytes: 1}, 10, 0},
		{sockdiag.StateEstablished, unix.TCPInfo{Bytes_retrans: 5, Total_retrans: 2}, 0, 0},
	} {
		b, p := SocketStack(tc.state, &tc.info)
		if b != tc.bytes || p != tc.pakets {
			t.Errorf("%s %+v: %d bytes, %d packets; want %d, %d", sockdiag.StateName(tc.state), tc.info, b, p, tc.bytes, tc.pakets)
		}
	}
}
