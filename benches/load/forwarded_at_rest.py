"""What SSE streams forwarded between instances cost at rest (BENCHMARKS.md, "Issue 14, ninth
session"): N sessions created on instance A, each with its SSE stream opened on instance B
(forwarded through Redis), then each server's and Redis's CPU and wake-ups a second, and the
PUBLISHes a second Redis ran, over a window while nothing is published. Starts its own redis-server and two release-built instances on free
loopback ports, with a 5 s heartbeat so that the window holds several keepalives per stream.
Run from anywhere after `cargo build --release`:
python3 benches/load/forwarded_at_rest.py [SESSIONS] [SECONDS] (SERVER=path: another build)"""
import asyncio, json, os, subprocess, sys

from harness import RELEASE, Redis, serve

SESSIONS = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 15
SERVER = os.environ.get("SERVER", RELEASE)


async def create(port, token):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(("POST /v1/sessions?token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
             "Connection: close\r\n\r\n" % token).encode())
    answer = await r.read()
    w.close()
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["sessionId"]


async def stream(port, sid, token, opened):
    """Opens the session's stream, counts it once `session.ready` arrives, then reads on."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(("GET /v1/sessions/%s/sse?token=%s HTTP/1.1\r\nHost: x\r\n\r\n" % (sid, token)).encode())
    got = b""
    while b"session.ready" not in got:
        chunk = await r.read(4096)
        assert chunk, "a stream ended before session.ready"
        got += chunk
    opened.append(sid)
    while await r.read(4096):
        pass
    raise AssertionError("a stream ended during the window")


def usage(pid):
    """(CPU seconds, voluntary context switches: wake-ups) of every thread of `pid` so far."""
    cpu = switches = 0
    for t in os.listdir("/proc/%d/task" % pid):
        cpu += int(open("/proc/%d/task/%s/schedstat" % (pid, t)).read().split()[0]) / 1e9
        for line in open("/proc/%d/task/%s/status" % (pid, t)):
            if line.startswith("voluntary_ctxt_switches"):
                switches += int(line.split()[1])
    return cpu, switches


async def main():
    redis = Redis()
    settings = dict(BROKER__KIND="redis", BROKER__REDIS_URL=redis.url(),
                    HEARTBEAT__INTERVAL_MS="5000", HEARTBEAT__TIMEOUT_MS="10000",
                    LIMITS__CONNECT_RATE_PER_IP="100000", LIMITS__CONNECT_BURST_PER_IP="100000")
    (a, pa), (b, pb) = [serve(SERVER, **settings) for _ in "ab"]
    try:
        token = subprocess.check_output(
            [RELEASE, "token", "--tenant", "t1", "--user", "u1"]).decode().strip()
        opened, streams = [], []
        for _ in range(SESSIONS):
            sid = await create(pa, token)
            streams.append(asyncio.create_task(stream(pb, sid, token, opened)))
        while len(opened) < SESSIONS:
            done = [s for s in streams if s.done()]
            for s in done:
                s.result()  # raises what ended a stream early
            await asyncio.sleep(0.05)
        pids = [a.pid, b.pid, redis.process.pid]
        before, published = [usage(p) for p in pids], redis.calls("publish")
        await asyncio.sleep(SECONDS)
        for s in streams:
            if s.done():
                s.result()
        after, published = [usage(p) for p in pids], redis.calls("publish") - published
        for s in streams:
            s.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        for name, (c0, w0), (c1, w1) in zip(["home (A)", "forwarding (B)", "redis"], before, after):
            print("%s: %.2f ms of CPU and %.1f wake-ups a second (%d streams at rest, %g s)"
                  % (name, (c1 - c0) * 1000 / SECONDS, (w1 - w0) / SECONDS, SESSIONS, SECONDS))
        print("redis ran %.1f PUBLISHes a second" % (published / SECONDS))
    finally:
        for p in (a, b):
            p.terminate()
            p.wait()
        redis.stop()


asyncio.run(main())
