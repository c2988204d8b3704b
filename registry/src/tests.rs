//! The registry core on a simulated network with a virtual clock: no
//! sockets, no sleeps. Gossip is modelled as flooding along connections
//! (a message is forwarded only when its receiver accepts it), requests and
//! answers travel the same links, and each delivery may be lost.

#![allow(clippy::cast_possible_truncation)] // small simulated indices

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use libp2p_identity::{Keypair, PeerId};

use crate::advert::{Advert, CapacitySummary, NodeShape, SignedAdvert};
use crate::core::{
    LocalAdvert, Registry, RegistryConfig, RegistryEvent, SiteState, Transmit, Verdict, Warming,
};
use crate::wire::{self, Message};

const SHAPE: NodeShape = NodeShape {
    cores: 2,
    memory_mib: 4096,
    disk_gib: 20,
};
/// One-way latency of every simulated link.
const LATENCY_MS: i64 = 5;

fn config() -> RegistryConfig {
    RegistryConfig {
        advert_ttl_ms: 10_000,
        refresh_ms: 3_000,
        anti_entropy_ms: 1_000,
        suspect_ms: 5_000,
        forget_ms: 60_000,
        clock_skew_max_ms: 2_000,
        ..RegistryConfig::default()
    }
}

/// Eight node slots, `free` of them free from now on.
fn capacity(free: u32) -> CapacitySummary {
    CapacitySummary {
        total_nodes: 8,
        node: SHAPE,
        steps: vec![(0, free)],
        horizon_end_ms: i64::MAX,
    }
}

fn local(name: &str, free: u32) -> LocalAdvert {
    LocalAdvert {
        site_name: name.to_owned(),
        capacity: capacity(free),
        gateway: None,
        addrs: vec![format!("/ip4/127.0.0.1/tcp/{}", 7000 + free)],
        software: "test".to_owned(),
    }
}

/// What travels between simulated nodes.
#[derive(Debug)]
enum Delivery {
    Gossip { data: Vec<u8> },
    Request { from: usize, data: Vec<u8> },
    Response { from: usize, data: Vec<u8> },
}

struct Node {
    keypair: Keypair,
    registry: Registry,
    up: bool,
    persisted_version: u64,
    seen_gossip: BTreeSet<Vec<u8>>,
}

/// A simulated federation.
struct Net {
    nodes: Vec<Node>,
    links: BTreeSet<(usize, usize)>,
    queue: BTreeMap<(i64, u64), (usize, Delivery)>,
    seq: u64,
    now_ms: i64,
    rng: u64,
    loss_percent: u64,
    delivered_bytes: u64,
}

impl Net {
    fn new(size: usize, seed: u64) -> Net {
        let nodes = (0..size)
            .map(|i| {
                let keypair = Keypair::generate_ed25519();
                let registry = Registry::new(config(), keypair.clone(), 0, seed ^ i as u64, 0);
                Node {
                    keypair,
                    registry,
                    up: true,
                    persisted_version: 0,
                    seen_gossip: BTreeSet::new(),
                }
            })
            .collect();
        Net {
            nodes,
            links: BTreeSet::new(),
            queue: BTreeMap::new(),
            seq: 0,
            now_ms: 0,
            rng: seed,
            loss_percent: 0,
            delivered_bytes: 0,
        }
    }

    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A ring plus `extra` random chords per node: connected, sparse.
    fn connect_sparse(&mut self, extra: usize) {
        let n = self.nodes.len();
        for i in 0..n {
            self.link(i, (i + 1) % n);
            for _ in 0..extra {
                let j = (self.random() % n as u64) as usize;
                if j != i {
                    self.link(i, j);
                }
            }
        }
    }

    fn link(&mut self, a: usize, b: usize) {
        self.links.insert((a.min(b), a.max(b)));
        let (pa, pb) = (self.id(a), self.id(b));
        self.nodes[a].registry.peer_connected(pb);
        self.nodes[b].registry.peer_connected(pa);
        self.nodes[a]
            .registry
            .peer_rtt(pb, Duration::from_millis(2 * LATENCY_MS as u64 + b as u64));
        self.nodes[b]
            .registry
            .peer_rtt(pa, Duration::from_millis(2 * LATENCY_MS as u64 + a as u64));
    }

    fn neighbours(&self, a: usize) -> Vec<usize> {
        self.links
            .iter()
            .filter_map(|&(x, y)| {
                if x == a {
                    Some(y)
                } else if y == a {
                    Some(x)
                } else {
                    None
                }
            })
            .collect()
    }

    fn id(&self, index: usize) -> PeerId {
        self.nodes[index].keypair.public().to_peer_id()
    }

    fn index_of(&self, peer: &PeerId) -> usize {
        self.nodes
            .iter()
            .position(|n| n.keypair.public().to_peer_id() == *peer)
            .expect("a known peer")
    }

    fn send(&mut self, to: usize, delivery: Delivery) {
        if self.loss_percent > 0 && self.random() % 100 < self.loss_percent {
            return;
        }
        self.seq += 1;
        self.queue
            .insert((self.now_ms + LATENCY_MS, self.seq), (to, delivery));
    }

