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
//!
//! A frame with offload metadata (a TCP super-frame of up to 64 KiB, see
//! [`crate::offload`]) travels with GRE protocol [`ETHERTYPE_OFFLOAD`]
//! and the metadata between the GRE header and the frame, fragmented the
//! same way: `IPv4 | GRE (proto 0x88b5) | metadata (10 bytes) | frame`.
//!
//! Neither side allocates per packet: the encapsulator builds each inner
//! packet in one reused buffer and hands it to a callback, and the
//! decapsulator reassembles into pooled buffers.

use std::net::Ipv4Addr;

use crate::offload::{self, Offload};

/// IPv4 header length without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// GRE header length with a key.
pub const GRE_HEADER_LEN: usize = 8;
/// Bytes the encapsulation adds to a plain frame (before fragmentation).
pub const ENCAP_OVERHEAD: usize = IPV4_HEADER_LEN + GRE_HEADER_LEN;
/// Inner packet size that fits a 1500-byte path: 1500 − 20 (IPv4) − 8
/// (UDP) − 32 (WireGuard header and tag).
pub const INNER_MTU_DEFAULT: usize = 1440;
/// Largest fragment offset the 13-bit field holds, bytes: the last
/// fragment of a payload (GRE header, metadata and frame) must start at or
/// before it.
pub const OFFSET_MAX: usize = 8191 * 8;
/// Largest payload reassembled, bytes: the last fragment starts at
/// [`OFFSET_MAX`] at most and carries at most 9000 bytes.
pub const PAYLOAD_LEN_MAX: usize = OFFSET_MAX + 9_000;
/// Partially reassembled packets kept per peer.
pub const PENDING_MAX: usize = 64;
/// Bytes of partially reassembled packets kept per peer: past it the
/// oldest partial packets are dropped.
pub const PENDING_BYTES_MAX: usize = 1 << 20;
/// Reassembly buffers kept for reuse per peer.
const SPARE_MAX: usize = 4;
/// How long a partial packet waits for its other fragments, ms.
pub const REASSEMBLY_TIMEOUT_MS: i64 = 2_000;
/// GRE protocol of a frame with offload metadata: IEEE's local
/// experimental EtherType 1.
pub const ETHERTYPE_OFFLOAD: u16 = 0x88b5;

const PROTO_GRE: u8 = 47;
const GRE_FLAGS_KEY: u16 = 0x2000;
const ETHERTYPE_TEB: u16 = 0x6558;
const FLAG_MORE_FRAGMENTS: u16 = 0x2000;
/// Words of the coverage bitmap of a partial packet (one bit per 8 bytes).
const COVERAGE_WORDS: usize = PAYLOAD_LEN_MAX.div_ceil(8 * 64);

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
    /// Offload metadata that does not fit its frame.
    #[error("bad offload metadata: {0}")]
    BadOffload(offload::OffloadError),
}

/// A frame too large for the encapsulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a frame of {0} bytes is too large to encapsulate")]
pub struct TooLarge(pub usize);

