# Shell helpers for the scenarios run inside L1 (sourced by /scenario.sh).
# Every result line starts with "l1: "; the harness asserts on those and on
# the L2 serial logs, which `dump` prints with a "l1: [NAME] " prefix.

L2_KERNEL=/l2/vmlinuz
L2_INITRD=/l2/initrd
# loglevel=5: warnings (and the guest's <4> lines through /dev/kmsg) reach the console.
L2_CMDLINE="console=ttyS0 panic=-1 quiet loglevel=5"
FERRY_LOG=${FERRY_LOG:-info}

say() { echo "l1: $*"; }
fail() { say "FAIL $*"; for f in /tmp/*.log; do n=${f#/tmp/}; dump ${n%.log}; done; exit 1; }

# start_vm NAME [ferry args...]: a VMM with API socket /tmp/NAME.sock and
# serial log /tmp/NAME.log; its stderr goes to /tmp/NAME.err.
start_vm() {
    name=$1; shift
    rm -f /tmp/$name.sock
    : > /tmp/$name.log
    RUST_LOG=$FERRY_LOG ferry --api-socket /tmp/$name.sock --serial file=/tmp/$name.log "$@" \
        >/tmp/$name.out 2>/tmp/$name.err &
    eval "pid_$name=$!"
    i=0
    while [ ! -S /tmp/$name.sock ]; do
        i=$((i + 1)); [ $i -gt 300 ] && fail "$name: no API socket"
        sleep 0.1
    done
}

# boot_vm NAME CMDLINE-EXTRA [ferry args...]: boots the L2 Linux guest.
boot_vm() {
    name=$1; extra=$2; shift 2
    start_vm "$name" --kernel $L2_KERNEL --initramfs $L2_INITRD \
        --cmdline "$L2_CMDLINE $extra" "$@"
}

# wait_for NAME PATTERN SECONDS: waits until /tmp/NAME.log has a line
# matching the extended regex PATTERN.
wait_for() {
    i=0; lim=$(($3 * 10))
    while ! grep -qE "$2" /tmp/$1.log; do
        i=$((i + 1))
        if [ $i -gt $lim ]; then say "timeout: $1 waiting for '$2'"; return 1; fi
        sleep 0.1
    done
}

# count NAME PATTERN: lines of /tmp/NAME.log matching PATTERN.
count() { grep -cE "$2" /tmp/$1.log; }

# last_tick NAME: the number of the last tick in /tmp/NAME.log (0 if none).
last_tick() {
    t=$(grep -oE 'l2: tick [0-9]+' /tmp/$1.log | tail -n1 | cut -d' ' -f3)
    echo "${t:-0}"
}

# wait_tick NAME N SECONDS: waits until /tmp/NAME.log has tick N.
wait_tick() { wait_for "$1" "l2: tick $2 " "$3"; }

remote() { name=$1; shift; ferry-remote --api-socket /tmp/$name.sock "$@"; }

# migrate SRC DST PORT CONNECTIONS: arms DST, sends from SRC and waits;
# then reads the source's state and shuts it down.
migrate() {
    remote "$2" receive-migration tcp:127.0.0.1:$3 --no-tls >/dev/null || fail "receive-migration on $2"
    out=$(remote "$1" send-migration tcp:127.0.0.1:$3 --no-tls --connections $4 --wait 2>&1)
    rc=$?
    st=$(echo "$out" | grep -oE '"state": *"[a-z]+"' | tail -n1)
    say "migration $1 -> $2 over $4 connection(s): rc=$rc ${st:-$(echo "$out" | tail -n1)}"
    # A completed source keeps its final record (state "migrated") until
    # it is told to shut down.
    if [ $rc -eq 0 ]; then
        say "$1 state $(vm_state "$1")"
        remote "$1" shutdown-vmm >/dev/null || say "$1: shutdown-vmm failed"
    fi
    return $rc
}

# vm_state NAME: the "state" field of vm.info.
vm_state() { remote "$1" info | grep -oE '"state": *"[a-z_]+"' | head -n1 | cut -d'"' -f4; }

# wait_exit NAME SECONDS: waits for the VMM NAME to exit; says its code.
wait_exit() {
    eval "p=\$pid_$1"
    i=0; lim=$(($2 * 10))
    while kill -0 $p 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt $lim ]; then say "$1 still running after $2 s"; return 1; fi
        sleep 0.1
    done
    wait $p
    say "$1 exited code=$?"
}

# dump NAME: prints a VMM's serial log and stderr for the harness.
dump() {
    sed "s/^/l1: [$1] /" /tmp/$1.log
    sed "s/^/l1: [$1 stderr] /" /tmp/$1.err
}
