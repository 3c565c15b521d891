//! No sticky sessions: with the Redis broker, every session endpoint works on any instance.
//! Create on one, post on a second, stream and poll on a third, publish anywhere; the same
//! answers, events and order as at home. A home that does not answer gets `503` with
//! `Retry-After`; once it is dead its sessions answer `404` everywhere and its users go
//! offline. Three instances on one real `redis-server`.
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::session::Sse;
use support::*;

fn instance(redis: &Redis, extra: &str) -> Server {
    let server = Server::start(&format!(
        "[server]\nshards = 2\nrequest_timeout_ms = 1000\n[broker]\nkind = \"redis\"\nredis_url = \"{}\"\ninstance_ttl_ms = 1000\nsubscribe_timeout_ms = 1000\n[presence]\noffline_grace_ms = 300\n{extra}",
        redis.url()
    ));
    wait_for("readyz 200", || {
        (server.http("GET", "/readyz", &[], b"").status == 200).then_some(())
    });
    server
}

#[test]
fn a_session_created_on_one_instance_is_served_by_every_other() {
    let redis = Redis::start();
    let (a, b, c) = (
        instance(&redis, ""),
        instance(&redis, ""),
        instance(&redis, ""),
    );
    let home = a.session("t1", "u1");
    let on_b = home.at(b.addr);
    let on_c = home.at(c.addr);
    let mut sse = on_c.sse(None);
    let (id, ready) = sse.expect("session.ready");
    assert_eq!(
        (id, ready["connectionId"].as_str()),
        (Some(1), Some(home.id.as_str()))
    );
    on_b.post_ok(&json!({"type": "subscribe", "conversationId": "c1", "id": "s"}));
    assert_eq!(sse.event(), (Some(2), json!({"type": "ack", "id": "s"})));
    // Events published on every instance arrive in order, then answers.
    for seq in 0..30 {
        [&a, &b, &c][seq % 3].publish_ok("t1", vec![updated("c1", seq)]);
    }
    for seq in 0..30 {
        assert_eq!(sse.event(), (Some(3 + seq as u64), updated("c1", seq)));
    }
    on_b.post_ok(&json!([{"type": "ping", "id": "p"}, {"type": "presence.query", "id": "q"}]));
    assert_eq!(sse.event(), (Some(33), json!({"type": "pong", "id": "p"})));
    let (_, snap) = sse.expect("presence.snapshot");
    assert_eq!(snap["userIds"], json!(["u1"]));
    // A resume on yet another instance, and a poll on a third.
    drop(sse);
    let mut resumed = home.at(b.addr).sse(Some("32"));
    assert_eq!(
        resumed.event(),
        (Some(33), json!({"type": "pong", "id": "p"}))
    );
    drop(resumed);
    let (events, cursor) = on_c.poll(33);
    assert_eq!(events[0]["type"], "presence.snapshot");
    assert_eq!(cursor, 34);
    // The 4xx rules hold everywhere.
    let other = support::session::Session {
        token: token("t1", "u2", 60),
        ..home.at(b.addr)
    };
    assert_eq!(other.request("GET", &other.path("poll"), b"").status, 403);
    let bad = on_c.request("GET", &format!("{}?cursor=x", on_c.path("poll")), b"");
    assert_eq!(bad.status, 400, "{}", bad.body);
    let r = on_b.request("POST", &on_b.path("events"), b"[]");
    assert_eq!(r.status, 400);
    // DELETE anywhere ends it everywhere.
    assert_eq!(on_b.delete().status, 204);
    for s in [&home, &on_b, &on_c] {
        assert_eq!(s.request("GET", &s.path("poll"), b"").status, 404);
    }
}

