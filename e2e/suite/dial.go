package suite

import (
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// cgroupMoveMu serialises moving this process between cgroups.
var cgroupMoveMu sync.Mutex

// dialAs opens a TCP connection to addr as a client of rc would: from the
// client network namespace, with the socket created while this process is
// in the mode's cgroup, so it takes the same path as the programs of that
// mode (accelerated or not).
func dialAs(rc *runContext, addr string) (net.Conn, error) {
	cgroupMoveMu.Lock()
	defer cgroupMoveMu.Unlock()
	var conn net.Conn
	err := rc.topo.Client.Do(func(ns.NetNS) error {
		var dialErr error
		moveErr := rc.mode.Cgroup.RunIn(func() {
			conn, dialErr = net.DialTimeout("tcp", addr, 5*time.Second)
		})
		if moveErr != nil {
			if conn != nil {
				conn.Close()
			}
			return moveErr
		}
		return dialErr
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s from the %s cgroup: %w", addr, rc.mode.Label(), err)
	}
	return conn, nil
}
