//! A third-party client that follows `docs/protocol.md` with nothing from this project: plain NATS,
//! the nkeys library, hand-made JWTs and xkv1 sealing.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::{script, NatsServer, Node};
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn jwt(issuer: &nkeys::KeyPair, name: &str, hash: Option<&str>) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let mut nats = json!({"type": "generic", "version": 2});
    if let Some(h) = hash {
        nats["hash"] = json!(h);
    }
    let jti: String = (0..16).map(|_| format!("{:02X}", rand_byte())).collect();
    let claims = json!({
        "jti": jti,
        "iat": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        "iss": issuer.public_key(),
        "sub": name,
        "nats": nats,
    });
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let input = format!("{header}.{payload}");
    let sig = issuer.sign(input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn rand_byte() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::time::Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u8
}

async fn request(nc: &async_nats::Client, subject: String, body: Value) -> Value {
    let body = if body.is_null() { vec![] } else { serde_json::to_vec(&body).unwrap() };
    let m = nc.request(subject, body.into()).await.unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_client_deploys_observes_and_stops() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let mut events = nc.subscribe("$NEX.events.default.*").await.unwrap();
    let mut logs = nc.subscribe("$NEX.logs.default.>").await.unwrap();
    nex_node::nats_ext::round_trip(&nc).await.unwrap();

    // Discover the node and its xkey.
    let inbox = nc.new_inbox();
    let mut replies = nc.subscribe(inbox.clone()).await.unwrap();
    nc.publish_with_reply("$NEX.PING", inbox, "".into()).await.unwrap();
    let ping: Value = serde_json::from_slice(&replies.next().await.unwrap().payload).unwrap();
    assert_eq!(ping["type"], "io.nats.nex.v1.ping_response");
    let node_id = ping["data"]["node_id"].as_str().unwrap().to_string();
    assert_eq!(node_id, node.id);
    let info = request(&nc, format!("$NEX.INFO.default.{node_id}"), Value::Null).await;
    let node_xkey = info["data"]["public_xkey"].as_str().unwrap().to_string();

    // Upload the artifact.
    let artifact = script("echo third-party-hello; exec /bin/sleep 600");
    let js = async_nats::jetstream::new(nc.clone());
    let store = js
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: "MYFILES".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    store.put("svc", &mut artifact.as_slice()).await.unwrap();
    let hash: String = Sha256::digest(&artifact).iter().map(|b| format!("{b:02x}")).collect();

    // Seal the environment with xkv1 and deploy.
    let issuer = nkeys::KeyPair::new_account();
    let sender = nkeys::XKey::new();
    let target = nkeys::XKey::from_public_key(&node_xkey).unwrap();
    let sealed = sender.seal(br#"{"greeting":"hi"}"#, &target).unwrap();
    let deploy = json!({
        "type": "native",
        "location": "nats://MYFILES/svc",
        "workload_jwt": jwt(&issuer, "thirdparty", Some(&hash)),
        "environment": STANDARD.encode(sealed),
        "sender_public_key": sender.public_key(),
        "target_node": node_id,
        "description": "from a third-party client",
    });
    let r = request(&nc, format!("$NEX.DEPLOY.default.{node_id}"), deploy).await;
    assert_eq!(r["type"], "io.nats.nex.v1.run_response", "{r}");
    assert_eq!(r["data"]["started"], true, "{r}");
    let id = r["data"]["id"].as_str().unwrap().to_string();

    // Observe it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen_event = false;
    while !seen_event {
        let m = tokio::time::timeout_at(deadline, events.next()).await.unwrap().unwrap();
        let ev: Value = serde_json::from_slice(&m.payload).unwrap();
        seen_event = ev["type"] == "workload_deployed" && ev["data"]["workload_id"] == id.as_str();
    }
    let mut seen_log = false;
    while !seen_log {
        let m = tokio::time::timeout_at(deadline, logs.next()).await.unwrap().unwrap();
        let l: Value = serde_json::from_slice(&m.payload).unwrap();
        seen_log = l["text"] == "third-party-hello"
            && m.subject.as_str() == format!("$NEX.logs.default.{node_id}.thirdparty.{id}");
    }

    // Stop it with a fresh JWT from the same issuer.
    let stop = json!({"workload_id": id, "workload_jwt": jwt(&issuer, "thirdparty", None), "target_node": node_id});
    let s = request(&nc, format!("$NEX.STOP.default.{node_id}"), stop).await;
    assert_eq!(s["type"], "io.nats.nex.v1.stop_response", "{s}");
    assert_eq!(s["data"]["stopped"], true, "{s}");
    let info = request(&nc, format!("$NEX.INFO.default.{node_id}"), Value::Null).await;
    assert_eq!(info["data"]["machines"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_parse_events_and_logs_from_their_subjects() {
    // The client library's monitors read namespace, type, node and workload from subjects.
    let nats = NatsServer::start();
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let mut evs = Box::pin(nex_client::monitor::events(&nc, "*", "*").await.unwrap());
    let mut lgs = Box::pin(nex_client::monitor::logs(&nc, "*", "*", "*", "*").await.unwrap());
    nex_node::nats_ext::round_trip(&nc).await.unwrap();
    let ev = nex_api::events::CloudEvent::new("test", "workload_deployed", json!({"bob": "1", "alice": "2"}));
    nc.publish("$NEX.events.default.workload_deployed", serde_json::to_vec(&ev).unwrap().into()).await.unwrap();
    let rec = json!({"text": "hey from test", "level": "DEBUG", "id": "vm1234"});
    nc.publish("$NEX.logs.default.Nxxxx.echoservice.vm1234", serde_json::to_vec(&rec).unwrap().into()).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), evs.next()).await.unwrap().unwrap();
    assert_eq!(e.subject_namespace, "default");
    assert_eq!(e.event_type, "workload_deployed");
    assert_eq!(e.event.data, json!({"bob": "1", "alice": "2"}));
    let l = tokio::time::timeout(Duration::from_secs(5), lgs.next()).await.unwrap().unwrap();
    assert_eq!(l.namespace, "default");
    assert_eq!(l.node_id, "Nxxxx");
    assert_eq!(l.workload_name, "echoservice");
    assert_eq!(l.workload_id, "vm1234");
    assert_eq!(l.log.text, "hey from test");
    assert_eq!(l.log.level, "DEBUG");
    assert_eq!(l.log.id, "vm1234");
}
