package privilege

import (
	"bytes"
	"errors"
	"github.com/cilium/ebpf/btf"
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
	for _, want := range []string{"CAP_BPF", "CAP_NET_ADMIN"} {
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

// TestCapsErrorForUserAndRoot: a user is told to use root; root, whose
// capabilities were dropped, is told which one to grant back.
func TestCapsErrorForUserAndRoot(t *testing.T) {
	if err := capsError([]string{"CAP_BPF"}, 1000); !strings.Contains(err.Error(), "uid 1000 without CAP_BPF") || !strings.Contains(err.Error(), "sudo") {
		t.Errorf("user: %v", err)
	}
	err := capsError([]string{"CAP_PERFMON"}, 0)
	if !strings.Contains(err.Error(), "root without CAP_PERFMON") || strings.Contains(err.Error(), "run sockbypass as root") {
		t.Errorf("root: %v", err)
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

// specWith builds a BTF spec holding a function for each name.
func specWith(t *testing.T, names ...string) *btf.Spec {
	t.Helper()
	var types []btf.Type
	for _, n := range names {
		types = append(types, &btf.Func{Name: n, Type: &btf.FuncProto{Return: &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed}}, Linkage: btf.GlobalFunc})
	}
	b, err := btf.NewBuilder(types, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	spec, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

// TestBehaviourChecksNameWhatIsMissing: a kernel without tcp_bpf_ioctl (6.1)
// or without the sock_recv_length tracepoint is refused with the missing
// piece, its consequence and the kernel to use instead.
func TestBehaviourChecksNameWhatIsMissing(t *testing.T) {
	if err := checkBehaviour(specWith(t, "tcp_bpf_ioctl", "btf_trace_sock_recv_length")); err != nil {
		t.Fatalf("a kernel with both refused: %v", err)
	}
	for missing, want := range map[string][]string{
		"tcp_bpf_ioctl":              {"tcp_bpf_ioctl", "FIONREAD", "6.12"},
		"btf_trace_sock_recv_length": {"tracepoint sock_recv_length", "6.12"},
	} {
		var have []string
		for _, n := range []string{"tcp_bpf_ioctl", "btf_trace_sock_recv_length"} {
			if n != missing {
				have = append(have, n)
			}
		}
		err := checkBehaviour(specWith(t, have...))
		if !errors.Is(err, ErrKernelUnsupported) {
			t.Errorf("without %s: %v, want ErrKernelUnsupported", missing, err)
			continue
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("without %s: %q does not mention %q", missing, err, w)
			}
		}
	}
}
