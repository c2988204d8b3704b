//! The gateway's event loop: TAP devices and the UDP socket in, the
//! [`Gateway`] in the middle, datagrams and frames out.
//!
//! One task owns the gateway and the devices. It waits until the socket or
//! a TAP is readable, then reads what is there without waiting, up to
//! [`INPUT_BATCH_MAX`] packets, handing each to the gateway and sending the
//! outputs at once; between batches it ticks the gateway's timers every
//! [`TIMER_TICK_MS`]. Packets are read into one reused buffer: nothing is
//! queued in user space, so when the loop falls behind, the kernel's socket
//! and TAP queues fill and the kernel drops, before any work is spent on
//! the packet.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::task::Poll;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::net::UdpSocket;
use tracing::Instrument;

use super::netlink::Links;
use super::tap::Tap;
use super::{
    GatewayConfig, INNER_MTU_MAX, INNER_MTU_MIN, SegmentLinkNames, ShellError, link_names,
};
use crate::frame::FRAME_LEN_MAX;
use crate::gateway::{DATAGRAM_LEN_MAX, Gateway, GatewayStats, Output, PEERS_MAX, TIMER_TICK_MS};
use crate::switch::SwitchConfig;

/// Packets read from one device in a row before the loop looks at its
/// timers and the other devices again.
pub const INPUT_BATCH_MAX: usize = 64;
/// Segments (TAP devices) one gateway carries, at most.
pub const SEGMENTS_MAX: usize = 256;
/// Receive and send buffer asked of the UDP socket, bytes: room for a burst
/// of about 2800 full datagrams while the loop is busy. The kernel caps it
/// at `net.core.rmem_max` / `wmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// How often the counters are logged at DEBUG, ms.
pub const STATS_LOG_INTERVAL_MS: u64 = 10_000;

/// Counters of a gateway run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShellStats {
    /// Frames read from the TAP devices.
    pub frames_from_local: u64,
    /// Frames written to the TAP devices.
    pub frames_to_local: u64,
    /// Datagrams received on the UDP socket.
    pub datagrams_received: u64,
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

/// Runs a gateway until `shutdown` resolves, then removes the links it
/// owns and returns its counters.
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
    let span = tracing::info_span!("gateway", listen = %config.listen);
    run_inner(config, shutdown).instrument(span).await
}

async fn run_inner(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<ShellStats, ShellError> {
    check_limits(&config)?;
    let started = Instant::now();
    let socket = bind_udp(config.listen).map_err(|source| ShellError::Udp {
        addr: config.listen,
        source,
    })?;

    let plan: Vec<SegmentLinkNames> = config
        .segments
        .iter()
        .map(|segment| link_names(&config.link_prefix, segment))
        .collect();
    let links = Links::connect(&config.link_prefix)?;
    let keep: BTreeSet<String> = plan
        .iter()
        .flat_map(|names| std::iter::once(names.bridge.clone()).chain(names.vlan.clone()))
        .collect();
    for name in links.remove_stale(&keep).await? {
        tracing::info!(link = %name, "removed a stale link");
    }

    let mut taps = BTreeMap::new();
    let mut setup = Ok(());
    for (segment, names) in config.segments.iter().zip(&plan) {
        let tap = match Tap::open(&names.tap) {
            Ok(tap) => tap,
            Err(source) => {
                setup = Err(ShellError::Tap {
                    name: names.tap.clone(),
                    source,
                });
                break;
            }
        };
        taps.insert(segment.id, tap);
        setup = links.attach(names, &segment.site_link).await;
        if setup.is_err() {
            break;
        }
        tracing::info!(
            segment = segment.id,
            tap = %names.tap,
            bridge = %names.bridge,
            vlan = names.vlan.as_deref().unwrap_or("-"),
            "segment attached"
        );
    }
    if let Err(e) = setup {
        drop(taps);
        links.teardown(&plan).await;
        return Err(e);
    }

    let result = match Shell::new(&config, socket, taps, started) {
        Ok(shell) => shell.run(shutdown).await,
        Err(e) => Err(e),
    };
    let removed = links.teardown(&plan).await;
    if !removed.is_empty() {
        tracing::info!(links = ?removed, "removed the gateway's links");
    }
    result
}

/// The gateway's UDP socket, with large buffers: a burst that finds the loop
/// busy waits in the kernel instead of being dropped there.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer only costs drops under load.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    tracing::debug!(
        recv_buffer = socket.recv_buffer_size().unwrap_or(0),
        send_buffer = socket.send_buffer_size().unwrap_or(0),
        "UDP socket buffers"
    );
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
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

struct Shell {
    gateway: Gateway,
    socket: UdpSocket,
    listen: SocketAddr,
    taps: BTreeMap<u32, Tap>,
    started: Instant,
    stats: ShellStats,
    /// Which TAP `any_readable` looks at first, so that none starves.
    tap_cursor: usize,
    /// Where packets are read to, reused.
    buf: Vec<u8>,
    /// Outputs of the gateway, reused between inputs.
    out: Vec<Output>,
}

