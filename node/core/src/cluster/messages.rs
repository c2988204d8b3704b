//! The reservation protocol's messages and their wire encoding.

use serde::{Deserialize, Serialize};
use vcfed_storage::{ClusterPart, GatewayRef, NodeShape, Window};

/// The reservation protocol's messages, carried in the federation's
/// request-response channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterMsg {
    /// Master → worker: hold nodes.
    Reserve {
        /// Cluster id.
        cluster: String,
        /// Cluster name (for the worker's records).
        name: String,
        /// Attempt at this worker.
        attempt: u32,
        /// Nodes to hold.
        nodes: u32,
        /// Per-node shape.
        shape: NodeShape,
        /// When.
        window: Window,
        /// How long to hold without a commit, ms.
        lease_ms: i64,
        /// Overlay segment id of the cluster (GRE key), chosen by the master.
        segment: u32,
        /// The master's gateway, for the tunnels at start time.
        gateway: Option<GatewayRef>,
    },
    /// Master → worker: commit the hold of this attempt.
    Commit {
        /// Cluster id.
        cluster: String,
        /// Cluster name (for the worker's records).
        name: String,
        /// Compute nodes the cluster's request asked for (for the worker's
        /// records: its own part's size is in `parts`).
        nodes: u32,
        /// Attempt.
        attempt: u32,
        /// Overlay segment id of the cluster.
        segment: u32,
        /// Membership epoch of `parts`: a worker that stored a higher one
        /// keeps its list (this is a stale or repeated commit).
        epoch: u32,
        /// Every part of the cluster (site, nodes, first node number,
        /// gateway), so that each worker can reach every other site at
        /// start time and numbers the nodes as the master does.
        parts: Vec<ClusterPart>,
    },
    /// Master → worker: release the hold or commitment of this attempt.
    Release {
        /// Cluster id.
        cluster: String,
        /// Attempt.
        attempt: u32,
    },
    /// Worker → master: held until the lease expires.
    Held {
        /// Cluster id.
        cluster: String,
        /// Attempt.
        attempt: u32,
        /// When the hold lapses, worker's clock.
        lease_expires_at_ms: i64,
        /// The worker's gateway, for the tunnels at start time.
        gateway: Option<GatewayRef>,
    },
    /// Worker → master: not enough room.
    Denied {
        /// Cluster id.
        cluster: String,
        /// Attempt.
        attempt: u32,
        /// Fewest free nodes in the window at the worker.
        available: u32,
    },
    /// Worker → master: committed.
    Committed {
        /// Cluster id.
        cluster: String,
        /// Attempt.
        attempt: u32,
        /// The membership epoch of the list of parts the worker now holds:
        /// an answer below the master's epoch acknowledges an older list.
        epoch: u32,
    },
    /// Worker → master: nothing is held for this attempt any more.
    Released {
        /// Cluster id.
        cluster: String,
        /// Attempt.
        attempt: u32,
    },
    /// Worker → master: the states of the worker's nodes of a running
    /// cluster, so that the master shows every node.
    Nodes {
        /// Cluster id.
        cluster: String,
        /// The worker's nodes.
        nodes: Vec<ReportedNode>,
    },
    /// Master → worker: the node states are stored.
    NodesNoted {
        /// Cluster id.
        cluster: String,
    },
    /// Worker → master: the request cannot be honoured.
    Refused {
        /// Cluster id.
        cluster: String,
        /// Attempt.
        attempt: u32,
        /// Why.
        reason: String,
    },
}

/// One node of [`ClusterMsg::Nodes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedNode {
    /// Cluster-wide node number.
    pub index: u32,
    /// Whether it is the frontend.
    pub frontend: bool,
    /// Its state as the worker's driver reports it, a JSON object.
    pub state_json: String,
}

/// Longest node state accepted in a report, bytes.
pub const NODE_STATE_LEN_MAX: usize = 1024;

impl ClusterMsg {
    /// Encodes for the wire (inside the federation envelope).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding plain data into a Vec cannot fail")
    }

    /// Decodes from the wire.
    pub fn decode(bytes: &[u8]) -> Option<ClusterMsg> {
        postcard::from_bytes(bytes).ok()
    }

    /// The labels of the reservation protocol's messages (every kind but
    /// the node reports), for checks that each was exercised.
    pub const RESERVATION_LABELS: [&'static str; 8] = [
        "cluster-reserve",
        "cluster-commit",
        "cluster-release",
        "cluster-held",
        "cluster-denied",
        "cluster-committed",
        "cluster-released",
        "cluster-refused",
    ];

    /// The message's kind, as a label for counters and logs:
    /// `cluster-reserve`, `cluster-held`, ...
    pub fn label(&self) -> &'static str {
        match self {
            ClusterMsg::Reserve { .. } => "cluster-reserve",
            ClusterMsg::Commit { .. } => "cluster-commit",
            ClusterMsg::Release { .. } => "cluster-release",
            ClusterMsg::Held { .. } => "cluster-held",
            ClusterMsg::Denied { .. } => "cluster-denied",
            ClusterMsg::Committed { .. } => "cluster-committed",
            ClusterMsg::Released { .. } => "cluster-released",
            ClusterMsg::Refused { .. } => "cluster-refused",
            ClusterMsg::Nodes { .. } => "cluster-nodes",
            ClusterMsg::NodesNoted { .. } => "cluster-nodes-noted",
        }
    }

    pub(super) fn ids(&self) -> (&str, u32) {
        match self {
            ClusterMsg::Reserve {
                cluster, attempt, ..
            }
            | ClusterMsg::Commit {
                cluster, attempt, ..
            }
            | ClusterMsg::Release { cluster, attempt }
            | ClusterMsg::Held {
                cluster, attempt, ..
            }
            | ClusterMsg::Denied {
                cluster, attempt, ..
            }
            | ClusterMsg::Committed {
                cluster, attempt, ..
            }
            | ClusterMsg::Released { cluster, attempt }
            | ClusterMsg::Refused {
                cluster, attempt, ..
            } => (cluster, *attempt),
            ClusterMsg::Nodes { cluster, .. } | ClusterMsg::NodesNoted { cluster } => (cluster, 0),
        }
    }
}

pub(super) fn refused(cluster: String, attempt: u32, reason: &str) -> ClusterMsg {
    ClusterMsg::Refused {
        cluster,
        attempt,
        reason: reason.to_owned(),
    }
}
