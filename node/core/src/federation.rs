//! Federation glue: what a site's shell does between the registry's gossip
//! core, the cluster core and the ledger, written once for the agent's
//! libp2p shell and for simnet.
//!
//! - which capacity the site advertises, and until when that answer holds
//!   ([`advert_capacity`]);
//! - which messages are the cluster core's and which the registry's
//!   ([`cluster_payload`]), and which cluster messages move capacity
//!   ([`moves_capacity`]);
//! - when the local advert is recomputed ([`AdvertTimer`]: coalesced after a
//!   ledger write, and when the last answer stops holding);
//! - that a version not on disk is never published ([`PublishGate`]);
//! - the timing both shells share: advert coalescing, request timeout;
//! - [`Federation`]: the site's federation state machine that puts these
//!   together around the registry core and the cluster core, with one
//!   `handle_*` / `poll_*` surface.
//!
//! # Contract of [`Federation`]
//!
//! Sans-IO like the cores it holds: every input takes `now_ms` from the
//! shell's clock and, where the ledger is involved, a [`LedgerAccess`].
//! After every input the shell calls [`Federation::drain`], then takes
//! [`Federation::poll_event`] until `None` (events first: they may say that
//! a version could not be persisted), then [`Federation::poll_transmit`]
//! until `None`, and sleeps until [`Federation::poll_timeout`] at the
//! latest. What the shell keeps is its own: transport (libp2p or the
//! simulated network), peers, dialling, sweeps of the ledger.

use std::collections::VecDeque;

use libp2p_identity::PeerId;
use vcfed_registry::advert::VerifiedAdvert;
use vcfed_registry::wire::{self, Message};
use vcfed_registry::{
    CapacitySummary, GatewayInfo, LocalAdvert, Registry, RegistryEvent, Transmit, Verdict,
};
use vcfed_storage::{ClusterRecord, Ledger, LedgerError, Window};

use crate::cluster::{
    ClusterCore, ClusterMsg, ClusterRequest, CreateError, DeleteError, ForgetError, ReportedNode,
};
use crate::ledger::LedgerAccess;

/// Gossipsub topic of capacity adverts.
pub const ADVERT_TOPIC: &str = "vcfed/adverts/1";
/// Largest federation message, bytes.
pub const MESSAGE_MAX_BYTES: usize = 1 << 20;
/// How far ahead a site advertises its free capacity.
pub const HORIZON_MS: i64 = 7 * 24 * 60 * 60 * 1000;
/// The advertised horizon ends on a multiple of this.
const HORIZON_ROUND_MS: i64 = 3_600_000;
/// Capacity changes closer together than this are advertised once.
pub const ADVERT_COALESCE_MS: i64 = 200;
/// How long a federation request may take before it is given up.
pub const REQUEST_TIMEOUT_MS: i64 = 10_000;

/// The software a site advertises.
pub fn software() -> String {
    format!("vcfed/{}", env!("CARGO_PKG_VERSION"))
}

/// When the local advert is to be recomputed from the ledger: soon after a
/// write that may have changed the site's reservations (writes in a burst
/// share one recomputation, [`ADVERT_COALESCE_MS`] after the first), and
/// when the last answer of [`advert_capacity`] stops holding. Times are the
/// shell's clock, ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertTimer {
    /// When a coalesced change is to be advertised.
    change_due_ms: Option<i64>,
    /// When the last recomputation stops holding.
    valid_until_ms: i64,
}

impl AdvertTimer {
    /// A timer that wants a recomputation at `now_ms`.
    pub fn new(now_ms: i64) -> AdvertTimer {
        AdvertTimer {
            change_due_ms: None,
            valid_until_ms: now_ms,
        }
    }

    /// The ledger changed in a way that may move capacity.
    pub fn capacity_changed(&mut self, now_ms: i64) {
        if self.change_due_ms.is_none() {
            self.change_due_ms = Some(now_ms + ADVERT_COALESCE_MS);
        }
    }

    /// Whether the advert is to be recomputed at `now_ms`. A `true` takes
    /// the pending change with it: the recomputation includes it.
    pub fn take_due(&mut self, now_ms: i64) -> bool {
        let change_due = self.change_due_ms.is_some_and(|at| at <= now_ms);
        if change_due || self.valid_until_ms <= now_ms {
            self.change_due_ms = None;
            return true;
        }
        false
    }

