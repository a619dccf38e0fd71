#!/usr/bin/env bash
# Installs what sockbypass's build, tests, demo and benchmarks need on a
# Debian 12 machine: the pinned clang for `make generate`, bpftool, and the
# real programs the tests and benchmarks drive. Idempotent and quick when
# everything is already there. Needs root.
set -euo pipefail

packages=(clang-16 llvm-16 bpftool iproute2 iptables iperf3 sockperf wrk redis-server nginx-light haproxy etcd-server)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "install-deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	# Do not start the packaged services (nginx, redis, haproxy, etcd): the
	# benchmarks and tests start their own instances on loopback.
	policy=/usr/sbin/policy-rc.d
	created_policy=0
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
	fi
	apt-get install -y -q --no-install-recommends "${missing[@]}"
	[ "$created_policy" = 1 ] && rm -f "$policy"
fi

if ! command -v go >/dev/null; then
	if [ -x /usr/local/go/bin/go ]; then
		echo "install-deps: go is at /usr/local/go/bin; add it to PATH" >&2
	else
		echo "install-deps: Go 1.24 or later is required (https://go.dev/doc/install)" >&2
	fi
	exit 1
fi
