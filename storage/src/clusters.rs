//! The `clusters` and `cluster_parts` tables: the clusters this site masters
//! or serves, and each one's share of nodes at every site.

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::events::record_event;
use crate::{Ledger, LedgerError, execute_cached, query_row_cached};

/// Lifecycle of a cluster at one site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterState {
    /// Accepted, nothing reserved yet.
    Requested,
    /// Holds are being collected.
    Reserving,
    /// All nodes are committed.
    Reserved,
    /// Network and nodes are being brought up.
    Starting,
    /// Up.
    Running,
    /// Being torn down.
    Stopping,
    /// Torn down after its window or a delete.
    Finished,
    /// Gave up; the reason is stored with it.
    Failed,
}

crate::state_names!(ClusterState {
    Requested => "requested",
    Reserving => "reserving",
    Reserved => "reserved",
    Starting => "starting",
    Running => "running",
    Stopping => "stopping",
    Finished => "finished",
    Failed => "failed",
});

impl ClusterState {
    /// Whether the cluster's life is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, ClusterState::Finished | ClusterState::Failed)
    }
}

/// The state of one part of a cluster at one site, as its master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartState {
    /// A hold was asked for; no answer yet.
    Reserving,
    /// The site holds the nodes (until its lease runs out).
    Held,
    /// The commit was decided and sent; no answer yet.
    Committing,
    /// The site committed the nodes.
    Committed,
    /// A release was sent; no answer yet.
    Releasing,
    /// Nothing is held at the site for this part.
    Released,
}

crate::state_names!(PartState {
    Reserving => "reserving",
    Held => "held",
    Committing => "committing",
    Committed => "committed",
    Releasing => "releasing",
    Released => "released",
});

/// The share of a cluster's nodes at one site (one reservation attempt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPart {
    /// Name of the site holding the nodes.
    pub site: String,
    /// Peer id of that site's agent.
    pub peer_id: Option<String>,
    /// Reservation attempt at that site (0 for the master's own part).
    pub attempt: u32,
    /// How many compute nodes.
    pub nodes: u32,
    /// Whether the part also holds the cluster's frontend.
    pub frontend: bool,
    /// Where the part stands.
    pub state: PartState,
    /// Key of the reservation at that site, once there is one.
    pub reservation_key: Option<String>,
    /// That site's gateway, as exchanged with the reservation.
    pub gateway: Option<GatewayRef>,
    /// The number of the part's first compute node, fixed by the master when
    /// it commits the part (`None`: numbered in (site, attempt) order over
    /// the committed parts, as records from before epochs are).
    #[serde(default)]
    pub first_node: Option<u32>,
    /// When the master declared the part's site lost, unix ms.
    #[serde(default)]
    pub lost_at_ms: Option<i64>,
}

/// A site's gateway as the sites of a cluster tell each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRef {
    /// Public `host:port` of its UDP socket.
    pub endpoint: String,
    /// Its WireGuard public key, base64.
    pub public_key: String,
}

/// A cluster as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Federation-wide id.
    pub id: String,
    /// Name given by the requester.
    pub name: String,
    /// Site that masters it.
    pub master_site: String,
    /// The original request, as JSON.
    pub request: serde_json::Value,
    /// Lifecycle state.
    pub state: ClusterState,
    /// Why it failed, if it did.
    pub reason: Option<String>,
    /// Per-site parts, ordered by site.
    pub parts: Vec<ClusterPart>,
    /// Overlay segment id (GRE key) chosen by the master.
    pub segment: Option<u32>,
    /// Membership epoch: raised by the master each time it fences a lost
    /// part; a worker never takes a list of parts older than its own.
    #[serde(default)]
    pub epoch: u32,
    /// When this site learnt of it, unix ms.
    pub created_at_ms: i64,
    /// Last state change, unix ms.
    pub updated_at_ms: i64,
}

