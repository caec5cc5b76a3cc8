//! `nex devrun`: the developer loop, as in Nex — pick a node by AUCTION, upload the file
//! to `NEXCLIFILES`, stop the previous instance of the same name, deploy the new one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::seq::SliceRandom;

use nex_api::control::AuctionRequest;
use nex_api::workload_type;
use nex_client::{ControlClient, DeployBuilder};

use crate::cli::GlobalOpts;

/// Object store used for developer uploads.
pub const DEV_BUCKET: &str = "NEXCLIFILES";

/// `nex devrun`
#[derive(Debug, Args)]
pub struct DevrunArgs {
    /// The file to run: a native executable, a .wasm module or a .js function
    pub file: PathBuf,
    /// Environment, arguments, triggers, essential
    #[command(flatten)]
    pub workload: super::WorkloadArgs,
    /// Workload type (default: from the file — ELF → native, .wasm → wasm, .js → v8)
    #[arg(long = "type")]
    pub workload_type: Option<String>,
    /// Stop running instances of the same name first
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub stop: bool,
    /// Size limit of the NEXCLIFILES bucket when it is created
    #[arg(long)]
    pub bucketmaxbytes: Option<u64>,
    /// Deploy to this node instead of auctioning
    #[arg(long)]
    pub node: Option<String>,
    /// Only nodes with this tag, KEY=VALUE (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// Workload type and, for native files, (os, arch) from the file's name and first bytes.
pub fn detect(path: &Path, bytes: &[u8]) -> Option<(String, Option<(&'static str, &'static str)>)> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "js" {
        return Some((workload_type::V8.into(), None));
    }
    if ext == "wasm" || bytes.starts_with(b"\0asm") {
        return Some((workload_type::WASM.into(), None));
    }
    if bytes.starts_with(&[0x7f, b'E', b'L', b'F']) && bytes.len() > 19 {
        let arch = match bytes[18] {
            0x3e => Some("amd64"),
            0xb7 => Some("arm64"),
            _ => None,
        };
        return Some((workload_type::NATIVE.into(), arch.map(|a| ("linux", a))));
    }
    if bytes.starts_with(b"#!") {
        return Some((workload_type::NATIVE.into(), None));
    }
    None
}

/// The object key for a file: its base name with every `.` removed.
pub fn object_key(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().replace('.', "")).unwrap_or_default()
}

/// Loads or creates a seed file under `~/.nex`, mode 0600.
fn load_or_create(path: &Path, what: &str, create: impl FnOnce() -> Result<String>) -> Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        eprintln!("Reusing existing {what} {}", path.display());
        return Ok(s.trim().to_string());
    }
    let seed = create()?;
    super::node::write_private(path, &seed)?;
    eprintln!("Wrote new {what} {}", path.display());
    Ok(seed)
}

/// The developer's issuer and publisher keys.
pub fn dev_keys() -> Result<(nkeys::KeyPair, nkeys::XKey)> {
    let home = std::env::var_os("HOME").map(PathBuf::from).context("HOME is not set")?;
    let dir = home.join(".nex");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let issuer =
        load_or_create(&dir.join("issuer.nk"), "issuer account key", || Ok(nkeys::KeyPair::new_account().seed()?))?;
    let xkey = load_or_create(&dir.join("publisher.xk"), "publisher xkey", || Ok(nkeys::XKey::new().seed()?))?;
    Ok((
        nkeys::KeyPair::from_seed(&issuer).context("~/.nex/issuer.nk")?,
        nkeys::XKey::from_seed(&xkey).context("~/.nex/publisher.xk")?,
    ))
}

