//! One simulated site: the production registry and cluster cores with an
//! in-memory ledger, wired the way the federation shell wires them.
//!
//! Most deliveries of a run are gossip duplicates that the seen cache drops
//! (every site hears each message from several mesh peers), so the cache
//! keeps its membership on the message, one bit per site (see
//! [`SeenCache`]), and a duplicate touches one line of the site
//! ([`DuplicatePath`]).

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use crate::{Ctx, Payload, SiteId, mix64};
use libp2p_identity::{Keypair, PeerId};
use vcfed_registry::advert::VerifiedAdvert;
use vcfed_registry::wire::{self, Message};
use vcfed_registry::{
    GatewayInfo, Registry, RegistryConfig, RegistryEvent, RegistryStats, Verdict,
};
use vcfed_storage::{
    GatewayRef, HoldRequest, Inventory, InventoryHost, Ledger, LedgerError, NodeShape, Window,
};

use vcfed_node_core::cluster::{
    ClusterConfig, ClusterCore, ClusterFault, ClusterMsg, ClusterRequest, Heal,
};
use vcfed_node_core::driver::sim::SimDriver;
use vcfed_node_core::federation::{
    Federation, FederationEvent, LocalSite, Outgoing, REQUEST_TIMEOUT_MS, cluster_payload,
    moves_capacity,
};
use vcfed_node_core::runner::{Runner, RunnerFault, TickReport};

use crate::dataplane::{DataPlane, SimPlane, key_of_site};

/// A simulated site's cluster runner: the site core's, with the `sim`
/// driver and the simulated data plane.
pub type SimRunner = Runner<SimDriver, SimPlane>;
/// Bytes on the wire of a connection being opened or closed (a libp2p
/// handshake or close, roughly).
const CONNECT_BYTES: usize = 64;
/// The reserve deadline of the planted bug `NoReserveDeadline`, ms.
const PLANTED_RESERVE_DEADLINE_MS: i64 = 24 * 3_600_000;
/// Gossip message ids remembered per site (gossipsub's seen cache).
const SEEN_MAX: usize = 65_536;
/// How long a gossip message id is remembered, ms (gossipsub's default).
const SEEN_TTL_MS: i64 = 120_000;

/// The node slot every simulated site offers.
pub fn slot() -> NodeShape {
    NodeShape {
        cores: 4,
        memory_mib: 8192,
        disk_gib: 40,
    }
}

/// What the simulated network carries between sites.
#[derive(Debug, Clone)]
pub enum FedMsg {
    /// A gossipsub message (published or forwarded), with its message id
    /// and how many hops it travelled.
    Gossip {
        /// Message id: a hash of the data (gossipsub's content addressing).
        id: u64,
        /// Hops from the publisher.
        hops: u16,
        /// The message, shared by every copy.
        data: Rc<Published>,
    },
    /// A request-response request.
    Request {
        /// Request id, unique per sender.
        id: u64,
        /// `registry`, or the kind of cluster message ([`ClusterMsg::label`]).
        label: &'static str,
        /// Encoded federation message.
        data: Vec<u8>,
        /// Fingerprint of the data.
        fingerprint: u64,
    },
    /// The answer to a request.
    Response {
        /// Id of the request.
        id: u64,
        /// `registry`, or the kind of cluster message ([`ClusterMsg::label`]).
        label: &'static str,
        /// Encoded federation message.
        data: Vec<u8>,
        /// Fingerprint of the data.
        fingerprint: u64,
    },
    /// A connection opened (a joining site dials a member, or a site it
    /// learned of): the receiver adds the sender to its gossip mesh and
    /// connected peers.
    Hello,
    /// A connection closed (a site leaves): the receiver drops the sender
    /// from its mesh and connected peers.
    Bye,
}

/// A published gossip message: its bytes, and the advert they decode to,
/// verified. Each site's registry would decode the same bytes to the same
/// advert (decoding is a pure function of the bytes, and verification goes
/// through the run's shared cache, which hands every site the same value),
/// so the publisher decodes once for all, and receivers apply the advert
/// with `Registry::handle_verified_advert`: in a run of n sites, decoding
/// each message n times had come to a tenth of the run's time.
#[derive(Debug)]
pub struct Published {
    bytes: Vec<u8>,
    /// `None`: not a valid advert (receivers then decode the bytes
    /// themselves, and refuse them as the registry does).
    advert: Option<Arc<VerifiedAdvert>>,
    /// One bit per site: whether the message is in that site's seen cache
    /// (kept by [`SeenCache`], and only by it).
    seen_by: Box<[Cell<u64>]>,
}

impl Published {
    fn new(bytes: Vec<u8>, settings: &SiteSettings, sites: usize) -> Published {
        let advert = match wire::decode(&bytes, settings.registry.message_max_bytes) {
            Ok(Message::Advert(signed)) => {
                vcfed_registry::advert::verify_with(settings.verifier.as_deref(), signed).ok()
            }
            _ => None,
        };
        Published {
            bytes,
            advert,
            seen_by: (0..sites.div_ceil(64)).map(|_| Cell::new(0)).collect(),
        }
    }

    /// Whether the message is in `site`'s seen cache.
    fn seen_by(&self, site: SiteId) -> bool {
        self.seen_by[site / 64].get() & (1 << (site % 64)) != 0
    }

    fn set_seen_by(&self, site: SiteId, seen: bool) {
        let word = &self.seen_by[site / 64];
        let bit = 1 << (site % 64);
        word.set(if seen {
            word.get() | bit
        } else {
            word.get() & !bit
        });
    }
}

