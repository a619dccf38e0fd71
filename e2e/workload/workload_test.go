package workload

import (
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// readGoSockopts returns the values of goSockopts on fd, read back with
// getsockopt, in goSockopts' order.
func readGoSockopts(fd int) ([]int, error) {
	var vals []int
	for _, o := range goSockopts {
		v, err := unix.GetsockoptInt(fd, o.level, o.opt)
		if err != nil {
			return nil, fmt.Errorf("getsockopt %s: %w", o.name, err)
		}
		vals = append(vals, v)
	}
	return vals, nil
}

// TestConnRateGoSockopts: with GoSockopts, both ends of every connection
// of ConnRateWith carry Go's options (read back with getsockopt before any
// byte is exchanged); without, TCP_NODELAY and SO_KEEPALIVE stay off, as
// the kernel makes a socket. Non-blocking and blocking sockets alike.
func TestConnRateGoSockopts(t *testing.T) {
	for _, blocking := range []bool{false, true} {
		for _, goOpts := range []bool{false, true} {
			t.Run(fmt.Sprintf("blocking=%v,go-sockopts=%v", blocking, goOpts), func(t *testing.T) {
				checked := 0
				check := func(cfd, sfd int) error {
					for _, end := range []struct {
						name string
						fd   int
					}{{"client", cfd}, {"server", sfd}} {
						vals, err := readGoSockopts(end.fd)
						if err != nil {
							return fmt.Errorf("%s: %w", end.name, err)
						}
						for i, o := range goSockopts {
							if goOpts && vals[i] != o.value {
								return fmt.Errorf("%s: %s is %d, want %d", end.name, o.name, vals[i], o.value)
							}
						}
						// goSockopts[0] is TCP_NODELAY, [1] SO_KEEPALIVE.
						if !goOpts && (vals[0] != 0 || vals[1] != 0) {
							return fmt.Errorf("%s: TCP_NODELAY %d, SO_KEEPALIVE %d without GoSockopts, want both 0", end.name, vals[0], vals[1])
						}
					}
					checked++
					return nil
				}
				res, err := ConnRateWith(ConnRateOpts{Size: 64, CPU: -1, Blocking: blocking, GoSockopts: goOpts, checkConn: check}, 50*time.Millisecond)
				if err != nil {
					t.Fatal(err)
				}
				if checked == 0 || checked != res.Connections {
					t.Fatalf("checked %d connections of %d", checked, res.Connections)
				}
				t.Logf("%d connections, %.0f/s", res.Connections, res.Rate)
			})
		}
	}
}
