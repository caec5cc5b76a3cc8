//! Workload networking of the sandboxed tiers, end to end: an "upstream" network namespace made
//! here stands in for the internet (198.18.0.0/15 behind a veth, never any outside address) and
//! runs a NATS server, a resolver answering `lab`, a byte sink and a listener on a denied
//! network. For the container and the micro-VM tier, a workload resolves `lab`, reaches the
//! upstream NATS through masquerade, cannot reach the host, its neighbours or denied networks,
//! is held to a bandwidth limit, answers on a forwarded port, and leaves nothing behind after a
//! stop, a SIGKILL of the node and a restart. Every test here is named `network_*`, so
//! `cargo test --release network` runs exactly them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The tests share the host's port 18080 and measure throughput: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sink (`:9`, answers `ok` once the sender half-closes), resolver (`:53/udp`, `lab` → its own
/// address) and a listener on the denied address (`:80`).
const UPSTREAM_PY: &str = r#"
import socket, struct, sys, threading
addr, denied = sys.argv[1], sys.argv[2]
def sink(c):
    while c.recv(65536):
        pass
    c.sendall(b"ok\n"); c.close()
def serve(a, port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a, port)); s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def dns():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((addr, 53))
    while True:
        q, peer = u.recvfrom(512)
        i, labels = 12, []
        while q[i]:
            labels.append(q[i+1:i+1+q[i]].decode().lower()); i += 1 + q[i]
        qtype = struct.unpack(">H", q[i+1:i+3])[0]
        question = q[12:i+5]
        name = ".".join(labels)
        known = name == "lab"
        answer = b""
        if known and qtype == 1:
            answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(addr)
        flags = 0x8180 if known else 0x8183
        u.sendto(q[:2] + struct.pack(">HHHHH", flags, 1, 1 if answer else 0, 0, 0) + question + answer, peer)
threading.Thread(target=dns, daemon=True).start()
threading.Thread(target=serve, args=(denied, 80, lambda c: c.close()), daemon=True).start()
print("ready", flush=True)
serve(addr, 9, sink)
"#;

