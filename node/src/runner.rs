//! The agent's cluster runner: carries out the [`lifecycle`] at this site.
//!
//! Every [`TICK`] it derives from the ledger which clusters should run here
//! now ([`lifecycle::plans`]) and makes it so:
//!
//! 1. **start**: take a VLAN id from the site's pool (persisted with the
//!    run), mark the cluster `starting`, and ask the gateway to carry the
//!    cluster's segment to the gateways of its other sites;
//! 2. once the gateway reports the segment's bridge: boot the nodes on it
//!    through the compute driver (the frontend first, at the master);
//! 3. poll the nodes, persist their states, and mark the cluster `running`
//!    once every node is up;
//! 4. **stop** (window over, delete, failure): stop the nodes, drop the
//!    segment, give the VLAN id back, and mark the cluster `finished` if
//!    its window is over.
//!
//! The runner keeps nothing that the ledger does not: a restarted agent
//! finds its runs in the ledger, starts them again (the driver replaces a
//! crashed process's leftovers) and the gateway rebuilds the segment and
//! tunnels, without any other site doing anything.
//!
//! Driver work (spawning `ip` and dnsmasq) blocks, so a tick runs on
//! tokio's blocking pool; the gateway runs on a thread of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vcfed_overlay::linux::{
    Carried, CarriedPeer, CarriedSegment, GatewayBase, GatewayReport, SiteLink as OverlayLink,
};
use vcfed_storage::{GatewayRef, Ledger, LedgerError};

use crate::config::{Config, DriverKind, SiteLink, VlanRange};
use crate::driver::{ComputeDriver, NodeSpec, NodeStatus, node_mac};
use crate::federation::FederationHandle;
use crate::ledger::SharedLedger;
use crate::lifecycle::{self, Action, RunPlan};
use crate::time::now_ms;

/// How often the runner looks at the ledger and the nodes.
pub const TICK: Duration = Duration::from_millis(250);
/// Prefix of the links the agent's gateway creates.
pub const LINK_PREFIX: &str = "vcf";
/// Inner MTU of the agent's gateway: a 1500-byte WAN path.
pub const INNER_MTU: usize = 1440;
/// Name of the "bridge" of a cluster when there is no data plane (sim).
const SIM_BRIDGE: &str = "sim";

/// A cluster's network at this site, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    /// The cluster's local VLAN id at this site (`None`: it could not
    /// start here; `error` says why).
    pub vlan: Option<u16>,
    /// The overlay segment id.
    pub segment: u32,
    /// The local bridge its nodes are on, once set up.
    pub bridge: Option<String>,
    /// Why the segment could not be set up, if it could not.
    pub error: Option<String>,
    /// The tunnels to the cluster's other sites.
    pub tunnels: Vec<TunnelView>,
}

/// A tunnel to another site of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelView {
    /// The site.
    pub site: String,
    /// Its gateway's endpoint, if it has one.
    pub endpoint: Option<String>,
    /// Whether a WireGuard session with it is up.
    pub up: bool,
}

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

/// Where the runner's cluster networks come from.
enum Network {
    /// No data plane (the sim driver): a segment is "up" at once.
    None,
    /// The agent's gateway.
    Gateway {
        carried: watch::Sender<Carried>,
        report: watch::Receiver<GatewayReport>,
        site_link: Option<SiteLink>,
    },
}

/// A cluster started by this process.
struct Active {
    plan: RunPlan,
    vlan: u16,
    /// The segment as the gateway carries it (peer endpoints resolved when
    /// the plan is made or changes, and again while one does not resolve).
    segment: CarriedSegment,
    resolved_at_ms: i64,
    nodes_started: bool,
    statuses: Vec<NodeStatus>,
    /// Nodes that failed (to start, or to boot), with their retries so far
    /// and when the next is due.
    retries: BTreeMap<u32, (u32, i64)>,
    /// Why a node could not be started at all, by node number.
    start_errors: BTreeMap<u32, String>,
    /// When the node states were last sent to the master.
    reported_at_ms: Option<i64>,
    /// Whether the cluster was marked `running` here.
    running: bool,
}

