"""What one HTTP fallback session costs Redis (BENCHMARKS.md, "Issue 10"): PUBLISH calls per
event of a stream forwarded through another instance, per forwarded poll and post, and at home.
Starts its own redis-server and two release-built instances on free loopback ports.
Run from anywhere after `cargo build --release`: python3 benches/load/session_redis_cost.py"""
import json, re, socket, subprocess, threading, time, urllib.request

from harness import API_KEY, RELEASE, Redis, serve, until

redis = Redis()
(a, pa), (b, pb) = [serve(BROKER__KIND="redis", BROKER__REDIS_URL=redis.url()) for _ in "ab"]
tok = subprocess.check_output([RELEASE, "token", "--tenant", "t1", "--user", "u1"]).decode().strip()


def req(port, method, path, body=None, key=tok):
    r = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=body, method=method,
                               headers={"Authorization": "Bearer " + key})
    return urllib.request.urlopen(r, timeout=30).read()


def publish(i):
    event = {"type": "conversation.updated", "conversationId": "c1", "seq": i}
    req(pa, "POST", "/v1/publish", json.dumps({"tenantId": "t1", "event": event}).encode(), API_KEY)


sid = json.loads(req(pa, "POST", "/v1/sessions?token=" + tok))["sessionId"]
req(pb, "POST", "/v1/sessions/%s/events" % sid,
    json.dumps({"type": "subscribe", "conversationId": "c1", "id": "s"}).encode())
# an SSE stream through B
sse = socket.create_connection(("127.0.0.1", pb))
sse.sendall(("GET /v1/sessions/%s/sse?token=%s HTTP/1.1\r\nHost: x\r\n\r\n" % (sid, tok)).encode())
got = b""


def reader():
    global got
    while True:
        try:
            d = sse.recv(65536)
        except OSError:
            break
        if not d:
            break
        got += d


threading.Thread(target=reader, daemon=True).start()
until("the stream's ack", lambda: b'"type":"ack"' in got)

N = 200
p0 = redis.calls("publish")
for i in range(N):
    publish(i)
    time.sleep(0.005)  # the pace of the events: each its own batch
until("every event on the stream", lambda: got.count(b"conversation.updated") == N)
p1 = redis.calls("publish")
print("forwarded SSE: %d events published, %d received, %d PUBLISH in all: %.2f PUBLISH per event"
      " beyond the event's own" % (N, got.count(b"conversation.updated"), p1 - p0, (p1 - p0 - N) / N))
sse.close()
# long-polls through B, one event each
cursor = int(re.findall(rb"id: (\d+)", got)[-1])
M = 100
p0 = redis.calls("publish")
for i in range(M):
    publish(1000 + i)
    cursor = json.loads(req(pb, "GET", "/v1/sessions/%s/poll?cursor=%d" % (sid, cursor)))["cursor"]
p1 = redis.calls("publish")
print("forwarded polls: %d polls, %d PUBLISH beyond the events: %.2f per poll"
      % (M, p1 - p0 - M, (p1 - p0 - M) / M))
for name, port in (("forwarded posts", pb), ("posts at home", pa)):
    p0 = redis.calls("publish")
    for i in range(M):
        req(port, "POST", "/v1/sessions/%s/events" % sid, b'{"type":"ping"}')
    print("%s: %d posts, %.2f PUBLISH per post" % (name, M, (redis.calls("publish") - p0) / M))
for p in (a, b):
    p.kill()
redis.stop()
