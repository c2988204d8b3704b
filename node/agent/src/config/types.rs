//! The checked configuration: what [`Config::load`] hands to the rest of the agent.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;

use super::{
    DEFAULT_LIBVIRT_HOST, DEFAULT_LIBVIRT_REMOTE_BRIDGE, DEFAULT_LIBVIRT_SHUTDOWN_TIMEOUT_S,
};

/// Lowest usable 802.1Q VLAN id; 0 means "priority tag only".
pub(super) const VLAN_ID_MIN: u16 = 1;
/// Highest usable 802.1Q VLAN id; 4095 is reserved.
pub(super) const VLAN_ID_MAX: u16 = 4094;

/// Longest libvirt storage pool name accepted in `libvirt.pool`, in characters.
pub(super) const POOL_NAME_CHARS_MAX: usize = 64;
/// Shortest accepted `libvirt.shutdown_timeout_s`: a guest gets at least a second to power off.
pub(super) const SHUTDOWN_TIMEOUT_S_MIN: u64 = 1;
/// Longest accepted `libvirt.shutdown_timeout_s`: a stuck guest must not hold a cluster's
/// stop for more than ten minutes.
pub(super) const SHUTDOWN_TIMEOUT_S_MAX: u64 = 600;
/// Smallest accepted `libvirt.memory_mib`: a VM with less cannot boot a PXE firmware and a
/// kernel.
pub(super) const NODE_MEMORY_MIB_MIN: u64 = 64;
/// Largest accepted `libvirt.memory_mib` (1 TiB), to catch a value written in KiB or bytes.
pub(super) const NODE_MEMORY_MIB_MAX: u64 = 1 << 20;
/// The placeholder in `libvirt.remote_bridge` that stands for a cluster's VLAN id.
pub(super) const VLAN_PLACEHOLDER: &str = "{vlan}";
/// Longest accepted `installer.args`, in bytes: boot loaders and PXE firmware truncate or
/// refuse longer command lines, and a long one belongs in the installer's own files.
pub(super) const INSTALLER_ARGS_BYTES_MAX: usize = 1024;

/// A loaded and checked site configuration.
///
/// Every value has passed the checks in [`Config::parse`], and every path is resolved, so the
/// rest of the agent can use the fields as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file the configuration was read from, as given by the caller.
    pub path: PathBuf,
    /// `[site]`: who this site is and where it keeps its state.
    pub site: SiteConfig,
    /// `[federation]`: how this site's agent talks to other sites' agents.
    pub federation: FederationConfig,
    /// `[api]`: the local HTTP API.
    pub api: ApiConfig,
    /// `[inventory]`: the capacity this site offers, in node slots.
    pub inventory: Inventory,
    /// `[clusters]`: resources handed to the virtual clusters.
    pub clusters: ClustersConfig,
    /// `[gateway]`: the data plane that joins this site's cluster networks to other sites.
    pub gateway: GatewayConfig,
    /// `[libvirt]`: where the `libvirt` driver runs node VMs; the defaults when the table is
    /// absent, and checked whatever the driver.
    pub libvirt: LibvirtConfig,
    /// `[installer]`: what the cluster frontend serves to the nodes that network-boot, when
    /// this site is a cluster's master; the defaults when the table is absent.
    pub installer: InstallerConfig,
}

/// The `[site]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteConfig {
    /// Name of the site in the federation: a DNS label (1 to 63 characters of `[a-z0-9-]`, not
    /// starting or ending with `-`), because it appears in host names and interface names.
    pub name: String,
    /// Directory for keys, the ledger and the API token, resolved against the config directory.
    pub data_dir: PathBuf,
}

/// The `[federation]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationConfig {
    /// Addresses the federation transport listens on; never empty.
    pub listen: Vec<Multiaddr>,
    /// Other sites' agents to dial at start-up; each ends in `/p2p/<peer id>` so that the
    /// connection is authenticated against the expected peer.
    pub bootstrap: Vec<Multiaddr>,
    /// File with the federation's pre-shared key, resolved against the config directory.
    /// Whether it exists is checked by whoever opens it, not here.
    pub psk_file: Option<PathBuf>,
    /// Peer ids listed in `allow_peers`, in file order.
    pub allow_peers: Vec<PeerId>,
    /// Timing of capacity gossip.
    pub gossip: GossipTiming,
}

