//! The master side of the cluster core: the clusters this site received,
//! their reservation across sites, and their release.

use std::collections::{BTreeMap, BTreeSet};

use libp2p_identity::PeerId;
use vcfed_storage::{
    ClusterPart, ClusterRecord, ClusterState, GatewayRef, HoldOutcome, HoldRequest, Ledger,
    LedgerError, PartState, Window,
};

use super::{
    ClusterConfig, ClusterCore, ClusterMsg, ClusterRequest, CreateError, DeleteError,
    SiteDirectory, segment_for, stored_state, validate,
};

/// How many more attempts at one site healing may make over a cluster's
/// window than its first reservation (see `ClusterConfig::attempts_per_site_max`).
const HEAL_ATTEMPTS_FACTOR: u32 = 5;

/// One part at a remote site, as the master tracks it.
#[derive(Debug, Clone)]
pub(super) struct RemotePart {
    pub(super) site_name: String,
    pub(super) peer: PeerId,
    /// The site's gateway, from its `Held`.
    gateway: Option<GatewayRef>,
    pub(super) attempt: u32,
    pub(super) nodes: u32,
    pub(super) state: PartState,
    /// When to resend (or give up), for parts waiting for an answer.
    pub(super) deadline_ms: Option<i64>,
    tries: u32,
    backoff_ms: i64,
    /// The part's first node number, fixed when it is committed.
    first_node: Option<u32>,
    /// When its site was declared lost.
    pub(super) lost_at_ms: Option<i64>,
    /// The window its nodes are reserved for: the cluster's, or what was
    /// left of it for a replacement.
    window: Window,
}

impl RemotePart {
    /// Whether the part counts towards the cluster's nodes: not released,
    /// and not declared lost.
    fn counts(&self) -> bool {
        self.lost_at_ms.is_none()
            && matches!(
                self.state,
                PartState::Held | PartState::Committing | PartState::Committed
            )
    }
}

/// A part the master holds in its own ledger besides its first one: the
/// replacement of lost nodes in its own free slots, when the other sites
/// cannot hold them all. Held and committed directly, without messages.
#[derive(Debug, Clone)]
pub(super) struct LocalExtra {
    attempt: u32,
    nodes: u32,
    state: PartState,
    first_node: Option<u32>,
}

/// Where a part is, for numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    /// `parts[i]`.
    Remote(usize),
    /// The master's first part.
    Local,
    /// `extras[i]`.
    Extra(usize),
}

/// A cluster this site masters and that is still in flight.
#[derive(Debug, Clone)]
pub(super) struct Master {
    pub(super) id: String,
    segment: u32,
    pub(super) request: ClusterRequest,
    pub(super) state: ClusterState,
    reason: Option<String>,
    local_nodes: u32,
    local_state: PartState,
    pub(super) parts: Vec<RemotePart>,
    excluded: BTreeSet<PeerId>,
    denied_free: BTreeMap<PeerId, u32>,
    pub(super) reserve_deadline_ms: i64,
    /// The first node number of the master's own part, once committed.
    local_first: Option<u32>,
    /// Membership epoch: raised with every list of parts sent again.
    pub(super) epoch: u32,
    /// Replacement nodes of a live cluster are being reserved.
    pub(super) healing: bool,
    /// Parts in the master's own ledger besides its first one.
    extras: Vec<LocalExtra>,
}

impl Master {
    fn local_key(&self) -> String {
        format!("{}/0", self.id)
    }

    /// Nodes held or committed (or being committed) so far, lost parts
    /// aside.
    pub(super) fn covered(&self) -> u32 {
        let remote: u32 = self
            .parts
            .iter()
            .filter(|p| p.counts())
            .map(|p| p.nodes)
            .sum();
        let extra: u32 = self
            .extras
            .iter()
            .filter(|e| matches!(e.state, PartState::Held | PartState::Committed))
            .map(|e| e.nodes)
            .sum();
        self.local_nodes + remote + extra
    }

    fn extra_key(&self, attempt: u32) -> String {
        format!("{}/{attempt}", self.id)
    }

    /// The names of the sites that had numbered parts (decided once) and
    /// have none in the cluster any more.
    fn sites_out(&self) -> BTreeSet<String> {
        let keeps: BTreeSet<&str> = self
            .parts
            .iter()
            .filter(|p| crate::lifecycle::in_cluster(p.state))
            .map(|p| p.site_name.as_str())
            .collect();
        self.parts
            .iter()
            .filter(|p| p.first_node.is_some() && !crate::lifecycle::in_cluster(p.state))
            .filter(|p| !keeps.contains(p.site_name.as_str()))
            .map(|p| p.site_name.clone())
            .collect()
    }

    /// Numbers the parts of `order` one after the other from `next`.
    fn give_numbers(&mut self, order: &[Slot], mut next: u32) {
        for slot in order {
            match *slot {
                Slot::Remote(i) => {
                    self.parts[i].first_node = Some(next);
                    next += self.parts[i].nodes;
                }
                Slot::Local => {
                    self.local_first = Some(next);
                    next += self.local_nodes;
                }
                Slot::Extra(i) => {
                    self.extras[i].first_node = Some(next);
                    next += self.extras[i].nodes;
                }
            }
        }
    }

    /// Starts a round of replacements: the sites this cluster lost are left
    /// out of its plan for the rest of the window (a fenced site is never
    /// taken back), while sites given up in earlier rounds and their
    /// denials count no more.
    pub(super) fn exclude_only(&mut self, lost: &[PeerId]) {
        self.excluded = lost.iter().copied().collect();
        self.excluded.extend(
            self.parts
                .iter()
                .filter(|p| p.lost_at_ms.is_some())
                .map(|p| p.peer),
        );
        self.denied_free.clear();
    }