    /// The advert was recomputed; it holds until `valid_until_ms`.
    pub fn recomputed(&mut self, valid_until_ms: i64) {
        self.valid_until_ms = valid_until_ms;
    }

    /// When a coalesced change is due, if one is pending.
    pub fn change_due_ms(&self) -> Option<i64> {
        self.change_due_ms
    }

    /// When the last recomputation stops holding.
    pub fn valid_until_ms(&self) -> i64 {
        self.valid_until_ms
    }
}

/// Keeps an advert version that is not on disk from being published: after
/// a restart the site would reuse it, and receivers would ignore the new
/// advert as a duplicate. The registry core emits
/// `RegistryEvent::PersistVersion` before the publish it belongs to; a
/// shell persists it through the gate while draining events, then asks the
/// gate about each transmit. One gate per drain.
#[derive(Debug, Default)]
pub struct PublishGate {
    unsaved: bool,
}

impl PublishGate {
    /// Takes the outcome of writing a `PersistVersion` event's version to
    /// the ledger ([`Ledger::set_advert_version`]); a failure closes the
    /// gate for the publishes of this drain.
    pub fn persisted<E>(&mut self, written: Result<(), E>) -> Result<(), E> {
        if written.is_err() {
            self.unsaved = true;
        }
        written
    }

    /// Whether `transmit` may go out.
    pub fn allows(&self, transmit: &Transmit) -> bool {
        !(self.unsaved && matches!(transmit, Transmit::Publish { .. }))
    }
}

/// Whether handling `msg` may change this site's reservations, and so its
/// advert: every cluster message but node reports, which only the master
/// stores and which move no capacity.
pub fn moves_capacity(msg: &ClusterMsg) -> bool {
    !matches!(
        msg,
        ClusterMsg::Nodes { .. } | ClusterMsg::NodesNoted { .. }
    )
}

/// The cluster message inside a federation message, if that is what it is.
/// Anything else is left for the registry, which decodes it itself:
/// [`wire::decode_cluster`] reads only its head.
pub fn cluster_payload(data: &[u8]) -> Option<ClusterMsg> {
    let inner = wire::decode_cluster(data, MESSAGE_MAX_BYTES)?;
    let msg = ClusterMsg::decode(&inner);
    if msg.is_none() {
        tracing::debug!("dropping an undecodable cluster message");
    }
    msg
}

/// What the site advertises besides its capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSite {
    /// The site's name.
    pub name: String,
    /// Its gateway, if it has one.
    pub gateway: Option<GatewayInfo>,
    /// Addresses other sites may dial, best first.
    pub addrs: Vec<String>,
}

/// What the federation asks its shell to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// Publish to every member (gossip).
    Publish(Vec<u8>),
    /// A request to one site; its answer goes to
    /// [`Federation::handle_response`].
    Request {
        /// The site.
        to: PeerId,
        /// The encoded federation message.
        data: Vec<u8>,
        /// Whose request it is: `"registry"`, or the cluster message's
        /// [`ClusterMsg::label`] (for counters).
        label: &'static str,
    },
}

/// What happened, for the shell to act on or log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FederationEvent {
    /// The registry core's event (never `PersistVersion`: the federation
    /// persists versions itself).
    Registry(RegistryEvent),
    /// An advert version was persisted and may be published.
    Published {
        /// The version.
        version: u64,
    },
    /// An advert version could not be persisted: this drain publishes
    /// nothing, and the next change tries again.
    PersistFailed {
        /// The version.
        version: u64,
        /// Why.
        error: String,
    },
}

/// The site's federation state machine: the registry core and the cluster
/// core with the glue between them and the ledger. See the module docs
/// for the contract.
#[derive(Debug)]
pub struct Federation {
    registry: Registry,
    cluster: ClusterCore,
    local: LocalSite,
    advert: AdvertTimer,
    /// Longest the advert goes without a recomputation, however long
    /// [`advert_capacity`] says it holds (`None`: no bound).
    recompute_max_ms: Option<i64>,
    events: VecDeque<FederationEvent>,
    transmits: VecDeque<Outgoing>,
}

