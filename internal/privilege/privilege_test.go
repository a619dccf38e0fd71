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

// specWith builds a BTF spec holding a function for each name, and struct
// sk_psock with msg_tot_len when withMsgTotLen (with another field
// otherwise).
func specWith(t *testing.T, withMsgTotLen bool, names ...string) *btf.Spec {
	t.Helper()
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	field := "apply_bytes"
	if withMsgTotLen {
		field = "msg_tot_len"
	}
	types := []btf.Type{&btf.Struct{Name: "sk_psock", Size: 4, Members: []btf.Member{{Name: field, Type: u32}}}}
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
// or whose psock has no msg_tot_len (what sk_msg and sock_ops read) is
// refused with the missing piece, its consequence and the kernel to use
// instead.
func TestBehaviourChecksNameWhatIsMissing(t *testing.T) {
	if err := checkBehaviour(specWith(t, true, "tcp_bpf_ioctl", "bpf_rdonly_cast", "btf_trace_tcp_rcv_space_adjust")); err != nil {
		t.Fatalf("a kernel with all three refused: %v", err)
	}
	err := checkBehaviour(specWith(t, true, "bpf_rdonly_cast", "btf_trace_tcp_rcv_space_adjust"))
	for _, w := range []string{"function tcp_bpf_ioctl", "FIONREAD", "6.12"} {
		if !errors.Is(err, ErrKernelUnsupported) || !strings.Contains(err.Error(), w) {
			t.Errorf("without tcp_bpf_ioctl: %v, want ErrKernelUnsupported mentioning %q", err, w)
		}
	}
	err = checkBehaviour(specWith(t, true, "tcp_bpf_ioctl", "btf_trace_tcp_rcv_space_adjust"))
	for _, w := range []string{"kfunc bpf_rdonly_cast", "6.12"} {
		if !errors.Is(err, ErrKernelUnsupported) || !strings.Contains(err.Error(), w) {
			t.Errorf("without bpf_rdonly_cast: %v, want ErrKernelUnsupported mentioning %q", err, w)
		}
	}
	err = checkBehaviour(specWith(t, true, "tcp_bpf_ioctl", "bpf_rdonly_cast"))
	for _, w := range []string{"tracepoint btf_trace_tcp_rcv_space_adjust", "splice", "6.12"} {
		if !errors.Is(err, ErrKernelUnsupported) || !strings.Contains(err.Error(), w) {
			t.Errorf("without the tcp_rcv_space_adjust tracepoint: %v, want ErrKernelUnsupported mentioning %q", err, w)
		}
	}
	err = checkBehaviour(specWith(t, false, "tcp_bpf_ioctl", "bpf_rdonly_cast", "btf_trace_tcp_rcv_space_adjust"))
	for _, w := range []string{"field sk_psock.msg_tot_len", "not read yet", "6.12"} {
		if !errors.Is(err, ErrKernelUnsupported) || !strings.Contains(err.Error(), w) {
			t.Errorf("without sk_psock.msg_tot_len: %v, want ErrKernelUnsupported mentioning %q", err, w)
		}
	}
}
