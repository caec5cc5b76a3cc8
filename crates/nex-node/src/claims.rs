//! Who runs which replica, decided by the nodes themselves: no controller, no leader.
//!
//! A deployment of N replicas has N slots, each a key in the deployments bucket naming its
//! owner. A node's liveness is its heartbeat key, which expires unless renewed. Every node reads
//! the slots and the live heartbeats and, from that view alone, decides what to write:
//!
//! * replicas are spread over *domains*: each node is its own domain, or, when a deployment
//!   spreads by a tag such as `zone`, the nodes sharing that tag's value form one; a node's load
//!   is (its domain's replicas, its own replicas) of that deployment, compared in that order;
//! * an unowned slot, or one whose owner's heartbeat lapsed, is claimed by the eligible nodes
//!   with the least load; the write is create-only or an update on the revision read, so when
//!   several race exactly one wins;
//! * an owner whose domain runs at least two replicas more of a deployment than another domain,
//!   or that runs two more than another node of its own domain (or that drains), offers one
//!   slot to the least loaded such node (`handoff`); the target starts its replica, then takes
//!   the slot on the offer's revision, and only then does the old owner, seeing the slot is no
//!   longer its own, stop its replica (start new, then stop old);
//! * an offer to a node that is gone or no longer eligible is withdrawn by the owner;
//! * a node runs a slot only while the bucket says it is its own, and stops what is not.
//!
//! The bucket holds at most one owner per slot by construction (compare-and-swap); what this
//! module decides is how slots find owners and move without two writers believing they won.
//! [`tests`] run it in a model of nodes, heartbeats with TTLs, crashes and partitions.

use std::collections::{BTreeMap, BTreeSet};

/// A replica slot: deployment name and index.
pub type SlotId = (String, u32);

/// What a slot key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The node that runs the replica.
    pub node: String,
    /// The node the slot is offered to, which starts its replica before taking the slot.
    pub handoff: Option<String>,
}

impl Owner {
    /// Owned by `node`, not offered.
    pub fn new(node: &str) -> Owner {
        Owner { node: node.to_string(), handoff: None }
    }
}

/// One node's reading of the bucket.
pub struct View<'a> {
    /// The reading node.
    pub me: &'a str,
    /// Nodes whose heartbeat is live, and whether each drains (lame duck).
    pub live: &'a BTreeMap<String, bool>,
    /// Every wanted slot with its owner and the revision read, `None` when unowned.
    pub slots: &'a BTreeMap<SlotId, Option<(Owner, u64)>>,
    /// Whether a node may run a deployment's replicas (placement).
    pub eligible: &'a dyn Fn(&str, &str) -> bool,
    /// The domain an eligible node belongs to for a deployment's spread: the node itself, or
    /// the value of the tag the deployment spreads by.
    pub domain: &'a dyn Fn(&str, &str) -> String,
    /// Whether a node has room for one more workload (`max_workloads`): a full node keeps what
    /// it runs but claims nothing, and declines what it is offered.
    pub room: &'a dyn Fn(&str) -> bool,
    /// Slots of ours whose replica we cannot replace here (no room for a roll-out's new
    /// replica): offered to another node as a draining node's are.
    pub shed: &'a BTreeSet<SlotId>,
}

/// Replicas of one deployment per eligible node and per domain (owned slots plus offers made).
struct Loads<'a> {
    node: BTreeMap<&'a str, usize>,
    /// The eligible nodes with room for another workload.
    room: BTreeSet<&'a str>,
    domain_of: BTreeMap<&'a str, String>,
    domain: BTreeMap<String, usize>,
}

impl<'a> Loads<'a> {
    /// (domain load, node load) of an eligible node: the lower, the likelier it takes a replica.
    fn key(&self, n: &str) -> Option<(usize, usize)> {
        let load = *self.node.get(n)?;
        Some((self.domain.get(self.domain_of.get(n)?).copied().unwrap_or(0), load))
    }

