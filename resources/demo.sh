#!/usr/bin/env bash
# Ferry's main job: boot the stamping test guest on one VMM, live-migrate it
# with 4 connections to a second VMM on loopback, over mutual TLS (a test CA
# made on the fly with resources/tls/make-test-ca.sh), and show it passing
# there.
#
# Usage: bash resources/demo.sh            (builds in release mode first)
#        bash resources/demo.sh --linux    (the same with a Debian Linux guest,
#                                           in the nested test bed: needs QEMU)
# Environment: REGION (MiB, default 64), CONNECTIONS (default 4), PORT (6000)
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ ${1:-} == --linux ]]; then
    # Linux cannot run on every KVM (nested PVM hosts emulate instructions),
    # so this runs ferry inside QEMU TCG with emulated SVM: see README.md,
    # "The nested Linux test bed".
    if ! command -v qemu-system-x86_64 >/dev/null; then
        echo "demo: installing qemu-system-x86 (runs the nested test bed)"
        apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
    fi
    cargo build --workspace --release --quiet
    TARGET=${CARGO_TARGET_DIR:-target}
    exec "$TARGET/release/ferry-nested" resources/nested/demo-linux.sh
fi
REGION=${REGION:-64}
CONNECTIONS=${CONNECTIONS:-4}
PORT=${PORT:-6000}

if ! command -v gcc >/dev/null || ! command -v ld >/dev/null; then
    echo "demo: installing gcc and binutils (needed to assemble the test guest)"
    apt-get update -qq && apt-get install -y -qq gcc binutils >/dev/null
fi
cargo build --workspace --release --quiet

TARGET=${CARGO_TARGET_DIR:-target}
FERRY=$TARGET/release/ferry
REMOTE=$TARGET/release/ferry-remote
GUEST=$TARGET/guests/stamp.elf

WORK=$(mktemp -d /tmp/ferry-demo.XXXXXX)
SRC_SOCK=$WORK/src.sock
DST_SOCK=$WORK/dst.sock
SRC_LOG=$WORK/src-serial.log
DST_LOG=$WORK/dst-serial.log
cleanup() {
    [[ -n ${SRC_PID:-} ]] && kill "$SRC_PID" 2>/dev/null || true
    [[ -n ${DST_PID:-} ]] && kill "$DST_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== a throw-away test CA and a tls_dir for each host"
resources/tls/make-test-ca.sh "$WORK/pki" src.demo dst.demo | sed 's/^/   /'

wait_for() { # file pattern timeout_s
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "demo: timed out waiting for '$2' in $1" >&2
    return 1
}

echo "== source: booting the stamp guest (region=${REGION} MiB, runs forever)"
"$FERRY" --kernel "$GUEST" --cmdline "region=$REGION passes=0" --memory size=512M \
    --serial "file=$SRC_LOG" --api-socket "$SRC_SOCK" &
SRC_PID=$!
wait_for "$SRC_LOG" "stamp: pass 2 ok" 120
tail -n 3 "$SRC_LOG" | sed 's/^/   source serial | /'

echo "== destination: an empty VMM (its own 512 MiB of RAM and serial log) waiting for a migration on tcp:127.0.0.1:$PORT"
"$FERRY" --api-socket "$DST_SOCK" --serial "file=$DST_LOG" --memory size=512M &
DST_PID=$!
for _ in $(seq 50); do [[ -S $DST_SOCK ]] && break; sleep 0.1; done
"$REMOTE" --api-socket "$DST_SOCK" receive-migration "tcp:127.0.0.1:$PORT" \
    --tls-dir "$WORK/pki/dst.demo" --tls-allow-subject src.demo

echo "== migrating with $CONNECTIONS connections over mutual TLS"
"$REMOTE" --api-socket "$SRC_SOCK" send-migration "tcp:127.0.0.1:$PORT" \
    --tls-dir "$WORK/pki/src.demo" --connections "$CONNECTIONS" --wait

echo "== final statistics (destination)"
"$REMOTE" --api-socket "$DST_SOCK" migration-status

echo "== the source keeps its final record in the 'migrated' state until vmm.shutdown"
"$REMOTE" --api-socket "$SRC_SOCK" info | grep -E '"state"' | sed 's/^/   source vm.info |/'
"$REMOTE" --api-socket "$SRC_SOCK" migration-status |
    grep -E '^  "(state|total_time_ms|downtime_ms|precopy_bytes|downtime_bytes|throughput_mbit_s|peer_address)"' |
    sed 's/^/   source vm.migration |/'
"$REMOTE" --api-socket "$SRC_SOCK" shutdown-vmm >/dev/null
wait "$SRC_PID" && echo "== source ferry shut down, exit code 0"
SRC_PID=
last=$(grep -o 'pass [0-9]* ok' "$SRC_LOG" | tail -n1 | awk '{print $2}')
echo "== source's last pass: $last; the guest now passes on the destination:"
wait_for "$DST_LOG" "stamp: pass $((last + 3)) ok" 120
sed 's/^/   destination serial | /' "$DST_LOG" | tail -n 4
if grep -q MISMATCH "$SRC_LOG" "$DST_LOG"; then
    echo "demo: FAILED: the guest found a page that was not migrated correctly" >&2
    exit 1
fi
echo "== done: no page lost"
"$REMOTE" --api-socket "$DST_SOCK" shutdown-vmm >/dev/null || true
