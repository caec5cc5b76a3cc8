//! The node's side of one agent: a connection as the node's user in the workload's account,
//! the handshake, requests to `agentint.<id>.*` and what the agent sends on `hostint.<id>.*`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use nex_api::agent::{AgentDeployRequest, DeployResponse, LogEntry};
use nex_api::subjects::internal;

use crate::internal_nats::{CACHE_BUCKET, CACHE_KEY};

/// Something an agent sent that the workload manager must act on.
#[derive(Debug)]
pub enum AgentMessage {
    /// A log line.
    Log(LogEntry),
    /// An event (`workload_undeployed`, …) with its JSON data. An exit carries a receiver that
    /// fires once the data path has handled everything the agent sent before it (its last log
    /// lines), so the teardown does not drop them.
    Event(String, serde_json::Value, Option<tokio::sync::oneshot::Receiver<()>>),
    /// Sent on the data path behind an agent's last messages; answered when reached.
    Drained(tokio::sync::oneshot::Sender<()>),
    /// A host-service request to answer.
    HostService(async_nats::Message),
    /// Calls an agent holding its own triggers has answered.
    Execs(Vec<nex_api::agent::FunctionExec>),
}

/// Where agents' messages go: two bounded paths, so a flood of log lines can be dropped (and
/// counted) without ever delaying a workload's exit.
#[derive(Debug, Clone)]
pub struct AgentChannels {
    /// Log lines, call reports and host-service calls; full → dropped.
    pub data: mpsc::Sender<(String, AgentMessage)>,
    /// Lifecycle events (exits); waits when full.
    pub control: mpsc::Sender<(String, AgentMessage)>,
}

/// The receiving end of either path: agent id and message.
pub type AgentReceiver = mpsc::Receiver<(String, AgentMessage)>;

/// Capacity of the data path.
pub const DATA_CAPACITY: usize = 8192;
/// Capacity of the control path.
pub const CONTROL_CAPACITY: usize = 1024;

impl AgentChannels {
    /// Both paths and their receivers (data, control).
    pub fn new() -> (AgentChannels, AgentReceiver, AgentReceiver) {
        let (data, data_rx) = mpsc::channel(DATA_CAPACITY);
        let (control, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        (AgentChannels { data, control }, data_rx, control_rx)
    }
}

/// Connection to one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    /// The agent's workload id.
    pub id: String,
    conn: async_nats::Client,
    handshake: watch::Receiver<Option<Instant>>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    /// The task reading the agent's subjects (it holds the connection too).
    reader: tokio::task::AbortHandle,
}

