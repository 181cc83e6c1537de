//! Node configuration, layered: built-in defaults, then a TOML file
//! (`--config`), then `TALLY_*` environment variables, then flags.

use std::path::PathBuf;

use clap::Parser;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// How `tallyd` writes its log lines.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeConfig {
    /// This node's id, unique and non-zero.
    pub node_id: u64,
    /// gRPC listen address of the public API (Ingest, Query, Cluster).
    pub listen: String,
    /// Address clients use to reach this node (default: listen).
    pub advertise: Option<String>,
    /// gRPC listen address of peer traffic (the internal Raft service).
    /// Kept apart from the public port so it can be firewalled, and later
    /// given mutual TLS, on its own.
    pub peer_listen: String,
    /// Address peers use to reach this node's peer port (default:
    /// peer_listen).
    pub peer_advertise: Option<String>,
    /// HTTP listen address of /metrics, /healthz and /readyz; empty = off.
    pub http_listen: String,
    /// Log lines as human-readable text or as one JSON object per line (for
    /// log shippers).
    pub log_format: LogFormat,
    /// File of hashed bearer tokens and their roles (`api/auth.rs`); every
    /// public call but health and reflection then needs one. Reloaded on
    /// SIGHUP. Unset = no tokens (anyone who reaches the port may call).
    pub auth_file: Option<String>,
    /// File holding the token (plain, one line) this node presents on other
    /// nodes' public ports; it needs the `node` role there. Required with
    /// `auth_file`.
    pub node_token_file: Option<String>,
    /// This node's certificate and key (PEM), on both ports and for its
    /// calls to other nodes; with `peer_ca`, turns TLS on (`tls.rs`).
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// The cluster's CA (PEM): the peer port requires client certificates
    /// from it (mutual TLS), and this node verifies the nodes it calls.
    pub peer_ca: Option<String>,
    /// CA (PEM) whose client certificates the public port then requires.
    pub tls_client_ca: Option<String>,
    /// Where RocksDB and snapshots live.
    pub data_dir: String,
    /// Dedup window for event ids, seconds (at least 600 recommended).
    pub dedup_window_secs: u64,
    /// Memory the dedup indexes of this node's replicas may take together,
    /// MiB (~23 bytes per event id in the window). At the bound, leaders on
    /// this node refuse new events (RESOURCE_EXHAUSTED) until keys expire:
    /// they never forget a key early. 0 = unbounded.
    pub dedup_memory_mib: u64,
    /// Raft entries between snapshots of a group.
    pub snapshot_logs: u64,
    /// A group's applied state is checkpointed to RocksDB once its oldest
    /// unwritten change is this old (sooner when it holds many buckets).
    /// Bounds the log replayed after a crash.
    pub checkpoint_interval_ms: u64,
    /// How often the leaders on this node check whether retention expires
    /// more of their partitions (`expiry.rs`); floors move at most hourly,
    /// so this only bounds how late they follow.
    pub retention_check_ms: u64,
    /// The cold archive (`storage/archive.rs`): `s3://bucket/prefix`,
    /// `file:///dir` or a directory; every node must name the same one.
    /// Without it this node neither exports nor reads archived buckets.
    pub archive_url: Option<String>,
    /// How often the leaders on this node seal and export what the
    /// retention policy's `archive_after_ms` makes due (`archiver.rs`).
    pub archive_check_ms: u64,
    /// How long archived rows read once stay cached (archived files never
    /// change; the lease bounds how long a file removed by hand answers).
    pub archive_cache_lease_ms: u64,
    /// Spread an entity by itself once it takes more than this share (0 to
    /// 1) of a busy partition's events for two checks in a row (`api/
    /// spread.rs`); 0 (the default) leaves spreading to the operator.
    /// Acted on by the metadata leader: give every node the same value.
    pub auto_spread_share: f64,
    /// A partition below this many events/s is never busy enough to spread.
    pub auto_spread_min_events_per_sec: f64,
    /// Partitions an automatic spread adds besides the home.
    pub auto_spread_ways: u32,
    /// Split a partition by itself once its leader reports more than this
    /// many events/s for three checks in a row (`api/auto_split.rs`); 0 (the
    /// default) leaves splitting to the operator. Acted on by the metadata
    /// leader: give every node the same value.
    pub auto_split_events_per_sec: f64,
    /// Automatic splits stop once the cluster has this many partitions.
    pub auto_split_max_partitions: u32,
    /// How often the metadata leader's balancer may move one leadership
    /// toward even load (`api/balancer.rs`); 0 turns it off on this node.
    pub balancer_interval_ms: u64,
    /// Leader heartbeat interval of an active Raft group.
    pub heartbeat_ms: u64,
    /// Minimum election timeout; the maximum, which is also openraft's
    /// leader lease, is twice this. Bounds failover of an active group.
    pub election_timeout_ms: u64,
    /// Node-level liveness probe interval (one ping per peer).
    pub ping_ms: u64,
    /// A group idle this long quiesces: no heartbeats, no timers. 0 never.
    pub quiesce_after_ms: u64,
    pub connect_timeout_ms: u64,
    /// Time a partition's share of an ingest request may take to commit.
    pub ingest_timeout_ms: u64,
    /// Events per Raft entry at most.
    pub max_batch_events: usize,
    /// Raft entries in flight per partition.
    pub max_inflight: usize,
    /// Extra wait for more requests when entries are already in flight.
    pub linger_us: u64,
    /// Seconds to wait for in-flight requests on SIGTERM.
    pub drain_secs: u64,
    /// `ID=ADDR`: reach peer ID's peer port at ADDR instead of its
    /// advertised peer address (a NAT, a sidecar, or a test's fault proxy on
    /// that one link). Public calls between nodes are not rerouted.
    pub peer_routes: Vec<String>,
    /// How far this node's clock may be from the cluster's before dedup
    /// stamps follow the cluster's clock instead (see `clock.rs`).
    pub max_clock_skew_ms: u64,
    /// Testing only: shift this node's wall clock by this many ms, to check
    /// that a skewed clock cannot break deduplication.
    pub clock_offset_ms: i64,
    /// Testing only: end the process at this named point (`crash_point.rs`).
    pub crash_at: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 1,
            listen: "127.0.0.1:7001".into(),
            advertise: None,
            peer_listen: "127.0.0.1:7101".into(),
            peer_advertise: None,
            http_listen: String::new(),
            log_format: LogFormat::Text,
            auth_file: None,
            node_token_file: None,
            tls_cert: None,
            tls_key: None,
            peer_ca: None,
            tls_client_ca: None,
            data_dir: "./.tally/node1".into(),
            dedup_window_secs: 600,
            dedup_memory_mib: 1024,
            snapshot_logs: 10_000,
            checkpoint_interval_ms: 5_000,
            retention_check_ms: 60_000,
            archive_url: None,
            archive_check_ms: 60_000,
            archive_cache_lease_ms: 300_000,
            auto_spread_share: 0.0,
            auto_spread_min_events_per_sec: 1_000.0,
            auto_spread_ways: 4,
            auto_split_events_per_sec: 0.0,
            auto_split_max_partitions: 256,
            balancer_interval_ms: 10_000,
            // The lease (twice the election timeout, 800 ms) bounds failover:
            // voters refuse a new leader until it has run out. Shorter
            // (150/300, 100/250) kept a 1,000-partition cluster on a 2-core
            // machine with one core taken from electing within a minute:
            // heartbeat acks later than the lease make leaders refuse writes
            // and followers elect. 250 (a 500 ms lease) with 300 ms
            // heartbeats failed over in 0.8-1.0 s from a single kill, but
            // under sustained load (29,456 events/s, 20 kills) the median
            // went from 1.4 s to 2.3 s and a 10,000-partition start did not
            // finish electing. Heartbeats every 300 ms rather than 200
            // (still more than two per lease): on a machine half as fast,
            // 1,000 new groups were all led 22-25 s after initialisation
            // instead of 31-37 s, since until they quiesce their heartbeats
            // are most of the load.
            heartbeat_ms: 300,
            election_timeout_ms: 400,
            ping_ms: 100,
            quiesce_after_ms: 2_000,
            connect_timeout_ms: 1_000,
            ingest_timeout_ms: 10_000,
            max_batch_events: 20_000,
            max_inflight: 4,
            linger_us: 1_000,
            drain_secs: 10,
            peer_routes: Vec::new(),
            max_clock_skew_ms: 2_000,
            clock_offset_ms: 0,
            crash_at: None,
        }
    }
}

