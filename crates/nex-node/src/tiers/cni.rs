//! CNI networking: when the node configuration has a `cni` section, a sandboxed workload's
//! interface, address and routes come from the standard CNI plugins (`ptp` + `host-local` as
//! `nex node preflight` configures them, or whatever chain the operator's conflist names) instead
//! of nex's own bridge.
//!
//! The node drives the plugins as the CNI specification says: each plugin of the network's
//! conflist is executed with `CNI_COMMAND` = `ADD`, `CHECK` or `DEL`, the network namespace and
//! interface name in the environment and its configuration (with the previous plugin's result)
//! on stdin. The result of an ADD is cached under [`CACHE_DIR`] (root-only), so the DEL of a
//! workload, whether it stops or its node run died, releases exactly what was leased.
//!
//! A micro-VM needs a tap device where CNI makes a veth. `tc-redirect-tap` does that in
//! Firecracker setups; here the node itself does it ([`redirect_tap`]): it has to create and name
//! the tap that QEMU opens anyway, and one less binary to install and trust is one less thing to
//! go wrong. A conflist that names `tc-redirect-tap` works: the node skips that entry.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Where ADD results are kept until the matching DEL.
pub const CACHE_DIR: &str = "/var/lib/cni/nex";
/// Where the distribution's package (`containernetworking-plugins`) installs the plugins; searched
/// after `cni.bin_path`.
pub const DISTRO_BIN_DIRS: &[&str] = &["/usr/lib/cni", "/usr/libexec/cni"];
/// The plugin whose work the node does itself.
const TAP_PLUGIN: &str = "tc-redirect-tap";

/// What the operator configured (`cni.*`, `internal_node_host`).
#[derive(Debug, Clone, PartialEq)]
pub struct CniSettings {
    pub network_name: String,
    pub interface_name: String,
    pub subnet: ipnet::Ipv4Net,
    /// The node's address as workloads see it: the gateway of the CNI network.
    pub gateway: Ipv4Addr,
    pub bin_dirs: Vec<PathBuf>,
    pub conf_dir: PathBuf,
    /// Leave dead runs' attachments alone at start.
    pub preserve: bool,
}

/// The conflist `nex node preflight` writes: ptp with host-local addresses on `subnet`, a
/// default route through the gateway, and resolvers when given. Masquerading is the node's job
/// (its nftables table also keeps workloads off the host), so `ipMasq` stays off and the plugins
/// need no iptables.
pub fn default_conflist(name: &str, subnet: &str, gateway: &str, nameservers: &[String]) -> Value {
    let mut ptp = json!({
        "type": "ptp",
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "subnet": subnet,
            "gateway": gateway,
            "routes": [{"dst": "0.0.0.0/0"}],
        },
    });
    if !nameservers.is_empty() {
        ptp["dns"] = json!({ "nameservers": nameservers });
    }
    json!({ "cniVersion": "0.4.0", "name": name, "plugins": [ptp] })
}

/// The conflist file of network `name` in `dir` (`<name>.conflist`, else a single-plugin
/// `<name>.conf`).
pub fn conflist_path(dir: &Path, name: &str) -> PathBuf {
    let list = dir.join(format!("{name}.conflist"));
    let single = dir.join(format!("{name}.conf"));
    if !list.exists() && single.exists() {
        single
    } else {
        list
    }
}

/// The `dns.nameservers` the network's config gives its plugins, if any.
pub fn conflist_nameservers(c: &crate::config::CniConfig) -> Vec<String> {
    let path = conflist_path(Path::new(&c.conf_dir), &c.network_name);
    let Some(v) = std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()) else {
        return Vec::new();
    };
    let plugins = v.get("plugins").and_then(Value::as_array).cloned().unwrap_or_else(|| vec![v.clone()]);
    plugins
        .iter()
        .filter_map(|p| p["dns"]["nameservers"].as_array())
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect()
}

/// Finds plugin `ty` in the configured directories, then the distribution's.
pub fn find_plugin(ty: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    if ty.is_empty() || ty.contains('/') {
        return None;
    }
    dirs.iter().cloned().chain(DISTRO_BIN_DIRS.iter().map(PathBuf::from)).map(|d| d.join(ty)).find(|p| p.is_file())
}

/// A loaded CNI network.
#[derive(Debug, Clone)]
pub struct Cni {
    pub settings: CniSettings,
    name: String,
    version: String,
    plugins: Vec<Value>,
    raw: String,
}