impl AgentClient {
    /// Subscribes to the agent's subjects on `conn`; messages go to `tx` tagged with the id.
    pub async fn start(id: String, conn: async_nats::Client, tx: AgentChannels) -> Result<AgentClient> {
        let mut sub = conn.subscribe(format!("hostint.{id}.>")).await.context("subscribing to agent subjects")?;
        // Make sure the server has the subscription before the agent can send anything.
        crate::nats_ext::round_trip(&conn).await.context("registering agent subscription")?;
        let (hs_tx, hs_rx) = watch::channel(None);
        let c = conn.clone();
        let tid = id.clone();
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let lost = dropped.clone();
        let reader = tokio::spawn(async move {
            let handshake = internal::handshake(&tid);
            let logs = internal::logs(&tid);
            let execs = internal::execs(&tid);
            let events_prefix = format!("hostint.{tid}.events.");
            let rpc_prefix = format!("hostint.{tid}.rpc.");
            while let Some(msg) = sub.next().await {
                let subject = msg.subject.as_str();
                if subject == handshake {
                    if let Some(reply) = msg.reply {
                        let _ = c.publish(reply, Bytes::from_static(b"{}")).await;
                    }
                    let _ = hs_tx.send(Some(Instant::now()));
                } else if subject == logs {
                    if let Ok(entry) = serde_json::from_slice::<LogEntry>(&msg.payload) {
                        if tx.data.try_send((tid.clone(), AgentMessage::Log(entry))).is_err() {
                            lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                } else if subject == execs {
                    if let Ok(v) = serde_json::from_slice(&msg.payload) {
                        if tx.data.try_send((tid.clone(), AgentMessage::Execs(v))).is_err() {
                            tracing::debug!(agent = %tid, "node busy: a batch of call reports was dropped");
                        }
                    }
                } else if subject.starts_with(&rpc_prefix) {
                    let reply = msg.reply.clone();
                    if tx.data.try_send((tid.clone(), AgentMessage::HostService(msg))).is_err() {
                        if let Some(r) = reply {
                            let mut h = async_nats::HeaderMap::new();
                            h.insert(nex_api::agent::HEADER_HS_CODE, "503");
                            h.insert(nex_api::agent::HEADER_HS_MSG, "the node is busy: try again");
                            let _ = c.publish_with_headers(r, h, Bytes::new()).await;
                        }
                    }
                } else if let Some(t) = subject.strip_prefix(&events_prefix) {
                    let data = serde_json::from_slice(&msg.payload).unwrap_or(serde_json::Value::Null);
                    let drained = (t == nex_api::events::event_type::WORKLOAD_UNDEPLOYED).then(|| {
                        let (done, drained) = tokio::sync::oneshot::channel();
                        let _ = tx.data.try_send((tid.clone(), AgentMessage::Drained(done)));
                        drained
                    });
                    let _ = tx.control.send((tid.clone(), AgentMessage::Event(t.to_string(), data, drained))).await;
                }
            }
        });
        Ok(AgentClient { id, conn, handshake: hs_rx, dropped, reader: reader.abort_handle() })
    }

    /// Log lines dropped on their way to the node since the last call (the node was busy).
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for the agent's handshake.
    pub async fn wait_handshake(&self, within: Duration) -> Result<()> {
        let mut rx = self.handshake.clone();
        let ok = matches!(tokio::time::timeout(within, rx.wait_for(|h| h.is_some())).await, Ok(Ok(_)));
        if !ok {
            bail!("agent {} did not handshake within {}ms", self.id, within.as_millis());
        }
        Ok(())
    }

    /// Liveness ping; true when the agent answered `OK` in time.
    pub async fn ping(&self, within: Duration) -> bool {
        matches!(
            tokio::time::timeout(within, self.conn.request(internal::ping(&self.id), Bytes::new())).await,
            Ok(Ok(m)) if &m.payload[..] == b"OK"
        )
    }

    /// Puts the artifact into the workload account's cache bucket.
    pub async fn put_artifact<R: tokio::io::AsyncRead + Unpin>(&self, reader: &mut R) -> Result<()> {
        let store = self.cache_bucket().await?;
        store.put(CACHE_KEY, reader).await.map_err(|e| anyhow!("storing artifact in {CACHE_BUCKET}: {e}"))?;
        Ok(())
    }

    /// The agent account's `NEXCACHE` bucket, created when missing. Retried for a few seconds:
    /// right after a reload of the internal server the account's JetStream can answer
    /// "jetstream unavailable" for a moment. The pool calls it before an agent counts as warm,
    /// so a DEPLOY finds the bucket ready.
    pub async fn cache_bucket(&self) -> Result<async_nats::jetstream::object_store::ObjectStore> {
        let js = async_nats::jetstream::new(self.conn.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let res = match js.get_object_store(CACHE_BUCKET).await {
                Ok(s) => Ok(s),
                Err(_) => js
                    .create_object_store(async_nats::jetstream::object_store::Config {
                        bucket: CACHE_BUCKET.into(),
                        description: Some("Cache for workload images to be executed by agent".into()),
                        storage: async_nats::jetstream::stream::StorageType::Memory,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| anyhow!("creating {CACHE_BUCKET}: {e}")),
            };
            match res {
                Ok(s) => return Ok(s),
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Sends the deploy request and returns the agent's answer.
    ///
    /// "No responders" is retried briefly: while the internal server reloads its accounts, a
    /// subscription can be missing for a moment (Nex 0.3 retries the same way).
    pub async fn deploy(&self, req: &AgentDeployRequest, within: Duration) -> Result<DeployResponse> {
        let body: Bytes = serde_json::to_vec(req)?.into();
        let msg = self
            .request_retrying(internal::deploy(&self.id), body, within)
            .await
            .map_err(|e| anyhow!("failed to submit request for workload deployment: {e}"))?;
        serde_json::from_slice(&msg.payload).map_err(|e| anyhow!("malformed deploy response from agent: {e}"))
    }

    async fn request_retrying(&self, subject: String, body: Bytes, within: Duration) -> Result<async_nats::Message> {
        let deadline = Instant::now() + within;
        let mut attempts = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let req =
                async_nats::Request::new().payload(body.clone()).timeout(Some(left.max(Duration::from_millis(1))));
            match self.conn.send_request(subject.clone(), req).await {
                Ok(m) => return Ok(m),
                Err(e)
                    if e.kind() == async_nats::RequestErrorKind::NoResponders
                        && attempts < 10
                        && Instant::now() < deadline =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                    bail!("timed out after {}ms", within.as_millis())
                }
                Err(e) => bail!("{e}"),
            }
        }
    }

    /// Asks the agent to stop its workload gracefully.
    pub async fn undeploy(&self, within: Duration) -> Result<()> {
        tokio::time::timeout(within, self.conn.request(internal::undeploy(&self.id), Bytes::new()))
            .await
            .map_err(|_| anyhow!("undeploy timed out"))?
            .map_err(|e| anyhow!("undeploy failed: {e}"))?;
        Ok(())
    }

    /// Sends a function trigger and returns the agent's reply message.
    pub async fn trigger(
        &self,
        subject: &str,
        payload: Bytes,
        within: Duration,
        trace: &opentelemetry::Context,
    ) -> Result<async_nats::Message> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(nex_api::agent::HEADER_TRIGGER_SUBJECT, subject);
        crate::traces::inject(trace, &mut headers);
        let mut retried = false;
        loop {
            let req =
                async_nats::Request::new().payload(payload.clone()).headers(headers.clone()).timeout(Some(within));
            match self.conn.send_request(internal::trigger(&self.id), req).await {
                Ok(m) => return Ok(m),
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders && !retried => {
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(anyhow!("{e}")),
            }
        }
    }

    /// The underlying connection (the node's user in the workload account).
    pub fn connection(&self) -> &async_nats::Client {
        &self.conn
    }

    /// Closes the connection: drained when the server answers, dropped in any case (a client
    /// left behind would reconnect forever to an account that no longer exists).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.conn.drain()).await;
        self.reader.abort();
    }
}

/// Shared agent client.
pub type SharedAgentClient = Arc<AgentClient>;
