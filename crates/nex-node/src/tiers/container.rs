//! The `container` tier: each agent runs in its own OCI container, started by the distribution's
//! `runc` (or `crun`) from a bundle this module writes.
//!
//! Walls, per agent: new pid, mount, ipc, uts, cgroup, network and user namespaces (container
//! root is host uid [`UID_BASE`], holding only the capabilities to run its workload as another
//! user: `SETUID`, `SETGID`, `KILL`); the native workload runs as container uid
//! [`nex_api::agent::WORKLOAD_UID`] without any capability, so the agent and its secrets are out
//! of its reach; a read-only root holding only the agent, the libraries it links, a tmpfs `/tmp`
//! and its own work directory at `/work`; `no_new_privs`; a seccomp filter refusing what a
//! service never needs ([`DENIED_SYSCALLS`]); the memory, pids and CPU limits of
//! `machine_template`.
//!
//! Files: bundles and runtime state stay in the node's private run directory; what the
//! container itself must reach on the host (its empty root, a copy of the agent, its work
//! directory) lives under `sandbox_dir/<run>`, traverse-only (`0711`), because container root
//! is an unprivileged host uid that cannot enter the private state directory.
//!
//! Network: the run's bridge ([`super::net::BridgeNet`]) with one veth pair per agent in a named
//! network namespace. Everything is keyed by the run id, so a node restarted after SIGKILL removes
//! what the dead run left ([`cleanup_run`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use serde_json::json;
use tokio::process::Command;
use tokio::sync::watch;

use super::net::{run_cmd, BridgeNet};
use super::{AgentExit, AgentHandle, AgentSpec, IsolationTier};
use crate::cgroup::{Cgroup, CgroupVersion};

