//! Two lanes through the tunnel: interactive traffic does not queue behind
//! bulk transfers.
//!
//! Under a bulk TCP transfer the slowest gateway of the path (the receiver,
//! which decrypts and hands frames to its kernel) holds a standing queue in
//! its UDP socket: TCP grows its window until that queue is full, as it would
//! at any bottleneck without loss. A ping, a DNS query, a keystroke over SSH
//! or a DHCP offer to a booting node that enters the tunnel behind it waits
//! its turn: measured, a ping took 2 ms instead of 0.25. Kernels answer this
//! with flow queueing (fq_codel serves sparse flows first); a tunnel whose
//! queue is a socket buffer cannot reorder it, so the gateway gives sparse
//! flows a queue of their own:
//!
//! - The sender sorts each frame from its site by flow ([`Lanes::classify`]).
//!   A flow is *interactive* while it sends little: at most
//!   [`FLOW_BYTES_MAX`] in a window of [`WINDOW_MS`], no TCP super-frame, and
//!   none of its frames went bulk in the last [`BULK_HOLD_MS`]. All
//!   interactive flows together take at most [`LANE_BYTES_MAX`] per window;
//!   past it frames go bulk, so the lane stays short whatever the site sends.
//! - A data message of the interactive lane carries [`LANE_INTERACTIVE`] in
//!   the first of WireGuard's three reserved header bytes
//!   ([`LANE_OFFSET`]); it is vcfed's one change to WireGuard's wire
//!   format. The byte is outside the authenticated data: whoever can change
//!   it on the path can only move a datagram to the other queue, which the
//!   replay window tolerates.
//! - The receiver's kernel steers datagrams by that byte to one of two
//!   sockets bound to the same port (the Linux shell), and the gateway reads
//!   the interactive socket first, within a budget per turn. The mark is
//!   cleared before the datagram reaches WireGuard ([`Lanes::unmark`]).
//!
//! Order within a flow is kept: a flow moves from the interactive lane to the
//! bulk lane as soon as it grows (its later frames take the slower queue, so
//! they cannot overtake), and back only after [`BULK_HOLD_MS`] without a bulk
//! frame, far longer than the bulk queue holds anything. Flows are counted
//! in [`FLOW_BUCKETS`] buckets by a hash of their addresses, protocol and
//! ports; two flows in one bucket share its fate, so a ping may now and
//! then ride the bulk lane with a transfer it collides with.

use crate::offload::Offload;

/// Offset of the lane byte in a WireGuard data message: the first reserved
/// byte after the message type.
pub const LANE_OFFSET: usize = 1;
/// The lane byte of a data message on the interactive lane (0 is bulk, as
/// WireGuard has it).
pub const LANE_INTERACTIVE: u8 = 1;
/// WireGuard's message type of transport data.
pub const MESSAGE_DATA: u8 = 4;
/// The window flows are measured in, ms.
pub const WINDOW_MS: i64 = 10;
/// Bytes of frames one flow sends in a window and stays interactive (about
/// 13 Mbit/s).
pub const FLOW_BYTES_MAX: u32 = 16 << 10;
/// Bytes of frames the interactive lane takes in a window, all flows
/// together (about 100 Mbit/s).
pub const LANE_BYTES_MAX: u32 = 128 << 10;
/// How long a flow stays on the bulk lane after its last bulk frame, ms.
pub const BULK_HOLD_MS: i64 = 200;
/// Buckets flows are counted in.
pub const FLOW_BUCKETS: usize = 1024;
/// How far an interactive data message may be ahead of the last bulk one
/// handled from the same session, in WireGuard's counter, and be handled at
/// once. WireGuard's replay window reaches back 1024 messages: a message
/// that overtook more bulk ones than that would make the receiver drop them
/// as too old. One further ahead waits ([`crate::gateway`]) until the bulk
/// lane has caught up or has nothing left. At 1000, every bulk message still
/// waiting (its counter above the last one handled) stays at least 24
/// inside the window; at 768, a bench run held 11 pings of 40.
pub const OVERTAKE_MAX: u64 = 1000;

/// The lane of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Sparse flows: read first by the receiver.
    Interactive,
    /// Everything else.
    Bulk,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// The window `bytes` counts in.
    window: i64,
    bytes: u32,
    /// Until when the flow stays bulk.
    bulk_until_ms: i64,
}

/// A frame's bucket, once counted.
struct Counted {
    index: usize,
    bulk_until_ms: i64,
}

