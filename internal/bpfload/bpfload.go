// Package bpfload holds what every program loader of sockbypass shares.
package bpfload

import "github.com/cilium/ebpf"

// FitReplacements makes spec's maps agree with the existing maps that will
// replace them, in the properties the user may size (max_entries), and
// drops replacements spec does not declare. cilium/ebpf refuses a
// replacement whose spec differs; the sizes are decided once, when the
// pinned maps are created.
func FitReplacements(spec *ebpf.CollectionSpec, maps map[string]*ebpf.Map) map[string]*ebpf.Map {
	out := make(map[string]*ebpf.Map, len(maps))
	for name, m := range maps {
		ms, ok := spec.Maps[name]
		if !ok {
			continue
		}
		ms.MaxEntries = m.MaxEntries()
		out[name] = m
	}
	return out
}
