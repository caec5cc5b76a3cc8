//! The workload manager: the DEPLOY and STOP pipelines (checks and error texts in
//! `docs/protocol.md`), running workloads and their lifecycle events (one `workload_deployed` and
//! one `workload_undeployed` each), essential restarts with back-off, lame duck.
//!
//! * [`state`] — the one owner of lifecycle state (workloads, chains, reservations, lame duck);
//! * [`validate`] — the DEPLOY checks that need no NATS;
//! * [`launch`] — from a validated request to a running workload;
//! * [`lifecycle`] — agent reports, liveness, exit, teardown;
//! * [`restart`] — essential restarts; [`stop`] — STOP, lame duck, shutdown;
//! * [`connections`] — host-services, relay and trigger connections; [`error`] — refusals.

mod connections;
mod error;
mod launch;
mod lifecycle;
mod restart;
mod state;
mod stop;
mod validate;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use nex_api::control::{DeployRequest, MachineSummary, RunResponse, WorkloadPingMachineSummary, WorkloadSummary};
use nex_api::jwt::WorkloadClaims;
use nex_api::workload_type;

pub use error::{DeployError, StopError};
pub use lifecycle::LOG_LINES_PER_SEC;

use crate::config::NodeConfig;
use crate::events::EventPublisher;
use crate::nats_targets::NatsTargets;
use crate::pool::{Agent, AgentPool};
use crate::replay::ReplayGuard;
use crate::triggers::TriggerSet;
use state::Lifecycle;
use validate::Validated;

/// Locks `m`, recovering the data if a panic elsewhere poisoned it: every value behind these
/// locks is replaced whole, so it is never half-written.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Identity of this node.
pub struct NodeIdentity {
    /// Server public key (`N…`).
    pub node_id: String,
    /// Curve key that opens environments.
    pub xkey: nkeys::XKey,
    /// The fleet's curve key (`fleet_xkey_seed_path`): opens deployments' sealed environments.
    pub fleet_xkey: Option<nkeys::XKey>,
    /// Issuer used for autostart workloads.
    pub issuer: nkeys::KeyPair,
    /// Nexus name.
    pub nexus: String,
    /// When the node started.
    pub started: Instant,
    /// Tags reported everywhere (mutable: lame duck adds one).
    pub tags: RwLock<BTreeMap<String, String>>,
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
    /// Bytes of `node_limits.max_total_bytes` it holds.
    held_bytes: u64,
    /// Issuer public key.
    pub issuer: String,
    /// Tenant id (namespace, name, issuer): names its host-service buckets and queue group.
    pub tenant: String,
    claims: WorkloadClaims,
    validated: Validated,
    agent: Agent,
    started: Instant,
    essential: AtomicBool,
    /// Its restart chain (0: none), set when it is committed.
    chain: AtomicU64,
    life: tokio::sync::Mutex<Life>,
    ended: tokio::sync::Notify,
    torn_down: AtomicBool,
    /// Cumulative function run time.
    pub runtime_ns: AtomicU64,
    triggers: Mutex<Option<TriggerSet>>,
    /// Connection for host services when the request or config names one.
    hs_conn: Option<async_nats::Client>,
    log_limit: Mutex<lifecycle::LogLimit>,
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

    fn chain_id(&self) -> Option<u64> {
        Some(self.chain.load(Ordering::SeqCst)).filter(|c| *c != 0)
    }
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
    state: Arc<Lifecycle>,
    replay: Arc<ReplayGuard>,
    targets: NatsTargets,
}

/// What a [`WorkloadManager`] is made of.
pub struct ManagerParts {
    /// Who the node is.
    pub ident: Arc<NodeIdentity>,
    /// Its configuration.
    pub cfg: Arc<NodeConfig>,
    /// The control connection (user NATS).
    pub control: async_nats::Client,
    /// URL of that connection's server.
    pub control_url: String,
    /// The NATS URL a function's agent may dial itself for its triggers.
    pub agent_triggers_url: Option<String>,
    /// Warm agents.
    pub pool: Arc<AgentPool>,
    /// Events and logs.
    pub events: EventPublisher,
    /// Accepted token ids.
    pub replay: Arc<ReplayGuard>,
}