    /// Whether holds are being collected: the first reservation, or the
    /// replacement of lost nodes.
    pub(super) fn collecting(&self) -> bool {
        self.state == ClusterState::Reserving || self.healing
    }

    /// The list of parts changed after a commit (a part fenced or added):
    /// every committed part is committed again with the new list under a
    /// new epoch, so each site updates its peers and none goes back to an
    /// older list.
    pub(super) fn recommit_committed(&mut self) {
        self.epoch += 1;
        for part in &mut self.parts {
            let listed = matches!(part.state, PartState::Committed | PartState::Committing);
            if listed && part.lost_at_ms.is_none() {
                part.state = PartState::Committing;
                part.deadline_ms = None;
                part.tries = 0;
            }
        }
    }

    /// Gives the parts being committed their node numbers: the parts of
    /// the first commit in (site, attempt) order from 1 (as every site
    /// numbered them before epochs), later ones after the highest number
    /// ever given, so no number (or MAC) is used twice in the window.
    fn number_parts(&mut self, local_name: &str) {
        let ends = self
            .parts
            .iter()
            .filter_map(|p| p.first_node.map(|first| first + p.nodes))
            .chain(self.local_first.map(|first| first + self.local_nodes))
            .chain(
                self.extras
                    .iter()
                    .filter_map(|e| e.first_node.map(|first| first + e.nodes)),
            );
        let next = ends.max().unwrap_or(1).max(1);
        let mut pending: Vec<(&str, u32, Slot)> = self
            .parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.state == PartState::Committing && p.first_node.is_none())
            .map(|(i, p)| (p.site_name.as_str(), p.attempt, Slot::Remote(i)))
            .collect();
        if self.local_first.is_none() {
            pending.push((local_name, 0, Slot::Local));
        }
        pending.extend(
            self.extras
                .iter()
                .enumerate()
                .filter(|(_, e)| e.state == PartState::Committed && e.first_node.is_none())
                .map(|(i, e)| (local_name, e.attempt, Slot::Extra(i))),
        );
        pending.sort();
        let order: Vec<Slot> = pending.into_iter().map(|(_, _, slot)| slot).collect();
        self.give_numbers(&order, next);
    }

    fn pending(&self) -> u32 {
        self.parts
            .iter()
            .filter(|p| p.state == PartState::Reserving)
            .map(|p| p.nodes)
            .sum()
    }

    fn all_released(&self) -> bool {
        self.local_state == PartState::Released
            && self.parts.iter().all(|p| p.state == PartState::Released)
            && self.extras.iter().all(|e| e.state == PartState::Released)
    }
}

impl ClusterCore {
    /// After a restart: picks up the clusters this site masters that were
    /// in flight. Commits that were decided are sent again; reservations
    /// that were not decided are released.
    pub fn resume(&mut self, ledger: &mut Ledger, now_ms: i64) -> Result<(), LedgerError> {
        for record in ledger.clusters()? {
            if record.master_site != self.local_name || self.masters.contains_key(&record.id) {
                continue;
            }
            self.started_ms.get_or_insert(now_ms);
            self.watch_record(&record, now_ms);
            let Some(mut master) = master_from_record(&record, now_ms, &self.config) else {
                continue;
            };
            let decided = master.local_state == PartState::Committed
                || master
                    .parts
                    .iter()
                    .any(|p| matches!(p.state, PartState::Committing | PartState::Committed));
            match master.state {
                ClusterState::Reserving if decided => {
                    tracing::info!(cluster = %master.id, "resuming the commit of a cluster");
                    for part in &mut master.parts {
                        match part.state {
                            PartState::Held => part.state = PartState::Committing,
                            PartState::Reserving => part.state = PartState::Releasing,
                            _ => {}
                        }
                    }
                }
                ClusterState::Requested | ClusterState::Reserving => {
                    tracing::info!(cluster = %master.id, "releasing a cluster whose reservation the restart interrupted");
                    master.state = ClusterState::Failed;
                    master.reason =
                        Some("the master restarted before the reservation was complete".to_owned());
                    release_everything(&mut master);
                }
                ClusterState::Stopping | ClusterState::Failed => {}
                // A reserved (or started) cluster may still be taking nodes
                // back from a site it gave up on, which may have committed
                // them: keep releasing, or that site keeps them until the
                // window ends.
                // The replacement of lost nodes was under way: what was
                // decided is committed again, the holds not yet decided are
                // released (the watch reserves again if still short).
                ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
                    if master.parts.iter().any(|p| {
                        matches!(
                            p.state,
                            PartState::Reserving | PartState::Held | PartState::Committing
                        )
                    }) || master.extras.iter().any(|e| e.state == PartState::Held) =>
                {
                    tracing::info!(cluster = %master.id, "resuming the replacement of lost nodes");
                    for part in &mut master.parts {
                        if matches!(part.state, PartState::Reserving | PartState::Held) {
                            part.state = PartState::Releasing;
                        }
                    }
                    for extra in &mut master.extras {
                        if extra.state == PartState::Held {
                            extra.state = PartState::Releasing;
                        }
                    }
                }
                ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
                    if master.parts.iter().any(|p| p.state == PartState::Releasing) => {}
                _ => continue,
            }
            for part in &mut master.parts {
                if matches!(
                    part.state,
                    PartState::Committing | PartState::Releasing | PartState::Reserving
                ) {
                    part.deadline_ms = Some(now_ms);
                    part.tries = 0;
                }
            }
            self.masters.insert(master.id.clone(), master);
            let id = record.id.clone();
            self.advance(ledger, None, &id, now_ms)?;
        }
        Ok(())
    }

