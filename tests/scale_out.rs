//! Scale-out over Redis: several instances on one real `redis-server` share events and
//! presence, and survive Redis going away and an instance crashing.
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

fn config(redis_url: &str) -> String {
    format!(
        "[server]\nshards = 2\n[broker]\nkind = \"redis\"\nredis_url = \"{redis_url}\"\ninstance_ttl_ms = 1000\nsubscribe_timeout_ms = 1000\n[presence]\noffline_grace_ms = 300"
    )
}

/// Starts an instance and waits until it is ready (Redis connected on every core).
fn instance(redis: &Redis) -> Server {
    instance_at(&redis.url())
}

fn instance_at(redis_url: &str) -> Server {
    let server = Server::start(&config(redis_url));
    wait_readyz(&server, 200);
    server
}

/// Waits until `/readyz` of `server` answers `status`.
fn wait_readyz(server: &Server, status: u16) {
    wait_for(&format!("readyz {status}"), || {
        (server.http("GET", "/readyz", &[], b"").status == status).then_some(())
    });
}

fn presence(kind: &str, user: &str) -> Value {
    json!({"type": format!("presence.{kind}"), "userId": user})
}

#[test]
fn events_published_anywhere_reach_subscribers_everywhere_once_and_in_order() {
    let redis = Redis::start();
    let (a, b) = (instance(&redis), instance(&redis));
    let mut on_a = a.connect("t1", "fan");
    let mut on_b = b.connect("t1", "fan");
    on_a.subscribe("c1");
    on_b.subscribe("c1");
    // Through the API of either instance.
    for seq in 0..300 {
        let via = if seq % 2 == 0 { &a } else { &b };
        via.publish_ok("t1", vec![updated("c1", seq)]);
    }
    // Straight into Redis, as a backend may do.
    let direct =
        r#"{"type":"message.received","conversationId":"c1","messageId":"m9","extra":true}"#;
    // One Redis subscriber per instance for the channel: its owner core.
    assert_eq!(
        redis
            .command(&["PUBLISH", "fanfare:t1:c:c1", direct])
            .unwrap(),
        ":2\r\n"
    );
    for c in [&mut on_a, &mut on_b] {
        for seq in 0..300 {
            assert_eq!(c.recv()["seq"], seq);
        }
        match c.ws.read().unwrap() {
            tungstenite::Message::Text(t) => assert_eq!(t.as_str(), direct),
            other => panic!("{other:?}"),
        }
    }
    // Exactly once: a last event on the same channel is the next frame, no copy before it.
    a.publish_ok("t1", vec![updated("c1", 300)]);
    for c in [&mut on_a, &mut on_b] {
        assert_eq!(c.recv(), updated("c1", 300));
    }
}

#[test]
fn redis_is_reached_by_host_name() {
    let redis = Redis::start();
    let by_name = redis.url().replace("127.0.0.1", "localhost");
    let a = instance_at(&by_name);
    let mut c = a.connect("t1", "alice");
    c.subscribe("c1");
    a.publish_ok("t1", vec![updated("c1", 1)]);
    assert_eq!(c.recv()["seq"], 1);
}

#[test]
fn tenants_stay_apart_across_instances() {
    let redis = Redis::start();
    let (a, b) = (instance(&redis), instance(&redis));
    let mut ta = a.connect("tenant-a", "u");
    let mut tb = b.connect("tenant-b", "u");
    ta.subscribe("c1");
    tb.subscribe("c1");
    // Sentinels owned by the core that owns the other tenant's c1 (see tests/tenant_isolation.rs).
    let (sentinel_a, sentinel_b) = (
        sentinel_for("tenant-a", ("tenant-b", "c1")),
        sentinel_for("tenant-b", ("tenant-a", "c1")),
    );
    ta.subscribe(&sentinel_a);
    tb.subscribe(&sentinel_b);
    b.publish_ok("tenant-a", vec![updated("c1", 1)]);
    a.publish_ok("tenant-b", vec![updated("c1", 2)]);
    b.publish_ok("tenant-a", vec![updated(&sentinel_a, 3)]);
    a.publish_ok("tenant-b", vec![updated(&sentinel_b, 4)]);
    // c1 and the sentinel are two channels and may have two owners: either may come first.
    ta.recv_in_any_order(&[updated("c1", 1), updated(&sentinel_a, 3)]);
    tb.recv_in_any_order(&[updated("c1", 2), updated(&sentinel_b, 4)]);
}

