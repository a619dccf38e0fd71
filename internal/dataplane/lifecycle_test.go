package dataplane

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// TestDisableAndUninstallDuringTraffic disables the cgroup and then
// uninstalls everything while connections stream, and while a slow reader
// holds several MiB of redirected bytes it has not read yet. Every byte must
// still arrive: the sockets are never removed from the sockhash.
func TestDisableAndUninstallDuringTraffic(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(l)

	// The slow reader, in a cgroup of its own (so its counters are its
	// own): a second listener whose server does not read until told to.
	slowCg := enabledCgroup(t, dp)
	slowL := testutil.ListenIn(t, slowCg, "tcp4", "127.0.0.1:0")
	slowPayload := transfer.Pattern(99, 6<<20)
	startReading := make(chan struct{})
	slowDigest := make(chan []byte, 1)
	go func() {
		c, err := slowL.Accept()
		if err != nil {
			slowDigest <- nil
			return
		}
		defer c.Close()
		<-startReading
		h := sha256.New()
		io.Copy(h, c)
		slowDigest <- h.Sum(nil)
	}()
	slow := testutil.DialIn(t, slowCg, "tcp4", slowL.Addr().String())
	slowWritten := make(chan error, 1)
	go func() {
		_, err := slow.Write(slowPayload) // redirected into the reader's queue
		if err == nil {
			err = slow.(*net.TCPConn).CloseWrite()
		}
		slowWritten <- err
	}()

	const streams = 4
	stopStreams := startStreams(t, cg, l.Addr().String(), streams, 100)

	// Let the slow writer fill the reader's queue: a pair redirects
	// from the first byte, so all 6 MiB sit redirected and unread in the
	// reader's queue (the writer does not block below 64 MiB). Then pull
	// the rug.
	waitFor(t, 5*time.Second, func() bool {
		socks, err := dp.Sockets()
		return err == nil && len(socks) >= 2+2*streams
	})
	select {
	case err := <-slowWritten:
		if err != nil {
			t.Fatalf("slow writer: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("slow writer stuck before its reader read anything")
	}
	if c := counterOf(t, dp, slowCg.ID); c.RedirectedBytes < uint64(len(slowPayload)) {
		t.Fatalf("only %d bytes redirected before disable; the slow reader must hold %d redirected bytes", c.RedirectedBytes, len(slowPayload))
	}
	for _, id := range []uint64{cg.ID, slowCg.ID} {
		if changed, err := dp.Disable(id); err != nil || !changed {
			t.Fatalf("disable %d: changed=%v err=%v", id, changed, err)
		}
	}
	// Accelerated connections stay accelerated until they close: the
	// streams keep being redirected after disable, and after uninstall
	// (dp still holds the counters map, which their sk_msg program keeps).
	keepsRedirecting := func(after string) {
		t.Helper()
		from := counterOf(t, dp, cg.ID).RedirectedBytes
		deadline := time.Now().Add(5 * time.Second)
		for counterOf(t, dp, cg.ID).RedirectedBytes < from+1<<20 {
			if time.Now().After(deadline) {
				t.Fatalf("the streams were not redirected after %s: %d bytes in 5 s", after, counterOf(t, dp, cg.ID).RedirectedBytes-from)
			}
			time.Sleep(time.Millisecond)
		}
	}
	keepsRedirecting("disable")
	pinDir := dp.PinDir()
	d2, err := Open(Options{PinDir: pinDir})
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Uninstall(); err != nil {
		t.Fatalf("uninstall: %v", err)
	}
	if _, err := os.Stat(pinDir); !os.IsNotExist(err) {
		t.Errorf("pin directory %s still exists after uninstall: %v", pinDir, err)
	}

	keepsRedirecting("uninstall")
	close(startReading)
	for i, err := range stopStreams() {
		if err != nil {
			t.Errorf("stream %d: %v", i, err)
		}
	}
	want := sha256.Sum256(slowPayload)
	if got := <-slowDigest; !bytes.Equal(got, want[:]) {
		t.Fatalf("slow reader lost bytes across disable+uninstall: sha256 %x, want %x", got, want)
	}
}

func waitFor(t *testing.T, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %v", timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startStreams dials n connections to addr in cg and streams over each
// (see streamUntil; stream i repeats transfer.Pattern(seed+i, 1 MiB) in
// 16 KiB writes). The function it returns stops the streams, waits for
// them and returns each one's error.
func startStreams(t *testing.T, cg cgroup.Cgroup, addr string, n int, seed uint64) (stop func() []error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make([]error, n)
	done := make(chan struct{})
	for i := range n {
		c := testutil.DialIn(t, cg, "tcp4", addr)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = streamUntil(c, done, transfer.Pattern(seed+uint64(i), 1<<20), 16384)
		}()
	}
	return func() []error {
		close(done)
		wg.Wait()
		return errs
	}
}

// streamUntil writes chunk over c again and again, in writes of writeSize,
// until stop is closed, while reading the echo; then half-closes and checks
// that the echo matches everything written.
func streamUntil(c net.Conn, stop <-chan struct{}, chunk []byte, writeSize int) error {
	c.SetDeadline(time.Now().Add(60 * time.Second))
	sent := sha256.New()
	var sentN int64
	werr := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				werr <- c.(*net.TCPConn).CloseWrite()
				return
			default:
			}
			for off := 0; off < len(chunk); off += writeSize {
				n, err := c.Write(chunk[off:min(off+writeSize, len(chunk))])
				sent.Write(chunk[off : off+n])
				sentN += int64(n)
				if err != nil {
					werr <- err
					return
				}
			}
		}
	}()
	got := sha256.New()
	n, err := io.Copy(got, c)
	if err != nil {
		return fmt.Errorf("read echo after %d bytes: %w", n, err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if n != sentN || !bytes.Equal(got.Sum(nil), sent.Sum(nil)) {
		return fmt.Errorf("sent %d bytes, echo returned %d bytes with a different sha256", sentN, n)
	}
	return nil
}

// TestUninstallDetachesLinksItDoesNotName: a cgroup link pinned under
// cgroups/ by a program this binary no longer attaches (as the
// cgroup/setsockopt program was, before layout 12) is detached and removed
// by uninstall with the rest: nothing stays attached, nothing stays pinned.
func TestUninstallDetachesLinksItDoesNotName(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	var release cgroupProgram
	for _, p := range cgroupPrograms {
		if p.Attach == ebpf.AttachCgroupInetSockRelease {
			release = p
		}
	}
	prog, err := release.load(cg.ID, 1, dp.maps)
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cg.Path, Attach: ebpf.AttachCgroupInetSockRelease, Program: prog})
	if err != nil {
		t.Fatal(err)
	}
	retired := pinPath(dp.pinDir, DirCgroups, fmt.Sprintf("%d-setsockopt", cg.ID))
	if err := l.Pin(retired); err != nil {
		t.Fatal(err)
	}
	l.Close()
	attached := func() int {
		f, err := os.Open(cg.Path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCgroupInetSockRelease})
		if err != nil {
			t.Fatal(err)
		}
		return len(res.Programs)
	}
	if n := attached(); n != 2 {
		t.Fatalf("%d sock_release programs attached before uninstall, want sockbypass's and the retired one", n)
	}
	if err := dp.Uninstall(); err != nil {
		t.Fatalf("uninstall with a link pin it does not name: %v", err)
	}
	if _, err := os.Stat(dp.pinDir); !os.IsNotExist(err) {
		t.Errorf("pin directory still there after uninstall (%v)", err)
	}
	if n := attached(); n != 0 {
		t.Errorf("%d sock_release programs still attached after uninstall", n)
	}
}
