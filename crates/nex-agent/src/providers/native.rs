//! Native workloads: an executable run as a child of the agent, in a process group of its own,
//! its output shipped line by line (one log message each), its exit reported as
//! `workload_undeployed`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use nex_api::agent::{level, AgentDeployRequest};

use crate::Agent;

/// Lines per second a workload may log; beyond that, lines are dropped and counted.
const LOG_LINES_PER_SEC: f64 = 1000.0;
/// Burst allowance.
const LOG_BURST: f64 = 2000.0;

/// Token bucket over a workload's output lines, shared by its stdout and stderr readers.
struct LogLimiter {
    tokens: f64,
    last: std::time::Instant,
    dropped: u64,
    last_report: std::time::Instant,
}

impl LogLimiter {
    fn new() -> Self {
        let now = std::time::Instant::now();
        LogLimiter { tokens: LOG_BURST, last: now, dropped: 0, last_report: now }
    }

    /// Whether the next line may be shipped, and a count of dropped lines to report, if due.
    fn admit(&mut self) -> (bool, Option<u64>) {
        let now = std::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * LOG_LINES_PER_SEC).min(LOG_BURST);
        self.last = now;
        let ok = if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        };
        let report = if self.dropped > 0 && now.duration_since(self.last_report) >= Duration::from_secs(1) {
            self.last_report = now;
            Some(std::mem::take(&mut self.dropped))
        } else {
            None
        };
        (ok, report)
    }

    fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

async fn report_dropped(agent: &Agent, name: &str, n: u64) {
    let text = format!("nex: dropped {n} log lines of {name} (rate limit {LOG_LINES_PER_SEC} lines/s)");
    agent.log("nex-agent", level::WARN, &text).await;
}

/// Who a native workload runs as inside a sandbox: never the agent's own root.
struct WorkloadUser {
    uid: u32,
    /// Its own writable working directory.
    dir: PathBuf,
}

/// The sandbox's workload user (from the tier's `NEX_WORKLOAD_UID` / `NEX_WORKLOAD_DIR`), with
/// the artifact made runnable by it and its directory made; `None` outside a sandbox.
fn workload_user(agent: &Agent, artifact: &std::path::Path) -> std::io::Result<Option<WorkloadUser>> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(uid) = std::env::var(nex_api::agent::env::WORKLOAD_UID).ok().and_then(|v| v.parse::<u32>().ok()) else {
        return Ok(None);
    };
    let dir = std::env::var(nex_api::agent::env::WORKLOAD_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|_| agent.work_dir.join("data"));
    // In a guest the agent wrote the artifact and is root; in a container the node prepared both.
    let meta = std::fs::metadata(artifact)?;
    if meta.gid() != uid {
        std::os::unix::fs::chown(artifact, Some(meta.uid()), Some(uid))?;
    }
    if meta.mode() & 0o050 != 0o050 {
        std::fs::set_permissions(artifact, std::fs::Permissions::from_mode(0o550))?;
    }
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(Some(WorkloadUser { uid, dir }))
}

/// A running native workload.
pub struct Native {
    pid: i32,
    exited: watch::Receiver<Option<i32>>,
}

/// Spawns `cmd`, again for a while when the executable is busy: the artifact was just written,
/// and a process forked meanwhile by another thread (the node, or here) may briefly hold an
/// inherited descriptor to it open for writing until it execs.
async fn spawn(cmd: &mut Command) -> std::io::Result<tokio::process::Child> {
    let mut wait = Duration::from_millis(5);
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && wait < Duration::from_millis(500) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            other => return other,
        }
    }
}

