//! Small helpers over async-nats.

use anyhow::{anyhow, Result};

/// Waits until the server has processed everything this connection sent so far (see
/// [`nex_io::round_trip`]).
pub async fn round_trip(nc: &async_nats::Client) -> Result<()> {
    nex_io::round_trip(nc).await.map_err(|e| anyhow!(e))
}
