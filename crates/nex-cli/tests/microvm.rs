//! The `microvm` tier: real QEMU guests booted from the image `nex rootfs` builds (`make build`
//! writes it to target/microvm), under software emulation (TCG) on hosts without working KVM.
//! Every test here is named `microvm_*`, so `cargo test --release microvm` runs exactly them.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use nex_api::control::AuctionRequest;
use serde_json::{json, Value};

fn image_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/microvm")
}

/// Whether this host can run the tier (root and QEMU; CI installs qemu-system-x86). The guest
/// image is part of the build, so its absence is a failure, not a skip.
fn available() -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root");
    }
    if nex_node::tiers::microvm::find_qemu(&[]).is_none() {
        missing.push("QEMU (apt-get install -y qemu-system-x86)");
    }
    if !on_path("nft") {
        missing.push("nftables (apt-get install -y nftables)");
    }
    if !tier_available("microvm", &missing) {
        return false;
    }
    for f in ["vmlinuz", "rootfs.cpio"] {
        assert!(
            image_dir().join(f).is_file(),
            "{} is missing: run `make build` (it runs `nex rootfs --out target/microvm`)",
            image_dir().join(f).display()
        );
    }
    true
}

fn microvm_config(dir: &std::path::Path, kernel: PathBuf, image: PathBuf, extra: Value) -> Value {
    let mut cfg = node_config(
        dir,
        json!({
            "no_sandbox": false,
            "isolation": "microvm",
            "microvm_accel": "tcg",
            "kernel_filepath": kernel,
            "rootfs_filepath": image,
            "machine_template": {"vcpu_count": 1, "memsize_mib": 256},
        }),
    );
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    cfg
}

async fn microvm_node(nats: &NatsServer) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let cfg = microvm_config(dir.path(), image_dir().join("vmlinuz"), image_dir().join("rootfs.cpio"), json!({}));
    Node::start_in(nats, dir, cfg, &[]).await
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// QEMU processes of node run `run` (of its guest for agent `id` when given).
fn guests(run: &str, id: Option<&str>) -> Vec<(i32, String)> {
    let name = match id {
        Some(id) => format!("nex-{run}-{id}"),
        None => format!("nex-{run}-"),
    };
    processes_matching(&name).into_iter().filter(|(_, cmd)| cmd.contains("qemu-system")).collect()
}

/// What is left on the host of node run `run`: guests, tap devices, bridge, firewall.
fn leftovers(run: &str) -> Vec<String> {
    let mut out: Vec<String> = guests(run, None).into_iter().map(|(p, c)| format!("qemu {p}: {c}")).collect();
    for l in sh("ip", &["-o", "link", "show"]).lines() {
        if l.contains(&format!("nv{run}")) || l.contains(&format!("nxb{run}")) {
            out.push(format!("link {l}"));
        }
    }
    let tables = sh("nft", &["list", "tables"]);
    for t in [format!("nex_{run}"), format!("nexb_{run}")] {
        if tables.contains(&t) {
            out.push(format!("nft table {t}"));
        }
    }
    out
}

