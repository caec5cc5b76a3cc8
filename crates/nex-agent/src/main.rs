//! `nex-agent`: runs exactly one workload for a nex node.
//!
//! It reads its metadata, connects to the node's internal NATS server with its own nkey,
//! handshakes, then serves `agentint.<id>.{deploy,undeploy,ping,trigger}` and reports logs and
//! events on `hostint.<id>.*` (`docs/protocol.md`).

mod elf;
mod guest;
mod metadata;
mod providers;
mod triggers;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use nex_api::agent::{level, AgentDeployRequest, DeployResponse, HandshakeRequest, LogEntry, WorkloadStatusEvent};
use nex_api::subjects::internal;
use nex_api::trace::CallSpan;

use providers::{DeployError, Provider};

use nex_api::agent::{CACHE_BUCKET, CACHE_KEY};

/// The agent's connection and identity, shared by providers.
pub struct Agent {
    /// Workload id.
    pub id: String,
    /// Connection to the internal NATS server.
    pub nc: async_nats::Client,
    /// Directory for the artifact and temp files.
    pub work_dir: PathBuf,
    /// Runs inside a sandbox tier: native binaries must be static.
    pub sandboxed: bool,
}

impl Agent {
    /// Ships one log line to the node.
    pub async fn log(&self, source: &str, lvl: i32, text: &str) {
        let e = LogEntry { source: source.to_string(), level: lvl, text: text.to_string() };
        if let Ok(b) = serde_json::to_vec(&e) {
            let _ = self.nc.publish(internal::logs(&self.id), b.into()).await;
        }
    }

    /// Reports that the workload ended.
    pub async fn workload_undeployed(&self, name: &str, code: i32, message: &str) {
        let ev = WorkloadStatusEvent { workload_name: name.to_string(), code, message: Some(message.to_string()) };
        if let Ok(b) = serde_json::to_vec(&ev) {
            let _ = self
                .nc
                .publish(internal::events(&self.id, nex_api::events::event_type::WORKLOAD_UNDEPLOYED), b.into())
                .await;
            let _ = self.nc.flush().await;
        }
    }
}

/// Drops the agent's start-up code and freed heap from its resident set once it waits for work.
/// Start-up (runtime, TLS-capable NATS client, connect, handshake) touches megabytes of code that
/// an idle agent never runs again; the kernel also maps 16 neighbouring pages at every code page
/// fault. The pages stay in the shared page cache, so what is needed later comes back with a
/// minor fault; the agent's RSS while it waits in the pool is what it really uses.
fn trim_idle_memory() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return };
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else { continue };
        // Only code: never written, so dropping it loses nothing. (Read-only data may be
        // relocated copy-on-write pages, which must stay.)
        if perms != "r-xp" || f.nth(3).is_none_or(|path| !path.starts_with('/')) {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else { continue };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else { continue };
        // SAFETY: MADV_DONTNEED on a read-only, file-backed, private code mapping of our own
        // discards page-table entries that are refilled from the file on the next access.
        unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
    }
    // SAFETY: returns free heap memory to the kernel; no other effect.
    unsafe { libc::malloc_trim(0) };
}

fn main() -> ExitCode {
    if guest::is_init() {
        // The init of a micro-VM: when the agent ends, so does the guest.
        if let Err(e) = guest::boot() {
            eprintln!("nex-agent: guest set-up failed: {e:#}");
            guest::power_off();
        }
        let code = agent_main();
        eprintln!("nex-agent: agent ended ({code:?}); powering off");
        guest::power_off();
    }
    agent_main()
}

