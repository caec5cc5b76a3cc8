//! Run state on disk: one directory per node run, locked while the node lives, so that a node
//! started after a crash (SIGKILL) can find and remove what an earlier run left behind.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cgroup::{self, CgroupVersion};

/// This run's directory and lock.
#[derive(Debug)]
pub struct RunState {
    /// Short random id naming the run (also its cgroup directory).
    pub run_id: String,
    /// `<state_dir>/runs/<run_id>`.
    pub dir: PathBuf,
    _lock: File,
}

impl RunState {
    /// Creates and locks a fresh run directory under `state_dir`.
    pub fn create(state_dir: &Path) -> Result<RunState> {
        let run_id = format!("{:08x}", rand::random::<u32>());
        let dir = state_dir.join("runs").join(&run_id);
        crate::files::private_dir(&state_dir.join("runs"))?;
        crate::files::private_dir(&dir).with_context(|| format!("creating run directory {}", dir.display()))?;
        let lock = File::create(dir.join("lock"))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            anyhow::bail!("could not lock {}: {}", dir.display(), std::io::Error::last_os_error());
        }
        std::fs::write(dir.join("pid"), std::process::id().to_string())?;
        Ok(RunState { run_id, dir, _lock: lock })
    }

    /// The work directory of agent `id`.
    pub fn agent_dir(&self, id: &str) -> PathBuf {
        self.dir.join("agents").join(id)
    }

    /// Removes this run's directory (at clean shutdown).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// True for the shape of a run id (8 lowercase hex digits): anything else under `runs/` was not
/// made by a node and is left alone.
pub fn is_run_id(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Cleans every run under `state_dir` whose node is gone: kills leftover agents and workloads,
/// removes their cgroups and files. Returns how many runs were cleaned. Nothing read from the
/// state directory is executed: the container runtime is the one `cfg` names.
pub async fn cleanup_stale_runs(state_dir: &Path, cgroups: Option<CgroupVersion>, cfg: &crate::NodeConfig) -> usize {
    let Ok(rd) = std::fs::read_dir(state_dir.join("runs")) else {
        return 0;
    };
    let mut cleaned = 0;
    for e in rd.flatten() {
        let dir = e.path();
        if !is_run_id(&e.file_name().to_string_lossy()) {
            continue;
        }
        let Ok(lock) = File::open(dir.join("lock")) else {
            // No lock file: a half-created run; remove it.
            let _ = std::fs::remove_dir_all(&dir);
            continue;
        };
        // SAFETY: flock on a descriptor we own; non-blocking probe.
        let free = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !free {
            continue; // a live node owns it
        }
        let run = e.file_name().to_string_lossy().to_string();
        kill_recorded_agents(&dir);
        if !cfg.preserve_network {
            // Its CNI attachments (links and address leases, from the cached results), while
            // the namespaces the plugins delete the links in still exist.
            crate::tiers::cni::del_prefix(&format!("nex-{run}-")).await;
        }
        let runtime = crate::tiers::container::find_runtime(&cfg.container_runtime, &cfg.bin_path);
        crate::tiers::container::cleanup_run(&dir, &run, runtime.as_deref(), &cfg.sandbox_dir()).await;
        crate::tiers::microvm::cleanup_run(&run).await;
        if let Some(v) = cgroups {
            cgroup::remove_run(v, &run).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
        tracing::info!(run = %run, "cleaned up leftovers of a previous node run");
        cleaned += 1;
    }
    cleaned
}

/// Kills the process groups of agents recorded in a dead run (for hosts without cgroups).
fn kill_recorded_agents(run_dir: &Path) {
    let Ok(rd) = std::fs::read_dir(run_dir.join("agents")) else {
        return;
    };
    for e in rd.flatten() {
        if let Ok(pid) = std::fs::read_to_string(e.path().join("agent.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                if pid > 1 && is_nex_agent(pid) {
                    // SAFETY: signalling a process group we recorded as a nex agent.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
            }
        }
    }
}

fn is_nex_agent(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("nex-agent"))
        .unwrap_or(false)
}
