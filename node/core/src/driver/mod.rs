//! Compute drivers: how a site turns a cluster's reserved slots into
//! running nodes.
//!
//! A driver boots the cluster's frontend (at the master only) and compute
//! nodes on the cluster's local bridge, and reports each node's state. The
//! frontend serves DHCP and TFTP; compute nodes network-boot from it across
//! the overlay and report `installed` once they fetched their install file.
//!
//! The trait lives in the site core so that the one runner step sequence
//! ([`crate::runner`]) drives every driver; the implementations that do I/O
//! live in the agent:
//!
//! - `netns` (agent): a node is a network namespace with a veth on the
//!   cluster's bridge; the frontend runs dnsmasq, compute nodes run busybox's
//!   udhcpc and tftp. For demos and CI.
//! - [`sim`]: no side effects; nodes install at once. For simnet and for
//!   trying the lifecycle without root.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub mod sim;

/// One node to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Cluster id.
    pub cluster: String,
    /// Node number within the cluster at this site; the frontend is 0.
    pub index: u32,
    /// Whether this is the cluster's frontend.
    pub frontend: bool,
    /// The site-side bridge of the cluster's segment.
    pub bridge: String,
    /// The cluster's network (a /24); the frontend takes `.1`.
    pub subnet: Ipv4Addr,
    /// MAC address of the node's interface (stable, so leases are too).
    pub mac: [u8; 6],
    /// The cluster's VLAN id at this site (a multi-host site carries the
    /// cluster network to its other hosts on this VLAN).
    pub vlan: u16,
    /// The per-node shape the cluster asked for (`None`: unknown; a
    /// driver then uses its own default size).
    pub shape: Option<vcfed_storage::NodeShape>,
}

/// Where a node stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum NodeState {
    /// Created, booting.
    Booting,
    /// The frontend is serving DHCP and TFTP.
    Serving {
        /// Its address.
        ip: Ipv4Addr,
    },
    /// A compute node got a DHCP lease.
    Leased {
        /// Its address.
        ip: Ipv4Addr,
        /// The DHCP server that gave it.
        server: Ipv4Addr,
    },
    /// A compute node is writing its disk (the built-in installer).
    Installing {
        /// Its address.
        ip: Ipv4Addr,
        /// The server it installs from.
        server: Ipv4Addr,
        /// Bytes of the OS fetched and written so far.
        bytes: u64,
    },
    /// A compute node fetched its install file (or wrote its disk).
    Installed {
        /// Its address.
        ip: Ipv4Addr,
        /// The server it installed from.
        server: Ipv4Addr,
    },
    /// A compute node runs from its own disk.
    Up {
        /// Its address.
        ip: Ipv4Addr,
    },
    /// The node failed.
    Failed {
        /// Why.
        reason: String,
    },
}

impl NodeState {
    /// The state with control characters removed from its text, for a
    /// state that came from another site and ends up on a terminal.
    pub fn sanitized(self) -> NodeState {
        match self {
            NodeState::Failed { reason } => NodeState::Failed {
                reason: reason.chars().filter(|c| !c.is_control()).collect(),
            },
            other => other,
        }
    }
}

/// A node's index and state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node number (0 is the frontend).
    pub index: u32,
    /// Whether it is the frontend.
    pub frontend: bool,
    /// Its state.
    pub state: NodeState,
}

/// Errors of a driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A command the driver runs failed.
    #[error("{command}: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// What went wrong.
        detail: String,
    },
    /// A file of the driver's state could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Boots and stops a cluster's nodes at one site.
pub trait ComputeDriver: Send {
    /// Starts a node. Idempotent: a node that runs, or that finished its
    /// boot, is left alone; a node that failed is started again.
    fn start_node(&mut self, spec: &NodeSpec) -> Result<(), DriverError>;
    /// The state of every node of `cluster` at this site.
    fn poll(&mut self, cluster: &str) -> Vec<NodeStatus>;
    /// Stops every node of `cluster` and removes what the driver created.
    fn stop_cluster(&mut self, cluster: &str) -> Result<(), DriverError>;
    /// Removes what an earlier process of this site left behind for
    /// clusters not in `keep` (by cluster id). Called once at start.
    fn cleanup_stale(
        &mut self,
        keep: &std::collections::BTreeSet<String>,
    ) -> Result<(), DriverError>;
    /// The agent stops while `cluster` still runs; the next process
    /// resumes it (`start_node` again). Stops what cannot outlive this
    /// process and leaves the rest for the next one to adopt. By default
    /// everything is stopped.
    fn suspend_cluster(&mut self, cluster: &str) -> Result<(), DriverError> {
        self.stop_cluster(cluster)
    }
}

impl<T: ComputeDriver + ?Sized> ComputeDriver for Box<T> {
    fn start_node(&mut self, spec: &NodeSpec) -> Result<(), DriverError> {
        (**self).start_node(spec)
    }

    fn poll(&mut self, cluster: &str) -> Vec<NodeStatus> {
        (**self).poll(cluster)
    }

    fn stop_cluster(&mut self, cluster: &str) -> Result<(), DriverError> {
        (**self).stop_cluster(cluster)
    }

    fn cleanup_stale(
        &mut self,
        keep: &std::collections::BTreeSet<String>,
    ) -> Result<(), DriverError> {
        (**self).cleanup_stale(keep)
    }

    fn suspend_cluster(&mut self, cluster: &str) -> Result<(), DriverError> {
        (**self).suspend_cluster(cluster)
    }
}

/// A stable, locally administered MAC address for node `index` of `cluster`.
pub fn node_mac(cluster: &str, index: u32) -> [u8; 6] {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{cluster}/{index}").as_bytes(),
    );
    let bytes = digest.as_ref();
    // Locally administered (bit 1), unicast (bit 0 clear).
    [0x02, bytes[0], bytes[1], bytes[2], bytes[3], bytes[4]]
}

/// A short stable tag for names that must stay within 15 bytes.
pub fn short_tag(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_unicast_and_local() {
        let mac = node_mac("c-1", 3);
        assert_eq!(mac, node_mac("c-1", 3));
        assert_ne!(mac, node_mac("c-1", 4));
        assert_eq!(mac[0] & 0b11, 0b10);
        assert_eq!(short_tag("c-1").len(), 8);
    }
}
