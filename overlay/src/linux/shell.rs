//! The gateway's event loop: TAP devices and the UDP socket in, the
//! [`Gateway`] in the middle, datagrams and frames out.
//!
//! One task owns the gateway and the devices. It waits until the socket or
//! a TAP is readable, then reads what is there without waiting, up to
//! [`INPUT_BATCH_MAX`] packets or [`INPUT_BATCH_BYTES`], handing each to the gateway and sending the
//! outputs at once; between batches it ticks the gateway's timers every
//! [`TIMER_TICK_MS`]. Packets are read into one reused buffer: nothing is
//! queued in user space, so when the loop falls behind, the kernel's socket
//! and TAP queues fill and the kernel drops, before any work is spent on
//! the packet.
//!
//! With a busy-poll window ([`GatewayConfig::busy_poll`]), the loop does not
//! sleep for that long after the last packet: it asks the reactor again
//! without waiting, yielding the core to any other runnable thread between
//! asks. An idle gateway pays a wake-up of its thread for every packet, and
//! on a virtual machine whose idle vCPUs halt each wake-up costs tens of
//! microseconds (four per ping between two sites); polling removes them at
//! the price of a busy core while packets keep coming.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::task::Poll;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::Instrument;

use tokio::sync::watch;

use super::netlink::Links;
use super::tap::{BULK_QUEUE, INTERACTIVE_QUEUE, Tap};
use super::udp::{self, Sockets};
use super::{
    BUSY_POLL_MAX, Carried, CarriedSegment, GatewayBase, GatewayConfig, GatewayReport,
    INNER_MTU_MAX, INNER_MTU_MIN, NICE_MAX, NICE_MIN, SegmentLinkNames, ShellError, link_names,
};
use crate::gateway::{
    DATAGRAM_LEN_MAX, Gateway, GatewayStats, Output, Outputs, PEERS_MAX, PeerConfig, TIMER_TICK_MS,
};
use crate::offload::{self, SUPER_FRAME_LEN_MAX};
use crate::switch::{PeerIndex, SwitchConfig};

/// Packets read from one device in a row before the loop looks at its
/// timers and the other devices again.
pub const INPUT_BATCH_MAX: usize = 64;
/// Bytes read from one device in a row, at most (one read more may pass
/// it): a device busy with super-frames hands the loop back after about
/// 0.2 ms of work, so that a ping or an ACK waiting at another device is
/// not stuck behind megabytes of bulk transfer.
pub const INPUT_BATCH_BYTES: usize = 256 << 10;
/// Messages one read of the UDP socket takes (`recvmmsg`); each may hold
/// many datagrams coalesced by UDP GRO.
const RECV_BATCH: usize = 4;
/// Outputs are sent once this many bytes wait, and at the end of every
/// batch of input.
const FLUSH_BYTES: usize = 256 << 10;
/// How long one flush waits, in all, for room in the socket's buffer before
/// the datagrams left are counted as send errors.
const SEND_WAIT_MAX: Duration = Duration::from_millis(200);
/// Segments (TAP devices) one gateway carries, at most.
pub const SEGMENTS_MAX: usize = 256;
/// Bytes read from the interactive socket in a row, at most: its datagrams
/// go first, but a peer that marks everything interactive must not starve
/// the rest (the senders' own ceiling is [`crate::lane::LANE_BYTES_MAX`]
/// per window).
pub const LANE_BATCH_BYTES: usize = 64 << 10;
/// Bytes of bulk input (from the bulk socket or a TAP) between two looks
/// at the interactive lane within a turn: a 64 KiB super-frame takes some
/// 50 µs to handle, a look without anything to read about 1 µs.
pub const LANE_LOOK_BYTES: usize = 64 << 10;
/// TAPs whose interactive queues a look within a turn of the bulk socket
/// reads directly, at most; a gateway with more leaves them to the next
/// turn (the reactor's readiness).
pub const LOOK_TAPS_MAX: usize = 4;
/// How often the counters are logged at DEBUG, ms.
pub(super) const STATS_LOG_INTERVAL_MS: u64 = 10_000;
/// How often a dynamic gateway refreshes the counters of its report, ms.
const COUNTERS_REFRESH_MS: i64 = 1_000;
/// How long a dynamic gateway waits before it tries again to set up a
/// segment that failed, ms.
const SEGMENT_RETRY_MS: i64 = 2_000;
/// Largest peer index (the gateway puts it in the top 24 bits of
/// WireGuard's receiver index).
const PEER_INDEX_MAX: PeerIndex = 0x00ff_ffff;

/// Counters of a gateway run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShellStats {
    /// Frames read from the TAP devices.
    pub frames_from_local: u64,
    /// Frames written to the TAP devices.
    pub frames_to_local: u64,
    /// Of those read, TCP super-frames (GSO) that the kernel left whole.
    pub super_frames_from_local: u64,
    /// Of those, frames read from the TAPs' interactive queues.
    pub interactive_frames_from_local: u64,
    /// Of those written, TCP super-frames for the kernel to cut.
    pub super_frames_to_local: u64,
    /// Datagrams received on the UDP sockets.
    pub datagrams_received: u64,
    /// Of those, datagrams received on the interactive lane's socket.
    pub interactive_datagrams_received: u64,
    /// Looks at the interactive lane within a turn that found something.
    pub lane_looks_found: u64,
    /// Datagrams sent.
    pub datagrams_sent: u64,
    /// Frames read from a TAP that were larger than the overlay carries.
    pub oversize_frames: u64,
    /// Frames the kernel refused on a TAP.
    pub local_write_errors: u64,
    /// Datagrams the kernel refused to send (no route, buffer full).
    pub send_errors: u64,
    /// Errors receiving on the UDP socket that the loop survived.
    pub receive_errors: u64,
    /// The data plane's own counters.
    pub gateway: GatewayStats,
}

