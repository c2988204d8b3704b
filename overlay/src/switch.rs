//! The learning switch of one cluster segment at one gateway.
//!
//! Ports are the site's own bridge (`Local`) and the tunnels to the other
//! sites of the cluster (`Peer`). The switch learns where MAC addresses live,
//! sends known unicast to the one site that has it, floods group and unknown
//! frames from the local side to every peer (rate-limited, so a broadcast
//! storm cannot saturate the tunnels) and applies split horizon: a frame that
//! came from a tunnel only ever goes to the local side. The sites of a
//! cluster form a full mesh, so nothing needs relaying.

use std::collections::{BTreeMap, BTreeSet};

use crate::frame::{self, Mac};

/// A tunnel peer of the segment, numbered by the caller.
pub type PeerIndex = u32;

/// Where a MAC address lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Behind this site's bridge.
    Local,
    /// At the site behind this tunnel peer.
    Peer(PeerIndex),
}

/// What to do with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Deliver to this site's bridge.
    Local,
    /// Send through the tunnel to this peer.
    Peer(PeerIndex),
    /// Send through the tunnels to these peers (flooding).
    Peers(Vec<PeerIndex>),
    /// Drop it.
    Drop(DropReason),
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a valid Ethernet frame.
    Malformed,
    /// Local traffic: the site's bridge already delivered it.
    LocalDestination,
    /// From a tunnel, for a MAC at another site (split horizon).
    NotHere,
    /// From a peer that is not part of this segment.
    UnknownPeer,
    /// Flooding over the rate limit.
    StormLimited,
    /// No peer to flood to.
    NoPeers,
}

/// Limits of a segment's switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchConfig {
    /// Most MAC addresses learnt.
    pub macs_max: usize,
    /// How long a MAC address stays learnt without traffic, ms.
    pub mac_aging_ms: i64,
    /// Flooded frames per second allowed on average.
    pub flood_per_s: u64,
    /// Flooded frames allowed in a burst.
    pub flood_burst: u64,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            macs_max: 4096,
            mac_aging_ms: 300_000,
            flood_per_s: 2_000,
            flood_burst: 4_000,
        }
    }
}

/// Counters of a segment's switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwitchStats {
    /// Frames forwarded to one peer.
    pub unicast: u64,
    /// Frames flooded to every peer.
    pub flooded: u64,
    /// Frames delivered to the local side.
    pub delivered: u64,
    /// Frames dropped, any reason.
    pub dropped: u64,
    /// Floods refused by the rate limit.
    pub storm_limited: u64,
    /// Addresses not learnt because the table was full.
    pub macs_refused: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    port: Port,
    last_seen_ms: i64,
}

/// The switch of one segment.
#[derive(Debug)]
pub struct Segment {
    config: SwitchConfig,
    peers: BTreeSet<PeerIndex>,
    macs: BTreeMap<Mac, Entry>,
    /// Flood tokens, in thousandths, and when they were last refilled.
    tokens_milli: u64,
    refilled_at_ms: i64,
    stats: SwitchStats,
}

impl Segment {
    /// An empty segment.
    pub fn new(config: SwitchConfig, now_ms: i64) -> Segment {
        Segment {
            config,
            peers: BTreeSet::new(),
            macs: BTreeMap::new(),
            tokens_milli: config.flood_burst * 1000,
            refilled_at_ms: now_ms,
            stats: SwitchStats::default(),
        }
    }

    /// Adds a tunnel peer to the segment.
    pub fn add_peer(&mut self, peer: PeerIndex) {
        self.peers.insert(peer);
    }

    /// Removes a peer and forgets the addresses learnt behind it.
    pub fn remove_peer(&mut self, peer: PeerIndex) {
        self.peers.remove(&peer);
        self.macs.retain(|_, entry| entry.port != Port::Peer(peer));
    }

    /// The tunnel peers of the segment.
    pub fn peers(&self) -> Vec<PeerIndex> {
        self.peers.iter().copied().collect()
    }

    /// Counters.
    pub fn stats(&self) -> SwitchStats {
        self.stats
    }

    /// How many addresses are learnt (at most `macs_max`).
    pub fn macs_learnt(&self) -> usize {
        self.macs.len()
    }

    /// Where `mac` was learnt, if it was.
    pub fn lookup(&self, mac: &Mac) -> Option<Port> {
        self.macs.get(mac).map(|entry| entry.port)
    }

