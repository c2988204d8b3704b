//! The `cluster_runs` and `cluster_nodes` tables: the clusters running at
//! this site, the VLAN id each took from the pool, and their nodes' states.

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::events::record_event;
use crate::{Ledger, LedgerError, execute_cached, query_row_cached};

/// A cluster running (or being torn down) at this site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRun {
    /// The cluster.
    pub cluster_id: String,
    /// The local VLAN id it took from the pool.
    pub vlan: u16,
    /// When this site started it, unix ms.
    pub started_at_ms: i64,
}

/// The last known state of one node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Site the node runs at.
    pub site: String,
    /// Node number in the cluster (0: the frontend).
    pub index: u32,
    /// Whether it is the frontend.
    pub frontend: bool,
    /// Its state as the compute driver reported it.
    pub state: serde_json::Value,
    /// When it was reported, unix ms.
    pub updated_at_ms: i64,
}

impl Ledger {
    /// Records that `cluster_id` starts at this site and gives it a VLAN id
    /// from `first..=last`: the lowest one no other running cluster holds.
    /// Idempotent: a cluster that already runs keeps its id.
    pub fn start_run(
        &mut self,
        cluster_id: &str,
        first: u16,
        last: u16,
        now_ms: i64,
    ) -> Result<ClusterRun, LedgerError> {
        if first == 0 || last > 4094 || first > last {
            return Err(LedgerError::Invalid(format!(
                "VLAN pool {first}-{last} is not within 1-4094"
            )));
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(run) = run_by_id(&tx, cluster_id)? {
            return Ok(run);
        }
        let taken: std::collections::BTreeSet<u16> = {
            let mut stmt = tx.prepare_cached("SELECT vlan FROM cluster_runs")?;
            stmt.query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?
        };
        let vlan = (first..=last)
            .find(|vlan| !taken.contains(vlan))
            .ok_or(LedgerError::VlansExhausted { first, last })?;
        execute_cached(
            &tx,
            "INSERT INTO cluster_runs (cluster_id, vlan, started_at_ms) VALUES (?1, ?2, ?3)",
            params![cluster_id, vlan, now_ms],
        )?;
        record_event(
            &tx,
            now_ms,
            "cluster.run.started",
            cluster_id,
            serde_json::json!({ "vlan": vlan }),
        )?;
        tx.commit()?;
        Ok(ClusterRun {
            cluster_id: cluster_id.to_owned(),
            vlan,
            started_at_ms: now_ms,
        })
    }

    /// Records that `cluster_id` no longer runs here: its VLAN id returns to
    /// the pool and its node states are forgotten. Returns whether it ran.
    pub fn end_run(&mut self, cluster_id: &str, now_ms: i64) -> Result<bool, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ended = execute_cached(
            &tx,
            "DELETE FROM cluster_runs WHERE cluster_id = ?1",
            params![cluster_id],
        )? > 0;
        execute_cached(
            &tx,
            "DELETE FROM cluster_nodes WHERE cluster_id = ?1",
            params![cluster_id],
        )?;
        if ended {
            record_event(
                &tx,
                now_ms,
                "cluster.run.ended",
                cluster_id,
                serde_json::json!({}),
            )?;
        }
        tx.commit()?;
        Ok(ended)
    }

    /// The clusters running (or being torn down) at this site.
    pub fn runs(&self) -> Result<Vec<ClusterRun>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT cluster_id, vlan, started_at_ms FROM cluster_runs ORDER BY cluster_id",
        )?;
        let runs = stmt
            .query_map([], run_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(runs)
    }

    /// Replaces the node states `site` reported for `cluster_id`.
    pub fn set_nodes(
        &mut self,
        cluster_id: &str,
        site: &str,
        nodes: &[NodeRecord],
    ) -> Result<(), LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        execute_cached(
            &tx,
            "DELETE FROM cluster_nodes WHERE cluster_id = ?1 AND site = ?2",
            params![cluster_id, site],
        )?;
        for node in nodes {
            let state = serde_json::to_string(&node.state)
                .map_err(|e| LedgerError::Invalid(e.to_string()))?;
            execute_cached(
                &tx,
                "INSERT OR REPLACE INTO cluster_nodes (cluster_id, site, idx, frontend, state_json, updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    cluster_id,
                    site,
                    node.index,
                    node.frontend,
                    state,
                    node.updated_at_ms
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The nodes of `cluster_id` as last reported, by node number.
    pub fn nodes(&self, cluster_id: &str) -> Result<Vec<NodeRecord>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, idx, frontend, state_json, updated_at_ms FROM cluster_nodes
             WHERE cluster_id = ?1 ORDER BY idx, site",
        )?;
        let rows: Vec<(String, u32, bool, String, i64)> = stmt
            .query_map(params![cluster_id], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(site, index, frontend, state, updated_at_ms)| {
                let state = serde_json::from_str(&state).map_err(|e| LedgerError::Corrupt {
                    table: "cluster_nodes",
                    column: "state_json",
                    detail: e.to_string(),
                })?;
                Ok(NodeRecord {
                    site,
                    index,
                    frontend,
                    state,
                    updated_at_ms,
                })
            })
            .collect()
    }
}

fn run_by_id(conn: &Connection, cluster_id: &str) -> Result<Option<ClusterRun>, LedgerError> {
    Ok(query_row_cached(
        conn,
        "SELECT cluster_id, vlan, started_at_ms FROM cluster_runs WHERE cluster_id = ?1",
        params![cluster_id],
        run_from_row,
    )
    .optional()?)
}

fn run_from_row(row: &Row<'_>) -> rusqlite::Result<ClusterRun> {
    Ok(ClusterRun {
        cluster_id: row.get(0)?,
        vlan: row.get(1)?,
        started_at_ms: row.get(2)?,
    })
}
