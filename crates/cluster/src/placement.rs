//! Rendezvous (highest random weight) placement of keys over members.
