//! Harness for tests against real Tally clusters: starts `tallyd` processes
//! on free loopback ports (a public and a peer port each) with their own
//! data directories, kills and restarts them, and offers gRPC clients to
//! each node.
//!
//! The binary is taken from `TALLYD_BIN`, else from the cargo target
//! directory the tests were built in (`scripts/test.sh` builds it first).

pub mod checker;
pub mod cli;
pub mod ingestor;
pub mod model;
pub mod nemesis;
pub mod netproxy;
pub mod python;
pub mod raw;
pub mod serial;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tally_client::TokenChannel;
use tally_proto::v1::cluster_client::ClusterClient;
use tally_proto::v1::ingest_client::IngestClient;
use tally_proto::v1::query_client::QueryClient;
use tally_proto::v1::{DigestRequest, InitializeRequest, NodeInfo, StatusRequest, StatusResponse};

pub fn tallyd_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("TALLYD_BIN") {
        return Ok(PathBuf::from(p));
    }
    // Test binaries live in <target>/<profile>/deps/.
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("test binary location")?;
    let candidate = profile_dir.join("tallyd");
    if candidate.exists() {
        return Ok(candidate);
    }
    bail!("tallyd not found at {}; run `cargo build --bins` first or set TALLYD_BIN", candidate.display())
}

/// `n` distinct free loopback ports (held open together while picked, so
/// no two are the same).
/// Ports handed to test nodes come from this range, below the kernel's
/// ephemeral range (32768-60999 on Linux): a port the kernel picks for
/// `bind(0)` or an outgoing connection can be handed to another socket the
/// moment it is released, so two clusters of tests running in parallel once
/// got the same port. Here every port is handed out once per process, and
/// only if it can be bound now.
const TEST_PORTS: std::ops::Range<u32> = 10_000..30_000;

pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = TEST_PORTS.end - TEST_PORTS.start;
    // Start where another test process (cargo runs binaries one at a time,
    // but `nemesis.sh` beside a test run is possible) is unlikely to be.
    let _ = NEXT.compare_exchange(
        0,
        1 + std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut ports = Vec::with_capacity(n);
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        let port = (TEST_PORTS.start + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    anyhow::ensure!(ports.len() == n, "no {n} free ports in {TEST_PORTS:?}");
    Ok(ports)
}

/// Peak resident set (VmHWM) of a process, KiB.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    // A process that has exited (a zombie) has no memory figures left.
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or_else(|| anyhow::anyhow!("tallyd (pid {pid}) has no VmHWM: it died"))?;
    Ok(line.split_whitespace().nth(1).ok_or_else(|| anyhow::anyhow!("bad VmHWM line"))?.parse()?)
}

/// A public and a peer address on free loopback ports.
/// Public, peer and HTTP addresses for a new node.
fn free_addrs() -> anyhow::Result<(String, String, String)> {
    let ports = free_ports(3)?;
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    Ok((addr(0), addr(1), addr(2)))
}

/// `n` distinct "view" events at `now_ms`, spread over the entities
/// `video-0` … `video-{entities - 1}`, with event ids `{tag}{i}`.
pub fn view_events(n: u32, entities: u32, now_ms: i64, tag: &str) -> Vec<tally_proto::v1::Event> {
    (0..n)
        .map(|i| tally_proto::v1::Event {
            actor_id: Vec::new(),
            entity_id: format!("video-{}", i % entities).into_bytes(),
            event_type: "view".into(),
            event_time_ms: now_ms,
            event_id: format!("{tag}{i}").into_bytes(),
            value: None,
        })
        .collect()
}

pub struct TestNode {
    pub id: u64,
    /// Public address (`--listen`): clients.
    pub addr: String,
    /// Peer address (`--peer-listen`): Raft traffic, behind the link proxies.
    pub peer_addr: String,
    /// HTTP address (`--http-listen`): /metrics, /healthz, /readyz.
    pub http_addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    /// Flags for this node only (after the cluster's), e.g. a clock offset.
    extra_args: Vec<String>,
}

