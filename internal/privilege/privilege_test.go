package privilege

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

func TestCheckCapsNamesWhatIsMissing(t *testing.T) {
	err := checkCaps(0)
	if !errors.Is(err, ErrNotPrivileged) {
		t.Fatalf("checkCaps(0) = %v, want ErrNotPrivileged", err)
	}
	for _, want := range []string{"CAP_BPF", "CAP_NET_ADMIN", "sudo"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
	if err := checkCaps(1<<CapSysAdmin | 1<<CapNetAdmin); err != nil {
		t.Errorf("CAP_SYS_ADMIN+CAP_NET_ADMIN refused: %v", err)
	}
	if err := checkCaps(1<<CapBPF | 1<<CapPerfmon | 1<<CapNetAdmin); err != nil {
		t.Errorf("CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN refused: %v", err)
	}
	if err := checkCaps(1<<CapBPF | 1<<CapNetAdmin); err == nil || !strings.Contains(err.Error(), "CAP_PERFMON") {
		t.Errorf("missing CAP_PERFMON not named: %v", err)
	}
}

func TestKernelErrorNamesFeatureAndConfig(t *testing.T) {
	err := kernelError("sockhash maps", "CONFIG_BPF_STREAM_PARSER", ebpf.ErrNotSupported)
	if !errors.Is(err, ErrKernelUnsupported) || !strings.Contains(err.Error(), "CONFIG_BPF_STREAM_PARSER=y") {
		t.Errorf("kernelError = %v", err)
	}
}

func TestThisKernelIsSupported(t *testing.T) {
	if err := Check(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("not privileged under CI=true: %v", err)
		}
		t.Skipf("not privileged: %v", err)
	}
	if err := CheckKernel(); err != nil {
		t.Fatalf("CheckKernel on this machine: %v", err)
	}
}