/// Host uid (and gid) that container root maps to; 65536 ids from here are the container's.
pub const UID_BASE: u32 = 1_000_000;
/// Where the agent's work directory appears inside the container.
pub const WORK: &str = "/work";
/// System calls a workload never needs; they fail with EPERM.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "adjtimex",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "fanotify_init",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "iopl",
    "ioperm",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "userfaultfd",
    "vhangup",
];
/// `clone` flags that would make new namespaces.
const CLONE_NS_FLAGS: &[u64] = &[
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

/// Agents in OCI containers.
#[derive(Debug)]
pub struct ContainerTier {
    runtime: PathBuf,
    agent_path: PathBuf,
    run_id: String,
    dir: PathBuf,
    sandbox: PathBuf,
    rootfs: PathBuf,
    binds: Vec<PathBuf>,
    net: Arc<BridgeNet>,
    cgroups: Option<CgroupVersion>,
}

/// Host uid (and gid) of the native workload inside a container.
fn workload_host_id() -> u32 {
    UID_BASE + nex_api::agent::WORKLOAD_UID
}

/// The capabilities container root keeps: enough to start its workload as another user and to
/// signal it, nothing that reaches beyond the container's own user namespace.
const AGENT_CAPS: &[&str] = &["CAP_SETUID", "CAP_SETGID", "CAP_KILL"];

/// The runtime to use: `configured` (a name or path), else `runc`, else `crun`.
pub fn find_runtime(configured: &str, bin_path: &[String]) -> Option<PathBuf> {
    if !configured.is_empty() {
        let p = Path::new(configured);
        if p.is_absolute() {
            return p.is_file().then(|| p.to_path_buf());
        }
        return crate::internal_nats::find_executable(configured, bin_path);
    }
    ["runc", "crun"].iter().find_map(|n| crate::internal_nats::find_executable(n, bin_path))
}

fn veth_prefix(run: &str) -> String {
    format!("nx{run}")
}

fn netns_prefix(run: &str) -> String {
    format!("nex-{run}-")
}

impl ContainerTier {
    /// Prepares the shared read-only root, the bridge and the firewall of this node run.
    pub async fn new(
        runtime: PathBuf,
        agent_path: PathBuf,
        run_id: String,
        run_dir: &Path,
        sandbox_dir: &Path,
        cgroups: Option<CgroupVersion>,
        net_opts: super::net::NetOptions,
    ) -> Result<ContainerTier> {
        let dir = run_dir.join("container");
        std::fs::create_dir_all(dir.join("bundles"))?;
        crate::files::traverse_only_dir(sandbox_dir)?;
        let sandbox = sandbox_dir.join(&run_id);
        crate::files::traverse_only_dir(&sandbox)?;
        crate::files::traverse_only_dir(&sandbox.join("agents"))?;
        // The agent is copied in, so its install location need not be reachable by container root.
        let agent_copy = sandbox.join("nex-agent");
        std::fs::copy(&agent_path, &agent_copy)
            .with_context(|| format!("copying {} to {}", agent_path.display(), agent_copy.display()))?;
        std::fs::set_permissions(&agent_copy, std::fs::Permissions::from_mode(0o755))?;
        let binds = agent_files(&agent_path).await?;
        let rootfs = sandbox.join("rootfs");
        build_rootfs(&rootfs, &binds, &net_opts.resolv_conf())?;
        let net = match BridgeNet::create(&run_id, &veth_prefix(&run_id), net_opts).await {
            Ok(n) => Arc::new(n),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&sandbox);
                return Err(e);
            }
        };
        Ok(ContainerTier { runtime, agent_path: agent_copy, run_id, dir, sandbox, rootfs, binds, net, cgroups })
    }

    fn runtime_cmd(&self) -> Command {
        let mut c = Command::new(&self.runtime);
        c.arg("--root").arg(self.dir.join("state"));
        c
    }

    /// The OCI runtime spec of agent `spec`'s container. Long because it is one document: every
    /// wall of the container is a field here, and reading them together is the point.
    fn config(&self, spec: &AgentSpec, netns: &str) -> serde_json::Value {
        let t = &spec.template;
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", format!("size={}m", t.memsize_mib.min(512))]}),
            json!({"destination": WORK, "type": "bind", "source": spec.work_dir, "options": ["rbind", "rw", "nosuid", "nodev"]}),
            json!({"destination": "/nex-agent", "type": "bind", "source": self.agent_path, "options": ["bind", "ro", "nosuid", "nodev"]}),
        ];
        for b in &self.binds {
            mounts.push(
                json!({"destination": b, "type": "bind", "source": b, "options": ["bind", "ro", "nosuid", "nodev"]}),
            );
        }
        let mut rules = vec![
            json!({"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}),
            // Make libc fall back to clone(2), whose flags the rules below can see.
            json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}),
        ];
        for f in CLONE_NS_FLAGS {
            rules.push(json!({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM,
                "args": [{"index": 0, "value": f, "valueTwo": f, "op": "SCMP_CMP_MASKED_EQ"}]}));
        }
        let ids = json!([{"containerID": 0, "hostID": UID_BASE, "size": 65536}]);
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": ["/nex-agent"],
                "env": [
                    "PATH=/usr/local/bin:/usr/bin:/bin",
                    format!("{}=true", nex_api::agent::env::SANDBOX),
                    format!("{}={}", nex_api::agent::env::WORKLOAD_ID, spec.id),
                    format!("{}={}", nex_api::agent::env::NODE_NATS_HOST, spec.nats_host),
                    format!("{}={}", nex_api::agent::env::NODE_NATS_PORT, spec.nats_port),
                    format!("NEX_NODE_NATS_NKEY_SEED_FILE={WORK}/.agent-seed"),
                    format!("NEX_AGENT_WORKDIR={WORK}"),
                    format!("NEX_STOP_GRACE_MS={}", spec.stop_grace_ms),
                    format!("{}={}", nex_api::agent::env::WORKLOAD_UID, nex_api::agent::WORKLOAD_UID),
                    format!("{}={WORK}/data", nex_api::agent::env::WORKLOAD_DIR),
                    format!("NEX_AGENT_LOG={}", std::env::var("NEX_AGENT_LOG").unwrap_or_default()),
                    "TMPDIR=/tmp",
                ],
                "cwd": WORK,
                "capabilities": {"bounding": AGENT_CAPS, "effective": AGENT_CAPS, "inheritable": [], "permitted": AGENT_CAPS, "ambient": []},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096u64, "soft": 4096u64}],
                "noNewPrivileges": true,
            },
            "root": {"path": self.rootfs, "readonly": true},
            "hostname": format!("nex-{}", &spec.id[..spec.id.len().min(12)]),
            "mounts": mounts,
            "linux": {
                "uidMappings": ids,
                "gidMappings": ids,
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": format!("/run/netns/{netns}")},
                    {"type": "ipc"},
                    {"type": "uts"},
                    {"type": "mount"},
                    {"type": "user"},
                    {"type": "cgroup"},
                ],
                "cgroupsPath": format!("/nex/{}/{}", self.run_id, spec.id),
                "resources": {
                    "devices": [{"allow": false, "access": "rwm"}],
                    "memory": {"limit": t.memsize_mib * 1024 * 1024},
                    "pids": {"limit": t.pids_max},
                    "cpu": {"quota": t.vcpu_count as u64 * 100_000, "period": 100_000u64},
                },
                "seccomp": {
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                    "syscalls": rules,
                },
                "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                    "/proc/sched_debug", "/proc/scsi"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            }
        })
    }

    async fn launch_inner(&self, spec: &AgentSpec, slot: usize, netns: &str, cid: &str) -> Result<ContainerAgent> {
        let chown = |p: &Path| std::os::unix::fs::chown(p, Some(UID_BASE), Some(UID_BASE));
        std::fs::create_dir_all(&spec.work_dir)
            .with_context(|| format!("creating agent directory {}", spec.work_dir.display()))?;
        chown(&spec.work_dir)?;
        std::fs::set_permissions(&spec.work_dir, std::fs::Permissions::from_mode(0o711))?;
        // The workload's own directory (its working directory), out of the agent's way.
        let data = spec.work_dir.join("data");
        std::fs::create_dir(&data)?;
        std::os::unix::fs::chown(&data, Some(workload_host_id()), Some(workload_host_id()))?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
        let seed = spec.work_dir.join(".agent-seed");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&seed)?;
            std::io::Write::write_all(&mut f, spec.nkey_seed.expose().as_bytes())?;
        }
        chown(&seed)?;

        run_cmd("ip", &["netns", "add", netns], None).await?;
        if self.net.cni().is_some() {
            // The CNI plugins make the link, address and routes inside the namespace.
            self.net.cni_attach(&spec.id, &format!("/run/netns/{netns}")).await?;
            run_cmd("ip", &["-n", netns, "link", "set", "lo", "up"], None).await?;
        } else {
            self.bridge_link(spec, slot, netns).await?;
        }
        self.launch_rest(spec, netns, cid).await
    }

    /// A veth pair from the run's bridge into `netns`, with the slot's address.
    async fn bridge_link(&self, spec: &AgentSpec, slot: usize, netns: &str) -> Result<()> {
        let veth = format!("{}{slot:02x}", veth_prefix(&self.run_id));
        let host_side = format!(
            "link add {veth} type veth peer name eth0 netns {netns}\nlink set {veth} master {br}\nlink set {veth} type bridge_slave isolated on\nlink set {veth} up\n",
            br = self.net.bridge()
        );
        run_cmd("ip", &["-b", "-"], Some(&host_side)).await?;
        self.net.attach_port(&spec.id, &veth).await?;
        let mut inside = format!("link set lo up\naddr add {}/24 dev eth0\nlink set eth0 up\n", self.net.ip(slot));
        if let Some(gw) = self.net.gateway() {
            inside.push_str(&format!("route add default via {gw} dev eth0\n"));
        }
        run_cmd("ip", &["-n", netns, "-b", "-"], Some(&inside)).await
    }

    async fn launch_rest(&self, spec: &AgentSpec, netns: &str, cid: &str) -> Result<ContainerAgent> {
        let bundle = self.dir.join("bundles").join(&spec.id);
        std::fs::create_dir_all(&bundle)?;
        std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&self.config(spec, netns))?)?;

        let mut cmd = self.runtime_cmd();
        cmd.arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(cid)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        nex_io::tie_to_parent(&mut cmd, libc::SIGKILL);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", self.runtime.display()))?;
        let runtime_pid = child.id().unwrap_or(0);
        let failure = Arc::new(Mutex::new(None));
        let forward = |name: &'static str| {
            let id = spec.id.clone();
            let failure = failure.clone();
            move |l: &str| {
                if l.contains("level=error") {
                    tracing::warn!(workload_id = %id, "container runtime: {l}");
                    *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(runtime_error_text(l));
                } else {
                    tracing::debug!(workload_id = %id, from_agent = true, stream = name, "{l}");
                }
            }
        };
        if let Some(s) = child.stdout.take() {
            nex_io::forward_lines(s, forward("stdout"));
        }
        if let Some(s) = child.stderr.take() {
            nex_io::forward_lines(s, forward("stderr"));
        }
        let rx = super::watch_exit(child);
        Ok(ContainerAgent {
            tier: self.handle_info(),
            id: spec.id.clone(),
            cid: cid.to_string(),
            netns: netns.to_string(),
            runtime_pid,
            exited: rx,
            failure,
            work_dir: spec.work_dir.clone(),
            bundle,
            net: self.net.clone(),
        })
    }

    fn handle_info(&self) -> TierInfo {
        TierInfo {
            runtime: self.runtime.clone(),
            state: self.dir.join("state"),
            run_id: self.run_id.clone(),
            cgroups: self.cgroups,
        }
    }
}

