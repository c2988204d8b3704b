//! The agent's runner shell: drives the site core's cluster runner
//! ([`vcfed_node_core::runner`], the one step sequence simnet drives too)
//! with the wall clock, the configured compute driver and the agent's
//! gateway as its data plane.
//!
//! Every [`TICK`] the shell runs a full round of the core on tokio's
//! blocking pool (driver work spawns `ip` and dnsmasq), hands the workers'
//! node reports to the federation task and updates what the API shows of
//! the cluster networks. The gateway runs on a thread of its own and
//! follows the segments the core asks it to carry through a watch channel.
//! A restarted agent finds its runs in the ledger and starts them again:
//! the driver replaces a crashed process's leftovers, and the gateway
//! rebuilds the segments and tunnels, without any other site doing
//! anything.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::sync::watch;
use vcfed_overlay::linux::{
    Carried, CarriedPeer, CarriedSegment, GatewayBase, GatewayReport, SiteLink as OverlayLink,
};
use vcfed_storage::LedgerError;

use vcfed_node_core::driver::ComputeDriver;
use vcfed_node_core::lifecycle::{self, RunPlan};
use vcfed_node_core::runner::{self as core, DataPlane, Segment};

pub(crate) use crate::api_types::{NetworkView, TunnelView};
use crate::config::{Config, DriverKind, SiteLink};
use crate::driver::installer::Installer;
use crate::driver::libvirt::{LibvirtDriver, LibvirtSettings};
use crate::driver::netns::NetnsDriver;
use crate::federation::FederationHandle;
use crate::ledger::SharedLedger;
use crate::links::{INNER_MTU, LINK_PREFIX};
use crate::time::now_ms;

/// How often the runner runs a full round of the core.
pub(crate) const TICK: Duration = Duration::from_millis(core::TICK_MS.unsigned_abs());
/// Name of the "bridge" of a cluster when there is no data plane (sim).
const SIM_BRIDGE: &str = "sim";
/// How often endpoints that did not resolve are tried again, ms.
const RESOLVE_EVERY_MS: i64 = 30_000;

/// The core's runner as the agent runs it.
type Runner = core::Runner<Box<dyn ComputeDriver>, AgentPlane>;

/// The networks of the clusters running here, by cluster id, for the API.
#[derive(Debug, Clone, Default)]
pub struct NetworkBoard(Arc<Mutex<BTreeMap<String, NetworkView>>>);

impl NetworkBoard {
    /// The network of `cluster`, if it runs here.
    pub fn get(&self, cluster: &str) -> Option<NetworkView> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(cluster)
            .cloned()
    }

    fn set(&self, views: BTreeMap<String, NetworkView>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = views;
    }
}

/// What the runner counts, for `GET /metrics`.
#[derive(Debug, Clone, Default)]
pub struct RunnerCounters(Arc<RunnerCountersInner>);

#[derive(Debug, Default)]
struct RunnerCountersInner {
    node_retries: AtomicU64,
    clusters_blocked: AtomicU64,
    gateway: Mutex<Option<GatewayCounters>>,
}

/// The gateway's counters as `GET /metrics` shows them: peers named by
/// their site, segments by their cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayCounters {
    /// Per peer gateway: its site (or, for a peer no running cluster names
    /// any more, the start of its key) and its tunnel's counters.
    pub peers: Vec<(String, vcfed_overlay::gateway::PeerStats)>,
    /// Per segment: its cluster, its id and its switch's counters.
    pub segments: Vec<(String, u32, vcfed_overlay::switch::SwitchStats)>,
    /// The gateway's own counters: datagrams dropped by kind.
    pub datagrams: vcfed_overlay::gateway::GatewayStats,
}

impl RunnerCounters {
    /// Nodes started again after they failed, since the agent started.
    pub fn node_retries(&self) -> u64 {
        self.0.node_retries.load(Ordering::Relaxed)
    }

    /// Clusters that cannot start here right now (no VLAN id, no bridge, ...).
    pub fn clusters_blocked(&self) -> u64 {
        self.0.clusters_blocked.load(Ordering::Relaxed)
    }

