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
    /// In the spec file; `nex apply` moves it into `sealed_environment` when the fleet has an
    /// xkey (otherwise it is stored as given, only with `--plain-environment`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// The environment sealed to the fleet's xkey: only nodes holding its seed can read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_environment: Option<SealedEnvironment>,
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

/// An environment sealed (nkeys `xkv1` box) from a one-off sender key to the fleet xkey, for one
/// deployment of one issuer: the box holds the issuer, namespace and name with the variables, and
/// a node opens it only for that deployment's revisions signed by that issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedEnvironment {
    /// The public fleet xkey (X…) it is sealed to; only nodes advertising it are chosen.
    pub fleet_xkey: String,
    /// The public half of the one-off key `nex apply` sealed it with.
    pub sender_xkey: String,
    /// The box, standard base64.
    pub sealed: String,
    /// HMAC-SHA256, keyed by the issuer's seed, of the deployment and the variables: lets the
    /// issuer (and no one else) tell an unchanged environment without opening the box.
    pub mac: String,
}

/// What the sealed box holds.
#[derive(Serialize, Deserialize)]
struct Envelope {
    issuer: String,
    namespace: String,
    name: String,
    environment: BTreeMap<String, String>,
}

/// Why a sealed environment does not open for a replica.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SealError {
    #[error("the environment is sealed to fleet xkey {want}, and this node holds {have}: give it that seed in fleet_xkey_seed_path")]
    WrongFleetKey { want: String, have: String },
    #[error("the environment does not open: {0}")]
    Open(String),
    #[error("the environment was sealed for {sealed_for}, not for {this}: apply the deployment's own environment")]
    NotThisDeployment { sealed_for: String, this: String },
    #[error("unable to seal the environment: {0}")]
    Seal(String),
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
    /// Spread replicas across nodes (the default) or across the values of this tag (`zone`):
    /// evenly over the values first, then over the nodes sharing a value. Nodes without the tag
    /// run none of the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
}

