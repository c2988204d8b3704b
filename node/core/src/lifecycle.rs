//! The cluster lifecycle at one site: which clusters should run here now,
//! with which nodes and which peer gateways, and what to do to get there.
//!
//! Sans-IO: every function reads a [`ClusterRecord`] (or the [`Ledger`])
//! and the time it is given, and returns what should be; the runner (the
//! agent's shell, [`crate::runner`]) or the simulator carries it out. Each
//! site derives everything from its own persisted record of the cluster,
//! which the reservation exchange filled (segment id, every part with its
//! gateway), so the sites of a cluster agree without talking at start time:
//!
//! - a cluster runs at a site from its window's start to its end while it
//!   is `reserved`, `starting` or `running` and the site holds a committed
//!   part of it (the master always does: it holds the frontend);
//! - the nodes are numbered cluster-wide: the frontend is 0, at the
//!   master; each part's compute nodes follow from the first number the
//!   master gave the part when it committed it (the first commit numbers
//!   the parts 1..=N in the order of (site name, attempt); replacements of
//!   lost parts come after every number used before), so a node's number
//!   and MAC are the same whichever site computes them and never change
//!   while it runs; parts stored without a number are numbered in that
//!   order after the others;
//! - the cluster network is the segment's /24 in 198.19.0.0/16 (benchmark
//!   space, never routed): the frontend is `.1` and leases `.10`-`.250`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use vcfed_storage::{
    ClusterPart, ClusterRecord, ClusterRun, ClusterState, GatewayRef, Ledger, LedgerError,
    NodeRecord, NodeShape, PartState, Window,
};

use crate::cluster::ReportedNode;
use crate::driver::{NodeState, NodeStatus};

/// One node of a cluster at this site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedNode {
    /// Cluster-wide node number (0: the frontend).
    pub index: u32,
    /// Whether it is the frontend.
    pub frontend: bool,
}

/// A peer gateway of a cluster: another site of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPeer {
    /// The site's name.
    pub site: String,
    /// Its gateway, as exchanged with the reservation (`None`: the site has
    /// no gateway endpoint, so its nodes cannot be reached).
    pub gateway: Option<GatewayRef>,
}

/// A cluster that should run at this site now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPlan {
    /// Cluster id.
    pub cluster: String,
    /// Whether this site is the master (it runs the frontend).
    pub master: bool,
    /// The master's site name.
    pub master_site: String,
    /// The overlay segment id.
    pub segment: u32,
    /// The cluster network (a /24; the frontend is `.1`).
    pub subnet: Ipv4Addr,
    /// When the window ends, unix ms.
    pub end_ms: i64,
    /// This site's nodes.
    pub nodes: Vec<PlannedNode>,
    /// The numbers of every node of the whole cluster, the frontend (0)
    /// included, ascending.
    pub cluster_nodes: Vec<u32>,
    /// The cluster's other sites.
    pub peers: Vec<PlannedPeer>,
    /// The per-node shape of the request (`None`: a record without one).
    pub shape: Option<NodeShape>,
}

/// What the runner must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start (or, after a restart, resume) a cluster here.
    Start(RunPlan),
    /// Tear a cluster down here and give its VLAN back.
    Stop {
        /// Cluster id.
        cluster: String,
    },
}

/// The cluster network of segment `segment`.
pub fn subnet_for(segment: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (segment & 0xff) as u8, 0)
}

/// The window of a stored cluster, from its request.
pub fn window_of(record: &ClusterRecord) -> Option<Window> {
    serde_json::from_value(record.request.get("window")?.clone()).ok()
}

