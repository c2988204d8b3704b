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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use vcfed_registry::Candidate;
use vcfed_storage::{
    ClusterPart, ClusterRecord, ClusterState, GatewayRef, HoldOutcome, HoldRequest, Ledger,
    LedgerError, NodeShape, PartState, Window,
};

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
}

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
        /// Attempt.
        attempt: u32,
        /// Overlay segment id of the cluster.
        segment: u32,
        /// Every part of the cluster (site, nodes, gateway), so that each
        /// worker can reach every other site at start time.
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

    fn ids(&self) -> (&str, u32) {
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
            | ClusterMsg::Committed { cluster, attempt }
            | ClusterMsg::Released { cluster, attempt }
            | ClusterMsg::Refused {
                cluster, attempt, ..
            } => (cluster, *attempt),
            ClusterMsg::Nodes { cluster, .. } | ClusterMsg::NodesNoted { cluster } => (cluster, 0),
        }
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
    /// A cluster with this id exists already.
    #[error("cluster {0} exists already")]
    Exists(String),
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

/// One part at a remote site, as the master tracks it.
#[derive(Debug, Clone)]
struct RemotePart {
    site_name: String,
    peer: PeerId,
    /// The site's gateway, from its `Held`.
    gateway: Option<GatewayRef>,
    attempt: u32,
    nodes: u32,
    state: PartState,
    /// When to resend (or give up), for parts waiting for an answer.
    deadline_ms: Option<i64>,
    tries: u32,
    backoff_ms: i64,
}

/// A cluster this site masters and that is still in flight.
#[derive(Debug, Clone)]
struct Master {
    id: String,
    segment: u32,
    request: ClusterRequest,
    state: ClusterState,
    reason: Option<String>,
    local_nodes: u32,
    local_state: PartState,
    parts: Vec<RemotePart>,
    excluded: BTreeSet<PeerId>,
    denied_free: BTreeMap<PeerId, u32>,
    reserve_deadline_ms: i64,
}

impl Master {
    fn local_key(&self) -> String {
        format!("{}/0", self.id)
    }

    /// Nodes held or committed (or being committed) so far.
    fn covered(&self) -> u32 {
        let remote: u32 = self
            .parts
            .iter()
            .filter(|p| {
                matches!(
                    p.state,
                    PartState::Held | PartState::Committing | PartState::Committed
                )
            })
            .map(|p| p.nodes)
            .sum();
        self.local_nodes + remote
    }

    fn pending(&self) -> u32 {
        self.parts
            .iter()
            .filter(|p| p.state == PartState::Reserving)
            .map(|p| p.nodes)
            .sum()
    }

    fn all_released(&self) -> bool {
        self.local_state == PartState::Released
            && self.parts.iter().all(|p| p.state == PartState::Released)
    }
}

