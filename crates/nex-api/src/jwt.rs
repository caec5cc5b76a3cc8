//! Workload JWTs: NATS v2 "generic claims" signed with an issuer (account) nkey, `alg: ed25519-nkey`.
//!
//! Small enough to write here: base64url segments, an Ed25519 signature over `header.payload`
//! verified against the `iss` public key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nkeys::KeyPair;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a token could not be decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum JwtError {
    /// Not three dot-separated base64url segments.
    #[error("malformed token: expected header.payload.signature")]
    Malformed,
    /// A segment is not valid base64url or JSON.
    #[error("malformed token {0}: {1}")]
    BadSegment(&'static str, String),
    /// Header `alg` is not ed25519-nkey.
    #[error("unsupported algorithm {0:?}")]
    Algorithm(String),
    /// `iss` is not a public nkey.
    #[error("issuer {0:?} is not a valid public nkey")]
    Issuer(String),
    /// The signature does not verify against `iss`.
    #[error("signature verification failed")]
    Signature,
    /// Signing failed.
    #[error("could not sign token: {0}")]
    Sign(String),
}

/// The `nats` section of generic claims.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NatsClaims {
    /// Lowercase hex SHA-256 of the artifact; a node refuses an artifact with another digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Always `generic` for workload claims.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub claim_type: Option<String>,
    /// Claims format version (2).
    #[serde(default)]
    pub version: u32,
    /// Anything else a client put there.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// nex's own claims (top-level `nex` object; other NATS JWT readers ignore it). Each one, when
/// present, binds the token to one use: a node refuses a token whose `nex` claims name another
/// namespace, node, workload or operation than the request it arrived with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NexClaims {
    /// The namespace the DEPLOY or STOP is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The node the request is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// The workload a STOP is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_id: Option<String>,
    /// The operator command a token authorises (`lameduck`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// LAMEDUCK: drain and exit after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// A deployment revision: the SHA-256 of the spec it pins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_digest: Option<String>,
    /// A deployment revision: the bucket revision it replaces (0 for the first), so an old
    /// revision put back into the bucket is told apart from a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<u64>,
}

impl NexClaims {
    fn is_empty(&self) -> bool {
        *self == NexClaims::default()
    }
}

/// Claims of a workload JWT (deploy and stop).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkloadClaims {
    #[serde(default)]
    pub jti: String,
    #[serde(default)]
    pub iat: i64,
    #[serde(default)]
    pub iss: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The workload name.
    #[serde(default)]
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default)]
    pub nats: NatsClaims,
    /// nex's binding claims.
    #[serde(default, skip_serializing_if = "NexClaims::is_empty")]
    pub nex: NexClaims,
}

#[derive(Serialize, Deserialize)]
struct Header {
    typ: String,
    alg: String,
}

impl WorkloadClaims {
    /// Fresh claims for workload `name`, carrying the artifact `hash` when known.
    pub fn new(name: &str, hash: Option<&str>) -> Self {
        WorkloadClaims {
            iat: chrono::Utc::now().timestamp(),
            sub: name.to_string(),
            name: Some(name.to_string()),
            nats: NatsClaims {
                hash: hash.map(str::to_string),
                claim_type: Some("generic".into()),
                version: 2,
                extra: Default::default(),
            },
            ..Default::default()
        }
    }

    /// Signs the claims with `issuer` (an account key pair) and returns the token.
    ///
    /// `iss` is set from the key and `jti` to a fresh unique id.
    pub fn encode(mut self, issuer: &KeyPair) -> Result<String, JwtError> {
        self.iss = issuer.public_key();
        self.jti.clear();
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self).map_err(|e| JwtError::Sign(e.to_string()))?);
        h.update(rand::random::<[u8; 16]>());
        self.jti = data_encoding::BASE32_NOPAD.encode(&h.finalize());
        let header = Header { typ: "JWT".into(), alg: "ed25519-nkey".into() };
        let head = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default());
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&self).map_err(|e| JwtError::Sign(e.to_string()))?);
        let signing_input = format!("{head}.{body}");
        let sig = issuer.sign(signing_input.as_bytes()).map_err(|e| JwtError::Sign(e.to_string()))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }

    /// Decodes `token` and verifies its signature against its `iss`.
    pub fn decode(token: &str) -> Result<Self, JwtError> {
        let mut parts = token.trim().split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(JwtError::Malformed);
        };
        let header: Header = decode_json(h, "header")?;
        if !header.alg.eq_ignore_ascii_case("ed25519-nkey") && !header.alg.eq_ignore_ascii_case("ed25519") {
            return Err(JwtError::Algorithm(header.alg));
        }
        let claims: WorkloadClaims = decode_json(p, "payload")?;
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|e| JwtError::BadSegment("signature", e.to_string()))?;
        let key = KeyPair::from_public_key(&claims.iss).map_err(|_| JwtError::Issuer(claims.iss.clone()))?;
        let signing_input = &token.trim()[..h.len() + 1 + p.len()];
        key.verify(signing_input.as_bytes(), &sig).map_err(|_| JwtError::Signature)?;
        Ok(claims)
    }

    /// Checks that the token was issued within `max_age_secs` before `now` (and not more than a
    /// minute of clock skew after it); the reason when it was not.
    pub fn check_fresh(&self, now: i64, max_age_secs: u64) -> Result<(), String> {
        if self.iat <= 0 {
            return Err("the token has no issued-at time (iat)".into());
        }
        if self.iat > now + CLOCK_SKEW_SECS {
            return Err(format!(
                "the token was issued in the future ({}): check the signer's clock",
                rfc3339(self.iat)
            ));
        }
        let age = now.saturating_sub(self.iat);
        if age > max_age_secs as i64 {
            return Err(format!(
                "the token was issued at {}, {age}s ago, and this node accepts tokens for {max_age_secs}s: sign a fresh one",
                rfc3339(self.iat)
            ));
        }
        Ok(())
    }

    /// Until when (unix seconds) a node must remember this token's `jti` so that a replay is
    /// refused: the end of its freshness window, or its expiry when that comes first.
    pub fn replay_window_end(&self, max_age_secs: u64) -> i64 {
        let fresh_until = self.iat.max(0).saturating_add(max_age_secs as i64 + CLOCK_SKEW_SECS);
        match self.exp {
            Some(e) if e > 0 => fresh_until.min(e),
            _ => fresh_until,
        }
    }

    /// Checks `exp` and `nbf` against `now` (unix seconds); the reason when invalid.
    pub fn check_time(&self, now: i64) -> Result<(), String> {
        if let Some(exp) = self.exp {
            if exp > 0 && now >= exp {
                return Err(format!("token expired at {}", rfc3339(exp)));
            }
        }
        if let Some(nbf) = self.nbf {
            if nbf > 0 && now < nbf {
                return Err(format!("token not valid before {}", rfc3339(nbf)));
            }
        }
        Ok(())
    }
}

