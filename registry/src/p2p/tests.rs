//! Loopback tests of the libp2p shell: real TCP on 127.0.0.1 with port 0, so
//! they run in parallel without namespaces. Every wait is bounded.

use std::{collections::BTreeSet, time::Duration};

use libp2p::{Multiaddr, PeerId, identity::Keypair, multiaddr::Protocol};
use tokio::{
    sync::mpsc::Receiver,
    time::{Instant, timeout},
};

use super::*;

/// Bound on waits for things that happen within a few round trips.
const WAIT: Duration = Duration::from_secs(5);
/// Bound on waits for a handshake that may only fail by timing out.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(20);
/// How long a "must not happen" is watched for.
const QUIET: Duration = Duration::from_secs(1);
const MAX_BYTES: usize = 64 * 1024;

struct Node {
    handle: P2pHandle,
    events: Receiver<P2pEvent>,
    peer: PeerId,
    /// The bound listen address with `/p2p/<peer id>` appended.
    addr: Multiaddr,
}

struct Options {
    psk: Option<[u8; 32]>,
    allow_peers: Option<BTreeSet<PeerId>>,
    bootstrap: Vec<Multiaddr>,
    message_max_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            psk: None,
            allow_peers: None,
            bootstrap: Vec::new(),
            message_max_bytes: MAX_BYTES,
        }
    }
}

fn config(keypair: Keypair, options: Options) -> P2pConfig {
    P2pConfig {
        keypair,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: options.bootstrap,
        psk: options.psk,
        allow_peers: options.allow_peers,
        topic: "vcfed/test/1".to_owned(),
        message_max_bytes: options.message_max_bytes,
        request_timeout: WAIT,
        idle_connection_timeout: Duration::from_secs(60),
    }
}

async fn start(keypair: Keypair, options: Options) -> Node {
    let peer = keypair.public().to_peer_id();
    let (handle, mut events) = spawn(config(keypair, options)).await.unwrap();
    assert_eq!(handle.local_peer_id(), peer);
    let addrs = handle.listen_addrs().await.unwrap();
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    assert!(
        !addrs[0].iter().any(|p| p == Protocol::Tcp(0)),
        "port 0 must be resolved: {addrs:?}"
    );
    // spawn returns after the listener is bound, and says so first.
    let first = events.try_recv().unwrap();
    assert_eq!(
        first,
        P2pEvent::Listening {
            addr: addrs[0].clone()
        }
    );
    let addr = addrs[0].clone().with(Protocol::P2p(peer));
    Node {
        handle,
        events,
        peer,
        addr,
    }
}

/// Receives until `pick` returns `Some`, skipping other events; `None` if the
/// channel closes. Unbounded: callers wrap it in a timeout.
async fn recv_matching<T>(
    events: &mut Receiver<P2pEvent>,
    mut pick: impl FnMut(P2pEvent) -> Option<T>,
) -> Option<T> {
    while let Some(event) = events.recv().await {
        if let Some(found) = pick(event) {
            return Some(found);
        }
    }
    None
}

async fn next_matching<T>(
    events: &mut Receiver<P2pEvent>,
    bound: Duration,
    what: &str,
    pick: impl FnMut(P2pEvent) -> Option<T>,
) -> T {
    match timeout(bound, recv_matching(events, pick)).await {
        Ok(Some(found)) => found,
        Ok(None) => panic!("event channel closed while waiting for {what}"),
        Err(_) => panic!("no {what} within {bound:?}"),
    }
}

async fn connected_to(node: &mut Node, peer: PeerId) {
    next_matching(&mut node.events, WAIT, "PeerConnected", |event| {
        matches!(event, P2pEvent::PeerConnected { peer: p, .. } if p == peer).then_some(())
    })
    .await;
}

/// Events already queued, without waiting.
fn drain(events: &mut Receiver<P2pEvent>) -> Vec<P2pEvent> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

