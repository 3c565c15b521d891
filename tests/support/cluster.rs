//! A real Redis Cluster of the test's own: three masters and three replicas on free ports
//! (each with its bus port free), made with `redis-cli --cluster create`, and the operations
//! the tests put it through (kill a master, reshard, restart all of it).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{now_ms, wait_for, Redis};

pub struct RedisCluster {
    pub nodes: Vec<Redis>,
    dir: PathBuf,
}

/// A line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeLine {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// `start-end` or `slot` ranges (masters only).
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "fanfare-cluster-{}-{}",
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let nodes: Vec<Redis> = (0..6).map(|_| Redis::start_cluster_node(&dir)).collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let status = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli (apt-get install redis-server)");
        assert!(status.success(), "redis-cli --cluster create: {status}");
        let cluster = RedisCluster { nodes, dir };
        cluster.wait_healthy();
        cluster
    }

    /// Seed URLs for `broker.redis_urls`: the first node alone, so that the rest of the
    /// topology must be read from it.
    pub fn seeds(&self) -> Vec<String> {
        vec![self.nodes[0].url().trim_end_matches("/0").to_string()]
    }

    /// `redis-cli` at node `at`, `-c` (follows MOVED): its stdout.
    pub fn cli(&self, at: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.nodes[at].port.to_string(), "-c"])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Index of a node that is up.
    fn alive(&self) -> usize {
        (0..self.nodes.len())
            .find(|&i| self.nodes[i].command(&["PING"]).is_ok())
            .expect("a cluster node that answers")
    }

    /// `CLUSTER NODES` as a node that is up sees it.
    pub fn topology(&self) -> Vec<NodeLine> {
        let text = self.cli(self.alive(), &["CLUSTER", "NODES"]);
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                let flags = f.get(2)?;
                let slots = f
                    .iter()
                    .skip(8)
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|n| (n, n)),
                    })
                    .collect();
                Some(NodeLine {
                    id: f[0].to_string(),
                    port,
                    master: flags.contains("master"),
                    failed: flags.contains("fail"),
                    slots,
                })
            })
            .collect()
    }

    /// Every live node says `cluster_state:ok`, and every live replica's link to its master is
    /// up (before that, a replica refuses to take over).
    pub fn wait_healthy(&self) {
        wait_for("the cluster to be ok with every replica linked", || {
            let all = self.nodes.iter().filter(|n| n.command(&["PING"]).is_ok());
            all.into_iter()
                .all(|n| {
                    let info = n.command(&["CLUSTER", "INFO"]).unwrap_or_default();
                    let repl = n.command(&["INFO", "replication"]).unwrap_or_default();
                    info.contains("cluster_state:ok")
                        && (repl.contains("role:master") || repl.contains("master_link_status:up"))
                })
                .then_some(())
        });
    }

    /// The slot of `key`, as the cluster computes it.
    pub fn slot(&self, key: &str) -> u16 {
        let reply = self.cli(self.alive(), &["CLUSTER", "KEYSLOT", key]);
        reply.trim().parse().expect("CLUSTER KEYSLOT")
    }

    /// Index (in `nodes`) of the master serving `slot` now.
    pub fn master_of(&self, slot: u16) -> usize {
        let line = self
            .topology()
            .into_iter()
            .find(|n| n.master && !n.failed && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .expect("a master serving the slot");
        self.index_of(line.port)
    }

    fn index_of(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of this cluster")
    }

    /// Kills node `at`.
    pub fn kill(&mut self, at: usize) {
        self.nodes[at].kill();
    }

    /// Waits until some live master serves `slot` again.
    pub fn wait_served(&self, slot: u16) -> usize {
        wait_for("a live master to serve the slot", || {
            let line = self.topology().into_iter().find(|n| {
                n.master && !n.failed && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
            })?;
            let at = self.index_of(line.port);
            self.nodes[at].command(&["PING"]).ok().map(|_| at)
        })
    }

    /// Moves `slots` slots from master `from` to master `to` with `redis-cli --cluster
    /// reshard` (keys migrated, the nodes told), waiting for it to end.
    pub fn reshard(&self, from: usize, to: usize, slots: u16) {
        let id = |at: usize| {
            self.topology()
                .into_iter()
                .find(|n| n.port == self.nodes[at].port)
                .expect("the node in CLUSTER NODES")
                .id
        };
        let status = Command::new("redis-cli")
            .args(["--cluster", "reshard"])
            .arg(format!("127.0.0.1:{}", self.nodes[to].port))
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli --cluster reshard");
        assert!(status.success(), "reshard: {status}");
    }

    /// Kills every node and starts each again on its port, with its `nodes.conf`.
    pub fn restart_all(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        for node in &mut self.nodes {
            node.restart();
        }
        self.wait_healthy();
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
