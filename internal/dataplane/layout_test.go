package dataplane

import (
	"crypto/sha256"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/skmsg"
	"github.com/sockbypass/sockbypass/sockops"
	"github.com/sockbypass/sockbypass/tc"
)

// goMirrors are the Go types that read and write the pinned maps, by map:
// every map the loader or the tests read or write, each with the type it
// is read with (for a per-CPU map, one CPU's value). Most are bpf2go's
// (sockops/types.go, tc/types.go); each must lay out exactly as the C
// struct the map declares.
var goMirrors = []struct {
	Map        string
	Key, Value any
}{
	{PinSockhash, SockKey{}, uint64(0)},
	{PinCounters, uint32(0), sockops.CgroupCounters{}},
	{PinCounters, uint32(0), CgroupCounters{}}, // fields by position: countersFromC
	{PinCgroupConfig, uint32(0), cgroupConfig{}},
	{PinCgroupSlots, uint64(0), uint32(0)},
	{PinNodeAddrs, nodeAddrKey{}, nodeAddrValue{}},
	{PinInboundPods, nodeAddrKey{}, uint32(0)},
	{PinTCDevices, tcDeviceKey{}, tcDeviceValue{}},
	{PinTCUsers, tcUserKey{}, uint32(0)},
	{PinListeners, endpointKey{}, uint64(0)},
	{PinSocketCgs, uint64(0), uint64(0)},
	{PinMeshEndpoints, endpointKey{}, uint64(0)},
	{PinPairs, SockKey{}, sockops.Pair{}},
	{PinOfferHints, uint32(0), uint64(0)},
	{PinOfferEpoch, uint32(0), offerEpoch{}},
	{PinSockState, int32(0), sockops.SockState{}},
}

// objectSpecs are the compiled objects whose maps are replaced by the
// pinned ones, by package: each declares the shared maps with the same
// types.
var objectSpecs = map[string]func() (*ebpf.CollectionSpec, error){
	"sockops": sockops.LoadSpec, "skmsg": skmsg.LoadSpec, "tc": tc.LoadSpec,
	"cgroup egress": cgroup.LoadEgressSpec, "cgroup sidecar": cgroup.LoadSidecarSpec,
}

// TestGoMirrorsMatchTheCStructs compares every Go type the loader reads or
// writes a map with against the BTF of the map in each compiled object:
// sizes, and each field's offset, size and name. A field added on one
// side only fails here, not in a counter that reads the wrong bytes.
func TestGoMirrorsMatchTheCStructs(t *testing.T) {
	for obj, load := range objectSpecs {
		spec, err := load()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range goMirrors {
			ms, ok := spec.Maps[m.Map]
			if !ok {
				if obj == "skmsg" {
					t.Errorf("map %s: not in the object the maps are created from", m.Map)
				}
				continue
			}
			compareMapTypes(t, obj, ms.Key, ms.Value, m.Map, m.Key, m.Value)
		}
	}
}

// TestGoMirrorsMatchTheLoadedMaps compares the same Go types with the BTF
// the kernel holds for the maps of a real install: what Open adopts.
func TestGoMirrorsMatchTheLoadedMaps(t *testing.T) {
	dp := install(t)
	for _, m := range goMirrors {
		info, err := dp.maps[m.Map].Info()
		if err != nil {
			t.Fatal(err)
		}
		id, ok := info.BTFID()
		if !ok {
			// The kernel keeps no BTF for a sockhash: its key is checked
			// against what sock_ops writes (TestSockKeyMatchesWhatBPFWrites).
			t.Logf("map %s: no BTF in the kernel", m.Map)
			continue
		}
		h, err := btf.NewHandleFromID(id)
		if err != nil {
			t.Fatal(err)
		}
		kspec, err := h.Spec(nil)
		h.Close()
		if err != nil {
			t.Fatal(err)
		}
		// The BTF of a map created from a MapSpec holds its key and value
		// types: look up those of the compiled object by name there.
		spec, err := skmsg.LoadSpec()
		if err != nil {
			t.Fatal(err)
		}
		ms := spec.Maps[m.Map]
		key, value := loadedType(t, kspec, ms.Key), loadedType(t, kspec, ms.Value)
		compareMapTypes(t, "kernel", key, value, m.Map, m.Key, m.Value)
	}
}

// loadedType finds compiled in the loaded BTF by kind and name (scalars
// compare by size, so compiled itself serves).
func loadedType(t *testing.T, loaded *btf.Spec, compiled btf.Type) btf.Type {
	s, ok := btf.UnderlyingType(compiled).(*btf.Struct)
	if !ok {
		return compiled
	}
	var found *btf.Struct
	if err := loaded.TypeByName(s.Name, &found); err != nil {
		t.Errorf("struct %s: not in the loaded map's BTF: %v", s.Name, err)
		return compiled
	}
	return found
}

func compareMapTypes(t *testing.T, obj string, key, value btf.Type, mapName string, goKey, goValue any) {
	t.Helper()
	for _, side := range []struct {
		what string
		typ  btf.Type
		val  any
	}{{"key", key, goKey}, {"value", value, goValue}} {
		for _, problem := range compareLayout(side.typ, reflect.TypeOf(side.val), obj+": "+mapName+" "+side.what) {
			t.Error(problem)
		}
	}
}

