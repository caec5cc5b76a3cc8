//! CloudEvents 1.0 (JSON structured mode) and log records published by nodes (`docs/protocol.md`).

use serde::{Deserialize, Serialize};

/// Event type names.
pub mod event_type {
    /// Node finished starting.
    pub const NODE_STARTED: &str = "node_started";
    /// Node is shutting down.
    pub const NODE_STOPPED: &str = "node_stopped";
    /// Every 30 s.
    pub const HEARTBEAT: &str = "heartbeat";
    /// First LAMEDUCK.
    pub const NODE_ENTERED_LAMEDUCK: &str = "node_entered_lameduck";
    /// A workload is running.
    pub const WORKLOAD_DEPLOYED: &str = "workload_deployed";
    /// A workload ended, for whatever reason.
    pub const WORKLOAD_UNDEPLOYED: &str = "workload_undeployed";
    /// A function call succeeded.
    pub const FUNCTION_EXEC_SUCCEEDED: &str = "function_exec_succeeded";
    /// A function call failed.
    pub const FUNCTION_EXEC_FAILED: &str = "function_exec_failed";
    /// A deployment revision was written (published by `nex apply`).
    pub const DEPLOYMENT_APPLIED: &str = "deployment_applied";
    /// A node took a replica slot that had no live owner.
    pub const REPLICA_CLAIMED: &str = "replica_claimed";
    /// A replica moved from one live node to another (start new, then stop old).
    pub const REPLICA_MOVED: &str = "replica_moved";
    /// A deployment has fewer eligible nodes than it wants (spread relaxed or slots unowned).
    pub const DEPLOYMENT_DEGRADED: &str = "deployment_degraded";
    /// Every replica runs the new revision.
    pub const ROLLOUT_COMPLETED: &str = "rollout_completed";
    /// A replica of the new revision would not start: the roll-out stopped.
    pub const ROLLOUT_FAILED: &str = "rollout_failed";
}

/// A CloudEvent as nex publishes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub datacontenttype: Option<String>,
    #[serde(default)]
    pub time: Option<String>,
    /// Extension attribute carried by workload events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl CloudEvent {
    /// A new event with a random id and the current time.
    pub fn new(source: impl Into<String>, event_type: &str, data: serde_json::Value) -> Self {
        CloudEvent {
            specversion: "1.0".into(),
            id: uuid::Uuid::new_v4().to_string(),
            source: source.into(),
            event_type: event_type.to_string(),
            datacontenttype: Some("application/json".into()),
            time: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)),
            namespace: None,
            data,
        }
    }
}

/// A log line on `$NEX.logs.>`: `{"text","level","id"}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LogRecord {
    pub text: String,
    pub level: String,
    pub id: String,
}
