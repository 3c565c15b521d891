//! HTTP fallback sessions: a client whose frames travel over SSE or long-polls instead of a
//! WebSocket, under the same rules (`client`). One file per endpoint: [`create`] (`POST
//! /v1/sessions`), [`sse`], [`poll`], [`events`] (posted client events); `DELETE` and the
//! routing of a request to its session are here.
//!
//! A session lives on the core that created it, as one task that owns its client state and
//! handles posted events in order ([`run`]). Its frames wait in a retaining [`ConnHandle`],
//! numbered, until the client acknowledges them (a poll's `cursor`, a stream's
//! `Last-Event-ID`) or the queue's bound pushes them out, so that a reader can resume. At most
//! one reader is attached at a time; a new one takes over and the old one ends.
//!
//! A session id names its instance and core (`<instance>-<hex id>`, the core in the id's top
//! bits as for connections): a request that reaches another core of the instance is handed
//! over to the session's core with its socket (`server::hand_over`), so every endpoint of a
//! session runs where the session is and nothing of it is shared between cores.
//!
//! Lifecycle: live → closing (its close is requested: `DELETE`, token expiry, the event rate
//! limit, shutdown; the task leaves the rules, so the user may go offline, but an attached or
//! arriving reader still gets what is queued) → gone (out of the table: `404` everywhere). A
//! session with no reader attached for `fallback.session_ttl_ms` is gone.

pub mod create;
pub mod events;
pub mod poll;
pub mod relay;
pub mod sse;

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BytesMut;
use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;
use tracing::info;

use crate::client::{self, Client};
use crate::handle::{clock_ms, ConnHandle, Read};
use crate::http::{Request, Response};
use crate::metrics::{Counter, Registry};
use crate::protocol::{server_event, CloseCode, ErrorCode};
use crate::route::Map;
use crate::shard::Shard;

const PREFIX: &str = "/v1/sessions";

/// What a reader is attached by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    None,
    Sse,
    Poll,
}

pub struct Session {
    /// The id clients use.
    pub name: String,
    pub out: Rc<ConnHandle>,
    inbox: RefCell<Inbox>,
    /// The reader attached now, and the number of the latest attach.
    attached: Cell<(Transport, u64)>,
    /// When the last reader detached, in [`clock_ms`]; creation counts as one.
    detached_at: Cell<u64>,
    /// The highest cursor handed to the client: a cursor before it is a resume.
    handed_through: Cell<u64>,
    /// Out of the table: counted in no gauge any more.
    gone: Cell<bool>,
    /// Every core's counters, for its own core's gauges (kept here rather than in each
    /// reader: an SSE stream's task is at the edge of its allocator size class).
    registry: Registry,
    started: Instant,
}

/// Posted client events not handled yet (the task waits for them on its handle:
/// [`ConnHandle::poll_closed`], [`ConnHandle::wake_task`]).
#[derive(Default)]
struct Inbox {
    events: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl Session {
    fn new(name: String, out: Rc<ConnHandle>, registry: Registry) -> Session {
        Session {
            name,
            out,
            inbox: RefCell::default(),
            attached: Cell::new((Transport::None, 0)),
            detached_at: Cell::new(clock_ms()),
            handed_through: Cell::new(0),
            gone: Cell::new(false),
            registry,
            started: Instant::now(),
        }
    }

    /// Attaches a reader; the one attached before ends (it is woken and sees it is not the
    /// current one any more). Detached when the guard drops.
    pub fn attach(&self, transport: Transport) -> Attached<'_> {
        let number = self.attached.get().1 + 1;
        self.set_attached((transport, number));
        self.out.wake_reader();
        Attached {
            session: self,
            number,
        }
    }

    /// The reader attached now becomes `to` (a transport and an attach number), counted in
    /// `fanfare_sessions_open` while the session is in the table.
    fn set_attached(&self, to: (Transport, u64)) {
        let (from, _) = self.attached.replace(to);
        if !self.gone.get() {
            self.open_gauge(from).dec();
            self.open_gauge(to.0).inc();
        }
    }

