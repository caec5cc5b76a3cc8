//! The node configuration file (Nex 0.2's keys, including the `kernel_path` / `rootfs_path`
//! spellings, plus ours): defaults, loading, validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use nex_api::workload_type;

/// Isolation tier names.
pub mod isolation {
    /// Agents as child processes in their own process group and cgroup.
    pub const PROCESS: &str = "process";
    /// Agents in OCI containers.
    pub const CONTAINER: &str = "container";
    /// Agents as the init of a micro-VM.
    pub const MICROVM: &str = "microvm";
}

/// Default `deploy_max_age`: ten minutes.
pub const DEFAULT_DEPLOY_MAX_AGE_SECS: u64 = 600;

/// Accepts a number of seconds or a string with a unit (`ms`, `s`, `m`, `h`).
fn de_duration_secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => {
            n.as_u64().ok_or_else(|| D::Error::custom("expected a whole number of seconds"))
        }
        serde_json::Value::String(s) => parse_duration_secs(&s).map_err(D::Error::custom),
        other => Err(D::Error::custom(format!("expected seconds or a duration like \"10m\", got {other}"))),
    }
}

/// Parses `90`, `90s`, `10m`, `1h` or `500ms` (rounded up to whole seconds).
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (try 600, \"90s\" or \"10m\")"))?;
    Ok(match unit.trim() {
        "" | "s" => n,
        "ms" => n.div_ceil(1000),
        "m" => n * 60,
        "h" => n * 3600,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use ms, s, m or h)")),
    })
}

/// Workload types this build can run.
pub const SUPPORTED_WORKLOAD_TYPES: &[&str] = &[workload_type::NATIVE, workload_type::V8, workload_type::WASM];

/// Why a configuration cannot be used; each message names the key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("open {path}: {}", io_text(source))]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The JSON is malformed or a value has the wrong type.
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: String, message: String },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The wording Nex uses for common I/O errors (`no such file or directory`).
fn io_text(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Per-VM (or per-agent) resources.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MachineTemplate {
    pub vcpu_count: u32,
    pub memsize_mib: u64,
    /// Most processes and threads one workload may have (our addition).
    pub pids_max: u64,
}

impl Default for MachineTemplate {
    fn default() -> Self {
        MachineTemplate { vcpu_count: 1, memsize_mib: 256, pids_max: 512 }
    }
}

/// CNI settings of the sandboxed tiers: when the section is present, workloads' networks come
/// from the CNI plugins of network `network_name` (its conflist in `conf_dir`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CniConfig {
    pub network_name: String,
    pub interface_name: String,
    pub subnet: String,
    pub bin_path: Vec<String>,
    pub nameservers: Vec<String>,
    /// Where `<network_name>.conflist` lives (our addition).
    pub conf_dir: String,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            network_name: "fcnet".into(),
            interface_name: "veth0".into(),
            subnet: "192.168.127.0/24".into(),
            bin_path: vec!["/opt/cni/bin".into()],
            nameservers: vec![],
            conf_dir: "/etc/cni/conf.d".into(),
        }
    }
}

/// How sandboxed workloads reach the network (our addition).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct WorkloadNetwork {
    /// `egress` (the default): each workload reaches the outside world through IP masquerade,
    /// never the host, other workloads, link-local addresses or `deny`; `isolated`: only the
    /// node's internal NATS and the relays to allowed NATS servers.
    pub mode: String,
    /// IPv4 networks workloads may not reach in egress mode, besides the built-in ones.
    pub deny: Vec<String>,
    /// IPv4 networks reachable even when a built-in or `deny` entry covers them.
    pub allow: Vec<String>,
    /// Resolvers written to workloads' `/etc/resolv.conf`; empty: `cni.nameservers`, else the
    /// host's non-loopback resolvers.
    pub nameservers: Vec<String>,
    /// Host address forwarded ports (`--port`) listen on.
    pub port_address: String,
}

/// The network modes of the sandboxed tiers.
pub mod network_mode {
    /// Masqueraded access to the outside world, with the host and neighbours fenced off.
    pub const EGRESS: &str = "egress";
    /// Only the node's NATS.
    pub const ISOLATED: &str = "isolated";
}

impl Default for WorkloadNetwork {
    fn default() -> Self {
        WorkloadNetwork {
            mode: network_mode::EGRESS.into(),
            deny: vec![],
            allow: vec![],
            nameservers: vec![],
            port_address: "0.0.0.0".into(),
        }
    }
}

/// One token bucket, as Firecracker defines it: `size` tokens (bytes or operations), refilled
/// completely every `refill_time` milliseconds, plus an initial `one_time_burst`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

