//! Gateways exchanging datagrams in memory: handshakes, frames, isolation.

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::*;
use crate::frame::Mac;
use crate::frame::tests::{frame, mac};

struct Site {
    addr: SocketAddr,
    gateway: Gateway,
    delivered: Vec<(u32, Vec<u8>)>,
    datagram_sizes: Vec<usize>,
}

fn key(seed: u8) -> [u8; 32] {
    [seed; 32]
}

fn public(seed: u8) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(key(seed))).to_bytes()
}

/// Sites 0..n with full-mesh peers; `segments[i]` lists the segments site
/// i carries (to every other site).
fn mesh(n: u8, segments: &[&[u32]]) -> Vec<Site> {
    (0..n)
        .map(|i| {
            let mut gateway = Gateway::new(key(i + 1), SwitchConfig::default());
            for j in (0..n).filter(|j| *j != i) {
                gateway
                    .add_peer(PeerConfig {
                        index: u32::from(j) + 1,
                        public_key: public(j + 1),
                        endpoint: Some(addr(j)),
                    })
                    .unwrap();
            }
            let peers: Vec<PeerIndex> = (0..n)
                .filter(|j| *j != i)
                .map(|j| u32::from(j) + 1)
                .collect();
            for segment in segments[usize::from(i)] {
                gateway.add_segment(0, *segment, &peers);
            }
            Site {
                addr: addr(i),
                gateway,
                delivered: Vec::new(),
                datagram_sizes: Vec::new(),
            }
        })
        .collect()
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, i + 1], 7782))
}

/// Delivers datagrams until none are left (bounded).
fn run(sites: &mut [Site], mut queue: VecDeque<(usize, SocketAddr, Vec<u8>)>, now_ms: i64) {
    let mut steps = 0;
    while let Some((to, from, datagram)) = queue.pop_front() {
        steps += 1;
        assert!(steps < 10_000, "datagrams ping-pong forever");
        let mut out = Outputs::new(64);
        sites[to].datagram_sizes.push(datagram.len());
        sites[to]
            .gateway
            .handle_datagram(now_ms, from, &datagram, &mut out);
        collect(sites, to, &out, &mut queue);
    }
}

fn collect(
    sites: &mut [Site],
    at: usize,
    out: &Outputs,
    queue: &mut VecDeque<(usize, SocketAddr, Vec<u8>)>,
) {
    for output in out.iter() {
        match output {
            Output::ToNetwork {
                to,
                datagrams,
                stride,
                ..
            } => {
                let index = sites
                    .iter()
                    .position(|s| s.addr == to)
                    .expect("a known site");
                let from = sites[at].addr;
                // A run is what one UDP GSO send carries: the receiver sees
                // the datagrams one by one.
                for datagram in datagrams.chunks(stride) {
                    queue.push_back((index, from, datagram.to_vec()));
                }
            }
            Output::ToLocal {
                segment,
                offload,
                frame,
                ..
            } => {
                assert!(offload.is_none(), "plain frames stay plain");
                sites[at].delivered.push((segment, frame.to_vec()));
            }
        }
    }
}

fn send_local(sites: &mut [Site], at: usize, segment: u32, frame: &[u8], now_ms: i64) {
    let mut out = Outputs::new(64);
    sites[at]
        .gateway
        .handle_local_frame(now_ms, segment, Offload::NONE, frame, &mut out);
    let mut queue = VecDeque::new();
    collect(sites, at, &out, &mut queue);
    run(sites, queue, now_ms);
}

#[test]
fn frames_cross_after_the_handshake_and_full_frames_fit_the_path() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    let small = frame(mac(2), mac(1), 60);
    send_local(&mut sites, 0, 7, &small, 0);
    assert_eq!(
        sites[1].delivered,
        vec![(7, small)],
        "queued during the handshake, then delivered"
    );

    let full = frame(mac(2), mac(1), 1500);
    send_local(&mut sites, 0, 7, &full, 1);
    assert_eq!(sites[1].delivered.last(), Some(&(7, full)));
    // Every datagram fits a 1500-byte path with IPv4 and UDP headers.
    assert!(
        sites[1].datagram_sizes.iter().all(|len| *len <= 1500 - 28),
        "{:?}",
        sites[1].datagram_sizes
    );

    // The reply goes straight to the learnt site.
    let reply = frame(mac(1), mac(2), 60);
    send_local(&mut sites, 1, 7, &reply, 2);
    assert_eq!(sites[0].delivered, vec![(7, reply)]);

    // Each side counted one session and what crossed, by peer key.
    let (key, at_0) = sites[0].gateway.peer_stats().next().unwrap();
    assert_eq!(key, public(2));
    let (_, at_1) = sites[1].gateway.peer_stats().next().unwrap();
    assert_eq!((at_0.handshakes, at_1.handshakes), (1, 1));
    // Initiation, small frame, two fragments, then the keepalive the
    // initiator sends on the response.
    assert_eq!(at_0.tx_datagrams, at_1.rx_datagrams);
    assert_eq!(at_0.tx_bytes, at_1.rx_bytes);
    assert_eq!(at_1.tx_datagrams, at_0.rx_datagrams);
    assert!(at_0.tx_datagrams >= 4, "{at_0:?}");
    assert_eq!(at_0.rx_dropped + at_1.rx_dropped, 0);
}