/// The stand-in for the internet: namespace `nexup<i>` at `198.18.<2i>.2`, with a denied
/// network `198.18.<2i+1>.0/24` behind it.
struct Upstream {
    ns: String,
    host_if: String,
    /// Address of the upstream services.
    addr: String,
    /// The host's address on the veth.
    host_addr: String,
    /// A network the node is told to deny, and an address on it with a listener.
    denied_net: String,
    denied_addr: String,
    children: Vec<Child>,
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

impl Upstream {
    fn start(i: u8) -> Upstream {
        let ns = format!("nexup{i}");
        let host_if = format!("nexup{i}h");
        let (a, d) = (2 * i, 2 * i + 1);
        let _ = Command::new("ip").args(["netns", "delete", &ns]).output();
        let _ = Command::new("ip").args(["link", "delete", &host_if]).output();
        run("ip", &["netns", "add", &ns]);
        run("ip", &["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        run("ip", &["addr", "add", &format!("198.18.{a}.1/24"), "dev", &host_if]);
        run("ip", &["link", "set", &host_if, "up"]);
        let inside = format!(
            "link set lo up\naddr add 198.18.{a}.2/24 dev eth0\naddr add 198.18.{d}.2/24 dev eth0\nlink set eth0 up\nroute add default via 198.18.{a}.1\n"
        );
        let mut c = Command::new("ip").args(["-n", &ns, "-b", "-"]).stdin(Stdio::piped()).spawn().unwrap();
        c.stdin.take().unwrap().write_all(inside.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success());
        run("ip", &["route", "replace", &format!("198.18.{d}.0/24"), "via", &format!("198.18.{a}.2")]);
        let mut up = Upstream {
            ns: ns.clone(),
            host_if,
            addr: format!("198.18.{a}.2"),
            host_addr: format!("198.18.{a}.1"),
            denied_net: format!("198.18.{d}.0/24"),
            denied_addr: format!("198.18.{d}.2"),
            children: Vec::new(),
        };
        let py = "/usr/bin/python3";
        let mut svc = Command::new("ip")
            .args(["netns", "exec", &ns, py, "-c", UPSTREAM_PY, &up.addr, &up.denied_addr])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = [0u8; 6];
        svc.stdout.take().unwrap().read_exact(&mut ready).unwrap();
        assert_eq!(&ready, b"ready\n");
        up.children.push(svc);
        let nats = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(nats_server_bin())
            .args(["-a", &up.addr, "-p", "4222"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        up.children.push(nats);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&format!("{}:4222", up.addr).parse().unwrap(), Duration::from_millis(200))
            .is_err()
        {
            assert!(std::time::Instant::now() < deadline, "the upstream nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        up
    }

    fn nats_url(&self) -> String {
        format!("nats://{}:4222", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["route", "delete", &self.denied_net]).output();
        let _ = Command::new("ip").args(["link", "delete", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "delete", &self.ns]).output();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Tier {
    Container,
    Microvm,
}

/// The workloads' network: nex's own bridge, or CNI plugins (ptp + host-local from Debian's
/// containernetworking-plugins) on the conflist `nex node preflight` writes.
#[derive(Clone, Copy, PartialEq)]
enum Net {
    Builtin,
    Cni,
}

/// Address prefix of the workloads in test `index` with `net`.
fn workload_prefix(net: Net, index: u8) -> String {
    match net {
        Net::Builtin => "10.213.".into(),
        Net::Cni => format!("10.99.{index}."),
    }
}

/// Adds the CNI section (network `nexnet<index>` on `10.99.<index>.0/24`, its conflist in the
/// test's directory) and has `nex node preflight` write the conflist.
fn with_cni(cfg: &mut Value, dir: &std::path::Path, index: u8) {
    assert!(
        std::path::Path::new("/usr/lib/cni/ptp").is_file() || std::env::var("NEX_REQUIRE_TIERS").as_deref() != Ok("1"),
        "the CNI tests need Debian's CNI plugins: apt-get install -y containernetworking-plugins"
    );
    cfg["cni"] = json!({
        "network_name": format!("nexnet{index}"),
        "interface_name": "veth0",
        "subnet": format!("10.99.{index}.0/24"),
        "conf_dir": dir.join("cni"),
    });
    cfg["internal_node_host"] = json!(format!("10.99.{index}.1"));
    let path = dir.join("preflight.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let out = Command::new(nex_bin()).args(["node", "preflight", "--config"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Wrote the CNI network config"), "preflight: {text}");
    assert!(text.contains("CNI plugin ptp") && text.contains("CNI plugin host-local"), "preflight: {text}");
    let conf: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("cni/nexnet{index}.conflist"))).unwrap()).unwrap();
    assert_eq!(conf["plugins"][0]["type"], "ptp");
}

/// Host-local address leases and cached CNI results that name node run `run`.
fn cni_leftovers(run: &str) -> Vec<String> {
    let mut out = Vec::new();
    let needle = format!("nex-{run}-");
    for e in std::fs::read_dir(nex_node::tiers::cni::CACHE_DIR).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&needle) {
            out.push(format!("CNI cache {}", e.path().display()));
        }
    }
    for net in std::fs::read_dir("/var/lib/cni/networks").into_iter().flatten().flatten() {
        for lease in std::fs::read_dir(net.path()).into_iter().flatten().flatten() {
            if std::fs::read_to_string(lease.path()).is_ok_and(|s| s.contains(&needle)) {
                out.push(format!("CNI lease {}", lease.path().display()));
            }
        }
    }
    out
}

impl Tier {
    fn available(self) -> bool {
        let mut missing = Vec::new();
        if !is_root() {
            missing.push("root");
        }
        for (tool, why) in [("nft", "nftables"), ("tc", "iproute2"), ("/usr/bin/python3", "python3")] {
            if !on_path(tool) && !std::path::Path::new(tool).is_file() {
                missing.push(why);
            }
        }
        let name = match self {
            Tier::Container => {
                if nex_node::tiers::container::find_runtime("", &[]).is_none() {
                    missing.push("runc (apt-get install -y runc)");
                }
                "container"
            }
            Tier::Microvm => {
                if nex_node::tiers::microvm::find_qemu(&[]).is_none() {
                    missing.push("QEMU (apt-get install -y qemu-system-x86)");
                }
                "microvm"
            }
        };
        if !tier_available(name, &missing) {
            return false;
        }
        if self == Tier::Microvm {
            assert!(image_dir().join("rootfs.cpio").is_file(), "no micro-VM image: run `make build`");
        }
        true
    }

