#!/bin/bash
# usage: profile.sh BENCH_BIN OUTDIR (absolute): system-wide perf (CLOCK_REALTIME) during a 4-device 6-conn main+channels run; logs the bench's ferry pids
BIN=$1; TAG=$2; OUT=$TAG; rm -rf $OUT; mkdir -p $OUT/root
cd "$(dirname "$0")/../../.."
perf record -a -g -F 499 -k CLOCK_REALTIME -o $OUT/perf-all.data > $OUT/perf.log 2>&1 &
PP=$!
sleep 1
$BIN devices --conns 6 --devices 4 --runs 1 --root $OUT/root -v > $OUT/bench.log 2>&1 &
BP=$!
declare -A seen
while kill -0 $BP 2>/dev/null; do
  for p in $(pgrep -P $BP ferry); do
    [ -n "${seen[$p]}" ] && continue
    cmd=$(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null)
    case "$cmd" in *bench-dst*) role=dst;; *bench-src*) role=src;; *) continue;; esac
    seen[$p]=1; echo "$p $role" >> $OUT/procs.txt
  done
  sleep 0.05
done
kill -INT $PP; wait $PP
