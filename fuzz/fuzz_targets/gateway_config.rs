//! The gateway configuration parser (`node/agent/src/gateway_config.rs`):
//! `vcfed gateway --config FILE`. The private key file it names reads as
//! one fixed key, so the text alone decides the outcome.
//!
//! Asserts: no panic, also while an error names its line and column; an
//! error's line and column lie in the text; an accepted configuration is
//! within the gateway's bounds (peers, segments, MTU).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vcfed::gateway_config::parse_with_key_reader;
use vcfed_fuzz::check_config_error;
use vcfed_overlay::gateway::PEERS_MAX;
use vcfed_overlay::linux::{INNER_MTU_MAX, INNER_MTU_MIN, SEGMENTS_MAX};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/vcfed/gateway.toml");
    match parse_with_key_reader(text, path, |_| Ok([7; 32])) {
        Ok(config) => {
            assert!(config.peers.len() <= PEERS_MAX);
            assert!(!config.segments.is_empty() && config.segments.len() <= SEGMENTS_MAX);
            assert!((INNER_MTU_MIN..=INNER_MTU_MAX).contains(&config.inner_mtu));
        }
        Err(e) => check_config_error(&e, text),
    }
});
