//! The `volumes` table: the disk volumes a compute driver made at this site,
//! so that an agent restarted after a crash finds them again.
//!
//! A volume is known by where it is, `(host, pool, name)`. The driver records
//! it once the volume exists and forgets it once it is deleted; whatever is
//! still recorded after a crash is what the driver may have left behind.

use rusqlite::{Row, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::{
    Ledger, LedgerError, NAME_LEN_MAX, VOLUME_TEXT_LEN_MAX, execute_cached, get_u64, to_sql_u64,
};

/// One disk volume made for a node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// libvirt URI of the hypervisor host the volume is on.
    pub host: String,
    /// Storage pool name on that host.
    pub pool: String,
    /// Volume name in the pool.
    pub name: String,
    /// The cluster whose node it is the disk of.
    pub cluster_id: String,
    /// Node number within the cluster (0: the frontend).
    pub node: u32,
    /// Capacity of the volume, bytes.
    pub size_bytes: u64,
    /// When the driver made it, unix ms.
    pub created_at_ms: i64,
}

impl Ledger {
    /// Records a volume the driver made. Recording the same volume again is
    /// idempotent; recording one at the same `(host, pool, name)` with other
    /// fields replaces the row, because the volume there is now that one
    /// (made anew, for another node, after a crash). Durable on return.
    pub fn record_volume(&mut self, volume: &VolumeRecord) -> Result<(), LedgerError> {
        validate_volume(volume)?;
        let size_bytes = to_sql_u64(volume.size_bytes)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        execute_cached(
            &tx,
            "INSERT INTO volumes (host, pool, name, cluster_id, node, size_bytes, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (host, pool, name) DO UPDATE SET
                 cluster_id = excluded.cluster_id,
                 node = excluded.node,
                 size_bytes = excluded.size_bytes,
                 created_at_ms = excluded.created_at_ms",
            params![
                volume.host,
                volume.pool,
                volume.name,
                volume.cluster_id,
                volume.node,
                size_bytes,
                volume.created_at_ms
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Every recorded volume, by cluster, node, host, pool and name.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY cluster_id, node, host, pool, name"
        ))?;
        let volumes = stmt
            .query_map([], volume_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(volumes)
    }

    /// The recorded volumes of `cluster_id`, by node, host, pool and name.
    pub fn cluster_volumes(&self, cluster_id: &str) -> Result<Vec<VolumeRecord>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE cluster_id = ?1
             ORDER BY node, host, pool, name"
        ))?;
        let volumes = stmt
            .query_map(params![cluster_id], volume_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(volumes)
    }

    /// Forgets the volume at `(host, pool, name)`, once the driver deleted
    /// it; returns whether it was recorded.
    pub fn forget_volume(
        &mut self,
        host: &str,
        pool: &str,
        name: &str,
    ) -> Result<bool, LedgerError> {
        Ok(execute_cached(
            &self.conn,
            "DELETE FROM volumes WHERE host = ?1 AND pool = ?2 AND name = ?3",
            params![host, pool, name],
        )? > 0)
    }
}

const VOLUME_COLUMNS: &str = "host, pool, name, cluster_id, node, size_bytes, created_at_ms";

fn validate_volume(volume: &VolumeRecord) -> Result<(), LedgerError> {
    let invalid = |why: String| Err(LedgerError::Invalid(why));
    for (what, text) in [
        ("volume host", &volume.host),
        ("volume pool", &volume.pool),
        ("volume name", &volume.name),
    ] {
        if text.is_empty() || text.len() > VOLUME_TEXT_LEN_MAX {
            return invalid(format!("{what} must be 1 to {VOLUME_TEXT_LEN_MAX} bytes"));
        }
    }
    if volume.cluster_id.is_empty() || volume.cluster_id.len() > NAME_LEN_MAX {
        return invalid(format!("cluster id must be 1 to {NAME_LEN_MAX} bytes"));
    }
    if volume.size_bytes == 0 {
        return invalid("volume size must be at least 1 byte".to_owned());
    }
    if i64::try_from(volume.size_bytes).is_err() {
        return invalid(format!(
            "volume size {} bytes is more than the ledger stores ({} bytes)",
            volume.size_bytes,
            i64::MAX
        ));
    }
    Ok(())
}

fn volume_from_row(row: &Row<'_>) -> rusqlite::Result<VolumeRecord> {
    Ok(VolumeRecord {
        host: row.get(0)?,
        pool: row.get(1)?,
        name: row.get(2)?,
        cluster_id: row.get(3)?,
        node: row.get(4)?,
        size_bytes: get_u64(row, 5)?,
        created_at_ms: row.get(6)?,
    })
}
