//! A bounded soak (`NEX_SOAK_SECS`, default 60 s): one node under a mixed load of deploys and
//! stops, function calls, a crash-looping essential service, a log flood, killed agents and one
//! killed internal NATS server. Afterwards every DEPLOY was answered, every workload had exactly
//! one `workload_deployed` and one `workload_undeployed`, nothing but the warm agents is left
//! (processes, cgroups, directories), and the node's memory and open files are back near where
//! they started.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// `(workload id → (deployed, undeployed))` from the events seen.
type Counts = Arc<Mutex<BTreeMap<String, (u32, u32)>>>;

async fn count_events(nc: &async_nats::Client) -> Counts {
    let counts: Counts = Arc::default();
    let mut sub = nc.subscribe("$NEX.events.>").await.unwrap();
    nex_node::nats_ext::round_trip(nc).await.unwrap();
    let c = counts.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let v: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
            let Some(id) = v["data"]["workload_id"].as_str() else { continue };
            let mut c = c.lock().unwrap();
            let e = c.entry(id.to_string()).or_default();
            if m.subject.ends_with(".workload_deployed") {
                e.0 += 1;
            } else if m.subject.ends_with(".workload_undeployed") {
                e.1 += 1;
            }
        }
    });
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_load_leaves_nothing_and_counts_every_event_once() {
    let secs: u64 = std::env::var("NEX_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_pool_size": 3})).await;
    let user = Arc::new(User::new(&nats).await);
    let counts = count_events(&user.nc).await;
    // Settle, then the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss0, fds0) = (rss_kb(node.pid()), open_fds(node.pid()));

    // Long-lived members of the load.
    let mut f = user.native("soakjs", b"(function (s, p) { return p.length; })").await;
    f.workload_type = "v8".into();
    f.trigger_subjects = vec!["soak.fn".into()];
    let func = user.deploy(&node.id, &f).await.unwrap();
    let flood = user
        .deploy(
            &node.id,
            &user.native("soakflood", &script("exec /bin/sh -c 'while :; do echo flood7902; done'")).await,
        )
        .await
        .unwrap();
    let mut looper = user.native("soakloop", &script("sleep 0.3; exit 1")).await;
    looper.essential = true;
    user.deploy(&node.id, &looper).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // Deploy/stop churn, two at a time.
    for lane in 0..2 {
        let (user, node_id, stop, sent, answered) =
            (user.clone(), node.id.clone(), stop.clone(), sent.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let b = user.native(&format!("churn{lane}"), &script("exec /bin/sleep 7901")).await;
            while !stop.load(Ordering::SeqCst) {
                sent.fetch_add(1, Ordering::SeqCst);
                let r = tokio::time::timeout(Duration::from_secs(60), user.deploy(&node_id, &b)).await;
                let Ok(r) = r else { continue };
                answered.fetch_add(1, Ordering::SeqCst);
                if let Ok(r) = r {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = user.stop(&node_id, &r.id, &r.name).await;
                }
            }
        }));
    }
    // Function calls.
    {
        let (nc, stop) = (user.nc.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let req = async_nats::Request::new().payload("hello".into()).timeout(Some(Duration::from_secs(5)));
                let _ = nc.send_request("soak.fn", req).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Agent kills every 15 s, one internal server kill halfway.
    let started = Instant::now();
    let mut killed_internal = false;
    let mut next_kill = Duration::from_secs(15);
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if started.elapsed() >= next_kill {
            next_kill += Duration::from_secs(15);
            let victim = processes_matching("sleep 7901").first().map(|(p, _)| *p);
            if let Some(p) = victim.and_then(parent_of) {
                // SAFETY: killing a churn workload's agent of this test's node.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        if !killed_internal && started.elapsed() >= Duration::from_secs(secs / 2) {
            killed_internal = true;
            if let Some(p) = internal_nats_pid(&node.state_dir()) {
                // SAFETY: killing this test node's internal server.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(90), t).await;
    }
    assert_eq!(answered.load(Ordering::SeqCst), sent.load(Ordering::SeqCst), "every DEPLOY answered");
    assert!(sent.load(Ordering::SeqCst) > 10, "the churn ran");

    // Stop what is left: the function, the flood, the crash loop (whatever instance it is at).
    for w in [&func, &flood] {
        user.stop(&node.id, &w.id, &w.name).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = user.info(&node.id).await.machines;
        for m in &left {
            let _ = user.stop(&node.id, &m.id, &m.workload.name).await;
        }
        if left.is_empty() {
            // A looper waiting in its back-off is not in INFO: stop it by its last id too.
            let last = counts.lock().unwrap().keys().cloned().collect::<Vec<_>>();
            for id in last {
                let _ = user.stop(&node.id, &id, "soakloop").await;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            if user.info(&node.id).await.machines.is_empty() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "workloads left: {left:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Exactly one deployed and one undeployed event per workload.
    let c = counts.lock().unwrap().clone();
    assert!(c.len() > 10, "{c:?}");
    for (id, (d, u)) in &c {
        assert!(*d == 1 && *u == 1, "workload {id}: {d} deployed, {u} undeployed events");
    }
    // Nothing but the warm agents is left.
    node.wait_warm(&user.nc).await;
    eventually(Duration::from_secs(10), "no workload process left", || {
        processes_matching("sleep 7901").is_empty() && processes_matching("flood7902").is_empty()
    })
    .await;
    let warm = user.info(&node.id).await.available_agents as usize;
    let under = processes_with_cwd_under(&node.state_dir());
    assert!(under.iter().all(|(_, cmd)| cmd.contains("nex-agent")) && under.len() <= warm + 1, "{under:?}");
    let agents_dir = node.state_dir().join("runs").join(run_id(&node)).join("agents");
    let dirs = std::fs::read_dir(&agents_dir).map(|d| d.count()).unwrap_or(0);
    assert!(dirs <= warm + 1, "{dirs} agent directories for {warm} warm agents");
    // Memory and open files back near the start.
    let (rss1, fds1) = (rss_kb(node.pid()), open_fds(node.pid()));
    assert!(rss1 < rss0 + 64 * 1024, "node RSS {rss0} kB → {rss1} kB");
    let what: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", node.pid()))
        .map(|d| {
            d.flatten().filter_map(|e| std::fs::read_link(e.path()).ok()).map(|p| p.display().to_string()).collect()
        })
        .unwrap_or_default();
    assert!(fds1 < fds0 + 64, "node fds {fds0} → {fds1}: {what:?}");
}

/// The parent of process `pid`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
}
