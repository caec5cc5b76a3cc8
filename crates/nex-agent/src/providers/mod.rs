//! Execution providers: one per workload type, each with the same small lifecycle —
//! deploy, (trigger), undeploy.

pub mod js;
pub mod native;
pub mod wasm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nex_api::agent::{level, AgentDeployRequest};
use nex_api::trace::CallSpan;

use crate::Agent;

/// The workload an agent runs.
pub enum Provider {
    /// A native executable.
    Native(native::Native),
    /// A WebAssembly function and where its stderr lines go.
    Wasm(Arc<wasm::Wasm>, js::LogSink),
    /// A JavaScript function on its own thread, and what it was made from.
    Js(js::Js, js::Spec),
}

/// Why a workload did not start in this agent; the `Display` is the text the node reports.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The request itself is unusable.
    #[error("{0}")]
    Invalid(String),
    /// One agent runs one workload.
    #[error("this agent already runs a workload")]
    Occupied,
    /// The artifact could not be brought into the agent.
    #[error("Failed to fetch workload: {0}")]
    Fetch(String),
    /// A sandboxed native workload must be a static executable.
    #[error("Failed to validate workload: {0}")]
    NotStatic(String),
    /// This agent has no engine for the type.
    #[error("workload type {0} is not supported by this agent")]
    Unsupported(String),
    /// A step of preparing the engine or the artifact failed.
    #[error("failed to {step}: {detail}")]
    Engine {
        /// What was being done, as "failed to …" reads it.
        step: &'static str,
        /// The engine's own words.
        detail: String,
    },
    /// The JavaScript source evaluated, but not to something callable.
    #[error("{0}")]
    Script(String),
    /// The native executable did not start.
    #[error("Failed to start workload: {name}; vm: {vm}: {detail}")]
    Spawn {
        /// The workload's name.
        name: String,
        /// This agent's id.
        vm: String,
        /// The operating system's words.
        detail: String,
    },
    /// The function's own trigger subscriptions could not be set up.
    #[error("{0}")]
    Triggers(String),
}

/// `map_err` for a failed preparation step: `failed to {step}: {error}`.
pub fn failed_to<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> DeployError {
    move |e| DeployError::Engine { step, detail: e.to_string() }
}

/// Why a function call gave no reply; the `Display` is what the requester reads in `x-nex-error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Cut off at its deadline.
    #[error("{engine} execution timed out after {ms}ms")]
    TimedOut {
        /// `wasm` or `javascript`.
        engine: &'static str,
        /// The deadline.
        ms: u64,
    },
    /// Over its memory cap.
    #[error("{engine} function exceeded its memory limit of {mib} MiB")]
    MemoryLimit {
        /// `wasm` or `javascript`.
        engine: &'static str,
        /// The cap.
        mib: u64,
    },
    /// A WebAssembly command exited non-zero.
    #[error("wasm function exited with code {0}")]
    Exited(i32),
    /// Too many calls waiting already.
    #[error("the function is busy: {0} calls are already waiting")]
    Busy(usize),
    /// Nobody waits for the answer any more.
    #[error("dropped: it waited in the queue past its deadline")]
    Expired,
    /// This workload is not a function (or none is deployed).
    #[error("{0}")]
    NotAFunction(&'static str),
    /// Anything else the function or its engine reported.
    #[error("{0}")]
    Failed(String),
}

/// A function a trigger worker thread calls directly, without a hop to another thread.
pub enum Callable {
    /// The shared compiled module (each call instantiates it).
    Wasm(Arc<wasm::Wasm>, js::LogSink),
    /// A JavaScript runtime of this thread's own.
    Js(js::Script),
}

impl Callable {
    /// Runs one call on this thread; the reply and the run time in nanoseconds.
    pub fn call(&mut self, subject: &str, payload: &[u8]) -> Result<(Vec<u8>, u64), CallError> {
        match self {
            Callable::Wasm(w, logs) => {
                let started = std::time::Instant::now();
                let out = w.call(subject, payload);
                let ns = started.elapsed().as_nanos() as u64;
                let out = out?;
                stderr_to_logs(&out.stderr, logs);
                Ok((out.stdout, ns))
            }
            Callable::Js(s) => s.call(subject, payload.to_vec()),
        }
    }
}

fn stderr_to_logs(stderr: &[u8], logs: &js::LogSink) {
    if !stderr.is_empty() {
        for line in String::from_utf8_lossy(stderr).lines() {
            let _ = logs.try_send((level::ERROR, line.to_string()));
        }
    }
}

/// A log sink whose lines the agent ships as the workload's.
fn log_sink(agent: Arc<Agent>, name: String) -> js::LogSink {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(i32, String)>(js::LOG_QUEUE);
    tokio::spawn(async move {
        while let Some((lvl, text)) = rx.recv().await {
            agent.log(&name, lvl, &text).await;
        }
    });
    tx
}

