//! One WebSocket connection, after the upgrade: the transport under a [`Client`]. It reads and
//! reassembles frames, hands each text message to the client rules (`client`), and writes
//! whatever the client's [`ConnHandle`] queue holds.
//!
//! Invariants: the connection lives and dies on the core that accepted it, as one task. Its
//! reader and writer are two futures of that task sharing the socket through a `RefCell`
//! borrowed only inside a single poll, never across an await. Reads land in the core's scratch
//! buffer; only bytes of an incomplete frame are kept per connection, so an idle connection
//! holds no buffers. Queued frames are coalesced into one `send` per batch.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use tracing::{debug, info};

use crate::auth::Identity;
use crate::client::{self, Client, ClientId};
use crate::handle::{ConnHandle, Next};
use crate::protocol::{server_event, CloseCode, ErrorCode};
use crate::shard::Shard;
use crate::ws;

/// Most bytes coalesced into one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// How long the server waits for the peer's close frame after sending its own.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How a connection ended, for the disconnect log line.
enum End {
    /// The close handshake ran; `code` is what the server sent.
    Closed {
        code: CloseCode,
    },
    /// The peer went away without a close handshake.
    Dropped(&'static str),
    Io(io::Error),
}

/// The reader's own state; what it shares with the writer is in [`Link`].
struct Conn {
    /// Bytes of an incomplete frame; empty (unallocated) on an idle connection.
    rbuf: BytesMut,
    /// What the client rules keep for this connection; `None` on the echo endpoint
    /// (`server.echo_path`), which sends every message back and has no client.
    client: Option<client::State>,
    /// A fragmented message being assembled: its opcode and bytes so far.
    fragments: Option<Box<(u8, BytesMut)>>,
    /// When the connection was upgraded, in [`crate::handle::clock_ms`].
    started_ms: u64,
}

/// What the reader and the writer share.
struct Link {
    shard: Rc<Shard>,
    out: Rc<ConnHandle>,
    stream: RefCell<TcpStream>,
    /// The code in the peer's close frame, once it sent one.
    peer_close: Cell<Option<Option<u16>>>,
    /// The code of the close frame the server wrote, once written.
    close_sent: Cell<Option<CloseCode>>,
}

/// The task serving one upgraded connection until it closes. `pending` holds bytes that
/// arrived after the request head.
///
/// Not an `async fn`: the arguments of one would stay in the task's future for the whole life
/// of the connection. This builds the state once, and the future holds it once.
pub fn serve(
    shard: Rc<Shard>,
    stream: TcpStream,
    pending: BytesMut,
    identity: Identity,
    peer: SocketAddr,
) -> impl Future<Output = ()> {
    let started = Instant::now();
    let config = &shard.config;
    let out = Rc::new(ConnHandle::new(
        shard.next_id(),
        shard.conns.tenant_key(identity.tenant),
        identity.user.into(),
        config.limits.outbound_queue_bytes,
        identity.expires_at_ms,
    ));
    // session.ready is the first frame: queued before anything else can reach the connection.
    out.push(ws::text(
        server_event::session_ready(
            &ClientId(out.id).to_string(),
            &out.user,
            &out.tenant,
            config.heartbeat.interval_ms,
        )
        .as_bytes(),
    ));
    info!(conn = %ClientId(out.id), tenant = %out.tenant, user = %out.user, %peer, core = shard.id, "connect");
    let client = Some(client::State::new(&shard, started));
    Conn::new(client, pending).run(Link::new(shard, out, stream))
}

/// The task serving one connection to the echo endpoint (`server.echo_path`): the same framing,
/// every data message sent back, no client rules (no authentication, presence or heartbeat).
pub fn serve_echo(
    shard: Rc<Shard>,
    stream: TcpStream,
    pending: BytesMut,
) -> impl Future<Output = ()> {
    let config = &shard.config;
    let id = shard.next_id();
    let out = Rc::new(ConnHandle::new(
        id,
        "echo".into(),
        "echo".into(),
        config.limits.outbound_queue_bytes,
        u64::MAX,
    ));
    Conn::new(None, pending).run(Link::new(shard, out, stream))
}

impl Link {
    fn new(shard: Rc<Shard>, out: Rc<ConnHandle>, stream: TcpStream) -> Link {
        Link {
            shard,
            out,
            stream: RefCell::new(stream),
            peer_close: Cell::new(None),
            close_sent: Cell::new(None),
        }
    }
}

impl Conn {
    fn new(client: Option<client::State>, pending: BytesMut) -> Conn {
        Conn {
            client,
            rbuf: pending,
            fragments: None,
            started_ms: crate::handle::clock_ms(),
        }
    }

