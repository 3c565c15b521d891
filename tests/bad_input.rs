//! Bad client input gets `invalid_message` (or the right close code) and loses nothing.
mod support;

use serde_json::json;
use std::io::Write;

use support::*;
use tungstenite::Message;

#[test]
fn malformed_events_get_invalid_message_and_the_connection_keeps_serving() {
    let server = Server::start("");
    let mut c = server.connect("t1", "alice");
    c.subscribe("c1");
    let bad: Vec<(Message, Option<&str>)> = vec![
        (Message::text("{not json"), None),
        (Message::text("[1,2,3]"), None),
        (Message::text(r#"{"type":"fly","id":"r1"}"#), Some("r1")),
        (
            Message::text(r#"{"type":"subscribe","id":"r2"}"#),
            Some("r2"),
        ),
        (
            Message::text(r#"{"type":"subscribe","conversationId":"has space","id":"r3"}"#),
            Some("r3"),
        ),
        (
            Message::text(r#"{"type":"subscribe","conversationId":"x","id":7}"#),
            None,
        ),
        (Message::text(r#"{"id":"r4"}"#), Some("r4")),
        (Message::binary(vec![1u8, 2, 3]), None),
    ];
    for (frame, id) in bad {
        let shown = format!("{frame:?}");
        c.send_raw(frame);
        let e = c.expect("error");
        assert_eq!(e["code"], "invalid_message", "{shown}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(e["id"].as_str(), id, "{shown}");
    }
    // Still subscribed, still answering.
    server.publish_ok("t1", vec![updated("c1", 1)]);
    assert_eq!(c.recv(), updated("c1", 1));
    assert_eq!(c.request(json!({"type": "ping"}), "after")["type"], "pong");
}

#[test]
fn fragmented_messages_are_reassembled() {
    let server = Server::start("");
    let mut c = server.connect("t1", "alice");
    use tungstenite::protocol::frame::{
        coding::{Data, OpCode},
        Frame,
    };
    let text = r#"{"type":"ping","id":"frag"}"#.as_bytes();
    let (first, rest) = text.split_at(10);
    let mut f1 = Frame::message(first.to_vec(), OpCode::Data(Data::Text), false);
    f1.header_mut().is_final = false;
    c.ws.write(Message::Frame(f1)).unwrap();
    c.ws.write(Message::Frame(Frame::message(
        rest.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .unwrap();
    c.ws.flush().unwrap();
    assert_eq!(c.recv(), json!({"type": "pong", "id": "frag"}));
}

#[test]
fn invalid_utf8_text_closes_with_1007_and_others_are_unaffected() {
    let server = Server::start("");
    let mut other = server.connect("t1", "bob");
    let mut raw = raw_upgrade(&server, "eve");
    // A masked text frame (mask of zeros) holding invalid UTF-8.
    raw.write_all(&[0x81, 0x80 | 2, 0, 0, 0, 0, 0xC3, 0x28])
        .unwrap();
    assert_eq!(read_until_close(&mut raw).1, 1007);
    assert_eq!(
        other.request(json!({"type": "ping"}), "still")["type"],
        "pong"
    );
}

#[test]
fn unmasked_client_frames_close_with_1002() {
    let server = Server::start("");
    let mut raw = raw_upgrade(&server, "eve");
    raw.write_all(&[0x81, 2, b'{', b'}']).unwrap();
    assert_eq!(read_until_close(&mut raw).1, 1002);
}

#[test]
fn malformed_http_requests_get_400_and_oversized_heads_431() {
    let server = Server::start("[server]\nmax_request_head_bytes = 1024");
    use std::io::{Read, Write};
    let send = |raw: &[u8]| {
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        parse_response(&out).unwrap().status
    };
    assert_eq!(send(b"NOT HTTP AT ALL\0\r\n\r\n"), 400);
    let big = format!(
        "GET /healthz HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(2000)
    );
    assert_eq!(send(big.as_bytes()), 431);
    assert_eq!(
        send(b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n"),
        404
    );
    assert_eq!(
        send(b"DELETE /v1/publish HTTP/1.1\r\nConnection: close\r\n\r\n"),
        405
    );
    assert_eq!(send(b"GET /ws HTTP/1.1\r\n\r\n"), 426);
    assert_eq!(
        server.http("GET", "/healthz", &[], b"").status,
        200,
        "the server keeps serving"
    );
}

#[test]
fn a_stalled_request_head_times_out_with_408() {
    let server = Server::start("[server]\nrequest_timeout_ms = 300");
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert_eq!(parse_response(&out).unwrap().status, 408);
}
