package e2e

import (
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/testutil"
	"github.com/sockbypass/sockbypass/internal/testutil/transfer"
)

// buildSpliceProxy builds e2e/cmd/spliceproxy into dir.
func buildSpliceProxy(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "spliceproxy")
	cmd := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "build", "-o", bin, "./cmd/spliceproxy")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build spliceproxy: %v\n%s", err, out)
	}
	return bin
}

// TestGoSpliceProxyWithItsPortAsStackPort runs curl -> a Go io.Copy proxy
// (splice) -> nginx A -> nginx B -> a Python digest server, all in one
// cgroup enabled with only the proxy's port in --stack-ports, and checks
// that keep-alive sessions (two small POSTs and one of 1 MiB each) all
// answer: the proxy's accepted connections stay plain by their server
// port, its upstream connections because the proxy listens on a stack
// port (see stack_procs in bpf/sockbypass.h), and the nginx A -> nginx B
// hop is still accelerated.
func TestGoSpliceProxyWithItsPortAsStackPort(t *testing.T) { goSpliceProxy(t, true) }

// TestGoSpliceProxyByDefault runs the same chain with default settings:
// the proxy's listener is on probation, so its first connection stays
// plain, and its splice marks the listener and the proxy process, so the
// later ones do too; nothing stalls, and the nginx A -> nginx B hop is
// accelerated once nginx B's listener is proven.
func TestGoSpliceProxyByDefault(t *testing.T) { goSpliceProxy(t, false) }

func goSpliceProxy(t *testing.T, stackPorts bool) {
	dp := appsDataplane(t)
	requireTool(t, "nginx")
	requireTool(t, "curl")
	dir := t.TempDir()
	proxyBin := buildSpliceProxy(t, dir)
	server := writeScript(t, dir, "digest_server.py", digestServerPy)
	small, big := transfer.Pattern(7, 100), transfer.Pattern(8, 1<<20)
	files := map[string][]byte{"small": small, "big": big}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want := func(b []byte) string { return fmt.Sprintf("%x %d", sha256.Sum256(b), len(b)) }

	cg := testutil.NewCgroup(t)
	ports := testutil.FreePorts(t, 4)
	proxyPort, nginxPort, nginxBPort, digestPort := ports[0], ports[1], ports[2], ports[3]
	if !plainMode() {
		opts := dataplane.EnableOptions{}
		if stackPorts {
			opts.StackPorts = []uint16{uint16(proxyPort)}
		}
		if _, err := dp.Enable(cg, opts); err != nil {
			t.Fatal(err)
		}
	}
	py := startChild(t, "digest server", cg, nil, dir, pythonBin, server, strconv.Itoa(digestPort))
	py.waitListening(t, digestPort, 10*time.Second)
	startNginxProxy(t, cg, dir, "nginx-b", nginxBPort, digestPort)
	_, nginxLog := startNginxProxy(t, cg, dir, "nginx-a", nginxPort, nginxBPort)
	proxy := startChild(t, "spliceproxy", cg, nil, dir, proxyBin, fmt.Sprintf("127.0.0.1:%d", proxyPort), fmt.Sprintf("127.0.0.1:%d", nginxPort))
	proxy.waitListening(t, proxyPort, 10*time.Second)

	before := counters(t, dp, cg)
	url := fmt.Sprintf("http://127.0.0.1:%d/upload", proxyPort)
	post := func(file string) []string {
		return []string{"-H", "Content-Type: application/octet-stream", "--data-binary", "@" + filepath.Join(dir, file), "-o", "-", "-w", "\nHTTP %{http_code}\n", url}
	}
	const sessions = 3
	for s := 1; s <= sessions; s++ {
		// One curl, one connection: keep-alive between the three POSTs.
		args := append([]string{"-sS", "--max-time", "10"}, post("small")...)
		args = append(append(args, "--next"), post("small")...)
		args = append(append(args, "--next"), post("big")...)
		start := time.Now()
		curl := startChild(t, "curl", cg, nil, dir, append([]string{"curl"}, args...)...)
		err := curl.wait(15 * time.Second)
		out := curl.out.String()
		wantOut := want(small) + "\n\nHTTP 200\n" + want(small) + "\n\nHTTP 200\n" + want(big) + "\n\nHTTP 200\n"
		if err != nil || out != wantOut {
			errLog, _ := os.ReadFile(nginxLog)
			t.Fatalf("session %d of %d: curl exit %v after %v, output %q, want %q\nsockets:\n%s\nnginx error.log:\n%s\nproxy:\n%s\ncgroup: %s",
				s, sessions, err, time.Since(start).Round(time.Millisecond), tail(out, 600), wantOut,
				sockets("", proxyPort, nginxPort, nginxBPort, digestPort), tail(string(errLog), 2000), tail(proxy.out.String(), 1000),
				counterSummary(counters(t, dp, cg).Sub(before)))
		}
		t.Logf("session %d: three POSTs answered in %v", s, time.Since(start).Round(time.Millisecond))
	}
	d := counters(t, dp, cg).Sub(before)
	t.Logf("cgroup: %s", counterSummary(d))
	if plainMode() {
		return
	}
	if !stackPorts {
		if d.SpliceStalled != 0 || d.SocketsProbation == 0 || d.RedirectedBytes < uint64(len(big)) {
			t.Errorf("%d sessions by default: %d stalled splice readers, %d connections on probation, %d bytes redirected; want none, some, and at least %d (the nginx A -> nginx B hop)",
				sessions, d.SpliceStalled, d.SocketsProbation, d.RedirectedBytes, len(big))
		}
		return
	}
	// Each session: curl -> proxy (server port) and proxy -> nginx A (a
	// stack process's connection) stay plain, counted at the client end
	// of each; nginx A -> nginx B pairs.
	if d.SocketsStackPort < 2*sessions || d.RedirectedBytes < uint64(len(big)) {
		t.Errorf("%d sessions: %d sockets left plain for a stack port, %d bytes redirected; want at least %d and %d (both proxy hops plain, the nginx A -> nginx B hop accelerated)",
			sessions, d.SocketsStackPort, d.RedirectedBytes, 2*sessions, len(big))
	}
	if strings.Contains(proxy.out.String(), "spliceproxy:") {
		t.Errorf("proxy reported errors: %s", tail(proxy.out.String(), 1000))
	}
}
