#!/usr/bin/env bash
# Builds what the node e2e test (make node-e2e, e2e/node) runs, once, and
# caches it next to kube-apiserver in $SOCKBYPASS_K8S_CACHE (default
# /var/cache/sockbypass-k8s):
#   kube-apiserver, kubelet, kube-controller-manager, kube-scheduler
#     from the k8s.io/kubernetes module of e2e/kubeapiserver/go.mod
#     (<name>-<version>);
#   containerd, containerd-shim-runc-v2 and ctr from the containerd 2.x
#     module of e2e/node/containerd/go.mod (containerd-<version>/): the
#     kubelet of 1.36 and later does not run over containerd 1.x, the
#     1.6.20 of Debian 12;
#   runc from the runc module of e2e/node/runc/go.mod (runc-<version>/runc,
#     cgo with libseccomp): Debian 12's runc 1.1.5 fails every sandbox
#     that containerd 2.2 asks it for ("can't get final child's PID from
#     pipe: EOF");
# and installs etcd-server, iptables and libseccomp-dev from Debian when
# missing.
# Tens of minutes on 2 cores the first time; instant once cached. Runs
# the builds with nice -n 19. Prints the cache directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export PATH="$PATH:/usr/local/go/bin"
cache=${SOCKBYPASS_K8S_CACHE:-/var/cache/sockbypass-k8s}
mkdir -p "$cache"

missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
[ -e /usr/include/seccomp.h ] || missing+=(libseccomp-dev)
command -v iptables >/dev/null || missing+=(iptables)
if [ ${#missing[@]} -gt 0 ]; then
	echo "node: installing ${missing[*]}" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
		{ apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
fi

cd "$here/../kubeapiserver"
k8s=$(go list -m -f "{{.Version}}" k8s.io/kubernetes)
# The version the binaries report (Helm checks the chart's kubeVersion
# against the API server's), as Kubernetes' own build stamps it.
minor=${k8s#v1.}
minor=${minor%%.*}
ldflags="-s"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $p.gitVersion=$k8s -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
todo=()
for b in kube-apiserver kubelet kube-controller-manager kube-scheduler; do
	# A binary built without the version stamp is built again.
	"$cache/$b-$k8s" --version 2>/dev/null | grep -q "$k8s" || todo+=("k8s.io/kubernetes/cmd/$b")
done
if [ ${#todo[@]} -gt 0 ]; then
	start=$(date +%s)
	tmp="$cache/tmp-build-$$"
	mkdir -p "$tmp"
	echo "node: building ${todo[*]} $k8s into $cache" >&2
	nice -n 19 go build -trimpath -ldflags="$ldflags" -o "$tmp/" "${todo[@]}"
	for p in "${todo[@]}"; do
		b=${p##*/}
		mv "$tmp/$b" "$cache/$b-$k8s"
	done
	rmdir "$tmp"
	echo "node: built in $(($(date +%s) - start)) s" >&2
fi

cd "$here/containerd"
ctrd=$(go list -m -f "{{.Version}}" github.com/containerd/containerd/v2)
dir="$cache/containerd-$ctrd"
if [ ! -x "$dir/containerd" ] || [ ! -x "$dir/containerd-shim-runc-v2" ] || [ ! -x "$dir/ctr" ]; then
	start=$(date +%s)
	echo "node: building containerd $ctrd into $dir" >&2
	mkdir -p "$dir.tmp"
	# No cgo: no btrfs snapshotter, no PKCS#11 (neither is used here).
	CGO_ENABLED=0 nice -n 19 go build -trimpath -tags "no_btrfs no_devmapper no_zfs" \
		-ldflags "-s -X github.com/containerd/containerd/v2/version.Version=$ctrd" -o "$dir.tmp/" \
		github.com/containerd/containerd/v2/cmd/containerd \
		github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
		github.com/containerd/containerd/v2/cmd/ctr
	rm -rf "$dir"
	mv "$dir.tmp" "$dir"
	echo "node: built containerd in $(($(date +%s) - start)) s" >&2
fi
cd "$here/runc"
rv=$(go list -m -f "{{.Version}}" github.com/opencontainers/runc)
if [ ! -x "$cache/runc-$rv/runc" ]; then
	echo "node: building runc $rv into $cache/runc-$rv" >&2
	mkdir -p "$cache/runc-$rv"
	CGO_ENABLED=1 nice -n 19 go build -trimpath -tags seccomp -o "$cache/runc-$rv/runc.tmp" github.com/opencontainers/runc
	mv "$cache/runc-$rv/runc.tmp" "$cache/runc-$rv/runc"
fi
echo "$cache"
