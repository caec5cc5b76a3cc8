//! The workload manager: the DEPLOY and STOP pipelines (checks and error texts in
//! `docs/protocol.md`), running workloads and their lifecycle events (one `workload_deployed` and
//! one `workload_undeployed` each), essential restarts with back-off, lame duck.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;

use nex_api::agent::{AgentDeployRequest, FunctionLimits, WorkloadStatusEvent};
use nex_api::control::{
    DeployRequest, MachineSummary, RunResponse, StopRequest, StopResponse, WorkloadPingMachineSummary, WorkloadSummary,
};
use nex_api::events::event_type;
use nex_api::jwt::WorkloadClaims;
use nex_api::workload_type;

use crate::agent_client::AgentMessage;
use crate::artifact::{HashingReader, Location};
use crate::config::NodeConfig;
use crate::events::EventPublisher;
use crate::nats_targets::NatsTargets;
use crate::pool::{Agent, AgentPool};
use crate::replay::ReplayGuard;
use crate::triggers::TriggerSet;

/// Identity of this node.
pub struct NodeIdentity {
    /// Server public key (`N…`).
    pub node_id: String,
    /// Curve key that opens environments.
    pub xkey: nkeys::XKey,
    /// Issuer used for autostart workloads.
    pub issuer: nkeys::KeyPair,
    /// Nexus name.
    pub nexus: String,
    /// When the node started.
    pub started: Instant,
    /// Tags reported everywhere (mutable: lame duck adds one).
    pub tags: RwLock<BTreeMap<String, String>>,
}

/// A deploy request that passed validation. Its `request` carries the effective host-services
/// and trigger connections (credentials from the sealed environment merged in); `Debug` shows
/// no environment values.
#[derive(Clone)]
struct Validated {
    namespace: String,
    request: DeployRequest,
    claims: WorkloadClaims,
    environment: BTreeMap<String, String>,
    workload_type: String,
    expected_hash: Option<String>,
    retry_count: u32,
    chain: Option<u64>,
}

impl std::fmt::Debug for Validated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validated")
            .field("namespace", &self.namespace)
            .field("name", &self.claims.sub)
            .field("workload_type", &self.workload_type)
            .field("environment", &nex_api::env::redacted(&self.environment))
            .field("retry_count", &self.retry_count)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Life {
    deployed_emitted: bool,
    ended: bool,
    stop_requested: bool,
}

/// A workload with its agent.
pub struct Workload {
    /// Workload id (= agent id).
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// Name (JWT `sub`).
    pub name: String,
    /// Canonical type.
    pub workload_type: String,
    /// Free text.
    pub description: Option<String>,
    /// SHA-256 of the artifact.
    pub hash: String,
    /// Artifact size.
    pub total_bytes: u64,
    /// Issuer public key.
    pub issuer: String,
    /// Tenant id (namespace, name, issuer): names its host-service buckets and queue group.
    pub tenant: String,
    claims: WorkloadClaims,
    validated: Validated,
    agent: Agent,
    started: Instant,
    essential: AtomicBool,
    life: tokio::sync::Mutex<Life>,
    ended: tokio::sync::Notify,
    torn_down: AtomicBool,
    /// Cumulative function run time.
    pub runtime_ns: AtomicU64,
    triggers: Mutex<Option<TriggerSet>>,
    /// Connection for host services when the request or config names one.
    hs_conn: Option<async_nats::Client>,
}

impl Workload {
    /// The control-plane request this workload was deployed from.
    pub fn trigger_request(&self) -> &DeployRequest {
        &self.validated.request
    }

    /// The agent running it.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }
}

#[derive(Debug)]
struct Chain {
    attempts: u32,
    /// The latest instance; a STOP naming it ends a restart still waiting in its back-off.
    current_id: String,
    issuer: String,
    name: String,
    namespace: String,
}

/// Runs workloads on this node.
pub struct WorkloadManager {
    ident: Arc<NodeIdentity>,
    cfg: Arc<NodeConfig>,
    control: async_nats::Client,
    control_url: String,
    /// The user's NATS URL a function's agent may dial itself for its triggers (set when the
    /// control connection is anonymous).
    agent_triggers_url: Option<String>,
    pool: Arc<AgentPool>,
    events: EventPublisher,
    workloads: Mutex<HashMap<String, Arc<Workload>>>,
    replay: Arc<ReplayGuard>,
    targets: NatsTargets,
    lameduck: AtomicBool,
    shutting_down: AtomicBool,
    chains: Mutex<HashMap<u64, Chain>>,
    next_chain: AtomicU64,
    reserved_bytes: AtomicU64,
}

/// A DEPLOY failure, with the text the requester sees.
pub type DeployError = String;

