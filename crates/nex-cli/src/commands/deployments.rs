//! `nex plan`, `nex apply` and `nex deployments …`: the desired state of self-healing
//! deployments in the deployments bucket, every write signed by its issuer and conditional on
//! the revision it was planned against.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::kv;
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::json;

use nex_api::deployment::{self as dep, Record, Resolved, Spec};

use crate::cli::GlobalOpts;
use crate::output::{print_json, Table};

/// `nex plan`
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The deployment spec: YAML (.yaml, .yml) or JSON
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Issuer account seed file (SA…); default ~/.nex/issuer.nk
    #[arg(long)]
    pub issuer: Option<PathBuf>,
    /// Print the plan as JSON
    #[arg(long)]
    pub json: bool,
    /// Seal the environment to this fleet xkey (X…); default: the one the live nodes advertise
    #[arg(long = "fleet-xkey", value_name = "XKEY")]
    pub fleet_xkey: Option<String>,
    /// Store the environment as given, readable by anyone who can read the bucket (no secrets!)
    #[arg(long = "plain-environment", conflicts_with = "fleet_xkey")]
    pub plain_environment: bool,
}

/// `nex apply`
#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Write only if the deployment is still at this revision (the one `nex plan` showed); 0: only
    /// if it does not exist
    #[arg(long = "expect-revision")]
    pub expect_revision: Option<u64>,
}

/// `nex deployments …`
#[derive(Debug, Subcommand)]
pub enum DeploymentsCommand {
    /// List the deployments in --namespace
    #[command(
        alias = "list",
        after_help = "Examples:\n  nex deployments ls\n  nex deployments ls --json | jq '.[].name'"
    )]
    Ls(LsArgs),
    /// Show a deployment: its spec, owner and replica slots
    #[command(after_help = "Example:\n  nex deployments get echo")]
    Get(NameArgs),
    /// Show every revision of a deployment the bucket still holds, and why any does not count
    #[command(after_help = "Example:\n  nex deployments history echo")]
    History(NameArgs),
    /// Remove a deployment: the nodes stop every replica (signed by its issuer)
    #[command(alias = "delete", after_help = "Example:\n  nex deployments rm echo --issuer ~/.nex/issuer.nk")]
    Rm(SignedNameArgs),
    /// Apply an earlier revision's spec again, as a new revision
    #[command(
        after_help = "Examples:\n  nex deployments rollback echo            # to the revision before the current one\n  nex deployments rollback echo --to 3"
    )]
    Rollback(RollbackArgs),
}

/// `nex deployments ls`
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// A deployment name.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// Deployment name
    pub name: String,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// A deployment name and the issuer that signs the change.
#[derive(Debug, Args)]
pub struct SignedNameArgs {
    /// Deployment name
    pub name: String,
    /// Issuer account seed file (SA…): the deployment's owner; default ~/.nex/issuer.nk
    #[arg(long)]
    pub issuer: Option<PathBuf>,
}

/// `nex deployments rollback`
#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub target: SignedNameArgs,
    /// The revision whose spec to apply again (see `nex deployments history`); default: the
    /// valid revision before the current one
    #[arg(long)]
    pub to: Option<u64>,
}

fn issuer(path: &Option<PathBuf>) -> Result<nkeys::KeyPair> {
    match path {
        Some(p) => nkeys::KeyPair::from_seed(&super::read_seed(p)?)
            .with_context(|| format!("{} does not hold an account seed", p.display())),
        None => Ok(super::devrun::dev_keys()?.0),
    }
}

/// Reads a spec file: JSON, or YAML when it is named `.yaml`/`.yml` or does not start with `{`.
fn read_spec(path: &std::path::Path) -> Result<Spec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        || !text.trim_start().starts_with('{');
    let spec = if yaml { spec_from_yaml(&text) } else { Spec::parse(&text) };
    spec.with_context(|| format!("{} is not a valid deployment spec", path.display()))
}

/// A YAML spec, read as the JSON one would be. Environment values written as plain numbers or
/// booleans (`PORT: 8080`) are taken as the text they are written as.
fn spec_from_yaml(text: &str) -> Result<Spec, dep::SpecError> {
    let mut v: serde_json::Value = yaml_serde::from_str(text).map_err(|e| dep::SpecError::Parse(e.to_string()))?;
    if let Some(env) = v.get_mut("environment").and_then(|e| e.as_object_mut()) {
        for value in env.values_mut() {
            if value.is_number() || value.is_boolean() {
                *value = serde_json::Value::String(value.to_string());
            }
        }
    }
    Spec::parse(&v.to_string())
}

