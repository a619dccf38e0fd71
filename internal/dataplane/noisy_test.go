package dataplane

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/testutil"
)

// noisyNetns is the namespace cookie of the noisy pod the fill mimics.
const noisyNetns = 0x6e6f697379000000

// fillLike writes n entries from each CPU into the shared map name as a
// noisy pod's sockets would: keys of its own namespace (every key of these
// maps starts with the namespace cookie), each distinct and used. It
// returns how many the map took: a node-wide LRU takes every one and evicts older entries, a hash
// refuses them once full.
func fillLike(t *testing.T, dp *Dataplane, name string, n int, used bool, value []byte) int {
	t.Helper()
	m := dp.maps[name]
	key := make([]byte, m.KeySize())
	val := make([]byte, m.ValueSize())
	copy(val, value)
	// From every CPU in turn: an LRU keeps a per-CPU list of the entries
	// each CPU added last, which only that CPU hands over for eviction.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var all unix.CPUSet
	if err := unix.SchedGetaffinity(0, &all); err != nil {
		t.Fatal(err)
	}
	defer unix.SchedSetaffinity(0, &all)
	took := 0
	for cpu := 0; cpu < runtime.NumCPU(); cpu++ {
		if !all.IsSet(cpu) {
			continue
		}
		var one unix.CPUSet
		one.Set(cpu)
		if err := unix.SchedSetaffinity(0, &one); err != nil {
			t.Fatal(err)
		}
		took += fillKeys(t, m, key, val, cpu*n, n, used)
	}
	return took
}

// fillKeys writes the keys from..from+n-1; used: and looks each up from
// BPF right after, as the noisy pod's own programs use its entries (a
// lookup from a BPF program marks an LRU entry used; one from user space
// does not).
func fillKeys(t *testing.T, m *ebpf.Map, key, val []byte, from, n int, used bool) int {
	use := lookupProgram(t, m)
	took := 0
	for i := from; i < from+n; i++ {
		binary.LittleEndian.PutUint64(key[0:8], noisyNetns)
		binary.LittleEndian.PutUint32(key[8:12], uint32(i))
		if m.Put(key, val) == nil {
			took++
		}
		if !used {
			continue
		}
		if _, err := use.Run(&ebpf.RunOptions{Data: key}); err != nil {
			t.Fatalf("look up %s from BPF: %v", m, err)
		}
	}
	return took
}

