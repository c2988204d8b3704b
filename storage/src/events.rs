//! The `events` table: the site's event log.

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use crate::{Ledger, LedgerError, execute_cached};

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log.
    pub seq: i64,
    /// When, unix ms.
    pub at_ms: i64,
    /// What happened, e.g. `reservation.held`.
    pub kind: String,
    /// What it happened to.
    pub subject: String,
    /// More, as a JSON object.
    pub detail: serde_json::Value,
}

impl Ledger {
    /// Appends an event to the log.
    pub fn record_event(
        &mut self,
        now_ms: i64,
        kind: &str,
        subject: &str,
        detail: serde_json::Value,
    ) -> Result<(), LedgerError> {
        record_event(&self.conn, now_ms, kind, subject, detail)
    }

    /// Events after `after_seq`, oldest first, at most `limit`.
    pub fn events(&self, after_seq: i64, limit: u32) -> Result<Vec<Event>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, at_ms, kind, subject, detail_json FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![after_seq, limit], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get::<_, String>(4)?,
                ))
            })?
            .collect::<Result<Vec<(i64, i64, String, String, String)>, _>>()?;
        rows.into_iter()
            .map(|(seq, at_ms, kind, subject, detail)| {
                let detail = serde_json::from_str(&detail).map_err(|e| LedgerError::Corrupt {
                    table: "events",
                    column: "detail_json",
                    detail: e.to_string(),
                })?;
                Ok(Event {
                    seq,
                    at_ms,
                    kind,
                    subject,
                    detail,
                })
            })
            .collect()
    }
}

pub(crate) fn record_event(
    conn: &Connection,
    now_ms: i64,
    kind: &str,
    subject: &str,
    detail: serde_json::Value,
) -> Result<(), LedgerError> {
    execute_cached(
        conn,
        "INSERT INTO events (at_ms, kind, subject, detail_json) VALUES (?1, ?2, ?3, ?4)",
        params![now_ms, kind, subject, detail.to_string()],
    )?;
    Ok(())
}
