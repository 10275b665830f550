#!/bin/busybox sh
# L1 init: runs inside QEMU TCG (-cpu max, emulated SVM). It loads KVM,
# then runs /scenario.sh, which drives ferry with L2 Linux guests, and
# powers the machine off. Every line the harness reads starts with "l1:".
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /tmp /run && mount -t tmpfs tmp /tmp
ip link set lo up
export PATH=/bin:/ferry LD_LIBRARY_PATH=/ferry/lib
for m in irqbypass kvm ccp kvm-amd; do
    insmod /modules/$m.ko || echo "l1: insmod $m failed"
done
if [ -c /dev/kvm ]; then echo "l1: kvm ready"; else echo "l1: no /dev/kvm"; fi
echo "l1: scenario start"
sh /scenario.sh
echo "l1: scenario exit $?"
sync
poweroff -f
