# Sourced by the load scripts: `run "VAR=value ..." ARGS...` starts the release server on a free
# loopback port with the variables given (and no connection-attempt limit), runs
# `fanfare-bench ARGS...` against it (at most 200 s), and stops it. `SERVER=path` among the
# variables runs another build of the server (e.g. one of an earlier commit) instead, and
# `CONFIG=path` runs it with that config file (e.g. a profile of tuning/).
run() {
  local vars=$1; shift
  local server config
  server=$(env $vars sh -c 'echo "${SERVER:-target/release/fanfare}"')
  config=$(env $vars sh -c 'echo "${CONFIG:+--config $CONFIG}"')
  env $vars FANFARE_SERVER__LISTEN=127.0.0.1:0 FANFARE_LOG__LEVEL=warn,fanfare::server=info \
    FANFARE_LIMITS__CONNECT_RATE_PER_IP=100000 FANFARE_LIMITS__CONNECT_BURST_PER_IP=100000 \
    "$server" serve $config > /tmp/fanfare-bench-server.log 2>&1 &
  local pid=$! addr=""
  for _ in $(seq 50); do
    addr=$(grep -o 'addr=[0-9.:]*' /tmp/fanfare-bench-server.log | cut -d= -f2)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  echo "== $vars $*"
  timeout 200 target/release/fanfare-bench --addr "$addr" --pid "$pid" "$@"
  kill "$pid"; wait "$pid" 2>/dev/null
}
