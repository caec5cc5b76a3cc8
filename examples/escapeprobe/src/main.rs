//! EscapeProbe: a native workload that tries what a hostile service would try and prints one
//! line per attempt (`<attempt>: <outcome>`), so that tests can read the outcome from its logs.
//!
//! `escapeprobe probe [port] [tcp=HOST:PORT …]` — its user, processes, files, mount, ptrace,
//! modules, io_uring, signalling its agent, (with a port) a credential-less connection to NATS on
//! that port of the host `NATS_URL` names, and a TCP connection to each `tcp=` address
//! (`tcp: HOST:PORT: connected|refused (…)`); `escapeprobe oom` — allocates until stopped;
//! `escapeprobe forkbomb` — forks until refused; `escapeprobe send HOST:PORT BYTES` — sends that
//! many bytes, half-closes, waits for the peer's answer and reports the rate (`sent: N bytes in
//! MS ms`); `escapeprobe http PORT` — answers HTTP on that port with its own address
//! (`listening: IP:PORT`). Each mode then sleeps.
//!
//! Build it statically: `cargo build --release -p escapeprobe --target x86_64-unknown-linux-musl`

use std::io::{Read, Write};
use std::time::Duration;

fn errno() -> String {
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(libc::ENOSYS) => "ENOSYS".into(),
        _ => e.to_string(),
    }
}

fn say(line: String) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn probe(nats: Option<&str>, tcp: &[String]) {
    // SAFETY: getuid/getgid have no preconditions.
    say(format!("uid: {} gid: {}", unsafe { libc::getuid() }, unsafe { libc::getgid() }));
    let pids = std::fs::read_dir("/proc")
        .map(|rd| rd.flatten().filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok()).count())
        .unwrap_or(0);
    say(format!("processes visible: {pids}"));
    for f in ["/etc/passwd", "/etc/hostname", "/root/.bashrc", "/work/../etc/shadow", "/proc/1/environ"] {
        match std::fs::read(f) {
            Ok(b) => say(format!("read {f}: ok {} bytes", b.len())),
            Err(e) => say(format!("read {f}: refused ({e})")),
        }
    }
    match std::fs::write("/escape-test", b"x") {
        Ok(()) => say("write /escape-test: ok".into()),
        Err(e) => say(format!("write /escape-test: refused ({e})")),
    }
    // SAFETY: plain system calls with valid (or null) pointers; failure is the expected outcome.
    unsafe {
        let rc = libc::mount(c"none".as_ptr(), c"/tmp".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null());
        say(format!("mount: {}", if rc == 0 { "ok".into() } else { errno() }));
        let rc = libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
        say(format!("ptrace: {}", if rc == 0 { "ok".into() } else { errno() }));
        let rc = libc::syscall(libc::SYS_init_module, std::ptr::null::<u8>(), 0usize, c"".as_ptr());
        say(format!("init_module: {}", if rc == 0 { "ok".into() } else { errno() }));
        let rc = libc::unshare(libc::CLONE_NEWUSER);
        say(format!("unshare: {}", if rc == 0 { "ok".into() } else { errno() }));
        let mut params = [0u8; 120];
        let rc = libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr());
        say(format!("io_uring_setup: {}", if rc >= 0 { "ok".into() } else { errno() }));
        // The agent is pid 1 of the container (the guest's init in a micro-VM).
        let rc = libc::kill(1, 0);
        say(format!("signal agent: {}", if rc == 0 { "ok".into() } else { errno() }));
    }
    for f in ["/work/.agent-seed", "/run/agent-seed", "/proc/1/mem", "/proc/1/cmdline"] {
        match std::fs::read(f) {
            Ok(b) => say(format!("read {f}: ok {} bytes", b.len())),
            Err(e) => say(format!("read {f}: refused ({e})")),
        }
    }
    let handles: Vec<_> = tcp
        .iter()
        .map(|a| {
            let a = a.clone();
            std::thread::spawn(move || {
                let outcome = match a.parse::<std::net::SocketAddr>() {
                    Ok(sa) => match std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(1500)) {
                        Ok(_) => "connected".to_string(),
                        Err(e) => format!("refused ({e})"),
                    },
                    Err(_) => "bad address".into(),
                };
                format!("tcp: {a}: {outcome}")
            })
        })
        .collect();
    for h in handles {
        if let Ok(line) = h.join() {
            say(line);
        }
    }
    if let Some(port) = nats {
        // The node's internal NATS listens on the same host as the relay NATS_URL names.
        let server = nats_server();
        let host = server.split(':').next().unwrap_or("");
        let addr = format!("{host}:{port}");
        say(format!("internal nats: {}", nats_without_credentials(&addr)));
    }
    say("probe done".into());
}

