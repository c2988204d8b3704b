//! Capacity adverts: what a site tells the federation about itself, signed
//! with its Ed25519 federation key.
//!
//! A [`SignedAdvert`] carries the signer's public key, the postcard-encoded
//! [`Advert`] and a signature over a domain-separated copy of those bytes.
//! Receivers check, in order: size, decoding, signature, that the advert's
//! site id is the signer's peer id, and the advert's own bounds. Anything
//! that fails is dropped and counted by the caller, never applied.

use std::sync::Arc;

use libp2p_identity::{Keypair, PeerId, PublicKey};
use serde::{Deserialize, Serialize};

/// The shape of one node slot of a site: the ledger's type, so that what a
/// site stores and what it advertises cannot drift apart.
pub use vcfed_storage::NodeShape;

/// Prefix of every signed advert body, so a signature over an advert can
/// never be replayed as a signature over anything else.
const SIGNING_DOMAIN: &[u8] = b"vcfed/advert/1\0";
/// Most capacity steps an advert may carry.
pub const ADVERT_STEPS_MAX: usize = 1024;
/// Longest site name, endpoint or software string accepted, bytes.
pub const ADVERT_TEXT_LEN_MAX: usize = 255;
/// Most federation addresses an advert may carry.
pub const ADVERT_ADDRS_MAX: usize = 16;
/// Largest encoded advert body, bytes (a full one is about 13 KiB).
pub const ADVERT_BODY_MAX: usize = 32 * 1024;

/// Merges capacity steps down to at most `max` (≥ 1), conservatively: a
/// merged step says the fewest free nodes of the steps it replaces, so the
/// advert never promises more than the site has.
pub fn coarsen_steps(steps: &[(i64, u32)], max: usize) -> Vec<(i64, u32)> {
    assert!(max >= 1, "at least one step must remain");
    if steps.len() <= max {
        return steps.to_vec();
    }
    let group = steps.len().div_ceil(max);
    let mut merged: Vec<(i64, u32)> = steps
        .chunks(group)
        .map(|chunk| {
            (
                chunk[0].0,
                chunk
                    .iter()
                    .map(|&(_, free)| free)
                    .min()
                    .expect("chunks are non-empty"),
            )
        })
        .collect();
    merged.dedup_by(|later, earlier| later.1 == earlier.1);
    merged
}

/// A site's free capacity over its advertised horizon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacitySummary {
    /// Node slots of the site.
    pub total_nodes: u32,
    /// Shape of one slot.
    pub node: NodeShape,
    /// Free slots as `(from unix ms, free)` steps, ascending, starting at or
    /// before the advert's issue time.
    pub steps: Vec<(i64, u32)>,
    /// End of the horizon the steps describe, unix ms.
    pub horizon_end_ms: i64,
}

impl CapacitySummary {
    /// The fewest free slots at any instant of `[start_ms, end_ms)`, as far
    /// as the steps say. Past the horizon the last step's value holds; the
    /// site's own ledger is authoritative anyway.
    pub fn min_free(&self, start_ms: i64, end_ms: i64) -> u32 {
        let mut free_at_start = self.total_nodes;
        let mut min_free: Option<u32> = None;
        for &(at_ms, free) in &self.steps {
            if at_ms <= start_ms {
                free_at_start = free;
            } else if at_ms < end_ms {
                min_free = Some(min_free.map_or(free, |m| m.min(free)));
            }
        }
        min_free.map_or(free_at_start, |m| m.min(free_at_start))
    }
}

/// Where a site's gateway takes tunnel traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInfo {
    /// Public `host:port` of the gateway's UDP socket.
    pub endpoint: String,
    /// WireGuard public key of the gateway.
    pub tunnel_public_key: [u8; 32],
}

/// What a site advertises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    /// The site's peer id; must be the signer's.
    pub site: PeerId,
    /// The site's name.
    pub site_name: String,
    /// Monotonic per site across restarts: a receiver applies only a version
    /// higher than the one it has.
    pub version: u64,
    /// When the site signed it, unix ms (the site's clock).
    pub issued_at_ms: i64,
    /// How long after `issued_at_ms` the advert stays valid.
    pub ttl_ms: u32,
    /// Free capacity.
    pub capacity: CapacitySummary,
    /// The site's gateway, once configured.
    pub gateway: Option<GatewayInfo>,
    /// Federation multiaddrs the site listens on, so members can dial it.
    pub addrs: Vec<String>,
    /// vcfed version of the site's agent.
    pub software: String,
}

