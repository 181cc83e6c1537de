//! Which cluster tests may run at the same time.
//!
//! Every cluster test is one module of a single test binary (`tests/cluster/`:
//! one link instead of one per file), and libtest runs a binary's tests on
//! as many threads as the machine has cores. Each test starts its own
//! cluster on its own ports and directories, so overlap is safe for
//! correctness; what it can break is timing. On a 2-core machine two
//! clusters share the CPU, and a test that measures or bounds time would
//! fail, or report figures that mean nothing, because of the other test.
//!
//! The rule, taken as the first line of every test:
//!
//! * [`exclusive`] — the test runs alone. For a test that measures time
//!   (nemesis, restart_at_once: recovery figures), asserts a deadline under
//!   faults (failover, quiescence, transfers to a down or paused node,
//!   replica_handoff: a drop within seconds), loads the machine itself
//!   (many_partitions: a busy loop on a core; entry_limits: ~85 MiB of big
//!   entries; ingest_flood: 60 MiB bodies and a peak-RSS bound; spike: ten
//!   times capacity), or moves replicas against deadlines (membership, tls:
//!   a kill -9 under load).
//! * [`shared`] — any number of shared tests run together (libtest's thread
//!   count is the real limit). For tests whose waits are generous next to
//!   what they wait for and that assert on answers, not on durations: the
//!   API surface, counts, the clients, the CLI, leadership and membership
//!   changes without a deadline tighter than a minute.
//!
//! When unsure, take it exclusively: a slower suite is better than a flaky
//! one. `tests/cluster/main.rs` checks that every test takes its turn.
//!
//! The lock is tokio's: fair (a waiting exclusive test is not overtaken by
//! later shared ones), held across awaits, released when a test panics.

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static TURNS: RwLock<()> = RwLock::const_new(());

/// A test's turn to run; dropping it (the test ending) lets others in.
#[must_use = "the turn lasts as long as the value: bind it (`let _turn = …`)"]
#[derive(Debug)]
pub enum Turn {
    Shared(RwLockReadGuard<'static, ()>),
    Exclusive(RwLockWriteGuard<'static, ()>),
}

/// Waits until no exclusive test runs; others holding a shared turn may.
pub async fn shared() -> Turn {
    Turn::Shared(TURNS.read().await)
}

/// Waits until no other cluster test runs, and keeps it so.
pub async fn exclusive() -> Turn {
    Turn::Exclusive(TURNS.write().await)
}
