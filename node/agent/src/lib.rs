//! vcfed, the site agent of federated virtual clusters.
//!
//! Every site runs this same agent. This crate is the shell around the
//! protocol cores: it owns the CLI, the daemon (`vcfed run`), the local HTTP
//! API and, through the other crates, the ledger, the federation and the
//! overlay. Protocol decisions belong in sans-IO cores; here they meet
//! tokio, sockets, files and the wall clock.
//!
//! The binary `vcfed` is a thin `main` over [`cli`].

/// `println!` for the CLI's output: a closed stdout ends the command
/// quietly instead of panicking (see [`out`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}

pub mod agent;
pub mod api;
pub mod api_types;
pub mod cli;
pub mod client;
mod cluster_cli;
pub mod config;
pub mod demo;
pub mod driver;
mod events_cli;
pub mod federation;
mod gateway;
pub mod gateway_config;
pub mod identity;
pub mod ledger;
mod links;
pub mod metrics;
pub mod out;
mod runner;
mod simnet_cli;
pub mod time;
mod usage;
mod write_deadline;