/// An advert with its signer's key and signature, as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAdvert {
    /// The signer's public key, libp2p protobuf encoding.
    pub public_key: Vec<u8>,
    /// The postcard encoding of the [`Advert`].
    pub body: Vec<u8>,
    /// Signature over `SIGNING_DOMAIN || body`.
    pub signature: Vec<u8>,
}

/// Why an advert was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertError {
    /// The public key does not decode.
    #[error("undecodable public key")]
    BadKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The body does not decode.
    #[error("undecodable advert body: {0}")]
    Undecodable(String),
    /// The advert claims another site than its signer.
    #[error("advert for {claimed} signed by {signer}")]
    WrongSigner {
        /// Site named in the advert (boxed: peer ids are large).
        claimed: Box<PeerId>,
        /// Peer id of the signing key.
        signer: Box<PeerId>,
    },
    /// A field is out of bounds.
    #[error("advert out of bounds: {0}")]
    OutOfBounds(&'static str),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

impl SignedAdvert {
    /// Signs `advert` with `keypair`. The advert's `site` must be the
    /// keypair's peer id.
    pub fn sign(advert: &Advert, keypair: &Keypair) -> Result<SignedAdvert, AdvertError> {
        assert_eq!(
            advert.site,
            keypair.public().to_peer_id(),
            "a site signs only its own advert"
        );
        let body =
            postcard::to_allocvec(advert).map_err(|e| AdvertError::Signing(e.to_string()))?;
        let signature = keypair
            .sign(&signed_bytes(&body))
            .map_err(|e| AdvertError::Signing(e.to_string()))?;
        Ok(SignedAdvert {
            public_key: keypair.public().encode_protobuf(),
            body,
            signature,
        })
    }

    /// Verifies the signature and the advert's bounds and returns the advert.
    pub fn verify(&self) -> Result<Advert, AdvertError> {
        // Bound the work and the memory a relayed advert can cost before
        // spending a signature check on it.
        if self.body.len() > ADVERT_BODY_MAX
            || self.public_key.len() > 128
            || self.signature.len() > 128
        {
            return Err(AdvertError::OutOfBounds("advert too large"));
        }
        let public_key =
            PublicKey::try_decode_protobuf(&self.public_key).map_err(|_| AdvertError::BadKey)?;
        if !public_key.verify(&signed_bytes(&self.body), &self.signature) {
            return Err(AdvertError::BadSignature);
        }
        let advert = decode_unchecked(&self.body)?;
        let signer = public_key.to_peer_id();
        if advert.site != signer {
            return Err(AdvertError::WrongSigner {
                claimed: Box::new(advert.site),
                signer: Box::new(signer),
            });
        }
        check_bounds(&advert)?;
        Ok(advert)
    }
}

/// Decodes an advert body and checks its bounds, without the signature:
/// what [`SignedAdvert::verify`] does with a body once its signature
/// verified. Any member can sign any body with its own key, so these are
/// bytes from outside all the same (the fuzz target `registry_advert`
/// reads them here, without a signature per input).
pub fn decode_body(body: &[u8]) -> Result<Advert, AdvertError> {
    if body.len() > ADVERT_BODY_MAX {
        return Err(AdvertError::OutOfBounds("advert too large"));
    }
    let advert = decode_unchecked(body)?;
    check_bounds(&advert)?;
    Ok(advert)
}

/// The advert a body encodes, without trailing bytes; its bounds unchecked.
fn decode_unchecked(body: &[u8]) -> Result<Advert, AdvertError> {
    let (advert, rest): (Advert, &[u8]) =
        postcard::take_from_bytes(body).map_err(|e| AdvertError::Undecodable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(AdvertError::Undecodable(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(advert)
}

/// How the registry checks adverts. Production uses [`SignedAdvert::verify`]
/// on every advert (the default when no verifier is set). A simulator that
/// runs a thousand sites in one process sees each advert a thousand times
/// and may set a verifier that remembers verified adverts; it must return
/// exactly what [`SignedAdvert::verify`] would.
pub trait AdvertVerifier: Send + Sync + std::fmt::Debug {
    /// Verifies `signed` as [`SignedAdvert::verify`] does.
    fn verify(&self, signed: &SignedAdvert) -> Result<Advert, AdvertError>;

    /// Verifies `signed` as [`AdvertVerifier::verify`] does and returns it
    /// with its advert: what the registry keeps in its view. A verifier
    /// that remembers adverts may hand every registry the same shared value
    /// (its `signed` equal to the argument), so that a simulator's thousand
    /// views hold one copy of each advert instead of a thousand.
    fn verify_shared(&self, signed: SignedAdvert) -> Result<Arc<VerifiedAdvert>, AdvertError> {
        let advert = self.verify(&signed)?;
        Ok(Arc::new(VerifiedAdvert { signed, advert }))
    }
}

/// Verifies `signed` with `verifier`, or as [`SignedAdvert::verify`] does
/// when there is none (production): what a registry keeps in its view.
pub fn verify_with(
    verifier: Option<&dyn AdvertVerifier>,
    signed: SignedAdvert,
) -> Result<Arc<VerifiedAdvert>, AdvertError> {
    match verifier {
        Some(verifier) => verifier.verify_shared(signed),
        None => signed
            .verify()
            .map(|advert| Arc::new(VerifiedAdvert { signed, advert })),
    }
}

/// A signed advert that verified, with the advert it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAdvert {
    /// As received (and as relayed to peers that lack it).
    pub signed: SignedAdvert,
    /// What [`SignedAdvert::verify`] returned for it.
    pub advert: Advert,
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SIGNING_DOMAIN.len() + body.len());
    bytes.extend_from_slice(SIGNING_DOMAIN);
    bytes.extend_from_slice(body);
    bytes
}

fn check_bounds(advert: &Advert) -> Result<(), AdvertError> {
    let text_ok = |text: &str| text.len() <= ADVERT_TEXT_LEN_MAX;
    if !text_ok(&advert.site_name) || !text_ok(&advert.software) {
        return Err(AdvertError::OutOfBounds("text field too long"));
    }
    if advert
        .gateway
        .as_ref()
        .is_some_and(|g| !text_ok(&g.endpoint))
    {
        return Err(AdvertError::OutOfBounds("gateway endpoint too long"));
    }
    if advert.addrs.len() > ADVERT_ADDRS_MAX || advert.addrs.iter().any(|a| !text_ok(a)) {
        return Err(AdvertError::OutOfBounds("too many or too long addresses"));
    }
    let steps = &advert.capacity.steps;
    if steps.len() > ADVERT_STEPS_MAX {
        return Err(AdvertError::OutOfBounds("too many capacity steps"));
    }
    if steps.windows(2).any(|pair| pair[0].0 >= pair[1].0) {
        return Err(AdvertError::OutOfBounds("capacity steps not ascending"));
    }
    if steps
        .iter()
        .any(|&(_, free)| free > advert.capacity.total_nodes)
    {
        return Err(AdvertError::OutOfBounds(
            "more free nodes than the site has",
        ));
    }
    if advert.ttl_ms == 0 {
        return Err(AdvertError::OutOfBounds("zero TTL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn advert(keypair: &Keypair, version: u64) -> Advert {
        Advert {
            site: keypair.public().to_peer_id(),
            site_name: "site-a".into(),
            version,
            issued_at_ms: 1_000,
            ttl_ms: 30_000,
            capacity: CapacitySummary {
                total_nodes: 4,
                node: NodeShape {
                    cores: 2,
                    memory_mib: 4096,
                    disk_gib: 20,
                },
                steps: vec![(0, 4), (5_000, 1), (9_000, 4)],
                horizon_end_ms: 100_000,
            },
            gateway: None,
            addrs: vec!["/ip4/127.0.0.1/tcp/7781".into()],
            software: "test".into(),
        }
    }

    #[test]
    fn signed_adverts_verify_and_tampering_is_caught() {
        let keypair = Keypair::generate_ed25519();
        let original = advert(&keypair, 7);
        let signed = SignedAdvert::sign(&original, &keypair).unwrap();
        assert_eq!(signed.verify().unwrap(), original);

        let mut tampered = signed.clone();
        let last = tampered.body.len() - 1;
        tampered.body[last] ^= 1;
        assert_eq!(tampered.verify(), Err(AdvertError::BadSignature));

        let mut bad_key = signed.clone();
        bad_key.public_key = vec![1, 2, 3];
        assert_eq!(bad_key.verify(), Err(AdvertError::BadKey));
    }

    #[test]
    fn decode_body_reads_what_verify_reads() {
        let keypair = Keypair::generate_ed25519();
        let signed = SignedAdvert::sign(&advert(&keypair, 7), &keypair).unwrap();
        assert_eq!(decode_body(&signed.body), signed.verify());
        let mut wrong = advert(&keypair, 1);
        wrong.ttl_ms = 0;
        let body = postcard::to_allocvec(&wrong).unwrap();
        assert_eq!(
            decode_body(&body),
            Err(AdvertError::OutOfBounds("zero TTL"))
        );
        assert!(matches!(
            decode_body(&body[..body.len() - 1]),
            Err(AdvertError::Undecodable(_))
        ));
    }

    #[test]
    fn an_advert_for_another_site_is_refused() {
        let keypair = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let mut forged = advert(&other, 1);
        forged.site = other.public().to_peer_id();
        // Signed correctly by `keypair`, but claiming `other`'s identity.
        let body = postcard::to_allocvec(&forged).unwrap();
        let signed = SignedAdvert {
            public_key: keypair.public().encode_protobuf(),
            signature: keypair.sign(&signed_bytes(&body)).unwrap(),
            body,
        };
        assert!(matches!(
            signed.verify(),
            Err(AdvertError::WrongSigner { .. })
        ));
    }

    #[test]
    fn out_of_bounds_adverts_are_refused() {
        let keypair = Keypair::generate_ed25519();
        let mut wrong = advert(&keypair, 1);
        wrong.capacity.steps = vec![(5, 1), (5, 2)];
        assert!(matches!(
            SignedAdvert::sign(&wrong, &keypair).unwrap().verify(),
            Err(AdvertError::OutOfBounds(_))
        ));
        let mut wrong = advert(&keypair, 1);
        wrong.capacity.steps = vec![(0, 5)];
        assert!(matches!(
            SignedAdvert::sign(&wrong, &keypair).unwrap().verify(),
            Err(AdvertError::OutOfBounds(_))
        ));
    }

    #[test]
    fn min_free_reads_the_steps() {
        let keypair = Keypair::generate_ed25519();
        let capacity = advert(&keypair, 1).capacity;
        assert_eq!(capacity.min_free(0, 5_000), 4);
        assert_eq!(capacity.min_free(0, 5_001), 1);
        assert_eq!(capacity.min_free(6_000, 7_000), 1);
        assert_eq!(capacity.min_free(9_000, 200_000), 4);
        assert_eq!(capacity.min_free(-10, -5), 4);
    }

    #[test]
    fn trailing_bytes_and_oversized_bodies_are_refused() {
        let keypair = Keypair::generate_ed25519();
        let mut body = postcard::to_allocvec(&advert(&keypair, 1)).unwrap();
        body.extend_from_slice(&[0u8; 16]);
        let padded = SignedAdvert {
            public_key: keypair.public().encode_protobuf(),
            signature: keypair.sign(&signed_bytes(&body)).unwrap(),
            body,
        };
        assert!(matches!(padded.verify(), Err(AdvertError::Undecodable(_))));
        let mut huge = padded.clone();
        huge.body = vec![0; ADVERT_BODY_MAX + 1];
        assert_eq!(
            huge.verify(),
            Err(AdvertError::OutOfBounds("advert too large"))
        );
    }

    #[test]
    fn coarsening_never_promises_more() {
        let steps: Vec<(i64, u32)> = (0..3000u32).map(|i| (i64::from(i) * 10, i % 7)).collect();
        let coarse = coarsen_steps(&steps, ADVERT_STEPS_MAX);
        assert!(coarse.len() <= ADVERT_STEPS_MAX);
        assert_eq!(coarse[0].0, 0);
        for &(at, free) in &steps {
            let covering = coarse.iter().rev().find(|(start, _)| *start <= at).unwrap();
            assert!(covering.1 <= free, "at {at}: {} > {free}", covering.1);
        }
        assert_eq!(coarsen_steps(&steps[..5], 10), steps[..5].to_vec());
    }

    #[test]
    fn node_shape_encoding_is_pinned() {
        // Adverts carry the shape postcard-encoded, field by field in
        // declaration order; sites of different versions must agree on it.
        let shape = NodeShape {
            cores: 2,
            memory_mib: 4096,
            disk_gib: 20,
        };
        let bytes = postcard::to_allocvec(&shape).unwrap();
        assert_eq!(bytes, [0x02, 0x80, 0x20, 0x14]);
        assert_eq!(postcard::from_bytes::<NodeShape>(&bytes).unwrap(), shape);
    }
}