    fn add(&mut self, n: &str, more: bool) {
        let (Some(l), Some(d)) = (self.node.get_mut(n), self.domain_of.get(n)) else { return };
        let dl = self.domain.entry(d.clone()).or_default();
        if more {
            *l += 1;
            *dl += 1;
        } else {
            *l = l.saturating_sub(1);
            *dl = dl.saturating_sub(1);
        }
    }

    /// Where one of `me`'s replicas should go to even out the spread, if anywhere: the least
    /// loaded node of a domain with two fewer replicas than ours, else a node of our own domain
    /// with two fewer than us; any least loaded node when we may not run the deployment or must
    /// give this replica up (`leaving`).
    fn move_target(&self, me: &str, leaving: bool) -> Option<&'a str> {
        let others = || self.room.iter().copied().filter(|n| *n != me);
        let Some((my_domain, mine)) = self.key(me).filter(|_| !leaving) else {
            return others().min_by_key(|n| (self.key(n), *n));
        };
        let home = self.domain_of.get(me);
        let across = others()
            .filter(|n| self.domain_of.get(n) != home)
            .min_by_key(|n| (self.key(n), *n))
            .filter(|n| self.key(n).is_some_and(|(d, _)| d + 2 <= my_domain));
        across.or_else(|| {
            others()
                .filter(|n| self.domain_of.get(n) == home)
                .min_by_key(|n| (self.node[n], *n))
                .filter(|n| self.node[n] + 2 <= mine)
        })
    }
}

/// A write to the bucket, always conditional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Writes `owner` to `slot`: create-only when `expect` is `None`, else only on revision
    /// `expect`. Claims, offers and withdrawals of offers.
    Write { slot: SlotId, expect: Option<u64>, owner: Owner },
    /// The slot is offered to this node: start its replica, then write it as this node's on
    /// revision `expect` (and stop the replica should that write lose).
    Accept { slot: SlotId, expect: u64 },
}

impl<'a> View<'a> {
    fn can_run(&self, node: &str, deployment: &str) -> bool {
        self.live.get(node).is_some_and(|draining| !draining) && (self.eligible)(node, deployment)
    }

