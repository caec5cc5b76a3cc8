//! What the nex node and the nex agent both do, in one place each:
//!
//! * [`tie_to_parent`] — a child process that dies with the process that started it;
//! * [`forward_lines`] — a child's output, line by line;
//! * [`connect`] — a NATS connection with a user's JWT and seed, or seed alone;
//! * [`round_trip`] — proof that the server registered earlier subscriptions;
//! * [`header_value`] — text made safe for a NATS header.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Makes the child started by `cmd` receive `signal` when the thread that started it (the
/// parent) dies: no orphan survives a killed node or agent.
pub fn tie_to_parent(cmd: &mut tokio::process::Command, signal: i32) {
    // SAFETY: prctl only sets a flag on the child between fork and exec; async-signal-safe. It
    // runs after any uid change the command makes, which would otherwise clear the flag.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, signal);
            Ok(())
        });
    }
}

/// Calls `each` with every line `reader` yields (without its line end) until it ends.
pub fn forward_lines<R>(reader: R, mut each: impl FnMut(&str) + Send + 'static) -> tokio::task::JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            each(&l);
        }
    })
}

/// Why a connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// The seed is not an nkey seed.
    Seed(String),
    /// The server refused or could not be reached.
    Connect(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Seed(e) => write!(f, "the connection's user seed is not a valid nkey seed: {e}"),
            ConnectError::Connect(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Connects to `cfg.nats_url` as `name`: with the user JWT and seed when both are given, with
/// the seed alone (nkey authentication) when only it is, anonymously otherwise.
pub async fn connect(
    cfg: &nex_api::control::NatsConnectionConfig,
    name: &str,
) -> Result<async_nats::Client, ConnectError> {
    let jwt = cfg.nats_user_jwt.clone().filter(|j| !j.is_empty());
    let seed = cfg.nats_user_seed.as_ref().map(|s| s.expose().to_string()).filter(|s| !s.is_empty());
    let opts = match (jwt, seed) {
        (Some(jwt), Some(seed)) => {
            let kp = Arc::new(nkeys::KeyPair::from_seed(&seed).map_err(|e| ConnectError::Seed(e.to_string()))?);
            async_nats::ConnectOptions::new().jwt(jwt, move |nonce| {
                let kp = kp.clone();
                async move { kp.sign(&nonce).map_err(async_nats::AuthError::new) }
            })
        }
        (None, Some(seed)) => async_nats::ConnectOptions::with_nkey(seed),
        _ => async_nats::ConnectOptions::new(),
    };
    opts.name(name)
        .connect(cfg.nats_url.as_str())
        .await
        .map_err(|e| ConnectError::Connect(format!("connecting to {}: {e}", cfg.nats_url)))
}

/// Waits until the server has processed everything this connection sent so far.
///
/// `flush` only writes to the socket; a message that travels to the server and back on a fresh
/// inbox proves that earlier SUBs are registered before another connection relies on them.
pub async fn round_trip(nc: &async_nats::Client) -> Result<(), String> {
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    nc.publish(inbox, bytes::Bytes::new()).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
        Ok(Some(_)) => {
            let _ = sub.unsubscribe().await;
            Ok(())
        }
        Ok(None) => Err("connection closed".into()),
        Err(_) => Err("no round trip to the NATS server within 5s".into()),
    }
}

/// `text` as a NATS header value: header values cannot hold line breaks.
pub fn header_value(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_values_are_one_line() {
        assert_eq!(super::header_value("a\r\nb\nc"), "a  b c");
    }

    #[tokio::test]
    async fn lines_are_forwarded_without_their_ends() {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        let data: &'static [u8] = b"one\ntwo\r\nthree";
        super::forward_lines(data, move |l| g.lock().unwrap().push(l.to_string())).await.unwrap();
        assert_eq!(*got.lock().unwrap(), vec!["one", "two", "three"]);
    }
}