/// The runner of one site. See the module docs.
pub struct Runner {
    site: String,
    peer_id: String,
    vlans: VlanRange,
    ledger: SharedLedger,
    /// `None` for `clusters.driver = "none"`: nothing is started, clusters
    /// are only finished when their window is over.
    driver: Option<Box<dyn ComputeDriver>>,
    network: Network,
    active: BTreeMap<String, Active>,
    board: NetworkBoard,
    /// Clusters that cannot start here now, with the reason.
    blocked: BTreeMap<String, String>,
    /// Where a worker's node states go to the master.
    federation: Option<FederationHandle>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("site", &self.site)
            .field("active", &self.active.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A started runner (and gateway): wait for them at shutdown.
pub struct RunningRunner {
    /// The runner's task; ends after the stop signal, once the nodes are
    /// stopped (the ledger keeps the runs, so a restart resumes them), or
    /// early if the runner failed.
    pub task: tokio::task::JoinHandle<()>,
    /// The gateway's thread result, if there is a gateway: an error if it
    /// failed (the agent then stops).
    pub gateway: Option<tokio::sync::oneshot::Receiver<anyhow::Result<()>>>,
    /// What the API shows of the cluster networks.
    pub board: NetworkBoard,
}

/// Starts the runner (and, for the netns driver, the gateway) of the site
/// configured by `config`; both run until `stop` turns true.
pub async fn start(
    config: &Config,
    peer_id: String,
    tunnel_key: [u8; 32],
    ledger: SharedLedger,
    federation: Option<FederationHandle>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<RunningRunner> {
    let driver: Option<Box<dyn ComputeDriver>> = match config.clusters.driver {
        DriverKind::None => None,
        DriverKind::Sim => Some(Box::new(crate::driver::sim::SimDriver::new())),
        DriverKind::Netns => Some(Box::new(crate::driver::netns::NetnsDriver::new(
            config.site.data_dir.join("nodes"),
            &config.site.name,
            None,
        ))),
    };
    let site_link = config.gateway.site_link.clone();
    let mut runner = Runner {
        site: config.site.name.clone(),
        peer_id,
        vlans: config.clusters.vlans,
        ledger,
        driver,
        network: Network::None,
        active: BTreeMap::new(),
        board: NetworkBoard::default(),
        blocked: BTreeMap::new(),
        federation,
    };
    // What ran before a restart and still should: its segments are kept by
    // the gateway's start-up cleanup, and its nodes by the driver's. This
    // spawns commands and resolves names, so off the async threads.
    let (runner, first) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let now = now_ms();
        let (plans, runs) = runner.ledger.blocking(|ledger| -> Result<_, LedgerError> {
            Ok((
                lifecycle::plans(ledger, &runner.site, &runner.peer_id, now)?,
                ledger.runs()?,
            ))
        })?;
        let keep: BTreeSet<String> = plans.iter().map(|p| p.cluster.clone()).collect();
        if let Some(driver) = &mut runner.driver {
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
        Ok((runner, first))
    })
    .await??;
    let mut runner = runner;

    let mut gateway = None;
    if config.clusters.driver == DriverKind::Netns {
        let (carried_tx, carried_rx) = watch::channel(first);
        let (report_tx, report_rx) = watch::channel(GatewayReport::default());
        let base = GatewayBase {
            private_key: tunnel_key,
            listen: config.gateway.listen,
            inner_mtu: INNER_MTU,
            link_prefix: LINK_PREFIX.to_owned(),
        };
        gateway = Some(start_gateway(base, carried_rx, report_tx, stop.clone())?);
        runner.network = Network::Gateway {
            carried: carried_tx,
            report: report_rx,
            site_link: config.gateway.site_link.clone(),
        };
    }
    let board = runner.board.clone();
    let task = tokio::spawn(run(runner, stop));
    Ok(RunningRunner {
        task,
        gateway,
        board,
    })
}

/// Runs the gateway on a thread of its own with a single-threaded runtime
/// (see `vcfed gateway`: this halves the per-packet cost).
fn start_gateway(
    base: GatewayBase,
    carried: watch::Receiver<Carried>,
    report: watch::Sender<GatewayReport>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<anyhow::Result<()>>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vcfed-gateway".to_owned())
        .spawn(move || {
            let ended = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| {
                    let shutdown = async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    };
                    let stats = runtime
                        .block_on(vcfed_overlay::linux::run_dynamic(
                            base, carried, report, shutdown,
                        ))
                        .map_err(|e| {
                            let hint = if e.is_permission_denied() {
                                "running the gateway (clusters.driver = \"netns\" needs root or CAP_NET_ADMIN)"
                            } else {
                                "running the gateway"
                            };
                            anyhow::Error::new(e).context(hint)
                        })?;
                    tracing::debug!(?stats, "gateway counters");
                    Ok(())
                });
            let _ = done_tx.send(ended);
        })?;
    Ok(done_rx)
}

