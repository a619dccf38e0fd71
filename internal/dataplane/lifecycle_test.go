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
)

// TestDisableAndUninstallDuringTraffic disables the cgroup and then
// uninstalls everything while connections stream, and while a slow reader
// holds several MiB of redirected bytes it has not read yet. Every byte must
// still arrive: the sockets are never removed from the sockhash.
func TestDisableAndUninstallDuringTraffic(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	l := listenIn(t, cg, "tcp4", "127.0.0.1:0")
	echoServer(t, l)

	// The slow reader: a second listener whose server does not read until
	// told to.
	slowL := listenIn(t, cg, "tcp4", "127.0.0.1:0")
	slowPayload := pattern(99, 6<<20)
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
	slow := dialIn(t, cg, "tcp4", slowL.Addr().String())
	slowWritten := make(chan error, 1)
	go func() {
		_, err := slow.Write(slowPayload) // redirected into the reader's queue
		if err == nil {
			err = slow.(*net.TCPConn).CloseWrite()
		}
		slowWritten <- err
	}()

	const streams = 4
	var wg sync.WaitGroup
	errs := make([]error, streams)
	stop := make(chan struct{})
	for i := range streams {
		c := dialIn(t, cg, "tcp4", l.Addr().String())
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = streamUntil(c, stop, pattern(uint64(100+i), 1<<20), 16384)
		}()
	}

	// Let the slow writer fill the reader's queue, then pull the rug.
	waitFor(t, 5*time.Second, func() bool {
		socks, err := dp.Sockets()
		return err == nil && len(socks) >= 2+2*streams
	})
	time.Sleep(50 * time.Millisecond)
	if changed, err := dp.Disable(cg.ID); err != nil || !changed {
		t.Fatalf("disable: changed=%v err=%v", changed, err)
	}
	time.Sleep(50 * time.Millisecond)
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

	time.Sleep(100 * time.Millisecond)
	close(stop)
	close(startReading)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("stream %d: %v", i, err)
		}
	}
	select {
	case err := <-slowWritten:
		if err != nil {
			t.Fatalf("slow writer: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("slow writer stuck")
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
