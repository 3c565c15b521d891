//! CORS on the session endpoints for `server.allowed_origins`: a preflight from a listed
//! origin is answered, every answer to it (the event stream included) carries
//! `Access-Control-Allow-Origin`, and any other origin is refused with 403.
mod support;

use support::session::Sse;
use support::*;

const APP: &str = "https://app.example";

#[test]
fn a_listed_origin_gets_cors_answers_on_every_endpoint() {
    let server = Server::start(&format!("[server]\nallowed_origins = [\"{APP}\"]"));
    let preflight = server.http(
        "OPTIONS",
        "/v1/sessions",
        &[
            ("Origin", APP),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type",
            ),
        ],
        b"",
    );
    assert_eq!(preflight.status, 204, "{}", preflight.body);
    assert_eq!(preflight.header("Access-Control-Allow-Origin"), Some(APP));
    let methods = preflight.header("Access-Control-Allow-Methods").unwrap();
    for m in ["GET", "POST", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    let headers = preflight
        .header("Access-Control-Allow-Headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("authorization") && headers.contains("content-type"));

    let t = token("t1", "u1", 60);
    let origin = [("Origin", APP)];
    let created = server.http("POST", &format!("/v1/sessions?token={t}"), &origin, b"");
    assert_eq!(created.status, 201);
    assert_eq!(created.header("Access-Control-Allow-Origin"), Some(APP));
    let id = created.json()["sessionId"].as_str().unwrap().to_string();
    let path = |e: &str| format!("/v1/sessions/{id}/{e}?token={t}");
    let posted = server.http("POST", &path("events"), &origin, br#"{"type":"ping"}"#);
    assert_eq!(posted.status, 202);
    assert_eq!(posted.header("Access-Control-Allow-Origin"), Some(APP));
    let polled = server.http("GET", &path("poll"), &origin, b"");
    assert_eq!(polled.status, 200);
    assert_eq!(polled.header("Access-Control-Allow-Origin"), Some(APP));
    let (head, sse) = Sse::open(server.addr, &path("sse"), &origin);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Access-Control-Allow-Origin"), Some(APP));
    assert_eq!(sse.unwrap().event().1["type"], "session.ready");
    // Refusals carry it too, so that the page can read them.
    let refused = server.http("GET", &format!("/v1/sessions/{id}/poll"), &origin, b"");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("Access-Control-Allow-Origin"), Some(APP));
    let limited = server.http(
        "POST",
        &path("events"),
        &origin,
        &vec![b' '; 2 * 1024 * 1024],
    );
    assert_eq!(limited.status, 413);
    assert_eq!(limited.header("Access-Control-Allow-Origin"), Some(APP));
    // Without Origin (not a browser): no CORS headers.
    let plain = server.http("GET", &path("poll"), &[], b"");
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("Access-Control-Allow-Origin"), None);
}

#[test]
fn another_origin_is_refused_with_403_on_every_endpoint() {
    let server = Server::start(&format!("[server]\nallowed_origins = [\"{APP}\"]"));
    let s = server.session("t1", "u1");
    let evil = [("Origin", "https://evil.example")];
    let t = &s.token;
    for (method, path) in [
        ("OPTIONS", "/v1/sessions".to_string()),
        ("POST", format!("/v1/sessions?token={t}")),
        ("OPTIONS", s.path("poll")),
        ("GET", format!("{}?token={t}", s.path("poll"))),
        ("GET", format!("{}?token={t}", s.path("sse"))),
        ("POST", format!("{}?token={t}", s.path("events"))),
        ("DELETE", format!("{}?token={t}", s.path(""))),
    ] {
        let r = server.http(method, &path, &evil, b"");
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        assert_eq!(r.header("Access-Control-Allow-Origin"), None);
    }
    assert_eq!(s.poll(0).0[0]["type"], "session.ready", "the session lives");
}

#[test]
fn without_allowed_origins_every_origin_is_answered() {
    let server = Server::start("");
    let any = "https://anywhere.example";
    let t = token("t1", "u1", 60);
    let created = server.http(
        "POST",
        &format!("/v1/sessions?token={t}"),
        &[("Origin", any)],
        b"",
    );
    assert_eq!(created.status, 201);
    assert_eq!(created.header("Access-Control-Allow-Origin"), Some(any));
    assert_eq!(created.header("Vary"), Some("Origin"));
}
