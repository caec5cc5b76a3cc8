//! One module per command group.

pub mod bench;
pub mod devrun;
pub mod misc;
pub mod monitor;
pub mod node;
pub mod preflight;
pub mod rootfs;
pub mod run;
pub mod up;

use anyhow::{Context, Result};
use std::path::Path;

/// Reads the first seed (`S…`) found in a key file.
pub fn read_seed(path: &Path) -> Result<String> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading key file {}", path.display()))?;
    s.lines()
        .map(str::trim)
        .find(|l| l.starts_with('S'))
        .map(str::to_string)
        .with_context(|| format!("{} holds no nkey seed (a line starting with S)", path.display()))
}

/// Parses `KEY=VALUE` arguments into a map.
pub fn parse_env(pairs: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    let mut m = std::collections::BTreeMap::new();
    for p in pairs {
        let (k, v) =
            p.split_once('=').with_context(|| format!("environment argument {p:?} must look like KEY=VALUE"))?;
        if k.is_empty() {
            anyhow::bail!("environment argument {p:?} has an empty key");
        }
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}