    /// The gateway's counters, if this agent runs a gateway.
    pub fn gateway(&self) -> Option<GatewayCounters> {
        self.0
            .gateway
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A started runner (and gateway): wait for them at shutdown.
pub(crate) struct RunningRunner {
    /// The runner's task; ends after the stop signal, once the nodes are
    /// stopped (the ledger keeps the runs, so a restart resumes them), or
    /// early if the runner failed.
    pub task: tokio::task::JoinHandle<()>,
    /// The gateway's thread result, if there is a gateway: an error if it
    /// failed (the agent then stops).
    pub gateway: Option<tokio::sync::oneshot::Receiver<anyhow::Result<()>>>,
    /// What the API shows of the cluster networks.
    pub board: NetworkBoard,
    /// What `GET /metrics` shows of the runner.
    pub counters: RunnerCounters,
}

/// Starts the runner (and, for the netns driver, the gateway) of the site
/// configured by `config`; both run until `stop` turns true.
pub(crate) async fn start(
    config: &Config,
    peer_id: String,
    tunnel_key: [u8; 32],
    ledger: SharedLedger,
    federation: Option<FederationHandle>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<RunningRunner> {
    let driver_config = DriverChoice::from_config(config);
    let site_link = config.gateway.site_link.clone();
    let (site, peer) = (config.site.name.clone(), peer_id);
    // What ran before a restart and still should: its segments are kept by
    // the gateway's start-up cleanup, and its nodes by the driver's. This
    // spawns commands and resolves names, so off the async threads.
    let ledger_for_start = ledger.clone();
    let ledger_for_driver = ledger.clone();
    let (driver, site, peer, first) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        // The libvirt driver talks to libvirtd before it is ready.
        let mut driver = driver_config.build(ledger_for_driver)?;
        let now = now_ms();
        let (plans, runs) = ledger_for_start.blocking(|ledger| -> Result<_, LedgerError> {
            Ok((lifecycle::plans(ledger, &site, &peer, now)?, ledger.runs()?))
        })?;
        let keep: BTreeSet<String> = plans.iter().map(|p| p.cluster.clone()).collect();
        if let Some(driver) = &mut driver {
            driver.cleanup_stale(&keep)?;
        }
        let vlans: BTreeMap<&str, u16> = runs
            .iter()
            .map(|run| (run.cluster_id.as_str(), run.vlan))
            .collect();
        let first = Carried {
            segments: plans
                .iter()
                .filter_map(|plan| {
                    let vlan = *vlans.get(plan.cluster.as_str())?;
                    Some(carried_segment(plan, vlan, site_link.as_ref()))
                })
                .collect(),
        };
        Ok((driver, site, peer, first))
    })
    .await??;

    let mut gateway = None;
    let mut plane = AgentPlane::None;
    if matches!(
        config.clusters.driver,
        DriverKind::Netns | DriverKind::Libvirt
    ) {
        let (carried_tx, carried_rx) = watch::channel(first);
        let (report_tx, report_rx) = watch::channel(GatewayReport::default());
        let base = GatewayBase {
            private_key: tunnel_key,
            listen: config.gateway.listen,
            inner_mtu: INNER_MTU,
            link_prefix: LINK_PREFIX.to_owned(),
            busy_poll: config.gateway.busy_poll,
            nice: config.gateway.nice,
        };
        gateway = Some(start_gateway(base, carried_rx, report_tx, stop.clone())?);
        plane = AgentPlane::Gateway(GatewayPlane {
            carried: carried_tx,
            report: report_rx,
            site_link: config.gateway.site_link.clone(),
            resolved: BTreeMap::new(),
            now_ms: now_ms(),
        });
    }
    let vlans = (config.clusters.vlans.first, config.clusters.vlans.last);
    let runner = Runner::new(site, peer, vlans, driver, plane, now_ms());
    let board = NetworkBoard::default();
    let counters = RunnerCounters::default();
    let shell = Shell {
        runner,
        ledger,
        federation,
        board: board.clone(),
        counters: counters.clone(),
    };
    let task = tokio::spawn(run(shell, stop));
    Ok(RunningRunner {
        task,
        gateway,
        board,
        counters,
    })
}

/// The compute driver the config asks for, before it is built.
enum DriverChoice {
    None,
    Sim,
    Netns(NetnsDriver),
    Libvirt(Box<LibvirtSettings>, NetnsDriver),
}

impl DriverChoice {
    fn from_config(config: &Config) -> DriverChoice {
        let netns = || {
            let driver =
                NetnsDriver::new(config.site.data_dir.join("nodes"), &config.site.name, None);
            // Frontends serve the network installer to VMs when this
            // machine has what it is built from.
            let own = &config.installer;
            match Installer::from_config(
                own.kernel.as_deref(),
                own.initrd.as_deref(),
                own.args.as_deref(),
            ) {
                Ok(installer) => driver.with_installer(installer),
                Err(why) => {
                    tracing::info!(%why, "frontends serve no network installer; VMs fetch the install file only");
                    driver
                }
            }
        };
        match config.clusters.driver {
            DriverKind::None => DriverChoice::None,
            DriverKind::Sim => DriverChoice::Sim,
            DriverKind::Netns => DriverChoice::Netns(netns()),
            DriverKind::Libvirt => {
                let settings = LibvirtSettings {
                    site: config.site.name.clone(),
                    data_dir: config.site.data_dir.clone(),
                    config: config.libvirt.clone(),
                    boot_timeout: crate::driver::libvirt::BOOT_TIMEOUT,
                };
                DriverChoice::Libvirt(Box::new(settings), netns())
            }
        }
    }