/// Timing of capacity gossip (`advert_ttl`, `advert_refresh`, `anti_entropy`
/// in `[federation]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GossipTiming {
    /// How long an advert stays valid; a site not heard of for this long is
    /// suspect, and gone one refresh interval later.
    pub advert_ttl: Duration,
    /// How often a site re-signs and pushes its advert even if unchanged.
    pub advert_refresh: Duration,
    /// How often a site compares views with a random peer.
    pub anti_entropy: Duration,
}

impl Default for GossipTiming {
    fn default() -> Self {
        GossipTiming {
            advert_ttl: Duration::from_secs(30),
            advert_refresh: Duration::from_secs(10),
            anti_entropy: Duration::from_secs(2),
        }
    }
}

/// The `[api]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Address of the local HTTP API.
    pub listen: SocketAddr,
    /// File holding the API token; `<data_dir>/api.token` unless set.
    pub token_file: PathBuf,
    /// Most open connections; a connection beyond is answered `503` and
    /// closed.
    pub connections_max: u32,
    /// Most requests handled at once (`/healthz` aside); a request beyond is
    /// answered `503` with code `busy`.
    pub requests_max: u32,
    /// How long a client may take to send a request's headers, then its
    /// body, and to take some of an answer; an idle keep-alive connection is
    /// closed after it too, and at shutdown it bounds the wait for open
    /// connections.
    pub client_timeout: Duration,
}

/// `api.connections_max` when the config does not set it: the CLI and a
/// scraper need a handful; the systemd unit allows 65536 open files.
pub(super) const DEFAULT_API_CONNECTIONS_MAX: u32 = 1024;
/// Bounds of `api.connections_max`.
pub(super) const API_CONNECTIONS_MAX_MIN: u32 = 16;
/// See [`API_CONNECTIONS_MAX_MIN`].
pub(super) const API_CONNECTIONS_MAX_MAX: u32 = 16_384;
/// `api.requests_max` when the config does not set it: handlers share one
/// ledger, one call at a time, so more in flight only queue there (and
/// each waiting ledger call takes a thread of the blocking pool).
pub(super) const DEFAULT_API_REQUESTS_MAX: u32 = 64;
/// Bounds of `api.requests_max`.
pub(super) const API_REQUESTS_MAX_MIN: u32 = 1;
/// See [`API_REQUESTS_MAX_MIN`].
pub(super) const API_REQUESTS_MAX_MAX: u32 = 4096;
/// `api.client_timeout` when the config does not set it.
pub(super) const DEFAULT_API_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds of `api.client_timeout`.
pub(super) const API_CLIENT_TIMEOUT_MIN: Duration = Duration::from_secs(1);
/// See [`API_CLIENT_TIMEOUT_MIN`].
pub(super) const API_CLIENT_TIMEOUT_MAX: Duration = Duration::from_secs(300);

/// The resources of one node slot, the unit of capacity a site offers.
pub use vcfed_storage::NodeShape;

/// One machine of the site, listed under `[[inventory.hosts]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Name of the host, unique within the site.
    pub name: String,
    /// CPU cores.
    pub cores: u32,
    /// Memory, in MiB.
    pub memory_mib: u64,
    /// Disk, in GiB.
    pub disk_gib: u64,
}

/// How the inventory states its capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InventorySource {
    /// `nodes = N`: N slots of the node shape, wherever they are.
    Nodes(u32),
    /// `[[inventory.hosts]]`: the machines, each holding as many slots as fit in it.
    Hosts(Vec<Host>),
}

/// The `[inventory]` table: what this site offers to the federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// The shape of one node slot; every dimension is at least 1 in a loaded config.
    pub node: NodeShape,
    /// Where the number of slots comes from.
    pub source: InventorySource,
}

/// An inclusive range of 802.1Q VLAN ids, written `"FIRST-LAST"` (or `"ID"` for one id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanRange {
    /// First id of the range, within 1-4094.
    pub first: u16,
    /// Last id of the range, within `first`-4094.
    pub last: u16,
}

