//! The test network: a Linux bridge in the root namespace with an address of its own, so the
//! test process reaches every host, and one network namespace per host (the upstream registry,
//! each node), joined to the bridge by a veth pair. Also the network faults the tier injects: a
//! partition (iptables DROP inside a host's namespace, both directions) and its heal, and a rate
//! limit on a host's link.
//!
//! Every name carries the test process's pid (`pc<pid>x<k>…`), and the subnet is chosen from it,
//! so test processes running side by side never clash. Whatever a dead test process left behind
//! (namespaces with their processes, links, forwarding rules) is removed when the next one
//! starts. [`Net`] undoes everything it made when dropped, during a panic too.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The interface name every host sees its link by.
const LINK: &str = "eth0";

/// One host of the test network.
#[derive(Debug, Clone)]
pub struct Host {
    /// The role it plays: `up` for the upstream, `n1`… for nodes.
    pub role: String,
    /// The network namespace, as `ip netns` names it.
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The veth end in the root namespace, enslaved to the bridge.
    veth: String,
}

/// The bridge, the namespaces and their links; torn down on drop.
pub struct Net {
    tag: String,
    bridge: String,
    gateway: Ipv4Addr,
    hosts: Vec<Host>,
    /// Whether a FORWARD rule for the bridge was added in the root namespace.
    forward_rule: bool,
}

/// Tells apart the networks of one test process.
static NETS: AtomicU32 = AtomicU32::new(0);

/// Run a command; panic with its output unless it succeeds.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`{}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command whose failure does not matter (teardown of what may already be gone).
fn run_quietly(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The pid in a name made by [`Net`] (`pc<pid>x…`), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("pc")?;
    let (pid, _) = rest.split_once('x')?;
    pid.parse().ok()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove the namespaces, links and forwarding rules of test processes that are gone. The
/// processes still running in such a namespace (a pier or registry whose test was killed
/// before it could clean up) are killed first: nothing else runs there.
pub fn remove_stale() {
    let namespaces = run(&["ip", "netns", "list"]);
    for ns in namespaces
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if owner_pid(ns).is_some_and(|pid| !alive(pid)) {
            let pids = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for pid in pids.split_whitespace() {
                run_quietly(&["kill", "-KILL", pid]);
            }
            eprintln!("removing the stale network namespace {ns}");
            run_quietly(&["ip", "netns", "delete", ns]);
        }
    }
    let links = run(&["ip", "-o", "link", "show"]);
    for link in links.lines().filter_map(|l| l.split(": ").nth(1)) {
        // A veth end shows as `name@peer`.
        let name = link.split('@').next().unwrap_or(link);
        if owner_pid(name).is_some_and(|pid| !alive(pid)) {
            run_quietly(&["ip", "link", "delete", name]);
        }
    }
    if let Ok(out) = Command::new("iptables")
        .args(["-w", "-S", "FORWARD"])
        .output()
    {
        for rule in String::from_utf8_lossy(&out.stdout).lines() {
            let stale = rule
                .split_whitespace()
                .any(|w| owner_pid(w).is_some_and(|pid| !alive(pid)));
            if let (true, Some(spec)) = (stale, rule.strip_prefix("-A FORWARD ")) {
                let mut args = vec!["iptables", "-w", "-D", "FORWARD"];
                args.extend(spec.split_whitespace());
                run_quietly(&args);
            }
        }
    }
}

/// Whether some address or route of this machine is already in 10.a.b.0/24.
fn subnet_in_use(a: u32, b: u32) -> bool {
    let prefix = format!("10.{a}.{b}.");
    let addrs = run(&["ip", "-4", "-o", "addr", "show"]);
    let routes = run(&["ip", "-4", "route", "show", "table", "all"]);
    addrs.contains(&prefix) || routes.contains(&prefix)
}

