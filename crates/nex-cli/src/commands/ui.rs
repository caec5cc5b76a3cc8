//! `nex ui`: a live, read-only web console. Server-rendered HTML (axum) with a few lines of
//! JavaScript: the node and workload tables are re-fetched as an HTML fragment every 2 s, and
//! events and log lines arrive over Server-Sent Events. Every asset is compiled into the binary.
//!
//! Everything shown comes from NATS (node tags, workload names, log lines) and is therefore
//! attacker-controlled: the server escapes it with [`escape`], the page's script only ever
//! writes it with `textContent`, and a Content-Security-Policy forbids inline scripts anyway.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use clap::Args;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use nex_api::control::{tags, InfoResponse, MachineSummary, PingResponse};
use nex_client::ControlClient;

const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// Lines kept for a page that connects (shown before the live ones).
const BACKLOG: usize = 100;
/// How long one gathered overview serves every page asking for it.
const OVERVIEW_TTL: Duration = Duration::from_millis(1500);
/// Largest metrics page read from a node.
const METRICS_MAX_BYTES: u64 = 4 << 20;

/// `nex ui`
#[derive(Debug, Args)]
pub struct UiArgs {
    /// Port of the console
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// Address to listen on. Loopback unless given: the console has no authentication, so
    /// anyone who reaches it can read node details and workload logs.
    #[arg(long)]
    pub host: Option<String>,
}

/// Runs the console until Ctrl-C.
pub async fn ui(nc: &async_nats::Client, client: &ControlClient, timeout: Duration, args: UiArgs) -> Result<()> {
    let host = args.host.as_deref().unwrap_or("127.0.0.1");
    let listener = bind(host, args.port).await?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "warning: the console has no authentication: anyone who reaches {addr} can read node details and workload logs"
        );
    }
    println!("Console on http://{addr} (Ctrl-C to stop)");
    let open = args.host.is_some() && !addr.ip().is_loopback();
    serve(listener, nc.clone(), client.namespace(), timeout, open, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

/// Listens on `host:port` (a name is resolved; its first address is used).
pub async fn bind(host: &str, port: u16) -> Result<tokio::net::TcpListener> {
    let addr: SocketAddr = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?,
    };
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("the console cannot listen on {addr} (try another --port)"))
}

/// Serves the console on `listener` until `shutdown` completes. `namespace` is the one shown
/// when the page names none; `open` accepts any Host header (an explicit non-loopback --host),
/// otherwise only loopback names are accepted (a page on another site cannot read the console
/// through a DNS name rebound to 127.0.0.1).
pub async fn serve(
    listener: tokio::net::TcpListener,
    nc: async_nats::Client,
    namespace: &str,
    timeout: Duration,
    open: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (feed_tx, _) = broadcast::channel(1024);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state = Arc::new(Console {
        nc: nc.clone(),
        namespace: namespace.to_string(),
        // PING and WPING gather for the whole window: keep the refresh brisk.
        gather: timeout.min(Duration::from_millis(750)),
        feed: feed_tx,
        backlog: Mutex::new(VecDeque::new()),
        seen: Mutex::new(HashMap::new()),
        overviews: tokio::sync::Mutex::new(HashMap::new()),
        viewers: Arc::new(AtomicUsize::new(0)),
        stop: stop_rx,
        port: listener.local_addr()?.port(),
        open,
    });
    let feeder = tokio::spawn(follow(state.clone()));
    let app = axum::Router::new()
        .route("/", axum::routing::get(page))
        .route("/overview", axum::routing::get(overview_fragment))
        .route("/stream", axum::routing::get(stream))
        .route("/static/app.js", axum::routing::get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/static/style.css", axum::routing::get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state);
    let graceful = async move {
        shutdown.await;
        // Ends the open event streams, so the server has no response left to wait for.
        let _ = stop_tx.send(true);
    };
    let res = axum::serve(listener, app).with_graceful_shutdown(graceful).await;
    feeder.abort();
    res.context("serving the console")
}

struct Console {
    nc: async_nats::Client,
    namespace: String,
    gather: Duration,
    feed: broadcast::Sender<Arc<FeedItem>>,
    backlog: Mutex<VecDeque<Arc<FeedItem>>>,
    /// What events said about workloads, by (namespace, node, workload name).
    seen: Mutex<HashMap<(String, String, String), Seen>>,
    overviews: tokio::sync::Mutex<HashMap<String, (Instant, Arc<Overview>)>>,
    viewers: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Receiver<bool>,
    port: u16,
    open: bool,
}

/// Facts only the event stream has, collected since the console started.
#[derive(Debug, Default, Clone)]
struct Seen {
    triggers: BTreeSet<String>,
    exits: u32,
    deploys: u32,
}

/// One line of the live feed.
#[derive(Debug, Clone, Serialize)]
pub struct FeedItem {
    /// `log`, `event` or `nodelog`.
    pub kind: &'static str,
    /// `HH:MM:SS.mmm` (UTC) when the console received it.
    pub time: String,
    pub namespace: String,
    pub node: String,
    pub workload: String,
    pub workload_id: String,
    /// Log level, event type, or the node's stream (stdout/stderr).
    pub level: String,
    pub text: String,
}

/// The live-feed filters and the namespace of the tables (query parameters).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Filter {
    #[serde(default)]
    pub ns: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub workload: String,
}

