#!/bin/busybox sh
# /init of the kernel-matrix initramfs (built by e2e/kernels/run.sh): runs
# sockbypass on the booted kernel and prints what happened on the serial
# console as "KMATRIX ..." lines, which run.sh reads back. Each step:
#   KMATRIX begin step=NAME
#   ...its stdout and stderr...
#   KMATRIX end step=NAME rc=N secs=S
# then powers off. Nothing here decides pass or fail: run.sh does.

/bin/busybox mkdir -p /proc /sys /dev /run /tmp /var /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
ln -s /run /var/run
mkdir -p /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up

uptime_s() { cut -d' ' -f1 /proc/uptime; }

# step NAME CMD...: runs CMD with its output between markers.
step() {
	name=$1
	shift
	echo "KMATRIX begin step=$name"
	t0=$(uptime_s)
	"$@" 2>&1
	rc=$?
	t1=$(uptime_s)
	echo "KMATRIX end step=$name rc=$rc secs=$(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }")"
	return $rc
}

echo "KMATRIX boot kernel=$(uname -r) uptime=$(uptime_s)"

load_modules() {
	rc=0
	for m in $(cat /lib/modules/order 2>/dev/null); do
		insmod "/lib/modules/$m.ko" || { echo "insmod $m failed"; rc=1; }
	done
	lsmod
	return $rc
}
step modules load_modules

step probes /bin/kguest probe

mkdir -p /sys/fs/cgroup/t
CG=/sys/fs/cgroup/t

# enable with TC accounting on lo (a device view, off by default), and when
# that fails, once more without TC, so a TC problem is told apart from the
# rest.
if ! step enable /bin/sockbypass enable --cgroup $CG --tc-dev lo --no-probation; then
	step enable_no_tc /bin/sockbypass enable --cgroup $CG --no-tc --no-probation
fi
step status /bin/sockbypass status
step transfer /bin/kguest transfer --cgroup $CG --sockbypass /bin/sockbypass

# doctor --json: the JSON (stdout) between its own markers, stderr after.
run_doctor() {
	/bin/sockbypass doctor --json >/tmp/doctor.json 2>/tmp/doctor.err
	rc=$?
	echo "KMATRIX doctor-json-begin"
	cat /tmp/doctor.json
	echo "KMATRIX doctor-json-end"
	cat /tmp/doctor.err
	/bin/kguest doctor-summary /tmp/doctor.json
	return $rc
}
step doctor run_doctor

step uninstall /bin/sockbypass uninstall

check_pins() {
	ls -R /sys/fs/bpf
	left=$(find /sys/fs/bpf -mindepth 1 | wc -l)
	echo "KMATRIX pins_left=$left"
	[ "$left" -eq 0 ]
}
step pins check_pins

echo "KMATRIX begin step=dmesg"
# -B2: a WARN's message (such as fortify's "memcpy: detected field-spanning
# write") comes on the lines before its WARNING line.
dmesg | grep -B2 -E 'WARNING|BUG|Oops|Call Trace|segfault|bpf' | head -n 60
echo "KMATRIX kernel_warnings=$(dmesg | grep -cE 'WARNING:|BUG:|Oops')"
echo "KMATRIX end step=dmesg rc=0 secs=0"

echo "KMATRIX done uptime=$(uptime_s)"
sync
poweroff -f
# Not reached unless poweroff failed: with panic=-1 and -no-reboot qemu exits.
exit 1
