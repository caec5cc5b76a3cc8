//! From a validated request to a running workload: size limits before a byte moves, a warm
//! agent, the artifact streamed and hashed into it, the connections the workload is allowed,
//! then the agent's deploy and, for relayed functions, the trigger subscriptions.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use nex_api::agent::{AgentDeployRequest, FunctionLimits};
use nex_api::control::RunResponse;
use nex_api::events::event_type;
use nex_api::workload_type;

use super::error::DeployError;
use super::state::{ChainSlot, CommitRefused, Reservation};
use super::validate::Validated;
use super::{Life, Workload, WorkloadManager};
use crate::artifact::{HashingReader, Location};
use crate::pool::Agent;

/// What the node prepared in the agent before asking it to deploy.
struct Prepared {
    environment: std::collections::BTreeMap<String, String>,
    local_path: Option<String>,
    hash: String,
    total_bytes: u64,
    hs_conn: Option<async_nats::Client>,
}

impl WorkloadManager {
    /// Deploys `v` into a warm agent, holding `reservation` until the workload runs.
    pub(super) async fn launch(
        self: &Arc<Self>,
        v: Validated,
        mut reservation: Reservation,
    ) -> Result<RunResponse, DeployError> {
        let loc = Location::parse(&v.request.location).map_err(DeployError::Cache)?;
        let js = match v.request.jsdomain.as_deref().filter(|d| !d.is_empty()) {
            Some(d) => async_nats::jetstream::with_domain(self.control.clone(), d),
            None => async_nats::jetstream::new(self.control.clone()),
        };
        let store = js
            .get_object_store(&loc.bucket)
            .await
            .map_err(|e| DeployError::Cache(format!("object store {}: {e}", loc.bucket)))?;
        let info = store
            .info(&loc.key)
            .await
            .map_err(|e| DeployError::Cache(format!("object {} in {}: {e}", loc.key, loc.bucket)))?;
        // Size limits before a byte is downloaded.
        let lim = &self.cfg.node_limits;
        self.state.reserve_bytes(&mut reservation, info.size as u64, lim.max_workload_bytes, lim.max_total_bytes)?;
        let agent = match self.pool.take(self.pool.start_timeout() * 2).await {
            Ok(a) => a,
            Err(e) => {
                let hint =
                    self.pool.last_error().map(|h| format!(" (last agent start failure: {h})")).unwrap_or_default();
                return Err(DeployError::NoAgent(format!("{e}{hint}")));
            }
        };
        match self.prepare(&v, &agent, &store, &loc.key, info.size as u64).await {
            Ok(p) => self.start(v, agent, p, reservation).await,
            Err(e) => {
                self.pool.release(agent).await;
                Err(e)
            }
        }
    }

    /// The workload's environment as the tier lets it reach NATS, the artifact in the agent
    /// (checked against the JWT's hash), and the host-services connection.
    async fn prepare(
        &self,
        v: &Validated,
        agent: &Agent,
        store: &async_nats::jetstream::object_store::ObjectStore,
        key: &str,
        size: u64,
    ) -> Result<Prepared, DeployError> {
        let mut environment = v.environment.clone();
        for (k, url) in environment.iter_mut().filter(|(k, _)| k.eq_ignore_ascii_case("NATS_URL")) {
            *url = self.sandbox_nats_url(&agent.id, url).await.map_err(|e| DeployError::Deploy(format!("{k}: {e}")))?;
        }
        self.forward_ports(v, &agent.id).await?;
        crate::traces::current_event("Started workload download");
        let object = store.get(key).await.map_err(|e| DeployError::Cache(e.to_string()))?;
        let mut reader = HashingReader::new(object, size);
        let tier = self.pool.tier();
        let local_path = if tier.shares_host_filesystem() {
            let path = agent.work_dir.join("workload");
            write_file(&path, &mut reader).await.map_err(|e| DeployError::Cache(format!("{e:#}")))?;
            tier.own_artifact(&path).map_err(|e| DeployError::Cache(format!("{e:#}")))?;
            Some(tier.agent_work_dir(&agent.work_dir).join("workload").display().to_string())
        } else {
            let quiet = self.pool.internal_nats().without_reloads().await;
            let put = agent.client.put_artifact(&mut reader).await;
            drop(quiet);
            put.map_err(|e| DeployError::Cache(format!("{e:#}")))?;
            None
        };
        let (hash, total_bytes) = reader.finish();
        crate::traces::current_event("Completed workload download");
        if v.expected_hash.as_ref().is_some_and(|expected| *expected != hash) {
            // Neither digest is echoed: the requester may not be able to read the bucket.
            return Err(DeployError::Cache(
                "artifact hash mismatch: the artifact's SHA-256 differs from the workload JWT's nats.hash claim".into(),
            ));
        }
        if total_bytes == 0 {
            return Err(DeployError::Cache("the artifact is empty".into()));
        }
        if v.workload_type == workload_type::V8 && total_bytes > self.cfg.max_js_source_bytes {
            return Err(DeployError::Deploy(format!(
                "source file ({total_bytes} bytes) exceeds maximum of {} bytes",
                self.cfg.max_js_source_bytes
            )));
        }
        let hs_conn = self
            .host_services_connection(v)
            .await
            .map_err(|e| DeployError::Deploy(format!("host services connection: {e:#}")))?;
        Ok(Prepared { environment, local_path, hash, total_bytes, hs_conn })
    }

