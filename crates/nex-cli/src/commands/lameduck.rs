//! `nex lameduck`: refuse new work (and with a delay, drain and exit); signed with `--issuer`.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use nex_client::ControlClient;

/// `nex lameduck`
#[derive(Debug, Args)]
pub struct LameduckArgs {
    /// Node id
    pub id: String,
    /// Refuse new work now, stop workloads and exit the node after this delay (e.g. 10s)
    #[arg(long, value_parser = crate::cli::parse_duration)]
    pub delay: Option<Duration>,
    /// Admin issuer seed file (SA…): signs the request, as nodes with admin_issuers or valid_issuers require
    #[arg(long)]
    pub issuer: Option<std::path::PathBuf>,
}

/// Puts a node in lame duck mode.
pub async fn lameduck(client: &ControlClient, args: LameduckArgs) -> Result<()> {
    let issuer = match &args.issuer {
        Some(p) => Some(
            nkeys::KeyPair::from_seed(&super::read_seed(p)?).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        ),
        None => None,
    };
    let r = client.lameduck(&args.id, args.delay, issuer.as_ref()).await?;
    if r.success {
        println!("Command to enter lame duck mode issued to {}", args.id);
        if let Some(d) = args.delay {
            println!("It refuses new work now and stops its workloads and itself in {d:?}.");
        }
        Ok(())
    } else {
        anyhow::bail!("node {} did not enter lame duck mode", args.id)
    }
}
