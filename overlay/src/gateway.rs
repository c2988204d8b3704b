//! The gateway's data plane without sockets: segments (learning switches),
//! encapsulation and one WireGuard session (boringtun `noise::Tunn`) per
//! peer gateway.
//!
//! The caller feeds frames from the site's bridge and datagrams from the UDP
//! socket, calls [`Gateway::handle_timers`] every [`TIMER_TICK_MS`], and sends
//! what collects in [`Outputs`]: one reused arena of bytes, where datagrams
//! for the same peer line up in runs of equal size that one UDP GSO send
//! carries. Nothing on the data path allocates once the arena has grown. Peers are identified cryptographically, never by address:
//! a datagram is matched to a peer by the receiver index WireGuard put in it,
//! or, for a handshake initiation, by the initiator's static key; datagrams
//! that match no configured key are dropped and counted. A peer's endpoint
//! follows the address its authenticated datagrams come from (roaming).
//!
//! Every handshake message is checked before any Diffie-Hellman is done
//! for it, as WireGuard's cookie mechanism has it: its `mac1` must be right
//! for this gateway's key. The gateway counts the messages that pass in
//! windows of a second of the caller's `now_ms`; beyond
//! [`HANDSHAKES_PER_S_MAX`] in one it is under load, and only messages
//! that carry a valid cookie (`mac2`, proving the sender receives at its
//! address) go on; the others are answered with a cookie reply, which costs
//! a hash and a small AEAD seal, not a DH. Under load, those with a cookie
//! are limited per source address as well (`address_limit.rs`), so that a
//! sender that answers cookies cannot ask for a DH per packet. Not under
//! load, no address is limited: a message without a cookie proves nothing
//! about its source address, so charging that address would let anyone
//! spend a peer's handshakes by spoofing it. What is dropped is counted by
//! kind in [`GatewayStats`]: junk, bad `mac1`, answered with a cookie, over
//! an address's limit, unknown peer, replay, other refusals.
//!
//! One caveat to the sans-IO rule: boringtun reads the monotonic clock inside
//! `Tunn` for handshake and rekey timers, and inside its cookie checker for
//! the two-minute life of the cookie secret; it draws ephemeral keys and the
//! checker's secrets from the OS. Whether the gateway is under load, the
//! switch, encapsulation and reassembly all go by the `now_ms` the caller
//! gives, like every core.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use self::address_limit::AddressLimiter;
pub use self::address_limit::{ADDRESS_HANDSHAKES_BURST, ADDRESS_HANDSHAKES_PER_S, ADDRESSES_MAX};
use crate::encap::{Decapsulator, Encapsulator, INNER_MTU_DEFAULT, Inner};
use crate::frame::FRAME_LEN_MAX;
use crate::lane::{Lane, Lanes, MESSAGE_DATA, OVERTAKE_MAX};
use crate::offload::Offload;
use crate::switch::{Decision, PeerIndex, Segment, SwitchConfig};

/// How often [`Gateway::handle_timers`] should run, ms.
pub const TIMER_TICK_MS: i64 = 100;
/// Keepalive interval of the tunnels, seconds (keeps NAT mappings open).
pub const KEEPALIVE_S: u16 = 25;
/// Largest datagram the gateway writes or reads.
pub const DATAGRAM_LEN_MAX: usize = 65_536;
/// Most peers one gateway serves.
pub const PEERS_MAX: usize = 1024;
/// Bytes WireGuard adds to an inner packet (header and tag).
pub const DATA_OVERHEAD: usize = 32;
/// WireGuard's message type of a cookie reply.
const MESSAGE_COOKIE_REPLY: u8 = 3;
/// Room for any handshake message boringtun writes (148 for the largest).
const HANDSHAKE_LEN_MAX: usize = 256;
/// Handshake messages (initiations and responses with a valid `mac1`) the
/// gateway takes in a second ([`HANDSHAKE_WINDOW_MS`] of the caller's
/// time) before it is under load: it then asks their senders for a cookie
/// and limits each cookie-proven address to its share. Every peer of a full
/// table ([`PEERS_MAX`]) can handshake within about a second of a restart;
/// each costs one to three X25519 operations, so this bounds the DH work
/// for senders that need not receive to a few percent of a core.
pub const HANDSHAKES_PER_S_MAX: u64 = 1000;
/// The window [`HANDSHAKES_PER_S_MAX`] counts in, ms of the caller's time.
/// A window begins with the first handshake message after the previous
/// one ended.
pub const HANDSHAKE_WINDOW_MS: i64 = 1000;

// The limit is named per second: its window must be one.
const _: () = assert!(HANDSHAKE_WINDOW_MS == 1000);

/// A peer gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The caller's number for the peer.
    pub index: PeerIndex,
    /// Its WireGuard public key.
    pub public_key: [u8; 32],
    /// Where to reach it (until it is heard from elsewhere).
    pub endpoint: Option<SocketAddr>,
}

