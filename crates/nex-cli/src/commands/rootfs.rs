//! `nex rootfs`: builds the micro-VM guest image without Docker and without root — the kernel
//! (`vmlinuz`, copied from a distribution kernel package) and an uncompressed initramfs
//! (`rootfs.cpio`) holding `nex-agent` as `/init`, the libraries it links and the kernel modules a
//! guest needs for its network card, in the load order their `depends=` fields give.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use nex_node::tiers::cpio::Cpio;

/// `nex rootfs`
#[derive(Debug, Args)]
pub struct RootfsArgs {
    /// Where to write vmlinuz and rootfs.cpio (and keep the downloaded package in cache/)
    #[arg(long, default_value = "/var/lib/nex/microvm")]
    pub out: PathBuf,
    /// The image to write instead: FILE.ext4 for an ext4 root file system (as Nex's guide
    /// builds), else an initramfs; vmlinuz goes beside it
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Size of an ext4 image in MiB
    #[arg(long, default_value_t = 150)]
    pub size: u64,
    /// The agent to boot as init (default: nex-agent next to this nex)
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// A static program to use as /init instead of the agent (for debugging guests)
    #[arg(long, conflicts_with = "agent")]
    pub init: Option<PathBuf>,
    /// Debian/Ubuntu kernel package to download with apt-get
    #[arg(long, default_value = "linux-image-cloud-amd64")]
    pub kernel_package: String,
    /// A local kernel package (.deb) instead of downloading one
    #[arg(long, conflicts_with_all = ["kernel", "modules"])]
    pub kernel_deb: Option<PathBuf>,
    /// An existing kernel image (needs --modules)
    #[arg(long, requires = "modules")]
    pub kernel: Option<PathBuf>,
    /// The module directory of --kernel (e.g. /lib/modules/VERSION)
    #[arg(long, requires = "kernel")]
    pub modules: Option<PathBuf>,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// Modules a guest needs for its network card and (ext4 images) its root disk; their dependencies are added.
const WANTED_MODULES: &[&str] = &["virtio_mmio", "virtio_net", "virtio_blk"];

/// Builds the image.
pub fn rootfs(args: RootfsArgs) -> Result<()> {
    let say = |m: String| {
        if !args.json {
            eprintln!("{m}");
        }
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let init = match (&args.init, &args.agent) {
        (Some(p), _) | (None, Some(p)) => p.clone(),
        (None, None) => {
            std::env::current_exe()?.parent().map(|d| d.join("nex-agent")).context("the directory of nex")?
        }
    };
    if !init.is_file() {
        bail!("{} does not exist: run `make build` (or pass --agent PATH)", init.display());
    }

    // The kernel and its module directory.
    let unpacked = tempfile::Builder::new().prefix("nex-rootfs-").tempdir()?;
    let (kernel, modules) = match (&args.kernel, &args.modules, &args.kernel_deb) {
        (Some(k), Some(m), _) => (k.clone(), m.clone()),
        (_, _, Some(deb)) => unpack(deb, unpacked.path())?,
        _ => {
            let deb = download(&args.kernel_package, &args.out.join("cache"), &say)?;
            unpack(&deb, unpacked.path())?
        }
    };
    let version = modules.file_name().map(|v| v.to_string_lossy().to_string()).unwrap_or_default();
    let (order, builtin) = module_order(&modules)?;
    for m in &builtin {
        say(format!("Module {m} is built into the kernel (modules.builtin): not added"));
    }
    say(format!("Kernel {version}, modules: {}", order.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")));

    // The guest's tree: the agent as /init, its libraries, the modules and their load order.
    let tree = tempfile::Builder::new().prefix("nex-rootfs-tree-").tempdir()?;
    let root = tree.path();
    for d in ["dev", "proc", "sys", "etc", "run", "work", "lib/modules/nex"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let tmp = root.join("tmp");
    std::fs::create_dir(&tmp)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    let put = |rel: &str, mode: u32, bytes: &[u8]| -> Result<()> {
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put("init", 0o755, &stripped(&init)?)?;
    for lib in shared_libraries(&init)? {
        let bytes = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
        put(&lib.strip_prefix("/").unwrap_or(&lib).to_string_lossy(), 0o755, &bytes)?;
    }
    let mut list = String::new();
    for (name, path) in &order {
        let file = format!("{name}.ko");
        put(&format!("lib/modules/nex/{file}"), 0o644, &std::fs::read(path)?)?;
        list.push_str(&file);
        list.push('\n');
    }
    put("lib/modules/nex/order", 0o644, list.as_bytes())?;

    let (out_dir, image_out) = match &args.output {
        Some(o) => {
            (o.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf(), o.clone())
        }
        None => (args.out.clone(), args.out.join("rootfs.cpio")),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let kernel_out = out_dir.join("vmlinuz");
    write_atomic(&kernel_out, &std::fs::read(&kernel).with_context(|| format!("reading {}", kernel.display()))?)?;
    let ext4 = image_out.extension().is_some_and(|e| e == "ext4");
    let image_len = if ext4 {
        write_ext4(root, &image_out, args.size)?
    } else {
        // An initramfs needs its console before devtmpfs is mounted.
        let mut cpio = Cpio::default();
        cpio.dir("dev", 0o755);
        cpio.device("dev/console", 0o600, 5, 1);
        cpio.device("dev/null", 0o666, 1, 3);
        nex_node::tiers::cpio::pack_dir(&mut cpio, root)?;
        let image = cpio.finish();
        write_atomic(&image_out, &image)?;
        image.len() as u64
    };
    say(format!(
        "Wrote {} and {} ({:.1} MiB)",
        kernel_out.display(),
        image_out.display(),
        image_len as f64 / 1048576.0
    ));
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "kernel_filepath": abs(&kernel_out), "rootfs_filepath": abs(&image_out),
                "kernel_version": version, "modules": order.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                "rootfs_bytes": image_len,
            })
        );
    } else {
        println!("Add to the node configuration:");
        println!(
            "  {}",
            serde_json::json!({"isolation": "microvm", "kernel_filepath": abs(&kernel_out), "rootfs_filepath": abs(&image_out)})
        );
    }
    Ok(())
}

/// Writes `tree` as an ext4 image of `size` (MiB; a value above 1 GiB of MiB is taken as bytes,
/// as Nex's `--size` was) with `mkfs.ext4 -d`: no root, no mounting, no Docker.
fn write_ext4(tree: &Path, out: &Path, size: u64) -> Result<u64> {
    let bytes = if size > 1 << 20 { size } else { size * 1024 * 1024 };
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mkfs.ext4"));
    let tmp = out.with_extension("ext4.partial");
    // A sparse file of the image's size, which mkfs.ext4 fills.
    std::fs::File::create(&tmp)
        .and_then(|f| f.set_len(bytes))
        .with_context(|| format!("creating {}", tmp.display()))?;
    let st = Command::new(&mkfs)
        .args(["-q", "-F", "-L", "nexroot", "-E", "root_owner=0:0", "-d"])
        .arg(tree)
        .arg(&tmp)
        .status()
        .context("running mkfs.ext4: install e2fsprogs (apt-get install -y e2fsprogs)")?;
    if !st.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "mkfs.ext4 could not write {} (is --size {size} large enough for the agent and its libraries?)",
            out.display()
        );
    }
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(bytes)
}

/// Downloads the kernel package (resolving a metapackage) into `cache`, reusing a cached one.
fn download(package: &str, cache: &Path, say: &dyn Fn(String)) -> Result<PathBuf> {
    std::fs::create_dir_all(cache)?;
    let out = Command::new("apt-cache")
        .args(["depends", package])
        .output()
        .context("running apt-cache: on hosts without apt, pass --kernel-deb FILE or --kernel FILE --modules DIR")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let real = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|d| d.starts_with("linux-image-"))
        .unwrap_or(package)
        .to_string();
    let cached = |cache: &Path| {
        std::fs::read_dir(cache).ok().and_then(|rd| {
            rd.flatten().map(|e| e.path()).find(|p| {
                p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{real}_")))
                    && p.extension().is_some_and(|x| x == "deb")
            })
        })
    };
    if let Some(p) = cached(cache) {
        say(format!("Using {}", p.display()));
        return Ok(p);
    }
    say(format!("Downloading {real} …"));
    let out =
        Command::new("apt-get").args(["download", &real]).current_dir(cache).output().context("running apt-get")?;
    if !out.status.success() {
        bail!(
            "apt-get download {real} failed: {}; pass --kernel-deb FILE or --kernel FILE --modules DIR",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    cached(cache).ok_or_else(|| anyhow!("apt-get download {real} left no {real}_*.deb in {}", cache.display()))
}

/// Unpacks a kernel package; returns its kernel image and module directory.
fn unpack(deb: &Path, into: &Path) -> Result<(PathBuf, PathBuf)> {
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(into)
        .status()
        .context("running dpkg-deb (apt-get install dpkg)")?;
    if !st.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    let single = |dir: PathBuf, what: &str, pick: &dyn Fn(&str) -> bool| -> Result<PathBuf> {
        let found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("{} holds no {what}", deb.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| pick(&n.to_string_lossy())))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            _ => bail!("{} holds {} {what}s; expected one", deb.display(), found.len()),
        }
    };
    let kernel = single(into.join("boot"), "boot/vmlinuz-*", &|n| n.starts_with("vmlinuz-"))?;
    let modules = single(into.join("lib/modules"), "lib/modules/<version>", &|_| true)
        .or_else(|_| single(into.join("usr/lib/modules"), "lib/modules/<version>", &|_| true))?;
    Ok((kernel, modules))
}