fn agent_main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nex-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nex-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    if std::env::var(nex_api::agent::env::SANDBOX).is_ok_and(|v| v == "true") {
        harden();
    }
    let md = metadata::obtain()?;
    let url = format!("nats://{}:{}", md.node_nats_host, md.node_nats_port);
    let nc = async_nats::ConnectOptions::with_nkey(md.node_nats_nkey.expose().to_string())
        .name(format!("nex-agent-{}", md.vmid))
        .connect(&url)
        .await
        .with_context(|| format!("connecting to the node's internal NATS at {url}"))?;
    let work_dir = std::env::var("NEX_AGENT_WORKDIR").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    let sandboxed = std::env::var(nex_api::agent::env::SANDBOX).is_ok_and(|v| v == "true");
    let agent = Arc::new(Agent { id: md.vmid.clone(), nc: nc.clone(), work_dir, sandboxed });

    let mut deploys = nc.subscribe(internal::deploy(&agent.id)).await?;
    let mut undeploys = nc.subscribe(internal::undeploy(&agent.id)).await?;
    let mut pings = nc.subscribe(internal::ping(&agent.id)).await?;
    let mut triggers = nc.subscribe(internal::trigger(&agent.id)).await?;
    nc.flush().await?;
    handshake(&agent, &md.message).await?;
    trim_idle_memory();

    let slot: Arc<Mutex<Slot>> = Arc::new(Mutex::new(Slot::default()));
    loop {
        tokio::select! {
            Some(m) = deploys.next() => {
                let resp = deploy(&agent, &slot, &m.payload).await;
                if let Some(r) = m.reply {
                    let body = serde_json::to_vec(&resp).unwrap_or_default();
                    let _ = nc.publish(r, body.into()).await;
                }
            }
            Some(m) = undeploys.next() => {
                let (p, t) = {
                    let mut s = slot.lock().await;
                    (s.provider.clone(), s.triggers.take())
                };
                // No new calls first, then the workload.
                if let Some(t) = t {
                    t.stop().await;
                }
                if let Some(p) = p {
                    p.undeploy().await;
                }
                if let Some(r) = m.reply {
                    let _ = nc.publish(r, Bytes::new()).await;
                }
                let _ = nc.flush().await;
            }
            Some(m) = pings.next() => {
                if let Some(r) = m.reply {
                    let _ = nc.publish(r, Bytes::from_static(b"OK")).await;
                }
            }
            Some(m) = triggers.next() => {
                let p = slot.lock().await.provider.clone();
                let nc = nc.clone();
                tokio::spawn(async move { trigger(nc, p, m).await });
            }
            else => break,
        }
    }
    Ok(())
}

/// In a sandbox the workload runs beside the agent: keep it from reading the agent's memory or
/// `/proc/1/environ` (not dumpable), and end the agent with whatever supervises it.
fn harden() {
    // SAFETY: prctl with constant arguments on our own process.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
}