/// What a container handle needs of its tier to clean up.
#[derive(Debug, Clone)]
struct TierInfo {
    runtime: PathBuf,
    state: PathBuf,
    run_id: String,
    cgroups: Option<CgroupVersion>,
}

impl IsolationTier for ContainerTier {
    fn name(&self) -> &'static str {
        crate::config::isolation::CONTAINER
    }

    fn bridge(&self) -> Option<&BridgeNet> {
        Some(&self.net)
    }

    fn shares_host_filesystem(&self) -> bool {
        true
    }

    fn agent_work_dir(&self, _host: &Path) -> PathBuf {
        PathBuf::from(WORK)
    }

    fn host_work_dir(&self, _run: &crate::state::RunState, id: &str) -> PathBuf {
        self.sandbox.join("agents").join(id)
    }

    fn own_artifact(&self, path: &Path) -> Result<()> {
        // The agent (container root) reads it, the workload (its group) runs it, nobody else.
        std::os::unix::fs::chown(path, Some(UID_BASE), Some(workload_host_id()))
            .with_context(|| format!("chown {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o550)).map_err(Into::into)
    }

    fn launch(&self, spec: AgentSpec) -> BoxFuture<'_, Result<Box<dyn AgentHandle>>> {
        Box::pin(async move {
            let slot = self.net.alloc_slot(&spec.id)?;
            let netns = format!("{}{}", netns_prefix(&self.run_id), spec.id);
            let cid = format!("nex-{}-{}", self.run_id, spec.id);
            match self.launch_inner(&spec, slot, &netns, &cid).await {
                Ok(a) => Ok(Box::new(a) as Box<dyn AgentHandle>),
                Err(e) => {
                    let info = self.handle_info();
                    teardown(&info, &cid, &netns, &spec.id, &self.dir.join("bundles").join(&spec.id), &spec.work_dir)
                        .await;
                    self.net.release(&spec.id).await;
                    Err(e)
                }
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.net.remove().await;
            let _ = tokio::fs::remove_dir_all(&self.sandbox).await;
        })
    }
}

/// A running container agent.
#[derive(Debug)]
struct ContainerAgent {
    tier: TierInfo,
    id: String,
    cid: String,
    netns: String,
    runtime_pid: u32,
    failure: Arc<Mutex<Option<String>>>,
    exited: watch::Receiver<Option<AgentExit>>,
    work_dir: PathBuf,
    bundle: PathBuf,
    net: Arc<BridgeNet>,
}

impl ContainerAgent {
    fn cgroup(&self) -> Option<Cgroup> {
        self.tier.cgroups.map(|v| Cgroup::at(v, &self.tier.run_id, &self.id))
    }

    /// Host pid of the container's init (the agent): the process of its cgroup that is pid 1 in
    /// its own pid namespace.
    fn init_pid(&self) -> Option<u32> {
        self.cgroup()?.pids().into_iter().find_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let ns = s.lines().find(|l| l.starts_with("NSpid:"))?;
            (ns.split_whitespace().last() == Some("1") && ns.split_whitespace().count() > 2).then_some(p as u32)
        })
    }
}

