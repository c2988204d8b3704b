//! The reservation protocol's messages (`node/core/src/cluster/messages.rs`),
//! alone and inside the federation envelope, as a site receives them
//! (`node/core/src/federation.rs`, `cluster_payload`).
//!
//! Asserts: no panic; a message that decodes re-encodes to bytes that
//! decode to the same message, inside the envelope too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vcfed_node_core::cluster::ClusterMsg;
use vcfed_node_core::federation::cluster_payload;
use vcfed_registry::wire::{self, Message};

fn round_trip(msg: &ClusterMsg) {
    let bytes = msg.encode();
    assert_eq!(ClusterMsg::decode(&bytes).as_ref(), Some(msg));
    let envelope = wire::encode(&Message::Cluster(bytes));
    assert_eq!(cluster_payload(&envelope).as_ref(), Some(msg));
    assert!(!msg.label().is_empty());
}

fuzz_target!(|data: &[u8]| {
    if let Some(msg) = ClusterMsg::decode(data) {
        round_trip(&msg);
    }
    if let Some(msg) = cluster_payload(data) {
        round_trip(&msg);
    }
});
