//! JavaScript functions on QuickJS (`rquickjs`), under the wire type `v8`.
//!
//! The script is evaluated once, as a classic script whose completion value must be
//! `function(subject, payload: Uint8Array)`; the runtime and context are kept for every call, on a
//! thread of their own. Each call has a deadline (interrupt handler) and the runtime a memory
//! limit. `console.*` lines become workload logs; `hostServices` (Nex's API) reaches the node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use rquickjs::function::Opt;
use rquickjs::{Array, CatchResultExt, CaughtError, Context, Ctx, Function, Persistent, Runtime, TypedArray, Value};
use tokio::sync::oneshot;

use nex_api::agent::FunctionLimits;

use super::{failed_to, DeployError};

/// Calls into the host (kv, messaging, objectstore, http): (service, method, headers, body) →
/// (code, message, body).
pub type HostCall = Arc<dyn Fn(&str, &str, HashMap<String, String>, Vec<u8>) -> (u16, String, Vec<u8>) + Send + Sync>;

/// Log sink: (agent level, text).
pub type LogSink = tokio::sync::mpsc::Sender<(i32, String)>;

/// Console lines waiting to be shipped; beyond that they are dropped (the node counts and limits
/// every workload's output too).
pub const LOG_QUEUE: usize = 4096;
/// Calls waiting for the JavaScript thread; beyond that a call is refused at once.
const CALL_QUEUE: usize = 256;

const PRELUDE: &str = r#"
(function (g) {
  const hs = g.__nex_hs, log = g.__nex_log;
  delete g.__nex_hs; delete g.__nex_log;
  const dec = (a) => { let s = ''; for (let i = 0; i < a.length; i++) s += String.fromCharCode(a[i]); return s; };
  const bytes = (v) => {
    if (!(v instanceof Uint8Array)) throw 'failed to marshal v8 value to []byte: ' + typeof v + '; only Uint8[] is supported';
    return v;
  };
  const call = (svc, m, h, body) => {
    const r = hs(svc, m, h, body);
    if (r[0] !== 200) throw r[1] + ' (' + r[0] + ')';
    return r[2];
  };
  const json = (svc, m, h, body) => JSON.parse(dec(call(svc, m, h, body)));
  const http = (method) => function (url, body) {
    if (arguments.length < 1) throw 'url is required';
    const r = json('http', method, { 'x-http-url': url }, body === undefined ? undefined : bytes(body));
    const headers = {};
    for (const k in (r.headers || {})) headers[k] = [].concat(r.headers[k]).join(', ');
    return { status: r.status, headers: headers, response: r.body === undefined ? null : r.body };
  };
  g.hostServices = {
    kv: {
      get: function (key) { if (arguments.length < 1) throw 'key is required'; return call('kv', 'get', { 'x-keyvalue-key': key }); },
      set: function (key, value) {
        if (arguments.length < 2) throw 'key and value are required';
        const r = json('kv', 'set', { 'x-keyvalue-key': key }, bytes(value));
        if (!r.success) throw 'failed to set value for key';
      },
      delete: function (key) { if (arguments.length < 1) throw 'key is required'; json('kv', 'delete', { 'x-keyvalue-key': key }); },
      keys: function () { return json('kv', 'keys', {}); },
    },
    messaging: {
      publish: function (subject, payload) {
        if (arguments.length < 2) throw 'subject and payload are required';
        json('messaging', 'publish', { 'x-subject': subject }, bytes(payload));
      },
      request: function (subject, payload) {
        if (arguments.length < 2) throw 'subject and payload are required';
        return call('messaging', 'request', { 'x-subject': subject }, bytes(payload));
      },
      requestMany: function () { throw "this function isn't currently supported"; },
    },
    objectStore: {
      get: function (name) { if (arguments.length < 1) throw 'name is required'; return call('objectstore', 'get', { 'x-object-name': name }); },
      put: function (name, value) {
        if (arguments.length < 2) throw 'name and value are required';
        return json('objectstore', 'put', { 'x-object-name': name }, bytes(value));
      },
      delete: function (name) { if (arguments.length < 1) throw 'name is required'; json('objectstore', 'delete', { 'x-object-name': name }); },
      list: function () { return json('objectstore', 'list', {}); },
    },
    http: { get: http('get'), post: http('post'), put: http('put'), patch: http('patch'), delete: http('delete'), head: http('head') },
  };
  const text = (args) => args.map((a) => typeof a === 'string' ? a : JSON.stringify(a)).join(' ');
  g.console = {
    log: (...a) => log(4, text(a)), info: (...a) => log(4, text(a)), debug: (...a) => log(5, text(a)),
    warn: (...a) => log(3, text(a)), error: (...a) => log(2, text(a)),
  };
})(globalThis);
"#;

