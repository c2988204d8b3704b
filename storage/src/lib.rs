//! The durable ledger of one vcfed site, in SQLite.
//!
//! The ledger owns what a site must not forget across a crash: its inventory,
//! the reservation calendar (holds and commitments of node slots over time
//! windows), the clusters it masters or serves, the federation peers it knows,
//! the disk volumes its compute driver made and an event log. Everything goes
//! through the typed [`Ledger`] API; no SQL lives outside this crate.
//!
//! # Guarantees
//!
//! - **Durable before acknowledged.** The database runs in WAL mode with
//!   `synchronous = FULL`: when a mutating call returns `Ok`, its transaction
//!   is on disk and survives a crash or power loss.
//! - **Never overbooks.** [`Ledger::hold`] admits inside one `BEGIN IMMEDIATE`
//!   transaction: at every instant of every window, the nodes of committed
//!   reservations plus those of holds with a live lease never exceed the
//!   site's capacity at the time of the hold.
//! - **Idempotent.** Every reservation carries an idempotency key chosen by
//!   the requester. Repeating a hold, commit or release with the same key
//!   returns the same reservation and books nothing twice.
//! - **Leases.** A hold that is not committed before its lease runs out stops
//!   counting at that instant and is marked `expired` by
//!   [`Ledger::sweep_expired`]; a crashed requester therefore leaks nothing.
//!
//! # Time
//!
//! The ledger never reads a clock: every call that depends on time takes
//! `now_ms` (unix milliseconds) from the caller, so tests and the simulator
//! can drive it on virtual time.
//!
//! This crate must not depend on tokio, libp2p or the agent.

mod calendar;
mod clusters;
mod error;
mod events;
mod inventory;
mod peers;
mod reservations;
mod runs;
mod schema;
mod volumes;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, Params, Row, TransactionBehavior};

pub use calendar::{Step, Usage, Window, min_free, peak_usage};
pub use clusters::{ClusterPart, ClusterRecord, ClusterState, GatewayRef, PartState};
pub use error::LedgerError;
pub use events::Event;
pub use inventory::{Inventory, InventoryHost, NodeShape};
pub use peers::PeerRecord;
pub use reservations::{
    HoldOutcome, HoldRequest, Reservation, ReservationFilter, ReservationState,
};
pub use runs::{ClusterRun, NodeRecord};
pub use volumes::VolumeRecord;

/// Longest accepted idempotency key, in bytes.
pub(crate) const KEY_LEN_MAX: usize = 200;
/// Longest accepted cluster id or site name stored with a reservation, in bytes.
pub(crate) const NAME_LEN_MAX: usize = 200;
/// Longest accepted host URI, pool name or volume name of a volume, in bytes:
/// a libvirt URI may carry a user, port and query parameters.
pub(crate) const VOLUME_TEXT_LEN_MAX: usize = 1024;
/// Longest lease a hold may have, ms (a week).
pub(crate) const LEASE_MS_MAX: i64 = 7 * 86_400_000;
/// Latest instant the calendar accepts: the end of year 9999, unix ms.
pub const INSTANT_MS_MAX: i64 = 253_402_300_799_999;
/// Addresses remembered per peer; the oldest are forgotten first.
pub const PEER_ADDRS_MAX: usize = 16;
/// Events kept in the event log; older ones are pruned by the sweep.
pub const EVENTS_MAX: i64 = 100_000;
/// Compiled statements kept per connection: more than this crate has, so
/// none is ever evicted and recompiled.
const STATEMENTS_CACHED_MAX: usize = 64;

/// The ledger: one SQLite connection with the schema migrated to the current
/// version. Not shared between threads; wrap it in a mutex to share.
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    path: Option<PathBuf>,
    /// The last answer of [`Ledger::next_lease_expiry`], kept while nothing
    /// was written since (see [`Ledger::changes_seen`]).
    lease_expiry_memo: Cell<Option<reservations::LeaseExpiryMemo>>,
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let conn = Connection::open(path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(LedgerError::NoWal {
                path: path.to_owned(),
                mode,
            });
        }
        Ledger::setup(conn, Some(path.to_owned()))
    }

    /// An in-memory ledger (for tests and the simulator): same schema and
    /// rules, no durability. It starts as a copy of one migrated once per
    /// process.
    pub fn open_in_memory() -> Result<Ledger, LedgerError> {
        let mut conn = Connection::open_in_memory()?;
        copy_migrated_template(&mut conn)?;
        Ledger::setup(conn, None)
    }

    /// The file behind the ledger, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Schema version of the open ledger.
    pub fn schema_version(&self) -> Result<u32, LedgerError> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))?)
    }

    /// A count that changes whenever the data this connection reads may
    /// have changed, or `None` when there is no such count: what answers
    /// read from the ledger are remembered by.
    ///
    /// SQLite's [`Connection::total_changes`] counts every row this
    /// connection inserted, updated or deleted by an `INSERT`, `UPDATE` or
    /// `DELETE`, triggers included. Every write of the ledger is such a
    /// statement: the schema (DDL, which the count misses) is only written
    /// before the [`Ledger`] exists, by [`migrate`] or by the copy of
    /// [`MIGRATED_TEMPLATE`], and nothing here runs `VACUUM` or restores a
    /// backup into an open ledger. The count misses two things, hence the
    /// `None`s:
    ///
    /// - Writes by other connections. An in-memory database belongs to its
    ///   one connection; a file may be written by another process (an
    ///   operator's `sqlite3` shell, a second agent), so file ledgers
    ///   remember nothing.
    /// - A rollback, which undoes rows without uncounting them: an answer
    ///   read inside a transaction could outlive the rows it saw. Outside
    ///   one, every read sees committed data, which only a counted write
    ///   changes (a transaction rolled back leaves it as it was).
    fn changes_seen(&self) -> Option<u64> {
        (self.path.is_none() && self.conn.is_autocommit()).then(|| self.conn.total_changes())
    }

    fn setup(mut conn: Connection, path: Option<PathBuf>) -> Result<Ledger, LedgerError> {
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Room for every statement of this crate, so the hot ones are
        // compiled once per connection rather than once per call.
        conn.set_prepared_statement_cache_capacity(STATEMENTS_CACHED_MAX);
        // The query planner stability guarantee: a plan never depends on
        // the values bound. Without it, the bundled SQLite (built with
        // STAT4) marks statements such as those with an ORDER BY to be
        // recompiled whenever their bindings change, and the statement cache
        // clears the bindings of every statement it takes back: each cached
        // statement was compiled anew on every use.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        migrate(&mut conn)?;
        Ok(Ledger {
            conn,
            path,
            lease_expiry_memo: Cell::new(None),
        })
    }
}