    /// Drains one node's outputs into the network, as the contract says.
    fn drain(&mut self, index: usize) {
        while let Some(event) = self.nodes[index].registry.poll_event() {
            if let RegistryEvent::PersistVersion(version) = event {
                self.nodes[index].persisted_version = version;
            }
        }
        while let Some(transmit) = self.nodes[index].registry.poll_transmit() {
            match transmit {
                Transmit::Publish { data } => {
                    self.nodes[index].seen_gossip.insert(data.clone());
                    for peer in self.neighbours(index) {
                        self.send(peer, Delivery::Gossip { data: data.clone() });
                    }
                }
                Transmit::Request { to, data } => {
                    let to = self.index_of(&to);
                    if self.links.contains(&(index.min(to), index.max(to))) {
                        self.send(to, Delivery::Request { from: index, data });
                    }
                }
            }
        }
    }

    fn deliver(&mut self, to: usize, delivery: Delivery) {
        if !self.nodes[to].up {
            return;
        }
        let now = self.now_ms;
        match delivery {
            Delivery::Gossip { data } => {
                self.delivered_bytes += data.len() as u64;
                if !self.nodes[to].seen_gossip.insert(data.clone()) {
                    return;
                }
                if self.nodes[to].registry.handle_gossip(now, &data) == Verdict::Accept {
                    for peer in self.neighbours(to) {
                        self.send(peer, Delivery::Gossip { data: data.clone() });
                    }
                }
            }
            Delivery::Request { from, data } => {
                self.delivered_bytes += data.len() as u64;
                let from_id = self.id(from);
                if let Some(answer) = self.nodes[to].registry.handle_request(now, from_id, &data) {
                    self.send(
                        from,
                        Delivery::Response {
                            from: to,
                            data: answer,
                        },
                    );
                }
            }
            Delivery::Response { from, data } => {
                self.delivered_bytes += data.len() as u64;
                let from_id = self.id(from);
                self.nodes[to].registry.handle_response(now, from_id, &data);
            }
        }
        self.drain(to);
    }

    /// Runs the network until `until_ms` (virtual), or until `done` holds.
    fn run_until(&mut self, until_ms: i64, mut done: impl FnMut(&Net) -> bool) -> Option<i64> {
        for index in 0..self.nodes.len() {
            self.drain(index);
        }
        loop {
            if done(self) {
                return Some(self.now_ms);
            }
            let next_delivery = self.queue.keys().next().map(|(at, _)| *at);
            let next_timer = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].up)
                .filter_map(|i| self.nodes[i].registry.poll_timeout())
                .min();
            let next = match (next_delivery, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => return None,
            };
            if next > until_ms {
                self.now_ms = until_ms;
                return done(self).then_some(until_ms);
            }
            self.now_ms = self.now_ms.max(next);
            while let Some((&key, _)) = self.queue.first_key_value() {
                if key.0 > self.now_ms {
                    break;
                }
                let (to, delivery) = self.queue.remove(&key).expect("the key was just read");
                self.deliver(to, delivery);
            }
            for index in 0..self.nodes.len() {
                if self.nodes[index].up
                    && self.nodes[index]
                        .registry
                        .poll_timeout()
                        .is_some_and(|at| at <= self.now_ms)
                {
                    let now = self.now_ms;
                    self.nodes[index].registry.handle_timeout(now);
                    self.drain(index);
                }
            }
        }
    }

    fn everyone_sees_everyone(&self) -> bool {
        let n = self.nodes.len();
        self.nodes.iter().filter(|node| node.up).all(|node| {
            let view = node.registry.sites(self.now_ms);
            view.iter().filter(|s| s.state == SiteState::Alive).count() == n
        })
    }

    fn state_of(&self, observer: usize, site: usize) -> Option<SiteState> {
        self.nodes[observer].registry.site_state(&self.id(site))
    }
}

fn start_all(net: &mut Net, free: u32) {
    for i in 0..net.nodes.len() {
        net.nodes[i]
            .registry
            .set_local(0, local(&format!("site-{i:02}"), free));
    }
}

#[test]
fn fifty_sites_converge_on_a_sparse_network() {
    for seed in 0..5 {
        let mut net = Net::new(50, seed);
        net.connect_sparse(2);
        start_all(&mut net, 4);
        let converged = net.run_until(20_000, Net::everyone_sees_everyone);
        let at =
            converged.unwrap_or_else(|| panic!("seed {seed}: no full view after 20 s virtual"));
        assert!(at <= 2_000, "seed {seed}: full view took {at} ms");
    }
}

#[test]
fn anti_entropy_converges_when_pushes_are_lost() {
    for seed in 0..5 {
        let mut net = Net::new(50, seed);
        net.connect_sparse(2);
        net.loss_percent = 40;
        start_all(&mut net, 4);
        let converged = net.run_until(60_000, Net::everyone_sees_everyone);
        assert!(
            converged.is_some(),
            "seed {seed}: no full view with 40% loss after 60 s virtual"
        );
    }
}

#[test]
fn a_capacity_change_reaches_everyone() {
    let mut net = Net::new(20, 7);
    net.connect_sparse(1);
    start_all(&mut net, 4);
    net.run_until(10_000, Net::everyone_sees_everyone)
        .expect("converges");
    let changed_at = net.now_ms;
    net.nodes[4]
        .registry
        .set_local(changed_at, local("site-04", 1));
    let site = net.id(4);
    let seen = net.run_until(changed_at + 10_000, |net| {
        net.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 4)
            .all(|(_, node)| {
                node.registry
                    .sites(net.now_ms)
                    .iter()
                    .any(|s| s.site == site && s.free_now == 1)
            })
    });
    let at = seen.expect("the change reaches every site");
    assert!(at - changed_at <= 1_000, "took {} ms", at - changed_at);
}

