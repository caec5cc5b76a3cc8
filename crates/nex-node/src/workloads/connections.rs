//! The connections a workload may use: the host-services connection (the operator's whenever
//! one is configured), NATS URLs rewritten to the sandbox's relays for allowed servers only, and
//! the trigger connection an agent may hold itself.

use nex_api::workload_type;

use super::validate::Validated;
use super::WorkloadManager;

impl WorkloadManager {
    /// The connection host services use for a function, when it is not the control connection:
    /// the operator's host-services connection whenever one is configured (URL or credentials),
    /// else the request's own (`host_services`, credentials possibly sealed), to an allowed server.
    pub(super) async fn host_services_connection(&self, v: &Validated) -> anyhow::Result<Option<async_nats::Client>> {
        if !workload_type::is_function(&v.workload_type) {
            return Ok(None);
        }
        let hs = &self.cfg.host_services;
        let conf = if hs.has_connection() {
            nex_api::control::NatsConnectionConfig {
                nats_url: if hs.nats_url.is_empty() { self.control_url.clone() } else { hs.nats_url.clone() },
                nats_user_jwt: Some(hs.nats_user_jwt.clone()).filter(|s| !s.is_empty()),
                nats_user_seed: Some(hs.nats_user_seed.clone()).filter(|s| !s.is_empty()),
            }
        } else {
            match &v.request.host_services {
                Some(o) if !o.nats_url.is_empty() || o.nats_user_seed.is_some() => {
                    let mut o = o.clone();
                    if o.nats_url.is_empty() {
                        o.nats_url = self.control_url.clone();
                    }
                    self.targets.check(&o.nats_url).await.map_err(anyhow::Error::msg)?;
                    o
                }
                _ => return Ok(None),
            }
        };
        Ok(Some(crate::node::connect_workload_nats(&conf, "nex-hostservices").await?))
    }

    /// `urls` as a workload of agent `agent_id` must dial them: in a sandboxed tier only allowed
    /// NATS servers, each through a relay that serves this agent alone.
    pub(super) async fn sandbox_nats_url(&self, agent_id: &str, urls: &str) -> Result<String, String> {
        let tier = self.pool.tier();
        if !tier.sandboxed() {
            return Ok(urls.to_string());
        }
        // In egress mode a workload dials servers beyond the host itself; only the host's own
        // (loopback, its addresses) need a relay, and the relay policy.
        let egress = tier.bridge().is_some_and(|b| b.options().egress);
        let relayed: Vec<String> = crate::tiers::net::nats_url_targets(urls)
            .into_iter()
            .filter(|hp| {
                !egress
                    || crate::nats_targets::split_host_port(hp)
                        .is_none_or(|(h, _)| crate::tiers::net::is_host_local(&h))
            })
            .collect();
        if relayed.is_empty() {
            return Ok(urls.to_string());
        }
        let targets = self.targets.check(&relayed.join(",")).await?;
        tier.workload_nats_url(agent_id, urls, &targets)
            .await
            .map_err(|e| format!("cannot reach it from the sandbox: {e:#}"))
    }

    /// Forwards the request's `ports` to agent `agent_id` in a sandboxed tier (in the process
    /// tier the workload binds its ports on the host itself).
    pub(super) async fn forward_ports(&self, v: &Validated, agent_id: &str) -> Result<(), super::DeployError> {
        let mut maps: Vec<nex_api::control::PortMapping> = Vec::new();
        for p in &v.request.ports {
            let m = nex_api::control::PortMapping::parse(p)
                .map_err(|e| super::DeployError::Invalid(format!("ports: {e}")))?;
            if maps.iter().any(|o| o.host == m.host) {
                return Err(super::DeployError::Invalid(format!("ports: host port {} is named twice", m.host)));
            }
            maps.push(m);
        }
        match self.pool.tier().bridge() {
            Some(b) if !maps.is_empty() => {
                b.forward_ports(agent_id, &maps).await.map_err(|e| super::DeployError::Deploy(format!("ports: {e}")))
            }
            _ => Ok(()),
        }
    }

    /// How a function's agent can hold its own trigger subscriptions, or `None` when the node
    /// must relay them (the user's NATS needs the node's credentials, or the tier cannot reach it).
    /// The agent then answers requesters itself: two hops fewer per call.
    pub(super) async fn direct_triggers(
        &self,
        v: &Validated,
        agent_id: &str,
    ) -> Option<nex_api::agent::DirectTriggers> {
        if !workload_type::is_function(&v.workload_type) || !self.cfg.agent_triggers {
            return None;
        }
        let mut connection = match &v.request.trigger_connection {
            Some(tc) if !tc.nats_url.is_empty() => tc.clone(),
            _ => nex_api::control::NatsConnectionConfig {
                nats_url: self.agent_triggers_url.clone()?,
                ..Default::default()
            },
        };
        connection.nats_url = self.sandbox_nats_url(agent_id, &connection.nats_url).await.ok()?;
        Some(nex_api::agent::DirectTriggers {
            connection,
            queue_group: crate::triggers::queue_group(&v.namespace, &v.claims.sub, &v.claims.iss),
            traces: crate::traces::enabled(),
        })
    }
}