/// Every `.ko` under `dir`, by module name (`-` read as `_`).
fn index_modules(dir: &Path, into: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if e.file_type()?.is_dir() {
            index_modules(&p, into)?;
            continue;
        }
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if let Some(stem) = name.strip_suffix(".ko") {
            into.insert(stem.replace('-', "_"), p);
        } else if let Some(stem) = name.strip_suffix(".ko.xz").or_else(|| name.strip_suffix(".ko.zst")) {
            into.entry(stem.replace('-', "_")).or_insert(p);
        }
    }
    Ok(())
}

/// Module names with their files, in load order.
type LoadOrder = Vec<(String, PathBuf)>;

/// The modules the guest must load, dependencies first, and the wanted ones the kernel has built in.
fn module_order(modules: &Path) -> Result<(LoadOrder, Vec<String>)> {
    let mut all = BTreeMap::new();
    index_modules(modules, &mut all).with_context(|| format!("reading {}", modules.display()))?;
    let builtin = std::fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let is_builtin = |m: &str| {
        builtin.lines().any(|l| l.rsplit('/').next().is_some_and(|f| f.replace('-', "_") == format!("{m}.ko")))
    };
    let mut order = Vec::new();
    let mut skipped = Vec::new();
    let mut visiting = Vec::new();
    fn visit(
        m: &str,
        all: &BTreeMap<String, PathBuf>,
        is_builtin: &dyn Fn(&str) -> bool,
        order: &mut Vec<(String, PathBuf)>,
        skipped: &mut Vec<String>,
        visiting: &mut Vec<String>,
    ) -> Result<()> {
        if order.iter().any(|(n, _)| n == m) || skipped.iter().any(|n| n == m) || visiting.iter().any(|n| n == m) {
            return Ok(());
        }
        let Some(path) = all.get(m) else {
            if is_builtin(m) {
                skipped.push(m.to_string());
                return Ok(());
            }
            bail!(
                "kernel module {m} is neither in the module directory nor listed in its modules.builtin; \
                 pass the module directory that belongs to the kernel (--modules DIR)"
            );
        };
        if path.extension().is_some_and(|x| x != "ko") {
            bail!(
                "{} is compressed; unpack it (xz -d / zstd -d) or use a kernel with uncompressed modules",
                path.display()
            );
        }
        visiting.push(m.to_string());
        for d in depends(&std::fs::read(path)?) {
            visit(&d, all, is_builtin, order, skipped, visiting)?;
        }
        visiting.pop();
        order.push((m.to_string(), path.clone()));
        Ok(())
    }
    for m in WANTED_MODULES {
        visit(m, &all, &is_builtin, &mut order, &mut skipped, &mut visiting)?;
    }
    Ok((order, skipped))
}