#[test]
fn a_silent_site_becomes_suspect_then_gone_then_comes_back() {
    let mut net = Net::new(5, 3);
    net.connect_sparse(1);
    start_all(&mut net, 4);
    net.run_until(10_000, Net::everyone_sees_everyone)
        .expect("converges");
    let killed_at = net.now_ms;
    net.nodes[2].up = false;
    let ttl = i64::from(config().advert_ttl_ms);
    let suspect = net.run_until(killed_at + 60_000, |net| {
        net.state_of(0, 2) == Some(SiteState::Suspect)
    });
    assert!(
        suspect.expect("becomes suspect") <= killed_at + ttl + LATENCY_MS,
        "suspect within the TTL"
    );
    let gone = net.run_until(killed_at + 60_000, |net| {
        (0..5)
            .filter(|&i| i != 2)
            .all(|i| net.state_of(i, 2) == Some(SiteState::Gone))
    });
    let gone_at = gone.expect("becomes gone everywhere");
    assert!(
        gone_at <= killed_at + ttl + config().suspect_ms + config().anti_entropy_ms,
        "gone at {gone_at}"
    );
    let shape = SHAPE;
    assert!(
        net.nodes[0]
            .registry
            .candidates(0, 1, &shape)
            .iter()
            .all(|c| c.site != net.id(2))
    );

    // Restart with the persisted version: a fresh registry, same key.
    let persisted = net.nodes[2].persisted_version;
    let keypair = net.nodes[2].keypair.clone();
    let now = net.now_ms;
    net.nodes[2].registry = Registry::new(config(), keypair, persisted, 99, now);
    net.nodes[2].up = true;
    for peer in net.neighbours(2) {
        let id = net.id(peer);
        net.nodes[2].registry.peer_connected(id);
    }
    net.nodes[2].registry.set_local(now, local("site-02", 3));
    let back = net.run_until(now + 10_000, |net| {
        (0..5).all(|i| i == 2 || net.state_of(i, 2) == Some(SiteState::Alive))
    });
    back.expect("comes back alive everywhere");
    let view = net.nodes[0].registry.sites(net.now_ms);
    let site2 = view
        .iter()
        .find(|s| s.site == net.id(2))
        .expect("in the view");
    assert!(
        site2.advert.version > persisted,
        "the restarted site advertises a higher version"
    );
    assert_eq!(site2.free_now, 3);
}

#[test]
fn forged_stale_expired_and_garbage_adverts_are_dropped_and_counted() {
    let victim = Keypair::generate_ed25519();
    let attacker = Keypair::generate_ed25519();
    let mut registry = Registry::new(config(), Keypair::generate_ed25519(), 0, 1, 0);
    let advert = |keypair: &Keypair, version: u64, issued_at_ms: i64| Advert {
        site: keypair.public().to_peer_id(),
        site_name: "victim".into(),
        version,
        issued_at_ms,
        ttl_ms: 10_000,
        capacity: CapacitySummary {
            total_nodes: 8,
            node: SHAPE,
            steps: vec![(0, 8)],
            horizon_end_ms: 100_000,
        },
        gateway: None,
        addrs: vec![],
        software: "test".into(),
    };
    let push = |signed: SignedAdvert| wire::encode(&Message::Advert(signed));

    let genuine = SignedAdvert::sign(&advert(&victim, 5, 1_000), &victim).unwrap();
    assert_eq!(
        registry.handle_gossip(1_000, &push(genuine.clone())),
        Verdict::Accept
    );
    assert_eq!(
        registry.handle_gossip(1_001, &push(genuine.clone())),
        Verdict::Ignore
    );

    // Forged: the attacker signs an advert claiming to be the victim, or
    // swaps its key into the victim's advert.
    let mut forged = SignedAdvert::sign(&advert(&attacker, 9, 1_000), &attacker).unwrap();
    forged.public_key = victim.public().encode_protobuf();
    assert_eq!(
        registry.handle_gossip(1_002, &push(forged)),
        Verdict::Reject
    );
    let mut tampered = genuine.clone();
    tampered.body[3] ^= 0x40;
    assert_eq!(
        registry.handle_gossip(1_003, &push(tampered)),
        Verdict::Reject
    );

    let stale = SignedAdvert::sign(&advert(&victim, 4, 1_500), &victim).unwrap();
    assert_eq!(registry.handle_gossip(1_004, &push(stale)), Verdict::Ignore);
    let expired = SignedAdvert::sign(&advert(&attacker, 1, -20_000), &attacker).unwrap();
    assert_eq!(
        registry.handle_gossip(1_005, &push(expired)),
        Verdict::Ignore
    );
    assert_eq!(
        registry.handle_gossip(1_006, b"\x01garbage"),
        Verdict::Reject
    );
    assert_eq!(
        registry.handle_gossip(1_007, &vec![0u8; config().message_max_bytes + 1]),
        Verdict::Reject
    );

    let stats = registry.stats();
    assert_eq!(stats.adverts_applied, 1);
    assert_eq!(stats.adverts_duplicate, 1);
    assert_eq!(stats.dropped_forged, 2);
    assert_eq!(stats.dropped_stale, 1);
    assert_eq!(stats.dropped_expired, 1);
    assert_eq!(stats.dropped_undecodable, 1);
    assert_eq!(stats.dropped_oversized, 1);
    let view = registry.sites(1_010);
    assert_eq!(view.len(), 1, "only the genuine advert is in the view");
    assert_eq!(view[0].advert.version, 5);
}