#[test]
fn a_forwarded_long_poll_waits_and_answers_when_an_event_arrives() {
    let redis = Redis::start();
    let (a, b) = (
        instance(&redis, "[fallback]\npoll_timeout_ms = 5000"),
        instance(&redis, "[fallback]\npoll_timeout_ms = 5000"),
    );
    let home = a.session("t1", "u1");
    let away = home.at(b.addr);
    away.post_ok(&json!({"type": "subscribe", "conversationId": "c1", "id": "s"}));
    let mut cursor = 0;
    away.poll_until(&mut cursor, 2);
    std::thread::scope(|scope| {
        let polling = scope.spawn(|| away.poll(cursor));
        wait_for("the poll to be attached at home", || {
            (a.metric("fanfare_sessions_open{transport=\"poll\"}") == 1).then_some(())
        });
        b.publish_ok("t1", vec![updated("c1", 1)]);
        assert_eq!(
            polling.join().unwrap(),
            (vec![updated("c1", 1)], cursor + 1)
        );
    });
}

#[test]
fn a_home_that_does_not_answer_gets_503_and_a_dead_one_404_everywhere() {
    let redis = Redis::start();
    let (mut a, b) = (instance(&redis, ""), instance(&redis, ""));
    let mut watcher = b.connect("t1", "watcher");
    let home = a.session("t1", "u1");
    assert_eq!(
        watcher.recv_any(),
        json!({"type": "presence.online", "userId": "u1"})
    );
    let away = home.at(b.addr);
    assert_eq!(away.poll(0).0[0]["type"], "session.ready");
    // Frozen: Redis still takes its messages, nothing answers.
    a.signal(libc::SIGSTOP);
    wait_for("every thread of the home to stop", || {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", a.pid())).ok()?;
        tasks
            .map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
            .all(|stat| {
                stat.is_some_and(|s| s.rsplit(") ").next().is_some_and(|r| r.starts_with('T')))
            })
            .then_some(())
    });
    let r = away.request("POST", &away.path("events"), br#"{"type":"ping"}"#);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.retry_after_s(), 1);
    a.signal(libc::SIGKILL);
    a.wait_exit();
    let killed = Instant::now();
    // Dead: 404 once its liveness key expired (503 until then), and its user goes offline.
    let r: Value = wait_for("the dead home's session to be gone", || {
        let r = away.request("GET", &away.path("poll"), b"");
        match r.status {
            404 => Some(r.json()),
            503 => {
                assert_eq!(r.retry_after_s(), 1);
                None
            }
            other => panic!("{other}: {}", r.body),
        }
    });
    assert_eq!(r["error"], "not_found");
    // Within broker.instance_ttl_ms (1 s) of the death, and a request's time.
    assert!(
        killed.elapsed() < Duration::from_millis(1500),
        "404 only {:?} after the home died",
        killed.elapsed()
    );
    assert_eq!(
        watcher.recv_any(),
        json!({"type": "presence.offline", "userId": "u1"})
    );
    let auth = format!("Bearer {}", away.token);
    let (head, _) = Sse::open(b.addr, &away.path("sse"), &[("Authorization", &auth)]);
    assert_eq!(head.status, 404);
}

#[test]
fn a_forwarded_stream_lives_through_busy_and_quiet_spells() {
    let redis = Redis::start();
    let hb = "[heartbeat]\ninterval_ms = 200\ntimeout_ms = 400";
    let (a, b) = (instance(&redis, hb), instance(&redis, hb));
    let home = a.session("t1", "u1");
    let mut sse = home.at(b.addr).subscribed_stream("c1");
    // Busy for longer than the heartbeat timeout, then quiet for as long, twice.
    let mut seq = 0;
    for _ in 0..2 {
        let busy = Instant::now();
        while busy.elapsed() < Duration::from_millis(800) {
            a.publish_ok("t1", vec![updated("c1", seq)]);
            assert_eq!(sse.event().1, updated("c1", seq));
            seq += 1;
        }
        let quiet = Instant::now();
        let mut keepalives = 0;
        while quiet.elapsed() < Duration::from_millis(800) {
            let m = sse.next().expect("the stream lives");
            assert_eq!(m.comment.as_deref(), Some("keepalive"), "{m:?}");
            keepalives += 1;
        }
        assert!(keepalives >= 2, "{keepalives} keepalives in a quiet spell");
    }
    b.publish_ok("t1", vec![updated("c1", seq)]);
    assert_eq!(sse.event().1, updated("c1", seq), "still streaming");
}

#[test]
fn a_forwarded_stream_ends_when_a_redis_link_drops_and_resumes_without_loss() {
    let redis = Redis::start();
    let (a, b) = (instance(&redis, ""), instance(&redis, ""));
    let home = a.session("t1", "u1");
    let away = home.at(b.addr);
    let mut sse = away.subscribed_stream("c1");
    a.publish_ok("t1", vec![updated("c1", 0)]);
    assert_eq!(sse.event(), (Some(3), updated("c1", 0)));
    // Every subscriber connection dropped: what was on its way through them may be lost.
    let killed = redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .unwrap();
    assert!(killed.starts_with(':'), "{killed}");
    let rest = sse.until_end();
    assert!(
        rest.iter().all(|m| m.data.is_empty()),
        "the stream ends, it does not go silent: {rest:?}"
    );
    for server in [&a, &b] {
        wait_for("readyz 200", || {
            (server.http("GET", "/readyz", &[], b"").status == 200).then_some(())
        });
    }
    a.publish_ok("t1", vec![updated("c1", 1)]);
    let mut resumed = away.sse(Some("3"));
    assert_eq!(resumed.event(), (Some(4), updated("c1", 1)));
}

/// Enough sessions that two of them share a home core and a forwarding core (two of each per
/// instance): their streams' liveness then travels in one message.
const STREAMS: usize = 5;

/// `STREAMS` sessions of `home`, the `i`th of tenant `t<i>` (so that no presence comes), each
/// with a stream through `away` subscribed to `c1`.
fn forwarded_streams(home: &Server, away: &Server) -> Vec<Sse> {
    (0..STREAMS)
        .map(|i| {
            let session = home.session(&format!("t{i}"), "u1");
            session.at(away.addr).subscribed_stream("c1")
        })
        .collect()
}

#[test]
fn forwarded_streams_end_when_their_home_dies() {
    let redis = Redis::start();
    let hb = "[heartbeat]\ninterval_ms = 200\ntimeout_ms = 400";
    let (mut a, b) = (instance(&redis, hb), instance(&redis, hb));
    let mut streams = forwarded_streams(&a, &b);
    a.signal(libc::SIGKILL);
    a.wait_exit();
    for sse in &mut streams {
        let rest = sse.until_end();
        assert!(
            rest.iter().all(|m| m.data.is_empty()),
            "only keepalives, then the end: {rest:?}"
        );
    }
}

#[test]
fn a_home_ends_the_forwarded_streams_of_a_frozen_instance_and_they_end_when_it_thaws() {
    let redis = Redis::start();
    let hb = "[heartbeat]\ninterval_ms = 200\ntimeout_ms = 400";
    let (a, b) = (instance(&redis, hb), instance(&redis, hb));
    let mut streams = forwarded_streams(&a, &b);
    // Quiet for twice the heartbeat timeout: the home still hears that every client is there.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(800) {
        let m = streams[0].next().expect("the stream lives");
        assert_eq!(m.comment.as_deref(), Some("keepalive"), "{m:?}");
    }
    for (i, sse) in streams.iter_mut().enumerate() {
        a.publish_ok(&format!("t{i}"), vec![updated("c1", 1)]);
        assert_eq!(sse.event().1, updated("c1", 1), "every stream lives");
    }
    assert_eq!(
        a.metric("fanfare_sessions_open{transport=\"sse\"}"),
        STREAMS as u64
    );
    b.signal(libc::SIGSTOP);
    wait_for(
        "the home to detach every stream of the frozen instance",
        || (a.metric("fanfare_sessions_open{transport=\"none\"}") == STREAMS as u64).then_some(()),
    );
    b.signal(libc::SIGCONT);
    for sse in &mut streams {
        let rest = sse.until_end();
        assert!(
            rest.iter().all(|m| m.data.is_empty()),
            "only keepalives, then the end: {rest:?}"
        );
    }
}
