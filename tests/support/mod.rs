//! Shared test helpers: start the real `fanfare` binary on a free port, talk to it as clients
//! do (a real WebSocket client, raw HTTP), and wait for conditions with deadlines.
#![allow(dead_code)] // each test binary uses its own subset of these helpers

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

pub mod cluster;
pub mod recovery;
pub mod session;

pub const SECRET: &str = "integration-test-secret";
pub const API_KEY: &str = "test-api-key";
/// How long any single wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fanfare")
}

/// Polls `check` until it returns `Some`, or panics with `what` after `DEADLINE`.
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The CPUs a task may run on (`/proc/{pid}/task/{tid}/status`, `Cpus_allowed_list`).
pub fn cpus_allowed(pid: u32, tid: &str) -> Vec<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    list.split(',')
        .flat_map(|range| {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            first.parse::<usize>().unwrap()..=last.parse::<usize>().unwrap()
        })
        .collect()
}

/// Lines a child process printed, stdout and stderr together.
pub type Logs = Arc<Mutex<Vec<String>>>;

/// The threads that read a child's stdout and stderr: joined once it has exited, every line
/// it wrote is in its [`Logs`].
pub type Readers = Vec<std::thread::JoinHandle<()>>;

/// Spawns `command` with its stdout and stderr collected line by line.
pub fn spawn_logged(command: &mut Command) -> (Child, Logs, Readers) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let logs = Logs::default();
    let pipes: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("stdout")),
        Box::new(child.stderr.take().expect("stderr")),
    ];
    let readers = pipes
        .into_iter()
        .map(|pipe| {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line);
                }
            })
        })
        .collect();
    (child, logs, readers)
}

/// A running `fanfare serve`, killed on drop.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    logs: Logs,
    readers: Readers,
    _config: Option<TempFile>,
}

pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(contents: &str) -> TempFile {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("fanfare-test-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, contents).expect("write temp config");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The config every test starts from: a free port, test secrets, short waits. `extra` is TOML
/// appended section by section; a section given there replaces nothing else.
pub fn base_config(extra: &str) -> String {
    let mut sections: Vec<(String, Vec<String>)> = vec![
        (
            "server".into(),
            vec![
                "listen = \"127.0.0.1:0\"".into(),
                "shutdown_timeout_ms = 5000".into(),
            ],
        ),
        ("auth".into(), vec![format!("hs256_secret = \"{SECRET}\"")]),
        (
            "publish".into(),
            vec![format!("api_keys = [\"{API_KEY}\"]")],
        ),
        ("log".into(), vec!["level = \"info\"".into()]),
    ];
    let mut current: Option<usize> = None;
    for line in extra.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(match sections.iter().position(|(n, _)| n == name) {
                Some(i) => i,
                None => {
                    sections.push((name.to_string(), vec![]));
                    sections.len() - 1
                }
            });
        } else {
            let i = current.expect("extra config must start with a [section]");
            let key = line.split('=').next().unwrap_or("").trim().to_string();
            sections[i]
                .1
                .retain(|l| l.split('=').next().unwrap_or("").trim() != key);
            sections[i].1.push(line.to_string());
        }
    }
    sections
        .iter()
        .map(|(name, lines)| format!("[{name}]\n{}\n", lines.join("\n")))
        .collect()
}

impl Server {
    /// Starts the binary with `base_config(extra)` and waits until it answers `/healthz`.
    pub fn start(extra: &str) -> Server {
        Self::start_with_env(extra, &[])
    }

    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Server {
        let config = TempFile::new(&base_config(extra));
        let mut command = Command::new(bin());
        command
            .args(["serve", "--config"])
            .arg(&config.0)
            .envs(env.iter().copied());
        Self::spawn(command, Some(config))
    }

    /// Starts the binary with `base_config(extra)` under `taskset -c {cpus}`: a process allowed
    /// only those CPUs, as in a container's cpuset.
    pub fn start_on_cpus(cpus: &str, extra: &str) -> Server {
        let config = TempFile::new(&base_config(extra));
        let mut command = Command::new("taskset");
        command
            .args(["-c", cpus, bin(), "serve", "--config"])
            .arg(&config.0);
        Self::spawn(command, Some(config))
    }

