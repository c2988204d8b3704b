//! Invariants of the cluster lifecycle (start, run, stop), checked as the
//! run goes against every site's ledger and runner.
//!
//! The checks are written from the outside: they restate what must hold
//! (which clusters may run where, how nodes are numbered) instead of
//! calling the lifecycle core they check.

use std::collections::{BTreeMap, BTreeSet};

use std::sync::Arc;

use crate::{Sim, SiteId};
use vcfed_storage::{ClusterRecord, ClusterState, NodeRecord, PartState};

use crate::site::{Directory, FedSite, Presence};
use vcfed_node_core::driver::node_mac;
use vcfed_node_core::runner::TickReport;

/// A run must be gone this long after its cluster stopped being live at
/// its site (the runner looks 250 ms after a ledger change, and at every
/// window end), ms.
pub const RUN_STOP_BOUND_MS: i64 = 5_000;
/// A cluster live at a site must have a run there within this, ms.
pub const START_BOUND_MS: i64 = 5_000;
/// A live cluster must be finished at a site this long after its window
/// ended, ms.
pub const FINISH_BOUND_MS: i64 = 10_000;
/// After faults stop, no cluster stays `starting` longer than this, ms
/// (a worker looks at its tunnel every second and reports every 10 s).
pub const STARTING_BOUND_MS: i64 = 60_000;
/// After faults stop, the node states a master stores for a worker match
/// the worker's own within this, ms (a report every 10 s).
pub const REPORT_BOUND_MS: i64 = 30_000;

/// A broken invariant, for the harness to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Which invariant.
    pub invariant: &'static str,
    /// The site where it was seen.
    pub site: Option<SiteId>,
    /// What exactly.
    pub detail: String,
}

/// Counters of the lifecycle, for the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LifecycleReport {
    /// Runs started (VLAN ids taken), over every site.
    pub runs_started: u64,
    /// Clusters that reached `running` at their master.
    pub running_at_master: u64,
    /// Clusters a site finished when their window ended (counted per site).
    pub finished_by_window: u64,
    /// Nodes booted, over every site and incarnation.
    pub nodes_booted: u64,
    /// Largest number of runs at one site at once.
    pub runs_max: usize,
}

#[derive(Debug, Clone, Copy)]
struct ClusterInfo {
    master: SiteId,
    nodes: u32,
}

/// The lifecycle invariants' state.
#[derive(Debug)]
pub struct LifecycleChecks {
    directory: Arc<Directory>,
    clusters: BTreeMap<String, ClusterInfo>,
    /// Runs at each site, as last read (only runners change them).
    runs: Vec<BTreeMap<String, u16>>,
    /// Live clusters at each site, as last read, and whether the site's
    /// ledger may have changed since.
    live: Vec<Vec<ClusterRecord>>,
    dirty: Vec<bool>,
    /// Clusters `running` at their master (as the masters' runners said).
    running: BTreeSet<String>,
    /// Running clusters whose master received node reports since the last
    /// look.
    nodes_dirty: BTreeSet<String>,
    /// First seen, true ms: a run whose cluster is not live at its site.
    stale_runs: BTreeMap<(SiteId, String), i64>,
    /// First seen: a master's stored node states differ from a worker's.
    mismatched: BTreeMap<(String, SiteId), i64>,
    /// First seen: a running cluster without exactly its nodes booted.
    incomplete: BTreeMap<String, i64>,
    /// Periodic rounds so far.
    rounds: u64,
    /// Violations already reported, so that each is reported once.
    reported: BTreeSet<(&'static str, String)>,
    report: LifecycleReport,
}

impl LifecycleChecks {
    /// Checks for the sites of `directory`.
    pub fn new(directory: Arc<Directory>) -> LifecycleChecks {
        let sites = directory.peers.len();
        LifecycleChecks {
            directory,
            clusters: BTreeMap::new(),
            runs: vec![BTreeMap::new(); sites],
            live: vec![Vec::new(); sites],
            dirty: vec![true; sites],
            running: BTreeSet::new(),
            nodes_dirty: BTreeSet::new(),
            stale_runs: BTreeMap::new(),
            mismatched: BTreeMap::new(),
            incomplete: BTreeMap::new(),
            rounds: 0,
            reported: BTreeSet::new(),
            report: LifecycleReport::default(),
        }
    }

