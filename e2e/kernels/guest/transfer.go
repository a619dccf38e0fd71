package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
	"golang.org/x/sys/unix"
)

// cgroupFigures are the fields of `sockbypass stats --json` this reads.
type cgroupFigures struct {
	Path             string `json:"path"`
	LiveSockets      int    `json:"live_sockets"`
	RedirectedBytes  uint64 `json:"redirected_bytes"`
	RedirectedMsgs   uint64 `json:"redirected_msgs"`
	StackEgressBytes uint64 `json:"stack_egress_bytes"`
	PassedBytes      uint64 `json:"passed_bytes"`
	SocketsInserted  uint64 `json:"sockets_inserted"`
	SocketsBlocking  uint64 `json:"sockets_blocking"`
	SocketsUnpaired  uint64 `json:"sockets_unpaired"`
	PairsAbandoned   uint64 `json:"pairs_abandoned"`
	LateStackOptions uint64 `json:"late_stack_options"`
	MembersLeft      uint64 `json:"members_left"`
}

// readStats runs `sockbypass stats --json` and returns cg's figures.
func readStats(bin, cg string) (*cgroupFigures, error) {
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "stats", "--json")
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		line, _, _ := strings.Cut(strings.TrimSpace(stderr.String()), "\n")
		return nil, fmt.Errorf("stats --json: %v: %s", err, line)
	}
	var doc struct {
		Cgroups []cgroupFigures `json:"cgroups"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("stats --json: %w", err)
	}
	for _, c := range doc.Cgroups {
		if filepath.Clean(c.Path) == filepath.Clean(cg) {
			return &c, nil
		}
	}
	return nil, fmt.Errorf("stats --json: cgroup %s not listed", cg)
}

func transferLine(format string, args ...any) {
	fmt.Printf("KMATRIX transfer "+format+"\n", args...)
}

// runTransfer joins cg, echoes size bytes over a loopback connection made
// with Go's (non-blocking) sockets, compares sha256 of what was sent and
// what came back, and reports the counters sockbypass moved meanwhile.
func runTransfer(cg, bin string, size int) error {
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
		return fmt.Errorf("join cgroup %s: %w", cg, err)
	}
	before, statsErr := readStats(bin, cg)
	if statsErr != nil {
		transferLine("stats=unavailable error=%s", value(statsErr.Error()))
	}

	data := make([]byte, size)
	rand.NewChaCha8([32]byte{'k', 'm', 'a', 't', 'r', 'i', 'x'}).Read(data)
	start := time.Now()
	got, err := echo(data)
	secs := time.Since(start).Seconds()
	sent, back := sha256.Sum256(data), sha256.Sum256(got)
	verdict := "ok"
	if sent != back {
		verdict = "MISMATCH"
	}
	transferLine("bytes=%d received=%d sha256=%s secs=%.2f", size, len(got), verdict, secs)
	transferLine("sha256_sent=%x sha256_received=%x", sent, back)
	if err != nil {
		transferLine("error=%s", value(err.Error()))
	}

	if statsErr == nil {
		after, err := readStats(bin, cg)
		if err != nil {
			transferLine("stats=unavailable error=%s", value(err.Error()))
		} else {
			transferLine("redirected_bytes=%d redirected_msgs=%d stack_egress_bytes=%d passed_bytes=%d sockets_inserted=%d pairs_abandoned=%d sockets_unpaired=%d sockets_blocking=%d",
				after.RedirectedBytes-before.RedirectedBytes, after.RedirectedMsgs-before.RedirectedMsgs,
				after.StackEgressBytes-before.StackEgressBytes, after.PassedBytes-before.PassedBytes,
				after.SocketsInserted-before.SocketsInserted, after.PairsAbandoned-before.PairsAbandoned,
				after.SocketsUnpaired-before.SocketsUnpaired, after.SocketsBlocking-before.SocketsBlocking)
		}
		b, _ := readStats(bin, cg)
		v := fionreadSockbypass()
		if a, err := readStats(bin, cg); err == nil && b != nil {
			v += fmt.Sprintf(" redirected_bytes=%d", a.RedirectedBytes-b.RedirectedBytes)
		}
		report("fionread_sockbypass_member", v)
		// The server side first: the client probe teaches sockbypass that
		// this process uses kernel TLS, which keeps its later connections
		// plain.
		b, _ = readStats(bin, cg)
		v = ktlsSockbypassServer()
		if a, err := readStats(bin, cg); err == nil && b != nil {
			v += fmt.Sprintf(" redirected_bytes=%d late_stack_options=%d", a.RedirectedBytes-b.RedirectedBytes, a.LateStackOptions-b.LateStackOptions)
		}
		report("ktls_sockbypass_server", v)
		b, _ = readStats(bin, cg)
		v = ktlsSockbypass()
		if a, err := readStats(bin, cg); err == nil && b != nil {
			v += fmt.Sprintf(" redirected_bytes=%d late_stack_options=%d members_left=%d",
				a.RedirectedBytes-b.RedirectedBytes, a.LateStackOptions-b.LateStackOptions, a.MembersLeft-b.MembersLeft)
		}
		report("ktls_sockbypass", v)
		report("stack_bytes_sockbypass", stackBytesSockbypass(bin, cg))
	} else {
		report("stack_bytes_sockbypass", "n/a: sockbypass not installed")
		report("fionread_sockbypass_member", "n/a: sockbypass not installed")
		report("ktls_sockbypass_server", "n/a: sockbypass not installed")
		report("ktls_sockbypass", "n/a: sockbypass not installed")
	}
	if err != nil || verdict != "ok" {
		return fmt.Errorf("transfer failed: sha256 %s, %v", verdict, err)
	}
	return nil
}

// accepted listens on loopback, dials, and returns both ends once the
// server has accepted (so the client never writes before its server side
// is established).
func accepted() (client, server *net.TCPConn, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	defer ln.Close()
	return acceptedOn(ln)
}

// acceptedOn dials ln and returns both ends once ln has accepted.
func acceptedOn(ln net.Listener) (client, server *net.TCPConn, err error) {
	type res struct {
		c   net.Conn
		err error
	}
	acc := make(chan res, 1)
	go func() { c, err := ln.Accept(); acc <- res{c, err} }()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err != nil {
		return nil, nil, err
	}
	select {
	case r := <-acc:
		if r.err != nil {
			c.Close()
			return nil, nil, r.err
		}
		return c.(*net.TCPConn), r.c.(*net.TCPConn), nil
	case <-time.After(5 * time.Second):
		c.Close()
		return nil, nil, errors.New("accept timed out")
	}
}

// echo sends data to an echo server and returns what came back (see
// internal/testutil/transfer: both ends read and write with Read/Write,
// never io.Copy between two TCPConns, which splices).
func echo(data []byte) ([]byte, error) {
	client, server, err := accepted()
	if err != nil {
		return nil, err
	}
	defer client.Close()
	server.SetDeadline(time.Now().Add(60 * time.Second))
	srvErr := make(chan error, 1)
	go func() { srvErr <- transfer.Echo(server) }()
	got, err := transfer.Exchange(client, data, transfer.Options{WriteSize: 64 << 10})
	return got, errors.Join(err, <-srvErr)
}

// fionreadSockbypass asks FIONREAD on the server end of a fresh connection
// of the enabled cgroup after the client wrote probeBytes (redirected when
// the pair joined).
func fionreadSockbypass() string {
	client, server, err := accepted()
	if err != nil {
		return "error: " + err.Error()
	}
	defer client.Close()
	defer server.Close()
	if _, err := client.Write(make([]byte, probeBytes)); err != nil {
		return "error: write: " + err.Error()
	}
	craw, err := client.SyscallConn()
	if err != nil {
		return "error: " + err.Error()
	}
	craw.Control(func(fd uintptr) { waitDelivered(int(fd)) })
	raw, err := server.SyscallConn()
	if err != nil {
		return "error: " + err.Error()
	}
	var out string
	raw.Control(func(fd uintptr) { out = fionreadAfterWrite(int(fd), probeBytes) })
	return out
}

// ktlsSockbypass: a fresh connection of the enabled cgroup (Go's
// non-blocking sockets, so sockbypass pairs them) first exchanges a request
// and a reply in the clear (as a TLS handshake in user space would), then
// the client sets TCP_ULP "tls" and TLS_TX and writes ktlsPlaintext; the
// server reads what arrives. When TLS_TX fails (a member), it retries once
// the pair dissolved. Then a next connection of the same process does the
// same: the client's TCP_ULP taught sockbypass that its process uses
// kernel TLS, so it stays plain TCP and TLS_TX works at once.
func ktlsSockbypass() string {
	client, server, err := accepted()
	if err != nil {
		return "error: " + err.Error()
	}
	out := ktlsOnConn(client, server, true)
	client.Close()
	server.Close()
	client, server, err = accepted()
	if err != nil {
		return out + " | next: error: " + err.Error()
	}
	defer client.Close()
	defer server.Close()
	return out + " | next: " + ktlsOnConn(client, server, false)
}

// ktlsSockbypassServer: the server side sets up kernel TLS, on two
// connections accepted by one listener of the enabled cgroup. The first
// pairs (TLS_TX fails on a member); its TCP_ULP taught sockbypass that the
// listener's accepted sockets use kernel TLS, so the second stays plain
// and TLS_TX works.
func ktlsSockbypassServer() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "error: " + err.Error()
	}
	defer ln.Close()
	var out []string
	for i := 0; i < 2; i++ {
		client, server, err := acceptedOn(ln)
		if err != nil {
			return strings.Join(append(out, "error: "+err.Error()), " | ")
		}
		out = append(out, ktlsOnConn(server, client, false))
		client.Close()
		server.Close()
	}
	return "first: " + out[0] + " | next: " + out[1]
}

// ktlsOnConn exchanges ping and pong in the clear, then sender sets up
// kernel TLS and writes ktlsPlaintext, and what receiver reads is
// described. With retry, a failed TLS_TX is tried again once the
// plaintext went through.
func ktlsOnConn(sender, receiver *net.TCPConn, retry bool) string {
	receiver.SetDeadline(time.Now().Add(10 * time.Second))
	sender.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 4)
	if _, err := sender.Write([]byte("ping")); err != nil {
		return "error: write ping: " + err.Error()
	}
	if _, err := io.ReadFull(receiver, buf); err != nil {
		return "error: read ping: " + err.Error()
	}
	if _, err := receiver.Write([]byte("pong")); err != nil {
		return "error: write pong: " + err.Error()
	}
	if _, err := io.ReadFull(sender, buf); err != nil {
		return "error: read pong: " + err.Error()
	}
	read := func(b []byte) (int, error) {
		receiver.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err := receiver.Read(b)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			err = errors.New("timeout")
		case errors.Is(err, io.EOF):
			err = errors.New("EOF")
		}
		return n, err
	}
	raw, err := sender.SyscallConn()
	if err != nil {
		return "error: " + err.Error()
	}
	var out string
	raw.Control(func(fd uintptr) {
		out = ktlsExchange(int(fd), read, ktlsProbeSteps{})
		if !retry || !strings.Contains(out, "tls_tx=") || strings.Contains(out, "tls_tx=ok") {
			return
		}
		// TLS_TX failed: once the plaintext went through the stack (the
		// pair dissolved, the sockets left the sockhash), try again.
		err := ktlsSetTX(int(fd))
		out += " | retry tls_tx=" + stepResult(err)
		if err != nil {
			return
		}
		if n, err := unix.Write(int(fd), []byte(ktlsPlaintext)); err != nil {
			out += " write=" + errnoName(err)
		} else {
			out += fmt.Sprintf(" write=%d %s", n, ktlsDescribe(read))
		}
	})
	return out
}

// stackBytesSockbypass sends up bytes one way and down the other over a
// connection of the enabled cgroup made with blocking sockets (which stay
// plain TCP), and reports the cgroup's stack bytes from `stats --json`
// while it is open (sampled from the sockets' tcp_info) and after both
// ends closed (counted by the cgroup/sock_release program): both must be
// what was written.
func stackBytesSockbypass(bin, cg string) string {
	const up, down = 300007, 70001
	lfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "error: " + err.Error()
	}
	defer unix.Close(lfd)
	if err := unix.Bind(lfd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return "error: " + err.Error()
	}
	if err := unix.Listen(lfd, 4); err != nil {
		return "error: " + err.Error()
	}
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		return "error: " + err.Error()
	}
	cfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "error: " + err.Error()
	}
	if err := unix.Connect(cfd, sa); err != nil {
		unix.Close(cfd)
		return "error: " + err.Error()
	}
	sfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
	if err != nil {
		unix.Close(cfd)
		return "error: " + err.Error()
	}
	before, err := readStats(bin, cg)
	if err != nil {
		unix.Close(cfd)
		unix.Close(sfd)
		return "error: " + err.Error()
	}
	xfer := func(w, r, n int) error {
		errc := make(chan error, 1)
		go func() {
			buf := make([]byte, 64<<10)
			for got := 0; got < n; {
				k, err := unix.Read(r, buf)
				if err != nil || k == 0 {
					errc <- fmt.Errorf("read after %d bytes: %v", got, err)
					return
				}
				got += k
			}
			errc <- nil
		}()
		buf := make([]byte, 64<<10)
		for left := n; left > 0; {
			k, err := unix.Write(w, buf[:min(left, len(buf))])
			if err != nil {
				return err
			}
			left -= k
		}
		return <-errc
	}
	if err := errors.Join(xfer(cfd, sfd, up), xfer(sfd, cfd, down)); err != nil {
		unix.Close(cfd)
		unix.Close(sfd)
		return "error: " + err.Error()
	}
	open, err := readStats(bin, cg)
	var warn bytes.Buffer
	cmd := exec.Command(bin, "stats", "--json")
	cmd.Stderr = &warn
	cmd.Run()
	unix.Close(cfd)
	unix.Close(sfd)
	if err != nil {
		return "error: " + err.Error()
	}
	closed, err := readStats(bin, cg)
	if err != nil {
		return "error: " + err.Error()
	}
	v := fmt.Sprintf("written=%d open=%d closed=%d", up+down, open.StackEgressBytes-before.StackEgressBytes, closed.StackEgressBytes-before.StackEgressBytes)
	if w := strings.TrimSpace(warn.String()); w != "" {
		line, _, _ := strings.Cut(w, "\n")
		v += " stats_warning=" + line
	}
	return v
}
