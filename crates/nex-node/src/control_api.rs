//! The control API listener: `$NEX.PING`, `AUCTION`, `WPING`, `INFO`, `DEPLOY`, `STOP`,
//! `LAMEDUCK` on the user's NATS, each answered with a `{"type","data","error"}` envelope
//! (`docs/protocol.md`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use tokio::sync::mpsc;

use nex_api::control::{
    response_type, AuctionRequest, Envelope, InfoResponse, LameDuckResponse, MemoryStat, PingResponse,
    WorkloadPingResponse,
};

use opentelemetry::KeyValue;

use crate::workloads::WorkloadManager;

#[derive(Debug, Clone, Copy)]
enum Op {
    Ping,
    Auction,
    WorkloadPing,
    Info,
    Deploy,
    Stop,
    LameDuck,
}

/// What the listener needs besides the workload manager.
#[derive(Clone)]
pub struct ControlContext {
    /// The workload manager.
    pub mgr: Arc<WorkloadManager>,
    /// Connection the requests arrive on.
    pub conn: async_nats::Client,
    /// Asks the node to shut down (lame duck with a delay).
    pub shutdown: mpsc::UnboundedSender<()>,
}

/// Subscribes every control subject and serves requests until the returned tasks are aborted.
pub async fn serve(ctx: ControlContext) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let id = ctx.mgr.identity().node_id.clone();
    let subs = [
        ("$NEX.PING".to_string(), Op::Ping),
        (format!("$NEX.PING.{id}"), Op::Ping),
        ("$NEX.AUCTION".to_string(), Op::Auction),
        ("$NEX.WPING.>".to_string(), Op::WorkloadPing),
        (format!("$NEX.INFO.*.{id}"), Op::Info),
        (format!("$NEX.DEPLOY.*.{id}"), Op::Deploy),
        (format!("$NEX.STOP.*.{id}"), Op::Stop),
        (format!("$NEX.LAMEDUCK.{id}"), Op::LameDuck),
    ];
    let mut tasks = Vec::new();
    // Requests handled at the same time: beyond that, subscriptions wait (and NATS buffers or
    // drops for the slow consumer) instead of the node spawning without bound.
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS));
    for (subject, op) in subs {
        let mut sub = ctx.conn.subscribe(subject.clone()).await.with_context(|| format!("subscribing to {subject}"))?;
        let ctx = ctx.clone();
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    handle(ctx, op, msg).await;
                    drop(permit);
                });
            }
        }));
    }
    crate::nats_ext::round_trip(&ctx.conn).await.context("registering control subscriptions")?;
    Ok(tasks)
}

/// Control requests handled at the same time.
const MAX_CONCURRENT_REQUESTS: usize = 64;

fn token(subject: &str, i: usize) -> Option<&str> {
    subject.split('.').nth(i).filter(|t| !t.is_empty())
}

async fn handle(ctx: ControlContext, op: Op, msg: async_nats::Message) {
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let subject = msg.subject.as_str();
    let mgr = &ctx.mgr;
    let cx = control_span(op, &msg);
    let envelope = match op {
        Op::Ping => Some(Envelope::ok(response_type::PING, &ping(mgr))),
        Op::Auction => auction(mgr, &msg.payload).map(|p| Envelope::ok(response_type::AUCTION, &p)),
        Op::WorkloadPing => wping(mgr, token(subject, 2), token(subject, 3)),
        Op::Info => {
            let ns = token(subject, 2).unwrap_or(nex_api::DEFAULT_NAMESPACE);
            Some(Envelope::ok(response_type::INFO, &info(mgr, ns)))
        }
        Op::Deploy => {
            let ns = token(subject, 2);
            let env = match crate::traces::with(cx.clone(), mgr.deploy(ns, &msg.payload)).await {
                Ok(r) => {
                    if crate::traces::enabled() {
                        let w = mgr.get(&r.id);
                        let subjects = w.map(|w| w.trigger_request().trigger_subjects.join(",")).unwrap_or_default();
                        let attrs = vec![
                            KeyValue::new("workload_name", r.name.clone()),
                            KeyValue::new("workload_id", r.id.clone()),
                            KeyValue::new("trigger_subjects", subjects),
                        ];
                        crate::traces::attrs(&cx, attrs);
                    }
                    Envelope::ok(response_type::RUN, &r)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "deploy request rejected");
                    crate::traces::error(&cx, &e.to_string());
                    Envelope::fail(response_type::RUN, e.to_string())
                }
            };
            Some(env)
        }
        Op::Stop => {
            let ns = token(subject, 2);
            Some(match crate::traces::with(cx.clone(), mgr.stop(ns, &msg.payload)).await {
                Ok(r) => Envelope::ok(response_type::STOP, &r),
                Err(e) => {
                    crate::traces::error(&cx, &e.to_string());
                    Envelope::fail(response_type::STOP, e.to_string())
                }
            })
        }
        Op::LameDuck => Some(lameduck(&ctx, &msg.payload).await),
    };
    if let Some(env) = envelope {
        let _ = ctx.conn.publish(reply, env.to_bytes().into()).await;
    }
}

