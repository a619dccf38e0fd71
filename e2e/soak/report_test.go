package soak

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/sockbypass/sockbypass/internal/dataplane"
	"github.com/sockbypass/sockbypass/internal/sockdiag"
	"github.com/sockbypass/sockbypass/sockops"
	"github.com/sockbypass/sockbypass/tc"
)

// What each map must do once the load has stopped, every socket is
// closed and every pod and churned cgroup is gone.
const (
	ruleExact = "exact" // back to its baseline, ±0
	ruleKept  = "kept"  // one entry per cgroup enabled during the run, by design
	ruleState = "state" // one entry user space keeps (the offer epoch), by design
)

// mapRule: every map returns exactly to its baseline, except the slots of
// cgroups: a cgroup keeps its slot (cgroup_slots) and its counters
// (cgroup_counters) after it is disabled or removed, until all 4095 slots
// are in use and it has no live socket (docs/ARCHITECTURE.md, "Slots"):
// those may grow by at most one per cgroup the soak made, and
// cgroup_counters by slot 0 too (traffic of no enabled cgroup).
func mapRule(name string) string {
	switch name {
	case dataplane.PinCgroupSlots, dataplane.PinCounters:
		return ruleKept
	case dataplane.PinOfferEpoch:
		return ruleState
	}
	return ruleExact
}

// attribute says which workload an entry of map name belongs to, and
// what it is.
func (e *env) attribute(name string, k, v []byte) (kindName, detail string) {
	switch name {
	case dataplane.PinSockhash, dataplane.PinPairs:
		var key sockops.SockKey
		if _, err := binary.Decode(k, binary.NativeEndian, &key); err != nil {
			return "", err.Error()
		}
		kindName = kindOfPort(key.RemotePort)
		if kindName == "" {
			kindName = kindOfPort(key.LocalPort)
		}
		if kindName == "" {
			kindName = e.reg.kindOfNetns(key.NetnsCookie)
		}
		detail = fmt.Sprintf("%s -> %s", key.Local(), key.Remote())
		note := e.reg.noteOf(key.Remote(), key.Local())
		if note == "" {
			note = e.reg.netnsNote(key.NetnsCookie)
		}
		if note != "" {
			detail += " (" + note + ")"
		}
		if name == dataplane.PinPairs {
			var p sockops.Pair
			if _, err := binary.Decode(v, binary.NativeEndian, &p); err == nil {
				detail = fmt.Sprintf("%s, %s", pairStateName(p.State), detail)
			}
		}
		return kindName, detail
	case dataplane.PinListeners, dataplane.PinMeshEndpoints, dataplane.PinOrigDsts, dataplane.PinMeshClients:
		var key sockops.EndpointKey
		if _, err := binary.Decode(k, binary.NativeEndian, &key); err != nil {
			return "", err.Error()
		}
		addr := netip.AddrPortFrom(sockops.AddrFromC(key.Ip), key.Port)
		if name == dataplane.PinListeners {
			kindName = kindOfPort(key.Port)
		}
		if kindName == "" {
			kindName = e.reg.kindOfNetns(key.NetnsCookie)
		}
		if kindName == "" {
			kindName = e.reg.kindOfAddr(addr.Addr())
		}
		detail = addr.String()
		if name == dataplane.PinListeners && len(v) >= 8 {
			detail = fmt.Sprintf("%s flags %#x", addr, binary.NativeEndian.Uint64(v))
		}
		note := e.reg.netnsNote(key.NetnsCookie)
		if note == "" {
			note = e.reg.noteOf(addr)
		}
		if note != "" {
			detail += " (" + note + ")"
		}
		return kindName, detail
	case dataplane.PinMeshSyns:
		cookie := binary.NativeEndian.Uint64(k)
		return e.reg.kindOfNetns(cookie), fmt.Sprintf("netns cookie %d %s", cookie, e.reg.netnsNote(cookie))
	case dataplane.PinSocketCgs:
		id := binary.NativeEndian.Uint64(v)
		info, _ := e.reg.cgroup(id)
		return info.kind, fmt.Sprintf("socket cookie %d, cgroup %s", binary.NativeEndian.Uint64(k), cgName(info))
	case dataplane.PinCgroupSlots:
		id := binary.NativeEndian.Uint64(k)
		info, _ := e.reg.cgroup(id)
		return info.kind, "cgroup " + cgName(info)
	case dataplane.PinNodeAddrs, dataplane.PinInboundPods:
		var key sockops.NodeAddrKey
		if _, err := binary.Decode(k, binary.NativeEndian, &key); err != nil {
			return "", err.Error()
		}
		a := sockops.AddrFromC(key.Ip)
		return e.reg.kindOfAddr(a), a.String()
	case dataplane.PinTCDevices:
		var key tc.DeviceKey
		if _, err := binary.Decode(k, binary.NativeEndian, &key); err != nil {
			return "", err.Error()
		}
		return e.reg.kindOfNsIno(key.NetnsIno), fmt.Sprintf("netns inode %d ifindex %d", key.NetnsIno, key.Ifindex)
	case dataplane.PinTCUsers:
		var key tc.UserKey
		if _, err := binary.Decode(k, binary.NativeEndian, &key); err != nil {
			return "", err.Error()
		}
		info, _ := e.reg.cgroup(key.CgroupId)
		return info.kind, fmt.Sprintf("cgroup %s, netns inode %d ifindex %d", cgName(info), key.Dev.NetnsIno, key.Dev.Ifindex)
	case dataplane.PinStackProcs:
		return "", fmt.Sprintf("pid %d", binary.NativeEndian.Uint32(k))
	}
	return "", ""
}