/// Connects without credentials, subscribes to everything, and reports the server's answer.
/// `host:port` of the server `NATS_URL` names (the node's relay in a sandbox).
fn nats_server() -> String {
    let url = std::env::var("NATS_URL").unwrap_or_default();
    url.rsplit("://").next().unwrap_or("").rsplit('@').next().unwrap_or("").to_string()
}

fn nats_without_credentials(addr: &str) -> String {
    let Ok(sa) = addr.parse::<std::net::SocketAddr>() else {
        return "bad address".into();
    };
    let mut s = match std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return format!("connect refused ({e})"),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nSUB > 1\r\nPING\r\n");
    let mut buf = vec![0u8; 8192];
    let mut got = String::new();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
        if got.contains("-ERR") || got.contains("PONG") {
            break;
        }
    }
    got.lines().find(|l| l.starts_with("-ERR") || l.starts_with("PONG")).unwrap_or("no answer").to_string()
}

fn oom() {
    let mut hold: Vec<Vec<u8>> = Vec::new();
    loop {
        hold.push(vec![7u8; 16 << 20]);
        say(format!("allocated {} MiB", hold.len() * 16));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn forkbomb() {
    let mut n = 0u32;
    loop {
        // SAFETY: the child only sleeps and exits, calling async-signal-safe functions.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            say(format!("fork refused after {n} children: {}", errno()));
            return;
        }
        if pid == 0 {
            unsafe {
                libc::sleep(600);
                libc::_exit(0);
            }
        }
        n += 1;
        if n >= 100_000 {
            say("fork never refused".into());
            return;
        }
    }
}

fn send(addr: &str, bytes: usize) {
    let Ok(sa) = addr.parse::<std::net::SocketAddr>() else {
        return say(format!("send: {addr}: bad address"));
    };
    let started = std::time::Instant::now();
    let outcome = (|| -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(5))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n])?;
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        // The peer answers once it has everything: the time covers delivery, not buffering.
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)?;
        Ok(())
    })();
    match outcome {
        Ok(()) => say(format!("sent: {bytes} bytes in {} ms", started.elapsed().as_millis())),
        Err(e) => say(format!("send: {addr}: {e}")),
    }
}

fn http(port: u16) {
    let listener = match std::net::TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => return say(format!("http: {port}: {e}")),
    };
    // Our own address: the source a route to the outside (or, isolated, to the node) would use.
    let node = nats_server();
    let me = ["198.18.0.1:9", node.as_str()]
        .iter()
        .find_map(|to| {
            let u = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            u.connect(to).ok()?;
            u.local_addr().ok()
        })
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    say(format!("listening: {me}:{port}"));
    for mut c in listener.incoming().flatten() {
        let mut buf = [0u8; 1024];
        let _ = c.read(&mut buf);
        let body = format!("hello from {me}\n");
        let _ = write!(c, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("oom") => oom(),
        Some("forkbomb") => forkbomb(),
        Some("send") => send(
            args.get(2).map(String::as_str).unwrap_or(""),
            args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1 << 20),
        ),
        Some("http") => http(args.get(2).and_then(|p| p.parse().ok()).unwrap_or(8080)),
        _ => {
            let tcp: Vec<String> = args.iter().filter_map(|a| a.strip_prefix("tcp=").map(str::to_string)).collect();
            let port = args.get(2).filter(|a| !a.starts_with("tcp="));
            probe(port.map(String::as_str), &tcp)
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
