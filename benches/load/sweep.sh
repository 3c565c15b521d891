#!/usr/bin/env bash
# CPU per delivery as connections grow (BENCHMARKS.md, "Issue 14"): 10,000 deliveries/s in
# rooms of 100 subscribers (100 events/s of 100 B) at 2,000, 10,000 and 19,000 connections,
# each figure beside the raw-send floor of its own run. `sweep.sh "VAR=value ..." ...` runs the
# sweep once per set of server variables given ("" = the defaults), one after the other, so
# that settings are compared in one sitting. Run from the repository root after
# `cargo build --release`. Loopback only; bounded by --seconds and run.sh's timeout.
set -u
. "$(dirname "$0")/run.sh"
[ $# -gt 0 ] || set -- ""
for connections in 2000 10000 19000; do
  for vars in "$@"; do
    run "$vars" fanout --connections $connections --conversations $((connections / 100)) \
      --rate 100 --seconds 10
  done
done
