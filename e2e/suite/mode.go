package suite

import (
	"os"

	"github.com/sockbypass/sockbypass/cgroup"
)

// Mode is one side of a comparison: the cgroup both ends of a workload run
// in, enabled (accelerated) or not (plain).
type Mode struct {
	// Name is "plain" or "accel".
	Name string
	// Accelerated is true when Cgroup is enabled.
	Accelerated bool
	// Cgroup is where the programs of this mode run.
	Cgroup cgroup.Cgroup

	dir *os.File
}

// Label is the column name of the mode in reports.
func (m *Mode) Label() string {
	if m.Accelerated {
		return "accelerated"
	}
	return "plain"
}
