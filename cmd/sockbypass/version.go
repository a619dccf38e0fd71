package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/privilege"
)

// release is the sockbypass release (the Helm chart's appVersion follows
// it); the Makefile may override it with -ldflags "-X main.release=...".
var release = "0.17.0"

// revision is the git revision this binary was built from, set by the
// Makefile with -ldflags "-X main.revision=..."; when empty, the Go build
// info's vcs.revision is used (go build in a git checkout records it).
var revision = ""

var versionCommand = command{
	summary: "print the release, git revision, pin layout version and whether this kernel passes the check",
	usage:   "version [--json]   (also: sockbypass --version)",
	run:     runVersion,
}

// versionJSON is the --json document of version.
type versionJSON struct {
	// Release is the sockbypass release.
	Release string `json:"release"`
	// Revision is the git revision, "unknown" when not recorded;
	// RevisionSource says where it came from: "ldflags", "buildinfo" or
	// "none"; Modified reports uncommitted changes (build info only).
	Revision       string `json:"revision"`
	RevisionSource string `json:"revision_source"`
	Modified       bool   `json:"modified,omitempty"`
	// LayoutVersion is the pin layout this binary reads and writes
	// (internal/dataplane LayoutVersion).
	LayoutVersion int `json:"layout_version"`
	// Kernel is uname -r; KernelCheck is "passes", "refused" or "not
	// checked" (no privilege to probe), KernelError why.
	Kernel      string `json:"kernel"`
	KernelCheck string `json:"kernel_check"`
	KernelError string `json:"kernel_error,omitempty"`
	// Go is the Go version it was built with.
	Go string `json:"go"`
}

// buildRevision returns the git revision and where it came from.
func buildRevision() (rev, source string, modified bool) {
	if revision != "" {
		return revision, "ldflags", strings.HasSuffix(revision, "-dirty")
	}
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	if rev == "" {
		return "unknown", "none", false
	}
	return rev, "buildinfo", modified
}

// versionInfo gathers what version prints.
func versionInfo() versionJSON {
	v := versionJSON{Release: release, LayoutVersion: dataplane.LayoutVersion, Kernel: "unknown", Go: runtime.Version()}
	v.Revision, v.RevisionSource, v.Modified = buildRevision()
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		v.Kernel = strings.TrimSpace(string(data))
	}
	err := privilege.CheckKernel()
	switch {
	case err == nil:
		v.KernelCheck = "passes"
	case errors.Is(err, privilege.ErrKernelUnsupported):
		v.KernelCheck, v.KernelError = "refused", err.Error()
	default:
		v.KernelCheck, v.KernelError = "not checked", err.Error()
	}
	return v
}

func runVersion(e *env, args []string) error {
	var pinDir, logLevel string
	var asJSON bool
	fs := newFlagSet("version", e, &pinDir, &logLevel)
	fs.BoolVar(&asJSON, "json", false, "print JSON for machines instead of text")
	if err := parseFlags(fs, e, args, &pinDir, &logLevel); err != nil {
		return err
	}
	v := versionInfo()
	if asJSON {
		return writeJSON(e.stdout, v)
	}
	rev := v.Revision
	if v.Modified && !strings.HasSuffix(rev, "-dirty") {
		rev += " (with uncommitted changes)"
	}
	fmt.Fprintf(e.stdout, "sockbypass %s\n", v.Release)
	fmt.Fprintf(e.stdout, "  git revision: %s (from %s)\n", rev, map[string]string{"ldflags": "the Makefile build", "buildinfo": "the Go build info", "none": "nowhere: not recorded (built outside a git checkout, or with -buildvcs=false)"}[v.RevisionSource])
	fmt.Fprintf(e.stdout, "  pin layout:   version %d (an install of another layout is refused, never wiped; see sockbypass upgrade)\n", v.LayoutVersion)
	switch v.KernelCheck {
	case "passes":
		fmt.Fprintf(e.stdout, "  kernel:       %s passes the kernel check (enable, daemon and doctor run here)\n", v.Kernel)
	case "refused":
		fmt.Fprintf(e.stdout, "  kernel:       %s is refused: %s\n", v.Kernel, v.KernelError)
	default:
		fmt.Fprintf(e.stdout, "  kernel:       %s not checked: %s\n", v.Kernel, v.KernelError)
	}
	fmt.Fprintf(e.stdout, "  built with:   %s\n", v.Go)
	return nil
}