#[test]
fn broadcasts_reach_every_site_and_segments_stay_apart() {
    let mut sites = mesh(3, &[&[1, 2], &[1], &[2]]);
    send_local(&mut sites, 0, 1, &frame(Mac::BROADCAST, mac(1), 60), 0);
    assert_eq!(sites[1].delivered.len(), 1);
    assert!(
        sites[2].delivered.is_empty(),
        "site 2 does not carry segment 1"
    );
    assert!(sites[2].gateway.stats().wrong_segment > 0);
    send_local(&mut sites, 0, 2, &frame(Mac::BROADCAST, mac(1), 60), 1);
    assert_eq!(sites[2].delivered.len(), 1);
    assert_eq!(
        sites[1].delivered.len(),
        1,
        "segment 2 never reaches site 1"
    );
}

#[test]
fn a_peer_with_the_wrong_key_gets_nothing_through() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    // Site 1 expects another key for site 0: it never completes a handshake.
    sites[1]
        .gateway
        .add_peer(PeerConfig {
            index: 1,
            public_key: public(99),
            endpoint: Some(addr(0)),
        })
        .unwrap();
    sites[1].gateway.add_segment(0, 7, &[1]);
    send_local(&mut sites, 0, 7, &frame(mac(2), mac(1), 60), 0);
    assert!(sites[1].delivered.is_empty());
    assert!(sites[1].gateway.stats().datagrams_dropped > 0);
    // Garbage is dropped too.
    let mut out = Outputs::default();
    sites[1]
        .gateway
        .handle_datagram(0, addr(0), &[1, 0, 0, 0, 5, 6], &mut out);
    assert!(out.is_empty());
}

#[test]
fn a_restarted_gateway_replaces_the_sessions_its_peers_hold() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    send_local(&mut sites, 0, 7, &frame(mac(2), mac(1), 60), 0);
    assert_eq!(sites[1].delivered.len(), 1);

    // Site 1 restarts: same key, no sessions.
    let restarted = mesh(2, &[&[7], &[7]]).remove(1);
    sites[1] = restarted;
    let mut out = Outputs::default();
    sites[1].gateway.initiate_handshakes(&mut out);
    assert_eq!(
        out.iter().count(),
        1,
        "one initiation per peer with an endpoint"
    );
    let mut queue = VecDeque::new();
    collect(&mut sites, 1, &out, &mut queue);
    run(&mut sites, queue, 1);

    // Site 0 now sends on the new session, with no frame lost to the old one.
    send_local(&mut sites, 0, 7, &frame(mac(2), mac(1), 60), 2);
    assert_eq!(sites[1].delivered.len(), 1);
}

