//! Deployments kept running by the nodes themselves, on a 3-server NATS cluster with 3 nodes
//! (each node on its own server): placement, a node killed, a rolling update, a node cut off
//! from NATS and back, removal, a function's replicas answering once, a draining node.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use nex_api::deployment::{SlotRecord, BUCKET};
use serde_json::{json, Value};

/// A variable of the service's environment that the bucket must never show.
const SECRET: &str = "tok-5f1e2d9c8b7a";

/// The nodes' heartbeat TTL here: a dead node's replicas move within about this long.
const TTL_MS: u64 = 4000;

struct Fleet {
    cluster: Cluster,
    nodes: Vec<Node>,
    nc: async_nats::Client,
    home: tempfile::TempDir,
    seed: String,
    /// The fleet xkey seed file every node gets (unless its extra config says otherwise).
    fleet_xk: String,
}

impl Fleet {
    async fn start() -> Fleet {
        Fleet::start_with(|_, _| json!({})).await
    }

    /// Three nodes; node `i`'s config also has `extra(i, the deploying issuer's public key)`.
    async fn start_with(extra: impl Fn(usize, &str) -> Value) -> Fleet {
        let home = tempfile::tempdir().unwrap();
        let kp = nkeys::KeyPair::new_account();
        let seed = home.path().join("issuer.nk");
        std::fs::write(&seed, kp.seed().unwrap()).unwrap();
        let fleet_xk = home.path().join("fleet.xk");
        let out = std::process::Command::new(nex_bin())
            .args(["node", "fleet-xkey", "--out", fleet_xk.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let fleet_xk = fleet_xk.to_str().unwrap().to_string();
        let cluster = Cluster::start(3).await;
        let nc = cluster.servers[0].connect().await;
        let js = async_nats::jetstream::new(nc.clone());
        // Replicated, as an operator creates them for a cluster (the CLI makes R1 ones when
        // missing): a stopped server loses neither.
        js.create_key_value(async_nats::jetstream::kv::Config {
            bucket: BUCKET.into(),
            history: 64,
            num_replicas: 3,
            limit_markers: Some(Duration::from_secs(5)),
            ..Default::default()
        })
        .await
        .unwrap();
        js.create_object_store(async_nats::jetstream::object_store::Config {
            bucket: "NEXCLIFILES".into(),
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut nodes = Vec::new();
        for (i, s) in cluster.servers.iter().enumerate() {
            let mut cfg = json!({"deployment_ttl_ms": TTL_MS, "fleet_xkey_seed_path": fleet_xk});
            for (k, v) in extra(i, &kp.public_key()).as_object().unwrap() {
                cfg[k] = v.clone();
            }
            nodes.push(Node::start(s, cfg).await);
        }
        Fleet { cluster, nodes, nc, seed: seed.to_str().unwrap().to_string(), home, fleet_xk }
    }

    /// Starts another node, with the fleet key, on server `server`.
    async fn add_node(&mut self, server: usize) {
        let cfg = json!({"deployment_ttl_ms": TTL_MS, "fleet_xkey_seed_path": self.fleet_xk});
        self.nodes.push(Node::start(&self.cluster.servers[server], cfg).await);
    }

    fn nex(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(nex_bin())
            .args(args)
            .env("NATS_URL", self.cluster.servers[0].url())
            .env("HOME", self.home.path())
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }

    /// Applies `spec`; the bucket revision it was written as.
    fn apply(&self, spec: &Value) -> u64 {
        self.apply_as(spec, &self.seed)
    }

    /// Applies `spec` signed with the account seed in the file `seed`.
    fn apply_as(&self, spec: &Value, seed: &str) -> u64 {
        let p = self.home.path().join(format!("{}.json", rand_name()));
        std::fs::write(&p, spec.to_string()).unwrap();
        let out = self.nex(&["apply", "-f", p.to_str().unwrap(), "--issuer", seed]);
        assert!(out.status.success(), "apply failed: {}", String::from_utf8_lossy(&out.stderr));
        let out = String::from_utf8_lossy(&out.stdout);
        let rev = out
            .split("as revision ")
            .nth(1)
            .or_else(|| out.split("unchanged (revision ").nth(1))
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok());
        rev.unwrap_or_else(|| panic!("apply printed no revision: {out}"))
    }

    /// Workloads each node runs in `default`, by node index (a node that does not answer: none).
    async fn per_node(&self) -> Vec<Vec<nex_api::control::MachineSummary>> {
        let c = nex_client::ControlClient::new(self.nc.clone(), Duration::from_secs(2), "default");
        let mut out = Vec::new();
        for n in &self.nodes {
            out.push(c.node_info(&n.id).await.map(|i| i.machines).unwrap_or_default());
        }
        out
    }

    /// The slot records in the bucket, by key (none while JetStream elects a leader).
    async fn slots(&self) -> BTreeMap<String, SlotRecord> {
        let mut out = BTreeMap::new();
        let Ok(kv) = async_nats::jetstream::new(self.nc.clone()).get_key_value(BUCKET).await else { return out };
        let Ok(mut keys) = kv.keys().await else { return out };
        while let Some(Ok(k)) = keys.next().await {
            if k.starts_with("slot.") {
                if let Ok(Some(v)) = kv.get(k.as_str()).await {
                    out.insert(k, serde_json::from_slice(&v).unwrap());
                }
            }
        }
        out
    }

    fn logs(&self) -> String {
        self.nodes.iter().map(|n| format!("--- node {}\n{}", n.id, n.log())).collect()
    }
}

fn rand_name() -> String {
    format!("{:x}", rand::random::<u64>())
}

/// The instances of the NATS micro service `name` that answer a `$SRV.PING` within 300 ms.
async fn answering(nc: &async_nats::Client, name: &str) -> Vec<String> {
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await.unwrap();
    nex_node::nats_ext::round_trip(nc).await.unwrap();
    nc.publish_with_reply(format!("$SRV.PING.{name}"), inbox, "".into()).await.unwrap();
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
        let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        ids.push(v["id"].as_str().unwrap_or_default().to_string());
    }
    ids
}

async fn echo_spec(fleet: &Fleet, replicas: u32, version: &str) -> Value {
    let user = User::new(&fleet.cluster.servers[0]).await;
    let (url, sha) = user.upload("echoservice", &musl_example("echoservice")).await;
    json!({
        "name": "echo",
        "workload_type": "native",
        "artifact": {"url": url, "sha256": sha},
        "environment": {"NATS_URL": fleet.cluster.servers[0].url(), "VERSION": version, "API_TOKEN": SECRET},
        "replicas": replicas,
    })
}

async fn until<F: std::future::Future<Output = bool>>(
    within: Duration,
    what: &str,
    fleet: &Fleet,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Counts per node, sorted by node index.
fn counts(per_node: &[Vec<nex_api::control::MachineSummary>]) -> Vec<usize> {
    per_node.iter().map(Vec::len).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_of_a_service_heals_rolls_out_survives_a_partition_and_is_removed() {
    let mut fleet = Fleet::start().await;
    let v1 = echo_spec(&fleet, 3, "v1").await;
    fleet.apply(&v1);

    // Three replicas, one per node, each answering.
    until(Duration::from_secs(30), "3 replicas, one per node", &fleet, || async {
        counts(&fleet.per_node().await) == [1, 1, 1] && answering(&fleet.nc, "EchoService").await.len() == 3
    })
    .await;
    let get = fleet.nex(&["deployments", "get", "echo"]);
    let get = String::from_utf8_lossy(&get.stdout);
    for n in &fleet.nodes {
        assert!(get.contains(&n.id), "get shows each replica's node:\n{get}");
    }

    // The environment reached the replicas (they connect with its NATS_URL), but the bucket
    // holds it sealed to the fleet key. Copied into another issuer's deployment, the box opens
    // nowhere: its replicas fail to start and the status says why.
    let kv = async_nats::jetstream::new(fleet.nc.clone()).get_key_value(BUCKET).await.unwrap();
    let raw = kv.get("spec.default.echo").await.unwrap().unwrap();
    let raw = String::from_utf8_lossy(&raw).to_string();
    assert!(!raw.contains(SECRET) && !raw.contains("API_TOKEN") && raw.contains("sealed_environment"), "{raw}");
    let record: Value = serde_json::from_str(&raw).unwrap();
    let thief = json!({
        "name": "thief", "workload_type": "native", "artifact": v1["artifact"].clone(),
        "sealed_environment": record["spec"]["sealed_environment"].clone(),
    });
    let other = fleet.home.path().join("thief.nk");
    std::fs::write(&other, nkeys::KeyPair::new_account().seed().unwrap()).unwrap();
    fleet.apply_as(&thief, other.to_str().unwrap());
    until(Duration::from_secs(20), "the copied environment refused", &fleet, || async {
        let s = kv.get("status.default.thief").await.ok().flatten();
        s.is_some_and(|s| String::from_utf8_lossy(&s).contains("was sealed for default/echo of issuer"))
    })
    .await;
    let names: Vec<String> = fleet.per_node().await.into_iter().flatten().map(|m| m.workload.name).collect();
    assert_eq!(names, ["echo", "echo", "echo"], "no replica of the thief runs");
    let out = fleet.nex(&["deployments", "rm", "thief", "--issuer", other.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // SIGKILL one node: its replica runs elsewhere, and once settled there are exactly 3.
    let killed = Instant::now();
    let mut dead = fleet.nodes.remove(2);
    dead.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    until(Duration::from_secs(15), "the killed node's replica rescheduled", &fleet, || async {
        let c = counts(&fleet.per_node().await);
        c.iter().sum::<usize>() == 3 && answering(&fleet.nc, "EchoService").await.len() == 3
    })
    .await;
    let moved_in = killed.elapsed();
    assert!(moved_in < Duration::from_secs(15), "rescheduled in {moved_in:?}");
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(answering(&fleet.nc, "EchoService").await.len(), 3, "never more than 3 once settled");
    }
    drop(dead);
    // A fresh node joins the two survivors.
    fleet.add_node(2).await;

    // Rolling update v1 → v2: at least 2 of 3 answer at every moment; only v2 remains.
    let v2 = echo_spec(&fleet, 3, "v2").await;
    let rev2 = fleet.apply(&v2);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = answering(&fleet.nc, "EchoService").await.len();
        assert!(n >= 2, "only {n} replicas answered during the roll-out\n{}", fleet.logs());
        let slots = fleet.slots().await;
        let done = slots.len() == 3 && slots.values().all(|s| s.revision == rev2 && s.next.is_none());
        let running: Vec<_> = fleet.per_node().await.into_iter().flatten().collect();
        if done
            && running.len() == 3
            && running
                .iter()
                .all(|m| m.workload.description.as_deref().unwrap_or("").ends_with(&format!("revision {rev2}")))
        {
            break;
        }
        assert!(Instant::now() < deadline, "roll-out did not finish: {slots:?}\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Node 1's server stops for 30 s: it keeps its replica running but its slot moves; no slot
    // ever has two owners in the bucket (a key holds one value) and once it is back the
    // duplicate is gone within a TTL.
    let cut = fleet.nodes[1].id.clone();
    fleet.cluster.servers[1].kill();
    let cut_at = Instant::now();
    until(Duration::from_secs(20), "the cut-off node's slot taken by another", &fleet, || async {
        let s = fleet.slots().await;
        s.len() == 3 && s.values().all(|r| r.node != cut && !r.workload_id.is_empty())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(cut_at.elapsed())).await;
    fleet.cluster.servers[1].restart();
    // It rejoins when its client has reconnected (its control API answers again); within one
    // TTL of that it runs nothing, and the slots still name three replicas on the other two.
    let c = nex_client::ControlClient::new(fleet.nc.clone(), Duration::from_millis(500), "default");
    until(Duration::from_secs(30), "the cut-off node reconnected", &fleet, || async {
        c.node_info(&cut).await.is_ok()
    })
    .await;
    let rejoined = Instant::now();
    until(Duration::from_millis(TTL_MS), "the duplicate stopped within one TTL of the rejoin", &fleet, || async {
        let c = counts(&fleet.per_node().await);
        c[1] == 0 && c.iter().sum::<usize>() == 3
    })
    .await;
    eprintln!("partition: duplicate gone {:?} after the rejoin", rejoined.elapsed());
    assert!(fleet.nodes[1].log().contains("no longer owns"), "{}", fleet.nodes[1].log());
    let s = fleet.slots().await;
    let mut owners: Vec<_> = s.values().map(|r| r.workload_id.clone()).collect();
    owners.sort();
    owners.dedup();
    assert!(s.len() == 3 && owners.len() == 3 && s.values().all(|r| r.node != cut), "{s:?}");

    // rm: every replica stops on every node.
    let out = fleet.nex(&["deployments", "rm", "echo", "--issuer", &fleet.seed]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    until(Duration::from_secs(20), "every replica stopped", &fleet, || async {
        counts(&fleet.per_node().await) == [0, 0, 0] && fleet.slots().await.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_of_a_function_answers_once_and_moves_off_a_draining_node() {
    // Nodes 0 and 1 are in zone a, node 2 in zone b. Node 2 accepts only the fleet's issuer,
    // does not hold the fleet key, and gives a function 32 MiB (the others 64).
    let mut fleet = Fleet::start_with(|i, issuer| {
        if i == 2 {
            json!({"valid_issuers": [issuer], "fleet_xkey_seed_path": "", "function_memory_mib": 32,
                   "tags": {"zone": "b"}})
        } else {
            json!({"tags": {"zone": "a"}})
        }
    })
    .await;
    let user = User::new(&fleet.cluster.servers[0]).await;
    let js_src =
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/js/echofunction.js"))
            .unwrap();
    let (url, sha) = user.upload("echofunction.js", &js_src).await;
    let spec = |replicas: u32, triggers: &str| {
        json!({
            "name": "echofn",
            "workload_type": "v8",
            "artifact": {"url": url, "sha256": sha},
            "triggers": [triggers],
            "replicas": replicas,
        })
    };

    // Specs written straight into the bucket that do not check out: one edited under a valid
    // token (2 replicas signed, 3 written) and one with no token. No node runs either.
    let kv = async_nats::jetstream::new(fleet.nc.clone()).get_key_value(BUCKET).await.unwrap();
    let rogue = nex_api::deployment::Spec::parse(
        &json!({"name": "rogue", "workload_type": "v8", "artifact": {"url": url, "sha256": sha},
                "triggers": ["fn.rogue"], "replicas": 2})
        .to_string(),
    )
    .unwrap();
    let mut tampered = nex_api::deployment::Record::apply(&rogue, 0, &nkeys::KeyPair::new_account()).unwrap();
    tampered.spec.as_mut().unwrap().replicas = 3;
    kv.put("spec.default.rogue", tampered.to_bytes().into()).await.unwrap();
    let unsigned = json!({"token": "", "spec": rogue}).to_string();
    kv.put("spec.default.unsigned", unsigned.into()).await.unwrap();

    // Two concurrent applies of different specs: one wins, the other reports the conflict.
    let (a, b) = (fleet.home.path().join("a.json"), fleet.home.path().join("b.json"));
    std::fs::write(&a, spec(2, "fn.echo").to_string()).unwrap();
    std::fs::write(&b, spec(3, "fn.echo").to_string()).unwrap();
    let racers: Vec<_> = [&a, &b]
        .iter()
        .map(|f| {
            std::process::Command::new(nex_bin())
                .args(["apply", "-f", f.to_str().unwrap(), "--expect-revision", "0", "--issuer", &fleet.seed])
                .env("NATS_URL", fleet.cluster.servers[0].url())
                .env("HOME", fleet.home.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = racers.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    assert_eq!(outs.iter().filter(|o| o.status.success()).count(), 1, "exactly one apply wins");
    let lost = outs.iter().find(|o| !o.status.success()).unwrap();
    assert!(String::from_utf8_lossy(&lost.stderr).contains("conflict:"), "{}", String::from_utf8_lossy(&lost.stderr));
    // Settle on 2 replicas whichever won.
    fleet.apply(&spec(2, "fn.echo"));
    until(Duration::from_secs(30), "2 function replicas on 2 nodes", &fleet, || async {
        let mut c = counts(&fleet.per_node().await);
        c.sort();
        c == [0, 1, 1]
    })
    .await;
    let names: Vec<String> = fleet.per_node().await.into_iter().flatten().map(|m| m.workload.name).collect();
    assert_eq!(names, ["echofn", "echofn"], "only the signed deployment runs");

    // Each request is answered exactly once, by the pair.
    let inbox = fleet.nc.new_inbox();
    let mut replies = fleet.nc.subscribe(inbox.clone()).await.unwrap();
    nex_node::nats_ext::round_trip(&fleet.nc).await.unwrap();
    for i in 0..40 {
        fleet.nc.publish_with_reply("fn.echo", inbox.clone(), format!("m{i}").into()).await.unwrap();
    }
    let mut got = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), replies.next()).await {
        got += 1;
    }
    assert_eq!(got, 40, "every request answered exactly once");

    // Node 2 never takes a slot of another issuer's deployment (its valid_issuers), nor of one
    // whose environment is sealed to the fleet key it lacks, nor of one needing more memory than
    // it gives, though that leaves the other two running three replicas of each between them.
    let other = fleet.home.path().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_account().seed().unwrap()).unwrap();
    let other = other.to_str().unwrap();
    let mut o = spec(3, "fn.other");
    o["name"] = json!("other");
    fleet.apply_as(&o, other);
    let mut sealed = spec(3, "fn.sealed");
    sealed["name"] = json!("sealed");
    sealed["environment"] = json!({"API_TOKEN": "x"});
    fleet.apply(&sealed);
    let mut big = spec(3, "fn.big");
    big["name"] = json!("big");
    big["resources"] = json!({"memory_mib": 48});
    fleet.apply(&big);
    let named = |per_node: &[Vec<nex_api::control::MachineSummary>], name: &str| -> Vec<usize> {
        per_node.iter().map(|m| m.iter().filter(|m| m.workload.name == name).count()).collect()
    };
    let three = ["other", "sealed", "big"];
    until(Duration::from_secs(30), "3 replicas of each", &fleet, || async {
        let p = fleet.per_node().await;
        three.iter().all(|name| named(&p, name).iter().sum::<usize>() == 3)
    })
    .await;
    for _ in 0..3 {
        let p = fleet.per_node().await;
        assert_eq!(named(&p, "other")[2], 0, "node 2 runs another issuer's replica");
        assert_eq!(named(&p, "sealed")[2], 0, "node 2 runs a replica whose environment it cannot open");
        assert_eq!(named(&p, "big")[2], 0, "node 2 runs a replica needing more memory than it gives");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let n2 = fleet.nodes[2].id.clone();
    assert!(fleet.slots().await.iter().all(|(k, r)| k.starts_with("slot.default.echofn.") || r.node != n2));
    for (name, seed) in [("other", other), ("sealed", fleet.seed.as_str()), ("big", fleet.seed.as_str())] {
        let out = fleet.nex(&["deployments", "rm", name, "--issuer", seed]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    until(Duration::from_secs(20), "the three deployments stopped", &fleet, || async {
        let p = fleet.per_node().await;
        three.iter().all(|name| named(&p, name).iter().sum::<usize>() == 0)
    })
    .await;

    // Spread by zone: of 2 replicas, zone b (node 2 alone) runs one; of 4, two, while zone a's
    // two nodes run one each. The plan says so before anything runs.
    let mut zoned = spec(2, "fn.zoned");
    zoned["name"] = json!("zoned");
    zoned["placement"] = json!({"spread": "zone"});
    let p = fleet.home.path().join("zoned.json");
    std::fs::write(&p, zoned.to_string()).unwrap();
    let plan = fleet.nex(&["plan", "-f", p.to_str().unwrap(), "--issuer", &fleet.seed]);
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.contains("placement: 3 of 3 live nodes can run it, spread over 2 values of zone"), "{plan}");
    for (replicas, zone_b) in [(2usize, 1usize), (4, 2)] {
        zoned["replicas"] = json!(replicas);
        fleet.apply(&zoned);
        until(Duration::from_secs(30), &format!("{replicas} replicas spread by zone"), &fleet, || async {
            let z = named(&fleet.per_node().await, "zoned");
            z.iter().sum::<usize>() == replicas && z[2] == zone_b && z[0].abs_diff(z[1]) <= 1
        })
        .await;
    }
    let out = fleet.nex(&["deployments", "rm", "zoned", "--issuer", &fleet.seed]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    until(Duration::from_secs(20), "the zoned deployment stopped", &fleet, || async {
        named(&fleet.per_node().await, "zoned").iter().sum::<usize>() == 0
    })
    .await;

    // SIGKILL of a node that runs a replica while requests keep coming: none is answered
    // twice, and every one is answered but one that was on its way to the killed node (core
    // NATS delivers at most once).
    let per_node = fleet.per_node().await;
    let victim = per_node.iter().position(|m| !m.is_empty()).unwrap();
    let replies: std::sync::Arc<std::sync::Mutex<BTreeMap<String, usize>>> = Default::default();
    let inbox = fleet.nc.new_inbox();
    let mut sub = fleet.nc.subscribe(inbox.clone()).await.unwrap();
    nex_node::nats_ext::round_trip(&fleet.nc).await.unwrap();
    let tally = replies.clone();
    let collector = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            *tally.lock().unwrap().entry(v["payload"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
    });
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let nc = fleet.nc.clone();
    let sender = tokio::spawn(async move {
        let mut sent = 0usize;
        while stop_rx.try_recv().is_err() {
            nc.publish_with_reply("fn.echo", inbox.clone(), format!("k{sent}").into()).await.unwrap();
            sent += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut dead = fleet.nodes.remove(victim);
    dead.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    until(Duration::from_secs(15), "the killed node's replica running elsewhere", &fleet, || async {
        let mut c = counts(&fleet.per_node().await);
        c.sort();
        c == [1, 1]
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send(()).unwrap();
    let sent = sender.await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    collector.abort();
    let replies = replies.lock().unwrap().clone();
    let twice: Vec<_> = replies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    assert!(replies.len() + 1 >= sent, "{} of {sent} requests answered through the kill", replies.len());
    drop(dead);
    fleet.add_node(victim).await;

    // Lame duck of a node that runs a replica: the replica starts elsewhere before this node
    // stops its own, so the function answers throughout.
    let per_node = fleet.per_node().await;
    let draining = per_node.iter().position(|m| !m.is_empty()).unwrap();
    let free = per_node.iter().position(|m| m.is_empty()).unwrap();
    let c = nex_client::ControlClient::new(fleet.nc.clone(), Duration::from_secs(5), "default");
    c.lameduck(&fleet.nodes[draining].id, Some(Duration::from_secs(1)), None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = fleet.nc.request("fn.echo", "ping".into()).await;
        assert!(m.is_ok(), "the function stopped answering during the drain: {m:?}\n{}", fleet.logs());
        let c = counts(&fleet.per_node().await);
        if c[free] == 1 && c[draining] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the replica did not move: {c:?}\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved = fleet.nodes[free].log();
    assert!(moved.contains("replica started"), "{moved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_replicas_skip_a_full_node_without_failing_the_revision() {
    // Node 0 runs at most one workload.
    let fleet =
        Fleet::start_with(|i, _| if i == 0 { json!({"node_limits": {"max_workloads": 1}}) } else { json!({}) }).await;
    let mut a = echo_spec(&fleet, 3, "v1").await;
    a["name"] = json!("a");
    fleet.apply(&a);
    until(Duration::from_secs(30), "one replica of a per node", &fleet, || async {
        counts(&fleet.per_node().await) == [1, 1, 1]
    })
    .await;
    // Node 0 is full now: b's two replicas go to the others, and b's revision is not marked
    // failed by node 0's refusals.
    let mut b = a.clone();
    b["name"] = json!("b");
    b["replicas"] = json!(2);
    fleet.apply(&b);
    until(Duration::from_secs(30), "b on nodes 1 and 2", &fleet, || async {
        counts(&fleet.per_node().await) == [1, 2, 2]
    })
    .await;
    let kv = async_nats::jetstream::new(fleet.nc.clone()).get_key_value(BUCKET).await.unwrap();
    for _ in 0..3 {
        assert_eq!(counts(&fleet.per_node().await), [1, 2, 2]);
        assert!(kv.get("status.default.b").await.unwrap().is_none(), "b marked failed\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // A new revision of a: node 0 has no room for the new replica beside the old, so its slot
    // goes to a node with room for the step, and the roll-out completes everywhere.
    let mut a2 = echo_spec(&fleet, 3, "v2").await;
    a2["name"] = json!("a");
    let rev = fleet.apply(&a2);
    until(Duration::from_secs(45), "a rolled out past the full node", &fleet, || async {
        let a_slots: Vec<SlotRecord> =
            fleet.slots().await.into_iter().filter(|(k, _)| k.starts_with("slot.default.a.")).map(|(_, r)| r).collect();
        let running: Vec<_> = fleet.per_node().await.into_iter().flatten().filter(|m| m.workload.name == "a").collect();
        a_slots.len() == 3
            && a_slots.iter().all(|s| s.revision == rev && s.next.is_none())
            && running.len() == 3
            && running
                .iter()
                .all(|m| m.workload.description.as_deref().unwrap_or("").ends_with(&format!("revision {rev}")))
    })
    .await;
    assert!(kv.get("status.default.a").await.unwrap().is_none(), "a marked failed\n{}", fleet.logs());
}