    /// Replicas of `deployment` per eligible node and domain: owned slots plus offers made.
    fn loads(&self, deployment: &str) -> Loads<'a> {
        let live: &'a BTreeMap<String, bool> = self.live;
        let node: BTreeMap<&'a str, usize> =
            live.keys().filter(|n| self.can_run(n, deployment)).map(|n| (n.as_str(), 0)).collect();
        let domain_of = node.keys().map(|n| (*n, (self.domain)(n, deployment))).collect();
        let room = node.keys().copied().filter(|n| (self.room)(n)).collect();
        let mut loads = Loads { node, room, domain_of, domain: BTreeMap::new() };
        for ((d, _), s) in self.slots {
            let Some((o, _)) = s else { continue };
            if d != deployment {
                continue;
            }
            for n in std::iter::once(&o.node).chain(o.handoff.iter()) {
                loads.add(n, true);
            }
        }
        loads
    }

    /// The writes this node should attempt now.
    pub fn plan(&self) -> Vec<Action> {
        if !self.live.contains_key(self.me) {
            // Without a live heartbeat of our own nobody would see our claims as live.
            return Vec::new();
        }
        let mut actions = Vec::new();
        let deployments: BTreeSet<&str> = self.slots.keys().map(|(d, _)| d.as_str()).collect();
        for d in deployments {
            let mut loads = self.loads(d);
            let mine_eligible = loads.node.contains_key(self.me);
            let range = (d.to_string(), 0)..=(d.to_string(), u32::MAX);
            // Evening out the spread moves one replica at a time per deployment, the one in
            // flight included (a draining node offers them all at once).
            let mut offered = mine_eligible
                && self
                    .slots
                    .range(range.clone())
                    .any(|(_, s)| s.as_ref().is_some_and(|(o, _)| o.node == self.me && o.handoff.is_some()));
            for (slot, s) in self.slots.range(range) {
                match s {
                    Some((o, rev)) if o.node == self.me => {
                        if let Some(t) = &o.handoff {
                            if !self.can_run(t, d) {
                                actions.push(Action::Write {
                                    slot: slot.clone(),
                                    expect: Some(*rev),
                                    owner: Owner::new(self.me),
                                });
                            }
                            continue;
                        }
                        let leaving = self.shed.contains(slot);
                        if offered && !leaving {
                            continue;
                        }
                        if let Some(t) = loads.move_target(self.me, leaving) {
                            loads.add(self.me, false);
                            loads.add(t, true);
                            actions.push(Action::Write {
                                slot: slot.clone(),
                                expect: Some(*rev),
                                owner: Owner { node: self.me.to_string(), handoff: Some(t.to_string()) },
                            });
                            offered |= !leaving;
                        }
                    }
                    Some((o, rev)) if o.handoff.as_deref() == Some(self.me) && self.live.contains_key(&o.node) => {
                        if mine_eligible && (self.room)(self.me) {
                            actions.push(Action::Accept { slot: slot.clone(), expect: *rev });
                        } else {
                            // Full, or no longer eligible: decline, so the owner offers it
                            // elsewhere.
                            actions.push(Action::Write {
                                slot: slot.clone(),
                                expect: Some(*rev),
                                owner: Owner::new(&o.node),
                            });
                        }
                    }
                    Some((o, rev)) if !self.live.contains_key(&o.node) => {
                        self.claim(&mut loads, slot, Some(*rev), &mut actions);
                    }
                    None => self.claim(&mut loads, slot, None, &mut actions),
                    Some(_) => {}
                }
            }
        }
        actions
    }

    /// Claims `slot` when we have room and no eligible node with room has less load for its
    /// deployment than we do.
    fn claim(&self, loads: &mut Loads<'a>, slot: &SlotId, expect: Option<u64>, actions: &mut Vec<Action>) {
        let Some(mine) = loads.key(self.me).filter(|_| loads.room.contains(self.me)) else { return };
        if loads.room.iter().any(|n| loads.key(n) < Some(mine)) {
            return;
        }
        loads.add(self.me, true);
        actions.push(Action::Write { slot: slot.clone(), expect, owner: Owner::new(self.me) });
    }
}

/// Whether `node` should be running `slot`'s replica given what the bucket holds: it owns it
/// (an offer it made included: it stops only once the target took the slot).
pub fn runs(node: &str, slot: Option<&(Owner, u64)>) -> bool {
    slot.is_some_and(|(o, _)| o.node == node)
}

#[cfg(test)]
mod tests {
    //! A model: a compare-and-swap store with expiring heartbeats, nodes that tick at random,
    //! crash (their replicas die with them), restart, are cut off from the store (their
    //! replicas keep running) and come back, drain; then a calm period in which every slot must
    //! find an owner and every duplicate go.
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const TTL: u64 = 30; // ticks a heartbeat lives
    const NODES: usize = 4;

