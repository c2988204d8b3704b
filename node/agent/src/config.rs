//! The site configuration file, `vcfed.toml`.
//!
//! `vcfed init` writes a commented file with [`render_template`]; `vcfed run --config FILE`
//! reads it with [`Config::load`]. A bad file is refused before anything starts, with a
//! [`ConfigError`] that names the file, the line and column, the field (as a dotted path such
//! as `inventory.hosts[1].cores`) and, where one helps, a hint saying how to fix it.
//!
//! Loading takes two passes. Serde first deserializes the TOML into private `Raw*` structs that
//! reject unknown fields and keep the byte span of every value that a later check looks at
//! ([`toml::Spanned`]). A second pass then checks the rules serde cannot express (name syntax,
//! address forms, VLAN bounds, "exactly one of", capacity) and builds the public types. Keeping
//! the spans is what lets every error, including the semantic ones, name a line.
//!
//! Relative paths in the file are resolved against the directory that holds the file, so a
//! configuration means the same thing whatever the working directory of `vcfed` is.

// `ConfigError` is a plain struct of location fields (about 128 bytes) so that callers can read
// them directly. It is built at most once per start-up, so the size of `Result` costs nothing
// worth boxing for.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use libp2p_identity::PeerId;
use multiaddr::{Multiaddr, Protocol};
use serde::Deserialize;
use toml::Spanned;

/// Default address of the local HTTP API: loopback only, so it is not exposed by accident.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7780";
/// Default listen address of the federation (libp2p) transport.
pub const DEFAULT_FEDERATION_LISTEN: &str = "/ip4/0.0.0.0/tcp/7781";
/// Default UDP address of the data-plane gateway.
pub const DEFAULT_GATEWAY_LISTEN: &str = "0.0.0.0:7782";
/// Conventional file name of the site configuration.
pub const CONFIG_FILE_NAME: &str = "vcfed.toml";

/// Longest site name, in characters: a site name is a DNS label (RFC 1035).
const SITE_NAME_CHARS_MAX: usize = 63;
/// Longest Linux interface name, in bytes (`IFNAMSIZ` is 16 including the NUL).
const IFNAME_BYTES_MAX: usize = 15;
/// Longest DNS name accepted in `gateway.endpoint`, in bytes, without a trailing dot.
const DNS_NAME_BYTES_MAX: usize = 253;
/// Lowest usable 802.1Q VLAN id; 0 means "priority tag only".
const VLAN_ID_MIN: u16 = 1;
/// Highest usable 802.1Q VLAN id; 4095 is reserved.
const VLAN_ID_MAX: u16 = 4094;

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

/// Longest accepted advert TTL.
const ADVERT_TTL_MAX: Duration = Duration::from_secs(3600);
/// Shortest accepted gossip interval.
const GOSSIP_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// The `[api]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Address of the local HTTP API.
    pub listen: SocketAddr,
    /// File holding the API token; `<data_dir>/api.token` unless set.
    pub token_file: PathBuf,
}

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
}

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
}

impl DriverKind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::None => "none",
            DriverKind::Sim => "sim",
            DriverKind::Netns => "netns",
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
}

/// Why a configuration was refused.
///
/// Its `Display` is one paragraph, `FILE:LINE:COLUMN: field `FIELD`: MESSAGE`, with the hint
/// on a second, indented line; parts that are not known are left out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The configuration file, as given by the caller.
    pub path: PathBuf,
    /// 1-based line the problem is on; `None` when the problem has no place in the file (the
    /// file cannot be read, or a whole top-level table is missing).
    pub line: Option<usize>,
    /// 1-based column, in characters, within `line`.
    pub column: Option<usize>,
    /// Dotted path of the field at fault, e.g. `inventory.hosts[1].cores`; `None` for syntax
    /// errors and unreadable files.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is something more useful to say than the message.
    pub hint: Option<String>,
}

impl ConfigError {
    /// A configuration file that cannot be read (missing, no permission,
    /// not UTF-8): no line to point at, the I/O error in the message.
    pub(crate) fn unreadable(path: &Path, error: &std::io::Error) -> ConfigError {
        ConfigError {
            path: path.to_path_buf(),
            line: None,
            column: None,
            field: None,
            message: format!("cannot read the configuration file: {error}"),
            hint: None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and checks the configuration file at `path`.
    ///
    /// An unreadable file (missing, no permission, not UTF-8) gives an error without a line
    /// whose message includes the I/O error.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(path, &e))?;
        Config::parse(&text, path)
    }

    /// Parses and checks configuration `text` that was read from `path`.
    ///
    /// `path` names the file in errors, and relative paths in the text are resolved against
    /// its directory.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let source = Source { path, text };
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| source.error(e.span(), None, e.message().to_owned(), None))?;
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| source.deserialize_error(e))?;
        raw.check(&source)
    }

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
    fn slots_wide(&self) -> u64 {
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

/// What `vcfed init` puts in a new config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitParams {
    /// `site.name`.
    pub site: String,
    /// `site.data_dir`; a relative path is later resolved against the config file's directory.
    pub data_dir: PathBuf,
    /// `api.listen`.
    pub api_listen: SocketAddr,
    /// `federation.listen`.
    pub federation_listen: Vec<Multiaddr>,
    /// `gateway.listen`.
    pub gateway_listen: SocketAddr,
    /// `inventory.nodes`.
    pub nodes: u32,
    /// `inventory.node`.
    pub node: NodeShape,
    /// `clusters.vlans`.
    pub vlans: VlanRange,
    /// `federation.bootstrap`.
    pub bootstrap: Vec<Multiaddr>,
}

impl InitParams {
    /// Parameters with the defaults: the listen constants above, 4 slots of 2 cores, 4096 MiB
    /// and 20 GiB, VLANs 100-199 and no bootstrap peers.
    pub fn new(site: String, data_dir: PathBuf) -> Self {
        InitParams {
            site,
            data_dir,
            api_listen: DEFAULT_API_LISTEN
                .parse()
                .expect("DEFAULT_API_LISTEN is a valid socket address"),
            federation_listen: vec![
                DEFAULT_FEDERATION_LISTEN
                    .parse()
                    .expect("DEFAULT_FEDERATION_LISTEN is a valid multiaddr"),
            ],
            gateway_listen: DEFAULT_GATEWAY_LISTEN
                .parse()
                .expect("DEFAULT_GATEWAY_LISTEN is a valid socket address"),
            nodes: 4,
            node: NodeShape {
                cores: 2,
                memory_mib: 4096,
                disk_gib: 20,
            },
            vlans: VlanRange {
                first: 100,
                last: 199,
            },
            bootstrap: Vec::new(),
        }
    }
}

