#!/usr/bin/env bash
# Builds kube-apiserver (the k8s.io/kubernetes version in go.mod) once and
# caches it under $SOCKBYPASS_K8S_CACHE (default /var/cache/sockbypass-k8s),
# for the tests of internal/k8s that run against a real API server. Prints
# the binary's path. About 10 minutes on 2 cores the first time; instant
# once cached. Also installs etcd (Debian's etcd-server) when missing.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$PATH:/usr/local/go/bin"
cache=${SOCKBYPASS_K8S_CACHE:-/var/cache/sockbypass-k8s}
version=$(go list -m -f "{{.Version}}" k8s.io/kubernetes)
bin="$cache/kube-apiserver-$version"
if ! command -v etcd >/dev/null; then
	echo "kubeapiserver: installing etcd-server" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server >&2 ||
		{ apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server >&2; }
fi
if [ ! -x "$bin" ]; then
	mkdir -p "$cache"
	start=$(date +%s)
	echo "kubeapiserver: building kube-apiserver $version into $bin" >&2
	go build -trimpath -ldflags=-s -o "$bin.tmp" k8s.io/kubernetes/cmd/kube-apiserver
	mv "$bin.tmp" "$bin"
	echo "kubeapiserver: built in $(($(date +%s) - start)) s" >&2
fi
echo "$bin"
