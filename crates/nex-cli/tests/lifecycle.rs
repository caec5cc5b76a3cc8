//! Native workloads in the process tier: deploy, logs, events, stop, limits, restarts.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_workload_logs_events_and_stop() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;

    let mut b = user
        .native(
            "greeter",
            &script("echo \"hello $NATS_URL\"; echo line2; echo oops >&2; printf 'no newline'; exec /bin/sleep 600"),
        )
        .await;
    b.environment = env(&[("nats_url", "nats://example:4222")]);
    let r = user.deploy(&node.id, &b).await.expect("deploy");
    assert!(r.started);
    assert_eq!(r.name, "greeter");
    assert!(nex_api::id::is_workload_id(&r.id), "{}", r.id);

    let subject = format!("$NEX.logs.default.{}.greeter.{}", node.id, r.id);
    rec.wait_until(Duration::from_secs(10), "four log lines", |rec| {
        rec.logs(&subject).iter().filter(|(s, _)| *s == subject).count() >= 4
    })
    .await;
    let lines: Vec<(String, String)> = rec
        .logs(&subject)
        .into_iter()
        .map(|(_, v)| (v["text"].as_str().unwrap().to_string(), v["level"].as_str().unwrap().to_string()))
        .collect();
    // Environment keys are upper-cased for native workloads; one message per line.
    assert!(lines.contains(&("hello nats://example:4222".into(), "INFO".into())), "{lines:?}");
    assert!(lines.contains(&("line2".into(), "INFO".into())), "{lines:?}");
    assert!(lines.contains(&("oops".into(), "ERROR".into())), "{lines:?}");
    assert!(lines.iter().all(|(_, l)| l == "INFO" || l == "ERROR" || l == "DEBUG"), "{lines:?}");
    for (_, v) in rec.logs(&subject) {
        assert_eq!(v["id"], r.id.as_str());
    }

    let deployed = rec.workload_events("workload_deployed", &r.id);
    assert_eq!(deployed.len(), 1, "{deployed:?}");
    assert_eq!(deployed[0]["namespace"], "default");
    assert_eq!(deployed[0]["specversion"], "1.0");
    assert_eq!(deployed[0]["data"]["workload_name"], "greeter");

    // INFO and WPING show it.
    let info = user.info(&node.id).await;
    assert_eq!(info.machines.len(), 1);
    assert_eq!(info.machines[0].workload.hash, b.hash);
    assert_eq!(info.machines[0].workload.workload_type, "native");
    let found = user.gather(500).ping_workloads(Some("greeter")).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].running_machines[0].id, r.id);
    let found = user.gather(500).ping_workloads(Some(&r.id)).await.unwrap();
    assert_eq!(found.len(), 1);

    let work_dir = node.state_dir();
    assert!(!processes_with_cwd_under(&work_dir).is_empty());

    let s = user.stop(&node.id, &r.id, "greeter").await.expect("stop");
    assert!(s.stopped);
    assert_eq!(s.id, r.id);
    rec.wait_until(Duration::from_secs(10), "workload_undeployed", |rec| {
        !rec.workload_events("workload_undeployed", &r.id).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rec.workload_events("workload_undeployed", &r.id).len(), 1);
    assert_eq!(rec.workload_events("workload_deployed", &r.id).len(), 1);
    let info = user.info(&node.id).await;
    assert!(info.machines.is_empty());
    // Only the warm agent remains: the workload's process tree is gone.
    eventually(Duration::from_secs(5), "workload processes gone", || {
        processes_with_cwd_under(&work_dir).iter().all(|(_, cmd)| cmd.contains("nex-agent"))
    })
    .await;
    // A last line without a newline is still shipped when the workload ends. It comes from the
    // agent's pipe reader at end of file, so it may arrive just after the node's own
    // "Workload stopped" line.
    let texts = |rec: &Recorder| -> Vec<String> {
        rec.logs(&subject).iter().map(|(_, v)| v["text"].as_str().unwrap_or("").to_string()).collect()
    };
    rec.wait_until(Duration::from_secs(5), "the unterminated last line", |rec| {
        texts(rec).iter().any(|t| t == "no newline")
    })
    .await;
    assert!(texts(&rec).iter().any(|t| t == "Workload stopped"), "{:?}", texts(&rec));
}

