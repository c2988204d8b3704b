//! The `peers` table: the federation peers this site has met and their
//! addresses.

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::{Ledger, LedgerError, PEER_ADDRS_MAX, execute_cached, query_row_cached};

/// A federation peer as remembered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// libp2p peer id, as text.
    pub peer_id: String,
    /// Site name, once known.
    pub site_name: Option<String>,
    /// Known multiaddrs, as text.
    pub addrs: Vec<String>,
    /// First contact, unix ms.
    pub first_seen_ms: i64,
    /// Latest contact, unix ms.
    pub last_seen_ms: i64,
}

impl Ledger {
    /// Remembers a peer (or refreshes it): addresses are merged, most recent
    /// last, at most [`PEER_ADDRS_MAX`]; the site name is kept unless a new
    /// one is given.
    pub fn upsert_peer(
        &mut self,
        peer_id: &str,
        site_name: Option<&str>,
        addrs: &[String],
        now_ms: i64,
    ) -> Result<PeerRecord, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut merged = peer_by_id(&tx, peer_id)?
            .map(|peer| peer.addrs)
            .unwrap_or_default();
        for addr in addrs {
            merged.retain(|known| known != addr);
            merged.push(addr.clone());
        }
        if merged.len() > PEER_ADDRS_MAX {
            merged.drain(..merged.len() - PEER_ADDRS_MAX);
        }
        let addrs_json =
            serde_json::to_string(&merged).map_err(|e| LedgerError::Invalid(e.to_string()))?;
        execute_cached(
            &tx,
            "INSERT INTO peers (peer_id, site_name, addrs_json, first_seen_ms, last_seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (peer_id) DO UPDATE SET
                 site_name = COALESCE(excluded.site_name, peers.site_name),
                 addrs_json = excluded.addrs_json,
                 last_seen_ms = excluded.last_seen_ms",
            params![peer_id, site_name, addrs_json, now_ms],
        )?;
        let stored = peer_by_id(&tx, peer_id)?.expect("the row was upserted in this transaction");
        tx.commit()?;
        Ok(stored)
    }

    /// Forgets a peer; returns whether it was known.
    pub fn remove_peer(&mut self, peer_id: &str) -> Result<bool, LedgerError> {
        Ok(execute_cached(
            &self.conn,
            "DELETE FROM peers WHERE peer_id = ?1",
            params![peer_id],
        )? > 0)
    }

    /// All known peers, most recently seen first.
    pub fn peers(&self) -> Result<Vec<PeerRecord>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {PEER_COLUMNS} FROM peers ORDER BY last_seen_ms DESC, peer_id"
        ))?;
        stmt.query_map([], peer_from_row)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .collect()
    }
}

const PEER_COLUMNS: &str = "peer_id, site_name, addrs_json, first_seen_ms, last_seen_ms";

fn peer_by_id(conn: &Connection, peer_id: &str) -> Result<Option<PeerRecord>, LedgerError> {
    query_row_cached(
        conn,
        &format!("SELECT {PEER_COLUMNS} FROM peers WHERE peer_id = ?1"),
        params![peer_id],
        peer_from_row,
    )
    .optional()?
    .transpose()
}

fn peer_from_row(row: &Row<'_>) -> rusqlite::Result<Result<PeerRecord, LedgerError>> {
    let addrs: String = row.get(2)?;
    let addrs = match serde_json::from_str(&addrs) {
        Ok(addrs) => addrs,
        Err(e) => {
            return Ok(Err(LedgerError::Corrupt {
                table: "peers",
                column: "addrs_json",
                detail: e.to_string(),
            }));
        }
    };
    Ok(Ok(PeerRecord {
        peer_id: row.get(0)?,
        site_name: row.get(1)?,
        addrs,
        first_seen_ms: row.get(3)?,
        last_seen_ms: row.get(4)?,
    }))
}
