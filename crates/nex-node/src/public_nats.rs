//! The "userland" NATS server a node starts for itself when its config has `public_nats_server`:
//! a `nats-server` child with the given options, up before the node connects, stopped after it.
//!
//! Options use nats-server's own names. Only the ones below are taken; any other is refused by
//! name, so an operator never believes an option applies when it does not. Two choices differ
//! from Nex: the server listens on 127.0.0.1 unless `addr`/`host` says otherwise (an open server
//! on every interface would expose the control API), and JetStream's store lives in the node's
//! state directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::process::{Child, Command};

/// The options a `public_nats_server` object may hold.
pub const OPTIONS: &[&str] =
    &["server_name", "addr", "host", "port", "jetstream", "max_payload", "max_connections", "http_port"];

/// The running server; dropping it kills the process.
pub struct PublicNats {
    child: Child,
    /// Where clients on this host reach it.
    pub url: String,
    dir: PathBuf,
}

/// nats-server's config syntax accepts JSON values for strings and numbers.
fn config_text(opts: &serde_json::Map<String, Value>, store: &Path) -> Result<(String, String, u16)> {
    if let Some(bad) = opts.keys().find(|k| !OPTIONS.contains(&k.as_str())) {
        bail!("public_nats_server: option {bad:?} is not supported (supported: {})", OPTIONS.join(", "));
    }
    let str_opt = |k: &str| -> Result<Option<String>> {
        match opts.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic() || c == ' ') => {
                Ok(Some(s.clone()))
            }
            Some(v) => bail!("public_nats_server: {k} must be a non-empty string of printable characters, not {v}"),
        }
    };
    let num_opt = |k: &str, max: u64| -> Result<Option<u64>> {
        match opts.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64().filter(|n| *n <= max) {
                Some(n) => Ok(Some(n)),
                None => bail!("public_nats_server: {k} must be a whole number up to {max}, not {v}"),
            },
        }
    };
    let host = str_opt("addr")?.or(str_opt("host")?).unwrap_or_else(|| "127.0.0.1".into());
    let port = num_opt("port", 65535)?.unwrap_or(4222) as u16;
    let mut s = format!("host: {}\nport: {port}\n", Value::String(host.clone()));
    if let Some(n) = str_opt("server_name")? {
        if n.contains(' ') {
            bail!(
                "public_nats_server: server_name {n:?} has spaces, which nats-server refuses: use e.g. {:?}",
                n.replace(' ', "-")
            );
        }
        s.push_str(&format!("server_name: {}\n", Value::String(n)));
    }
    for (k, max) in [("max_payload", 64 << 20), ("max_connections", 1 << 24), ("http_port", 65535)] {
        if let Some(n) = num_opt(k, max)? {
            s.push_str(&format!("{k}: {n}\n"));
        }
    }
    match opts.get("jetstream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            s.push_str(&format!("jetstream: {{ store_dir: {} }}\n", Value::String(store.display().to_string())))
        }
        Some(v) => bail!("public_nats_server: jetstream must be true or false, not {v}"),
    }
    Ok((s, host, port))
}

impl PublicNats {
    /// Starts `binary` with `opts` (state under `state_dir/public-nats`) and waits until it takes
    /// connections.
    pub async fn start(binary: &Path, opts: &Value, state_dir: &Path) -> Result<PublicNats> {
        let Some(opts) = opts.as_object() else {
            bail!("public_nats_server must be an object of nats-server options, e.g. {{\"port\": 4222, \"jetstream\": true}}");
        };
        let dir = state_dir.join("public-nats");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (text, host, port) = config_text(opts, &dir.join("jetstream"))?;
        let conf = dir.join("public-nats.conf");
        std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        let log = std::fs::File::create(dir.join("public-nats.log"))?;
        let mut cmd = Command::new(binary);
        cmd.arg("-c").arg(&conf).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).kill_on_drop(true);
        cmd.process_group(0);
        nex_io::tie_to_parent(&mut cmd, libc::SIGKILL);
        let child = cmd.spawn().with_context(|| format!("starting nats-server {}", binary.display()))?;
        let dial = crate::internal_nats::connect_host(&host).to_string();
        let mut me = PublicNats { child, url: format!("nats://{dial}:{port}"), dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if tokio::net::TcpStream::connect((dial.as_str(), port)).await.is_ok() {
                tracing::info!("public NATS server started on {}", me.url);
                return Ok(me);
            }
            if let Ok(Some(st)) = me.child.try_wait() {
                let log = std::fs::read_to_string(me.dir.join("public-nats.log")).unwrap_or_default();
                let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
                bail!("public_nats_server: nats-server exited ({st}): {last}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("public_nats_server: nats-server did not take connections on {dial}:{port} within 5s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL) and removes its state.
    pub async fn shutdown(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(3), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: Value) -> Result<String> {
        config_text(v.as_object().unwrap(), Path::new("/s/js")).map(|t| t.0)
    }

    #[test]
    fn options_are_mapped_and_anything_else_is_refused_by_name() {
        let t =
            text(serde_json::json!({"server_name": "nex-public", "addr": "0.0.0.0", "port": 4333, "jetstream": true}))
                .unwrap();
        assert!(t.contains("host: \"0.0.0.0\"\nport: 4333\n"), "{t}");
        assert!(t.contains("server_name: \"nex-public\""), "{t}");
        let e = text(serde_json::json!({"server_name": "Nex Public"})).unwrap_err().to_string();
        assert!(e.contains("use e.g. \"Nex-Public\""), "{e}");
        assert!(t.contains("jetstream: { store_dir: \"/s/js\" }"), "{t}");
        assert!(text(serde_json::json!({})).unwrap().starts_with("host: \"127.0.0.1\"\nport: 4222\n"));
        let e = text(serde_json::json!({"authorization": {"token": "x"}})).unwrap_err().to_string();
        assert!(e.contains("\"authorization\" is not supported"), "{e}");
        // Values cannot smuggle configuration lines in.
        let e = text(serde_json::json!({"server_name": "a\ninclude /etc/shadow"})).unwrap_err().to_string();
        assert!(e.contains("server_name must be"), "{e}");
        assert!(text(serde_json::json!({"port": 70000})).is_err());
        assert!(text(serde_json::json!({"jetstream": "yes"})).is_err());
    }
}