#[test]
fn super_frames_cross_whole_in_runs_of_equal_datagrams() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    // The handshake first, with a plain frame.
    send_local(&mut sites, 0, 7, &frame(mac(2), mac(1), 60), 0);
    let offload = crate::offload::tests::tcp_super_frame();
    let big = frame(mac(2), mac(1), 64_000);
    let mut out = Outputs::new(64);
    sites[0]
        .gateway
        .handle_local_frame(1, 7, offload, &big, &mut out);
    let runs: Vec<(usize, usize)> = out
        .iter()
        .map(|output| match output {
            Output::ToNetwork {
                datagrams, stride, ..
            } => (datagrams.len(), stride),
            Output::ToLocal { .. } => panic!("nothing local"),
        })
        .collect();
    // 64 032 bytes in 46 fragments of 1416 bytes but the last: 43
    // datagrams of 1468 bytes fill a run (RUN_BYTES_MAX), 3 more follow.
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs.iter().all(|(_, stride)| *stride == 1468));
    assert_eq!(runs[0].0, 43 * 1468);
    assert_eq!(runs[1].0.div_ceil(1468), 3);

    // The far side hands the frame to its TAP whole, with its metadata.
    let mut delivered = Vec::new();
    for output in out.iter() {
        let Output::ToNetwork {
            datagrams, stride, ..
        } = output
        else {
            continue;
        };
        for datagram in datagrams.chunks(stride) {
            let mut local = Outputs::default();
            sites[1]
                .gateway
                .handle_datagram(1, addr(0), datagram, &mut local);
            for output in local.iter() {
                if let Output::ToLocal {
                    segment,
                    offload,
                    frame,
                    ..
                } = output
                {
                    delivered.push((segment, offload, frame.to_vec()));
                }
            }
        }
    }
    assert_eq!(delivered, vec![(7, offload, big)]);

    // A plain frame longer than the overlay carries is dropped, counted.
    let mut out = Outputs::new(64);
    sites[0].gateway.handle_local_frame(
        2,
        7,
        Offload::NONE,
        &frame(mac(2), mac(1), 2000),
        &mut out,
    );
    assert!(out.is_empty());
    assert_eq!(sites[0].gateway.stats().local_dropped, 1);
}

#[test]
fn runs_hold_equal_datagrams_to_one_address_and_end_at_a_shorter_one() {
    let a = SocketAddr::from(([198, 18, 0, 1], 1));
    let b = SocketAddr::from(([198, 18, 0, 2], 1));
    let mut out = Outputs::new(3);
    let mut push = |to, len: usize| {
        out.push_datagram(to, len, |dst| {
            dst.fill(u8::try_from(len % 256).unwrap());
            len
        })
    };
    for (to, len) in [
        (a, 100),
        (a, 100),
        (a, 100),
        (a, 100),
        (a, 60),
        (a, 100),
        (b, 100),
        (b, 50),
        (b, 50),
    ] {
        push(to, len);
    }
    push(a, 0); // nothing written: nothing sent
    let runs: Vec<(SocketAddr, usize, usize)> = out
        .iter()
        .map(|output| match output {
            Output::ToNetwork {
                to,
                datagrams,
                stride,
                ..
            } => (to, datagrams.len(), stride),
            Output::ToLocal { .. } => unreachable!(),
        })
        .collect();
    assert_eq!(
        runs,
        vec![
            (a, 300, 100), // at most three
            (a, 160, 100), // closed by the shorter one
            (a, 100, 100),
            (b, 150, 100),
            (b, 50, 50),
        ]
    );
    out.clear();
    assert!(out.is_empty());
    assert_eq!(out.bytes(), 0);
}

/// The datagrams of `out`, one by one, with where they go.
fn datagrams(out: &Outputs) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut all = Vec::new();
    for output in out.iter() {
        if let Output::ToNetwork {
            to,
            datagrams,
            stride,
            ..
        } = output
        {
            all.extend(datagrams.chunks(stride).map(|d| (to, d.to_vec())));
        }
    }
    all
}

/// A new handshake initiation from `tunn` (a fresh ephemeral key and
/// sender index each call; `mac2` set once it holds a cookie).
fn initiation(tunn: &mut Tunn) -> Vec<u8> {
    let mut buf = [0u8; HANDSHAKE_LEN_MAX];
    match tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(init) => init.to_vec(),
        other => panic!("no initiation: {other:?}"),
    }
}

#[test]
fn junk_and_forged_handshakes_are_dropped_by_kind_without_a_reply() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    let gateway = &mut sites[1].gateway;
    let mut out = Outputs::default();
    let mut forged_init = vec![0u8; 148];
    forged_init[0] = 1;
    let mut unknown_index = vec![0u8; 64];
    unknown_index[0] = 4;
    unknown_index[4..8].copy_from_slice(&(77u32 << 8).to_le_bytes());
    let inputs: [(&[u8], &str); 6] = [
        (&[], "empty"),
        (&[4, 0, 0], "short"),
        (&[9, 0, 0, 0, 1, 2, 3, 4], "no such type"),
        (
            &[1, 0, 0, 0, 1, 2, 3, 4],
            "an initiation of the wrong length",
        ),
        (&forged_init, "an initiation with a wrong mac1"),
        (&unknown_index, "data for an index no peer has"),
    ];
    for (datagram, what) in inputs {
        gateway.handle_datagram(0, addr(0), datagram, &mut out);
        assert!(out.is_empty(), "{what} got an answer");
    }
    let stats = gateway.stats();
    assert_eq!(
        (stats.junk, stats.bad_mac, stats.unknown_peer),
        (4, 1, 1),
        "{stats:?}"
    );
    assert_eq!(stats.datagrams_dropped, 6);
    assert_eq!(stats.cookie_replies + stats.replays + stats.refused, 0);
}