func cgName(c cgInfo) string {
	if c.note != "" {
		return c.name + " (" + c.note + ")"
	}
	return c.name
}

func pairStateName(s uint64) string {
	names := map[uint64]string{
		dataplane.PairOffered: "OFFERED", dataplane.PairClientJoined: "CLIENT_JOINED", dataplane.PairJoined: "JOINED",
		dataplane.PairDeclined: "DECLINED", dataplane.PairAbandoned: "ABANDONED", dataplane.PairDryOffered: "DRY_OFFERED",
		dataplane.PairDryClient: "DRY_CLIENT", dataplane.PairDryJoined: "DRY_JOINED",
	}
	if n, ok := names[s]; ok {
		return n
	}
	return fmt.Sprintf("state %d", s)
}

// leftover is what a map holds at the end that it did not at the
// baseline, by workload.
type leftover struct {
	entries []leftEntry
	byKind  map[string]int
	details map[string][]string // kind -> a few entries
	removed int                 // baseline entries gone
}

// leftEntry is one entry a map kept: its workload and what it is.
type leftEntry struct {
	kind, detail string
}

func (l *leftover) add(kind, detail string) {
	l.entries = append(l.entries, leftEntry{kind, detail})
	l.byKind[kind]++
	if len(l.details[kind]) < 5 {
		l.details[kind] = append(l.details[kind], detail)
	}
}

