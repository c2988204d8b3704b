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
