//! Execution providers: one per workload type, each with the same small lifecycle —
//! deploy, (trigger), undeploy.

pub mod native;

use std::path::PathBuf;
use std::sync::Arc;

use nex_api::agent::AgentDeployRequest;

use crate::Agent;

/// The workload an agent runs.
pub enum Provider {
    /// A native executable.
    Native(native::Native),
}

impl Provider {
    /// Starts the workload described by `req` from the artifact at `path`.
    pub async fn deploy(agent: Arc<Agent>, req: &AgentDeployRequest, path: PathBuf) -> Result<Provider, String> {
        match nex_api::workload_type::canonical(&req.workload_type).as_str() {
            nex_api::workload_type::NATIVE => native::Native::deploy(agent, req, path).await.map(Provider::Native),
            other => Err(format!("workload type {other} is not supported by this agent")),
        }
    }

    /// Stops the workload, gracefully first.
    pub async fn undeploy(&self) {
        match self {
            Provider::Native(n) => n.undeploy().await,
        }
    }

    /// Runs a function call.
    pub async fn trigger(&self, _subject: &str, _payload: bytes::Bytes) -> Result<(Vec<u8>, u64), String> {
        match self {
            Provider::Native(_) => Err("native workloads have no triggers".into()),
        }
    }
}