#[test]
fn presence_typing_and_snapshots_are_cluster_wide() {
    let redis = Redis::start();
    let (a, b) = (instance(&redis), instance(&redis));
    let mut alice = a.connect("t1", "alice");
    let mut bob = b.connect("t1", "bob");
    assert_eq!(alice.recv_any(), presence("online", "bob"));
    // Bob came later: Alice, online on the other instance, is in his snapshot (as soon as A's
    // announcement of her, sent asynchronously at her connect, has crossed Redis).
    wait_for("Alice in Bob's snapshot", || {
        (bob.request(json!({"type": "presence.query"}), "q")["userIds"] == json!(["alice", "bob"]))
            .then_some(())
    });
    for c in [&mut alice, &mut bob] {
        c.subscribe("c1");
    }
    bob.request(
        json!({"type": "presence.activity", "activity": "typing", "conversationId": "c1"}),
        "t",
    );
    assert_eq!(
        alice.recv_any(),
        json!({"type": "presence.typing", "userId": "bob", "conversationId": "c1"})
    );
    let snap = alice.request(json!({"type": "presence.query"}), "q");
    assert_eq!(snap["userIds"], json!(["alice", "bob"]));
    let auth = format!("Bearer {API_KEY}");
    assert_eq!(
        a.http("GET", "/v1/presence/t1", &[("Authorization", &auth)], b"")
            .json()["userIds"],
        json!(["alice", "bob"])
    );
    // Bob's second connection on A is no news; leaving one instance is not leaving.
    let bob_on_a = a.connect("t1", "bob");
    drop(bob);
    drop(bob_on_a);
    let left = Instant::now();
    assert_eq!(alice.recv_any(), presence("offline", "bob"));
    assert!(left.elapsed() >= Duration::from_millis(250));
}

#[test]
fn a_crashed_instance_s_users_go_offline_within_ttl_plus_grace() {
    let redis = Redis::start();
    let a = instance(&redis);
    let mut b = instance(&redis);
    let mut alice = a.connect("t1", "alice");
    let _bob = b.connect("t1", "bob");
    assert_eq!(alice.recv_any(), presence("online", "bob"));
    let killed = Instant::now();
    b.signal(libc::SIGKILL);
    b.wait_exit();
    assert_eq!(alice.recv_any(), presence("offline", "bob"));
    let took = killed.elapsed();
    // ttl 1 s + grace 0.3 s, checked every ttl/3.
    assert!(took < Duration::from_millis(2500), "offline after {took:?}");
    assert!(took >= Duration::from_millis(300));
    let auth = format!("Bearer {API_KEY}");
    assert_eq!(
        a.http("GET", "/v1/presence/t1", &[("Authorization", &auth)], b"")
            .json()["userIds"],
        json!(["alice"]),
        "no ghosts"
    );
}

#[test]
fn a_stopping_instance_removes_its_presence_at_once() {
    let redis = Redis::start();
    let a = instance(&redis);
    let mut b = instance(&redis);
    let mut alice = a.connect("t1", "alice");
    let mut bob = b.connect("t1", "bob");
    assert_eq!(alice.recv_any(), presence("online", "bob"));
    let stopped = Instant::now();
    b.signal(libc::SIGTERM);
    assert_eq!(bob.expect_close().code, 1001);
    assert!(b.wait_exit().success());
    assert_eq!(alice.recv_any(), presence("offline", "bob"));
    // The grace (0.3 s), not the TTL (1 s) plus the grace.
    assert!(
        stopped.elapsed() < Duration::from_millis(1200),
        "offline after {:?}",
        stopped.elapsed()
    );
}

