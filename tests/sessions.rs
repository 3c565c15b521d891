//! HTTP fallback sessions, their lifecycle: create (token in the query or as Bearer),
//! `session.ready` first, the 401/403/404/405 rules, `DELETE`, the TTL with nothing attached,
//! token expiry, and a session served whichever core a request reaches.
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::session::Session;
use support::*;

#[test]
fn a_session_starts_with_session_ready_and_answers_its_events_in_order() {
    let server = Server::start("");
    let s = server.session("t1", "u1");
    let (events, cursor) = s.poll(0);
    let ready = &events[0];
    assert_eq!(ready["type"], "session.ready", "{events:?}");
    assert_eq!(ready["connectionId"], s.id.as_str());
    assert_eq!(
        (ready["userId"].as_str(), ready["tenantId"].as_str()),
        (Some("u1"), Some("t1"))
    );
    assert_eq!(cursor, 1);
    s.post_ok(&json!([
        {"type": "subscribe", "conversationId": "c1", "id": "a"},
        {"type": "ping", "id": "b"},
        {"type": "presence.query", "id": "c"}
    ]));
    s.post_ok(&json!({"type": "unsubscribe", "conversationId": "c1", "id": "d"}));
    let mut cursor = cursor;
    let answers = s.poll_until(&mut cursor, 4);
    let ids: Vec<_> = answers.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b", "c", "d"], "{answers:?}");
    assert_eq!(answers[1]["type"], "pong");
    assert_eq!(answers[2]["type"], "presence.snapshot");
    assert_eq!(answers[2]["userIds"], json!(["u1"]));
}

#[test]
fn a_bearer_token_creates_a_session_and_bad_tokens_get_401() {
    let server = Server::start("");
    let auth = format!("Bearer {}", token("t1", "u1", 60));
    let r = server.http("POST", "/v1/sessions", &[("Authorization", &auth)], b"");
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(r.json()["sessionId"].as_str().is_some());
    assert_eq!(r.json()["heartbeatMs"], 30000);

    let expired = token("t1", "u1", -60);
    for path in [
        "/v1/sessions".to_string(),
        format!("/v1/sessions?token={expired}"),
        "/v1/sessions?token=garbage".to_string(),
    ] {
        let r = server.http("POST", &path, &[], b"");
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert_eq!(r.json()["error"], "unauthorized");
    }
    assert_eq!(server.metric("fanfare_sessions_total"), 1);
}