impl TokenBucket {
    /// Sustained rate, tokens per second.
    pub fn per_second(&self) -> u64 {
        (self.size.saturating_mul(1000) / self.refill_time.max(1)).max(1)
    }
}

/// Per-workload network limits (`rate_limiters`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RateLimiters {
    /// Bytes, each direction.
    pub bandwidth: Option<TokenBucket>,
    /// Packets sent by the workload.
    #[serde(alias = "iops")]
    pub ops: Option<TokenBucket>,
}

/// Limits on what a node accepts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeLimits {
    pub max_workloads: u64,
    pub max_workload_bytes: u64,
    pub max_total_bytes: u64,
}

/// One host service's switch and settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ServiceConfig {
    pub enabled: bool,
    pub config: Option<serde_json::Value>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig { enabled: true, config: None }
    }
}

/// Host services: the connection used on a workload's behalf and the services offered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct HostServicesConfig {
    pub nats_url: String,
    pub nats_user_jwt: String,
    pub nats_user_seed: nex_api::secret::Secret,
    pub services: BTreeMap<String, ServiceConfig>,
}

impl HostServicesConfig {
    /// True when the operator named a connection for host services (URL or credentials): every
    /// host-service call then uses it, never the node's own control connection.
    pub fn has_connection(&self) -> bool {
        !self.nats_url.is_empty() || !self.nats_user_jwt.is_empty() || !self.nats_user_seed.is_empty()
    }
}

/// Names of the built-in host services.
pub const HOST_SERVICES: &[&str] = &["http", "kv", "messaging", "objectstore"];

impl Default for HostServicesConfig {
    fn default() -> Self {
        HostServicesConfig {
            nats_url: String::new(),
            nats_user_jwt: String::new(),
            nats_user_seed: Default::default(),
            services: HOST_SERVICES.iter().map(|s| (s.to_string(), ServiceConfig::default())).collect(),
        }
    }
}

/// A workload deployed when the node starts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AutostartWorkload {
    pub name: String,
    pub namespace: String,
    pub description: Option<String>,
    #[serde(rename = "type")]
    pub workload_type: String,
    pub location: String,
    pub jsdomain: Option<String>,
    pub argv: Vec<String>,
    pub essential: bool,
    pub environment: BTreeMap<String, String>,
    pub trigger_subjects: Vec<String>,
}

/// `autostart` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AutostartConfig {
    pub workloads: Vec<AutostartWorkload>,
}