/// The plan of `record` if it should run at this site (`local_name`, with
/// peer id `local_peer`) at `now_ms`.
pub fn plan(
    record: &ClusterRecord,
    local_name: &str,
    local_peer: &str,
    now_ms: i64,
) -> Option<RunPlan> {
    if !matches!(
        record.state,
        ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
    ) {
        return None;
    }
    let window = window_of(record)?;
    if now_ms < window.start_ms || now_ms >= window.end_ms {
        return None;
    }
    let segment = record.segment?;
    let is_local = |site: &str, peer: Option<&str>| match peer {
        Some(peer) => peer == local_peer,
        None => site == local_name,
    };
    // The master is the site of the frontend's part (by peer id: names
    // are not guaranteed unique).
    let master = record
        .parts
        .iter()
        .find(|p| p.frontend && p.attempt == 0)
        .map_or(record.master_site == local_name, |p| {
            is_local(&p.site, p.peer_id.as_deref())
        });
    let mut parts: Vec<_> = record
        .parts
        .iter()
        .filter(|p| in_cluster(p.state))
        .collect();
    parts.sort_by(|a, b| (&a.site, a.attempt).cmp(&(&b.site, b.attempt)));

    let mut nodes = Vec::new();
    if master {
        nodes.push(PlannedNode {
            index: 0,
            frontend: true,
        });
    }
    let firsts = first_numbers(&parts);
    let mut cluster_nodes = vec![0u32];
    let mut peers: BTreeMap<&str, Option<GatewayRef>> = BTreeMap::new();
    for (part, &first) in parts.iter().zip(&firsts) {
        let local = is_local(&part.site, part.peer_id.as_deref());
        // Bounded: a committed part fits its site's inventory.
        let range = first..first.saturating_add(part.nodes);
        cluster_nodes.extend(range.clone());
        if local {
            nodes.extend(range.map(|index| PlannedNode {
                index,
                frontend: false,
            }));
        }
        if !local {
            let entry = peers.entry(part.site.as_str()).or_default();
            if entry.is_none() {
                *entry = part.gateway.clone();
            }
        }
    }
    // The master's own part may hold only the frontend (0 compute nodes);
    // a worker without a committed part has nothing to run.
    if nodes.is_empty() {
        return None;
    }
    // By number: the frontend (0) first.
    nodes.sort_by_key(|node| node.index);
    Some(RunPlan {
        cluster: record.id.clone(),
        master,
        master_site: record.master_site.clone(),
        segment,
        subnet: subnet_for(segment),
        end_ms: window.end_ms,
        nodes,
        cluster_nodes: {
            cluster_nodes.sort_unstable();
            cluster_nodes.dedup();
            cluster_nodes
        },
        peers: peers
            .into_iter()
            .map(|(site, gateway)| PlannedPeer {
                site: site.to_owned(),
                gateway,
            })
            .collect(),
        shape: record
            .request
            .get("shape")
            .and_then(|shape| serde_json::from_value(shape.clone()).ok()),
    })
}

/// The number of the first compute node of each of `parts` (a cluster's
/// parts, in (site, attempt) order): the one the master gave it, or, for
/// a part stored without one (before epochs), the next after the highest
/// in use, in that order — from 1 when no part has a number.
pub fn first_numbers(parts: &[&ClusterPart]) -> Vec<u32> {
    let mut next = parts
        .iter()
        .filter_map(|p| p.first_node.map(|first| first.saturating_add(p.nodes)))
        .max()
        .unwrap_or(1)
        .max(1);
    parts
        .iter()
        .map(|part| {
            part.first_node.unwrap_or_else(|| {
                let first = next;
                next = next.saturating_add(part.nodes);
                first
            })
        })
        .collect()
}

/// Whether a part in `state` is one of the cluster's: committed, or (in
/// a master's record) being committed, which after the first commit is a
/// part committed again with a new list of parts, or a replacement whose
/// commit was decided.
pub fn in_cluster(state: PartState) -> bool {
    matches!(state, PartState::Committed | PartState::Committing)
}

/// The plans of every cluster that should run at this site at `now_ms`.
pub fn plans(
    ledger: &Ledger,
    local_name: &str,
    local_peer: &str,
    now_ms: i64,
) -> Result<Vec<RunPlan>, LedgerError> {
    Ok(ledger
        .live_clusters()?
        .iter()
        .filter_map(|record| plan(record, local_name, local_peer, now_ms))
        .collect())
}