impl Federation {
    /// The federation of a site around its `registry` and `cluster` cores;
    /// it computes its first advert at `now_ms`.
    pub fn new(
        registry: Registry,
        cluster: ClusterCore,
        local: LocalSite,
        recompute_max_ms: Option<i64>,
        now_ms: i64,
    ) -> Federation {
        Federation {
            registry,
            cluster,
            local,
            advert: AdvertTimer::new(now_ms),
            recompute_max_ms,
            events: VecDeque::new(),
            transmits: VecDeque::new(),
        }
    }

    /// The registry core (the view, peers, statistics).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry core, for transport events (peers connected, RTTs).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The cluster core.
    pub fn cluster(&self) -> &ClusterCore {
        &self.cluster
    }

    /// The addresses other sites may dial changed: advertised at the next
    /// recomputation, which this asks for now.
    pub fn set_addrs(&mut self, addrs: Vec<String>, ledger: &mut impl LedgerAccess, now_ms: i64) {
        self.local.addrs = addrs;
        self.refresh_advert(ledger, now_ms);
    }

    /// The ledger changed in a way that may move this site's capacity (a
    /// write the federation did not make, or one it made): the advert is
    /// recomputed soon, once for a burst.
    pub fn capacity_changed(&mut self, now_ms: i64) {
        self.advert.capacity_changed(now_ms);
    }

    /// A gossip message.
    pub fn handle_gossip(&mut self, now_ms: i64, data: &[u8]) -> Verdict {
        self.registry.handle_gossip(now_ms, data)
    }

    /// A gossip message whose advert a shell already verified (simnet's
    /// shared cache).
    pub fn handle_verified_advert(
        &mut self,
        now_ms: i64,
        advert: std::sync::Arc<VerifiedAdvert>,
    ) -> Verdict {
        self.registry.handle_verified_advert(now_ms, advert)
    }

    /// A request from site `from`: the answer to send back, if any.
    pub fn handle_request(
        &mut self,
        ledger: &mut impl LedgerAccess,
        now_ms: i64,
        from: PeerId,
        data: &[u8],
    ) -> Result<Option<Vec<u8>>, LedgerError> {
        match cluster_payload(data) {
            Some(msg) => Ok(self
                .handle_cluster_request(ledger, now_ms, from, msg)?
                .map(|answer| wire::encode(&Message::Cluster(answer.encode())))),
            None => Ok(self.registry.handle_request(now_ms, from, data)),
        }
    }

    /// A cluster request from site `from`, already decoded: this site as a
    /// worker (or, for node reports, as a master).
    pub fn handle_cluster_request(
        &mut self,
        ledger: &mut impl LedgerAccess,
        now_ms: i64,
        from: PeerId,
        msg: ClusterMsg,
    ) -> Result<Option<ClusterMsg>, LedgerError> {
        let moves = moves_capacity(&msg);
        let (cluster, registry) = (&mut self.cluster, &self.registry);
        let answer =
            ledger.with(|ledger| cluster.handle_request(ledger, registry, now_ms, from, msg));
        if moves {
            self.capacity_changed(now_ms);
        }
        answer
    }

    /// The answer of site `from` to one of this site's requests. Returns
    /// whether it was a cluster answer that may have changed reservations
    /// or cluster records.
    pub fn handle_response(
        &mut self,
        ledger: &mut impl LedgerAccess,
        now_ms: i64,
        from: PeerId,
        data: &[u8],
    ) -> Result<bool, LedgerError> {
        let Some(msg) = cluster_payload(data) else {
            self.registry.handle_response(now_ms, from, data);
            return Ok(false);
        };
        let moves = moves_capacity(&msg);
        let (cluster, registry) = (&mut self.cluster, &self.registry);
        let handled =
            ledger.with(|ledger| cluster.handle_reply(ledger, registry, now_ms, from, msg));
        if moves {
            self.capacity_changed(now_ms);
        }
        handled.map(|()| moves)
    }

    /// Asks for a cluster at this site (it becomes the master if it cannot
    /// hold it alone).
    pub fn create(
        &mut self,
        ledger: &mut impl LedgerAccess,
        now_ms: i64,
        id: String,
        request: ClusterRequest,
    ) -> Result<ClusterRecord, CreateError> {
        let (cluster, registry) = (&mut self.cluster, &self.registry);
        let created = ledger.with(|ledger| cluster.create(ledger, registry, now_ms, id, request));
        self.capacity_changed(now_ms);
        created
    }