    /// A cluster requested at `master` with `nodes` compute nodes.
    pub fn track(&mut self, id: &str, master: SiteId, nodes: u32) {
        self.clusters
            .insert(id.to_owned(), ClusterInfo { master, nodes });
    }

    /// A site's ledger may have changed.
    pub fn touched(&mut self, site: SiteId) {
        self.dirty[site] = true;
    }

    /// A master received node reports for `cluster`.
    pub fn nodes_touched(&mut self, cluster: String) {
        if self.running.contains(&cluster) {
            self.nodes_dirty.insert(cluster);
        }
    }

    /// The counters.
    pub fn report(&self) -> LifecycleReport {
        self.report.clone()
    }

    /// After a runner tick at `site`.
    pub fn after_tick(
        &mut self,
        sim: &Sim<FedSite>,
        site: SiteId,
        tick: &TickReport,
        found: &mut Vec<Found>,
    ) {
        for (cluster, state) in &tick.states {
            let at_master = self.clusters.get(cluster).is_some_and(|c| c.master == site);
            match state {
                ClusterState::Running if at_master => {
                    self.report.running_at_master += 1;
                    self.running.insert(cluster.clone());
                    let nodes = sim.sites()[site].ledger().nodes(cluster);
                    if let Ok(nodes) = nodes {
                        self.check_master_nodes(sim, cluster, &nodes, found);
                    }
                }
                ClusterState::Finished => self.report.finished_by_window += 1,
                _ => {}
            }
            if at_master && *state != ClusterState::Running {
                self.running.remove(cluster);
            }
        }
        for cluster in &tick.stopped {
            if self.clusters.get(cluster).is_some_and(|c| c.master == site) {
                self.running.remove(cluster);
            }
        }
        if tick.runs_changed {
            self.read_runs(sim, site, found);
        }
        for cluster in &tick.nodes_changed {
            self.check_numbering(sim, cluster, found);
        }
        if let Some(runner) = sim.sites()[site].runner() {
            self.report.nodes_booted += tick
                .nodes_changed
                .iter()
                .filter(|c| runner.is_active(c))
                .map(|c| runner.statuses(c).len() as u64)
                .sum::<u64>();
        }
    }

    /// Checks that run every few simulated seconds; `calm_at` is when
    /// faults stopped, true ms.
    pub fn periodic(
        &mut self,
        sim: &Sim<FedSite>,
        now: i64,
        calm_at: Option<i64>,
        found: &mut Vec<Found>,
    ) {
        self.rounds += 1;
        // Per-site checks every other round (their bounds are shorter than
        // a round; the first sighting is what starts the clock).
        for site in 0..sim.sites().len() {
            if !alive(sim, site) {
                self.stale_runs.retain(|(s, _), _| *s != site);
            } else if self.rounds.is_multiple_of(2) {
                self.check_site(sim, site, now, calm_at, found);
            }
        }
        let running: Vec<String> = self.running.iter().cloned().collect();
        for cluster in running {
            let Some(info) = self.clusters.get(&cluster).copied() else {
                continue;
            };
            if !alive(sim, info.master) {
                continue;
            }
            // The stored nodes change only with reports; after the calm,
            // reports must also match what the workers run. Looked at every
            // third round (a report comes every round from every worker).
            if !self.rounds.is_multiple_of(3) {
                continue;
            }
            let reported = self.nodes_dirty.remove(&cluster);
            let calm = calm_at.is_some_and(|calm_at| now - calm_at >= REPORT_BOUND_MS);
            if !reported && !calm {
                continue;
            }
            let ledger = sim.sites()[info.master].ledger();
            let Ok(nodes) = ledger.nodes(&cluster) else {
                continue;
            };
            self.check_master_nodes(sim, &cluster, &nodes, found);
            if !calm {
                continue;
            }
            let record = ledger.cluster(&cluster).ok().flatten();
            let Some(record) = record.filter(|r| r.state == ClusterState::Running) else {
                self.running.remove(&cluster);
                continue;
            };
            self.check_reports(sim, info, &record, &nodes, now, found);
        }
    }

