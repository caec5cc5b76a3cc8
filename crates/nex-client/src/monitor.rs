//! Following the event and log streams, `$NEX.events.>` and `$NEX.logs.>` (`docs/protocol.md`).

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use nex_api::events::{CloudEvent, LogRecord};

use crate::ClientError;

/// An event with the namespace and type taken from its subject.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmittedEvent {
    /// The CloudEvent.
    #[serde(flatten)]
    pub event: CloudEvent,
    /// Token 3 of the subject.
    #[serde(rename = "namespace")]
    pub subject_namespace: String,
    /// Token 4 of the subject.
    pub event_type: String,
}

/// A log line with its routing taken from the subject.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmittedLog {
    /// Token 3.
    pub namespace: String,
    /// Token 4.
    pub node_id: String,
    /// Token 5 (the workload name).
    pub workload_name: String,
    /// Token 6 (the workload id).
    pub workload_id: String,
    /// When this client received it (RFC 3339).
    pub timestamp: String,
    /// The record.
    #[serde(flatten)]
    pub log: LogRecord,
}

/// Follows `$NEX.events.{ns}.{type}` (`*` for any).
pub async fn events(
    nc: &async_nats::Client,
    ns: &str,
    event_type: &str,
) -> Result<impl Stream<Item = EmittedEvent>, ClientError> {
    let sub =
        nc.subscribe(format!("$NEX.events.{ns}.{event_type}")).await.map_err(|e| ClientError::Nats(e.to_string()))?;
    Ok(sub.filter_map(|m| async move {
        let toks: Vec<&str> = m.subject.split('.').collect();
        if toks.len() != 4 {
            return None;
        }
        let event: CloudEvent = serde_json::from_slice(&m.payload).ok()?;
        Some(EmittedEvent { event, subject_namespace: toks[2].to_string(), event_type: toks[3].to_string() })
    }))
}

/// Follows `$NEX.logs.{ns}.{node}.{workload_name}.{workload_id}` (`*` for any).
pub async fn logs(
    nc: &async_nats::Client,
    ns: &str,
    node: &str,
    workload_name: &str,
    workload_id: &str,
) -> Result<impl Stream<Item = EmittedLog>, ClientError> {
    let sub = nc
        .subscribe(format!("$NEX.logs.{ns}.{node}.{workload_name}.{workload_id}"))
        .await
        .map_err(|e| ClientError::Nats(e.to_string()))?;
    Ok(sub.filter_map(|m| async move {
        let toks: Vec<&str> = m.subject.split('.').collect();
        if toks.len() != 6 {
            return None;
        }
        let log: LogRecord = serde_json::from_slice(&m.payload).ok()?;
        Some(EmittedLog {
            namespace: toks[2].to_string(),
            node_id: toks[3].to_string(),
            workload_name: toks[4].to_string(),
            workload_id: toks[5].to_string(),
            timestamp: chrono_now(),
            log,
        })
    }))
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