/// Turns frames into inner packets for one tunnel peer.
#[derive(Debug, Clone)]
pub struct Encapsulator {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    inner_mtu: usize,
    /// The id of the next fragmented packet: its low 16 bits are the IPv4
    /// id, its high 16 bits the last two bytes of the inner source address
    /// (which is part of the reassembly key too), so ids do not come round
    /// within the reassembly timeout at any rate.
    next_id: u32,
    /// Where each inner packet is built.
    packet: Vec<u8>,
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
            packet: Vec::with_capacity(inner_mtu),
        }
    }

    /// Encapsulates `frame` (with its offload metadata) for `segment`,
    /// handing `emit` one inner packet, or several fragments in order.
    pub fn encapsulate(
        &mut self,
        segment: u32,
        offload: Offload,
        frame: &[u8],
        mut emit: impl FnMut(&[u8]),
    ) -> Result<(), TooLarge> {
        let mut head = [0u8; GRE_HEADER_LEN + offload::WIRE_LEN];
        head[..2].copy_from_slice(&GRE_FLAGS_KEY.to_be_bytes());
        head[4..8].copy_from_slice(&segment.to_be_bytes());
        let head_len = if offload.is_none() {
            head[2..4].copy_from_slice(&ETHERTYPE_TEB.to_be_bytes());
            GRE_HEADER_LEN
        } else {
            head[2..4].copy_from_slice(&ETHERTYPE_OFFLOAD.to_be_bytes());
            head[GRE_HEADER_LEN..].copy_from_slice(&offload.to_wire());
            head.len()
        };
        let head = &head[..head_len];
        let payload_len = head_len + frame.len();
        // Fragment payloads are multiples of 8 bytes, but for the last.
        let chunk = if IPV4_HEADER_LEN + payload_len <= self.inner_mtu {
            payload_len.max(1)
        } else {
            (self.inner_mtu - IPV4_HEADER_LEN) / 8 * 8
        };
        let last_start = payload_len.saturating_sub(1) / chunk * chunk;
        if last_start > OFFSET_MAX || payload_len > PAYLOAD_LEN_MAX {
            return Err(TooLarge(frame.len()));
        }
        // Only fragmented packets need an id.
        let id = if chunk < payload_len {
            self.next_id = self.next_id.wrapping_add(1);
            self.next_id
        } else {
            0
        };
        let mut offset = 0;
        loop {
            let end = (offset + chunk).min(payload_len);
            let more = end < payload_len;
            let mut packet = std::mem::take(&mut self.packet);
            packet.clear();
            self.push_header(&mut packet, end - offset, id, offset, more);
            // The piece [offset, end) of head ++ frame.
            if offset < head_len {
                packet.extend_from_slice(&head[offset..end.min(head_len)]);
            }
            if end > head_len {
                packet.extend_from_slice(&frame[offset.max(head_len) - head_len..end - head_len]);
            }
            emit(&packet);
            self.packet = packet;
            offset = end;
            if !more {
                return Ok(());
            }
        }
    }

    fn push_header(
        &self,
        packet: &mut Vec<u8>,
        payload_len: usize,
        id: u32,
        offset: usize,
        more: bool,
    ) {
        let [high_a, high_b, id_a, id_b] = id.to_be_bytes();
        let src = self.src.octets();
        let total =
            u16::try_from(IPV4_HEADER_LEN + payload_len).expect("inner packets are below 64 KiB");
        let offset_units =
            u16::try_from(offset / 8).expect("payloads fit what 13 bits of offset address");
        let flags = if more { FLAG_MORE_FRAGMENTS } else { 0 } | offset_units;
        let start = packet.len();
        packet.extend_from_slice(&[0x45, 0]);
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[id_a, id_b]);
        packet.extend_from_slice(&flags.to_be_bytes());
        packet.extend_from_slice(&[64, PROTO_GRE, 0, 0]);
        packet.extend_from_slice(&[src[0], src[1], high_a, high_b]);
        packet.extend_from_slice(&self.dst.octets());
        let checksum = ipv4_checksum(&packet[start..start + IPV4_HEADER_LEN]);
        packet[start + 10..start + 12].copy_from_slice(&checksum.to_be_bytes());
    }
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

/// A frame out of the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inner<'a> {
    /// Its segment.
    pub segment: u32,
    /// Its offload metadata ([`Offload::NONE`] for a plain frame).
    pub offload: Offload,
    /// The Ethernet frame.
    pub frame: &'a [u8],
}

/// A packet being reassembled.
#[derive(Debug)]
struct Partial {
    /// IPv4 id, source and destination.
    key: (u16, [u8; 4], [u8; 4]),
    first_seen_ms: i64,
    /// Order of arrival among partial packets, to evict the oldest.
    arrival: u64,
    /// The payload so far, at its offsets.
    buf: Vec<u8>,
    /// Which 8-byte units of the payload arrived.
    covered: [u64; COVERAGE_WORDS],
    /// Payload length, once the last fragment arrived.
    total: Option<usize>,
    bytes: usize,
}

impl Partial {
    fn empty() -> Partial {
        Partial {
            key: (0, [0; 4], [0; 4]),
            first_seen_ms: 0,
            arrival: 0,
            buf: Vec::new(),
            covered: [0; COVERAGE_WORDS],
            total: None,
            bytes: 0,
        }
    }

    /// Marks the units of [offset, end) as covered; false if any already
    /// was (an overlap). Works a word (64 units) at a time.
    fn cover(&mut self, offset: usize, end: usize) -> bool {
        let (first, last) = (offset / 8, end.div_ceil(8));
        if first >= last {
            return true;
        }
        let words = first / 64..=(last - 1) / 64;
        let mask = |word: usize| {
            let low = first.max(word * 64) - word * 64;
            let high = last.min(word * 64 + 64) - word * 64;
            (u64::MAX >> (64 - (high - low))) << low
        };
        if words
            .clone()
            .any(|word| self.covered[word] & mask(word) != 0)
        {
            return false;
        }
        for word in words {
            self.covered[word] |= mask(word);
        }
        true
    }
}

