#!/bin/busybox sh
# L2 init: the Linux guest that witnesses a migration. It runs as PID 1 of a
# busybox initramfs booted by ferry inside the nested test bed.
#
# Every second it prints one tick line on the console tty and one through
# /dev/kmsg (which reaches the serial port through printk), re-checks the
# checksum of a tmpfs file of random data, and counts kernel warnings.
# Kernel command line keys (read from /proc/cmdline):
#   l2.end=reboot:N | poweroff:N   after tick N, `reboot -f` / `poweroff -f`
#   l2.data=MIB                    size of the random file (default 8)
#   l2.dmesg=1                     print the kernel log once ready (debugging)
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /tmp && mount -t tmpfs tmp /tmp
exec </dev/console >/dev/console 2>&1

end=""; data=8; show_dmesg=0
for kv in $(cat /proc/cmdline); do
    case "$kv" in
        l2.end=*) end="${kv#l2.end=}" ;;
        l2.data=*) data="${kv#l2.data=}" ;;
        l2.dmesg=1) show_dmesg=1 ;;
    esac
done

# The kernel messages that mean the guest was hurt by a pause it did not see.
WARN_RE='clocksource.*(unstable|skew)|soft lockup|rcu.*(stall|self-detected)|hung task|blocked for more than|WARNING: CPU|BUG:|Oops'
warnings() { dmesg | grep -ciE "$WARN_RE"; }

dd if=/dev/urandom of=/tmp/data bs=1M count="$data" 2>/dev/null
sum0=$(md5sum /tmp/data | cut -d' ' -f1)
w0=$(warnings)
# Interrupts taken by the serial port so far: the tty driver waits for them
# (the "THR empty" interrupt) to send userspace's output.
irqs=$(grep -E 'ttyS|serial' /proc/interrupts | awk '{ n = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i; else break; s += n } END { print s + 0 }')
# Through printk first: the kernel prints it synchronously, while the tty
# line after it drains by interrupts; the other order lets a later printk
# (from another vCPU, too) cut into a tty line still being sent.
echo "<4>l2-kmsg: ready" > /dev/kmsg
echo "l2: ready cpus=$(grep -c ^processor /proc/cpuinfo) data=${data}MiB sum=$sum0 warn=$w0 serial_irqs=$irqs clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
[ "$show_dmesg" = 1 ] && dmesg | sed 's/^/l2: dmesg: /'

n=0
while :; do
    sleep 1
    n=$((n + 1))
    sum=$(md5sum /tmp/data | cut -d' ' -f1)
    if [ "$sum" = "$sum0" ]; then ok=ok; else ok="BAD($sum)"; fi
    w=$(warnings)
    up=$(cut -d' ' -f1 /proc/uptime)
    echo "<4>l2-kmsg: tick $n" > /dev/kmsg
    echo "l2: tick $n sum=$ok warn=$w up=$up"
    if [ "$w" != "$w0" ]; then
        dmesg | grep -A8 -iE "$WARN_RE" | sed "s/^/l2: kernel warning: /"
        w0=$w
    fi
    case "$end" in
        reboot:$n) echo "l2: reboot -f"; reboot -f ;;
        poweroff:$n) echo "l2: poweroff -f"; poweroff -f ;;
    esac
done
