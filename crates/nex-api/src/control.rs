//! The control API on the user's NATS (`$NEX.*`): request and reply shapes (`docs/protocol.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Response type strings carried in every envelope.
pub mod response_type {
    /// AUCTION replies.
    pub const AUCTION: &str = "io.nats.nex.v1.auction_response";
    /// INFO replies.
    pub const INFO: &str = "io.nats.nex.v1.info_response";
    /// PING and WPING replies.
    pub const PING: &str = "io.nats.nex.v1.ping_response";
    /// DEPLOY replies.
    pub const RUN: &str = "io.nats.nex.v1.run_response";
    /// STOP replies.
    pub const STOP: &str = "io.nats.nex.v1.stop_response";
    /// LAMEDUCK replies.
    pub const LAMEDUCK: &str = "io.nats.nex.v1.lameduck_response";
}

/// Every control reply: `{"type","data","error"}`.
///
/// Nodes write `data: ""` on failure like Nex 0.2.x; readers accept `data` absent, `""` or an object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Envelope {
    /// A success envelope carrying `data`.
    pub fn ok<T: Serialize>(kind: &str, data: &T) -> Self {
        Envelope {
            kind: kind.to_string(),
            data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
            error: None,
        }
    }

    /// A failure envelope (`data` is `""` as in Nex 0.2.x).
    pub fn fail(kind: &str, error: impl Into<String>) -> Self {
        Envelope { kind: kind.to_string(), data: serde_json::Value::String(String::new()), error: Some(error.into()) }
    }

    /// Serialized bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The error, or `data` decoded as `T`.
    pub fn into_result<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        if let Some(e) = self.error.filter(|e| !e.is_empty()) {
            return Err(e);
        }
        serde_json::from_value(self.data).map_err(|e| format!("malformed reply from node: {e}"))
    }
}

/// Credentials for a connection the node opens on a workload's behalf.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NatsConnectionConfig {
    #[serde(default)]
    pub nats_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_user_jwt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_user_seed: Option<crate::secret::Secret>,
}

/// DEPLOY request body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeployRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(rename = "type")]
    pub workload_type: String,
    pub location: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub essential: bool,
    pub workload_jwt: String,
    #[serde(default)]
    pub environment: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsdomain: Option<String>,
    #[serde(default)]
    pub sender_public_key: String,
    #[serde(default)]
    pub target_node: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trigger_subjects: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_connection: Option<NatsConnectionConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_services: Option<NatsConnectionConfig>,
    /// Host ports forwarded to the workload, `HOST:WORKLOAD` (our addition; nodes that cannot
    /// forward ignore it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
}

/// One forwarded port: connections to `host` on the node reach `workload` in the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    /// The node's port.
    pub host: u16,
    /// The workload's port.
    pub workload: u16,
}

impl PortMapping {
    /// Parses `HOST:WORKLOAD` or a single port used for both.
    pub fn parse(s: &str) -> Result<PortMapping, String> {
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{s:?} is not a port mapping: use HOST:WORKLOAD, e.g. 18080:8080")),
            Ok(n) => Ok(n),
        };
        let (h, w) = s.split_once(':').unwrap_or((s, s));
        Ok(PortMapping { host: port(h)?, workload: port(w)? })
    }
}

impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.workload)
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// DEPLOY reply data.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunResponse {
    pub started: bool,
    pub id: String,
    pub issuer: String,
    pub name: String,
}

/// STOP request body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StopRequest {
    pub workload_id: String,
    pub workload_jwt: String,
    #[serde(default)]
    pub target_node: String,
}

/// STOP reply data.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StopResponse {
    pub stopped: bool,
    pub id: String,
    pub issuer: String,
    pub name: String,
}

/// PING / AUCTION reply data.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PingResponse {
    pub node_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nexus: String,
    pub version: String,
    pub uptime: String,
    #[serde(default)]
    pub target_xkey: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub running_machines: u64,
    /// `v<version> [<commit>] | Built-on: <date>`, as `nex --version` prints it (our addition).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub build: String,
    /// The public fleet xkey the node holds, for deployments' sealed environments (our
    /// addition).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fleet_xkey: String,
}

/// AUCTION request filters; every field optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AuctionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxed: Option<bool>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workload_types: Vec<String>,
}

/// One workload in a WPING reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkloadPingMachineSummary {
    pub id: String,
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub workload_type: String,
}

