//! Encapsulation of Ethernet frames for the tunnel: GRE-TEB with a key, in
//! an inner IPv4 packet, fragmented to fit the tunnel and reassembled on
//! the far side with bounded buffers.
//!
//! WireGuard (boringtun) carries IP packets only, so a frame travels as
//! `IPv4 (proto 47) | GRE (K bit, proto 0x6558, key = segment id) | frame`.
//! GRE-TEB costs 28 bytes where VXLAN would cost 36 (IPv4 + UDP + VXLAN
//! header) and its key is the 32-bit segment id. A full 1514-byte frame
//! makes a 1542-byte inner packet; with WireGuard's 32 bytes and the outer
//! UDP/IPv4 28, that is 1602 bytes on a 1500-byte path, so inner packets
//! larger than `inner_mtu` (1440 for a 1500-byte path) are split with
//! ordinary IPv4 fragmentation before encryption and reassembled after
//! decryption. VMs keep an MTU of 1500.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// IPv4 header length without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// GRE header length with a key.
pub const GRE_HEADER_LEN: usize = 8;
/// Bytes the encapsulation adds to a frame (before fragmentation).
pub const ENCAP_OVERHEAD: usize = IPV4_HEADER_LEN + GRE_HEADER_LEN;
/// Inner packet size that fits a 1500-byte path: 1500 − 20 (IPv4) − 8
/// (UDP) − 32 (WireGuard header and tag).
pub const INNER_MTU_DEFAULT: usize = 1440;
/// Largest packet reassembled, bytes (a tagged 1518-byte frame + 28).
pub const REASSEMBLED_LEN_MAX: usize = 2048;
/// Partially reassembled packets kept per peer.
pub const PENDING_MAX: usize = 64;
/// How long a partial packet waits for its other fragments, ms.
pub const REASSEMBLY_TIMEOUT_MS: i64 = 2_000;

const PROTO_GRE: u8 = 47;
const GRE_FLAGS_KEY: u16 = 0x2000;
const ETHERTYPE_TEB: u16 = 0x6558;
const FLAG_MORE_FRAGMENTS: u16 = 0x2000;

/// Why an inner packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecapError {
    /// Not an option-less IPv4 packet with a correct length and checksum.
    #[error("malformed inner IPv4 packet")]
    BadIpv4,
    /// Not GRE-TEB with a key.
    #[error("not a GRE-TEB packet with a key")]
    NotGreTeb,
    /// A fragment that does not fit with the others, or too large a packet.
    #[error("bad fragment")]
    BadFragment,
}

/// Turns frames into inner packets for one tunnel peer.
#[derive(Debug, Clone)]
pub struct Encapsulator {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    inner_mtu: usize,
    next_id: u16,
}

