//! A running workload's life: what its agent reports (on two bounded paths, so a flood of log
//! lines never delays an exit), its liveness, its end, and the teardown that leaves nothing.
//!
//! Agents are untrusted: the node limits every kind of output a workload produces (native
//! stdout/stderr, JavaScript console, WebAssembly stderr) to [`LOG_LINES_PER_SEC`] lines a
//! second per workload, whatever the agent did, and counts what it drops.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Semaphore;

use nex_api::agent::WorkloadStatusEvent;
use nex_api::events::event_type;

use super::{lock, Workload, WorkloadManager};
use crate::agent_client::{AgentMessage, AgentReceiver};

/// Lines a second one workload may log through the node.
pub const LOG_LINES_PER_SEC: f64 = 1000.0;
/// Burst allowance of that rate.
const LOG_BURST: f64 = 2000.0;
/// Liveness pings (5 s apart) a running workload's agent may miss in a row before it counts as
/// lost.
const MISSED_PINGS: u32 = 3;
/// Host-service calls answered at the same time, for all workloads.
const MAX_HOST_SERVICE_CALLS: usize = 64;

/// The node's token bucket over one workload's log lines.
#[derive(Debug)]
pub(super) struct LogLimit {
    tokens: f64,
    last: Instant,
    dropped: u64,
    last_report: Instant,
}

impl LogLimit {
    /// A full bucket.
    pub fn new() -> LogLimit {
        let now = Instant::now();
        LogLimit { tokens: LOG_BURST, last: now, dropped: 0, last_report: now }
    }

    /// Whether the next line may be published, and the dropped lines to report, when due (at
    /// most once a second). `lost` are lines dropped before they reached the node.
    pub fn admit(&mut self, lost: u64) -> (bool, Option<u64>) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * LOG_LINES_PER_SEC).min(LOG_BURST);
        self.last = now;
        self.dropped += lost;
        let ok = self.tokens >= 1.0;
        if ok {
            self.tokens -= 1.0;
        } else {
            self.dropped += 1;
        }
        let report = (self.dropped > 0 && now.duration_since(self.last_report) >= Duration::from_secs(1)).then(|| {
            self.last_report = now;
            std::mem::take(&mut self.dropped)
        });
        (ok, report)
    }

    /// Drops still unreported once the stream has gone quiet for a second: a flood that ends
    /// before the next line arrives is reported all the same.
    pub fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        let quiet = now.duration_since(self.last) >= Duration::from_secs(1);
        (self.dropped > 0 && quiet).then(|| {
            self.last_report = now;
            std::mem::take(&mut self.dropped)
        })
    }
}