fn gossip(event: P2pEvent) -> Option<(GossipId, PeerId, Vec<u8>)> {
    match event {
        P2pEvent::Gossip { id, source, data } => Some((id, source, data)),
        _ => None,
    }
}

/// Publishes from `from` until `to` receives it: gossipsub only sends to
/// peers whose subscription it has already learned.
async fn publish_until_received(
    from: &Node,
    to: &mut Node,
    data: &[u8],
) -> (GossipId, PeerId, Vec<u8>) {
    let deadline = Instant::now() + WAIT;
    loop {
        from.handle.publish(data.to_vec()).await.unwrap();
        if let Ok(Some(received)) = timeout(
            Duration::from_millis(200),
            recv_matching(&mut to.events, gossip),
        )
        .await
        {
            return received;
        }
        assert!(
            Instant::now() < deadline,
            "gossip not received within {WAIT:?}"
        );
    }
}

#[tokio::test]
async fn two_nodes_connect_gossip_and_shut_down() {
    let mut a = start(Keypair::generate_ed25519(), Options::default()).await;
    let mut b = start(
        Keypair::generate_ed25519(),
        Options {
            bootstrap: vec![a.addr.clone()],
            ..Options::default()
        },
    )
    .await;
    connected_to(&mut a, b.peer).await;
    connected_to(&mut b, a.peer).await;
    assert_eq!(a.handle.connected_peers().await.unwrap(), vec![b.peer]);
    assert_eq!(b.handle.connected_peers().await.unwrap(), vec![a.peer]);

    // Identify hands B the address A listens on.
    let a_listen = a.handle.listen_addrs().await.unwrap();
    let addrs = next_matching(&mut b.events, WAIT, "PeerAddresses", |event| match event {
        P2pEvent::PeerAddresses { peer, addrs } if peer == a.peer => Some(addrs),
        _ => None,
    })
    .await;
    assert!(addrs.contains(&a_listen[0]), "{addrs:?} lacks {a_listen:?}");

    let (id, source, data) = publish_until_received(&a, &mut b, b"advert from A").await;
    assert_eq!(source, a.peer);
    assert_eq!(data, b"advert from A");
    b.handle
        .report_validation(id, source, Validation::Accept)
        .await
        .unwrap();

    // Identical bytes are the same message: publishing again is a no-op.
    a.handle.publish(b"advert from A".to_vec()).await.unwrap();
    let too_big = vec![0u8; MAX_BYTES + 1];
    assert!(matches!(
        a.handle.publish(too_big).await,
        Err(P2pError::MessageTooLarge { len, max: MAX_BYTES }) if len == MAX_BYTES + 1
    ));

    a.handle.shutdown().await;
    assert!(matches!(
        a.handle.connected_peers().await,
        Err(P2pError::Closed)
    ));
    // The receiver yields what was queued, then ends.
    let ended = timeout(WAIT, async { while a.events.recv().await.is_some() {} }).await;
    assert!(ended.is_ok(), "A's event stream did not end");
    next_matching(&mut b.events, WAIT, "PeerDisconnected", |event| {
        matches!(event, P2pEvent::PeerDisconnected { peer } if peer == a.peer).then_some(())
    })
    .await;
    // Shutting down twice is harmless.
    a.handle.shutdown().await;
}