impl Native {
    /// Spawns the executable.
    pub async fn deploy(
        agent: Arc<Agent>,
        req: &AgentDeployRequest,
        path: PathBuf,
    ) -> Result<Native, super::DeployError> {
        let name = req.workload_name.clone();
        let failed = |e: std::io::Error| super::DeployError::Spawn {
            name: name.clone(),
            vm: agent.id.clone(),
            detail: e.to_string(),
        };
        let user = workload_user(&agent, &path).map_err(failed)?;
        let mut cmd = Command::new(&path);
        cmd.args(&req.argv)
            .env_clear()
            .envs(req.environment.iter().map(|(k, v)| (k.to_uppercase(), v.clone())))
            .current_dir(user.as_ref().map(|u| u.dir.clone()).unwrap_or_else(|| agent.work_dir.clone()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(u) = &user {
            // Supplementary groups are dropped with it (std calls setgroups for us).
            cmd.uid(u.uid).gid(u.uid);
        }
        nex_io::tie_to_parent(&mut cmd, libc::SIGKILL);
        let mut child = match spawn(&mut cmd).await {
            Ok(c) => c,
            Err(e) => {
                agent.log("nex-agent", level::ERROR, &format!("Workload {name} failed to deploy: {e}")).await;
                return Err(failed(e));
            }
        };
        let pid = child.id().unwrap_or(0) as i32;
        let _ = std::fs::write(agent.work_dir.join("workload.pid"), pid.to_string());
        let mut readers = Vec::new();
        let limiter = Arc::new(std::sync::Mutex::new(LogLimiter::new()));
        for (stream, lvl) in [
            (child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>), level::INFO),
            (child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>), level::ERROR),
        ] {
            if let Some(s) = stream {
                let agent = agent.clone();
                let name = name.clone();
                let limiter = limiter.clone();
                readers.push(tokio::spawn(async move {
                    let mut r = BufReader::new(s);
                    let mut buf = Vec::new();
                    loop {
                        buf.clear();
                        match r.read_until(b'\n', &mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let (ok, report) = limiter.lock().map(|mut l| l.admit()).unwrap_or((true, None));
                                if let Some(n) = report {
                                    report_dropped(&agent, &name, n).await;
                                }
                                if ok {
                                    let line = String::from_utf8_lossy(&buf);
                                    let line = line.trim_end_matches(['\n', '\r']);
                                    agent.log(&name, lvl, line).await;
                                }
                            }
                        }
                    }
                }));
            }
        }
        agent.log("nex-agent", level::INFO, &format!("Workload {name} deployed")).await;
        let (tx, rx) = watch::channel(None);
        let id = agent.id.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Ship the last lines before reporting the exit.
            for r in readers {
                let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
            }
            let dropped = limiter.lock().map(|mut l| l.take_dropped()).unwrap_or(0);
            if dropped > 0 {
                report_dropped(&agent, &name, dropped).await;
            }
            let (code, how) = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (s.code(), s.signal()) {
                        (Some(c), _) => (c, String::new()),
                        (None, Some(sig)) => (128 + sig, format!(" (killed by signal {sig})")),
                        _ => (-1, String::new()),
                    }
                }
                Err(e) => (-1, format!(" ({e})")),
            };
            let lvl = if code == 0 { level::INFO } else { level::ERROR };
            agent.log("nex-agent", lvl, &format!("Workload {name} exited")).await;
            agent
                .workload_undeployed(&name, code, &format!("Exited workload: {name}; vm: {id}; status: {code}{how}"))
                .await;
            let _ = tx.send(Some(code));
        });
        Ok(Native { pid, exited: rx })
    }

    /// SIGTERM to the workload's process group, SIGKILL after the grace period.
    pub async fn undeploy(&self) {
        if self.pid <= 1 || self.exited.borrow().is_some() {
            return;
        }
        let grace: u64 = std::env::var("NEX_STOP_GRACE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
        // SAFETY: signalling the process group we created for the workload.
        unsafe { libc::kill(-self.pid, libc::SIGTERM) };
        let mut rx = self.exited.clone();
        let exited = tokio::time::timeout(Duration::from_millis(grace), async {
            let _ = rx.wait_for(|e| e.is_some()).await.map(|_| ());
        })
        .await
        .is_ok();
        // Whatever is left in the group (children ignoring SIGTERM) goes now.
        // SAFETY: as above.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        if !exited {
            let mut rx = self.exited.clone();
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = rx.wait_for(|e| e.is_some()).await.map(|_| ());
            })
            .await;
        }
    }
}
