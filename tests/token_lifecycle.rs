//! Token lifecycle on a live connection: expiry closes with 4001 after `token_expired`, unless
//! the client refreshed its token with `auth` first; a refresh moves the expiry either way.
mod support;

use std::time::Instant;

use serde_json::json;
use support::*;

fn short_token(user: &str, seconds: i64) -> (String, i64) {
    let exp = now_s() + seconds;
    (
        sign(&json!({"sub": user, "tid": "t1", "exp": exp}), SECRET),
        exp,
    )
}

/// A connection of `u1` whose token expires in `seconds`; returns it with the `exp` (seconds).
fn connect_for(server: &Server, seconds: i64) -> (Client, i64) {
    let (t, exp) = short_token("u1", seconds);
    let mut c = server.connect_raw(&format!("/ws?token={t}")).unwrap();
    c.expect("session.ready");
    (c, exp)
}

/// `c` is told `token_expired`, then closed with 4001, within 1.5 s after `exp` (seconds).
fn expect_expiry_at(c: &mut Client, exp: i64) {
    let e = c.expect("error");
    assert_eq!(e["code"], "token_expired");
    assert_eq!(c.expect_close().code, 4001);
    let late_ms = now_ms() - exp * 1000;
    assert!(
        (0..1500).contains(&late_ms),
        "closed {late_ms} ms after exp"
    );
}

#[test]
fn expiry_sends_token_expired_then_closes_with_4001() {
    let server = Server::start("");
    let (mut c, exp) = connect_for(&server, 2);
    expect_expiry_at(&mut c, exp);
}

#[test]
fn a_refresh_outlives_the_first_token() {
    let server = Server::start("");
    let (mut c, exp) = connect_for(&server, 2);
    let (fresh, _) = short_token("u1", 60);
    assert_eq!(
        c.request(json!({"type": "auth", "token": fresh}), "r")["type"],
        "ack"
    );
    // Past the first token's expiry (and the server's sweep), the connection still serves.
    wait_for("the first token to expire", || {
        (now_ms() > exp * 1000 + 800).then_some(())
    });
    assert_eq!(c.request(json!({"type": "ping"}), "alive")["type"], "pong");
}

#[test]
fn a_refresh_to_a_shorter_token_expires_with_it() {
    let server = Server::start("");
    let (mut c, _) = connect_for(&server, 3600);
    let (shorter, exp) = short_token("u1", 2);
    assert_eq!(
        c.request(json!({"type": "auth", "token": shorter}), "r")["type"],
        "ack"
    );
    expect_expiry_at(&mut c, exp);
}

#[test]
fn a_refresh_for_another_user_or_a_bad_token_is_refused() {
    let server = Server::start("");
    let (mut c, exp) = connect_for(&server, 2);
    let (other, _) = short_token("u2", 60);
    let e = c.request(json!({"type": "auth", "token": other}), "o");
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    let other_tenant = sign(
        &json!({"sub": "u1", "tid": "t2", "exp": now_s() + 60}),
        SECRET,
    );
    assert_eq!(
        c.request(json!({"type": "auth", "token": other_tenant}), "t")["code"],
        "forbidden"
    );
    let forged = sign(
        &json!({"sub": "u1", "tid": "t1", "exp": now_s() + 60}),
        "wrong-secret",
    );
    assert_eq!(
        c.request(json!({"type": "auth", "token": forged}), "f")["code"],
        "unauthorized"
    );
    // The original expiry still holds.
    let started = Instant::now();
    assert_eq!(c.expect("error")["code"], "token_expired");
    assert_eq!(c.expect_close().code, 4001);
    assert!(
        now_ms() >= exp * 1000,
        "closed early ({:?} after the refusals)",
        started.elapsed()
    );
}
