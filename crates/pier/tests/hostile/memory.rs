//! Hostile tier: memory.