    /// A new cluster request arriving at this site, which becomes its master.
    /// Either the request is refused and nothing is held anywhere, or the
    /// cluster is stored (`reserving`, or `reserved` if this site holds it
    /// all) and the reservation proceeds through the outputs.
    pub fn create(
        &mut self,
        ledger: &mut Ledger,
        sites: &dyn SiteDirectory,
        now_ms: i64,
        id: String,
        request: ClusterRequest,
    ) -> Result<ClusterRecord, CreateError> {
        validate(&id, &request, now_ms)?;
        if ledger.cluster(&id)?.is_some() {
            return Err(CreateError::Exists(id));
        }
        if let Some(live) = ledger.live_cluster_named(&self.local_name, &request.name)? {
            return Err(CreateError::NameTaken {
                name: request.name,
                id: live.id,
            });
        }
        let window = request.window;
        let local_slot = ledger.inventory()?.map(|inventory| inventory.node);
        let fits_here = local_slot.is_some_and(|slot| request.shape.fits_in(&slot));
        let candidates = sites.candidates(window.start_ms, window.end_ms, &request.shape);
        let local_free = if fits_here {
            ledger.available(window, now_ms)?
        } else {
            0
        };
        let federation_free: u64 = candidates.iter().map(|c| u64::from(c.free)).sum();
        if !fits_here && !sites.offers_shape(&request.shape) {
            return Err(
                not_ready(sites, now_ms).unwrap_or(CreateError::UnknownShape(request.shape))
            );
        }
        if local_free == 0 {
            let what = if fits_here {
                "no free slot"
            } else {
                "no slot of that shape"
            };
            return Err(CreateError::Insufficient {
                available: 0,
                detail: format!(
                    "this site has {what} for the cluster's frontend in the window; send the request to a site \
                     with room (the site that receives a request hosts its frontend)"
                ),
            });
        }
        let local_nodes = request.nodes.min(local_free - 1);
        let remaining = request.nodes - local_nodes;
        let available = u64::from(local_nodes) + federation_free;
        if u64::from(remaining) > federation_free {
            if let Some(not_ready) = not_ready(sites, now_ms) {
                return Err(not_ready);
            }
            return Err(CreateError::Insufficient {
                available: u32::try_from(available).unwrap_or(u32::MAX),
                detail: format!(
                    "the federation has {} of {} free for the whole window ({local_nodes} here, \
                     {federation_free} at {}), {} asked",
                    crate::words::count(available, "node"),
                    request.shape,
                    crate::words::count(
                        u64::try_from(candidates.len()).unwrap_or(u64::MAX),
                        "other site"
                    ),
                    request.nodes
                ),
            });
        }

        let mut master = Master {
            id: id.clone(),
            segment: segment_for(&id),
            request: request.clone(),
            state: ClusterState::Reserving,
            reason: None,
            local_nodes,
            local_state: PartState::Held,
            parts: Vec::new(),
            excluded: BTreeSet::new(),
            denied_free: BTreeMap::new(),
            reserve_deadline_ms: now_ms + self.config.reserve_deadline_ms,
            local_first: None,
            epoch: 0,
            healing: false,
            extras: Vec::new(),
        };
        let hold = HoldRequest {
            key: master.local_key(),
            cluster_id: id.clone(),
            requester: self.local.to_string(),
            window,
            nodes: local_nodes + 1,
            shape: request.shape,
            // The master's own hold must outlive the whole reservation phase.
            lease_ms: self.config.reserve_deadline_ms + self.config.lease_ms,
        };
        match ledger.hold(&hold, now_ms)? {
            HoldOutcome::Held(_) => {}
            HoldOutcome::Denied { available } => {
                return Err(CreateError::Insufficient {
                    available: available.saturating_sub(1),
                    detail: "this site's free capacity changed while planning; try again"
                        .to_owned(),
                });
            }
        }
        let record = ClusterRecord {
            id: id.clone(),
            name: request.name.clone(),
            master_site: self.local_name.clone(),
            request: serde_json::to_value(&request).expect("a request serialises to JSON"),
            state: ClusterState::Reserving,
            reason: None,
            parts: record_parts(&master, &self.local_name, &self.local, &self.gateway),
            segment: Some(master.segment),
            epoch: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        };
        if let Err(e) = ledger.insert_cluster(&record) {
            let _ = ledger.release(&master.local_key(), &self.local.to_string(), now_ms);
            return Err(e.into());
        }
        tracing::info!(cluster = %id, nodes = request.nodes, local = local_nodes, "cluster accepted; this site is master");
        if remaining > 0 && !self.plan(&mut master, sites, remaining, now_ms) {
            // Cannot happen: the candidates covered `remaining` above.
            master.state = ClusterState::Failed;
            master.reason = Some("no plan covers the request".to_owned());
            release_everything(&mut master);
        }
        self.masters.insert(id.clone(), master);
        self.advance(ledger, Some(sites), &id, now_ms)?;
        Ok(ledger.cluster(&id)?.expect("the cluster was stored above"))
    }

    /// Deletes a cluster this site masters: releases every part. The cluster
    /// is `stopping` until every site acknowledged (or its window passed),
    /// then `finished`.
    pub fn delete(
        &mut self,
        ledger: &mut Ledger,
        now_ms: i64,
        id: &str,
    ) -> Result<ClusterRecord, DeleteError> {
        let record = ledger
            .cluster(id)?
            .ok_or_else(|| DeleteError::Unknown(id.to_owned()))?;
        if record.master_site != self.local_name {
            return Err(DeleteError::NotMaster(id.to_owned(), record.master_site));
        }
        if record.state.is_terminal() && !self.masters.contains_key(id) {
            return Ok(record);
        }
        if !self.masters.contains_key(id) {
            let Some(master) = master_from_record(&record, now_ms, &self.config) else {
                return Ok(record);
            };
            self.masters.insert(id.to_owned(), master);
        }
        let master = self.masters.get_mut(id).expect("inserted above");
        if master.state != ClusterState::Failed {
            master.state = ClusterState::Stopping;
        }
        release_everything(master);
        tracing::info!(cluster = %id, "cluster deleted; releasing every part");
        self.advance(ledger, None, id, now_ms)?;
        Ok(ledger.cluster(id)?.expect("the cluster exists"))
    }