/// One workload's attachment, from the ADD result.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// The host side of the workload's link (ptp's veth), which the firewall and shapers key on.
    pub host_if: String,
    /// The MAC of the interface in the namespace (a micro-VM's card takes it over).
    pub mac: String,
}

impl Cni {
    /// Reads the network's conflist and checks that every plugin it names can be found.
    pub fn load(settings: CniSettings) -> Result<Cni> {
        let path = conflist_path(&settings.conf_dir, &settings.network_name);
        let raw = std::fs::read_to_string(&path).map_err(|e| {
            anyhow!(
                "cni config file not found: {} ({e}); write it with `nex node preflight --config <file>`",
                path.display()
            )
        })?;
        let v: Value =
            serde_json::from_str(&raw).with_context(|| format!("{} is not a CNI network config", path.display()))?;
        let (name, version) = (
            v["name"].as_str().unwrap_or(&settings.network_name).to_string(),
            v["cniVersion"].as_str().unwrap_or("0.4.0").to_string(),
        );
        let plugins: Vec<Value> = match v.get("plugins").and_then(Value::as_array) {
            Some(list) => list.clone(),
            None if v.get("type").is_some() => vec![v.clone()],
            None => bail!("{} names no plugins", path.display()),
        };
        let plugins: Vec<Value> = plugins.into_iter().filter(|p| p["type"].as_str() != Some(TAP_PLUGIN)).collect();
        if plugins.is_empty() {
            bail!("{} names no plugin but {TAP_PLUGIN}, which gives no address", path.display());
        }
        for p in &plugins {
            let ty = p["type"].as_str().unwrap_or("");
            for t in [ty, p["ipam"]["type"].as_str().unwrap_or("")] {
                if !t.is_empty() && find_plugin(t, &settings.bin_dirs).is_none() {
                    bail!(
                        "the CNI plugin {t:?} of {} is in none of {:?} or {:?}: apt-get install -y containernetworking-plugins",
                        path.display(),
                        settings.bin_dirs,
                        DISTRO_BIN_DIRS
                    );
                }
            }
        }
        Ok(Cni { settings, name, version, plugins, raw })
    }

    fn cni_path(&self) -> String {
        let mut dirs: Vec<String> = self.settings.bin_dirs.iter().map(|d| d.display().to_string()).collect();
        dirs.extend(DISTRO_BIN_DIRS.iter().map(|d| d.to_string()));
        dirs.join(":")
    }

    /// Runs the chain's ADD for container `cid` in namespace `netns` (a path), then CHECK, and
    /// caches the result. Whatever a failed chain made is deleted again.
    pub async fn add(&self, cid: &str, netns: &str) -> Result<Attachment> {
        // Cached before the first plugin runs, so that a node killed mid-ADD still finds the
        // attachment (and its address lease) to delete when it restarts.
        let pending = json!({
            "kind": "cniCacheV1",
            "containerId": cid,
            "networkName": self.name,
            "ifName": self.settings.interface_name,
            "netns": netns,
            "cniPath": self.cni_path(),
            "config": self.raw,
            "result": null,
        });
        write_cache(cid, &pending)?;
        let mut prev: Option<Value> = None;
        for (i, p) in self.plugins.iter().enumerate() {
            match exec(
                p,
                &self.name,
                &self.version,
                "ADD",
                cid,
                netns,
                &self.settings.interface_name,
                &self.cni_path(),
                prev.as_ref(),
            )
            .await
            {
                Ok(r) => prev = r.or(prev),
                Err(e) => {
                    for q in self.plugins[..=i].iter().rev() {
                        let _ = exec(
                            q,
                            &self.name,
                            &self.version,
                            "DEL",
                            cid,
                            netns,
                            &self.settings.interface_name,
                            &self.cni_path(),
                            prev.as_ref(),
                        )
                        .await;
                    }
                    let _ = std::fs::remove_file(cache_file(cid));
                    return Err(e);
                }
            }
        }
        let result = prev.ok_or_else(|| anyhow!("the CNI chain of {} returned no result", self.name))?;
        let entry = json!({
            "kind": "cniCacheV1",
            "containerId": cid,
            "networkName": self.name,
            "ifName": self.settings.interface_name,
            "netns": netns,
            "cniPath": self.cni_path(),
            "config": self.raw,
            "result": result,
        });
        write_cache(cid, &entry)?;
        let checked = async {
            if version_at_least(&self.version, 0, 4) {
                for p in &self.plugins {
                    exec(
                        p,
                        &self.name,
                        &self.version,
                        "CHECK",
                        cid,
                        netns,
                        &self.settings.interface_name,
                        &self.cni_path(),
                        Some(&result),
                    )
                    .await?;
                }
            }
            attachment(&result, &self.settings.interface_name)
        };
        match checked.await {
            Ok(a) => Ok(a),
            Err(e) => {
                del_entry(&entry).await;
                Err(e)
            }
        }
    }

