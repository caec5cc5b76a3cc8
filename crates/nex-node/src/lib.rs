//! The nex node: it attaches to NATS, answers the `$NEX.*` control API, keeps a pool of warm
//! agents in an isolation tier, and runs workloads in them.
//!
//! * [`node`] — start-up, heartbeat, signals, shutdown.
//! * [`control_api`] — the `$NEX.*` subjects.
//! * [`workloads`] — DEPLOY/STOP pipelines, lifecycle, essential restarts, lame duck.
//! * [`pool`] — warm agents; [`agent_client`] — talking to one agent.
//! * [`tiers`] — how agents are isolated ([`tiers::process`] today).
//! * [`internal_nats`] — the private `nats-server` with one account per workload.
//! * [`triggers`] — function trigger subscriptions.
//! * [`trust`] — who may ask for what: token binding and freshness, signed operator commands;
//!   [`replay`] — accepted token ids, on disk; [`nats_targets`] — which NATS servers workloads
//!   may reach; [`files`] — the node's own files, safe from other local users.
//! * [`telemetry`] — metrics; [`traces`] — spans and trace context in NATS headers.
//! * [`public_nats`] — the `nats-server` a node starts for its users (`public_nats_server`).
//! * [`claims`] — which node runs which replica of a deployment, decided without a leader;
//!   [`deployments`] — the node's reconciler: heartbeats, claims, replicas started and stopped.
//! * [`events`], [`artifact`], [`cgroup`], [`state`], [`config`].

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod agent_client;
pub mod artifact;
pub mod cgroup;
pub mod claims;
pub mod config;
pub mod control_api;
pub mod deployments;
pub mod events;
pub mod files;
pub mod host_services;
pub mod internal_nats;
pub mod nats_ext;
pub mod nats_targets;
pub mod node;
pub mod pool;
pub mod public_nats;
pub mod replay;
pub mod state;
pub mod telemetry;
pub mod tiers;
pub mod traces;
pub mod triggers;
pub mod trust;
pub mod workloads;

pub use config::NodeConfig;
pub use node::{run, NodeOptions};