#[test]
fn a_handshake_flood_beyond_the_limit_is_answered_with_cookies_and_peers_still_get_in() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    // Initiations from many addresses (one each: no address's own limit
    // applies), with a key the gateway does not know, but for the
    // gateway's public key, so their mac1 is right: each makes the gateway
    // do a DH to find out who sent it.
    let attacker = |i: u64| {
        let [.., high, low] = (i + 1).to_be_bytes();
        SocketAddr::from(([198, 18, high + 1, low], 40_000))
    };
    let mut flooder = Tunn::new(
        StaticSecret::from(key(50)),
        PublicKey::from(public(2)),
        None,
        None,
        9,
        None,
    );
    let extra = 20;
    let mut out = Outputs::new(64);
    for i in 0..HANDSHAKES_PER_S_MAX + extra {
        let init = initiation(&mut flooder);
        sites[1]
            .gateway
            .handle_datagram(0, attacker(i), &init, &mut out);
    }
    let stats = sites[1].gateway.stats();
    // The first HANDSHAKES_PER_S_MAX of the second were looked at (and
    // matched no peer); the rest cost a cookie reply each, no DH.
    assert_eq!(stats.unknown_peer, HANDSHAKES_PER_S_MAX, "{stats:?}");
    assert_eq!(stats.cookie_replies, extra, "{stats:?}");
    assert_eq!(stats.datagrams_dropped, HANDSHAKES_PER_S_MAX + extra);
    let replies = datagrams(&out);
    assert_eq!(replies.len(), usize::try_from(extra).unwrap());
    for (i, (to, reply)) in (HANDSHAKES_PER_S_MAX..).zip(&replies) {
        assert_eq!(*to, attacker(i), "to its sender");
        assert_eq!((reply[0], reply.len()), (MESSAGE_COOKIE_REPLY, 64));
    }
    // The window is a second of the caller's time, not of a clock the
    // gateway reads: a timer tick within it leaves the gateway under load,
    // however long the flood above took to run.
    sites[1].gateway.handle_timers(100, &mut Outputs::default());

    // Site 0, a real peer, is asked for a cookie too; with it, its next
    // initiation (mac2 set) is taken and answered with a handshake.
    let mut honest = Tunn::new(
        StaticSecret::from(key(1)),
        PublicKey::from(public(2)),
        None,
        None,
        1,
        None,
    );
    let mut out = Outputs::default();
    let init = initiation(&mut honest);
    sites[1]
        .gateway
        .handle_datagram(200, addr(0), &init, &mut out);
    let cookie = datagrams(&out);
    assert_eq!(cookie.len(), 1);
    assert_eq!(cookie[0].1[0], MESSAGE_COOKIE_REPLY);
    assert_eq!(sites[1].gateway.stats().cookie_replies, extra + 1);
    let mut buf = [0u8; HANDSHAKE_LEN_MAX];
    assert!(
        matches!(
            honest.decapsulate(Some(addr(1).ip()), &cookie[0].1, &mut buf),
            TunnResult::Done
        ),
        "the cookie reply is genuine"
    );
    let mut out = Outputs::default();
    let init = initiation(&mut honest);
    sites[1]
        .gateway
        .handle_datagram(300, addr(0), &init, &mut out);
    let response = datagrams(&out);
    assert_eq!(response.len(), 1, "{:?}", sites[1].gateway.stats());
    assert_eq!((response[0].0, response[0].1[0]), (addr(0), 2));
    let (key, peer) = sites[1].gateway.peer_stats().next().unwrap();
    assert_eq!((key, peer.handshakes), (public(1), 1));
    assert_eq!(sites[1].gateway.stats().cookie_replies, extra + 1);

    // A second after the flood began, a new window: an initiation without a
    // cookie is looked at again.
    let mut out = Outputs::default();
    let init = initiation(&mut flooder);
    sites[1]
        .gateway
        .handle_datagram(HANDSHAKE_WINDOW_MS, attacker(0), &init, &mut out);
    assert!(out.is_empty());
    let stats = sites[1].gateway.stats();
    assert_eq!(stats.unknown_peer, HANDSHAKES_PER_S_MAX + 1, "{stats:?}");
    assert_eq!(stats.cookie_replies, extra + 1);
}

