//! The agent's compute drivers. The trait and the side-effect-free `sim`
//! driver are the site core's ([`vcfed_node_core::driver`]); the drivers
//! that do I/O live here.
//!
//! - [`netns`]: a node is a network namespace with a veth on the cluster's
//!   bridge; the frontend runs dnsmasq, compute nodes run busybox's udhcpc
//!   and tftp. For demos and CI.

pub use vcfed_node_core::driver::*;

pub mod netns;
