//! The second pass of loading: the file as serde sees it (`Raw*` structs whose checked values
//! keep their byte spans) and the rules serde cannot express, which build the types of
//! [`super::types`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p_identity::PeerId;
use multiaddr::{Multiaddr, Protocol};
use serde::Deserialize;
use toml::Spanned;

use super::diagnostics::{ConfigError, Source, example, ifname_problem};
use super::types::{
    API_CLIENT_TIMEOUT_MAX, API_CLIENT_TIMEOUT_MIN, API_CONNECTIONS_MAX_MAX,
    API_CONNECTIONS_MAX_MIN, API_REQUESTS_MAX_MAX, API_REQUESTS_MAX_MIN,
    DEFAULT_API_CLIENT_TIMEOUT, DEFAULT_API_CONNECTIONS_MAX, DEFAULT_API_REQUESTS_MAX,
    DEFAULT_HEAL_GRACE, DEFAULT_LEASE, DEFAULT_RESERVE_DEADLINE, HEAL_GRACE_MAX, HEAL_GRACE_MIN,
    INSTALLER_ARGS_BYTES_MAX, LEASE_MAX, LEASE_MIN, NODE_MEMORY_MIB_MAX, NODE_MEMORY_MIB_MIN,
    POOL_NAME_CHARS_MAX, RESERVE_DEADLINE_MAX, RESERVE_DEADLINE_MIN, SHUTDOWN_TIMEOUT_S_MAX,
    SHUTDOWN_TIMEOUT_S_MIN, VLAN_ID_MAX, VLAN_ID_MIN, VLAN_PLACEHOLDER,
};
use super::{
    Accel, ApiConfig, ClustersConfig, Config, DEFAULT_API_LISTEN, DEFAULT_FEDERATION_LISTEN,
    DEFAULT_GATEWAY_LISTEN, DEFAULT_LIBVIRT_HOST, DriverKind, FederationConfig, GatewayConfig,
    GossipTiming, Host, InstallerConfig, Inventory, InventorySource, LibvirtConfig, NodeShape,
    SiteConfig, SiteLink, VlanRange,
};

/// Longest site name, in characters: a site name is a DNS label (RFC 1035).
const SITE_NAME_CHARS_MAX: usize = 63;
/// Longest DNS name accepted in `gateway.endpoint`, in bytes, without a trailing dot.
const DNS_NAME_BYTES_MAX: usize = 253;
/// Largest size (MiB, GiB) the ledger stores: SQLite's integers are signed
/// 64 bits.
const STORED_INTEGER_MAX: u64 = i64::MAX.unsigned_abs();
/// Longest accepted advert TTL.
const ADVERT_TTL_MAX: Duration = Duration::from_secs(3600);
/// Shortest accepted gossip interval.
const GOSSIP_INTERVAL_MIN: Duration = Duration::from_millis(100);
/// The hypervisor drivers a `libvirt.hosts` URI may name: QEMU/KVM, and libvirt's built-in
/// fake hypervisor for tests.
const LIBVIRT_DRIVERS: [&str; 2] = ["qemu", "test"];
/// The transports libvirt's remote driver knows (`DRIVER+TRANSPORT://`).
const LIBVIRT_TRANSPORTS: [&str; 7] = ["tls", "tcp", "unix", "ssh", "libssh", "libssh2", "ext"];
/// How a `libvirt.hosts` entry is written, for hints.
const LIBVIRT_URI_HINT: &str = "write a libvirt URI, DRIVER[+TRANSPORT]://[[USER@]HOST[:PORT]]/PATH \
                                with DRIVER \"qemu\" or \"test\", e.g. \"qemu:///system\" or \
                                \"qemu+ssh://root@hv2/system\"";

