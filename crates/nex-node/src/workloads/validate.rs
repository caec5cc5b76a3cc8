//! The DEPLOY checks that need no NATS: namespace, request shape, type, triggers, environment,
//! JWT, binding, freshness, issuer, hash claim and replay, in the order of `docs/protocol.md`
//! (lame duck and capacity are taken as a reservation before these run). Pure: unit-tested here.

use std::collections::BTreeMap;

use nex_api::control::DeployRequest;
use nex_api::jwt::WorkloadClaims;
use nex_api::workload_type;

use super::error::DeployError;
use crate::config::NodeConfig;
use crate::replay::ReplayGuard;

/// A deploy request that passed validation. Its `request` carries the effective host-services
/// and trigger connections (credentials from the sealed environment merged in); `Debug` shows
/// no environment values.
#[derive(Clone)]
pub(super) struct Validated {
    pub namespace: String,
    pub request: DeployRequest,
    pub claims: WorkloadClaims,
    pub environment: BTreeMap<String, String>,
    pub workload_type: String,
    /// The artifact's SHA-256 the JWT pins (`None` for autostart workloads, signed by the node).
    pub expected_hash: Option<String>,
    pub retry_count: u32,
    /// The restart chain of an essential workload.
    pub chain: Option<u64>,
}

impl std::fmt::Debug for Validated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validated")
            .field("namespace", &self.namespace)
            .field("name", &self.claims.sub)
            .field("workload_type", &self.workload_type)
            .field("environment", &nex_api::env::redacted(&self.environment))
            .field("retry_count", &self.retry_count)
            .finish_non_exhaustive()
    }
}

/// What the checks need of the node.
pub(super) struct Checks<'a> {
    pub cfg: &'a NodeConfig,
    pub node_id: &'a str,
    pub xkey: &'a nkeys::XKey,
    pub replay: &'a ReplayGuard,
    /// Server of sealed credentials that name no URL (the control connection's).
    pub default_url: &'a str,
}

/// The namespace token of a DEPLOY subject, checked.
pub(super) fn namespace(ns: Option<&str>) -> Result<String, DeployError> {
    let ns = match ns {
        Some(n) if !n.is_empty() => n,
        _ => return Err(DeployError::NoNamespace),
    };
    match nex_api::subjects::namespace_problem(ns) {
        Some(why) => Err(DeployError::BadNamespace(why)),
        None => Ok(ns.to_string()),
    }
}

