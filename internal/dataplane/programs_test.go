package dataplane

import (
	"os"
	"testing"
)

// TestStatusWalksTheProgramTable: status lists every program of the table
// that the cgroup's mode attaches, with its ids and pin; re-enabling in
// another mode attaches or detaches the sidecar rows, account-only swaps
// the accounting rows, and disable leaves none of them.
func TestStatusWalksTheProgramTable(t *testing.T) {
	dp := install(t)
	cg := enabledCgroup(t, dp)
	// check: status lists exactly the rows that apply to cfg, in the
	// table's order.
	check := func(mode string, cfg cgroupConfig) {
		t.Helper()
		var want []string
		for _, p := range cgroupPrograms {
			if p.appliesTo(cfg) {
				want = append(want, p.What)
			}
		}
		st, err := dp.Status()
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Cgroups) != 1 || len(st.Cgroups[0].Programs) != len(want) {
			t.Fatalf("%s: status cgroups %+v, want one with the programs %q", mode, st.Cgroups, want)
		}
		seen := map[uint32]bool{}
		for i, p := range st.Cgroups[0].Programs {
			if p.Program != want[i] || p.ProgramID == 0 || p.LinkID == 0 || seen[p.ProgramID] {
				t.Errorf("%s: program %d: %+v, want %s with ids of its own", mode, i, p, want[i])
			}
			seen[p.ProgramID] = true
			if _, err := os.Stat(p.Pin); err != nil {
				t.Errorf("%s: %s: pin %v", mode, p.Program, err)
			}
		}
		if p := st.Cgroups[0].Programs[0]; p.ProgramID != st.Cgroups[0].SockOpsProgramID || p.LinkID != st.Cgroups[0].LinkID {
			t.Errorf("%s: first program %+v, want the sock_ops program %d (link %d)", mode, p, st.Cgroups[0].SockOpsProgramID, st.Cgroups[0].LinkID)
		}
	}
	check("accelerate", cgroupConfig{})

	mesh := MeshPresets["istio"]
	mesh.Intercept = true
	if _, err := dp.Enable(cg, EnableOptions{Mesh: &mesh}); err != nil {
		t.Fatal(err)
	}
	check("sidecar mode", cgroupConfig{MeshMode: MeshIntercept})

	// Account-only swaps the accounting rows: per packet (egress, which
	// also counts would_redirect_bytes), not at close.
	if _, err := dp.Enable(cg, EnableOptions{AccountOnly: true}); err != nil {
		t.Fatal(err)
	}
	check("account-only", cgroupConfig{Flags: cgroupAccountOnly})

	if _, err := dp.Enable(cg, EnableOptions{}); err != nil {
		t.Fatal(err)
	}
	check("accelerate again", cgroupConfig{})

	if _, err := dp.Disable(cg.ID); err != nil {
		t.Fatal(err)
	}
	st, err := dp.Status()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Cgroups) != 0 {
		t.Errorf("after disable: cgroups %+v", st.Cgroups)
	}
	for _, p := range cgroupPrograms {
		if _, err := os.Stat(dp.cgroupPin(cg.ID, p)); !os.IsNotExist(err) {
			t.Errorf("after disable: the %s pin: %v, want none", p.What, err)
		}
	}
}
