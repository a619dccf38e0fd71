package main

import (
	"strings"
	"testing"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// TestBadCommandLinesExit2 checks that every bad command line exits 2 with
// one message naming the flag, before anything is touched (issue 18 item 9).
func TestBadCommandLinesExit2(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"status", "--bpffs-dir", "relative/pins"}, `--bpffs-dir "relative/pins"`},
		{[]string{"status", "--bpffs-dir", ""}, `--bpffs-dir ""`},
		{[]string{"enable", "--cgroup", ""}, `--cgroup ""`},
		{[]string{"disable", "--cgroup", ""}, `--cgroup ""`},
		{[]string{"disable", "--cgroup-id", "abc"}, `--cgroup-id "abc"`},
		{[]string{"enable", "--cgroup", "x", "--sockhash-size", "0"}, "--sockhash-size 0: use a capacity from 1 to 1048576"},
		{[]string{"enable", "--cgroup", "x", "--sockhash-size", "2000000"}, "--sockhash-size 2000000: use a capacity from 1 to 1048576"},
		{[]string{"stats", "--watch", "1s", "--count", "0"}, "--count 0"},
		{[]string{"stats", "--watch", "0s"}, "--watch 0s"},
		{[]string{"stats", "--count", "3"}, "--count 3: needs --watch"},
		{[]string{"--verbose", "status"}, "flag --verbose before the command"},
		{[]string{"daemon", "--cgroup", ""}, `--cgroup ""`},
		{[]string{"daemon", "--tc-dev", "relative/netns:lo"}, `--tc-dev: tc device "relative/netns:lo"`},
		{[]string{"daemon", "--metrics-addr", "nonsense"}, `--metrics-addr "nonsense"`},
	} {
		code, out, errOut := sockbypass(t, tc.args...)
		if code != exitUsage || !strings.Contains(errOut, tc.want) || out != "" {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 2 and %q", tc.args, code, out, errOut, tc.want)
		}
	}
}

// TestUsageMessagesOnce checks the text of bad command lines: the error
// once, prefixed once, with a pointer to the command's help.
func TestUsageMessagesOnce(t *testing.T) {
	code, _, errOut := sockbypass(t, "enable", "nu-a")
	if code != exitUsage || errOut != "sockbypass enable: unexpected argument \"nu-a\" (see sockbypass enable --help)\n" {
		t.Errorf("enable nu-a: exit %d, stderr %q", code, errOut)
	}
	code, _, errOut = sockbypass(t, "enable", "--bogus")
	if code != exitUsage || strings.Count(errOut, "-bogus") != 1 || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, "see sockbypass enable --help") {
		t.Errorf("enable --bogus: exit %d, want one line naming the flag, got stderr %q", code, errOut)
	}
}

// TestHelpCommand checks that "help enable" prints enable's help, like
// "enable --help", on stdout.
func TestHelpCommand(t *testing.T) {
	code, out, _ := sockbypass(t, "help", "enable")
	_, want, _ := sockbypass(t, "enable", "--help")
	if code != 0 || !strings.HasPrefix(out, "Usage: sockbypass enable") || !strings.Contains(out, "--sockhash-size") || out != want {
		t.Errorf("help enable: exit %d\n%s\nwant\n%s", code, out, want)
	}
	if code, _, errOut := sockbypass(t, "help", "frobnicate"); code != exitUsage || !strings.Contains(errOut, `unknown command "frobnicate"`) {
		t.Errorf("help frobnicate: exit %d, stderr %q", code, errOut)
	}
}

// TestGlobalFlagsBeforeCommand checks "sockbypass --bpffs-dir DIR status".
func TestGlobalFlagsBeforeCommand(t *testing.T) {
	pinDir := testutil.NewPinDir(t)
	for _, args := range [][]string{
		{"--bpffs-dir", pinDir, "status"},
		{"--bpffs-dir=" + pinDir, "--log-level", "debug", "status"},
	} {
		code, out, errOut := sockbypass(t, args...)
		if code != 0 || !strings.Contains(out, "not installed at "+pinDir) {
			t.Errorf("%q: exit %d, stdout %q, stderr %q", args, code, out, errOut)
		}
	}
	// The command's own flag wins over the global one.
	code, out, _ := sockbypass(t, "--bpffs-dir", "/sys/fs/bpf/elsewhere", "status", "--bpffs-dir", pinDir)
	if code != 0 || !strings.Contains(out, pinDir) {
		t.Errorf("command flag after a global one: exit %d, %q", code, out)
	}
}