impl WorkloadManager {
    /// A manager deploying into agents from `pool`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ident: Arc<NodeIdentity>,
        cfg: Arc<NodeConfig>,
        control: async_nats::Client,
        control_url: String,
        agent_triggers_url: Option<String>,
        pool: Arc<AgentPool>,
        events: EventPublisher,
        replay: Arc<ReplayGuard>,
    ) -> Arc<WorkloadManager> {
        let targets = NatsTargets::new(&cfg, &control_url, Some(control.clone()));
        Arc::new(WorkloadManager {
            ident,
            cfg,
            control,
            control_url,
            agent_triggers_url,
            pool,
            events,
            workloads: Mutex::new(HashMap::new()),
            replay,
            targets,
            lameduck: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            chains: Mutex::new(HashMap::new()),
            next_chain: AtomicU64::new(1),
            reserved_bytes: AtomicU64::new(0),
        })
    }

    /// The node's identity.
    pub fn identity(&self) -> &Arc<NodeIdentity> {
        &self.ident
    }

    /// The node's configuration.
    pub fn config(&self) -> &Arc<NodeConfig> {
        &self.cfg
    }

    /// The agent pool.
    pub fn pool(&self) -> &Arc<AgentPool> {
        &self.pool
    }

    /// The event publisher.
    pub fn events(&self) -> &EventPublisher {
        &self.events
    }

    /// The record of accepted token ids.
    pub fn replay(&self) -> &ReplayGuard {
        &self.replay
    }

    /// Which NATS servers workloads may reach.
    pub fn nats_targets(&self) -> &NatsTargets {
        &self.targets
    }

    /// True once LAMEDUCK was received.
    pub fn in_lameduck(&self) -> bool {
        self.lameduck.load(Ordering::SeqCst)
    }

    /// Handles messages agents send (logs, exits) until the channel closes.
    pub async fn run_agent_messages(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<(String, AgentMessage)>) {
        while let Some((id, msg)) = rx.recv().await {
            let Some(w) = self.get(&id) else {
                continue; // warm agents have nothing to say yet
            };
            match msg {
                AgentMessage::Log(entry) => {
                    self.events
                        .log(&w.namespace, &w.name, &w.id, nex_api::agent::level::as_str(entry.level), &entry.text)
                        .await;
                }
                AgentMessage::Event(t, data) if t == event_type::WORKLOAD_UNDEPLOYED => {
                    let st: WorkloadStatusEvent = serde_json::from_value(data).unwrap_or_default();
                    let me = self.clone();
                    tokio::spawn(async move { me.on_exit(w, st.code, st.message).await });
                }
                AgentMessage::Event(t, data) if t == event_type::WORKLOAD_DEPLOYED => {
                    let _ = data; // the node emits workload_deployed itself, once
                }
                AgentMessage::HostService(msg) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let conn = w.hs_conn.clone().unwrap_or_else(|| me.control.clone());
                        crate::host_services::handle(&me.cfg, &conn, w.agent.client.connection(), &w, msg).await;
                    });
                }
                AgentMessage::Execs(execs) => {
                    for exec in execs {
                        let outcome = match exec.error {
                            Some(e) => Err(e),
                            None => Ok(exec.elapsed_nanos),
                        };
                        crate::triggers::report(&self.events, &w, &exec.trigger_subject, outcome).await;
                    }
                }
                AgentMessage::Event(t, data) => {
                    self.events.workload_event(&w.namespace, &w.id, &t, &data).await;
                }
            }
        }
    }

    /// Looks up a running workload.
    pub fn get(&self, id: &str) -> Option<Arc<Workload>> {
        self.workloads.lock().unwrap().get(id).cloned()
    }

    /// Every running workload.
    pub fn all(&self) -> Vec<Arc<Workload>> {
        let mut v: Vec<_> = self.workloads.lock().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Number of running workloads.
    pub fn count(&self) -> usize {
        self.workloads.lock().unwrap().len()
    }

    /// INFO machines in namespace `ns`.
    pub fn machines(&self, ns: &str) -> Vec<MachineSummary> {
        self.all()
            .into_iter()
            .filter(|w| w.namespace.eq_ignore_ascii_case(ns))
            .map(|w| {
                let up = w.started.elapsed();
                let runtime = if workload_type::is_function(&w.workload_type) {
                    nex_api::uptime::format_runtime(Duration::from_nanos(w.runtime_ns.load(Ordering::Relaxed)))
                } else {
                    nex_api::uptime::format(up)
                };
                MachineSummary {
                    id: w.id.clone(),
                    healthy: !w.agent.is_dead(),
                    uptime: nex_api::uptime::format(up),
                    namespace: w.namespace.clone(),
                    workload: WorkloadSummary {
                        name: w.name.clone(),
                        description: w.description.clone(),
                        runtime,
                        workload_type: w.workload_type.clone(),
                        hash: w.hash.clone(),
                    },
                }
            })
            .collect()
    }

    /// WPING matches: namespace filter (case-insensitive) and id (exact) or name (case-insensitive).
    pub fn wping(&self, ns: Option<&str>, id_or_name: Option<&str>) -> Vec<WorkloadPingMachineSummary> {
        self.all()
            .into_iter()
            .filter(|w| ns.map(|n| w.namespace.eq_ignore_ascii_case(n)).unwrap_or(true))
            .filter(|w| id_or_name.map(|x| w.id == x || w.name.eq_ignore_ascii_case(x)).unwrap_or(true))
            .map(|w| WorkloadPingMachineSummary {
                id: w.id.clone(),
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                workload_type: w.workload_type.clone(),
            })
            .collect()
    }

    // ---------------------------------------------------------------- DEPLOY

    /// The whole DEPLOY pipeline for a request received on `$NEX.DEPLOY.{ns}.{node}`.
    pub async fn deploy(self: &Arc<Self>, ns: Option<&str>, body: &[u8]) -> Result<RunResponse, DeployError> {
        let v = self.validate(ns, body)?;
        let jti = v.claims.jti.clone();
        let res = self.launch(v).await;
        if res.is_err() {
            self.replay.forget(&jti);
        }
        res
    }

    /// Steps 1–10 of the DEPLOY checks; the numbered comments follow `docs/protocol.md`.
    fn validate(&self, ns: Option<&str>, body: &[u8]) -> Result<Validated, DeployError> {
        // 1
        let ns = match ns {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => return Err("Invalid subject for workload deployment".into()),
        };
        if let Some(why) = nex_api::subjects::namespace_problem(&ns) {
            return Err(format!("Invalid subject for workload deployment: {why}"));
        }
        // 2
        if self.in_lameduck() {
            return Err("Node is in lame duck mode. Workload deploy request denied".into());
        }
        // 3
        let max = self.cfg.node_limits.max_workloads;
        if max > 0 && self.count() as u64 >= max {
            return Err("Node is at maximum workload limit. Deploy request denied".into());
        }
        // 4
        let mut req: DeployRequest =
            serde_json::from_slice(body).map_err(|e| format!("Unable to deserialize deploy request: {e}"))?;
        // The request must name this node: one captured on its way to another node is refused.
        if req.target_node != self.ident.node_id {
            return Err(if req.target_node.is_empty() {
                "Invalid deploy request: the request names no target_node (it must be this node's id)".to_string()
            } else {
                format!("Invalid deploy request: the request is for node {}, not this node", req.target_node)
            });
        }
        // 5
        let wt = workload_type::canonical(&req.workload_type);
        if !self.cfg.workload_types.contains(&wt) {
            return Err(format!("Unsupported workload type on this node: {}", req.workload_type));
        }
        // 6
        if !req.trigger_subjects.is_empty() && !workload_type::is_function(&wt) {
            return Err(format!("Unsupported workload type for trigger subject registration: {}", req.workload_type));
        }
        // 7
        for s in &req.trigger_subjects {
            if !nex_api::subjects::is_valid_subscribe_subject(s) {
                return Err(format!("The trigger subject {s} overlaps with subject(s) in this node's deny list: it is not a valid subject"));
            }
            if let Some(d) = self.cfg.denied_trigger(s) {
                return Err(format!("The trigger subject {s} overlaps with subject(s) in this node's deny list: {d}"));
            }
        }
        if workload_type::is_function(&wt) && req.trigger_subjects.is_empty() {
            return Err(format!(
                "Failed to deploy workload: at least one trigger subject is required for this workload type ({wt})"
            ));
        }
        if req.essential && wt != workload_type::NATIVE {
            return Err(format!("Failed to deploy workload: essential flag is not supported for workload type {wt}"));
        }
        // 8
        let mut environment = nex_api::env::open(&req.environment, &self.ident.xkey, &req.sender_public_key)
            .map_err(|e| format!("Failed to decrypt environment for deploy request: {e}"))?;
        merge_sealed_credentials(&mut req, &mut environment, &self.control_url);
        // 9
        let claims = WorkloadClaims::decode(&req.workload_jwt)
            .map_err(|e| format!("Invalid deploy request: could not decode workload JWT: {e}"))?;
        if !nex_api::jwt::is_valid_workload_name(&claims.sub) {
            return Err(format!(
                "Invalid deploy request: workload name claim ('{}') does not match requirements (^[a-zA-Z0-9_-]+$)",
                claims.sub
            ));
        }
        if let Err(why) = crate::trust::check_fresh(&self.cfg, &claims) {
            return Err(format!("Invalid deploy request: standard claims within JWT are not valid: {why}"));
        }
        if let Err(why) = crate::trust::check_binding(&claims, &ns, &self.ident.node_id, None) {
            return Err(format!("Invalid deploy request: {why}"));
        }
        // 10
        if !self.cfg.valid_issuers.is_empty() && !self.cfg.valid_issuers.contains(&claims.iss) {
            return Err(format!("invalid workload issuer: {}", claims.iss));
        }
        // The JWT must pin the artifact's hash.
        let expected_hash = match claims.nats.hash.as_deref().map(str::trim) {
            Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
            _ => {
                return Err(
                    "Invalid deploy request: workload JWT carries no artifact hash claim (nats.hash must be the SHA-256 of the artifact)"
                        .into(),
                )
            }
        };
        // Each token is accepted once, also across restarts.
        self.replay
            .accept(&claims.jti, claims.replay_window_end(self.cfg.deploy_max_age))
            .map_err(|e| format!("Invalid deploy request: {e}"))?;
        let chain = if req.essential { Some(self.next_chain.fetch_add(1, Ordering::SeqCst)) } else { None };
        Ok(Validated {
            namespace: ns,
            workload_type: wt,
            environment,
            claims,
            expected_hash: Some(expected_hash),
            retry_count: req.retry_count.unwrap_or(0),
            request: req,
            chain,
        })
    }

    /// Downloads the artifact into a warm agent and deploys; steps 11–16 of the DEPLOY checks in
    /// `docs/protocol.md`.
    async fn launch(self: &Arc<Self>, v: Validated) -> Result<RunResponse, DeployError> {
        let loc = Location::parse(&v.request.location).map_err(|e| format!("Failed to cache workload bytes: {e}"))?;
        let js = match v.request.jsdomain.as_deref().filter(|d| !d.is_empty()) {
            Some(d) => async_nats::jetstream::with_domain(self.control.clone(), d),
            None => async_nats::jetstream::new(self.control.clone()),
        };
        let store = js
            .get_object_store(&loc.bucket)
            .await
            .map_err(|e| format!("Failed to cache workload bytes: object store {}: {e}", loc.bucket))?;
        let info = store
            .info(&loc.key)
            .await
            .map_err(|e| format!("Failed to cache workload bytes: object {} in {}: {e}", loc.key, loc.bucket))?;
        let size = info.size as u64;
        // 13, 14 — before a byte is downloaded.
        let lim = &self.cfg.node_limits;
        if lim.max_workload_bytes > 0 && size > lim.max_workload_bytes {
            return Err("Workload file size would exceed node limitations".into());
        }
        let reserved = self.reserved_bytes.fetch_add(size, Ordering::SeqCst) + size;
        let unreserve = |me: &Self| {
            me.reserved_bytes.fetch_sub(size, Ordering::SeqCst);
        };
        if lim.max_total_bytes > 0 && reserved > lim.max_total_bytes {
            unreserve(self);
            return Err("Workload file size would exceed node total limitations".into());
        }
        // 11
        let wait = self.pool.start_timeout() * 2;
        let agent = match self.pool.take(wait).await {
            Ok(a) => a,
            Err(e) => {
                unreserve(self);
                let hint =
                    self.pool.last_error().map(|h| format!(" (last agent start failure: {h})")).unwrap_or_default();
                return Err(format!("Failed to get agent client from pool: {e}{hint}"));
            }
        };
        // 12: the download, checked against the JWT's hash
        let fail = |me: &Arc<Self>, agent: Agent, msg: String| {
            let me = me.clone();
            async move {
                me.reserved_bytes.fetch_sub(size, Ordering::SeqCst);
                me.pool.release(agent).await;
                Err::<RunResponse, DeployError>(msg)
            }
        };
        let mut environment = v.environment.clone();
        for (k, url) in environment.iter_mut().filter(|(k, _)| k.eq_ignore_ascii_case("NATS_URL")) {
            match self.sandbox_nats_url(&agent.id, url).await {
                Ok(u) => *url = u,
                Err(e) => return fail(self, agent, format!("Failed to deploy workload: {k}: {e}")).await,
            }
        }
        let object = match store.get(&loc.key).await {
            Ok(o) => o,
            Err(e) => return fail(self, agent, format!("Failed to cache workload bytes: {e}")).await,
        };
        let mut reader = HashingReader::new(object, size);
        let local_path = if self.pool.tier().shares_host_filesystem() {
            let path = agent.work_dir.join("workload");
            if let Err(e) = write_file(&path, &mut reader).await {
                return fail(self, agent, format!("Failed to cache workload bytes: {e:#}")).await;
            }
            if let Err(e) = self.pool.tier().own_artifact(&path) {
                return fail(self, agent, format!("Failed to cache workload bytes: {e:#}")).await;
            }
            Some(self.pool.tier().agent_work_dir(&agent.work_dir).join("workload").display().to_string())
        } else {
            let quiet = self.pool.internal_nats().without_reloads().await;
            let put = agent.client.put_artifact(&mut reader).await;
            drop(quiet);
            if let Err(e) = put {
                return fail(self, agent, format!("Failed to cache workload bytes: {e:#}")).await;
            }
            None
        };
        let (hash, total_bytes) = reader.finish();
        if let Some(expected) = &v.expected_hash {
            if *expected != hash {
                return fail(
                    self,
                    agent,
                    // Neither digest is echoed: the requester may not be able to read the bucket.
                    "Failed to cache workload bytes: artifact hash mismatch: the artifact's SHA-256 differs from the workload JWT's nats.hash claim".to_string(),
                )
                .await;
            }
        }
        if total_bytes == 0 {
            return fail(self, agent, "Failed to cache workload bytes: the artifact is empty".into()).await;
        }
        if v.workload_type == workload_type::V8 && total_bytes > self.cfg.max_js_source_bytes {
            return fail(
                self,
                agent,
                format!(
                    "Failed to deploy workload: source file ({total_bytes} bytes) exceeds maximum of {} bytes",
                    self.cfg.max_js_source_bytes
                ),
            )
            .await;
        }
        let hs_conn = match self.host_services_connection(&v).await {
            Ok(c) => c,
            Err(e) => {
                return fail(self, agent, format!("Failed to deploy workload: host services connection: {e:#}")).await
            }
        };
        // 15
        let w = Arc::new(Workload {
            id: agent.id.clone(),
            namespace: v.namespace.clone(),
            name: v.claims.sub.clone(),
            workload_type: v.workload_type.clone(),
            description: v.request.description.clone(),
            hash: hash.clone(),
            total_bytes,
            issuer: v.claims.iss.clone(),
            tenant: nex_api::id::tenant_id(&v.namespace, &v.claims.sub, &v.claims.iss),
            claims: v.claims.clone(),
            validated: v.clone(),
            agent: agent.clone(),
            started: Instant::now(),
            essential: AtomicBool::new(v.request.essential && !self.in_lameduck()),
            life: tokio::sync::Mutex::new(Life::default()),
            ended: tokio::sync::Notify::new(),
            torn_down: AtomicBool::new(false),
            runtime_ns: AtomicU64::new(0),
            triggers: Mutex::new(None),
            hs_conn,
        });
        let mut life = w.life.lock().await;
        self.workloads.lock().unwrap().insert(w.id.clone(), w.clone());
        if let Some(c) = v.chain {
            self.chains.lock().unwrap().entry(c).and_modify(|ch| ch.current_id = w.id.clone()).or_insert(Chain {
                attempts: 0,
                current_id: w.id.clone(),
                issuer: w.issuer.clone(),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
            });
        }
        let direct_triggers = self.direct_triggers(&v, &agent.id).await;
        let areq = AgentDeployRequest {
            argv: v.request.argv.clone(),
            description: v.request.description.clone(),
            environment,
            essential: v.request.essential,
            hash: hash.clone(),
            namespace: v.namespace.clone(),
            retried_at: v.request.retried_at.clone(),
            retry_count: v.request.retry_count,
            total_bytes,
            trigger_subjects: v.request.trigger_subjects.clone(),
            trigger_connection: v.request.trigger_connection.clone(),
            workload_name: v.claims.sub.clone(),
            workload_type: v.workload_type.clone(),
            // Host services are answered by the node: their credentials stay here.
            host_services: None,
            function_limits: Some(FunctionLimits {
                timeout_ms: self.cfg.function_timeout_ms,
                memory_mib: self.cfg.function_memory_mib,
            }),
            local_path,
            direct_triggers,
        };
        let outcome = agent.client.deploy(&areq, Duration::from_secs(30)).await;
        let accepted = match outcome {
            Ok(r) if r.accepted => Ok(()),
            Ok(r) => {
                Err(format!("Failed to deploy workload: workload rejected by agent: {}", r.message.unwrap_or_default()))
            }
            Err(e) => Err(format!("Failed to deploy workload: {e:#}")),
        };
        let accepted = match accepted {
            Ok(()) if workload_type::is_function(&w.workload_type) && areq.direct_triggers.is_none() => {
                match crate::triggers::subscribe(self.clone(), w.clone()).await {
                    Ok(set) => {
                        *w.triggers.lock().unwrap() = Some(set);
                        Ok(())
                    }
                    Err(e) => Err(format!("Failed to deploy workload: {e:#}")),
                }
            }
            other => other,
        };
        if let Err(msg) = accepted {
            life.ended = true;
            drop(life);
            if let Some(c) = v.chain {
                self.chains.lock().unwrap().remove(&c);
            }
            self.teardown(&w).await;
            return Err(msg);
        }
        life.deployed_emitted = true;
        self.events
            .workload_event(
                &w.namespace,
                &w.id,
                event_type::WORKLOAD_DEPLOYED,
                &json!({"workload_name": w.name, "workload_id": w.id, "code": 0, "essential": v.request.essential}),
            )
            .await;
        drop(life);
        self.spawn_monitor(w.clone());
        tracing::info!(workload = %w.name, id = %w.id, namespace = %w.namespace, "workload deployed");
        Ok(RunResponse { started: true, id: w.id.clone(), issuer: w.issuer.clone(), name: w.name.clone() })
    }

    /// Watches a deployed workload's agent: its exit and its liveness pings.
    fn spawn_monitor(self: &Arc<Self>, w: Arc<Workload>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut exited = w.agent.handle.exited();
            let ping_timeout = Duration::from_millis(me.cfg.agent_ping_timeout_ms);
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = crate::tiers::wait_exit(&mut exited) => {
                        // Give the agent's own workload_undeployed (with the real exit code) a moment.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let exit = exited.borrow().clone();
                        me.on_exit(w.clone(), -1, Some(format!("agent exited unexpectedly ({exit:?})"))).await;
                        return;
                    }
                    _ = tick.tick() => {
                        if w.torn_down.load(Ordering::SeqCst) {
                            return;
                        }
                        if !w.agent.client.ping(ping_timeout).await && !w.torn_down.load(Ordering::SeqCst) {
                            me.on_exit(w.clone(), -1, Some("contact with the agent was lost".into())).await;
                            return;
                        }
                    }
                    _ = w.ended.notified() => return,
                }
            }
        });
    }

    /// A workload ended (its process exited, its agent died, or it was stopped).
    async fn on_exit(self: &Arc<Self>, w: Arc<Workload>, code: i32, message: Option<String>) {
        let mut life = w.life.lock().await;
        if life.ended {
            return;
        }
        life.ended = true;
        let stop_requested = life.stop_requested;
        let mut message =
            message.unwrap_or_else(|| format!("Exited workload: {}; vm: {}; status: {code}", w.name, w.id));
        if w.agent.handle.oom_killed() {
            message.push_str(&format!(
                "; killed for exceeding its memory limit of {} MiB",
                self.cfg.machine_template.memsize_mib
            ));
        }
        let reason = if stop_requested { "Workload shutdown requested" } else { "Workload exited" };
        self.events
            .workload_event(
                &w.namespace,
                &w.id,
                event_type::WORKLOAD_UNDEPLOYED,
                &json!({"workload_name": w.name, "workload_id": w.id, "code": code, "message": message, "reason": reason}),
            )
            .await;
        drop(life);
        w.ended.notify_waiters();
        self.teardown(&w).await;
        let essential = w.essential.load(Ordering::SeqCst);
        if essential
            && code != 0
            && !stop_requested
            && !self.in_lameduck()
            && !self.shutting_down.load(Ordering::SeqCst)
        {
            self.schedule_restart(w);
        } else if let Some(c) = w.validated.chain {
            self.chains.lock().unwrap().remove(&c);
        }
    }

    /// Restarts an essential workload after a back-off: 1 s doubling to 30 s, reset after 60 s up.
    fn schedule_restart(self: &Arc<Self>, w: Arc<Workload>) {
        let Some(chain) = w.validated.chain else {
            return;
        };
        let delay = {
            let mut chains = self.chains.lock().unwrap();
            let Some(ch) = chains.get_mut(&chain) else {
                return;
            };
            if w.started.elapsed() >= Duration::from_secs(60) {
                ch.attempts = 0;
            }
            let d = Duration::from_secs(1u64 << ch.attempts.min(5)).min(Duration::from_secs(30));
            ch.attempts += 1;
            d
        };
        tracing::warn!(workload = %w.name, id = %w.id, "essential workload exited; restarting in {}s", delay.as_secs());
        let me = self.clone();
        tokio::spawn(async move {
            let mut delay = delay;
            loop {
                tokio::time::sleep(delay).await;
                if me.in_lameduck()
                    || me.shutting_down.load(Ordering::SeqCst)
                    || !me.chains.lock().unwrap().contains_key(&chain)
                {
                    me.chains.lock().unwrap().remove(&chain);
                    return;
                }
                let mut v = w.validated.clone();
                v.retry_count += 1;
                v.request.retry_count = Some(v.retry_count);
                v.request.retried_at = Some(chrono::Utc::now().to_rfc3339());
                match me.launch(v).await {
                    Ok(r) => {
                        tracing::info!(workload = %r.name, id = %r.id, "essential workload restarted");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(workload = %w.name, error = %e, "essential restart failed; retrying");
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
    }

    /// Removes a workload's triggers and agent; idempotent.
    async fn teardown(&self, w: &Arc<Workload>) {
        if w.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        self.workloads.lock().unwrap().remove(&w.id);
        let triggers = w.triggers.lock().unwrap().take();
        if let Some(t) = triggers {
            t.stop().await;
        }
        self.pool.release(w.agent.clone()).await;
        self.reserved_bytes.fetch_sub(w.total_bytes, Ordering::SeqCst);
        self.events.log(&w.namespace, &w.name, &w.id, "DEBUG", "Workload stopped").await;
    }

    // ---------------------------------------------------------------- STOP

    /// The STOP pipeline for a request received on `$NEX.STOP.{ns}.{node}`.
    ///
    /// A workload in another namespace is "No such workload" before anything else is checked, so
    /// the answer tells a stranger nothing about it.
    pub async fn stop(self: &Arc<Self>, ns: Option<&str>, body: &[u8]) -> Result<StopResponse, String> {
        let ns = match ns {
            Some(n) if !n.is_empty() => n,
            _ => return Err("Invalid subject for workload stop".into()),
        };
        let req: StopRequest =
            serde_json::from_slice(body).map_err(|e| format!("Unable to deserialize stop request: {e}"))?;
        let claims = WorkloadClaims::decode(&req.workload_jwt)
            .map_err(|e| format!("Invalid stop request: could not decode workload JWT: {e}"));
        let Some(w) = self.get(&req.workload_id).filter(|w| w.namespace.eq_ignore_ascii_case(ns)) else {
            return self.stop_pending_restart(ns, &req.workload_id, claims?);
        };
        let claims = claims?;
        if claims.jti == w.claims.jti {
            return Err("Invalid stop request: stop claims appear to be cloned or captured from the original start claims. Rejecting for security reasons".into());
        }
        self.check_stop_claims(&claims, ns, &w.id, &w.claims.sub, &w.claims.iss)?;
        self.stop_workload(&w).await;
        Ok(StopResponse { stopped: true, id: w.id.clone(), issuer: w.issuer.clone(), name: w.name.clone() })
    }

    /// The rules of a STOP token: same subject and issuer as the deploy, fresh, bound to this
    /// node, namespace and workload when it says so, and never used before.
    fn check_stop_claims(
        &self,
        claims: &WorkloadClaims,
        ns: &str,
        id: &str,
        sub: &str,
        iss: &str,
    ) -> Result<(), String> {
        if claims.sub != sub {
            return Err("Invalid stop request: stop claims subject does not match original start claims subject".into());
        }
        if claims.iss != iss {
            return Err("Invalid stop request: the only entity allowed to terminate a workload is the issuer that originally started it".into());
        }
        if let Err(why) = crate::trust::check_fresh(&self.cfg, claims) {
            return Err(format!("Invalid stop request: standard claims within JWT are not valid: {why}"));
        }
        if let Err(why) = crate::trust::check_binding(claims, ns, &self.ident.node_id, Some(id)) {
            return Err(format!("Invalid stop request: {why}"));
        }
        self.replay
            .accept(&claims.jti, claims.replay_window_end(self.cfg.deploy_max_age))
            .map_err(|e| format!("Invalid stop request: {e}"))
    }

    /// A STOP for an essential workload that exited and waits to be restarted: ends the chain.
    fn stop_pending_restart(&self, ns: &str, id: &str, claims: WorkloadClaims) -> Result<StopResponse, String> {
        let mut chains = self.chains.lock().unwrap();
        let Some((&key, ch)) = chains.iter().find(|(_, c)| c.current_id == id && c.namespace.eq_ignore_ascii_case(ns))
        else {
            return Err("No such workload".into());
        };
        self.check_stop_claims(&claims, ns, id, &ch.name, &ch.issuer)?;
        let resp = StopResponse { stopped: true, id: id.to_string(), issuer: ch.issuer.clone(), name: ch.name.clone() };
        chains.remove(&key);
        tracing::info!(id, "stop ended a pending essential restart");
        Ok(resp)
    }

    /// Stops a workload gracefully (SIGTERM, grace period, SIGKILL of the whole tree).
    pub async fn stop_workload(self: &Arc<Self>, w: &Arc<Workload>) {
        {
            let mut life = w.life.lock().await;
            if life.ended {
                return;
            }
            life.stop_requested = true;
        }
        w.essential.store(false, Ordering::SeqCst);
        if let Some(c) = w.validated.chain {
            self.chains.lock().unwrap().remove(&c);
        }
        // Stop triggers first so no new call starts.
        let triggers = w.triggers.lock().unwrap().take();
        if let Some(t) = triggers {
            t.stop().await;
        }
        let grace = Duration::from_millis(self.cfg.workload_stop_grace_ms);
        let ended = w.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if let Err(e) = w.agent.client.undeploy(grace + Duration::from_secs(2)).await {
            tracing::warn!(id = %w.id, error = %e, "agent did not confirm undeploy; killing it");
        }
        // The agent reports the workload's exit; wait briefly for it, then end it ourselves.
        if tokio::time::timeout(Duration::from_millis(500), ended).await.is_err() {
            self.on_exit(w.clone(), 0, Some("Workload shutdown requested".into())).await;
        }
        self.teardown(w).await;
    }

    // ---------------------------------------------------------------- node-level

    /// Enters lame duck mode; returns false when already in it.
    pub async fn enter_lameduck(&self) -> bool {
        if self.lameduck.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.ident.tags.write().unwrap().insert(nex_api::control::tags::LAMEDUCK.into(), "true".into());
        for w in self.all() {
            w.essential.store(false, Ordering::SeqCst);
        }
        self.chains.lock().unwrap().clear();
        self.events
            .node_event(
                event_type::NODE_ENTERED_LAMEDUCK,
                &json!({"version": nex_api::VERSION, "id": self.ident.node_id}),
            )
            .await;
        true
    }

    /// Stops every workload (node shutdown).
    pub async fn stop_all(self: &Arc<Self>) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.chains.lock().unwrap().clear();
        let all = self.all();
        futures::future::join_all(all.iter().map(|w| self.stop_workload(w))).await;
    }

    /// Deploys the config's autostart workloads, signed by the node's own issuer.
    pub async fn autostart(self: &Arc<Self>) {
        let list = self.cfg.autostart.workloads.clone();
        for a in list {
            let ns = if a.namespace.is_empty() { nex_api::DEFAULT_NAMESPACE.to_string() } else { a.namespace.clone() };
            let claims = match WorkloadClaims::new(&a.name, None).encode(&self.ident.issuer) {
                Ok(t) => WorkloadClaims::decode(&t).ok(),
                Err(_) => None,
            };
            let Some(claims) = claims else { continue };
            let wt = workload_type::canonical(&a.workload_type);
            let req = DeployRequest {
                argv: a.argv.clone(),
                description: a.description.clone(),
                workload_type: wt.clone(),
                location: a.location.clone(),
                essential: a.essential && wt == workload_type::NATIVE,
                jsdomain: a.jsdomain.clone(),
                target_node: self.ident.node_id.clone(),
                trigger_subjects: a.trigger_subjects.clone(),
                ..Default::default()
            };
            let chain = if req.essential { Some(self.next_chain.fetch_add(1, Ordering::SeqCst)) } else { None };
            let v = Validated {
                namespace: ns,
                request: req,
                claims,
                environment: a.environment.clone(),
                workload_type: wt,
                expected_hash: None,
                retry_count: 0,
                chain,
            };
            match self.launch(v).await {
                Ok(r) => {
                    tracing::info!(workload = %r.name, id = %r.id, "autostart workload deployed")
                }
                Err(e) => {
                    tracing::error!(workload = %a.name, error = %e, "autostart workload failed")
                }
            }
        }
    }

    /// The connection host services use for a function, when it is not the control connection:
    /// the operator's host-services connection whenever one is configured (URL or credentials),
    /// else the request's own (`host_services`, credentials possibly sealed), to an allowed server.
    async fn host_services_connection(&self, v: &Validated) -> anyhow::Result<Option<async_nats::Client>> {
        if !workload_type::is_function(&v.workload_type) {
            return Ok(None);
        }
        let hs = &self.cfg.host_services;
        let conf = if hs.has_connection() {
            nex_api::control::NatsConnectionConfig {
                nats_url: if hs.nats_url.is_empty() { self.control_url.clone() } else { hs.nats_url.clone() },
                nats_user_jwt: Some(hs.nats_user_jwt.clone()).filter(|s| !s.is_empty()),
                nats_user_seed: Some(hs.nats_user_seed.clone()).filter(|s| !s.is_empty()),
            }
        } else {
            match &v.request.host_services {
                Some(o) if !o.nats_url.is_empty() || o.nats_user_seed.is_some() => {
                    let mut o = o.clone();
                    if o.nats_url.is_empty() {
                        o.nats_url = self.control_url.clone();
                    }
                    self.targets.check(&o.nats_url).await.map_err(anyhow::Error::msg)?;
                    o
                }
                _ => return Ok(None),
            }
        };
        Ok(Some(crate::node::connect_workload_nats(&conf, "nex-hostservices").await?))
    }

    /// `urls` as a workload of agent `agent_id` must dial them: in a sandboxed tier only allowed
    /// NATS servers, each through a relay that serves this agent alone.
    async fn sandbox_nats_url(&self, agent_id: &str, urls: &str) -> Result<String, String> {
        let tier = self.pool.tier();
        if !tier.sandboxed() {
            return Ok(urls.to_string());
        }
        let targets = self.targets.check(urls).await?;
        tier.workload_nats_url(agent_id, urls, &targets)
            .await
            .map_err(|e| format!("cannot reach it from the sandbox: {e:#}"))
    }

    /// How a function's agent can hold its own trigger subscriptions, or `None` when the node
    /// must relay them (the user's NATS needs the node's credentials, or the tier cannot reach it).
    /// The agent then answers requesters itself: two hops fewer per call.
    async fn direct_triggers(&self, v: &Validated, agent_id: &str) -> Option<nex_api::agent::DirectTriggers> {
        if !workload_type::is_function(&v.workload_type) || !self.cfg.agent_triggers {
            return None;
        }
        let mut connection = match &v.request.trigger_connection {
            Some(tc) if !tc.nats_url.is_empty() => tc.clone(),
            _ => nex_api::control::NatsConnectionConfig {
                nats_url: self.agent_triggers_url.clone()?,
                ..Default::default()
            },
        };
        connection.nats_url = self.sandbox_nats_url(agent_id, &connection.nats_url).await.ok()?;
        Some(nex_api::agent::DirectTriggers {
            connection,
            queue_group: crate::triggers::queue_group(&v.namespace, &v.claims.sub, &v.claims.iss),
        })
    }

    /// The control connection (user NATS).
    pub fn control(&self) -> &async_nats::Client {
        &self.control
    }

    /// URL of the control connection's server.
    pub fn control_url(&self) -> &str {
        &self.control_url
    }
}

/// Moves NATS credentials sealed in the environment into the request's connection settings
/// (they win over the clear fields), so the workload never sees them in its environment.
/// Credentials without a URL are for `default_url` (the node's control connection's server).
fn merge_sealed_credentials(req: &mut DeployRequest, env: &mut BTreeMap<String, String>, default_url: &str) {
    use nex_api::env::sealed;
    let creds = nex_api::env::take_sealed_credentials(env);
    let merge = |slot: &mut Option<nex_api::control::NatsConnectionConfig>, jwt_key: &str, seed_key: &str| {
        let (jwt, seed) = (creds.get(jwt_key), creds.get(seed_key));
        if jwt.is_none() && seed.is_none() {
            return;
        }
        let c = slot.get_or_insert_with(Default::default);
        if let Some(j) = jwt {
            c.nats_user_jwt = Some(j.clone());
        }
        if let Some(s) = seed {
            c.nats_user_seed = Some(s.as_str().into());
        }
        if c.nats_url.is_empty() {
            c.nats_url = default_url.to_string();
        }
    };
    merge(&mut req.host_services, sealed::HOST_SERVICES_USER_JWT, sealed::HOST_SERVICES_USER_SEED);
    merge(&mut req.trigger_connection, sealed::TRIGGER_USER_JWT, sealed::TRIGGER_USER_SEED);
}

/// Streams an artifact into a file next to its agent (tiers sharing the host file system);
/// only the agent's user may read it.
async fn write_file<R: tokio::io::AsyncRead + Unpin>(path: &std::path::Path, reader: &mut R) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o700)
        .open(path)
        .await
        .with_context(|| format!("creating {}", path.display()))?;
    tokio::io::copy(reader, &mut f).await.with_context(|| format!("writing {}", path.display()))?;
    f.flush().await?;
    Ok(())
}
