//! The network of the sandboxed tiers: one bridge per node run (`nxb<run>`, `10.213.X.1/24`),
//! one address slot per agent, and nftables tables that fence the agents in:
//!
//! * `inet nex_<run>`: from the bridge, only the internal NATS port (any agent: the server
//!   authenticates each), an agent's own relay ports (matched on its address) and the replies of
//!   connections the host opened (forwarded ports) reach the host. In `isolated` mode nothing is
//!   forwarded; in `egress` mode an agent's packets are forwarded and masqueraded to anything but
//!   the bridge itself (other agents), the built-in denied networks ([`BUILTIN_DENY`]:
//!   link-local and metadata addresses among them) and the operator's `deny` list, with `allow`
//!   taking precedence over both; nothing from outside reaches an agent unless it answers it.
//! * `bridge nexb_<run>`: a frame entering from an agent's port must carry that agent's address
//!   (IPv4 and ARP), so no agent can pose as another, and nothing but IPv4 and ARP passes; an
//!   `ops` rate limit drops the packets over an agent's bucket here.
//!
//! Bridge ports are isolated from each other. A relay exists per agent and target, serves only
//! that agent's address, connects only to the address the node's target policy checked, and goes
//! with the agent. Bandwidth limits are token-bucket shapers on the agent's port (traffic to the
//! agent) and on an `ifb` device its incoming traffic is redirected through (traffic from it).
//! Forwarded ports are listeners of the node that connect to the agent's address. Without
//! nftables there is no sandboxed tier. Everything is named after the run id, so a node restarted
//! after SIGKILL removes what the dead run left ([`remove`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::config::{network_mode, NodeConfig, RateLimiters};
use crate::nats_targets::Target;
use nex_api::control::PortMapping;

const SUBNET_PREFIX: [u8; 2] = [10, 213];
const NET_LOCK: &str = "/run/nex-net.lock";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Networks no workload reaches in egress mode unless `allow` names them: "this network",
/// loopback, link-local (cloud metadata services live at 169.254.169.254), multicast and
/// reserved space, and every node's agent bridges.
pub const BUILTIN_DENY: &[&str] =
    &["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "10.213.0.0/16"];

/// What the operator decided about the workloads' network.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Egress through masquerade (else isolated).
    pub egress: bool,
    /// Networks workloads may not reach (built-in and the operator's).
    pub deny: Vec<ipnet::Ipv4Net>,
    /// Networks reachable despite `deny`.
    pub allow: Vec<ipnet::Ipv4Net>,
    /// Resolvers for the workloads' `resolv.conf`.
    pub nameservers: Vec<IpAddr>,
    /// `search` domains copied from the host.
    pub search: Vec<String>,
    /// Per-agent limits.
    pub limits: RateLimiters,
    /// Address forwarded ports listen on.
    pub port_address: IpAddr,
    /// The CNI network workloads are attached to, when the configuration has a `cni` section;
    /// else nex's own bridge.
    pub cni: Option<super::cni::CniSettings>,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions::from_config(&NodeConfig::default())
    }
}

/// An IPv4 network, or one address as a /32: what `workload_network.deny` / `allow` accept.
pub fn ipv4_net(s: &str) -> Option<ipnet::Ipv4Net> {
    s.parse::<ipnet::Ipv4Net>().ok().or_else(|| s.parse::<Ipv4Addr>().ok().map(Into::into))
}

fn nets(list: &[String]) -> Vec<ipnet::Ipv4Net> {
    list.iter().filter_map(|c| ipv4_net(c)).collect()
}

