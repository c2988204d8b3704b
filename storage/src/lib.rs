//! The durable ledger of one vcfed site, in SQLite.
//!
//! The ledger owns what a site must not forget across a crash: its inventory,
//! the reservation calendar (holds and commitments of node slots over time
//! windows), the clusters it masters or serves, the federation peers it knows
//! and an event log. Everything goes through the typed [`Ledger`] API; no SQL
//! lives outside this crate.
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
mod schema;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::config::DbConfig;
use rusqlite::{
    Connection, OptionalExtension, Params, Row, Transaction, TransactionBehavior, params,
};
use serde::{Deserialize, Serialize};

pub use calendar::{Step, Usage, Window, free_steps, min_free, peak_usage};

/// Longest accepted idempotency key, in bytes.
pub const KEY_LEN_MAX: usize = 200;
/// Longest accepted cluster id or site name stored with a reservation, in bytes.
pub const NAME_LEN_MAX: usize = 200;
/// Longest lease a hold may have, ms (a week).
pub const LEASE_MS_MAX: i64 = 7 * 86_400_000;
/// Latest instant the calendar accepts: the end of year 9999, unix ms.
pub const INSTANT_MS_MAX: i64 = 253_402_300_799_999;
/// Addresses remembered per peer; the oldest are forgotten first.
pub const PEER_ADDRS_MAX: usize = 16;
/// Events kept in the event log; older ones are pruned by the sweep.
pub const EVENTS_MAX: i64 = 100_000;
/// Compiled statements kept per connection: more than this module has, so
/// none is ever evicted and recompiled.
const STATEMENTS_CACHED_MAX: usize = 64;

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

/// The per-node shape: what one node slot offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeShape {
    /// CPU cores.
    pub cores: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB.
    pub disk_gib: u64,
}

impl NodeShape {
    /// Whether a node of this shape fits into a slot of shape `slot`.
    pub fn fits_in(&self, slot: &NodeShape) -> bool {
        self.cores <= slot.cores
            && self.memory_mib <= slot.memory_mib
            && self.disk_gib <= slot.disk_gib
    }
}

impl std::fmt::Display for NodeShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cores, {} MiB memory, {} GiB disk",
            self.cores, self.memory_mib, self.disk_gib
        )
    }
}

/// One physical host of the inventory and the node slots it provides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryHost {
    /// Host name.
    pub name: String,
    /// CPU cores.
    pub cores: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB.
    pub disk_gib: u64,
    /// Node slots of the site's node shape this host holds.
    pub slots: u32,
}

/// The site's inventory as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Shape of one node slot.
    pub node: NodeShape,
    /// Hosts and their slots.
    pub hosts: Vec<InventoryHost>,
}

impl Inventory {
    /// Total node slots.
    pub fn slots(&self) -> u32 {
        self.hosts
            .iter()
            .fold(0u32, |sum, host| sum.saturating_add(host.slots))
    }
}

/// Life of a reservation: `held` → `committed` → `released`, or `held` →
/// `released` | `expired`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    /// Taken for a lease; counts until the lease runs out.
    Held,
    /// Confirmed by its requester; counts until its window ends or it is released.
    Committed,
    /// Given back by its requester.
    Released,
    /// Its lease ran out before a commit.
    Expired,
}

