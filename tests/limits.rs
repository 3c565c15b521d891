//! Limits: message size (1009), message rate (rate_limited, then 4008), connection attempts per
//! IP (429), subscriptions per connection.
mod support;

use serde_json::json;
use support::*;
use tungstenite::Message;

#[test]
fn oversized_message_closes_with_1009_and_others_keep_going() {
    let server = Server::start("[limits]\nmax_message_bytes = 1024");
    let mut other = server.connect("t1", "bob");
    let mut c = server.connect("t1", "alice");
    // Just under the limit is fine.
    let pad = "x".repeat(1024 - r#"{"type":"ping","id":"ok","p":""}"#.len());
    c.send_raw(Message::text(format!(
        r#"{{"type":"ping","id":"ok","p":"{pad}"}}"#
    )));
    assert_eq!(c.expect("pong")["id"], "ok");
    c.send_raw(Message::text(format!(
        r#"{{"type":"ping","p":"{}"}}"#,
        "x".repeat(2000)
    )));
    assert_eq!(c.expect_close().code, 1009);
    assert_eq!(other.request(json!({"type": "ping"}), "p")["type"], "pong");
}

#[test]
fn too_many_subscriptions_is_refused_and_the_rest_work() {
    let server = Server::start("[limits]\nmax_subscriptions = 3");
    let mut c = server.connect("t1", "alice");
    for conv in ["a", "b", "c"] {
        c.subscribe(conv);
    }
    c.subscribe("b"); // a repeat is not a new subscription
    let e = c.request(json!({"type": "subscribe", "conversationId": "d"}), "d");
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("too_many_subscriptions"))
    );
    c.request(json!({"type": "unsubscribe", "conversationId": "a"}), "ua");
    // From a's owner core: an event of a would arrive before it.
    let d = sentinel_for("t1", ("t1", "a"));
    c.subscribe(&d);
    server.publish_ok("t1", vec![updated("a", 0), updated(&d, 1)]);
    assert_eq!(c.recv(), updated(&d, 1));
}

#[test]
fn message_flood_is_dropped_with_rate_limited_then_closed_with_4008() {
    let server = Server::start("[limits]\nmsg_rate = 20.0\nmsg_burst = 5.0");
    let mut c = server.connect("t1", "alice");
    // Within the burst: all answered.
    for i in 0..5 {
        assert_eq!(
            c.request(json!({"type": "ping"}), &format!("b{i}"))["type"],
            "pong"
        );
    }
    // A flood: some dropped, one rate_limited error (at most one a second), then 4008 once the
    // connection has stayed over its limit for 5 s.
    let started = std::time::Instant::now();
    let mut errors = 0;
    let mut pongs = 0;
    let closed = loop {
        assert!(started.elapsed() < DEADLINE, "flood was never closed");
        c.ws.send(Message::text(r#"{"type":"ping"}"#)).unwrap();
        c.ws.get_ref().set_nonblocking(true).unwrap();
        let read = c.ws.read();
        c.ws.get_ref().set_nonblocking(false).unwrap();
        match read {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("error") => {
                        assert_eq!(v["code"], "rate_limited");
                        errors += 1;
                    }
                    Some("pong") => pongs += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
            Ok(Message::Close(Some(f))) => break u16::from(f.code),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(5)); // the flood's own pace, ~200/s
    };
    assert_eq!(closed, 4008);
    let secs = started.elapsed().as_secs_f64();
    assert!(secs >= 4.9, "closed after {secs:.1}s, before the 5 s grace");
    assert!(
        errors >= 2 && errors as f64 <= secs + 1.0,
        "{errors} rate_limited errors in {secs:.1}s"
    );
    assert!(pongs > 0, "events within the rate still got through");
    assert_eq!(server.metric("fanfare_rate_limit_closes_total"), 1);
}

#[test]
fn connection_attempts_over_the_per_ip_rate_get_429_with_retry_after() {
    let server = Server::start(
        "[server]\nshards = 2\n[limits]\nconnect_rate_per_ip = 0.5\nconnect_burst_per_ip = 4.0",
    );
    let t = token("t1", "u1", 60);
    let headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let statuses: Vec<HttpResponse> = (0..8)
        .map(|_| server.http("GET", &format!("/ws?token={t}"), &headers, b""))
        .collect();
    // Attempts arrive on both cores, yet the bucket is one per IP: exactly the burst passes.
    let codes: Vec<u16> = statuses.iter().map(|r| r.status).collect();
    assert_eq!(codes, vec![101, 101, 101, 101, 429, 429, 429, 429]);
    let limited = &statuses[4];
    assert_eq!(limited.json()["error"], "rate_limited");
    let retry = limited.retry_after_s();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // Rate limiting comes before JWT work: a garbage token is refused with 429, not 401.
    assert_eq!(
        server
            .http("GET", "/ws?token=garbage", &headers, b"")
            .status,
        429
    );
    assert_eq!(server.metric("fanfare_rejected_unauthorized_total"), 0);
    // Another address has its own bucket.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.2:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.connect(&server.addr.into()).unwrap();
    let stream: std::net::TcpStream = sock.into();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let request = tungstenite::client::IntoClientRequest::into_client_request(
        server.url(&format!("/ws?token={t}")),
    )
    .unwrap();
    assert!(
        tungstenite::client::client(request, stream).is_ok(),
        "127.0.0.2 is not limited by 127.0.0.1's bucket"
    );
}

#[test]
fn bad_api_keys_are_rate_limited_per_ip_even_when_a_key_is_then_right() {
    let server = Server::start(
        "[server]\nshards = 1\n[limits]\nconnect_rate_per_ip = 0.5\nconnect_burst_per_ip = 3.0",
    );
    let body = json!({"tenantId": "t1", "event": updated("c1", 1)}).to_string();
    let post = |key: &str| {
        let auth = format!("Bearer {key}");
        server.http(
            "POST",
            "/v1/publish",
            &[("Authorization", &auth)],
            body.as_bytes(),
        )
    };
    let codes: Vec<u16> = (0..5).map(|_| post("guess").status).collect();
    assert_eq!(codes, vec![401, 401, 401, 429, 429]);
    // Over the limit, the right key is refused too: a guess that hits cannot be told apart.
    let limited = post(API_KEY);
    assert_eq!(
        (limited.status, limited.json()["error"].as_str()),
        (429, Some("rate_limited"))
    );
    let retry = limited.retry_after_s();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // The presence API shares the key and the limit.
    let auth = format!("Bearer {API_KEY}");
    assert_eq!(
        server
            .http("GET", "/v1/presence/t1", &[("Authorization", &auth)], b"")
            .status,
        429
    );
    // Once a token is back, the right key works again.
    wait_for("the bad-key bucket to refill", || {
        (post(API_KEY).status == 202).then_some(())
    });
}
