#!/usr/bin/env bash
# CPU per delivery and latency at the rates of BENCHMARKS.md "Issue 14": 2,000 connections in 20
# rooms of 100, 100 B events at 100 and 500 events/s, memory and Redis brokers, each figure
# beside the raw-send floor of its own run. `delivery.sh "VAR=value ..." ...` runs every
# scenario once per set of server variables given ("" = the defaults; `SERVER=path` runs
# another build), side by side. Run from the repository root after `cargo build --release`,
# with a redis-server of your own on 127.0.0.1:${REDIS_PORT:-6399}. Loopback only; every run
# is bounded by its --seconds and run.sh's timeout.
set -u
port=${REDIS_PORT:-6399}
. "$(dirname "$0")/run.sh"
[ $# -gt 0 ] || set -- ""
for broker in memory redis; do
  for rate in 100 500; do
    for vars in "$@"; do
      run "$vars FANFARE_BROKER__KIND=$broker FANFARE_BROKER__REDIS_URL=redis://127.0.0.1:$port/0" \
        fanout --connections 2000 --conversations 20 --rate $rate --seconds 10
    done
  done
done