impl ReservationState {
    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Held => "held",
            ReservationState::Committed => "committed",
            ReservationState::Released => "released",
            ReservationState::Expired => "expired",
        }
    }

    fn parse(text: &str) -> Option<ReservationState> {
        Some(match text {
            "held" => ReservationState::Held,
            "committed" => ReservationState::Committed,
            "released" => ReservationState::Released,
            "expired" => ReservationState::Expired,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ReservationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a requester asks to hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRequest {
    /// Idempotency key: the same key always names the same reservation.
    pub key: String,
    /// Cluster the nodes are for.
    pub cluster_id: String,
    /// Site asking (the cluster's master); only it may commit or release.
    pub requester: String,
    /// When the nodes are needed.
    pub window: Window,
    /// How many nodes.
    pub nodes: u32,
    /// Shape of each node; must fit the site's node slot.
    pub shape: NodeShape,
    /// How long the hold lasts without a commit, ms.
    pub lease_ms: i64,
}

/// A reservation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Idempotency key.
    pub key: String,
    /// Cluster the nodes are for.
    pub cluster_id: String,
    /// Site that took it.
    pub requester: String,
    /// When the nodes are taken.
    pub window: Window,
    /// How many nodes.
    pub nodes: u32,
    /// Shape of each node.
    pub shape: NodeShape,
    /// Current state.
    pub state: ReservationState,
    /// For a hold: when its lease runs out, unix ms.
    pub lease_expires_at_ms: Option<i64>,
    /// When the hold was taken, unix ms.
    pub created_at_ms: i64,
    /// Last state change, unix ms.
    pub updated_at_ms: i64,
}

impl Reservation {
    /// Whether the reservation takes capacity at `now_ms` (for its window).
    pub fn counts_at(&self, now_ms: i64) -> bool {
        match self.state {
            ReservationState::Committed => true,
            ReservationState::Held => self.lease_expires_at_ms.is_some_and(|at| at > now_ms),
            ReservationState::Released | ReservationState::Expired => false,
        }
    }
}

/// The answer to a hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum HoldOutcome {
    /// The nodes are held (or were already, under the same key: then the
    /// reservation may also be committed).
    Held(Reservation),
    /// Not enough free nodes in the window; nothing was written.
    Denied {
        /// The fewest free nodes at any instant of the window.
        available: u32,
    },
}

/// Which reservations to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReservationFilter {
    /// All of them.
    #[default]
    All,
    /// Only those that take capacity now (committed, or held with a live lease).
    Active,
}

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

impl ClusterState {
    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterState::Requested => "requested",
            ClusterState::Reserving => "reserving",
            ClusterState::Reserved => "reserved",
            ClusterState::Starting => "starting",
            ClusterState::Running => "running",
            ClusterState::Stopping => "stopping",
            ClusterState::Finished => "finished",
            ClusterState::Failed => "failed",
        }
    }

    /// Whether the cluster's life is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, ClusterState::Finished | ClusterState::Failed)
    }

    fn parse(text: &str) -> Option<ClusterState> {
        Some(match text {
            "requested" => ClusterState::Requested,
            "reserving" => ClusterState::Reserving,
            "reserved" => ClusterState::Reserved,
            "starting" => ClusterState::Starting,
            "running" => ClusterState::Running,
            "stopping" => ClusterState::Stopping,
            "finished" => ClusterState::Finished,
            "failed" => ClusterState::Failed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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

impl PartState {
    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            PartState::Reserving => "reserving",
            PartState::Held => "held",
            PartState::Committing => "committing",
            PartState::Committed => "committed",
            PartState::Releasing => "releasing",
            PartState::Released => "released",
        }
    }

    fn parse(text: &str) -> Option<PartState> {
        Some(match text {
            "reserving" => PartState::Reserving,
            "held" => PartState::Held,
            "committing" => PartState::Committing,
            "committed" => PartState::Committed,
            "releasing" => PartState::Releasing,
            "released" => PartState::Released,
            _ => return None,
        })
    }
}

impl std::fmt::Display for PartState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    /// When this site learnt of it, unix ms.
    pub created_at_ms: i64,
    /// Last state change, unix ms.
    pub updated_at_ms: i64,
}

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

/// The ledger: one SQLite connection with the schema migrated to the current
/// version. Not shared between threads; wrap it in a mutex to share.
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    path: Option<PathBuf>,
    /// The last answer of [`Ledger::next_lease_expiry`], kept while nothing
    /// was written since (see [`Ledger::changes_seen`]).
    lease_expiry_memo: Cell<Option<LeaseExpiryMemo>>,
}

/// One answer of [`Ledger::next_lease_expiry`] and what it depended on.
#[derive(Debug, Clone, Copy)]
struct LeaseExpiryMemo {
    /// [`Connection::total_changes`] when the answer was read.
    changes: u64,
    /// The argument asked with.
    after_ms: i64,
    /// The answer.
    lease_expires_at_ms: Option<i64>,
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

