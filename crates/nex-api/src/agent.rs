//! The node ↔ agent protocol spoken on the node's internal NATS server (`docs/protocol.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::control::NatsConnectionConfig;

/// Header naming the subject a trigger message really arrived on.
pub const HEADER_TRIGGER_SUBJECT: &str = "x-nex-trigger-subject";
/// Header with the function's run time in nanoseconds.
pub const HEADER_RUNTIME_NS: &str = "x-nex-runtime-ns";
/// Host-service result code (200 on success).
pub const HEADER_HS_CODE: &str = "x-nex-hs-code";
/// Host-service result message: `OK`, or the real error message.
pub const HEADER_HS_MSG: &str = "x-nex-hs-msg";
/// Header carrying a function failure's reason on the error reply to the requester.
pub const HEADER_ERROR: &str = "x-nex-error";

/// Environment variables through which a process-tier agent gets its metadata.
pub mod env {
    /// `false` in the process tier.
    pub const SANDBOX: &str = "NEX_SANDBOX";
    /// The workload (agent) id.
    pub const WORKLOAD_ID: &str = "NEX_WORKLOADID";
    /// Host of the internal NATS server.
    pub const NODE_NATS_HOST: &str = "NEX_NODE_NATS_HOST";
    /// Port of the internal NATS server.
    pub const NODE_NATS_PORT: &str = "NEX_NODE_NATS_PORT";
    /// The agent's nkey user seed.
    pub const NODE_NATS_NKEY_SEED: &str = "NEX_NODE_NATS_NKEY_SEED";
    /// Sandboxed tiers: the uid (and gid) a native workload runs as, never the agent's own.
    pub const WORKLOAD_UID: &str = "NEX_WORKLOAD_UID";
    /// Sandboxed tiers: the workload's own writable directory (its working directory).
    pub const WORKLOAD_DIR: &str = "NEX_WORKLOAD_DIR";
}

/// Name of the per-workload artifact cache bucket (in the workload's internal account).
pub const CACHE_BUCKET: &str = "NEXCACHE";
/// Object key of the artifact in the cache bucket.
pub const CACHE_KEY: &str = "workload";

/// The uid and gid a native workload runs as inside a container or guest: unprivileged, so the
/// agent beside it (root of the sandbox) and its secrets stay out of reach.
pub const WORKLOAD_UID: u32 = 1000;

/// What an agent needs to find its node (Nex's `MachineMetadata`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineMetadata {
    pub vmid: String,
    pub node_nats_host: String,
    pub node_nats_port: u16,
    #[serde(default)]
    pub node_nats_nkey: crate::secret::Secret,
    #[serde(default)]
    pub message: String,
}

/// What a micro-VM guest's agent prints on its serial console when it is ready for
/// [`GuestMetadata`]; the node answers with one JSON line on the same console.
pub const METADATA_PROMPT: &str = "nex-agent: metadata?";

/// The metadata a micro-VM guest receives over its serial console (never on a command line).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GuestMetadata {
    /// Workload (agent) id.
    pub id: String,
    /// The guest's address on the node's agent bridge.
    pub ip: String,
    /// Prefix length of that network.
    pub prefix_len: u8,
    /// Internal NATS host (the bridge address of the node).
    pub node_nats_host: String,
    /// Internal NATS port.
    pub node_nats_port: u16,
    /// The agent's nkey user seed.
    pub nkey_seed: crate::secret::Secret,
    /// Grace period between SIGTERM and SIGKILL of the workload.
    #[serde(default)]
    pub stop_grace_ms: u64,
    /// `NEX_AGENT_LOG` for the agent.
    #[serde(default)]
    pub log: String,
    /// Default gateway, when the guest may reach beyond the node (egress mode).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    /// Resolvers for the guest's `/etc/resolv.conf`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

/// `hostint.<id>.handshake` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HandshakeRequest {
    pub id: String,
    pub start_time: String,
    #[serde(default)]
    pub message: String,
}

/// `agentint.<id>.deploy` body: the workload after the node validated it (plaintext environment;
/// `Debug` prints its keys only).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentDeployRequest {
    #[serde(default)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub essential: bool,
    #[serde(default)]
    pub hash: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub retried_at: Option<String>,
    #[serde(default)]
    pub retry_count: Option<u32>,
    #[serde(default)]
    pub total_bytes: u64,
    #[serde(default)]
    pub trigger_subjects: Vec<String>,
    #[serde(default)]
    pub trigger_connection: Option<NatsConnectionConfig>,
    #[serde(default)]
    pub workload_name: String,
    #[serde(default)]
    pub workload_type: String,
    #[serde(default)]
    pub host_services: Option<NatsConnectionConfig>,
    /// Per-call limits for functions (our addition; absent means the agent's defaults).
    #[serde(default)]
    pub function_limits: Option<FunctionLimits>,
    /// Where the node already put the artifact, when agent and node share a file system.
    #[serde(default)]
    pub local_path: Option<String>,
    /// When set, the agent subscribes to the trigger subjects itself on this connection and
    /// answers requesters directly (our addition; absent: the node relays triggers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_triggers: Option<DirectTriggers>,
}

