//! Hostile tier: routing.
