//! Floods and abuse against real agents on loopback (issue #19): a flood of
//! connections without the federation's key, a member that floods adverts
//! and replays stale ones, an API flood with slow clients, and API clients
//! that never read their answers. Each test asserts that the agent stays
//! up, counts what it refused, and keeps doing its job for honest peers and
//! clients within a bound; each prints its figures. Every wait is bounded,
//! and the agents are killed on drop.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{FAST_GOSSIP, Member, Site, eventually, free_port, start, vcfed, view};
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vcfed::api::{HoldBody, InstantArg, OwnerBody};
use vcfed_registry::SiteState;
use vcfed_storage::Reservation;

/// The advert refresh of the test federations (`FAST_GOSSIP`).
const REFRESH: Duration = Duration::from_secs(1);
/// What an honest advert change may take beyond one refresh interval:
/// the shell's coalescing (200 ms), the polling of the view (100 ms) and
/// the scheduling of two agents and a flood on two shared cores.
const SLACK: Duration = Duration::from_millis(1500);

/// A small seeded generator for garbage (not for secrets).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next().to_le_bytes()[0]).collect()
    }
}

fn seed() -> u64 {
    u64::from(std::process::id()) * 0x9E37_79B9 + 1
}

/// `vcfed psk generate` into `dir/name`.
fn psk_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let out = vcfed(&["psk", "generate", "--out", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    path
}

/// Two agents of a private federation (key in `psk`): `a` listens on the
/// returned port, `b` bootstraps from it; both see each other alive.
async fn private_pair(psk: &Path) -> (Member, Member, u16) {
    let settings = format!("psk_file = \"{}\"\n{FAST_GOSSIP}", psk.display());
    let port = free_port();
    let a = Site::init_with("site-a", 8, &format!("/ip4/127.0.0.1/tcp/{port}"), &[]);
    a.add_federation_settings(&settings);
    let a = start(a).await;
    let bootstrap = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", a.peer_id);
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let b = Site::init_with("site-b", 8, &listen, &["--bootstrap", &bootstrap]);
    b.add_federation_settings(&settings);
    let b = start(b).await;
    eventually(
        "a and b see each other",
        Duration::from_secs(20),
        || async {
            let seen_by_a = view(&a.client)
                .await
                .sites
                .iter()
                .any(|s| s.peer_id == b.peer_id && s.state == SiteState::Alive);
            let seen_by_b = view(&b.client)
                .await
                .sites
                .iter()
                .any(|s| s.peer_id == a.peer_id && s.state == SiteState::Alive);
            seen_by_a && seen_by_b
        },
    )
    .await;
    (a, b, port)
}

/// Free nodes of `site` in `observer`'s view.
async fn free_at(observer: &Member, site: &str) -> Option<u32> {
    view(&observer.client)
        .await
        .sites
        .iter()
        .find(|s| s.peer_id == site)
        .map(|s| s.free_now)
}

/// Holds (and commits) one more node at `at`, then measures how long until
/// `observer` sees its free capacity drop: an honest advert change.
async fn capacity_change_seen(at: &Member, observer: &Member, key: &str) -> Duration {
    let before = free_at(observer, &at.peer_id).await.unwrap();
    let hold = HoldBody {
        key: key.into(),
        cluster_id: "c".into(),
        requester: None,
        start: InstantArg::Text("now".into()),
        end: InstantArg::Text("+1h".into()),
        nodes: 1,
        shape: None,
        lease_s: Some(600),
    };
    let _: Reservation = at.client.post("/v1/reservations", &hold).await.unwrap();
    let _: Reservation = at
        .client
        .post(
            &format!("/v1/reservations/{key}/commit"),
            &OwnerBody::default(),
        )
        .await
        .unwrap();
    eventually(
        "the capacity change arrives",
        Duration::from_secs(15),
        || async { free_at(observer, &at.peer_id).await == Some(before - 1) },
    )
    .await
}

/// The samples of `GET /metrics` at `member`.
async fn metrics(member: &Member) -> std::collections::BTreeMap<String, f64> {
    let (status, body) = member
        .client
        .raw::<()>(Method::GET, "/metrics", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    common::parse_exposition(std::str::from_utf8(&body).unwrap())
}

fn alive(member: &mut Member) {
    let agent = member.agent.as_mut().unwrap();
    let exited = agent.child.as_mut().unwrap().try_wait().unwrap();
    assert!(
        exited.is_none(),
        "the agent exited: {exited:?}\n{}",
        agent.log()
    );
}

/// Hundreds of connections to a federation port that speak garbage (what
/// a peer with another pre-shared key sends, as far as the port can tell),
/// close at once, or stall, plus real libp2p nodes with another key:
/// every one is refused and counted, the log says so at a bounded rate,
/// and capacity changes between the two honest agents still arrive within
/// one refresh interval (+ slack), while the flood runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_without_the_key_is_refused_and_counted() {
    let keys = tempfile::tempdir().unwrap();
    let psk = psk_file(keys.path(), "federation.psk");
    let (mut a, b, port) = private_pair(&psk).await;
    let target: SocketAddr = ([127, 0, 0, 1], port).into();

    // Libp2p nodes with another key, dialing a for the whole flood.
    let other_key = vcfed_registry::p2p::parse_psk(
        &std::fs::read_to_string(psk_file(keys.path(), "other.psk")).unwrap(),
    )
    .unwrap();
    let a_addr: multiaddr::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", a.peer_id)
        .parse()
        .unwrap();
    let mut rng = XorShift(seed());
    let mut outsiders = Vec::new();
    const OUTSIDERS: u64 = 4;
    for _ in 0..OUTSIDERS {
        let secret: [u8; 32] = rng.bytes(32).try_into().unwrap();
        let (handle, mut events) = vcfed_registry::p2p::spawn(vcfed_registry::p2p::P2pConfig {
            keypair: libp2p_identity::Keypair::ed25519_from_bytes(secret).unwrap(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap: vec![a_addr.clone()],
            psk: Some(other_key),
            allow_peers: None,
            topic: vcfed_node_core::federation::ADVERT_TOPIC.to_owned(),
            message_max_bytes: vcfed_node_core::federation::MESSAGE_MAX_BYTES,
            request_timeout: Duration::from_secs(10),
            idle_connection_timeout: Duration::from_secs(60),
        })
        .await
        .unwrap();
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        outsiders.push(handle);
    }

    // Raw connections: 300 over 3 s.
    const CONNECTIONS: u64 = 300;
    let flood_started = Instant::now();
    let flood = tokio::spawn(async move {
        let mut rng = XorShift(seed() ^ 0xF100D);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..CONNECTIONS {
            let len = 24 + usize::try_from(rng.next() % 600).unwrap();
            let garbage = rng.bytes(len);
            let more = rng.bytes(4096);
            tasks.spawn(async move {
                let Ok(Ok(mut stream)) =
                    tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(target)).await
                else {
                    return false;
                };
                let _ = stream.write_all(&garbage).await;
                match i % 3 {
                    // Garbage, then gone.
                    0 => {}
                    // Garbage, then silence for a while.
                    1 => {
                        let mut sink = [0u8; 256];
                        let _ = tokio::time::timeout(Duration::from_millis(1500), async {
                            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                        })
                        .await;
                    }
                    // Garbage for a second.
                    _ => {
                        let until = Instant::now() + Duration::from_secs(1);
                        while Instant::now() < until {
                            if stream.write_all(&more).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                true
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut connected = 0u64;
        while let Some(done) = tasks.join_next().await {
            connected += u64::from(done.unwrap());
        }
        // When the flood ended, measured here: the test awaits it only
        // after the honest changes.
        (connected, flood_started.elapsed())
    });

    // Honest changes while the flood runs, both ways.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b_to_a = capacity_change_seen(&b, &a, "during-1").await;
    let a_to_b = capacity_change_seen(&a, &b, "during-2").await;
    let b_to_a_late = capacity_change_seen(&b, &a, "during-3").await;
    let changes_done = flood_started.elapsed();
    let (connected, flood_took) = flood.await.unwrap();
    assert!(
        changes_done < flood_took,
        "the changes were seen during the flood: done after {changes_done:?}, the flood ended \
         after {flood_took:?}"
    );
    alive(&mut a);

    // Every raw connection and every outsider's attempt is refused and
    // counted (a stalled handshake only at the handshake timeout).
    let refused = eventually(
        "every flood connection is counted",
        Duration::from_secs(20),
        || async {
            let t = view(&a.client).await.transport;
            t.inbound_handshake_failed + t.inbound_denied + t.inbound_failed_other
                >= connected + OUTSIDERS
        },
    )
    .await;
    for outsider in &outsiders {
        outsider.shutdown().await;
    }
    let report = view(&a.client).await;
    let transport = report.transport;
    assert_eq!(report.connected_peers, 1, "only b is connected: {report:?}");
    assert!(
        report
            .sites
            .iter()
            .all(|s| s.peer_id == a.peer_id || s.peer_id == b.peer_id),
        "{report:?}"
    );
    let samples = metrics(&a).await;
    let handshake = samples["vcfed_federation_refused_total{reason=\"handshake_failed\"}"];
    let denied = samples["vcfed_federation_refused_total{reason=\"connection_denied\"}"];
    assert_eq!(handshake, transport.inbound_handshake_failed as f64);
    assert_eq!(denied, transport.inbound_denied as f64);
    // The log tells of refusals at most once per 10 s.
    let log = a.agent.as_ref().unwrap().log();
    let lines = log
        .matches("inbound federation connections refused")
        .count();
    let allowed_lines = 2 + usize::try_from(flood_took.as_secs() / 10).unwrap() + 2;
    assert!(
        (1..=allowed_lines).contains(&lines),
        "{lines} log lines about refusals"
    );
    alive(&mut a);

    eprintln!(
        "connection flood: {connected} raw connections in {:.1}s + {OUTSIDERS} libp2p nodes with \
         another key; refused at a: {} handshake failed, {} denied (limits), {} other (all \
         counted {:.1}s after the flood); {lines} log lines",
        flood_took.as_secs_f64(),
        transport.inbound_handshake_failed,
        transport.inbound_denied,
        transport.inbound_failed_other,
        refused.as_secs_f64(),
    );
    eprintln!(
        "honest capacity changes during the flood: b->a {:.2}s, a->b {:.2}s, b->a {:.2}s \
         (refresh {:.0}s)",
        b_to_a.as_secs_f64(),
        a_to_b.as_secs_f64(),
        b_to_a_late.as_secs_f64(),
        REFRESH.as_secs_f64()
    );
    for (what, took) in [
        ("b->a", b_to_a),
        ("a->b", a_to_b),
        ("b->a late", b_to_a_late),
    ] {
        assert!(took <= REFRESH + SLACK, "{what} took {took:?}");
    }
}

/// An advert of the member with `keypair`, as gossip bytes.
fn member_advert(keypair: &libp2p_identity::Keypair, version: u64, issued_at_ms: i64) -> Vec<u8> {
    use vcfed_registry::wire::{self, Message};
    use vcfed_registry::{Advert, CapacitySummary, NodeShape, SignedAdvert};
    let advert = Advert {
        site: keypair.public().to_peer_id(),
        site_name: "flooder".into(),
        version,
        issued_at_ms,
        ttl_ms: 3_000,
        capacity: CapacitySummary {
            total_nodes: 1,
            node: NodeShape {
                cores: 1,
                memory_mib: 512,
                disk_gib: 1,
            },
            steps: vec![(issued_at_ms, 1)],
            horizon_end_ms: issued_at_ms + 3_600_000,
        },
        gateway: None,
        addrs: vec![],
        software: "flooder".into(),
    };
    wire::encode(&Message::Advert(
        SignedAdvert::sign(&advert, keypair).unwrap(),
    ))
}

fn unix_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A member holding the federation's key publishes adverts about every
/// 5 ms for 3 s and replays older versions: beyond the burst, one advert a
/// tenth of a second is applied (and forwarded), the rest are dropped and
/// counted as `rate`, the replays as `stale`; its newest advert is learnt
/// once it stops; the honest agents' capacity changes meanwhile arrive
/// within one refresh interval (+ slack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_flooding_adverts_is_rate_limited_and_its_replays_dropped() {
    let keys = tempfile::tempdir().unwrap();
    let psk = psk_file(keys.path(), "federation.psk");
    let (mut a, b, port) = private_pair(&psk).await;
    let key = vcfed_registry::p2p::parse_psk(&std::fs::read_to_string(&psk).unwrap()).unwrap();
    let a_addr: multiaddr::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", a.peer_id)
        .parse()
        .unwrap();
    let mut rng = XorShift(seed() ^ 0xAD);
    let secret: [u8; 32] = rng.bytes(32).try_into().unwrap();
    let keypair = libp2p_identity::Keypair::ed25519_from_bytes(secret).unwrap();
    let member_id = keypair.public().to_peer_id().to_string();
    let (member, mut events) = vcfed_registry::p2p::spawn(vcfed_registry::p2p::P2pConfig {
        keypair: keypair.clone(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: vec![a_addr],
        psk: Some(key),
        allow_peers: None,
        topic: vcfed_node_core::federation::ADVERT_TOPIC.to_owned(),
        message_max_bytes: vcfed_node_core::federation::MESSAGE_MAX_BYTES,
        request_timeout: Duration::from_secs(10),
        idle_connection_timeout: Duration::from_secs(60),
    })
    .await
    .unwrap();
    // The member reads what it is sent, and validates nothing.
    tokio::spawn(async move { while events.recv().await.is_some() {} });

    // The member joins: a learns its first advert.
    let mut version = 1;
    eventually("a learns the member", Duration::from_secs(15), || {
        version += 1;
        let data = member_advert(&keypair, version, unix_ms());
        let member = member.clone();
        let (a, member_id) = (&a, &member_id);
        async move {
            let _ = member.publish(data).await;
            view(&a.client)
                .await
                .sites
                .iter()
                .any(|s| &s.peer_id == member_id)
        }
    })
    .await;
    let before = view(&a.client).await.stats;
    let b_before = view(&b.client).await.stats;

    // The flood, with honest changes in the middle of it.
    const FLOOD: Duration = Duration::from_secs(3);
    let flooder = {
        let (member, keypair) = (member.clone(), keypair.clone());
        tokio::spawn(async move {
            let (mut sent, mut stale) = (0u64, 0u64);
            let mut version = version;
            let started = Instant::now();
            while started.elapsed() < FLOOD {
                version += 1;
                member
                    .publish(member_advert(&keypair, version, unix_ms()))
                    .await
                    .unwrap();
                sent += 1;
                if sent % 10 == 0 {
                    // An old version signed again: new bytes, so gossip does
                    // not dedupe it.
                    member
                        .publish(member_advert(&keypair, 2, unix_ms()))
                        .await
                        .unwrap();
                    stale += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (sent, stale, version, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b_to_a = capacity_change_seen(&b, &a, "during-1").await;
    let a_to_b = capacity_change_seen(&a, &b, "during-2").await;
    let (sent, stale, last, took) = flooder.await.unwrap();
    alive(&mut a);

    // Stopped: its newest advert comes again (a refresh) and is learnt.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let newest = member_advert(&keypair, last + 1, unix_ms());
    member.publish(newest).await.unwrap();
    let learnt = eventually(
        "a learns the member's newest advert",
        Duration::from_secs(5),
        || async {
            view(&a.client)
                .await
                .sites
                .iter()
                .any(|s| s.peer_id == member_id && s.version == last + 1)
        },
    )
    .await;

    let after = view(&a.client).await.stats;
    let rate = after.dropped_rate - before.dropped_rate;
    let stale_dropped = after.dropped_stale - before.dropped_stale;
    let applied = after.adverts_applied - before.adverts_applied;
    // At most the burst and one per 100 ms were applied of the member's.
    let allowed = 10 + u64::try_from(took.as_millis()).unwrap() / 100 + 2;
    let b_after = view(&b.client).await.stats;
    eprintln!(
        "advert flood: {sent} adverts and {stale} stale replays in {:.1}s from a member with the \
         key; at a: {rate} dropped (rate), {stale_dropped} dropped (stale), {applied} applied \
         (the member's and b's, at most {allowed} of the member's allowed); at b: {} dropped \
         (rate), {} applied; newest learnt {:.2}s after the flood",
        took.as_secs_f64(),
        b_after.dropped_rate - b_before.dropped_rate,
        b_after.adverts_applied - b_before.adverts_applied,
        learnt.as_secs_f64(),
    );
    eprintln!(
        "honest capacity changes during the advert flood: b->a {:.2}s, a->b {:.2}s",
        b_to_a.as_secs_f64(),
        a_to_b.as_secs_f64()
    );
    // Gossip on loopback delivers (nearly) all of it; what is not applied
    // is dropped and counted.
    assert!(rate + allowed >= sent * 9 / 10, "{rate} dropped of {sent}");
    assert!(rate >= sent / 2, "{rate} dropped of {sent}");
    assert!(
        stale_dropped >= stale * 9 / 10,
        "{stale_dropped} of {stale}"
    );
    // b sees only what a forwarded: no more than a applied.
    assert!(b_after.adverts_applied - b_before.adverts_applied <= applied + 5);
    let samples = metrics(&a).await;
    assert!(samples["vcfed_gossip_dropped_total{reason=\"rate\"}"] >= rate as f64);
    for (what, took) in [("b->a", b_to_a), ("a->b", a_to_b)] {
        assert!(took <= REFRESH + SLACK, "{what} took {took:?}");
    }
    member.shutdown().await;
    alive(&mut a);
}

/// One raw HTTP/1.1 exchange on a connection of its own: the status (0 if
/// there was no status line) and the time it took, or the I/O error.
async fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, Duration)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok((status_of(&response), started.elapsed()))
}

fn status_of(response: &[u8]) -> u16 {
    std::str::from_utf8(&response[..response.len().min(12)])
        .ok()
        .and_then(|head| head.strip_prefix("HTTP/1.1 "))
        .and_then(|code| code.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// 1000 concurrent requests and 50 slow clients (25 trickling headers, 25
/// a body, a byte each 100 ms) against one agent: `/healthz` keeps
/// answering within 1 s, every request gets an answer (200, or 503 `busy`
/// beyond `requests_max`), slow clients are cut at `client_timeout`; then
/// connections beyond `connections_max` are answered 503 at once, and the
/// agent serves again once the idle ones time out. Everything refused is in
/// `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_stays_responsive_under_a_flood_and_cuts_slow_clients() {
    const CONNECTIONS_MAX: usize = 1100;
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
    const FLOOD: usize = 1000;
    const SLOW: usize = 25;
    let site = Site::init("site-a", 4);
    let text = std::fs::read_to_string(&site.config_path).unwrap();
    let text = text.replacen(
        "[api]\n",
        &format!(
            "[api]\nconnections_max = {CONNECTIONS_MAX}\nclient_timeout = \"{}s\"\n",
            CLIENT_TIMEOUT.as_secs()
        ),
        1,
    );
    std::fs::write(&site.config_path, text).unwrap();
    let config = site.config();
    let token = std::fs::read_to_string(&config.api.token_file).unwrap();
    let addr = config.api.listen;
    let mut agent = start(site).await;

    let healthz = b"GET /healthz HTTP/1.1\r\nHost: vcfed\r\nConnection: close\r\n\r\n".to_vec();
    let sites = format!(
        "GET /v1/sites HTTP/1.1\r\nHost: vcfed\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        token.trim()
    )
    .into_bytes();

    // The probe: /healthz every 25 ms until told to stop.
    let (stop_probe, mut probe_stopped) = tokio::sync::watch::channel(false);
    let probe = tokio::spawn({
        let healthz = healthz.clone();
        async move {
            let mut answers = Vec::new();
            while !*probe_stopped.borrow() {
                let answer = tokio::time::timeout(Duration::from_secs(5), exchange(addr, &healthz))
                    .await
                    .map_err(|_| "no answer within 5 s".to_owned())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                answers.push(answer);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                    _ = probe_stopped.changed() => {}
                }
            }
            answers
        }
    });

    // Slow clients: headers a byte at a time, or a body a byte at a time.
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..2 * SLOW {
        let token = token.trim().to_owned();
        slow.spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            let (head, trickle): (String, Vec<u8>) = if i < SLOW {
                (
                    "GET /healthz HTTP/1.1\r\n".to_owned(),
                    b"X-Slow: ".repeat(100),
                )
            } else {
                (
                    format!(
                        "POST /v1/reservations HTTP/1.1\r\nHost: vcfed\r\nAuthorization: Bearer \
                         {token}\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                    ),
                    vec![b' '; 500],
                )
            };
            stream.write_all(head.as_bytes()).await.unwrap();
            let headers_sent = started.elapsed();
            let (mut reader, mut writer) = stream.into_split();
            let reading = tokio::spawn(async move {
                let mut response = Vec::new();
                let _ = reader.read_to_end(&mut response).await;
                response
            });
            for byte in trickle {
                if writer.write_all(&[byte]).await.is_err() || reading.is_finished() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let response = tokio::time::timeout(Duration::from_secs(10), reading)
                .await
                .expect("the agent cuts a slow client")
                .unwrap();
            let cut_after = started.elapsed()
                - if i < SLOW {
                    Duration::ZERO
                } else {
                    headers_sent
                };
            (i < SLOW, status_of(&response), cut_after)
        });
    }

    // The flood: 1000 requests at once.
    let flood_started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..FLOOD {
        let sites = sites.clone();
        flood.spawn(async move {
            tokio::time::timeout(Duration::from_secs(30), exchange(addr, &sites))
                .await
                .map_err(|_| "no answer within 30 s".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()))
        });
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut latencies = Vec::new();
    while let Some(answer) = flood.join_next().await {
        let (status, took) = answer
            .unwrap()
            .unwrap_or_else(|e| panic!("a request failed: {e}"));
        *statuses.entry(status).or_default() += 1;
        latencies.push(took);
    }
    let flood_took = flood_started.elapsed();
    let mut slow_cut = Vec::new();
    while let Some(done) = slow.join_next().await {
        slow_cut.push(done.unwrap());
    }
    stop_probe.send(true).unwrap();
    let probes = probe.await.unwrap();
    alive(&mut agent);

    latencies.sort();
    let mut probe_latencies: Vec<Duration> = probes
        .iter()
        .map(|answer| match answer {
            Ok((200, took)) => *took,
            other => panic!("a health probe during the flood: {other:?}"),
        })
        .collect();
    probe_latencies.sort();
    let header_cuts: Vec<Duration> = slow_cut.iter().filter(|c| c.0).map(|c| c.2).collect();
    let body_cuts: Vec<(u16, Duration)> = slow_cut
        .iter()
        .filter(|c| !c.0)
        .map(|c| (c.1, c.2))
        .collect();
    let samples = metrics(&agent).await;
    let refused =
        |reason: &str| samples[&format!("vcfed_api_refused_total{{reason=\"{reason}\"}}")];
    eprintln!(
        "API flood: {FLOOD} concurrent GET /v1/sites answered in {:.2}s: {statuses:?}; latency \
         p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; /healthz during it: {} probes, p50 {:.0} ms, \
         p99 {:.0} ms, max {:.0} ms",
        flood_took.as_secs_f64(),
        percentile(&latencies, 50).as_secs_f64() * 1e3,
        percentile(&latencies, 99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        probe_latencies.len(),
        percentile(&probe_latencies, 50).as_secs_f64() * 1e3,
        percentile(&probe_latencies, 99).as_secs_f64() * 1e3,
        probe_latencies.last().unwrap().as_secs_f64() * 1e3,
    );
    eprintln!(
        "slow clients (client_timeout {}s): headers trickled cut after {:.2?}..{:.2?}; bodies \
         trickled answered {:?} after {:.2?}..{:.2?}; metrics: busy {}, header_timeout {}, \
         body_timeout {}",
        CLIENT_TIMEOUT.as_secs(),
        header_cuts.iter().min().unwrap(),
        header_cuts.iter().max().unwrap(),
        body_cuts
            .iter()
            .map(|c| c.0)
            .collect::<std::collections::BTreeSet<_>>(),
        body_cuts.iter().map(|c| c.1).min().unwrap(),
        body_cuts.iter().map(|c| c.1).max().unwrap(),
        refused("busy"),
        refused("header_timeout"),
        refused("body_timeout"),
    );
    // Every request was answered: served, or refused as busy.
    assert_eq!(
        statuses
            .keys()
            .copied()
            .filter(|s| ![200, 503].contains(s))
            .count(),
        0
    );
    assert!(statuses.get(&200).copied().unwrap_or(0) > 0);
    assert_eq!(
        refused("busy"),
        statuses.get(&503).copied().unwrap_or(0) as f64
    );
    assert!(*probe_latencies.last().unwrap() < Duration::from_secs(1));
    let slack = Duration::from_millis(1500);
    for cut in header_cuts.iter().chain(body_cuts.iter().map(|c| &c.1)) {
        assert!(
            *cut >= CLIENT_TIMEOUT - Duration::from_millis(100) && *cut <= CLIENT_TIMEOUT + slack,
            "a slow client cut after {cut:?}"
        );
    }
    assert!(body_cuts.iter().all(|c| c.0 == 408), "{body_cuts:?}");
    assert!(refused("header_timeout") >= SLOW as f64);
    assert_eq!(refused("body_timeout"), SLOW as f64);

    // Idle connections up to the cap and beyond: those beyond are answered
    // 503 at once (a probe too, while the cap is reached); once the idle
    // ones time out the agent serves again.
    let mut idle = Vec::new();
    for _ in 0..CONNECTIONS_MAX + 20 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let held_at = Instant::now();
    let (probe_status, _) = exchange(addr, &healthz).await.unwrap();
    let mut heads = tokio::task::JoinSet::new();
    for mut stream in idle {
        heads.spawn(async move {
            let mut head = [0u8; 12];
            let read =
                tokio::time::timeout(Duration::from_millis(500), stream.read(&mut head)).await;
            let status = match read {
                Ok(Ok(n)) => status_of(&head[..n]),
                _ => 0,
            };
            (status, stream)
        });
    }
    let mut refused_at_once = 0;
    let mut idle = Vec::new();
    while let Some(done) = heads.join_next().await {
        let (status, stream) = done.unwrap();
        refused_at_once += usize::from(status == 503);
        idle.push(stream);
    }
    eventually(
        "the agent serves again once idle connections time out",
        CLIENT_TIMEOUT + Duration::from_secs(5),
        || async { matches!(exchange(addr, &healthz).await, Ok((200, _))) },
    )
    .await;
    let back = held_at.elapsed();
    let samples = metrics(&agent).await;
    let refused_connections = samples["vcfed_api_refused_total{reason=\"connections_max\"}"];
    eprintln!(
        "connection cap {CONNECTIONS_MAX}: {} idle connections opened, {refused_at_once} answered \
         503 at once, a probe meanwhile {probe_status}; {refused_connections} refused in all; \
         serving again {:.2}s after the last idle one was opened",
        CONNECTIONS_MAX + 20,
        back.as_secs_f64(),
    );
    assert_eq!(probe_status, 503);
    assert!(
        back <= CLIENT_TIMEOUT + Duration::from_millis(1500),
        "{back:?}"
    );
    assert!(refused_at_once >= 20, "{refused_at_once} refused");
    assert!(refused_connections >= 20.0);
    drop(idle);
    alive(&mut agent);
}

/// A client that pipelines `request` (one that needs no token) as fast as
/// the agent takes it and never reads an answer: its receive buffer is a
/// few KiB, so the answers pile up at the agent, which then stops reading.
/// Returns, once a write fails (the agent closed the connection), when its
/// writes last made progress, when one failed, and the bytes sent.
async fn never_reading_client(
    addr: SocketAddr,
    request: &[u8],
) -> std::io::Result<(Instant, Instant, usize)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    // Before connecting, so that the window is small from the handshake on.
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(addr).await?;
    let requests = request.repeat(256);
    let mut at = 0;
    let mut progress = Instant::now();
    let mut sent = 0;
    loop {
        // From where the last write stopped: the requests stay whole.
        match stream.write(&requests[at..]).await {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                sent += n;
                at = (at + n) % requests.len();
                progress = Instant::now();
            }
            Err(_) => return Ok((progress, Instant::now(), sent)),
        }
    }
}

/// Clients that pipeline requests and never read the answers: each is
/// disconnected within `client_timeout` of its last progress, counted as
/// `write_timeout`, and `vcfed_api_connections` comes back down; the agent
/// answers probes meanwhile. Then, with such clients connected, the agent
/// stops within `client_timeout` of SIGTERM (+ slack) rather than waiting
/// on them.
///
/// The timed clients send requests answered `401` without the token: the
/// agent answers them as fast as it reads them, so that it stalls writing
/// as soon as the client's writes stall. `GET /healthz` asks the ledger each
/// time, and what the agent has read but not answered yet (up to a window
/// of requests, seconds of work for a debug build) would shift the cut by
/// that much; the clients of the shutdown send those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_their_answers_are_cut() {
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
    const CLIENTS: usize = 4;
    let slack = Duration::from_millis(1500);
    let site = Site::init("site-a", 4);
    let text = std::fs::read_to_string(&site.config_path).unwrap();
    let text = text.replacen(
        "[api]\n",
        &format!(
            "[api]\nclient_timeout = \"{}s\"\n",
            CLIENT_TIMEOUT.as_secs()
        ),
        1,
    );
    std::fs::write(&site.config_path, text).unwrap();
    let addr = site.config().api.listen;
    let mut agent = start(site).await;
    let open = |samples: &std::collections::BTreeMap<String, f64>| samples["vcfed_api_connections"];
    let open_before = open(&metrics(&agent).await);

    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        clients.spawn(tokio::time::timeout(
            CLIENT_TIMEOUT * 10,
            never_reading_client(addr, b"GET /v1/site HTTP/1.1\r\nHost: vcfed\r\n\r\n"),
        ));
    }
    // Stuck by now: the agent's buffers on loopback fill in milliseconds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let open_stuck = open(&metrics(&agent).await);
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: vcfed\r\nConnection: close\r\n\r\n";
    let (probe_status, probe_took) = exchange(addr, healthz).await.unwrap();
    let mut cuts = Vec::new();
    let mut sent = Vec::new();
    while let Some(done) = clients.join_next().await {
        let (progress, failed, bytes) = done
            .unwrap()
            .expect("the agent cuts a client that never reads")
            .unwrap();
        cuts.push(failed - progress);
        sent.push(bytes);
    }
    let closed = eventually(
        "vcfed_api_connections comes back down",
        Duration::from_secs(5),
        || async { open(&metrics(&agent).await) <= open_before },
    )
    .await;
    let samples = metrics(&agent).await;
    let write_timeouts = samples["vcfed_api_refused_total{reason=\"write_timeout\"}"];
    cuts.sort();
    eprintln!(
        "clients that never read (client_timeout {}s): {CLIENTS} sent {:?} bytes of pipelined \
         GET /v1/site (401), cut {:.2?}..{:.2?} after their last progress; connections open before \
         {open_before}, while stuck {open_stuck}, back down {:.2}s after the last cut; \
         write_timeout {write_timeouts}; a probe meanwhile {probe_status} in {:.0} ms",
        CLIENT_TIMEOUT.as_secs(),
        sent,
        cuts.first().unwrap(),
        cuts.last().unwrap(),
        closed.as_secs_f64(),
        probe_took.as_secs_f64() * 1e3,
    );
    assert!(open_stuck >= open_before + CLIENTS as f64, "{open_stuck}");
    assert_eq!(probe_status, 200);
    for cut in &cuts {
        assert!(
            *cut >= CLIENT_TIMEOUT / 2 && *cut <= CLIENT_TIMEOUT + slack,
            "a client that never reads cut after {cut:?}"
        );
    }
    assert_eq!(write_timeouts, CLIENTS as f64);
    alive(&mut agent);

    // Shutdown with such clients connected and stuck.
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        clients.spawn(never_reading_client(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: vcfed\r\n\r\n",
        ));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopping = Instant::now();
    let status = tokio::task::block_in_place(|| {
        agent
            .agent
            .as_mut()
            .unwrap()
            .terminate(CLIENT_TIMEOUT + Duration::from_secs(10))
    });
    let stopped = stopping.elapsed();
    eprintln!(
        "SIGTERM with {CLIENTS} clients that never read connected: the agent stopped in {:.2}s \
         ({status})",
        stopped.as_secs_f64()
    );
    assert!(status.success(), "{status}");
    assert!(stopped <= CLIENT_TIMEOUT + slack, "{stopped:?}");
    clients.abort_all();
}
