package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const hybridMountinfo = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`

const unifiedMountinfo = `22 1 0:21 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
23 1 0:22 / /mnt/with\040space rw - cgroup cgroup rw,pids
`

func TestParseMountinfoHybrid(t *testing.T) {
	m, err := ParseMountinfo(strings.NewReader(hybridMountinfo))
	if err != nil {
		t.Fatal(err)
	}
	if m.V2 != "/sys/fs/cgroup/unified" {
		t.Errorf("V2 = %q, want /sys/fs/cgroup/unified", m.V2)
	}
	if m.V1["/sys/fs/cgroup/cpu"] != "rw,cpu" || len(m.V1) != 2 {
		t.Errorf("V1 = %v", m.V1)
	}
}

func TestParseMountinfoUnifiedAndEscapes(t *testing.T) {
	m, err := ParseMountinfo(strings.NewReader(unifiedMountinfo))
	if err != nil {
		t.Fatal(err)
	}
	if m.V2 != "/sys/fs/cgroup" {
		t.Errorf("V2 = %q, want /sys/fs/cgroup", m.V2)
	}
	if _, ok := m.V1["/mnt/with space"]; !ok {
		t.Errorf("escaped mount point not decoded: %v", m.V1)
	}
}

func TestResolveErrorsNameTheInput(t *testing.T) {
	m, err := ReadMounts()
	if err != nil {
		t.Fatal(err)
	}
	if m.V2 == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("no cgroup v2 here, which CI must provide")
		}
		t.Skip("no cgroup v2 here")
	}
	cases := []struct {
		arg, want string
	}{
		{"", "empty cgroup path"},
		{"../etc", `"../etc" leaves the cgroup v2 hierarchy`},
		{"/etc", `"/etc" is not inside the cgroup v2 hierarchy`},
		{"sockbypass-does-not-exist-xyz", "does not exist; create it with: mkdir"},
	}
	for _, c := range cases {
		_, err := m.Resolve(c.arg)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Resolve(%q) = %v, want error containing %q", c.arg, err, c.want)
		}
	}
	if _, err := m.Resolve("sockbypass-does-not-exist-xyz"); !errors.Is(err, ErrNotExist) {
		t.Errorf("missing cgroup error does not wrap ErrNotExist: %v", err)
	}
	for mp := range m.V1 {
		_, err := m.Resolve(mp)
		if err == nil || !strings.Contains(err.Error(), "cgroup v1") {
			t.Errorf("Resolve(%q) = %v, want a cgroup v1 error", mp, err)
		}
		break
	}
}

func TestResolveRelativeAndAbsolute(t *testing.T) {
	m, err := ReadMounts()
	if err != nil {
		t.Fatal(err)
	}
	if m.V2 == "" || os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root and cgroup v2, which CI must provide")
		}
		t.Skip("needs root and cgroup v2")
	}
	dir, err := os.MkdirTemp(m.V2, "sockbypass-test-cgroup-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(dir) })

	abs, err := m.Resolve(dir)
	if err != nil {
		t.Fatal(err)
	}
	rel, err := m.Resolve(filepath.Base(dir))
	if err != nil {
		t.Fatal(err)
	}
	if abs != rel || abs.ID == 0 || abs.Rel != "/"+filepath.Base(dir) {
		t.Errorf("absolute %+v and relative %+v resolve differently", abs, rel)
	}
	path, err := m.PathByID(abs.ID)
	if err != nil || path != dir {
		t.Errorf("PathByID(%d) = %q, %v; want %q", abs.ID, path, err, dir)
	}
	if _, err := m.Resolve(filepath.Join(dir, "cgroup.procs")); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("a file was accepted as cgroup: %v", err)
	}
}
