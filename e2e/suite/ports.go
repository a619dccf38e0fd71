package suite

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// freePort returns a TCP port that is free on ip in netns (the kernel picks
// it from the ephemeral range).
func freePort(netns ns.NetNS, ip string) (int, error) {
	var port int
	err := netns.Do(func(ns.NetNS) error {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
		if err != nil {
			return err
		}
		port = l.Addr().(*net.TCPAddr).Port
		return l.Close()
	})
	if err != nil {
		return 0, fmt.Errorf("pick a free port on %s: %w", ip, err)
	}
	return port, nil
}

// startListening starts the server that spec describes and waits until it
// listens on port (see waitListening); on failure it stops the server and
// returns the error.
func startListening(ctx context.Context, spec procSpec, port int) (*proc, error) {
	p, err := start(spec)
	if err != nil {
		return nil, err
	}
	if err := waitListening(ctx, p, port); err != nil {
		p.stop()
		return nil, err
	}
	return p, nil
}

// waitListening waits until a socket listens on port in the network
// namespace of p, reading /proc/PID/net/tcp{,6}: no probe connection
// disturbs the server.
func waitListening(ctx context.Context, p *proc, port int) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	want := fmt.Sprintf(":%04X ", port)
	for {
		if p.exited() {
			return fmt.Errorf("%s exited before listening on %d: %s", p.name, port, tail(p.output(), 2000))
		}
		for _, f := range []string{"tcp", "tcp6"} {
			data, _ := os.ReadFile("/proc/" + strconv.Itoa(p.cmd.Process.Pid) + "/net/" + f)
			for _, line := range strings.Split(string(data), "\n") {
				fields := strings.Fields(line)
				if len(fields) > 3 && strings.HasSuffix(fields[1]+" ", want) && fields[3] == "0A" {
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s does not listen on port %d: %w; output: %s", p.name, port, ctx.Err(), tail(p.output(), 2000))
		case <-time.After(20 * time.Millisecond):
		}
	}
}
