#!/usr/bin/env bash
# Runs one case of the e2e suite, plain vs accelerated, and writes its
# results.json, results.md and charts to e2e/results/case/ (or -out DIR).
#
#   e2e/run-case.sh -list                       # the case names
#   e2e/run-case.sh loopback/redis-P16          # one case, 3 runs per mode of 2 s
#   e2e/run-case.sh 'loopback/sockperf-.*' -runs 5 -duration 3s
#
# CASE is matched whole, as a regular expression. Needs root and the
# programs of scripts/install-deps.sh.
set -euo pipefail

. "$(dirname "$0")/lib.sh" "$@"

bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/sockbypass-e2e" ./e2e/cmd/sockbypass-e2e

if [ "$1" = "-list" ]; then
	"$bin/sockbypass-e2e" -list
	exit 0
fi
case_re="$1"
shift
"$bin/sockbypass-e2e" -case "^(${case_re})\$" -out e2e/results/case "$@"
