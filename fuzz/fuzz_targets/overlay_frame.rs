//! Ethernet frames (`overlay/src/frame.rs`) and offload metadata
//! (`overlay/src/offload.rs`) as they come from a peer or a TAP device.
//!
//! Input: 10 bytes of metadata, then the frame.
//!
//! Asserts: no panic; metadata reads back to the same bytes in both byte
//! orders; metadata that `check` accepts has its checksum field inside the
//! frame and a segment size for a super-frame; removing an 802.1Q tag and
//! adding it back gives the frame again, and parsing agrees with both; the
//! lanes' flow meter takes any frame, and a datagram that carries the lane
//! mark loses it and nothing else.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vcfed_overlay::frame::{self, ETHERTYPE_VLAN, FRAME_LEN_MAX};
use vcfed_overlay::lane::{LANE_OFFSET, Lanes, flow_hash};
use vcfed_overlay::offload::{F_NEEDS_CSUM, Offload, SUPER_FRAME_LEN_MAX, WIRE_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((meta, frame)) = data.split_first_chunk::<WIRE_LEN>() else {
        return;
    };
    let offload = Offload::from_wire(*meta);
    assert_eq!(offload.to_wire(), *meta);
    assert_eq!(Offload::from_virtio(offload.to_virtio()), offload);
    if offload.check(frame.len()).is_ok() {
        assert!(frame.len() <= SUPER_FRAME_LEN_MAX);
        if offload.flags & F_NEEDS_CSUM != 0 {
            let csum_end = usize::from(offload.csum_start) + usize::from(offload.csum_offset) + 2;
            assert!(csum_end <= frame.len());
        }
        if offload.is_gso() {
            assert!(offload.gso_size > 0);
        }
    }

    let mut lanes = Lanes::default();
    lanes.classify(0, 7, offload, frame);
    lanes.count_delivered(1, 7, frame);
    let _ = flow_hash(7, frame);
    let mut unmarked = Vec::new();
    if Lanes::unmark(frame, &mut unmarked) {
        assert!(!Lanes::is_marked(&unmarked));
        assert_eq!(unmarked.len(), frame.len());
        assert_eq!(unmarked[LANE_OFFSET], 0);
        assert_eq!(unmarked[..LANE_OFFSET], frame[..LANE_OFFSET]);
        assert_eq!(unmarked[LANE_OFFSET + 1..], frame[LANE_OFFSET + 1..]);
    }

    let parsed = frame::parse_header(frame);
    match frame::parse(frame) {
        Ok(info) => {
            assert!(frame.len() <= FRAME_LEN_MAX);
            assert_eq!(parsed, Ok(info));
        }
        Err(_) => assert!(parsed.is_err() || frame.len() > FRAME_LEN_MAX),
    }
    let Ok(info) = parsed else {
        return;
    };
    let untagged = frame::strip_vlan(frame);
    let Ok(plain) = frame::parse_header(&untagged) else {
        // Only a second tag, cut short, leaves no header to read.
        assert_eq!(info.ethertype, ETHERTYPE_VLAN);
        return;
    };
    assert_eq!((plain.dst, plain.src), (info.dst, info.src));
    match info.vlan {
        Some(vlan) => {
            assert_eq!(untagged.len() + 4, frame.len());
            // A second tag (802.1ad stacking) is read on the next strip.
            if info.ethertype != ETHERTYPE_VLAN {
                assert_eq!(plain.ethertype, info.ethertype);
                assert_eq!(plain.vlan, None);
            }
            let tci = u16::from_be_bytes([frame[14], frame[15]]);
            if (1..=4094).contains(&vlan) && tci == vlan {
                assert_eq!(frame::tag_vlan(&untagged, vlan), frame);
            }
        }
        None => {
            assert_eq!(untagged, frame);
            let vlan = 1 + u16::from(frame[0]) * 16 % 4094;
            let tagged = frame::tag_vlan(frame, vlan);
            let info_tagged = frame::parse_header(&tagged).expect("a tagged frame parses");
            assert_eq!(info_tagged.vlan, Some(vlan));
            assert_eq!(info_tagged.ethertype, info.ethertype);
            assert_eq!(frame::strip_vlan(&tagged), frame);
        }
    }
});
