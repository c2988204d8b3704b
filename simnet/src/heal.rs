//! The `site-loss` fault and the healing invariants (issue 18).
//!
//! While faults run, a worker site of a running cluster is crashed now and
//! then for longer than the masters' grace period (and sometimes until the
//! calm): its master must declare its parts lost, fence them and, by the
//! cluster's policy, replace them. Checked here, besides what the lifecycle
//! checks already see (numbers and MACs unique among the nodes that run,
//! nothing overbooked, every VLAN id and slot back, every cluster finished
//! at its window's end):
//!
//! - **fence**: a master never carries a cluster's segment to a site whose
//!   parts it declared lost (`replace`, `shrink`);
//! - **heal time**: the losses are timed, from the crash to the master's
//!   record at full size again; a loss healed later than grace + 30 s, or
//!   never, is counted (the scenario with room to spare requires none).

use serde::Serialize;
use vcfed_node_core::cluster::{ClusterConfig, Heal};
use vcfed_node_core::lifecycle::in_cluster;
use vcfed_storage::{ClusterRecord, ClusterState};

use super::{Fault, MINUTE_MS, World};
use crate::checks;
use crate::{Rng, SiteId};

/// Mean time between two site losses while faults run, ms.
const LOSS_EVERY_MS: i64 = 3 * MINUTE_MS;
/// Share of lost sites that stay down until the calm.
const LOSS_FOR_GOOD: f64 = 0.3;
/// How long after the grace period a `replace` cluster with room for its
/// replacements must be whole again, ms.
pub const HEAL_BOUND_MS: i64 = 30_000;

/// How the losses went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HealReport {
    /// Worker sites of running clusters crashed by `site-loss`.
    pub sites_lost: u64,
    /// Parts their masters fenced (declared lost).
    pub parts_fenced: u64,
    /// Losses of `replace` clusters whose master's record was whole again.
    pub healed: u64,
    /// ... of which later than grace + 30 s after the crash.
    pub healed_late: u64,
    /// Losses of `replace` clusters that were never whole again before
    /// their window ended or the run did.
    pub not_healed: u64,
    /// Time from the crash to the master's record whole again, ms, sorted.
    pub heal_ms: Vec<i64>,
    /// The first losses never healed: cluster, site, and the master's parts.
    pub never: Vec<String>,
}

/// One site lost for one cluster.
#[derive(Debug, Clone)]
struct Loss {
    cluster: String,
    master: SiteId,
    site: SiteId,
    at: i64,
    fenced: bool,
}

/// The fault's state.
#[derive(Debug)]
pub(super) struct Losses {
    rng: Rng,
    next_at: i64,
    open: Vec<Loss>,
    pub(super) report: HealReport,
}

impl Losses {
    pub(super) fn new(rng: Rng, start_ms: i64) -> Losses {
        Losses {
            rng,
            next_at: start_ms + MINUTE_MS,
            open: Vec::new(),
            report: HealReport::default(),
        }
    }
}

/// The heal policy simnet gives a cluster: most `replace` (the default),
/// one in five `shrink`, one in ten `none`, by its id.
pub fn heal_for(id: &str) -> Heal {
    let hash = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    match hash % 10 {
        0 | 1 => Heal::Shrink,
        2 => Heal::None,
        _ => Heal::Replace,
    }
}

