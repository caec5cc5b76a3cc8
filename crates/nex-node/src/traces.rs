//! The node's traces: OpenTelemetry spans exported to `./traces.log` (one JSON object per span)
//! or to an OTLP collector over gRPC or HTTP, with W3C trace context carried in NATS headers.
//!
//! Off by default: until [`start`] runs, every function here returns an empty context at the
//! cost of one `OnceLock` check. Spans keep Nex's names: one server span per control request
//! (`Handle Deploy Request`, …), `workload-trigger` for each function call with its child
//! `internal request` to the agent, and `host services call` for each host-service request.
//!
//! Agents export nothing themselves (a micro-VM guest cannot reach the collector): they time each
//! traced call and hand back its span ids and times (`x-nex-span` on a relayed reply, `span` in
//! an agent-held call's report), and the node records that `function call` span with the agent's
//! ids, so the host-service spans the agent parented to it line up under it. Those ids and times
//! come from a process the node does not trust: they are checked for plausibility, and at worst
//! an agent misplaces spans of its own calls.

use std::borrow::Cow;
use std::cell::Cell;
use std::io::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use opentelemetry::propagation::{Extractor, Injector, TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};

use nex_api::trace::CallSpan;

use crate::config::NodeConfig;

/// The trace exporters a node offers.
pub mod exporter {
    /// One JSON object per span, appended to `./traces.log`.
    pub const FILE: &str = "file";
    /// OTLP over gRPC to `otlp_exporter_url`.
    pub const GRPC: &str = "grpc";
    /// OTLP over HTTP (protobuf) to `otlp_exporter_url`.
    pub const HTTP: &str = "http";
}

struct Traces {
    tracer: SdkTracer,
    propagator: TextMapCompositePropagator,
}

static TRACES: OnceLock<Traces> = OnceLock::new();

/// The running trace pipeline; dropping it flushes what is buffered and stops the exporter.
pub struct Tracing {
    provider: SdkTracerProvider,
    /// Where spans go, for `nex node info` and the start-up line.
    pub endpoint: String,
}

impl Drop for Tracing {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Whether spans are recorded.
pub fn enabled() -> bool {
    TRACES.get().is_some()
}

/// Starts the traces of `cfg` (nothing when `otel_traces` is off).
pub async fn start(cfg: &NodeConfig, node_id: &str) -> Result<Option<Tracing>> {
    if !cfg.otel_traces {
        return Ok(None);
    }
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("nex-node")
        .with_attributes([
            KeyValue::new("service.version", nex_api::VERSION),
            KeyValue::new("node_pub_key", node_id.to_string()),
            KeyValue::new("application", "nex-node"),
        ])
        .build();
    let batch = BatchConfigBuilder::default().with_scheduled_delay(Duration::from_secs(1)).build();
    let builder = SdkTracerProvider::builder().with_resource(resource).with_id_generator(Ids::default());
    let url = &cfg.otlp_exporter_url;
    let (provider, endpoint) = match cfg.otel_traces_exporter.as_str() {
        exporter::FILE => {
            let path = std::path::PathBuf::from("traces.log");
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("traces: cannot open {}", path.display()))?;
            let exporter = FileExporter { file: Mutex::new(file), resource: serde_json::Map::new() };
            let p = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
            (builder.with_span_processor(p).build(), "./traces.log".to_string())
        }
        exporter::HTTP => {
            // The blocking client runs on the batch processor's own thread: no async runtime
            // is needed where the export happens.
            let endpoint = format!("http://{url}/v1/traces");
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint.clone())
                .build()
                .context("traces: building the OTLP/HTTP exporter")?;
            let p = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
            (builder.with_span_processor(p).build(), endpoint)
        }
        exporter::GRPC => {
            // tonic needs the tokio runtime: this processor exports on it, not on a thread of
            // its own where a tonic call would find no reactor.
            let endpoint = format!("http://{url}");
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .context("traces: building the OTLP/gRPC exporter")?;
            let p = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .with_batch_config(batch)
            .build();
            (builder.with_span_processor(p).build(), endpoint)
        }
        other => anyhow::bail!("unknown traces exporter {other:?}: use file, grpc or http"),
    };
    let tracer = provider.tracer("nex-node");
    let propagator = TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]);
    if TRACES.set(Traces { tracer, propagator }).is_err() {
        anyhow::bail!("traces were already started in this process");
    }
    tracing::info!("traces exported to {endpoint}");
    Ok(Some(Tracing { provider, endpoint }))
}