    /// At the end of a run: no site keeps a cluster whose window is over
    /// in a non-terminal state.
    pub fn final_checks(&mut self, sim: &Sim<FedSite>, found: &mut Vec<Found>) {
        for site in (0..sim.sites().len()).filter(|&s| alive(sim, s)) {
            let fed_site = &sim.sites()[site];
            let now = sim.local_now_ms(site);
            let Ok(records) = fed_site.ledger().clusters() else {
                continue;
            };
            let overdue = records.iter().find(|r| {
                !r.state.is_terminal()
                    && vcfed_node_core::lifecycle::window_of(r)
                        .is_some_and(|w| w.end_ms + FINISH_BOUND_MS < now)
                    && !self.touches_non_member(sim, r)
            });
            if let Some(record) = overdue {
                let detail = format!(
                    "{} keeps cluster {} {} after its window ended",
                    fed_site.name(),
                    record.id,
                    record.state
                );
                self.found(
                    found,
                    "finished after window",
                    Some(site),
                    &record.id,
                    detail,
                );
            }
        }
    }

    /// Per-site checks against the site's ledger.
    fn check_site(
        &mut self,
        sim: &Sim<FedSite>,
        site: SiteId,
        now: i64,
        calm_at: Option<i64>,
        found: &mut Vec<Found>,
    ) {
        let fed_site = &sim.sites()[site];
        let local = sim.local_now_ms(site);
        let up_since = fed_site.up_since_ms().unwrap_or(now);
        let clock = sim.clock(site);
        if self.dirty[site] {
            let Ok(records) = fed_site.ledger().live_clusters() else {
                return;
            };
            self.live[site] = records;
            self.dirty[site] = false;
        }
        let records = std::mem::take(&mut self.live[site]);
        // Runs of clusters that do not run here.
        let runs: Vec<String> = self.runs[site].keys().cloned().collect();
        for cluster in runs {
            let record = records.iter().find(|r| r.id == cluster);
            let live = record.is_some_and(|r| runs_here(r, fed_site, local));
            let key = (site, cluster.clone());
            if live {
                self.stale_runs.remove(&key);
                continue;
            }
            let first = *self.stale_runs.entry(key).or_insert(now);
            if now - first.max(up_since) >= RUN_STOP_BOUND_MS {
                let detail = format!(
                    "{} keeps a run (VLAN {}) of cluster {cluster} for {} ms, which is {} there",
                    fed_site.name(),
                    self.runs[site].get(&cluster).copied().unwrap_or_default(),
                    now - first,
                    record.map_or("not live".to_owned(), |r| format!("{}", r.state))
                );
                self.found(found, "stale run", Some(site), &cluster, detail);
            }
        }
        let up_since_local = clock.local(up_since);
        for record in &records {
            let Some(window) = vcfed_node_core::lifecycle::window_of(record) else {
                continue;
            };
            if window.end_ms + FINISH_BOUND_MS < local && local - up_since_local > FINISH_BOUND_MS {
                let detail = format!(
                    "{} keeps cluster {} {} {} ms after its window ended",
                    fed_site.name(),
                    record.id,
                    record.state,
                    local - window.end_ms
                );
                self.found(
                    found,
                    "finished after window",
                    Some(site),
                    &record.id,
                    detail,
                );
                continue;
            }
            let since = window
                .start_ms
                .max(record.updated_at_ms)
                .max(up_since_local);
            let blocked = fed_site.runner().is_some_and(|r| r.is_blocked(&record.id));
            if runs_here(record, fed_site, local)
                && !self.runs[site].contains_key(&record.id)
                && !blocked
                && local - since > START_BOUND_MS
                && window.end_ms - local > START_BOUND_MS
            {
                let detail = format!(
                    "cluster {} is {} at {} and its window is open, but it has no run there after {} ms",
                    record.id,
                    record.state,
                    fed_site.name(),
                    local - since
                );
                self.found(found, "cluster not started", Some(site), &record.id, detail);
            }
            if let Some(calm_at) = calm_at
                && record.state == ClusterState::Starting
                && !self.touches_non_member(sim, record)
            {
                let since = record.updated_at_ms.max(clock.local(calm_at));
                if local - since > STARTING_BOUND_MS && window.end_ms - local > STARTING_BOUND_MS {
                    let detail = format!(
                        "cluster {} is still starting at {} {} ms after faults stopped (nodes here: {:?})",
                        record.id,
                        fed_site.name(),
                        local - clock.local(calm_at),
                        fed_site.runner().map(|r| r.statuses(&record.id).len())
                    );
                    self.found(found, "stuck starting", Some(site), &record.id, detail);
                }
            }
        }
        self.live[site] = records;
    }