pub struct ClusterOptions {
    pub nodes: u64,
    pub partitions: u32,
    /// Extra tallyd flags for every node.
    pub args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions { nodes: 3, partitions: 16, args: Vec::new() }
    }
}

/// The policy test clusters start with: events of any age, the default
/// 5 minutes ahead.
pub const TEST_INGEST_POLICY: tally_proto::v1::IngestPolicy = tally_proto::v1::IngestPolicy {
    allowed_lateness_ms: 0,
    max_future_skew_ms: 5 * 60_000,
    dead_letter_keep_ms: Some(7 * 24 * 3_600_000),
    dead_letter_max_events: Some(100_000),
    raw_log_keep_ms: Some(7 * 24 * 3_600_000),
    raw_log_max_events: Some(0),
};

/// Every granularity kept forever (the default expires minutes after 14
/// days, and workloads query months back at minute resolution).
pub const TEST_RETENTION: tally_proto::v1::RetentionPolicy = tally_proto::v1::RetentionPolicy {
    minute_ms: 0,
    hour_ms: 0,
    day_ms: 0,
    month_ms: 0,
    year_ms: 0,
    archive_after_ms: 0,
};

pub struct TestCluster {
    _dir: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
    pub partitions: u32,
    args: Vec<String>,
    binary: PathBuf,
    /// (from, to) → the proxy node `from` reaches node `to`'s peer port
    /// through.
    pub links: std::collections::BTreeMap<(u64, u64), netproxy::LinkProxy>,
    /// From the moment the cluster was initialised until every node knew a
    /// leader for each of its partitions (at start).
    pub ready_after: Duration,
    /// The token the harness's own calls present: the nodes' token
    /// (`--node-token-file` in the args), which may call everything.
    pub token: Option<String>,
    /// TLS of the harness's own calls: the nodes' CA and certificate
    /// (`--peer-ca`, `--tls-cert`, `--tls-key` in the args).
    pub tls: Option<tally_client::TlsFiles>,
}

impl TestCluster {
    /// Start the nodes, initialise the cluster and wait for every leader.
    pub async fn start(options: ClusterOptions) -> anyhow::Result<TestCluster> {
        Self::start_with(options, false).await
    }

    /// Like [`TestCluster::start`], with every peer link routed through a
    /// [`netproxy::LinkProxy`] so the test can cut, delay or blackhole links
    /// one by one.
    pub async fn start_proxied(options: ClusterOptions) -> anyhow::Result<TestCluster> {
        Self::start_with(options, true).await
    }

