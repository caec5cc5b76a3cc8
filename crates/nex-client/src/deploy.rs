//! Building signed DEPLOY and STOP requests.

use std::collections::BTreeMap;

use base64::Engine;
use nkeys::{KeyPair, XKey};

use nex_api::control::{DeployRequest, NatsConnectionConfig, StopRequest};
use nex_api::jwt::WorkloadClaims;

/// Everything needed to deploy one workload.
#[derive(Debug, Clone, Default)]
pub struct DeployBuilder {
    /// Workload name (JWT `sub`).
    pub name: String,
    /// Wire type (`native`, `v8`, `wasm`).
    pub workload_type: String,
    /// `nats://BUCKET/key`.
    pub location: String,
    /// Lowercase hex SHA-256 of the artifact.
    pub hash: String,
    /// Environment, sealed to the node.
    pub environment: BTreeMap<String, String>,
    /// Arguments.
    pub argv: Vec<String>,
    /// Trigger subjects (functions).
    pub trigger_subjects: Vec<String>,
    /// Restart on non-zero exit.
    pub essential: bool,
    /// Free text.
    pub description: Option<String>,
    /// JetStream domain of the artifact's bucket.
    pub jsdomain: Option<String>,
    /// Host-services connection override. Its JWT and seed travel sealed in the environment
    /// (`nex_api::env::sealed`), never in clear.
    pub host_services: Option<NatsConnectionConfig>,
    /// Connection for the trigger subscriptions (functions); credentials sealed as above.
    pub trigger_connection: Option<NatsConnectionConfig>,
    /// Namespace the request is for; signed into the JWT (`nex.namespace`) so that the request
    /// cannot be replayed into another namespace.
    pub namespace: Option<String>,
    /// Host ports forwarded to the workload (`HOST:WORKLOAD`), where the node's tier can.
    pub ports: Vec<String>,
}

impl DeployBuilder {
    /// Signs with `issuer`, seals the environment from `sender` to `node_xkey`, targets `node`.
    ///
    /// The JWT names the node and the namespace (`nex.target_node`, `nex.namespace`), so the node
    /// refuses it anywhere else; connection credentials move into the sealed environment.
    pub fn build(&self, issuer: &KeyPair, sender: &XKey, node: &str, node_xkey: &str) -> anyhow::Result<DeployRequest> {
        let mut claims = WorkloadClaims::new(&self.name, Some(&self.hash));
        claims.nex.target_node = Some(node.to_string());
        claims.nex.namespace = self.namespace.clone();
        let jwt = claims.encode(issuer)?;
        let mut env = self.environment.clone();
        let host_services = self.host_services.clone().map(|c| seal_credentials(c, &mut env, HS_KEYS));
        let trigger_connection = self.trigger_connection.clone().map(|c| seal_credentials(c, &mut env, TRIGGER_KEYS));
        let environment = nex_api::env::seal(&env, sender, node_xkey)?;
        Ok(DeployRequest {
            argv: self.argv.clone(),
            description: self.description.clone(),
            workload_type: self.workload_type.clone(),
            location: self.location.clone(),
            essential: self.essential,
            workload_jwt: jwt,
            environment,
            jsdomain: self.jsdomain.clone(),
            sender_public_key: sender.public_key(),
            target_node: node.to_string(),
            trigger_subjects: self.trigger_subjects.clone(),
            trigger_connection,
            retry_count: None,
            retried_at: None,
            host_services,
            ports: self.ports.clone(),
        })
    }
}

const HS_KEYS: (&str, &str) =
    (nex_api::env::sealed::HOST_SERVICES_USER_JWT, nex_api::env::sealed::HOST_SERVICES_USER_SEED);
const TRIGGER_KEYS: (&str, &str) = (nex_api::env::sealed::TRIGGER_USER_JWT, nex_api::env::sealed::TRIGGER_USER_SEED);

/// Moves a connection's JWT and seed into `env` (sealed with it); the URL stays in clear.
fn seal_credentials(
    mut c: NatsConnectionConfig,
    env: &mut BTreeMap<String, String>,
    (jwt_key, seed_key): (&str, &str),
) -> NatsConnectionConfig {
    if let Some(jwt) = c.nats_user_jwt.take().filter(|j| !j.is_empty()) {
        env.insert(jwt_key.to_string(), jwt);
    }
    if let Some(seed) = c.nats_user_seed.take().filter(|s| !s.is_empty()) {
        env.insert(seed_key.to_string(), seed.expose().to_string());
    }
    c
}