/// A site's gossipsub seen cache: the messages it saw in the last
/// [`SEEN_TTL_MS`] (at most [`SEEN_MAX`]), oldest first, with when (local
/// ms).
///
/// Whether a message is in the cache is kept on the message itself
/// ([`Published::seen_by`]): most deliveries of a run are duplicates, and
/// the message being delivered is the one every site is handling right
/// then, so its bits are in cache where a per-site set is not. A message is
/// published once (its id is a hash of its bytes, and a site never signs
/// the same version twice), so one message object stands for one id. The
/// cache clears its bits when it is dropped (the site crashed or left).
struct SeenCache {
    site: SiteId,
    order: VecDeque<(i64, Rc<Published>)>,
}

impl SeenCache {
    fn new(site: SiteId) -> SeenCache {
        SeenCache {
            site,
            order: VecDeque::new(),
        }
    }

    /// Adds `message`, seen at `now`; a full cache forgets its oldest.
    fn remember(&mut self, message: &Rc<Published>, now: i64) {
        if self.order.len() >= SEEN_MAX
            && let Some((_, oldest)) = self.order.pop_front()
        {
            oldest.set_seen_by(self.site, false);
        }
        if !message.seen_by(self.site) {
            message.set_seen_by(self.site, true);
            self.order.push_back((now, message.clone()));
        }
    }

    /// Forgets what was seen [`SEEN_TTL_MS`] or longer before `now`.
    fn expire(&mut self, now: i64) {
        while let Some((at, _)) = self.order.front() {
            if at + SEEN_TTL_MS > now {
                break;
            }
            if let Some((_, message)) = self.order.pop_front() {
                message.set_seen_by(self.site, false);
            }
        }
    }
}

impl Drop for SeenCache {
    fn drop(&mut self) {
        for (_, message) in &self.order {
            message.set_seen_by(self.site, false);
        }
    }
}

/// What a duplicate gossip delivery touches of its site, on one cache
/// line: the count, and the memo of the wake-up the engine asks for after
/// every call.
#[derive(Debug, Default)]
#[repr(align(64))]
struct DuplicatePath {
    /// Gossip messages dropped as duplicates by the seen cache.
    duplicates: u64,
    /// What `poll_timeout` last answered, and whether the call since was a
    /// duplicate gossip message, which moves no timer.
    wake_memo: Cell<Option<i64>>,
    wake_unchanged: Cell<bool>,
}

impl Payload for FedMsg {
    fn wire_len(&self) -> usize {
        match self {
            FedMsg::Gossip { data, .. } => data.bytes.len(),
            FedMsg::Request { data, .. } | FedMsg::Response { data, .. } => data.len(),
            FedMsg::Hello | FedMsg::Bye => CONNECT_BYTES,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            FedMsg::Gossip { .. } => "gossip",
            FedMsg::Request {
                label: "registry", ..
            } => "anti-entropy-request",
            FedMsg::Response {
                label: "registry", ..
            } => "anti-entropy-response",
            FedMsg::Request { label, .. } | FedMsg::Response { label, .. } => label,
            FedMsg::Hello => "connect",
            FedMsg::Bye => "disconnect",
        }
    }

    fn fingerprint(&self) -> u64 {
        match self {
            FedMsg::Gossip { id, .. } => *id,
            FedMsg::Request {
                id, fingerprint, ..
            } => mix64(*id ^ fingerprint),
            FedMsg::Response {
                id, fingerprint, ..
            } => mix64(!*id ^ fingerprint),
            FedMsg::Hello => mix64(0x4E11_0000),
            FedMsg::Bye => mix64(0xB7E0_0000),
        }
    }
}

/// A cheap content hash: length and up to 64 bytes of each end (signatures
/// and ids live there), so that fingerprints cost the same for any size.
pub fn fingerprint(data: &[u8]) -> u64 {
    let mut hash = mix64(data.len() as u64);
    let head = &data[..data.len().min(64)];
    let tail = &data[data.len().saturating_sub(64)..];
    for chunk in head.chunks(8).chain(tail.chunks(8)) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        hash = mix64(hash ^ u64::from_le_bytes(word));
    }
    hash
}

/// A full content hash (FNV-1a then mixed): gossip message ids.
fn content_id(data: &[u8]) -> u64 {
    let hash = data.iter().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01B3)
    });
    mix64(hash)
}

/// Inputs from the workload.
#[derive(Debug, Clone)]
pub enum Input {
    /// A cluster request arrives at the site (which becomes its master).
    Create {
        /// Cluster id.
        id: String,
        /// Compute nodes.
        nodes: u32,
        /// Window start, ms after the site's now.
        start_in_ms: i64,
        /// Window length, ms.
        length_ms: i64,
        /// What the master does when a worker site is lost.
        heal: Heal,
    },
    /// A delete of a cluster this site masters.
    Delete {
        /// Cluster id.
        id: String,
    },
    /// The site joins the federation through `bootstrap`, a member (the
    /// operator gives the address of any member).
    Join {
        /// The member it dials first.
        bootstrap: SiteId,
    },
    /// The site leaves the federation for good: it closes its connections
    /// and stops.
    Leave,
}

/// A bug planted on purpose, to show that the invariants catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PlantedBug {
    /// Workers answer `Held` without holding anything, and on `Commit` book
    /// the nodes without checking capacity.
    CommitWithoutHold,
    /// The runner never frees a cluster's VLAN id when it stops the
    /// cluster (it skips `Ledger::end_run`).
    LeakVlan,
    /// Masters ignore their reserve deadline (their core runs with a day
    /// instead), and workers never answer a `Reserve`, so that masters try
    /// one site after another for longer than the deadline.
    NoReserveDeadline,
    /// Masters replace the nodes of a lost worker site without fencing its
    /// part first: the site stays in the cluster's segment.
    ReplaceWithoutFence,
}