/// Runs a gateway with a fixed configuration until `shutdown` resolves,
/// then removes the links it owns and returns its counters.
///
/// Start-up binds the socket, removes stale links, opens one TAP per
/// segment and attaches it (see the module docs of [`super`]); a failure
/// there undoes what was done and returns the error. Needs CAP_NET_ADMIN.
///
/// The loop is one task that does all the work; for throughput, run it on a
/// current-thread runtime of its own (on a multi-threaded runtime, every
/// readiness event may be handed from the thread that polled the I/O driver
/// to the one running the task: measured, that halves throughput).
pub async fn run(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<ShellStats, ShellError> {
    let (_keep, updates) = watch::channel(config);
    run_reloadable(updates, shutdown).await
}

/// [`run`], taking new configurations from `updates` while it runs (what
/// `vcfed gateway` does on SIGHUP): segments and peers follow the latest
/// value, keeping the sessions and learnt addresses of what stays. The
/// first value is applied strictly, like [`run`]; a later segment that
/// cannot be set up is logged and retried. The key, the listen address,
/// the MTU and the link prefix are those of the first value.
pub async fn run_reloadable(
    mut updates: watch::Receiver<GatewayConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<ShellStats, ShellError> {
    let config = updates.borrow_and_update().clone();
    check_limits(&config)?;
    let base = GatewayBase {
        private_key: config.private_key,
        listen: config.listen,
        inner_mtu: config.inner_mtu,
        link_prefix: config.link_prefix.clone(),
        busy_poll: config.busy_poll,
        nice: config.nice,
    };
    let (carried_tx, carried_rx) = watch::channel(carried_of(&config));
    let (report_tx, _report) = watch::channel(GatewayReport::default());
    let forward = async move {
        while updates.changed().await.is_ok() {
            let next = updates.borrow_and_update().clone();
            if let Err(e) = check_limits(&next) {
                tracing::warn!(error = %e, "new configuration refused; keeping the current one");
                continue;
            }
            if next.private_key != config.private_key
                || next.listen != config.listen
                || next.inner_mtu != config.inner_mtu
                || next.link_prefix != config.link_prefix
                || next.busy_poll != config.busy_poll
                || next.nice != config.nice
            {
                tracing::warn!(
                    "the key, listen address, MTU, link prefix, busy poll or niceness changed: they apply at the next start"
                );
            }
            tracing::info!(
                segments = next.segments.len(),
                peers = next.peers.len(),
                "configuration reloaded"
            );
            carried_tx.send_replace(carried_of(&next));
        }
        // The sender is gone: keep the last configuration until shutdown.
        std::future::pending::<()>().await;
    };
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            () = forward => {}
        }
    };
    run_control(base, carried_rx, report_tx, true, shutdown).await
}

