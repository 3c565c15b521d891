//! Operational endpoints and HTTP keep-alive.
mod support;

use std::io::Write;

use support::*;

#[test]
fn health_readiness_and_metrics() {
    let server = Server::start("");
    assert_eq!(server.http("GET", "/healthz", &[], b"").status, 200);
    assert_eq!(
        server.http("GET", "/readyz", &[], b"").json()["status"],
        "ready"
    );
    let _c = server.connect("t1", "u1");
    let m = server.http("GET", "/metrics", &[], b"");
    assert!(m.header("Content-Type").unwrap().starts_with("text/plain"));
    for name in [
        "fanfare_connections_open 1",
        "fanfare_connects_total 1",
        "# TYPE fanfare_frames_delivered_total counter",
        "fanfare_shards ",
        "process_resident_memory_bytes ",
    ] {
        assert!(m.body.contains(name), "{name} missing:\n{}", m.body);
    }
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let server = Server::start("");
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let body = r#"{"tenantId":"t1","event":{"type":"conversation.updated","conversationId":"c1"}}"#;
    for i in 0..5 {
        write!(s, "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!(
            (r.status, r.header("Connection")),
            (202, Some("keep-alive")),
            "request {i}"
        );
    }
    write!(s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    assert_eq!(server.metric("fanfare_events_published_total"), 5);
}
