//! A writer of uncompressed `newc` cpio archives, the format of a Linux initramfs: `nex rootfs`
//! writes the micro-VM guest image with it, and the micro-VM tier packs the loader of an ext4
//! guest image with it.

use std::path::Path;

use anyhow::{Context, Result};

/// An uncompressed `newc` cpio archive, entries owned by root with mtime 0.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: Vec<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields =
            [self.ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str, perm: u32) {
        if !self.dirs.iter().any(|d| d == name) {
            self.dirs.push(name.to_string());
            self.entry(name, 0o040000 | perm, &[], (0, 0));
        }
    }

    /// Adds the directories above `path`.
    pub fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            self.dir(&acc.clone(), 0o755);
        }
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data, (0, 0));
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &[u8]) {
        self.entry(name, 0o120777, target, (0, 0));
    }

    pub fn device(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

/// Packs the tree under `root` (directories, regular files, symbolic links, with their modes)
/// after `cpio`'s own entries.
pub fn pack_dir(cpio: &mut Cpio, root: &Path) -> Result<()> {
    fn walk(cpio: &mut Cpio, root: &Path, dir: &Path) -> Result<()> {
        let mut entries: Vec<_> =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().to_string();
            let meta = std::fs::symlink_metadata(&path)?;
            use std::os::unix::fs::PermissionsExt;
            let perm = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path)?;
                cpio.symlink(&rel, target.to_string_lossy().as_bytes());
            } else if meta.is_dir() {
                cpio.dir(&rel, perm);
                walk(cpio, root, &path)?;
            } else if meta.is_file() {
                cpio.file(&rel, perm, &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
            }
        }
        Ok(())
    }
    walk(cpio, root, root)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, size, rdev major, rdev minor) of every entry, checking alignment.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, usize, u32, u32)> {
        let total = b.len();
        let mut out = Vec::new();
        loop {
            assert_eq!((total - b.len()) % 4, 0);
            assert_eq!(&b[..6], b"070701");
            let f =
                |i: usize| u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16).unwrap();
            let (mode, size, maj, min, namesize) = (f(1), f(6) as usize, f(9), f(10), f(11) as usize);
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            let data_at = (110 + namesize).div_ceil(4) * 4;
            let next = (data_at + size).div_ceil(4) * 4;
            out.push((name.clone(), mode, size, maj, min));
            b = &b[next.min(b.len())..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
        }
    }

    #[test]
    fn cpio_round_trips() {
        let mut c = Cpio::default();
        c.dir("dev", 0o755);
        c.device("dev/console", 0o600, 5, 1);
        c.parents("lib/x86_64-linux-gnu/libc.so.6");
        c.file("lib/x86_64-linux-gnu/libc.so.6", 0o755, b"abcde");
        c.file("init", 0o755, b"xyz");
        let e = parse(&c.finish());
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "lib",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/libc.so.6",
                "init",
                "TRAILER!!!"
            ]
        );
        assert_eq!(e[1], ("dev/console".into(), 0o020600, 0, 5, 1));
        assert_eq!(e[4].2, 5);
        assert_eq!(e[5].1, 0o100755);
    }

    #[test]
    fn a_directory_is_packed_with_its_modes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lib/nex")).unwrap();
        std::fs::write(dir.path().join("init"), b"agent").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("nex", dir.path().join("lib/link")).unwrap();
        let mut c = Cpio::default();
        pack_dir(&mut c, dir.path()).unwrap();
        let e = parse(&c.finish());
        let got: Vec<(&str, u32)> = e.iter().map(|x| (x.0.as_str(), x.1)).collect();
        assert!(got.contains(&("init", 0o100755)), "{got:?}");
        assert!(got.contains(&("lib/nex", 0o040755)), "{got:?}");
        assert!(got.contains(&("lib/link", 0o120777)), "{got:?}");
    }
}
