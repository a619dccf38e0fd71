#!/usr/bin/env bash
# What attaching programs at all costs a short connection (issue 28): the
# same loop of short connections (e2e/hookfloor/connloop.c: connect, 64 B
# each way, close; blocking sockets, one thread on CPU 0) in four cgroups,
# alternating each round: nothing attached; an empty sock_ops program only;
# empty sock_ops and cgroup/sock_release programs (e2e/minimal, the hooks
# sockbypass attaches); and sockbypass enabled (its plain path: blocking
# sockets never pair). Prints each cgroup's median connections/s, ns per
# connection, and the median of the per-round ratios to the first, with
# their range.
#
#   e2e/hook-floor.sh [ROUNDS] [SECONDS]      # default 12 rounds of 2 s
#
# Root; needs bin/sockbypass (make build), bpftool and clang-16 (or $CC).
# Removes its programs, pins and cgroups on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-12}
secs=${2:-2}
bin=$PWD/bin/sockbypass
cc=${CC:-clang-16}
cg2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
[ -n "$cg2" ] || { echo "hook-floor.sh: no cgroup2 mount" >&2; exit 1; }
tmp=$(mktemp -d)
pin=/sys/fs/bpf/sockbypass-hookfloor-$$
empty=/sys/fs/bpf/sockbypass-hookfloor-empty-$$
names=(plain empty-sock_ops empty-sock_ops+sock_release sockbypass)
cgs=()
for n in "${names[@]}"; do cgs+=("$cg2/sockbypass-hookfloor-$$-$n"); done
cleanup() {
	"$bin" uninstall --bpffs-dir "$pin" >/dev/null 2>&1 || true
	for d in "${cgs[@]}"; do
		for _ in $(seq 50); do rmdir "$d" 2>/dev/null && break || sleep 0.1; done
	done
	rm -rf "$empty" "$tmp"
}
trap cleanup EXIT
"$cc" -O2 -Wall -o "$tmp/connloop" e2e/hookfloor/connloop.c
mkdir -p "${cgs[@]}"
bpftool prog loadall e2e/minimal/minimal_bpfel.o "$empty"
bpftool cgroup attach "${cgs[1]}" sock_ops pinned "$empty/empty_sockops"
bpftool cgroup attach "${cgs[2]}" sock_ops pinned "$empty/empty_sockops"
bpftool cgroup attach "${cgs[2]}" sock_release pinned "$empty/empty_release"
"$bin" enable --bpffs-dir "$pin" --cgroup "${cgs[3]}" >/dev/null 2>"$tmp/enable.err" || { cat "$tmp/enable.err" >&2; exit 1; }
for r in $(seq "$rounds"); do
	for i in "${!names[@]}"; do
		v=$(bash -c 'echo $$ > "$1/cgroup.procs"; exec "$2" "$3"' _ "${cgs[$i]}" "$tmp/connloop" "$secs")
		echo "$r ${names[$i]} $v"
	done
done >"$tmp/runs"
echo "Short connections, $rounds alternating rounds of $secs s (kernel $(uname -r)):"
echo
echo "| cgroup | connections/s (median) | ns per connection | median per-round ratio to plain [min, max] |"
echo "|---|---:|---:|---|"
awk '
{ v[$2, $1] = $3; if (!($2 in seen)) { seen[$2] = 1; order[++n] = $2 } rounds[$1] = 1 }
function median(a, k,   i, j, t) {
	for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
	return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
}
END {
	for (g = 1; g <= n; g++) {
		k = 0; delete x; delete y
		for (r in rounds) { x[++k] = v[order[g], r]; y[k] = v[order[g], r] / v[order[1], r] }
		m = median(x, k); lo = y[1]; hi = y[1]
		for (i = 1; i <= k; i++) { if (y[i] < lo) lo = y[i]; if (y[i] > hi) hi = y[i] }
		printf "| %s | %.0f | %.0f | %.3fx [%.3f, %.3f] |\n", order[g], m, 1e9 / m, median(y, k), lo, hi
	}
}' "$tmp/runs"