/// The whole node configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeConfig {
    pub default_resource_dir: String,
    #[serde(alias = "kernel_path", alias = "kernel_file")]
    pub kernel_filepath: String,
    #[serde(alias = "rootfs_path", alias = "rootfs_file")]
    pub rootfs_filepath: String,
    pub bin_path: Vec<String>,
    pub machine_pool_size: i64,
    pub machine_template: MachineTemplate,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniConfig>,
    pub internal_node_host: String,
    pub internal_node_port: u16,
    pub no_sandbox: bool,
    /// `process`, `container` or `microvm`; empty = chosen from `no_sandbox` and the host.
    pub isolation: String,
    /// OCI runtime of the `container` tier (name or path); empty = `runc`, else `crun`.
    pub container_runtime: String,
    /// How the `microvm` tier runs guests: `auto` (KVM when a probe guest boots on it, else
    /// software emulation), `kvm` or `tcg`.
    pub microvm_accel: String,
    pub preserve_network: bool,
    pub tags: BTreeMap<String, String>,
    pub valid_issuers: Vec<String>,
    /// Issuers (account public keys) allowed to send operator commands (LAMEDUCK). Empty: the
    /// `valid_issuers`. Once either list is set, operator commands must be signed.
    pub admin_issuers: Vec<String>,
    /// How old a DEPLOY, STOP or LAMEDUCK token may be (its `iat`), in seconds or with a unit
    /// (`"10m"`); accepted `jti`s are remembered on disk for as long.
    #[serde(deserialize_with = "de_duration_secs")]
    pub deploy_max_age: u64,
    /// NATS servers a workload may reach besides the node's own (`host:port`, `host` or a CIDR):
    /// targets of the sandbox relays and of connections the node opens for a request
    /// (`trigger_connection`, `host_services`).
    pub allowed_nats_targets: Vec<String>,
    pub workload_types: Vec<String>,
    pub deny_trigger_subjects: Vec<String>,
    pub node_limits: NodeLimits,
    pub rate_limiters: Option<RateLimiters>,
    /// Network of the sandboxed tiers.
    pub workload_network: WorkloadNetwork,
    pub host_services: HostServicesConfig,
    pub autostart: AutostartConfig,
    pub public_nats_server: Option<serde_json::Value>,
    pub pid_filepath: String,
    pub agent_handshake_timeout_ms: u64,
    pub agent_ping_timeout_ms: u64,
    /// How long a stopped workload gets between SIGTERM and SIGKILL.
    pub workload_stop_grace_ms: u64,
    /// Deadline of one function call.
    pub function_timeout_ms: u64,
    /// Memory one function call may use.
    pub function_memory_mib: u64,
    /// Let a function's agent hold its trigger subscriptions and answer requesters itself when
    /// it can reach the user's NATS without the node's credentials (false: the node relays
    /// every call, as Nex does).
    pub agent_triggers: bool,
    /// Take part in deployments: claim replica slots in the deployments bucket and run them.
    pub deployments: bool,
    /// How long the node's deployments heartbeat lives unless renewed; when it lapses, other
    /// nodes take its replicas. Renewed every third of it.
    pub deployment_ttl_ms: u64,
    /// File with the fleet's xkey seed (SX…, mode 0600), shared by the nodes that may run
    /// deployments whose environment `nex apply` sealed to it. Empty: none, and such
    /// deployments are never placed here.
    pub fleet_xkey_seed_path: String,
    /// Largest JavaScript source accepted.
    pub max_js_source_bytes: u64,
    /// Where the node keeps its run state (agent work dirs, internal NATS store).
    pub state_dir: String,
    /// Where the container tier keeps what containers reach on the host (their empty root and
    /// work directories). Container root is an unprivileged host uid, which cannot enter the
    /// private `state_dir`; this directory is root's, mode 0711, each work directory private to
    /// its container. Empty: `/var/lib/nex-sandbox`.
    pub sandbox_dir: String,
    /// Path of a file holding the node's server nkey seed; created when missing. Empty = ephemeral id.
    pub node_seed_path: String,
    /// The `nats-server` binary for the internal server; empty = next to `nex`, `bin_path`, `PATH`.
    pub nats_server_path: String,
    /// The `nex-agent` binary; empty = next to `nex`, `bin_path`, `PATH`.
    pub agent_path: String,
    pub otlp_exporter_url: String,
    pub otel_metrics: bool,
    pub otel_metrics_port: u16,
    /// Address the Prometheus endpoint listens on (all interfaces by default, as in Nex).
    pub otel_metrics_host: String,
    pub otel_metrics_exporter: String,
    pub otel_traces: bool,
    pub otel_traces_exporter: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            default_resource_dir: String::new(),
            kernel_filepath: String::new(),
            rootfs_filepath: String::new(),
            bin_path: std::env::var("PATH")
                .unwrap_or_default()
                .split(':')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            machine_pool_size: 1,
            machine_template: MachineTemplate::default(),
            cni: None,
            internal_node_host: "192.168.127.1".into(),
            internal_node_port: 0,
            no_sandbox: false,
            isolation: String::new(),
            container_runtime: String::new(),
            microvm_accel: String::new(),
            preserve_network: false,
            tags: BTreeMap::new(),
            valid_issuers: vec![],
            admin_issuers: vec![],
            deploy_max_age: DEFAULT_DEPLOY_MAX_AGE_SECS,
            allowed_nats_targets: vec![],
            workload_types: vec![],
            deny_trigger_subjects: vec![],
            node_limits: NodeLimits::default(),
            rate_limiters: None,
            workload_network: WorkloadNetwork::default(),
            host_services: HostServicesConfig::default(),
            autostart: AutostartConfig::default(),
            public_nats_server: None,
            pid_filepath: String::new(),
            agent_handshake_timeout_ms: 5000,
            agent_ping_timeout_ms: 750,
            workload_stop_grace_ms: 3000,
            function_timeout_ms: 5000,
            function_memory_mib: 64,
            agent_triggers: true,
            deployments: true,
            deployment_ttl_ms: 10_000,
            fleet_xkey_seed_path: String::new(),
            max_js_source_bytes: 1024 * 1024,
            state_dir: String::new(),
            sandbox_dir: String::new(),
            node_seed_path: String::new(),
            nats_server_path: String::new(),
            agent_path: String::new(),
            otlp_exporter_url: "127.0.0.1:14532".into(),
            otel_metrics: false,
            otel_metrics_port: 8085,
            otel_metrics_host: "0.0.0.0".into(),
            otel_metrics_exporter: "file".into(),
            otel_traces: false,
            otel_traces_exporter: "file".into(),
        }
    }
}

