//! Trigger subscriptions the agent holds itself.
//!
//! When the node hands a function's deploy request `direct_triggers`, the agent opens its own
//! connection to the user's NATS, joins the function's queue group on every trigger subject and
//! answers requesters directly: requester → NATS → agent → NATS → requester, the same hops as a
//! plain responder. After each call it tells the node what happened (in batches on
//! `hostint.<id>.execs`: under load one message carries many calls), and the node publishes the
//! events and log lines of REFERENCE §5.2 off the call's path.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use nex_api::agent::{DirectTriggers, FunctionExec, HEADER_ERROR, HEADER_RUNTIME_NS};
use nex_api::subjects::internal;

use crate::providers::Provider;
use crate::Agent;

/// The live trigger subscriptions of a function.
pub struct Triggers {
    conn: async_nats::Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Most calls one report carries.
const MAX_BATCH: usize = 256;

type Reports = tokio::sync::mpsc::UnboundedSender<FunctionExec>;

impl Triggers {
    /// Connects as `dt` says and subscribes to `subjects`; the subscriptions are registered at
    /// the server when this returns.
    pub async fn start(
        agent: Arc<Agent>,
        provider: Arc<Provider>,
        subjects: &[String],
        dt: &DirectTriggers,
    ) -> Result<Triggers, String> {
        let conn = connect(dt).await?;
        let (reports, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = vec![tokio::spawn(report(agent, rx))];
        for subject in subjects {
            let sub = match conn.queue_subscribe(subject.clone(), dt.queue_group.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tasks.iter().for_each(tokio::task::JoinHandle::abort);
                    return Err(format!("subscribing to trigger subject {subject}: {e}"));
                }
            };
            tasks.push(tokio::spawn(serve(reports.clone(), conn.clone(), provider.clone(), sub)));
        }
        if let Err(e) = round_trip(&conn).await {
            tasks.iter().for_each(tokio::task::JoinHandle::abort);
            return Err(format!("registering trigger subscriptions: {e}"));
        }
        Ok(Triggers { conn, tasks })
    }

    /// Stops taking calls: unsubscribes, lets replies in flight leave, closes the connection.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.conn.drain()).await;
    }
}

async fn connect(dt: &DirectTriggers) -> Result<async_nats::Client, String> {
    let c = &dt.connection;
    let mut opts = async_nats::ConnectOptions::new().name("workload-trigger-subscription");
    if let (Some(jwt), Some(seed)) = (&c.nats_user_jwt, &c.nats_user_seed) {
        if !jwt.is_empty() && !seed.is_empty() {
            let kp = Arc::new(nkeys::KeyPair::from_seed(seed).map_err(|e| format!("trigger connection seed: {e}"))?);
            opts = opts.jwt(jwt.clone(), move |nonce| {
                let kp = kp.clone();
                async move { kp.sign(&nonce).map_err(async_nats::AuthError::new) }
            });
        }
    }
    opts.connect(c.nats_url.as_str()).await.map_err(|e| format!("connecting to {} for triggers: {e}", c.nats_url))
}

/// Proves the server registered every subscription sent before it.
async fn round_trip(nc: &async_nats::Client) -> Result<(), String> {
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    nc.publish(inbox, Bytes::new()).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("connection closed".into()),
        Err(_) => Err("no answer from the server within 5s".into()),
    }
}

/// Sends the node what calls did, as many per message as have piled up.
async fn report(agent: Arc<Agent>, mut rx: tokio::sync::mpsc::UnboundedReceiver<FunctionExec>) {
    let subject = internal::execs(&agent.id);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if let Ok(body) = serde_json::to_vec(&batch) {
            let _ = agent.nc.publish(subject.clone(), body.into()).await;
        }
    }
}

async fn serve(reports: Reports, conn: async_nats::Client, provider: Arc<Provider>, mut sub: async_nats::Subscriber) {
    while let Some(m) = sub.next().await {
        tokio::spawn(call(reports.clone(), conn.clone(), provider.clone(), m));
    }
}

async fn call(reports: Reports, conn: async_nats::Client, provider: Arc<Provider>, m: async_nats::Message) {
    let subject = m.subject.to_string();
    let outcome = provider.trigger(&subject, m.payload).await;
    let mut h = async_nats::HeaderMap::new();
    let exec = match outcome {
        Ok((out, ns)) => {
            if let Some(r) = m.reply {
                h.insert(HEADER_RUNTIME_NS, ns.to_string().as_str());
                let _ = conn.publish_with_headers(r, h, out.into()).await;
            }
            FunctionExec { trigger_subject: subject, elapsed_nanos: ns, error: None }
        }
        Err(e) => {
            if let Some(r) = m.reply {
                h.insert(HEADER_ERROR, e.replace(['\r', '\n'], " ").as_str());
                let _ = conn.publish_with_headers(r, h, Bytes::new()).await;
            }
            FunctionExec { trigger_subject: subject, elapsed_nanos: 0, error: Some(e) }
        }
    };
    let _ = reports.send(exec);
}
