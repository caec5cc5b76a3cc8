//! Replay protection: every `jti` the node accepted (DEPLOY, STOP, LAMEDUCK) is remembered until
//! its token could no longer be accepted anyway (the end of its freshness window, or its expiry),
//! in memory and in `<state_dir>/accepted-jti`, so a request captured on the bus and sent again —
//! also after the node restarts — is refused, and the record never grows without bound.
//!
//! The file holds one `<until> <jti>` line per token, appended under an exclusive `flock` (nodes
//! sharing a state directory share it) and rewritten without the lapsed lines when the node
//! starts and whenever lapsed lines outnumber live ones.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};

/// Why a `jti` cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// Already accepted within its window.
    #[error("replay detected: a token with jti {0} was already accepted by this node")]
    Replayed(String),
    /// Missing or not a plain token id.
    #[error("the token's jti is missing or not a plain id, so replay protection cannot apply")]
    BadJti,
}

/// The accepted `jti`s and when each may be forgotten.
#[derive(Debug)]
pub struct ReplayGuard {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    live: HashMap<String, i64>,
    /// Lines in the file, live or not.
    lines: usize,
}

/// Longest `jti` accepted (ours are 52 characters, Go's about the same).
const MAX_JTI: usize = 128;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl ReplayGuard {
    /// Loads (and compacts) the record under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<ReplayGuard> {
        let path = state_dir.join("accepted-jti");
        let g = ReplayGuard { path, state: Mutex::new(State::default()) };
        let f = g.file()?;
        lock(&f);
        let t = now();
        let mut live = HashMap::new();
        for line in BufReader::new(&f).lines().map_while(Result::ok) {
            if let Some((until, jti)) = line.split_once(' ') {
                if let Ok(until) = until.parse::<i64>() {
                    if until > t && valid_jti(jti) {
                        live.insert(jti.to_string(), until);
                    }
                }
            }
        }
        g.rewrite(&f, &live)?;
        *g.state.lock().unwrap_or_else(|e| e.into_inner()) = State { lines: live.len(), live };
        Ok(g)
    }

    fn file(&self) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))
    }

    fn rewrite(&self, f: &File, live: &HashMap<String, i64>) -> Result<()> {
        let mut text = String::new();
        for (jti, until) in live {
            text.push_str(&format!("{until} {jti}\n"));
        }
        f.set_len(0)?;
        (&*f).write_all(text.as_bytes())?;
        Ok(())
    }

    /// Records `jti` until `until` (unix seconds); refuses one already recorded. A token whose
    /// window already ended needs no record (its freshness check refuses it).
    pub fn accept(&self, jti: &str, until: i64) -> Result<(), ReplayError> {
        if !valid_jti(jti) {
            return Err(ReplayError::BadJti);
        }
        let t = now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.live.get(jti) {
            Some(u) if *u > t => return Err(ReplayError::Replayed(jti.to_string())),
            _ => {}
        }
        st.live.insert(jti.to_string(), until);
        st.lines += 1;
        let mut snapshot = None;
        if st.lines > 256 {
            st.live.retain(|_, u| *u > t);
            if st.lines > 2 * st.live.len() {
                snapshot = Some(st.live.clone());
                st.lines = st.live.len();
            }
        }
        drop(st);
        let res = self.file().and_then(|f| {
            lock(&f);
            match &snapshot {
                Some(live) => self.rewrite(&f, live),
                None => (&f).write_all(format!("{until} {jti}\n").as_bytes()).map_err(Into::into),
            }
        });
        if let Err(e) = res {
            // The in-memory record still refuses replays until the node restarts.
            tracing::error!(error = %format!("{e:#}"), "could not record an accepted jti on disk");
        }
        Ok(())
    }

    /// Forgets `jti` again (the request it came with failed, so the requester may retry it).
    pub fn forget(&self, jti: &str) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).live.remove(jti);
    }

    /// How many tokens are remembered.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).live.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Holds an exclusive lock on `f` until it is closed.
fn lock(f: &File) {
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
}

fn valid_jti(j: &str) -> bool {
    !j.is_empty() && j.len() <= MAX_JTI && j.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_are_refused_across_a_restart_and_lapsed_ones_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let g = ReplayGuard::open(dir.path()).unwrap();
        let t = now();
        g.accept("A", t + 600).unwrap();
        g.accept("old", t + 1).unwrap();
        assert_eq!(g.accept("A", t + 600), Err(ReplayError::Replayed("A".into())));
        assert_eq!(g.accept("", t + 600), Err(ReplayError::BadJti));
        assert_eq!(g.accept("a b", t + 600), Err(ReplayError::BadJti));
        g.forget("A");
        g.accept("A", t + 600).unwrap();
        drop(g);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let g = ReplayGuard::open(dir.path()).unwrap();
        assert!(matches!(g.accept("A", t + 600), Err(ReplayError::Replayed(_))));
        assert_eq!(g.len(), 1, "the lapsed entry is gone");
        let mode = std::fs::metadata(dir.path().join("accepted-jti")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn the_file_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let g = ReplayGuard::open(dir.path()).unwrap();
        for i in 0..1000 {
            // Already lapsed: only the compaction keeps the file small.
            g.accept(&format!("j{i}"), now() - 1).unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join("accepted-jti")).unwrap();
        assert!(text.lines().count() < 600, "{}", text.lines().count());
    }
}