struct HeaderReader<'a>(&'a async_nats::HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

struct HeaderWriter<'a>(&'a mut async_nats::HeaderMap);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// The trace context a message carries (`traceparent`, `tracestate`, `baggage`); empty when
/// tracing is off or the message has none.
pub fn extract(headers: Option<&async_nats::HeaderMap>) -> Context {
    match (TRACES.get(), headers) {
        (Some(t), Some(h)) => t.propagator.extract(&HeaderReader(h)),
        _ => Context::new(),
    }
}

/// Writes `cx`'s trace context into `headers` (nothing when `cx` holds no span).
pub fn inject(cx: &Context, headers: &mut async_nats::HeaderMap) {
    if let Some(t) = TRACES.get() {
        if cx.has_active_span() {
            t.propagator.inject_context(cx, &mut HeaderWriter(headers));
        }
    }
}

/// A new span under `parent` (a new trace when `parent` has none), active in the returned
/// context; it ends when the last clone of that context is dropped.
pub fn span(name: &'static str, kind: SpanKind, parent: &Context, attrs: Vec<KeyValue>) -> Context {
    let Some(t) = TRACES.get() else { return Context::new() };
    let span = t.tracer.span_builder(name).with_kind(kind).with_attributes(attrs).start_with_context(&t.tracer, parent);
    parent.with_span(span)
}

/// Adds an event to `cx`'s span.
pub fn event(cx: &Context, name: &'static str) {
    if cx.has_active_span() {
        cx.span().add_event(name, Vec::new());
    }
}

/// Adds an event to the span of the task's current context (see [`with`]).
pub fn current_event(name: &'static str) {
    if enabled() {
        event(&Context::current(), name);
    }
}

/// Sets attributes on `cx`'s span.
pub fn attrs(cx: &Context, attrs: Vec<KeyValue>) {
    if cx.has_active_span() {
        cx.span().set_attributes(attrs);
    }
}

/// Marks `cx`'s span failed with `why`.
pub fn error(cx: &Context, why: &str) {
    if cx.has_active_span() {
        cx.span().set_status(Status::error(why.to_string()));
    }
}

/// Runs `f` with `cx` as the current context, so [`current_event`] inside reaches its span.
pub async fn with<F: std::future::Future>(cx: Context, f: F) -> F::Output {
    use opentelemetry::context::FutureExt as _;
    f.with_context(cx).await
}

thread_local! {
    /// Ids the next span started on this thread takes (an agent's, for the spans it described).
    static NEXT_IDS: Cell<(Option<TraceId>, Option<SpanId>)> = const { Cell::new((None, None)) };
}

/// Random ids, unless [`NEXT_IDS`] holds the ones an agent chose.
#[derive(Debug, Default)]
struct Ids(RandomIdGenerator);

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        let (t, s) = NEXT_IDS.get();
        NEXT_IDS.set((None, s));
        t.unwrap_or_else(|| self.0.new_trace_id())
    }
    fn new_span_id(&self) -> SpanId {
        let (t, s) = NEXT_IDS.get();
        NEXT_IDS.set((t, None));
        s.unwrap_or_else(|| self.0.new_span_id())
    }
}

fn at(unix_nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(unix_nanos)
}