struct Call {
    subject: String,
    payload: Vec<u8>,
    /// The span host-service calls made during it belong to.
    span: Option<nex_api::trace::CallSpan>,
    /// After this, nobody waits for the answer any more: the call is dropped unrun.
    deadline: Instant,
    reply: oneshot::Sender<Result<(Vec<u8>, u64), super::CallError>>,
}

/// What a JavaScript function is made of; every [`Script`] built from it is independent.
#[derive(Clone)]
pub struct Spec {
    /// The source text.
    pub source: String,
    /// Per-call limits.
    pub limits: FunctionLimits,
    /// Host services.
    pub host: HostCall,
    /// Where `console.*` lines go.
    pub logs: LogSink,
}

/// A loaded script on its own thread (calls from the async runtime).
pub struct Js {
    tx: mpsc::SyncSender<Call>,
    timeout: std::time::Duration,
}

impl Js {
    /// Evaluates the script on a new thread and keeps its function there for calls.
    pub fn load(spec: Spec) -> Result<Js, DeployError> {
        let (tx, rx) = mpsc::sync_channel::<Call>(CALL_QUEUE);
        let timeout = std::time::Duration::from_millis(spec.limits.timeout_ms);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), DeployError>>();
        std::thread::Builder::new()
            .name("js".into())
            .spawn(move || {
                let mut script = match Script::new(&spec) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(call) = rx.recv() {
                    if call.reply.is_closed() || Instant::now() > call.deadline {
                        let _ = call.reply.send(Err(super::CallError::Expired));
                        continue;
                    }
                    let out = super::traced(call.span.as_ref(), || script.call(&call.subject, call.payload));
                    let _ = call.reply.send(out);
                }
            })
            .map_err(failed_to("start the JavaScript thread"))?;
        ready_rx.recv().map_err(|_| failed_to("start JavaScript")("its thread ended"))??;
        Ok(Js { tx, timeout })
    }

    /// Runs one call; the reply is `JSON.stringify(result)` (empty for `undefined`).
    pub async fn call(
        &self,
        subject: &str,
        payload: &[u8],
        span: Option<nex_api::trace::CallSpan>,
    ) -> Result<(Vec<u8>, u64), super::CallError> {
        let (reply, rx) = oneshot::channel();
        // A requester waits at most about the call's timeout: a call still queued then is moot.
        let deadline = Instant::now() + self.timeout + std::time::Duration::from_secs(1);
        let call = Call { subject: subject.to_string(), payload: payload.to_vec(), span, deadline, reply };
        let stopped = || super::CallError::Failed("the JavaScript engine stopped".into());
        self.tx.try_send(call).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => super::CallError::Busy(CALL_QUEUE),
            mpsc::TrySendError::Disconnected(_) => stopped(),
        })?;
        rx.await.map_err(|_| stopped())?
    }
}

fn describe(e: CaughtError<'_>) -> String {
    match e {
        CaughtError::Exception(ex) => ex.message().unwrap_or_else(|| format!("{ex:?}")),
        CaughtError::Value(v) => v
            .as_string()
            .and_then(|s| s.to_string().ok())
            .or_else(|| v.ctx().json_stringify(v.clone()).ok().flatten().and_then(|s| s.to_string().ok()))
            .unwrap_or_else(|| format!("{v:?}")),
        CaughtError::Error(e) => e.to_string(),
    }
}

/// One QuickJS runtime with the evaluated script, used from the thread that made it.
pub struct Script {
    // Dropped in this order: the function and context before their runtime.
    func: Persistent<Function<'static>>,
    ctx: Context,
    rt: Runtime,
    limits: FunctionLimits,
    /// Deadline of the running call, in ms since `base`; 0 = no call running.
    deadline: Arc<AtomicU64>,
    /// Set by the interrupt handler when it stopped the running call.
    interrupted: Arc<std::sync::atomic::AtomicBool>,
    base: Instant,
    calls: u64,
}

