#!/usr/bin/env bash
# make node-e2e-systemd: TestNode (e2e/node) on what real nodes run, a
# machine whose PID 1 is systemd over a unified cgroup v2, with the
# kubelet's cgroupDriver systemd and containerd's runc SystemdCgroup =
# true; in a qemu guest (TCG: this host has no KVM), since this host's
# PID 1 is not systemd and it mounts cgroup v2 in hybrid mode.
#
# The guest:
#   kernel    Debian 12's 6.12 cloud kernel from bookworm-backports,
#             fetched (never installed) by e2e/kernels/run.sh's
#             fetch_kernel, with a busybox initramfs of our own
#             (init.sh: loads virtio_blk, mounts /dev/vda, runs systemd);
#   /dev/vda  a Debian 12 root file system (mmdebstrap, minbase + systemd,
#             dbus, iproute2, iptables, conntrack, etcd-server, ...) with
#             the kernel's modules (depmod'ed: veth, bridge, overlay,
#             br_netfilter, nf_tables load on demand) and the unit
#             sockbypass-node-e2e.service, packed with mkfs.ext4 -d and
#             cached as $SOCKBYPASS_K8S_CACHE/guest/rootfs-<key>.ext4
#             (<key>: a hash of what goes into it); booted with
#             snapshot=on, so it stays as built;
#   /dev/vdb  the payload, built per run (mkfs.ext4 -d): the cached
#             kubelet, kube-apiserver, controller manager, scheduler,
#             containerd and runc of make node-e2e, sockbypass, nodeapp
#             and the CNI plugins built here, the compiled test binary
#             (go test -c ./e2e/node), the Helm chart, node-e2e.sh; the
#             guest writes its results to out/ on it, read back here with
#             debugfs once qemu has exited.
#
# The report (with timings) is printed and saved in
# e2e/results/node-systemd/ (report.md, test.log, journal.txt,
# console.log). Exits 0 only when TestNode passed in the guest; exits 2,
# saying why, when the run cannot happen (no cached k8s builds: run make
# node-e2e first).
#
# Environment: NODE_GUEST_TIMEOUT (seconds of qemu, default 4200),
# NODE_GUEST_TIME_SCALE (TestNode's timeouts and client durations times
# this, default 8: a DaemonSet pod restart takes
# 15-20 times as long as on this host, and accel/client-live must outlast
# two of them), NODE_GUEST_MEM (MiB, default 6144), NODE_GUEST_SMP
# (default 2), SOCKBYPASS_K8S_CACHE, KMATRIX_CACHE (the kernels').
#
# qemu runs under `flock -s /tmp/sockbypass-bench.lock` (benchmarks take
# it exclusively) and nice -n 10, with no network card: nothing of the
# guest touches the host's network namespace.
set -euo pipefail

START=$(date +%s)
GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$GUEST_DIR/../../.." && pwd)
K8S_CACHE=${SOCKBYPASS_K8S_CACHE:-/var/cache/sockbypass-k8s}
GCACHE=$K8S_CACHE/guest
RESULTS=$REPO/e2e/results/node-systemd
TIMEOUT_S=${NODE_GUEST_TIMEOUT:-4200}
SCALE=${NODE_GUEST_TIME_SCALE:-8}
MEM=${NODE_GUEST_MEM:-6144}
SMP=${NODE_GUEST_SMP:-2}
export PATH="$PATH:/usr/local/go/bin:/usr/sbin:/sbin"

say() { printf '== node-systemd: %s\n' "$*" >&2; }
fail() {
	printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
	printf '!! NODE E2E (systemd guest) DID NOT RUN: %s\n' "$*" >&2
	printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' >&2
	exit 2
}

[ "$(id -u)" = 0 ] || fail "run as root (apt-get, mmdebstrap, mknod)"
command -v go >/dev/null || fail "go not found (PATH=$PATH)"

