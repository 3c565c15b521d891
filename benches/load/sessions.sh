#!/usr/bin/env bash
# WebSocket connections and HTTP fallback sessions side by side, one scenario per server
# start (BENCHMARKS.md, "Issue 10"). Run from the repository root after `cargo build --release`.
# Loopback only; every run is bounded by its --seconds or --connections and a timeout.
set -u
. "$(dirname "$0")/run.sh"
for rate in 100 500; do
  for t in ws sse; do run "" --transport $t fanout --connections 2000 --conversations 20 --rate $rate --seconds 8; done
done
for t in ws sse; do run "" --transport $t idle --connections 5000 --tenant-size 100 --conversations 10; done
for t in ws sse; do run "" --transport $t idle --connections 5000; done
