//! The `inventory` table and the `settings` it goes with: the site's hosts,
//! the shape of its node slots, its capacity and the capacity-advert version.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::events::record_event;
use crate::{Ledger, LedgerError, execute_cached, get_u64, query_row_cached, to_sql_u64};

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

impl Ledger {
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
}

pub(crate) fn node_shape(conn: &Connection) -> Result<Option<NodeShape>, LedgerError> {
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

pub(crate) fn capacity(conn: &Connection) -> Result<u32, LedgerError> {
    let slots: i64 = query_row_cached(
        conn,
        "SELECT COALESCE(SUM(slots), 0) FROM inventory",
        [],
        |row| row.get(0),
    )?;
    Ok(u32::try_from(slots).unwrap_or(u32::MAX))
}
