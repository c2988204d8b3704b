//! The agent's cluster runner ([`crate::runner`]), simulated: it carries
//! out the same lifecycle core ([`crate::lifecycle`]) against the site's
//! ledger with the `sim` compute driver ([`SimDriver`]) and the simulated
//! data plane ([`DataPlane`]).
//!
//! What a tick does is what the agent's tick does, step for step: plans
//! from the live clusters ([`lifecycle::plan`]), start and stop actions
//! ([`lifecycle::reconcile`]) — a start takes a VLAN id from the site's
//! pool with [`Ledger::start_run`] and moves the cluster to `starting`, a
//! stop stops the nodes, frees the VLAN id ([`Ledger::end_run`]) and
//! finishes the cluster if its window is over
//! ([`lifecycle::state_after_stop`]) — then finishing clusters that are
//! over and do not run here ([`lifecycle::finish_idle`]), then advancing
//! every run: boot once allowed ([`lifecycle::may_boot`]: a worker waits
//! for its tunnel to the master), store node states on change
//! ([`Ledger::set_nodes`]), report them to the master
//! ([`lifecycle::report_due`], [`ClusterCore::report_nodes`]), and move
//! the cluster to `running` once up ([`lifecycle::site_up`],
//! [`lifecycle::next_state`]).
//!
//! Deviations, for speed, that change no decision: the agent ticks every
//! 250 ms; the simulated runner ticks only when something may have
//! changed — 250 ms after the site's ledger changed (coalesced, as ticks
//! are), at the next window start or end of a live cluster, every second
//! while a run waits for its tunnel or for a VLAN id, and when a worker's
//! periodic report is due. Not modelled: node start failures and their
//! retries (the sim driver never fails), the gateway's segment limits and
//! endpoint resolution.

use std::collections::{BTreeMap, BTreeSet};

use vcfed_simnet::SiteId;
use vcfed_storage::{ClusterState, GatewayRef, Ledger, LedgerError};

use super::dataplane::{Carried, DataPlane, site_of_key};
use super::site::PlantedBug;
use crate::cluster::ClusterCore;
use crate::driver::sim::SimDriver;
use crate::driver::{ComputeDriver, NodeSpec, NodeStatus, node_mac};
use crate::lifecycle::{self, Action, RunPlan};

/// The agent runner's tick ([`crate::runner::TICK`]), ms.
pub const TICK_MS: i64 = 250;
/// How often a run that waits (for its tunnel, or for a VLAN id) is looked
/// at again, ms.
const WAIT_POLL_MS: i64 = 1_000;

/// What a tick needs from the site.
pub struct RunnerEnv<'a> {
    /// The site's ledger.
    pub ledger: &'a mut Ledger,
    /// The site's cluster core (node reports to masters go through it).
    pub core: &'a mut ClusterCore,
    /// The data plane (tunnel state).
    pub dataplane: &'a DataPlane,
    /// The site's clock.
    pub now_ms: i64,
}

/// What a tick changed, for the harness.
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
}

/// A cluster started by this runner (this incarnation of the site).
#[derive(Debug)]
struct Active {
    plan: RunPlan,
    booted: bool,
    statuses: Vec<NodeStatus>,
    reported_at_ms: Option<i64>,
    running: bool,
}

/// One site's runner. Volatile: a crash loses it (and the sim driver's
/// nodes, as an agent's crash takes its nodes down); the ledger keeps the
/// runs, and the next incarnation resumes them.
#[derive(Debug)]
pub struct SimRunner {
    index: SiteId,
    site: String,
    peer: String,
    vlans: (u16, u16),
    plant: Option<PlantedBug>,
    driver: SimDriver,
    /// Every node started and not stopped, as it was started.
    started: BTreeMap<String, BTreeMap<u32, NodeSpec>>,
    active: BTreeMap<String, Active>,
    /// Clusters that cannot start here now, with the reason.
    blocked: BTreeMap<String, String>,
    carried: Carried,
    /// A tick is wanted at (the ledger changed), local ms.
    wake_ms: Option<i64>,
    /// The next window start or end of a live cluster here, local ms.
    boundary_ms: Option<i64>,
    /// When waiting runs are looked at again, local ms.
    poll_ms: Option<i64>,
    /// The earliest of the above and of the workers' report deadlines.
    next_ms: Option<i64>,
}

impl SimRunner {
    /// The runner of site `index` (`site`, peer id `peer`) with the VLAN
    /// pool `vlans`; it ticks at once.
    pub fn new(
        index: SiteId,
        site: String,
        peer: String,
        vlans: (u16, u16),
        plant: Option<PlantedBug>,
        now_ms: i64,
    ) -> SimRunner {
        SimRunner {
            index,
            site,
            peer,
            vlans,
            plant,
            driver: SimDriver::new(),
            started: BTreeMap::new(),
            active: BTreeMap::new(),
            blocked: BTreeMap::new(),
            carried: Carried::new(),
            wake_ms: Some(now_ms),
            boundary_ms: None,
            poll_ms: None,
            next_ms: Some(now_ms),
        }
    }