    /// An answer from a worker to one of this site's requests.
    pub fn handle_reply(
        &mut self,
        ledger: &mut Ledger,
        sites: &dyn SiteDirectory,
        now_ms: i64,
        from: PeerId,
        msg: ClusterMsg,
    ) -> Result<(), LedgerError> {
        self.heard(from, now_ms);
        let (cluster, attempt) = msg.ids();
        let cluster = cluster.to_owned();
        let Some(master) = self.masters.get_mut(&cluster) else {
            // A late answer for a cluster no longer in flight: if it holds
            // something, give it back.
            if matches!(msg, ClusterMsg::Held { .. })
                && !self.is_committed_part(ledger, &cluster, &from, attempt)?
            {
                self.transmits
                    .push_back((from, ClusterMsg::Release { cluster, attempt }));
            }
            return Ok(());
        };
        let in_reservation = master.collecting();
        let master_epoch = master.epoch;
        let Some(part) = master
            .parts
            .iter_mut()
            .find(|p| p.peer == from && p.attempt == attempt)
        else {
            return Ok(());
        };
        match (part.state, msg) {
            (PartState::Reserving, ClusterMsg::Held { gateway, .. }) => {
                if in_reservation {
                    part.state = PartState::Held;
                    part.deadline_ms = None;
                    part.gateway = gateway;
                } else {
                    start_release(part, now_ms);
                }
            }
            (PartState::Reserving, ClusterMsg::Denied { available, .. }) => {
                tracing::info!(cluster = %cluster, site = %part.site_name, available, "hold denied");
                part.state = PartState::Released;
                part.deadline_ms = None;
                master.denied_free.insert(from, available);
            }
            (PartState::Reserving, ClusterMsg::Refused { reason, .. }) => {
                tracing::warn!(cluster = %cluster, site = %part.site_name, %reason, "reserve refused");
                part.state = PartState::Released;
                part.deadline_ms = None;
                master.excluded.insert(from);
            }
            // An acknowledgement of an older list (delayed, or overtaken by
            // a newer commit) waits for the newer one's.
            (PartState::Committing, ClusterMsg::Committed { epoch, .. })
                if epoch >= master_epoch =>
            {
                part.state = PartState::Committed;
                part.deadline_ms = None;
            }
            (PartState::Committing, ClusterMsg::Refused { reason, .. }) => {
                // The hold is gone (its lease ran out): re-plan its nodes.
                tracing::warn!(cluster = %cluster, site = %part.site_name, %reason, "commit refused; re-planning");
                part.state = PartState::Released;
                part.deadline_ms = None;
                master.excluded.insert(from);
            }
            (PartState::Releasing, ClusterMsg::Released { .. } | ClusterMsg::Refused { .. }) => {
                part.state = PartState::Released;
                part.deadline_ms = None;
            }
            (PartState::Releasing | PartState::Released, ClusterMsg::Held { .. }) => {
                // A reordered hold after our release: release it again.
                self.transmits.push_back((
                    from,
                    ClusterMsg::Release {
                        cluster: cluster.clone(),
                        attempt,
                    },
                ));
            }
            _ => {}
        }
        self.advance(ledger, Some(sites), &cluster, now_ms)
    }

    /// Timers: retries, give-ups, deadlines.
    pub fn handle_timeout(
        &mut self,
        ledger: &mut Ledger,
        sites: &dyn SiteDirectory,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        self.saw_time(now_ms);
        let due: Vec<String> = self
            .masters
            .values()
            .filter(|m| {
                (m.collecting() && m.reserve_deadline_ms <= now_ms)
                    || m.parts
                        .iter()
                        .any(|p| p.deadline_ms.is_some_and(|at| at <= now_ms))
            })
            .map(|m| m.id.clone())
            .collect();
        for id in due {
            let config = self.config.clone();
            let master = self.masters.get_mut(&id).expect("listed above");
            if master.state == ClusterState::Reserving && master.reserve_deadline_ms <= now_ms {
                fail(master, "timed out collecting holds");
            }
            if master.healing && master.reserve_deadline_ms <= now_ms {
                stop_healing(
                    master,
                    "timed out collecting holds for the replacement nodes",
                );
            }
            let window_end = master.request.window.end_ms;
            // In a live cluster a commit carries a new list of parts to a
            // site that holds its nodes already (or a replacement's, whose
            // hold the commit decision made permanent): never given up on
            // for silence, which a partition explains as well as a death.
            // A dead site is declared lost by the watch and fenced.
            let live = matches!(
                master.state,
                ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
            );
            let shared = live_parts(record_parts(
                master,
                &self.local_name,
                &self.local,
                &self.gateway,
            ));
            let context = RequestContext {
                segment: master.segment,
                epoch: master.epoch,
                gateway: &self.gateway,
                parts: &shared,
            };
            for part in &mut master.parts {
                if part.deadline_ms.is_none_or(|at| at > now_ms) {
                    continue;
                }
                part.tries += 1;
                match part.state {
                    PartState::Reserving | PartState::Committing
                        if part.tries < config.tries_max =>
                    {
                        part.deadline_ms = Some(now_ms + config.request_timeout_ms);
                    }
                    PartState::Committing if live && now_ms < window_end => {
                        part.backoff_ms = (part.backoff_ms * 2)
                            .clamp(config.request_timeout_ms, config.release_backoff_max_ms);
                        part.deadline_ms = Some(now_ms + part.backoff_ms);
                    }
                    PartState::Committing if live => {
                        // The window is over: the site ends its part itself.
                        part.state = PartState::Released;
                        part.deadline_ms = None;
                    }
                    PartState::Reserving | PartState::Committing => {
                        tracing::warn!(cluster = %id, site = %part.site_name, state = %part.state, "no answer; giving the site up");
                        master.excluded.insert(part.peer);
                        start_release(part, now_ms);
                    }
                    PartState::Releasing if now_ms >= window_end => {
                        // A worker keeps committed nodes until the window
                        // ends; after that there is nothing left to release.
                        part.state = PartState::Released;
                        part.deadline_ms = None;
                    }
                    PartState::Releasing => {
                        part.backoff_ms = (part.backoff_ms * 2)
                            .clamp(config.request_timeout_ms, config.release_backoff_max_ms);
                        part.deadline_ms = Some(now_ms + part.backoff_ms);
                    }
                    PartState::Held | PartState::Committed | PartState::Released => {
                        part.deadline_ms = None
                    }
                }
                if part.deadline_ms.is_some() {
                    let msg = request_for(&id, &master.request, part, &config, &context);
                    self.transmits.push_back((part.peer, msg));
                }
            }
            self.advance(ledger, Some(sites), &id, now_ms)?;
        }
        // The watch last: what settled above is watched from now on. A
        // second pass sees what the first settled (a loss only recorded,
        // by `none`), and finds nothing more to do.
        for _ in 0..2 {
            if self.watch_at_ms.is_some_and(|at| at <= now_ms) {
                self.watch(ledger, sites, now_ms)?;
            }
        }
        Ok(())
    }

