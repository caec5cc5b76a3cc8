//! Subject names of the control API and the internal protocol, and wildcard overlap.

/// Prefix of every control subject.
pub const API_PREFIX: &str = "$NEX";

/// Subjects that belong to the NATS system, JetStream, KV and object stores, service discovery,
/// reply inboxes and nex itself. No trigger subscription may overlap them, and the `messaging` host
/// service never publishes or requests on them, whatever the node config says: a function that
/// could would read other tenants' data or command the node with the node's authority.
pub const RESERVED_SUBJECTS: [&str; 7] = ["$SYS.>", "$JS.>", "$NEX.>", "$KV.>", "$O.>", "$SRV.>", "_INBOX.>"];

/// The first entry of `list` that `subject` overlaps (wildcard-aware), if any.
pub fn first_overlap<'a>(subject: &str, list: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    list.into_iter().find(|d| subjects_overlap(subject, d))
}

/// Longest namespace accepted.
pub const MAX_NAMESPACE_LEN: usize = 64;

/// Why `ns` cannot be a namespace, if it cannot: a namespace is one NATS subject token (no `.`,
/// wildcards, whitespace or control characters), at most [`MAX_NAMESPACE_LEN`] bytes, and not
/// the reserved `system` namespace of node events and logs.
pub fn namespace_problem(ns: &str) -> Option<String> {
    if ns.is_empty() {
        return Some("the namespace is empty".into());
    }
    if ns.len() > MAX_NAMESPACE_LEN {
        return Some(format!("the namespace is longer than {MAX_NAMESPACE_LEN} bytes"));
    }
    if let Some(c) = ns.chars().find(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control()) {
        return Some(format!("the namespace {ns:?} contains {c:?}: it must be one subject token"));
    }
    if ns.eq_ignore_ascii_case(crate::SYSTEM_NAMESPACE) {
        return Some(format!("the namespace {ns:?} is reserved for node events and logs"));
    }
    None
}

/// Control subjects.
pub mod control {
    /// All nodes.
    pub fn ping() -> String {
        "$NEX.PING".into()
    }
    /// One node.
    pub fn ping_node(node: &str) -> String {
        format!("$NEX.PING.{node}")
    }
    /// Auction.
    pub fn auction() -> String {
        "$NEX.AUCTION".into()
    }
    /// Workload ping in `ns`, optionally for one workload id or name.
    pub fn wping(ns: &str, workload: Option<&str>) -> String {
        match workload {
            Some(w) if !w.is_empty() => format!("$NEX.WPING.{ns}.{w}"),
            _ => format!("$NEX.WPING.{ns}"),
        }
    }
    /// Node info.
    pub fn info(ns: &str, node: &str) -> String {
        format!("$NEX.INFO.{ns}.{node}")
    }
    /// Deploy.
    pub fn deploy(ns: &str, node: &str) -> String {
        format!("$NEX.DEPLOY.{ns}.{node}")
    }
    /// Stop.
    pub fn stop(ns: &str, node: &str) -> String {
        format!("$NEX.STOP.{ns}.{node}")
    }
    /// Lame duck.
    pub fn lameduck(node: &str) -> String {
        format!("$NEX.LAMEDUCK.{node}")
    }
    /// Events of one type in one namespace.
    pub fn events(ns: &str, event_type: &str) -> String {
        format!("$NEX.events.{ns}.{event_type}")
    }
    /// Logs of one workload, always `{ns}.{node}.{workload_name}.{workload_id}`, whoever wrote them.
    pub fn logs(ns: &str, node: &str, workload_name: &str, workload_id: &str) -> String {
        format!("$NEX.logs.{ns}.{node}.{workload_name}.{workload_id}")
    }
    /// A node's own log lines (`--logger nats`): `.stderr` for warnings and errors, else `.stdout`.
    pub fn system_log(node: &str, error: bool) -> String {
        format!("$NEX.logs.system.{node}.{}", if error { "stderr" } else { "stdout" })
    }
}

/// Internal subjects between a node and one agent.
pub mod internal {
    /// Agent → node handshake.
    pub fn handshake(id: &str) -> String {
        format!("hostint.{id}.handshake")
    }
    /// Agent → node logs.
    pub fn logs(id: &str) -> String {
        format!("hostint.{id}.logs")
    }
    /// Agent → node events.
    pub fn events(id: &str, event_type: &str) -> String {
        format!("hostint.{id}.events.{event_type}")
    }