impl NetOptions {
    /// The options of a (validated) configuration. Resolvers come from
    /// `workload_network.nameservers`, then `cni.nameservers`, then the host's `/etc/resolv.conf`
    /// without its loopback entries (a workload cannot reach the host's loopback), with a warning
    /// for each skipped one.
    pub fn from_config(cfg: &NodeConfig) -> NetOptions {
        let n = &cfg.workload_network;
        let mut deny = nets(&BUILTIN_DENY.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        deny.extend(nets(&n.deny));
        let mut cni_ns = cfg.cni.as_ref().map(|c| c.nameservers.clone()).unwrap_or_default();
        if cni_ns.is_empty() {
            // The resolvers the CNI network's config hands out (`dns.nameservers`).
            cni_ns = cfg.cni.as_ref().map(super::cni::conflist_nameservers).unwrap_or_default();
        }
        let configured: Vec<IpAddr> = if !n.nameservers.is_empty() { &n.nameservers } else { &cni_ns }
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let egress = n.mode != network_mode::ISOLATED;
        let (nameservers, search) = if !egress {
            // Nothing but NATS is reachable: a resolver there would only make lookups time out.
            (Vec::new(), Vec::new())
        } else if configured.is_empty() {
            host_resolvers(&host)
        } else {
            (configured, host_resolvers(&host).1)
        };
        NetOptions {
            egress,
            deny,
            allow: nets(&n.allow),
            nameservers,
            search,
            limits: cfg.rate_limiters.clone().unwrap_or_default(),
            port_address: n.port_address.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            cni: cfg.cni.as_ref().map(|c| super::cni::CniSettings {
                network_name: c.network_name.clone(),
                interface_name: c.interface_name.clone(),
                subnet: c
                    .subnet
                    .parse()
                    .unwrap_or_else(|_| ipnet::Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 127, 0), 24)),
                gateway: cfg.internal_node_host.parse().unwrap_or(Ipv4Addr::new(192, 168, 127, 1)),
                bin_dirs: c.bin_path.iter().map(std::path::PathBuf::from).collect(),
                conf_dir: std::path::PathBuf::from(&c.conf_dir),
                preserve: cfg.preserve_network,
            }),
        }
    }

    /// The workloads' `/etc/resolv.conf`.
    pub fn resolv_conf(&self) -> String {
        let mut s = String::from("# written by nex for this workload\n");
        for ns in &self.nameservers {
            s.push_str(&format!("nameserver {ns}\n"));
        }
        if !self.search.is_empty() {
            s.push_str(&format!("search {}\n", self.search.join(" ")));
        }
        s
    }

    /// `egress` or `isolated`.
    pub fn mode(&self) -> &'static str {
        if self.egress {
            network_mode::EGRESS
        } else {
            network_mode::ISOLATED
        }
    }
}

/// The usable resolvers and search domains of a `resolv.conf`: loopback resolvers (systemd's
/// 127.0.0.53, a local dnsmasq) are skipped with a warning.
fn host_resolvers(text: &str) -> (Vec<IpAddr>, Vec<String>) {
    let (mut ns, mut search) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("nameserver") => match f.next().and_then(|a| a.parse::<IpAddr>().ok()) {
                Some(a) if a.is_loopback() => tracing::warn!(
                    resolver = %a,
                    "the host's resolver {a} is on its loopback, which workloads cannot reach: it is left out of their resolv.conf (set workload_network.nameservers)"
                ),
                Some(a) => ns.push(a),
                None => {}
            },
            Some("search") | Some("domain") => search = f.map(str::to_string).collect(),
            _ => {}
        }
    }
    (ns, search)
}

/// True when `host` (a name or address from a NATS URL) is on this host: `localhost`, a loopback
/// address, or an address of one of its interfaces. A sandboxed workload cannot dial those
/// itself, even in egress mode, so they need a relay (and the relay policy).
pub fn is_host_local(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        // Binding succeeds only to the host's own addresses (and the unspecified one).
        Ok(ip) => ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok(),
        Err(_) => false,
    }
}

/// What the network holds for one agent.
#[derive(Debug)]
struct AgentNet {
    slot: usize,
    /// Its address: the slot's on the built-in bridge, the CNI result's otherwise.
    ip: Ipv4Addr,
    /// The CNI container id it was attached under.
    cni_id: Option<String>,
    /// The agent's bridge port (veth or tap), once attached.
    port: Option<String>,
    /// The ifb device its outgoing traffic is shaped on, when a bandwidth limit is set.
    ifb: Option<String>,
    /// Handle of its `ops` limit rule in the bridge table.
    ops_rule: Option<u64>,
    /// Relays by target `host:port`: listening port and the task serving it.
    relays: HashMap<String, (u16, tokio::task::JoinHandle<()>)>,
    /// Forwarded ports and the tasks serving them.
    ports: Vec<(PortMapping, tokio::task::JoinHandle<()>)>,
}

