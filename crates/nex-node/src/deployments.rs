//! The node's half of deployments: it heartbeats into the deployments bucket, reads the bucket
//! every pass, writes the claims [`crate::claims`] plans (each a compare-and-swap), and makes
//! what runs here match what the bucket says is this node's: it starts the replicas of the slots
//! it owns through the DEPLOY pipeline, replaces those of an older revision (start new, then
//! stop old), and stops every replica whose slot is no longer its own.
//!
//! Every pass reads the whole bucket afresh, so a node that was cut off and comes back acts on
//! what holds now, never on a stale picture. A spec counts only as [`dep::resolve`] reads its
//! signed history; `valid_issuers` applies to the issuer of the revision in force.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use nex_api::deployment::{self as dep, Beat, Current, HistoryEntry, RolloutStatus, SlotRecord};
use nex_api::events::event_type;
use serde_json::json;

use crate::claims::{Action, Owner, SlotId, View};
use crate::workloads::{DeployError, WorkloadManager};

/// Failed starts of one revision on one slot before the roll-out is marked failed.
const START_ATTEMPTS: u32 = 3;
/// Longest a read of the bucket may take before the pass is given up.
const READ_WITHIN: Duration = Duration::from_secs(3);
/// How often the bucket is read.
const PASS_EVERY: Duration = Duration::from_millis(1000);

/// The reconciler of one node.
pub struct Reconciler {
    mgr: Arc<WorkloadManager>,
    me: String,
    js: jetstream::Context,
    ttl: Duration,
    /// Slots the bucket says are ours, as of the last pass.
    owned: AtomicUsize,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A replica running here.
struct Replica {
    workload_id: String,
    digest: String,
}

impl Replica {
    /// `rec` once this replica of spec revision `revision` runs for it.
    fn recorded_in(&self, rec: SlotRecord, revision: u64) -> SlotRecord {
        SlotRecord { workload_id: self.workload_id.clone(), digest: self.digest.clone(), revision, next: None, ..rec }
    }
}

/// Why a replica did not start.
enum NotStarted {
    /// This node has no room for it now (full, draining, stopping).
    NoRoom,
    /// It failed, or its revision is marked failed.
    Failed,
}

/// A deployment in force.
struct Deployment {
    current: Current,
    digest: String,
}

/// What one pass read.
#[derive(Default)]
struct Reading {
    beats: BTreeMap<String, Beat>,
    /// Slot key → record and its revision.
    slots: BTreeMap<String, (SlotRecord, u64)>,
    specs: BTreeMap<String, u64>,
    statuses: BTreeMap<String, RolloutStatus>,
}

#[derive(Default)]
struct Memory {
    running: BTreeMap<String, Replica>,
    /// Spec key → (revision read, what it resolved to).
    specs: BTreeMap<String, (u64, Option<Current>)>,
    failures: BTreeMap<(String, String), u32>,
    degraded: BTreeSet<String>,
    /// Slot keys of ours whose roll-out found no room here for the new replica: offered to
    /// another node, which starts it before this one stops the old.
    shed: BTreeSet<String>,
}

fn slot_of(id: &SlotId) -> String {
    format!("slot.{}.{}", id.0, id.1)
}

impl Reconciler {
    /// Starts heartbeats and passes for `mgr`'s node, on its control connection.
    pub fn start(mgr: Arc<WorkloadManager>) -> Arc<Reconciler> {
        let cfg = mgr.config().clone();
        let r = Arc::new(Reconciler {
            me: mgr.identity().node_id.clone(),
            js: jetstream::new(mgr.control().clone()),
            ttl: Duration::from_millis(cfg.deployment_ttl_ms),
            mgr,
            owned: AtomicUsize::new(0),
            tasks: Default::default(),
        });
        let beat = tokio::spawn(r.clone().heartbeat());
        let passes = tokio::spawn(r.clone().run());
        crate::workloads::lock(&r.tasks).extend([beat, passes]);
        r
    }

