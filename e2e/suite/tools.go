package suite

import (
	"fmt"
	"os/exec"
	"strings"
)

// Tools are the external programs the suite drives (scripts/install-deps.sh
// installs them).
var Tools = []string{"sockperf", "iperf3", "wrk", "nginx", "redis-server", "redis-benchmark", "redis-cli", "taskset"}

// CheckTools returns an error naming every program of Tools that is not on
// PATH.
func CheckTools() error {
	var missing []string
	for _, t := range Tools {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("programs not found on PATH: %s (make deps installs them)", strings.Join(missing, ", "))
	}
	return nil
}