/// The bridge, addresses, firewall and relays of one node run.
#[derive(Debug)]
pub struct BridgeNet {
    run_id: String,
    bridge: String,
    subnet: u8,
    opts: NetOptions,
    cni: Option<super::cni::Cni>,
    slots: Mutex<Vec<bool>>,
    agents: Mutex<HashMap<String, AgentNet>>,
}

fn bridge_name(run: &str) -> String {
    format!("nxb{run}")
}
fn table_name(run: &str) -> String {
    format!("nex_{run}")
}
fn bridge_table_name(run: &str) -> String {
    format!("nexb_{run}")
}
fn ifb_prefix(run: &str) -> String {
    format!("ni{run}")
}

fn set_elements(nets: &[ipnet::Ipv4Net]) -> String {
    if nets.is_empty() {
        return String::new();
    }
    let list: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
    format!(" elements = {{ {} }};", list.join(", "))
}

impl BridgeNet {
    /// Creates this run's bridge on a free `10.213.X.0/24` and its firewall; fails when the
    /// firewall cannot be made (a sandbox without it would expose every host service). Every
    /// agent port the tier attaches is named `<port_prefix>…`.
    pub async fn create(run: &str, port_prefix: &str, opts: NetOptions) -> Result<BridgeNet> {
        let cni = match &opts.cni {
            Some(s) => Some(super::cni::Cni::load(s.clone())?),
            None => None,
        };
        let lock = std::fs::File::create(NET_LOCK).with_context(|| format!("creating {NET_LOCK}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        let out = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .await
            .context("running ip: install iproute2")?;
        let used = String::from_utf8_lossy(&out.stdout).to_string();
        let subnet = (0..=255u8)
            .find(|x| !used.contains(&format!(" {}.{}.{x}.", SUBNET_PREFIX[0], SUBNET_PREFIX[1])))
            .ok_or_else(|| anyhow!("no free 10.213.X.0/24 subnet for the agent bridge"))?;
        let bridge = bridge_name(run);
        let net = BridgeNet {
            run_id: run.to_string(),
            bridge: bridge.clone(),
            subnet,
            opts,
            cni,
            slots: Mutex::new(vec![false; 256]),
            agents: Mutex::new(HashMap::new()),
        };
        // Workload traffic is what comes from (goes to) the bridge, or with CNI any interface in
        // the `wports` set: the host sides of the workloads' links.
        let (wi, wo, not_wo, wsubnet) = match &net.cni {
            Some(c) => (
                "iifname @wports".to_string(),
                "oifname @wports".to_string(),
                "oifname != @wports".to_string(),
                c.settings.subnet.to_string(),
            ),
            None => (
                format!("iifname \"{bridge}\""),
                format!("oifname \"{bridge}\""),
                format!("oifname != \"{bridge}\""),
                format!("{}/24", net.ip(0)),
            ),
        };
        // The firewall comes first: the bridge must never be up without it.
        let forward = if net.opts.egress {
            format!(
                " set deny {{ type ipv4_addr; flags interval;{deny} }}
 set allow {{ type ipv4_addr; flags interval;{allow} }}
 chain forward {{ type filter hook forward priority -10; policy accept;
  {wi} {wo} drop
  {wo} ct state established,related accept
  {wo} drop
  {wi} ip daddr @allow accept
  {wi} ip daddr @deny drop
  {wi} meta nfproto ipv4 accept
  {wi} drop
 }}
 chain postrouting {{ type nat hook postrouting priority 100; policy accept;
  ip saddr {wsubnet} {not_wo} masquerade
 }}
",
                deny = set_elements(&net.opts.deny),
                allow = set_elements(&net.opts.allow),
            )
        } else {
            format!(
                " chain forward {{ type filter hook forward priority -10; policy accept;
  {wi} drop
  {wo} drop
 }}
"
            )
        };
        // Anti-spoofing: on the bridge, a frame from an agent's port must carry its address; with
        // CNI (routed links, no bridge) the same check runs on IP packets as they enter.
        let spoof = if net.cni.is_some() {
            " chain prerouting { type filter hook prerouting priority -300; policy accept;
  iifname @wports iifname . ip saddr != @ports drop
  iifname @wports meta nfproto != ipv4 drop
 }
"
            .to_string()
        } else {
            String::new()
        };
        let bridge_table = if net.cni.is_some() {
            String::new()
        } else {
            format!(
                "table bridge {btable} {{
 set ports {{ type ifname . ipv4_addr; }}
 chain prerouting {{ type filter hook prerouting priority -300; policy accept;
  iifname \"{port_prefix}*\" ether type ip iifname . ip saddr != @ports drop
  iifname \"{port_prefix}*\" ether type arp iifname . arp saddr ip != @ports drop
  iifname \"{port_prefix}*\" ether type != {{ ip, arp }} drop
 }}
}}
",
                btable = bridge_table_name(run),
            )
        };
        let rules = format!(
            "table inet {table} {{
 set allowed {{ type inet_service; }}
 set relays {{ type ipv4_addr . inet_service; }}
 set wports {{ type ifname; }}
 set ports {{ type ifname . ipv4_addr; }}
{spoof} chain input {{ type filter hook input priority -10; policy accept;
  {wi} ct state established,related accept
  {wi} ip daddr {host} tcp dport @allowed accept
  {wi} ip daddr {host} ip saddr . tcp dport @relays accept
  {wi} drop
 }}
{forward}}}
{bridge_table}",
            table = table_name(run),
            host = net.host_ip(),
        );
        if let Err(e) = run_cmd("nft", &["-f", "-"], Some(&rules)).await {
            remove(run).await;
            bail!(
                "the sandboxed tiers need an nftables firewall to fence workloads in, and it could not be set up ({e:#}): install nftables (apt-get install -y nftables) and run the node as root"
            );
        }
        // With CNI the node's side is a port-less bridge holding the gateway address (a dummy link
        // would do, but not every kernel has the module), so the internal
        // NATS and the relays can listen on it before any workload's link exists.
        let script = if net.cni.is_some() {
            format!("link add {bridge} type bridge\naddr add {}/32 dev {bridge}\nlink set {bridge} up\n", net.host_ip())
        } else {
            format!("link add {bridge} type bridge\naddr add {}/24 dev {bridge}\nlink set {bridge} up\n", net.host_ip())
        };
        if let Err(e) = run_cmd("ip", &["-b", "-"], Some(&script)).await {
            remove(run).await;
            return Err(e.context("creating the agent bridge"));
        }
        drop(lock);
        if net.opts.egress {
            enable_forwarding();
        }
        Ok(net)
    }

    /// The operator's network options.
    pub fn options(&self) -> &NetOptions {
        &self.opts
    }

    /// The default gateway agents get: the host's bridge address in egress mode, none otherwise.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.opts.egress.then(|| self.host_ip())
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The host's address on the bridge, or with CNI the network's gateway
    /// (`internal_node_host`).
    pub fn host_ip(&self) -> Ipv4Addr {
        match &self.cni {
            Some(c) => c.settings.gateway,
            None => Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], self.subnet, 1),
        }
    }

    /// The CNI network, when workloads are attached through CNI.
    pub fn cni(&self) -> Option<&super::cni::Cni> {
        self.cni.as_ref()
    }

    /// Attaches agent `id` to the CNI network inside namespace `netns` (a path) and records its
    /// address. The host side of the link joins the firewall's sets ([`Self::attach_port`]).
    pub async fn cni_attach(&self, id: &str, netns: &str) -> Result<super::cni::Attachment> {
        let cni = self.cni.as_ref().ok_or_else(|| anyhow!("this node has no CNI network"))?;
        let cid = format!("nex-{}-{id}", self.run_id);
        let att = cni.add(&cid, netns).await?;
        match self.agents.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
            Some(a) => {
                a.ip = att.ip;
                a.cni_id = Some(cid);
            }
            None => bail!("agent {id} has no address slot"),
        }
        self.attach_port(id, &att.host_if).await?;
        Ok(att)
    }

    /// The address of slot `slot`.
    pub fn ip(&self, slot: usize) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], self.subnet, slot as u8)
    }

    /// Takes a free address slot (2..=254) for agent `id`.
    pub fn alloc_slot(&self, id: &str) -> Result<usize> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let i = (2..255).find(|&i| !s[i]).ok_or_else(|| anyhow!("no free agent address: 253 agents run"))?;
        s[i] = true;
        self.agents.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id.to_string(),
            AgentNet {
                slot: i,
                ip: self.ip(i),
                cni_id: None,
                port: None,
                ifb: None,
                ops_rule: None,
                relays: HashMap::new(),
                ports: Vec::new(),
            },
        );
        Ok(i)
    }

    /// Records `port` (a veth or tap on the bridge) as agent `id`'s: frames from it must carry
    /// the agent's address.
    pub async fn attach_port(&self, id: &str, port: &str) -> Result<()> {
        let ip = {
            let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
            let a = agents.get_mut(id).ok_or_else(|| anyhow!("agent {id} has no address"))?;
            a.port = Some(port.to_string());
            a.ip
        };
        let element = format!("{{ \"{port}\" . {ip} }}");
        let (family, table) = self.port_table();
        run_cmd("nft", &["add", "element", family, &table, "ports", &element], None).await?;
        if self.cni.is_some() {
            let element = format!("{{ \"{port}\" }}");
            run_cmd("nft", &["add", "element", "inet", &table, "wports", &element], None).await?;
        }
        self.limit(id, port).await.context("applying rate_limiters to the workload's interface")
    }

    /// Applies `rate_limiters` to agent `id`'s port: a token-bucket shaper on the port for what
    /// the agent receives and on an ifb device for what it sends (redirected from the port's
    /// ingress), and an nftables packet-rate limit for `ops`. Everything goes with the port, the
    /// ifb device and the rule ([`Self::release`]).
    async fn limit(&self, id: &str, port: &str) -> Result<()> {
        if let Some(b) = self.opts.limits.bandwidth {
            let rate = format!("{}bps", b.per_second());
            // The bucket holds `size` bytes; never less than two full frames, which tbf needs.
            let burst = b.size.max(2 * 1514).to_string();
            let slot = self.slot_of(id)?;
            let ifb = format!("{}{slot:02x}", ifb_prefix(&self.run_id));
            if let Some(a) = self.agents.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
                a.ifb = Some(ifb.clone());
            }
            let tbf = |dev: &str| format!("qdisc add dev {dev} root tbf rate {rate} burst {burst} latency 100ms\n");
            run_cmd("ip", &["-b", "-"], Some(&format!("link add {ifb} type ifb\nlink set {ifb} up\n"))).await?;
            let script = format!(
                "{}{}qdisc add dev {port} handle ffff: ingress\nfilter add dev {port} parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev {ifb}\n",
                tbf(port),
                tbf(&ifb)
            );
            run_cmd("tc", &["-b", "-"], Some(&script)).await?;
        }
        if let Some(o) = self.opts.limits.ops {
            let (family, table) = self.port_table();
            let rule = format!(
                "add rule {family} {table} prerouting iifname \"{port}\" limit rate over {}/second burst {} packets drop",
                o.per_second(),
                o.size.max(1)
            );
            let out = Command::new("nft").args(["--echo", "--handle"]).arg(&rule).output().await?;
            if !out.status.success() {
                bail!("nft {rule}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            // `… drop # handle 12` (then, on newer nft, a `# new generation …` line).
            let handle = String::from_utf8_lossy(&out.stdout)
                .split("# handle ")
                .nth(1)
                .and_then(|h| h.split_whitespace().next())
                .and_then(|h| h.parse::<u64>().ok());
            if handle.is_none() {
                tracing::warn!(port, "nft did not report the handle of the packet-rate rule; it goes with the run");
            }
            if let Some(a) = self.agents.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
                a.ops_rule = handle;
            }
        }
        Ok(())
    }

    /// The table holding the per-port sets and rules: the bridge table, or with CNI (no bridge)
    /// the inet one.
    fn port_table(&self) -> (&'static str, String) {
        if self.cni.is_some() {
            ("inet", table_name(&self.run_id))
        } else {
            ("bridge", bridge_table_name(&self.run_id))
        }
    }

    fn slot_of(&self, id: &str) -> Result<usize> {
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents.get(id).map(|a| a.slot).ok_or_else(|| anyhow!("agent {id} has no address"))
    }

    /// The address of agent `id`.
    pub fn agent_ip(&self, id: &str) -> Option<Ipv4Addr> {
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents.get(id).map(|a| a.ip)
    }

    /// Forwards each host port of `ports` to agent `id`: a listener on `port_address` that
    /// connects to the agent's address. A port already in use, or one below 1024, is refused.
    pub async fn forward_ports(&self, id: &str, ports: &[PortMapping]) -> Result<(), String> {
        let ip = self.agent_ip(id).ok_or_else(|| format!("agent {id} has no address"))?;
        if let Some(p) = ports.iter().find(|p| p.host < 1024) {
            return Err(format!(
                "port {} cannot be forwarded: ports below 1024 are the host's; pick one from 1024 up",
                p.host
            ));
        }
        let mut opened: Vec<(PortMapping, tokio::task::JoinHandle<()>)> = Vec::new();
        for p in ports {
            let listener = match tokio::net::TcpListener::bind((self.opts.port_address, p.host)).await {
                Ok(l) => l,
                Err(e) => {
                    opened.iter().for_each(|(_, t)| t.abort());
                    return Err(if e.kind() == std::io::ErrorKind::AddrInUse {
                        format!("port {} is already in use on this node: pick another host port", p.host)
                    } else {
                        format!("port {}: {e}", p.host)
                    });
                }
            };
            let to = SocketAddr::from((ip, p.workload));
            opened.push((*p, tokio::spawn(serve_forward(listener, to))));
        }
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        match agents.get_mut(id) {
            Some(a) => {
                a.ports.extend(opened);
                Ok(())
            }
            None => {
                opened.iter().for_each(|(_, t)| t.abort());
                Err(format!("agent {id} went away"))
            }
        }
    }

    /// The ports forwarded to agent `id`.
    pub fn forwarded(&self, id: &str) -> Vec<PortMapping> {
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents.get(id).map(|a| a.ports.iter().map(|(p, _)| *p).collect()).unwrap_or_default()
    }

    /// Everything agent `id` had: its relays, firewall entries and address slot.
    pub async fn release(&self, id: &str) {
        let Some(a) = self.agents.lock().unwrap_or_else(|e| e.into_inner()).remove(id) else {
            return;
        };
        let ip = a.ip;
        let (family, ptable) = self.port_table();
        if let (Some(cni), Some(cid)) = (&self.cni, &a.cni_id) {
            // The plugins remove the link and release the address lease.
            cni.del(cid).await;
        }
        for (_, task) in &a.ports {
            task.abort();
        }
        if let Some(ifb) = &a.ifb {
            let _ = run_cmd("ip", &["link", "delete", ifb], None).await;
        }
        if let Some(h) = a.ops_rule {
            let _ = run_cmd("nft", &["delete", "rule", family, &ptable, "prerouting", "handle", &h.to_string()], None)
                .await;
        }
        for (port, task) in a.relays.values() {
            task.abort();
            let element = format!("{{ {ip} . {port} }}");
            let _ = run_cmd("nft", &["delete", "element", "inet", &table_name(&self.run_id), "relays", &element], None)
                .await;
        }
        if let Some(p) = &a.port {
            // The link itself (a veth pair with its peer, or a tap) goes now, not whenever its
            // namespace or last socket does.
            let _ = run_cmd("ip", &["link", "delete", p], None).await;
            let element = format!("{{ \"{p}\" . {ip} }}");
            let _ = run_cmd("nft", &["delete", "element", family, &ptable, "ports", &element], None).await;
            if self.cni.is_some() {
                let element = format!("{{ \"{p}\" }}");
                let _ = run_cmd("nft", &["delete", "element", family, &ptable, "wports", &element], None).await;
            }
        }
        self.slots.lock().unwrap_or_else(|e| e.into_inner())[a.slot] = false;
    }

    /// Lets every agent reach `port` on the host side of the bridge (the internal NATS server,
    /// which authenticates each agent itself).
    pub async fn allow_port(&self, port: u16) -> Result<()> {
        run_cmd(
            "nft",
            &["add", "element", "inet", &table_name(&self.run_id), "allowed", &format!("{{ {port} }}")],
            None,
        )
        .await
    }

    /// A relay on the bridge address to `target` for agent `id` alone; made once per target.
    async fn relay(&self, id: &str, target: &Target) -> Result<u16> {
        let ip = {
            let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
            let a = agents.get(id).ok_or_else(|| anyhow!("agent {id} has no address"))?;
            if let Some((p, _)) = a.relays.get(&target.host_port) {
                return Ok(*p);
            }
            a.ip
        };
        let listener = tokio::net::TcpListener::bind((self.host_ip(), 0)).await?;
        let port = listener.local_addr()?.port();
        run_cmd(
            "nft",
            &["add", "element", "inet", &table_name(&self.run_id), "relays", &format!("{{ {ip} . {port} }}")],
            None,
        )
        .await?;
        let task = tokio::spawn(serve_relay(listener, IpAddr::V4(ip), target.addr, id.to_string()));
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        match agents.get_mut(id) {
            Some(a) => {
                a.relays.insert(target.host_port.clone(), (port, task));
                Ok(port)
            }
            None => {
                task.abort();
                bail!("agent {id} went away")
            }
        }
    }

    /// `urls` with every checked target replaced by a relay of agent `id` on the bridge.
    pub async fn workload_nats_url(&self, id: &str, urls: &str, targets: &[Target]) -> Result<String> {
        let mut ports = HashMap::new();
        for t in targets {
            ports.insert(t.host_port.clone(), self.relay(id, t).await?);
        }
        let host = self.host_ip();
        Ok(rewrite_nats_urls(urls, |t| ports.get(t).map(|p| format!("{host}:{p}"))))
    }

    /// Removes the bridge and the firewall tables (and any CNI attachment of the run still cached).
    pub async fn remove(&self) {
        if self.cni.is_some() {
            super::cni::del_prefix(&format!("nex-{}-", self.run_id)).await;
        }
        remove(&self.run_id).await;
    }
}

