//! The `process` tier: each agent is a child process of the node, in its own process group and
//! cgroup leaf (memory and pids limits from `machine_template`), killed as a tree on stop.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use tokio::process::Command;
use tokio::sync::watch;

use super::{AgentExit, AgentHandle, AgentSpec, IsolationTier};
use crate::cgroup::{Cgroup, CgroupVersion, Limits};

/// Agents as plain child processes.
#[derive(Debug)]
pub struct ProcessTier {
    agent_path: PathBuf,
    run_id: String,
    cgroups: Option<CgroupVersion>,
}

impl ProcessTier {
    /// A tier spawning `agent_path`, with cgroup leaves under `nex/<run_id>` when available.
    pub fn new(agent_path: PathBuf, run_id: String, cgroups: Option<CgroupVersion>) -> Self {
        ProcessTier { agent_path, run_id, cgroups }
    }
}

impl IsolationTier for ProcessTier {
    fn name(&self) -> &'static str {
        crate::config::isolation::PROCESS
    }

    fn shares_host_filesystem(&self) -> bool {
        true
    }

    fn launch(&self, spec: AgentSpec) -> BoxFuture<'_, Result<Box<dyn AgentHandle>>> {
        Box::pin(async move {
            std::fs::create_dir_all(&spec.work_dir)
                .with_context(|| format!("creating agent directory {}", spec.work_dir.display()))?;
            let cgroup = match self.cgroups {
                Some(v) => {
                    let limits = Limits {
                        memory_bytes: spec.template.memsize_mib * 1024 * 1024,
                        pids_max: spec.template.pids_max,
                        cpus: spec.template.vcpu_count,
                    };
                    match Cgroup::create(v, &self.run_id, &spec.id, limits) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not create a cgroup for agent {}; running without limits", spec.id);
                            None
                        }
                    }
                }
                None => None,
            };
            let mut cmd = Command::new(&self.agent_path);
            cmd.env_clear()
                .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
                .env(nex_api::agent::env::SANDBOX, "false")
                .env(nex_api::agent::env::WORKLOAD_ID, &spec.id)
                .env(nex_api::agent::env::NODE_NATS_HOST, &spec.nats_host)
                .env(nex_api::agent::env::NODE_NATS_PORT, spec.nats_port.to_string())
                .env(nex_api::agent::env::NODE_NATS_NKEY_SEED, spec.nkey_seed.expose())
                .env("NEX_AGENT_WORKDIR", &spec.work_dir)
                .env("NEX_STOP_GRACE_MS", spec.stop_grace_ms.to_string())
                .env("TMPDIR", &spec.work_dir)
                .current_dir(&spec.work_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true);
            if let Ok(v) = std::env::var("NEX_AGENT_LOG") {
                cmd.env("NEX_AGENT_LOG", v);
            }
            nex_io::tie_to_parent(&mut cmd, libc::SIGKILL);
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    if let Some(cg) = &cgroup {
                        cg.destroy().await;
                    }
                    let _ = tokio::fs::remove_dir_all(&spec.work_dir).await;
                    return Err(anyhow::anyhow!("starting agent {}: {e}", self.agent_path.display()));
                }
            };
            let pid = child.id().unwrap_or(0);
            let _ = std::fs::write(spec.work_dir.join("agent.pid"), pid.to_string());
            if let Some(cg) = &cgroup {
                if let Err(e) = cg.add(pid) {
                    tracing::warn!(error = %e, "could not move agent {} into its cgroup", spec.id);
                }
            }
            // The agent's own diagnostics (its workload's output travels over NATS).
            if let Some(s) = child.stdout.take() {
                let id = spec.id.clone();
                nex_io::forward_lines(
                    s,
                    move |l| tracing::debug!(workload_id = %id, from_agent = true, stream = "stdout", "{l}"),
                );
            }
            if let Some(s) = child.stderr.take() {
                let id = spec.id.clone();
                nex_io::forward_lines(
                    s,
                    move |l| tracing::debug!(workload_id = %id, from_agent = true, stream = "stderr", "{l}"),
                );
            }
            let rx = super::watch_exit(child);
            Ok(Box::new(ProcessAgent { pid, exited: rx, cgroup, work_dir: spec.work_dir }) as Box<dyn AgentHandle>)
        })
    }
}

/// A running agent process.
#[derive(Debug)]
struct ProcessAgent {
    pid: u32,
    exited: watch::Receiver<Option<AgentExit>>,
    cgroup: Option<Cgroup>,
    work_dir: PathBuf,
}

impl AgentHandle for ProcessAgent {
    fn exited(&self) -> watch::Receiver<Option<AgentExit>> {
        self.exited.clone()
    }

    fn destroy(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.pid > 0 && self.exited.borrow().is_none() {
                // The agent and workload share process group `pid` unless the workload made its
                // own; the cgroup (below) catches anything that escaped.
                // SAFETY: signalling the process group we created for this agent.
                unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
            }
            // The workload runs in a process group of its own, recorded by the agent.
            if let Ok(p) = std::fs::read_to_string(self.work_dir.join("workload.pid")) {
                if let Ok(p) = p.trim().parse::<i32>() {
                    if p > 1 {
                        // SAFETY: signalling the workload's own process group.
                        unsafe { libc::kill(-p, libc::SIGKILL) };
                    }
                }
            }
            if let Some(cg) = &self.cgroup {
                cg.destroy().await;
            }
            let mut rx = self.exited.clone();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), super::wait_exit(&mut rx)).await;
            let _ = tokio::fs::remove_dir_all(&self.work_dir).await;
        })
    }

    fn oom_killed(&self) -> bool {
        self.cgroup.as_ref().map(|c| c.oom_killed()).unwrap_or(false)
    }

    fn agent_rss_bytes(&self) -> Option<u64> {
        rss_of(self.pid)
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }
}

/// Resident set size of `pid` in bytes, from `/proc`.
pub fn rss_of(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Shared handle type.
pub type SharedHandle = Arc<dyn AgentHandle>;
