//! STOP, lame duck and node shutdown. A STOP is checked like a DEPLOY token (issuer, name,
//! freshness, binding, replay); a workload in another namespace is "No such workload" before
//! anything else, so the answer tells a stranger nothing. A STOP that answers `stopped: true`
//! ends the workload's restart chain for good.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use nex_api::control::{StopRequest, StopResponse};
use nex_api::events::event_type;
use nex_api::jwt::WorkloadClaims;

use super::error::StopError;
use super::{lock, Workload, WorkloadManager};

/// How long shutdown waits for deploys in flight to finish or give up.
const DRAIN_DEPLOYS: Duration = Duration::from_secs(15);

impl WorkloadManager {
    /// The STOP pipeline for a request received on `$NEX.STOP.{ns}.{node}`.
    pub async fn stop(self: &Arc<Self>, ns: Option<&str>, body: &[u8]) -> Result<StopResponse, StopError> {
        let ns = match ns {
            Some(n) if !n.is_empty() => n,
            _ => return Err(StopError::NoNamespace),
        };
        let req: StopRequest = serde_json::from_slice(body).map_err(|e| StopError::Malformed(e.to_string()))?;
        let claims = WorkloadClaims::decode(&req.workload_jwt).map_err(|e| StopError::Jwt(e.to_string()));
        let Some(w) = self.get(&req.workload_id).filter(|w| w.namespace.eq_ignore_ascii_case(ns)) else {
            return self.stop_pending_restart(ns, &req.workload_id, claims?);
        };
        let claims = claims?;
        if claims.jti == w.claims.jti {
            return Err(StopError::Cloned);
        }
        self.check_stop_claims(&claims, ns, &w.id, &w.claims.sub, &w.claims.iss)?;
        self.stop_workload(&w).await;
        Ok(StopResponse { stopped: true, id: w.id.clone(), issuer: w.issuer.clone(), name: w.name.clone() })
    }

    /// The rules of a STOP token: same subject and issuer as the deploy, fresh, bound to this
    /// node, namespace and workload when it says so, and never used before.
    fn check_stop_claims(
        &self,
        claims: &WorkloadClaims,
        ns: &str,
        id: &str,
        sub: &str,
        iss: &str,
    ) -> Result<(), StopError> {
        if claims.sub != sub {
            return Err(StopError::Subject);
        }
        if claims.iss != iss {
            return Err(StopError::Issuer);
        }
        crate::trust::check_fresh(&self.cfg, claims).map_err(StopError::Claims)?;
        crate::trust::check_binding(claims, ns, &self.ident.node_id, Some(id)).map_err(StopError::Invalid)?;
        self.replay
            .accept(&claims.jti, claims.replay_window_end(self.cfg.deploy_max_age))
            .map_err(|e| StopError::Invalid(e.to_string()))
    }

    /// A STOP for an essential workload that exited and waits to be restarted: ends the chain.
    fn stop_pending_restart(&self, ns: &str, id: &str, claims: WorkloadClaims) -> Result<StopResponse, StopError> {
        let ended = self
            .state
            .end_chain_of(id, ns, |ch| self.check_stop_claims(&claims, ns, id, &ch.name, &ch.issuer))
            .ok_or(StopError::NoSuchWorkload)??;
        tracing::info!(id, "stop ended a pending essential restart");
        Ok(StopResponse { stopped: true, id: id.to_string(), issuer: ended.issuer, name: ended.name })
    }

    /// Stops a workload gracefully (SIGTERM, grace period, SIGKILL of the whole tree) and ends
    /// its restart chain.
    pub async fn stop_workload(self: &Arc<Self>, w: &Arc<Workload>) {
        {
            let mut life = w.life.lock().await;
            if life.ended {
                return;
            }
            life.stop_requested = true;
        }
        w.essential.store(false, Ordering::SeqCst);
        if let Some(c) = w.chain_id() {
            self.state.end_chain(c);
        }
        // Stop triggers first so no new call starts.
        let triggers = lock(&w.triggers).take();
        if let Some(t) = triggers {
            t.stop().await;
        }
        let grace = Duration::from_millis(self.cfg.workload_stop_grace_ms);
        let ended = w.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if let Err(e) = w.agent.client.undeploy(grace + Duration::from_secs(2)).await {
            tracing::warn!(id = %w.id, error = %e, "agent did not confirm undeploy; killing it");
        }
        // The agent reports the workload's exit; wait briefly for it, then end it ourselves.
        if tokio::time::timeout(Duration::from_millis(500), ended).await.is_err() {
            self.on_exit(w.clone(), 0, Some("Workload shutdown requested".into())).await;
        }
        self.teardown(w).await;
    }

    /// Enters lame duck mode: no new deploys, no more restarts; false when already in it.
    pub async fn enter_lameduck(&self) -> bool {
        let Some(running) = self.state.enter_lameduck() else {
            return false;
        };
        self.ident
            .tags
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(nex_api::control::tags::LAMEDUCK.into(), "true".into());
        for w in running {
            w.essential.store(false, Ordering::SeqCst);
        }
        self.events
            .node_event(
                event_type::NODE_ENTERED_LAMEDUCK,
                &json!({"version": nex_api::VERSION, "id": self.ident.node_id}),
            )
            .await;
        true
    }

    /// Node shutdown: refuses new deploys, lets those in flight finish or fail (any that still
    /// completes cannot commit), then stops every workload.
    pub async fn stop_all(self: &Arc<Self>) {
        self.state.begin_shutdown();
        self.pool.stop_taking();
        if !self.state.wait_idle(DRAIN_DEPLOYS).await {
            tracing::warn!("deploys still in flight after {DRAIN_DEPLOYS:?}; stopping what runs");
        }
        let all = self.all();
        futures::future::join_all(all.iter().map(|w| self.stop_workload(w))).await;
    }
}
