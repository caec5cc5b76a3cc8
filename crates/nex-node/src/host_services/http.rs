//! The `http` host service, fenced: the node makes the request on its own network, so a
//! function must not reach what only the host can — its loopback services, the cloud metadata
//! address, the private networks around it. Every hop (the URL and each redirect) is checked on
//! the addresses its host resolves to, in every spelling the URL parser accepts (decimal, octal
//! and hex IPv4, IPv4-mapped and -embedded IPv6), and the connection goes to exactly the checked
//! address, so a DNS answer that changes between check and connect cannot slip through. The
//! operator may allow hosts or networks (`config.allow`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde_json::json;

use super::{err, fail, ok, service_config, Answer, HostServiceError};
use crate::config::NodeConfig;

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;
/// Time allowed for each request (each hop), as in Nex.
const TIMEOUT: Duration = Duration::from_millis(2500);

/// Hosts and networks the operator lets functions reach despite [`forbidden_reason`].
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    hosts: Vec<String>,
    nets: Vec<ipnet::IpNet>,
}

impl AllowList {
    /// Parses `config.allow`: an array of host names (`*.example.com` for subdomains), addresses
    /// and CIDRs.
    pub fn from_config(v: &serde_json::Value) -> Result<AllowList, String> {
        let mut a = AllowList::default();
        let Some(list) = v.as_array() else {
            return Err("expected an array of hosts, addresses or CIDRs".into());
        };
        for e in list {
            let s = e.as_str().ok_or_else(|| format!("{e} is not a string"))?.trim();
            if let Ok(n) = s.parse::<ipnet::IpNet>() {
                a.nets.push(n);
            } else if let Ok(ip) = s.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
                a.nets.push(ipnet::IpNet::from(ip));
            } else if crate::nats_targets::is_host_name(s.trim_start_matches("*.")) {
                a.hosts.push(s.to_ascii_lowercase());
            } else {
                return Err(format!("{s:?} is not a host name, address or CIDR"));
            }
        }
        Ok(a)
    }

    fn of(cfg: &NodeConfig) -> AllowList {
        match service_config(cfg, "http").get("allow") {
            Some(v) => AllowList::from_config(v).unwrap_or_default(),
            None => AllowList::default(),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.iter().any(|h| match h.strip_prefix("*.") {
            Some(suffix) => host.ends_with(&format!(".{suffix}")),
            None => *h == host,
        })
    }

    /// True when `ip` (or the IPv4 address an IPv6 spelling embeds) is in an allowed network.
    fn ip_allowed(&self, ip: IpAddr) -> bool {
        let v4 = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        [Some(ip), v4].into_iter().flatten().any(|ip| self.nets.iter().any(|n| n.contains(&ip)))
    }
}

/// Why a function may not reach `ip` (the kind of address), if it may not.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [0, ..] => "an unspecified (this-network) address",
        [127, ..] => "a loopback address",
        [10, ..] | [192, 168, ..] => "a private address",
        [172, b, ..] if (16..32).contains(&b) => "a private address",
        [169, 254, ..] => "a link-local address (where cloud metadata services answer)",
        [100, b, ..] if (64..128).contains(&b) => "a shared (CGNAT) address",
        [a, ..] if (224..240).contains(&a) => "a multicast address",
        [a, ..] if a >= 240 => "a reserved or broadcast address",
        _ => return None,
    })
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return v4_reason(v4);
    }
    let s = ip.segments();
    Some(match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => "an unspecified address",
        [0, 0, 0, 0, 0, 0, 0, 1] => "a loopback address",
        [a, ..] if a & 0xffc0 == 0xfe80 => "a link-local address",
        [a, ..] if a & 0xffc0 == 0xfec0 => "a site-local address",
        [a, ..] if a & 0xfe00 == 0xfc00 => "a unique-local address",
        [a, ..] if a & 0xff00 == 0xff00 => "a multicast address",
        _ => return None,
    })
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), -compatible (`::a.b.c.d`), NAT64
/// (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::`) address: those reach the IPv4 host.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, ..] => Some(low),
        [0, 0, 0, 0, 0, 0, a, b] if (a, b) != (0, 0) && (a, b) != (0, 1) => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(low),
        [0x2002, a, b, ..] => Some(Ipv4Addr::new((a >> 8) as u8, a as u8, (b >> 8) as u8, b as u8)),
        _ => None,
    }
}

/// The addresses `url` may be fetched from, or the refusal (403) or error.
async fn checked_addrs(allow: &AllowList, url: &url::Url) -> Result<Vec<SocketAddr>, HostServiceError> {
    let host = url.host().ok_or_else(|| fail(400, format!("invalid url {url}: no host")))?;
    let port = url.port_or_known_default().ok_or_else(|| fail(400, format!("invalid url {url}: no port")))?;
    let (name, addrs): (String, Vec<SocketAddr>) = match host {
        url::Host::Ipv4(ip) => (ip.to_string(), vec![SocketAddr::new(IpAddr::V4(ip), port)]),
        url::Host::Ipv6(ip) => (format!("[{ip}]"), vec![SocketAddr::new(IpAddr::V6(ip), port)]),
        url::Host::Domain(d) => match tokio::net::lookup_host((d, port)).await {
            Ok(a) => (d.to_string(), a.collect()),
            Err(e) => return Err(fail(500, format!("http request failed: cannot resolve {d}: {e}"))),
        },
    };
    if addrs.is_empty() {
        return Err(fail(500, format!("http request failed: {name} resolves to no address")));
    }
    if allow.host_allowed(&name) {
        return Ok(addrs);
    }
    for a in &addrs {
        if let Some(kind) = forbidden_reason(a.ip()).filter(|_| !allow.ip_allowed(a.ip())) {
            let ip = a.ip();
            let shown = if name == ip.to_string() || name == format!("[{ip}]") {
                name.clone()
            } else {
                format!("{name} ({ip})")
            };
            return Err(fail(
                403,
                format!(
                    "http to {shown} is refused: it is {kind}, which functions may not reach from this node (an operator can allow it in host_services.services.http.config.allow)"
                ),
            ));
        }
    }
    Ok(addrs)
}