#[test]
fn versions_are_persisted_before_they_are_sent() {
    let mut registry = Registry::new(config(), Keypair::generate_ed25519(), 41, 1, 0);
    registry.set_local(0, local("a", 1));
    assert_eq!(
        registry.poll_event(),
        Some(RegistryEvent::PersistVersion(42))
    );
    assert!(matches!(
        registry.poll_transmit(),
        Some(Transmit::Publish { .. })
    ));
    // Unchanged: nothing new.
    registry.set_local(1, local("a", 1));
    assert_eq!(registry.poll_event(), None);
    assert_eq!(registry.poll_transmit(), None);
    // Refresh re-signs with a higher version.
    registry.handle_timeout(config().refresh_ms);
    assert_eq!(
        registry.poll_event(),
        Some(RegistryEvent::PersistVersion(43))
    );
}

#[test]
fn candidates_rank_by_free_then_rtt_and_skip_the_unfit() {
    let mut net = Net::new(5, 11);
    for i in 1..5 {
        net.link(0, i);
    }
    for (i, free) in [(1, 2), (2, 6), (3, 6), (4, 0)] {
        net.nodes[i]
            .registry
            .set_local(0, local(&format!("site-{i}"), free));
    }
    net.nodes[0].registry.set_local(0, local("site-0", 1));
    net.run_until(1_000, |net| {
        net.nodes[0].registry.sites(net.now_ms).len() == 5
    })
    .expect("view");
    let ranked = net.nodes[0].registry.candidates(0, 1_000, &SHAPE);
    let names: Vec<&str> = ranked.iter().map(|c| c.name.as_str()).collect();
    // 6 free at sites 2 and 3 (site 2 has the lower RTT), then 2; 0 free is skipped.
    assert_eq!(names, ["site-2", "site-3", "site-1"]);
    let big = NodeShape { cores: 64, ..SHAPE };
    assert!(net.nodes[0].registry.candidates(0, 1_000, &big).is_empty());
}

#[test]
fn anti_entropy_in_steady_state_costs_little() {
    let mut net = Net::new(50, 5);
    net.connect_sparse(2);
    // No refresh inside the measured minute: what is left is anti-entropy.
    for node in &mut net.nodes {
        let keypair = node.keypair.clone();
        let config = RegistryConfig {
            refresh_ms: 1_000_000,
            advert_ttl_ms: 1_000_000,
            ..config()
        };
        node.registry = Registry::new(config, keypair, 0, 5, 0);
    }
    let links: Vec<(usize, usize)> = net.links.iter().copied().collect();
    for (a, b) in links {
        net.link(a, b);
    }
    start_all(&mut net, 4);
    net.run_until(10_000, Net::everyone_sees_everyone)
        .expect("converges");
    let bytes_before = net.delivered_bytes;
    let from = net.now_ms;
    net.run_until(from + 60_000, |_| false);
    let per_site_per_s = (net.delivered_bytes - bytes_before) as f64 / 50.0 / 60.0;
    // One digest hash and its answer per site per second, once in sync.
    assert!(
        per_site_per_s < 100.0,
        "{per_site_per_s} bytes per site per second"
    );
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Arbitrary bytes on every network entry point of the core never
        /// panic and never put anything into the view.
        #[test]
        fn arbitrary_input_is_dropped(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let keypair = Keypair::generate_ed25519();
            let peer = Keypair::generate_ed25519().public().to_peer_id();
            let mut registry = Registry::new(config(), keypair, 0, 1, 0);
            let verdict = registry.handle_gossip(0, &bytes);
            prop_assert_ne!(verdict, Verdict::Accept);
            let _ = registry.handle_request(0, peer, &bytes);
            registry.handle_response(0, peer, &bytes);
            prop_assert!(registry.sites(0).is_empty());
        }

        /// Well-formed envelopes around arbitrary advert parts are refused.
        #[test]
        fn arbitrary_signed_adverts_are_refused(
            public_key in prop::collection::vec(any::<u8>(), 0..64),
            body in prop::collection::vec(any::<u8>(), 0..512),
            signature in prop::collection::vec(any::<u8>(), 0..96),
        ) {
            let signed = SignedAdvert { public_key, body, signature };
            prop_assert!(signed.verify().is_err());
            let mut registry = Registry::new(config(), Keypair::generate_ed25519(), 0, 1, 0);
            let data = wire::encode(&Message::Advert(signed.clone()));
            prop_assert_eq!(registry.handle_gossip(0, &data), Verdict::Reject);
            let peer = Keypair::generate_ed25519().public().to_peer_id();
            let data = wire::encode(&Message::Adverts(vec![signed]));
            prop_assert!(registry.handle_request(0, peer, &data).is_some());
            prop_assert!(registry.sites(0).is_empty());
        }

        /// Properly signed adverts with arbitrary bodies reach the body
        /// decoder and the bounds checks, and are refused without panicking.
        #[test]
        fn signed_garbage_bodies_are_refused(body in prop::collection::vec(any::<u8>(), 0..1024)) {
            let keypair = Keypair::generate_ed25519();
            let mut domain = b"vcfed/advert/1\0".to_vec();
            domain.extend_from_slice(&body);
            let signed = SignedAdvert {
                public_key: keypair.public().encode_protobuf(),
                signature: keypair.sign(&domain).unwrap(),
                body,
            };
            let mut registry = Registry::new(config(), Keypair::generate_ed25519(), 0, 1, 0);
            let verdict = registry.handle_gossip(0, &wire::encode(&Message::Advert(signed)));
            prop_assert_ne!(verdict, Verdict::Accept);
            prop_assert!(registry.sites(0).is_empty());
        }
    }
}

