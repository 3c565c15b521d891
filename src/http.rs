//! HTTP/1.1 request heads and responses, just enough for the upgrade, the publish API and the
//! operational endpoints.
//!
//! Invariants: parsing never allocates for a head that is still incomplete; a token in a query
//! string never reaches a log line ([`Request::redacted_target`]).

use std::fmt::Write;

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub minor_version: u8,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, the blank line included.
    pub head_len: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request head over {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
}

/// The most header fields a request may have.
pub const MAX_HEADERS: usize = 48;

/// Parses a request head from `buf`: `Ok(None)` while incomplete.
pub fn parse_head(buf: &[u8], max_len: usize) -> Result<Option<Request>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= max_len => Err(HeadError::TooLarge(max_len)),
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) if len > max_len => Err(HeadError::TooLarge(max_len)),
        Ok(httparse::Status::Complete(head_len)) => {
            let target = req.path.unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            Ok(Some(Request {
                method: req.method.unwrap_or("").to_string(),
                path: path.to_string(),
                query: query.to_string(),
                minor_version: req.version.unwrap_or(0),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
                head_len,
            }))
        }
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders(MAX_HEADERS)),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.trim())
    }

    /// True when `name`'s comma-separated value lists `token` (case-insensitive).
    pub fn header_has(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| percent_decode(v))
        })
    }

    /// The `Authorization: Bearer` credential.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?;
        let (scheme, cred) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| cred.trim())
    }

    pub fn keep_alive(&self) -> bool {
        if self.header_has("connection", "close") {
            return false;
        }
        self.minor_version >= 1 || self.header_has("connection", "keep-alive")
    }

    /// `Content-Length`, 0 when absent. Chunked bodies are refused.
    pub fn content_length(&self) -> Result<usize, HeadError> {
        if self.header("transfer-encoding").is_some() {
            return Err(HeadError::Malformed(
                "Transfer-Encoding is not supported; send Content-Length".into(),
            ));
        }
        match self.header("content-length") {
            None => Ok(0),
            Some(v) => v
                .parse()
                .map_err(|_| HeadError::Malformed(format!("bad Content-Length `{v}`"))),
        }
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        self.header_has("connection", "upgrade") && self.header_has("upgrade", "websocket")
    }

    /// Path and query for logs, with any `token` value replaced.
    pub fn redacted_target(&self) -> String {
        if self.query.is_empty() {
            return self.path.clone();
        }
        let query: Vec<String> = self
            .query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k == "token" => format!("{k}=[redacted]"),
                _ => pair.to_string(),
            })
            .collect();
        format!("{}?{}", self.path, query.join("&"))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' => match (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// A complete response with a body.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body,
            headers: Vec::new(),
        }
    }

    /// A JSON error: `{"error":<error>,"reason":<reason>}`.
    pub fn error(status: u16, error: &str, reason: &str) -> Response {
        Response::json(
            status,
            serde_json::json!({ "error": error, "reason": reason }).to_string(),
        )
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    pub fn with_headers(mut self, headers: &[(&'static str, String)]) -> Response {
        self.headers.extend_from_slice(headers);
        self
    }

    /// `413` for a body over `limits.max_publish_bytes` (`limit`).
    pub fn too_large(limit: usize) -> Response {
        Response::error(
            413,
            "payload_too_large",
            &format!("body over limits.max_publish_bytes ({limit})"),
        )
    }

    /// An answer without a body (`204`).
    pub fn empty(status: u16) -> Response {
        Response::json(status, String::new())
    }

    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if self.status != 204 {
            let _ = write!(
                head,
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            );
        }
        for (name, value) in &self.headers {
            // Writing into a String cannot fail.
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_head_and_its_parts() {
        let raw = b"GET /ws?a=1&token=abc%2Edef&x HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\nAuthorization: Bearer  tok \r\n\r\nrest";
        assert!(parse_head(&raw[..20], 1024).unwrap().is_none());
        let r = parse_head(raw, 1024).unwrap().unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/ws"));
        assert_eq!(&raw[r.head_len..], b"rest");
        assert_eq!(r.query_param("token").as_deref(), Some("abc.def"));
        assert_eq!(r.query_param("x").as_deref(), Some(""));
        assert_eq!(r.query_param("nope"), None);
        assert!(r.is_websocket_upgrade() && r.keep_alive());
        assert_eq!(r.bearer(), Some("tok"));
        assert_eq!(r.redacted_target(), "/ws?a=1&token=[redacted]&x");
    }

    #[test]
    fn bounds_and_rejects_heads() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(600));
        assert_eq!(
            parse_head(big.as_bytes(), 512).err(),
            Some(HeadError::TooLarge(512))
        );
        assert!(matches!(
            parse_head(b"GARBAGE\0\r\n\r\n", 512),
            Err(HeadError::Malformed(_))
        ));
        let close = parse_head(
            b"POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: 12\r\n\r\n",
            512,
        )
        .unwrap()
        .unwrap();
        assert!(!close.keep_alive());
        assert_eq!(close.content_length(), Ok(12));
        let old = parse_head(b"GET / HTTP/1.0\r\n\r\n", 512).unwrap().unwrap();
        assert!(!old.keep_alive());
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("a%20b%"), "a b%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%41%42"), "AB");
    }
}
