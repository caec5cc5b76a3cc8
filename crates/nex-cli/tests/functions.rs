//! Functions: WebAssembly and JavaScript triggered by subjects, queue-group triggers, and host
//! services (kv, messaging, objectstore, http) with their real error messages.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use nex_client::DeployBuilder;
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn echo_wasm() -> Vec<u8> {
    let p = repo().join("target/wasm32-wasip1/release/echofunction.wasm");
    std::fs::read(&p).unwrap_or_else(|_| {
        panic!(
            "{} is missing: build it with `make build` (cargo build --release -p echofunction --target wasm32-wasip1)",
            p.display()
        )
    })
}

fn js(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("examples/js").join(name)).unwrap()
}

/// `(module (func (export "_start") (loop (br 0))))`
const WASM_SPIN: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x04, 0x01, 0x60, 0x00, 0x00, 0x03, 0x02, 0x01, 0x00, 0x07,
    0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, 0x0a, 0x09, 0x01, 0x07, 0x00, 0x03, 0x40, 0x0c,
    0x00, 0x0b, 0x0b,
];

/// `(module (memory 1) (func (export "_start") (loop (drop (memory.grow (i32.const 100))) (br 0))))`
const WASM_HOG: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x04, 0x01, 0x60, 0x00, 0x00, 0x03, 0x02, 0x01, 0x00, 0x05,
    0x03, 0x01, 0x00, 0x01, 0x07, 0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, 0x0a, 0x0f, 0x01,
    0x0d, 0x00, 0x03, 0x40, 0x41, 0xe4, 0x00, 0x40, 0x00, 0x1a, 0x0c, 0x00, 0x0b, 0x0b,
];

async fn function(user: &User, name: &str, wt: &str, bytes: &[u8], triggers: &[&str]) -> DeployBuilder {
    let mut b = user.native(name, bytes).await;
    b.workload_type = wt.into();
    b.trigger_subjects = triggers.iter().map(|s| s.to_string()).collect();
    b
}

async fn call(nc: &async_nats::Client, subject: &str, body: &[u8]) -> async_nats::Message {
    let req = async_nats::Request::new().payload(body.to_vec().into()).timeout(Some(Duration::from_secs(10)));
    nc.send_request(subject.to_string(), req).await.unwrap_or_else(|e| panic!("{subject}: {e}"))
}

fn error_of(m: &async_nats::Message) -> Option<String> {
    m.headers.as_ref().and_then(|h| h.get(nex_api::agent::HEADER_ERROR)).map(|v| v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_echo_with_a_wildcard_trigger() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let b = function(&user, "echowasm", "wasm", &echo_wasm(), &["echo.>"]).await;
    let r = user.deploy(&node.id, &b).await.expect("the wasm function deploys");
    // The echo through the node, with the real trigger subject in argv[1].
    let m = call(&user.nc, "echo.test.trigger", b"Hello world").await;
    assert_eq!(error_of(&m), None);
    assert_eq!(&m.payload[..], b"Hello worldecho.test.trigger");
    let ns: u64 = m.headers.as_ref().unwrap().get("x-nex-runtime-ns").unwrap().as_str().parse().unwrap();
    assert!(ns > 0);
    // Empty input, empty-ish output still answers.
    let m = call(&user.nc, "echo.x", b"").await;
    assert_eq!(&m.payload[..], b"echo.x");
    rec.wait_until(Duration::from_secs(5), "function_exec_succeeded", |rec| {
        rec.workload_events("function_exec_succeeded", &r.id).len() >= 2
    })
    .await;
    // One event per call, with the real subject (calls on different worker threads may report
    // in either order).
    let subjects: Vec<String> = rec
        .workload_events("function_exec_succeeded", &r.id)
        .iter()
        .map(|ev| ev["data"]["trigger_subject"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        subjects.contains(&"echo.test.trigger".to_string()) && subjects.contains(&"echo.x".to_string()),
        "{subjects:?}"
    );
    let info = user.info(&node.id).await;
    assert_eq!(info.machines[0].workload.workload_type, "wasm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_echo_exact_json_and_two_instances_share_the_load() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_pool_size": 2})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let b = function(&user, "echofunctionjs", "v8", &js("echofunction.js"), &["helloworld"]).await;
    let a = user.deploy(&node.id, &b).await.expect("the first instance deploys");
    let m = call(&user.nc, "helloworld", b"hello world").await;
    assert_eq!(error_of(&m), None);
    assert_eq!(std::str::from_utf8(&m.payload).unwrap(), r#"{"triggered_on":"helloworld","payload":"hello world"}"#);

    // A second instance under the same name (the `js` alias): each request is answered once.
    let mut b2 = b.clone();
    b2.workload_type = "js".into();
    let second = user.deploy(&node.id, &b2).await.expect("second instance");
    each_answered_once_by_both(&user, &rec, "helloworld", 30, [&a.id, &second.id]).await;
}

/// Sends `n` requests on `subject` and checks that each got exactly one answer and that both
/// instances `ids` ran some of them.
async fn each_answered_once_by_both(user: &User, rec: &Recorder, subject: &str, n: usize, ids: [&str; 2]) {
    let inbox = user.nc.new_inbox();
    let mut replies = user.nc.subscribe(inbox.clone()).await.unwrap();
    nex_node::nats_ext::round_trip(&user.nc).await.unwrap();
    for i in 0..n {
        user.nc.publish_with_reply(subject.to_string(), inbox.clone(), format!("m{i}").into()).await.unwrap();
    }
    let mut got = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), futures::StreamExt::next(&mut replies)).await {
        got += 1;
    }
    assert_eq!(got, n, "every request answered exactly once");
    rec.wait_until(Duration::from_secs(5), "both instances ran", |rec| {
        ids.iter().all(|id| !rec.workload_events("function_exec_succeeded", id).is_empty())
    })
    .await;
}

