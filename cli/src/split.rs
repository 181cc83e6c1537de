//! `tally cluster split PARTITION`: split a partition's hash range in two,
//! the upper half to a new partition (see `Cluster.Split`), and how status
//! shows splits.

use std::time::Duration;

use serde_json::json;
use tally_proto::v1::{SplitInfo, SplitRequest, StatusResponse};

use crate::cluster::{admin_call, with_deadline};
use crate::{print_json, Cli};

pub async fn run(cli: &Cli, partition: u32, timeout: Duration) -> anyhow::Result<i32> {
    let what = format!("splitting partition {partition}");
    let resp = admin_call(cli, &what, timeout, |mut c, t| async move {
        c.split(with_deadline(SplitRequest { partition }, t)).await
    })
    .await?;
    let Some(split) = resp.split else {
        anyhow::bail!("{what}: the node answered without the split");
    };
    if cli.json {
        print_json(&to_json(&split));
    } else {
        println!("{}", describe(&split));
    }
    Ok(0)
}

pub fn to_json(s: &SplitInfo) -> serde_json::Value {
    json!({
        "partition": s.partition, "parent": s.parent, "slot": s.slot,
        "lo": s.lo, "last": s.last, "active": s.active,
    })
}

pub fn describe(s: &SplitInfo) -> String {
    let state = if s.active { "" } else { " (pending)" };
    format!(
        "partition {} split off partition {}{state}: slot {}, positions {:#x}..={:#x}",
        s.partition, s.parent, s.slot, s.lo, s.last
    )
}

/// The splits of the report that knows most of them (the map's newest).
pub fn splits_of<'a>(reports: impl Iterator<Item = &'a StatusResponse>) -> Vec<SplitInfo> {
    reports
        .map(|s| &s.splits)
        .max_by_key(|splits| (splits.iter().filter(|s| s.active).count(), splits.len()))
        .cloned()
        .unwrap_or_default()
}