fn taps(run: &str) -> Vec<String> {
    sh("ip", &["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        .filter(|n| n.starts_with(&format!("nv{run}")))
        .collect()
}

/// The echo service's answer to `body`, retried while the guest's service comes up.
async fn echo(user: &User, body: &str) -> Option<String> {
    for _ in 0..100 {
        let req = user.nc.request("svc.echo", body.to_string().into());
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), req).await {
            return Some(String::from_utf8_lossy(&m.payload).to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_echoservice_answers_streams_logs_and_leaves_nothing() {
    if !available() {
        return;
    }
    let nats = NatsServer::start();
    let node = microvm_node(&nats).await;
    let run = run_id(&node);
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;

    // Discovery: a sandboxed node, found by AUCTION sandboxed:true.
    let info = user.info(&node.id).await;
    assert_eq!(info.tags.get("nex.sandbox").map(String::as_str), Some("microvm"), "{:?}", info.tags);
    assert!(!info.tags.contains_key("nex.unsafe"));
    let found =
        user.gather(500).auction(&AuctionRequest { sandboxed: Some(true), ..Default::default() }).await.unwrap();
    assert!(found.iter().any(|p| p.node_id == node.id), "{found:?}");
    let ls = std::process::Command::new(nex_bin()).args(["node", "ls", "--json", "-s", &nats.url()]).output().unwrap();
    let nodes: Value = serde_json::from_slice(&ls.stdout).unwrap();
    let me = nodes.as_array().unwrap().iter().find(|n| n["node_id"] == node.id.as_str()).expect("node in ls");
    assert_eq!(me["tags"]["nex.sandbox"], "microvm", "{me}");

    let mut b = user.native("echoservice", &musl_example("echoservice")).await;
    b.environment = env(&[("NATS_URL", &nats.url())]);
    let r = user.deploy(&node.id, &b).await.expect("deploy");
    assert!(r.started);
    let guest = guests(&run, Some(&r.id));
    assert_eq!(guest.len(), 1, "the workload runs in its own guest");
    // QEMU runs under its own seccomp filter.
    assert!(guest[0].1.contains("-sandbox on"), "{}", guest[0].1);
    let status = std::fs::read_to_string(format!("/proc/{}/status", guest[0].0)).unwrap();
    assert!(status.lines().any(|l| l.starts_with("Seccomp:") && l.ends_with('2')), "{status}");

    // The workload's stdout reaches `nex logs` subscribers.
    let line = wait_log(&rec, &r.id, "EchoService 1.0.0 listening on svc.echo via nats://10.213.").await;
    assert!(!line.contains("127.0.0.1"), "the guest dials the node's relay, not the host's loopback: {line}");

    assert_eq!(echo(&user, "from a guest").await.as_deref(), Some("from a guest"), "no echo:\n{}", node.log());

    // A hostile workload in a guest is an unprivileged user there: not the agent's root.
    node.wait_warm(&user.nc).await;
    let mut probe = user.native("probe", &musl_example("escapeprobe")).await;
    probe.argv = vec!["probe".into()];
    let p = user.deploy(&node.id, &probe).await.expect("deploy probe");
    wait_log(&rec, &p.id, "probe done").await;
    let texts = log_texts(&rec, &p.id);
    let line = |x: &str| texts.iter().find(|t| t.starts_with(x)).cloned().unwrap_or_else(|| panic!("{x}: {texts:?}"));
    assert_eq!(line("uid: "), "uid: 1000 gid: 1000", "{texts:?}");
    assert_eq!(line("signal agent: "), "signal agent: EPERM", "{texts:?}");
    for f in ["/run/agent-seed", "/proc/1/mem", "/proc/1/environ"] {
        assert!(line(&format!("read {f}: ")).contains("refused"), "{texts:?}");
    }
    user.stop(&node.id, &p.id, "probe").await.expect("stop probe");

    let taps_before = taps(&run);
    let s = user.stop(&node.id, &r.id, "echoservice").await.expect("stop");
    assert!(s.stopped);
    eventually(Duration::from_secs(10), "the workload's QEMU gone", || guests(&run, Some(&r.id)).is_empty()).await;
    eventually(Duration::from_secs(10), "the workload's tap device gone", || {
        let now = taps(&run);
        taps_before.iter().filter(|t| !now.contains(t)).count() == 1
    })
    .await;

    // Stopping the node removes the warm guests, taps, bridge and firewall of its run.
    drop(node);
    assert!(leftovers(&run).is_empty(), "{:?}", leftovers(&run));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_refuses_a_dynamically_linked_binary() {
    if !available() {
        return;
    }
    let nats = NatsServer::start();
    let node = microvm_node(&nats).await;
    let user = User::new(&nats).await;
    let b = user.native("dynamic", &std::fs::read("/bin/true").unwrap()).await;
    let err = user.deploy(&node.id, &b).await.unwrap_err();
    assert!(err.contains("native binary contains at least one dynamically linked dependency"), "{err}");
    // The node keeps serving: a static binary deploys next.
    node.wait_warm(&user.nc).await;
    let b = user.native("static", &musl_example("escapeprobe")).await;
    assert!(user.deploy(&node.id, &b).await.expect("deploy").started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_guest_that_never_handshakes_is_replaced() {
    if !available() {
        return;
    }
    // An image whose init is not the agent: the guest boots and never asks for its metadata.
    let silent = tempfile::tempdir().unwrap();
    let deb = std::fs::read_dir(image_dir().join("cache"))
        .expect("target/microvm/cache holds the kernel package")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a kernel .deb in target/microvm/cache");
    let probe =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/x86_64-unknown-linux-musl/release/escapeprobe");
    let out = std::process::Command::new(nex_bin())
        .args(["rootfs", "--out"])
        .arg(silent.path())
        .arg("--kernel-deb")
        .arg(&deb)
        .arg("--init")
        .arg(&probe)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = microvm_config(
        dir.path(),
        silent.path().join("vmlinuz"),
        silent.path().join("rootfs.cpio"),
        json!({"agent_handshake_timeout_ms": 1000}),
    );
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let mut child = std::process::Command::new(nex_bin())
        .args(["node", "up", "--config"])
        .arg(&cfg_path)
        .args(["-s", &nats.url()])
        .env("NEX_NATS_SERVER", nats_server_bin())
        .env("NEX_LOG", "info,nex_node=debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let node_log = || std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
    // The pool gives up on the silent guest, kills it and boots another.
    let mut pids = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while pids.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no replacement guest:\n{}", node_log());
        let runs: Vec<String> = std::fs::read_dir(dir.path().join("state/runs"))
            .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
            .unwrap_or_default();
        for run in &runs {
            for (pid, _) in guests(run, None) {
                pids.insert(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(node_log().contains("handshake"), "{}", node_log());
    let run = std::fs::read_dir(dir.path().join("state/runs"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .to_string();
    // At most the one guest being tried is alive; the first is gone.
    eventually(Duration::from_secs(10), "the silent guest killed", || guests(&run, None).len() <= 1).await;
    // The node keeps serving control requests meanwhile.
    let user = User::new(&nats).await;
    let found = user.gather(500).auction(&AuctionRequest::default()).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let node_id = found[0].node_id.clone();
    let info = user.info(&node_id).await;
    assert_eq!(info.available_agents, 0);

    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(leftovers(&run).is_empty(), "{:?}", leftovers(&run));
}

/// Nex's guide builds an ext4 root file system and points `kernel_path` / `rootfs_path` at it:
/// `nex rootfs -o rootfs.ext4` writes one without root, and the tier boots it as a read-only
/// disk with a copy-on-write overlay per guest, leaving the image unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_boots_an_ext4_root_file_system_from_nex_rootfs() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let deb = std::fs::read_dir(image_dir().join("cache"))
        .expect("the kernel package cached by `make build`")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a kernel .deb in target/microvm/cache");
    let image = dir.path().join("rootfs.ext4");
    let out = std::process::Command::new(nex_bin())
        .args(["fs", "-o"])
        .arg(&image)
        .args(["--size", "96", "--kernel-deb"])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(nex_node::tiers::microvm::image_kind(&image).unwrap(), nex_node::tiers::microvm::ImageKind::Ext4);
    let digest = |p: &std::path::Path| {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(std::fs::read(p).unwrap()))
    };
    let before = digest(&image);

    let nats = NatsServer::start();
    let mut cfg = node_config(
        dir.path(),
        json!({
            "no_sandbox": false,
            "isolation": "microvm",
            "microvm_accel": "tcg",
            "kernel_path": dir.path().join("vmlinuz"),
            "rootfs_path": image,
            "machine_pool_size": 1,
            "machine_template": {"vcpu_count": 1, "memsize_mib": 256},
        }),
    );
    let node_dir = tempfile::tempdir().unwrap();
    cfg["state_dir"] = json!(node_dir.path().join("state"));
    let node = Node::start_in(&nats, node_dir, cfg, &[]).await;
    let run = run_id(&node);
    let user = User::new(&nats).await;
    let mut b = user.native("echoservice", &musl_example("echoservice")).await;
    b.environment = env(&[("NATS_URL", &nats.url())]);
    let r = user.deploy(&node.id, &b).await.expect("deploy");
    let guest = guests(&run, Some(&r.id));
    assert!(guest[0].1.contains(&format!("file={},format=raw,if=none,id=root,snapshot=on", image.display())));
    assert_eq!(echo(&user, "from ext4").await.as_deref(), Some("from ext4"), "no echo:\n{}", node.log());
    user.stop(&node.id, &r.id, "echoservice").await.expect("stop");
    drop(node);
    assert!(leftovers(&run).is_empty(), "{:?}", leftovers(&run));
    assert_eq!(digest(&image), before, "the guests wrote to the image");
    // A compressed image (as Nex's releases ship) is refused with what to do.
    let gz = dir.path().join("rootfs.ext4.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).unwrap();
    let e = nex_node::tiers::microvm::image_kind(&gz).unwrap_err().to_string();
    assert!(e.contains("gunzip"), "{e}");
}