    /// Stops taking part: no more passes, and the heartbeat is removed so the other nodes take
    /// this node's slots now rather than when it would have lapsed.
    pub async fn stop(&self) {
        for t in crate::workloads::lock(&self.tasks).drain(..) {
            t.abort();
        }
        if let Ok(kv) = self.js.get_key_value(dep::BUCKET).await {
            let _ = tokio::time::timeout(Duration::from_secs(2), kv.purge(dep::node_key(&self.me))).await;
        }
    }

    /// Waits (at most `within`) until this node owns no slot: in lame duck its replicas move to
    /// other nodes before the node stops them.
    pub async fn handed_off(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.owned.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        true
    }

    fn beat(&self) -> Beat {
        let tags = self.mgr.identity().tags.read().unwrap_or_else(|e| e.into_inner()).clone();
        let cfg = self.mgr.config();
        Beat {
            sandboxed: !tags.contains_key(nex_api::control::tags::UNSAFE),
            tags,
            workload_types: cfg.workload_types.clone(),
            draining: self.mgr.in_lameduck(),
            os: std::env::consts::OS.into(),
            arch: crate::node::go_arch().into(),
            issuers: cfg.valid_issuers.clone(),
            fleet_xkey: self.mgr.identity().fleet_xkey.as_ref().map(|k| k.public_key()),
            memory_mib: cfg.machine_template.memsize_mib,
            function_memory_mib: cfg.function_memory_mib,
            full: !self.mgr.has_room(),
        }
    }

    /// Renews `node.<id>` every third of the TTL; the server removes it when renewals stop.
    async fn heartbeat(self: Arc<Self>) {
        let subject = format!("$KV.{}.{}", dep::BUCKET, dep::node_key(&self.me));
        let ttl = self.ttl.as_secs().max(1).to_string();
        loop {
            let body = serde_json::to_vec(&self.beat()).unwrap_or_default();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-TTL", ttl.as_str());
            match self.js.publish_with_headers(subject.clone(), headers, body.into()).await {
                Ok(ack) => {
                    if let Err(e) = ack.await {
                        tracing::debug!(error = %e, "deployments heartbeat not stored (no bucket yet?)");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "deployments heartbeat not sent"),
            }
            tokio::time::sleep(self.ttl / 3).await;
        }
    }

    async fn run(self: Arc<Self>) {
        let mut memory = Memory::default();
        let mut tick = tokio::time::interval(PASS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut bucket: Option<kv::Store> = None;
        loop {
            tick.tick().await;
            if bucket.is_none() {
                bucket = self.js.get_key_value(dep::BUCKET).await.ok();
            }
            let Some(kv) = &bucket else { continue };
            if let Err(e) = self.pass(kv, &mut memory).await {
                tracing::debug!(error = format!("{e:#}"), "deployments pass incomplete");
            }
        }
    }

    async fn read(&self, kv: &kv::Store) -> Result<Reading> {
        let mut r = Reading::default();
        let mut keys = kv.keys().await.context("listing the deployments bucket")?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.context("listing the deployments bucket")?);
        }
        for k in names {
            let Some(e) = kv.entry(k.as_str()).await.with_context(|| format!("reading {k}"))? else { continue };
            if e.operation != kv::Operation::Put {
                continue;
            }
            if let Some(node) = k.strip_prefix("node.") {
                if let Ok(b) = serde_json::from_slice::<Beat>(&e.value) {
                    r.beats.insert(node.to_string(), b);
                }
            } else if k.starts_with("slot.") {
                if let Ok(s) = serde_json::from_slice::<SlotRecord>(&e.value) {
                    r.slots.insert(k, (s, e.revision));
                }
            } else if k.starts_with("spec.") {
                r.specs.insert(k, e.revision);
            } else if k.starts_with("status.") {
                if let Ok(s) = serde_json::from_slice::<RolloutStatus>(&e.value) {
                    r.statuses.insert(k, s);
                }
            }
        }
        Ok(r)
    }