impl Shell {
    fn new(
        config: &GatewayConfig,
        socket: UdpSocket,
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
        Ok(Shell {
            gateway,
            socket,
            listen: config.listen,
            taps,
            started,
            stats: ShellStats::default(),
            tap_cursor: 0,
            buf: vec![0; DATAGRAM_LEN_MAX],
            out: Vec::new(),
        })
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
            // Unbiased: under load the socket and the TAPs are all ready all
            // the time, and a fixed order would starve the later branches.
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                _ = tick.tick() => {
                    let now_ms = self.now_ms();
                    self.gateway.handle_timers(now_ms, &mut self.out);
                    self.flush().await;
                }
                _ = stats_log.tick() => {
                    self.stats.gateway = self.gateway.stats();
                    tracing::debug!(stats = ?self.stats, "counters");
                }
                ready = self.socket.readable() => {
                    let drained = match ready {
                        Ok(()) => self.drain_socket().await,
                        Err(e) => Err(e),
                    };
                    if let Err(source) = drained {
                        break Err(ShellError::Udp { addr: self.listen, source });
                    }
                }
                ready = any_readable(&self.taps, self.tap_cursor) => {
                    self.tap_cursor = self.tap_cursor.wrapping_add(1);
                    let (segment, ready) = ready;
                    let drained = match ready {
                        Ok(()) => self.drain_tap(segment).await,
                        Err(e) => Err(e),
                    };
                    if let Err(source) = drained {
                        let name = self.taps.get(&segment).map_or_else(String::new, |tap| tap.name().to_owned());
                        break Err(ShellError::Tap { name, source });
                    }
                }
            }
        };
        self.stats.gateway = self.gateway.stats();
        let stats = self.stats;
        tracing::info!(
            frames_from_local = stats.frames_from_local,
            frames_to_local = stats.frames_to_local,
            datagrams_received = stats.datagrams_received,
            datagrams_sent = stats.datagrams_sent,
            oversize_frames = stats.oversize_frames,
            local_write_errors = stats.local_write_errors,
            send_errors = stats.send_errors,
            receive_errors = stats.receive_errors,
            datagrams_dropped = stats.gateway.datagrams_dropped,
            inner_dropped = stats.gateway.inner_dropped,
            wrong_segment = stats.gateway.wrong_segment,
            no_endpoint = stats.gateway.no_endpoint,
            "gateway stopped"
        );
        // The TAP devices close (and vanish) when they drop.
        drop(self.taps);
        ended.map(|()| stats)
    }

    /// Reads and handles datagrams until none is left or the batch is full.
    /// Only errors that concern the socket itself are returned.
    async fn drain_socket(&mut self) -> std::io::Result<()> {
        for _ in 0..INPUT_BATCH_MAX {
            match self.socket.try_recv_from(&mut self.buf) {
                Ok((len, from)) => {
                    self.stats.datagrams_received += 1;
                    tracing::trace!(%from, len, "datagram");
                    let now_ms = self.now_ms();
                    self.gateway
                        .handle_datagram(now_ms, from, &self.buf[..len], &mut self.out);
                    self.flush().await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if is_transient(&e) => self.stats.receive_errors += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads and handles the frames of `segment`'s TAP until none is left
    /// or the batch is full.
    async fn drain_tap(&mut self, segment: u32) -> std::io::Result<()> {
        for _ in 0..INPUT_BATCH_MAX {
            let Some(tap) = self.taps.get(&segment) else {
                return Ok(());
            };
            // One byte more than the largest frame tells a frame that was cut.
            let buf = &mut self.buf[..FRAME_LEN_MAX + 1];
            match tap.try_recv(buf) {
                Ok(len) if len > FRAME_LEN_MAX => self.stats.oversize_frames += 1,
                Ok(len) => {
                    self.stats.frames_from_local += 1;
                    tracing::trace!(segment, len, "frame from local");
                    let now_ms = self.now_ms();
                    self.gateway.handle_local_frame(
                        now_ms,
                        segment,
                        &self.buf[..len],
                        &mut self.out,
                    );
                    self.flush().await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends every output of the gateway.
    async fn flush(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        for output in out.drain(..) {
            match output {
                Output::ToNetwork { to, datagram } => {
                    match self.socket.send_to(&datagram, to).await {
                        Ok(_) => self.stats.datagrams_sent += 1,
                        Err(e) => {
                            self.stats.send_errors += 1;
                            tracing::trace!(%to, error = %e, "send failed");
                        }
                    }
                }
                Output::ToLocal { segment, frame } => {
                    let Some(tap) = self.taps.get(&segment) else {
                        self.stats.local_write_errors += 1;
                        continue;
                    };
                    match tap.try_send(&frame) {
                        Ok(_) => self.stats.frames_to_local += 1,
                        Err(e) => {
                            self.stats.local_write_errors += 1;
                            tracing::trace!(tap = tap.name(), error = %e, "write failed");
                        }
                    }
                }
            }
        }
        self.out = out;
    }

    fn now_ms(&self) -> i64 {
        elapsed_ms(self.started)
    }
}

fn elapsed_ms(started: Instant) -> i64 {
    i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// Resolves when one of `taps` is readable, with its segment, looking at
/// them in turn from the `cursor`-th. With no TAP it never resolves.
async fn any_readable(taps: &BTreeMap<u32, Tap>, cursor: usize) -> (u32, std::io::Result<()>) {
    let start = cursor % taps.len().max(1);
    std::future::poll_fn(|cx| {
        for (segment, tap) in taps.iter().cycle().skip(start).take(taps.len()) {
            if let Poll::Ready(ready) = tap.poll_readable(cx) {
                return Poll::Ready((*segment, ready));
            }
        }
        Poll::Pending
    })
    .await
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
