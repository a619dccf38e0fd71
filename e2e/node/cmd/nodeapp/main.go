// Command nodeapp is the static workload of the node e2e test (e2e/node),
// one binary for every role of its images:
//
//	nodeapp pause                      the pod sandbox's process: waits for a signal
//	nodeapp server -port 8080          an echo server (every byte back, no splice);
//	                                   -nonblock-after-listen: its listener is blocking
//	                                   at listen() and made non-blocking after it (redis,
//	                                   Java NIO)
//	nodeapp client -target IP:PORT     streams a deterministic byte stream over
//	                                   connections of -conn-time each, checks every
//	                                   echoed byte and prints one JSON line per
//	                                   connection and a final one on SIGTERM
//	nodeapp sidecar -port 15001        accepts, asks SO_ORIGINAL_DST where the app
//	                                   was going, connects there and relays
//
// Every copy goes through a user-space buffer: splice would take a
// connection off the fast path (and would not be what an app does).
package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"hash"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: nodeapp pause|server|client|sidecar [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var err error
	switch os.Args[1] {
	case "pause":
		<-ctx.Done()
	case "server":
		err = server(ctx, os.Args[2:])
	case "client":
		err = client(ctx, os.Args[2:])
	case "sidecar":
		err = sidecar(ctx, os.Args[2:])
	default:
		err = fmt.Errorf("unknown role %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nodeapp:", err)
		os.Exit(1)
	}
}

// plainConn hides net.TCPConn's ReadFrom and WriteTo, so io.CopyBuffer
// copies through the buffer instead of splicing.
type plainConn struct{ c net.Conn }

func (p plainConn) Read(b []byte) (int, error)  { return p.c.Read(b) }
func (p plainConn) Write(b []byte) (int, error) { return p.c.Write(b) }

func copyPlain(dst, src net.Conn) (int64, error) {
	return io.CopyBuffer(plainConn{dst}, plainConn{src}, make([]byte, 64<<10))
}

func closeWrite(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
}

func listen(ctx context.Context, port int) (net.Listener, error) {
	l, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		return nil, err
	}
	go func() { <-ctx.Done(); l.Close() }()
	return l, nil
}

// listenNonblockLate listens on port with a socket that is blocking at
// listen() and made non-blocking after it, as redis and Java NIO do:
// sock_ops records such a listener as blocking, and only a read of its
// file's flags (the daemon's /proc read) can find it non-blocking.
func listenNonblockLate(ctx context.Context, port int) (net.Listener, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "listener")
	defer f.Close() // net.FileListener holds a dup of it
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port}); err != nil {
		return nil, err
	}
	if err := unix.Listen(fd, 128); err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, err
	}
	l, err := net.FileListener(f)
	if err != nil {
		return nil, err
	}
	go func() { <-ctx.Done(); l.Close() }()
	return l, nil
}

func server(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	port := fs.Int("port", 8080, "port")
	late := fs.Bool("nonblock-after-listen", false, "listen blocking, then set O_NONBLOCK")
	fs.Parse(args)
	open := listen
	if *late {
		open = listenNonblockLate
	}
	l, err := open(ctx, *port)
	if err != nil {
		return err
	}
	fmt.Printf("{\"listening\":%d}\n", *port)
	var n atomic.Int64
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		n.Add(1)
		go func() {
			defer c.Close()
			copyPlain(c, c)
			closeWrite(c)
		}()
	}
}

// stream is the deterministic byte stream a client sends: block i is the
// SHA-256 of (seed, i), repeated. The client checks the echo against it.
type stream struct {
	seed uint64
	off  int64
}

func (s *stream) fill(b []byte) {
	var sum [32]byte
	blk := int64(-1)
	for i := range b {
		o := s.off + int64(i)
		if o/32 != blk {
			blk = o / 32
			var k [16]byte
			binary.LittleEndian.PutUint64(k[:8], s.seed)
			binary.LittleEndian.PutUint64(k[8:], uint64(blk))
			sum = sha256.Sum256(k[:])
		}
		b[i] = sum[o%32]
	}
	s.off += int64(len(b))
}

// connResult is what a client prints for each connection.
type connResult struct {
	Conn      int     `json:"conn"`
	Local     string  `json:"local"`
	Remote    string  `json:"remote"`
	Start     string  `json:"start"`
	Seconds   float64 `json:"seconds"`
	Sent      int64   `json:"sent"`
	Received  int64   `json:"received"`
	SentSHA   string  `json:"sent_sha256"`
	RecvSHA   string  `json:"received_sha256"`
	Intact    bool    `json:"intact"`
	Error     string  `json:"error,omitempty"`
	Final     bool    `json:"final,omitempty"`
	Connected bool    `json:"connected"`
	// The final line's: connections made, and dials that failed.
	Conns int `json:"conns,omitempty"`
	// Corrupt: a byte read differs from the byte sent at that offset
	// (whatever happened to the connection). Broken (final line):
	// connections that ended in an error (a peer that went away) rather
	// than with every byte echoed.
	Corrupt    bool `json:"corrupt,omitempty"`
	Broken     int  `json:"broken,omitempty"`
	DialErrors int  `json:"dial_errors,omitempty"`
}

