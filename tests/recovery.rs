//! Missed-event recovery with the memory broker: offsets and epochs in band and in acks, a
//! resubscribe with `since` replayed exactly what it missed (or told `recovered:false` and
//! replayed nothing), the publish answer's offsets, the history API, and HTTP sessions.
mod support;

use std::sync::Arc;

use serde_json::{json, Value};
use support::recovery::*;
use support::*;

const HISTORY: &str = "[history]\nsize = 5\n";

#[test]
fn offsets_and_the_epoch_reach_subscribers_in_band_and_in_acks() {
    let server = Server::start(HISTORY);
    let mut a = server.connect("t1", "u1");
    let (_, ack) = resubscribe(&mut a, "c1", None);
    assert_eq!(ack["offset"], 0, "{ack}");
    let epoch = ack["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty() && epoch.len() <= 32, "{epoch}");
    assert!(
        ack.get("recovered").is_none(),
        "no since, no recovered: {ack}"
    );
    // The publisher's bytes, spacing and extra fields included, then the offset.
    let first =
        r#"{ "type" : "message.received","conversationId":"c1","messageId":"m1","x":[1, 2] }"#;
    let body = format!(
        r#"{{"tenantId":"t1","events":[{first},{{"type":"conversation.updated","conversationId":"c1"}}]}}"#
    );
    let r = publish_raw(&server, &body);
    assert_eq!(
        (r.status, r.json()),
        (202, json!({"accepted": 2, "offsets": [1, 2]}))
    );
    assert_eq!(
        recv_text(&mut a),
        format!(
            r#"{{ "type" : "message.received","conversationId":"c1","messageId":"m1","x":[1, 2] ,"offset":1,"epoch":"{epoch}"}}"#
        )
    );
    assert_eq!(
        recv_text(&mut a),
        r#"{"type":"conversation.updated","conversationId":"c1","offset":2}"#
    );
    // A later subscriber, on whichever core, learns where the stream is.
    for (mut c, core) in one_per_core(&server, "u2") {
        let (_, ack) = resubscribe(&mut c, "c1", None);
        assert_eq!(
            (ack["offset"].as_u64(), ack["epoch"].as_str()),
            (Some(2), Some(&*epoch)),
            "core {core}"
        );
    }
}

#[test]
fn a_resubscribe_with_since_gets_what_it_missed_then_recovered_true() {
    let server = Server::start(HISTORY);
    // Conversations owned by either core, clients on either core: every mesh path.
    for conversation in [
        conversations_owned_by(0, 2, 1),
        conversations_owned_by(1, 2, 1),
    ]
    .concat()
    {
        for (mut c, core) in one_per_core(&server, "u1") {
            let (_, ack) = resubscribe(&mut c, &conversation, None);
            let epoch = ack["epoch"].as_str().unwrap().to_string();
            let start = ack["offset"].as_u64().unwrap();
            publish(&server, &conversation, 0..2);
            let seen = offsets(&[c.recv(), c.recv()]);
            assert_eq!(seen, [start + 1, start + 2]);
            drop(c);
            // Exactly history.size (5) missed events, published while away.
            publish(&server, &conversation, 2..7);
            let mut back = server.connect("t1", "u1");
            let (replayed, ack) = resubscribe(&mut back, &conversation, Some((start + 2, &epoch)));
            let latest = start + 7;
            assert_eq!(
                offsets(&replayed),
                ((start + 3)..=latest).collect::<Vec<_>>(),
                "core {core}"
            );
            assert_eq!(
                replayed[0],
                json!({"type": "conversation.updated", "conversationId": conversation, "seq": 2, "offset": start + 3})
            );
            assert_eq!(
                (ack["recovered"].as_bool(), ack["offset"].as_u64()),
                (Some(true), Some(latest)),
                "{ack}"
            );
            assert_eq!(publish(&server, &conversation, 7..8), [latest + 1]);
            assert_eq!(
                offsets(&[back.recv()]),
                [latest + 1],
                "live again after the ack"
            );
        }
    }
    assert_eq!(
        server.metric("fanfare_recoveries_total{result=\"recovered\"}"),
        4
    );
    assert_eq!(server.metric("fanfare_events_replayed_total"), 20);
}

#[test]
fn what_cannot_be_recovered_says_recovered_false_and_replays_nothing() {
    let server = Server::start(HISTORY);
    let mut probe = server.connect("t1", "u9");
    let (_, ack) = resubscribe(&mut probe, "c1", None);
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    publish(&server, "c1", 0..7);
    let cases: [(u64, &str, &str); 4] = [
        (1, &epoch, "trimmed"),
        (100, &epoch, "ahead"),
        (3, "0123abc", "epoch"),
        (3, "not-an-epoch", "epoch"),
    ];
    for (i, (offset, since_epoch, reason)) in cases.into_iter().enumerate() {
        let mut c = server.connect("t1", "u1");
        let (replayed, ack) = resubscribe(&mut c, "c1", Some((offset, since_epoch)));
        assert!(replayed.is_empty(), "{reason}: {replayed:?}");
        assert_eq!(ack["recovered"], false, "{reason}: {ack}");
        let latest = 7 + i as u64;
        assert_eq!(
            (ack["offset"].as_u64(), ack["epoch"].as_str()),
            (Some(latest), Some(&*epoch))
        );
        // What comes next is the next event: nothing was replayed late either.
        let next = latest + 1;
        assert_eq!(publish(&server, "c1", 7..8), [next]);
        assert_eq!(offsets(&[c.recv()]), [next], "{reason}");
        // A repeated subscribe replays nothing, whatever its since.
        let (replayed, ack) = resubscribe(&mut c, "c1", Some((1, &epoch)));
        assert!(replayed.is_empty());
        assert_eq!(
            (ack["recovered"].as_bool(), ack["offset"].as_u64()),
            (Some(false), Some(next))
        );
    }
    for (result, n) in [("trimmed", 1), ("ahead", 1), ("epoch", 2), ("repeated", 4)] {
        assert_eq!(
            server.metric(&format!("fanfare_recoveries_total{{result=\"{result}\"}}")),
            n,
            "{result}"
        );
    }
    assert_eq!(
        server.metric("fanfare_recoveries_total{result=\"recovered\"}"),
        0
    );
}

#[test]
fn with_history_off_since_is_accepted_and_nothing_has_an_offset() {
    let server = Server::start("");
    let mut c = server.connect("t1", "u1");
    let (_, ack) = resubscribe(&mut c, "c1", Some((3, "abc")));
    assert_eq!(ack, json!({"type": "ack", "id": "re", "recovered": false}));
    let r = server.publish(&json!({"tenantId": "t1", "event": updated("c1", 0)}));
    assert_eq!((r.status, r.json()), (202, json!({"accepted": 1})));
    assert_eq!(recv_text(&mut c), updated("c1", 0).to_string());
    let r = history(&server, "t1", "c1", "?since=0&epoch=abc");
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(server.metric("fanfare_recoveries_total{result=\"off\"}"), 1);
    // A malformed since is refused like any bad field, and keeps the connection.
    c.send(&json!({"type": "subscribe", "conversationId": "c2", "id": "bad", "since": {"offset": "3"}}));
    let e = c.recv();
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("invalid_message"), Some("bad")),
        "{e}"
    );
}

