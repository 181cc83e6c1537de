//! A Tally node: the storage engine, the metadata group, and one Raft group
//! per partition replica the cluster map assigns to this node.
//!
//! Groups are created from the cluster map: when the metadata group applies
//! a map, every node opens the groups of the partitions it replicates, and
//! the partition's first replica initialises the group's membership. A
//! restarted node reopens its groups from the map stored in its own data dir.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, Raft};
use tally_proto::partition::{group_of_partition, METADATA_GROUP};
use tally_proto::routing::Routing;
use tally_proto::v1::Event;
use tokio::sync::{mpsc, oneshot, watch};

use crate::archive_manifest::SharedManifest;
use crate::clock::ClusterClock;
use crate::command::DeadLetter;
use crate::config::NodeConfig;
use crate::dedup::{DedupBudget, DedupIndex};
use crate::load::PartitionLoad;
use crate::meta::{ClusterMap, IngestPolicy};
use crate::moved::SharedMoved;
use crate::processor::{self, IngestJob, ProcessorConfig, ProposeOutcome};
use crate::raft::liveness::Liveness;
use crate::raft::network::NetworkFactory;
use crate::raft::peer_link::LinkEvent;
use crate::raft::peers::PeerPool;
use crate::raft::quiesce::{QuiesceConfig, Quiescence, ReplicaStart};
use crate::raft::ticker::NodeTicker;
use crate::retention::RetentionPolicy;
use crate::storage::archive::ArchiveStore;
use crate::storage::entry_log::PartitionLogs;
use crate::storage::log_store::LogStore;
use crate::storage::state_machine::{GroupStateMachine, MetadataWatches};
use crate::storage::write_back::WriteBack;
use crate::storage::Engine;
use crate::sync::{MutexExt, RwLockExt};
use crate::type_config::NodeId;
use crate::RaftInstance;

/// Partition replicas opened at once when a map places many on this node.
const OPEN_CONCURRENCY: usize = 32;
/// Calls queued toward one peer's control lane above which the ticker
/// starts no elections: the previous round's messages have not left yet.
const CONTROL_BACKLOG_FOR_ELECTIONS: usize = 512;

/// Which listener of another node a forwarded call goes to: public calls
/// (queries, cluster administration) to its public port, forwarded
/// proposals (peer traffic) to its peer port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Peer,
}