    /// Assigns `missing` nodes to candidates (fewest sites first) and sends
    /// the reserves; false if the candidates cannot cover them.
    fn plan(
        &mut self,
        master: &mut Master,
        sites: &dyn SiteDirectory,
        missing: u32,
        now_ms: i64,
    ) -> bool {
        // Replacement nodes are reserved for what is left of the window.
        let mut window = master.request.window;
        if master.healing {
            window.start_ms = window.start_ms.max(now_ms).min(window.end_ms - 1);
        }
        let mut assigned: Vec<(PeerId, String, u32)> = Vec::new();
        let mut left = missing;
        for candidate in sites.candidates(window.start_ms, window.end_ms, &master.request.shape) {
            if left == 0 {
                break;
            }
            if candidate.site == self.local || master.excluded.contains(&candidate.site) {
                continue;
            }
            let attempts = master
                .parts
                .iter()
                .filter(|p| p.peer == candidate.site)
                .count();
            // Healing may go back to a site over a window's many rounds,
            // within a bound that keeps the record small.
            let attempts_max = if master.healing {
                self.config
                    .attempts_per_site_max
                    .saturating_mul(HEAL_ATTEMPTS_FACTOR)
            } else {
                self.config.attempts_per_site_max
            };
            if u32::try_from(attempts).unwrap_or(u32::MAX) >= attempts_max {
                continue;
            }
            let in_use: u32 = master
                .parts
                .iter()
                .filter(|p| p.peer == candidate.site && p.state != PartState::Released)
                .map(|p| p.nodes)
                .sum();
            let mut free = candidate.free;
            if let Some(denied) = master.denied_free.get(&candidate.site) {
                free = free.min(*denied);
            }
            let take = free.saturating_sub(in_use).min(left);
            if take > 0 {
                assigned.push((candidate.site, candidate.name, take));
                left -= take;
            }
        }
        if left > 0 {
            return false;
        }
        assert_eq!(
            assigned.iter().map(|(_, _, nodes)| nodes).sum::<u32>(),
            missing,
            "a plan places exactly the missing nodes"
        );
        for (peer, site_name, nodes) in assigned {
            let attempt = master
                .parts
                .iter()
                .filter(|p| p.peer == peer)
                .map(|p| p.attempt)
                .max()
                .unwrap_or(0)
                + 1;
            let part = RemotePart {
                site_name,
                peer,
                gateway: None,
                attempt,
                nodes,
                state: PartState::Reserving,
                deadline_ms: None,
                tries: 0,
                backoff_ms: 0,
                first_node: None,
                lost_at_ms: None,
                window,
            };
            master.parts.push(part);
        }
        true
    }

    /// Replacements the other sites cannot hold all: the master's own free
    /// slots take what they can (held in its ledger at once, for the rest
    /// of the window) and the other sites the rest. False, holding nothing,
    /// if that does not cover `missing` either.
    fn plan_with_own_slots(
        &mut self,
        master: &mut Master,
        sites: Option<&dyn SiteDirectory>,
        ledger: &mut Ledger,
        missing: u32,
        now_ms: i64,
    ) -> Result<bool, LedgerError> {
        let mut window = master.request.window;
        window.start_ms = window.start_ms.max(now_ms).min(window.end_ms - 1);
        let fits = ledger
            .inventory()?
            .is_some_and(|inventory| master.request.shape.fits_in(&inventory.node));
        let free = if fits {
            ledger.available(window, now_ms)?
        } else {
            0
        };
        let here = free.min(missing);
        if here == 0 {
            return Ok(false);
        }
        // The other sites must take the rest: asked on a copy first, so a
        // hold here is made only when it is of use.
        let rest = missing - here;
        if rest > 0 {
            let mut probe = master.clone();
            if !sites.is_some_and(|sites| self.plan(&mut probe, sites, rest, now_ms)) {
                return Ok(false);
            }
        }
        let attempt = master.extras.iter().map(|e| e.attempt).max().unwrap_or(0) + 1;
        let hold = HoldRequest {
            key: master.extra_key(attempt),
            cluster_id: master.id.clone(),
            requester: self.local.to_string(),
            window,
            nodes: here,
            shape: master.request.shape,
            lease_ms: self.config.reserve_deadline_ms + self.config.lease_ms,
        };
        // The attempt is used up whatever comes of it: a key is never held
        // twice.
        let mut extra = LocalExtra {
            attempt,
            nodes: here,
            state: PartState::Released,
            first_node: None,
        };
        let held = match ledger.hold(&hold, now_ms) {
            Ok(outcome) => matches!(outcome, HoldOutcome::Held(_)),
            Err(
                e @ (LedgerError::Invalid(_)
                | LedgerError::KeyConflict(_)
                | LedgerError::WrongState { .. }),
            ) => {
                tracing::warn!(cluster = %master.id, error = %e, "no replacement hold in this site's own slots");
                false
            }
            Err(e) => return Err(e),
        };
        if !held {
            master.extras.push(extra);
            return Ok(false);
        }
        if rest > 0 && !sites.is_some_and(|sites| self.plan(master, sites, rest, now_ms)) {
            ledger.release(&hold.key, &hold.requester, now_ms)?;
            master.extras.push(extra);
            return Ok(false);
        }
        tracing::info!(cluster = %master.id, here, elsewhere = rest, "replacement nodes in this site's own free slots");
        extra.state = PartState::Held;
        master.extras.push(extra);
        Ok(true)
    }

