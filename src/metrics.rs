//! Per-core statistics, merged when `/metrics` is scraped.
//!
//! Invariant: each [`CoreStats`] is written only by its own core (a plain load and store, no
//! locked instruction, no lock) and read by any core at scrape time. Each sits on its own cache
//! line so cores never share a written line.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

/// A counter with a single writer.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    /// For gauges: the single writer lowers what it raised.
    pub fn dec(&self) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(1), Relaxed);
    }
    /// For gauges that are states (1 or 0).
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

macro_rules! core_stats {
    ($($name:ident $({ $label:literal })?: $kind:literal, $help:literal;)*) => {
        /// What one core counts.
        #[derive(Default)]
        pub struct CoreStats { $(pub $name: Counter,)* }

        impl CoreStats {
            /// Each counter as `(name, label, kind, help, value)`. A labelled one's name is its
            /// family's: the field name up to its last `_` (`sessions_open_sse` is
            /// `sessions_open{transport="sse"}`).
            fn rows(&self) -> impl Iterator<Item = Row> + '_ {
                [$({
                    let name = stringify!($name);
                    let label: Option<&'static str> = None $(.or(Some($label)))?;
                    let family = match label {
                        Some(_) => name.rsplit_once('_').map_or(name, |(f, _)| f),
                        None => name,
                    };
                    (family, label, $kind, $help, self.$name.get())
                },)*].into_iter()
            }
        }
    };
}

type Row = (
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static str,
    u64,
);

core_stats! {
    connections_open: "gauge", "WebSocket connections open now";
    connects_total: "counter", "WebSocket connections accepted";
    sessions_open_sse { "transport=\"sse\"" }: "gauge", "HTTP fallback sessions open now, by the transport attached (sse, poll, none)";
    sessions_open_poll { "transport=\"poll\"" }: "gauge", "";
    sessions_open_none { "transport=\"none\"" }: "gauge", "";
    sessions_total: "counter", "HTTP fallback sessions created";
    session_resumes_total: "counter", "session readers that resumed: SSE streams opened with Last-Event-ID, long-polls again from an earlier cursor";
    session_handovers_total: "counter", "session requests that reached another core than the session's and were handed over to it with their connection";
    session_expiries_total: "counter", "HTTP fallback sessions ended by fallback.session_ttl_ms with nothing attached";
    rejected_unauthorized_total: "counter", "connection attempts refused: bad token (401)";
    rejected_rate_limited_total: "counter", "connection attempts refused: per-IP rate limit (429)";
    rejected_origin_total: "counter", "connection attempts refused: origin not allowed (403)";
    rejected_bad_request_total: "counter", "HTTP requests refused as malformed, too large or too slow";
    events_published_total: "counter", "events accepted by the publish API";
    frames_delivered_total: "counter", "event frames queued to connections";
    bytes_written_total: "counter", "bytes written to WebSocket connections and SSE streams";
    writes_total: "counter", "batches of frames written to WebSocket connections and SSE streams, one send each when the socket takes them";
    presence_frames_total: "counter", "presence.online and presence.offline frames queued to connections";
    frames_shed_total: "counter", "presence.typing frames dropped because a connection's queue was full";
    slow_consumer_closes_total: "counter", "connections closed with 1013 (outbound queue over its limit)";
    rate_limit_closes_total: "counter", "connections closed with 4008 (message rate)";
    heartbeat_closes_total: "counter", "connections closed with 4009 (heartbeat timeout)";
    client_errors_total: "counter", "client events answered with an error";
    mesh_overflow_total: "counter", "event deliveries to another core dropped because its ring and outbox were full (its subscribers get error overloaded)";
    mesh_queued_total: "counter", "cross-core messages that found the ring full and waited in the outbox";
    recoveries_total_recovered { "result=\"recovered\"" }: "counter", "subscribes with since, by result: recovered (what was missed was replayed), or not because of another epoch, a point ahead of the latest offset, events no longer kept, a repeated subscribe, history off";
    recoveries_total_epoch { "result=\"epoch\"" }: "counter", "";
    recoveries_total_ahead { "result=\"ahead\"" }: "counter", "";
    recoveries_total_trimmed { "result=\"trimmed\"" }: "counter", "";
    recoveries_total_repeated { "result=\"repeated\"" }: "counter", "";
    recoveries_total_off { "result=\"off\"" }: "counter", "";
    events_replayed_total: "counter", "events replayed to subscribers that recovered";
    history_reads_total: "counter", "reads of a conversation's history from Redis for recoveries that the owner core's cache could not answer (one for all that wait together)";
    redis_invalid_total: "counter", "messages on conversation channels in Redis dropped as invalid (not a publishable event)";
    core_stalls_total: "counter", "times the watchdog woke a core that slept through its wake-up (a lost io_uring wake-up; see src/watchdog.rs)";
    broker_up: "gauge", "cores whose Redis connections are up (with a cluster: to every master, every slot served)";
}