async fn run(runner: Runner, mut stop: watch::Receiver<bool>) {
    let mut runner = Some(runner);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
        let Some(mut current) = runner.take() else {
            break;
        };
        let ticked = tokio::task::spawn_blocking(move || {
            current.tick(now_ms());
            current
        })
        .await;
        match ticked {
            Ok(current) => runner = Some(current),
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
    if let Some(mut runner) = runner {
        let _ = tokio::task::spawn_blocking(move || {
            let clusters: Vec<String> = runner.active.keys().cloned().collect();
            if let Some(driver) = &mut runner.driver {
                for cluster in clusters {
                    if let Err(e) = driver.stop_cluster(&cluster) {
                        tracing::warn!(%cluster, error = %e, "stopping the nodes failed");
                    }
                }
            }
        })
        .await;
    }
}

/// Retries of a node that failed, before it is left failed.
const NODE_RETRIES_MAX: u32 = 5;
/// First wait before a node is retried, ms; it doubles up to
/// [`NODE_RETRY_MAX_MS`].
const NODE_RETRY_FIRST_MS: i64 = 2_000;
const NODE_RETRY_MAX_MS: i64 = 30_000;
/// How often endpoints that did not resolve are tried again, ms.
const RESOLVE_EVERY_MS: i64 = 30_000;

impl Runner {
    /// One round: start, advance and stop clusters as the ledger says.
    pub fn tick(&mut self, now_ms: i64) {
        let (site, peer) = (self.site.clone(), self.peer_id.clone());
        let read = self.ledger.blocking(|ledger| -> Result<_, LedgerError> {
            Ok((ledger.live_clusters()?, ledger.runs()?))
        });
        let (records, runs) = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "reading the clusters failed");
                return;
            }
        };
        let plans: Vec<RunPlan> = match self.driver {
            Some(_) => records
                .iter()
                .filter_map(|record| lifecycle::plan(record, &site, &peer, now_ms))
                .collect(),
            None => Vec::new(),
        };
        let running: BTreeSet<String> = self.active.keys().cloned().collect();
        for action in lifecycle::reconcile(&plans, &running, &runs) {
            match action {
                Action::Start(plan) => self.start(plan, now_ms),
                Action::Stop { cluster } => self.stop(&cluster, now_ms),
            }
        }
        // Clusters whose window is over and that do not run here (any
        // more) are finished here.
        let running: BTreeSet<String> = self.active.keys().cloned().collect();
        for record in lifecycle::finish_idle(&records, &runs, &running, now_ms) {
            let finished = self.ledger.blocking(|ledger| {
                ledger.update_cluster(
                    &record.id,
                    vcfed_storage::ClusterState::Finished,
                    None,
                    None,
                    now_ms,
                )
            });
            match finished {
                Ok(_) => tracing::info!(cluster = %record.id, "window over: cluster finished here"),
                Err(e) => {
                    tracing::warn!(cluster = %record.id, error = %e, "recording the end of a cluster failed")
                }
            }
        }
        let planned: BTreeSet<&str> = plans.iter().map(|p| p.cluster.as_str()).collect();
        self.blocked
            .retain(|cluster, _| planned.contains(cluster.as_str()));
        // A running cluster's plan may change (a part replaced after a
        // re-plan); endpoints that did not resolve are tried again.
        let site_link = self.site_link();
        for plan in plans {
            if let Some(active) = self.active.get_mut(&plan.cluster) {
                let unresolved = active.segment.peers.len()
                    < plan.peers.iter().filter(|p| p.gateway.is_some()).count()
                    || active.segment.peers.iter().any(|p| p.endpoint.is_none());
                let stale = unresolved && now_ms - active.resolved_at_ms >= RESOLVE_EVERY_MS;
                if active.plan != plan || stale {
                    active.segment = carried_segment(&plan, active.vlan, site_link.as_ref());
                    active.resolved_at_ms = now_ms;
                    active.plan = plan;
                }
            }
        }
        self.publish_network();
        let clusters: Vec<String> = self.active.keys().cloned().collect();
        for cluster in clusters {
            self.advance(&cluster, now_ms);
        }
        self.publish_board();
    }

    /// Why a new cluster cannot start here now, if it cannot.
    fn cannot_start(&self) -> Option<String> {
        let Network::Gateway { site_link, .. } = &self.network else {
            return None;
        };
        if self.active.len() >= vcfed_overlay::linux::SEGMENTS_MAX {
            return Some(format!(
                "the gateway carries at most {} clusters at once",
                vcfed_overlay::linux::SEGMENTS_MAX
            ));
        }
        if matches!(site_link, Some(SiteLink::Bridge(_))) && !self.active.is_empty() {
            return Some(
                "with gateway.bridge every cluster would share the site bridge: one cluster at a time"
                    .to_owned(),
            );
        }
        None
    }

    fn start(&mut self, plan: RunPlan, now_ms: i64) {
        let cluster = plan.cluster.clone();
        let started = match self.cannot_start() {
            Some(reason) => Err(reason),
            None => {
                let (first, last) = (self.vlans.first, self.vlans.last);
                self.ledger
                    .blocking(|ledger| -> Result<u16, LedgerError> {
                        let run = ledger.start_run(&cluster, first, last, now_ms)?;
                        set_state(ledger, &cluster, false, now_ms)?;
                        Ok(run.vlan)
                    })
                    .map_err(|e| e.to_string())
            }
        };
        match started {
            Ok(vlan) => {
                tracing::info!(%cluster, vlan, segment = plan.segment, nodes = plan.nodes.len(), master = plan.master, "starting the cluster here");
                self.blocked.remove(&cluster);
                let segment = carried_segment(&plan, vlan, self.site_link().as_ref());
                self.active.insert(
                    cluster,
                    Active {
                        plan,
                        vlan,
                        segment,
                        resolved_at_ms: now_ms,
                        nodes_started: false,
                        statuses: Vec::new(),
                        retries: BTreeMap::new(),
                        start_errors: BTreeMap::new(),
                        reported_at_ms: None,
                        running: false,
                    },
                );
            }
            Err(reason) => {
                if self.blocked.get(&cluster) != Some(&reason) {
                    tracing::warn!(%cluster, error = %reason, "the cluster cannot start here; retrying");
                    self.blocked.insert(cluster, reason);
                }
            }
        }
    }

    fn stop(&mut self, cluster: &str, now_ms: i64) {
        if let Some(driver) = &mut self.driver
            && let Err(e) = driver.stop_cluster(cluster)
        {
            tracing::warn!(%cluster, error = %e, "stopping the nodes failed; the run is kept to retry");
            return;
        }
        self.active.remove(cluster);
        self.publish_network();
        let ended = self.ledger.blocking(|ledger| -> Result<(), LedgerError> {
            ledger.end_run(cluster, now_ms)?;
            if let Some(record) = ledger.cluster(cluster)?
                && let Some(state) = lifecycle::state_after_stop(&record, now_ms)
            {
                ledger.update_cluster(cluster, state, None, None, now_ms)?;
            }
            Ok(())
        });
        match ended {
            Ok(()) => tracing::info!(%cluster, "cluster stopped here; its VLAN id is free again"),
            Err(e) => tracing::warn!(%cluster, error = %e, "recording the stop failed"),
        }
    }

    /// Whether a worker may boot its nodes: its segment's bridge is there
    /// and, with a data plane, the tunnel to the master is up (nodes that
    /// boot before it would find no DHCP server). `None`: not yet.
    fn boot_bridge(&self, cluster: &str) -> Option<String> {
        let active = self.active.get(cluster)?;
        let Network::Gateway { report, .. } = &self.network else {
            return Some(SIM_BRIDGE.to_owned());
        };
        let report = report.borrow();
        let Some(Ok(bridge)) = report.segments.get(&active.plan.segment) else {
            return None;
        };
        // A master key that is not an X25519 key has no tunnel to wait for.
        let tunnel_up = |gateway: &GatewayRef| {
            decode_key(&gateway.public_key).is_none_or(|key| report.sessions.contains(&key))
        };
        lifecycle::may_boot(&active.plan, tunnel_up).then(|| bridge.clone())
    }

    /// Boots the nodes once the network is there, retries the ones that
    /// failed, follows their states and the cluster's.
    fn advance(&mut self, cluster: &str, now_ms: i64) {
        let bridge = self.boot_bridge(cluster);
        let Some(driver) = &mut self.driver else {
            return;
        };
        let Some(active) = self.active.get_mut(cluster) else {
            return;
        };
        let spec = |index: u32, frontend: bool, bridge: &str, active: &Active| NodeSpec {
            cluster: cluster.to_owned(),
            index,
            frontend,
            bridge: bridge.to_owned(),
            subnet: active.plan.subnet,
            mac: node_mac(cluster, index),
        };
        if !active.nodes_started {
            let Some(bridge) = bridge else {
                return;
            };
            // The frontend first: the master's plan lists it first.
            for node in active.plan.nodes.clone() {
                if let Err(e) = driver.start_node(&spec(node.index, node.frontend, &bridge, active))
                {
                    tracing::warn!(%cluster, node = node.index, error = %e, "node did not start; retrying");
                    active.start_errors.insert(node.index, e.to_string());
                }
            }
            active.nodes_started = true;
        } else if let Some(bridge) = bridge {
            retry_failed(driver.as_mut(), cluster, active, &bridge, now_ms, spec);
        }
        let mut statuses = driver.poll(cluster);
        for (index, error) in &active.start_errors {
            if !statuses.iter().any(|s| s.index == *index) {
                statuses.push(NodeStatus {
                    index: *index,
                    frontend: active
                        .plan
                        .nodes
                        .iter()
                        .any(|n| n.index == *index && n.frontend),
                    state: crate::driver::NodeState::Failed {
                        reason: error.clone(),
                    },
                });
            }
        }
        statuses.sort_by_key(|s| s.index);
        let changed = statuses != active.statuses;
        if changed {
            for status in &statuses {
                let before = active.statuses.iter().find(|s| s.index == status.index);
                if before.map(|s| &s.state) != Some(&status.state) {
                    tracing::info!(%cluster, node = status.index, state = ?status.state, "node");
                }
            }
            let records = lifecycle::node_records(&self.site, &statuses, now_ms);
            let site = self.site.clone();
            let stored = self
                .ledger
                .blocking(|ledger| ledger.set_nodes(cluster, &site, &records));
            if let Err(e) = stored {
                tracing::warn!(%cluster, error = %e, "recording node states failed");
                return;
            }
        }
        if lifecycle::report_due(&active.plan, changed, active.reported_at_ms, now_ms) {
            report(self.federation.as_ref(), cluster, &statuses);
            active.reported_at_ms = Some(now_ms);
        }
        active.statuses = statuses;
        if active.running {
            return;
        }
        // A worker's part is up when its nodes are; the cluster, at the
        // master, when every node of every site is (the workers report).
        let (plan, statuses) = (&active.plan, &active.statuses);
        let moved = self.ledger.blocking(|ledger| -> Result<bool, LedgerError> {
            let up = lifecycle::site_up(plan, statuses, || ledger.nodes(cluster))?;
            set_state(ledger, cluster, up, now_ms)?;
            Ok(up)
        });
        match moved {
            Ok(up) => active.running = up,
            Err(e) => tracing::warn!(%cluster, error = %e, "recording the cluster's state failed"),
        }
    }

    fn site_link(&self) -> Option<SiteLink> {
        match &self.network {
            Network::Gateway { site_link, .. } => site_link.clone(),
            Network::None => None,
        }
    }

    /// Tells the gateway which segments to carry (if that changed).
    fn publish_network(&self) {
        let Network::Gateway { carried, .. } = &self.network else {
            return;
        };
        let segments: Vec<CarriedSegment> = self
            .active
            .values()
            .map(|active| active.segment.clone())
            .collect();
        carried.send_if_modified(|current| {
            let changed = current.segments != segments;
            current.segments = segments;
            changed
        });
    }

    /// Updates what the API shows of the cluster networks.
    fn publish_board(&self) {
        let report = match &self.network {
            Network::Gateway { report, .. } => Some(report.borrow().clone()),
            Network::None => None,
        };
        let mut views: BTreeMap<String, NetworkView> = self
            .active
            .iter()
            .map(|(cluster, active)| {
                let segment = report
                    .as_ref()
                    .and_then(|r| r.segments.get(&active.plan.segment).cloned());
                let tunnels = active
                    .plan
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
                    vlan: Some(active.vlan),
                    segment: active.plan.segment,
                    bridge,
                    error,
                    tunnels,
                };
                (cluster.clone(), view)
            })
            .collect();
        for (cluster, reason) in &self.blocked {
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

/// Starts again, with a growing backoff and a bounded number of times, the
/// nodes that failed (to start, or to boot).
fn retry_failed(
    driver: &mut dyn ComputeDriver,
    cluster: &str,
    active: &mut Active,
    bridge: &str,
    now_ms: i64,
    spec: impl Fn(u32, bool, &str, &Active) -> NodeSpec,
) {
    let failed: Vec<(u32, bool)> = active
        .plan
        .nodes
        .iter()
        .filter(|node| {
            active.start_errors.contains_key(&node.index)
                || active.statuses.iter().any(|s| {
                    s.index == node.index
                        && matches!(s.state, crate::driver::NodeState::Failed { .. })
                })
        })
        .map(|node| (node.index, node.frontend))
        .collect();
    for (index, frontend) in failed {
        let (tries, due_ms) = active.retries.get(&index).copied().unwrap_or((0, now_ms));
        if tries >= NODE_RETRIES_MAX || now_ms < due_ms {
            continue;
        }
        let backoff = NODE_RETRY_FIRST_MS
            .saturating_mul(1 << tries.min(16))
            .min(NODE_RETRY_MAX_MS);
        active.retries.insert(index, (tries + 1, now_ms + backoff));
        tracing::info!(%cluster, node = index, attempt = tries + 1, "retrying a failed node");
        match driver.start_node(&spec(index, frontend, bridge, active)) {
            Ok(()) => {
                active.start_errors.remove(&index);
            }
            Err(e) => {
                active.start_errors.insert(index, e.to_string());
            }
        }
    }
}

/// Sends a worker's node states to the cluster's master.
fn report(federation: Option<&FederationHandle>, cluster: &str, statuses: &[NodeStatus]) {
    let Some(federation) = federation else {
        return;
    };
    federation.report_nodes(cluster.to_owned(), lifecycle::reported_nodes(statuses));
}

/// Moves the cluster forward at this site (`starting`, then `running`
/// once `up`), if it is not already further.
fn set_state(ledger: &mut Ledger, cluster: &str, up: bool, now_ms: i64) -> Result<(), LedgerError> {
    if let Some(next) = lifecycle::advance_state(ledger, cluster, up, now_ms)? {
        tracing::info!(%cluster, state = %next, "cluster state");
    }
    Ok(())
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