impl Encapsulator {
    /// An encapsulator with inner addresses `src` → `dst` (they never leave
    /// the tunnel) and inner packets of at most `inner_mtu` bytes.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, inner_mtu: usize) -> Encapsulator {
        assert!(
            inner_mtu >= IPV4_HEADER_LEN + 8 + GRE_HEADER_LEN,
            "inner MTU too small to carry anything"
        );
        Encapsulator {
            src,
            dst,
            inner_mtu,
            next_id: 0,
        }
    }

    /// Encapsulates `frame` for `segment`, appending one inner packet, or
    /// several fragments, to `out`.
    pub fn encapsulate(&mut self, segment: u32, frame: &[u8], out: &mut Vec<Vec<u8>>) {
        let payload_len = GRE_HEADER_LEN + frame.len();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        if IPV4_HEADER_LEN + payload_len <= self.inner_mtu {
            let mut packet = Vec::with_capacity(IPV4_HEADER_LEN + payload_len);
            self.push_header(&mut packet, payload_len, id, 0, false);
            push_gre(&mut packet, segment);
            packet.extend_from_slice(frame);
            out.push(packet);
            return;
        }
        // Fragment payloads are multiples of 8 bytes, but for the last.
        let chunk = (self.inner_mtu - IPV4_HEADER_LEN) / 8 * 8;
        let mut payload = Vec::with_capacity(payload_len);
        push_gre(&mut payload, segment);
        payload.extend_from_slice(frame);
        let mut offset = 0;
        while offset < payload.len() {
            let end = (offset + chunk).min(payload.len());
            let more = end < payload.len();
            let mut packet = Vec::with_capacity(IPV4_HEADER_LEN + end - offset);
            self.push_header(&mut packet, end - offset, id, offset, more);
            packet.extend_from_slice(&payload[offset..end]);
            out.push(packet);
            offset = end;
        }
    }

    fn push_header(
        &self,
        packet: &mut Vec<u8>,
        payload_len: usize,
        id: u16,
        offset: usize,
        more: bool,
    ) {
        let total =
            u16::try_from(IPV4_HEADER_LEN + payload_len).expect("inner packets are below 64 KiB");
        let offset_units = u16::try_from(offset / 8).expect("offsets of a frame fit 13 bits");
        let flags = if more { FLAG_MORE_FRAGMENTS } else { 0 } | offset_units;
        let start = packet.len();
        packet.extend_from_slice(&[0x45, 0]);
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&id.to_be_bytes());
        packet.extend_from_slice(&flags.to_be_bytes());
        packet.extend_from_slice(&[64, PROTO_GRE, 0, 0]);
        packet.extend_from_slice(&self.src.octets());
        packet.extend_from_slice(&self.dst.octets());
        let checksum = ipv4_checksum(&packet[start..start + IPV4_HEADER_LEN]);
        packet[start + 10..start + 12].copy_from_slice(&checksum.to_be_bytes());
    }
}

fn push_gre(out: &mut Vec<u8>, segment: u32) {
    out.extend_from_slice(&GRE_FLAGS_KEY.to_be_bytes());
    out.extend_from_slice(&ETHERTYPE_TEB.to_be_bytes());
    out.extend_from_slice(&segment.to_be_bytes());
}

/// The one's-complement checksum of an IPv4 header (0 when it verifies).
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

#[derive(Debug)]
struct Partial {
    first_seen_ms: i64,
    /// Order of arrival among partial packets, to evict the oldest.
    arrival: u64,
    /// Fragment payloads by offset.
    pieces: BTreeMap<usize, Vec<u8>>,
    /// Payload length, once the last fragment arrived.
    total: Option<usize>,
    bytes: usize,
}

/// Turns inner packets from one tunnel peer back into frames.
#[derive(Debug, Default)]
pub struct Decapsulator {
    pending: BTreeMap<(u16, [u8; 4], [u8; 4]), Partial>,
    arrivals: u64,
    /// Fragments dropped: timed out, overlapping, or over the bounds.
    pub fragments_dropped: u64,
}

impl Decapsulator {
    /// A decapsulator with nothing pending.
    pub fn new() -> Decapsulator {
        Decapsulator::default()
    }

