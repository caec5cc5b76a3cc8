//! Function triggers the node holds: a queue subscription per trigger subject, each message
//! forwarded to the workload's agent and its answer returned to the requester.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;

use nex_api::agent::{HEADER_ERROR, HEADER_RUNTIME_NS};
use nex_api::events::event_type;

use crate::events::EventPublisher;
use crate::workloads::{Workload, WorkloadManager};

/// Relayed calls of one function in flight at the same time.
const MAX_CALLS_IN_FLIGHT: usize = 256;

/// The live subscriptions of one function workload.
pub struct TriggerSet {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    own_conn: Option<async_nats::Client>,
}

impl TriggerSet {
    /// Unsubscribes and stops forwarding.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(c) = self.own_conn {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), c.drain()).await;
        }
    }
}

/// The queue group shared by every instance of a function, relayed or agent-held: one per
/// tenant (namespace, name and issuer), so a stranger who deploys a function under the same
/// namespace and name does not join it and take a share of its requests.
pub fn queue_group(namespace: &str, name: &str, issuer: &str) -> String {
    format!("nex-{}", nex_api::id::tenant_id(namespace, name, issuer))
}

/// Subscribes the workload's trigger subjects.
pub async fn subscribe(mgr: Arc<WorkloadManager>, w: Arc<Workload>) -> Result<TriggerSet> {
    let v = w.trigger_request();
    let (conn, own_conn) = match &v.trigger_connection {
        Some(tc) if !tc.nats_url.is_empty() => {
            // The node dials only servers it lets workloads reach.
            mgr.nats_targets().check(&tc.nats_url).await.map_err(anyhow::Error::msg)?;
            let c = crate::node::connect_workload_nats(tc, "workload-trigger-subscription").await?;
            (c.clone(), Some(c))
        }
        _ => (mgr.control().clone(), None),
    };
    let group = queue_group(&w.namespace, &w.name, &w.issuer);
    let mut tasks = Vec::new();
    // Calls in flight per function: beyond that the subscription waits (NATS queues for it).
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_IN_FLIGHT));
    for subject in &v.trigger_subjects {
        let mut sub = conn
            .queue_subscribe(subject.clone(), group.clone())
            .await
            .with_context(|| format!("subscribing to trigger subject {subject}"))?;
        let mgr = mgr.clone();
        let w = w.clone();
        let conn = conn.clone();
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let mgr = mgr.clone();
                let w = w.clone();
                let conn = conn.clone();
                tokio::spawn(async move {
                    handle(mgr, w, conn, msg).await;
                    drop(permit);
                });
            }
        }));
    }
    // The subscriptions must be known to the server before DEPLOY answers.
    crate::nats_ext::round_trip(&conn).await.context("registering trigger subscriptions")?;
    Ok(TriggerSet { tasks, own_conn })
}