/// Answers one `get`/`post`/`put`/`patch`/`delete`/`head`.
pub(super) async fn call(cfg: &NodeConfig, method: &str, url: Option<String>, body: Vec<u8>) -> Answer {
    let mut verb = match method {
        "get" => "GET",
        "post" => "POST",
        "put" => "PUT",
        "patch" => "PATCH",
        "delete" => "DELETE",
        "head" => "HEAD",
        _ => return err(400, "unknown method"),
    };
    let Some(url) = url else { return err(400, "url is required") };
    let mut current = match url::Url::parse(&url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => u,
        Ok(_) => return err(400, format!("invalid url {url:?}: only http:// and https:// are supported")),
        Err(e) => return err(400, format!("invalid url {url:?}: {e}")),
    };
    let allow = AllowList::of(cfg);
    let mut body = Some(body);
    for _ in 0..=MAX_REDIRECTS {
        let addrs = match checked_addrs(&allow, &current).await {
            Ok(a) => a,
            Err(e) => return Err(e),
        };
        let hop = current.clone();
        let hop_body = body.clone();
        let res = tokio::task::spawn_blocking(move || fetch(verb, &hop, addrs, hop_body)).await;
        let resp = match res {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(e),
            Err(e) => return err(500, format!("http request failed: {e}")),
        };
        let location = resp.header("location").map(str::to_string);
        match (resp.status(), location) {
            (301..=303 | 307 | 308, Some(loc)) => {
                current = match current.join(&loc) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => u,
                    _ => return err(502, format!("http request failed: bad redirect to {loc:?}")),
                };
                // As browsers do: 303 (and 301/302 after a POST) continue with a GET.
                let status = resp.status();
                if status == 303 || (matches!(status, 301 | 302) && verb == "POST") {
                    if verb != "HEAD" {
                        verb = "GET";
                    }
                    body = None;
                }
            }
            _ => return answer_of(verb, resp),
        }
    }
    err(502, format!("http request failed: more than {MAX_REDIRECTS} redirects"))
}

/// One request to the checked `addrs`, redirects not followed.
fn fetch(
    verb: &str,
    url: &url::Url,
    addrs: Vec<SocketAddr>,
    body: Option<Vec<u8>>,
) -> Result<ureq::Response, HostServiceError> {
    let agent =
        ureq::AgentBuilder::new().timeout(TIMEOUT).redirects(0).resolver(move |_: &str| Ok(addrs.clone())).build();
    let req = agent.request_url(verb, url).set("Accept", "*/*").set("Accept-Language", "en-us");
    let resp = match body {
        Some(b) if matches!(verb, "POST" | "PUT" | "PATCH") => req.set("Content-Type", "text/plain").send_bytes(&b),
        _ => req.call(),
    };
    match resp {
        Ok(r) | Err(ureq::Error::Status(_, r)) => Ok(r),
        Err(e) => Err(fail(500, format!("http request failed: {e}"))),
    }
}

fn answer_of(verb: &str, resp: ureq::Response) -> Answer {
    let status = resp.status();
    let mut headers = serde_json::Map::new();
    for n in resp.headers_names() {
        let vals: Vec<String> = resp.all(&n).into_iter().map(str::to_string).collect();
        headers.insert(n, json!(vals));
    }
    let mut out = json!({"status": status, "headers": headers});
    if verb != "HEAD" {
        out["body"] = json!(resp.into_string().unwrap_or_default());
    }
    ok(serde_json::to_vec(&out).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(u: &str) -> bool {
        let url = url::Url::parse(u).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        matches!(rt.block_on(checked_addrs(&AllowList::default(), &url)), Err(HostServiceError { code: 403, .. }))
    }

    #[test]
    fn every_spelling_of_an_internal_address_is_refused() {
        for u in [
            "http://127.0.0.1/",
            "http://localhost:8080/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:7f00:1::]/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://0/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/",
            "http://172.16.5.4/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[ff02::1]/",
        ] {
            assert!(refused(u), "{u} must be refused");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in ["198.18.0.1", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:db8::1"] {
            assert_eq!(forbidden_reason(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn the_allow_list_lets_hosts_and_cidrs_through() {
        let a = AllowList::from_config(&json!(["127.0.0.1", "10.0.0.0/8", "*.internal.example", "db.local"])).unwrap();
        assert!(a.ip_allowed("127.0.0.1".parse().unwrap()));
        assert!(a.ip_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!a.ip_allowed("127.0.0.2".parse().unwrap()));
        assert!(a.ip_allowed("10.9.9.9".parse().unwrap()));
        assert!(a.host_allowed("api.internal.example"));
        assert!(!a.host_allowed("internal.example"));
        assert!(a.host_allowed("DB.local."));
        assert!(AllowList::from_config(&json!(["300.1.1.1/8"])).is_err());
        assert!(AllowList::from_config(&json!("127.0.0.1")).is_err());
    }
}
