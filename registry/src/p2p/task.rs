//! The swarm task: builds the transport and behaviours, then runs one loop
//! over commands from the handles and events from the swarm.

use std::{
    collections::{BTreeMap, VecDeque},
    error::Error,
    io,
    sync::Arc,
    time::Duration,
};

use either::Either;
use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm, Transport, TransportError, allow_block_list, connection_limits,
    core::{
        muxing::StreamMuxerBox,
        transport::{Boxed, ListenerId},
        upgrade::Version,
    },
    gossipsub, identify,
    identity::Keypair,
    multiaddr::Protocol,
    noise, ping,
    pnet::{PnetConfig, PreSharedKey},
    request_response::{self, ProtocolSupport, ResponseChannel},
    swarm::{
        self, DialError, NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle,
        dial_opts::DialOpts,
    },
    tcp, yamux,
};
use ring::digest;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use super::{
    Counters, GossipId, InboundRequestId, OutboundRequestId, P2pConfig, P2pError, P2pEvent,
    REFUSALS_LOG_INTERVAL,
    codec::{RPC_PROTOCOL, RpcCodec},
};

/// Sent as identify's protocol version; peers announcing another are not
/// vcfed agents of this protocol generation and their addresses are ignored.
const IDENTIFY_PROTOCOL: &str = "/vcfed/id/1";
/// Upper bound on the TCP + pnet + noise + yamux handshake. A peer with a
/// different pre-shared key may only be detected by this timeout, because
/// what it sends decrypts to noise that multistream-select may wait on.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`start`] waits for every listener to report its address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
const PING_INTERVAL: Duration = Duration::from_secs(5);
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Gossipsub's default first heartbeat is after 5 s; a federation agent wants
/// its mesh as soon as the bootstrap connection is up.
const HEARTBEAT_INITIAL_DELAY: Duration = Duration::from_millis(500);
/// Room for what gossipsub wraps around a payload (signature, public key,
/// author, sequence number, topic, protobuf framing); its frame limit is the
/// payload limit plus this.
const GOSSIP_ENVELOPE_BYTES: usize = 1024;
/// Largest payload the length-prefixed codec can carry.
const MESSAGE_LIMIT_BYTES: usize = u32::MAX as usize;
/// Identify lists are remote input: keep at most this many addresses per peer.
const PEER_ADDRS_MAX: usize = 16;
/// Inbound requests waiting for the glue's answer.
const PENDING_RESPONSES_MAX: usize = 1024;
/// Simultaneous dials between two sites can leave two connections; more than
/// that is a misbehaving peer.
const CONNECTIONS_PER_PEER_MAX: u32 = 2;
const CONNECTIONS_MAX: u32 = 512;
const PENDING_INCOMING_MAX: u32 = 64;

/// What a [`super::P2pHandle`] asks of the task; every command carries the
/// channel its answer goes back on.
#[derive(Debug)]
pub(super) enum Command {
    Publish {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), P2pError>>,
    },
    ReportValidation {
        id: GossipId,
        source: PeerId,
        validation: super::Validation,
        reply: oneshot::Sender<()>,
    },
    Request {
        peer: PeerId,
        data: Vec<u8>,
        reply: oneshot::Sender<OutboundRequestId>,
    },
    Respond {
        request: InboundRequestId,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), P2pError>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), P2pError>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// The allowlist comes first so that a refused peer is turned away before any
/// other behaviour sets up state for it.
#[derive(NetworkBehaviour)]
struct Behaviour {
    allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    limits: connection_limits::Behaviour,
    gossipsub: gossipsub::Behaviour,
    rpc: request_response::Behaviour<RpcCodec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Builds the swarm, binds the listeners, dials the bootstrap peers and spawns
/// the task.
pub(super) async fn start(
    config: P2pConfig,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<P2pEvent>,
    counters: Arc<Counters>,
) -> Result<(), P2pError> {
    if config.message_max_bytes == 0 || config.message_max_bytes > MESSAGE_LIMIT_BYTES {
        return Err(P2pError::Config(format!(
            "message_max_bytes must be between 1 and {MESSAGE_LIMIT_BYTES}, got {}",
            config.message_max_bytes
        )));
    }
    let mut bootstrap = Vec::with_capacity(config.bootstrap.len());
    for addr in &config.bootstrap {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(P2pError::InvalidAddress(format!(
                "bootstrap address {addr} does not end in /p2p/<peer id>"
            )));
        };
        bootstrap.push((peer, addr.clone()));
    }