# The cluster's builds, as make node-e2e caches them (e2e/node/build.sh).
KUBE=$(cd "$REPO/e2e/kubeapiserver" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
CTRD=$(cd "$REPO/e2e/node/containerd" && go list -m -f '{{.Version}}' github.com/containerd/containerd/v2)
RUNC=$(cd "$REPO/e2e/node/runc" && go list -m -f '{{.Version}}' github.com/opencontainers/runc)
K8S_FILES=(kube-apiserver-$KUBE kube-controller-manager-$KUBE kube-scheduler-$KUBE kubelet-$KUBE
	containerd-$CTRD/containerd containerd-$CTRD/containerd-shim-runc-v2 containerd-$CTRD/ctr runc-$RUNC/runc)
for f in "${K8S_FILES[@]}"; do
	[ -x "$K8S_CACHE/$f" ] || fail "no cached $K8S_CACHE/$f: run \`make node-e2e\` once (it builds kubelet, kube-apiserver, controller manager, scheduler $KUBE, containerd $CTRD and runc $RUNC into $K8S_CACHE; tens of minutes)"
done

# The kernel: e2e/kernels/run.sh's fetching (apt-get download + dpkg -x
# into $KMATRIX_CACHE), its package check (qemu, busybox-static, ...)
# and add_module.
# shellcheck source=../../kernels/run.sh
source "$REPO/e2e/kernels/run.sh" 6.12
ensure_packages
if ! command -v mmdebstrap >/dev/null || ! command -v debugfs >/dev/null; then
	say "apt-get install mmdebstrap e2fsprogs"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap e2fsprogs >/dev/null ||
		fail "cannot install mmdebstrap"
fi
fetch_kernel 6.12
say "kernel $KPKG $KPKGVER ($KVER)"
mkdir -p "$GCACHE"

# --- the root file system -----------------------------------------------------

# udev: without it no .device unit appears, and the /dev/vdb mount times
# out into emergency mode.
PACKAGES=systemd,systemd-sysv,udev,dbus,iproute2,iptables,conntrack,etcd-server,libseccomp2,kmod,procps,util-linux,mount,ca-certificates,ethtool,socat
UNIT=$GUEST_DIR/sockbypass-node-e2e.service

# populate_rootfs DIR: what goes into the mmdebstrap'ed tree.
populate_rootfs() {
	local d=$1
	mkdir -p "$d/lib/modules" "$d/opt/sockbypass" "$d/etc/systemd/system/multi-user.target.wants" "$d/etc/modules-load.d"
	cp -a "$MODDIR" "$d/lib/modules/$KVER"
	# The guest's own depmod (kmod is in the tree, not necessarily on the host).
	chroot "$d" /sbin/depmod "$KVER"
	echo sockbypass-node-e2e >"$d/etc/hostname"
	printf '127.0.0.1 localhost\n127.0.1.1 sockbypass-node-e2e\n' >"$d/etc/hosts"
	# No DNS in the guest; the kubelet only needs the file.
	rm -f "$d/etc/resolv.conf"
	echo 'nameserver 127.0.0.1' >"$d/etc/resolv.conf"
	echo '/dev/vdb /opt/sockbypass ext4 defaults 0 0' >"$d/etc/fstab"
	# As a kubeadm node: overlay for containerd, br_netfilter for bridged pods.
	printf 'overlay\nbr_netfilter\n' >"$d/etc/modules-load.d/node.conf"
	cp "$UNIT" "$d/etc/systemd/system/"
	ln -sf ../sockbypass-node-e2e.service "$d/etc/systemd/system/multi-user.target.wants/sockbypass-node-e2e.service"
	# The serial console is the test's; no timers waking up apt or fstrim.
	for u in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer fstrim.timer e2scrub_all.timer; do
		ln -sf /dev/null "$d/etc/systemd/system/$u"
	done
	: >"$d/etc/machine-id"
}

key=$( (
	echo "$PACKAGES $KPKG $KPKGVER"
	cat "$UNIT"
	declare -f populate_rootfs
) | sha256sum | cut -c1-12)
ROOTFS=$GCACHE/rootfs-$key.ext4
if [ ! -s "$ROOTFS" ]; then
	t0=$(date +%s)
	say "building the Debian 12 root file system (mmdebstrap) into $ROOTFS"
	tmp=$GCACHE/rootfs-$key.d
	rm -rf "$GCACHE"/rootfs-*.d
	nice -n 10 mmdebstrap --quiet --variant=minbase --include="$PACKAGES" bookworm "$tmp" >&2 ||
		fail "mmdebstrap failed (see above)"
	populate_rootfs "$tmp"
	rm -f "$ROOTFS.tmp"
	truncate -s 8G "$ROOTFS.tmp"
	mkfs.ext4 -q -F -L sbnode-root -d "$tmp" "$ROOTFS.tmp"
	mv "$ROOTFS.tmp" "$ROOTFS"
	rm -rf "$tmp"
	# Older images of other keys.
	find "$GCACHE" -maxdepth 1 -name 'rootfs-*.ext4' ! -name "rootfs-$key.ext4" -delete
	say "root file system built in $(($(date +%s) - t0)) s"
fi

# --- the initramfs ----------------------------------------------------------------

ikey=$( (
	echo "$KVER"
	cat "$GUEST_DIR/init.sh"
) | sha256sum | cut -c1-12)
INITRD=$GCACHE/initramfs-$ikey.cpio.gz
if [ ! -s "$INITRD" ]; then
	STAGE=$GCACHE/initramfs-$ikey.d
	rm -rf "$STAGE"
	mkdir -p "$STAGE"/{bin,dev,proc,sys,newroot,lib/modules}
	cp /bin/busybox "$STAGE/bin/busybox"
	install -m 0755 "$GUEST_DIR/init.sh" "$STAGE/init"
	mknod -m 600 "$STAGE/dev/console" c 5 1
	mknod -m 666 "$STAGE/dev/null" c 1 3
	: >"$STAGE/lib/modules/order"
	add_module virtio_blk
	(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -1 >"$INITRD.tmp"
	mv "$INITRD.tmp" "$INITRD"
	rm -rf "$STAGE"
	find "$GCACHE" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "initramfs-$ikey.cpio.gz" -delete
fi

# --- the payload -------------------------------------------------------------------

RUN=$GCACHE/run
rm -rf "$RUN"
mkdir -p "$RUN"
PAY=$RUN/payload
mkdir -p "$PAY"/{k8s,prebuilt/cni-bin,src/e2e/node,src/deploy/helm,out}
t0=$(date +%s)
say "go build: sockbypass, nodeapp, CNI plugins, go test -c ./e2e/node"
(
	cd "$REPO"
	export CGO_ENABLED=0
	go build -trimpath -o "$PAY/prebuilt/sockbypass" ./cmd/sockbypass
	go build -trimpath -o "$PAY/prebuilt/nodeapp" ./e2e/node/cmd/nodeapp
	for p in main/bridge ipam/host-local main/loopback; do
		go build -trimpath -o "$PAY/prebuilt/cni-bin/${p#*/}" "github.com/containernetworking/plugins/plugins/$p"
	done
	go test -c -trimpath -o "$PAY/src/e2e/node/node.test" ./e2e/node
)
BUILD_S=$(($(date +%s) - t0))
for f in "${K8S_FILES[@]}"; do
	mkdir -p "$(dirname "$PAY/k8s/$f")"
	ln "$K8S_CACHE/$f" "$PAY/k8s/$f" 2>/dev/null || cp "$K8S_CACHE/$f" "$PAY/k8s/$f"
done
cp -r "$REPO/deploy/helm/sockbypass" "$PAY/src/deploy/helm/"
install -m 0755 "$GUEST_DIR/node-e2e.sh" "$PAY/node-e2e.sh"
echo "$SCALE" >"$PAY/time-scale"
echo "$((TIMEOUT_S - 300))s" >"$PAY/test-timeout"
PAYLOAD=$RUN/payload.ext4
truncate -s 4G "$PAYLOAD"
mkfs.ext4 -q -F -L sbnode-payload -d "$PAY" "$PAYLOAD"
rm -rf "$PAY"

# --- boot ----------------------------------------------------------------------------

say "booting the guest: $KVER, ${MEM} MiB, $SMP vCPUs, TCG (timeout ${TIMEOUT_S}s; waits for benchmarks holding /tmp/sockbypass-bench.lock)"
t0=$(date +%s.%N)
set +e
# snapshot=on: the guest's writes to its root go to a temporary file of
# qemu's (in $RUN), the cached image stays as built.
TMPDIR=$RUN flock -s /tmp/sockbypass-bench.lock nice -n 10 \
	timeout -k 10 "$TIMEOUT_S" qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu max -smp "$SMP" -m "$MEM" \
	-kernel "$VMLINUZ" -initrd "$INITRD" \
	-append "console=ttyS0 panic=-1 quiet systemd.unified_cgroup_hierarchy=1 systemd.show_status=error loglevel=4" \
	-drive "file=$ROOTFS,format=raw,if=virtio,snapshot=on" \
	-drive "file=$PAYLOAD,format=raw,if=virtio" \
	-nographic -no-reboot -nic none </dev/null >"$RUN/console.log" 2>&1
QEMU_RC=$?
set -e
WALL=$(awk "BEGIN { printf \"%.0f\", $(date +%s.%N) - $t0 }")

# --- results -----------------------------------------------------------------------

mkdir -p "$RESULTS"
rm -f "$RESULTS"/*
OUT=$RUN/out
# rdump makes $RUN/out itself (and fails on an existing one).
debugfs -R "rdump /out $RUN" "$PAYLOAD" >/dev/null 2>&1 || true
tr -d '\r' <"$RUN/console.log" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' >"$RESULTS/console.log"
for f in report.md test.log journal.txt; do
	if [ -f "$OUT/$f" ]; then cp "$OUT/$f" "$RESULTS/$f"; fi
done
RC=$(cat "$OUT/rc" 2>/dev/null || echo none)
rm -rf "$RUN"

{
	echo "# node e2e on the systemd cgroup driver (make node-e2e-systemd, $(date -u +%FT%TZ))"
	echo
	echo "guest: $KPKG $KPKGVER ($KVER), Debian 12 root (rootfs-$key.ext4), qemu TCG -smp $SMP -m $MEM; TestNode timeouts and client durations x$SCALE"
	echo "host: go build + go test -c ${BUILD_S}s; qemu wall ${WALL}s (exit $QEMU_RC$([ "$QEMU_RC" = 124 ] && echo ', TIMED OUT')); whole run $(($(date +%s) - START))s; TestNode exit: $RC"
	echo
	grep -h '^NODE-E2E ' "$RESULTS/console.log" | sed 's/^NODE-E2E //'
	grep -hE '^(--- (PASS|FAIL|SKIP)|PASS$|FAIL$|ok |panic:)' "$RESULTS/test.log" 2>/dev/null || true
	echo
	if [ -f "$RESULTS/report.md" ]; then cat "$RESULTS/report.md"; else echo "(no report.md: TestNode did not get to print one; see $RESULTS/console.log)"; fi
} >"$RESULTS/summary.md"
cat "$RESULTS/summary.md"
if [ "$RC" != 0 ]; then
	if [ -f "$RESULTS/test.log" ]; then
		echo
		echo "---- failures (from $RESULTS/test.log):"
		grep -nE -- '--- FAIL|^ +[a-z_]+\.go:[0-9]+: ' "$RESULTS/test.log" | grep -vE 'node_test.go:62:|helm_test.go:84:' | head -n 60 || true
	fi
	echo "node-systemd: TestNode did not pass in the guest (rc $RC, qemu exit $QEMU_RC); logs in $RESULTS" >&2
	exit 1
fi
echo "node-systemd: TestNode passed in the systemd guest; report in $RESULTS/summary.md"
