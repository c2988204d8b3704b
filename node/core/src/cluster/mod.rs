//! The cluster reservation core: two-phase reservation of a cluster's nodes
//! across sites, for both roles a site plays.
//!
//! - **Master** (the site that received the request): keeps what it can
//!   locally (one slot for the frontend, plus compute nodes), asks workers
//!   for the rest with `Reserve`, re-plans on `Denied` or timeout, and once
//!   holds add up to N sends `Commit` to every holder. On failure it sends
//!   `Release` to every holder; holds it never commits expire by themselves
//!   at the workers when their lease runs out, so a crashed master leaks
//!   nothing.
//! - **Worker**: admits a `Reserve` against its own ledger (authoritative;
//!   the gossip view may be stale) and answers `Held` or `Denied`. Only the
//!   master that took a hold may commit or release it: the requester stored
//!   with the reservation is the master's authenticated peer id.
//!
//! Every message carries (cluster id, attempt); the worker's ledger key is
//! `{cluster}/{attempt}`, so retries and duplicates get the same answer and
//! never book twice. The master persists every decision (cluster state and
//! each part's state) before it sends the messages that follow from it, so a
//! restarted master resumes from the ledger: it re-sends commits once commit
//! was decided, and otherwise releases everything.
//!
//! # Contract
//!
//! Sans-IO, like the registry core: the caller passes `now_ms` and the
//! site's [`Ledger`] (SQLite on disk in the agent, in memory in the
//! simulator; every call is deterministic given `now_ms`), and a
//! [`SiteDirectory`] for worker candidates. After every input the caller
//! drains [`ClusterCore::poll_transmit`] and calls
//! [`ClusterCore::handle_timeout`] at [`ClusterCore::poll_timeout`].
//! Requests are not matched to transport-level failures: a request that gets
//! no answer is retried when its deadline passes.
//!
//! # Files
//!
//! - `mod.rs`: limits, [`ClusterConfig`], [`ClusterRequest`], the
//!   [`SiteDirectory`] and the errors; [`ClusterCore`] with its `poll_*`
//!   surface, and the helpers both sides use;
//! - `messages.rs`: the wire messages, [`ClusterMsg`] and [`ReportedNode`];
//! - `master.rs`: the master side: `create`, `delete`, `resume`, the
//!   workers' answers (`handle_reply`), the timers (`handle_timeout`), and
//!   the planning and persisting of a mastered cluster;
//! - `heal.rs`: the master's watch over its settled clusters: a worker
//!   site that is gone and silent for the grace period is lost, its parts
//!   are fenced (released with a new membership epoch) and, by the
//!   cluster's [`Heal`] policy, replaced through the same reservation;
//! - `worker.rs`: the requests from other sites (`handle_request`): the
//!   worker side of `Reserve`, `Commit` and `Release`, and the node reports
//!   of running clusters (`report_nodes` at a worker, noted at the master).

mod heal;
mod master;
mod messages;
mod worker;

use std::collections::{BTreeMap, VecDeque};

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use vcfed_registry::Candidate;
use vcfed_storage::{ClusterState, GatewayRef, Ledger, LedgerError, NodeShape, Window};

use master::Master;
pub use messages::{ClusterMsg, NODE_STATE_LEN_MAX, ReportedNode};

/// Longest cluster id or name accepted, bytes.
pub const CLUSTER_ID_LEN_MAX: usize = 128;
/// Longest lease a worker grants, ms.
pub const WORKER_LEASE_MAX_MS: i64 = 10 * 60 * 1000;
/// Most nodes one request may ask for.
pub const CLUSTER_NODES_MAX: u32 = 100_000;