#[tokio::test]
async fn gossip_is_forwarded_only_after_validation() {
    // A - B - C: C only hears A's messages through B.
    let mut a = start(Keypair::generate_ed25519(), Options::default()).await;
    let mut b = start(
        Keypair::generate_ed25519(),
        Options {
            bootstrap: vec![a.addr.clone()],
            ..Options::default()
        },
    )
    .await;
    let mut c = start(
        Keypair::generate_ed25519(),
        Options {
            bootstrap: vec![b.addr.clone()],
            ..Options::default()
        },
    )
    .await;
    connected_to(&mut a, b.peer).await;
    connected_to(&mut c, b.peer).await;

    let (id, source, _) = publish_until_received(&a, &mut b, b"accepted advert").await;
    let early = timeout(QUIET, recv_matching(&mut c.events, gossip)).await;
    assert!(
        early.is_err(),
        "C got a message B has not validated: {early:?}"
    );
    b.handle
        .report_validation(id, source, Validation::Accept)
        .await
        .unwrap();
    let (_, via, data) = next_matching(&mut c.events, WAIT, "forwarded gossip", gossip).await;
    assert_eq!(via, b.peer);
    assert_eq!(data, b"accepted advert");

    let (id, source, _) = publish_until_received(&a, &mut b, b"rejected advert").await;
    b.handle
        .report_validation(id, source, Validation::Reject)
        .await
        .unwrap();
    let leaked = timeout(QUIET, recv_matching(&mut c.events, gossip)).await;
    assert!(leaked.is_err(), "C got a message B rejected: {leaked:?}");
}

#[tokio::test]
async fn request_response_round_trip_and_size_limits() {
    // B accepts smaller payloads than A, so A can send what B must refuse.
    const B_MAX: usize = 1024;
    let mut a = start(Keypair::generate_ed25519(), Options::default()).await;
    let mut b = start(
        Keypair::generate_ed25519(),
        Options {
            bootstrap: vec![a.addr.clone()],
            message_max_bytes: B_MAX,
            ..Options::default()
        },
    )
    .await;
    connected_to(&mut a, b.peer).await;

    let sent = a.handle.request(b.peer, b"ping".to_vec()).await.unwrap();
    let inbound = next_matching(&mut b.events, WAIT, "Request", |event| match event {
        P2pEvent::Request {
            peer,
            request,
            data,
        } => {
            assert_eq!(peer, a.peer);
            assert_eq!(data, b"ping");
            Some(request)
        }
        _ => None,
    })
    .await;
    b.handle.respond(inbound, b"pong".to_vec()).await.unwrap();
    let response = next_matching(&mut a.events, WAIT, "Response", |event| match event {
        P2pEvent::Response {
            peer,
            request,
            data,
        } => Some((peer, request, data)),
        P2pEvent::RequestFailed { error, .. } => panic!("request failed: {error}"),
        _ => None,
    })
    .await;
    assert_eq!(response, (b.peer, sent, b"pong".to_vec()));
    assert!(matches!(
        b.handle.respond(inbound, b"again".to_vec()).await,
        Err(P2pError::UnknownRequest(id)) if id == inbound
    ));

    // A request above B's limit is refused by B's decoder, never delivered.
    let oversized = a.handle.request(b.peer, vec![7; B_MAX * 4]).await.unwrap();
    let error = next_matching(&mut a.events, WAIT, "RequestFailed", |event| match event {
        P2pEvent::RequestFailed {
            peer,
            request,
            error,
        } if request == oversized => {
            assert_eq!(peer, b.peer);
            Some(error)
        }
        P2pEvent::Response { request, .. } if request == oversized => {
            panic!("oversized request was answered")
        }
        _ => None,
    })
    .await;
    assert!(!error.is_empty());
    let delivered = drain(&mut b.events);
    assert!(
        !delivered
            .iter()
            .any(|event| matches!(event, P2pEvent::Request { .. })),
        "{delivered:?}"
    );

    // B's own limit applies locally too.
    assert!(matches!(
        b.handle.request(a.peer, vec![0; B_MAX + 1]).await,
        Err(P2pError::MessageTooLarge { max: B_MAX, .. })
    ));

    // A response above B's limit is refused by B's decoder.
    let asked = b
        .handle
        .request(a.peer, b"big please".to_vec())
        .await
        .unwrap();
    let inbound = next_matching(&mut a.events, WAIT, "Request", |event| match event {
        P2pEvent::Request { request, .. } => Some(request),
        _ => None,
    })
    .await;
    a.handle.respond(inbound, vec![9; B_MAX * 4]).await.unwrap();
    next_matching(&mut b.events, WAIT, "RequestFailed", |event| match event {
        P2pEvent::RequestFailed { request, .. } if request == asked => Some(()),
        P2pEvent::Response { request, .. } if request == asked => {
            panic!("oversized response was delivered")
        }
        _ => None,
    })
    .await;
}

