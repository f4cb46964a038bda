//! Rendezvous (highest random weight) placement of keys over members.
//! (Provisional: replaced by the real rendezvous implementation.)

use crate::NodeId;

fn score(key: &[u8], name: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.iter().chain([0u8].iter()).chain(name.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

pub fn ranked<'a>(key: &[u8], members: &'a [NodeId]) -> Vec<&'a NodeId> {
    let mut v: Vec<&NodeId> = members.iter().collect();
    v.sort_by_key(|n| std::cmp::Reverse(score(key, &n.name)));
    v
}

pub fn owners<'a>(key: &[u8], members: &'a [NodeId], r: usize) -> Vec<&'a NodeId> {
    ranked(key, members).into_iter().take(r).collect()
}
