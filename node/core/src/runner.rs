//! The cluster runner: the one step sequence that carries out the
//! [`lifecycle`] at a site. The agent and simnet drive this same code; they
//! differ only in the [`ComputeDriver`], the [`DataPlane`] and the
//! [`LedgerAccess`] they hand it, and in when they call it.
//!
//! A full round ([`Runner::tick`]) derives from the ledger which clusters
//! should run here now ([`lifecycle::plans`]) and makes it so:
//!
//! 1. **start**: take a VLAN id from the site's pool (persisted with the
//!    run), mark the cluster `starting`; the data plane is told to carry
//!    the cluster's segment to the gateways of its other sites;
//! 2. once the data plane has the segment's bridge (and, at a worker, the
//!    tunnel to the master is up): boot the nodes on it through the driver,
//!    the frontend first at the master; retry nodes that failed, with a
//!    growing backoff and a bounded number of times;
//! 3. poll the nodes, persist their states on change, queue the worker's
//!    report to the master ([`Runner::poll_report`]), and mark the cluster
//!    `running` once every node is up;
//! 4. **stop** (window over, delete, failure): stop the nodes, drop the
//!    segment, give the VLAN id back, and mark the cluster `finished` if
//!    its window is over; finish the clusters whose window is over and that
//!    do not run here.
//!
//! The runner keeps nothing that the ledger does not: a new runner (a
//! restarted agent, a simulated site after a crash) finds its runs in the
//! ledger and starts them again.
//!
//! Contract: sans-IO but for what it is handed. Call [`Runner::tick`] at
//! any time (the agent does every [`TICK_MS`]), or [`Runner::run_due`] at
//! [`Runner::poll_timeout`] after telling it of ledger writes with
//! [`Runner::wake`] (simnet does); after every call drain
//! [`Runner::poll_report`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use vcfed_storage::{ClusterState, GatewayRef, LedgerError};

use crate::cluster::ReportedNode;
use crate::driver::{ComputeDriver, NodeSpec, NodeState, NodeStatus, node_mac};
pub use crate::ledger::LedgerAccess;
use crate::lifecycle::{self, Action, RunPlan};

/// How often the agent runs a full round, ms.
pub const TICK_MS: i64 = 250;
/// How often a run that waits (for its tunnel, or for a VLAN id) is looked
/// at again by [`Runner::run_due`], ms.
const WAIT_POLL_MS: i64 = 1_000;
/// Retries of a node that failed, before it is left failed.
const NODE_RETRIES_MAX: u32 = 5;
/// First wait before a node is retried, ms; it doubles up to
/// [`NODE_RETRY_MAX_MS`].
const NODE_RETRY_FIRST_MS: i64 = 2_000;
const NODE_RETRY_MAX_MS: i64 = 30_000;

/// The site's data plane as the runner sees it: the gateway that carries
/// cluster segments to the other sites.
pub trait DataPlane {
    /// Carry exactly these segments (called after every change, and at
    /// every full round; an implementation sends only what changed).
    fn carry(&mut self, segments: &[Segment<'_>]);
    /// The local bridge of `segment`'s nodes: `None` while it is not set
    /// up yet, `Err` with the reason if it could not be.
    fn bridge(&self, segment: u32) -> Option<Result<String, String>>;
    /// Whether the tunnel to the site of `gateway` is up.
    fn tunnel_up(&self, gateway: &GatewayRef) -> bool;
    /// Why one more cluster cannot start here, with `running` running, if
    /// it cannot (the gateway's limits).
    fn refuses_another(&self, running: usize) -> Option<String>;
}

/// A segment the data plane is to carry: a running cluster's plan and its
/// local VLAN id.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// The cluster's plan here (segment id, peers).
    pub plan: &'a RunPlan,
    /// The cluster's local VLAN id.
    pub vlan: u16,
}

/// What a round changed, for the caller (simnet's checks, logs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// A run started or ended (VLAN ids taken or freed).
    pub runs_changed: bool,
    /// Clusters whose nodes here changed.
    pub nodes_changed: BTreeSet<String>,
    /// Clusters whose state here the runner changed, with the new state.
    pub states: Vec<(String, ClusterState)>,
    /// Clusters the runner stopped here.
    pub stopped: Vec<String>,
    /// Ledger operations that failed (each retried at a later round).
    pub errors: Vec<String>,
    /// Nodes started again after they failed.
    pub node_retries: u32,
}