impl AgentHandle for ContainerAgent {
    fn exited(&self) -> watch::Receiver<Option<AgentExit>> {
        self.exited.clone()
    }

    fn destroy(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.exited.borrow().is_none() {
                let _ = Command::new(&self.tier.runtime)
                    .arg("--root")
                    .arg(&self.tier.state)
                    .args(["kill", &self.cid, "KILL"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await;
            }
            let mut rx = self.exited.clone();
            if tokio::time::timeout(Duration::from_secs(5), super::wait_exit(&mut rx)).await.is_err()
                && self.runtime_pid > 0
            {
                // SAFETY: signalling the process group of the runtime we started.
                unsafe { libc::kill(-(self.runtime_pid as i32), libc::SIGKILL) };
            }
            teardown(&self.tier, &self.cid, &self.netns, &self.id, &self.bundle, &self.work_dir).await;
            self.net.release(&self.id).await;
        })
    }

    fn oom_killed(&self) -> bool {
        self.cgroup().map(|c| c.oom_killed()).unwrap_or(false)
    }

    fn agent_rss_bytes(&self) -> Option<u64> {
        super::process::rss_of(self.init_pid()?)
    }

    fn pid(&self) -> Option<u32> {
        self.init_pid()
    }

    fn start_failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The message of a runtime's `level=error msg="…"` log line.
fn runtime_error_text(line: &str) -> String {
    let msg = line.split_once("msg=").map(|(_, m)| m).unwrap_or(line);
    format!("the container runtime failed: {}", msg.trim().trim_matches('"').replace("\\\"", "\""))
}

/// Removes a container and everything made for it; safe to call on half-made ones.
async fn teardown(tier: &TierInfo, cid: &str, netns: &str, id: &str, bundle: &Path, work_dir: &Path) {
    let _ = Command::new(&tier.runtime)
        .arg("--root")
        .arg(&tier.state)
        .args(["delete", "--force", cid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Some(v) = tier.cgroups {
        Cgroup::at(v, &tier.run_id, id).destroy().await;
        crate::cgroup::remove_everywhere(&tier.run_id, Some(id));
    }
    // The veth pair goes with its host side (`BridgeNet::release`); deleting the namespace alone
    // would leave it while sockets still hold the namespace.
    let _ = run_cmd("ip", &["netns", "delete", netns], None).await;
    let _ = tokio::fs::remove_dir_all(bundle).await;
    let _ = tokio::fs::remove_dir_all(work_dir).await;
}

/// The agent binary's shared libraries (from `ldd`), to bind into the container read-only.
async fn agent_files(agent: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(agent).output().await.context("running ldd on the agent")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for line in text.lines() {
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    Ok(files)
}

/// An empty root with the mount points of [`ContainerTier::config`]; shared read-only.
fn build_rootfs(root: &Path, binds: &[PathBuf], resolv_conf: &str) -> Result<()> {
    for d in ["proc", "dev", "tmp", "work", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    // The root is read-only and shared by the run's containers, which resolve names alike.
    std::fs::write(root.join("etc/resolv.conf"), resolv_conf)?;
    std::fs::write(root.join("nex-agent"), b"")?;
    for b in binds {
        let rel = b.strip_prefix("/").unwrap_or(b);
        if let Some(parent) = rel.parent() {
            std::fs::create_dir_all(root.join(parent))?;
        }
        std::fs::write(root.join(rel), b"")?;
    }
    Ok(())
}

/// Removes what a dead node run of this tier left: containers, namespaces, bridge, firewall,
/// cgroups, its sandbox directory. Called before the run directory is deleted, with the runtime
/// this node's config names (never a path read from the dead run's state).
pub async fn cleanup_run(run_dir: &Path, run: &str, runtime: Option<&Path>, sandbox_dir: &Path) {
    let dir = run_dir.join("container");
    if !dir.is_dir() {
        return;
    }
    let _ = tokio::fs::remove_dir_all(sandbox_dir.join(run)).await;
    let state = dir.join("state");
    if let Some(runtime) = runtime {
        if let Ok(out) = Command::new(runtime).arg("--root").arg(&state).args(["list", "-q"]).output().await {
            for cid in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()) {
                let _ = Command::new(runtime)
                    .arg("--root")
                    .arg(&state)
                    .args(["delete", "--force", cid.trim()])
                    .output()
                    .await;
            }
        }
    }
    super::net::delete_netns_with_prefix(&netns_prefix(run)).await;
    // A namespace some process still holds outlives its name, and its veth with it: delete the
    // host sides too.
    for veth in super::net::links_with_prefix(&veth_prefix(run)).await {
        if veth != format!("nxb{run}") {
            let _ = run_cmd("ip", &["link", "delete", &veth], None).await;
        }
    }
    super::net::remove(run).await;
}