#[test]
fn readiness_follows_the_redis_link_without_waiting_for_the_instance_refresh() {
    // The instance's liveness is refreshed every instance_ttl_ms / 3: 200 s here, far past
    // any wait below. Readiness must follow the link itself, both ways.
    let mut redis = Redis::start();
    let server = Server::start(
        &config(&redis.url()).replace("instance_ttl_ms = 1000", "instance_ttl_ms = 600000"),
    );
    wait_readyz(&server, 200);
    redis.kill();
    wait_readyz(&server, 503);
    redis.restart();
    wait_readyz(&server, 200);
    server.publish_ok("t1", vec![updated("c1", 0)]);
}

#[test]
fn redis_outage_then_recovery_without_client_action() {
    let mut redis = Redis::start();
    let (a, b) = (instance(&redis), instance(&redis));
    let mut on_b = b.connect("t1", "reader");
    on_b.subscribe("c1");
    // Dan first: Alice, who reads presence frames below, never hears of him.
    let mut dan = a.connect("t1", "dan");
    let mut alice = a.connect("t1", "alice");
    alice.subscribe("c3");
    dan.subscribe("c3");
    a.publish_ok("t1", vec![updated("c1", 0)]);
    assert_eq!(on_b.recv()["seq"], 0);

    redis.kill();
    wait_readyz(&a, 503);
    let r = a.publish(&json!({"tenantId": "t1", "event": updated("c1", 1)}));
    assert_eq!(
        (r.status, r.header("Retry-After")),
        (503, Some("1")),
        "{}",
        r.body
    );
    // A new subscribe waits for Redis, then says unavailable: to a new conversation, and to one
    // that already has live subscribers on that core.
    let e = alice.request(json!({"type": "subscribe", "conversationId": "c2"}), "s");
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unavailable"))
    );
    let mut late = b.connect("t1", "late");
    let e = late.request(json!({"type": "subscribe", "conversationId": "c1"}), "s");
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unavailable"))
    );
    // Presence among this instance's own connections keeps working.
    let _carol = a.connect("t1", "carol");
    assert_eq!(alice.recv_any(), presence("online", "carol"));
    // So does typing among them.
    dan.request(
        json!({"type": "presence.activity", "activity": "typing", "conversationId": "c3"}),
        "t",
    );
    assert_eq!(
        alice.recv_any(),
        json!({"type": "presence.typing", "userId": "dan", "conversationId": "c3"})
    );

    redis.restart();
    let back = Instant::now();
    wait_for("readyz 200 again", || {
        (a.http("GET", "/readyz", &[], b"").status == 200
            && b.http("GET", "/readyz", &[], b"").status == 200)
            .then_some(())
    });
    // The reader's subscription was restored without it doing anything.
    // Publishing is accepted again (the first tries may still meet a reconnecting core).
    wait_for("publishing to be accepted", || {
        (a.publish(&json!({"tenantId": "t1", "event": updated("c1", 2)}))
            .status
            == 202)
            .then_some(())
    });
    assert_eq!(on_b.recv()["seq"], 2);
    assert!(
        back.elapsed() < Duration::from_secs(5),
        "recovered after {:?}",
        back.elapsed()
    );
    alice.subscribe("c2");
    late.subscribe("c1");
}

#[test]
fn a_dropped_subscriber_connection_is_renewed_and_resubscribed() {
    let redis = Redis::start();
    let (a, b) = (instance(&redis), instance(&redis));
    let mut reader = b.connect("t1", "reader");
    reader.subscribe("c1");
    // Redis drops every subscriber connection (as it does past its output-buffer limit).
    assert!(redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .unwrap()
        .starts_with(':'));
    let dropped = Instant::now();
    let mut seq = 0usize;
    // Keep publishing until deliveries flow again; each accepted event must then arrive.
    let first = wait_for("delivery after the subscriber reconnects", || {
        seq += 1;
        assert_eq!(
            a.publish(&json!({"tenantId": "t1", "event": updated("c1", seq)}))
                .status,
            202
        );
        reader
            .ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let got = match reader.ws.read() {
            Ok(tungstenite::Message::Text(t)) => serde_json::from_str::<Value>(&t).ok(),
            _ => None,
        };
        reader
            .ws
            .get_ref()
            .set_read_timeout(Some(DEADLINE))
            .unwrap();
        got
    });
    assert!(
        dropped.elapsed() < Duration::from_secs(5),
        "resubscribed after {:?}",
        dropped.elapsed()
    );
    let first = first["seq"].as_u64().unwrap() as usize;
    a.publish_ok("t1", vec![updated("c1", 1000)]);
    // Everything after the first delivered event arrives, in order.
    for s in first + 1..=seq {
        assert_eq!(reader.recv()["seq"], s);
    }
    assert_eq!(reader.recv()["seq"], 1000);
}

