//! The tenant boundary, attacked the way a hostile workload, requester or local user would, each
//! attack next to the legitimate path that must keep working: host services with the workload's
//! authority (T1), data per tenant (T2), a fenced http service (T3), reserved trigger subjects
//! (T4), signed operator commands (T5), bound and fresh DEPLOY/STOP tokens (T6), sealed secrets
//! (T7) and the node's own files (T8). Sandbox walls (T9) are in container.rs and microvm.rs.

mod common;

use std::time::Duration;

use common::*;
use nex_api::jwt::WorkloadClaims;
use nex_client::DeployBuilder;
use serde_json::{json, Value};

/// A JavaScript function from source.
async fn js_function(user: &User, name: &str, src: &str, trigger: &str) -> DeployBuilder {
    let (location, hash) = user.upload(&format!("{name}-{}", rand::random::<u32>()), src.as_bytes()).await;
    DeployBuilder {
        name: name.into(),
        workload_type: "v8".into(),
        location,
        hash,
        trigger_subjects: vec![trigger.into()],
        ..Default::default()
    }
}

async fn call(nc: &async_nats::Client, subject: &str, body: &[u8]) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(10), nc.request(subject.to_string(), body.to_vec().into()))
        .await
        .unwrap_or_else(|_| panic!("no reply on {subject}"))
        .unwrap()
}

async fn call_json(nc: &async_nats::Client, subject: &str, body: &[u8]) -> Value {
    let m = call(nc, subject, body).await;
    if let Some(e) = m.headers.as_ref().and_then(|h| h.get(nex_api::agent::HEADER_ERROR)) {
        panic!("{subject} failed: {e}");
    }
    serde_json::from_slice(&m.payload).unwrap_or_else(|e| panic!("{subject}: {e}: {:?}", m.payload))
}

/// Tries each subject with `messaging.request` and `messaging.publish`; returns
/// `{request: {subject: reply | "ERR <message>"}, publish: {subject: "sent" | "ERR <message>"}}`.
const MESSAGING_PROBE: &str = r#"(function (subject, payload) {
  const out = {request: {}, publish: {}};
  for (const s of JSON.parse(String.fromCharCode(...payload))) {
    try { out.request[s] = String.fromCharCode(...hostServices.messaging.request(s, new Uint8Array([104, 105]))); }
    catch (e) { out.request[s] = 'ERR ' + e; }
    try { hostServices.messaging.publish(s, new Uint8Array()); out.publish[s] = 'sent'; }
    catch (e) { out.publish[s] = 'ERR ' + e; }
  }
  return out;
})"#;

/// Remembers the payload in kv and the object store; returns what was there before.
const STORE: &str = r#"(function (subject, payload) {
  const text = (b) => String.fromCharCode(...b);
  let kv = null, obj = null;
  try { kv = text(hostServices.kv.get('k')); } catch (e) {}
  try { obj = text(hostServices.objectStore.get('o')); } catch (e) {}
  if (payload.length > 0) { hostServices.kv.set('k', payload); hostServices.objectStore.put('o', payload); }
  return {kv: kv, obj: obj};
})"#;