/// Waits until `node`'s dial to the target fails, asserting it never
/// connects.
async fn dial_fails(node: &mut Node, target: PeerId, bound: Duration) -> String {
    next_matching(
        &mut node.events,
        bound,
        "ConnectionFailed",
        |event| match event {
            P2pEvent::PeerConnected { peer, .. } if peer == target => {
                panic!("connected despite the wrong key")
            }
            P2pEvent::ConnectionFailed { error, .. } => Some(error),
            _ => None,
        },
    )
    .await
}

#[tokio::test]
async fn private_network_requires_the_same_key() {
    let key = [0x11; 32];
    let mut a = start(
        Keypair::generate_ed25519(),
        Options {
            psk: Some(key),
            ..Options::default()
        },
    )
    .await;
    let mut b = start(
        Keypair::generate_ed25519(),
        Options {
            psk: Some(key),
            bootstrap: vec![a.addr.clone()],
            ..Options::default()
        },
    )
    .await;
    connected_to(&mut a, b.peer).await;
    connected_to(&mut b, a.peer).await;

    let mut other_key = start(
        Keypair::generate_ed25519(),
        Options {
            psk: Some([0x22; 32]),
            bootstrap: vec![a.addr.clone()],
            ..Options::default()
        },
    )
    .await;
    let mut no_key = start(
        Keypair::generate_ed25519(),
        Options {
            bootstrap: vec![a.addr.clone()],
            ..Options::default()
        },
    )
    .await;
    // A handshake garbled by the wrong key may only fail at the handshake
    // timeout, hence the longer bound.
    let (other_error, no_key_error) = tokio::join!(
        dial_fails(&mut other_key, a.peer, HANDSHAKE_WAIT),
        dial_fails(&mut no_key, a.peer, HANDSHAKE_WAIT),
    );
    assert!(other_error.contains("pre-shared key"), "{other_error}");
    assert!(!no_key_error.is_empty());
    // Both refusals are counted at a (where they may end after the dialers
    // gave up).
    let deadline = Instant::now() + HANDSHAKE_WAIT;
    while a.handle.stats().inbound_handshake_failed < 2 {
        assert!(Instant::now() < deadline, "{:?}", a.handle.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(a.handle.connected_peers().await.unwrap(), vec![b.peer]);
    let seen = drain(&mut a.events);
    assert!(
        !seen.iter().any(|event| matches!(
            event,
            P2pEvent::PeerConnected { peer, .. } if *peer != b.peer
        )),
        "{seen:?}"
    );
}

#[tokio::test]
async fn allowlist_refuses_other_peers() {
    let b_key = Keypair::generate_ed25519();
    let mut a = start(
        Keypair::generate_ed25519(),
        Options {
            allow_peers: Some(BTreeSet::from([b_key.public().to_peer_id()])),
            ..Options::default()
        },
    )
    .await;
    let b = start(
        b_key,
        Options {
            bootstrap: vec![a.addr.clone()],
            ..Options::default()
        },
    )
    .await;
    connected_to(&mut a, b.peer).await;

    let mut c = start(
        Keypair::generate_ed25519(),
        Options {
            bootstrap: vec![a.addr.clone()],
            ..Options::default()
        },
    )
    .await;
    let c_peer = c.peer;
    let error = next_matching(
        &mut a.events,
        WAIT,
        "refused connection",
        |event| match event {
            P2pEvent::PeerConnected { peer, .. } if peer == c_peer => {
                panic!("A accepted a peer outside its allowlist")
            }
            P2pEvent::ConnectionFailed {
                peer: Some(peer),
                error,
            } if peer == c_peer => Some(error),
            _ => None,
        },
    )
    .await;
    assert!(!error.is_empty());
    assert_eq!(a.handle.connected_peers().await.unwrap(), vec![b.peer]);

    // C completed its handshake before A checked the allowlist, so it may see
    // a brief connection; it must end.
    next_matching(
        &mut c.events,
        WAIT,
        "end of the refused connection",
        |event| match event {
            P2pEvent::PeerDisconnected { peer } if peer == a.peer => Some(()),
            P2pEvent::ConnectionFailed { .. } => Some(()),
            _ => None,
        },
    )
    .await;
    assert!(!c.handle.connected_peers().await.unwrap().contains(&a.peer));

    // Outbound, A refuses to dial C at all.
    assert!(matches!(
        a.handle.dial(c.addr.clone()).await,
        Err(P2pError::Dial(_))
    ));
    // Dialing an allowed, connected peer again is a no-op.
    a.handle.dial(b.addr.clone()).await.unwrap();
    drop(b);
}

#[tokio::test]
async fn invalid_config_is_refused() {
    let mut no_peer_id = config(Keypair::generate_ed25519(), Options::default());
    no_peer_id.bootstrap = vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()];
    assert!(matches!(
        spawn(no_peer_id).await,
        Err(P2pError::InvalidAddress(_))
    ));

    let mut zero = config(Keypair::generate_ed25519(), Options::default());
    zero.message_max_bytes = 0;
    assert!(matches!(spawn(zero).await, Err(P2pError::Config(_))));

    let mut udp = config(Keypair::generate_ed25519(), Options::default());
    udp.listen = vec!["/ip4/127.0.0.1/udp/0".parse().unwrap()];
    assert!(matches!(spawn(udp).await, Err(P2pError::InvalidAddress(_))));

    // The key never shows in logs of the config.
    let mut private = config(Keypair::generate_ed25519(), Options::default());
    private.psk = Some([0xee; 32]);
    let shown = format!("{private:?}");
    assert!(
        shown.contains("<redacted>") && !shown.contains("238"),
        "{shown}"
    );
}

/// libp2p-tcp listens with `SO_REUSEPORT`, which would let a second swarm of
/// this user bind the same address; the shell refuses it instead.
#[tokio::test]
async fn a_taken_listen_address_is_refused() {
    let first = start(Keypair::generate_ed25519(), Options::default()).await;
    let bound: Multiaddr = first
        .addr
        .iter()
        .take_while(|p| !matches!(p, Protocol::P2p(_)))
        .collect();
    let mut second = config(Keypair::generate_ed25519(), Options::default());
    second.listen = vec![bound.clone()];
    match spawn(second).await {
        Err(P2pError::Listen { addr, source }) => {
            assert_eq!(addr, bound);
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse, "{source}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a second swarm listens on {bound}"),
    }

    // Once the first has shut down the address is free again.
    first.handle.shutdown().await;
    let mut third = config(Keypair::generate_ed25519(), Options::default());
    third.listen = vec![bound];
    let (handle, _events) = spawn(third).await.unwrap();
    handle.shutdown().await;
}

/// A client of `/vcfed/rpc/1` that writes its requests' bytes as they are,
/// frame or not: what a member with the federation's key but a broken or
/// hostile codec sends.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl libp2p::request_response::Codec for RawCodec {
    type Protocol = libp2p::StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &Self::Protocol, _: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        Err(std::io::Error::other("a client only"))
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        use futures::AsyncReadExt;
        let mut answer = Vec::new();
        io.take(MAX_BYTES as u64 + 4)
            .read_to_end(&mut answer)
            .await?;
        Ok(answer)
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        request: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        use futures::AsyncWriteExt;
        io.write_all(&request).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Err(std::io::Error::other("a client only"))
    }
}