/// The deployments bucket; created (with history, and per-key TTLs for node heartbeats) when
/// `create` is set.
async fn bucket(g: &GlobalOpts, nc: &async_nats::Client, create: bool) -> Result<Option<kv::Store>> {
    let js = match g.jsdomain.as_deref() {
        Some(d) => async_nats::jetstream::with_domain(nc.clone(), d),
        None => async_nats::jetstream::new(nc.clone()),
    };
    match js.get_key_value(dep::BUCKET).await {
        Ok(kv) => Ok(Some(kv)),
        Err(e) if !create => {
            if matches!(e.kind(), async_nats::jetstream::context::KeyValueErrorKind::GetBucket) {
                Ok(None)
            } else {
                Err(anyhow::Error::new(e).context(format!("opening the {} bucket", dep::BUCKET)))
            }
        }
        Err(_) => {
            let kv = js
                .create_key_value(kv::Config {
                    bucket: dep::BUCKET.into(),
                    description: "nex deployments: signed specs, replica slots, node heartbeats".into(),
                    history: 64,
                    limit_markers: Some(std::time::Duration::from_secs(5)),
                    ..Default::default()
                })
                .await
                .with_context(|| {
                    format!(
                        "creating the {} bucket (the account needs JetStream, nats-server 2.11 or later)",
                        dep::BUCKET
                    )
                })?;
            Ok(Some(kv))
        }
    }
}

/// Reads a key's history and what it amounts to.
async fn read(kv: &kv::Store, key: &str) -> Result<Resolved> {
    nex_node::deployments::resolve(kv, key).await
}

/// Writes `record` on revision `latest` (create-only when 0); a lost race is a conflict that
/// says what to do.
async fn write(kv: &kv::Store, key: &str, latest: u64, record: &Record) -> Result<u64> {
    let value = bytes::Bytes::from(record.to_bytes());
    let res = if latest == 0 {
        kv.create(key, value).await.map_err(|e| match e.kind() {
            kv::CreateErrorKind::AlreadyExists => conflict(key, None),
            _ => anyhow::Error::new(e),
        })
    } else {
        kv.update(key, value, latest).await.map_err(|e| match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => conflict(key, Some(latest)),
            _ => anyhow::Error::new(e),
        })
    };
    res.with_context(|| format!("writing {key}"))
}

fn conflict(key: &str, read: Option<u64>) -> anyhow::Error {
    let was = read.map(|r| format!("revision {r}")).unwrap_or_else(|| "absent".into());
    anyhow::anyhow!(
        "conflict: {key} changed since it was read ({was}); another apply won: run `nex plan` to see the new state, then apply again"
    )
}

/// Refuses early, with what to do, what the nodes would ignore.
fn check_owner(res: &Resolved, issuer: &nkeys::KeyPair, what: &str) -> Result<()> {
    if let Some(owner) = &res.owner {
        if *owner != issuer.public_key() {
            bail!(
                "{what} belongs to issuer {owner}, and only it may change or remove it (you signed with {}): use that issuer's key with --issuer",
                issuer.public_key()
            );
        }
    }
    Ok(())
}

fn show(v: &Option<serde_json::Value>) -> String {
    v.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "(none)".into())
}

fn age(unix: i64) -> String {
    let secs = (chrono::Utc::now().timestamp() - unix).max(0) as u64;
    nex_api::uptime::format(std::time::Duration::from_secs(secs))
}

fn short(key: &str) -> String {
    if key.len() > 12 {
        format!("{}…", &key[..12])
    } else {
        key.to_string()
    }
}

/// The live nodes' heartbeats, by node id.
async fn live_nodes(kv: Option<&kv::Store>) -> Result<Vec<(String, dep::Beat)>> {
    let mut out = Vec::new();
    let Some(kv) = kv else { return Ok(out) };
    for key in keys_with_prefix(kv, "node.").await? {
        if let Ok(Some(v)) = kv.get(key.as_str()).await {
            if let Ok(b) = serde_json::from_slice::<dep::Beat>(&v) {
                out.push((key["node.".len()..].to_string(), b));
            }
        }
    }
    Ok(out)
}

