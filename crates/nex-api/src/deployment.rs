//! Deployment specs ("Nexfiles"): replicas of one workload that the nodes keep running, and the
//! keys of the deployments bucket they live under.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The bucket that holds specs, replica slots and node heartbeats.
pub const BUCKET: &str = "NEX_DEPLOYMENTS";

/// Most replicas one deployment may ask for.
pub const MAX_REPLICAS: u32 = 256;

/// A deployment as `nex apply -f` reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// `native`, `wasm`, `v8`, … as in DEPLOY.
    pub workload_type: String,
    pub artifact: Artifact,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// Trigger subjects (functions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<String>,
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default)]
    pub placement: Placement,
    /// Restart a replica whose process exits with an error.
    #[serde(default)]
    pub essential: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default)]
    pub rollout: Rollout,
}

/// Where the workload's artifact is: `nats://BUCKET/key`, pinned by its digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub url: String,
    /// Lowercase hex SHA-256 of the artifact.
    pub sha256: String,
}

/// Which nodes may run the replicas, and how they are spread.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Tags a node must carry, with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Only nodes whose workloads run sandboxed (container, micro-VM), when true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Spread replicas across nodes (the default) or across the values of this tag (`zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
}

/// Per-replica limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

/// How a new revision replaces the replicas of the old one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Replicas that may be down at once during a roll-out.
    #[serde(default)]
    pub max_unavailable: u32,
    /// Replicas that may run beyond `replicas` during a roll-out.
    #[serde(default = "one")]
    pub max_surge: u32,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout { max_unavailable: 0, max_surge: 1 }
    }
}

fn default_namespace() -> String {
    "default".into()
}
fn one() -> u32 {
    1
}

/// Why a spec was refused; each says what to change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("not a deployment spec: {0}")]
    Parse(String),
    #[error("{field} {value:?} is not valid: use letters, digits, '-' and '_'")]
    BadName { field: &'static str, value: String },
    #[error("replicas must be between 1 and {MAX_REPLICAS}, not {0}")]
    Replicas(u32),
    #[error("artifact.url {0:?} is not a nats://BUCKET/key URL")]
    ArtifactUrl(String),
    #[error("artifact.sha256 must be 64 lowercase hex digits (`sha256sum FILE`), not {0:?}")]
    ArtifactDigest(String),
    #[error("{0} workloads are functions and need at least one trigger")]
    NoTriggers(String),
    #[error("trigger {0:?} is not a valid subscription subject")]
    BadTrigger(String),
    #[error("rollout.max_surge and rollout.max_unavailable cannot both be 0: a roll-out could never make progress")]
    StuckRollout,
}

