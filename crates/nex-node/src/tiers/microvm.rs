//! The `microvm` tier: each agent is the init of its own guest, booted by QEMU's `microvm`
//! machine (KVM where it works, software emulation otherwise) from the kernel and initramfs
//! that `nex rootfs` builds.
//!
//! Walls, per agent: a separate kernel; the guest's memory and vCPUs of `machine_template`; one
//! virtio-net card on a tap device of the run's bridge ([`BridgeNet`]: isolated ports, no
//! default route, a firewall that lets guests reach only the internal NATS and the node's relays).
//!
//! Metadata never appears on a command line (QEMU's argv is readable by every host user): the
//! agent prints [`METADATA_PROMPT`] on the serial console once its network is up, and the node
//! answers with one JSON line ([`GuestMetadata`]) on the same console.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use super::net::{run_cmd, BridgeNet};
use super::{AgentExit, AgentHandle, AgentSpec, IsolationTier};
use nex_api::agent::GuestMetadata;

pub use nex_api::agent::METADATA_PROMPT;

/// How guests are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation: slow, for development and hosts without working KVM.
    Tcg,
}

impl Accel {
    fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The QEMU binary: `qemu-system-x86_64` in `bin_path` or on PATH.
pub fn find_qemu(bin_path: &[String]) -> Option<PathBuf> {
    crate::internal_nats::find_executable("qemu-system-x86_64", bin_path)
}

/// The guest kernel and image of `cfg`. The names that `default_resource_dir` implies
/// (`vmlinux`, `rootfs.ext4`, Firecracker's) fall back to what `nex rootfs` writes beside them
/// (`vmlinuz`, `rootfs.cpio`).
pub fn image_paths(cfg: &crate::NodeConfig) -> (PathBuf, PathBuf) {
    let pick = |configured: &str, alt: &str| {
        let p = PathBuf::from(configured);
        if p.is_file() {
            return p;
        }
        match p.parent().map(|d| d.join(alt)) {
            Some(a) if a.is_file() => a,
            _ => p,
        }
    };
    (pick(&cfg.kernel_filepath, "vmlinuz"), pick(&cfg.rootfs_filepath, "rootfs.cpio"))
}

/// True when `/dev/kvm` can be opened for reading and writing.
pub fn kvm_openable() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// Kernel parameters of every guest: a quiet serial console, no probing of hardware a microvm
/// does not have, and power-off instead of a reboot loop when init dies.
fn kernel_cmdline(accel: Accel, extra: &str) -> String {
    let mut s = String::from(
        "console=ttyS0 quiet panic=-1 reboot=t pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd \
         cryptomgr.notests 8250.nr_uarts=1 random.trust_cpu=on",
    );
    if accel == Accel::Tcg {
        // Without it the emulated TSC calibration sometimes never ends.
        s.push_str(" tsc_early_khz=2300000");
    }
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

/// Agents in QEMU micro-VMs.
#[derive(Debug)]
pub struct MicrovmTier {
    qemu: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    /// An ext4 root file system: attached read-only with a per-VM copy-on-write overlay.
    root_disk: Option<PathBuf>,
    accel: Accel,
    run_id: String,
    net: Arc<BridgeNet>,
}

/// What a `rootfs_filepath` holds, told by its content rather than its name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ImageKind {
    /// A `newc` cpio archive: the initramfs `nex rootfs` writes.
    Cpio,
    /// An ext4 file system (`nex rootfs -o rootfs.ext4`, Nex's guide).
    Ext4,
}

/// The kind of the guest image at `path`, or why it cannot boot.
pub fn image_kind(path: &Path) -> Result<ImageKind> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = [0u8; 6];
    f.read_exact(&mut head).with_context(|| format!("reading {}", path.display()))?;
    if &head == b"070701" {
        return Ok(ImageKind::Cpio);
    }
    if head[..2] == [0x1f, 0x8b] {
        bail!("{} is gzip-compressed: decompress it first (gunzip)", path.display());
    }
    // The ext4 superblock starts at byte 1024; its magic 0xEF53 is at offset 56 in it.
    let mut magic = [0u8; 2];
    if f.seek(SeekFrom::Start(1024 + 56)).is_ok() && f.read_exact(&mut magic).is_ok() && magic == [0x53, 0xef] {
        return Ok(ImageKind::Ext4);
    }
    bail!(
        "{} is neither an initramfs (cpio) nor an ext4 image: build one with `nex rootfs --out DIR` or `nex rootfs -o rootfs.ext4`",
        path.display()
    )
}