/// Turns inner packets from one tunnel peer back into frames.
#[derive(Debug, Default)]
pub struct Decapsulator {
    pending: Vec<Partial>,
    /// Partials to reuse, with their buffers.
    spare: Vec<Partial>,
    /// The last packet completed, which [`Inner::frame`] borrows.
    done: Option<Partial>,
    arrivals: u64,
    /// Fragments dropped: timed out, overlapping, or over the bounds.
    pub fragments_dropped: u64,
}

impl Decapsulator {
    /// A decapsulator with nothing pending.
    pub fn new() -> Decapsulator {
        Decapsulator::default()
    }

    /// Takes one inner packet. Returns the frame when it is complete,
    /// `None` while fragments are missing.
    pub fn decapsulate<'a>(
        &'a mut self,
        now_ms: i64,
        packet: &'a [u8],
    ) -> Result<Option<Inner<'a>>, DecapError> {
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
        let key = (
            id,
            packet[12..16].try_into().expect("four bytes"),
            packet[16..20].try_into().expect("four bytes"),
        );
        let slot = match self.pending.iter().position(|p| p.key == key) {
            Some(slot) => slot,
            None => self.start_partial(now_ms, key),
        };
        let partial = &mut self.pending[slot];
        let end = offset + payload.len();
        let misfit = (more && !payload.len().is_multiple_of(8))
            || end > PAYLOAD_LEN_MAX
            || (!more && partial.total.is_some())
            || partial.total.is_some_and(|t| end > t)
            || (!more && partial.buf.len() > end)
            || !partial.cover(offset, end);
        if misfit {
            let partial = self.pending.swap_remove(slot);
            self.recycle(partial);
            self.fragments_dropped += 1;
            return Err(DecapError::BadFragment);
        }
        if !more {
            partial.total = Some(end);
        }
        if partial.buf.len() < end {
            partial.buf.resize(end, 0);
        }
        partial.buf[offset..end].copy_from_slice(payload);
        partial.bytes += payload.len();
        if partial.total != Some(partial.bytes) {
            return Ok(None);
        }
        // Complete: no piece overlapped another, so the bytes cover it all.
        let complete = self.pending.swap_remove(slot);
        if let Some(previous) = self.done.replace(complete) {
            self.recycle(previous);
        }
        let done = self.done.as_ref().expect("just stored");
        parse_gre(&done.buf).map(Some)
    }

    /// A new partial packet for `key`, evicting the oldest when the table
    /// is full; returns its slot.
    fn start_partial(&mut self, now_ms: i64, key: (u16, [u8; 4], [u8; 4])) -> usize {
        self.expire(now_ms);
        while self.pending.len() >= PENDING_MAX
            || (!self.pending.is_empty()
                && self.pending.iter().map(|p| p.buf.len()).sum::<usize>() >= PENDING_BYTES_MAX)
        {
            // The oldest partial packet is the one least likely to complete
            // (its other fragment was most likely lost); refusing new ones
            // instead would stall every fragmented frame until timeouts.
            let oldest = self
                .pending
                .iter()
                .enumerate()
                .min_by_key(|(_, partial)| partial.arrival)
                .map(|(slot, _)| slot)
                .expect("the table is full, so not empty");
            let evicted = self.pending.swap_remove(oldest);
            self.recycle(evicted);
            self.fragments_dropped += 1;
        }
        self.arrivals += 1;
        let mut partial = self.spare.pop().unwrap_or_else(Partial::empty);
        partial.key = key;
        partial.first_seen_ms = now_ms;
        partial.arrival = self.arrivals;
        self.pending.push(partial);
        self.pending.len() - 1
    }

    /// Keeps a partial's buffers for the next packet.
    fn recycle(&mut self, mut partial: Partial) {
        if self.spare.len() < SPARE_MAX {
            partial.buf.clear();
            partial.covered = [0; COVERAGE_WORDS];
            partial.total = None;
            partial.bytes = 0;
            self.spare.push(partial);
        }
    }

    /// Partial packets waiting for fragments.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Drops partial packets older than [`REASSEMBLY_TIMEOUT_MS`].
    pub fn expire(&mut self, now_ms: i64) {
        let mut slot = 0;
        while slot < self.pending.len() {
            if now_ms - self.pending[slot].first_seen_ms >= REASSEMBLY_TIMEOUT_MS {
                let partial = self.pending.swap_remove(slot);
                self.recycle(partial);
                self.fragments_dropped += 1;
            } else {
                slot += 1;
            }
        }
    }
}