impl Script {
    /// Evaluates the script; its completion value must be the function.
    pub fn new(spec: &Spec) -> Result<Script, DeployError> {
        let rt = Runtime::new().map_err(failed_to("start JavaScript"))?;
        rt.set_memory_limit((spec.limits.memory_mib as usize) * 1024 * 1024);
        rt.set_max_stack_size(1024 * 1024);
        let base = Instant::now();
        let deadline = Arc::new(AtomicU64::new(0));
        let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, hit) = (deadline.clone(), interrupted.clone());
        rt.set_interrupt_handler(Some(Box::new(move || {
            let dl = d.load(Ordering::Relaxed);
            let stop = dl != 0 && base.elapsed().as_millis() as u64 > dl;
            if stop {
                hit.store(true, Ordering::Relaxed);
            }
            stop
        })));
        let ctx = Context::full(&rt).map_err(failed_to("create a JavaScript context"))?;
        let func: Persistent<Function<'static>> = ctx.with(|ctx| {
            install_natives(&ctx, spec.host.clone(), spec.logs.clone())
                .map_err(failed_to("install host services"))?;
            ctx.eval::<(), _>(PRELUDE).catch(&ctx).map_err(|e| DeployError::Script(format!("prelude failed: {}", describe(e))))?;
            let v: Value = ctx
                .eval(spec.source.clone().into_bytes())
                .catch(&ctx)
                .map_err(|e| failed_to("compile source for execution")(describe(e)))?;
            let f = v.into_function().ok_or_else(|| {
                DeployError::Script(
                    "the script's completion value must be a function(subject, payload); end the script with that function"
                        .into(),
                )
            })?;
            Ok::<_, DeployError>(Persistent::save(&ctx, f))
        })?;
        Ok(Script { func, ctx, rt, limits: spec.limits.clone(), deadline, interrupted, base, calls: 0 })
    }

    /// Runs one call; the reply is `JSON.stringify(result)` (empty for `undefined`) and the run
    /// time in nanoseconds.
    pub fn call(&mut self, subject: &str, payload: Vec<u8>) -> Result<(Vec<u8>, u64), super::CallError> {
        let limits = &self.limits;
        let started = Instant::now();
        self.deadline.store(self.base.elapsed().as_millis() as u64 + limits.timeout_ms, Ordering::Relaxed);
        self.interrupted.store(false, Ordering::Relaxed);
        let result = self.ctx.with(|ctx| -> Result<Vec<u8>, String> {
            let f = self.func.clone().restore(&ctx).map_err(|e| e.to_string())?;
            let payload = TypedArray::<u8>::new(ctx.clone(), payload).map_err(|e| e.to_string())?;
            let out: Value = f.call((subject, payload)).catch(&ctx).map_err(describe)?;
            match ctx.json_stringify(out).catch(&ctx).map_err(describe)? {
                Some(s) => Ok(s.to_string().map_err(|e| e.to_string())?.into_bytes()),
                None => Ok(Vec::new()),
            }
        });
        self.deadline.store(0, Ordering::Relaxed);
        let elapsed = started.elapsed();
        // Known by what happened (our deadline stopped it; the heap is at its limit), not by
        // the wording of QuickJS's exception.
        let heap_full = || {
            let used = self.rt.memory_usage().malloc_size.max(0) as u64;
            used + (1 << 20) >= limits.memory_mib * 1024 * 1024
        };
        let result = result.map_err(|e| {
            if self.interrupted.load(Ordering::Relaxed) {
                super::CallError::TimedOut { engine: "javascript", ms: limits.timeout_ms }
            } else if heap_full() {
                super::CallError::MemoryLimit { engine: "javascript", mib: limits.memory_mib }
            } else {
                super::CallError::Failed(e)
            }
        });
        // Reference counting frees most garbage; collect cycles now and then, not on every call.
        self.calls += 1;
        if self.calls.is_multiple_of(256) {
            self.rt.run_gc();
        }
        result.map(|b| (b, elapsed.as_nanos() as u64))
    }
}

fn install_natives<'js>(ctx: &Ctx<'js>, host: HostCall, logs: LogSink) -> rquickjs::Result<()> {
    let g = ctx.globals();
    g.set(
        "__nex_log",
        Function::new(ctx.clone(), move |level: i32, text: String| {
            let _ = logs.try_send((level, text));
        })?,
    )?;
    g.set(
        "__nex_hs",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  service: String,
                  method: String,
                  headers: HashMap<String, String>,
                  body: Opt<Value<'js>>|
                  -> rquickjs::Result<Array<'js>> {
                let body = match body.0.and_then(|v| TypedArray::<u8>::from_value(v).ok()) {
                    // SAFETY: copied at once, before any JavaScript runs again.
                    Some(a) => unsafe { a.as_slice() }.to_vec(),
                    None => Vec::new(),
                };
                let (code, msg, out) = host(&service, &method, headers, body);
                let arr = Array::new(ctx.clone())?;
                arr.set(0, code as i32)?;
                arr.set(1, msg)?;
                arr.set(2, TypedArray::<u8>::new(ctx.clone(), out)?)?;
                Ok(arr)
            },
        )?,
    )?;
    Ok(())
}
