//! Small helpers over async-nats.

use std::time::Duration;

use anyhow::{anyhow, Result};
use futures::StreamExt;

/// Waits until the server has processed everything this connection sent so far.
///
/// `flush` only writes to the socket; a message that travels to the server and back on a fresh
/// inbox proves that earlier SUBs are registered before another connection relies on them.
pub async fn round_trip(nc: &async_nats::Client) -> Result<()> {
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await?;
    nc.publish(inbox, bytes::Bytes::new()).await?;
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .map_err(|_| anyhow!("no round trip to the NATS server within 5s"))?
        .ok_or_else(|| anyhow!("connection closed"))?;
    let _ = sub.unsubscribe().await;
    Ok(())
}
