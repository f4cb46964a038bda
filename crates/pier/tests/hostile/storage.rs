//! Hostile tier: storage.