/// A STOP for workload `id` named `name` in namespace `ns`, signed by the issuer that deployed
/// it; the JWT names the node, namespace and workload, so it stops nothing else.
pub fn stop_request(issuer: &KeyPair, ns: &str, node: &str, id: &str, name: &str) -> anyhow::Result<StopRequest> {
    let mut claims = WorkloadClaims::new(name, None);
    claims.nex.namespace = Some(ns.to_string());
    claims.nex.target_node = Some(node.to_string());
    claims.nex.workload_id = Some(id.to_string());
    Ok(StopRequest { workload_id: id.to_string(), workload_jwt: claims.encode(issuer)?, target_node: node.to_string() })
}

/// A LAMEDUCK body `{"jwt": …}` signed by an admin issuer for `node`, draining after `delay`.
pub fn lameduck_request(
    issuer: &KeyPair,
    node: &str,
    delay: Option<std::time::Duration>,
) -> anyhow::Result<nex_api::control::LameDuckRequest> {
    let mut claims = WorkloadClaims::new(node, None);
    claims.nats.claim_type = Some("generic".into());
    claims.nex.op = Some(nex_api::control::LAMEDUCK_OP.into());
    claims.nex.target_node = Some(node.to_string());
    claims.nex.delay_ms = delay.map(|d| d.as_millis() as u64);
    Ok(nex_api::control::LameDuckRequest { delay_ms: None, jwt: Some(claims.encode(issuer)?) })
}

/// Converts an object-store digest (`SHA-256=<base64url>`) to lowercase hex.
pub fn artifact_hash_from_digest(digest: &str) -> Option<String> {
    let b64 = digest.strip_prefix("SHA-256=")?;
    let raw = base64::engine::general_purpose::URL_SAFE
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64.trim_end_matches('=')))
        .ok()?;
    Some(nex_api::jwt::hex(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_to_hex() {
        // SHA-256 of "hello".
        let hex = nex_api::jwt::sha256_hex(b"hello");
        let raw: Vec<u8> =
            (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
        let digest = format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(raw));
        assert_eq!(artifact_hash_from_digest(&digest).unwrap(), hex);
        assert!(artifact_hash_from_digest("MD5=xx").is_none());
    }

    #[test]
    fn deploy_request_opens_on_the_node() {
        let issuer = KeyPair::new_account();
        let sender = XKey::new();
        let node = XKey::new();
        let mut b = DeployBuilder {
            name: "echo".into(),
            workload_type: "native".into(),
            location: "nats://B/echo".into(),
            hash: "ab".into(),
            ..Default::default()
        };
        b.environment.insert("NATS_URL".into(), "nats://x".into());
        b.environment.insert("TOP_SECRET_LUGGAGE".into(), "12345".into());
        b.namespace = Some("team".into());
        b.host_services = Some(NatsConnectionConfig {
            nats_url: "nats://hs:4222".into(),
            nats_user_jwt: Some("eyJjwt".into()),
            nats_user_seed: Some("SUAseed".into()),
        });
        let r = b.build(&issuer, &sender, "Nnode", &node.public_key()).unwrap();
        let mut env = nex_api::env::open(&r.environment, &node, &r.sender_public_key).unwrap();
        // The credentials are sealed, not in the clear fields.
        let hs = r.host_services.clone().unwrap();
        assert_eq!(hs.nats_url, "nats://hs:4222");
        assert!(hs.nats_user_jwt.is_none() && hs.nats_user_seed.is_none());
        assert!(!serde_json::to_string(&r).unwrap().contains("SUAseed"));
        let creds = nex_api::env::take_sealed_credentials(&mut env);
        assert_eq!(creds[nex_api::env::sealed::HOST_SERVICES_USER_SEED], "SUAseed");
        assert_eq!(env, b.environment);
        let c = WorkloadClaims::decode(&r.workload_jwt).unwrap();
        assert_eq!(c.sub, "echo");
        assert_eq!(c.nats.hash.as_deref(), Some("ab"));
        assert_eq!(c.nex.namespace.as_deref(), Some("team"));
        assert_eq!(c.nex.target_node.as_deref(), Some("Nnode"));
    }
}
