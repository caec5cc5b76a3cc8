//! Essential workloads come back after a non-zero exit, with back-off (1 s doubling to 30 s, reset
//! after a minute up), through the same reservation and commit as a DEPLOY: a STOP that ended
//! the chain, lame duck or shutdown end it for good, even while a restart is being launched.

use std::sync::Arc;
use std::time::Duration;

use super::{Workload, WorkloadManager};

impl WorkloadManager {
    /// Restarts `w` (of chain `chain`) after the chain's back-off, retrying while it lives.
    pub(super) fn schedule_restart(self: &Arc<Self>, w: Arc<Workload>, chain: u64) {
        let Some(mut delay) = self.state.next_backoff(chain, w.started.elapsed()) else {
            return;
        };
        tracing::warn!(workload = %w.name, id = %w.id, "essential workload exited; restarting in {}s", delay.as_secs());
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(delay).await;
                if !me.state.chain_alive(chain) {
                    me.state.end_chain(chain);
                    return;
                }
                let mut v = w.validated.clone();
                v.chain = Some(chain);
                v.retry_count = v.retry_count.saturating_add(1);
                v.request.retry_count = Some(v.retry_count);
                v.request.retried_at = Some(chrono::Utc::now().to_rfc3339());
                let attempt = match me.state.reserve(me.cfg.node_limits.max_workloads, true) {
                    Ok(r) => me.launch(v, r).await,
                    Err(e) => Err(e),
                };
                match attempt {
                    Ok(r) => {
                        tracing::info!(workload = %r.name, id = %r.id, "essential workload restarted");
                        return;
                    }
                    Err(e) => {
                        if !me.state.chain_alive(chain) {
                            return;
                        }
                        tracing::error!(workload = %w.name, error = %e, "essential restart failed; retrying");
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
    }
}
