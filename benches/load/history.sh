#!/usr/bin/env bash
# Missed-event recovery (BENCHMARKS.md, "Issue 11"): fan-out with history off and on, memory
# and Redis brokers, one scenario per server start and each pair side by side in one run; then
# a reconnect storm against Redis. Run from the repository root after `cargo build --release`,
# with a redis-server of your own on 127.0.0.1:${REDIS_PORT:-6399} (flushed between runs).
# Loopback only; every run is bounded by its --seconds and a timeout.
set -u
port=${REDIS_PORT:-6399}
. "$(dirname "$0")/run.sh"
# Each scenario on an empty Redis.
fresh() {
  redis-cli -p "$port" flushall > /dev/null
  local vars=$1; shift
  run "$vars FANFARE_BROKER__REDIS_URL=redis://127.0.0.1:$port/0" "$@"
}
for broker in memory redis; do
  for rate in 100 500; do
    for size in 0 1000; do
      fresh "FANFARE_BROKER__KIND=$broker FANFARE_HISTORY__SIZE=$size" \
        fanout --connections 2000 --conversations 20 --rate $rate --seconds 8
    done
  done
done
fresh "FANFARE_BROKER__KIND=redis FANFARE_HISTORY__SIZE=1000" storm --clients 100 --rate 200 --seconds 8
fresh "FANFARE_BROKER__KIND=memory FANFARE_HISTORY__SIZE=1000" storm --clients 100 --rate 200 --seconds 8