/// Uploads `path` to `bucket` under `key`, with a progress bar for large files on a terminal.
pub async fn upload(
    nc: &async_nats::Client,
    jsdomain: Option<&str>,
    bucket: &str,
    key: &str,
    path: &Path,
    max_bytes: Option<u64>,
) -> Result<()> {
    let js = match jsdomain {
        Some(d) => async_nats::jetstream::with_domain(nc.clone(), d),
        None => async_nats::jetstream::new(nc.clone()),
    };
    let store = match js.get_object_store(bucket).await {
        Ok(s) => s,
        Err(_) => js
            .create_object_store(async_nats::jetstream::object_store::Config {
                bucket: bucket.to_string(),
                description: Some("Ad hoc object storage for NEX CLI developer mode uploads".into()),
                max_bytes: max_bytes.unwrap_or(100 * 1024 * 1024) as i64,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating object store {bucket} (is JetStream enabled on the server?)"))?,
    };
    let file = tokio::fs::File::open(path).await.with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata().await?.len();
    let bar = if len > 4 * 1024 * 1024 && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = indicatif::ProgressBar::new(len);
        b.set_style(
            indicatif::ProgressStyle::with_template("uploading {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_message(key.to_string());
        Some(b)
    } else {
        None
    };
    let mut reader = match &bar {
        Some(b) => Box::new(b.wrap_async_read(file)) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        None => Box::new(file),
    };
    store.put(key, &mut reader).await.with_context(|| format!("uploading {} to {bucket}/{key}", path.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

/// Runs a local file on a node.
pub async fn devrun(g: &GlobalOpts, client: &ControlClient, args: DevrunArgs) -> Result<()> {
    let bytes = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    if bytes.is_empty() {
        bail!("{} is empty", args.file.display());
    }
    let detected = detect(&args.file, &bytes);
    let wt = match (&args.workload_type, &detected) {
        (Some(t), _) => workload_type::canonical(t),
        (None, Some((t, _))) => t.clone(),
        (None, None) => {
            bail!("cannot tell what kind of workload {} is: pass --type native, wasm or v8", args.file.display())
        }
    };
    if workload_type::is_function(&wt) && args.workload.trigger_subjects.is_empty() {
        bail!("cannot start a function-type workload without specifying at least one trigger subject");
    }
    let platform = detected.and_then(|(_, p)| p);
    let node = match &args.node {
        Some(n) => n.clone(),
        None => {
            let mut req = AuctionRequest { workload_types: vec![wt.clone()], ..Default::default() };
            if let Some((os, arch)) = platform {
                req.os = Some(os.into());
                req.arch = Some(arch.into());
            }
            for t in &args.tags {
                let (k, v) = t.split_once('=').with_context(|| format!("--tag {t:?} must look like KEY=VALUE"))?;
                req.tags.insert(k.into(), v.into());
            }
            let auction = ControlClient::new(client.nats().clone(), Duration::from_millis(750), client.namespace());
            let nodes = auction.auction(&req).await?;
            let pick = nodes.choose(&mut rand::thread_rng()).map(|n| n.node_id.clone());
            pick.context(
                "unable to locate candidate node - no nodes discovered (start one with `nex up` or `nex node up`)",
            )?
        }
    };
    let info = client.node_info(&node).await?;
    let (issuer, sender) = dev_keys()?;
    let key = object_key(&args.file);
    if !nex_api::jwt::is_valid_workload_name(&key) {
        bail!("the file name {key:?} is not a valid workload name: use letters, digits, '-' and '_'");
    }
    upload(client.nats(), g.jsdomain.as_deref(), DEV_BUCKET, &key, &args.file, args.bucketmaxbytes).await?;
    if args.stop {
        for m in info.machines.iter().filter(|m| m.workload.name == key) {
            let req = nex_client::deploy::stop_request(&issuer, client.namespace(), &node, &m.id, &key)?;
            let r = client
                .stop(&node, &req)
                .await
                .with_context(|| format!("stopping the previous instance {} of {key}", m.id))?;
            if !r.stopped {
                bail!("the previous instance {} of {key} did not stop", m.id);
            }
            eprintln!("Stopped previous instance {} of {key}", m.id);
        }
    }
    let b = DeployBuilder {
        name: key.clone(),
        workload_type: wt,
        location: format!("nats://{DEV_BUCKET}/{key}"),
        hash: nex_api::jwt::sha256_hex(&bytes),
        environment: args.workload.environment()?,
        argv: args.workload.argv(),
        trigger_subjects: args.workload.trigger_subjects.clone(),
        essential: args.workload.essential,
        description: Some("Workload published in devmode".into()),
        jsdomain: Some(g.jsdomain.clone().unwrap_or_default()),
        host_services: None,
        trigger_connection: None,
        namespace: Some(client.namespace().to_string()),
        ports: args.workload.ports.clone(),
    };
    let req = b.build(&issuer, &sender, &node, &info.public_xkey)?;
    match client.deploy(&node, &req).await {
        Ok(r) => {
            if args.json {
                crate::output::print_json(
                    &serde_json::json!({"id": r.id, "name": r.name, "node": node, "issuer": r.issuer}),
                );
            } else {
                println!(
                    "🚀 Workload '{}' accepted. You can now refer to this workload with ID: {} on node {}",
                    r.name, r.id, node
                );
            }
            Ok(())
        }
        Err(e) => {
            println!("⛔ Workload rejected");
            Err(e.into())
        }
    }
}