/// Something to send, borrowed from [`Outputs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output<'a> {
    /// Datagrams for a peer gateway: `datagrams` holds them back to back,
    /// each `stride` bytes long but for the last, which may be shorter
    /// (the layout of a UDP GSO send).
    ToNetwork {
        /// Where.
        to: SocketAddr,
        /// The encrypted datagrams.
        datagrams: &'a [u8],
        /// The size of each datagram but the last.
        stride: usize,
    },
    /// A frame for this site's bridge of `segment`.
    ToLocal {
        /// The segment.
        segment: u32,
        /// Its offload metadata.
        offload: Offload,
        /// The Ethernet frame.
        frame: &'a [u8],
        /// It came on the interactive lane: the shell writes it to the TAP's
        /// interactive queue, so that the kernel sorts the flow's frames the
        /// other way there too.
        interactive: bool,
    },
}

#[derive(Debug, Clone, Copy)]
enum Item {
    Network {
        to: SocketAddr,
        start: usize,
        len: usize,
        stride: usize,
        interactive: bool,
    },
    Local {
        segment: u32,
        offload: Offload,
        start: usize,
        len: usize,
        interactive: bool,
    },
}

/// Bytes of one run of datagrams, at most: a UDP GSO send carries at most
/// 64 KiB of payload (65 507 over IPv4).
pub const RUN_BYTES_MAX: usize = 64_000;

/// What the gateway has to send, in one reused arena.
#[derive(Debug, Clone)]
pub struct Outputs {
    bytes: Vec<u8>,
    items: Vec<Item>,
    run_datagrams_max: usize,
    /// Whether an interactive datagram waits.
    urgent: bool,
}

impl Default for Outputs {
    fn default() -> Outputs {
        Outputs::new(1)
    }
}

impl Outputs {
    /// Empty outputs whose runs hold up to `run_datagrams_max` datagrams
    /// (1 without UDP GSO).
    pub fn new(run_datagrams_max: usize) -> Outputs {
        Outputs {
            bytes: Vec::new(),
            items: Vec::new(),
            run_datagrams_max: run_datagrams_max.max(1),
            urgent: false,
        }
    }

    /// Changes how many datagrams a run holds (when the path stops
    /// taking UDP GSO: 1); runs already made keep their size.
    pub fn set_run_datagrams_max(&mut self, run_datagrams_max: usize) {
        self.run_datagrams_max = run_datagrams_max.max(1);
    }

    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes waiting to be sent.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Whether a datagram of the interactive lane waits: the caller should
    /// send at once rather than gather more.
    pub fn urgent(&self) -> bool {
        self.urgent
    }

    /// Forgets everything, keeping the memory.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.items.clear();
        self.urgent = false;
    }

    /// The outputs, in order.
    pub fn iter(&self) -> impl Iterator<Item = Output<'_>> + '_ {
        self.items.iter().map(|item| match *item {
            Item::Network {
                to,
                start,
                len,
                stride,
                interactive: _,
            } => Output::ToNetwork {
                to,
                datagrams: &self.bytes[start..start + len],
                stride,
            },
            Item::Local {
                segment,
                offload,
                start,
                len,
                interactive,
            } => Output::ToLocal {
                segment,
                offload,
                frame: &self.bytes[start..start + len],
                interactive,
            },
        })
    }

    /// Appends a frame for the site.
    fn push_local(&mut self, segment: u32, offload: Offload, frame: &[u8], interactive: bool) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(frame);
        self.items.push(Item::Local {
            segment,
            offload,
            start,
            len: frame.len(),
            interactive,
        });
    }

    /// Appends a datagram `write` produces (at most `max_len` bytes; it
    /// returns how many it wrote, 0 for none) for `to`, joining the last
    /// run when the datagram fits it.
    fn push_datagram(
        &mut self,
        to: SocketAddr,
        max_len: usize,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) {
        self.push_datagram_in(Lane::Bulk, to, max_len, write);
    }

    /// [`Outputs::push_datagram`] for a frame's datagram of `lane`; one of
    /// the interactive lane gets its mark and a run of its own, which no
    /// later datagram joins (the receiver's kernel steers a run by its
    /// first datagram).
    fn push_datagram_in(
        &mut self,
        lane: Lane,
        to: SocketAddr,
        max_len: usize,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) {
        let start = self.bytes.len();
        self.bytes.resize(start + max_len, 0);
        let len = write(&mut self.bytes[start..]);
        self.bytes.truncate(start + len);
        if len == 0 {
            return;
        }
        Lanes::mark(lane, &mut self.bytes[start..]);
        let interactive = Lanes::is_marked(&self.bytes[start..]);
        if let Some(Item::Network {
            to: run_to,
            start: run_start,
            len: run_len,
            stride,
            interactive: false,
        }) = self.items.last_mut()
        {
            // A run is open while all its datagrams are `stride` long and
            // it is next to the new one in the arena.
            let open = *run_len % *stride == 0 && *run_start + *run_len == start;
            if open
                && !interactive
                && *run_to == to
                && len <= *stride
                && *run_len / *stride < self.run_datagrams_max
                && *run_len + len <= RUN_BYTES_MAX
            {
                *run_len += len;
                return;
            }
        }
        self.urgent |= interactive;
        self.items.push(Item::Network {
            to,
            start,
            len,
            stride: len,
            interactive,
        });
    }
}

