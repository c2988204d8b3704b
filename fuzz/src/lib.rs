//! What the fuzz targets of vcfed share: the record format that lets one
//! input carry a sequence of packets or messages, fixed identities, and the
//! real values the seed corpus is encoded from.
//!
//! The seeds under `corpus/<target>/` are written by the test
//! `seeds::write` (`VCFED_WRITE_SEEDS=1 cargo test --manifest-path
//! fuzz/Cargo.toml`); without the variable the test checks that the
//! committed seeds are still what the encoders make, so a change of a wire
//! format shows up as a stale corpus instead of a silently weaker one.

use libp2p_identity::Keypair;
use vcfed_registry::advert::{Advert, CapacitySummary, GatewayInfo, SignedAdvert};
use vcfed_storage::NodeShape;

/// Longest message the federation takes: the agent's limit.
pub const MESSAGE_MAX_BYTES: usize = vcfed_node_core::federation::MESSAGE_MAX_BYTES;

/// Splits `data` into records `tag (1 byte) | length (2 bytes, little-endian)
/// | bytes`; a last record shorter than its length takes what is left. One
/// input is then a sequence of packets or messages, so that state carried
/// from one to the next (reassembly, learnt addresses, a registry's view)
/// is exercised.
pub fn records(data: &[u8]) -> Records<'_> {
    Records { rest: data }
}

/// The records of an input; see [`records`].
#[derive(Debug, Clone)]
pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Records<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let [tag, low, high, rest @ ..] = self.rest else {
            return None;
        };
        let len = usize::from(u16::from_le_bytes([*low, *high])).min(rest.len());
        let (bytes, rest) = rest.split_at(len);
        self.rest = rest;
        Some((*tag, bytes))
    }
}

/// Appends one record to `out`, as [`records`] reads it.
pub fn push_record(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("a record holds at most 64 KiB");
    out.push(tag);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A site key that is the same in every run: seeds and targets agree on
/// the sites without generating keys.
pub fn keypair(site: u8) -> Keypair {
    Keypair::ed25519_from_bytes([site; 32]).expect("32 bytes are an Ed25519 secret")
}

/// A plausible advert of `site`, as the registry tests make them.
pub fn advert(site: u8, version: u64) -> Advert {
    Advert {
        site: keypair(site).public().to_peer_id(),
        site_name: format!("site-{site}"),
        version,
        issued_at_ms: 1_000_000,
        ttl_ms: 30_000,
        capacity: CapacitySummary {
            total_nodes: 8,
            node: NodeShape {
                cores: 2,
                memory_mib: 4096,
                disk_gib: 20,
            },
            steps: vec![(0, 8), (1_005_000, 3), (1_009_000, 8)],
            horizon_end_ms: 2_000_000,
        },
        gateway: Some(GatewayInfo {
            endpoint: format!("198.18.0.{site}:7782"),
            tunnel_public_key: [site; 32],
        }),
        addrs: vec![format!("/ip4/198.18.0.{site}/tcp/7781")],
        software: "fuzz".into(),
    }
}

/// [`advert`], signed by its site.
pub fn signed_advert(site: u8, version: u64) -> SignedAdvert {
    SignedAdvert::sign(&advert(site, version), &keypair(site)).expect("signing a small advert")
}

#[cfg(test)]
mod seeds;

/// Checks a configuration error about `text`: it prints, and its line and
/// column (1-based, the column in characters) lie in the text.
pub fn check_config_error(error: &vcfed::config::ConfigError, text: &str) {
    assert!(!error.to_string().is_empty());
    if let Some(line) = error.line {
        let lines: Vec<&str> = text.split('\n').collect();
        assert!(
            (1..=lines.len()).contains(&line),
            "line {line} of {}",
            lines.len()
        );
        if let Some(column) = error.column {
            let chars = lines[line - 1].chars().count();
            assert!(
                (1..=chars + 1).contains(&column),
                "column {column} of {chars}"
            );
        }
    }
}