/// With `agent_triggers: false` the node relays every call (as Nex does); the same function name
/// on a node whose agents hold their own subscriptions shares one queue group with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_and_agent_held_triggers_share_one_queue_group() {
    let nats = NatsServer::start();
    let direct = Node::start(&nats, json!({})).await;
    let relaying = Node::start(&nats, json!({"agent_triggers": false})).await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let w = function(&user, "relayedwasm", "wasm", &echo_wasm(), &["relay.echo"]).await;
    let r = user.deploy(&relaying.id, &w).await.expect("deploy on the relaying node");
    let m = call(&user.nc, "relay.echo", b"hi ").await;
    assert_eq!(error_of(&m), None);
    assert_eq!(&m.payload[..], b"hi relay.echo");
    assert!(m.headers.as_ref().and_then(|h| h.get("x-nex-runtime-ns")).is_some(), "runtime header on a relayed reply");
    rec.wait_until(Duration::from_secs(5), "function_exec_succeeded of the relayed call", |rec| {
        !rec.workload_events("function_exec_succeeded", &r.id).is_empty()
    })
    .await;

    let b = function(&user, "sharedjs", "v8", &js("echofunction.js"), &["shared.js"]).await;
    let a = user.deploy(&direct.id, &b).await.expect("agent-held instance");
    let c = user.deploy(&relaying.id, &b).await.expect("relayed instance");
    each_answered_once_by_both(&user, &rec, "shared.js", 40, [&a.id, &c.id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_loops_and_memory_hogs_fail_cleanly_while_others_answer() {
    let nats = NatsServer::start();
    let node =
        Node::start(&nats, json!({"machine_pool_size": 3, "function_timeout_ms": 700, "function_memory_mib": 32}))
            .await;
    let user = User::new(&nats).await;
    let rec = Recorder::start(&user.nc).await;
    let good = function(&user, "goodjs", "v8", &js("echofunction.js"), &["good"]).await;
    user.deploy(&node.id, &good).await.unwrap();
    let spin_js = function(&user, "spinjs", "v8", b"(function () { while (true) {} })", &["spin.js"]).await;
    let spin_js_id = user.deploy(&node.id, &spin_js).await.unwrap().id;
    let spin_wasm = function(&user, "spinwasm", "wasm", WASM_SPIN, &["spin.wasm"]).await;
    let spin_wasm_id = user.deploy(&node.id, &spin_wasm).await.unwrap().id;

    let (js_reply, wasm_reply, good_reply) =
        tokio::join!(call(&user.nc, "spin.js", b"x"), call(&user.nc, "spin.wasm", b"x"), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            call(&user.nc, "good", b"still here").await
        });
    assert!(error_of(&good_reply).is_none());
    assert!(std::str::from_utf8(&good_reply.payload).unwrap().contains("still here"));
    let e = error_of(&js_reply).expect("JS loop cut off with an error reply");
    assert!(e.contains("timed out after 700ms"), "{e}");
    let e = error_of(&wasm_reply).expect("wasm loop cut off with an error reply");
    assert!(e.contains("timed out"), "{e}");
    rec.wait_until(Duration::from_secs(5), "function_exec_failed", |rec| {
        !rec.workload_events("function_exec_failed", &spin_js_id).is_empty()
            && !rec.workload_events("function_exec_failed", &spin_wasm_id).is_empty()
    })
    .await;
    // The looping functions answer again afterwards (they are not wedged).
    let again = call(&user.nc, "spin.js", b"x").await;
    assert!(error_of(&again).unwrap().contains("timed out"));

    // Over the memory limit.
    let hog_wasm = function(&user, "hogwasm", "wasm", WASM_HOG, &["hog.wasm"]).await;
    user.deploy(&node.id, &hog_wasm).await.unwrap();
    let e = error_of(&call(&user.nc, "hog.wasm", b"").await).expect("wasm hog fails");
    assert!(e.contains("memory limit of 32 MiB"), "{e}");
    let hog_js = function(
        &user,
        "hogjs",
        "v8",
        b"(function () { const a = []; while (true) a.push(new Array(100000).fill(7)); })",
        &["hog.js"],
    )
    .await;
    user.deploy(&node.id, &hog_js).await.unwrap();
    let e = error_of(&call(&user.nc, "hog.js", b"").await).expect("JS hog fails");
    assert!(e.contains("memory"), "{e}");
    let m = call(&user.nc, "good", b"after").await;
    assert!(error_of(&m).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_host_services_kv_messaging_objectstore() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"machine_pool_size": 3})).await;
    let user = User::new(&nats).await;

    // kv: set, delete, keys and get.
    let kv = function(&user, "kvjs", "v8", &js("kv.js"), &["hellokvservice"]).await;
    user.deploy(&node.id, &kv).await.unwrap();
    let m = call(&user.nc, "hellokvservice", b"hello!").await;
    assert_eq!(error_of(&m), None);
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["keys"], json!(["hello2"]), "{v}");
    assert_eq!(v["hello2"], "hello!");
    // The bucket exists with the templated name: namespace, name and the tenant (issuer) hash.
    let jetstream = async_nats::jetstream::new(user.nc.clone());
    let tenant = nex_api::id::tenant_id("default", "kvjs", &user.issuer.public_key());
    let store =
        jetstream.get_key_value(format!("hs_default_kvjs_{tenant}_kv")).await.expect("bucket from the template");
    assert_eq!(&store.get("hello2").await.unwrap().unwrap()[..], b"hello!");

    // messaging: a responder answers, a subscriber sees the publish.
    let mut published = user.nc.subscribe("hello.world").await.unwrap();
    let mut requests = user.nc.subscribe("hello.world.request").await.unwrap();
    nex_node::nats_ext::round_trip(&user.nc).await.unwrap();
    let responder = user.nc.clone();
    tokio::spawn(async move {
        while let Some(m) = futures::StreamExt::next(&mut requests).await {
            let body = format!("resp: {}", String::from_utf8_lossy(&m.payload));
            let _ = responder.publish(m.reply.unwrap(), body.into()).await;
        }
    });
    let msg = function(&user, "messagingjs", "v8", &js("messaging.js"), &["hellomessagingservice"]).await;
    user.deploy(&node.id, &msg).await.unwrap();
    let m = call(&user.nc, "hellomessagingservice", b"asdfghjkl;'").await;
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["hello.world.request"], "resp: asdfghjkl;'", "{v}");
    let p =
        tokio::time::timeout(Duration::from_secs(2), futures::StreamExt::next(&mut published)).await.unwrap().unwrap();
    assert_eq!(&p.payload[..], b"asdfghjkl;'");

    // objectstore: put, delete, list and get.
    let os = function(&user, "objectstorejs", "v8", &js("objectstore.js"), &["helloobjectstoreservice"]).await;
    user.deploy(&node.id, &os).await.unwrap();
    let m = call(&user.nc, "helloobjectstoreservice", b"hello!").await;
    assert_eq!(error_of(&m), None);
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    let list = v["list"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["name"], "hello2");
    assert_eq!(v["hello2"], "hello!");

    // A failing call throws the real message, not "OK".
    let missing =
        function(&user, "missingjs", "v8", b"(function () { return hostServices.kv.get('nope'); })", &["missing.key"])
            .await;
    user.deploy(&node.id, &missing).await.unwrap();
    let e = error_of(&call(&user.nc, "missing.key", b"").await).expect("error reply");
    assert!(e.contains("failed to get value for key nope"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_http_host_service_against_a_local_server() {
    // http: a local HTTP server answering GET 200, POST 201, PUT/PATCH/DELETE 204, HEAD 200.
    let port = http_server(|head| {
        let method = head.split(' ').next().unwrap_or("").to_string();
        let (code, text, body) = match method.as_str() {
            "GET" => (200, "OK", "hello from get"),
            "POST" => (201, "Created", "created"),
            "HEAD" => (200, "OK", ""),
            _ => (204, "No Content", ""),
        };
        format!(
            "HTTP/1.1 {code} {text}\r\nContent-Length: {}\r\nX-Test: yes\r\nConnection: close\r\n\r\n{}",
            body.len(),
            if method == "HEAD" { "" } else { body }
        )
    })
    .await;
    let nats = NatsServer::start();
    // The http host service refuses loopback unless the operator allows it.
    let node =
        Node::start(&nats, json!({"host_services": {"services": {"http": {"config": {"allow": ["127.0.0.1"]}}}}}))
            .await;
    let user = User::new(&nats).await;
    let f = function(&user, "httpjs", "v8", &js("http.js"), &["hellohttp"]).await;
    user.deploy(&node.id, &f).await.unwrap();
    let m = call(&user.nc, "hellohttp", format!("http://127.0.0.1:{port}/path?q=1").as_bytes()).await;
    assert_eq!(error_of(&m), None);
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["get"]["status"], 200, "{v}");
    assert_eq!(v["get"]["body"], "hello from get");
    assert_eq!(v["post"]["status"], 201, "{v}");
    assert_eq!(v["put"]["status"], 204, "{v}");
    assert_eq!(v["patch"]["status"], 204, "{v}");
    assert_eq!(v["delete"]["status"], 204, "{v}");
    assert_eq!(v["head"]["status"], 200, "{v}");
    assert_eq!(v["get"]["headers"]["x-test"], "yes", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_deploy_rules() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({"max_js_source_bytes": 64})).await;
    let user = User::new(&nats).await;
    let mut f = function(&user, "notriggers", "v8", &js("echofunction.js"), &[]).await;
    let e = user.deploy(&node.id, &f).await.unwrap_err();
    assert!(e.contains("at least one trigger subject is required"), "{e}");
    f.trigger_subjects = vec!["t.essential".into()];
    f.essential = true;
    let e = user.deploy(&node.id, &f).await.unwrap_err();
    assert!(e.contains("essential flag is not supported"), "{e}");
    f.essential = false;
    let e = user.deploy(&node.id, &f).await.unwrap_err();
    assert!(e.contains("exceeds maximum of 64 bytes"), "{e}");
    let bad = function(&user, "notafunction", "v8", b"42", &["t.nf"]).await;
    let e = user.deploy(&node.id, &bad).await.unwrap_err();
    assert!(e.contains("completion value must be a function"), "{e}");
    let syntax = function(&user, "syntaxerr", "v8", b"(function (", &["t.se"]).await;
    let e = user.deploy(&node.id, &syntax).await.unwrap_err();
    assert!(e.contains("failed to compile source for execution"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_function_uses_host_service_imports() {
    let p = repo().join("target/wasm32-wasip1/release/kvfunction.wasm");
    let bytes = std::fs::read(&p).unwrap_or_else(|_| panic!("{} is missing: run `make build`", p.display()));
    let nats = NatsServer::start();
    let node = Node::start(&nats, json!({})).await;
    let user = User::new(&nats).await;
    let f = function(&user, "kvwasm", "wasm", &bytes, &["kv.wasm"]).await;
    user.deploy(&node.id, &f).await.unwrap();
    let m = call(&user.nc, "kv.wasm", b"first").await;
    assert_eq!(error_of(&m), None);
    assert_eq!(&m.payload[..], b"previous=none");
    let m = call(&user.nc, "kv.wasm", b"second").await;
    assert_eq!(&m.payload[..], b"previous=first");
    let tenant = nex_api::id::tenant_id("default", "kvwasm", &user.issuer.public_key());
    let store = async_nats::jetstream::new(user.nc.clone())
        .get_key_value(format!("hs_default_kvwasm_{tenant}_kv"))
        .await
        .unwrap();
    assert_eq!(&store.get("last").await.unwrap().unwrap()[..], b"second");
}
