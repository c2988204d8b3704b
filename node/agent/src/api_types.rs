//! The bodies of the agent's local HTTP API (`docs/openapi.yaml`): the requests and responses
//! that the server ([`crate::api`]) and its clients ([`crate::client`], the CLI, the demo and
//! the tests) agree on.
//!
//! This is a leaf module: it uses no other module of the crate, so a client of the API does not
//! depend on the server, and the runner can fill in the network views the API shows without
//! depending on the API.

use serde::{Deserialize, Serialize};
use vcfed_storage::{ClusterRecord, NodeShape};

/// What `GET /v1/site` says about the site.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SiteInfo {
    /// Site name.
    pub name: String,
    /// Peer id of the site's agent in the federation.
    pub peer_id: String,
    /// WireGuard public key of the site's gateway, base64.
    pub tunnel_public_key: String,
    /// vcfed version of the agent.
    pub version: String,
    /// Shape of one node slot.
    pub node: NodeShape,
    /// Totals of the inventory.
    pub capacity: CapacityTotals,
    /// Node slots free right now.
    pub free_now: u32,
    /// VLAN ids the site may give to clusters, e.g. `100-199`.
    pub vlans: String,
}

/// Totals of a site's inventory.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CapacityTotals {
    /// Node slots.
    pub nodes: u32,
    /// Physical hosts (1 for the `nodes = N` shorthand).
    pub hosts: u32,
    /// CPU cores of all hosts.
    pub cores: u64,
    /// Memory of all hosts, MiB.
    pub memory_mib: u64,
    /// Disk of all hosts, GiB.
    pub disk_gib: u64,
}

/// What `GET /v1/capacity` answers: free nodes over a window, as steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CapacityReport {
    /// Window start, unix ms.
    pub from_ms: i64,
    /// Window end, unix ms.
    pub to_ms: i64,
    /// Node slots of the site.
    pub total_nodes: u32,
    /// The fewest free nodes at any instant of the window.
    pub min_free: u32,
    /// Free nodes from each step's instant until the next step.
    pub steps: Vec<CapacityStep>,
}

/// One level of free capacity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CapacityStep {
    /// From when, unix ms.
    pub at_ms: i64,
    /// The same instant, RFC 3339.
    pub at: String,
    /// Free node slots from then on.
    pub free: u32,
}

/// An instant in a request body: unix ms, or text as [`parse_instant`] reads it.
///
/// [`parse_instant`]: crate::time::parse_instant
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum InstantArg {
    /// Unix ms.
    Ms(i64),
    /// `now`, `+2h`, RFC 3339, ...
    Text(String),
}

/// Body of `POST /v1/reservations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldBody {
    /// Idempotency key: retrying with the same key never books twice.
    pub key: String,
    /// Cluster the nodes are for.
    pub cluster_id: String,
    /// Site the hold is for; this site when absent.
    #[serde(default)]
    pub requester: Option<String>,
    /// Window start.
    pub start: InstantArg,
    /// Window end (exclusive).
    pub end: InstantArg,
    /// Number of nodes.
    pub nodes: u32,
    /// Per-node shape; the site's node slot when absent.
    #[serde(default)]
    pub shape: Option<NodeShape>,
    /// Lease, seconds; [`DEFAULT_LEASE_S`](crate::api::DEFAULT_LEASE_S) when absent.
    #[serde(default)]
    pub lease_s: Option<u64>,
}

/// Body of `POST /v1/reservations/{key}/commit` and `.../release`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerBody {
    /// Site that holds the reservation; this site when absent.
    #[serde(default)]
    pub requester: Option<String>,
}

/// Error body: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `insufficient_capacity`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// For `insufficient_capacity`: the fewest nodes free in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<u32>,
}

/// A cluster as `GET /v1/clusters/{id}` shows it: the stored record, the
/// nodes at this site (and, at the master, those the workers reported),
/// and its network here while it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterDetail {
    /// The stored record.
    #[serde(flatten)]
    pub record: ClusterRecord,
    /// Node states as last reported, by node number.
    #[serde(default)]
    pub nodes: Vec<vcfed_storage::NodeRecord>,
    /// The cluster's network at this site, while it runs here.
    #[serde(default)]
    pub network: Option<NetworkView>,
}

/// Body of `POST /v1/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    /// A member's multiaddr, ending in /p2p/<peer id>.
    pub addr: String,
}

/// Body of `POST /v1/clusters`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateClusterBody {
    /// Cluster name.
    pub name: String,
    /// Compute nodes (the frontend comes on top, at this site).
    pub nodes: u32,
    /// Cores per node [default: this site's node slot].
    #[serde(default)]
    pub cores: Option<u32>,
    /// Memory per node, MiB [default: this site's node slot].
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Disk per node, GiB [default: this site's node slot].
    #[serde(default)]
    pub disk_gib: Option<u64>,
    /// Start [default: now].
    #[serde(default)]
    pub start: Option<InstantArg>,
    /// How long, e.g. `2h`.
    pub duration: String,
    /// Image the nodes install.
    #[serde(default)]
    pub image: Option<String>,
    /// What the master does when a worker site holding some of the nodes is
    /// lost: `replace` them elsewhere, `shrink` the cluster, or `none`
    /// (only record it) [default: replace].
    #[serde(default)]
    pub heal: Option<vcfed_node_core::cluster::Heal>,
}

/// A cluster's network at this site, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    /// The cluster's local VLAN id at this site (`None`: it could not
    /// start here; `error` says why).
    pub vlan: Option<u16>,
    /// The overlay segment id.
    pub segment: u32,
    /// The local bridge its nodes are on, once set up.
    pub bridge: Option<String>,
    /// Why the segment could not be set up, if it could not.
    pub error: Option<String>,
    /// The tunnels to the cluster's other sites.
    pub tunnels: Vec<TunnelView>,
}

/// A tunnel to another site of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelView {
    /// The site.
    pub site: String,
    /// Its gateway's endpoint, if it has one.
    pub endpoint: Option<String>,
    /// Whether a WireGuard session with it is up.
    pub up: bool,
}