// lookupProgram returns an XDP program that looks its packet up in m as a
// key (test runs only).
func lookupProgram(t *testing.T, m *ebpf.Map) *ebpf.Program {
	t.Helper()
	size := int16(m.KeySize())
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, 0, asm.Word), // xdp_md.data
		asm.LoadMem(asm.R3, asm.R1, 4, asm.Word), // xdp_md.data_end
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, int32(size)),
		asm.JGT.Reg(asm.R4, asm.R3, "out"),
	}
	for off := int16(0); off < size; off += 8 {
		insns = append(insns,
			asm.LoadMem(asm.R5, asm.R2, off, asm.DWord),
			asm.StoreMem(asm.RFP, off-size, asm.R5, asm.DWord))
	}
	insns = append(insns,
		asm.LoadMapPtr(asm.R1, m.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -int32(size)),
		asm.FnMapLookupElem.Call(),
		asm.Mov.Imm(asm.R0, 2).WithSymbol("out"), // XDP_PASS
		asm.Return(),
	)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, License: "GPL", Instructions: insns})
	if err != nil {
		t.Fatalf("load a lookup program for %s: %v", m, err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

// origDst answers getsockopt(SOL_IP, SO_ORIGINAL_DST) on c, as a sidecar
// asks it right after accept.
func origDst(c net.Conn) (netip.AddrPort, error) {
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var errno unix.Errno
	buf := make([]byte, 16)
	raw.Control(func(fd uintptr) {
		n := uint32(len(buf))
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IP, 80,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	})
	if errno != 0 {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", errno)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), uint16(buf[2])<<8|uint16(buf[3])), nil
}

// TestNoisyPodCannotBreakAnotherPod fills the node-wide maps the way one
// pod with very many connections does, while another pod's intercepted
// connection is between its handshake and its first byte: the sidecar has
// accepted but not yet asked SO_ORIGINAL_DST, and the app has not sent yet.
// The other pod must not notice: SO_ORIGINAL_DST names where its app
// connected, the pair still redirects every byte, nothing is lost, and its
// app endpoint is still counted.
//
// The noisy pod is mimicked with direct map updates, as many as it can
// cause: more than the capacity of the maps its app sockets fill, however
// many (orig_dsts, mesh_endpoints, pairs). The sockhash is sized at twice the fixed size pairs had before
// (131072), as --sockhash-size allows.
func TestNoisyPodCannotBreakAnotherPod(t *testing.T) {
	const capacity = 262144
	dp := installSized(t, capacity)
	pod, sidecars := interceptPod(t, dp)
	app, sidecar := intercepted(t, pod, sidecars, "10.77.0.1:8080")
	waitFor(t, 5*time.Second, func() bool { return counterOf(t, dp, pod.Cgroup.ID).SocketsInserted == 2 })
	before := counterOf(t, dp, pod.Cgroup.ID)

	// The noisy pod.
	for _, f := range []struct {
		name  string
		n     int
		used  bool // looked up by the noisy pod's programs
		value []byte
	}{
		{PinOrigDsts, int(dp.maps[PinOrigDsts].MaxEntries()) + 1024, false, []byte{10, 0, 0, 1}},
		{PinMeshEndpoints, int(dp.maps[PinMeshEndpoints].MaxEntries()) + 1024, false, []byte{1}},
		// Pairs: handshakes in flight (a SYN flood), beyond the map's
		// size: the app's joined pair, whose app has not sent yet, keeps
		// its entry (a hash refuses new entries when full; an LRU would
		// evict it).
		{PinPairs, int(dp.maps[PinPairs].MaxEntries())/runtime.NumCPU() + 1024, true, []byte{1}}, // PAIR_OFFERED
	} {
		took := fillLike(t, dp, f.name, f.n, f.used, f.value)
		t.Logf("noisy pod: %s (max %d) took %d of %d entries", f.name, dp.maps[f.name].MaxEntries(), took, runtime.NumCPU()*f.n)
	}

	// The sidecar asks where the app was going.
	if got, err := origDst(sidecar); err != nil || got.String() != "10.77.0.1:8080" {
		t.Errorf("SO_ORIGINAL_DST after the noisy pod: %v (%v), want 10.77.0.1:8080", got, err)
	}
	// The app's endpoint is still counted (one app socket uses it).
	ek := endpointKey{NetnsCookie: keyOf(app).NetnsCookie, Ip: keyOf(app).LocalIp, Port: keyOf(app).LocalPort}
	var users uint64
	if err := dp.maps[PinMeshEndpoints].Lookup(ek, &users); err != nil || users&0xffffffff != 1 {
		t.Errorf("the app endpoint's count after the noisy pod: %d (%v), want 1", users, err)
	}

	// The app sends its request before the sidecar's first read: every
	// byte arrives, redirected.
	body := bytes.Repeat([]byte("intercepted "), 64<<10/12)
	got := make(chan []byte, 1)
	if _, err := app.Write(body); err != nil {
		t.Fatal(err)
	}
	go func() {
		sidecar.SetDeadline(time.Now().Add(10 * time.Second))
		b, _ := io.ReadAll(io.LimitReader(sidecar, int64(len(body))))
		got <- b
	}()
	if b := <-got; !bytes.Equal(b, body) {
		t.Fatalf("the sidecar read %d of %d bytes (equal: false)", len(b), len(body))
	}
	d := counterOf(t, dp, pod.Cgroup.ID).Sub(before)
	t.Logf("after the noisy pod: redirected %d bytes, passed %d", d.RedirectedBytes, d.PassedBytes)
	if d.RedirectedBytes != uint64(len(body)) || d.PassedBytes != 0 {
		t.Errorf("redirected %d and passed %d bytes of %d: the pair no longer redirects", d.RedirectedBytes, d.PassedBytes, len(body))
	}
}

// installSized is install with a sockhash of the given capacity (0: the
// default).
func installSized(t *testing.T, capacity uint32) *Dataplane {
	t.Helper()
	pinDir := testutil.NewPinDir(t)
	dp, err := OpenOrCreate(Options{PinDir: pinDir, SockhashMaxEntries: capacity})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if d, err := Open(Options{PinDir: pinDir}); err == nil {
			if err := d.Uninstall(); err != nil {
				t.Errorf("uninstall: %v", err)
			}
		}
		dp.Close()
	})
	return dp
}

// interceptPod makes a pod in intercept mode (istio preset) with its
// sidecar's listener on 127.0.0.1:15001, in the pod's cgroup.
func interceptPod(t *testing.T, dp *Dataplane) (*testutil.Pod, net.Listener) {
	t.Helper()
	pod := interceptPodNoSidecar(t, dp)
	return pod, pod.Listen(t, "127.0.0.1:15001")
}

// interceptPodNoSidecar is a pod enabled in intercept mode (istio's
// outbound port 15001) whose sidecar the test sets up itself.
func interceptPodNoSidecar(t *testing.T, dp *Dataplane) *testutil.Pod {
	t.Helper()
	pod := testutil.NewPod(t)
	mesh := MeshPresets["istio"]
	mesh.Intercept = true
	if _, err := dp.Enable(pod.Cgroup, EnableOptions{Mesh: &mesh, NoProbation: true}); err != nil {
		t.Fatal(err)
	}
	return pod
}

// intercepted connects the pod's app to dst, which lands on the sidecar,
// and returns the app's connection and the sidecar's accepted one.
func intercepted(t *testing.T, pod *testutil.Pod, sidecars net.Listener, dst string) (app, sidecar net.Conn) {
	t.Helper()
	app, sidecar = acceptDialed(t, sidecars, "the sidecar", func() net.Conn { return pod.Dial(t, nil, dst) })
	if got := app.RemoteAddr().String(); got != "127.0.0.1:15001" {
		t.Fatalf("the app's connect to %s went to %s, not to the sidecar", dst, got)
	}
	return app, sidecar
}

// TestNoisyPodFillingTheSockhash: a pod whose real intercepted connections
// fill the sockhash (capacity 64) leaves another pod's intercepted
// connections working on plain TCP: SO_ORIGINAL_DST names where the app
// was going and every byte arrives. Once the noisy connections close, the
// other pod's next connection is redirected again.
func TestNoisyPodFillingTheSockhash(t *testing.T) {
	dp := installSized(t, 64)
	noisy, noisySidecars := interceptPod(t, dp)
	victim, victimSidecars := interceptPod(t, dp)
	var held []net.Conn
	for i := 0; i < 100; i++ {
		app, sidecar := intercepted(t, noisy, noisySidecars, fmt.Sprintf("10.66.0.%d:80", i+1))
		held = append(held, app, sidecar)
	}
	waitFor(t, 5*time.Second, func() bool { s, err := dp.Sockets(); return err == nil && len(s) == 64 })

	roundTrip := func(wantRedirected bool) {
		t.Helper()
		before := counterOf(t, dp, victim.Cgroup.ID)
		app, sidecar := intercepted(t, victim, victimSidecars, "10.77.0.1:8080")
		if got, err := origDst(sidecar); err != nil || got.String() != "10.77.0.1:8080" {
			t.Errorf("SO_ORIGINAL_DST: %v (%v), want 10.77.0.1:8080", got, err)
		}
		body := bytes.Repeat([]byte("victim "), 64<<10/7)
		if _, err := app.Write(body); err != nil {
			t.Fatal(err)
		}
		sidecar.SetDeadline(time.Now().Add(10 * time.Second))
		got := make([]byte, len(body))
		if _, err := io.ReadFull(sidecar, got); err != nil || !bytes.Equal(got, body) {
			t.Fatalf("the sidecar read %v, equal %v", err, bytes.Equal(got, body))
		}
		d := counterOf(t, dp, victim.Cgroup.ID).Sub(before)
		t.Logf("sockhash full %v: redirected %d, passed %d, insert failures %d", !wantRedirected, d.RedirectedBytes, d.PassedBytes, d.InsertFailures)
		if wantRedirected && d.RedirectedBytes != uint64(len(body)) {
			t.Errorf("redirected %d bytes of %d", d.RedirectedBytes, len(body))
		}
		if !wantRedirected && (d.InsertFailures == 0 || d.RedirectedBytes != 0 || d.PassedBytes != 0) {
			t.Errorf("with the sockhash full: %d insert failures, %d bytes redirected, %d passed: want plain TCP", d.InsertFailures, d.RedirectedBytes, d.PassedBytes)
		}
		app.Close()
		sidecar.Close()
	}
	roundTrip(false)

	for _, c := range held {
		c.Close()
	}
	waitFor(t, 5*time.Second, func() bool { s, err := dp.Sockets(); return err == nil && len(s) == 0 })
	roundTrip(true)
}
