//! Hostile tier: connections.