    /// Starts the binary on its embedded defaults (development secret and API key), on a free
    /// port.
    pub fn start_embedded() -> Server {
        let mut command = Command::new(bin());
        command
            .arg("serve")
            .env("FANFARE_SERVER__LISTEN", "127.0.0.1:0");
        Self::spawn(command, None)
    }

    fn spawn(mut command: Command, config: Option<TempFile>) -> Server {
        let (mut child, logs, readers) = spawn_logged(&mut command);
        let addr = wait_for("the listening log line", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "fanfare exited at start-up with {status}: {:#?}",
                    logs.lock().unwrap()
                );
            }
            logs.lock()
                .unwrap()
                .iter()
                .find(|l| l.contains("listening"))
                .and_then(|l| {
                    let at = l.find("addr=")? + 5;
                    l[at..].split_whitespace().next()?.parse().ok()
                })
        });
        let server = Server {
            addr,
            child,
            logs,
            readers,
            _config: config,
        };
        wait_for("/healthz", || {
            (server.try_http("GET", "/healthz", &[], b"").ok()?.status == 200).then_some(())
        });
        server
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a log line that `matches` and returns the first. Lines reach the test
    /// through a pipe read by another thread: one just logged may not be in [`Server::logs`]
    /// yet.
    pub fn wait_for_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        wait_for(what, || self.logs().into_iter().find(|l| matches(l)))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the process to exit; then [`Server::logs`] holds every line it wrote.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        let status = wait_for("fanfare to exit", || child.try_wait().ok().flatten());
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    pub fn try_http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<HttpResponse> {
        http(self.addr, method, path, headers, body)
    }

    pub fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        self.try_http(method, path, headers, body)
            .expect("http request")
    }

    /// POSTs a publish body with the test API key.
    pub fn publish(&self, body: &Value) -> HttpResponse {
        let auth = format!("Bearer {API_KEY}");
        self.http(
            "POST",
            "/v1/publish",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    }

    /// Publishes events of one tenant and checks they were accepted.
    pub fn publish_ok(&self, tenant: &str, events: Vec<Value>) {
        let n = events.len();
        let r = self.publish(&json!({"tenantId": tenant, "events": events}));
        assert_eq!(r.status, 202, "publish: {}", r.body);
        assert_eq!(r.json()["accepted"], n);
    }

    /// The summed value of a metric on `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.http("GET", "/metrics", &[], b"").body;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
    }

    /// Starts counting what the server process spends: CPU time and resident memory.
    pub fn meter(&self) -> Meter {
        Meter {
            pid: self.pid(),
            before: usage_of(self.pid()),
        }
    }

    /// Opens a WebSocket as `user` of `tenant` and reads `session.ready`.
    pub fn connect(&self, tenant: &str, user: &str) -> Client {
        let mut c = self
            .connect_raw(&format!("/ws?token={}", token(tenant, user, 3600)))
            .expect("websocket upgrade");
        let ready = c.recv();
        assert_eq!(ready["type"], "session.ready", "first frame: {ready}");
        c
    }

    pub fn connect_raw(&self, path_and_query: &str) -> Result<Client, tungstenite::Error> {
        connect_at(self.addr, &self.url(path_and_query), &[])
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The server's side of a failed test, for whoever reads the failure.
            eprintln!("--- server log ---\n{}", self.logs().join("\n"));
        }
    }
}

pub fn connect_at(
    addr: SocketAddr,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Client, tungstenite::Error> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.set_nodelay(true)?;
    let mut request = url.into_client_request()?;
    for (k, v) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tungstenite::client::client(request, stream) {
        Ok((ws, _)) => Ok(Client { ws }),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            panic!("blocking handshake interrupted")
        }
    }
}

/// Signs an HS256 token with the test secret.
pub fn token(tenant: &str, user: &str, ttl_s: i64) -> String {
    sign(
        &json!({"sub": user, "tid": tenant, "exp": now_s() + ttl_s}),
        SECRET,
    )
}

