//! Which NATS servers a workload may reach through the node: the sandbox relays and the
//! connections the node opens on a request's behalf go only to the node's own NATS servers and to
//! what the operator allows (`allowed_nats_targets`), never to whatever `host:port` a requester
//! names (the host's loopback services, the cloud's metadata address, another tenant's server).

use std::net::{IpAddr, SocketAddr};

use crate::config::NodeConfig;

/// One `allowed_nats_targets` entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Allowed {
    /// A host name or address, any port.
    Host(String),
    /// A host name or address and one port.
    HostPort(String, u16),
    /// A network, any port.
    Net(ipnet::IpNet),
}

impl Allowed {
    /// Parses `host`, `host:port`, `[v6]:port`, an address or a CIDR.
    pub fn parse(s: &str) -> Result<Allowed, String> {
        let t = s.trim();
        if let Ok(net) = t.parse::<ipnet::IpNet>() {
            return Ok(Allowed::Net(net));
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(Allowed::Net(ipnet::IpNet::from(ip)));
        }
        if let Ok(sa) = t.parse::<SocketAddr>() {
            return Ok(Allowed::HostPort(sa.ip().to_string(), sa.port()));
        }
        let (host, port) = match t.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| format!("{s:?}: {p:?} is not a port"))?)),
            None => (t, None),
        };
        if !is_host_name(host) {
            return Err(format!("{s:?} is not a host, host:port, address or CIDR"));
        }
        let host = host.to_ascii_lowercase();
        Ok(match port {
            Some(p) => Allowed::HostPort(host, p),
            None => Allowed::Host(host),
        })
    }
}

/// True for a syntactically valid DNS name.
pub fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A checked target: what the URL said and the address it may be reached at.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// `host:port` as written in the URL (port 4222 when absent).
    pub host_port: String,
    /// The allowed address the node (or its relay) connects to: resolved once, so a DNS answer
    /// that changes later cannot redirect the connection.
    pub addr: SocketAddr,
}

/// The node's NATS target policy.
#[derive(Debug, Clone)]
pub struct NatsTargets {
    own: Vec<(String, u16)>,
    allowed: Vec<Allowed>,
    control: Option<async_nats::Client>,
}

impl NatsTargets {
    /// The policy of `cfg` for a node whose control connection dialled `control_url`. Servers the
    /// control connection learns about (a cluster's `connect_urls`) count as the node's own.
    pub fn new(cfg: &NodeConfig, control_url: &str, control: Option<async_nats::Client>) -> NatsTargets {
        let mut own = Vec::new();
        for list in [control_url, cfg.host_services.nats_url.as_str()] {
            for hp in crate::tiers::net::nats_url_targets(list) {
                if let Some(t) = split_host_port(&hp) {
                    own.push(t);
                }
            }
        }
        let allowed = cfg.allowed_nats_targets.iter().filter_map(|a| Allowed::parse(a).ok()).collect();
        NatsTargets { own, allowed, control }
    }

    /// Human-readable list of what is allowed, for error messages.
    pub fn describe(&self) -> String {
        let mut v: Vec<String> = self.own.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        if !self.allowed.is_empty() {
            v.push("allowed_nats_targets".into());
        }
        v.join(", ")
    }

    fn own_servers(&self) -> Vec<(String, u16)> {
        let mut own = self.own.clone();
        if let Some(c) = &self.control {
            for u in c.server_info().connect_urls {
                if let Some(t) = split_host_port(&u) {
                    own.push(t);
                }
            }
        }
        own
    }

    /// Checks every URL of a comma-separated NATS URL list; each target with its address, or an
    /// error naming the first target that is not allowed.
    pub async fn check(&self, urls: &str) -> Result<Vec<Target>, String> {
        let mut out = Vec::new();
        for hp in crate::tiers::net::nats_url_targets(urls) {
            out.push(self.check_one(&hp).await?);
        }
        Ok(out)
    }

