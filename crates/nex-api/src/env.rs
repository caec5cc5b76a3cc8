//! Workload environments sealed end-to-end from a publisher's xkey to one node's xkey
//! (nkeys `xkv1` box, then standard base64); see `docs/protocol.md`.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use nkeys::XKey;

/// Why an environment could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The sender key is not a curve public key.
    #[error("invalid sender public xkey: {0}")]
    SenderKey(String),
    /// Not standard base64.
    #[error("environment is not valid base64: {0}")]
    Base64(String),
    /// The box did not open (wrong key, tampered bytes, not xkv1).
    #[error("unable to open sealed environment: {0}")]
    Open(String),
    /// The plaintext is not a JSON object of strings.
    #[error("decrypted environment is not a JSON map of strings: {0}")]
    Json(String),
    /// Sealing failed.
    #[error("unable to seal environment: {0}")]
    Seal(String),
}

/// Seals `env` from `sender` to the node whose public xkey is `recipient`.
pub fn seal(env: &BTreeMap<String, String>, sender: &XKey, recipient: &str) -> Result<String, EnvError> {
    let target = XKey::from_public_key(recipient).map_err(|e| EnvError::Seal(format!("target xkey: {e}")))?;
    let plain = serde_json::to_vec(env).map_err(|e| EnvError::Seal(e.to_string()))?;
    let sealed = sender.seal(&plain, &target).map_err(|e| EnvError::Seal(e.to_string()))?;
    Ok(STANDARD.encode(sealed))
}

/// Opens an environment sealed to `node` by `sender_public`. An empty string is an empty map.
pub fn open(sealed_b64: &str, node: &XKey, sender_public: &str) -> Result<BTreeMap<String, String>, EnvError> {
    if sealed_b64.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let sender = XKey::from_public_key(sender_public).map_err(|e| EnvError::SenderKey(e.to_string()))?;
    let sealed = STANDARD.decode(sealed_b64.trim()).map_err(|e| EnvError::Base64(e.to_string()))?;
    let plain = node.open(&sealed, &sender).map_err(|e| EnvError::Open(e.to_string()))?;
    serde_json::from_slice(&plain).map_err(|e| EnvError::Json(e.to_string()))
}

/// Keys of the sealed environment that carry a deploy request's NATS credentials instead of the
/// clear `host_services` / `trigger_connection` fields (our addition; Nex clients keep using the
/// clear fields). The node takes them out of the environment before the workload sees it; a
/// sealed value wins over the clear field.
pub mod sealed {
    /// User JWT of the host-services connection.
    pub const HOST_SERVICES_USER_JWT: &str = "NEX_HOSTSERVICES_USER_JWT";
    /// User nkey seed of the host-services connection.
    pub const HOST_SERVICES_USER_SEED: &str = "NEX_HOSTSERVICES_USER_SEED";
    /// User JWT of the trigger connection.
    pub const TRIGGER_USER_JWT: &str = "NEX_TRIGGER_USER_JWT";
    /// User nkey seed of the trigger connection.
    pub const TRIGGER_USER_SEED: &str = "NEX_TRIGGER_USER_SEED";
    /// Every key above.
    pub const ALL: [&str; 4] = [HOST_SERVICES_USER_JWT, HOST_SERVICES_USER_SEED, TRIGGER_USER_JWT, TRIGGER_USER_SEED];
}

/// Removes the sealed credential keys (any case) from `env` and returns them by canonical key.
pub fn take_sealed_credentials(env: &mut BTreeMap<String, String>) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    for key in sealed::ALL {
        let found: Vec<String> = env.keys().filter(|k| k.eq_ignore_ascii_case(key)).cloned().collect();
        for k in found {
            if let Some(v) = env.remove(&k).filter(|v| !v.is_empty()) {
                out.insert(key, v);
            }
        }
    }
    out
}

/// A map for `Debug` output with every value replaced: environments hold secrets.
pub fn redacted(env: &BTreeMap<String, String>) -> BTreeMap<&str, &'static str> {
    env.keys().map(|k| (k.as_str(), "<redacted>")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_credentials_leave_the_environment() {
        let mut env: BTreeMap<String, String> =
            [("nex_hostservices_user_seed", "SUAX"), ("NEX_TRIGGER_USER_JWT", "eyJ"), ("PLAIN", "1")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let c = take_sealed_credentials(&mut env);
        assert_eq!(c.get(sealed::HOST_SERVICES_USER_SEED).map(String::as_str), Some("SUAX"));
        assert_eq!(c.get(sealed::TRIGGER_USER_JWT).map(String::as_str), Some("eyJ"));
        assert_eq!(env.keys().collect::<Vec<_>>(), vec!["PLAIN"]);
        assert!(!format!("{:?}", redacted(&env)).contains('1'));
    }

    #[test]
    fn seal_open_round_trip_and_wrong_key() {
        let sender = XKey::new();
        let node = XKey::new();
        let mut env = BTreeMap::new();
        env.insert("NATS_URL".to_string(), "nats://127.0.0.1:4222".to_string());
        env.insert("TOP_SECRET_LUGGAGE".to_string(), "12345".to_string());
        let sealed = seal(&env, &sender, &node.public_key()).unwrap();
        assert_eq!(open(&sealed, &node, &sender.public_key()).unwrap(), env);
        let other = XKey::new();
        assert!(matches!(open(&sealed, &other, &sender.public_key()), Err(EnvError::Open(_))));
        assert!(matches!(open("!!!", &node, &sender.public_key()), Err(EnvError::Base64(_))));
        assert!(open("", &node, &sender.public_key()).unwrap().is_empty());
    }
}