pub fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

pub fn now_s() -> i64 {
    now_ms() / 1000
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A WebSocket client with a read deadline on every receive.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

/// What a close looked like from the client.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
}

impl Client {
    pub fn send(&mut self, v: &Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    pub fn send_raw(&mut self, m: Message) {
        self.ws.send(m).expect("send");
    }

    /// The next JSON text frame other than `presence.online`/`presence.offline`, which tests of
    /// other capabilities see whenever a second user of the tenant connects or leaves.
    pub fn recv(&mut self) -> Value {
        loop {
            let v = self.recv_any();
            if !matches!(
                v["type"].as_str(),
                Some("presence.online" | "presence.offline")
            ) {
                return v;
            }
        }
    }

    /// The next `expected.len()` events (presence skipped) are `expected`, in any order: events
    /// of conversations with different owner cores (or Redis channels) may arrive in either.
    pub fn recv_in_any_order(&mut self, expected: &[Value]) {
        let mut missing: Vec<&Value> = expected.iter().collect();
        while !missing.is_empty() {
            let v = self.recv();
            let Some(i) = missing.iter().position(|e| **e == v) else {
                panic!("unexpected {v}; still waiting for {missing:?}");
            };
            missing.swap_remove(i);
        }
    }

    /// The next JSON text frame, whatever it is; control frames are skipped (pings are
    /// answered by tungstenite).
    pub fn recv_any(&mut self) -> Value {
        loop {
            match self.ws.read().expect("read a frame") {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON text frame"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next frame of type `kind`, failing on anything else in between.
    pub fn expect(&mut self, kind: &str) -> Value {
        let v = self.recv();
        assert_eq!(v["type"], kind, "unexpected frame {v}");
        v
    }

    /// Sends a request with `id` and returns the answer carrying that id.
    pub fn request(&mut self, mut v: Value, id: &str) -> Value {
        v["id"] = json!(id);
        self.send(&v);
        let answer = self.recv();
        assert_eq!(answer["id"], id, "answer {answer} to {v}");
        answer
    }

    pub fn subscribe(&mut self, conversation: &str) {
        let a = self.request(
            json!({"type": "subscribe", "conversationId": conversation}),
            &format!("sub-{conversation}"),
        );
        assert_eq!(a["type"], "ack", "subscribe {conversation}: {a}");
    }

    /// Reads until the server's close frame, skipping data, and answers it; returns its code.
    pub fn expect_close(&mut self) -> Closed {
        loop {
            let code = match self.ws.read() {
                Ok(Message::Close(Some(frame))) => u16::from(frame.code),
                Ok(Message::Close(None)) => u16::from(CloseCode::Status),
                Ok(_) => continue,
                Err(e) => panic!("connection ended without a close frame: {e}"),
            };
            // Sends tungstenite's queued close reply, completing the handshake.
            let _ = self.ws.flush();
            return Closed { code };
        }
    }

    /// True once the server has ended the connection (close frame or EOF).
    pub fn is_closed(&mut self) -> bool {
        loop {
            match self.ws.read() {
                Ok(Message::Close(_)) => continue,
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => return true,
                Err(tungstenite::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The `Retry-After` header, in seconds.
    pub fn retry_after_s(&self) -> u64 {
        self.header("Retry-After")
            .expect("Retry-After")
            .parse()
            .expect("Retry-After in seconds")
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    read_response(&mut s)
}

/// Reads one response: the head, then `Content-Length` bytes of body (a `101` has none).
pub fn read_response(s: &mut TcpStream) -> std::io::Result<HttpResponse> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            break;
        }
        raw.push(byte[0]);
    }
    let mut response = parse_response(&raw)?;
    let length: usize = response
        .header("Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body)?;
    response.body = String::from_utf8_lossy(&body).into_owned();
    Ok(response)
}

pub fn parse_response(raw: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| bad("no head"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// The core a connection lives on: connection ids carry it in their top 16 bits.
pub fn core_of(ready: &Value) -> u64 {
    let id = ready["connectionId"].as_str().expect("connectionId");
    u64::from_str_radix(id, 16).expect("hex connection id") >> 48
}

/// The first `count` conversations of tenant `t1` owned by `core` of `cores`.
pub fn conversations_owned_by(core: usize, cores: usize, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("room-{i}"))
        .filter(|name| {
            let key = fanfare::route::room_key("t1", name);
            fanfare::route::shard_for(key.as_bytes(), cores) == core
        })
        .take(count)
        .collect()
}

/// A conversation of `tenant` other than `like`'s, owned by the same core as `like` (tenant,
/// conversation) on a 2-core server: an event published to it after another reaches a given
/// connection after that one, so it is the sentinel that proves "nothing else came".
pub fn sentinel_for(tenant: &str, like: (&str, &str)) -> String {
    let owner =
        |t: &str, c: &str| fanfare::route::shard_for(fanfare::route::room_key(t, c).as_bytes(), 2);
    (0..)
        .map(|i| format!("sentinel-{i}"))
        .find(|c| owner(tenant, c) == owner(like.0, like.1))
        .expect("some conversation shares the owner")
}

/// Connects clients of tenant `t1` (user `user`) until each of the 2 cores holds at least
/// `per_core` of them; returns them with their cores.
pub fn clients_on_both_cores(server: &Server, user: &str, per_core: usize) -> Vec<(Client, u64)> {
    let mut clients = Vec::new();
    let count =
        |clients: &Vec<(Client, u64)>, core| clients.iter().filter(|(_, c)| *c == core).count();
    while count(&clients, 0) < per_core || count(&clients, 1) < per_core {
        assert!(
            clients.len() < 400,
            "the connections all landed on one core"
        );
        let mut c = server
            .connect_raw(&format!("/ws?token={}", token("t1", user, 3600)))
            .expect("websocket upgrade");
        let core = core_of(&c.expect("session.ready"));
        clients.push((c, core));
    }
    clients
}

/// A `conversation.updated` event.
/// Reads events from `next` until the one with `"last": true`: every `conversation.updated`
/// must come in `seq` order from 0 (none lost), `presence.typing` may be shed. Returns how
/// many events and typing frames arrived.
pub fn events_then_typing(mut next: impl FnMut() -> Value) -> (usize, usize) {
    let (mut events, mut typed) = (0, 0);
    loop {
        let v = next();
        match v["type"].as_str() {
            Some("presence.typing") => typed += 1,
            Some("conversation.updated") if v["last"] == true => return (events, typed),
            Some("conversation.updated") => {
                assert_eq!(v["seq"], events, "an event was lost");
                events += 1;
            }
            _ => panic!("unexpected {v}"),
        }
    }
}

pub fn updated(conversation: &str, seq: usize) -> Value {
    json!({"type": "conversation.updated", "conversationId": conversation, "seq": seq})
}

/// A client of tenant `t1` with a 4 kB receive buffer, subscribed to `conversation`, that the
/// test then never reads: the server's writes to it stall once a few frames are in flight.
pub fn stuck_client(server: &Server, user: &str, conversation: &str) -> Client {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&server.addr.into()).unwrap();
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let url = server.url(&format!("/ws?token={}", token("t1", user, 600)));
    let request = url.into_client_request().unwrap();
    let (ws, _) = tungstenite::client::client(request, stream).unwrap();
    let mut client = Client { ws };
    client.expect("session.ready");
    client.subscribe(conversation);
    client
}

/// Opens a WebSocket by hand on a raw socket as `user` of tenant `t1`, for tests that send what
/// a client library would refuse to. The 101 answer and the frames are left to read.
pub fn raw_upgrade(server: &Server, user: &str) -> TcpStream {
    let mut raw = TcpStream::connect(server.addr).expect("connect");
    raw.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let t = token("t1", user, 60);
    write!(
        raw,
        "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .expect("write upgrade");
    raw
}

/// A masked client frame.
pub fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads a raw upgraded socket: skips the 101 head, collects server frames (opcode, payload)
/// until a close frame, and returns them with the close code.
pub fn read_until_close(raw: &mut TcpStream) -> (Vec<(u8, Vec<u8>)>, u16) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut head_done = false;
    let mut frames = Vec::new();
    loop {
        if !head_done {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(
                    buf.starts_with(b"HTTP/1.1 101"),
                    "upgrade refused: {}",
                    String::from_utf8_lossy(&buf)
                );
                buf.drain(..at + 4);
                head_done = true;
            }
        }
        while head_done && buf.len() >= 2 {
            let (len, at) = match buf[1] & 0x7F {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < at + len {
                break;
            }
            let opcode = buf[0] & 0x0F;
            let payload = buf[at..at + len].to_vec();
            buf.drain(..at + len);
            if opcode == 0x8 {
                return (frames, u16::from_be_bytes([payload[0], payload[1]]));
            }
            frames.push((opcode, payload));
        }
        let n = raw
            .read(&mut chunk)
            .expect("the server closes before the deadline");
        assert!(n > 0, "connection ended without a close frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A `redis-server` of the test's own on a free loopback port, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// With persistence: where its append-only file lives (removed on drop).
    dir: Option<PathBuf>,
    /// A Redis Cluster node's: `--cluster-enabled` and where its `nodes.conf` lives.
    cluster: Option<PathBuf>,
}

impl Redis {
    /// Starts on a free port. The port is found by binding 0 and closing, so another process
    /// may take it before redis-server does: then it fails to bind (or someone else answers),
    /// and it is started again on another port.
    pub fn start() -> Redis {
        Self::start_in(None)
    }

    /// With an append-only file synced on every write, in a directory of its own: a restart
    /// loses nothing that was acknowledged.
    pub fn start_persistent() -> Redis {
        let dir =
            std::env::temp_dir().join(format!("fanfare-redis-{}-{}", std::process::id(), now_ms()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        Self::start_in(Some(dir))
    }

    fn start_in(dir: Option<PathBuf>) -> Redis {
        Self::start_on_free_port(dir, None)
    }

    /// A Redis Cluster node (not yet in a cluster), its `nodes.conf` in `dir`. Its cluster bus
    /// listens on its port + 10000, which must be free too.
    pub fn start_cluster_node(dir: &Path) -> Redis {
        Self::start_on_free_port(None, Some(dir.to_path_buf()))
    }

    fn start_on_free_port(dir: Option<PathBuf>, cluster: Option<PathBuf>) -> Redis {
        for _ in 0..50 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let bus_free = || {
                port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
            };
            if cluster.is_some() && !bus_free() {
                continue;
            }
            let mut redis = Redis {
                port,
                child: None,
                dir: dir.clone(),
                cluster: cluster.clone(),
            };
            if redis.spawn() {
                return redis;
            }
        }
        panic!("redis-server found no free port in 50 tries");
    }

    /// Starts redis-server on `self.port`; false if the port turned out to be taken.
    fn spawn(&mut self) -> bool {
        let persistence: Vec<&str> = match &self.dir {
            Some(_) => vec!["--appendonly", "yes", "--appendfsync", "always"],
            None => vec!["--appendonly", "no"],
        };
        // A cluster's replicas write the RDB they sync into their directory: never the
        // working directory (the repository's).
        let workdir = self.dir.as_ref().or(self.cluster.as_ref());
        let workdir: Vec<&str> = workdir
            .map(|dir| vec!["--dir", dir.to_str().expect("a UTF-8 temp dir")])
            .unwrap_or_default();
        let conf = self
            .cluster
            .as_ref()
            .map(|dir| dir.join(format!("nodes-{}.conf", self.port)));
        let cluster: Vec<&str> = match &conf {
            Some(conf) => vec![
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "1000",
                "--cluster-config-file",
                conf.to_str().expect("a UTF-8 temp dir"),
            ],
            None => vec![],
        };
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(persistence)
            .args(workdir)
            .args(cluster)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let pid = child.id();
        let child = self.child.insert(child);
        let ours = wait_for("redis-server to answer PING or exit", || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(false);
            }
            let info = Self::command_at(self.port, &["INFO", "server"]).ok()?;
            Some(info.contains(&format!("process_id:{pid}\r\n")))
        });
        if !ours {
            self.kill();
        }
        ours
    }
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "port {} was taken while redis-server was down",
            self.port
        );
    }

    /// Sends one command and returns the raw reply's first line(s).
    pub fn command(&self, args: &[impl AsRef<[u8]>]) -> std::io::Result<String> {
        Self::command_at(self.port, args)
    }

    fn command_at(port: u16, args: &[impl AsRef<[u8]>]) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            let a = a.as_ref();
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        s.write_all(&req)?;
        let mut buf = [0u8; 2048];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A TCP proxy in front of a local port that can be frozen as by a network partition: while
/// frozen it accepts connections and holds every one open without forwarding a byte. Thawing
/// ends the connections that saw the freeze (as a partition's dead links end); connections
/// made after it forward again.
pub struct Proxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    frozen: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    /// Pumps between their last look at `frozen` and the end of a write.
    forwarding: std::sync::atomic::AtomicUsize,
}

impl Proxy {
    pub fn to(upstream: u16) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState::default());
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let (Ok(client), Ok(server)) =
                    (client, TcpStream::connect(("127.0.0.1", upstream)))
                else {
                    continue;
                };
                let saw_freeze = Arc::new(std::sync::atomic::AtomicBool::new(false));
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (state, saw_freeze) = (shared.clone(), saw_freeze.clone());
                    std::thread::spawn(move || Self::pump(from, to, &state, &saw_freeze));
                }
            }
        });
        Proxy { port, state }
    }

