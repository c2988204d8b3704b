//! The sans-IO site of vcfed: everything a site decides, with no I/O but
//! the [`Ledger`](vcfed_storage::Ledger) it is handed.
//!
//! The agent (`node/agent`, the `vcfed` binary) and the simulator
//! (`simnet/`) drive this same code: the agent with tokio, libp2p, netlink
//! and the wall clock, simnet with a virtual clock and a simulated network.
//! A rule written here once is the rule both run.
//!
//! - [`cluster`]: the two-phase reservation protocol of a cluster, master
//!   and worker sides, and the node reports of running clusters;
//! - [`lifecycle`]: which clusters run here now, with which nodes and peers;
//! - [`runner`]: the one step sequence that carries the lifecycle out over
//!   a [`driver::ComputeDriver`] and a [`runner::DataPlane`];
//! - [`driver`]: the compute driver trait and the side-effect-free `sim`
//!   driver;
//! - [`federation`]: the glue between the registry's gossip core, the
//!   cluster core and the ledger (advert capacity, payload demux, timing).

pub mod cluster;
pub mod driver;
pub mod federation;
pub mod ledger;
pub mod lifecycle;
pub mod runner;
pub mod words;
