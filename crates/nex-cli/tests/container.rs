//! The `container` tier against a real OCI runtime (runc): the echo service answers through the
//! sandbox, and a hostile workload (examples/escapeprobe) finds the walls where they should be.
//! Every test here is named `container_*`, so `cargo test --release container` runs exactly them.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use nex_api::control::AuctionRequest;
use serde_json::{json, Value};

/// Whether this host can run the tier (root, an OCI runtime, nftables, iproute2); CI installs
/// them and sets NEX_REQUIRE_TIERS=1, so a missing one fails the test there.
fn available() -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root");
    }
    if nex_node::tiers::container::find_runtime("", &[]).is_none() {
        missing.push("runc (apt-get install -y runc)");
    }
    if !on_path("nft") {
        missing.push("nftables (apt-get install -y nftables)");
    }
    if !on_path("ip") {
        missing.push("iproute2");
    }
    tier_available("container", &missing)
}

async fn container_node(nats: &NatsServer, extra: Value) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = node_config(dir.path(), json!({"no_sandbox": false, "isolation": "container"}));
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    Node::start_in(nats, dir, cfg, &[]).await
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// What is left on the host of node run `run` (or of one agent `id` of it).
fn leftovers(run: &str, id: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    let ns_prefix = match id {
        Some(id) => format!("nex-{run}-{id}"),
        None => format!("nex-{run}-"),
    };
    for l in sh("ip", &["netns", "list"]).lines() {
        if l.starts_with(&ns_prefix) {
            out.push(format!("netns {l}"));
        }
    }
    let cid = match id {
        Some(id) => format!("nex-{run}-{id}"),
        None => format!("nex-{run}-"),
    };
    for (pid, cmd) in processes_matching(&cid) {
        if cmd.contains("runc") || cmd.contains("crun") {
            out.push(format!("runtime process {pid}: {cmd}"));
        }
    }
    for h in std::fs::read_dir("/sys/fs/cgroup").map(|r| r.flatten().collect::<Vec<_>>()).unwrap_or_default() {
        let mut p = h.path().join("nex").join(run);
        if let Some(id) = id {
            p = p.join(id);
        }
        if p.exists() {
            out.push(format!("cgroup {}", p.display()));
        }
    }
    if id.is_none() {
        for l in sh("ip", &["-o", "link", "show"]).lines() {
            if l.contains(&format!("nx{run}")) || l.contains(&format!("nxb{run}")) {
                out.push(format!("link {l}"));
            }
        }
        let tables = sh("nft", &["list", "tables"]);
        for t in [format!("nex_{run}"), format!("nexb_{run}")] {
            if tables.contains(&t) {
                out.push(format!("nft table {t}"));
            }
        }
        if Path::new("/var/lib/nex-sandbox").join(run).exists() {
            out.push(format!("sandbox dir /var/lib/nex-sandbox/{run}"));
        }
    }
    out
}

/// The host's address on the bridge of run `run`.
fn bridge_ip(run: &str) -> std::net::IpAddr {
    let out = sh("ip", &["-o", "-4", "addr", "show", "dev", &format!("nxb{run}")]);
    let cidr = out.split_whitespace().skip_while(|w| *w != "inet").nth(1).expect("bridge address");
    cidr.split('/').next().unwrap().parse().unwrap()
}

