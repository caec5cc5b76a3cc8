//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// nex — the NATS execution engine.
#[derive(Debug, Parser)]
#[command(
    name = "nex",
    version,
    about = "Run native services and WebAssembly/JavaScript functions on nodes attached to NATS",
    after_help = "Examples:\n  nex up                                   # local NATS + node, every workload type\n  nex devrun ./echoservice NATS_URL=nats://127.0.0.1:4222\n  nex node ls\n  nex logs --workload_name echoservice"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// The `--server` default.
pub const DEFAULT_SERVER: &str = "nats://127.0.0.1:4222";

/// Connection and output options shared by every command.
#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    /// NATS server URL(s), comma separated
    #[arg(short = 's', long = "server", env = "NATS_URL", default_value = DEFAULT_SERVER, global = true)]
    pub server: String,
    /// User credentials file (JWT auth)
    #[arg(long, env = "NATS_CREDS", global = true)]
    pub creds: Option<PathBuf>,
    /// NKey seed file
    #[arg(long, env = "NATS_NKEY", global = true)]
    pub nkey: Option<PathBuf>,
    /// Username, or token when --password is empty
    #[arg(long, env = "NATS_USER", global = true)]
    pub user: Option<String>,
    /// Password (prefer NATS_PASSWORD or --password_file: the command line is visible to every local user)
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true, global = true)]
    pub password: Option<String>,
    /// File holding the password
    #[arg(
        long = "password_file",
        alias = "password-file",
        env = "NATS_PASSWORD_FILE",
        global = true,
        conflicts_with = "password"
    )]
    pub password_file: Option<PathBuf>,
    /// Client certificate (TLS)
    #[arg(long, env = "NATS_CERT", global = true)]
    pub tlscert: Option<PathBuf>,
    /// Client key (TLS)
    #[arg(long, env = "NATS_KEY", global = true)]
    pub tlskey: Option<PathBuf>,
    /// CA bundle (TLS)
    #[arg(long, env = "NATS_CA", global = true)]
    pub tlsca: Option<PathBuf>,
    /// TLS handshake before the server's INFO (servers configured with handshake_first)
    #[arg(long, global = true)]
    pub tlsfirst: bool,
    /// Use a `nats` CLI context (from $XDG_CONFIG_HOME/nats/context, ~/.config by default);
    /// replaces every other connection flag. Without it, the context `nats context select` chose
    /// is used when neither a server nor credentials are given.
    #[arg(long, env = "NATS_CONTEXT", global = true)]
    pub context: Option<String>,
    /// Request timeout and the gather window of PING/WPING/AUCTION (e.g. 2s, 750ms)
    #[arg(long, env = "NATS_TIMEOUT", default_value = "2s", global = true, value_parser = parse_duration)]
    pub timeout: std::time::Duration,
    /// Namespace of namespaced subjects
    #[arg(long, env = "NEX_NAMESPACE", default_value = "default", global = true)]
    pub namespace: String,
    /// JetStream domain of the artifact bucket
    #[arg(long, global = true)]
    pub jsdomain: Option<String>,
    /// NATS connection name
    #[arg(long = "conn-name", global = true)]
    pub conn_name: Option<String>,
    /// Log level: none, error, warn, info, debug, trace
    #[arg(long, env = "NEX_LOGLEVEL", default_value = "info", global = true)]
    pub loglevel: String,
    /// Log as JSON lines
    #[arg(long, env = "NEX_LOGJSON", global = true)]
    pub logjson: bool,
    /// Where log lines go, repeatable: std (stderr), file (./nex.log, errors also in ./nex.err),
    /// nats (published on $NEX.logs.system.<node>.stdout|stderr by `nex node up`)
    #[arg(long, env = "NEX_LOGGER", value_delimiter = ',', default_value = "std", global = true, value_parser = ["std", "file", "nats"])]
    pub logger: Vec<String>,
}

/// Warns when `flag` was given a value on the command line, where every local user can read it
/// (`ps`, `/proc/<pid>/cmdline`).
pub fn warn_if_on_command_line(flag: &str, instead: &str) {
    let on_argv = std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    if on_argv {
        eprintln!("warning: {flag} on the command line is visible to every user of this machine; use {instead}");
    }
}

