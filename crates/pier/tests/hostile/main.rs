//! Hostile tier: the real `pier` binary under the conditions a production registry meets and a
//! happy-path test never does. A full disk during pushes and fills (a small tmpfs data
//! directory), abusive connections (slowloris, idle floods, stalled bodies), namespaces that are
//! not pier's to serve, many fills at once against a memory budget, and upstreams that send
//! endless or lying bodies, and manifests whose descriptors lie about sizes. Every case asserts what a user would notice: statuses, error bodies,
//! the bytes served, `/readyz`, and recovery without a restart.
//!
//! Cases that need root (tmpfs mounts) or real clients run only with `PIER_INTEROP=1`
//! (scripts/test.sh sets it); without it they print that they were skipped.

#[path = "../common/mod.rs"]
mod common;
#[path = "../mirror_support/mod.rs"]
mod mirror_support;

mod connections;
mod descriptors;
mod memory;
mod routing;
mod storage;
