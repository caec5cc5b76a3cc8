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
    /// Host-services connection override.
    pub host_services: Option<NatsConnectionConfig>,
}

impl DeployBuilder {
    /// Signs with `issuer`, seals the environment from `sender` to `node_xkey`, targets `node`.
    pub fn build(&self, issuer: &KeyPair, sender: &XKey, node: &str, node_xkey: &str) -> anyhow::Result<DeployRequest> {
        let jwt = WorkloadClaims::new(&self.name, Some(&self.hash)).encode(issuer)?;
        let environment = nex_api::env::seal(&self.environment, sender, node_xkey)?;
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
            trigger_connection: None,
            retry_count: None,
            retried_at: None,
            host_services: self.host_services.clone(),
        })
    }
}

/// A STOP for workload `id` named `name`, signed by the issuer that deployed it.
pub fn stop_request(issuer: &KeyPair, node: &str, id: &str, name: &str) -> anyhow::Result<StopRequest> {
    Ok(StopRequest {
        workload_id: id.to_string(),
        workload_jwt: WorkloadClaims::new(name, None).encode(issuer)?,
        target_node: node.to_string(),
    })
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
        let r = b.build(&issuer, &sender, "Nnode", &node.public_key()).unwrap();
        let env = nex_api::env::open(&r.environment, &node, &r.sender_public_key).unwrap();
        assert_eq!(env, b.environment);
        let c = WorkloadClaims::decode(&r.workload_jwt).unwrap();
        assert_eq!(c.sub, "echo");
        assert_eq!(c.nats.hash.as_deref(), Some("ab"));
    }
}
