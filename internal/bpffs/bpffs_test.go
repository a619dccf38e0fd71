package bpffs

import (
	"os"
	"strings"
	"testing"
)

func TestPinDirPrecedence(t *testing.T) {
	t.Setenv(EnvPinDir, "/sys/fs/bpf/from-env/")
	if got := PinDir("/sys/fs/bpf/from-flag"); got != "/sys/fs/bpf/from-flag" {
		t.Errorf("flag should win, got %s", got)
	}
	if got := PinDir(""); got != "/sys/fs/bpf/from-env" {
		t.Errorf("env should win over default, got %s", got)
	}
	t.Setenv(EnvPinDir, "")
	if got := PinDir(""); got != DefaultPinDir {
		t.Errorf("default = %s", got)
	}
}

func TestEnsureRefusesDirectoriesOffBPFFS(t *testing.T) {
	for _, dir := range []string{"relative/dir", os.TempDir() + "/sockbypass-x/pins"} {
		err := Ensure(dir)
		if err == nil || !strings.Contains(err.Error(), dir) {
			t.Errorf("Ensure(%q) = %v, want an error naming it", dir, err)
		}
	}
}

func TestEnsureDefaultRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root, which CI must provide")
		}
		t.Skip("needs root")
	}
	if err := Ensure(DefaultRoot + "/sockbypass-ensure-test/sub"); err != nil {
		t.Fatal(err)
	}
	if ok, err := IsBPFFS(DefaultRoot); err != nil || !ok {
		t.Errorf("%s is not bpffs after Ensure: %v", DefaultRoot, err)
	}
}
