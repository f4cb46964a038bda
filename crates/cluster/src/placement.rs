//! Rendezvous (highest random weight) placement of keys over members.
//!
//! Every node computes the same answer from the same member list, with no coordination: each
//! member gets a score for the key, a 64-bit hash of (key, member name), and the members are
//! preferred in descending score. Adding or removing one member moves only the keys it wins
//! or held, about 1/N of them. The score uses the member's name alone, not its generation or
//! address, so a node that restarts or moves keeps its keys.
//!
//! Zones spread replicas: the best-scored member of each zone comes first (zones in the order
//! of their best member's score), then everyone else by score. With one zone this is plain
//! score order.

use sha2::{Digest as _, Sha256};

use crate::NodeId;

/// The `r` owners of `key` among `members`, first owner first. With several zones the owners
/// are spread across zones before any zone gets a second one. With `r` at least the number of
/// members, every member is returned.
pub fn owners<'a>(key: &[u8], members: &'a [NodeId], r: usize) -> Vec<&'a NodeId> {
    let mut out = ranked(key, members);
    out.truncate(r);
    out
}

/// Every member ranked by preference for `key`; [`owners`] is its first `r`. Readers walk
/// this list past the owners when those fail.
pub fn ranked<'a>(key: &[u8], members: &'a [NodeId]) -> Vec<&'a NodeId> {
    let k = key_hash(key);
    let mut scored: Vec<(u64, &NodeId)> = members
        .iter()
        .map(|m| (score(k, name_hash(&m.name)), m))
        .collect();
    // Equal scores need two members with the same name (or a 2^-64 accident); the tie is
    // broken by the identity so the order stays the same on every node.
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));

    let mut zones: Vec<Option<&str>> = Vec::new();
    let mut leaders = Vec::with_capacity(scored.len());
    let mut rest = Vec::with_capacity(scored.len());
    for (_, m) in scored {
        // No zone and an empty zone are the same zone. Kept as `None` rather than `""`,
        // since comparing empty strings costs a library call per member.
        let zone = m.zone.as_deref().filter(|z| !z.is_empty());
        if zones.contains(&zone) {
            rest.push(m);
        } else {
            zones.push(zone);
            leaders.push(m);
        }
    }
    leaders.extend(rest);
    leaders
}

