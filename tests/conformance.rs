//! WebSocket conformance: the Autobahn TestSuite cases of sections 1–7, 9 and 10 (through
//! `kosoku`, which `.ci/run` installs) against the echo endpoint (`server.echo_path`), which
//! the same framing code as `/ws` serves. Each case's result must be the one committed in
//! `tests/autobahn/expected.json` (all OK, NON-STRICT or INFORMATIONAL), so that a regression
//! fails with its case number. Sections 12 and 13 need permessage-deflate, which is not offered.
mod support;

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;
use support::*;

#[test]
fn autobahn_sections_1_to_7_9_and_10_behave_as_committed() {
    // Section 9 sends messages of up to 16 MiB and expects them back.
    let server = Server::start(
        "[server]\necho_path = \"/echo\"\n[limits]\nmax_message_bytes = 20000000\n\
         outbound_queue_bytes = 80000000\nconnect_rate_per_ip = 100000.0\nconnect_burst_per_ip = 100000.0\n",
    );
    let reports = std::env::temp_dir().join(format!("fanfare-autobahn-{}", std::process::id()));
    let run = Command::new("kosoku")
        .arg(format!("{}/echo", server.addr))
        .args(["-x", "12.*", "-x", "13.*", "-p", "4", "-o"])
        .arg(&reports)
        .output()
        .expect("kosoku runs the Autobahn cases: pip install kosoku (.ci/run does)");
    assert!(
        run.status.success(),
        "kosoku: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(reports.join("index.json")).expect("index.json"))
            .expect("index.json is JSON");
    let _ = std::fs::remove_dir_all(&reports);
    let cases = index
        .as_object()
        .and_then(|agents| agents.values().next())
        .expect("one agent");
    let got: BTreeMap<String, String> = cases
        .as_object()
        .expect("cases")
        .iter()
        .map(|(case, r)| {
            (
                case.clone(),
                format!(
                    "{} {}",
                    r["behavior"].as_str().unwrap_or("?"),
                    r["behaviorClose"].as_str().unwrap_or("?")
                ),
            )
        })
        .collect();
    let expected: BTreeMap<String, String> =
        serde_json::from_str(include_str!("autobahn/expected.json")).expect("expected.json");
    let differ: Vec<String> = expected
        .keys()
        .chain(got.keys().filter(|c| !expected.contains_key(*c)))
        .filter(|case| got.get(*case) != expected.get(*case))
        .map(|case| {
            format!(
                "{case}: expected {:?}, got {:?}",
                expected.get(case),
                got.get(case)
            )
        })
        .collect();
    assert!(
        differ.is_empty(),
        "Autobahn cases changed:\n{}",
        differ.join("\n")
    );
    let acceptable = ["OK", "NON-STRICT", "INFORMATIONAL"];
    assert!(
        got.values()
            .all(|r| acceptable.contains(&r.split(' ').next().unwrap_or(""))),
        "the committed results hold a failure"
    );
    assert!(got.len() > 290, "only {} cases ran", got.len());
}

#[test]
fn the_echo_endpoint_is_off_by_default_and_needs_no_token_when_on() {
    let off = Server::start("");
    assert_eq!(off.http("GET", "/echo", &[], b"").status, 404);
    let on = Server::start("[server]\necho_path = \"/echo\"\n");
    let mut c = connect_at(on.addr, &on.url("/echo"), &[]).expect("an upgrade without a token");
    c.send_raw(tungstenite::Message::binary(vec![0u8, 159, 146, 150]));
    assert_eq!(
        c.ws.read().unwrap(),
        tungstenite::Message::binary(vec![0u8, 159, 146, 150])
    );
    c.send_raw(tungstenite::Message::text("héllo"));
    assert_eq!(c.ws.read().unwrap(), tungstenite::Message::text("héllo"));
    // The echo endpoint has no client: it is not a connection of any tenant.
    assert_eq!(on.metric("fanfare_connections_open"), 0);
}
