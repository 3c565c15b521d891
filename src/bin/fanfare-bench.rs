//! `fanfare-bench`: drives a running Fanfare the way users do and measures it against this
//! machine's raw-send floor in the same run.
//!
//! - `fanout`: N WebSocket connections (source addresses 127.0.0.2…127.0.0.250) over R
//!   conversations, an open-loop publisher at a fixed rate through `/v1/publish` (latency counted
//!   from each event's scheduled send time), then the floors: the latency of the same rooms and
//!   rate relayed by one plain thread per core instead of the server, and the CPU of the same
//!   number of frames written by this tool to N loopback sockets, one frame per send and 16 per
//!   send.
//! - `idle`: N idle subscribed connections; the server's RSS per connection and the accept rate.
//! - `storm`: N clients of one conversation (needs `history.size` > 0) that drop and
//!   resubscribe with `since` while publishing goes on: recovery latency, what each recovery
//!   cost Redis (history reads per recovery), and whether any event was lost or repeated.
//!
//! `--transport sse` runs either mode over HTTP fallback sessions instead of WebSockets: each
//! client creates a session, posts its subscribe and reads an SSE stream (one connection from
//! its own source address for all three).
//!
//! Every loop is bounded in count and time, and only loopback addresses are ever targeted.

use std::cell::RefCell;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use fanfare::deadline::within;
use fanfare::metrics::ProcessUsage;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use hdrhistogram::Histogram;

#[derive(Parser)]
#[command(
    name = "fanfare-bench",
    about = "Load tool for Fanfare (loopback only)"
)]
struct Cli {
    /// The server's address (must be a loopback address).
    #[arg(long, default_value = "127.0.0.1:8080", global = true)]
    addr: SocketAddr,
    /// The server's pid, for its CPU time and RSS (from /proc).
    #[arg(long, global = true)]
    pid: Option<u32>,
    /// HS256 secret to mint client tokens with.
    #[arg(long, default_value = fanfare::config::DEV_SECRET, global = true)]
    secret: String,
    /// Publish API key.
    #[arg(long, default_value = fanfare::config::DEV_API_KEY, global = true)]
    api_key: String,
    /// How clients connect.
    #[arg(long, value_enum, default_value_t = Transport::Ws, global = true)]
    transport: Transport,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Fan-out: publish at a fixed rate to subscribed connections; then the raw-send floor.
    Fanout {
        #[arg(long, default_value_t = 2000)]
        connections: usize,
        #[arg(long, default_value_t = 20)]
        conversations: usize,
        /// Events per second (open loop). 0 = as fast as the server accepts (saturation).
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds of publishing (at most 120).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Bytes per event.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Receiving threads (each its own executor).
        #[arg(long, default_value_t = 1)]
        receivers: usize,
        /// Publishing connections, each on its own thread with `rate / publishers` events/s
        /// (with --rate 0, each as fast as its requests are acknowledged).
        #[arg(long, default_value_t = 1)]
        publishers: u64,
    },
    /// Reconnect storm: clients of one conversation drop and resubscribe with `since` while
    /// events are published; recovery latency and exactness (WebSocket only).
    Storm {
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Events per second to the conversation.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Seconds of publishing (at most 120).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// How long a client stays connected, then away, each round (milliseconds).
        #[arg(long, default_value_t = 300)]
        stay_ms: u64,
        #[arg(long, default_value_t = 200)]
        away_ms: u64,
    },
    /// Idle: open N subscribed connections and report RSS per connection and accept rate.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Connections per tenant, each its own user. 1 (the default) is the worst case for
        /// memory: every connection brings its own tenant, user and conversation. Presence of
        /// K users in one tenant is K² frames while they connect (PROTOCOL.md).
        #[arg(long, default_value_t = 1)]
        tenant_size: usize,
        /// Conversations per tenant; a tenant's connections spread over them.
        #[arg(long, default_value_t = 100)]
        conversations: usize,
        /// With the server's `presence.mode = "watch"`: each connection watches the next K
        /// users of its tenant, so each user has K watchers (0: no watch list).
        #[arg(long, default_value_t = 0)]
        watch: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    /// WebSocket connections.
    Ws,
    /// HTTP fallback sessions read over SSE.
    Sse,
}

impl Transport {
    fn clients(self) -> &'static str {
        match self {
            Transport::Ws => "WebSocket connections",
            Transport::Sse => "SSE sessions",
        }
    }
}

const TENANT: &str = "bench";
/// Publishing stops by itself after this, whatever was asked.
const MAX_SECONDS: u64 = 120;

fn main() {
    let cli = Cli::parse();
    if !cli.addr.ip().is_loopback() {
        eprintln!("fanfare-bench targets loopback addresses only");
        std::process::exit(2);
    }
    fanfare::server::raise_fd_limit();
    match cli.mode {
        Mode::Fanout {
            connections,
            conversations,
            rate,
            seconds,
            payload,
            receivers,
            publishers,
        } => {
            let publishing = Publishing {
                rate,
                seconds: seconds.min(MAX_SECONDS),
                payload,
                publishers: publishers.max(1),
            };
            fanout(
                &cli,
                connections,
                conversations.max(1),
                receivers.max(1),
                publishing,
            )
        }
        Mode::Idle {
            connections,
            tenant_size,
            conversations,
            watch,
        } => idle(
            &cli,
            connections,
            (tenant_size.max(1), conversations.max(1)),
            watch,
        ),
        Mode::Storm {
            clients,
            rate,
            seconds,
            stay_ms,
            away_ms,
        } => {
            let rounds = Rounds {
                stay: Duration::from_millis(stay_ms),
                away: Duration::from_millis(away_ms),
            };
            storm(
                &cli,
                clients.max(1),
                rate.max(1),
                seconds.min(MAX_SECONDS),
                rounds,
            )
        }
    }
}