/// The cluster core of one site. See the module docs.
pub struct ClusterCore {
    local: PeerId,
    local_name: String,
    gateway: Option<GatewayRef>,
    config: ClusterConfig,
    masters: BTreeMap<String, Master>,
    transmits: VecDeque<(PeerId, ClusterMsg)>,
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
            transmits: VecDeque::new(),
        }
    }

    /// After a restart: picks up the clusters this site masters that were
    /// in flight. Commits that were decided are sent again; reservations
    /// that were not decided are released.
    pub fn resume(&mut self, ledger: &mut Ledger, now_ms: i64) -> Result<(), LedgerError> {
        for record in ledger.clusters()? {
            if record.master_site != self.local_name || self.masters.contains_key(&record.id) {
                continue;
            }
            let Some(mut master) = master_from_record(&record, now_ms, &self.config) else {
                continue;
            };
            let decided = master.local_state == PartState::Committed
                || master
                    .parts
                    .iter()
                    .any(|p| matches!(p.state, PartState::Committing | PartState::Committed));
            match master.state {
                ClusterState::Reserving if decided => {
                    tracing::info!(cluster = %master.id, "resuming the commit of a cluster");
                    for part in &mut master.parts {
                        match part.state {
                            PartState::Held => part.state = PartState::Committing,
                            PartState::Reserving => part.state = PartState::Releasing,
                            _ => {}
                        }
                    }
                }
                ClusterState::Requested | ClusterState::Reserving => {
                    tracing::info!(cluster = %master.id, "releasing a cluster whose reservation the restart interrupted");
                    master.state = ClusterState::Failed;
                    master.reason =
                        Some("the master restarted before the reservation was complete".to_owned());
                    release_everything(&mut master);
                }
                ClusterState::Stopping | ClusterState::Failed => {}
                // A reserved (or started) cluster may still be taking nodes
                // back from a site it gave up on, which may have committed
                // them: keep releasing, or that site keeps them until the
                // window ends.
                ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
                    if master.parts.iter().any(|p| p.state == PartState::Releasing) => {}
                _ => continue,
            }
            for part in &mut master.parts {
                if matches!(
                    part.state,
                    PartState::Committing | PartState::Releasing | PartState::Reserving
                ) {
                    part.deadline_ms = Some(now_ms);
                    part.tries = 0;
                }
            }
            self.masters.insert(master.id.clone(), master);
            let id = record.id.clone();
            self.advance(ledger, None, &id, now_ms)?;
        }
        Ok(())
    }

    /// A new cluster request arriving at this site, which becomes its master.
    /// Either the request is refused and nothing is held anywhere, or the
    /// cluster is stored (`reserving`, or `reserved` if this site holds it
    /// all) and the reservation proceeds through the outputs.
    pub fn create(
        &mut self,
        ledger: &mut Ledger,
        sites: &dyn SiteDirectory,
        now_ms: i64,
        id: String,
        request: ClusterRequest,
    ) -> Result<ClusterRecord, CreateError> {
        validate(&id, &request, now_ms)?;
        if ledger.cluster(&id)?.is_some() {
            return Err(CreateError::Exists(id));
        }
        let window = request.window;
        let local_slot = ledger.inventory()?.map(|inventory| inventory.node);
        let fits_here = local_slot.is_some_and(|slot| request.shape.fits_in(&slot));
        let candidates = sites.candidates(window.start_ms, window.end_ms, &request.shape);
        let local_free = if fits_here {
            ledger.available(window, now_ms)?
        } else {
            0
        };
        let federation_free: u64 = candidates.iter().map(|c| u64::from(c.free)).sum();
        if !fits_here && !sites.offers_shape(&request.shape) {
            return Err(CreateError::UnknownShape(request.shape));
        }
        if local_free == 0 {
            let what = if fits_here {
                "no free slot"
            } else {
                "no slot of that shape"
            };
            return Err(CreateError::Insufficient {
                available: 0,
                detail: format!(
                    "this site has {what} for the cluster's frontend in the window; send the request to a site \
                     with room (the site that receives a request hosts its frontend)"
                ),
            });
        }
        let local_nodes = request.nodes.min(local_free - 1);
        let remaining = request.nodes - local_nodes;
        let available = u64::from(local_nodes) + federation_free;
        if u64::from(remaining) > federation_free {
            return Err(CreateError::Insufficient {
                available: u32::try_from(available).unwrap_or(u32::MAX),
                detail: format!(
                    "the federation has {available} nodes of {} free for the whole window ({local_nodes} here, \
                     {federation_free} at {} other sites), {} asked",
                    request.shape,
                    candidates.len(),
                    request.nodes
                ),
            });
        }

        let mut master = Master {
            id: id.clone(),
            segment: segment_for(&id),
            request: request.clone(),
            state: ClusterState::Reserving,
            reason: None,
            local_nodes,
            local_state: PartState::Held,
            parts: Vec::new(),
            excluded: BTreeSet::new(),
            denied_free: BTreeMap::new(),
            reserve_deadline_ms: now_ms + self.config.reserve_deadline_ms,
        };
        let hold = HoldRequest {
            key: master.local_key(),
            cluster_id: id.clone(),
            requester: self.local.to_string(),
            window,
            nodes: local_nodes + 1,
            shape: request.shape,
            // The master's own hold must outlive the whole reservation phase.
            lease_ms: self.config.reserve_deadline_ms + self.config.lease_ms,
        };
        match ledger.hold(&hold, now_ms)? {
            HoldOutcome::Held(_) => {}
            HoldOutcome::Denied { available } => {
                return Err(CreateError::Insufficient {
                    available: available.saturating_sub(1),
                    detail: "this site's free capacity changed while planning; try again"
                        .to_owned(),
                });
            }
        }
        let record = ClusterRecord {
            id: id.clone(),
            name: request.name.clone(),
            master_site: self.local_name.clone(),
            request: serde_json::to_value(&request).expect("a request serialises to JSON"),
            state: ClusterState::Reserving,
            reason: None,
            parts: record_parts(&master, &self.local_name, &self.local, &self.gateway),
            segment: Some(master.segment),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        };
        if let Err(e) = ledger.insert_cluster(&record) {
            let _ = ledger.release(&master.local_key(), &self.local.to_string(), now_ms);
            return Err(e.into());
        }
        tracing::info!(cluster = %id, nodes = request.nodes, local = local_nodes, "cluster accepted; this site is master");
        if remaining > 0 && !self.plan(&mut master, sites, remaining) {
            // Cannot happen: the candidates covered `remaining` above.
            master.state = ClusterState::Failed;
            master.reason = Some("no plan covers the request".to_owned());
            release_everything(&mut master);
        }
        self.masters.insert(id.clone(), master);
        self.advance(ledger, Some(sites), &id, now_ms)?;
        Ok(ledger.cluster(&id)?.expect("the cluster was stored above"))
    }

    /// Deletes a cluster this site masters: releases every part. The cluster
    /// is `stopping` until every site acknowledged (or its window passed),
    /// then `finished`.
    pub fn delete(
        &mut self,
        ledger: &mut Ledger,
        now_ms: i64,
        id: &str,
    ) -> Result<ClusterRecord, DeleteError> {
        let record = ledger
            .cluster(id)?
            .ok_or_else(|| DeleteError::Unknown(id.to_owned()))?;
        if record.master_site != self.local_name {
            return Err(DeleteError::NotMaster(id.to_owned(), record.master_site));
        }
        if record.state.is_terminal() && !self.masters.contains_key(id) {
            return Ok(record);
        }
        if !self.masters.contains_key(id) {
            let Some(master) = master_from_record(&record, now_ms, &self.config) else {
                return Ok(record);
            };
            self.masters.insert(id.to_owned(), master);
        }
        let master = self.masters.get_mut(id).expect("inserted above");
        if master.state != ClusterState::Failed {
            master.state = ClusterState::Stopping;
        }
        release_everything(master);
        tracing::info!(cluster = %id, "cluster deleted; releasing every part");
        self.advance(ledger, None, id, now_ms)?;
        Ok(ledger.cluster(id)?.expect("the cluster exists"))
    }

    /// A request from another site (this site as a worker). Returns the
    /// answer, or `None` for a message that is not a request.
    pub fn handle_request(
        &mut self,
        ledger: &mut Ledger,
        sites: &dyn SiteDirectory,
        now_ms: i64,
        from: PeerId,
        msg: ClusterMsg,
    ) -> Result<Option<ClusterMsg>, LedgerError> {
        let requester = from.to_string();
        let answer = match msg {
            ClusterMsg::Reserve {
                cluster,
                name: _,
                attempt,
                nodes,
                shape,
                window,
                lease_ms,
                segment: _,
                gateway: _,
            } => {
                if cluster.is_empty() || cluster.len() > CLUSTER_ID_LEN_MAX || nodes == 0 {
                    return Ok(Some(refused(cluster, attempt, "invalid reserve request")));
                }
                let hold = HoldRequest {
                    key: format!("{cluster}/{attempt}"),
                    cluster_id: cluster.clone(),
                    requester,
                    window,
                    nodes,
                    shape,
                    lease_ms: lease_ms.clamp(1, WORKER_LEASE_MAX_MS),
                };
                match ledger.hold(&hold, now_ms) {
                    Ok(HoldOutcome::Held(reservation)) => match reservation.lease_expires_at_ms {
                        Some(lease_expires_at_ms) => ClusterMsg::Held {
                            cluster,
                            attempt,
                            lease_expires_at_ms,
                            gateway: self.gateway.clone(),
                        },
                        // Already committed under this key: a duplicate after the commit.
                        None => ClusterMsg::Held {
                            cluster,
                            attempt,
                            lease_expires_at_ms: window.end_ms,
                            gateway: self.gateway.clone(),
                        },
                    },
                    Ok(HoldOutcome::Denied { available }) => ClusterMsg::Denied {
                        cluster,
                        attempt,
                        available,
                    },
                    Err(
                        e @ (LedgerError::Invalid(_)
                        | LedgerError::KeyConflict(_)
                        | LedgerError::WrongState { .. }),
                    ) => refused(cluster, attempt, &e.to_string()),
                    Err(e) => return Err(e),
                }
            }
            ClusterMsg::Commit {
                cluster,
                name,
                attempt,
                segment,
                parts,
            } => {
                let key = format!("{cluster}/{attempt}");
                match ledger.commit(&key, &requester, now_ms) {
                    Ok(reservation) => {
                        let master_name =
                            sites.site_name(&from).unwrap_or_else(|| from.to_string());
                        let shared = SharedCluster {
                            name: &name,
                            master: &master_name,
                            segment,
                            parts: &parts,
                        };
                        self.record_worker_part(ledger, &reservation, &shared, attempt, now_ms)?;
                        ClusterMsg::Committed { cluster, attempt }
                    }
                    Err(
                        e @ (LedgerError::UnknownReservation(_)
                        | LedgerError::NotOwner { .. }
                        | LedgerError::WrongState { .. }),
                    ) => refused(cluster, attempt, &e.to_string()),
                    Err(e) => return Err(e),
                }
            }
            ClusterMsg::Release { cluster, attempt } => {
                let key = format!("{cluster}/{attempt}");
                match ledger.release(&key, &requester, now_ms) {
                    Ok(_) | Err(LedgerError::UnknownReservation(_)) => {
                        self.finish_worker_record(ledger, &cluster, now_ms)?;
                        ClusterMsg::Released { cluster, attempt }
                    }
                    Err(e @ LedgerError::NotOwner { .. }) => {
                        refused(cluster, attempt, &e.to_string())
                    }
                    Err(e) => return Err(e),
                }
            }
            ClusterMsg::Nodes { cluster, nodes } => {
                match self.note_nodes(ledger, &from, &cluster, &nodes, now_ms)? {
                    Ok(()) => ClusterMsg::NodesNoted { cluster },
                    Err(why) => refused(cluster, 0, why),
                }
            }
            ClusterMsg::Held { .. }
            | ClusterMsg::Denied { .. }
            | ClusterMsg::Committed { .. }
            | ClusterMsg::Released { .. }
            | ClusterMsg::NodesNoted { .. }
            | ClusterMsg::Refused { .. } => return Ok(None),
        };
        Ok(Some(answer))
    }

    /// An answer from a worker to one of this site's requests.
    pub fn handle_reply(
        &mut self,
        ledger: &mut Ledger,
        sites: &dyn SiteDirectory,
        now_ms: i64,
        from: PeerId,
        msg: ClusterMsg,
    ) -> Result<(), LedgerError> {
        let (cluster, attempt) = msg.ids();
        let cluster = cluster.to_owned();
        let Some(master) = self.masters.get_mut(&cluster) else {
            // A late answer for a cluster no longer in flight: if it holds
            // something, give it back.
            if matches!(msg, ClusterMsg::Held { .. })
                && !self.is_committed_part(ledger, &cluster, &from, attempt)?
            {
                self.transmits
                    .push_back((from, ClusterMsg::Release { cluster, attempt }));
            }
            return Ok(());
        };
        let in_reservation = master.state == ClusterState::Reserving;
        let Some(part) = master
            .parts
            .iter_mut()
            .find(|p| p.peer == from && p.attempt == attempt)
        else {
            return Ok(());
        };
        match (part.state, msg) {
            (PartState::Reserving, ClusterMsg::Held { gateway, .. }) => {
                if in_reservation {
                    part.state = PartState::Held;
                    part.deadline_ms = None;
                    part.gateway = gateway;
                } else {
                    start_release(part, now_ms);
                }
            }
            (PartState::Reserving, ClusterMsg::Denied { available, .. }) => {
                tracing::info!(cluster = %cluster, site = %part.site_name, available, "hold denied");
                part.state = PartState::Released;
                part.deadline_ms = None;
                master.denied_free.insert(from, available);
            }
            (PartState::Reserving, ClusterMsg::Refused { reason, .. }) => {
                tracing::warn!(cluster = %cluster, site = %part.site_name, %reason, "reserve refused");
                part.state = PartState::Released;
                part.deadline_ms = None;
                master.excluded.insert(from);
            }
            (PartState::Committing, ClusterMsg::Committed { .. }) => {
                part.state = PartState::Committed;
                part.deadline_ms = None;
            }
            (PartState::Committing, ClusterMsg::Refused { reason, .. }) => {
                // The hold is gone (its lease ran out): re-plan its nodes.
                tracing::warn!(cluster = %cluster, site = %part.site_name, %reason, "commit refused; re-planning");
                part.state = PartState::Released;
                part.deadline_ms = None;
                master.excluded.insert(from);
            }
            (PartState::Releasing, ClusterMsg::Released { .. } | ClusterMsg::Refused { .. }) => {
                part.state = PartState::Released;
                part.deadline_ms = None;
            }
            (PartState::Releasing | PartState::Released, ClusterMsg::Held { .. }) => {
                // A reordered hold after our release: release it again.
                self.transmits.push_back((
                    from,
                    ClusterMsg::Release {
                        cluster: cluster.clone(),
                        attempt,
                    },
                ));
            }
            _ => {}
        }
        self.advance(ledger, Some(sites), &cluster, now_ms)
    }

    /// Timers: retries, give-ups, deadlines.
    pub fn handle_timeout(
        &mut self,
        ledger: &mut Ledger,
        sites: &dyn SiteDirectory,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let due: Vec<String> = self
            .masters
            .values()
            .filter(|m| {
                (m.state == ClusterState::Reserving && m.reserve_deadline_ms <= now_ms)
                    || m.parts
                        .iter()
                        .any(|p| p.deadline_ms.is_some_and(|at| at <= now_ms))
            })
            .map(|m| m.id.clone())
            .collect();
        for id in due {
            let config = self.config.clone();
            let master = self.masters.get_mut(&id).expect("listed above");
            if master.state == ClusterState::Reserving && master.reserve_deadline_ms <= now_ms {
                fail(master, "timed out collecting holds");
            }
            let window_end = master.request.window.end_ms;
            let shared = live_parts(record_parts(
                master,
                &self.local_name,
                &self.local,
                &self.gateway,
            ));
            let context = RequestContext {
                segment: master.segment,
                gateway: &self.gateway,
                parts: &shared,
            };
            for part in &mut master.parts {
                if part.deadline_ms.is_none_or(|at| at > now_ms) {
                    continue;
                }
                part.tries += 1;
                match part.state {
                    PartState::Reserving | PartState::Committing
                        if part.tries < config.tries_max =>
                    {
                        part.deadline_ms = Some(now_ms + config.request_timeout_ms);
                    }
                    PartState::Reserving | PartState::Committing => {
                        tracing::warn!(cluster = %id, site = %part.site_name, state = %part.state, "no answer; giving the site up");
                        master.excluded.insert(part.peer);
                        start_release(part, now_ms);
                    }
                    PartState::Releasing if now_ms >= window_end => {
                        // A worker keeps committed nodes until the window
                        // ends; after that there is nothing left to release.
                        part.state = PartState::Released;
                        part.deadline_ms = None;
                    }
                    PartState::Releasing => {
                        part.backoff_ms = (part.backoff_ms * 2)
                            .clamp(config.request_timeout_ms, config.release_backoff_max_ms);
                        part.deadline_ms = Some(now_ms + part.backoff_ms);
                    }
                    PartState::Held | PartState::Committed | PartState::Released => {
                        part.deadline_ms = None
                    }
                }
                if part.deadline_ms.is_some() {
                    let msg = request_for(&id, &master.request, part, &config, &context);
                    self.transmits.push_back((part.peer, msg));
                }
            }
            self.advance(ledger, Some(sites), &id, now_ms)?;
        }
        Ok(())
    }

    /// The next instant at which [`ClusterCore::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.masters
            .values()
            .flat_map(|m| {
                let reserve = (m.state == ClusterState::Reserving).then_some(m.reserve_deadline_ms);
                m.parts.iter().filter_map(|p| p.deadline_ms).chain(reserve)
            })
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

    /// Assigns `missing` nodes to candidates (fewest sites first) and sends
    /// the reserves; false if the candidates cannot cover them.
    fn plan(&mut self, master: &mut Master, sites: &dyn SiteDirectory, missing: u32) -> bool {
        let window = master.request.window;
        let mut assigned: Vec<(PeerId, String, u32)> = Vec::new();
        let mut left = missing;
        for candidate in sites.candidates(window.start_ms, window.end_ms, &master.request.shape) {
            if left == 0 {
                break;
            }
            if candidate.site == self.local || master.excluded.contains(&candidate.site) {
                continue;
            }
            let attempts = master
                .parts
                .iter()
                .filter(|p| p.peer == candidate.site)
                .count();
            if u32::try_from(attempts).unwrap_or(u32::MAX) >= self.config.attempts_per_site_max {
                continue;
            }
            let in_use: u32 = master
                .parts
                .iter()
                .filter(|p| p.peer == candidate.site && p.state != PartState::Released)
                .map(|p| p.nodes)
                .sum();
            let mut free = candidate.free;
            if let Some(denied) = master.denied_free.get(&candidate.site) {
                free = free.min(*denied);
            }
            let take = free.saturating_sub(in_use).min(left);
            if take > 0 {
                assigned.push((candidate.site, candidate.name, take));
                left -= take;
            }
        }
        if left > 0 {
            return false;
        }
        assert_eq!(
            assigned.iter().map(|(_, _, nodes)| nodes).sum::<u32>(),
            missing,
            "a plan places exactly the missing nodes"
        );
        for (peer, site_name, nodes) in assigned {
            let attempt = master
                .parts
                .iter()
                .filter(|p| p.peer == peer)
                .map(|p| p.attempt)
                .max()
                .unwrap_or(0)
                + 1;
            let part = RemotePart {
                site_name,
                peer,
                gateway: None,
                attempt,
                nodes,
                state: PartState::Reserving,
                deadline_ms: None,
                tries: 0,
                backoff_ms: 0,
            };
            master.parts.push(part);
        }
        true
    }

    /// Moves a master forward after any change, persists it, and sends what
    /// follows from the persisted state.
    fn advance(
        &mut self,
        ledger: &mut Ledger,
        sites: Option<&dyn SiteDirectory>,
        id: &str,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let Some(mut master) = self.masters.remove(id) else {
            return Ok(());
        };
        if master.state == ClusterState::Reserving {
            let nodes = master.request.nodes;
            let (covered, pending) = (master.covered(), master.pending());
            // Paired with `plan`, which asks only for what is missing, and
            // with late answers of given-up parts, which stay released: a
            // master never takes more nodes than asked (simnet checks it
            // from outside, at every step).
            assert!(
                covered + pending <= nodes,
                "cluster {id}: {covered} nodes covered and {pending} pending of {nodes}"
            );
            if covered + pending < nodes {
                let planned = sites
                    .is_some_and(|sites| self.plan(&mut master, sites, nodes - covered - pending));
                if !planned {
                    fail(
                        &mut master,
                        "not enough free nodes left in the federation after denials and timeouts",
                    );
                }
            } else if covered == nodes && pending == 0 {
                // Decide the commit: every hold moves to committing together.
                // Parts committed in an earlier round (before a site was
                // given up and replaced) are committed again: the Commit
                // carries the final list of parts, from which every site
                // numbers the nodes and builds its tunnels.
                let replanned = master.parts.iter().any(|p| p.state == PartState::Held)
                    && master.parts.iter().any(|p| p.state == PartState::Committed);
                for part in &mut master.parts {
                    let recommit = replanned && part.state == PartState::Committed;
                    if part.state == PartState::Held || recommit {
                        part.state = PartState::Committing;
                        part.deadline_ms = None;
                    }
                }
                if master.local_state == PartState::Held {
                    match ledger.commit(&master.local_key(), &self.local.to_string(), now_ms) {
                        Ok(_) => master.local_state = PartState::Committed,
                        Err(e) => {
                            tracing::warn!(cluster = %id, error = %e, "the master's own hold could not be committed");
                            master.local_state = PartState::Released;
                            fail(
                                &mut master,
                                "the master's own hold expired before the commit",
                            );
                        }
                    }
                }
                // Parts still being released (sites given up on) are not part
                // of the cluster: their release is retried on its own and must
                // not keep the cluster from being reserved (else the reserve
                // deadline would fail a cluster whose nodes are all committed).
                let all_committed = !master
                    .parts
                    .iter()
                    .any(|p| p.state == PartState::Committing);
                if master.state == ClusterState::Reserving && all_committed {
                    master.state = ClusterState::Reserved;
                    tracing::info!(cluster = %id, "cluster reserved");
                }
            }
        }
        if matches!(master.state, ClusterState::Failed | ClusterState::Stopping)
            && master.local_state != PartState::Released
        {
            ledger.release(&master.local_key(), &self.local.to_string(), now_ms)?;
            master.local_state = PartState::Released;
        }
        if master.state == ClusterState::Stopping && master.all_released() {
            master.state = ClusterState::Finished;
        }

        // Persist before sending anything that follows from this state.
        let parts = record_parts(&master, &self.local_name, &self.local, &self.gateway);
        let state = stored_state(ledger, id, master.state)?;
        ledger.update_cluster(id, state, master.reason.as_deref(), Some(&parts), now_ms)?;

        let shared = live_parts(parts);
        let context = RequestContext {
            segment: master.segment,
            gateway: &self.gateway,
            parts: &shared,
        };
        for part in &mut master.parts {
            let needs_send = matches!(
                part.state,
                PartState::Reserving | PartState::Committing | PartState::Releasing
            ) && part.deadline_ms.is_none();
            if needs_send {
                part.deadline_ms = Some(now_ms + self.config.request_timeout_ms);
                part.tries = 0;
                self.transmits.push_back((
                    part.peer,
                    request_for(id, &master.request, part, &self.config, &context),
                ));
            }
        }
        let settled = match master.state {
            ClusterState::Reserved | ClusterState::Starting | ClusterState::Running => master
                .parts
                .iter()
                .all(|p| matches!(p.state, PartState::Committed | PartState::Released)),
            ClusterState::Failed | ClusterState::Finished => master.all_released(),
            _ => false,
        };
        if settled {
            tracing::info!(cluster = %id, state = %master.state, "cluster settled");
        } else {
            self.masters.insert(id.to_owned(), master);
        }
        Ok(())
    }

    /// Whether this site committed the part (cluster, attempt) of `from` —
    /// used for late answers to clusters no longer in flight.
    fn is_committed_part(
        &self,
        ledger: &Ledger,
        cluster: &str,
        from: &PeerId,
        attempt: u32,
    ) -> Result<bool, LedgerError> {
        let Some(record) = ledger.cluster(cluster)? else {
            return Ok(false);
        };
        let from = from.to_string();
        Ok(record.parts.iter().any(|p| {
            p.peer_id.as_deref() == Some(from.as_str())
                && p.attempt == attempt
                && p.state == PartState::Committed
        }))
    }

    /// At a worker: sends the states of its nodes of `cluster` to the
    /// cluster's master. Returns whether there is a master to send to
    /// (`false` at the master itself, or for an unknown cluster).
    pub fn report_nodes(
        &mut self,
        ledger: &Ledger,
        cluster: &str,
        nodes: Vec<ReportedNode>,
    ) -> Result<bool, LedgerError> {
        let Some(record) = ledger.cluster(cluster)? else {
            return Ok(false);
        };
        if record.master_site == self.local_name {
            return Ok(false);
        }
        let master = record
            .parts
            .iter()
            .find(|p| p.frontend && p.attempt == 0)
            .and_then(|p| p.peer_id.as_deref()?.parse::<PeerId>().ok());
        let Some(master) = master else {
            return Ok(false);
        };
        self.transmits.push_back((
            master,
            ClusterMsg::Nodes {
                cluster: cluster.to_owned(),
                nodes,
            },
        ));
        Ok(true)
    }

    /// At the master: stores the node states a worker reported, if the
    /// worker holds committed nodes of the cluster and the report fits them.
    fn note_nodes(
        &mut self,
        ledger: &mut Ledger,
        from: &PeerId,
        cluster: &str,
        nodes: &[ReportedNode],
        now_ms: i64,
    ) -> Result<Result<(), &'static str>, LedgerError> {
        let Some(record) = ledger.cluster(cluster)? else {
            return Ok(Err("unknown cluster"));
        };
        if record.master_site != self.local_name {
            return Ok(Err("this site is not the cluster's master"));
        }
        if !matches!(
            record.state,
            ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
        ) {
            return Ok(Err("the cluster does not run"));
        }
        let from = from.to_string();
        let parts: Vec<&ClusterPart> = record
            .parts
            .iter()
            .filter(|p| p.peer_id.as_deref() == Some(from.as_str()))
            .filter(|p| p.state == PartState::Committed)
            .collect();
        let Some(site) = parts.first().map(|p| p.site.clone()) else {
            return Ok(Err("the sender holds no committed part of the cluster"));
        };
        // The node numbers the sender's parts have, as every site derives
        // them (see the lifecycle); the report may name only those, once.
        let Some(plan) = crate::lifecycle::plan(&record, &site, &from, now_ms) else {
            return Ok(Err("the cluster does not run at the sender now"));
        };
        let mut allowed: BTreeSet<u32> = plan
            .nodes
            .iter()
            .filter(|n| !n.frontend)
            .map(|n| n.index)
            .collect();
        let mut records = Vec::with_capacity(nodes.len());
        for node in nodes {
            if node.frontend || !allowed.remove(&node.index) {
                return Ok(Err("a node the sender does not run, or named twice"));
            }
            if node.state_json.len() > NODE_STATE_LEN_MAX {
                return Ok(Err("invalid node report"));
            }
            let Ok(parsed) = serde_json::from_str::<crate::driver::NodeState>(&node.state_json)
            else {
                return Ok(Err("invalid node report"));
            };
            let Ok(state) = serde_json::to_value(parsed.sanitized()) else {
                return Ok(Err("invalid node report"));
            };
            records.push(vcfed_storage::NodeRecord {
                site: site.clone(),
                index: node.index,
                frontend: false,
                state,
                updated_at_ms: now_ms,
            });
        }
        ledger.set_nodes(cluster, &site, &records)?;
        Ok(Ok(()))
    }

    /// A worker's own record of a cluster it committed nodes to: its own
    /// parts, and the other sites' parts with their gateways as the master
    /// sent them, so it can build the cluster's network at start time.
    fn record_worker_part(
        &mut self,
        ledger: &mut Ledger,
        reservation: &vcfed_storage::Reservation,
        shared: &SharedCluster<'_>,
        attempt: u32,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let local_id = self.local.to_string();
        let own = ClusterPart {
            site: self.local_name.clone(),
            peer_id: Some(local_id.clone()),
            attempt,
            nodes: reservation.nodes,
            frontend: false,
            state: PartState::Committed,
            reservation_key: Some(reservation.key.clone()),
            gateway: self.gateway.clone(),
        };
        let existing = ledger.cluster(&reservation.cluster_id)?;
        if existing
            .as_ref()
            .is_some_and(|record| record.master_site == self.local_name)
        {
            return Ok(());
        }
        // Other sites' parts come from the master; this site's own parts
        // (several attempts may have been committed) from its own record.
        let mut parts: Vec<ClusterPart> = shared
            .parts
            .iter()
            .filter(|p| p.peer_id.as_deref() != Some(local_id.as_str()))
            .cloned()
            .map(|mut p| {
                p.state = PartState::Committed;
                p
            })
            .collect();
        if let Some(record) = &existing {
            parts.extend(
                record
                    .parts
                    .iter()
                    .filter(|p| {
                        p.peer_id.as_deref() == Some(local_id.as_str()) && p.attempt != attempt
                    })
                    .cloned(),
            );
        }
        parts.push(own);
        match existing {
            Some(_) => {
                let state = stored_state(ledger, &reservation.cluster_id, ClusterState::Reserved)?;
                ledger.update_cluster(
                    &reservation.cluster_id,
                    state,
                    None,
                    Some(&parts),
                    now_ms,
                )?;
            }
            None => {
                let request = serde_json::json!({
                    "name": shared.name,
                    "nodes": reservation.nodes,
                    "shape": reservation.shape,
                    "window": reservation.window,
                });
                ledger.insert_cluster(&ClusterRecord {
                    id: reservation.cluster_id.clone(),
                    name: shared.name.chars().take(CLUSTER_ID_LEN_MAX).collect(),
                    master_site: shared.master.to_owned(),
                    request,
                    state: ClusterState::Reserved,
                    reason: None,
                    parts,
                    segment: Some(shared.segment),
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                })?;
            }
        }
        Ok(())
    }

    /// After a release at a worker: the cluster is finished here once none
    /// of its reservations takes capacity any more.
    fn finish_worker_record(
        &mut self,
        ledger: &mut Ledger,
        cluster: &str,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let Some(record) = ledger.cluster(cluster)? else {
            return Ok(());
        };
        if record.master_site == self.local_name || record.state.is_terminal() {
            return Ok(());
        }
        let mut parts = record.parts.clone();
        let mut active = false;
        let local_id = self.local.to_string();
        // Only this site's own parts name reservations in this ledger; the
        // others' keys belong to their sites' ledgers.
        for part in parts
            .iter_mut()
            .filter(|p| p.peer_id.as_deref() == Some(local_id.as_str()))
        {
            let key = part.reservation_key.clone().unwrap_or_default();
            let counts = ledger
                .reservation(&key)?
                .is_some_and(|r| r.counts_at(now_ms));
            part.state = if counts {
                PartState::Committed
            } else {
                PartState::Released
            };
            active |= counts;
        }
        if !active {
            ledger.update_cluster(cluster, ClusterState::Finished, None, Some(&parts), now_ms)?;
        }
        Ok(())
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

fn refused(cluster: String, attempt: u32, reason: &str) -> ClusterMsg {
    ClusterMsg::Refused {
        cluster,
        attempt,
        reason: reason.to_owned(),
    }
}

fn fail(master: &mut Master, reason: &str) {
    if master.state.is_terminal() || master.state == ClusterState::Stopping {
        return;
    }
    tracing::warn!(cluster = %master.id, %reason, "cluster failed; releasing every part");
    master.state = ClusterState::Failed;
    master.reason = Some(reason.to_owned());
    release_everything(master);
}

/// Moves every part that may hold something to `releasing`.
fn release_everything(master: &mut Master) {
    for part in &mut master.parts {
        if part.state != PartState::Released && part.state != PartState::Releasing {
            part.state = PartState::Releasing;
            part.deadline_ms = None;
            part.tries = 0;
        }
    }
}

fn start_release(part: &mut RemotePart, _now_ms: i64) {
    part.state = PartState::Releasing;
    part.deadline_ms = None;
    part.tries = 0;
    part.backoff_ms = 0;
}

/// What a worker learns of a cluster with the commit.
struct SharedCluster<'a> {
    name: &'a str,
    master: &'a str,
    segment: u32,
    parts: &'a [ClusterPart],
}

