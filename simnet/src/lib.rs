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
//! It has two layers:
//!
//! - **the engine** (`engine`, `clock`, `config`, `rng`, `trace`) knows
//!   nothing of vcfed's protocols: a [`Site`] is anything that takes
//!   messages, timers and inputs with a clock reading and queues messages
//!   to send;
//! - **the world** drives the site core (`vcfed-node-core`) exactly as the
//!   agent does: [`site`] is one site (the registry core, the cluster core,
//!   the core's runner with the `sim` driver, an in-memory ledger) behind
//!   [`Site`]; [`dataplane`] says which gateway tunnels are up; [`world`] is
//!   the harness (workload, membership and gateway faults, invariants after
//!   every step, convergence, the report); [`checks`] holds the lifecycle's
//!   invariants; [`verify`] is the shared cache of verified adverts.
//!
//! `vcfed simnet` is the command that runs it; docs/SIMNET.md has the
//! model, the faults, the invariants and how to replay a seed.
//!
//! # Model
//!
//! - **Time** is true time in unix ms ([`Sim::now_ms`]); each site reads its
//!   own [`SiteClock`] (offset and drift when skew is on), and timers are
//!   armed on that clock.
//! - **Events** (deliveries, timers, inputs, faults) run in order of time,
//!   then of scheduling: a bucket of events per millisecond, first in first
//!   out.
//! - **Network**: each pair of sites has a base latency drawn from the seed;
//!   each message adds jitter (so messages reorder naturally), may be lost,
//!   duplicated or held back, queues behind earlier ones on a capped uplink,
//!   and is dropped by a partition (checked at send and at delivery) or when
//!   its destination is down or restarted since the send (the connection is
//!   gone).
//! - **Faults** ([`Faults`]): partitions (random halves, one isolated site,
//!   asymmetric halves) that heal, site crashes with restart after a
//!   downtime, clock skew and drift. At [`Faults::stop_after_ms`] every
//!   partition heals, every site restarts and message faults stop.
//! - **Trace**: every event feeds a stable hash ([`Trace::hash`]); the last
//!   events are kept for failure reports.

mod clock;
mod config;
mod engine;
mod rng;
mod trace;

pub mod checks;
pub mod dataplane;
mod render;
pub mod site;
pub mod verify;
pub mod world;

#[cfg(test)]
mod tests;

pub use clock::{DRIFT_PPM_MAX, SiteClock};
pub use config::{
    CrashFaults, Faults, NetConfig, PartitionFaults, PartitionKind, SimConfig, SkewFaults,
};
pub use engine::{Ctx, KindFaults, NetStats, Payload, QUEUE_MAX, Sim, Site, SiteTraffic, Stepped};
pub use render::{minutes, render};
pub use rng::{Rng, mix64};
pub use site::PlantedBug;
pub use trace::{Trace, TraceEvent, TraceKind};
pub use world::{Fault, HEAL_BOUND_MS, HealReport, Options, Report, Violation, heal_for, run};

/// A site's index in the simulation, `0..sites`.
pub type SiteId = usize;
