#!/usr/bin/env bash
# Presence in one large tenant, `tenant` mode against `watch` mode with 20 watchers per user
# (BENCHMARKS.md, "Issue 13"): the frames and server CPU of every user connecting (a reconnect
# storm), and the frames of one presence change alone. Run from the repository root after
# `cargo build --release`. Loopback only; bounded by --connections and a timeout.
set -u
. "$(dirname "$0")/run.sh"
for users in 5000 10000; do
  run "FANFARE_PRESENCE__MODE=watch" idle --connections $users --tenant-size $users --conversations 10 --watch 20
  # N users of one tenant queue about N presence frames each: room for them.
  run "FANFARE_PRESENCE__MODE=tenant FANFARE_LIMITS__OUTBOUND_QUEUE_BYTES=4194304" \
    idle --connections $users --tenant-size $users --conversations 10
done
