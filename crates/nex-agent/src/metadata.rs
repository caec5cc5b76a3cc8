//! How the agent learns who it is and where its node is.

use anyhow::{anyhow, Context, Result};

use nex_api::agent::{env, MachineMetadata};

/// Names a file holding the agent's nkey seed (instead of `NEX_NODE_NATS_NKEY_SEED`).
pub const SEED_FILE: &str = "NEX_NODE_NATS_NKEY_SEED_FILE";

/// Reads the metadata: from `NEX_*` environment variables in the process tier.
pub fn obtain() -> Result<MachineMetadata> {
    if std::env::var(env::WORKLOAD_ID).is_ok() {
        let get = |k: &str| std::env::var(k).map_err(|_| anyhow!("missing environment variable {k}"));
        return Ok(MachineMetadata {
            vmid: get(env::WORKLOAD_ID)?,
            node_nats_host: get(env::NODE_NATS_HOST)?,
            node_nats_port: get(env::NODE_NATS_PORT)?.parse().context("NEX_NODE_NATS_PORT is not a port number")?,
            node_nats_nkey: match std::env::var(SEED_FILE) {
                // Sandboxed tiers hand the seed over in a file, read once and removed, so the
                // workload beside the agent cannot find it.
                Ok(f) => {
                    let seed = std::fs::read_to_string(&f).with_context(|| format!("reading {f}"))?;
                    let _ = std::fs::remove_file(&f);
                    seed.trim().to_string().into()
                }
                Err(_) => get(env::NODE_NATS_NKEY_SEED)?.into(),
            },
            message: "Metadata obtained from no-sandbox environment".into(),
        });
    }
    Err(anyhow!(
        "no metadata: set {} (and the other NEX_NODE_* variables); the node starts agents with them",
        env::WORKLOAD_ID
    ))
}