#[test]
fn extreme_times_and_long_ttls_do_not_break_the_view() {
    let site = Keypair::generate_ed25519();
    let mut registry = Registry::new(config(), Keypair::generate_ed25519(), 0, 1, 1_000_000);
    let mut advert = Advert {
        site: site.public().to_peer_id(),
        site_name: "far".into(),
        version: 1,
        issued_at_ms: i64::MAX - 10,
        ttl_ms: u32::MAX,
        capacity: CapacitySummary {
            total_nodes: 1,
            node: SHAPE,
            steps: vec![(0, 1)],
            horizon_end_ms: i64::MAX,
        },
        gateway: None,
        addrs: vec![],
        software: "test".into(),
    };
    let push = |advert: &Advert| {
        wire::encode(&Message::Advert(SignedAdvert::sign(advert, &site).unwrap()))
    };
    // From the far future: dropped, no overflow.
    assert_eq!(
        registry.handle_gossip(1_000_000, &push(&advert)),
        Verdict::Ignore
    );
    // A TTL far longer than ours is honoured up to ten times ours, not dropped.
    advert.issued_at_ms = 1_000_000;
    advert.version = 2;
    advert.ttl_ms = 3_600_000;
    assert_eq!(
        registry.handle_gossip(1_000_000, &push(&advert)),
        Verdict::Accept
    );
    let ten_ttls = 10 * i64::from(config().advert_ttl_ms);
    registry.handle_timeout(1_000_000 + ten_ttls - 1);
    assert_eq!(registry.site_state(&advert.site), Some(SiteState::Alive));
    registry.handle_timeout(1_000_000 + ten_ttls + 1);
    assert_eq!(registry.site_state(&advert.site), Some(SiteState::Suspect));
}

#[test]
fn a_clock_stepped_back_does_not_silence_the_site() {
    let mut registry = Registry::new(config(), Keypair::generate_ed25519(), 0, 1, 10_000_000);
    registry.set_local(10_000_000, local("a", 1));
    while registry.poll_transmit().is_some() {}
    // The wall clock jumps back an hour: the refresh is due again at once.
    let back = 10_000_000 - 3_600_000;
    registry.handle_timeout(back);
    assert!(
        registry
            .poll_timeout()
            .is_some_and(|at| at <= back + config().refresh_ms)
    );
    let mut published = false;
    while let Some(transmit) = registry.poll_transmit() {
        published |= matches!(transmit, Transmit::Publish { .. });
    }
    assert!(
        published,
        "the advert is refreshed after the clock stepped back"
    );
}

/// An advert of `keypair`'s site with `free` nodes, signed and encoded as
/// gossip.
fn advert_gossip(keypair: &Keypair, version: u64, free: u32) -> Vec<u8> {
    let advert = Advert {
        site: keypair.public().to_peer_id(),
        site_name: format!("site-{free}"),
        version,
        issued_at_ms: 0,
        ttl_ms: 10_000,
        capacity: capacity(free),
        gateway: None,
        addrs: vec![],
        software: "test".into(),
    };
    wire::encode(&Message::Advert(
        SignedAdvert::sign(&advert, keypair).unwrap(),
    ))
}

/// The one anti-entropy request `registry` sends at its next round.
fn digest_request(registry: &mut Registry, now_ms: i64) -> Vec<u8> {
    while registry.poll_transmit().is_some() {}
    let at = registry.poll_timeout().unwrap().max(now_ms);
    registry.handle_timeout(at);
    let mut requests = Vec::new();
    while let Some(transmit) = registry.poll_transmit() {
        if let Transmit::Request { data, .. } = transmit {
            requests.push(data);
        }
    }
    assert_eq!(requests.len(), 1, "one digest per round");
    requests.pop().unwrap()
}