// ---- what the server used ---------------------------------------------------------------

fn server_usage(pid: Option<u32>) -> Option<ProcessUsage> {
    ProcessUsage::of(pid?)
}

/// The server's CPU time in ns and its wake-ups (voluntary context switches), summed over its
/// threads: finer than `ProcessUsage`'s clock ticks, for a server at rest.
fn server_threads(pid: Option<u32>) -> Option<(u64, u64)> {
    let mut totals = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{}/task", pid?)).ok()? {
        let path = task.ok()?.path();
        let schedstat = std::fs::read_to_string(path.join("schedstat")).ok()?;
        totals.0 += schedstat.split_whitespace().next()?.parse::<u64>().ok()?;
        let status = std::fs::read_to_string(path.join("status")).ok()?;
        totals.1 += status.lines().find_map(|l| {
            l.strip_prefix("voluntary_ctxt_switches:")?
                .trim()
                .parse::<u64>()
                .ok()
        })?;
    }
    Some(totals)
}

/// How many TCP sockets of this machine are in TIME_WAIT (`/proc/net/sockstat`).
fn time_wait_sockets() -> Option<u64> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = sockstat.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let mut fields = tcp.split_whitespace();
    fields.find(|&f| f == "tw")?;
    fields.next()?.parse().ok()
}

/// The value of counter `fanfare_<name>` in the server's `/metrics`.
fn server_counter(addr: SocketAddr, name: &str) -> Option<u64> {
    let mut http = TcpStream::connect(addr).ok()?;
    http.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    http.read_to_string(&mut text).ok()?;
    let line = format!("\nfanfare_{name} ");
    let at = text.find(&line)? + line.len();
    text[at..].split_whitespace().next()?.parse().ok()
}

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

// ---- client connections -------------------------------------------------------------------

/// Source address for connection `i`: 127.0.0.2 … 127.0.0.250, so ephemeral ports last.
fn source_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 249) as u8)
}

/// Connects from `source_ip(i)`, subscribes to `conversation` over `transport`, and returns
/// the stream once the subscribe is acked.
async fn open_subscribed(
    addr: SocketAddr,
    i: usize,
    token: &str,
    conversation: &str,
    transport: Transport,
) -> std::io::Result<glommio::net::TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(source_ip(i), 0)).into())?;
    // Loopback connects complete at once; the executor blocks for microseconds.
    socket.connect(&addr.into())?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    // SAFETY: we own the fd and give it up here.
    let mut stream = unsafe { glommio::net::TcpStream::from_raw_fd(socket.into_raw_fd()) };
    let subscribe = format!(r#"{{"type":"subscribe","conversationId":"{conversation}","id":"s"}}"#);
    if transport == Transport::Sse {
        return open_session(stream, addr, token, &subscribe).await;
    }
    let request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ZmFuZmFyZS1iZW5jaC1rZXk=\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    expect_head(&mut stream, "HTTP/1.1 101").await?;
    stream.write_all(&masked_text(subscribe.as_bytes())).await?;
    until_ack(&mut stream, Transport::Ws).await?;
    Ok(stream)
}

/// Creates a session on `stream`, posts `subscribe` to it and opens its SSE stream: three
/// requests on one connection.
async fn open_session(
    mut stream: glommio::net::TcpStream,
    addr: SocketAddr,
    token: &str,
    subscribe: &str,
) -> std::io::Result<glommio::net::TcpStream> {
    let create = format!(
        "POST /v1/sessions?token={token} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(create.as_bytes()).await?;
    let head = expect_head(&mut stream, "HTTP/1.1 201").await?;
    let mut body = vec![0u8; content_length(&head)];
    stream.read_exact(&mut body).await?;
    let body: serde_json::Value = serde_json::from_slice(&body).map_err(std::io::Error::other)?;
    let id = body["sessionId"].as_str().unwrap_or_default();
    let post = format!(
        "POST /v1/sessions/{id}/events?token={token} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{subscribe}",
        subscribe.len()
    );
    stream.write_all(post.as_bytes()).await?;
    let head = expect_head(&mut stream, "HTTP/1.1 202").await?;
    stream
        .read_exact(&mut vec![0u8; content_length(&head)])
        .await?;
    let sse = format!("GET /v1/sessions/{id}/sse?token={token} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(sse.as_bytes()).await?;
    expect_head(&mut stream, "HTTP/1.1 200").await?;
    until_ack(&mut stream, Transport::Sse).await?;
    Ok(stream)
}

/// A response head's `Content-Length` (0 without one).
fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads a response head, which must start with `status`.
async fn expect_head(
    stream: &mut glommio::net::TcpStream,
    status: &str,
) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with(status) {
        return Err(std::io::Error::other(head));
    }
    Ok(head)
}

/// Reads server messages until the subscribe's ack (session.ready comes first).
async fn until_ack(
    stream: &mut glommio::net::TcpStream,
    transport: Transport,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some((payload, used)) = server_message(&buf, transport) {
            let acked = payload.windows(12).any(|w| w == br#""type":"ack""#);
            buf.drain(..used);
            if acked {
                return Ok(());
            }
        }
    }
}

/// One server message at the front of `buf`: its bytes and total length.
fn server_message(buf: &[u8], transport: Transport) -> Option<(&[u8], usize)> {
    match transport {
        Transport::Ws => server_frame(buf),
        // An SSE message ends with a blank line.
        Transport::Sse => {
            let end = buf.windows(2).position(|w| w == b"\n\n")? + 2;
            Some((&buf[..end], end))
        }
    }
}

/// A masked client text frame (mask of zeros: the XOR is the identity).
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x81];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