/// Counters of the data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Datagrams dropped, of every kind below (`junk` to `refused`).
    pub datagrams_dropped: u64,
    /// Datagrams that are no WireGuard message: unknown type, wrong length.
    pub junk: u64,
    /// Handshake messages whose `mac1` does not match this gateway's key
    /// (meant for another key, or forged): dropped before any DH.
    pub bad_mac: u64,
    /// Handshake messages answered with a cookie reply instead of being
    /// handled: the gateway was under load (over [`HANDSHAKES_PER_S_MAX`]
    /// in the window) and they carried no valid cookie. No DH was done for
    /// them.
    pub cookie_replies: u64,
    /// Handshake messages that carried a valid cookie while the gateway was
    /// under load, from an address over its own limit
    /// ([`ADDRESS_HANDSHAKES_PER_S`], bursts of
    /// [`ADDRESS_HANDSHAKES_BURST`]) or from a new address while
    /// [`ADDRESSES_MAX`] are tracked: dropped without an answer, no DH.
    pub rate_limited: u64,
    /// Messages that match no configured peer: an initiation from an
    /// unknown static key, a receiver index no peer has.
    pub unknown_peer: u64,
    /// Messages a peer's session had seen before: data packets its replay
    /// window holds or that are older than the window (1024 packets)
    /// reaches back, which are dropped before any decryption, and
    /// initiations whose timestamp is not newer than the last one's (a
    /// replayed handshake), which are found out only after the
    /// initiation's DHs and the decryption of its timestamp.
    pub replays: u64,
    /// Other messages a peer's session refused: failed authentication, no
    /// session for the index, a response to no handshake.
    pub refused: u64,
    /// Inner packets dropped: not GRE-TEB, bad fragments.
    pub inner_dropped: u64,
    /// Frames for segments this gateway does not carry, or from peers
    /// outside the segment.
    pub wrong_segment: u64,
    /// Frames that had no endpoint to go to yet.
    pub no_endpoint: u64,
    /// Frames from the site dropped before the switch: longer than the
    /// overlay carries, or with offload metadata that does not fit them.
    pub local_dropped: u64,
    /// Frames from the site sent on the interactive lane (see
    /// [`crate::lane`]); the rest went bulk.
    pub interactive_frames: u64,
    /// Interactive datagrams received that were held until the bulk lane
    /// caught up (they would have overtaken more of it than WireGuard's
    /// replay window allows).
    pub interactive_held: u64,
}

/// Counters of the tunnel to one peer gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Datagrams sent to the peer (data, handshakes, keepalives).
    pub tx_datagrams: u64,
    /// Their bytes (UDP payload).
    pub tx_bytes: u64,
    /// Datagrams from the peer that authenticated.
    pub rx_datagrams: u64,
    /// Their bytes (UDP payload).
    pub rx_bytes: u64,
    /// Datagrams for the peer's sessions that were refused: failed
    /// authentication, replays, no session.
    pub rx_dropped: u64,
    /// Of those, replays (see [`GatewayStats::replays`]).
    pub rx_replays: u64,
    /// Inner packets from the peer dropped: not GRE, bad fragments or
    /// offload metadata, frames too long, fragments that timed out.
    pub inner_dropped: u64,
    /// WireGuard sessions established (handshakes completed either way).
    pub handshakes: u64,
}

struct PeerState {
    tunn: Tunn,
    public_key: [u8; 32],
    endpoint: Option<SocketAddr>,
    encap: Encapsulator,
    decap: Decapsulator,
    stats: PeerStats,
    /// The session and counter of the newest bulk data message that
    /// authenticated (how far the bulk lane has got), and when.
    bulk_at: Option<BulkAt>,
    /// The peer sent a marked message in the current session: it reads
    /// lanes, and this gateway marks what it sends it.
    lanes: bool,
    /// This gateway told the peer, in the current session, that it reads
    /// lanes (a marked keepalive).
    hello_sent: bool,
}

/// How far a peer's bulk lane has got.
#[derive(Debug, Clone, Copy)]
struct BulkAt {
    index: u32,
    counter: u64,
    at_ms: i64,
}

/// An interactive datagram held until the bulk lane catches up.
#[derive(Debug, Clone, Copy)]
struct Held {
    from: SocketAddr,
    at_ms: i64,
    start: usize,
    len: usize,
}

/// Interactive datagrams held at most; one more is handled at once.
pub const HELD_MAX: usize = 64;
/// How long after its last bulk message a session's bulk lane counts as
/// busy, ms: an interactive message of a session whose transfer ended is not
/// held behind another peer's.
pub const BULK_ACTIVE_MS: i64 = 20;
/// Bytes of interactive datagrams held at most.
pub const HELD_BYTES_MAX: usize = 256 << 10;
/// How long an interactive datagram is held at most, ms (the bulk lane's
/// progress or its end releases it sooner).
pub const HELD_MS_MAX: i64 = 20;

