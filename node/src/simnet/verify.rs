//! A cache of verified adverts shared by every site of a run.
//!
//! In a simulated federation of n sites every advert is verified n times,
//! and Ed25519 verification dominated the profile. Ed25519 verification is
//! a pure function of (public key, message, signature), so remembering its
//! result for the exact bytes returns what verifying again would; the cache
//! never changes an outcome, only its cost.

use std::collections::BTreeMap;
use std::sync::Mutex;

use vcfed_registry::advert::AdvertError;
use vcfed_registry::{Advert, AdvertVerifier, SignedAdvert};

/// Verified adverts remembered; beyond it the cache starts over.
const CACHED_MAX: usize = 200_000;

type Cached = (Vec<u8>, Vec<u8>, Result<Advert, AdvertError>);

/// The shared cache: signature → (public key, body, result).
#[derive(Debug, Default)]
pub struct CachingVerifier {
    cache: Mutex<BTreeMap<Vec<u8>, Cached>>,
}

impl AdvertVerifier for CachingVerifier {
    fn verify(&self, signed: &SignedAdvert) -> Result<Advert, AdvertError> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((public_key, body, result)) = cache.get(&signed.signature)
            && *public_key == signed.public_key
            && *body == signed.body
        {
            return result.clone();
        }
        let result = signed.verify();
        if cache.len() >= CACHED_MAX {
            cache.clear();
        }
        cache.insert(
            signed.signature.clone(),
            (
                signed.public_key.clone(),
                signed.body.clone(),
                result.clone(),
            ),
        );
        result
    }
}

#[cfg(test)]
mod tests {
    use libp2p_identity::Keypair;
    use vcfed_registry::{CapacitySummary, NodeShape};

    use super::*;

    #[test]
    fn the_cache_answers_what_verification_answers() {
        let keypair = Keypair::generate_ed25519();
        let advert = Advert {
            site: keypair.public().to_peer_id(),
            site_name: "a".into(),
            version: 1,
            issued_at_ms: 0,
            ttl_ms: 1,
            capacity: CapacitySummary {
                total_nodes: 1,
                node: NodeShape {
                    cores: 1,
                    memory_mib: 1,
                    disk_gib: 1,
                },
                steps: vec![(0, 1)],
                horizon_end_ms: 1,
            },
            gateway: None,
            addrs: Vec::new(),
            software: "t".into(),
        };
        let signed = SignedAdvert::sign(&advert, &keypair).unwrap();
        let verifier = CachingVerifier::default();
        assert_eq!(verifier.verify(&signed), Ok(advert.clone()));
        assert_eq!(verifier.verify(&signed), Ok(advert));
        // Same signature, other body: not a cache hit, and refused.
        let mut tampered = signed.clone();
        tampered.body[0] ^= 1;
        assert_eq!(verifier.verify(&tampered), tampered.verify());
        assert!(verifier.verify(&tampered).is_err());
        assert_eq!(verifier.verify(&signed), signed.verify());
    }
}