/// A planted fault, for simnet's check of its own checks: the runner
/// forgets to give a stopped cluster's VLAN id back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerFault {
    /// Stops without [`vcfed_storage::Ledger::end_run`].
    LeakVlan,
}

/// A cluster started by this runner.
#[derive(Debug)]
struct Active {
    plan: RunPlan,
    vlan: u16,
    booted: bool,
    /// Nodes a new plan added after the boot (a replacement part at a site
    /// that already runs the cluster), started once the bridge allows.
    added: Vec<lifecycle::PlannedNode>,
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
#[derive(Debug)]
pub struct Runner<D, P> {
    site: String,
    peer: String,
    vlans: (u16, u16),
    /// `None`: clusters are not started here (`clusters.driver = "none"`),
    /// only finished when their window is over.
    driver: Option<D>,
    dataplane: P,
    fault: Option<RunnerFault>,
    active: BTreeMap<String, Active>,
    /// Clusters that cannot start here now, with the reason.
    blocked: BTreeMap<String, String>,
    /// Node reports for masters, in order.
    reports: VecDeque<(String, Vec<ReportedNode>)>,
    /// A round is wanted at (the ledger changed), local ms.
    wake_ms: Option<i64>,
    /// The next window start or end of a live cluster here, local ms.
    boundary_ms: Option<i64>,
    /// When waiting runs are looked at again, local ms.
    poll_ms: Option<i64>,
    /// The earliest of the above and of the workers' report deadlines.
    next_ms: Option<i64>,
}

impl<D: ComputeDriver, P: DataPlane> Runner<D, P> {
    /// The runner of site `site` (peer id `peer`) with the VLAN pool
    /// `vlans` (first, last); it wants a round at once.
    pub fn new(
        site: String,
        peer: String,
        vlans: (u16, u16),
        driver: Option<D>,
        dataplane: P,
        now_ms: i64,
    ) -> Runner<D, P> {
        assert!(vlans.0 <= vlans.1, "the VLAN pool is not empty");
        Runner {
            site,
            peer,
            vlans,
            driver,
            dataplane,
            fault: None,
            active: BTreeMap::new(),
            blocked: BTreeMap::new(),
            reports: VecDeque::new(),
            wake_ms: Some(now_ms),
            boundary_ms: None,
            poll_ms: None,
            next_ms: Some(now_ms),
        }
    }

    /// Plants `fault` (simnet's planted bugs only).
    pub fn plant(&mut self, fault: RunnerFault) {
        self.fault = Some(fault);
    }

    /// The site's ledger changed: a full round within [`TICK_MS`].
    pub fn wake(&mut self, now_ms: i64) {
        let at = now_ms + TICK_MS;
        if self.wake_ms.is_none_or(|wake| wake > at) {
            self.wake_ms = Some(at);
            self.next_ms = Some(self.next_ms.map_or(at, |next| next.min(at)));
        }
    }

    /// When [`Runner::run_due`] has something to do, local ms.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.next_ms
    }

    /// The next node report for a cluster's master: (cluster, nodes).
    pub fn poll_report(&mut self) -> Option<(String, Vec<ReportedNode>)> {
        self.reports.pop_front()
    }

    /// Does what is due at `now_ms`: a full round when the ledger changed,
    /// a window starts or ends, or a start waits for a VLAN id; otherwise
    /// only the runs whose tunnel wait or report is due are advanced:
    /// nothing else can have changed since the last full round, so that is
    /// what a full round would do.
    pub fn run_due(&mut self, ledger: &mut impl LedgerAccess, now_ms: i64) -> TickReport {
        let due = |at: Option<i64>| at.is_some_and(|at| at <= now_ms);
        let full = due(self.wake_ms)
            || due(self.boundary_ms)
            || (due(self.poll_ms) && !self.blocked.is_empty());
        if full {
            return self.tick(ledger, now_ms);
        }
        let mut report = TickReport::default();
        let waits_due = due(self.poll_ms);
        let clusters: Vec<String> = self
            .active
            .iter()
            .filter(|(_, a)| {
                if a.booted {
                    !a.plan.master
                        && a.reported_at_ms
                            .is_none_or(|at| at + lifecycle::REPORT_EVERY_MS <= now_ms)
                } else {
                    waits_due
                }
            })
            .map(|(cluster, _)| cluster.clone())
            .collect();
        for cluster in clusters {
            self.advance(ledger, &cluster, now_ms, &mut report);
        }
        if waits_due {
            self.poll_ms = self.waiting().then_some(now_ms + WAIT_POLL_MS);
        }
        self.schedule();
        report
    }