impl Filter {
    /// Whether `item` passes. System-namespace events (nodes starting, stopping) pass any
    /// namespace filter, as `nex events` shows them too.
    pub fn matches(&self, item: &FeedItem) -> bool {
        let ns_ok = self.ns.is_empty()
            || item.namespace.eq_ignore_ascii_case(&self.ns)
            || item.namespace == nex_api::SYSTEM_NAMESPACE;
        let node_ok = self.node.is_empty() || item.node.starts_with(&self.node);
        let wl_ok = self.workload.is_empty()
            || item.workload.eq_ignore_ascii_case(&self.workload)
            || item.workload_id == self.workload;
        ns_ok && node_ok && wl_ok
    }

    fn node_matches(&self, id: &str, name: &str) -> bool {
        self.node.is_empty() || id.starts_with(&self.node) || name.eq_ignore_ascii_case(&self.node)
    }

    fn workload_matches(&self, name: &str, id: &str) -> bool {
        self.workload.is_empty() || name.eq_ignore_ascii_case(&self.workload) || id == self.workload
    }

    fn query(&self) -> String {
        format!("ns={}&node={}&workload={}", url_encode(&self.ns), url_encode(&self.node), url_encode(&self.workload))
    }
}

/// A namespace is one subject token: refuse anything else before it reaches a subject.
fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty() && ns.len() <= 64 && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// HTML-escapes `s` for element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn now() -> String {
    chrono::Utc::now().format("%H:%M:%S%.3f").to_string()
}

// ---------------------------------------------------------------------------------------------
// The live feed
// ---------------------------------------------------------------------------------------------

/// Subscribes to every event and log line and hands them to the open pages.
async fn follow(state: Arc<Console>) {
    let subs = futures::future::join(state.nc.subscribe("$NEX.events.>"), state.nc.subscribe("$NEX.logs.>")).await;
    let (events, logs) = match subs {
        (Ok(e), Ok(l)) => (e, l),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: the console cannot follow events and logs: {e}");
            return;
        }
    };
    let mut all = futures::stream::select(events, logs);
    while let Some(m) = all.next().await {
        let Some(item) = feed_item(m.subject.as_str(), &m.payload) else { continue };
        state.remember(&item);
        let item = Arc::new(item);
        {
            let mut b = state.backlog.lock().unwrap_or_else(|e| e.into_inner());
            if b.len() >= BACKLOG {
                b.pop_front();
            }
            b.push_back(item.clone());
        }
        let _ = state.feed.send(item);
    }
}

