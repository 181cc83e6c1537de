//! `--target tally` (the default): the ordinary [`TallyClient`], so the
//! bench measures what an application gets — partition routing, per
//! partition batching, retries with the same event ids — against a cluster
//! that acknowledges only after quorum commit of fsync'd logs.

use anyhow::Context;

use tally_client::{ClientConfig, TallyClient};

/// Connects the Tally client with the bench's batching settings.
pub(crate) async fn connect(config: ClientConfig) -> anyhow::Result<TallyClient> {
    let seeds = config.seeds.join(",");
    TallyClient::with_config(config).await.with_context(|| format!("connecting to {seeds}"))
}
