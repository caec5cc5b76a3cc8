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
    // Environment keys are upper-cased for native workloads (W6); one message per line (W7).
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
        processes_with_cwd_under(&work_dir)
            .iter()
            .all(|(_, cmd)| cmd.contains("nex-agent"))
    })
    .await;
    let texts: Vec<String> = rec.logs(&subject).iter().map(|(_, v)| v["text"].as_str().unwrap_or("").to_string()).collect();
    assert!(texts.iter().any(|t| t == "Workload stopped"), "{texts:?}");
    // A last line without a newline is still shipped when the workload ends.
    assert!(texts.iter().any(|t| t == "no newline"), "{texts:?}");
}

/// Processes whose working directory lies under `dir`.
pub fn processes_with_cwd_under(dir: &std::path::Path) -> Vec<(i32, String)> {
    let dir = std::fs::canonicalize(dir).unwrap_or(dir.to_path_buf());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) {
            if cwd.starts_with(&dir) {
                let c = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                out.push((pid, String::from_utf8_lossy(&c).replace('\0', " ")));
            }
        }
    }
    out
}
