//! The federation's wire messages: serde + postcard, inside an envelope
//! that carries the wire version.
//!
//! Postcard encodes enum variants by index, so new variants are appended at
//! the end of [`Message`]; a peer that does not know one drops the message
//! as undecodable and counts it.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::advert::SignedAdvert;

/// Wire version this build speaks. 2: cluster commits carry the membership
/// epoch, the parts' node numbers and the request's node count.
pub const WIRE_VERSION: u16 = 2;

/// One site's entry in an anti-entropy digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DigestEntry {
    /// The site. Encoded as `PeerId` encodes itself, without its
    /// allocation per id: a digest lists every site of the federation.
    #[serde(serialize_with = "serialize_peer")]
    pub site: PeerId,
    /// The advert version the sender holds for it.
    pub version: u64,
}

/// Most buckets an anti-entropy digest is split into
/// ([`Message::DigestBuckets`]).
pub const DIGEST_BUCKETS_MAX: usize = 64;

/// Everything the registry sends.
///
/// Anti-entropy takes up to three exchanges, and one in the common case:
/// `DigestBuckets` → `InSync`; on a mismatch → `DigestPart` (the answerer's
/// versions in the buckets that differ), after which the asker sends what
/// the answerer lacks (`Adverts` → `Ack`) and pulls what it lacks itself
/// (`Pull` → `Adverts`). `DigestHash` → `Digest` is the same exchange with
/// one bucket, as the first builds sent it; it is still answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// A pushed advert (the gossipsub payload).
    Advert(SignedAdvert),
    /// Anti-entropy request: an order-independent hash of the sender's
    /// digest, and how many entries it has.
    DigestHash {
        /// Hash of the (site, version) entries.
        hash: u64,
        /// Number of entries.
        count: u32,
    },
    /// Answer to `DigestHash` when the views agree.
    InSync,
    /// Answer to `DigestHash` when they differ: the answerer's versions.
    Digest(Vec<DigestEntry>),
    /// Request for the adverts of these sites.
    Pull(Vec<PeerId>),
    /// Adverts: a request (pushing what the peer lacks) or the answer to `Pull`.
    Adverts(Vec<SignedAdvert>),
    /// Acknowledges `Adverts` or `Advert` sent as a request.
    Ack,
    /// A message of the cluster reservation protocol (the agent's cluster
    /// core encodes it; the registry only carries it).
    Cluster(Vec<u8>),
    /// Anti-entropy request: the sender's digest split into buckets by
    /// site, the order-independent hash of each bucket (a power of two of
    /// them, at most [`DIGEST_BUCKETS_MAX`]), and the number of entries.
    /// A mismatch then costs the entries of the buckets that differ, not
    /// the whole digest: a federation of a thousand sites lists ~16 sites
    /// per bucket, where one changed advert would otherwise resend all.
    DigestBuckets {
        /// Number of entries.
        count: u32,
        /// Hash of each bucket's (site, version) entries.
        hashes: Vec<u64>,
    },
    /// Answer to `DigestBuckets` when the views differ: the answerer's
    /// versions in the buckets whose hashes differ.
    DigestPart {
        /// How many buckets the digest was split into (as asked).
        buckets: u16,
        /// The buckets that differ, ascending.
        differing: Vec<u16>,
        /// The answerer's entries in those buckets.
        entries: Vec<DigestEntry>,
    },
}

/// The versioned envelope around a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Wire version of the sender.
    pub version: u16,
    /// The message.
    pub message: Message,
}

/// Why bytes from the network were not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Longer than the configured maximum.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    Oversized {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not a postcard envelope.
    #[error("undecodable message: {0}")]
    Undecodable(String),
    /// An envelope of a wire version this build does not speak.
    #[error("unsupported wire version {0}")]
    UnsupportedVersion(u16),
}

/// Encodes a message in the current wire version.
pub fn encode(message: &Message) -> Vec<u8> {
    // The same bytes as an `Envelope`, without copying the message into one.
    #[derive(Serialize)]
    struct EnvelopeRef<'a> {
        version: u16,
        message: &'a Message,
    }
    let envelope = EnvelopeRef {
        version: WIRE_VERSION,
        message,
    };
    postcard::to_allocvec(&envelope).expect("encoding plain data into a Vec cannot fail")
}