/// Relays connections from `peer` (the agent) to `to`; connections from anywhere else are
/// closed unanswered (the firewall already drops them; this holds should it be changed).
async fn serve_relay(listener: tokio::net::TcpListener, peer: IpAddr, to: SocketAddr, id: String) {
    while let Ok((mut inbound, from)) = listener.accept().await {
        if from.ip() != peer {
            tracing::warn!(workload_id = %id, from = %from, "refused a relay connection from another address");
            continue;
        }
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(to).await {
                Ok(mut out) => {
                    let _ = out.set_nodelay(true);
                    let _ = inbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
                Err(e) => tracing::debug!(target = %to, error = %e, "relay could not reach NATS"),
            }
        });
    }
}

/// Connects each connection to a forwarded port to the agent's `to`.
async fn serve_forward(listener: tokio::net::TcpListener, to: SocketAddr) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                let _ = out.set_nodelay(true);
                let _ = inbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}

/// Turns on IPv4 forwarding, which egress needs (as every container engine does); says so.
fn enable_forwarding() {
    match std::fs::read_to_string(IP_FORWARD) {
        Ok(v) if v.trim() == "1" => {}
        _ => match std::fs::write(IP_FORWARD, "1") {
            Ok(()) => tracing::info!("enabled IPv4 forwarding (net.ipv4.ip_forward=1) for the workloads' egress"),
            Err(e) => tracing::warn!(
                "workloads cannot reach beyond the node: IPv4 forwarding is off and could not be enabled ({e}); run `sysctl -w net.ipv4.ip_forward=1`"
            ),
        },
    }
}