impl Checks<'_> {
    /// Every check from the body's shape to the replay record; the token's `jti` is recorded
    /// last, so a request refused earlier may be sent again.
    pub fn run(&self, ns: String, body: &[u8]) -> Result<Validated, DeployError> {
        let mut req: DeployRequest = serde_json::from_slice(body).map_err(|e| DeployError::Malformed(e.to_string()))?;
        // One captured on its way to another node is refused here.
        if req.target_node != self.node_id {
            return Err(DeployError::Invalid(if req.target_node.is_empty() {
                "the request names no target_node (it must be this node's id)".into()
            } else {
                format!("the request is for node {}, not this node", req.target_node)
            }));
        }
        let wt = self.check_type_and_triggers(&req)?;
        let mut environment = nex_api::env::open(&req.environment, self.xkey, &req.sender_public_key)
            .map_err(|e| DeployError::Environment(e.to_string()))?;
        merge_sealed_credentials(&mut req, &mut environment, self.default_url);
        let claims = self.check_claims(&req, &ns)?;
        // The JWT must pin the artifact's hash.
        let expected_hash = match claims.nats.hash.as_deref().map(str::trim) {
            Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
            _ => {
                return Err(DeployError::Invalid(
                    "workload JWT carries no artifact hash claim (nats.hash must be the SHA-256 of the artifact)"
                        .into(),
                ))
            }
        };
        // Each token is accepted once, also across restarts.
        self.replay
            .accept(&claims.jti, claims.replay_window_end(self.cfg.deploy_max_age))
            .map_err(|e| DeployError::Invalid(e.to_string()))?;
        Ok(Validated {
            namespace: ns,
            workload_type: wt,
            environment,
            claims,
            expected_hash: Some(expected_hash),
            retry_count: req.retry_count.unwrap_or(0),
            request: req,
            chain: None,
        })
    }

    /// Type, trigger subjects and the function/essential rules; the canonical type.
    pub(super) fn check_type_and_triggers(&self, req: &DeployRequest) -> Result<String, DeployError> {
        let wt = workload_type::canonical(&req.workload_type);
        if !self.cfg.workload_types.contains(&wt) {
            return Err(DeployError::UnsupportedType(req.workload_type.clone()));
        }
        if !req.trigger_subjects.is_empty() && !workload_type::is_function(&wt) {
            return Err(DeployError::TriggersOnService(req.workload_type.clone()));
        }
        for s in &req.trigger_subjects {
            if !nex_api::subjects::is_valid_subscribe_subject(s) {
                return Err(DeployError::DeniedTrigger { subject: s.clone(), why: "it is not a valid subject".into() });
            }
            if let Some(d) = self.cfg.denied_trigger(s) {
                return Err(DeployError::DeniedTrigger { subject: s.clone(), why: d.to_string() });
            }
        }
        if workload_type::is_function(&wt) && req.trigger_subjects.is_empty() {
            return Err(DeployError::Deploy(format!(
                "at least one trigger subject is required for this workload type ({wt})"
            )));
        }
        if req.essential && wt != workload_type::NATIVE {
            return Err(DeployError::Deploy(format!("essential flag is not supported for workload type {wt}")));
        }
        Ok(wt)
    }

    /// The workload JWT: signature, name, freshness, binding, issuer.
    fn check_claims(&self, req: &DeployRequest, ns: &str) -> Result<WorkloadClaims, DeployError> {
        let claims = WorkloadClaims::decode(&req.workload_jwt).map_err(|e| DeployError::Jwt(e.to_string()))?;
        if !nex_api::jwt::is_valid_workload_name(&claims.sub) {
            return Err(DeployError::BadName(claims.sub));
        }
        crate::trust::check_fresh(self.cfg, &claims).map_err(DeployError::Claims)?;
        crate::trust::check_binding(&claims, ns, self.node_id, None).map_err(DeployError::Invalid)?;
        if !self.cfg.valid_issuers.is_empty() && !self.cfg.valid_issuers.contains(&claims.iss) {
            return Err(DeployError::Issuer(claims.iss));
        }
        Ok(claims)
    }
}

