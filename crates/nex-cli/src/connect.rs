//! Connecting to NATS with the connection options every command shares (creds, nkey, user and
//! password, TLS).

use anyhow::{Context, Result};

use crate::cli::GlobalOpts;

impl GlobalOpts {
    /// True when connecting needs nothing but the URL: no credentials, nkey, user, token or TLS
    /// files, and no user in the URL.
    pub fn anonymous(&self) -> bool {
        self.creds.is_none()
            && self.nkey.is_none()
            && self.user.is_none()
            && self.password.is_none()
            && self.password_file.is_none()
            && self.tlscert.is_none()
            && self.tlsca.is_none()
            && !self.server.contains('@')
    }
}

/// Connects with `g`'s options; `reconnect_forever` for long-running processes (the node).
pub async fn connect(g: &GlobalOpts, name: &str, reconnect_forever: bool) -> Result<async_nats::Client> {
    let mut opts = match (&g.creds, &g.nkey) {
        (Some(creds), _) => async_nats::ConnectOptions::with_credentials_file(creds.clone())
            .await
            .with_context(|| format!("reading credentials {}", creds.display()))?,
        (None, Some(nkey)) => {
            let seed =
                std::fs::read_to_string(nkey).with_context(|| format!("reading nkey seed {}", nkey.display()))?;
            let seed = seed.lines().map(str::trim).find(|l| l.starts_with('S')).unwrap_or("").to_string();
            async_nats::ConnectOptions::with_nkey(seed)
        }
        (None, None) => {
            let password =
                crate::cli::secret(&g.password, &g.password_file, "--password", "NATS_PASSWORD or --password_file")?;
            match (&g.user, password) {
                (Some(u), Some(p)) if !p.is_empty() => async_nats::ConnectOptions::with_user_and_password(u.clone(), p),
                (Some(t), _) => async_nats::ConnectOptions::with_token(t.clone()),
                _ => async_nats::ConnectOptions::new(),
            }
        }
    };
    opts = opts.name(g.conn_name.clone().unwrap_or_else(|| name.to_string()));
    if let (Some(cert), Some(key)) = (&g.tlscert, &g.tlskey) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if let Some(ca) = &g.tlsca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if g.tlsfirst {
        opts = opts.tls_first();
    }
    if reconnect_forever {
        opts = opts.max_reconnects(None).retry_on_initial_connect();
    } else {
        opts = opts.connection_timeout(g.timeout.max(std::time::Duration::from_secs(2)));
    }
    let urls: Vec<async_nats::ServerAddr> = g
        .server
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid --server {:?}", g.server))?;
    if reconnect_forever {
        let client = opts.connect(urls).await.with_context(|| format!("connecting to NATS at {}", g.server))?;
        // Wait (bounded) for the first connection so start-up errors are visible.
        for _ in 0..100 {
            if client.connection_state() == async_nats::connection::State::Connected {
                return Ok(client);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        anyhow::bail!(
            "could not connect to NATS at {} within 5s: is nats-server running? (`nex up` starts one)",
            g.server
        );
    }
    opts.connect(urls).await.with_context(|| {
        format!(
            "could not connect to NATS at {}: is nats-server running? (`nex up` starts one, or pass --server)",
            g.server
        )
    })
}
