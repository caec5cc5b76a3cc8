//! `nex lameduck`, `nex node probe`, `nex call`, `nex completions`.

use std::time::Duration;

use anyhow::Result;
use clap::{Args, CommandFactory};

use nex_client::ControlClient;

use crate::output::{print_json, Table};

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

/// `nex node probe`
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Only this workload (id or name)
    #[arg(long)]
    pub workload: Option<String>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// `nex call`
#[derive(Debug, Args)]
pub struct CallArgs {
    /// Subject, e.g. svc.echo or a function's trigger subject
    pub subject: String,
    /// Request body
    #[arg(default_value = "")]
    pub data: String,
}

/// `nex completions`
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// Shell
    pub shell: clap_complete::Shell,
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

/// Lists workloads (WPING).
pub async fn probe(client: &ControlClient, args: ProbeArgs) -> Result<()> {
    let found = client.ping_workloads(args.workload.as_deref()).await?;
    if args.json {
        print_json(&found);
        return Ok(());
    }
    let mut t = Table::new("Discovered Workloads", &["ID", "Name", "Type", "Namespace", "Node Name"]);
    for n in &found {
        let node_name = n.tags.get(nex_api::control::tags::NODE_NAME).cloned().unwrap_or_else(|| "no-name".into());
        for m in &n.running_machines {
            t.row(vec![m.id.clone(), m.name.clone(), m.workload_type.clone(), m.namespace.clone(), node_name.clone()]);
        }
    }
    if found.is_empty() {
        println!("No workloads matched");
    } else {
        print!("{}", t.render());
    }
    Ok(())
}

/// Sends one request and prints the reply.
pub async fn call(nc: &async_nats::Client, timeout: Duration, args: CallArgs) -> Result<()> {
    let req = async_nats::Request::new().payload(args.data.into_bytes().into()).timeout(Some(timeout));
    let m = nc.send_request(args.subject.clone(), req).await.map_err(|e| match e.kind() {
        async_nats::RequestErrorKind::NoResponders => {
            anyhow::anyhow!("nothing answers on {}: is the workload deployed? (`nex node probe`)", args.subject)
        }
        async_nats::RequestErrorKind::TimedOut => anyhow::anyhow!("no reply on {} within {timeout:?}", args.subject),
        _ => anyhow::anyhow!("request on {} failed: {e}", args.subject),
    })?;
    if let Some(err) = m.headers.as_ref().and_then(|h| h.get(nex_api::agent::HEADER_ERROR)) {
        anyhow::bail!("the function failed: {err}");
    }
    println!("{}", String::from_utf8_lossy(&m.payload));
    Ok(())
}

/// Prints shell completions.
pub fn completions(args: CompletionsArgs) {
    let mut cmd = crate::cli::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "nex", &mut std::io::stdout());
}