/// A message on `$NEX.events.{ns}.{type}`, `$NEX.logs.{ns}.{node}.{name}.{id}` or
/// `$NEX.logs.system.{node}.{stdout|stderr}` as a feed line.
pub fn feed_item(subject: &str, payload: &[u8]) -> Option<FeedItem> {
    let toks: Vec<&str> = subject.split('.').collect();
    match toks.as_slice() {
        ["$NEX", "logs", ns, node, name, id] => {
            let rec: nex_api::events::LogRecord = serde_json::from_slice(payload).ok()?;
            Some(FeedItem {
                kind: "log",
                time: now(),
                namespace: ns.to_string(),
                node: node.to_string(),
                workload: name.to_string(),
                workload_id: id.to_string(),
                level: rec.level,
                text: rec.text,
            })
        }
        ["$NEX", "logs", ns, node, stream] => Some(FeedItem {
            kind: "nodelog",
            time: now(),
            namespace: ns.to_string(),
            node: node.to_string(),
            workload: String::new(),
            workload_id: String::new(),
            level: stream.to_string(),
            text: String::from_utf8_lossy(payload).into_owned(),
        }),
        ["$NEX", "events", ns, event_type] => {
            let ev: nex_api::events::CloudEvent = serde_json::from_slice(payload).ok()?;
            let d = &ev.data;
            let s = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            // Workload events come from `<node>-<workload id>`, node events from `<node>`.
            let node = ev.source.split_once('-').map(|(n, _)| n).unwrap_or(&ev.source).to_string();
            let mut details = Vec::new();
            for k in ["code", "message", "reason", "trigger_subject", "elapsed_nanos", "error", "version", "graceful"] {
                if let Some(v) = d.get(k) {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    details.push(format!("{k}={v}"));
                }
            }
            Some(FeedItem {
                kind: "event",
                time: now(),
                namespace: ns.to_string(),
                node,
                workload: s("workload_name"),
                workload_id: s("workload_id"),
                level: event_type.to_string(),
                text: details.join(" "),
            })
        }
        _ => None,
    }
}

impl Console {
    /// Keeps what the workload tables cannot learn from INFO: trigger subjects and exits.
    fn remember(&self, item: &FeedItem) {
        if item.kind != "event" || item.workload.is_empty() {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: events are attacker-controlled too.
        if seen.len() > 10_000 {
            seen.clear();
        }
        let s = seen.entry((item.namespace.clone(), item.node.clone(), item.workload.clone())).or_default();
        match item.level.as_str() {
            nex_api::events::event_type::WORKLOAD_DEPLOYED => s.deploys += 1,
            nex_api::events::event_type::WORKLOAD_UNDEPLOYED if item.text.contains("reason=Workload exited") => {
                s.exits += 1
            }
            nex_api::events::event_type::FUNCTION_EXEC_SUCCEEDED
            | nex_api::events::event_type::FUNCTION_EXEC_FAILED => {
                if let Some(t) = item.text.split(' ').find_map(|p| p.strip_prefix("trigger_subject=")) {
                    if s.triggers.len() < 16 {
                        s.triggers.insert(t.to_string());
                    }
                }
            }
            _ => {}
        }
    }

    fn seen(&self, ns: &str, node: &str, name: &str) -> Seen {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&(ns.to_string(), node.to_string(), name.to_string())).cloned().unwrap_or_default()
    }
}

/// Counts a page while its event stream is open.
struct Viewer(Arc<AtomicUsize>);

impl Drop for Viewer {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn stream(State(state): State<Arc<Console>>, Query(filter): Query<Filter>) -> Response {
    state.viewers.fetch_add(1, Ordering::SeqCst);
    let viewer = Viewer(state.viewers.clone());
    let rx = state.feed.subscribe();
    let backlog: Vec<Arc<FeedItem>> = state.backlog.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
    let live = futures::stream::unfold((rx, viewer), |(mut rx, viewer)| async move {
        let item = match rx.recv().await {
            Ok(item) => item,
            Err(broadcast::error::RecvError::Lagged(n)) => Arc::new(FeedItem {
                kind: "event",
                time: now(),
                namespace: String::new(),
                node: String::new(),
                workload: String::new(),
                workload_id: String::new(),
                level: "console".into(),
                text: format!("{n} lines skipped (the page fell behind)"),
            }),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((item, (rx, viewer)))
    });
    let mut stop = state.stop.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let events = futures::stream::iter(backlog)
        .chain(live)
        .filter(move |i| std::future::ready(i.level == "console" || filter.matches(i)))
        .map(|i| Ok::<_, Infallible>(Event::default().data(serde_json::to_string(&*i).unwrap_or_default())))
        .take_until(stopped);
    let mut resp = Sse::new(events).keep_alive(KeepAlive::default()).into_response();
    secure_headers(resp.headers_mut());
    resp
}

// ---------------------------------------------------------------------------------------------
// Nodes, workloads and metrics
// ---------------------------------------------------------------------------------------------

/// Everything the tables show, gathered once for every page asking within [`OVERVIEW_TTL`].
#[derive(Debug, Default)]
struct Overview {
    namespace: String,
    nodes: Vec<NodeView>,
    /// Workloads WPING found on nodes whose INFO did not answer.
    pinged: Vec<(String, nex_api::control::WorkloadPingMachineSummary)>,
    at: String,
}

#[derive(Debug)]
struct NodeView {
    ping: PingResponse,
    info: Result<InfoResponse, String>,
    metrics: Metrics,
}

#[derive(Debug)]
enum Metrics {
    /// No `nex.metrics` tag.
    Off,
    /// Exported somewhere the console does not read (e.g. `file ./metrics.log`).
    Elsewhere(String),
    Failed(String),
    /// Per (namespace, workload name).
    Functions(BTreeMap<(String, String), FnStats>),
}

/// One function's counters from the node's Prometheus text.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FnStats {
    pub calls: f64,
    pub failed: f64,
    pub runtime_ns: f64,
    pub duration_sum: f64,
    pub duration_count: f64,
}

impl FnStats {
    /// Mean run time of a successful call, in seconds.
    pub fn mean_seconds(&self) -> Option<f64> {
        if self.duration_count > 0.0 {
            Some(self.duration_sum / self.duration_count)
        } else if self.calls > 0.0 {
            Some(self.runtime_ns / self.calls / 1e9)
        } else {
            None
        }
    }
}

impl Console {
    async fn overview(&self, ns: &str) -> Arc<Overview> {
        let mut cache = self.overviews.lock().await;
        if let Some((at, o)) = cache.get(ns) {
            if at.elapsed() < OVERVIEW_TTL {
                return o.clone();
            }
        }
        let o = Arc::new(self.gather(ns).await);
        if cache.len() > 64 {
            cache.clear();
        }
        cache.insert(ns.to_string(), (Instant::now(), o.clone()));
        o
    }

