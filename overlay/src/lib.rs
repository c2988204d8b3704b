//! The encrypted L2 overlay of vcfed: one flat Ethernet segment per cluster,
//! spread across the gateways of the sites that share the cluster.
//!
//! This crate owns the per-segment learning switch (MAC learning with aging,
//! flooding, split horizon, bounded tables), the encapsulation of Ethernet
//! frames into the tunnel, WireGuard sessions between gateways and the
//! fragmentation that lets VMs keep an MTU of 1500 over a 1500-byte path.
//! TCP super-frames (GSO) cross whole, with their offload metadata, so
//! that the kernels at both ends do the per-segment work.
//!
//! # Layering
//!
//! The switch and tunnel logic is a sans-IO core: no tokio, sockets, TAP
//! devices, netlink or clocks inside; the caller passes `now` and frames in and
//! drains datagrams and frames out. The Linux shell (TAP, UDP, netlink) feeds
//! it.

pub mod encap;
pub mod frame;
pub mod gateway;
pub mod lane;
#[cfg(target_os = "linux")]
pub mod linux;
pub mod offload;
pub mod switch;