/// The key's part of every score: SHA-256 once per lookup, since keys are long and may share
/// long prefixes (`blob:sha256:…`).
fn key_hash(key: &[u8]) -> u64 {
    let d = Sha256::digest(key);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// A member name's part of its score. FNV-1a is cheap enough to run for every member on every
/// lookup; the finaliser spreads names that differ in one character over all 64 bits.
fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The score of one member for one key. Both inputs are already well spread, so mixing their
/// XOR makes each member's score for a key look independent of every other member's.
fn score(key: u64, name: u64) -> u64 {
    mix(key ^ name)
}

/// The 64-bit finaliser of MurmurHash3: a bijection in which every input bit flips about half
/// of the output bits.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::net::SocketAddr;

    use super::*;

    fn node(name: &str, zone: Option<&str>) -> NodeId {
        NodeId {
            name: name.to_string(),
            generation: 1,
            addr: SocketAddr::from(([127, 0, 0, 1], 5001)),
            zone: zone.map(str::to_string),
        }
    }

    fn nodes(n: usize) -> Vec<NodeId> {
        (0..n).map(|i| node(&format!("node-{i}"), None)).collect()
    }

    /// Keys shaped like the blob keys placement will see, spread as digests are.
    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let d = Sha256::digest((i as u64).to_le_bytes());
                format!("blob:sha256:{}", hex::encode(d)).into_bytes()
            })
            .collect()
    }

    fn names(v: &[&NodeId]) -> Vec<String> {
        v.iter().map(|m| m.name.clone()).collect()
    }

    #[test]
    fn every_node_gets_its_share_of_keys() {
        let members = nodes(100);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let keys = keys(100_000);
        for k in &keys {
            for o in owners(k, &members, 2) {
                *counts.entry(o.name.as_str()).or_default() += 1;
            }
        }
        assert_eq!(counts.len(), 100, "every node owns some keys");
        let mean = (keys.len() * 2) as f64 / 100.0;
        for (name, n) in &counts {
            let off = (*n as f64 - mean).abs() / mean;
            assert!(
                off <= 0.10,
                "{name} owns {n} keys, {:.1} % off the mean {mean}",
                off * 100.0
            );
        }
    }

    #[test]
    fn a_join_moves_only_the_keys_the_new_node_wins() {
        let before = nodes(100);
        let mut after = before.clone();
        after.push(node("node-new", None));
        let keys = keys(50_000);
        let mut moved = 0;
        for k in &keys {
            let (b, a) = (owners(k, &before, 2), owners(k, &after, 2));
            if b[0] != a[0] {
                moved += 1;
                assert_eq!(a[0].name, "node-new", "a first owner moved to an old node");
            }
            if b != a {
                assert!(
                    a.iter().any(|o| o.name == "node-new"),
                    "owners changed without the new node among them: {:?} -> {:?}",
                    names(&b),
                    names(&a)
                );
            }
        }
        let fraction = moved as f64 / keys.len() as f64;
        assert!(moved > 0, "the new node won no key");
        assert!(
            fraction <= 1.5 / after.len() as f64,
            "{:.2} % of first owners moved",
            fraction * 100.0
        );
    }

    #[test]
    fn a_leave_moves_only_the_keys_the_leaving_node_held() {
        let before = nodes(100);
        let after: Vec<NodeId> = before
            .iter()
            .filter(|m| m.name != "node-42")
            .cloned()
            .collect();
        let keys = keys(50_000);
        let mut moved = 0;
        for k in &keys {
            let (b, a) = (owners(k, &before, 2), owners(k, &after, 2));
            if b[0] != a[0] {
                moved += 1;
                assert_eq!(b[0].name, "node-42", "a key moved off a node that stayed");
            }
            if b != a {
                assert!(
                    b.iter().any(|o| o.name == "node-42"),
                    "owners changed though the leaving node held none: {:?} -> {:?}",
                    names(&b),
                    names(&a)
                );
                // The survivor keeps its place; only the leaver's slot is refilled.
                let kept: Vec<_> = b.iter().filter(|o| o.name != "node-42").collect();
                assert!(kept.iter().all(|o| a.contains(o)));
            }
        }
        let fraction = moved as f64 / keys.len() as f64;
        assert!(moved > 0, "the leaving node held no key");
        assert!(
            fraction <= 1.5 / before.len() as f64,
            "{:.2} % of first owners moved",
            fraction * 100.0
        );
    }

    #[test]
    fn owners_are_spread_across_zones() {
        let zones = ["eu-1", "eu-2", "us-1"];
        let members: Vec<NodeId> = (0..30)
            .map(|i| node(&format!("node-{i}"), Some(zones[i % 3])))
            .collect();
        let mut first_zone: HashMap<&str, usize> = HashMap::new();
        for k in keys(10_000) {
            let o = owners(&k, &members, 2);
            assert_eq!(o.len(), 2);
            assert_ne!(o[0].zone, o[1].zone, "both owners in one zone");
            *first_zone
                .entry(o[0].zone.as_deref().unwrap_or(""))
                .or_default() += 1;
            // Three owners take one node of each zone.
            let three: HashSet<_> = owners(&k, &members, 3).iter().map(|m| &m.zone).collect();
            assert_eq!(three.len(), 3);
        }
        // No zone is favoured as first owner.
        for z in zones {
            let n = first_zone.get(z).copied().unwrap_or(0);
            assert!(
                (3_000..=3_700).contains(&n),
                "{z} is first owner of {n} keys"
            );
        }
    }

    #[test]
    fn a_member_without_a_zone_counts_as_its_own_zone() {
        // An empty zone name is no zone too.
        let members = vec![
            node("a", None),
            node("b", Some("")),
            node("c", Some("z")),
            node("d", Some("z")),
        ];
        for k in keys(1_000) {
            let o = names(&owners(&k, &members, 2));
            assert!(
                o.contains(&"a".to_string()) != o.contains(&"b".to_string()),
                "{o:?}"
            );
            assert!(
                o.contains(&"c".to_string()) != o.contains(&"d".to_string()),
                "{o:?}"
            );
        }
    }

    #[test]
    fn asking_for_more_owners_than_members_returns_them_all() {
        let members = nodes(5);
        for r in [5, 6, 100] {
            let o = owners(b"blob:x", &members, r);
            assert_eq!(o.len(), 5);
            let unique: HashSet<_> = o.iter().map(|m| &m.name).collect();
            assert_eq!(unique.len(), 5);
        }
        assert!(owners(b"blob:x", &[], 2).is_empty());
        assert!(owners(b"blob:x", &members, 0).is_empty());
    }

    #[test]
    fn the_order_depends_on_names_only() {
        let members = nodes(20);
        // Another node's view: the list in another order, with other generations and
        // addresses (restarts, moves).
        let mut other: Vec<NodeId> = members
            .iter()
            .rev()
            .map(|m| NodeId {
                generation: 99,
                addr: SocketAddr::from(([10, 0, 0, 9], 6001)),
                ..m.clone()
            })
            .collect();
        other.rotate_left(7);
        for k in keys(500) {
            let a = ranked(&k, &members);
            assert_eq!(a.len(), 20);
            assert_eq!(names(&a), names(&ranked(&k, &members)));
            assert_eq!(names(&a), names(&ranked(&k, &other)));
            assert_eq!(names(&owners(&k, &members, 3)), names(&a[..3]));
        }
    }

    #[test]
    fn ranked_lists_zone_leaders_before_the_rest() {
        let members = vec![
            node("a1", Some("a")),
            node("a2", Some("a")),
            node("b1", Some("b")),
            node("b2", Some("b")),
        ];
        for k in keys(200) {
            let r = ranked(&k, &members);
            assert_ne!(r[0].zone, r[1].zone);
            let k_hash = key_hash(&k);
            // Each part keeps score order.
            for part in [&r[..2], &r[2..]] {
                let s: Vec<u64> = part
                    .iter()
                    .map(|m| score(k_hash, name_hash(&m.name)))
                    .collect();
                assert!(s[0] > s[1]);
            }
        }
    }
}