impl World {
    /// Crashes a worker site of a running cluster when one is due.
    pub(super) fn site_loss_events(&mut self, now: i64) {
        if !self.options.faults.contains(&Fault::SiteLoss)
            || !self.sim.faults_active()
            || now < self.losses.next_at
        {
            return;
        }
        self.losses.next_at = now + self.losses.rng.exponential_ms(LOSS_EVERY_MS);
        let grace = ClusterConfig::default().heal_grace_ms;
        let mut candidates: Vec<(String, SiteId, SiteId)> = Vec::new();
        for (id, tracked) in &self.clusters {
            let master = tracked.master;
            if !checks::alive(&self.sim, master) {
                continue;
            }
            let Some(record) = self.master_record(master, id) else {
                continue;
            };
            let local = self.sim.local_now_ms(master);
            let window_left = vcfed_node_core::lifecycle::window_of(&record)
                .is_some_and(|w| w.start_ms <= local && w.end_ms - local > grace + 3 * MINUTE_MS);
            if record.state != ClusterState::Running || !window_left {
                continue;
            }
            for part in record
                .parts
                .iter()
                .filter(|p| in_cluster(p.state) && p.lost_at_ms.is_none() && !p.frontend)
            {
                let Some(site) = part
                    .peer_id
                    .as_deref()
                    .and_then(|p| self.directory.site_of(p))
                else {
                    continue;
                };
                if site != master && checks::alive(&self.sim, site) {
                    candidates.push((id.clone(), master, site));
                }
            }
        }
        if candidates.is_empty() {
            return;
        }
        let (cluster, master, site) = candidates[self.losses.rng.index(candidates.len())].clone();
        let down_ms = if self.losses.rng.chance(LOSS_FOR_GOOD) {
            // Until the calm restarts it.
            self.options.duration_ms
        } else {
            self.losses
                .rng
                .between(grace + 50_000, grace + 4 * MINUTE_MS)
        };
        if !self.sim.crash_site(site, down_ms) {
            return;
        }
        self.losses.report.sites_lost += 1;
        // Every running cluster with a part there lost it.
        let lost: Vec<(String, SiteId)> = candidates
            .iter()
            .filter(|(_, _, s)| *s == site)
            .map(|(c, m, _)| (c.clone(), *m))
            .collect();
        debug_assert!(lost.iter().any(|(c, m)| *c == cluster && *m == master));
        for (cluster, master) in lost {
            if !self
                .losses
                .open
                .iter()
                .any(|l| l.cluster == cluster && l.site == site)
            {
                self.losses.open.push(Loss {
                    cluster,
                    master,
                    site,
                    at: now,
                    fenced: false,
                });
            }
        }
    }

    /// Follows the open losses: fenced, then whole again (`replace`).
    pub(super) fn follow_losses(&mut self, now: i64) {
        let grace = ClusterConfig::default().heal_grace_ms;
        let mut open = std::mem::take(&mut self.losses.open);
        open.retain_mut(|loss| {
            let Some(record) = self.master_record(loss.master, &loss.cluster) else {
                return true;
            };
            let site_peer = self.directory.peers[loss.site].to_string();
            let fenced = record.parts.iter().any(|p| {
                p.peer_id.as_deref() == Some(site_peer.as_str()) && p.lost_at_ms.is_some()
            });
            if fenced && !loss.fenced {
                loss.fenced = true;
                self.losses.report.parts_fenced += 1;
            }
            // Back (the calm restarts every site) before its master declared
            // it lost: nothing to heal.
            if !loss.fenced && checks::alive(&self.sim, loss.site) {
                return false;
            }
            let heal = heal_of(&record);
            // Deleted (or failed): nothing to heal any more.
            if record.state.is_terminal() && record.state != ClusterState::Finished
                || record.state == ClusterState::Stopping
            {
                return false;
            }
            let ended = record.state.is_terminal()
                || vcfed_node_core::lifecycle::window_of(&record)
                    .is_none_or(|w| self.sim.local_now_ms(loss.master) >= w.end_ms);
            if heal != Heal::Replace {
                return !ended && !loss.fenced;
            }
            let asked = record.request["nodes"].as_u64().unwrap_or(0);
            let whole = fenced
                && record
                    .parts
                    .iter()
                    .filter(|p| in_cluster(p.state) && p.lost_at_ms.is_none())
                    .map(|p| u64::from(p.nodes))
                    .sum::<u64>()
                    >= asked;
            if whole {
                let took = now - loss.at;
                self.losses.report.healed += 1;
                self.losses.report.heal_ms.push(took);
                if took > grace + HEAL_BOUND_MS {
                    self.losses.report.healed_late += 1;
                }
                return false;
            }
            if ended {
                self.losses.report.not_healed += 1;
                if self.losses.report.never.len() < 5 {
                    self.losses.report.never.push(format!(
                        "{} ({} asked, window ends t+{} s) lost site{} at t+{} s: {:?}",
                        loss.cluster,
                        record.request["nodes"],
                        vcfed_node_core::lifecycle::window_of(&record)
                            .map_or(0, |w| (w.end_ms - crate::world::START_MS) / 1000),
                        loss.site,
                        (loss.at - crate::world::START_MS) / 1000,
                        record
                            .parts
                            .iter()
                            .map(|p| (p.site.as_str(), p.nodes, p.state, p.lost_at_ms.is_some()))
                            .collect::<Vec<_>>()
                    ));
                }
                return false;
            }
            true
        });
        self.losses.open = open;
    }

