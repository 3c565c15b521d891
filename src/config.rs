//! Typed configuration: embedded defaults, an optional TOML file, then `FANFARE_<SECTION>__<KEY>`
//! environment overrides, validated once at load.
//!
//! Invariants: every key has a default equal to `tuning/default.toml`; an unknown key, an
//! unknown `FANFARE_` variable or a bad value is an error naming the key; the server never
//! starts on a configuration that did not load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The HS256 secret used when none is configured. Logged as a warning; forbids non-loopback binds.
pub const DEV_SECRET: &str = "fanfare-dev-secret-do-not-use-in-production";
/// The publish API key used when none is configured. Same rules as [`DEV_SECRET`].
pub const DEV_API_KEY: &str = "fanfare-dev-key";

const ENV_PREFIX: &str = "FANFARE_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
    #[error("environment variable {var} names no config key")]
    UnknownEnv { var: String },
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub auth: Auth,
    pub limits: Limits,
    pub heartbeat: Heartbeat,
    pub presence: Presence,
    pub broker: Broker,
    pub fallback: Fallback,
    pub history: History,
    pub publish: Publish,
    pub log: Log,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub listen: String,
    pub shards: usize,
    pub allowed_origins: Vec<String>,
    pub shutdown_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub max_request_head_bytes: usize,
    pub listen_backlog: u32,
    pub mesh_queue_len: usize,
    pub io_memory_bytes: usize,
    pub io_ring_depth: usize,
    pub write_delay_ms: u16,
    pub echo_path: String,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: "127.0.0.1:8080".into(),
            shards: 0,
            allowed_origins: Vec::new(),
            shutdown_timeout_ms: 10_000,
            request_timeout_ms: 10_000,
            max_request_head_bytes: 8192,
            listen_backlog: 4096,
            mesh_queue_len: 8192,
            io_memory_bytes: 1 << 20,
            io_ring_depth: 4096,
            write_delay_ms: 0,
            echo_path: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    pub hs256_secret: String,
    pub rs256_public_key_file: String,
    pub es256_public_key_file: String,
    pub tenant_claim: String,
    pub audience: String,
    pub issuer: String,
    pub leeway_ms: u64,
    pub subscribe_policy: SubscribePolicy,
}

/// Who may subscribe to a conversation (PROTOCOL.md, "Who may subscribe to what").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscribePolicy {
    /// Any conversation of the user's tenant.
    Tenant,
    /// A conversation for which the subscribe carries a subscription token.
    Token,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            hs256_secret: DEV_SECRET.into(),
            rs256_public_key_file: String::new(),
            es256_public_key_file: String::new(),
            tenant_claim: "tid".into(),
            audience: String::new(),
            issuer: String::new(),
            leeway_ms: 0,
            subscribe_policy: SubscribePolicy::Tenant,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_bytes: usize,
    /// At most 4 GiB: the connections' handles keep it in 32 bits.
    pub outbound_queue_bytes: u32,
    pub max_publish_bytes: usize,
    pub connect_rate_per_ip: f64,
    pub connect_burst_per_ip: f64,
    pub msg_rate: f64,
    pub msg_burst: f64,
    pub max_subscriptions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 65_536,
            outbound_queue_bytes: 1 << 20,
            max_publish_bytes: 1 << 20,
            connect_rate_per_ip: 50.0,
            connect_burst_per_ip: 100.0,
            msg_rate: 50.0,
            msg_burst: 100.0,
            max_subscriptions: 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Heartbeat {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval_ms: 30_000,
            timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Presence {
    pub offline_grace_ms: u64,
    pub typing_throttle_ms: u64,
    pub mode: PresenceMode,
    pub max_watch: usize,
}

/// Who hears of a user's presence changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceMode {
    /// Every other user's connections in the tenant.
    Tenant,
    /// The connections whose watch list (`presence.watch`) holds the user.
    Watch,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            offline_grace_ms: 5000,
            typing_throttle_ms: 1000,
            mode: PresenceMode::Tenant,
            max_watch: 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    pub kind: BrokerKind,
    pub redis_url: String,
    /// With `kind = "redis-cluster"`: seed nodes, from which the topology is read.
    pub redis_urls: Vec<String>,
    pub channel_prefix: String,
    pub subscribe_timeout_ms: u64,
    pub instance_ttl_ms: u64,
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            kind: BrokerKind::Memory,
            redis_url: "redis://127.0.0.1:6379/0".into(),
            redis_urls: vec!["redis://127.0.0.1:7000".into()],
            channel_prefix: "fanfare".into(),
            subscribe_timeout_ms: 5000,
            instance_ttl_ms: 15_000,
        }
    }
}

