// Package transfer holds the servers and clients that tests use to move
// bytes through a TCP connection and check they arrived intact: an echo
// server, a digest server (answers the sha256 of what it read), a
// single-letter sink that names itself, and the clients that drive them.
//
// It imports only the standard library, so that small binaries such as the
// kernel-matrix guest can use it without pulling in internal/testutil's
// dependencies. Every loop reads and writes with Read and Write (never
// io.Copy between two TCP connections, which splices and would bypass the
// socket paths under test).
package transfer

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"time"
)

// Echo writes back every byte it reads from c, in order, until the peer
// half-closes; it then half-closes its own side and closes c. It returns nil
// after the peer's EOF, or the first read or write error.
func Echo(c net.Conn) error {
	defer c.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return fmt.Errorf("echo write: %w", werr)
			}
		}
		if errors.Is(err, io.EOF) {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("echo read: %w", err)
		}
	}
}

// ServeEcho accepts connections on l until it is closed and runs Echo on
// each in a goroutine of its own. It returns at once.
func ServeEcho(l net.Listener) { Serve(l, func(c net.Conn) { Echo(c) }) }

// Digest reads c until the peer half-closes, answers the sha256 of what it
// read (32 bytes), and closes c. It returns the read or write error, if any.
func Digest(c net.Conn) error {
	defer c.Close()
	h := sha256.New()
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		h.Write(buf[:n])
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("digest read: %w", err)
		}
	}
	_, err := c.Write(h.Sum(nil))
	return err
}

// ServeDigest accepts connections on l until it is closed and runs Digest
// on each in a goroutine of its own. It returns at once.
func ServeDigest(l net.Listener) { Serve(l, func(c net.Conn) { Digest(c) }) }

// Pattern returns n pseudo-random bytes derived from seed: the same seed
// gives the same bytes.
func Pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

// Options say how a client sends its payload: in writes of WriteSize bytes
// (the whole payload at once when 0), sleeping Pause after each write that
// starts on a multiple of PauseEvery bytes (never when PauseEvery is 0), all
// within Timeout (60 s when 0), which is set as the connection's deadline.
type Options struct {
	WriteSize  int
	PauseEvery int
	Pause      time.Duration
	Timeout    time.Duration
}

// send writes payload to c as o says and then half-closes c.
func (o Options) send(c net.Conn, payload []byte) error {
	size := o.WriteSize
	if size <= 0 {
		size = max(len(payload), 1)
	}
	for off := 0; off < len(payload); off += size {
		if _, err := c.Write(payload[off:min(off+size, len(payload))]); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		if o.PauseEvery > 0 && off%o.PauseEvery == 0 {
			time.Sleep(o.Pause)
		}
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return fmt.Errorf("half-close: %w", err)
	}
	return nil
}

// exchange writes payload to c as o says, half-closes, and meanwhile copies
// what it reads to sink until the peer's EOF. It returns how many bytes it
// read, and the read and write errors joined.
func exchange(c net.Conn, payload []byte, o Options, sink io.Writer) (int, error) {
	timeout := o.Timeout
	if timeout == 0 {
		timeout = 60 * time.Second
	}
	c.SetDeadline(time.Now().Add(timeout))
	werr := make(chan error, 1)
	go func() { werr <- o.send(c, payload) }()
	buf := make([]byte, 64<<10)
	read := 0
	var rerr error
	for {
		n, err := c.Read(buf)
		sink.Write(buf[:n])
		read += n
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			rerr = fmt.Errorf("read after %d bytes: %w", read, err)
			break
		}
	}
	return read, errors.Join(rerr, <-werr)
}

// Exchange writes payload to c as o says, half-closes, and reads
// concurrently until the peer's EOF. It returns what it read, and the read
// and write errors joined.
func Exchange(c net.Conn, payload []byte, o Options) ([]byte, error) {
	var got bytes.Buffer
	_, err := exchange(c, payload, o, &got)
	return got.Bytes(), err
}

