//! Isolation tiers: how an agent is started and what walls surround it.
//!
//! A tier launches one agent for one workload account and returns a handle that can watch for its
//! exit and destroy everything it created. The pool and the workload manager only see this seam,
//! so a container or micro-VM tier plugs in beside [`process::ProcessTier`] without touching the
//! control API.

pub mod cni;
pub mod container;
pub mod cpio;
pub mod microvm;
pub mod net;
pub mod process;

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::config::MachineTemplate;

/// Everything a tier needs to start one agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Workload (agent) id.
    pub id: String,
    /// Internal NATS host as the agent must dial it.
    pub nats_host: String,
    /// Internal NATS port.
    pub nats_port: u16,
    /// The agent's nkey user seed.
    pub nkey_seed: nex_api::secret::Secret,
    /// A directory owned by this agent, removed when it stops.
    pub work_dir: PathBuf,
    /// Resources.
    pub template: MachineTemplate,
    /// Grace period between SIGTERM and SIGKILL when the workload is stopped.
    pub stop_grace_ms: u64,
}

/// How an agent ended.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentExit {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal, when it was killed.
    pub signal: Option<i32>,
}

/// A running agent.
pub trait AgentHandle: Send + Sync + std::fmt::Debug {
    /// Becomes `Some` when the agent has exited.
    fn exited(&self) -> watch::Receiver<Option<AgentExit>>;
    /// Kills the agent and everything it started, and removes what the tier created for it.
    fn destroy(&self) -> BoxFuture<'_, ()>;
    /// True when the memory limit killed something inside.
    fn oom_killed(&self) -> bool;
    /// Resident memory of the agent itself, in bytes.
    fn agent_rss_bytes(&self) -> Option<u64>;
    /// Host pid of the agent, where there is one.
    fn pid(&self) -> Option<u32>;
    /// What the tier saw go wrong while the agent started (e.g. the runtime's error), if anything.
    fn start_failure(&self) -> Option<String> {
        None
    }
}

/// A way to run agents.
pub trait IsolationTier: Send + Sync {
    /// `process`, `container` or `microvm`.
    fn name(&self) -> &'static str;
    /// The fenced bridge network agents live on, in the sandboxed tiers; `None` when agents
    /// share the host's network (the process tier).
    fn bridge(&self) -> Option<&net::BridgeNet> {
        None
    }
    /// Whether workloads are isolated from the host (reported as `nex.unsafe` when not).
    fn sandboxed(&self) -> bool {
        self.bridge().is_some()
    }
    /// Address the internal NATS server must listen on for agents of this tier.
    fn internal_listen_host(&self) -> String {
        self.agent_nats_host()
    }
    /// Address agents dial to reach it: the host's on the bridge, else loopback.
    fn agent_nats_host(&self) -> String {
        self.bridge().map(|b| b.host_ip().to_string()).unwrap_or_else(|| "127.0.0.1".into())
    }
    /// True when agents see the host's file system, so the node can hand them the artifact as a
    /// file in their work directory instead of through the `NEXCACHE` bucket.
    fn shares_host_filesystem(&self) -> bool {
        false
    }
    /// Where the agent sees its work directory `host` (same path unless the tier remaps it).
    fn agent_work_dir(&self, host: &Path) -> PathBuf {
        host.to_path_buf()
    }
    /// The host directory agent `id` works in (by default in the node's private run directory).
    fn host_work_dir(&self, run: &crate::state::RunState, id: &str) -> PathBuf {
        run.agent_dir(id)
    }
    /// Gives the artifact the node wrote at `path` (in the agent's work directory) the owner and
    /// mode the tier's agent and workload need; by default it stays the node's, mode 0700.
    fn own_artifact(&self, _path: &Path) -> anyhow::Result<()> {
        Ok(())
    }
    /// How long a new agent may take to start and handshake, given the configured
    /// `agent_handshake_timeout_ms` (tiers that boot a kernel need longer).
    fn start_timeout(&self, configured: std::time::Duration) -> std::time::Duration {
        configured
    }
    /// Lets agents reach `port` on the internal NATS host (through the bridge's firewall).
    fn expose(&self, port: u16) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            match self.bridge() {
                Some(b) => b.allow_port(port).await,
                None => Ok(()),
            }
        })
    }
    /// The NATS URL list a workload of agent `agent_id` must dial to reach `urls` from inside the
    /// tier: in sandboxed tiers each of the checked `targets` through a relay serving that agent
    /// alone, gone with it.
    fn workload_nats_url<'a>(
        &'a self,
        agent_id: &'a str,
        urls: &'a str,
        targets: &'a [crate::nats_targets::Target],
    ) -> BoxFuture<'a, anyhow::Result<String>> {
        Box::pin(async move {
            match self.bridge() {
                Some(b) => b.workload_nats_url(agent_id, urls, targets).await,
                None => Ok(urls.to_string()),
            }
        })
    }
    /// Removes what the tier made for the whole node run (after every agent is destroyed).
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Starts one agent.
    fn launch(&self, spec: AgentSpec) -> BoxFuture<'_, anyhow::Result<Box<dyn AgentHandle>>>;
}

/// Reaps `child` in the background; the receiver becomes `Some` with how it ended.
pub fn watch_exit(mut child: tokio::process::Child) -> watch::Receiver<Option<AgentExit>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let exit = match child.wait().await {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                AgentExit { code: s.code(), signal: s.signal() }
            }
            Err(_) => AgentExit { code: None, signal: None },
        };
        let _ = tx.send(Some(exit));
    });
    rx
}

/// Waits until an agent has exited.
pub async fn wait_exit(rx: &mut watch::Receiver<Option<AgentExit>>) {
    let _ = rx.wait_for(|e| e.is_some()).await.map(|_| ());
}
