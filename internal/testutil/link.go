package testutil

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// LinkProgramID returns the id of the program the pinned link at pin runs.
func LinkProgramID(tb testing.TB, pin string) ebpf.ProgramID {
	tb.Helper()
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		tb.Fatal(err)
	}
	return info.Program
}
