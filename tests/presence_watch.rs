//! `presence.mode = "watch"`: a connection hears of the users on its watch list only; the
//! list is replaced, bounded and answered with a snapshot; unwatched users cost no frame; and
//! it holds cluster-wide over Redis.
mod support;

use std::sync::Arc;

use serde_json::{json, Value};
use support::*;

const WATCH: &str = "[presence]\nmode = \"watch\"\nmax_watch = 3\noffline_grace_ms = 200\n";

/// Users of `t1` whose presence is owned by the same core as `like`'s (on 2 cores): a change
/// of one and then of another reaches a watcher in that order.
fn same_route(like: &str, count: usize) -> Vec<String> {
    let owner = |u: &str| {
        let key = fanfare::route::user_key(&(Arc::from("t1"), Arc::from(u)));
        fanfare::route::shard_for(key.as_bytes(), 2)
    };
    (0..)
        .map(|i| format!("{like}-{i}"))
        .filter(|u| owner(u) == owner(like))
        .take(count)
        .collect()
}

fn watch(c: &mut Client, users: &[&str]) -> Value {
    c.request(json!({"type": "presence.watch", "userIds": users}), "w")
}

fn online(user: &str) -> Value {
    json!({"type": "presence.online", "userId": user})
}

fn offline(user: &str) -> Value {
    json!({"type": "presence.offline", "userId": user})
}

#[test]
fn only_watched_users_are_heard_of_and_unwatched_ones_cost_no_frame() {
    let server = Server::start(WATCH);
    let users = same_route("pal", 2);
    let (pal, stranger) = (&users[0], &users[1]);
    let mut me = server.connect("t1", "me");
    assert_eq!(watch(&mut me, &[pal])["type"], "ack");
    assert_eq!(
        me.recv_any(),
        json!({"type": "presence.snapshot", "userIds": []})
    );
    let frames = server.metric("fanfare_presence_frames_total");
    // The stranger first, then the pal by the same route: only the pal's change arrives.
    let _stranger = server.connect("t1", stranger);
    let pal_conn = server.connect("t1", pal);
    assert_eq!(me.recv_any(), online(pal));
    assert_eq!(
        server.metric("fanfare_presence_frames_total") - frames,
        1,
        "the stranger's change was sent to no one"
    );
    drop(pal_conn);
    assert_eq!(me.recv_any(), offline(pal));
}

#[test]
fn a_watch_list_is_replaced_answered_with_a_snapshot_and_bounded() {
    let server = Server::start(WATCH);
    let users = same_route("a", 3);
    let (a, b, c) = (&users[0], &users[1], &users[2]);
    let mut me = server.connect("t1", "me");
    // Watching both first, so that this connection's core has heard of both before the list
    // that the test is about: a snapshot says what its core knows, one mesh hop behind.
    assert_eq!(watch(&mut me, &[a, b])["type"], "ack");
    assert_eq!(
        me.recv_any(),
        json!({"type": "presence.snapshot", "userIds": []})
    );
    let _a = server.connect("t1", a);
    let _b = server.connect("t1", b);
    let heard = [me.recv_any(), me.recv_any()];
    assert!(
        heard.contains(&online(a)) && heard.contains(&online(b)),
        "{heard:?}"
    );
    assert_eq!(watch(&mut me, &[a, "nobody", a])["type"], "ack");
    assert_eq!(
        me.recv_any(),
        json!({"type": "presence.snapshot", "userIds": [a]})
    );
    let snapshot = me.request(json!({"type": "presence.query"}), "q");
    assert_eq!(
        snapshot,
        json!({"type": "presence.snapshot", "userIds": [a], "id": "q"}),
        "the watched ones only"
    );
    // Replaced: b instead of a.
    assert_eq!(watch(&mut me, &[b])["type"], "ack");
    assert_eq!(
        me.recv_any(),
        json!({"type": "presence.snapshot", "userIds": [b]})
    );
    // Over the limit: refused, and the list stays b.
    let e = watch(&mut me, &["x1", "x2", "x3", "x4"]);
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("invalid_message"), Some("w")),
        "{e}"
    );
    drop(_a);
    let _c = server.connect("t1", c);
    drop(_b);
    // a left (not watched any more), c came (not watched), b left: only b's change arrives.
    assert_eq!(me.recv_any(), offline(b));
}

#[test]
fn in_tenant_mode_a_watch_list_is_refused() {
    let server = Server::start("");
    let mut me = server.connect("t1", "me");
    let e = watch(&mut me, &["u1"]);
    assert_eq!(e["code"], "invalid_message", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("presence.mode"),
        "{e}"
    );
}

#[test]
fn watching_is_cluster_wide_over_redis() {
    let redis = Redis::start();
    let config = format!(
        "{WATCH}[broker]\nkind = \"redis\"\nredis_url = \"{}\"\ninstance_ttl_ms = 1000\n",
        redis.url()
    );
    let (a, b) = (Server::start(&config), Server::start(&config));
    for server in [&a, &b] {
        wait_for("readyz 200", || {
            (server.http("GET", "/readyz", &[], b"").status == 200).then_some(())
        });
    }
    let users = same_route("far", 2);
    let (pal, stranger) = (&users[0], &users[1]);
    let mut me = a.connect("t1", "me");
    watch(&mut me, &[pal]);
    me.recv_any();
    let _stranger = b.connect("t1", stranger);
    let pal_conn = b.connect("t1", pal);
    assert_eq!(
        me.recv_any(),
        online(pal),
        "a change on the other instance, and only the pal's"
    );
    drop(pal_conn);
    assert_eq!(me.recv_any(), offline(pal));
}