impl PlantedBug {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::CommitWithoutHold => "commit-without-hold",
            PlantedBug::LeakVlan => "leak-vlan",
            PlantedBug::NoReserveDeadline => "no-reserve-deadline",
            PlantedBug::ReplaceWithoutFence => "replace-without-fence",
        }
    }

    /// Every planted bug.
    pub const ALL: [PlantedBug; 4] = [
        PlantedBug::CommitWithoutHold,
        PlantedBug::LeakVlan,
        PlantedBug::NoReserveDeadline,
        PlantedBug::ReplaceWithoutFence,
    ];
}

/// How a create ended at the site that received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Accepted: the reservation proceeds.
    Accepted,
    /// Refused, with the error kind.
    Rejected(&'static str),
}

/// Things the harness learns from a site after each step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The site published its advert with this version.
    Published {
        /// Version.
        version: u64,
    },
    /// The site's view took `site`'s advert at `version`.
    Learned {
        /// The site whose advert it is.
        site: SiteId,
        /// Its version.
        version: u64,
        /// Gossip hops, if it came by gossip (not anti-entropy).
        hops: Option<u16>,
    },
    /// A create was answered.
    Created {
        /// Cluster id.
        id: String,
        /// How.
        outcome: CreateOutcome,
    },
    /// The site's ledger may have changed.
    LedgerTouched,
    /// The site's cluster records may have changed.
    RecordsTouched,
    /// A worker reported node states of `cluster` to this site.
    NodesReported {
        /// Cluster id.
        cluster: String,
    },
    /// The site's runner changed something.
    Runner(TickReport),
    /// The site joined the federation.
    Joined,
    /// The site left the federation.
    Left,
    /// A core returned an error (the in-memory ledger should never fail).
    CoreError(String),
}

/// Settings shared by every site of a run.
#[derive(Debug, Clone)]
pub struct SiteSettings {
    /// Registry timing.
    pub registry: RegistryConfig,
    /// Reservation protocol timing.
    pub cluster: ClusterConfig,
    /// Longest time between two sweeps of the ledger, ms: a sweep also
    /// bounds the event log. Holds are swept when their lease runs out.
    pub sweep_ms: i64,
    /// A planted bug, for the test that shows it is caught.
    pub plant: Option<PlantedBug>,
    /// Advert verification shared by the sites (a cache; see `verify`).
    pub verifier: Option<Arc<dyn vcfed_registry::AdvertVerifier>>,
    /// Fewest mesh peers a site keeps: below it, it connects to sites it
    /// learns of (gossipsub's D / 2: links are both ways).
    pub mesh_min: usize,
}

/// Whether a site belongs to the federation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// It joins later (`Input::Join`); until then it does nothing.
    Waiting,
    /// A member.
    Member,
    /// It left for good.
    Left,
}

/// The other sites, by peer id and by index.
#[derive(Debug)]
pub struct Directory {
    /// Peer id of each site.
    pub peers: Vec<PeerId>,
    /// Index of each peer id.
    pub index: BTreeMap<PeerId, SiteId>,
}

impl Directory {
    /// The site whose peer id is `peer` (as text, as records keep it).
    pub fn site_of(&self, peer: &str) -> Option<SiteId> {
        let peer: PeerId = peer.parse().ok()?;
        self.index.get(&peer).copied()
    }
}

/// What a site loses when it crashes.
struct Volatile {
    /// The site core's federation: registry core, cluster core, advert
    /// timing, as the agent's federation shell holds it.
    fed: Federation,
    seen: SeenCache,
    /// Requests awaiting an answer: id → sent at (local ms).
    pending: BTreeMap<u64, i64>,
    next_request: u64,
    /// When the registry next wants its timer (cached, see `poll_timeout`).
    registry_wake: Option<i64>,
    /// When the ledger is swept at the latest (for its event log).
    next_sweep: i64,
    /// The earliest lease of a held reservation, run out or not: the
    /// ledger is swept then. Read again after every write that can hold,
    /// commit or release (where `capacity_changed` is called) and after
    /// every sweep.
    lease_expiry: Option<i64>,
    /// Holds the planted bug pretended to take: key → request.
    fake_holds: BTreeMap<String, HoldRequest>,
    /// The cluster runner (the `sim` driver's nodes die with it).
    runner: SimRunner,
}

/// One site of the simulated federation.
pub struct FedSite {
    index: SiteId,
    name: String,
    keypair: Keypair,
    peer: PeerId,
    capacity: u32,
    settings: Arc<SiteSettings>,
    directory: Arc<Directory>,
    /// Gossip mesh and connected peers, sorted (static for the sites of
    /// the start; see docs/SIMNET.md).
    mesh: Vec<SiteId>,
    /// Durable: whether the site is a member.
    presence: Presence,
    /// Whether it joined during the run (it then grows its mesh from its
    /// view, as gossipsub grafts peers it learns of).
    joined_late: bool,
    /// The site's VLAN pool (first, last).
    vlans: (u16, u16),
    dataplane: Arc<DataPlane>,
    /// When the current incarnation booted, true time (for the harness).
    up_since_ms: Option<i64>,
    /// Durable: survives crashes.
    ledger: Ledger,
    volatile: Option<Volatile>,
    /// Registry counters of earlier incarnations.
    stats_before: RegistryStats,
    observations: Vec<Observation>,
    duplicate_path: DuplicatePath,
    /// Gossip messages the core rejected.
    pub gossip_rejected: u64,
}