    fn config(self, dir: &std::path::Path, extra: Value) -> Value {
        let mut cfg = match self {
            Tier::Container => node_config(dir, json!({"no_sandbox": false, "isolation": "container"})),
            Tier::Microvm => node_config(
                dir,
                json!({
                    "no_sandbox": false,
                    "isolation": "microvm",
                    "microvm_accel": "tcg",
                    "kernel_filepath": image_dir().join("vmlinuz"),
                    "rootfs_filepath": image_dir().join("rootfs.cpio"),
                    "machine_template": {"vcpu_count": 1, "memsize_mib": 256},
                }),
            ),
        };
        cfg["machine_pool_size"] = json!(2);
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        cfg
    }

    /// What node run `run` left on the host: links (bridge, veths, taps, ifb devices),
    /// namespaces, nft tables, forwarded ports.
    fn leftovers(self, run: &str) -> Vec<String> {
        let mut out = Vec::new();
        for l in sh("ip", &["-o", "link", "show"]).lines() {
            if ["nxb", "nx", "nv", "ni"].iter().any(|p| l.contains(&format!("{p}{run}"))) {
                out.push(format!("link {l}"));
            }
        }
        for l in sh("ip", &["netns", "list"]).lines() {
            if l.starts_with(&format!("nex-{run}-")) || l.starts_with(&format!("nxv{run}")) {
                out.push(format!("netns {l}"));
            }
        }
        let tables = sh("nft", &["list", "tables"]);
        for t in [format!("nex_{run}"), format!("nexb_{run}")] {
            if tables.contains(&t) {
                out.push(format!("nft table {t}"));
            }
        }
        if listening_tcp().iter().any(|(_, p)| *p == 18080) {
            out.push("a listener on port 18080".into());
        }
        out.extend(cni_leftovers(run));
        out
    }
}

/// ptp's host-side links (random names) that route to an address starting with `prefix`: the
/// links of one test's CNI network.
fn cni_links(prefix: &str) -> std::collections::BTreeSet<String> {
    sh("ip", &["-o", "-4", "route", "show"])
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "dev").nth(1).map(str::to_string))
        .filter(|d| d.starts_with("veth"))
        .collect()
}

/// What run `run` left (with CNI: also any link of the test's network `prefix` in `dead`, or
/// every one when `dead` is `None`).
fn net_leftovers(
    tier: Tier,
    net: Net,
    prefix: &str,
    run: &str,
    dead: Option<&std::collections::BTreeSet<String>>,
) -> Vec<String> {
    let mut out = tier.leftovers(run);
    if net == Net::Cni {
        let now = cni_links(prefix);
        out.extend(now.iter().filter(|l| dead.is_none_or(|d| d.contains(*l))).map(|l| format!("CNI link {l}")));
    }
    out
}