/// An empty in-memory ledger migrated by [`Ledger::setup`], once per
/// process, that [`Ledger::open_in_memory`] copies: migrating costs far more
/// than copying (SQLite parses each migration's DDL, and re-reads the
/// whole schema after each `ALTER TABLE`), and the simulator opens a
/// thousand ledgers. `None` if it could not be built.
static MIGRATED_TEMPLATE: OnceLock<Option<Mutex<Connection>>> = OnceLock::new();

/// Fills the empty in-memory database of `conn` with the pages of
/// [`MIGRATED_TEMPLATE`], so that [`Ledger::setup`] finds its schema
/// current. The copy is of the database only: what `setup` sets on the
/// connection (pragmas, database config, the statement cache) is set on
/// `conn` as on any other. Without a template, `conn` is left empty and
/// `setup` migrates it, saying what failed.
fn copy_migrated_template(conn: &mut Connection) -> Result<(), LedgerError> {
    let template = MIGRATED_TEMPLATE.get_or_init(|| {
        match Connection::open_in_memory()
            .map_err(LedgerError::from)
            .and_then(|template| Ledger::setup(template, None))
        {
            Ok(ledger) => Some(Mutex::new(ledger.conn)),
            Err(e) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "cannot build the in-memory ledger template"
                );
                None
            }
        }
    });
    let Some(template) = template else {
        return Ok(());
    };
    // The template is only ever read, so a panic while it was locked left
    // it whole.
    let template = template.lock().unwrap_or_else(PoisonError::into_inner);
    let step = Backup::new(&template, conn)?.step(-1)?;
    // Nothing else can lock either database: the template is behind the
    // mutex, and `conn` is new and private to this thread.
    assert_eq!(
        step,
        StepResult::Done,
        "a private in-memory database is copied whole in one step"
    );
    Ok(())
}

/// Brings the schema to the newest version, one migration per transaction.
fn migrate(conn: &mut Connection) -> Result<(), LedgerError> {
    let supported = u32::try_from(schema::MIGRATIONS.len()).expect("a handful of migrations");
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        let found: u32 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if found > supported {
            return Err(LedgerError::SchemaTooNew { found, supported });
        }
        if found == supported {
            return Ok(());
        }
        let index = usize::try_from(found).expect("u32 fits usize");
        tx.execute_batch(schema::MIGRATIONS[index])?;
        tx.pragma_update(None, "user_version", found + 1)?;
        tx.commit()?;
        tracing::info!(version = found + 1, "migrated ledger schema");
    }
}

/// Gives a fieldless state enum the names it is stored under and shown as,
/// from one list of `Variant => "name"` pairs: `as_str`, its inverse `parse`
/// (`None` for a name not in the list) and `Display`. A variant missing from
/// the list fails to compile (the match in `as_str` is not exhaustive).
macro_rules! state_names {
    ($state:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $state {
            /// The name stored in the database and shown to users.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($state::$variant => $name,)+
                }
            }

            /// The state stored as `text` (see [`Self::as_str`]).
            pub(crate) fn parse(text: &str) -> Option<$state> {
                match text {
                    $($name => Some($state::$variant),)+
                    _ => None,
                }
            }

            /// Every state, in declaration order.
            pub const ALL: &'static [$state] = &[$($state::$variant),+];
        }

        impl std::fmt::Display for $state {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use state_names;

/// Runs one statement through the connection's statement cache. The ledger
/// issues the same few dozen statements over and over (the simulator runs
/// a thousand ledgers in one process), and compiling SQL text on each call
/// cost more than running it.
fn execute_cached(conn: &Connection, sql: &str, params: impl Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// Reads one row through the statement cache (see [`execute_cached`]).
fn query_row_cached<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

fn to_sql_u64(value: u64) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::Invalid(format!("{value} is too large to store")))
}

/// Reads a column written from a `u64`; SQLite stores it as a non-negative `i64`.
fn get_u64(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(index)?;
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, value))
}

#[cfg(test)]
mod tests;
