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
	"path/filepath"
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
	"conns":     connsCommand,
	"daemon":    daemonCommand,
	"doctor":    doctorCommand,
	"upgrade":   upgradeCommand,
	"uninstall": uninstallCommand,
	"version":   versionCommand,
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
  sockbypass [--bpffs-dir DIR] [--log-level LVL] <command> [flags]

Commands:
%s
Flags every command takes:
  --bpffs-dir DIR   pin directory (default $SOCKBYPASS_BPFFS_DIR, else %s)
  --log-level LVL   debug, info, warn or error (default warn; daemon: info);
                    logs go to stderr, info shows what changed

Run "sockbypass help <command>" or "sockbypass <command> --help" for a
command's flags, "sockbypass --version" for the version. A bad command line
exits 2, any other error 1.
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
// Every error is a usageError (exit 2) printed once, by run; --help prints
// the command's usage on stdout.
func parseFlags(fs *flag.FlagSet, e *env, args []string, pinDir, logLevel *string) error {
	cmd := e.cmd
	// The flag package prints its error and the usage itself on every
	// error; run prints the error once instead, with a pointer to --help.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printCommandHelp(e.stdout, fs, cmd)
			return err
		}
		return usagef("%v (see sockbypass %s --help)", err, fs.Name())
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q (see sockbypass %s --help)", fs.Arg(0), fs.Name())
	}
	lvl, err := zapcore.ParseLevel(*logLevel)
	if err != nil {
		return usagef("--log-level %q: use debug, info, warn or error", *logLevel)
	}
	if flagSet(fs, "bpffs-dir") {
		if strings.TrimSpace(*pinDir) == "" {
			return usagef("--bpffs-dir \"\": name a pin directory on bpffs, e.g. %s (or leave the flag out)", bpffs.DefaultPinDir)
		}
		if !filepath.IsAbs(*pinDir) {
			return usagef("--bpffs-dir %q: use an absolute path on bpffs, e.g. %s", *pinDir, bpffs.DefaultPinDir)
		}
	}
	e.log = newLogger(e.stderr, lvl)
	e.pinDir = bpffs.PinDir(*pinDir)
	return nil
}

// printCommandHelp prints cmd's usage, summary and flags.
func printCommandHelp(w io.Writer, fs *flag.FlagSet, cmd command) {
	fmt.Fprintf(w, "Usage: sockbypass %s\n\n%s\n\nFlags:\n", cmd.usage, cmd.summary)
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

// flagSet reports whether the flag name was given on the command line.
func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// splitGlobalFlags takes the flags every command takes (--bpffs-dir,
// --log-level) from the front of args, so that they may come before the
// command: "sockbypass --bpffs-dir DIR status". It returns them (to be
// parsed with the command's own flags) and the rest, starting with the
// command.
func splitGlobalFlags(args []string) (global, rest []string, err error) {
	for len(args) > 0 && strings.HasPrefix(args[0], "-") {
		a := args[0]
		if a == "-h" || a == "-help" || a == "--help" || a == "--version" || a == "-version" {
			break
		}
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if name != "bpffs-dir" && name != "log-level" {
			return nil, nil, usagef("flag %s before the command: only --bpffs-dir and --log-level go there; put the others after the command (see sockbypass help)", a)
		}
		if hasValue {
			global, args = append(global, a), args[1:]
			continue
		}
		if len(args) < 2 {
			return nil, nil, usagef("flag needs an argument: %s", a)
		}
		global, args = append(global, a, args[1]), args[2:]
	}
	return global, args, nil
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
	global, args, err := splitGlobalFlags(args)
	if err != nil {
		fmt.Fprintf(stderr, "sockbypass: %v\n", err)
		return exitUsage
	}
	if len(args) == 0 {
		printHelp(stderr)
		return exitUsage
	}
	name, rest := args[0], args[1:]
	switch name {
	case "--version", "-version":
		name = "version"
	case "help", "-h", "--help", "-help":
		if len(rest) == 0 {
			printHelp(stdout)
			return exitOK
		}
		// "help COMMAND" is "COMMAND --help".
		name, rest = rest[0], []string{"--help"}
		if _, ok := commands[name]; !ok {
			fmt.Fprintf(stderr, "sockbypass help: unknown command %q (see sockbypass help)\n", name)
			return exitUsage
		}
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "sockbypass: unknown command %q (see sockbypass help)\n", name)
		return exitUsage
	}
	e.cmd = cmd
	err = cmd.run(e, append(global, rest...))
	defer e.log.Sync()
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	}
	fmt.Fprintf(stderr, "sockbypass %s: %v\n", name, err)
	var ue usageError
	if errors.As(err, &ue) {
		return exitUsage
	}
	return exitError
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