    /// Agent → node: a batch of [`crate::agent::FunctionExec`] reports (JSON array) from an
    /// agent holding its own trigger subscriptions.
    pub fn execs(id: &str) -> String {
        format!("hostint.{id}.execs")
    }
    /// Agent → node host-service call.
    pub fn rpc(id: &str, ns: &str, workload: &str, service: &str, method: &str) -> String {
        format!("hostint.{id}.rpc.{ns}.{workload}.{service}.{method}")
    }
    /// Node → agent deploy.
    pub fn deploy(id: &str) -> String {
        format!("agentint.{id}.deploy")
    }
    /// Node → agent undeploy.
    pub fn undeploy(id: &str) -> String {
        format!("agentint.{id}.undeploy")
    }
    /// Node → agent liveness ping.
    pub fn ping(id: &str) -> String {
        format!("agentint.{id}.ping")
    }
    /// Node → agent function trigger.
    pub fn trigger(id: &str) -> String {
        format!("agentint.{id}.trigger")
    }
}

/// True when `s` is a valid subject to publish on: tokens without wildcards.
pub fn is_valid_publish_subject(s: &str) -> bool {
    is_valid_subscribe_subject(s) && !s.split('.').any(|t| t == "*" || t == ">")
}

/// True when `s` is a valid subject to subscribe to (wildcards allowed).
pub fn is_valid_subscribe_subject(s: &str) -> bool {
    if s.is_empty() || s.chars().any(|c| c.is_whitespace()) {
        return false;
    }
    let toks: Vec<&str> = s.split('.').collect();
    for (i, t) in toks.iter().enumerate() {
        if t.is_empty() {
            return false;
        }
        if t.contains('>') && (*t != ">" || i != toks.len() - 1) {
            return false;
        }
        if t.contains('*') && *t != "*" {
            return false;
        }
    }
    true
}

/// True when some concrete subject could match both `a` and `b` (both may hold wildcards).
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let ta: Vec<&str> = a.split('.').collect();
    let tb: Vec<&str> = b.split('.').collect();
    let mut i = 0;
    loop {
        match (ta.get(i), tb.get(i)) {
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (Some(x), Some(y)) => {
                if *x != "*" && *y != "*" && x != y {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_list_overlap() {
        assert!(subjects_overlap("$SYS.this.is.a.test", "$SYS.>"));
        assert!(subjects_overlap("$JS.foo.bar", "$JS.>"));
        assert!(!subjects_overlap("bob.test", "$SYS.>"));
        assert!(!subjects_overlap("bob.test", "$JS.>"));
        assert!(subjects_overlap(">", "$NEX.>"));
        assert!(subjects_overlap("*.foo", "$NEX.>"));
        assert!(subjects_overlap("a.*.c", "a.b.*"));
        assert!(!subjects_overlap("a.b", "a.b.c"));
        assert!(!subjects_overlap("a.*", "b.>"));
    }

    #[test]
    fn reserved_subjects_are_found_by_overlap_not_prefix() {
        let r = RESERVED_SUBJECTS;
        assert_eq!(first_overlap("$KV.hs_x.>", r), Some("$KV.>"));
        assert_eq!(first_overlap(">", r), Some("$SYS.>"));
        assert_eq!(first_overlap("_INBOX.abc", r), Some("_INBOX.>"));
        assert_eq!(first_overlap("$SRV.PING", r), Some("$SRV.>"));
        assert_eq!(first_overlap("$O.bucket.C.x", r), Some("$O.>"));
        assert_eq!(first_overlap("hello.world", r), None);
        assert_eq!(first_overlap("$KVX.a", r), None);
    }

    #[test]
    fn namespaces_are_one_token() {
        assert!(namespace_problem("default").is_none());
        assert!(namespace_problem("team-a_1").is_none());
        for bad in ["", "a.b", "*", ">", "a b", "system", "SYSTEM", "a\nb", &"x".repeat(65)] {
            assert!(namespace_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn publish_subjects_have_no_wildcards() {
        assert!(is_valid_publish_subject("a.b"));
        assert!(!is_valid_publish_subject("a.*"));
        assert!(!is_valid_publish_subject(">"));
    }

    #[test]
    fn subject_validity() {
        assert!(is_valid_subscribe_subject("a.*.>"));
        assert!(!is_valid_subscribe_subject("a..b"));
        assert!(!is_valid_subscribe_subject("a.>.b"));
        assert!(!is_valid_subscribe_subject("a b"));
        assert!(!is_valid_subscribe_subject(""));
    }
}