    async fn check_one(&self, hp: &str) -> Result<Target, String> {
        let refused = || {
            format!(
                "{hp} is not a NATS server this node lets workloads reach (allowed: {}); an operator can add it to allowed_nats_targets",
                self.describe()
            )
        };
        let (host, port) = split_host_port(hp).ok_or_else(refused)?;
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(a) => a.collect(),
            Err(e) => return Err(format!("{hp}: cannot resolve {host}: {e}")),
        };
        let own = self.own_servers();
        let named = own.iter().any(|(h, p)| *p == port && h.eq_ignore_ascii_case(&host))
            || self.allowed.iter().any(|a| match a {
                Allowed::Host(h) => h.eq_ignore_ascii_case(&host),
                Allowed::HostPort(h, p) => *p == port && h.eq_ignore_ascii_case(&host),
                Allowed::Net(_) => false,
            });
        let mut own_addrs: Vec<SocketAddr> = Vec::new();
        for (h, p) in own.iter().chain(
            self.allowed
                .iter()
                .filter_map(|a| match a {
                    Allowed::HostPort(h, p) => Some((h.clone(), *p)),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .iter(),
        ) {
            if *p == port {
                if let Ok(a) = tokio::net::lookup_host((h.as_str(), *p)).await {
                    own_addrs.extend(a);
                }
            }
        }
        let pick = addrs.iter().find(|a| {
            named
                || own_addrs.contains(a)
                || self.allowed.iter().any(|al| matches!(al, Allowed::Net(n) if n.contains(&a.ip())))
        });
        match pick {
            Some(a) => Ok(Target { host_port: hp.to_string(), addr: *a }),
            None => Err(refused()),
        }
    }
}

/// `(host, port)` of `host:port` or `[v6]:port` (port 4222 when absent), also from a URL.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let s = s.trim();
    let s = s.split_once("://").map(|(_, r)| r).unwrap_or(s);
    let s = s.rsplit_once('@').map(|(_, r)| r).unwrap_or(s).trim_end_matches('/');
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 4222,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None if !s.is_empty() => Some((s.to_string(), 4222)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str]) -> NatsTargets {
        let cfg =
            NodeConfig { allowed_nats_targets: allowed.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        NatsTargets::new(&cfg, "nats://127.0.0.1:4222,nats://localhost:4223", None)
    }

    #[test]
    fn entries_parse() {
        assert_eq!(Allowed::parse("10.0.0.0/8").unwrap(), Allowed::Net("10.0.0.0/8".parse().unwrap()));
        assert_eq!(
            Allowed::parse("nats.example.com:4222").unwrap(),
            Allowed::HostPort("nats.example.com".into(), 4222)
        );
        assert_eq!(Allowed::parse("Lab").unwrap(), Allowed::Host("lab".into()));
        assert!(Allowed::parse("not a host").is_err());
        assert!(Allowed::parse("h:99999").is_err());
    }

    #[tokio::test]
    async fn only_the_nodes_servers_and_allowed_targets_pass() {
        let p = policy(&[]);
        let t = p.check("nats://127.0.0.1:4222").await.unwrap();
        assert_eq!(t[0].addr, "127.0.0.1:4222".parse().unwrap());
        assert!(p.check("nats://localhost:4223").await.is_ok());
        // Same host, another port (the host's other loopback services) is refused.
        let e = p.check("nats://127.0.0.1:6379").await.unwrap_err();
        assert!(e.contains("127.0.0.1:6379") && e.contains("allowed_nats_targets"), "{e}");
        assert!(p.check("nats://169.254.169.254:80").await.is_err());
        assert!(p.check("nats://127.0.0.1:4222,nats://10.1.2.3:4222").await.is_err());
        let p = policy(&["10.1.0.0/16", "127.0.0.1:7422"]);
        assert!(p.check("nats://10.1.2.3:4222").await.is_ok());
        assert!(p.check("tls://127.0.0.1:7422").await.is_ok());
    }

    #[test]
    fn host_ports() {
        assert_eq!(split_host_port("nats://u:p@h:1"), Some(("h".into(), 1)));
        assert_eq!(split_host_port("h"), Some(("h".into(), 4222)));
        assert_eq!(split_host_port("[::1]:5"), Some(("::1".into(), 5)));
        assert_eq!(split_host_port("nats://10.0.0.1:4222/"), Some(("10.0.0.1".into(), 4222)));
    }
}