/// Timing and limits of the reservation protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Lease of a worker's hold, ms.
    pub lease_ms: i64,
    /// How long the master waits for an answer before retrying, ms.
    pub request_timeout_ms: i64,
    /// Sends of one request before its site is given up.
    pub tries_max: u32,
    /// How long the master may take to collect every hold, ms.
    pub reserve_deadline_ms: i64,
    /// Longest wait between two releases to an unreachable site, ms.
    pub release_backoff_max_ms: i64,
    /// Attempts at one site within one cluster.
    pub attempts_per_site_max: u32,
    /// How long a worker site must be both `gone` in the gossip view and
    /// silent (no node report, no cluster message) before its parts of a
    /// cluster this site masters are declared lost, ms.
    pub heal_grace_ms: i64,
    /// How often a cluster left short (no capacity for its replacement
    /// nodes, or a reservation that timed out) tries again, ms.
    pub heal_retry_ms: i64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            lease_ms: 30_000,
            request_timeout_ms: 2_000,
            tries_max: 3,
            reserve_deadline_ms: 60_000,
            release_backoff_max_ms: 60_000,
            attempts_per_site_max: 3,
            heal_grace_ms: 60_000,
            heal_retry_ms: 15_000,
        }
    }
}

/// What a requester asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRequest {
    /// Cluster name.
    pub name: String,
    /// Compute nodes (the frontend comes on top, at the master).
    pub nodes: u32,
    /// Per-node shape.
    pub shape: NodeShape,
    /// When the cluster runs.
    pub window: Window,
    /// Image the nodes install, if any.
    pub image: Option<String>,
    /// What the master does when a worker site of the cluster is lost.
    #[serde(default)]
    pub heal: Heal,
}

/// What a cluster's master does when a worker site holding some of its
/// nodes is lost (gone in the gossip view and silent for the grace period).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Heal {
    /// Fence the lost part and reserve as many nodes elsewhere for the rest
    /// of the window.
    #[default]
    Replace,
    /// Fence the lost part; the cluster goes on with fewer nodes.
    Shrink,
    /// Only record the loss: the part stays in the cluster (the behaviour
    /// before healing existed), and the site's nodes rejoin if it returns.
    None,
}

impl Heal {
    /// Every policy, in the order the CLI lists them.
    pub const ALL: [Heal; 3] = [Heal::Replace, Heal::Shrink, Heal::None];

    /// The policy named `name`.
    pub fn parse(name: &str) -> Option<Heal> {
        Heal::ALL.into_iter().find(|heal| heal.as_str() == name)
    }

    /// The policy's name, as in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Heal::Replace => "replace",
            Heal::Shrink => "shrink",
            Heal::None => "none",
        }
    }
}