    /// The deployments in force, from the specs' signed histories (re-read only when changed).
    async fn deployments(
        &self,
        kv: &kv::Store,
        specs: &BTreeMap<String, u64>,
        memory: &mut Memory,
    ) -> Result<BTreeMap<String, Deployment>> {
        memory.specs.retain(|k, _| specs.contains_key(k));
        for (k, rev) in specs {
            if memory.specs.get(k).is_some_and(|(r, _)| r == rev) {
                continue;
            }
            let resolved = resolve(kv, k).await?;
            for (revision, verdict) in &resolved.entries {
                if let Err(why) = verdict {
                    tracing::debug!(key = %k, revision, %why, "deployment revision ignored");
                }
            }
            memory.specs.insert(k.clone(), (*rev, resolved.current));
        }
        Ok(memory
            .specs
            .values()
            .filter_map(|(_, c)| c.clone())
            .map(|c| {
                let id = format!("{}.{}", c.spec.namespace, c.spec.name);
                (id, Deployment { digest: c.spec.replica_digest(), current: c })
            })
            .collect())
    }

    async fn pass(&self, kv: &kv::Store, memory: &mut Memory) -> Result<()> {
        // Reads are bounded (a stream electing a leader answers nothing); writes and starts are
        // not cut short, so a replica is never left half started.
        let mut reading = tokio::time::timeout(READ_WITHIN, self.read(kv)).await.context("reading the bucket")??;
        let deployments = tokio::time::timeout(READ_WITHIN, self.deployments(kv, &reading.specs, memory))
            .await
            .context("reading the deployments' histories")??;
        let live: BTreeMap<String, bool> = reading.beats.iter().map(|(n, b)| (n.clone(), b.draining)).collect();
        let wanted: BTreeMap<SlotId, Option<(Owner, u64)>> = deployments
            .iter()
            .flat_map(|(id, d)| (0..d.current.spec.replicas).map(move |i| (id.clone(), i)))
            .map(|slot| {
                let owner = reading
                    .slots
                    .get(&slot_of(&slot))
                    .map(|(r, rev)| (Owner { node: r.node.clone(), handoff: r.handoff.clone() }, *rev));
                (slot, owner)
            })
            .collect();
        let beats = std::mem::take(&mut reading.beats);
        let beats = &beats;
        let eligible = |node: &str, d: &str| {
            let (Some(b), Some(d)) = (beats.get(node), deployments.get(d)) else { return false };
            b.admits(&d.current.spec, &d.current.owner)
        };
        let domain = |node: &str, d: &str| match (beats.get(node), deployments.get(d)) {
            (Some(b), Some(d)) => b.domain(&d.current.spec, node),
            _ => node.to_string(),
        };
        // Our own room is known first-hand; the others' from their heartbeats.
        let my_room = self.mgr.has_room();
        let room = |node: &str| if node == self.me { my_room } else { beats.get(node).is_some_and(|b| !b.full) };
        memory.shed.retain(|k| reading.slots.get(k).is_some_and(|(r, _)| r.node == self.me));
        let shed: BTreeSet<SlotId> = wanted.keys().filter(|s| memory.shed.contains(&slot_of(s))).cloned().collect();
        let plan = View {
            me: &self.me,
            live: &live,
            slots: &wanted,
            eligible: &eligible,
            domain: &domain,
            room: &room,
            shed: &shed,
        }
        .plan();
        for action in plan {
            match action {
                Action::Write { slot, expect, owner } => {
                    let key = slot_of(&slot);
                    let mut rec = reading.slots.get(&key).map(|(r, _)| r.clone()).unwrap_or_default();
                    let previous = rec.node.clone();
                    if rec.node != owner.node {
                        rec = SlotRecord::default();
                    }
                    rec.node = owner.node;
                    rec.handoff = owner.handoff;
                    if let Some(rev) = cas(kv, &key, expect, &rec).await {
                        let claimed = previous != self.me && rec.node == self.me;
                        reading.slots.insert(key, (rec, rev));
                        if claimed {
                            if let Some(d) = deployments.get(&slot.0) {
                                self.event(
                                    d,
                                    event_type::REPLICA_CLAIMED,
                                    json!({"replica": slot.1, "previous_node": previous}),
                                )
                                .await;
                            }
                        }
                    }
                }
                Action::Accept { slot, expect } => {
                    let key = slot_of(&slot);
                    let Some(d) = deployments.get(&slot.0) else { continue };
                    let from = reading.slots.get(&key).map(|(r, _)| r.node.clone()).unwrap_or_default();
                    let Ok(replica) = self.start_replica(kv, d, &key, memory, &mut reading).await else { continue };
                    let rec = replica
                        .recorded_in(SlotRecord { node: self.me.clone(), ..Default::default() }, d.current.revision);
                    match cas(kv, &key, Some(expect), &rec).await {
                        Some(rev) => {
                            reading.slots.insert(key.clone(), (rec, rev));
                            memory.running.insert(key, replica);
                            self.event(
                                d,
                                event_type::REPLICA_MOVED,
                                json!({"replica": slot.1, "from": from, "to": self.me}),
                            )
                            .await;
                        }
                        None => self.stop_id(&replica.workload_id).await,
                    }
                }
            }
        }
        self.converge(kv, &deployments, &wanted, memory, &mut reading).await;
        // Stop what is not ours; forget replicas that ended.
        let ours: BTreeSet<String> = wanted
            .keys()
            .map(slot_of)
            .filter(|k| reading.slots.get(k).is_some_and(|(r, _)| r.node == self.me))
            .collect();
        let running: Vec<String> = memory.running.keys().cloned().collect();
        for key in running {
            if !ours.contains(&key) {
                if let Some(r) = memory.running.remove(&key) {
                    tracing::info!(slot = %key, workload = %r.workload_id, "stopping a replica this node no longer owns");
                    self.stop_id(&r.workload_id).await;
                }
            }
        }
        self.owned.store(ours.len(), Ordering::SeqCst);
        // Slots of removed deployments or beyond the replica count: their owner (or anyone,
        // once the owner is gone) deletes them.
        let wanted_keys: BTreeSet<String> = wanted.keys().map(slot_of).collect();
        for (key, (rec, rev)) in &reading.slots {
            if !wanted_keys.contains(key) && (rec.node == self.me || !live.contains_key(&rec.node)) {
                let _ = kv.delete_expect_revision(key, Some(*rev)).await;
            }
        }
        self.report_degraded(&deployments, &wanted, &live, &eligible, &domain, memory).await;
        Ok(())
    }