    /// One full round: start, advance and stop clusters as the ledger says.
    pub fn tick(&mut self, ledger: &mut impl LedgerAccess, now_ms: i64) -> TickReport {
        self.wake_ms = None;
        let mut report = TickReport::default();
        let read = ledger.with(|ledger| -> Result<_, LedgerError> {
            Ok((ledger.live_clusters()?, ledger.runs()?))
        });
        let (records, runs) = match read {
            Ok(read) => read,
            Err(e) => {
                failed(&mut report, "reading the clusters", None, &e);
                // Looked at again within a round.
                self.wake(now_ms);
                return report;
            }
        };
        let plans: Vec<RunPlan> = match self.driver {
            Some(_) => records
                .iter()
                .filter_map(|record| lifecycle::plan(record, &self.site, &self.peer, now_ms))
                .collect(),
            None => Vec::new(),
        };
        let running: BTreeSet<String> = self.active.keys().cloned().collect();
        for action in lifecycle::reconcile(&plans, &running, &runs) {
            match action {
                Action::Start(plan) => self.start(ledger, plan, now_ms, &mut report),
                Action::Stop { cluster } => self.stop(ledger, &cluster, now_ms, &mut report),
            }
        }
        // Clusters whose window is over and that do not run here (any
        // more) are finished here.
        let running: BTreeSet<String> = self.active.keys().cloned().collect();
        for record in lifecycle::finish_idle(&records, &runs, &running, now_ms) {
            let finished = ledger.with(|ledger| {
                ledger.update_cluster(&record.id, ClusterState::Finished, None, None, now_ms)
            });
            match finished {
                Ok(_) => {
                    tracing::info!(cluster = %record.id, "window over: cluster finished here");
                    report
                        .states
                        .push((record.id.clone(), ClusterState::Finished));
                }
                Err(e) => failed(&mut report, "recording the end", Some(&record.id), &e),
            }
        }
        let planned: BTreeSet<&str> = plans.iter().map(|p| p.cluster.as_str()).collect();
        self.blocked
            .retain(|cluster, _| planned.contains(cluster.as_str()));
        // A running cluster's plan may change (a part replaced after a
        // re-plan): the runner takes the new plan as it is.
        for plan in plans {
            if let Some(active) = self.active.get_mut(&plan.cluster)
                && active.plan != plan
            {
                if active.booted {
                    let added = plan
                        .nodes
                        .iter()
                        .filter(|node| !active.plan.nodes.contains(node));
                    active.added.extend(added);
                }
                active.plan = plan;
            }
        }
        self.carry();
        let clusters: Vec<String> = self.active.keys().cloned().collect();
        for cluster in clusters {
            self.advance(ledger, &cluster, now_ms, &mut report);
        }
        self.boundary_ms = records
            .iter()
            .filter_map(lifecycle::window_of)
            .flat_map(|window| [window.start_ms, window.end_ms])
            .filter(|&at| at > now_ms)
            .min();
        self.poll_ms = self.waiting().then_some(now_ms + WAIT_POLL_MS);
        self.schedule();
        report
    }

    /// Suspends the nodes of every cluster this runner started (the
    /// agent's shutdown): the driver stops what are this process's
    /// children and leaves what outlives it (VMs) to be adopted. The
    /// ledger keeps the runs, so the next runner brings them back.
    pub fn stop_all(&mut self) {
        let Some(driver) = &mut self.driver else {
            return;
        };
        for cluster in self.active.keys() {
            if let Err(e) = driver.suspend_cluster(cluster) {
                tracing::warn!(%cluster, error = %e, "stopping the nodes failed");
            }
        }
    }

