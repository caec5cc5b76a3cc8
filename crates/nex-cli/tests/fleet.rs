//! A fleet: three nodes with different tags on a three-server NATS cluster behave as one pool.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_cluster_act_as_one_pool() {
    let cluster: Vec<u16> = (0..3).map(|_| port()).collect();
    let routes = cluster.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let servers: Vec<NatsServer> = (0..3)
        .map(|i| {
            NatsServer::start_with(&[
                "-n",
                &format!("s{i}"),
                "--cluster_name",
                "nexfleet",
                "--cluster",
                &format!("nats://127.0.0.1:{}", cluster[i]),
                "--routes",
                &routes,
            ])
        })
        .collect();
    // JetStream needs a meta leader before buckets can be created.
    let nc = servers[2].connect().await;
    let js = async_nats::jetstream::new(nc.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if js.query_account().await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "JetStream cluster did not form");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rec = Recorder::start(&nc).await;
    let a = Node::start(&servers[0], json!({"tags": {"zone": "a"}})).await;
    let mut b = Node::start(&servers[1], json!({"tags": {"zone": "b"}})).await;
    let c = Node::start(&servers[2], json!({"tags": {"zone": "c"}, "workload_types": ["native"]})).await;

    // `nex node ls` lists all three.
    let out = Command::new(nex_bin())
        .args(["node", "ls", "--json", "--timeout", "1s", "-s", &servers[2].url()])
        .output()
        .unwrap();
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ids: Vec<String> =
        nodes.as_array().unwrap().iter().map(|n| n["node_id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    let mut want = vec![a.id.clone(), b.id.clone(), c.id.clone()];
    want.sort();
    assert_eq!(ids, want);

    // AUCTION-based devrun places by tag and by workload type.
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("placed.sh");
    std::fs::write(&file, script("exec /bin/sleep 600")).unwrap();
    let devrun = |args: &[&str]| {
        let out = Command::new(nex_bin())
            .arg("devrun")
            .args(args)
            .args(["-s", &servers[0].url()])
            .env("HOME", home.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let placed = devrun(&[file.to_str().unwrap(), "--tag", "zone=c"]);
    assert!(placed.contains(&format!("on node {}", c.id)), "{placed}");
    let jsfile = home.path().join("fleetfn.js");
    std::fs::write(&jsfile, "(function (s, p) { return 'from ' + s; })").unwrap();
    for _ in 0..3 {
        let placed = devrun(&[jsfile.to_str().unwrap(), "--trigger_subject", "fleet.dev", "--stop", "false"]);
        assert!(!placed.contains(&c.id), "a v8 function landed on the native-only node: {placed}");
    }

    // A function on two nodes answers each request once.
    let user = User::new(&servers[1]).await;
    let mut f = user.native("twice", b"(function (s, p) { return String.fromCharCode(...p); })").await;
    f.workload_type = "v8".into();
    f.trigger_subjects = vec!["fleet.twice".into()];
    user.deploy(&a.id, &f).await.unwrap();
    user.deploy(&b.id, &f).await.unwrap();
    let count_replies = |n: usize| {
        let nc = nc.clone();
        async move {
            let inbox = nc.new_inbox();
            let mut sub = nc.subscribe(inbox.clone()).await.unwrap();
            nex_node::nats_ext::round_trip(&nc).await.unwrap();
            for i in 0..n {
                nc.publish_with_reply("fleet.twice", inbox.clone(), format!("{i}").into()).await.unwrap();
            }
            let mut got = 0;
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_secs(2), futures::StreamExt::next(&mut sub)).await
            {
                got += 1;
            }
            got
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await; // interest propagates across the routes
    assert_eq!(count_replies(30).await, 30);

    // Killing one node leaves the others serving.
    b.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count_replies(10).await, 10);
    let info = User::new(&servers[2]).await.info(&c.id).await;
    assert_eq!(info.machines.len(), 1);

    // Events from every node arrived on one subscription.
    let started: Vec<String> =
        rec.events("node_started").iter().map(|e| e["data"]["id"].as_str().unwrap().to_string()).collect();
    for id in [&a.id, &b.id, &c.id] {
        assert!(started.contains(id), "node_started of {id} missing");
    }
    let deployed_sources: std::collections::BTreeSet<String> = rec
        .events("workload_deployed")
        .iter()
        .map(|e| e["source"].as_str().unwrap().split('-').next().unwrap().to_string())
        .collect();
    assert!(deployed_sources.len() >= 3, "{deployed_sources:?}");
    let log_nodes: std::collections::BTreeSet<String> =
        rec.logs("$NEX.logs.").iter().filter_map(|(s, _)| s.split('.').nth(3).map(str::to_string)).collect();
    assert!(log_nodes.len() >= 2, "logs from several nodes on one subscription: {log_nodes:?}");
}