    /// Makes each slot this node owns run a replica of the revision in force.
    async fn converge(
        &self,
        kv: &kv::Store,
        deployments: &BTreeMap<String, Deployment>,
        wanted: &BTreeMap<SlotId, Option<(Owner, u64)>>,
        memory: &mut Memory,
        reading: &mut Reading,
    ) {
        for slot in wanted.keys() {
            let key = slot_of(slot);
            let Some(d) = deployments.get(&slot.0) else { continue };
            let Some((rec, rev)) = reading.slots.get(&key).cloned() else { continue };
            if rec.node != self.me {
                continue;
            }
            if let Some(r) = memory.running.get(&key) {
                if self.mgr.get(&r.workload_id).is_none() {
                    tracing::info!(slot = %key, workload = %r.workload_id, "replica ended; starting it again");
                    memory.running.remove(&key);
                }
            }
            let failed = reading
                .statuses
                .get(&dep::status_key(&d.current.spec.namespace, &d.current.spec.name))
                .is_some_and(|s| s.failed_digest == d.digest);
            match memory.running.get(&key) {
                None => {
                    let replica = match self.start_replica(kv, d, &key, memory, reading).await {
                        Ok(r) => r,
                        Err(NotStarted::NoRoom) => {
                            // Full or draining: give the slot up so a node with room takes it
                            // (unless it is being handed over already).
                            if rec.handoff.is_none() && kv.delete_expect_revision(&key, Some(rev)).await.is_ok() {
                                tracing::info!(slot = %key, "no room for the replica here; slot released");
                                reading.slots.remove(&key);
                            }
                            continue;
                        }
                        Err(NotStarted::Failed) => continue,
                    };
                    let new = replica.recorded_in(rec, d.current.revision);
                    memory.running.insert(key.clone(), replica);
                    if let Some(r) = cas(kv, &key, Some(rev), &new).await {
                        reading.slots.insert(key, (new, r));
                    }
                }
                Some(r) if r.digest != d.digest && !failed && rec.handoff.is_none() => {
                    // A roll-out step: at most max_surge slots of the deployment at once.
                    if rec.next.as_deref() != Some(d.digest.as_str()) {
                        let rolling = wanted
                            .keys()
                            .filter(|s| s.0 == slot.0)
                            .filter(|s| reading.slots.get(&slot_of(s)).is_some_and(|(r, _)| r.next.is_some()))
                            .count();
                        if rolling as u32 >= d.current.spec.rollout.max_surge.max(1) {
                            continue;
                        }
                        let marked = SlotRecord { next: Some(d.digest.clone()), ..rec.clone() };
                        match cas(kv, &key, Some(rev), &marked).await {
                            Some(r) => {
                                reading.slots.insert(key.clone(), (marked, r));
                            }
                            None => continue,
                        }
                    }
                    let old = r.workload_id.clone();
                    let replica = match self.start_replica(kv, d, &key, memory, reading).await {
                        Ok(r) => r,
                        Err(NotStarted::NoRoom) => {
                            // No room here for the new replica beside the old: the next pass
                            // offers the slot to a node with room, which starts it there.
                            if memory.shed.insert(key.clone()) {
                                tracing::info!(slot = %key, "no room here for the new revision's replica; offering the slot");
                            }
                            continue;
                        }
                        // Counted towards the revision's failure; the old replica keeps running.
                        Err(NotStarted::Failed) => continue,
                    };
                    self.stop_id(&old).await;
                    let Some((rec, rev)) = reading.slots.get(&key).cloned() else { continue };
                    let new = replica.recorded_in(rec, d.current.revision);
                    memory.running.insert(key.clone(), replica);
                    if let Some(r) = cas(kv, &key, Some(rev), &new).await {
                        reading.slots.insert(key.clone(), (new, r));
                    }
                    let done = wanted
                        .keys()
                        .filter(|s| s.0 == slot.0)
                        .all(|s| reading.slots.get(&slot_of(s)).is_some_and(|(r, _)| r.digest == d.digest));
                    if done {
                        self.event(d, event_type::ROLLOUT_COMPLETED, json!({"revision": d.current.revision})).await;
                    }
                }
                Some(r) if r.digest == d.digest && rec.revision != d.current.revision => {
                    // A new revision that changes no replica (scale, placement): record it.
                    let new = SlotRecord { revision: d.current.revision, next: None, ..rec };
                    if let Some(r) = cas(kv, &key, Some(rev), &new).await {
                        reading.slots.insert(key, (new, r));
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Starts a replica of `d` for slot `key`; after repeated failures of one revision, marks
    /// the roll-out failed (the replicas of the previous revision keep running). A refusal for
    /// this node's own state (full, draining, stopping) is not the revision's failure.
    async fn start_replica(
        &self,
        kv: &kv::Store,
        d: &Deployment,
        key: &str,
        memory: &mut Memory,
        reading: &mut Reading,
    ) -> Result<Replica, NotStarted> {
        let spec = &d.current.spec;
        let status_key = dep::status_key(&spec.namespace, &spec.name);
        if reading.statuses.get(&status_key).is_some_and(|s| s.failed_digest == d.digest) {
            return Err(NotStarted::Failed);
        }
        match self.mgr.deploy_replica(spec, &d.current.owner, d.current.revision).await {
            Ok(r) => {
                memory.failures.remove(&(key.to_string(), d.digest.clone()));
                tracing::info!(slot = %key, workload = %r.id, revision = d.current.revision, "replica started");
                Ok(Replica { workload_id: r.id, digest: d.digest.clone() })
            }
            Err(e @ (DeployError::AtCapacity | DeployError::LameDuck | DeployError::ShuttingDown)) => {
                tracing::info!(slot = %key, error = %e, "replica not started here");
                Err(NotStarted::NoRoom)
            }
            Err(e) => {
                let n = memory.failures.entry((key.to_string(), d.digest.clone())).or_default();
                *n += 1;
                tracing::warn!(slot = %key, attempt = *n, error = %e, "replica did not start");
                if *n >= START_ATTEMPTS {
                    let status = RolloutStatus {
                        failed_digest: d.digest.clone(),
                        revision: d.current.revision,
                        node: self.me.clone(),
                        error: e.to_string(),
                    };
                    let body = serde_json::to_vec(&status).unwrap_or_default();
                    let _ = kv.put(status_key.as_str(), body.into()).await;
                    reading.statuses.insert(status_key, status);
                    self.event(
                        d,
                        event_type::ROLLOUT_FAILED,
                        json!({"revision": d.current.revision, "error": e.to_string(), "attempts": *n}),
                    )
                    .await;
                }
                Err(NotStarted::Failed)
            }
        }
    }

    /// A `deployment_degraded` event when a deployment's spread is relaxed (fewer eligible live
    /// nodes than replicas, or all of them in one value of its spread tag) or a slot finds no
    /// owner; once per episode, from the first node in order.
    async fn report_degraded(
        &self,
        deployments: &BTreeMap<String, Deployment>,
        wanted: &BTreeMap<SlotId, Option<(Owner, u64)>>,
        live: &BTreeMap<String, bool>,
        eligible: &(dyn Fn(&str, &str) -> bool + Sync),
        domain: &(dyn Fn(&str, &str) -> String + Sync),
        memory: &mut Memory,
    ) {
        if live.keys().next().map(String::as_str) != Some(self.me.as_str()) {
            memory.degraded.clear();
            return;
        }
        for (id, d) in deployments {
            let nodes: Vec<&String> =
                live.iter().filter(|(n, draining)| !**draining && eligible(n, id)).map(|(n, _)| n).collect();
            let domains: BTreeSet<String> = nodes.iter().map(|n| domain(n, id)).collect();
            let unowned = wanted
                .iter()
                .filter(|(s, o)| s.0 == *id && o.as_ref().is_none_or(|(o, _)| !live.contains_key(&o.node)))
                .count();
            let replicas = d.current.spec.replicas as usize;
            let degraded = d.current.spec.spread_relaxed(domains.len()) || unowned > 0;
            if degraded && memory.degraded.insert(id.clone()) {
                let mut data = json!({"replicas": replicas, "eligible_nodes": nodes.len(), "unowned": unowned});
                if let Some(tag) = &d.current.spec.placement.spread {
                    data["spread"] = json!(tag);
                    data["spread_values"] = json!(domains.len());
                }
                self.event(d, event_type::DEPLOYMENT_DEGRADED, data).await;
            } else if !degraded {
                memory.degraded.remove(id);
            }
        }
    }

    async fn stop_id(&self, id: &str) {
        if let Some(w) = self.mgr.get(id) {
            self.mgr.stop_workload(&w).await;
        }
    }

    async fn event(&self, d: &Deployment, kind: &str, mut data: serde_json::Value) {
        let spec = &d.current.spec;
        if let Some(m) = data.as_object_mut() {
            m.insert("deployment".into(), json!(spec.name));
            m.insert("node".into(), json!(self.me));
        }
        self.mgr.events().deployment_event(&spec.namespace, kind, &data).await;
    }
}

/// Writes `rec` to `key`: create-only when `expect` is `None`, else only on that revision. The
/// new revision, or `None` when another writer won.
/// Reads a spec key's whole history and what it amounts to (the revision in force, and why any
/// other does not count). `nex` reads deployments with it too.
pub async fn resolve(kv: &kv::Store, key: &str) -> Result<dep::Resolved> {
    let mut history = Vec::new();
    let mut h = kv.history(key).await.with_context(|| format!("reading the history of {key}"))?;
    while let Some(e) = h.next().await {
        let e = e.with_context(|| format!("reading the history of {key}"))?;
        let value = (e.operation == kv::Operation::Put).then(|| e.value.to_vec());
        history.push(HistoryEntry { revision: e.revision, value });
    }
    Ok(dep::resolve(key, &history))
}

async fn cas(kv: &kv::Store, key: &str, expect: Option<u64>, rec: &SlotRecord) -> Option<u64> {
    let body: bytes::Bytes = serde_json::to_vec(rec).unwrap_or_default().into();
    let res = match expect {
        None => kv.create(key, body).await.map_err(|e| e.to_string()),
        Some(rev) => kv.update(key, body, rev).await.map_err(|e| e.to_string()),
    };
    match res {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::debug!(slot = %key, error = %e, "slot write lost");
            None
        }
    }
}