impl std::fmt::Display for Heal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where worker candidates and site names come from (the registry's view).
pub trait SiteDirectory {
    /// Alive sites that could hold nodes of `shape` over the window, best first.
    fn candidates(&self, start_ms: i64, end_ms: i64, shape: &NodeShape) -> Vec<Candidate>;
    /// The name of a site, if known.
    fn site_name(&self, site: &PeerId) -> Option<String>;
    /// Whether any alive site has node slots that fit `shape`, free or not.
    fn offers_shape(&self, shape: &NodeShape) -> bool;
    /// Whether a site is `gone` in the view, or not in it at all.
    fn is_gone(&self, site: &PeerId) -> bool;
    /// Whether any other site is alive in the view: a site that sees none
    /// may be the one cut off, and fences nobody.
    fn any_alive(&self) -> bool;
    /// Whether the view is still filling after this site started (see
    /// [`vcfed_registry::Warming`]): a shortage it shows may only be sites
    /// not heard from yet.
    fn warming(&self, now_ms: i64) -> Option<vcfed_registry::Warming>;
}

impl SiteDirectory for vcfed_registry::Registry {
    fn candidates(&self, start_ms: i64, end_ms: i64, shape: &NodeShape) -> Vec<Candidate> {
        vcfed_registry::Registry::candidates(self, start_ms, end_ms, shape)
    }

    fn site_name(&self, site: &PeerId) -> Option<String> {
        vcfed_registry::Registry::site_name(self, site)
    }

    fn offers_shape(&self, shape: &NodeShape) -> bool {
        vcfed_registry::Registry::offers_shape(self, shape)
    }

    fn is_gone(&self, site: &PeerId) -> bool {
        self.site_state(site)
            .is_none_or(|state| state == vcfed_registry::SiteState::Gone)
    }

    fn any_alive(&self) -> bool {
        vcfed_registry::Registry::any_alive(self)
    }

    fn warming(&self, now_ms: i64) -> Option<vcfed_registry::Warming> {
        vcfed_registry::Registry::warming(self, now_ms)
    }
}

/// Why a cluster request was refused; nothing is held afterwards.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// No site of the federation offers nodes of this shape.
    #[error("no site offers nodes of {0}")]
    UnknownShape(NodeShape),
    /// The federation has too few free nodes in the window.
    #[error("{detail}")]
    Insufficient {
        /// Compute nodes the federation could give in the window.
        available: u32,
        /// What is short, in words.
        detail: String,
    },
    /// The request needs other sites, and this site has not yet heard from
    /// all the sites it remembers since it started: whether the federation
    /// has room is not known yet. Nothing is held; asking again once the
    /// view is warm gives the real answer.
    #[error(
        "this site has heard from {} of the {} sites it remembers since it started; whether the \
         federation has room is not known yet: try again in {} s",
        .warming.heard,
        .warming.expected,
        .retry_after_s
    )]
    NotReady {
        /// How far the view is.
        warming: vcfed_registry::Warming,
        /// Seconds until the warm-up ends (at least 1).
        retry_after_s: u64,
    },
    /// A cluster with this id exists already.
    #[error("cluster {0} exists already")]
    Exists(String),
    /// A live cluster of this master has the name already: names are
    /// unique among the clusters a site masters that are not `finished` or
    /// `failed`, so that a name always names one cluster.
    #[error("a live cluster named {name:?} exists: {id}")]
    NameTaken {
        /// The name asked for.
        name: String,
        /// The live cluster that has it.
        id: String,
    },
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Why a site cannot be forgotten.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    /// The site is alive in the gossip view: it would be back at once.
    #[error("the site is alive in the federation; only a site that is gone can be forgotten")]
    Alive,
    /// The site holds parts of live clusters this site masters.
    #[error("the site holds nodes of live clusters mastered here: {}", .0.join(", "))]
    HoldsParts(Vec<String>),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Errors of `delete`.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// No such cluster.
    #[error("no cluster {0}")]
    Unknown(String),
    /// This site is not the cluster's master.
    #[error("cluster {0} is mastered by {1}; delete it there")]
    NotMaster(String, String),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// The cluster core of one site. See the module docs.
pub struct ClusterCore {
    local: PeerId,
    local_name: String,
    gateway: Option<GatewayRef>,
    config: ClusterConfig,
    masters: BTreeMap<String, Master>,
    /// Settled clusters this site masters that may need healing.
    watched: BTreeMap<String, heal::Watch>,
    /// When each site last sent this one a cluster message, local ms.
    heard_ms: BTreeMap<PeerId, i64>,
    /// Since when this core runs: the silence of a site it has not heard
    /// from counts from then (a restarted master gives every site a fresh
    /// grace period).
    started_ms: Option<i64>,
    /// When the watched clusters are looked at next.
    watch_at_ms: Option<i64>,
    /// The latest time the core was given, local ms: when an event without
    /// a time (a site went gone) asks for the watch, it is due then.
    now_ms: i64,
    /// A planted fault, for simnet's check of its own checks.
    fault: Option<ClusterFault>,
    transmits: VecDeque<(PeerId, ClusterMsg)>,
}

/// A planted fault, for simnet's check of its own checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterFault {
    /// The master replaces a lost part without fencing it: the lost part
    /// stays committed (so its site stays in the segment) while new nodes
    /// are reserved for it elsewhere.
    ReplaceWithoutFence,
}

impl std::fmt::Debug for ClusterCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCore")
            .field("local_name", &self.local_name)
            .field("in_flight", &self.masters.len())
            .finish_non_exhaustive()
    }
}