/// The flow meter.
#[derive(Debug, Clone)]
pub struct Lanes {
    buckets: Box<[Bucket]>,
    /// The window `lane_bytes` counts in.
    window: i64,
    lane_bytes: u32,
}

impl Default for Lanes {
    fn default() -> Lanes {
        Lanes {
            buckets: vec![Bucket::default(); FLOW_BUCKETS].into_boxed_slice(),
            window: i64::MIN,
            lane_bytes: 0,
        }
    }
}

impl Lanes {
    /// The lane of `frame` from the site's bridge of `segment`, counting it
    /// to its flow.
    pub fn classify(&mut self, now_ms: i64, segment: u32, offload: Offload, frame: &[u8]) -> Lane {
        let window = now_ms.div_euclid(WINDOW_MS);
        if self.window != window {
            self.window = window;
            self.lane_bytes = 0;
        }
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let bucket = self.count(now_ms, segment, frame);
        let interactive = !offload.is_gso()
            && now_ms >= bucket.bulk_until_ms
            && self.lane_bytes.saturating_add(len) <= LANE_BYTES_MAX;
        if interactive {
            self.lane_bytes += len;
            Lane::Interactive
        } else {
            self.buckets[bucket.index].bulk_until_ms = now_ms.saturating_add(BULK_HOLD_MS);
            Lane::Bulk
        }
    }

    /// Counts `frame`, which came from a peer for the site's bridge of
    /// `segment`, to its flow: a flow is sparse only if it is sparse both
    /// ways (the acknowledgements of a transfer are few bytes, but they
    /// belong to the transfer, and the kernel's TAP sorts both ways of a
    /// flow alike).
    pub fn count_delivered(&mut self, now_ms: i64, segment: u32, frame: &[u8]) {
        self.count(now_ms, segment, frame);
    }

    /// Adds `frame` to its flow's bucket in the current window; a flow past
    /// [`FLOW_BYTES_MAX`] goes bulk for [`BULK_HOLD_MS`].
    fn count(&mut self, now_ms: i64, segment: u32, frame: &[u8]) -> Counted {
        let window = now_ms.div_euclid(WINDOW_MS);
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let index = flow_hash(segment, frame) as usize % FLOW_BUCKETS;
        let bucket = &mut self.buckets[index];
        if bucket.window != window {
            bucket.window = window;
            bucket.bytes = 0;
        }
        bucket.bytes = bucket.bytes.saturating_add(len);
        if bucket.bytes > FLOW_BYTES_MAX {
            bucket.bulk_until_ms = now_ms.saturating_add(BULK_HOLD_MS);
        }
        Counted {
            index,
            bulk_until_ms: bucket.bulk_until_ms,
        }
    }

    /// Puts the lane mark in `datagram` (what WireGuard wrote for one frame)
    /// if it is a data message of the interactive lane.
    pub fn mark(lane: Lane, datagram: &mut [u8]) {
        if lane == Lane::Interactive && datagram.len() > LANE_OFFSET && datagram[0] == MESSAGE_DATA
        {
            datagram[LANE_OFFSET] = LANE_INTERACTIVE;
        }
    }

    /// Whether `datagram` carries a mark: if so, it is copied to `scratch`
    /// without it, as WireGuard wants it (the caller passes `scratch` on);
    /// anything else is left as it is, for WireGuard to judge.
    pub fn unmark(datagram: &[u8], scratch: &mut Vec<u8>) -> bool {
        if !Lanes::is_marked(datagram) {
            return false;
        }
        scratch.clear();
        scratch.extend_from_slice(datagram);
        scratch[LANE_OFFSET] = 0;
        true
    }

    /// The session (receiver index) and counter of a WireGuard data
    /// message, as its header says (unauthenticated).
    pub fn position(datagram: &[u8]) -> Option<(u32, u64)> {
        if datagram.len() < 16 || datagram[0] != MESSAGE_DATA {
            return None;
        }
        let index = u32::from_le_bytes(datagram[4..8].try_into().expect("four bytes"));
        let counter = u64::from_le_bytes(datagram[8..16].try_into().expect("eight bytes"));
        Some((index, counter))
    }

    /// Whether `datagram` is a data message marked for the interactive lane.
    pub fn is_marked(datagram: &[u8]) -> bool {
        datagram.len() > LANE_OFFSET
            && datagram[0] == MESSAGE_DATA
            && datagram[LANE_OFFSET] == LANE_INTERACTIVE
    }
}