/// Names of the host's network links.
fn links() -> Vec<String> {
    sh("ip", &["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

fn image_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/microvm")
}

fn runs(state: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(state.join("runs"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default()
}

/// Deploys escapeprobe with `argv` and waits for its log line starting with `wait`.
async fn probe(
    user: &User,
    rec: &Recorder,
    node: &Node,
    name: &str,
    argv: &[String],
    ports: &[&str],
    wait: &str,
) -> (String, String) {
    let mut b = user.native(name, &musl_example("escapeprobe")).await;
    b.argv = argv.to_vec();
    b.ports = ports.iter().map(|p| p.to_string()).collect();
    let r = user.deploy(&node.id, &b).await.unwrap_or_else(|e| panic!("deploy {name}: {e}\n{}", node.log()));
    let line = wait_log(rec, &r.id, wait).await;
    (r.id, line)
}

/// `sent: N bytes in MS ms` → bytes per second.
fn rate(line: &str) -> f64 {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (bytes, ms): (f64, f64) = (f[1].parse().unwrap(), f[4].parse().unwrap());
    bytes / (ms.max(1.0) / 1000.0)
}

fn http_get(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_secs(3))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Asks `svc.echo`, retrying while the service's subscription reaches the server (it logs that
/// it listens before the server has it).
async fn echo_request(nc: &async_nats::Client, body: &str) -> String {
    let mut last = String::new();
    for _ in 0..50 {
        match tokio::time::timeout(Duration::from_secs(5), nc.request("svc.echo", body.to_string().into())).await {
            Ok(Ok(m)) => return String::from_utf8_lossy(&m.payload).to_string(),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("svc.echo did not answer: {last}");
}

/// Waits until `f` holds or `within` passes (the caller asserts, with details).
async fn settle(within: Duration, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !f() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const MIB: f64 = 1024.0 * 1024.0;
const BULK: usize = 4 << 20;

/// What each suite starts with: its turn, the upstream, a NATS server, the node's directory.
struct Setup {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    up: Upstream,
    nats: NatsServer,
    dir: tempfile::TempDir,
    state: PathBuf,
}

async fn setup(index: u8) -> Setup {
    let turn = SERIAL.lock().await;
    let up = Upstream::start(index);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    Setup { _turn: turn, up, nats: NatsServer::start(), dir, state }
}

async fn egress_suite(tier: Tier, net: Net, index: u8) {
    if !tier.available() {
        return;
    }
    let Setup { _turn, up, nats, dir, state } = setup(index).await;
    let network = json!({"mode": "egress", "nameservers": [up.addr], "deny": [up.denied_net]});
    let mut cfg = tier.config(dir.path(), json!({"workload_network": network}));
    if net == Net::Cni {
        with_cni(&mut cfg, dir.path(), index);
    }
    let mut node = Node::start_in(&nats, dir, cfg.clone(), &[]).await;
    let run = runs(&state).pop().unwrap();
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let info = user.info(&node.id).await;
    assert_eq!(info.tags.get("nex.network").map(String::as_str), Some("egress"), "{:?}", info.tags);

    // By name, through the workload's resolver and masquerade, to the upstream NATS.
    let upstream = async_nats::connect(up.nats_url()).await.unwrap();
    let mut echo = user.native("echoservice", &musl_example("echoservice")).await;
    echo.environment = env(&[("NATS_URL", "nats://lab:4222")]);
    let e = user.deploy(&node.id, &echo).await.expect("deploy the echo service");
    wait_log(&rec, &e.id, "EchoService 1.0.0 listening on svc.echo via nats://lab:4222").await;
    assert_eq!(echo_request(&upstream, "through lab").await, "through lab");

    // A forwarded port answers on the host; a second claim of the same port is refused.
    let (web, listening) =
        probe(&user, &rec, &node, "web", &["http".into(), "8080".into()], &["18080:8080"], "listening: ").await;
    let web_ip = listening.trim_start_matches("listening: ").split(':').next().unwrap().to_string();
    assert!(web_ip.starts_with(&workload_prefix(net, index)), "{listening}");
    let mut body = Err(String::new());
    for _ in 0..50 {
        body = http_get(18080);
        if body.as_ref().is_ok_and(|b| b.contains("hello from")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(body.as_ref().unwrap().contains(&format!("hello from {web_ip}")), "{body:?}");
    let info = user.info(&node.id).await;
    let m = info.machines.iter().find(|m| m.id == web).unwrap();
    assert_eq!(m.ports, vec!["18080:8080".to_string()]);
    let mut again = user.native("web2", &musl_example("escapeprobe")).await;
    again.ports = vec!["18081:8080".into(), "18080:8080".into()];
    let err = user.deploy(&node.id, &again).await.unwrap_err();
    assert!(err.contains("port 18080 is already in use"), "{err}");
    // What the refused request had opened is closed again.
    assert!(!listening_tcp().iter().any(|(_, p)| *p == 18081), "port 18081 left open");
    again.ports = vec!["80:8080".into()];
    let err = user.deploy(&node.id, &again).await.unwrap_err();
    assert!(err.contains("below 1024"), "{err}");
    node.wait_warm(&user.nc).await;

    // The walls: the host's own addresses, the other workload, the denied network, metadata.
    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let bridge = sh("ip", &["-o", "-4", "addr", "show", "dev", &format!("nxb{run}")]);
    let bridge_ip = bridge.split_whitespace().skip_while(|w| *w != "inet").nth(1).unwrap().split('/').next().unwrap();
    let reachable = format!("{}:9", up.addr);
    let walled = [
        format!("{}:{host_port}", up.host_addr),
        format!("{bridge_ip}:{host_port}"),
        format!("{web_ip}:8080"),
        format!("{}:80", up.denied_addr),
        "169.254.169.254:80".to_string(),
    ];
    let mut argv = vec!["probe".to_string(), format!("tcp={reachable}")];
    argv.extend(walled.iter().map(|t| format!("tcp={t}")));
    let (_, _) = probe(&user, &rec, &node, "walls", &argv, &[], "probe done").await;
    let texts: Vec<String> = rec.logs("walls").iter().map(|(_, v)| v["text"].as_str().unwrap_or("").into()).collect();
    let line = |t: &str| texts.iter().find(|l| l.starts_with(&format!("tcp: {t}: "))).cloned().unwrap_or_default();
    assert!(line(&reachable).ends_with("connected"), "{texts:?}");
    for t in &walled {
        assert!(line(t).contains("refused"), "{t} must be unreachable: {texts:?}");
    }
    drop(host_listener);

    // Unlimited, a bulk transfer runs far above the limit measured below.
    let send = vec!["send".to_string(), format!("{}:9", up.addr), BULK.to_string()];
    let (_, sent) = probe(&user, &rec, &node, "bulk", &send, &[], "sent: ").await;
    let free = rate(&sent);
    assert!(free >= 5.0 * MIB, "unlimited transfer only {:.1} MiB/s: {sent}", free / MIB);

    // SIGKILL of the node, then a restart with a 1 MiB/s bandwidth bucket: the dead run's network
    // is gone, and the limit holds.
    node.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    assert!(!tier.leftovers(&run).is_empty(), "the run made nothing?");
    let prefix = workload_prefix(net, index);
    let dead = cni_links(&prefix);
    assert!(net == Net::Builtin || !dead.is_empty(), "no CNI links for {prefix}*");
    let left = || net_leftovers(tier, net, &prefix, &run, Some(&dead));
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg2 = cfg;
    cfg2["state_dir"] = json!(state);
    // The packet bucket is generous: it must not be what limits the transfer.
    cfg2["rate_limiters"] = json!({
        "bandwidth": {"size": 131072, "refill_time": 125},
        "ops": {"size": 20000, "refill_time": 1000},
    });
    let node2 = Node::start_in(&nats, dir2, cfg2, &[]).await;
    settle(Duration::from_secs(10), || left().is_empty()).await;
    assert!(left().is_empty(), "the dead run left {:?}", left());
    let run2 = runs(&state).pop().unwrap();
    let (bulk, sent) = probe(&user, &rec, &node2, "limited", &send, &[], "sent: ").await;
    let limited = rate(&sent);
    assert!((0.75 * MIB..=1.25 * MIB).contains(&limited), "limited transfer {:.2} MiB/s: {sent}", limited / MIB);
    assert!(free >= 5.0 * limited);
    println!(
        "bulk transfer from the workload: {:.1} MiB/s free, {:.2} MiB/s limited to 1 MiB/s",
        free / MIB,
        limited / MIB
    );
    // STOP removes the workload's devices (its ifb among them).
    let ifbs = |run: &str| links().iter().filter(|n| n.starts_with(&format!("ni{run}"))).count();
    let ops_rules = |run: &str| {
        let table = match net {
            Net::Builtin => ["bridge".to_string(), format!("nexb_{run}")],
            Net::Cni => ["inet".to_string(), format!("nex_{run}")],
        };
        sh("nft", &["list", "table", &table[0], &table[1]]).matches("limit rate over 20000/second").count()
    };
    // One ifb device and one packet-rate rule per agent (the warm ones included), so STOP's
    // removal shows as the counts following the agents while the pool refills.
    let agents = |run: &str| match net {
        Net::Builtin => links()
            .iter()
            .filter(|n| {
                (n.starts_with(&format!("nx{run}")) || n.starts_with(&format!("nv{run}"))) && !n.starts_with("nxb")
            })
            .count(),
        // One cached attachment per agent.
        Net::Cni => cni_leftovers(run).iter().filter(|l| l.starts_with("CNI cache")).count(),
    };
    assert!(ifbs(&run2) >= 1 && ops_rules(&run2) >= 1, "no ifb device or packet-rate rule for the agents");
    user.stop(&node2.id, &bulk, "limited").await.expect("stop");
    wait_log(&rec, &bulk, "Workload stopped").await;
    node2.wait_warm(&user.nc).await;
    let counts = || (agents(&run2), ifbs(&run2), ops_rules(&run2));
    settle(Duration::from_secs(10), || {
        let (n, i, o) = counts();
        n >= 1 && i == n && o == n
    })
    .await;
    let (n, i, o) = counts();
    assert!(
        n >= 1 && i == n && o == n,
        "{n} agents, {i} ifb devices, {o} packet-rate rules: {}",
        sh("ip", &["-o", "link", "show"])
    );
    drop(node2);
    let left = net_leftovers(tier, net, &prefix, &run2, None);
    assert!(left.is_empty(), "{left:?}");
}

async fn isolated_suite(tier: Tier, net: Net, index: u8) {
    if !tier.available() {
        return;
    }
    let Setup { _turn, up, nats, dir, state } = setup(index).await;
    let mut cfg = tier.config(dir.path(), json!({"workload_network": {"mode": "isolated", "nameservers": [up.addr]}}));
    if net == Net::Cni {
        with_cni(&mut cfg, dir.path(), index);
    }
    let node = Node::start_in(&nats, dir, cfg, &[]).await;
    let run = runs(&state).pop().unwrap();
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let info = user.info(&node.id).await;
    assert_eq!(info.tags.get("nex.network").map(String::as_str), Some("isolated"), "{:?}", info.tags);
    // A NATS server the node's relays do not serve is refused with the reason.
    let mut echo = user.native("echoservice", &musl_example("echoservice")).await;
    echo.environment = env(&[("NATS_URL", &up.nats_url())]);
    let err = user.deploy(&node.id, &echo).await.unwrap_err();
    assert!(err.contains("is not a NATS server this node lets workloads reach"), "{err}");
    node.wait_warm(&user.nc).await;
    // The node's NATS works (through the relay); nothing else answers, not even the resolver.
    echo.environment = env(&[("NATS_URL", &nats.url())]);
    let e = user.deploy(&node.id, &echo).await.expect("deploy through the relay");
    wait_log(&rec, &e.id, "EchoService 1.0.0 listening on svc.echo").await;
    assert_eq!(echo_request(&user.nc, "relayed").await, "relayed");
    let targets = [format!("{}:9", up.addr), format!("{}:4222", up.addr), format!("{}:9", up.host_addr)];
    let mut argv = vec!["probe".to_string()];
    argv.extend(targets.iter().map(|t| format!("tcp={t}")));
    probe(&user, &rec, &node, "walls", &argv, &[], "probe done").await;
    let texts: Vec<String> = rec.logs("walls").iter().map(|(_, v)| v["text"].as_str().unwrap_or("").into()).collect();
    for t in &targets {
        let got = texts.iter().find(|l| l.starts_with(&format!("tcp: {t}: "))).cloned().unwrap_or_default();
        assert!(got.contains("refused"), "{t} must be unreachable in isolated mode: {texts:?}");
    }
    drop(node);
    let left = net_leftovers(tier, net, &workload_prefix(net, index), &run, None);
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_container_egress_dns_walls_limits_ports_and_cleanup() {
    egress_suite(Tier::Container, Net::Builtin, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_microvm_egress_dns_walls_limits_ports_and_cleanup() {
    egress_suite(Tier::Microvm, Net::Builtin, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_container_isolated_reaches_only_nats() {
    isolated_suite(Tier::Container, Net::Builtin, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_microvm_isolated_reaches_only_nats() {
    isolated_suite(Tier::Microvm, Net::Builtin, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cni_container_egress_dns_walls_limits_ports_and_cleanup() {
    egress_suite(Tier::Container, Net::Cni, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cni_microvm_egress_dns_walls_limits_ports_and_cleanup() {
    egress_suite(Tier::Microvm, Net::Cni, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cni_container_isolated_reaches_only_nats() {
    isolated_suite(Tier::Container, Net::Cni, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cni_microvm_isolated_reaches_only_nats() {
    isolated_suite(Tier::Microvm, Net::Cni, 8).await;
}

/// The Nex guide's micro-VM sandbox, followed literally: `nex rootfs -o rootfs.ext4`, its
/// `simple.json` (kernel_path, rootfs_path, pool of 1, `cni: {network_name: fcnet,
/// interface_name: veth0}`, 1 vCPU / 256 MiB), `nex node preflight` writing the missing
/// `/etc/cni/conf.d/fcnet.conflist`, `nex node up`, `nex node ls`, then
/// `nex devrun echoservice nats_url=nats://lab:4222` answering `svc.echo` on the upstream NATS.
/// Two additions: the state directory is the test's, and guests run under TCG (this host's KVM
/// boots no stock kernel); the upstream resolver is handed to preflight with `--cni_ns`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_guide_walkthrough_simple_json() {
    if !Tier::Microvm.available() {
        return;
    }
    let Setup { _turn, up, nats, dir, state } = setup(9).await;
    let conflist = std::path::Path::new("/etc/cni/conf.d/fcnet.conflist");
    let saved = std::fs::read(conflist).ok();
    let _ = std::fs::remove_file(conflist);
    struct Restore(Option<Vec<u8>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let p = std::path::Path::new("/etc/cni/conf.d/fcnet.conflist");
            match &self.0 {
                Some(b) => std::fs::write(p, b).unwrap(),
                None => {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
    let _restore = Restore(saved);

    let deb = std::fs::read_dir(image_dir().join("cache"))
        .expect("the kernel package cached by `make build`")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a kernel .deb in target/microvm/cache");
    let res = dir.path().join("nex_resources");
    std::fs::create_dir_all(&res).unwrap();
    let out = Command::new(nex_bin())
        .args(["rootfs", "-o"])
        .arg(res.join("rootfs.ext4"))
        .args(["--size", "96", "--kernel-deb"])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let simple = json!({
        "default_resource_dir": res,
        "kernel_path": res.join("vmlinuz"),
        "rootfs_path": res.join("rootfs.ext4"),
        "machine_pool_size": 1,
        "cni": {"network_name": "fcnet", "interface_name": "veth0"},
        "machine_template": {"vcpu_count": 1, "memsize_mib": 256},
        "tags": {"simple": "true"},
        "state_dir": state,
        "microvm_accel": "tcg",
    });
    let path = dir.path().join("simple.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&simple).unwrap()).unwrap();
    let out = Command::new(nex_bin())
        .args(["node", "preflight", "--config"])
        .arg(&path)
        .args(["--cni_ns", &up.addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "preflight: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Wrote the CNI network config /etc/cni/conf.d/fcnet.conflist"), "{text}");
    let conf: Value = serde_json::from_slice(&std::fs::read(conflist).unwrap()).unwrap();
    assert_eq!(conf["plugins"][0]["ipam"]["subnet"], "192.168.127.0/24");
    assert_eq!(conf["plugins"][0]["dns"]["nameservers"][0], up.addr.as_str());

    let node = Node::start_in(&nats, dir, simple, &[]).await;
    let run = runs(&state).pop().unwrap();
    let ls = Command::new(nex_bin())
        .args(["node", "ls", "--full", "-s", &nats.url()])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.contains(&node.id) && ls.contains("microvm"), "nex node ls: {ls}");

    let home = tempfile::tempdir().unwrap();
    let out = Command::new(nex_bin())
        .arg("devrun")
        .arg(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-musl/release/echoservice"),
        )
        .arg("nats_url=nats://lab:4222")
        .args(["-s", &nats.url()])
        .env("HOME", home.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "devrun: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let upstream = async_nats::connect(up.nats_url()).await.unwrap();
    assert_eq!(echo_request(&upstream, "the guide, literally").await, "the guide, literally");
    let leases = cni_leftovers(&run).iter().filter(|l| l.contains("/var/lib/cni/networks/fcnet/192.168.127.")).count();
    assert!(leases >= 2, "a lease per guest (the workload's and the warm one's): {:?}", cni_leftovers(&run));
    drop(node);
    let left = net_leftovers(Tier::Microvm, Net::Cni, "192.168.127.", &run, None);
    assert!(left.is_empty(), "{left:?}");
}