    /// Copies `from` to `to` until either ends, the proxy stops, or a thaw ends the link.
    fn pump(
        mut from: TcpStream,
        mut to: TcpStream,
        state: &ProxyState,
        saw_freeze: &std::sync::atomic::AtomicBool,
    ) {
        use std::sync::atomic::Ordering::{Relaxed, SeqCst};
        // Short reads, so that the link notices a freeze, a thaw or a stop promptly.
        from.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut buf = [0u8; 16 * 1024];
        loop {
            if state.stop.load(Relaxed) {
                break;
            }
            if state.frozen.load(SeqCst) {
                saw_freeze.store(true, Relaxed);
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            if saw_freeze.load(Relaxed) {
                break;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    state.forwarding.fetch_add(1, SeqCst);
                    // Bytes read as the freeze began are held back with the rest.
                    let frozen = state.frozen.load(SeqCst);
                    let written = frozen || to.write_all(&buf[..n]).is_ok();
                    state.forwarding.fetch_sub(1, SeqCst);
                    if !written {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        let _ = from.shutdown(std::net::Shutdown::Both);
        let _ = to.shutdown(std::net::Shutdown::Both);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Freezes every link: no byte sent from now on is forwarded.
    pub fn freeze(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.state.frozen.store(true, SeqCst);
        // A pump that looked before the store finishes its write first.
        while self.state.forwarding.load(SeqCst) > 0 {
            std::thread::yield_now();
        }
    }

    pub fn thaw(&self) {
        self.state
            .frozen
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accept loop so that it sees the stop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn usage_of(pid: u32) -> fanfare::metrics::ProcessUsage {
    fanfare::metrics::ProcessUsage::of(pid).expect("/proc of the server")
}

/// What a server spent from `Server::meter` on.
pub struct Meter {
    pid: u32,
    before: fanfare::metrics::ProcessUsage,
}

impl Meter {
    /// Asserts that since the start the server used under `cpu_s` seconds of CPU and grew its
    /// resident memory by under `rss_kib` KiB while `what` happened.
    pub fn assert_under(&self, what: &str, cpu_s: f64, rss_kib: u64) {
        let now = usage_of(self.pid);
        let (cpu, grown) = (
            now.cpu_s - self.before.cpu_s,
            now.rss_kib.saturating_sub(self.before.rss_kib),
        );
        assert!(
            cpu < cpu_s && grown < rss_kib,
            "{what} cost {cpu:.2} s of CPU (bound {cpu_s}) and {grown} KiB of RSS (bound {rss_kib})"
        );
    }
}
