//! The master's watch over the clusters it masters once they are settled:
//! losing a worker site, fencing its parts, and healing the cluster by its
//! [`Heal`] policy.
//!
//! A worker site's parts of a cluster are **lost** when the site is `gone`
//! in the gossip view (or not in it at all) **and** no cluster message of
//! it (a node report, an answer) arrived for the grace period: never on one
//! signal alone. A master that sees no other site alive fences nobody: it
//! may be the one cut off.
//!
//! A lost part is **fenced** first (`replace` and `shrink`): it moves to
//! `releasing` with the time of the loss, so it leaves every site's list of
//! the cluster's parts. The master's runner drops the site from the
//! cluster's segment at its next round (its gateway tears the tunnel down
//! for that segment and forgets the MACs learnt through it), and every
//! other committed part is committed again with the new list under a new
//! **epoch**, which a worker never goes back from. The release is sent
//! to the lost site until it answers or the window ends: a site that comes
//! back learns that its part is gone, stops its nodes and frees their VLAN
//! id and slots. `replace` then reserves the missing nodes for the rest of
//! the window through the usual two-phase reservation, at other sites; the
//! replacement nodes get numbers (and MACs) after every number the cluster
//! ever used.

use std::collections::BTreeSet;

use libp2p_identity::PeerId;
use vcfed_storage::{ClusterRecord, ClusterState, Ledger, LedgerError, PartState};

use super::master::{Master, master_from_record, start_release};
use super::{ClusterCore, ClusterFault, ForgetError, Heal, SiteDirectory};
use crate::lifecycle::in_cluster;

/// A settled cluster this site masters, as the watch sees it.
#[derive(Debug, Clone)]
pub(super) struct Watch {
    window_end_ms: i64,
    /// The sites of its committed parts that are not lost.
    sites: BTreeSet<PeerId>,
    /// It has fewer nodes than asked and heals by `replace`: tried again
    /// at this time.
    retry_at_ms: Option<i64>,
}

impl ClusterCore {
    /// A cluster message from `from` arrived: the site is not silent.
    pub(super) fn heard(&mut self, from: PeerId, now_ms: i64) {
        self.heard_ms.insert(from, now_ms);
        self.saw_time(now_ms);
        // A site back from the dead (a partition healed, its agent
        // restarted) learns at once that its parts are released, not at
        // the end of a backoff of up to a minute.
        for master in self.masters.values_mut() {
            for part in master.parts.iter_mut().filter(|p| p.peer == from) {
                if part.state == PartState::Releasing
                    && part.deadline_ms.is_some_and(|at| at > now_ms)
                {
                    part.deadline_ms = Some(now_ms);
                }
            }
        }
    }