impl Broker {
    /// The seed nodes of `redis_urls`: at least one, each a Redis URL without a database
    /// (a cluster has only database 0).
    pub fn cluster_seeds(&self) -> Result<Vec<crate::broker::Target>, ConfigError> {
        let bad = |m: String| ConfigError::key("broker.redis_urls", m);
        if self.redis_urls.is_empty() {
            return Err(bad("needs at least one seed node".into()));
        }
        self.redis_urls
            .iter()
            .map(|url| match crate::broker::Target::parse(url) {
                Ok(t) if t.db != 0 => Err(bad(format!("{url}: a cluster has only database 0"))),
                Ok(t) => Ok(t),
                Err(e) => Err(bad(format!("{url}: {e}"))),
            })
            .collect()
    }
}

/// HTTP fallback sessions (SSE and long-poll).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fallback {
    pub poll_timeout_ms: u64,
    pub session_ttl_ms: u64,
}

impl Default for Fallback {
    fn default() -> Self {
        Fallback {
            poll_timeout_ms: 25_000,
            session_ttl_ms: 60_000,
        }
    }
}

/// Missed-event recovery (off while `size` is 0).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct History {
    pub size: usize,
    pub ttl_ms: u64,
}

/// The most events kept per conversation.
pub const MAX_HISTORY_SIZE: usize = 10_000;

/// The kernel's limit on io_uring submission queue entries.
const MAX_IO_RING_DEPTH: usize = 32_768;
/// Longest `server.write_delay_ms`: events a second late are not live any more.
const MAX_WRITE_DELAY_MS: u16 = 1000;

