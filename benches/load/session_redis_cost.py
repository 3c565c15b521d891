"""What one HTTP fallback session costs Redis (BENCHMARKS.md, "Issue 10"): PUBLISH calls per
event of a stream forwarded through another instance, per forwarded poll and post, and at home.
Starts its own redis-server and two release-built instances on free loopback ports.
Run from anywhere after `cargo build --release`: python3 benches/load/session_redis_cost.py"""
import subprocess, time, json, socket, os, re, threading, urllib.request
ROOT=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
def free_port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
rport=free_port()
redis=subprocess.Popen(["redis-server","--port",str(rport),"--bind","127.0.0.1","--save","","--appendonly","no"],stdout=subprocess.DEVNULL)
def rcmd(*args):
    """One command; the reply read until it is complete (a bulk string or a line)."""
    s=socket.create_connection(("127.0.0.1",rport))
    s.sendall(("*%d\r\n"%len(args)+"".join("$%d\r\n%s\r\n"%(len(a),a) for a in args)).encode())
    d=b""
    while not d.endswith(b"\r\n") or (d.startswith(b"$") and len(d) < int(d[1:d.index(b"\r\n")])+len(d[:d.index(b"\r\n")])+4):
        chunk=s.recv(100000)
        if not chunk: break
        d+=chunk
    s.close(); return d.decode()
def until(what, check, seconds=15):
    end=time.time()+seconds
    while not check():
        assert time.time()<end, "timed out waiting for "+what
        time.sleep(0.01)
def answers():
    try: return rcmd("PING").startswith("+PONG")
    except OSError: return False
until("redis", answers)
def publishes():
    return int(re.search(r"cmdstat_publish:calls=(\d+)", rcmd("INFO","commandstats")).group(1))
def start():
    port=free_port()
    env=dict(os.environ, FANFARE_SERVER__LISTEN="127.0.0.1:%d"%port, FANFARE_BROKER__KIND="redis",
             FANFARE_BROKER__REDIS_URL="redis://127.0.0.1:%d/0"%rport, FANFARE_LOG__LEVEL="warn")
    p=subprocess.Popen([ROOT+"/target/release/fanfare","serve"],env=env)
    for _ in range(100):
        try:
            if urllib.request.urlopen("http://127.0.0.1:%d/readyz"%port).status==200: break
        except Exception: time.sleep(0.05)
    return p,port
(a,pa),(b,pb)=start(),start()
tok=subprocess.check_output([ROOT+"/target/release/fanfare","token","--tenant","t1","--user","u1"]).decode().strip()
def req(port,method,path,body=None):
    r=urllib.request.Request("http://127.0.0.1:%d%s"%(port,path),data=body,method=method,headers={"Authorization":"Bearer "+tok})
    return urllib.request.urlopen(r,timeout=30).read()
sid=json.loads(req(pa,"POST","/v1/sessions?token="+tok))["sessionId"]
req(pb,"POST","/v1/sessions/%s/events"%sid,json.dumps({"type":"subscribe","conversationId":"c1","id":"s"}).encode())
# an SSE stream through B
sse=socket.create_connection(("127.0.0.1",pb))
sse.sendall(("GET /v1/sessions/%s/sse?token=%s HTTP/1.1\r\nHost: x\r\n\r\n"%(sid,tok)).encode())
got=b""
def reader():
    global got
    while True:
        try: d=sse.recv(65536)
        except OSError: break
        if not d: break
        got+=d
threading.Thread(target=reader,daemon=True).start()
until("the stream's ack", lambda: b'"type":"ack"' in got)

def publish(i):
    r=urllib.request.Request("http://127.0.0.1:%d/v1/publish"%pa,data=json.dumps({"tenantId":"t1","event":{"type":"conversation.updated","conversationId":"c1","seq":i}}).encode(),method="POST",headers={"Authorization":"Bearer fanfare-dev-key"})
    urllib.request.urlopen(r).read()
N=200
p0=publishes()
for i in range(N):
    publish(i); time.sleep(0.005)  # the pace of the events: each its own batch
until("every event on the stream", lambda: got.count(b"conversation.updated")==N)
p1=publishes()
frames=got.count(b"conversation.updated")
print("forwarded SSE: %d events published, %d received, %d PUBLISH in all: %.2f PUBLISH per event beyond the event's own" % (N, frames, p1-p0, (p1-p0-N)/N))
sse.close()
# long-polls through B, one event each
cursor=int(re.findall(rb"id: (\d+)", got)[-1])
p0=publishes(); M=100
for i in range(M):
    publish(1000+i)
    body=json.loads(req(pb,"GET","/v1/sessions/%s/poll?cursor=%d"%(sid,cursor)))
    cursor=body["cursor"]
p1=publishes()
print("forwarded polls: %d polls, %d PUBLISH beyond the events: %.2f per poll" % (M, p1-p0-M, (p1-p0-M)/M))
p0=publishes()
for i in range(M):
    req(pb,"POST","/v1/sessions/%s/events"%sid,b'{"type":"ping"}')
p1=publishes()
print("forwarded posts: %d posts, %.2f PUBLISH per post" % (M, (p1-p0)/M))
p0=publishes()
for i in range(M):
    req(pa,"POST","/v1/sessions/%s/events"%sid,b'{"type":"ping"}')
p1=publishes()
print("posts at home: %.2f PUBLISH per post" % ((p1-p0)/M))
for p in (a,b,redis): p.kill()

