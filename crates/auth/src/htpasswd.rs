//! An htpasswd file of bcrypt lines (`user:$2y$...`, as `htpasswd -B` writes them), read again
//! whenever its modification time or size changes, so users are added and removed without a
//! restart. A bcrypt check costs tens of milliseconds by design; a password that passed is
//! remembered (by a SHA-256 of user and password) until the file changes, so a client that
//! sends Basic credentials with every request pays it once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use crate::AuthError;

/// At most this many remembered passwords; the set is cleared when it is full.
const REMEMBERED: usize = 10_000;

pub struct Htpasswd {
    path: PathBuf,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    stamp: Option<(SystemTime, u64)>,
    users: HashMap<String, String>,
    passed: HashSet<[u8; 32]>,
}

impl Htpasswd {
    /// Read `path`; it must exist and be readable now (later failures keep the last users).
    pub fn open(path: &Path) -> Result<Htpasswd, AuthError> {
        let h = Htpasswd {
            path: path.to_path_buf(),
            state: RwLock::new(State::default()),
        };
        let (stamp, text) = read(path)
            .map_err(|e| AuthError::Config(format!("htpasswd {}: {e}", path.display())))?;
        h.install(stamp, &text);
        Ok(h)
    }

    /// Whether `password` is `user`'s.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.refresh();
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0u8])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        let hash = {
            let s = self.state.read().unwrap_or_else(|e| e.into_inner());
            if s.passed.contains(&key) {
                return true;
            }
            match s.users.get(user) {
                Some(h) => h.clone(),
                None => return false,
            }
        };
        let ok = bcrypt::verify(password, &hash).unwrap_or(false);
        if ok {
            let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
            // The file may have changed while bcrypt ran; only remember a still current hash.
            if s.users.get(user) == Some(&hash) {
                if s.passed.len() >= REMEMBERED {
                    s.passed.clear();
                }
                s.passed.insert(key);
            }
        }
        ok
    }

    /// The users currently in the file.
    pub fn users(&self) -> Vec<String> {
        self.refresh();
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = s.users.keys().cloned().collect();
        v.sort();
        v
    }

    fn refresh(&self) {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "htpasswd file unreadable; keeping the users read last");
                return;
            }
        };
        if self.state.read().unwrap_or_else(|e| e.into_inner()).stamp == stamp {
            return;
        }
        match read(&self.path) {
            Ok((stamp, text)) => {
                self.install(stamp, &text);
                tracing::info!(path = %self.path.display(), "htpasswd file reloaded");
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "htpasswd file unreadable; keeping the users read last")
            }
        }
    }

    fn install(&self, stamp: Option<(SystemTime, u64)>, text: &str) {
        let users = parse(text, &self.path);
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        *s = State {
            stamp,
            users,
            passed: HashSet::new(),
        };
    }
}

fn read(path: &Path) -> std::io::Result<(Option<(SystemTime, u64)>, String)> {
    let m = std::fs::metadata(path)?;
    let text = std::fs::read_to_string(path)?;
    Ok((
        Some((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())),
        text,
    ))
}

/// The bcrypt lines of `text`; other hash kinds (MD5 `$apr1$`, `{SHA}`, crypt) are skipped
/// with a warning, since they are too weak to accept.
fn parse(text: &str, path: &Path) -> HashMap<String, String> {
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((user, hash))
                if hash.starts_with("$2y$")
                    || hash.starts_with("$2b$")
                    || hash.starts_with("$2a$") =>
            {
                users.insert(user.to_string(), hash.to_string());
            }
            _ => tracing::warn!(
                path = %path.display(),
                line = n + 1,
                "htpasswd line skipped: only bcrypt entries (htpasswd -B) are accepted"
            ),
        }
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(user: &str, password: &str) -> String {
        format!("{user}:{}\n", bcrypt::hash(password, 4).expect("hash"))
    }

    #[test]
    fn verifies_bcrypt_and_follows_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, line("alice", "a-secret") + "bob:{SHA}xyz\n").expect("write");
        let h = Htpasswd::open(&path).expect("open");
        assert!(h.verify("alice", "a-secret"));
        assert!(h.verify("alice", "a-secret"), "remembered");
        assert!(!h.verify("alice", "wrong"));
        assert!(!h.verify("bob", "xyz"), "non-bcrypt lines are not users");
        assert_eq!(h.users(), ["alice"]);

        std::fs::write(&path, line("carol", "c-secret") + "# a comment\n").expect("write");
        assert!(h.verify("carol", "c-secret"));
        assert!(!h.verify("alice", "a-secret"), "removed user refused");

        std::fs::remove_file(&path).expect("remove");
        assert!(
            h.verify("carol", "c-secret"),
            "a vanished file keeps the last users"
        );
    }

    #[test]
    fn a_missing_file_is_a_config_error() {
        assert!(matches!(
            Htpasswd::open(Path::new("/nonexistent/htpasswd")),
            Err(AuthError::Config(_))
        ));
    }
}
