//! Start-up, accept and HTTP dispatch: one pinned glommio executor per core, each with its own
//! `SO_REUSEPORT` listener, its [`Shard`], and its end of the mesh.
//!
//! Invariants: listeners are bound before any executor starts (so a bad address fails start-up
//! and port 0 resolves to one port shared by every core); every request head is bounded in size
//! and time; a connection attempt is rate-limited before any JWT work; the executors return when
//! [`Stop`] is raised and every connection has closed with `1001` (or the timeout passed).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{CpuSet, Latency, LocalExecutorPoolBuilder, PoolPlacement, Shares};
use tracing::{info, warn};

use crate::auth::{self, Verifier};
use crate::broker::{Broker, Target};
use crate::config::BrokerKind;
use crate::config::Config;
use crate::deadline::within;
use crate::history::{Epoch, Position};
use crate::http::{self, Request, Response};
use crate::mesh::{Mesh, Message, Verdict, Wiring};
use crate::metrics::{self, Registry};
use crate::protocol::CloseCode;
use crate::session::{self, Served};
use crate::shard::Shard;
use crate::watchdog::{self, Watchdog};
use crate::{conn, demo, publish};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("auth key: {0}")]
    Key(#[from] auth::KeyError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("executor: {0}")]
    Executor(String),
    #[error("core start-up: {0}")]
    Core(#[from] CoreError),
}

/// Why a core could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("no listener left for this core")]
    NoListener,
    #[error("no mesh ends left for this core")]
    NoMesh,
    #[error("{0}")]
    Broker(String),
    #[error("mesh receive task: {0}")]
    Task(String),
    #[error("the stop signal's socket: {0}")]
    Stop(std::io::Error),
}

/// What stops the server: a socket that becomes readable once it should. Every core waits on
/// it in the kernel, so stopping is immediate and costs nothing until then (no core wakes up
/// to look at a flag).
pub struct Stop(UnixStream);

impl Stop {
    /// Raised by the first of `signals` (e.g. `SIGTERM`, `SIGINT`).
    pub fn on_signals(signals: &[i32]) -> std::io::Result<Stop> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        for &signal in signals {
            // The handler writes one byte into `write`; nothing ever reads it (cores peek).
            signal_hook::low_level::pipe::register(signal, write.try_clone()?)?;
        }
        Ok(Stop(read))
    }
}

/// Runs the server until `stop` is raised. `on_bound` is told the bound address once every
/// listener is ready (the port is the real one when the configured port is 0).
pub fn run(config: Config, stop: Stop, on_bound: impl FnOnce(SocketAddr)) -> Result<(), Error> {
    let verifier = Arc::new(Verifier::new(&config.auth)?);
    raise_fd_limit();
    let cpus = allowed_cpus();
    let allowed = cpus.as_ref().map_or(1, |c| c.len()).max(1);
    let shards = match config.server.shards {
        0 => allowed.min(64),
        n => n,
    };
    let (addr, listeners) = bind(&config, shards)?;
    if config.uses_dev_secrets() {
        warn!("using the built-in development HS256 secret or publish API key: set auth.hs256_secret and publish.api_keys");
    }
    let registry = metrics::registry(shards);
    let config = Arc::new(config);
    let wiring = Arc::new(Wiring::new(shards, config.server.mesh_queue_len));
    let watchdog = Watchdog::new(shards);
    let watching = watchdog
        .spawn()
        .map_err(|e| Error::Executor(format!("watchdog thread: {e}")))?;
    let instance: Arc<str> = instance_id().into();
    let listeners = Arc::new(Mutex::new(listeners));
    info!(%addr, shards, %instance, broker = ?config.broker.kind, "listening");
    if demo::enabled(&config) {
        info!("development demo page at http://{addr}/demo");
    }
    on_bound(addr);
    let start = Start {
        config: config.clone(),
        verifier,
        registry,
        wiring,
        watchdog: watchdog.clone(),
        stop: Arc::new(stop),
        instance,
    };

    let pool = LocalExecutorPoolBuilder::new(PoolPlacement::MaxSpread(shards, cpus))
        .name("fanfare")
        .io_memory(config.server.io_memory_bytes)
        .ring_depth(config.server.io_ring_depth)
        // No shorter than housekeeping's period: the latency ring's one timer then stays the
        // next user timer from turn to turn instead of being swapped for the preemption
        // timer on every wake-up and back before every sleep (vendor/glommio/PATCHES.md).
        .preempt_timer(watchdog::TICK)
        .on_all_shards(move || {
            let start = start.clone();
            // One listener per executor; each takes one at start-up, so none is left over.
            let listener = listeners.lock().ok().and_then(|mut l| l.pop());
            async move {
                let Some(listener) = listener else {
                    return Err(CoreError::NoListener);
                };
                run_shard(start, listener).await
            }
        })
        .map_err(|e| Error::Executor(e.to_string()))?;
    let results = pool.join_all();
    watchdog.stop();
    let _ = watching.join();
    for result in results {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Core(e)),
            Err(e) => {
                return Err(Error::Executor(format!(
                    "an executor panicked or failed: {e}"
                )))
            }
        }
    }
    info!("stopped");
    Ok(())
}

