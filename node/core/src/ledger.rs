//! How the site core reaches the ledger it is handed.

use vcfed_storage::Ledger;

/// How a core reaches the ledger: one closure per ledger operation, so that
/// a shell whose ledger is shared (the agent: behind a mutex, between the
/// federation thread, the runner and the API) never holds it across work
/// that is not the ledger's (driver commands, the registry's gossip).
pub trait LedgerAccess {
    /// Runs `op` on the ledger.
    fn with<T>(&mut self, op: impl FnOnce(&mut Ledger) -> T) -> T;
}

impl LedgerAccess for &mut Ledger {
    fn with<T>(&mut self, op: impl FnOnce(&mut Ledger) -> T) -> T {
        op(self)
    }
}
