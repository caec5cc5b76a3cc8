//! Keeps `nex bench` working (tiny counts); performance itself is never asserted here.

mod common;

use std::process::Command;

#[test]
fn bench_runs_and_writes_every_key() {
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let wasm = repo.join("target/wasm32-wasip1/release/echofunction.wasm");
    assert!(wasm.exists(), "{} is missing: run `make build`", wasm.display());
    let dir = tempfile::tempdir().unwrap();
    let out_json = dir.path().join("bench.json");
    let out = Command::new(common::nex_bin())
        .args(["bench", "--clients", "2", "--requests", "20", "--throughput-requests", "40", "--deploys", "2"])
        .args(["--functions", "2", "--artifact-mib", "1", "--reschedule-rounds", "1", "--deployment-ttl-ms", "3000"])
        .arg("--wasm")
        .arg(&wasm)
        .arg("--json")
        .arg(&out_json)
        .env("NEX_NATS_SERVER", common::nats_server_bin())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("wasm RTT p50") && stdout.contains("telemetry off / on"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_json).unwrap()).unwrap();
    for k in [
        "baseline_rtt_p50_us",
        "baseline_rtt_p99_us",
        "baseline_rps",
        "wasm_rtt_p50_us",
        "wasm_rtt_p99_us",
        "wasm_rps",
        "js_rtt_p50_us",
        "js_rtt_p99_us",
        "js_rps",
        "native_deploy_p50_ms",
        "native_deploy_p99_ms",
        "agent_idle_rss_mib",
        "node_rss_100_functions_mib",
        "artifact_50mib_deploy_ms",
        "js_rtt_p50_us_telemetry_off",
        "js_rtt_p50_us_telemetry_on",
        "telemetry_rtt_cost_ratio",
        "reschedule_p50_s",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} missing or zero in {v}");
    }
    // The sandboxed tiers are measured where they can run (root, runc, QEMU + the built image).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        if nex_node::tiers::container::find_runtime("", &[]).is_some() {
            assert!(v["container_deploy_p50_ms"].as_f64().is_some_and(|x| x > 0.0), "{v}");
        }
        if nex_node::tiers::microvm::find_qemu(&[]).is_some() && repo.join("target/microvm/rootfs.cpio").is_file() {
            assert!(v["microvm_deploy_p50_ms"].as_f64().is_some_and(|x| x > 0.0), "{v}");
            assert!(stdout.contains("micro-VM deploy p50"), "{stdout}");
        }
    }
}
