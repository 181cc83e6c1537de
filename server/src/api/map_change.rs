//! Changing the cluster map on the metadata leader: read the map, derive
//! the next one, commit it — under `Node::map_writes`, so changes made at
//! once (a spread, the balancer switch, a membership change) never commit a
//! successor of a map another already replaced.

use std::time::Duration;

use tonic::Status;

use crate::command::Command;
use crate::meta::ClusterMap;
use crate::node::Node;

const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Commits `change(current map)` if it gives a new map; whether it did.
pub async fn change_map(
    node: &Node,
    change: impl FnOnce(&ClusterMap) -> Result<Option<ClusterMap>, Status>,
) -> Result<bool, Status> {
    let _map_writes = node.map_writes.lock().await;
    let Some(next) = change(&node.map())? else { return Ok(false) };
    match tokio::time::timeout(COMMIT_TIMEOUT, node.metadata.client_write(Command::SetClusterMap(next))).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) => Err(Status::unavailable(format!("committing the cluster map: {e}"))),
        Err(_) => Err(Status::unavailable("committing the cluster map timed out")),
    }
}
