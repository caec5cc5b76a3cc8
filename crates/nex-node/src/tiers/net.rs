//! The network of the sandboxed tiers: one bridge per node run (`nxb<run>`, `10.213.X.1/24`),
//! one address slot per agent, and an nftables table that lets agents reach only the node's
//! internal NATS and the node's relays to the NATS URLs named in workload environments.
//!
//! Bridge ports are isolated from each other (a container's veth or a guest's tap), agents get no
//! default route, and everything is named after the run id, so a node restarted after SIGKILL
//! removes what the dead run left ([`remove`]).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const SUBNET_PREFIX: [u8; 2] = [10, 213];
const NET_LOCK: &str = "/run/nex-net.lock";

/// The bridge, addresses, firewall and relays of one node run.
#[derive(Debug)]
pub struct BridgeNet {
    run_id: String,
    bridge: String,
    subnet: u8,
    firewall: bool,
    slots: Mutex<Vec<bool>>,
    relays: tokio::sync::Mutex<HashMap<String, u16>>,
}

fn bridge_name(run: &str) -> String {
    format!("nxb{run}")
}
fn table_name(run: &str) -> String {
    format!("nex_{run}")
}

impl BridgeNet {
    /// Creates this run's bridge on a free `10.213.X.0/24` and its nftables table.
    pub async fn create(run: &str) -> Result<BridgeNet> {
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
        let mut net = BridgeNet {
            run_id: run.to_string(),
            bridge: bridge.clone(),
            subnet,
            firewall: false,
            slots: Mutex::new(vec![false; 256]),
            relays: tokio::sync::Mutex::new(HashMap::new()),
        };
        let script = format!(
            "link add {bridge} type bridge\naddr add {}/24 dev {bridge}\nlink set {bridge} up\n",
            net.host_ip()
        );
        run_cmd("ip", &["-b", "-"], Some(&script)).await.context("creating the agent bridge")?;
        drop(lock);
        let table = table_name(run);
        let rules = format!(
            "table inet {table} {{
 set allowed {{ type inet_service; }}
 chain input {{ type filter hook input priority -10; policy accept;
  iifname \"{bridge}\" tcp dport @allowed accept
  iifname \"{bridge}\" drop
 }}
 chain forward {{ type filter hook forward priority -10; policy accept;
  iifname \"{bridge}\" drop
  oifname \"{bridge}\" drop
 }}
}}
"
        );
        net.firewall = match run_cmd("nft", &["-f", "-"], Some(&rules)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "no nftables: agents can reach any host service listening on all addresses; install nftables (apt-get install -y nftables)");
                false
            }
        };
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

    /// Takes a free address slot (2..=254).
    pub fn alloc_slot(&self) -> Result<usize> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let i = (2..255).find(|&i| !s[i]).ok_or_else(|| anyhow!("no free agent address: 253 agents run"))?;
        s[i] = true;
        Ok(i)
    }

    /// Returns an address slot.
    pub fn free_slot(&self, i: usize) {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())[i] = false;
    }

    /// Lets agents reach `port` on the host side of the bridge.
    pub async fn allow_port(&self, port: u16) -> Result<()> {
        if !self.firewall {
            return Ok(());
        }
        run_cmd(
            "nft",
            &["add", "element", "inet", &table_name(&self.run_id), "allowed", &format!("{{ {port} }}")],
            None,
        )
        .await
    }

    /// A relay on the bridge address to `target` (host:port), created once per target.
    async fn relay(&self, target: &str) -> Result<u16> {
        let mut relays = self.relays.lock().await;
        if let Some(p) = relays.get(target) {
            return Ok(*p);
        }
        let listener = tokio::net::TcpListener::bind((self.host_ip(), 0)).await?;
        let port = listener.local_addr()?.port();
        self.allow_port(port).await?;
        let to = target.to_string();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = to.clone();
                tokio::spawn(async move {
                    match tokio::net::TcpStream::connect(&to).await {
                        Ok(mut out) => {
                            let _ = out.set_nodelay(true);
                            let _ = inbound.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                        Err(e) => tracing::debug!(target = %to, error = %e, "relay could not reach NATS"),
                    }
                });
            }
        });
        relays.insert(target.to_string(), port);
        Ok(port)
    }

    /// `urls` with every `host:port` replaced by a relay on the bridge.
    pub async fn workload_nats_url(&self, urls: &str) -> Result<String> {
        let mut ports = HashMap::new();
        for target in nats_url_targets(urls) {
            let port = self.relay(&target).await?;
            ports.insert(target, port);
        }
        let host = self.host_ip();
        Ok(rewrite_nats_urls(urls, |t| ports.get(t).map(|p| format!("{host}:{p}"))))
    }

    /// Removes the bridge and the firewall table.
    pub async fn remove(&self) {
        remove(&self.run_id).await;
    }
}

/// Removes the bridge and firewall of run `run` (live or dead).
pub async fn remove(run: &str) {
    let _ = run_cmd("nft", &["delete", "table", "inet", &table_name(run)], None).await;
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
