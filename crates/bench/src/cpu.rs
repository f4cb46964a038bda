//! The server's CPU time, read from `/proc` when the registry under test runs on this host.
//!
//! On a small machine the cores, not the links, set the pace of a data path, so the figure to
//! compare between registries is CPU seconds (user + system) per GiB moved, which depends far
//! less on what else the machine is doing than throughput does. `--server-pid PID` names the
//! server's process; its descendants are counted too, so nginx's master pid covers its
//! workers. A process's `utime`/`stime` already include all its threads.

use std::collections::BTreeSet;
use std::path::Path;

/// `/proc` counts CPU time in clock ticks of `USER_HZ`, which Linux fixes at 100 on every
/// architecture it exports to user space (`sysconf(_SC_CLK_TCK)` answers the same).
const TICKS_PER_SECOND: f64 = 100.0;

/// The processes whose CPU time a run counts: the given pids and, at each reading, every live
/// descendant of them.
#[derive(Debug, Clone)]
pub struct ServerCpu {
    roots: Vec<u32>,
}

/// One reading of a process's `/proc/PID/stat`: its parent and its CPU time in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatLine {
    pub ppid: u32,
    pub ticks: u64,
}

impl ServerCpu {
    /// `None` when no pid was given. Fails when a given pid cannot be read, so a typo does not
    /// silently report nothing.
    pub fn new(roots: &[u32]) -> Result<Option<ServerCpu>, String> {
        if roots.is_empty() {
            return Ok(None);
        }
        for pid in roots {
            read_stat(Path::new("/proc"), *pid)
                .ok_or_else(|| format!("--server-pid {pid}: no such process to read in /proc"))?;
        }
        Ok(Some(ServerCpu {
            roots: roots.to_vec(),
        }))
    }

    /// CPU seconds, user and system, the processes have used so far. A descendant that exited
    /// between two readings takes its time with it (its parent's `cutime` only counts children
    /// it waited for), so long-lived servers are what this measures well.
    pub fn seconds(&self) -> f64 {
        total_ticks(Path::new("/proc"), &self.roots) as f64 / TICKS_PER_SECOND
    }
}

/// The ticks of `roots` and every descendant of theirs listed under `proc`.
fn total_ticks(proc: &Path, roots: &[u32]) -> u64 {
    let mut all: Vec<(u32, StatLine)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(proc) {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(stat) = read_stat(proc, pid) {
                all.push((pid, stat));
            }
        }
    }
    let mut counted: BTreeSet<u32> = roots.iter().copied().collect();
    // Parents may be listed after their children, so repeat until nothing new joins.
    loop {
        let before = counted.len();
        for (pid, stat) in &all {
            if counted.contains(&stat.ppid) {
                counted.insert(*pid);
            }
        }
        if counted.len() == before {
            break;
        }
    }
    all.iter()
        .filter(|(pid, _)| counted.contains(pid))
        .map(|(_, stat)| stat.ticks)
        .sum()
}

fn read_stat(proc: &Path, pid: u32) -> Option<StatLine> {
    let text = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    parse_stat(&text)
}

/// Parse one `/proc/PID/stat` line. The second field, the command name in parentheses, may
/// itself hold spaces and parentheses, so the fields are counted from its last `)`.
pub fn parse_stat(line: &str) -> Option<StatLine> {
    let rest = &line[line.rfind(')')? + 1..];
    // After the name: state(3) ppid(4) pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt utime(14) stime(15).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(StatLine {
        ppid,
        ticks: utime + stime,
    })
}

/// CPU seconds per GiB (2^30 bytes) moved; `None` when nothing moved.
pub fn per_gib(cpu_seconds: f64, bytes: u64) -> Option<f64> {
    (bytes > 0).then(|| cpu_seconds / (bytes as f64 / (1u64 << 30) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let line = "4242 (tokio (rt) worker) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 1000 0 0";
        assert_eq!(
            parse_stat(line),
            Some(StatLine {
                ppid: 17,
                ticks: 325
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S"), None);
    }

    #[test]
    fn descendants_are_counted_and_strangers_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let write = |pid: u32, ppid: u32, utime: u64, stime: u64| {
            let d = dir.path().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("stat"),
                format!("{pid} (n) S {ppid} 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 1 0 0"),
            )
            .unwrap();
        };
        write(10, 1, 100, 50); // the master
        write(11, 10, 300, 100); // a worker
        write(12, 11, 5, 5); // a worker's child
        write(20, 1, 999, 999); // another program
        assert_eq!(total_ticks(dir.path(), &[10]), 560);
        assert_eq!(total_ticks(dir.path(), &[11]), 410);
        assert_eq!(total_ticks(dir.path(), &[10, 20]), 560 + 1998);
    }

    #[test]
    fn per_gib_is_seconds_over_gibibytes() {
        assert_eq!(per_gib(0.5, 1 << 30), Some(0.5));
        assert_eq!(per_gib(1.0, 1 << 29), Some(2.0));
        assert_eq!(per_gib(1.0, 0), None);
    }

    #[test]
    fn our_own_process_can_be_read() {
        let cpu = ServerCpu::new(&[std::process::id()]).unwrap().unwrap();
        // Burn a little CPU so the reading cannot be zero for the wrong reason.
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu.seconds() > 0.0);
        assert!(ServerCpu::new(&[u32::MAX]).is_err());
        assert!(ServerCpu::new(&[]).unwrap().is_none());
    }
}