    /// The clusters running here: (id, plan, VLAN id).
    pub fn active(&self) -> impl Iterator<Item = (&String, &RunPlan, u16)> {
        self.active
            .iter()
            .map(|(cluster, active)| (cluster, &active.plan, active.vlan))
    }

    /// Clusters that cannot start here now, with the reason.
    pub fn blocked(&self) -> &BTreeMap<String, String> {
        &self.blocked
    }

    /// Whether `cluster` cannot start here now.
    pub fn is_blocked(&self, cluster: &str) -> bool {
        self.blocked.contains_key(cluster)
    }

    /// Whether `cluster` runs here (started by this runner).
    pub fn is_active(&self, cluster: &str) -> bool {
        self.active.contains_key(cluster)
    }

    /// The node states of `cluster` here as last polled (empty if it does
    /// not run here).
    pub fn statuses(&self, cluster: &str) -> &[NodeStatus] {
        self.active
            .get(cluster)
            .map_or(&[][..], |a| a.statuses.as_slice())
    }

    /// Whether this site masters `cluster`, runs it and waits for its
    /// workers' node reports to call it `running`.
    pub fn awaits_reports(&self, cluster: &str) -> bool {
        self.active
            .get(cluster)
            .is_some_and(|a| a.plan.master && !a.running)
    }

    /// The compute driver (`None`: clusters are not started here).
    pub fn driver(&self) -> Option<&D> {
        self.driver.as_ref()
    }

    /// The data plane.
    pub fn dataplane(&self) -> &P {
        &self.dataplane
    }

    /// The data plane, to update what the shell keeps in it.
    pub fn dataplane_mut(&mut self) -> &mut P {
        &mut self.dataplane
    }

    fn waiting(&self) -> bool {
        !self.blocked.is_empty()
            || self
                .active
                .values()
                .any(|a| !a.booted || !a.added.is_empty())
    }

    fn schedule(&mut self) {
        let reports = self
            .active
            .values()
            .filter(|a| a.booted && !a.plan.master)
            .filter_map(|a| a.reported_at_ms)
            .map(|at| at + lifecycle::REPORT_EVERY_MS);
        self.next_ms = [self.wake_ms, self.boundary_ms, self.poll_ms]
            .into_iter()
            .flatten()
            .chain(reports)
            .min();
    }

    fn start(
        &mut self,
        ledger: &mut impl LedgerAccess,
        plan: RunPlan,
        now_ms: i64,
        report: &mut TickReport,
    ) {
        let cluster = plan.cluster.clone();
        let started = match self.dataplane.refuses_another(self.active.len()) {
            Some(reason) => Err(reason),
            None => {
                let (first, last) = self.vlans;
                ledger
                    .with(|ledger| -> Result<_, LedgerError> {
                        let run = ledger.start_run(&cluster, first, last, now_ms)?;
                        let state = lifecycle::advance_state(ledger, &cluster, false, now_ms)?;
                        Ok((run.vlan, state))
                    })
                    .map_err(|e| {
                        if !matches!(e, LedgerError::VlansExhausted { .. }) {
                            report.errors.push(format!("starting {cluster}: {e}"));
                        }
                        e.to_string()
                    })
            }
        };
        let (vlan, state) = match started {
            Ok(started) => started,
            Err(reason) => {
                if self.blocked.get(&cluster) != Some(&reason) {
                    tracing::warn!(%cluster, error = %reason, "the cluster cannot start here; retrying");
                    self.blocked.insert(cluster, reason);
                }
                return;
            }
        };
        assert!(
            (self.vlans.0..=self.vlans.1).contains(&vlan),
            "the ledger hands out VLAN ids of the pool it is given"
        );
        tracing::info!(%cluster, vlan, segment = plan.segment, nodes = plan.nodes.len(), master = plan.master, "starting the cluster here");
        if let Some(state) = state {
            tracing::info!(%cluster, %state, "cluster state");
            report.states.push((cluster.clone(), state));
        }
        self.blocked.remove(&cluster);
        report.runs_changed = true;
        let previous = self.active.insert(
            cluster,
            Active {
                plan,
                vlan,
                booted: false,
                added: Vec::new(),
                statuses: Vec::new(),
                retries: BTreeMap::new(),
                start_errors: BTreeMap::new(),
                reported_at_ms: None,
                running: false,
            },
        );
        assert!(
            previous.is_none(),
            "reconcile starts only what does not run"
        );
    }

