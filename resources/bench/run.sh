#!/usr/bin/env bash
# Ferry's live-migration benchmarks (issues #3, #4, #9 and #10).
#
# Usage: bash resources/bench/run.sh [PART] [ferry-bench options...]
#   PART: all (default) | ram | idle | downtime | devices | tls | converge | limits
#   e.g.  bash resources/bench/run.sh devices --runs 7
#         bash resources/bench/run.sh converge --runs 3 --hold-file /work/quiet.lock
#   `converge` (the busy guest of issue #10) needs root: it runs source and
#   destination in two network namespaces joined by a veth pair shaped to
#   1 Gbit/s (`--netns-rate`), removed afterwards. It takes ~10 min a round
#   (pre-copy only is given 90 s) and waits for a 1-min load below 1.0
#   (`--max-load`) before each run. It is not part of `all`.
#
# Installs iperf3 (and the guest's assembler) if missing, builds the workspace
# in release mode, then runs `ferry-bench PART --out docs/benchmarks.md`:
# the tables go to stdout and into docs/benchmarks.md, raw JSON into
# resources/bench/results/, plots into docs/img/.
#
# Run it on an otherwise idle machine: the benchmarks use both cores and up
# to ~13 GiB of RAM, and every timed run first waits 6 s for the host to
# settle its free memory. `all` takes about 30-40 minutes with --runs 3.
set -euo pipefail

cd "$(dirname "$0")/../.."
PART=${1:-all}
shift || true

if ! command -v iperf3 >/dev/null; then
    echo "run.sh: installing iperf3"
    apt-get install -y -qq iperf3 >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq iperf3 >/dev/null; }
fi
if ! command -v gcc >/dev/null || ! command -v ld >/dev/null; then
    echo "run.sh: installing gcc and binutils (needed to assemble the test guest)"
    apt-get update -qq && apt-get install -y -qq gcc binutils >/dev/null
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --workspace --release --quiet

exec "$CARGO_TARGET_DIR/release/ferry-bench" "$PART" --out docs/benchmarks.md "$@"
