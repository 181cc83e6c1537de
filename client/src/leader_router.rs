//! Chooses the node for each request and keeps the partition map fresh.
//!
//! The map ([`PartitionMap`]) is read on every batch and written rarely, so
//! it sits behind a `RwLock` that is never held across an await. Refreshes
//! are coalesced: whoever finds one running, or one finished less than
//! `min_refresh_interval` ago, does not start another; a burst of failures
//! after a leader crash therefore costs one round of status calls.
//!
//! Choice of node, in order: the partition's leader when known and its
//! breaker is closed; else a replica of the partition; else any node. Any
//! node accepts any request and forwards it, so the fallbacks are correct,
//! only one hop slower.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rand::seq::IndexedRandom;
use tally_proto::v1::{LeaderHint, StatusRequest, StatusResponse};

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::node_pool::{Node, NodePool};
use crate::partition_map::PartitionMap;

/// Where a request should go.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Route {
    /// The leader of this partition (writes, linearizable reads).
    Leader(u32),
    /// Any replica of this partition (stale reads).
    Replica(u32),
    /// Any node (cluster status).
    Any,
}

#[derive(Debug)]
pub(crate) struct Router {
    pub(crate) config: ClientConfig,
    pub(crate) pool: NodePool,
    map: RwLock<PartitionMap>,
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
    /// A background refresh is scheduled: at most one task at a time, however
    /// many failures ask for one.
    refresh_scheduled: AtomicBool,
}

impl Router {
    /// Builds the pool and learns the map from the seeds; fails if no seed
    /// answers with an initialised cluster.
    pub(crate) async fn connect(config: ClientConfig) -> Result<Arc<Router>> {
        config.validate()?;
        let pool = NodePool::new(
            config.connect_timeout,
            config.request_timeout,
            config.max_requests_per_node,
            config.breaker.clone(),
            config.token.as_deref().map(crate::credentials::bearer_header).transpose()?,
            config.tls.clone(),
        );
        for seed in &config.seeds {
            pool.get(seed)?;
        }
        let router = Arc::new(Router {
            config,
            pool,
            map: RwLock::new(PartitionMap::default()),
            last_refresh: tokio::sync::Mutex::new(None),
            refresh_scheduled: AtomicBool::new(false),
        });
        router.refresh(true).await?;
        Ok(router)
    }