    /// The gauge of this core's sessions open with `transport` attached.
    fn open_gauge(&self, transport: Transport) -> &Counter {
        let stats = &self.registry[crate::shard::core_of(self.out.id)];
        match transport {
            Transport::None => &stats.sessions_open_none,
            Transport::Sse => &stats.sessions_open_sse,
            Transport::Poll => &stats.sessions_open_poll,
        }
    }

    /// Checks a reader's cursor and acknowledges what it has: `Err` for one this session never
    /// gave out. `Ok(true)` for a cursor before the last one handed out (a resume).
    fn acknowledge(&self, cursor: u64) -> Result<bool, Response> {
        if cursor > self.out.last_seq() {
            return Err(Response::error(
                400,
                "bad_request",
                &format!("cursor {cursor} is ahead of this session"),
            ));
        }
        self.out.acknowledge(cursor);
        Ok(cursor < self.handed_through.get())
    }

    /// Detaches reader `number` if it is still the attached one: it ends.
    fn release(&self, number: u64) {
        if self.attached.get().1 == number {
            self.set_attached((Transport::None, number + 1));
            self.detached_at.set(clock_ms());
            self.out.wake_reader();
        }
    }

    /// Queues posted events for the task; `false` (nothing queued) while more than
    /// `max_bytes` of them wait.
    fn post(&self, events: Vec<Vec<u8>>, max_bytes: usize) -> bool {
        let mut inbox = self.inbox.borrow_mut();
        let bytes: usize = events.iter().map(Vec::len).sum();
        if inbox.bytes > 0 && inbox.bytes + bytes > max_bytes {
            return false;
        }
        inbox.bytes += bytes;
        inbox.events.extend(events);
        self.out.wake_task();
        true
    }

    /// The next posted event; `None` once the session's close is requested.
    fn poll_event(&self, cx: &mut Context<'_>) -> Poll<Option<Vec<u8>>> {
        if self.out.close_code().is_some() {
            return Poll::Ready(None);
        }
        let mut inbox = self.inbox.borrow_mut();
        if let Some(event) = inbox.events.pop_front() {
            inbox.bytes -= event.len();
            return Poll::Ready(Some(event));
        }
        // Pending until the close or the next post wakes the task.
        self.out.poll_closed(cx).map(|_| None)
    }
}

/// A reader attached to a session; detaches on drop.
pub struct Attached<'a> {
    session: &'a Session,
    number: u64,
}

impl Attached<'_> {
    /// The next frames after `cursor` (at most `max_bytes`, at least one), or the close once
    /// everything is read; `None` once another reader took over.
    pub async fn read(&self, cursor: u64, max_bytes: usize) -> Option<Read> {
        poll_fn(|cx| {
            if self.session.attached.get().1 != self.number {
                return Poll::Ready(None);
            }
            self.session.out.poll_after(cx, cursor, max_bytes).map(Some)
        })
        .await
    }

    /// Records that the client was handed everything through `cursor`.
    pub fn handed(&self, cursor: u64) {
        let handed = &self.session.handed_through;
        handed.set(handed.get().max(cursor));
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        let s = self.session;
        if s.attached.get().1 == self.number {
            s.set_attached((Transport::None, self.number));
            s.detached_at.set(clock_ms());
        }
    }
}

/// This core's sessions by id, and its requests for sessions of other instances.
#[derive(Default)]
pub struct Sessions {
    by_id: RefCell<Map<u64, Rc<Session>>>,
    /// When each session in the table is next looked at for `fallback.session_ttl_ms`, in
    /// [`clock_ms`], by id: a min-heap with one entry per session (a deleted one's stays until
    /// it falls due, then goes).
    due: RefCell<BinaryHeap<Reverse<(u64, u64)>>>,
    pub relay: relay::Relay,
}

impl Sessions {
    fn get(&self, id: u64) -> Option<Rc<Session>> {
        self.by_id.borrow().get(&id).cloned()
    }

    fn insert(&self, session: Rc<Session>, shard: &Shard) {
        let ttl = shard.config.fallback.session_ttl_ms;
        let id = session.out.id;
        self.due
            .borrow_mut()
            .push(Reverse((session.detached_at.get() + ttl, id)));
        session.open_gauge(session.attached.get().0).inc();
        self.by_id.borrow_mut().insert(id, session);
    }