    /// Deletes a cluster this site masters.
    pub fn delete(
        &mut self,
        ledger: &mut impl LedgerAccess,
        now_ms: i64,
        id: &str,
    ) -> Result<ClusterRecord, DeleteError> {
        let cluster = &mut self.cluster;
        let deleted = ledger.with(|ledger| cluster.delete(ledger, now_ms, id));
        self.capacity_changed(now_ms);
        deleted
    }

    /// Forgets a site that vanished (see [`ClusterCore::forget_site`]):
    /// with `force`, the parts it holds of live clusters mastered here end
    /// first; then it leaves the view and the remembered addresses.
    /// Returns the clusters whose parts ended.
    pub fn forget_site(
        &mut self,
        ledger: &mut impl LedgerAccess,
        now_ms: i64,
        site: &PeerId,
        force: bool,
    ) -> Result<Vec<String>, ForgetError> {
        let (cluster, registry) = (&mut self.cluster, &self.registry);
        let ended =
            ledger.with(|ledger| cluster.forget_site(ledger, registry, site, force, now_ms))?;
        self.registry.forget_site(site);
        ledger.with(|ledger| ledger.remove_peer(&site.to_string()))?;
        self.capacity_changed(now_ms);
        Ok(ended)
    }

    /// Sends a worker's node states of `cluster` to its master.
    pub fn report_nodes(
        &mut self,
        ledger: &mut impl LedgerAccess,
        cluster: &str,
        nodes: Vec<ReportedNode>,
    ) -> Result<bool, LedgerError> {
        let core = &mut self.cluster;
        ledger.with(|ledger| core.report_nodes(ledger, cluster, nodes))
    }

    /// Time passed: recomputes the advert if due, runs the registry's and
    /// the cluster core's timers that are due. Returns whether the cluster
    /// core's timers ran (they commit and release this site's own holds).
    pub fn handle_timeout(
        &mut self,
        ledger: &mut impl LedgerAccess,
        now_ms: i64,
    ) -> Result<bool, LedgerError> {
        if self.advert.take_due(now_ms) {
            self.refresh_advert(ledger, now_ms);
        }
        if self.registry.poll_timeout().is_some_and(|at| at <= now_ms) {
            self.registry.handle_timeout(now_ms);
        }
        if self.cluster.poll_timeout().is_none_or(|at| at > now_ms) {
            return Ok(false);
        }
        let (cluster, registry) = (&mut self.cluster, &self.registry);
        let ran = ledger.with(|ledger| cluster.handle_timeout(ledger, registry, now_ms));
        self.capacity_changed(now_ms);
        ran.map(|()| true)
    }

