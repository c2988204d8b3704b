//! A cache of verified adverts shared by every site of a run.
//!
//! In a simulated federation of n sites every advert is verified n times,
//! and Ed25519 verification dominated the profile. Ed25519 verification is
//! a pure function of (public key, message, signature), so remembering its
//! result for the exact bytes returns what verifying again would; the cache
//! never changes an outcome, only its cost.
//!
//! The cache keeps each verified advert as the one `Arc<VerifiedAdvert>`
//! that [`AdvertVerifier::verify_shared`] hands to every registry, so the
//! n views of a run share one copy of each advert rather than holding n
//! (memory, and the allocations and copies, dominated once verification
//! was cached).

use std::hash::{BuildHasherDefault, DefaultHasher};
use std::sync::{Arc, Mutex, MutexGuard};

use vcfed_registry::advert::{AdvertError, VerifiedAdvert};
use vcfed_registry::{Advert, AdvertVerifier, SignedAdvert};

/// Verified adverts remembered; beyond it the cache starts over.
const CACHED_MAX: usize = 200_000;

/// What verifying one signed advert answered.
#[derive(Debug)]
enum Cached {
    /// It verified: the value every registry shares (its `signed` holds the
    /// key and body the answer is for).
    Verified(Arc<VerifiedAdvert>),
    /// It was refused, for these key and body bytes.
    Refused {
        public_key: Vec<u8>,
        body: Vec<u8>,
        error: AdvertError,
    },
}

impl Cached {
    /// Whether this answer is for exactly `signed` (whose signature was the
    /// key it was found under).
    fn answers(&self, signed: &SignedAdvert) -> bool {
        match self {
            Cached::Verified(verified) => {
                verified.signed.public_key == signed.public_key
                    && verified.signed.body == signed.body
            }
            Cached::Refused {
                public_key, body, ..
            } => *public_key == signed.public_key && *body == signed.body,
        }
    }
}

// The map is only probed by signature, never iterated, so no order leaks;
// the hasher has fixed keys, so it is deterministic as well.
#[allow(clippy::disallowed_types)]
type BySignature = std::collections::HashMap<Vec<u8>, Cached, BuildHasherDefault<DefaultHasher>>;

/// The shared cache: signature → what verifying it answered.
#[derive(Debug, Default)]
pub struct CachingVerifier {
    cache: Mutex<BySignature>,
}

impl CachingVerifier {
    fn lock(&self) -> MutexGuard<'_, BySignature> {
        // A panic elsewhere cannot leave an entry half-written: entries are
        // inserted whole.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached answer for `signed`, if any.
    fn lookup(&self, signed: &SignedAdvert) -> Option<Result<Arc<VerifiedAdvert>, AdvertError>> {
        let cache = self.lock();
        let cached = cache.get(signed.signature.as_slice())?;
        if !cached.answers(signed) {
            // Same signature, other bytes: verify these afresh.
            return None;
        }
        Some(match cached {
            Cached::Verified(verified) => Ok(verified.clone()),
            Cached::Refused { error, .. } => Err(error.clone()),
        })
    }

    fn remember(&self, signature: Vec<u8>, cached: Cached) {
        let mut cache = self.lock();
        if cache.len() >= CACHED_MAX {
            cache.clear();
        }
        cache.insert(signature, cached);
    }
}

impl AdvertVerifier for CachingVerifier {
    fn verify(&self, signed: &SignedAdvert) -> Result<Advert, AdvertError> {
        let answer = match self.lookup(signed) {
            Some(answer) => answer,
            None => self.verify_shared(signed.clone()),
        };
        answer.map(|verified| verified.advert.clone())
    }

    fn verify_shared(&self, signed: SignedAdvert) -> Result<Arc<VerifiedAdvert>, AdvertError> {
        if let Some(answer) = self.lookup(&signed) {
            return answer;
        }
        match signed.verify() {
            Ok(advert) => {
                let signature = signed.signature.clone();
                let verified = Arc::new(VerifiedAdvert { signed, advert });
                self.remember(signature, Cached::Verified(verified.clone()));
                Ok(verified)
            }
            Err(error) => {
                let SignedAdvert {
                    public_key,
                    body,
                    signature,
                } = signed;
                self.remember(
                    signature,
                    Cached::Refused {
                        public_key,
                        body,
                        error: error.clone(),
                    },
                );
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use libp2p_identity::Keypair;
    use vcfed_registry::{CapacitySummary, NodeShape};

    use super::*;

    fn advert(keypair: &Keypair) -> Advert {
        Advert {
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
        }
    }

    #[test]
    fn the_cache_answers_what_verification_answers() {
        let keypair = Keypair::generate_ed25519();
        let advert = advert(&keypair);
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

    #[test]
    fn every_registry_shares_one_verified_advert() {
        let keypair = Keypair::generate_ed25519();
        let mut advert = advert(&keypair);
        let signed = SignedAdvert::sign(&advert, &keypair).unwrap();
        let verifier = CachingVerifier::default();
        let first = verifier.verify_shared(signed.clone()).unwrap();
        let second = verifier.verify_shared(signed.clone()).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.signed, signed);
        assert_eq!(first.advert, advert);
        // `verify` answers from the same entry.
        assert_eq!(verifier.verify(&signed), Ok(advert.clone()));

        // Same signature, other key or body: refused as verification
        // refuses it, and the genuine advert is still answered (verified
        // afresh, as a new shared value).
        let mut tampered = signed.clone();
        tampered.body[0] ^= 1;
        assert_eq!(
            verifier.verify_shared(tampered.clone()),
            Err(tampered.verify().unwrap_err())
        );
        assert_eq!(
            verifier.verify_shared(tampered.clone()),
            Err(AdvertError::BadSignature)
        );
        let mut other_key = signed.clone();
        other_key.public_key = Keypair::generate_ed25519().public().encode_protobuf();
        assert_eq!(
            verifier.verify_shared(other_key),
            Err(AdvertError::BadSignature)
        );
        let again = verifier.verify_shared(signed.clone()).unwrap();
        assert_eq!(*again, *first);

        // Another version is another signature: another entry.
        advert.version = 2;
        let newer = SignedAdvert::sign(&advert, &keypair).unwrap();
        let newer = verifier.verify_shared(newer).unwrap();
        assert_eq!(newer.advert, advert);
        assert!(!Arc::ptr_eq(&newer, &again));
    }
}
