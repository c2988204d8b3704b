//! The libvirt driver: each compute node is a virtual machine on one of the
//! site's hypervisor hosts, supervised by libvirtd; the frontend stays the
//! built-in service (dnsmasq in a namespace on the cluster bridge, the
//! [`netns`](super::netns) driver's).
//!
//! A node's VM network-boots with QEMU's iPXE ROM: it gets its lease from
//! the frontend (across the tunnels at a worker site), fetches the
//! frontend's boot script and runs it (see [`super::pxe`]); its serial
//! console, the firmware's screen included, is logged to a file the driver
//! reads for the node's state. Its disk is a volume in a storage pool (a
//! thin qcow2 in a `dir` pool; raw in `logical`, `iscsi` and other pools),
//! sized from the request, optionally a copy-on-write overlay of a base
//! image.
//!
//! Names carry the site's tag (`vcf-<site tag>-<cluster tag>-<node>`), so
//! sites that share a host never touch each other's VMs; every volume is in
//! the ledger before it is made, so an agent that crashed finds what it
//! made: at start it adopts the VMs of clusters that still run and removes
//! the rest.
//!
//! A host whose URI names no machine (`qemu:///system`) is this machine:
//! a VM's NIC is a tap that libvirt makes and the driver puts on the
//! cluster bridge, moving it into the agent's network namespace first if
//! libvirtd runs in another one (the demo's sites are namespaces). A host
//! on another machine takes the VM on its bridge for the cluster's VLAN
//! (`remote_bridge`), which the site's VLAN trunk carries from the
//! gateway.

mod domain;
mod virsh;

pub(crate) use virsh::{Virsh, parse_names};

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use domain::{DomainSpec, HostLoad, Nic, Virt};
use vcfed_storage::VolumeRecord;
use virsh::NodeInfo;

use super::netns::{NetnsDriver, run};
use super::{ComputeDriver, DriverError, NodeSpec, NodeState, NodeStatus, pxe, short_tag};
use crate::config::{Accel, LibvirtConfig};
use crate::ledger::SharedLedger;

/// Prefix of the driver's domains and volumes.
pub const DOMAIN_PREFIX: &str = "vcf-";
/// A VM that shows no lease from the frontend within this long failed
/// (software emulation on a busy host is slow to get there).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Disk of a node whose request gave no shape, GiB.
const DEFAULT_DISK_GIB: u64 = 1;
/// Memory of a node whose request gave no shape, MiB.
const DEFAULT_MEMORY_MIB: u64 = 512;
/// How much smaller than asked a lent LUN may be.
const LUN_SLACK_BYTES: u64 = 1 << 20;
/// Domain states are read at most this often per host.
const STATE_EVERY: Duration = Duration::from_millis(500);
/// How much of a console's end is read for its state.
const CONSOLE_TAIL_BYTES: u64 = 64 * 1024;

/// What the driver is told by the site config.
#[derive(Debug, Clone)]
pub struct LibvirtSettings {
    /// The site's name.
    pub site: String,
    /// The agent's data dir (the default pool lives under it).
    pub data_dir: PathBuf,
    /// The site's `[libvirt]` table.
    pub config: LibvirtConfig,
    /// A VM with no lease from the frontend after this long failed
    /// ([`BOOT_TIMEOUT`] in the agent).
    pub boot_timeout: Duration,
}

/// One of the site's hypervisor hosts.
#[derive(Debug)]
struct Host {
    virsh: Virsh,
    info: NodeInfo,
    /// What the pool's volumes are there.
    pool_kind: PoolKind,
    /// The domain states last read, and when.
    states: Option<(Instant, BTreeMap<String, String>)>,
}

/// A node's VM.
#[derive(Debug)]
struct Vm {
    spec: NodeSpec,
    host: usize,
    domain: String,
    volume: String,
    console: PathBuf,
    vcpus: u32,
    memory_mib: u64,
    started: Instant,
    virt: Virt,
    /// Set once the node failed; cleared when it is started again.
    failed: Option<String>,
    /// Whether its console file is on this machine (a host on another
    /// machine writes it there).
    console_readable: bool,
    /// The console's length when last read, and what it said.
    console_seen: Option<(u64, Option<NodeState>, String)>,
}

/// The libvirt driver of one site.
pub struct LibvirtDriver {
    settings: LibvirtSettings,
    site_tag: String,
    pool: String,
    hosts: Vec<Host>,
    virt: Virt,
    ledger: SharedLedger,
    frontend: NetnsDriver,
    nodes: BTreeMap<String, BTreeMap<u32, Vm>>,
    /// Domains an earlier process left for clusters that still run, by
    /// name: the host they are on. `start_node` takes them over.
    adoptable: BTreeMap<String, usize>,
}