impl Net {
    /// A bridge and one namespace per role (`up`, `n1`, …), each with `lo` up and a veth link
    /// to the bridge. The upstream gets `.2`, node `nK` gets `.(10+K)`, the bridge `.1`.
    pub fn new(roles: &[&str]) -> Net {
        remove_stale();
        let pid = std::process::id();
        let k = NETS.fetch_add(1, Ordering::Relaxed) % 10;
        let tag = format!("pc{pid}x{k}");
        let mut slot = (pid * 10 + k) % 16384;
        let (a, b) = loop {
            let (a, b) = (64 + slot / 256, slot % 256);
            if !subnet_in_use(a, b) {
                break (a, b);
            }
            slot = (slot + 1) % 16384;
        };
        let base = |last: u8| Ipv4Addr::new(10, a as u8, b as u8, last);
        let mut net = Net {
            bridge: format!("{tag}b"),
            tag,
            gateway: base(1),
            hosts: Vec::new(),
            forward_rule: false,
        };
        // Made one piece at a time, each recorded at once, so a failure half-way is undone by
        // the drop.
        run(&["ip", "link", "add", &net.bridge, "type", "bridge"]);
        let gateway = format!("{}/24", net.gateway);
        run(&["ip", "addr", "add", &gateway, "dev", &net.bridge]);
        run(&["ip", "link", "set", &net.bridge, "up"]);
        // With br_netfilter loaded, bridged frames pass the root namespace's FORWARD chain, whose
        // policy may be DROP (Docker sets it so): let this bridge's traffic through.
        net.forward_rule = run_quietly(&[
            "iptables",
            "-w",
            "-I",
            "FORWARD",
            "-i",
            &net.bridge,
            "-o",
            &net.bridge,
            "-j",
            "ACCEPT",
        ]);
        for role in roles {
            let last = match *role {
                "up" => 2,
                node => {
                    let n: u8 = node
                        .strip_prefix('n')
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| panic!("unknown role {node}"));
                    10 + n
                }
            };
            let host = Host {
                role: role.to_string(),
                ns: format!("{}-{role}", net.tag),
                ip: base(last),
                veth: format!("{}{role}", net.tag),
            };
            run(&["ip", "netns", "add", &host.ns]);
            net.hosts.push(host.clone());
            let ns = host.ns.as_str();
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&[
                "ip", "link", "add", &host.veth, "type", "veth", "peer", "name", LINK, "netns", ns,
            ]);
            run(&["ip", "link", "set", &host.veth, "master", &net.bridge]);
            run(&["ip", "link", "set", &host.veth, "up"]);
            let addr = format!("{}/24", host.ip);
            run(&["ip", "-n", ns, "addr", "add", &addr, "dev", LINK]);
            run(&["ip", "-n", ns, "link", "set", LINK, "up"]);
            // `PIER_NET_SYSCTL=key=value,…`: TCP settings of every host (a benchmark's knob).
            for setting in std::env::var("PIER_NET_SYSCTL")
                .unwrap_or_default()
                .split(',')
            {
                if !setting.trim().is_empty() {
                    run(&[
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "sysctl",
                        "-q",
                        "-w",
                        setting.trim(),
                    ]);
                }
            }
        }
        net
    }

    /// Bytes that have crossed `role`'s link into its namespace so far (what the veth end in
    /// the root namespace sent), read from sysfs without entering the namespace.
    pub fn received_bytes(&self, role: &str) -> u64 {
        let path = format!(
            "/sys/class/net/{}/statistics/tx_bytes",
            self.host(role).veth
        );
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn host(&self, role: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.role == role)
            .unwrap_or_else(|| panic!("no host {role} in the test network"))
    }

    /// `args` run inside `role`'s namespace; panics with the output unless it succeeds.
    pub fn exec(&self, role: &str, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", self.host(role).ns.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Whether `args` succeed inside `role`'s namespace.
    pub fn exec_ok(&self, role: &str, args: &[&str]) -> bool {
        let mut all = vec!["ip", "netns", "exec", self.host(role).ns.as_str()];
        all.extend_from_slice(args);
        run_quietly(&all)
    }

    /// Insert (`-I`) or delete (`-D`) the rules that drop everything but `lo` in `role`.
    /// Whether a TCP connection from inside `role`'s namespace to `addr` opens within 2 s.
    pub fn can_connect(&self, role: &str, addr: std::net::SocketAddr) -> bool {
        let script = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
        self.exec_ok(role, &["timeout", "2", "bash", "-c", &script])
    }

    /// Every namespace of this network.
    pub fn namespaces(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.ns.clone()).collect()
    }

    fn partition_rules(&self, role: &str, op: &str) {
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            self.exec(
                role,
                &["iptables", "-w", op, chain, "!", dir, "lo", "-j", "DROP"],
            );
        }
    }

    /// Cut `role` off: every packet in or out of its namespace, except on `lo`, is dropped.
    pub fn partition(&self, role: &str) {
        self.partition_rules(role, "-I");
    }

    /// Undo [`Net::partition`].
    pub fn heal(&self, role: &str) {
        self.partition_rules(role, "-D");
    }

    /// Limit what `role` sends to `mbit` megabits per second (a token bucket on its link).
    pub fn limit_rate(&self, role: &str, mbit: u32) {
        let tbf = token_bucket(LINK, mbit);
        self.exec(role, &tbf.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// Limit `role`'s link to `mbit` megabits per second both ways: what it sends (its end of
    /// the veth) and what it receives (the bridge's end), as a real NIC of that speed would.
    pub fn limit_link(&self, role: &str, mbit: u32) {
        self.limit_rate(role, mbit);
        let tbf = token_bucket(&self.host(role).veth, mbit);
        run(&tbf.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

/// The `tc` command that shapes what `dev` sends to `mbit` megabits per second.
fn token_bucket(dev: &str, mbit: u32) -> Vec<String> {
    let (rate, latency) = (format!("{mbit}mbit"), queue());
    [
        "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", "256kb",
        "latency", &latency,
    ]
    .map(String::from)
    .to_vec()
}

/// How long a shaped link's FIFO may queue: `PIER_NET_QUEUE_MS` milliseconds, 100 unless set
/// (a deep buffer, where a report or a refusal waits behind every piece queued on the link;
/// a switch port's shallow buffer is a few).
fn queue() -> String {
    let ms = std::env::var("PIER_NET_QUEUE_MS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(100);
    format!("{ms}ms")
}

impl Net {
    /// Undo [`Net::limit_link`] (and [`Net::limit_rate`]).
    pub fn unlimit_link(&self, role: &str) {
        let _ = self.exec_ok(role, &["tc", "qdisc", "del", "dev", LINK, "root"]);
        let host = self.host(role);
        run_quietly(&["tc", "qdisc", "del", "dev", &host.veth, "root"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in &self.hosts {
            // Deleting one end of a veth pair deletes both.
            run_quietly(&["ip", "link", "delete", &host.veth]);
            run_quietly(&["ip", "netns", "delete", &host.ns]);
        }
        run_quietly(&["ip", "link", "delete", &self.bridge]);
        if self.forward_rule {
            run_quietly(&[
                "iptables",
                "-w",
                "-D",
                "FORWARD",
                "-i",
                &self.bridge,
                "-o",
                &self.bridge,
                "-j",
                "ACCEPT",
            ]);
        }
    }
}
