#!/usr/bin/env bash
# The demo of README.md: enables sockbypass for a demo cgroup, runs the same
# loopback workloads in a plain cgroup and in the accelerated one, side by
# side, shows what the datapath counted, and removes everything it made.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

cg2=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
[ -n "$cg2" ] || { echo "demo: no cgroup v2 hierarchy is mounted" >&2; exit 1; }
pins=/sys/fs/bpf/sockbypass-demo-$$
plain=$cg2/sockbypass-demo-plain-$$
accel=$cg2/sockbypass-demo-accel-$$
bin=bin/sockbypass
bench_out=$(mktemp)

cleanup() {
	"$bin" uninstall --bpffs-dir "$pins" >/dev/null 2>&1 || true
	rmdir "$plain" "$accel" 2>/dev/null || true
	rm -f "$bench_out"
}
trap cleanup EXIT

go build -o bin/sockbench ./e2e/cmd/sockbench
mkdir -p "$plain" "$accel"

echo "== sockbypass enable --cgroup $accel --tc-dev lo"
"$bin" enable --cgroup "$accel" --tc-dev lo --bpffs-dir "$pins"
echo
echo "== same workloads, plain cgroup vs accelerated cgroup (median of alternating runs)"
# Progress lines are left out (--quiet); errors still show.
./bin/sockbench --quiet --plain-cgroup "$plain" --accel-cgroup "$accel" --runs "${RUNS:-3}" --duration "${DURATION:-500ms}" | tee "$bench_out"
echo
echo "== sockbypass stats (the accelerated cgroup's stack bytes are counted at its sockets; TC on lo also shows the plain runs, under no enabled cgroup)"
"$bin" stats --bpffs-dir "$pins"
echo
echo "== sockbypass status"
"$bin" status --bpffs-dir "$pins"
echo
echo "== the pinned maps, as bpftool sees them"
ls "$pins"
bpftool map show pinned "$pins/sockhash"
echo
# What was accelerated, from the accelerated cgroup's counters (the first
# cgroup of stats --json; the plain cgroup is not enabled).
stats_json=$("$bin" stats --json --bpffs-dir "$pins")
redirected=$(printf '%s\n' "$stats_json" | awk -F': ' '/"redirected_bytes"/ { gsub(/[^0-9]/, "", $2); print $2; exit }')
ratio=$(printf '%s\n' "$stats_json" | awk -F': ' '/"bypass_ratio"/ { gsub(/[ ,]/, "", $2); print $2; exit }')
echo
echo "== sockbypass uninstall"
"$bin" uninstall --bpffs-dir "$pins"
echo
echo "demo summary: sockbypass redirected $(numfmt --to=iec-i --suffix=B "${redirected:-0}") socket to socket for $accel (bypass ratio ${ratio:-null}, 1 = nothing left on the stack); $(sed -n 's/^summary: //p' "$bench_out")"
