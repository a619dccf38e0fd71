package dataplane

import (
	"crypto/sha256"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
	"github.com/sockbypass/sockbypass/sockops"
)

// redirectSome sends n bytes and their digest back over a joined pair of cg.
func redirectSome(t *testing.T, dp *Dataplane, cg cgroup.Cgroup, n int) {
	t.Helper()
	c, srv := joinedPair(t, dp, cg)
	go transfer.Digest(srv)
	if err := transfer.DigestRoundTrip(c, transfer.Pattern(3, n), transfer.Options{Timeout: 10 * time.Second}); err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// TestSlotsKeepCgroupsApart: two enabled cgroups get two slots, each
// cgroup's bytes are counted in its own, and a disabled cgroup keeps its
// slot and counters, which continue when it is enabled again.
func TestSlotsKeepCgroupsApart(t *testing.T) {
	dp := install(t)
	a := enabledCgroup(t, dp)
	b := enabledCgroup(t, dp)
	slotA, okA, errA := dp.slotOf(a.ID)
	slotB, okB, errB := dp.slotOf(b.ID)
	if errA != nil || errB != nil || !okA || !okB || slotA == 0 || slotB == 0 || slotA == slotB {
		t.Fatalf("slots: a %d (%v, %v), b %d (%v, %v); want two distinct non-zero slots", slotA, okA, errA, slotB, okB, errB)
	}

	st, err := dp.Status()
	if err != nil {
		t.Fatal(err)
	}
	for _, cs := range st.Cgroups {
		if want := map[uint64]uint32{a.ID: slotA, b.ID: slotB}[cs.ID]; cs.Slot != want {
			t.Errorf("status shows cgroup id %d in slot %d, want %d", cs.ID, cs.Slot, want)
		}
	}

	const n = 100 << 10
	redirectSome(t, dp, a, n)
	want := uint64(n + sha256.Size)
	if got := counterOf(t, dp, a.ID).RedirectedBytes; got != want {
		t.Errorf("cgroup a redirected %d bytes, want %d", got, want)
	}
	if got := counterOf(t, dp, b.ID); got != (CgroupCounters{}) {
		t.Errorf("cgroup b counted a's traffic: %+v", got)
	}

	if _, err := dp.Disable(a.ID); err != nil {
		t.Fatal(err)
	}
	if got := counterOf(t, dp, a.ID).RedirectedBytes; got != want {
		t.Errorf("after disable, cgroup a shows %d redirected bytes, want its %d", got, want)
	}
	if _, err := dp.Enable(a, EnableOptions{NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	if again, _, _ := dp.slotOf(a.ID); again != slotA {
		t.Errorf("enabled again, cgroup a has slot %d, want its slot %d", again, slotA)
	}
	redirectSome(t, dp, a, n)
	if got := counterOf(t, dp, a.ID).RedirectedBytes; got != 2*want {
		t.Errorf("enabled again, cgroup a shows %d redirected bytes, want %d (its counters continue)", got, 2*want)
	}
}

// fillSlots gives every free slot to a made-up cgroup id (disabled, no live
// socket) whose counters are not zero, and returns those ids.
func fillSlots(t *testing.T, dp *Dataplane) map[uint64]uint32 {
	t.Helper()
	taken, err := dp.slots()
	if err != nil {
		t.Fatal(err)
	}
	used := map[uint32]bool{}
	for _, s := range taken {
		used[s] = true
	}
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	dirty := make([]sockops.CgroupCounters, cpus)
	for i := range dirty {
		dirty[i].RedirectedBytes = 12345
	}
	fake := map[uint64]uint32{}
	for s := uint32(1); s < dp.maps[PinCounters].MaxEntries(); s++ {
		if used[s] {
			continue
		}
		id := uint64(1)<<62 + uint64(s)
		if err := dp.maps[PinCgroupSlots].Put(id, s); err != nil {
			t.Fatal(err)
		}
		if err := dp.maps[PinCounters].Put(s, dirty); err != nil {
			t.Fatal(err)
		}
		fake[id] = s
	}
	return fake
}

// TestSlotTakenBackFromADisabledCgroup: when every slot is in use, enabling
// a cgroup takes the slot of a disabled cgroup with no live socket, and
// starts it from zero; when every slot belongs to an enabled cgroup, enable
// fails and says what to do.
func TestSlotTakenBackFromADisabledCgroup(t *testing.T) {
	dp := install(t)
	fake := fillSlots(t, dp)

	cg := enabledCgroup(t, dp)
	slot, ok, err := dp.slotOf(cg.ID)
	if err != nil || !ok || slot == 0 {
		t.Fatalf("slot of the new cgroup: %d, %v, %v", slot, ok, err)
	}
	taken, err := dp.slots()
	if err != nil {
		t.Fatal(err)
	}
	for id, s := range taken {
		if s == slot && id != cg.ID {
			t.Errorf("slot %d is still held by cgroup id %d as well", slot, id)
		}
	}
	if got := counterOf(t, dp, cg.ID); got != (CgroupCounters{}) {
		t.Errorf("a taken-back slot starts with counters %+v, want zero", got)
	}
	redirectSome(t, dp, cg, 1000)
	if got := counterOf(t, dp, cg.ID).RedirectedBytes; got != 1000+sha256.Size {
		t.Errorf("redirected %d bytes in the taken-back slot, want %d", got, 1000+sha256.Size)
	}

	// Every slot held by an "enabled" cgroup: the made-up ids get a
	// cgroups/<id> entry, which is what marks a cgroup enabled.
	for id := range fake {
		dir := pinPath(dp.pinDir, DirCgroups, strconv.FormatUint(id, 10))
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(dir) })
	}
	other := testutil.NewCgroup(t)
	_, err = dp.Enable(other, EnableOptions{NoProbation: true})
	if err == nil || !strings.Contains(err.Error(), other.Path) || !strings.Contains(err.Error(), "slots are in use") || !strings.Contains(err.Error(), "disable a cgroup") {
		t.Fatalf("enable with every slot in use: %v; want an error naming the cgroup, saying the slots are in use and to disable a cgroup", err)
	}
	if _, ok, _ := dp.slotOf(other.ID); ok {
		t.Error("the refused cgroup holds a slot")
	}
	if _, err := os.Stat(dp.cgroupLinkPin(other.ID)); !os.IsNotExist(err) {
		t.Errorf("the refused cgroup has a sock_ops link pin (%v)", err)
	}
}