impl NodeConfig {
    /// The configuration as a TOML file `--config` accepts.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    pub fn advertise_addr(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    pub fn peer_advertise_addr(&self) -> &str {
        self.peer_advertise.as_deref().unwrap_or(&self.peer_listen)
    }

    /// Parsed `peer_routes`.
    pub fn peer_route_map(&self) -> Result<std::collections::HashMap<u64, String>, String> {
        self.peer_routes
            .iter()
            .map(|r| {
                let (id, addr) = r.split_once('=').ok_or_else(|| format!("peer_routes: {r:?} is not ID=ADDR"))?;
                let id = id.trim().parse::<u64>().map_err(|_| format!("peer_routes: {id:?} is not a node id"))?;
                Ok((id, addr.trim().to_string()))
            })
            .collect()
    }
}

/// tallyd — a Tally node. Flags override `TALLY_*` environment variables,
/// which override the TOML file given with --config.
#[derive(Debug, Parser, Serialize)]
#[command(name = "tallyd", version, about)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "TALLY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the configuration that defaults, file, environment and flags
    /// add up to (TOML, usable as --config) and exit without starting.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Listen address of peer (Raft) traffic, e.g. 127.0.0.1:7101.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<String>,
    /// Address peers use to reach --peer-listen (default: --peer-listen).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_advertise: Option<String>,
    /// Listen address of /metrics (Prometheus), /healthz and /readyz, e.g.
    /// 127.0.0.1:8001; empty (the default) = no HTTP listener.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// Log format: text (default) or json (one object per line).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// File of hashed bearer tokens with roles (NAME ROLES SHA256-HEX per
    /// line); every public call but health then needs a token. Reloaded on
    /// SIGHUP.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_file: Option<String>,
    /// File with the token this node presents to other nodes (role `node`
    /// in their auth file); required with --auth-file.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_token_file: Option<String>,
    /// This node's certificate (PEM), served on both ports and presented to
    /// other nodes; needs --tls-key and --peer-ca.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    /// The key of --tls-cert (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    /// The cluster's CA (PEM): the peer port accepts only nodes with a
    /// certificate from it (mutual TLS), and this node checks those it calls.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_ca: Option<String>,
    /// Require client certificates from this CA (PEM) on the public port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_window_secs: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_memory_mib: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_logs: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_check_ms: Option<u64>,
    /// The cold archive: s3://bucket/prefix, file:///dir or a directory
    /// (the same for every node).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_url: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_check_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_cache_lease_ms: Option<u64>,
    /// Spread an entity above this share of a busy partition's events by
    /// itself (0 = never).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_spread_share: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_spread_min_events_per_sec: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_spread_ways: Option<u32>,
    /// Split a partition above this many events/s by itself (0 = never).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_split_events_per_sec: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_split_max_partitions: Option<u32>,
    /// How often the balancer may move a leadership (0 = off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balancer_interval_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub election_timeout_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiesce_after_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest_timeout_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_events: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linger_us: Option<u64>,
    /// Reach peer ID's peer port at ADDR: `--peer-route 2=127.0.0.1:9002`
    /// (repeatable).
    #[arg(long = "peer-route")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peer_routes: Vec<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_clock_skew_ms: Option<u64>,
    /// Testing only: shift this node's wall clock (ms, may be negative).
    #[arg(long, hide = true, allow_hyphen_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<i64>,
    /// Testing only: abort at a named crash point (see `crash_point.rs`).
    #[arg(long, hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash_at: Option<String>,
}