    /// Moves a master forward after any change, persists it, and sends what
    /// follows from the persisted state.
    pub(super) fn advance(
        &mut self,
        ledger: &mut Ledger,
        sites: Option<&dyn SiteDirectory>,
        id: &str,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let Some(mut master) = self.masters.remove(id) else {
            return Ok(());
        };
        if master.collecting() {
            let nodes = master.request.nodes;
            let (covered, pending) = (master.covered(), master.pending());
            // Paired with `plan`, which asks only for what is missing, and
            // with late answers of given-up parts, which stay released: a
            // master never takes more nodes than asked (simnet checks it
            // from outside, at every step).
            assert!(
                covered + pending <= nodes,
                "cluster {id}: {covered} nodes covered and {pending} pending of {nodes}"
            );
            if covered + pending < nodes {
                let missing = nodes - covered - pending;
                let mut planned =
                    sites.is_some_and(|sites| self.plan(&mut master, sites, missing, now_ms));
                if !planned && master.healing {
                    planned =
                        self.plan_with_own_slots(&mut master, sites, ledger, missing, now_ms)?;
                }
                if !planned && master.healing {
                    stop_healing(
                        &mut master,
                        "not enough free nodes in the federation for the replacement nodes",
                    );
                } else if !planned {
                    fail(
                        &mut master,
                        "not enough free nodes left in the federation after denials and timeouts",
                    );
                }
            }
            // Planning may have covered it all at once (the master's own
            // slots need no answer): decide now then.
            if master.collecting() && master.covered() == nodes && master.pending() == 0 {
                // Decide the commit: every hold moves to committing together.
                // Parts committed in an earlier round (before a site was
                // given up and replaced) are committed again: the Commit
                // carries the final list of parts, from which every site
                // numbers the nodes and builds its tunnels.
                // Any part that was sent a list before gets the new one under
                // a new epoch (at once, even while its last answer is due).
                let replanned = master.parts.iter().any(|p| p.state == PartState::Held)
                    && master.parts.iter().any(|p| {
                        matches!(p.state, PartState::Committed | PartState::Committing)
                            && p.lost_at_ms.is_none()
                    });
                if replanned {
                    master.recommit_committed();
                }
                for part in &mut master.parts {
                    if part.state == PartState::Held {
                        part.state = PartState::Committing;
                        part.deadline_ms = None;
                    }
                }
                let owner = self.local.to_string();
                for index in 0..master.extras.len() {
                    if master.extras[index].state != PartState::Held {
                        continue;
                    }
                    let key = master.extra_key(master.extras[index].attempt);
                    master.extras[index].state = match ledger.commit(&key, &owner, now_ms) {
                        Ok(_) => PartState::Committed,
                        Err(e) => {
                            tracing::warn!(cluster = %id, error = %e, "the master's own replacement hold could not be committed");
                            PartState::Released
                        }
                    };
                }
                master.number_parts(&self.local_name);
                if master.local_state == PartState::Held {
                    match ledger.commit(&master.local_key(), &self.local.to_string(), now_ms) {
                        Ok(_) => master.local_state = PartState::Committed,
                        Err(e) => {
                            tracing::warn!(cluster = %id, error = %e, "the master's own hold could not be committed");
                            master.local_state = PartState::Released;
                            fail(
                                &mut master,
                                "the master's own hold expired before the commit",
                            );
                        }
                    }
                }
                // Parts still being released (sites given up on) are not part
                // of the cluster: their release is retried on its own and must
                // not keep the cluster from being reserved (else the reserve
                // deadline would fail a cluster whose nodes are all committed).
                let all_committed = !master
                    .parts
                    .iter()
                    .any(|p| p.state == PartState::Committing);
                if master.state == ClusterState::Reserving && all_committed {
                    master.state = ClusterState::Reserved;
                    tracing::info!(cluster = %id, "cluster reserved");
                }
                // The replacement is decided: its commits are retried until
                // answered, and the watch sees the cluster's sites again.
                if master.healing {
                    master.healing = false;
                    self.healed(ledger, &master, now_ms)?;
                }
            }
        }
        if matches!(master.state, ClusterState::Failed | ClusterState::Stopping)
            && master.local_state != PartState::Released
        {
            ledger.release(&master.local_key(), &self.local.to_string(), now_ms)?;
            master.local_state = PartState::Released;
        }
        // The master's own extra parts are released in its ledger at once:
        // with the cluster, or when a round of replacements gave them up.
        let ending = matches!(master.state, ClusterState::Failed | ClusterState::Stopping);
        for index in 0..master.extras.len() {
            let extra = &master.extras[index];
            if extra.state == PartState::Releasing || (ending && extra.state != PartState::Released)
            {
                let key = master.extra_key(extra.attempt);
                ledger.release(&key, &self.local.to_string(), now_ms)?;
                master.extras[index].state = PartState::Released;
            }
        }
        if master.state == ClusterState::Stopping && master.all_released() {
            master.state = ClusterState::Finished;
        }

        // Persist before sending anything that follows from this state.
        let parts = record_parts(&master, &self.local_name, &self.local, &self.gateway);
        let state = stored_state(ledger, id, master.state)?;
        ledger.update_cluster_epoch(
            id,
            state,
            master.reason.as_deref(),
            Some(master.epoch),
            Some(&parts),
            now_ms,
        )?;

        // Nodes of a site whose numbered parts all left a live cluster
        // (fenced, refused at the commit, given up) are the cluster's no
        // more: their last reported states go.
        if matches!(
            master.state,
            ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
        ) {
            let gone = master.sites_out();
            if !gone.is_empty() {
                let stored = ledger.nodes(id)?;
                for site in gone
                    .iter()
                    .filter(|site| stored.iter().any(|n| &n.site == *site))
                {
                    ledger.set_nodes(id, site, &[])?;
                }
            }
        }
        let shared = live_parts(parts);
        let context = RequestContext {
            segment: master.segment,
            epoch: master.epoch,
            gateway: &self.gateway,
            parts: &shared,
        };
        for part in &mut master.parts {
            let needs_send = matches!(
                part.state,
                PartState::Reserving | PartState::Committing | PartState::Releasing
            ) && part.deadline_ms.is_none();
            if needs_send {
                part.deadline_ms = Some(now_ms + self.config.request_timeout_ms);
                part.tries = 0;
                self.transmits.push_back((
                    part.peer,
                    request_for(id, &master.request, part, &self.config, &context),
                ));
            }
        }
        let settled = match master.state {
            ClusterState::Reserved | ClusterState::Starting | ClusterState::Running => {
                !master.healing
                    && master
                        .parts
                        .iter()
                        .all(|p| matches!(p.state, PartState::Committed | PartState::Released))
            }
            ClusterState::Failed | ClusterState::Finished => master.all_released(),
            _ => false,
        };
        if settled {
            tracing::info!(cluster = %id, state = %master.state, "cluster settled");
            self.watch_settled(&master, now_ms);
        } else {
            self.refresh_watch(&master, now_ms);
            self.masters.insert(id.to_owned(), master);
        }
        Ok(())
    }

