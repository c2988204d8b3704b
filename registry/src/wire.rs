//! The federation's wire messages: serde + postcard, inside an envelope
//! that carries the wire version.
//!
//! Postcard encodes enum variants by index, so new variants are appended at
//! the end of [`Message`]; a peer that does not know one drops the message
//! as undecodable and counts it.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::advert::SignedAdvert;

/// Wire version this build speaks.
pub const WIRE_VERSION: u16 = 1;

/// One site's entry in an anti-entropy digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DigestEntry {
    /// The site.
    pub site: PeerId,
    /// The advert version the sender holds for it.
    pub version: u64,
}

/// Everything the registry sends.
///
/// Anti-entropy takes up to three exchanges, and one in the common case:
/// `DigestHash` → `InSync`; on a mismatch → `Digest` (the answerer's
/// versions), after which the asker sends what the answerer lacks
/// (`Adverts` → `Ack`) and pulls what it lacks itself (`Pull` → `Adverts`).
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
    let envelope = Envelope {
        version: WIRE_VERSION,
        message: message.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    proptest! {
        /// Arbitrary bytes never panic the decoder and never decode into
        /// something that re-encodes differently.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(message) = decode(&bytes, 1 << 20) {
                prop_assert_eq!(decode(&encode(&message), 1 << 20), Ok(message));
            }
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