    /// Commits the workload, has the agent start it, subscribes relayed triggers, and reports it.
    async fn start(
        self: &Arc<Self>,
        v: Validated,
        agent: Agent,
        p: Prepared,
        reservation: Reservation,
    ) -> Result<RunResponse, DeployError> {
        let w = Arc::new(Workload::new(&v, &agent, &p, reservation.bytes()));
        let mut life = w.life.lock().await;
        let slot = match v.chain {
            Some(c) => ChainSlot::Existing(c),
            None if v.request.essential => ChainSlot::New,
            None => ChainSlot::None,
        };
        if let Err(refused) = self.state.commit(reservation, w.clone(), slot) {
            drop(life);
            self.pool.release(agent).await;
            return Err(match refused {
                CommitRefused::ShuttingDown => DeployError::ShuttingDown,
                CommitRefused::ChainEnded => DeployError::Deploy("the workload was stopped while it restarted".into()),
            });
        }
        let direct_triggers = self.direct_triggers(&v, &agent.id).await;
        let relayed = workload_type::is_function(&w.workload_type) && direct_triggers.is_none();
        let areq = self.agent_request(&v, p, direct_triggers);
        crate::traces::current_event("Created agent deploy request");
        let mut accepted = match agent.client.deploy(&areq, Duration::from_secs(30)).await {
            Ok(r) if r.accepted => Ok(()),
            Ok(r) => Err(DeployError::Deploy(format!("workload rejected by agent: {}", r.message.unwrap_or_default()))),
            Err(e) => Err(DeployError::Deploy(format!("{e:#}"))),
        };
        if accepted.is_ok() {
            crate::traces::current_event("Agent deploy request accepted");
        }
        if accepted.is_ok() && relayed {
            accepted = match crate::triggers::subscribe(self.clone(), w.clone()).await {
                Ok(set) => {
                    *super::lock(&w.triggers) = Some(set);
                    Ok(())
                }
                Err(e) => Err(DeployError::Deploy(format!("{e:#}"))),
            };
        }
        if let Err(e) = accepted {
            life.ended = true;
            drop(life);
            if let Some(c) = w.chain_id() {
                self.state.end_chain(c);
            }
            self.teardown(&w).await;
            return Err(e);
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
}

impl WorkloadManager {
    /// What the agent is asked to run: the validated request as the node prepared it.
    fn agent_request(
        &self,
        v: &Validated,
        p: Prepared,
        direct_triggers: Option<nex_api::agent::DirectTriggers>,
    ) -> AgentDeployRequest {
        AgentDeployRequest {
            argv: v.request.argv.clone(),
            description: v.request.description.clone(),
            environment: p.environment,
            essential: v.request.essential,
            hash: p.hash,
            namespace: v.namespace.clone(),
            retried_at: v.request.retried_at.clone(),
            retry_count: v.request.retry_count,
            total_bytes: p.total_bytes,
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
            local_path: p.local_path,
            direct_triggers,
        }
    }
}

impl Workload {
    /// The workload `v` becomes in `agent`, holding `held_bytes` of the node's byte budget.
    fn new(v: &Validated, agent: &Agent, p: &Prepared, held_bytes: u64) -> Workload {
        Workload {
            id: agent.id.clone(),
            namespace: v.namespace.clone(),
            name: v.claims.sub.clone(),
            workload_type: v.workload_type.clone(),
            description: v.request.description.clone(),
            hash: p.hash.clone(),
            total_bytes: p.total_bytes,
            held_bytes,
            issuer: v.claims.iss.clone(),
            tenant: nex_api::id::tenant_id(&v.namespace, &v.claims.sub, &v.claims.iss),
            claims: v.claims.clone(),
            validated: v.clone(),
            agent: agent.clone(),
            started: Instant::now(),
            essential: AtomicBool::new(v.request.essential),
            chain: AtomicU64::new(0),
            life: tokio::sync::Mutex::new(Life::default()),
            ended: tokio::sync::Notify::new(),
            torn_down: AtomicBool::new(false),
            runtime_ns: AtomicU64::new(0),
            triggers: Mutex::new(None),
            hs_conn: p.hs_conn.clone(),
            log_limit: Mutex::new(super::lifecycle::LogLimit::new()),
        }
    }
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
