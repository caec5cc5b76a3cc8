//! Who may ask this node for what: the binding and freshness of DEPLOY and STOP tokens, and the
//! signature operator commands (LAMEDUCK) need once the node restricts issuers.
//!
//! Any NATS user who can publish on `$NEX.>` is assumed hostile. A token is bound to one node,
//! one namespace (and, for STOP, one workload) by its optional `nex` claims, is accepted only
//! within `deploy_max_age` of its `iat`, and only once (its `jti` is remembered by
//! [`crate::replay::ReplayGuard`]).

use nex_api::control::{LameDuckRequest, LAMEDUCK_OP};
use nex_api::jwt::WorkloadClaims;

use crate::config::NodeConfig;
use crate::replay::ReplayGuard;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Checks the `nex` binding claims of a DEPLOY or STOP token against the request they came with.
pub fn check_binding(
    claims: &WorkloadClaims,
    ns: &str,
    node_id: &str,
    workload_id: Option<&str>,
) -> Result<(), String> {
    let n = &claims.nex;
    if let Some(want) = n.namespace.as_deref() {
        if !want.eq_ignore_ascii_case(ns) {
            return Err(format!("the token is for namespace {want:?}, not {ns:?}"));
        }
    }
    if let Some(want) = n.target_node.as_deref() {
        if want != node_id {
            return Err(format!("the token is for node {want}, not this node"));
        }
    }
    if let (Some(want), Some(id)) = (n.workload_id.as_deref(), workload_id) {
        if want != id {
            return Err(format!("the token is for workload {want}, not {id}"));
        }
    }
    if n.op.is_some() {
        return Err("the token is an operator command, not a workload token".into());
    }
    Ok(())
}

/// Checks a token's freshness against `deploy_max_age`.
pub fn check_fresh(cfg: &NodeConfig, claims: &WorkloadClaims) -> Result<(), String> {
    claims.check_time(now())?;
    claims.check_fresh(now(), cfg.deploy_max_age)
}

/// What an authorised LAMEDUCK asks for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LameDuckOrder {
    /// Drain and exit after this many milliseconds.
    pub delay_ms: Option<u64>,
    /// Who signed it (`None` on an open node).
    pub issuer: Option<String>,
}

