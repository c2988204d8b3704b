//! libp2p shell of the registry: moves opaque byte payloads between sites.
//!
//! This module knows nothing about adverts, digests or signatures; the
//! sans-IO core decides what the bytes mean. It owns one libp2p swarm:
//!
//! - transport: TCP, optionally wrapped in libp2p pnet (a pre-shared key:
//!   a peer without the same key cannot complete a handshake), then noise and
//!   yamux;
//! - an optional peer-id allowlist (`allow_block_list`), enforced on inbound
//!   and outbound connections once the remote's identity is known;
//! - gossipsub on one topic, signed messages, message id = SHA-256 of the
//!   payload (identical payloads dedupe), manual validation: a received
//!   message is held and not forwarded until the glue calls
//!   [`P2pHandle::report_validation`];
//! - request-response on `/vcfed/rpc/1` with a length-prefixed codec;
//! - identify (`/vcfed/id/1`) to learn peers' listen addresses, ping for RTT.
//!
//! # Contract
//!
//! [`spawn`] starts one tokio task that owns the swarm. The glue talks to it
//! through a [`P2pHandle`] (a bounded command channel; every call waits for
//! the task's answer) and reads [`P2pEvent`]s from a bounded receiver.
//!
//! Backpressure, not loss: when the event receiver is full, the task stops
//! polling the network (so libp2p's own bounded buffers, then TCP, push back
//! on peers) but keeps answering commands, so the glue may call the handle
//! from the same loop that reads events without deadlocking. No event is
//! dropped by this module.
//!
//! The task ends, closing every connection, when [`P2pHandle::shutdown`] is
//! called, when every handle is dropped, or when the event receiver is
//! dropped. Handle calls then fail with [`P2pError::Closed`].
//!
//! Payload limits: `message_max_bytes` bounds gossip payloads and RPC
//! requests and responses. Oversized local payloads are refused with
//! [`P2pError::MessageTooLarge`]; oversized remote payloads are refused by the
//! decoder before allocation (RPC) or by gossipsub's frame limit and then
//! rejected (gossip), and never surface as events.
//!
//! Refusals are counted ([`P2pHandle::stats`]): failed and denied inbound
//! connections, oversized and truncated RPC frames, refused requests,
//! oversized gossip. Failed inbound connections are logged at info at most
//! once per [`REFUSALS_LOG_INTERVAL`] with their number since the last line
//! (each one at debug), so that a flood of them cannot flood the log.

pub mod codec;
mod psk;
mod task;

