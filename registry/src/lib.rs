//! Federation discovery for vcfed: who the sites are and what they can hold.
//!
//! This crate owns the gossip of capacity adverts between sites, the federation
//! view built from them, failure detection (alive, suspect, gone) and worker
//! selection for a cluster request. There is no central registry: every agent
//! runs the same code and any member's address is enough to join.
//!
//! # Layering
//!
//! The protocol core is sans-IO: it takes `now` and inputs as arguments and
//! hands back messages to send, timers and events. It must not depend on
//! tokio, libp2p, rusqlite or netlink, nor read a clock or a random source it
//! was not handed; that is what lets `vcfed-simnet` drive it on a virtual
//! clock. The libp2p adapter (transport, pnet, gossipsub, request-response,
//! identify, ping) is a thin shell around the core, behind the `p2p` cargo
//! feature (on by default): with `default-features = false` the crate is
//! the core alone and builds without tokio or libp2p.
//!
//! `libp2p-identity` is allowed in the core: it is pure key and peer-id
//! arithmetic (Ed25519 signatures, peer id derivation), with no I/O.
//! `vcfed-storage` is a dependency for one plain type, [`NodeShape`], so
//! that the shape a site advertises is the one its ledger stores; the core
//! calls nothing of it that touches SQLite.

pub mod advert;
pub mod core;
#[cfg(feature = "p2p")]
pub mod p2p;
pub mod wire;

#[cfg(test)]
mod tests;

pub use advert::{
    Advert, AdvertVerifier, CapacitySummary, GatewayInfo, NodeShape, SignedAdvert, VerifiedAdvert,
};
pub use core::{
    Candidate, LocalAdvert, Registry, RegistryConfig, RegistryEvent, RegistryStats, SiteState,
    SiteView, Transmit, Verdict, Warming,
};
