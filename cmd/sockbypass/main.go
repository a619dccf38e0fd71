// Command sockbypass accelerates local TCP: it enables, disables and
// inspects the sock_ops + sk_msg redirection of a cgroup's sockets.
//
// Run "sockbypass help" for the commands.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sockbypass/sockbypass/internal/bpffs"
)

// Exit codes.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// command is one subcommand.
type command struct {
	summary string
	usage   string
	run     func(env *env, args []string) error
}

var commands = map[string]command{
	"enable":    enableCommand,
	"disable":   disableCommand,
	"status":    statusCommand,
	"stats":     statsCommand,
	"daemon":    daemonCommand,
	"doctor":    doctorCommand,
	"upgrade":   upgradeCommand,
	"uninstall": uninstallCommand,
}

// env is what every subcommand gets: its output streams and the settings
// shared by all commands.
type env struct {
	stdout, stderr io.Writer
	log            *zap.Logger
	pinDir         string
	// cmd is the command being run.
	cmd command
}

// usageError marks errors in the command line itself (exit code 2).
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

const helpText = `sockbypass accelerates local TCP between the sockets of enabled cgroups:
a sock_ops program records each established TCP socket in a BPF sockhash and
an sk_msg program hands every message straight to the local peer's receive
queue, skipping the TCP/IP stack. Connections to peers it does not know take
the normal path. Everything is pinned under the pin directory, so acceleration
stays in place after this command exits.

Usage:
  sockbypass <command> [flags]

Commands:
%s
Flags every command takes:
  --bpffs-dir DIR   pin directory (default $SOCKBYPASS_BPFFS_DIR, else %s)
  --log-level LVL   debug, info, warn or error (default warn); logs go to stderr

Run "sockbypass <command> --help" for a command's flags.
`

func printHelp(w io.Writer) {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(w, helpText, b.String(), bpffs.DefaultPinDir)
}

// newFlagSet returns a flag set with the flags every command takes.
func newFlagSet(name string, e *env, pinDir, logLevel *string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	fs.StringVar(pinDir, "bpffs-dir", "", "pin directory (default $"+bpffs.EnvPinDir+", else "+bpffs.DefaultPinDir+")")
	fs.StringVar(logLevel, "log-level", "warn", "log level: debug, info, warn or error")
	return fs
}

// parseFlags parses args into fs and sets up e's logger and pin directory.
func parseFlags(fs *flag.FlagSet, e *env, args []string, pinDir, logLevel *string) error {
	cmd := e.cmd
	fs.Usage = func() {
		fmt.Fprintf(e.stderr, "Usage: sockbypass %s\n\n%s\n\nFlags:\n", cmd.usage, cmd.summary)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return usagef("%s: unexpected argument %q (see sockbypass %s --help)", fs.Name(), fs.Arg(0), fs.Name())
	}
	lvl, err := zapcore.ParseLevel(*logLevel)
	if err != nil {
		return usagef("--log-level %q: use debug, info, warn or error", *logLevel)
	}
	e.log = newLogger(e.stderr, lvl)
	e.pinDir = bpffs.PinDir(*pinDir)
	return nil
}

func newLogger(w io.Writer, lvl zapcore.Level) *zap.Logger {
	cfg := zap.NewDevelopmentEncoderConfig()
	cfg.TimeKey = ""
	core := zapcore.NewCore(zapcore.NewConsoleEncoder(cfg), zapcore.AddSync(w), lvl)
	return zap.New(core)
}

// run runs the command line args (without the program name) and returns the
// exit code.
func run(args []string, stdout, stderr io.Writer) int {
	e := &env{stdout: stdout, stderr: stderr, log: zap.NewNop()}
	if len(args) == 0 {
		printHelp(stderr)
		return exitUsage
	}
	switch args[0] {
	case "help", "-h", "--help", "-help":
		printHelp(stdout)
		return exitOK
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "sockbypass: unknown command %q (see sockbypass help)\n", args[0])
		return exitUsage
	}
	e.cmd = cmd
	err := cmd.run(e, args[1:])
	defer e.log.Sync()
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	}
	fmt.Fprintf(stderr, "sockbypass %s: %v\n", args[0], err)
	var ue usageError
	if errors.As(err, &ue) {
		return exitUsage
	}
	return exitError
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
