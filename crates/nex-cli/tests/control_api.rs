//! The control API against a real node: discovery, every DEPLOY rejection (numbered as in
//! `docs/protocol.md`), the STOP rules, replay and expiry, hash pinning, lame duck, and hostile
//! payloads.

mod common;

use std::time::Duration;

use common::*;
use nex_api::control::AuctionRequest;
use nex_api::jwt::WorkloadClaims;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_ping_auction_wping_info() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"tags": {"region": "eu"}})).await;
    let user = User::new(&nats).await;
    let g = user.gather(400);

    let nodes = g.ping_nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node_id, node.id);
    assert_eq!(nodes[0].tags["nex.os"], "linux");
    assert_eq!(nodes[0].tags["nex.unsafe"], "true");
    assert_eq!(nodes[0].tags["region"], "eu");
    assert!(nodes[0].tags.contains_key("node_name"));
    assert!(nodes[0].target_xkey.starts_with('X'));
    let one = user.client.ping_node(&node.id).await.unwrap();
    assert_eq!(one.node_id, node.id);
    let raw = user.raw(&format!("$NEX.PING.{}", node.id), vec![]).await;
    assert_eq!(raw["type"], "io.nats.nex.v1.ping_response");

    let auction = |req: AuctionRequest| {
        let g = g.clone();
        async move { g.auction(&req).await.unwrap().len() }
    };
    let arch = nex_node::node::go_arch().to_string();
    assert_eq!(
        auction(AuctionRequest {
            os: Some("linux".into()),
            arch: Some(arch.clone()),
            workload_types: vec!["native".into(), "wasm".into()],
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(auction(AuctionRequest { sandboxed: Some(true), ..Default::default() }).await, 0);
    assert_eq!(auction(AuctionRequest { sandboxed: Some(false), ..Default::default() }).await, 1);
    assert_eq!(auction(AuctionRequest { os: Some("windows".into()), ..Default::default() }).await, 0);
    let mut tags = std::collections::BTreeMap::new();
    tags.insert("region".to_string(), "EU".to_string());
    assert_eq!(auction(AuctionRequest { tags: tags.clone(), ..Default::default() }).await, 1);
    tags.insert("region".to_string(), "us".to_string());
    assert_eq!(auction(AuctionRequest { tags, ..Default::default() }).await, 0);
    assert_eq!(auction(AuctionRequest { workload_types: vec!["oci".into()], ..Default::default() }).await, 0);

    // WPING is silent without workloads.
    assert!(g.ping_workloads(None).await.unwrap().is_empty());

    // INFO is namespaced.
    let b = user.native("nsworker", &script("exec /bin/sleep 600")).await;
    let r = user.deploy(&node.id, &b).await.unwrap();
    let other = User::in_namespace(&nats, "other").await;
    assert!(other.info(&node.id).await.machines.is_empty());
    assert!(other.gather(400).ping_workloads(None).await.unwrap().is_empty());
    let mine = user.info(&node.id).await;
    assert_eq!(mine.machines.len(), 1);
    assert_eq!(mine.machines[0].id, r.id);
    assert_eq!(mine.machines[0].namespace, "default");
    assert!(mine.memory.is_some());
    assert_eq!(mine.supported_workload_types, vec!["native", "v8", "wasm"]);
    let by_name = g.ping_workloads(Some("NSWORKER")).await.unwrap();
    assert_eq!(by_name.len(), 1, "WPING matches names case-insensitively");
    assert_eq!(by_name[0].running_machines[0].namespace, "default");
    assert_eq!(g.ping_nodes().await.unwrap()[0].running_machines, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_rejections_follow_the_pipeline() {
    let nats = NatsServer::start();
    let node = Node::start(
        &nats,
        json!({
            "workload_types": ["native", "wasm"],
            "deny_trigger_subjects": ["secret.>"],
            "node_limits": {"max_workload_bytes": 4096},
        }),
    )
    .await;
    let user = User::new(&nats).await;
    let base = user.native("rejected", &script("exec /bin/sleep 600")).await;
    let info = user.info(&node.id).await;
    let deploy_raw = |req: serde_json::Value| {
        let user = &user;
        let subject = format!("$NEX.DEPLOY.default.{}", node.id);
        async move { user.raw(&subject, serde_json::to_vec(&req).unwrap()).await }
    };
    let expect_err = |env: serde_json::Value, needle: &str| {
        assert_eq!(env["type"], "io.nats.nex.v1.run_response", "{env}");
        assert_eq!(env["data"], "", "{env}");
        let e = env["error"].as_str().unwrap_or_else(|| panic!("no error in {env}"));
        assert!(e.contains(needle), "expected {needle:?} in {e:?}");
    };
    let good = base.build(&user.issuer, &user.xkey, &node.id, &info.public_xkey).unwrap();
    let good_json = serde_json::to_value(&good).unwrap();

    // 4: body does not parse.
    let reply = user.raw(&format!("$NEX.DEPLOY.default.{}", node.id), b"{not json".to_vec()).await;
    expect_err(reply, "Unable to deserialize deploy request:");
    // 5: type not accepted by this node.
    let mut r = good_json.clone();
    r["type"] = json!("v8");
    expect_err(deploy_raw(r).await, "Unsupported workload type on this node: v8");
    // 6: triggers on a service.
    let mut r = good_json.clone();
    r["trigger_subjects"] = json!(["a.b"]);
    expect_err(deploy_raw(r).await, "Unsupported workload type for trigger subject registration: native");
    // 7: deny list, built in and configured.
    for s in ["$SYS.foo", "$JS.API.>", "$NEX.PING", ">", "secret.plans"] {
        let mut r = good_json.clone();
        r["type"] = json!("wasm");
        r["trigger_subjects"] = json!([s]);
        expect_err(
            deploy_raw(r).await,
            &format!("The trigger subject {s} overlaps with subject(s) in this node's deny list"),
        );
    }
    // 8: environment that does not open.
    let mut r = good_json.clone();
    r["environment"] = json!("bm90IHNlYWxlZA==");
    expect_err(deploy_raw(r).await, "Failed to decrypt environment for deploy request:");
    let stranger = nkeys::XKey::new();
    let sealed = nex_api::env::seal(&env(&[("A", "B")]), &user.xkey, &stranger.public_key()).unwrap();
    let mut r = good_json.clone();
    r["environment"] = json!(sealed);
    expect_err(deploy_raw(r).await, "Failed to decrypt environment for deploy request:");
    // 9: JWTs.
    let mut r = good_json.clone();
    r["workload_jwt"] = json!("abc");
    expect_err(deploy_raw(r).await, "Invalid deploy request: could not decode workload JWT:");
    let other_issuer = nkeys::KeyPair::new_account();
    let forged = {
        let tok = WorkloadClaims::new("rejected", Some(&base.hash)).encode(&other_issuer).unwrap();
        let mut parts: Vec<String> = tok.split('.').map(str::to_string).collect();
        let mut claims = WorkloadClaims::decode(&tok).unwrap();
        claims.iss = user.issuer.public_key();
        use base64::Engine;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        parts.join(".")
    };
    let mut r = good_json.clone();
    r["workload_jwt"] = json!(forged);
    expect_err(deploy_raw(r).await, "signature verification failed");
    let mut r = good_json.clone();
    r["workload_jwt"] = json!(WorkloadClaims::new("bad.name", Some(&base.hash)).encode(&user.issuer).unwrap());
    expect_err(
        deploy_raw(r).await,
        "Invalid deploy request: workload name claim ('bad.name') does not match requirements (^[a-zA-Z0-9_-]+$)",
    );
    // An expired token.
    let mut c = WorkloadClaims::new("rejected", Some(&base.hash));
    c.exp = Some(chrono::Utc::now().timestamp() - 10);
    let mut r = good_json.clone();
    r["workload_jwt"] = json!(c.encode(&user.issuer).unwrap());
    expect_err(deploy_raw(r).await, "Invalid deploy request: standard claims within JWT are not valid: token expired");
    // The JWT must pin the artifact: no hash claim, wrong hash claim.
    let mut r = good_json.clone();
    r["workload_jwt"] = json!(WorkloadClaims::new("rejected", None).encode(&user.issuer).unwrap());
    expect_err(deploy_raw(r).await, "hash");
    let mut r = good_json.clone();
    r["workload_jwt"] = json!(WorkloadClaims::new("rejected", Some(&nex_api::jwt::sha256_hex(b"other bytes")))
        .encode(&user.issuer)
        .unwrap());
    expect_err(deploy_raw(r).await, "artifact hash mismatch");
    // 12: missing object / bucket.
    let mut r = good_json.clone();
    r["location"] = json!("nats://NEXCLIFILES/nosuchkey");
    expect_err(deploy_raw(r).await, "Failed to cache workload bytes:");
    let mut r = good_json.clone();
    r["location"] = json!("nats://NOSUCHBUCKET/key");
    expect_err(deploy_raw(r).await, "Failed to cache workload bytes:");
    // 13: too large.
    let big = user.native("bigone", &vec![b'#'; 5000]).await;
    let e = user.deploy(&node.id, &big).await.unwrap_err();
    assert!(e.contains("Workload file size would exceed node limitations"), "{e}");
    // 15: the agent cannot load it (not a WebAssembly module).
    let mut junk = user.native("junk", b"this is not a program").await;
    junk.workload_type = "wasm".into();
    junk.trigger_subjects = vec!["junk.trigger".into()];
    let e = user.deploy(&node.id, &junk).await.unwrap_err();
    assert!(e.contains("Failed to deploy workload: workload rejected by agent:"), "{e}");

    // After all that, the original still deploys once — and only once (replay protection).
    let ok = deploy_raw(good_json.clone()).await;
    assert!(ok["error"].is_null(), "{ok}");
    assert_eq!(ok["data"]["started"], true);
    assert_eq!(ok["data"]["name"], "rejected");
    assert_eq!(ok["data"]["issuer"], user.issuer.public_key());
    expect_err(deploy_raw(good_json).await, "replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_limits_and_valid_issuers() {
    let nats = NatsServer::start();
    let allowed = nkeys::KeyPair::new_account();
    let node = Node::start(
        &nats,
        json!({
            "valid_issuers": [allowed.public_key()],
            "node_limits": {"max_workloads": 1, "max_total_bytes": 150},
            "machine_pool_size": 2,
        }),
    )
    .await;
    let mut user = User::new(&nats).await;
    let mut b = user.native("first", &[b"#!/bin/sh\nexec /bin/sleep 600\n".as_slice(), &[b'#'; 70]].concat()).await;
    let e = user.deploy(&node.id, &b).await.unwrap_err();
    assert_eq!(e, format!("invalid workload issuer: {}", user.issuer.public_key()));
    user.issuer = allowed;
    user.deploy(&node.id, &b).await.expect("allowed issuer deploys");
    b.name = "second".into();
    let e = user.deploy(&node.id, &b).await.unwrap_err();
    assert_eq!(e, "Node is at maximum workload limit. Deploy request denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_bytes_limit() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"node_limits": {"max_total_bytes": 150}, "machine_pool_size": 2})).await;
    let user = User::new(&nats).await;
    let body = [b"#!/bin/sh\nexec /bin/sleep 600\n".as_slice(), &[b'#'; 70]].concat();
    let a = user.native("one", &body).await;
    user.deploy(&node.id, &a).await.expect("first fits");
    let b = user.native("two", &body).await;
    let e = user.deploy(&node.id, &b).await.unwrap_err();
    assert_eq!(e, "Workload file size would exceed node total limitations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_rules() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let b = user.native("stoppable", &script("exec /bin/sleep 600")).await;
    let req = user.request(&node.id, &b).await;
    let r = user.client.deploy(&node.id, &req).await.unwrap();
    let stop_subject = format!("$NEX.STOP.default.{}", node.id);
    let stop_raw = |body: serde_json::Value| {
        let user = &user;
        let s = stop_subject.clone();
        async move { user.raw(&s, serde_json::to_vec(&body).unwrap()).await }
    };
    let expect_err = |env: serde_json::Value, needle: &str| {
        assert_eq!(env["type"], "io.nats.nex.v1.stop_response", "{env}");
        let e = env["error"].as_str().unwrap_or_else(|| panic!("no error in {env}"));
        assert!(e.contains(needle), "expected {needle:?} in {e:?}");
    };
    let fresh = |issuer: &nkeys::KeyPair, name: &str| WorkloadClaims::new(name, None).encode(issuer).unwrap();

    let env = user.raw(&stop_subject, b"][".to_vec()).await;
    expect_err(env, "Unable to deserialize stop request:");
    expect_err(
        stop_raw(json!({"workload_id": "nosuchworkload000000", "workload_jwt": fresh(&user.issuer, "stoppable")}))
            .await,
        "No such workload",
    );
    expect_err(
        stop_raw(json!({"workload_id": r.id, "workload_jwt": req.workload_jwt})).await,
        "stop claims appear to be cloned or captured from the original start claims",
    );
    expect_err(
        stop_raw(json!({"workload_id": r.id, "workload_jwt": fresh(&user.issuer, "other")})).await,
        "stop claims subject does not match original start claims subject",
    );
    expect_err(
        stop_raw(json!({"workload_id": r.id, "workload_jwt": fresh(&nkeys::KeyPair::new_account(), "stoppable")}))
            .await,
        "the only entity allowed to terminate a workload is the issuer that originally started it",
    );
    expect_err(
        stop_raw(json!({"workload_id": r.id, "workload_jwt": "garbage"})).await,
        "Invalid stop request: could not decode workload JWT:",
    );
    // Wrong namespace: indistinguishable from a missing workload.
    let other = User::in_namespace(&nats, "other").await;
    let env = other
        .raw(
            &format!("$NEX.STOP.other.{}", node.id),
            serde_json::to_vec(&json!({"workload_id": r.id, "workload_jwt": fresh(&user.issuer, "stoppable")}))
                .unwrap(),
        )
        .await;
    expect_err(env, "No such workload");
    // Signed in the same second as the deploy is fine; only the jti must differ.
    let s = user.stop(&node.id, &r.id, "stoppable").await.expect("stop");
    assert!(s.stopped);
    assert_eq!(s.name, "stoppable");
    assert!(user.info(&node.id).await.machines.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lameduck_refuses_deploys_and_reports_itself() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let r = user.client.lameduck(&node.id, None, None).await.unwrap();
    assert!(r.success);
    assert_eq!(r.node_id, node.id);
    let p = user.client.ping_node(&node.id).await.unwrap();
    assert_eq!(p.tags["nex.lameduck"], "true");
    let b = user.native("late", &script("exec /bin/sleep 600")).await;
    let e = user.deploy(&node.id, &b).await.unwrap_err();
    assert_eq!(e, "Node is in lame duck mode. Workload deploy request denied");
    rec.wait_until(Duration::from_secs(5), "node_entered_lameduck", |r| !r.events("node_entered_lameduck").is_empty())
        .await;
    // Idempotent.
    assert!(user.client.lameduck(&node.id, None, None).await.unwrap().success);
    assert_eq!(rec.events("node_entered_lameduck").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_get_errors_or_silence_and_the_node_keeps_serving() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let b = user.native("fuzzed", &script("exec /bin/sleep 600")).await;
    let good = serde_json::to_vec(&user.request(&node.id, &b).await).unwrap();
    let subjects = [
        format!("$NEX.DEPLOY.default.{}", node.id),
        format!("$NEX.STOP.default.{}", node.id),
        format!("$NEX.INFO.default.{}", node.id),
        "$NEX.PING".to_string(),
        "$NEX.AUCTION".to_string(),
        "$NEX.WPING.default".to_string(),
    ];
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut answered = 0;
    for i in 0..300 {
        let mut body: Vec<u8> = match i % 4 {
            0 => (0..(rnd() % 512)).map(|_| rnd() as u8).collect(),
            1 => {
                let mut g = good.clone();
                for _ in 0..(1 + rnd() % 8) {
                    let at = (rnd() as usize) % g.len();
                    g[at] = rnd() as u8;
                }
                g
            }
            2 => {
                let mut g = good.clone();
                g.truncate((rnd() as usize) % g.len());
                g
            }
            _ => {
                let types = [json!("native"), json!(5), json!(null), json!({})];
                let locs = [json!("nats://"), json!("x"), json!(7), json!("nats://NEXCLIFILES/")];
                let jwts = [json!("a.b.c"), json!(null), json!(12)];
                let trig = [json!("a"), json!(["$SYS.>"]), json!([1, 2])];
                serde_json::to_vec(&json!({
                    "type": types[(rnd() % 4) as usize],
                    "location": locs[(rnd() % 4) as usize],
                    "workload_jwt": jwts[(rnd() % 3) as usize],
                    "environment": "!!!!",
                    "trigger_subjects": trig[(rnd() % 3) as usize],
                    "workload_id": "x",
                }))
                .unwrap()
            }
        };
        if body.is_empty() {
            body.push(b'{');
        }
        let subject = subjects[i % subjects.len()].clone();
        if let Ok(Ok(m)) =
            tokio::time::timeout(Duration::from_millis(300), user.nc.request(subject.clone(), body.into())).await
        {
            let env: serde_json::Value = serde_json::from_slice(&m.payload).expect("replies are envelopes");
            assert!(env["type"].as_str().unwrap().starts_with("io.nats.nex.v1."), "{env}");
            if subject.contains("DEPLOY") || subject.contains("STOP") {
                assert!(env["error"].is_string(), "hostile {subject} accepted: {env}");
            }
            answered += 1;
        }
    }
    assert!(answered > 200, "only {answered} answers");
    let p = user.client.ping_node(&node.id).await.expect("node still answers");
    assert_eq!(p.running_machines, 0);
    user.deploy(&node.id, &b).await.expect("node still deploys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_handshakes_is_reported_and_deploys_fail_cleanly() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // An "agent" that never handshakes.
    let fake = dir.path().join("silent-agent");
    std::fs::write(&fake, "#!/bin/sh\nexec /bin/sleep 600\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = node_config(dir.path(), json!({"agent_handshake_timeout_ms": 300, "agent_path": fake}));
    std::fs::write(dir.path().join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let nc = nats.connect().await;
    let mut started =
        futures::StreamExt::boxed(nex_client::monitor::events(&nc, "system", "node_started").await.unwrap());
    nex_node::nats_ext::round_trip(&nc).await.unwrap();
    let mut child = std::process::Command::new(nex_bin())
        .args(["node", "up", "--config"])
        .arg(dir.path().join("config.json"))
        .args(["-s", &nats.url()])
        .env("NEX_NATS_SERVER", nats_server_bin())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ev =
        tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut started)).await.unwrap().unwrap();
    let node_id = ev.event.data["id"].as_str().unwrap().to_string();
    let user = User::new(&nats).await;
    let b = user.native("nohandshake", &script("exec /bin/sleep 600")).await;
    let e = user.deploy(&node_id, &b).await.unwrap_err();
    assert!(e.starts_with("Failed to get agent client from pool: no available agent client in pool"), "{e}");
    assert!(e.contains("did not handshake"), "{e}");
    // No agent piles up: each failed one is destroyed.
    let agents = processes_matching("")
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).map(|c| c.starts_with(dir.path())).unwrap_or(false)
        })
        .count();
    assert!(agents <= 1, "{agents} agents left running");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}
