#!/usr/bin/env bash
# The bystander benchmark of issue 13, with a real client: sockperf
# ping-pong, 64 B, both ends on CPU 0, in a cgroup that is NOT enabled,
# rotating three modes in one run: nothing enabled (the install idle),
# another cgroup enabled (the default: no TC; nothing node-wide runs), and
# another cgroup enabled with --tc-dev lo. Prints, and writes to OUT (default
# e2e/results/bystander-sockperf.md), the median p50 of each mode with its
# spread and its ratio to the idle install.
#
#   e2e/bystander.sh [ROUNDS] [SECONDS]      # default 7 rounds of 2 s
#
# Root; needs bin/sockbypass (make build) and sockperf. Removes its pin
# directory and cgroups on exit, and stops only the server it started.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
secs=${2:-2}
out=${OUT:-e2e/results/bystander-sockperf.md}
bin=$PWD/bin/sockbypass
cg2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
[ -n "$cg2" ] || { echo "bystander.sh: no cgroup2 mount" >&2; exit 1; }
pin=/sys/fs/bpf/sockbypass-bystander-$$
other=$cg2/sockbypass-bystander-other-$$
by=$cg2/sockbypass-bystander-$$
port=$((20000 + $$ % 10000))
srv=
cleanup() {
	[ -n "$srv" ] && kill "$srv" 2>/dev/null && wait "$srv" 2>/dev/null || true
	"$bin" uninstall --bpffs-dir "$pin" >/dev/null 2>&1 || true
	for d in "$other" "$by"; do
		for _ in $(seq 50); do rmdir "$d" 2>/dev/null && break || sleep 0.1; done
	done
}
trap cleanup EXIT
mkdir -p "$other" "$by"
"$bin" enable --bpffs-dir "$pin" --cgroup "$other" >/dev/null
"$bin" disable --bpffs-dir "$pin" --cgroup "$other" >/dev/null
(echo $BASHPID >"$by/cgroup.procs"; exec taskset -c 0 sockperf server --tcp -i 127.0.0.1 -p "$port" >/dev/null 2>&1) &
srv=$!
for _ in $(seq 100); do ss -Hltn "sport = :$port" | grep -q . && break; sleep 0.05; done

p50() {
	(echo $BASHPID >"$by/cgroup.procs"; exec taskset -c 0 sockperf ping-pong --tcp -i 127.0.0.1 -p "$port" -m 64 -t "$secs" 2>&1) |
		awk '/percentile 50.000/ {print $NF}'
}
modes=(idle enabled tc)
declare -A label=([idle]="nothing enabled" [enabled]="another cgroup enabled (default)" [tc]="another cgroup enabled, --tc-dev lo")
declare -A vals
for r in $(seq "$rounds"); do
	for i in "${!modes[@]}"; do
		m=${modes[$(((r + i) % ${#modes[@]}))]} # rotate who goes first
		case $m in
		idle) "$bin" disable --bpffs-dir "$pin" --cgroup "$other" >/dev/null ;;
		enabled) "$bin" enable --bpffs-dir "$pin" --cgroup "$other" --no-tc >/dev/null ;;
		tc) "$bin" enable --bpffs-dir "$pin" --cgroup "$other" --tc-dev lo >/dev/null ;;
		esac
		v=$(p50)
		[ -n "$v" ] || { echo "bystander.sh: sockperf printed no p50" >&2; exit 1; }
		vals[$m]="${vals[$m]:-} $v"
		echo "round $r ${label[$m]}: p50 $v us" >&2
	done
done

stat() { # median spread%
	tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {m = NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2; printf "%.3f %.0f", m, (a[NR]-a[1])/m*100}'
}
read -r base _ <<<"$(stat "${vals[idle]}")"
mkdir -p "$(dirname "$out")"
{
	echo "# Bystander cost, sockperf"
	echo
	echo "sockperf ping-pong 64 B, both ends on CPU 0, in a cgroup that is not enabled; medians of $rounds rotating rounds of $secs s (\`e2e/bystander.sh\`):"
	echo
	echo "| mode | p50 RTT | spread (max-min) | / nothing enabled |"
	echo "|---|---:|---:|---:|"
	for m in "${modes[@]}"; do
		read -r med spread <<<"$(stat "${vals[$m]}")"
		awk -v l="${label[$m]}" -v m="$med" -v s="$spread" -v b="$base" 'BEGIN {printf "| %s | %s us | %s%% | %.3fx |\n", l, m, s, m / b}'
	done
} >"$out"
cat "$out"