async fn handle(mgr: Arc<WorkloadManager>, w: Arc<Workload>, conn: async_nats::Client, msg: async_nats::Message) {
    let subject = msg.subject.to_string();
    let started = Instant::now();
    let timeout = Duration::from_millis(mgr.config().function_timeout_ms + 1000);
    let (trigger_cx, internal_cx) = trigger_spans(&w, &subject, &msg);
    let outcome = w.agent().client.trigger(&subject, msg.payload.clone(), timeout, &internal_cx).await;
    if let Ok(reply) = &outcome {
        let span = reply.headers.as_ref().and_then(|h| h.get(nex_api::trace::HEADER_SPAN));
        crate::traces::relayed_call(&internal_cx, span.map(|v| v.as_str()), || call_attrs(&w, &subject));
    }
    drop(internal_cx);
    crate::traces::event(&trigger_cx, "Completed internal request");
    let result = match outcome {
        Ok(reply) => match reply.headers.as_ref().and_then(|h| h.get(HEADER_ERROR)) {
            Some(e) => Err(e.to_string()),
            None => Ok(reply),
        },
        Err(e) => Err(format!("{e:#}")),
    };
    match result {
        Ok(reply) => {
            let ns: u64 = reply
                .headers
                .as_ref()
                .and_then(|h| h.get(HEADER_RUNTIME_NS))
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or_else(|| started.elapsed().as_nanos() as u64);
            if let Some(r) = msg.reply {
                let mut h = async_nats::HeaderMap::new();
                h.insert(HEADER_RUNTIME_NS, ns.to_string().as_str());
                let _ = conn.publish_with_headers(r, h, reply.payload).await;
            }
            report(mgr.events(), &w, &subject, Ok(ns)).await;
            crate::traces::event(&trigger_cx, "published success event");
        }
        Err(e) => {
            crate::traces::error(&trigger_cx, &e);
            if let Some(r) = msg.reply {
                let mut h = async_nats::HeaderMap::new();
                h.insert(HEADER_ERROR, nex_io::header_value(&e).as_str());
                let _ = conn.publish_with_headers(r, h, Bytes::new()).await;
            }
            report(mgr.events(), &w, &subject, Err(e)).await;
        }
    }
}

/// Attributes of a function call's spans.
pub(crate) fn call_attrs(w: &Workload, subject: &str) -> Vec<opentelemetry::KeyValue> {
    use opentelemetry::KeyValue;
    vec![
        KeyValue::new("name", w.name.clone()),
        KeyValue::new("namespace", w.namespace.clone()),
        KeyValue::new("trigger-subject", subject.to_string()),
        KeyValue::new("workload_id", w.id.clone()),
    ]
}

/// `workload-trigger` (under the requester's context when it sent one) and its child
/// `internal request`, whose context travels to the agent.
fn trigger_spans(
    w: &Workload,
    subject: &str,
    msg: &async_nats::Message,
) -> (opentelemetry::Context, opentelemetry::Context) {
    use opentelemetry::trace::SpanKind;
    if !crate::traces::enabled() {
        return (opentelemetry::Context::new(), opentelemetry::Context::new());
    }
    let parent = crate::traces::extract(msg.headers.as_ref());
    let trigger = crate::traces::span("workload-trigger", SpanKind::Server, &parent, call_attrs(w, subject));
    let internal = crate::traces::span("internal request", SpanKind::Client, &trigger, Vec::new());
    (trigger, internal)
}

/// Publishes what one call did: `function_exec_succeeded` and a DEBUG log line with its run
/// time, or `function_exec_failed` and an ERROR line, whether the node relayed the call or the
/// agent answered it itself.
pub async fn report(events: &EventPublisher, w: &Workload, subject: &str, outcome: Result<u64, String>) {
    crate::telemetry::function_call(w, outcome.as_ref().map(|ns| *ns).map_err(|_| ()));
    match outcome {
        Ok(ns) => {
            w.runtime_ns.fetch_add(ns, Ordering::Relaxed);
            events
                .workload_event(
                    &w.namespace,
                    &w.id,
                    event_type::FUNCTION_EXEC_SUCCEEDED,
                    &json!({"workload_name": w.name, "workload_id": w.id, "trigger_subject": subject, "elapsed_nanos": ns, "namespace": w.namespace}),
                )
                .await;
            events
                .log(
                    &w.namespace,
                    &w.name,
                    &w.id,
                    "DEBUG",
                    &format!("Function {} execution succeeded ({ns}ns)", w.name),
                )
                .await;
        }
        Err(e) => {
            events
                .workload_event(
                    &w.namespace,
                    &w.id,
                    event_type::FUNCTION_EXEC_FAILED,
                    &json!({"workload_name": w.name, "workload_id": w.id, "trigger_subject": subject, "namespace": w.namespace, "error": e}),
                )
                .await;
            events.log(&w.namespace, &w.name, &w.id, "ERROR", &format!("Function execution failed: {e}")).await;
        }
    }
}
