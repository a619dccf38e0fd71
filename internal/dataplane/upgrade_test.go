package dataplane

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// TestUpgradeDuringTransfers replaces every program while connections
// stream: no byte is lost, no connection is reset, counters continue, and
// the new programs accelerate new connections.
func TestUpgradeDuringTransfers(t *testing.T) {
	dp := install(t)
	netns := testutil.NewNetNS(t)
	cg := testutil.NewCgroup(t)
	if _, err := dp.Enable(cg, EnableOptions{TCDevices: []TCDevice{{NetnsPath: netns.Path(), Name: "lo"}}}); err != nil {
		t.Fatal(err)
	}
	l := testutil.ListenIn(t, cg, "tcp4", "127.0.0.1:0")
	transfer.ServeEcho(l)

	// Every per-cgroup program of the table (not in sidecar mode).
	pins := []string{filepath.Join(dp.pinDir, PinSkMsgLink)}
	for _, p := range cgroupPrograms {
		if p.appliesTo(cgroupConfig{}) {
			pins = append(pins, dp.cgroupPin(cg.ID, p))
		}
	}
	// The TC link of the accounted device (tcx on this kernel).
	tcPins, err := filepath.Glob(filepath.Join(dp.pinDir, "tc", "*"))
	if err != nil || len(tcPins) != 1 {
		t.Fatalf("tc link pins %v, %v; want one", tcPins, err)
	}
	pins = append(pins, tcPins[0])
	before := map[string]ebpf.ProgramID{}
	for _, p := range pins {
		before[p] = testutil.LinkProgramID(t, p)
	}

	const streams = 8
	stopStreams := startStreams(t, cg, l.Addr().String(), streams, 200)
	// Traffic is redirected before the upgrade...
	waitFor(t, 5*time.Second, func() bool { return counterOf(t, dp, cg.ID).RedirectedBytes >= 8<<20 })
	countersBefore := counterOf(t, dp, cg.ID)
	rep, err := dp.Upgrade()
	if err != nil {
		t.Fatal(err)
	}
	if rep.Cgroups != 1 || rep.TCDevices != 1 {
		t.Errorf("upgrade report %+v", rep)
	}
	// ... and keeps being redirected, by the new programs, after it.
	waitFor(t, 5*time.Second, func() bool {
		return counterOf(t, dp, cg.ID).RedirectedBytes >= countersBefore.RedirectedBytes+8<<20
	})
	for i, err := range stopStreams() {
		if err != nil {
			t.Errorf("stream %d across the upgrade: %v", i, err)
		}
	}
	for _, p := range pins {
		if after := testutil.LinkProgramID(t, p); after == before[p] {
			t.Errorf("%s still runs program %d after the upgrade", p, after)
		}
	}
	if c := counterOf(t, dp, cg.ID); c.RedirectedBytes <= countersBefore.RedirectedBytes {
		t.Errorf("counters did not continue across the upgrade: %d then %d", countersBefore.RedirectedBytes, c.RedirectedBytes)
	}
	// A new connection with the new programs.
	mid := counterOf(t, dp, cg.ID)
	if err := transfer.RoundTrip(testutil.DialIn(t, cg, "tcp4", l.Addr().String()), transfer.Pattern(9, 1<<20), transfer.Options{WriteSize: 16384}); err != nil {
		t.Fatal(err)
	}
	if d := counterOf(t, dp, cg.ID).Sub(mid); d.SocketsInserted != 2 || d.RedirectedBytes == 0 {
		t.Errorf("after the upgrade a new connection was not accelerated: %+v", d)
	}
}