impl WorkloadManager {
    /// A manager deploying into agents from `pool`.
    pub fn new(p: ManagerParts) -> Arc<WorkloadManager> {
        let targets = NatsTargets::new(&p.cfg, &p.control_url, Some(p.control.clone()));
        Arc::new(WorkloadManager {
            ident: p.ident,
            cfg: p.cfg,
            control: p.control,
            control_url: p.control_url,
            agent_triggers_url: p.agent_triggers_url,
            pool: p.pool,
            events: p.events,
            state: Arc::default(),
            replay: p.replay,
            targets,
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

    /// The control connection (user NATS).
    pub fn control(&self) -> &async_nats::Client {
        &self.control
    }

    /// URL of the control connection's server.
    pub fn control_url(&self) -> &str {
        &self.control_url
    }

    /// True once LAMEDUCK was received.
    pub fn in_lameduck(&self) -> bool {
        self.state.in_lameduck()
    }

    /// Looks up a running workload.
    pub fn get(&self, id: &str) -> Option<Arc<Workload>> {
        self.state.get(id)
    }

    /// Every running workload.
    pub fn all(&self) -> Vec<Arc<Workload>> {
        self.state.all()
    }

    /// Number of running workloads.
    pub fn count(&self) -> usize {
        self.state.count()
    }

    /// Whether one more workload fits under `node_limits.max_workloads`.
    pub fn has_room(&self) -> bool {
        self.state.has_room(self.cfg.node_limits.max_workloads)
    }

    /// INFO machines in namespace `ns`.
    pub fn machines(&self, ns: &str) -> Vec<MachineSummary> {
        let tier = self.pool.tier();
        // Forwarded by the sandbox, or (process tier) bound by the workload itself.
        let ports = |w: &Workload| match tier.bridge() {
            Some(b) => b.forwarded(&w.id).iter().map(|p| p.to_string()).collect(),
            None => w.trigger_request().ports.clone(),
        };
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
                    ports: ports(&w),
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

    /// The whole DEPLOY pipeline for a request received on `$NEX.DEPLOY.{ns}.{node}`: a slot is
    /// reserved before anything else, so concurrent deploys never exceed `max_workloads`.
    pub async fn deploy(self: &Arc<Self>, ns: Option<&str>, body: &[u8]) -> Result<RunResponse, DeployError> {
        let started = std::time::Instant::now();
        let res = self.deploy_steps(ns, body).await;
        crate::telemetry::deploy_answered(started.elapsed(), res.is_ok());
        res
    }

    /// The DEPLOY checks with this node's identity and config.
    fn checks(&self) -> validate::Checks<'_> {
        validate::Checks {
            cfg: &self.cfg,
            node_id: &self.ident.node_id,
            xkey: &self.ident.xkey,
            replay: &self.replay,
            default_url: &self.control_url,
        }
    }

    async fn deploy_steps(self: &Arc<Self>, ns: Option<&str>, body: &[u8]) -> Result<RunResponse, DeployError> {
        let ns = validate::namespace(ns)?;
        let reservation = self.state.reserve(self.cfg.node_limits.max_workloads, false)?;
        let v = self.checks().run(ns, body)?;
        let jti = v.claims.jti.clone();
        let res = self.launch(v, reservation).await;
        if res.is_err() {
            self.replay.forget(&jti);
        }
        res
    }

    /// Deploys one replica of a deployment this node owns a slot of: the same checks as DEPLOY
    /// where they apply (capacity, lame duck, type, triggers, `valid_issuers` against the
    /// revision's issuer, the artifact's digest), the same launch, events and logs. `issuer`
    /// signed the revision in force; the replica's tenant is (namespace, name, issuer), so the
    /// replicas of one deployment share their trigger queue group across nodes.
    pub async fn deploy_replica(
        self: &Arc<Self>,
        spec: &nex_api::deployment::Spec,
        issuer: &str,
        revision: u64,
    ) -> Result<RunResponse, DeployError> {
        let ns = validate::namespace(Some(&spec.namespace))?;
        let reservation = self.state.reserve(self.cfg.node_limits.max_workloads, false)?;
        if !self.cfg.valid_issuers.is_empty() && !self.cfg.valid_issuers.iter().any(|i| i == issuer) {
            return Err(DeployError::Issuer(issuer.to_string()));
        }
        let wt = workload_type::canonical(&spec.workload_type);
        if let Some(need) = spec.resources.as_ref().and_then(|r| r.memory_mib) {
            let have = nex_api::deployment::memory_for(
                &wt,
                self.cfg.machine_template.memsize_mib,
                self.cfg.function_memory_mib,
            );
            if need > have {
                return Err(DeployError::Deploy(format!(
                    "the replica needs {need} MiB of memory and this node gives each workload {have} MiB"
                )));
            }
        }
        let request = DeployRequest {
            argv: spec.argv.clone(),
            description: Some(format!("deployment {}/{} revision {revision}", spec.namespace, spec.name)),
            workload_type: wt.clone(),
            location: spec.artifact.url.clone(),
            target_node: self.ident.node_id.clone(),
            trigger_subjects: spec.triggers.clone(),
            essential: spec.essential && wt == workload_type::NATIVE,
            ..Default::default()
        };
        self.checks().check_type_and_triggers(&request)?;
        let hash = spec.artifact.sha256.to_ascii_lowercase();
        let mut claims = WorkloadClaims::new(&spec.name, Some(&hash));
        claims.iss = issuer.to_string();
        claims.jti = format!("{:032x}", rand::random::<u128>());
        let v = Validated {
            namespace: ns,
            request,
            claims,
            environment: spec
                .open_environment(issuer, self.ident.fleet_xkey.as_ref())
                .map_err(|e| DeployError::Environment(e.to_string()))?,
            workload_type: wt,
            expected_hash: Some(hash),
            retry_count: 0,
            chain: None,
        };
        self.launch(v, reservation).await
    }

    /// Deploys the config's autostart workloads, signed by the node's own issuer.
    pub async fn autostart(self: &Arc<Self>) {
        for a in self.cfg.autostart.workloads.clone() {
            let ns = if a.namespace.is_empty() { nex_api::DEFAULT_NAMESPACE.to_string() } else { a.namespace.clone() };
            let claims = match WorkloadClaims::new(&a.name, None).encode(&self.ident.issuer) {
                Ok(t) => WorkloadClaims::decode(&t).ok(),
                Err(_) => None,
            };
            let Some(claims) = claims else { continue };
            let wt = workload_type::canonical(&a.workload_type);
            let request = DeployRequest {
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
            let v = Validated {
                namespace: ns,
                request,
                claims,
                environment: a.environment.clone(),
                workload_type: wt,
                expected_hash: None,
                retry_count: 0,
                chain: None,
            };
            let res = match self.state.reserve(self.cfg.node_limits.max_workloads, false) {
                Ok(r) => self.launch(v, r).await,
                Err(e) => Err(e),
            };
            match res {
                Ok(r) => tracing::info!(workload = %r.name, id = %r.id, "autostart workload deployed"),
                Err(e) => tracing::error!(workload = %a.name, error = %e, "autostart workload failed"),
            }
        }
    }
}