    /// The driver; the libvirt one connects to every host first.
    fn build(self, ledger: SharedLedger) -> anyhow::Result<Option<Box<dyn ComputeDriver>>> {
        Ok(match self {
            DriverChoice::None => None,
            DriverChoice::Sim => Some(Box::new(crate::driver::sim::SimDriver::new())),
            DriverChoice::Netns(netns) => Some(Box::new(netns)),
            DriverChoice::Libvirt(settings, frontend) => Some(Box::new(
                LibvirtDriver::new(*settings, ledger, frontend)
                    .map_err(|e| anyhow::anyhow!("the libvirt driver cannot start: {e}"))?,
            )),
        })
    }
}

/// Runs the agent's gateway until `stop` turns true (see
/// [`crate::gateway::spawn_gateway`]).
fn start_gateway(
    base: GatewayBase,
    carried: watch::Receiver<Carried>,
    report: watch::Sender<GatewayReport>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<anyhow::Result<()>>> {
    crate::gateway::spawn_gateway(
        "clusters.driver = \"netns\" needs root or CAP_NET_ADMIN",
        move || async move {
            let shutdown = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            vcfed_overlay::linux::run_dynamic(base, carried, report, shutdown).await
        },
    )
}

/// The runner and what the agent connects it to.
struct Shell {
    runner: Runner,
    ledger: SharedLedger,
    /// Where a worker's node states go to the master.
    federation: Option<FederationHandle>,
    board: NetworkBoard,
    counters: RunnerCounters,
}

impl std::fmt::Debug for Shell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shell").finish_non_exhaustive()
    }
}