/// Moves NATS credentials sealed in the environment into the request's connection settings
/// (they win over the clear fields), so the workload never sees them in its environment.
/// Credentials without a URL are for `default_url` (the node's control connection's server).
pub(super) fn merge_sealed_credentials(req: &mut DeployRequest, env: &mut BTreeMap<String, String>, default_url: &str) {
    use nex_api::env::sealed;
    let creds = nex_api::env::take_sealed_credentials(env);
    let merge = |slot: &mut Option<nex_api::control::NatsConnectionConfig>, jwt_key: &str, seed_key: &str| {
        let (jwt, seed) = (creds.get(jwt_key), creds.get(seed_key));
        if jwt.is_none() && seed.is_none() {
            return;
        }
        let c = slot.get_or_insert_with(Default::default);
        if let Some(j) = jwt {
            c.nats_user_jwt = Some(j.clone());
        }
        if let Some(s) = seed {
            c.nats_user_seed = Some(s.as_str().into());
        }
        if c.nats_url.is_empty() {
            c.nats_url = default_url.to_string();
        }
    };
    merge(&mut req.host_services, sealed::HOST_SERVICES_USER_JWT, sealed::HOST_SERVICES_USER_SEED);
    merge(&mut req.trigger_connection, sealed::TRIGGER_USER_JWT, sealed::TRIGGER_USER_SEED);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Node {
        cfg: NodeConfig,
        id: String,
        xkey: nkeys::XKey,
        replay: ReplayGuard,
        _dir: tempfile::TempDir,
    }

    fn node(cfg: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        Node {
            cfg: NodeConfig::from_json(cfg).unwrap(),
            id: nkeys::KeyPair::new_server().public_key(),
            xkey: nkeys::XKey::new(),
            replay: ReplayGuard::open(dir.path()).unwrap(),
            _dir: dir,
        }
    }

    impl Node {
        fn checks(&self) -> Checks<'_> {
            Checks {
                cfg: &self.cfg,
                node_id: &self.id,
                xkey: &self.xkey,
                replay: &self.replay,
                default_url: "nats://c",
            }
        }

        fn request(&self, issuer: &nkeys::KeyPair, f: impl FnOnce(&mut WorkloadClaims, &mut DeployRequest)) -> Vec<u8> {
            let mut claims = WorkloadClaims::new("svc", Some(&"ab".repeat(32)));
            let mut req = DeployRequest {
                workload_type: "native".into(),
                location: "nats://B/k".into(),
                target_node: self.id.clone(),
                ..Default::default()
            };
            f(&mut claims, &mut req);
            req.workload_jwt = claims.encode(issuer).unwrap();
            serde_json::to_vec(&req).unwrap()
        }
    }

    #[test]
    fn each_check_answers_with_its_text_and_a_good_request_passes_once() {
        let n = node(r#"{"workload_types":["native","wasm"],"deny_trigger_subjects":["secret.>"]}"#);
        let issuer = nkeys::KeyPair::new_account();
        let check = |body: Vec<u8>| n.checks().run("default".into(), &body).map(|_| ()).unwrap_err().to_string();
        assert!(check(b"{".to_vec()).starts_with("Unable to deserialize deploy request:"));
        assert!(check(n.request(&issuer, |_, r| r.target_node = "Nother".into())).contains("not this node"));
        assert_eq!(
            check(n.request(&issuer, |_, r| r.workload_type = "v8".into())),
            "Unsupported workload type on this node: v8"
        );
        assert_eq!(
            check(n.request(&issuer, |_, r| r.trigger_subjects = vec!["a".into()])),
            "Unsupported workload type for trigger subject registration: native"
        );
        let wasm = |s: &str| {
            let s = s.to_string();
            n.request(&issuer, move |_, r| {
                r.workload_type = "wasm".into();
                r.trigger_subjects = vec![s];
            })
        };
        assert_eq!(
            check(wasm("secret.x")),
            "The trigger subject secret.x overlaps with subject(s) in this node's deny list: secret.>"
        );
        assert!(check(wasm("$KV.x.>")).ends_with("deny list: $KV.>"));
        assert!(
            check(n.request(&issuer, |_, r| r.environment = "!!".into())).starts_with("Failed to decrypt environment")
        );
        assert!(check(n.request(&issuer, |c, _| c.sub = "a.b".into())).contains("does not match requirements"));
        assert!(check(n.request(&issuer, |c, _| c.iat -= 3600)).contains("sign a fresh one"));
        assert!(check(n.request(&issuer, |c, _| c.nex.namespace = Some("other".into()))).contains("namespace"));
        assert!(check(n.request(&issuer, |c, _| c.nats.hash = None)).contains("no artifact hash claim"));
        let good = n.request(&issuer, |_, _| {});
        let v = n.checks().run("default".into(), &good).unwrap();
        assert_eq!(v.workload_type, "native");
        assert!(check(good).contains("replay detected"));
    }

    #[test]
    fn valid_issuers_and_namespaces() {
        let allowed = nkeys::KeyPair::new_account();
        let n = node(&format!(r#"{{"valid_issuers":["{}"]}}"#, allowed.public_key()));
        let stranger = nkeys::KeyPair::new_account();
        let e = n.checks().run("default".into(), &n.request(&stranger, |_, _| {})).unwrap_err();
        assert_eq!(e, DeployError::Issuer(stranger.public_key()));
        assert!(n.checks().run("default".into(), &n.request(&allowed, |_, _| {})).is_ok());
        assert_eq!(namespace(None), Err(DeployError::NoNamespace));
        assert!(matches!(namespace(Some("system")), Err(DeployError::BadNamespace(_))));
        assert_eq!(namespace(Some("team")), Ok("team".into()));
    }
}