    fn stop(
        &mut self,
        ledger: &mut impl LedgerAccess,
        cluster: &str,
        now_ms: i64,
        report: &mut TickReport,
    ) {
        if let Some(driver) = &mut self.driver
            && let Err(e) = driver.stop_cluster(cluster)
        {
            tracing::warn!(%cluster, error = %e, "stopping the nodes failed; the run is kept to retry");
            return;
        }
        self.active.remove(cluster);
        self.carry();
        let leak = self.fault == Some(RunnerFault::LeakVlan);
        let ended = ledger.with(|ledger| -> Result<_, LedgerError> {
            if !leak {
                ledger.end_run(cluster, now_ms)?;
            }
            let mut state = None;
            if let Some(record) = ledger.cluster(cluster)?
                && let Some(next) = lifecycle::state_after_stop(&record, now_ms)
            {
                ledger.update_cluster(cluster, next, None, None, now_ms)?;
                state = Some(next);
            }
            Ok(state)
        });
        match ended {
            Ok(state) => {
                tracing::info!(%cluster, "cluster stopped here; its VLAN id is free again");
                if let Some(state) = state {
                    report.states.push((cluster.to_owned(), state));
                }
            }
            Err(e) => failed(report, "recording the stop", Some(cluster), &e),
        }
        report.runs_changed = true;
        report.nodes_changed.insert(cluster.to_owned());
        report.stopped.push(cluster.to_owned());
    }

    /// Tells the data plane which segments to carry.
    fn carry(&mut self) {
        let segments: Vec<Segment<'_>> = self
            .active
            .values()
            .map(|active| Segment {
                plan: &active.plan,
                vlan: active.vlan,
            })
            .collect();
        self.dataplane.carry(&segments);
    }

    /// The bridge to boot `plan`'s nodes on, once they may boot: the
    /// segment's bridge is there and, at a worker, the tunnel to the master
    /// is up (nodes that boot before it would find no DHCP server).
    fn boot_bridge(&self, plan: &RunPlan) -> Option<String> {
        let Some(Ok(bridge)) = self.dataplane.bridge(plan.segment) else {
            return None;
        };
        let dataplane = &self.dataplane;
        lifecycle::may_boot(plan, |gateway| dataplane.tunnel_up(gateway)).then_some(bridge)
    }