    async fn gather(&self, ns: &str) -> Overview {
        let client = ControlClient::new(self.nc.clone(), self.gather, ns);
        let (pings, wpings) = tokio::join!(client.ping_nodes(), client.ping_workloads(None));
        let mut pings = pings.unwrap_or_default();
        pings.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        pings.dedup_by(|a, b| a.node_id == b.node_id);
        let nodes = futures::future::join_all(pings.into_iter().map(|p| {
            let client = client.clone();
            async move {
                let info = client.node_info(&p.node_id).await.map_err(|e| e.to_string());
                let metrics = metrics_of(&p.tags).await;
                NodeView { ping: p, info, metrics }
            }
        }))
        .await;
        let answered: BTreeSet<&str> =
            nodes.iter().filter(|n| n.info.is_ok()).map(|n| n.ping.node_id.as_str()).collect();
        let pinged = wpings
            .unwrap_or_default()
            .into_iter()
            .filter(|w| !answered.contains(w.node_id.as_str()))
            .flat_map(|w| {
                let node = w.node_id.clone();
                w.running_machines.into_iter().map(move |m| (node.clone(), m))
            })
            .collect();
        Overview { namespace: ns.to_string(), nodes, pinged, at: now() }
    }
}

/// Reads a node's metrics when it advertises a Prometheus endpoint.
async fn metrics_of(node_tags: &BTreeMap<String, String>) -> Metrics {
    let Some(url) = node_tags.get(tags::METRICS) else { return Metrics::Off };
    // The URL is whatever the node put in its tags: fetch only the shape a node advertises (plain
    // http, a /metrics path), without redirects, briefly, and only so many bytes.
    let Some(rest) = url.strip_prefix("http://") else { return Metrics::Elsewhere(url.clone()) };
    if rest.split_once('/').is_none_or(|(_, path)| path != "metrics") {
        return Metrics::Elsewhere(url.clone());
    }
    let url = url.clone();
    let fetched = tokio::task::spawn_blocking(move || -> Result<String, String> {
        use std::io::Read;
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(1)).redirects(0).build();
        let resp = agent.get(&url).call().map_err(|e| e.to_string())?;
        let mut text = String::new();
        resp.into_reader().take(METRICS_MAX_BYTES).read_to_string(&mut text).map_err(|e| e.to_string())?;
        Ok(text)
    })
    .await;
    match fetched {
        Ok(Ok(text)) => Metrics::Functions(function_stats(&text)),
        Ok(Err(e)) => Metrics::Failed(e),
        Err(e) => Metrics::Failed(e.to_string()),
    }
}

/// A sample's labels, in order.
pub type Labels = Vec<(String, String)>;

