package soak

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/sockdiag"
)

// sockStateMap is the one map MapEntryCounts cannot count (socket storage
// has no keys to walk): the soak counts the sockets that hold an entry
// with the kernel's socket diagnostics, in the host's namespace and in
// each of its own live ones.
const sockStateMap = dataplane.PinSockState

// Phases of the run, in the CSV.
const (
	phaseBaseline = "baseline"
	phaseLoad     = "load"
	phaseStop     = "stop"
	phaseSettle   = "settle"
)

// sample is one reading of every map and of memory.
type sample struct {
	at     time.Duration // since the load started (negative before)
	phase  string
	counts map[string]int
	mem    memSample
	ok     int64 // connections completed so far, all kinds
	failed int64
	took   time.Duration
	// tookMaps and tookSocks: of took, the map counts and the socket
	// diagnostics.
	tookMaps, tookSocks time.Duration
}

type memSample struct {
	slabKiB, sunreclaimKiB        int64 // /proc/meminfo
	tcpAlloc, tcpOrphan, tcpPages int64 // /proc/net/sockstat: global TCP sockets, orphans, memory pages
	goHeapKiB                     int64 // this process's Go heap in use
}

// sampler reads every map's entry count (and memory) once a second.
type sampler struct {
	e     *env
	kinds []*kind
	mu    sync.Mutex
	all   []sample
	phase string
	zero  time.Time
	stop  chan struct{}
	done  chan struct{}
}

func newSampler(e *env, kinds []*kind) *sampler {
	return &sampler{e: e, kinds: kinds, phase: phaseBaseline, zero: time.Now()}
}

// read takes one sample now and records it.
func (s *sampler) read() (sample, error) {
	start := time.Now()
	counts, err := s.e.dp.MapEntryCounts()
	if err != nil {
		return sample{}, err
	}
	tookMaps := time.Since(start)
	socks, err := s.e.storageSockets()
	if err != nil {
		return sample{}, err
	}
	tookSocks := time.Since(start) - tookMaps
	counts[sockStateMap] = len(socks)
	mem, err := readMem()
	if err != nil {
		return sample{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	smp := sample{at: start.Sub(s.zero), phase: s.phase, counts: counts, mem: mem, took: time.Since(start), tookMaps: tookMaps, tookSocks: tookSocks}
	for _, k := range s.kinds {
		smp.ok += k.st.ok.Load()
		smp.failed += k.st.failed.Load() + k.st.integrity.Load()
	}
	s.all = append(s.all, smp)
	return smp, nil
}

func (s *sampler) setPhase(p string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.phase = p
}

// startLoad puts t=0 at now.
func (s *sampler) startLoad() {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	shift := now.Sub(s.zero)
	for i := range s.all {
		s.all[i].at -= shift
	}
	s.zero = now
	s.phase = phaseLoad
}

// run samples every interval until close, logging a progress line every
// 10 samples.
func (s *sampler) run(interval time.Duration, progress func(sample)) {
	s.stop = make(chan struct{})
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for i := 1; ; i++ {
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
			smp, err := s.read()
			if err != nil {
				s.e.log.Sugar().Warnf("sample: %v", err)
				continue
			}
			if i%10 == 0 {
				progress(smp)
			}
		}
	}()
}

func (s *sampler) close() {
	if s.stop != nil {
		close(s.stop)
		<-s.done
		s.stop = nil
	}
}

func (s *sampler) samples() []sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]sample(nil), s.all...)
}

// storageSocket is a socket that holds a sock_state entry.
type storageSocket struct {
	netns string
	sock  sockdiag.Socket
}

// storageStates are the states of the sockets that can hold socket
// storage: full sockets. TIME-WAIT sockets and request sockets (SYN-RECV)
// have none, and the soak makes tens of thousands of them: leaving them
// out of the dump makes it several times cheaper.
const storageStates = sockdiag.ConnectedStates | 1<<sockdiag.StateSynSent | 1<<sockdiag.StateClose | 1<<sockdiag.StateListen

