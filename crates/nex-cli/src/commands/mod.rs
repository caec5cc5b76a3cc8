//! One module per command group.

pub mod bench;
pub mod call;
pub mod completions;
pub mod deployments;
pub mod devrun;
pub mod lameduck;
pub mod monitor;
pub mod node;
pub mod preflight;
pub mod rootfs;
pub mod run;
pub mod ui;
pub mod up;

use anyhow::{Context, Result};
use std::path::Path;

/// What `run` and `devrun` say about the workload itself.
#[derive(Debug, clap::Args)]
pub struct WorkloadArgs {
    /// Environment, KEY=VALUE (sealed to the node)
    pub env: Vec<String>,
    /// Arguments, one string split on spaces
    #[arg(long)]
    pub argv: Option<String>,
    /// Restart when it exits non-zero (native only)
    #[arg(long)]
    pub essential: bool,
    /// Trigger subject (functions; repeatable)
    #[arg(long = "trigger_subject")]
    pub trigger_subjects: Vec<String>,
    /// Forward a host port to the workload, HOST:WORKLOAD or PORT (repeatable; e.g. --port 18080:8080)
    #[arg(long = "port", value_name = "HOST:WORKLOAD", value_parser = parse_port)]
    pub ports: Vec<String>,
}

/// Checks a `--port` value (`HOST:WORKLOAD` or one port for both) before it is sent.
fn parse_port(s: &str) -> Result<String, String> {
    nex_api::control::PortMapping::parse(s).map(|p| p.to_string())
}

impl WorkloadArgs {
    /// The environment map.
    pub fn environment(&self) -> Result<std::collections::BTreeMap<String, String>> {
        parse_env(&self.env)
    }

    /// `--argv` split on spaces.
    pub fn argv(&self) -> Vec<String> {
        self.argv
            .as_deref()
            .map(|a| a.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect())
            .unwrap_or_default()
    }
}

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