/// Whether a live cluster's window is over at `now_ms`: it is `finished`
/// here once whatever ran of it here is torn down (at once, if nothing
/// ran: a site that was down for the whole window, or did not start it).
pub fn is_overdue(record: &ClusterRecord, now_ms: i64) -> bool {
    state_after_stop(record, now_ms).is_some()
}

/// What to do so that what runs (`running`: the clusters the runner has
/// started in this process; `runs`: the ones the ledger says were started,
/// perhaps by an earlier process) matches `plans`.
///
/// A plan not running is started; one the ledger knows but this process
/// does not is started again (resumed after a restart: starting is
/// idempotent); a run no plan names any more is stopped.
pub fn reconcile(
    plans: &[RunPlan],
    running: &BTreeSet<String>,
    runs: &[ClusterRun],
) -> Vec<Action> {
    let planned: BTreeSet<&str> = plans.iter().map(|p| p.cluster.as_str()).collect();
    let mut actions: Vec<Action> = plans
        .iter()
        .filter(|plan| !running.contains(&plan.cluster))
        .cloned()
        .map(Action::Start)
        .collect();
    let known: BTreeSet<&str> = running
        .iter()
        .map(String::as_str)
        .chain(runs.iter().map(|run| run.cluster_id.as_str()))
        .collect();
    actions.extend(
        known
            .into_iter()
            .filter(|cluster| !planned.contains(cluster))
            .map(|cluster| Action::Stop {
                cluster: cluster.to_owned(),
            }),
    );
    actions
}

/// The node states this site (`site`) stores for its nodes' `statuses`.
pub fn node_records(site: &str, statuses: &[NodeStatus], now_ms: i64) -> Vec<NodeRecord> {
    statuses
        .iter()
        .map(|status| NodeRecord {
            site: site.to_owned(),
            index: status.index,
            frontend: status.frontend,
            state: serde_json::to_value(&status.state).unwrap_or_default(),
            updated_at_ms: now_ms,
        })
        .collect()
}

/// What a worker reports to the master for its nodes' `statuses`.
pub fn reported_nodes(statuses: &[NodeStatus]) -> Vec<ReportedNode> {
    statuses
        .iter()
        .filter_map(|status| {
            Some(ReportedNode {
                index: status.index,
                frontend: status.frontend,
                state_json: serde_json::to_string(&status.state).ok()?,
            })
        })
        .collect()
}

/// Moves `cluster` forward in `ledger` ([`next_state`]: `starting`, then
/// `running` once `up`) if it is not already further; returns the new
/// state if it moved.
pub fn advance_state(
    ledger: &mut Ledger,
    cluster: &str,
    up: bool,
    now_ms: i64,
) -> Result<Option<ClusterState>, LedgerError> {
    if let Some(record) = ledger.cluster(cluster)?
        && let Some(next) = next_state(record.state, up)
        && next != record.state
    {
        ledger.update_cluster(cluster, next, None, None, now_ms)?;
        return Ok(Some(next));
    }
    Ok(None)
}

/// Whether every node of a run is up: the frontend serving, compute nodes
/// installed.
pub fn all_up(plan: &RunPlan, statuses: &[NodeStatus]) -> bool {
    plan.nodes.iter().all(|node| {
        statuses
            .iter()
            .find(|s| s.index == node.index)
            .is_some_and(|s| match s.state {
                NodeState::Serving { .. } => node.frontend,
                NodeState::Installed { .. } | NodeState::Up { .. } => !node.frontend,
                _ => false,
            })
    })
}

/// Whether every node of the whole cluster is up, from the node states a
/// master stores (its own and those the workers reported).
pub fn cluster_up(plan: &RunPlan, nodes: &[vcfed_storage::NodeRecord]) -> bool {
    plan.cluster_nodes.iter().all(|&index| {
        nodes.iter().any(|node| {
            node.index == index
                && if node.frontend {
                    node.state["state"] == "serving"
                } else {
                    node.state["state"] == "installed" || node.state["state"] == "up"
                }
        })
    })
}