/// Renders a new, fully commented configuration file from `p`.
///
/// Every field is present, or shown commented out, with a comment saying what it is, its unit
/// and its default. The values are not checked here: to check them, pass the result to
/// [`Config::parse`], which gives back exactly the values of `p` when they are valid (and
/// `p.data_dir` is absolute or the file lives in the working directory). TOML files are UTF-8,
/// so a `data_dir` that is not valid UTF-8 is written lossily.
pub fn render_template(p: &InitParams) -> String {
    let data_dir = p.data_dir.to_string_lossy();
    let token_file = p.data_dir.join("api.token");
    let node = &p.node;
    format!(
        r#"# vcfed site configuration.
#
# Written by `vcfed init` and read by `vcfed run --config FILE`. Relative paths
# are resolved against the directory that holds this file. Fields shown
# commented out are optional: remove the leading `#` to set one.

[site]
# Name of this site in the federation (required): 1 to 63 lowercase letters,
# digits and '-', not starting or ending with '-' (a DNS label).
name = {site}
# Directory for this site's keys, ledger and API token (required).
data_dir = {data_dir}

[federation]
# Multiaddresses the federation transport listens on; at least one.
# Default: ["{DEFAULT_FEDERATION_LISTEN}"].
listen = {federation_listen}
# Agents of other sites to connect to at start-up. Each address must end in
# /p2p/<peer id> of that agent, e.g.
# "/ip4/203.0.113.7/tcp/7781/p2p/12D3KooW...". Default: [].
bootstrap = {bootstrap}
# File holding the federation's pre-shared key. Default: unset.
# psk_file = "federation.psk"
# Peer ids of other sites' agents that are allowed in. Default: [].
# allow_peers = ["12D3KooW..."]
# How long this site's capacity advert stays valid: a site not heard of for
# this long is suspect, and gone one refresh later. Default: "30s".
# advert_ttl = "30s"
# How often the advert is re-signed and pushed even if unchanged; at most
# half of advert_ttl. Default: "10s".
# advert_refresh = "10s"
# How often this site compares its view with a random member. Default: "2s".
# anti_entropy = "2s"

[api]
# Address (IP:port) of the local HTTP API. Default: "{DEFAULT_API_LISTEN}".
listen = {api_listen}
# File holding the API token. Default: "<data_dir>/api.token".
# token_file = {token_file}

[inventory]
# Number of node slots this site offers, each of the shape in
# [inventory.node]; at least 1. Set either `nodes` or the
# [[inventory.hosts]] tables below, not both.
nodes = {nodes}

# The shape of one node slot (required): what one cluster node gets.
[inventory.node]
# CPU cores; at least 1.
cores = {cores}
# Memory in MiB; at least 1.
memory_mib = {memory_mib}
# Disk in GiB; at least 1.
disk_gib = {disk_gib}

# Instead of `nodes`, describe each machine. A host holds as many slots as
# fit in it: the smallest of cores / node.cores, memory_mib / node.memory_mib
# and disk_gib / node.disk_gib, rounded down.
# [[inventory.hosts]]
# name = "h1"           # host name: unique and not empty
# cores = 32            # CPU cores
# memory_mib = 131072   # memory in MiB
# disk_gib = 2000       # disk in GiB

[clusters]
# VLAN ids this site may give to cluster networks (required): "FIRST-LAST",
# or "ID" for a single id, within 1-4094 (802.1Q reserves 0 and 4095).
vlans = {vlans}
# How this site runs cluster nodes: "none" (reserve only, start nothing),
# "sim" (no side effects) or "netns" (each node a network namespace booted
# over DHCP/TFTP from the cluster's frontend; runs the gateway; needs root).
# Default: "none".
# driver = "netns"

[gateway]
# UDP address (IP:port) of the data plane. Default: "{DEFAULT_GATEWAY_LISTEN}".
listen = {gateway_listen}
# Public host:port at which other sites reach this gateway; host is an IP
# address or a DNS name. Default: unset.
# endpoint = "gw.example.org:7782"
# How cluster traffic reaches this site's machines; set at most one:
#   bridge: an existing Linux bridge that cluster ports attach to;
#   trunk: an interface that carries the cluster networks as 802.1Q VLANs.
# Default: neither (no site link configured yet).
# bridge = "br-site"
# trunk = "eth1"
"#,
        site = toml_string(&p.site),
        data_dir = toml_string(&data_dir),
        federation_listen = toml_string_array(&p.federation_listen),
        bootstrap = toml_string_array(&p.bootstrap),
        api_listen = toml_string(&p.api_listen.to_string()),
        token_file = toml_string(&token_file.to_string_lossy()),
        nodes = p.nodes,
        cores = node.cores,
        memory_mib = node.memory_mib,
        disk_gib = node.disk_gib,
        vlans = toml_string(&p.vlans.to_string()),
        gateway_listen = toml_string(&p.gateway_listen.to_string()),
    )
}

/// A TOML string literal holding `text`, quoted and escaped by the toml crate's serializer.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// A one-line TOML array of the string forms of `items`.
fn toml_string_array<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items
        .iter()
        .map(|item| toml_string(&item.to_string()))
        .collect();
    format!("[{}]", items.join(", "))
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