    async fn start_with(options: ClusterOptions, proxied: bool) -> anyhow::Result<TestCluster> {
        let mut dir = tempfile::Builder::new().prefix("tally-test").tempdir()?;
        // Keep the nodes' data and logs for a post-mortem when asked to.
        if std::env::var_os("TALLY_KEEP_TEST_DIR").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping the cluster's directory {}", dir.path().display());
        }
        let binary = tallyd_binary()?;
        let mut nodes = Vec::new();
        for id in 1..=options.nodes {
            let (addr, peer_addr, http_addr) = free_addrs()?;
            nodes.push(TestNode {
                id,
                addr,
                peer_addr,
                http_addr,
                data_dir: dir.path().join(format!("node{id}")),
                log_path: dir.path().join(format!("node{id}.log")),
                child: None,
                extra_args: Vec::new(),
            });
        }
        let mut links = std::collections::BTreeMap::new();
        if proxied {
            for from in &nodes {
                for to in &nodes {
                    if from.id != to.id {
                        links.insert((from.id, to.id), netproxy::LinkProxy::start(to.peer_addr.clone()).await?);
                    }
                }
            }
        }
        let token = match options.args.iter().position(|a| a == "--node-token-file") {
            Some(i) => {
                let path = options.args.get(i + 1).context("--node-token-file without a path")?;
                Some(std::fs::read_to_string(path)?.trim().to_string())
            }
            None => None,
        };
        let arg = |flag: &str| {
            options.args.iter().position(|a| a == flag).and_then(|i| options.args.get(i + 1)).map(PathBuf::from)
        };
        let tls = match arg("--peer-ca") {
            Some(ca) => {
                Some(tally_client::TlsFiles::read(&ca, arg("--tls-cert").as_deref(), arg("--tls-key").as_deref())?)
            }
            None => None,
        };
        let mut cluster = TestCluster {
            tls,
            _dir: dir,
            nodes,
            partitions: options.partitions,
            args: options.args,
            binary,
            links,
            ready_after: Duration::ZERO,
            token,
        };
        for id in 1..=options.nodes {
            cluster.spawn(id)?;
        }
        for id in 1..=options.nodes {
            cluster.wait_listening(id, Duration::from_secs(30)).await?;
        }
        // Public addresses only, as an operator gives them: the node called
        // learns each peer address from the node itself.
        let init = InitializeRequest {
            nodes: cluster
                .nodes
                .iter()
                .map(|n| NodeInfo { node_id: n.id, addr: n.addr.clone(), ..Default::default() })
                .collect(),
            partitions: options.partitions,
            replication_factor: 3,
            // Workloads reach months back (every granularity exercised):
            // any age is accepted. `ingest_policy` tests the default.
            ingest_policy: Some(TEST_INGEST_POLICY),
            // ... and kept: tests that want expiry set a retention.
            retention: Some(TEST_RETENTION),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match cluster.cluster_client(1).await?.initialize(init.clone()).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("initialize: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let initialized = Instant::now();
        cluster.wait_ready(Duration::from_secs(60)).await?;
        cluster.ready_after = initialized.elapsed();
        Ok(cluster)
    }

    fn node(&self, id: u64) -> anyhow::Result<&TestNode> {
        self.nodes.iter().find(|n| n.id == id).with_context(|| format!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> anyhow::Result<&mut TestNode> {
        self.nodes.iter_mut().find(|n| n.id == id).with_context(|| format!("no node {id}"))
    }

    pub fn addr(&self, id: u64) -> anyhow::Result<String> {
        Ok(self.node(id)?.addr.clone())
    }

    pub fn peer_addr(&self, id: u64) -> anyhow::Result<String> {
        Ok(self.node(id)?.peer_addr.clone())
    }

    /// Process id of a running node.
    /// `GET path` on node `id`'s HTTP listener: (status, body).
    pub async fn http_get(&self, id: u64, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(&self.node(id)?.http_addr, path).await
    }

    pub fn pid(&self, id: u64) -> anyhow::Result<u32> {
        Ok(self.node(id)?.child.as_ref().context("node not running")?.id())
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let binary = self.binary.clone();
        let mut args = self.args.clone();
        // The balancer moves leaderships by itself; tests that place them
        // would race it, so it runs only where a test asks for it.
        if !args.iter().any(|a| a == "--balancer-interval-ms") {
            args.extend(["--balancer-interval-ms".to_string(), "0".to_string()]);
        }
        for ((from, to), proxy) in &self.links {
            if *from == id {
                args.push("--peer-route".into());
                args.push(format!("{to}={}", proxy.listen_addr));
            }
        }
        let node = self.node_mut(id)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log_path)?;
        let mut command = Command::new(binary);
        command
            .arg("--node-id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(&node.addr)
            .arg("--peer-listen")
            .arg(&node.peer_addr)
            .arg("--http-listen")
            .arg(&node.http_addr)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&args)
            .args(&node.extra_args)
            .env("RUST_LOG", std::env::var("TALLY_TEST_LOG").unwrap_or_else(|_| "info,openraft=error".into()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        // A test killed mid-run must not leave nodes running.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().context("starting tallyd")?;
        node.child = Some(child);
        Ok(())
    }

    async fn wait_listening(&self, id: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(mut c) = self.cluster_client(id).await {
                if c.status(StatusRequest {}).await.is_ok() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("node {id} did not come up; log:\n{}", self.log_tail(id, 30))
    }

    /// Until every live node reports a leader for every partition it replicates.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut ready = true;
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                match self.status(n.id).await {
                    // A node knows the leaders of the partitions it replicates.
                    Ok(s)
                        if s.initialized
                            && s.partitions
                                .iter()
                                .filter(|p| p.replicas.contains(&n.id))
                                .all(|p| p.leader_node_id != 0) => {}
                    _ => ready = false,
                }
            }
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("cluster not ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Until every live node reports each of its replicas quiesced; returns
    /// how long that took.
    pub async fn wait_all_quiesced(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let mut pending = Vec::new();
            for id in self.live_node_ids() {
                let s = self.status(id).await?;
                let awake = s.partitions.iter().filter(|p| p.replicas.contains(&id) && !p.quiesced).count();
                if awake > 0 {
                    pending.push((id, awake));
                }
            }
            if pending.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("replicas still awake after {timeout:?} (node, count): {pending:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A channel to node `id` presenting the harness's token (if any).
    pub async fn channel(&self, id: u64) -> anyhow::Result<TokenChannel> {
        Ok(tally_client::connect_secure(&self.addr(id)?, self.token.as_deref(), self.tls.as_ref()).await?)
    }

    pub async fn ingest_client(&self, id: u64) -> anyhow::Result<IngestClient<TokenChannel>> {
        Ok(IngestClient::new(self.channel(id).await?))
    }

    pub async fn query_client(&self, id: u64) -> anyhow::Result<QueryClient<TokenChannel>> {
        Ok(QueryClient::new(self.channel(id).await?))
    }

    pub async fn cluster_client(&self, id: u64) -> anyhow::Result<ClusterClient<TokenChannel>> {
        Ok(ClusterClient::new(self.channel(id).await?))
    }

    pub async fn status(&self, id: u64) -> anyhow::Result<StatusResponse> {
        Ok(self.cluster_client(id).await?.status(StatusRequest {}).await?.into_inner())
    }

    /// Wait until every live node reports an ingest policy `applied` accepts.
    pub async fn wait_for_policy(
        &self,
        applied: impl Fn(&tally_proto::v1::IngestPolicy) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for id in self.live_node_ids() {
            while !self.status(id).await?.ingest_policy.is_some_and(|p| applied(&p)) {
                anyhow::ensure!(Instant::now() < deadline, "node {id} never applied the ingest policy");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Ingest `events` through `via`, resending them (same ids) while any is
    /// refused for a retryable reason (a leader killed a moment ago); the
    /// reply that had none.
    pub async fn ingest_answered(
        &self,
        via: u64,
        events: &[tally_proto::v1::Event],
    ) -> anyhow::Result<tally_proto::v1::IngestResponse> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let request = tally_proto::v1::IngestRequest { events: events.to_vec() };
            if let Ok(reply) = self.ingest_client(via).await?.ingest(request).await {
                let reply = reply.into_inner();
                if !reply.rejected.iter().any(|r| r.retryable) {
                    return Ok(reply);
                }
                anyhow::ensure!(Instant::now() < deadline, "still refused: {reply:?}");
            }
            anyhow::ensure!(Instant::now() < deadline, "never answered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Linearizable count of `event_type` events of `entities` over
    /// [from, to), asked through node `via`.
    pub async fn total_count(
        &self,
        via: u64,
        entities: impl IntoIterator<Item = String>,
        event_type: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> anyhow::Result<u64> {
        let mut q = self.query_client(via).await?;
        let mut total = 0;
        for entity in entities {
            let req = tally_proto::v1::StatsRequest {
                entity_id: entity.into_bytes(),
                event_type: event_type.into(),
                from_ms,
                to_ms,
                consistency: 0,
                share_partition_plus_one: 0,
            };
            total += q.stats(req).await?.into_inner().count;
        }
        Ok(total)
    }

    /// The node currently leading the most partitions.
    pub async fn busiest_leader(&self) -> anyhow::Result<u64> {
        let live = self.nodes.iter().find(|n| n.child.is_some()).context("no live node")?;
        let status = self.status(live.id).await?;
        let mut counts = std::collections::BTreeMap::<u64, usize>::new();
        for p in &status.partitions {
            *counts.entry(p.leader_node_id).or_default() += 1;
        }
        counts.into_iter().filter(|(id, _)| *id != 0).max_by_key(|(_, c)| *c).map(|(id, _)| id).context("no leaders")
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self, id: u64) -> anyhow::Result<()> {
        if let Some(mut child) = self.node_mut(id)?.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, id: u64) -> anyhow::Result<std::process::ExitStatus> {
        let node = self.node_mut(id)?;
        let mut child = node.child.take().context("node not running")?;
        let pid = child.id().to_string();
        Command::new("kill").arg("-TERM").arg(&pid).status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                child.kill()?;
                bail!("node {id} ignored SIGTERM for 30s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.spawn(id)?;
        self.wait_listening(id, Duration::from_secs(30)).await
    }

    /// Starts node `id` when it is expected to end by itself (armed with
    /// `--crash-at`, say) and waits for that: returns its exit status.
    pub async fn run_until_exit(&mut self, id: u64, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.spawn(id)?;
        self.wait_exit(id, timeout).await
    }

    /// Waits for running node `id` to end by itself (a crash point, say):
    /// its exit status.
    pub async fn wait_exit(&mut self, id: u64, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let node = self.node_mut(id)?;
            let child = node.child.as_mut().context("node not running")?;
            if let Some(status) = child.try_wait()? {
                node.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("node {id} still runs after {timeout:?}; log:\n{}", self.log_tail(id, 30));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Flags for one node from its next (re)start on, e.g.
    /// `--clock-offset-ms 660000`; empty to clear.
    pub fn set_node_args(&mut self, id: u64, args: Vec<String>) -> anyhow::Result<()> {
        self.node_mut(id)?.extra_args = args;
        Ok(())
    }

    /// Cut (or otherwise set) only the direction in which `from` connects to
    /// `to`: `to` still reaches `from` (a one-way link failure).
    pub fn set_link_one_way(&self, from: u64, to: u64, mode: netproxy::LinkMode) {
        if let Some(p) = self.links.get(&(from, to)) {
            p.set(mode);
        }
    }

    /// Sum of `dedup_conflicts` over every live node: events a state machine
    /// refused to count twice. Anything but 0 means the leader-side argument
    /// failed somewhere (and the state machine caught it).
    pub async fn dedup_conflicts(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for id in self.live_node_ids() {
            total += self.status(id).await?.dedup_conflicts;
        }
        Ok(total)
    }

    /// SIGSTOP: the process freezes, its sockets stay open.
    pub fn pause(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, "-STOP")
    }

    /// SIGCONT after [`TestCluster::pause`].
    pub fn resume(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, "-CONT")
    }

    fn signal(&self, id: u64, sig: &str) -> anyhow::Result<()> {
        let node = self.node(id)?;
        let child = node.child.as_ref().context("node not running")?;
        let status = Command::new("kill").arg(sig).arg(child.id().to_string()).status()?;
        anyhow::ensure!(status.success(), "kill {sig} failed");
        Ok(())
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.node(id).map(|n| n.child.is_some()).unwrap_or(false)
    }

    /// Set both directions of the link between `a` and `b`.
    pub fn set_link(&self, a: u64, b: u64, mode: netproxy::LinkMode) {
        for key in [(a, b), (b, a)] {
            if let Some(p) = self.links.get(&key) {
                p.set(mode);
            }
        }
    }

    /// Cut every link between the two sides (a network partition).
    pub fn partition(&self, side_a: &[u64], side_b: &[u64], mode: netproxy::LinkMode) {
        for a in side_a {
            for b in side_b {
                self.set_link(*a, *b, mode);
            }
        }
    }

    pub fn heal(&self) {
        for p in self.links.values() {
            p.set(netproxy::LinkMode::Pass);
        }
    }

    pub fn node_ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Nodes whose process is running.
    pub fn live_node_ids(&self) -> Vec<u64> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.id).collect()
    }

    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let Ok(node) = self.node(id) else { return String::new() };
        let text = std::fs::read_to_string(&node.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every partition's Raft voters equal its replicas in the cluster map,
    /// as a live replica that knows a leader reports them, and the metadata
    /// group has a leader: a membership change has completed.
    pub async fn membership_settled(&self) -> bool {
        let mut settled: std::collections::BTreeMap<u32, bool> = std::collections::BTreeMap::new();
        for id in self.live_node_ids() {
            let Ok(s) = self.status(id).await else { continue };
            if s.metadata_leader_node_id == 0 {
                return false;
            }
            for p in &s.partitions {
                let (mut v, mut r) = (p.voters.clone(), p.replicas.clone());
                v.sort();
                r.sort();
                let here = p.replicas.contains(&id) && p.leader_node_id != 0 && v == r;
                *settled.entry(p.partition).or_default() |= here;
            }
        }
        // At least the partitions the cluster started with: splits add more.
        settled.len() >= self.partitions as usize && settled.values().all(|s| *s)
    }

    /// What each live node knows of `partitions` (or of every partition it
    /// replicates that has no settled leader) and the last warnings in its
    /// log: printed when a liveness check fails, so a failure in CI can be
    /// read without the run's directory.
    pub async fn post_mortem(&self, partitions: &[u32]) -> String {
        let mut out = String::from("--- post-mortem ---\n");
        for id in self.live_node_ids() {
            match self.status(id).await {
                Ok(s) => {
                    out.push_str(&format!("node {id}: metadata leader {}\n", s.metadata_leader_node_id));
                    for p in &s.partitions {
                        let unsettled = p.leader_node_id == 0 || {
                            let (mut v, mut r) = (p.voters.clone(), p.replicas.clone());
                            v.sort();
                            r.sort();
                            p.replicas.contains(&id) && v != r
                        };
                        if partitions.contains(&p.partition) || (partitions.is_empty() && unsettled) {
                            out.push_str(&format!(
                                "  partition {}: leader {} term {} commit {} applied {} replicas {:?} voters {:?} quiesced {}\n",
                                p.partition,
                                p.leader_node_id,
                                p.term,
                                p.commit_index,
                                p.applied_index,
                                p.replicas,
                                p.voters,
                                p.quiesced
                            ));
                        }
                    }
                }
                Err(e) => out.push_str(&format!("node {id}: status failed: {e}\n")),
            }
            let log = self.log(id);
            let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
            out.push_str(&format!("node {id}: last warnings of {}:\n", warnings.len()));
            for line in &warnings[warnings.len().saturating_sub(15)..] {
                out.push_str(&format!("  {}\n", line.chars().take(400).collect::<String>()));
            }
        }
        out
    }

    pub fn log(&self, id: u64) -> String {
        self.node(id).map(|n| std::fs::read_to_string(&n.log_path).unwrap_or_default()).unwrap_or_default()
    }

    /// Wait until, for every partition, all live replicas report the same
    /// applied index; returns each node's (partition → (applied, digest)).
    pub async fn converged_digests(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(u64, std::collections::BTreeMap<u32, (u64, u64)>)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut per_node = Vec::new();
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                let d =
                    self.cluster_client(n.id).await?.digest(DigestRequest { partitions: vec![] }).await?.into_inner();
                per_node.push((
                    n.id,
                    d.partitions
                        .iter()
                        .map(|p| (p.partition, (p.applied_index, p.digest)))
                        .collect::<std::collections::BTreeMap<_, _>>(),
                ));
            }
            let mut applied: std::collections::BTreeMap<u32, std::collections::BTreeSet<u64>> = Default::default();
            for (_, parts) in &per_node {
                for (p, (a, _)) in parts {
                    applied.entry(*p).or_default().insert(*a);
                }
            }
            if applied.values().all(|s| s.len() == 1) {
                return Ok(per_node);
            }
            if Instant::now() > deadline {
                bail!("replicas did not converge within {timeout:?}: {per_node:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Restart node `id`, which was down while the others took writes, and
    /// wait until every partition's replicas are identical. True when it
    /// caught up through at least one snapshot install; false when the
    /// leaders' logs still held all it missed (their snapshot, which lets
    /// them purge, was not written yet) — a test of snapshot catch-up then
    /// takes the node down again for more.
    pub async fn restart_and_converge(&mut self, id: u64) -> anyhow::Result<bool> {
        let before = self.log(id).matches("installed snapshot").count();
        self.restart(id).await?;
        self.wait_ready(Duration::from_secs(60)).await?;
        self.assert_replicas_identical(Duration::from_secs(60)).await?;
        Ok(self.log(id).matches("installed snapshot").count() > before)
    }

    /// Every partition's replicas hold identical state (after convergence).
    /// Returns how many replicas were compared.
    pub async fn assert_replicas_identical(&self, timeout: Duration) -> anyhow::Result<usize> {
        let per_node = self.converged_digests(timeout).await?;
        let mut by_partition: std::collections::BTreeMap<u32, Vec<(u64, u64)>> = Default::default();
        for (node, parts) in &per_node {
            for (p, (_, digest)) in parts {
                by_partition.entry(*p).or_default().push((*node, *digest));
            }
        }
        let mut compared = 0;
        for (p, digests) in &by_partition {
            compared += digests.len();
            anyhow::ensure!(
                digests.iter().all(|(_, d)| *d == digests[0].1),
                "partition {p}: replicas differ: {digests:?}"
            );
        }
        Ok(compared)
    }

    /// Start one more node, not part of the cluster yet (for add-node).
    pub async fn spawn_extra_node(&mut self) -> anyhow::Result<u64> {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let (addr, peer_addr, http_addr) = free_addrs()?;
        let base =
            self.nodes.first().and_then(|n| n.data_dir.parent().map(Path::to_path_buf)).context("cluster dir")?;
        self.nodes.push(TestNode {
            id,
            addr,
            peer_addr,
            http_addr,
            data_dir: base.join(format!("node{id}")),
            log_path: base.join(format!("node{id}.log")),
            child: None,
            extra_args: Vec::new(),
        });
        self.spawn(id)?;
        self.wait_listening(id, Duration::from_secs(30)).await?;
        Ok(id)
    }

    /// Delete a stopped node's data directory (a disk lost for good).
    pub fn wipe(&self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id)?;
        anyhow::ensure!(node.child.is_none(), "stop node {id} first");
        let _ = std::fs::remove_dir_all(&node.data_dir);
        Ok(())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A plain HTTP/1.1 GET with `Connection: close`: all the tests need to read
/// /metrics and the health endpoints, without an HTTP client crate.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_with(addr, path, "").await
}

/// [`http_get`] with extra header lines (each ending in `\r\n`).
pub async fn http_get_with(addr: &str, path: &str, headers: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
    anyhow::ensure!(
        !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "chunked responses are not read here"
    );
    Ok((status, body.to_string()))
}

/// A Stats request of one (entity, type) over [from, to).
pub fn stats_request(
    entity: &[u8],
    event_type: &str,
    from: i64,
    to: i64,
    consistency: tally_proto::v1::Consistency,
) -> tally_proto::v1::StatsRequest {
    tally_proto::v1::StatsRequest {
        entity_id: entity.to_vec(),
        event_type: event_type.into(),
        from_ms: from,
        to_ms: to,
        consistency: consistency as i32,
        share_partition_plus_one: 0,
    }
}
