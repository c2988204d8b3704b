//! The Linux shell around [`Gateway`](crate::gateway::Gateway): TAP
//! devices, one UDP socket and netlink link setup, driven by tokio.
//!
//! One TAP device per segment carries the frames of the site's side of the
//! segment; one UDP socket carries every tunnel. The shell owns no protocol
//! logic: it reads frames and datagrams, hands them to the gateway with the
//! time, sends whatever the gateway outputs, and ticks its timers.
//!
//! # Site side of a segment
//!
//! Each segment reaches the site's machines in one of three ways
//! ([`SiteLink`]):
//! - **bridge mode**: the TAP joins an existing Linux bridge of the site
//!   (the bridge the VMs of the cluster are on);
//! - **trunk mode**: the gateway creates a segment bridge, an 802.1Q
//!   sub-interface `<trunk>.<vlan>` of the site's trunk, and puts both the
//!   sub-interface and the TAP in the bridge;
//! - **segment bridge only**: the gateway creates the segment bridge with
//!   the TAP in it, and whoever runs the VMs attaches their ports to it.
//!
//! # Links the gateway owns
//!
//! Links the gateway creates carry the alias `vcfed-gateway:<prefix>`
//! (IFLA_IFALIAS), and segment bridges are named `<prefix>b<segment>`. Both
//! marks survive a crash, so a restarted gateway knows its leftovers: at
//! start it deletes marked links that the configuration no longer names and
//! reuses the ones it does; at a clean stop it deletes every marked link of
//! its configuration. It never deletes a link it did not mark: the site
//! bridge, the trunk, or a VLAN sub-interface that existed before it. TAP
//! devices are not persistent, so they vanish with the process.

mod netlink;
mod shell;
mod tap;
mod udp;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

pub use shell::{
    INPUT_BATCH_BYTES, INPUT_BATCH_MAX, LANE_BATCH_BYTES, LANE_LOOK_BYTES, LOOK_TAPS_MAX,
    SEGMENTS_MAX, ShellStats, run, run_dynamic, run_reloadable,
};
pub use udp::SOCKET_BUFFER_BYTES;

use crate::gateway::PeerConfig;
use crate::switch::PeerIndex;

/// Longest Linux interface name, bytes (`IFNAMSIZ` − 1).
pub const IFNAME_LEN_MAX: usize = 15;
/// Smallest accepted inner MTU, bytes (the IPv4 minimum datagram size).
pub const INNER_MTU_MIN: usize = 576;
/// Largest accepted inner MTU, bytes (a 9000-byte jumbo path − 60).
pub const INNER_MTU_MAX: usize = 8940;
/// Longest busy-poll window: a gateway that polls keeps a core busy for
/// that long after every packet, so more than a second only burns CPU.
pub const BUSY_POLL_MAX: Duration = Duration::from_secs(1);
/// Highest priority a gateway's thread may ask for (Linux's lowest
/// niceness). Under a bulk transfer that shares the cores, the loop's
/// thread competes with the senders for CPU, and a ping waits for its turn.
pub const NICE_MIN: i32 = -20;
/// Lowest priority (Linux's highest niceness).
pub const NICE_MAX: i32 = 19;
/// Default prefix of the names of the links the gateway creates.
pub const LINK_PREFIX_DEFAULT: &str = "vcf";

/// Everything the shell needs to run a gateway, already checked.
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The WireGuard private key of this gateway.
    pub private_key: [u8; 32],
    /// UDP address of the data plane.
    pub listen: SocketAddr,
    /// Largest inner packet (WAN path MTU − 60); larger frames are
    /// fragmented.
    pub inner_mtu: usize,
    /// The peer gateways.
    pub peers: Vec<PeerConfig>,
    /// The segments this gateway carries.
    pub segments: Vec<SegmentConfig>,
    /// Prefix of the names of the links the gateway creates, e.g. `vcf`
    /// gives `vcft7` (TAP) and `vcfb7` (bridge) for segment 7.
    pub link_prefix: String,
    /// How long the loop keeps polling its devices after the last packet
    /// instead of sleeping ([`BUSY_POLL_MAX`] at most; zero: never).
    pub busy_poll: Duration,
    /// The niceness of the loop's thread ([`NICE_MIN`] to [`NICE_MAX`]);
    /// zero leaves it as it is. Below zero needs CAP_SYS_NICE.
    pub nice: i32,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key never reaches logs.
        f.debug_struct("GatewayConfig")
            .field("listen", &self.listen)
            .field("inner_mtu", &self.inner_mtu)
            .field("peers", &self.peers)
            .field("segments", &self.segments)
            .field("link_prefix", &self.link_prefix)
            .field("busy_poll", &self.busy_poll)
            .field("nice", &self.nice)
            .finish_non_exhaustive()
    }
}

/// The fixed settings of a gateway whose segments and peers change while
/// it runs ([`run_dynamic`]): the agent's gateway.
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayBase {
    /// The WireGuard private key of this gateway.
    pub private_key: [u8; 32],
    /// UDP address of the data plane.
    pub listen: SocketAddr,
    /// Largest inner packet (WAN path MTU − 60).
    pub inner_mtu: usize,
    /// Prefix of the names of the links the gateway creates.
    pub link_prefix: String,
    /// How long the loop keeps polling after the last packet
    /// ([`GatewayConfig::busy_poll`]).
    pub busy_poll: Duration,
    /// The niceness of the loop's thread ([`GatewayConfig::nice`]).
    pub nice: i32,
}

impl std::fmt::Debug for GatewayBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBase")
            .field("listen", &self.listen)
            .field("inner_mtu", &self.inner_mtu)
            .field("link_prefix", &self.link_prefix)
            .field("busy_poll", &self.busy_poll)
            .field("nice", &self.nice)
            .finish_non_exhaustive()
    }
}