    /// Replaces the inventory (the config is its source of truth). Existing
    /// reservations are kept even if they no longer fit: shrinking a site
    /// never silently drops what was promised.
    pub fn set_inventory(&mut self, inventory: &Inventory, now_ms: i64) -> Result<(), LedgerError> {
        let previous = self.inventory()?;
        if previous.as_ref() == Some(inventory) {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        execute_cached(&tx, "DELETE FROM inventory", [])?;
        for host in &inventory.hosts {
            execute_cached(
                &tx,
                "INSERT INTO inventory (name, cores, memory_mib, disk_gib, slots) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    host.name,
                    host.cores,
                    to_sql_u64(host.memory_mib)?,
                    to_sql_u64(host.disk_gib)?,
                    host.slots
                ],
            )?;
        }
        let shape = serde_json::to_string(&inventory.node)
            .map_err(|e| LedgerError::Invalid(e.to_string()))?;
        execute_cached(
            &tx,
            "INSERT INTO settings (key, value) VALUES ('node_shape', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![shape],
        )?;
        record_event(
            &tx,
            now_ms,
            "inventory.set",
            "inventory",
            serde_json::json!({ "slots": inventory.slots(), "hosts": inventory.hosts.len() }),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The stored inventory, or `None` before the first [`Ledger::set_inventory`].
    pub fn inventory(&self) -> Result<Option<Inventory>, LedgerError> {
        let Some(node) = node_shape(&self.conn)? else {
            return Ok(None);
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, cores, memory_mib, disk_gib, slots FROM inventory ORDER BY name",
        )?;
        let hosts = stmt
            .query_map([], |row| {
                Ok(InventoryHost {
                    name: row.get(0)?,
                    cores: row.get(1)?,
                    memory_mib: get_u64(row, 2)?,
                    disk_gib: get_u64(row, 3)?,
                    slots: row.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Inventory { node, hosts }))
    }

    /// Total node slots of the site (0 before an inventory is set).
    pub fn capacity(&self) -> Result<u32, LedgerError> {
        capacity(&self.conn)
    }

    /// The highest capacity-advert version this site has used (0 if none).
    pub fn advert_version(&self) -> Result<u64, LedgerError> {
        let value: Option<String> = query_row_cached(
            &self.conn,
            "SELECT value FROM settings WHERE key = 'advert_version'",
            [],
            |row| row.get(0),
        )
        .optional()?;
        value
            .map(|text| {
                text.parse().map_err(|_| LedgerError::Corrupt {
                    table: "settings",
                    column: "value",
                    detail: format!("advert_version {text:?} is not a number"),
                })
            })
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// Records that the site used advert `version`; the stored value never
    /// goes down, so a restart always continues above every version sent.
    pub fn set_advert_version(&mut self, version: u64) -> Result<(), LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = {
            let value: Option<String> = query_row_cached(
                &tx,
                "SELECT value FROM settings WHERE key = 'advert_version'",
                [],
                |row| row.get(0),
            )
            .optional()?;
            value.and_then(|text| text.parse::<u64>().ok()).unwrap_or(0)
        };
        if version > current {
            execute_cached(
                &tx,
                "INSERT INTO settings (key, value) VALUES ('advert_version', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![version.to_string()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Holds `request.nodes` nodes over `request.window` for `request.lease_ms`,
    /// atomically: either the nodes fit at every instant of the window and the
    /// hold is written (durably), or nothing is written and the answer says
    /// how many nodes were free.
    ///
    /// Repeating a hold with the same key and the same parameters returns the
    /// stored reservation (held or committed) and books nothing more.
    pub fn hold(&mut self, request: &HoldRequest, now_ms: i64) -> Result<HoldOutcome, LedgerError> {
        validate_hold(request)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(existing) = reservation_by_key(&tx, &request.key)? {
            if !same_request(&existing, request) {
                return Err(LedgerError::KeyConflict(request.key.clone()));
            }
            return match existing.state {
                ReservationState::Held if !existing.counts_at(now_ms) => {
                    Err(LedgerError::WrongState {
                        key: existing.key,
                        state: ReservationState::Expired,
                        operation: "hold",
                    })
                }
                ReservationState::Held | ReservationState::Committed => {
                    Ok(HoldOutcome::Held(existing))
                }
                state @ (ReservationState::Released | ReservationState::Expired) => {
                    Err(LedgerError::WrongState {
                        key: existing.key,
                        state,
                        operation: "hold",
                    })
                }
            };
        }

        let node = node_shape(&tx)?;
        let capacity = if node.is_some_and(|slot| request.shape.fits_in(&slot)) {
            capacity(&tx)?
        } else {
            0
        };
        let usages = active_usages(&tx, request.window, now_ms)?;
        let peak = peak_usage(&usages, request.window);
        if peak + u64::from(request.nodes) > u64::from(capacity) {
            let available = min_free(capacity, &usages, request.window);
            return Ok(HoldOutcome::Denied { available });
        }

        let lease_expires_at_ms = now_ms.saturating_add(request.lease_ms);
        execute_cached(
            &tx,
            "INSERT INTO reservations (idem_key, cluster_id, requester, start_ms, end_ms, nodes,
                 cores, memory_mib, disk_gib, state, lease_expires_at_ms, created_at_ms, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'held', ?10, ?11, ?11)",
            params![
                request.key,
                request.cluster_id,
                request.requester,
                request.window.start_ms,
                request.window.end_ms,
                request.nodes,
                request.shape.cores,
                to_sql_u64(request.shape.memory_mib)?,
                to_sql_u64(request.shape.disk_gib)?,
                lease_expires_at_ms,
                now_ms,
            ],
        )?;
        record_event(
            &tx,
            now_ms,
            "reservation.held",
            &request.key,
            serde_json::json!({
                "cluster_id": request.cluster_id,
                "requester": request.requester,
                "nodes": request.nodes,
                "start_ms": request.window.start_ms,
                "end_ms": request.window.end_ms,
                "lease_expires_at_ms": lease_expires_at_ms,
            }),
        )?;
        let stored = reservation_by_key(&tx, &request.key)?
            .expect("the row was inserted in this transaction");
        tx.commit()?;
        Ok(HoldOutcome::Held(stored))
    }

    /// Commits the hold `key` for `requester`. Committing a committed
    /// reservation is a no-op that returns it; a hold whose lease has run out
    /// cannot be committed (and is marked expired).
    pub fn commit(
        &mut self,
        key: &str,
        requester: &str,
        now_ms: i64,
    ) -> Result<Reservation, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing = owned_reservation(&tx, key, requester)?;
        match existing.state {
            ReservationState::Committed => return Ok(existing),
            ReservationState::Held if existing.counts_at(now_ms) => {}
            ReservationState::Held => {
                set_state(&tx, key, ReservationState::Expired, now_ms)?;
                tx.commit()?;
                return Err(LedgerError::WrongState {
                    key: key.to_owned(),
                    state: ReservationState::Expired,
                    operation: "commit",
                });
            }
            state @ (ReservationState::Released | ReservationState::Expired) => {
                return Err(LedgerError::WrongState {
                    key: key.to_owned(),
                    state,
                    operation: "commit",
                });
            }
        }
        let stored = set_state(&tx, key, ReservationState::Committed, now_ms)?;
        tx.commit()?;
        Ok(stored)
    }

    /// Releases the reservation `key` for `requester`, held or committed.
    /// Releasing a released or expired reservation is a no-op that returns it.
    pub fn release(
        &mut self,
        key: &str,
        requester: &str,
        now_ms: i64,
    ) -> Result<Reservation, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing = owned_reservation(&tx, key, requester)?;
        if matches!(
            existing.state,
            ReservationState::Released | ReservationState::Expired
        ) {
            return Ok(existing);
        }
        let stored = set_state(&tx, key, ReservationState::Released, now_ms)?;
        tx.commit()?;
        Ok(stored)
    }

    /// Marks every hold whose lease ran out by `now_ms` as expired, prunes the
    /// event log to [`EVENTS_MAX`] entries, and returns the expired holds.
    pub fn sweep_expired(&mut self, now_ms: i64) -> Result<Vec<Reservation>, LedgerError> {
        // Sweeps run every few seconds and almost always find nothing: one
        // read says so, where the write transaction would cost several
        // statements. The ledger has one writer (`&mut self`), so nothing
        // comes due between the read and the write.
        if !self.sweep_due(now_ms)? {
            return Ok(Vec::new());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let keys: Vec<String> = {
            let mut stmt = tx.prepare_cached(
                "SELECT idem_key FROM reservations WHERE state = 'held' AND lease_expires_at_ms <= ?1 ORDER BY id",
            )?;
            stmt.query_map(params![now_ms], |row| row.get(0))?
                .collect::<Result<_, _>>()?
        };
        let mut expired = Vec::with_capacity(keys.len());
        for key in &keys {
            expired.push(set_state(&tx, key, ReservationState::Expired, now_ms)?);
        }
        execute_cached(
            &tx,
            "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?1",
            params![EVENTS_MAX],
        )?;
        tx.commit()?;
        Ok(expired)
    }

    /// The earliest instant after `after_ms` at which the lease of a held
    /// reservation runs out (`None`: no lease runs out after then). Until
    /// that instant, and without a write, the holds that count (see
    /// [`Ledger::free_steps`]) stay the same; `i64::MIN` gives the earliest
    /// lease of all, run out or not: when [`Ledger::sweep_expired`] has work.
    pub fn next_lease_expiry(&self, after_ms: i64) -> Result<Option<i64>, LedgerError> {
        // The simulator asks this of a thousand ledgers every few seconds,
        // and most of them wrote nothing since they were last asked: the
        // answer is remembered until the next write.
        let changes = self.changes_seen();
        if let Some(changes) = changes
            && let Some(memo) = self.lease_expiry_memo.get()
            && memo.changes == changes
            && memo.after_ms == after_ms
        {
            return Ok(memo.lease_expires_at_ms);
        }
        let lease_expires_at_ms = query_row_cached(
            &self.conn,
            // Reads the held rows only (by the state index), a handful.
            "SELECT MIN(lease_expires_at_ms) FROM reservations
             WHERE state = 'held' AND lease_expires_at_ms > ?1",
            params![after_ms],
            |row| row.get(0),
        )?;
        if let Some(changes) = changes {
            self.lease_expiry_memo.set(Some(LeaseExpiryMemo {
                changes,
                after_ms,
                lease_expires_at_ms,
            }));
        }
        Ok(lease_expires_at_ms)
    }

    /// The reservation with idempotency key `key`.
    pub fn reservation(&self, key: &str) -> Result<Option<Reservation>, LedgerError> {
        reservation_by_key(&self.conn, key)
    }

    /// Reservations, oldest first.
    pub fn reservations(
        &self,
        filter: ReservationFilter,
        now_ms: i64,
    ) -> Result<Vec<Reservation>, LedgerError> {
        // Active: what `Reservation::counts_at` keeps, chosen by SQLite
        // rather than decoded first (released and expired ones pile up).
        let condition = match filter {
            ReservationFilter::All => "?1 IS NOT NULL",
            ReservationFilter::Active => {
                "state = 'committed' OR (state = 'held' AND lease_expires_at_ms > ?1)"
            }
        };
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE {condition} ORDER BY id"
        ))?;
        let found = stmt
            .query_map(params![now_ms], reservation_from_row)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        debug_assert!(
            filter == ReservationFilter::All || found.iter().all(|r| r.counts_at(now_ms)),
            "the SQL condition is counts_at"
        );
        Ok(found)
    }

    /// Free node slots over `window` as steps, as of `now_ms` (holds whose
    /// lease has run out by then are free).
    pub fn free_steps(&self, window: Window, now_ms: i64) -> Result<Vec<Step>, LedgerError> {
        let usages = active_usages(&self.conn, window, now_ms)?;
        Ok(free_steps(capacity(&self.conn)?, &usages, window))
    }

    /// The fewest free node slots at any instant of `window`, as of `now_ms`.
    pub fn available(&self, window: Window, now_ms: i64) -> Result<u32, LedgerError> {
        let usages = active_usages(&self.conn, window, now_ms)?;
        Ok(min_free(capacity(&self.conn)?, &usages, window))
    }

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
            "INSERT INTO clusters (id, name, master_site, request_json, state, reason, created_at_ms, updated_at_ms, segment)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
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

    /// Whether [`Ledger::sweep_expired`] has anything to do at `now_ms`: a
    /// hold whose lease ran out, or more than [`EVENTS_MAX`] events (the
    /// conditions of its statements, so that skipping them changes
    /// nothing).
    fn sweep_due(&self, now_ms: i64) -> Result<bool, LedgerError> {
        if self
            .next_lease_expiry(i64::MIN)?
            .is_some_and(|at| at <= now_ms)
        {
            return Ok(true);
        }
        // Separate subqueries: MIN and MAX of `seq` are each one look at an
        // end of the rowid tree, where one query with both would scan the
        // log.
        let events_over: bool = query_row_cached(
            &self.conn,
            "SELECT COALESCE((SELECT MIN(seq) FROM events) <= (SELECT MAX(seq) FROM events) - ?1, 0)",
            params![EVENTS_MAX],
            |row| row.get(0),
        )?;
        Ok(events_over)
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
        // Room for every statement of this module, so the hot ones are
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

fn validate_hold(request: &HoldRequest) -> Result<(), LedgerError> {
    let invalid = |why: String| Err(LedgerError::Invalid(why));
    if request.key.is_empty() || request.key.len() > KEY_LEN_MAX {
        return invalid(format!("key must be 1 to {KEY_LEN_MAX} bytes"));
    }
    if request.cluster_id.is_empty() || request.cluster_id.len() > NAME_LEN_MAX {
        return invalid(format!("cluster id must be 1 to {NAME_LEN_MAX} bytes"));
    }
    if request.requester.is_empty() || request.requester.len() > NAME_LEN_MAX {
        return invalid(format!("requester must be 1 to {NAME_LEN_MAX} bytes"));
    }
    if request.window.start_ms >= request.window.end_ms {
        return invalid("window must end after it starts".to_owned());
    }
    if request.nodes == 0 {
        return invalid("nodes must be at least 1".to_owned());
    }
    if request.lease_ms <= 0 || request.lease_ms > LEASE_MS_MAX {
        return invalid(format!(
            "lease must be between 1 ms and {} days",
            LEASE_MS_MAX / 86_400_000
        ));
    }
    if !(0..=INSTANT_MS_MAX).contains(&request.window.start_ms)
        || request.window.end_ms > INSTANT_MS_MAX
    {
        return invalid("window must lie between 1970 and 9999".to_owned());
    }
    Ok(())
}

fn same_request(existing: &Reservation, request: &HoldRequest) -> bool {
    existing.cluster_id == request.cluster_id
        && existing.requester == request.requester
        && existing.window == request.window
        && existing.nodes == request.nodes
        && existing.shape == request.shape
}

fn to_sql_u64(value: u64) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::Invalid(format!("{value} is too large to store")))
}

/// Reads a column written from a `u64`; SQLite stores it as a non-negative `i64`.
fn get_u64(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(index)?;
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, value))
}

fn node_shape(conn: &Connection) -> Result<Option<NodeShape>, LedgerError> {
    let shape: Option<String> = query_row_cached(
        conn,
        "SELECT value FROM settings WHERE key = 'node_shape'",
        [],
        |row| row.get(0),
    )
    .optional()?;
    shape
        .map(|text| {
            serde_json::from_str(&text).map_err(|e| LedgerError::Corrupt {
                table: "settings",
                column: "value",
                detail: e.to_string(),
            })
        })
        .transpose()
}

fn capacity(conn: &Connection) -> Result<u32, LedgerError> {
    let slots: i64 = query_row_cached(
        conn,
        "SELECT COALESCE(SUM(slots), 0) FROM inventory",
        [],
        |row| row.get(0),
    )?;
    Ok(u32::try_from(slots).unwrap_or(u32::MAX))
}

/// Reservations that take capacity at `now_ms` and overlap `window`.
fn active_usages(
    conn: &Connection,
    window: Window,
    now_ms: i64,
) -> Result<Vec<Usage>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT start_ms, end_ms, nodes FROM reservations
         WHERE (state = 'committed' OR (state = 'held' AND lease_expires_at_ms > ?3))
           AND start_ms < ?2 AND end_ms > ?1",
    )?;
    let rows = stmt.query_map(params![window.start_ms, window.end_ms, now_ms], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, u32>(2)?,
        ))
    })?;
    let mut usages = Vec::new();
    for row in rows {
        let (start_ms, end_ms, nodes) = row?;
        usages.push(usage(start_ms, end_ms, nodes)?);
    }
    Ok(usages)
}