impl std::fmt::Debug for FedSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FedSite")
            .field("index", &self.index)
            .field("name", &self.name)
            .field("up", &self.volatile.is_some())
            .finish_non_exhaustive()
    }
}

impl FedSite {
    /// A site with `capacity` node slots and a key derived from `key_seed`;
    /// `member` says whether it belongs to the federation from the start
    /// (or joins later).
    #[allow(clippy::too_many_arguments)] // a constructor of plain parts
    pub fn new(
        index: SiteId,
        keypair: Keypair,
        capacity: u32,
        settings: Arc<SiteSettings>,
        directory: Arc<Directory>,
        mesh: Vec<SiteId>,
        member: bool,
        vlans: (u16, u16),
        dataplane: Arc<DataPlane>,
        start_ms: i64,
    ) -> Result<FedSite, LedgerError> {
        let name = format!("site{index}");
        let mut ledger = Ledger::open_in_memory()?;
        let inventory = inventory(&name, capacity);
        ledger.set_inventory(&inventory, start_ms)?;
        Ok(FedSite {
            index,
            peer: keypair.public().to_peer_id(),
            name,
            keypair,
            capacity,
            settings,
            directory,
            mesh,
            presence: if member {
                Presence::Member
            } else {
                Presence::Waiting
            },
            joined_late: !member,
            vlans,
            dataplane,
            up_since_ms: None,
            ledger,
            volatile: None,
            stats_before: RegistryStats::default(),
            observations: Vec::new(),
            duplicate_path: DuplicatePath::default(),
            gossip_rejected: 0,
        })
    }

    /// The site's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The site's peer id.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Node slots.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The durable ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The gossip mesh neighbours.
    pub fn mesh(&self) -> &[SiteId] {
        &self.mesh
    }

    /// Whether the site belongs to the federation.
    pub fn presence(&self) -> Presence {
        self.presence
    }

    /// The VLAN pool, first and last id.
    pub fn vlans(&self) -> (u16, u16) {
        self.vlans
    }

    /// When the running incarnation booted, true time (`None`: not running).
    pub fn up_since_ms(&self) -> Option<i64> {
        self.volatile.as_ref().and(self.up_since_ms)
    }

    /// The cluster runner, while the site runs.
    pub fn runner(&self) -> Option<&SimRunner> {
        self.volatile.as_ref().map(|v| &v.runner)
    }

    /// Registry counters over every incarnation.
    pub fn registry_stats(&self) -> RegistryStats {
        let mut total = self.stats_before;
        if let Some(volatile) = &self.volatile {
            add_stats(&mut total, &volatile.fed.registry().stats());
        }
        total
    }

    /// Clusters this site masters that are still in flight in its core.
    pub fn in_flight(&self) -> usize {
        self.volatile
            .as_ref()
            .map_or(0, |v| v.fed.cluster().in_flight())
    }

    /// Gossip messages dropped as duplicates by the seen cache.
    pub fn gossip_duplicates(&self) -> u64 {
        self.duplicate_path.duplicates
    }

    /// Takes what happened since the last call.
    pub fn take_observations(&mut self) -> Vec<Observation> {
        std::mem::take(&mut self.observations)
    }

    /// Whether observations are waiting.
    pub fn has_observations(&self) -> bool {
        !self.observations.is_empty()
    }

    fn gateway_ref(&self) -> GatewayRef {
        GatewayRef {
            endpoint: gateway_endpoint(self.index),
            public_key: key_of_site(self.index),
        }
    }

    fn boot(&mut self, ctx: &mut Ctx<'_, FedMsg>) -> Result<(), LedgerError> {
        if self.presence != Presence::Member {
            return Ok(());
        }
        let now = ctx.now_ms();
        self.up_since_ms = Some(ctx.true_ms());
        // The agent sweeps holds whose lease ran out while it was down
        // before it does anything else.
        self.ledger.sweep_expired(now)?;
        let version = self.ledger.advert_version()?;
        let seed = ctx.rng().next_u64();
        let mut registry = Registry::new(
            self.settings.registry.clone(),
            self.keypair.clone(),
            version,
            seed,
            now,
        );
        if let Some(verifier) = &self.settings.verifier {
            registry.set_verifier(verifier.clone());
        }
        let mut config = self.settings.cluster.clone();
        if self.settings.plant == Some(PlantedBug::NoReserveDeadline) {
            config.reserve_deadline_ms = PLANTED_RESERVE_DEADLINE_MS;
        }
        let mut cluster = ClusterCore::new(
            self.peer,
            self.name.clone(),
            Some(self.gateway_ref()),
            config,
        );
        if self.settings.plant == Some(PlantedBug::ReplaceWithoutFence) {
            cluster.plant(ClusterFault::ReplaceWithoutFence);
        }
        cluster.resume(&mut self.ledger, now)?;
        let lease_expiry = self.ledger.next_lease_expiry(i64::MIN)?;
        let index = u32::try_from(self.index).unwrap_or(u32::MAX);
        let local = LocalSite {
            name: self.name.clone(),
            gateway: Some(GatewayInfo {
                endpoint: gateway_endpoint(self.index),
                tunnel_public_key: *blake_ish_key(index),
            }),
            addrs: vec![format!(
                "/ip4/198.18.{}.{}/tcp/7781",
                (index >> 8) & 0xFF,
                index & 0xFF
            )],
        };
        let mut volatile = Volatile {
            // The advert is computed at the end of the boot.
            fed: Federation::new(registry, cluster, local, None, now),
            seen: SeenCache::new(self.index),
            pending: BTreeMap::new(),
            next_request: 0,
            registry_wake: None,
            next_sweep: now + self.settings.sweep_ms,
            lease_expiry,
            fake_holds: BTreeMap::new(),
            runner: {
                let mut runner = SimRunner::new(
                    self.name.clone(),
                    self.peer.to_string(),
                    self.vlans,
                    Some(SimDriver::new()),
                    SimPlane::new(self.index, self.dataplane.clone()),
                    now,
                );
                if self.settings.plant == Some(PlantedBug::LeakVlan) {
                    runner.plant(RunnerFault::LeakVlan);
                }
                runner
            },
        };
        for &peer in &self.mesh {
            volatile
                .fed
                .registry_mut()
                .peer_connected(self.directory.peers[peer]);
            // A site that joined redials its peers at every start; the
            // sites of the start form a static mesh.
            if self.joined_late {
                ctx.send(peer, FedMsg::Hello);
            }
        }
        // As the agent: requests that need sites not heard from yet since
        // the start are answered "not known yet" for a while.
        let expected = self.mesh.iter().map(|&peer| self.directory.peers[peer]);
        volatile.fed.registry_mut().expect_sites(now, expected);
        self.volatile = Some(volatile);
        self.dataplane.set_alive(self.index, true);
        self.observations.push(Observation::LedgerTouched);
        self.observations.push(Observation::RecordsTouched);
        self.refresh_local_advert(now);
        self.drain(ctx);
        Ok(())
    }

