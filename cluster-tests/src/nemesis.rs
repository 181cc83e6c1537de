//! Faults for Jepsen-style runs against a proxied [`TestCluster`], a seeded
//! schedule that reproduces a run, and the probes that time recovery.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tally_bench::first_write::{first_write, lazy_channel, probe_entity, Pacing};

use crate::netproxy::LinkMode;
use crate::TestCluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 the busiest leader, restart it after the hold.
    KillRestart,
    /// kill -9 the busiest leader and restart it 0–300 ms later, before
    /// anyone else is elected, three times in a row.
    RestartAtOnce,
    /// SIGSTOP the busiest leader for longer than an election timeout.
    Pause,
    /// Cut every link of the busiest leader (connections reset).
    IsolateLeader,
    /// Cut only the leader's outgoing links: it cannot reach its followers,
    /// they still reach it.
    OneWayCut,
    /// One node against the other two, the links silently blackholed.
    MinorityBlackhole,
    /// Cut one link only: two nodes that cannot talk, both reaching a third.
    Bridge,
    /// Slow every link by 50 ms each way.
    SlowNetwork,
    /// Restart the busiest leader with its clock 11 minutes off (either
    /// way), let it lead again, then restore its clock.
    ClockSkew,
    /// kill -9 a node, then ask for leadership transfers to it and a
    /// rebalance; every partition must keep accepting writes.
    TransferToDead,
    /// Shorten the retention policy one step (every partition commits new
    /// floors and deletes what they expire), and kill -9 the busiest leader
    /// a moment later, while it does.
    ShortenRetention,
    /// Spread a hot entity over more partitions while it is written to
    /// (`Cluster.Spread`), and kill -9 its home partition's leader a moment
    /// later, while the spread is under way.
    Spread,
    /// Pause the balancer, kill -9 the busiest leader and restart it (its
    /// leaderships pile up elsewhere), resume the balancer.
    PauseBalancer,
    /// Split a partition (`Cluster.Split`) while it is written to, and
    /// kill -9 its leader a moment later, while the split is under way.
    Split,
}

pub const ALL_FAULTS: [Fault; 14] = [
    Fault::KillRestart,
    Fault::RestartAtOnce,
    Fault::Pause,
    Fault::IsolateLeader,
    Fault::OneWayCut,
    Fault::MinorityBlackhole,
    Fault::Bridge,
    Fault::SlowNetwork,
    Fault::ClockSkew,
    Fault::TransferToDead,
    Fault::ShortenRetention,
    Fault::Spread,
    Fault::PauseBalancer,
    Fault::Split,
];

/// The retention policies `ShortenRetention` steps through, (minutes,
/// hours) kept in hours: each expires more of the run's ten days of events.
pub const RETENTION_STEPS: [(u64, u64); 4] = [(12, 6 * 24), (6, 5 * 24), (3, 4 * 24), (1, 3 * 24)];

/// Run settings, from `TALLY_NEMESIS_SEED` and `TALLY_NEMESIS_SECS`.
#[derive(Debug, Clone)]
pub struct NemesisConfig {
    pub seed: u64,
    pub duration: Duration,
    /// How long a fault is held before healing.
    pub hold: Duration,
}

impl NemesisConfig {
    pub fn from_env(default_secs: u64) -> NemesisConfig {
        let seed = std::env::var("TALLY_NEMESIS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        let secs = std::env::var("TALLY_NEMESIS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_secs);
        NemesisConfig { seed, duration: Duration::from_secs(secs), hold: Duration::from_secs(4) }
    }

    /// Every fault once in a seeded order, then seeded random faults.
    pub fn schedule(&self) -> impl Iterator<Item = Fault> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut first = ALL_FAULTS.to_vec();
        first.shuffle(&mut rng);
        first.into_iter().chain(std::iter::repeat_with(move || ALL_FAULTS[rng.random_range(0..ALL_FAULTS.len())]))
    }
}

/// Writes one probe event at a time to `partition` through node `via`
/// until one is acknowledged: when (from `started`) it was, or None after
/// `timeout`. The measurement is `tally_bench::first_write`, the one behind
/// `tally probe-writes` and the failover figures of docs/BENCHMARKS.md;
/// the pacing here is gentler (an attempt may take 2 s before another is
/// started beside it), as a test cluster runs on a loaded machine.
pub async fn time_to_first_write(
    cluster: &TestCluster,
    via: u64,
    partition: u32,
    started: Instant,
    timeout: Duration,
) -> Option<Duration> {
    // Routed as the cluster routes now: a partition may have split.
    let routing = match cluster.status(via).await {
        Ok(status) => tally_proto::routing::Routing::of_status(&status),
        Err(_) => tally_proto::routing::Routing::new(cluster.partitions, []),
    };
    let entity = probe_entity(partition, &routing)?;
    let channel = lazy_channel(&cluster.addr(via).ok()?, Duration::from_secs(2)).ok()?;
    let pacing = Pacing {
        interval: Duration::from_millis(20),
        hedge_after: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
    };
    first_write(partition, entity, vec![channel].into(), pacing, started + timeout, started).await.first_ack
}

/// Apply the link part of a fault (process faults are the test's).
pub fn apply_links(cluster: &TestCluster, fault: Fault, victim: u64, rng: &mut StdRng) -> String {
    let ids = cluster.node_ids();
    let others: Vec<u64> = ids.iter().copied().filter(|i| *i != victim).collect();
    match fault {
        Fault::IsolateLeader => {
            cluster.partition(&[victim], &others, LinkMode::Drop);
            format!("isolated node {victim}")
        }
        Fault::MinorityBlackhole => {
            cluster.partition(&[victim], &others, LinkMode::Blackhole);
            format!("blackholed node {victim} from {others:?}")
        }
        Fault::Bridge => {
            let (a, b) = (others[0], if rng.random_bool(0.5) { victim } else { others[others.len() - 1] });
            cluster.set_link(a, b, LinkMode::Drop);
            format!("cut link {a}-{b}; the third node bridges")
        }
        Fault::SlowNetwork => {
            for a in &ids {
                for b in &ids {
                    if a < b {
                        cluster.set_link(*a, *b, LinkMode::Delay(Duration::from_millis(50)));
                    }
                }
            }
            "delayed every link by 50 ms".into()
        }
        Fault::OneWayCut => {
            for other in &others {
                cluster.set_link_one_way(victim, *other, LinkMode::Drop);
            }
            format!("cut node {victim}'s links to {others:?}, one way")
        }
        Fault::KillRestart
        | Fault::RestartAtOnce
        | Fault::Pause
        | Fault::ClockSkew
        | Fault::TransferToDead
        | Fault::ShortenRetention
        | Fault::Spread
        | Fault::PauseBalancer
        | Fault::Split => String::new(),
    }
}