/// The context of the span an agent's call ran under (the requester's, or the node's
/// `internal request`), as a remote parent; `None` when the call started its trace.
fn remote_parent(s: &CallSpan) -> Context {
    if s.parent_span_id == 0 {
        return Context::new();
    }
    let sc = SpanContext::new(
        TraceId::from(s.trace_id),
        SpanId::from(s.parent_span_id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    Context::new().with_remote_span_context(sc)
}

/// Records the `function call` span an agent described, under `parent` (the relayed path's
/// `internal request`, or the `workload-trigger` span [`agent_held_call`] records).
fn function_call(t: &Traces, parent: &Context, s: &CallSpan, attrs: Vec<KeyValue>) {
    NEXT_IDS.set((Some(TraceId::from(s.trace_id)), Some(SpanId::from(s.span_id))));
    let mut span = t
        .tracer
        .span_builder("function call")
        .with_kind(SpanKind::Server)
        .with_start_time(at(s.start_unix_nanos))
        .with_attributes(attrs)
        .start_with_context(&t.tracer, parent);
    NEXT_IDS.set((None, None));
    span.end_with_timestamp(at(s.end_unix_nanos));
}

/// The span an agent returned on a relayed call (header `x-nex-span`), under `internal`, the
/// node's span of the request it answered. `attrs` are built only when the span is recorded.
pub fn relayed_call(internal: &Context, header: Option<&str>, attrs: impl FnOnce() -> Vec<KeyValue>) {
    let (Some(t), Some(h)) = (TRACES.get(), header) else { return };
    let sc = internal.span().span_context().clone();
    if !sc.is_valid() {
        return;
    }
    let parent = nex_api::trace::TraceParent {
        trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        sampled: true,
    };
    if let Some(s) = CallSpan::from_header(parent, h) {
        function_call(t, internal, &s, attrs());
    }
}

/// A call an agent answered itself: the node's `workload-trigger` span, with the call's times,
/// and under it the agent's `function call`. `attrs` are built only when the spans are recorded.
pub fn agent_held_call(s: &CallSpan, error: Option<&str>, attrs: impl FnOnce() -> Vec<KeyValue>) {
    let Some(t) = TRACES.get() else { return };
    if !s.is_plausible() {
        return;
    }
    let attrs = attrs();
    let parent = remote_parent(s);
    if s.parent_span_id == 0 {
        // A trace the agent started: the root span takes its trace id.
        NEXT_IDS.set((Some(TraceId::from(s.trace_id)), None));
    }
    let mut trigger = t
        .tracer
        .span_builder("workload-trigger")
        .with_kind(SpanKind::Server)
        .with_start_time(at(s.start_unix_nanos))
        .with_attributes(attrs.clone())
        .start_with_context(&t.tracer, &parent);
    NEXT_IDS.set((None, None));
    if let Some(e) = error {
        trigger.set_status(Status::error(e.to_string()));
    }
    let cx = parent.with_span(trigger);
    function_call(t, &cx, s, attrs);
    cx.span().end_with_timestamp(at(s.end_unix_nanos));
}

/// Appends each span as one JSON object per line.
#[derive(Debug)]
struct FileExporter {
    file: Mutex<std::fs::File>,
    resource: serde_json::Map<String, serde_json::Value>,
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn kind(k: &SpanKind) -> &'static str {
    match k {
        SpanKind::Client => "client",
        SpanKind::Server => "server",
        SpanKind::Producer => "producer",
        SpanKind::Consumer => "consumer",
        SpanKind::Internal => "internal",
    }
}

fn attributes<'a>(kvs: impl Iterator<Item = &'a KeyValue>) -> serde_json::Map<String, serde_json::Value> {
    kvs.map(|kv| (kv.key.to_string(), serde_json::Value::String(kv.value.to_string()))).collect()
}

impl FileExporter {
    fn line(&self, s: &SpanData) -> serde_json::Value {
        let status = match &s.status {
            Status::Error { description } => serde_json::json!({"code": "error", "message": description}),
            Status::Ok => serde_json::json!({"code": "ok"}),
            Status::Unset => serde_json::json!({"code": "unset"}),
        };
        let parent = (s.parent_span_id != SpanId::INVALID).then(|| s.parent_span_id.to_string());
        let events: Vec<_> = s
            .events
            .iter()
            .map(|e| serde_json::json!({"name": e.name, "time_unix_nano": nanos(e.timestamp)}))
            .collect();
        serde_json::json!({
            "name": Cow::as_ref(&s.name),
            "kind": kind(&s.span_kind),
            "trace_id": s.span_context.trace_id().to_string(),
            "span_id": s.span_context.span_id().to_string(),
            "parent_span_id": parent,
            "start_time_unix_nano": nanos(s.start_time),
            "end_time_unix_nano": nanos(s.end_time),
            "attributes": attributes(s.attributes.iter()),
            "events": events,
            "status": status,
            "resource": self.resource,
        })
    }
}

impl SpanExporter for FileExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut out = Vec::new();
        for s in &batch {
            let _ = serde_json::to_writer(&mut out, &self.line(s));
            out.push(b'\n');
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&out).map_err(|e| opentelemetry_sdk::error::OTelSdkError::InternalFailure(e.to_string()))
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.resource =
            resource.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string()))).collect();
    }
}