/// The data plane of one gateway.
pub struct Gateway {
    private: StaticSecret,
    public: PublicKey,
    inner_mtu: usize,
    switch: SwitchConfig,
    peers: BTreeMap<PeerIndex, PeerState>,
    segments: BTreeMap<u32, Segment>,
    stats: GatewayStats,
    /// A boringtun limiter whose limit is never reached, so it checks
    /// `mac1` and nothing else: every handshake message passes it before
    /// any DH. The peers' sessions share it, since boringtun makes a `Tunn`
    /// check every message it decapsulates again (its verified-packet
    /// entry is crate-private).
    mac1_check: Arc<RateLimiter>,
    /// A boringtun limiter with a limit of 0, so always under load: it
    /// checks `mac2` and writes the cookie replies. Asked only while the
    /// gateway is under load, which `handshakes` decides: boringtun's own
    /// count cannot say which messages it took with a cookie, and runs on
    /// its own clock.
    cookie_check: RateLimiter,
    /// Handshake messages with a valid `mac1` in the current window.
    handshakes: HandshakeWindow,
    /// Under load, handshake messages with a valid cookie are limited per
    /// source address too, before any DH.
    address_limiter: AddressLimiter,
    /// The flows of the site's frames, for their lane.
    lanes: Lanes,
    scratch: Vec<u8>,
    /// Where a datagram of the interactive lane loses its mark.
    unmarked: Vec<u8>,
    /// Interactive datagrams that would overtake too much of the bulk lane,
    /// in arrival order, and their bytes.
    held: Vec<Held>,
    held_bytes: Vec<u8>,
    /// Where a held datagram goes to be handled.
    releasing: Vec<u8>,
    /// Whether the bulk lane may have datagrams waiting (the caller says
    /// when it has none: [`Gateway::bulk_queued`]).
    bulk_queued: bool,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("peers", &self.peers.len())
            .field("segments", &self.segments.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway with WireGuard private key `private_key`.
    pub fn new(private_key: [u8; 32], switch: SwitchConfig) -> Gateway {
        let private = StaticSecret::from(private_key);
        let public = PublicKey::from(&private);
        Gateway {
            mac1_check: Arc::new(RateLimiter::new(&public, u64::MAX)),
            cookie_check: RateLimiter::new(&public, 0),
            handshakes: HandshakeWindow::default(),
            address_limiter: AddressLimiter::default(),
            private,
            public,
            inner_mtu: INNER_MTU_DEFAULT,
            switch,
            peers: BTreeMap::new(),
            segments: BTreeMap::new(),
            stats: GatewayStats::default(),
            lanes: Lanes::default(),
            scratch: vec![0; DATAGRAM_LEN_MAX],
            unmarked: Vec::new(),
            held: Vec::new(),
            held_bytes: Vec::new(),
            releasing: Vec::new(),
            bulk_queued: true,
        }
    }

    /// Sets the largest inner packet (path MTU − 60); default for a
    /// 1500-byte path.
    pub fn set_inner_mtu(&mut self, inner_mtu: usize) {
        self.inner_mtu = inner_mtu;
        for peer in self.peers.values_mut() {
            peer.encap = encapsulator(inner_mtu);
        }
    }

    /// This gateway's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// Counters.
    pub fn stats(&self) -> GatewayStats {
        self.stats
    }

    /// Counters of each peer's tunnel, by public key (fragments that timed
    /// out in reassembly included).
    pub fn peer_stats(&self) -> impl Iterator<Item = ([u8; 32], PeerStats)> + '_ {
        self.peers.values().map(|peer| {
            let mut stats = peer.stats;
            stats.inner_dropped += peer.decap.fragments_dropped;
            (peer.public_key, stats)
        })
    }