/// What each replica needs of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Memory in MiB: only nodes that give each workload at least this much run a replica (a
    /// service gets the node's `machine_template.memsize_mib`, a function its
    /// `function_memory_mib`).
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
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
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
    #[error("environment and sealed_environment cannot both be set: put the variables in environment and let `nex apply` seal them")]
    TwoEnvironments,
    #[error("placement.spread {0:?} is not a tag name: name the node tag to spread across, such as \"zone\"")]
    BadSpread(String),
    #[error("resources.memory_mib must be at least 1")]
    NoMemory,
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
        if self.sealed_environment.is_some() && !self.environment.is_empty() {
            return Err(SpecError::TwoEnvironments);
        }
        if let Some(t) = self.placement.spread.as_ref().filter(|t| t.is_empty() || t.trim() != t.as_str()) {
            return Err(SpecError::BadSpread(t.clone()));
        }
        if self.resources.as_ref().and_then(|r| r.memory_mib) == Some(0) {
            return Err(SpecError::NoMemory);
        }
        Ok(())
    }

    fn envelope_mac(&self, issuer: &nkeys::KeyPair) -> Result<String, SealError> {
        use hmac::Mac;
        let seed = issuer.seed().map_err(|e| SealError::Seal(format!("the issuer has no seed: {e}")))?;
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(seed.as_bytes()).map_err(|e| SealError::Seal(e.to_string()))?;
        let body = serde_json::to_vec(&(&self.namespace, &self.name, &self.environment)).unwrap_or_default();
        mac.update(b"nex deployment environment\0");
        mac.update(&body);
        Ok(mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Moves `environment` into `sealed_environment`, sealed to `fleet_xkey` for this deployment
    /// of `issuer`. `previous` (the revision in force) is kept when it holds the same variables
    /// for the same key, so applying an unchanged spec changes nothing.
    pub fn seal_environment(
        &mut self,
        issuer: &nkeys::KeyPair,
        fleet_xkey: &str,
        previous: Option<&SealedEnvironment>,
    ) -> Result<(), SealError> {
        if self.environment.is_empty() {
            return Ok(());
        }
        let mac = self.envelope_mac(issuer)?;
        if let Some(p) = previous.filter(|p| p.mac == mac && p.fleet_xkey == fleet_xkey) {
            self.sealed_environment = Some(p.clone());
            self.environment.clear();
            return Ok(());
        }
        let target = nkeys::XKey::from_public_key(fleet_xkey)
            .map_err(|e| SealError::Seal(format!("{fleet_xkey:?} is not a public xkey (X…): {e}")))?;
        let envelope = Envelope {
            issuer: issuer.public_key(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            environment: std::mem::take(&mut self.environment),
        };
        let plain = serde_json::to_vec(&envelope).map_err(|e| SealError::Seal(e.to_string()))?;
        let sender = nkeys::XKey::new();
        let sealed = sender.seal(&plain, &target).map_err(|e| SealError::Seal(e.to_string()))?;
        use base64::Engine;
        self.sealed_environment = Some(SealedEnvironment {
            fleet_xkey: fleet_xkey.to_string(),
            sender_xkey: sender.public_key(),
            sealed: base64::engine::general_purpose::STANDARD.encode(sealed),
            mac,
        });
        Ok(())
    }

    /// The environment a replica of this revision, signed by `issuer`, gets: the plain one, or
    /// the sealed one opened with the fleet key, checked to be this deployment's and issuer's.
    pub fn open_environment(
        &self,
        issuer: &str,
        fleet: Option<&nkeys::XKey>,
    ) -> Result<BTreeMap<String, String>, SealError> {
        let Some(s) = &self.sealed_environment else { return Ok(self.environment.clone()) };
        let have = fleet.map(|k| k.public_key());
        let Some(fleet) = fleet.filter(|_| have.as_deref() == Some(s.fleet_xkey.as_str())) else {
            return Err(SealError::WrongFleetKey {
                want: s.fleet_xkey.clone(),
                have: have.unwrap_or_else(|| "none".into()),
            });
        };
        use base64::Engine;
        let sender = nkeys::XKey::from_public_key(&s.sender_xkey).map_err(|e| SealError::Open(e.to_string()))?;
        let boxed =
            base64::engine::general_purpose::STANDARD.decode(&s.sealed).map_err(|e| SealError::Open(e.to_string()))?;
        let plain = fleet.open(&boxed, &sender).map_err(|e| SealError::Open(e.to_string()))?;
        let e: Envelope = serde_json::from_slice(&plain).map_err(|e| SealError::Open(e.to_string()))?;
        if e.issuer != issuer || e.namespace != self.namespace || e.name != self.name {
            return Err(SealError::NotThisDeployment {
                sealed_for: format!("{}/{} of issuer {}", e.namespace, e.name, e.issuer),
                this: format!("{}/{} of issuer {issuer}", self.namespace, self.name),
            });
        }
        Ok(e.environment)
    }

    /// SHA-256 of the spec's canonical JSON (fields in declaration order, maps sorted): what a
    /// revision's JWT pins.
    pub fn digest(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        crate::jwt::sha256_hex(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// Whether spreading the replicas over `domains` eligible nodes (or values of the spread
    /// tag) falls short: across nodes, fewer nodes than replicas (some node runs two); across a
    /// tag, every replica in one value.
    pub fn spread_relaxed(&self, domains: usize) -> bool {
        match self.placement.spread {
            None => domains < self.replicas as usize,
            Some(_) => self.replicas > 1 && domains < 2,
        }
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

/// What a signed revision does.
pub const OP_APPLY: &str = "apply";
/// A signed removal: the nodes stop every replica and the name is free again.
pub const OP_REMOVE: &str = "remove";

/// One revision as the bucket stores it under the spec key: the issuer's token and, unless the
/// revision removes the deployment, the spec whose digest the token pins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Spec>,
}

/// A record whose token checked out.
#[derive(Debug, Clone, PartialEq)]
pub struct Signed {
    /// The issuer's public account key.
    pub issuer: String,
    /// When it was signed (unix seconds).
    pub issued_at: i64,
    /// The bucket revision it replaces.
    pub replaces: u64,
    /// The spec, `None` for a removal.
    pub spec: Option<Spec>,
}

/// Why a revision in the bucket does not count; nodes and `nex` skip it and keep the last one
/// that does.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RevisionError {
    #[error("not a deployment record: {0}")]
    NotARecord(String),
    #[error("deleted without a signed removal (use `nex deployments rm`)")]
    Unsigned,
    #[error("its token is not valid: {0}")]
    Token(crate::jwt::JwtError),
    #[error("its token is for {token:?}, not for {key:?}")]
    WrongKey { token: String, key: String },
    #[error("its token is for operation {0:?}, not apply or remove")]
    WrongOp(String),
    #[error("its spec does not match the digest its token pins")]
    Digest,
    #[error("its spec is not valid: {0}")]
    Spec(SpecError),
    #[error("signed by {issuer}, but the deployment belongs to {owner}")]
    NotOwner { owner: String, issuer: String },
    #[error("a replay: its token replaces revision {replaces}, but it follows revision {previous}")]
    Replayed { replaces: u64, previous: u64 },
}

impl Record {
    /// A revision that sets the deployment to `spec`, replacing bucket revision `replaces` (0
    /// when the key has none).
    pub fn apply(spec: &Spec, replaces: u64, issuer: &nkeys::KeyPair) -> Result<Record, crate::jwt::JwtError> {
        let token =
            revision_claims(&spec.namespace, &spec.name, OP_APPLY, Some(spec.digest()), replaces).encode(issuer)?;
        Ok(Record { token, spec: Some(spec.clone()) })
    }

    /// A revision that removes `namespace`/`name`.
    pub fn remove(
        namespace: &str,
        name: &str,
        replaces: u64,
        issuer: &nkeys::KeyPair,
    ) -> Result<Record, crate::jwt::JwtError> {
        let token = revision_claims(namespace, name, OP_REMOVE, None, replaces).encode(issuer)?;
        Ok(Record { token, spec: None })
    }

    /// The record as bucket bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Checks the record on its own, as found under `key`: the signature, that the token was
    /// made for this key and operation, and that the spec is the one it pins.
    pub fn check(&self, key: &str) -> Result<Signed, RevisionError> {
        let c = crate::jwt::WorkloadClaims::decode(&self.token).map_err(RevisionError::Token)?;
        let token_key = spec_key(c.nex.namespace.as_deref().unwrap_or(""), &c.sub);
        if token_key != key {
            return Err(RevisionError::WrongKey { token: token_key, key: key.to_string() });
        }
        let op = c.nex.op.clone().unwrap_or_default();
        let spec = match (op.as_str(), &self.spec) {
            (OP_APPLY, Some(spec)) => {
                if c.nex.spec_digest.as_deref() != Some(spec.digest().as_str()) || spec.key() != key {
                    return Err(RevisionError::Digest);
                }
                spec.validate().map_err(RevisionError::Spec)?;
                Some(spec.clone())
            }
            (OP_REMOVE, None) => None,
            (OP_APPLY, None) | (OP_REMOVE, Some(_)) => return Err(RevisionError::Digest),
            _ => return Err(RevisionError::WrongOp(op)),
        };
        Ok(Signed { issuer: c.iss, issued_at: c.iat, replaces: c.nex.replaces.unwrap_or(0), spec })
    }
}

fn revision_claims(
    namespace: &str,
    name: &str,
    op: &str,
    digest: Option<String>,
    replaces: u64,
) -> crate::jwt::WorkloadClaims {
    let mut c = crate::jwt::WorkloadClaims::new(name, None);
    c.nex.namespace = Some(namespace.to_string());
    c.nex.op = Some(op.to_string());
    c.nex.spec_digest = digest;
    c.nex.replaces = Some(replaces);
    c
}

/// One entry of a spec key's history, oldest first: its bucket revision and value (`None` for a
/// delete or purge marker).
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub revision: u64,
    pub value: Option<Vec<u8>>,
}

/// The deployment a spec key's history amounts to.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    /// The bucket revision of the revision in force.
    pub revision: u64,
    pub owner: String,
    pub issued_at: i64,
    pub spec: Spec,
}

/// A history read: what is in force, and each entry's verdict.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The deployment in force, `None` when never applied or removed.
    pub current: Option<Current>,
    /// The owner: the issuer of the revision in force.
    pub owner: Option<String>,
    /// The newest bucket revision, valid or not: the one the next write replaces.
    pub latest: u64,
    /// Each entry, oldest first, with its verdict.
    pub entries: Vec<(u64, Result<Signed, RevisionError>)>,
}

/// Replays a spec key's history (oldest first). An entry counts when it checks out on its own
/// ([`Record::check`]), names the entry before it as the one it replaces (so a copy of an old
/// revision put back is a replay), and is signed by the owner: the issuer of the revision in
/// force, anyone while there is none. The oldest entry kept may follow entries the bucket no
/// longer holds, so its `replaces` is not checked.
pub fn resolve(key: &str, history: &[HistoryEntry]) -> Resolved {
    let mut current: Option<Current> = None;
    let mut owner: Option<String> = None;
    let mut previous: Option<u64> = None;
    let mut entries = Vec::with_capacity(history.len());
    for e in history {
        let verdict = (|| {
            let bytes = e.value.as_ref().ok_or(RevisionError::Unsigned)?;
            let record: Record =
                serde_json::from_slice(bytes).map_err(|err| RevisionError::NotARecord(err.to_string()))?;
            let s = record.check(key)?;
            if let Some(p) = previous {
                if s.replaces != p {
                    return Err(RevisionError::Replayed { replaces: s.replaces, previous: p });
                }
            }
            if let Some(o) = &owner {
                if *o != s.issuer {
                    return Err(RevisionError::NotOwner { owner: o.clone(), issuer: s.issuer.clone() });
                }
            }
            Ok(s)
        })();
        if let Ok(s) = &verdict {
            match &s.spec {
                Some(spec) => {
                    owner = Some(s.issuer.clone());
                    current = Some(Current {
                        revision: e.revision,
                        owner: s.issuer.clone(),
                        issued_at: s.issued_at,
                        spec: spec.clone(),
                    });
                }
                None => {
                    owner = None;
                    current = None;
                }
            }
        }
        previous = Some(e.revision);
        entries.push((e.revision, verdict));
    }
    Resolved { current, owner, latest: previous.unwrap_or(0), entries }
}

/// What changes between two specs, as `(path, old, new)` of their JSON leaves (`None` where a
/// side has no value), in path order.
pub fn diff(old: &Spec, new: &Spec) -> Vec<(String, Option<serde_json::Value>, Option<serde_json::Value>)> {
    fn leaves(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
        match v {
            serde_json::Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    leaves(&p, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_string(), v.clone());
            }
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    leaves("", &serde_json::to_value(old).unwrap_or_default(), &mut a);
    leaves("", &serde_json::to_value(new).unwrap_or_default(), &mut b);
    let paths: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    paths
        .into_iter()
        .filter(|p| a.get(*p) != b.get(*p))
        // The box and its one-off key change with every seal; the MAC says whether the
        // variables did.
        .filter(|p| !matches!(p.as_str(), "sealed_environment.sealed" | "sealed_environment.sender_xkey"))
        .map(|p| (p.clone(), a.get(p).cloned(), b.get(p).cloned()))
        .collect()
}

/// Whether going from `old` to `new` replaces the running replicas (a roll-out), rather than
/// only adding or removing some.
pub fn needs_rollout(old: &Spec, new: &Spec) -> bool {
    old.replica_digest() != new.replica_digest()
}

impl Spec {
    /// Digest of what a replica runs (the spec without replicas, placement and roll-out
    /// settings): replicas whose digest differs from the spec's are replaced by a roll-out.
    pub fn replica_digest(&self) -> String {
        Spec { replicas: 0, rollout: Rollout::default(), placement: Placement::default(), ..self.clone() }.digest()
    }
}

/// Key of the roll-out status of `namespace`/`name` (a revision that failed to start).
pub fn status_key(namespace: &str, name: &str) -> String {
    format!("status.{namespace}.{name}")
}

/// A node's heartbeat: what placement needs to know of it. The key expires unless renewed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Beat {
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Canonical workload types it runs.
    #[serde(default)]
    pub workload_types: Vec<String>,
    #[serde(default)]
    pub sandboxed: bool,
    /// In lame duck: hands its replicas to others and takes none.
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub arch: String,
    /// Issuers whose workloads it accepts (`valid_issuers`); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issuers: Vec<String>,
    /// The public fleet xkey it holds the seed of (`fleet_xkey_seed_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_xkey: Option<String>,
    /// Memory each service gets (`machine_template.memsize_mib`), MiB.
    #[serde(default)]
    pub memory_mib: u64,
    /// Memory each function gets (`function_memory_mib`), MiB.
    #[serde(default)]
    pub function_memory_mib: u64,
    /// At `node_limits.max_workloads`: it keeps the replicas it runs but takes no new ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
}

impl Beat {
    /// Whether this node may run replicas of `spec`, signed by `issuer`.
    pub fn admits(&self, spec: &Spec, issuer: &str) -> bool {
        let p = &spec.placement;
        let wt = crate::workload_type::canonical(&spec.workload_type);
        self.workload_types.contains(&wt)
            && (self.issuers.is_empty() || self.issuers.iter().any(|i| i == issuer))
            && p.tags.iter().all(|(k, v)| self.tags.get(k) == Some(v))
            && p.sandboxed.is_none_or(|s| !s || self.sandboxed)
            && p.os.as_ref().is_none_or(|o| *o == self.os)
            && p.arch.as_ref().is_none_or(|a| *a == self.arch)
            && spec.sealed_environment.as_ref().is_none_or(|s| self.fleet_xkey.as_ref() == Some(&s.fleet_xkey))
            && p.spread.as_ref().is_none_or(|t| self.tags.contains_key(t))
            && spec.resources.as_ref().and_then(|r| r.memory_mib).is_none_or(|m| m <= self.memory_for(&wt))
    }

    /// Memory a workload of type `workload_type` gets on this node, MiB.
    pub fn memory_for(&self, workload_type: &str) -> u64 {
        memory_for(workload_type, self.memory_mib, self.function_memory_mib)
    }

    /// The domain `node` (whose heartbeat this is) belongs to for `spec`'s spread: the value of
    /// the tag it spreads by, or the node itself.
    pub fn domain(&self, spec: &Spec, node: &str) -> String {
        match &spec.placement.spread {
            Some(t) => format!("{t}={}", self.tags.get(t).map(String::as_str).unwrap_or_default()),
            None => node.to_string(),
        }
    }
}

/// Memory a workload of type `workload_type` gets on a node that gives services `service_mib`
/// and functions `function_mib`.
pub fn memory_for(workload_type: &str, service_mib: u64, function_mib: u64) -> u64 {
    if crate::workload_type::is_function(workload_type) {
        function_mib
    } else {
        service_mib
    }
}

/// What a replica slot key holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// The owner: the one node that runs this replica.
    pub node: String,
    /// The node the owner offers the slot to; it starts its replica, then takes the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
    /// The workload the owner runs for it, once started.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload_id: String,
    /// [`Spec::replica_digest`] of what it runs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// The spec revision it runs.
    #[serde(default)]
    pub revision: u64,
    /// Set while the owner replaces its replica with this digest's (a roll-out step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// What a status key holds: a revision whose replicas would not start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub failed_digest: String,
    pub revision: u64,
    pub node: String,
    pub error: String,
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
        let mut v = spec();
        v["placement"] = serde_json::json!({"spread": ""});
        assert_eq!(parse(v), Err(SpecError::BadSpread("".into())));
        let mut v = spec();
        v["resources"] = serde_json::json!({"memory_mib": 0});
        assert_eq!(parse(v), Err(SpecError::NoMemory));
        // A misspelt field is an error, not silently ignored.
        let mut v = spec();
        v["replica"] = 3.into();
        assert!(matches!(parse(v), Err(SpecError::Parse(e)) if e.contains("replica")));
    }

    fn entry(revision: u64, r: &Record) -> HistoryEntry {
        HistoryEntry { revision, value: Some(r.to_bytes()) }
    }

    #[test]
    fn deployment_history_keeps_the_owners_revisions_and_refuses_forgeries_and_replays() {
        let (a, b) = (nkeys::KeyPair::new_account(), nkeys::KeyPair::new_account());
        let v1 = parse(spec()).unwrap();
        let key = v1.key();
        let mut v2 = v1.clone();
        v2.replicas = 5;
        let r1 = Record::apply(&v1, 0, &a).unwrap();
        let r2 = Record::apply(&v2, 1, &a).unwrap();
        // Another issuer writing past the CLI, on the right revision.
        let forged = Record::apply(&v1, 2, &b).unwrap();
        // The owner's first revision put back as it was.
        let replay = r1.clone();
        // A valid token with another spec than the one it pins.
        let mut tampered = Record::apply(&v2, 4, &a).unwrap();
        tampered.spec.as_mut().unwrap().replicas = 7;
        let history = vec![
            entry(1, &r1),
            entry(2, &r2),
            entry(3, &forged),
            entry(4, &replay),
            entry(5, &tampered),
            HistoryEntry { revision: 6, value: None },
            HistoryEntry { revision: 7, value: Some(b"{}".to_vec()) },
        ];
        let res = resolve(&key, &history);
        let cur = res.current.clone().unwrap();
        assert_eq!((cur.revision, cur.spec.replicas, cur.owner.as_str()), (2, 5, a.public_key().as_str()));
        assert_eq!(res.latest, 7);
        let verdicts: Vec<_> = res.entries.iter().map(|(_, v)| v.clone().err()).collect();
        assert_eq!(verdicts[0], None);
        assert_eq!(verdicts[1], None);
        assert_eq!(verdicts[2], Some(RevisionError::NotOwner { owner: a.public_key(), issuer: b.public_key() }));
        assert_eq!(verdicts[3], Some(RevisionError::Replayed { replaces: 0, previous: 3 }));
        assert_eq!(verdicts[4], Some(RevisionError::Digest));
        assert_eq!(verdicts[5], Some(RevisionError::Unsigned));
        assert!(matches!(verdicts[6], Some(RevisionError::NotARecord(_))));
        // A token for another deployment's key is refused too.
        let mut other = v1.clone();
        other.name = "other".into();
        let r = Record::apply(&other, 7, &a).unwrap();
        assert!(matches!(r.check(&key), Err(RevisionError::WrongKey { .. })));

        // The owner removes it; then the name is free for anyone.
        let mut history = history;
        history.push(entry(8, &Record::remove("default", "echo", 7, &a).unwrap()));
        history.push(entry(9, &Record::apply(&v1, 8, &b).unwrap()));
        let res = resolve(&key, &history);
        assert_eq!(res.current.unwrap().owner, b.public_key());
    }

    #[test]
    fn deployment_placement_needs_the_spread_tag_and_enough_memory() {
        let issuer = nkeys::KeyPair::new_account().public_key();
        let mut v = spec();
        v["resources"] = serde_json::json!({"memory_mib": 128});
        let service = parse(v.clone()).unwrap();
        v["workload_type"] = "wasm".into();
        v["triggers"] = serde_json::json!(["fn.x"]);
        let function = parse(v).unwrap();
        let beat = |zone: Option<&str>, memory_mib, function_memory_mib| Beat {
            workload_types: vec!["native".into(), "wasm".into()],
            tags: zone.map(|z| [("zone".to_string(), z.to_string())].into()).unwrap_or_default(),
            memory_mib,
            function_memory_mib,
            ..Default::default()
        };
        assert!(beat(Some("a"), 256, 64).admits(&service, &issuer));
        assert_eq!(beat(Some("a"), 256, 64).domain(&service, "n1"), "zone=a");
        // No zone tag: it cannot take part in a spread across zones.
        assert!(!beat(None, 256, 64).admits(&service, &issuer));
        // Services are sized by memsize_mib, functions by function_memory_mib.
        assert!(!beat(Some("a"), 64, 256).admits(&service, &issuer));
        assert!(beat(Some("a"), 64, 256).admits(&function, &issuer));
        assert!(!beat(Some("a"), 256, 64).admits(&function, &issuer));
        // Without a spread tag each node is its own domain.
        let mut plain = service.clone();
        plain.placement.spread = None;
        assert_eq!(beat(None, 256, 64).domain(&plain, "n1"), "n1");
        // Across nodes the spread is relaxed with fewer nodes than replicas; across a tag only
        // when every replica shares one value.
        assert!(plain.spread_relaxed(2) && !plain.spread_relaxed(3));
        assert!(service.spread_relaxed(1) && !service.spread_relaxed(2));
    }

    #[test]
    fn deployment_plans_name_each_change_and_whether_it_rolls_out() {
        let v1 = parse(spec()).unwrap();
        let mut v2 = v1.clone();
        v2.replicas = 5;
        assert_eq!(diff(&v1, &v2), vec![("replicas".to_string(), Some(3.into()), Some(5.into()))]);
        assert!(!needs_rollout(&v1, &v2));
        v2.environment.insert("MODE".into(), "fast".into());
        assert_eq!(diff(&v1, &v2)[0], ("environment.MODE".to_string(), None, Some("fast".into())));
        assert!(needs_rollout(&v1, &v2));
    }

    #[test]
    fn deployment_environments_seal_to_the_fleet_and_open_only_for_their_own_deployment() {
        let (a, b) = (nkeys::KeyPair::new_account(), nkeys::KeyPair::new_account());
        let fleet = nkeys::XKey::new();
        let mut v = spec();
        v["placement"] = serde_json::json!({});
        v["environment"] = serde_json::json!({"TOKEN": "s3cret"});
        let plain = parse(v).unwrap();
        let mut sealed = plain.clone();
        sealed.seal_environment(&a, &fleet.public_key(), None).unwrap();
        assert!(sealed.environment.is_empty());
        let text = serde_json::to_string(&sealed).unwrap();
        assert!(!text.contains("s3cret") && !text.contains("TOKEN"), "{text}");
        assert_eq!(sealed.open_environment(&a.public_key(), Some(&fleet)).unwrap()["TOKEN"], "s3cret");

        // Applying the same variables again keeps the box (no new revision, no roll-out); new
        // variables or another fleet key make a new one.
        let mut again = plain.clone();
        again.seal_environment(&a, &fleet.public_key(), sealed.sealed_environment.as_ref()).unwrap();
        assert_eq!(again, sealed);
        let mut changed = plain.clone();
        changed.environment.insert("TOKEN".into(), "other".into());
        changed.seal_environment(&a, &fleet.public_key(), sealed.sealed_environment.as_ref()).unwrap();
        assert_ne!(changed.sealed_environment, sealed.sealed_environment);

        // A node without the fleet seed, or with another, cannot open it and is not chosen.
        let other = nkeys::XKey::new();
        assert!(matches!(sealed.open_environment(&a.public_key(), None), Err(SealError::WrongFleetKey { .. })));
        assert!(matches!(sealed.open_environment(&a.public_key(), Some(&other)), Err(SealError::WrongFleetKey { .. })));
        let beat = |k: Option<&nkeys::XKey>| Beat {
            workload_types: vec!["native".into()],
            fleet_xkey: k.map(|k| k.public_key()),
            ..Default::default()
        };
        assert!(beat(Some(&fleet)).admits(&sealed, &a.public_key()));
        assert!(!beat(None).admits(&sealed, &a.public_key()));
        assert!(!beat(Some(&other)).admits(&sealed, &a.public_key()));
        assert!(beat(None).admits(&plain, &a.public_key()));

        // The box copied into another issuer's deployment, or another deployment of the same
        // issuer, does not open there.
        let mut stolen = sealed.clone();
        let e = stolen.open_environment(&b.public_key(), Some(&fleet)).unwrap_err();
        assert!(e.to_string().contains("was sealed for default/echo of issuer"), "{e}");
        stolen.name = "thief".into();
        assert!(matches!(
            stolen.open_environment(&a.public_key(), Some(&fleet)),
            Err(SealError::NotThisDeployment { .. })
        ));
        // A spec file may not carry both forms.
        let mut both = serde_json::to_value(&sealed).unwrap();
        both["environment"] = serde_json::json!({"X": "1"});
        assert_eq!(parse(both), Err(SpecError::TwoEnvironments));
    }
}