fn usage(start_ms: i64, end_ms: i64, nodes: u32) -> Result<Usage, LedgerError> {
    let window = Window::new(start_ms, end_ms).ok_or(LedgerError::Corrupt {
        table: "reservations",
        column: "end_ms",
        detail: format!("window {start_ms}..{end_ms} is empty"),
    })?;
    Ok(Usage { window, nodes })
}

const RESERVATION_COLUMNS: &str = "idem_key, cluster_id, requester, start_ms, end_ms, nodes, cores, memory_mib, \
     disk_gib, state, lease_expires_at_ms, created_at_ms, updated_at_ms";

fn reservation_by_key(conn: &Connection, key: &str) -> Result<Option<Reservation>, LedgerError> {
    query_row_cached(
        conn,
        &format!("SELECT {RESERVATION_COLUMNS} FROM reservations WHERE idem_key = ?1"),
        params![key],
        reservation_from_row,
    )
    .optional()?
    .transpose()
}

/// Decodes a row of [`RESERVATION_COLUMNS`]. The outer `Result` is SQLite's,
/// the inner one reports values that do not decode.
fn reservation_from_row(row: &Row<'_>) -> rusqlite::Result<Result<Reservation, LedgerError>> {
    let state: String = row.get(9)?;
    let start_ms: i64 = row.get(3)?;
    let end_ms: i64 = row.get(4)?;
    let memory_mib = get_u64(row, 7)?;
    let disk_gib = get_u64(row, 8)?;
    let state = match ReservationState::parse(&state) {
        Some(state) => state,
        None => {
            return Ok(Err(LedgerError::Corrupt {
                table: "reservations",
                column: "state",
                detail: format!("unknown state {state:?}"),
            }));
        }
    };
    let Some(window) = Window::new(start_ms, end_ms) else {
        return Ok(Err(LedgerError::Corrupt {
            table: "reservations",
            column: "end_ms",
            detail: format!("window {start_ms}..{end_ms} is empty"),
        }));
    };
    Ok(Ok(Reservation {
        key: row.get(0)?,
        cluster_id: row.get(1)?,
        requester: row.get(2)?,
        window,
        nodes: row.get(5)?,
        shape: NodeShape {
            cores: row.get(6)?,
            memory_mib,
            disk_gib,
        },
        state,
        lease_expires_at_ms: row.get(10)?,
        created_at_ms: row.get(11)?,
        updated_at_ms: row.get(12)?,
    }))
}

