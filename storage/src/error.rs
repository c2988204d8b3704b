//! Errors of the ledger.

use std::path::PathBuf;

use crate::ReservationState;

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite failed (I/O error, full disk, corrupt file, ...).
    #[error("ledger database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The ledger file was written by a newer vcfed than this one.
    #[error(
        "ledger schema version {found} is newer than this vcfed supports ({supported}); upgrade vcfed"
    )]
    SchemaTooNew {
        /// Version found in the file.
        found: u32,
        /// Newest version this build knows.
        supported: u32,
    },
    /// The database could not be switched to WAL mode.
    #[error("ledger at {path} cannot use WAL journaling (got journal mode {mode:?})")]
    NoWal {
        /// The ledger file.
        path: PathBuf,
        /// The journal mode SQLite reported.
        mode: String,
    },
    /// A request's fields are invalid; nothing was written.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No reservation carries this idempotency key.
    #[error("no reservation with key {0:?}")]
    UnknownReservation(String),
    /// The key is already used by a reservation with different parameters.
    #[error("idempotency key {0:?} is already used by a different reservation")]
    KeyConflict(String),
    /// Only the site that took a hold may commit or release it.
    #[error("reservation {key:?} belongs to {owner:?}, not {requester:?}")]
    NotOwner {
        /// The reservation's key.
        key: String,
        /// Site that took it.
        owner: String,
        /// Site that asked.
        requester: String,
    },
    /// The reservation is in a state that does not allow the operation.
    #[error("reservation {key:?} is {state}, cannot {operation}")]
    WrongState {
        /// The reservation's key.
        key: String,
        /// Its current state.
        state: ReservationState,
        /// What was asked ("commit", "hold").
        operation: &'static str,
    },
    /// Every VLAN id of the site's pool is taken by a running cluster.
    #[error("no free VLAN id in {first}-{last}: every one is taken by a running cluster")]
    VlansExhausted {
        /// First id of the pool.
        first: u16,
        /// Last id of the pool.
        last: u16,
    },
    /// A value read back from the database does not decode.
    #[error("ledger holds an undecodable value in {table}.{column}: {detail}")]
    Corrupt {
        /// Table of the value.
        table: &'static str,
        /// Column of the value.
        column: &'static str,
        /// What is wrong.
        detail: String,
    },
}
