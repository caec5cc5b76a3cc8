//! The `kv` host service: the workload's own key/value bucket.

use bytes::Bytes;
use futures::TryStreamExt;
use serde_json::json;

use super::{bucket_settings, err, ok, Answer};
use crate::config::NodeConfig;
use crate::workloads::Workload;

/// Answers one call on the workload's bucket (created on first use when `jit_provision`).
pub(super) async fn call(
    cfg: &NodeConfig,
    conn: &async_nats::Client,
    w: &Workload,
    method: &str,
    key: Option<String>,
    body: Bytes,
) -> Answer {
    if !matches!(method, "get" | "set" | "delete" | "keys") {
        return err(400, "Received invalid host services RPC request");
    }
    let b = bucket_settings(cfg, "kv", "kv", w);
    let js = async_nats::jetstream::new(conn.clone());
    let store = match js.get_key_value(&b.name).await {
        Ok(s) => s,
        Err(_) if b.jit => match js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: b.name.clone(),
                max_bytes: b.max_bytes,
                history: 1,
                ..Default::default()
            })
            .await
        {
            Ok(s) => s,
            Err(e) => return err(500, format!("could not resolve k/v store {}: {e}", b.name)),
        },
        Err(e) => return err(500, format!("could not resolve k/v store {}: {e}", b.name)),
    };
    if method == "keys" {
        return match store.keys().await {
            Ok(keys) => match keys.try_collect::<Vec<String>>().await {
                Ok(k) => ok(serde_json::to_vec(&k).unwrap_or_default()),
                Err(e) => err(500, format!("failed to resolve keys: {e}")),
            },
            Err(e) => err(500, format!("failed to resolve keys: {e}")),
        };
    }
    let Some(key) = key else { return err(400, "key is required") };
    match method {
        "get" => match store.get(&key).await {
            Ok(Some(v)) => ok(v.to_vec()),
            Ok(None) => err(404, format!("failed to get value for key {key}: no such key")),
            Err(e) => err(500, format!("failed to get value for key {key}: {e}")),
        },
        "set" => match store.put(&key, body).await {
            Ok(rev) => ok(serde_json::to_vec(&json!({"revision": rev, "success": true})).unwrap_or_default()),
            Err(e) => err(500, format!("failed to write value for key {key}: {e}")),
        },
        _ => match store.delete(&key).await {
            Ok(()) => ok(br#"{"success":true}"#.to_vec()),
            Err(e) => err(500, format!("failed to delete key {key}: {e}")),
        },
    }
}