/// The `depends=` list of a module's `.modinfo` strings.
fn depends(ko: &[u8]) -> Vec<String> {
    ko.split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .map(|m| m.trim().replace('-', "_"))
                .filter(|m| !m.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The binary without debug information, when objcopy is there.
fn stripped(bin: &Path) -> Result<Vec<u8>> {
    let tmp = tempfile::NamedTempFile::new()?;
    let ok = Command::new("objcopy").arg("--strip-debug").arg(bin).arg(tmp.path()).status().is_ok_and(|s| s.success());
    if ok {
        return Ok(std::fs::read(tmp.path())?);
    }
    std::fs::read(bin).with_context(|| format!("reading {}", bin.display()))
}

/// The shared libraries a dynamically linked binary needs (with its ELF interpreter).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let Ok(out) = Command::new("ldd").arg(bin).output() else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(l) = text.lines().find(|l| l.contains("=> not found")) {
        bail!(
            "{} needs a library this host lacks ({}); build it statically or install the library",
            bin.display(),
            l.trim()
        );
    }
    Ok(text.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/'))).map(PathBuf::from).collect())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| anyhow!("writing {}: {}", path.display(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_modinfo() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio_ring,virtio,net-failover\0vermagic=6.1\0";
        assert_eq!(depends(ko), ["virtio_ring", "virtio", "net_failover"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert!(depends(b"no modinfo").is_empty());
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        let m = |name: &str, deps: &str| {
            std::fs::write(dir.path().join(format!("{name}.ko")), format!("\0depends={deps}\0")).unwrap()
        };
        m("virtio_ring", "");
        m("virtio", "virtio_ring");
        m("virtio_mmio", "virtio,virtio_ring");
        m("failover", "");
        m("net_failover", "failover");
        m("virtio_net", "virtio_ring,virtio,net_failover");
        m("virtio_blk", "virtio_ring,virtio");
        let names = |dir: &Path| -> Vec<String> { module_order(dir).unwrap().0.into_iter().map(|(n, _)| n).collect() };
        assert_eq!(
            names(dir.path()),
            ["virtio_ring", "virtio", "virtio_mmio", "failover", "net_failover", "virtio_net", "virtio_blk"]
        );
        std::fs::remove_file(dir.path().join("failover.ko")).unwrap();
        assert!(module_order(dir.path()).unwrap_err().to_string().contains("failover"));
        // A missing module the kernel has built in is skipped (file names may spell it with '-').
        std::fs::write(dir.path().join("modules.builtin"), "kernel/drivers/net/failover.ko\n").unwrap();
        assert_eq!(
            names(dir.path()),
            ["virtio_ring", "virtio", "virtio_mmio", "net_failover", "virtio_net", "virtio_blk"]
        );
        assert_eq!(module_order(dir.path()).unwrap().1, ["failover"]);
        std::fs::remove_file(dir.path().join("virtio_ring.ko")).unwrap();
        std::fs::write(dir.path().join("modules.builtin"), "kernel/drivers/net/failover.ko\nkernel/virtio-ring.ko\n")
            .unwrap();
        assert_eq!(names(dir.path()), ["virtio", "virtio_mmio", "net_failover", "virtio_net", "virtio_blk"]);
    }
}