impl Ledger {
    /// Stores a new cluster with its parts. Storing the same id again with
    /// the same master returns the stored record unchanged (idempotent).
    pub fn insert_cluster(
        &mut self,
        cluster: &ClusterRecord,
    ) -> Result<ClusterRecord, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(existing) = cluster_by_id(&tx, &cluster.id)? {
            if existing.master_site != cluster.master_site {
                return Err(LedgerError::KeyConflict(cluster.id.clone()));
            }
            return Ok(existing);
        }
        let request = serde_json::to_string(&cluster.request)
            .map_err(|e| LedgerError::Invalid(e.to_string()))?;
        execute_cached(
            &tx,
            "INSERT INTO clusters (id, name, master_site, request_json, state, reason, created_at_ms, updated_at_ms, segment, epoch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                cluster.id,
                cluster.name,
                cluster.master_site,
                request,
                cluster.state.as_str(),
                cluster.reason,
                cluster.created_at_ms,
                cluster.updated_at_ms,
                cluster.segment,
                cluster.epoch,
            ],
        )?;
        write_parts(&tx, &cluster.id, &cluster.parts)?;
        record_event(
            &tx,
            cluster.created_at_ms,
            "cluster.created",
            &cluster.id,
            serde_json::json!({ "name": cluster.name, "master_site": cluster.master_site }),
        )?;
        let stored =
            cluster_by_id(&tx, &cluster.id)?.expect("the row was inserted in this transaction");
        tx.commit()?;
        Ok(stored)
    }

    /// Moves a cluster to `state` (with a reason for `failed`) and, if given,
    /// replaces its parts.
    pub fn update_cluster(
        &mut self,
        id: &str,
        state: ClusterState,
        reason: Option<&str>,
        parts: Option<&[ClusterPart]>,
        now_ms: i64,
    ) -> Result<ClusterRecord, LedgerError> {
        self.update_cluster_epoch(id, state, reason, None, parts, now_ms)
    }

    /// [`Ledger::update_cluster`], also raising the membership epoch to
    /// `epoch` if given (never lowering it), in the same transaction.
    pub fn update_cluster_epoch(
        &mut self,
        id: &str,
        state: ClusterState,
        reason: Option<&str>,
        epoch: Option<u32>,
        parts: Option<&[ClusterPart]>,
        now_ms: i64,
    ) -> Result<ClusterRecord, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = execute_cached(
            &tx,
            "UPDATE clusters SET state = ?2, reason = ?3, updated_at_ms = ?4 WHERE id = ?1",
            params![id, state.as_str(), reason, now_ms],
        )?;
        if changed == 0 {
            return Err(LedgerError::Invalid(format!("no cluster with id {id:?}")));
        }
        if let Some(epoch) = epoch {
            execute_cached(
                &tx,
                "UPDATE clusters SET epoch = MAX(epoch, ?2) WHERE id = ?1",
                params![id, epoch],
            )?;
        }
        if let Some(parts) = parts {
            execute_cached(
                &tx,
                "DELETE FROM cluster_parts WHERE cluster_id = ?1",
                params![id],
            )?;
            write_parts(&tx, id, parts)?;
        }
        record_event(
            &tx,
            now_ms,
            "cluster.state",
            id,
            serde_json::json!({ "state": state.as_str(), "reason": reason }),
        )?;
        let stored = cluster_by_id(&tx, id)?.expect("the row was updated in this transaction");
        tx.commit()?;
        Ok(stored)
    }

    /// The cluster with this id.
    pub fn cluster(&self, id: &str) -> Result<Option<ClusterRecord>, LedgerError> {
        cluster_by_id(&self.conn, id)
    }

    /// The clusters that are `reserved`, `starting` or `running`, oldest
    /// first: the ones that may run (or still run) at this site.
    pub fn live_clusters(&self) -> Result<Vec<ClusterRecord>, LedgerError> {
        self.clusters_where("state IN ('reserved', 'starting', 'running')")
    }

    /// The newest cluster mastered by `master_site` and named `name` that
    /// is not `finished` or `failed`: a name is unique among the live
    /// clusters of one master.
    pub fn live_cluster_named(
        &self,
        master_site: &str,
        name: &str,
    ) -> Result<Option<ClusterRecord>, LedgerError> {
        let id: Option<String> = query_row_cached(
            &self.conn,
            "SELECT id FROM clusters
             WHERE master_site = ?1 AND name = ?2 AND state NOT IN ('finished', 'failed')
             ORDER BY created_at_ms DESC, id DESC LIMIT 1",
            params![master_site, name],
            |row| row.get(0),
        )
        .optional()?;
        match id {
            Some(id) => cluster_by_id(&self.conn, &id),
            None => Ok(None),
        }
    }

    /// How many clusters are in each state, every state listed (in
    /// declaration order) even when none is in it.
    pub fn cluster_counts(&self) -> Result<Vec<(ClusterState, u64)>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state, COUNT(*) FROM clusters GROUP BY state")?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, crate::get_u64(row, 1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        crate::reservations::count_states("clusters", ClusterState::ALL, ClusterState::parse, rows)
    }

    /// All clusters, oldest first.
    pub fn clusters(&self) -> Result<Vec<ClusterRecord>, LedgerError> {
        self.clusters_where("1")
    }

    /// The clusters whose row matches the SQL `condition` (a constant of
    /// this crate, never user input), oldest first.
    fn clusters_where(&self, condition: &str) -> Result<Vec<ClusterRecord>, LedgerError> {
        let ids: Vec<String> = {
            let mut stmt = self.conn.prepare_cached(&format!(
                "SELECT id FROM clusters WHERE {condition} ORDER BY created_at_ms, id"
            ))?;
            stmt.query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?
        };
        let mut clusters = Vec::with_capacity(ids.len());
        for id in ids {
            clusters.push(cluster_by_id(&self.conn, &id)?.expect("the id was just listed"));
        }
        Ok(clusters)
    }
}