impl Spec {
    /// Reads and checks a spec from JSON.
    pub fn parse(text: &str) -> Result<Spec, SpecError> {
        let spec: Spec = serde_json::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what a node could not fix later.
    pub fn validate(&self) -> Result<(), SpecError> {
        for (field, value) in [("name", &self.name), ("namespace", &self.namespace)] {
            if !crate::jwt::is_valid_workload_name(value) {
                return Err(SpecError::BadName { field, value: value.clone() });
            }
        }
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(SpecError::Replicas(self.replicas));
        }
        if artifact_location(&self.artifact.url).is_none() {
            return Err(SpecError::ArtifactUrl(self.artifact.url.clone()));
        }
        let d = &self.artifact.sha256;
        if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(SpecError::ArtifactDigest(d.clone()));
        }
        if self.workload_type != "native" && self.triggers.is_empty() {
            return Err(SpecError::NoTriggers(self.workload_type.clone()));
        }
        if let Some(t) = self.triggers.iter().find(|t| !crate::subjects::is_valid_subscribe_subject(t)) {
            return Err(SpecError::BadTrigger(t.clone()));
        }
        if self.rollout.max_surge == 0 && self.rollout.max_unavailable == 0 {
            return Err(SpecError::StuckRollout);
        }
        Ok(())
    }

    /// SHA-256 of the spec's canonical JSON (fields in declaration order, maps sorted): what a
    /// revision's JWT pins.
    pub fn digest(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        crate::jwt::sha256_hex(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// The bucket key of this spec.
    pub fn key(&self) -> String {
        spec_key(&self.namespace, &self.name)
    }
}

/// `(bucket, key)` of a `nats://BUCKET/key` artifact URL.
pub fn artifact_location(url: &str) -> Option<(&str, &str)> {
    let (bucket, key) = url.strip_prefix("nats://")?.split_once('/')?;
    (crate::jwt::is_valid_workload_name(bucket) && !key.is_empty() && !key.contains("..")).then_some((bucket, key))
}

/// Key of the spec of `namespace`/`name`.
pub fn spec_key(namespace: &str, name: &str) -> String {
    format!("spec.{namespace}.{name}")
}

/// Key of replica slot `index` of `namespace`/`name`.
pub fn slot_key(namespace: &str, name: &str, index: u32) -> String {
    format!("slot.{namespace}.{name}.{index}")
}

/// Key of a node's heartbeat.
pub fn node_key(node: &str) -> String {
    format!("node.{node}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn spec() -> serde_json::Value {
        serde_json::json!({
            "name": "echo",
            "workload_type": "native",
            "artifact": {"url": "nats://NEXCACHE/echoservice", "sha256": DIGEST},
            "replicas": 3,
            "placement": {"spread": "zone"}
        })
    }

    fn parse(v: serde_json::Value) -> Result<Spec, SpecError> {
        Spec::parse(&v.to_string())
    }

    #[test]
    fn a_minimal_spec_takes_the_defaults() {
        let s = parse(spec()).unwrap();
        assert_eq!(s.namespace, "default");
        assert_eq!(s.rollout, Rollout { max_unavailable: 0, max_surge: 1 });
        assert_eq!(s.key(), "spec.default.echo");
        assert_eq!(slot_key("default", "echo", 2), "slot.default.echo.2");
        assert_eq!(artifact_location(&s.artifact.url), Some(("NEXCACHE", "echoservice")));
        // The digest is stable and changes with the spec.
        let mut other = s.clone();
        assert_eq!(s.digest(), other.digest());
        other.replicas = 2;
        assert_ne!(s.digest(), other.digest());
    }

    #[test]
    fn bad_specs_are_refused_with_what_to_change() {
        let cases: Vec<(&str, serde_json::Value, SpecError)> = vec![
            ("/name", "../x".into(), SpecError::BadName { field: "name", value: "../x".into() }),
            ("/namespace", "a.b".into(), SpecError::BadName { field: "namespace", value: "a.b".into() }),
            ("/replicas", 0.into(), SpecError::Replicas(0)),
            ("/replicas", 1000.into(), SpecError::Replicas(1000)),
            ("/artifact/url", "file:///etc/passwd".into(), SpecError::ArtifactUrl("file:///etc/passwd".into())),
            ("/artifact/url", "nats://B/../k".into(), SpecError::ArtifactUrl("nats://B/../k".into())),
            ("/artifact/sha256", "abc".into(), SpecError::ArtifactDigest("abc".into())),
            ("/workload_type", "wasm".into(), SpecError::NoTriggers("wasm".into())),
        ];
        for (path, value, want) in cases {
            let mut v = spec();
            match v.pointer_mut(path) {
                Some(field) => *field = value,
                None => v[&path[1..]] = value,
            }
            assert_eq!(parse(v), Err(want), "{path}");
        }
        let mut v = spec();
        v["triggers"] = serde_json::json!(["ok.*", "bad..subject"]);
        assert_eq!(parse(v), Err(SpecError::BadTrigger("bad..subject".into())));
        let mut v = spec();
        v["rollout"] = serde_json::json!({"max_surge": 0});
        assert_eq!(parse(v), Err(SpecError::StuckRollout));
        // A misspelt field is an error, not silently ignored.
        let mut v = spec();
        v["replica"] = 3.into();
        assert!(matches!(parse(v), Err(SpecError::Parse(e)) if e.contains("replica")));
    }
}