impl std::fmt::Debug for LibvirtDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtDriver")
            .field("hosts", &self.settings.config.hosts)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl LibvirtDriver {
    /// Connects to every host, makes sure the pool is there and running
    /// (defining the driver's own `dir` pool if none is configured), and
    /// reads what each host has. Fails with the fix when a host does not
    /// answer.
    pub fn new(
        settings: LibvirtSettings,
        ledger: SharedLedger,
        frontend: NetnsDriver,
    ) -> Result<LibvirtDriver, DriverError> {
        let site_tag = short_tag(&settings.site);
        let pool = settings
            .config
            .pool
            .clone()
            .unwrap_or_else(|| default_pool(&settings.site));
        let mut hosts = Vec::new();
        for uri in &settings.config.hosts {
            let virsh = Virsh::new(uri);
            let info = virsh
                .run(&["nodeinfo"])
                .map_err(|e| unreachable_host(uri, e))?;
            let info = virsh::parse_nodeinfo(&info).ok_or_else(|| DriverError::Command {
                command: format!("virsh -c {uri} nodeinfo"),
                detail: "no CPU count or memory size in its answer".to_owned(),
            })?;
            let pool_kind = ensure_pool(&virsh, &pool, &settings)?;
            hosts.push(Host {
                virsh,
                info,
                pool_kind,
                states: None,
            });
        }
        if let Some(image) = settings
            .config
            .base_image
            .as_ref()
            .or(settings.config.frontend_image.as_ref())
            && hosts.iter().any(|h| h.pool_kind != PoolKind::Files)
        {
            return Err(DriverError::Command {
                command: format!("base_image {}", image.display()),
                detail: format!(
                    "pool {pool} is not a dir pool: copy-on-write overlays of a base image need qcow2 volumes"
                ),
            });
        }
        std::fs::create_dir_all(&settings.config.console_dir)
            .map_err(|e| io_error(&settings.config.console_dir, e))?;
        let virt = match settings.config.accel {
            Accel::Tcg => Virt::Tcg,
            Accel::Kvm => Virt::Kvm,
            Accel::Auto if kvm_opens() => Virt::Kvm,
            Accel::Auto => Virt::Tcg,
        };
        tracing::info!(hosts = ?settings.config.hosts, %pool, virt = virt.domain_type(), "libvirt driver ready");
        Ok(LibvirtDriver {
            site_tag,
            pool,
            hosts,
            virt,
            ledger,
            frontend,
            nodes: BTreeMap::new(),
            adoptable: BTreeMap::new(),
            settings,
        })
    }

    /// The domain name of node `index` of `cluster`.
    pub fn domain_name(&self, cluster: &str, index: u32) -> String {
        format!(
            "{DOMAIN_PREFIX}{}-{}-{index}",
            self.site_tag,
            short_tag(cluster)
        )
    }

    /// This site's VMs on every host, by domain name: the host's URI.
    pub fn own_domains(&self) -> Result<BTreeMap<String, String>, DriverError> {
        let own = format!("{DOMAIN_PREFIX}{}-", self.site_tag);
        let mut domains = BTreeMap::new();
        for host in &self.hosts {
            let names = virsh::parse_names(&host.virsh.run(&["list", "--all", "--name"])?);
            for name in names.into_iter().filter(|n| n.starts_with(&own)) {
                domains.insert(name, host.virsh.uri.clone());
            }
        }
        Ok(domains)
    }

    /// The tap of node `index` of `cluster` (at most 15 bytes).
    fn tap_name(&self, cluster: &str, index: u32) -> String {
        format!(
            "vt{}{index:x}",
            short_tag(&format!("{}/{cluster}", self.settings.site))
        )
    }

    /// The volume of a VM the driver made: by name, or, in a pool of LUNs,
    /// the one the ledger says it lent to the node.
    fn volume_name(&self, domain: &str, host: usize, cluster: &str, index: u32) -> String {
        match self.hosts[host].pool_kind {
            PoolKind::Files => format!("{domain}.qcow2"),
            PoolKind::Raw => domain.to_owned(),
            PoolKind::Luns => self
                .ledger
                .blocking(|ledger| ledger.cluster_volumes(cluster))
                .ok()
                .and_then(|rows| {
                    rows.into_iter()
                        .find(|r| r.node == index && r.host == self.hosts[host].virsh.uri)
                })
                .map(|r| r.name)
                .unwrap_or_default(),
        }
    }

    /// A LUN of the pool on `host` of at least `size_bytes` that no node
    /// holds (the smallest that fits).
    fn free_lun(&self, host: usize, size_bytes: u64) -> Result<String, DriverError> {
        let virsh = &self.hosts[host].virsh;
        let held: BTreeSet<String> = self
            .ledger
            .blocking(|ledger| ledger.volumes())
            .map_err(ledger_error)?
            .into_iter()
            .filter(|v| v.host == virsh.uri && v.pool == self.pool)
            .map(|v| v.name)
            .collect();
        let _ = virsh.run(&["pool-refresh", &self.pool]);
        let names = virsh::parse_names(&virsh.run(&["vol-list", &self.pool])?);
        let total = names.len();
        let mut best: Option<(u64, String)> = None;
        for name in names.into_iter().filter(|n| !held.contains(n)) {
            let info = virsh.run(&["vol-info", &name, "--pool", &self.pool, "--bytes"])?;
            let capacity = virsh::parse_capacity(&info).unwrap_or(0);
            // A target may report a sector less than the size it was made
            // with (its last block's address): within a MiB fits.
            let fits = capacity.saturating_add(LUN_SLACK_BYTES) >= size_bytes;
            if fits && capacity > 0 && best.as_ref().is_none_or(|(c, _)| capacity < *c) {
                best = Some((capacity, name));
            }
        }
        best.map(|(_, name)| name).ok_or_else(|| DriverError::Command {
            command: format!("lending a LUN of pool {} at {}", self.pool, virsh.uri),
            detail: format!(
                "no free LUN of at least {} MiB ({total} LUNs, {} held by nodes); add LUNs to the target, or ask for smaller disks",
                size_bytes >> 20,
                held.len()
            ),
        })
    }

    /// What each host has and what this driver placed on it.
    fn loads(&self) -> Vec<HostLoad> {
        let mut loads: Vec<HostLoad> = self
            .hosts
            .iter()
            .map(|h| HostLoad {
                cpus: h.info.cpus,
                memory_mib: h.info.memory_mib,
                ..HostLoad::default()
            })
            .collect();
        for vm in self.nodes.values().flat_map(|nodes| nodes.values()) {
            let load = &mut loads[vm.host];
            load.placed_vcpus = load.placed_vcpus.saturating_add(vm.vcpus);
            load.placed_mib = load.placed_mib.saturating_add(vm.memory_mib);
        }
        loads
    }

    /// Makes, defines and starts the VM of `spec`; on any failure removes
    /// what it made of it.
    fn create_vm(&mut self, spec: &NodeSpec) -> Result<Vm, DriverError> {
        let domain = self.domain_name(&spec.cluster, spec.index);
        let shape = spec.shape;
        let vcpus = shape.map_or(1, |s| s.cores.max(1));
        let memory_mib = shape
            .map_or(DEFAULT_MEMORY_MIB, |s| s.memory_mib)
            .min(self.settings.config.memory_mib.unwrap_or(u64::MAX))
            .max(64);
        let disk_gib = shape.map_or(DEFAULT_DISK_GIB, |s| s.disk_gib).max(1);
        let host = domain::place(&self.loads(), vcpus, memory_mib).ok_or_else(|| {
            DriverError::Command {
                command: format!("placing {domain}"),
                detail: format!(
                    "no host has {memory_mib} MiB free for it (hosts: {})",
                    self.settings.config.hosts.join(", ")
                ),
            }
        })?;
        let volume = match self.hosts[host].pool_kind {
            PoolKind::Luns => self.free_lun(host, disk_gib.saturating_mul(1 << 30))?,
            _ => self.volume_name(&domain, host, &spec.cluster, spec.index),
        };
        let console = self
            .settings
            .config
            .console_dir
            .join(format!("{domain}.log"));
        let vm = Vm {
            spec: spec.clone(),
            host,
            domain,
            volume,
            console,
            vcpus,
            memory_mib,
            started: Instant::now(),
            virt: self.virt,
            failed: None,
            console_readable: !self.hosts[host].virsh.is_remote(),
            console_seen: None,
        };
        // Nothing of an earlier boot may be read as this one's progress.
        let _ = std::fs::remove_file(&vm.console);
        let size_bytes = disk_gib.saturating_mul(1 << 30);
        let mut vm = vm;
        let mut made = self.make_vm(&vm, size_bytes);
        if made.is_err() && vm.virt == Virt::Kvm && self.settings.config.accel == Accel::Auto {
            // KVM that opens but does not run VMs (nested sandboxes): the
            // site goes on under TCG.
            tracing::warn!(domain = %vm.domain, error = %made.as_ref().err().map(ToString::to_string).unwrap_or_default(), "a VM did not start under KVM: this site's VMs run under TCG (software emulation) from now on");
            if self.remove_vm(&vm, false).is_ok() {
                self.virt = Virt::Tcg;
                vm.virt = Virt::Tcg;
                made = self.make_vm(&vm, size_bytes);
            }
        }
        if let Err(e) = made {
            if let Err(left) = self.remove_vm(&vm, false) {
                tracing::warn!(domain = %vm.domain, error = %left, "a VM that failed to start could not be removed");
            }
            return Err(e);
        }
        // A list read before it existed must not say it is gone.
        self.hosts[host].states = None;
        tracing::info!(cluster = %spec.cluster, node = spec.index, domain = %vm.domain, host = %self.hosts[host].virsh.uri, memory_mib, vcpus, "VM started");
        Ok(vm)
    }

    fn make_vm(&self, vm: &Vm, size_bytes: u64) -> Result<(), DriverError> {
        let host = &self.hosts[vm.host];
        // In the ledger before it exists, so a crash never leaves a volume
        // nobody knows of.
        let record = VolumeRecord {
            host: host.virsh.uri.clone(),
            pool: self.pool.clone(),
            name: vm.volume.clone(),
            cluster_id: vm.spec.cluster.clone(),
            node: vm.spec.index,
            size_bytes,
            created_at_ms: crate::time::now_ms(),
        };
        self.ledger
            .blocking(|ledger| ledger.record_volume(&record))
            .map_err(|e| DriverError::Command {
                command: format!("recording volume {}", vm.volume),
                detail: e.to_string(),
            })?;
        // The volume's XML, not `vol-create-as`: its --backing-vol takes only
        // volumes of a pool, and a base image may be any file.
        let image = if vm.spec.frontend {
            &self.settings.config.frontend_image
        } else {
            &self.settings.config.base_image
        };
        let backing = match image {
            Some(image) => Some((image.as_path(), image_format(image)?)),
            None => None,
        };
        if host.pool_kind != PoolKind::Luns {
            let format = host.pool_kind.format();
            let xml = domain::volume_xml(&vm.volume, size_bytes, format, backing);
            let file = self
                .settings
                .config
                .console_dir
                .join(format!("{}.volume.xml", vm.domain));
            std::fs::write(&file, xml).map_err(|e| io_error(&file, e))?;
            let created = host
                .virsh
                .run(&["vol-create", &self.pool, &file.display().to_string()]);
            let _ = std::fs::remove_file(&file);
            created?;
        }
        let nic = if host.virsh.is_remote() {
            Nic::Bridge(self.settings.config.remote_bridge_for(vm.spec.vlan))
        } else {
            Nic::Tap(self.tap_name(&vm.spec.cluster, vm.spec.index))
        };
        let xml = domain::domain_xml(&DomainSpec {
            name: &vm.domain,
            site: &self.settings.site,
            cluster: &vm.spec.cluster,
            index: vm.spec.index,
            virt: vm.virt,
            memory_mib: vm.memory_mib,
            vcpus: vm.vcpus,
            pool: &self.pool,
            volume: &vm.volume,
            volume_format: host.pool_kind.format(),
            nic: nic.clone(),
            mac: vm.spec.mac,
            console: &vm.console,
            // A frontend VM boots its image; a node the frontend.
            network_boot: !vm.spec.frontend,
            oem_strings: &frontend_strings(&vm.spec),
        });
        let file = self
            .settings
            .config
            .console_dir
            .join(format!("{}.xml", vm.domain));
        std::fs::write(&file, xml).map_err(|e| io_error(&file, e))?;
        let defined = host.virsh.run(&["define", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        defined?;
        match &nic {
            // Paused until its NIC is on the cluster bridge: the boot ROM
            // asks for a lease at once.
            Nic::Tap(tap) if !host.virsh.is_fake() => {
                host.virsh.run(&["start", &vm.domain, "--paused"])?;
                attach_tap(tap, &vm.domain, &vm.spec.bridge)?;
                host.virsh.run(&["resume", &vm.domain])?;
            }
            // On its host's bridge from the start (or a fake host).
            _ => {
                host.virsh.run(&["start", &vm.domain])?;
            }
        }
        Ok(())
    }

    /// Stops and removes a VM, and its volume unless `keep_volume`.
    /// Best effort: what cannot be removed is logged, and the volume's
    /// ledger row stays so a later start tries again.
    fn remove_vm(&self, vm: &Vm, keep_volume: bool) -> Result<(), DriverError> {
        let virsh = &self.hosts[vm.host].virsh;
        let _ = virsh.run(&["destroy", &vm.domain]);
        if let Err(e) = virsh.run(&["undefine", &vm.domain])
            && virsh.run(&["domstate", &vm.domain]).is_ok()
        {
            // Still there: its volume stays too, and the caller keeps the
            // cluster's network until a later try removes it.
            return Err(e);
        }
        self.remove_volume(vm.host, &vm.volume, keep_volume);
        Ok(())
    }

    fn remove_volume(&self, host: usize, volume: &str, keep: bool) {
        let virsh = &self.hosts[host].virsh;
        if volume.is_empty() {
            return;
        }
        if self.hosts[host].pool_kind == PoolKind::Luns {
            // A lent LUN goes back to the pool as it is.
            tracing::info!(volume, pool = %self.pool, "LUN given back");
        } else if !keep {
            let gone = match virsh.run(&["vol-delete", volume, "--pool", &self.pool]) {
                Ok(_) => true,
                // Already gone (or never made).
                Err(_) => matches!(
                    virsh.run(&["vol-info", volume, "--pool", &self.pool]),
                    Err(DriverError::Command { ref detail, .. }) if detail.contains("not found")
                ),
            };
            if !gone {
                tracing::warn!(volume, host = %virsh.uri, "volume not deleted; retried at the next start");
                return;
            }
        } else {
            tracing::info!(volume, pool = %self.pool, host = %virsh.uri, "volume kept (keep_volumes)");
        }
        let (uri, pool) = (virsh.uri.clone(), self.pool.clone());
        if let Err(e) = self
            .ledger
            .blocking(|ledger| ledger.forget_volume(&uri, &pool, volume))
        {
            tracing::warn!(volume, error = %e, "volume row not removed");
        }
    }

    /// The libvirt state of every domain on host `index`, read at most
    /// every [`STATE_EVERY`].
    fn domain_states(&mut self, index: usize) -> Option<BTreeMap<String, String>> {
        let host = &mut self.hosts[index];
        if let Some((at, states)) = &host.states
            && at.elapsed() < STATE_EVERY
        {
            return Some(states.clone());
        }
        match host.virsh.run(&["list", "--all"]) {
            Ok(text) => {
                let states: BTreeMap<String, String> =
                    virsh::parse_list(&text).into_iter().collect();
                host.states = Some((Instant::now(), states.clone()));
                Some(states)
            }
            Err(e) => {
                // Unknown is not gone: the VMs keep their last state.
                tracing::warn!(host = %host.virsh.uri, error = %e, "cannot list domains; node states unchanged");
                None
            }
        }
    }

    /// Adopts a VM an earlier process left running, or removes it.
    fn adopt(&mut self, spec: &NodeSpec, host: usize) -> Result<Option<Vm>, DriverError> {
        let domain = self.domain_name(&spec.cluster, spec.index);
        let virsh = &self.hosts[host].virsh;
        let state = match virsh.run(&["domstate", &domain, "--reason"]) {
            Ok(text) => virsh::parse_domstate(&text),
            Err(e) => {
                // Not knowing is not "gone": try again at the next start.
                tracing::warn!(%domain, error = %e, "cannot read a VM left by an earlier process");
                self.adoptable.insert(domain, host);
                return Err(e);
            }
        };
        let shape = spec.shape;
        let vm = Vm {
            spec: spec.clone(),
            host,
            volume: self.volume_name(&domain, host, &spec.cluster, spec.index),
            console: self
                .settings
                .config
                .console_dir
                .join(format!("{domain}.log")),
            domain,
            vcpus: shape.map_or(1, |s| s.cores.max(1)),
            memory_mib: shape
                .map_or(DEFAULT_MEMORY_MIB, |s| s.memory_mib)
                .min(self.settings.config.memory_mib.unwrap_or(u64::MAX)),
            started: Instant::now(),
            virt: self.virt,
            failed: None,
            console_readable: !self.hosts[host].virsh.is_remote(),
            console_seen: None,
        };
        if !state.is_running() {
            tracing::info!(domain = %vm.domain, state = %state.state, "a VM left by an earlier process is not running; making it again");
            self.remove_vm(&vm, false)?;
            return Ok(None);
        }
        if !virsh.is_remote() && !virsh.is_fake() {
            let tap = self.tap_name(&spec.cluster, spec.index);
            if let Err(e) = attach_tap(&tap, &vm.domain, &spec.bridge) {
                tracing::warn!(domain = %vm.domain, error = %e, "cannot put an adopted VM back on its bridge; making it again");
                self.remove_vm(&vm, false)?;
                return Ok(None);
            }
        }
        self.hosts[host].states = None;
        tracing::info!(cluster = %spec.cluster, node = spec.index, domain = %vm.domain, "adopted a running VM of an earlier process");
        Ok(Some(vm))
    }

    /// The state of one VM, from libvirt and its console.
    fn vm_state(
        vm: &mut Vm,
        libvirt_state: Option<&str>,
        boot_timeout: Duration,
        kvm_failed: &mut bool,
    ) -> NodeState {
        if let Some(reason) = &vm.failed {
            return NodeState::Failed {
                reason: reason.clone(),
            };
        }
        let (from_console, last_line) = read_console(vm);
        // A frontend VM says it serves; it never leases.
        let from_console = match (vm.spec.frontend, from_console) {
            (true, Some(NodeState::Failed { reason })) => Some(NodeState::Failed { reason }),
            (true, _) if vm.console_readable => frontend_state(vm),
            (true, _) => None,
            (false, state) => state,
        };
        let failed = match (libvirt_state, &from_console) {
            (_, Some(NodeState::Failed { reason })) => Some(reason.clone()),
            (None, _) => Some("the VM is gone: undefined outside vcfed".to_owned()),
            (Some("running"), Some(_)) => None,
            (Some("running"), None)
                if vm.console_readable && vm.started.elapsed() > boot_timeout =>
            {
                Some(if vm.spec.frontend {
                    format!(
                        "the frontend image did not print \"{}\" within {} s; console: {last_line}",
                        pxe::FRONTEND_MARKER,
                        boot_timeout.as_secs(),
                    )
                } else {
                    format!(
                        "no lease from the frontend within {} s; console: {last_line}",
                        boot_timeout.as_secs(),
                    )
                })
            }
            (Some("running"), None) => None,
            (Some(state), _) => {
                if vm.virt == Virt::Kvm && (state == "paused" || state == "crashed") {
                    *kvm_failed = true;
                }
                Some(format!("the VM is {state}; console: {last_line}"))
            }
        };
        if let Some(reason) = failed {
            tracing::warn!(domain = %vm.domain, %reason, "node failed");
            vm.failed = Some(reason.clone());
            return NodeState::Failed { reason };
        }
        from_console.unwrap_or(NodeState::Booting)
    }
}

impl ComputeDriver for LibvirtDriver {
    fn start_node(&mut self, spec: &NodeSpec) -> Result<(), DriverError> {
        if spec.frontend && self.settings.config.frontend_image.is_none() {
            return self.frontend.start_node(spec);
        }
        if let Some(vm) = self
            .nodes
            .get_mut(&spec.cluster)
            .and_then(|nodes| nodes.remove(&spec.index))
        {
            if vm.failed.is_none() {
                self.nodes
                    .entry(spec.cluster.clone())
                    .or_default()
                    .insert(spec.index, vm);
                return Ok(());
            }
            tracing::info!(cluster = %spec.cluster, node = spec.index, "making a failed node's VM again");
            if let Err(e) = self.remove_vm(&vm, false) {
                // Keep following it; the next retry tries again.
                self.nodes
                    .entry(spec.cluster.clone())
                    .or_default()
                    .insert(spec.index, vm);
                return Err(e);
            }
        }
        let domain = self.domain_name(&spec.cluster, spec.index);
        let vm = match self.adoptable.remove(&domain) {
            Some(host) => match self.adopt(spec, host)? {
                Some(vm) => vm,
                None => self.create_vm(spec)?,
            },
            None => self.create_vm(spec)?,
        };
        self.nodes
            .entry(spec.cluster.clone())
            .or_default()
            .insert(spec.index, vm);
        Ok(())
    }

    fn poll(&mut self, cluster: &str) -> Vec<NodeStatus> {
        let mut statuses = self.frontend.poll(cluster);
        let hosts: BTreeSet<usize> = self
            .nodes
            .get(cluster)
            .map(|nodes| nodes.values().map(|vm| vm.host).collect())
            .unwrap_or_default();
        let states: BTreeMap<usize, Option<BTreeMap<String, String>>> = hosts
            .into_iter()
            .map(|host| (host, self.domain_states(host)))
            .collect();
        let mut kvm_failed = false;
        let boot_timeout = self.settings.boot_timeout;
        if let Some(nodes) = self.nodes.get_mut(cluster) {
            for (index, vm) in nodes.iter_mut() {
                let state = match states.get(&vm.host) {
                    Some(Some(known)) => LibvirtDriver::vm_state(
                        vm,
                        known.get(&vm.domain).map(String::as_str),
                        boot_timeout,
                        &mut kvm_failed,
                    ),
                    // libvirt did not answer: what the console says.
                    _ => match vm.failed.clone() {
                        Some(reason) => NodeState::Failed { reason },
                        None => read_console(vm).0.unwrap_or(NodeState::Booting),
                    },
                };
                statuses.push(NodeStatus {
                    index: *index,
                    frontend: vm.spec.frontend,
                    state,
                });
            }
        }
        if kvm_failed && self.settings.config.accel == Accel::Auto && self.virt == Virt::Kvm {
            tracing::warn!(
                "a VM stopped under KVM: this site's VMs run under TCG (software emulation) from now on"
            );
            self.virt = Virt::Tcg;
        }
        statuses.sort_by_key(|s| s.index);
        statuses
    }

    fn stop_cluster(&mut self, cluster: &str) -> Result<(), DriverError> {
        let frontend = self.frontend.stop_cluster(cluster);
        let mut vms: Vec<Vm> = self
            .nodes
            .remove(cluster)
            .map(|nodes| nodes.into_values().collect())
            .unwrap_or_default();
        // What an earlier process left of it and nobody took over.
        let tag = format!("{DOMAIN_PREFIX}{}-{}-", self.site_tag, short_tag(cluster));
        let leftovers: Vec<(String, usize)> = self
            .adoptable
            .iter()
            .filter(|(name, _)| name.starts_with(&tag))
            .map(|(name, host)| (name.clone(), *host))
            .collect();
        for (name, host) in leftovers {
            self.adoptable.remove(&name);
            let index = name
                .rsplit('-')
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            vms.push(Vm {
                spec: NodeSpec {
                    cluster: cluster.to_owned(),
                    index,
                    frontend: false,
                    bridge: String::new(),
                    subnet: std::net::Ipv4Addr::UNSPECIFIED,
                    mac: [0; 6],
                    vlan: 0,
                    shape: None,
                },
                host,
                volume: self.volume_name(&name, host, cluster, index),
                console: self.settings.config.console_dir.join(format!("{name}.log")),
                domain: name,
                vcpus: 0,
                memory_mib: 0,
                started: Instant::now(),
                virt: self.virt,
                failed: None,
                console_readable: !self.hosts[host].virsh.is_remote(),
                console_seen: None,
            });
        }
        let started = Instant::now();
        // An ACPI shutdown to all, then wait for them together. A VM still in
        // its boot firmware (iPXE runs the frontend's script) has nothing
        // that could shut down: it is destroyed at once.
        let mut running: Vec<&Vm> = Vec::new();
        for vm in &vms {
            if vm.console_readable && pxe::in_firmware(&read_tail(&vm.console)) {
                continue;
            }
            let _ = self.hosts[vm.host].virsh.run(&["shutdown", &vm.domain]);
            running.push(vm);
        }
        let deadline = started + self.settings.config.shutdown_timeout();
        while !running.is_empty() && Instant::now() < deadline {
            running.retain(|vm| {
                self.hosts[vm.host]
                    .virsh
                    .run(&["domstate", &vm.domain])
                    .is_ok_and(|s| virsh::parse_domstate(&s).is_running())
            });
            if !running.is_empty() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if !running.is_empty() {
            tracing::info!(
                cluster,
                vms = running.len(),
                timeout_s = self.settings.config.shutdown_timeout().as_secs(),
                "VMs did not shut down in time; destroying them"
            );
        }
        let mut failed = None;
        for vm in &vms {
            if let Err(e) = self.remove_vm(vm, self.settings.config.keep_volumes) {
                tracing::warn!(domain = %vm.domain, error = %e, "VM not removed");
                failed = Some(e);
            } else if vm.console_readable {
                let _ = std::fs::remove_file(&vm.console);
            }
        }
        if let Some(e) = failed {
            // The run stays (its VLAN id is not given back while a VM may
            // still sit on its network); the next stop tries again.
            for vm in vms.into_iter().filter(|vm| vm.vcpus > 0) {
                self.nodes
                    .entry(cluster.to_owned())
                    .or_default()
                    .insert(vm.spec.index, vm);
            }
            return Err(e);
        }
        // Volumes of the cluster the ledger knows and no VM named (a crash
        // between making the volume and defining the VM).
        self.remove_ledger_volumes(|v| v.cluster_id == cluster);
        for host in &mut self.hosts {
            host.states = None;
        }
        tracing::info!(
            cluster,
            vms = vms.len(),
            secs = started.elapsed().as_secs_f64(),
            "VMs stopped"
        );
        frontend
    }

    fn cleanup_stale(&mut self, keep: &BTreeSet<String>) -> Result<(), DriverError> {
        self.frontend.cleanup_stale(keep)?;
        let keep_tags: BTreeSet<String> = keep.iter().map(|c| short_tag(c)).collect();
        let own = format!("{DOMAIN_PREFIX}{}-", self.site_tag);
        for index in 0..self.hosts.len() {
            let names =
                virsh::parse_names(&self.hosts[index].virsh.run(&["list", "--all", "--name"])?);
            for name in names.into_iter().filter(|n| n.starts_with(&own)) {
                let tag = name[own.len()..].split('-').next().unwrap_or_default();
                if keep_tags.contains(tag) {
                    self.adoptable.insert(name, index);
                    continue;
                }
                tracing::info!(domain = %name, host = %self.hosts[index].virsh.uri, "removing a VM left by an earlier process");
                let virsh = &self.hosts[index].virsh;
                let _ = virsh.run(&["destroy", &name]);
                if let Err(e) = virsh.run(&["undefine", &name]) {
                    tracing::warn!(domain = %name, error = %e, "cannot remove a VM left by an earlier process; remove it by hand");
                }
            }
            // Volumes made by an earlier process that the ledger lost
            // track of cannot happen (rows go first); volumes in the pool
            // with our prefix and no row are removed all the same.
            let virsh = &self.hosts[index].virsh;
            let known: BTreeSet<String> = self
                .ledger
                .blocking(|ledger| ledger.volumes())
                .map_err(ledger_error)?
                .into_iter()
                .filter(|v| v.host == virsh.uri)
                .map(|v| v.name)
                .collect();
            let volumes = virsh::parse_names(&virsh.run(&["vol-list", &self.pool])?);
            for volume in volumes.into_iter().filter(|v| v.starts_with(&own)) {
                let tag = volume[own.len()..].split('-').next().unwrap_or_default();
                // With keep_volumes, volumes of ended clusters are the
                // operator's: never removed here.
                if !self.settings.config.keep_volumes
                    && !keep_tags.contains(tag)
                    && !known.contains(&volume)
                {
                    tracing::info!(%volume, "removing a volume left by an earlier process");
                    let _ = virsh.run(&["vol-delete", &volume, "--pool", &self.pool]);
                }
            }
        }
        self.remove_ledger_volumes(|v| !keep.contains(&v.cluster_id));
        Ok(())
    }

    fn suspend_cluster(&mut self, cluster: &str) -> Result<(), DriverError> {
        // The VMs run on under libvirtd; the next agent adopts them. The
        // frontend's dnsmasq is a child of this process.
        if let Some(nodes) = self.nodes.remove(cluster) {
            tracing::info!(
                cluster,
                vms = nodes.len(),
                "leaving the VMs running for the next agent"
            );
        }
        self.frontend.stop_cluster(cluster)
    }
}

impl LibvirtDriver {
    /// Deletes the volumes the ledger lists that `select` picks, on hosts
    /// this site still has, and forgets them.
    fn remove_ledger_volumes(&self, select: impl Fn(&VolumeRecord) -> bool) {
        let volumes = match self.ledger.blocking(|ledger| ledger.volumes()) {
            Ok(volumes) => volumes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the volumes of the ledger");
                return;
            }
        };
        for volume in volumes.iter().filter(|v| select(v)) {
            match self.hosts.iter().position(|h| h.virsh.uri == volume.host) {
                Some(host) if volume.pool == self.pool => {
                    self.remove_volume(host, &volume.name, self.settings.config.keep_volumes)
                }
                _ => {
                    tracing::warn!(volume = %volume.name, host = %volume.host, pool = %volume.pool, "a volume on a host or pool this site no longer uses is left; remove it by hand")
                }
            }
        }
    }
}

/// The `dir` pool the driver defines for `site` when none is configured.
pub fn default_pool(site: &str) -> String {
    format!("vcfed-{}", short_tag(site))
}

/// An unreachable host: the error, with the fix.
fn unreachable_host(uri: &str, error: DriverError) -> DriverError {
    let detail = match error {
        DriverError::Command { detail, .. } => detail,
        other => other.to_string(),
    };
    DriverError::Command {
        command: format!("connecting to libvirt at {uri}"),
        detail: format!(
            "{detail}\n  hint: start libvirtd there (`systemctl start libvirtd`, or `virtlogd -d && libvirtd -d` without systemd), or fix [libvirt] hosts in the site config"
        ),
    }
}

/// Makes sure `pool` exists and runs on `virsh`'s host; defines the
/// driver's own `dir` pool when none is configured. Returns the format of
/// its volumes.
fn ensure_pool(
    virsh: &Virsh,
    pool: &str,
    settings: &LibvirtSettings,
) -> Result<PoolKind, DriverError> {
    let xml = match virsh.run(&["pool-dumpxml", pool]) {
        Ok(xml) => xml,
        Err(e) if settings.config.pool.is_some() => {
            return Err(DriverError::Command {
                command: format!("storage pool {pool} at {}", virsh.uri),
                detail: format!(
                    "{e}\n  hint: define it (`virsh pool-define-as`), or leave [libvirt] pool unset for a dir pool under the data dir"
                ),
            });
        }
        Err(_) => {
            let path = settings.data_dir.join("pool");
            std::fs::create_dir_all(&path).map_err(|e| io_error(&path, e))?;
            // QEMU runs as its own user: it must be able to reach the
            // volumes (search permission only, nothing listable).
            for dir in [&settings.data_dir, &path] {
                allow_search(dir)?;
            }
            if !virsh.is_remote() && !virsh.is_fake() {
                check_searchable(&settings.data_dir)?;
            }
            let file = settings.data_dir.join("pool.xml");
            std::fs::write(&file, domain::dir_pool_xml(pool, &path))
                .map_err(|e| io_error(&file, e))?;
            let defined = virsh.run(&["pool-define", &file.display().to_string()]);
            let _ = std::fs::remove_file(&file);
            defined?;
            let _ = virsh.run(&["pool-build", pool]);
            virsh.run(&["pool-autostart", pool])?;
            tracing::info!(%pool, path = %path.display(), host = %virsh.uri, "defined a dir storage pool");
            virsh.run(&["pool-dumpxml", pool])?
        }
    };
    let info = virsh.run(&["pool-info", pool])?;
    if !info
        .lines()
        .any(|l| l.starts_with("State:") && l.contains("running"))
    {
        virsh.run(&["pool-start", pool])?;
    }
    Ok(match virsh::root_type(&xml) {
        Some("dir") | Some("fs") | Some("netfs") => PoolKind::Files,
        Some("iscsi") | Some("iscsi-direct") | Some("scsi") | Some("mpath") => PoolKind::Luns,
        _ => PoolKind::Raw,
    })
}

/// What a pool's volumes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolKind {
    /// Files the driver makes: thin qcow2 (`dir`, `fs`, `netfs`).
    Files,
    /// Raw volumes the driver makes (`logical`: LVs; `rbd`, `zfs`, ...).
    Raw,
    /// LUNs of a storage target that libvirt cannot make (`iscsi`,
    /// `iscsi-direct`, `scsi`, `mpath`): the driver lends a free one of
    /// enough size to a node, and takes it back at the cluster's end
    /// without deleting it.
    Luns,
}

impl PoolKind {
    /// The format of its volumes.
    fn format(self) -> &'static str {
        match self {
            PoolKind::Files => "qcow2",
            PoolKind::Raw | PoolKind::Luns => "raw",
        }
    }
}