    /// Takes one inner packet. Returns `(segment, frame)` when a frame is
    /// complete, `None` while fragments are missing.
    pub fn decapsulate(
        &mut self,
        now_ms: i64,
        packet: &[u8],
    ) -> Result<Option<(u32, Vec<u8>)>, DecapError> {
        if packet.len() < IPV4_HEADER_LEN
            || packet[0] != 0x45
            || ipv4_checksum(&packet[..IPV4_HEADER_LEN]) != 0
        {
            return Err(DecapError::BadIpv4);
        }
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        if total != packet.len() || packet[9] != PROTO_GRE {
            return Err(DecapError::BadIpv4);
        }
        let id = u16::from_be_bytes([packet[4], packet[5]]);
        let flags = u16::from_be_bytes([packet[6], packet[7]]);
        let more = flags & FLAG_MORE_FRAGMENTS != 0;
        let offset = usize::from(flags & 0x1fff) * 8;
        let payload = &packet[IPV4_HEADER_LEN..];
        if !more && offset == 0 {
            return parse_gre(payload).map(Some);
        }
        self.expire(now_ms);
        let key = (
            id,
            packet[12..16].try_into().expect("four bytes"),
            packet[16..20].try_into().expect("four bytes"),
        );
        if !self.pending.contains_key(&key) && self.pending.len() >= PENDING_MAX {
            // The oldest partial packet is the one least likely to complete
            // (its other fragment was most likely lost); refusing new ones
            // instead would stall every fragmented frame until timeouts.
            let oldest = self
                .pending
                .iter()
                .min_by_key(|(_, partial)| partial.arrival)
                .map(|(key, _)| *key)
                .expect("the buffer is full, so not empty");
            self.pending.remove(&oldest);
            self.fragments_dropped += 1;
        }
        self.arrivals += 1;
        let arrival = self.arrivals;
        let partial = self.pending.entry(key).or_insert_with(|| Partial {
            first_seen_ms: now_ms,
            arrival,
            pieces: BTreeMap::new(),
            total: None,
            bytes: 0,
        });
        let end = offset + payload.len();
        let misfit = (more && !payload.len().is_multiple_of(8))
            || end > REASSEMBLED_LEN_MAX
            || partial.pieces.contains_key(&offset)
            || (!more && partial.total.is_some())
            || partial.total.is_some_and(|t| end > t);
        if misfit {
            self.pending.remove(&key);
            self.fragments_dropped += 1;
            return Err(DecapError::BadFragment);
        }
        if !more {
            partial.total = Some(end);
        }
        partial.bytes += payload.len();
        partial.pieces.insert(offset, payload.to_vec());
        let Some(total) = partial.total else {
            return Ok(None);
        };
        if partial.bytes < total {
            return Ok(None);
        }
        let partial = self.pending.remove(&key).expect("looked up above");
        let mut whole = Vec::with_capacity(total);
        for (offset, piece) in partial.pieces {
            if offset != whole.len() {
                // Overlapping pieces whose sizes happened to add up.
                self.fragments_dropped += 1;
                return Err(DecapError::BadFragment);
            }
            whole.extend_from_slice(&piece);
        }
        parse_gre(&whole).map(Some)
    }

    /// Partial packets waiting for fragments.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Drops partial packets older than [`REASSEMBLY_TIMEOUT_MS`].
    pub fn expire(&mut self, now_ms: i64) {
        let before = self.pending.len();
        self.pending
            .retain(|_, partial| now_ms - partial.first_seen_ms < REASSEMBLY_TIMEOUT_MS);
        self.fragments_dropped += (before - self.pending.len()) as u64;
    }
}