impl Cli {
    pub fn load(self) -> Result<NodeConfig, Box<figment::Error>> {
        let mut fig = Figment::from(Serialized::defaults(NodeConfig::default()));
        if let Some(path) = &self.config {
            fig = fig.merge(Toml::file(path));
        }
        let config: NodeConfig = fig
            .merge(Env::prefixed("TALLY_").ignore(&["config", "addr", "home"]))
            .merge(Serialized::defaults(&self))
            .extract()
            .map_err(Box::new)?;
        let max_window_secs = crate::dedup_table::MAX_WINDOW_MS / 1000;
        if config.dedup_window_secs == 0 || config.dedup_window_secs > max_window_secs {
            return Err(Box::new(figment::Error::from(format!(
                "dedup_window_secs: {} is outside 1..={max_window_secs} (the dedup index keeps generations of a window up to {} hours)",
                config.dedup_window_secs,
                max_window_secs / 3600
            ))));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_format_is_text_unless_asked_for_json() {
        assert_eq!(Cli::parse_from(["tallyd"]).load().unwrap().log_format, LogFormat::Text);
        let cli = Cli::parse_from(["tallyd", "--log-format", "json"]);
        assert_eq!(cli.load().unwrap().log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["tallyd", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn flags_override_file_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.toml");
        std::fs::write(&path, "node_id = 7\nlisten = \"0.0.0.0:9000\"\nsnapshot_logs = 50\n").unwrap();
        let cli = Cli::parse_from(["tallyd", "--config", path.to_str().unwrap(), "--listen", "127.0.0.1:7100"]);
        let cfg = cli.load().unwrap();
        assert_eq!(cfg.node_id, 7);
        assert_eq!(cfg.listen, "127.0.0.1:7100");
        assert_eq!(cfg.snapshot_logs, 50);
        assert_eq!(cfg.heartbeat_ms, NodeConfig::default().heartbeat_ms);
        assert_eq!(cfg.peer_listen, "127.0.0.1:7101");
    }

    #[test]
    fn a_printed_configuration_reads_back_as_the_same() {
        let cli =
            Cli::parse_from(["tallyd", "--node-id", "3", "--http-listen", "0.0.0.0:8001", "--peer-route", "2=h:1"]);
        let cfg = cli.load().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("printed.toml");
        std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
        let again = Cli::parse_from(["tallyd", "--config", path.to_str().unwrap()]).load().unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn peer_port_flags() {
        let cli = Cli::parse_from(["tallyd", "--peer-listen", "0.0.0.0:9101", "--peer-advertise", "10.0.0.5:9101"]);
        let cfg = cli.load().unwrap();
        assert_eq!(cfg.peer_listen, "0.0.0.0:9101");
        assert_eq!(cfg.peer_advertise_addr(), "10.0.0.5:9101");
        assert_eq!(NodeConfig::default().peer_advertise_addr(), "127.0.0.1:7101");
    }
}