/// Which live nodes could run the spec's replicas now: a line for the plan (a warning when none
/// can, a note when the spread must be relaxed) and the count.
fn placement_note(nodes: &[(String, dep::Beat)], spec: &Spec, issuer: &str) -> (String, usize) {
    let admitted = nodes.iter().filter(|(_, b)| !b.draining && b.admits(spec, issuer));
    let (able, full): (Vec<&(String, dep::Beat)>, Vec<_>) = admitted.partition(|(_, b)| !b.full);
    let full = match full.len() {
        0 => String::new(),
        n => format!(" ({n} more at max_workloads)"),
    };
    let domains: std::collections::BTreeSet<String> = able.iter().map(|(n, b)| b.domain(spec, n)).collect();
    let mut needs = vec![format!("workload type {}", spec.workload_type)];
    needs.extend(spec.placement.tags.iter().map(|(k, v)| format!("tag {k}={v}")));
    needs.extend(spec.placement.spread.iter().map(|t| format!("a {t} tag")));
    needs.extend(spec.resources.as_ref().and_then(|r| r.memory_mib).map(|m| format!("{m} MiB per workload")));
    needs.extend(spec.placement.sandboxed.filter(|s| *s).map(|_| "sandboxed".to_string()));
    needs.extend(spec.placement.os.iter().map(|o| format!("os {o}")));
    needs.extend(spec.placement.arch.iter().map(|a| format!("arch {a}")));
    needs.extend(spec.sealed_environment.as_ref().map(|_| "the fleet xkey".to_string()));
    let across = match &spec.placement.spread {
        Some(t) => format!("{} values of {t}", domains.len()),
        None => format!("{} nodes", domains.len()),
    };
    let line = if able.is_empty() {
        format!(
            "  warning: none of the {} live nodes can run it now{full} (it needs {}); its replicas wait until one can",
            nodes.len(),
            needs.join(", ")
        )
    } else if spec.spread_relaxed(domains.len()) {
        format!(
            "  placement: {} of {} live nodes can run it{full}; {} replicas over {across}: spread relaxed",
            able.len(),
            nodes.len(),
            spec.replicas
        )
    } else {
        format!("  placement: {} of {} live nodes can run it{full}, spread over {across}", able.len(), nodes.len())
    };
    (line, able.len())
}

/// Seals the spec's environment to the fleet xkey (`--fleet-xkey`, else the one the live nodes
/// advertise), keeping the box of `current` when the variables are the same; a line for the plan.
fn seal_environment(
    spec: &mut Spec,
    issuer: &nkeys::KeyPair,
    args: &PlanArgs,
    current: Option<&Spec>,
    nodes: &[(String, dep::Beat)],
) -> Result<Option<String>> {
    if spec.environment.is_empty() {
        return Ok(None);
    }
    if args.plain_environment {
        return Ok(Some(
            "  note: the environment is stored in the deployments bucket as given (--plain-environment); keep secrets out of it"
                .into(),
        ));
    }
    let fleet = match &args.fleet_xkey {
        Some(k) => k.clone(),
        None => {
            let keys: std::collections::BTreeSet<String> =
                nodes.iter().filter_map(|(_, b)| b.fleet_xkey.clone()).collect();
            match keys.len() {
                1 => keys.into_iter().next().unwrap_or_default(),
                0 => bail!(
                    "no live node advertises a fleet xkey to seal the environment to, and stored as given it is readable by anyone who can read the {} bucket: give the nodes one seed in fleet_xkey_seed_path (`nex node fleet-xkey --out FILE`), pass --fleet-xkey X…, or pass --plain-environment to store it as given",
                    dep::BUCKET
                ),
                _ => bail!(
                    "the live nodes advertise {} different fleet xkeys ({}): pass the one to seal to with --fleet-xkey",
                    keys.len(),
                    keys.into_iter().collect::<Vec<_>>().join(", ")
                ),
            }
        }
    };
    spec.seal_environment(issuer, &fleet, current.and_then(|c| c.sealed_environment.as_ref()))?;
    Ok(Some(format!("  environment: sealed to fleet xkey {fleet}")))
}