fn parse_gre(payload: &[u8]) -> Result<(u32, Vec<u8>), DecapError> {
    if payload.len() < GRE_HEADER_LEN {
        return Err(DecapError::NotGreTeb);
    }
    let flags = u16::from_be_bytes([payload[0], payload[1]]);
    let protocol = u16::from_be_bytes([payload[2], payload[3]]);
    if flags != GRE_FLAGS_KEY || protocol != ETHERTYPE_TEB {
        return Err(DecapError::NotGreTeb);
    }
    let segment = u32::from_be_bytes(payload[4..8].try_into().expect("four bytes"));
    Ok((segment, payload[GRE_HEADER_LEN..].to_vec()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::frame::tests::{frame, mac};

    fn pair() -> (Encapsulator, Decapsulator) {
        (
            Encapsulator::new(
                Ipv4Addr::new(169, 254, 77, 1),
                Ipv4Addr::new(169, 254, 77, 2),
                INNER_MTU_DEFAULT,
            ),
            Decapsulator::new(),
        )
    }

    #[test]
    fn small_frames_travel_whole_and_full_ones_in_two_fragments() {
        let (mut enc, mut dec) = pair();
        let small = frame(mac(1), mac(2), 100);
        let mut out = Vec::new();
        enc.encapsulate(7, &small, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), small.len() + ENCAP_OVERHEAD);
        assert_eq!(dec.decapsulate(0, &out[0]), Ok(Some((7, small))));

        let full = frame(mac(1), mac(2), 1500);
        out.clear();
        enc.encapsulate(7, &full, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|p| p.len() <= INNER_MTU_DEFAULT));
        // Out of order is fine.
        assert_eq!(dec.decapsulate(0, &out[1]), Ok(None));
        assert_eq!(dec.decapsulate(0, &out[0]), Ok(Some((7, full))));
        assert_eq!(dec.pending(), 0);
    }

    #[test]
    fn lost_fragments_time_out_and_the_buffer_is_bounded() {
        let (mut enc, mut dec) = pair();
        let mut out = Vec::new();
        for _ in 0..PENDING_MAX + 5 {
            enc.encapsulate(1, &frame(mac(1), mac(2), 1500), &mut out);
        }
        let firsts: Vec<&Vec<u8>> = out.iter().step_by(2).collect();
        for first in &firsts[..PENDING_MAX] {
            assert_eq!(dec.decapsulate(0, first), Ok(None));
        }
        // A full buffer makes room by dropping the oldest partial packet:
        // frames whose fragments all arrive still get through.
        assert_eq!(dec.decapsulate(0, firsts[PENDING_MAX]), Ok(None));
        assert_eq!(dec.pending(), PENDING_MAX);
        assert_eq!(dec.fragments_dropped, 1);
        let newest = &out[2 * (PENDING_MAX + 1)..2 * (PENDING_MAX + 2)];
        assert_eq!(dec.decapsulate(0, &newest[0]), Ok(None));
        assert!(matches!(dec.decapsulate(0, &newest[1]), Ok(Some(_))));
        assert_eq!(
            dec.pending(),
            PENDING_MAX - 1,
            "one more evicted, one completed"
        );
        // The evicted packet's late fragment starts a new partial, that
        // times out like the others.
        assert_eq!(dec.decapsulate(0, &out[1]), Ok(None));
        dec.expire(REASSEMBLY_TIMEOUT_MS);
        assert_eq!(dec.pending(), 0);
        assert!(dec.fragments_dropped >= PENDING_MAX as u64);
    }

    #[test]
    fn corrupt_packets_are_refused() {
        let (mut enc, mut dec) = pair();
        let mut out = Vec::new();
        enc.encapsulate(1, &frame(mac(1), mac(2), 60), &mut out);
        let mut bad = out[0].clone();
        bad[8] ^= 1; // TTL: checksum no longer verifies
        assert_eq!(dec.decapsulate(0, &bad), Err(DecapError::BadIpv4));
        let mut not_gre = out[0].clone();
        not_gre[IPV4_HEADER_LEN + 3] ^= 1;
        assert_eq!(dec.decapsulate(0, &not_gre), Err(DecapError::NotGreTeb));
        assert_eq!(dec.decapsulate(0, &out[0][..30]), Err(DecapError::BadIpv4));
    }

    proptest! {
        /// Any frame survives the round trip through fragments in any order.
        #[test]
        fn round_trip(len in 0usize..1504, segment in any::<u32>(), mtu in 64usize..1500, reverse in any::<bool>()) {
            let mut enc = Encapsulator::new(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, mtu);
            let mut dec = Decapsulator::new();
            let original = frame(mac(3), mac(4), len);
            let mut out = Vec::new();
            enc.encapsulate(segment, &original, &mut out);
            if reverse {
                out.reverse();
            }
            let mut got = None;
            for packet in &out {
                prop_assert!(packet.len() <= mtu.max(IPV4_HEADER_LEN + 8));
                if let Some(done) = dec.decapsulate(0, packet).unwrap() {
                    got = Some(done);
                }
            }
            prop_assert_eq!(got, Some((segment, original)));
        }

        /// Arbitrary bytes never panic the decapsulator.
        #[test]
        fn arbitrary_packets_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let mut dec = Decapsulator::new();
            let _ = dec.decapsulate(0, &bytes);
        }
    }
}
