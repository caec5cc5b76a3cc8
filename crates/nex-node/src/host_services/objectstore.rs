//! The `objectstore` host service: the workload's own object store.

use bytes::Bytes;
use futures::TryStreamExt;

use super::{bucket_settings, err, ok, Answer};
use crate::config::NodeConfig;
use crate::workloads::Workload;

/// Answers one call on the workload's bucket (created on first use when `jit_provision`).
pub(super) async fn call(
    cfg: &NodeConfig,
    conn: &async_nats::Client,
    w: &Workload,
    method: &str,
    name: Option<String>,
    body: Bytes,
) -> Answer {
    if !matches!(method, "get" | "put" | "delete" | "list") {
        return err(400, "Received invalid host services RPC request");
    }
    let b = bucket_settings(cfg, "objectstore", "obj", w);
    let js = async_nats::jetstream::new(conn.clone());
    let store = match js.get_object_store(&b.name).await {
        Ok(s) => s,
        Err(_) if b.jit => match js
            .create_object_store(async_nats::jetstream::object_store::Config {
                bucket: b.name.clone(),
                max_bytes: b.max_bytes,
                ..Default::default()
            })
            .await
        {
            Ok(s) => s,
            Err(e) => return err(500, format!("unable to resolve object store {}: {e}", b.name)),
        },
        Err(e) => return err(500, format!("unable to resolve object store {}: {e}", b.name)),
    };
    if method == "list" {
        return match store.list().await {
            Ok(list) => match list.try_collect::<Vec<_>>().await {
                Ok(items) => ok(serde_json::to_vec(&items).unwrap_or_default()),
                Err(e) => err(500, format!("failed to list objects: {e}")),
            },
            Err(e) => err(500, format!("failed to list objects: {e}")),
        };
    }
    let Some(name) = name else { return err(400, "name is required") };
    match method {
        "get" => match store.get(&name).await {
            Ok(mut o) => {
                let mut out = Vec::new();
                match tokio::io::AsyncReadExt::read_to_end(&mut o, &mut out).await {
                    Ok(_) => ok(out),
                    Err(e) => err(500, format!("failed to get object {name}: {e}")),
                }
            }
            Err(e) => err(404, format!("failed to get object {name}: {e}")),
        },
        "put" => {
            let mut data = &body[..];
            match store.put(name.as_str(), &mut data).await {
                Ok(info) => ok(serde_json::to_vec(&info).unwrap_or_default()),
                Err(e) => err(500, format!("failed to put object {name}: {e}")),
            }
        }
        _ => match store.delete(&name).await {
            Ok(()) => ok(br#"{"success":true}"#.to_vec()),
            Err(e) => err(500, format!("failed to delete object {name}: {e}")),
        },
    }
}