/// Checks that every endpoint of `s` answers `status` with `error`.
fn every_endpoint_answers(s: &Session, status: u16, error: &str, when: &str) {
    for (method, endpoint, body) in [
        ("GET", "poll", ""),
        ("GET", "sse", ""),
        ("POST", "events", r#"{"type":"ping"}"#),
        ("DELETE", "", ""),
    ] {
        let r = s.request(method, &s.path(endpoint), body.as_bytes());
        assert_eq!(r.status, status, "{method} {endpoint} {when}: {}", r.body);
        assert_eq!(r.json()["error"], error);
    }
}

#[test]
fn another_users_or_tenants_token_gets_403_and_unknown_sessions_404() {
    let server = Server::start("");
    let s = server.session("t1", "u1");
    for (tenant, user) in [("t1", "u2"), ("t2", "u1")] {
        let other = Session {
            token: token(tenant, user, 60),
            ..s.at(s.addr)
        };
        let when = format!("as {tenant}/{user}");
        every_endpoint_answers(&other, 403, "forbidden", &when);
    }
    let bad = Session {
        token: "garbage".into(),
        ..s.at(s.addr)
    };
    assert_eq!(bad.request("GET", &bad.path("poll"), b"").status, 401);
    // Unknown ids, malformed ones, and ids of another instance.
    let unknown = s.id.rsplit_once('-').unwrap().0.to_string() + "-ffff";
    for id in [unknown.as_str(), "nope", "0000000000000000-1", "x-zz"] {
        let other = Session {
            id: id.to_string(),
            ..s.at(s.addr)
        };
        every_endpoint_answers(&other, 404, "not_found", &format!("of {id}"));
    }
    let r = s.request("PUT", &s.path("poll"), b"");
    assert_eq!(r.status, 405, "{}", r.body);
    let r = s.request("GET", &s.path("nothing-here"), b"");
    assert_eq!(r.status, 404, "{}", r.body);
    // The session itself still serves its owner.
    assert_eq!(s.poll(0).0[0]["type"], "session.ready");
}

#[test]
fn delete_ends_the_session_everywhere_and_its_stream() {
    let server = Server::start("");
    let s = server.session("t1", "u1");
    let mut sse = s.sse(None);
    sse.expect("session.ready");
    let r = s.delete();
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(r.body.is_empty());
    sse.until_end();
    every_endpoint_answers(&s, 404, "not_found", "after DELETE");
    // Gone while its stream was attached: it counts as open nowhere, not as detached.
    for transport in ["sse", "poll", "none"] {
        let gauge = format!("fanfare_sessions_open{{transport=\"{transport}\"}}");
        assert_eq!(server.metric(&gauge), 0, "{gauge}");
    }
}

#[test]
fn a_session_with_nothing_attached_ends_after_its_ttl() {
    let server = Server::start("[fallback]\nsession_ttl_ms = 600\npoll_timeout_ms = 300");
    let idle = server.session("t1", "idle");
    let polled = server.session("t1", "polled");
    let created = Instant::now();
    // A long-poll is attached while it waits; the TTL counts from its answer.
    let mut cursor = 0;
    while created.elapsed() < Duration::from_millis(1500) {
        cursor = polled.poll(cursor).1;
    }
    wait_for("the idle session to end", || {
        (idle.request("GET", &idle.path("poll"), b"").status == 404).then_some(())
    });
    assert!(
        created.elapsed() >= Duration::from_millis(600),
        "ended after {:?}",
        created.elapsed()
    );
    assert_eq!(polled.poll(cursor).1, cursor, "the polled one lives");
    assert_eq!(server.metric("fanfare_session_expiries_total"), 1);
    // Posting events is not being attached.
    wait_for("the polled session to end once nothing polls", || {
        let r = polled.post(&json!({"type": "ping"}));
        (r.status == 404).then_some(())
    });
    assert_eq!(server.metric("fanfare_session_expiries_total"), 2);
    assert_eq!(
        server.metric("fanfare_sessions_open{transport=\"none\"}"),
        0
    );
}

#[test]
fn token_expiry_sends_token_expired_then_ends_the_session() {
    let server = Server::start("");
    let exp = now_s() + 2;
    let t = sign(&json!({"sub": "u1", "tid": "t1", "exp": exp}), SECRET);
    let s = Session::create(server.addr, &t);
    let mut sse = s.sse(None);
    sse.expect("session.ready");
    let (_, e) = sse.expect("error");
    assert_eq!(e["code"], "token_expired");
    assert!(sse.until_end().is_empty(), "nothing after token_expired");
    let late_ms = now_ms() - exp * 1000;
    assert!((0..1500).contains(&late_ms), "ended {late_ms} ms after exp");
    assert_eq!(
        s.request("GET", &s.path("poll"), b"").status,
        401,
        "its token is expired"
    );
    let fresh = Session {
        token: token("t1", "u1", 60),
        ..s.at(s.addr)
    };
    assert_eq!(fresh.request("GET", &fresh.path("poll"), b"").status, 404);
}

#[test]
fn auth_refreshes_the_sessions_token() {
    let server = Server::start("");
    let exp = now_s() + 2;
    let t = sign(&json!({"sub": "u1", "tid": "t1", "exp": exp}), SECRET);
    let s = Session::create(server.addr, &t);
    let s = Session {
        token: token("t1", "u1", 60),
        ..s
    };
    s.post_ok(&json!({"type": "auth", "token": s.token, "id": "r"}));
    let other = token("t1", "u2", 60);
    s.post_ok(&json!({"type": "auth", "token": other, "id": "x"}));
    let mut cursor = 0;
    let answers = s.poll_until(&mut cursor, 3);
    assert_eq!(answers[1], json!({"type": "ack", "id": "r"}));
    assert_eq!(answers[2]["code"], "forbidden", "{answers:?}");
    wait_for("the first token to expire", || {
        (now_ms() > exp * 1000 + 800).then_some(())
    });
    s.post_ok(&json!({"type": "ping", "id": "alive"}));
    let answers = s.poll_until(&mut cursor, 1);
    assert_eq!(answers[0], json!({"type": "pong", "id": "alive"}));
}

#[test]
fn every_request_reaches_its_session_whichever_core_accepts_it() {
    let server = Server::start("[server]\nshards = 2");
    let sessions: Vec<Session> = (0..4)
        .map(|i| server.session("t1", &format!("u{i}")))
        .collect();
    // Each request is a new connection: the kernel spreads them over both cores.
    for round in 0..8 {
        for s in &sessions {
            s.post_ok(&json!({"type": "ping", "id": format!("p{round}")}));
        }
    }
    for s in &sessions {
        let mut cursor = 1;
        let pongs = s.poll_until(&mut cursor, 8);
        let ids: Vec<_> = pongs.iter().map(|p| p["id"].as_str().unwrap()).collect();
        assert_eq!(ids, (0..8).map(|r| format!("p{r}")).collect::<Vec<_>>());
    }
    assert!(
        server.metric("fanfare_session_handovers_total") > 0,
        "some requests reached the other core and were handed over"
    );
}