// storageSockets lists the sockets with a sock_state entry in the host's
// namespace and the soak's live ones (a namespace that goes away meanwhile
// is skipped).
func (e *env) storageSockets() ([]storageSocket, error) {
	req := sockdiag.Request{States: storageStates, StorageMapFDs: []int{e.dp.SockStateMap().FD()}}
	var out []storageSocket
	add := func(netns string, socks []sockdiag.Socket) {
		for _, s := range socks {
			if len(s.Storages) > 0 {
				out = append(out, storageSocket{netns: netns, sock: s})
			}
		}
	}
	host, err := sockdiag.DumpNetns("/proc/self/ns/net", req)
	if err != nil {
		return nil, fmt.Errorf("socket diagnostics of the host namespace: %w", err)
	}
	add("host", host)
	for _, path := range e.liveNamespaces() {
		socks, err := sockdiag.DumpNetns(path, req)
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.EINVAL) {
			continue
		}
		if err != nil {
			// A namespace being removed: its sockets are counted when
			// they are somewhere else, never.
			e.log.Sugar().Debugf("socket diagnostics of %s: %v", path, err)
			continue
		}
		add(filepath.Base(path), socks)
	}
	return out, nil
}

// readMem reads the kernel's slab and TCP memory and this process's heap.
func readMem() (memSample, error) {
	var m memSample
	mi, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return m, err
	}
	for _, line := range strings.Split(string(mi), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "Slab:":
			m.slabKiB = v
		case "SUnreclaim:":
			m.sunreclaimKiB = v
		}
	}
	f, err := os.Open("/proc/net/sockstat")
	if err != nil {
		return m, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || fields[0] != "TCP:" {
			continue
		}
		for i := 1; i+1 < len(fields); i += 2 {
			v, _ := strconv.ParseInt(fields[i+1], 10, 64)
			switch fields[i] {
			case "alloc":
				m.tcpAlloc = v
			case "orphan":
				m.tcpOrphan = v
			case "mem":
				m.tcpPages = v
			}
		}
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	m.goHeapKiB = int64(ms.HeapInuse >> 10)
	return m, sc.Err()
}

// keyedMaps are the maps whose keys say what an entry is for: their
// entries are kept at the baseline and at the end, and the difference is
// put down to workloads (see attribute).
var keyedMaps = []string{
	dataplane.PinSockhash, dataplane.PinSocketCgs, dataplane.PinPairs, dataplane.PinListeners, dataplane.PinStackProcs,
	dataplane.PinOrigDsts, dataplane.PinMeshEndpoints, dataplane.PinMeshSyns, dataplane.PinMeshClients, dataplane.PinInboundPods,
	dataplane.PinNodeAddrs, dataplane.PinTCDevices, dataplane.PinTCUsers, dataplane.PinCgroupSlots,
}

// entries is a map's content: raw key -> raw value.
type entries map[string][]byte

// readEntries reads the keyed maps, through their pins (read-only).
func (e *env) readEntries() (map[string]entries, error) {
	out := map[string]entries{}
	for _, name := range keyedMaps {
		m, err := ebpf.LoadPinnedMap(filepath.Join(e.dp.PinDir(), name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", name, err)
		}
		ents := entries{}
		var key []byte
		for steps := 0; steps < 2*int(m.MaxEntries())+2; steps++ {
			var next []byte
			if key == nil {
				next, err = m.NextKeyBytes(nil)
			} else {
				next, err = m.NextKeyBytes(key)
			}
			if err != nil || next == nil {
				break
			}
			v, lerr := m.LookupBytes(next)
			if lerr == nil && v != nil {
				ents[string(next)] = v
			}
			key = next
		}
		m.Close()
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", name, err)
		}
		out[name] = ents
	}
	return out, nil
}

// mapNames returns the names of the counted maps, sorted, sock_state
// last.
func mapNames(smp sample) []string {
	var names []string
	for n := range smp.counts {
		if n != sockStateMap {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return append(names, sockStateMap)
}
