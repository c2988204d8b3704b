//! The registry core (`registry/src/core.rs`) reading what peers send:
//! gossip, requests and responses, in sequence, into a registry that knows
//! three sites.
//!
//! Input: records (see `vcfed_fuzz::records`); the tag's low 2 bits say
//! gossip, request, response or timer, bit 2 which peer sent it, the high
//! bits move the clock by up to 31 s.
//!
//! Asserts: no panic; every answer and every message the core sends
//! decodes.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use libp2p_identity::PeerId;
use vcfed_fuzz::{MESSAGE_MAX_BYTES, keypair, records, signed_advert};
use vcfed_registry::advert::VerifiedAdvert;
use vcfed_registry::wire;
use vcfed_registry::{Registry, RegistryConfig, Transmit};

/// When the registry starts: inside the preloaded adverts' lifetime.
const START_MS: i64 = 1_000_000;

/// Adverts of sites 1 to 3, verified once: a registry that knows some sites
/// answers digests with entries and pulls with adverts.
fn known() -> &'static [(PeerId, Arc<VerifiedAdvert>)] {
    static KNOWN: OnceLock<Vec<(PeerId, Arc<VerifiedAdvert>)>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        (1..=3)
            .map(|site| {
                let signed = signed_advert(site, 5);
                let advert = signed.verify().expect("a freshly signed advert verifies");
                (advert.site, Arc::new(VerifiedAdvert { signed, advert }))
            })
            .collect()
    })
}

fn decodes(bytes: &[u8]) {
    if let Err(e) = wire::decode(bytes, MESSAGE_MAX_BYTES) {
        panic!("the registry sent what it cannot decode: {e}");
    }
}

fn drain(registry: &mut Registry) {
    while let Some(transmit) = registry.poll_transmit() {
        match transmit {
            Transmit::Publish { data } | Transmit::Request { data, .. } => decodes(&data),
        }
    }
    while registry.poll_event().is_some() {}
}

fuzz_target!(|data: &[u8]| {
    // A sequence of messages into a registry core that knows three sites.
    let mut registry = Registry::new(RegistryConfig::default(), keypair(0), 0, 7, START_MS);
    for (site, verified) in known() {
        registry.peer_connected(*site);
        registry.handle_verified_advert(START_MS, verified.clone());
    }
    drain(&mut registry);
    let mut now_ms = START_MS;
    for (tag, bytes) in records(data) {
        // The tag's high bits move the clock by up to 31 s, so that sites
        // turn suspect and adverts expire within one input.
        now_ms += i64::from(tag >> 3) * 1_000;
        let from = known()[usize::from(tag >> 2 & 1)].0;
        match tag & 0b11 {
            0 => {
                registry.handle_gossip(now_ms, bytes);
            }
            1 => {
                if let Some(answer) = registry.handle_request(now_ms, from, bytes) {
                    decodes(&answer);
                }
            }
            2 => registry.handle_response(now_ms, from, bytes),
            _ => registry.handle_timeout(now_ms),
        }
        drain(&mut registry);
    }
});
