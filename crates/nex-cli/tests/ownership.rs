//! One owner of lifecycle state: what races used to break. Concurrent DEPLOYs against
//! `max_workloads`, a STOP racing an essential restart, and a shutdown during deploys in flight.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deploys_never_exceed_max_workloads() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"node_limits": {"max_workloads": 2}, "machine_pool_size": 3})).await;
    let user = User::new(&nats).await;
    let mut reqs = Vec::new();
    for i in 0..8 {
        let b = user.native(&format!("burst{i}"), &script("exec /bin/sleep 7811")).await;
        reqs.push(user.request(&node.id, &b).await);
    }
    let answers = futures::future::join_all(reqs.iter().map(|r| user.client.deploy(&node.id, r))).await;
    let accepted = answers.iter().filter(|a| a.is_ok()).count();
    for a in answers.iter().filter_map(|a| a.as_ref().err()) {
        assert!(a.to_string().contains("Node is at maximum workload limit"), "{a}");
    }
    assert_eq!(accepted, 2, "{answers:?}");
    assert_eq!(user.info(&node.id).await.machines.len(), 2);
    eventually(Duration::from_secs(5), "two sleepers running", || processes_matching("sleep 7811").len() == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_answers_stopped_ends_the_restart_chain() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_pool_size": 2})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    // A crash-looping essential service with a large artifact, so a restart takes a while to
    // launch: STOPs land before, during and after it.
    let mut body = script("sleep 0.2; exit 1");
    body.resize(4 << 20, b'#');
    for i in 0..10u64 {
        let name = format!("looper{i}");
        let mut b = user.native(&name, &body).await;
        b.essential = true;
        let first = user.deploy(&node.id, &b).await.unwrap();
        rec.wait_until(Duration::from_secs(10), "first exit", |r| {
            !r.workload_events("workload_undeployed", &first.id).is_empty()
        })
        .await;
        // The restart comes 1 s after the exit; aim around it.
        tokio::time::sleep(Duration::from_millis(900 + 25 * i)).await;
        let mut stopped = false;
        for _ in 0..5 {
            let deployed: Vec<String> = rec
                .events("workload_deployed")
                .iter()
                .filter(|e| e["data"]["workload_name"] == name.as_str())
                .map(|e| e["data"]["workload_id"].as_str().unwrap().to_string())
                .collect();
            let latest = deployed.last().unwrap().clone();
            if let Ok(s) = user.stop(&node.id, &latest, &name).await {
                assert!(s.stopped);
                stopped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(stopped, "no STOP of {name} succeeded");
        let seen =
            rec.events("workload_deployed").iter().filter(|e| e["data"]["workload_name"] == name.as_str()).count();
        // After the STOP said stopped, no instance of it starts again.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let now =
            rec.events("workload_deployed").iter().filter(|e| e["data"]["workload_name"] == name.as_str()).count();
        assert_eq!(seen, now, "{name} restarted after a successful STOP");
        assert!(!user.info(&node.id).await.machines.iter().any(|m| m.workload.name == name));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_deploys_in_flight_leaves_nothing_running() {
    let nats = NatsServer::start();
    let mut node = Node::start(&nats, json!({"machine_pool_size": 1})).await;
    let user = User::new(&nats).await;
    let mut reqs = Vec::new();
    for i in 0..20 {
        let b = user.native(&format!("inflight{i}"), &script("exec /bin/sleep 7812")).await;
        reqs.push(user.request(&node.id, &b).await);
    }
    let client = user.client.clone();
    let node_id = node.id.clone();
    let deploys =
        tokio::spawn(async move { futures::future::join_all(reqs.iter().map(|r| client.deploy(&node_id, r))).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let t = Instant::now();
    let code = tokio::task::spawn_blocking(move || {
        let code = node.signal_and_wait(libc::SIGTERM, Duration::from_secs(40));
        (code, node)
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "the node exits cleanly within {:?}:\n{}", t.elapsed(), code.1.log());
    // Every deploy got an answer (or the node's connection went away), and nothing runs.
    let _ = tokio::time::timeout(Duration::from_secs(20), deploys).await;
    eventually(Duration::from_secs(5), "no workload left", || processes_matching("sleep 7812").is_empty()).await;
    assert!(
        processes_with_cwd_under(&code.1.state_dir()).is_empty(),
        "{:?}",
        processes_with_cwd_under(&code.1.state_dir())
    );
}