#[test]
fn spoofed_initiations_from_a_peers_address_do_not_cut_it_off() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    // The attacker knows B's public key (it is in every advert) and A's
    // address: its initiations have the right mac1 and A's address as
    // their source. 25 a second for ten seconds, more than an address
    // gets under load but far from putting the gateway under load.
    let mut spoofer = Tunn::new(
        StaticSecret::from(key(50)),
        PublicKey::from(public(2)),
        None,
        None,
        9,
        None,
    );
    let mut spoofed = 0;
    let mut now_ms = 0;
    while now_ms < 10_000 {
        let mut out = Outputs::default();
        let init = initiation(&mut spoofer);
        sites[1]
            .gateway
            .handle_datagram(now_ms, addr(0), &init, &mut out);
        assert!(out.is_empty());
        spoofed += 1;
        now_ms += 40;
    }

    // A's own initiation, and its response to B's, still get through at
    // once: a frame crosses either way.
    let last_ms = now_ms - 40;
    let to_b = frame(mac(2), mac(1), 60);
    send_local(&mut sites, 0, 7, &to_b, last_ms);
    assert_eq!(sites[1].delivered, vec![(7, to_b)]);
    let mut out = Outputs::default();
    sites[1].gateway.initiate_handshakes(&mut out);
    let mut queue = VecDeque::new();
    collect(&mut sites, 1, &out, &mut queue);
    run(&mut sites, queue, last_ms);
    let to_a = frame(mac(1), mac(2), 60);
    send_local(&mut sites, 1, 7, &to_a, last_ms);
    assert_eq!(sites[0].delivered, vec![(7, to_a)]);
    let (_, at_b) = sites[1].gateway.peer_stats().next().unwrap();
    assert_eq!(at_b.handshakes, 2);
    // Each spoofed initiation cost a lookup (a DH), as any sender's does
    // while the gateway is not under load, and none was charged to A.
    let stats = sites[1].gateway.stats();
    assert_eq!((stats.unknown_peer, stats.rate_limited), (spoofed, 0));
}

#[test]
fn replayed_data_and_initiations_are_dropped_and_counted_as_replays() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    // The initiation, kept for a replay.
    let mut out = Outputs::default();
    sites[0].gateway.initiate_handshake(2, &mut out);
    let initiation = datagrams(&out).remove(0).1;
    let mut queue = VecDeque::new();
    collect(&mut sites, 0, &out, &mut queue);
    run(&mut sites, queue, 0);

    // One frame from site 0, captured on the way.
    let send = |sites: &mut [Site], now_ms| {
        let mut out = Outputs::default();
        let frame = frame(mac(2), mac(1), 60);
        sites[0]
            .gateway
            .handle_local_frame(now_ms, 7, Offload::NONE, &frame, &mut out);
        let mut sent = datagrams(&out);
        assert_eq!(sent.len(), 1);
        let datagram = sent.remove(0).1;
        let mut local = Outputs::default();
        sites[1]
            .gateway
            .handle_datagram(now_ms, addr(0), &datagram, &mut local);
        (datagram, local.iter().count())
    };
    let (first, delivered) = send(&mut sites, 1);
    assert_eq!(delivered, 1);

    // Replayed at once, from elsewhere: dropped, counted, delivered once.
    let attacker = SocketAddr::from(([198, 18, 0, 100], 40_000));
    let mut out = Outputs::default();
    sites[1]
        .gateway
        .handle_datagram(2, attacker, &first, &mut out);
    assert!(out.is_empty());
    assert_eq!(sites[1].gateway.stats().replays, 1);

    // Replayed after the window moved on: dropped as a replay too.
    for now_ms in 0..1100 {
        assert_eq!(send(&mut sites, 3 + now_ms).1, 1);
    }
    sites[1]
        .gateway
        .handle_datagram(1200, attacker, &first, &mut out);
    assert!(out.is_empty());
    assert_eq!(sites[1].gateway.stats().replays, 2);

    // A replayed initiation: its timestamp is not newer than the last.
    sites[1]
        .gateway
        .handle_datagram(1201, attacker, &initiation, &mut out);
    assert!(out.is_empty(), "no handshake response to a replay");
    let stats = sites[1].gateway.stats();
    assert_eq!(stats.replays, 3, "{stats:?}");
    assert_eq!(stats.datagrams_dropped, 3);
    let (_, peer) = sites[1].gateway.peer_stats().next().unwrap();
    assert_eq!((peer.rx_replays, peer.rx_dropped), (3, 3));
    // The peer's endpoint did not follow the replays.
    send(&mut sites, 1300);
    let mut out = Outputs::default();
    sites[1].gateway.handle_local_frame(
        1301,
        7,
        Offload::NONE,
        &frame(mac(1), mac(2), 60),
        &mut out,
    );
    assert_eq!(datagrams(&out)[0].0, addr(0));
}