impl WorkloadManager {
    /// Handles what agents send that can wait or be dropped under load: log lines, call
    /// reports, host-service calls.
    pub async fn run_agent_data(self: Arc<Self>, mut rx: AgentReceiver) {
        let calls = Arc::new(Semaphore::new(MAX_HOST_SERVICE_CALLS));
        let mut quiet = tokio::time::interval(Duration::from_secs(1));
        quiet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (id, msg) = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = quiet.tick() => {
                    for w in self.all() {
                        let due = lock(&w.log_limit).due();
                        if let Some(n) = due {
                            self.report_dropped_logs(&w, n).await;
                        }
                    }
                    continue;
                }
            };
            if let AgentMessage::Drained(done) = msg {
                let _ = done.send(());
                continue;
            }
            let Some(w) = self.get(&id) else {
                continue; // warm agents have nothing to say yet
            };
            match msg {
                AgentMessage::Log(entry) => {
                    let lost = w.agent.client.take_dropped();
                    let (ok, report) = lock(&w.log_limit).admit(lost);
                    if let Some(n) = report {
                        self.report_dropped_logs(&w, n).await;
                    }
                    if ok {
                        let level = nex_api::agent::level::as_str(entry.level);
                        self.events.log(&w.namespace, &w.name, &w.id, level, &entry.text).await;
                    }
                }
                AgentMessage::HostService(msg) => {
                    let Ok(permit) = calls.clone().acquire_owned().await else { continue };
                    let me = self.clone();
                    tokio::spawn(async move {
                        let conn = w.hs_conn.clone().unwrap_or_else(|| me.control.clone());
                        crate::host_services::handle(&me.cfg, &conn, w.agent.client.connection(), &w, msg).await;
                        drop(permit);
                    });
                }
                AgentMessage::Execs(execs) => {
                    for exec in execs {
                        if let Some(s) = &exec.span {
                            let attrs = || crate::triggers::call_attrs(&w, &exec.trigger_subject);
                            crate::traces::agent_held_call(s, exec.error.as_deref(), attrs);
                        }
                        let outcome = match exec.error {
                            Some(e) => Err(e),
                            None => Ok(exec.elapsed_nanos),
                        };
                        crate::triggers::report(&self.events, &w, &exec.trigger_subject, outcome).await;
                    }
                }
                AgentMessage::Event(t, data, drained) => self.agent_event(w, t, data, drained).await,
                AgentMessage::Drained(_) => {}
            }
        }
    }

    async fn report_dropped_logs(&self, w: &Workload, n: u64) {
        crate::telemetry::logs_dropped(w, n);
        let text = format!("nex: dropped {n} log lines of {} (rate limit {LOG_LINES_PER_SEC} lines/s)", w.name);
        self.events.log(&w.namespace, &w.name, &w.id, "WARN", &text).await;
    }

    /// Handles agents' lifecycle events (a workload's exit above all), never behind log lines.
    pub async fn run_agent_control(self: Arc<Self>, mut rx: AgentReceiver) {
        while let Some((id, msg)) = rx.recv().await {
            let Some(w) = self.get(&id) else { continue };
            if let AgentMessage::Event(t, data, drained) = msg {
                self.agent_event(w, t, data, drained).await;
            }
        }
    }

    async fn agent_event(
        self: &Arc<Self>,
        w: Arc<Workload>,
        t: String,
        data: serde_json::Value,
        drained: Option<tokio::sync::oneshot::Receiver<()>>,
    ) {
        if t == event_type::WORKLOAD_UNDEPLOYED {
            let st: WorkloadStatusEvent = serde_json::from_value(data).unwrap_or_default();
            let me = self.clone();
            tokio::spawn(async move {
                // The workload's last log lines are still on the data path: publish them before
                // the teardown forgets the workload (bounded, so a flooded path cannot hold an exit).
                if let Some(d) = drained {
                    let _ = tokio::time::timeout(Duration::from_millis(500), d).await;
                }
                me.on_exit(w, st.code, st.message).await
            });
        } else if t != event_type::WORKLOAD_DEPLOYED {
            // The node emits workload_deployed itself, once.
            self.events.workload_event(&w.namespace, &w.id, &t, &data).await;
        }
    }

    /// Watches a deployed workload's agent: its exit and its liveness pings.
    pub(super) fn spawn_monitor(self: &Arc<Self>, w: Arc<Workload>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut exited = w.agent.handle.exited();
            let ping_timeout = Duration::from_millis(me.cfg.agent_ping_timeout_ms);
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            // Pings fail for a moment while the internal NATS server restarts: only several in
            // a row mean the agent is gone (its process ending is seen at once).
            let mut missed = 0;
            loop {
                tokio::select! {
                    _ = crate::tiers::wait_exit(&mut exited) => {
                        // Give the agent's own workload_undeployed (with the real exit code) a moment.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let exit = exited.borrow().clone();
                        me.on_exit(w.clone(), -1, Some(format!("agent exited unexpectedly ({exit:?})"))).await;
                        return;
                    }
                    _ = tick.tick() => {
                        if w.torn_down.load(Ordering::SeqCst) {
                            return;
                        }
                        if w.agent.client.ping(ping_timeout).await {
                            missed = 0;
                        } else if !w.torn_down.load(Ordering::SeqCst) {
                            missed += 1;
                            if missed >= MISSED_PINGS {
                                me.on_exit(w.clone(), -1, Some("contact with the agent was lost".into())).await;
                                return;
                            }
                        }
                    }
                    _ = w.ended.notified() => return,
                }
            }
        });
    }

    /// A workload ended (its process exited, its agent died, or it was stopped): exactly one
    /// `workload_undeployed`, the teardown, and for an essential one its restart.
    pub(super) async fn on_exit(self: &Arc<Self>, w: Arc<Workload>, code: i32, message: Option<String>) {
        let mut life = w.life.lock().await;
        if life.ended {
            return;
        }
        life.ended = true;
        let stop_requested = life.stop_requested;
        let mut message =
            message.unwrap_or_else(|| format!("Exited workload: {}; vm: {}; status: {code}", w.name, w.id));
        if w.agent.handle.oom_killed() {
            message.push_str(&format!(
                "; killed for exceeding its memory limit of {} MiB",
                self.cfg.machine_template.memsize_mib
            ));
        }
        let reason = if stop_requested { "Workload shutdown requested" } else { "Workload exited" };
        self.events
            .workload_event(
                &w.namespace,
                &w.id,
                event_type::WORKLOAD_UNDEPLOYED,
                &json!({"workload_name": w.name, "workload_id": w.id, "code": code, "message": message, "reason": reason}),
            )
            .await;
        drop(life);
        w.ended.notify_waiters();
        self.teardown(&w).await;
        let restart = w.essential.load(Ordering::SeqCst) && code != 0 && !stop_requested;
        match w.chain_id() {
            Some(c) if restart => self.schedule_restart(w, c),
            Some(c) => self.state.end_chain(c),
            None => {}
        }
    }

    /// Removes a workload's triggers and agent; idempotent.
    pub(super) async fn teardown(&self, w: &Arc<Workload>) {
        if w.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        self.state.remove(&w.id, w.held_bytes);
        let triggers = lock(&w.triggers).take();
        if let Some(t) = triggers {
            t.stop().await;
        }
        self.pool.release(w.agent.clone()).await;
        let unreported = std::mem::take(&mut lock(&w.log_limit).dropped);
        if unreported > 0 {
            self.report_dropped_logs(w, unreported).await;
        }
        self.events.log(&w.namespace, &w.name, &w.id, "DEBUG", "Workload stopped").await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_log_limit_admits_a_burst_then_counts_drops() {
        let mut l = super::LogLimit::new();
        let admitted = (0..3000).filter(|_| l.admit(0).0).count();
        assert!((2000..2100).contains(&admitted), "{admitted}");
        // Lines lost before the node count too.
        l.last_report -= std::time::Duration::from_secs(2);
        let (_, report) = l.admit(5);
        assert!(report.unwrap() >= 1000 + 5);
        // A flood that stops is reported once it has been quiet for a second, and only once.
        let mut l = super::LogLimit::new();
        (0..3000).for_each(|_| {
            let _ = l.admit(0);
        });
        assert_eq!(l.due(), None);
        l.last -= std::time::Duration::from_secs(1);
        assert!(l.due().is_some_and(|n| n >= 900));
        assert_eq!(l.due(), None);
    }
}