    /// The session is gone: its close is requested (if it was not yet), and every endpoint
    /// answers `404` from now on.
    fn remove(&self, session: &Session) {
        session.out.close(CloseCode::Normal);
        if self.by_id.borrow_mut().remove(&session.out.id).is_some() {
            session.gone.set(true);
            session.open_gauge(session.attached.get().0).dec();
        }
    }

    /// Periodic work (`server::housekeeping`): forgets the sessions detached for
    /// `fallback.session_ttl_ms`, at a cost that follows what is due. Each entry of `due` is a
    /// reminder checked against the session: one with a reader attached is looked at again a
    /// TTL later (the earliest it could expire, were its reader to detach now), a detached one
    /// a TTL after its detach. (Token expiry is the shard's sweep's, as for a connection: it
    /// requests the close, which ends the session's task.)
    pub fn sweep(&self, shard: &Shard) {
        let clock = clock_ms();
        let ttl = shard.config.fallback.session_ttl_ms;
        loop {
            let id = {
                let mut due = self.due.borrow_mut();
                match due.peek() {
                    Some(Reverse((at, _))) if *at <= clock => due.pop().map(|Reverse(d)| d.1),
                    _ => None,
                }
            };
            let Some(id) = id else { return };
            // Absent: deleted or ended by its reader, and its entry goes with it.
            let Some(s) = self.get(id) else { continue };
            let next = match s.attached.get().0 {
                Transport::None => s.detached_at.get() + ttl,
                _ => clock + ttl,
            };
            if next > clock {
                self.due.borrow_mut().push(Reverse((next, id)));
                continue;
            }
            if s.out.close_code().is_none() {
                shard.stats().session_expiries_total.inc();
                info!(session = %s.name, "session expired: nothing attached for fallback.session_ttl_ms");
            }
            self.remove(&s);
        }
    }
}

/// The session's task: handles posted events in order until the session closes, then leaves
/// the rules (its subscriptions, its user's presence). `client` has joined already.
async fn run(shard: Rc<Shard>, session: Rc<Session>, mut state: client::State) {
    let out = &session.out;
    while let Some(mut event) = poll_fn(|cx| session.poll_event(cx)).await {
        let mut client = Client {
            shard: &shard,
            out,
            state: &mut state,
        };
        if client.within_rate() {
            // Boxed: an idle session's task should not carry the largest state a handler
            // passes through.
            Box::pin(client.on_event(&mut event)).await;
        }
    }
    Client {
        shard: &shard,
        out,
        state: &mut state,
    }
    .leave()
    .await;
    // Events posted before the close are not handled.
    session.inbox.take();
    let code = out.close_code().unwrap_or(CloseCode::Normal);
    let duration_ms = session.started.elapsed().as_millis() as u64;
    info!(session = %session.name, tenant = %out.tenant, user = %out.user, code = code.code(), reason = code.reason(), duration_ms, "session closed");
}

/// What became of a session request.
pub enum Served {
    Answer(Response),
    /// The connection is used up (a forwarded SSE stream ended, or a refusal was written).
    Closed,
    /// The connection becomes this session's SSE stream (`sse::Stream::serve`).
    Stream(sse::Stream),
    /// The session lives on this core of the instance: hand the request over.
    Elsewhere(usize),
}

pub fn is_session_path(path: &str) -> bool {
    path == PREFIX || path.starts_with("/v1/sessions/")
}

/// `POST /v1/sessions/<id>/events`: the one session endpoint that reads a body.
pub fn posts_events(req: &Request) -> bool {
    req.method == "POST" && req.path.starts_with("/v1/sessions/") && req.path.ends_with("/events")
}

/// The endpoints under `/v1/sessions/<id>`.
enum Endpoint {
    Sse,
    Poll,
    Events,
    Delete,
}