fn parse_gre(payload: &[u8]) -> Result<Inner<'_>, DecapError> {
    if payload.len() < GRE_HEADER_LEN {
        return Err(DecapError::NotGreTeb);
    }
    let flags = u16::from_be_bytes([payload[0], payload[1]]);
    let protocol = u16::from_be_bytes([payload[2], payload[3]]);
    if flags != GRE_FLAGS_KEY {
        return Err(DecapError::NotGreTeb);
    }
    let segment = u32::from_be_bytes(payload[4..8].try_into().expect("four bytes"));
    let rest = &payload[GRE_HEADER_LEN..];
    match protocol {
        ETHERTYPE_TEB => Ok(Inner {
            segment,
            offload: Offload::NONE,
            frame: rest,
        }),
        ETHERTYPE_OFFLOAD if rest.len() >= offload::WIRE_LEN => {
            let (meta, frame) = rest.split_at(offload::WIRE_LEN);
            let offload = Offload::from_wire(meta.try_into().expect("ten bytes"));
            offload.check(frame.len()).map_err(DecapError::BadOffload)?;
            Ok(Inner {
                segment,
                offload,
                frame,
            })
        }
        _ => Err(DecapError::NotGreTeb),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::frame::tests::{frame, mac};
    use crate::offload::tests::tcp_super_frame;

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

    /// The inner packets of one plain frame.
    fn encap(enc: &mut Encapsulator, segment: u32, frame: &[u8], out: &mut Vec<Vec<u8>>) {
        encap_with(enc, segment, Offload::NONE, frame, out);
    }

    fn encap_with(
        enc: &mut Encapsulator,
        segment: u32,
        offload: Offload,
        frame: &[u8],
        out: &mut Vec<Vec<u8>>,
    ) {
        enc.encapsulate(segment, offload, frame, |packet| out.push(packet.to_vec()))
            .unwrap();
    }

    /// What decapsulating one packet gave, owned.
    fn decap(
        dec: &mut Decapsulator,
        packet: &[u8],
    ) -> Result<Option<(u32, Offload, Vec<u8>)>, DecapError> {
        dec.decapsulate(0, packet)
            .map(|done| done.map(|inner| (inner.segment, inner.offload, inner.frame.to_vec())))
    }

    #[test]
    fn small_frames_travel_whole_and_full_ones_in_two_fragments() {
        let (mut enc, mut dec) = pair();
        let small = frame(mac(1), mac(2), 100);
        let mut out = Vec::new();
        encap(&mut enc, 7, &small, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), small.len() + ENCAP_OVERHEAD);
        assert_eq!(
            decap(&mut dec, &out[0]),
            Ok(Some((7, Offload::NONE, small)))
        );

        let full = frame(mac(1), mac(2), 1500);
        out.clear();
        encap(&mut enc, 7, &full, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|p| p.len() <= INNER_MTU_DEFAULT));
        // Out of order is fine.
        assert_eq!(decap(&mut dec, &out[1]), Ok(None));
        assert_eq!(decap(&mut dec, &out[0]), Ok(Some((7, Offload::NONE, full))));
        assert_eq!(dec.pending(), 0);
    }

    #[test]
    fn super_frames_travel_with_their_metadata_in_equal_fragments() {
        let (mut enc, mut dec) = pair();
        let offload = tcp_super_frame();
        let big = frame(mac(1), mac(2), 65_000);
        let mut out = Vec::new();
        encap_with(&mut enc, 9, offload, &big, &mut out);
        assert_eq!(out.len(), (65_014 + 18usize).div_ceil(1416));
        let (last, rest) = out.split_last().unwrap();
        assert!(
            rest.iter().all(|p| p.len() == 1436),
            "equal sizes batch well"
        );
        assert!(last.len() <= 1436);
        for packet in rest {
            assert_eq!(decap(&mut dec, packet), Ok(None));
        }
        assert_eq!(decap(&mut dec, last), Ok(Some((9, offload, big.clone()))));

        // Metadata that does not fit its frame never reaches a TAP.
        let lying = Offload {
            csum_start: 65_000,
            ..offload
        };
        out.clear();
        encap_with(&mut enc, 9, lying, &big, &mut out);
        let results: Vec<_> = out.iter().map(|p| decap(&mut dec, p)).collect();
        assert!(matches!(
            results.last(),
            Some(Err(DecapError::BadOffload(_)))
        ));

        let too_big = frame(mac(1), mac(2), PAYLOAD_LEN_MAX);
        let mut jumbo_enc = Encapsulator::new(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 8212);
        // With 8192-byte fragments the last one of 65 571 bytes would start
        // at 65 536, beyond what the offset field holds.
        let awkward = frame(mac(1), mac(2), 65_571 - 18 - 14);
        assert!(
            jumbo_enc
                .encapsulate(9, offload, &awkward, |_| panic!("nothing sent"))
                .is_err()
        );
        assert!(
            enc.encapsulate(9, offload, &too_big, |_| panic!("nothing sent"))
                .is_err()
        );
    }

    #[test]
    fn lost_fragments_time_out_and_the_buffer_is_bounded() {
        let (mut enc, mut dec) = pair();
        let mut out = Vec::new();
        for _ in 0..PENDING_MAX + 5 {
            encap(&mut enc, 1, &frame(mac(1), mac(2), 1500), &mut out);
        }
        let firsts: Vec<&Vec<u8>> = out.iter().step_by(2).collect();
        for first in &firsts[..PENDING_MAX] {
            assert_eq!(decap(&mut dec, first), Ok(None));
        }
        // A full buffer makes room by dropping the oldest partial packet:
        // frames whose fragments all arrive still get through.
        assert_eq!(decap(&mut dec, firsts[PENDING_MAX]), Ok(None));
        assert_eq!(dec.pending(), PENDING_MAX);
        assert_eq!(dec.fragments_dropped, 1);
        let newest = &out[2 * (PENDING_MAX + 1)..2 * (PENDING_MAX + 2)];
        assert_eq!(decap(&mut dec, &newest[0]), Ok(None));
        assert!(matches!(decap(&mut dec, &newest[1]), Ok(Some(_))));
        assert_eq!(
            dec.pending(),
            PENDING_MAX - 1,
            "one more evicted, one completed"
        );
        // The evicted packet's late fragment starts a new partial, that
        // times out like the others.
        assert_eq!(decap(&mut dec, &out[1]), Ok(None));
        dec.expire(REASSEMBLY_TIMEOUT_MS);
        assert_eq!(dec.pending(), 0);
        assert!(dec.fragments_dropped >= PENDING_MAX as u64);
    }

    #[test]
    fn ids_that_share_their_low_16_bits_never_mix() {
        let (mut enc, mut dec) = pair();
        let (a, b) = (frame(mac(1), mac(2), 3000), frame(mac(3), mac(4), 3000));
        let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
        enc.next_id = 0xffff; // next: 0x1_0000
        encap(&mut enc, 1, &a, &mut out_a);
        enc.next_id = u32::MAX; // next: 0
        encap(&mut enc, 1, &b, &mut out_b);
        assert_eq!(out_a[0][4..6], out_b[0][4..6], "the same IPv4 id");
        // B's first fragment is lost; A's middle one arrives late: nothing
        // of one may complete the other.
        assert_eq!(decap(&mut dec, &out_a[0]), Ok(None));
        assert_eq!(decap(&mut dec, &out_b[1]), Ok(None));
        assert_eq!(decap(&mut dec, &out_b[2]), Ok(None));
        assert_eq!(decap(&mut dec, &out_a[2]), Ok(None));
        assert_eq!(decap(&mut dec, &out_a[1]), Ok(Some((1, Offload::NONE, a))));
        // Unfragmented packets take no id.
        let before = enc.next_id;
        encap(&mut enc, 1, &frame(mac(1), mac(2), 60), &mut out_a);
        assert_eq!(enc.next_id, before);
    }

    #[test]
    fn coverage_is_exact_at_word_edges() {
        let mut partial = Partial::empty();
        assert!(partial.cover(0, 8));
        assert!(partial.cover(8, 512), "units 1..64 end a word");
        assert!(partial.cover(512, 1024));
        assert!(!partial.cover(1016, 1032), "unit 127 is taken");
        assert!(partial.cover(1024, 1025), "a last piece rounds up");
        assert!(!partial.cover(1024, 1032));
        assert!(partial.cover(2000, 2000), "nothing to cover");
        assert_eq!(partial.covered[0], u64::MAX);
        assert_eq!(partial.covered[1], u64::MAX);
        assert_eq!(partial.covered[2], 1);
        let mut whole = Partial::empty();
        assert!(whole.cover(0, PAYLOAD_LEN_MAX));
        assert!(!whole.cover(PAYLOAD_LEN_MAX - 8, PAYLOAD_LEN_MAX));
    }

    #[test]
    fn overlapping_and_repeated_fragments_are_dropped() {
        let (mut enc, mut dec) = pair();
        let mut out = Vec::new();
        encap(&mut enc, 1, &frame(mac(1), mac(2), 3000), &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(decap(&mut dec, &out[0]), Ok(None));
        assert_eq!(decap(&mut dec, &out[0]), Err(DecapError::BadFragment));
        assert_eq!(dec.pending(), 0, "the whole packet is dropped");
        // Fragments of the same packet that overlap by 8 bytes.
        let mut shifted = out[1].clone();
        let units = u16::from_be_bytes([shifted[6], shifted[7]]) & 0x1fff;
        shifted[6..8].copy_from_slice(&(0x2000 | (units - 1)).to_be_bytes());
        shifted[10..12].copy_from_slice(&[0, 0]);
        let checksum = ipv4_checksum(&shifted[..IPV4_HEADER_LEN]);
        shifted[10..12].copy_from_slice(&checksum.to_be_bytes());
        assert_eq!(decap(&mut dec, &out[0]), Ok(None));
        assert_eq!(decap(&mut dec, &shifted), Err(DecapError::BadFragment));
        assert_eq!(dec.fragments_dropped, 2);
    }

    #[test]
    fn corrupt_packets_are_refused() {
        let (mut enc, mut dec) = pair();
        let mut out = Vec::new();
        encap(&mut enc, 1, &frame(mac(1), mac(2), 60), &mut out);
        let mut bad = out[0].clone();
        bad[8] ^= 1; // TTL: checksum no longer verifies
        assert_eq!(decap(&mut dec, &bad), Err(DecapError::BadIpv4));
        let mut not_gre = out[0].clone();
        not_gre[IPV4_HEADER_LEN + 3] ^= 1;
        assert_eq!(decap(&mut dec, &not_gre), Err(DecapError::NotGreTeb));
        assert_eq!(decap(&mut dec, &out[0][..30]), Err(DecapError::BadIpv4));
    }

    proptest! {
        /// Any frame survives the round trip through fragments in any order.
        #[test]
        fn round_trip(len in 0usize..1504, segment in any::<u32>(), mtu in 64usize..1500, reverse in any::<bool>()) {
            let mut enc = Encapsulator::new(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, mtu);
            let mut dec = Decapsulator::new();
            let original = frame(mac(3), mac(4), len);
            let mut out = Vec::new();
            encap(&mut enc, segment, &original, &mut out);
            if reverse {
                out.reverse();
            }
            let mut got = None;
            for packet in &out {
                prop_assert!(packet.len() <= mtu.max(IPV4_HEADER_LEN + 8));
                if let Some(done) = decap(&mut dec, packet).unwrap() {
                    got = Some(done);
                }
            }
            prop_assert_eq!(got, Some((segment, Offload::NONE, original)));
        }

        /// Super-frames of any size survive any order of their fragments.
        #[test]
        fn super_frames_round_trip(len in 66usize..SUPER_FRAME_TEST_MAX, mtu in 576usize..9000, seed in any::<u64>()) {
            let mut enc = Encapsulator::new(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, mtu);
            let mut dec = Decapsulator::new();
            let original = frame(mac(3), mac(4), len);
            let offload = tcp_super_frame();
            let mut out = Vec::new();
            encap_with(&mut enc, 5, offload, &original, &mut out);
            // A cheap shuffle: rotate by the seed.
            let rotate = usize::try_from(seed % out.len() as u64).unwrap();
            out.rotate_left(rotate);
            let mut got = None;
            for packet in &out {
                if let Some(done) = decap(&mut dec, packet).unwrap() {
                    got = Some(done);
                }
            }
            prop_assert_eq!(got, Some((5, offload, original)));
        }

        /// Arbitrary bytes never panic the decapsulator.
        #[test]
        fn arbitrary_packets_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let mut dec = Decapsulator::new();
            let _ = dec.decapsulate(0, &bytes);
        }
    }

    /// Frame bodies of the super-frame property: up to the largest carried.
    const SUPER_FRAME_TEST_MAX: usize = crate::offload::SUPER_FRAME_LEN_MAX - 14;
}