/// The server span of a control request (none for PING, as Nex), under the requester's trace
/// context when it sent one.
fn control_span(op: Op, msg: &async_nats::Message) -> opentelemetry::Context {
    let name = match op {
        Op::Ping => return opentelemetry::Context::new(),
        Op::Auction => "Handle Auction Request",
        Op::WorkloadPing => "Handle workload ping",
        Op::Info => "Handle info request",
        Op::Deploy => "Handle Deploy Request",
        Op::Stop => "Handle workload stop request",
        Op::LameDuck => "Handle enter lameduck",
    };
    if !crate::traces::enabled() {
        return opentelemetry::Context::new();
    }
    let parent = crate::traces::extract(msg.headers.as_ref());
    let ns =
        token(msg.subject.as_str(), 2).filter(|_| matches!(op, Op::Deploy | Op::Stop | Op::Info | Op::WorkloadPing));
    let attrs = ns.map(|n| vec![KeyValue::new("namespace", n.to_string())]).unwrap_or_default();
    crate::traces::span(name, opentelemetry::trace::SpanKind::Server, &parent, attrs)
}

/// WPING: the node's workloads matching the filters, or silence when none does.
fn wping(mgr: &WorkloadManager, ns: Option<&str>, id: Option<&str>) -> Option<Envelope> {
    let found = mgr.wping(ns, id);
    if found.is_empty() {
        return None;
    }
    let p = ping(mgr);
    let r = WorkloadPingResponse {
        node_id: p.node_id,
        target_xkey: p.target_xkey,
        version: p.version,
        tags: p.tags,
        uptime: p.uptime,
        running_machines: found,
    };
    Some(Envelope::ok(response_type::PING, &r))
}

/// LAMEDUCK: authorised (signed on a restricted node), then lame duck and, with a delay, a drain.
async fn lameduck(ctx: &ControlContext, body: &[u8]) -> Envelope {
    let mgr = &ctx.mgr;
    match crate::trust::authorize_lameduck(mgr.config(), mgr.replay(), &mgr.identity().node_id, body) {
        Ok(order) => {
            tracing::info!(issuer = order.issuer.as_deref().unwrap_or("(open node)"), "entering lame duck mode");
            mgr.enter_lameduck().await;
            if let Some(ms) = order.delay_ms {
                let tx = ctx.shutdown.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let _ = tx.send(());
                });
            }
            let r = LameDuckResponse { node_id: mgr.identity().node_id.clone(), success: true };
            Envelope::ok(response_type::LAMEDUCK, &r)
        }
        Err(e) => {
            tracing::warn!(error = %e, "lame duck request refused");
            Envelope::fail(response_type::LAMEDUCK, e)
        }
    }
}

fn ping(mgr: &WorkloadManager) -> PingResponse {
    let id = mgr.identity();
    PingResponse {
        node_id: id.node_id.clone(),
        nexus: id.nexus.clone(),
        version: nex_api::VERSION.to_string(),
        uptime: nex_api::uptime::format(id.started.elapsed()),
        target_xkey: id.xkey.public_key(),
        tags: id.tags.read().unwrap_or_else(|e| e.into_inner()).clone(),
        running_machines: mgr.count() as u64,
        build: nex_api::BUILD.to_string(),
        fleet_xkey: id.fleet_xkey.as_ref().map(|k| k.public_key()).unwrap_or_default(),
    }
}

/// The node's PING answer when the AUCTION filters in `body` match it; `None` to stay silent.
fn auction(mgr: &WorkloadManager, body: &[u8]) -> Option<PingResponse> {
    let p = ping(mgr);
    let Ok(req) = serde_json::from_slice::<AuctionRequest>(body) else {
        return Some(p);
    };
    let tag = |k: &str| p.tags.get(k).map(String::as_str).unwrap_or("");
    if let Some(a) = &req.arch {
        if !a.eq_ignore_ascii_case(tag(nex_api::control::tags::ARCH)) {
            return None;
        }
    }
    if let Some(o) = &req.os {
        if !o.eq_ignore_ascii_case(tag(nex_api::control::tags::OS)) {
            return None;
        }
    }
    if let Some(s) = req.sandboxed {
        if s != mgr.pool().tier().sandboxed() {
            return None;
        }
    }
    for (k, v) in &req.tags {
        match p.tags.get(k) {
            Some(have) if have.eq_ignore_ascii_case(v) => {}
            _ => return None,
        }
    }
    for t in &req.workload_types {
        if !mgr.config().workload_types.contains(&nex_api::workload_type::canonical(t)) {
            return None;
        }
    }
    Some(p)
}

fn info(mgr: &WorkloadManager, ns: &str) -> InfoResponse {
    let id = mgr.identity();
    InfoResponse {
        version: nex_api::VERSION.to_string(),
        uptime: nex_api::uptime::format(id.started.elapsed()),
        public_xkey: id.xkey.public_key(),
        tags: id.tags.read().unwrap_or_else(|e| e.into_inner()).clone(),
        memory: read_meminfo(),
        machines: mgr.machines(ns),
        supported_workload_types: mgr.config().workload_types.clone(),
        available_agents: mgr.pool().available() as u64,
        agent_start_error: mgr.pool().last_error(),
        build: nex_api::BUILD.to_string(),
        fleet_xkey: id.fleet_xkey.as_ref().map(|k| k.public_key()).unwrap_or_default(),
    }
}

/// Host memory from `/proc/meminfo`, in kB.
pub fn read_meminfo() -> Option<MemoryStat> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let get = |k: &str| -> Option<u64> {
        s.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
    };
    Some(MemoryStat { mem_total: get("MemTotal:")?, mem_free: get("MemFree:")?, mem_available: get("MemAvailable:")? })
}
