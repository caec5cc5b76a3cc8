//! Why a DEPLOY or STOP was refused. Each variant's `Display` is the exact text the requester
//! reads in the reply envelope (Nex's wording where Nex has one), so the wire never changes while
//! the code matches on kinds instead of comparing strings.

/// A refused DEPLOY.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    /// The subject has no namespace token.
    #[error("Invalid subject for workload deployment")]
    NoNamespace,
    /// The namespace token cannot be a namespace.
    #[error("Invalid subject for workload deployment: {0}")]
    BadNamespace(String),
    /// The node is in lame duck mode.
    #[error("Node is in lame duck mode. Workload deploy request denied")]
    LameDuck,
    /// The node is stopping.
    #[error("Node is shutting down. Workload deploy request denied")]
    ShuttingDown,
    /// `node_limits.max_workloads` reached (running and in-flight deploys count).
    #[error("Node is at maximum workload limit. Deploy request denied")]
    AtCapacity,
    /// The body is not a deploy request.
    #[error("Unable to deserialize deploy request: {0}")]
    Malformed(String),
    /// The request or its token is not acceptable here (target node, binding, hash claim,
    /// freshness of `jti`, replay).
    #[error("Invalid deploy request: {0}")]
    Invalid(String),
    /// `type` is not in `workload_types`.
    #[error("Unsupported workload type on this node: {0}")]
    UnsupportedType(String),
    /// Trigger subjects on a service.
    #[error("Unsupported workload type for trigger subject registration: {0}")]
    TriggersOnService(String),
    /// A trigger subject overlaps a reserved or denied subject (or is not a subject).
    #[error("The trigger subject {subject} overlaps with subject(s) in this node's deny list: {why}")]
    DeniedTrigger {
        /// The trigger subject.
        subject: String,
        /// The deny-list entry it overlaps, or why it is not a subject.
        why: String,
    },
    /// The sealed environment does not open.
    #[error("Failed to decrypt environment for deploy request: {0}")]
    Environment(String),
    /// The workload JWT does not decode or verify.
    #[error("Invalid deploy request: could not decode workload JWT: {0}")]
    Jwt(String),
    /// The workload name is not `^[a-zA-Z0-9_-]+$`.
    #[error("Invalid deploy request: workload name claim ('{0}') does not match requirements (^[a-zA-Z0-9_-]+$)")]
    BadName(String),
    /// `exp`/`nbf`/`iat` do not hold.
    #[error("Invalid deploy request: standard claims within JWT are not valid: {0}")]
    Claims(String),
    /// The issuer is not in `valid_issuers`.
    #[error("invalid workload issuer: {0}")]
    Issuer(String),
    /// No warm agent came in time.
    #[error("Failed to get agent client from pool: {0}")]
    NoAgent(String),
    /// The artifact could not be fetched, stored or verified.
    #[error("Failed to cache workload bytes: {0}")]
    Cache(String),
    /// `node_limits.max_workload_bytes`.
    #[error("Workload file size would exceed node limitations")]
    TooLarge,
    /// `node_limits.max_total_bytes`.
    #[error("Workload file size would exceed node total limitations")]
    TotalTooLarge,
    /// The agent or the node's set-up around it refused the workload.
    #[error("Failed to deploy workload: {0}")]
    Deploy(String),
}

/// A refused STOP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopError {
    /// The subject has no namespace token.
    #[error("Invalid subject for workload stop")]
    NoNamespace,
    /// The body is not a stop request.
    #[error("Unable to deserialize stop request: {0}")]
    Malformed(String),
    /// The stop JWT does not decode or verify.
    #[error("Invalid stop request: could not decode workload JWT: {0}")]
    Jwt(String),
    /// No such workload in this namespace (deliberately the same answer for every other case).
    #[error("No such workload")]
    NoSuchWorkload,
    /// The stop JWT is the deploy JWT.
    #[error("Invalid stop request: stop claims appear to be cloned or captured from the original start claims. Rejecting for security reasons")]
    Cloned,
    /// Another workload name.
    #[error("Invalid stop request: stop claims subject does not match original start claims subject")]
    Subject,
    /// Another issuer.
    #[error("Invalid stop request: the only entity allowed to terminate a workload is the issuer that originally started it")]
    Issuer,
    /// `exp`/`nbf`/`iat` do not hold.
    #[error("Invalid stop request: standard claims within JWT are not valid: {0}")]
    Claims(String),
    /// Binding claims or replay.
    #[error("Invalid stop request: {0}")]
    Invalid(String),
}
