//! Missed-event recovery with the Redis broker: one offset sequence per conversation across
//! instances, recovery on any instance and across an instance or a persistent Redis restart,
//! history lost in Redis (a new epoch, `recovered:false`), concurrent recoveries answered by one Redis read,
//! replay while publishing goes on, and publishing after Redis forgot the publish script.
mod support;

use std::sync::Arc;

use serde_json::{json, Value};
use support::recovery::*;
use support::*;

fn instance(redis: &Redis, size: usize) -> Server {
    let config = format!(
        "[server]\nshards = 2\n[broker]\nkind = \"redis\"\nredis_url = \"{}\"\nsubscribe_timeout_ms = 2000\n\
         [history]\nsize = {size}\n[limits]\nconnect_rate_per_ip = 100000.0\nconnect_burst_per_ip = 100000.0\n",
        redis.url()
    );
    let server = Server::start(&config);
    wait_for("readyz 200", || {
        (server.http("GET", "/readyz", &[], b"").status == 200).then_some(())
    });
    server
}

/// The epoch and latest offset of `c1` of `t1`, from the history API's 409.
fn position(server: &Server) -> (String, u64) {
    let r = history(server, "t1", "c1", "?since=0&epoch=x");
    assert_eq!(r.status, 409, "{}", r.body);
    let at = r.json();
    (
        at["epoch"].as_str().unwrap().to_string(),
        at["offset"].as_u64().unwrap(),
    )
}

