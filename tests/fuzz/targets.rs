//! The in-process fuzz targets: each takes any bytes, must not panic, and asserts its own
//! invariants. Shared by `tests/fuzz.rs` (the stable run in CI) and the cargo-fuzz targets in
//! `fuzz_targets/` (libFuzzer, for long coverage-guided runs; README).

/// The HTTP request-head parser and what is read from a head: length, keep-alive, bearer
/// token, upgrade, and the target as logged (every `token` value redacted).
pub fn http_head(buf: &[u8]) {
    if let Ok(Some(req)) = fanfare::http::parse_head(buf, 8192) {
        assert!(req.head_len <= buf.len());
        let _ = (
            req.content_length(),
            req.keep_alive(),
            req.bearer(),
            req.is_websocket_upgrade(),
        );
        let shown = req.redacted_target();
        let query = shown.split_once('?').map_or("", |(_, q)| q);
        for (key, value) in query.split('&').filter_map(|p| p.split_once('=')) {
            assert!(key != "token" || value == "[redacted]", "{shown}");
        }
    }
}

/// The WebSocket frame parser over a stream of frames, unmasking (checked against the
/// bytewise definition) and close-frame validation.
pub fn ws_frame(buf: &[u8]) {
    let max = 1 << 16;
    let mut rest = buf;
    while let Ok(Some(head)) = fanfare::ws::parse_frame(rest, max) {
        assert!(head.header_len <= 14 && head.payload_len <= max);
        let Some(frame) = rest.get(..head.header_len + head.payload_len) else {
            break;
        };
        let mut payload = frame[head.header_len..].to_vec();
        fanfare::ws::unmask(&mut payload, head.mask);
        let bytewise: Vec<u8> = frame[head.header_len..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ head.mask[i % 4])
            .collect();
        assert_eq!(payload, bytewise);
        if head.opcode == fanfare::ws::OP_CLOSE {
            let _ = fanfare::ws::close_code_of(&payload);
        }
        rest = &rest[frame.len()..];
    }
}

/// Client-event JSON: whatever parses as a subscribe names a valid conversation ID.
pub fn client_event(buf: &[u8]) {
    let mut copy = buf.to_vec();
    if let Ok(request) = fanfare::protocol::parse_client_event(&mut copy) {
        if let fanfare::protocol::ClientEvent::Subscribe {
            conversation_id, ..
        } = request.event
        {
            assert!(fanfare::protocol::is_entity_id(conversation_id));
        }
    }
}

/// The publish body: every accepted event has a room and is a JSON object.
pub fn publish_body(buf: &[u8]) {
    if let Ok(events) = fanfare::publish::parse(buf) {
        for e in events {
            assert!(e.room.contains(":c:"));
            // JSON as RFC 8259 has it: numbers of any size (serde_json's Value has a range).
            let raw: Box<serde_json::value::RawValue> =
                serde_json::from_slice(&e.payload).expect("an event is JSON");
            assert!(raw.get().starts_with('{'));
        }
    }
}

/// What Redis hands over: the position appended by the history script, and the check of a
/// pushed payload.
pub fn redis_push(buf: &[u8]) {
    let positioned = fanfare::history::position_of(buf);
    if let Some((offset, epoch)) = positioned {
        assert!(offset > 0 && (offset == 1) == epoch.is_some());
    }
    let _ = fanfare::publish::check_pushed(buf, "c1", positioned.is_some());
}