#[test]
fn a_subscription_that_goes_silent_is_renewed() {
    let redis = Redis::start();
    let (a, b) = (instance(&redis), instance(&redis));
    let mut reader = b.connect("t1", "reader");
    reader.subscribe("c1");
    // Redis holds every write back (PUBLISH included) for 5 s: no probe comes back, and each
    // subscriber connection must notice within its 3 s probe timeout plus one 1 s check. A
    // renewed one hears the probes queued meanwhile once the pause ends, before its own timeout.
    assert!(redis
        .command(&["CLIENT", "PAUSE", "5000", "WRITE"])
        .unwrap()
        .starts_with("+OK"));
    let paused = Instant::now();
    let silent = |server: &Server| {
        server
            .logs()
            .iter()
            .filter(|l| l.contains("subscription went silent"))
            .count()
    };
    wait_for("both cores of B to notice the silence", || {
        (silent(&b) >= 2).then_some(())
    });
    assert!(
        paused.elapsed() < Duration::from_millis(4500),
        "noticed after {:?}",
        paused.elapsed()
    );
    wait_for("the pause to end and both to be ready", || {
        (paused.elapsed() > Duration::from_millis(5000)
            && [&a, &b]
                .iter()
                .all(|s| s.http("GET", "/readyz", &[], b"").status == 200))
        .then_some(())
    });
    // Events flow to the renewed subscription without any client action, none lost. (A's
    // command connection gave up on the paused Redis too: its first try may still meet it
    // reconnecting, and a refused publish sent nothing.)
    wait_for("publishing to be accepted", || {
        (a.publish(&json!({"tenantId": "t1", "event": updated("c1", 0)}))
            .status
            == 202)
            .then_some(())
    });
    for seq in 1..20 {
        a.publish_ok("t1", vec![updated("c1", seq)]);
    }
    for seq in 0..20 {
        assert_eq!(reader.recv()["seq"], seq);
    }
    assert_eq!(silent(&b), 2, "renewed once per core, no churn");
}

#[test]
fn invalid_payloads_published_into_redis_reach_no_subscriber() {
    let redis = Redis::start();
    let server = instance(&redis);
    let mut reader = server.connect("t1", "reader");
    reader.subscribe("c1");
    let bad: [&[u8]; 5] = [
        b"{\"type\":\"conversation.updated\",\"conversationId\":\"c1\",\"x\":\"\xff\xfe\"}",
        b"not json at all",
        br#"{"type":"presence.online","userId":"u9","conversationId":"c1"}"#,
        br#"{"type":"message.received","conversationId":"c1"}"#,
        br#"{"type":"conversation.updated","conversationId":"elsewhere"}"#,
    ];
    for payload in bad {
        let reply = redis
            .command(&[b"PUBLISH".as_slice(), b"fanfare:t1:c:c1", payload])
            .unwrap();
        assert_eq!(
            reply, ":1\r\n",
            "one subscriber connection: this instance's"
        );
    }
    // The same channel, so it arrives after anything the bad ones would have become.
    let good = r#"{"type":"conversation.updated","conversationId":"c1","n":1}"#;
    redis
        .command(&["PUBLISH", "fanfare:t1:c:c1", good])
        .unwrap();
    match reader.ws.read().unwrap() {
        tungstenite::Message::Text(t) => assert_eq!(t.as_str(), good),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        server.metric("fanfare_redis_invalid_total"),
        bad.len() as u64
    );
    let warned = || {
        server
            .logs()
            .iter()
            .filter(|l| {
                l.contains("dropped an invalid message from redis") && l.contains("t1:c:c1")
            })
            .count()
    };
    // The log lines reach the test through a pipe read by another thread: waited for.
    wait_for("a warning per payload", || {
        (warned() >= bad.len()).then_some(())
    });
    assert_eq!(
        warned(),
        bad.len(),
        "one warning with the channel per payload"
    );
    assert_eq!(
        reader.request(json!({"type": "ping"}), "alive")["type"],
        "pong"
    );
}

