//! A typed client of the nex control API (`docs/protocol.md`), used by the `nex` CLI and the tests.
//!
//! Everything here is plain NATS request/reply on `$NEX.*` plus the object store for artifacts,
//! so a third-party client needs nothing from this crate to interoperate.

pub mod deploy;
pub mod monitor;

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use nex_api::control::{
    AuctionRequest, DeployRequest, Envelope, InfoResponse, LameDuckRequest, LameDuckResponse, PingResponse,
    RunResponse, StopRequest, StopResponse, WorkloadPingResponse,
};
use nex_api::subjects::control as subj;

pub use deploy::{artifact_hash_from_digest, DeployBuilder};

/// What can go wrong talking to nodes.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No node answered in time.
    #[error("no reply from node {0} within {1:?} (is the node running and connected to this NATS server?)")]
    Timeout(String, Duration),
    /// Nobody listens on the subject.
    #[error("no node is listening on {0} (check the node id and namespace)")]
    NoResponders(String),
    /// The node answered with an error envelope.
    #[error("{0}")]
    Node(String),
    /// The reply was not an envelope of the expected shape.
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// NATS failure.
    #[error("NATS: {0}")]
    Nats(String),
}

/// Client for one namespace.
#[derive(Debug, Clone)]
pub struct ControlClient {
    nc: async_nats::Client,
    timeout: Duration,
    namespace: String,
}

impl ControlClient {
    /// A client in namespace `namespace` with request/gather timeout `timeout`.
    pub fn new(nc: async_nats::Client, timeout: Duration, namespace: &str) -> Self {
        ControlClient {
            nc,
            timeout,
            namespace: if namespace.is_empty() {
                nex_api::DEFAULT_NAMESPACE.to_string()
            } else {
                namespace.to_string()
            },
        }
    }

    /// The namespace requests go to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nc
    }

    async fn request<T: DeserializeOwned>(&self, subject: String, body: Bytes, node: &str) -> Result<T, ClientError> {
        self.request_within(subject, body, node, self.timeout).await
    }

    async fn request_within<T: DeserializeOwned>(
        &self,
        subject: String,
        body: Bytes,
        node: &str,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let req = async_nats::Request::new().payload(body).timeout(Some(timeout));
        let msg = match tokio::time::timeout(timeout, self.nc.send_request(subject.clone(), req)).await {
            Err(_) => return Err(ClientError::Timeout(node.to_string(), timeout)),
            Ok(Err(e)) => {
                return Err(match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => ClientError::NoResponders(subject),
                    async_nats::RequestErrorKind::TimedOut => ClientError::Timeout(node.to_string(), timeout),
                    _ => ClientError::Nats(e.to_string()),
                })
            }
            Ok(Ok(m)) => m,
        };
        let env: Envelope = serde_json::from_slice(&msg.payload).map_err(|e| ClientError::Malformed(e.to_string()))?;
        env.into_result().map_err(ClientError::Node)
    }

    /// Publishes on `subject` and gathers every reply until the timeout.
    async fn gather<T: DeserializeOwned>(&self, subject: String, body: Bytes) -> Result<Vec<T>, ClientError> {
        let inbox = self.nc.new_inbox();
        let mut sub = self.nc.subscribe(inbox.clone()).await.map_err(|e| ClientError::Nats(e.to_string()))?;
        self.nc.publish_with_reply(subject, inbox, body).await.map_err(|e| ClientError::Nats(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut out = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
            if m.payload.is_empty() {
                continue;
            }
            if let Ok(env) = serde_json::from_slice::<Envelope>(&m.payload) {
                if let Ok(v) = env.into_result::<T>() {
                    out.push(v);
                }
            }
        }
        Ok(out)
    }

    /// Every node (gathered for the timeout).
    pub async fn ping_nodes(&self) -> Result<Vec<PingResponse>, ClientError> {
        self.gather(subj::ping(), Bytes::new()).await
    }

    /// One node.
    pub async fn ping_node(&self, node: &str) -> Result<PingResponse, ClientError> {
        self.request(subj::ping_node(node), Bytes::new(), node).await
    }

    /// Workloads in this namespace, optionally one id or name.
    pub async fn ping_workloads(&self, id_or_name: Option<&str>) -> Result<Vec<WorkloadPingResponse>, ClientError> {
        self.gather(subj::wping(&self.namespace, id_or_name), Bytes::new()).await
    }

    /// Nodes matching `req`.
    pub async fn auction(&self, req: &AuctionRequest) -> Result<Vec<PingResponse>, ClientError> {
        let body = serde_json::to_vec(req).unwrap_or_default();
        self.gather(subj::auction(), body.into()).await
    }

    /// Node details and its workloads in this namespace.
    pub async fn node_info(&self, node: &str) -> Result<InfoResponse, ClientError> {
        self.request(subj::info(&self.namespace, node), Bytes::new(), node).await
    }

    /// Sends a DEPLOY (waiting at least 60 s: large artifacts take time to download).
    pub async fn deploy(&self, node: &str, req: &DeployRequest) -> Result<RunResponse, ClientError> {
        let body = serde_json::to_vec(req).unwrap_or_default();
        let t = self.timeout.max(Duration::from_secs(60));
        self.request_within(subj::deploy(&self.namespace, node), body.into(), node, t).await
    }

    /// Sends a STOP (waiting at least 30 s: the workload gets a grace period).
    pub async fn stop(&self, node: &str, req: &StopRequest) -> Result<StopResponse, ClientError> {
        let body = serde_json::to_vec(req).unwrap_or_default();
        let t = self.timeout.max(Duration::from_secs(30));
        self.request_within(subj::stop(&self.namespace, node), body.into(), node, t).await
    }

    /// Puts a node in lame duck mode, optionally draining it after `delay`. With `issuer` (an
    /// admin issuer of the node) the request is signed, as nodes that restrict issuers require.
    pub async fn lameduck(
        &self,
        node: &str,
        delay: Option<Duration>,
        issuer: Option<&nkeys::KeyPair>,
    ) -> Result<LameDuckResponse, ClientError> {
        let req = match issuer {
            Some(kp) => Some(
                deploy::lameduck_request(kp, node, delay).map_err(|e| ClientError::Node(format!("signing: {e:#}")))?,
            ),
            None => delay.map(|d| LameDuckRequest { delay_ms: Some(d.as_millis() as u64), jwt: None }),
        };
        let body = match req {
            Some(r) => serde_json::to_vec(&r).unwrap_or_default().into(),
            None => Bytes::new(),
        };
        self.request(subj::lameduck(node), body, node).await
    }
}