    /// Whether this site committed the part (cluster, attempt) of `from` —
    /// used for late answers to clusters no longer in flight.
    fn is_committed_part(
        &self,
        ledger: &Ledger,
        cluster: &str,
        from: &PeerId,
        attempt: u32,
    ) -> Result<bool, LedgerError> {
        let Some(record) = ledger.cluster(cluster)? else {
            return Ok(false);
        };
        let from = from.to_string();
        Ok(record.parts.iter().any(|p| {
            p.peer_id.as_deref() == Some(from.as_str())
                && p.attempt == attempt
                && p.state == PartState::Committed
        }))
    }
}

/// The refusal for a request that needs other sites while the view is
/// still warming up after a start: "not heard from the federation yet",
/// not "the federation is full".
fn not_ready(sites: &dyn SiteDirectory, now_ms: i64) -> Option<CreateError> {
    let warming = sites.warming(now_ms)?;
    let wait_ms = warming.until_ms.saturating_sub(now_ms).max(1);
    Some(CreateError::NotReady {
        warming,
        retry_after_s: u64::try_from(wait_ms).map_or(1, |ms| ms.div_ceil(1000)),
    })
}

fn fail(master: &mut Master, reason: &str) {
    if master.state.is_terminal() || master.state == ClusterState::Stopping {
        return;
    }
    tracing::warn!(cluster = %master.id, %reason, "cluster failed; releasing every part");
    master.state = ClusterState::Failed;
    master.reason = Some(reason.to_owned());
    release_everything(master);
}

/// Moves every part that may hold something to `releasing`.
fn release_everything(master: &mut Master) {
    for part in &mut master.parts {
        if part.state != PartState::Released && part.state != PartState::Releasing {
            part.state = PartState::Releasing;
            part.deadline_ms = None;
            part.tries = 0;
        }
    }
}

pub(super) fn start_release(part: &mut RemotePart, _now_ms: i64) {
    part.state = PartState::Releasing;
    part.deadline_ms = None;
    part.tries = 0;
    part.backoff_ms = 0;
}

/// Ends a round of reserving replacement nodes that cannot finish: what
/// is held or asked for is released, and the cluster stays short until the
/// watch tries again.
pub(super) fn stop_healing(master: &mut Master, reason: &str) {
    tracing::warn!(cluster = %master.id, %reason, "the cluster stays short for now");
    master.healing = false;
    for part in &mut master.parts {
        if matches!(part.state, PartState::Reserving | PartState::Held) {
            start_release(part, 0);
        }
    }
    for extra in &mut master.extras {
        if extra.state == PartState::Held {
            extra.state = PartState::Releasing;
        }
    }
}

/// What a request to a worker carries besides the part itself.
struct RequestContext<'a> {
    segment: u32,
    epoch: u32,
    gateway: &'a Option<GatewayRef>,
    /// The cluster's parts that hold or will hold nodes (for `Commit`).
    parts: &'a [ClusterPart],
}