    /// Recomputes the local advert from the ledger, as the federation shell
    /// does; the core publishes only if it changed.
    fn refresh_local_advert(&mut self, now: i64) {
        let Some(volatile) = self.volatile.as_mut() else {
            return;
        };
        volatile.fed.refresh_advert(&mut &mut self.ledger, now);
        // Publishing moves only the refresh deadline, later: a cached wake
        // that is earlier just costs one early, harmless timer call.
        if volatile.registry_wake.is_none() {
            volatile.registry_wake = volatile.fed.registry().poll_timeout();
        }
    }

    /// The ledger's reservations may have changed: re-advertise soon, and
    /// sweep when the earliest lease runs out.
    fn capacity_changed(&mut self, now: i64) -> Result<(), LedgerError> {
        self.observations.push(Observation::LedgerTouched);
        if let Some(volatile) = self.volatile.as_mut() {
            volatile.fed.capacity_changed(now);
            volatile.lease_expiry = self.ledger.next_lease_expiry(i64::MIN)?;
        }
        Ok(())
    }

    /// Cluster records (or the node states a master stores) may have
    /// changed: the runner looks within a tick.
    fn records_changed(&mut self, now: i64) {
        self.observations.push(Observation::RecordsTouched);
        if let Some(volatile) = self.volatile.as_mut() {
            volatile.runner.wake(now);
        }
    }

    /// A site whose mesh is below the minimum (it joined through one
    /// member, or peers left) connects to sites it learns of (gossipsub
    /// grafting peers it knows of, the shell dialling learned addresses).
    fn learned_site(&mut self, ctx: &mut Ctx<'_, FedMsg>, site: &PeerId) {
        if self.mesh.len() >= self.settings.mesh_min.max(1) {
            return;
        }
        let Some(&other) = self.directory.index.get(site) else {
            return;
        };
        let Some(volatile) = self.volatile.as_mut() else {
            return;
        };
        if other == self.index || self.mesh.contains(&other) {
            return;
        }
        insert_sorted(&mut self.mesh, other);
        volatile.fed.registry_mut().peer_connected(*site);
        ctx.send(other, FedMsg::Hello);
    }

    /// Runs the cluster runner if it is due.
    fn run_lifecycle(&mut self, now: i64) -> Result<(), LedgerError> {
        let Some(volatile) = self.volatile.as_mut() else {
            return Ok(());
        };
        if volatile.runner.poll_timeout().is_none_or(|at| at > now) {
            return Ok(());
        }
        let report = volatile.runner.run_due(&mut &mut self.ledger, now);
        while let Some((cluster, nodes)) = volatile.runner.poll_report() {
            volatile
                .fed
                .report_nodes(&mut &mut self.ledger, &cluster, nodes)?;
        }
        for error in &report.errors {
            self.observations
                .push(Observation::CoreError(format!("runner: {error}")));
        }
        if report != TickReport::default() {
            self.observations.push(Observation::Runner(report));
        }
        Ok(())
    }

