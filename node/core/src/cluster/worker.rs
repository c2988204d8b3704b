//! The worker side of the cluster core: the requests other sites send to
//! this one (`Reserve`, `Commit`, `Release` of the holds it grants), and the
//! node reports of running clusters, sent by a worker and noted, as the
//! answer to its `Nodes` request, by the master.

use std::collections::BTreeSet;

use libp2p_identity::PeerId;
use vcfed_storage::{
    ClusterPart, ClusterRecord, ClusterState, HoldOutcome, HoldRequest, Ledger, LedgerError,
    PartState,
};

use super::messages::refused;
use super::{
    CLUSTER_ID_LEN_MAX, ClusterCore, ClusterMsg, NODE_STATE_LEN_MAX, ReportedNode, SiteDirectory,
    WORKER_LEASE_MAX_MS, stored_state,
};

impl ClusterCore {
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
        self.heard(from, now_ms);
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
                nodes,
                attempt,
                segment,
                epoch,
                parts,
            } => {
                // Before the hold is committed: parts the ledger would refuse
                // to store must not leave a commitment without its record.
                if let Err(why) = check_parts(&parts, &self.local_name, &self.local.to_string()) {
                    tracing::debug!(%from, cluster, why, "refusing a commit");
                    return Ok(Some(refused(cluster, attempt, why)));
                }
                let key = format!("{cluster}/{attempt}");
                match ledger.commit(&key, &requester, now_ms) {
                    Ok(reservation) => {
                        let master_name =
                            sites.site_name(&from).unwrap_or_else(|| from.to_string());
                        let shared = SharedCluster {
                            name: &name,
                            nodes,
                            master: &master_name,
                            segment,
                            epoch,
                            parts: &parts,
                        };
                        let epoch = self.record_worker_part(
                            ledger,
                            &reservation,
                            &shared,
                            attempt,
                            now_ms,
                        )?;
                        ClusterMsg::Committed {
                            cluster,
                            attempt,
                            epoch,
                        }
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
            .filter(|p| crate::lifecycle::in_cluster(p.state))
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
    ) -> Result<u32, LedgerError> {
        let local_id = self.local.to_string();
        // The master numbers the nodes; this part's first number is in its
        // list (absent from a master that predates epochs).
        let first_node = shared
            .parts
            .iter()
            .find(|p| p.peer_id.as_deref() == Some(local_id.as_str()) && p.attempt == attempt)
            .and_then(|p| p.first_node);
        let own = ClusterPart {
            site: self.local_name.clone(),
            peer_id: Some(local_id.clone()),
            attempt,
            nodes: reservation.nodes,
            frontend: false,
            state: PartState::Committed,
            reservation_key: Some(reservation.key.clone()),
            gateway: self.gateway.clone(),
            first_node,
            lost_at_ms: None,
        };
        let existing = ledger.cluster(&reservation.cluster_id)?;
        if existing
            .as_ref()
            .is_some_and(|record| record.master_site == self.local_name)
        {
            return Ok(shared.epoch);
        }
        // A list older than the one stored (a delayed or repeated commit
        // from before a part was fenced or added) changes nothing.
        if let Some(record) = existing.as_ref().filter(|r| r.epoch > shared.epoch) {
            return Ok(record.epoch);
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
                // A part committed now runs here, even where an earlier
                // part of the cluster was released and its record finished.
                let state =
                    match stored_state(ledger, &reservation.cluster_id, ClusterState::Reserved)? {
                        state if state.is_terminal() => ClusterState::Reserved,
                        state => state,
                    };
                ledger.update_cluster_epoch(
                    &reservation.cluster_id,
                    state,
                    None,
                    Some(shared.epoch),
                    Some(&parts),
                    now_ms,
                )?;
            }
            None => {
                // The request is the cluster's, as at the master; this
                // site's share of it is its part's `nodes`.
                let request = serde_json::json!({
                    "name": shared.name,
                    "nodes": shared.nodes,
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
                    epoch: shared.epoch,
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                })?;
            }
        }
        Ok(shared.epoch)
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

/// What a worker learns of a cluster with the commit.
struct SharedCluster<'a> {
    name: &'a str,
    /// Compute nodes of the cluster's request (this site's part is in
    /// `parts`).
    nodes: u32,
    master: &'a str,
    segment: u32,
    epoch: u32,
    parts: &'a [ClusterPart],
}

/// Why the parts of a commit from a master cannot be stored, if they
/// cannot: a part with neither nodes nor the frontend, a compute node
/// numbered 0 (numbers start at 1), two parts of one site and attempt, or
/// another site's part under this site's name (this site's own parts are
/// its own). The ledger would refuse them, but only after the hold was
/// committed.
fn check_parts(
    parts: &[ClusterPart],
    local_name: &str,
    local_id: &str,
) -> Result<(), &'static str> {
    if parts.iter().any(|part| part.nodes == 0 && !part.frontend) {
        return Err("invalid commit: a part without nodes");
    }
    if parts.iter().any(|part| part.first_node == Some(0)) {
        return Err("invalid commit: compute nodes are numbered from 1");
    }
    let mut seen = BTreeSet::new();
    for part in parts {
        if !seen.insert((part.site.as_str(), part.attempt)) {
            return Err("invalid commit: two parts of one site and attempt");
        }
        if part.site == local_name && part.peer_id.as_deref() != Some(local_id) {
            return Err("invalid commit: another site's part under this site's name");
        }
    }
    Ok(())
}