    /// Notes the time of a call (see `now_ms`).
    pub(super) fn saw_time(&mut self, now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Asks for the watch at the latest time seen: due at the next timeout.
    fn watch_soon(&mut self) {
        let at = self.now_ms;
        self.watch_at_ms = Some(self.watch_at_ms.map_or(at, |next| next.min(at)));
    }

    /// A site went `gone` in the gossip view: the watch looks at once.
    pub fn site_gone(&mut self, site: &PeerId) {
        if self.watched.values().any(|w| w.sites.contains(site)) {
            self.watch_soon();
        }
    }

    /// Watches a cluster a restarted master found in its ledger.
    pub(super) fn watch_record(&mut self, record: &ClusterRecord, now_ms: i64) {
        if !is_live(record.state) {
            return;
        }
        let Some(master) = master_from_record(record, now_ms, &self.config) else {
            return;
        };
        self.watch_settled(&master, now_ms);
    }

    /// Watches a cluster whose reservation (or healing) just settled.
    pub(super) fn watch_settled(&mut self, master: &Master, now_ms: i64) {
        if !is_live(master.state) || now_ms >= master.request.window.end_ms {
            self.watched.remove(&master.id);
            return;
        }
        self.started_ms.get_or_insert(now_ms);
        self.saw_time(now_ms);
        let watch = self.watch_of(master, now_ms);
        self.watched.insert(master.id.clone(), watch);
        // Looked at with the gossip view at the next timeout: a site may
        // be gone already.
        self.watch_soon();
    }

    /// Keeps the watch's list of a live cluster's sites current while it is
    /// in flight (a replacement committed, a part fenced): a site of it may
    /// be lost before it settles.
    pub(super) fn refresh_watch(&mut self, master: &Master, now_ms: i64) {
        if !is_live(master.state) || !self.watched.contains_key(&master.id) {
            return;
        }
        let mut watch = self.watch_of(master, now_ms);
        if let Some(old) = self.watched.get(&master.id) {
            // A retry already due stays due.
            watch.retry_at_ms = match (old.retry_at_ms, watch.retry_at_ms) {
                (Some(old), Some(new)) => Some(old.min(new)),
                (_, new) => new,
            };
        }
        if let Some(at) = watch.retry_at_ms {
            self.watch_at_ms = Some(self.watch_at_ms.map_or(at, |next| next.min(at)));
        }
        self.watched.insert(master.id.clone(), watch);
    }

    /// What the watch keeps of `master`: the sites of its committed parts
    /// that are not lost, and when to try again if it is short.
    fn watch_of(&self, master: &Master, now_ms: i64) -> Watch {
        let sites: BTreeSet<PeerId> = master
            .parts
            .iter()
            .filter(|p| in_cluster(p.state) && p.lost_at_ms.is_none())
            .map(|p| p.peer)
            .collect();
        let short = master.request.heal == Heal::Replace
            && master.covered() < master.request.nodes
            && master.parts.iter().any(|p| p.lost_at_ms.is_some());
        Watch {
            window_end_ms: master.request.window.end_ms,
            sites,
            retry_at_ms: short.then_some(now_ms + self.config.heal_retry_ms),
        }
    }

    /// Looks at every watched cluster: fences and heals those that lost a
    /// site, tries again for those left short.
    pub(super) fn watch(
        &mut self,
        ledger: &mut Ledger,
        sites: &dyn SiteDirectory,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        self.watch_at_ms = None;
        let started = *self.started_ms.get_or_insert(now_ms);
        let grace = self.config.heal_grace_ms;
        let mut next: Option<i64> = None;
        let mut due: Vec<(String, Vec<PeerId>)> = Vec::new();
        let mut isolated = false;
        self.watched.retain(|_, watch| now_ms < watch.window_end_ms);
        for (id, watch) in &self.watched {
            if self.masters.get(id).is_some_and(Master::collecting) {
                // Reserving replacements: looked at again after a retry
                // period (the round ends by its deadline at the latest).
                let at = now_ms + self.config.heal_retry_ms;
                next = Some(next.map_or(at, |next: i64| next.min(at)));
                continue;
            }
            let mut lost = Vec::new();
            // A site not gone needs no timer: `site_gone` wakes the watch
            // when it goes; a gone one is lost once its silence is long
            // enough.
            for site in watch.sites.iter().filter(|site| sites.is_gone(site)) {
                let silent_until = self.heard_ms.get(site).copied().unwrap_or(started) + grace;
                if silent_until > now_ms {
                    next = Some(next.map_or(silent_until, |at: i64| at.min(silent_until)));
                } else {
                    lost.push(*site);
                }
            }
            let retry = watch.retry_at_ms.is_some_and(|at| at <= now_ms);
            if let Some(at) = watch.retry_at_ms.filter(|&at| at > now_ms) {
                next = Some(next.map_or(at, |next: i64| next.min(at)));
            }
            if !lost.is_empty() && !sites.any_alive() {
                isolated = true;
                continue;
            }
            if !lost.is_empty() || retry {
                due.push((id.clone(), lost));
            }
        }
        if isolated {
            tracing::warn!(
                "sites of clusters this site masters are gone, but so is every other site: \
                 this site may be the one cut off, so it fences nobody for now"
            );
            let at = now_ms + self.config.heal_retry_ms;
            next = Some(next.map_or(at, |next| next.min(at)));
        }
        self.watch_at_ms = next;
        for (id, lost) in due {
            self.heal(ledger, sites, &id, &lost, false, now_ms)?;
        }
        Ok(())
    }

    /// An operator forgets a site that vanished (`vcfed sites forget`):
    /// refused while the site is alive in the view, or (unless `force`)
    /// while it holds parts of live clusters this site masters; with
    /// `force` those parts are fenced at once, whatever the clusters' heal
    /// policy, and healed by it. Returns the clusters whose parts ended.
    pub fn forget_site(
        &mut self,
        ledger: &mut Ledger,
        sites: &dyn SiteDirectory,
        site: &PeerId,
        force: bool,
        now_ms: i64,
    ) -> Result<Vec<String>, ForgetError> {
        self.saw_time(now_ms);
        if !sites.is_gone(site) {
            return Err(ForgetError::Alive);
        }
        let peer = site.to_string();
        let holding: Vec<String> = ledger
            .live_clusters()?
            .into_iter()
            .filter(|record| record.master_site == self.local_name)
            .filter(|record| {
                record.parts.iter().any(|p| {
                    p.peer_id.as_deref() == Some(peer.as_str())
                        && in_cluster(p.state)
                        && p.lost_at_ms.is_none()
                })
            })
            .map(|record| record.id)
            .collect();
        if !holding.is_empty() && !force {
            return Err(ForgetError::HoldsParts(holding));
        }
        for id in &holding {
            tracing::warn!(cluster = %id, peer = %site, "forgetting a site: its parts end now");
            self.heal(ledger, sites, id, std::slice::from_ref(site), true, now_ms)?;
        }
        self.heard_ms.remove(site);
        Ok(holding)
    }

    /// Fences the parts of `lost` sites in cluster `id` and heals it by its
    /// policy (or, with no site lost, reserves again what it is short of).
    /// `force` fences even a cluster that heals by `none`.
    fn heal(
        &mut self,
        ledger: &mut Ledger,
        sites: &dyn SiteDirectory,
        id: &str,
        lost: &[PeerId],
        force: bool,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let Some(record) = ledger.cluster(id)? else {
            self.watched.remove(id);
            return Ok(());
        };
        if record.master_site != self.local_name || !is_live(record.state) {
            self.watched.remove(id);
            return Ok(());
        }
        // A cluster still releasing a part is in flight: heal that one.
        let in_flight = self.masters.remove(id);
        let Some(mut master) =
            in_flight.or_else(|| master_from_record(&record, now_ms, &self.config))
        else {
            self.watched.remove(id);
            return Ok(());
        };
        let policy = master.request.heal;
        let fence = force
            || (policy != Heal::None && self.fault != Some(ClusterFault::ReplaceWithoutFence));
        let mut fenced = false;
        for part in &mut master.parts {
            if !lost.contains(&part.peer) || !in_cluster(part.state) || part.lost_at_ms.is_some() {
                continue;
            }
            part.lost_at_ms = Some(now_ms);
            tracing::warn!(cluster = %id, site = %part.site_name, attempt = part.attempt, nodes = part.nodes, heal = %policy, "a worker site is lost: gone in the gossip view and silent for the grace period");
            ledger.record_event(
                now_ms,
                "cluster.part_lost",
                id,
                serde_json::json!({
                    "site": part.site_name,
                    "attempt": part.attempt,
                    "nodes": part.nodes,
                    "heal": policy.as_str(),
                    "fenced": fence,
                    "reason": if force {
                        "forgotten by an operator (vcfed sites forget --force)"
                    } else {
                        "gone in the gossip view and silent for the grace period"
                    },
                }),
            )?;
            if fence {
                start_release(part, now_ms);
                fenced = true;
            }
        }
        if fenced {
            // The fenced sites' last node states go in `advance`.
            master.recommit_committed();
        }
        let short = master.covered() < master.request.nodes;
        if policy == Heal::Replace && short && now_ms < master.request.window.end_ms {
            master.healing = true;
            master.reserve_deadline_ms = now_ms + self.config.reserve_deadline_ms;
            // Each round starts afresh: a site given up in an earlier round
            // may answer now (the view offers only sites that are alive).
            master.exclude_only(lost);
            tracing::info!(cluster = %id, missing = master.request.nodes - master.covered(), "reserving replacement nodes");
        }
        let watch = self.watch_of(&master, now_ms);
        if let Some(at) = watch.retry_at_ms {
            self.watch_at_ms = Some(self.watch_at_ms.map_or(at, |next| next.min(at)));
        }
        self.watched.insert(id.to_owned(), watch);
        self.masters.insert(id.to_owned(), master);
        self.advance(ledger, Some(sites), id, now_ms)
    }

    /// A round of replacement nodes is committed everywhere.
    pub(super) fn healed(
        &mut self,
        ledger: &mut Ledger,
        master: &Master,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let lost_at = master
            .parts
            .iter()
            .filter_map(|p| p.lost_at_ms)
            .max()
            .unwrap_or(now_ms);
        let full = master.covered() >= master.request.nodes;
        tracing::info!(cluster = %master.id, after_ms = now_ms - lost_at, full, "replacement nodes committed");
        ledger.record_event(
            now_ms,
            "cluster.healed",
            &master.id,
            serde_json::json!({
                "lost_at_ms": lost_at,
                "after_ms": now_ms - lost_at,
                "nodes": master.covered(),
                "asked": master.request.nodes,
                "epoch": master.epoch,
            }),
        )
    }
}

fn is_live(state: ClusterState) -> bool {
    matches!(
        state,
        ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
    )
}
