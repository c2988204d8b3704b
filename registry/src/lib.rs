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
//! identify, ping) is a thin shell around the core.