/// Sends `bytes` as one RPC stream from `client` to `to` and waits for the
/// outcome: the response, or the failure as text.
async fn raw_request(
    client: &mut libp2p::Swarm<libp2p::request_response::Behaviour<RawCodec>>,
    to: PeerId,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, String> {
    use futures::StreamExt;
    use libp2p::{request_response::Event, request_response::Message, swarm::SwarmEvent};
    let sent = client.behaviour_mut().send_request(&to, bytes);
    let outcome = async {
        loop {
            match client.select_next_some().await {
                SwarmEvent::Behaviour(Event::Message {
                    message:
                        Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == sent => return Ok(response),
                SwarmEvent::Behaviour(Event::OutboundFailure {
                    request_id, error, ..
                }) if request_id == sent => return Err(error.to_string()),
                _ => {}
            }
        }
    };
    timeout(WAIT, outcome)
        .await
        .expect("the request ends in time")
}

/// A member with the federation's key sends an RPC frame whose length
/// prefix is far over the limit, then one cut short: both are refused (the
/// first after reading its 4-byte prefix only, so nothing near 4 GiB is
/// allocated), counted, and never reach the glue; the connection and the
/// node keep working, and a well-formed request on it arrives.
#[tokio::test]
async fn oversized_and_truncated_rpc_frames_are_refused_and_counted() {
    let key = [0x33; 32];
    let mut server = start(
        Keypair::generate_ed25519(),
        Options {
            psk: Some(key),
            ..Options::default()
        },
    )
    .await;
    let client_key = Keypair::generate_ed25519();
    let client_peer = client_key.public().to_peer_id();
    let transport = task::build_transport(&client_key, Some(key)).unwrap();
    let behaviour = libp2p::request_response::Behaviour::with_codec(
        RawCodec,
        [(
            super::codec::RPC_PROTOCOL,
            libp2p::request_response::ProtocolSupport::Outbound,
        )],
        libp2p::request_response::Config::default().with_request_timeout(WAIT),
    );
    let mut client = libp2p::Swarm::new(
        transport,
        behaviour,
        client_peer,
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(Duration::from_secs(60)),
    );
    let mut server_addr = server.addr.clone();
    server_addr.pop();
    client.add_peer_address(server.peer, server_addr);

    // 4 GiB announced, nothing behind it.
    let oversized = raw_request(&mut client, server.peer, u32::MAX.to_be_bytes().to_vec()).await;
    // No answer: the stream is dropped (an empty read or a failure).
    assert!(
        oversized.as_ref().is_ok_and(Vec::is_empty) || oversized.is_err(),
        "{oversized:?}"
    );
    // 1000 bytes announced, 10 sent, then the stream closes.
    let mut truncated = 1000u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[7; 10]);
    let truncated = raw_request(&mut client, server.peer, truncated).await;
    assert!(
        truncated.as_ref().is_ok_and(Vec::is_empty) || truncated.is_err(),
        "{truncated:?}"
    );

    let deadline = Instant::now() + WAIT;
    loop {
        let stats = server.handle.stats();
        if stats.rpc_frames_oversized == 1 && stats.rpc_frames_truncated == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A frame within the limit, on the same connection, still arrives, and
    // it is the first request the glue sees.
    let mut good = 3u32.to_be_bytes().to_vec();
    good.extend_from_slice(b"abc");
    let request = client.behaviour_mut().send_request(&server.peer, good);
    let (from, data) = {
        use futures::StreamExt;
        let server_events = &mut server.events;
        let pump = async {
            loop {
                tokio::select! {
                    event = server_events.recv() => match event {
                        Some(P2pEvent::Request { peer, data, .. }) => return (peer, data),
                        Some(_) => {}
                        None => panic!("the server stopped"),
                    },
                    _ = client.select_next_some() => {}
                }
            }
        };
        timeout(WAIT, pump).await.expect("the good request arrives")
    };
    assert_eq!((from, data.as_slice()), (client_peer, b"abc".as_slice()));
    let _ = request;
    assert_eq!(
        server.handle.connected_peers().await.unwrap(),
        vec![client_peer]
    );
    let stats = server.handle.stats();
    assert_eq!(
        (stats.rpc_frames_oversized, stats.rpc_frames_truncated),
        (1, 1)
    );
    eprintln!("oversized and truncated RPC frames refused and counted: {stats:?}");
}
