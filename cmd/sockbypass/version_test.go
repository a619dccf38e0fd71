package main

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/privilege"
)

func TestVersionCommand(t *testing.T) {
	code, out, errOut := sockbypass(t, "version", "--json")
	if code != 0 {
		t.Fatalf("version --json: exit %d: %s", code, errOut)
	}
	var v versionJSON
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("version --json is not JSON: %v\n%s", err, out)
	}
	chart, err := os.ReadFile("../../deploy/helm/sockbypass/Chart.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^appVersion: "([^"]+)"`).FindSubmatch(chart)
	if m == nil || v.Release != string(m[1]) {
		t.Errorf("release %q, the Helm chart's appVersion %q: keep them the same", v.Release, m)
	}
	if v.LayoutVersion != dataplane.LayoutVersion || v.Kernel == "" || v.Go == "" || v.Revision == "" {
		t.Errorf("version --json: %+v", v)
	}
	want := "not checked"
	if privilege.Check() == nil {
		want = "passes"
		if privilege.CheckKernel() != nil {
			want = "refused"
		}
	}
	if v.KernelCheck != want {
		t.Errorf("kernel_check %q (%s), want %q", v.KernelCheck, v.KernelError, want)
	}

	code, text, _ := sockbypass(t, "--version")
	if code != 0 || !strings.HasPrefix(text, "sockbypass "+v.Release+"\n") || !strings.Contains(text, "pin layout:   version ") || !strings.Contains(text, "kernel:       "+v.Kernel) {
		t.Errorf("--version: exit %d\n%s", code, text)
	}
	if _, again, _ := sockbypass(t, "version"); again != text {
		t.Errorf("version and --version differ:\n%s\n%s", again, text)
	}

	// The Makefile's build embeds the revision; a binary built so names it.
	old := revision
	revision = "0123abcd"
	defer func() { revision = old }()
	if _, text, _ := sockbypass(t, "version"); !strings.Contains(text, "git revision: 0123abcd (from the Makefile build)") {
		t.Errorf("version with -X main.revision:\n%s", text)
	}
	mk, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(mk), `-X main.revision=$(REVISION)`) {
		t.Errorf("the Makefile's build no longer embeds the revision (-X main.revision)")
	}
}