    let local_peer_id = config.keypair.public().to_peer_id();
    let transport = build_transport(&config.keypair, config.psk)?;
    let behaviour = build_behaviour(&config, counters.clone())?;
    let swarm_config = swarm::Config::with_tokio_executor()
        .with_idle_connection_timeout(config.idle_connection_timeout);
    let mut swarm = Swarm::new(transport, behaviour, local_peer_id, swarm_config);

    let topic = gossipsub::IdentTopic::new(config.topic.clone());
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| P2pError::Config(format!("cannot subscribe to {:?}: {e}", config.topic)))?;

    let mut listeners = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
        check_port_free(addr)?;
        match swarm.listen_on(addr.clone()) {
            Ok(id) => listeners.push((id, addr.clone())),
            Err(TransportError::MultiaddrNotSupported(addr)) => {
                return Err(P2pError::InvalidAddress(format!(
                    "cannot listen on {addr}: not a TCP address"
                )));
            }
            Err(TransportError::Other(source)) => {
                return Err(P2pError::Listen {
                    addr: addr.clone(),
                    source,
                });
            }
        }
    }

    let span = tracing::info_span!("p2p", local_peer = %local_peer_id);
    let mut task = Task {
        swarm,
        topic: topic.hash(),
        message_max_bytes: config.message_max_bytes,
        psk_configured: config.psk.is_some(),
        pending_responses: BTreeMap::new(),
        outbox: VecDeque::new(),
        commands,
        events,
        counters,
        refusals_log: RefusalsLog::default(),
    };
    task.wait_for_listeners(listeners)
        .instrument(span.clone())
        .await?;
    span.in_scope(|| {
        for (peer, addr) in bootstrap {
            if let Err(e) = task.dial(addr.clone()) {
                tracing::warn!(%peer, %addr, error = %error_chain(&e), "cannot dial bootstrap peer");
            }
        }
        tracing::info!(
            listen = ?task.swarm.listeners().collect::<Vec<_>>(),
            private = task.psk_configured,
            "p2p started"
        );
    });
    // The swarm is large; boxing keeps the spawned future small.
    tokio::spawn(Box::pin(task.run()).instrument(span));
    Ok(())
}

/// Fails with [`P2pError::Listen`] if the fixed TCP port of `addr` is taken.
///
/// libp2p-tcp binds every listener with `SO_REUSEPORT` (so that dials can
/// leave from the listening port), and Linux lets a second such socket of
/// the same user bind the same address: two agents would then share one
/// federation port, each getting some of the connections. A bind without
/// `SO_REUSEPORT` is refused while any listener holds the address, so one is
/// tried (never listening, so it takes no connection) and closed before
/// libp2p binds. This refuses an agent started while another runs; two
/// agents started in the same instant could both pass, a race this check
/// does not close. Addresses with port 0, or not IP + TCP, are left to
/// libp2p.
fn check_port_free(addr: &Multiaddr) -> Result<(), P2pError> {
    let mut parts = addr.iter();
    let ip: std::net::IpAddr = match parts.next() {
        Some(Protocol::Ip4(ip)) => ip.into(),
        Some(Protocol::Ip6(ip)) => ip.into(),
        _ => return Ok(()),
    };
    let Some(Protocol::Tcp(port)) = parts.next() else {
        return Ok(());
    };
    if port == 0 {
        return Ok(());
    }
    let socket_addr = std::net::SocketAddr::new(ip, port);
    let probe = || -> io::Result<()> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(
            Domain::for_address(socket_addr),
            Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // As libp2p-tcp sets them, so that only a real conflict fails: an
        // IPv6 listener is IPv6 only, and a port in TIME_WAIT is free.
        if socket_addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.bind(&socket_addr.into())
    };
    probe().map_err(|source| P2pError::Listen {
        addr: addr.clone(),
        source,
    })
}

