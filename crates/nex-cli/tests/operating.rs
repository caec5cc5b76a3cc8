//! Operating a node: `nats` contexts for the connection, node logs on NATS, keys the node does not
//! act on named at start-up, and the build in `--version`.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
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
    // `nex logs --system` follows them.
    let follow = Command::new(nex_bin())
        .args(["logs", "--system", "--json", "--count", "1", "--node", &node.id, "-s", &nats.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let user = User::new(&nats).await;
    user.deploy(&node.id, &user.native("syslogged", &script("exec /bin/sleep 7904")).await).await.unwrap();
    let out = tokio::task::spawn_blocking(move || follow.wait_with_output().unwrap()).await.unwrap();
    let line: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(line["node"], node.id.as_str(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(line["stream"] == "stdout" || line["stream"] == "stderr");
}

#[test]
fn version_names_the_build() {
    let out = Command::new(nex_bin()).arg("--version").stdout(Stdio::piped()).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let re_ok = text.starts_with(&format!("v{} [", nex_api::VERSION)) && text.contains("] | Built-on: ");
    assert!(out.status.success() && re_ok, "{text}");
}

/// One HTTP/1.0 exchange with the node's metrics endpoint: `(status, body)`.
fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("{method} {path} on port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The value of the series `name` whose labels include every one of `labels` (and, when
/// `exact`, no label but those and the scope's).
fn sample(text: &str, name: &str, labels: &[&str], exact: bool) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        if n != name {
            return None;
        }
        let got: Vec<&str> = rest.trim_end_matches('}').split(',').filter(|p| !p.is_empty()).collect();
        let own: Vec<&&str> = got.iter().filter(|p| !p.starts_with("otel_scope_")).collect();
        let all = labels.iter().all(|want| got.contains(want));
        (all && (!exact || own.len() == labels.len())).then(|| value.parse().ok())?
    })
}

#[tokio::test]
async fn metrics_count_a_known_sequence_and_the_endpoint_serves_only_metrics() {
    let nats = NatsServer::start();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), json!({"otel_metrics_host": "127.0.0.1", "machine_pool_size": 1}));
    let port_s = port.to_string();
    let node = Node::start_in(
        &nats,
        dir,
        cfg,
        &["--metrics", "--otel_metrics_exporter", "prometheus", "--metrics_port", &port_s],
    )
    .await;
    let user = User::new(&nats).await;

    // 2 deploys, 5 calls of which 2 fail, 1 stop.
    let src: &[u8] = b"(function (s, p) { if (p.length == 4) { throw new Error('asked to fail'); } return p.length; })";
    let mut f = user.native("metricsfn", src).await;
    f.workload_type = "v8".into();
    f.trigger_subjects = vec!["metrics.fn".into()];
    user.deploy(&node.id, &f).await.unwrap();
    let svc = user.deploy(&node.id, &user.native("metricssvc", &script("exec /bin/sleep 7903")).await).await.unwrap();
    for payload in ["ok", "fail", "okay!", "nope", "fine!"] {
        let req = async_nats::Request::new().payload(payload.into()).timeout(Some(Duration::from_secs(5)));
        let _ = user.nc.send_request("metrics.fn", req).await;
    }
    user.stop(&node.id, &svc.id, &svc.name).await.unwrap();

    let fnl = ["namespace=\"default\"", "workload_name=\"metricsfn\""];
    let mut text = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        let (status, body) = http(port, "GET", "/metrics");
        assert_eq!(status, 200, "{body}\n{}", node.log());
        text = body;
        let calls = sample(&text, "nex_function_trigger_total", &fnl, true).unwrap_or(0.0)
            + sample(&text, "nex_function_failed_trigger_total", &fnl, true).unwrap_or(0.0);
        let native = sample(&text, "nex_workload_count", &["workload_type=\"native\""], false);
        if calls >= 5.0 && native == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let get = |name: &str, labels: &[&str]| sample(&text, name, labels, true);
    assert_eq!(get("nex_function_trigger_total", &fnl), Some(3.0), "{text}");
    assert_eq!(get("nex_function_failed_trigger_total", &fnl), Some(2.0), "{text}");
    assert_eq!(get("nex_function_trigger_total", &[]), Some(3.0), "the unlabelled total, as Nex adds it: {text}");
    assert!(get("nex_function_runtime_nanosec_total", &fnl).unwrap_or(0.0) > 0.0, "{text}");
    assert_eq!(get("nex_function_duration_seconds_count", &fnl), Some(3.0), "{text}");
    let v8 = ["workload_type=\"v8\"", "namespace=\"default\""];
    assert_eq!(get("nex_workload_count", &v8), Some(1.0), "{text}");
    assert_eq!(get("nex_workload_count", &["workload_type=\"native\"", "namespace=\"default\""]), Some(0.0));
    assert_eq!(get("nex_workload_count", &[]), Some(1.0), "{text}");
    assert_eq!(get("nex_deployed_bytes_count", &["namespace=\"default\""]), Some(src.len() as f64), "{text}");
    assert_eq!(get("nex_deploy_duration_seconds_count", &["accepted=\"true\""]), Some(2.0), "{text}");
    assert!(get("nex_vm_count", &[]).unwrap_or(0.0) >= 1.0, "{text}");
    assert!(text.contains("service_name=\"nex-node\""), "resource attributes: {text}");
    // `nex node info` says where the metrics are.
    let info = user.info(&node.id).await;
    assert_eq!(info.tags.get("nex.metrics"), Some(&format!("http://127.0.0.1:{port}/metrics")));

    // The endpoint serves metrics and nothing else.
    assert_eq!(http(port, "POST", "/metrics").0, 405);
    assert_eq!(http(port, "GET", "/../../etc/passwd").0, 404);
    assert_eq!(http(port, "GET", "/").0, 404);
    // A second node on a taken port fails at start-up, saying which, and leaves nothing running.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = dir2.path().join("config.json");
    std::fs::write(&cfg2, node_config(dir2.path(), json!({"otel_metrics_host": "127.0.0.1"})).to_string()).unwrap();
    let out = Command::new(nex_bin())
        .args([
            "node",
            "up",
            "--metrics",
            "--otel_metrics_exporter",
            "prometheus",
            "--metrics_port",
            &port_s,
            "--config",
        ])
        .arg(&cfg2)
        .args(["-s", &nats.url()])
        .env("NEX_NATS_SERVER", nats_server_bin())
        .env("HOME", dir2.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{err}");
    assert!(processes_with_cwd_under(dir2.path()).is_empty());
}