/// Every core's statistics, indexed by shard.
pub type Registry = Arc<[CachePadded<CoreStats>]>;

pub fn registry(shards: usize) -> Registry {
    (0..shards)
        .map(|_| CachePadded::new(CoreStats::default()))
        .collect()
}

/// A process's CPU time and resident memory, from `/proc` (Linux).
#[derive(Debug, Clone, Copy)]
pub struct ProcessUsage {
    pub cpu_s: f64,
    pub rss_kib: u64,
}

impl ProcessUsage {
    pub fn of(pid: u32) -> Option<ProcessUsage> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name (which may hold spaces), utime and stime are fields 12 and 13.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
        // SAFETY: sysconf has no memory effects.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu_s =
            (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / tick;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib = status.lines().find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })?;
        Some(ProcessUsage { cpu_s, rss_kib })
    }
}

/// Prometheus text exposition of the sums over all cores.
pub fn render(registry: &Registry) -> String {
    let mut totals: Vec<Row> = Vec::new();
    for (i, core) in registry.iter().enumerate() {
        for (row, (name, label, kind, help, value)) in core.rows().enumerate() {
            if i == 0 {
                totals.push((name, label, kind, help, value));
            } else {
                totals[row].4 = totals[row].4.wrapping_add(value);
            }
        }
    }
    let mut out = String::with_capacity(4096);
    let mut family = "";
    for (name, label, kind, help, value) in totals {
        // Writing into a String cannot fail. A family's HELP and TYPE come once, first.
        if name != family {
            let _ = write!(
                out,
                "# HELP fanfare_{name} {help}\n# TYPE fanfare_{name} {kind}\n"
            );
            family = name;
        }
        match label {
            Some(label) => _ = writeln!(out, "fanfare_{name}{{{label}}} {value}"),
            None => _ = writeln!(out, "fanfare_{name} {value}"),
        }
    }
    let _ = write!(
        out,
        "# HELP fanfare_shards executor cores\n# TYPE fanfare_shards gauge\nfanfare_shards {}\n",
        registry.len()
    );
    if let Some(p) = ProcessUsage::of(std::process::id()) {
        let _ = write!(
            out,
            "# HELP process_cpu_seconds_total user and system CPU time\n\
             # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n\
             # HELP process_resident_memory_bytes resident set size\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}\n",
            p.cpu_s,
            p.rss_kib * 1024
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cores() {
        let r = registry(2);
        r[0].frames_delivered_total.add(3);
        r[1].frames_delivered_total.add(4);
        r[1].connections_open.inc();
        r[1].connections_open.inc();
        r[1].connections_open.dec();
        let text = render(&r);
        assert!(
            text.contains("\nfanfare_frames_delivered_total 7\n"),
            "{text}"
        );
        assert!(text.contains("\nfanfare_connections_open 1\n"));
        assert!(text.contains("# TYPE fanfare_connections_open gauge"));
        r[0].sessions_open_poll.inc();
        let text = render(&r);
        assert!(
            text.contains(
                "# TYPE fanfare_sessions_open gauge\nfanfare_sessions_open{transport=\"sse\"} 0\n\
                 fanfare_sessions_open{transport=\"poll\"} 1\nfanfare_sessions_open{transport=\"none\"} 0\n"
            ),
            "one family, three labelled rows: {text}"
        );
        assert_eq!(text.matches("# HELP fanfare_sessions_open ").count(), 1);
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    }
}