fn cgroup_dirs_for(run_marker: &std::path::Path) -> Vec<std::path::PathBuf> {
    // Every cgroup directory of the runs recorded under this node's state dir.
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(run_marker.join("runs")) else {
        return out;
    };
    for e in rd.flatten() {
        let run = e.file_name();
        for ctl in ["memory", "pids", ""] {
            let p = std::path::Path::new("/sys/fs/cgroup").join(ctl).join("nex").join(&run);
            if p.exists() {
                out.push(p);
            }
        }
    }
    out
}

fn runs(state: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(state.join("runs"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default()
}

fn cgroup_exists(run: &str) -> bool {
    ["memory", "pids", ""]
        .iter()
        .any(|ctl| std::path::Path::new("/sys/fs/cgroup").join(ctl).join("nex").join(run).exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_a_tree_that_ignores_sigterm() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"workload_stop_grace_ms": 1000})).await;
    let user = User::new(&nats).await;
    let b = user
        .native(
            "stubborn",
            &script(
                "trap '' TERM INT\n/bin/sleep 7101 &\n/usr/bin/setsid /bin/sleep 7102 &\necho ready\nwhile true; do /bin/sleep 7103; done",
            ),
        )
        .await;
    let r = user.deploy(&node.id, &b).await.expect("deploy");
    eventually(Duration::from_secs(5), "children running", || {
        processes_matching("sleep 7101").len() == 1 && processes_matching("sleep 7102").len() == 1
    })
    .await;
    let started = std::time::Instant::now();
    let s = user.stop(&node.id, &r.id, "stubborn").await.expect("stop");
    assert!(s.stopped);
    // The grace period passed, then everything went, including the child that left the group.
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    eventually(Duration::from_secs(5), "whole tree gone", || processes_matching("sleep 710").is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_kills_a_workload_that_exceeds_it() {
    if nex_node::cgroup::detect().is_none() {
        println!("skipped: no cgroup memory controller on this host");
        return;
    }
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_template": {"memsize_mib": 48}})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let b = user
        .native(
            "hog",
            &script("/bin/sleep 0.3\n/usr/bin/head -c 400000000 /dev/zero | /usr/bin/tail > /dev/null\nexit $?"),
        )
        .await;
    let r = user.deploy(&node.id, &b).await.expect("deploy");
    rec.wait_until(Duration::from_secs(20), "workload_undeployed", |rec| {
        !rec.workload_events("workload_undeployed", &r.id).is_empty()
    })
    .await;
    let ev = &rec.workload_events("workload_undeployed", &r.id)[0];
    let code = ev["data"]["code"].as_i64().unwrap();
    assert_ne!(code, 0, "{ev}");
    let msg = ev["data"]["message"].as_str().unwrap();
    assert!(msg.contains("memory limit of 48 MiB"), "{msg}");
    // The node keeps serving.
    let info = user.info(&node.id).await;
    assert!(info.machines.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn essential_workload_restarts_with_backoff_until_stopped() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let mut b = user.native("crasher", &script("echo crashing; exit 3")).await;
    b.essential = true;
    let cpu_before = cpu_ticks(node.pid());
    let t0 = std::time::Instant::now();
    let first = user.deploy(&node.id, &b).await.expect("deploy");
    rec.wait_until(Duration::from_secs(15), "three instances", |rec| {
        rec.events("workload_deployed").iter().filter(|e| e["data"]["workload_name"] == "crasher").count() >= 3
    })
    .await;
    let deployed: Vec<serde_json::Value> =
        rec.events("workload_deployed").into_iter().filter(|e| e["data"]["workload_name"] == "crasher").collect();
    let ids: Vec<&str> = deployed.iter().map(|e| e["data"]["workload_id"].as_str().unwrap()).collect();
    assert_eq!(ids[0], first.id);
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "each restart gets a new id: {ids:?}");
    let t = |e: &serde_json::Value| chrono::DateTime::parse_from_rfc3339(e["time"].as_str().unwrap()).unwrap();
    let gap1 = (t(&deployed[1]) - t(&deployed[0])).num_milliseconds();
    let gap2 = (t(&deployed[2]) - t(&deployed[1])).num_milliseconds();
    assert!(gap1 >= 900, "first back-off ~1s, got {gap1}ms");
    assert!(gap2 >= 1900, "second back-off ~2s, got {gap2}ms");
    // The crash loop does not starve the node of CPU: it idles between restarts.
    let used = (cpu_ticks(node.pid()) - cpu_before) as f64 / 100.0;
    let wall = t0.elapsed().as_secs_f64();
    assert!(used < wall * 0.5, "node used {used:.2}s of CPU in {wall:.2}s of crash loop");
    for id in &ids[..2] {
        let ev = rec.workload_events("workload_undeployed", id);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["data"]["code"], 3);
    }
    // Stop the chain's latest instance, usually already exited and waiting in its back-off: the
    // STOP is accepted and the restarts end.
    let mut stopped = false;
    for _ in 0..5 {
        let latest = rec
            .events("workload_deployed")
            .into_iter()
            .rfind(|e| e["data"]["workload_name"] == "crasher")
            .map(|e| e["data"]["workload_id"].as_str().unwrap().to_string())
            .unwrap();
        match user.stop(&node.id, &latest, "crasher").await {
            Ok(s) => {
                assert!(s.stopped);
                stopped = true;
                break;
            }
            // A restart raced the STOP: try the newer instance.
            Err(e) => assert!(e.contains("No such workload"), "{e}"),
        }
    }
    assert!(stopped, "STOP of the latest instance was never accepted");
    let count = rec.events("workload_deployed").len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rec.events("workload_deployed").len();
    assert_eq!(after, count, "restarts continued after stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sigterm_stops_everything_and_exits_zero() {
    let nats = NatsServer::start();
    let mut node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let b = user.native("sleeper", &script("exec /bin/sleep 7201")).await;
    let r = user.deploy(&node.id, &b).await.expect("deploy");
    eventually(Duration::from_secs(5), "workload running", || !processes_matching("sleep 7201").is_empty()).await;
    let state = node.state_dir();
    let run = runs(&state);
    assert_eq!(run.len(), 1);
    let code = node.signal_and_wait(libc::SIGTERM, Duration::from_secs(15));
    assert_eq!(code, Some(0));
    rec.wait_until(Duration::from_secs(5), "node_stopped", |rec| !rec.events("node_stopped").is_empty()).await;
    assert_eq!(rec.workload_events("workload_undeployed", &r.id).len(), 1);
    assert!(processes_matching("sleep 7201").is_empty());
    assert!(processes_with_cwd_under(&state).is_empty(), "{:?}", processes_with_cwd_under(&state));
    assert!(runs(&state).is_empty(), "run directory left behind");
    assert!(!cgroup_exists(&run[0]), "cgroup left behind");
    assert!(cgroup_dirs_for(&state).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_then_restarted_leaves_no_orphans() {
    let nats = NatsServer::start();
    let mut node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let b = user.native("orphanmaker", &script("/usr/bin/setsid /bin/sleep 7301 &\nexec /bin/sleep 7302")).await;
    user.deploy(&node.id, &b).await.expect("deploy");
    eventually(Duration::from_secs(5), "workload running", || {
        !processes_matching("sleep 7301").is_empty() && !processes_matching("sleep 7302").is_empty()
    })
    .await;
    let state = node.state_dir();
    let old_runs = runs(&state);
    node.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    // Agents and the workload die with the node; the escaped grandchild survives until restart.
    eventually(Duration::from_secs(5), "direct children gone", || processes_matching("sleep 7302").is_empty()).await;

    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    drop(node);
    let cfg = node_config(dir.path(), json!({}));
    let node2 = Node::start_in(&nats, dir, cfg, &[]).await;
    eventually(Duration::from_secs(5), "orphan removed", || processes_matching("sleep 7301").is_empty()).await;
    for r in &old_runs {
        assert!(!node2.state_dir().join("runs").join(r).exists(), "old run dir left");
        assert!(!cgroup_exists(r), "old cgroup left");
    }
    let leftovers: Vec<_> = processes_with_cwd_under(&node2.state_dir())
        .into_iter()
        .filter(|(_, c)| !c.contains("nex-agent") && !c.contains("nats-server"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// User + system CPU ticks (1/100 s) of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}
