//! The ledger shared by the agent's tasks.
//!
//! SQLite calls block, so they run on tokio's blocking pool, one at a time
//! behind a mutex: SQLite serialises writers anyway, and a caller gets its
//! answer only once the transaction is on disk.

use std::sync::{Arc, Mutex, PoisonError};

use vcfed_node_core::ledger::LedgerAccess;
use vcfed_storage::{Ledger, LedgerError};

/// A handle to the site's ledger; cheap to clone.
#[derive(Clone)]
pub struct SharedLedger(Arc<Mutex<Ledger>>);

impl std::fmt::Debug for SharedLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedLedger")
    }
}

impl SharedLedger {
    /// Shares `ledger`.
    pub fn new(ledger: Ledger) -> SharedLedger {
        SharedLedger(Arc::new(Mutex::new(ledger)))
    }

    /// Runs `operation` on the ledger on the calling thread, blocking it.
    /// Only for threads that may block (the federation thread).
    pub fn blocking<T>(&self, operation: impl FnOnce(&mut Ledger) -> T) -> T {
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        operation(&mut guard)
    }

    /// Runs `operation` on the ledger on the blocking pool.
    pub async fn run<T, F>(&self, operation: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Ledger) -> Result<T, LedgerError> + Send + 'static,
    {
        let ledger = self.0.clone();
        let joined = tokio::task::spawn_blocking(move || {
            // A panic inside a ledger call rolls its transaction back when
            // the transaction drops, so a poisoned lock still guards a sound
            // ledger.
            let mut guard = ledger.lock().unwrap_or_else(PoisonError::into_inner);
            operation(&mut guard)
        })
        .await;
        match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("a ledger task was cancelled, which the agent never does: {e}"),
        }
    }
}

/// The site core reaches the shared ledger one operation at a time, from a
/// thread that may block (the federation thread, the runner's round).
impl LedgerAccess for SharedLedger {
    fn with<T>(&mut self, op: impl FnOnce(&mut Ledger) -> T) -> T {
        self.blocking(op)
    }
}