    /// The connection's whole life. Not an `async fn`: an `async fn` future holds its arguments
    /// twice (as captured, and moved into its body) for as long as it runs; the block below
    /// holds `self` and `link` once.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn run(mut self, link: Link) -> impl Future<Output = ()> {
        async move {
            // Joining and leaving are boxed with the client they use, like every rarely taken
            // await of this task (see `read_loop`): across them the task holds one pointer.
            if let Some(client) = self.client(&link) {
                Box::pin(async move { client.join().await }).await;
                let stats = link.shard.stats();
                stats.connects_total.inc();
                stats.connections_open.inc();
            }
            let end = futures_lite::future::or(self.read_loop(&link), write_loop(&link)).await;
            // Logged before leaving, so that `end` is not held across another await.
            self.log_end(&link, end);
            if let Some(mut client) = self.client(&link) {
                Box::pin(async move { client.leave().await }).await;
                link.shard.stats().connections_open.dec();
            }
        }
    }

    /// The `disconnect` line: how the connection ended, and after how long.
    fn log_end(&self, link: &Link, end: End) {
        let duration_ms = crate::handle::clock_ms() - self.started_ms;
        let out = &link.out;
        let (conn, tenant, user) = (ClientId(out.id), &out.tenant, &out.user);
        match end {
            End::Closed { code } => {
                let peer_code = link.peer_close.get().flatten();
                info!(%conn, %tenant, %user, code = code.code(), reason = code.reason(), peer_code, duration_ms, "disconnect")
            }
            End::Dropped(reason) => {
                info!(%conn, %tenant, %user, code = 1006, reason, duration_ms, "disconnect")
            }
            End::Io(e) => {
                info!(%conn, %tenant, %user, code = 1006, reason = %e, duration_ms, "disconnect")
            }
        }
    }

    /// Reads and answers client frames until the connection ends. (Not an `async fn`, for the
    /// reason given at `run`.)
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn read_loop<'a>(&'a mut self, link: &'a Link) -> impl Future<Output = End> + 'a {
        async move {
            // After a protocol error the byte stream cannot be framed any more: discard it.
            let mut garbled = false;
            loop {
                while !garbled && link.peer_close.get().is_none() {
                    let head = match ws::parse_frame(
                        &self.rbuf,
                        link.shard.config.limits.max_message_bytes,
                    ) {
                        Ok(Some(h)) if self.rbuf.len() >= h.header_len + h.payload_len => h,
                        Ok(_) => break,
                        Err(e) => {
                            debug!(conn = %ClientId(link.out.id), error = %e, "bad frame");
                            link.out.close(e.close_code());
                            garbled = true;
                            break;
                        }
                    };
                    let mut payload = self.rbuf.split_to(head.header_len + head.payload_len);
                    payload.advance(head.header_len);
                    ws::unmask(&mut payload, head.mask);
                    // Boxed: handling a frame is rare next to waiting, and an idle connection's
                    // future should not carry the largest state it ever passes through.
                    if let Err(code) = Box::pin(self.on_frame(head, payload, link)).await {
                        link.out.close(code);
                        garbled = true;
                    }
                }
                if let (Some(_), Some(code)) = (link.peer_close.get(), link.close_sent.get()) {
                    // Both close frames are through: the handshake is done.
                    return End::Closed { code };
                }
                if garbled || link.peer_close.get().is_some() || self.rbuf.is_empty() {
                    // Nothing worth keeping: an idle connection holds no read buffer.
                    self.rbuf = BytesMut::new();
                }
                match read_some(link, &mut self.rbuf).await {
                    Ok(0) => return End::Dropped("peer closed the TCP connection"),
                    Ok(_) => link.out.last_seen.set(crate::handle::clock_ms32()),
                    Err(e) => return End::Io(e),
                }
            }
        }
    }

    /// Handles one complete frame; `Err` is a protocol violation to close with.
    async fn on_frame(
        &mut self,
        head: ws::FrameHead,
        payload: BytesMut,
        link: &Link,
    ) -> Result<(), CloseCode> {
        match head.opcode {
            ws::OP_PING => {
                link.out.push(ws::frame(ws::OP_PONG, &payload));
            }
            ws::OP_PONG => {}
            ws::OP_CLOSE => {
                let code = ws::close_code_of(&payload);
                link.peer_close.set(Some(code.unwrap_or(None)));
                link.out.close(code.err().unwrap_or(CloseCode::Normal));
            }
            opcode => {
                let (opcode, message) = match (opcode, self.fragments.take(), head.fin) {
                    (ws::OP_CONTINUATION, None, _) => return Err(CloseCode::ProtocolError),
                    (ws::OP_CONTINUATION, Some(mut sofar), fin) => {
                        if sofar.1.len() + payload.len()
                            > link.shard.config.limits.max_message_bytes
                        {
                            return Err(CloseCode::TooBig);
                        }
                        sofar.1.extend_from_slice(&payload);
                        if !fin {
                            self.fragments = Some(sofar);
                            return Ok(());
                        }
                        *sofar
                    }
                    (_, Some(_), _) => return Err(CloseCode::ProtocolError),
                    (opcode, None, false) => {
                        self.fragments = Some(Box::new((opcode, payload)));
                        return Ok(());
                    }
                    (opcode, None, true) => (opcode, payload),
                };
                if link.out.close_code().is_none() {
                    self.on_message(link, opcode, message).await?;
                }
            }
        }
        Ok(())
    }

