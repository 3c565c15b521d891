#!/usr/bin/env bash
# One Redis against a Redis Cluster of three masters, in one run (BENCHMARKS.md "Issue 16"):
# 2,000 connections in 20 rooms of 100, 100 B events at 500 events/s and at saturation, the
# server's CPU per delivery beside the floor of its own run, and Redis's own CPU per published
# event (used_cpu_user + used_cpu_sys of INFO cpu, summed over the masters). Starts its own
# redis-servers on free loopback ports (the cluster without replicas, so that replication does
# not take the two cores here) and removes them after. Run from the repository root after
# `cargo build --release`. Every run is bounded by its --seconds and run.sh's timeout.
set -eu
. "$(dirname "$0")/run.sh"
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
start_redis() { # PORT [ARGS...]
  local port=$1; shift
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" "$@" \
    > "$dir/$port.log" 2>&1 &
  pids+=($!)
  until redis-cli -p "$port" ping > /dev/null 2>&1; do sleep 0.1; done
}
cpu_of() { # PORTS... -> CPU seconds of those servers so far
  for p in "$@"; do redis-cli -p "$p" info cpu; done |
    awk -F: '/used_cpu_(user|sys):/ {s += $2} END {printf "%.3f", s}'
}

single=$(free_port)
start_redis "$single"
masters=()
while [ ${#masters[@]} -lt 3 ]; do
  p=$(free_port)
  [ "$p" -le 55535 ] || continue
  start_redis "$p" --cluster-enabled yes --cluster-config-file "$dir/nodes-$p.conf"
  masters+=("$p")
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${masters[@]}") --cluster-yes > /dev/null
until redis-cli -p "${masters[0]}" cluster info | grep -q cluster_state:ok; do sleep 0.1; done

measure() { # LABEL VARS PORTS... (then fanfare-bench arguments after --)
  local label=$1 vars=$2; shift 2
  local ports=()
  while [ "$1" != "--" ]; do ports+=("$1"); shift; done
  shift
  local before after
  before=$(cpu_of "${ports[@]}")
  run "$vars" "$@" | tee "$dir/out"
  after=$(cpu_of "${ports[@]}")
  local events
  events=$(awk '/^published:/ {print $2}' "$dir/out")
  awk -v b="$before" -v a="$after" -v n="$events" -v l="$label" \
    'BEGIN {printf "redis (%s): %.3f CPU s for %d events, %.2f CPU us per event\n", l, a - b, n, (a - b) * 1e6 / n}'
}

for rate in 500 0; do
  args=(fanout --connections 2000 --conversations 20 --rate "$rate" --seconds 10)
  measure "one" "FANFARE_BROKER__KIND=redis FANFARE_BROKER__REDIS_URL=redis://127.0.0.1:$single/0" \
    "$single" -- "${args[@]}"
  measure "cluster" "FANFARE_BROKER__KIND=redis-cluster FANFARE_BROKER__REDIS_URLS=redis://127.0.0.1:${masters[0]}" \
    "${masters[@]}" -- "${args[@]}"
done