// The file as serde sees it. Values that a check after deserialization looks at are wrapped in
// `Spanned` so that the check can report their line; `Option` marks fields with a default.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: RawSite,
    #[serde(default)]
    federation: RawFederation,
    #[serde(default)]
    api: RawApi,
    inventory: Spanned<RawInventory>,
    clusters: RawClusters,
    #[serde(default)]
    gateway: RawGateway,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: Spanned<String>,
    data_dir: Spanned<PathBuf>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawFederation {
    listen: Option<Spanned<Vec<Spanned<String>>>>,
    bootstrap: Vec<Spanned<String>>,
    psk_file: Option<Spanned<PathBuf>>,
    allow_peers: Vec<Spanned<String>>,
    advert_ttl: Option<Spanned<String>>,
    advert_refresh: Option<Spanned<String>>,
    anti_entropy: Option<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApi {
    listen: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    node: RawNodeShape,
    nodes: Option<Spanned<u32>>,
    hosts: Option<Spanned<Vec<RawHost>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeShape {
    cores: Spanned<u32>,
    memory_mib: Spanned<u64>,
    disk_gib: Spanned<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: Spanned<String>,
    cores: u32,
    memory_mib: u64,
    disk_gib: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClusters {
    vlans: Spanned<String>,
    driver: Option<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawGateway {
    listen: Option<Spanned<String>>,
    endpoint: Option<Spanned<String>>,
    bridge: Option<Spanned<String>>,
    trunk: Option<Spanned<String>>,
}

impl RawConfig {
    /// Checks the rules serde does not know and builds the public config.
    fn check(self, source: &Source<'_>) -> Result<Config, ConfigError> {
        let site = self.site.check(source)?;
        let federation = self.federation.check(source)?;
        let api = self.api.check(source, &site.data_dir)?;
        let inventory = check_inventory(self.inventory, source)?;
        let clusters = self.clusters.check(source)?;
        let gateway = self.gateway.check(source)?;
        Ok(Config {
            path: source.path.to_path_buf(),
            site,
            federation,
            api,
            inventory,
            clusters,
            gateway,
        })
    }
}

impl RawSite {
    fn check(self, source: &Source<'_>) -> Result<SiteConfig, ConfigError> {
        if let Some(problem) = site_name_problem(self.name.get_ref()) {
            return Err(source.invalid(
                &self.name,
                "site.name",
                format!("invalid site name {:?}: {problem}", self.name.get_ref()),
                Some(format!(
                    "use 1 to {SITE_NAME_CHARS_MAX} lowercase letters, digits and '-', not \
                     starting or ending with '-', e.g. \"site-a\""
                )),
            ));
        }
        Ok(SiteConfig {
            name: self.name.into_inner(),
            data_dir: source.path_value(self.data_dir, "site.data_dir")?,
        })
    }
}

impl RawFederation {
    fn check(self, source: &Source<'_>) -> Result<FederationConfig, ConfigError> {
        let listen = match self.listen {
            None => vec![
                DEFAULT_FEDERATION_LISTEN
                    .parse()
                    .expect("DEFAULT_FEDERATION_LISTEN is a valid multiaddr"),
            ],
            Some(listen) if listen.get_ref().is_empty() => {
                return Err(source.invalid(
                    &listen,
                    "federation.listen",
                    "no listen address: the federation needs at least one".to_owned(),
                    Some(format!(
                        "list at least one address, e.g. listen = [\"{DEFAULT_FEDERATION_LISTEN}\"]"
                    )),
                ));
            }
            Some(listen) => listen
                .into_inner()
                .iter()
                .enumerate()
                .map(|(i, addr)| source.multiaddr(addr, &format!("federation.listen[{i}]")))
                .collect::<Result<_, _>>()?,
        };

        let mut bootstrap = Vec::with_capacity(self.bootstrap.len());
        for (i, text) in self.bootstrap.iter().enumerate() {
            let field = format!("federation.bootstrap[{i}]");
            let addr = source.multiaddr(text, &field)?;
            if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
                return Err(source.invalid(
                    text,
                    &field,
                    format!("bootstrap address \"{addr}\" does not end in /p2p/<peer id>"),
                    Some(format!(
                        "append the remote agent's peer id, e.g. \"{addr}/p2p/12D3KooW...\", so \
                         that the connection is checked against the site you meant"
                    )),
                ));
            }
            bootstrap.push(addr);
        }

        let psk_file = self
            .psk_file
            .map(|file| source.path_value(file, "federation.psk_file"))
            .transpose()?;

        let allow_peers = self
            .allow_peers
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.get_ref().parse::<PeerId>().map_err(|e| {
                    source.invalid(
                        text,
                        &format!("federation.allow_peers[{i}]"),
                        format!("invalid peer id {:?}: {e}", text.get_ref()),
                        Some("a peer id is a base58 string such as \"12D3KooW...\"".to_owned()),
                    )
                })
            })
            .collect::<Result<_, _>>()?;

        let defaults = GossipTiming::default();
        let duration = |value: &Option<Spanned<String>>, field: &str, default: Duration| {
            let Some(value) = value else {
                return Ok(default);
            };
            let parsed = humantime::parse_duration(value.get_ref()).map_err(|e| {
                source.invalid(
                    value,
                    field,
                    format!("invalid duration {:?}: {e}", value.get_ref()),
                    Some("write a duration such as \"500ms\", \"10s\" or \"2m\"".to_owned()),
                )
            })?;
            if !(GOSSIP_INTERVAL_MIN..=ADVERT_TTL_MAX).contains(&parsed) {
                return Err(source.invalid(
                    value,
                    field,
                    format!("{:?} is out of range", value.get_ref()),
                    Some("use a duration between 100ms and 1h".to_owned()),
                ));
            }
            Ok(parsed)
        };
        let gossip = GossipTiming {
            advert_ttl: duration(
                &self.advert_ttl,
                "federation.advert_ttl",
                defaults.advert_ttl,
            )?,
            advert_refresh: duration(
                &self.advert_refresh,
                "federation.advert_refresh",
                defaults.advert_refresh,
            )?,
            anti_entropy: duration(
                &self.anti_entropy,
                "federation.anti_entropy",
                defaults.anti_entropy,
            )?,
        };
        if gossip.advert_ttl < gossip.advert_refresh * 2 {
            let at = self.advert_ttl.as_ref().or(self.advert_refresh.as_ref());
            let message = format!(
                "advert_ttl ({:?}) must be at least twice advert_refresh ({:?}), or sites flap to suspect \
                 whenever one refresh is late",
                gossip.advert_ttl, gossip.advert_refresh
            );
            let hint = Some("raise advert_ttl or lower advert_refresh".to_owned());
            return Err(match at {
                Some(at) => source.invalid(at, "federation.advert_ttl", message, hint),
                None => source.error(
                    None,
                    Some("federation.advert_ttl".to_owned()),
                    message,
                    hint,
                ),
            });
        }

        Ok(FederationConfig {
            listen,
            bootstrap,
            psk_file,
            allow_peers,
            gossip,
        })
    }
}

impl RawApi {
    fn check(self, source: &Source<'_>, data_dir: &Path) -> Result<ApiConfig, ConfigError> {
        let listen = source.socket_addr(self.listen, "api.listen", DEFAULT_API_LISTEN)?;
        let token_file = match self.token_file {
            Some(file) => source.path_value(file, "api.token_file")?,
            None => data_dir.join("api.token"),
        };
        Ok(ApiConfig { listen, token_file })
    }
}

fn check_inventory(
    raw: Spanned<RawInventory>,
    source: &Source<'_>,
) -> Result<Inventory, ConfigError> {
    let inventory_span = raw.span();
    let raw = raw.into_inner();
    let node = NodeShape {
        cores: source.at_least_one(&raw.node.cores, "inventory.node.cores")?,
        memory_mib: source.at_least_one(&raw.node.memory_mib, "inventory.node.memory_mib")?,
        disk_gib: source.at_least_one(&raw.node.disk_gib, "inventory.node.disk_gib")?,
    };

    let (source_kind, hosts_span) = match (raw.nodes, raw.hosts) {
        (Some(nodes), Some(_)) => {
            return Err(source.invalid(
                &nodes,
                "inventory",
                "both `nodes` and `hosts` are set".to_owned(),
                Some(
                    "keep `nodes = N` for N slots of the `node` shape, or describe each machine \
                     in an [[inventory.hosts]] table; not both"
                        .to_owned(),
                ),
            ));
        }
        (None, None) => {
            return Err(source.error(
                Some(inventory_span),
                Some("inventory".to_owned()),
                "neither `nodes` nor `hosts` is set".to_owned(),
                Some(
                    "add `nodes = 4` for four slots of the `node` shape, or describe each \
                     machine in an [[inventory.hosts]] table"
                        .to_owned(),
                ),
            ));
        }
        (Some(nodes), None) => {
            let count = source.at_least_one(&nodes, "inventory.nodes")?;
            (InventorySource::Nodes(count), None)
        }
        (None, Some(hosts)) => {
            let span = hosts.span();
            let hosts = check_hosts(hosts.into_inner(), source)?;
            (InventorySource::Hosts(hosts), Some(span))
        }
    };

    let inventory = Inventory {
        node,
        source: source_kind,
    };
    // Only a hosts list can hold no slot or too many: `nodes` is a checked u32 of at least 1.
    let slots = inventory.slots_wide();
    if slots == 0 {
        return Err(source.error(
            hosts_span,
            Some("inventory".to_owned()),
            format!("no host has room for one node slot ({node})"),
            Some("make `inventory.node` smaller, or list bigger hosts".to_owned()),
        ));
    }
    if slots > u64::from(u32::MAX) {
        return Err(source.error(
            hosts_span,
            Some("inventory".to_owned()),
            format!(
                "the hosts hold {slots} node slots, more than the {} a site can offer",
                u32::MAX
            ),
            Some("make `inventory.node` bigger".to_owned()),
        ));
    }
    Ok(inventory)
}

fn check_hosts(raw: Vec<RawHost>, source: &Source<'_>) -> Result<Vec<Host>, ConfigError> {
    // Name -> index of the first host with that name, to say which one a duplicate repeats.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut hosts = Vec::with_capacity(raw.len());
    for (i, host) in raw.into_iter().enumerate() {
        let field = format!("inventory.hosts[{i}].name");
        let name = host.name.get_ref();
        if name.is_empty() {
            return Err(source.invalid(
                &host.name,
                &field,
                "host name is empty".to_owned(),
                Some("give each host a unique name, e.g. name = \"h1\"".to_owned()),
            ));
        }
        if let Some(first) = seen.get(name) {
            return Err(source.invalid(
                &host.name,
                &field,
                format!("duplicate host name {name:?}, already used by inventory.hosts[{first}]"),
                Some("give each host a unique name".to_owned()),
            ));
        }
        seen.insert(name.clone(), i);
        hosts.push(Host {
            name: host.name.into_inner(),
            cores: host.cores,
            memory_mib: host.memory_mib,
            disk_gib: host.disk_gib,
        });
    }
    Ok(hosts)
}

impl RawClusters {
    fn check(self, source: &Source<'_>) -> Result<ClustersConfig, ConfigError> {
        let vlans = self.vlans.get_ref().parse::<VlanRange>().map_err(|e| {
            source.invalid(
                &self.vlans,
                "clusters.vlans",
                format!("invalid VLAN range {:?}: {e}", self.vlans.get_ref()),
                Some(format!(
                    "write it as \"FIRST-LAST\" or a single \"ID\", with ids within \
                     {VLAN_ID_MIN}-{VLAN_ID_MAX}, e.g. \"100-199\""
                )),
            )
        })?;
        let driver = match self.driver {
            None => DriverKind::default(),
            Some(driver) => match driver.get_ref().as_str() {
                "none" => DriverKind::None,
                "sim" => DriverKind::Sim,
                "netns" => DriverKind::Netns,
                other => {
                    return Err(source.invalid(
                        &driver,
                        "clusters.driver",
                        format!("unknown compute driver {other:?}"),
                        Some("use \"none\", \"sim\" or \"netns\"".to_owned()),
                    ));
                }
            },
        };
        Ok(ClustersConfig { vlans, driver })
    }
}

impl RawGateway {
    fn check(self, source: &Source<'_>) -> Result<GatewayConfig, ConfigError> {
        let listen = source.socket_addr(self.listen, "gateway.listen", DEFAULT_GATEWAY_LISTEN)?;

        let endpoint = match self.endpoint {
            None => None,
            Some(endpoint) => {
                if let Some(problem) = endpoint_problem(endpoint.get_ref()) {
                    return Err(source.invalid(
                        &endpoint,
                        "gateway.endpoint",
                        format!("invalid endpoint {:?}: {problem}", endpoint.get_ref()),
                        Some(
                            "write it as host:port, where host is an IP address or a DNS name, \
                             e.g. \"gw.example.org:7782\" or \"[2001:db8::1]:7782\""
                                .to_owned(),
                        ),
                    ));
                }
                Some(endpoint.into_inner())
            }
        };

        let site_link = match (self.bridge, self.trunk) {
            (Some(_), Some(trunk)) => {
                return Err(source.invalid(
                    &trunk,
                    "gateway",
                    "both `bridge` and `trunk` are set".to_owned(),
                    Some(
                        "set `bridge` to attach clusters to an existing Linux bridge, or `trunk` \
                         to carry them as 802.1Q VLANs on an interface; not both"
                            .to_owned(),
                    ),
                ));
            }
            (Some(bridge), None) => {
                let at = bridge.span();
                let name = source.ifname(bridge, "gateway.bridge")?;
                let prefix = format!("{}b", crate::links::LINK_PREFIX);
                if name
                    .strip_prefix(&prefix)
                    .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
                {
                    return Err(source.error(
                        Some(at),
                        Some("gateway.bridge".to_owned()),
                        format!(
                            "{name:?} is named like the gateway's own segment bridges, which it \
                             deletes when a cluster stops"
                        ),
                        Some("rename the site bridge".to_owned()),
                    ));
                }
                Some(SiteLink::Bridge(name))
            }
            (None, Some(trunk)) => {
                let at = trunk.span();
                let name = source.ifname(trunk, "gateway.trunk")?;
                // The agent names a cluster's sub-interface <trunk>.<vlan id>.
                let longest = name.len() + ".4094".len();
                if longest > vcfed_overlay::linux::IFNAME_LEN_MAX {
                    return Err(source.error(
                        Some(at),
                        Some("gateway.trunk".to_owned()),
                        format!(
                            "{name:?} is too long for its VLAN sub-interfaces: \
                             \"{name}.4094\" has {longest} bytes, Linux allows {}",
                            vcfed_overlay::linux::IFNAME_LEN_MAX
                        ),
                        Some("use an interface name of at most 10 bytes".to_owned()),
                    ));
                }
                Some(SiteLink::Trunk(name))
            }
            (None, None) => None,
        };

        Ok(GatewayConfig {
            listen,
            endpoint,
            site_link,
        })
    }
}

/// The text being parsed and where it came from, to turn byte spans into error locations.
/// Shared with the other configuration files of the crate (`vcfed gateway`'s).
pub(crate) struct Source<'a> {
    pub(crate) path: &'a Path,
    pub(crate) text: &'a str,
}