/// A hash of a frame's flow, the same both ways: for IPv4 and IPv6, the
/// addresses, the protocol and (TCP, UDP, SCTP; not in a later IPv4
/// fragment) the ports; for anything else the MAC addresses and the
/// EtherType. One 802.1Q tag is looked through. FNV-1a: cheap, and flows
/// are the site's own.
pub fn flow_hash(segment: u32, frame: &[u8]) -> u32 {
    let mut hash = Fnv::default();
    hash.write(&segment.to_be_bytes());
    let mut ethertype_at = 12;
    if frame.get(12..14) == Some(&[0x81, 0x00]) {
        ethertype_at = 16;
    }
    let Some(ethertype) = frame.get(ethertype_at..ethertype_at + 2) else {
        hash.write(frame);
        return hash.0;
    };
    let ip = &frame[ethertype_at + 2..];
    let ports_at = match ethertype {
        [0x08, 0x00] if ip.len() >= 20 => {
            let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
            hash.write(&ip[9..10]);
            hash.write_pair(&ip[12..16], &ip[16..20]);
            let header_len = usize::from(ip[0] & 0x0f) * 4;
            (!later_fragment && matches!(ip[9], 6 | 17 | 132)).then_some(header_len)
        }
        [0x86, 0xdd] if ip.len() >= 40 => {
            hash.write(&ip[6..7]);
            hash.write_pair(&ip[8..24], &ip[24..40]);
            matches!(ip[6], 6 | 17 | 132).then_some(40)
        }
        _ => {
            hash.write(ethertype);
            hash.write_pair(&frame[..6], &frame[6..12]);
            None
        }
    };
    if let Some(at) = ports_at
        && let Some(ports) = ip.get(at..at + 4)
    {
        hash.write_pair(&ports[..2], &ports[2..]);
    }
    hash.0
}