    /// Boots the nodes once allowed, retries the ones that failed, follows
    /// their states and the cluster's.
    fn advance(
        &mut self,
        ledger: &mut impl LedgerAccess,
        cluster: &str,
        now_ms: i64,
        report: &mut TickReport,
    ) {
        let Some(active) = self.active.get(cluster) else {
            return;
        };
        // Only a boot or a retry needs the bridge (and the tunnel state):
        // most rounds of a running cluster only poll its nodes.
        let bridge = (!active.booted || !active.added.is_empty() || has_failed(active))
            .then(|| self.boot_bridge(&active.plan))
            .flatten();
        let Some(driver) = &mut self.driver else {
            return;
        };
        let active = self
            .active
            .get_mut(cluster)
            .expect("looked up above, and nothing removed it since");
        if !active.booted {
            let Some(bridge) = bridge else {
                return;
            };
            // The frontend first: the master's plan lists it first.
            let nodes = active.plan.nodes.clone();
            start_nodes(driver, cluster, active, &nodes, &bridge);
            active.booted = true;
            active.added.clear();
        } else if let Some(bridge) = bridge {
            let added = std::mem::take(&mut active.added);
            if !added.is_empty() {
                tracing::info!(%cluster, nodes = added.len(), "starting the nodes the cluster gained here");
            }
            start_nodes(driver, cluster, active, &added, &bridge);
            report.node_retries += retry_failed(driver, cluster, active, &bridge, now_ms);
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
                    state: NodeState::Failed {
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
            let site = &self.site;
            if let Err(e) = ledger.with(|ledger| ledger.set_nodes(cluster, site, &records)) {
                failed(report, "recording node states", Some(cluster), &e);
                return;
            }
            report.nodes_changed.insert(cluster.to_owned());
        }
        if lifecycle::report_due(&active.plan, changed, active.reported_at_ms, now_ms) {
            self.reports
                .push_back((cluster.to_owned(), lifecycle::reported_nodes(&statuses)));
            active.reported_at_ms = Some(now_ms);
        }
        active.statuses = statuses;
        if active.running {
            return;
        }
        // A worker's part is up when its nodes are; the cluster, at the
        // master, when every node of every site is (the workers report).
        let (plan, statuses) = (&active.plan, &active.statuses);
        let moved = ledger.with(|ledger| -> Result<_, LedgerError> {
            let up = lifecycle::site_up(plan, statuses, || ledger.nodes(cluster))?;
            Ok((up, lifecycle::advance_state(ledger, cluster, up, now_ms)?))
        });
        match moved {
            Ok((up, state)) => {
                if let Some(state) = state {
                    tracing::info!(%cluster, %state, "cluster state");
                    report.states.push((cluster.to_owned(), state));
                }
                active.running = up;
            }
            Err(e) => failed(report, "recording the cluster's state", Some(cluster), &e),
        }
    }
}

/// The spec of node `index` of `cluster` on `bridge`.
fn node_spec(
    cluster: &str,
    plan: &RunPlan,
    vlan: u16,
    index: u32,
    frontend: bool,
    bridge: &str,
) -> NodeSpec {
    NodeSpec {
        vlan,
        shape: plan.shape,
        cluster: cluster.to_owned(),
        index,
        frontend,
        bridge: bridge.to_owned(),
        subnet: plan.subnet,
        mac: node_mac(cluster, index),
    }
}

/// Starts `nodes` of `active` on `bridge`; a node that does not start is
/// retried later.
fn start_nodes(
    driver: &mut impl ComputeDriver,
    cluster: &str,
    active: &mut Active,
    nodes: &[lifecycle::PlannedNode],
    bridge: &str,
) {
    for node in nodes {
        let spec = node_spec(
            cluster,
            &active.plan,
            active.vlan,
            node.index,
            node.frontend,
            bridge,
        );
        if let Err(e) = driver.start_node(&spec) {
            tracing::warn!(%cluster, node = node.index, error = %e, "node did not start; retrying");
            active.start_errors.insert(node.index, e.to_string());
        }
    }
}

/// Whether a node of `active` failed (to start, or to boot).
fn has_failed(active: &Active) -> bool {
    !active.start_errors.is_empty()
        || active
            .statuses
            .iter()
            .any(|s| matches!(s.state, NodeState::Failed { .. }))
}

/// Starts again, with a growing backoff and a bounded number of times, the
/// nodes that failed (to start, or to boot). Returns how many it started.
fn retry_failed(
    driver: &mut impl ComputeDriver,
    cluster: &str,
    active: &mut Active,
    bridge: &str,
    now_ms: i64,
) -> u32 {
    let mut retried = 0;
    let failed: Vec<(u32, bool)> = active
        .plan
        .nodes
        .iter()
        .filter(|node| {
            active.start_errors.contains_key(&node.index)
                || active
                    .statuses
                    .iter()
                    .any(|s| s.index == node.index && matches!(s.state, NodeState::Failed { .. }))
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
        retried += 1;
        let spec = node_spec(cluster, &active.plan, active.vlan, index, frontend, bridge);
        match driver.start_node(&spec) {
            Ok(()) => {
                active.start_errors.remove(&index);
            }
            Err(e) => {
                active.start_errors.insert(index, e.to_string());
            }
        }
    }
    retried
}

/// Logs a failed ledger operation and records it in the round's report.
fn failed(report: &mut TickReport, what: &str, cluster: Option<&str>, e: &LedgerError) {
    match cluster {
        Some(cluster) => {
            tracing::warn!(%cluster, error = %e, "{what} failed");
            report.errors.push(format!("{what} of {cluster}: {e}"));
        }
        None => {
            tracing::warn!(error = %e, "{what} failed");
            report.errors.push(format!("{what}: {e}"));
        }
    }
}