func client(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	target := fs.String("target", "", "IP:PORT")
	connTime := fs.Duration("conn-time", 2*time.Second, "how long each connection streams (0: until SIGTERM)")
	chunk := fs.Int("chunk", 16<<10, "write size")
	rate := fs.Int("rate", 8<<20, "bytes per second at most (0: as fast as it goes)")
	duration := fs.Duration("duration", 0, "stop after this long (0: at SIGTERM)")
	fs.Parse(args)
	if *duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *duration)
		defer cancel()
	}
	var mu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	print := func(r connResult) { mu.Lock(); enc.Encode(r); mu.Unlock() }
	var total connResult
	total.Final = true
	total.Intact = true
	hs, hr := sha256.New(), sha256.New()
	for i := 0; ctx.Err() == nil; i++ {
		r := oneConn(ctx, i, *target, *connTime, *chunk, *rate, hs, hr)
		print(r)
		if !r.Connected {
			// Not a byte sent: the server or the sidecar is not up yet.
			total.DialErrors++
			time.Sleep(200 * time.Millisecond)
			continue
		}
		total.Conns++
		total.Sent += r.Sent
		total.Received += r.Received
		if !r.Intact || r.Error != "" {
			total.Intact = false
		}
		if r.Error != "" {
			total.Broken++
		}
		if r.Corrupt {
			total.Corrupt = true
		}
	}
	total.Conn = -1
	total.SentSHA = hex.EncodeToString(hs.Sum(nil))
	total.RecvSHA = hex.EncodeToString(hr.Sum(nil))
	total.Intact = total.Intact && total.Conns > 0 && total.SentSHA == total.RecvSHA && total.Sent == total.Received
	print(total)
	return nil
}

// oneConn streams over one connection until connTime is up or ctx is
// done, then half-closes and reads the rest of the echo. Every byte read
// is compared with what was sent; hs and hr add up the whole run.
func oneConn(ctx context.Context, i int, target string, connTime time.Duration, chunk, rate int, hs, hr hash.Hash) connResult {
	r := connResult{Conn: i, Remote: target, Start: time.Now().UTC().Format(time.RFC3339Nano), Intact: true}
	start := time.Now()
	c, err := net.DialTimeout("tcp4", target, 3*time.Second)
	if err != nil {
		r.Error = err.Error()
		r.Intact = false
		return r
	}
	defer c.Close()
	r.Connected = true
	r.Local = c.LocalAddr().String()
	seed := uint64(time.Now().UnixNano())
	sendStream, checkStream := &stream{seed: seed}, &stream{seed: seed}
	cs, cr := sha256.New(), sha256.New()
	readDone := make(chan error, 1)
	var mismatch atomic.Bool
	go func() {
		buf := make([]byte, 64<<10)
		want := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				checkStream.fill(want[:n])
				if string(want[:n]) != string(buf[:n]) {
					mismatch.Store(true)
				}
				cr.Write(buf[:n])
				hr.Write(buf[:n])
				atomic.AddInt64(&r.Received, int64(n))
			}
			if err != nil {
				if err == io.EOF {
					err = nil
				}
				readDone <- err
				return
			}
		}
	}()
	buf := make([]byte, chunk)
	var deadline <-chan time.Time
	if connTime > 0 {
		deadline = time.After(connTime)
	}
	var tick <-chan time.Time
	if rate > 0 {
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		tick = t.C
	}
	perTick := rate / 100
	budget := 0
write:
	for {
		select {
		case <-ctx.Done():
			break write
		case <-deadline:
			break write
		default:
		}
		if tick != nil && budget < len(buf) {
			select {
			case <-ctx.Done():
				break write
			case <-deadline:
				break write
			case <-tick:
				budget += perTick
			}
			continue
		}
		sendStream.fill(buf)
		n, err := c.Write(buf)
		cs.Write(buf[:n])
		hs.Write(buf[:n])
		r.Sent += int64(n)
		budget -= n
		if err != nil {
			r.Error = "write: " + err.Error()
			break
		}
	}
	closeWrite(c)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if err := <-readDone; err != nil && r.Error == "" {
		r.Error = "read: " + err.Error()
	}
	r.Received = atomic.LoadInt64(&r.Received)
	r.Seconds = time.Since(start).Seconds()
	r.SentSHA = hex.EncodeToString(cs.Sum(nil))
	r.RecvSHA = hex.EncodeToString(cr.Sum(nil))
	r.Corrupt = mismatch.Load()
	if r.Corrupt || r.SentSHA != r.RecvSHA || r.Sent != r.Received {
		r.Intact = false
	}
	return r
}

func sidecar(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("sidecar", flag.ExitOnError)
	port := fs.Int("port", 15001, "outbound port")
	fs.Parse(args)
	l, err := listen(ctx, *port)
	if err != nil {
		return err
	}
	fmt.Printf("{\"sidecar\":%d,\"uid\":%d}\n", *port, os.Getuid())
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go relay(c.(*net.TCPConn))
	}
}

// relay connects where the app was going and copies both ways.
func relay(c *net.TCPConn) {
	defer c.Close()
	dst, err := origDst(c)
	if err != nil {
		fmt.Printf("{\"error\":\"SO_ORIGINAL_DST: %v\"}\n", err)
		return
	}
	up, err := net.DialTimeout("tcp4", dst.String(), 3*time.Second)
	if err != nil {
		fmt.Printf("{\"error\":\"dial %s: %v\"}\n", dst, err)
		return
	}
	defer up.Close()
	fmt.Printf("{\"relay\":%q,\"from\":%q}\n", dst.String(), c.RemoteAddr().String())
	done := make(chan struct{})
	go func() { copyPlain(up, c); closeWrite(up); close(done) }()
	copyPlain(c, up)
	closeWrite(c)
	<-done
}

// origDst asks the accepted socket where the app was going
// (SO_ORIGINAL_DST, a struct sockaddr_in).
func origDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var errno unix.Errno
	buf := make([]byte, 16)
	rc.Control(func(fd uintptr) {
		n := uint32(len(buf))
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IP, unix.SO_ORIGINAL_DST,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	})
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), binary.BigEndian.Uint16(buf[2:4])), nil
}
