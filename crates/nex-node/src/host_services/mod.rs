//! Host services: functions call `kv`, `messaging`, `objectstore` and `http` through their agent
//! on `hostint.<id>.rpc.<ns>.<workload>.<service>.<method>`; the node answers with
//! `x-nex-hs-code` / `x-nex-hs-msg`, the latter holding the real error message, not `OK`
//! (`docs/protocol.md`).
//!
//! Every call acts with the workload's authority, never the node's: only function workloads are
//! served; data lives in buckets named after the workload's tenant (namespace, name and issuer);
//! messaging stays off internal subjects ([`messaging`]); http stays off the host's and the
//! private networks ([`http`]); and when the operator configures a host-services connection,
//! every call goes through it.

pub mod http;
mod kv;
mod messaging;
mod objectstore;

use nex_api::agent::{HEADER_HS_CODE, HEADER_HS_MSG};
use nex_api::workload_type;

use crate::config::NodeConfig;
use crate::workloads::Workload;

/// Why a host-service call failed: the code and message the agent receives in
/// `x-nex-hs-code` / `x-nex-hs-msg` (400 bad request, 403 refused, 404 unknown, 500 failed, 503 busy).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct HostServiceError {
    /// The code.
    pub code: u16,
    /// What went wrong, for the function's author.
    pub message: String,
}

/// A service's answer: the body, or why there is none.
pub type Answer = Result<Vec<u8>, HostServiceError>;

fn ok(body: Vec<u8>) -> Answer {
    Ok(body)
}

fn fail(code: u16, msg: impl Into<String>) -> HostServiceError {
    HostServiceError { code, message: msg.into() }
}

fn err(code: u16, msg: impl Into<String>) -> Answer {
    Err(fail(code, msg))
}

/// Answers one host-service request from workload `w`'s agent.
pub async fn handle(
    cfg: &NodeConfig,
    conn: &async_nats::Client,
    agent_conn: &async_nats::Client,
    w: &Workload,
    msg: async_nats::Message,
) {
    let Some(reply) = msg.reply.clone() else { return };
    // Only known names become a metric label or span attribute: an agent cannot grow the set.
    let service = msg.subject.split('.').nth(5).unwrap_or_default();
    let service = crate::config::HOST_SERVICES.iter().find(|s| **s == service).copied().unwrap_or("unknown");
    let cx = call_span(w, service, msg.subject.split('.').nth(6).unwrap_or_default(), &msg);
    crate::traces::event(&cx, "RPC Request Began");
    let (code, text, body) = match answer(cfg, conn, w, &msg).await {
        Ok(body) => (200, "OK".to_string(), body),
        Err(e) => {
            crate::traces::error(&cx, &e.message);
            (e.code, e.message, Vec::new())
        }
    };
    crate::traces::event(&cx, "RPC Request Completed");
    drop(cx);
    crate::telemetry::host_service_call(w, service, code);
    let mut h = async_nats::HeaderMap::new();
    h.insert(HEADER_HS_CODE, code.to_string().as_str());
    h.insert(HEADER_HS_MSG, nex_io::header_value(&text).as_str());
    let _ = agent_conn.publish_with_headers(reply, h, body.into()).await;
}

/// `host services call`, under the context the agent sent (the function call's span).
fn call_span(w: &Workload, service: &'static str, method: &str, msg: &async_nats::Message) -> opentelemetry::Context {
    use opentelemetry::KeyValue;
    if !crate::traces::enabled() {
        return opentelemetry::Context::new();
    }
    let parent = crate::traces::extract(msg.headers.as_ref());
    // The method is the agent's word: bounded, as any attribute from an untrusted source.
    let method: String = method.chars().take(64).collect();
    let attrs = vec![
        KeyValue::new("workload_id", w.id.clone()),
        KeyValue::new("service", service),
        KeyValue::new("method", method),
    ];
    crate::traces::span("host services call", opentelemetry::trace::SpanKind::Client, &parent, attrs)
}