impl NodeConfig {
    /// Reads `path` over the defaults (absent keys keep theirs) and fills in derived values.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_json(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.display().to_string(), message },
            other => other,
        })
    }

    /// Parses a configuration document and fills in derived values.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let mut cfg: NodeConfig = serde_json::from_str(text)
            .map_err(|e| ConfigError::Parse { path: String::new(), message: e.to_string() })?;
        cfg.fill_defaults();
        Ok(cfg)
    }

    fn fill_defaults(&mut self) {
        if self.workload_types.is_empty() {
            self.workload_types = SUPPORTED_WORKLOAD_TYPES.iter().map(|s| s.to_string()).collect();
        }
        self.workload_types = self.workload_types.iter().map(|t| workload_type::canonical(t)).collect();
        self.workload_types.dedup();
        if self.kernel_filepath.is_empty() && !self.default_resource_dir.is_empty() {
            self.kernel_filepath = format!("{}/vmlinux", self.default_resource_dir.trim_end_matches('/'));
        }
        if self.rootfs_filepath.is_empty() && !self.default_resource_dir.is_empty() {
            self.rootfs_filepath = format!("{}/rootfs.ext4", self.default_resource_dir.trim_end_matches('/'));
        }
        for s in nex_api::subjects::RESERVED_SUBJECTS {
            if !self.deny_trigger_subjects.iter().any(|d| d == s) {
                self.deny_trigger_subjects.push(s.to_string());
            }
        }
        for s in HOST_SERVICES {
            self.host_services.services.entry(s.to_string()).or_default();
        }
        if !self.tags.contains_key(nex_api::control::tags::NODE_NAME) {
            self.tags.insert(nex_api::control::tags::NODE_NAME.into(), random_node_name());
        }
        if self.no_sandbox && self.isolation.is_empty() {
            self.isolation = isolation::PROCESS.into();
        }
    }

    /// The isolation tier this node runs: explicit `isolation`, else `process` for `no_sandbox`,
    /// else `microvm`.
    pub fn tier(&self) -> &str {
        if !self.isolation.is_empty() {
            &self.isolation
        } else if self.no_sandbox {
            isolation::PROCESS
        } else {
            isolation::MICROVM
        }
    }

    /// Checks every value; the first problem found, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_resources()?;
        self.validate_trust()?;
        self.validate_host_services()?;
        self.validate_tier()?;
        self.validate_network()?;
        self.validate_telemetry()?;
        self.validate_autostart()
    }

    /// Pool size, machine template and timeouts.
    fn validate_resources(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.machine_pool_size < 1 {
            return bad("machine pool size must be >= 1 (key machine_pool_size)".into());
        }
        if self.machine_template.vcpu_count == 0 {
            return bad("machine_template.vcpu_count must be >= 1".into());
        }
        if self.machine_template.memsize_mib < 16 {
            return bad(format!(
                "machine_template.memsize_mib must be >= 16 (got {})",
                self.machine_template.memsize_mib
            ));
        }
        if self.machine_template.pids_max < 8 {
            return bad("machine_template.pids_max must be >= 8".into());
        }
        if self.agent_handshake_timeout_ms == 0 {
            return bad("agent_handshake_timeout_ms must be > 0".into());
        }
        if self.agent_ping_timeout_ms == 0 {
            return bad("agent_ping_timeout_ms must be > 0".into());
        }
        if self.function_timeout_ms == 0 {
            return bad("function_timeout_ms must be > 0".into());
        }
        Ok(())
    }

    /// Workload types, trigger deny list, issuers, token age, NATS targets.
    fn validate_trust(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for t in &self.workload_types {
            if !SUPPORTED_WORKLOAD_TYPES.contains(&t.as_str()) {
                return bad(format!(
                    "unsupported workload type in workload_types: {t:?} (this build supports {})",
                    SUPPORTED_WORKLOAD_TYPES.join(", ")
                ));
            }
        }
        for s in &self.deny_trigger_subjects {
            if !nex_api::subjects::is_valid_subscribe_subject(s) {
                return bad(format!("deny_trigger_subjects: {s:?} is not a valid subject"));
            }
        }
        for (key, list) in [("valid_issuers", &self.valid_issuers), ("admin_issuers", &self.admin_issuers)] {
            for i in list {
                if !i.starts_with('A') || nkeys::KeyPair::from_public_key(i).is_err() {
                    return bad(format!("{key}: {i:?} is not an account public key (A…)"));
                }
            }
        }
        if self.deployment_ttl_ms < 3000 {
            return bad(format!(
                "deployment_ttl_ms: {} is too short: the heartbeat's TTL is whole seconds and is renewed every third of it; use 3000 or more",
                self.deployment_ttl_ms
            ));
        }
        self.fleet_xkey()?;
        if self.deploy_max_age == 0 {
            return bad("deploy_max_age must be > 0 (seconds, or a duration like \"10m\")".into());
        }
        for t in &self.allowed_nats_targets {
            if let Err(e) = crate::nats_targets::Allowed::parse(t) {
                return bad(format!("allowed_nats_targets: {e}"));
            }
        }
        Ok(())
    }

    /// Network mode, CIDR lists, resolvers and rate limits.
    fn validate_network(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let n = &self.workload_network;
        if n.mode != network_mode::EGRESS && n.mode != network_mode::ISOLATED {
            return bad(format!(
                "workload_network.mode: {:?} is not a network mode (use \"{}\" or \"{}\")",
                n.mode,
                network_mode::EGRESS,
                network_mode::ISOLATED
            ));
        }
        for (key, list) in [("workload_network.deny", &n.deny), ("workload_network.allow", &n.allow)] {
            for c in list {
                if crate::tiers::net::ipv4_net(c).is_none() {
                    return bad(format!("{key}: {c:?} is not an IPv4 network (e.g. 10.0.0.0/8) or address"));
                }
            }
        }
        let cni_ns = self.cni.as_ref().map(|c| c.nameservers.clone()).unwrap_or_default();
        if let Some(c) = &self.cni {
            let subnet = c.subnet.parse::<ipnet::Ipv4Net>().map_err(|_| {
                ConfigError::Invalid(format!(
                    "cni.subnet: {:?} is not an IPv4 network (e.g. 192.168.127.0/24)",
                    c.subnet
                ))
            })?;
            match self.internal_node_host.parse::<std::net::Ipv4Addr>() {
                Ok(h) if subnet.contains(&h) && h != subnet.network() && h != subnet.broadcast() => {}
                Ok(_) => {
                    return bad(format!(
                        "internal node host must be in the CNI subnet: internal_node_host {} is not a host address of cni.subnet {subnet} (use its gateway, e.g. {})",
                        self.internal_node_host,
                        subnet.hosts().next().map(|h| h.to_string()).unwrap_or_default()
                    ))
                }
                Err(_) => {
                    return bad(format!("internal_node_host: {:?} is not an IPv4 address", self.internal_node_host))
                }
            }
            if c.network_name.is_empty() || c.network_name.contains('/') || c.interface_name.is_empty() {
                return bad("cni.network_name and cni.interface_name must be set (e.g. \"fcnet\" and \"veth0\")".into());
            }
        }
        for (key, list) in [("workload_network.nameservers", &n.nameservers), ("cni.nameservers", &cni_ns)] {
            for a in list {
                if a.parse::<std::net::IpAddr>().is_err() {
                    return bad(format!("{key}: {a:?} is not an IP address"));
                }
            }
        }
        if n.port_address.parse::<std::net::IpAddr>().is_err() {
            return bad(format!("workload_network.port_address: {:?} is not an IP address", n.port_address));
        }
        if let Some(r) = &self.rate_limiters {
            for (key, b) in [("bandwidth", &r.bandwidth), ("ops", &r.ops)] {
                if let Some(b) = b {
                    if b.size == 0 || b.refill_time == 0 {
                        return bad(format!(
                            "rate_limiters.{key}: size and refill_time (ms) must be > 0, e.g. {{\"size\": 1048576, \"refill_time\": 1000}} for 1 MiB/s"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Host-service settings (unknown services are only warned about).
    fn validate_host_services(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if let Some(list) = self.service_setting("messaging", "deny_subjects").and_then(|v| v.as_array()) {
            for s in list {
                match s.as_str() {
                    Some(s) if nex_api::subjects::is_valid_subscribe_subject(s) => {}
                    _ => {
                        return bad(format!(
                            "host_services.services.messaging.config.deny_subjects: {s} is not a valid subject"
                        ))
                    }
                }
            }
        }
        for svc in ["kv", "objectstore"] {
            if let Some(t) = self.service_setting(svc, "bucket_name").and_then(|v| v.as_str()) {
                if !t.to_ascii_lowercase().contains("${tenant}") {
                    tracing::warn!(template = t, "host_services.services.{svc}.config.bucket_name has no ${{tenant}}: workloads of different issuers with the same namespace and name share one bucket");
                }
            }
        }
        if let Some(list) = self.service_setting("http", "allow") {
            if let Err(e) = crate::host_services::http::AllowList::from_config(list) {
                return bad(format!("host_services.services.http.config.allow: {e}"));
            }
        }
        for (name, _) in self.host_services.services.iter() {
            if !HOST_SERVICES.contains(&name.as_str()) {
                tracing::warn!(service = %name, "unknown host service in host_services.services is ignored");
            }
        }
        Ok(())
    }

    /// The isolation tier and what it needs.
    fn validate_telemetry(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        use crate::{telemetry::exporter as metrics, traces::exporter as traces};
        if self.otel_metrics && ![metrics::PROMETHEUS, metrics::FILE].contains(&self.otel_metrics_exporter.as_str()) {
            return bad(format!(
                "otel_metrics_exporter {:?} is not a metrics exporter: use \"prometheus\" or \"file\"",
                self.otel_metrics_exporter
            ));
        }
        if self.otel_traces && ![traces::FILE, traces::GRPC, traces::HTTP].contains(&self.otel_traces_exporter.as_str())
        {
            return bad(format!(
                "otel_traces_exporter {:?} is not a trace exporter: use \"file\", \"grpc\" or \"http\"",
                self.otel_traces_exporter
            ));
        }
        Ok(())
    }

    fn validate_tier(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        match self.tier() {
            isolation::PROCESS | isolation::CONTAINER => {}
            isolation::MICROVM => {
                if self.kernel_filepath.is_empty() {
                    return bad("invalid kernel file setting: set kernel_filepath (or default_resource_dir) to the guest kernel that `nex rootfs` writes, or run agents without VMs with \"isolation\": \"container\" or \"no_sandbox\": true".into());
                }
                if self.rootfs_filepath.is_empty() {
                    return bad("invalid rootfs file setting: set rootfs_filepath (or default_resource_dir) to the guest image that `nex rootfs` writes".into());
                }
                if !matches!(self.microvm_accel.as_str(), "" | "auto" | "kvm" | "tcg") {
                    return bad(format!("microvm_accel must be auto, kvm or tcg (got {:?})", self.microvm_accel));
                }
            }
            other => {
                return bad(format!(
                    "isolation: {other:?} is not a tier (use \"process\", \"container\" or \"microvm\")"
                ))
            }
        }
        Ok(())
    }

    /// Autostart entries.
    fn validate_autostart(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (i, w) in self.autostart.workloads.iter().enumerate() {
            if !nex_api::jwt::is_valid_workload_name(&w.name) {
                return bad(format!("autostart.workloads[{i}].name {:?} must match ^[a-zA-Z0-9_-]+$", w.name));
            }
            if !self.workload_types.contains(&workload_type::canonical(&w.workload_type)) {
                return bad(format!("autostart.workloads[{i}].type {:?} is not in workload_types", w.workload_type));
            }
        }
        Ok(())
    }

    /// The directory holding this node's state: `state_dir`, else `/var/lib/nex` for root and
    /// the user's state directory (`$XDG_STATE_HOME/nex`, `~/.local/state/nex`) for others. Never
    /// a shared temporary directory: another local user could create it first.
    pub fn state_dir(&self) -> PathBuf {
        if !self.state_dir.is_empty() {
            return PathBuf::from(&self.state_dir);
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/lib/nex");
        }
        match (std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
            (Some(x), _) if !x.is_empty() => PathBuf::from(x).join("nex"),
            (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".local/state/nex"),
            _ => PathBuf::from("/var/lib/nex"),
        }
    }

    /// The container tier's host directory (see `sandbox_dir`).
    pub fn sandbox_dir(&self) -> PathBuf {
        if self.sandbox_dir.is_empty() {
            PathBuf::from("/var/lib/nex-sandbox")
        } else {
            PathBuf::from(&self.sandbox_dir)
        }
    }

    /// The fleet xkey of `fleet_xkey_seed_path`, when set. The file must be readable by its
    /// owner only: whoever reads it reads every sealed deployment environment.
    pub fn fleet_xkey(&self) -> Result<Option<nkeys::XKey>, ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.fleet_xkey_seed_path.as_str();
        if path.is_empty() {
            return Ok(None);
        }
        let bad = |m: String| ConfigError::Invalid(format!("fleet_xkey_seed_path: {m}"));
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("{path}: {e}")))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!("{path} is readable by other users (mode {mode:o}): run `chmod 600 {path}`")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("{path}: {e}")))?;
        let seed = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
        match nkeys::XKey::from_seed(seed) {
            Ok(k) if seed.starts_with("SX") => Ok(Some(k)),
            _ => {
                Err(bad(format!("{path} holds no xkey seed (SX…): create one with `nex node fleet-xkey --out {path}`")))
            }
        }
    }

    /// Issuers whose signature an operator command needs: `admin_issuers`, else `valid_issuers`;
    /// empty = an open node that obeys unsigned commands, as Nex does.
    pub fn operator_issuers(&self) -> &[String] {
        if self.admin_issuers.is_empty() {
            &self.valid_issuers
        } else {
            &self.admin_issuers
        }
    }

    /// Keys set in this configuration that this node does not act on, each with why: logged at
    /// start-up and listed by `nex node preflight`, so nobody believes an ignored key works.
    pub fn ignored_keys(&self) -> Vec<(&'static str, &'static str)> {
        let d = NodeConfig::default();
        let microvm = self.tier() == isolation::MICROVM;
        let mut out = Vec::new();
        let mut ignored = |set: bool, key: &'static str, why: &'static str| {
            if set {
                out.push((key, why));
            }
        };
        let sandboxed = self.tier() != isolation::PROCESS;
        ignored(
            !sandboxed && self.cni.is_some(),
            "cni",
            "process-tier workloads share the host's network; CNI attaches the sandboxed tiers",
        );
        ignored(
            self.cni.is_none() && self.internal_node_host != d.internal_node_host,
            "internal_node_host",
            "without a cni section workloads reach the internal NATS at their bridge's gateway address",
        );
        ignored(
            self.cni.is_none() && self.preserve_network,
            "preserve_network",
            "without a cni section there are no CNI address leases to preserve",
        );
        ignored(
            !sandboxed && self.rate_limiters.is_some(),
            "rate_limiters",
            "process-tier workloads share the host's network, which has no per-workload interface to limit",
        );
        ignored(
            !sandboxed && self.workload_network != d.workload_network,
            "workload_network",
            "process-tier workloads share the host's network",
        );
        ignored(
            !self.otel_traces && self.otlp_exporter_url != d.otlp_exporter_url,
            "otlp_exporter_url",
            "traces are off (otel_traces / --traces)",
        );
        ignored(
            !microvm && (self.kernel_filepath != d.kernel_filepath || self.rootfs_filepath != d.rootfs_filepath),
            "kernel_filepath/rootfs_filepath",
            "only the microvm isolation tier boots a kernel and image",
        );
        out
    }

    /// The pid file path.
    pub fn pid_file(&self) -> PathBuf {
        if self.pid_filepath.is_empty() {
            self.state_dir().join("nex.pid")
        } else {
            PathBuf::from(&self.pid_filepath)
        }
    }

    /// The deny-list entry `subject` collides with (wildcard-aware overlap), if any.
    pub fn denied_trigger(&self, subject: &str) -> Option<&str> {
        nex_api::subjects::first_overlap(subject, self.deny_trigger_subjects.iter().map(String::as_str))
    }

    /// One setting of a host service's `config` object.
    pub fn service_setting(&self, service: &str, key: &str) -> Option<&serde_json::Value> {
        self.host_services.services.get(service)?.config.as_ref()?.get(key)
    }

    /// Whether a host service is switched on.
    pub fn host_service_enabled(&self, name: &str) -> bool {
        self.host_services.services.get(name).map(|s| s.enabled).unwrap_or(false)
    }
}

const ADJECTIVES: &[&str] = &[
    "amber", "brisk", "calm", "dapper", "eager", "fancy", "gentle", "happy", "icy", "jolly", "keen", "lively",
    "mellow", "nimble", "odd", "proud", "quiet", "rapid", "sunny", "tidy", "upbeat", "vivid", "witty", "young",
    "zesty",
];
const NOUNS: &[&str] = &[
    "badger", "comet", "dune", "ember", "falcon", "glacier", "harbor", "island", "jaguar", "kestrel", "lagoon",
    "meadow", "nebula", "otter", "prairie", "quasar", "river", "summit", "tundra", "umbra", "valley", "willow", "yak",
    "zephyr",
];

/// A random adjective-noun node name.
pub fn random_node_name() -> String {
    use rand::seq::SliceRandom;
    let mut rng = rand::thread_rng();
    format!("{}-{}", ADJECTIVES.choose(&mut rng).unwrap_or(&"nex"), NOUNS.choose(&mut rng).unwrap_or(&"node"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_merge_and_derive() {
        let c = NodeConfig::from_json(
            r#"{"default_resource_dir":"/tmp/r","tags":{"simple":"true"},"no_sandbox":true,
                "host_services":{"services":{"http":{"enabled":false}}}}"#,
        )
        .unwrap();
        assert_eq!(c.kernel_filepath, "/tmp/r/vmlinux");
        assert_eq!(c.rootfs_filepath, "/tmp/r/rootfs.ext4");
        assert!(c.tags.contains_key("node_name"));
        assert_eq!(c.tags["simple"], "true");
        assert!(c.deny_trigger_subjects.contains(&"$NEX.>".to_string()));
        assert!(c.deny_trigger_subjects.contains(&"_INBOX.>".to_string()));
        assert_eq!(c.deploy_max_age, 600);
        assert!(!c.host_service_enabled("http"));
        assert!(c.host_service_enabled("kv"));
        assert_eq!(c.workload_types, vec!["native", "v8", "wasm"]);
        assert_eq!(c.tier(), "process");
        c.validate().unwrap();
    }

    #[test]
    fn debug_output_never_holds_a_seed() {
        let c = NodeConfig::from_json(r#"{"host_services":{"nats_user_seed":"SUAEXAMPLESEEDNOTREAL"}}"#).unwrap();
        assert_eq!(c.host_services.nats_user_seed.expose(), "SUAEXAMPLESEEDNOTREAL");
        assert!(!format!("{c:?}").contains("SUAEXAMPLE"));
        let spec = crate::tiers::AgentSpec {
            id: "x".into(),
            nats_host: "h".into(),
            nats_port: 1,
            nkey_seed: "SUAEXAMPLEAGENT".into(),
            work_dir: "/w".into(),
            template: Default::default(),
            stop_grace_ms: 1,
        };
        assert!(!format!("{spec:?}").contains("SUAEXAMPLE"));
        let req = nex_api::agent::AgentDeployRequest {
            environment: [("TOKEN".to_string(), "SUAEXAMPLEENV".to_string())].into_iter().collect(),
            trigger_connection: Some(nex_api::control::NatsConnectionConfig {
                nats_url: "nats://x".into(),
                nats_user_jwt: None,
                nats_user_seed: Some("SUAEXAMPLETRIGGER".into()),
            }),
            ..Default::default()
        };
        let shown = format!("{req:?}");
        assert!(!shown.contains("SUAEXAMPLE") && shown.contains("TOKEN"), "{shown}");
    }

    #[test]
    fn seed_spellings_are_accepted() {
        let c = NodeConfig::from_json(r#"{"kernel_path":"/k","rootfs_path":"/r"}"#).unwrap();
        assert_eq!(c.kernel_filepath, "/k");
        assert_eq!(c.rootfs_filepath, "/r");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let e = NodeConfig::from_json(r#"{"no_sandbox":true,"machine_pool_size":0}"#)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("machine pool size must be >= 1"), "{e}");
        let e = NodeConfig::from_json(r#"{"no_sandbox":true,"workload_types":["oci"]}"#)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("workload_types"), "{e}");
        let e = NodeConfig::from_json(r#"{"machine_pool_size":"x"}"#).unwrap_err().to_string();
        assert!(e.contains("invalid type"), "{e}");
        let e = NodeConfig::from_json(r#"{"no_sandbox":true,"valid_issuers":["bogus"]}"#)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("valid_issuers"), "{e}");
        for (cfg, key) in [
            (r#"{"no_sandbox":true,"admin_issuers":["Nbogus"]}"#, "admin_issuers"),
            (r#"{"no_sandbox":true,"allowed_nats_targets":["not a host"]}"#, "allowed_nats_targets"),
            (
                r#"{"no_sandbox":true,"host_services":{"services":{"http":{"config":{"allow":["300.1.1.1/8"]}}}}}"#,
                "allow",
            ),
            (
                r#"{"no_sandbox":true,"host_services":{"services":{"messaging":{"config":{"deny_subjects":["a..b"]}}}}}"#,
                "deny_subjects",
            ),
        ] {
            let e = NodeConfig::from_json(cfg).unwrap().validate().unwrap_err().to_string();
            assert!(e.contains(key), "{cfg}: {e}");
        }
    }

    #[test]
    fn deploy_max_age_takes_seconds_or_a_unit() {
        assert_eq!(NodeConfig::from_json(r#"{"deploy_max_age":90}"#).unwrap().deploy_max_age, 90);
        assert_eq!(NodeConfig::from_json(r#"{"deploy_max_age":"10m"}"#).unwrap().deploy_max_age, 600);
        assert_eq!(NodeConfig::from_json(r#"{"deploy_max_age":"1500ms"}"#).unwrap().deploy_max_age, 2);
        let e = NodeConfig::from_json(r#"{"deploy_max_age":"soon"}"#).unwrap_err().to_string();
        assert!(e.contains("not a duration"), "{e}");
    }

    #[test]
    fn the_fleet_xkey_seed_must_be_private_and_an_xkey() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.xk");
        let cfg = |p: &std::path::Path| NodeConfig {
            fleet_xkey_seed_path: p.display().to_string(),
            no_sandbox: true,
            ..Default::default()
        };
        let key = nkeys::XKey::new();
        std::fs::write(&path, format!("{}\n", key.seed().unwrap())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = cfg(&path).validate().unwrap_err().to_string();
        assert!(e.contains("readable by other users (mode 644)") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(cfg(&path).fleet_xkey().unwrap().unwrap().public_key(), key.public_key());
        // An account seed is not a fleet key; a missing file says which.
        std::fs::write(&path, nkeys::KeyPair::new_account().seed().unwrap()).unwrap();
        assert!(cfg(&path).validate().unwrap_err().to_string().contains("holds no xkey seed (SX…)"));
        let e = cfg(&dir.path().join("nope")).validate().unwrap_err().to_string();
        assert!(e.contains("fleet_xkey_seed_path") && e.contains("nope"), "{e}");
        assert!(NodeConfig::default().fleet_xkey().unwrap().is_none());
    }
}
