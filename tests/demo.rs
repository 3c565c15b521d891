//! The development demo (`/demo`, its token and say endpoints): there on the embedded
//! defaults, a chat that works end to end, and absent once a real secret is configured.
mod support;

use support::*;

#[test]
fn on_the_embedded_defaults_the_demo_page_tokens_and_messages_work() {
    let server = Server::start_embedded();
    let page = server.http("GET", "/demo", &[], b"");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/html"));
    assert!(page.body.contains("Fanfare demo") && page.body.contains("development secret"));
    // The log says where.
    server.wait_for_line("the demo page's log line", |l| l.contains("/demo"));
    let token = server.http("GET", "/demo/token?user=alice", &[], b"");
    assert_eq!(token.status, 200, "{}", token.body);
    let mut alice = connect_at(
        server.addr,
        &server.url(&format!("/ws?token={}", token.body)),
        &[],
    )
    .expect("the demo token opens a connection");
    let ready = alice.expect("session.ready");
    assert_eq!(
        (ready["tenantId"].as_str(), ready["userId"].as_str()),
        (Some("demo"), Some("alice"))
    );
    alice.subscribe("lobby");
    let said = server.http(
        "POST",
        "/demo/say?user=alice",
        &[],
        "hé \"there\"".as_bytes(),
    );
    assert_eq!(said.status, 202, "{}", said.body);
    let message = alice.expect("message.received");
    assert_eq!(
        (message["userId"].as_str(), message["text"].as_str()),
        (Some("alice"), Some("hé \"there\""))
    );
    for bad in ["/demo/token?user=a%20b", "/demo/token"] {
        assert_eq!(server.http("GET", bad, &[], b"").status, 400, "{bad}");
    }
    assert_eq!(
        server
            .http("GET", "/demo/client/../Cargo.toml", &[], b"")
            .status,
        404
    );
}

#[test]
fn with_a_real_secret_there_is_no_demo() {
    let server = Server::start("");
    for (method, path) in [
        ("GET", "/demo"),
        ("GET", "/demo/token?user=alice"),
        ("POST", "/demo/say?user=a"),
    ] {
        assert_eq!(
            server.http(method, path, &[], b"").status,
            404,
            "{method} {path}"
        );
    }
}
