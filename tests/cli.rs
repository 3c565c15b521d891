//! The command line and configuration: serve on defaults, env overrides, check-config, token,
//! and loud failures on bad configuration.
mod support;

use std::process::Command;

use support::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run fanfare");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_effective_values() {
    let f = TempFile::new("[limits]\nmax_subscriptions = 9\n");
    let (code, out, err) = run(
        &["check-config", "--config", f.0.to_str().unwrap()],
        &[("FANFARE_SERVER__LISTEN", "127.0.0.1:9999")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("max_subscriptions = 9"), "{out}");
    assert!(
        out.contains("listen = \"127.0.0.1:9999\""),
        "env override applies: {out}"
    );
    assert!(
        out.contains("max_message_bytes = 65536"),
        "defaults fill the rest: {out}"
    );
}

#[test]
fn bad_configuration_stops_start_up_naming_the_key() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 8] = [
        ("[server]\nlisen = \"127.0.0.1:0\"\n", &[], "lisen"),
        (
            "[limits]\noutbound_queue_bytes = 5000000000\n",
            &[],
            "limits.outbound_queue_bytes",
        ),
        (
            "[server]\nio_ring_depth = 65536\n",
            &[],
            "server.io_ring_depth",
        ),
        (
            "[server]\nwrite_delay_ms = 5000\n",
            &[],
            "server.write_delay_ms",
        ),
        ("[limits]\nmsg_rate = \"fast\"\n", &[], "limits.msg_rate"),
        (
            "[heartbeat]\ninterval_ms = 1000\ntimeout_ms = 500\n",
            &[],
            "heartbeat.timeout_ms",
        ),
        ("", &[("FANFARE_SERVER__NOPE", "1")], "FANFARE_SERVER__NOPE"),
        (
            "",
            &[("FANFARE_SERVER__LISTEN", "0.0.0.0:0")],
            "server.listen",
        ),
    ];
    for (text, env, key) in cases {
        let f = TempFile::new(text);
        for command in ["serve", "check-config"] {
            let (code, _, err) = run(&[command, "--config", f.0.to_str().unwrap()], env);
            assert_ne!(code, 0, "{command} accepted {text:?} {env:?}");
            assert!(
                err.contains(key),
                "{command}: error does not name {key}: {err}"
            );
        }
    }
}

#[test]
fn serve_runs_on_embedded_defaults_and_token_mints_for_it() {
    // No --config: built-in defaults, with only the port moved off 8080 for the test.
    let mut server = Server::start_embedded();
    let addr = server.addr;
    assert!(
        server
            .logs()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("development")),
        "dev secret warning"
    );
    let (code, token, err) = run(
        &["token", "--tenant", "t1", "--user", "dev", "--ttl", "60"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let mut c = connect_at(addr, &format!("ws://{addr}/ws?token={}", token.trim()), &[])
        .expect("dev token accepted");
    assert_eq!(c.recv()["userId"], "dev");
    // The dev publish key works too.
    let r = http(
        addr,
        "POST",
        "/v1/publish",
        &[("Authorization", "Bearer fanfare-dev-key")],
        br#"{"tenantId":"t1","event":{"type":"conversation.updated","conversationId":"c"}}"#,
    )
    .unwrap();
    assert_eq!(r.status, 202);
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit().success());
}

/// Allowed one CPU (as by a container's cpuset), the server runs one executor, pinned to that
/// CPU: not one per online CPU, pinned to CPUs the process was not given.
#[test]
fn serve_keeps_to_the_cpus_it_is_allowed() {
    let pid = std::process::id();
    let cpu = *cpus_allowed(pid, &pid.to_string()).last().expect("a CPU");
    let server = Server::start_on_cpus(&cpu.to_string(), "");
    assert_eq!(server.metric("fanfare_shards"), 1);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", server.pid())).unwrap();
    // Executor threads are named fanfare-1, fanfare-2, ... (with a helper thread each).
    let mut executors = std::collections::BTreeSet::new();
    for task in tasks {
        let tid = task.unwrap().file_name().into_string().unwrap();
        let name = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", server.pid()));
        let name = name.unwrap().trim().to_string();
        if name
            .strip_prefix("fanfare-")
            .is_some_and(|n| n.parse::<u32>().is_ok())
        {
            executors.insert(name);
        }
        assert_eq!(cpus_allowed(server.pid(), &tid), [cpu], "thread {tid}");
    }
    assert_eq!(executors.into_iter().collect::<Vec<_>>(), ["fanfare-1"]);
}

#[test]
fn env_overrides_reach_the_running_server() {
    let server = Server::start_with_env("", &[("FANFARE_HEARTBEAT__INTERVAL_MS", "1234")]);
    let mut c = server
        .connect_raw(&format!("/ws?token={}", token("t1", "u1", 60)))
        .unwrap();
    let ready = c.recv();
    assert_eq!(ready["heartbeatMs"], 1234);
}

#[test]
fn token_refuses_bad_ids() {
    let (code, _, err) = run(&["token", "--tenant", "bad tenant", "--user", "u"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("tenant"), "{err}");
}

#[test]
fn json_logs_are_one_object_per_line_without_tokens() {
    let f = TempFile::new(&base_config("[log]\nformat = \"json\""));
    let (mut child, lines, _readers) =
        spawn_logged(Command::new(bin()).args(["serve", "--config", f.0.to_str().unwrap()]));
    let parsed = |lines: &[String]| -> Vec<serde_json::Value> {
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    let addr: std::net::SocketAddr = wait_for("the listening line", || {
        let logs = parsed(&lines.lock().unwrap());
        logs.iter()
            .find(|v| v["fields"]["message"] == "listening")?["fields"]["addr"]
            .as_str()?
            .parse()
            .ok()
    });
    let t = token("t1", "u1", 60);
    let c = connect_at(addr, &format!("ws://{addr}/ws?token={t}"), &[]).unwrap();
    drop(c);
    let logs = wait_for("connect and disconnect lines", || {
        let logs = parsed(&lines.lock().unwrap());
        let has = |m: &str| logs.iter().any(|v| v["fields"]["message"] == m);
        (has("connect") && has("disconnect")).then_some(logs)
    });
    let disconnect = logs
        .iter()
        .find(|v| v["fields"]["message"] == "disconnect")
        .unwrap();
    assert_eq!(disconnect["fields"]["user"], "u1");
    assert!(disconnect["fields"]["duration_ms"].is_u64());
    assert!(!lines.lock().unwrap().iter().any(|l| l.contains(&t)));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_for("exit", || child.try_wait().ok().flatten()).success());
}