impl Provider {
    /// Starts the workload described by `req` from the artifact at `path`.
    pub async fn deploy(agent: Arc<Agent>, req: &AgentDeployRequest, path: PathBuf) -> Result<Provider, DeployError> {
        match nex_api::workload_type::canonical(&req.workload_type).as_str() {
            nex_api::workload_type::NATIVE => native::Native::deploy(agent, req, path).await.map(Provider::Native),
            nex_api::workload_type::WASM => {
                let r = req.clone();
                let host = host_call(agent.clone(), req);
                let w = tokio::task::spawn_blocking(move || wasm::Wasm::load(&path, &r, host))
                    .await
                    .map_err(failed_to("compile module"))??;
                Ok(Provider::Wasm(Arc::new(w), log_sink(agent, req.workload_name.clone())))
            }
            nex_api::workload_type::V8 => {
                let bytes = std::fs::read(&path).map_err(failed_to("read source"))?;
                let source = String::from_utf8(bytes)
                    .map_err(|_| DeployError::Script("the JavaScript source is not UTF-8".into()))?;
                let spec = js::Spec {
                    source,
                    limits: req.function_limits.clone().unwrap_or_default(),
                    host: host_call(agent.clone(), req),
                    logs: log_sink(agent.clone(), req.workload_name.clone()),
                };
                let s = spec.clone();
                let js = tokio::task::spawn_blocking(move || js::Js::load(s))
                    .await
                    .map_err(failed_to("start JavaScript"))??;
                Ok(Provider::Js(js, spec))
            }
            other => Err(DeployError::Unsupported(other.to_string())),
        }
    }

    /// Something a trigger worker thread can call directly: the shared module, or a JavaScript
    /// runtime of its own (build it on the thread that will use it).
    pub fn callable(&self) -> Result<Callable, String> {
        match self {
            Provider::Native(_) => Err("native workloads have no triggers".into()),
            Provider::Wasm(w, logs) => Ok(Callable::Wasm(w.clone(), logs.clone())),
            Provider::Js(_, spec) => js::Script::new(spec).map(Callable::Js).map_err(|e| e.to_string()),
        }
    }

    /// Stops the workload, gracefully first.
    pub async fn undeploy(&self) {
        if let Provider::Native(n) = self {
            n.undeploy().await
        }
    }

    /// Runs a function call; returns the reply and the run time in nanoseconds. Host-service
    /// calls made during it carry `span` as their parent.
    pub async fn trigger(
        &self,
        subject: &str,
        payload: bytes::Bytes,
        span: Option<CallSpan>,
    ) -> Result<(Vec<u8>, u64), CallError> {
        match self {
            Provider::Native(_) => Err(CallError::NotAFunction("native workloads have no triggers")),
            Provider::Wasm(w, logs) => {
                let _slot = w.slots.acquire().await.map_err(|e| CallError::Failed(format!("wasm call failed: {e}")))?;
                let w = w.clone();
                let s = subject.to_string();
                let started = std::time::Instant::now();
                let out = tokio::task::spawn_blocking(move || traced(span.as_ref(), || w.call(&s, &payload)))
                    .await
                    .map_err(|e| CallError::Failed(format!("wasm call failed: {e}")))?;
                let ns = started.elapsed().as_nanos() as u64;
                let out = out?;
                stderr_to_logs(&out.stderr, logs);
                Ok((out.stdout, ns))
            }
            Provider::Js(js, _) => js.call(subject, &payload, span).await,
        }
    }
}

thread_local! {
    /// The span of the call running on this thread, for the host-service calls it makes.
    static CURRENT_SPAN: std::cell::Cell<Option<CallSpan>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (a function call, on this thread) with host-service calls parented to `span`.
pub fn traced<R>(span: Option<&CallSpan>, f: impl FnOnce() -> R) -> R {
    let before = CURRENT_SPAN.replace(span.copied());
    let out = f();
    CURRENT_SPAN.set(before);
    out
}

/// Host-service calls from a function: a request to the node on
/// `hostint.<id>.rpc.<ns>.<workload>.<service>.<method>`.
fn host_call(agent: Arc<Agent>, req: &AgentDeployRequest) -> js::HostCall {
    let handle = tokio::runtime::Handle::current();
    let ns = req.namespace.clone();
    let name = req.workload_name.clone();
    Arc::new(move |service: &str, method: &str, headers: HashMap<String, String>, body: Vec<u8>| {
        let subject = nex_api::subjects::internal::rpc(&agent.id, &ns, &name, service, method);
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in &headers {
            h.insert(k.as_str(), v.as_str());
        }
        if let Some(tp) = CURRENT_SPAN.get().map(|s| s.traceparent()) {
            h.insert(nex_api::trace::TRACEPARENT, tp.as_str());
        }
        let nc = agent.nc.clone();
        let req = async_nats::Request::new().headers(h).payload(body.into()).timeout(Some(Duration::from_secs(5)));
        match handle.block_on(nc.send_request(subject, req)) {
            Ok(m) => {
                let get = |k: &str| m.headers.as_ref().and_then(|h| h.get(k)).map(|v| v.to_string());
                let code = get(nex_api::agent::HEADER_HS_CODE).and_then(|c| c.parse().ok()).unwrap_or(500);
                let msg = get(nex_api::agent::HEADER_HS_MSG).unwrap_or_default();
                (code, msg, m.payload.to_vec())
            }
            Err(e) => (500, format!("host services request failed: {e}"), Vec::new()),
        }
    })
}