// The file as serde sees it. Values that a check after deserialization looks at are wrapped in
// `Spanned` so that the check can report their line; `Option` marks fields with a default.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    site: RawSite,
    #[serde(default)]
    federation: RawFederation,
    #[serde(default)]
    api: RawApi,
    inventory: Spanned<RawInventory>,
    clusters: RawClusters,
    #[serde(default)]
    gateway: RawGateway,
    #[serde(default)]
    libvirt: RawLibvirt,
    #[serde(default)]
    installer: RawInstaller,
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
    connections_max: Option<Spanned<u32>>,
    requests_max: Option<Spanned<u32>>,
    client_timeout: Option<Spanned<String>>,
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
    memory_mib: Spanned<u64>,
    disk_gib: Spanned<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClusters {
    vlans: Spanned<String>,
    driver: Option<Spanned<String>>,
    heal_grace: Option<Spanned<String>>,
    lease: Option<Spanned<String>>,
    reserve_deadline: Option<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawGateway {
    listen: Option<Spanned<String>>,
    endpoint: Option<Spanned<String>>,
    bridge: Option<Spanned<String>>,
    trunk: Option<Spanned<String>>,
    busy_poll: Option<Spanned<String>>,
    nice: Option<Spanned<i64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLibvirt {
    hosts: Option<Spanned<Vec<Spanned<String>>>>,
    pool: Option<Spanned<String>>,
    base_image: Option<Spanned<PathBuf>>,
    frontend_image: Option<Spanned<PathBuf>>,
    console_dir: Option<Spanned<PathBuf>>,
    keep_volumes: Option<bool>,
    accel: Option<Spanned<String>>,
    shutdown_timeout_s: Option<Spanned<u64>>,
    memory_mib: Option<Spanned<u64>>,
    remote_bridge: Option<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawInstaller {
    kernel: Option<Spanned<PathBuf>>,
    initrd: Option<Spanned<PathBuf>>,
    args: Option<Spanned<String>>,
}

impl RawConfig {
    /// Checks the rules serde does not know and builds the public config.
    pub(super) fn check(self, source: &Source<'_>) -> Result<Config, ConfigError> {
        let site = self.site.check(source)?;
        let federation = self.federation.check(source)?;
        let api = self.api.check(source, &site.data_dir)?;
        let inventory = check_inventory(self.inventory, source)?;
        let clusters = self.clusters.check(source)?;
        let gateway = self.gateway.check(source)?;
        let libvirt = self.libvirt.check(source, &site.data_dir)?;
        let installer = self.installer.check(source)?;
        Ok(Config {
            path: source.path.to_path_buf(),
            site,
            federation,
            api,
            inventory,
            clusters,
            gateway,
            libvirt,
            installer,
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
            let shown = |value: Duration, set: bool| {
                let text = humantime::format_duration(value).to_string();
                if set {
                    text
                } else {
                    format!("{text}, the default")
                }
            };
            let message = format!(
                "advert_ttl ({}) must be at least twice advert_refresh ({}), or sites flap to \
                 suspect whenever one refresh is late",
                shown(gossip.advert_ttl, self.advert_ttl.is_some()),
                shown(gossip.advert_refresh, self.advert_refresh.is_some()),
            );
            let hint = Some(format!(
                "lower advert_refresh to at most {}, or raise advert_ttl to at least {}",
                humantime::format_duration(gossip.advert_ttl / 2),
                humantime::format_duration(gossip.advert_refresh * 2),
            ));
            // Blame the field that was set; when both were, the refresh,
            // since the message names both and the rule between them.
            return Err(match (&self.advert_refresh, &self.advert_ttl) {
                (Some(refresh), _) => {
                    source.invalid(refresh, "federation.advert_refresh", message, hint)
                }
                (None, Some(ttl)) => source.invalid(ttl, "federation.advert_ttl", message, hint),
                (None, None) => source.error(
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
        let connections_max = source.count_within(
            self.connections_max,
            "api.connections_max",
            DEFAULT_API_CONNECTIONS_MAX,
            API_CONNECTIONS_MAX_MIN..=API_CONNECTIONS_MAX_MAX,
            "fewer refuses the CLI while a few clients are slow, more costs a file \
             descriptor and some memory each",
        )?;
        let requests_max = source.count_within(
            self.requests_max,
            "api.requests_max",
            DEFAULT_API_REQUESTS_MAX,
            API_REQUESTS_MAX_MIN..=API_REQUESTS_MAX_MAX,
            "requests queue for the one ledger anyway; more only lengthens the queue",
        )?;
        let client_timeout = source.duration_within(
            self.client_timeout,
            "api.client_timeout",
            DEFAULT_API_CLIENT_TIMEOUT,
            API_CLIENT_TIMEOUT_MIN..=API_CLIENT_TIMEOUT_MAX,
            "shorter cuts clients on a slow link, longer lets slow clients hold connections",
        )?;
        Ok(ApiConfig {
            listen,
            token_file,
            connections_max,
            requests_max,
            client_timeout,
        })
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
        memory_mib: source.storable(
            source.at_least_one(&raw.node.memory_mib, "inventory.node.memory_mib")?,
            &raw.node.memory_mib,
            "inventory.node.memory_mib",
        )?,
        disk_gib: source.storable(
            source.at_least_one(&raw.node.disk_gib, "inventory.node.disk_gib")?,
            &raw.node.disk_gib,
            "inventory.node.disk_gib",
        )?,
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
        let memory_mib = source.storable(
            *host.memory_mib.get_ref(),
            &host.memory_mib,
            &format!("inventory.hosts[{i}].memory_mib"),
        )?;
        let disk_gib = source.storable(
            *host.disk_gib.get_ref(),
            &host.disk_gib,
            &format!("inventory.hosts[{i}].disk_gib"),
        )?;
        hosts.push(Host {
            name: host.name.into_inner(),
            cores: host.cores,
            memory_mib,
            disk_gib,
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
                "libvirt" => DriverKind::Libvirt,
                other => {
                    return Err(source.invalid(
                        &driver,
                        "clusters.driver",
                        format!("unknown compute driver {other:?}"),
                        Some("use \"none\", \"sim\", \"netns\" or \"libvirt\"".to_owned()),
                    ));
                }
            },
        };
        let duration = |value, field, default, range, why| {
            source.duration_within(value, field, default, range, why)
        };
        let heal_grace = duration(
            self.heal_grace,
            "clusters.heal_grace",
            DEFAULT_HEAL_GRACE,
            HEAL_GRACE_MIN..=HEAL_GRACE_MAX,
            "shorter fences sites over a missed advert, longer leaves clusters short",
        )?;
        let lease = duration(
            self.lease,
            "clusters.lease",
            DEFAULT_LEASE,
            LEASE_MIN..=LEASE_MAX,
            "shorter lets holds lapse before a slow commit arrives, longer keeps the \
             nodes of a master that died from other requests",
        )?;
        let reserve_deadline = duration(
            self.reserve_deadline,
            "clusters.reserve_deadline",
            DEFAULT_RESERVE_DEADLINE,
            RESERVE_DEADLINE_MIN..=RESERVE_DEADLINE_MAX,
            "shorter fails requests that need a few re-plans, longer leaves a request \
             waiting on sites that do not answer",
        )?;
        Ok(ClustersConfig {
            vlans,
            driver,
            heal_grace,
            lease,
            reserve_deadline,
        })
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

        let busy_poll = source.busy_poll(self.busy_poll, "gateway.busy_poll")?;
        let nice = source.nice(self.nice, "gateway.nice")?;
        Ok(GatewayConfig {
            listen,
            endpoint,
            site_link,
            busy_poll,
            nice,
        })
    }
}

impl RawLibvirt {
    fn check(self, source: &Source<'_>, data_dir: &Path) -> Result<LibvirtConfig, ConfigError> {
        let defaults = LibvirtConfig::new(data_dir);

        let hosts = match self.hosts {
            None => defaults.hosts,
            Some(hosts) if hosts.get_ref().is_empty() => {
                return Err(source.invalid(
                    &hosts,
                    "libvirt.hosts",
                    "no host: the libvirt driver needs at least one".to_owned(),
                    Some(format!(
                        "list at least one libvirt URI, e.g. hosts = [\"{DEFAULT_LIBVIRT_HOST}\"]"
                    )),
                ));
            }
            Some(hosts) => check_libvirt_hosts(hosts.into_inner(), source)?,
        };

        let pool = match self.pool {
            None => None,
            Some(pool) => {
                if let Some(problem) = pool_name_problem(pool.get_ref()) {
                    return Err(source.invalid(
                        &pool,
                        "libvirt.pool",
                        format!("invalid pool name {:?}: {problem}", pool.get_ref()),
                        Some(format!(
                            "name an existing libvirt storage pool (`virsh pool-list --all`): \
                             1 to {POOL_NAME_CHARS_MAX} letters, digits, '_', '.' and '-', \
                             e.g. \"default\""
                        )),
                    ));
                }
                Some(pool.into_inner())
            }
        };

        let base_image = self
            .base_image
            .map(|path| source.absolute_path(path, "libvirt.base_image"))
            .transpose()?;
        let frontend_image = self
            .frontend_image
            .map(|path| source.absolute_path(path, "libvirt.frontend_image"))
            .transpose()?;
        let console_dir = match self.console_dir {
            None => defaults.console_dir,
            Some(path) => source.absolute_path(path, "libvirt.console_dir")?,
        };

        let accel = match self.accel {
            None => defaults.accel,
            Some(accel) => match accel.get_ref().as_str() {
                "auto" => Accel::Auto,
                "kvm" => Accel::Kvm,
                "tcg" => Accel::Tcg,
                other => {
                    return Err(source.invalid(
                        &accel,
                        "libvirt.accel",
                        format!("unknown accelerator {other:?}"),
                        Some(
                            "use \"auto\" (KVM if /dev/kvm works, else TCG), \"kvm\" or \"tcg\" \
                             (software emulation)"
                                .to_owned(),
                        ),
                    ));
                }
            },
        };

        let shutdown_timeout_s = match self.shutdown_timeout_s {
            None => defaults.shutdown_timeout_s,
            Some(value) => source.within(
                &value,
                "libvirt.shutdown_timeout_s",
                SHUTDOWN_TIMEOUT_S_MIN..=SHUTDOWN_TIMEOUT_S_MAX,
            )?,
        };
        let memory_mib = self
            .memory_mib
            .map(|value| {
                source.within(
                    &value,
                    "libvirt.memory_mib",
                    NODE_MEMORY_MIB_MIN..=NODE_MEMORY_MIB_MAX,
                )
            })
            .transpose()?;

        let remote_bridge = match self.remote_bridge {
            None => defaults.remote_bridge,
            Some(bridge) => check_remote_bridge(bridge, source)?,
        };

        Ok(LibvirtConfig {
            hosts,
            pool,
            base_image,
            frontend_image,
            console_dir,
            keep_volumes: self.keep_volumes.unwrap_or(defaults.keep_volumes),
            accel,
            shutdown_timeout_s,
            memory_mib,
            remote_bridge,
        })
    }
}

impl RawInstaller {
    fn check(self, source: &Source<'_>) -> Result<InstallerConfig, ConfigError> {
        let kernel = self
            .kernel
            .map(|path| source.absolute_path(path, "installer.kernel"))
            .transpose()?;
        let initrd = match self.initrd {
            None => None,
            Some(path) if kernel.is_none() => {
                return Err(source.invalid(
                    &path,
                    "installer.initrd",
                    "an own installer needs its kernel too: set installer.kernel".to_owned(),
                    Some(
                        "add the kernel your initrd was built for to [installer], e.g. \
                         `kernel = \"/srv/installer/linux\"`; the default kernel, the newest \
                         /boot/vmlinuz-*, is only meant for the built-in installer"
                            .to_owned(),
                    ),
                ));
            }
            Some(path) => Some(source.absolute_path(path, "installer.initrd")?),
        };
        let args = match self.args {
            None => None,
            Some(args) if initrd.is_none() => {
                return Err(source.invalid(
                    &args,
                    "installer.args",
                    "a kernel command line is only for an own installer: installer.initrd is \
                     not set"
                        .to_owned(),
                    Some(
                        "set installer.initrd (and installer.kernel) to the installer these \
                         arguments are for, or remove args: the built-in installer takes none"
                            .to_owned(),
                    ),
                ));
            }
            Some(args) => Some(check_installer_args(args, source)?),
        };
        Ok(InstallerConfig {
            kernel,
            initrd,
            args,
        })
    }
}

fn check_installer_args(args: Spanned<String>, source: &Source<'_>) -> Result<String, ConfigError> {
    let field = "installer.args";
    let line = args.get_ref();
    if line.len() > INSTALLER_ARGS_BYTES_MAX {
        return Err(source.invalid(
            &args,
            field,
            format!(
                "the command line is {} bytes long, more than {INSTALLER_ARGS_BYTES_MAX}",
                line.len()
            ),
            Some(
                "boot loaders cut longer command lines: move settings into the file the \
                 installer fetches (the preseed or kickstart) and pass only its URL"
                    .to_owned(),
            ),
        ));
    }
    if let Some(c) = line.chars().find(|c| c.is_control()) {
        return Err(source.invalid(
            &args,
            field,
            format!("the command line contains the control character {c:?}"),
            Some(format!(
                "a kernel command line is one line of parameters separated by spaces, without \
                 newlines or tabs, e.g. `{}`",
                example(field).unwrap_or_default()
            )),
        ));
    }
    Ok(args.into_inner())
}

fn check_libvirt_hosts(
    raw: Vec<Spanned<String>>,
    source: &Source<'_>,
) -> Result<Vec<String>, ConfigError> {
    // URI -> index of the first entry with it, to say which one a duplicate repeats.
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, uri) in raw.iter().enumerate() {
        let field = format!("libvirt.hosts[{i}]");
        if let Some(problem) = libvirt_uri_problem(uri.get_ref()) {
            return Err(source.invalid(
                uri,
                &field,
                format!("invalid libvirt URI {:?}: {problem}", uri.get_ref()),
                Some(LIBVIRT_URI_HINT.to_owned()),
            ));
        }
        if let Some(first) = seen.get(uri.get_ref().as_str()) {
            return Err(source.invalid(
                uri,
                &field,
                format!(
                    "duplicate host {:?}, already listed as libvirt.hosts[{first}]",
                    uri.get_ref()
                ),
                Some("list each host once".to_owned()),
            ));
        }
        seen.insert(uri.get_ref(), i);
    }
    Ok(raw.into_iter().map(Spanned::into_inner).collect())
}

fn check_remote_bridge(
    bridge: Spanned<String>,
    source: &Source<'_>,
) -> Result<String, ConfigError> {
    let field = "libvirt.remote_bridge";
    let name = bridge.get_ref();
    let placeholders = name.matches(VLAN_PLACEHOLDER).count();
    if placeholders != 1 {
        let message = if placeholders == 0 {
            format!("{name:?} has no {VLAN_PLACEHOLDER} placeholder for the cluster's VLAN id")
        } else {
            format!("{name:?} has {placeholders} {VLAN_PLACEHOLDER} placeholders, not one")
        };
        return Err(source.invalid(
            &bridge,
            field,
            message,
            Some(format!(
                "write {VLAN_PLACEHOLDER} once where the VLAN id goes, e.g. \"br{VLAN_PLACEHOLDER}\""
            )),
        ));
    }
    // The longest name is the one for the highest VLAN id.
    let longest = name.replacen(VLAN_PLACEHOLDER, &VLAN_ID_MAX.to_string(), 1);
    if let Some(problem) = ifname_problem(&longest) {
        return Err(source.invalid(
            &bridge,
            field,
            format!(
                "{name:?} gives {longest:?} for VLAN {VLAN_ID_MAX}, not a valid interface name: \
                 {problem}"
            ),
            Some(format!(
                "a Linux interface name is at most {} bytes without '/', ':' or whitespace, \
                 {VLAN_PLACEHOLDER} included as 4 digits, e.g. \"br{VLAN_PLACEHOLDER}\" or \
                 \"vlan{VLAN_PLACEHOLDER}\"",
                vcfed_overlay::linux::IFNAME_LEN_MAX
            )),
        ));
    }
    Ok(bridge.into_inner())
}

/// Checks that only the site configuration needs.
impl Source<'_> {
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

    /// `number`, the value of `value`, if the ledger can store it: SQLite
    /// integers are signed 64 bits, and a larger size would be refused only
    /// when the agent starts, without a place in the file.
    fn storable(&self, number: u64, value: &Spanned<u64>, field: &str) -> Result<u64, ConfigError> {
        if number > STORED_INTEGER_MAX {
            return Err(self.invalid(
                value,
                field,
                format!("{number} is too large: at most {STORED_INTEGER_MAX}"),
                example(field).map(|example| format!("write it like `{example}`")),
            ));
        }
        Ok(number)
    }

    /// `value` if it lies within `bounds`; the error names both ends.
    fn within(
        &self,
        value: &Spanned<u64>,
        field: &str,
        bounds: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let number = *value.get_ref();
        if !bounds.contains(&number) {
            return Err(self.invalid(
                value,
                field,
                format!(
                    "{number} is out of range: use {} to {}",
                    bounds.start(),
                    bounds.end()
                ),
                example(field).map(|example| format!("write it like `{example}`")),
            ));
        }
        Ok(number)
    }

    /// A path that must be absolute: libvirt may use it on another host, where the directory
    /// of this file means nothing, and the installer's files belong to the system, not to
    /// this file.
    fn absolute_path(&self, value: Spanned<PathBuf>, field: &str) -> Result<PathBuf, ConfigError> {
        let path = value.get_ref();
        if path.as_os_str().is_empty() {
            return Err(self.invalid(
                &value,
                field,
                "path is empty".to_owned(),
                example(field).map(|example| format!("write it like `{example}`")),
            ));
        }
        if !path.is_absolute() {
            return Err(self.invalid(
                &value,
                field,
                format!("{:?} is a relative path", path.display().to_string()),
                Some(format!(
                    "paths in {}: write an absolute path{}",
                    if field.starts_with("installer.") {
                        "[installer] are not resolved against this file's directory, since \
                         they name system files such as a kernel under /boot"
                    } else {
                        "[libvirt] are not resolved against this file's directory, since \
                         libvirt may use them on another host"
                    },
                    example(field)
                        .map(|example| format!(", like `{example}`"))
                        .unwrap_or_default()
                )),
            ));
        }
        Ok(value.into_inner())
    }

    /// A duration within `range` (`default` if absent), `why` saying what
    /// the bounds guard against.
    fn duration_within(
        &self,
        value: Option<Spanned<String>>,
        field: &str,
        default: Duration,
        range: std::ops::RangeInclusive<Duration>,
        why: &str,
    ) -> Result<Duration, ConfigError> {
        let Some(text) = value else {
            return Ok(default);
        };
        let parsed = humantime::parse_duration(text.get_ref()).map_err(|e| {
            self.invalid(
                &text,
                field,
                format!("invalid duration {:?}: {e}", text.get_ref()),
                Some("write a duration such as \"60s\" or \"5m\"".to_owned()),
            )
        })?;
        if !range.contains(&parsed) {
            return Err(self.invalid(
                &text,
                field,
                format!("{:?} is out of range", text.get_ref()),
                Some(format!(
                    "use a duration between {} and {}: {why}",
                    humantime::format_duration(*range.start()),
                    humantime::format_duration(*range.end())
                )),
            ));
        }
        Ok(parsed)
    }

    /// The data plane's busy-poll window (zero if absent), for the site's
    /// `gateway.busy_poll` and `vcfed gateway`'s `busy_poll`.
    pub(crate) fn busy_poll(
        &self,
        value: Option<Spanned<String>>,
        field: &str,
    ) -> Result<Duration, ConfigError> {
        self.duration_within(
            value,
            field,
            Duration::ZERO,
            Duration::ZERO..=vcfed_overlay::linux::BUSY_POLL_MAX,
            "the gateway keeps a core busy for that long after each packet",
        )
    }

    /// The niceness of the data plane's thread (0, unchanged, if absent),
    /// for the site's `gateway.nice` and `vcfed gateway`'s `nice`.
    pub(crate) fn nice(
        &self,
        value: Option<Spanned<i64>>,
        field: &str,
    ) -> Result<i32, ConfigError> {
        use vcfed_overlay::linux::{NICE_MAX, NICE_MIN};
        let Some(value) = value else {
            return Ok(0);
        };
        match i32::try_from(*value.get_ref()) {
            Ok(nice) if (NICE_MIN..=NICE_MAX).contains(&nice) => Ok(nice),
            _ => Err(self.invalid(
                &value,
                field,
                format!("{} is out of range", value.get_ref()),
                Some(format!(
                    "use a niceness between {NICE_MIN} (first served) and {NICE_MAX}; below 0 \
                     needs root or CAP_SYS_NICE"
                )),
            )),
        }
    }

    /// A count within `range` (`default` if absent), `why` saying what the
    /// bounds guard against.
    fn count_within(
        &self,
        value: Option<Spanned<u32>>,
        field: &str,
        default: u32,
        range: std::ops::RangeInclusive<u32>,
        why: &str,
    ) -> Result<u32, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        if !range.contains(value.get_ref()) {
            return Err(self.invalid(
                &value,
                field,
                format!("{} is out of range", value.get_ref()),
                Some(format!(
                    "use a number between {} and {}: {why}",
                    range.start(),
                    range.end()
                )),
            ));
        }
        Ok(value.into_inner())
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

/// What is wrong with `name` as a libvirt storage pool name, if anything.
fn pool_name_problem(name: &str) -> Option<String> {
    let chars = name.chars().count();
    if chars == 0 {
        return Some("it is empty".to_owned());
    }
    if chars > POOL_NAME_CHARS_MAX {
        return Some(format!(
            "it is {chars} characters long, more than {POOL_NAME_CHARS_MAX}"
        ));
    }
    name.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        .map(|c| format!("{c:?} is not a letter, digit, '_', '.' or '-'"))
}

/// What is wrong with `uri` as a libvirt connection URI of a hypervisor host, if anything:
/// `DRIVER[+TRANSPORT]://[[USER@]HOST[:PORT]]/PATH[?PARAMS]`, with a driver of
/// [`LIBVIRT_DRIVERS`] and a transport of [`LIBVIRT_TRANSPORTS`].
fn libvirt_uri_problem(uri: &str) -> Option<String> {
    if let Some(c) = uri.chars().find(|c| c.is_whitespace()) {
        return Some(format!("it contains {c:?}"));
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Some("it has no \"://\" after the driver".to_owned());
    };
    let (driver, transport) = match scheme.split_once('+') {
        Some((driver, transport)) => (driver, Some(transport)),
        None => (scheme, None),
    };
    if !LIBVIRT_DRIVERS.contains(&driver) {
        return Some(format!("driver {driver:?} is not \"qemu\" or \"test\""));
    }
    if let Some(transport) = transport
        && !LIBVIRT_TRANSPORTS.contains(&transport)
    {
        return Some(format!(
            "transport {transport:?} is not one of {}",
            LIBVIRT_TRANSPORTS.join(", ")
        ));
    }
    let rest = rest
        .split_once('?')
        .map_or(rest, |(before, _params)| before);
    let Some((authority, path)) = rest.split_once('/') else {
        return Some("it has no path, such as \"/system\"".to_owned());
    };
    if path.is_empty() {
        return Some("its path is empty; write e.g. \"/system\"".to_owned());
    }
    if authority.is_empty() {
        return None;
    }
    let host_port = match authority.rsplit_once('@') {
        Some(("", _)) => return Some("the user name before '@' is empty".to_owned()),
        Some((_, host_port)) => host_port,
        None => authority,
    };
    let host = match host_port.rsplit_once(':') {
        // A colon inside brackets belongs to an IPv6 address, not to a port.
        Some((host, port)) if !port.contains(']') => {
            if !matches!(port.parse::<u16>(), Ok(port) if port != 0) {
                return Some(format!("port {port:?} is not a number from 1 to 65535"));
            }
            host
        }
        _ => host_port,
    };
    if let Some(address) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return address
            .parse::<Ipv6Addr>()
            .is_err()
            .then(|| format!("{address:?} is not an IPv6 address"));
    }
    if host.parse::<Ipv4Addr>().is_ok() || is_dns_name(host) {
        return None;
    }
    Some(format!(
        "host {host:?} is neither an IP address nor a DNS name"
    ))
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