    /// A frame from this site's bridge (its length is the caller's to
    /// check: a super-frame may be up to 64 KiB).
    pub fn from_local(&mut self, now_ms: i64, frame: &[u8]) -> Decision {
        let Ok(info) = frame::parse_header(frame) else {
            return self.drop(DropReason::Malformed);
        };
        self.learn(now_ms, info.src, Port::Local);
        if !info.dst.is_group() {
            match self.live_entry(now_ms, &info.dst) {
                Some(Port::Local) => return self.drop(DropReason::LocalDestination),
                Some(Port::Peer(peer)) => {
                    self.stats.unicast += 1;
                    return Decision::Peer(peer);
                }
                None => {}
            }
        }
        if self.peers.is_empty() {
            return self.drop(DropReason::NoPeers);
        }
        if !self.take_flood_token(now_ms) {
            self.stats.storm_limited += 1;
            return self.drop(DropReason::StormLimited);
        }
        self.stats.flooded += 1;
        Decision::Peers(self.peers.iter().copied().collect())
    }

    /// A frame from the tunnel to `peer`. Split horizon: the answer is
    /// [`Decision::Local`] or a drop, never another tunnel.
    pub fn from_peer(&mut self, now_ms: i64, peer: PeerIndex, frame: &[u8]) -> Decision {
        if !self.peers.contains(&peer) {
            return self.drop(DropReason::UnknownPeer);
        }
        let Ok(info) = frame::parse_header(frame) else {
            return self.drop(DropReason::Malformed);
        };
        self.learn(now_ms, info.src, Port::Peer(peer));
        if !info.dst.is_group() && matches!(self.live_entry(now_ms, &info.dst), Some(Port::Peer(_)))
        {
            return self.drop(DropReason::NotHere);
        }
        self.stats.delivered += 1;
        Decision::Local
    }

    /// Forgets addresses not seen for `mac_aging_ms`.
    pub fn expire(&mut self, now_ms: i64) {
        let aging = self.config.mac_aging_ms;
        self.macs
            .retain(|_, entry| now_ms - entry.last_seen_ms < aging);
    }

    fn live_entry(&self, now_ms: i64, mac: &Mac) -> Option<Port> {
        self.macs
            .get(mac)
            .filter(|entry| now_ms - entry.last_seen_ms < self.config.mac_aging_ms)
            .map(|entry| entry.port)
    }

    fn learn(&mut self, now_ms: i64, mac: Mac, port: Port) {
        if mac.is_group() {
            return;
        }
        if let Some(entry) = self.macs.get_mut(&mac) {
            // A VM that moved shows up on its new port: the last frame wins.
            *entry = Entry {
                port,
                last_seen_ms: now_ms,
            };
            return;
        }
        if self.macs.len() >= self.config.macs_max {
            self.expire(now_ms);
        }
        if self.macs.len() >= self.config.macs_max {
            // Unknown addresses are still reached by flooding.
            self.stats.macs_refused += 1;
            return;
        }
        self.macs.insert(
            mac,
            Entry {
                port,
                last_seen_ms: now_ms,
            },
        );
    }

    fn take_flood_token(&mut self, now_ms: i64) -> bool {
        let elapsed = u64::try_from(now_ms - self.refilled_at_ms).unwrap_or(0);
        self.refilled_at_ms = self.refilled_at_ms.max(now_ms);
        let cap = self.config.flood_burst * 1000;
        self.tokens_milli = (self.tokens_milli + elapsed * self.config.flood_per_s).min(cap);
        if self.tokens_milli < 1000 {
            return false;
        }
        self.tokens_milli -= 1000;
        true
    }