/// TCP, then pnet if there is a key, then noise and yamux.
pub(super) fn build_transport(
    keypair: &Keypair,
    psk: Option<[u8; 32]>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, P2pError> {
    let noise = noise::Config::new(keypair).map_err(|e| P2pError::Transport(error_chain(&e)))?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let base = match psk {
        Some(key) => {
            let pnet = PnetConfig::new(PreSharedKey::new(key));
            Either::Left(tcp.and_then(move |socket, _| pnet.handshake(socket)))
        }
        None => Either::Right(tcp),
    };
    Ok(base
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .timeout(HANDSHAKE_TIMEOUT)
        .boxed())
}

fn build_behaviour(config: &P2pConfig, counters: Arc<Counters>) -> Result<Behaviour, P2pError> {
    let allow = config.allow_peers.as_ref().map(|peers| {
        let mut allow = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for peer in peers {
            allow.allow_peer(*peer);
        }
        allow
    });

    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_pending_incoming(Some(PENDING_INCOMING_MAX))
            .with_max_established(Some(CONNECTIONS_MAX))
            .with_max_established_per_peer(Some(CONNECTIONS_PER_PEER_MAX)),
    );

    // Mesh sizes for federations of a handful of sites: a mesh forms with a
    // single other subscriber and stays small; publishing floods to every
    // subscribed peer anyway (gossipsub's default `flood_publish`).
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(HEARTBEAT_INTERVAL)
        .heartbeat_initial_delay(HEARTBEAT_INITIAL_DELAY)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(|message: &gossipsub::Message| {
            gossipsub::MessageId::from(digest::digest(&digest::SHA256, &message.data).as_ref())
        })
        .max_transmit_size(
            config
                .message_max_bytes
                .saturating_add(GOSSIP_ENVELOPE_BYTES),
        )
        .mesh_outbound_min(1)
        .mesh_n_low(1)
        .mesh_n(4)
        .mesh_n_high(8)
        .gossip_lazy(4)
        .build()
        .map_err(|e| P2pError::Config(format!("gossipsub: {e}")))?;
    let gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(config.keypair.clone()),
        gossip_config,
    )
    .map_err(|e| P2pError::Config(format!("gossipsub: {e}")))?;

    let rpc = request_response::Behaviour::with_codec(
        RpcCodec::new(config.message_max_bytes, counters),
        [(RPC_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(config.request_timeout),
    );

    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), config.keypair.public())
            .with_agent_version(format!("vcfed/{}", env!("CARGO_PKG_VERSION"))),
    );

    let ping = ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL));

    Ok(Behaviour {
        allow: Toggle::from(allow),
        limits,
        gossipsub,
        rpc,
        identify,
        ping,
    })
}

/// What one turn of the task loop produced.
// It lives on the stack for one turn; boxing the swarm event would allocate
// once per network event.
#[allow(clippy::large_enum_variant)]
enum Step {
    Command(Option<Command>),
    Delivered,
    ReceiverDropped,
    Swarm(SwarmEvent<BehaviourEvent>),
}

struct Task {
    swarm: Swarm<Behaviour>,
    topic: gossipsub::TopicHash,
    message_max_bytes: usize,
    psk_configured: bool,
    /// Response channels of inbound requests the glue has not answered yet,
    /// at most [`PENDING_RESPONSES_MAX`].
    pending_responses: BTreeMap<request_response::InboundRequestId, ResponseChannel<Vec<u8>>>,
    /// Events translated from the swarm, not yet accepted by the event
    /// channel. The swarm is only polled while this is empty, which bounds it
    /// to what one swarm event produces.
    outbox: VecDeque<P2pEvent>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<P2pEvent>,
    counters: Arc<Counters>,
    refusals_log: RefusalsLog,
}

