//! Operating a node: `nats` contexts for the connection, node logs on NATS, keys the node does not
//! act on named at start-up, and the build in `--version`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

/// `nex` with `HOME` at `home` and no connection settings from the test's environment.
fn nex_at(home: &std::path::Path) -> Command {
    let mut c = Command::new(nex_bin());
    c.env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("NATS_URL")
        .env_remove("NATS_CONTEXT")
        .env("NEX_NATS_SERVER", nats_server_bin());
    c
}

fn write_context(home: &std::path::Path, name: &str, body: Value) {
    let dir = home.join(".config/nats/context");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.json")), body.to_string()).unwrap();
}

fn output(c: &mut Command) -> (bool, String) {
    let o = c.output().unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

#[tokio::test]
async fn a_nats_context_supplies_server_and_credentials_to_node_and_cli() {
    let nats = NatsServer::start_with(&["--user", "ctxu", "--pass", "ctxp"]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    write_context(h, "lab", json!({"description": "test", "url": nats.url(), "user": "ctxu", "password": "ctxp"}));
    write_context(h, "wrong", json!({"url": nats.url(), "user": "ctxu", "password": "nope"}));
    write_context(h, "viansc", json!({"url": nats.url(), "nsc": "nsc://op/acct/user"}));

    // The node takes its connection from the context alone (no --server).
    let nc = async_nats::ConnectOptions::with_user_and_password("ctxu".into(), "ctxp".into())
        .connect(nats.url())
        .await
        .unwrap();
    let mut started = nc.subscribe("$NEX.events.system.node_started").await.unwrap();
    nex_node::nats_ext::round_trip(&nc).await.unwrap();
    let cfg = h.join("config.json");
    std::fs::write(&cfg, node_config(h, json!({})).to_string()).unwrap();
    let log = std::fs::File::create(h.join("node.log")).unwrap();
    let mut node = nex_at(h)
        .args(["node", "up", "--context", "lab", "--config"])
        .arg(&cfg)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(15), started.next()).await;
    let node_log = || std::fs::read_to_string(h.join("node.log")).unwrap_or_default();
    let msg = msg.unwrap_or_else(|_| panic!("node did not start with the context:\n{}", node_log())).unwrap();
    let id = serde_json::from_slice::<Value>(&msg.payload).unwrap()["data"]["id"].as_str().unwrap().to_string();

    // The CLI: with --context, and with the selected context when nothing else is given.
    let (ok, out) = output(nex_at(h).args(["--context", "lab", "node", "ls", "--json"]));
    assert!(ok && out.contains(&id), "nex --context lab node ls: {out}");
    std::fs::write(h.join(".config/nats/context.txt"), "lab\n").unwrap();
    let (ok, out) = output(nex_at(h).args(["node", "ls", "--json"]));
    assert!(ok && out.contains(&id), "selected context: {out}");

    // An explicit server wins over the selection (and then has no credentials).
    let (ok, out) = output(nex_at(h).args(["-s", &nats.url(), "node", "ls"]));
    assert!(!ok && out.to_lowercase().contains("authorization"), "explicit --server: {out}");
    // Bad contexts are refused with what to do.
    let (ok, out) = output(nex_at(h).args(["--context", "wrong", "node", "ls"]));
    assert!(!ok && out.to_lowercase().contains("authorization"), "wrong password: {out}");
    let (ok, out) = output(nex_at(h).args(["--context", "missing", "node", "ls"]));
    assert!(!ok && out.contains("unknown context provided: missing"), "{out}");
    let (ok, out) = output(nex_at(h).args(["--context", "../../etc/passwd", "node", "ls"]));
    assert!(!ok && out.contains("invalid context name"), "{out}");
    let (ok, out) = output(nex_at(h).args(["--context", "viansc", "node", "ls"]));
    assert!(!ok && out.contains("nsc"), "{out}");

    // SAFETY: signalling the node this test started.
    unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
    let _ = node.wait();
}

#[tokio::test]
async fn node_logs_go_to_nats_and_ignored_keys_are_named() {
    let nats = NatsServer::start();
    let nc = nats.connect().await;
    let mut logs = nc.subscribe("$NEX.logs.system.>").await.unwrap();
    nex_node::nats_ext::round_trip(&nc).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = json!({
        "rate_limiters": {"bandwidth": {"size": 1048576, "one_time_burst": 1048576, "refill_time": 500}},
        "preserve_network": true,
    });
    let cfg = node_config(dir.path(), extra);
    // Preflight lists what the node will not act on.
    let cfg_path = dir.path().join("preflight.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (_, out) = output(nex_at(dir.path()).args(["node", "preflight", "--check", "--config"]).arg(&cfg_path));
    assert!(out.contains("Ignored key") && out.contains("rate_limiters"), "preflight: {out}");
    assert!(out.contains("preserve_network"), "preflight: {out}");

    let node = Node::start_in(&nats, dir, cfg, &["--logger", "std,nats"]).await;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stdout.is_empty() || !stderr.iter().any(|l: &String| l.contains("rate_limiters")) {
        let m = tokio::time::timeout_at(deadline, logs.next()).await;
        let m = m.unwrap_or_else(|_| panic!("no system logs; stdout {stdout:?} stderr {stderr:?}")).unwrap();
        assert!(m.subject.starts_with(&format!("$NEX.logs.system.{}.", node.id)), "{}", m.subject);
        let line = String::from_utf8_lossy(&m.payload).to_string();
        if m.subject.ends_with(".stderr") {
            stderr.push(line);
        } else {
            assert!(m.subject.ends_with(".stdout"));
            stdout.push(line);
        }
    }
    assert!(stderr.iter().any(|l| l.contains("WARN") && l.contains("configuration key rate_limiters is ignored")));
    assert!(stderr.iter().all(|l| l.contains("WARN") || l.contains("ERROR")), "{stderr:?}");
    // `std` still writes to the node's stderr.
    assert!(node.log().contains("configuration key preserve_network is ignored"), "{}", node.log());
}

#[test]
fn version_names_the_build() {
    let out = Command::new(nex_bin()).arg("--version").stdout(Stdio::piped()).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let re_ok = text.starts_with(&format!("v{} [", nex_api::VERSION)) && text.contains("] | Built-on: ");
    assert!(out.status.success() && re_ok, "{text}");
}
