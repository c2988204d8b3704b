//! The overlay's decapsulation and fragment reassembly
//! (`overlay/src/encap.rs`), with offload metadata (`offload.rs`), handing
//! each complete frame to a segment switch as the gateway does
//! (`gateway.rs`, `deliver`).
//!
//! Input: records (see `vcfed_fuzz::records`), each one inner packet as
//! WireGuard hands it over. Tag 255 runs the gateway's timer instead; other
//! tags move the clock (bits 1-7, by up to 2 s, the reassembly timeout),
//! and with bit 0 set the packet's IPv4 length and checksum are made right
//! first, so that mutations reach the fragment and GRE code behind them.
//!
//! Asserts: no panic; at most `PENDING_MAX` partial packets; a complete
//! frame carries offload metadata that fits it; re-encapsulating a frame
//! (whole, and in fragments of a small MTU) and decapsulating the packets
//! gives the same segment, metadata and frame; the switch never sends a
//! frame from a tunnel into another tunnel.

#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use vcfed_fuzz::records;
use vcfed_overlay::encap::{
    Decapsulator, ENCAP_OVERHEAD, Encapsulator, INNER_MTU_DEFAULT, PENDING_MAX,
};
use vcfed_overlay::frame::FRAME_LEN_MAX;
use vcfed_overlay::offload::Offload;
use vcfed_overlay::switch::{Decision, Segment, SwitchConfig};

/// The tunnel peer every packet comes from.
const PEER: u32 = 1;

/// Encapsulates `frame` with an MTU of `inner_mtu` and decapsulates the
/// packets: the same frame must come out of the last one, and nothing out
/// of the others.
fn round_trip(segment: u32, offload: Offload, frame: &[u8], inner_mtu: usize) {
    let mut encapsulator = Encapsulator::new(
        Ipv4Addr::new(169, 254, 77, 1),
        Ipv4Addr::new(169, 254, 77, 2),
        inner_mtu,
    );
    let mut packets = Vec::new();
    if encapsulator
        .encapsulate(segment, offload, frame, |packet| {
            packets.push(packet.to_vec())
        })
        .is_err()
    {
        // A frame reassembled from fragments may be too large for this MTU's
        // fragments to address; the gateway never sends such a frame.
        assert!(frame.len() + ENCAP_OVERHEAD > inner_mtu);
        return;
    }
    let mut decapsulator = Decapsulator::new();
    let (last, first) = packets.split_last().expect("at least one packet");
    for packet in first {
        assert_eq!(decapsulator.decapsulate(0, packet), Ok(None));
    }
    let inner = decapsulator
        .decapsulate(0, last)
        .expect("our own packets decapsulate")
        .expect("the last packet completes the frame");
    assert_eq!(inner.segment, segment);
    assert_eq!(inner.frame, frame);
    if offload.is_none() {
        // Metadata that asks nothing travels as a plain frame.
        assert_eq!(inner.offload, Offload::NONE);
    } else {
        assert_eq!(inner.offload, offload);
    }
}

/// Sets the total length and the header checksum of an IPv4 packet.
fn fix_header(packet: &mut [u8]) {
    let Ok(total) = u16::try_from(packet.len()) else {
        return;
    };
    if packet.len() < 20 {
        return;
    }
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[10..12].copy_from_slice(&[0, 0]);
    let mut sum: u32 = packet[..20]
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = !u16::try_from(sum).expect("folded to 16 bits");
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
}

fuzz_target!(|data: &[u8]| {
    let mut decapsulator = Decapsulator::new();
    let mut switch = Segment::new(SwitchConfig::default(), 0);
    switch.add_peer(PEER);
    let mut now_ms = 0i64;
    for (tag, packet) in records(data) {
        if tag == 255 {
            decapsulator.expire(now_ms);
            switch.expire(now_ms);
            continue;
        }
        now_ms += i64::from(tag >> 1) * 16;
        let mut packet = packet.to_vec();
        if tag & 1 == 1 {
            fix_header(&mut packet);
        }
        let dropped = decapsulator.fragments_dropped;
        let complete = decapsulator
            .decapsulate(now_ms, &packet)
            .ok()
            .flatten()
            .map(|inner| (inner.segment, inner.offload, inner.frame.to_vec()));
        assert!(decapsulator.pending() <= PENDING_MAX);
        assert!(decapsulator.fragments_dropped >= dropped);
        let Some((segment, offload, frame)) = complete else {
            continue;
        };
        assert!(offload.is_none() || offload.check(frame.len()).is_ok());
        round_trip(segment, offload, &frame, INNER_MTU_DEFAULT);
        round_trip(segment, offload, &frame, 68 + usize::from(tag % 8) * 8);
        // The gateway's `deliver`: plain frames are at most FRAME_LEN_MAX.
        if offload.is_none() && frame.len() > FRAME_LEN_MAX {
            continue;
        }
        let decision = switch.from_peer(now_ms, PEER, &frame);
        assert!(
            matches!(decision, Decision::Local | Decision::Drop(_)),
            "split horizon: {decision:?}"
        );
    }
});
