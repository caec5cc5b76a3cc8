//! `nats` CLI contexts: the connection settings `nats context add` saves, so that `nex` talks to
//! the same servers with the same credentials as the `nats` tool.
//!
//! A context is `$XDG_CONFIG_HOME/nats/context/<name>.json` (`~/.config/nats/...` by default);
//! `nats context select` writes the chosen name to `.../nats/context.txt`. `--context NAME`
//! replaces every connection flag; without it, the selected context is used when no server was
//! given (flag or `NATS_URL`) and no credentials either.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

use crate::cli::GlobalOpts;

/// The fields of a context file that `nex` uses; the others (`description`, colour scheme, …)
/// are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NatsContext {
    url: String,
    token: String,
    user: String,
    password: String,
    creds: String,
    nkey: String,
    cert: String,
    key: String,
    ca: String,
    nsc: String,
    jetstream_domain: String,
    tls_first: bool,
    user_jwt: String,
    socks_proxy: String,
}

/// Where contexts live.
fn config_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("nats"))
}

/// The name `nats context select` chose, if any.
fn selected(dir: &Path) -> Option<String> {
    let name = std::fs::read_to_string(dir.join("context.txt")).ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

fn load(dir: &Path, name: &str) -> Result<NatsContext> {
    // A name is one file name: no directories, no way out of the context directory.
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        bail!("invalid context name {name:?}: use a name `nats context ls` shows");
    }
    let path = dir.join("context").join(format!("{name}.json"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("unknown context provided: {name} (no {}; `nats context ls` lists the contexts)", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading context {}", path.display())),
    };
    serde_json::from_str(&text).with_context(|| format!("context {} is not valid JSON", path.display()))
}

fn some_path(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(expand_home(s)))
}

/// `~/x` as the `nats` tool writes it, relative to `$HOME`.
fn expand_home(s: &str) -> String {
    match (s.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(home)) => format!("{home}/{rest}"),
        _ => s.to_string(),
    }
}

impl GlobalOpts {
    /// Applies `--context`, or the selected context when `server_given` is false and no
    /// credentials were given. Returns the name of the context used.
    pub fn apply_context(&mut self, server_given: bool) -> Result<Option<String>> {
        let Some(dir) = config_dir() else {
            return match &self.context {
                Some(n) => bail!("unknown context provided: {n} (neither XDG_CONFIG_HOME nor HOME is set)"),
                None => Ok(None),
            };
        };
        let name = match &self.context {
            Some(n) => n.clone(),
            None if !server_given && self.anonymous() => match selected(&dir) {
                Some(n) => n,
                None => return Ok(None),
            },
            None => return Ok(None),
        };
        let ctx = load(&dir, &name)?;
        if !ctx.nsc.is_empty() {
            bail!("context {name} takes its credentials from nsc ({}); nex reads creds files only: set `creds` in the context", ctx.nsc);
        }
        if !ctx.user_jwt.is_empty() {
            bail!("context {name} carries a bare user JWT; nex needs a creds file (JWT and seed): set `creds` in the context");
        }
        if !ctx.socks_proxy.is_empty() {
            bail!("context {name} uses a SOCKS proxy, which nex does not support");
        }
        // The context replaces every connection setting.
        if !ctx.url.is_empty() {
            self.server = ctx.url;
        }
        self.creds = some_path(&ctx.creds);
        self.nkey = some_path(&ctx.nkey);
        (self.user, self.password, self.password_file) = match (ctx.user.is_empty(), ctx.token.is_empty()) {
            (false, _) => (Some(ctx.user), (!ctx.password.is_empty()).then_some(ctx.password), None),
            (true, false) => (Some(ctx.token), None, None),
            (true, true) => (None, None, None),
        };
        self.tlscert = some_path(&ctx.cert);
        self.tlskey = some_path(&ctx.key);
        self.tlsca = some_path(&ctx.ca);
        self.tlsfirst = ctx.tls_first;
        if !ctx.jetstream_domain.is_empty() {
            self.jsdomain = Some(ctx.jetstream_domain);
        }
        Ok(Some(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(name: &str, body: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("context")).unwrap();
        std::fs::write(d.path().join("context").join(format!("{name}.json")), body).unwrap();
        d
    }

    #[test]
    fn names_cannot_leave_the_context_directory() {
        let d = dir_with("ok", "{}");
        for bad in ["../ok", "a/b", ".hidden", ""] {
            assert!(load(d.path(), bad).unwrap_err().to_string().contains("invalid context name"), "{bad}");
        }
        assert!(load(d.path(), "missing").unwrap_err().to_string().starts_with("unknown context provided"));
        assert!(load(d.path(), "ok").is_ok());
    }

    #[test]
    fn selection_is_trimmed() {
        let d = dir_with("lab", "{}");
        assert_eq!(selected(d.path()), None);
        std::fs::write(d.path().join("context.txt"), "lab\n").unwrap();
        assert_eq!(selected(d.path()).as_deref(), Some("lab"));
    }
}
