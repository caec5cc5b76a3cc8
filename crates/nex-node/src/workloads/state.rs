//! The one owner of lifecycle state: running workloads, restart chains, reservations (slots and
//! bytes) of deploys in flight, lame duck and shutdown, behind one lock. Every change is one
//! method that takes the lock once, so no check can be separated from its act: a burst of DEPLOYs
//! cannot exceed `max_workloads`, a STOP that ended a chain cannot be undone by the restart it
//! raced, and nothing is added once shutdown began.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::error::DeployError;
use super::Workload;

/// An essential workload's restarts, across its successive instances.
#[derive(Debug, Clone)]
pub(super) struct Chain {
    /// Restarts since the last stable run.
    pub attempts: u32,
    /// The latest instance; a STOP naming it ends a restart still waiting in its back-off.
    pub current_id: String,
    pub issuer: String,
    pub name: String,
    pub namespace: String,
}

#[derive(Default)]
struct Inner {
    workloads: HashMap<String, Arc<Workload>>,
    chains: HashMap<u64, Chain>,
    next_chain: u64,
    /// Deploys that hold a slot but are not running yet.
    pending: usize,
    /// Bytes of running workloads and of deploys in flight.
    bytes: u64,
    lameduck: bool,
    shutting_down: bool,
}

/// The lifecycle state of one node.
#[derive(Default)]
pub(super) struct Lifecycle {
    inner: Mutex<Inner>,
    idle: tokio::sync::Notify,
}

/// A slot (and bytes) held by a deploy in flight; given back when dropped uncommitted.
pub(super) struct Reservation {
    state: Arc<Lifecycle>,
    bytes: u64,
    held: bool,
}

impl Reservation {
    /// Bytes this reservation holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held {
            let mut s = self.state.lock();
            s.pending = s.pending.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(self.bytes);
            let idle = s.pending == 0;
            drop(s);
            if idle {
                self.state.idle.notify_waiters();
            }
        }
    }
}

/// The restart chain a committed workload belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChainSlot {
    /// Not essential.
    None,
    /// Essential, first instance: a new chain.
    New,
    /// A restart of chain `c`.
    Existing(u64),
}

/// Why a deploy in flight could not become a running workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CommitRefused {
    /// The node began shutting down meanwhile.
    ShuttingDown,
    /// A STOP ended the restart chain meanwhile.
    ChainEnded,
}

impl Lifecycle {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave half a transition behind (each is one call), so the
        // data is consistent even if the lock was poisoned.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for a new deploy: refused in lame duck, during shutdown, or when running
    /// workloads and deploys in flight already fill `max_workloads` (0 = unlimited). A restart
    /// (`restart`) is not refused for lame duck here: its chain decides.
    pub fn reserve(self: &Arc<Self>, max_workloads: u64, restart: bool) -> Result<Reservation, DeployError> {
        let mut s = self.lock();
        if s.shutting_down {
            return Err(DeployError::ShuttingDown);
        }
        if s.lameduck && !restart {
            return Err(DeployError::LameDuck);
        }
        if max_workloads > 0 && (s.workloads.len() + s.pending) as u64 >= max_workloads {
            return Err(DeployError::AtCapacity);
        }
        s.pending += 1;
        Ok(Reservation { state: self.clone(), bytes: 0, held: true })
    }

    /// Adds `size` bytes to a reservation: refused when the artifact alone exceeds `max_one` or
    /// everything running and in flight would exceed `max_total` (0 = unlimited).
    pub fn reserve_bytes(
        &self,
        r: &mut Reservation,
        size: u64,
        max_one: u64,
        max_total: u64,
    ) -> Result<(), DeployError> {
        if max_one > 0 && size > max_one {
            return Err(DeployError::TooLarge);
        }
        let mut s = self.lock();
        let total = s.bytes.saturating_add(size);
        if max_total > 0 && total > max_total {
            return Err(DeployError::TotalTooLarge);
        }
        s.bytes = total;
        r.bytes = r.bytes.saturating_add(size);
        Ok(())
    }

