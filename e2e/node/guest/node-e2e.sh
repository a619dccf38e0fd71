#!/bin/bash
# Runs in the node guest as sockbypass-node-e2e.service (e2e/node/guest):
# TestNode with the systemd cgroup driver, its output on the serial
# console and in /opt/sockbypass/out (the payload disk, which
# e2e/node/guest/run.sh reads back once the guest has powered off).
# Lines for run.sh start with "NODE-E2E ".
set -u
p=/opt/sockbypass
out=$p/out
mkdir -p "$out"
exec > >(tee "$out/test.log" >/dev/ttyS0) 2>&1

echo "NODE-E2E begin $(date -u +%FT%TZ) uptime=$(cut -d' ' -f1 /proc/uptime)s kernel=$(uname -r)"
echo "NODE-E2E init=$(cat /proc/1/comm) $(systemctl --version | head -n 1)"
echo "NODE-E2E cgroupfs=$(stat -fc %T /sys/fs/cgroup) (cgroup2fs: unified cgroup v2 only) controllers=$(cat /sys/fs/cgroup/cgroup.controllers)"
echo "NODE-E2E cgroup mounts:"
grep -E ' - cgroup2? ' /proc/self/mountinfo | sed 's/^/NODE-E2E   /'
echo "NODE-E2E this unit's cgroup: $(cat /proc/self/cgroup)"
echo "NODE-E2E memory: $(grep MemTotal /proc/meminfo), cpus: $(nproc)"

# The node's address: a dummy link with a default route (the guest has
# no network card, nothing leaves it).
ip link add node0 type dummy &&
	ip addr add 192.168.122.10/24 dev node0 &&
	ip link set node0 up &&
	ip route add default via 192.168.122.1 dev node0 ||
	echo "NODE-E2E setting up node0 failed"

cd "$p/src/e2e/node" || exit 1
t0=$(cut -d' ' -f1 /proc/uptime)
env SOCKBYPASS_NODE_CGROUP_DRIVER=systemd \
	SOCKBYPASS_NODE_TIME_SCALE="$(cat "$p/time-scale")" \
	SOCKBYPASS_K8S_CACHE="$p/k8s" \
	SOCKBYPASS_NODE_PREBUILT="$p/prebuilt" \
	SOCKBYPASS_NODE_REPORT_DIR="$out" \
	TMPDIR=/var/tmp HOME=/root \
	./node.test -test.v -test.count=1 -test.run '^TestNode$' -test.timeout "$(cat "$p/test-timeout")"
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
echo "NODE-E2E test rc=$rc secs=$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")"
echo "NODE-E2E pod cgroups left under kubepods.slice:"
find /sys/fs/cgroup/kubepods.slice -maxdepth 3 -type d 2>/dev/null | sed 's/^/NODE-E2E   /'
journalctl -b --no-pager -o short-monotonic >"$out/journal.txt" 2>&1
echo "$rc" >"$out/rc"
echo "NODE-E2E end uptime=$(cut -d' ' -f1 /proc/uptime)s"
sync
