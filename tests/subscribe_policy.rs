//! Private conversations: with `auth.subscribe_policy = "token"` every subscribe carries a
//! subscription token for that user, tenant and conversation, or is `forbidden` and gets no
//! event; on WebSocket connections and HTTP sessions alike.
mod support;

use serde_json::{json, Value};
use support::*;

const POLICY: &str = "[auth]\nsubscribe_policy = \"token\"\n";

/// A subscription token with these claims (and an hour of life unless `exp` is given).
fn grant(claims: Value) -> String {
    let mut all = json!({"sub": "u1", "tid": "t1", "cid": "c1", "exp": now_s() + 3600});
    for (k, v) in claims.as_object().unwrap() {
        all[k] = v.clone();
    }
    all.as_object_mut().unwrap().retain(|_, v| !v.is_null());
    sign(&all, SECRET)
}

fn subscribe(c: &mut Client, conversation: &str, token: Option<&str>) -> Value {
    let mut event = json!({"type": "subscribe", "conversationId": conversation});
    if let Some(token) = token {
        event["token"] = json!(token);
    }
    c.request(event, "s")
}

#[test]
fn each_bad_subscription_token_is_forbidden_and_gets_no_event() {
    let server = Server::start(POLICY);
    let mut c = server.connect("t1", "u1");
    let expired = grant(json!({"exp": now_s() - 10}));
    let other_key = sign(
        &json!({"sub": "u1", "tid": "t1", "cid": "c1", "exp": now_s() + 60}),
        "another-secret",
    );
    let cases: [(&str, Option<String>, &str); 8] = [
        ("missing", None, "missing token"),
        ("expired", Some(expired), "expired"),
        ("signed with another key", Some(other_key), "signature"),
        ("another user's", Some(grant(json!({"sub": "u2"}))), "sub"),
        (
            "another tenant's",
            Some(grant(json!({"tid": "t2"}))),
            "tenant",
        ),
        (
            "another conversation's",
            Some(grant(json!({"cid": "c2"}))),
            "cid",
        ),
        (
            "without cid (a connection token)",
            Some(token("t1", "u1", 60)),
            "cid",
        ),
        ("not a token", Some("abc.def.ghi".into()), "malformed"),
    ];
    for (case, token, reason) in &cases {
        let e = subscribe(&mut c, "c1", token.as_deref());
        assert_eq!(e["code"], "forbidden", "{case}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(reason),
            "{case}: {e}"
        );
    }
    // None of them subscribed: an event of c1, then one of a conversation the client may see
    // by the same route (the same owner core), prove it.
    let open = sentinel_for("t1", ("t1", "c1"));
    let good = grant(json!({"cid": open}));
    assert_eq!(subscribe(&mut c, &open, Some(&good))["type"], "ack");
    server.publish_ok("t1", vec![updated("c1", 0)]);
    server.publish_ok("t1", vec![updated(&open, 1)]);
    assert_eq!(
        c.recv(),
        updated(&open, 1),
        "c1's event reached a refused subscriber"
    );
}

#[test]
fn a_good_token_subscribes_and_every_subscribe_needs_one() {
    let server = Server::start(POLICY);
    let mut c = server.connect("t1", "u1");
    let good = grant(json!({}));
    assert_eq!(subscribe(&mut c, "c1", Some(&good))["type"], "ack");
    server.publish_ok("t1", vec![updated("c1", 0)]);
    assert_eq!(c.recv(), updated("c1", 0));
    // A repeated subscribe without a token is refused, and the subscription stays.
    assert_eq!(subscribe(&mut c, "c1", None)["code"], "forbidden");
    assert_eq!(subscribe(&mut c, "c1", Some(&good))["type"], "ack");
    server.publish_ok("t1", vec![updated("c1", 1)]);
    assert_eq!(c.recv(), updated("c1", 1));
    // Typing still needs the subscription, not a token.
    let typing = json!({"type": "presence.activity", "activity": "typing", "conversationId": "c2"});
    assert_eq!(c.request(typing, "t")["code"], "forbidden");
}

#[test]
fn an_http_session_obeys_the_same_rule() {
    let server = Server::start(POLICY);
    let s = server.session("t1", "u1");
    s.post_ok(&json!([
        {"type": "subscribe", "conversationId": "c1", "id": "bad"},
        {"type": "subscribe", "conversationId": "c1", "id": "good", "token": grant(json!({}))},
    ]));
    let mut cursor = 0;
    let answers = s.poll_until(&mut cursor, 3);
    assert_eq!(
        (answers[1]["id"].as_str(), answers[1]["code"].as_str()),
        (Some("bad"), Some("forbidden")),
        "{answers:?}"
    );
    assert_eq!(answers[2], json!({"type": "ack", "id": "good"}));
}

#[test]
fn a_subscription_token_obeys_the_audience_and_issuer_rules() {
    let server = Server::start(&format!(
        "{POLICY}audience = \"app\"\nissuer = \"backend\"\n"
    ));
    let connection =
        json!({"sub": "u1", "tid": "t1", "exp": now_s() + 60, "aud": "app", "iss": "backend"});
    let url = server.url(&format!("/ws?token={}", sign(&connection, SECRET)));
    let mut c = connect_at(server.addr, &url, &[]).expect("connect");
    c.expect("session.ready");
    for (claims, reason) in [
        (json!({"iss": "backend"}), "audience"),
        (json!({"aud": "app"}), "issuer"),
        (json!({"aud": "other", "iss": "backend"}), "audience"),
    ] {
        let e = subscribe(&mut c, "c1", Some(&grant(claims.clone())));
        assert_eq!(e["code"], "forbidden", "{claims}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(reason),
            "{claims}: {e}"
        );
    }
    let good = grant(json!({"aud": "app", "iss": "backend"}));
    assert_eq!(subscribe(&mut c, "c1", Some(&good))["type"], "ack");
}

#[test]
fn the_tenant_policy_needs_no_token() {
    let server = Server::start("");
    let mut c = server.connect("t1", "u1");
    assert_eq!(subscribe(&mut c, "c1", None)["type"], "ack");
}

#[test]
fn fanfare_token_mints_a_subscription_token() {
    let config = TempFile::new(&base_config(POLICY));
    let mint = |conversation: &str| {
        std::process::Command::new(bin())
            .args([
                "token",
                "--tenant",
                "t1",
                "--user",
                "u1",
                "--conversation",
                conversation,
            ])
            .arg("--config")
            .arg(&config.0)
            .output()
            .unwrap()
    };
    let out = mint("c1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted = String::from_utf8(out.stdout).unwrap();
    let server = Server::start(POLICY);
    let mut c = server.connect("t1", "u1");
    assert_eq!(subscribe(&mut c, "c1", Some(minted.trim()))["type"], "ack");
    assert_eq!(
        subscribe(&mut c, "c2", Some(minted.trim()))["code"],
        "forbidden"
    );
    let bad = mint("a b");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("conversation"));
}
