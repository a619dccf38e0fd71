package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// configMapDir lays out dir the way the kubelet lays out a ConfigMap
// volume: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>.
type configMapDir struct {
	dir string
	n   int
}

func newConfigMapDir(t *testing.T, content string) *configMapDir {
	c := &configMapDir{dir: t.TempDir()}
	c.update(t, content)
	if err := os.Symlink("..data/config.yaml", filepath.Join(c.dir, "config.yaml")); err != nil {
		t.Fatal(err)
	}
	return c
}

// update writes a new timestamped directory and swaps ..data to it with a
// rename, as the kubelet's atomic writer does; no signal is sent.
func (c *configMapDir) update(t *testing.T, content string) {
	t.Helper()
	c.n++
	ts := fmt.Sprintf("..2026_11_28_05_00_%02d.%d", c.n, c.n)
	if err := os.Mkdir(filepath.Join(c.dir, ts), 0o755); err != nil {
		t.Fatal(err)
	}
	writeConfig(t, filepath.Join(c.dir, ts, "config.yaml"), content)
	tmp := filepath.Join(c.dir, "..data_tmp")
	if err := os.Symlink(ts, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(c.dir, "..data")); err != nil {
		t.Fatal(err)
	}
}

func (c *configMapDir) path() string { return filepath.Join(c.dir, "config.yaml") }

func httpGet(url string) (int, string) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// waitHTTP waits until url answers code with a body containing want.
func waitHTTP(t *testing.T, d *daemonProc, url string, code int, want string) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		got, body := httpGet(url)
		if got == code && strings.Contains(body, want) {
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %d %q, want %d with %q; logs:\n%s", url, got, body, code, want, d.logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestDaemonReloadsConfigMapSwapAndReadinessTellsTheTruth: a ConfigMap
// update (the kubelet's ..data symlink swap, no SIGHUP) is applied; a
// broken file is refused, the previous configuration stays in force,
// /readyz turns 503 with the reason and the refusal is counted; globs that
// match nothing under requireMatch are not Ready either.
func TestDaemonReloadsConfigMapSwapAndReadinessTellsTheTruth(t *testing.T) {
	testutil.RequirePrivileged(t)
	pinDir := testutil.NewPinDir(t)
	a := testutil.NewCgroup(t)
	b := testutil.NewCgroup(t)
	addr := testutil.FreeAddr(t)
	conf := func(cgroups string) string {
		return fmt.Sprintf("cgroups: [%s]\ntcDevices: []\nnoProbation: true\nmetricsAddr: %s\nrescanInterval: 200ms\nrequireMatch: true\n", cgroups, addr)
	}
	cm := newConfigMapDir(t, conf(a.Path))
	t.Cleanup(func() { sockbypass(t, "uninstall", "--bpffs-dir", pinDir) })
	d := startDaemon(t, pinDir, cm.path())
	waitEnabled(t, pinDir, d, a)
	readyz, metricsURL := "http://"+addr+"/readyz", "http://"+addr+"/metrics"
	waitHTTP(t, d, readyz, http.StatusOK, "ready")
	waitHTTP(t, d, metricsURL, http.StatusOK, "sockbypass_ready 1")

	cm.update(t, conf(a.Path+", "+b.Path))
	waitEnabled(t, pinDir, d, a, b)

	cm.update(t, conf(b.Path)+"bogus: true\n")
	body := waitHTTP(t, d, readyz, http.StatusServiceUnavailable, "reload refused")
	if !strings.Contains(body, "line 7") {
		t.Errorf("/readyz does not name the bad line: %q", body)
	}
	waitHTTP(t, d, metricsURL, http.StatusOK, "sockbypass_config_reload_failures_total 1")
	waitHTTP(t, d, metricsURL, http.StatusOK, "sockbypass_ready 0")
	if code, _ := httpGet("http://" + addr + "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz %d: liveness must not fail on a refused configuration", code)
	}
	time.Sleep(500 * time.Millisecond)
	waitEnabled(t, pinDir, d, a, b) // the previous configuration stays

	// Globs that fit no cgroup of this node (a kind-style root, cgroup v1
	// pods): nothing enabled, and not Ready.
	cm.update(t, conf("'"+a.Path+"-no-such-*'"))
	waitEnabled(t, pinDir, d)
	waitHTTP(t, d, readyz, http.StatusServiceUnavailable, "match no cgroup")

	cm.update(t, conf(b.Path))
	waitEnabled(t, pinDir, d, b)
	waitHTTP(t, d, readyz, http.StatusOK, "ready")
}