    /// Reads a site's runs after its runner changed them: VLAN ids unique
    /// and within the site's pool.
    fn read_runs(&mut self, sim: &Sim<FedSite>, site: SiteId, found: &mut Vec<Found>) {
        let fed_site = &sim.sites()[site];
        let Ok(runs) = fed_site.ledger().runs() else {
            return;
        };
        let before = std::mem::take(&mut self.runs[site]);
        let (first, last) = fed_site.vlans();
        let mut vlans = BTreeSet::new();
        for run in &runs {
            if !before.contains_key(&run.cluster_id) {
                self.report.runs_started += 1;
            }
            self.runs[site].insert(run.cluster_id.clone(), run.vlan);
            if !(first..=last).contains(&run.vlan) || !vlans.insert(run.vlan) {
                let detail = format!(
                    "{} runs {} with VLAN {} (pool {first}-{last}); runs: {:?}",
                    fed_site.name(),
                    run.cluster_id,
                    run.vlan,
                    runs.iter()
                        .map(|r| (&r.cluster_id, r.vlan))
                        .collect::<Vec<_>>()
                );
                self.found(found, "vlan pool", Some(site), &run.cluster_id, detail);
            }
        }
        self.report.runs_max = self.report.runs_max.max(runs.len());
    }

    /// The nodes booted for `cluster` over every site: numbers unique
    /// across sites and within 0..=N, the frontend (0) at the master only,
    /// MACs unique.
    fn check_numbering(&mut self, sim: &Sim<FedSite>, cluster: &str, found: &mut Vec<Found>) {
        let Some(info) = self.clusters.get(cluster).copied() else {
            return;
        };
        let highest = highest_number(sim, info, cluster);
        let mut owners: BTreeMap<u32, SiteId> = BTreeMap::new();
        let mut macs: BTreeMap<[u8; 6], u32> = BTreeMap::new();
        let mut problem = None;
        for site in (0..sim.sites().len()).filter(|&s| alive(sim, s)) {
            let Some(started) = sim.sites()[site]
                .runner()
                .and_then(|r| r.driver()?.started(cluster))
            else {
                continue;
            };
            for (index, spec) in started {
                let name = sim.sites()[site].name();
                if let Some(other) = owners.insert(*index, site) {
                    problem = Some(format!(
                        "node {index} of {cluster} runs at {name} and at {}",
                        sim.sites()[other].name()
                    ));
                } else if *index > highest {
                    problem = Some(format!(
                        "{name} runs node {index} of {cluster}, whose master numbered up to {highest}",
                    ));
                } else if spec.frontend != (*index == 0) || (spec.frontend && site != info.master) {
                    problem = Some(format!(
                        "{name} runs node {index} of {cluster} with frontend = {} (master {})",
                        spec.frontend,
                        sim.sites()[info.master].name()
                    ));
                } else if spec.mac != node_mac(cluster, *index) {
                    problem = Some(format!(
                        "{name} gave node {index} of {cluster} a foreign MAC"
                    ));
                } else if let Some(other) = macs.insert(spec.mac, *index) {
                    problem = Some(format!(
                        "nodes {other} and {index} of {cluster} share the MAC {:02x?}",
                        spec.mac
                    ));
                }
                if problem.is_some() {
                    break;
                }
            }
        }
        if let Some(detail) = problem {
            self.found(found, "node numbering", None, cluster, detail);
        }
    }

