//! How the agent learns who it is and where its node is (REFERENCE §4.2).

use anyhow::{anyhow, Context, Result};

use nex_api::agent::{env, MachineMetadata};

/// Reads the metadata: from `NEX_*` environment variables in the process tier.
pub fn obtain() -> Result<MachineMetadata> {
    if std::env::var(env::WORKLOAD_ID).is_ok() {
        let get = |k: &str| std::env::var(k).map_err(|_| anyhow!("missing environment variable {k}"));
        return Ok(MachineMetadata {
            vmid: get(env::WORKLOAD_ID)?,
            node_nats_host: get(env::NODE_NATS_HOST)?,
            node_nats_port: get(env::NODE_NATS_PORT)?.parse().context("NEX_NODE_NATS_PORT is not a port number")?,
            node_nats_nkey: get(env::NODE_NATS_NKEY_SEED)?,
            message: "Metadata obtained from no-sandbox environment".into(),
        });
    }
    Err(anyhow!(
        "no metadata: set {} (and the other NEX_NODE_* variables); the node starts agents with them",
        env::WORKLOAD_ID
    ))
}