/// A secret given as `value` (flag or environment) or in `file`; warns when `flag` put it on the
/// command line.
pub fn secret(
    value: &Option<String>,
    file: &Option<std::path::PathBuf>,
    flag: &str,
    instead: &str,
) -> anyhow::Result<Option<String>> {
    match (value, file) {
        (_, Some(f)) => read_secret_file(f).map(Some),
        (Some(v), None) => {
            warn_if_on_command_line(flag, instead);
            Ok(Some(v.clone()))
        }
        (None, None) => Ok(None),
    }
}

/// Reads a secret from a file: its first non-empty line, trimmed.
pub fn read_secret_file(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
        .with_context(|| format!("{} is empty", path.display()))
}

/// Parses `2s`, `750ms`, `1m`, `1.5s` or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a duration (try 2s, 750ms or 1m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if secs < 0.0 || !secs.is_finite() {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run and inspect nodes
    #[command(subcommand, alias = "nodes")]
    Node(NodeCommand),
    /// Deploy a workload from an object store to a node
    #[command(
        after_help = "Example:\n  nex run nats://NEXCLIFILES/echoservice NBCD… NATS_URL=nats://127.0.0.1:4222 \\\n      --xkey ~/.nex/publisher.xk --issuer ~/.nex/issuer.nk --name echoservice"
    )]
    Run(crate::commands::run::RunArgs),
    /// Upload a local file and run it on a matching node (the developer loop)
    #[command(
        alias = "yeet",
        after_help = "Examples:\n  nex devrun ./target/x86_64-unknown-linux-musl/release/echoservice NATS_URL=nats://127.0.0.1:4222\n  nex devrun examples/echofunction.js --trigger_subject hello.js\n  nex devrun echofunction.wasm --trigger_subject hello.wasm"
    )]
    Devrun(crate::commands::devrun::DevrunArgs),
    /// Follow workload log lines (in --namespace)
    #[command(
        after_help = "Examples:\n  nex logs\n  nex logs --workload_name echoservice --level info\n  nex logs --json | jq .log.text"
    )]
    Logs(crate::commands::monitor::LogsArgs),
    /// Follow events (in --namespace and system)
    #[command(after_help = "Examples:\n  nex events\n  nex events --type workload_undeployed --json")]
    Events(crate::commands::monitor::EventsArgs),
    /// Put a node in lame duck mode: no new work (and with --delay, drain and exit)
    #[command(
        after_help = "Examples:\n  nex lameduck NBCD… --delay 10s\n  nex lameduck NBCD… --issuer ~/.nex/admin.nk     # nodes with admin_issuers or valid_issuers"
    )]
    Lameduck(crate::commands::lameduck::LameduckArgs),
    /// Start a local NATS (with JetStream) and a node; Ctrl-C stops both
    #[command(
        after_help = "Examples:\n  nex up            # then, in another terminal: nex node ls\n  nex up --ui       # and the web console on http://127.0.0.1:8787"
    )]
    Up(crate::commands::up::UpArgs),
    /// Send a request (e.g. to a service or a function trigger) and print the reply
    #[command(after_help = "Examples:\n  nex call svc.echo hello\n  nex call hello.js 'hello world'")]
    Call(crate::commands::call::CallArgs),
    /// Measure nex against plain NATS request/reply in one run
    #[command(
        after_help = "Examples:\n  nex bench --json bench.json\n  nex bench --clients 8 --requests 500 --functions 10 --artifact-mib 5"
    )]
    Bench(crate::commands::bench::BenchArgs),
    /// Build the micro-VM guest image: kernel + initramfs or ext4 image with nex-agent as init (no Docker, no root)
    #[command(
        visible_alias = "fs",
        after_help = "Examples:\n  nex rootfs --out /var/lib/nex/microvm\n  nex rootfs -o rootfs.ext4 --size 150      # an ext4 root file system, vmlinuz beside it\n  nex rootfs --kernel-deb ./linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64.deb --out ./guest\n  nex rootfs --kernel /boot/vmlinuz-$(uname -r) --modules /lib/modules/$(uname -r) --out ./guest"
    )]
    Rootfs(crate::commands::rootfs::RootfsArgs),
    /// Show what `nex apply` would change in a deployment, without changing it
    #[command(
        after_help = "Example:\n  nex plan -f echo.json                    # + create, ~ update (field: old → new) or = unchanged"
    )]
    Plan(crate::commands::deployments::PlanArgs),
    /// Create or update a deployment: N replicas the nodes keep running (signed by its issuer)
    #[command(
        after_help = "Examples:\n  nex apply -f echo.yaml --issuer ~/.nex/issuer.nk\n  nex apply -f echo.json --expect-revision 4   # only if nobody changed it since `nex plan`\n\nA spec (YAML, or the same fields as JSON):\n  name: echo\n  workload_type: native\n  replicas: 3\n  artifact: {url: nats://NEXCLIFILES/echoservice, sha256: <sha256sum of the file>}\n  environment: {PORT: 8080}\n  placement: {spread: zone, tags: {tier: web}}\n  resources: {memory_mib: 128}\n  rollout: {max_surge: 1, max_unavailable: 0}\n\nThe spec's \"environment\" is sealed to the fleet xkey the live nodes advertise (their\nfleet_xkey_seed_path; see `nex node fleet-xkey`): only those nodes can read it or run the replicas."
    )]
    Apply(crate::commands::deployments::ApplyArgs),
    /// List, show, remove and roll back deployments
    #[command(subcommand, alias = "deployment")]
    Deployments(crate::commands::deployments::DeploymentsCommand),
    /// Print shell completions
    #[command(after_help = "Example:\n  nex completions bash > /etc/bash_completion.d/nex")]
    Completions(crate::commands::completions::CompletionsArgs),
    /// Stop a workload (signed by the issuer that started it)
    #[command(
        after_help = "Example:\n  nex stop NBCD… cq2v3n6d0b3e1ftrs4ng --name echoservice --issuer ~/.nex/issuer.nk"
    )]
    Stop(crate::commands::run::StopArgs),
    /// A live, read-only web console: nodes, workloads, function metrics, events and logs
    #[command(
        after_help = "Examples:\n  nex ui                                   # then open http://127.0.0.1:8787\n  nex ui --port 9000 -s nats://10.0.0.5:4222\n  nex ui --host 0.0.0.0                    # reachable from other hosts: no authentication!\n  nex up --ui                              # local NATS + node + console"
    )]
    Ui(crate::commands::ui::UiArgs),
}