    /// Runs the chain's DEL for `cid` with its cached result and forgets it.
    pub async fn del(&self, cid: &str) {
        match read_cache(cid) {
            Some(entry) => del_entry(&entry).await,
            None => tracing::debug!(cid, "no cached CNI result to delete"),
        }
    }
}

/// Deletes the attachment `entry` describes (the plugins in reverse, each with the cached result,
/// as the spec asks), then its cache file. Errors are logged: a DEL must not stop a teardown.
async fn del_entry(entry: &Value) {
    let s = |k: &str| entry[k].as_str().unwrap_or("").to_string();
    let (cid, netns, ifname, path) = (s("containerId"), s("netns"), s("ifName"), s("cniPath"));
    let conf: Value = serde_json::from_str(entry["config"].as_str().unwrap_or("{}")).unwrap_or(Value::Null);
    let name = conf["name"].as_str().unwrap_or("").to_string();
    let version = conf["cniVersion"].as_str().unwrap_or("0.4.0").to_string();
    let plugins: Vec<Value> = match conf.get("plugins").and_then(Value::as_array) {
        Some(l) => l.clone(),
        None => vec![conf.clone()],
    };
    // A namespace that is already gone is passed as none: the plugins then only release leases.
    let netns = if Path::new(&netns).exists() { netns } else { String::new() };
    for p in plugins.iter().rev().filter(|p| p["type"].as_str() != Some(TAP_PLUGIN)) {
        let result = Some(&entry["result"]).filter(|r| !r.is_null());
        if let Err(e) = exec(p, &name, &version, "DEL", &cid, &netns, &ifname, &path, result).await {
            tracing::warn!(cid, error = %format!("{e:#}"), "CNI DEL failed");
        }
    }
    let _ = std::fs::remove_file(cache_file(&cid));
}

/// Deletes every attachment cached for a container id starting with `prefix` (a dead run's).
pub async fn del_prefix(prefix: &str) {
    let Ok(rd) = std::fs::read_dir(CACHE_DIR) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(cid) = name.strip_suffix(".json").filter(|c| c.starts_with(prefix)) {
            if let Some(entry) = read_cache(cid) {
                del_entry(&entry).await;
            }
        }
    }
}

fn cache_file(cid: &str) -> PathBuf {
    Path::new(CACHE_DIR).join(format!("{cid}.json"))
}

fn write_cache(cid: &str, entry: &Value) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(CACHE_DIR)?;
    std::fs::write(cache_file(cid), serde_json::to_vec(entry)?).context("caching the CNI result")
}

