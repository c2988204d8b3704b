//! The segment switch (`overlay/src/switch.rs`): frames from the site's
//! bridge and from tunnel peers, peers joining and leaving, time passing.
//!
//! Input: records (see `vcfed_fuzz::records`); the tag's low 3 bits are the
//! operation, its high bits the peer (0 to 3); a frame is the record's
//! bytes. A small table and flood budget make the bounds bite.
//!
//! Asserts: no panic; at most `macs_max` addresses learnt; split horizon (a
//! frame from a tunnel goes to the local side or nowhere); unicast and
//! floods go only to the segment's peers; frames from outside the segment
//! are dropped; floods stay within the token bucket's budget.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vcfed_fuzz::records;
use vcfed_overlay::frame::Mac;
use vcfed_overlay::switch::{Decision, DropReason, Segment, SwitchConfig};

const CONFIG: SwitchConfig = SwitchConfig {
    macs_max: 8,
    mac_aging_ms: 10_000,
    flood_per_s: 20,
    flood_burst: 4,
};

fuzz_target!(|data: &[u8]| {
    let mut switch = Segment::new(CONFIG, 0);
    let mut now_ms = 0i64;
    for (tag, bytes) in records(data) {
        let peer = u32::from(tag >> 3 & 3);
        let peers = switch.peers();
        match tag & 7 {
            0 | 1 => {
                let decision = switch.from_local(now_ms, bytes);
                match decision {
                    Decision::Peer(to) => {
                        assert!(peers.contains(&to));
                        assert!(!Mac(bytes[..6].try_into().expect("a header")).is_group());
                    }
                    Decision::Peers(to) => assert_eq!(to, peers),
                    Decision::Local => panic!("local frames are the bridge's to deliver"),
                    Decision::Drop(_) => {}
                }
            }
            2 | 3 => {
                let decision = switch.from_peer(now_ms, peer, bytes);
                if !peers.contains(&peer) {
                    assert_eq!(decision, Decision::Drop(DropReason::UnknownPeer));
                }
                assert!(
                    matches!(decision, Decision::Local | Decision::Drop(_)),
                    "split horizon: {decision:?}"
                );
            }
            4 => switch.add_peer(peer),
            5 => switch.remove_peer(peer),
            6 => {
                let step = bytes.first().copied().unwrap_or(0);
                now_ms += i64::from(step) * 100;
            }
            _ => switch.expire(now_ms),
        }
        assert!(switch.macs_learnt() <= CONFIG.macs_max);
        let budget = CONFIG.flood_burst
            + u64::try_from(now_ms).expect("time only moves forward") * CONFIG.flood_per_s / 1000;
        assert!(switch.stats().flooded <= budget);
    }
});
