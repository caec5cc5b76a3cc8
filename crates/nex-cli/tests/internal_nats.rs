//! The node's internal NATS server: one account per workload, agents
//! confined to their own subjects and their own artifact cache.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use nex_node::internal_nats::InternalNats;

async fn sync(nc: &async_nats::Client) {
    nex_node::nats_ext::round_trip(nc).await.unwrap();
}

async fn got(sub: &mut async_nats::Subscriber, within_ms: u64) -> Option<async_nats::Message> {
    tokio::time::timeout(Duration::from_millis(within_ms), sub.next()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_workload_account_is_an_island() {
    let dir = tempfile::tempdir().unwrap();
    let ns = InternalNats::start(&nats_server_bin(), "127.0.0.1", 0, dir.path()).await.unwrap();
    let (a, b) = (nex_api::id::new_workload_id(), nex_api::id::new_workload_id());
    let creds = ns.add_workloads(&[a.clone(), b.clone()]).await.unwrap();
    let node_a = ns.connect_as(&creds[0].node, "node-a", Duration::from_secs(5)).await.unwrap();
    let node_b = ns.connect_as(&creds[1].node, "node-b", Duration::from_secs(5)).await.unwrap();
    let agent = |i: usize| {
        let seed = creds[i].agent.seed().unwrap();
        let url = ns.url();
        async move { async_nats::ConnectOptions::with_nkey(seed).connect(url).await.unwrap() }
    };
    let agent_a = agent(0).await;
    let agent_b = agent(1).await;

    // A request from a workload user reaches its node-side responder.
    let mut hs = node_a.subscribe(format!("hostint.{a}.>")).await.unwrap();
    sync(&node_a).await;
    let responder = node_a.clone();
    tokio::spawn(async move {
        while let Some(m) = hs.next().await {
            if let Some(r) = m.reply {
                let _ = responder.publish(r, Bytes::from_static(b"{}")).await;
            }
        }
    });
    let reply = agent_a
        .request(format!("hostint.{a}.handshake"), "hi".into())
        .await
        .expect("agent reaches its own node subject");
    assert_eq!(&reply.payload[..], b"{}");

    // Agent A cannot publish into B's subjects, nor read them.
    let mut b_host = node_b.subscribe(format!("hostint.{b}.>")).await.unwrap();
    sync(&node_b).await;
    agent_a.publish(format!("hostint.{b}.logs"), "forged".into()).await.unwrap();
    agent_a.flush().await.unwrap();
    assert!(got(&mut b_host, 300).await.is_none(), "A published into B's account");

    let mut spy = agent_a.subscribe(format!("agentint.{b}.>")).await.unwrap();
    let mut spy_all = agent_a.subscribe(">").await.unwrap();
    agent_a.flush().await.unwrap();
    let mut b_deploy = agent_b.subscribe(format!("agentint.{b}.deploy")).await.unwrap();
    sync(&agent_b).await;
    node_b.publish(format!("agentint.{b}.deploy"), "secret env".into()).await.unwrap();
    node_b.flush().await.unwrap();
    assert_eq!(&got(&mut b_deploy, 2000).await.expect("B receives its own deploy").payload[..], b"secret env");
    assert!(got(&mut spy, 300).await.is_none(), "A read B's deploy");
    assert!(got(&mut spy_all, 300).await.is_none(), "A subscribed to everything");

    // Bytes cached for A are readable by A's agent, unchanged; B has no such cache.
    let js = async_nats::jetstream::new(node_a.clone());
    let store = js
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: "NEXCACHE".into(),
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    store.put("workload", &mut payload.as_slice()).await.unwrap();
    let mut obj = async_nats::jetstream::new(agent_a.clone())
        .get_object_store("NEXCACHE")
        .await
        .unwrap()
        .get("workload")
        .await
        .unwrap();
    let mut read = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut obj, &mut read).await.unwrap();
    assert_eq!(read, payload);
    assert!(async_nats::jetstream::new(agent_b.clone()).get_object_store("NEXCACHE").await.is_err());

    // An unauthenticated connection is refused.
    assert!(async_nats::connect(ns.url()).await.is_err());

    // A removed account can no longer log in.
    ns.remove_workload(&a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = async_nats::ConnectOptions::with_nkey(creds[0].agent.seed().unwrap()).connect(ns.url()).await;
    assert!(again.is_err(), "removed credentials still accepted");
    ns.shutdown().await;
}
