//! The node's metrics, in OpenTelemetry's model, for Prometheus (`/metrics` on
//! `otel_metrics_port`) or a file (`./metrics.log`, rewritten every 3 s with the same text).
//!
//! Off by default: until [`start`] runs, every `record_*` function is a check of an empty
//! `OnceLock` and nothing else. The instruments keep Nex's names (dashes and all; Prometheus
//! shows them with underscores) and its habit of adding every value once without attributes and
//! once with them, so dashboards written for Nex keep working; what an operator needs beyond
//! them (deploy and call latency, warm agents, dropped log lines, host-service calls by outcome)
//! is added under `nex-` names of the same style.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, Result};
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _, UpDownCounter};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::config::NodeConfig;
use crate::workloads::Workload;

/// The metric exporters a node offers.
pub mod exporter {
    /// Prometheus text on `http://<otel_metrics_host>:<otel_metrics_port>/metrics`.
    pub const PROMETHEUS: &str = "prometheus";
    /// The same text in `./metrics.log`, rewritten every 3 s.
    pub const FILE: &str = "file";
}

struct Instruments {
    workloads: UpDownCounter<i64>,
    bytes: UpDownCounter<i64>,
    memory_mib: UpDownCounter<i64>,
    vcpus: UpDownCounter<i64>,
    triggers: Counter<u64>,
    failed: Counter<u64>,
    runtime_ns: Counter<u64>,
    call_seconds: Histogram<f64>,
    deploy_seconds: Histogram<f64>,
    logs_dropped: Counter<u64>,
    hs_calls: Counter<u64>,
    /// vCPUs and MiB each workload holds in a sandboxed tier (none in the process tier).
    allocation: Option<(i64, i64)>,
}

static METRICS: OnceLock<Instruments> = OnceLock::new();

/// What is alive right now, read when metrics are collected: agents (warm and busy), warm agents.
pub type Census = Box<dyn Fn() -> (u64, u64) + Send + Sync>;

/// The running exporter; dropping it stops the exporter's tasks.
pub struct Telemetry {
    provider: SdkMeterProvider,
    tasks: Vec<tokio::task::AbortHandle>,
    /// Where `/metrics` listens (Prometheus exporter).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
        let _ = self.provider.shutdown();
    }
}

/// Twice: once without attributes and once with them (as Nex records its instruments).
fn both<T: Copy>(add: impl Fn(T, &[KeyValue]), v: T, attrs: &[KeyValue]) {
    add(v, &[]);
    add(v, attrs);
}

/// Starts the metrics of `cfg` (nothing when `otel_metrics` is off). `census` is read at each
/// collection.
pub async fn start(cfg: &NodeConfig, node_id: &str, census: Census) -> Result<Option<Telemetry>> {
    if !cfg.otel_metrics {
        return Ok(None);
    }
    let registry = prometheus::Registry::new();
    let reader = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
        .context("starting the Prometheus exporter")?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("nex-node")
        .with_attributes([
            KeyValue::new("service.version", nex_api::VERSION),
            KeyValue::new("node_pub_key", node_id.to_string()),
        ])
        .build();
    let provider = SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build();
    let meter = provider.meter("nex-node");
    let census = Arc::new(census);
    let c = census.clone();
    meter
        .i64_observable_up_down_counter("nex-vm-count")
        .with_description("Agents alive (warm and running a workload)")
        .with_callback(move |o| o.observe(c().0 as i64, &[]))
        .build();
    let c = census.clone();
    meter
        .u64_observable_gauge("nex-agent-pool-warm")
        .with_description("Warm agents waiting for a workload")
        .with_callback(move |o| o.observe(c().1, &[]))
        .build();
    let sandboxed = cfg.tier() != crate::config::isolation::PROCESS;
    let t = &cfg.machine_template;
    let m = Instruments {
        workloads: meter.i64_up_down_counter("nex-workload-count").with_description("Deployed workloads").build(),
        bytes: meter
            .i64_up_down_counter("nex-deployed-bytes-count")
            .with_description("Bytes of deployed artifacts")
            .build(),
        memory_mib: meter
            .i64_up_down_counter("nex-total-memory-allocation-mib-count")
            .with_description("MiB allocated to sandboxes running workloads")
            .build(),
        vcpus: meter
            .i64_up_down_counter("nex-total-vcpu-allocation-count")
            .with_description("vCPUs allocated to sandboxes running workloads")
            .build(),
        triggers: meter.u64_counter("nex-function-trigger").with_description("Successful function calls").build(),
        failed: meter.u64_counter("nex-function-failed-trigger").with_description("Failed function calls").build(),
        runtime_ns: meter
            .u64_counter("nex-function-runtime-nanosec")
            .with_description("Cumulative run time of successful function calls")
            .build(),
        call_seconds: meter
            .f64_histogram("nex-function-duration")
            .with_unit("s")
            .with_description("Run time of successful function calls")
            .with_boundaries(vec![0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])
            .build(),
        deploy_seconds: meter
            .f64_histogram("nex-deploy-duration")
            .with_unit("s")
            .with_description("Time from a DEPLOY's arrival to its answer")
            .with_boundaries(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
            .build(),
        logs_dropped: meter
            .u64_counter("nex-log-lines-dropped")
            .with_description("Workload log lines dropped by the rate limit")
            .build(),
        hs_calls: meter.u64_counter("nex-host-service-calls").with_description("Host-service calls by outcome").build(),
        allocation: sandboxed.then_some((t.vcpu_count as i64, t.memsize_mib as i64)),
    };
    let _ = METRICS.set(m);
    let mut tel = Telemetry { provider, tasks: Vec::new(), metrics_addr: None };
    // Observable instruments stay registered with the provider once built (their handles are
    // not needed again).
    match cfg.otel_metrics_exporter.as_str() {
        exporter::PROMETHEUS => {
            let addr = format!("{}:{}", cfg.otel_metrics_host, cfg.otel_metrics_port);
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("metrics: cannot listen on {addr} (otel_metrics_port / --metrics_port)"))?;
            tel.metrics_addr = listener.local_addr().ok();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let registry = registry.clone();
                    async move {
                        (
                            [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                            render(&registry),
                        )
                    }
                }),
            );
            let serve = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::warn!("metrics endpoint stopped: {e}");
                }
            });
            tracing::info!("metrics on http://{addr}/metrics");
            tel.tasks.push(serve.abort_handle());
        }
        exporter::FILE => {
            let write = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    let text = render(&registry);
                    if let Err(e) = write_file(std::path::Path::new("metrics.log"), text.as_bytes()).await {
                        tracing::warn!("metrics: cannot write ./metrics.log: {e}");
                    }
                }
            });
            tracing::info!("metrics written to ./metrics.log every 3s");
            tel.tasks.push(write.abort_handle());
        }
        other => anyhow::bail!("unknown metrics exporter {other:?}: use prometheus or file"),
    }
    Ok(Some(tel))
}

