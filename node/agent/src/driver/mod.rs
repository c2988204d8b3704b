//! The agent's compute drivers. The trait and the side-effect-free `sim`
//! driver are the site core's ([`vcfed_node_core::driver`]); the drivers
//! that do I/O live here.
//!
//! - [`netns`]: a node is a network namespace with a veth on the cluster's
//!   bridge; the frontend runs dnsmasq, compute nodes run busybox's udhcpc
//!   and tftp. For demos and CI.
//! - [`libvirt`]: a compute node is a virtual machine on one of the site's
//!   hypervisor hosts that network-boots from the frontend with iPXE; the
//!   frontend is the netns driver's.
//! - [`pxe`]: what the frontend serves to iPXE and what VMs print, shared
//!   by the two.

pub use vcfed_node_core::driver::*;

pub mod installer;
pub mod libvirt;
pub mod netns;
pub mod pxe;
