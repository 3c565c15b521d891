"""What the Python load scripts share: free loopback ports, waiting for a condition with a
deadline, a redis-server of the script's own, and a server started on a free port. Loopback
only."""
import os, re, socket, subprocess, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RELEASE = ROOT + "/target/release/fanfare"
API_KEY = "fanfare-dev-key"  # the development key of the embedded defaults


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def until(what, check, seconds=15):
    end = time.time() + seconds
    while not check():
        assert time.time() < end, "timed out waiting for " + what
        time.sleep(0.01)


class Redis:
    """A redis-server on a free loopback port, without persistence; `stop()` ends it."""

    def __init__(self):
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL)
        until("redis", lambda: "redis_version" in self.info("server"))

    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def info(self, section):
        return subprocess.run(["redis-cli", "-p", str(self.port), "info", section],
                              capture_output=True, text=True).stdout

    def calls(self, command):
        """How many times `command` (lower case) has run."""
        m = re.search(r"cmdstat_%s:calls=(\d+)" % command, self.info("commandstats"))
        return int(m.group(1)) if m else 0

    def stop(self):
        self.process.terminate()
        self.process.wait()


def ready(port):
    try:
        return urllib.request.urlopen("http://127.0.0.1:%d/readyz" % port).status == 200
    except OSError:
        return False


def serve(server=RELEASE, **settings):
    """`server serve` on a free loopback port with FANFARE_<KEY>=value for each setting given
    (e.g. BROKER__KIND="redis"), once it answers /readyz: (process, port)."""
    port = free_port()
    env = dict(os.environ, FANFARE_SERVER__LISTEN="127.0.0.1:%d" % port, FANFARE_LOG__LEVEL="warn")
    env.update(("FANFARE_" + key, value) for key, value in settings.items())
    process = subprocess.Popen([server, "serve"], env=env)
    until("the server", lambda: ready(port))
    return process, port