    /// Carries out what the cores asked: events first, then messages.
    fn drain(&mut self, ctx: &mut Ctx<'_, FedMsg>) {
        let Some(volatile) = self.volatile.as_mut() else {
            return;
        };
        // After any registry input: an advert relayed near its expiry can
        // make a site's liveness change sooner than the cached wake.
        // `poll_timeout` costs no pass over the view.
        volatile.registry_wake = volatile.fed.registry().poll_timeout();
        volatile.fed.drain(&mut &mut self.ledger);
        let mut alive = Vec::new();
        while let Some(event) = volatile.fed.poll_event() {
            match event {
                FederationEvent::Published { version } => {
                    self.observations.push(Observation::Published { version });
                }
                FederationEvent::PersistFailed { error, .. } => {
                    self.observations.push(Observation::CoreError(format!(
                        "persisting version: {error}"
                    )));
                }
                FederationEvent::Registry(RegistryEvent::SiteUpdated { site, version }) => {
                    if self.mesh.len() < self.settings.mesh_min {
                        alive.push(site);
                    }
                    if let Some(site) = self.directory.index.get(&site) {
                        self.observations.push(Observation::Learned {
                            site: *site,
                            version,
                            hops: None,
                        });
                    }
                }
                FederationEvent::Registry(RegistryEvent::SiteAlive { site, .. }) => {
                    alive.push(site);
                }
                FederationEvent::Registry(_) => {}
            }
        }
        let now = ctx.now_ms();
        while let Some(outgoing) = volatile.fed.poll_transmit() {
            match outgoing {
                Outgoing::Request {
                    to: peer,
                    data,
                    label,
                } => {
                    // The cores address only sites the directory names,
                    // never this one: a cluster message to anything else
                    // is a bug of the core (the registry may name a site
                    // that is not simulated, which the transport drops).
                    let to = self.directory.index.get(&peer).copied();
                    let Some(to) = to.filter(|&to| to != self.index) else {
                        if label != "registry" {
                            let detail = format!(
                                "the cluster core sends {label} to {peer}, not another site"
                            );
                            self.observations.push(Observation::CoreError(detail));
                        }
                        continue;
                    };
                    let id = volatile.next_request;
                    volatile.next_request += 1;
                    volatile.pending.insert(id, now);
                    let fingerprint = fingerprint(&data);
                    ctx.send(
                        to,
                        FedMsg::Request {
                            id,
                            label,
                            data,
                            fingerprint,
                        },
                    );
                }
                Outgoing::Publish(data) => {
                    let id = content_id(&data);
                    let sites = self.directory.peers.len();
                    let data = Rc::new(Published::new(data, &self.settings, sites));
                    volatile.seen.remember(&data, now);
                    for &peer in &self.mesh {
                        ctx.send(
                            peer,
                            FedMsg::Gossip {
                                id,
                                hops: 1,
                                data: data.clone(),
                            },
                        );
                    }
                }
            }
        }
        for site in alive {
            self.learned_site(ctx, &site);
        }
    }

    fn on_message(
        &mut self,
        ctx: &mut Ctx<'_, FedMsg>,
        from: SiteId,
        msg: FedMsg,
    ) -> Result<(), LedgerError> {
        // Most deliveries of a run: nothing else of the site is touched. A
        // message is only ever in the seen cache of a site that is up.
        if let FedMsg::Gossip { data, .. } = &msg
            && data.seen_by(ctx.site())
        {
            self.duplicate_path.duplicates += 1;
            self.duplicate_path.wake_unchanged.set(true);
            return Ok(());
        }
        let now = ctx.now_ms();
        let Some(volatile) = self.volatile.as_mut() else {
            return Ok(());
        };
        let from_peer = self.directory.peers[from];
        match msg {
            FedMsg::Gossip { id, hops, data } => {
                volatile.seen.remember(&data, now);
                let before = self.observations.len();
                let verdict = match &data.advert {
                    Some(advert) => volatile.fed.handle_verified_advert(now, advert.clone()),
                    None => volatile.fed.handle_gossip(now, &data.bytes),
                };
                self.drain(ctx);
                for observation in &mut self.observations[before..] {
                    if let Observation::Learned { hops: learned, .. } = observation {
                        *learned = Some(hops);
                    }
                }
                match verdict {
                    Verdict::Accept => {
                        for &peer in &self.mesh {
                            if peer != from {
                                ctx.send(
                                    peer,
                                    FedMsg::Gossip {
                                        id,
                                        hops: hops.saturating_add(1),
                                        data: data.clone(),
                                    },
                                );
                            }
                        }
                    }
                    Verdict::Ignore => {}
                    Verdict::Reject => self.gossip_rejected += 1,
                }
                Ok(())
            }
            FedMsg::Request { id, data, .. } => {
                let answer = match cluster_payload(&data) {
                    Some(msg) => {
                        // Node reports change no capacity (the shell does
                        // not re-advertise for them either); a hold changes
                        // no cluster record; node states matter to the
                        // runner until the cluster runs.
                        let moves_capacity = moves_capacity(&msg);
                        let records = match &msg {
                            ClusterMsg::Reserve { .. } => false,
                            ClusterMsg::Nodes { cluster, .. } => {
                                self.observations.push(Observation::NodesReported {
                                    cluster: cluster.clone(),
                                });
                                volatile.runner.awaits_reports(cluster)
                            }
                            _ => true,
                        };
                        let answer = self.worker(now, from_peer, msg)?;
                        if moves_capacity {
                            self.capacity_changed(now)?;
                        }
                        if records {
                            self.records_changed(now);
                        }
                        answer.map(|msg| {
                            let label = msg.label();
                            (wire::encode(&Message::Cluster(msg.encode())), label)
                        })
                    }
                    None => {
                        let volatile = self.volatile.as_mut().expect("checked above");
                        // As for gossip: applying adverts cannot make the
                        // registry's next deadline earlier than the cached one.
                        let answer = volatile
                            .fed
                            .registry_mut()
                            .handle_request(now, from_peer, &data);
                        answer.map(|data| (data, "registry"))
                    }
                };
                if let Some((data, label)) = answer {
                    let fingerprint = fingerprint(&data);
                    ctx.send(
                        from,
                        FedMsg::Response {
                            id,
                            label,
                            data,
                            fingerprint,
                        },
                    );
                }
                self.drain(ctx);
                Ok(())
            }
            FedMsg::Hello => {
                if !self.mesh.contains(&from) {
                    insert_sorted(&mut self.mesh, from);
                    volatile.fed.registry_mut().peer_connected(from_peer);
                }
                Ok(())
            }
            FedMsg::Bye => {
                self.mesh.retain(|&peer| peer != from);
                volatile.fed.registry_mut().peer_disconnected(from_peer);
                Ok(())
            }
            FedMsg::Response { id, data, .. } => {
                if volatile.pending.remove(&id).is_none() {
                    // Timed out at the transport: libp2p drops it too.
                    return Ok(());
                }
                let moved =
                    volatile
                        .fed
                        .handle_response(&mut &mut self.ledger, now, from_peer, &data)?;
                if moved {
                    self.capacity_changed(now)?;
                    self.records_changed(now);
                }
                self.drain(ctx);
                Ok(())
            }
        }
    }

