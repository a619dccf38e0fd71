package suite

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// procSpec says how to start one external program.
type procSpec struct {
	// args is the program and its arguments.
	args []string
	// netns is the network namespace it starts in.
	netns ns.NetNS
	// mode gives the cgroup it is born in (CLONE_INTO_CGROUP).
	mode *Mode
	// cpus pins it with taskset ("0", "1", "0,1"); empty leaves it unpinned.
	cpus string
	// dir is its working directory.
	dir string
	// stdin feeds its standard input.
	stdin io.Reader
}

// proc is a started program. Only the suite's own processes are ever
// signalled, by PID.
type proc struct {
	name   string
	cmd    *exec.Cmd
	out    *capBuffer
	done   chan struct{}
	waitFn sync.Once
	err    error
}

// maxOutput bounds what is kept of a program's output.
const maxOutput = 4 << 20

// start starts spec in its namespace and cgroup, and returns at once.
func start(spec procSpec) (*proc, error) {
	args := spec.args
	if spec.cpus != "" {
		args = append([]string{"taskset", "-c", spec.cpus}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = spec.dir
	cmd.Stdin = spec.stdin
	out := &capBuffer{max: maxOutput}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{
		UseCgroupFD: true,
		CgroupFD:    int(spec.mode.dir.Fd()),
		// Children die with the suite even when it is killed.
		Pdeathsig: syscall.SIGKILL,
	}
	// The child inherits the network namespace of the thread that forks it.
	err := spec.netns.Do(func(ns.NetNS) error { return cmd.Start() })
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", strings.Join(spec.args, " "), err)
	}
	p := &proc{name: spec.args[0], cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// output returns what the program wrote so far (stdout and stderr).
func (p *proc) output() string { return p.out.String() }

// wait waits for the program to exit, killing it when ctx ends first.
func (p *proc) wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		p.stop()
		return fmt.Errorf("%s did not finish in time: %w", p.name, ctx.Err())
	}
}

// stop ends the program: SIGTERM, then SIGKILL after 3 s. It returns nil
// when the program is gone, whatever its exit status.
func (p *proc) stop() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(3 * time.Second):
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
		return nil
	case <-time.After(5 * time.Second):
		return fmt.Errorf("%s (pid %d) did not exit after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// exited reports whether the program has exited.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// runProc runs spec to completion within timeout and returns its output;
// a non-zero exit is an error that quotes the output.
func runProc(ctx context.Context, spec procSpec, timeout time.Duration) (string, error) {
	p, err := start(spec)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err = p.wait(ctx)
	out := p.output()
	if err != nil {
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) || ctx.Err() != nil {
			return out, fmt.Errorf("%s: %w; output:\n%s", strings.Join(spec.args, " "), err, tail(out, 2000))
		}
		return out, err
	}
	return out, nil
}

// tail returns the last n bytes of s.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}

// capBuffer is a goroutine-safe buffer that keeps the first max bytes.
type capBuffer struct {
	mu  sync.Mutex
	buf []byte
	max int
}

// Write appends p, dropping what exceeds the cap.
func (b *capBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := b.max - len(b.buf); room > 0 {
		if len(p) > room {
			b.buf = append(b.buf, p[:room]...)
		} else {
			b.buf = append(b.buf, p...)
		}
	}
	return len(p), nil
}

// String returns the buffered bytes.
func (b *capBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}