/// The segments and peers of a fixed configuration, as a dynamic gateway
/// takes them (peers by key, through the indices the file gives them).
fn carried_of(config: &GatewayConfig) -> Carried {
    let peers: BTreeMap<PeerIndex, &crate::gateway::PeerConfig> =
        config.peers.iter().map(|p| (p.index, p)).collect();
    Carried {
        segments: config
            .segments
            .iter()
            .map(|segment| CarriedSegment {
                id: segment.id,
                site_link: segment.site_link.clone(),
                peers: segment
                    .peers
                    .iter()
                    .filter_map(|index| peers.get(index))
                    .map(|peer| super::CarriedPeer {
                        public_key: peer.public_key,
                        endpoint: peer.endpoint,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Runs a gateway whose segments and peers follow `carried` while it runs
/// (the agent's gateway: a cluster's segment comes when the cluster starts
/// at this site and goes when it stops), until `shutdown` resolves; then
/// removes the links it owns and returns its counters.
///
/// Start-up binds the socket and removes the links of the prefix that the
/// first value of `carried` does not name (a crashed run's leftovers); a
/// failure there is returned. Later, a segment that cannot be set up is
/// reported in `report` and retried; it never stops the gateway. The peers
/// with a live session are reported too.
pub async fn run_dynamic(
    base: GatewayBase,
    carried: watch::Receiver<Carried>,
    report: watch::Sender<GatewayReport>,
    shutdown: impl Future<Output = ()>,
) -> Result<ShellStats, ShellError> {
    run_control(base, carried, report, false, shutdown).await
}

/// The dynamic gateway; with `strict`, a segment of the first value of
/// `carried` that cannot be set up is an error (after undoing the rest).
async fn run_control(
    base: GatewayBase,
    carried: watch::Receiver<Carried>,
    report: watch::Sender<GatewayReport>,
    strict: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<ShellStats, ShellError> {
    let span = tracing::info_span!("gateway", listen = %base.listen);
    async move {
        let config = GatewayConfig {
            private_key: base.private_key,
            listen: base.listen,
            inner_mtu: base.inner_mtu,
            peers: Vec::new(),
            segments: Vec::new(),
            link_prefix: base.link_prefix.clone(),
            busy_poll: base.busy_poll,
            nice: base.nice,
        };
        check_limits(&config)?;
        set_nice(config.nice)?;
        let started = Instant::now();
        let sockets = udp::bind(config.listen).map_err(|source| ShellError::Udp {
            addr: config.listen,
            source,
        })?;
        let mut carried = carried;
        let first = carried.borrow_and_update().clone();
        let links = Links::connect(&base.link_prefix)?;
        let keep: BTreeSet<String> = first
            .segments
            .iter()
            .flat_map(|segment| {
                let names = link_names(&base.link_prefix, &to_segment_config(segment));
                std::iter::once(names.bridge).chain(names.vlan)
            })
            .collect();
        for name in links.remove_stale(&keep).await? {
            tracing::info!(link = %name, "removed a stale link");
        }
        let mut shell = Shell::new(&config, sockets, BTreeMap::new(), started)?;
        shell.control = Some(Control {
            links,
            prefix: base.link_prefix,
            carried,
            watching: true,
            report,
            peers: BTreeMap::new(),
            next_index: 1,
            applied: BTreeMap::new(),
            retry_at_ms: None,
            counters_at_ms: 0,
        });
        let applied = shell.apply(first).await;
        if let (true, Err(e)) = (strict, applied) {
            shell.shutdown_links().await;
            return Err(e);
        }
        shell.run(shutdown).await
    }
    .instrument(span)
    .await
}

fn to_segment_config(segment: &CarriedSegment) -> super::SegmentConfig {
    super::SegmentConfig {
        id: segment.id,
        peers: Vec::new(),
        site_link: segment.site_link.clone(),
    }
}

/// The state of a dynamic gateway's reconfiguration.
struct Control {
    links: Links,
    prefix: String,
    carried: watch::Receiver<Carried>,
    /// False once the sender is gone: the last value stays in force.
    watching: bool,
    report: watch::Sender<GatewayReport>,
    /// Peers by public key: their index and endpoint.
    peers: BTreeMap<[u8; 32], (PeerIndex, Option<SocketAddr>)>,
    next_index: PeerIndex,
    /// Segments set up, with the links they use.
    applied: BTreeMap<u32, (CarriedSegment, SegmentLinkNames)>,
    /// When to try the failed segments again.
    retry_at_ms: Option<i64>,
    /// When to refresh the counters in the report next.
    counters_at_ms: i64,
}

impl Control {
    /// A peer index no current peer uses.
    fn allocate_index(&mut self) -> PeerIndex {
        let used: BTreeSet<PeerIndex> = self.peers.values().map(|(index, _)| *index).collect();
        // At most PEERS_MAX peers exist, so a free index is found within
        // PEERS_MAX + 1 steps.
        for _ in 0..=PEERS_MAX {
            let index = self.next_index;
            self.next_index = if index >= PEER_INDEX_MAX {
                1
            } else {
                index + 1
            };
            if !used.contains(&index) {
                return index;
            }
        }
        self.next_index
    }

    /// Resolves when `carried` changes; never once its sender is gone.
    async fn changed(control: &mut Option<Control>) {
        match control {
            Some(control) if control.watching => {
                if control.carried.changed().await.is_err() {
                    control.watching = false;
                    std::future::pending::<()>().await;
                }
            }
            _ => std::future::pending().await,
        }
    }
}

fn check_limits(config: &GatewayConfig) -> Result<(), ShellError> {
    if config.segments.len() > SEGMENTS_MAX {
        return Err(ShellError::Config(format!(
            "{} segments, more than {SEGMENTS_MAX}",
            config.segments.len()
        )));
    }
    if !(INNER_MTU_MIN..=INNER_MTU_MAX).contains(&config.inner_mtu) {
        return Err(ShellError::Config(format!(
            "inner MTU {} outside {INNER_MTU_MIN}-{INNER_MTU_MAX}",
            config.inner_mtu
        )));
    }
    if !(NICE_MIN..=NICE_MAX).contains(&config.nice) {
        return Err(ShellError::Config(format!(
            "niceness {} outside {NICE_MIN} to {NICE_MAX}",
            config.nice
        )));
    }
    if config.busy_poll > BUSY_POLL_MAX {
        return Err(ShellError::Config(format!(
            "busy poll of {:?}, more than {BUSY_POLL_MAX:?}",
            config.busy_poll
        )));
    }
    let ids: BTreeSet<u32> = config.segments.iter().map(|s| s.id).collect();
    if ids.len() != config.segments.len() {
        return Err(ShellError::Config(
            "a segment id is listed twice".to_owned(),
        ));
    }
    if config.peers.len() > PEERS_MAX {
        return Err(ShellError::Config(format!(
            "{} peers, more than {PEERS_MAX}",
            config.peers.len()
        )));
    }
    Ok(())
}

/// Buffers one read of a UDP socket lands in.
struct RxBatch {
    bufs: Vec<Vec<u8>>,
    meta: [quinn_udp::RecvMeta; RECV_BATCH],
}

impl RxBatch {
    fn new() -> RxBatch {
        RxBatch {
            bufs: (0..RECV_BATCH).map(|_| vec![0; DATAGRAM_LEN_MAX]).collect(),
            meta: [quinn_udp::RecvMeta::default(); RECV_BATCH],
        }
    }
}

struct Shell {
    gateway: Gateway,
    socket: UdpSocket,
    listen: SocketAddr,
    taps: BTreeMap<u32, Tap>,
    started: Instant,
    stats: ShellStats,
    /// Which TAP `any_readable` looks at first, so that none starves.
    tap_cursor: usize,
    /// UDP GSO and GRO on the socket.
    udp: quinn_udp::UdpSocketState,
    /// The socket of the interactive lane, with its GRO state, read first.
    interactive: Option<(UdpSocket, quinn_udp::UdpSocketState)>,
    /// Where TAP frames are read to (with their virtio header), reused.
    buf: Vec<u8>,
    /// Where datagrams are read to, reused: from the bulk socket, and from
    /// the interactive one (read between the messages of a bulk read).
    rx: RxBatch,
    rx_lane: RxBatch,
    /// Outputs of the gateway, reused between inputs.
    out: Outputs,
    /// For a dynamic gateway: what it should carry, and what it does.
    control: Option<Control>,
    /// How long the loop polls without sleeping after the last input.
    busy_poll: Duration,
    /// When the last packet was read from a device.
    last_input: Instant,
}

impl Shell {
    fn new(
        config: &GatewayConfig,
        sockets: Sockets,
        taps: BTreeMap<u32, Tap>,
        started: Instant,
    ) -> Result<Shell, ShellError> {
        let mut gateway = Gateway::new(config.private_key, SwitchConfig::default());
        gateway.set_inner_mtu(config.inner_mtu);
        for peer in &config.peers {
            gateway
                .add_peer(peer.clone())
                .map_err(|e| ShellError::Config(format!("peer {}: {e}", peer.index)))?;
        }
        let now_ms = elapsed_ms(started);
        for segment in &config.segments {
            gateway.add_segment(now_ms, segment.id, &segment.peers);
        }
        let udp_error = |source| ShellError::Udp {
            addr: config.listen,
            source,
        };
        let socket = sockets.bulk;
        let udp = quinn_udp::UdpSocketState::new((&socket).into()).map_err(udp_error)?;
        let interactive = match sockets.interactive {
            Some(lane) => {
                let state = quinn_udp::UdpSocketState::new((&lane).into()).map_err(udp_error)?;
                Some((lane, state))
            }
            None => None,
        };
        tracing::debug!(
            gso_segments = udp.max_gso_segments(),
            gro_segments = udp.gro_segments(),
            "UDP offloads"
        );
        Ok(Shell {
            gateway,
            socket,
            listen: config.listen,
            taps,
            started,
            stats: ShellStats::default(),
            tap_cursor: 0,
            buf: vec![0; offload::WIRE_LEN + SUPER_FRAME_LEN_MAX + 1],
            rx: RxBatch::new(),
            rx_lane: RxBatch::new(),
            out: Outputs::new(udp.max_gso_segments()),
            udp,
            interactive,
            control: None,
            busy_poll: config.busy_poll,
            last_input: started,
        })
    }

    /// Brings a dynamic gateway's segments and peers in line with
    /// `carried`: removes what is no longer wanted, adds peers (with a
    /// handshake at once) and segments (TAP and links), and updates the
    /// peers of segments that stay.
    async fn apply(&mut self, carried: Carried) -> Result<(), ShellError> {
        let Some(mut control) = self.control.take() else {
            return Ok(());
        };
        let now_ms = self.now_ms();
        let wanted: BTreeMap<u32, CarriedSegment> = carried
            .segments
            .into_iter()
            .take(SEGMENTS_MAX)
            .map(|segment| (segment.id, segment))
            .collect();
        let mut report = control.report.borrow().clone();

        let gone: Vec<u32> = control
            .applied
            .iter()
            .filter(|(id, (segment, _))| {
                wanted.get(id).map(|w| &w.site_link) != Some(&segment.site_link)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let (_, names) = control.applied.remove(&id).expect("listed above");
            self.gateway.remove_segment(id);
            self.taps.remove(&id);
            let removed = control.links.teardown(std::slice::from_ref(&names)).await;
            tracing::info!(segment = id, links = ?removed, "segment removed");
        }
        report.segments.retain(|id, _| wanted.contains_key(id));

        let needed: BTreeMap<[u8; 32], Option<SocketAddr>> = wanted
            .values()
            .flat_map(|segment| &segment.peers)
            .map(|peer| (peer.public_key, peer.endpoint))
            .collect();
        let unneeded: Vec<[u8; 32]> = control
            .peers
            .keys()
            .filter(|key| !needed.contains_key(*key))
            .copied()
            .collect();
        for key in unneeded {
            let (index, _) = control.peers.remove(&key).expect("listed above");
            self.gateway.remove_peer(index);
            tracing::info!(peer = %STANDARD.encode(key), "peer removed");
        }
        for (key, endpoint) in &needed {
            let index = match control.peers.get(key) {
                Some((_, known)) if known == endpoint => continue,
                Some((index, _)) => *index,
                None => control.allocate_index(),
            };
            let peer = PeerConfig {
                index,
                public_key: *key,
                endpoint: *endpoint,
            };
            match self.gateway.add_peer(peer) {
                Ok(()) => {
                    control.peers.insert(*key, (index, *endpoint));
                    self.gateway.initiate_handshake(index, &mut self.out);
                    tracing::info!(peer = %STANDARD.encode(key), endpoint = ?endpoint, "peer added");
                }
                Err(e) => tracing::warn!(peer = %STANDARD.encode(key), error = e, "peer not added"),
            }
        }

        let mut failed = None;
        for (id, segment) in wanted {
            let peers: Vec<PeerIndex> = segment
                .peers
                .iter()
                .filter_map(|peer| control.peers.get(&peer.public_key).map(|(index, _)| *index))
                .collect();
            if let Some(applied) = control.applied.get_mut(&id) {
                self.gateway.set_segment_peers(now_ms, id, &peers);
                applied.0 = segment;
                continue;
            }
            let names = link_names(&control.prefix, &to_segment_config(&segment));
            let attached = match Tap::open(&names.tap) {
                Ok(tap) => match control.links.attach(&names, &segment.site_link).await {
                    Ok(()) => Ok(tap),
                    Err(e) => Err(e),
                },
                Err(source) => Err(ShellError::Tap {
                    name: names.tap.clone(),
                    source,
                }),
            };
            match attached {
                Ok(tap) => {
                    self.gateway.add_segment(now_ms, id, &peers);
                    tracing::info!(segment = id, tap = %names.tap, bridge = %names.bridge, peers = peers.len(), offloads = tap.offloads(), "segment attached");
                    self.taps.insert(id, tap);
                    report.segments.insert(id, Ok(names.bridge.clone()));
                    control.applied.insert(id, (segment, names));
                }
                Err(e) => {
                    tracing::warn!(segment = id, error = %e, "segment not set up; retrying");
                    report.segments.insert(id, Err(e.to_string()));
                    control.links.teardown(std::slice::from_ref(&names)).await;
                    failed.get_or_insert(e);
                }
            }
        }
        control.retry_at_ms = failed.is_some().then_some(now_ms + SEGMENT_RETRY_MS);
        control.report.send_if_modified(|current| {
            let changed = current.segments != report.segments;
            current.segments = report.segments;
            changed
        });
        self.control = Some(control);
        self.flush().await;
        failed.map_or(Ok(()), Err)
    }

    /// Removes the links of every segment set up (a start that failed).
    async fn shutdown_links(&mut self) {
        self.taps.clear();
        if let Some(control) = self.control.take() {
            let plan: Vec<SegmentLinkNames> = control
                .applied
                .into_values()
                .map(|(_, names)| names)
                .collect();
            control.links.teardown(&plan).await;
        }
    }

    /// A dynamic gateway's periodic work: publishes which peers have a
    /// session, and retries failed segments when it is time.
    async fn control_tick(&mut self, now_ms: i64) {
        let Some(control) = &mut self.control else {
            return;
        };
        let sessions: BTreeSet<[u8; 32]> = self.gateway.peers_with_session().into_iter().collect();
        let counters_due = now_ms >= control.counters_at_ms;
        if counters_due {
            control.counters_at_ms = now_ms + COUNTERS_REFRESH_MS;
        }
        let gateway = &self.gateway;
        control.report.send_if_modified(|current| {
            let changed = current.sessions != sessions;
            current.sessions = sessions;
            if counters_due {
                current.gateway_stats = gateway.stats();
                current.peer_stats = gateway.peer_stats().collect();
                current.segment_stats = gateway
                    .segments()
                    .map(|(id, segment)| (id, segment.stats()))
                    .collect();
            }
            changed
        });
        if control.retry_at_ms.is_some_and(|at| at <= now_ms) {
            let carried = control.carried.borrow().clone();
            // Failures are reported and retried again.
            let _ = self.apply(carried).await;
        }
    }

    async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<ShellStats, ShellError> {
        tracing::info!(
            public_key = %STANDARD.encode(self.gateway.public_key()),
            segments = self.taps.len(),
            "gateway ready"
        );
        self.gateway.initiate_handshakes(&mut self.out);
        self.flush().await;

        let mut tick = tokio::time::interval(Duration::from_millis(
            u64::try_from(TIMER_TICK_MS).expect("the tick is positive"),
        ));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stats_log = tokio::time::interval(Duration::from_millis(STATS_LOG_INTERVAL_MS));
        stats_log.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        let ended = loop {
            // The interactive lane first, every turn: the reactor was just
            // asked (the yield below), and when it knows of nothing to read
            // this costs no system call.
            if let Err(source) = self.drain_socket(true).await {
                break Err(ShellError::Udp {
                    addr: self.listen,
                    source,
                });
            }
            if let Err(e) = self.drain_interactive_taps().await {
                break Err(e);
            }
            let polling = !self.busy_poll.is_zero() && self.last_input.elapsed() < self.busy_poll;
            // Unbiased: under load the socket and the TAPs are all ready all
            // the time, and a fixed order would starve the later branches.
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                // Busy polling: instead of sleeping until the kernel wakes
                // the thread, go round again (the yield below asks the
                // reactor without waiting), letting whatever else is
                // runnable on this core go first.
                () = std::future::ready(()), if polling => std::thread::yield_now(),
                _ = tick.tick() => {
                    let now_ms = self.now_ms();
                    self.gateway.handle_timers(now_ms, &mut self.out);
                    self.flush().await;
                    self.control_tick(now_ms).await;
                }
                () = Control::changed(&mut self.control) => {
                    if let Some(control) = &mut self.control {
                        let carried = control.carried.borrow_and_update().clone();
                        // Failures are reported and retried.
                        let _ = self.apply(carried).await;
                    }
                }
                _ = stats_log.tick() => {
                    self.stats.gateway = self.gateway.stats();
                    tracing::debug!(stats = ?self.stats, "counters");
                }
                ready = self.socket.readable() => {
                    let drained = match ready {
                        Ok(()) => self.drain_socket(false).await,
                        Err(e) => Err(e),
                    };
                    if let Err(source) = drained {
                        break Err(ShellError::Udp { addr: self.listen, source });
                    }
                }
                ready = lane_readable(&self.interactive) => {
                    let drained = match ready {
                        Ok(()) => self.drain_socket(true).await,
                        Err(e) => Err(e),
                    };
                    if let Err(source) = drained {
                        break Err(ShellError::Udp { addr: self.listen, source });
                    }
                }
                ready = any_readable(&self.taps, self.tap_cursor) => {
                    self.tap_cursor = self.tap_cursor.wrapping_add(1);
                    let (segment, queue, ready) = ready;
                    let drained = match ready {
                        Ok(()) => self.drain_tap(segment, queue).await,
                        Err(e) => Err(e),
                    };
                    if let Err(source) = drained {
                        let name = self.taps.get(&segment).map_or_else(String::new, |tap| tap.name().to_owned());
                        break Err(ShellError::Tap { name, source });
                    }
                }
            }
            // Back to the reactor after every turn. Under load the devices
            // stay ready (a drain stops at its batch limit), so the loop
            // would run on readiness it already knows, and tokio's reactor,
            // polled only when the task yields, would not learn for
            // milliseconds that another device has something: measured, a
            // ping's reply waited 1 ms in the socket while the loop drained
            // bulk from the TAP. The extra `epoll_wait` with no timeout costs
            // about a microsecond per turn.
            tokio::task::yield_now().await;
        };
        self.stats.gateway = self.gateway.stats();
        let stats = self.stats;
        tracing::info!(
            frames_from_local = stats.frames_from_local,
            frames_to_local = stats.frames_to_local,
            super_frames_from_local = stats.super_frames_from_local,
            interactive_frames_from_local = stats.interactive_frames_from_local,
            super_frames_to_local = stats.super_frames_to_local,
            datagrams_received = stats.datagrams_received,
            interactive_datagrams_received = stats.interactive_datagrams_received,
            lane_looks_found = stats.lane_looks_found,
            datagrams_sent = stats.datagrams_sent,
            oversize_frames = stats.oversize_frames,
            local_write_errors = stats.local_write_errors,
            send_errors = stats.send_errors,
            receive_errors = stats.receive_errors,
            datagrams_dropped = stats.gateway.datagrams_dropped,
            junk = stats.gateway.junk,
            bad_mac = stats.gateway.bad_mac,
            cookie_replies = stats.gateway.cookie_replies,
            rate_limited = stats.gateway.rate_limited,
            unknown_peer = stats.gateway.unknown_peer,
            replays = stats.gateway.replays,
            refused = stats.gateway.refused,
            inner_dropped = stats.gateway.inner_dropped,
            wrong_segment = stats.gateway.wrong_segment,
            no_endpoint = stats.gateway.no_endpoint,
            local_dropped = stats.gateway.local_dropped,
            interactive_frames = stats.gateway.interactive_frames,
            interactive_held = stats.gateway.interactive_held,
            "gateway stopped"
        );
        // The TAP devices close (and vanish) when they drop.
        drop(self.taps);
        if let Some(control) = self.control.take() {
            let plan: Vec<SegmentLinkNames> = control
                .applied
                .into_values()
                .map(|(_, names)| names)
                .collect();
            let removed = control.links.teardown(&plan).await;
            if !removed.is_empty() {
                tracing::info!(links = ?removed, "removed the gateway's links");
            }
        }
        ended.map(|()| stats)
    }

    /// Reads and handles datagrams from the bulk socket, or with
    /// `interactive` from the interactive one, until none is left or the
    /// batch is full ([`INPUT_BATCH_BYTES`], [`LANE_BATCH_BYTES`]). Each
    /// read takes up to [`RECV_BATCH`] messages, each of which may be
    /// several datagrams the kernel coalesced (UDP GRO). Only errors that
    /// concern the socket itself are returned. Without an interactive socket
    /// `interactive` reads nothing.
    async fn drain_socket(&mut self, interactive: bool) -> std::io::Result<()> {
        let limit = if interactive {
            LANE_BATCH_BYTES
        } else {
            INPUT_BATCH_BYTES
        };
        let mut bytes = 0;
        let mut looked_at = 0;
        for _ in 0..INPUT_BATCH_MAX {
            if bytes >= limit {
                break;
            }
            match self.receive_batch(interactive, false) {
                Ok(messages) => {
                    let now_ms = self.now_ms();
                    // Message by message (each up to 64 KiB of coalesced
                    // datagrams), looking at the interactive lane between
                    // them.
                    for message in 0..messages {
                        bytes += self.handle_message(interactive, message, now_ms);
                        if self.out.bytes() >= FLUSH_BYTES {
                            self.flush().await;
                        }
                        if !interactive && bytes - looked_at >= LANE_LOOK_BYTES {
                            looked_at = bytes;
                            self.look_at_lane(None).await;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !interactive {
                        let now_ms = self.now_ms();
                        self.gateway.bulk_queued(false, now_ms, &mut self.out);
                    }
                    break;
                }
                Err(e) if is_transient(&e) => self.stats.receive_errors += 1,
                Err(e) => {
                    self.flush().await;
                    return Err(e);
                }
            }
        }
        self.flush().await;
        Ok(())
    }

    /// One read of the bulk socket, or with `interactive` of the
    /// interactive one (`WouldBlock` when there is none), taking up to
    /// [`RECV_BATCH`] messages, each of which may be several datagrams the
    /// kernel coalesced (UDP GRO), and handing its datagrams to the gateway.
    /// Returns the bytes read. With `direct`, the read is made even if the
    /// reactor has not said that the socket is readable.
    fn receive(&mut self, interactive: bool, direct: bool) -> std::io::Result<usize> {
        let messages = self.receive_batch(interactive, direct)?;
        let now_ms = self.now_ms();
        Ok((0..messages)
            .map(|message| self.handle_message(interactive, message, now_ms))
            .sum())
    }

    /// The read of [`Shell::receive`], into the lane's own buffers; returns
    /// how many messages it took.
    fn receive_batch(&mut self, interactive: bool, direct: bool) -> std::io::Result<usize> {
        let (socket, udp, rx) = match (interactive, &self.interactive) {
            (false, _) => (&self.socket, &self.udp, &mut self.rx),
            (true, Some((socket, udp))) => (socket, udp, &mut self.rx_lane),
            (true, None) => return Err(std::io::ErrorKind::WouldBlock.into()),
        };
        let mut slices: [IoSliceMut<'_>; RECV_BATCH] = {
            let mut bufs = rx.bufs.iter_mut();
            std::array::from_fn(|_| IoSliceMut::new(bufs.next().expect("RECV_BATCH buffers")))
        };
        let messages = if direct {
            udp.recv(socket.into(), &mut slices, &mut rx.meta)
        } else {
            socket.try_io(Interest::READABLE, || {
                udp.recv(socket.into(), &mut slices, &mut rx.meta)
            })
        }?;
        self.last_input = Instant::now();
        if interactive && messages > 0 {
            // Whether the interactive datagrams may overtake bulk ones
            // (see `Gateway::handle_datagram`): the kernel says whether the
            // bulk socket holds any (the length of its first datagram).
            let queued = rustix::io::ioctl_fionread(&self.socket).map_or(true, |len| len > 0);
            let now_ms = self.now_ms();
            self.gateway.bulk_queued(queued, now_ms, &mut self.out);
        }
        Ok(messages)
    }

    /// Hands the datagrams of the `message`-th message of the last read of
    /// the lane to the gateway; returns its bytes.
    fn handle_message(&mut self, interactive: bool, message: usize, now_ms: i64) -> usize {
        let rx = if interactive { &self.rx_lane } else { &self.rx };
        let meta = rx.meta[message];
        let buf = &rx.bufs[message];
        let stride = meta.stride.max(1);
        // An empty datagram is one too (to be counted as junk), though
        // `chunks` yields nothing for it.
        let empty = (meta.len == 0).then_some(&[][..]);
        for datagram in empty.into_iter().chain(buf[..meta.len].chunks(stride)) {
            self.stats.datagrams_received += 1;
            self.stats.interactive_datagrams_received += u64::from(interactive);
            self.gateway
                .handle_datagram(now_ms, meta.addr, datagram, &mut self.out);
        }
        meta.len
    }

    /// A look at the interactive lane in the middle of a turn: what is
    /// there (in the interactive socket and the interactive queue of
    /// `segment`'s TAP, or of every TAP if there are at most
    /// [`LOOK_TAPS_MAX`]) is handled and sent at once, with what the turn
    /// gathered so far. The reactor only learns of readiness between turns,
    /// so this asks the kernel directly: a system call per device, every
    /// [`LANE_LOOK_BYTES`] of bulk input. Errors are left for the regular
    /// reads to find.
    async fn look_at_lane(&mut self, segment: Option<u32>) {
        let mut bytes = 0;
        if self.interactive.is_some() {
            while bytes < LANE_BATCH_BYTES {
                match self.receive(true, true) {
                    Ok(read) => bytes += read,
                    Err(_) => break,
                }
            }
        }
        let mut next = match segment {
            Some(segment) => Some(segment),
            None if self.taps.len() <= LOOK_TAPS_MAX => self.next_lane_tap(None),
            None => None,
        };
        while let Some(at) = next {
            if self.taps.get(&at).is_some_and(|tap| tap.queues() > 1) {
                let mut read = 0;
                while read < LANE_BATCH_BYTES {
                    match self.receive_frame(at, INTERACTIVE_QUEUE, true) {
                        Ok(len) => read += len.max(1),
                        Err(_) => break,
                    }
                }
                bytes += read;
            }
            next = match segment {
                Some(_) => None,
                None => self.next_lane_tap(Some(at)),
            };
        }
        if bytes > 0 {
            self.stats.lane_looks_found += 1;
            self.flush().await;
        }
    }

    /// Reads and handles the frames of `queue` of `segment`'s TAP until
    /// none is left or the batch is full ([`INPUT_BATCH_BYTES`], or
    /// [`LANE_BATCH_BYTES`] for the interactive queue).
    async fn drain_tap(&mut self, segment: u32, queue: usize) -> std::io::Result<()> {
        let limit = if queue == INTERACTIVE_QUEUE {
            LANE_BATCH_BYTES
        } else {
            INPUT_BATCH_BYTES
        };
        let mut ended = Ok(());
        let mut bytes = 0;
        let mut looked_at = 0;
        for _ in 0..INPUT_BATCH_MAX {
            if bytes >= limit {
                break;
            }
            match self.receive_frame(segment, queue, false) {
                Ok(read) => {
                    bytes += read;
                    // A frame of the interactive lane leaves at once, with
                    // what was gathered before it.
                    if self.out.bytes() >= FLUSH_BYTES || self.out.urgent() {
                        self.flush().await;
                    }
                    if queue == BULK_QUEUE && bytes - looked_at >= LANE_LOOK_BYTES {
                        looked_at = bytes;
                        self.look_at_lane(Some(segment)).await;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    ended = Err(e);
                    break;
                }
            }
        }
        self.flush().await;
        ended
    }

    /// Reads one frame from `queue` of `segment`'s TAP (with `direct`, even
    /// if the reactor has not said it is readable) and hands it to the
    /// gateway; returns its length (0 for a frame dropped as oversize).
    /// `WouldBlock` when there is none, or no such TAP.
    fn receive_frame(
        &mut self,
        segment: u32,
        queue: usize,
        direct: bool,
    ) -> std::io::Result<usize> {
        let Some(tap) = self.taps.get(&segment) else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        match tap.try_recv(queue, direct, &mut self.buf) {
            Ok((_, len)) if len > SUPER_FRAME_LEN_MAX => {
                self.stats.oversize_frames += 1;
                Ok(0)
            }
            Ok((offload, len)) => {
                self.last_input = Instant::now();
                self.stats.frames_from_local += 1;
                self.stats.super_frames_from_local += u64::from(offload.is_gso());
                self.stats.interactive_frames_from_local += u64::from(queue == INTERACTIVE_QUEUE);
                let now_ms = self.now_ms();
                let frame = &self.buf[offload::WIRE_LEN..offload::WIRE_LEN + len];
                self.gateway
                    .handle_local_frame(now_ms, segment, offload, frame, &mut self.out);
                Ok(len)
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                self.stats.oversize_frames += 1;
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// The first segment after `after` (or the first of all) whose TAP has
    /// an interactive queue.
    fn next_lane_tap(&self, after: Option<u32>) -> Option<u32> {
        let from = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        self.taps
            .range((from, std::ops::Bound::Unbounded))
            .find(|(_, tap)| tap.queues() > 1)
            .map(|(segment, _)| *segment)
    }

    /// The interactive queues of the TAPs, drained while the reactor says
    /// they are readable (no system call otherwise), before anything else
    /// in a turn.
    async fn drain_interactive_taps(&mut self) -> Result<(), ShellError> {
        let mut next = self.next_lane_tap(None);
        while let Some(segment) = next {
            if let Err(source) = self.drain_tap(segment, INTERACTIVE_QUEUE).await {
                let name = self
                    .taps
                    .get(&segment)
                    .map_or_else(String::new, |tap| tap.name().to_owned());
                return Err(ShellError::Tap { name, source });
            }
            next = self.next_lane_tap(Some(segment));
        }
        Ok(())
    }

    /// Sends every output of the gateway: runs of datagrams in one UDP GSO
    /// send each, frames with their offload metadata.
    async fn flush(&mut self) {
        // The loop drains the interactive lane every turn, mostly finding
        // nothing: then there is nothing to do here either.
        if self.out.is_empty() {
            return;
        }
        let mut out = std::mem::take(&mut self.out);
        // One wait for room per flush, not per run: a full socket buffer
        // must not hold the loop (and its timers) for long.
        let deadline = tokio::time::Instant::now() + SEND_WAIT_MAX;
        for output in out.iter() {
            match output {
                Output::ToNetwork {
                    to,
                    datagrams,
                    stride,
                } => {
                    let count = datagrams.len().div_ceil(stride) as u64;
                    let transmit = quinn_udp::Transmit {
                        destination: to,
                        ecn: None,
                        contents: datagrams,
                        segment_size: (datagrams.len() > stride).then_some(stride),
                        src_ip: None,
                    };
                    match self.send(&transmit, deadline).await {
                        Ok(()) => self.stats.datagrams_sent += count,
                        Err(e) if count > 1 && self.udp.max_gso_segments() <= 1 => {
                            // The path refused GSO (quinn-udp turned it off
                            // on that error): this run goes out datagram by
                            // datagram, and later runs are single.
                            tracing::warn!(%to, error = %e, "UDP GSO refused on this path; sending datagrams one by one");
                            for datagram in datagrams.chunks(stride) {
                                let single = quinn_udp::Transmit {
                                    segment_size: None,
                                    contents: datagram,
                                    ..transmit
                                };
                                match self.send(&single, deadline).await {
                                    Ok(()) => self.stats.datagrams_sent += 1,
                                    Err(_) => self.stats.send_errors += 1,
                                }
                            }
                        }
                        Err(e) => {
                            self.stats.send_errors += count;
                            tracing::trace!(%to, error = %e, "send failed");
                        }
                    }
                }
                Output::ToLocal {
                    segment,
                    offload,
                    frame,
                    interactive,
                } => {
                    let Some(tap) = self.taps.get(&segment) else {
                        self.stats.local_write_errors += 1;
                        continue;
                    };
                    let queue = if interactive {
                        INTERACTIVE_QUEUE
                    } else {
                        BULK_QUEUE
                    };
                    match tap.try_send(queue, offload, frame) {
                        Ok(_) => {
                            self.stats.frames_to_local += 1;
                            self.stats.super_frames_to_local += u64::from(offload.is_gso());
                        }
                        Err(e) => {
                            self.stats.local_write_errors += 1;
                            tracing::trace!(tap = tap.name(), error = %e, "write failed");
                        }
                    }
                }
            }
        }
        out.clear();
        out.set_run_datagrams_max(self.udp.max_gso_segments());
        self.out = out;
    }

    /// Sends one run of datagrams, waiting while the socket's buffer is
    /// full, until `deadline`.
    async fn send(
        &self,
        transmit: &quinn_udp::Transmit<'_>,
        deadline: tokio::time::Instant,
    ) -> std::io::Result<()> {
        loop {
            match self.socket.try_io(Interest::WRITABLE, || {
                self.udp.try_send((&self.socket).into(), transmit)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::timeout_at(deadline, self.socket.writable())
                        .await
                        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                }
                done => return done,
            }
        }
    }

    fn now_ms(&self) -> i64 {
        elapsed_ms(self.started)
    }
}

fn elapsed_ms(started: Instant) -> i64 {
    i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// Resolves when the interactive socket is readable; without one, never.
async fn lane_readable(
    interactive: &Option<(UdpSocket, quinn_udp::UdpSocketState)>,
) -> std::io::Result<()> {
    match interactive {
        Some((socket, _)) => socket.readable().await,
        None => std::future::pending().await,
    }
}

/// Resolves when a queue of one of `taps` is readable, with its segment and
/// queue, looking at the TAPs in turn from the `cursor`-th, each's
/// interactive queue first. With no TAP it never resolves.
async fn any_readable(
    taps: &BTreeMap<u32, Tap>,
    cursor: usize,
) -> (u32, usize, std::io::Result<()>) {
    let start = cursor % taps.len().max(1);
    std::future::poll_fn(|cx| {
        for (segment, tap) in taps.iter().cycle().skip(start).take(taps.len()) {
            for queue in (0..tap.queues()).rev() {
                if let Poll::Ready(ready) = tap.poll_readable(queue, cx) {
                    return Poll::Ready((*segment, queue, ready));
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// Gives the calling thread (the loop's: the runtime is current-thread)
/// the niceness `nice`, unless it is zero. Linux keeps a niceness per
/// thread, so the rest of the process keeps its own.
fn set_nice(nice: i32) -> Result<(), ShellError> {
    if nice == 0 {
        return Ok(());
    }
    rustix::process::setpriority_process(None, nice).map_err(|e| ShellError::Nice {
        nice,
        source: e.into(),
    })?;
    tracing::info!(nice, "gateway thread niceness set");
    Ok(())
}

/// Errors an unconnected UDP socket reports for earlier sends (ICMP), which
/// say nothing about the socket itself.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock
    )
}
