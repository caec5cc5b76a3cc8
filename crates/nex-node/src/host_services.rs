//! Host services (REFERENCE §5.5 with W12): functions call `kv`, `messaging`, `objectstore` and
//! `http` through their agent on `hostint.<id>.rpc.<ns>.<workload>.<service>.<method>`; the node
//! answers on the workload's host-services connection with `x-nex-hs-code` / `x-nex-hs-msg`.

use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use serde_json::json;

use nex_api::agent::{HEADER_HS_CODE, HEADER_HS_MSG};

use crate::config::NodeConfig;
use crate::workloads::Workload;

/// A service's answer: code, message, body.
pub type Answer = (u16, String, Vec<u8>);

fn ok(body: Vec<u8>) -> Answer {
    (200, "OK".into(), body)
}

fn err(code: u16, msg: impl Into<String>) -> Answer {
    (code, msg.into(), Vec::new())
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
    let toks: Vec<&str> = msg.subject.split('.').collect();
    let (code, text, body) = if toks.len() != 7 {
        err(400, "Received invalid host services RPC request")
    } else {
        let (service, method) = (toks[5], toks[6]);
        let header =
            |k: &str| msg.headers.as_ref().and_then(|h| h.get(k)).map(|v| v.to_string()).filter(|v| !v.is_empty());
        if !crate::config::HOST_SERVICES.contains(&service) || !cfg.host_service_enabled(service) {
            err(404, format!("No such host service: {service}"))
        } else {
            match service {
                "kv" => kv(cfg, conn, w, method, header("x-keyvalue-key"), msg.payload.clone()).await,
                "messaging" => messaging(cfg, conn, method, header("x-subject"), msg.payload.clone()).await,
                "objectstore" => objectstore(cfg, conn, w, method, header("x-object-name"), msg.payload.clone()).await,
                _ => http(method, header("x-http-url"), msg.payload.to_vec()).await,
            }
        }
    };
    let mut h = async_nats::HeaderMap::new();
    h.insert(HEADER_HS_CODE, code.to_string().as_str());
    h.insert(HEADER_HS_MSG, text.replace(['\r', '\n'], " ").as_str());
    let _ = agent_conn.publish_with_headers(reply, h, body.into()).await;
}

fn service_config(cfg: &NodeConfig, service: &str) -> serde_json::Value {
    cfg.host_services.services.get(service).and_then(|s| s.config.clone()).unwrap_or(serde_json::Value::Null)
}

/// Bucket name from a template, with `${namespace}` and `${workload_name}` replaced (case-insensitively).
pub fn bucket_name(template: &str, ns: &str, workload: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        match after.find('}') {
            Some(j) => {
                let var = &after[2..j];
                if var.eq_ignore_ascii_case("namespace") {
                    out.push_str(ns);
                } else if var.eq_ignore_ascii_case("workload_name") {
                    out.push_str(workload);
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
        .unwrap_or_else(|| format!("hs_${{namespace}}_${{workload_name}}_{suffix}"));
    BucketSettings {
        name: bucket_name(&template, &w.namespace, &w.name),
        max_bytes: c.get("max_bytes").and_then(|v| v.as_i64()).filter(|v| *v > 0).unwrap_or(524_288),
        jit: c.get("jit_provision").and_then(|v| v.as_bool()).unwrap_or(true),
    }
}

async fn kv(
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

async fn messaging(
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

async fn objectstore(
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

async fn http(method: &str, url: Option<String>, body: Vec<u8>) -> Answer {
    let verb = match method {
        "get" => "GET",
        "post" => "POST",
        "put" => "PUT",
        "patch" => "PATCH",
        "delete" => "DELETE",
        "head" => "HEAD",
        _ => return err(400, "unknown method"),
    };
    let Some(url) = url else { return err(400, "url is required") };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return err(400, format!("invalid url {url:?}: only http:// and https:// are supported"));
    }
    let res = tokio::task::spawn_blocking(move || {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_millis(2500)).build();
        let req = agent.request(verb, &url).set("Accept", "*/*").set("Accept-Language", "en-us");
        let resp = if matches!(verb, "POST" | "PUT" | "PATCH") {
            req.set("Content-Type", "text/plain").send_bytes(&body)
        } else {
            req.call()
        };
        let resp = match resp {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return err(500, format!("http request failed: {e}")),
        };
        let status = resp.status();
        let mut headers = serde_json::Map::new();
        for n in resp.headers_names() {
            let vals: Vec<String> = resp.all(&n).into_iter().map(str::to_string).collect();
            headers.insert(n, json!(vals));
        }
        let mut out = json!({"status": status, "headers": headers});
        if verb != "HEAD" {
            out["body"] = json!(resp.into_string().unwrap_or_default());
        }
        ok(serde_json::to_vec(&out).unwrap_or_default())
    })
    .await;
    res.unwrap_or_else(|e| err(500, format!("http request failed: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bucket_templates() {
        assert_eq!(super::bucket_name("hs_${namespace}_${workload_name}_kv", "default", "kvjs"), "hs_default_kvjs_kv");
        assert_eq!(super::bucket_name("X_${NAMESPACE}_${Workload_Name}", "a", "b"), "X_a_b");
    }
}