/// Serves one request to a session endpoint (`is_session_path`).
pub async fn serve(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    req: &Request,
    peer: SocketAddr,
) -> Served {
    let cors = match cors(shard, req) {
        Ok(headers) => headers,
        Err(refused) => return refuse(shard, stream, buf, req, refused).await,
    };
    if req.method == "OPTIONS" {
        return Served::Answer(preflight().with_headers(&cors));
    }
    let rest = req.path[PREFIX.len()..].trim_start_matches('/');
    if rest.is_empty() {
        let answer = match req.method.as_str() {
            "POST" => create::create(shard, req, peer).await,
            _ => Response::error(405, "method_not_allowed", &req.method),
        };
        return Served::Answer(answer.with_headers(&cors));
    }
    let (name, endpoint) = rest.split_once('/').unwrap_or((rest, ""));
    let endpoint = match (req.method.as_str(), endpoint) {
        ("GET", "sse") => Endpoint::Sse,
        ("GET", "poll") => Endpoint::Poll,
        ("POST", "events") => Endpoint::Events,
        ("DELETE", "") => Endpoint::Delete,
        (_, "sse" | "poll" | "events" | "") => {
            let refused = Response::error(405, "method_not_allowed", &req.method);
            return refuse(shard, stream, buf, req, refused.with_headers(&cors)).await;
        }
        _ => {
            let refused = Response::error(404, "not_found", &req.path);
            return refuse(shard, stream, buf, req, refused.with_headers(&cors)).await;
        }
    };
    let token = crate::server::token(req);
    let session = match find(shard, name, &token) {
        Ok(Found::Here(session)) => session,
        Ok(Found::Core(core)) => return Served::Elsewhere(core),
        Ok(Found::Instance(instance, core)) => {
            let call = |op, arg: Option<String>, body| relay::Call {
                op,
                session: name.to_string(),
                token: token.clone(),
                arg,
                body,
            };
            let answer = match endpoint {
                Endpoint::Sse => {
                    let call = call(
                        relay::Op::Sse,
                        req.header("last-event-id").map(str::to_string),
                        None,
                    );
                    match relay::stream(shard, stream, &instance, core, call, &cors).await {
                        Some(answer) => answer,
                        None => return Served::Closed,
                    }
                }
                Endpoint::Poll => {
                    let call = call(relay::Op::Poll, req.query_param("cursor"), None);
                    relay::call(shard, &instance, core, call).await
                }
                Endpoint::Events => {
                    match crate::server::body(shard, stream, buf, req, None, &cors).await {
                        Ok(body) => {
                            let body = String::from_utf8_lossy(&body).into_owned();
                            relay::call(
                                shard,
                                &instance,
                                core,
                                call(relay::Op::Events, None, Some(body)),
                            )
                            .await
                        }
                        Err(Some(answer)) => answer,
                        Err(None) => return Served::Closed,
                    }
                }
                Endpoint::Delete => {
                    relay::call(shard, &instance, core, call(relay::Op::Delete, None, None)).await
                }
            };
            return Served::Answer(answer.with_headers(&cors));
        }
        Err(refused) => return refuse(shard, stream, buf, req, refused.with_headers(&cors)).await,
    };
    let answer = match endpoint {
        Endpoint::Sse => match sse::open(shard, &session, req.header("last-event-id")) {
            Ok(cursor) => {
                return Served::Stream(sse::Stream {
                    session,
                    cursor,
                    cors,
                })
            }
            Err(refused) => refused,
        },
        Endpoint::Poll => {
            let cursor = req.query_param("cursor");
            let gone = closed_by_client(shard, stream, buf);
            poll::poll(shard, &session, cursor.as_deref(), gone).await
        }
        Endpoint::Events => match crate::server::body(shard, stream, buf, req, None, &cors).await {
            Ok(body) => events::post(shard, &session, &body),
            Err(Some(answer)) => answer,
            Err(None) => return Served::Closed,
        },
        Endpoint::Delete => delete(shard, &session),
    };
    Served::Answer(answer.with_headers(&cors))
}

