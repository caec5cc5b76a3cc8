//! The agent as the init of a micro-VM guest (PID 1 in an initramfs built by `nex rootfs`).
//!
//! Before the usual agent starts, init mounts the kernel's file systems, loads the modules the
//! guest needs for its network card (listed in [`MODULES`]`/order`), asks the node for its
//! metadata on the serial console ([`METADATA_PROMPT`]; the answer is one JSON line, never on the
//! kernel command line, which every guest process could read), configures `eth0`, and hands the
//! metadata to [`crate::metadata::obtain`] through the environment and a seed file it deletes.
//! When the agent ends, the guest powers off.

use std::ffi::CString;
use std::io::{BufRead, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use nex_api::agent::{env, GuestMetadata, METADATA_PROMPT};

/// Where the image keeps kernel modules and their load order.
const MODULES: &str = "/lib/modules/nex";
/// Where the seed is handed to [`crate::metadata::obtain`], which deletes it.
const SEED_FILE: &str = "/run/agent-seed";

/// True when this process is the init of a guest: PID 1 without the metadata environment that
/// the process and container tiers give (a container's agent is PID 1 of its namespace too).
pub fn is_init() -> bool {
    std::process::id() == 1 && std::env::var_os(env::WORKLOAD_ID).is_none()
}

/// Prepares the guest and the environment the agent reads its metadata from.
pub fn boot() -> Result<()> {
    // Set when this init was started again from an ext4 root (see `switch_root`).
    if std::env::var_os(SWITCHED).is_none() {
        for (src, target, fstype) in
            [("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"), ("devtmpfs", "/dev", "devtmpfs")]
        {
            mount(src, target, fstype).with_context(|| format!("mounting {target}"))?;
        }
        load_modules()?;
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if let Some(dev) = cmdline.split_whitespace().find_map(|a| a.strip_prefix("nex.root=")) {
            switch_root(dev)?;
        }
    }
    set_interface("lo", None)?;
    wait_for_interface("eth0", Duration::from_secs(10))?;
    let md = ask_metadata()?;
    let ip: Ipv4Addr = md.ip.parse().with_context(|| format!("guest address {:?}", md.ip))?;
    set_interface("eth0", Some((ip, md.prefix_len)))?;
    if !md.gateway.is_empty() {
        let gw: Ipv4Addr = md.gateway.parse().with_context(|| format!("gateway {:?}", md.gateway))?;
        add_default_route(gw)?;
    }
    write_resolv_conf(&md.nameservers)?;
    write_seed(md.nkey_seed.expose())?;
    std::env::set_var(env::SANDBOX, "true");
    std::env::set_var(env::WORKLOAD_ID, &md.id);
    std::env::set_var(env::NODE_NATS_HOST, &md.node_nats_host);
    std::env::set_var(env::NODE_NATS_PORT, md.node_nats_port.to_string());
    std::env::set_var(crate::metadata::SEED_FILE, SEED_FILE);
    std::env::set_var("NEX_AGENT_WORKDIR", "/work");
    // Native workloads run as an unprivileged user of the guest, not as its init's root.
    std::env::set_var(env::WORKLOAD_UID, nex_api::agent::WORKLOAD_UID.to_string());
    std::env::set_var(env::WORKLOAD_DIR, "/work/data");
    std::env::set_var("NEX_STOP_GRACE_MS", md.stop_grace_ms.to_string());
    std::env::set_var("NEX_AGENT_LOG", &md.log);
    std::env::set_var("TMPDIR", "/tmp");
    std::env::set_var("PATH", "/usr/local/bin:/usr/bin:/bin");
    Ok(())
}

/// Marks the init started from the ext4 root.
const SWITCHED: &str = "NEX_GUEST_ROOT_SWITCHED";

/// Makes the ext4 disk `dev` the root and starts its `/init` (the image's agent) in this
/// process, as `switch_root` does: the kernel file systems move along, and the initramfs's files
/// are deleted first, so they do not hold the guest's memory.
fn switch_root(dev: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(dev).exists() {
        if Instant::now() > deadline {
            bail!("no root disk {dev}: does the image's loader hold the virtio_blk module?");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    mount(dev, "/newroot", "ext4").with_context(|| format!("mounting {dev}"))?;
    for m in ["/dev", "/proc", "/sys"] {
        let target = format!("/newroot{m}");
        std::fs::create_dir_all(&target)?;
        move_mount(m, &target).with_context(|| format!("moving {m} to the new root"))?;
    }
    for e in std::fs::read_dir("/")?.flatten() {
        let p = e.path();
        if p != std::path::Path::new("/newroot") {
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
    std::env::set_current_dir("/newroot")?;
    move_mount(".", "/").context("moving the new root to /")?;
    // SAFETY: chroot to the current directory, a NUL-terminated constant.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("chroot to the new root");
    }
    std::env::set_current_dir("/")?;
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new("/init").env(SWITCHED, "1").exec();
    Err(anyhow!("starting /init on the root disk: {e}"))
}

fn move_mount(from: &str, to: &str) -> Result<()> {
    let (f, t) = (CString::new(from)?, CString::new(to)?);
    // SAFETY: NUL-terminated strings that outlive the call; MS_MOVE takes no type or data.
    let rc = unsafe { libc::mount(f.as_ptr(), t.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Ends the guest: QEMU exits when its guest powers off.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot with constant arguments; we are init and the guest is ending.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn mount(src: &str, target: &str, fstype: &str) -> Result<()> {
    std::fs::create_dir_all(target)?;
    let (s, t, f) = (CString::new(src)?, CString::new(target)?, CString::new(fstype)?);
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e.into());
        }
    }
    Ok(())
}

fn load_modules() -> Result<()> {
    let Ok(order) = std::fs::read_to_string(format!("{MODULES}/order")) else {
        return Ok(()); // a kernel with everything built in
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("{MODULES}/{name}");
        let f = std::fs::File::open(&path).with_context(|| format!("opening module {path}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: finit_module on a descriptor we own, with empty parameters.
        let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                bail!("loading kernel module {name}: {e}");
            }
        }
    }
    Ok(())
}

fn wait_for_interface(name: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while !std::path::Path::new(&format!("/sys/class/net/{name}")).exists() {
        if Instant::now() > deadline {
            bail!("no network interface {name}: does the VM have a virtio-net device and the image its modules?");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Prints the prompt on the console and reads the node's answer, without echoing it back.
fn ask_metadata() -> Result<GuestMetadata> {
    // SAFETY: termios calls on stdin with a zeroed struct that tcgetattr fills.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) == 0 {
            t.c_lflag &= !(libc::ECHO | libc::ECHONL);
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{METADATA_PROMPT}")?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading metadata from the console")?;
    serde_json::from_str(line.trim()).map_err(|e| anyhow!("metadata from the node is not valid: {e}"))
}

/// The guest's resolvers, as the node chose them.
fn write_resolv_conf(nameservers: &[String]) -> Result<()> {
    std::fs::create_dir_all("/etc")?;
    let mut s = String::from("# written by nex for this guest\n");
    for ns in nameservers {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    std::fs::write("/etc/resolv.conf", s).context("writing /etc/resolv.conf")
}

/// `ip route add default via gw`, through the routing ioctl (the guest has no `ip`).
fn add_default_route(gw: Ipv4Addr) -> Result<()> {
    let sin = |a: u32| {
        let s = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: a.to_be() },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(s) }
    };
    // SAFETY: rtentry is plain data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sin(0);
    rt.rt_genmask = sin(0);
    rt.rt_gateway = sin(u32::from(gw));
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: a datagram socket used only for this ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `rt` is a valid rtentry for SIOCADDRT.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCADDRT as _, &mut rt as *mut libc::rtentry) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        bail!("adding the default route via {gw}: {err}");
    }
    Ok(())
}

fn write_seed(seed: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all("/run")?;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(SEED_FILE)?;
    f.write_all(seed.as_bytes())?;
    Ok(())
}

/// Brings `name` up, with an IPv4 address when given.
fn set_interface(name: &str, addr: Option<(Ipv4Addr, u8)>) -> Result<()> {
    // SAFETY: a datagram socket used only for interface ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let res = (|| -> Result<()> {
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        let ioctl = |req: libc::c_ulong, ifr: &mut libc::ifreq, what: &str| -> Result<()> {
            // SAFETY: `ifr` is a valid ifreq for these interface requests.
            if unsafe { libc::ioctl(fd, req as _, ifr as *mut libc::ifreq) } != 0 {
                bail!("{what} on {name}: {}", std::io::Error::last_os_error());
            }
            Ok(())
        };
        if let Some((ip, prefix)) = addr {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
            for (req, value, what) in [
                (libc::SIOCSIFADDR, u32::from(ip), "setting the address"),
                (libc::SIOCSIFNETMASK, mask, "setting the netmask"),
            ] {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr { s_addr: value.to_be() },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in the sockaddr of the union and is what the kernel reads.
                unsafe {
                    std::ptr::write(std::ptr::addr_of_mut!(ifr.ifr_ifru.ifru_addr) as *mut libc::sockaddr_in, sin);
                }
                ioctl(req, &mut ifr, what)?;
            }
        }
        ioctl(libc::SIOCGIFFLAGS, &mut ifr, "reading flags")?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        }
        ioctl(libc::SIOCSIFFLAGS, &mut ifr, "bringing it up")
    })();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    res
}
