//! The commented file that `vcfed init` writes.

use std::net::SocketAddr;
use std::path::PathBuf;

use multiaddr::Multiaddr;

use super::types::{
    INSTALLER_ARGS_BYTES_MAX, NODE_MEMORY_MIB_MAX, NODE_MEMORY_MIB_MIN, POOL_NAME_CHARS_MAX,
    SHUTDOWN_TIMEOUT_S_MAX, SHUTDOWN_TIMEOUT_S_MIN,
};
use super::{
    DEFAULT_API_LISTEN, DEFAULT_FEDERATION_LISTEN, DEFAULT_GATEWAY_LISTEN, DEFAULT_LIBVIRT_HOST,
    DEFAULT_LIBVIRT_REMOTE_BRIDGE, DEFAULT_LIBVIRT_SHUTDOWN_TIMEOUT_S, NodeShape, VlanRange,
};

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
///
/// [`Config::parse`]: super::Config::parse
pub fn render_template(p: &InitParams) -> String {
    let data_dir = p.data_dir.to_string_lossy();
    let token_file = p.data_dir.join("api.token");
    let console_dir = p.data_dir.join("consoles");
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
# Most open connections (16-16384); one beyond is answered 503 and closed.
# Most requests handled at once (1-4096; /healthz aside); one beyond is
# answered 503 `busy` with Retry-After. How long a client may take to send
# a request's headers, then its body, and to take some of an answer (1s-5m;
# 408 for a body, the connection closed); idle keep-alive connections close
# after it too.
# Defaults: 1024, 64, "10s".
# connections_max = 1024
# requests_max = 64
# client_timeout = "10s"

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
# "sim" (no side effects), "netns" (each node a network namespace booted
# over DHCP/TFTP from the cluster's frontend; runs the gateway; needs root)
# or "libvirt" (each compute node a QEMU virtual machine that PXE-boots from
# the cluster's frontend, set up in [libvirt] below; runs the gateway; needs
# root and a running libvirtd). Default: "none".
# driver = "netns"
# When a worker site of a cluster this site masters is gone from the gossip
# view and silent this long, its nodes are declared lost: cut off from the
# cluster's network and, by the cluster's heal policy (`vcfed cluster create
# --heal`), replaced at other sites. Between 10s and 1h. Default: "60s".
# heal_grace = "60s"
# How long a worker site holds nodes for a master before its commit (5s-10m),
# and how long a master may take to collect every hold of a request
# (10s-10m; its own hold lasts that plus the lease). Defaults: "30s", "60s".
# lease = "30s"
# reserve_deadline = "60s"

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
# How long the data plane keeps polling after a packet instead of sleeping,
# "0s" to 1s: shorter ping times between sites on hosts whose idle cores are
# slow to wake (virtual machines), for a core kept busy while packets keep
# coming. Default: "0s" (off).
# busy_poll = "0s"
# The niceness of the data plane's thread, -20 (first served) to 19: below 0,
# pings and ACKs between sites wait less behind busy work on the same cores
# (needs root or CAP_SYS_NICE). Default: 0 (unchanged).
# nice = -10

# Where driver = "libvirt" runs node VMs. The table and every field in it
# are optional; the table is checked whatever the driver.
# [libvirt]
# libvirt connection URIs of this site's hypervisor hosts, written
# DRIVER[+TRANSPORT]://[[USER@]HOST[:PORT]]/PATH[?PARAMS] with DRIVER "qemu"
# (or "test", libvirt's fake host), e.g. "qemu+ssh://root@hv2/system"; at
# least one, each once. Default: ["{DEFAULT_LIBVIRT_HOST}"].
# hosts = ["{DEFAULT_LIBVIRT_HOST}"]
# An existing libvirt storage pool for the nodes' disks: 1 to
# {POOL_NAME_CHARS_MAX} letters, digits, '_', '.' and '-'. Default: unset (the agent
# defines its own "dir" pool in "<data_dir>/pool").
# pool = "default"
# Disk image that every node volume is a copy-on-write overlay of; an
# absolute path. Default: unset (no backing image).
# base_image = "/var/lib/libvirt/images/node-base.qcow2"
# Disk image the master's frontend boots from, as a VM on the cluster
# network (a copy-on-write overlay of it per cluster; it must take the
# cluster's .1 address and serve DHCP/PXE, and print "VCFED-FRONTEND
# serving" on its serial console when it does); an absolute path.
# Default: unset (the built-in frontend: dnsmasq in a namespace).
# frontend_image = "/var/lib/libvirt/images/frontend.qcow2"
# Directory for the nodes' serial console logs; an absolute path.
# Default: "<data_dir>/consoles".
# console_dir = {console_dir}
# Keep the node volumes after their cluster ends. Default: false.
# keep_volumes = false
# What runs the VMs' CPUs: "auto" (KVM if /dev/kvm works, else TCG), "kvm"
# or "tcg" (software emulation). Default: "auto".
# accel = "auto"
# Seconds an ACPI shutdown may take before the VM is destroyed; within
# {SHUTDOWN_TIMEOUT_S_MIN}-{SHUTDOWN_TIMEOUT_S_MAX}. Default: {DEFAULT_LIBVIRT_SHUTDOWN_TIMEOUT_S}.
# shutdown_timeout_s = {DEFAULT_LIBVIRT_SHUTDOWN_TIMEOUT_S}
# Cap on a node VM's memory, in MiB, within {NODE_MEMORY_MIB_MIN}-{NODE_MEMORY_MIB_MAX}.
# Default: unset (the memory the cluster's request asks for per node).
# memory_mib = 2048
# On every host but the first: the Linux bridge that carries a cluster's
# VLAN from the site trunk, with {{vlan}} (exactly once) for the VLAN id; at
# most 15 bytes with {{vlan}} as 4 digits. Default: "{DEFAULT_LIBVIRT_REMOTE_BRIDGE}".
# remote_bridge = "{DEFAULT_LIBVIRT_REMOTE_BRIDGE}"

# What the cluster frontend serves to the nodes that network-boot, when this
# site is a cluster's master. The table and every field in it are optional.
# [installer]
# Kernel the frontend serves; an absolute path. For the built-in installer,
# its modules must be in /lib/modules/<version>, where <version> is what
# follows "vmlinuz-" in the file name. Default: the newest /boot/vmlinuz-*
# of this machine.
# kernel = "/boot/vmlinuz-6.1.0-18-amd64"
# Initrd of your own installer (a Debian netboot initrd with a preseed, a
# kickstart, a Rocks-style installer...): the frontend then serves kernel
# with this initrd and args instead of the built-in installer. Needs kernel,
# the one the initrd was built for; an absolute path. Default: unset (the
# built-in installer).
# initrd = "/srv/installer/initrd.gz"
# Kernel command line of your own installer; only with initrd, one line of
# at most {INSTALLER_ARGS_BYTES_MAX} bytes. When a node is installed, your installer can
# report it, so that the node's next boot goes to its disk, with
#   wget -q -O- "http://<frontend>/cgi-bin/report?mac=<mac with - separators>&state=installed"
# Default: unset (an empty command line).
# args = "console=ttyS0 auto=true priority=critical url=http://deploy.example.org/preseed.cfg"
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
        console_dir = toml_string(&console_dir.to_string_lossy()),
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