#[test]
fn under_load_a_sender_that_answers_cookies_gets_only_its_addresss_share_of_dh() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    let attacker = SocketAddr::from(([198, 18, 0, 100], 40_000));
    let mut flooder = Tunn::new(
        StaticSecret::from(key(50)),
        PublicKey::from(public(2)),
        None,
        None,
        9,
        None,
    );
    let send = |sites: &mut [Site], flooder: &mut Tunn, now_ms| {
        let mut out = Outputs::default();
        let init = initiation(flooder);
        sites[1]
            .gateway
            .handle_datagram(now_ms, attacker, &init, &mut out);
        datagrams(&out)
    };
    // Not under load, no address is limited: without a cookie a message
    // proves nothing about its source.
    let burst = u64::try_from(ADDRESS_HANDSHAKES_BURST).unwrap();
    for _ in 0..burst + 3 {
        assert!(send(&mut sites, &mut flooder, 0).is_empty());
    }
    let stats = sites[1].gateway.stats();
    assert_eq!((stats.unknown_peer, stats.rate_limited), (burst + 3, 0));

    // Other senders (one address, many ports) put the gateway under load.
    let load = initiation(&mut flooder);
    for i in 0..HANDSHAKES_PER_S_MAX - (burst + 3) {
        let from = SocketAddr::from(([198, 19, 0, 1], u16::try_from(i).unwrap()));
        let mut out = Outputs::default();
        sites[1].gateway.handle_datagram(0, from, &load, &mut out);
        assert!(out.is_empty());
    }
    let stats = sites[1].gateway.stats();
    assert_eq!(
        (stats.unknown_peer, stats.rate_limited),
        (HANDSHAKES_PER_S_MAX, 0)
    );

    // The sender gets a cookie and answers it: its initiations pass the
    // cookie check, and its address's limit holds: its burst, then its
    // rate.
    let cookie = send(&mut sites, &mut flooder, 0);
    assert_eq!(cookie[0].1[0], MESSAGE_COOKIE_REPLY);
    let mut buf = [0u8; HANDSHAKE_LEN_MAX];
    assert!(matches!(
        flooder.decapsulate(Some(addr(1).ip()), &cookie[0].1, &mut buf),
        TunnResult::Done
    ));
    let before = sites[1].gateway.stats();
    for _ in 0..burst + 3 {
        assert!(send(&mut sites, &mut flooder, 0).is_empty());
    }
    let after = sites[1].gateway.stats();
    assert_eq!(after.unknown_peer - before.unknown_peer, burst);
    assert_eq!(after.rate_limited - before.rate_limited, 3);
    // Over the rest of the window (990 ms, a message every 10 ms), its
    // bucket refills at its rate.
    let before = after;
    for now_ms in (10..HANDSHAKE_WINDOW_MS).step_by(10) {
        assert!(send(&mut sites, &mut flooder, now_ms).is_empty());
    }
    let after = sites[1].gateway.stats();
    assert_eq!(after.cookie_replies, before.cookie_replies, "mac2 is valid");
    let sent = u64::try_from((HANDSHAKE_WINDOW_MS - 10) / 10).unwrap();
    let refilled = u64::try_from((HANDSHAKE_WINDOW_MS - 10) / address_limit::COST_MS).unwrap();
    assert_eq!(refilled, 19);
    assert_eq!(after.unknown_peer - before.unknown_peer, refilled);
    assert_eq!(after.rate_limited - before.rate_limited, sent - refilled);

    // In the next window the gateway is no longer under load, and the
    // address is not limited though its bucket is empty.
    let before = after;
    for _ in 0..burst + 3 {
        assert!(send(&mut sites, &mut flooder, HANDSHAKE_WINDOW_MS).is_empty());
    }
    let after = sites[1].gateway.stats();
    assert_eq!(after.unknown_peer - before.unknown_peer, burst + 3);
    assert_eq!(after.rate_limited, before.rate_limited);
}