    /// The fence invariant: no master carries a cluster's segment to a
    /// site whose parts it declared lost (`replace`, `shrink`).
    pub(super) fn check_fences(&mut self) {
        let n = self.options.sites;
        let mut found = Vec::new();
        for master in (0..n).filter(|&s| checks::alive(&self.sim, s)) {
            let site = &self.sim.sites()[master];
            let Ok(records) = site.ledger().live_clusters() else {
                continue;
            };
            for record in records.iter().filter(|r| r.master_site == site.name()) {
                if heal_of(record) == Heal::None {
                    continue;
                }
                let Some(segment) = record.segment else {
                    continue;
                };
                // The master's runner applies a new list of parts at its
                // next round (within `TICK_MS` of the ledger write).
                let local = self.sim.local_now_ms(master);
                let fenced_before = local - 2 * vcfed_node_core::runner::TICK_MS;
                for part in record
                    .parts
                    .iter()
                    .filter(|p| p.lost_at_ms.is_some_and(|at| at <= fenced_before))
                {
                    let Some(peer) = part.peer_id.as_deref() else {
                        continue;
                    };
                    // A site with another part that is not lost stays.
                    let stays = record.parts.iter().any(|p| {
                        p.peer_id.as_deref() == Some(peer)
                            && p.lost_at_ms.is_none()
                            && in_cluster(p.state)
                    });
                    let Some(lost) = self.directory.site_of(peer) else {
                        continue;
                    };
                    if !stays && self.dataplane.carries(master, segment, lost) {
                        found.push((
                            master,
                            record.id.clone(),
                            format!(
                                "{} declared {}'s part of {} lost but still carries its segment there; parts: {:?}",
                                site.name(),
                                part.site,
                                record.id,
                                record
                                    .parts
                                    .iter()
                                    .map(|p| (p.site.as_str(), p.attempt, p.state, p.lost_at_ms))
                                    .collect::<Vec<_>>()
                            ),
                        ));
                    }
                }
            }
        }
        for (master, cluster, detail) in found {
            if self.fence_reported.insert(cluster) {
                self.violation("fence", Some(master), detail);
            }
        }
    }

    /// Losses still open at the end of the run were never healed.
    pub(super) fn close_losses(&mut self) {
        let grace = ClusterConfig::default().heal_grace_ms;
        let now = self.sim.now_ms();
        for loss in std::mem::take(&mut self.losses.open) {
            let replace = self
                .master_record(loss.master, &loss.cluster)
                .is_some_and(|r| heal_of(&r) == Heal::Replace);
            // A loss shortly before the end had no time to heal.
            if replace && now - loss.at > grace + HEAL_BOUND_MS {
                self.losses.report.not_healed += 1;
            }
        }
        self.losses.report.heal_ms.sort_unstable();
    }

    fn master_record(&self, master: SiteId, cluster: &str) -> Option<ClusterRecord> {
        self.sim.sites()[master]
            .ledger()
            .cluster(cluster)
            .ok()
            .flatten()
    }
}

/// The heal policy stored with a cluster's request.
fn heal_of(record: &ClusterRecord) -> Heal {
    record
        .request
        .get("heal")
        .and_then(|heal| serde_json::from_value(heal.clone()).ok())
        .unwrap_or_default()
}
