//! The network of the sandboxed tiers: one bridge per node run (`nxb<run>`, `10.213.X.1/24`),
//! one address slot per agent, and nftables tables that fence the agents in:
//!
//! * `inet nex_<run>`: from the bridge, only the internal NATS port (any agent: the server
//!   authenticates each) and an agent's own relay ports (matched on its address) reach the host;
//!   nothing is forwarded.
//! * `bridge nexb_<run>`: a frame entering from an agent's port must carry that agent's address
//!   (IPv4 and ARP), so no agent can pose as another, and nothing but IPv4 and ARP passes.
//!
//! Bridge ports are isolated from each other, agents get no default route, and a relay exists per
//! agent and target, serves only that agent's address, connects only to the address the node's
//! target policy checked, and goes with the agent. Without nftables there is no sandboxed tier.
//! Everything is named after the run id, so a node restarted after SIGKILL removes what the dead
//! run left ([`remove`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::nats_targets::Target;

const SUBNET_PREFIX: [u8; 2] = [10, 213];
const NET_LOCK: &str = "/run/nex-net.lock";

/// What the network holds for one agent.
#[derive(Debug, Default)]
struct AgentNet {
    slot: usize,
    /// The agent's bridge port (veth or tap), once attached.
    port: Option<String>,
    /// Relays by target `host:port`: listening port and the task serving it.
    relays: HashMap<String, (u16, tokio::task::JoinHandle<()>)>,
}

/// The bridge, addresses, firewall and relays of one node run.
#[derive(Debug)]
pub struct BridgeNet {
    run_id: String,
    bridge: String,
    subnet: u8,
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

impl BridgeNet {
    /// Creates this run's bridge on a free `10.213.X.0/24` and its firewall; fails when the
    /// firewall cannot be made (a sandbox without it would expose every host service). Every
    /// agent port the tier attaches is named `<port_prefix>…`.
    pub async fn create(run: &str, port_prefix: &str) -> Result<BridgeNet> {
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
            slots: Mutex::new(vec![false; 256]),
            agents: Mutex::new(HashMap::new()),
        };
        // The firewall comes first: the bridge must never be up without it.
        let rules = format!(
            "table inet {table} {{
 set allowed {{ type inet_service; }}
 set relays {{ type ipv4_addr . inet_service; }}
 chain input {{ type filter hook input priority -10; policy accept;
  iifname \"{bridge}\" tcp dport @allowed accept
  iifname \"{bridge}\" ip saddr . tcp dport @relays accept
  iifname \"{bridge}\" drop
 }}
 chain forward {{ type filter hook forward priority -10; policy accept;
  iifname \"{bridge}\" drop
  oifname \"{bridge}\" drop
 }}
}}
table bridge {btable} {{
 set ports {{ type ifname . ipv4_addr; }}
 chain prerouting {{ type filter hook prerouting priority -300; policy accept;
  iifname \"{port_prefix}*\" ether type ip iifname . ip saddr != @ports drop
  iifname \"{port_prefix}*\" ether type arp iifname . arp saddr ip != @ports drop
  iifname \"{port_prefix}*\" ether type != {{ ip, arp }} drop
 }}
}}
",
            table = table_name(run),
            btable = bridge_table_name(run),
        );
        if let Err(e) = run_cmd("nft", &["-f", "-"], Some(&rules)).await {
            remove(run).await;
            bail!(
                "the sandboxed tiers need an nftables firewall to fence workloads in, and it could not be set up ({e:#}): install nftables (apt-get install -y nftables) and run the node as root"
            );
        }
        let script = format!(
            "link add {bridge} type bridge\naddr add {}/24 dev {bridge}\nlink set {bridge} up\n",
            net.host_ip()
        );
        if let Err(e) = run_cmd("ip", &["-b", "-"], Some(&script)).await {
            remove(run).await;
            return Err(e.context("creating the agent bridge"));
        }
        drop(lock);
        Ok(net)
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The host's address on the bridge.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], self.subnet, 1)
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
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), AgentNet { slot: i, ..Default::default() });
        Ok(i)
    }

    /// Records `port` (a veth or tap on the bridge) as agent `id`'s: frames from it must carry
    /// the agent's address.
    pub async fn attach_port(&self, id: &str, port: &str) -> Result<()> {
        let ip = {
            let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
            let a = agents.get_mut(id).ok_or_else(|| anyhow!("agent {id} has no address"))?;
            a.port = Some(port.to_string());
            self.ip(a.slot)
        };
        let element = format!("{{ \"{port}\" . {ip} }}");
        run_cmd("nft", &["add", "element", "bridge", &bridge_table_name(&self.run_id), "ports", &element], None).await
    }

    /// Everything agent `id` had: its relays, firewall entries and address slot.
    pub async fn release(&self, id: &str) {
        let Some(a) = self.agents.lock().unwrap_or_else(|e| e.into_inner()).remove(id) else {
            return;
        };
        let ip = self.ip(a.slot);
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
            let _ = run_cmd(
                "nft",
                &["delete", "element", "bridge", &bridge_table_name(&self.run_id), "ports", &element],
                None,
            )
            .await;
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
            self.ip(a.slot)
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

    /// Removes the bridge and the firewall tables.
    pub async fn remove(&self) {
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

/// Removes the bridge and firewall of run `run` (live or dead).
pub async fn remove(run: &str) {
    let _ = run_cmd("nft", &["delete", "table", "inet", &table_name(run)], None).await;
    let _ = run_cmd("nft", &["delete", "table", "bridge", &bridge_table_name(run)], None).await;
    let _ = run_cmd("ip", &["link", "delete", &bridge_name(run)], None).await;
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
    fn urls_are_rewritten_to_relays() {
        let m = |t: &str| (t == "127.0.0.1:4222").then(|| "10.213.0.1:5000".to_string());
        assert_eq!(rewrite_nats_urls("nats://127.0.0.1:4222", m), "nats://10.213.0.1:5000");
        assert_eq!(rewrite_nats_urls("nats://u:p@127.0.0.1", m), "nats://u:p@10.213.0.1:5000");
        assert_eq!(rewrite_nats_urls("127.0.0.1:4222, tls://other:1", m), "10.213.0.1:5000,tls://other:1");
        assert_eq!(nats_url_targets("nats://a:1,b"), vec!["a:1".to_string(), "b:4222".to_string()]);
        assert!(nats_url_targets("").is_empty());
    }
}
