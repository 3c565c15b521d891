//! Hostile clients, loopback only and bounded in count and time: each is cut off or refused
//! with the protocol's answer, the server's CPU time and memory stay bounded, and a subscribed
//! client beside them keeps getting its events. The CPU bounds are loose (several times what a
//! debug build spends): they catch a server that spins or does per-byte work, not a slow one.
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

/// A client of `t1` subscribed to `c1`; `delivers` proves it still gets events.
struct Bystander {
    client: Client,
    seq: usize,
}

impl Bystander {
    fn new(server: &Server) -> Bystander {
        let mut client = server.connect("t1", "bystander");
        client.subscribe("c1");
        Bystander { client, seq: 0 }
    }

    fn delivers(&mut self, server: &Server) {
        server.publish_ok("t1", vec![updated("c1", self.seq)]);
        assert_eq!(
            self.client.recv(),
            updated("c1", self.seq),
            "the bystander's event"
        );
        self.seq += 1;
    }
}

/// Reads until the server closes the connection; what it answered.
fn answer(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn slowloris_on_the_upgrade_is_cut_off_by_the_request_timeout() {
    let server = Server::start("[server]\nrequest_timeout_ms = 1000");
    let mut bystander = Bystander::new(&server);
    let meter = server.meter();
    let mut slow = TcpStream::connect(server.addr).unwrap();
    let head = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
        token("t1", "u1", 60)
    );
    let started = Instant::now();
    let mut cut = false;
    // A byte every 100 ms (pacing, not synchronisation): far too slow to finish in time.
    for byte in head.bytes().take(200) {
        if slow.write_all(&[byte]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_millis(1500) {
            break;
        }
    }
    let out = answer(&mut slow);
    let elapsed = started.elapsed();
    assert!(
        cut || out.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert!(elapsed < Duration::from_secs(3), "held for {elapsed:?}");
    meter.assert_under("a slowloris client", 0.3, 2 * 1024);
    bystander.delivers(&server);
}

#[test]
fn thousands_of_headers_or_a_mebibyte_of_head_get_431_and_memory_stays_put() {
    let server = Server::start("");
    let mut bystander = Bystander::new(&server);
    let many: String = (0..2000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let huge = format!("X-Pad: {}\r\n", "a".repeat(1 << 20));
    let meter = server.meter();
    for round in 0..20 {
        let extra = if round % 2 == 0 { &many } else { &huge };
        let mut s = TcpStream::connect(server.addr).unwrap();
        // The server may answer and close before the whole head is written.
        let _ = s.write_all(format!("GET /ws HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes());
        let out = answer(&mut s);
        assert!(
            out.starts_with(b"HTTP/1.1 431"),
            "{:?}",
            String::from_utf8_lossy(&out[..out.len().min(80)])
        );
    }
    meter.assert_under("20 oversized heads", 0.5, 4 * 1024);
    bystander.delivers(&server);
}

#[test]
fn ten_times_the_connection_rate_is_refused_with_429_before_any_token_work() {
    let server = Server::start("[limits]\nconnect_rate_per_ip = 5.0\nconnect_burst_per_ip = 5.0");
    let mut bystander = Bystander::new(&server);
    let meter = server.meter();
    let (mut limited, mut unauthorized) = (0, 0);
    let started = Instant::now();
    for _ in 0..50 {
        // A bad token: any 401 is token work the limit should have spared.
        match server.connect_raw("/ws?token=not-a-token") {
            Err(tungstenite::Error::Http(r)) if r.status() == 429 => limited += 1,
            Err(tungstenite::Error::Http(r)) if r.status() == 401 => unauthorized += 1,
            other => panic!("{:?}", other.map(|_| "upgraded")),
        }
    }
    // What got past the limit is the burst and what the rate refilled meanwhile, no more.
    let refilled = 5.0 * started.elapsed().as_secs_f64();
    assert!(
        unauthorized as f64 <= 5.0 + refilled + 1.0 && limited > 0,
        "{limited} limited, {unauthorized} refused after token work"
    );
    assert_eq!(
        server.metric("fanfare_rejected_unauthorized_total"),
        unauthorized
    );
    meter.assert_under("50 upgrades from one IP", 0.3, 2 * 1024);
    bystander.delivers(&server);
}

#[test]
fn thousands_of_half_open_sockets_are_closed_and_cost_little() {
    const SOCKETS: usize = 3000;
    fanfare::server::raise_fd_limit();
    let server = Server::start("[server]\nrequest_timeout_ms = 1000");
    let mut bystander = Bystander::new(&server);
    let meter = server.meter();
    // Connected, a partial head or nothing at all, and never another byte.
    let idle: Vec<TcpStream> = (0..SOCKETS)
        .map(|i| {
            let mut s = TcpStream::connect(server.addr).unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /ws HTTP/1.1\r\nHost:").unwrap();
            }
            s
        })
        .collect();
    bystander.delivers(&server);
    meter.assert_under("3000 half-open sockets", 1.0, 48 * 1024);
    for mut s in idle {
        let out = answer(&mut s);
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    meter.assert_under("3000 half-open sockets, closed", 1.5, 48 * 1024);
    bystander.delivers(&server);
}

#[test]
fn a_ping_flood_is_answered_or_cut_off_and_the_others_go_on() {
    const PINGS: usize = 20_000;
    let server = Server::start("");
    let mut bystander = Bystander::new(&server);
    let mut raw = raw_upgrade(&server, "flooder");
    let payload = [b'p'; 125];
    let meter = server.meter();
    let mut flood: Vec<u8> = std::iter::repeat_n(client_frame(0x9, &payload, [1, 2, 3, 4]), PINGS)
        .flatten()
        .collect();
    flood.extend(client_frame(0x8, &1000u16.to_be_bytes(), [1, 2, 3, 4]));
    // 2.5 MB of pings without reading a pong: the answers pile up past the outbound queue
    // unless the server stops reading, so the flooder may find its writes refused.
    raw.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = raw.write_all(&flood);
    let (mut frames, code) = read_until_close(&mut raw);
    assert_eq!(frames.remove(0).0, 0x1, "session.ready first");
    assert!(
        frames.iter().all(|f| *f == (0xA, payload.to_vec())),
        "only pongs that echo the ping"
    );
    assert!(
        (code == 1000 && frames.len() == PINGS) || code == 1013,
        "closed {code} after {} pongs",
        frames.len()
    );
    meter.assert_under("20,000 pings of 125 bytes", 0.5, 8 * 1024);
    bystander.delivers(&server);
}