/// Resolves when the client closes its connection. What it sends meanwhile (a pipelined
/// request) is kept in `buf`, up to `server.max_request_head_bytes`.
async fn closed_by_client(shard: &Shard, stream: &mut TcpStream, buf: &mut BytesMut) {
    let mut chunk = [0u8; 512];
    while buf.len() < shard.config.server.max_request_head_bytes {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    std::future::pending().await
}

/// `DELETE /v1/sessions/<id>`: the session ends at once (`204`).
fn delete(shard: &Shard, session: &Session) -> Response {
    shard.sessions.remove(session);
    info!(session = %session.name, "session deleted");
    Response::empty(204)
}

/// A refusal; a request that carries a body gets it before the body is read (and the body
/// is swallowed).
async fn refuse(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    req: &Request,
    refused: Response,
) -> Served {
    if matches!(req.content_length(), Ok(0)) {
        return Served::Answer(refused);
    }
    match crate::server::body(shard, stream, buf, req, Some(refused), &[]).await {
        Err(Some(answer)) => Served::Answer(answer),
        _ => Served::Closed,
    }
}

enum Found {
    Here(Rc<Session>),
    /// On this core of this instance.
    Core(usize),
    /// On this core of another instance.
    Instance(String, usize),
}

/// Where the session `name` lives: on this core (for `token`), another core of this
/// instance, or another instance. `404` for a name that is no session's.
fn find(shard: &Shard, name: &str, token: &str) -> Result<Found, Response> {
    let (instance, id) = parse(name).ok_or_else(not_found)?;
    let core = crate::shard::core_of(id);
    if instance != &*shard.instance {
        return Ok(Found::Instance(instance.to_string(), core));
    }
    if core == shard.id {
        return find_here(shard, name, token).map(Found::Here);
    }
    if core < shard.count {
        Ok(Found::Core(core))
    } else {
        Err(not_found())
    }
}

/// The session `name` of this core, for `token`: `401` without a valid token, `404` for a
/// session that is not (or no longer) here, `403` for another user's or tenant's.
fn find_here(shard: &Shard, name: &str, token: &str) -> Result<Rc<Session>, Response> {
    let identity = crate::server::verify(shard, token)?;
    let session = parse(name)
        .filter(|(instance, _)| *instance == &*shard.instance)
        .and_then(|(_, id)| shard.sessions.get(id))
        .ok_or_else(not_found)?;
    if *identity.tenant != *session.out.tenant || *identity.user != *session.out.user {
        return Err(Response::error(
            403,
            "forbidden",
            "the token is for another user or tenant than the session's",
        ));
    }
    Ok(session)
}

/// A session name's instance and id.
fn parse(name: &str) -> Option<(&str, u64)> {
    let (instance, id) = name.split_once('-')?;
    let id = u64::from_str_radix(id, 16).ok()?;
    (!instance.is_empty() && instance.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some((instance, id))
}

fn not_found() -> Response {
    Response::error(404, "not_found", "no such session (it may have ended)")
}

/// The CORS headers of an answer to `req`: none without `Origin` (not a browser); `403` for
/// an origin that `server.allowed_origins` does not list (when it lists any).
fn cors(shard: &Shard, req: &Request) -> Result<Vec<(&'static str, String)>, Response> {
    let Some(origin) = req.header("origin") else {
        return Ok(Vec::new());
    };
    let origins = &shard.config.server.allowed_origins;
    if !origins.is_empty() && !origins.iter().any(|o| o == origin) {
        shard.stats().rejected_origin_total.inc();
        return Err(Response::error(
            403,
            "forbidden",
            &format!("origin {origin} is not allowed"),
        ));
    }
    Ok(vec![
        ("Access-Control-Allow-Origin", origin.to_string()),
        ("Vary", "Origin".into()),
        ("Access-Control-Expose-Headers", "Retry-After".into()),
    ])
}

/// The answer to a CORS preflight (`OPTIONS`) from an allowed origin.
fn preflight() -> Response {
    Response::empty(204)
        .with_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
        .with_header(
            "Access-Control-Allow-Headers",
            "Authorization, Content-Type, Last-Event-ID",
        )
        .with_header("Access-Control-Max-Age", "600")
}

/// The event that tells a reader that events after its cursor are gone.
fn missed_events() -> String {
    server_event::error(
        ErrorCode::Overloaded,
        "events after this cursor are no longer retained: reload what you show",
        None,
    )
}