/// Why a string is not a [`VlanRange`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseVlanRangeError {
    /// The text is not `FIRST-LAST` or `ID` written with decimal digits.
    #[error("expected \"FIRST-LAST\" or a single \"ID\" in decimal digits")]
    Syntax,
    /// An id is 0, 4095 or larger; 802.1Q reserves 0 and 4095.
    #[error("VLAN ids must be within {VLAN_ID_MIN}-{VLAN_ID_MAX}")]
    OutOfRange,
    /// The first id is greater than the last.
    #[error("the first id {first} is greater than the last id {last}")]
    Reversed {
        /// The first id as written.
        first: u16,
        /// The last id as written.
        last: u16,
    },
}

/// The `[clusters]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClustersConfig {
    /// VLAN ids this site may give to cluster networks.
    pub vlans: VlanRange,
    /// How this site runs the nodes of its clusters.
    pub driver: DriverKind,
    /// How long a worker site of a cluster this site masters must be both
    /// gone from the gossip view and silent before its parts are declared
    /// lost (and, by the cluster's heal policy, replaced).
    pub heal_grace: Duration,
    /// How long a worker holds nodes for a master before its commit.
    pub lease: Duration,
    /// How long a master may take to collect every hold of a request (its
    /// own hold lasts this plus `lease`).
    pub reserve_deadline: Duration,
}

/// `clusters.heal_grace` when the config does not set it.
pub(super) const DEFAULT_HEAL_GRACE: Duration = Duration::from_secs(60);
/// Bounds of `clusters.heal_grace`: shorter would fence sites over a
/// missed advert; longer leaves clusters short for most of a window.
pub(super) const HEAL_GRACE_MIN: Duration = Duration::from_secs(10);
/// See [`HEAL_GRACE_MIN`].
pub(super) const HEAL_GRACE_MAX: Duration = Duration::from_secs(3600);
/// `clusters.lease` when the config does not set it.
pub(super) const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Bounds of `clusters.lease` (a worker grants at most 10 minutes).
pub(super) const LEASE_MIN: Duration = Duration::from_secs(5);
/// See [`LEASE_MIN`].
pub(super) const LEASE_MAX: Duration = Duration::from_secs(600);
/// `clusters.reserve_deadline` when the config does not set it.
pub(super) const DEFAULT_RESERVE_DEADLINE: Duration = Duration::from_secs(60);
/// Bounds of `clusters.reserve_deadline`.
pub(super) const RESERVE_DEADLINE_MIN: Duration = Duration::from_secs(10);
/// See [`RESERVE_DEADLINE_MIN`].
pub(super) const RESERVE_DEADLINE_MAX: Duration = Duration::from_secs(600);

/// `clusters.driver`: how a site runs the nodes of its clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriverKind {
    /// `"none"`: nodes are reserved but nothing is started; clusters stay
    /// `reserved` through their window.
    #[default]
    None,
    /// `"sim"`: nodes "install" at once, with no side effect and no data
    /// plane (for simulations and trying the lifecycle out).
    Sim,
    /// `"netns"`: each node is a network namespace on the cluster's bridge,
    /// booted over DHCP/TFTP from the frontend, and the agent runs the
    /// gateway that links the cluster's sites (needs root).
    Netns,
    /// `"libvirt"`: each compute node is a libvirt virtual machine (QEMU)
    /// that PXE-boots from the cluster's frontend; the frontend stays the
    /// built-in dnsmasq service, and the agent runs the gateway as with
    /// `netns` (needs root and a running libvirtd). Configured by
    /// [`LibvirtConfig`].
    Libvirt,
}

impl DriverKind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::None => "none",
            DriverKind::Sim => "sim",
            DriverKind::Netns => "netns",
            DriverKind::Libvirt => "libvirt",
        }
    }
}

/// How cluster traffic reaches this site's machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteLink {
    /// `bridge = "..."`: cluster ports attach to this existing Linux bridge.
    Bridge(String),
    /// `trunk = "..."`: cluster networks are 802.1Q VLANs on this interface.
    Trunk(String),
}

/// The `[gateway]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// UDP address of the data plane.
    pub listen: SocketAddr,
    /// Public `host:port` at which other sites reach this gateway, if set.
    pub endpoint: Option<String>,
    /// The site link; `None` means none is configured yet.
    pub site_link: Option<SiteLink>,
    /// How long the data plane polls without sleeping after a packet
    /// (zero: it sleeps at once).
    pub busy_poll: Duration,
    /// The niceness of the data plane's thread (zero: unchanged).
    pub nice: i32,
}