#[test]
fn a_large_view_resends_only_the_buckets_that_differ() {
    let sites: Vec<Keypair> = (0..300).map(|_| Keypair::generate_ed25519()).collect();
    let (a_key, b_key) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let (a_id, b_id) = (a_key.public().to_peer_id(), b_key.public().to_peer_id());
    let mut a = Registry::new(config(), a_key, 0, 1, 0);
    let mut b = Registry::new(config(), b_key, 0, 2, 0);
    a.peer_connected(b_id);
    b.peer_connected(a_id);
    for site in &sites {
        let gossip = advert_gossip(site, 1, 4);
        assert_eq!(a.handle_gossip(0, &gossip), Verdict::Accept);
        assert_eq!(b.handle_gossip(0, &gossip), Verdict::Accept);
    }
    // In sync: the answer says so, whatever the split.
    let request = digest_request(&mut a, 0);
    let Ok(Message::DigestBuckets { count, hashes }) = wire::decode(&request, 1 << 20) else {
        panic!("a bucketed digest");
    };
    assert_eq!((count, hashes.len()), (300, 32));
    let answer = b.handle_request(10, a_id, &request).unwrap();
    assert_eq!(wire::decode(&answer, 1 << 20), Ok(Message::InSync));

    // B learns one change that A missed: B's answer lists one bucket.
    let changed = &sites[123];
    b.handle_gossip(20, &advert_gossip(changed, 2, 1));
    let request = digest_request(&mut a, 20);
    let answer = b.handle_request(30, a_id, &request).unwrap();
    let Ok(Message::DigestPart {
        buckets,
        differing,
        entries,
    }) = wire::decode(&answer, 1 << 20)
    else {
        panic!("a digest part");
    };
    assert_eq!((buckets, differing.len()), (32, 1));
    assert!(
        entries.len() < 60
            && entries
                .iter()
                .any(|e| e.site == changed.public().to_peer_id()),
        "{} entries",
        entries.len()
    );
    // A pulls the change (and pushes nothing: B lacks nothing there).
    a.handle_response(40, b_id, &answer);
    let mut pulls = Vec::new();
    while let Some(transmit) = a.poll_transmit() {
        if let Transmit::Request { data, .. } = transmit {
            pulls.push(wire::decode(&data, 1 << 20).unwrap());
        }
    }
    assert_eq!(pulls, [Message::Pull(vec![changed.public().to_peer_id()])]);
    let adverts = b
        .handle_request(50, a_id, &wire::encode(&pulls[0]))
        .unwrap();
    a.handle_response(60, b_id, &adverts);
    let free = |registry: &Registry| {
        registry
            .sites(60)
            .iter()
            .find(|view| view.site == changed.public().to_peer_id())
            .map(|view| view.free_now)
    };
    assert_eq!(free(&a), Some(1));
    // And the digests agree again.
    let request = digest_request(&mut a, 60);
    let answer = b.handle_request(70, a_id, &request).unwrap();
    assert_eq!(wire::decode(&answer, 1 << 20), Ok(Message::InSync));
}

#[test]
fn digests_of_bad_buckets_are_dropped_and_counted() {
    let peer = Keypair::generate_ed25519().public().to_peer_id();
    let mut registry = Registry::new(config(), Keypair::generate_ed25519(), 0, 1, 0);
    registry.peer_connected(peer);
    for hashes in [vec![], vec![1, 2, 3], vec![0; 128]] {
        let request = wire::encode(&Message::DigestBuckets { count: 3, hashes });
        assert_eq!(registry.handle_request(0, peer, &request), None);
    }
    for (buckets, differing) in [(3, vec![0]), (4, vec![4]), (128, vec![0])] {
        let answer = wire::encode(&Message::DigestPart {
            buckets,
            differing,
            entries: vec![],
        });
        registry.handle_response(0, peer, &answer);
    }
    assert_eq!(registry.stats().dropped_undecodable, 6);
    assert!(registry.poll_transmit().is_none());
}

#[test]
fn the_first_builds_digest_exchange_is_still_answered() {
    let site = Keypair::generate_ed25519();
    let peer = Keypair::generate_ed25519().public().to_peer_id();
    let mut registry = Registry::new(config(), Keypair::generate_ed25519(), 0, 1, 0);
    registry.handle_gossip(0, &advert_gossip(&site, 1, 4));
    let request = wire::encode(&Message::DigestHash { hash: 0, count: 0 });
    let answer = registry.handle_request(0, peer, &request).unwrap();
    let Ok(Message::Digest(entries)) = wire::decode(&answer, 1 << 20) else {
        panic!("a full digest");
    };
    assert_eq!(entries.len(), 1);
    // Its hash, as this build sends it (one bucket for a small view), is
    // in sync.
    registry.peer_connected(peer);
    let data = digest_request(&mut registry, 0);
    let Ok(Message::DigestBuckets { count, hashes }) = wire::decode(&data, 1 << 20) else {
        panic!("a bucketed digest");
    };
    assert_eq!(hashes.len(), 1, "one bucket for a small view");
    let request = wire::encode(&Message::DigestHash {
        hash: hashes[0],
        count,
    });
    let answer = registry.handle_request(0, peer, &request).unwrap();
    assert_eq!(wire::decode(&answer, 1 << 20), Ok(Message::InSync));
}

#[test]
fn a_verified_advert_is_applied_as_its_bytes_are() {
    let me = Keypair::generate_ed25519();
    let site = Keypair::generate_ed25519();
    let mut by_bytes = Registry::new(config(), me.clone(), 0, 1, 0);
    let mut by_advert = Registry::new(config(), me.clone(), 0, 1, 0);
    by_bytes.set_local(0, local("me", 1));
    by_advert.set_local(0, local("me", 1));
    // New, newer, the same again, older, and our own coming back.
    let messages = [
        advert_gossip(&site, 2, 4),
        advert_gossip(&site, 3, 2),
        advert_gossip(&site, 3, 2),
        advert_gossip(&site, 1, 4),
        advert_gossip(&me, 9, 4),
    ];
    for (at, data) in (0..).zip(&messages) {
        let Ok(Message::Advert(signed)) = wire::decode(data, 1 << 20) else {
            panic!("an advert");
        };
        let advert = signed.verify().unwrap();
        let verified = std::sync::Arc::new(crate::advert::VerifiedAdvert { signed, advert });
        assert_eq!(
            by_bytes.handle_gossip(at, data),
            by_advert.handle_verified_advert(at, verified),
        );
        let events = |registry: &mut Registry| {
            std::iter::from_fn(|| registry.poll_event()).collect::<Vec<_>>()
        };
        assert_eq!(events(&mut by_bytes), events(&mut by_advert));
        assert_eq!(by_bytes.sites(at), by_advert.sites(at));
        assert_eq!(by_bytes.poll_timeout(), by_advert.poll_timeout());
    }
    assert_eq!(by_bytes.stats(), by_advert.stats());
}