#[test]
fn the_history_api_answers_events_or_the_current_position() {
    let server = Server::start(HISTORY);
    publish(&server, "c1", 0..7);
    let conflict = history(&server, "t1", "c1", "?since=0&epoch=abc");
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    let at = conflict.json();
    assert_eq!(at["offset"], 7);
    let epoch = at["epoch"].as_str().unwrap().to_string();
    let r = history(&server, "t1", "c1", &format!("?since=4&epoch={epoch}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(
        (body["epoch"].as_str(), body["offset"].as_u64()),
        (Some(&*epoch), Some(7))
    );
    let events = body["events"].as_array().unwrap();
    assert_eq!(offsets(events), [5, 6, 7]);
    assert_eq!(events[0]["seq"], 4);
    assert_eq!(
        history(&server, "t1", "c1", &format!("?since=7&epoch={epoch}")).json()["events"],
        json!([])
    );
    for query in [
        format!("?since=1&epoch={epoch}"),
        format!("?since=8&epoch={epoch}"),
    ] {
        let r = history(&server, "t1", "c1", &query);
        assert_eq!(
            (r.status, r.json()),
            (409, json!({"epoch": epoch, "offset": 7})),
            "{query}"
        );
    }
    for query in [
        "",
        "?since=1",
        "?epoch=a",
        "?since=-1&epoch=a",
        "?since=x&epoch=a",
    ] {
        assert_eq!(history(&server, "t1", "c1", query).status, 400, "{query}");
    }
    assert_eq!(
        history(&server, "t 1", "c1", "?since=0&epoch=a").status,
        400
    );
    let r = server.http(
        "GET",
        "/v1/history/t1/c1?since=0&epoch=a",
        &[("Authorization", "Bearer nope")],
        b"",
    );
    assert_eq!(r.status, 401);
    // Tenants share no offsets and no history.
    let r = server.publish(&json!({"tenantId": "t2", "event": updated("c1", 0)}));
    assert_eq!(r.json()["offsets"], json!([1]));
    let other = history(&server, "t2", "c1", "?since=0&epoch=x").json();
    assert_eq!(other["offset"], 1);
    let r = history(
        &server,
        "t2",
        "c1",
        &format!("?since=0&epoch={}", other["epoch"].as_str().unwrap()),
    );
    assert_eq!(offsets(r.json()["events"].as_array().unwrap()), [1]);
    assert_eq!(r.json()["events"][0]["seq"], 0);
}

#[test]
fn a_conversation_s_events_are_released_after_history_ttl() {
    let server = Server::start("[history]\nsize = 5\nttl_ms = 1000\n");
    publish(&server, "c1", 0..2);
    let epoch = history(&server, "t1", "c1", "?since=0&epoch=x").json()["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let kept = history(&server, "t1", "c1", &format!("?since=0&epoch={epoch}"));
    assert_eq!(kept.status, 200, "read at once: {}", kept.body);
    wait_for("the events to expire", || {
        let r = history(&server, "t1", "c1", &format!("?since=0&epoch={epoch}"));
        (r.status == 409).then_some(())
    });
}

#[test]
fn replay_while_publishing_yields_every_offset_exactly_once_in_order() {
    let limits = "[limits]\nconnect_rate_per_ip = 100000.0\nconnect_burst_per_ip = 100000.0\n";
    let server = Server::start(&format!("[history]\nsize = 2000\n{limits}"));
    let mut probe = server.connect("t1", "u0");
    let (_, ack) = resubscribe(&mut probe, "c1", None);
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    let reconnects = reconnect_while_publishing(Arc::new(vec![server]), 1500, &epoch);
    assert!(reconnects > 5, "only {reconnects} reconnects");
}

#[test]
fn a_restarted_server_starts_a_new_epoch() {
    let server = Server::start(HISTORY);
    publish(&server, "c1", 0..3);
    let old = history(&server, "t1", "c1", "?since=0&epoch=x").json()["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    drop(server);
    let server = Server::start(HISTORY);
    let mut c = server.connect("t1", "u1");
    let (replayed, ack) = resubscribe(&mut c, "c1", Some((3, &old)));
    assert!(replayed.is_empty());
    assert_eq!(
        (ack["recovered"].as_bool(), ack["offset"].as_u64()),
        (Some(false), Some(0))
    );
    assert_ne!(ack["epoch"], old.as_str());
    let r = server.publish(&json!({"tenantId": "t1", "event": updated("c1", 0)}));
    assert_eq!(r.json()["offsets"], json!([1]));
    let first = c.recv();
    assert_eq!(
        (first["offset"].as_u64(), &first["epoch"]),
        (Some(1), &ack["epoch"]),
        "the new epoch in band"
    );
}

#[test]
fn a_session_recovers_the_same_way() {
    let server = Server::start(HISTORY);
    let mut probe = server.connect("t1", "u9");
    let (_, ack) = resubscribe(&mut probe, "c1", None);
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    publish(&server, "c1", 0..4);
    let s = server.session("t1", "u1");
    s.post_ok(&json!({"type": "subscribe", "conversationId": "c1", "id": "re", "since": {"offset": 2, "epoch": epoch}}));
    let mut cursor = 0;
    let got: Vec<Value> = s
        .poll_until(&mut cursor, 4)
        .into_iter()
        .filter(|v| v["type"] != "session.ready")
        .collect();
    assert_eq!(offsets(&got[..2]), [3, 4], "{got:?}");
    assert_eq!(
        got[2],
        json!({"type": "ack", "id": "re", "offset": 4, "epoch": epoch, "recovered": true})
    );
}
