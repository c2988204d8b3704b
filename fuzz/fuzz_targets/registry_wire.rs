//! The federation's wire envelope (`registry/src/wire.rs`): every gossip
//! message, request and response between sites.
//!
//! Asserts: no panic; a message that decodes re-encodes to bytes that
//! decode to the same message; `decode_cluster` (which reads only the head
//! of what is not a cluster message) agrees with `decode`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vcfed_fuzz::MESSAGE_MAX_BYTES;
use vcfed_registry::wire::{self, Message};

fuzz_target!(|data: &[u8]| {
    let decoded = wire::decode(data, MESSAGE_MAX_BYTES);
    if let Ok(message) = &decoded {
        let again = wire::encode(message);
        assert_eq!(
            wire::decode(&again, MESSAGE_MAX_BYTES).as_ref(),
            Ok(message)
        );
    }
    let cluster = match decoded {
        Ok(Message::Cluster(payload)) => Some(payload),
        _ => None,
    };
    assert_eq!(wire::decode_cluster(data, MESSAGE_MAX_BYTES), cluster);
});