    /// A cluster `running` at its master: the master stores exactly its
    /// N + 1 nodes, each once and up, the frontend (0) its own (checked
    /// when it turns `running` and after every report that follows).
    fn check_master_nodes(
        &mut self,
        sim: &Sim<FedSite>,
        cluster: &str,
        nodes: &[NodeRecord],
        found: &mut Vec<Found>,
    ) {
        let Some(info) = self.clusters.get(cluster).copied() else {
            return;
        };
        let master = &sim.sites()[info.master];
        let indices: Vec<u32> = nodes.iter().map(|n| n.index).collect();
        let expected: Vec<u32> = cluster_nodes(sim, info, cluster);
        let frontend_ok = nodes
            .iter()
            .all(|n| (n.index == 0) == n.frontend && (!n.frontend || n.site == master.name()));
        let up = nodes
            .iter()
            .all(|n| n.state["state"] == if n.frontend { "serving" } else { "installed" });
        // A cluster that lost a part stays `running` while its replacement
        // nodes boot: it stores only nodes it plans (the lost part's are
        // dropped when it is fenced); `check_reports` sees that they all
        // come up.
        let healing = healed(sim, info, cluster);
        let complete = if healing {
            indices.iter().all(|index| expected.contains(index))
        } else {
            indices == expected && up
        };
        if !complete || !frontend_ok {
            let detail = format!(
                "cluster {cluster} is running at {} with nodes {:?}, expected {:?} with the frontend there",
                master.name(),
                nodes
                    .iter()
                    .map(|n| (
                        n.index,
                        n.site.as_str(),
                        n.state["state"].as_str().unwrap_or("?")
                    ))
                    .collect::<Vec<_>>(),
                expected
            );
            self.found(found, "running cluster", Some(info.master), cluster, detail);
        }
    }

    /// After faults stopped: the node states the master stores for each
    /// worker are the worker's own, and exactly the cluster's N + 1 nodes
    /// run across its sites.
    fn check_reports(
        &mut self,
        sim: &Sim<FedSite>,
        info: ClusterInfo,
        record: &ClusterRecord,
        stored: &[NodeRecord],
        now: i64,
        found: &mut Vec<Found>,
    ) {
        let cluster = record.id.as_str();
        let master = &sim.sites()[info.master];
        let local = sim.local_now_ms(info.master);
        // Near the window's end the sites stop one by one (clocks differ).
        let ends_soon = vcfed_node_core::lifecycle::window_of(record)
            .is_none_or(|w| w.end_ms - local < REPORT_BOUND_MS);
        if ends_soon || self.touches_non_member(sim, record) {
            self.mismatched.retain(|(c, _), _| c != cluster);
            self.incomplete.remove(cluster);
            return;
        }
        let settled = |site: SiteId| {
            sim.sites()[site]
                .up_since_ms()
                .is_some_and(|at| now - at >= REPORT_BOUND_MS)
        };
        let workers: BTreeSet<SiteId> = record
            .parts
            .iter()
            .filter(|p| p.state == PartState::Committed)
            .filter_map(|p| self.directory.site_of(p.peer_id.as_deref()?))
            .filter(|&s| s != info.master)
            .collect();
        let mut booted: BTreeSet<u32> = BTreeSet::new();
        let mut all_settled = settled(info.master);
        booted.extend(
            master
                .runner()
                .and_then(|r| r.driver()?.started(cluster))
                .into_iter()
                .flat_map(|nodes| nodes.keys().copied()),
        );
        for worker in workers {
            let fed_site = &sim.sites()[worker];
            if !alive(sim, worker) || !settled(worker) {
                all_settled = false;
                continue;
            }
            let Some(runner) = fed_site.runner() else {
                continue;
            };
            booted.extend(
                runner
                    .driver()
                    .and_then(|driver| driver.started(cluster))
                    .into_iter()
                    .flat_map(|nodes| nodes.keys().copied()),
            );
            let own: Vec<(u32, serde_json::Value)> = runner
                .statuses(cluster)
                .iter()
                .map(|s| (s.index, serde_json::to_value(&s.state).unwrap_or_default()))
                .collect();
            let theirs: Vec<(u32, serde_json::Value)> = stored
                .iter()
                .filter(|n| n.site == fed_site.name())
                .map(|n| (n.index, n.state.clone()))
                .collect();
            let key = (cluster.to_owned(), worker);
            if own == theirs {
                self.mismatched.remove(&key);
                continue;
            }
            let first = *self.mismatched.entry(key).or_insert(now);
            if now - first >= REPORT_BOUND_MS {
                let detail = format!(
                    "{} stores for {} nodes {:?} of cluster {cluster}, the site has {:?}",
                    master.name(),
                    fed_site.name(),
                    theirs
                        .iter()
                        .map(|(i, s)| (*i, s["state"].clone()))
                        .collect::<Vec<_>>(),
                    own.iter()
                        .map(|(i, s)| (*i, s["state"].clone()))
                        .collect::<Vec<_>>()
                );
                self.found(found, "node reports", Some(worker), cluster, detail);
            }
        }
        let expected: BTreeSet<u32> = cluster_nodes(sim, info, cluster).into_iter().collect();
        if !all_settled || booted == expected {
            self.incomplete.remove(cluster);
            return;
        }
        let first = *self.incomplete.entry(cluster.to_owned()).or_insert(now);
        if now - first >= REPORT_BOUND_MS {
            let detail = format!(
                "cluster {cluster} is running at {} but its sites run nodes {booted:?}, expected {expected:?}; parts: {:?}",
                master.name(),
                record
                    .parts
                    .iter()
                    .map(|p| (p.site.as_str(), p.attempt, p.nodes, p.first_node, p.state))
                    .collect::<Vec<_>>()
            );
            self.found(found, "running cluster", Some(info.master), cluster, detail);
        }
    }

