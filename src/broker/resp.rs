//! RESP over glommio sockets: where a Redis is ([`Target`]), opening a connection (keepalive,
//! AUTH, SELECT, `HELLO 3` and a first PING, all within a deadline), and running one until it
//! fails ([`pump`]) with the `redis` crate's packed commands and `Parser`.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_lite::AsyncRead;
use glommio::net::TcpStream;
use redis::Value;

use crate::conn::write_all;
use crate::deadline::within;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Connecting, authenticating and the first PING must be done by then.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// TCP keepalive on every connection: an idle peer that vanished is noticed in about 8 s, and
/// unacknowledged writes are given up after `TCP_USER_TIMEOUT`.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_PROBES: u32 = 3;
pub(super) const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where Redis is: `redis://[[user]:password@]host[:port][/db]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// Why a Redis URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("must start with redis://")]
    Scheme,
    #[error("bad database `{0}`")]
    Database(String),
    #[error("bad port `{0}`")]
    Port(String),
    #[error("no host")]
    NoHost,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.addr())
    }
}

impl Target {
    /// `host:port`, as Redis Cluster names a node.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let rest = url.strip_prefix("redis://").ok_or(TargetError::Scheme)?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (
                hp,
                db.parse().map_err(|_| TargetError::Database(db.into()))?,
            ),
            None => (rest, 0),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| TargetError::Port(p.into()))?),
            None => (hostport, 6379),
        };
        if host.is_empty() {
            return Err(TargetError::NoHost);
        }
        let (user, password) = match auth.map(|a| a.split_once(':').unwrap_or(("", a))) {
            Some((u, p)) => (
                (!u.is_empty()).then(|| u.to_string()),
                (!p.is_empty()).then(|| p.to_string()),
            ),
            None => (None, None),
        };
        Ok(Target {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            db,
            user,
            password,
        })
    }

    /// The addresses to try, in order. A host name is resolved on glommio's blocking thread: a
    /// slow DNS server must not stall the core (an IP address needs no lookup).
    async fn addrs(&self) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let (host, port) = (self.host.clone(), self.port);
        glommio::executor()
            .spawn_blocking(move || Ok((host.as_str(), port).to_socket_addrs()?.collect()))
            .await
    }

    /// Commands that open every connection: AUTH and SELECT as configured, `HELLO 3` for the
    /// subscriber (RESP3, so that it can run commands between its pushes), then a PING, so that
    /// a connection counts as up only once Redis has answered on it.
    fn hello(&self, resp3: bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if let Some(password) = &self.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.user {
                auth.arg(user);
            }
            out.push(auth.arg(password).get_packed_command());
        }
        if self.db != 0 {
            out.push(redis::cmd("SELECT").arg(self.db).get_packed_command());
        }
        if resp3 {
            out.push(redis::cmd("HELLO").arg(3).get_packed_command());
        }
        out.push(redis::cmd("PING").get_packed_command());
        out
    }
}

/// Runs one connection until it fails: writes whatever `queued` hands over, and gives every
/// value read to `on_value`.
pub(super) async fn pump(
    stream: &RefCell<TcpStream>,
    mut queued: impl FnMut(&mut Context<'_>) -> Poll<Vec<u8>>,
    mut on_value: impl FnMut(Value) -> io::Result<()>,
) -> io::Result<()> {
    let reader = async {
        let mut rbuf = BytesMut::new();
        let mut parser = redis::Parser::new();
        loop {
            read_into(stream, &mut rbuf).await?;
            while let Some(value) = next_value(&mut parser, &mut rbuf)? {
                on_value(value)?;
            }
        }
    };
    let writer = async {
        loop {
            let bytes = poll_fn(&mut queued).await;
            write_all(stream, &bytes, TCP_USER_TIMEOUT).await?;
        }
    };
    futures_lite::future::or(reader, writer).await
}

/// Pulls the next complete value out of `rbuf`, `None` when more bytes are needed.
pub(super) fn next_value(
    parser: &mut redis::Parser,
    rbuf: &mut BytesMut,
) -> io::Result<Option<Value>> {
    // Asked even when `rbuf` is empty: the parser buffers what it read, and may hold more
    // complete values than it returned so far.
    match parser.parse_value(Feed(rbuf)) {
        Ok(v) => Ok(Some(v)),
        // The parser keeps its partial state: it asks again once more bytes arrived.
        Err(e) if e.is_timeout() || e.is_io_error() && rbuf.is_empty() => Ok(None),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
    }
}

/// A reader over the bytes received so far that says `WouldBlock` when they run out.
struct Feed<'a>(&'a mut BytesMut);

impl Read for Feed<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = out.len().min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0.advance(n);
        Ok(n)
    }
}

/// Connects, sets keepalive, and runs the `hello` commands, all within `CONNECT_TIMEOUT`.
pub(super) async fn connect(target: &Target, resp3: bool) -> io::Result<TcpStream> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    within(CONNECT_TIMEOUT, open(target, resp3))
        .await
        .unwrap_or_else(|| Err(timed_out()))
}

async fn open(target: &Target, resp3: bool) -> io::Result<TcpStream> {
    let mut failed = io::Error::new(io::ErrorKind::NotFound, "redis host resolves to nothing");
    let mut stream = None;
    for addr in target.addrs().await? {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => failed = e.into(),
        }
    }
    let stream = stream.ok_or(failed)?;
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    // SAFETY: `stream` owns the fd and outlives this borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let socket = socket2::SockRef::from(&fd);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))?;
    let stream = RefCell::new(stream);
    let mut rbuf = BytesMut::new();
    let mut parser = redis::Parser::new();
    for hello in target.hello(resp3) {
        write_all(&stream, &hello, TCP_USER_TIMEOUT).await?;
        let reply = loop {
            if let Some(v) = next_value(&mut parser, &mut rbuf)? {
                break v;
            }
            read_into(&stream, &mut rbuf).await?;
        };
        if let Value::ServerError(e) = reply {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                e.to_string(),
            ));
        }
    }
    Ok(stream.into_inner())
}

async fn read_into(stream: &RefCell<TcpStream>, rbuf: &mut BytesMut) -> io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_read(cx, &mut chunk)).await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    rbuf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Capped exponential backoff with full jitter.
#[derive(Default)]
pub(super) struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub(super) fn next(&mut self) -> Duration {
        let cap = BACKOFF_MIN
            .saturating_mul(1 << self.attempt.min(10))
            .min(BACKOFF_MAX);
        self.attempt += 1;
        // Jitter from the clock's low bits: good enough to spread reconnects of many cores.
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let nanos = clock.subsec_nanos() ^ std::process::id().rotate_left(self.attempt);
        let jitter = (nanos % 1000) as f64 / 1000.0;
        BACKOFF_MIN.max(cap.mul_f64(0.5 + jitter / 2.0))
    }

    pub(super) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Runs `packed` on a connection of its own and returns the reply (or Redis's error as an
/// error): for the rare question that must not wait behind a node's queue.
pub(super) async fn query(target: &Target, packed: &[u8]) -> io::Result<Value> {
    let stream = RefCell::new(connect(target, false).await?);
    let ask = async {
        write_all(&stream, packed, TCP_USER_TIMEOUT).await?;
        let (mut rbuf, mut parser) = (BytesMut::new(), redis::Parser::new());
        loop {
            if let Some(v) = next_value(&mut parser, &mut rbuf)? {
                return match v {
                    Value::ServerError(e) => Err(io::Error::other(e.to_string())),
                    v => Ok(v),
                };
            }
            read_into(&stream, &mut rbuf).await?;
        }
    };
    within(CONNECT_TIMEOUT, ask)
        .await
        .unwrap_or_else(|| Err(io::ErrorKind::TimedOut.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_urls() {
        let t = Target::parse("redis://127.0.0.1:6390/2").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.db, t.password),
            ("127.0.0.1", 6390, 2, None)
        );
        let t = Target::parse("redis://:s3cret@localhost").unwrap();
        assert_eq!(
            (t.port, t.user, t.password.as_deref()),
            (6379, None, Some("s3cret"))
        );
        let t = Target::parse("redis://bob:pw@h:1/").unwrap();
        assert_eq!(
            (t.user.as_deref(), t.password.as_deref(), t.db),
            (Some("bob"), Some("pw"), 0)
        );
        assert!(Target::parse("http://x").is_err());
        assert!(Target::parse("redis://h:port").is_err());
        assert!(Target::parse("redis://h/db").is_err());
    }

    #[test]
    fn the_parser_resumes_across_split_reads() {
        let mut parser = redis::Parser::new();
        let whole = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n:7\r\n";
        let mut rbuf = BytesMut::new();
        let mut values = Vec::new();
        for byte in whole {
            rbuf.extend_from_slice(&[*byte]);
            while let Some(v) = next_value(&mut parser, &mut rbuf).unwrap() {
                values.push(v);
            }
        }
        assert_eq!(values.len(), 2, "{values:?}");
        // Two values in one read come out one after the other.
        rbuf.extend_from_slice(b":1\r\n:2\r\n");
        assert_eq!(
            next_value(&mut parser, &mut rbuf).unwrap(),
            Some(Value::Int(1))
        );
        assert_eq!(
            next_value(&mut parser, &mut rbuf).unwrap(),
            Some(Value::Int(2))
        );
        assert_eq!(next_value(&mut parser, &mut rbuf).unwrap(), None);
        assert_eq!(values[1], Value::Int(7));
        let Value::Array(items) = &values[0] else {
            panic!("{values:?}")
        };
        assert_eq!(items[2], Value::BulkString(b"hello".to_vec()));
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::default();
        let first = b.next();
        assert!(first >= BACKOFF_MIN && first <= BACKOFF_MIN * 2);
        let later: Vec<Duration> = (0..20).map(|_| b.next()).collect();
        assert!(later.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(later.last().unwrap() >= &(BACKOFF_MAX / 2));
    }
}