/// `nex plan` (and the first half of `nex apply`): what writing the spec would change (its
/// environment sealed first).
async fn plan_of(
    kv: Option<&kv::Store>,
    spec: &mut Spec,
    issuer: &nkeys::KeyPair,
    args: &PlanArgs,
) -> Result<(Resolved, serde_json::Value, Vec<String>)> {
    let key = spec.key();
    let res = match kv {
        Some(kv) => read(kv, &key).await?,
        None => dep::resolve(&key, &[]),
    };
    let what = format!("deployment {}/{}", spec.namespace, spec.name);
    check_owner(&res, issuer, &what)?;
    let nodes = live_nodes(kv).await?;
    let env_note = seal_environment(spec, issuer, args, res.current.as_ref().map(|c| &c.spec), &nodes)?;
    let spec = &*spec;
    let (placement, eligible_nodes) = placement_note(&nodes, spec, &issuer.public_key());
    let mut lines = Vec::new();
    let (action, changes) = match &res.current {
        None => {
            lines.push(format!(
                "+ create {what}: {} × {} from {}",
                spec.replicas, spec.workload_type, spec.artifact.url
            ));
            ("create", Vec::new())
        }
        Some(cur) if cur.spec == *spec => {
            lines.push(format!("= {what} is unchanged (revision {})", cur.revision));
            ("none", Vec::new())
        }
        Some(cur) => {
            let changes = dep::diff(&cur.spec, spec);
            lines.push(format!("~ update {what} (revision {} → a new revision):", cur.revision));
            for (path, old, new) in &changes {
                lines.push(format!("    {path}: {} → {}", show(old), show(new)));
            }
            if dep::needs_rollout(&cur.spec, spec) {
                lines.push(format!(
                    "  replaces the running replicas one at a time (max_surge {}, max_unavailable {})",
                    spec.rollout.max_surge, spec.rollout.max_unavailable
                ));
            } else if cur.spec.replicas != spec.replicas {
                lines.push(format!("  scales from {} to {} replicas", cur.spec.replicas, spec.replicas));
            }
            ("update", changes)
        }
    };
    lines.extend(env_note);
    lines.push(placement);
    let doc = json!({
        "eligible_nodes": eligible_nodes,
        "namespace": spec.namespace,
        "name": spec.name,
        "action": action,
        "revision": res.current.as_ref().map(|c| c.revision),
        "latest_revision": res.latest,
        "changes": changes.iter().map(|(p, o, n)| json!({"path": p, "old": o, "new": n})).collect::<Vec<_>>(),
        "digest": spec.digest(),
    });
    Ok((res, doc, lines))
}

/// `nex plan -f FILE`
pub async fn plan(g: &GlobalOpts, nc: &async_nats::Client, args: PlanArgs) -> Result<()> {
    let mut spec = read_spec(&args.file)?;
    let issuer = issuer(&args.issuer)?;
    let kv = bucket(g, nc, false).await?;
    let (_, doc, lines) = plan_of(kv.as_ref(), &mut spec, &issuer, &args).await?;
    if args.json {
        print_json(&doc);
    } else {
        println!("{}", lines.join("\n"));
    }
    Ok(())
}

/// `nex apply -f FILE`
pub async fn apply(g: &GlobalOpts, nc: &async_nats::Client, args: ApplyArgs) -> Result<()> {
    let mut spec = read_spec(&args.plan.file)?;
    let issuer = issuer(&args.plan.issuer)?;
    let kv = bucket(g, nc, true).await?.context("the deployments bucket")?;
    let (res, mut doc, lines) = plan_of(Some(&kv), &mut spec, &issuer, &args.plan).await?;
    if let Some(want) = args.expect_revision {
        if res.latest != want {
            return Err(
                conflict(&spec.key(), Some(want)).context(format!("the deployment is at revision {}", res.latest))
            );
        }
    }
    let unchanged = res.current.as_ref().is_some_and(|c| c.spec == spec);
    let revision = if unchanged {
        res.current.as_ref().map(|c| c.revision).unwrap_or(0)
    } else {
        let record = Record::apply(&spec, res.latest, &issuer)?;
        let revision = write(&kv, &spec.key(), res.latest, &record).await?;
        // Watchers see the new revision (the nodes read the bucket itself).
        let ev = nex_api::events::CloudEvent::new(
            issuer.public_key(),
            nex_api::events::event_type::DEPLOYMENT_APPLIED,
            json!({"deployment": spec.name, "revision": revision, "replicas": spec.replicas, "digest": spec.digest()}),
        );
        let subject = nex_api::subjects::control::events(&spec.namespace, &ev.event_type);
        if let Ok(body) = serde_json::to_vec(&ev) {
            let _ = nc.publish(subject, body.into()).await;
            let _ = nc.flush().await;
        }
        revision
    };
    doc["applied_revision"] = json!(revision);
    if args.plan.json {
        print_json(&doc);
    } else {
        println!("{}", lines.join("\n"));
        if unchanged {
            println!("Nothing to apply.");
        } else {
            println!("Applied {}/{} as revision {revision}.", spec.namespace, spec.name);
        }
    }
    Ok(())
}