/// WPING reply data.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkloadPingResponse {
    pub node_id: String,
    #[serde(default)]
    pub target_xkey: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    pub uptime: String,
    #[serde(default)]
    pub running_machines: Vec<WorkloadPingMachineSummary>,
}

/// Host memory in kB, from `/proc/meminfo`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MemoryStat {
    #[serde(rename = "total")]
    pub mem_total: u64,
    #[serde(rename = "free")]
    pub mem_free: u64,
    #[serde(rename = "available")]
    pub mem_available: u64,
}

/// The workload part of an INFO machine entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkloadSummary {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub runtime: String,
    #[serde(rename = "type")]
    pub workload_type: String,
    #[serde(default)]
    pub hash: String,
}

/// One deployed workload in INFO.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineSummary {
    pub id: String,
    pub healthy: bool,
    pub uptime: String,
    #[serde(default)]
    pub namespace: String,
    pub workload: WorkloadSummary,
    /// Host ports forwarded to it (`HOST:WORKLOAD`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
}

/// INFO reply data.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InfoResponse {
    pub version: String,
    pub uptime: String,
    pub public_xkey: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStat>,
    #[serde(default)]
    pub machines: Vec<MachineSummary>,
    #[serde(default)]
    pub supported_workload_types: Vec<String>,
    /// Warm agents waiting for work (0.3 addition).
    #[serde(default)]
    pub available_agents: u64,
    /// Why the node's tier cannot start agents right now, while that lasts (our addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_start_error: Option<String>,
    /// `v<version> [<commit>] | Built-on: <date>` (our addition).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub build: String,
    /// The public fleet xkey the node holds (our addition).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fleet_xkey: String,
}

/// LAMEDUCK reply data.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LameDuckResponse {
    pub node_id: String,
    pub success: bool,
}

/// LAMEDUCK request body. Empty on an open node (as in Nex); `{"jwt": …}` signed by an admin
/// issuer once the node restricts issuers (the delay then comes from the JWT's `nex.delay_ms`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LameDuckRequest {
    /// Drain and exit after this many milliseconds (our addition; unsigned requests only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Generic-claims JWT: `sub` = the node id, signed by an admin issuer, fresh, unused `jti`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
}

/// The `nex.op` claim of a LAMEDUCK token.
pub const LAMEDUCK_OP: &str = "lameduck";

/// Tag keys the node sets itself.
pub mod tags {
    /// Operating system of the node.
    pub const OS: &str = "nex.os";
    /// CPU architecture of the node.
    pub const ARCH: &str = "nex.arch";
    /// Number of CPUs.
    pub const CPU_COUNT: &str = "nex.cpucount";
    /// `true` when workloads run without a sandbox (process tier).
    pub const UNSAFE: &str = "nex.unsafe";
    /// `true` once the node is in lame duck mode.
    pub const LAMEDUCK: &str = "nex.lameduck";
    /// The isolation tier: `process`, `container` or `microvm`.
    pub const SANDBOX: &str = "nex.sandbox";
    /// Human-friendly node name.
    pub const NODE_NAME: &str = "node_name";
    /// Where the node's metrics are (`http://…/metrics` or `file ./metrics.log`), when exported.
    pub const METRICS: &str = "nex.metrics";
    /// Where the node's traces go (`./traces.log` or the OTLP endpoint), when exported.
    pub const TRACES: &str = "nex.traces";
    /// How sandboxed workloads reach the network: `egress`, `isolated`, or `host` (process tier).
    pub const NETWORK: &str = "nex.network";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_envelope_has_empty_string_data() {
        let e = Envelope::fail(response_type::RUN, "nope");
        let v: serde_json::Value = serde_json::from_slice(&e.to_bytes()).unwrap();
        assert_eq!(v["data"], "");
        assert_eq!(v["error"], "nope");
        assert_eq!(v["type"], "io.nats.nex.v1.run_response");
    }

    #[test]
    fn deploy_request_ignores_unknown_fields_and_omits_empty_ones() {
        let r: DeployRequest =
            serde_json::from_str(r#"{"type":"native","location":"nats://B/k","workload_jwt":"x","bogus":1}"#).unwrap();
        assert_eq!(r.workload_type, "native");
        let s = serde_json::to_string(&r).unwrap();
        assert!(!s.contains("argv") && !s.contains("essential") && !s.contains("trigger"));
    }
}