// RoundTrip sends payload through an echo server on c (see Exchange) and
// returns an error unless every byte came back, in order.
func RoundTrip(c net.Conn, payload []byte, o Options) error {
	h := sha256.New()
	n, err := exchange(c, payload, o, h)
	if err != nil {
		return err
	}
	want := sha256.Sum256(payload)
	if n != len(payload) || !bytes.Equal(h.Sum(nil), want[:]) {
		return fmt.Errorf("echo of %d bytes came back as %d bytes with a different sha256", len(payload), n)
	}
	return nil
}

// DigestRoundTrip sends payload to a digest server on c (see Exchange) and
// returns an error unless it answers the payload's sha256.
func DigestRoundTrip(c net.Conn, payload []byte, o Options) error {
	got, err := Exchange(c, payload, o)
	want := sha256.Sum256(payload)
	if err != nil || !bytes.Equal(got, want[:]) {
		return fmt.Errorf("%d bytes: digest %x (%v), want %x", len(payload), got, err, want)
	}
	return nil
}

// LetterSink reads c until the peer half-closes, checking that every byte
// is letter, then answers "name:N" (N the bytes read) and closes c. A byte
// of any other letter is an error that names the offset: a stream of
// another connection reached this one.
func LetterSink(c net.Conn, name string, letter byte) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	buf := make([]byte, 64<<10)
	n := 0
	for {
		m, err := c.Read(buf)
		if i := bytes.IndexFunc(buf[:m], func(r rune) bool { return byte(r) != letter }); i >= 0 {
			return fmt.Errorf("%s received %q at offset %d: bytes of another connection", name, buf[i], n+i)
		}
		n += m
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("%s server: %w", name, err)
		}
	}
	_, err := fmt.Fprintf(c, "%s:%d", name, n)
	return err
}

// SendLetters writes total bytes of letter to c in chunks of chunk bytes,
// half-closes, and checks that the LetterSink at the other end answers
// "name:total".
func SendLetters(c net.Conn, name string, letter byte, total, chunk int) error {
	got, err := Exchange(c, bytes.Repeat([]byte{letter}, total), Options{WriteSize: chunk})
	if err != nil {
		return fmt.Errorf("%s client: %w", name, err)
	}
	if want := fmt.Sprintf("%s:%d", name, total); string(got) != want {
		return fmt.Errorf("client of %s got reply %q, want %q", name, got, want)
	}
	return nil
}

// ServeDiscard accepts connections on l until it is closed and reads each
// to its end, discarding what it reads, in a goroutine of its own. It
// returns at once.
func ServeDiscard(l net.Listener) {
	Serve(l, func(c net.Conn) {
		io.Copy(io.Discard, c)
		c.Close()
	})
}

// Serve accepts connections on l until it is closed and runs handle on
// each in a goroutine of its own. It returns at once.
func Serve(l net.Listener, handle func(net.Conn)) {
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
}

// LetterStream is one connection of a test that streams single letters:
// its server accepts on Listener and runs LetterSink; its client, Client,
// sends Letter (see SendLetters). Name names both in errors.
type LetterStream struct {
	Name     string
	Letter   byte
	Listener net.Listener
	Client   net.Conn
}

// ServeLetters runs LetterSink on the next connection each stream's
// Listener accepts, in goroutines of their own, and returns at once. The
// function it returns sends total bytes of each stream's letter from its
// Client in writes of chunk bytes, all streams at once, waits for every
// client and server, and returns their errors.
func ServeLetters(streams []*LetterStream) (send func(total, chunk int) []error) {
	errs := make(chan error, 2*len(streams))
	var servers sync.WaitGroup
	for _, s := range streams {
		servers.Add(1)
		go func() {
			defer servers.Done()
			c, err := s.Listener.Accept()
			if err == nil {
				err = LetterSink(c, s.Name, s.Letter)
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	return func(total, chunk int) []error {
		var clients sync.WaitGroup
		for _, s := range streams {
			clients.Add(1)
			go func() {
				defer clients.Done()
				if err := SendLetters(s.Client, s.Name, s.Letter, total, chunk); err != nil {
					errs <- err
				}
			}()
		}
		clients.Wait()
		servers.Wait()
		close(errs)
		var out []error
		for err := range errs {
			out = append(out, err)
		}
		return out
	}
}
