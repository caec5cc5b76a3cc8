//! Native workloads: an executable run as a child of the agent, in a process group of its own,
//! its output shipped line by line (W7), its exit reported as `workload_undeployed`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use nex_api::agent::{level, AgentDeployRequest};

use crate::Agent;

/// A running native workload.
pub struct Native {
    pid: i32,
    exited: watch::Receiver<Option<i32>>,
}

impl Native {
    /// Spawns the executable.
    pub async fn deploy(agent: Arc<Agent>, req: &AgentDeployRequest, path: PathBuf) -> Result<Native, String> {
        let name = req.workload_name.clone();
        let mut cmd = Command::new(&path);
        cmd.args(&req.argv)
            .env_clear()
            .envs(req.environment.iter().map(|(k, v)| (k.to_uppercase(), v.clone())))
            .current_dir(&agent.work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl only sets a flag on the child; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                agent.log("nex-agent", level::ERROR, &format!("Workload {name} failed to deploy: {e}")).await;
                return Err(format!("Failed to start workload: {name}; vm: {}: {e}", agent.id));
            }
        };
        let pid = child.id().unwrap_or(0) as i32;
        let _ = std::fs::write(agent.work_dir.join("workload.pid"), pid.to_string());
        let mut readers = Vec::new();
        for (stream, lvl) in [
            (child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>), level::INFO),
            (child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>), level::ERROR),
        ] {
            if let Some(s) = stream {
                let agent = agent.clone();
                let name = name.clone();
                readers.push(tokio::spawn(async move {
                    let mut r = BufReader::new(s);
                    let mut buf = Vec::new();
                    loop {
                        buf.clear();
                        match r.read_until(b'\n', &mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let line = String::from_utf8_lossy(&buf);
                                let line = line.trim_end_matches(['\n', '\r']);
                                agent.log(&name, lvl, line).await;
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