/// Clock skew tolerated between a token's signer and the node.
pub const CLOCK_SKEW_SECS: i64 = 60;

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map(|t| t.to_rfc3339()).unwrap_or_else(|| secs.to_string())
}

fn decode_json<T: serde::de::DeserializeOwned>(seg: &str, what: &'static str) -> Result<T, JwtError> {
    let bytes =
        URL_SAFE_NO_PAD.decode(seg.trim_end_matches('=')).map_err(|e| JwtError::BadSegment(what, e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| JwtError::BadSegment(what, e.to_string()))
}

/// True when `name` matches `^[a-zA-Z0-9_-]+$`.
pub fn is_valid_workload_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let issuer = KeyPair::new_account();
        let tok = WorkloadClaims::new("echo", Some("abcd")).encode(&issuer).unwrap();
        let c = WorkloadClaims::decode(&tok).unwrap();
        assert_eq!(c.sub, "echo");
        assert_eq!(c.iss, issuer.public_key());
        assert_eq!(c.nats.hash.as_deref(), Some("abcd"));
        assert!(!c.jti.is_empty());

        // Change the payload: signature must fail.
        let parts: Vec<&str> = tok.split('.').collect();
        let mut claims = c.clone();
        claims.sub = "other".into();
        let forged =
            format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap()), parts[2]);
        assert_eq!(WorkloadClaims::decode(&forged), Err(JwtError::Signature));
        assert_eq!(WorkloadClaims::decode("a.b"), Err(JwtError::Malformed));
    }

    #[test]
    fn two_tokens_have_distinct_jti() {
        let issuer = KeyPair::new_account();
        let a = WorkloadClaims::decode(&WorkloadClaims::new("x", None).encode(&issuer).unwrap()).unwrap();
        let b = WorkloadClaims::decode(&WorkloadClaims::new("x", None).encode(&issuer).unwrap()).unwrap();
        assert_ne!(a.jti, b.jti);
    }

    #[test]
    fn expiry() {
        let mut c = WorkloadClaims::new("x", None);
        c.exp = Some(100);
        assert!(c.check_time(99).is_ok());
        assert!(c.check_time(100).unwrap_err().contains("expired"));
    }

    #[test]
    fn freshness_window() {
        let mut c = WorkloadClaims::new("x", None);
        c.iat = 1_000_000;
        assert!(c.check_fresh(1_000_000 + 600, 600).is_ok());
        assert!(c.check_fresh(1_000_000 + 601, 600).unwrap_err().contains("601s ago"));
        assert!(c.check_fresh(1_000_000 - 120, 600).unwrap_err().contains("future"));
        assert_eq!(c.replay_window_end(600), 1_000_000 + 600 + CLOCK_SKEW_SECS);
        c.exp = Some(1_000_010);
        assert_eq!(c.replay_window_end(600), 1_000_010);
        c.iat = 0;
        assert!(c.check_fresh(5, 600).is_err());
    }

    #[test]
    fn nex_claims_travel_signed_and_are_omitted_when_empty() {
        let issuer = KeyPair::new_account();
        let plain = WorkloadClaims::new("x", None).encode(&issuer).unwrap();
        let payload = URL_SAFE_NO_PAD.decode(plain.split('.').nth(1).unwrap()).unwrap();
        assert!(!String::from_utf8_lossy(&payload).contains("\"nex\""));
        let mut c = WorkloadClaims::new("x", None);
        c.nex.namespace = Some("team".into());
        c.nex.target_node = Some("Nxyz".into());
        let d = WorkloadClaims::decode(&c.encode(&issuer).unwrap()).unwrap();
        assert_eq!(d.nex.namespace.as_deref(), Some("team"));
        assert_eq!(d.nex.target_node.as_deref(), Some("Nxyz"));
    }

    #[test]
    fn names() {
        assert!(is_valid_workload_name("echo_service-1"));
        assert!(!is_valid_workload_name("echo.service"));
        assert!(!is_valid_workload_name(""));
    }
}