/// GETs each URL of the JSON payload: `{url: status | "ERR <message>"}`.
const HTTP_PROBE: &str = r#"(function (subject, payload) {
  const out = {};
  for (const u of JSON.parse(String.fromCharCode(...payload))) {
    try { out[u] = hostServices.http.get(u).status; } catch (e) { out[u] = 'ERR ' + e; }
  }
  return out;
})"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_messaging_acts_with_the_workloads_authority() {
    let nats = NatsServer::start();
    let node = Node::start(
        &nats,
        json!({"machine_pool_size": 2, "host_services": {"services": {"messaging": {"config": {"deny_subjects": ["billing.>"]}}}}}),
    )
    .await;
    let user = User::new(&nats).await;
    // An ordinary responder.
    let mut svc = user.nc.subscribe("svc.time").await.unwrap();
    let responder = user.nc.clone();
    tokio::spawn(async move {
        while let Some(m) = futures::StreamExt::next(&mut svc).await {
            let _ = responder.publish(m.reply.unwrap(), "tick".into()).await;
        }
    });
    nex_node::nats_ext::round_trip(&user.nc).await.unwrap();
    let f = js_function(&user, "prober", MESSAGING_PROBE, "probe.go").await;
    user.deploy(&node.id, &f).await.unwrap();
    // The function aims at the node's control API, JetStream (another tenant's KV through the
    // direct-get API), the system account and reply inboxes; one operator-denied subject too.
    let lameduck = format!("$NEX.LAMEDUCK.{}", node.id);
    let targets = [
        "svc.time",
        "$NEX.PING",
        lameduck.as_str(),
        "$JS.API.INFO",
        "$JS.API.DIRECT.GET.KV_victim.secret",
        "$KV.victim.secret",
        "$SYS.REQ.SERVER.PING",
        "$SRV.PING",
        "_INBOX.stolen",
        "billing.charge",
    ];
    let all = call_json(&user.nc, "probe.go", &serde_json::to_vec(&targets).unwrap()).await;
    let v = &all["request"];
    assert_eq!(v["svc.time"], "tick", "the legitimate request answers: {all}");
    assert_eq!(all["publish"]["svc.time"], "sent", "{all}");
    for (s, rule) in [
        ("$NEX.PING", "$NEX.>"),
        (lameduck.as_str(), "$NEX.>"),
        ("$JS.API.INFO", "$JS.>"),
        ("$JS.API.DIRECT.GET.KV_victim.secret", "$JS.>"),
        ("$KV.victim.secret", "$KV.>"),
        ("$SYS.REQ.SERVER.PING", "$SYS.>"),
        ("$SRV.PING", "$SRV.>"),
        ("_INBOX.stolen", "_INBOX.>"),
        ("billing.charge", "billing.>"),
    ] {
        for way in ["request", "publish"] {
            let got = all[way][s].as_str().unwrap_or_default();
            assert!(got.starts_with("ERR ") && got.contains("is refused") && got.contains(rule), "{way} {s}: {got}");
            assert!(got.ends_with("(403)"), "{got}");
        }
    }
    // The function's attempt to put its node into lame duck changed nothing.
    let info = user.info(&node.id).await;
    assert!(!info.tags.contains_key("nex.lameduck"), "{:?}", info.tags);
    let ok = user.deploy(&node.id, &user.native("stillserving", &script("exec /bin/sleep 600")).await).await;
    assert!(ok.is_ok(), "the node still deploys: {ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_a_configured_host_services_connection_carries_every_call() {
    let control = NatsServer::start();
    let hs = NatsServer::start();
    let node = Node::start(&control, json!({"host_services": {"nats_url": hs.url()}})).await;
    let user = User::new(&control).await;
    let f = js_function(&user, "remember", STORE, "remember.it").await;
    user.deploy(&node.id, &f).await.unwrap();
    let v = call_json(&user.nc, "remember.it", b"hs").await;
    assert_eq!(v["kv"], Value::Null, "{v}");
    // The bucket lives on the operator's host-services server, not on the node's control NATS.
    let names = |nc: async_nats::Client| async move {
        let js = async_nats::jetstream::new(nc);
        futures::StreamExt::collect::<Vec<_>>(js.stream_names())
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect::<Vec<_>>()
    };
    let on_hs = names(hs.connect().await).await;
    let on_control = names(user.nc.clone()).await;
    assert!(on_hs.iter().any(|n| n.starts_with("KV_hs_default_remember_")), "{on_hs:?}");
    assert!(!on_control.iter().any(|n| n.starts_with("KV_hs_")), "{on_control:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2_data_belongs_to_namespace_name_and_issuer() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_pool_size": 3})).await;
    let owner = User::new(&nats).await;
    let stranger = User::new(&nats).await; // same namespace and name, another issuer
    let mut elsewhere = User::in_namespace(&nats, "other").await; // same issuer and name, another namespace
    elsewhere.issuer = nkeys::KeyPair::from_seed(&owner.issuer.seed().unwrap()).unwrap();

    let f = js_function(&owner, "store", STORE, "store.owner").await;
    let first = owner.deploy(&node.id, &f).await.unwrap();
    assert_eq!(call_json(&owner.nc, "store.owner", b"alice").await, json!({"kv": null, "obj": null}));
    let g = js_function(&stranger, "store", STORE, "store.stranger").await;
    stranger.deploy(&node.id, &g).await.unwrap();
    assert_eq!(call_json(&stranger.nc, "store.stranger", b"").await, json!({"kv": null, "obj": null}));
    let h = js_function(&elsewhere, "store", STORE, "store.elsewhere").await;
    elsewhere.deploy(&node.id, &h).await.unwrap();
    assert_eq!(call_json(&elsewhere.nc, "store.elsewhere", b"").await, json!({"kv": null, "obj": null}));

    // A redeploy by the owner finds its data again.
    owner.stop(&node.id, &first.id, "store").await.unwrap();
    node.wait_warm(&owner.nc).await;
    let f = js_function(&owner, "store", STORE, "store.owner2").await;
    owner.deploy(&node.id, &f).await.unwrap();
    assert_eq!(call_json(&owner.nc, "store.owner2", b"").await, json!({"kv": "alice", "obj": "alice"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3_http_stays_off_the_hosts_and_private_networks_unless_allowed() {
    // A local server: 200 on /, a redirect to another loopback address on /hop.
    let port = http_server(move |head| {
        if head.starts_with("GET /hop") {
            // Redirect to another loopback address, on the port the request names (`?port=`).
            let port: u16 = head.split("port=").nth(1).and_then(|p| p.split_whitespace().next()?.parse().ok()).unwrap_or(0);
            format!("HTTP/1.1 302 Found\r\nLocation: http://127.0.0.2:{port}/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        } else {
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_string()
        }
    })
    .await;
    let urls = [
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://2130706433:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://10.1.2.3:{port}/"),
    ];
    let body = serde_json::to_vec(&urls).unwrap();
    let nats = NatsServer::start();

    // By default every one of them is refused, with the reason.
    let node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let f = js_function(&user, "fetcher", HTTP_PROBE, "fetch.default").await;
    user.deploy(&node.id, &f).await.unwrap();
    let v = call_json(&user.nc, "fetch.default", &body).await;
    for u in &urls {
        let got = v[u].as_str().unwrap_or_default();
        assert!(got.starts_with("ERR http to ") && got.contains("is refused"), "{u}: {got}");
    }
    assert!(v[&urls[4]].as_str().unwrap().contains("link-local"), "{v}");
    assert!(v[&urls[5]].as_str().unwrap().contains("private"), "{v}");
    drop(node);

    // An operator who allows the loopback network lets them through; a redirect hop to an
    // address outside the allowance is refused on that hop.
    let node = Node::start(
        &nats,
        json!({"host_services": {"services": {"http": {"config": {"allow": ["127.0.0.1", "::1"]}}}}}),
    )
    .await;
    let f = js_function(&user, "fetcher", HTTP_PROBE, "fetch.allowed").await;
    user.deploy(&node.id, &f).await.unwrap();
    let mut allowed = urls[..4].to_vec();
    allowed.push(format!("http://127.0.0.1:{port}/hop?port={port}"));
    let v = call_json(&user.nc, "fetch.allowed", &serde_json::to_vec(&allowed).unwrap()).await;
    for u in &urls[..4] {
        assert_eq!(v[u], 200, "{u}: {v}");
    }
    let hop = v[&allowed[4]].as_str().unwrap_or_default();
    assert!(hop.contains("127.0.0.2") && hop.contains("is refused"), "{hop}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t4_internal_subjects_cannot_be_triggers() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    for s in
        ["$KV.>", "$KV.hs_x.>", "$O.>", "_INBOX.>", "_INBOX.abc", "$SRV.PING", "$JS.API.>", "$SYS.>", ">", "*.PING"]
    {
        let f = js_function(&user, "eavesdrop", "(function () { return 1; })", s).await;
        let e = user.deploy(&node.id, &f).await.unwrap_err();
        assert!(
            e.contains(&format!("The trigger subject {s} overlaps with subject(s) in this node's deny list")),
            "{s}: {e}"
        );
    }
    let f = js_function(&user, "legit", "(function () { return 1; })", "orders.>").await;
    user.deploy(&node.id, &f).await.expect("an ordinary wildcard trigger deploys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t5_lameduck_needs_an_admin_signature_on_a_restricted_node() {
    let nats = NatsServer::start();
    let admin = nkeys::KeyPair::new_account();
    let node = Node::start(&nats, json!({"admin_issuers": [admin.public_key()]})).await;
    let user = User::new(&nats).await;
    let subject = format!("$NEX.LAMEDUCK.{}", node.id);
    // Unsigned, as any NATS user could send it.
    let r = user.raw(&subject, vec![]).await;
    assert!(r["error"].as_str().unwrap().contains("signed by an admin issuer"), "{r}");
    // Signed by a stranger.
    let e = user.client.lameduck(&node.id, None, Some(&user.issuer)).await.unwrap_err().to_string();
    assert!(e.contains("is not an admin issuer"), "{e}");
    // Signed by an admin, but a day old.
    let mut old = WorkloadClaims::new(&node.id, None);
    old.iat -= 86_400;
    let body = json!({"jwt": old.encode(&admin).unwrap()});
    let r = user.raw(&subject, serde_json::to_vec(&body).unwrap()).await;
    assert!(r["error"].as_str().unwrap().contains("ago"), "{r}");
    assert!(!user.info(&node.id).await.tags.contains_key("nex.lameduck"));
    // Signed by the admin, with the CLI.
    let key = node.dir.path().join("admin.nk");
    std::fs::write(&key, admin.seed().unwrap()).unwrap();
    let out = std::process::Command::new(nex_bin())
        .args(["lameduck", &node.id, "--issuer"])
        .arg(&key)
        .args(["-s", &nats.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Command to enter lame duck mode issued"));
    assert_eq!(user.info(&node.id).await.tags.get("nex.lameduck").map(String::as_str), Some("true"));

    // valid_issuers alone restricts it too; an open node obeys unsigned requests as Nex does.
    let restricted = Node::start(&nats, json!({"valid_issuers": [user.issuer.public_key()]})).await;
    let r = user.raw(&format!("$NEX.LAMEDUCK.{}", restricted.id), vec![]).await;
    assert!(r["error"].is_string(), "{r}");
    assert!(user.client.lameduck(&restricted.id, None, Some(&user.issuer)).await.unwrap().success);
    let open = Node::start(&nats, json!({})).await;
    assert!(user.client.lameduck(&open.id, None, None).await.unwrap().success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t6_deploys_and_stops_are_bound_fresh_and_never_replayed() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let seed = dir.path().join("node.nk");
    let cfg = node_config(dir.path(), json!({"node_seed_path": seed, "machine_pool_size": 2}));
    let node = Node::start_in(&nats, dir, cfg.clone(), &[]).await;
    let user = User::new(&nats).await;
    let b = user.native("bound", &script("exec /bin/sleep 600")).await;
    let info = user.info(&node.id).await;
    let subject = format!("$NEX.DEPLOY.default.{}", node.id);
    let send = |req: &nex_api::control::DeployRequest| {
        let user = &user;
        let subject = subject.clone();
        let body = serde_json::to_vec(req).unwrap();
        async move { user.raw(&subject, body).await }
    };
    let err = |v: Value| v["error"].as_str().unwrap_or_default().to_string();

    // Captured on its way to another node: refused here.
    let other = nkeys::KeyPair::new_server().public_key();
    let mut req = b.build(&user.issuer, &user.xkey, &other, &info.public_xkey).unwrap();
    assert!(err(send(&req).await).contains("not this node"));
    req.target_node = node.id.clone(); // the JWT still names the other node
    assert!(err(send(&req).await).contains("the token is for node"));
    // Signed a day ago.
    let mut old = WorkloadClaims::new("bound", Some(&b.hash));
    old.iat -= 86_400;
    let mut req = b.build(&user.issuer, &user.xkey, &node.id, &info.public_xkey).unwrap();
    req.workload_jwt = old.encode(&user.issuer).unwrap();
    assert!(err(send(&req).await).contains("sign a fresh one"));
    // Sent to another namespace than the one it was signed for.
    let mut ns_bound = b.clone();
    ns_bound.namespace = Some("team".into());
    let req = ns_bound.build(&user.issuer, &user.xkey, &node.id, &info.public_xkey).unwrap();
    assert!(err(send(&req).await).contains("the token is for namespace \"team\""));

    // The legitimate request, once.
    // (No environment, so that the same bytes still open after a restart, when the node has a
    // new xkey: the replay check is what must refuse them then.)
    let mut req = user.request(&node.id, &b).await;
    req.environment = String::new();
    let ok = send(&req).await;
    assert!(ok["error"].is_null(), "{ok}");
    let id = ok["data"]["id"].as_str().unwrap().to_string();
    assert!(err(send(&req).await).contains("replay"));

    // A STOP is bound to its workload: captured and aimed at another one, it is refused.
    let second = user.deploy(&node.id, &user.native("bound", &script("exec /bin/sleep 600")).await).await.unwrap();
    let stop = nex_client::deploy::stop_request(&user.issuer, "default", &node.id, &id, "bound").unwrap();
    let mut aimed = stop.clone();
    aimed.workload_id = second.id.clone();
    let stop_subject = format!("$NEX.STOP.default.{}", node.id);
    let r = user.raw(&stop_subject, serde_json::to_vec(&aimed).unwrap()).await;
    assert!(err(r).contains("the token is for workload"), "a stop for one workload must not stop another");
    let r = user.raw(&stop_subject, serde_json::to_vec(&stop).unwrap()).await;
    assert_eq!(r["data"]["stopped"], true, "{r}");
    // In another namespace the workload does not exist, whatever the token says.
    let other_ns = user.raw(&format!("$NEX.STOP.other.{}", node.id), serde_json::to_vec(&aimed).unwrap()).await;
    assert_eq!(err(other_ns), "No such workload");

    // A hash mismatch says so without echoing the artifact's digest.
    let mut wrong = b.clone();
    wrong.hash = "00".repeat(32);
    let e = user.deploy(&node.id, &wrong).await.unwrap_err();
    assert!(e.contains("hash mismatch") && !e.contains(&b.hash), "{e}");

    // After a restart (same id, same state), the accepted request is still a replay.
    let mut node = node;
    node.signal_and_wait(libc::SIGTERM, Duration::from_secs(15));
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg2 = cfg;
    cfg2["state_dir"] = json!(state);
    let node2 = Node::start_in(&nats, dir2, cfg2, &[]).await;
    assert_eq!(node2.id, node.id);
    assert!(err(send(&req).await).contains("replay"), "replayed after a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7_sealed_credentials_reach_the_node_and_not_the_workload() {
    // A host-services server that only lets one nkey user in.
    let user_key = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("hs.conf");
    std::fs::write(&conf, format!("authorization {{ users = [ {{ nkey: {} }} ] }}\n", user_key.public_key())).unwrap();
    let hs = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let nats = NatsServer::start();
    let node =
        Node::start(&nats, json!({"machine_pool_size": 2, "allowed_nats_targets": [format!("127.0.0.1:{}", hs.port)]}))
            .await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let mut f = js_function(&user, "sealed", STORE, "sealed.call").await;
    f.host_services = Some(nex_api::control::NatsConnectionConfig {
        nats_url: hs.url(),
        nats_user_jwt: None,
        nats_user_seed: Some(user_key.seed().unwrap().into()),
    });
    let req = user.request(&node.id, &f).await;
    let wire = serde_json::to_string(&req).unwrap();
    assert!(!wire.contains(&user_key.seed().unwrap()), "the seed travels sealed, not in clear");
    user.client.deploy(&node.id, &req).await.unwrap();
    assert_eq!(call_json(&user.nc, "sealed.call", b"x").await, json!({"kv": null, "obj": null}));
    assert_eq!(call_json(&user.nc, "sealed.call", b"").await, json!({"kv": "x", "obj": "x"}));

    // A native workload never sees the sealed keys in its environment.
    let mut env_dump = user.native("envdump", &script("env; exec /bin/sleep 600")).await;
    env_dump.environment = env(&[("VISIBLE", "yes"), (nex_api::env::sealed::HOST_SERVICES_USER_SEED, "SUAXSECRET")]);
    let r = user.deploy(&node.id, &env_dump).await.unwrap();
    wait_log(&rec, &r.id, "VISIBLE=yes").await;
    assert!(!log_texts(&rec, &r.id).iter().any(|t| t.contains("SUAXSECRET")), "{:?}", log_texts(&rec, &r.id));
    // Nor does the node's log.
    assert!(!node.log().contains("SUAXSECRET") && !node.log().contains(&user_key.seed().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8_a_planted_state_dir_or_pid_file_is_refused() {
    let nats = NatsServer::start();
    let start = |cfg: Value, dir: &std::path::Path| {
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        std::process::Command::new(nex_bin())
            .args(["node", "up", "--config"])
            .arg(&path)
            .args(["-s", &nats.url()])
            .env("NEX_NATS_SERVER", nats_server_bin())
            .output()
            .unwrap()
    };
    use std::os::unix::fs::PermissionsExt;
    // Created first by another local user (here: owned by nobody, writable by all).
    let dir = tempfile::tempdir().unwrap();
    let planted = dir.path().join("state");
    std::fs::create_dir(&planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    let out = start(node_config(dir.path(), json!({})), dir.path());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("refusing state directory") && e.contains("belongs to uid 65534"),
        "{e}"
    );
    std::os::unix::fs::chown(&planted, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = start(node_config(dir.path(), json!({})), dir.path());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("writable by its group or by others"), "{e}");
    // A pid file planted as a link to a file the node must not overwrite.
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o700)).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let pid = dir.path().join("nex.pid");
    std::os::unix::fs::symlink(&victim, &pid).unwrap();
    let out = start(node_config(dir.path(), json!({"pid_filepath": pid})), dir.path());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    // The legitimate node: a fresh state dir is created private, artifacts are the node's alone.
    let node = Node::start(&nats, json!({})).await;
    assert_eq!(std::fs::metadata(node.state_dir()).unwrap().permissions().mode() & 0o777, 0o700);
    let user = User::new(&nats).await;
    let r = user.deploy(&node.id, &user.native("private", &script("exec /bin/sleep 600")).await).await.unwrap();
    let artifact = node.state_dir().join("runs").join(run_id(&node)).join("agents").join(&r.id).join("workload");
    assert_eq!(std::fs::metadata(&artifact).unwrap().permissions().mode() & 0o777, 0o700);
}