    /// This site as a worker: the production core, or the planted bug.
    fn worker(
        &mut self,
        now: i64,
        from: PeerId,
        msg: ClusterMsg,
    ) -> Result<Option<ClusterMsg>, LedgerError> {
        let volatile = self.volatile.as_mut().expect("only called while up");
        if self.settings.plant == Some(PlantedBug::NoReserveDeadline)
            && matches!(msg, ClusterMsg::Reserve { .. })
        {
            return Ok(None);
        }
        if self.settings.plant == Some(PlantedBug::CommitWithoutHold) {
            match &msg {
                ClusterMsg::Reserve {
                    cluster,
                    attempt,
                    nodes,
                    shape,
                    window,
                    lease_ms,
                    ..
                } => {
                    let key = format!("{cluster}/{attempt}");
                    let request = HoldRequest {
                        key: key.clone(),
                        cluster_id: cluster.clone(),
                        requester: from.to_string(),
                        window: *window,
                        nodes: *nodes,
                        shape: *shape,
                        lease_ms: *lease_ms,
                    };
                    volatile.fake_holds.insert(key, request);
                    return Ok(Some(ClusterMsg::Held {
                        cluster: cluster.clone(),
                        attempt: *attempt,
                        lease_expires_at_ms: now + lease_ms,
                        gateway: Some(self.gateway_ref()),
                    }));
                }
                ClusterMsg::Commit {
                    cluster, attempt, ..
                } => {
                    let key = format!("{cluster}/{attempt}");
                    if let Some(request) = volatile.fake_holds.remove(&key) {
                        // Book without admission: grow the inventory for the
                        // hold, then put it back (the ledger keeps what was
                        // promised even when the inventory shrinks). The
                        // production core then commits it as usual, and
                        // records the part, so the cluster runs here.
                        let real = inventory(&self.name, self.capacity);
                        let inflated = inventory(&self.name, self.capacity + request.nodes);
                        self.ledger.set_inventory(&inflated, now)?;
                        // A duplicate Commit finds the hold there already;
                        // the core's commit answers it either way.
                        let _ = self.ledger.hold(&request, now);
                        self.ledger.set_inventory(&real, now)?;
                    }
                }
                _ => {}
            }
        }
        volatile
            .fed
            .handle_cluster_request(&mut &mut self.ledger, now, from, msg)
    }

    fn on_timeout(&mut self, ctx: &mut Ctx<'_, FedMsg>) -> Result<(), LedgerError> {
        let now = ctx.now_ms();
        let Some(volatile) = self.volatile.as_mut() else {
            return Ok(());
        };
        let cluster_ran = volatile.fed.handle_timeout(&mut &mut self.ledger, now)?;
        if cluster_ran {
            // A timer still due would wake the site again at once, forever.
            if let Some(at) = volatile.fed.cluster().poll_timeout().filter(|&at| at < now) {
                let detail = format!("the cluster core wants a timer at {at}, before now {now}");
                self.observations.push(Observation::CoreError(detail));
            }
            self.capacity_changed(now)?;
            self.records_changed(now);
        }
        let volatile = self.volatile.as_mut().expect("checked above");
        if volatile.next_sweep <= now || volatile.lease_expiry.is_some_and(|at| at <= now) {
            volatile.next_sweep = now + self.settings.sweep_ms;
            if self.ledger.sweep_expired(now)?.is_empty() {
                let volatile = self.volatile.as_mut().expect("checked above");
                volatile.lease_expiry = self.ledger.next_lease_expiry(i64::MIN)?;
            } else {
                self.capacity_changed(now)?;
            }
        }
        let volatile = self.volatile.as_mut().expect("checked above");
        // The transport's request timeout; ids grow with time.
        while let Some((&id, &sent)) = volatile.pending.first_key_value() {
            if sent + REQUEST_TIMEOUT_MS > now {
                break;
            }
            volatile.pending.remove(&id);
        }
        volatile.seen.expire(now);
        self.run_lifecycle(now)?;
        self.drain(ctx);
        Ok(())
    }

