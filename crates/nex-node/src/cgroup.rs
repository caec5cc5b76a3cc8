//! One cgroup leaf per agent, with the memory and pids limits of `machine_template`.
//!
//! Works with cgroup v2 (`/sys/fs/cgroup/nex/...`, `memory.max`, `pids.max`, `cgroup.kill`) and
//! with v1 (one directory per controller: `memory/nex/...`, `pids/nex/...`). Where neither is
//! writable (not root, no controllers) the node runs without limits and says so once.

use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";
const GROUP: &str = "nex";

/// Which cgroup layout the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Unified hierarchy with memory and pids controllers.
    V2,
    /// Per-controller hierarchies.
    V1,
}

/// Detects a usable cgroup layout with memory and pids controllers.
pub fn detect() -> Option<CgroupVersion> {
    let v2 = Path::new(ROOT).join("cgroup.controllers");
    if let Ok(c) = std::fs::read_to_string(&v2) {
        if c.split_whitespace().any(|x| x == "memory") && c.split_whitespace().any(|x| x == "pids") {
            return Some(CgroupVersion::V2);
        }
    }
    if Path::new(ROOT).join("memory/cgroup.procs").exists() && Path::new(ROOT).join("pids/cgroup.procs").exists() {
        return Some(CgroupVersion::V1);
    }
    None
}

/// A cgroup leaf (one directory per controller on v1).
#[derive(Debug, Clone)]
pub struct Cgroup {
    version: CgroupVersion,
    dirs: Vec<PathBuf>,
}

/// Limits applied to a leaf.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of memory (including page cache) before the OOM killer acts.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids_max: u64,
    /// CPUs' worth of CPU time (v2 `cpu.max`; v1 is not throttled).
    pub cpus: u32,
}

impl Cgroup {
    /// Creates `nex/<run>/<name>` with `limits`.
    pub fn create(version: CgroupVersion, run: &str, name: &str, limits: Limits) -> std::io::Result<Cgroup> {
        let cg = Cgroup::at(version, run, name);
        match version {
            CgroupVersion::V2 => {
                let base = Path::new(ROOT).join(GROUP);
                std::fs::create_dir_all(base.join(run))?;
                // Delegate controllers down to the leaves (best effort: may already be set).
                let _ = std::fs::write(Path::new(ROOT).join("cgroup.subtree_control"), "+memory +pids +cpu");
                let _ = std::fs::write(base.join("cgroup.subtree_control"), "+memory +pids +cpu");
                let _ = std::fs::write(base.join(run).join("cgroup.subtree_control"), "+memory +pids +cpu");
                let d = &cg.dirs[0];
                std::fs::create_dir_all(d)?;
                std::fs::write(d.join("memory.max"), limits.memory_bytes.to_string())?;
                let _ = std::fs::write(d.join("memory.swap.max"), "0");
                std::fs::write(d.join("pids.max"), limits.pids_max.to_string())?;
                let _ = std::fs::write(d.join("cpu.max"), format!("{} 100000", limits.cpus as u64 * 100_000));
            }
            CgroupVersion::V1 => {
                let (mem, pids) = (&cg.dirs[0], &cg.dirs[1]);
                std::fs::create_dir_all(mem)?;
                std::fs::create_dir_all(pids)?;
                std::fs::write(mem.join("memory.limit_in_bytes"), limits.memory_bytes.to_string())?;
                let _ = std::fs::write(mem.join("memory.memsw.limit_in_bytes"), limits.memory_bytes.to_string());
                std::fs::write(pids.join("pids.max"), limits.pids_max.to_string())?;
            }
        }
        Ok(cg)
    }

    /// The leaf `nex/<run>/<name>` whether or not it exists.
    pub fn at(version: CgroupVersion, run: &str, name: &str) -> Cgroup {
        let dirs = match version {
            CgroupVersion::V2 => vec![Path::new(ROOT).join(GROUP).join(run).join(name)],
            CgroupVersion::V1 => vec![
                Path::new(ROOT).join("memory").join(GROUP).join(run).join(name),
                Path::new(ROOT).join("pids").join(GROUP).join(run).join(name),
            ],
        };
        Cgroup { version, dirs }
    }

    /// Moves process `pid` (and so its future children) into the leaf.
    pub fn add(&self, pid: u32) -> std::io::Result<()> {
        for d in &self.dirs {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// Every process in the leaf.
    pub fn pids(&self) -> Vec<i32> {
        let mut out: Vec<i32> = Vec::new();
        for d in &self.dirs {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// True when the OOM killer has acted in this leaf.
    pub fn oom_killed(&self) -> bool {
        match self.version {
            CgroupVersion::V2 => std::fs::read_to_string(self.dirs[0].join("memory.events"))
                .map(|s| s.lines().any(|l| l.starts_with("oom_kill ") && l.trim_end() != "oom_kill 0"))
                .unwrap_or(false),
            CgroupVersion::V1 => std::fs::read_to_string(self.dirs[0].join("memory.oom_control"))
                .map(|s| s.lines().any(|l| l.starts_with("oom_kill ") && l.trim_end() != "oom_kill 0"))
                .unwrap_or(false),
        }
    }

    /// SIGKILLs every process in the leaf until it is empty, then removes it.
    pub async fn destroy(&self) {
        if self.version == CgroupVersion::V2 {
            let _ = std::fs::write(self.dirs[0].join("cgroup.kill"), "1");
        }
        for _ in 0..200 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: kill(2) on pids the kernel lists in our own cgroup.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for d in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    }

    /// Whether the leaf directory still exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|d| d.exists())
    }
}

/// Removes the run directory `nex/<run>` after its leaves are gone (and, with `kill`, kills
/// whatever is left in them first).
pub async fn remove_run(version: CgroupVersion, run: &str) {
    let bases: Vec<PathBuf> = match version {
        CgroupVersion::V2 => vec![Path::new(ROOT).join(GROUP).join(run)],
        CgroupVersion::V1 => vec![
            Path::new(ROOT).join("memory").join(GROUP).join(run),
            Path::new(ROOT).join("pids").join(GROUP).join(run),
        ],
    };
    for base in &bases {
        if let Ok(rd) = std::fs::read_dir(base) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    let name = e.file_name().to_string_lossy().to_string();
                    Cgroup::at(version, run, &name).destroy().await;
                }
            }
        }
        let _ = std::fs::remove_dir(base);
    }
    remove_everywhere(run, None);
}

/// Removes `nex/<run>[/<leaf>]` from every mounted hierarchy (OCI runtimes make one per
/// controller), deepest directories first. Processes must be gone already.
pub fn remove_everywhere(run: &str, leaf: Option<&str>) {
    let Ok(rd) = std::fs::read_dir(ROOT) else {
        return;
    };
    for h in rd.flatten() {
        let mut base = h.path().join(GROUP).join(run);
        if let Some(l) = leaf {
            base = base.join(l);
        }
        if base.is_dir() {
            remove_tree(&base);
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
