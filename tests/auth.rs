//! Authentication at the upgrade: every bad token is refused with 401 before any upgrade.
mod support;

use serde_json::{json, Value};
use support::*;

fn refused(server: &Server, query: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut all = vec![
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    all.extend_from_slice(headers);
    server.http("GET", &format!("/ws{query}"), &all, b"")
}

fn assert_401(server: &Server, token: &str, why: &str) {
    let r = refused(server, &format!("?token={token}"), &[]);
    assert_eq!(r.status, 401, "{why}: {}", r.body);
    let body = r.json();
    assert_eq!(body["error"], "unauthorized", "{why}");
    assert!(
        body["reason"].as_str().is_some_and(|s| !s.is_empty()),
        "{why}: {body}"
    );
}

#[test]
fn every_bad_token_gets_401_with_a_reason() {
    let server = Server::start("");
    let now = now_s();
    let claims = |extra: Value| {
        let mut c = json!({"sub": "u1", "tid": "t1", "exp": now + 60});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let cases = [
        (sign(&claims(json!({"exp": now - 10})), SECRET), "expired"),
        (sign(&claims(json!({"nbf": now + 600})), SECRET), "not yet valid"),
        (sign(&claims(json!({})), "some-other-secret"), "wrong signature"),
        (sign(&claims(json!({"exp": null})), SECRET), "no exp"),
        (sign(&claims(json!({"sub": null})), SECRET), "no sub"),
        (sign(&claims(json!({"tid": null})), SECRET), "no tenant"),
        (sign(&claims(json!({"sub": "has space"})), SECRET), "sub breaks the ID pattern"),
        (sign(&claims(json!({"tid": "a:b"})), SECRET), "tid breaks the ID pattern"),
        ("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsInRpZCI6InQxIiwiZXhwIjo0MTAyNDQ0ODAwfQ.".to_string(), "alg none"),
        ("garbage".to_string(), "not a JWT"),
        (String::new(), "empty"),
    ];
    for (token, why) in &cases {
        assert_401(&server, token, why);
    }
    let r = refused(&server, "", &[]);
    assert_eq!(
        (r.status, r.json()["reason"].as_str()),
        (401, Some("missing token"))
    );
    assert_eq!(
        server.metric("fanfare_rejected_unauthorized_total"),
        cases.len() as u64 + 1
    );
    assert_eq!(server.metric("fanfare_connections_open"), 0);
}

#[test]
fn bearer_header_works_for_non_browser_clients() {
    let server = Server::start("");
    let bearer = format!("Bearer {}", token("t1", "u1", 60));
    let mut c = connect_at(
        server.addr,
        &server.url("/ws"),
        &[("Authorization", &bearer)],
    )
    .expect("upgrade with bearer");
    assert_eq!(c.recv()["userId"], "u1");
}

#[test]
fn tokens_never_reach_the_logs() {
    let server = Server::start("");
    let good = token("t1", "u1", 60);
    let _c = server.connect_raw(&format!("/ws?token={good}")).unwrap();
    let expired = sign(
        &json!({"sub": "u1", "tid": "t1", "exp": now_s() - 5}),
        SECRET,
    );
    assert_401(&server, &expired, "expired");
    // The good connection's line and the refusal's, in either order (two cores may log them).
    server.wait_for_line("the auth failure log line", |l| {
        l.contains("connection refused")
            && l.contains("token expired")
            && l.contains("token=[redacted]")
    });
    server.wait_for_line("the connect line", |l| {
        l.contains("connect") && l.contains("user=u1")
    });
    let logs = server.logs();
    for line in &logs {
        assert!(
            !line.contains(&good) && !line.contains(&expired),
            "token leaked into: {line}"
        );
    }
}

#[test]
fn origin_allow_list() {
    let server = Server::start("[server]\nallowed_origins = [\"https://app.example\"]");
    let t = format!("?token={}", token("t1", "u1", 60));
    let r = refused(&server, &t, &[("Origin", "https://evil.example")]);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("forbidden"))
    );
    let url = server.url(&format!("/ws{t}"));
    assert!(connect_at(server.addr, &url, &[("Origin", "https://app.example")]).is_ok());
    assert!(
        connect_at(server.addr, &url, &[]).is_ok(),
        "no Origin: not a browser, passes"
    );
}

#[test]
fn configured_audience_and_issuer_are_required() {
    let server = Server::start("[auth]\naudience = \"chat\"\nissuer = \"idp\"");
    let exp = now_s() + 60;
    assert_401(
        &server,
        &sign(&json!({"sub": "u", "tid": "t", "exp": exp}), SECRET),
        "no aud/iss",
    );
    assert_401(
        &server,
        &sign(
            &json!({"sub": "u", "tid": "t", "exp": exp, "aud": "other", "iss": "idp"}),
            SECRET,
        ),
        "wrong aud",
    );
    let good = sign(
        &json!({"sub": "u", "tid": "t", "exp": exp, "aud": "chat", "iss": "idp"}),
        SECRET,
    );
    assert!(server.connect_raw(&format!("/ws?token={good}")).is_ok());
}

#[test]
fn rs256_and_es256_with_pem_keys_and_no_confusion() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let server = Server::start(&format!(
        "[auth]\nhs256_secret = \"\"\nrs256_public_key_file = \"{dir}/tests/keys/rs256.pub.pem\"\nes256_public_key_file = \"{dir}/tests/keys/es256.pub.pem\""
    ));
    let claims = json!({"sub": "u1", "tid": "t1", "exp": now_s() + 60});
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let rs = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&std::fs::read(format!("{dir}/tests/keys/rs256.pem")).unwrap())
            .unwrap(),
    )
    .unwrap();
    let es = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&std::fs::read(format!("{dir}/tests/keys/es256.pem")).unwrap())
            .unwrap(),
    )
    .unwrap();
    for t in [rs, es] {
        let mut c = server
            .connect_raw(&format!("/ws?token={t}"))
            .expect("PEM-signed token");
        assert_eq!(c.recv()["userId"], "u1");
    }
    // HS256 is not configured here; signing with the public key as an HMAC secret must fail.
    let public = std::fs::read_to_string(format!("{dir}/tests/keys/rs256.pub.pem")).unwrap();
    assert_401(&server, &sign(&claims, &public), "algorithm confusion");
    assert_401(&server, &sign(&claims, SECRET), "HS256 not configured");
}