#[test]
fn one_offset_sequence_across_instances_and_the_frame_is_built_in_redis() {
    let redis = Redis::start();
    let (a, b) = (instance(&redis, 5), instance(&redis, 5));
    let mut on_a = a.connect("t1", "u1");
    let mut on_b = b.connect("t1", "u2");
    let (_, ack) = resubscribe(&mut on_a, "c1", None);
    assert_eq!(ack["offset"], 0, "{ack}");
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    let (_, ack) = resubscribe(&mut on_b, "c1", None);
    assert_eq!(
        (ack["offset"].as_u64(), ack["epoch"].as_str()),
        (Some(0), Some(&*epoch))
    );
    let first = r#"{ "type" : "message.received","conversationId":"c1","messageId":"m1" }"#;
    let body = format!(r#"{{"tenantId":"t1","event":{first}}}"#);
    let r = publish_raw(&b, &body);
    assert_eq!(
        (r.status, r.json()),
        (202, json!({"accepted": 1, "offsets": [1]}))
    );
    let exact = format!(
        r#"{{ "type" : "message.received","conversationId":"c1","messageId":"m1" ,"offset":1,"epoch":"{epoch}"}}"#
    );
    assert_eq!(recv_text(&mut on_a), exact);
    assert_eq!(recv_text(&mut on_b), exact);
    for seq in 1..40 {
        let via = if seq % 2 == 0 { &a } else { &b };
        assert_eq!(publish(via, "c1", seq..seq + 1), [seq as u64 + 1]);
    }
    for c in [&mut on_a, &mut on_b] {
        let got: Vec<Value> = (1..40).map(|_| c.recv()).collect();
        assert_eq!(offsets(&got), (2..=40).collect::<Vec<u64>>());
    }
    // A direct PUBLISH bypasses history: no offset.
    let direct = r#"{"type":"conversation.updated","conversationId":"c1","direct":true}"#;
    redis
        .command(&["PUBLISH", "fanfare:t1:c:c1", direct])
        .unwrap();
    assert_eq!(recv_text(&mut on_a), direct);
    let (_, ack) = resubscribe(&mut on_a, "c1", None);
    assert_eq!(ack["offset"], 40, "a direct event moves nothing: {ack}");
}

#[test]
fn a_client_recovers_on_any_instance_and_across_a_restart() {
    let redis = Redis::start();
    let a = instance(&redis, 5);
    let mut c = a.connect("t1", "u1");
    let (_, ack) = resubscribe(&mut c, "c1", None);
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    publish(&a, "c1", 0..2);
    assert_eq!(offsets(&[c.recv(), c.recv()]), [1, 2]);
    drop(c);
    let b = instance(&redis, 5);
    // Exactly history.size missed events; B has no subscriber of c1 yet (read from Redis).
    publish(&a, "c1", 2..7);
    let mut back = b.connect("t1", "u1");
    let (replayed, ack) = resubscribe(&mut back, "c1", Some((2, &epoch)));
    assert_eq!(offsets(&replayed), [3, 4, 5, 6, 7]);
    assert_eq!(replayed[0]["seq"], 2);
    assert_eq!(
        (ack["recovered"].as_bool(), ack["offset"].as_u64()),
        (Some(true), Some(7))
    );
    assert_eq!(publish(&a, "c1", 7..8), [8]);
    assert_eq!(offsets(&[back.recv()]), [8]);
    // The instance that published restarts: its history was never its own.
    drop(a);
    let a = instance(&redis, 5);
    publish(&b, "c1", 8..10);
    let mut again = a.connect("t1", "u1");
    let (replayed, ack) = resubscribe(&mut again, "c1", Some((8, &epoch)));
    assert_eq!(offsets(&replayed), [9, 10]);
    assert_eq!(ack["recovered"], true);
    assert_eq!(
        a.metric("fanfare_recoveries_total{result=\"recovered\"}"),
        1
    );
}

#[test]
fn history_survives_a_redis_restart_with_persistence() {
    let mut redis = Redis::start_persistent();
    let a = instance(&redis, 5);
    let mut c = a.connect("t1", "u1");
    let (_, ack) = resubscribe(&mut c, "c1", None);
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    publish(&a, "c1", 0..1);
    assert_eq!(offsets(&[c.recv()]), [1]);
    drop(c);
    publish(&a, "c1", 1..3);
    redis.restart();
    wait_for("the instance back on the restarted redis", || {
        let ready = a.http("GET", "/readyz", &[], b"").status == 200;
        (ready && history(&a, "t1", "c1", "?since=0&epoch=x").status == 409).then_some(())
    });
    assert_eq!(
        position(&a),
        (epoch.clone(), 3),
        "the same epoch, nothing lost"
    );
    let mut back = a.connect("t1", "u1");
    let (replayed, ack) = resubscribe(&mut back, "c1", Some((1, &epoch)));
    assert_eq!(
        (offsets(&replayed), &ack["recovered"]),
        (vec![2, 3], &json!(true))
    );
    assert_eq!(publish(&a, "c1", 3..4), [4]);
    assert_eq!(offsets(&[back.recv()]), [4]);
}

#[test]
fn history_lost_in_redis_gives_a_new_epoch_and_recovered_false() {
    let redis = Redis::start();
    let (a, b) = (instance(&redis, 5), instance(&redis, 5));
    let mut watcher = a.connect("t1", "u9");
    resubscribe(&mut watcher, "c1", None);
    publish(&a, "c1", 0..3);
    let (old, _) = position(&a);
    assert_eq!(
        offsets(&[watcher.recv(), watcher.recv(), watcher.recv()]),
        [1, 2, 3]
    );
    assert!(redis.command(&["FLUSHALL"]).unwrap().starts_with("+OK"));
    // The next event starts a new epoch, and says so in band.
    assert_eq!(publish(&b, "c1", 3..4), [1]);
    let first = watcher.recv();
    let new = first["epoch"]
        .as_str()
        .expect("the new epoch in band")
        .to_string();
    assert_ne!(new, old);
    for server in [&a, &b] {
        let mut c = server.connect("t1", "u1");
        let (replayed, ack) = resubscribe(&mut c, "c1", Some((3, &old)));
        assert!(replayed.is_empty(), "{replayed:?}");
        assert_eq!(
            ack,
            json!({"type": "ack", "id": "re", "offset": 1, "epoch": new, "recovered": false})
        );
    }
}

#[test]
fn what_redis_does_not_keep_is_not_recovered() {
    let redis = Redis::start();
    let a = instance(&redis, 3);
    publish(&a, "c1", 0..6);
    let (epoch, latest) = position(&a);
    assert_eq!(latest, 6);
    // On an instance that never saw c1: every answer comes from Redis.
    let b = instance(&redis, 3);
    for (offset, since_epoch, why) in [
        (2, &*epoch, "trimmed"),
        (9, &*epoch, "ahead"),
        (5, "abc", "epoch"),
    ] {
        let mut c = b.connect("t1", "u1");
        let (replayed, ack) = resubscribe(&mut c, "c1", Some((offset, since_epoch)));
        assert!(replayed.is_empty(), "{why}: {replayed:?}");
        assert_eq!(
            (ack["recovered"].as_bool(), ack["offset"].as_u64()),
            (Some(false), Some(6)),
            "{why}"
        );
        let metric = format!("fanfare_recoveries_total{{result=\"{why}\"}}");
        assert_eq!(b.metric(&metric), 1, "{why}");
    }
    let mut c = b.connect("t1", "u1");
    let (replayed, ack) = resubscribe(&mut c, "c1", Some((3, &epoch)));
    assert_eq!(
        (offsets(&replayed), &ack["recovered"]),
        (vec![4, 5, 6], &json!(true))
    );
    // The history API reads Redis too, and tenants share nothing.
    let r = history(&b, "t1", "c1", &format!("?since=4&epoch={epoch}"));
    assert_eq!(offsets(r.json()["events"].as_array().unwrap()), [5, 6]);
    assert_eq!(
        history(&b, "t1", "c1", &format!("?since=1&epoch={epoch}")).status,
        409
    );
    let r = b.publish(&json!({"tenantId": "t2", "event": updated("c1", 0)}));
    assert_eq!(r.json()["offsets"], json!([1]));
    let other = history(&b, "t2", "c1", "?since=0&epoch=x").json();
    assert_eq!(other["offset"], 1);
}

#[test]
fn concurrent_recoveries_of_a_conversation_cost_one_redis_read() {
    let redis = Redis::start();
    let a = instance(&redis, 50);
    publish(&a, "c1", 0..20);
    let (epoch, _) = position(&a);
    let b = instance(&redis, 50);
    let mut clients: Vec<Client> = (0..20).map(|i| b.connect("t1", &format!("u{i}"))).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&json!({"type": "subscribe", "conversationId": "c1", "id": "re", "since": {"offset": i, "epoch": epoch}}));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut replayed = Vec::new();
        let ack = loop {
            let v = c.recv();
            if v["id"] == "re" {
                break v;
            }
            replayed.push(v);
        };
        assert_eq!(ack["recovered"], true, "{ack}");
        assert_eq!(
            offsets(&replayed),
            ((i as u64 + 1)..=20).collect::<Vec<_>>()
        );
    }
    assert_eq!(
        b.metric("fanfare_recoveries_total{result=\"recovered\"}"),
        20
    );
    assert_eq!(
        b.metric("fanfare_history_reads_total"),
        1,
        "one read for all"
    );
}