/// One unmasked server frame at the front of `buf`: its payload and total length.
fn server_frame(buf: &[u8]) -> Option<(&[u8], usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, at) = match buf[1] & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let end = at + len;
    (buf.len() >= end).then(|| (&buf[at..end], end))
}

/// Reads frames until `stop`; counts text frames and records latency from their `"t":` field
/// (nanoseconds after `epoch` at which the event was scheduled).
async fn drain(
    mut stream: glommio::net::TcpStream,
    transport: Transport,
    epoch: Instant,
    shared: Rc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let read = within(Duration::from_millis(200), stream.read(&mut chunk)).await;
        let n = match read {
            None => continue,
            Some(Ok(0)) | Some(Err(_)) => return,
            Some(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let now = epoch.elapsed().as_nanos() as u64;
        let mut used = 0;
        while let Some((payload, len)) = server_message(&buf[used..], transport) {
            if let Some(t) = field_t(payload) {
                shared.received.fetch_add(1, Ordering::Relaxed);
                let _ = shared
                    .latency
                    .borrow_mut()
                    .record(now.saturating_sub(t).max(1));
            }
            used += len;
        }
        buf.drain(..used);
    }
}

fn field_t(payload: &[u8]) -> Option<u64> {
    let at = payload.windows(4).position(|w| w == br#""t":"#)? + 4;
    let digits = payload[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// What one receiving executor counted; `received` is shared by all of them.
struct Tally {
    received: Arc<AtomicU64>,
    latency: RefCell<Histogram<u64>>,
}

// ---- fanout -------------------------------------------------------------------------------

/// How the fan-out mode publishes.
struct Publishing {
    /// Events per second over all publishers; 0: as fast as acknowledged.
    rate: u64,
    seconds: u64,
    payload: usize,
    publishers: u64,
}

fn fanout(
    cli: &Cli,
    connections: usize,
    conversations: usize,
    receivers: usize,
    publishing: Publishing,
) {
    let Publishing {
        rate,
        seconds,
        payload,
        publishers,
    } = publishing;
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let auth = fanfare::config::Auth {
        hs256_secret: cli.secret.clone(),
        ..Default::default()
    };
    let now_s = fanfare::auth::now_ms() / 1000;
    // One user for every connection: N users of one tenant would first be an N² presence
    // storm (PROTOCOL.md), which is not what this mode measures.
    let token = fanfare::auth::mint_hs256(&auth, TENANT, "fan", 3600, now_s).expect("token");
    // Connection i is received by thread i % receivers: one thread reading every socket would
    // add its own serial recv time to the latency of the last frames of each event.
    let receivers: Vec<_> = (0..receivers)
        .map(|r| {
            let (stop, opened, received, addr, token, transport) = (
                stop.clone(),
                opened.clone(),
                received.clone(),
                cli.addr,
                token.clone(),
                cli.transport,
            );
            reading_thread(received, move |tally| async move {
                let mut tasks = Vec::new();
                for i in (r..connections).step_by(receivers) {
                    let conversation = format!("c{}", i % conversations);
                    match open_subscribed(addr, i, &token, &conversation, transport).await {
                        Ok(stream) => {
                            opened.fetch_add(1, Ordering::Relaxed);
                            tasks.push(glommio::spawn_local(drain(
                                stream,
                                transport,
                                epoch,
                                tally.clone(),
                                stop.clone(),
                            )));
                        }
                        Err(e) => eprintln!("connection {i}: {e}"),
                    }
                }
                tasks
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while opened.load(Ordering::Relaxed) < connections as u64
        && Instant::now() < deadline
        && !receivers.iter().any(|r| r.is_finished())
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let live = opened.load(Ordering::Relaxed) as usize;
    println!(
        "{}: {live}/{connections} subscribed, {conversations} conversations, {payload} B events",
        cli.transport.clients()
    );
    let before = server_usage(cli.pid);
    let writes_before = server_counter(cli.addr, "writes_total");
    let started = Instant::now();
    let sent: Vec<u64> = std::thread::scope(|s| {
        let publishers: Vec<_> = (0..publishers)
            .map(|_| {
                s.spawn(|| {
                    publish(
                        cli,
                        conversations,
                        rate / publishers,
                        seconds,
                        payload,
                        epoch,
                    )
                })
            })
            .collect();
        publishers
            .into_iter()
            .map(|p| p.join().expect("publisher"))
            .collect()
    });
    let published: u64 = sent.iter().sum();
    let publish_s = started.elapsed().as_secs_f64();
    // Subscribers per conversation, as connections were spread (each publisher numbers its
    // events from 0).
    let expected: u64 = sent
        .iter()
        .flat_map(|&n| 0..n)
        .map(|e| subscribers(live, conversations, (e % conversations as u64) as usize))
        .sum();
    let settled = Instant::now();
    settle(&received, expected);
    let after = server_usage(cli.pid);
    let writes_after = server_counter(cli.addr, "writes_total");
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    for r in receivers {
        if let Ok(h) = r.join() {
            latency.add(h).expect("histograms of the same precision");
        }
    }
    let received = received.load(Ordering::Relaxed);
    let window = publish_s + settled.elapsed().as_secs_f64();
    println!(
        "published: {published} events in {publish_s:.2}s ({:.0}/s)",
        published as f64 / publish_s
    );
    println!(
        "deliveries: {received} ({:.0}/s), lost: {}",
        received as f64 / window,
        expected.saturating_sub(received)
    );
    println!("publish->deliver latency: {}", quantiles(&latency));
    let per_delivery = match (before, after) {
        (Some(b), Some(a)) if received > 0 => {
            let cpu = a.cpu_s - b.cpu_s;
            let per = cpu * 1e6 / received as f64;
            // Per event too: what an event costs before its deliveries shows against room sizes.
            let per_event = cpu * 1e6 / published.max(1) as f64;
            println!(
                "server: {cpu:.2} CPU s, RSS {} KiB, {per:.3} CPU us per delivery, \
                 {per_event:.0} per event",
                a.rss_kib
            );
            Some(per)
        }
        _ => None,
    };
    let frames = received.max(1);
    // The batching the server reached: the floor of the matching mode is measured too.
    let mut batches = vec![1usize, 16];
    if let (Some(b), Some(a)) = (writes_before, writes_after) {
        let per_send = received as f64 / a.saturating_sub(b).max(1) as f64;
        println!("server: {per_send:.1} frames per send");
        let matching = (per_send.round() as usize).max(1);
        if !batches.contains(&matching) {
            batches.insert(1, matching);
        }
    }
    if rate > 0 {
        let floor = latency_floor(live, live / conversations, &publishing);
        println!("latency floor (no server): {}", quantiles(&floor));
    }
    for batch in batches {
        let floor = raw_floor(live.max(1), frames, payload, batch);
        match per_delivery {
            Some(per) => println!(
                "floor ({batch} frame/send): {floor:.3} CPU us per frame; server/floor = {:.2}",
                per / floor
            ),
            None => println!("floor ({batch} frame/send): {floor:.3} CPU us per frame"),
        }
    }
}

/// Padding that makes an event of about `payload` bytes.
fn padding(payload: usize) -> String {
    "x".repeat(payload.saturating_sub(80))
}

/// The event the tool publishes to conversation `c<room>`, scheduled at `t` (nanoseconds after
/// the run's epoch, read back by [`field_t`]).
fn event_json(room: u64, t: u128, pad: &str) -> String {
    format!(r#"{{"type":"conversation.updated","conversationId":"c{room}","t":{t},"pad":"{pad}"}}"#)
}

/// A latency histogram of nanoseconds as the tool prints it.
fn quantiles(h: &Histogram<u64>) -> String {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "p50 {:.0}us p99 {:.0}us p999 {:.0}us max {:.0}us",
        us(0.5),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0
    )
}

fn subscribers(connections: usize, conversations: usize, k: usize) -> u64 {
    (connections / conversations + usize::from(k < connections % conversations)) as u64
}

/// Publishes for `seconds` at `rate` events/s (0: as fast as acknowledged), in batches of the
/// events due; returns how many were accepted.
fn publish(
    cli: &Cli,
    conversations: usize,
    rate: u64,
    seconds: u64,
    payload: usize,
    epoch: Instant,
) -> u64 {
    let mut http = TcpStream::connect(cli.addr).expect("publish connection");
    http.set_nodelay(true).ok();
    http.set_read_timeout(Some(Duration::from_secs(10))).ok();
    // Sleeps end when asked, not up to 50 µs later (the default timer slack).
    // SAFETY: prctl with PR_SET_TIMERSLACK changes only this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1) };
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let pad = padding(payload);
    let mut sent = 0u64;
    let mut response = vec![0u8; 4096];
    while Instant::now() < end {
        let elapsed = start.elapsed();
        // Event e is scheduled at e/rate: it is due once that time has come.
        let due = if rate == 0 {
            sent + 100
        } else {
            (elapsed.as_secs_f64() * rate as f64) as u64 + 1
        };
        if due <= sent {
            // Until event `sent` is due (its scheduled time is sent/rate): lateness here would
            // count as the server's latency.
            let next = start + Duration::from_secs_f64(sent as f64 / rate as f64);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            continue;
        }
        let mut body = format!(r#"{{"tenantId":"{TENANT}","events":["#);
        for e in sent..due.min(sent + 2000) {
            // The scheduled send time: when an open-loop client should have sent it.
            let scheduled = if rate == 0 {
                epoch.elapsed()
            } else {
                start.duration_since(epoch) + Duration::from_secs_f64(e as f64 / rate as f64)
            };
            if e > sent {
                body.push(',');
            }
            body.push_str(&event_json(
                e % conversations as u64,
                scheduled.as_nanos(),
                &pad,
            ));
        }
        body.push_str("]}");
        let batch = due.min(sent + 2000) - sent;
        let request = format!(
            "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
            cli.api_key,
            body.len()
        );
        if http.write_all(request.as_bytes()).is_err() {
            break;
        }
        let n = http.read(&mut response).unwrap_or(0);
        if !response[..n].starts_with(b"HTTP/1.1 202") {
            eprintln!(
                "publish refused: {}",
                String::from_utf8_lossy(&response[..n])
            );
            break;
        }
        sent += batch;
    }
    sent
}

/// CPU microseconds this machine spends per frame written to loopback sockets: `frames` frames
/// of `payload` bytes over `sockets` connections (fewer where open files are limited), `batch`
/// frames per send.
fn raw_floor(sockets: usize, frames: u64, payload: usize, batch: usize) -> f64 {
    let (receivers, mut senders) = socket_pairs(sockets);
    let sockets = senders.len();
    let frame = fanfare::ws::text(&vec![b'x'; payload]);
    let chunk: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * batch)
        .collect();
    let per_socket_sends = (frames / sockets as u64 / batch as u64).max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let drainer = read_frames(receivers, Instant::now(), Arc::default(), stop.clone());
    let cpu_before = thread_cpu_s();
    let mut written = 0u64;
    for _ in 0..per_socket_sends {
        for s in senders.iter_mut() {
            if s.write_all(&chunk).is_ok() {
                written += batch as u64;
            }
        }
    }
    let cpu = thread_cpu_s() - cpu_before;
    stop.store(true, Ordering::Relaxed);
    drop(senders);
    let _ = drainer.join();
    cpu * 1e6 / written.max(1) as f64
}

/// Up to `n` connected loopback socket pairs (fewer where open files are limited: two
/// descriptors each), as (receiving ends, sending ends).
fn socket_pairs(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("floor listener");
    let addr = listener.local_addr().expect("addr");
    let n = n.min(15_000).min(open_files_limit().saturating_sub(64) / 2);
    let mut receivers = Vec::with_capacity(n);
    let mut senders = Vec::with_capacity(n);
    for i in 0..n {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.bind(&SocketAddr::V4(SocketAddrV4::new(source_ip(i), 0)).into())
            .expect("bind");
        s.connect(&addr.into()).expect("connect");
        receivers.push(TcpStream::from(s));
        let (accepted, _) = listener.accept().expect("accept");
        accepted.set_nodelay(true).ok();
        senders.push(accepted);
    }
    (receivers, senders)
}

/// Runs the readers that `start` spawns, sharing one tally, on a thread and executor of their
/// own; their latencies once all have ended.
fn reading_thread<F, Fut>(received: Arc<AtomicU64>, start: F) -> JoinHandle<Histogram<u64>>
where
    F: FnOnce(Rc<Tally>) -> Fut + Send + 'static,
    Fut: Future<Output = Vec<glommio::Task<()>>>,
{
    std::thread::spawn(move || {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor");
        ex.run(async move {
            let tally = Rc::new(Tally {
                received,
                latency: RefCell::new(Histogram::new(3).expect("histogram")),
            });
            for t in start(tally.clone()).await {
                t.await;
            }
            let latency = tally.latency.borrow().clone();
            latency
        })
    })
}

/// Reads the frames arriving on `sockets` (connected loopback sockets) as the fan-out run's
/// clients do, until `stop`, counting them in `received`.
fn read_frames(
    sockets: Vec<TcpStream>,
    epoch: Instant,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Histogram<u64>> {
    reading_thread(received, move |tally| async move {
        sockets
            .into_iter()
            .map(|r| {
                r.set_nonblocking(true).expect("nonblocking");
                // SAFETY: we own the fd and give it up here.
                let s = unsafe { glommio::net::TcpStream::from_raw_fd(r.into_raw_fd()) };
                glommio::spawn_local(drain(s, Transport::Ws, epoch, tally.clone(), stop.clone()))
            })
            .collect()
    })
}

/// Waits until `received` reaches `expected`, or has not grown for 500 ms (at most 30 s: at
/// saturation the queues can hold seconds of events).
fn settle(received: &AtomicU64, expected: u64) {
    let start = Instant::now();
    let (mut seen, mut grew) = (received.load(Ordering::Relaxed), Instant::now());
    while seen < expected
        && grew.elapsed() < Duration::from_millis(500)
        && start.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(10));
        let now = received.load(Ordering::Relaxed);
        if now != seen {
            (seen, grew) = (now, Instant::now());
        }
    }
}

/// Publish→deliver latency on this machine without a server, for the fan-out run's rooms
/// and rate: a thread that wakes at each event's scheduled time hands it to one relay
/// thread per core, each of which wakes, frames it once and writes it to its share of the
/// room's sockets, read by one executor as in the fan-out run. The server's own part of
/// its latency is what it adds to this.
fn latency_floor(connections: usize, per_room: usize, publishing: &Publishing) -> Histogram<u64> {
    let Publishing {
        rate,
        seconds,
        payload,
        ..
    } = *publishing;
    let epoch = Instant::now();
    let (receivers, senders) = socket_pairs(connections);
    let sockets = senders.len();
    let rooms = (sockets / per_room.max(1)).max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let reading = read_frames(receivers, epoch, received.clone(), stop.clone());
    // Socket i is in room i % rooms, written by relay i % cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut shares: Vec<Vec<Vec<TcpStream>>> = (0..cores)
        .map(|_| (0..rooms).map(|_| Vec::new()).collect())
        .collect();
    for (i, s) in senders.into_iter().enumerate() {
        shares[i % cores][i % rooms].push(s);
    }
    let pad = padding(payload);
    let relays: Vec<_> = shares
        .into_iter()
        .map(|mut share| {
            let (events, arrivals) = std::sync::mpsc::channel::<(u64, u128)>();
            let pad = pad.clone();
            let relay = std::thread::spawn(move || {
                for (room, t) in arrivals {
                    let frame = fanfare::ws::text(event_json(room, t, &pad).as_bytes());
                    for s in share[room as usize].iter_mut() {
                        let _ = s.write_all(&frame);
                    }
                }
            });
            (events, relay)
        })
        .collect();
    // As the publisher does: each event at its scheduled time, which its latency counts from.
    // SAFETY: prctl with PR_SET_TIMERSLACK changes only this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1) };
    let start = Instant::now();
    let events = rate * seconds.min(5);
    for e in 0..events {
        let due = start + Duration::from_secs_f64(e as f64 / rate as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let t = due.duration_since(epoch).as_nanos();
        for (events, _) in &relays {
            let _ = events.send((e % rooms as u64, t));
        }
    }
    for (events, relay) in relays {
        drop(events);
        let _ = relay.join();
    }
    let expected = (0..events)
        .map(|e| subscribers(sockets, rooms, (e % rooms as u64) as usize))
        .sum();
    settle(&received, expected);
    stop.store(true, Ordering::Relaxed);
    reading.join().expect("floor receivers")
}

// ---- storm --------------------------------------------------------------------------------

/// How long a storm client stays connected, then away, each round.
#[derive(Clone, Copy)]
struct Rounds {
    stay: Duration,
    away: Duration,
}

/// What one storm client saw.
#[derive(Default)]
struct Recoveries {
    attempted: u64,
    recovered: u64,
    replayed: u64,
    /// Offsets that did not follow the last one seen (lost, repeated or out of order).
    anomalies: u64,
    /// Subscribe sent → ack, microseconds.
    latency_us: Vec<u64>,
}

/// One client's rounds until `done`, then a last recovery up to the end of the stream.
fn storm_client(cli: &Cli, i: usize, token: &str, rounds: Rounds, done: &AtomicBool) -> Recoveries {
    let mut seen = Recoveries::default();
    let mut since: Option<(u64, String)> = None;
    let mut last_round = false;
    loop {
        last_round |= done.load(Ordering::Relaxed);
        let Ok(mut ws) = storm_connect(cli.addr, i, token) else {
            eprintln!("client {i}: connect failed");
            return seen;
        };
        let mut subscribe =
            serde_json::json!({"type": "subscribe", "conversationId": "c0", "id": "s"});
        if let Some((offset, epoch)) = &since {
            subscribe["since"] = serde_json::json!({"offset": offset, "epoch": epoch});
            seen.attempted += 1;
        }
        let sent = Instant::now();
        if ws
            .send(tungstenite::Message::text(subscribe.to_string()))
            .is_err()
        {
            return seen;
        }
        let mut last = since.as_ref().map_or(0, |(o, _)| *o);
        let mut replaying = since.is_some();
        let stay_until = Instant::now() + rounds.stay;
        while Instant::now() < stay_until || replaying {
            let Ok(message) = ws.read() else { break };
            let tungstenite::Message::Text(text) = message else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if v["id"] == "s" {
                if since.is_some() {
                    seen.latency_us.push(sent.elapsed().as_micros() as u64);
                    seen.recovered += u64::from(v["recovered"] == true);
                }
                match v["recovered"] == true {
                    // The ack follows the last event sent before it.
                    true => seen.anomalies += u64::from(v["offset"].as_u64() != Some(last)),
                    false => last = v["offset"].as_u64().unwrap_or(0),
                }
                let epoch = v["epoch"].as_str().unwrap_or_default().to_string();
                since = Some((last, epoch));
                replaying = false;
                if last_round {
                    break;
                }
                continue;
            }
            let Some(offset) = v["offset"].as_u64() else {
                continue;
            };
            if let Some(epoch) = v["epoch"].as_str() {
                since = Some((offset, epoch.to_string()));
            } else if offset != last + 1 {
                seen.anomalies += 1;
            }
            seen.replayed += u64::from(replaying);
            last = offset;
            if let Some(since) = &mut since {
                since.0 = last;
            }
        }
        let _ = ws.close(None);
        if last_round {
            return seen;
        }
        std::thread::sleep(rounds.away);
    }
}

fn storm_connect(
    addr: SocketAddr,
    i: usize,
    token: &str,
) -> Result<tungstenite::WebSocket<TcpStream>, Box<dyn std::error::Error>> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(source_ip(i), 0)).into())?;
    socket.connect(&addr.into())?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (ws, _) = tungstenite::client(format!("ws://{addr}/ws?token={token}"), stream)?;
    Ok(ws)
}

fn storm(cli: &Cli, clients: usize, rate: u64, seconds: u64, rounds: Rounds) {
    let auth = fanfare::config::Auth {
        hs256_secret: cli.secret.clone(),
        ..Default::default()
    };
    let now_s = fanfare::auth::now_ms() / 1000;
    let token = fanfare::auth::mint_hs256(&auth, TENANT, "fan", 3600, now_s).expect("token");
    let reads_before = server_counter(cli.addr, "history_reads_total");
    let before = server_usage(cli.pid);
    let done = AtomicBool::new(false);
    let (published, seen) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..clients)
            .map(|i| {
                let (token, done) = (&token, &done);
                s.spawn(move || storm_client(cli, i, token, rounds, done))
            })
            .collect();
        let published = publish(cli, 1, rate, seconds, 100, Instant::now());
        done.store(true, Ordering::Relaxed);
        let seen: Vec<Recoveries> = clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .collect();
        (published, seen)
    });
    let after = server_usage(cli.pid);
    let reads = server_counter(cli.addr, "history_reads_total")
        .zip(reads_before)
        .map(|(a, b)| a - b);
    let sum = |f: fn(&Recoveries) -> u64| seen.iter().map(f).sum::<u64>();
    let (attempted, recovered) = (sum(|r| r.attempted), sum(|r| r.recovered));
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    for us in seen.iter().flat_map(|r| &r.latency_us) {
        let _ = latency.record((*us).max(1));
    }
    println!("storm: {clients} clients of one conversation, {published} events published");
    println!(
        "recoveries: {attempted}, recovered {recovered}, events replayed {}, lost or repeated {}",
        sum(|r| r.replayed),
        sum(|r| r.anomalies)
    );
    println!(
        "recovery latency (subscribe -> ack): p50 {}us p99 {}us max {}us",
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        latency.max()
    );
    if let Some(reads) = reads {
        println!(
            "redis history reads: {reads} ({:.3} per recovery)",
            reads as f64 / attempted.max(1) as f64
        );
    }
    if let (Some(b), Some(a)) = (before, after) {
        println!(
            "server: {:.2} CPU s, RSS {} KiB",
            a.cpu_s - b.cpu_s,
            a.rss_kib
        );
    }
}

// ---- idle ---------------------------------------------------------------------------------

/// `(tenant_size, conversations)`: the shape of each tenant. The last connection's presence
/// change is measured alone: the frames one change costs.
fn idle(cli: &Cli, connections: usize, shape: (usize, usize), watch: usize) {
    let (tenant_size, conversations) = shape;
    let before = server_usage(cli.pid);
    let presence_before = server_counter(cli.addr, "presence_frames_total");
    let last_change = Arc::new(AtomicU64::new(u64::MAX));
    let auth = fanfare::config::Auth {
        hs256_secret: cli.secret.clone(),
        ..Default::default()
    };
    let now_s = fanfare::auth::now_ms() / 1000;
    let (addr, transport) = (cli.addr, cli.transport);
    let opened = Arc::new(AtomicU64::new(0));
    let release = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let holder = {
        let (opened, release, last_change) = (opened.clone(), release.clone(), last_change.clone());
        std::thread::spawn(move || {
            let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .make()
                .expect("executor");
            ex.run(async move {
                let mut streams = Vec::with_capacity(connections);
                let mut pending = Vec::new();
                for i in 0..connections {
                    let (tenant, member) = (i / tenant_size, i % tenant_size);
                    let (tenant, user) = (format!("idle{tenant}"), format!("u{member}"));
                    let token = fanfare::auth::mint_hs256(&auth, &tenant, &user, 3600, now_s)
                        .expect("token");
                    let conversation = format!("c{}", member % conversations);
                    let watched: Vec<String> = (1..=watch.min(tenant_size - 1))
                        .map(|k| format!("u{}", (member + k) % tenant_size))
                        .collect();
                    let last = i + 1 == connections;
                    if last {
                        // Every earlier change has landed: count the last one's frames alone.
                        glommio::timer::sleep(Duration::from_millis(500)).await;
                        let frames = server_counter(addr, "presence_frames_total");
                        last_change.store(frames.unwrap_or(u64::MAX), Ordering::Relaxed);
                    }
                    pending.push(glommio::spawn_local(async move {
                        let mut stream =
                            open_subscribed(addr, i, &token, &conversation, transport).await?;
                        if !watched.is_empty() {
                            let event =
                                serde_json::json!({"type": "presence.watch", "userIds": watched});
                            stream
                                .write_all(&masked_text(event.to_string().as_bytes()))
                                .await?;
                        }
                        Ok::<_, std::io::Error>(stream)
                    }));
                    // Up to 256 handshakes in flight; the last one alone.
                    if pending.len() == 256 || i + 2 >= connections {
                        for p in pending.drain(..) {
                            match p.await {
                                Ok(s) => {
                                    streams.push(s);
                                    opened.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => eprintln!("connection: {e}"),
                            }
                        }
                    }
                }
                while !release.load(Ordering::Relaxed) {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
                drop(streams);
            });
        })
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    // Readings of the server's RSS as connections open: the least-squares slope over those past
    // the first tenth is the marginal cost of a connection, free of the start-up memory the
    // first connections touch and steadier than the difference of two readings.
    let mut samples: Vec<(f64, f64)> = Vec::new();
    while opened.load(Ordering::Relaxed) < connections as u64
        && Instant::now() < deadline
        && !holder.is_finished()
    {
        let n = opened.load(Ordering::Relaxed);
        if n >= connections as u64 / 10 {
            if let Some(u) = server_usage(cli.pid) {
                samples.push((n as f64, u.rss_kib as f64 * 1024.0));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let open_s = started.elapsed().as_secs_f64();
    let n = opened.load(Ordering::Relaxed);
    // Give the server a moment to settle its allocator before reading RSS.
    std::thread::sleep(Duration::from_millis(500));
    let after = server_usage(cli.pid);
    // At rest with every client subscribed: what the server's own timers cost over 15 s. With
    // the default heartbeat that is less than an interval: the clients' first pings (30 s after
    // they connected) fall after it; a shorter `heartbeat.interval_ms` puts them in it.
    let rest = Duration::from_secs(15);
    let reaping = time_wait_sockets().filter(|&n| n > 1000);
    let rest_before = server_threads(cli.pid);
    std::thread::sleep(rest);
    let rest_after = server_threads(cli.pid);
    let presence_after = server_counter(cli.addr, "presence_frames_total");
    release.store(true, Ordering::Relaxed);
    let _ = holder.join();
    println!(
        "idle: {n}/{connections} subscribed {} ({tenant_size} per tenant, over \
         {} conversations each) in {open_s:.2}s ({:.0} accepted/s)",
        transport.clients(),
        conversations.min(tenant_size),
        n as f64 / open_s
    );
    if let (Some(b), Some(a)) = (presence_before, presence_after) {
        let last = last_change.load(Ordering::Relaxed);
        println!(
            "presence frames: {} while connecting, {} for the last connection's change alone",
            a - b,
            a.saturating_sub(last)
        );
    }
    if let (Some(b), Some(a)) = (before, after) {
        println!("server CPU: {:.2} s while connecting", a.cpu_s - b.cpu_s);
        if let (Some((cpu0, wakes0)), Some((cpu1, wakes1))) = (rest_before, rest_after) {
            let secs = rest.as_secs_f64();
            println!(
                "server at rest: {:.2} ms of CPU and {:.1} wake-ups a second (over {secs:.0} s)",
                (cpu1 - cpu0) as f64 / 1e6 / secs,
                (wakes1 - wakes0) as f64 / secs
            );
            if let Some(n) = reaping {
                println!(
                    "  (not at rest: the kernel was reaping {n} TIME_WAIT sockets of earlier runs, \
                     counted in whatever thread it interrupts; wait net.ipv4.tcp_fin_timeout \
                     between runs)"
                );
            }
        }
        println!(
            "server RSS: {} KiB -> {} KiB, {:.0} bytes per idle subscribed client",
            b.rss_kib,
            a.rss_kib,
            a.rss_kib.saturating_sub(b.rss_kib) as f64 * 1024.0 / n.max(1) as f64
        );
        samples.push((n as f64, a.rss_kib as f64 * 1024.0));
        if let Some(slope) = slope(&samples) {
            println!(
                "marginal: {slope:.0} bytes per client (slope over {} readings from {:.0} \
                 to {n} clients)",
                samples.len(),
                samples[0].0
            );
        }
    }
}

/// The least-squares slope of `y` over `x`, when the `x` are not all equal.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), p| (x + p.0 / n, y + p.1 / n));
    let (sxy, sxx) = points.iter().fold((0.0, 0.0), |(xy, xx), p| {
        (xy + (p.0 - mx) * (p.1 - my), xx + (p.0 - mx) * (p.0 - mx))
    });
    (sxx > 0.0).then(|| sxy / sxx)
}

/// This process's soft limit on open files.
fn open_files_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes to `lim` only.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_server_frames_and_latency_fields() {
        let f = fanfare::ws::text(br#"{"type":"conversation.updated","t":12345,"pad":"x"}"#);
        let (payload, used) = server_frame(&f).unwrap();
        assert_eq!(used, f.len());
        assert_eq!(field_t(payload), Some(12345));
        assert!(server_frame(&f[..f.len() - 1]).is_none());
    }

    #[test]
    fn slope_of_a_line_and_of_nothing() {
        let line: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 * x as f64 + 7.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(5.0, 1.0), (5.0, 2.0)]), None);
    }

    #[test]
    fn spreads_subscribers_like_the_connections() {
        let total: u64 = (0..7).map(|k| subscribers(100, 7, k)).sum();
        assert_eq!(total, 100);
    }
}