struct Fnv(u32);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0x811c_9dc5)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
    }

    /// Two fields of a flow (source and destination), in the same order
    /// whichever way the frame goes.
    fn write_pair(&mut self, a: &[u8], b: &[u8]) {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        self.write(low);
        self.write(high);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::GSO_TCPV4;

    /// An Ethernet frame with an IPv4 packet of `protocol` and `len` bytes
    /// in all, from port `port` (TCP, UDP) to 22.
    fn ipv4(protocol: u8, port: u16, len: usize) -> Vec<u8> {
        let mut frame = vec![0; len.max(14 + 24)];
        frame[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[14 + 9] = protocol;
        frame[14 + 12..14 + 20].copy_from_slice(&[198, 19, 0, 1, 198, 19, 0, 2]);
        frame[34..36].copy_from_slice(&port.to_be_bytes());
        frame[36..38].copy_from_slice(&22u16.to_be_bytes());
        frame
    }

    #[test]
    fn a_sparse_flow_is_interactive_and_a_transfer_beside_it_is_not() {
        let mut lanes = Lanes::default();
        let ping = ipv4(1, 0, 98);
        let bulk = ipv4(6, 5001, 1514);
        for now in 0..100 {
            // 20 full frames every ms: 30 KB per ms, a transfer.
            for _ in 0..20 {
                let lane = lanes.classify(now, 7, Offload::NONE, &bulk);
                if now > 0 {
                    assert_eq!(lane, Lane::Bulk);
                }
            }
            if now % 10 == 0 {
                assert_eq!(
                    lanes.classify(now, 7, Offload::NONE, &ping),
                    Lane::Interactive,
                    "at {now} ms"
                );
            }
        }
    }

    #[test]
    fn a_flow_that_grows_goes_bulk_at_once_and_comes_back_only_after_the_hold() {
        let mut lanes = Lanes::default();
        let frame = ipv4(17, 53, 1000);
        let per_window = FLOW_BYTES_MAX as usize / 1000;
        let lanes_of = |lanes: &mut Lanes, now: i64, count: usize| -> Vec<Lane> {
            (0..count)
                .map(|_| lanes.classify(now, 1, Offload::NONE, &frame))
                .collect()
        };
        let first = lanes_of(&mut lanes, 0, per_window + 3);
        assert!(first[..per_window].iter().all(|l| *l == Lane::Interactive));
        assert!(first[per_window..].iter().all(|l| *l == Lane::Bulk));
        // Quiet again, but within the hold: still bulk.
        assert_eq!(lanes_of(&mut lanes, WINDOW_MS * 3, 1), [Lane::Bulk]);
        assert_eq!(
            lanes_of(&mut lanes, WINDOW_MS * 3 + BULK_HOLD_MS, 1),
            [Lane::Interactive]
        );
    }

    #[test]
    fn super_frames_are_bulk_and_the_lane_has_a_ceiling_for_all_flows() {
        let mut lanes = Lanes::default();
        let gso = Offload {
            gso_type: GSO_TCPV4,
            ..Offload::NONE
        };
        assert_eq!(lanes.classify(0, 1, gso, &ipv4(6, 1, 200)), Lane::Bulk);
        // Many sparse flows at once: the lane takes LANE_BYTES_MAX of them.
        let mut interactive = 0;
        for port in 0..1000u16 {
            if lanes.classify(100, 1, Offload::NONE, &ipv4(17, port, 1000)) == Lane::Interactive {
                interactive += 1000;
            }
        }
        assert!(interactive <= LANE_BYTES_MAX as usize);
        assert!(interactive > LANE_BYTES_MAX as usize / 2, "{interactive}");
    }

    #[test]
    fn flows_differ_by_protocol_ports_and_segment_and_ignore_the_payload() {
        let tcp = ipv4(6, 5001, 100);
        let mut other_payload = tcp.clone();
        other_payload[60] = 9;
        assert_eq!(flow_hash(1, &tcp), flow_hash(1, &other_payload));
        assert_ne!(flow_hash(1, &tcp), flow_hash(2, &tcp));
        assert_ne!(flow_hash(1, &tcp), flow_hash(1, &ipv4(6, 5002, 100)));
        assert_ne!(flow_hash(1, &tcp), flow_hash(1, &ipv4(17, 5001, 100)));
        // Short and odd frames hash without panicking.
        for len in 0..60 {
            flow_hash(1, &tcp[..len.min(tcp.len())]);
        }
    }

    #[test]
    fn a_flow_is_one_both_ways_and_its_delivered_bytes_count() {
        let forward = ipv4(6, 5001, 100);
        let mut back = forward.clone();
        // Swap the addresses and the ports.
        back.copy_within(14 + 12..14 + 16, 14 + 16);
        back[14 + 12..14 + 16].copy_from_slice(&forward[14 + 16..14 + 20]);
        back[34..36].copy_from_slice(&forward[36..38]);
        back[36..38].copy_from_slice(&forward[34..36]);
        assert_ne!(back, forward);
        assert_eq!(flow_hash(1, &back), flow_hash(1, &forward));

        // A transfer delivered to the site makes its acknowledgements bulk.
        let mut lanes = Lanes::default();
        assert_eq!(
            lanes.classify(0, 1, Offload::NONE, &back),
            Lane::Interactive
        );
        let data = ipv4(6, 5001, 1514);
        for _ in 0..20 {
            lanes.count_delivered(1, 1, &data);
        }
        assert_eq!(lanes.classify(2, 1, Offload::NONE, &back), Lane::Bulk);
    }

    #[test]
    fn a_marked_data_message_is_unmarked_and_nothing_else_is_touched() {
        let mut data = vec![MESSAGE_DATA, 0, 0, 0, 9, 9];
        Lanes::mark(Lane::Bulk, &mut data);
        assert!(!Lanes::is_marked(&data));
        Lanes::mark(Lane::Interactive, &mut data);
        assert_eq!(data[..4], [MESSAGE_DATA, LANE_INTERACTIVE, 0, 0]);
        let mut scratch = Vec::new();
        assert!(Lanes::unmark(&data, &mut scratch));
        assert_eq!(scratch, [4, 0, 0, 0, 9, 9]);
        // A handshake initiation (type 1) is never marked.
        let mut init = vec![1, 0, 0, 0];
        Lanes::mark(Lane::Interactive, &mut init);
        assert_eq!(init, [1, 0, 0, 0]);
        assert!(!Lanes::unmark(&[1, LANE_INTERACTIVE, 0], &mut scratch));
        assert!(!Lanes::unmark(&[MESSAGE_DATA], &mut scratch));
    }

    #[test]
    fn the_position_of_a_data_message_is_its_index_and_counter() {
        let mut data = vec![MESSAGE_DATA, LANE_INTERACTIVE, 0, 0];
        data.extend_from_slice(&0x0102_0304u32.to_le_bytes());
        data.extend_from_slice(&77u64.to_le_bytes());
        assert_eq!(Lanes::position(&data), Some((0x0102_0304, 77)));
        assert_eq!(Lanes::position(&data[..15]), None);
        data[0] = 1;
        assert_eq!(Lanes::position(&data), None);
    }
}
