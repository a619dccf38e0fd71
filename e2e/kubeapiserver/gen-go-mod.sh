#!/usr/bin/env bash
# Writes go.mod for building kube-apiserver from the k8s.io/kubernetes module:
# its own go.mod points the k8s.io/* staging modules at ./staging, which a
# dependency cannot use, so they are pinned to the published v0.X.Y here.
set -euo pipefail
cd "$(dirname "$0")"
version=${1:-v1.37.2}
staging=v0.${version#v1.}
dir=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
{
	echo "module github.com/sockbypass/sockbypass/e2e/kubeapiserver"
	echo
	sed -n '/^go /p;/^godebug/p' "$dir"
	echo
	echo "require k8s.io/kubernetes $version"
	echo
	echo "replace ("
	sed -n "s#^\s*\(k8s.io/[a-z-]*\) => ./staging/src/.*#\t\1 => \1 $staging#p" "$dir"
	echo ")"
} >go.mod