fn write_parts(
    tx: &Transaction<'_>,
    cluster_id: &str,
    parts: &[ClusterPart],
) -> Result<(), LedgerError> {
    for part in parts {
        if part.nodes == 0 && !part.frontend {
            return Err(LedgerError::Invalid(format!(
                "cluster part at {} has no nodes",
                part.site
            )));
        }
        let gateway = part
            .gateway
            .as_ref()
            .map(|gateway| serde_json::to_string(gateway).expect("a gateway serialises to JSON"));
        execute_cached(
            tx,
            "INSERT INTO cluster_parts (cluster_id, site, peer_id, attempt, nodes, frontend, state, reservation_key, gateway_json, first_node, lost_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                cluster_id,
                part.site,
                part.peer_id,
                part.attempt,
                part.nodes,
                part.frontend,
                part.state.as_str(),
                part.reservation_key,
                gateway,
                part.first_node,
                part.lost_at_ms,
            ],
        )?;
    }
    Ok(())
}

/// The parts of one cluster, the frontend's first.
pub(crate) const CLUSTER_PARTS_SQL: &str =
    "SELECT site, peer_id, attempt, nodes, frontend, state, reservation_key, gateway_json, first_node, lost_at_ms
     FROM cluster_parts WHERE cluster_id = ?1 ORDER BY frontend DESC, site, attempt";

fn cluster_by_id(conn: &Connection, id: &str) -> Result<Option<ClusterRecord>, LedgerError> {
    let row = query_row_cached(
        conn,
        "SELECT id, name, master_site, request_json, state, reason, created_at_ms, updated_at_ms, segment, epoch
             FROM clusters WHERE id = ?1",
        params![id],
        |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, Option<String>>(5)?,
                row.get::<_, i64>(6)?,
                row.get::<_, i64>(7)?,
                row.get::<_, Option<u32>>(8)?,
                row.get::<_, u32>(9)?,
            ))
        },
    )
    .optional()?;
    let Some((
        id,
        name,
        master_site,
        request,
        state,
        reason,
        created_at_ms,
        updated_at_ms,
        segment,
        epoch,
    )) = row
    else {
        return Ok(None);
    };
    let request = serde_json::from_str(&request).map_err(|e| LedgerError::Corrupt {
        table: "clusters",
        column: "request_json",
        detail: e.to_string(),
    })?;
    let state = ClusterState::parse(&state).ok_or_else(|| LedgerError::Corrupt {
        table: "clusters",
        column: "state",
        detail: format!("unknown state {state:?}"),
    })?;
    let mut stmt = conn.prepare_cached(CLUSTER_PARTS_SQL)?;
    let rows = stmt
        .query_map(params![id], |row| {
            Ok((
                ClusterPart {
                    site: row.get(0)?,
                    peer_id: row.get(1)?,
                    attempt: row.get(2)?,
                    nodes: row.get(3)?,
                    frontend: row.get(4)?,
                    state: PartState::Released,
                    reservation_key: row.get(6)?,
                    gateway: None,
                    first_node: row.get(8)?,
                    lost_at_ms: row.get(9)?,
                },
                row.get::<_, String>(5)?,
                row.get::<_, Option<String>>(7)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut parts = Vec::with_capacity(rows.len());
    for (mut part, state, gateway) in rows {
        part.gateway = gateway
            .map(|text| {
                serde_json::from_str(&text).map_err(|e| LedgerError::Corrupt {
                    table: "cluster_parts",
                    column: "gateway_json",
                    detail: e.to_string(),
                })
            })
            .transpose()?;
        part.state = PartState::parse(&state).ok_or_else(|| LedgerError::Corrupt {
            table: "cluster_parts",
            column: "state",
            detail: format!("unknown state {state:?}"),
        })?;
        parts.push(part);
    }
    Ok(Some(ClusterRecord {
        id,
        name,
        master_site,
        request,
        state,
        reason,
        parts,
        created_at_ms,
        updated_at_ms,
        segment,
        epoch,
    }))
}
