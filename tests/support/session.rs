//! HTTP fallback sessions as a client sees them: create, post events, long-poll, read an SSE
//! stream over a raw socket, delete.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use serde_json::{json, Value};

use super::{http, parse_response, token, HttpResponse, Server, DEADLINE};

/// A session created through `POST /v1/sessions`, with the token of its user.
pub struct Session {
    pub addr: SocketAddr,
    pub id: String,
    pub token: String,
}

impl Server {
    /// Creates a session for `user` of `tenant` and checks the answer.
    pub fn session(&self, tenant: &str, user: &str) -> Session {
        Session::create(self.addr, &token(tenant, user, 3600))
    }
}

impl Session {
    pub fn create(addr: SocketAddr, token: &str) -> Session {
        let r = http(
            addr,
            "POST",
            &format!("/v1/sessions?token={token}"),
            &[],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, 201, "create a session: {}", r.body);
        let body = r.json();
        assert!(body["heartbeatMs"].as_u64().is_some(), "{body}");
        Session {
            addr,
            id: body["sessionId"].as_str().expect("sessionId").to_string(),
            token: token.to_string(),
        }
    }

    /// The same session, addressed at another instance.
    pub fn at(&self, addr: SocketAddr) -> Session {
        Session {
            addr,
            id: self.id.clone(),
            token: self.token.clone(),
        }
    }

    pub fn path(&self, endpoint: &str) -> String {
        match endpoint {
            "" => format!("/v1/sessions/{}", self.id),
            e => format!("/v1/sessions/{}/{e}", self.id),
        }
    }

    /// A request to one of the session's endpoints with the session's token as Bearer.
    pub fn request(&self, method: &str, path_and_query: &str, body: &[u8]) -> HttpResponse {
        let auth = format!("Bearer {}", self.token);
        http(
            self.addr,
            method,
            path_and_query,
            &[("Authorization", &auth)],
            body,
        )
        .expect("session request")
    }

    /// Posts one event or an array of them.
    pub fn post(&self, events: &Value) -> HttpResponse {
        self.request("POST", &self.path("events"), events.to_string().as_bytes())
    }

    pub fn post_ok(&self, events: &Value) {
        let r = self.post(events);
        assert_eq!(r.status, 202, "post {events}: {}", r.body);
    }

    /// One long-poll from `cursor`: its events and the next cursor.
    pub fn poll(&self, cursor: u64) -> (Vec<Value>, u64) {
        let r = self.request(
            "GET",
            &format!("{}?cursor={cursor}", self.path("poll")),
            b"",
        );
        assert_eq!(r.status, 200, "poll: {}", r.body);
        let body = r.json();
        let events = body["events"].as_array().expect("events").clone();
        (events, body["cursor"].as_u64().expect("cursor"))
    }

    /// Polls from `cursor` until `n` events (presence skipped) have arrived.
    pub fn poll_until(&self, cursor: &mut u64, n: usize) -> Vec<Value> {
        let mut got = Vec::new();
        let end = std::time::Instant::now() + DEADLINE;
        while got.len() < n {
            assert!(std::time::Instant::now() < end, "only {got:?} arrived");
            let (events, next) = self.poll(*cursor);
            *cursor = next;
            got.extend(events.into_iter().filter(|e| !is_presence(e)));
        }
        got
    }

    pub fn delete(&self) -> HttpResponse {
        self.request("DELETE", &self.path(""), b"")
    }

    /// Opens the session's stream, reads `session.ready`, subscribes to `conversation` and
    /// reads the ack (id 2).
    pub fn subscribed_stream(&self, conversation: &str) -> Sse {
        let mut sse = self.sse(None);
        sse.expect("session.ready");
        self.post_ok(&json!({"type": "subscribe", "conversationId": conversation, "id": "s"}));
        assert_eq!(sse.expect("ack").0, Some(2));
        sse
    }