#[test]
fn a_forgotten_site_is_not_brought_back_by_relays_of_its_old_adverts() {
    let gone = Keypair::generate_ed25519();
    let site = gone.public().to_peer_id();
    let mut registry = Registry::new(config(), Keypair::generate_ed25519(), 0, 1, 0);
    assert_eq!(
        registry.handle_gossip(100, &advert_gossip(&gone, 3, 4)),
        Verdict::Accept
    );
    assert!(registry.forget_site(&site));
    assert!(registry.site_state(&site).is_none());
    assert!(!registry.forget_site(&site), "forgotten already");
    // A peer that still has the advert relays it: ignored, counted.
    let stale = registry.stats().dropped_stale;
    assert_eq!(
        registry.handle_gossip(200, &advert_gossip(&gone, 3, 4)),
        Verdict::Ignore
    );
    assert_eq!(registry.stats().dropped_stale, stale + 1);
    assert!(registry.site_state(&site).is_none());
    // The site itself publishes again: it is back.
    assert_eq!(
        registry.handle_gossip(300, &advert_gossip(&gone, 4, 4)),
        Verdict::Accept
    );
    assert!(registry.site_state(&site).is_some());
}

#[test]
fn a_restarted_view_warms_up_until_its_remembered_sites_are_heard_or_time_runs_out() {
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let own = Keypair::generate_ed25519();
    let own_id = own.public().to_peer_id();
    let mut registry = Registry::new(config(), own, 0, 1, 0);
    assert_eq!(registry.warming(0), None, "nothing expected: no warm-up");
    // Its own id among the remembered ones is not waited for.
    let expected = [a.public().to_peer_id(), b.public().to_peer_id(), own_id];
    registry.expect_sites(1_000, expected);
    // One refresh (3 s) and one anti-entropy round (1 s) from the start.
    let until_ms = 5_000;
    let warming = |heard| {
        Some(Warming {
            heard,
            expected: 2,
            until_ms,
        })
    };
    assert_eq!(registry.warming(1_000), warming(0));
    assert_eq!(
        registry.handle_gossip(1_500, &advert_gossip(&a, 1, 4)),
        Verdict::Accept
    );
    assert_eq!(registry.warming(1_500), warming(1));
    // A site that never answers holds the warm-up only until its end.
    assert_eq!(registry.warming(until_ms - 1), warming(1));
    assert_eq!(registry.warming(until_ms), None);
    // Heard from all: warm at once.
    registry.expect_sites(10_000, [a.public().to_peer_id(), b.public().to_peer_id()]);
    assert_eq!(
        registry.handle_gossip(10_100, &advert_gossip(&b, 1, 4)),
        Verdict::Accept
    );
    assert_eq!(registry.warming(10_100), None);
    // Expecting nobody ends a warm-up.
    registry.expect_sites(20_000, []);
    assert_eq!(registry.warming(20_000), None);
    // Nor is a site waited for whose adverts the allowlist refuses.
    let config = RegistryConfig {
        allowed_sites: Some([a.public().to_peer_id()].into_iter().collect()),
        ..config()
    };
    let mut registry = Registry::new(config, Keypair::generate_ed25519(), 0, 1, 0);
    registry.expect_sites(0, [a.public().to_peer_id(), b.public().to_peer_id()]);
    assert_eq!(
        registry.warming(0),
        Some(Warming {
            heard: 0,
            expected: 1,
            until_ms: 4_000
        })
    );
}

/// An advert of `keypair`'s site issued at `issued_at_ms`, signed and
/// encoded as gossip.
fn advert_issued(keypair: &Keypair, version: u64, issued_at_ms: i64) -> Vec<u8> {
    let advert = Advert {
        site: keypair.public().to_peer_id(),
        site_name: "flooder".into(),
        version,
        issued_at_ms,
        ttl_ms: 10_000,
        capacity: capacity(1),
        gateway: None,
        addrs: vec![],
        software: "test".into(),
    };
    wire::encode(&Message::Advert(
        SignedAdvert::sign(&advert, keypair).unwrap(),
    ))
}