/// The spans in a node's `./traces.log` (file exporter: one JSON object per line).
fn spans(node: &Node) -> Vec<Value> {
    let text = std::fs::read_to_string(node.dir.path().join("traces.log")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn in_trace<'a>(spans: &'a [Value], trace: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["trace_id"] == trace).collect()
}

fn named<'a>(spans: &[&'a Value], name: &str) -> &'a Value {
    let found: Vec<_> = spans.iter().filter(|s| s["name"] == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} span expected in {spans:#?}");
    found[0]
}

/// A call with a `traceparent` header, answered without error.
async fn traced_call(nc: &async_nats::Client, subject: &str, traceparent: &str) {
    let mut h = async_nats::HeaderMap::new();
    h.insert("traceparent", traceparent);
    let req = async_nats::Request::new().headers(h).payload("traced".into()).timeout(Some(Duration::from_secs(5)));
    let m = nc.send_request(subject.to_string(), req).await.unwrap();
    assert!(m.headers.as_ref().and_then(|h| h.get("x-nex-error")).is_none(), "{m:?}");
}

/// A requester's trace context reaches the node, the agent and host services, on the relayed path
/// and on the path where the agent holds the trigger, and each span is under the one that caused
/// it. A malformed context starts a new trace instead of failing the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_follow_a_call_through_node_agent_and_host_services() {
    let nats = NatsServer::start();
    let start = |agent_triggers: bool| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = node_config(dir.path(), json!({"agent_triggers": agent_triggers, "machine_pool_size": 1}));
        Node::start_in(&nats, dir, cfg, &["--traces"])
    };
    // One after the other: each start waits for the first node_started event it sees.
    let relaying = start(false).await;
    let holding = start(true).await;
    let user = User::new(&nats).await;
    let src: &[u8] = b"(function (s, p) { hostServices.kv.set('last', p); return 'ok'; })";
    for (node, subject) in [(&relaying, "traced.relayed"), (&holding, "traced.held")] {
        let mut f = user.native(&subject.replace('.', "-"), src).await;
        f.workload_type = "v8".into();
        f.trigger_subjects = vec![subject.into()];
        user.deploy(&node.id, &f).await.unwrap();
    }
    let (t1, t2) = ("4bf92f3577b34da6a3ce929d0e0e4736", "5cf92f3577b34da6a3ce929d0e0e4737");
    let parent = "00f067aa0ba902b7";
    traced_call(&user.nc, "traced.relayed", &format!("00-{t1}-{parent}-01")).await;
    traced_call(&user.nc, "traced.held", &format!("00-{t2}-{parent}-01")).await;
    traced_call(&user.nc, "traced.relayed", "00-not-a-trace-context").await;

    // Batches are exported every second.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let complete = |n: &Node, t: &str, want: usize| in_trace(&spans(n), t).len() >= want;
    while !(complete(&relaying, t1, 4) && complete(&holding, t2, 3)) {
        let names = |n: &Node| {
            spans(n)
                .iter()
                .map(|s| format!("{} {} {}", s["trace_id"], s["name"], s["parent_span_id"]))
                .collect::<Vec<_>>()
        };
        assert!(
            std::time::Instant::now() < deadline,
            "spans missing:\n{:#?}\n{:#?}\n{}",
            names(&relaying),
            names(&holding),
            relaying.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Relayed: requester → workload-trigger → internal request → (agent) function call → host services call.
    let all = spans(&relaying);
    let t = in_trace(&all, t1);
    let trigger = named(&t, "workload-trigger");
    let internal = named(&t, "internal request");
    let call = named(&t, "function call");
    let hs = named(&t, "host services call");
    assert_eq!(trigger["parent_span_id"], parent);
    assert_eq!(trigger["kind"], "server");
    assert_eq!(trigger["attributes"]["trigger-subject"], "traced.relayed");
    assert_eq!(trigger["attributes"]["namespace"], "default");
    assert_eq!(internal["parent_span_id"], trigger["span_id"]);
    assert_eq!(internal["kind"], "client");
    assert_eq!(call["parent_span_id"], internal["span_id"]);
    assert_eq!(hs["parent_span_id"], call["span_id"]);
    assert_eq!(hs["attributes"]["service"], "kv");
    let events: Vec<_> = trigger["events"].as_array().unwrap().iter().map(|e| e["name"].clone()).collect();
    assert!(
        events.contains(&json!("Completed internal request")) && events.contains(&json!("published success event"))
    );
    assert_eq!(trigger["resource"]["service.name"], "nex-node");
    assert_eq!(trigger["resource"]["node_pub_key"], relaying.id);
    // The malformed context: a call of its own, in a new trace.
    let roots = all.iter().filter(|s| s["name"] == "workload-trigger" && s["parent_span_id"].is_null()).count();
    assert_eq!(roots, 1, "{all:#?}");
    // The DEPLOY had its server span with Nex's events.
    let deploy = all.iter().find(|s| s["name"] == "Handle Deploy Request").expect("deploy span");
    assert_eq!(deploy["attributes"]["workload_name"], "traced-relayed");
    assert_eq!(deploy["attributes"]["trigger_subjects"], "traced.relayed");
    let events: Vec<_> = deploy["events"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        [
            "Started workload download",
            "Completed workload download",
            "Created agent deploy request",
            "Agent deploy request accepted"
        ]
    );

    // Agent-held: requester → workload-trigger (recorded from the agent's report) → function call → host services call.
    let all = spans(&holding);
    let t = in_trace(&all, t2);
    let trigger = named(&t, "workload-trigger");
    let call = named(&t, "function call");
    let hs = named(&t, "host services call");
    assert_eq!(trigger["parent_span_id"], parent);
    assert_eq!(trigger["attributes"]["trigger-subject"], "traced.held");
    assert_eq!(call["parent_span_id"], trigger["span_id"]);
    assert_eq!(hs["parent_span_id"], call["span_id"]);
    assert!(call["start_time_unix_nano"].as_u64() <= call["end_time_unix_nano"].as_u64());

    // `nex node info` names where traces go.
    let info = user.info(&holding.id).await;
    assert_eq!(info.tags.get("nex.traces").map(String::as_str), Some("./traces.log"));
    assert!(info.build.starts_with(&format!("v{}", env!("CARGO_PKG_VERSION"))), "{}", info.build);
}

/// The OTLP exporters send where `otlp_exporter_url` says: protobuf over HTTP to `/v1/traces`, and
/// HTTP/2 (gRPC) — each from where it can run (the gRPC one needs the node's runtime), with the
/// node still answering afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exporters_send_to_the_collector_url() {
    let nats = NatsServer::start();
    let user = User::new(&nats).await;
    for exporter in ["http", "grpc"] {
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let s = seen.clone();
        let port = http_server(move |head| {
            s.lock().unwrap().push(head.to_string());
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n".into()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = node_config(dir.path(), json!({"otlp_exporter_url": format!("127.0.0.1:{port}")}));
        let node = Node::start_in(&nats, dir, cfg, &["--traces", "--otel_traces_exporter", exporter]).await;
        let info = user.info(&node.id).await;
        let at = info.tags.get("nex.traces").cloned().unwrap_or_default();
        assert!(at.contains(&format!("127.0.0.1:{port}")), "{at}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let arrived = |want: &str| seen.lock().unwrap().iter().any(|h| h.contains(want));
        let want = if exporter == "http" { "POST /v1/traces" } else { "PRI * HTTP/2.0" };
        while !arrived(want) {
            assert!(
                std::time::Instant::now() < deadline,
                "{exporter}: nothing sent: {:?}\n{}",
                seen.lock().unwrap(),
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if exporter == "http" {
            assert!(arrived("application/x-protobuf"), "{:?}", seen.lock().unwrap());
        }
        // Still serving, and the export did not panic.
        user.info(&node.id).await;
        assert!(!node.log().contains("panicked"), "{}", node.log());
    }
}

/// `public_nats_server`: the node starts its own nats-server (JetStream on, loopback unless told
/// otherwise), connects to it, and stops it on exit; an option it would not apply is refused by
/// name, and nothing is left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_nats_server_is_started_used_and_stopped() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path();
    let conf = |opts: Value| {
        let p = h.join("config.json");
        std::fs::write(&p, node_config(h, json!({"public_nats_server": opts})).to_string()).unwrap();
        p
    };
    // Refused: an option the node does not pass on.
    let bad = conf(json!({"port": port, "authorization": {"token": "t"}}));
    let (ok, out) = output(nex_at(h).args(["node", "up", "--config"]).arg(&bad));
    assert!(!ok && out.contains("option \"authorization\" is not supported"), "{out}");
    assert!(processes_matching("public-nats.conf").is_empty());

    let good = conf(json!({"server_name": "nex-public", "port": port, "jetstream": true}));
    let log = std::fs::File::create(h.join("node.log")).unwrap();
    let mut node = nex_at(h)
        .args(["node", "up", "--config"])
        .arg(&good)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let nc = loop {
        if let Ok(nc) = async_nats::connect(&url).await {
            break nc;
        }
        let log = std::fs::read_to_string(h.join("node.log")).unwrap_or_default();
        assert!(std::time::Instant::now() < deadline, "no public server:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(nc.server_info().server_name, "nex-public");
    // The node answers on it, and JetStream is on.
    let client = nex_client::ControlClient::new(nc.clone(), Duration::from_millis(500), "default");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client.ping_nodes().await.unwrap_or_default().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the node did not answer on its own server");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    async_nats::jetstream::new(nc.clone()).query_account().await.expect("JetStream on the public server");
    // Loopback only.
    assert!(listening_tcp().iter().any(|(ip, p)| *p == port && ip.is_loopback()));
    assert!(!listening_tcp().iter().any(|(ip, p)| *p == port && !ip.is_loopback()));

    // SAFETY: signalling the node this test started.
    unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
    assert!(node.wait().unwrap().success());
    assert!(processes_matching("public-nats.conf").is_empty(), "the public server outlived its node");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