    /// The segments carried, with their switches.
    pub fn segments(&self) -> impl Iterator<Item = (u32, &Segment)> + '_ {
        self.segments.iter().map(|(id, segment)| (*id, segment))
    }

    /// Adds (or replaces) a peer gateway.
    pub fn add_peer(&mut self, peer: PeerConfig) -> Result<(), &'static str> {
        if !self.peers.contains_key(&peer.index) && self.peers.len() >= PEERS_MAX {
            return Err("too many peers");
        }
        if peer.index > 0x00ff_ffff {
            return Err("peer index must fit 24 bits");
        }
        let tunn = Tunn::new(
            self.private.clone(),
            PublicKey::from(peer.public_key),
            None,
            Some(KEEPALIVE_S),
            peer.index,
            Some(Arc::clone(&self.mac1_check)),
        );
        let state = PeerState {
            tunn,
            public_key: peer.public_key,
            endpoint: peer.endpoint,
            encap: encapsulator(self.inner_mtu),
            decap: Decapsulator::new(),
            stats: PeerStats::default(),
            bulk_at: None,
            lanes: false,
            hello_sent: false,
        };
        self.peers.insert(peer.index, state);
        Ok(())
    }

    /// Removes a peer gateway from the gateway and every segment.
    pub fn remove_peer(&mut self, index: PeerIndex) {
        self.peers.remove(&index);
        for segment in self.segments.values_mut() {
            segment.remove_peer(index);
        }
    }

    /// Adds (or replaces) a segment carried to `peers`.
    pub fn add_segment(&mut self, now_ms: i64, segment: u32, peers: &[PeerIndex]) {
        let mut switch = Segment::new(self.switch, now_ms);
        for peer in peers {
            switch.add_peer(*peer);
        }
        self.segments.insert(segment, switch);
    }

    /// Changes the peers a segment is carried to, keeping what its switch
    /// learnt about the peers that stay. A segment not carried is added.
    pub fn set_segment_peers(&mut self, now_ms: i64, segment: u32, peers: &[PeerIndex]) {
        let Some(switch) = self.segments.get_mut(&segment) else {
            self.add_segment(now_ms, segment, peers);
            return;
        };
        for old in switch.peers() {
            if !peers.contains(&old) {
                switch.remove_peer(old);
            }
        }
        for peer in peers {
            switch.add_peer(*peer);
        }
    }

    /// The public keys of the peers with a session: a handshake completed
    /// within the last 3 minutes (WireGuard's reject-after time).
    pub fn peers_with_session(&self) -> Vec<[u8; 32]> {
        self.peers
            .values()
            .filter(|peer| {
                peer.tunn
                    .time_since_last_handshake()
                    .is_some_and(|age| age.as_secs() < 180)
            })
            .map(|peer| peer.public_key)
            .collect()
    }

    /// Stops carrying a segment.
    pub fn remove_segment(&mut self, segment: u32) {
        self.segments.remove(&segment);
    }

    /// The switch of a segment.
    pub fn segment(&self, segment: u32) -> Option<&Segment> {
        self.segments.get(&segment)
    }

    /// A frame from this site's bridge of `segment`, with its offload
    /// metadata ([`Offload::NONE`] for a plain frame).
    pub fn handle_local_frame(
        &mut self,
        now_ms: i64,
        segment: u32,
        offload: Offload,
        frame: &[u8],
        out: &mut Outputs,
    ) {
        let fits = if offload.is_none() {
            frame.len() <= FRAME_LEN_MAX
        } else {
            offload.check(frame.len()).is_ok()
        };
        if !fits {
            self.stats.local_dropped += 1;
            return;
        }
        let Some(switch) = self.segments.get_mut(&segment) else {
            self.stats.wrong_segment += 1;
            return;
        };
        let decision = switch.from_local(now_ms, frame);
        let targets: &[PeerIndex] = match &decision {
            Decision::Peer(peer) => std::slice::from_ref(peer),
            Decision::Peers(peers) => peers,
            Decision::Local | Decision::Drop(_) => return,
        };
        let lane = self.lanes.classify(now_ms, segment, offload, frame);
        let mut marked = false;
        for index in targets {
            let Some(peer) = self.peers.get_mut(index) else {
                continue;
            };
            let Some(endpoint) = peer.endpoint else {
                self.stats.no_endpoint += 1;
                continue;
            };
            let PeerState {
                tunn,
                encap,
                stats,
                lanes,
                ..
            } = peer;
            // A peer that has not said it reads lanes gets no marks: a
            // gateway without lanes would drop marked messages.
            let lane = if *lanes { lane } else { Lane::Bulk };
            marked |= lane == Lane::Interactive;
            let sent = encap.encapsulate(segment, offload, frame, |packet| {
                out.push_datagram_in(
                    lane,
                    endpoint,
                    (packet.len() + DATA_OVERHEAD).max(HANDSHAKE_LEN_MAX),
                    |dst| {
                        match tunn.encapsulate(packet, dst) {
                            TunnResult::WriteToNetwork(datagram) => count(stats, datagram.len()),
                            // Queued inside boringtun until the handshake completes.
                            TunnResult::Done => 0,
                            TunnResult::Err(e) => {
                                tracing::debug!(peer = index, error = ?e, "encapsulation failed");
                                0
                            }
                            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => 0,
                        }
                    },
                );
            });
            if sent.is_err() {
                self.stats.local_dropped += 1;
            }
        }
        self.stats.interactive_frames += u64::from(marked);
    }

    /// A datagram from the network.
    ///
    /// A datagram of the interactive lane that is more than
    /// [`OVERTAKE_MAX`] messages ahead of the last bulk one handled from its
    /// session is held (see [`crate::lane`]), as are those after it, until
    /// the bulk lane catches up, [`Gateway::bulk_queued`] says it has
    /// nothing left, or [`HELD_MS_MAX`] passes; past [`HELD_MAX`] datagrams
    /// or [`HELD_BYTES_MAX`] bytes held, it is handled at once.
    pub fn handle_datagram(
        &mut self,
        now_ms: i64,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut Outputs,
    ) {
        let interactive = Lanes::is_marked(datagram);
        if interactive && !self.held.is_empty() {
            self.release_held(now_ms, false, out);
        }
        if interactive
            && (!self.held.is_empty() || self.must_hold(now_ms, datagram))
            && self.held.len() < HELD_MAX
            && self.held_bytes.len() + datagram.len() <= HELD_BYTES_MAX
        {
            self.stats.interactive_held += 1;
            self.held.push(Held {
                from,
                at_ms: now_ms,
                start: self.held_bytes.len(),
                len: datagram.len(),
            });
            self.held_bytes.extend_from_slice(datagram);
            return;
        }
        self.handle_one(now_ms, from, datagram, interactive, out);
        if !interactive && !self.held.is_empty() {
            self.release_held(now_ms, false, out);
        }
    }

    /// Tells whether datagrams wait in the bulk lane (the bulk socket), as
    /// the caller last saw it: when none do, the interactive lane overtakes
    /// nothing, what was held goes now and nothing more is held until a
    /// bulk datagram comes again. The caller says so when a read of the
    /// bulk socket finds it empty, and before it hands over interactive
    /// datagrams.
    pub fn bulk_queued(&mut self, queued: bool, now_ms: i64, out: &mut Outputs) {
        self.bulk_queued = queued;
        if !queued && !self.held.is_empty() {
            self.release_held(now_ms, true, out);
        }
    }

    /// Whether an interactive `datagram` is too far ahead of the bulk lane
    /// of its session, while that lane has datagrams waiting and the
    /// session sent bulk within [`BULK_ACTIVE_MS`].
    fn must_hold(&self, now_ms: i64, datagram: &[u8]) -> bool {
        if !self.bulk_queued {
            return false;
        }
        let Some((index, counter)) = Lanes::position(datagram) else {
            return false;
        };
        let Some(peer) = self.peers.get(&peer_of(index)) else {
            return false;
        };
        matches!(peer.bulk_at, Some(at) if at.index == index
            && now_ms - at.at_ms < BULK_ACTIVE_MS
            && counter > at.counter.saturating_add(OVERTAKE_MAX))
    }

    /// Handles the held datagrams, oldest first, as long as they may go
    /// (all of them with `all`).
    fn release_held(&mut self, now_ms: i64, all: bool, out: &mut Outputs) {
        while let Some(held) = self.held.first().copied() {
            let bytes = &self.held_bytes[held.start..held.start + held.len];
            if !(all || now_ms - held.at_ms >= HELD_MS_MAX || !self.must_hold(now_ms, bytes)) {
                break;
            }
            let mut datagram = std::mem::take(&mut self.releasing);
            datagram.clear();
            datagram.extend_from_slice(bytes);
            self.held.remove(0);
            self.handle_one(now_ms, held.from, &datagram, true, out);
            self.releasing = datagram;
        }
        if self.held.is_empty() {
            self.held_bytes.clear();
        }
    }

    fn handle_one(
        &mut self,
        now_ms: i64,
        from: SocketAddr,
        datagram: &[u8],
        interactive: bool,
        out: &mut Outputs,
    ) {
        let datagram: &[u8] = if Lanes::unmark(datagram, &mut self.unmarked) {
            &self.unmarked
        } else {
            datagram
        };
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
            self.stats.dropped(Dropped::Junk);
            return;
        };
        if matches!(
            packet,
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
        ) {
            // Before any DH: the mac1 check, and under load the cookie and
            // then the limit of the address the cookie proved.
            if let Err(e) =
                self.mac1_check
                    .verify_packet(Some(from.ip()), datagram, &mut self.scratch)
            {
                tracing::trace!(%from, error = ?e, "handshake message refused");
                self.stats.dropped(Dropped::BadMac);
                return;
            }
            if self.handshakes.under_load(now_ms) {
                match self
                    .cookie_check
                    .verify_packet(Some(from.ip()), datagram, &mut self.scratch)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        self.stats.dropped(Dropped::CookieReply);
                        let len = cookie.len();
                        out.push_datagram(from, len, |dst| {
                            dst.copy_from_slice(cookie);
                            len
                        });
                        return;
                    }
                    Err(e) => {
                        tracing::trace!(%from, error = ?e, "handshake message refused");
                        self.stats.dropped(Dropped::BadMac);
                        return;
                    }
                }
                if !self.address_limiter.allow(now_ms, from.ip()) {
                    tracing::trace!(%from, "handshake message over its address's limit");
                    self.stats.dropped(Dropped::RateLimited);
                    return;
                }
            }
        }
        let Some(index) = self.identify(&packet) else {
            self.stats.dropped(Dropped::UnknownPeer);
            return;
        };
        let peer = self
            .peers
            .get_mut(&index)
            .expect("identify returns configured peers");
        let mut authenticated = false;
        let mut reply_len = 0;
        let result = peer
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut self.scratch);
        match result {
            TunnResult::WriteToNetwork(reply) => {
                // A handshake response (to an initiation) or a keepalive
                // (after a response) means a session; a cookie reply is
                // what a limiter under load says to anyone, so it proves
                // nothing about the sender.
                authenticated = reply.first() != Some(&MESSAGE_COOKIE_REPLY);
                peer.stats.handshakes += u64::from(authenticated);
                reply_len = reply.len();
                if authenticated {
                    // A new session: whether the peer reads lanes is to be
                    // learnt again (it may have restarted with another
                    // version). The initiator speaks first, once its
                    // keepalive has confirmed the session (below).
                    peer.lanes = false;
                    peer.hello_sent = false;
                }
            }
            TunnResult::WriteToTunnelV4(packet, _) => {
                authenticated = true;
                let delivered = match peer.decap.decapsulate(now_ms, packet) {
                    Ok(Some(inner)) => deliver(
                        &mut self.segments,
                        &mut self.stats,
                        &mut self.lanes,
                        now_ms,
                        index,
                        inner,
                        interactive,
                        out,
                    ),
                    Ok(None) => true,
                    Err(_) => false,
                };
                if !delivered {
                    self.stats.inner_dropped += 1;
                    peer.stats.inner_dropped += 1;
                }
            }
            TunnResult::WriteToTunnelV6(..) => {
                authenticated = true;
                self.stats.inner_dropped += 1;
                peer.stats.inner_dropped += 1;
            }
            TunnResult::Done => {
                authenticated |= matches!(
                    Tunn::parse_incoming_packet(datagram),
                    Ok(Packet::PacketData(_))
                )
            }
            TunnResult::Err(e) => {
                tracing::trace!(peer = index, error = ?e, "datagram refused");
                peer.stats.rx_dropped += 1;
                if is_replay(&e) {
                    peer.stats.rx_replays += 1;
                    self.stats.dropped(Dropped::Replay);
                } else {
                    self.stats.dropped(Dropped::Refused);
                }
            }
        }
        if authenticated {
            peer.stats.rx_datagrams += 1;
            peer.stats.rx_bytes += datagram.len() as u64;
            if let (false, Some((index, counter))) = (interactive, Lanes::position(datagram)) {
                let behind =
                    matches!(peer.bulk_at, Some(at) if at.index == index && at.counter >= counter);
                if !behind {
                    peer.bulk_at = Some(BulkAt {
                        index,
                        counter,
                        at_ms: now_ms,
                    });
                }
                self.bulk_queued = true;
            }
        }
        let initiator = reply_len > 0 && self.scratch[0] == MESSAGE_DATA;
        if authenticated && interactive && Lanes::position(datagram).is_some() {
            // The peer reads lanes (it marked a message). It gets this
            // gateway's hello in return, once a session.
            peer.lanes = true;
        }
        let hello =
            authenticated && !peer.hello_sent && (initiator || (peer.lanes && reply_len == 0));
        if reply_len > 0 {
            let reply = &self.scratch[..reply_len];
            out.push_datagram(from, reply_len, |dst| {
                dst.copy_from_slice(reply);
                count(&mut peer.stats, reply_len)
            });
            // Packets queued while the handshake ran go out now.
            loop {
                let mut more = false;
                out.push_datagram(from, DATAGRAM_LEN_MAX, |dst| {
                    match peer.tunn.decapsulate(None, &[], dst) {
                        TunnResult::WriteToNetwork(queued) => {
                            more = true;
                            count(&mut peer.stats, queued.len())
                        }
                        _ => 0,
                    }
                });
                if !more {
                    break;
                }
            }
        }
        if hello {
            // A keepalive with the lane mark: a gateway without lanes drops
            // it (one lost keepalive), one with lanes starts marking.
            peer.hello_sent = true;
            out.push_datagram_in(Lane::Interactive, from, DATA_OVERHEAD, |dst| {
                match peer.tunn.encapsulate(&[], dst) {
                    TunnResult::WriteToNetwork(keepalive)
                        if keepalive.first() == Some(&MESSAGE_DATA) =>
                    {
                        count(&mut peer.stats, keepalive.len())
                    }
                    _ => 0,
                }
            });
        }
        if authenticated {
            // Roaming: the peer is wherever its authenticated packets come from.
            peer.endpoint = Some(from);
        }
    }

    /// Timers of the tunnels (handshakes, keepalives, rekeys), reassembly,
    /// MAC aging and the table of the address limiter. Call every
    /// [`TIMER_TICK_MS`].
    pub fn handle_timers(&mut self, now_ms: i64, out: &mut Outputs) {
        self.address_limiter.expire(now_ms);
        self.release_held(now_ms, false, out);
        for (index, peer) in &mut self.peers {
            peer.decap.expire(now_ms);
            let Some(to) = peer.endpoint else {
                // Timers still run: a handshake without an endpoint is
                // dropped, as before.
                let _ = peer.tunn.update_timers(&mut self.scratch);
                continue;
            };
            out.push_datagram(to, HANDSHAKE_LEN_MAX, |dst| {
                match peer.tunn.update_timers(dst) {
                    TunnResult::WriteToNetwork(datagram) => count(&mut peer.stats, datagram.len()),
                    TunnResult::Err(e) => {
                        tracing::trace!(peer = index, error = ?e, "tunnel timer");
                        0
                    }
                    _ => 0,
                }
            });
        }
        for segment in self.segments.values_mut() {
            segment.expire(now_ms);
        }
    }

    /// Starts a handshake with every peer that has an endpoint and no
    /// handshake under way. A gateway that (re)starts calls this once: the
    /// peers still hold sessions with its previous incarnation and would
    /// otherwise send into them until their own rekey timers fire, 15 s or
    /// more later. A fresh initiation replaces those sessions at once.
    pub fn initiate_handshakes(&mut self, out: &mut Outputs) {
        let indices: Vec<PeerIndex> = self.peers.keys().copied().collect();
        for index in indices {
            self.initiate_handshake(index, out);
        }
    }

    /// Starts a handshake with one peer, if it has an endpoint and no
    /// handshake is under way (a peer just added, so that its tunnel is up
    /// before the first frame needs it).
    pub fn initiate_handshake(&mut self, index: PeerIndex, out: &mut Outputs) {
        let Some(peer) = self.peers.get_mut(&index) else {
            return;
        };
        let Some(to) = peer.endpoint else {
            return;
        };
        out.push_datagram(to, HANDSHAKE_LEN_MAX, |dst| {
            match peer.tunn.format_handshake_initiation(dst, false) {
                TunnResult::WriteToNetwork(datagram) => count(&mut peer.stats, datagram.len()),
                TunnResult::Err(e) => {
                    tracing::debug!(peer = index, error = ?e, "handshake");
                    0
                }
                _ => 0,
            }
        });
    }

    /// Which configured peer a message belongs to, by receiver index or
    /// (handshake initiation) by the initiator's static key, which costs a
    /// DH: only initiations that passed the `mac1` check and, under load,
    /// the cookie check and their address's limit come here.
    fn identify(&self, packet: &Packet<'_>) -> Option<PeerIndex> {
        let index = match packet {
            Packet::HandshakeInit(init) => {
                let half = parse_handshake_anon(&self.private, &self.public, init).ok()?;
                return self
                    .peers
                    .iter()
                    .find(|(_, p)| p.public_key == half.peer_static_public)
                    .map(|(i, _)| *i);
            }
            Packet::HandshakeResponse(response) => response.receiver_idx,
            Packet::PacketCookieReply(cookie) => cookie.receiver_idx,
            Packet::PacketData(data) => data.receiver_idx,
        };
        let peer = peer_of(index);
        self.peers.contains_key(&peer).then_some(peer)
    }
}