/// The initramfs that boots an ext4 image: the image's own tree (agent as `/init`, its
/// libraries, the modules), copied out with `debugfs` (e2fsprogs; no mounting), so the agent can
/// load the disk driver and switch to the disk as its root.
fn ext4_loader(image: &Path, out: &Path) -> Result<()> {
    let tree = out.with_extension("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree)?;
    let res = unpack_and_pack(image, &tree, out);
    let _ = std::fs::remove_dir_all(&tree);
    res
}

fn unpack_and_pack(image: &Path, tree: &Path, out: &Path) -> Result<()> {
    let debugfs = ["/usr/sbin/debugfs", "/sbin/debugfs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("debugfs"));
    let status = std::process::Command::new(&debugfs)
        .arg("-R")
        .arg(format!("rdump / {}", tree.display()))
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running debugfs to read the ext4 image: install e2fsprogs (apt-get install -y e2fsprogs)")?;
    if !status.success() || !tree.join("init").is_file() {
        bail!("{} has no /init: build it with `nex rootfs -o {}`", image.display(), image.display());
    }
    let _ = std::fs::remove_dir_all(tree.join("lost+found"));
    let mut cpio = super::cpio::Cpio::default();
    cpio.dir("dev", 0o755);
    cpio.device("dev/console", 0o600, 5, 1);
    cpio.device("dev/null", 0o666, 1, 3);
    super::cpio::pack_dir(&mut cpio, tree)?;
    std::fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))
}

fn tap_prefix(run: &str) -> String {
    format!("nv{run}")
}

/// Guests' network namespaces with CNI: `nxv<run><slot>`.
fn netns_prefix(run: &str) -> String {
    format!("nxv{run}")
}

/// The tap device of a guest inside its own namespace.
const GUEST_TAP: &str = "tap0";

/// Makes `cmd` start in network namespace `ns` (so QEMU opens the tap that lives there).
fn enter_netns(cmd: &mut Command, ns: &str) -> Result<()> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let f: OwnedFd = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening the guest's network namespace {ns}"))?
        .into();
    // SAFETY: setns on a descriptor that stays open (moved into the closure) in the child between
    // fork and exec; it only changes the child's network namespace.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