    /// Whether a cluster involves a site that is not a member (it left):
    /// such a cluster may legitimately wait until its window ends.
    fn touches_non_member(&self, sim: &Sim<FedSite>, record: &ClusterRecord) -> bool {
        let master_gone = self
            .clusters
            .get(&record.id)
            .is_some_and(|c| sim.sites()[c.master].presence() != Presence::Member);
        master_gone
            || record.parts.iter().any(|p| {
                p.state != PartState::Released
                    && p.peer_id
                        .as_deref()
                        .and_then(|peer| self.directory.site_of(peer))
                        .is_some_and(|s| sim.sites()[s].presence() != Presence::Member)
            })
    }

    fn found(
        &mut self,
        found: &mut Vec<Found>,
        invariant: &'static str,
        site: Option<SiteId>,
        cluster: &str,
        detail: String,
    ) {
        if self.reported.insert((invariant, cluster.to_owned())) {
            found.push(Found {
                invariant,
                site,
                detail,
            });
        }
    }
}

/// The numbers of every node of `cluster` as its master plans it now (its
/// frontend, 0, and the nodes of the parts it did not fence), or
/// `0..=N` while the master does not run it.
fn cluster_nodes(sim: &Sim<FedSite>, info: ClusterInfo, cluster: &str) -> Vec<u32> {
    sim.sites()[info.master]
        .runner()
        .and_then(|runner| {
            runner
                .active()
                .find(|(id, _, _)| id.as_str() == cluster)
                .map(|(_, plan, _)| plan.cluster_nodes.clone())
        })
        .unwrap_or_else(|| (0..=info.nodes).collect())
}

/// Whether the master of `cluster` declared a part of it lost.
fn healed(sim: &Sim<FedSite>, info: ClusterInfo, cluster: &str) -> bool {
    sim.sites()[info.master]
        .ledger()
        .cluster(cluster)
        .ok()
        .flatten()
        .is_some_and(|record| record.parts.iter().any(|p| p.lost_at_ms.is_some()))
}

/// The highest node number the master of `cluster` ever gave (replacements
/// of lost parts are numbered after every number used before).
fn highest_number(sim: &Sim<FedSite>, info: ClusterInfo, cluster: &str) -> u32 {
    let numbered = sim.sites()[info.master]
        .ledger()
        .cluster(cluster)
        .ok()
        .flatten()
        .and_then(|record| {
            record
                .parts
                .iter()
                .filter_map(|p| p.first_node.map(|first| first + p.nodes))
                .max()
        });
    numbered.map_or(info.nodes, |end| end.saturating_sub(1).max(info.nodes))
}

/// Whether a site runs now and belongs to the federation.
pub fn alive(sim: &Sim<FedSite>, site: SiteId) -> bool {
    sim.is_up(site) && sim.sites()[site].presence() == Presence::Member
}

/// Whether `record` should run at `site` at its local time `now`: it is
/// `reserved`, `starting` or `running`, its window is open, and the site
/// is its master or holds a committed part of it.
fn runs_here(record: &ClusterRecord, site: &FedSite, now: i64) -> bool {
    let live = matches!(
        record.state,
        ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
    );
    let open = vcfed_node_core::lifecycle::window_of(record)
        .is_some_and(|w| w.start_ms <= now && now < w.end_ms);
    let peer = site.peer().to_string();
    let holds = record.master_site == site.name()
        || record.parts.iter().any(|p| {
            p.state == PartState::Committed && p.peer_id.as_deref() == Some(peer.as_str())
        });
    live && open && holds
}