/// Binds one `SO_REUSEPORT` listener per shard on the same address.
fn bind(config: &Config, shards: usize) -> Result<(SocketAddr, Vec<socket2::Socket>), Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut addr = config.listen_addr()?;
    let mut listeners = Vec::with_capacity(shards);
    for _ in 0..shards {
        let listen = || -> std::io::Result<Socket> {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.bind(&addr.into())?;
            s.listen(config.server.listen_backlog as i32)?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        let socket = listen().map_err(|source| Error::Bind { addr, source })?;
        if addr.port() == 0 {
            addr = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| Error::Bind {
                    addr,
                    source: std::io::Error::other("no local address after bind"),
                })?;
        }
        listeners.push(socket);
    }
    Ok((addr, listeners))
}

/// What every executor starts from.
#[derive(Clone)]
struct Start {
    config: Arc<Config>,
    verifier: Arc<Verifier>,
    registry: Registry,
    wiring: Arc<Wiring>,
    watchdog: Arc<Watchdog>,
    stop: Arc<Stop>,
    instance: Arc<str>,
}

async fn run_shard(start: Start, listener: socket2::Socket) -> Result<(), CoreError> {
    let Start {
        config,
        verifier,
        registry,
        wiring,
        watchdog,
        stop,
        instance,
    } = start;
    let ends = wiring.take().ok_or(CoreError::NoMesh)?;
    let core = ends.core();
    let _seated = watchdog.sit(core);
    let (mesh, inbound) = Mesh::connect(ends, config.server.mesh_queue_len).await;
    let broker = match config.broker.kind {
        BrokerKind::Memory => None,
        kind => {
            let b = &config.broker;
            let cluster = kind == BrokerKind::RedisCluster;
            let seeds = match cluster {
                true => b
                    .cluster_seeds()
                    .map_err(|e| CoreError::Broker(e.to_string()))?,
                false => vec![Target::parse(&b.redis_url)
                    .map_err(|e| CoreError::Broker(format!("broker.redis_url: {e}")))?],
            };
            let timeout = Duration::from_millis(b.subscribe_timeout_ms);
            Some(Broker::new(
                seeds,
                cluster,
                &b.channel_prefix,
                &instance,
                core,
                timeout,
            ))
        }
    };
    mesh.start(&registry);
    let shard = Rc::new(Shard::new(
        mesh,
        config.clone(),
        verifier,
        registry,
        broker.clone(),
        instance,
    ));
    if let Some(broker) = broker {
        let (wanted, pushed) = (shard.clone(), shard.clone());
        broker.start(move || wanted.wanted_channels(), move |p| pushed.on_push(p));
    }
    if let Some(cluster) = &shard.cluster {
        glommio::spawn_local(cluster.clone().run()).detach();
    }

    // Cross-core delivery has a queue of its own, so that it takes turns with the writers
    // instead of waiting behind all of them. Not `Latency::Matters`: glommio would arm and
    // cancel a preemption timer around every reactor wait.
    let mesh_queue =
        glommio::executor().create_task_queue(Shares::default(), Latency::NotImportant, "mesh");
    for rx in inbound {
        let shard = shard.clone();
        glommio::spawn_local_into(
            async move {
                while let Some(msg) = rx.recv().await {
                    shard.handle(msg);
                    // A burst of deliveries must not starve this core's writers.
                    glommio::yield_if_needed().await;
                }
            },
            mesh_queue,
        )
        .map_err(|e| CoreError::Task(e.to_string()))?
        .detach();
    }
    glommio::spawn_local(stopping(
        shard.clone(),
        stop.0.try_clone().map_err(CoreError::Stop)?,
    ))
    .detach();
    glommio::spawn_local(housekeeping(shard.clone(), watchdog)).detach();
    if let Some(flush) = shard.flush.clone() {
        glommio::spawn_local(async move { flush.run().await }).detach();
    }

    // SAFETY of from_raw_fd: the fd comes from a socket we own and give up here.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    loop {
        let stopping = async {
            shard.stopping.wait().await;
            None
        };
        match futures_lite::future::or(async { Some(listener.accept().await) }, stopping).await {
            None => break,
            Some(Ok(stream)) => {
                glommio::spawn_local(handle_client(shard.clone(), stream, BytesMut::new(), None))
                    .detach();
            }
            Some(Err(e)) => {
                // Typically out of file descriptors: back off instead of spinning.
                warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    // Everything within `server.shutdown_timeout_ms`: the connections close while core 0
    // takes this instance's users out of the cluster.
    let limit = Duration::from_millis(shard.config.server.shutdown_timeout_ms);
    let leave = async {
        let Some(cluster) = shard.cluster.as_ref().filter(|_| shard.id == 0) else {
            return;
        };
        if within(limit, cluster.leave()).await.is_none() {
            warn!("shutdown timeout: this instance's presence stays in redis until its TTL");
        }
    };
    futures_lite::future::zip(drain(&shard, limit), leave).await;
    Ok(())
}

/// Starts stopping this core once `stop` (this core's copy of [`Stop`]) is raised.
async fn stopping(shard: Rc<Shard>, stop: UnixStream) {
    // SAFETY of from_raw_fd: the fd comes from a socket we own and give up here.
    let stop = unsafe { glommio::net::UnixStream::from_raw_fd(stop.into_raw_fd()) };
    // Data or an error alike: a server that cannot tell must not be left unstoppable.
    if let Err(e) = stop.peek(&mut [0]).await {
        warn!(error = %e, "cannot wait for the stop signal; stopping");
    }
    info!(core = shard.id, "stopping");
    shard.stopping.set(Verdict::Granted);
}

/// Periodic per-core work: the watchdog's tick, heartbeats, token expiry, sessions' lifetimes,
/// and pruning of idle rate buckets. The core's periodic timer: it wakes an idle core a few
/// times a second, and the other long timers (a stream's keepalive, the Redis probe) are
/// rounded onto its grid so that they fall due in its wake-ups. Never awaits anything but its
/// timer: the cluster work that waits on Redis has its own task (`Cluster::run`).
async fn housekeeping(shard: Rc<Shard>, watchdog: Arc<Watchdog>) {
    let prune_every = Duration::from_secs(10);
    let mut last_prune = Instant::now();
    loop {
        // On the grid that long timers (a stream's keepalive) are rounded to: they fall due
        // in the wake-up of this tick.
        let tick = shard.sweep.tick();
        glommio::timer::sleep(crate::deadline::on_grid(tick / 2, tick)).await;
        let stats = shard.stats();
        if watchdog.tick(shard.id) {
            warn!(
                core = shard.id,
                "this core slept through a wake-up; the watchdog woke it"
            );
            stats.core_stalls_total.inc();
        }
        shard.sweep.run(stats);
        shard.sessions.sweep(&shard);
        if last_prune.elapsed() >= prune_every {
            last_prune = Instant::now();
            shard.prune_buckets();
            shard.prune_typing();
            shard.prune_history();
        }
    }
}

/// Closes every connection with 1001 and waits for them, at most `limit`.
async fn drain(shard: &Shard, limit: Duration) {
    shard.conns.for_each(|c| c.close(CloseCode::GoingAway));
    let deadline = Instant::now() + limit;
    while !shard.conns.is_empty() && Instant::now() < deadline {
        // Fine: a deploy waits on this, and it runs only while stopping.
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if !shard.conns.is_empty() {
        warn!(
            core = shard.id,
            left = shard.conns.len(),
            "shutdown timeout: dropping connections"
        );
    }
}

/// Why reading a request stopped.
enum HeadEnd {
    Request(Request),
    /// Closed, timed out or stopping before a request began: nothing to answer.
    Gone,
    Bad(u16, String),
}

/// Serves HTTP requests on one connection until it closes, becomes a WebSocket or an SSE
/// stream, or is handed to another core. `first` is a request already read (handed over).
///
/// Each endpoint's future is boxed: a keep-alive connection waits in `read_head` most of its
/// life, and its task should not carry the largest state an endpoint passes through (5.9 KB
/// inline, 1.4 KB boxed).
async fn handle_client(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    mut buf: BytesMut,
    mut first: Option<Request>,
) {
    let Ok(peer) = stream.peer_addr() else { return };
    let _ = stream.set_nodelay(true);
    loop {
        if buf.is_empty() {
            // Nothing of a next request yet: an idle keep-alive connection holds no buffer.
            buf = BytesMut::new();
        }
        let req = match first.take() {
            Some(req) => req,
            None => match read_head(&shard, &mut stream, &mut buf).await {
                HeadEnd::Request(req) => {
                    let _ = buf.split_to(req.head_len);
                    req
                }
                HeadEnd::Gone => return,
                HeadEnd::Bad(status, reason) => {
                    shard.stats().rejected_bad_request_total.inc();
                    info!(%peer, status, %reason, "bad request");
                    let answer = Response::error(status, "bad_request", &reason);
                    let _ = stream.write_all(&answer.to_bytes(false)).await;
                    return;
                }
            },
        };
        // Only the publish API and posted session events read a body; after any other
        // request with one, the connection cannot tell where the next request starts.
        let has_body = !matches!(req.content_length(), Ok(0));
        let reads_body =
            req.path == "/v1/publish" || session::posts_events(&req) || demo::posts(&req);
        let keep_alive = req.keep_alive() && (!has_body || reads_body);
        let echo = &shard.config.server.echo_path;
        let response = match (req.method.as_str(), req.path.as_str()) {
            ("GET", path) if !echo.is_empty() && path == echo => {
                let accepted = websocket_key(&req).map(|key| ((), key));
                if answer_upgrade(&mut stream, &req, peer, accepted)
                    .await
                    .is_some()
                {
                    glommio::spawn_local(conn::serve_echo(shard, stream, buf)).detach();
                }
                return;
            }
            ("GET", "/ws") => {
                if let Some(identity) = Box::pin(upgrade(&shard, &mut stream, &req, peer)).await {
                    // Its own task: the connection's future carries none of the HTTP state.
                    glommio::spawn_local(conn::serve(shard, stream, buf, identity, peer)).detach();
                }
                return;
            }
            (_, path) if session::is_session_path(path) => {
                match Box::pin(session::serve(&shard, &mut stream, &mut buf, &req, peer)).await {
                    Served::Answer(response) => response,
                    Served::Closed => return,
                    Served::Stream(sse) => {
                        glommio::spawn_local(sse.serve(shard, stream)).detach();
                        return;
                    }
                    Served::Elsewhere(core) => return hand_over(&shard, core, stream, req, buf),
                }
            }
            (_, path) if demo::is_demo_path(path) && demo::enabled(&shard.config) => {
                match Box::pin(demo::serve(&shard, &mut stream, &mut buf, &req)).await {
                    Some(response) => response,
                    None => return,
                }
            }
            ("GET", path) if path.starts_with("/v1/presence/") => {
                presence_request(&shard, &req, peer.ip())
            }
            ("GET", path) if path.starts_with("/v1/history/") => {
                Box::pin(history_request(&shard, &req, peer.ip())).await
            }
            ("POST", "/v1/publish") => {
                match Box::pin(publish_request(
                    &shard,
                    &mut stream,
                    &mut buf,
                    &req,
                    peer.ip(),
                ))
                .await
                {
                    Some(response) => response,
                    None => return,
                }
            }
            ("GET", "/healthz") => Response::json(200, r#"{"status":"ok"}"#.into()),
            ("GET", "/readyz") => readiness(&shard),
            ("GET", "/metrics") => Response {
                content_type: "text/plain; version=0.0.4",
                ..Response::json(200, metrics::render(&shard.registry))
            },
            (_, "/ws" | "/v1/publish" | "/healthz" | "/readyz" | "/metrics") => {
                Response::error(405, "method_not_allowed", &req.method)
            }
            (_, path) if path.starts_with("/v1/presence/") || path.starts_with("/v1/history/") => {
                Response::error(405, "method_not_allowed", &req.method)
            }
            _ => Response::error(404, "not_found", &req.path),
        };
        if response.status >= 400 {
            let (status, body) = (response.status, &response.body);
            info!(%peer, method = %req.method, target = %req.redacted_target(), status, %body, "request refused");
        }
        let keep_alive = keep_alive && shard.stopping.get().is_none();
        if stream
            .write_all(&response.to_bytes(keep_alive))
            .await
            .is_err()
            || !keep_alive
        {
            return;
        }
    }
}

/// A request handed to the core that serves it, with its connection and the bytes read after
/// its head.
pub struct HandedOver {
    fd: OwnedFd,
    req: Request,
    buf: BytesMut,
}

/// Sends `stream` and `req` to `core`, which goes on serving the connection.
fn hand_over(shard: &Rc<Shard>, core: usize, stream: TcpStream, req: Request, buf: BytesMut) {
    // glommio's stream does not give its descriptor up: a duplicate travels, this core's
    // closes (the socket lives on in the duplicate).
    // SAFETY: dup of a descriptor this stream owns; the result is owned below or not at all.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if fd < 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot hand a request over to its session's core");
        return;
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    drop(stream);
    shard.stats().session_handovers_total.inc();
    shard.route(
        core,
        Message::Handover(Box::new(HandedOver { fd, req, buf })),
    );
}

/// Serves a connection handed over by another core, from the request it carried.
pub async fn serve_handed_over(shard: Rc<Shard>, handed: HandedOver) {
    // SAFETY: the descriptor is the hand-over's own, given up here.
    let stream = unsafe { TcpStream::from_raw_fd(handed.fd.into_raw_fd()) };
    handle_client(shard, stream, handed.buf, Some(handed.req)).await
}

/// Reads one request head into `buf`, bounded by `server.max_request_head_bytes` and
/// `server.request_timeout_ms`.
async fn read_head(shard: &Shard, stream: &mut TcpStream, buf: &mut BytesMut) -> HeadEnd {
    let server = &shard.config.server;
    let stopping = async {
        shard.stopping.wait().await;
        None
    };
    let read = async {
        loop {
            match http::parse_head(buf, server.max_request_head_bytes) {
                Ok(Some(req)) => return Some(HeadEnd::Request(req)),
                Ok(None) => {}
                Err(e @ (http::HeadError::TooLarge(_) | http::HeadError::TooManyHeaders(_))) => {
                    return Some(HeadEnd::Bad(431, e.to_string()))
                }
                Err(e) => return Some(HeadEnd::Bad(400, e.to_string())),
            }
            // Read straight into the request buffer: no scratch array in this future.
            let filled = buf.len();
            buf.resize(filled + 1024, 0);
            match stream.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => return Some(HeadEnd::Gone),
                Ok(n) => buf.truncate(filled + n),
            }
        }
    };
    let limit = Duration::from_millis(server.request_timeout_ms);
    match within(limit, futures_lite::future::or(read, stopping))
        .await
        .flatten()
    {
        Some(end) => end,
        // A request that had begun gets a 408; an idle keep-alive connection just closes.
        None if !buf.is_empty() => HeadEnd::Bad(408, "request head not received in time".into()),
        None => HeadEnd::Gone,
    }
}

/// Checks a `/ws` request and answers it: `101` and the identity, or an error response.
async fn upgrade(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    req: &Request,
    peer: SocketAddr,
) -> Option<auth::Identity> {
    let answer = check_upgrade(shard, req, peer.ip()).await;
    answer_upgrade(stream, req, peer, answer).await
}

/// Writes the `101` that completes an upgrade checked as `answer` (with the client's key), or
/// the refusal; what the accepted upgrade carries when it is accepted and written.
async fn answer_upgrade<T>(
    stream: &mut TcpStream,
    req: &Request,
    peer: SocketAddr,
    answer: Result<(T, String), Response>,
) -> Option<T> {
    let bytes = match &answer {
        Ok((_, key)) => format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            tungstenite::handshake::derive_accept_key(key.as_bytes())
        )
        .into_bytes(),
        Err(refusal) => refusal.to_bytes(false),
    };
    let written = stream.write_all(&bytes).await;
    match answer {
        Ok((accepted, _)) if written.is_ok() => Some(accepted),
        Ok(_) => None,
        Err(refusal) => {
            let (status, body) = (refusal.status, &refusal.body);
            info!(%peer, target = %req.redacted_target(), status, %body, "connection refused");
            None
        }
    }
}

async fn check_upgrade(
    shard: &Rc<Shard>,
    req: &Request,
    ip: IpAddr,
) -> Result<(auth::Identity, String), Response> {
    let stats = shard.stats();
    let key = websocket_key(req)?;
    admit(shard, ip).await?;
    let origins = &shard.config.server.allowed_origins;
    if let Some(origin) = req.header("origin") {
        if !origins.is_empty() && !origins.iter().any(|o| o == origin) {
            stats.rejected_origin_total.inc();
            return Err(Response::error(
                403,
                "forbidden",
                &format!("origin {origin} is not allowed"),
            ));
        }
    }
    Ok((identity(shard, req)?, key))
}

/// The client's `Sec-WebSocket-Key` of a well-formed upgrade request, or the refusal.
fn websocket_key(req: &Request) -> Result<String, Response> {
    if !req.is_websocket_upgrade() {
        return Err(Response::error(
            426,
            "upgrade_required",
            "this endpoint speaks WebSocket",
        ));
    }
    if req.header("sec-websocket-version") != Some("13") {
        return Err(Response::error(
            426,
            "upgrade_required",
            "Sec-WebSocket-Version 13 is required",
        )
        .with_header("Sec-WebSocket-Version", "13"));
    }
    match req.header("sec-websocket-key").filter(|k| !k.is_empty()) {
        Some(key) => Ok(key.to_string()),
        None => Err(Response::error(
            400,
            "bad_request",
            "Sec-WebSocket-Key is missing",
        )),
    }
}

/// The identity in a client request's token (`?token=` or `Authorization: Bearer`), or the
/// `401` that refuses it.
pub(crate) fn identity(shard: &Shard, req: &Request) -> Result<auth::Identity, Response> {
    verify(shard, &token(req))
}

/// A client request's token: `?token=`, else `Authorization: Bearer`, else empty.
pub(crate) fn token(req: &Request) -> String {
    req.query_param("token")
        .or_else(|| req.bearer().map(str::to_string))
        .unwrap_or_default()
}

/// The identity in `token`, or the `401` that refuses it.
pub(crate) fn verify(shard: &Shard, token: &str) -> Result<auth::Identity, Response> {
    shard.verifier.verify(token, auth::now_ms()).map_err(|e| {
        shard.stats().rejected_unauthorized_total.inc();
        Response::error(401, "unauthorized", &e.to_string())
    })
}

/// A connection attempt (a `/ws` upgrade or a new session) from `ip`, or the `429` (or `503`)
/// that refuses it: checked before any token work.
pub(crate) async fn admit(shard: &Rc<Shard>, ip: IpAddr) -> Result<(), Response> {
    if shard.stopping.get().is_some() {
        return Err(Response::error(503, "unavailable", "server shutting down")
            .with_header("Retry-After", "1"));
    }
    match shard.admit(ip).await {
        Verdict::Granted => Ok(()),
        Verdict::RetryAfterMs(ms) => Err(rate_limited(
            shard,
            ms,
            "too many connection attempts from this address",
        )),
        Verdict::Unavailable => {
            Err(
                Response::error(503, "unavailable", "server overloaded; retry")
                    .with_header("Retry-After", "1"),
            )
        }
    }
}

/// `/readyz`: accepting, and (with Redis) every core's broker connections up.
fn readiness(shard: &Shard) -> Response {
    let status = if shard.stopping.get().is_some() {
        "stopping"
    } else if shard.broker.is_some() && shard.registry.iter().any(|core| core.broker_up.get() == 0)
    {
        "broker unavailable"
    } else {
        return Response::json(200, r#"{"status":"ready"}"#.into());
    };
    Response::json(503, serde_json::json!({ "status": status }).to_string())
}

/// A random-enough id for this instance: time, pid and address-space noise.
fn instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let noise = &nanos as *const u64 as u64;
    format!(
        "{:x}",
        xxhash_rust::xxh3::xxh3_64(
            &[
                nanos.to_le_bytes(),
                (std::process::id() as u64).to_le_bytes(),
                noise.to_le_bytes()
            ]
            .concat()
        )
    )
}

/// A counted `429` whose `Retry-After` is `ms` rounded up to whole seconds.
fn rate_limited(shard: &Shard, ms: u64, reason: &str) -> Response {
    shard.stats().rejected_rate_limited_total.inc();
    Response::error(429, "rate_limited", reason)
        .with_header("Retry-After", ms.div_ceil(1000).max(1).to_string())
}

/// Checks the request's API key (`Authorization: Bearer`): `401` for a bad one, `429` while
/// the client's IP is over its limit of bad keys.
fn check_api_key(shard: &Shard, req: &Request, ip: IpAddr) -> Result<(), Response> {
    let keys = &shard.config.publish.api_keys;
    let valid = req.bearer().is_some_and(|k| {
        keys.iter()
            .any(|key| constant_time_eq(key.as_bytes(), k.as_bytes()))
    });
    match shard.api_key_attempt(ip, valid) {
        Err(ms) => Err(rate_limited(
            shard,
            ms,
            "too many requests with a bad API key from this address",
        )),
        Ok(()) if !valid => Err(Response::error(
            401,
            "unauthorized",
            "missing or unknown API key",
        )),
        Ok(()) => Ok(()),
    }
}

/// `GET /v1/presence/<tenantId>`: the tenant's online users.
fn presence_request(shard: &Shard, req: &Request, ip: IpAddr) -> Response {
    if let Err(refused) = check_api_key(shard, req, ip) {
        return refused;
    }
    let tenant = req.path.trim_start_matches("/v1/presence/");
    if !crate::protocol::is_tenant_id(tenant) {
        return Response::error(
            400,
            "bad_request",
            "tenantId does not match [A-Za-z0-9._-]{1,64}",
        );
    }
    let users = shard.users.online_users(tenant);
    let users: Vec<&str> = users.iter().map(|u| &**u).collect();
    Response::json(200, serde_json::json!({ "userIds": users }).to_string())
}

/// `GET /v1/history/<tenantId>/<conversationId>?since=N&epoch=E`: the conversation's events
/// after offset N of epoch E, or `409` with the current position when they are not all kept.
async fn history_request(shard: &Rc<Shard>, req: &Request, ip: IpAddr) -> Response {
    if let Err(refused) = check_api_key(shard, req, ip) {
        return refused;
    }
    if !shard.history_enabled() {
        return Response::error(404, "not_found", "history is off (history.size = 0)");
    }
    let target = req.path.trim_start_matches("/v1/history/");
    let Some((tenant, conversation)) = target
        .split_once('/')
        .filter(|(t, c)| crate::protocol::is_tenant_id(t) && crate::protocol::is_entity_id(c))
    else {
        let reason = "the path is /v1/history/<tenantId>/<conversationId>";
        return Response::error(400, "bad_request", reason);
    };
    let since = req.query_param("since").and_then(|n| n.parse::<u64>().ok());
    let (Some(offset), Some(epoch)) = (since, req.query_param("epoch")) else {
        let reason = "since (a non-negative integer) and epoch are required";
        return Response::error(400, "bad_request", reason);
    };
    let since = Position {
        epoch: Epoch::parse(&epoch).unwrap_or(0),
        offset,
    };
    let room = crate::route::room_key(tenant, conversation);
    let Some(read) = shard.read_history(room, since).await else {
        let reason = "the conversation's core did not answer in time";
        return Response::error(503, "unavailable", reason).with_header("Retry-After", "1");
    };
    let (epoch, latest) = (Epoch(read.at.epoch), read.at.offset);
    match read.events {
        Ok(frames) => {
            let mut body = format!("{{\"epoch\":\"{epoch}\",\"offset\":{latest},\"events\":[");
            for (i, frame) in frames.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                // The server's own frames of published events: valid UTF-8 JSON.
                body.push_str(&String::from_utf8_lossy(crate::ws::payload_of(frame)));
            }
            body.push_str("]}");
            Response::json(200, body)
        }
        Err(_) => Response::json(
            409,
            format!("{{\"epoch\":\"{epoch}\",\"offset\":{latest}}}"),
        ),
    }
}

/// `POST /v1/publish`. `None` when the connection must close without (another) answer.
async fn publish_request(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    req: &Request,
    ip: IpAddr,
) -> Option<Response> {
    let refused = check_api_key(shard, req, ip).err();
    let body = match body(shard, stream, buf, req, refused, &[]).await {
        Ok(body) => body,
        Err(answer) => return answer,
    };
    if shard.stopping.get().is_some() {
        return Some(
            Response::error(503, "unavailable", "server shutting down")
                .with_header("Retry-After", "1"),
        );
    }
    match publish::parse(&body) {
        Ok(events) => {
            let accepted = events.len();
            let offsets = match shard.publish(events).await {
                Ok(offsets) => offsets,
                Err(e) => {
                    // With Redis nothing was published (one transaction): the backend retries.
                    warn!(error = %e, "publish refused: broker unavailable");
                    return Some(
                        Response::error(503, "unavailable", &e.to_string())
                            .with_header("Retry-After", "1"),
                    );
                }
            };
            shard.stats().events_published_total.add(accepted as u64);
            let body = match offsets.is_empty() {
                true => format!("{{\"accepted\":{accepted}}}"),
                false => {
                    serde_json::json!({ "accepted": accepted, "offsets": offsets }).to_string()
                }
            };
            Some(Response::json(202, body))
        }
        Err(reason) => Some(Response::error(400, "bad_request", &reason.to_string())),
    }
}

/// The body of a request that may carry at most `limits.max_publish_bytes`. `refused` (or
/// `413` for a longer `Content-Length`) is answered before any body byte is read: a refused
/// client costs the server no body, and one too large is never buffered; what it still sends
/// is swallowed (within the request timeout) so that it reads the answer instead of a reset.
/// Every answer it writes carries `headers`. `Err(None)`: the connection closes without
/// (another) answer.
pub(crate) async fn body(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    req: &Request,
    refused: Option<Response>,
    headers: &[(&'static str, String)],
) -> Result<BytesMut, Option<Response>> {
    let length = match req.content_length() {
        Ok(n) => n,
        Err(e) => return Err(Some(Response::error(400, "bad_request", &e.to_string()))),
    };
    let limit = shard.config.limits.max_publish_bytes;
    let refused = refused.or_else(|| (length > limit).then(|| Response::too_large(limit)));
    if let Some(answer) = refused {
        let answer = answer.with_headers(headers);
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".into(), |p| p.to_string());
        info!(%peer, target = %req.redacted_target(), status = answer.status, length, body = %answer.body, "request refused");
        let _ = stream.write_all(&answer.to_bytes(false)).await;
        read_body(shard, stream, buf, length, false).await;
        return Err(None);
    }
    if !read_body(shard, stream, buf, length, true).await {
        return Err(None);
    }
    Ok(buf.split_to(length))
}

/// Reads until `length` body bytes have arrived after the head, within
/// `server.request_timeout_ms`; with `keep` false they are discarded as they come.
async fn read_body(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    length: usize,
    keep: bool,
) -> bool {
    let read = async {
        let mut chunk = vec![0u8; 16 * 1024];
        let mut have = buf.len();
        if !keep {
            buf.clear();
        }
        while have < length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    if keep {
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    have += n;
                }
            }
        }
        true
    };
    let limit = Duration::from_millis(shard.config.server.request_timeout_ms);
    within(limit, read).await.unwrap_or(false)
}

/// The online CPUs this process may run on: those of its affinity (`taskset`, a container's
/// cpuset), so that executors are counted and pinned only where the process was allowed (glommio
/// alone would pin them to every online CPU, outside the affinity too). All online CPUs when
/// the affinity cannot be read or names none of them.
fn allowed_cpus() -> Option<CpuSet> {
    let online = CpuSet::online().ok()?;
    // SAFETY: plain libc calls on a local, zeroed `cpu_set_t` of the size passed.
    unsafe {
        let mut mask: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&mask), &mut mask) != 0 {
            return Some(online);
        }
        let allowed = online.filter(|cpu| libc::CPU_ISSET(cpu.cpu, &mask));
        match allowed.is_empty() {
            true => CpuSet::online().ok(),
            false => Some(allowed),
        }
    }
}

/// Raises the soft open-files limit to the hard one: every connection is a descriptor.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
