"""What Redis spends per event published with history (BENCHMARKS.md, "Issue 14, fifth session"):
each server binary given (default: the release build) runs on one redis-server of the script's
own, in turn, twice; the script publishes the same events through each (one event per request,
one keep-alive connection, no subscriber) and reads around them Redis's used_cpu_user +
used_cpu_sys, the bytes it read (total_net_input_bytes) and how many EVAL and EVALSHA it ran.
Loopback only; bounded by EVENTS. Run from the repository root after `cargo build --release`:
python3 benches/load/publish_script_cost.py [SERVER...]"""
import http.client, json, re, sys

from harness import API_KEY, RELEASE, Redis, serve

EVENTS = 5000


def redis_cpu(redis):
    return sum(float(v) for v in re.findall(r"used_cpu_(?:user|sys):([\d.]+)", redis.info("cpu")))


def bytes_read(redis):
    return int(re.search(r"total_net_input_bytes:(\d+)", redis.info("stats")).group(1))


def measure(redis, server):
    p, port = serve(server, BROKER__KIND="redis", BROKER__REDIS_URL=redis.url(),
                    HISTORY__SIZE="1000")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port)

        def publish(seq):
            event = {"type": "conversation.updated", "conversationId": "c%d" % (seq % 20), "seq": seq,
                     "pad": "x" * 40}
            body = json.dumps({"tenantId": "t1", "event": event})
            conn.request("POST", "/v1/publish", body, {"Authorization": "Bearer " + API_KEY,
                                                       "Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            assert r.status == 202, r.status

        for seq in range(100):  # every core's first publish, and the script known to Redis
            publish(seq)
        before, read = redis_cpu(redis), bytes_read(redis)
        evals, evalshas = redis.calls("eval"), redis.calls("evalsha")
        for seq in range(EVENTS):
            publish(seq)
        cpu, read = redis_cpu(redis) - before, bytes_read(redis) - read
        return (cpu / EVENTS * 1e6, read / EVENTS, redis.calls("eval") - evals,
                redis.calls("evalsha") - evalshas)
    finally:
        p.terminate()
        p.wait()


redis = Redis()
try:
    servers = sys.argv[1:] or [RELEASE]
    for round in (1, 2):
        for server in servers:
            us, read, evals, evalshas = measure(redis, server)
            print("%s round %d: %.1f us of Redis CPU and %.0f bytes read by Redis per event"
                  " (%d EVAL, %d EVALSHA for %d events)"
                  % (server, round, us, read, evals, evalshas, EVENTS))
finally:
    redis.stop()