#[test]
fn a_frozen_redis_link_heals_and_nothing_acknowledged_is_lost() {
    let redis = Redis::start();
    let proxy = Proxy::to(redis.port);
    // Heartbeats far shorter than the freeze: connections must outlive it.
    let heartbeat = "[heartbeat]\ninterval_ms = 400\ntimeout_ms = 1200";
    let server = Server::start(&format!("{}\n{heartbeat}", config(&proxy.url())));
    wait_readyz(&server, 200);
    let mut reader = server.connect("t1", "reader");
    reader.subscribe("c1");
    let reading = std::sync::atomic::AtomicBool::new(true);
    let seqs = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        // However this scope ends, the reader stops.
        let _stop = StopOnDrop(&reading);
        // The client reads all along (and so answers the server's pings).
        let received = s.spawn(|| {
            reader
                .ws
                .get_ref()
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                match reader.ws.read() {
                    Ok(tungstenite::Message::Text(t)) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        seqs.lock().unwrap().push(v["seq"].as_u64().unwrap());
                    }
                    Ok(tungstenite::Message::Close(c)) => panic!("closed during the freeze: {c:?}"),
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("reader failed: {e}"),
                }
            }
        });
        let mut seq = 0;
        let mut acknowledged = Vec::new();
        let mut publish = |seq: &mut u64| {
            let status = server
                .publish(&json!({"tenantId": "t1", "event": updated("c1", *seq as usize)}))
                .status;
            if status == 202 {
                acknowledged.push(*seq);
            }
            *seq += 1;
            status
        };
        assert_eq!(publish(&mut seq), 202);
        // Delivered before the freeze: pub/sub keeps nothing for a link that dies (an event
        // on its way through the frozen link would be lost with it).
        wait_for("the first event", || {
            seqs.lock().unwrap().contains(&0).then_some(())
        });

        proxy.freeze();
        let frozen = Instant::now();
        // Publishing fails while the link is frozen: nothing is acknowledged.
        let r = publish(&mut seq);
        assert_eq!(r, 503, "a publish through a frozen link");
        wait_readyz(&server, 503);
        // Noticed within the command timeout (broker.subscribe_timeout_ms = 1 s) plus the
        // watchdog's quarter-timeout granularity, rounded up to the 250 ms grid.
        assert!(
            frozen.elapsed() < Duration::from_millis(2500),
            "noticed after {:?}",
            frozen.elapsed()
        );
        for _ in 0..3 {
            assert_eq!(publish(&mut seq), 503);
        }

        proxy.thaw();
        let thawed = Instant::now();
        wait_readyz(&server, 200);
        wait_for("publishing to be accepted again", || {
            (publish(&mut seq) == 202).then_some(())
        });
        assert!(
            thawed.elapsed() < Duration::from_secs(5),
            "healed after {:?}",
            thawed.elapsed()
        );
        for _ in 0..5 {
            assert_eq!(publish(&mut seq), 202);
        }
        // Everything acknowledged arrives, in order (the subscription was renewed unasked).
        let last = *acknowledged.last().unwrap();
        wait_for("the last acknowledged event", || {
            seqs.lock().unwrap().contains(&last).then_some(())
        });
        reading.store(false, std::sync::atomic::Ordering::Relaxed);
        received.join().unwrap();
        let seqs = seqs.lock().unwrap();
        let delivered: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| acknowledged.contains(s))
            .collect();
        assert_eq!(delivered, acknowledged, "received {seqs:?}");
        assert_eq!(seqs.last(), Some(&last));
    });
    assert_eq!(server.metric("fanfare_heartbeat_closes_total"), 0);
}