/// The message a part in its current state is waiting on.
fn request_for(
    id: &str,
    request: &ClusterRequest,
    part: &RemotePart,
    config: &ClusterConfig,
    context: &RequestContext<'_>,
) -> ClusterMsg {
    match part.state {
        PartState::Reserving => ClusterMsg::Reserve {
            cluster: id.to_owned(),
            name: request.name.clone(),
            attempt: part.attempt,
            nodes: part.nodes,
            shape: request.shape,
            window: part.window,
            lease_ms: config.lease_ms,
            segment: context.segment,
            gateway: context.gateway.clone(),
        },
        PartState::Committing => ClusterMsg::Commit {
            cluster: id.to_owned(),
            name: request.name.clone(),
            nodes: request.nodes,
            attempt: part.attempt,
            segment: context.segment,
            epoch: context.epoch,
            parts: context.parts.to_vec(),
        },
        _ => ClusterMsg::Release {
            cluster: id.to_owned(),
            attempt: part.attempt,
        },
    }
}

fn record_parts(
    master: &Master,
    local_name: &str,
    local: &PeerId,
    gateway: &Option<GatewayRef>,
) -> Vec<ClusterPart> {
    let mut parts = vec![ClusterPart {
        site: local_name.to_owned(),
        peer_id: Some(local.to_string()),
        attempt: 0,
        nodes: master.local_nodes,
        frontend: true,
        state: master.local_state,
        reservation_key: Some(master.local_key()),
        gateway: gateway.clone(),
        first_node: master.local_first,
        lost_at_ms: None,
    }];
    parts.extend(master.extras.iter().map(|e| ClusterPart {
        site: local_name.to_owned(),
        peer_id: Some(local.to_string()),
        attempt: e.attempt,
        nodes: e.nodes,
        frontend: false,
        state: e.state,
        reservation_key: Some(master.extra_key(e.attempt)),
        gateway: gateway.clone(),
        first_node: e.first_node,
        lost_at_ms: None,
    }));
    parts.extend(master.parts.iter().map(|p| ClusterPart {
        site: p.site_name.clone(),
        peer_id: Some(p.peer.to_string()),
        attempt: p.attempt,
        nodes: p.nodes,
        frontend: false,
        state: p.state,
        reservation_key: Some(format!("{}/{}", master.id, p.attempt)),
        gateway: p.gateway.clone(),
        first_node: p.first_node,
        lost_at_ms: p.lost_at_ms,
    }));
    parts
}

/// The parts a commit lists: those committed or whose commit was decided
/// (never a hold still being asked for, which may come to nothing).
fn live_parts(parts: Vec<ClusterPart>) -> Vec<ClusterPart> {
    parts
        .into_iter()
        .filter(|p| crate::lifecycle::in_cluster(p.state))
        .collect()
}

/// Rebuilds the in-memory state of a mastered cluster from its record.
pub(super) fn master_from_record(
    record: &ClusterRecord,
    now_ms: i64,
    config: &ClusterConfig,
) -> Option<Master> {
    let request: ClusterRequest = serde_json::from_value(record.request.clone()).ok()?;
    let local = record.parts.iter().find(|p| p.frontend && p.attempt == 0)?;
    // The master's own parts besides the first: same peer id (or, without
    // one, same site name).
    let own = |p: &ClusterPart| match (&p.peer_id, &local.peer_id) {
        (Some(a), Some(b)) => a == b,
        _ => p.site == local.site,
    };
    let extras = record
        .parts
        .iter()
        .filter(|p| !(p.frontend && p.attempt == 0) && own(p))
        .map(|p| LocalExtra {
            attempt: p.attempt,
            nodes: p.nodes,
            state: p.state,
            first_node: p.first_node,
        })
        .collect();
    let parts = record
        .parts
        .iter()
        .filter(|p| !own(p))
        .filter_map(|p| {
            Some(RemotePart {
                site_name: p.site.clone(),
                peer: p.peer_id.as_deref()?.parse().ok()?,
                gateway: p.gateway.clone(),
                attempt: p.attempt,
                nodes: p.nodes,
                state: p.state,
                deadline_ms: None,
                tries: 0,
                backoff_ms: 0,
                first_node: p.first_node,
                lost_at_ms: p.lost_at_ms,
                window: request.window,
            })
        })
        .collect();
    let mut master = Master {
        id: record.id.clone(),
        segment: record.segment.unwrap_or_else(|| segment_for(&record.id)),
        request,
        state: record.state,
        reason: record.reason.clone(),
        local_nodes: local.nodes,
        local_state: local.state,
        parts,
        excluded: BTreeSet::new(),
        denied_free: BTreeMap::new(),
        reserve_deadline_ms: now_ms + config.reserve_deadline_ms,
        local_first: local.first_node,
        epoch: record.epoch,
        healing: false,
        extras,
    };
    let live = matches!(
        record.state,
        ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
    );
    // A cluster committed before numbers were stored (a ledger from before
    // epochs): its parts get the numbers every site derived then, so that
    // fencing a part renumbers nobody.
    if live && record.parts.iter().all(|p| p.first_node.is_none()) {
        let mut committed: Vec<&ClusterPart> = record
            .parts
            .iter()
            .filter(|p| crate::lifecycle::in_cluster(p.state))
            .collect();
        committed.sort_by(|a, b| (&a.site, a.attempt).cmp(&(&b.site, b.attempt)));
        let firsts = crate::lifecycle::first_numbers(&committed);
        for (part, first) in committed.into_iter().zip(firsts) {
            if part.frontend && part.attempt == 0 {
                master.local_first = Some(first);
            } else if own(part) {
                let extra = master.extras.iter_mut().find(|e| e.attempt == part.attempt);
                if let Some(extra) = extra {
                    extra.first_node = Some(first);
                }
            } else if let Some(remote) = master.parts.iter_mut().find(|r| {
                part.peer_id.as_deref() == Some(r.peer.to_string().as_str())
                    && r.attempt == part.attempt
            }) {
                remote.first_node = Some(first);
            }
        }
    }
    Some(master)
}