/// The reservation `key`, if `requester` owns it.
fn owned_reservation(
    tx: &Transaction<'_>,
    key: &str,
    requester: &str,
) -> Result<Reservation, LedgerError> {
    let existing = reservation_by_key(tx, key)?
        .ok_or_else(|| LedgerError::UnknownReservation(key.to_owned()))?;
    if existing.requester != requester {
        return Err(LedgerError::NotOwner {
            key: key.to_owned(),
            owner: existing.requester,
            requester: requester.to_owned(),
        });
    }
    Ok(existing)
}

/// Moves reservation `key` to `state`, logs it and returns the new row.
fn set_state(
    tx: &Transaction<'_>,
    key: &str,
    state: ReservationState,
    now_ms: i64,
) -> Result<Reservation, LedgerError> {
    // A committed reservation no longer has a lease; other states keep the
    // lease they had for the record.
    let changed = execute_cached(
        tx,
        "UPDATE reservations
         SET state = ?2,
             lease_expires_at_ms = CASE WHEN ?2 = 'committed' THEN NULL ELSE lease_expires_at_ms END,
             updated_at_ms = ?3
         WHERE idem_key = ?1",
        params![key, state.as_str(), now_ms],
    )?;
    assert_eq!(
        changed, 1,
        "set_state is only called for a reservation read in the same transaction"
    );
    record_event(
        tx,
        now_ms,
        &format!("reservation.{state}"),
        key,
        serde_json::json!({}),
    )?;
    Ok(reservation_by_key(tx, key)?.expect("the row was updated in this transaction"))
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
            "INSERT INTO cluster_parts (cluster_id, site, peer_id, attempt, nodes, frontend, state, reservation_key, gateway_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
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
            ],
        )?;
    }
    Ok(())
}

/// The parts of one cluster, the frontend's first.
const CLUSTER_PARTS_SQL: &str =
    "SELECT site, peer_id, attempt, nodes, frontend, state, reservation_key, gateway_json
     FROM cluster_parts WHERE cluster_id = ?1 ORDER BY frontend DESC, site, attempt";

fn cluster_by_id(conn: &Connection, id: &str) -> Result<Option<ClusterRecord>, LedgerError> {
    let row = query_row_cached(
        conn,
        "SELECT id, name, master_site, request_json, state, reason, created_at_ms, updated_at_ms, segment
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
    }))
}

const PEER_COLUMNS: &str = "peer_id, site_name, addrs_json, first_seen_ms, last_seen_ms";

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

fn record_event(
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

#[cfg(test)]
mod tests;