fn render(registry: &prometheus::Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        tracing::warn!("metrics: encoding failed: {e}");
    }
    out
}

/// Replaces `path` whole, so a reader never sees half a snapshot.
async fn write_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("log.tmp");
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

fn workload_change(w: &Workload, sign: i64) {
    let Some(m) = METRICS.get() else { return };
    let ns = KeyValue::new("namespace", w.namespace.clone());
    let typed = [KeyValue::new("workload_type", w.workload_type.clone()), ns.clone()];
    both(|v, a| m.workloads.add(v, a), sign, &typed);
    both(|v, a| m.bytes.add(v, a), sign * w.total_bytes as i64, std::slice::from_ref(&ns));
    if let Some((vcpu, mib)) = m.allocation {
        both(|v, a| m.vcpus.add(v, a), sign * vcpu, std::slice::from_ref(&ns));
        both(|v, a| m.memory_mib.add(v, a), sign * mib, std::slice::from_ref(&ns));
    }
}

/// A workload began running.
pub fn workload_started(w: &Workload) {
    workload_change(w, 1);
}

/// A workload ended.
pub fn workload_ended(w: &Workload) {
    workload_change(w, -1);
}

/// One function call: its run time when it succeeded.
pub fn function_call(w: &Workload, outcome: Result<u64, ()>) {
    let Some(m) = METRICS.get() else { return };
    let attrs = [KeyValue::new("namespace", w.namespace.clone()), KeyValue::new("workload_name", w.name.clone())];
    match outcome {
        Ok(ns) => {
            both(|v, a| m.triggers.add(v, a), 1, &attrs);
            both(|v, a| m.runtime_ns.add(v, a), ns, &attrs);
            m.call_seconds.record(ns as f64 / 1e9, &attrs);
        }
        Err(()) => both(|v, a| m.failed.add(v, a), 1, &attrs),
    }
}

/// A DEPLOY answered after `took`, accepted or not.
pub fn deploy_answered(took: Duration, accepted: bool) {
    let Some(m) = METRICS.get() else { return };
    m.deploy_seconds.record(took.as_secs_f64(), &[KeyValue::new("accepted", accepted)]);
}

/// Log lines of `w` dropped by the rate limit.
pub fn logs_dropped(w: &Workload, n: u64) {
    let Some(m) = METRICS.get() else { return };
    m.logs_dropped
        .add(n, &[KeyValue::new("namespace", w.namespace.clone()), KeyValue::new("workload_name", w.name.clone())]);
}

/// One host-service call and the code it was answered with.
pub fn host_service_call(w: &Workload, service: &str, code: u16) {
    let Some(m) = METRICS.get() else { return };
    m.hs_calls.add(
        1,
        &[
            KeyValue::new("namespace", w.namespace.clone()),
            KeyValue::new("service", service.to_string()),
            KeyValue::new("code", code as i64),
        ],
    );
}