    fn drop(&mut self, reason: DropReason) -> Decision {
        self.stats.dropped += 1;
        Decision::Drop(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::tests::{frame, mac};

    fn segment(peers: &[PeerIndex]) -> Segment {
        let mut segment = Segment::new(SwitchConfig::default(), 0);
        for peer in peers {
            segment.add_peer(*peer);
        }
        segment
    }

    #[test]
    fn learns_and_forwards_unicast_to_the_one_site() {
        let mut s = segment(&[1, 2]);
        // Unknown destination: flooded to every peer.
        assert_eq!(
            s.from_local(0, &frame(mac(9), mac(1), 60)),
            Decision::Peers(vec![1, 2])
        );
        // The reply from site 2 teaches where mac 9 lives.
        assert_eq!(
            s.from_peer(1, 2, &frame(mac(1), mac(9), 60)),
            Decision::Local
        );
        assert_eq!(
            s.from_local(2, &frame(mac(9), mac(1), 60)),
            Decision::Peer(2)
        );
        // Local to local stays on the bridge.
        s.from_local(3, &frame(mac(1), mac(3), 60));
        assert_eq!(
            s.from_local(4, &frame(mac(3), mac(1), 60)),
            Decision::Drop(DropReason::LocalDestination)
        );
    }

    #[test]
    fn split_horizon_never_sends_a_tunnel_frame_to_another_tunnel() {
        let mut s = segment(&[1, 2]);
        s.from_peer(0, 2, &frame(Mac::BROADCAST, mac(20), 60));
        // Broadcast and unknown from a peer: local only.
        assert_eq!(
            s.from_peer(1, 1, &frame(Mac::BROADCAST, mac(10), 60)),
            Decision::Local
        );
        assert_eq!(
            s.from_peer(2, 1, &frame(mac(77), mac(10), 60)),
            Decision::Local
        );
        // For a MAC known at site 2, arriving from site 1: not here, dropped.
        assert_eq!(
            s.from_peer(3, 1, &frame(mac(20), mac(10), 60)),
            Decision::Drop(DropReason::NotHere)
        );
        // A peer outside the segment gets nothing in.
        assert_eq!(
            s.from_peer(4, 9, &frame(mac(1), mac(99), 60)),
            Decision::Drop(DropReason::UnknownPeer)
        );
    }

    #[test]
    fn a_vm_moving_between_sites_is_learnt_again() {
        let mut s = segment(&[1, 2]);
        s.from_peer(0, 1, &frame(Mac::BROADCAST, mac(5), 60));
        assert_eq!(s.lookup(&mac(5)), Some(Port::Peer(1)));
        s.from_peer(10, 2, &frame(Mac::BROADCAST, mac(5), 60));
        assert_eq!(s.lookup(&mac(5)), Some(Port::Peer(2)));
        assert_eq!(
            s.from_local(11, &frame(mac(5), mac(1), 60)),
            Decision::Peer(2)
        );
        s.remove_peer(2);
        assert_eq!(s.lookup(&mac(5)), None);
    }

    #[test]
    fn addresses_age_out_and_the_table_is_bounded() {
        let config = SwitchConfig {
            macs_max: 4,
            mac_aging_ms: 1000,
            ..SwitchConfig::default()
        };
        let mut s = Segment::new(config, 0);
        s.add_peer(1);
        for i in 0..10 {
            s.from_peer(0, 1, &frame(Mac::BROADCAST, mac(i), 60));
        }
        assert_eq!(s.stats().macs_refused, 6);
        assert_eq!(s.lookup(&mac(3)), Some(Port::Peer(1)));
        // Aged out: flooded again, and room for new addresses.
        assert_eq!(
            s.from_local(1000, &frame(mac(3), mac(50), 60)),
            Decision::Peers(vec![1])
        );
        assert_eq!(s.lookup(&mac(50)), Some(Port::Local));
    }

    #[test]
    fn broadcast_storms_are_limited() {
        let config = SwitchConfig {
            flood_per_s: 100,
            flood_burst: 10,
            ..SwitchConfig::default()
        };
        let mut s = Segment::new(config, 0);
        s.add_peer(1);
        let flooded = (0..50)
            .filter(|_| {
                s.from_local(0, &frame(Mac::BROADCAST, mac(1), 60))
                    != Decision::Drop(DropReason::StormLimited)
            })
            .count();
        assert_eq!(flooded, 10, "the burst");
        // 100 ms later, 10 more tokens.
        let later = (0..50)
            .filter(|_| {
                s.from_local(100, &frame(Mac::BROADCAST, mac(1), 60))
                    != Decision::Drop(DropReason::StormLimited)
            })
            .count();
        assert_eq!(later, 10);
        assert_eq!(s.stats().storm_limited, 80);
    }

    #[test]
    fn malformed_frames_and_lonely_segments_drop() {
        let mut s = segment(&[]);
        assert_eq!(
            s.from_local(0, &[1, 2, 3]),
            Decision::Drop(DropReason::Malformed)
        );
        assert_eq!(
            s.from_local(0, &frame(Mac::BROADCAST, mac(1), 60)),
            Decision::Drop(DropReason::NoPeers)
        );
    }
}
