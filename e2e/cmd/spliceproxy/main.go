// Command spliceproxy is the minimal Go TCP proxy of the e2e tests: for
// each client it dials the upstream and copies both ways with io.Copy,
// which splices between two TCP connections on Linux (the reader that
// cannot see redirected bytes; see "Go io.Copy TCP->TCP proxy" in
// internal/semantics). It prints "LISTENING port" once it listens.
//
//	spliceproxy LISTEN_ADDR UPSTREAM_ADDR
package main

import (
	"fmt"
	"io"
	"net"
	"os"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: spliceproxy LISTEN_ADDR UPSTREAM_ADDR")
		os.Exit(2)
	}
	l, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "spliceproxy:", err)
		os.Exit(1)
	}
	fmt.Printf("LISTENING %d\n", l.Addr().(*net.TCPAddr).Port)
	for {
		c, err := l.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "spliceproxy: accept:", err)
			os.Exit(1)
		}
		go proxy(c.(*net.TCPConn), os.Args[2])
	}
}

// proxy copies between the client and a new connection to upstream until
// both directions reached EOF.
func proxy(client *net.TCPConn, upstream string) {
	defer client.Close()
	u, err := net.Dial("tcp", upstream)
	if err != nil {
		fmt.Fprintln(os.Stderr, "spliceproxy: dial:", err)
		return
	}
	up := u.(*net.TCPConn)
	defer up.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(up, client) // splice(2)
		up.CloseWrite()
		close(done)
	}()
	io.Copy(client, up)
	client.CloseWrite()
	<-done
}
