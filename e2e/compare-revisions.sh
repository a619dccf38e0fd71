#!/usr/bin/env bash
# Compares the datapath of two git revisions on the same cases: for each case,
# the suite binary of REV runs plain vs accelerated, then the one of the work
# tree does, so both ratios come from the same machine minutes apart.
#
#   e2e/compare-revisions.sh REV                 # the default cases
#   e2e/compare-revisions.sh REV 'redis-P1 iperf3-16KiB' -runs 5 -duration 2s
#
# Cases are loopback case names (e2e/run-case.sh -list). Results go to
# e2e/results/compare/{REV,HEAD}-CASE/ and a summary table to stdout.
# Needs root and the programs of scripts/install-deps.sh.
set -euo pipefail

. "$(dirname "$0")/lib.sh" "$@"
rev="$1"
shift
cases="sockperf-64B-1cpu iperf3-16KiB iperf3-128KiB redis-P1 redis-P16 nginx-1KiB-sendfile nginx-100KiB-nosendfile connrate-wrk-nginx"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
	cases="$1"
	shift
fi
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-runs 5 -duration 2s)

tmp="$(mktemp -d)"
tree="$tmp/tree"
cleanup() {
	git worktree remove --force "$tree" >/dev/null 2>&1 || true
	rm -rf "$tmp"
}
trap cleanup EXIT
git worktree add --detach "$tree" "$rev" >/dev/null
(cd "$tree" && go build -o "$tmp/e2e-old" ./e2e/cmd/sockbypass-e2e)
go build -o "$tmp/e2e-new" ./e2e/cmd/sockbypass-e2e

out=e2e/results/compare
mkdir -p "$out"
for c in $cases; do
	for v in old new; do
		name="$rev"
		[ "$v" = new ] && name=HEAD
		"$tmp/e2e-$v" -case "^loopback/${c}\$" -out "$out/$name-$c" "${args[@]}" >"$out/$name-$c.log" 2>&1
	done
done

echo "| case | metric | $rev plain | $rev accel | $rev accel/plain (spread) | HEAD plain | HEAD accel | HEAD accel/plain (spread) |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
for c in $cases; do
	python3 - "$out/$rev-$c/results.json" "$out/HEAD-$c/results.json" "$c" <<'EOF'
import json, sys
old, new = (json.load(open(p)) for p in sys.argv[1:3])
def metrics(doc):
    out = {}
    for case in doc.get("cases", []):
        for m in case.get("metrics", []):
            out[m["metric"]] = m
    return out
mo, mn = metrics(old), metrics(new)
for name, m in mo.items():
    n = mn.get(name)
    if not n:
        continue
    unit = m.get("unit", "")
    def red(doc):
        c = doc["cases"][0]
        t = c.get("accelerated_traffic") or {}
        return "%d%%" % (100 * t.get("redirected_bytes", 0) / max(1, t.get("redirected_bytes", 0) + t.get("passed_bytes", 0))) if c.get("paired") else "0%"
    print(f"| {sys.argv[3]} | {name} | {m['plain_median']:.2f} {unit} | {m['accelerated_median']:.2f} {unit} | {m['ratio']:.2f}x ({m['plain_spread_pct']:.0f}%/{m['accelerated_spread_pct']:.0f}%) | "
          f"{n['plain_median']:.2f} {unit} | {n['accelerated_median']:.2f} {unit} | {n['ratio']:.2f}x ({n['plain_spread_pct']:.0f}%/{n['accelerated_spread_pct']:.0f}%) |")
EOF
done