/// `nex node …`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Start a node and keep it running until Ctrl-C
    #[command(
        after_help = "Examples:\n  nex node up --config ./config.json --no-sandbox --tags region=eu\n  nex node up --metrics --metrics_port 9464     # Prometheus scrapes http://HOST:9464/metrics"
    )]
    Up(crate::commands::node::UpArgs),
    /// List the nodes on this NATS
    #[command(after_help = "Example:\n  nex node ls --full\n  nex node ls --json | jq '.[].node_id'")]
    Ls(crate::commands::node::LsArgs),
    /// Check (and with --init, write) a node configuration and what its tier needs
    #[command(
        after_help = "Examples:\n  nex node preflight --init nosandbox --config ./config.json\n  nex node preflight --check --config ./config.json"
    )]
    Preflight(crate::commands::preflight::PreflightArgs),
    /// List workloads in --namespace on every node (WPING)
    #[command(after_help = "Example:\n  nex node probe --workload echoservice")]
    Probe(crate::commands::node::ProbeArgs),
    /// Show a node's details and its workloads in --namespace
    #[command(after_help = "Example:\n  nex node info NBCD… --full")]
    Info(crate::commands::node::InfoArgs),
    /// Create the fleet's xkey seed: every node given it in fleet_xkey_seed_path can run
    /// deployments whose environment `nex apply` sealed to it
    #[command(
        name = "fleet-xkey",
        after_help = "Example:\n  nex node fleet-xkey --out /etc/nex/fleet.xk   # copy it (mode 0600) to each node\n  # config.json: {\"fleet_xkey_seed_path\": \"/etc/nex/fleet.xk\"}"
    )]
    FleetXkey(crate::commands::node::FleetXkeyArgs),
}