impl Source<'_> {
    /// An error located at the start of `span`, or nowhere when `span` is `None`.
    pub(crate) fn error(
        &self,
        span: Option<Range<usize>>,
        field: Option<String>,
        message: String,
        hint: Option<String>,
    ) -> ConfigError {
        let (line, column) = span.map(|span| line_column(self.text, span.start)).unzip();
        ConfigError {
            path: self.path.to_path_buf(),
            line,
            column,
            field,
            message,
            hint,
        }
    }

    /// An error about the value `at`, which is the field `field`.
    pub(crate) fn invalid<T>(
        &self,
        at: &Spanned<T>,
        field: &str,
        message: String,
        hint: Option<String>,
    ) -> ConfigError {
        self.error(Some(at.span()), Some(field.to_owned()), message, hint)
    }

    /// Turns a serde error into a config error, naming the field serde was at and adding a
    /// hint for the kinds of mistakes people make: a missing field, a misspelled one, a value
    /// of the wrong type.
    pub(crate) fn deserialize_error(
        &self,
        error: serde_path_to_error::Error<toml::de::Error>,
    ) -> ConfigError {
        let path = field_path(error.path());
        let error = error.into_inner();
        let message = error.message();

        if let Some(name) = quoted_after(message, "missing field `") {
            let field = join_field(&path, name);
            if path.is_empty() {
                // The span of a missing top-level table is the whole document, which says
                // nothing about where to add it.
                return self.error(
                    None,
                    Some(field),
                    format!("required table [{name}] is missing"),
                    Some(format!(
                        "add a [{name}] table; `vcfed init` writes a complete, commented example"
                    )),
                );
            }
            let hint =
                example(&field).map(|example| format!("add `{example}` to {}", table_label(&path)));
            return self.error(
                error.span(),
                Some(field),
                "required field is missing".to_owned(),
                hint,
            );
        }

        if let Some(name) = quoted_after(message, "unknown field `") {
            // serde_path_to_error already includes the unknown key in the path.
            let table = path
                .strip_suffix(name)
                .map(|parent| parent.trim_end_matches('.'))
                .unwrap_or_default();
            return self.error(
                error.span(),
                Some(path.clone()),
                format!("unknown field `{name}`"),
                unknown_field_hint(name, table, message),
            );
        }

        let field = (!path.is_empty()).then_some(path);
        let hint = field
            .as_deref()
            .and_then(example)
            .map(|example| format!("write it like `{example}`"));
        self.error(error.span(), field, in_toml_terms(message), hint)
    }

    /// A path from the file, resolved against the config file's directory.
    pub(crate) fn path_value(
        &self,
        value: Spanned<PathBuf>,
        field: &str,
    ) -> Result<PathBuf, ConfigError> {
        if value.get_ref().as_os_str().is_empty() {
            return Err(self.invalid(
                &value,
                field,
                "path is empty".to_owned(),
                example(field).map(|example| format!("write it like `{example}`")),
            ));
        }
        let value = value.into_inner();
        if value.is_absolute() {
            return Ok(value);
        }
        let dir = self.path.parent().unwrap_or(Path::new(""));
        Ok(dir.join(value))
    }

    fn multiaddr(&self, text: &Spanned<String>, field: &str) -> Result<Multiaddr, ConfigError> {
        text.get_ref().parse::<Multiaddr>().map_err(|e| {
            let message = match e {
                // Its text, "invalid multiaddr", would only repeat the message.
                multiaddr::Error::InvalidMultiaddr => {
                    format!("invalid multiaddress {:?}", text.get_ref())
                }
                e => format!("invalid multiaddress {:?}: {e}", text.get_ref()),
            };
            self.invalid(
                text,
                field,
                message,
                Some(format!(
                    "write it like \"{DEFAULT_FEDERATION_LISTEN}\" or \
                     \"/dns4/host.example.org/tcp/7781\""
                )),
            )
        })
    }

    /// The socket address in `value`, or `default` when the field is absent.
    pub(crate) fn socket_addr(
        &self,
        value: Option<Spanned<String>>,
        field: &str,
        default: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let Some(value) = value else {
            return Ok(default
                .parse()
                .expect("the default listen addresses are valid socket addresses"));
        };
        value.get_ref().parse::<SocketAddr>().map_err(|e| {
            self.invalid(
                &value,
                field,
                format!("invalid socket address {:?}: {e}", value.get_ref()),
                Some(format!(
                    "write an IP address and a port from 0 to 65535, e.g. \"{default}\"; host \
                     names are not accepted here"
                )),
            )
        })
    }

    fn at_least_one<T>(&self, value: &Spanned<T>, field: &str) -> Result<T, ConfigError>
    where
        T: Copy + Into<u64>,
    {
        let number = *value.get_ref();
        if number.into() == 0 {
            return Err(self.invalid(
                value,
                field,
                "must be at least 1, not 0".to_owned(),
                example(field).map(|example| format!("write it like `{example}`")),
            ));
        }
        Ok(number)
    }

    pub(crate) fn ifname(
        &self,
        value: Spanned<String>,
        field: &str,
    ) -> Result<String, ConfigError> {
        if let Some(problem) = ifname_problem(value.get_ref()) {
            return Err(self.invalid(
                &value,
                field,
                format!("invalid interface name {:?}: {problem}", value.get_ref()),
                Some(format!(
                    "a Linux interface name is 1 to {IFNAME_BYTES_MAX} bytes without '/', ':' \
                     or whitespace, e.g. \"br-site\" or \"eth1\""
                )),
            ));
        }
        Ok(value.into_inner())
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    // Spans from the toml crate fall on character boundaries; this only guards the slicing.
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The dotted field path of a serde path, such as `inventory.hosts[1].cores`, without the
/// segments that `toml::Spanned` adds internally.
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;

    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key.starts_with("$__serde_spanned_private_") {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

fn join_field(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// The text between `prefix` and the next backtick in `message`, e.g. the field name in
/// serde's "missing field `name`".
fn quoted_after<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(quoted, _)| quoted)
}

/// `message` with serde's name for the expected type (the Rust type, such as `u32` or
/// `struct RawSite`) replaced by the TOML one that the user writes.
fn in_toml_terms(message: &str) -> String {
    let Some((found, expected)) = message.rsplit_once(", expected ") else {
        return message.to_owned();
    };
    let expected = match expected {
        "u32" | "u64" => "a non-negative integer",
        "a sequence" => "an array",
        "path string" => "a string",
        table if table.starts_with("struct ") => "a table",
        other => other,
    };
    format!("{found}, expected {expected}")
}

/// How to refer to the table at dotted path `table` in a hint.
fn table_label(table: &str) -> String {
    if table.is_empty() {
        "the top level".to_owned()
    } else if table.ends_with(']') {
        format!("`{table}`")
    } else {
        format!("the [{table}] table")
    }
}

/// The fields serde lists as expected in `message` (its "unknown field `x`, expected one of
/// `a`, `b`"), with a guess at the one meant when `name` is a near miss.
fn unknown_field_hint(name: &str, table: &str, message: &str) -> Option<String> {
    let (_, expected) = message.split_once(", expected")?;
    let accepted: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let list = accepted
        .iter()
        .map(|field| format!("`{field}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut hint = format!("{} accepts {list}", table_label(table));
    let closest = accepted
        .iter()
        .map(|field| (edit_distance(name, field), *field))
        .min();
    if let Some((distance, field)) = closest
        && distance <= 2
    {
        hint = format!("did you mean `{field}`? {hint}");
    }
    Some(hint)
}

/// Levenshtein distance between `a` and `b`, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, b_char) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(a_char != *b_char);
            let delete = previous[j + 1] + 1;
            let insert = current[j] + 1;
            current.push(substitute.min(delete).min(insert));
        }
        previous = current;
    }
    previous[b.len()]
}

