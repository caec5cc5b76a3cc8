//! The `messaging` host service: publish and request on ordinary subjects, never on the
//! subjects of NATS itself, JetStream, KV and object stores, service discovery, reply inboxes or
//! nex, nor on what the operator denies (`config.deny_subjects`).

use std::time::Duration;

use bytes::Bytes;

use super::{err, ok, service_config, Answer};
use crate::config::NodeConfig;

/// What each reserved subject space is, for the refusal message.
fn reserved_reason(entry: &str) -> &'static str {
    match entry {
        "$SYS.>" => "the NATS system account",
        "$JS.>" => "the JetStream API",
        "$NEX.>" => "the nex control API",
        "$KV.>" => "key/value buckets",
        "$O.>" => "object stores",
        "$SRV.>" => "service discovery",
        "_INBOX.>" => "reply inboxes",
        _ => "reserved subjects",
    }
}

/// Why a function may not use `subject`, if it may not.
pub fn refusal(cfg: &NodeConfig, subject: &str) -> Option<String> {
    if let Some(r) = nex_api::subjects::first_overlap(subject, nex_api::subjects::RESERVED_SUBJECTS) {
        return Some(format!(
            "subject {subject} is refused: it is in {r} ({}), which host services never touch on a function's behalf",
            reserved_reason(r)
        ));
    }
    let denied = service_config(cfg, "messaging").get("deny_subjects").and_then(|v| v.as_array()).cloned();
    for d in denied.unwrap_or_default().iter().filter_map(|v| v.as_str()) {
        if nex_api::subjects::subjects_overlap(subject, d) {
            return Some(format!(
                "subject {subject} is refused: it overlaps {d}, which this node denies (host_services.services.messaging.config.deny_subjects)"
            ));
        }
    }
    None
}

/// Answers one `publish` or `request`.
pub(super) async fn call(
    cfg: &NodeConfig,
    conn: &async_nats::Client,
    method: &str,
    subject: Option<String>,
    body: Bytes,
) -> Answer {
    let c = service_config(cfg, "messaging");
    let timeout = Duration::from_millis(c.get("request_timeout_ms").and_then(|v| v.as_u64()).unwrap_or(750));
    match method {
        "publish" | "request" => {}
        "requestMany" => return err(500, "not yet supported"),
        _ => return err(400, "unknown method"),
    }
    let Some(subject) = subject else { return err(400, "subject is required") };
    if !nex_api::subjects::is_valid_publish_subject(&subject) {
        return err(400, format!("invalid subject {subject:?}: use dot-separated tokens without wildcards"));
    }
    if let Some(why) = refusal(cfg, &subject) {
        return err(403, why);
    }
    if method == "publish" {
        return match conn.publish(subject.clone(), body).await {
            Ok(()) => {
                let _ = conn.flush().await;
                ok(br#"{"success":true}"#.to_vec())
            }
            Err(e) => err(500, format!("failed to publish message on {subject}: {e}")),
        };
    }
    let req = async_nats::Request::new().payload(body).timeout(Some(timeout));
    match conn.send_request(subject.clone(), req).await {
        Ok(m) => ok(m.payload.to_vec()),
        Err(e) => err(500, format!("failed to send request on {subject}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_and_denied_subjects_are_refused_with_the_rule() {
        let cfg = NodeConfig::from_json(
            r#"{"host_services":{"services":{"messaging":{"config":{"deny_subjects":["billing.>"]}}}}}"#,
        )
        .unwrap();
        for (s, rule) in [
            ("$NEX.LAMEDUCK.NABC", "$NEX.>"),
            ("$NEX.PING", "$NEX.>"),
            ("$JS.API.INFO", "$JS.>"),
            ("$JS.API.DIRECT.GET.KV_victim.secret", "$JS.>"),
            ("$KV.victim.secret", "$KV.>"),
            ("$SYS.REQ.SERVER.PING", "$SYS.>"),
            ("$SRV.PING", "$SRV.>"),
            ("$O.bucket.M.x", "$O.>"),
            ("_INBOX.stolen", "_INBOX.>"),
            ("billing.charge", "billing.>"),
        ] {
            let why = refusal(&cfg, s).unwrap_or_else(|| panic!("{s} allowed"));
            assert!(why.contains(rule), "{s}: {why}");
        }
        assert!(refusal(&cfg, "hello.world").is_none());
    }
}