/// What a dynamic gateway should carry now: its segments, each with the
/// peer gateways it reaches. Peers are named by public key; the gateway
/// numbers them itself, and drops a peer no segment names any more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    /// The segments.
    pub segments: Vec<CarriedSegment>,
}

/// One segment of [`Carried`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedSegment {
    /// The segment id.
    pub id: u32,
    /// How it reaches this site's machines.
    pub site_link: SiteLink,
    /// The peer gateways of the cluster's other sites.
    pub peers: Vec<CarriedPeer>,
}

/// A peer gateway of [`CarriedSegment`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedPeer {
    /// Its WireGuard public key.
    pub public_key: [u8; 32],
    /// Where to reach it.
    pub endpoint: Option<SocketAddr>,
}

/// What a dynamic gateway reports back while it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayReport {
    /// Per carried segment: the bridge its local ports join, or why the
    /// segment could not be set up (it is retried).
    pub segments: BTreeMap<u32, Result<String, String>>,
    /// Public keys of the peers with a live session.
    pub sessions: BTreeSet<[u8; 32]>,
    /// The data plane's own counters: drops by kind, cookie replies
    /// (refreshed every second).
    pub gateway_stats: crate::gateway::GatewayStats,
    /// Counters of each peer's tunnel, by public key (refreshed every
    /// second).
    pub peer_stats: BTreeMap<[u8; 32], crate::gateway::PeerStats>,
    /// Counters of each segment's switch, by segment id (refreshed every
    /// second).
    pub segment_stats: BTreeMap<u32, crate::switch::SwitchStats>,
}

/// One segment (cluster network) as this gateway carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentConfig {
    /// The segment id, carried in every encapsulated frame.
    pub id: u32,
    /// The peers (by [`PeerConfig::index`]) that carry it too.
    pub peers: Vec<PeerIndex>,
    /// How the segment reaches this site's machines.
    pub site_link: SiteLink,
}

/// How a segment reaches this site's machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteLink {
    /// Bridge mode: the TAP joins this existing Linux bridge.
    Bridge(String),
    /// Trunk mode: an 802.1Q sub-interface of `trunk` for `vlan`, in a
    /// segment bridge the gateway creates.
    Trunk {
        /// The site's trunk interface.
        trunk: String,
        /// The cluster's VLAN id at this site, 1-4094.
        vlan: u16,
    },
    /// Only a segment bridge the gateway creates; local ports are attached
    /// to it by whoever runs the VMs.
    SegmentBridge,
}

/// Names of the links of one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentLinkNames {
    /// The TAP device.
    pub tap: String,
    /// The bridge the TAP joins.
    pub bridge: String,
    /// The 802.1Q sub-interface, in trunk mode.
    pub vlan: Option<String>,
}

/// The names of the links of segment `segment` with `prefix`, without
/// checking their length (see [`IFNAME_LEN_MAX`]).
pub fn link_names(prefix: &str, segment: &SegmentConfig) -> SegmentLinkNames {
    let own_bridge = segment_bridge_name(prefix, segment.id);
    let (bridge, vlan) = match &segment.site_link {
        SiteLink::Bridge(bridge) => (bridge.clone(), None),
        SiteLink::Trunk { trunk, vlan } => (own_bridge, Some(format!("{trunk}.{vlan}"))),
        SiteLink::SegmentBridge => (own_bridge, None),
    };
    SegmentLinkNames {
        tap: format!("{prefix}t{}", segment.id),
        bridge,
        vlan,
    }
}

/// The name of the bridge the gateway creates for `segment`.
pub fn segment_bridge_name(prefix: &str, segment: u32) -> String {
    format!("{prefix}b{segment}")
}

/// Why the shell stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The UDP socket could not be bound or failed.
    #[error("UDP socket {addr}: {source}")]
    Udp {
        /// The listen address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A TAP device could not be opened or failed.
    #[error("TAP device {name}: {source}")]
    Tap {
        /// The device name.
        name: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("netlink: {what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// What the kernel or the library said.
        source: rtnetlink::Error,
    },
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {0}")]
    NetlinkSocket(std::io::Error),
    /// The loop's thread could not take the niceness it was given.
    #[error("setting the gateway thread's niceness to {nice}: {source}")]
    Nice {
        /// The niceness asked for.
        nice: i32,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A link the configuration names does not exist.
    #[error("{what} {name} does not exist")]
    MissingLink {
        /// Its name.
        name: String,
        /// What it should be, e.g. "site bridge".
        what: &'static str,
    },
    /// A link exists but is not of the kind the configuration needs.
    #[error("{name} is a {found} link, not a {expected}")]
    WrongKind {
        /// Its name.
        name: String,
        /// The kind needed.
        expected: &'static str,
        /// The kind found ("unknown" when the kernel did not say).
        found: String,
    },
    /// The configuration does not fit the gateway's limits.
    #[error("configuration: {0}")]
    Config(String),
}

impl ShellError {
    /// Whether the kernel refused for lack of privilege (the gateway needs
    /// CAP_NET_ADMIN).
    pub fn is_permission_denied(&self) -> bool {
        const EPERM_NEGATED: i32 = -1;
        match self {
            ShellError::Tap { source, .. }
            | ShellError::Udp { source, .. }
            | ShellError::Nice { source, .. }
            | ShellError::NetlinkSocket(source) => {
                source.kind() == std::io::ErrorKind::PermissionDenied
            }
            ShellError::Netlink {
                source: rtnetlink::Error::NetlinkError(message),
                ..
            } => message.raw_code() == EPERM_NEGATED,
            _ => false,
        }
    }
}