    /// The earliest instant at which [`Federation::handle_timeout`] has
    /// work.
    pub fn poll_timeout(&self) -> Option<i64> {
        [
            self.registry.poll_timeout(),
            self.cluster.poll_timeout(),
            self.advert.change_due_ms(),
            Some(self.advert.valid_until_ms()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// When the advert is to be recomputed next (a pending change, or the
    /// last answer running out).
    pub fn advert_due_ms(&self) -> i64 {
        self.advert
            .change_due_ms()
            .map_or(self.advert.valid_until_ms(), |due| {
                due.min(self.advert.valid_until_ms())
            })
    }

    /// Moves what the cores asked for into events and transmits, persisting
    /// advert versions before anything is published (see [`PublishGate`]).
    pub fn drain(&mut self, ledger: &mut impl LedgerAccess) {
        let mut gate = PublishGate::default();
        while let Some(event) = self.registry.poll_event() {
            let RegistryEvent::PersistVersion(version) = event else {
                if let RegistryEvent::SiteGone { site } = &event {
                    // The clusters this site masters may have lost one.
                    self.cluster.site_gone(site);
                }
                self.events.push_back(FederationEvent::Registry(event));
                continue;
            };
            let written = ledger.with(|ledger| ledger.set_advert_version(version));
            self.events.push_back(match gate.persisted(written) {
                Ok(()) => FederationEvent::Published { version },
                Err(e) => FederationEvent::PersistFailed {
                    version,
                    error: e.to_string(),
                },
            });
        }
        while let Some((to, msg)) = self.cluster.poll_transmit() {
            let label = msg.label();
            let data = wire::encode(&Message::Cluster(msg.encode()));
            self.transmits
                .push_back(Outgoing::Request { to, data, label });
        }
        while let Some(transmit) = self.registry.poll_transmit() {
            if !gate.allows(&transmit) {
                continue;
            }
            self.transmits.push_back(match transmit {
                Transmit::Publish { data } => Outgoing::Publish(data),
                Transmit::Request { to, data } => Outgoing::Request {
                    to,
                    data,
                    label: "registry",
                },
            });
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<FederationEvent> {
        let event = self.events.pop_front();
        if event.is_none() {
            release_burst(&mut self.events);
        }
        event
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        let outgoing = self.transmits.pop_front();
        if outgoing.is_none() {
            release_burst(&mut self.transmits);
        }
        outgoing
    }

    /// Recomputes the local advert from the ledger now (at start, and when
    /// [`Federation::handle_timeout`] finds it due); the registry publishes
    /// it only if it changed. A ledger that cannot be read is asked again
    /// after a second (at once would spin the shell).
    pub fn refresh_advert(&mut self, ledger: &mut impl LedgerAccess, now_ms: i64) {
        let cap = |until: i64| match self.recompute_max_ms {
            Some(max) => until.min(now_ms.saturating_add(max)),
            None => until,
        };
        let advert = match ledger.with(|ledger| advert_capacity(ledger, now_ms)) {
            Ok(Some(advert)) => advert,
            Ok(None) => {
                self.advert.recomputed(cap(i64::MAX));
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read capacity for the advert");
                self.advert
                    .recomputed(now_ms.saturating_add(ADVERT_RETRY_MS));
                return;
            }
        };
        self.advert.recomputed(cap(advert.valid_until_ms));
        self.registry.set_local(
            now_ms,
            LocalAdvert {
                site_name: self.local.name.clone(),
                capacity: advert.capacity,
                gateway: self.local.gateway.clone(),
                addrs: self.local.addrs.clone(),
                software: software(),
            },
        );
    }
}

/// Entries an empty queue keeps room for. A burst (the view an
/// anti-entropy answer brings: an event per site) grows a queue far beyond
/// that; a thousand sites in one simulation each keeping that room cost a
/// quarter of the run's memory.
const QUEUE_KEPT: usize = 32;

/// Gives back the room of a burst once `queue` is empty.
fn release_burst<T>(queue: &mut VecDeque<T>) {
    if queue.capacity() > QUEUE_KEPT {
        queue.shrink_to(QUEUE_KEPT);
    }
}

/// How soon the advert is computed again after the ledger could not be read.
const ADVERT_RETRY_MS: i64 = 1_000;

/// What a site advertises of its capacity (see [`advert_capacity`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AdvertCapacity {
    /// Free node slots over the horizon, as advertised.
    pub capacity: CapacitySummary,
    /// Until when the answer holds: asked again at any instant from the
    /// one asked until before this one, with no ledger write in between,
    /// [`advert_capacity`] gives the same capacity.
    pub valid_until_ms: i64,
}

/// What a site advertises of its capacity at `now_ms`, from its ledger:
/// free node slots over the next [`HORIZON_MS`] as steps, and until when
/// that holds (`None` before the site has an inventory).
pub fn advert_capacity(
    ledger: &Ledger,
    now_ms: i64,
) -> Result<Option<AdvertCapacity>, LedgerError> {
    let Some(inventory) = ledger.inventory()? else {
        return Ok(None);
    };
    let horizon_end_ms = round_up(now_ms + HORIZON_MS, HORIZON_ROUND_MS);
    let window = Window::new(now_ms, horizon_end_ms).expect("the horizon is in the future");
    let free = ledger.free_steps(window, now_ms)?;
    // Without a write, only the clock changes the answer, and only when
    // it reaches the second step (the first one then ends), moves the end
    // of the horizon on (at `horizon_end_ms - HORIZON_MS + 1`) or reaches
    // the end of a hold's lease (the hold then stops counting).
    let mut valid_until_ms = horizon_end_ms - HORIZON_MS + 1;
    if let Some(second) = free.get(1) {
        valid_until_ms = valid_until_ms.min(second.at_ms);
    }
    if let Some(lease_expires_at_ms) = ledger.next_lease_expiry(now_ms)? {
        valid_until_ms = valid_until_ms.min(lease_expires_at_ms);
    }
    debug_assert!(valid_until_ms > now_ms, "each bound is after now");
    // Each bound is after now; should one not be, asking again at once
    // would spin the shell.
    let valid_until_ms = valid_until_ms.max(now_ms + 1);
    // The first step holds from before now: anchoring it at 0 keeps the
    // advert unchanged (and unsent) while nothing but the clock moves.
    let mut steps: Vec<(i64, u32)> = free
        .into_iter()
        .map(|step| (step.at_ms, step.free))
        .collect();
    if let Some(first) = steps.first_mut() {
        first.0 = 0;
    }
    Ok(Some(AdvertCapacity {
        capacity: CapacitySummary {
            total_nodes: inventory.slots(),
            node: inventory.node,
            steps,
            horizon_end_ms,
        },
        valid_until_ms,
    }))
}

fn round_up(value: i64, unit: i64) -> i64 {
    value.div_euclid(unit) * unit + if value.rem_euclid(unit) == 0 { 0 } else { unit }
}

#[cfg(test)]
mod tests {
    #[test]
    fn advert_changes_in_a_burst_share_one_recomputation() {
        let mut timer = AdvertTimer::new(1_000);
        assert!(timer.take_due(1_000), "a new timer wants the first advert");
        timer.recomputed(60_000);
        assert!(!timer.take_due(1_001));
        timer.capacity_changed(2_000);
        timer.capacity_changed(2_150);
        assert_eq!(timer.change_due_ms(), Some(2_000 + ADVERT_COALESCE_MS));
        assert!(!timer.take_due(2_199));
        assert!(timer.take_due(2_200));
        assert_eq!(timer.change_due_ms(), None, "the recomputation took it");
        timer.recomputed(60_000);
        assert!(!timer.take_due(59_999));
        assert!(timer.take_due(60_000), "the answer stopped holding");
    }

    #[test]
    fn a_version_not_on_disk_is_never_published() {
        let publish = Transmit::Publish { data: vec![1] };
        let request = Transmit::Request {
            to: libp2p_identity::Keypair::generate_ed25519()
                .public()
                .to_peer_id(),
            data: vec![2],
        };
        let mut gate = PublishGate::default();
        gate.persisted::<()>(Ok(())).expect("written");
        assert!(gate.allows(&publish));
        assert!(gate.persisted(Err("disk full")).is_err());
        assert!(!gate.allows(&publish), "the gate closes on a failed write");
        assert!(gate.allows(&request), "requests carry no new version");
    }

    use vcfed_storage::{HoldOutcome, HoldRequest, Inventory, InventoryHost, Ledger};

    use super::*;

    const MINUTE_MS: i64 = 60_000;
    const DAY_MS: i64 = 24 * 60 * MINUTE_MS;

    /// splitmix64: enough randomness for the seeded cases below.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed)
        }

        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, bound: u64) -> u64 {
            self.next_u64() % bound
        }

        fn between(&mut self, lo: i64, hi: i64) -> i64 {
            lo + i64::try_from(self.below(hi.abs_diff(lo) + 1)).expect("a small span")
        }

        fn chance(&mut self, p: f64) -> bool {
            #[allow(clippy::cast_precision_loss)] // 53 random bits
            let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            unit < p
        }
    }
    const SLOT: vcfed_storage::NodeShape = vcfed_storage::NodeShape {
        cores: 2,
        memory_mib: 4096,
        disk_gib: 20,
    };

    fn inventory(slots: u32) -> Inventory {
        Inventory {
            node: SLOT,
            hosts: vec![InventoryHost {
                name: "nodes".into(),
                cores: SLOT.cores * slots,
                memory_mib: SLOT.memory_mib * u64::from(slots),
                disk_gib: SLOT.disk_gib * u64::from(slots),
                slots,
            }],
        }
    }

    /// A ledger written before `start_ms`: holds over windows near
    /// `start_ms` (where the walk below meets their steps) and up to past
    /// the horizon, with leases running out around `start_ms`; some
    /// committed, some released, and sometimes an inventory shrunk below
    /// what is booked (free slots then stay at 0 while usage changes).
    fn random_ledger(rng: &mut Rng, start_ms: i64) -> Ledger {
        let mut ledger = Ledger::open_in_memory().expect("an in-memory ledger opens");
        let slots = u32::try_from(rng.between(1, 12)).expect("a small number");
        ledger
            .set_inventory(&inventory(slots), start_ms - 2 * HORIZON_ROUND_MS)
            .expect("the inventory is written");
        for i in 0..rng.between(0, 24) {
            let written_ms = start_ms - rng.between(0, 10 * MINUTE_MS);
            let window_start_ms = if rng.chance(0.6) {
                start_ms + rng.between(-HORIZON_ROUND_MS, 3 * HORIZON_ROUND_MS)
            } else {
                start_ms + rng.between(0, HORIZON_MS + DAY_MS)
            };
            let request = HoldRequest {
                key: format!("k{i}"),
                cluster_id: format!("c{i}"),
                requester: "site-a".into(),
                window: Window::new(
                    window_start_ms,
                    window_start_ms + rng.between(MINUTE_MS, 2 * DAY_MS),
                )
                .expect("a window of at least a minute"),
                nodes: u32::try_from(rng.between(1, 4)).expect("a small number"),
                shape: SLOT,
                lease_ms: rng.between(1_000, 30 * MINUTE_MS),
            };
            let outcome = ledger.hold(&request, written_ms).expect("a valid hold");
            if matches!(outcome, HoldOutcome::Denied { .. }) {
                continue;
            }
            match rng.below(3) {
                0 => {
                    ledger
                        .commit(&request.key, &request.requester, written_ms)
                        .expect("a live hold commits");
                }
                1 if rng.chance(0.3) => {
                    ledger
                        .release(&request.key, &request.requester, written_ms)
                        .expect("a hold releases");
                }
                _ => {}
            }
        }
        if rng.chance(0.2) {
            let slots = u32::try_from(rng.between(1, 3)).expect("a small number");
            ledger
                .set_inventory(&inventory(slots), start_ms - MINUTE_MS)
                .expect("the inventory is written");
        }
        ledger
    }

    #[test]
    fn the_advert_stays_the_same_until_the_instant_it_names() {
        // The shells recompute the advert only at that instant (or after a
        // write): asked at any instant before it, `advert_capacity` must
        // answer exactly what it answered, else a change goes unadvertised.
        let mut changed_at_bound = 0;
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let start_ms = 1_750_000_000_000 + rng.between(0, DAY_MS);
            let ledger = random_ledger(&mut rng, start_ms);
            let mut now_ms = start_ms;
            for _ in 0..12 {
                let advert = advert_capacity(&ledger, now_ms)
                    .expect("the ledger reads")
                    .expect("the ledger has an inventory");
                let valid_until_ms = advert.valid_until_ms;
                assert!(valid_until_ms > now_ms, "seed {seed}: valid from {now_ms}");
                let mut probes = vec![now_ms + 1, valid_until_ms - 1];
                probes.extend((0..4).map(|_| rng.between(now_ms, valid_until_ms - 1)));
                for probe_ms in probes.into_iter().filter(|&at| at < valid_until_ms) {
                    let again = advert_capacity(&ledger, probe_ms)
                        .expect("the ledger reads")
                        .expect("the ledger has an inventory");
                    assert_eq!(
                        again, advert,
                        "seed {seed}: asked at {now_ms}, then at {probe_ms}"
                    );
                }
                let at_bound = advert_capacity(&ledger, valid_until_ms)
                    .expect("the ledger reads")
                    .expect("the ledger has an inventory");
                if at_bound.capacity != advert.capacity {
                    changed_at_bound += 1;
                }
                now_ms = valid_until_ms;
                if rng.chance(0.5) {
                    now_ms += rng.between(0, 5 * MINUTE_MS);
                }
            }
        }
        // The bounds are the instants of change, not needlessly early ones:
        // nearly all are where the advert does change (the others are
        // leases of holds outside the horizon, or steps hidden by an
        // overbooked inventory).
        assert!(changed_at_bound > 300 * 12 * 9 / 10, "{changed_at_bound}");
    }
}
