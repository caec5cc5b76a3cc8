//! `nex logs` and `nex events`: follow the live streams.

use anyhow::Result;
use clap::Args;
use futures::StreamExt;

use crate::output::paint;

/// `nex logs`
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Only this node (id)
    #[arg(long, default_value = "*")]
    pub node: String,
    /// Only this workload name
    #[arg(long = "workload_name", default_value = "*")]
    pub workload_name: String,
    /// Only this workload id
    #[arg(long = "workload_id", default_value = "*")]
    pub workload_id: String,
    /// Lowest level shown: debug, info, warn, error
    #[arg(long, default_value = "debug")]
    pub level: String,
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
    /// Exit after this many lines
    #[arg(long)]
    pub count: Option<usize>,
    /// The nodes' own log lines (nodes started with --logger nats) instead of workloads'
    #[arg(long)]
    pub system: bool,
}

/// Follows `$NEX.logs.system.<node>.stdout|stderr`: lines as the node formatted them.
async fn system_logs(nc: &async_nats::Client, args: LogsArgs) -> Result<()> {
    let subject = format!("$NEX.logs.system.{}.*", token(&args.node));
    let mut sub = nc.subscribe(subject).await?;
    nex_node::nats_ext::round_trip(nc).await?;
    if !args.json {
        eprintln!("Following node logs (nodes started with --logger nats; Ctrl-C to stop)");
    }
    let mut n = 0;
    while let Some(m) = sub.next().await {
        let mut parts = m.subject.as_str().rsplitn(3, '.');
        let (stream, node) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let text = String::from_utf8_lossy(&m.payload);
        if args.json {
            println!("{}", serde_json::json!({"node": node, "stream": stream, "line": text}));
        } else {
            let short = node.get(..8).unwrap_or(node);
            println!("{} {}", paint(short, if stream == "stderr" { "31" } else { "36" }), text);
        }
        n += 1;
        if args.count.is_some_and(|c| n >= c) {
            break;
        }
    }
    Ok(())
}

/// `nex events`
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only this event type (e.g. workload_deployed)
    #[arg(long = "type", default_value = "*")]
    pub event_type: String,
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
    /// Exit after this many events
    #[arg(long)]
    pub count: Option<usize>,
}

fn rank(level: &str) -> u8 {
    match level.to_ascii_uppercase().as_str() {
        l if l.starts_with("DEBUG") => 0,
        l if l.starts_with("INFO") => 1,
        l if l.starts_with("WARN") => 2,
        l if l.starts_with("ERR") => 3,
        _ => 1,
    }
}

fn level_color(level: &str) -> &'static str {
    match rank(level) {
        0 => "2",
        1 => "32",
        2 => "33",
        _ => "31",
    }
}

fn token(s: &str) -> String {
    if s.is_empty() {
        "*".into()
    } else {
        s.to_string()
    }
}

/// Follows log lines.
pub async fn logs(nc: &async_nats::Client, ns: &str, args: LogsArgs) -> Result<()> {
    if args.system {
        return system_logs(nc, args).await;
    }
    let min = rank(&args.level);
    let mut stream = Box::pin(
        nex_client::monitor::logs(nc, ns, &token(&args.node), &token(&args.workload_name), &token(&args.workload_id))
            .await?,
    );
    nex_node::nats_ext::round_trip(nc).await?;
    if !args.json {
        eprintln!("Following logs in namespace {ns} (Ctrl-C to stop)");
    }
    let mut n = 0;
    while let Some(l) = stream.next().await {
        if rank(&l.log.level) < min {
            continue;
        }
        if args.json {
            println!("{}", serde_json::to_string(&l)?);
        } else {
            let time = l.timestamp.get(11..23).unwrap_or(&l.timestamp).to_string();
            println!(
                "{} {} {} {}",
                paint(&time, "2"),
                paint(&format!("{:<5}", l.log.level), level_color(&l.log.level)),
                paint(&format!("{}/{}", l.workload_name, &l.workload_id), "36"),
                l.log.text
            );
        }
        n += 1;
        if args.count.is_some_and(|c| n >= c) {
            break;
        }
    }
    Ok(())
}

/// Follows events of `ns` (and of `system`, unless `ns` is `system` or `*`).
pub async fn events(nc: &async_nats::Client, ns: &str, args: EventsArgs) -> Result<()> {
    let t = token(&args.event_type);
    let mut streams = vec![nex_client::monitor::events(nc, ns, &t).await?.boxed()];
    if ns != "*" && ns != nex_api::SYSTEM_NAMESPACE {
        streams.push(nex_client::monitor::events(nc, nex_api::SYSTEM_NAMESPACE, &t).await?.boxed());
    }
    nex_node::nats_ext::round_trip(nc).await?;
    let mut all = futures::stream::select_all(streams);
    if !args.json {
        eprintln!("Following events in namespace {ns} and system (Ctrl-C to stop)");
    }
    let mut n = 0;
    while let Some(e) = all.next().await {
        if args.json {
            println!("{}", serde_json::to_string(&e)?);
        } else {
            let time = e.event.time.clone().unwrap_or_default();
            let time = time.get(11..23).unwrap_or(&time).to_string();
            let d = &e.event.data;
            let mut details = Vec::new();
            for k in [
                "workload_name",
                "workload_id",
                "code",
                "message",
                "trigger_subject",
                "elapsed_nanos",
                "error",
                "id",
                "node_id",
                "version",
                "graceful",
                "running_machines",
            ] {
                if let Some(v) = d.get(k) {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let v = if (k == "id" || k == "node_id") && v.len() > 25 { format!("{}…", &v[..24]) } else { v };
                    details.push(format!("{k}={v}"));
                }
            }
            let color = match e.event_type.as_str() {
                "workload_undeployed" | "function_exec_failed" | "node_stopped" => "33",
                _ => "32",
            };
            println!(
                "{} {:<8} {} {}",
                paint(&time, "2"),
                e.subject_namespace,
                paint(&format!("{:<24}", e.event_type), color),
                details.join(" ")
            );
        }
        n += 1;
        if args.count.is_some_and(|c| n >= c) {
            break;
        }
    }
    Ok(())
}