/// The `[libvirt]` table: the hypervisor hosts and the disks, consoles and limits of the
/// node VMs that the `libvirt` driver runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtConfig {
    /// libvirt connection URIs of the site's hypervisor hosts, in file order: never empty, no
    /// two equal, each `DRIVER[+TRANSPORT]://[[USER@]HOST[:PORT]]/PATH[?PARAMS]` with DRIVER
    /// `qemu` or `test` (`test:///default` is libvirt's built-in fake host).
    pub hosts: Vec<String>,
    /// Name of an existing libvirt storage pool for the nodes' disks; `None` means the agent
    /// defines its own `dir` pool under `<data_dir>/pool`.
    pub pool: Option<String>,
    /// Absolute path of a disk image that every node volume is a copy-on-write overlay of.
    /// Whether it exists is checked by the driver, per node, not here.
    pub base_image: Option<PathBuf>,
    /// Absolute path of a disk image the master's frontend boots from as a VM (a
    /// copy-on-write overlay of it per cluster); `None`: the built-in frontend service.
    pub frontend_image: Option<PathBuf>,
    /// Directory for the nodes' serial console logs; `<data_dir>/consoles` unless set, and
    /// absolute when set.
    pub console_dir: PathBuf,
    /// Whether node volumes are kept after their cluster ends.
    pub keep_volumes: bool,
    /// Which accelerator the node VMs run on.
    pub accel: Accel,
    /// Seconds an ACPI shutdown may take before the VM is destroyed; within 1-600.
    pub shutdown_timeout_s: u64,
    /// Cap on a node VM's memory, in MiB, within 64-1048576; `None` gives a node the memory
    /// its cluster's request asks for.
    pub memory_mib: Option<u64>,
    /// Name of the Linux bridge that carries a cluster's VLAN from the site trunk, on every
    /// host but the first, with `{vlan}` (present exactly once) standing for the VLAN id; see
    /// [`LibvirtConfig::remote_bridge_for`].
    pub remote_bridge: String,
}

/// The `[installer]` table: the kernel, and optionally an operator's own installer, that the
/// frontend of a cluster (at its master site) serves to the nodes that network-boot.
///
/// Every field is optional; [`InstallerConfig::default`] is what an absent table means. A
/// loaded config guarantees that `initrd` is set only with `kernel`, and `args` only with
/// `initrd`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstallerConfig {
    /// Absolute path of the kernel the frontend serves; `None`: the newest `/boot/vmlinuz-*`
    /// of the master's machine. The built-in installer needs the kernel's modules in
    /// `/lib/modules/<version>`, where `<version>` is what follows `vmlinuz-` in the file
    /// name. Whether the file exists is checked by whoever serves it, not here.
    pub kernel: Option<PathBuf>,
    /// Absolute path of an operator's own installer initrd (a Debian netboot initrd with a
    /// preseed, a kickstart, a Rocks-style installer...); when set, the frontend serves
    /// `kernel` with this initrd and `args` instead of the built-in installer. Set only
    /// together with `kernel`.
    pub initrd: Option<PathBuf>,
    /// Kernel command line of the operator's installer: set only together with `initrd`, at
    /// most 1024 bytes, without control characters.
    pub args: Option<String>,
}

/// `libvirt.accel`: what runs the node VMs' CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// `"auto"`: KVM if `/dev/kvm` works on the host, else TCG.
    #[default]
    Auto,
    /// `"kvm"`: hardware virtualization through `/dev/kvm`, which every host must offer.
    Kvm,
    /// `"tcg"`: QEMU's software emulation, slow but available everywhere.
    Tcg,
}

impl Accel {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl LibvirtConfig {
    /// What an absent `[libvirt]` table means for a site whose data dir is `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        LibvirtConfig {
            hosts: vec![DEFAULT_LIBVIRT_HOST.to_owned()],
            pool: None,
            base_image: None,
            frontend_image: None,
            console_dir: data_dir.join("consoles"),
            keep_volumes: false,
            accel: Accel::default(),
            shutdown_timeout_s: DEFAULT_LIBVIRT_SHUTDOWN_TIMEOUT_S,
            memory_mib: None,
            remote_bridge: DEFAULT_LIBVIRT_REMOTE_BRIDGE.to_owned(),
        }
    }

    /// The bridge that carries VLAN `vlan` on a host other than the first: `remote_bridge`
    /// with `{vlan}` replaced by the id in decimal. A loaded config guarantees a valid
    /// interface name for every id within 1-4094.
    pub fn remote_bridge_for(&self, vlan: u16) -> String {
        self.remote_bridge
            .replacen(VLAN_PLACEHOLDER, &vlan.to_string(), 1)
    }

    /// `shutdown_timeout_s` as a [`Duration`].
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_s)
    }
}

