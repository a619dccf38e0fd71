#!/bin/busybox sh
# /init of the node guest's initramfs (built by e2e/node/guest/run.sh):
# Debian's cloud kernel has virtio_blk as a module, so this loads it (and
# the modules listed in /lib/modules/order), mounts /dev/vda, the Debian
# root file system, and hands over to its systemd.

/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for m in $(cat /lib/modules/order); do
	insmod "/lib/modules/$m.ko" || echo "initramfs: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do
	sleep 0.1
	i=$((i + 1))
done
if ! mount -t ext4 -o rw /dev/vda /newroot; then
	echo "initramfs: cannot mount /dev/vda"
	poweroff -f
fi
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