func TestForeignLayoutIsRefusedNotWiped(t *testing.T) {
	dp := install(t)
	m, err := ebpf.LoadPinnedMap(filepath.Join(dp.pinDir, PinLayout), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Put(uint32(0), uint32(99)); err != nil {
		t.Fatal(err)
	}
	_, err = Open(Options{PinDir: dp.pinDir})
	if err == nil || !strings.Contains(err.Error(), "layout version 99") || !strings.Contains(err.Error(), "uninstall") {
		t.Fatalf("Open over a foreign layout: %v", err)
	}
	if _, err := OpenOrCreate(Options{PinDir: dp.pinDir}); err == nil {
		t.Fatal("OpenOrCreate adopted a foreign layout")
	}
	// Nothing was removed.
	if _, err := ebpf.LoadPinnedMap(filepath.Join(dp.pinDir, PinSockhash), nil); err != nil {
		t.Errorf("the foreign state lost its sockhash: %v", err)
	}
	if !errors.Is(err, ErrIncompatible) {
		_, err = Open(Options{PinDir: dp.pinDir})
		if !errors.Is(err, ErrIncompatible) {
			t.Errorf("Open error does not wrap ErrIncompatible: %v", err)
		}
	}

	// Uninstalling foreign state: everything detached and unpinned.
	cg := testutil.NewCgroup(t)
	m.Put(uint32(0), uint32(LayoutVersion))
	if _, err := dp.Enable(cg, EnableOptions{}); err != nil {
		t.Fatal(err)
	}
	m.Put(uint32(0), uint32(99))
	if err := RemoveForeign(dp.pinDir, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dp.pinDir); !os.IsNotExist(err) {
		t.Errorf("pin directory still there after RemoveForeign")
	}
	f, _ := os.Open(cg.Path)
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupSockOps})
	if err != nil || len(res.Programs) != 0 {
		t.Errorf("sock_ops still attached after RemoveForeign: %v %v", res, err)
	}
}

// TestUpgradeDisablesACgroupRemovedWhileEnabled: the kernel severs the
// links of a cgroup removed while enabled and refuses to update them
// (ENOLINK); upgrade disables such a cgroup, as the daemon's rescan would,
// and upgrades the others, instead of stopping there (a daemon started
// over such pins adopts them with an upgrade).
func TestUpgradeDisablesACgroupRemovedWhileEnabled(t *testing.T) {
	dp := install(t)
	kept := enabledCgroup(t, dp)
	gone := enabledCgroup(t, dp)
	if err := os.Remove(gone.Path); err != nil {
		t.Fatalf("remove the cgroup: %v", err)
	}
	rep, err := dp.Upgrade()
	if err != nil {
		t.Fatalf("upgrade with a cgroup removed while enabled: %v", err)
	}
	if rep.Cgroups != 1 || rep.RemovedCgroups != 1 {
		t.Errorf("upgrade report %+v, want 1 cgroup upgraded and 1 removed", rep)
	}
	ids, err := dp.EnabledCgroupIDs()
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != 1 || ids[0] != kept.ID {
		t.Errorf("enabled after the upgrade: %v, want only %d", ids, kept.ID)
	}
}

// TestUpgradeSwapsTheAccountingPrograms: an accelerated cgroup enabled by a
// binary that counted stack bytes per packet (the egress row attached, no
// release row) counts them at close after the upgrade, as enable would
// attach them; an account-only cgroup keeps its egress program.
func TestUpgradeSwapsTheAccountingPrograms(t *testing.T) {
	dp := install(t)
	accel := enabledCgroup(t, dp)
	dry := testutil.NewCgroup(t)
	if _, err := dp.Enable(dry, EnableOptions{AccountOnly: true}); err != nil {
		t.Fatal(err)
	}
	var release, egress cgroupProgram
	for _, p := range cgroupPrograms {
		switch p.Program {
		case cgroup.ReleaseProgram:
			release = p
		case cgroup.EgressProgram:
			egress = p
		}
	}
	// What an older binary left: egress attached to the accelerated one.
	slot, _, err := dp.slotOf(accel.ID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dp.attachCgroupProgram(accel, slot, egress); err != nil {
		t.Fatal(err)
	}
	if err := dp.detachCgroupProgram(accel.ID, release); err != nil {
		t.Fatal(err)
	}
	if _, err := dp.Upgrade(); err != nil {
		t.Fatal(err)
	}
	pinned := func(id uint64, p cgroupProgram) bool {
		_, err := os.Stat(dp.cgroupPin(id, p))
		return err == nil
	}
	if !pinned(accel.ID, release) || pinned(accel.ID, egress) {
		t.Errorf("accelerated cgroup after the upgrade: release attached %v, egress attached %v; want true, false",
			pinned(accel.ID, release), pinned(accel.ID, egress))
	}
	if pinned(dry.ID, release) || !pinned(dry.ID, egress) {
		t.Errorf("account-only cgroup after the upgrade: release attached %v, egress attached %v; want false, true",
			pinned(dry.ID, release), pinned(dry.ID, egress))
	}
}
