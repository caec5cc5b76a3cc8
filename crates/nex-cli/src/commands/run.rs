//! `nex run` and `nex stop`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use nex_api::workload_type;
use nex_client::{artifact_hash_from_digest, ControlClient, DeployBuilder};

use crate::cli::GlobalOpts;

/// `nex run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Artifact location, nats://BUCKET/key
    pub url: String,
    /// Target node id
    pub id: String,
    /// Environment, arguments, triggers, essential
    #[command(flatten)]
    pub workload: super::WorkloadArgs,
    /// Publisher xkey seed file (SX…)
    #[arg(long, required = true)]
    pub xkey: PathBuf,
    /// Issuer account seed file (SA…)
    #[arg(long, required = true)]
    pub issuer: PathBuf,
    /// Workload name
    #[arg(long, required = true)]
    pub name: String,
    /// Workload type: native, v8 (js) or wasm
    #[arg(long = "type", default_value = "native")]
    pub workload_type: String,
    /// Description
    #[arg(long)]
    pub description: Option<String>,
    /// Host-services NATS URL
    #[arg(long = "hs_url")]
    pub hs_url: Option<String>,
    /// Host-services user JWT
    #[arg(long = "hs_jwt", env = "NEX_HS_JWT", hide_env_values = true)]
    pub hs_jwt: Option<String>,
    /// Host-services user seed (prefer NEX_HS_SEED or --hs_seed_file: the command line is visible to every local user)
    #[arg(long = "hs_seed", env = "NEX_HS_SEED", hide_env_values = true)]
    pub hs_seed: Option<String>,
    /// File holding the host-services user seed
    #[arg(long = "hs_seed_file", env = "NEX_HS_SEED_FILE", conflicts_with = "hs_seed")]
    pub hs_seed_file: Option<PathBuf>,
}

/// `nex stop`
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Node id
    pub id: String,
    /// Workload id
    pub workload_id: String,
    /// Workload name
    #[arg(long, required = true)]
    pub name: String,
    /// Issuer account seed file (the one that deployed it)
    #[arg(long, required = true)]
    pub issuer: PathBuf,
}

/// Deploys from an object store.
pub async fn run(g: &GlobalOpts, client: &ControlClient, args: RunArgs) -> Result<()> {
    let wt = workload_type::canonical(&args.workload_type);
    if workload_type::is_function(&wt) && args.workload.trigger_subjects.is_empty() {
        bail!("cannot start a function-type workload without specifying at least one trigger subject");
    }
    let issuer = nkeys::KeyPair::from_seed(&super::read_seed(&args.issuer)?).context("issuer seed")?;
    let sender = nkeys::XKey::from_seed(&super::read_seed(&args.xkey)?).context("xkey seed")?;
    let loc = nex_node::artifact::Location::parse(&args.url).map_err(anyhow::Error::msg)?;
    let js = match g.jsdomain.as_deref() {
        Some(d) => async_nats::jetstream::with_domain(client.nats().clone(), d),
        None => async_nats::jetstream::new(client.nats().clone()),
    };
    let store = js.get_object_store(&loc.bucket).await.with_context(|| format!("object store {}", loc.bucket))?;
    let info = store.info(&loc.key).await.with_context(|| format!("object {} in {}", loc.key, loc.bucket))?;
    let hash =
        info.digest.as_deref().and_then(artifact_hash_from_digest).context("the object has no SHA-256 digest")?;
    let node_info = client.node_info(&args.id).await?;
    let hs_seed = crate::cli::secret(&args.hs_seed, &args.hs_seed_file, "--hs_seed", "NEX_HS_SEED or --hs_seed_file")?;
    // The JWT and seed travel sealed in the environment, to this node only.
    let hs = args.hs_url.clone().map(|u| nex_api::control::NatsConnectionConfig {
        nats_url: u,
        nats_user_jwt: args.hs_jwt.clone(),
        nats_user_seed: hs_seed.map(Into::into),
    });
    let b = DeployBuilder {
        name: args.name.clone(),
        workload_type: wt,
        location: args.url.clone(),
        hash,
        environment: args.workload.environment()?,
        argv: args.workload.argv(),
        trigger_subjects: args.workload.trigger_subjects.clone(),
        essential: args.workload.essential,
        description: args.description.clone(),
        jsdomain: g.jsdomain.clone(),
        host_services: hs,
        trigger_connection: None,
        namespace: Some(client.namespace().to_string()),
        ports: args.workload.ports.clone(),
    };
    let req = b.build(&issuer, &sender, &args.id, &node_info.public_xkey)?;
    match client.deploy(&args.id, &req).await {
        Ok(r) => {
            println!(
                "🚀 Workload '{}' accepted. You can now refer to this workload with ID: {} on node {}",
                r.name, r.id, args.id
            );
            Ok(())
        }
        Err(e) => {
            println!("⛔ Workload rejected");
            Err(e.into())
        }
    }
}

/// Stops a workload.
pub async fn stop(client: &ControlClient, args: StopArgs) -> Result<()> {
    let issuer = nkeys::KeyPair::from_seed(&super::read_seed(&args.issuer)?).context("issuer seed")?;
    let req = nex_client::deploy::stop_request(&issuer, client.namespace(), &args.id, &args.workload_id, &args.name)?;
    match client.stop(&args.id, &req).await {
        Ok(r) if r.stopped => {
            println!("✅ Workload '{}' stopped.", r.name);
            Ok(())
        }
        Ok(_) => bail!("⛔ Workload failed to stop"),
        Err(e) => {
            println!("⛔ Workload failed to stop");
            Err(e.into())
        }
    }
}
