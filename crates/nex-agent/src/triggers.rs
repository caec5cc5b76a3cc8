//! Trigger subscriptions the agent holds itself.
//!
//! When the node hands a function's deploy request `direct_triggers`, the agent answers
//! requesters directly: requester → NATS → agent → NATS → requester, the same hops as a plain
//! responder. A few worker threads (one per CPU, at most [`MAX_WORKERS`]) each open their own
//! connection to the user's NATS, join the function's queue group on every trigger subject and
//! run each call inline on that thread: no hand-off between threads on a call's path, and the
//! server spreads calls over the workers. After calls a worker tells the node what happened, in
//! batches on `hostint.<id>.execs`, and the node publishes the call's events and log lines off
//! the call's path.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};

use nex_api::agent::{DirectTriggers, FunctionExec, HEADER_ERROR, HEADER_RUNTIME_NS};
use nex_api::subjects::internal;
use nex_api::trace::{CallSpan, TraceParent, TRACEPARENT};

use crate::providers::Provider;
use crate::Agent;

/// Most trigger worker threads per function.
pub const MAX_WORKERS: usize = 4;
/// Most calls one report carries.
const MAX_BATCH: usize = 256;
/// A worker with calls to report and no new message for this long reports them.
const REPORT_IDLE: Duration = Duration::from_millis(5);

/// The trigger workers of a function.
pub struct Triggers {
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Worker {
    provider: Arc<Provider>,
    subjects: Vec<String>,
    dt: DirectTriggers,
    reports: mpsc::UnboundedSender<Vec<FunctionExec>>,
    stopped: watch::Receiver<bool>,
}

impl Triggers {
    /// Starts the workers; every subscription is registered at the server when this returns.
    pub async fn start(
        agent: Arc<Agent>,
        provider: Arc<Provider>,
        subjects: &[String],
        dt: &DirectTriggers,
    ) -> Result<Triggers, String> {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, MAX_WORKERS);
        let (reports, rx) = mpsc::unbounded_channel();
        tokio::spawn(report(agent, rx));
        let (stop, stopped) = watch::channel(false);
        let mut me = Triggers { stop, threads: Vec::new() };
        let mut ready = Vec::new();
        for i in 0..n {
            let (tx, rx) = oneshot::channel();
            let w = Worker {
                provider: provider.clone(),
                subjects: subjects.to_vec(),
                dt: dt.clone(),
                reports: reports.clone(),
                stopped: stopped.clone(),
            };
            match std::thread::Builder::new().name(format!("trigger-{i}")).spawn(move || worker(w, tx)) {
                Ok(t) => me.threads.push(t),
                Err(e) => {
                    me.stop().await;
                    return Err(format!("failed to start a trigger worker: {e}"));
                }
            }
            ready.push(rx);
        }
        for r in ready {
            let outcome = r.await.unwrap_or_else(|_| Err("a trigger worker ended before it was ready".into()));
            if let Err(e) = outcome {
                me.stop().await;
                return Err(e);
            }
        }
        Ok(me)
    }

    /// Stops taking calls: the workers unsubscribe, send their replies and reports, and end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let threads = self.threads;
        let join = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join())));
        let _ = tokio::time::timeout(Duration::from_secs(3), join).await;
    }
}

enum Next {
    Call(async_nats::Message),
    Idle,
    Stop,
}

/// One worker thread: its own runtime and connection; calls run right here.
fn worker(w: Worker, ready: oneshot::Sender<Result<(), String>>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("failed to start a trigger worker: {e}")));
            return;
        }
    };
    let mut callable = match w.provider.callable() {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let setup = rt.block_on(async {
        let conn = connect(&w.dt).await?;
        let mut subs = Vec::new();
        for s in &w.subjects {
            let sub = conn
                .queue_subscribe(s.clone(), w.dt.queue_group.clone())
                .await
                .map_err(|e| format!("subscribing to trigger subject {s}: {e}"))?;
            subs.push(sub);
        }
        nex_io::round_trip(&conn).await.map_err(|e| format!("registering trigger subscriptions: {e}"))?;
        Ok::<_, String>((conn, futures::stream::select_all(subs)))
    });
    let (conn, mut messages) = match setup {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut stopped = w.stopped;
    let mut batch: Vec<FunctionExec> = Vec::new();
    loop {
        if *stopped.borrow() {
            break;
        }
        // A message already received is taken at once; otherwise wait on the runtime, which is
        // also when the connection's task sends the replies published below and reads more.
        let next = match messages.next().now_or_never() {
            Some(m) => m.map_or(Next::Stop, Next::Call),
            None => {
                let pending = !batch.is_empty();
                rt.block_on(async {
                    tokio::select! {
                        biased;
                        _ = stopped.wait_for(|s| *s) => Next::Stop,
                        m = messages.next() => m.map_or(Next::Stop, Next::Call),
                        _ = tokio::time::sleep(REPORT_IDLE), if pending => Next::Idle,
                    }
                })
            }
        };
        let m = match next {
            Next::Call(m) => m,
            Next::Idle => {
                let _ = w.reports.send(std::mem::take(&mut batch));
                continue;
            }
            Next::Stop => break,
        };
        let subject = m.subject.to_string();
        let mut h = async_nats::HeaderMap::new();
        // Traced when the requester sent a context, or always when the node records traces.
        let parent = m.headers.as_ref().and_then(|h| h.get(TRACEPARENT)).and_then(|v| TraceParent::parse(v.as_str()));
        let mut span = (parent.is_some() || w.dt.traces).then(|| CallSpan::begin(parent));
        // Inside this thread's runtime context, WASI's blocking calls run on it directly instead
        // of starting wasmtime-wasi's own multi-threaded runtime.
        let outcome = {
            let _rt = rt.enter();
            crate::providers::traced(span.as_ref(), || callable.call(&subject, &m.payload))
        };
        if let Some(s) = span.as_mut() {
            s.end();
        }
        let (reply, exec) = match outcome {
            Ok((out, ns)) => {
                h.insert(HEADER_RUNTIME_NS, ns.to_string().as_str());
                (Bytes::from(out), FunctionExec { trigger_subject: subject, elapsed_nanos: ns, error: None, span })
            }
            Err(e) => {
                let e = e.to_string();
                h.insert(HEADER_ERROR, nex_io::header_value(&e).as_str());
                (Bytes::new(), FunctionExec { trigger_subject: subject, elapsed_nanos: 0, error: Some(e), span })
            }
        };
        if let Some(r) = m.reply {
            let _ = rt.block_on(conn.publish_with_headers(r, h, reply));
        }
        batch.push(exec);
        if batch.len() >= MAX_BATCH {
            let _ = w.reports.send(std::mem::take(&mut batch));
        }
    }
    if !batch.is_empty() {
        let _ = w.reports.send(batch);
    }
    let _ = rt.block_on(tokio::time::timeout(Duration::from_secs(1), conn.drain()));
}

async fn connect(dt: &DirectTriggers) -> Result<async_nats::Client, String> {
    nex_io::connect(&dt.connection, "workload-trigger-subscription").await.map_err(|e| format!("{e} (triggers)"))
}

/// Sends the node the workers' reports, as many per message as have piled up.
async fn report(agent: Arc<Agent>, mut rx: mpsc::UnboundedReceiver<Vec<FunctionExec>>) {
    let subject = internal::execs(&agent.id);
    while let Some(mut batch) = rx.recv().await {
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        if let Ok(body) = serde_json::to_vec(&batch) {
            let _ = agent.nc.publish(subject.clone(), body.into()).await;
        }
    }
}