    /// Turns a reservation into running workload `w` (its bytes now the workload's, given back
    /// by [`Lifecycle::remove`]). An essential workload gets a new restart chain (none in lame
    /// duck: it is then not essential); a restart commits only while its chain lives, and the
    /// chain then points at `w`. `w.chain` records the chain.
    pub fn commit(&self, mut r: Reservation, w: Arc<Workload>, chain: ChainSlot) -> Result<(), CommitRefused> {
        let mut s = self.lock();
        if s.shutting_down {
            return Err(CommitRefused::ShuttingDown);
        }
        match chain {
            ChainSlot::None => {}
            ChainSlot::New if s.lameduck => w.essential.store(false, Ordering::SeqCst),
            ChainSlot::New => {
                s.next_chain += 1;
                let id = s.next_chain;
                let ch = Chain {
                    attempts: 0,
                    current_id: w.id.clone(),
                    issuer: w.issuer.clone(),
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                };
                s.chains.insert(id, ch);
                w.chain.store(id, Ordering::SeqCst);
            }
            ChainSlot::Existing(c) => match s.chains.get_mut(&c) {
                Some(ch) => {
                    ch.current_id = w.id.clone();
                    w.chain.store(c, Ordering::SeqCst);
                }
                None => return Err(CommitRefused::ChainEnded),
            },
        }
        s.pending = s.pending.saturating_sub(1);
        crate::telemetry::workload_started(&w);
        s.workloads.insert(w.id.clone(), w);
        r.held = false;
        let idle = s.pending == 0;
        drop(s);
        if idle {
            self.idle.notify_waiters();
        }
        Ok(())
    }

    /// Removes a workload and gives back its bytes; false when it was not there.
    pub fn remove(&self, id: &str, bytes: u64) -> bool {
        let mut s = self.lock();
        let Some(w) = s.workloads.remove(id) else { return false };
        s.bytes = s.bytes.saturating_sub(bytes);
        crate::telemetry::workload_ended(&w);
        true
    }

    /// The next back-off of chain `c` after an instance that ran for `ran`: 1 s doubling to 30 s,
    /// reset after a minute up; `None` when the chain ended (STOP, lame duck, shutdown).
    pub fn next_backoff(&self, c: u64, ran: Duration) -> Option<Duration> {
        let mut s = self.lock();
        if s.lameduck || s.shutting_down {
            s.chains.remove(&c);
            return None;
        }
        let ch = s.chains.get_mut(&c)?;
        if ran >= Duration::from_secs(60) {
            ch.attempts = 0;
        }
        let d = Duration::from_secs(1u64 << ch.attempts.min(5)).min(Duration::from_secs(30));
        ch.attempts = ch.attempts.saturating_add(1);
        Some(d)
    }

    /// True while chain `c` may still restart.
    pub fn chain_alive(&self, c: u64) -> bool {
        let s = self.lock();
        !s.lameduck && !s.shutting_down && s.chains.contains_key(&c)
    }

    /// Ends chain `c` for good.
    pub fn end_chain(&self, c: u64) {
        self.lock().chains.remove(&c);
    }

    /// Ends the chain whose latest instance is `id` in namespace `ns` (a STOP for an instance
    /// waiting in its back-off), if `allow` accepts it; the chain as it was.
    pub fn end_chain_of<E>(
        &self,
        id: &str,
        ns: &str,
        allow: impl FnOnce(&Chain) -> Result<(), E>,
    ) -> Option<Result<Chain, E>> {
        let mut s = self.lock();
        let key = s
            .chains
            .iter()
            .find(|(_, c)| c.current_id == id && c.namespace.eq_ignore_ascii_case(ns))
            .map(|(k, _)| *k)?;
        let ch = s.chains.get(&key)?.clone();
        Some(allow(&ch).map(|()| {
            s.chains.remove(&key);
            ch
        }))
    }

    /// Enters lame duck mode; the running workloads (to be made non-essential), or `None` when
    /// already in it.
    pub fn enter_lameduck(&self) -> Option<Vec<Arc<Workload>>> {
        let mut s = self.lock();
        if s.lameduck {
            return None;
        }
        s.lameduck = true;
        s.chains.clear();
        Some(s.workloads.values().cloned().collect())
    }

    /// True in lame duck mode.
    pub fn in_lameduck(&self) -> bool {
        self.lock().lameduck
    }

    /// Begins shutdown: no more deploys, restarts or commits.
    pub fn begin_shutdown(&self) {
        let mut s = self.lock();
        s.shutting_down = true;
        s.chains.clear();
    }

    /// Waits (at most `within`) until no deploy is in flight.
    pub async fn wait_idle(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().pending == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// A running workload.
    pub fn get(&self, id: &str) -> Option<Arc<Workload>> {
        self.lock().workloads.get(id).cloned()
    }

    /// Every running workload, by id.
    pub fn all(&self) -> Vec<Arc<Workload>> {
        let mut v: Vec<_> = self.lock().workloads.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// How many workloads run.
    pub fn count(&self) -> usize {
        self.lock().workloads.len()
    }

    /// Whether one more workload fits under `max_workloads` (0: no limit), deploys in flight
    /// counted.
    pub fn has_room(&self, max_workloads: u64) -> bool {
        let s = self.lock();
        max_workloads == 0 || ((s.workloads.len() + s.pending) as u64) < max_workloads
    }
}