    /// The site's ledger changed: tick within [`TICK_MS`].
    pub fn wake(&mut self, now_ms: i64) {
        let at = now_ms + TICK_MS;
        if self.wake_ms.is_none_or(|wake| wake > at) {
            self.wake_ms = Some(at);
            self.next_ms = Some(self.next_ms.map_or(at, |next| next.min(at)));
        }
    }

    /// When the runner wants to run next, local ms.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.next_ms
    }

    /// Does what is due at `now_ms`. A full tick when the ledger changed, a
    /// window starts or ends, or a start waits for a VLAN id; otherwise
    /// only the runs whose tunnel wait or report is due are advanced —
    /// nothing else can have changed since the last full tick, so that is
    /// what a full tick would do.
    pub fn run_due(&mut self, env: &mut RunnerEnv<'_>) -> Result<TickReport, LedgerError> {
        let now_ms = env.now_ms;
        let due = |at: Option<i64>| at.is_some_and(|at| at <= now_ms);
        let full = due(self.wake_ms)
            || due(self.boundary_ms)
            || (due(self.poll_ms) && !self.blocked.is_empty());
        let report = if full {
            self.tick(env)?
        } else {
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
                self.advance(env, &cluster, &mut report)?;
            }
            if waits_due {
                self.poll_ms = self.waiting().then_some(now_ms + WAIT_POLL_MS);
            }
            report
        };
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
        Ok(report)
    }

    fn waiting(&self) -> bool {
        !self.blocked.is_empty() || self.active.values().any(|a| !a.booted)
    }

    /// The nodes started here for `cluster`, by index, as started.
    pub fn started(&self, cluster: &str) -> Option<&BTreeMap<u32, NodeSpec>> {
        self.started.get(cluster)
    }

    /// Every cluster with nodes started here.
    pub fn started_clusters(&self) -> impl Iterator<Item = &String> {
        self.started.keys()
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

    /// Whether `cluster` cannot start here now (no VLAN id free).
    pub fn is_blocked(&self, cluster: &str) -> bool {
        self.blocked.contains_key(cluster)
    }

    /// Whether `cluster` runs here (started by this incarnation).
    pub fn is_active(&self, cluster: &str) -> bool {
        self.active.contains_key(cluster)
    }

    /// One round, as the agent's tick: start, advance and stop clusters as
    /// the ledger says.
    fn tick(&mut self, env: &mut RunnerEnv<'_>) -> Result<TickReport, LedgerError> {
        let now_ms = env.now_ms;
        self.wake_ms = None;
        let mut report = TickReport::default();
        let records = env.ledger.live_clusters()?;
        let runs = env.ledger.runs()?;
        let plans: Vec<RunPlan> = records
            .iter()
            .filter_map(|record| lifecycle::plan(record, &self.site, &self.peer, now_ms))
            .collect();
        let running: BTreeSet<String> = self.active.keys().cloned().collect();
        for action in lifecycle::reconcile(&plans, &running, &runs) {
            match action {
                Action::Start(plan) => self.start(env, plan, &mut report)?,
                Action::Stop { cluster } => self.stop(env, &cluster, &mut report)?,
            }
        }
        let running: BTreeSet<String> = self.active.keys().cloned().collect();
        for record in lifecycle::finish_idle(&records, &runs, &running, now_ms) {
            env.ledger
                .update_cluster(&record.id, ClusterState::Finished, None, None, now_ms)?;
            report
                .states
                .push((record.id.clone(), ClusterState::Finished));
        }
        let planned: BTreeSet<&str> = plans.iter().map(|p| p.cluster.as_str()).collect();
        self.blocked
            .retain(|cluster, _| planned.contains(cluster.as_str()));
        // A running cluster's plan may change (a part replaced after a
        // re-plan): the agent takes the new plan as it is.
        for plan in plans {
            if let Some(active) = self.active.get_mut(&plan.cluster)
                && active.plan != plan
            {
                active.plan = plan;
            }
        }
        self.publish_carried(env.dataplane);
        let clusters: Vec<String> = self.active.keys().cloned().collect();
        for cluster in clusters {
            self.advance(env, &cluster, &mut report)?;
        }
        self.boundary_ms = records
            .iter()
            .filter_map(lifecycle::window_of)
            .flat_map(|window| [window.start_ms, window.end_ms])
            .filter(|&at| at > now_ms)
            .min();
        self.poll_ms = self.waiting().then_some(now_ms + WAIT_POLL_MS);
        Ok(report)
    }

    fn start(
        &mut self,
        env: &mut RunnerEnv<'_>,
        plan: RunPlan,
        report: &mut TickReport,
    ) -> Result<(), LedgerError> {
        let cluster = plan.cluster.clone();
        let (first, last) = self.vlans;
        // The VLAN id is the gateway's business; the run records it.
        match env.ledger.start_run(&cluster, first, last, env.now_ms) {
            Ok(_) => {}
            Err(e @ LedgerError::VlansExhausted { .. }) => {
                self.blocked.insert(cluster, e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if let Some(state) = lifecycle::advance_state(env.ledger, &cluster, false, env.now_ms)? {
            report.states.push((cluster.clone(), state));
        }
        self.blocked.remove(&cluster);
        report.runs_changed = true;
        self.active.insert(
            cluster,
            Active {
                plan,
                booted: false,
                statuses: Vec::new(),
                reported_at_ms: None,
                running: false,
            },
        );
        Ok(())
    }

    fn stop(
        &mut self,
        env: &mut RunnerEnv<'_>,
        cluster: &str,
        report: &mut TickReport,
    ) -> Result<(), LedgerError> {
        self.driver
            .stop_cluster(cluster)
            .expect("the sim driver never fails");
        self.started.remove(cluster);
        self.active.remove(cluster);
        self.publish_carried(env.dataplane);
        if self.plant != Some(PlantedBug::LeakVlan) {
            env.ledger.end_run(cluster, env.now_ms)?;
        }
        if let Some(record) = env.ledger.cluster(cluster)?
            && let Some(state) = lifecycle::state_after_stop(&record, env.now_ms)
        {
            env.ledger
                .update_cluster(cluster, state, None, None, env.now_ms)?;
            report.states.push((cluster.to_owned(), state));
        }
        report.runs_changed = true;
        report.nodes_changed.insert(cluster.to_owned());
        report.stopped.push(cluster.to_owned());
        Ok(())
    }

    /// Boots the nodes once allowed, follows their states and the
    /// cluster's (the agent's `advance`).
    fn advance(
        &mut self,
        env: &mut RunnerEnv<'_>,
        cluster: &str,
        report: &mut TickReport,
    ) -> Result<(), LedgerError> {
        let now_ms = env.now_ms;
        let Some(active) = self.active.get_mut(cluster) else {
            return Ok(());
        };
        if !active.booted {
            let (local, dataplane) = (self.index, env.dataplane);
            // A key that names no simulated site has no tunnel to wait for
            // (as the agent treats a key that is not an X25519 key).
            let tunnel_up = |gateway: &GatewayRef| {
                site_of_key(&gateway.public_key).is_none_or(|peer| dataplane.tunnel_up(local, peer))
            };
            if !lifecycle::may_boot(&active.plan, tunnel_up) {
                return Ok(());
            }
            // The frontend first: the master's plan lists it first.
            let started = self.started.entry(cluster.to_owned()).or_default();
            for node in &active.plan.nodes {
                let spec = NodeSpec {
                    cluster: cluster.to_owned(),
                    index: node.index,
                    frontend: node.frontend,
                    bridge: "sim".to_owned(),
                    subnet: active.plan.subnet,
                    mac: node_mac(cluster, node.index),
                };
                self.driver
                    .start_node(&spec)
                    .expect("the sim driver never fails");
                started.entry(node.index).or_insert(spec);
            }
            active.booted = true;
        }
        let mut statuses = self.driver.poll(cluster);
        statuses.sort_by_key(|s| s.index);
        let changed = statuses != active.statuses;
        if changed {
            let records = lifecycle::node_records(&self.site, &statuses, now_ms);
            env.ledger.set_nodes(cluster, &self.site, &records)?;
            report.nodes_changed.insert(cluster.to_owned());
        }
        if lifecycle::report_due(&active.plan, changed, active.reported_at_ms, now_ms) {
            let nodes = lifecycle::reported_nodes(&statuses);
            env.core.report_nodes(env.ledger, cluster, nodes)?;
            active.reported_at_ms = Some(now_ms);
        }
        active.statuses = statuses;
        if active.running {
            return Ok(());
        }
        let (plan, statuses) = (&active.plan, &active.statuses);
        let ledger = &mut *env.ledger;
        let up = lifecycle::site_up(plan, statuses, || ledger.nodes(cluster))?;
        if let Some(state) = lifecycle::advance_state(ledger, cluster, up, now_ms)? {
            report.states.push((cluster.to_owned(), state));
        }
        active.running = up;
        Ok(())
    }

    /// Tells the data plane which segments this site's gateway carries,
    /// with which peers (the agent's `publish_network`).
    fn publish_carried(&mut self, dataplane: &DataPlane) {
        let carried: Carried = self
            .active
            .values()
            .map(|active| {
                let peers = active
                    .plan
                    .peers
                    .iter()
                    .filter_map(|peer| site_of_key(&peer.gateway.as_ref()?.public_key))
                    .collect();
                (active.plan.segment, peers)
            })
            .collect();
        if carried != self.carried {
            dataplane.set_carried(self.index, carried.clone());
            self.carried = carried;
        }
    }
}