impl std::fmt::Debug for AgentDeployRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentDeployRequest")
            .field("workload_name", &self.workload_name)
            .field("workload_type", &self.workload_type)
            .field("namespace", &self.namespace)
            .field("argv", &self.argv)
            .field("environment", &crate::env::redacted(&self.environment))
            .field("hash", &self.hash)
            .field("total_bytes", &self.total_bytes)
            .field("essential", &self.essential)
            .field("trigger_subjects", &self.trigger_subjects)
            .field("trigger_connection", &self.trigger_connection)
            .field("host_services", &self.host_services)
            .field("direct_triggers", &self.direct_triggers)
            .field("local_path", &self.local_path)
            .finish_non_exhaustive()
    }
}

/// How a function's agent holds its own trigger subscriptions: the user's NATS as the agent
/// reaches it, and the queue group every instance of the function shares.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DirectTriggers {
    /// URL and, when the request supplied them, the user JWT and seed.
    pub connection: NatsConnectionConfig,
    /// Queue group of the trigger subscriptions.
    pub queue_group: String,
    /// The node records traces: time every call and report its span, also for requesters that
    /// sent no `traceparent`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub traces: bool,
}

/// What an agent holding its own triggers reports after each call, in batches on
/// `hostint.<id>.execs`; the node publishes the events and logs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FunctionExec {
    /// The subject the trigger message arrived on.
    pub trigger_subject: String,
    /// Run time of the call.
    #[serde(default)]
    pub elapsed_nanos: u64,
    /// Why the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The call's span, when it was traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<crate::trace::CallSpan>,
}

/// Limits applied to every function call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FunctionLimits {
    /// Wall-clock deadline of one call.
    pub timeout_ms: u64,
    /// Memory a call may use (linear memory for wasm, heap for JS).
    pub memory_mib: u64,
}

impl Default for FunctionLimits {
    fn default() -> Self {
        FunctionLimits { timeout_ms: 5000, memory_mib: 64 }
    }
}

impl AgentDeployRequest {
    /// The agent's own checks of a deploy request, as Nex's agent makes them; errors joined by
    /// newlines.
    pub fn validate(&self) -> Result<(), String> {
        let mut errs = Vec::new();
        if self.namespace.is_empty() {
            errs.push("namespace is required");
        }
        if self.workload_name.is_empty() {
            errs.push("workload name is required");
        }
        let t = crate::workload_type::canonical(&self.workload_type);
        if self.essential && t != crate::workload_type::NATIVE {
            errs.push("essential flag is not supported for workload type");
        }
        if self.hash.is_empty() {
            errs.push("hash is required");
        }
        if self.total_bytes == 0 {
            errs.push("total bytes is required");
        }
        if self.workload_type.is_empty() {
            errs.push("workload type is required");
        }
        if crate::workload_type::is_function(&t) && self.trigger_subjects.is_empty() {
            errs.push("at least one trigger subject is required for this workload type");
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("\n"))
        }
    }
}

/// `agentint.<id>.deploy` reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeployResponse {
    pub accepted: bool,
    #[serde(default)]
    pub message: Option<String>,
}

/// Levels of agent log entries (the agent's own numbering, as in Nex; `as_str` names them).
pub mod level {
    /// Errors, and workload stderr.
    pub const ERROR: i32 = 2;
    /// Warnings.
    pub const WARN: i32 = 3;
    /// Information, and workload stdout.
    pub const INFO: i32 = 4;
    /// Debug detail.
    pub const DEBUG: i32 = 5;

    /// The slog-style string used on `$NEX.logs.>` for an agent level.
    pub fn as_str(level: i32) -> &'static str {
        match level {
            i32::MIN..=ERROR => "ERROR",
            WARN => "WARN",
            INFO => "INFO",
            _ => "DEBUG",
        }
    }
}

/// `hostint.<id>.logs` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LogEntry {
    pub source: String,
    #[serde(default)]
    pub level: i32,
    pub text: String,
}

/// Data of the agent's `workload_deployed` / `workload_undeployed` events.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkloadStatusEvent {
    pub workload_name: String,
    #[serde(default)]
    pub code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