/// A small frame of a flow of its own (another IPv4 source).
fn ping_frame() -> Vec<u8> {
    let mut ping = frame(mac(2), mac(3), 98);
    ping[14 + 12] = 99;
    ping
}

#[test]
fn a_sparse_flow_rides_the_interactive_lane_and_waits_rather_than_overtake_the_replay_window() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    send_local(&mut sites, 0, 7, &frame(mac(2), mac(1), 60), 0);
    sites[1].delivered.clear();
    let interactive_before = sites[0].gateway.stats().interactive_frames;

    // A transfer: 2000 frames of one flow within a millisecond. Its first
    // frames are interactive, the rest (past FLOW_BYTES_MAX) bulk.
    let now = 1000;
    let mut out = Outputs::new(64);
    let bulk_frame = frame(mac(2), mac(1), 200);
    for _ in 0..2000 {
        sites[0]
            .gateway
            .handle_local_frame(now, 7, Offload::NONE, &bulk_frame, &mut out);
    }
    assert!(
        !out.urgent()
            || out.iter().any(|o| matches!(
                o,
                Output::ToNetwork { datagrams, .. } if Lanes::is_marked(datagrams)
            ))
    );
    let mut sent = datagrams(&out);
    assert_eq!(sent.len(), 2000);
    let marked = sent.iter().filter(|(_, d)| Lanes::is_marked(d)).count();
    assert!(
        marked > 0 && marked <= crate::lane::FLOW_BYTES_MAX as usize / 200,
        "{marked}"
    );
    assert!(sent[1999].1[1] == 0, "the transfer ends on the bulk lane");

    // Then a ping of another flow: alone in its run, marked, urgent.
    let mut out = Outputs::new(64);
    let ping = ping_frame();
    sites[0]
        .gateway
        .handle_local_frame(now, 7, Offload::NONE, &ping, &mut out);
    assert!(out.urgent());
    let runs: Vec<Output<'_>> = out.iter().collect();
    assert!(
        matches!(runs[..], [Output::ToNetwork { stride, datagrams, .. }] if stride == datagrams.len() && Lanes::is_marked(datagrams))
    );
    let (_, ping_datagram) = datagrams(&out).remove(0);
    assert!(Lanes::is_marked(&ping_datagram));
    assert_eq!(
        sites[0].gateway.stats().interactive_frames - interactive_before,
        marked as u64 + 1
    );

    // The receiver has handled the first 100 of the transfer when the ping
    // arrives: it is some 1900 messages ahead, past the replay window's
    // reach, so it waits.
    let from = sites[0].addr;
    let deliver = |sites: &mut [Site], datagram: &[u8]| {
        let mut out = Outputs::new(64);
        sites[1]
            .gateway
            .handle_datagram(now, from, datagram, &mut out);
        let mut queue = VecDeque::new();
        collect(sites, 1, &out, &mut queue);
        assert!(queue.is_empty());
    };
    let rest = sent.split_off(100);
    for (_, datagram) in &sent {
        deliver(&mut sites, datagram);
    }
    deliver(&mut sites, &ping_datagram);
    assert_eq!(sites[1].gateway.stats().interactive_held, 1);
    assert!(!sites[1].delivered.iter().any(|(_, f)| *f == ping));

    // As the transfer comes in, the ping goes as soon as it is within
    // OVERTAKE_MAX of it: before the transfer's last frames, with no drop.
    for (_, datagram) in &rest {
        deliver(&mut sites, datagram);
    }
    let at = sites[1]
        .delivered
        .iter()
        .position(|(_, f)| *f == ping)
        .expect("the ping was delivered");
    assert_eq!(sites[1].delivered.len(), 2001);
    let overtaken = 2000 - at;
    assert!(
        overtaken > 0 && overtaken as u64 <= crate::lane::OVERTAKE_MAX + 1,
        "overtook {overtaken}"
    );
    assert_eq!(sites[1].gateway.stats().replays, 0);
    assert_eq!(sites[1].gateway.stats().datagrams_dropped, 0);
}