#[test]
fn replay_across_instances_while_publishing_yields_every_offset_once_in_order() {
    let redis = Redis::start();
    let servers = vec![instance(&redis, 2000), instance(&redis, 2000)];
    let (epoch, _) = position(&servers[0]);
    let reconnects = reconnect_while_publishing(Arc::new(servers), 1000, &epoch);
    assert!(reconnects > 5, "only {reconnects} reconnects");
}

/// The publish script runs by its hash (`EVALSHA`); a Redis that does not have it (new,
/// restarted, or after `SCRIPT FLUSH`) is sent the text once, and no publish fails or loses its
/// offset.
#[test]
fn publishes_go_on_after_redis_forgets_the_script() {
    let redis = Redis::start();
    let a = instance(&redis, 10);
    // Calls of a command since the last reset (0 when Redis has not run it).
    let calls = |command: &str| {
        let stats = redis.command(&["INFO", "commandstats"]).unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.split(',').next()?.parse().ok())
            .unwrap_or(0u64)
    };
    let ok = |args: &[&str]| assert!(redis.command(args).unwrap().starts_with("+OK"), "{args:?}");
    ok(&["CONFIG", "RESETSTAT"]);
    // Per publish: whether Redis's scripts are flushed first, then EVALSHA and EVAL calls so far.
    // A new Redis does not know the script yet: the text once, then its hash.
    let steps = [
        (false, (1, 1), "NOSCRIPT, then the text"),
        (false, (2, 1), "by its hash"),
        (true, (3, 2), "NOSCRIPT again, the text"),
        (false, (4, 2), "by its hash again"),
    ];
    for (seq, (flush, counts, why)) in steps.into_iter().enumerate() {
        if flush {
            ok(&["SCRIPT", "FLUSH"]);
        }
        assert_eq!(publish(&a, "c1", seq..seq + 1), vec![seq as u64 + 1]);
        assert_eq!((calls("evalsha"), calls("eval")), counts, "{why}");
    }
    assert_eq!(position(&a).1, 4);
}