/// One sample of Prometheus text: name, labels, value.
pub fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices();
        loop {
            // key="value"
            let mut key = String::new();
            let mut end = None;
            for (i, c) in chars.by_ref() {
                match c {
                    '=' => break,
                    '}' => {
                        end = Some(i);
                        break;
                    }
                    ',' | ' ' => {}
                    c => key.push(c),
                }
            }
            if let Some(i) = end {
                rest = &r[i + 1..];
                break;
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            let mut escaped = false;
            let mut closed = false;
            for (_, c) in chars.by_ref() {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false
                    }
                    (true, c) => {
                        value.push(c);
                        escaped = false
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        closed = true;
                        break;
                    }
                    (false, c) => value.push(c),
                }
            }
            if !closed {
                return None;
            }
            labels.push((key, value));
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// Per-function counters (by namespace and workload name) from a node's Prometheus text.
pub fn function_stats(text: &str) -> BTreeMap<(String, String), FnStats> {
    let mut out: BTreeMap<(String, String), FnStats> = BTreeMap::new();
    for line in text.lines() {
        let Some((name, labels, value)) = parse_sample(line) else { continue };
        let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        // Nex also records every value without labels: those are node totals, not a function.
        let (Some(ns), Some(wl)) = (label("namespace"), label("workload_name")) else { continue };
        let s = out.entry((ns, wl)).or_default();
        match name {
            "nex_function_trigger_total" => s.calls += value,
            "nex_function_failed_trigger_total" => s.failed += value,
            "nex_function_runtime_nanosec_total" => s.runtime_ns += value,
            "nex_function_duration_seconds_sum" => s.duration_sum += value,
            "nex_function_duration_seconds_count" => s.duration_count += value,
            _ => {}
        }
    }
    out.retain(|_, s| *s != FnStats::default());
    out
}