/// Failed inbound connections not yet told in the log, and when the last
/// line was: at most one info line per [`REFUSALS_LOG_INTERVAL`].
#[derive(Debug, Default)]
struct RefusalsLog {
    last_line: Option<tokio::time::Instant>,
    untold: u64,
}

impl RefusalsLog {
    /// One more refusal, `error` saying why; logs a line if one is due.
    fn refused(&mut self, error: &str) {
        self.untold += 1;
        let now = tokio::time::Instant::now();
        if self
            .last_line
            .is_some_and(|at| now.duration_since(at) < REFUSALS_LOG_INTERVAL)
        {
            return;
        }
        tracing::info!(
            refused = self.untold,
            last_error = %error,
            "inbound federation connections refused since the last such line"
        );
        self.untold = 0;
        self.last_line = Some(now);
    }
}

impl Task {
    async fn run(mut self) {
        let shutdown_reply = loop {
            // The branches borrow disjoint fields; the chosen one is handled
            // after the select, when `self` is free again.
            let step = tokio::select! {
                command = self.commands.recv() => Step::Command(command),
                permit = self.events.reserve(), if !self.outbox.is_empty() => match permit {
                    Ok(permit) => {
                        let event = self
                            .outbox
                            .pop_front()
                            .expect("this branch only runs while the outbox is non-empty");
                        permit.send(event);
                        Step::Delivered
                    }
                    Err(_) => Step::ReceiverDropped,
                },
                event = self.swarm.select_next_some(), if self.outbox.is_empty() => Step::Swarm(event),
            };
            match step {
                Step::Command(Some(Command::Shutdown { reply })) => break Some(reply),
                Step::Command(Some(command)) => self.on_command(command),
                Step::Command(None) => {
                    tracing::debug!("every p2p handle dropped; stopping");
                    break None;
                }
                Step::Delivered => {}
                Step::ReceiverDropped => {
                    tracing::info!("p2p event receiver dropped; stopping");
                    break None;
                }
                Step::Swarm(event) => self.on_swarm_event(event),
            }
        };
        // Dropping the swarm closes every listener and connection; only then
        // is `shutdown` answered.
        drop(self);
        if let Some(reply) = shutdown_reply {
            answer(reply, ());
        }
        tracing::info!("p2p stopped");
    }