/// A correct line for `field` (indices like `[1]` are ignored), for hints.
fn example(field: &str) -> Option<&'static str> {
    let mut normalized = String::with_capacity(field.len());
    let mut in_index = false;
    for c in field.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            _ if !in_index => normalized.push(c),
            _ => {}
        }
    }
    Some(match normalized.as_str() {
        "site.name" => r#"name = "site-a""#,
        "site.data_dir" => r#"data_dir = "/var/lib/vcfed""#,
        "federation.listen" => r#"listen = ["/ip4/0.0.0.0/tcp/7781"]"#,
        "federation.bootstrap" => r#"bootstrap = ["/ip4/203.0.113.7/tcp/7781/p2p/12D3KooW..."]"#,
        "federation.psk_file" => r#"psk_file = "federation.psk""#,
        "federation.allow_peers" => r#"allow_peers = ["12D3KooW..."]"#,
        "federation.advert_ttl" => r#"advert_ttl = "30s""#,
        "federation.advert_refresh" => r#"advert_refresh = "10s""#,
        "federation.anti_entropy" => r#"anti_entropy = "2s""#,
        "api.listen" => r#"listen = "127.0.0.1:7780""#,
        "api.token_file" => r#"token_file = "api.token""#,
        "inventory.node" => "node = { cores = 2, memory_mib = 4096, disk_gib = 20 }",
        "inventory.node.cores" => "cores = 2",
        "inventory.node.memory_mib" => "memory_mib = 4096",
        "inventory.node.disk_gib" => "disk_gib = 20",
        "inventory.nodes" => "nodes = 4",
        "inventory.hosts" => {
            r#"hosts = [{ name = "h1", cores = 32, memory_mib = 131072, disk_gib = 2000 }]"#
        }
        "inventory.hosts.name" => r#"name = "h1""#,
        "inventory.hosts.cores" => "cores = 32",
        "inventory.hosts.memory_mib" => "memory_mib = 131072",
        "inventory.hosts.disk_gib" => "disk_gib = 2000",
        "clusters.vlans" => r#"vlans = "100-199""#,
        "gateway.listen" => r#"listen = "0.0.0.0:7782""#,
        "gateway.endpoint" => r#"endpoint = "gw.example.org:7782""#,
        "gateway.bridge" => r#"bridge = "br-site""#,
        "gateway.trunk" => r#"trunk = "eth1""#,
        // The file of `vcfed gateway --config` (see `gateway_config`).
        "private_key_file" => r#"private_key_file = "tunnel.key""#,
        "listen" => r#"listen = "0.0.0.0:7782""#,
        "inner_mtu" => "inner_mtu = 1440",
        "link_prefix" => r#"link_prefix = "vcf""#,
        "peers" => r#"peers = [{ index = 2, public_key = "...", endpoint = "203.0.113.7:7782" }]"#,
        "peers.index" => "index = 2",
        "peers.public_key" => r#"public_key = "hDWy...Ez4=""#,
        "peers.endpoint" => r#"endpoint = "203.0.113.7:7782""#,
        "segments" => r#"segments = [{ id = 100, peers = [2], bridge = "br-site" }]"#,
        "segments.id" => "id = 100",
        "segments.peers" => "peers = [2, 3]",
        "segments.bridge" => r#"bridge = "br-site""#,
        "segments.trunk" => r#"trunk = "eth1""#,
        "segments.vlan" => "vlan = 100",
        _ => return None,
    })
}

/// What is wrong with `name` as a site name, if anything.
fn site_name_problem(name: &str) -> Option<String> {
    let chars = name.chars().count();
    if chars == 0 {
        return Some("it is empty".to_owned());
    }
    if chars > SITE_NAME_CHARS_MAX {
        return Some(format!(
            "it is {chars} characters long, more than {SITE_NAME_CHARS_MAX}"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!("{c:?} is not a lowercase letter, digit or '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some("it starts or ends with '-'".to_owned());
    }
    None
}

/// What is wrong with `name` as a Linux interface name, if anything; the kernel's rules
/// (`dev_valid_name`).
fn ifname_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".to_owned());
    }
    if name.len() > IFNAME_BYTES_MAX {
        return Some(format!(
            "it is {} bytes long, more than {IFNAME_BYTES_MAX}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Some("\".\" and \"..\" are not interface names".to_owned());
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace())
    {
        return Some(format!("it contains {c:?}"));
    }
    None
}

/// What is wrong with `endpoint` as a public `host:port`, if anything.
fn endpoint_problem(endpoint: &str) -> Option<String> {
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return Some("it has no port".to_owned());
    };
    if !matches!(port.parse::<u16>(), Ok(port) if port != 0) {
        return Some(format!("port {port:?} is not a number from 1 to 65535"));
    }
    if let Some(address) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return address
            .parse::<Ipv6Addr>()
            .is_err()
            .then(|| format!("{address:?} is not an IPv6 address"));
    }
    if host.contains(':') {
        return Some("an IPv6 address must be written in brackets".to_owned());
    }
    if host.parse::<Ipv4Addr>().is_ok() || is_dns_name(host) {
        return None;
    }
    Some(format!("{host:?} is neither an IP address nor a DNS name"))
}