fn seconds(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

// ---------------------------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------------------------

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn node_name(p: &PingResponse) -> &str {
    p.tags.get(tags::NODE_NAME).map(String::as_str).unwrap_or("")
}

/// The tables: nodes, workloads, function metrics.
fn render_overview(o: &Overview, filter: &Filter, console: &Console) -> String {
    let mut h = String::new();
    let nodes: Vec<&NodeView> =
        o.nodes.iter().filter(|n| filter.node_matches(&n.ping.node_id, node_name(&n.ping))).collect();

    let _ = write!(h, "<h2>Nodes <span class=\"muted\">({})</span></h2>", nodes.len());
    h.push_str("<table id=\"nodes\"><thead><tr><th>Node</th><th>Name / tags</th><th>Tier</th><th>Lame duck</th><th>Memory (available / total)</th><th>Version</th><th>Uptime</th><th class=\"num\">Workloads</th><th class=\"num\">Warm agents</th></tr></thead><tbody>");
    if nodes.is_empty() {
        h.push_str("<tr><td colspan=\"9\" class=\"empty\">No node answered PING.</td></tr>");
    }
    for n in &nodes {
        let p = &n.ping;
        let t = |k: &str| p.tags.get(k).map(String::as_str).unwrap_or("");
        let mut tier = escape(t(tags::SANDBOX));
        if t(tags::UNSAFE) == "true" {
            tier.push_str(" <span class=\"warn\">(no sandbox)</span>");
        }
        let lameduck = if t(tags::LAMEDUCK) == "true" {
            "<span class=\"warn\">yes</span>"
        } else {
            "<span class=\"muted\">no</span>"
        };
        let chips: String = p
            .tags
            .iter()
            .filter(|(k, _)| !k.starts_with("nex.") && k.as_str() != tags::NODE_NAME)
            .map(|(k, v)| format!("<span class=\"tag\">{}={}</span>", escape(k), escape(v)))
            .collect();
        let (memory, agents) = match &n.info {
            Ok(i) => (
                i.memory
                    .as_ref()
                    .map(|m| format!("{} / {} MiB", m.mem_available / 1024, m.mem_total / 1024))
                    .unwrap_or_else(|| "<span class=\"muted\">?</span>".into()),
                i.available_agents.to_string(),
            ),
            Err(e) => (format!("<span class=\"bad\">INFO failed: {}</span>", escape(e)), "?".into()),
        };
        let _ = write!(
            h,
            "<tr><td class=\"mono\" title=\"{id}\">{sid}…</td><td><b>{name}</b> {chips}</td><td>{tier}</td><td>{lameduck}</td><td>{memory}</td><td>{ver}</td><td>{up}</td><td class=\"num\">{wl}</td><td class=\"num\">{agents}</td></tr>",
            id = escape(&p.node_id),
            sid = escape(short(&p.node_id)),
            name = escape(node_name(p)),
            ver = escape(&p.version),
            up = escape(&p.uptime),
            wl = p.running_machines,
        );
    }
    h.push_str("</tbody></table>");

    // Workloads, from INFO (WPING for nodes whose INFO failed).
    let mut rows: Vec<(&NodeView, &MachineSummary)> = Vec::new();
    for n in &nodes {
        if let Ok(i) = &n.info {
            for m in &i.machines {
                if filter.workload_matches(&m.workload.name, &m.id) {
                    rows.push((n, m));
                }
            }
        }
    }
    let pinged: Vec<_> = o
        .pinged
        .iter()
        .filter(|(node, m)| filter.node_matches(node, "") && filter.workload_matches(&m.name, &m.id))
        .collect();
    let _ = write!(
        h,
        "<h2>Workloads in namespace {} <span class=\"muted\">({})</span></h2>",
        escape(&o.namespace),
        rows.len() + pinged.len()
    );
    h.push_str("<table id=\"workloads\"><thead><tr><th>Name</th><th>Id</th><th>Type</th><th>Namespace</th><th>Node</th><th>Uptime</th><th>Run time</th><th>State</th><th>Triggered on (seen)</th><th class=\"num\">Exits (seen)</th></tr></thead><tbody>");
    if rows.is_empty() && pinged.is_empty() {
        h.push_str("<tr><td colspan=\"10\" class=\"empty\">No workload in this namespace.</td></tr>");
    }
    for (n, m) in &rows {
        let seen = console.seen(&m.namespace, &n.ping.node_id, &m.workload.name);
        let state =
            if m.healthy { "<span class=\"ok\">running</span>" } else { "<span class=\"bad\">unhealthy</span>" };
        let triggers: String =
            seen.triggers.iter().map(|t| format!("<span class=\"tag\">{}</span>", escape(t))).collect();
        let _ = write!(
            h,
            "<tr class=\"workload\"><td><b>{name}</b></td><td class=\"mono\">{id}</td><td>{ty}</td><td>{ns}</td><td class=\"mono\" title=\"{node}\">{snode}… {nname}</td><td>{up}</td><td>{rt}</td><td>{state}</td><td>{triggers}</td><td class=\"num\">{exits}</td></tr>",
            name = escape(&m.workload.name),
            id = escape(&m.id),
            ty = escape(&m.workload.workload_type),
            ns = escape(&m.namespace),
            node = escape(&n.ping.node_id),
            snode = escape(short(&n.ping.node_id)),
            nname = escape(node_name(&n.ping)),
            up = escape(&m.uptime),
            rt = escape(&m.workload.runtime),
            exits = seen.exits,
        );
    }
    for (node, m) in &pinged {
        let _ = write!(
            h,
            "<tr class=\"workload\"><td><b>{name}</b></td><td class=\"mono\">{id}</td><td>{ty}</td><td>{ns}</td><td class=\"mono\" title=\"{node}\">{snode}…</td><td class=\"muted\">?</td><td class=\"muted\">?</td><td class=\"muted\">(WPING only)</td><td></td><td></td></tr>",
            name = escape(&m.name),
            id = escape(&m.id),
            ty = escape(&m.workload_type),
            ns = escape(&m.namespace),
            node = escape(node),
            snode = escape(short(node)),
        );
    }
    h.push_str("</tbody></table>");

    // Function metrics, per node.
    h.push_str("<h2>Function calls (node metrics)</h2>");
    h.push_str("<table id=\"functions\"><thead><tr><th>Node</th><th>Function</th><th>Namespace</th><th class=\"num\">Calls</th><th class=\"num\">Failed</th><th class=\"num\">Mean latency</th></tr></thead><tbody>");
    if nodes.is_empty() {
        h.push_str("<tr><td colspan=\"6\" class=\"empty\">No node.</td></tr>");
    }
    for n in &nodes {
        let node = format!(
            "<td class=\"mono\" title=\"{}\">{}… {}</td>",
            escape(&n.ping.node_id),
            escape(short(&n.ping.node_id)),
            escape(node_name(&n.ping))
        );
        match &n.metrics {
            Metrics::Off => {
                let _ = write!(
                    h,
                    "<tr>{node}<td colspan=\"5\" class=\"muted\">metrics off (start the node with --metrics)</td></tr>"
                );
            }
            Metrics::Elsewhere(w) => {
                let _ = write!(
                    h,
                    "<tr>{node}<td colspan=\"5\" class=\"muted\">metrics exported to {} (not read by the console)</td></tr>",
                    escape(w)
                );
            }
            Metrics::Failed(e) => {
                let _ =
                    write!(h, "<tr>{node}<td colspan=\"5\" class=\"bad\">metrics unreadable: {}</td></tr>", escape(e));
            }
            Metrics::Functions(f) => {
                let shown: Vec<_> = f
                    .iter()
                    .filter(|((ns, wl), _)| {
                        (filter.ns.is_empty() || ns.eq_ignore_ascii_case(&o.namespace))
                            && filter.workload_matches(wl, "")
                    })
                    .collect();
                if shown.is_empty() {
                    let _ = write!(h, "<tr>{node}<td colspan=\"5\" class=\"empty\">no function called yet</td></tr>");
                }
                for ((ns, wl), s) in shown {
                    let failed_class = if s.failed > 0.0 { "num bad" } else { "num" };
                    let _ = write!(
                        h,
                        "<tr class=\"function\">{node}<td><b>{}</b></td><td>{}</td><td class=\"num\">{}</td><td class=\"{failed_class}\">{}</td><td class=\"num\">{}</td></tr>",
                        escape(wl),
                        escape(ns),
                        s.calls,
                        s.failed,
                        s.mean_seconds().map(seconds).unwrap_or_else(|| "–".into()),
                    );
                }
            }
        }
    }
    h.push_str("</tbody></table>");
    let viewers = console.viewers.load(Ordering::SeqCst);
    let _ = write!(
        h,
        "<p class=\"foot\">Updated {} UTC · <span id=\"viewers\">{viewers} live viewer{}</span> · refreshes every 2 s</p>",
        escape(&o.at),
        if viewers == 1 { "" } else { "s" }
    );
    h
}

fn render_page(filter: &Filter, ns: &str, overview: &str) -> String {
    let q = filter.query();
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nex console</title>
<link rel="stylesheet" href="/static/style.css">
</head>
<body>
<header><h1>nex</h1><span>console</span><span class="muted">read-only · namespace {ns} · v{version}</span></header>
<form id="filters" method="get" action="/">
<label>namespace <input name="ns" value="{f_ns}" placeholder="{ns}"></label>
<label>node <input name="node" value="{f_node}" placeholder="id prefix or name"></label>
<label>workload <input name="workload" value="{f_wl}" placeholder="name or id"></label>
<button type="submit">Filter</button> <a class="muted" href="/">clear</a>
</form>
<main>
<section id="overview" data-src="/overview?{q}">{overview}</section>
<section>
<div id="feed-head"><h2>Live events and logs</h2><span id="feed-status">connecting…</span><button id="pause" type="button">Pause</button></div>
<ol id="feed" data-src="/stream?{q}"></ol>
</section>
</main>
<script src="/static/app.js"></script>
</body>
</html>
"#,
        ns = escape(ns),
        version = escape(nex_api::VERSION),
        f_ns = escape(&filter.ns),
        f_node = escape(&filter.node),
        f_wl = escape(&filter.workload),
        q = escape(&q),
    )
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

/// Headers every answer carries: no inline script or style, nothing from elsewhere, no framing.
fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn html(body: String) -> Response {
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    secure_headers(r.headers_mut());
    r
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    secure_headers(r.headers_mut());
    r
}

/// Refuses a Host that is not this console by a loopback name (unless listening openly), and
/// anything but GET.
async fn guard(
    State(state): State<Arc<Console>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method() != axum::http::Method::GET && req.method() != axum::http::Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, "the console is read-only").into_response();
    }
    if !state.open {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        let port = state.port;
        let ok = [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")]
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host));
        if !ok {
            return (StatusCode::MISDIRECTED_REQUEST, "unexpected Host: open the console at its loopback address")
                .into_response();
        }
    }
    next.run(req).await
}