impl Config {
    /// The federation's identity key: `<data_dir>/federation.key`.
    pub fn federation_key_path(&self) -> PathBuf {
        self.site.data_dir.join("federation.key")
    }

    /// The gateway's tunnel key: `<data_dir>/tunnel.key`.
    pub fn tunnel_key_path(&self) -> PathBuf {
        self.site.data_dir.join("tunnel.key")
    }

    /// The site's ledger database: `<data_dir>/ledger.db`.
    pub fn ledger_path(&self) -> PathBuf {
        self.site.data_dir.join("ledger.db")
    }

    /// The fields that differ between `self` and `other`, as dotted paths in the file's
    /// order (`clusters.vlans`); `inventory` stands for the whole table. Empty when the two
    /// mean the same site. The file's path itself is not compared.
    ///
    /// The structs are destructured in full so that a new field cannot be left out here
    /// without the compiler saying so.
    pub fn changed_fields(&self, other: &Config) -> Vec<&'static str> {
        let Config {
            path: _,
            site: SiteConfig { name, data_dir },
            federation:
                FederationConfig {
                    listen,
                    bootstrap,
                    psk_file,
                    allow_peers,
                    gossip:
                        GossipTiming {
                            advert_ttl,
                            advert_refresh,
                            anti_entropy,
                        },
                },
            api:
                ApiConfig {
                    listen: api_listen,
                    token_file,
                    connections_max,
                    requests_max,
                    client_timeout,
                },
            inventory,
            clusters:
                ClustersConfig {
                    vlans,
                    driver,
                    heal_grace,
                    lease,
                    reserve_deadline,
                },
            gateway:
                GatewayConfig {
                    listen: gateway_listen,
                    endpoint,
                    site_link,
                    busy_poll,
                    nice,
                },
            libvirt:
                LibvirtConfig {
                    hosts,
                    pool,
                    base_image,
                    frontend_image,
                    console_dir,
                    keep_volumes,
                    accel,
                    shutdown_timeout_s,
                    memory_mib,
                    remote_bridge,
                },
            installer:
                InstallerConfig {
                    kernel,
                    initrd,
                    args,
                },
        } = self;
        let (f, g, l) = (&other.federation, &other.federation.gossip, &other.libvirt);
        let i = &other.installer;
        let fields = [
            ("site.name", *name == other.site.name),
            ("site.data_dir", *data_dir == other.site.data_dir),
            ("federation.listen", *listen == f.listen),
            ("federation.bootstrap", *bootstrap == f.bootstrap),
            ("federation.psk_file", *psk_file == f.psk_file),
            ("federation.allow_peers", *allow_peers == f.allow_peers),
            ("federation.advert_ttl", *advert_ttl == g.advert_ttl),
            (
                "federation.advert_refresh",
                *advert_refresh == g.advert_refresh,
            ),
            ("federation.anti_entropy", *anti_entropy == g.anti_entropy),
            ("api.listen", *api_listen == other.api.listen),
            ("api.token_file", *token_file == other.api.token_file),
            (
                "api.connections_max",
                *connections_max == other.api.connections_max,
            ),
            ("api.requests_max", *requests_max == other.api.requests_max),
            (
                "api.client_timeout",
                *client_timeout == other.api.client_timeout,
            ),
            ("inventory", *inventory == other.inventory),
            ("clusters.vlans", *vlans == other.clusters.vlans),
            ("clusters.driver", *driver == other.clusters.driver),
            (
                "clusters.heal_grace",
                *heal_grace == other.clusters.heal_grace,
            ),
            ("clusters.lease", *lease == other.clusters.lease),
            (
                "clusters.reserve_deadline",
                *reserve_deadline == other.clusters.reserve_deadline,
            ),
            ("gateway.listen", *gateway_listen == other.gateway.listen),
            ("gateway.endpoint", *endpoint == other.gateway.endpoint),
            (
                "gateway.bridge/trunk",
                *site_link == other.gateway.site_link,
            ),
            ("gateway.busy_poll", *busy_poll == other.gateway.busy_poll),
            ("gateway.nice", *nice == other.gateway.nice),
            ("libvirt.hosts", *hosts == l.hosts),
            ("libvirt.pool", *pool == l.pool),
            ("libvirt.base_image", *base_image == l.base_image),
            (
                "libvirt.frontend_image",
                *frontend_image == l.frontend_image,
            ),
            ("libvirt.console_dir", *console_dir == l.console_dir),
            ("libvirt.keep_volumes", *keep_volumes == l.keep_volumes),
            ("libvirt.accel", *accel == l.accel),
            (
                "libvirt.shutdown_timeout_s",
                *shutdown_timeout_s == l.shutdown_timeout_s,
            ),
            ("libvirt.memory_mib", *memory_mib == l.memory_mib),
            ("libvirt.remote_bridge", *remote_bridge == l.remote_bridge),
            ("installer.kernel", *kernel == i.kernel),
            ("installer.initrd", *initrd == i.initrd),
            ("installer.args", *args == i.args),
        ];
        fields
            .into_iter()
            .filter(|(_, same)| !same)
            .map(|(name, _)| name)
            .collect()
    }
}

