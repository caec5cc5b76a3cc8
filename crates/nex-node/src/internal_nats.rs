//! The node's internal `nats-server`: a child process with a generated config holding one account
//! per workload, reloaded (SIGHUP) whenever accounts change (see `docs/architecture.md`).
//!
//! Each workload account has two nkey users: the agent's, limited to its own `hostint.<id>.>`
//! publications, `agentint.<id>.>` subscriptions and its `NEXCACHE` object store, and the node's,
//! used by the node's agent client for that workload. Accounts share nothing, so an agent cannot
//! see another workload's traffic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nkeys::KeyPair;
use tokio::process::{Child, Command};

pub use nex_api::agent::{CACHE_BUCKET, CACHE_KEY};

/// Credentials of one workload account.
#[derive(Clone)]
pub struct WorkloadCredentials {
    /// The agent's user key (its seed is handed to the agent).
    pub agent: std::sync::Arc<KeyPair>,
    /// The node's user key in the same account.
    pub node: std::sync::Arc<KeyPair>,
}

impl std::fmt::Debug for WorkloadCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCredentials")
            .field("agent", &self.agent.public_key())
            .field("node", &self.node.public_key())
            .finish()
    }
}

/// A running internal server.
#[derive(Debug)]
pub struct InternalNats {
    binary: PathBuf,
    child: Mutex<Option<Child>>,
    pid: AtomicU32,
    stopping: AtomicBool,
    port: u16,
    host: String,
    dir: PathBuf,
    config_path: PathBuf,
    host_user: KeyPair,
    accounts: Mutex<BTreeMap<String, (String, String)>>,
    reload_lock: tokio::sync::Mutex<()>,
    last_reload: Mutex<Option<std::time::Instant>>,
}

impl InternalNats {
    /// Starts `binary` listening on `listen_host:port` (0 = a free port), state under `dir`.
    pub async fn start(binary: &Path, listen_host: &str, port: u16, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = if port == 0 { free_port(listen_host)? } else { port };
        let me = InternalNats {
            binary: binary.to_path_buf(),
            child: Mutex::new(None),
            pid: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            port,
            host: listen_host.to_string(),
            dir: dir.to_path_buf(),
            config_path: dir.join("internal-nats.conf"),
            host_user: KeyPair::new_user(),
            accounts: Mutex::new(BTreeMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            last_reload: Mutex::new(None),
        };
        me.write_config()?;
        me.spawn()?;
        me.wait_ready(Duration::from_secs(10)).await?;
        Ok(me)
    }

    /// Starts the server process from the current config.
    fn spawn(&self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("internal-nats.log"))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-c").arg(&self.config_path).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).kill_on_drop(true);
        // Its own process group: a terminal's Ctrl-C reaches the node, which stops it last.
        cmd.process_group(0);
        nex_io::tie_to_parent(&mut cmd, libc::SIGKILL);
        let child = cmd.spawn().with_context(|| format!("starting internal nats-server {}", self.binary.display()))?;
        self.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }

    /// Restarts the server whenever it dies (on the same port, with the accounts of now), until
    /// [`InternalNats::shutdown`]: agents and the node's agent clients reconnect by themselves.
    pub fn supervise(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if me.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let exited = {
                    let mut c = me.child.lock().unwrap_or_else(|e| e.into_inner());
                    match c.as_mut().map(|c| c.try_wait()) {
                        Some(Ok(Some(status))) => Some(status.to_string()),
                        Some(Ok(None)) => None,
                        Some(Err(e)) => Some(e.to_string()),
                        None => Some("gone".into()),
                    }
                };
                let Some(how) = exited else {
                    backoff = Duration::from_millis(100);
                    continue;
                };
                if me.stopping.load(Ordering::SeqCst) {
                    return;
                }
                tracing::error!(exit = %how, "the internal NATS server died; restarting it on port {}", me.port);
                let _g = me.reload_lock.lock().await;
                let started = match me.write_config().and_then(|()| me.spawn()) {
                    Ok(()) => me.wait_ready(Duration::from_secs(10)).await,
                    Err(e) => Err(e),
                };
                match started {
                    Ok(()) => tracing::info!(port = me.port, "internal NATS server restarted"),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "restarting the internal NATS server failed; retrying in {}ms", backoff.as_millis());
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }

    async fn wait_ready(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await.is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.join("internal-nats.log")).unwrap_or_default();
                    bail!("internal nats-server exited with {status}: {}", log.trim());
                }
            }
            if Instant::now() > deadline {
                bail!("internal nats-server did not listen on {}:{} within {within:?}", self.host, self.port);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The port agents connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://host:port` as seen from the node.
    pub fn url(&self) -> String {
        format!("nats://{}:{}", connect_host(&self.host), self.port)
    }

    /// Adds accounts for `ids`, reloads once, and returns their credentials once usable.
    pub async fn add_workloads(&self, ids: &[String]) -> Result<Vec<WorkloadCredentials>> {
        let _g = self.reload_lock.lock().await;
        let mut creds = Vec::with_capacity(ids.len());
        {
            let mut acc = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
            for id in ids {
                let c = WorkloadCredentials {
                    agent: std::sync::Arc::new(KeyPair::new_user()),
                    node: std::sync::Arc::new(KeyPair::new_user()),
                };
                acc.insert(id.clone(), (c.agent.public_key(), c.node.public_key()));
                creds.push(c);
            }
        }
        self.write_config()?;
        self.reload()?;
        Ok(creds)
    }

    /// Removes a workload's account and reloads.
    pub async fn remove_workload(&self, id: &str) -> Result<()> {
        let _g = self.reload_lock.lock().await;
        if self.accounts.lock().unwrap_or_else(|e| e.into_inner()).remove(id).is_none() {
            return Ok(());
        }
        self.write_config()?;
        self.reload()
    }

    /// Connects as the node's user of workload account `id`, retrying while the reload lands.
    pub async fn connect_as(&self, creds: &KeyPair, name: &str, within: Duration) -> Result<async_nats::Client> {
        let deadline = Instant::now() + within;
        let seed = creds.seed()?;
        // Give the SIGHUP reload a moment, so the first login usually succeeds.
        tokio::time::sleep(Duration::from_millis(25)).await;
        loop {
            let opts = async_nats::ConnectOptions::with_nkey(seed.clone())
                .name(name)
                .connection_timeout(Duration::from_secs(2))
                .max_reconnects(None);
            // A rejected login ends the first attempt with an auth error: retry until the
            // reloaded config knows the user.
            match tokio::time::timeout(Duration::from_millis(500), opts.connect(self.url())).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) if Instant::now() > deadline => {
                    bail!("connecting to internal NATS: {e}")
                }
                _ if Instant::now() > deadline => bail!("connecting to internal NATS timed out"),
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Holds off reloads while the guard lives, after letting the last one settle: JetStream
    /// transfers into an account (the artifact cache) fail when a reload lands in the middle.
    pub async fn without_reloads(&self) -> tokio::sync::MutexGuard<'_, ()> {
        let g = self.reload_lock.lock().await;
        let last = *self.last_reload.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = last {
            let settle = Duration::from_millis(150);
            if t.elapsed() < settle {
                tokio::time::sleep(settle - t.elapsed()).await;
            }
        }
        g
    }

    fn reload(&self) -> Result<()> {
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
        let pid = self.pid.load(Ordering::SeqCst);
        if pid == 0 {
            return Ok(());
        }
        // SAFETY: sending a signal to our own child process id.
        let rc = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        if rc != 0 {
            bail!("reloading internal nats-server: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_config(&self) -> Result<()> {
        let acc = self.accounts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut s = String::new();
        s.push_str(&format!("listen: \"{}:{}\"\n", self.host, self.port));
        s.push_str("server_name: nex_internal\nmax_payload: 8MB\n");
        s.push_str(&format!(
            "jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 4GB\n  max_file_store: 1GB\n}}\n",
            self.dir.join("js").display()
        ));
        s.push_str("accounts {\n");
        s.push_str(&format!("  nexhost {{\n    users: [ {{ nkey: \"{}\" }} ]\n  }}\n", self.host_user.public_key()));
        for (id, (agent, node)) in &acc {
            s.push_str(&format!(
                r#"  {id} {{
    jetstream: enabled
    users: [
      {{ nkey: "{node}" }}
      {{ nkey: "{agent}", permissions: {{
          publish: {{ allow: ["hostint.{id}.>", "$JS.API.STREAM.INFO.OBJ_{b}", "$JS.API.STREAM.MSG.GET.OBJ_{b}", "$JS.API.DIRECT.GET.OBJ_{b}.>", "$JS.API.CONSUMER.CREATE.OBJ_{b}", "$JS.API.CONSUMER.CREATE.OBJ_{b}.>", "$JS.API.CONSUMER.DELETE.OBJ_{b}.>", "$JS.API.INFO", "$JS.FC.OBJ_{b}.>", "$JS.ACK.OBJ_{b}.>", "_INBOX.>"] }}
          subscribe: {{ allow: ["agentint.{id}.>", "_INBOX.>"] }}
      }} }}
    ]
  }}
"#,
                b = CACHE_BUCKET
            ));
        }
        s.push_str("}\n");
        let tmp = self.config_path.with_extension("conf.tmp");
        std::fs::write(&tmp, s)?;
        std::fs::rename(&tmp, &self.config_path)?;
        Ok(())
    }

    /// Stops the server and removes its state directory.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut child) = child {
            if let Some(pid) = child.id() {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(3), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The address to dial for a listen address (`0.0.0.0` → loopback).
pub fn connect_host(listen: &str) -> &str {
    if listen == "0.0.0.0" || listen.is_empty() {
        "127.0.0.1"
    } else {
        listen
    }
}

/// A TCP port free on `host` right now.
pub fn free_port(host: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((connect_host(host), 0))?;
    Ok(l.local_addr()?.port())
}

/// Finds a `nats-server` binary: `explicit`, `$NEX_NATS_SERVER`, next to this executable, `bin_path`,
/// then `$PATH`.
pub fn find_nats_server(explicit: &str, bin_path: &[String]) -> Option<PathBuf> {
    if !explicit.is_empty() {
        return Some(PathBuf::from(explicit));
    }
    if let Ok(p) = std::env::var("NEX_NATS_SERVER") {
        if is_executable(Path::new(&p)) {
            return Some(PathBuf::from(p));
        }
    }
    find_executable("nats-server", bin_path)
}

/// Finds executable `name` next to the running binary, in `bin_path`, then in `$PATH`.
pub fn find_executable(name: &str, bin_path: &[String]) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.parent() {
            dirs.push(d.to_path_buf());
        }
    }
    dirs.extend(bin_path.iter().map(PathBuf::from));
    if let Ok(path) = std::env::var("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}