/// A member that publishes a new version every millisecond for two seconds
/// and replays old ones: beyond a burst, one advert per interval is applied
/// (and so forwarded), the rest are ignored and counted; an honest site's
/// adverts in the middle of the flood are all applied, and the flooder's
/// newest version is learnt one interval after the flood stops.
#[test]
fn a_site_that_floods_adverts_is_rate_limited_and_its_replays_dropped() {
    let config = config();
    let (interval_ms, burst) = (config.advert_interval_min_ms, config.advert_burst);
    let flooder = Keypair::generate_ed25519();
    let honest = Keypair::generate_ed25519();
    let mut registry = Registry::new(config, Keypair::generate_ed25519(), 0, 1, 0);
    let start_ms = 10_000;
    let flood_ms = 2_000;
    let mut applied = Vec::new();
    let mut honest_version = 0;
    let (mut held_version, mut replays) = (0, 0);
    for step in 0..flood_ms {
        let now = start_ms + step;
        let version = u64::try_from(step).unwrap() + 1;
        let verdict = registry.handle_gossip(now, &advert_issued(&flooder, version, now));
        assert_ne!(verdict, Verdict::Reject, "a flood is not a forgery");
        if verdict == Verdict::Accept {
            applied.push(now);
            held_version = version;
        }
        // A replay of a version older than the one held, every 10 ms.
        if step % 10 == 5 && held_version > 1 {
            let replay = advert_issued(&flooder, held_version - 1, now - 3);
            assert_eq!(registry.handle_gossip(now, &replay), Verdict::Ignore);
            replays += 1;
        }
        // The honest site publishes every 250 ms.
        if step % 250 == 0 {
            honest_version += 1;
            assert_eq!(
                registry.handle_gossip(now, &advert_issued(&honest, honest_version, now)),
                Verdict::Accept,
                "an honest advert at {now} ms"
            );
        }
    }
    let stats = registry.stats();
    let allowed = u64::from(burst) + u64::try_from(flood_ms / interval_ms).unwrap();
    assert_eq!(stats.adverts_applied, applied.len() as u64 + honest_version);
    assert!(
        applied.len() as u64 <= allowed,
        "{} applied, at most {allowed}",
        applied.len()
    );
    assert!(
        applied.len() as u64 >= allowed - 1,
        "{} applied",
        applied.len()
    );
    assert_eq!(
        stats.dropped_rate,
        u64::try_from(flood_ms).unwrap() - applied.len() as u64
    );
    assert_eq!(stats.dropped_stale, replays);
    assert!(replays > 100);
    // The burst first, then one per interval.
    assert!(
        applied[..usize::try_from(burst).unwrap()]
            .iter()
            .all(|at| *at < start_ms + i64::from(burst))
    );
    for pair in applied[usize::try_from(burst).unwrap()..].windows(2) {
        assert!(pair[1] - pair[0] >= interval_ms, "{pair:?}");
    }
    // The flood stops; the newest version comes again (a refresh, or
    // anti-entropy) one interval later and is applied.
    let site = flooder.public().to_peer_id();
    let last = u64::try_from(flood_ms).unwrap();
    let later = start_ms + flood_ms + interval_ms;
    assert_eq!(
        registry.handle_gossip(later, &advert_issued(&flooder, last, later - interval_ms)),
        Verdict::Accept
    );
    let view = registry.sites(later);
    let held = view.iter().find(|v| v.site == site).unwrap();
    assert_eq!(held.advert.version, last);
}

mod rate {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the arrival times of a site's adverts (the clock only
        /// moves forward): no window of `T` ms applies more than
        /// `burst + T / interval` of them, and an advert that comes at
        /// least an interval after the last applied one is applied.
        #[test]
        fn applied_adverts_keep_to_the_rate(
            gaps in prop::collection::vec(0i64..300, 1..120),
            interval_ms in 1i64..200,
            burst in 1u32..6,
        ) {
            let config = RegistryConfig {
                advert_interval_min_ms: interval_ms,
                advert_burst: burst,
                ..config()
            };
            let site = Keypair::ed25519_from_bytes([7; 32]).unwrap();
            let mut registry = Registry::new(config, Keypair::generate_ed25519(), 0, 1, 0);
            let mut now = 50_000;
            let mut applied: Vec<i64> = Vec::new();
            for (index, gap) in gaps.iter().enumerate() {
                now += gap;
                let version = u64::try_from(index).unwrap() + 1;
                let verdict = registry.handle_gossip(now, &advert_issued(&site, version, now));
                if applied.last().is_none_or(|last| now - last >= interval_ms) {
                    prop_assert_eq!(verdict, Verdict::Accept, "at {} after {:?}", now, applied);
                }
                if verdict == Verdict::Accept {
                    applied.push(now);
                }
            }
            for (i, from) in applied.iter().enumerate() {
                for (j, to) in applied.iter().enumerate().skip(i) {
                    let allowed = i64::from(burst) + (to - from) / interval_ms;
                    prop_assert!(
                        i64::try_from(j - i + 1).unwrap() <= allowed,
                        "{} applied in [{}, {}]: {:?}", j - i + 1, from, to, applied
                    );
                }
            }
        }
    }
}

/// A clock stepped back while a site's adverts were at the rate limit does
/// not silence the site until it catches up.
#[test]
fn a_clock_stepped_back_does_not_hold_a_site_to_its_old_rate() {
    let config = config();
    let interval_ms = config.advert_interval_min_ms;
    let site = Keypair::generate_ed25519();
    let mut registry = Registry::new(config, Keypair::generate_ed25519(), 0, 1, 0);
    let mut version = 0;
    let mut publish = |registry: &mut Registry, now: i64| {
        version += 1;
        registry.handle_gossip(now, &advert_issued(&site, version, now))
    };
    // At the limit at 100 s.
    while publish(&mut registry, 100_000) == Verdict::Accept {}
    // The clock steps back a minute.
    let back = 40_000;
    assert_eq!(publish(&mut registry, back), Verdict::Accept);
    // And the limit holds from there.
    while publish(&mut registry, back) == Verdict::Accept {}
    assert_eq!(publish(&mut registry, back + interval_ms), Verdict::Accept);
}