func (l leftover) String() string {
	if len(l.byKind) == 0 && l.removed == 0 {
		return ""
	}
	var kinds []string
	for k := range l.byKind {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	var parts []string
	for _, k := range kinds {
		name := k
		if name == "" {
			name = "(unattributed)"
		}
		parts = append(parts, fmt.Sprintf("%s +%d", name, l.byKind[k]))
	}
	if l.removed > 0 {
		parts = append(parts, fmt.Sprintf("%d baseline entries gone", l.removed))
	}
	return strings.Join(parts, ", ")
}

// leftovers compares the keyed maps' entries at the end with the
// baseline's, and the sockets holding sock_state entries.
func (e *env) leftovers(base, final map[string]entries, baseSocks, finalSocks []storageSocket) map[string]leftover {
	out := map[string]leftover{}
	for _, name := range keyedMaps {
		l := leftover{byKind: map[string]int{}, details: map[string][]string{}}
		for k, v := range final[name] {
			if _, ok := base[name][k]; ok {
				continue
			}
			kind, detail := e.attribute(name, []byte(k), v)
			l.add(kind, detail)
		}
		for k := range base[name] {
			if _, ok := final[name][k]; !ok {
				l.removed++
			}
		}
		out[name] = l
	}
	l := leftover{byKind: map[string]int{}, details: map[string][]string{}}
	seen := map[uint64]bool{}
	for _, s := range baseSocks {
		seen[s.sock.Cookie] = true
	}
	for _, s := range finalSocks {
		if seen[s.sock.Cookie] {
			continue
		}
		kind := kindOfPort(s.sock.Local.Port())
		if kind == "" {
			kind = kindOfPort(s.sock.Remote.Port())
		}
		l.add(kind, fmt.Sprintf("%s %s -> %s in %s", sockdiag.StateName(s.sock.State), s.sock.Local, s.sock.Remote, s.netns))
	}
	out[sockStateMap] = l
	return out
}

// mapRow is one line of the summary.
type mapRow struct {
	name, rule                   string
	baseline, peak, final, bound int
	ok                           bool
	left                         leftover
}

func summarize(samples []sample, base sample, final sample, left map[string]leftover, cgroupsEnabled int) []mapRow {
	var rows []mapRow
	for _, name := range mapNames(base) {
		r := mapRow{name: name, rule: mapRule(name), baseline: base.counts[name], final: final.counts[name], left: left[name]}
		for _, s := range samples {
			r.peak = max(r.peak, s.counts[name])
		}
		switch r.rule {
		case ruleExact:
			r.bound = r.baseline
			r.ok = r.final == r.baseline
		case ruleKept:
			r.bound = r.baseline + cgroupsEnabled + 1
			r.ok = r.final <= r.bound
		case ruleState:
			r.bound = 1
			r.ok = r.final <= r.bound
		}
		rows = append(rows, r)
	}
	return rows
}

func writeMapTable(w io.Writer, rows []mapRow) {
	fmt.Fprintln(w, "| map | must | baseline | peak | final | back to baseline | left at the end, by workload |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
	for _, r := range rows {
		must := "return to baseline (±0)"
		back := "yes"
		if r.final != r.baseline {
			back = fmt.Sprintf("no (%+d)", r.final-r.baseline)
		}
		switch r.rule {
		case ruleKept:
			must = fmt.Sprintf("kept by design: at most baseline + 1 per cgroup made + slot 0 (%d)", r.bound)
		case ruleState:
			must = "kept by design: the one entry user space keeps (1)"
		}
		if r.rule != ruleExact && r.final != r.baseline && r.ok {
			back = fmt.Sprintf("no (%+d, within the bound)", r.final-r.baseline)
		}
		fmt.Fprintf(w, "| %s | %s | %d | %d | %d | %s | %s |\n", r.name, must, r.baseline, r.peak, r.final, back, r.left)
	}
}

func writeLeftoverDetails(w io.Writer, rows []mapRow) {
	for _, r := range rows {
		if r.rule != ruleExact || len(r.left.byKind) == 0 {
			continue
		}
		var kinds []string
		for k := range r.left.details {
			kinds = append(kinds, k)
		}
		sort.Strings(kinds)
		for _, k := range kinds {
			known := 0
			for _, e := range r.left.entries {
				if e.kind == k && knownLeakOf(r.name, e) >= 0 {
					known++
				}
			}
			status := "NEW, fails the test"
			switch {
			case known == r.left.byKind[k]:
				status = "known leak (issue 27)"
			case known > 0:
				status = fmt.Sprintf("%d known (issue 27), %d NEW", known, r.left.byKind[k]-known)
			}
			fmt.Fprintf(w, "- %s from %s: +%d, %s; e.g.: %s\n", r.name, orUnattributed(k), r.left.byKind[k], status, strings.Join(r.left.details[k], "; "))
		}
	}
}

func orUnattributed(k string) string {
	if k == "" {
		return "(unattributed)"
	}
	return k
}

// kindRow is one workload's line of the summary: its connections and its
// cgroups' counters.
type kindRow struct {
	name     string
	st       *kindStats
	counters dataplane.CgroupCounters
	passed   []string // its cgroups whose members sent bytes through the stack
	passedOK []string // the same where it is by design (cgInfo.passOK)
	cgroups  int
	churn    int64
}

func writeKindTable(w io.Writer, rows []kindRow) {
	fmt.Fprintln(w, "| workload | connections | ok | provoked errors | unexpected errors | bytes not intact | MiB checked | cgroups | churn events | sockets inserted | MiB redirected | passed_bytes |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range rows {
		fmt.Fprintf(w, "| %s | %d | %d | %d | %d | %d | %.1f | %d | %d | %d | %.1f | %d |\n", r.name, r.st.conns.Load(), r.st.ok.Load(),
			r.st.expected.Load(), r.st.failed.Load(), r.st.integrity.Load(), float64(r.st.bytes.Load())/(1<<20), r.cgroups, r.churn,
			r.counters.SocketsInserted, float64(r.counters.RedirectedBytes)/(1<<20), r.counters.PassedBytes)
	}
}

func writeMemTable(w io.Writer, base, peak, final memSample) {
	fmt.Fprintln(w, "| memory | baseline | peak | final |")
	fmt.Fprintln(w, "|---|---|---|---|")
	row := func(name string, f func(memSample) int64, unit string) {
		fmt.Fprintf(w, "| %s | %d %s | %d %s | %d %s |\n", name, f(base), unit, f(peak), unit, f(final), unit)
	}
	row("Slab (/proc/meminfo)", func(m memSample) int64 { return m.slabKiB }, "KiB")
	row("SUnreclaim", func(m memSample) int64 { return m.sunreclaimKiB }, "KiB")
	row("TCP sockets allocated (sockstat alloc)", func(m memSample) int64 { return m.tcpAlloc }, "")
	row("TCP orphans", func(m memSample) int64 { return m.tcpOrphan }, "")
	row("TCP memory (sockstat mem)", func(m memSample) int64 { return m.tcpPages }, "pages")
	row("Go heap in use (this process)", func(m memSample) int64 { return m.goHeapKiB }, "KiB")
}

func peakMem(samples []sample) memSample {
	var p memSample
	for _, s := range samples {
		p.slabKiB = max(p.slabKiB, s.mem.slabKiB)
		p.sunreclaimKiB = max(p.sunreclaimKiB, s.mem.sunreclaimKiB)
		p.tcpAlloc = max(p.tcpAlloc, s.mem.tcpAlloc)
		p.tcpOrphan = max(p.tcpOrphan, s.mem.tcpOrphan)
		p.tcpPages = max(p.tcpPages, s.mem.tcpPages)
		p.goHeapKiB = max(p.goHeapKiB, s.mem.goHeapKiB)
	}
	return p
}

// series are the CSV's columns and the plot's panels after the maps.
var memSeries = []struct {
	name string
	get  func(memSample) float64
}{
	{"slab_mib", func(m memSample) float64 { return float64(m.slabKiB) / 1024 }},
	{"sunreclaim_mib", func(m memSample) float64 { return float64(m.sunreclaimKiB) / 1024 }},
	{"tcp_alloc", func(m memSample) float64 { return float64(m.tcpAlloc) }},
	{"tcp_mem_pages", func(m memSample) float64 { return float64(m.tcpPages) }},
	{"go_heap_mib", func(m memSample) float64 { return float64(m.goHeapKiB) / 1024 }},
}

func writeCSV(path string, samples []sample) error {
	if len(samples) == 0 {
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	names := mapNames(samples[0])
	cols := append([]string{"t_s", "phase"}, names...)
	for _, m := range memSeries {
		cols = append(cols, m.name)
	}
	cols = append(cols, "conns_ok", "conns_failed", "sample_ms")
	fmt.Fprintln(f, strings.Join(cols, ","))
	for _, s := range samples {
		row := []string{fmt.Sprintf("%.1f", s.at.Seconds()), s.phase}
		for _, n := range names {
			row = append(row, fmt.Sprint(s.counts[n]))
		}
		for _, m := range memSeries {
			row = append(row, fmt.Sprintf("%.1f", m.get(s.mem)))
		}
		row = append(row, fmt.Sprint(s.ok), fmt.Sprint(s.failed), fmt.Sprintf("%.1f", float64(s.took.Microseconds())/1000))
		fmt.Fprintln(f, strings.Join(row, ","))
	}
	return f.Close()
}

// writeSVG draws one small panel per map (and per memory series): its
// count over time as a polyline, its baseline dashed, the end of the load
// as a vertical line; a panel whose map did not return to its baseline is
// framed in red.
func writeSVG(path string, samples []sample, rows []mapRow, loadEnd time.Duration, title string) error {
	if len(samples) == 0 {
		return nil
	}
	type panel struct {
		name     string
		values   []float64
		baseline float64
		bad      bool
		caption  string
	}
	var panels []panel
	for _, r := range rows {
		p := panel{name: r.name, baseline: float64(r.baseline), bad: !r.ok,
			caption: fmt.Sprintf("baseline %d, peak %d, final %d", r.baseline, r.peak, r.final)}
		for _, s := range samples {
			p.values = append(p.values, float64(s.counts[r.name]))
		}
		panels = append(panels, p)
	}
	for _, m := range memSeries {
		p := panel{name: m.name}
		for _, s := range samples {
			p.values = append(p.values, m.get(s.mem))
		}
		for _, s := range samples {
			if s.phase == phaseBaseline {
				p.baseline = m.get(s.mem)
			}
		}
		p.caption = fmt.Sprintf("baseline %.1f, peak %.1f, final %.1f", p.baseline, maxOf(p.values), p.values[len(p.values)-1])
		panels = append(panels, p)
	}
	const cols, pw, ph, pad, top = 4, 330, 170, 14, 40
	rowsN := (len(panels) + cols - 1) / cols
	width, height := cols*(pw+pad)+pad, top+rowsN*(ph+pad)+pad
	t0, t1 := samples[0].at.Seconds(), samples[len(samples)-1].at.Seconds()
	if t1 <= t0 {
		t1 = t0 + 1
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">`+"\n", width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/><text x="%d" y="24" font-size="15">%s</text>`+"\n", pad, xmlEscape(title))
	for i, p := range panels {
		x0 := pad + (i%cols)*(pw+pad)
		y0 := top + (i/cols)*(ph+pad)
		// Plot area inside the panel.
		px, py, pwi, phi := x0+44, y0+22, pw-54, ph-44
		frame := "#999"
		if p.bad {
			frame = "#d00"
		}
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="%s"/>`+"\n", x0, y0, pw, ph, frame)
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">%s</text>`+"\n", x0+6, y0+14, xmlEscape(p.name))
		fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#444">%s</text>`+"\n", x0+6, y0+ph-4, xmlEscape(p.caption))
		lo, hi := math.Min(minOf(p.values), p.baseline), math.Max(maxOf(p.values), p.baseline)
		if hi <= lo {
			hi = lo + 1
		}
		xOf := func(t float64) float64 { return float64(px) + (t-t0)/(t1-t0)*float64(pwi) }
		yOf := func(v float64) float64 { return float64(py+phi) - (v-lo)/(hi-lo)*float64(phi) }
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end" fill="#444">%s</text>`+"\n", px-4, py+8, fmtNum(hi))
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end" fill="#444">%s</text>`+"\n", px-4, py+phi, fmtNum(lo))
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#ccc"/>`+"\n", px, py+phi, px+pwi, py+phi)
		for _, t := range []float64{0, loadEnd.Seconds()} {
			if t >= t0 && t <= t1 {
				fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#88a" stroke-dasharray="2,2"/>`+"\n", xOf(t), py, xOf(t), py+phi)
				fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#88a" font-size="9">%.0fs</text>`+"\n", xOf(t), py+phi+10, t)
			}
		}
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#2a2" stroke-dasharray="5,3"/>`+"\n", px, yOf(p.baseline), px+pwi, yOf(p.baseline))
		var pts []string
		for j, v := range p.values {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", xOf(samples[j].at.Seconds()), yOf(v)))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="#14c" stroke-width="1.3" points="%s"/>`+"\n", strings.Join(pts, " "))
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#444">x: seconds since the load started (dashed blue: load start and end); dashed green: baseline; red frame: not back to its baseline</text>`+"\n", pad, height-4)
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

func minOf(v []float64) float64 {
	m := math.Inf(1)
	for _, x := range v {
		m = math.Min(m, x)
	}
	return m
}

func maxOf(v []float64) float64 {
	m := math.Inf(-1)
	for _, x := range v {
		m = math.Max(m, x)
	}
	return m
}

func fmtNum(v float64) string {
	if v == math.Trunc(v) {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}

func xmlEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}

// resultsDir returns where the run writes its files: SOAK_RESULTS, or
// e2e/results/soak-<time>/.
func resultsDir(cfg config) (string, error) {
	dir := cfg.results
	if dir == "" {
		dir = filepath.Join("..", "results", "soak-"+time.Now().UTC().Format("20060102-150405"))
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return dir, os.MkdirAll(dir, 0o755)
}
