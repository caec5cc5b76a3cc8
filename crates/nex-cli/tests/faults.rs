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

fn leftovers_under(state: &std::path::Path) -> Vec<(i32, String)> {
    processes_matching("")
        .into_iter()
        .filter(|(p, c)| {
            !c.contains("nex-agent")
                && !c.contains("nats-server")
                && std::fs::read_link(format!("/proc/{p}/cwd")).map(|d| d.starts_with(state)).unwrap_or(false)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_deploy_and_mid_trigger() {
    let nats = NatsServer::start();
    let mut node = Node::start(&nats, json!({"machine_pool_size": 2})).await;
    let user = User::new(&nats).await;
    // A slow function, called and left running.
    let mut slow = user
        .native("slowjs", b"(function () { const t = Date.now(); while (Date.now() - t < 3000) {} return 1; })")
        .await;
    slow.workload_type = "v8".into();
    slow.trigger_subjects = vec!["slow.fn".into()];
    user.deploy(&node.id, &slow).await.unwrap();
    let mut big = script("exec /bin/sleep 7701");
    big.resize(64 * 1024 * 1024, b'#');
    let b = user.native("bigone", &big).await;
    let nc = user.nc.clone();
    let pending_call = tokio::spawn(async move {
        let req = async_nats::Request::new().payload("x".into()).timeout(Some(Duration::from_secs(8)));
        nc.send_request("slow.fn", req).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A deploy of a large artifact, in flight.
    let req = user.request(&node.id, &b).await;
    let nc = user.nc.clone();
    let subject = format!("$NEX.DEPLOY.default.{}", node.id);
    let pending_deploy = tokio::spawn(async move {
        let r = async_nats::Request::new()
            .payload(serde_json::to_vec(&req).unwrap().into())
            .timeout(Some(Duration::from_secs(5)));
        nc.send_request(subject, r).await
    });
    // Soon enough that the 64 MiB copy is still running (a whole deploy of it takes ~350 ms here).
    tokio::time::sleep(Duration::from_millis(60)).await;
    let state = node.state_dir();
    node.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));

    // The callers got errors, never a false success.
    if let Ok(m) = pending_deploy.await.unwrap() {
        let env: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert!(env["error"].is_string(), "deploy reported success from a killed node: {env}");
    }
    if let Ok(m) = pending_call.await.unwrap() {
        let err = m.headers.as_ref().and_then(|h| h.get(nex_api::agent::HEADER_ERROR)).map(|v| v.to_string());
        assert!(err.is_some(), "a trigger got a success from a killed node: {:?} {:?}", m.payload, m.headers);
    }

    // Restarted on the same state: nothing of the old run is left.
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let old_runs: Vec<String> = std::fs::read_dir(state.join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    drop(node);
    let cfg = node_config(dir.path(), json!({}));
    let node2 = Node::start_in(&nats, dir, cfg, &[]).await;
    for r in &old_runs {
        assert!(!node2.state_dir().join("runs").join(r).exists());
    }
    assert!(processes_matching("sleep 7701").is_empty());
    assert!(leftovers_under(&node2.state_dir()).is_empty(), "{:?}", leftovers_under(&node2.state_dir()));
    let info = User::new(&nats).await.info(&node2.id).await;
    assert!(info.machines.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_functions_at_once() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_pool_size": 4})).await;
    let user = std::sync::Arc::new(User::new(&nats).await);
    let (loc, hash) = user.upload("many", b"(function (s, p) { return s; })").await;
    let info = user.info(&node.id).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let user = user.clone();
        let node_id = node.id.clone();
        let xkey = info.public_xkey.clone();
        let b = nex_client::DeployBuilder {
            name: format!("many{i}"),
            workload_type: "v8".into(),
            location: loc.clone(),
            hash: hash.clone(),
            trigger_subjects: vec![format!("many.{i}")],
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            let req = b.build(&user.issuer, &user.xkey, &node_id, &xkey).unwrap();
            user.client.deploy(&node_id, &req).await.map(|r| (r.id, r.name)).map_err(|e| e.to_string())
        }));
    }
    let mut deployed = Vec::new();
    for t in tasks {
        deployed.push(t.await.unwrap().expect("every deploy succeeds"));
    }
    for i in (0..200).step_by(7) {
        let m = user.nc.request(format!("many.{i}"), "x".into()).await.unwrap();
        assert_eq!(std::str::from_utf8(&m.payload).unwrap(), format!("\"many.{i}\""));
    }
    assert_eq!(user.info(&node.id).await.machines.len(), 200);
    let mut stops = Vec::new();
    for (id, name) in deployed {
        let user = user.clone();
        let node_id = node.id.clone();
        stops.push(tokio::spawn(async move { user.stop(&node_id, &id, &name).await }));
    }
    for s in stops {
        assert!(s.await.unwrap().expect("stop").stopped);
    }
    assert!(user.info(&node.id).await.machines.is_empty());
    eventually(Duration::from_secs(20), "only warm agents left", || {
        let agents = processes_matching("nex-agent")
            .into_iter()
            .filter(|(p, _)| {
                std::fs::read_link(format!("/proc/{p}/cwd")).map(|c| c.starts_with(node.state_dir())).unwrap_or(false)
            })
            .count();
        agents <= 4
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_download_fails_cleanly() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let target = std::ffi::CString::new(state.to_str().unwrap()).unwrap();
    let fstype = std::ffi::CString::new("tmpfs").unwrap();
    let opts = std::ffi::CString::new("size=4m,mode=0700").unwrap();
    // SAFETY: mounting a tmpfs on a directory this test owns.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, opts.as_ptr().cast()) };
    if rc != 0 {
        println!("skipped: cannot mount a small tmpfs here ({})", std::io::Error::last_os_error());
        return;
    }
    struct Unmount(std::ffi::CString);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // SAFETY: unmounting what this test mounted.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _guard = Unmount(target);
    let cfg = node_config(dir.path(), json!({}));
    let node = Node::start_in(&nats, dir, cfg, &[]).await;
    let user = User::new(&nats).await;
    let mut big = script("exec /bin/sleep 7801");
    big.resize(8 * 1024 * 1024, b'#');
    let b = user.native("toolarge", &big).await;
    let e = user.deploy(&node.id, &b).await.unwrap_err();
    assert!(e.starts_with("Failed to cache workload bytes:"), "{e}");
    assert!(e.to_lowercase().contains("no space"), "{e}");
    // Nothing half deployed; the node keeps serving.
    assert!(user.info(&node.id).await.machines.is_empty());
    assert!(processes_matching("sleep 7801").is_empty());
    let small = user.native("fits", &script("exec /bin/sleep 600")).await;
    user.deploy(&node.id, &small).await.expect("a small one still deploys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_nats_server_is_restarted_and_workloads_keep_running() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_pool_size": 2})).await;
    let user = User::new(&nats).await;
    let svc = user.native("survivor", &script("exec /bin/sleep 7402")).await;
    let s = user.deploy(&node.id, &svc).await.unwrap();
    let mut f = user.native("survivorjs", b"(function (s, p) { return 'still ' + String.fromCharCode(...p); })").await;
    f.workload_type = "v8".into();
    f.trigger_subjects = vec!["survivor.fn".into()];
    user.deploy(&node.id, &f).await.unwrap();

    let before = internal_nats_pid(&node.state_dir()).expect("internal nats-server");
    // SAFETY: killing the test node's internal server.
    unsafe { libc::kill(before, libc::SIGKILL) };
    // A new one comes up; the node deploys again within 30 s.
    let t = Instant::now();
    let again = user.native("afterkill", &script("exec /bin/sleep 7403")).await;
    let deployed = loop {
        match user.deploy(&node.id, &again).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "no deploy within 30 s of the kill: {e}\n{}",
                    node.log()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert!(deployed.started);
    assert_ne!(internal_nats_pid(&node.state_dir()), Some(before));
    // What ran before still runs, and the function still answers.
    let info = user.info(&node.id).await;
    assert!(info.machines.iter().any(|m| m.id == s.id), "{:?}", info.machines);
    assert_eq!(processes_matching("sleep 7402").len(), 1);
    let m = user.nc.request("survivor.fn", "x".into()).await.unwrap();
    assert_eq!(&m.payload[..], br#""still x""#);
    tokio::time::sleep(Duration::from_secs(16)).await;
    // Its agent was not given up for lost during the outage.
    assert!(user.info(&node.id).await.machines.iter().any(|m| m.id == s.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_flood_is_limited_by_the_node_and_exits_still_arrive_at_once() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_pool_size": 3})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    // JavaScript console lines bypass the agent's own limit for native output: the node's
    // limit holds them.
    let mut f = user
        .native("chatty", b"(function () { for (let i = 0; i < 100000; i++) console.log('line ' + i); return 1; })")
        .await;
    f.workload_type = "v8".into();
    f.trigger_subjects = vec!["chatty.go".into()];
    let flood = user.deploy(&node.id, &f).await.unwrap();
    let nc = user.nc.clone();
    let flooding = tokio::spawn(async move {
        for _ in 0..5 {
            let req = async_nats::Request::new().payload("".into()).timeout(Some(Duration::from_secs(20)));
            let _ = nc.send_request("chatty.go", req).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile a service exits: its workload_undeployed arrives within a second of the exit.
    let quick = user.native("quick", &script("sleep 1; exit 3")).await;
    let q = user.deploy(&node.id, &quick).await.unwrap();
    let deployed_at = Instant::now();
    rec.wait_until(Duration::from_secs(10), "the quick exit", |r| {
        !r.workload_events("workload_undeployed", &q.id).is_empty()
    })
    .await;
    let took = deployed_at.elapsed();
    assert!(took < Duration::from_millis(2000), "exit handled {took:?} after deploy (1 s of it the workload's)");
    flooding.await.unwrap();
    // At most the burst plus the rate over the flood's duration got through, and the drops were said.
    let lines =
        rec.logs(&flood.id).iter().filter(|(_, v)| v["text"].as_str().is_some_and(|t| t.starts_with("line "))).count();
    assert!(lines < 20_000, "{lines} lines passed the node's limit");
    assert!(log_texts(&rec, &flood.id).iter().any(|t| t.starts_with("nex: dropped ")), "no drop report");
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", node.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(rss_kb < 150 * 1024, "node RSS {rss_kb} kB");
}
