#!/usr/bin/env bash
# What an event costs beside what its deliveries cost (BENCHMARKS.md, "Issue 14: where it
# stands"): 2,000 connections, 100 events/s of 100 B, in rooms of 10, 50, 100 and 200
# subscribers (1,000 to 20,000 deliveries/s), memory broker. The server's CPU per event (the
# tool prints it beside the CPU per delivery) against the room size is a line: its slope is
# what one delivery costs, its intercept what an event costs before any delivery (the HTTP
# request, the hop between cores, the wake-ups). `room_size.sh "VAR=value ..." ...` runs the
# rooms once per set of server variables given ("" = the defaults), side by side. Run from the
# repository root after `cargo build --release`. Loopback only; bounded by --seconds and
# run.sh's timeout.
set -u
. "$(dirname "$0")/run.sh"
[ $# -gt 0 ] || set -- ""
for room in 10 50 100 200; do
  for vars in "$@"; do
    run "$vars" fanout --connections 2000 --conversations $((2000 / room)) --rate 100 --seconds 10
  done
done
