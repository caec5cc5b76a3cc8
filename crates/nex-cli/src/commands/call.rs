//! `nex call`: one request, its reply printed.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

/// `nex call`
#[derive(Debug, Args)]
pub struct CallArgs {
    /// Subject, e.g. svc.echo or a function's trigger subject
    pub subject: String,
    /// Request body
    #[arg(default_value = "")]
    pub data: String,
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
