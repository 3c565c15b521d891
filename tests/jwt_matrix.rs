//! Hostile tokens: a matrix of forged, malformed and borderline JWTs against a server with
//! HS256 and RS256 keys, an audience, an issuer and a leeway. Every bad one is refused before
//! the upgrade with its reason, in the answer and in the log, and no token — a canary among
//! them — ever appears in the log (at trace level), the metrics or an answer.
mod support;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;

const LEEWAY_S: i64 = 30;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Claims that pass, with `extra` changed (a `null` removes a claim).
fn claims(extra: Value) -> Value {
    let mut c =
        json!({"sub": "u1", "tid": "t1", "exp": now_s() + 60, "aud": "app", "iss": "backend"});
    for (k, v) in extra.as_object().unwrap() {
        match v {
            Value::Null => _ = c.as_object_mut().unwrap().remove(k),
            v => c[k] = v.clone(),
        }
    }
    c
}

fn hs(claims: &Value) -> String {
    sign(claims, SECRET)
}

fn rs(claims: &Value, header: Header) -> String {
    let pem = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/rs256.pem")).unwrap();
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

/// A token of these raw header and payload JSON texts, signed as HS256 with the secret.
fn hs_raw(header: &str, payload: &str) -> String {
    let body = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(body.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{body}.{signature}")
}

fn upgrade(server: &Server, token: &str) -> HttpResponse {
    let headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    server.http("GET", &format!("/ws?token={token}"), &headers, b"")
}

#[test]
fn every_hostile_token_is_refused_before_the_upgrade_and_none_is_ever_printed() {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
    let server = Server::start(&format!(
        "[auth]\nrs256_public_key_file = \"{keys}/rs256.pub.pem\"\naudience = \"app\"\nissuer = \"backend\"\n\
         leeway_ms = {}\n[log]\nlevel = \"trace\"\n",
        LEEWAY_S * 1000
    ));
    let now = now_s();
    let public = std::fs::read_to_string(format!("{keys}/rs256.pub.pem")).unwrap();
    let good_body = b64(claims(json!({})).to_string().as_bytes());
    let hs_header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    let mut kid = Header::new(Algorithm::HS256);
    kid.kid = Some("no-such-key".into());
    let other_rsa = {
        // Signed with the ES256 test key but claiming RS256: a key that is not the server's.
        let pem = std::fs::read(format!("{keys}/es256.pem")).unwrap();
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims(json!({})),
            &EncodingKey::from_ec_pem(&pem).unwrap(),
        )
        .unwrap()
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("{}.{good_body}.", b64(br#"{"alg":"none","typ":"JWT"}"#)),
            "alg none",
            "algorithm",
        ),
        (
            format!("{}.{good_body}.", b64(br#"{"alg":"NONE"}"#)),
            "alg NONE",
            "algorithm",
        ),
        (
            sign(&claims(json!({})), &public),
            "HS256 with the RS256 public key as secret",
            "signature",
        ),
        (
            {
                let t = hs(&claims(json!({})));
                let parts: Vec<&str> = t.split('.').collect();
                format!(
                    "{}.{}.{}",
                    b64(br#"{"alg":"RS256","typ":"JWT"}"#),
                    parts[1],
                    parts[2]
                )
            },
            "RS256 header over an HS256 signature",
            "signature",
        ),
        (
            other_rsa,
            "ES256, a key the server does not have",
            "algorithm",
        ),
        (
            jsonwebtoken::encode(
                &kid,
                &claims(json!({})),
                &EncodingKey::from_secret(b"another"),
            )
            .unwrap(),
            "an unknown kid, another key",
            "signature",
        ),
        (
            hs(&claims(json!({"aud": "other"}))),
            "wrong aud",
            "audience",
        ),
        (hs(&claims(json!({"aud": null}))), "no aud", "audience"),
        (hs(&claims(json!({"iss": "other"}))), "wrong iss", "issuer"),
        (hs(&claims(json!({"iss": null}))), "no iss", "issuer"),
        (
            hs(&claims(json!({"exp": now - LEEWAY_S - 5}))),
            "exp past the leeway",
            "expired",
        ),
        (
            hs(&claims(json!({"nbf": now + LEEWAY_S + 5}))),
            "nbf past the leeway",
            "not yet valid",
        ),
        (hs(&claims(json!({"exp": null}))), "no exp", "exp"),
        (hs(&claims(json!({"sub": null}))), "no sub", "sub"),
        (hs(&claims(json!({"tid": null}))), "no tid", "tenant"),
        (hs(&claims(json!({"sub": 123}))), "a number for sub", "sub"),
        (
            hs(&claims(json!({"tid": true}))),
            "a boolean for tid",
            "tenant",
        ),
        (
            hs(&claims(json!({"exp": "soon"}))),
            "a string for exp",
            "exp",
        ),
        (
            hs_raw(
                r#"{"alg":"HS256"}"#,
                r#"{"sub":"u1","tid":"t1","aud":"app","iss":"backend","exp":1e400}"#,
            ),
            "exp overflowing a number",
            "malformed",
        ),
        (
            format!("{hs_header}.{good_body}!!.c2ln"),
            "bad base64 in the payload",
            "signature",
        ),
        (
            {
                let t = hs(&claims(json!({})));
                format!("{}*", &t[..t.len() - 1])
            },
            "bad base64 in the signature",
            "malformed",
        ),
        (format!("{hs_header}.{good_body}"), "two parts", "malformed"),
        (
            format!("{hs_header}.{good_body}."),
            "an empty signature",
            "signature",
        ),
        (
            hs(&claims(json!({"sub": "a b"}))),
            "sub breaking the ID pattern",
            "sub",
        ),
    ];
    assert!(cases.len() >= 20);
    for (token, case, reason) in &cases {
        let r = upgrade(&server, token);
        assert_eq!(r.status, 401, "{case}: {}", r.body);
        let why = r.json()["reason"].as_str().unwrap_or_default().to_string();
        assert!(why.contains(reason), "{case}: the reason is {why:?}");
        server.wait_for_line(&format!("{case}'s log line"), |l| {
            l.contains("connection refused") && l.contains(&why)
        });
    }
    // Borderline ones that are good: inside the leeway.
    for (extra, case) in [
        (json!({"exp": now - LEEWAY_S / 2}), "exp inside the leeway"),
        (json!({"nbf": now + LEEWAY_S / 2}), "nbf inside the leeway"),
    ] {
        let mut c = server
            .connect_raw(&format!("/ws?token={}", hs(&claims(extra))))
            .expect(case);
        assert_eq!(c.expect("session.ready")["userId"], "u1", "{case}");
    }
    // A 100 KiB token: the head is over its bound, refused before any token work.
    let huge = format!("{hs_header}.{}.{}", "A".repeat(100 * 1024), "c2ln");
    assert_eq!(upgrade(&server, &huge).status, 431);
    // The canary: a good token, used, then looked for everywhere.
    let canary = rs(
        &claims(json!({"sub": "canary"})),
        Header::new(Algorithm::RS256),
    );
    let mut c = server
        .connect_raw(&format!("/ws?token={canary}"))
        .expect("the canary connects");
    c.expect("session.ready");
    let answers: Vec<String> = cases
        .iter()
        .map(|(t, ..)| upgrade(&server, t).body)
        .collect();
    let metrics = server.http("GET", "/metrics", &[], b"").body;
    server.wait_for_line("the canary's connect line", |l| l.contains("user=canary"));
    let logs = server.logs();
    for token in cases
        .iter()
        .map(|(t, ..)| t.as_str())
        .chain([canary.as_str()])
    {
        // The signature part is what would leak (the others also appear as claims' values).
        let secret_part = token
            .rsplit('.')
            .next()
            .filter(|s| s.len() > 8)
            .unwrap_or(token);
        for (place, text) in [("metrics", &metrics)]
            .into_iter()
            .chain(logs.iter().map(|l| ("log", l)))
            .chain(answers.iter().map(|a| ("answer", a)))
        {
            assert!(
                !text.contains(secret_part),
                "a token reached the {place}: {text}"
            );
        }
    }
}