/// Whether this site is up for `plan`: a worker's part once its own nodes
/// are ([`all_up`]); at the master, the whole cluster once every node of
/// every site is ([`cluster_up`] over the node states the master stores,
/// its own and those the workers reported, read only if needed).
pub fn site_up<E>(
    plan: &RunPlan,
    statuses: &[NodeStatus],
    stored_nodes: impl FnOnce() -> Result<Vec<vcfed_storage::NodeRecord>, E>,
) -> Result<bool, E> {
    if !all_up(plan, statuses) {
        return Ok(false);
    }
    if !plan.master {
        return Ok(true);
    }
    Ok(cluster_up(plan, &stored_nodes()?))
}

/// Whether this site may boot its nodes of `plan` now. The master boots at
/// once (its frontend first). A worker waits for the tunnel to the
/// master's gateway (`tunnel_up`): nodes that boot before it would find no
/// DHCP server. A master without a gateway can never be reached, so its
/// workers boot anyway and their nodes report why they fail.
pub fn may_boot(plan: &RunPlan, tunnel_up: impl FnOnce(&GatewayRef) -> bool) -> bool {
    if plan.master {
        return true;
    }
    let master_gateway = plan
        .peers
        .iter()
        .find(|peer| peer.site == plan.master_site)
        .and_then(|peer| peer.gateway.as_ref());
    master_gateway.is_none_or(tunnel_up)
}

/// How often a worker sends its node states to the master even when they
/// did not change (a report may have been lost), ms.
pub const REPORT_EVERY_MS: i64 = 10_000;

/// Whether a worker sends its node states to the master now: when they
/// changed, and every [`REPORT_EVERY_MS`] anyway. The master sends none.
pub fn report_due(plan: &RunPlan, changed: bool, reported_at_ms: Option<i64>, now_ms: i64) -> bool {
    !plan.master && (changed || reported_at_ms.is_none_or(|at| now_ms - at >= REPORT_EVERY_MS))
}

/// The live clusters to mark `finished` here now: their window is over
/// ([`is_overdue`]) and nothing of them runs here any more, neither a run
/// the ledger knows (`runs`) nor one this process started (`running`);
/// those are finished when they are torn down ([`state_after_stop`]).
pub fn finish_idle<'a>(
    records: &'a [ClusterRecord],
    runs: &[ClusterRun],
    running: &BTreeSet<String>,
    now_ms: i64,
) -> Vec<&'a ClusterRecord> {
    let ran: BTreeSet<&str> = runs.iter().map(|run| run.cluster_id.as_str()).collect();
    records
        .iter()
        .filter(|record| is_overdue(record, now_ms))
        .filter(|record| !ran.contains(record.id.as_str()) && !running.contains(&record.id))
        .collect()
}

/// The state a cluster moves to at this site once it runs here (or
/// `None` to keep it): `starting` while its nodes come up, `running` once
/// they all are. Only moves forward from `reserved` or `starting`.
pub fn next_state(current: ClusterState, up: bool) -> Option<ClusterState> {
    match (current, up) {
        (ClusterState::Reserved, false) => Some(ClusterState::Starting),
        (ClusterState::Reserved | ClusterState::Starting, true) => Some(ClusterState::Running),
        _ => None,
    }
}

/// The state a cluster moves to at this site once it was torn down here,
/// if any: `finished` when its window is over and it was still
/// `reserved`, `starting` or `running`; a delete or a failure already moved
/// it on.
pub fn state_after_stop(record: &ClusterRecord, now_ms: i64) -> Option<ClusterState> {
    let over = window_of(record).is_some_and(|w| now_ms >= w.end_ms);
    let live = matches!(
        record.state,
        ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
    );
    (over && live).then_some(ClusterState::Finished)
}

#[cfg(test)]
mod tests;