/// Decides whether a LAMEDUCK body may put node `node_id` into lame duck mode. An open node (no
/// `admin_issuers`, no `valid_issuers`) obeys unsigned requests as Nex does; otherwise the body
/// must be `{"jwt": …}` signed by an operator issuer for this node, fresh and never used before.
pub fn authorize_lameduck(
    cfg: &NodeConfig,
    replay: &ReplayGuard,
    node_id: &str,
    body: &[u8],
) -> Result<LameDuckOrder, String> {
    let req: LameDuckRequest = if body.iter().all(u8::is_ascii_whitespace) {
        LameDuckRequest::default()
    } else {
        serde_json::from_slice(body).map_err(|e| format!("Unable to deserialize lame duck request: {e}"))?
    };
    let issuers = cfg.operator_issuers();
    if issuers.is_empty() {
        return Ok(LameDuckOrder { delay_ms: req.delay_ms, issuer: None });
    }
    let refuse = |why: String| format!("lame duck request refused: {why}");
    let Some(token) = req.jwt.as_deref().filter(|t| !t.trim().is_empty()) else {
        return Err(refuse(
            "this node only obeys operator commands signed by an admin issuer: send {\"jwt\": …} (`nex lameduck NODE --issuer KEY`)".into(),
        ));
    };
    let claims = WorkloadClaims::decode(token).map_err(|e| refuse(format!("could not decode the JWT: {e}")))?;
    if !issuers.contains(&claims.iss) {
        return Err(refuse(format!("issuer {} is not an admin issuer of this node", claims.iss)));
    }
    if claims.sub != node_id {
        return Err(refuse(format!("the token is for node {:?}, not this node", claims.sub)));
    }
    if claims.nats.hash.is_some() || claims.nex.op.as_deref().is_some_and(|op| op != LAMEDUCK_OP) {
        return Err(refuse("the token is not a lame duck command".into()));
    }
    if claims.nex.target_node.as_deref().is_some_and(|t| t != node_id) {
        return Err(refuse("the token is for another node".into()));
    }
    check_fresh(cfg, &claims).map_err(refuse)?;
    replay.accept(&claims.jti, claims.replay_window_end(cfg.deploy_max_age)).map_err(|e| refuse(e.to_string()))?;
    Ok(LameDuckOrder { delay_ms: claims.nex.delay_ms, issuer: Some(claims.iss) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(admin: &[String]) -> (NodeConfig, ReplayGuard, tempfile::TempDir) {
        let cfg = NodeConfig { admin_issuers: admin.to_vec(), ..Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let g = ReplayGuard::open(dir.path()).unwrap();
        (cfg, g, dir)
    }

    fn token(kp: &nkeys::KeyPair, sub: &str, iat_shift: i64) -> Vec<u8> {
        let mut c = WorkloadClaims::new(sub, None);
        c.iat += iat_shift;
        c.nex.op = Some(LAMEDUCK_OP.into());
        c.nex.delay_ms = Some(5);
        serde_json::to_vec(&LameDuckRequest { delay_ms: None, jwt: Some(c.encode(kp).unwrap()) }).unwrap()
    }

    #[test]
    fn an_open_node_obeys_and_a_restricted_one_wants_an_admin_signature() {
        let (cfg, g, _d) = node(&[]);
        assert_eq!(authorize_lameduck(&cfg, &g, "N1", b"").unwrap(), LameDuckOrder::default());
        let admin = nkeys::KeyPair::new_account();
        let stranger = nkeys::KeyPair::new_account();
        let (cfg, g, _d) = node(&[admin.public_key()]);
        assert!(authorize_lameduck(&cfg, &g, "N1", b"").unwrap_err().contains("signed by an admin issuer"));
        let e = authorize_lameduck(&cfg, &g, "N1", &token(&stranger, "N1", 0)).unwrap_err();
        assert!(e.contains("is not an admin issuer"), "{e}");
        let e = authorize_lameduck(&cfg, &g, "N1", &token(&admin, "N2", 0)).unwrap_err();
        assert!(e.contains("not this node"), "{e}");
        let e = authorize_lameduck(&cfg, &g, "N1", &token(&admin, "N1", -86_400)).unwrap_err();
        assert!(e.contains("ago"), "{e}");
        let good = token(&admin, "N1", 0);
        let order = authorize_lameduck(&cfg, &g, "N1", &good).unwrap();
        assert_eq!(order.delay_ms, Some(5));
        assert!(authorize_lameduck(&cfg, &g, "N1", &good).unwrap_err().contains("replay"));
    }

    #[test]
    fn valid_issuers_alone_also_restrict_operator_commands() {
        let issuer = nkeys::KeyPair::new_account();
        let cfg = NodeConfig { valid_issuers: vec![issuer.public_key()], ..Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let g = ReplayGuard::open(dir.path()).unwrap();
        assert!(authorize_lameduck(&cfg, &g, "N1", b"{}").is_err());
        assert!(authorize_lameduck(&cfg, &g, "N1", &token(&issuer, "N1", 0)).is_ok());
    }

    #[test]
    fn bindings() {
        let mut c = WorkloadClaims::new("w", Some("h"));
        c.nex.namespace = Some("team".into());
        c.nex.target_node = Some("N1".into());
        assert!(check_binding(&c, "TEAM", "N1", None).is_ok());
        assert!(check_binding(&c, "other", "N1", None).unwrap_err().contains("namespace"));
        assert!(check_binding(&c, "team", "N2", None).unwrap_err().contains("node"));
        c.nex.workload_id = Some("id1".into());
        assert!(check_binding(&c, "team", "N1", Some("id2")).unwrap_err().contains("workload"));
    }
}
