//! Bad usage of the `vcfed` command: a leaf module, so that the modules that check flags and
//! files (identity, gateway, federation, simnet, cluster commands) can report one without
//! depending on the CLI that maps it to exit code 2.

/// Bad usage: reported with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
