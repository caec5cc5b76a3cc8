//! Faults survived: NATS restarts, killed agents, log floods, lame-duck drains, stable identity.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn agent_pid_of(workload_id: &str) -> Option<i32> {
    processes_matching("nex-agent")
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| std::fs::read_link(format!("/proc/{p}/cwd")).map(|c| c.ends_with(workload_id)).unwrap_or(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_under_a_running_node() {
    let mut nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_pool_size": 2})).await;
    let user = User::new(&nats).await;
    let mut f = user.native("restartjs", b"(function (s, p) { return 'ok ' + String.fromCharCode(...p); })").await;
    f.workload_type = "v8".into();
    f.trigger_subjects = vec!["restart.fn".into()];
    user.deploy(&node.id, &f).await.unwrap();
    let svc = user.native("restartsvc", &script("exec /bin/sleep 7401")).await;
    user.deploy(&node.id, &svc).await.unwrap();

    nats.restart();
    // The node reconnects; its workloads keep running; functions answer again.
    let nc = nats.connect().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let req = async_nats::Request::new().payload("x".into()).timeout(Some(Duration::from_secs(1)));
        if let Ok(m) = nc.send_request("restart.fn", req).await {
            break m;
        }
        assert!(Instant::now() < deadline, "function did not answer after the restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(&reply.payload[..], br#""ok x""#);
    let user2 = User::new(&nats).await;
    let info = user2.info(&node.id).await;
    assert_eq!(info.machines.len(), 2, "no duplicates, nothing lost");
    assert_eq!(processes_matching("sleep 7401").len(), 1);
    // Events resume.
    let rec = Recorder::start(&user2.nc).await;
    let more = user2.native("afterrestart", &script("exec /bin/sleep 600")).await;
    let r = user2.deploy(&node.id, &more).await.unwrap();
    rec.wait_until(Duration::from_secs(5), "workload_deployed after restart", |rec| {
        !rec.workload_events("workload_deployed", &r.id).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_under_its_workload() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_pool_size": 2})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let mut ess = user.native("essentialsvc", &script("exec /bin/sleep 7501")).await;
    ess.essential = true;
    let victim = user.deploy(&node.id, &ess).await.unwrap();
    let bystander = user.native("bystander", &script("exec /bin/sleep 7502")).await;
    let other = user.deploy(&node.id, &bystander).await.unwrap();
    let pid = agent_pid_of(&victim.id).expect("agent of the essential workload");
    // SAFETY: killing a test-owned agent process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    rec.wait_until(Duration::from_secs(10), "workload_undeployed of the victim", |rec| {
        !rec.workload_events("workload_undeployed", &victim.id).is_empty()
    })
    .await;
    let ev = &rec.workload_events("workload_undeployed", &victim.id)[0];
    assert_ne!(ev["data"]["code"], 0, "{ev}");
    assert!(ev["data"]["message"].as_str().unwrap().contains("agent"), "{ev}");
    // The essential service comes back under a new id; the bystander is untouched.
    rec.wait_until(Duration::from_secs(10), "restart", |rec| {
        rec.events("workload_deployed").iter().filter(|e| e["data"]["workload_name"] == "essentialsvc").count() >= 2
    })
    .await;
    let info = user.info(&node.id).await;
    assert!(info.machines.iter().any(|m| m.id == other.id));
    assert!(info.machines.iter().any(|m| m.workload.name == "essentialsvc" && m.id != victim.id));
    assert_eq!(rec.workload_events("workload_undeployed", &other.id).len(), 0);
    eventually(Duration::from_secs(5), "one instance of the essential service", || {
        processes_matching("sleep 7501").len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_is_rate_limited_and_counted() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let b = user.native("flood", &script("exec /usr/bin/timeout 3 /usr/bin/yes spam")).await;
    let r = user.deploy(&node.id, &b).await.unwrap();
    rec.wait_until(Duration::from_secs(15), "end of the flood", |rec| {
        !rec.workload_events("workload_undeployed", &r.id).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let subject = format!("$NEX.logs.default.{}.flood.{}", node.id, r.id);
    let lines = rec.logs(&subject);
    let spam = lines.iter().filter(|(_, v)| v["text"] == "spam").count();
    assert!(spam > 1000, "some lines must get through: {spam}");
    assert!(spam <= 2000 + 1000 * 5, "{spam} lines shipped in ~3s: not rate limited");
    let dropped: u64 = lines
        .iter()
        .filter_map(|(_, v)| v["text"].as_str())
        .filter_map(|t| t.strip_prefix("nex: dropped "))
        .filter_map(|t| t.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(dropped > 10_000, "dropped lines are counted and reported: {dropped}");
    let rss = nex_node::tiers::process::rss_of(node.pid()).unwrap_or(0);
    assert!(rss < 200 * 1024 * 1024, "node memory bounded: {rss} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lameduck_with_a_delay_drains_and_exits() {
    let nats = NatsServer::start();
    let mut node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let b = user.native("drained", &script("exec /bin/sleep 7601")).await;
    let r = user.deploy(&node.id, &b).await.unwrap();
    let out = std::process::Command::new(nex_bin())
        .args(["lameduck", &node.id, "--delay", "2s", "-s", &nats.url()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Command to enter lame duck mode issued to"));
    let late = user.native("late", &script("exec /bin/sleep 600")).await;
    assert_eq!(
        user.deploy(&node.id, &late).await.unwrap_err(),
        "Node is in lame duck mode. Workload deploy request denied"
    );
    // Still running during the delay.
    assert_eq!(processes_matching("sleep 7601").len(), 1);
    let started = Instant::now();
    let code = node.signal_and_wait(0, Duration::from_secs(15));
    assert_eq!(code, Some(0), "the node exits cleanly after draining");
    assert!(started.elapsed() >= Duration::from_millis(1000));
    rec.wait_until(Duration::from_secs(5), "node_stopped", |rec| !rec.events("node_stopped").is_empty()).await;
    assert_eq!(rec.workload_events("workload_undeployed", &r.id).len(), 1);
    assert!(processes_matching("sleep 7601").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_seed_path_keeps_the_node_id() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("keys/node.nk");
    let cfg = node_config(dir.path(), json!({"node_seed_path": seed}));
    let mut first = Node::start_in(&nats, dir, cfg.clone(), &[]).await;
    let id = first.id.clone();
    assert_eq!(first.signal_and_wait(libc::SIGTERM, Duration::from_secs(15)), Some(0));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&seed).unwrap().permissions().mode() & 0o777, 0o600);
    let dir = std::mem::replace(&mut first.dir, tempfile::tempdir().unwrap());
    let second = Node::start_in(&nats, dir, cfg, &[]).await;
    assert_eq!(second.id, id, "same identity after a restart");
    // The default stays ephemeral.
    let third = Node::start(&nats, json!({})).await;
    assert_ne!(third.id, id);
}
