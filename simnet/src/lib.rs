//! Deterministic simulation of a whole vcfed federation in one process.
//!
//! simnet drives the same sans-IO cores that production runs (registry,
//! reservations, cluster lifecycle) on a virtual clock over a seeded simulated
//! network with faults: loss, duplication, reordering, partitions, crashes,
//! clock skew. The same seed always gives the same trace.
//!
//! # Layering
//!
//! simnet performs no I/O of its own and must not depend on tokio, libp2p,
//! netlink or a wall clock; every source of randomness derives from the seed.
