"""What Redis spends per event published with history (BENCHMARKS.md, "Issue 14, fifth session"):
each server binary given (default: the release build) runs on one redis-server of the script's
own, in turn, twice; the script publishes the same events through each (one event per request,
one keep-alive connection, no subscriber) and reads around them Redis's used_cpu_user +
used_cpu_sys, the bytes it read (total_net_input_bytes) and how many EVAL and EVALSHA it ran. Loopback only; bounded by EVENTS.
Run from the repository root after `cargo build --release`:
python3 benches/load/publish_script_cost.py [SERVER...]"""
import http.client, json, os, re, socket, subprocess, sys, time, urllib.request

EVENTS = 5000
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = "fanfare-dev-key"  # the development key of the embedded defaults


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def until(what, check, seconds=15):
    end = time.time() + seconds
    while not check():
        assert time.time() < end, "timed out waiting for " + what
        time.sleep(0.01)


rport = free_port()
redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)


def info(section):
    return subprocess.run(["redis-cli", "-p", str(rport), "info", section],
                          capture_output=True, text=True).stdout


def redis_cpu():
    return sum(float(v) for v in re.findall(r"used_cpu_(?:user|sys):([\d.]+)", info("cpu")))


def bytes_read():
    return int(re.search(r"total_net_input_bytes:(\d+)", info("stats")).group(1))


def calls(command):
    m = re.search(r"cmdstat_%s:calls=(\d+)" % command, info("commandstats"))
    return int(m.group(1)) if m else 0


def ready(port):
    try:
        return urllib.request.urlopen("http://127.0.0.1:%d/readyz" % port).status == 200
    except OSError:
        return False


def measure(server):
    port = free_port()
    env = dict(os.environ, FANFARE_SERVER__LISTEN="127.0.0.1:%d" % port, FANFARE_LOG__LEVEL="warn",
               FANFARE_BROKER__KIND="redis", FANFARE_BROKER__REDIS_URL="redis://127.0.0.1:%d/0" % rport,
               FANFARE_HISTORY__SIZE="1000")
    p = subprocess.Popen([server, "serve"], env=env)
    try:
        until("the server", lambda: ready(port))
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
        before, read = redis_cpu(), bytes_read()
        evals, evalshas = calls("eval"), calls("evalsha")
        for seq in range(EVENTS):
            publish(seq)
        cpu, read = redis_cpu() - before, bytes_read() - read
        return cpu / EVENTS * 1e6, read / EVENTS, calls("eval") - evals, calls("evalsha") - evalshas
    finally:
        p.terminate()
        p.wait()


try:
    until("redis", lambda: "redis_version" in info("server"))
    servers = sys.argv[1:] or [ROOT + "/target/release/fanfare"]
    for round in (1, 2):
        for server in servers:
            us, read, evals, evalshas = measure(server)
            print("%s round %d: %.1f us of Redis CPU and %.0f bytes read by Redis per event"
                  " (%d EVAL, %d EVALSHA for %d events)"
                  % (server, round, us, read, evals, evalshas, EVENTS))
finally:
    redis.terminate()
    redis.wait()