    /// Opens the session's SSE stream, resuming after `last_event_id` when given.
    pub fn sse(&self, last_event_id: Option<&str>) -> Sse {
        let auth = format!("Bearer {}", self.token);
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(id) = last_event_id {
            headers.push(("Last-Event-ID", id));
        }
        let (head, sse) = Sse::open(self.addr, &self.path("sse"), &headers);
        assert_eq!(head.status, 200, "sse: {}", head.body);
        sse.expect("an event stream")
    }
}

/// `presence.online`/`presence.offline`: what tests of other capabilities skip.
pub fn is_presence(v: &Value) -> bool {
    matches!(
        v["type"].as_str(),
        Some("presence.online" | "presence.offline")
    )
}

/// One message of an event stream: its `id`, its data lines joined, and whether it was only
/// a comment.
#[derive(Debug)]
pub struct SseMessage {
    pub id: Option<u64>,
    pub data: String,
    pub comment: Option<String>,
}

impl SseMessage {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("data {:?}: {e}", self.data))
    }
}

/// An SSE stream read over a raw socket.
pub struct Sse {
    reader: BufReader<TcpStream>,
}

impl Sse {
    /// Sends `GET path` and reads the answer's head: the stream when it is `200`, else the
    /// answer with its body.
    pub fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (HttpResponse, Option<Sse>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut reader = BufReader::new(s);
        let mut raw = Vec::new();
        while !raw.ends_with(b"\r\n\r\n") {
            let n = reader.read_until(b'\n', &mut raw).unwrap();
            assert!(n > 0, "the connection closed inside the head: {raw:?}");
        }
        let mut head = parse_response(&raw).unwrap();
        if head.status != 200 {
            let length: usize = head
                .header("Content-Length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            head.body = String::from_utf8_lossy(&body).into_owned();
            return (head, None);
        }
        (head, Some(Sse { reader }))
    }

    /// The next message or comment; `None` once the server ended the stream.
    pub fn next(&mut self) -> Option<SseMessage> {
        let mut message = SseMessage {
            id: None,
            data: String::new(),
            comment: None,
        };
        let mut lines = 0;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).expect("read the stream") == 0 {
                assert_eq!(lines, 0, "the stream ended inside a message");
                return None;
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if lines > 0 {
                    return Some(message);
                }
                continue;
            }
            lines += 1;
            if let Some(c) = line.strip_prefix(':') {
                message.comment = Some(c.trim().to_string());
            } else if let Some(id) = line.strip_prefix("id: ") {
                message.id = Some(id.parse().expect("a numeric id"));
            } else if let Some(d) = line.strip_prefix("data: ") {
                if !message.data.is_empty() {
                    message.data.push('\n');
                }
                message.data.push_str(d);
            } else {
                panic!("unexpected line {line:?}");
            }
        }
    }

    /// The next data message (comments skipped, presence skipped): its id and event, within
    /// `DEADLINE` (keepalives do not extend it).
    pub fn event(&mut self) -> (Option<u64>, Value) {
        let end = std::time::Instant::now() + DEADLINE;
        loop {
            assert!(
                std::time::Instant::now() < end,
                "no event on the stream in time"
            );
            let m = self.next().expect("another event on the stream");
            if m.comment.is_some() && m.data.is_empty() {
                continue;
            }
            let v = m.json();
            if !is_presence(&v) {
                return (m.id, v);
            }
        }
    }

    /// The next data message's event, which must be of type `kind`.
    pub fn expect(&mut self, kind: &str) -> (Option<u64>, Value) {
        let (id, v) = self.event();
        assert_eq!(v["type"], kind, "unexpected {v}");
        (id, v)
    }

    /// Reads until the server ends the stream, within `DEADLINE` (keepalives do not extend
    /// it); what came before is returned.
    pub fn until_end(&mut self) -> Vec<SseMessage> {
        let end = std::time::Instant::now() + DEADLINE;
        std::iter::from_fn(|| {
            assert!(
                std::time::Instant::now() < end,
                "the stream did not end in time"
            );
            self.next()
        })
        .collect()
    }
}
