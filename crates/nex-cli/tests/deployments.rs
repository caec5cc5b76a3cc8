//! Deployments' desired state as a user drives it: `nex plan`, `nex apply`, `nex deployments …`
//! against a real JetStream, with another issuer, forged and replayed revisions written past the
//! CLI, and two applies racing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use nex_api::deployment::{Record, Spec, BUCKET};
use serde_json::{json, Value};

const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

struct Cli {
    url: String,
    home: tempfile::TempDir,
}

impl Cli {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(nex_bin());
        c.args(args)
            .env("NATS_URL", &self.url)
            .env("HOME", self.home.path())
            .env("NO_COLOR", "1")
            .env_remove("NEX_NAMESPACE");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "nex {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and expects failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "nex {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }

    fn write_spec(&self, name: &str, spec: &Value) -> String {
        let p = self.path(name);
        std::fs::write(&p, spec.to_string()).unwrap();
        p.to_str().unwrap().to_string()
    }
}

fn account_seed(dir: &Path, name: &str) -> (nkeys::KeyPair, String) {
    let kp = nkeys::KeyPair::new_account();
    let p = dir.join(name);
    std::fs::write(&p, kp.seed().unwrap()).unwrap();
    (kp, p.to_str().unwrap().to_string())
}

fn echo(replicas: u32) -> Value {
    json!({
        "name": "echo",
        "workload_type": "native",
        "artifact": {"url": "nats://NEXCLIFILES/echoservice", "sha256": DIGEST},
        "replicas": replicas,
        "placement": {"spread": "zone"},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_specs_are_signed_owned_and_written_by_compare_and_swap() {
    let nats = NatsServer::start();
    let cli = Cli { url: nats.url(), home: tempfile::tempdir().unwrap() };
    let (a, a_seed) = account_seed(cli.home.path(), "a.nk");
    let (b, b_seed) = account_seed(cli.home.path(), "b.nk");
    let v1 = cli.write_spec("v1.json", &echo(3));

    // Nothing yet: ls says how to start, plan shows a create and writes nothing.
    assert!(cli.ok(&["deployments", "ls"]).contains("No deployments in namespace default"));
    let plan = cli.ok(&["plan", "-f", &v1, "--issuer", &a_seed]);
    assert!(
        plan.contains("+ create deployment default/echo: 3 × native from nats://NEXCLIFILES/echoservice"),
        "{plan}"
    );
    // No node heartbeats here: the plan says its replicas would wait.
    assert!(plan.contains("warning: none of the 0 live nodes can run it now (it needs workload type native"), "{plan}");
    assert!(cli.fails(&["deployments", "get", "echo"]).contains("no deployment default/echo"));

    // A bad spec is refused with what to change.
    let bad = cli.write_spec(
        "bad.json",
        &json!({"name": "echo", "workload_type": "native", "replicas": 0,
        "artifact": {"url": "nats://NEXCLIFILES/echoservice", "sha256": DIGEST}}),
    );
    assert!(cli
        .fails(&["apply", "-f", &bad, "--issuer", &a_seed])
        .contains("replicas must be between 1 and 256, not 0"));

    // Create, then the same spec again is no change.
    assert!(cli.ok(&["apply", "-f", &v1, "--issuer", &a_seed]).contains("Applied default/echo as revision 1."));
    let again = cli.ok(&["apply", "-f", &v1, "--issuer", &a_seed]);
    assert!(
        again.contains("= deployment default/echo is unchanged (revision 1)") && again.contains("Nothing to apply.")
    );
    // The same spec in YAML is the same deployment; a misspelt field in it is named.
    let yaml = format!(
        "# echo, as YAML\nname: echo\nworkload_type: native\nartifact:\n  url: nats://NEXCLIFILES/echoservice\n  sha256: {DIGEST}\nreplicas: 3\nplacement:\n  spread: zone\n"
    );
    std::fs::write(cli.path("v1.yaml"), &yaml).unwrap();
    let v1_yaml = cli.path("v1.yaml").to_str().unwrap().to_string();
    assert!(cli.ok(&["apply", "-f", &v1_yaml, "--issuer", &a_seed]).contains("is unchanged (revision 1)"));
    std::fs::write(cli.path("typo.yml"), yaml.replace("replicas:", "replica:")).unwrap();
    let e = cli.fails(&["plan", "-f", cli.path("typo.yml").to_str().unwrap(), "--issuer", &a_seed]);
    assert!(e.contains("typo.yml is not a valid deployment spec") && e.contains("unknown field `replica`"), "{e}");

    // An update: plan names the change, apply on the planned revision wins.
    let v2 = cli.write_spec("v2.json", &echo(5));
    let plan = cli.json(&["plan", "-f", &v2, "--issuer", &a_seed, "--json"]);
    assert_eq!(plan["action"], "update");
    assert_eq!(plan["changes"], json!([{"path": "replicas", "old": 3, "new": 5}]));
    assert!(cli.ok(&["plan", "-f", &v2, "--issuer", &a_seed]).contains("scales from 3 to 5 replicas"));
    assert!(cli.ok(&["apply", "-f", &v2, "--issuer", &a_seed, "--expect-revision", "1"]).contains("as revision 2."));
    // An apply planned against revision 1 now loses.
    let e = cli.fails(&["apply", "-f", &v1, "--issuer", &a_seed, "--expect-revision", "1"]);
    assert!(e.contains("conflict: spec.default.echo changed since it was read") && e.contains("run `nex plan`"), "{e}");

    // Two applies of different specs race on the same revision: exactly one wins.
    let mut with_env = echo(5);
    with_env["environment"] = json!({"MODE": "fast"});
    let v3 = cli.write_spec("v3.json", &with_env);
    let v4 = cli.write_spec("v4.json", &echo(4));
    // No node here advertises a fleet key: an environment is not stored in the clear unasked.
    let e = cli.fails(&["apply", "-f", &v3, "--issuer", &a_seed]);
    assert!(e.contains("no live node advertises a fleet xkey") && e.contains("--plain-environment"), "{e}");
    let fleet = nkeys::XKey::new().public_key();
    let racers: Vec<_> = [&v3, &v4]
        .iter()
        .map(|f| {
            cli.cmd(&["apply", "-f", f, "--issuer", &a_seed, "--expect-revision", "2", "--fleet-xkey", &fleet])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = racers.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let won: Vec<_> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(won.len(), 1, "exactly one of two racing applies wins");
    let lost = outs.iter().find(|o| !o.status.success()).unwrap();
    assert!(String::from_utf8_lossy(&lost.stderr).contains("conflict:"));
    assert!(String::from_utf8_lossy(&won[0].stdout).contains("as revision 3."));

    // Another issuer can neither change nor remove it.
    let e = cli.fails(&["apply", "-f", &v1, "--issuer", &b_seed]);
    assert!(e.contains(&format!("deployment default/echo belongs to issuer {}", a.public_key())), "{e}");
    assert!(cli.fails(&["deployments", "rm", "echo", "--issuer", &b_seed]).contains("only it may change or remove it"));

    // Writes past the CLI, straight into the bucket: another issuer's revision on the right
    // revision, the first revision put back (a replay) and a spec changed under a valid token.
    // Each is ignored, with the reason, and the deployment stays what its owner applied.
    let nc = nats.connect().await;
    let kv = async_nats::jetstream::new(nc.clone()).get_key_value(BUCKET).await.unwrap();
    let key = "spec.default.echo";
    let in_force = cli.json(&["deployments", "get", "echo", "--json"]);
    let first = kv.entry_for_revision(key, 1).await.unwrap().unwrap().value;
    let spec1 = Spec::parse(&echo(1).to_string()).unwrap();
    let forged = Record::apply(&spec1, 3, &b).unwrap();
    assert_eq!(kv.put(key, forged.to_bytes().into()).await.unwrap(), 4);
    assert_eq!(kv.put(key, first).await.unwrap(), 5);
    let mut tampered = Record::apply(&spec1, 5, &a).unwrap();
    tampered.spec.as_mut().unwrap().replicas = 9;
    assert_eq!(kv.put(key, tampered.to_bytes().into()).await.unwrap(), 6);

    let now = cli.json(&["deployments", "get", "echo", "--json"]);
    assert_eq!(now["spec"], in_force["spec"]);
    assert_eq!(now["revision"], 3);
    let reasons: Vec<&str> =
        now["ignored_revisions"].as_array().unwrap().iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains(&format!(
        "signed by {}, but the deployment belongs to {}",
        b.public_key(),
        a.public_key()
    )));
    assert!(reasons[1].contains("a replay: its token replaces revision 0, but it follows revision 4"));
    assert!(reasons[2].contains("does not match the digest its token pins"));
    let ls = cli.ok(&["deployments", "ls"]);
    assert!(ls.contains("3 newer revision(s) ignored"), "{ls}");
    let get = cli.ok(&["deployments", "get", "echo"]);
    assert!(get.contains("ignored revision 5: a replay"), "{get}");
    // Nobody claimed a slot yet.
    assert_eq!(get.matches("unclaimed").count(), in_force["spec"]["replicas"].as_u64().unwrap() as usize, "{get}");

    // The owner still writes, on the newest revision whatever it holds.
    assert!(cli.ok(&["apply", "-f", &v1, "--issuer", &a_seed]).contains("as revision 7."));

    // History: every revision, the ignored ones with their reason; rollback re-applies one.
    let history = cli.json(&["deployments", "history", "echo", "--json"]);
    let ops: Vec<&str> = history.as_array().unwrap().iter().map(|h| h["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["apply", "apply", "apply", "ignored", "ignored", "ignored", "apply"]);
    assert_eq!(history[6]["in_force"], true);
    let table = cli.ok(&["deployments", "history", "echo"]);
    assert!(table.contains("in force") && table.contains("REVISION"), "{table}");
    assert!(cli
        .ok(&["deployments", "rollback", "echo", "--to", "2", "--issuer", &a_seed])
        .contains("Rolled default/echo back to the spec of revision 2, as revision 8."));
    assert_eq!(cli.json(&["deployments", "get", "echo", "--json"])["spec"]["replicas"], 5);
    assert!(cli
        .fails(&["deployments", "rollback", "echo", "--to", "4", "--issuer", &a_seed])
        .contains("revision 4 of default/echo is not a valid applied revision"));

    // Other namespaces do not see it.
    let other = cli.ok(&["deployments", "ls", "--namespace", "other"]);
    assert!(other.contains("No deployments in namespace other"));

    // Removal by the owner: gone from ls, and the name is free for another issuer.
    assert!(cli.ok(&["deployments", "rm", "echo", "--issuer", &a_seed]).contains("its replicas stop on every node"));
    assert_eq!(cli.json(&["deployments", "ls", "--json"]), json!([]));
    assert!(cli.fails(&["deployments", "get", "echo"]).contains("was removed"));
    assert!(cli.ok(&["apply", "-f", &v1, "--issuer", &b_seed]).contains("Applied default/echo"));
    let ls = cli.json(&["deployments", "ls", "--json"]);
    assert_eq!(ls[0]["owner"], b.public_key());
}