/// Decodes bytes from the network, refusing more than `max_len` bytes,
/// other wire versions and trailing garbage.
pub fn decode(bytes: &[u8], max_len: usize) -> Result<Message, WireError> {
    if bytes.len() > max_len {
        return Err(WireError::Oversized {
            len: bytes.len(),
            max: max_len,
        });
    }
    let (version, rest): (u16, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| WireError::Undecodable(e.to_string()))?;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let (message, rest): (Message, &[u8]) =
        postcard::take_from_bytes(rest).map_err(|e| WireError::Undecodable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Undecodable(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(message)
}

/// Postcard's tag of [`Message::Cluster`]: its index among the variants.
const CLUSTER_TAG: u32 = 7;

/// The payload of a [`Message::Cluster`]: `Some` exactly when [`decode`]
/// gives one. A shell hands cluster messages to its cluster core and the
/// rest to the registry, which decodes them itself; this reads only the
/// envelope's head of anything but a cluster message, where [`decode`]
/// would decode a registry message (a digest lists every site) once more.
pub fn decode_cluster(bytes: &[u8], max_len: usize) -> Option<Vec<u8>> {
    if bytes.len() > max_len {
        return None;
    }
    // The envelope's version, then the message's tag, read as `decode`
    // reads them.
    let (version, rest): (u16, &[u8]) = postcard::take_from_bytes(bytes).ok()?;
    if version != WIRE_VERSION {
        return None;
    }
    let (tag, _): (u32, &[u8]) = postcard::take_from_bytes(rest).ok()?;
    if tag != CLUSTER_TAG {
        return None;
    }
    match decode(bytes, max_len) {
        Ok(Message::Cluster(payload)) => Some(payload),
        _ => None,
    }
}

/// Longest encoding of a peer id: a multihash of at most 64 digest bytes
/// behind a code (varint, at most 10 bytes) and a size (varint, 2 bytes).
const PEER_BYTES_MAX: usize = 80;

/// A peer id's bytes, as [`PeerId::to_bytes`] gives them, on the stack.
pub(crate) struct PeerBytes {
    buf: [u8; PEER_BYTES_MAX],
    len: usize,
}

impl PeerBytes {
    /// Encodes `peer`.
    pub(crate) fn of(peer: &PeerId) -> PeerBytes {
        let mut buf = [0u8; PEER_BYTES_MAX];
        let len = peer
            .as_ref()
            .write(&mut buf[..])
            .expect("a multihash of a 64-byte digest fits in PEER_BYTES_MAX bytes");
        PeerBytes { buf, len }
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Serialises a peer id as its `Serialize` impl does, without allocating.
fn serialize_peer<S: serde::Serializer>(peer: &PeerId, serializer: S) -> Result<S::Ok, S::Error> {
    if serializer.is_human_readable() {
        peer.serialize(serializer)
    } else {
        serializer.serialize_bytes(PeerBytes::of(peer).as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cluster_messages_carry_the_cluster_tag() {
        let bytes = encode(&Message::Cluster(vec![1, 2, 3]));
        // The version (a varint below 128: one byte), then the tag.
        assert_eq!(u16::from(bytes[0]), WIRE_VERSION);
        assert_eq!(bytes[1], 7);
        assert_eq!(u32::from(bytes[1]), CLUSTER_TAG);
        assert_eq!(decode_cluster(&bytes, 1024), Some(vec![1, 2, 3]));
        assert_eq!(decode_cluster(&bytes, 4), None);
        assert_eq!(decode_cluster(&encode(&Message::Ack), 1024), None);
    }

    #[test]
    fn round_trips_and_refuses_other_versions() {
        let peer = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let message = Message::Digest(vec![DigestEntry {
            site: peer,
            version: 3,
        }]);
        let bytes = encode(&message);
        assert_eq!(decode(&bytes, 1024), Ok(message.clone()));
        assert!(matches!(
            decode(&bytes, 4),
            Err(WireError::Oversized { .. })
        ));
        let mut other = postcard::to_allocvec(&Envelope {
            version: 9,
            message,
        })
        .unwrap();
        assert_eq!(decode(&other, 1024), Err(WireError::UnsupportedVersion(9)));
        other = bytes.clone();
        other.push(0);
        assert!(matches!(
            decode(&other, 1024),
            Err(WireError::Undecodable(_))
        ));
    }

    /// A digest entry with the derived encoding of its fields: the bytes
    /// `DigestEntry` must encode to.
    #[derive(Serialize)]
    struct PlainEntry {
        site: PeerId,
        version: u64,
    }

    #[test]
    fn peer_bytes_are_the_peer_ids_bytes() {
        let mut peers: Vec<PeerId> = (0..20)
            .map(|_| {
                libp2p_identity::Keypair::generate_ed25519()
                    .public()
                    .to_peer_id()
            })
            .collect();
        // A hashed (SHA-256) peer id, as long keys get.
        let mut hashed = vec![0x12, 0x20];
        hashed.extend((0..32u8).map(|i| i.wrapping_mul(37)));
        peers.push(PeerId::from_bytes(&hashed).unwrap());
        for peer in peers {
            assert_eq!(PeerBytes::of(&peer).as_slice(), &peer.to_bytes()[..]);
            let entry = DigestEntry {
                site: peer,
                version: 300,
            };
            let plain = PlainEntry {
                site: peer,
                version: 300,
            };
            assert_eq!(
                postcard::to_allocvec(&entry).unwrap(),
                postcard::to_allocvec(&plain).unwrap()
            );
            let message = Message::Digest(vec![entry; 3]);
            let envelope = Envelope {
                version: WIRE_VERSION,
                message: message.clone(),
            };
            assert_eq!(encode(&message), postcard::to_allocvec(&envelope).unwrap());
        }
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder and never decode into
        /// something that re-encodes differently.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(message) = decode(&bytes, 1 << 20) {
                prop_assert_eq!(decode(&encode(&message), 1 << 20), Ok(message));
            }
        }

        /// `decode_cluster` answers what `decode` does, for valid messages
        /// of every kind, corrupted or not.
        #[test]
        fn decode_cluster_agrees_with_decode(
            kind in 0usize..6,
            payload in prop::collection::vec(any::<u8>(), 0..64),
            flip in prop::option::of((0usize..96, any::<u8>())),
        ) {
            let peer = libp2p_identity::Keypair::generate_ed25519().public().to_peer_id();
            let message = match kind {
                0 => Message::Cluster(payload),
                1 => Message::Pull(vec![peer]),
                2 => Message::DigestHash { hash: 7, count: 7 },
                3 => Message::DigestBuckets { count: 9, hashes: vec![u64::MAX, 3] },
                4 => Message::DigestPart {
                    buckets: 2,
                    differing: vec![1],
                    entries: vec![DigestEntry { site: peer, version: 4 }],
                },
                _ => Message::Ack,
            };
            let mut bytes = encode(&message);
            if let Some((index, byte)) = flip {
                let index = index % bytes.len();
                bytes[index] = byte;
            }
            let expected = match decode(&bytes, 1 << 20) {
                Ok(Message::Cluster(payload)) => Some(payload),
                _ => None,
            };
            prop_assert_eq!(decode_cluster(&bytes, 1 << 20), expected);
        }

        /// Arbitrary bytes: the same.
        #[test]
        fn decode_cluster_agrees_on_arbitrary_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let expected = match decode(&bytes, 1 << 20) {
                Ok(Message::Cluster(payload)) => Some(payload),
                _ => None,
            };
            prop_assert_eq!(decode_cluster(&bytes, 1 << 20), expected);
        }

        /// Valid messages with random corruption never panic either.
        #[test]
        fn corrupted_messages_never_panic(flip in 0usize..64, byte in any::<u8>()) {
            let peer = libp2p_identity::Keypair::generate_ed25519().public().to_peer_id();
            let mut bytes = encode(&Message::Pull(vec![peer]));
            let index = flip % bytes.len();
            bytes[index] = byte;
            let _ = decode(&bytes, 1 << 20);
        }
    }
}
