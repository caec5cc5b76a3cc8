//! The agent pool: `machine_pool_size` warm agents, started through the node's isolation tier,
//! handshaken, pinged, and replaced when they die, fail to handshake, or are taken by a DEPLOY.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use tokio::sync::Notify;

use crate::agent_client::{AgentChannels, AgentClient};
use crate::config::NodeConfig;
use crate::internal_nats::InternalNats;
use crate::state::RunState;
use crate::tiers::{AgentHandle, AgentSpec, IsolationTier};

/// A started, handshaken agent without a workload.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Workload id of the agent.
    pub id: String,
    /// The node's connection to it.
    pub client: AgentClient,
    /// What the tier created for it.
    pub handle: Arc<dyn AgentHandle>,
    /// Its work directory on the host.
    pub work_dir: std::path::PathBuf,
}

impl Agent {
    /// True when the agent process/VM has exited.
    pub fn is_dead(&self) -> bool {
        self.handle.exited().borrow().is_some()
    }
}

/// Agents started at the same time at most.
const MAX_PARALLEL_STARTS: usize = 4;

/// Decrements a counter when dropped.
struct CounterGuard<'a>(&'a AtomicUsize);

impl Drop for CounterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn scopeguard(c: &AtomicUsize) -> CounterGuard<'_> {
    CounterGuard(c)
}

/// Warm agents waiting for work.
pub struct AgentPool {
    tier: Arc<dyn IsolationTier>,
    nats: Arc<InternalNats>,
    run: Arc<RunState>,
    cfg: Arc<NodeConfig>,
    msgs: AgentChannels,
    warm: Mutex<VecDeque<Agent>>,
    starting: AtomicUsize,
    waiting: AtomicUsize,
    available: Notify,
    wanted: Notify,
    stopping: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl AgentPool {
    /// A pool that starts agents through `tier`; call [`AgentPool::start`] to fill it.
    pub fn new(
        tier: Arc<dyn IsolationTier>,
        nats: Arc<InternalNats>,
        run: Arc<RunState>,
        cfg: Arc<NodeConfig>,
        msgs: AgentChannels,
    ) -> Arc<AgentPool> {
        Arc::new(AgentPool {
            tier,
            nats,
            run,
            cfg,
            msgs,
            warm: Mutex::new(VecDeque::new()),
            starting: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            available: Notify::new(),
            wanted: Notify::new(),
            stopping: AtomicBool::new(false),
            last_error: Mutex::new(None),
        })
    }

    /// Starts the refill and liveness loops.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.refill_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.liveness_loop().await });
    }

    /// The node's internal NATS server.
    pub fn internal_nats(&self) -> &Arc<InternalNats> {
        &self.nats
    }

    /// The tier agents run in.
    pub fn tier(&self) -> &Arc<dyn IsolationTier> {
        &self.tier
    }