/// What a request to a worker carries besides the part itself.
struct RequestContext<'a> {
    segment: u32,
    gateway: &'a Option<GatewayRef>,
    /// The cluster's parts that hold or will hold nodes (for `Commit`).
    parts: &'a [ClusterPart],
}

/// The message a part in its current state is waiting on.
fn request_for(
    id: &str,
    request: &ClusterRequest,
    part: &RemotePart,
    config: &ClusterConfig,
    context: &RequestContext<'_>,
) -> ClusterMsg {
    match part.state {
        PartState::Reserving => ClusterMsg::Reserve {
            cluster: id.to_owned(),
            name: request.name.clone(),
            attempt: part.attempt,
            nodes: part.nodes,
            shape: request.shape,
            window: request.window,
            lease_ms: config.lease_ms,
            segment: context.segment,
            gateway: context.gateway.clone(),
        },
        PartState::Committing => ClusterMsg::Commit {
            cluster: id.to_owned(),
            name: request.name.clone(),
            attempt: part.attempt,
            segment: context.segment,
            parts: context.parts.to_vec(),
        },
        _ => ClusterMsg::Release {
            cluster: id.to_owned(),
            attempt: part.attempt,
        },
    }
}

fn record_parts(
    master: &Master,
    local_name: &str,
    local: &PeerId,
    gateway: &Option<GatewayRef>,
) -> Vec<ClusterPart> {
    let mut parts = vec![ClusterPart {
        site: local_name.to_owned(),
        peer_id: Some(local.to_string()),
        attempt: 0,
        nodes: master.local_nodes,
        frontend: true,
        state: master.local_state,
        reservation_key: Some(master.local_key()),
        gateway: gateway.clone(),
    }];
    parts.extend(master.parts.iter().map(|p| ClusterPart {
        site: p.site_name.clone(),
        peer_id: Some(p.peer.to_string()),
        attempt: p.attempt,
        nodes: p.nodes,
        frontend: false,
        state: p.state,
        reservation_key: Some(format!("{}/{}", master.id, p.attempt)),
        gateway: p.gateway.clone(),
    }));
    parts
}