async fn handshake(agent: &Agent, message: &str) -> Result<()> {
    let req = HandshakeRequest {
        id: agent.id.clone(),
        start_time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        message: message.to_string(),
    };
    let body: Bytes = serde_json::to_vec(&req)?.into();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = tokio::time::timeout(
            Duration::from_millis(500),
            agent.nc.request(internal::handshake(&agent.id), body.clone()),
        )
        .await;
        match r {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => return Err(anyhow!("handshake failed: {e}")),
            Err(_) if Instant::now() > deadline => return Err(anyhow!("handshake timed out")),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// What the agent runs: its workload and, for a function holding its own triggers, their
/// subscriptions.
#[derive(Default)]
struct Slot {
    provider: Option<Arc<Provider>>,
    triggers: Option<triggers::Triggers>,
}

async fn deploy(agent: &Arc<Agent>, slot: &Mutex<Slot>, body: &[u8]) -> DeployResponse {
    match start(agent, slot, body).await {
        Ok(()) => DeployResponse { accepted: true, message: Some("Workload deployed".into()) },
        Err(e) => {
            if !matches!(e, DeployError::Invalid(_) | DeployError::Occupied | DeployError::Fetch(_)) {
                agent.log("nex-agent", level::ERROR, &e.to_string()).await;
            }
            DeployResponse { accepted: false, message: Some(e.to_string()) }
        }
    }
}

async fn start(agent: &Arc<Agent>, slot: &Mutex<Slot>, body: &[u8]) -> Result<(), DeployError> {
    let req: AgentDeployRequest =
        serde_json::from_slice(body).map_err(|e| DeployError::Invalid(format!("invalid deploy request: {e}")))?;
    req.validate().map_err(DeployError::Invalid)?;
    let mut slot = slot.lock().await;
    if slot.provider.is_some() {
        return Err(DeployError::Occupied);
    }
    let path = fetch_artifact(agent, &req).await.map_err(|e| DeployError::Fetch(format!("{e:#}")))?;
    if agent.sandboxed && req.workload_type == nex_api::workload_type::NATIVE {
        elf::check_static(&path).map_err(DeployError::NotStatic)?;
    }
    let p = Arc::new(Provider::deploy(agent.clone(), &req, path).await?);
    if let Some(dt) = &req.direct_triggers {
        match triggers::Triggers::start(agent.clone(), p.clone(), &req.trigger_subjects, dt).await {
            Ok(t) => slot.triggers = Some(t),
            Err(e) => {
                p.undeploy().await;
                return Err(DeployError::Triggers(e));
            }
        }
    }
    slot.provider = Some(p);
    Ok(())
}

/// Copies the artifact from the account's cache bucket into the work directory.
async fn fetch_artifact(agent: &Agent, req: &AgentDeployRequest) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(p) = &req.local_path {
        // The node wrote it next to us (tiers sharing the host file system).
        let path = PathBuf::from(p);
        let len = std::fs::metadata(&path).with_context(|| format!("artifact {}", path.display()))?.len();
        if len != req.total_bytes {
            return Err(anyhow!("artifact is {len} bytes, expected {}", req.total_bytes));
        }
        // The node writes it executable; a sandboxed agent may not own it.
        if std::fs::metadata(&path)?.permissions().mode() & 0o111 == 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        return Ok(path);
    }
    let mut last = None;
    for _ in 0..5 {
        match fetch_from_cache(agent, req).await {
            Ok(p) => return Ok(p),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("artifact not fetched")))
}

async fn fetch_from_cache(agent: &Agent, req: &AgentDeployRequest) -> Result<PathBuf> {
    let path = agent.work_dir.join("workload");
    let js = async_nats::jetstream::new(agent.nc.clone());
    let store = js.get_object_store(CACHE_BUCKET).await.map_err(|e| anyhow!("binding {CACHE_BUCKET}: {e}"))?;
    let mut obj = store.get(CACHE_KEY).await.map_err(|e| anyhow!("reading {CACHE_BUCKET}/{CACHE_KEY}: {e}"))?;
    let mut f = tokio::fs::File::create(&path).await.with_context(|| format!("creating {}", path.display()))?;
    let n = tokio::io::copy(&mut obj, &mut f).await.context("writing the artifact")?;
    f.flush().await?;
    drop(f);
    if n != req.total_bytes {
        return Err(anyhow!("artifact is {n} bytes, expected {}", req.total_bytes));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

async fn trigger(nc: async_nats::Client, p: Option<Arc<Provider>>, m: async_nats::Message) {
    let Some(reply) = m.reply.clone() else { return };
    let subject = m
        .headers
        .as_ref()
        .and_then(|h| h.get(nex_api::agent::HEADER_TRIGGER_SUBJECT))
        .map(|v| v.to_string())
        .unwrap_or_default();
    // A traced call (the node sent its context): time it and name its span in the reply.
    let parent = m.headers.as_ref().and_then(|h| h.get(nex_api::trace::TRACEPARENT));
    let mut span =
        parent.and_then(|v| nex_api::trace::TraceParent::parse(v.as_str())).map(|p| CallSpan::begin(Some(p)));
    let result = match p {
        Some(p) => p.trigger(&subject, m.payload.clone(), span).await,
        None => Err(providers::CallError::NotAFunction("no workload deployed")),
    };
    let mut h = async_nats::HeaderMap::new();
    if let Some(s) = span.as_mut() {
        s.end();
        h.insert(nex_api::trace::HEADER_SPAN, s.to_header().as_str());
    }
    match result {
        Ok((out, ns)) => {
            h.insert(nex_api::agent::HEADER_RUNTIME_NS, ns.to_string().as_str());
            let _ = nc.publish_with_headers(reply, h, out.into()).await;
        }
        Err(e) => {
            h.insert(nex_api::agent::HEADER_ERROR, nex_io::header_value(&e.to_string()).as_str());
            let _ = nc.publish_with_headers(reply, h, Bytes::new()).await;
        }
    }
}
