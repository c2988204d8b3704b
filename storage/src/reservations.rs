//! The `reservations` table: the calendar of holds and commitments of node
//! slots over time windows, with their leases.

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::calendar::free_steps;
use crate::events::record_event;
use crate::inventory::{capacity, node_shape};
use crate::{
    EVENTS_MAX, INSTANT_MS_MAX, KEY_LEN_MAX, LEASE_MS_MAX, Ledger, LedgerError, NAME_LEN_MAX,
    NodeShape, Step, Usage, Window, execute_cached, get_u64, min_free, peak_usage,
    query_row_cached, to_sql_u64,
};

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

crate::state_names!(ReservationState {
    Held => "held",
    Committed => "committed",
    Released => "released",
    Expired => "expired",
});

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

/// One answer of [`Ledger::next_lease_expiry`] and what it depended on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseExpiryMemo {
    /// [`Connection::total_changes`] when the answer was read.
    changes: u64,
    /// The argument asked with.
    after_ms: i64,
    /// The answer.
    lease_expires_at_ms: Option<i64>,
}

impl Ledger {
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

    /// How many reservations are in each state as of `now_ms`, every
    /// state listed (in declaration order) even when none is in it. A hold
    /// whose lease ran out counts as expired, as [`Reservation::counts_at`]
    /// sees it, whether or not a sweep has rewritten it yet.
    pub fn reservation_counts(
        &self,
        now_ms: i64,
    ) -> Result<Vec<(ReservationState, u64)>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT CASE WHEN state = 'held' AND lease_expires_at_ms <= ?1 THEN 'expired'
                    ELSE state END AS shown, COUNT(*)
             FROM reservations GROUP BY shown",
        )?;
        let rows = stmt
            .query_map(params![now_ms], |row| {
                Ok((row.get::<_, String>(0)?, crate::get_u64(row, 1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        count_states(
            "reservations",
            ReservationState::ALL,
            ReservationState::parse,
            rows,
        )
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

/// Spreads `(stored name, count)` rows over `all` states, zero where no row
/// names one. A name outside `all` means the table holds what this build
/// never writes.
pub(crate) fn count_states<S: Copy + PartialEq>(
    table: &'static str,
    all: &[S],
    parse: fn(&str) -> Option<S>,
    rows: Vec<(String, u64)>,
) -> Result<Vec<(S, u64)>, LedgerError> {
    let mut counts: Vec<(S, u64)> = all.iter().map(|state| (*state, 0)).collect();
    for (name, count) in rows {
        let Some(state) = parse(&name) else {
            return Err(LedgerError::Corrupt {
                table,
                column: "state",
                detail: format!("unknown state {name:?}"),
            });
        };
        let slot = counts
            .iter_mut()
            .find(|(s, _)| *s == state)
            .expect("`all` lists every state `parse` returns");
        slot.1 += count;
    }
    Ok(counts)
}