/// The parts that hold, or are about to hold, nodes.
fn live_parts(parts: Vec<ClusterPart>) -> Vec<ClusterPart> {
    parts
        .into_iter()
        .filter(|p| p.state != PartState::Released && p.state != PartState::Releasing)
        .collect()
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

/// Rebuilds the in-memory state of a mastered cluster from its record.
fn master_from_record(
    record: &ClusterRecord,
    now_ms: i64,
    config: &ClusterConfig,
) -> Option<Master> {
    let request: ClusterRequest = serde_json::from_value(record.request.clone()).ok()?;
    let local = record.parts.iter().find(|p| p.frontend && p.attempt == 0)?;
    let parts = record
        .parts
        .iter()
        .filter(|p| !(p.frontend && p.attempt == 0))
        .filter_map(|p| {
            Some(RemotePart {
                site_name: p.site.clone(),
                peer: p.peer_id.as_deref()?.parse().ok()?,
                gateway: p.gateway.clone(),
                attempt: p.attempt,
                nodes: p.nodes,
                state: p.state,
                deadline_ms: None,
                tries: 0,
                backoff_ms: 0,
            })
        })
        .collect();
    Some(Master {
        id: record.id.clone(),
        segment: record.segment.unwrap_or_else(|| segment_for(&record.id)),
        request,
        state: record.state,
        reason: record.reason.clone(),
        local_nodes: local.nodes,
        local_state: local.state,
        parts,
        excluded: BTreeSet::new(),
        denied_free: BTreeMap::new(),
        reserve_deadline_ms: now_ms + config.reserve_deadline_ms,
    })
}

#[cfg(test)]
mod tests;