/// The namespace of the tables, or an error page for one that is not a subject token.
fn namespace_of(state: &Console, filter: &Filter) -> Result<String, Box<Response>> {
    let ns = if filter.ns.is_empty() { state.namespace.clone() } else { filter.ns.clone() };
    if valid_namespace(&ns) {
        Ok(ns)
    } else {
        Err(Box::new((StatusCode::BAD_REQUEST, "a namespace is letters, digits, - and _").into_response()))
    }
}

async fn page(State(state): State<Arc<Console>>, Query(filter): Query<Filter>) -> Response {
    let ns = match namespace_of(&state, &filter) {
        Ok(ns) => ns,
        Err(r) => return *r,
    };
    let o = state.overview(&ns).await;
    let body = render_overview(&o, &filter, &state);
    html(render_page(&filter, &ns, &body))
}

async fn overview_fragment(State(state): State<Arc<Console>>, Query(filter): Query<Filter>) -> Response {
    let ns = match namespace_of(&state, &filter) {
        Ok(ns) => ns,
        Err(r) => return *r,
    };
    let o = state.overview(&ns).await;
    html(render_overview(&o, &filter, &state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_turns_markup_into_text() {
        assert_eq!(escape("<script>alert(1)</script>"), "&lt;script&gt;alert(1)&lt;/script&gt;");
        assert_eq!(escape(r#"a"b'c&d"#), "a&quot;b&#39;c&amp;d");
        assert_eq!(escape("plain ü"), "plain ü");
    }

    #[test]
    fn prometheus_samples_parse_with_escaped_labels() {
        let (n, l, v) = parse_sample(
            r#"nex_function_trigger_total{namespace="default",otel_scope_name="nex-node",workload_name="a\"b"} 3"#,
        )
        .unwrap();
        assert_eq!(n, "nex_function_trigger_total");
        assert_eq!(v, 3.0);
        assert_eq!(l[2], ("workload_name".to_string(), "a\"b".to_string()));
        assert_eq!(parse_sample("nex_vm_count 2").unwrap().2, 2.0);
        assert!(parse_sample("# HELP x y").is_none());
        assert!(parse_sample(r#"x{a="unterminated} 1"#).is_none());
    }

    #[test]
    fn function_stats_skip_unlabelled_totals() {
        let text = "\
nex_function_trigger_total{otel_scope_name=\"nex-node\"} 9
nex_function_trigger_total{namespace=\"default\",workload_name=\"f\"} 4
nex_function_failed_trigger_total{namespace=\"default\",workload_name=\"f\"} 1
nex_function_duration_seconds_sum{namespace=\"default\",workload_name=\"f\"} 0.02
nex_function_duration_seconds_count{namespace=\"default\",workload_name=\"f\"} 4
nex_workload_count{namespace=\"default\",workload_type=\"v8\"} 1
";
        let s = function_stats(text);
        assert_eq!(s.len(), 1);
        let f = &s[&("default".to_string(), "f".to_string())];
        assert_eq!((f.calls, f.failed), (4.0, 1.0));
        assert_eq!(f.mean_seconds(), Some(0.005));
        assert_eq!(seconds(0.005), "5.0 ms");
    }

    #[test]
    fn feed_items_from_subjects_and_filters() {
        let log =
            feed_item("$NEX.logs.default.NODE1.svc.abc", br#"{"text":"<b>hi</b>","level":"info","id":"abc"}"#).unwrap();
        assert_eq!((log.node.as_str(), log.workload.as_str(), log.text.as_str()), ("NODE1", "svc", "<b>hi</b>"));
        let f = Filter { ns: "default".into(), node: "NODE".into(), workload: "svc".into() };
        assert!(f.matches(&log));
        assert!(!Filter { workload: "other".into(), ..Default::default() }.matches(&log));
        assert!(!Filter { ns: "prod".into(), ..Default::default() }.matches(&log));
        let ev = feed_item(
            "$NEX.events.default.function_exec_succeeded",
            br#"{"specversion":"1.0","id":"1","source":"NODE1-abc","type":"function_exec_succeeded","data":{"workload_name":"fn","workload_id":"abc","trigger_subject":"hello.js"}}"#,
        )
        .unwrap();
        assert_eq!((ev.node.as_str(), ev.workload.as_str()), ("NODE1", "fn"));
        assert!(ev.text.contains("trigger_subject=hello.js"));
        assert!(feed_item("$NEX.logs.default.x", b"{}").is_none());
        assert!(!valid_namespace("a.b") && !valid_namespace(">") && valid_namespace("team-1"));
    }
}