/// `nex deployments …`
pub async fn deployments(g: &GlobalOpts, nc: &async_nats::Client, cmd: DeploymentsCommand) -> Result<()> {
    let ns = g.namespace.as_str();
    match cmd {
        DeploymentsCommand::Ls(a) => ls(g, nc, ns, a).await,
        DeploymentsCommand::Get(a) => get(g, nc, ns, a).await,
        DeploymentsCommand::History(a) => history(g, nc, ns, a).await,
        DeploymentsCommand::Rm(a) => rm(g, nc, ns, a).await,
        DeploymentsCommand::Rollback(a) => rollback(g, nc, ns, a).await,
    }
}

async fn keys_with_prefix(kv: &kv::Store, prefix: &str) -> Result<Vec<String>> {
    let mut keys: Vec<String> = match kv.keys().await {
        Ok(k) => {
            k.filter_map(|k| async move { k.ok() })
                .filter(|k| std::future::ready(k.starts_with(prefix)))
                .collect()
                .await
        }
        Err(e) => return Err(anyhow::Error::new(e).context("listing the deployments bucket")),
    };
    keys.sort();
    Ok(keys)
}

async fn ls(g: &GlobalOpts, nc: &async_nats::Client, ns: &str, a: LsArgs) -> Result<()> {
    let mut rows = Vec::new();
    if let Some(kv) = bucket(g, nc, false).await? {
        for key in keys_with_prefix(&kv, &format!("spec.{ns}.")).await? {
            let res = read(&kv, &key).await?;
            let Some(cur) = res.current else { continue };
            let ignored = res.entries.iter().filter(|(r, v)| *r > cur.revision && v.is_err()).count();
            rows.push(json!({
                "namespace": cur.spec.namespace,
                "name": cur.spec.name,
                "revision": cur.revision,
                "replicas": cur.spec.replicas,
                "workload_type": cur.spec.workload_type,
                "artifact": cur.spec.artifact.url,
                "owner": cur.owner,
                "applied_at": cur.issued_at,
                "ignored_revisions": ignored,
            }));
        }
    }
    if a.json {
        print_json(&rows);
        return Ok(());
    }
    if rows.is_empty() {
        println!("No deployments in namespace {ns}. Create one with: nex apply -f echo.json");
        return Ok(());
    }
    let mut t = Table::new(
        &format!("Deployments in {ns}"),
        &["NAME", "REVISION", "REPLICAS", "TYPE", "ARTIFACT", "OWNER", "APPLIED", "NOTE"],
    );
    for r in &rows {
        let ignored = r["ignored_revisions"].as_u64().unwrap_or(0);
        t.row(vec![
            r["name"].as_str().unwrap_or("").into(),
            r["revision"].to_string(),
            r["replicas"].to_string(),
            r["workload_type"].as_str().unwrap_or("").into(),
            r["artifact"].as_str().unwrap_or("").into(),
            short(r["owner"].as_str().unwrap_or("")),
            format!("{} ago", age(r["applied_at"].as_i64().unwrap_or(0))),
            if ignored > 0 { format!("{ignored} newer revision(s) ignored: see history") } else { String::new() },
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

async fn current(g: &GlobalOpts, nc: &async_nats::Client, ns: &str, name: &str) -> Result<(kv::Store, Resolved)> {
    let missing = || anyhow::anyhow!("no deployment {ns}/{name}: see `nex deployments ls` (and --namespace)");
    let kv = bucket(g, nc, false).await?.ok_or_else(missing)?;
    let res = read(&kv, &dep::spec_key(ns, name)).await?;
    if res.entries.is_empty() {
        return Err(missing());
    }
    Ok((kv, res))
}

/// One replica slot as `nex deployments get` shows it.
#[derive(serde::Serialize)]
struct ReplicaRow {
    slot: u32,
    node: Option<String>,
    handoff: Option<String>,
    workload_id: Option<String>,
    /// The spec revision its replica runs.
    revision: Option<u64>,
    state: &'static str,
    since: Option<i64>,
}

async fn get(g: &GlobalOpts, nc: &async_nats::Client, ns: &str, a: NameArgs) -> Result<()> {
    let (kv, res) = current(g, nc, ns, &a.name).await?;
    let cur = res.current.clone().with_context(|| format!("deployment {ns}/{} was removed", a.name))?;
    let digest = cur.spec.replica_digest();
    let mut slots = Vec::new();
    for i in 0..cur.spec.replicas {
        let key = dep::slot_key(ns, &a.name, i);
        let entry = kv.entry(key.clone()).await.with_context(|| format!("reading {key}"))?;
        let entry = entry.filter(|e| matches!(e.operation, kv::Operation::Put));
        let rec = entry.as_ref().and_then(|e| serde_json::from_slice::<dep::SlotRecord>(&e.value).ok());
        let state = match &rec {
            None => "unclaimed",
            Some(r) if r.handoff.is_some() => "moving",
            Some(r) if r.next.is_some() => "updating",
            Some(r) if r.workload_id.is_empty() => "starting",
            Some(r) if r.digest != digest => "old revision",
            Some(_) => "running",
        };
        slots.push(ReplicaRow {
            slot: i,
            node: rec.as_ref().map(|r| r.node.clone()),
            handoff: rec.as_ref().and_then(|r| r.handoff.clone()),
            workload_id: rec.as_ref().map(|r| r.workload_id.clone()).filter(|w| !w.is_empty()),
            revision: rec.as_ref().map(|r| r.revision).filter(|r| *r > 0),
            state,
            since: entry.as_ref().map(|e| e.created.unix_timestamp()),
        });
    }
    let ignored: Vec<_> = res
        .entries
        .iter()
        .filter(|(r, _)| *r > cur.revision)
        .filter_map(|(r, v)| v.as_ref().err().map(|e| json!({"revision": r, "reason": e.to_string()})))
        .collect();
    if a.json {
        print_json(&json!({
            "spec": cur.spec, "revision": cur.revision, "owner": cur.owner,
            "applied_at": cur.issued_at, "slots": slots, "ignored_revisions": ignored,
        }));
        return Ok(());
    }
    let s = &cur.spec;
    println!(
        "Deployment {ns}/{} — revision {}, applied {} ago by {}",
        s.name,
        cur.revision,
        age(cur.issued_at),
        cur.owner
    );
    println!("  {} × {} from {} (sha256 {})", s.replicas, s.workload_type, s.artifact.url, short(&s.artifact.sha256));
    if !s.triggers.is_empty() {
        println!("  triggers: {}", s.triggers.join(", "));
    }
    if let Some(spread) = &s.placement.spread {
        println!("  spread across: {spread}");
    }
    if let Some(m) = s.resources.as_ref().and_then(|r| r.memory_mib) {
        println!("  needs: {m} MiB of memory per replica");
    }
    for i in &ignored {
        println!("  ignored revision {}: {}", i["revision"], i["reason"].as_str().unwrap_or(""));
    }
    let mut t = Table::new("Replicas", &["SLOT", "NODE", "WORKLOAD", "REVISION", "STATE", "AGE"]);
    for sl in &slots {
        let state = match &sl.handoff {
            Some(h) => format!("{} to {}", sl.state, short(h)),
            None => sl.state.to_string(),
        };
        t.row(vec![
            sl.slot.to_string(),
            sl.node.clone().unwrap_or_else(|| "-".into()),
            sl.workload_id.clone().unwrap_or_else(|| "-".into()),
            sl.revision.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            state,
            sl.since.map(age).unwrap_or_default(),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

async fn history(g: &GlobalOpts, nc: &async_nats::Client, ns: &str, a: NameArgs) -> Result<()> {
    let (_, res) = current(g, nc, ns, &a.name).await?;
    let in_force = res.current.as_ref().map(|c| c.revision);
    let rows: Vec<_> = res
        .entries
        .iter()
        .map(|(rev, v)| match v {
            Ok(s) => json!({
                "revision": rev,
                "op": if s.spec.is_some() { dep::OP_APPLY } else { dep::OP_REMOVE },
                "issuer": s.issuer,
                "issued_at": s.issued_at,
                "replicas": s.spec.as_ref().map(|s| s.replicas),
                "digest": s.spec.as_ref().map(|s| s.digest()),
                "in_force": Some(*rev) == in_force,
            }),
            Err(e) => json!({"revision": rev, "op": "ignored", "reason": e.to_string(), "in_force": false}),
        })
        .collect();
    if a.json {
        print_json(&rows);
        return Ok(());
    }
    let mut t = Table::new(
        &format!("History of {ns}/{}", a.name),
        &["REVISION", "OP", "ISSUER", "SIGNED", "REPLICAS", "SPEC DIGEST", "NOTE"],
    );
    for r in &rows {
        let note = if r["in_force"] == json!(true) {
            "in force".to_string()
        } else {
            r["reason"].as_str().unwrap_or("").to_string()
        };
        t.row(vec![
            r["revision"].to_string(),
            r["op"].as_str().unwrap_or("").into(),
            short(r["issuer"].as_str().unwrap_or("")),
            r["issued_at"].as_i64().map(|t| format!("{} ago", age(t))).unwrap_or_default(),
            r["replicas"].as_u64().map(|n| n.to_string()).unwrap_or_default(),
            short(r["digest"].as_str().unwrap_or("")),
            note,
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

async fn rm(g: &GlobalOpts, nc: &async_nats::Client, ns: &str, a: SignedNameArgs) -> Result<()> {
    let issuer = issuer(&a.issuer)?;
    let (kv, res) = current(g, nc, ns, &a.name).await?;
    if res.current.is_none() {
        bail!("deployment {ns}/{} is already removed", a.name);
    }
    check_owner(&res, &issuer, &format!("deployment {ns}/{}", a.name))?;
    let record = Record::remove(ns, &a.name, res.latest, &issuer)?;
    let rev = write(&kv, &dep::spec_key(ns, &a.name), res.latest, &record).await?;
    println!("Removed {ns}/{} (revision {rev}): its replicas stop on every node.", a.name);
    Ok(())
}

async fn rollback(g: &GlobalOpts, nc: &async_nats::Client, ns: &str, a: RollbackArgs) -> Result<()> {
    let issuer = issuer(&a.target.issuer)?;
    let name = &a.target.name;
    let (kv, res) = current(g, nc, ns, name).await?;
    check_owner(&res, &issuer, &format!("deployment {ns}/{name}"))?;
    let in_force = res.current.as_ref().map(|c| c.revision);
    let applied: Vec<(u64, &Spec)> = res
        .entries
        .iter()
        .filter_map(|(r, v)| v.as_ref().ok().and_then(|s| s.spec.as_ref()).map(|s| (*r, s)))
        .collect();
    let (rev, spec) = match a.to {
        Some(to) => *applied.iter().find(|(r, _)| *r == to).with_context(|| {
            format!("revision {to} of {ns}/{name} is not a valid applied revision the bucket still holds: see `nex deployments history {name}`")
        })?,
        None => *applied
            .iter()
            .rev()
            .find(|(r, s)| Some(*r) != in_force && Some(*s) != res.current.as_ref().map(|c| &c.spec))
            .with_context(|| format!("{ns}/{name} has no earlier revision to roll back to"))?,
    };
    if res.current.as_ref().is_some_and(|c| c.spec == *spec) {
        println!("{ns}/{name} already runs the spec of revision {rev}.");
        return Ok(());
    }
    let record = Record::apply(spec, res.latest, &issuer)?;
    let new = write(&kv, &dep::spec_key(ns, name), res.latest, &record).await?;
    println!("Rolled {ns}/{name} back to the spec of revision {rev}, as revision {new}.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_specs_read_from_yaml_take_plain_environment_values_as_text() {
        let yaml = "name: web\nworkload_type: native\nartifact:\n  url: nats://B/web\n  sha256: \
                    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n\
                    environment:\n  PORT: 8080\n  DEBUG: true\n  RATIO: 0.5\n";
        let s = spec_from_yaml(yaml).unwrap();
        let env: Vec<(&str, &str)> = s.environment.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(env, [("DEBUG", "true"), ("PORT", "8080"), ("RATIO", "0.5")]);
        // Anything else that is not text stays an error, and YAML syntax errors say where.
        assert!(spec_from_yaml(&yaml.replace("PORT: 8080", "PORT: [1]")).is_err());
        let e = spec_from_yaml("name: [unclosed").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