    /// How many warm agents wait for work.
    pub fn available(&self) -> usize {
        self.warm.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// How long starting one agent may take in this tier.
    pub fn start_timeout(&self) -> Duration {
        self.tier.start_timeout(Duration::from_millis(self.cfg.agent_handshake_timeout_ms.max(1000)))
    }

    /// The last reason an agent failed to start, if the pool is struggling.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn refill_loop(self: Arc<Self>) {
        let target = self.cfg.machine_pool_size.max(1) as usize;
        let backoff = Arc::new(Mutex::new(Duration::from_millis(100)));
        while !self.stopping.load(Ordering::SeqCst) {
            // Keep `target` warm, plus one per deploy waiting, starting a few at a time.
            let want = target + self.waiting.load(Ordering::SeqCst);
            let starting = self.starting.load(Ordering::SeqCst);
            // While agents fail to start, retry one at a time.
            let parallel = if self.last_error().is_some() { 1 } else { MAX_PARALLEL_STARTS };
            if self.available() + starting >= want || starting >= parallel {
                let _ = tokio::time::timeout(Duration::from_millis(200), self.wanted.notified()).await;
                continue;
            }
            self.starting.fetch_add(1, Ordering::SeqCst);
            let me = self.clone();
            let backoff = backoff.clone();
            tokio::spawn(async move {
                let res = me.launch_one().await;
                match res {
                    Ok(agent) => {
                        *backoff.lock().unwrap_or_else(|e| e.into_inner()) = Duration::from_millis(100);
                        *me.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        if me.stopping.load(Ordering::SeqCst) {
                            me.release(agent).await;
                        } else {
                            me.warm.lock().unwrap_or_else(|e| e.into_inner()).push_back(agent);
                        }
                        me.starting.fetch_sub(1, Ordering::SeqCst);
                        me.available.notify_waiters();
                    }
                    Err(e) => {
                        let wait = {
                            let mut b = backoff.lock().unwrap_or_else(|e| e.into_inner());
                            let w = *b;
                            *b = (w * 2).min(Duration::from_secs(5));
                            w
                        };
                        tracing::error!(error = %format!("{e:#}"), "failed to start a warm agent; retrying in {}ms", wait.as_millis());
                        *me.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{e:#}"));
                        me.available.notify_waiters();
                        tokio::time::sleep(wait).await;
                        me.starting.fetch_sub(1, Ordering::SeqCst);
                        me.wanted.notify_one();
                    }
                }
            });
        }
    }

    async fn launch_one(&self) -> Result<Agent> {
        let id = nex_api::id::new_workload_id();
        let creds = self
            .nats
            .add_workloads(std::slice::from_ref(&id))
            .await?
            .pop()
            .ok_or_else(|| anyhow!("no credentials created"))?;
        let cleanup_creds = |nats: Arc<InternalNats>, id: String| async move {
            let _ = nats.remove_workload(&id).await;
        };
        let conn = match self.nats.connect_as(&creds.node, &format!("nex-node-{id}"), Duration::from_secs(5)).await {
            Ok(c) => c,
            Err(e) => {
                cleanup_creds(self.nats.clone(), id).await;
                return Err(e);
            }
        };
        let client = match AgentClient::start(id.clone(), conn, self.msgs.clone()).await {
            Ok(c) => c,
            Err(e) => {
                cleanup_creds(self.nats.clone(), id).await;
                return Err(e);
            }
        };
        let spec_id = id.clone();
        let spec = AgentSpec {
            id: id.clone(),
            nats_host: self.tier.agent_nats_host(),
            nats_port: self.nats.port(),
            nkey_seed: creds.agent.seed()?.into(),
            work_dir: self.tier.host_work_dir(&self.run, &id),
            template: self.cfg.machine_template.clone(),
            stop_grace_ms: self.cfg.workload_stop_grace_ms,
        };
        let handle: Arc<dyn AgentHandle> = match self.tier.launch(spec).await {
            Ok(h) => Arc::from(h),
            Err(e) => {
                client.close().await;
                cleanup_creds(self.nats.clone(), id).await;
                return Err(e);
            }
        };
        let agent = Agent { id, client, handle, work_dir: self.tier.host_work_dir(&self.run, &spec_id) };
        let within = self.tier.start_timeout(Duration::from_millis(self.cfg.agent_handshake_timeout_ms));
        let mut exited = agent.handle.exited();
        let outcome = tokio::select! {
            r = agent.client.wait_handshake(within) => r,
            _ = crate::tiers::wait_exit(&mut exited) => {
                // Give the tier a moment to collect why (the runtime's last error line).
                tokio::time::sleep(Duration::from_millis(50)).await;
                let why = agent.handle.start_failure().map(|w| format!(": {w}")).unwrap_or_default();
                Err(anyhow!("agent {} exited before its handshake{why}", agent.id))
            }
        };
        // Agents without the host's file system get their artifact through the account's
        // cache bucket: make it before the agent counts as warm.
        let outcome = match outcome {
            Ok(()) if !self.tier.shares_host_filesystem() => agent.client.cache_bucket().await.map(|_| ()),
            other => other,
        };
        match outcome {
            Ok(()) => {
                tracing::debug!(agent = %agent.id, tier = self.tier.name(), "agent ready");
                Ok(agent)
            }
            Err(e) => {
                self.release(agent).await;
                Err(e)
            }
        }
    }

    /// Takes a warm agent, waiting up to `within` for one.
    ///
    /// While the pool keeps producing agents (a burst of deploys), the wait is extended, so
    /// requests queue instead of failing; when agents fail to start, it is not.
    pub async fn take(&self, within: Duration) -> Result<Agent> {
        let mut deadline = tokio::time::Instant::now() + within;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _guard = scopeguard(&self.waiting);
        loop {
            let notified = self.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stopping.load(Ordering::SeqCst) {
                return Err(anyhow!("the node is shutting down"));
            }
            let next = self.warm.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
            if let Some(agent) = next {
                self.wanted.notify_one();
                if agent.is_dead() {
                    self.release(agent).await;
                    continue;
                }
                return Ok(agent);
            }
            self.wanted.notify_one();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(anyhow!("no available agent client in pool"));
            }
            if self.last_error().is_none() {
                deadline = tokio::time::Instant::now() + within;
            }
        }
    }

    /// Destroys an agent and its account.
    pub async fn release(&self, agent: Agent) {
        agent.handle.destroy().await;
        agent.client.close().await;
        let _ = self.nats.remove_workload(&agent.id).await;
    }

    async fn liveness_loop(self: Arc<Self>) {
        let ping_timeout = Duration::from_millis(self.cfg.agent_ping_timeout_ms);
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.tick().await;
        while !self.stopping.load(Ordering::SeqCst) {
            tick.tick().await;
            let agents: Vec<Agent> = self.warm.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
            for a in agents {
                if a.is_dead() || !a.client.ping(ping_timeout).await {
                    let removed = {
                        let mut w = self.warm.lock().unwrap_or_else(|e| e.into_inner());
                        let before = w.len();
                        w.retain(|x| x.id != a.id);
                        before != w.len()
                    };
                    if removed {
                        tracing::warn!(agent = %a.id, "warm agent lost; replacing it");
                        self.release(a).await;
                        self.wanted.notify_one();
                    }
                }
            }
        }
    }

    /// Stops handing out agents: deploys waiting for one fail at once (node shutdown).
    pub fn stop_taking(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.available.notify_waiters();
        self.wanted.notify_waiters();
    }

    /// Stops the loops and destroys every warm agent.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wanted.notify_waiters();
        let agents: Vec<Agent> = self.warm.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        futures::future::join_all(agents.into_iter().map(|a| self.release(a))).await;
        // An agent being started right now is released by the refill loop when it sees the flag.
        for _ in 0..100 {
            if self.starting.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let leftovers: Vec<Agent> = self.warm.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        futures::future::join_all(leftovers.into_iter().map(|a| self.release(a))).await;
    }
}