fn internal_port(node: &Node) -> String {
    // Drop ANSI colour sequences from the log.
    let mut log = String::new();
    let mut esc = false;
    for c in node.log().chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => log.push(c),
        }
    }
    let line = log.lines().find(|l| l.contains("internal NATS server started")).expect("internal port in log");
    line.split("port=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches(|c: char| !c.is_ascii_digit())
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_echoservice_answers_and_is_found_as_sandboxed() {
    if !available() {
        return;
    }
    let nats = NatsServer::start();
    let node = container_node(&nats, json!({})).await;
    let run = run_id(&node);
    let user = User::new(&nats).await;

    // Discovery: the node says which tier it runs, and AUCTION sandboxed:true finds it.
    let info = user.info(&node.id).await;
    assert_eq!(info.tags.get("nex.sandbox").map(String::as_str), Some("container"), "{:?}", info.tags);
    assert!(!info.tags.contains_key("nex.unsafe"));
    let found =
        user.gather(500).auction(&AuctionRequest { sandboxed: Some(true), ..Default::default() }).await.unwrap();
    assert!(found.iter().any(|p| p.node_id == node.id), "{found:?}");
    let unsafe_only =
        user.gather(500).auction(&AuctionRequest { sandboxed: Some(false), ..Default::default() }).await.unwrap();
    assert!(!unsafe_only.iter().any(|p| p.node_id == node.id));

    // The node's state lives in a private directory, and containers still start.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.state_dir()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "state_dir mode {mode:o}");

    let rec = Recorder::start(&user.nc).await;
    let mut b = user.native("echoservice", &musl_example("echoservice")).await;
    b.environment = env(&[("NATS_URL", &nats.url())]);
    let r = user.deploy(&node.id, &b).await.expect("deploy");
    assert!(r.started);
    let line = wait_log(&rec, &r.id, "EchoService 1.0.0 listening on svc.echo via nats://10.213.").await;
    let relay_port: u16 = line.rsplit(':').next().unwrap().trim().parse().unwrap();
    assert!(listening_tcp().iter().any(|(_, p)| *p == relay_port), "the workload's relay listens");
    let mut answer = None;
    for _ in 0..100 {
        if let Ok(Ok(m)) =
            tokio::time::timeout(Duration::from_millis(500), user.nc.request("svc.echo", "through the walls".into()))
                .await
        {
            answer = Some(m.payload);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer.as_deref(), Some(&b"through the walls"[..]), "no echo:\n{}", node.log());

    let s = user.stop(&node.id, &r.id, "echoservice").await.expect("stop");
    assert!(s.stopped);
    eventually(Duration::from_secs(10), "the workload's container, netns and cgroup gone", || {
        leftovers(&run, Some(&r.id)).is_empty()
    })
    .await;
    // Its relay went with it.
    assert!(!listening_tcp().iter().any(|(_, p)| *p == relay_port), "relay port {relay_port} still open");
    assert!(!sh("nft", &["list", "table", "inet", &format!("nex_{run}")]).contains(&format!(". {relay_port}")));
    assert!(!node.state_dir().join("runs").join(&run).join("container/bundles").join(&r.id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_walls_hold_against_an_escape_probe() {
    if !available() {
        return;
    }
    let nats = NatsServer::start();
    let node = container_node(&nats, json!({"machine_pool_size": 2})).await;
    let run = run_id(&node);
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    // A host service listening on every address, and another workload with a relay of its own.
    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let mut other = user.native("echoservice", &musl_example("echoservice")).await;
    other.environment = env(&[("NATS_URL", &nats.url())]);
    let o = user.deploy(&node.id, &other).await.expect("deploy the other workload");
    let line = wait_log(&rec, &o.id, "EchoService 1.0.0 listening on svc.echo via nats://10.213.").await;
    let other_relay: u16 = line.rsplit(':').next().unwrap().trim().parse().unwrap();
    let bridge_ip = bridge_ip(&run);
    // Every port the host listens on, tried at the host's address on the bridge, and the metadata
    // address (no route leads there: nothing leaves the container's namespace).
    let mut targets: Vec<String> = listening_tcp()
        .into_iter()
        .filter(|(ip, _)| ip.is_unspecified() || *ip == bridge_ip)
        .map(|(_, p)| format!("{bridge_ip}:{p}"))
        .collect();
    targets.sort();
    targets.dedup();
    assert!(
        targets.contains(&format!("{bridge_ip}:{host_port}"))
            && targets.contains(&format!("{bridge_ip}:{other_relay}"))
    );
    targets.push("169.254.169.254:80".into());
    let internal = internal_port(&node);
    let mut b = user.native("probe", &musl_example("escapeprobe")).await;
    b.argv = vec!["probe".into(), internal.clone()];
    b.argv.extend(targets.iter().map(|t| format!("tcp={t}")));
    b.environment = env(&[("NATS_URL", &nats.url())]);
    let r = user.deploy(&node.id, &b).await.expect("deploy");
    wait_log(&rec, &r.id, "probe done").await;
    let texts = log_texts(&rec, &r.id);
    let line = |p: &str| texts.iter().find(|t| t.starts_with(p)).cloned().unwrap_or_else(|| panic!("{p}: {texts:?}"));

    // The workload is not the agent's root: an unprivileged user, unable to touch the agent.
    assert_eq!(line("uid: "), "uid: 1000 gid: 1000", "{texts:?}");
    assert_eq!(line("signal agent: "), "signal agent: EPERM", "{texts:?}");
    for f in ["/work/.agent-seed", "/proc/1/mem"] {
        assert!(line(&format!("read {f}: ")).contains("refused"), "{texts:?}");
    }
    assert_eq!(line("io_uring_setup: "), "io_uring_setup: EPERM", "{texts:?}");
    // Network: only the internal NATS port (which wants credentials) answers on the host; the
    // host's listener on 0.0.0.0, the other workload's relay and the metadata address do not.
    for t in &targets {
        let got = line(&format!("tcp: {t}: "));
        if *t == format!("{bridge_ip}:{internal}") {
            assert!(got.ends_with("connected"), "{got}");
        } else {
            assert!(got.contains("refused"), "{t} must be unreachable: {got}");
        }
    }
    drop(host_listener);

    // Only its own processes: the agent (pid 1) and the probe.
    let procs: usize = line("processes visible: ").trim_start_matches("processes visible: ").parse().unwrap();
    assert!(procs <= 2, "{texts:?}");
    // No host files: the root holds only the agent, its libraries and the work directory.
    for f in ["/etc/passwd", "/etc/hostname", "/root/.bashrc", "/work/../etc/shadow", "/proc/1/environ"] {
        assert!(line(&format!("read {f}: ")).contains("refused"), "{texts:?}");
    }
    assert!(line("write /escape-test: ").contains("refused"), "{texts:?}");
    for call in ["mount", "ptrace", "init_module", "unshare"] {
        assert_eq!(line(&format!("{call}: ")), format!("{call}: EPERM"), "{texts:?}");
    }
    // The internal NATS refuses a connection without the agent's credentials.
    assert!(line("internal nats: ").contains("Authorization Violation"), "{texts:?}");
    // The host file the probe tried to create does not exist either.
    assert!(!Path::new("/escape-test").exists());
    let _ = user.stop(&node.id, &r.id, "probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_memory_and_pids_limits_contain_hogs_and_fork_bombs() {
    if !available() {
        return;
    }
    let nats = NatsServer::start();
    let node = container_node(&nats, json!({"machine_template": {"memsize_mib": 48, "pids_max": 32}})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;

    let mut hog = user.native("hog", &musl_example("escapeprobe")).await;
    hog.argv = vec!["oom".into()];
    let r = user.deploy(&node.id, &hog).await.expect("deploy hog");
    rec.wait_until(Duration::from_secs(30), "hog undeployed", |rec| {
        !rec.workload_events("workload_undeployed", &r.id).is_empty()
    })
    .await;
    let ev = &rec.workload_events("workload_undeployed", &r.id)[0];
    assert!(ev["data"]["message"].as_str().unwrap().contains("memory limit of 48 MiB"), "{ev}");

    let mut bomb = user.native("bomb", &musl_example("escapeprobe")).await;
    bomb.argv = vec!["forkbomb".into()];
    let r = user.deploy(&node.id, &bomb).await.expect("deploy bomb");
    let refused = wait_log(&rec, &r.id, "fork refused after").await;
    let n: u32 = refused.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(n < 32, "{refused}");
    assert!(refused.ends_with("EAGAIN"), "{refused}");
    // The node is unaffected: it answers and still deploys.
    let info = user.info(&node.id).await;
    assert_eq!(info.machines.len(), 1);
    let s = user.stop(&node.id, &r.id, "bomb").await.expect("stop");
    assert!(s.stopped);
    // Inside the container the workload runs as `/work/workload`; its cgroup going away means
    // every forked child is gone with it.
    let run = run_id(&node);
    eventually(Duration::from_secs(10), "fork bomb and its cgroup gone", || leftovers(&run, Some(&r.id)).is_empty())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_refuses_a_dynamically_linked_binary() {
    if !available() {
        return;
    }
    let nats = NatsServer::start();
    let node = container_node(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let b = user.native("dynamic", &std::fs::read("/bin/true").unwrap()).await;
    let err = user.deploy(&node.id, &b).await.unwrap_err();
    assert!(err.contains("native binary contains at least one dynamically linked dependency"), "{err}");
    // A NATS_URL naming anything but the node's NATS servers gets no relay: the host's other
    // loopback services stay out of reach.
    let ssh_like = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut b = user.native("static", &musl_example("escapeprobe")).await;
    b.environment = env(&[("NATS_URL", &format!("nats://127.0.0.1:{}", ssh_like.local_addr().unwrap().port()))]);
    let err = user.deploy(&node.id, &b).await.unwrap_err();
    assert!(err.contains("is not a NATS server this node lets workloads reach"), "{err}");
    node.wait_warm(&user.nc).await;
    // The node keeps serving: a static binary deploys next.
    let b = user.native("static", &musl_example("escapeprobe")).await;
    assert!(user.deploy(&node.id, &b).await.expect("deploy").started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_node_sigkill_and_restart_leave_nothing_behind() {
    if !available() {
        return;
    }
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = node_config(dir.path(), json!({"no_sandbox": false, "isolation": "container"}));
    let mut node = Node::start_in(&nats, dir, cfg.clone(), &[]).await;
    let run = run_id(&node);
    let user = User::new(&nats).await;
    let b = user.native("probe", &musl_example("escapeprobe")).await;
    user.deploy(&node.id, &b).await.expect("deploy");
    assert!(!leftovers(&run, None).is_empty(), "the run made nothing?");
    node.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));

    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg2 = cfg;
    cfg2["state_dir"] = json!(state);
    let node2 = Node::start_in(&nats, dir2, cfg2, &[]).await;
    eventually(Duration::from_secs(10), "the dead run cleaned up", || leftovers(&run, None).is_empty()).await;
    assert!(!state.join("runs").join(&run).exists());
    // Its workload process went with its cgroup (checked in `leftovers`).
    // A clean stop of the new node removes its own bridge, firewall and namespaces too.
    let run2: Vec<String> = std::fs::read_dir(state.join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(run2.len(), 1, "{run2:?}");
    let run2 = run2[0].clone();
    drop(node2);
    assert!(leftovers(&run2, None).is_empty(), "{:?}", leftovers(&run2, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_tier_refuses_to_start_without_a_firewall() {
    if !available() {
        return;
    }
    // A PATH with iproute2 and the runtime but no nft: the node must not start unfenced.
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["ip", "runc", "ldd"] {
        let found =
            ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().map(|d| Path::new(d).join(tool)).find(|p| p.is_file());
        std::os::unix::fs::symlink(found.unwrap_or_else(|| panic!("{tool} not found")), bin.join(tool)).unwrap();
    }
    let cfg = node_config(dir.path(), json!({"no_sandbox": false, "isolation": "container"}));
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = std::process::Command::new(nex_bin())
        .args(["node", "up", "--config"])
        .arg(&cfg_path)
        .args(["-s", &nats.url()])
        .env("PATH", &bin)
        .env("NEX_NATS_SERVER", nats_server_bin())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the node started without a firewall:\n{err}");
    assert!(err.contains("need an nftables firewall"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_node_stopped_with_sigint_leaves_no_bridge_behind() {
    if !available() {
        return;
    }
    let nats = NatsServer::start();
    for round in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let cfg =
            node_config(dir.path(), json!({"no_sandbox": false, "isolation": "container", "machine_pool_size": 2}));
        let mut node = Node::start_in(&nats, dir, cfg, &[]).await;
        let run = run_id(&node);
        assert!(!leftovers(&run, None).is_empty(), "round {round}: the run made nothing?");
        assert!(node.signal_and_wait(libc::SIGINT, Duration::from_secs(20)).is_some(), "round {round}: no exit");
        eventually(Duration::from_secs(5), &format!("round {round}: nothing of run {run} left"), || {
            leftovers(&run, None).is_empty()
        })
        .await;
    }
}