use std::{
    collections::BTreeSet,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use libp2p::{Multiaddr, PeerId, gossipsub, identity::Keypair, request_response};
use tokio::sync::{mpsc, oneshot};

pub use self::psk::{format_psk, parse_psk};

/// Capacity of the event channel handed to the glue.
pub const EVENTS_MAX: usize = 1024;
/// Shortest interval between two info lines about refused inbound
/// connections.
pub const REFUSALS_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Capacity of the command channel behind every [`P2pHandle`].
const COMMANDS_MAX: usize = 256;

/// Everything the swarm needs; the glue builds it from the site config.
#[derive(Clone)]
pub struct P2pConfig {
    /// Identity of this site; its peer id is what other sites allowlist.
    pub keypair: Keypair,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/4001`.
    pub listen: Vec<Multiaddr>,
    /// Peers dialed at start; each address must end in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Pre-shared key of a private federation: libp2p pnet wraps TCP, and a
    /// peer without the same key cannot connect at all.
    pub psk: Option<[u8; 32]>,
    /// If set, connections from or to any other peer id are refused.
    pub allow_peers: Option<BTreeSet<PeerId>>,
    /// Gossipsub topic, e.g. `vcfed/adverts/1`.
    pub topic: String,
    /// Largest gossip payload and RPC request or response, in bytes.
    pub message_max_bytes: usize,
    /// How long an RPC may take, from sending the request to the response.
    pub request_timeout: Duration,
    /// How long an idle connection stays open; keep it above a minute so the
    /// gossip mesh survives quiet periods.
    pub idle_connection_timeout: Duration,
}

impl fmt::Debug for P2pConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pre-shared key is a secret: show only whether there is one.
        f.debug_struct("P2pConfig")
            .field("peer_id", &self.keypair.public().to_peer_id())
            .field("listen", &self.listen)
            .field("bootstrap", &self.bootstrap)
            .field("psk", &self.psk.map(|_| "<redacted>"))
            .field("allow_peers", &self.allow_peers)
            .field("topic", &self.topic)
            .field("message_max_bytes", &self.message_max_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("idle_connection_timeout", &self.idle_connection_timeout)
            .finish()
    }
}

/// What the swarm reports to the glue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum P2pEvent {
    /// A listener is bound to this address (port 0 resolved).
    Listening { addr: Multiaddr },
    /// The first connection to `peer` is up. `addr` is the remote address of
    /// that connection: the dialed address, or the peer's ephemeral source
    /// address for an inbound connection.
    PeerConnected { peer: PeerId, addr: Multiaddr },
    /// The last connection to `peer` closed.
    PeerDisconnected { peer: PeerId },
    /// Identify told us the peer's listen addresses (so the glue can remember
    /// them). They are also added to the swarm's address book.
    PeerAddresses { peer: PeerId, addrs: Vec<Multiaddr> },
    /// A ping round trip to `peer`.
    Rtt { peer: PeerId, rtt: Duration },
    /// A gossipsub message from `source`, the peer that forwarded it to us
    /// (not necessarily its author). It is NOT forwarded until the glue calls
    /// [`P2pHandle::report_validation`] with this id and source, which must
    /// happen within about 5 s (gossipsub's message cache: 5 heartbeats of
    /// 1 s); later reports are accepted but forward nothing.
    Gossip {
        id: GossipId,
        source: PeerId,
        data: Vec<u8>,
    },
    /// An inbound request; answer with [`P2pHandle::respond`] before
    /// `request_timeout`.
    Request {
        peer: PeerId,
        request: InboundRequestId,
        data: Vec<u8>,
    },
    /// The response to a request made with [`P2pHandle::request`].
    Response {
        peer: PeerId,
        request: OutboundRequestId,
        data: Vec<u8>,
    },
    /// A request made with [`P2pHandle::request`] got no response: dial
    /// failure, timeout, connection closed, or a payload refused by a codec.
    RequestFailed {
        peer: PeerId,
        request: OutboundRequestId,
        error: String,
    },
    /// A dial or inbound connection failed (wrong PSK, refused, not allowed,
    /// unreachable). For logs and tests.
    ConnectionFailed { peer: Option<PeerId>, error: String },
}

/// The outcome of validating a gossip message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validation {
    /// Valid and new: forward it.
    Accept,
    /// Valid but not worth forwarding (a duplicate, an older version): drop
    /// it without penalising the peer that sent it.
    Ignore,
    /// Invalid (forged, undecodable): drop it and penalise the sender.
    Reject,
}

/// Identifies a received gossip message for [`P2pHandle::report_validation`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GossipId(gossipsub::MessageId);

impl fmt::Display for GossipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Identifies an inbound request for [`P2pHandle::respond`]; unique per swarm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InboundRequestId(request_response::InboundRequestId);

impl fmt::Display for InboundRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Identifies an outbound request; comes back in [`P2pEvent::Response`] or
/// [`P2pEvent::RequestFailed`]. Unique per swarm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutboundRequestId(request_response::OutboundRequestId);

impl fmt::Display for OutboundRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Errors of the libp2p shell.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    /// A configuration value cannot work (zero or oversized message limit,
    /// parameters gossipsub refuses, an unusable topic).
    #[error("invalid p2p configuration: {0}")]
    Config(String),
    /// The transport could not be built (noise could not use the keypair).
    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),
    /// Listening on a configured address failed or did not come up in time.
    #[error("cannot listen on {addr}")]
    Listen {
        addr: Multiaddr,
        #[source]
        source: std::io::Error,
    },
    /// An address is unusable: a bootstrap address without `/p2p/<peer id>`,
    /// or one the transport does not support (only TCP is built in).
    #[error("invalid address: {0}")]
    InvalidAddress(String),
    /// A dial was refused before any packet was sent (peer not allowed, no
    /// address known, dialing ourselves). Failures later in the handshake
    /// arrive as [`P2pEvent::ConnectionFailed`].
    #[error("cannot dial: {0}")]
    Dial(String),
    /// A payload is larger than `message_max_bytes`.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    /// Gossipsub refused to publish for a reason other than size or the lack
    /// of subscribed peers (signing failed, every peer's queue is full).
    #[error("cannot publish: {0}")]
    Publish(String),
    /// [`P2pHandle::respond`] named a request that is unknown, already
    /// answered, timed out, or whose connection closed.
    #[error("inbound request {0} is unknown, already answered or expired")]
    UnknownRequest(InboundRequestId),
    /// A pre-shared key file is not in the `/key/swarm/psk/1.0.0/` format.
    #[error("invalid pre-shared key file: {0}")]
    InvalidPsk(String),
    /// The swarm task has stopped (shut down, or the event receiver or every
    /// handle was dropped).
    #[error("the p2p task has stopped")]
    Closed,
}

/// What the shell refused since it started: remote input it dropped before
/// the glue saw it. Counters only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct P2pStats {
    /// Inbound connections whose handshake failed: no or another pre-shared
    /// key, not libp2p at all, or too slow (the handshake timeout).
    pub inbound_handshake_failed: u64,
    /// Inbound connections denied: over a connection limit, or a peer not
    /// on the allowlist.
    pub inbound_denied: u64,
    /// Inbound connections that failed otherwise (aborted, our own id).
    pub inbound_failed_other: u64,
    /// RPC frames (requests or responses) whose length prefix exceeded the
    /// limit: refused before anything was allocated for them.
    pub rpc_frames_oversized: u64,
    /// RPC frames whose stream ended before the announced length.
    pub rpc_frames_truncated: u64,
    /// Inbound requests refused because too many awaited an answer.
    pub rpc_requests_refused: u64,
    /// Gossip messages over the payload limit, rejected.
    pub gossip_oversized: u64,
}

/// The live counters behind [`P2pStats`], shared by the swarm task, its
/// codecs and the handles.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    inbound_handshake_failed: AtomicU64,
    inbound_denied: AtomicU64,
    inbound_failed_other: AtomicU64,
    rpc_frames_oversized: AtomicU64,
    rpc_frames_truncated: AtomicU64,
    rpc_requests_refused: AtomicU64,
    gossip_oversized: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> P2pStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        P2pStats {
            inbound_handshake_failed: read(&self.inbound_handshake_failed),
            inbound_denied: read(&self.inbound_denied),
            inbound_failed_other: read(&self.inbound_failed_other),
            rpc_frames_oversized: read(&self.rpc_frames_oversized),
            rpc_frames_truncated: read(&self.rpc_frames_truncated),
            rpc_requests_refused: read(&self.rpc_requests_refused),
            gossip_oversized: read(&self.gossip_oversized),
        }
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Cheap, cloneable access to the swarm task.
#[derive(Clone, Debug)]
pub struct P2pHandle {
    commands: mpsc::Sender<task::Command>,
    local_peer_id: PeerId,
    message_max_bytes: usize,
    counters: Arc<Counters>,
}

impl P2pHandle {
    /// This site's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// What the shell refused so far. Read without asking the task, so it
    /// answers even while the task is busy.
    pub fn stats(&self) -> P2pStats {
        self.counters.snapshot()
    }

    /// Publishes `data` on the topic, to every connected peer subscribed to
    /// it. Having no subscribed peer yet is not an error (the message is
    /// simply not sent; logged at debug), nor is publishing bytes identical
    /// to a message seen in the last minute (gossipsub's duplicate window;
    /// peers would drop it anyway): both return `Ok` without sending.
    pub async fn publish(&self, data: Vec<u8>) -> Result<(), P2pError> {
        self.check_size(data.len())?;
        self.call(|reply| task::Command::Publish { data, reply })
            .await?
    }

    /// Tells gossipsub what to do with a received message: accepted messages
    /// are forwarded to the mesh, ignored ones are dropped, rejected ones are
    /// dropped and count against `source`. Reporting a message that has left
    /// the cache is not an error.
    pub async fn report_validation(
        &self,
        id: GossipId,
        source: PeerId,
        validation: Validation,
    ) -> Result<(), P2pError> {
        self.call(|reply| task::Command::ReportValidation {
            id,
            source,
            validation,
            reply,
        })
        .await
    }

    /// Sends a request to `peer`, dialing it if needed (from addresses the
    /// swarm knows). The result arrives as [`P2pEvent::Response`] or
    /// [`P2pEvent::RequestFailed`] with the returned id.
    pub async fn request(
        &self,
        peer: PeerId,
        data: Vec<u8>,
    ) -> Result<OutboundRequestId, P2pError> {
        self.check_size(data.len())?;
        self.call(|reply| task::Command::Request { peer, data, reply })
            .await
    }

    /// Answers an inbound request. Each request can be answered once.
    pub async fn respond(&self, request: InboundRequestId, data: Vec<u8>) -> Result<(), P2pError> {
        self.check_size(data.len())?;
        self.call(|reply| task::Command::Respond {
            request,
            data,
            reply,
        })
        .await?
    }

    /// Dials `addr`. With a `/p2p/<peer id>` suffix the remote must prove that
    /// identity, and the address is remembered for later requests. Dialing a
    /// peer that is already connected or being dialed is a no-op.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), P2pError> {
        self.call(|reply| task::Command::Dial { addr, reply })
            .await?
    }

    /// Peers with at least one open connection, sorted.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, P2pError> {
        self.call(|reply| task::Command::ConnectedPeers { reply })
            .await
    }

    /// Addresses the listeners are actually bound to (port 0 resolved).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, P2pError> {
        self.call(|reply| task::Command::ListenAddrs { reply })
            .await
    }

    /// Stops the swarm task and waits until its connections and listeners are
    /// closed. Does nothing if it has already stopped.
    pub async fn shutdown(&self) {
        if self
            .call(|reply| task::Command::Shutdown { reply })
            .await
            .is_err()
        {
            tracing::debug!("p2p task already stopped");
        }
    }

    fn check_size(&self, len: usize) -> Result<(), P2pError> {
        if len > self.message_max_bytes {
            return Err(P2pError::MessageTooLarge {
                len,
                max: self.message_max_bytes,
            });
        }
        Ok(())
    }

    async fn call<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> task::Command,
    ) -> Result<T, P2pError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| P2pError::Closed)?;
        answer.await.map_err(|_| P2pError::Closed)
    }
}

/// Builds the swarm, starts listening and dialing bootstrap peers, and spawns
/// the swarm task on the current tokio runtime.
///
/// Returns once every listener is bound, so [`P2pHandle::listen_addrs`] is
/// complete right away (their [`P2pEvent::Listening`] events are the first
/// on the receiver). A bootstrap peer that cannot be reached is not an error:
/// it shows up as [`P2pEvent::ConnectionFailed`].
///
/// Events arrive on the returned receiver (capacity [`EVENTS_MAX`]); when the
/// glue is slow the task waits rather than dropping events (see the module
/// docs).
pub async fn spawn(config: P2pConfig) -> Result<(P2pHandle, mpsc::Receiver<P2pEvent>), P2pError> {
    let (commands_tx, commands_rx) = mpsc::channel(COMMANDS_MAX);
    let (events_tx, events_rx) = mpsc::channel(EVENTS_MAX);
    let counters = Arc::new(Counters::default());
    let handle = P2pHandle {
        commands: commands_tx,
        local_peer_id: config.keypair.public().to_peer_id(),
        message_max_bytes: config.message_max_bytes,
        counters: counters.clone(),
    };
    task::start(config, commands_rx, events_tx, counters).await?;
    Ok((handle, events_rx))
}

#[cfg(test)]
mod tests;
