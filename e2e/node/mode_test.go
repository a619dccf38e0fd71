package node

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// How TestNode runs, from the environment. On this host (make node-e2e)
// none of these is set. The qemu guest of make node-e2e-systemd
// (e2e/node/guest) sets them all:
//
//	SOCKBYPASS_NODE_CGROUP_DRIVER=systemd  the kubelet's cgroupDriver and
//	    containerd's SystemdCgroup, in the machine's own mount namespace
//	    and cgroup tree (see package cluster)
//	SOCKBYPASS_NODE_TIME_SCALE=N           every timeout and client
//	    duration times N (a guest under TCG is several times slower)
//	SOCKBYPASS_NODE_PREBUILT=DIR           sockbypass, nodeapp and
//	    cni-bin/{bridge,host-local,loopback} built on the host (the
//	    guest has no Go toolchain)
const (
	envCgroupDriver = "SOCKBYPASS_NODE_CGROUP_DRIVER"
	envTimeScale    = "SOCKBYPASS_NODE_TIME_SCALE"
	envPrebuilt     = "SOCKBYPASS_NODE_PREBUILT"
)

// timeScale multiplies the test's timeouts and its clients' durations.
var timeScale = 1

// readTimeScale sets timeScale from the environment.
func readTimeScale() error {
	v := os.Getenv(envTimeScale)
	if v == "" {
		return nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		return fmt.Errorf("%s=%q: want a whole number >= 1", envTimeScale, v)
	}
	timeScale = n
	return nil
}

// scaled is d times timeScale.
func scaled(d time.Duration) time.Duration { return d * time.Duration(timeScale) }

// secs is n seconds times timeScale, as a client's -duration.
func secs(n int) string { return strconv.Itoa(n*timeScale) + "s" }

// cgroupDriver is the driver the node runs with: "cgroupfs" or "systemd".
func cgroupDriver() string {
	if os.Getenv(envCgroupDriver) == "systemd" {
		return "systemd"
	}
	return "cgroupfs"
}

// uidInPath reports whether a cgroup path names the pod of uid: as
// pod<uid> (cgroupfs) or pod<uid with underscores>.slice (systemd).
func uidInPath(path string, uid types.UID) bool {
	return strings.Contains(path, string(uid)) || strings.Contains(path, strings.ReplaceAll(string(uid), "-", "_"))
}