/// Handshake messages with a valid `mac1`, counted in windows of
/// [`HANDSHAKE_WINDOW_MS`] on the caller's clock.
#[derive(Debug, Default)]
struct HandshakeWindow {
    /// When the current window began: at its first message.
    started_ms: Option<i64>,
    /// Messages counted in it.
    count: u64,
}

impl HandshakeWindow {
    /// Counts a message at `now_ms`; whether the gateway is under load for
    /// it: the window held [`HANDSHAKES_PER_S_MAX`] already. A clock that
    /// runs back stays in the window.
    fn under_load(&mut self, now_ms: i64) -> bool {
        let in_window = self
            .started_ms
            .is_some_and(|started_ms| now_ms.saturating_sub(started_ms) < HANDSHAKE_WINDOW_MS);
        if !in_window {
            self.started_ms = Some(now_ms);
            self.count = 0;
        }
        let under_load = self.count >= HANDSHAKES_PER_S_MAX;
        self.count = self.count.saturating_add(1);
        under_load
    }
}

/// The kinds of datagrams the gateway drops, as [`GatewayStats`] counts
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    Junk,
    BadMac,
    CookieReply,
    RateLimited,
    UnknownPeer,
    Replay,
    Refused,
}

impl GatewayStats {
    fn dropped(&mut self, kind: Dropped) {
        self.datagrams_dropped += 1;
        let counter = match kind {
            Dropped::Junk => &mut self.junk,
            Dropped::BadMac => &mut self.bad_mac,
            Dropped::CookieReply => &mut self.cookie_replies,
            Dropped::RateLimited => &mut self.rate_limited,
            Dropped::UnknownPeer => &mut self.unknown_peer,
            Dropped::Replay => &mut self.replays,
            Dropped::Refused => &mut self.refused,
        };
        *counter += 1;
    }
}