impl ClusterCore {
    /// The core of the site `local_name` with peer id `local`.
    pub fn new(
        local: PeerId,
        local_name: String,
        gateway: Option<GatewayRef>,
        config: ClusterConfig,
    ) -> ClusterCore {
        ClusterCore {
            local,
            local_name,
            gateway,
            config,
            masters: BTreeMap::new(),
            watched: BTreeMap::new(),
            heard_ms: BTreeMap::new(),
            started_ms: None,
            watch_at_ms: None,
            now_ms: i64::MIN,
            fault: None,
            transmits: VecDeque::new(),
        }
    }

    /// Plants `fault` (simnet's planted bugs only).
    pub fn plant(&mut self, fault: ClusterFault) {
        self.fault = Some(fault);
    }

    /// The next instant at which [`ClusterCore::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.masters
            .values()
            .flat_map(|m| {
                let reserve = m.collecting().then_some(m.reserve_deadline_ms);
                m.parts.iter().filter_map(|p| p.deadline_ms).chain(reserve)
            })
            .chain(self.watch_at_ms)
            .min()
    }

    /// The next request to send.
    pub fn poll_transmit(&mut self) -> Option<(PeerId, ClusterMsg)> {
        self.transmits.pop_front()
    }

    /// Clusters still in flight at this master.
    pub fn in_flight(&self) -> usize {
        self.masters.len()
    }
}

fn validate(id: &str, request: &ClusterRequest, now_ms: i64) -> Result<(), CreateError> {
    let invalid = |why: String| Err(CreateError::Invalid(why));
    if id.is_empty() || id.len() > CLUSTER_ID_LEN_MAX {
        return invalid(format!(
            "cluster id must be 1 to {CLUSTER_ID_LEN_MAX} bytes"
        ));
    }
    let name_ok = !request.name.is_empty()
        && request.name.len() <= CLUSTER_ID_LEN_MAX
        && request
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !name_ok {
        return invalid(format!(
            "cluster name {:?} must be 1 to {CLUSTER_ID_LEN_MAX} letters, digits, '-', '_' or '.'",
            request.name
        ));
    }
    if request.nodes == 0 {
        return invalid("a cluster needs at least 1 node".to_owned());
    }
    if request.nodes > CLUSTER_NODES_MAX {
        return invalid(format!(
            "a cluster may have at most {CLUSTER_NODES_MAX} nodes"
        ));
    }
    if request.window.end_ms <= request.window.start_ms {
        return invalid("the duration must be positive".to_owned());
    }
    // A minute of slack for clocks and for "now" computed by the client.
    if request.window.end_ms <= now_ms || request.window.start_ms < now_ms - 60_000 {
        return invalid("the start is in the past".to_owned());
    }
    if request.shape.cores == 0 || request.shape.memory_mib == 0 || request.shape.disk_gib == 0 {
        return invalid("every dimension of the node shape must be at least 1".to_owned());
    }
    Ok(())
}

/// The overlay segment id of a cluster: derived from its (random) id, so
/// master and workers agree without a counter; never 0.
pub fn segment_for(cluster: &str) -> u32 {
    let digest = ring::digest::digest(&ring::digest::SHA256, cluster.as_bytes());
    let bytes: [u8; 4] = digest.as_ref()[..4]
        .try_into()
        .expect("a digest has four bytes");
    u32::from_be_bytes(bytes).max(1)
}

/// The state to store for a cluster. The runner owns `starting`,
/// `running` and the `finished` of a window that ended; when the
/// reservation protocol only confirms that a cluster is live (`reserved`,
/// or the run state it read earlier), a cluster that moved on keeps its
/// state. Only `requested`, `reserving` and `reserved` are overwritten so.
fn stored_state(
    ledger: &Ledger,
    id: &str,
    state: ClusterState,
) -> Result<ClusterState, LedgerError> {
    let confirms_live = matches!(
        state,
        ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
    );
    if confirms_live
        && let Some(record) = ledger.cluster(id)?
        && !matches!(
            record.state,
            ClusterState::Requested | ClusterState::Reserving | ClusterState::Reserved
        )
    {
        return Ok(record.state);
    }
    Ok(state)
}

#[cfg(test)]
mod tests;