/// Why a call could not be forwarded to a leader.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("node {0} is not in the cluster map")]
    UnknownNode(NodeId),
    #[error("node {node} at {addr}: {source}")]
    Connect {
        node: NodeId,
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A partition replica hosted here.
pub struct PartitionReplica {
    pub partition: u32,
    pub raft: RaftInstance,
    pub ingest: mpsc::Sender<IngestJob>,
    /// Set once the replica has re-applied everything the cluster had
    /// committed for its log when it started (openraft `wait_for_recovery`);
    /// stale reads before that could go backwards, so they are forwarded.
    pub recovered: Arc<AtomicBool>,
    /// The replica's dedup index (replicated state; read for its counters).
    pub dedup: Arc<DedupIndex>,
    /// The replica's state in memory not yet checkpointed; reads go
    /// through it.
    pub write_back: Arc<WriteBack>,
    /// The summary of the replica's dead-letter and raw-event logs
    /// (replicated state).
    pub logs: Arc<Mutex<PartitionLogs>>,
    /// How busy the replica is (`load.rs`).
    pub load: Arc<PartitionLoad>,
    /// The partition's archive manifest (replicated state).
    pub archive: Arc<SharedManifest>,
    /// Entities spread away from the partition (replicated state).
    pub moved: Arc<SharedMoved>,
}

pub struct Node {
    pub id: NodeId,
    pub config: NodeConfig,
    pub engine: Arc<Engine>,
    pub peers: Arc<PeerPool>,
    pub raft_config: Arc<openraft::Config>,
    pub metadata: RaftInstance,
    metadata_write_back: Arc<WriteBack>,
    pub cluster_map: watch::Receiver<ClusterMap>,
    /// Which event times are accepted; the metadata group's, like the map.
    pub ingest_policy: watch::Receiver<IngestPolicy>,
    /// The CPU this process uses (for `Cluster.Status`'s node load).
    pub process_cpu: crate::load::ProcessCpu,
    /// The cluster's retention policy, as the metadata group last applied.
    pub retention: watch::Receiver<RetentionPolicy>,
    /// The cold archive (`--archive-url`), if this node has one.
    pub archive: Option<Arc<ArchiveStore>>,
    pub liveness: Arc<Liveness>,
    pub quiescence: Arc<Quiescence>,
    /// Drives heartbeats and election timers of every group (openraft's
    /// per-group ticks are off).
    pub ticker: Arc<NodeTicker>,
    pub clock: Arc<ClusterClock>,
    /// Dedup slots of every replica here, against `--dedup-memory-mib`.
    pub dedup_budget: Arc<DedupBudget>,
    partitions: RwLock<HashMap<u32, Arc<PartitionReplica>>>,
    /// How events are routed under the current map, rebuilt when its
    /// version changes (`routing`).
    routing: Mutex<Option<(u64, Arc<Routing>)>>,
    /// Serialises group creation so two map updates never open one group twice.
    opening: tokio::sync::Mutex<()>,
    /// A retry of `sync_groups_with_map` is scheduled (a split-off
    /// partition waits for its parent replica here).
    sync_pending: AtomicBool,
    /// Serialises membership changes coordinated by this node.
    pub admin: tokio::sync::Mutex<()>,
    /// Held from reading the cluster map to committing its successor, so
    /// two changes (a membership change, a spread) never overwrite each
    /// other. Short: never held while replicas move.
    pub map_writes: tokio::sync::Mutex<()>,
}

impl Node {
    /// Opens the node's groups and starts its background work. `client_tls`
    /// is what its calls to other nodes use (`tls.rs`; `None`: plaintext).
    pub async fn start(
        config: NodeConfig,
        client_tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> anyhow::Result<Arc<Node>> {
        let data_dir = PathBuf::from(&config.data_dir);
        let engine = Engine::open(&data_dir.join("db")).with_context(|| format!("opening {}", data_dir.display()))?;
        let raft_config = Arc::new(
            openraft::Config {
                cluster_name: "tally".into(),
                // With ticks off (below), openraft uses these three only as
                // deadlines and the lease; the ticker decides when heartbeats
                // and elections happen. A heartbeat may take two of its
                // intervals (a late ack still renews the leader's lease from
                // when the heartbeat was sent) and a vote the whole lease: on
                // a starved machine, replies later than openraft's own
                // deadlines (the interval, the minimum election timeout) were
                // failures, leases lapsed and elections of a thousand groups
                // were retried without end.
                heartbeat_interval: (config.heartbeat_ms * 2).min(config.election_timeout_ms),
                election_timeout_min: (config.election_timeout_ms * 2).saturating_sub(1),
                election_timeout_max: config.election_timeout_ms * 2,
                snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_logs),
                max_in_snapshot_log_to_keep: config.snapshot_logs / 2,
                max_payload_entries: 64,
                // Under load, appends already prove liveness; skip the
                // heartbeats they make redundant.
                heartbeat_min_interval: Some(config.heartbeat_ms / 2),
                enable_pre_vote: Some(true),
                // A leader restarted before anyone else is elected must not come
                // back as leader of its old term: its log may hold entries of the
                // old term it has not applied, and a leader restored into the
                // same term could start a session whose dedup view misses them.
                // Off, it joins a new election and its new term's blank entry
                // orders everything before (see processor.rs, rule 1).
                enable_leader_restore: Some(false),
                // One node-level ticker drives every group (raft/ticker.rs).
                enable_tick: false,
                ..Default::default()
            }
            .validate()
            .context("raft configuration")?,
        );
        let routes = config.peer_route_map().map_err(|e| anyhow::anyhow!(e))?;
        let credentials = match &config.node_token_file {
            Some(path) => {
                let token =
                    std::fs::read_to_string(path).with_context(|| format!("reading --node-token-file {path}"))?;
                crate::raft::peers::NodeCredentials::bearer(&token)
                    .map_err(|e| anyhow::anyhow!("--node-token-file {path}: {e}"))?
            }
            None => crate::raft::peers::NodeCredentials::default(),
        };
        let peers = PeerPool::new(Duration::from_millis(config.connect_timeout_ms), routes, credentials, client_tls);
        let (map_tx, map_rx) = watch::channel(ClusterMap::default());
        let (policy_tx, policy_rx) = watch::channel(IngestPolicy::default());
        let (retention_tx, retention_rx) = watch::channel(RetentionPolicy::default());
        let GroupParts { raft: metadata, write_back: metadata_write_back, .. } = open_group(
            &engine,
            &data_dir,
            &peers,
            &raft_config,
            config.node_id,
            METADATA_GROUP,
            Arc::default(),
            Some(MetadataWatches { map: map_tx, policy: policy_tx, retention: retention_tx }),
            None,
        )
        .await
        .context("opening the metadata group")?;
        let election_max = Duration::from_millis(config.election_timeout_ms * 2);
        let ticker = NodeTicker::new(
            Duration::from_millis(config.heartbeat_ms),
            Duration::from_millis(config.election_timeout_ms),
            election_max,
        );
        ticker.register(METADATA_GROUP, metadata.clone());
        let ping = Duration::from_millis(config.ping_ms.max(1));
        let suspect_after = Duration::from_millis(config.election_timeout_ms);
        let clock =
            Arc::new(ClusterClock::new(config.clock_offset_ms, Duration::from_millis(config.max_clock_skew_ms)));
        let (liveness, peer_changes) =
            Liveness::spawn(config.node_id, ping, suspect_after, peers.clone(), map_rx.clone(), clock.clone());
        peers.set_link_events({
            let liveness = Arc::downgrade(&liveness);
            move |node, event| {
                let Some(liveness) = liveness.upgrade() else { return };
                match event {
                    LinkEvent::Heard => liveness.heard_from(node),
                    LinkEvent::Broken => liveness.probe_soon(),
                }
            }
        });
        ticker.clone().spawn(
            {
                let peers = peers.clone();
                move || peers.control_backlog()
            },
            CONTROL_BACKLOG_FOR_ELECTIONS,
            {
                let liveness = Arc::downgrade(&liveness);
                move |node| liveness.upgrade().is_some_and(|l| l.is_up(node))
            },
        );
        let quiescence = Quiescence::new(
            config.node_id,
            QuiesceConfig {
                after: Duration::from_millis(config.quiesce_after_ms),
                startup_grace: election_max + 3 * ping,
                backup_delay: election_max,
            },
            liveness.clone(),
        );
        // The sweep only ends dormancy and notices idle groups: a few times a
        // second is plenty, and it visits every group each time.
        quiescence.clone().spawn(peer_changes, Duration::from_millis(250));
        let dedup_budget = DedupBudget::with_memory_mib(config.dedup_memory_mib);
        let archive = match &config.archive_url {
            Some(url) => {
                let lease = Duration::from_millis(config.archive_cache_lease_ms);
                Some(Arc::new(ArchiveStore::open(url, lease).with_context(|| format!("opening the archive {url}"))?))
            }
            None => None,
        };
        let node = Arc::new(Node {
            id: config.node_id,
            config,
            engine,
            peers,
            raft_config,
            metadata,
            metadata_write_back,
            cluster_map: map_rx,
            ingest_policy: policy_rx,
            process_cpu: Default::default(),
            retention: retention_rx,
            archive,
            liveness,
            quiescence,
            ticker,
            clock,
            dedup_budget,
            partitions: RwLock::default(),
            routing: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            sync_pending: AtomicBool::new(false),
            admin: tokio::sync::Mutex::new(()),
            map_writes: tokio::sync::Mutex::new(()),
        });
        node.clone().sync_groups_with_map().await?;
        tokio::spawn(node.clone().follow_cluster_map());
        // The reconciler and the checkpointer work on the node from above
        // it: `server.rs` starts them, so the node depends on neither.
        Ok(node)
    }

    pub fn partition(&self, partition: u32) -> Option<Arc<PartitionReplica>> {
        self.partitions.read_unpoisoned().get(&partition).cloned()
    }

    /// Every group's write-back: the metadata group's and each replica's.
    pub fn write_backs(&self) -> Vec<Arc<WriteBack>> {
        let mut v = vec![self.metadata_write_back.clone()];
        v.extend(self.partitions.read_unpoisoned().values().map(|r| r.write_back.clone()));
        v
    }

    pub fn local_partitions(&self) -> Vec<Arc<PartitionReplica>> {
        let mut v: Vec<_> = self.partitions.read_unpoisoned().values().cloned().collect();
        v.sort_by_key(|p| p.partition);
        v
    }

    /// A copy of the whole map; request paths use the accessors below,
    /// which read it in place (with 1,000 partitions a copy is 1,000 vectors).
    pub fn map(&self) -> ClusterMap {
        self.cluster_map.borrow().clone()
    }

    /// The partition count, once the cluster is initialised.
    pub fn partition_count(&self) -> Option<u32> {
        let map = self.cluster_map.borrow();
        map.is_initialized().then_some(map.partition_count)
    }

    /// How events are routed under the current map; `None` before the
    /// cluster is initialised.
    pub fn routing(&self) -> Option<Arc<Routing>> {
        let map = self.cluster_map.borrow();
        if !map.is_initialized() {
            return None;
        }
        let mut cached = self.routing.lock_unpoisoned();
        match &*cached {
            Some((version, routing)) if *version == map.version => Some(routing.clone()),
            _ => {
                let routing = Arc::new(map.routing());
                *cached = Some((map.version, routing.clone()));
                Some(routing)
            }
        }
    }

    /// The partition an entity's events go to unless it is spread (its
    /// hash range's owner); `None` before the cluster is initialised.
    pub fn home_of(&self, entity_id: &[u8]) -> Option<u32> {
        self.routing().map(|r| r.home_of(entity_id))
    }

    /// The first replica of a partition: its preferred leader.
    pub fn preferred_replica(&self, partition: u32) -> Option<NodeId> {
        self.cluster_map.borrow().replicas_of(partition).first().copied()
    }

    async fn follow_cluster_map(self: Arc<Self>) {
        let mut rx = self.cluster_map.clone();
        while rx.changed().await.is_ok() {
            if let Err(e) = self.clone().sync_groups_with_map().await {
                tracing::error!(error = %e, "applying the cluster map");
            }
        }
    }

    /// Open the groups the current map assigns to this node, a few at a
    /// time: opening is mostly waiting on storage, and a node that opens a
    /// thousand new groups one by one leaves its peers' designated leaders
    /// asking for votes in groups it has not opened yet.
    async fn sync_groups_with_map(self: Arc<Self>) -> anyhow::Result<()> {
        let _guard = self.opening.lock().await;
        // Shared, not cloned per partition: a map of 10,000 partitions is
        // 10,000 small vectors, and a clone for each group opened made
        // opening quadratic.
        let map = Arc::new(self.map());
        if !map.is_initialized() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut missing = Vec::new();
        let mut deferred = false;
        for partition in map.partitions_of(self.id).filter(|p| self.partition(*p).is_none()) {
            if self.split_child_ready(&map, partition).await? {
                missing.push(partition);
            } else {
                deferred = true;
            }
        }
        if deferred {
            self.clone().sync_again_soon();
        }
        let opened = missing.len();
        let mut opening = futures::stream::iter(missing)
            .map(|partition| {
                let (node, map) = (self.clone(), map.clone());
                async move {
                    node.open_partition(&map, partition).await.with_context(|| format!("opening partition {partition}"))
                }
            })
            .buffer_unordered(OPEN_CONCURRENCY);
        while let Some(replica) = opening.next().await {
            let replica = replica?;
            self.partitions.write_unpoisoned().insert(replica.partition, replica);
        }
        if opened > 0 {
            tracing::info!(opened, took_ms = started.elapsed().as_millis() as u64, "opened partition replicas");
        }
        Ok(())
    }

    /// Whether a partition may be opened here now: any partition but a
    /// split-off one whose parent replica here has yet to apply the split
    /// (`storage/split.rs`).
    async fn split_child_ready(&self, map: &ClusterMap, partition: u32) -> anyhow::Result<bool> {
        let Some(plan) = map.splits.get(&partition) else { return Ok(true) };
        // Local facts, not the map's placement of the parent (which a
        // replica move may be changing): a parent replica open here, or its
        // state on disk, may yet seed the child.
        let parent_here = self.partition(plan.parent).is_some();
        let parent_group = group_of_partition(plan.parent);
        Ok(self
            .engine
            .blocking(move |engine| crate::storage::split::child_ready(engine, parent_group, partition, parent_here))
            .await?)
    }

    /// Open deferred groups again shortly (one retry pending at a time).
    fn sync_again_soon(self: Arc<Self>) {
        if self.sync_pending.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.sync_pending.store(false, Ordering::SeqCst);
            if let Err(e) = self.clone().sync_groups_with_map().await {
                tracing::error!(error = %e, "opening split-off partitions");
            }
        });
    }

    async fn open_partition(&self, map: &ClusterMap, partition: u32) -> anyhow::Result<Arc<PartitionReplica>> {
        let group = group_of_partition(partition);
        let dedup = Arc::new(DedupIndex::new(self.dedup_budget.clone()));
        let quiet = self.quiescence.register(group);
        let data_dir = PathBuf::from(&self.config.data_dir);
        let GroupParts { raft, write_back, logs, load, archive, moved } = open_group(
            &self.engine,
            &data_dir,
            &self.peers,
            &self.raft_config,
            self.id,
            group,
            dedup.clone(),
            None,
            Some(quiet.clone()),
        )
        .await?;
        let replicas = map.replicas_of(partition);
        // Only the first map creates groups. Replicas placed by later maps
        // join existing groups as learners (see reconciler); initialising
        // them here would start a second, divergent group.
        let new_group = map.version == 1 && !raft.is_initialized().await.unwrap_or(true);
        let creates = new_group && replicas.first() == Some(&self.id);
        // A split-off group that has never held an election: its first
        // replica (the node that led the parent at the split) elects at once,
        // like a group's creator; it is initialised already (`split.rs`).
        let fresh_child =
            map.splits.contains_key(&partition) && raft.metrics().borrow_watched().vote.leader_id().term == 0;
        // The creator is the designated leader (placement spreads first
        // replicas evenly): it keeps its timers and elects at once, retrying
        // on its election timer until the others have opened the group,
        // while they stay dormant until they hear from it. A thousand new
        // groups thus take one election each instead of a race of three.
        let timer = self.ticker.register(group, raft.clone());
        let start = match (creates, new_group) {
            (true, _) => ReplicaStart::Creator,
            (false, true) => ReplicaStart::AwaitingCreator,
            (false, false) if fresh_child && replicas.first() == Some(&self.id) => ReplicaStart::Creator,
            (false, false) if fresh_child => ReplicaStart::AwaitingCreator,
            (false, false) => ReplicaStart::Existing,
        };
        self.quiescence.attach(&quiet, raft.clone(), timer, start);
        if fresh_child && replicas.first() == Some(&self.id) {
            self.ticker.heard(group);
            let _ = raft.trigger().elect(false).await;
        }
        if creates {
            let members: BTreeMap<NodeId, BasicNode> = replicas
                .iter()
                .filter_map(|id| map.peer_addr_of(*id).map(|addr| (*id, BasicNode::new(addr))))
                .collect();
            match raft.initialize(members).await {
                Ok(()) => {
                    // An election in progress must not be superseded by
                    // this replica's own timer: it starts over from now.
                    self.ticker.heard(group);
                    let _ = raft.trigger().elect(false).await;
                }
                Err(e) => tracing::debug!(partition, error = %e, "partition already initialised"),
            }
        }
        let ingest = processor::spawn(
            partition,
            raft.clone(),
            dedup.clone(),
            self.processor_config(),
            quiet,
            self.clock.clone(),
            processor::PolicySource {
                policy: self.ingest_policy.clone(),
                cluster_map: self.cluster_map.clone(),
                archive: archive.clone(),
                moved: moved.clone(),
            },
            load.clone(),
        );
        let recovered = Arc::new(AtomicBool::new(false));
        tokio::spawn({
            let (raft, recovered) = (raft.clone(), recovered.clone());
            async move {
                if raft.wait_for_recovery(None).await.is_ok() {
                    recovered.store(true, Ordering::Release);
                }
            }
        });
        Ok(Arc::new(PartitionReplica {
            partition,
            raft,
            ingest,
            recovered,
            dedup,
            write_back,
            logs,
            load,
            archive,
            moved,
        }))
    }

    fn processor_config(&self) -> ProcessorConfig {
        ProcessorConfig {
            max_batch_events: self.config.max_batch_events,
            max_inflight: self.config.max_inflight,
            linger: Duration::from_micros(self.config.linger_us),
            dedup_window_ms: self.config.dedup_window_secs * 1000,
            ..Default::default()
        }
    }

    /// Stop and forget a replica this node no longer holds, deleting its data.
    pub async fn drop_partition(&self, partition: u32) -> anyhow::Result<()> {
        let _guard = self.opening.lock().await;
        // The caller decided on an older map (asking leaders takes seconds):
        // if a newer map placed the partition here again, it was not opened
        // anew because this replica still existed, so dropping it now would
        // leave the node without the replica its leader is adding back as a
        // learner — a membership change that never completes. Keep it: its
        // log is a prefix of the group's, and the leader catches it up.
        if self.cluster_map.borrow().replicas_of(partition).contains(&self.id) {
            tracing::info!(partition, "keeping a replica the newest map placed here again");
            return Ok(());
        }
        let replica = self.partitions.write_unpoisoned().remove(&partition);
        let Some(replica) = replica else { return Ok(()) };
        let _ = replica.raft.shutdown().await;
        let group = group_of_partition(partition);
        self.quiescence.remove(group);
        self.ticker.remove(group);
        let snapshots = self.snapshot_root().join(format!("g{group}"));
        let write_back = replica.write_back.clone();
        self.engine
            .blocking(move |engine| {
                crate::storage::log_store::delete_group_log(engine, group)?;
                crate::storage::state_machine::delete_group_state(engine, &write_back)?;
                let _ = std::fs::remove_dir_all(snapshots);
                Ok(())
            })
            .await?;
        tracing::info!(partition, "replica removed from this node");
        Ok(())
    }

    /// Raft instance of a group, for the internal Raft service.
    pub fn group(&self, group: u32) -> Option<RaftInstance> {
        if group == METADATA_GROUP {
            return Some(self.metadata.clone());
        }
        tally_proto::partition::partition_of_group(group).and_then(|p| self.partition(p)).map(|r| r.raft.clone())
    }

    pub fn snapshot_root(&self) -> PathBuf {
        PathBuf::from(&self.config.data_dir).join("snapshots")
    }

    /// Public (client) address of a node, from the cluster map.
    pub fn addr_of(&self, node: NodeId) -> Option<String> {
        self.cluster_map.borrow().addr_of(node).map(str::to_string)
    }

    /// Peer (Raft) address of a node, from the cluster map.
    pub fn peer_addr_of(&self, node: NodeId) -> Option<String> {
        self.cluster_map.borrow().peer_addr_of(node).map(str::to_string)
    }

    /// Leader of the metadata group, if known.
    pub fn metadata_leader(&self) -> Option<NodeId> {
        self.metadata.metrics().borrow_watched().current_leader
    }

    /// Hand one partition's events to this node's processor for it and wait
    /// for the outcome. The events must already be validated and belong to
    /// the partition (the services check; the processor trusts them).
    /// `invalid`: events of the request refused for their fields, for the
    /// partition's dead-letter log.
    pub async fn propose(&self, partition: u32, events: Vec<Event>, invalid: Vec<DeadLetter>) -> ProposeOutcome {
        let Some(replica) = self.partition(partition) else {
            // No replica here: its first replica is the best guess.
            return ProposeOutcome::NotLeader { leader: self.preferred_replica(partition) };
        };
        let (reply, outcome) = oneshot::channel();
        if replica.ingest.send(IngestJob::new(events, invalid, reply)).await.is_err() {
            return ProposeOutcome::Unavailable("processor stopped".into());
        }
        outcome.await.unwrap_or_else(|_| ProposeOutcome::Unavailable("processor stopped".into()))
    }

    /// A channel to `leader` for a call only it can serve because it leads
    /// a partition or the metadata group. Every forward — ingest, queries,
    /// membership, initialisation, transfers — goes through here, so each
    /// names the node it could not reach the same way. `fallback_addr` is
    /// for a caller that knows an address the map does not have yet
    /// (initialisation, before the first map is applied).
    pub fn forward_to_leader(
        &self,
        leader: NodeId,
        listener: Listener,
        fallback_addr: Option<&str>,
    ) -> Result<crate::raft::peers::NodeChannel, ForwardError> {
        let known = match listener {
            Listener::Public => self.addr_of(leader),
            Listener::Peer => self.peer_addr_of(leader),
        };
        let addr = known.or_else(|| fallback_addr.map(str::to_string)).ok_or(ForwardError::UnknownNode(leader))?;
        let channel = match listener {
            Listener::Public => self.peers.public_channel(leader, &addr),
            Listener::Peer => self.peers.channel(leader, &addr).map(|c| self.peers.with_credentials(c)),
        };
        channel.map_err(|source| ForwardError::Connect { node: leader, addr, source })
    }

    /// Stop every group, then make sure the WAL is on disk.
    pub async fn shutdown(&self) {
        for replica in self.local_partitions() {
            let _ = replica.raft.shutdown().await;
        }
        let _ = self.metadata.shutdown().await;
        if let Err(e) = self.engine.sync().await {
            tracing::error!(error = %e, "final WAL sync failed");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn open_group(
    engine: &Arc<Engine>,
    data_dir: &std::path::Path,
    peers: &Arc<PeerPool>,
    raft_config: &Arc<openraft::Config>,
    node_id: NodeId,
    group: u32,
    dedup: Arc<DedupIndex>,
    metadata: Option<MetadataWatches>,
    quiescence: Option<Arc<crate::raft::quiesce::GroupQuiescence>>,
) -> anyhow::Result<GroupParts> {
    let sm = GroupStateMachine::open(engine.clone(), group, &data_dir.join("snapshots"), dedup, metadata).await?;
    let write_back = sm.write_back();
    let (logs, load, archive, moved) = (sm.logs(), sm.load(), sm.archive(), sm.moved());
    let log = LogStore::open(engine.clone(), group).await?;
    let network = NetworkFactory::new(group, peers.clone(), quiescence);
    let raft = Raft::new(node_id, raft_config.clone(), network, log, sm).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(GroupParts { raft, write_back, logs, load, archive, moved })
}

/// A group as opened: its Raft, and the handles the node keeps beside it.
struct GroupParts {
    raft: RaftInstance,
    write_back: Arc<WriteBack>,
    logs: Arc<Mutex<PartitionLogs>>,
    load: Arc<PartitionLoad>,
    archive: Arc<SharedManifest>,
    moved: Arc<SharedMoved>,
}