    /// Polls the swarm until every listener has reported a bound address.
    async fn wait_for_listeners(
        &mut self,
        mut waiting: Vec<(ListenerId, Multiaddr)>,
    ) -> Result<(), P2pError> {
        let deadline = tokio::time::Instant::now() + LISTEN_TIMEOUT;
        while let Some((_, first_addr)) = waiting.first() {
            let Ok(event) = tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await
            else {
                return Err(P2pError::Listen {
                    addr: first_addr.clone(),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no bound address after {LISTEN_TIMEOUT:?}"),
                    ),
                });
            };
            match &event {
                SwarmEvent::NewListenAddr { listener_id, .. } => {
                    waiting.retain(|(id, _)| id != listener_id);
                }
                SwarmEvent::ListenerClosed {
                    listener_id,
                    reason,
                    ..
                } => {
                    if let Some((_, addr)) = waiting.iter().find(|(id, _)| id == listener_id) {
                        let source = match reason {
                            Err(e) => io::Error::new(e.kind(), e.to_string()),
                            Ok(()) => io::Error::other("listener closed"),
                        };
                        return Err(P2pError::Listen {
                            addr: addr.clone(),
                            source,
                        });
                    }
                }
                _ => {}
            }
            self.on_swarm_event(event);
        }
        Ok(())
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish { data, reply } => {
                let result = self.publish(data);
                answer(reply, result);
            }
            Command::ReportValidation {
                id,
                source,
                validation,
                reply,
            } => {
                let acceptance = match validation {
                    super::Validation::Accept => gossipsub::MessageAcceptance::Accept,
                    super::Validation::Ignore => gossipsub::MessageAcceptance::Ignore,
                    super::Validation::Reject => gossipsub::MessageAcceptance::Reject,
                };
                let cached = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id.0, &source, acceptance);
                if !cached {
                    tracing::debug!(message_id = %id, peer = %source, ?validation, "validated message no longer cached");
                }
                answer(reply, ());
            }
            Command::Request { peer, data, reply } => {
                let bytes = data.len();
                let request = self.swarm.behaviour_mut().rpc.send_request(&peer, data);
                tracing::trace!(%peer, %request, bytes, "request sent");
                answer(reply, OutboundRequestId(request));
            }
            Command::Respond {
                request,
                data,
                reply,
            } => {
                let result = self.respond(request, data);
                answer(reply, result);
            }
            Command::Dial { addr, reply } => {
                let result = self.dial(addr);
                answer(reply, result);
            }
            Command::ConnectedPeers { reply } => {
                // The swarm keeps peers in a hash map; sort for a stable answer.
                let mut peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                peers.sort();
                answer(reply, peers);
            }
            Command::ListenAddrs { reply } => {
                answer(reply, self.swarm.listeners().cloned().collect());
            }
            Command::Shutdown { reply } => {
                // `run` intercepts shutdown before dispatching here.
                answer(reply, ());
            }
        }
    }

    fn publish(&mut self, data: Vec<u8>) -> Result<(), P2pError> {
        let len = data.len();
        if len > self.message_max_bytes {
            return Err(P2pError::MessageTooLarge {
                len,
                max: self.message_max_bytes,
            });
        }
        let topic = self.topic.clone();
        match self.swarm.behaviour_mut().gossipsub.publish(topic, data) {
            Ok(id) => {
                tracing::trace!(message_id = %id, bytes = len, "published");
                Ok(())
            }
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                tracing::debug!(
                    bytes = len,
                    "no peer subscribed to the topic yet; not published"
                );
                Ok(())
            }
            Err(gossipsub::PublishError::Duplicate) => {
                tracing::debug!(
                    bytes = len,
                    "identical message published recently; not re-sent"
                );
                Ok(())
            }
            Err(gossipsub::PublishError::MessageTooLarge) => Err(P2pError::MessageTooLarge {
                len,
                max: self.message_max_bytes,
            }),
            Err(e) => Err(P2pError::Publish(error_chain(&e))),
        }
    }

    fn respond(&mut self, request: InboundRequestId, data: Vec<u8>) -> Result<(), P2pError> {
        if data.len() > self.message_max_bytes {
            // The channel stays pending, so the glue can still answer with a
            // smaller payload.
            return Err(P2pError::MessageTooLarge {
                len: data.len(),
                max: self.message_max_bytes,
            });
        }
        let Some(channel) = self.pending_responses.remove(&request.0) else {
            return Err(P2pError::UnknownRequest(request));
        };
        let bytes = data.len();
        self.swarm
            .behaviour_mut()
            .rpc
            .send_response(channel, data)
            .map_err(|_| P2pError::UnknownRequest(request))?;
        tracing::trace!(%request, bytes, "response queued");
        Ok(())
    }

    fn dial(&mut self, addr: Multiaddr) -> Result<(), P2pError> {
        let opts = match addr.iter().last() {
            Some(Protocol::P2p(peer)) => {
                let mut bare = addr.clone();
                bare.pop();
                // Remembered so that a later request to this peer can redial.
                self.swarm.add_peer_address(peer, bare.clone());
                DialOpts::peer_id(peer).addresses(vec![bare]).build()
            }
            _ => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        match self.swarm.dial(opts) {
            Ok(()) => {
                tracing::debug!(%addr, "dialing");
                Ok(())
            }
            Err(DialError::DialPeerConditionFalse(_)) => {
                tracing::debug!(%addr, "already connected or dialing");
                Ok(())
            }
            Err(e) => Err(P2pError::Dial(format!("{addr}: {}", error_chain(&e)))),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.outbox.push_back(P2pEvent::Listening { addr: address });
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                tracing::info!(%address, "listen address expired");
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => match reason {
                Ok(()) => tracing::info!(?addresses, "listener closed"),
                Err(e) => tracing::warn!(?addresses, error = %error_chain(&e), "listener failed"),
            },
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(error = %error_chain(&error), "listener error");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                tracing::debug!(peer = %peer_id, %addr, connections = num_established.get(), "connection established");
                if num_established.get() == 1 {
                    self.outbox.push_back(P2pEvent::PeerConnected {
                        peer: peer_id,
                        addr,
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                let cause = cause.map(|e| error_chain(&e));
                tracing::debug!(peer = %peer_id, connections = num_established, ?cause, "connection closed");
                if num_established == 0 {
                    self.outbox
                        .push_back(P2pEvent::PeerDisconnected { peer: peer_id });
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => {
                let counter = match &error {
                    swarm::ListenError::Transport(_) | swarm::ListenError::WrongPeerId { .. } => {
                        &self.counters.inbound_handshake_failed
                    }
                    swarm::ListenError::Denied { .. } => &self.counters.inbound_denied,
                    _ => &self.counters.inbound_failed_other,
                };
                Counters::count(counter);
                let error = self.describe_connection_error(&error);
                tracing::debug!(peer = ?peer_id, %send_back_addr, %error, "inbound connection failed");
                self.refusals_log.refused(&error);
                self.outbox.push_back(P2pEvent::ConnectionFailed {
                    peer: peer_id,
                    error,
                });
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let error = self.describe_connection_error(&error);
                tracing::info!(peer = ?peer_id, %error, "outbound connection failed");
                self.outbox.push_back(P2pEvent::ConnectionFailed {
                    peer: peer_id,
                    error,
                });
            }
            other => tracing::trace!(event = ?other, "swarm event"),
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Allow(never) | BehaviourEvent::Limits(never) => match never {},
            BehaviourEvent::Gossipsub(event) => self.on_gossipsub_event(event),
            BehaviourEvent::Rpc(event) => self.on_rpc_event(event),
            BehaviourEvent::Identify(event) => self.on_identify_event(event),
            BehaviourEvent::Ping(ping::Event { peer, result, .. }) => match result {
                Ok(rtt) => {
                    tracing::trace!(%peer, ?rtt, "ping");
                    self.outbox.push_back(P2pEvent::Rtt { peer, rtt });
                }
                Err(e) => tracing::debug!(%peer, error = %error_chain(&e), "ping failed"),
            },
        }
    }

    fn on_gossipsub_event(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                if message.data.len() > self.message_max_bytes {
                    // Only possible within the envelope allowance of the frame
                    // limit; such a message is invalid for every peer.
                    tracing::debug!(peer = %propagation_source, %message_id, bytes = message.data.len(), "oversized gossip rejected");
                    Counters::count(&self.counters.gossip_oversized);
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            gossipsub::MessageAcceptance::Reject,
                        );
                    return;
                }
                tracing::trace!(peer = %propagation_source, %message_id, bytes = message.data.len(), "gossip received");
                self.outbox.push_back(P2pEvent::Gossip {
                    id: GossipId(message_id),
                    source: propagation_source,
                    data: message.data,
                });
            }
            gossipsub::Event::Subscribed { peer_id, topic } => {
                tracing::debug!(peer = %peer_id, %topic, "peer subscribed");
            }
            gossipsub::Event::Unsubscribed { peer_id, topic } => {
                tracing::debug!(peer = %peer_id, %topic, "peer unsubscribed");
            }
            gossipsub::Event::GossipsubNotSupported { peer_id } => {
                tracing::info!(peer = %peer_id, "peer does not speak gossipsub");
            }
            gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            } => {
                tracing::debug!(peer = %peer_id, ?failed_messages, "slow gossip peer");
            }
        }
    }

    fn on_rpc_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request_id,
                    request,
                    channel,
                } => {
                    if self.pending_responses.len() >= PENDING_RESPONSES_MAX {
                        self.pending_responses
                            .retain(|_, channel| channel.is_open());
                    }
                    if self.pending_responses.len() >= PENDING_RESPONSES_MAX {
                        // Dropping the channel tells the peer it gets no answer.
                        tracing::debug!(%peer, %request_id, "too many unanswered requests; request refused");
                        Counters::count(&self.counters.rpc_requests_refused);
                        return;
                    }
                    tracing::trace!(%peer, %request_id, bytes = request.len(), "request received");
                    self.pending_responses.insert(request_id, channel);
                    self.outbox.push_back(P2pEvent::Request {
                        peer,
                        request: InboundRequestId(request_id),
                        data: request,
                    });
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    tracing::trace!(%peer, %request_id, bytes = response.len(), "response received");
                    self.outbox.push_back(P2pEvent::Response {
                        peer,
                        request: OutboundRequestId(request_id),
                        data: response,
                    });
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let error = error_chain(&error);
                tracing::debug!(%peer, %request_id, %error, "request failed");
                self.outbox.push_back(P2pEvent::RequestFailed {
                    peer,
                    request: OutboundRequestId(request_id),
                    error,
                });
            }
            request_response::Event::InboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.pending_responses.remove(&request_id);
                tracing::debug!(%peer, %request_id, error = %error_chain(&error), "inbound request failed");
            }
            request_response::Event::ResponseSent {
                peer, request_id, ..
            } => {
                tracing::trace!(%peer, %request_id, "response sent");
            }
        }
    }

    fn on_identify_event(&mut self, event: identify::Event) {
        match event {
            identify::Event::Received { peer_id, info, .. } => {
                if info.protocol_version != IDENTIFY_PROTOCOL {
                    tracing::debug!(peer = %peer_id, protocol = %info.protocol_version, "peer speaks another protocol; addresses ignored");
                    return;
                }
                let addrs: Vec<Multiaddr> =
                    info.listen_addrs.into_iter().take(PEER_ADDRS_MAX).collect();
                tracing::debug!(peer = %peer_id, agent = %info.agent_version, ?addrs, "identified");
                for addr in &addrs {
                    self.swarm.add_peer_address(peer_id, addr.clone());
                }
                self.outbox.push_back(P2pEvent::PeerAddresses {
                    peer: peer_id,
                    addrs,
                });
            }
            identify::Event::Error { peer_id, error, .. } => {
                tracing::debug!(peer = %peer_id, error = %error_chain(&error), "identify failed");
            }
            identify::Event::Sent { .. } | identify::Event::Pushed { .. } => {}
        }
    }

    fn describe_connection_error(&self, error: &dyn Error) -> String {
        let error = error_chain(error);
        // A mismatched pre-shared key shows up as a garbled or stalled
        // handshake; say so, since nothing in the chain will.
        let lower = error.to_lowercase();
        let handshake_failed = ["timeout", "timed out", "negotiat", "handshake", "noise"]
            .iter()
            .any(|word| lower.contains(word));
        if self.psk_configured && handshake_failed {
            format!("{error} (check that both sites use the same pre-shared key)")
        } else {
            error
        }
    }
}

/// Sends a command's answer; the asking handle may have given up waiting,
/// which is fine.
fn answer<T>(reply: oneshot::Sender<T>, value: T) {
    if reply.send(value).is_err() {
        tracing::trace!("p2p command answer dropped: the caller stopped waiting");
    }
}

/// Formats an error with its sources, since libp2p's outer errors often say
/// little on their own ("Failed to negotiate transport protocol(s)").
fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