impl Shell {
    /// One full round of the core, then what follows from it.
    fn tick(&mut self, now_ms: i64) {
        if let AgentPlane::Gateway(plane) = &mut self.runner_plane_mut() {
            plane.now_ms = now_ms;
        }
        // The ledger is locked for one operation at a time, never across
        // driver work.
        let report = self.runner.tick(&mut self.ledger, now_ms);
        let counters = &self.counters.0;
        counters
            .node_retries
            .fetch_add(u64::from(report.node_retries), Ordering::Relaxed);
        counters.clusters_blocked.store(
            u64::try_from(self.runner.blocked().len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        while let Some((cluster, nodes)) = self.runner.poll_report() {
            if let Some(federation) = &self.federation {
                federation.report_nodes(cluster, nodes);
            }
        }
        self.publish_board();
    }

    fn runner_plane_mut(&mut self) -> &mut AgentPlane {
        self.runner.dataplane_mut()
    }

    /// Updates what the API shows of the cluster networks.
    fn publish_board(&self) {
        let plane = self.runner.dataplane();
        let report = match plane {
            AgentPlane::Gateway(plane) => Some(plane.report.borrow().clone()),
            AgentPlane::None => None,
        };
        if let Some(report) = &report {
            let counters = gateway_counters(report, self.runner.active());
            *self
                .counters
                .0
                .gateway
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(counters);
        }
        let mut views: BTreeMap<String, NetworkView> = self
            .runner
            .active()
            .map(|(cluster, plan, vlan)| {
                let segment = report
                    .as_ref()
                    .and_then(|r| r.segments.get(&plan.segment).cloned());
                let tunnels = plan
                    .peers
                    .iter()
                    .map(|peer| TunnelView {
                        site: peer.site.clone(),
                        endpoint: peer.gateway.as_ref().map(|g| g.endpoint.clone()),
                        up: match &report {
                            Some(report) => peer
                                .gateway
                                .as_ref()
                                .and_then(|g| decode_key(&g.public_key))
                                .is_some_and(|key| report.sessions.contains(&key)),
                            None => true,
                        },
                    })
                    .collect();
                let (bridge, error) = match segment {
                    Some(Ok(bridge)) => (Some(bridge), None),
                    Some(Err(e)) => (None, Some(e)),
                    None if report.is_none() => (Some(SIM_BRIDGE.to_owned()), None),
                    None => (None, None),
                };
                let view = NetworkView {
                    vlan: Some(vlan),
                    segment: plan.segment,
                    bridge,
                    error,
                    tunnels,
                };
                (cluster.clone(), view)
            })
            .collect();
        for (cluster, reason) in self.runner.blocked() {
            views.entry(cluster.clone()).or_insert_with(|| NetworkView {
                vlan: None,
                segment: 0,
                bridge: None,
                error: Some(format!("cannot start here: {reason}")),
                tunnels: Vec::new(),
            });
        }
        self.board.set(views);
    }
}

async fn run(shell: Shell, mut stop: watch::Receiver<bool>) {
    let mut shell = Some(shell);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
        let Some(mut current) = shell.take() else {
            break;
        };
        let ticked = tokio::task::spawn_blocking(move || {
            current.tick(now_ms());
            current
        })
        .await;
        match ticked {
            Ok(current) => shell = Some(current),
            Err(e) => {
                // The agent sees the task end and stops: its clusters
                // would otherwise be neither followed nor stopped.
                tracing::error!(error = %e, "the cluster runner failed");
                return;
            }
        }
    }
    // The nodes are children of this process: stop them now rather than
    // leave them unsupervised. The ledger keeps the runs, so a restart
    // brings them back.
    if let Some(mut shell) = shell {
        let _ = tokio::task::spawn_blocking(move || shell.runner.stop_all()).await;
    }
}

/// The agent's data plane: its gateway, or none (the sim driver, whose
/// segments are "up" at once).
#[derive(Debug)]
enum AgentPlane {
    None,
    Gateway(GatewayPlane),
}

/// The agent's gateway as the core's data plane.
#[derive(Debug)]
struct GatewayPlane {
    carried: watch::Sender<Carried>,
    report: watch::Receiver<GatewayReport>,
    site_link: Option<SiteLink>,
    /// Each carried segment as last built, with the plan and VLAN id it
    /// was built from and when its peer endpoints were resolved.
    resolved: BTreeMap<u32, (RunPlan, u16, i64, CarriedSegment)>,
    /// The time of the current round (endpoints that did not resolve are
    /// resolved again every [`RESOLVE_EVERY_MS`]).
    now_ms: i64,
}

impl DataPlane for AgentPlane {
    fn carry(&mut self, segments: &[Segment<'_>]) {
        let AgentPlane::Gateway(plane) = self else {
            return;
        };
        let now_ms = plane.now_ms;
        let mut resolved = BTreeMap::new();
        let mut order = Vec::with_capacity(segments.len());
        for segment in segments {
            let (plan, vlan) = (segment.plan, segment.vlan);
            let reuse =
                plane
                    .resolved
                    .remove(&plan.segment)
                    .filter(|(was, was_vlan, at, carried)| {
                        let unresolved = carried.peers.len()
                            < plan.peers.iter().filter(|p| p.gateway.is_some()).count()
                            || carried.peers.iter().any(|p| p.endpoint.is_none());
                        let stale = unresolved && now_ms - at >= RESOLVE_EVERY_MS;
                        was == plan && *was_vlan == vlan && !stale
                    });
            let entry = reuse.unwrap_or_else(|| {
                let carried = carried_segment(plan, vlan, plane.site_link.as_ref());
                (plan.clone(), vlan, now_ms, carried)
            });
            order.push(plan.segment);
            resolved.insert(plan.segment, entry);
        }
        plane.resolved = resolved;
        // In the order of the clusters, as the gateway was told before.
        let segments: Vec<CarriedSegment> = order
            .iter()
            .filter_map(|id| plane.resolved.get(id))
            .map(|(_, _, _, carried)| carried.clone())
            .collect();
        plane.carried.send_if_modified(|current| {
            let changed = current.segments != segments;
            current.segments = segments;
            changed
        });
    }

    fn bridge(&self, segment: u32) -> Option<Result<String, String>> {
        match self {
            AgentPlane::None => Some(Ok(SIM_BRIDGE.to_owned())),
            AgentPlane::Gateway(plane) => plane.report.borrow().segments.get(&segment).cloned(),
        }
    }

    fn tunnel_up(&self, gateway: &vcfed_storage::GatewayRef) -> bool {
        match self {
            AgentPlane::None => true,
            // A key that is not an X25519 key has no tunnel to wait for.
            AgentPlane::Gateway(plane) => decode_key(&gateway.public_key)
                .is_none_or(|key| plane.report.borrow().sessions.contains(&key)),
        }
    }

    fn refuses_another(&self, running: usize) -> Option<String> {
        let AgentPlane::Gateway(plane) = self else {
            return None;
        };
        if running >= vcfed_overlay::linux::SEGMENTS_MAX {
            return Some(format!(
                "the gateway carries at most {} clusters at once",
                vcfed_overlay::linux::SEGMENTS_MAX
            ));
        }
        if matches!(plane.site_link, Some(SiteLink::Bridge(_))) && running > 0 {
            return Some(
                "with gateway.bridge every cluster would share the site bridge: one cluster at a time"
                    .to_owned(),
            );
        }
        None
    }
}

/// The segment the gateway carries for a running cluster.
fn carried_segment(plan: &RunPlan, vlan: u16, site_link: Option<&SiteLink>) -> CarriedSegment {
    let site_link = match site_link {
        Some(SiteLink::Trunk(trunk)) => OverlayLink::Trunk {
            trunk: trunk.clone(),
            vlan,
        },
        Some(SiteLink::Bridge(bridge)) => OverlayLink::Bridge(bridge.clone()),
        None => OverlayLink::SegmentBridge,
    };
    let peers = plan
        .peers
        .iter()
        .filter_map(|peer| {
            let gateway = peer.gateway.as_ref()?;
            let Some(public_key) = decode_key(&gateway.public_key) else {
                tracing::warn!(site = %peer.site, "the site's gateway key is not a base64 X25519 key; no tunnel to it");
                return None;
            };
            Some(CarriedPeer {
                public_key,
                endpoint: resolve(&gateway.endpoint),
            })
        })
        .collect();
    CarriedSegment {
        id: plan.segment,
        site_link,
        peers,
    }
}

/// The gateway's counters, with peers named by the site whose gateway key
/// they have and segments by the cluster that uses them.
fn gateway_counters<'a>(
    report: &GatewayReport,
    active: impl Iterator<Item = (&'a String, &'a RunPlan, u16)>,
) -> GatewayCounters {
    let mut sites: BTreeMap<[u8; 32], String> = BTreeMap::new();
    let mut clusters: BTreeMap<u32, String> = BTreeMap::new();
    for (cluster, plan, _) in active {
        clusters.insert(plan.segment, cluster.clone());
        for peer in &plan.peers {
            if let Some(key) = peer
                .gateway
                .as_ref()
                .and_then(|g| decode_key(&g.public_key))
            {
                sites.insert(key, peer.site.clone());
            }
        }
    }
    GatewayCounters {
        datagrams: report.gateway_stats,
        peers: report
            .peer_stats
            .iter()
            .map(|(key, stats)| {
                let name = sites
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| format!("key:{}", &STANDARD.encode(key)[..8]));
                (name, *stats)
            })
            .collect(),
        segments: report
            .segment_stats
            .iter()
            .map(|(id, stats)| {
                let cluster = clusters.get(id).cloned().unwrap_or_default();
                (cluster, *id, *stats)
            })
            .collect(),
    }
}

fn decode_key(text: &str) -> Option<[u8; 32]> {
    STANDARD.decode(text).ok()?.try_into().ok()
}

/// The address of a gateway endpoint `host:port` (the first IPv4 one, if
/// any). Unresolvable endpoints give `None`: that site can still reach us.
fn resolve(endpoint: &str) -> Option<SocketAddr> {
    let addrs: Vec<SocketAddr> = endpoint.to_socket_addrs().ok()?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
}