// compareLayout lists how Go type g differs from BTF type b.
func compareLayout(b btf.Type, g reflect.Type, where string) []string {
	b = btf.UnderlyingType(b)
	size, err := btf.Sizeof(b)
	if err != nil {
		return []string{fmt.Sprintf("%s: %v", where, err)}
	}
	if uintptr(size) != g.Size() {
		return []string{fmt.Sprintf("%s: C %s is %d bytes, Go %s is %d", where, b.TypeName(), size, g, g.Size())}
	}
	s, ok := b.(*btf.Struct)
	if !ok {
		return nil // a scalar or array of the same size
	}
	if g.Kind() != reflect.Struct {
		return []string{fmt.Sprintf("%s: C struct %s, Go %s", where, s.Name, g)}
	}
	var fields []reflect.StructField
	for i := 0; i < g.NumField(); i++ {
		if f := g.Field(i); f.Name != "_" { // bpf2go's layout marker and padding
			fields = append(fields, f)
		}
	}
	var problems []string
	if len(s.Members) != len(fields) {
		problems = append(problems, fmt.Sprintf("%s: C struct %s has %d fields, Go %s has %d", where, s.Name, len(s.Members), g, len(fields)))
	}
	for i := 0; i < len(s.Members) && i < len(fields); i++ {
		cm, gf := s.Members[i], fields[i]
		at := fmt.Sprintf("%s.%s", where, cm.Name)
		if uintptr(cm.Offset.Bytes()) != gf.Offset {
			problems = append(problems, fmt.Sprintf("%s: at offset %d in C, Go %s at %d", at, cm.Offset.Bytes(), gf.Name, gf.Offset))
			continue
		}
		if !sameName(cm.Name, gf.Name) {
			problems = append(problems, fmt.Sprintf("%s: Go field %s at its offset (names must agree)", at, gf.Name))
		}
		problems = append(problems, compareLayout(cm.Type, gf.Type, at)...)
	}
	return problems
}

// sameName compares a C and a Go field name, ignoring case and
// underscores; one may abbreviate the other at its end (Go
// PassedBackpressure for C passed_backpressure_msgs).
func sameName(c, g string) bool {
	n := func(s string) string { return strings.ToLower(strings.ReplaceAll(s, "_", "")) }
	c, g = n(c), n(g)
	return strings.HasPrefix(c, g) || strings.HasPrefix(g, c) || strings.ReplaceAll(c, "cross", "") == g || strings.ReplaceAll(g, "xns", "crossnetns") == c
}

// TestLayoutVersionFollowsTheMaps: the pinned maps' layout (every map's
// type, sizes and BTF) is summed up in testdata/layout.golden together
// with LayoutVersion. A change of layout without a new LayoutVersion
// fails: a binary would adopt pins it cannot read. After bumping it, run
// the test with SOCKBYPASS_UPDATE_LAYOUT=1 to record the new sum.
func TestLayoutVersionFollowsTheMaps(t *testing.T) {
	spec, err := sockops.LoadSpec()
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, name := range mapNames {
		ms, ok := spec.Maps[name]
		if !ok {
			t.Fatalf("shared map %s is not in the compiled object", name)
		}
		lines = append(lines, fmt.Sprintf("%s %s key=%s value=%s", name, ms.Type, describe(ms.Key), describe(ms.Value)))
	}
	sort.Strings(lines)
	sum := fmt.Sprintf("%x", sha256.Sum256([]byte(strings.Join(lines, "\n"))))
	got := fmt.Sprintf("layout_version %d\nmaps %s\n", LayoutVersion, sum)
	const golden = "testdata/layout.golden"
	if os.Getenv("SOCKBYPASS_UPDATE_LAYOUT") == "1" {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (record it with SOCKBYPASS_UPDATE_LAYOUT=1)", err)
	}
	var wantVersion int
	var wantSum string
	fmt.Sscanf(string(want), "layout_version %d\nmaps %s\n", &wantVersion, &wantSum)
	switch {
	case wantSum != sum && wantVersion == LayoutVersion:
		t.Errorf("the shared maps' layout changed but LayoutVersion is still %d: bump it in upgrade.go, then record it with SOCKBYPASS_UPDATE_LAYOUT=1 go test -run TestLayoutVersionFollowsTheMaps ./internal/dataplane", LayoutVersion)
	case wantSum != sum || wantVersion != LayoutVersion:
		t.Errorf("%s records layout_version %d with sum %s; now %d with %s: record it with SOCKBYPASS_UPDATE_LAYOUT=1", golden, wantVersion, wantSum, LayoutVersion, sum)
	}
}

// describe writes a BTF type's layout: sizes, offsets and member names,
// recursively (names of types themselves do not matter).
func describe(t btf.Type) string {
	t = btf.UnderlyingType(t)
	size, _ := btf.Sizeof(t)
	switch v := t.(type) {
	case *btf.Struct:
		var parts []string
		for _, m := range v.Members {
			parts = append(parts, fmt.Sprintf("%s@%d:%s", m.Name, m.Offset.Bytes(), describe(m.Type)))
		}
		return fmt.Sprintf("{%d %s}", size, strings.Join(parts, " "))
	case *btf.Array:
		return fmt.Sprintf("[%d]%s", v.Nelems, describe(v.Type))
	}
	return fmt.Sprint(size)
}
