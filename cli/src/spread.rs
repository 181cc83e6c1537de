//! `tally cluster spread ENTITY --ways K`: spread a hot entity's events
//! over K more partitions (see `Cluster.Spread`), and how status shows
//! spreads.

use std::time::Duration;

use serde_json::json;
use tally_proto::v1::{SpreadInfo, SpreadRequest, StatusResponse};

use crate::cluster::{admin_call, with_deadline};
use crate::{print_json, Cli};

pub async fn run(cli: &Cli, entity: &str, ways: u32, timeout: Duration) -> anyhow::Result<i32> {
    let what = format!("spreading {entity:?} over {ways} more partitions");
    let entity_id = entity.as_bytes().to_vec();
    let resp = admin_call(cli, &what, timeout, |mut c, t| async move {
        c.spread(with_deadline(SpreadRequest { entity_id, ways }, t)).await
    })
    .await?;
    let Some(spread) = resp.spread else {
        anyhow::bail!("{what}: the node answered without the spread");
    };
    if cli.json {
        print_json(&to_json(&spread));
    } else {
        println!("{}", describe(&spread));
    }
    Ok(0)
}

pub fn to_json(s: &SpreadInfo) -> serde_json::Value {
    json!({
        "entity": String::from_utf8_lossy(&s.entity_id), "home_partition": s.home_partition,
        "partitions": s.partitions, "from_ms": s.from_ms, "active": s.from_ms != 0,
    })
}

pub fn describe(s: &SpreadInfo) -> String {
    let entity = String::from_utf8_lossy(&s.entity_id);
    if s.from_ms == 0 {
        return format!("{entity}: spread over partitions {:?} pending (home {})", s.partitions, s.home_partition);
    }
    let from = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(s.from_ms as u64));
    format!(
        "{entity}: events from {from} spread over partitions {:?}; before, home partition {}",
        s.partitions, s.home_partition
    )
}

/// The spreads of the report that knows most of them (the map's newest).
pub fn spreads_of<'a>(reports: impl Iterator<Item = &'a StatusResponse>) -> Vec<SpreadInfo> {
    reports
        .map(|s| &s.spreads)
        .max_by_key(|spreads| (spreads.iter().filter(|s| s.from_ms != 0).count(), spreads.len()))
        .cloned()
        .unwrap_or_default()
}