async fn answer(cfg: &NodeConfig, conn: &async_nats::Client, w: &Workload, msg: &async_nats::Message) -> Answer {
    if !workload_type::is_function(&w.workload_type) {
        return err(
            403,
            format!("host services are offered to function workloads only, not to {} workloads", w.workload_type),
        );
    }
    let toks: Vec<&str> = msg.subject.split('.').collect();
    if toks.len() != 7 {
        return err(400, "Received invalid host services RPC request");
    }
    // The namespace and name tokens are the agent's claim; the node acts on the workload it
    // knows by the agent's id, whatever they say.
    let (service, method) = (toks[5], toks[6]);
    let header = |k: &str| msg.headers.as_ref().and_then(|h| h.get(k)).map(|v| v.to_string()).filter(|v| !v.is_empty());
    if !crate::config::HOST_SERVICES.contains(&service) || !cfg.host_service_enabled(service) {
        return err(404, format!("No such host service: {service}"));
    }
    let body = msg.payload.clone();
    match service {
        "kv" => kv::call(cfg, conn, w, method, header("x-keyvalue-key"), body).await,
        "messaging" => messaging::call(cfg, conn, method, header("x-subject"), body).await,
        "objectstore" => objectstore::call(cfg, conn, w, method, header("x-object-name"), body).await,
        _ => http::call(cfg, method, header("x-http-url"), body.to_vec()).await,
    }
}

fn service_config(cfg: &NodeConfig, service: &str) -> serde_json::Value {
    cfg.host_services.services.get(service).and_then(|s| s.config.clone()).unwrap_or(serde_json::Value::Null)
}

/// Longest piece of a namespace or workload name that goes into a bucket name (the tenant hash
/// keeps shortened names apart).
const MAX_NAME_PART: usize = 32;

/// A namespace or name as a piece of a bucket name: `[A-Za-z0-9_-]` only, shortened.
fn bucket_part(s: &str) -> String {
    s.chars()
        .take(MAX_NAME_PART)
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
        .collect()
}

/// Bucket name from a template: `${namespace}`, `${workload_name}` and `${tenant}` (the
/// workload's tenant id) are replaced, case-insensitively.
pub fn bucket_name(template: &str, ns: &str, workload: &str, tenant: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        match after.find('}') {
            Some(j) => {
                let var = &after[2..j];
                if var.eq_ignore_ascii_case("namespace") {
                    out.push_str(&bucket_part(ns));
                } else if var.eq_ignore_ascii_case("workload_name") {
                    out.push_str(&bucket_part(workload));
                } else if var.eq_ignore_ascii_case("tenant") {
                    out.push_str(tenant);
                } else {
                    out.push_str(&after[..=j]);
                }
                rest = &after[j + 1..];
            }
            None => {
                out.push_str(after);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The default bucket template of a service: readable, and unique per tenant.
pub fn default_bucket_template(suffix: &str) -> String {
    format!("hs_${{namespace}}_${{workload_name}}_${{tenant}}_{suffix}")
}

struct BucketSettings {
    name: String,
    max_bytes: i64,
    jit: bool,
}

fn bucket_settings(cfg: &NodeConfig, service: &str, suffix: &str, w: &Workload) -> BucketSettings {
    let c = service_config(cfg, service);
    let template = c
        .get("bucket_name")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| default_bucket_template(suffix));
    BucketSettings {
        name: bucket_name(&template, &w.namespace, &w.name, &w.tenant),
        max_bytes: c.get("max_bytes").and_then(|v| v.as_i64()).filter(|v| *v > 0).unwrap_or(524_288),
        jit: c.get("jit_provision").and_then(|v| v.as_bool()).unwrap_or(true),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bucket_templates() {
        let t = "0123456789abcdef";
        assert_eq!(
            super::bucket_name(&super::default_bucket_template("kv"), "default", "kvjs", t),
            "hs_default_kvjs_0123456789abcdef_kv"
        );
        assert_eq!(
            super::bucket_name("hs_${namespace}_${workload_name}_kv", "default", "kvjs", t),
            "hs_default_kvjs_kv"
        );
        assert_eq!(super::bucket_name("X_${NAMESPACE}_${Workload_Name}", "a", "b", t), "X_a_b");
        // Characters a bucket name cannot hold become '-'; long parts are shortened.
        assert_eq!(super::bucket_name("${namespace}", "a$b", "x", t), "a-b");
        assert_eq!(super::bucket_name("${workload_name}", "n", &"w".repeat(100), t).len(), 32);
    }
}
