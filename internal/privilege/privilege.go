// Package privilege checks, before anything is loaded, that this process may
// load and attach BPF programs and that the kernel has what sockbypass needs.
package privilege

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"
)

// Capability numbers from linux/capability.h.
const (
	CapNetAdmin = 12
	CapSysAdmin = 21
	CapPerfmon  = 38
	CapBPF      = 39
)

// ErrNotPrivileged is wrapped by Check when capabilities are missing.
var ErrNotPrivileged = errors.New("not privileged")

// ErrKernelUnsupported is wrapped by CheckKernel when the kernel lacks a
// feature sockbypass needs.
var ErrKernelUnsupported = errors.New("kernel unsupported")

// EffectiveCaps returns this process's effective capability set.
func EffectiveCaps() (uint64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, errors.New("no CapEff line in /proc/self/status")
}

// Check returns an error naming the missing capabilities when this process
// cannot load and attach sockbypass's programs: it needs CAP_NET_ADMIN,
// CAP_BPF and CAP_PERFMON (CAP_SYS_ADMIN stands in for the last two). It
// also lifts the memlock limit that kernels before 5.11 charge maps to.
func Check() error {
	caps, err := EffectiveCaps()
	if err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	if err := checkCaps(caps); err != nil {
		return err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("lift the memlock limit (needs CAP_SYS_RESOURCE on kernels before 5.11): %w", err)
	}
	return nil
}

func checkCaps(caps uint64) error {
	has := func(c uint) bool { return caps&(1<<c) != 0 }
	var missing []string
	if !has(CapBPF) && !has(CapSysAdmin) {
		missing = append(missing, "CAP_BPF")
	}
	if !has(CapPerfmon) && !has(CapSysAdmin) {
		missing = append(missing, "CAP_PERFMON")
	}
	if !has(CapNetAdmin) {
		missing = append(missing, "CAP_NET_ADMIN")
	}
	if len(missing) == 0 {
		return nil
	}
	return capsError(missing, os.Geteuid())
}

// capsError says which capabilities are missing and how to get them. Root
// that lacks them had them dropped (a container runtime, a systemd unit's
// CapabilityBoundingSet, capsh): "run as root" would not help there.
func capsError(missing []string, euid int) error {
	if euid == 0 {
		return fmt.Errorf("%w: running as root without %s (dropped from this process's capability set by its container runtime, systemd unit or parent): grant %s, e.g. securityContext.capabilities.add or AmbientCapabilities=",
			ErrNotPrivileged, strings.Join(missing, " and "), strings.Join(missing, ", "))
	}
	return fmt.Errorf("%w: running as uid %d without %s: run sockbypass as root (sudo sockbypass ...) or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN",
		ErrNotPrivileged, euid, strings.Join(missing, " and "))
}

// CheckKernel returns an error naming the missing feature when the kernel
// cannot run sockbypass: sockhash maps, sock_ops and sk_msg programs.
func CheckKernel() error {
	probes := []struct {
		name, config string
		probe        func() error
	}{
		{"sockhash maps", "CONFIG_BPF_STREAM_PARSER", func() error { return features.HaveMapType(ebpf.SockHash) }},
		{"sock_ops programs", "CONFIG_CGROUP_BPF", func() error { return features.HaveProgramType(ebpf.SockOps) }},
		{"sk_msg programs", "CONFIG_NET_SOCK_MSG", func() error { return features.HaveProgramType(ebpf.SkMsg) }},
	}
	for _, p := range probes {
		if err := p.probe(); err != nil {
			return kernelError(p.name, p.config, err)
		}
	}
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return fmt.Errorf("%w: read the kernel's BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF=y): %v", ErrKernelUnsupported, err)
	}
	return checkBehaviour(spec)
}

// Kernel behaviours sockbypass's transparency rests on, found in the
// kernel's BTF (measured under qemu: Debian 12's 6.1.0-56 has neither,
// Debian's 6.12 and 6.18 have both): a function by name, or a field of a
// struct that the programs read through BTF.
var behaviours = []struct {
	btfName, member, kind, why string
}{
	{"tcp_bpf_ioctl", "", "function",
		"FIONREAD on an accelerated socket counts only the bytes that came through the stack, so a reader that trusts it (nginx) stalls on redirected bytes"},
	{"bpf_rdonly_cast", "", "kfunc",
		"sk_msg could not read its own and its peer's state with plain loads before every message (whether either turned blocking or is leaving)"},
	{"btf_trace_tcp_rcv_space_adjust", "", "tracepoint",
		"nothing could tell how a socket is read (recvmsg, or splice that never sees redirected bytes), so listeners could not end their probation and splice readers would hang"},
	{"sk_psock", "msg_tot_len", "field",
		"a sender cannot read how many redirected bytes its reader has not read yet, so a stalled reader would let it queue without bound and a leaving member could not be removed without discarding them"},
}

// checkBehaviour returns ErrKernelUnsupported naming the first missing
// behaviour, the kernel to install instead, and what doctor would show.
func checkBehaviour(spec *btf.Spec) error {
	for _, b := range behaviours {
		name := b.btfName
		typ, err := spec.AnyTypeByName(b.btfName)
		if err == nil && b.member != "" {
			name = b.btfName + "." + b.member
			err = btf.ErrNotFound
			if st, ok := typ.(*btf.Struct); ok {
				for _, m := range st.Members {
					if m.Name == b.member {
						err = nil
					}
				}
			}
		}
		if err != nil {
			if !errors.Is(err, btf.ErrNotFound) {
				return fmt.Errorf("look up %s in the kernel's BTF: %w", b.btfName, err)
			}
			return fmt.Errorf("%w: this kernel (%s) lacks %s %s: %s; sockbypass accelerates nothing here. Use a kernel that has it, such as Debian's 6.12 (apt-get install -t bookworm-backports linux-image-cloud-amd64 on Debian 12)",
				ErrKernelUnsupported, kernelRelease(), b.kind, name, b.why)
		}
	}
	return nil
}

// kernelRelease returns uname -r, or "unknown".
func kernelRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

func kernelError(feature, config string, err error) error {
	if errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("%w: this kernel has no %s (%s): sockbypass needs Linux 5.10 or later built with %s=y", ErrKernelUnsupported, feature, err, config)
	}
	return fmt.Errorf("probe kernel for %s: %w", feature, err)
}