impl Inventory {
    /// Number of node slots the site offers.
    ///
    /// A loaded config holds at least 1 and at most `u32::MAX` slots; for an inventory built
    /// by hand the count saturates at `u32::MAX`.
    pub fn slots(&self) -> u32 {
        u32::try_from(self.slots_wide()).unwrap_or(u32::MAX)
    }

    /// The slot count without the `u32` limit, so that loading can refuse an overflow instead
    /// of silently saturating.
    pub(super) fn slots_wide(&self) -> u64 {
        match &self.source {
            InventorySource::Nodes(count) => u64::from(*count),
            InventorySource::Hosts(hosts) => hosts
                .iter()
                .map(|host| u64::from(host.slots(&self.node)))
                .fold(0, u64::saturating_add),
        }
    }
}

impl Host {
    /// Number of slots of shape `node` that fit in this host: the smallest of the per-dimension
    /// quotients, rounded down. A zero dimension of `node` does not limit the count.
    pub fn slots(&self, node: &NodeShape) -> u32 {
        let quotient = |have: u64, need: u64| have.checked_div(need).unwrap_or(u64::MAX);
        let slots = quotient(u64::from(self.cores), u64::from(node.cores))
            .min(quotient(self.memory_mib, node.memory_mib))
            .min(quotient(self.disk_gib, node.disk_gib));
        u32::try_from(slots).unwrap_or(u32::MAX)
    }
}

impl VlanRange {
    /// Number of VLAN ids in the range; 0 only for a hand-built range with `first > last`.
    pub fn len(&self) -> u16 {
        if self.is_empty() {
            0
        } else {
            self.last - self.first + 1
        }
    }

    /// Whether the range holds no id, which only a hand-built range with `first > last` does.
    pub fn is_empty(&self) -> bool {
        self.first > self.last
    }
}

impl FromStr for VlanRange {
    type Err = ParseVlanRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (first, last) = match text.split_once('-') {
            Some((first, last)) => (parse_vlan_id(first)?, parse_vlan_id(last)?),
            None => {
                let id = parse_vlan_id(text)?;
                (id, id)
            }
        };
        if first > last {
            return Err(ParseVlanRangeError::Reversed { first, last });
        }
        Ok(VlanRange { first, last })
    }
}

impl fmt::Display for VlanRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

fn parse_vlan_id(text: &str) -> Result<u16, ParseVlanRangeError> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseVlanRangeError::Syntax);
    }
    // Any digit string is a number, only perhaps too large for u16; that is a range problem,
    // not a syntax one, so that "70000" gets the same message as "5000".
    let id = text
        .parse::<u16>()
        .map_err(|_| ParseVlanRangeError::OutOfRange)?;
    if !(VLAN_ID_MIN..=VLAN_ID_MAX).contains(&id) {
        return Err(ParseVlanRangeError::OutOfRange);
    }
    Ok(id)
}