impl MicrovmTier {
    /// Checks the guest image and prepares the run's bridge. `accel` is `kvm`, `tcg` or `auto`
    /// (KVM when a probe guest boots on it within a few seconds).
    pub async fn new(
        qemu: PathBuf,
        kernel: PathBuf,
        initrd: PathBuf,
        accel: &str,
        run_id: String,
        run_dir: &Path,
        net_opts: super::net::NetOptions,
    ) -> Result<MicrovmTier> {
        for (what, p) in [("kernel (kernel_filepath)", &kernel), ("guest image (rootfs_filepath)", &initrd)] {
            if !p.is_file() {
                return Err(anyhow!(
                    "the micro-VM {what} {} does not exist: build both with `nex rootfs --out {}`",
                    p.display(),
                    p.parent().map(|d| d.display().to_string()).unwrap_or_else(|| "/var/lib/nex/microvm".into())
                ));
            }
        }
        let (initrd, root_disk) = match image_kind(&initrd)? {
            ImageKind::Cpio => (initrd, None),
            ImageKind::Ext4 => {
                let dir = run_dir.join("microvm");
                std::fs::create_dir_all(&dir)?;
                let loader = dir.join("loader.cpio");
                ext4_loader(&initrd, &loader)?;
                (loader, Some(initrd))
            }
        };
        let accel = match accel {
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            "" | "auto" => {
                if kvm_openable() && probe_kvm(&qemu, &kernel, &initrd).await {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
            other => return Err(anyhow!("microvm_accel must be auto, kvm or tcg (got {other:?})")),
        };
        if accel == Accel::Tcg {
            tracing::warn!("micro-VMs run under software emulation (TCG): fine for development, slow for production; use a host with working KVM");
        }
        let net = Arc::new(BridgeNet::create(&run_id, &tap_prefix(&run_id), net_opts).await?);
        Ok(MicrovmTier { qemu, kernel, initrd, root_disk, accel, run_id, net })
    }

    /// How guests are executed.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn qemu_cmd(&self, spec: &AgentSpec, tap: &str, mac: &str) -> Command {
        let t = &spec.template;
        let mut cmd = Command::new(&self.qemu);
        cmd.arg("-name")
            .arg(format!("nex-{}-{}", self.run_id, spec.id))
            .args(["-M", "microvm", "-accel", self.accel.as_str()])
            .args(["-cpu", if self.accel == Accel::Kvm { "host" } else { "max" }])
            .args(["-smp", &t.vcpu_count.to_string(), "-m", &format!("{}M", t.memsize_mib)])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio"])
            // QEMU's own seccomp filter: no spawning, no privilege changes, no obsolete calls.
            .args(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"])
            .arg("-netdev")
            .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
            .arg("-device")
            .arg(format!("virtio-net-device,netdev=n0,mac={mac}"))
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd);
        if let Some(disk) = &self.root_disk {
            // snapshot=on: the image stays read-only; the guest's writes go to a temporary overlay
            // QEMU creates in TMPDIR (the agent's directory) and deletes, gone with the VM.
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=none,id=root,snapshot=on", disk.display()))
                .args(["-device", "virtio-blk-device,drive=root"])
                .env("TMPDIR", &spec.work_dir);
        }
        cmd.arg("-append")
            .arg(kernel_cmdline(self.accel, if self.root_disk.is_some() { "nex.root=/dev/vda" } else { "" }))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        nex_io::tie_to_parent(&mut cmd, libc::SIGKILL);
        cmd
    }

    async fn launch_inner(&self, spec: &AgentSpec, slot: usize, tap: &str) -> Result<MicrovmAgent> {
        std::fs::create_dir_all(&spec.work_dir)
            .with_context(|| format!("creating agent directory {}", spec.work_dir.display()))?;
        let (mac, prefix_len, gateway, netns) = match self.net.cni() {
            Some(cni) => {
                // The CNI link lives in the guest's own namespace; the tap QEMU opens there is
                // joined to it with tc (what tc-redirect-tap does), and the card takes over the
                // link's MAC so the host's side sees one peer.
                let ns = format!("{}{slot:02x}", netns_prefix(&self.run_id));
                run_cmd("ip", &["netns", "add", &ns], None).await?;
                let att = self.net.cni_attach(&spec.id, &format!("/run/netns/{ns}")).await?;
                let ifname = cni.settings.interface_name.clone();
                super::cni::redirect_tap(&ns, &ifname, GUEST_TAP).await?;
                (att.mac, att.prefix, att.gateway.filter(|_| self.net.options().egress), Some(ns))
            }
            None => {
                let script = format!(
                    "tuntap add dev {tap} mode tap\nlink set {tap} master {br}\nlink set {tap} type bridge_slave isolated on\nlink set {tap} up\n",
                    br = self.net.bridge()
                );
                run_cmd("ip", &["-b", "-"], Some(&script)).await.context("creating the guest's tap device")?;
                self.net.attach_port(&spec.id, tap).await?;
                let mac = format!("52:54:00:d5:{:02x}:{slot:02x}", (self.net.host_ip().octets()[2]));
                (mac, 24, self.net.gateway(), None)
            }
        };
        let mut cmd = match &netns {
            Some(ns) => {
                let mut c = self.qemu_cmd(spec, GUEST_TAP, &mac);
                enter_netns(&mut c, ns)?;
                c
            }
            None => self.qemu_cmd(spec, tap, &mac),
        };
        let mut child = cmd.spawn().with_context(|| format!("starting {}", self.qemu.display()))?;
        let pid = child.id().unwrap_or(0);
        let md = GuestMetadata {
            id: spec.id.clone(),
            ip: self.net.agent_ip(&spec.id).map(|ip| ip.to_string()).unwrap_or_default(),
            prefix_len,
            node_nats_host: spec.nats_host.clone(),
            node_nats_port: spec.nats_port,
            nkey_seed: spec.nkey_seed.clone(),
            stop_grace_ms: spec.stop_grace_ms,
            log: std::env::var("NEX_AGENT_LOG").unwrap_or_default(),
            gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
            nameservers: self.net.options().nameservers.iter().map(|n| n.to_string()).collect(),
        };
        let mut answer = serde_json::to_vec(&md)?;
        answer.push(b'\n');
        let stdin = child.stdin.take();
        if let Some(out) = child.stdout.take() {
            let id = spec.id.clone();
            tokio::spawn(async move {
                let mut stdin = stdin;
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let l = l.trim_end_matches('\r');
                    if l.ends_with(METADATA_PROMPT) {
                        if let Some(w) = stdin.as_mut() {
                            let _ = w.write_all(&answer).await;
                            let _ = w.flush().await;
                        }
                        continue;
                    }
                    tracing::debug!(workload_id = %id, from_agent = true, stream = "console", "{l}");
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            let id = spec.id.clone();
            nex_io::forward_lines(err, move |l| tracing::warn!(workload_id = %id, "qemu: {l}"));
        }
        let rx = super::watch_exit(child);
        Ok(MicrovmAgent {
            id: spec.id.clone(),
            tap: tap.to_string(),
            pid,
            exited: rx,
            work_dir: spec.work_dir.clone(),
            net: self.net.clone(),
            netns,
        })
    }
}

/// Boots a guest with KVM and waits for its agent to ask for metadata.
async fn probe_kvm(qemu: &Path, kernel: &Path, initrd: &Path) -> bool {
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "256M"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(kernel_cmdline(Accel::Kvm, ""))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let Ok(mut child) = cmd.spawn() else { return false };
    let Some(out) = child.stdout.take() else { return false };
    let booted = tokio::time::timeout(Duration::from_secs(4), async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if l.trim_end().ends_with(METADATA_PROMPT) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let _ = child.kill().await;
    if !booted {
        tracing::info!("a probe guest did not boot with KVM within 4 s");
    }
    booted
}

impl IsolationTier for MicrovmTier {
    fn name(&self) -> &'static str {
        crate::config::isolation::MICROVM
    }

    fn bridge(&self) -> Option<&BridgeNet> {
        Some(&self.net)
    }

    fn start_timeout(&self, configured: Duration) -> Duration {
        match self.accel {
            // An emulated boot takes seconds, more when guests boot side by side.
            Accel::Tcg => configured.max(Duration::from_secs(20)),
            Accel::Kvm => configured.max(Duration::from_secs(10)),
        }
    }

    fn launch(&self, spec: AgentSpec) -> BoxFuture<'_, Result<Box<dyn AgentHandle>>> {
        Box::pin(async move {
            let slot = self.net.alloc_slot(&spec.id)?;
            let tap = format!("{}{slot:02x}", tap_prefix(&self.run_id));
            match self.launch_inner(&spec, slot, &tap).await {
                Ok(a) => Ok(Box::new(a) as Box<dyn AgentHandle>),
                Err(e) => {
                    let _ = run_cmd("ip", &["link", "delete", &tap], None).await;
                    let _ = tokio::fs::remove_dir_all(&spec.work_dir).await;
                    self.net.release(&spec.id).await;
                    let ns = format!("{}{slot:02x}", netns_prefix(&self.run_id));
                    let _ = run_cmd("ip", &["netns", "delete", &ns], None).await;
                    Err(e)
                }
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        // Also sweeps guests that were still booting for the pool when the node stopped.
        Box::pin(cleanup_run(&self.run_id))
    }
}

/// A running guest.
#[derive(Debug)]
struct MicrovmAgent {
    id: String,
    tap: String,
    pid: u32,
    exited: watch::Receiver<Option<AgentExit>>,
    work_dir: PathBuf,
    net: Arc<BridgeNet>,
    /// The guest's network namespace (with CNI).
    netns: Option<String>,
}

impl AgentHandle for MicrovmAgent {
    fn exited(&self) -> watch::Receiver<Option<AgentExit>> {
        self.exited.clone()
    }

    fn destroy(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.exited.borrow().is_none() && self.pid > 0 {
                // SAFETY: signalling the process group of the QEMU we started. The guest holds
                // nothing the host needs back, so there is no point in a graceful power-off.
                unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
            }
            let mut rx = self.exited.clone();
            let _ = tokio::time::timeout(Duration::from_secs(5), super::wait_exit(&mut rx)).await;
            let _ = run_cmd("ip", &["link", "delete", &self.tap], None).await;
            let _ = tokio::fs::remove_dir_all(&self.work_dir).await;
            self.net.release(&self.id).await;
            if let Some(ns) = &self.netns {
                let _ = run_cmd("ip", &["netns", "delete", ns], None).await;
            }
        })
    }

    fn oom_killed(&self) -> bool {
        false
    }

    fn agent_rss_bytes(&self) -> Option<u64> {
        super::process::rss_of(self.pid)
    }

    fn pid(&self) -> Option<u32> {
        (self.pid > 0).then_some(self.pid)
    }
}

/// Removes what a dead node run of this tier left: QEMU processes (normally gone with the node,
/// which they are tied to), tap devices, the bridge and the firewall.
pub async fn cleanup_run(run: &str) {
    let name = format!("nex-{run}-");
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let mut args = cmd.split(|b| *b == 0);
            let is_guest = args.next().is_some_and(|a| a.ends_with(b"qemu-system-x86_64"))
                && args.any(|a| a.starts_with(name.as_bytes()));
            if is_guest {
                // SAFETY: killing a guest of a dead run of ours.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    for tap in super::net::links_with_prefix(&tap_prefix(run)).await {
        let _ = run_cmd("ip", &["link", "delete", &tap], None).await;
    }
    super::net::delete_netns_with_prefix(&netns_prefix(run)).await;
    super::net::remove(run).await;
}