    /// A copy-free look at the current map.
    pub(crate) fn with_map<R>(&self, f: impl FnOnce(&PartitionMap) -> R) -> R {
        f(&self.map.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn with_map_mut<R>(&self, f: impl FnOnce(&mut PartitionMap) -> R) -> R {
        f(&mut self.map.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every address worth asking: known nodes, then seeds not among them.
    fn candidate_addrs(&self) -> Vec<String> {
        let mut addrs: Vec<String> = self.with_map(|m| m.nodes().map(|(_, a)| a.to_owned()).collect());
        for seed in &self.config.seeds {
            if !addrs.contains(seed) {
                addrs.push(seed.clone());
            }
        }
        addrs
    }

    /// Status of every reachable candidate node, with the addresses asked.
    pub(crate) async fn statuses(&self) -> Vec<(String, std::result::Result<StatusResponse, String>)> {
        let timeout = self.config.request_timeout.min(Duration::from_secs(2));
        let calls = self.candidate_addrs().into_iter().map(|addr| async move {
            let result = match self.pool.get(&addr) {
                Ok(node) => {
                    let mut request = node.request(StatusRequest {});
                    request.set_timeout(timeout);
                    match tokio::time::timeout(timeout, node.cluster().status(request)).await {
                        Ok(Ok(answer)) => Ok(answer.into_inner()),
                        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
                        Err(_) => Err("status timed out".to_owned()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            (addr, result)
        });
        join_all(calls).await
    }

    /// Re-learns the map from every known node. Without `force`, skipped
    /// when another refresh is running or one finished recently.
    pub(crate) async fn refresh(&self, force: bool) -> Result<()> {
        let mut last = if force {
            self.last_refresh.lock().await
        } else {
            match self.last_refresh.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(()),
            }
        };
        if !force && last.is_some_and(|t| t.elapsed() < self.config.min_refresh_interval) {
            return Ok(());
        }
        let answers = self.statuses().await;
        let ok: Vec<StatusResponse> = answers.iter().filter_map(|(_, r)| r.as_ref().ok().cloned()).collect();
        *last = Some(Instant::now());
        match PartitionMap::merge(&ok) {
            Some(map) => {
                self.with_map_mut(|m| *m = map);
                Ok(())
            }
            None => {
                let why: Vec<String> = answers
                    .iter()
                    .map(|(addr, r)| match r {
                        Ok(_) => format!("{addr}: not initialised"),
                        Err(e) => format!("{addr}: {e}"),
                    })
                    .collect();
                Err(ClientError::NoCluster(why.join("; ")))
            }
        }
    }

    /// Starts a refresh in the background (coalesced, rate-limited).
    pub(crate) fn refresh_soon(self: &Arc<Self>) {
        if self.refresh_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let router = self.clone();
        tokio::spawn(async move {
            // A failed refresh keeps the old map; the next failure retries.
            let _ = router.refresh(false).await;
            router.refresh_scheduled.store(false, Ordering::Release);
        });
    }

    /// Applies the leader hints of an ingest answer.
    pub(crate) fn apply_hints(&self, hints: &[LeaderHint]) {
        if hints.is_empty() {
            return;
        }
        self.with_map_mut(|m| {
            for hint in hints {
                m.apply_hint(hint);
            }
        });
    }

    /// Records that `node` failed: its breaker counts it, and its
    /// leaderships are forgotten until the next refresh.
    pub(crate) fn node_failed(self: &Arc<Self>, node: &Node) {
        node.breaker().on_failure(Instant::now());
        self.with_map_mut(|m| {
            let id = m.nodes().find(|(_, a)| *a == node.addr()).map(|(id, _)| id);
            if let Some(id) = id {
                m.forget_node(id);
            }
        });
        self.refresh_soon();
    }

    /// The node for `route`, skipping `avoid` (the node that just failed)
    /// unless it is the only one left. `None` when every breaker is open.
    pub(crate) fn pick(&self, route: Route, avoid: Option<&str>) -> Option<Arc<Node>> {
        let now = Instant::now();
        let (leader, replicas, all) = self.with_map(|m| {
            let leader = match route {
                Route::Leader(p) => m.leader(p).map(|(_, a)| a.to_owned()),
                Route::Replica(_) | Route::Any => None,
            };
            let replicas: Vec<String> = match route {
                Route::Leader(p) | Route::Replica(p) => m
                    .partitions()
                    .get(p as usize)
                    .map(|r| r.replicas.iter().filter_map(|id| m.addr_of(*id)).map(str::to_owned).collect())
                    .unwrap_or_default(),
                Route::Any => Vec::new(),
            };
            let all: Vec<String> = m.nodes().map(|(_, a)| a.to_owned()).collect();
            (leader, replicas, all)
        });
        let all = if all.is_empty() { self.config.seeds.clone() } else { all };
        let usable = |addr: &String| -> Option<Arc<Node>> {
            let node = self.pool.get(addr).ok()?;
            node.breaker().would_allow(now).then_some(node)
        };
        if let Some(leader) = leader.filter(|a| Some(a.as_str()) != avoid) {
            if let Some(node) = usable(&leader) {
                return Some(node);
            }
        }
        for group in [&replicas, &all] {
            let choices: Vec<Arc<Node>> =
                group.iter().filter(|a| Some(a.as_str()) != avoid).filter_map(usable).collect();
            if let Some(node) = choices.choose(&mut rand::rng()) {
                return Some(node.clone());
            }
        }
        avoid.map(str::to_owned).as_ref().and_then(usable)
    }
}