    /// "web" spreads by zone: n0 and n1 are in zone a, n2 in zone b, and n3 has no zone, so it
    /// runs none. "fn" spreads by node.
    fn zone(node: &str) -> Option<&'static str> {
        match node {
            "n0" | "n1" => Some("a"),
            "n2" => Some("b"),
            _ => None,
        }
    }
    fn eligible(node: &str, deployment: &str) -> bool {
        deployment != "web" || zone(node).is_some()
    }
    fn domain(node: &str, deployment: &str) -> String {
        match deployment {
            "web" => zone(node).unwrap_or_default().to_string(),
            _ => node.to_string(),
        }
    }
    fn by_node(node: &str, _: &str) -> String {
        node.to_string()
    }

    #[derive(Default)]
    struct Store {
        rev: u64,
        slots: BTreeMap<SlotId, (Owner, u64)>,
        heartbeats: BTreeMap<String, (u64, bool)>, // expiry, draining
        /// Every successful write: slot, revision it replaced (None = create), new revision.
        writes: Vec<(SlotId, Option<u64>, u64)>,
    }

    impl Store {
        fn cas(&mut self, slot: &SlotId, expect: Option<u64>, owner: Owner) -> Option<u64> {
            let current = self.slots.get(slot).map(|(_, r)| *r);
            if current != expect {
                return None;
            }
            self.rev += 1;
            self.slots.insert(slot.clone(), (owner, self.rev));
            self.writes.push((slot.clone(), expect, self.rev));
            Some(self.rev)
        }
    }

    #[derive(PartialEq, Clone, Copy, Debug)]
    enum State {
        Up,
        Crashed,
        Cut,
    }

    struct Node {
        name: String,
        state: State,
        draining: bool,
        running: BTreeSet<SlotId>,
        /// Slots offered to us whose replica is starting: the offer's revision.
        starting: BTreeMap<SlotId, u64>,
        /// When in every 5 ticks the node reads the store.
        phase: u64,
    }

    fn tick(store: &mut Store, node: &mut Node, now: u64, wanted: &[SlotId]) {
        store.heartbeats.insert(node.name.clone(), (now + TTL, node.draining));
        let live: BTreeMap<String, bool> =
            store.heartbeats.iter().filter(|(_, (exp, _))| *exp > now).map(|(n, (_, d))| (n.clone(), *d)).collect();
        let slots: BTreeMap<SlotId, Option<(Owner, u64)>> =
            wanted.iter().map(|s| (s.clone(), store.slots.get(s).cloned())).collect();
        // A replica whose start was begun on an earlier tick is up now: take the slot.
        for (slot, rev) in std::mem::take(&mut node.starting) {
            if store.cas(&slot, Some(rev), Owner::new(&node.name)).is_none() {
                node.running.remove(&slot);
            }
        }
        let view = View {
            me: &node.name,
            live: &live,
            slots: &slots,
            eligible: &eligible,
            domain: &domain,
            room: &roomy,
            shed: &SHED_NONE,
        };
        for a in view.plan() {
            match a {
                Action::Write { slot, expect, owner } => {
                    let mine = owner.node == node.name;
                    if store.cas(&slot, expect, owner).is_some() && mine {
                        node.running.insert(slot);
                    }
                }
                Action::Accept { slot, expect } => {
                    node.running.insert(slot.clone());
                    node.starting.insert(slot, expect);
                }
            }
        }
        // Converge: run what is ours (a restarted node finds its slots still its own while its
        // heartbeat lived), stop what is not.
        let starting = &node.starting;
        node.running.retain(|s| starting.contains_key(s) || runs(&node.name, store.slots.get(s)));
        for s in wanted {
            if runs(&node.name, store.slots.get(s)) {
                node.running.insert(s.clone());
            }
        }
    }

    fn simulate(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let replicas = rng.gen_range(1..=5u32);
        let wanted: Vec<SlotId> = (0..replicas)
            .map(|i| ("web".to_string(), i))
            .chain((0..rng.gen_range(1..=3u32)).map(|i| ("fn".to_string(), i)))
            .collect();
        let mut store = Store::default();
        let mut nodes: Vec<Node> = (0..NODES)
            .map(|i| Node {
                name: format!("n{i}"),
                state: State::Up,
                draining: false,
                running: BTreeSet::new(),
                starting: BTreeMap::new(),
                phase: rng.gen_range(0..5),
            })
            .collect();
        let mut duplicate_since: BTreeMap<(String, SlotId), u64> = BTreeMap::new();
        let chaos = 1500;
        let calm = 400;
        for now in 0..chaos + calm {
            if now < chaos && rng.gen_bool(0.02) {
                let n = &mut nodes[rng.gen_range(0..NODES)];
                match (n.state, rng.gen_range(0..4)) {
                    (State::Up, 0) => {
                        n.state = State::Crashed;
                        n.running.clear();
                        n.starting.clear();
                    }
                    (State::Up, 1) => n.state = State::Cut,
                    (State::Up, 2) => n.draining = !n.draining,
                    (State::Crashed, _) => {
                        n.state = State::Up;
                        n.draining = false;
                        n.phase = rng.gen_range(0..5);
                    }
                    (State::Cut, _) => n.state = State::Up,
                    _ => {}
                }
            }
            if now == chaos {
                for n in &mut nodes {
                    n.state = State::Up;
                    n.draining = false;
                }
            }
            // Connected nodes read the store every 5 ticks, in an order that changes.
            let mut order: Vec<usize> = (0..NODES).collect();
            order.sort_by_key(|_| rng.gen::<u32>());
            for i in order {
                let n = &mut nodes[i];
                if n.state == State::Up && (now + n.phase).is_multiple_of(5) {
                    tick(&mut store, n, now, &wanted);
                }
            }
            // No revision was replaced twice: no two writers both believed they won.
            let mut replaced = BTreeSet::new();
            for (slot, prev, _) in &store.writes {
                if let Some(p) = prev {
                    assert!(
                        replaced.insert((slot.clone(), *p)),
                        "seed {seed}: revision {p} of {slot:?} replaced twice"
                    );
                }
            }
            // A connected node runs what the store says is another's (a duplicate, from a
            // partition or a finished handoff) for at most one read interval.
            for n in &nodes {
                for s in &n.running {
                    let key = (n.name.clone(), s.clone());
                    if n.state != State::Up || n.starting.contains_key(s) || runs(&n.name, store.slots.get(s)) {
                        duplicate_since.remove(&key);
                        continue;
                    }
                    let since = *duplicate_since.entry(key).or_insert(now);
                    assert!(
                        now - since <= 5,
                        "seed {seed} t {now}: {} runs {s:?} owned by {:?} since {since}",
                        n.name,
                        store.slots.get(s)
                    );
                }
            }
            let running: BTreeSet<(String, SlotId)> =
                nodes.iter().flat_map(|n| n.running.iter().map(|s| (n.name.clone(), s.clone()))).collect();
            duplicate_since.retain(|k, _| running.contains(k));
        }
        // Calm: every slot owned by a live node that runs it, nobody else runs it, and each
        // deployment is spread evenly.
        for s in &wanted {
            let (o, _) = store.slots.get(s).unwrap_or_else(|| panic!("seed {seed}: {s:?} never claimed"));
            assert_eq!(o.handoff, None, "seed {seed}: {s:?} still offered");
            let runners: Vec<&str> = nodes.iter().filter(|n| n.running.contains(s)).map(|n| n.name.as_str()).collect();
            assert_eq!(runners, vec![o.node.as_str()], "seed {seed}: {s:?} owned by {} runs on {runners:?}", o.node);
        }
        let per_node = |d: &str| {
            let mut per_node = vec![0; NODES];
            for ((sd, _), (o, _)) in &store.slots {
                if sd == d {
                    per_node[o.node[1..].parse::<usize>().unwrap()] += 1;
                }
            }
            per_node
        };
        let even = |loads: &[usize]| loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1;
        let fns = per_node("fn");
        assert!(even(&fns), "seed {seed}: fn spread {fns:?}");
        // Across zones first (a: n0 + n1, b: n2), then across the nodes of a zone; none on n3.
        let web = per_node("web");
        assert!(even(&[web[0] + web[1], web[2]]) && even(&web[..2]) && web[3] == 0, "seed {seed}: web spread {web:?}");
    }

    #[test]
    fn deployment_claims_have_one_winner_and_every_slot_an_owner_over_many_seeds() {
        for seed in 0..300 {
            simulate(seed);
        }
    }

    type Slots = BTreeMap<SlotId, Option<(Owner, u64)>>;

    static SHED_NONE: BTreeSet<SlotId> = BTreeSet::new();

    fn everyone(_: &str, _: &str) -> bool {
        true
    }

    fn roomy(_: &str) -> bool {
        true
    }

    /// `me`'s view when every node is eligible, its own domain and has room, and nothing is shed.
    fn plain<'a>(me: &'a str, live: &'a BTreeMap<String, bool>, slots: &'a Slots) -> View<'a> {
        View { me, live, slots, eligible: &everyone, domain: &by_node, room: &roomy, shed: &SHED_NONE }
    }

    #[test]
    fn racing_claims_of_one_slot_have_one_winner() {
        let live: BTreeMap<String, bool> = [("a".into(), false), ("b".into(), false)].into();
        let slots: Slots = [(("web".into(), 0), None)].into();
        let mut store = Store::default();
        let plans: Vec<Vec<Action>> = ["a", "b"].iter().map(|me| plain(me, &live, &slots).plan()).collect();
        let wins = plans
            .into_iter()
            .flatten()
            .filter(|a| match a {
                Action::Write { slot, expect, owner } => store.cas(slot, *expect, owner.clone()).is_some(),
                Action::Accept { .. } => false,
            })
            .count();
        assert_eq!(wins, 1);
    }

    #[test]
    fn a_draining_owner_offers_and_the_target_accepts_before_it_stops() {
        let live: BTreeMap<String, bool> = [("a".into(), true), ("b".into(), false)].into();
        let slots: Slots = [(("web".into(), 0), Some((Owner::new("a"), 7)))].into();
        assert_eq!(
            plain("a", &live, &slots).plan(),
            vec![Action::Write {
                slot: ("web".into(), 0),
                expect: Some(7),
                owner: Owner { node: "a".into(), handoff: Some("b".into()) }
            }]
        );
        let offered: Slots =
            [(("web".into(), 0), Some((Owner { node: "a".into(), handoff: Some("b".into()) }, 8)))].into();
        assert_eq!(plain("b", &live, &offered).plan(), vec![Action::Accept { slot: ("web".into(), 0), expect: 8 }]);
        // The old owner keeps running until the slot is the target's.
        assert!(runs("a", offered[&("web".to_string(), 0)].as_ref()));
        // A node that placement excludes never claims.
        let unowned: Slots = [(("web".into(), 0), None)].into();
        let none = View { eligible: &|n, _| n != "b", ..plain("b", &live, &unowned) };
        assert!(none.plan().is_empty());
    }

    #[test]
    fn a_full_node_keeps_its_replicas_but_claims_nothing_and_declines_offers() {
        let live: BTreeMap<String, bool> = [("a".into(), true), ("b".into(), false), ("c".into(), false)].into();
        let room = |n: &str| n != "b";
        let slots: Slots = [(("web".into(), 0), Some((Owner::new("a"), 3))), (("web".into(), 1), None)].into();
        let view = |me| View { room: &room, ..plain(me, &live, &slots) };
        // c has room, b does not: c claims the free slot though b runs fewer, and draining a
        // offers its slot to c.
        assert!(view("b").plan().is_empty());
        assert_eq!(
            view("c").plan(),
            vec![Action::Write { slot: ("web".into(), 1), expect: None, owner: Owner::new("c") }]
        );
        let offer = |to: &str| Owner { node: "a".into(), handoff: Some(to.into()) };
        assert!(view("a").plan().contains(&Action::Write {
            slot: ("web".into(), 0),
            expect: Some(3),
            owner: offer("c")
        }));
        // A node offered a slot after it filled up declines it rather than accept, and the owner
        // keeps the slot until then.
        let offered: Slots = [(("web".into(), 0), Some((offer("b"), 4)))].into();
        let view = |me| View { room: &room, ..plain(me, &live, &offered) };
        assert_eq!(
            view("b").plan(),
            vec![Action::Write { slot: ("web".into(), 0), expect: Some(4), owner: Owner::new("a") }]
        );
        assert!(view("a").plan().is_empty());
        // A slot whose roll-out has no room on its owner is offered though the spread is even.
        let live: BTreeMap<String, bool> = [("a".into(), false), ("c".into(), false)].into();
        let slots: Slots =
            [(("web".into(), 0), Some((Owner::new("a"), 5))), (("web".into(), 1), Some((Owner::new("c"), 6)))].into();
        let shed: BTreeSet<SlotId> = [("web".into(), 0)].into();
        let view = View { shed: &shed, ..plain("a", &live, &slots) };
        assert_eq!(view.plan(), vec![Action::Write { slot: ("web".into(), 0), expect: Some(5), owner: offer("c") }]);
    }
}
