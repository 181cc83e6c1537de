//! Crash points: `tallyd --crash-at NAME` ends the process at once, as
//! `kill -9` would (no flush, no destructors, nothing said to peers), the
//! first time execution reaches the point called NAME.
//!
//! Why: a crash test that sends SIGKILL from outside lands wherever the
//! process happens to be, so the short windows that matter most — between
//! the writes of a snapshot install, say — are hit by luck or not at all.
//! A named point makes the crash land there every time, on a real process
//! with a real RocksDB, and the test then restarts the node without the
//! flag and checks what recovery made of it. A point costs one load of a
//! set-once cell when unarmed, and points sit only on rare paths.
//!
//! Points: `snapshot-install-wiped` (the group's old state is deleted and
//! the "installing" marker is on disk, nothing of the new state written),
//! `snapshot-install-written` (the new state and its applied id are on
//! disk, the snapshot not yet published nor its state loaded),
//! `split-checkpointed` (a partition applying `Command::Split` has written
//! everything before it, nothing of the split), `split-written` (the
//! split's batch is on disk, its entry not yet answered).

use std::sync::OnceLock;

static ARMED: OnceLock<String> = OnceLock::new();

/// Every point a test may name; anything else is a configuration error.
pub const POINTS: [&str; 4] =
    ["snapshot-install-wiped", "snapshot-install-written", "split-checkpointed", "split-written"];

/// Arms the point called `name` for this process's life.
pub fn arm(name: &str) -> Result<(), String> {
    if !POINTS.contains(&name) {
        return Err(format!("--crash-at {name}: not a crash point (known: {})", POINTS.join(", ")));
    }
    ARMED.set(name.to_owned()).map_err(|_| "a crash point is already armed".to_owned())
}

/// Ends the process here if this point is armed.
pub fn reach(name: &str) {
    if ARMED.get().is_some_and(|armed| armed == name) {
        eprintln!("crash point {name} reached: aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_points_can_be_armed() {
        assert!(arm("no-such-point").unwrap_err().contains("snapshot-install-wiped"));
        // Unarmed, reaching a point does nothing.
        reach("snapshot-install-wiped");
    }
}
