//! Wire contract of nex: everything two parties must agree on, and nothing that does I/O.
//!
//! * [`control`] — the `$NEX.*` control API shapes.
//! * [`agent`] — the node ↔ agent protocol on the internal NATS server.
//! * [`deployment`] — deployment specs and the keys of the deployments bucket.
//!
//! `docs/protocol.md` describes all of it on the wire.
//! * [`jwt`] — workload JWTs (NATS generic claims signed by an issuer nkey).
//! * [`env`] — environments sealed to a node's xkey (`xkv1`).
//! * [`events`] — CloudEvents and log records published by nodes.
//! * [`subjects`] — subject names, reserved subjects and the wildcard overlap test.
//! * [`secret`] — strings that `Debug` never prints.

pub mod agent;
pub mod control;
pub mod deployment;
pub mod env;
pub mod events;
pub mod id;
pub mod jwt;
pub mod secret;
pub mod subjects;
pub mod trace;
pub mod uptime;

/// Version reported by nodes and agents.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The build: `v<version> [<commit>] | Built-on: <commit date, UTC>`.
pub const BUILD: &str =
    concat!("v", env!("CARGO_PKG_VERSION"), " [", env!("NEX_COMMIT"), "] | Built-on: ", env!("NEX_BUILT"));

/// Namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Namespace of node-level events and logs.
pub const SYSTEM_NAMESPACE: &str = "system";

/// Workload types, as spelled on the wire.
pub mod workload_type {
    /// A long-running executable.
    pub const NATIVE: &str = "native";
    /// A JavaScript function (the wire keeps the historical name `v8`).
    pub const V8: &str = "v8";
    /// Accepted alias of [`V8`].
    pub const JS: &str = "js";
    /// A WebAssembly (WASI preview-1) function.
    pub const WASM: &str = "wasm";

    /// Maps aliases to their canonical wire name (`js` → `v8`), lower-cased.
    pub fn canonical(t: &str) -> String {
        let t = t.trim().to_ascii_lowercase();
        if t == JS {
            V8.to_string()
        } else {
            t
        }
    }

    /// True for types that run per trigger message rather than as a service.
    pub fn is_function(t: &str) -> bool {
        let t = canonical(t);
        t == V8 || t == WASM
    }
}
