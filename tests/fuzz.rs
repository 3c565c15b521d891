//! Fuzzing on the stable toolchain. Each in-process target runs its committed corpus
//! (`tests/fuzz/corpus/<target>/`), then inputs mutated from it (bit flips, inserted, deleted
//! and repeated bytes, splices of two inputs, truncations, random bytes) by a seeded
//! generator: `FUZZ_ITERATIONS` inputs per target (default 20,000, the short run of CI) from
//! `FUZZ_SEED` (default fixed, so a failure repeats). A target must not panic and checks its own
//! invariants; a failing input is written to `target/fuzz-failures/` and named in the failure
//! (add it to the corpus with the fix). The long run (README):
//! `FUZZ_ITERATIONS=5000000 FUZZ_SEED=$RANDOM cargo nextest run --release --test fuzz`.
//!
//! The stateful target drives the real binary: valid client frames cut at random points and
//! sent in random pieces, connections abandoned mid-frame, garbage after good frames; whatever
//! the server writes back must be valid server WebSocket frames, and it keeps serving.
mod support;
#[path = "fuzz/targets.rs"]
mod targets;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;

use support::*;

/// xorshift64*: small, fast, and the same sequence for a seed on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| std::fs::read(f.unwrap().path()).unwrap())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{target} has no corpus");
    inputs
}

/// One mutation of a corpus input (or of two).
fn mutate(rng: &mut Rng, inputs: &[Vec<u8>]) -> Vec<u8> {
    let mut data = inputs[rng.below(inputs.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(8) {
            0 if !data.is_empty() => {
                let (i, bit) = (at.min(data.len() - 1), rng.below(8));
                data[i] ^= 1 << bit;
            }
            1 => data.insert(at, rng.next() as u8),
            2 if at < data.len() => _ = data.remove(at),
            3 => {
                let other = &inputs[rng.below(inputs.len())];
                let from = rng.below(other.len() + 1);
                data.splice(at..at, other[from..].iter().copied().take(64));
            }
            4 => data.truncate(at),
            5 if at < data.len() => {
                let repeat = vec![data[at]; rng.below(300)];
                data.splice(at..at, repeat);
            }
            6 => data = (0..rng.below(256)).map(|_| rng.next() as u8).collect(),
            _ => {
                let special = b"\"{}[]:,\\\r\n\x00\xff";
                data.insert(at, special[rng.below(special.len())]);
            }
        }
    }
    data
}

/// Runs `check` on the corpus and on mutations of it; fails naming the first input that
/// panics.
fn fuzz(target: &str, check: impl Fn(&[u8])) {
    let inputs = corpus(target);
    let (iterations, seed) = (
        env_or("FUZZ_ITERATIONS", 20_000),
        env_or("FUZZ_SEED", 0x5EED),
    );
    let mut rng = Rng(seed.max(1));
    let generated = (0..iterations).map(|_| mutate(&mut rng, &inputs));
    for (n, input) in inputs.clone().into_iter().chain(generated).enumerate() {
        if std::panic::catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!("{target}-{seed}-{n}"));
            std::fs::write(&file, &input).unwrap();
            panic!(
                "{target}: input {n} (seed {seed}) failed; saved as {}",
                file.display()
            );
        }
    }
}

#[test]
fn the_http_head_parser_and_token_extraction() {
    fuzz("http_head", targets::http_head);
}

#[test]
fn the_websocket_frame_parser_and_unmasking() {
    fuzz("ws_frame", targets::ws_frame);
}

#[test]
fn client_events() {
    fuzz("client_event", targets::client_event);
}

#[test]
fn the_publish_body_and_what_redis_hands_over() {
    fuzz("publish_body", targets::publish_body);
    fuzz("redis_push", targets::redis_push);
}

/// Reads the `101` head and then server frames from `raw` until the server closes it (the
/// client's side is shut: the server sees the end of its stream); every byte after the head
/// must belong to a valid server frame (FIN set, no mask, a known opcode, UTF-8 text, a close
/// frame's code a sendable one).
fn only_valid_server_frames(raw: &mut TcpStream) {
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    raw.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match raw.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
    let head = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the 101 head")
        + 4;
    assert!(
        bytes.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&bytes[..head])
    );
    let mut rest = &bytes[head..];
    while !rest.is_empty() {
        assert!(rest.len() >= 2, "a cut frame: {rest:?}");
        let (b0, b1) = (rest[0], rest[1]);
        assert!(
            b0 & 0x80 != 0 && b0 & 0x70 == 0,
            "FIN and no reserved bits: {b0:#x}"
        );
        assert!(
            matches!(b0 & 0x0F, 0x1 | 0x2 | 0x8 | 0x9 | 0xA),
            "opcode {b0:#x}"
        );
        assert_eq!(b1 & 0x80, 0, "a server frame is not masked");
        let (len, at) = match b1 & 0x7F {
            126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert!(rest.len() >= at + len, "a cut frame");
        let payload = &rest[at..at + len];
        match b0 & 0x0F {
            0x1 => assert!(std::str::from_utf8(payload).is_ok(), "text is UTF-8"),
            0x8 => assert!(
                fanfare::ws::close_code_of(payload).is_ok(),
                "close {payload:?}"
            ),
            _ => {}
        }
        rest = &rest[at + len..];
    }
}

#[test]
fn a_connection_fed_random_splits_answers_only_valid_frames_and_the_server_keeps_serving() {
    let server = Server::start(
        "[limits]\nconnect_rate_per_ip = 100000.0\nconnect_burst_per_ip = 100000.0\n",
    );
    let mut rng = Rng(env_or("FUZZ_SEED", 0x5EED).max(1));
    for round in 0..env_or("FUZZ_CONNECTIONS", 40) {
        let mut raw = raw_upgrade(&server, "u1");
        let mask = (rng.next() as u32).to_be_bytes();
        let events = [
            r#"{"type":"subscribe","conversationId":"c1","id":"s"}"#.as_bytes(),
            br#"{"type":"ping","id":"p"}"#,
            br#"{"type":"presence.query"}"#,
            b"not json",
        ];
        let mut stream: Vec<u8> = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let event = events[rng.below(events.len())];
            stream.extend(client_frame(0x1, event, mask));
        }
        stream.extend(client_frame(0x9, b"hi", mask));
        match round % 3 {
            // Garbage after the good frames: the server ends with a protocol error.
            0 => stream.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
            // Abandoned in the middle of a frame.
            1 => stream.truncate(stream.len() - 1 - rng.below(4)),
            // A clean close.
            _ => stream.extend(client_frame(0x8, &1000u16.to_be_bytes(), mask)),
        }
        let mut at = 0;
        while at < stream.len() {
            let piece = 1 + rng.below(9);
            let end = (at + piece).min(stream.len());
            if raw.write_all(&stream[at..end]).is_err() {
                break;
            }
            at = end;
        }
        if round % 3 == 1 {
            drop(raw);
            continue;
        }
        only_valid_server_frames(&mut raw);
    }
    // After all of that, the server still serves a client as usual.
    let mut c = server.connect("t1", "u2");
    c.subscribe("c1");
    server.publish_ok("t1", vec![updated("c1", 0)]);
    assert_eq!(c.recv(), updated("c1", 0));
}
