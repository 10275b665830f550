#!/usr/bin/env bash
# Manual self-test of the stamp guest under QEMU TCG (no KVM needed).
#   apt-get install -y gcc binutils qemu-system-x86
#   bash resources/guests/selftest.sh
# Builds the normal guest plus SELFTEST_* variants into a temp dir and checks
# the serial output line by line. Not part of CI (needs qemu-system-x86).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fails=0

build() { # name [cpp defines...]
    local name="$1"; shift
    gcc -c -m64 -nostdinc -Wa,--noexecstack "$@" -o "$work/$name.o" "$here/stamp.S"
    ld -nostdlib -static --build-id=none -z max-page-size=4096 -z noexecstack \
        --no-warn-rwx-segments -T "$here/stamp.ld" -o "$work/$name.elf" "$work/$name.o"
}

# run ELF TIMEOUT MEM CMDLINE -> stamp lines in $work/out, exit code in $rc
run() {
    rc=0
    timeout "$2" qemu-system-x86_64 -machine q35 -m "$3" -nographic -display none \
        -net none -no-reboot -serial stdio -monitor none \
        -kernel "$work/$1.elf" -append "$4" >"$work/raw" 2>&1 || rc=$?
    grep -ao 'stamp: .*' "$work/raw" | tr -d '\r' >"$work/out" || true
}

expect() { # description, expected text (exact, all stamp lines), expected rc
    if [[ "$(cat "$work/out")" == "$2" && "$rc" == "$3" ]]; then
        echo "ok   - $1"
    else
        echo "FAIL - $1 (rc=$rc, want $3)"; echo "--- got:"; cat "$work/out"
        echo "--- want:"; echo "$2"; fails=$((fails + 1))
    fi
}

# S(i,p) as the guest computes it (bash arithmetic wraps mod 2^64).
stamp() {
    local v=$(( ($2 << 24) | $1 )) x
    x=$(( v * 0x9e3779b97f4a7c15 ))
    printf '%x' $(( x ^ ((x >> 29) & ((1 << 35) - 1)) ))
}
rol32() { local s=$(( 0x$1 )); printf '%x' $(( (s << 32) | ((s >> 32) & 0xffffffff) )); }
flip() { printf '%x' $(( 0x$1 ^ 1 )); }

build stamp
build top -DSELFTEST_TOUCH_TOP
build c0 -DSELFTEST_CORRUPT=5 -DSELFTEST_CORRUPT_OFF=0
build c2048 -DSELFTEST_CORRUPT=77 -DSELFTEST_CORRUPT_OFF=2048 -DSELFTEST_CORRUPT_PASS=2
build c4088 -DSELFTEST_CORRUPT=4095 -DSELFTEST_CORRUPT_OFF=4088
build dirty -DSELFTEST_CORRUPT=0 -DSELFTEST_CORRUPT_OFF=4088 -DSELFTEST_CORRUPT_PASS=0
build nvme -DSELFTEST_DEV_ID=0x00101b36   # dev=1 drives QEMU's NVMe (1b36:0010)

run stamp 60 256 "region=16 passes=3"
expect "3 passes then reset" "stamp: boot mem=255 region=16
stamp: pass 1 ok
stamp: pass 2 ok
stamp: pass 3 ok" 0

run stamp 60 256 "console=ttyS0 xregion=1 region=32 foo passes=2 region="
expect "unknown tokens ignored" "stamp: boot mem=255 region=32
stamp: pass 1 ok
stamp: pass 2 ok" 0

run stamp 60 512 "region=2000 passes=3"
expect "region too large" "stamp: boot mem=511 region=2000
stamp: ERROR region too large" 0

run top 120 5G "region=64 passes=2"
# q35 with 5 GiB: 2 GiB below the hole, 3 GiB from 4 GiB up -> top 7 GiB.
expect "5 GiB, >4 GiB identity map" "stamp: selftest touched top of RAM at 1bffffff8
stamp: boot mem=5119 region=64
stamp: pass 1 ok
stamp: pass 2 ok" 0

s=$(stamp 5 1)
run c0 4 256 "region=16 passes=5"
expect "corrupt word 0 of page 5 after pass 1" "stamp: boot mem=255 region=16
stamp: pass 1 ok
stamp: MISMATCH page=5 expected=$s found=$(flip "$s")" 124

m=$(rol32 "$(stamp 77 2)")
run c2048 4 256 "region=16 passes=5"
expect "corrupt middle word of page 77 after pass 2" "stamp: boot mem=255 region=16
stamp: pass 1 ok
stamp: pass 2 ok
stamp: MISMATCH page=77 expected=$m found=$(flip "$m")" 124

s=$(stamp 4095 1)
run c4088 4 256 "region=16 passes=5"
expect "corrupt last word of last page after pass 1" "stamp: boot mem=255 region=16
stamp: pass 1 ok
stamp: MISMATCH page=4095 expected=$s found=$(flip "$s")" 124

run dirty 4 256 "region=16 passes=5"
expect "non-zero page before pass 1" "stamp: boot mem=255 region=16
stamp: MISMATCH page=0 expected=0 found=1" 124

# dev=1 (q35's ECAM is at 0xb0000000; Ferry's at 0xe0000000, the default).
run stamp 20 256 "region=16 passes=2 dev=1 ecam=b0000000"
expect "dev=1 without a device" "stamp: boot mem=255 region=16
stamp: ERROR no device" 0

run stamp 20 256 "region=16 passes=2 dev=1"
expect "dev=1, default ECAM (nothing there on q35)" "stamp: boot mem=255 region=16
stamp: ERROR no device" 0

run stamp 20 256 "region=16 dev=1 dma=4097 ecam=B0000000"
expect "dma= out of range" "stamp: boot mem=255 region=16
stamp: ERROR dma out of range" 0

# Two NVMe controllers stand in for the device: the scan finds both, BAR0
# (64-bit there) is programmed to 0xd0000000 (the reads of STATUS/SEQ hit
# the NVMe registers, else the BUSY wait would spin on 0xffffffff), the
# MSI-X capability is found with its table in BAR0, and the DMA check reads
# device 0's first data page: 16 MiB + region + the ring page = pfn 8193.
# NVMe's "SEQ" registers are not zero, so it reports a DMA MISMATCH there.
qemu_dev="-device nvme,serial=a -device nvme,serial=b"
rc=0
timeout 20 qemu-system-x86_64 -machine q35 -m 256 -nographic -display none \
    -net none -no-reboot -serial stdio -monitor none $qemu_dev \
    -kernel "$work/nvme.elf" -append "region=16 passes=3 dev=1 ecam=b0000000" \
    >"$work/raw" 2>&1 || rc=$?
grep -ao 'stamp: .*' "$work/raw" | tr -d '\r' | sed 's/expected=.*/expected=.../' >"$work/out" || true
expect "dev=1 on two NVMe stand-ins" "stamp: boot mem=255 region=16
stamp: dev found=2
stamp: pass 1 ok
stamp: DMA MISMATCH page=8193 expected=..." 124

if ((fails)); then echo "$fails test(s) failed"; exit 1; fi
echo "all stamp guest self-tests passed"
