# The Linux demo, run inside the nested test bed's L1 machine by
# `resources/demo.sh --linux` (lib.sh is sourced first).
say "== source: booting Debian Linux under ferry (256 MiB, 1 vCPU)"
boot_vm src "" --memory size=256M
wait_tick src 3 180 || fail "the guest did not boot"
grep -E '^l2: (ready|tick)' /tmp/src.log | sed 's/^/l1:    source serial | /'
say "== destination: an empty VMM (its own 256 MiB of RAM and serial log) waiting on tcp:127.0.0.1:6000"
start_vm dst --memory size=256M
say "== migrating with 4 connections"
remote dst receive-migration tcp:127.0.0.1:6000 --no-tls >/dev/null || fail "receive-migration"
remote src send-migration tcp:127.0.0.1:6000 --no-tls --connections 4 --wait 2>&1 | sed 's/^/l1:    /'
remote dst migration-status | grep -E '"(state|total_time_ms|downtime_ms|transferred_bytes|zero_pages)"' | sed 's/^/l1:    /'
t=$(last_tick src)
say "== the source's last tick was $t; the guest goes on ticking on the destination:"
wait_tick dst $((t + 5)) 60 || fail "no ticks on the destination"
grep -E '^l2: tick' /tmp/dst.log | sed 's/^/l1:    destination serial | /'
if grep -q 'sum=BAD\|kernel warning' /tmp/dst.log; then fail "the guest found a problem"; fi
say "== done: timers, memory and console survived the move"