    fn on_input(&mut self, ctx: &mut Ctx<'_, FedMsg>, input: Input) -> Result<(), LedgerError> {
        let now = ctx.now_ms();
        match input {
            Input::Join { bootstrap } => {
                if self.presence != Presence::Waiting || bootstrap == self.index {
                    return Ok(());
                }
                self.presence = Presence::Member;
                self.mesh = vec![bootstrap];
                self.observations.push(Observation::Joined);
                return self.boot(ctx);
            }
            Input::Leave => {
                if self.presence != Presence::Member {
                    return Ok(());
                }
                for &peer in &self.mesh {
                    ctx.send(peer, FedMsg::Bye);
                }
                self.presence = Presence::Left;
                crate::Site::crash(self);
                self.observations.push(Observation::Left);
                return Ok(());
            }
            Input::Create { .. } | Input::Delete { .. } => {}
        }
        let Some(volatile) = self.volatile.as_mut() else {
            return Ok(());
        };
        match input {
            Input::Create {
                id,
                nodes,
                start_in_ms,
                length_ms,
                heal,
            } => {
                let start_ms = now + start_in_ms;
                let request = ClusterRequest {
                    name: id.clone(),
                    nodes,
                    shape: NodeShape {
                        cores: 2,
                        memory_mib: 4096,
                        disk_gib: 20,
                    },
                    window: Window {
                        start_ms,
                        end_ms: start_ms + length_ms,
                    },
                    image: None,
                    heal,
                };
                let outcome =
                    match volatile
                        .fed
                        .create(&mut &mut self.ledger, now, id.clone(), request)
                    {
                        Ok(_) => CreateOutcome::Accepted,
                        Err(e) => CreateOutcome::Rejected(create_error_kind(&e)),
                    };
                self.observations.push(Observation::Created { id, outcome });
            }
            Input::Delete { id } => {
                // Unknown ids (refused creates) are answered with an error,
                // which the requester sees; nothing to record.
                let _ = volatile.fed.delete(&mut &mut self.ledger, now, &id);
            }
            Input::Join { .. } | Input::Leave => unreachable!("handled above"),
        }
        self.capacity_changed(now)?;
        self.records_changed(now);
        self.drain(ctx);
        Ok(())
    }

    fn report_error(&mut self, what: &str, result: Result<(), LedgerError>) {
        if let Err(e) = result {
            self.observations
                .push(Observation::CoreError(format!("{what}: {e}")));
        }
    }
}

impl crate::Site for FedSite {
    type Msg = FedMsg;
    type Input = Input;

    fn start(&mut self, ctx: &mut Ctx<'_, FedMsg>) {
        let result = self.boot(ctx);
        self.report_error("boot", result);
    }

    fn handle_message(&mut self, ctx: &mut Ctx<'_, FedMsg>, from: SiteId, msg: FedMsg) {
        let result = self.on_message(ctx, from, msg);
        self.report_error("message", result);
    }

    fn handle_timeout(&mut self, ctx: &mut Ctx<'_, FedMsg>) {
        let result = self.on_timeout(ctx);
        self.report_error("timer", result);
    }

    fn handle_input(&mut self, ctx: &mut Ctx<'_, FedMsg>, input: Input) {
        let result = self.on_input(ctx, input);
        self.report_error("input", result);
    }

    fn crash(&mut self) {
        if let Some(volatile) = self.volatile.take() {
            add_stats(&mut self.stats_before, &volatile.fed.registry().stats());
        }
        self.dataplane.set_alive(self.index, false);
    }

    fn poll_timeout(&self) -> Option<i64> {
        // The engine asked after the call before the duplicate too, so the
        // memo is the answer for the state that still holds.
        if self.duplicate_path.wake_unchanged.replace(false) {
            return self.duplicate_path.wake_memo.get();
        }
        let wake = self.volatile.as_ref().and_then(|volatile| {
            [
                volatile.registry_wake,
                volatile.fed.cluster().poll_timeout(),
                Some(volatile.fed.advert_due_ms()),
                Some(volatile.next_sweep),
                volatile.lease_expiry,
                volatile.runner.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min()
        });
        self.duplicate_path.wake_memo.set(wake);
        wake
    }
}

fn insert_sorted(list: &mut Vec<SiteId>, site: SiteId) {
    if let Err(at) = list.binary_search(&site) {
        list.insert(at, site);
    }
}

fn inventory(name: &str, slots: u32) -> Inventory {
    let node = slot();
    Inventory {
        node,
        hosts: vec![InventoryHost {
            name: format!("{name}-host"),
            cores: node.cores * slots.max(1),
            memory_mib: node.memory_mib * u64::from(slots.max(1)),
            disk_gib: node.disk_gib * u64::from(slots.max(1)),
            slots,
        }],
    }
}

fn gateway_endpoint(index: SiteId) -> String {
    format!("198.19.{}.{}:7782", (index >> 8) & 0xFF, index & 0xFF)
}

/// A stable 32-byte stand-in for a site's WireGuard key.
fn blake_ish_key(index: u32) -> Box<[u8; 32]> {
    let mut key = [0u8; 32];
    for (i, chunk) in key.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&mix64(u64::from(index) << 8 | i as u64).to_le_bytes());
    }
    Box::new(key)
}

fn create_error_kind(e: &vcfed_node_core::cluster::CreateError) -> &'static str {
    use vcfed_node_core::cluster::CreateError;
    match e {
        CreateError::Invalid(_) => "invalid",
        CreateError::UnknownShape(_) => "unknown shape",
        CreateError::Insufficient { available: 0, .. } => "no room here for the frontend",
        CreateError::Insufficient { .. } => "federation has too few free nodes",
        CreateError::NotReady { .. } => "view warming up",
        CreateError::Exists(_) => "exists",
        CreateError::NameTaken { .. } => "name taken",
        CreateError::Ledger(_) => "ledger error",
    }
}

fn add_stats(total: &mut RegistryStats, more: &RegistryStats) {
    total.adverts_applied += more.adverts_applied;
    total.adverts_duplicate += more.adverts_duplicate;
    total.dropped_stale += more.dropped_stale;
    total.dropped_expired += more.dropped_expired;
    total.dropped_forged += more.dropped_forged;
    total.dropped_undecodable += more.dropped_undecodable;
    total.dropped_oversized += more.dropped_oversized;
    total.dropped_full += more.dropped_full;
    total.dropped_not_allowed += more.dropped_not_allowed;
    total.messages_sent += more.messages_sent;
    total.bytes_sent += more.bytes_sent;
}
