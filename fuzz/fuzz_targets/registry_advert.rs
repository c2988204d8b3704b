//! Capacity adverts (`registry/src/advert.rs`): a signed advert as it
//! travels, and an advert body. Any member can sign any body with its own
//! key, so the body is read here without a signature per input.
//!
//! First byte even: the rest is a body for `decode_body`; odd: a postcard
//! `SignedAdvert` for `verify`.
//!
//! Asserts: no panic; an accepted body re-encodes to one that decodes to the
//! same advert; an accepted advert is within the advertised bounds.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vcfed_registry::advert::{
    self, ADVERT_ADDRS_MAX, ADVERT_STEPS_MAX, ADVERT_TEXT_LEN_MAX, Advert, SignedAdvert,
};

fn check_accepted(advert: &Advert) {
    assert!(advert.capacity.steps.len() <= ADVERT_STEPS_MAX);
    assert!(advert.addrs.len() <= ADVERT_ADDRS_MAX);
    assert!(advert.site_name.len() <= ADVERT_TEXT_LEN_MAX);
    assert!(advert.ttl_ms > 0);
    assert!(
        advert
            .capacity
            .steps
            .windows(2)
            .all(|pair| pair[0].0 < pair[1].0)
    );
    // What the registry asks of an accepted advert: never more free nodes
    // than the site has, over any window.
    let steps = &advert.capacity.steps;
    for &(at_ms, _) in steps.iter().take(8) {
        for (start, end) in [(at_ms, at_ms.saturating_add(1)), (i64::MIN, i64::MAX)] {
            assert!(advert.capacity.min_free(start, end) <= advert.capacity.total_nodes);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(advert) = advert::decode_body(rest) {
            check_accepted(&advert);
            let body = postcard::to_allocvec(&advert).expect("encoding into a Vec");
            assert_eq!(advert::decode_body(&body), Ok(advert));
        }
    } else if let Ok(signed) = postcard::from_bytes::<SignedAdvert>(rest) {
        if let Ok(advert) = signed.verify() {
            check_accepted(&advert);
        }
        let bytes = postcard::to_allocvec(&signed).expect("encoding into a Vec");
        assert_eq!(postcard::from_bytes::<SignedAdvert>(&bytes), Ok(signed));
    }
});
