//! Publishing events (`$NEX.events.{ns}.{type}`) and log lines (`$NEX.logs.{ns}.{node}.{name}.{id}`)
//! on the control connection.

use serde::Serialize;

use nex_api::events::{CloudEvent, LogRecord};
use nex_api::subjects::control;

/// Publishes what a node has to say about itself and its workloads.
#[derive(Debug, Clone)]
pub struct EventPublisher {
    conn: async_nats::Client,
    node_id: String,
}

impl EventPublisher {
    /// A publisher for node `node_id` on `conn`.
    pub fn new(conn: async_nats::Client, node_id: String) -> Self {
        EventPublisher { conn, node_id }
    }

    /// Publishes a node-level event in the `system` namespace.
    pub async fn node_event<T: Serialize>(&self, event_type: &str, data: &T) {
        let ev = CloudEvent::new(self.node_id.clone(), event_type, to_value(data));
        self.send(nex_api::SYSTEM_NAMESPACE, ev).await;
    }

    /// Publishes a workload event in namespace `ns` (with the `namespace` extension).
    pub async fn workload_event<T: Serialize>(&self, ns: &str, workload_id: &str, event_type: &str, data: &T) {
        let mut ev = CloudEvent::new(format!("{}-{}", self.node_id, workload_id), event_type, to_value(data));
        ev.namespace = Some(ns.to_string());
        self.send(ns, ev).await;
    }

    /// Publishes a deployment event in namespace `ns` (with the `namespace` extension).
    pub async fn deployment_event<T: Serialize>(&self, ns: &str, event_type: &str, data: &T) {
        let mut ev = CloudEvent::new(self.node_id.clone(), event_type, to_value(data));
        ev.namespace = Some(ns.to_string());
        self.send(ns, ev).await;
    }

    async fn send(&self, ns: &str, ev: CloudEvent) {
        let subject = control::events(ns, &ev.event_type);
        match serde_json::to_vec(&ev) {
            Ok(body) => {
                if let Err(e) = self.conn.publish(subject, body.into()).await {
                    tracing::warn!(error = %e, "could not publish event");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode event"),
        }
    }

    /// Publishes one log line of a workload.
    pub async fn log(&self, ns: &str, workload_name: &str, workload_id: &str, level: &str, text: &str) {
        let rec = LogRecord { text: text.to_string(), level: level.to_string(), id: workload_id.to_string() };
        let subject = control::logs(ns, &self.node_id, workload_name, workload_id);
        if let Ok(body) = serde_json::to_vec(&rec) {
            let _ = self.conn.publish(subject, body.into()).await;
        }
    }

    /// Waits (at most 2 s: the server may be gone) until everything published so far has left.
    pub async fn flush(&self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.conn.flush()).await;
    }
}

fn to_value<T: Serialize>(data: &T) -> serde_json::Value {
    serde_json::to_value(data).unwrap_or(serde_json::Value::Null)
}