/// Whether `host` is a DNS name: dot-separated labels of letters, digits and '-' (RFC 1123),
/// with a last label that is not all digits so that a mistyped IPv4 address is not taken for
/// a name (RFC 3696, section 2).
fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > DNS_NAME_BYTES_MAX {
        return false;
    }
    let label_ok = |label: &str| {
        (1..=SITE_NAME_CHARS_MAX).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let last_label_numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|label| label.bytes().all(|b| b.is_ascii_digit()));
    host.split('.').all(label_ok) && !last_label_numeric
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/etc/vcfed/vcfed.toml";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(PATH))
    }

    fn parse_err(text: &str) -> ConfigError {
        match parse(text) {
            Ok(config) => panic!("config was accepted: {config:?}\n---\n{text}"),
            Err(e) => e,
        }
    }

    /// Asserts where an error points and that its message and hint say what they should.
    #[track_caller]
    fn assert_error(e: &ConfigError, line: usize, field: &str, message: &str) {
        assert_eq!(e.path, Path::new(PATH), "{e}");
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.column.is_some(), "{e}");
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert!(
            e.message.contains(message),
            "message {:?} lacks {message:?}",
            e.message
        );
    }

    /// A valid config with `[site]` on line 1 and every section on a known line, with `extra`
    /// appended; tests that break one section write their own text instead.
    fn minimal(extra: &str) -> String {
        format!(
            "[site]\n\
             name = \"site-a\"\n\
             data_dir = \"data\"\n\
             \n\
             [inventory]\n\
             node = {{ cores = 2, memory_mib = 4096, disk_gib = 20 }}\n\
             nodes = 4\n\
             \n\
             [clusters]\n\
             vlans = \"100-199\"\n\
             {extra}"
        )
    }

    const PEER: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

    #[test]
    fn template_round_trips_defaults() {
        let params = InitParams::new("site-a".to_owned(), PathBuf::from("/var/lib/vcfed"));
        let config = parse(&render_template(&params)).expect("template parses");

        assert_eq!(config.site.name, "site-a");
        assert_eq!(config.site.data_dir, Path::new("/var/lib/vcfed"));
        assert_eq!(config.api.listen, params.api_listen);
        assert_eq!(config.api.token_file, Path::new("/var/lib/vcfed/api.token"));
        assert_eq!(config.federation.listen, params.federation_listen);
        assert!(config.federation.bootstrap.is_empty());
        assert_eq!(config.federation.psk_file, None);
        assert!(config.federation.allow_peers.is_empty());
        assert_eq!(config.inventory.node, params.node);
        assert_eq!(config.inventory.source, InventorySource::Nodes(4));
        assert_eq!(config.clusters.vlans, params.vlans);
        assert_eq!(config.gateway.listen, params.gateway_listen);
        assert_eq!(config.gateway.endpoint, None);
        assert_eq!(config.gateway.site_link, None);
    }

    #[test]
    fn template_round_trips_unusual_values() {
        let mut params = InitParams::new(
            "x1-y".to_owned(),
            PathBuf::from(r#"/srv/my "vcfed" data\dir/'it's'"#),
        );
        params.api_listen = "[::1]:9000".parse().expect("valid");
        params.federation_listen = vec![
            "/ip4/0.0.0.0/tcp/7781".parse().expect("valid"),
            "/ip6/::/udp/7781/quic-v1".parse().expect("valid"),
        ];
        params.gateway_listen = "10.0.0.1:1".parse().expect("valid");
        params.nodes = 1;
        params.node = NodeShape {
            cores: 64,
            memory_mib: 1 << 40,
            disk_gib: 1,
        };
        params.vlans = VlanRange {
            first: 1,
            last: 4094,
        };
        params.bootstrap = vec![
            format!("/dns4/peer.example.org/tcp/7781/p2p/{PEER}")
                .parse()
                .expect("valid"),
        ];

        let text = render_template(&params);
        let config = parse(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));

        assert_eq!(config.site.name, params.site);
        assert_eq!(config.site.data_dir, params.data_dir);
        assert_eq!(config.api.listen, params.api_listen);
        assert_eq!(config.api.token_file, params.data_dir.join("api.token"));
        assert_eq!(config.federation.listen, params.federation_listen);
        assert_eq!(config.federation.bootstrap, params.bootstrap);
        assert_eq!(config.gateway.listen, params.gateway_listen);
        assert_eq!(config.inventory.node, params.node);
        assert_eq!(config.inventory.source, InventorySource::Nodes(1));
        assert_eq!(config.clusters.vlans, params.vlans);
    }

    #[test]
    fn template_comments_every_field() {
        let text = render_template(&InitParams::new("a".to_owned(), PathBuf::from("/d")));
        for field in [
            "name =",
            "data_dir =",
            "listen =",
            "bootstrap =",
            "# psk_file =",
            "# allow_peers =",
            "# token_file =",
            "nodes =",
            "cores =",
            "memory_mib =",
            "disk_gib =",
            "# [[inventory.hosts]]",
            "vlans =",
            "# endpoint =",
            "# bridge =",
            "# trunk =",
        ] {
            let line = text
                .lines()
                .position(|line| line.starts_with(field))
                .unwrap_or_else(|| panic!("template lacks {field:?}"));
            let previous = text.lines().nth(line - 1).expect("a line before");
            assert!(
                previous.starts_with('#'),
                "{field:?} has no comment above it"
            );
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(&minimal("")).expect("valid");

        assert_eq!(config.path, Path::new(PATH));
        assert_eq!(config.site.name, "site-a");
        // Relative paths resolve against the config file's directory, not the working one.
        assert_eq!(config.site.data_dir, Path::new("/etc/vcfed/data"));
        assert_eq!(
            config.federation.listen,
            vec![
                DEFAULT_FEDERATION_LISTEN
                    .parse::<Multiaddr>()
                    .expect("valid")
            ]
        );
        assert!(config.federation.bootstrap.is_empty());
        assert_eq!(config.federation.psk_file, None);
        assert!(config.federation.allow_peers.is_empty());
        assert_eq!(
            config.api.listen,
            DEFAULT_API_LISTEN.parse::<SocketAddr>().expect("valid")
        );
        assert_eq!(
            config.api.token_file,
            Path::new("/etc/vcfed/data/api.token")
        );
        assert_eq!(config.inventory.slots(), 4);
        assert_eq!(
            config.clusters.vlans,
            VlanRange {
                first: 100,
                last: 199
            }
        );
        assert_eq!(
            config.gateway.listen,
            DEFAULT_GATEWAY_LISTEN.parse::<SocketAddr>().expect("valid")
        );
        assert_eq!(config.gateway.site_link, None);
        assert_eq!(
            config.federation_key_path(),
            Path::new("/etc/vcfed/data/federation.key")
        );
        assert_eq!(
            config.tunnel_key_path(),
            Path::new("/etc/vcfed/data/tunnel.key")
        );
        assert_eq!(config.ledger_path(), Path::new("/etc/vcfed/data/ledger.db"));
    }

    #[test]
    fn optional_fields_are_read_and_paths_resolved() {
        let config = parse(&minimal(&format!(
            "[federation]\n\
             listen = [\"/ip4/0.0.0.0/tcp/1\", \"/ip6/::/tcp/1\"]\n\
             bootstrap = [\"/ip4/192.0.2.1/tcp/7781/p2p/{PEER}\"]\n\
             psk_file = \"keys/federation.psk\"\n\
             allow_peers = [\"{PEER}\"]\n\
             [api]\n\
             listen = \"[::1]:8000\"\n\
             token_file = \"/run/vcfed/api.token\"\n\
             [gateway]\n\
             listen = \"0.0.0.0:9000\"\n\
             endpoint = \"gw.example.org:9000\"\n\
             trunk = \"eth1.100\"\n"
        )))
        .expect("valid");

        assert_eq!(config.federation.listen.len(), 2);
        assert_eq!(config.federation.bootstrap.len(), 1);
        assert_eq!(
            config.federation.psk_file.as_deref(),
            Some(Path::new("/etc/vcfed/keys/federation.psk"))
        );
        assert_eq!(
            config.federation.allow_peers,
            vec![PEER.parse::<PeerId>().expect("valid")]
        );
        assert_eq!(config.api.listen.port(), 8000);
        assert_eq!(config.api.token_file, Path::new("/run/vcfed/api.token"));
        assert_eq!(
            config.gateway.endpoint.as_deref(),
            Some("gw.example.org:9000")
        );
        assert_eq!(
            config.gateway.site_link,
            Some(SiteLink::Trunk("eth1.100".to_owned()))
        );
    }

    #[test]
    fn relative_paths_of_a_bare_file_name_stay_relative() {
        let config = Config::parse(&minimal(""), Path::new(CONFIG_FILE_NAME)).expect("valid");
        assert_eq!(config.site.data_dir, Path::new("data"));
    }

    #[test]
    fn hosts_inventory_counts_slots_per_host() {
        let config = parse(
            "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
             [inventory]\n\
             node = { cores = 2, memory_mib = 4096, disk_gib = 20 }\n\
             [[inventory.hosts]]\n\
             name = \"cpu-bound\"\n\
             cores = 7\n\
             memory_mib = 1000000\n\
             disk_gib = 1000\n\
             [[inventory.hosts]]\n\
             name = \"memory-bound\"\n\
             cores = 64\n\
             memory_mib = 10000\n\
             disk_gib = 1000\n\
             [[inventory.hosts]]\n\
             name = \"too-small\"\n\
             cores = 1\n\
             memory_mib = 1000000\n\
             disk_gib = 1000\n",
        )
        .expect("valid");

        let InventorySource::Hosts(hosts) = &config.inventory.source else {
            panic!("expected hosts, got {:?}", config.inventory.source);
        };
        let per_host: Vec<u32> = hosts
            .iter()
            .map(|host| host.slots(&config.inventory.node))
            .collect();
        // 7/2 cores = 3; 10000/4096 MiB = 2; 1/2 cores = 0.
        assert_eq!(per_host, [3, 2, 0]);
        assert_eq!(config.inventory.slots(), 5);
        assert_eq!(config.clusters.vlans, VlanRange { first: 7, last: 7 });
    }

    #[test]
    fn hosts_without_room_for_a_slot_are_refused() {
        let e = parse_err(
            "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
             [inventory]\n\
             node = { cores = 8, memory_mib = 4096, disk_gib = 20 }\n\
             [[inventory.hosts]]\n\
             name = \"h1\"\n\
             cores = 4\n\
             memory_mib = 65536\n\
             disk_gib = 100\n",
        );
        assert_error(&e, 8, "inventory", "no host has room for one node slot");
        assert!(e.message.contains("8 cores"), "{e}");
    }

    #[test]
    fn too_many_slots_are_refused() {
        let e = parse_err(
            "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
             [inventory]\n\
             node = { cores = 1, memory_mib = 1, disk_gib = 1 }\n\
             hosts = [\n\
               { name = \"a\", cores = 4294967295, memory_mib = 4294967295, disk_gib = 4294967295 },\n\
               { name = \"b\", cores = 1, memory_mib = 1, disk_gib = 1 },\n\
             ]\n",
        );
        assert_error(&e, 8, "inventory", "more than the 4294967295");
    }

    #[test]
    fn missing_field_names_field_and_table_line() {
        let e = parse_err(
            "# site config\n\
             [site]\n\
             data_dir = \"/d\"\n\
             [inventory]\n\
             node = { cores = 2, memory_mib = 4096, disk_gib = 20 }\n\
             nodes = 4\n\
             [clusters]\n\
             vlans = \"100-199\"\n",
        );
        assert_error(&e, 2, "site.name", "required field is missing");
        assert_eq!(
            e.hint.as_deref(),
            Some("add `name = \"site-a\"` to the [site] table")
        );
    }

    #[test]
    fn missing_table_is_named_without_a_line() {
        let e = parse_err(
            "[site]\nname = \"s\"\ndata_dir = \"/d\"\n\
             [inventory]\nnode = { cores = 2, memory_mib = 4096, disk_gib = 20 }\nnodes = 4\n",
        );
        assert_eq!(e.line, None, "{e}");
        assert_eq!(e.field.as_deref(), Some("clusters"));
        assert!(e.message.contains("[clusters]"), "{e}");
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|hint| hint.contains("vcfed init")),
            "{e}"
        );
    }

    #[test]
    fn missing_field_inside_host_entry_names_the_entry() {
        let e = parse_err(
            "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
             [inventory]\n\
             node = { cores = 1, memory_mib = 1, disk_gib = 1 }\n\
             [[inventory.hosts]]\n\
             name = \"h1\"\ncores = 1\nmemory_mib = 1\ndisk_gib = 1\n\
             [[inventory.hosts]]\n\
             name = \"h2\"\ncores = 1\nmemory_mib = 1\n",
        );
        assert_error(
            &e,
            13,
            "inventory.hosts[1].disk_gib",
            "required field is missing",
        );
        assert_eq!(
            e.hint.as_deref(),
            Some("add `disk_gib = 2000` to `inventory.hosts[1]`")
        );
    }

    #[test]
    fn wrong_type_names_field_and_value_position() {
        let e = parse_err(&minimal("").replace("nodes = 4", "nodes = \"four\""));
        assert_error(&e, 7, "inventory.nodes", "invalid type: string \"four\"");
        assert_eq!(e.column, Some(9));
        assert_eq!(e.hint.as_deref(), Some("write it like `nodes = 4`"));

        // serde's Rust type names are replaced by the TOML ones.
        let e = parse_err(&minimal("").replace("node = {", "node = 5\nx = {"));
        assert_error(
            &e,
            6,
            "inventory.node",
            "invalid type: integer `5`, expected a table",
        );
        let e = parse_err(&minimal("[federation]\nbootstrap = \"x\"\n"));
        assert_error(&e, 12, "federation.bootstrap", "expected an array");
    }

    #[test]
    fn wrong_type_inside_host_entry() {
        let e = parse_err(
            "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
             [inventory]\n\
             node = { cores = 1, memory_mib = 1, disk_gib = 1 }\n\
             [[inventory.hosts]]\n\
             name = \"h1\"\ncores = 1\nmemory_mib = 1\ndisk_gib = 1\n\
             [[inventory.hosts]]\n\
             name = \"h2\"\ncores = -3\nmemory_mib = 1\ndisk_gib = 1\n",
        );
        assert_error(
            &e,
            15,
            "inventory.hosts[1].cores",
            "invalid value: integer `-3`, expected a non-negative integer",
        );
    }

    #[test]
    fn bad_vlan_ranges_are_refused() {
        for (vlans, message) in [
            (
                "0-10",
                "invalid VLAN range \"0-10\": VLAN ids must be within 1-4094",
            ),
            ("100-4095", "VLAN ids must be within 1-4094"),
            (
                "5000",
                "invalid VLAN range \"5000\": VLAN ids must be within 1-4094",
            ),
            ("70000", "VLAN ids must be within 1-4094"),
            (
                "200-100",
                "the first id 200 is greater than the last id 100",
            ),
            ("abc", "invalid VLAN range \"abc\": expected \"FIRST-LAST\""),
            ("", "expected \"FIRST-LAST\""),
            ("1-2-3", "expected \"FIRST-LAST\""),
            ("-5", "expected \"FIRST-LAST\""),
            ("+5", "expected \"FIRST-LAST\""),
        ] {
            let e = parse_err(&minimal("").replace("\"100-199\"", &format!("{vlans:?}")));
            assert_error(&e, 10, "clusters.vlans", message);
            assert_eq!(e.column, Some(9), "{e}");
            assert!(
                e.hint
                    .as_deref()
                    .is_some_and(|h| h.contains("\"FIRST-LAST\""))
            );
        }
    }

    #[test]
    fn vlan_range_parses_and_displays() {
        assert_eq!(
            "100-199".parse(),
            Ok(VlanRange {
                first: 100,
                last: 199
            })
        );
        assert_eq!(
            " 1 - 4094 ".parse(),
            Ok(VlanRange {
                first: 1,
                last: 4094
            })
        );
        assert_eq!(
            "42".parse(),
            Ok(VlanRange {
                first: 42,
                last: 42
            })
        );
        assert_eq!(
            "9-3".parse::<VlanRange>(),
            Err(ParseVlanRangeError::Reversed { first: 9, last: 3 })
        );

        let range = VlanRange {
            first: 100,
            last: 199,
        };
        assert_eq!(range.to_string(), "100-199");
        assert_eq!(range.len(), 100);
        assert!(!range.is_empty());
        assert_eq!(
            VlanRange {
                first: 1,
                last: 4094
            }
            .len(),
            4094
        );
        assert_eq!(VlanRange { first: 5, last: 4 }.len(), 0);
    }

    #[test]
    fn bad_socket_address_is_refused() {
        let e = parse_err(&minimal("[api]\nlisten = \"localhost:99999\"\n"));
        assert_error(
            &e,
            12,
            "api.listen",
            "invalid socket address \"localhost:99999\"",
        );
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("127.0.0.1:7780"))
        );

        let e = parse_err(&minimal("[gateway]\nlisten = \"0.0.0.0\"\n"));
        assert_error(
            &e,
            12,
            "gateway.listen",
            "invalid socket address \"0.0.0.0\"",
        );
    }

    #[test]
    fn bad_multiaddr_is_refused() {
        let e = parse_err(&minimal(
            "[federation]\nlisten = [\"/ip4/0.0.0.0/tcp/1\", \"not-a-multiaddr\"]\n",
        ));
        assert_error(
            &e,
            12,
            "federation.listen[1]",
            "invalid multiaddress \"not-a-multiaddr\"",
        );
        assert_eq!(e.column, Some(33));
    }

    #[test]
    fn empty_listen_list_is_refused() {
        let e = parse_err(&minimal("[federation]\nlisten = []\n"));
        assert_error(&e, 12, "federation.listen", "at least one");
    }

    #[test]
    fn bootstrap_without_peer_id_is_refused() {
        let e = parse_err(&minimal(
            "[federation]\nbootstrap = [\n  \"/ip4/192.0.2.1/tcp/7781\",\n]\n",
        ));
        assert_error(
            &e,
            13,
            "federation.bootstrap[0]",
            "does not end in /p2p/<peer id>",
        );
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("/ip4/192.0.2.1/tcp/7781/p2p/")),
            "{e}"
        );
    }

    #[test]
    fn bad_peer_id_is_refused() {
        let e = parse_err(&minimal("[federation]\nallow_peers = [\"bob\"]\n"));
        assert_error(
            &e,
            12,
            "federation.allow_peers[0]",
            "invalid peer id \"bob\"",
        );
    }

    #[test]
    fn both_nodes_and_hosts_are_refused() {
        let e = parse_err(&minimal(
            "[[inventory.hosts]]\nname = \"h1\"\ncores = 1\nmemory_mib = 1\ndisk_gib = 1\n",
        ));
        assert_error(&e, 7, "inventory", "both `nodes` and `hosts` are set");
        assert!(e.hint.is_some());
    }

    #[test]
    fn neither_nodes_nor_hosts_is_refused() {
        let e = parse_err(&minimal("").replace("nodes = 4\n", ""));
        assert_error(&e, 5, "inventory", "neither `nodes` nor `hosts` is set");
        assert!(e.hint.as_deref().is_some_and(|h| h.contains("nodes = 4")));
    }

    #[test]
    fn unknown_field_is_refused_with_the_valid_ones() {
        let e = parse_err(&minimal("").replace("vlans =", "vlan ="));
        assert_error(&e, 10, "clusters.vlan", "unknown field `vlan`");
        assert_eq!(
            e.hint.as_deref(),
            Some("did you mean `vlans`? the [clusters] table accepts `vlans`, `driver`")
        );

        let e = parse_err(&minimal("[gateway]\ncolour = \"blue\"\n"));
        assert_error(&e, 12, "gateway.colour", "unknown field `colour`");
        assert_eq!(
            e.hint.as_deref(),
            Some("the [gateway] table accepts `listen`, `endpoint`, `bridge`, `trunk`")
        );

        let e = parse_err(&minimal("[sites]\n"));
        assert_error(&e, 11, "sites", "unknown field `sites`");
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.starts_with("did you mean `site`? the top level accepts")),
            "{e}"
        );
    }

    #[test]
    fn bad_site_names_are_refused() {
        for (name, message) in [
            ("", "it is empty"),
            ("Site-A", "'S' is not a lowercase letter"),
            ("site_a", "'_' is not a lowercase letter"),
            ("-site", "starts or ends with '-'"),
            ("site-", "starts or ends with '-'"),
            (&"a".repeat(64), "64 characters long"),
        ] {
            let e = parse_err(&minimal("").replace("\"site-a\"", &format!("{name:?}")));
            assert_error(&e, 2, "site.name", message);
            assert!(e.hint.as_deref().is_some_and(|h| h.contains("lowercase")));
        }
        parse(&minimal("").replace("\"site-a\"", &format!("{:?}", "a".repeat(63))))
            .expect("63 characters are allowed");
    }

    #[test]
    fn bad_interface_names_are_refused() {
        for (line, message) in [
            ("bridge = \"\"", "it is empty"),
            (
                "bridge = \"a-very-long-name0\"",
                "17 bytes long, more than 15",
            ),
            ("trunk = \"eth0:1\"", "it contains ':'"),
            ("trunk = \"eth 0\"", "it contains ' '"),
            ("bridge = \"a/b\"", "it contains '/'"),
            ("bridge = \"..\"", "are not interface names"),
        ] {
            let e = parse_err(&minimal(&format!("[gateway]\n{line}\n")));
            let field = line.split(' ').next().expect("a key");
            assert_error(&e, 12, &format!("gateway.{field}"), message);
        }
        let config =
            parse(&minimal("[gateway]\nbridge = \"br-site-fifteen\"\n")).expect("15 bytes fit");
        assert_eq!(
            config.gateway.site_link,
            Some(SiteLink::Bridge("br-site-fifteen".to_owned()))
        );
    }

    #[test]
    fn site_links_the_agent_cannot_use_are_refused() {
        let e = parse_err(&minimal("[gateway]\nbridge = \"vcfb12\"\n"));
        assert_error(&e, 12, "gateway.bridge", "named like the gateway's own");
        parse(&minimal("[gateway]\ntrunk = \"enp0s31f6x\"\n")).expect("10 bytes fit");
        let e = parse_err(&minimal("[gateway]\ntrunk = \"enp0s31f6xy\"\n"));
        assert_error(
            &e,
            12,
            "gateway.trunk",
            "too long for its VLAN sub-interfaces",
        );
        let e = parse_err(&minimal("").replace("vlans =", "driver = \"qemu\"\nvlans ="));
        assert_error(&e, 10, "clusters.driver", "unknown compute driver \"qemu\"");
        let netns = minimal("").replace("vlans =", "driver = \"netns\"\nvlans =");
        assert_eq!(parse(&netns).unwrap().clusters.driver, DriverKind::Netns);
    }

    #[test]
    fn both_bridge_and_trunk_are_refused() {
        let e = parse_err(&minimal("[gateway]\nbridge = \"br0\"\ntrunk = \"eth1\"\n"));
        assert_error(&e, 13, "gateway", "both `bridge` and `trunk` are set");
    }

    #[test]
    fn endpoints_are_checked() {
        for good in [
            "gw.example.org:7782",
            "gw.example.org.:1",
            "192.0.2.1:65535",
            "[2001:db8::1]:7782",
            "localhost:7782",
        ] {
            let config = parse(&minimal(&format!("[gateway]\nendpoint = {good:?}\n")))
                .unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(config.gateway.endpoint.as_deref(), Some(good));
        }
        for (bad, message) in [
            ("gw.example.org", "it has no port"),
            ("gw.example.org:0", "not a number from 1 to 65535"),
            ("gw.example.org:65536", "not a number from 1 to 65535"),
            ("2001:db8::1:7782", "must be written in brackets"),
            ("[2001:db8::zz]:7782", "is not an IPv6 address"),
            ("192.0.2.300:7782", "neither an IP address nor a DNS name"),
            (
                "gw_1.example.org:7782",
                "neither an IP address nor a DNS name",
            ),
            (":7782", "neither an IP address nor a DNS name"),
        ] {
            let e = parse_err(&minimal(&format!("[gateway]\nendpoint = {bad:?}\n")));
            assert_error(&e, 12, "gateway.endpoint", message);
        }
    }

    #[test]
    fn zero_sizes_are_refused() {
        let e = parse_err(&minimal("").replace("cores = 2", "cores = 0"));
        assert_error(&e, 6, "inventory.node.cores", "must be at least 1, not 0");
        assert_eq!(e.column, Some(18));
        assert_eq!(e.hint.as_deref(), Some("write it like `cores = 2`"));

        let e = parse_err(&minimal("").replace("disk_gib = 20", "disk_gib = 0"));
        assert_error(&e, 6, "inventory.node.disk_gib", "must be at least 1");

        let e = parse_err(&minimal("").replace("nodes = 4", "nodes = 0"));
        assert_error(&e, 7, "inventory.nodes", "must be at least 1");
    }

    #[test]
    fn duplicate_and_empty_host_names_are_refused() {
        let hosts = |first: &str, second: &str| {
            format!(
                "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
                 [inventory]\n\
                 node = {{ cores = 1, memory_mib = 1, disk_gib = 1 }}\n\
                 hosts = [\n\
                   {{ name = {first:?}, cores = 1, memory_mib = 1, disk_gib = 1 }},\n\
                   {{ name = {second:?}, cores = 1, memory_mib = 1, disk_gib = 1 }},\n\
                 ]\n"
            )
        };
        let e = parse_err(&hosts("h1", "h1"));
        assert_error(
            &e,
            10,
            "inventory.hosts[1].name",
            "duplicate host name \"h1\"",
        );
        assert!(e.message.contains("inventory.hosts[0]"), "{e}");

        let e = parse_err(&hosts("h1", ""));
        assert_error(&e, 10, "inventory.hosts[1].name", "host name is empty");
    }

    #[test]
    fn empty_paths_are_refused() {
        let e = parse_err(&minimal("").replace("data_dir = \"data\"", "data_dir = \"\""));
        assert_error(&e, 3, "site.data_dir", "path is empty");
    }

    #[test]
    fn syntax_error_has_a_line_but_no_field() {
        let e = parse_err(&minimal("[gateway]\nlisten = \"0.0.0.0:1\n"));
        assert_eq!(e.line, Some(12), "{e}");
        assert_eq!(e.field, None, "{e}");
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let e = parse_err(&minimal("").replace("nodes = 4", "nodes = 4 # größe\nnodes2 = 1"));
        assert_error(&e, 8, "inventory.nodes2", "unknown field");
        assert_eq!(line_column("ä\näöü x", "ä\näöü ".len()), (2, 5));
    }

    #[test]
    fn unreadable_file_is_reported_without_a_line() {
        let path = Path::new("/nonexistent/vcfed-config-test/vcfed.toml");
        let e = Config::load(path).expect_err("the file does not exist");
        assert_eq!(e.path, path);
        assert_eq!(e.line, None);
        assert_eq!(e.field, None);
        assert!(e.message.contains("cannot read"), "{e}");
        assert!(e.message.contains("os error 2"), "{e}");
    }

    #[test]
    fn error_display_is_one_paragraph_with_location_field_and_hint() {
        let e = parse_err(&minimal("").replace("\"100-199\"", "\"0-10\""));
        assert_eq!(
            e.to_string(),
            "/etc/vcfed/vcfed.toml:10:9: field `clusters.vlans`: invalid VLAN range \"0-10\": \
             VLAN ids must be within 1-4094\n  hint: write it as \"FIRST-LAST\" or a single \
             \"ID\", with ids within 1-4094, e.g. \"100-199\""
        );

        let e = ConfigError {
            path: PathBuf::from("x.toml"),
            line: None,
            column: None,
            field: None,
            message: "cannot read".to_owned(),
            hint: None,
        };
        assert_eq!(e.to_string(), "x.toml: cannot read");
    }

    #[test]
    fn node_shape_fits_in_each_dimension() {
        let slot = NodeShape {
            cores: 2,
            memory_mib: 4096,
            disk_gib: 20,
        };
        assert!(slot.fits_in(&slot));
        assert!(NodeShape { cores: 1, ..slot }.fits_in(&slot));
        for bigger in [
            NodeShape { cores: 3, ..slot },
            NodeShape {
                memory_mib: 4097,
                ..slot
            },
            NodeShape {
                disk_gib: 21,
                ..slot
            },
        ] {
            assert!(!bigger.fits_in(&slot), "{bigger:?}");
        }
    }

    #[test]
    fn init_defaults_match_the_documented_ones() {
        let params = InitParams::new("a".to_owned(), PathBuf::from("/d"));
        assert_eq!(params.api_listen.to_string(), DEFAULT_API_LISTEN);
        assert_eq!(params.gateway_listen.to_string(), DEFAULT_GATEWAY_LISTEN);
        assert_eq!(
            params.federation_listen[0].to_string(),
            DEFAULT_FEDERATION_LISTEN
        );
        assert_eq!(params.nodes, 4);
        assert_eq!(params.vlans.to_string(), "100-199");
        assert!(params.bootstrap.is_empty());
    }

    #[test]
    fn gossip_timing_is_read_and_checked() {
        let config = parse(&minimal(
            "[federation]\nadvert_ttl = \"3s\"\nadvert_refresh = \"1s\"\nanti_entropy = \"500ms\"\n",
        ))
        .unwrap();
        assert_eq!(
            config.federation.gossip,
            GossipTiming {
                advert_ttl: Duration::from_secs(3),
                advert_refresh: Duration::from_secs(1),
                anti_entropy: Duration::from_millis(500),
            }
        );
        assert_eq!(
            parse(&minimal("")).unwrap().federation.gossip,
            GossipTiming::default()
        );

        let e = parse_err(&minimal("[federation]\nadvert_ttl = \"15s\"\n"));
        assert_error(
            &e,
            12,
            "federation.advert_ttl",
            "at least twice advert_refresh",
        );
        let e = parse_err(&minimal("[federation]\nanti_entropy = \"soon\"\n"));
        assert_error(&e, 12, "federation.anti_entropy", "invalid duration");
        let e = parse_err(&minimal("[federation]\nanti_entropy = \"1ms\"\n"));
        assert_error(&e, 12, "federation.anti_entropy", "out of range");
    }
}