/// Adds search permission for others to `dir` (nothing else).
fn allow_search(dir: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir).map_err(|e| io_error(dir, e))?;
    let mode = meta.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
            .map_err(|e| io_error(dir, e))?;
    }
    Ok(())
}

/// Fails, naming the directory and the fix, unless every directory above
/// `dir` lets others search it: QEMU runs as its own user, not root.
fn check_searchable(dir: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(DriverError::Command {
                command: format!("the storage pool under {}", dir.display()),
                detail: format!(
                    "QEMU runs as its own user and cannot reach it: {} is not searchable by others\n  hint: `chmod o+x {}`, or set [libvirt] pool to a pool elsewhere",
                    ancestor.display(),
                    ancestor.display()
                ),
            });
        }
    }
    Ok(())
}

/// The format of a disk image, from its first bytes.
fn image_format(path: &Path) -> Result<&'static str, DriverError> {
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| DriverError::Io {
        path: format!("base_image {}", path.display()),
        source: e,
    })?;
    Ok(match file.read_exact(&mut magic) {
        Ok(()) if &magic == b"QFI\xfb" => "qcow2",
        _ => "raw",
    })
}

/// Whether `/dev/kvm` opens for reading and writing.
fn kvm_opens() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Puts a VM's tap on `bridge`, moving it first into this process's
/// network namespace if libvirtd made it in another one.
fn attach_tap(tap: &str, domain: &str, bridge: &str) -> Result<(), DriverError> {
    // Asked over netlink: /sys shows the namespace it was mounted in.
    if run("ip", &["link", "show", "dev", tap]).is_err() {
        let pid_file = PathBuf::from("/run/libvirt/qemu").join(format!("{domain}.pid"));
        let pid = std::fs::read_to_string(&pid_file).map_err(|e| io_error(&pid_file, e))?;
        let pid = pid.trim();
        run(
            "nsenter",
            &[
                &format!("--net=/proc/{pid}/ns/net"),
                "ip",
                "link",
                "set",
                tap,
                "netns",
                &std::process::id().to_string(),
            ],
        )?;
    }
    run("ip", &["link", "set", tap, "master", bridge, "up"])?;
    Ok(())
}