fn read_cache(cid: &str) -> Option<Value> {
    std::fs::read(cache_file(cid)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

fn version_at_least(v: &str, major: u32, minor: u32) -> bool {
    let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// Executes one plugin. Its configuration is the conflist entry with the network's name,
/// version and the previous result; the environment holds nothing but the CNI variables.
#[allow(clippy::too_many_arguments)]
async fn exec(
    plugin: &Value,
    network: &str,
    version: &str,
    command: &str,
    cid: &str,
    netns: &str,
    ifname: &str,
    cni_path: &str,
    prev: Option<&Value>,
) -> Result<Option<Value>> {
    let ty = plugin["type"].as_str().unwrap_or("");
    let dirs: Vec<PathBuf> = cni_path.split(':').filter(|d| !d.is_empty()).map(PathBuf::from).collect();
    let bin = find_plugin(ty, &dirs).ok_or_else(|| anyhow!("CNI plugin {ty:?} not found in {cni_path}"))?;
    let mut conf = plugin.clone();
    conf["name"] = json!(network);
    conf["cniVersion"] = json!(version);
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    let mut child = Command::new(&bin)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running the CNI plugin {}", bin.display()))?;
    if let Some(mut w) = child.stdin.take() {
        w.write_all(&serde_json::to_vec(&conf)?).await?;
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| anyhow!("the CNI plugin {ty} ({command}) did not finish within 30 s"))??;
    if !out.status.success() {
        // Plugins report errors as {"code", "msg", "details"} on stdout.
        let err: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let msg = match (err["msg"].as_str(), err["details"].as_str()) {
            (Some(m), Some(d)) if !d.is_empty() => format!("{m}: {d}"),
            (Some(m), _) => m.to_string(),
            _ => String::from_utf8_lossy(&out.stderr).trim().to_string(),
        };
        bail!("CNI plugin {ty} ({command}) failed: {msg}");
    }
    if command != "ADD" || out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    Ok(Some(serde_json::from_slice(&out.stdout).with_context(|| format!("the CNI plugin {ty} printed no result"))?))
}

/// The address, gateway and links of an ADD result.
fn attachment(result: &Value, ifname: &str) -> Result<Attachment> {
    let ifaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    let ip = result["ips"]
        .as_array()
        .and_then(|l| l.iter().find(|i| i["address"].as_str().is_some_and(|a| a.parse::<ipnet::Ipv4Net>().is_ok())))
        .ok_or_else(|| anyhow!("the CNI result has no IPv4 address"))?;
    let net: ipnet::Ipv4Net = ip["address"].as_str().unwrap_or("").parse()?;
    let gateway = ip["gateway"].as_str().and_then(|g| g.parse().ok());
    let inside = ifaces
        .iter()
        .find(|i| i["sandbox"].as_str().is_some_and(|s| !s.is_empty()) && i["name"].as_str() == Some(ifname));
    let host = ifaces.iter().find(|i| i["sandbox"].as_str().is_none_or(str::is_empty));
    Ok(Attachment {
        ip: net.addr(),
        prefix: net.prefix_len(),
        gateway,
        host_if: host
            .and_then(|h| h["name"].as_str())
            .ok_or_else(|| anyhow!("the CNI result names no host-side interface (use ptp or bridge)"))?
            .to_string(),
        mac: inside.and_then(|i| i["mac"].as_str()).unwrap_or("").to_string(),
    })
}

/// Makes tap device `tap` in namespace `netns` (a name) and joins it to the CNI interface
/// `ifname` there, in both directions, with tc's mirred redirect: the guest's frames leave
/// through the veth, and what reaches the veth goes to the guest.
pub async fn redirect_tap(netns: &str, ifname: &str, tap: &str) -> Result<()> {
    let ip = format!("tuntap add dev {tap} mode tap\nlink set {tap} up\n");
    super::net::run_cmd("ip", &["-n", netns, "-b", "-"], Some(&ip)).await.context("creating the guest's tap device")?;
    let tc = format!(
        "qdisc add dev {ifname} ingress\nfilter add dev {ifname} parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev {tap}\nqdisc add dev {tap} ingress\nfilter add dev {tap} parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev {ifname}\n"
    );
    super::net::run_cmd("tc", &["-n", netns, "-b", "-"], Some(&tc))
        .await
        .context("redirecting the tap to the CNI interface")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ptp_result_gives_address_gateway_and_links() {
        let r = json!({
            "cniVersion": "0.4.0",
            "interfaces": [
                {"name": "veth1a2b3c4d", "mac": "aa:aa:aa:aa:aa:aa"},
                {"name": "veth0", "mac": "02:00:00:00:00:07", "sandbox": "/run/netns/x"}
            ],
            "ips": [{"version": "4", "interface": 1, "address": "192.168.127.7/24", "gateway": "192.168.127.1"}]
        });
        let a = attachment(&r, "veth0").unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(192, 168, 127, 7));
        assert_eq!(a.prefix, 24);
        assert_eq!(a.gateway, Some(Ipv4Addr::new(192, 168, 127, 1)));
        assert_eq!(a.host_if, "veth1a2b3c4d");
        assert_eq!(a.mac, "02:00:00:00:00:07");
        assert!(attachment(&json!({"ips": []}), "veth0").is_err());
    }

    #[test]
    fn the_default_conflist_is_ptp_on_host_local() {
        let v = default_conflist("fcnet", "10.10.10.0/24", "10.10.10.1", &["10.0.0.2".into()]);
        assert_eq!(v["plugins"][0]["type"], "ptp");
        assert_eq!(v["plugins"][0]["ipam"]["type"], "host-local");
        assert_eq!(v["plugins"][0]["ipam"]["subnet"], "10.10.10.0/24");
        assert_eq!(v["plugins"][0]["dns"]["nameservers"][0], "10.0.0.2");
        assert!(version_at_least("0.4.0", 0, 4) && version_at_least("1.0.0", 0, 4) && !version_at_least("0.3.1", 0, 4));
        assert!(find_plugin("../x", &[]).is_none());
    }
}
