//! The node's own files, safe from other local users: the state directory is created `0700` and
//! refused when another user owns it or could write to it (or to a directory above it, unless
//! that one is sticky like `/tmp`); the pid file is never followed through a symbolic link and
//! refused when it belongs to someone else. A user who creates `/tmp/nex` before the node starts
//! gets a clear refusal instead of a say in what the node reads, writes or runs.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Whose files the node trusts: root's and its own.
fn trusted_owner(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Why directory `meta` at `path` cannot hold the node's state, if it cannot. `strict` applies to
/// the state directory itself: no write access for anyone else, sticky or not.
fn dir_problem(path: &Path, meta: &fs::Metadata, strict: bool) -> Option<String> {
    if !meta.is_dir() {
        return Some(format!("{} is not a directory", path.display()));
    }
    if !trusted_owner(meta.uid()) {
        return Some(format!(
            "{} belongs to uid {}, not to root or the user running the node",
            path.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode();
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && (strict || !sticky) {
        return Some(format!("{} is writable by its group or by others (mode {:o})", path.display(), mode & 0o7777));
    }
    None
}

/// Creates `dir` (mode `0700`) when missing and checks it and every directory above it.
pub fn prepare_state_dir(dir: &Path) -> Result<PathBuf> {
    let fix = |why: String| {
        anyhow::anyhow!(
            "refusing state directory {}: {why}; another user could plant files the node trusts. Use a directory only the node's user can write (chown/chmod 700), or set state_dir",
            dir.display()
        )
    };
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(fix(format!("{} is a symbolic link", dir.display())));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating state directory {}", dir.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    let dir = fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let meta = fs::metadata(&dir)?;
    if let Some(p) = dir_problem(&dir, &meta, true) {
        return Err(fix(p));
    }
    let mut up = dir.parent();
    while let Some(p) = up {
        let m = fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
        if let Some(why) = dir_problem(p, &m, false) {
            return Err(fix(why));
        }
        up = p.parent();
    }
    Ok(dir)
}

/// Creates `dir` as a traverse-only directory (`0711`, root's): others may pass through it to a
/// path they know, not list or change it. Refused like a state directory when someone else
/// could write to it.
pub fn traverse_only_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        bail!("refusing {}: it is a symbolic link", dir.display());
    }
    if let Some(why) = dir_problem(dir, &meta, true) {
        bail!("refusing {}: {why}", dir.display());
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711)).with_context(|| format!("chmod {}", dir.display()))
}

/// Creates a private directory (`0700`) for the node's own use; an existing one is tightened.
pub fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).with_context(|| format!("chmod {}", dir.display()))
}

/// Writes the pid file: never through a symbolic link, never into a file another user owns or
/// can write, mode `0600`.
pub fn write_pid_file(path: &Path) -> Result<()> {
    let refuse = |why: String| anyhow::anyhow!("refusing pid file {}: {why}", path.display());
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let m = fs::metadata(parent)?;
        if let Some(why) = dir_problem(parent, &m, false) {
            return Err(refuse(why));
        }
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Err(refuse("it is a symbolic link".into())),
        Ok(m) if !m.is_file() => return Err(refuse("it is not a regular file".into())),
        Ok(m) if !trusted_owner(m.uid()) => return Err(refuse(format!("it belongs to uid {}", m.uid()))),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| refuse(e.to_string()))?;
    let m = f.metadata()?;
    if !trusted_owner(m.uid()) || m.nlink() != 1 {
        bail!("refusing pid file {}: it belongs to uid {} or has other names", path.display(), m.uid());
    }
    f.set_len(0)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(std::process::id().to_string().as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_is_created_private_and_a_writable_one_refused() {
        let base = tempfile::tempdir().unwrap();
        let d = base.path().join("state");
        prepare_state_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_state_dir(&d).unwrap_err().to_string();
        assert!(e.contains("writable by its group or by others"), "{e}");
        // A writable, non-sticky directory above it is refused too.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(prepare_state_dir(&d).is_err());
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        prepare_state_dir(&d).unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(prepare_state_dir(&link).unwrap_err().to_string().contains("symbolic link"));
    }

    #[test]
    fn the_pid_file_is_never_a_link() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("victim");
        fs::write(&target, "keep").unwrap();
        let pid = base.path().join("nex.pid");
        std::os::unix::fs::symlink(&target, &pid).unwrap();
        assert!(write_pid_file(&pid).unwrap_err().to_string().contains("symbolic link"));
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        fs::remove_file(&pid).unwrap();
        write_pid_file(&pid).unwrap();
        assert_eq!(fs::read_to_string(&pid).unwrap(), std::process::id().to_string());
        assert_eq!(fs::metadata(&pid).unwrap().mode() & 0o777, 0o600);
    }
}