impl Default for History {
    fn default() -> Self {
        History {
            size: 0,
            ttl_ms: 300_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Memory,
    Redis,
    #[serde(rename = "redis-cluster")]
    RedisCluster,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Publish {
    pub api_keys: Vec<String>,
}

impl Default for Publish {
    fn default() -> Self {
        Publish {
            api_keys: vec![DEV_API_KEY.into()],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Loads defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let defaults = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::key("<defaults>", e.to_string()))?;
        let mut overrides = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.into(),
                source,
            })?;
            overrides = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
                path: path.into(),
                message: e.to_string(),
            })?;
        }
        for (var, value) in env {
            let Some(name) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let (section, key) = name
                .split_once("__")
                .map(|(s, k)| (s.to_ascii_lowercase(), k.to_ascii_lowercase()))
                .ok_or_else(|| ConfigError::UnknownEnv { var: var.clone() })?;
            let default = defaults
                .get(&section)
                .and_then(|s| s.get(&key))
                .ok_or_else(|| ConfigError::UnknownEnv { var: var.clone() })?;
            let parsed = parse_env_value(default, &value)
                .map_err(|m| ConfigError::key(format!("{section}.{key} (from {var})"), m))?;
            overrides
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| ConfigError::key(name, "is not a section"))?
                .insert(key, parsed);
        }
        // `heartbeat.timeout_ms` defaults to twice the interval, whatever the interval is.
        if let Some(hb) = overrides
            .get_mut("heartbeat")
            .and_then(|h| h.as_table_mut())
        {
            if !hb.contains_key("timeout_ms") {
                if let Some(interval) = hb.get("interval_ms").and_then(|v| v.as_integer()) {
                    hb.insert(
                        "timeout_ms".into(),
                        toml::Value::Integer(interval.saturating_mul(2)),
                    );
                }
            }
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(overrides))
            .map_err(|e| ConfigError::key(e.path().to_string(), e.inner().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field checks that serde cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let listen = self.listen_addr()?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.server.shards > cores.min(64) {
            return Err(ConfigError::key(
                "server.shards",
                format!(
                    "{} is more than the {} usable cores (0 = all)",
                    self.server.shards,
                    cores.min(64)
                ),
            ));
        }
        let positive: [(&str, u64); 10] = [
            (
                "server.shutdown_timeout_ms",
                self.server.shutdown_timeout_ms,
            ),
            ("server.request_timeout_ms", self.server.request_timeout_ms),
            ("server.mesh_queue_len", self.server.mesh_queue_len as u64),
            (
                "limits.max_message_bytes",
                self.limits.max_message_bytes as u64,
            ),
            (
                "limits.outbound_queue_bytes",
                self.limits.outbound_queue_bytes as u64,
            ),
            ("heartbeat.interval_ms", self.heartbeat.interval_ms),
            ("fallback.poll_timeout_ms", self.fallback.poll_timeout_ms),
            ("fallback.session_ttl_ms", self.fallback.session_ttl_ms),
            ("history.ttl_ms", self.history.ttl_ms),
            ("presence.max_watch", self.presence.max_watch as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::key(key, "must be greater than 0"));
            }
        }
        if !(1..=MAX_IO_RING_DEPTH).contains(&self.server.io_ring_depth) {
            return Err(ConfigError::key(
                "server.io_ring_depth",
                format!("1 to {MAX_IO_RING_DEPTH} entries (io_uring's limit)"),
            ));
        }
        if self.server.write_delay_ms > MAX_WRITE_DELAY_MS {
            return Err(ConfigError::key(
                "server.write_delay_ms",
                format!("at most {MAX_WRITE_DELAY_MS} ms"),
            ));
        }
        if self.history.size > MAX_HISTORY_SIZE {
            return Err(ConfigError::key(
                "history.size",
                format!("at most {MAX_HISTORY_SIZE} events per conversation"),
            ));
        }
        let b = &self.broker;
        if b.kind == BrokerKind::Redis {
            crate::broker::Target::parse(&b.redis_url)
                .map_err(|m| ConfigError::key("broker.redis_url", m.to_string()))?;
        }
        if b.kind == BrokerKind::RedisCluster {
            b.cluster_seeds()?;
        }
        if b.channel_prefix.is_empty() || b.channel_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::key(
                "broker.channel_prefix",
                "must be non-empty, without spaces",
            ));
        }
        if b.subscribe_timeout_ms == 0 {
            return Err(ConfigError::key(
                "broker.subscribe_timeout_ms",
                "must be greater than 0",
            ));
        }
        if b.instance_ttl_ms < 300 {
            return Err(ConfigError::key(
                "broker.instance_ttl_ms",
                "must be at least 300",
            ));
        }
        if self.server.max_request_head_bytes < 512 {
            return Err(ConfigError::key(
                "server.max_request_head_bytes",
                "must be at least 512",
            ));
        }
        if self.heartbeat.timeout_ms <= self.heartbeat.interval_ms {
            return Err(ConfigError::key(
                "heartbeat.timeout_ms",
                "must be greater than heartbeat.interval_ms",
            ));
        }
        let rates = [
            (
                "limits.connect_rate_per_ip",
                self.limits.connect_rate_per_ip,
            ),
            (
                "limits.connect_burst_per_ip",
                self.limits.connect_burst_per_ip,
            ),
            ("limits.msg_rate", self.limits.msg_rate),
            ("limits.msg_burst", self.limits.msg_burst),
        ];
        for (key, value) in rates {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::key(key, "must be a positive number"));
            }
        }
        // A bucket that never holds a whole token never lets anything through.
        for (key, burst) in [
            (
                "limits.connect_burst_per_ip",
                self.limits.connect_burst_per_ip,
            ),
            ("limits.msg_burst", self.limits.msg_burst),
        ] {
            if burst < 1.0 {
                return Err(ConfigError::key(key, "must be at least 1"));
            }
        }
        if self.publish.api_keys.is_empty() || self.publish.api_keys.iter().any(|k| k.is_empty()) {
            return Err(ConfigError::key(
                "publish.api_keys",
                "needs at least one non-empty key",
            ));
        }
        let a = &self.auth;
        if a.hs256_secret.is_empty()
            && a.rs256_public_key_file.is_empty()
            && a.es256_public_key_file.is_empty()
        {
            return Err(ConfigError::key(
                "auth.hs256_secret",
                "no algorithm is enabled: set hs256_secret, rs256_public_key_file or es256_public_key_file",
            ));
        }
        if a.tenant_claim.trim().is_empty() {
            return Err(ConfigError::key(
                "auth.tenant_claim",
                "must be a non-empty claim name",
            ));
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::filter::EnvFilter>()
            .is_err()
        {
            return Err(ConfigError::key(
                "log.level",
                format!("`{}` is not a log filter", self.log.level),
            ));
        }
        let echo = &self.server.echo_path;
        if !echo.is_empty() && (!echo.starts_with('/') || echo.contains(char::is_whitespace)) {
            return Err(ConfigError::key(
                "server.echo_path",
                "must be empty (off) or a path such as \"/echo\"",
            ));
        }
        if !echo.is_empty() && !listen.ip().is_loopback() {
            return Err(ConfigError::key(
                "server.echo_path",
                format!("the unauthenticated echo endpoint is refused on {listen}: loopback addresses only"),
            ));
        }
        if self.uses_dev_secrets() && !listen.ip().is_loopback() {
            return Err(ConfigError::key(
                "server.listen",
                format!(
                    "{listen} is not a loopback address while the built-in development secret or \
                     API key is in use: set auth.hs256_secret and publish.api_keys"
                ),
            ));
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|_| {
            ConfigError::key(
                "server.listen",
                format!("`{}` is not an ip:port address", self.server.listen),
            )
        })
    }

    /// True while the built-in development secret or API key is configured.
    pub fn uses_dev_secrets(&self) -> bool {
        self.auth.hs256_secret == DEV_SECRET
            || self.publish.api_keys.iter().any(|k| k == DEV_API_KEY)
    }

    /// The effective configuration as TOML, as `check-config` prints it.
    pub fn to_toml(&self) -> String {
        // Serializing plain structs of strings, numbers and lists cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// Parses an environment value with the type of the key's default.
fn parse_env_value(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    use toml::Value;
    let raw = raw.trim();
    match default {
        Value::String(_) => Ok(Value::String(raw.into())),
        Value::Integer(_) => raw
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("`{raw}` is not an integer")),
        Value::Float(_) => raw
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("`{raw}` is not a number")),
        Value::Boolean(_) => raw
            .parse::<bool>()
            .map(Value::Boolean)
            .map_err(|_| format!("`{raw}` is not true or false")),
        Value::Array(_) => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.into()))
                .collect(),
        )),
        _ => Err("cannot be set from the environment".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with(text)
    }

    /// A tiny self-deleting temp file; keeps the crate free of a tempfile dependency.
    mod tempfile_path {
        use super::*;
        pub struct TempPath(pub PathBuf);
        impl TempPath {
            pub fn with(text: &str) -> TempPath {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("fanfare-cfg-{}-{n}.toml", std::process::id()));
                let mut f = std::fs::File::create(&p).unwrap();
                f.write_all(text.as_bytes()).unwrap();
                TempPath(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn defaults_equal_the_shipped_default_file() {
        let shipped = Config::load_from(Some(Path::new("tuning/default.toml")), env(&[])).unwrap();
        assert_eq!(shipped.to_toml(), Config::default().to_toml());
    }

    #[test]
    fn every_shipped_profile_loads() {
        for entry in std::fs::read_dir("tuning").unwrap() {
            let path = entry.unwrap().path();
            if let Err(e) = Config::load_from(Some(&path), env(&[])) {
                panic!("{}: {e}", path.display());
            }
        }
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let f = file("[limits]\nmax_subscriptions = 7\n");
        let c = Config::load_from(Some(&f.0), env(&[])).unwrap();
        assert_eq!(c.limits.max_subscriptions, 7);
        assert_eq!(
            c.limits.max_message_bytes,
            Limits::default().max_message_bytes
        );
        assert_eq!(c.server.listen, "127.0.0.1:8080");
    }

    #[test]
    fn env_overrides_file_with_typed_values_and_lists() {
        let f = file("[server]\nlisten = \"127.0.0.1:1\"\n");
        let c = Config::load_from(
            Some(&f.0),
            env(&[
                ("FANFARE_SERVER__LISTEN", "127.0.0.1:9001"),
                ("FANFARE_PUBLISH__API_KEYS", "k1, k2"),
                ("FANFARE_LIMITS__MSG_RATE", "12.5"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9001");
        assert_eq!(c.publish.api_keys, vec!["k1", "k2"]);
        assert_eq!(c.limits.msg_rate, 12.5);
    }

    #[test]
    fn heartbeat_timeout_follows_interval_unless_set() {
        let c = Config::load_from(None, env(&[("FANFARE_HEARTBEAT__INTERVAL_MS", "100")])).unwrap();
        assert_eq!(c.heartbeat.timeout_ms, 200);
        let c = Config::load_from(
            None,
            env(&[
                ("FANFARE_HEARTBEAT__INTERVAL_MS", "100"),
                ("FANFARE_HEARTBEAT__TIMEOUT_MS", "150"),
            ]),
        )
        .unwrap();
        assert_eq!(c.heartbeat.timeout_ms, 150);
    }

    fn error_of(text: &str, vars: &[(&str, &str)]) -> String {
        let f = file(text);
        Config::load_from(Some(&f.0), env(vars))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_input_names_the_key() {
        assert!(error_of("[server]\nlisen = \"x\"\n", &[]).contains("lisen"));
        assert!(error_of("[nope]\n", &[]).contains("nope"));
        assert!(error_of("[limits]\nmax_message_bytes = \"big\"\n", &[])
            .contains("limits.max_message_bytes"));
        assert!(
            error_of("[heartbeat]\ninterval_ms = 100\ntimeout_ms = 50\n", &[])
                .contains("heartbeat.timeout_ms")
        );
        assert!(error_of("[server]\nlisten = \"nowhere\"\n", &[]).contains("server.listen"));
        assert!(error_of("", &[("FANFARE_SERVER__LISTN", "x")]).contains("FANFARE_SERVER__LISTN"));
        assert!(error_of("", &[("FANFARE_BOGUS", "x")]).contains("FANFARE_BOGUS"));
        assert!(error_of("", &[("FANFARE_LIMITS__MSG_RATE", "fast")]).contains("limits.msg_rate"));
        assert!(error_of("[limits]\nmsg_rate = 0.0\n", &[]).contains("limits.msg_rate"));
        assert!(error_of("[publish]\napi_keys = []\n", &[]).contains("publish.api_keys"));
        assert!(error_of("[log]\nformat = \"xml\"\n", &[]).contains("log.format"));
        assert!(error_of("not toml [", &[]).contains("not valid TOML"));
        assert!(error_of(
            "[broker]\nkind = \"redis\"\nredis_url = \"http://x\"\n",
            &[]
        )
        .contains("broker.redis_url"));
        assert!(error_of("[broker]\nkind = \"kafka\"\n", &[]).contains("broker.kind"));
        let cluster = |urls: &str| {
            error_of(
                &format!("[broker]\nkind = \"redis-cluster\"\nredis_urls = [{urls}]\n"),
                &[],
            )
        };
        assert!(cluster("").contains("`broker.redis_urls`: needs at least one seed node"));
        assert!(cluster("\"redis://h:7000/2\"").contains("a cluster has only database 0"));
        assert!(cluster("\"redis://h:7000\", \"h:7001\"").contains("h:7001: must start with"));
        let f = file("");
        let env = env(&[
            ("FANFARE_BROKER__KIND", "redis-cluster"),
            (
                "FANFARE_BROKER__REDIS_URLS",
                "redis://a:7000, redis://:pw@b:7001",
            ),
        ]);
        let seeds = Config::load_from(Some(&f.0), env)
            .unwrap()
            .broker
            .cluster_seeds();
        let seeds: Vec<(String, u16)> = seeds
            .unwrap()
            .into_iter()
            .map(|t| (t.host, t.port))
            .collect();
        assert_eq!(seeds, [("a".into(), 7000), ("b".into(), 7001)]);
        assert!(
            error_of("[fallback]\npoll_timeout_ms = 0\n", &[]).contains("fallback.poll_timeout_ms")
        );
        assert!(error_of("", &[("FANFARE_FALLBACK__SESSION_TTL_MS", "0")])
            .contains("fallback.session_ttl_ms"));
        assert!(
            error_of("", &[("FANFARE_FALLBACK__SESSION_TTL_MS", "soon")])
                .contains("fallback.session_ttl_ms")
        );
    }

    #[test]
    fn history_is_bounded_and_needs_a_ttl() {
        let c = Config::load_from(None, env(&[("FANFARE_HISTORY__SIZE", "100")])).unwrap();
        assert_eq!((c.history.size, c.history.ttl_ms), (100, 300_000));
        assert!(error_of("[history]\nsize = 10001\n", &[]).contains("history.size"));
        assert!(error_of("[history]\nttl_ms = 0\n", &[]).contains("history.ttl_ms"));
        assert!(error_of("", &[("FANFARE_HISTORY__SIZE", "-1")]).contains("history.size"));
    }

    #[test]
    fn the_echo_endpoint_is_for_loopback_only() {
        let c = Config::load_from(None, env(&[("FANFARE_SERVER__ECHO_PATH", "/echo")])).unwrap();
        assert_eq!(c.server.echo_path, "/echo");
        let secrets = "[auth]\nhs256_secret = \"s\"\n[publish]\napi_keys = [\"k\"]\n";
        let open = format!("[server]\nlisten = \"0.0.0.0:80\"\necho_path = \"/echo\"\n{secrets}");
        assert!(error_of(&open, &[]).contains("loopback"));
        assert!(error_of("[server]\necho_path = \"echo\"\n", &[]).contains("server.echo_path"));
    }

    #[test]
    fn dev_secrets_refuse_non_loopback_binds() {
        let e = error_of("[server]\nlisten = \"0.0.0.0:8080\"\n", &[]);
        assert!(
            e.contains("server.listen") && e.contains("development"),
            "{e}"
        );
        let ok = file("[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\nhs256_secret = \"s3cret-s3cret-s3cret\"\n[publish]\napi_keys = [\"k\"]\n");
        assert!(Config::load_from(Some(&ok.0), env(&[])).is_ok());
    }
}