    /// One complete data message from the client (or, on the echo endpoint, to send back).
    async fn on_message(
        &mut self,
        link: &Link,
        opcode: u8,
        mut message: BytesMut,
    ) -> Result<(), CloseCode> {
        if opcode == ws::OP_TEXT && std::str::from_utf8(&message).is_err() {
            return Err(CloseCode::InvalidPayload);
        }
        let Some(mut client) = self.client(link) else {
            link.out.push(ws::frame(opcode, &message));
            return Ok(());
        };
        if !client.within_rate() {
            return Ok(());
        }
        if opcode == ws::OP_BINARY {
            let message = "binary frames are not accepted; send JSON text";
            client.error(ErrorCode::InvalidMessage, message, None);
            return Ok(());
        }
        client.on_event(&mut message).await;
        Ok(())
    }

    /// The client rules' view of this connection (none on the echo endpoint).
    fn client<'a>(&'a mut self, link: &'a Link) -> Option<Client<'a>> {
        Some(Client {
            shard: &link.shard,
            out: &link.out,
            state: self.client.as_mut()?,
        })
    }
}

impl Link {
    /// Writes to the peer; one that accepts no byte for `heartbeat.timeout_ms` is given up on.
    fn write_all<'a>(&'a self, data: &'a [u8]) -> impl Future<Output = io::Result<usize>> + 'a {
        let stall = Duration::from_millis(self.shard.config.heartbeat.timeout_ms);
        write_all(&self.stream, data, stall)
    }
}

/// Reads what the socket has into `rbuf`, through the core's scratch buffer.
fn read_some<'a>(
    link: &'a Link,
    rbuf: &'a mut BytesMut,
) -> impl Future<Output = io::Result<usize>> + 'a {
    poll_fn(move |cx| {
        let mut scratch = link.shard.scratch.borrow_mut();
        let polled = Pin::new(&mut *link.stream.borrow_mut()).poll_read(cx, &mut scratch[..]);
        if let Poll::Ready(Ok(n)) = polled {
            rbuf.extend_from_slice(&scratch[..n]);
        }
        polled
    })
}

/// Writes queued frames until the close handshake is done. (Not an `async fn`, for the reason
/// given at `Conn::run`.)
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn write_loop(link: &Link) -> impl Future<Output = End> + '_ {
    async move {
        // Only `frames` is held while writing (every connection's future carries this one).
        let code = loop {
            let frames = match poll_fn(|cx| link.out.poll_next(cx, WRITE_BATCH_BYTES)).await {
                Next::Frames(frames) => frames,
                Next::Close(code) => break code,
            };
            match link.write_all(&frames).await {
                Ok(written) => {
                    let stats = link.shard.stats();
                    stats.writes_total.inc();
                    stats.bytes_written_total.add(written as u64);
                }
                Err(e) => return End::Io(e),
            }
        };
        Box::pin(close(link, code)).await
    }
}

/// Sends the close frame and gives the peer `CLOSE_WAIT` to answer with its own (the reader
/// ends the connection when it does).
async fn close(link: &Link, code: CloseCode) -> End {
    if let Err(e) = link.write_all(&ws::close(code)).await {
        return End::Io(e);
    }
    link.close_sent.set(Some(code));
    if link.peer_close.get().is_none() {
        glommio::timer::sleep(CLOSE_WAIT).await;
    }
    End::Closed { code }
}

/// Writes all of `data` to `stream` and says how many bytes that was. A peer that accepts no
/// byte for `stall` is given up on (`TimedOut`). The one socket write of the server: the
/// connections, SSE streams and the Redis links use it.
///
/// Not an `async fn`, and its timer is made only when the socket is full: the usual write
/// costs no allocation, and every idle connection's future stays small.
pub(crate) fn write_all<'a, S: AsyncWrite + Unpin>(
    stream: &'a RefCell<S>,
    data: &'a [u8],
    stall: Duration,
) -> impl Future<Output = io::Result<usize>> + 'a {
    let mut at = 0;
    let mut stalled: Option<Pin<Box<glommio::timer::Timer>>> = None;
    poll_fn(move |cx| {
        while at < data.len() {
            match Pin::new(&mut *stream.borrow_mut()).poll_write(cx, &data[at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    at += n;
                    stalled = None;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    let timer =
                        stalled.get_or_insert_with(|| Box::pin(glommio::timer::Timer::new(stall)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the peer accepted no byte in time",
                        )));
                    }
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(at))
    })
}
