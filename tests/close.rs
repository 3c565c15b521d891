//! The close handshake started by the client: answered, logged with both codes, cleaned up.
mod support;

use serde_json::json;
use support::*;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

#[test]
fn a_client_close_is_answered_logged_and_cleaned_up() {
    let server = Server::start("[server]\nshards = 2");
    let mut leaver = server.connect("t1", "leaver");
    let mut stayer = server.connect("t1", "stayer");
    leaver.subscribe("c1");
    wait_for("both connections", || {
        (server.metric("fanfare_connections_open") == 2).then_some(())
    });

    leaver
        .ws
        .close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        }))
        .expect("close");
    let answer = loop {
        match leaver.ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(e) => panic!("no close frame in answer: {e}"),
        }
    };
    assert_eq!(answer.map(|f| f.code), Some(CloseCode::Normal));

    wait_for("the leaver's clean-up", || {
        (server.metric("fanfare_connections_open") == 1).then_some(())
    });
    let line = server.wait_for_line("the disconnect line", |l| {
        l.contains("disconnect") && l.contains("user=leaver")
    });
    assert!(line.contains("code=1000"), "{line}");
    assert!(line.contains("peer_code=1001"), "{line}");

    // The other connection goes on.
    let pong = stayer.request(json!({"type": "ping"}), "p1");
    assert_eq!(pong["type"], "pong");
    stayer.subscribe("c1");
    server.publish_ok("t1", vec![updated("c1", 1)]);
    assert_eq!(stayer.recv()["seq"], 1);
}