#[test]
fn a_held_datagram_goes_when_the_bulk_lane_empties_and_an_idle_session_holds_nothing() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    send_local(&mut sites, 0, 7, &frame(mac(2), mac(1), 60), 0);
    let now = 1000;
    let mut out = Outputs::new(64);
    for _ in 0..1500 {
        sites[0].gateway.handle_local_frame(
            now,
            7,
            Offload::NONE,
            &frame(mac(2), mac(1), 200),
            &mut out,
        );
    }
    let sent = datagrams(&out);
    let mut out = Outputs::new(64);
    let ping = ping_frame();
    sites[0]
        .gateway
        .handle_local_frame(now, 7, Offload::NONE, &ping, &mut out);
    let ping_datagram = datagrams(&out).remove(0).1;
    let from = sites[0].addr;
    let gateway = &mut sites[1].gateway;
    let mut out = Outputs::new(64);
    // The transfer's first 80 datagrams are interactive: 100 reach past.
    for (_, datagram) in &sent[..100] {
        gateway.handle_datagram(now, from, datagram, &mut out);
    }
    out.clear();
    gateway.handle_datagram(now, from, &ping_datagram, &mut out);
    assert!(out.is_empty(), "held");
    // The shell found the bulk socket empty (the rest was lost): it goes.
    gateway.bulk_queued(false, now, &mut out);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::ToLocal { frame, .. } if frame == ping))
    );

    // Nothing is held while the bulk lane is empty, however far ahead, nor
    // once the session has sent no bulk for BULK_ACTIVE_MS (the lane is
    // busy with another peer's).
    let mut send = |at: i64, frame: &[u8]| {
        let mut out = Outputs::new(64);
        sites[0]
            .gateway
            .handle_local_frame(at, 7, Offload::NONE, frame, &mut out);
        datagrams(&out).remove(0).1
    };
    let first = send(now + 1, &ping);
    let bulk = send(now + 1, &frame(mac(2), mac(1), 200));
    for _ in 0..1100 {
        send(now + 1, &frame(mac(2), mac(1), 200));
    }
    let second = send(now + 2, &ping);
    let gateway = &mut sites[1].gateway;
    let mut out = Outputs::new(64);
    gateway.handle_datagram(now + 1, from, &first, &mut out);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::ToLocal { frame, .. } if frame == ping))
    );
    // The transfer goes on (the lane is busy again), then pauses while the
    // ping, 1100 messages ahead of it, comes BULK_ACTIVE_MS later.
    gateway.handle_datagram(now, from, &bulk, &mut Outputs::new(64));
    let mut out = Outputs::new(64);
    gateway.handle_datagram(now + BULK_ACTIVE_MS, from, &second, &mut out);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::ToLocal { frame, .. } if frame == ping))
    );
    assert_eq!(gateway.stats().interactive_held, 1);
    assert_eq!(gateway.stats().datagrams_dropped, 0);
}

#[test]
fn a_peer_that_never_says_it_reads_lanes_gets_no_marks() {
    let mut sites = mesh(2, &[&[7], &[7]]);
    // Site 1 stands for a gateway without lanes: a marked message is junk
    // to it (boringtun refuses a nonzero reserved byte), so it is dropped on
    // the way and never answered.
    let mut out = Outputs::new(64);
    sites[0]
        .gateway
        .handle_local_frame(0, 7, Offload::NONE, &frame(mac(2), mac(1), 60), &mut out);
    let mut queue = VecDeque::new();
    collect(&mut sites, 0, &out, &mut queue);
    let (mut steps, mut dropped) = (0, 0);
    while let Some((to, from, datagram)) = queue.pop_front() {
        steps += 1;
        assert!(steps < 1_000);
        if Lanes::is_marked(&datagram) {
            dropped += 1;
            continue;
        }
        let mut out = Outputs::new(64);
        sites[to]
            .gateway
            .handle_datagram(0, from, &datagram, &mut out);
        collect(&mut sites, to, &out, &mut queue);
    }
    assert_eq!(dropped, 1, "site 0's hello, once per session");
    assert_eq!(sites[1].delivered.len(), 1);

    let mut out = Outputs::new(64);
    sites[0]
        .gateway
        .handle_local_frame(1000, 7, Offload::NONE, &ping_frame(), &mut out);
    let sent = datagrams(&out);
    assert!(!sent.is_empty());
    assert!(sent.iter().all(|(_, d)| !Lanes::is_marked(d)));
    assert!(!out.urgent());
    assert_eq!(sites[0].gateway.stats().interactive_frames, 0);
}