/// Clears its flag when dropped, a panic included.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn an_instance_taken_for_gone_announces_its_users_again() {
    let redis = Redis::start();
    let (a, b) = (instance(&redis), instance(&redis));
    let _alice = a.connect("t1", "alice");
    let auth = format!("Bearer {API_KEY}");
    let online_on_b = || {
        let r = b.http("GET", "/v1/presence/t1", &[("Authorization", &auth)], b"");
        r.json()["userIds"]
            .as_array()
            .unwrap()
            .contains(&json!("alice"))
    };
    wait_for("alice online on b", || online_on_b().then_some(()));
    let id = a
        .logs()
        .iter()
        .find_map(|l| {
            Some(
                l.split("instance=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        })
        .expect("a's instance id in its log");
    // What the others do when they take `a` for dead (as after missed refreshes): say it is
    // gone, then forget its keys.
    redis
        .command(&["PUBLISH", "fanfare:presence", &format!("gone {id}")])
        .unwrap();
    wait_for("alice offline on b", || (!online_on_b()).then_some(()));
    // Under the presence channel's hash tag (one slot with it in a Redis Cluster).
    let key = format!("{{fanfare:presence}}:instance:{id}");
    redis
        .command(&["DEL", &key, &format!("{key}:users")])
        .unwrap();
    redis
        .command(&["SREM", "{fanfare:presence}:instances", &id])
        .unwrap();
    // `a` notices at its next refresh and announces alice again, without her reconnecting.
    wait_for("alice online on b again", || online_on_b().then_some(()));
}

#[test]
fn shutdown_with_a_frozen_redis_link_ends_within_its_timeout() {
    let redis = Redis::start();
    let proxy = Proxy::to(redis.port);
    // Redis may take 5 s to answer; shutting down may take 1 s.
    let extra = "[server]\nshutdown_timeout_ms = 1000\n[broker]\nsubscribe_timeout_ms = 5000";
    let mut server = Server::start(&format!("{}\n{extra}", config(&proxy.url())));
    wait_readyz(&server, 200);
    let mut client = server.connect("t1", "alice");
    client.subscribe("c1");
    proxy.freeze();
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    assert_eq!(client.expect_close().code, 1001);
    assert!(server.wait_exit().success());
    let took = signalled.elapsed();
    assert!(took < Duration::from_millis(1800), "exited after {took:?}");
    assert!(server
        .logs()
        .iter()
        .any(|l| l.contains("presence stays in redis until its TTL")));
}

#[test]
fn a_subscribe_abandoned_while_redis_is_frozen_leaves_nothing_behind() {
    let redis = Redis::start();
    let proxy = Proxy::to(redis.port);
    let server = instance_at(&proxy.url());
    proxy.freeze();
    // Two clients ask for a conversation nobody had: both wait for Redis's confirmation.
    let subscribe = json!({"type": "subscribe", "conversationId": "c9", "id": "s"});
    let mut quitter = server.connect("t1", "quitter");
    let mut patient = server.connect("t1", "patient");
    quitter.send(&subscribe);
    patient.send(&subscribe);
    // One goes away while waiting (TCP closed, no close frame).
    drop(quitter);
    // The other is not left waiting: it hears within broker.subscribe_timeout_ms (1 s).
    let asked = Instant::now();
    let answer = patient.recv();
    assert_eq!(
        (answer["id"].as_str(), answer["code"].as_str()),
        (Some("s"), Some("unavailable")),
        "{answer}"
    );
    assert!(
        asked.elapsed() < Duration::from_millis(2000),
        "answered after {:?}",
        asked.elapsed()
    );
    wait_readyz(&server, 503);
    proxy.thaw();
    wait_readyz(&server, 200);
    // Nobody wants c9 any more: Redis has no subscriber for it.
    let numsub = redis
        .command(&["PUBSUB", "NUMSUB", "fanfare:t1:c:c9"])
        .unwrap();
    assert!(numsub.ends_with(":0\r\n"), "{numsub:?}");
    // And the conversation works normally for the one who asks again.
    patient.subscribe("c9");
    server.publish_ok("t1", vec![updated("c9", 1)]);
    assert_eq!(patient.recv(), updated("c9", 1));
}
