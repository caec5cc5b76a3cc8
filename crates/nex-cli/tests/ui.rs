//! `nex ui`: the web console seen through a real headless Chromium — both workloads in the
//! tables, function metrics from the node's Prometheus endpoint, a log line produced while the
//! page was open, attacker-controlled markup shown as text, loopback-only listening.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The headless browser, or `None` (skipped; a failure with `NEX_REQUIRE_TIERS=1`).
fn browser() -> Option<PathBuf> {
    for b in ["chromium", "chromium-browser"] {
        if on_path(b) {
            return Some(PathBuf::from(b));
        }
    }
    let why = "the web console test needs chromium (apt-get install chromium)";
    if std::env::var("NEX_REQUIRE_TIERS").as_deref() == Ok("1") {
        panic!("{why} (NEX_REQUIRE_TIERS=1: it must not skip)");
    }
    println!("skipped: {why}");
    None
}

/// One HTTP/1.0 GET with `host` as the Host header: `(status, body)`.
fn get(port: u16, path: &str, host: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Kills a child process on drop (no orphan when an assertion fails).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A headless Chromium driven over its DevTools pipe (`--remote-debugging-pipe`: commands on fd
/// 3, answers on fd 4, NUL-terminated JSON). Unlike `--dump-dom`, which reads the DOM at the
/// load event, this reads it whenever the test wants, with the page's event stream open.
struct Cdp {
    child: Reaped,
    to: std::io::PipeWriter,
    from: std::sync::mpsc::Receiver<serde_json::Value>,
    next: u64,
}

impl Cdp {
    fn start(browser: &std::path::Path, profile: &std::path::Path) -> Cdp {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (cmd_r, cmd_w) = std::io::pipe().unwrap();
        let (out_r, out_w) = std::io::pipe().unwrap();
        let (r, w) = (cmd_r.as_raw_fd(), out_w.as_raw_fd());
        let mut c = Command::new(browser);
        c.args(["--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            .args(["--no-first-run", "--window-size=1280,800"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: renderers and helpers go with it (see `Drop`).
            .process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            c.pre_exec(move || {
                // Out of the way first, so that placing one cannot close the other.
                let (r2, w2) = (libc::fcntl(r, libc::F_DUPFD, 100), libc::fcntl(w, libc::F_DUPFD, 100));
                if r2 < 0 || w2 < 0 || libc::dup2(r2, 3) < 0 || libc::dup2(w2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = Reaped(c.spawn().unwrap());
        drop((cmd_r, out_w));
        let (tx, from) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = std::io::BufReader::new(out_r);
            loop {
                let mut buf = Vec::new();
                match std::io::BufRead::read_until(&mut out, 0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        buf.pop();
                        if let Ok(v) = serde_json::from_slice(&buf) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Cdp { child, to: cmd_w, from, next: 0 }
    }

    fn pid(&self) -> i32 {
        self.child.0.id() as i32
    }

    /// Sends a command (to the page's session, or the browser) and returns its result.
    fn send(&mut self, session: Option<&str>, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.from.recv_timeout(left).unwrap_or_else(|_| panic!("chromium did not answer {method}"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page and returns its string value.
    fn eval(&mut self, session: Option<&str>, expr: &str) -> String {
        let r = self.send(session, "Runtime.evaluate", json!({"expression": expr, "returnByValue": true}));
        r["result"]["value"].as_str().unwrap_or_default().to_string()
    }

    fn close(mut self) {
        self.next += 1;
        let _ = self.to.write_all(format!("{{\"id\":{},\"method\":\"Browser.close\"}}\0", self.next).as_bytes());
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cdp {
    fn drop(&mut self) {
        // SAFETY: signalling the browser's own process group.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
    }
}

async fn call(nc: &async_nats::Client, subject: &str, body: &str) {
    let req = async_nats::Request::new().payload(body.to_string().into()).timeout(Some(Duration::from_secs(5)));
    nc.send_request(subject.to_string(), req).await.unwrap_or_else(|e| panic!("{subject}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_nodes_workloads_metrics_and_live_logs_as_text() {
    let Some(browser) = browser() else { return };
    let t0 = Instant::now();
    let nats = NatsServer::start();
    let metrics_port = free_port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(
        dir.path(),
        json!({"otel_metrics_host": "127.0.0.1", "machine_pool_size": 1, "tags": {"node_name": "metered"}}),
    );
    let args = ["--metrics", "--otel_metrics_exporter", "prometheus", "--metrics_port", &metrics_port];
    let node = Node::start_in(&nats, dir, cfg, &args).await;
    let plain = Node::start(&nats, json!({"tags": {"node_name": "plain"}})).await;
    let user = User::new(&nats).await;

    // A native service whose log lines are markup, and a JavaScript function that logs its input.
    let svc = script("while true; do echo '<script>alert(1)</script>'; sleep 0.3; done");
    user.deploy(&node.id, &user.native("uiservice", &svc).await).await.unwrap();
    let src = b"(function (s, p) { console.log('called with ' + String.fromCharCode(...p)); return p.length; })";
    let mut f = user.native("uifunction", src).await;
    f.workload_type = "v8".into();
    f.trigger_subjects = vec!["ui.fn".into()];
    user.deploy(&node.id, &f).await.unwrap();
    for i in 0..3 {
        call(&user.nc, "ui.fn", &format!("warm-up {i}")).await;
    }

    // The console, as a user starts it.
    let port = free_port();
    let out_path = tempfile::NamedTempFile::new().unwrap();
    let out = std::fs::File::create(out_path.path()).unwrap();
    let ui = Reaped(
        Command::new(nex_bin())
            .args(["ui", "--port", &port.to_string(), "-s", &nats.url()])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    );
    let banner = format!("Console on http://127.0.0.1:{port} (Ctrl-C to stop)");
    let console_log = || std::fs::read_to_string(out_path.path()).unwrap_or_default();
    eventually(Duration::from_secs(10), "the console's banner", || console_log().contains(&banner)).await;
    // Loopback only, by default.
    let bound: Vec<_> = listening_tcp().into_iter().filter(|(_, p)| *p == port).collect();
    assert_eq!(bound, vec![("127.0.0.1".parse().unwrap(), port)], "{}", console_log());
    let host = format!("127.0.0.1:{port}");
    // A page reaching the console through another name (DNS rebinding) is refused.
    assert_eq!(get(port, "/", "evil.example:80").0, 421);

    // The function's calls reach the tables from the node's metrics; the node without metrics
    // says so.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut fragment = String::new();
    while Instant::now() < deadline {
        fragment = get(port, "/overview", &host).1;
        if fragment.contains("<td><b>uifunction</b></td><td>default</td><td class=\"num\">3</td>") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(fragment.contains("<td><b>uifunction</b></td><td>default</td><td class=\"num\">3</td>"), "{fragment}");
    assert!(fragment.contains("metrics off (start the node with --metrics)"), "{fragment}");
    assert!(fragment.contains(&plain.id) && fragment.contains("metered"), "{fragment}");

    // The browser loads the page and runs its script; once its event stream is open, the function
    // is called with a marker, which can only reach the DOM live.
    let profile = tempfile::tempdir().unwrap();
    let mut cdp = Cdp::start(&browser, profile.path());
    let target = cdp.send(None, "Target.createTarget", json!({"url": format!("http://127.0.0.1:{port}/")}));
    let target = target["targetId"].as_str().unwrap().to_string();
    let attached = cdp.send(None, "Target.attachToTarget", json!({"targetId": target, "flatten": true}));
    let session = attached["sessionId"].as_str().unwrap().to_string();
    let page = Some(session.as_str());
    cdp.send(
        page,
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false}),
    );
    eventually(Duration::from_secs(20), "the page's event stream", || {
        get(port, "/overview", &host).1.contains("id=\"viewers\">1 live viewer<")
    })
    .await;
    let first_refresh = cdp.eval(page, "document.querySelector('#overview .foot').textContent");
    let marker = format!("after-load-{}", std::process::id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut dom = String::new();
    while !dom.contains(&format!("called with {marker}")) {
        assert!(Instant::now() < deadline, "the live log line never reached the page:\n{dom}");
        call(&user.nc, "ui.fn", &marker).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        dom = cdp.eval(page, "document.documentElement.outerHTML");
    }
    assert!(dom.contains("<b>uiservice</b>") && dom.contains("<b>uifunction</b>"), "both workloads:\n{dom}");
    assert!(dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "markup shown as text:\n{dom}");
    assert!(!dom.contains("<script>alert(1)"), "markup must not become an element:\n{dom}");
    assert!(dom.contains("id=\"feed-status\" class=\"live\""), "{dom}");
    // The tables refresh by themselves.
    eventually(Duration::from_secs(10), "a table refresh", || {
        cdp.eval(page, "document.querySelector('#overview .foot').textContent") != first_refresh
    })
    .await;
    if let Ok(path) = std::env::var("NEX_UI_SCREENSHOT") {
        let shot = cdp.send(page, "Page.captureScreenshot", json!({"format": "png"}));
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::write(&path, png).unwrap();
        println!("screenshot in {path}");
    }
    cdp.close();

    // Ctrl-C stops it cleanly.
    let mut ui = ui;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(ui.0.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = ui.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "nex ui did not stop on SIGINT:\n{}", console_log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}\n{}", console_log());
    println!("ui test took {:?}", t0.elapsed());
}