/// Whether a session refused a message because it had seen it (or one
/// like it) before: a data packet its replay window has, or one older than
/// the window reaches back (boringtun cannot tell that from a replay), or
/// an initiation whose timestamp is not newer than the last one's.
fn is_replay(e: &WireGuardError) -> bool {
    matches!(
        e,
        WireGuardError::DuplicateCounter
            | WireGuardError::InvalidCounter
            | WireGuardError::WrongTai64nTimestamp
    )
}

/// Hands a decapsulated frame to its segment's switch; false if the frame
/// is not one the overlay carries (the caller counts it).
#[allow(clippy::too_many_arguments)]
fn deliver(
    segments: &mut BTreeMap<u32, Segment>,
    stats: &mut GatewayStats,
    lanes: &mut Lanes,
    now_ms: i64,
    peer: PeerIndex,
    inner: Inner<'_>,
    interactive: bool,
    out: &mut Outputs,
) -> bool {
    if inner.offload.is_none() && inner.frame.len() > FRAME_LEN_MAX {
        return false;
    }
    let Some(switch) = segments.get_mut(&inner.segment) else {
        stats.wrong_segment += 1;
        return true;
    };
    match switch.from_peer(now_ms, peer, inner.frame) {
        Decision::Local => {
            lanes.count_delivered(now_ms, inner.segment, inner.frame);
            out.push_local(inner.segment, inner.offload, inner.frame, interactive);
        }
        Decision::Drop(crate::switch::DropReason::UnknownPeer) => stats.wrong_segment += 1,
        _ => {}
    }
    true
}

/// The peer a WireGuard receiver index belongs to: the gateway gives each
/// peer's `Tunn` its index, and boringtun adds a session number in the low
/// 8 bits.
fn peer_of(receiver_index: u32) -> PeerIndex {
    receiver_index >> 8
}

/// Counts a datagram of `len` bytes (none when 0) sent to a peer; returns
/// `len`.
fn count(stats: &mut PeerStats, len: usize) -> usize {
    if len > 0 {
        stats.tx_datagrams += 1;
        stats.tx_bytes += len as u64;
    }
    len
}

/// Inner addresses never leave the tunnel; they only need to be valid.
fn encapsulator(inner_mtu: usize) -> Encapsulator {
    Encapsulator::new(
        Ipv4Addr::new(169, 254, 0, 1),
        Ipv4Addr::new(169, 254, 0, 2),
        inner_mtu,
    )
}

mod address_limit;
#[cfg(test)]
mod tests;