/// Removes the bridge, firewall and shaping devices of run `run` (live or dead).
pub async fn remove(run: &str) {
    let _ = run_cmd("nft", &["delete", "table", "inet", &table_name(run)], None).await;
    let _ = run_cmd("nft", &["delete", "table", "bridge", &bridge_table_name(run)], None).await;
    let _ = run_cmd("ip", &["link", "delete", &bridge_name(run)], None).await;
    for ifb in links_with_prefix(&ifb_prefix(run)).await {
        let _ = run_cmd("ip", &["link", "delete", &ifb], None).await;
    }
}

/// Deletes every named network namespace whose name starts with `prefix`.
pub async fn delete_netns_with_prefix(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output().await {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next().filter(|n| n.starts_with(prefix)) {
                let _ = run_cmd("ip", &["netns", "delete", name], None).await;
            }
        }
    }
}

/// Names of the network links whose names start with `prefix`.
pub async fn links_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output().await else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Runs a command, failing with its stderr when it fails.
pub async fn run_cmd(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut c = Command::new(prog);
    c.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().with_context(|| format!("running {prog}: is it installed?"))?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(input.as_bytes()).await?;
        drop(w);
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!("{prog} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `host:port` of every URL in a comma-separated NATS URL list (port 4222 when absent).
pub fn nats_url_targets(urls: &str) -> Vec<String> {
    urls.split(',').filter_map(|u| split_url(u.trim()).map(|(_, _, hp)| hp)).collect()
}

/// Replaces the `host:port` of every URL in `urls` with `map(host:port)` where it answers.
pub fn rewrite_nats_urls(urls: &str, map: impl Fn(&str) -> Option<String>) -> String {
    urls.split(',')
        .map(|u| {
            let u = u.trim();
            match split_url(u) {
                Some((scheme, userinfo, hp)) => match map(&hp) {
                    Some(new) => format!("{scheme}{userinfo}{new}"),
                    None => u.to_string(),
                },
                None => u.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// (`scheme://`, `user:pass@`, `host:port`) of one URL.
fn split_url(u: &str) -> Option<(String, String, String)> {
    if u.is_empty() {
        return None;
    }
    let (scheme, rest) = match u.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), u),
    };
    let rest = rest.trim_end_matches('/');
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((ui, hp)) => (format!("{ui}@"), hp),
        None => (String::new(), rest),
    };
    if hostport.is_empty() || hostport.contains('/') {
        return None;
    }
    let has_port = match hostport.rsplit_once(':') {
        Some((h, p)) => !h.ends_with(':') && p.parse::<u16>().is_ok(),
        None => false,
    };
    let hp = if has_port { hostport.to_string() } else { format!("{hostport}:4222") };
    Some((scheme, userinfo, hp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolvers_are_left_out() {
        let (ns, search) =
            host_resolvers("# x\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch a.example b\noptions edns0\n");
        assert_eq!(ns, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(search, vec!["a.example".to_string(), "b".to_string()]);
        let opts = NetOptions { nameservers: ns, search, ..NetOptions::default() };
        assert!(opts.resolv_conf().contains("nameserver 10.0.0.2\nsearch a.example b\n"));
    }

    #[test]
    fn only_the_hosts_own_addresses_need_a_relay() {
        for h in ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]", "0.0.0.0"] {
            assert!(is_host_local(h), "{h}");
        }
        for h in ["lab", "nats.example.com", "198.18.0.2", "169.254.169.254"] {
            assert!(!is_host_local(h), "{h}");
        }
    }

    #[test]
    fn urls_are_rewritten_to_relays() {
        let m = |t: &str| (t == "127.0.0.1:4222").then(|| "10.213.0.1:5000".to_string());
        assert_eq!(rewrite_nats_urls("nats://127.0.0.1:4222", m), "nats://10.213.0.1:5000");
        assert_eq!(rewrite_nats_urls("nats://u:p@127.0.0.1", m), "nats://u:p@10.213.0.1:5000");
        assert_eq!(rewrite_nats_urls("127.0.0.1:4222, tls://other:1", m), "10.213.0.1:5000,tls://other:1");
        assert_eq!(nats_url_targets("nats://a:1,b"), vec!["a:1".to_string(), "b:4222".to_string()]);
        assert!(nats_url_targets("").is_empty());
    }
}