/// The SMBIOS OEM strings of a frontend VM: what its image needs to know
/// of the cluster network (none for a compute node).
fn frontend_strings(spec: &NodeSpec) -> Vec<String> {
    if !spec.frontend {
        return Vec::new();
    }
    let [a, b, c, _] = spec.subnet.octets();
    vec![
        format!("vcfed.cluster={}", spec.cluster),
        format!("vcfed.address={a}.{b}.{c}.1/24"),
        format!("vcfed.dhcp-range={a}.{b}.{c}.10-{a}.{b}.{c}.250"),
    ]
}

/// A frontend VM's state from its console: serving at `.1` once its image
/// printed [`pxe::FRONTEND_MARKER`].
fn frontend_state(vm: &Vm) -> Option<NodeState> {
    let console = read_tail(&vm.console);
    pxe::frontend_serving(&console).then(|| {
        let [a, b, c, _] = vm.spec.subnet.octets();
        NodeState::Serving {
            ip: std::net::Ipv4Addr::new(a, b, c, 1),
        }
    })
}

/// What a VM's console says (its state, its last line), read again only
/// when it grew.
fn read_console(vm: &mut Vm) -> (Option<NodeState>, String) {
    if !vm.console_readable {
        return (None, String::new());
    }
    let len = std::fs::metadata(&vm.console).map_or(0, |m| m.len());
    if let Some((seen, state, last)) = &vm.console_seen
        && *seen == len
    {
        return (state.clone(), last.clone());
    }
    let console = read_tail(&vm.console);
    let state = pxe::console_state(&console);
    let last = pxe::last_console_line(&console);
    vm.console_seen = Some((len, state.clone(), last.clone()));
    (state, last)
}

/// The end of a console log.
fn read_tail(path: &Path) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.take(CONSOLE_TAIL_BYTES).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

fn io_error(path: &Path, source: std::io::Error) -> DriverError {
    DriverError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn ledger_error(e: vcfed_storage::LedgerError) -> DriverError {
    DriverError::Command {
        command: "ledger".to_owned(),
        detail: e.to_string(),
    }
}
