package listeners

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// The helper processes of TestCollectCapabilities: the test binary runs
// again with one of these set.
const (
	envServe   = "SOCKBYPASS_LISTENERS_SERVE"   // a pod's server: listen, print the ports, wait
	envCollect = "SOCKBYPASS_LISTENERS_COLLECT" // the daemon: Collect this pid, print the result
)

// TestListenersHelperProcess is not a test: run by TestCollectCapabilities
// in a child process, it is either a pod's server (a non-blocking and a
// blocking listener, ports on stdout, until stdin closes) or the daemon's
// listener reader (Collect of one pid, as JSON on stdout).
func TestListenersHelperProcess(t *testing.T) {
	switch {
	case os.Getenv(envServe) != "":
		serveHelper()
	case os.Getenv(envCollect) != "":
		pid, _ := strconv.Atoi(os.Getenv(envCollect))
		found, err := Collect([]int{pid})
		res := collectResult{Found: found, Permission: errors.Is(err, os.ErrPermission)}
		if err != nil {
			res.Err = err.Error()
		}
		b, _ := json.Marshal(res)
		fmt.Printf("RESULT %s\n", b)
	}
}

type collectResult struct {
	Found      []Listener
	Err        string
	Permission bool
}

func serveHelper() {
	nb, err := net.Listen("tcp4", "0.0.0.0:0") // Go's: O_NONBLOCK
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0) // blocking
	if err == nil {
		err = unix.Bind(fd, &unix.SockaddrInet4{})
	}
	if err == nil {
		err = unix.Listen(fd, 16)
	}
	var port int
	if err == nil {
		var sa unix.Sockaddr
		sa, err = unix.Getsockname(fd)
		if err == nil {
			port = sa.(*unix.SockaddrInet4).Port
		}
	}
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	fmt.Printf("PORTS %d %d\n", nb.Addr().(*net.TCPAddr).Port, port)
	io.Copy(io.Discard, os.Stdin)
}

// TestCollectCapabilities measures which capabilities the daemon's
// listener reader needs to read a pod's server that runs as uid 1000 in a
// network namespace of its own (as a pod with runAsUser: 1000 does): the
// reader runs as root with exactly the capabilities listed (setpriv
// bounding set, as a container's capabilities.add after drop ALL), and
// must find the server's non-blocking listener as non-blocking and its
// blocking one as blocking with the chart's capabilities, and must not
// find them without DAC_READ_SEARCH and SYS_PTRACE.
func TestCollectCapabilities(t *testing.T) {
	testutil.RequirePrivileged(t)
	setpriv := testutil.RequireProgram(t, "setpriv", "(util-linux) to drop capabilities")
	// The test binary, where uid 1000 may run it (go test's build
	// directory is private to root).
	dir, err := os.MkdirTemp("", "listeners-caps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "listeners.test")
	if err := copyFile(os.Args[0], bin); err != nil {
		t.Fatal(err)
	}

	// The pod's server: uid 1000, its own network namespace.
	srv := exec.Command(bin, "-test.run", "^TestListenersHelperProcess$", "-test.count", "1")
	srv.Env = append(os.Environ(), envServe+"=1")
	srv.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNET,
		Credential: &syscall.Credential{Uid: 1000, Gid: 1000, NoSetGroups: true},
		Pdeathsig:  syscall.SIGKILL,
	}
	stdin, err := srv.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	srv.Stderr = os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		srv.Wait()
	})
	var nbPort, blkPort int
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if _, err := fmt.Sscanf(sc.Text(), "PORTS %d %d", &nbPort, &blkPort); err == nil {
			break
		}
		t.Logf("server: %s", sc.Text())
	}
	if nbPort == 0 {
		t.Fatalf("the uid 1000 server printed no ports")
	}
	go io.Copy(io.Discard, stdout)

	base := []string{"bpf", "net_admin", "perfmon"} // the chart's, less SYS_RESOURCE (not in every host's bounding set)
	for _, c := range []struct {
		extra []string
		want  bool
	}{
		{nil, false},
		{[]string{"sys_ptrace"}, false},
		{[]string{"dac_read_search"}, false},
		{[]string{"dac_read_search", "sys_ptrace"}, true},
		{[]string{"sys_admin", "sys_ptrace"}, false}, // podToPod's, without DAC_READ_SEARCH
		{[]string{"dac_read_search", "sys_ptrace", "sys_admin"}, true},
	} {
		caps := append(append([]string{}, base...), c.extra...)
		set := "-all"
		for _, cp := range caps {
			set += ",+" + cp
		}
		cmd := exec.Command(setpriv, "--bounding-set", set, "--inh-caps", "-all", "--",
			bin, "-test.run", "^TestListenersHelperProcess$", "-test.count", "1")
		cmd.Env = append(os.Environ(), envCollect+"="+strconv.Itoa(srv.Process.Pid))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("reader with %v: %v\n%s", caps, err, out)
		}
		var res collectResult
		for _, line := range strings.Split(string(out), "\n") {
			if b, ok := strings.CutPrefix(line, "RESULT "); ok {
				if err := json.Unmarshal([]byte(b), &res); err != nil {
					t.Fatal(err)
				}
			}
		}
		var nb, blk *Listener
		for i, l := range res.Found {
			switch int(l.Port) {
			case nbPort:
				nb = &res.Found[i]
			case blkPort:
				blk = &res.Found[i]
			}
		}
		read := nb != nil && blk != nil && nb.NonBlocking && !blk.NonBlocking && nb.NetnsCookie != 0
		t.Logf("caps %-45s read the uid 1000 listeners: %-5v (found %d, permission error %v: %s)",
			strings.ToUpper(strings.Join(caps, " ")), read, len(res.Found), res.Permission, res.Err)
		if read != c.want {
			t.Errorf("caps %v: read = %v, want %v (found %+v, err %q)", caps, read, c.want, res.Found, res.Err)
		}
		if !read && !res.Permission {
			t.Errorf("caps %v: not read, but Collect did not report a permission error (%q)", caps, res.Err)
		}
	}
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o755)
}
