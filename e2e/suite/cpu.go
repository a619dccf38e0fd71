package suite

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, the unit of /proc/stat (100 on Linux).
const clockTicks = 100

// cpuBusy returns the CPU seconds all CPUs spent busy (user, nice, system,
// irq, softirq, steal) since boot, from /proc/stat. Differences of two
// readings give the CPU a run cost the machine, softirq work included,
// which per-process accounting misses.
func cpuBusy() (float64, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(data), "\n")
	fields := strings.Fields(line)
	if len(fields) < 9 || fields[0] != "cpu" {
		return 0, fmt.Errorf("unexpected /proc/stat: %q", line)
	}
	var busy uint64
	// user nice system idle iowait irq softirq steal
	for _, i := range []int{1, 2, 3, 6, 7, 8} {
		v, err := strconv.ParseUint(fields[i], 10, 64)
		if err != nil {
			return 0, err
		}
		busy += v
	}
	return float64(busy) / clockTicks, nil
}
