//! Failed-login limits: how many wrong passwords an address, and a user name, may send within
//! a window before further password attempts from it (or for it) are refused without being
//! checked. The caller owns the clock and passes the time in, so a window is tested without
//! waiting for it.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys (addresses, user names) remembered per table before stale ones are dropped.
const MAX_KEYS: usize = 100_000;

/// The limits; a limit of 0 turns that side off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failed logins one client address may make within `window`.
    pub per_ip: u32,
    /// Failed logins for one user name (from anywhere) within `window`.
    pub per_user: u32,
    pub window: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            per_ip: 10,
            per_user: 20,
            window: Duration::from_secs(300),
        }
    }
}

/// Which side of the limit refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitedBy {
    Address,
    User,
}

/// A refused attempt: by whom, and how long until the oldest failure counted leaves the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub by: LimitedBy,
    pub wait: Duration,
}

/// The failures seen, per address and per user name.
pub struct FailedLogins {
    limits: LoginLimits,
    by_ip: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
    by_user: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl FailedLogins {
    pub fn new(limits: LoginLimits) -> FailedLogins {
        FailedLogins {
            limits,
            by_ip: Mutex::new(HashMap::new()),
            by_user: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> LoginLimits {
        self.limits
    }

    /// Whether a password for `user` from `ip` may be checked at `now`.
    pub fn check(&self, ip: IpAddr, user: &str, now: Instant) -> Result<(), Limited> {
        let window = self.limits.window;
        if let Some(wait) = over(&self.by_ip, &ip, self.limits.per_ip, window, now) {
            return Err(Limited {
                by: LimitedBy::Address,
                wait,
            });
        }
        if let Some(wait) = over(&self.by_user, user, self.limits.per_user, window, now) {
            return Err(Limited {
                by: LimitedBy::User,
                wait,
            });
        }
        Ok(())
    }

    /// A password for `user` from `ip` was wrong (or the user unknown) at `now`.
    pub fn failed(&self, ip: IpAddr, user: &str, now: Instant) {
        let window = self.limits.window;
        record(&self.by_ip, ip, self.limits.per_ip, window, now);
        record(
            &self.by_user,
            user.to_string(),
            self.limits.per_user,
            window,
            now,
        );
    }
}

/// `Some(wait)` when `key` had `limit` failures within `window` before `now`.
fn over<K, Q>(
    table: &Mutex<HashMap<K, VecDeque<Instant>>>,
    key: &Q,
    limit: u32,
    window: Duration,
    now: Instant,
) -> Option<Duration>
where
    K: Eq + Hash + std::borrow::Borrow<Q>,
    Q: Eq + Hash + ?Sized,
{
    if limit == 0 {
        return None;
    }
    let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
    let times = t.get_mut(key)?;
    forget_old(times, window, now);
    if times.len() < limit as usize {
        return None;
    }
    let oldest = *times.front()?;
    Some((oldest + window).saturating_duration_since(now))
}

fn record<K: Eq + Hash>(
    table: &Mutex<HashMap<K, VecDeque<Instant>>>,
    key: K,
    limit: u32,
    window: Duration,
    now: Instant,
) {
    if limit == 0 {
        return;
    }
    let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
    if t.len() >= MAX_KEYS && !t.contains_key(&key) {
        // Many addresses or names at once: drop those whose failures all left the window,
        // and if that is not enough, start over rather than grow without bound.
        t.retain(|_, times| times.back().is_some_and(|last| *last + window > now));
        if t.len() >= MAX_KEYS {
            t.clear();
        }
    }
    let times = t.entry(key).or_default();
    forget_old(times, window, now);
    times.push_back(now);
    // Only the last `limit` failures decide anything.
    while times.len() > limit as usize {
        times.pop_front();
    }
}

fn forget_old(times: &mut VecDeque<Instant>, window: Duration, now: Instant) {
    while times.front().is_some_and(|t| *t + window <= now) {
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn an_address_is_limited_after_its_failures_until_the_oldest_leaves_the_window() {
        let limits = LoginLimits {
            per_ip: 3,
            per_user: 0,
            window: Duration::from_secs(60),
        };
        let f = FailedLogins::new(limits);
        let t0 = Instant::now();
        for i in 0..3 {
            let at = t0 + Duration::from_secs(i * 10);
            assert_eq!(f.check(ip("10.0.0.1"), "alice", at), Ok(()), "attempt {i}");
            f.failed(ip("10.0.0.1"), "alice", at);
        }
        let at = t0 + Duration::from_secs(25);
        assert_eq!(
            f.check(ip("10.0.0.1"), "alice", at),
            Err(Limited {
                by: LimitedBy::Address,
                wait: Duration::from_secs(35),
            })
        );
        assert_eq!(
            f.check(ip("10.0.0.2"), "alice", at),
            Ok(()),
            "another address"
        );
        // The first failure leaves the window at t0 + 60 s: one more attempt fits.
        assert_eq!(
            f.check(ip("10.0.0.1"), "alice", t0 + Duration::from_secs(60)),
            Ok(())
        );
    }

    #[test]
    fn a_user_is_limited_wherever_the_failures_came_from() {
        let limits = LoginLimits {
            per_ip: 0,
            per_user: 2,
            window: Duration::from_secs(60),
        };
        let f = FailedLogins::new(limits);
        let t0 = Instant::now();
        f.failed(ip("10.0.0.1"), "alice", t0);
        f.failed(ip("10.0.0.2"), "alice", t0);
        assert_eq!(
            f.check(ip("10.0.0.3"), "alice", t0).map_err(|l| l.by),
            Err(LimitedBy::User)
        );
        assert_eq!(f.check(ip("10.0.0.3"), "bob", t0), Ok(()));
    }

    #[test]
    fn zero_turns_a_side_off() {
        let f = FailedLogins::new(LoginLimits {
            per_ip: 0,
            per_user: 0,
            window: Duration::from_secs(60),
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            f.failed(ip("10.0.0.1"), "alice", t0);
        }
        assert_eq!(f.check(ip("10.0.0.1"), "alice", t0), Ok(()));
    }
}
