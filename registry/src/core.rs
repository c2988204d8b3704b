//! The registry core: a sans-IO state machine that keeps the federation
//! view and disseminates this site's capacity advert.
//!
//! # Contract
//!
//! The core never reads a clock, a socket or a random source: every input
//! carries `now_ms` (unix ms of the caller's clock) and randomness comes from
//! the seed given to [`Registry::new`]. After **every** input
//! (`handle_*`, `set_local`, `peer_*`), the caller drains the outputs:
//!
//! 1. [`Registry::poll_event`] until `None`, and handles each event
//!    (in particular persists [`RegistryEvent::PersistVersion`] *before*
//!    sending anything, so a restart never reuses a version);
//! 2. [`Registry::poll_transmit`] until `None`, and sends each transmit;
//! 3. [`Registry::poll_timeout`], and calls [`Registry::handle_timeout`]
//!    when that instant comes.
//!
//! Dissemination: the local advert is pushed (gossip publish) whenever it
//! changes and re-signed with a higher version every `refresh_ms`. Every
//! `anti_entropy_ms` the core sends a digest (site → version) to one random
//! connected peer, which answers with what the digest lacks and asks for what
//! it lacks itself: sites that missed pushes or were partitioned converge.
//!
//! Floods: a site's adverts are applied (and so forwarded) at most
//! `advert_burst` back to back, then one per `advert_interval_min_ms` on
//! average (a generic cell rate limit per site, driven by `now_ms`). A site
//! publishes on a change (coalesced by its shell) and every `refresh_ms`, so
//! an honest one stays well below; adverts beyond are ignored and counted
//! (`dropped_rate`), never forwarded, and the newest one is learnt at the
//! next refresh or anti-entropy round once the flood stops. Replays of
//! versions already held are ignored and counted (`adverts_duplicate`,
//! `dropped_stale`). Neither penalises the peer that relayed them: an honest
//! relay may pass on an advert this site already holds.
//!
//! Failure detection: an advert is fresh for its TTL after it was issued
//! (bounded by the receiver's own clock, allowing `clock_skew_max_ms`); a
//! site whose advert is no longer fresh is *suspect*, and *gone* after a
//! further `suspect_ms`. Gone sites are never offered as workers; a fresh
//! advert brings them back.
//!
//! Cost: the view keeps its anti-entropy digest hash and a bound on its next
//! liveness deadline up to date as adverts arrive (O(1) each, beside finding
//! the site), so an anti-entropy round, a timer and [`Registry::poll_timeout`]
//! need no pass over the view. A digest is split by site into buckets, and
//! the view is ordered so that each bucket is one run of it: a mismatch
//! lists and reconciles the few dozen entries of the buckets that differ,
//! not the view. Passes remain only for the rare moments an advert nears
//! its expiry or a site's liveness changes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use libp2p_identity::{Keypair, PeerId};

use crate::advert::{
    ADVERT_ADDRS_MAX, ADVERT_STEPS_MAX, Advert, AdvertError, AdvertVerifier, CapacitySummary,
    GatewayInfo, NodeShape, SignedAdvert, VerifiedAdvert, coarsen_steps,
};
use crate::wire::{self, DIGEST_BUCKETS_MAX, DigestEntry, Message, PeerBytes, WireError};

/// Settings of the registry core. Times in ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// How long an advert stays valid after it is issued.
    pub advert_ttl_ms: u32,
    /// How often the local advert is re-signed and pushed even if unchanged.
    pub refresh_ms: i64,
    /// How often a digest goes to a random peer.
    pub anti_entropy_ms: i64,
    /// How long a site stays suspect before it is gone.
    pub suspect_ms: i64,
    /// How long a gone site is remembered before it is forgotten.
    pub forget_ms: i64,
    /// How far another site's clock may be off ours.
    pub clock_skew_max_ms: i64,
    /// Longest message accepted or sent.
    pub message_max_bytes: usize,
    /// Most sites kept in the view.
    pub sites_max: usize,
    /// If set, only adverts of these sites enter the view (a federation
    /// allowlist applies to what is relayed, not only to connections).
    pub allowed_sites: Option<BTreeSet<PeerId>>,
    /// Shortest average interval between two applied adverts of one site.
    pub advert_interval_min_ms: i64,
    /// Adverts of one site applied back to back before
    /// `advert_interval_min_ms` applies (at least 1).
    pub advert_burst: u32,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            advert_ttl_ms: 30_000,
            refresh_ms: 10_000,
            anti_entropy_ms: 2_000,
            suspect_ms: 30_000,
            forget_ms: 600_000,
            clock_skew_max_ms: 60_000,
            message_max_bytes: 1 << 20,
            sites_max: 10_000,
            allowed_sites: None,
            advert_interval_min_ms: ADVERT_INTERVAL_MIN_MS,
            advert_burst: ADVERT_BURST,
        }
    }
}

/// Default [`RegistryConfig::advert_interval_min_ms`]: ten adverts a second
/// per site. A shell coalesces a site's changes (node-core's
/// `ADVERT_COALESCE_MS`, 200 ms) and refreshes every few seconds, so an
/// honest site publishes at most about five a second.
pub const ADVERT_INTERVAL_MIN_MS: i64 = 100;
/// Default [`RegistryConfig::advert_burst`]: room for a burst of changes
/// and the anti-entropy catch-up after a partition.
pub const ADVERT_BURST: u32 = 10;

const _: () = assert!(ADVERT_INTERVAL_MIN_MS > 0 && ADVERT_BURST > 0);

impl RegistryConfig {
    /// An advert's TTL as this site honours it: at most ten times its own,
    /// so a site with a long TTL is still seen (and still expires) here.
    fn ttl_of(&self, advert: &Advert) -> i64 {
        i64::from(advert.ttl_ms.min(self.advert_ttl_ms.saturating_mul(10)))
    }

    /// When an advert expires by the issuer's clock, allowing skew: from
    /// then on it is refused, and left out of the digest.
    fn expires_at(&self, advert: &Advert) -> i64 {
        advert
            .issued_at_ms
            .saturating_add(self.ttl_of(advert))
            .saturating_add(self.clock_skew_max_ms)
    }

    /// The liveness at `now_ms` of a site whose advert is fresh until
    /// `fresh_until_ms`.
    fn liveness(&self, fresh_until_ms: i64, now_ms: i64) -> SiteState {
        if now_ms < fresh_until_ms {
            SiteState::Alive
        } else if now_ms < fresh_until_ms.saturating_add(self.suspect_ms) {
            SiteState::Suspect
        } else {
            SiteState::Gone
        }
    }

    /// When a site whose advert is fresh until `fresh_until_ms` is forgotten
    /// (once gone).
    fn forget_at(&self, fresh_until_ms: i64) -> i64 {
        fresh_until_ms
            .saturating_add(self.suspect_ms)
            .saturating_add(self.forget_ms)
    }

    /// When the liveness of a site in `state` whose advert is fresh until
    /// `fresh_until_ms` next changes as time passes: it stops being alive,
    /// stops being suspect, or is forgotten.
    fn liveness_deadline(&self, state: SiteState, fresh_until_ms: i64) -> i64 {
        match state {
            SiteState::Alive => fresh_until_ms,
            SiteState::Suspect => fresh_until_ms.saturating_add(self.suspect_ms),
            SiteState::Gone => self.forget_at(fresh_until_ms),
        }
    }
}

/// What this site advertises (the core adds identity, version and times).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAdvert {
    /// Site name.
    pub site_name: String,
    /// Free capacity.
    pub capacity: CapacitySummary,
    /// The gateway, once configured.
    pub gateway: Option<GatewayInfo>,
    /// Federation multiaddrs to dial this site at.
    pub addrs: Vec<String>,
    /// vcfed version.
    pub software: String,
}

/// Liveness of a site in the view.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SiteState {
    /// Its advert is fresh.
    Alive,
    /// Its advert is stale; it may be gone.
    Suspect,
    /// Not heard of for too long; never chosen as a worker.
    Gone,
}

/// Something the caller must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Publish to every member (gossip).
    Publish {
        /// Encoded message.
        data: Vec<u8>,
    },
    /// A request to one peer; its answer goes to [`Registry::handle_response`].
    Request {
        /// The peer.
        to: PeerId,
        /// Encoded message.
        data: Vec<u8>,
    },
}

/// Something that happened, for the caller to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    /// The local advert now has this version: persist it before sending.
    PersistVersion(u64),
    /// A site appeared in the view, or came back from gone.
    SiteAlive {
        /// The site.
        site: PeerId,
        /// Its name.
        name: String,
    },
    /// A site's advert changed.
    SiteUpdated {
        /// The site.
        site: PeerId,
        /// The new version.
        version: u64,
    },
    /// A site's advert went stale.
    SiteSuspect {
        /// The site.
        site: PeerId,
    },
    /// A site is gone.
    SiteGone {
        /// The site.
        site: PeerId,
    },
    /// A site's federation addresses, for the caller to dial and remember.
    SiteAddrs {
        /// The site.
        site: PeerId,
        /// Its multiaddrs (without /p2p/).
        addrs: Vec<String>,
    },
}

/// What the caller should do with a gossip message after it was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New and valid: forward it.
    Accept,
    /// Valid but not new (duplicate or older): do not forward, no penalty.
    Ignore,
    /// Invalid: drop and penalise the peer that sent it.
    Reject,
}

/// Counters of what the core received and dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegistryStats {
    /// Adverts applied.
    pub adverts_applied: u64,
    /// Adverts that repeated a version already held.
    pub adverts_duplicate: u64,
    /// Adverts with a lower version than held.
    pub dropped_stale: u64,
    /// Adverts past their TTL, or issued in the future.
    pub dropped_expired: u64,
    /// Adverts with a bad key, bad signature or wrong signer.
    pub dropped_forged: u64,
    /// Messages or adverts that did not decode or were out of bounds.
    pub dropped_undecodable: u64,
    /// Messages over the size limit.
    pub dropped_oversized: u64,
    /// Adverts dropped because the view was full.
    pub dropped_full: u64,
    /// Adverts of sites outside the allowlist.
    pub dropped_not_allowed: u64,
    /// Adverts of a site that publishes faster than allowed.
    #[serde(default)]
    pub dropped_rate: u64,
    /// Messages sent.
    pub messages_sent: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
}

/// A view still filling after a (re)start: the site has not yet heard from
/// every site it expected to (those it remembers or was told to dial), and
/// the time it gives them has not run out. While a view warms up, "no room
/// in the federation" cannot be told from "not heard from the federation
/// yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warming {
    /// Expected sites whose advert is in the view.
    pub heard: usize,
    /// Sites expected.
    pub expected: usize,
    /// When the wait ends, heard from or not.
    pub until_ms: i64,
}

/// The sites a site expects to hear from after it starts, and until when.
#[derive(Debug, Clone)]
struct Expected {
    sites: BTreeSet<PeerId>,
    until_ms: i64,
}

/// One site as the view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteView {
    /// The site.
    pub site: PeerId,
    /// Whether it is this site.
    pub local: bool,
    /// Liveness.
    pub state: SiteState,
    /// Its latest advert.
    pub advert: Advert,
    /// Age of that advert, by the issuer's clock against ours.
    pub advert_age_ms: i64,
    /// Free slots now.
    pub free_now: u32,
    /// Round-trip time, if measured.
    pub rtt: Option<Duration>,
}

/// A worker candidate for a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The site.
    pub site: PeerId,
    /// Its name.
    pub name: String,
    /// Fewest free slots at any instant of the window, per its advert.
    pub free: u32,
    /// Round-trip time, if measured.
    pub rtt: Option<Duration>,
}

#[derive(Debug, Clone)]
struct SiteEntry {
    /// The site (the key only places it).
    site: PeerId,
    /// The advert as received and as verified (possibly shared with the
    /// verifier's cache and other views).
    verified: Arc<VerifiedAdvert>,
    /// Until when the advert is fresh, by our clock.
    fresh_until_ms: i64,
    state: SiteState,
    /// [`peer_hash`] of the site, computed once.
    site_hash: u64,
    /// The advert's version and [`RegistryConfig::expires_at`], beside the
    /// key: passes over the view (digests) need no more of the advert.
    version: u64,
    expires_at_ms: i64,
    /// The site's advert rate: the theoretical arrival time of its next
    /// advert (generic cell rate algorithm, [`Registry::rate_allows`]).
    rate_tat_ms: i64,
}

impl SiteEntry {
    fn advert(&self) -> &Advert {
        &self.verified.advert
    }
}

/// The remote sites, in the order of their [`ViewKey`]s.
type View = BTreeMap<ViewKey, SiteEntry>;

/// Where a remote site sits in the view: by its digest order (the mixed
/// [`peer_hash`], whose top bits are its [`digest_bucket`]), then by when it
/// came among the sites of that order (only sites whose hashes collide
/// share one). The sites of a digest bucket, in any split, are then one run
/// of the view: an anti-entropy round visits the buckets that differ, not
/// the whole view. The key is small (the site is in its entry), so that
/// finding a site reads few cache lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ViewKey {
    order: u64,
    nth: u32,
}

impl ViewKey {
    /// The first key of an order.
    fn first(order: u64) -> ViewKey {
        ViewKey { order, nth: 0 }
    }
}

/// The anti-entropy digest of the remote entries (what [`Registry::digest`]
/// lists, but ours) at `at_ms`, kept up to date as the view changes: the
/// sum of the [`digest_entry_hash`]es of the entries still valid then, in
/// all and per [`digest_bucket`], and their number. Entries also expire as time passes; bounds on the expiries
/// say when that may have changed the sums, and only then are they
/// recomputed from the view (rarely: adverts are refreshed long before they
/// expire).
#[derive(Debug, Clone)]
struct DigestSummary {
    at_ms: i64,
    /// The sums per bucket, finest split (their sum is the digest hash).
    buckets: [u64; DIGEST_BUCKETS_MAX],
    count: usize,
    /// No entry valid at `at_ms` expires before this.
    valid_until_ms: i64,
    /// No entry expired at `at_ms` expired after this.
    expired_since_ms: i64,
}

impl DigestSummary {
    /// The summary of `sites` at `now_ms`.
    fn of(sites: &View, now_ms: i64) -> Self {
        let mut summary = DigestSummary {
            at_ms: now_ms,
            buckets: [0; DIGEST_BUCKETS_MAX],
            count: 0,
            valid_until_ms: i64::MAX,
            expired_since_ms: i64::MIN,
        };
        for entry in sites.values() {
            summary.add(entry);
        }
        summary
    }

    /// Whether the sums also describe `now_ms`: no entry expired or came
    /// back (the clock stepped back) between `at_ms` and then.
    fn holds_at(&self, now_ms: i64) -> bool {
        self.expired_since_ms <= now_ms && now_ms < self.valid_until_ms
    }

    /// An entry joins the view.
    fn add(&mut self, entry: &SiteEntry) {
        if entry.expires_at_ms > self.at_ms {
            let hash = digest_entry_hash(entry.site_hash, entry.version);
            let bucket = &mut self.buckets[digest_bucket(entry.site_hash)];
            *bucket = bucket.wrapping_add(hash);
            self.count += 1;
            self.valid_until_ms = self.valid_until_ms.min(entry.expires_at_ms);
        } else {
            self.expired_since_ms = self.expired_since_ms.max(entry.expires_at_ms);
        }
    }

    /// An entry added with [`DigestSummary::add`] leaves the view (the
    /// bounds stay bounds).
    fn remove(&mut self, entry: &SiteEntry) {
        if entry.expires_at_ms <= self.at_ms {
            return;
        }
        debug_assert!(self.count > 0, "only an added entry is removed");
        match self.count.checked_sub(1) {
            Some(count) => {
                let hash = digest_entry_hash(entry.site_hash, entry.version);
                let bucket = &mut self.buckets[digest_bucket(entry.site_hash)];
                *bucket = bucket.wrapping_sub(hash);
                self.count = count;
            }
            // Never (see above); should it happen, the sums no longer hold
            // at any instant and are rebuilt from the view on next use,
            // rather than a peer's message stopping the agent.
            None => self.valid_until_ms = i64::MIN,
        }
    }
}

/// When the view next changes by itself, as far as
/// [`Registry::poll_timeout`] needs it: a lower bound on the entries'
/// liveness deadlines, exact when `exact` is set. Replacing or dropping the
/// entry that held the bound leaves a stale (lower) bound, recomputed only
/// once it comes before the registry's next timer: until then that timer is
/// what `poll_timeout` answers anyway. Adverts are refreshed long before
/// their deadlines, so keeping the bound costs O(1) per advert.
#[derive(Debug, Clone, Copy)]
struct DeadlineBound {
    at_ms: i64,
    exact: bool,
}

impl DeadlineBound {
    /// The exact bound of `sites`.
    fn of(sites: &View, config: &RegistryConfig) -> Self {
        DeadlineBound {
            at_ms: sites
                .values()
                .map(|entry| config.liveness_deadline(entry.state, entry.fresh_until_ms))
                .min()
                .unwrap_or(i64::MAX),
            exact: true,
        }
    }

    /// An entry with this deadline joined the view.
    fn added(&mut self, deadline_ms: i64) {
        if deadline_ms < self.at_ms {
            // Below a lower bound of every other deadline: the minimum.
            self.at_ms = deadline_ms;
            self.exact = true;
        }
    }

    /// An entry with this deadline left the view.
    fn removed(&mut self, deadline_ms: i64) {
        debug_assert!(deadline_ms >= self.at_ms, "the bound is a lower bound");
        if deadline_ms == self.at_ms {
            // The bound may now be below every deadline: still a bound.
            self.exact = false;
        } else if deadline_ms < self.at_ms {
            // Never (see above); should it happen, the lowest bound makes
            // `settle_deadline` recompute it from the view, rather than a
            // peer's message stopping the agent.
            self.at_ms = i64::MIN;
            self.exact = false;
        }
    }
}

#[derive(Debug, Clone, Default)]
struct PeerInfo {
    connected: bool,
    rtt: Option<Duration>,
}

/// The registry state machine. See the module docs for the contract.
#[cfg_attr(test, derive(Clone))]
pub struct Registry {
    config: RegistryConfig,
    keypair: Keypair,
    local_id: PeerId,
    /// [`peer_hash`] of `local_id`.
    local_hash: u64,
    local: Option<LocalAdvert>,
    local_version: u64,
    local_signed: Option<(SignedAdvert, Advert)>,
    sites: View,
    /// When the view next changes by itself (the first liveness deadline
    /// of its entries, [`RegistryConfig::liveness_deadline`]), as far as
    /// [`Registry::poll_timeout`] needs it; settled after every input.
    deadline: DeadlineBound,
    /// The `now` liveness was last brought up to date for: every state in
    /// the view is what that `now` gave.
    liveness_at_ms: i64,
    /// Hash and expiries of the remote entries of the digest.
    digest: DigestSummary,
    peers: BTreeMap<PeerId, PeerInfo>,
    rng: SplitMix64,
    next_refresh_ms: Option<i64>,
    next_anti_entropy_ms: i64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<RegistryEvent>,
    stats: RegistryStats,
    /// Checks adverts; `None` is [`SignedAdvert::verify`] (production).
    verifier: Option<std::sync::Arc<dyn AdvertVerifier>>,
    /// Sites an operator forgot, with the highest advert version seen of
    /// each: relays of those adverts do not bring them back, a newer one
    /// (the site is back) does.
    forgotten: BTreeMap<PeerId, u64>,
    /// The sites expected after a start ([`Registry::expect_sites`]).
    expected: Option<Expected>,
}

/// Most forgotten sites remembered (beyond, one is dropped for each new one).
const FORGOTTEN_MAX: usize = 1024;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("local_id", &self.local_id)
            .field("local_version", &self.local_version)
            .field("sites", &self.sites.len())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry for the site with `keypair`, whose last persisted advert
    /// version was `persisted_version` (0 for a new site).
    pub fn new(
        config: RegistryConfig,
        keypair: Keypair,
        persisted_version: u64,
        seed: u64,
        now_ms: i64,
    ) -> Registry {
        let local_id = keypair.public().to_peer_id();
        let mut rng = SplitMix64(seed);
        // Spread the first anti-entropy round so that sites started together
        // do not all talk at once.
        let jitter = rng.below(u64::try_from(config.anti_entropy_ms).unwrap_or(1).max(1));
        let next_anti_entropy_ms = now_ms + i64::try_from(jitter).expect("jitter is below an i64");
        let digest = DigestSummary::of(&BTreeMap::new(), now_ms);
        Registry {
            config,
            keypair,
            local_id,
            local_hash: peer_hash(&local_id),
            local: None,
            local_version: persisted_version,
            local_signed: None,
            sites: BTreeMap::new(),
            deadline: DeadlineBound {
                at_ms: i64::MAX,
                exact: true,
            },
            liveness_at_ms: i64::MIN,
            digest,
            peers: BTreeMap::new(),
            rng,
            next_refresh_ms: None,
            next_anti_entropy_ms,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: RegistryStats::default(),
            verifier: None,
            forgotten: BTreeMap::new(),
            expected: None,
        }
    }

    /// This site's peer id.
    pub fn local_id(&self) -> PeerId {
        self.local_id
    }

    /// Replaces how adverts are verified (see [`AdvertVerifier`]; the
    /// simulator shares a cache of verified adverts between its sites).
    pub fn set_verifier(&mut self, verifier: std::sync::Arc<dyn AdvertVerifier>) {
        self.verifier = Some(verifier);
    }

    /// Counters.
    pub fn stats(&self) -> RegistryStats {
        self.stats
    }

    /// Sets what this site advertises. A change is pushed at once with a new
    /// version; an identical advert changes nothing.
    pub fn set_local(&mut self, now_ms: i64, local: LocalAdvert) {
        if self.local.as_ref() == Some(&local) {
            return;
        }
        self.local = Some(local);
        self.publish_local(now_ms);
        self.settle_deadline();
    }

    /// A connection to `peer` is up.
    pub fn peer_connected(&mut self, peer: PeerId) {
        self.peers.entry(peer).or_default().connected = true;
    }

    /// The connection to `peer` is down.
    pub fn peer_disconnected(&mut self, peer: PeerId) {
        // Forget the peer entirely: a churning network must not grow this map.
        self.peers.remove(&peer);
    }

    /// A round-trip time to `peer` was measured.
    pub fn peer_rtt(&mut self, peer: PeerId, rtt: Duration) {
        self.peers.entry(peer).or_default().rtt = Some(rtt);
    }

    /// A gossip message arrived; the verdict tells whether to forward it.
    pub fn handle_gossip(&mut self, now_ms: i64, data: &[u8]) -> Verdict {
        match self.decode(data) {
            Some(Message::Advert(signed)) => {
                let verdict = self.apply(now_ms, signed);
                self.settle_deadline();
                verdict
            }
            Some(_) => {
                // Only adverts travel by gossip.
                self.stats.dropped_undecodable += 1;
                Verdict::Reject
            }
            None => Verdict::Reject,
        }
    }

    /// [`Registry::handle_gossip`] of a message the shell already decoded to
    /// an advert and verified (with [`AdvertVerifier::verify_shared`]): the
    /// same outcome as handing over its bytes. For a shell that runs many
    /// registries on one message, as the simulator does: decoding, like
    /// verifying, is a pure function of the bytes, done once for all.
    pub fn handle_verified_advert(
        &mut self,
        now_ms: i64,
        verified: Arc<VerifiedAdvert>,
    ) -> Verdict {
        let verdict = self.apply_verified(now_ms, verified);
        self.settle_deadline();
        verdict
    }

    /// A request arrived from `from`; returns the encoded answer, or `None`
    /// if the request was dropped (then the caller answers nothing).
    pub fn handle_request(&mut self, now_ms: i64, from: PeerId, data: &[u8]) -> Option<Vec<u8>> {
        let reply = match self.decode(data)? {
            Message::DigestHash { hash, count } => {
                let (mine_hash, mine_count) = self.digest_summary(now_ms);
                if mine_hash == hash && mine_count == usize::try_from(count).unwrap_or(usize::MAX) {
                    Message::InSync
                } else {
                    Message::Digest(self.digest(now_ms))
                }
            }
            Message::DigestBuckets { count, hashes } => {
                let Some(buckets) = Buckets::split(hashes.len()) else {
                    tracing::debug!(peer = %from, buckets = hashes.len(), "a digest in a bad number of buckets");
                    self.stats.dropped_undecodable += 1;
                    return None;
                };
                let (mine, mine_count) = self.bucket_hashes(now_ms, buckets);
                if mine_count == usize::try_from(count).unwrap_or(usize::MAX) && mine == hashes {
                    Message::InSync
                } else {
                    let mut differing = buckets.differing(&mine, &hashes);
                    if differing == 0 {
                        // Only the counts differ (the hashes collided):
                        // everything is in question.
                        differing = buckets.all();
                    }
                    let entries = self.digest_in(now_ms, buckets, differing);
                    Message::DigestPart {
                        buckets: buckets.wire(),
                        differing: buckets.indices(differing),
                        entries,
                    }
                }
            }
            Message::Pull(sites) => Message::Adverts(self.adverts_for(now_ms, &sites)),
            Message::Adverts(adverts) => {
                for signed in adverts {
                    self.apply(now_ms, signed);
                }
                Message::Ack
            }
            Message::Advert(signed) => {
                self.apply(now_ms, signed);
                Message::Ack
            }
            Message::InSync
            | Message::Digest(_)
            | Message::DigestPart { .. }
            | Message::Ack
            | Message::Cluster(_) => {
                tracing::debug!(peer = %from, "unexpected message kind in a request");
                self.stats.dropped_undecodable += 1;
                return None;
            }
        };
        self.settle_deadline();
        Some(self.encode_counted(&reply))
    }

    /// The answer to one of our requests arrived from `from`.
    pub fn handle_response(&mut self, now_ms: i64, from: PeerId, data: &[u8]) {
        match self.decode(data) {
            Some(Message::Digest(theirs)) => {
                self.reconcile(now_ms, from, &theirs, Buckets::ONE, Buckets::ONE.all());
            }
            Some(Message::DigestPart {
                buckets,
                differing,
                entries,
            }) => match Buckets::of_part(buckets, &differing) {
                Some((buckets, differing)) => {
                    self.reconcile(now_ms, from, &entries, buckets, differing);
                }
                None => {
                    tracing::debug!(peer = %from, buckets, "a digest part of bad buckets");
                    self.stats.dropped_undecodable += 1;
                }
            },
            Some(Message::Adverts(adverts)) => {
                for signed in adverts {
                    self.apply(now_ms, signed);
                }
            }
            Some(Message::InSync | Message::Ack) | None => {}
            Some(_) => self.stats.dropped_undecodable += 1,
        }
        self.settle_deadline();
    }

    /// Timers: refresh, anti-entropy, liveness. Call at [`Registry::poll_timeout`].
    pub fn handle_timeout(&mut self, now_ms: i64) {
        // Deadlines are on the caller's wall clock; if it stepped back, a
        // deadline far in the future would silence this site for as long.
        if self
            .next_refresh_ms
            .is_some_and(|at| at > now_ms.saturating_add(self.config.refresh_ms))
        {
            self.next_refresh_ms = Some(now_ms);
        }
        if self.next_anti_entropy_ms > now_ms.saturating_add(self.config.anti_entropy_ms) {
            self.next_anti_entropy_ms = now_ms;
        }
        if self.next_refresh_ms.is_some_and(|at| at <= now_ms) {
            self.publish_local(now_ms);
        }
        if self.next_anti_entropy_ms <= now_ms {
            self.next_anti_entropy_ms = now_ms + self.config.anti_entropy_ms;
            self.send_digest(now_ms);
        }
        self.update_liveness(now_ms);
        self.settle_deadline();
    }

    /// The next instant at which [`Registry::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<i64> {
        let mut next = self.next_anti_entropy_ms;
        if let Some(refresh) = self.next_refresh_ms {
            next = next.min(refresh);
        }
        debug_assert!(
            self.deadline.exact || self.deadline.at_ms >= next,
            "the deadline bound is settled after every input"
        );
        debug_assert_eq!(
            next.min(self.deadline.at_ms),
            next.min(DeadlineBound::of(&self.sites, &self.config).at_ms),
            "poll_timeout is what a pass over the view gives"
        );
        Some(next.min(self.deadline.at_ms))
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<RegistryEvent> {
        self.events.pop_front()
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The view: this site first, then every other known site by name.
    pub fn sites(&self, now_ms: i64) -> Vec<SiteView> {
        let mut views = Vec::with_capacity(self.sites.len() + 1);
        if let Some((_, advert)) = &self.local_signed {
            views.push(SiteView {
                site: self.local_id,
                local: true,
                state: SiteState::Alive,
                advert_age_ms: now_ms - advert.issued_at_ms,
                free_now: advert.capacity.min_free(now_ms, now_ms + 1),
                rtt: None,
                advert: advert.clone(),
            });
        }
        let mut others: Vec<SiteView> = self
            .sites
            .values()
            .map(|entry| SiteView {
                site: entry.site,
                local: false,
                state: entry.state,
                advert_age_ms: now_ms - entry.advert().issued_at_ms,
                free_now: entry.advert().capacity.min_free(now_ms, now_ms + 1),
                rtt: self.peers.get(&entry.site).and_then(|p| p.rtt),
                advert: entry.advert().clone(),
            })
            .collect();
        others.sort_by(|a, b| (&a.advert.site_name, a.site).cmp(&(&b.advert.site_name, b.site)));
        views.extend(others);
        views
    }

    /// The name of a site (this one included), if known.
    pub fn site_name(&self, site: &PeerId) -> Option<String> {
        if *site == self.local_id {
            return self.local.as_ref().map(|local| local.site_name.clone());
        }
        self.find(site)
            .map(|(_, entry)| entry.advert().site_name.clone())
    }

    /// Whether any alive remote site has node slots that fit `shape`.
    pub fn offers_shape(&self, shape: &NodeShape) -> bool {
        self.sites.values().any(|entry| {
            entry.state == SiteState::Alive && shape.fits_in(&entry.advert().capacity.node)
        })
    }

    /// Drops a site from the view (an operator forgot it); returns whether
    /// it was there. A site that publishes again is learnt again.
    pub fn forget_site(&mut self, site: &PeerId) -> bool {
        let Some((key, version)) = self.find(site).map(|(key, entry)| (key, entry.version)) else {
            return false;
        };
        if self.forgotten.len() >= FORGOTTEN_MAX
            && let Some(any) = self.forgotten.keys().next().copied()
        {
            self.forgotten.remove(&any);
        }
        self.forgotten.insert(*site, version);
        let entry = self
            .sites
            .remove(&key)
            .expect("find returns a key of the view");
        self.digest.remove(&entry);
        self.deadline = DeadlineBound::of(&self.sites, &self.config);
        true
    }

    /// After a (re)start, the sites this site expects to hear from: those
    /// it remembers or is told to dial. Until it has heard from them all,
    /// or for one refresh and one anti-entropy round from `now_ms` (by
    /// then a live site has sent its advert or a relay of it), the view is
    /// [`Registry::warming`].
    pub fn expect_sites(&mut self, now_ms: i64, sites: impl IntoIterator<Item = PeerId>) {
        // Sites whose adverts this view refuses (an allowlist) are never
        // heard from: waiting for them would only stretch every warm-up.
        let allowed = |site: &PeerId| {
            self.config
                .allowed_sites
                .as_ref()
                .is_none_or(|allowed| allowed.contains(site))
        };
        let sites: BTreeSet<PeerId> = sites
            .into_iter()
            .filter(|site| *site != self.local_id && allowed(site))
            .collect();
        self.expected = (!sites.is_empty()).then(|| Expected {
            sites,
            until_ms: now_ms
                .saturating_add(self.config.refresh_ms)
                .saturating_add(self.config.anti_entropy_ms),
        });
    }

    /// Whether the view is still filling after a start (see [`Warming`]);
    /// `None` once every expected site was heard from or the wait ran out.
    pub fn warming(&self, now_ms: i64) -> Option<Warming> {
        let expected = self.expected.as_ref()?;
        if now_ms >= expected.until_ms {
            return None;
        }
        // The view starts empty: any entry of an expected site is an advert
        // heard since the start, whatever its state now.
        let heard = expected
            .sites
            .iter()
            .filter(|site| self.find(site).is_some())
            .count();
        (heard < expected.sites.len()).then_some(Warming {
            heard,
            expected: expected.sites.len(),
            until_ms: expected.until_ms,
        })
    }

    /// Whether any remote site is alive in the view.
    pub fn any_alive(&self) -> bool {
        self.sites
            .values()
            .any(|entry| entry.state == SiteState::Alive)
    }

    /// The state of one remote site, if known.
    pub fn site_state(&self, site: &PeerId) -> Option<SiteState> {
        self.find(site).map(|(_, entry)| entry.state)
    }

    /// Alive remote sites that could hold nodes of `shape` over
    /// `[start_ms, end_ms)`, best first: most free capacity in the window,
    /// then lowest RTT (unmeasured last), then name. Taking them in this
    /// order needs the fewest sites.
    pub fn candidates(&self, start_ms: i64, end_ms: i64, shape: &NodeShape) -> Vec<Candidate> {
        let mut candidates: Vec<Candidate> = self
            .sites
            .values()
            .filter(|entry| entry.state == SiteState::Alive)
            .filter(|entry| shape.fits_in(&entry.advert().capacity.node))
            .map(|entry| Candidate {
                site: entry.site,
                name: entry.advert().site_name.clone(),
                free: entry.advert().capacity.min_free(start_ms, end_ms),
                rtt: self.peers.get(&entry.site).and_then(|p| p.rtt),
            })
            .filter(|candidate| candidate.free > 0)
            .collect();
        candidates.sort_by(|a, b| {
            b.free
                .cmp(&a.free)
                .then_with(|| match (a.rtt, b.rtt) {
                    (Some(x), Some(y)) => x.cmp(&y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                })
                .then_with(|| a.name.cmp(&b.name))
                .then_with(|| a.site.cmp(&b.site))
        });
        candidates
    }

    fn publish_local(&mut self, now_ms: i64) {
        let Some(local) = self.local.clone() else {
            return;
        };
        self.local_version += 1;
        // Receivers refuse adverts out of bounds: a busy calendar is merged
        // (conservatively) rather than making this site vanish.
        let mut capacity = local.capacity;
        capacity.steps = coarsen_steps(&capacity.steps, ADVERT_STEPS_MAX);
        let mut addrs = local.addrs;
        addrs.truncate(ADVERT_ADDRS_MAX);
        let advert = Advert {
            site: self.local_id,
            site_name: local.site_name,
            version: self.local_version,
            issued_at_ms: now_ms,
            ttl_ms: self.config.advert_ttl_ms,
            capacity,
            gateway: local.gateway,
            addrs,
            software: local.software,
        };
        let signed = match SignedAdvert::sign(&advert, &self.keypair) {
            Ok(signed) => signed,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign the local advert");
                return;
            }
        };
        self.events
            .push_back(RegistryEvent::PersistVersion(self.local_version));
        let data = self.encode_counted(&Message::Advert(signed.clone()));
        self.transmits.push_back(Transmit::Publish { data });
        self.local_signed = Some((signed, advert));
        self.next_refresh_ms = Some(now_ms + self.config.refresh_ms);
    }

    fn send_digest(&mut self, now_ms: i64) {
        let connected: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, info)| info.connected)
            .map(|(peer, _)| *peer)
            .collect();
        if connected.is_empty() {
            return;
        }
        let index = self.rng.below(connected.len() as u64);
        let to = connected[usize::try_from(index).expect("index is below a usize length")];
        self.settle_digest(now_ms);
        let count = self.digest.count + usize::from(self.local_signed.is_some());
        let (hashes, count) = self.bucket_hashes(now_ms, Buckets::for_entries(count));
        let data = self.encode_counted(&Message::DigestBuckets {
            count: u32::try_from(count).unwrap_or(u32::MAX),
            hashes,
        });
        self.transmits.push_back(Transmit::Request { to, data });
    }

    /// The hash (one bucket) and length of [`Registry::digest`], from the
    /// summary kept up to date with the view.
    fn digest_summary(&mut self, now_ms: i64) -> (u64, usize) {
        let (hashes, count) = self.bucket_hashes(now_ms, Buckets::ONE);
        (hashes[0], count)
    }

    /// Brings the digest summary to `now_ms`.
    fn settle_digest(&mut self, now_ms: i64) {
        if self.digest.holds_at(now_ms) {
            self.digest.at_ms = now_ms;
        } else {
            self.digest = DigestSummary::of(&self.sites, now_ms);
        }
    }

    /// The hash of each of `buckets` of [`Registry::digest`], and its
    /// length, from the summary kept up to date with the view.
    fn bucket_hashes(&mut self, now_ms: i64, buckets: Buckets) -> (Vec<u64>, usize) {
        self.settle_digest(now_ms);
        let mut hashes: Vec<u64> = self
            .digest
            .buckets
            .chunks(DIGEST_BUCKETS_MAX / buckets.count())
            .map(|finer| finer.iter().fold(0u64, |sum, hash| sum.wrapping_add(*hash)))
            .collect();
        let mut count = self.digest.count;
        if let Some((_, advert)) = &self.local_signed {
            let hash = &mut hashes[buckets.of(self.local_hash)];
            *hash = hash.wrapping_add(digest_entry_hash(self.local_hash, advert.version));
            count += 1;
        }
        debug_assert_eq!(
            (hashes.clone(), count),
            {
                let entries = self.digest(now_ms);
                (bucket_hashes(&entries, buckets), entries.len())
            },
            "the bucket sums follow the view"
        );
        (hashes, count)
    }

    /// The versions we hold of adverts that are still valid, ours included.
    fn digest(&self, now_ms: i64) -> Vec<DigestEntry> {
        self.digest_in(now_ms, Buckets::ONE, Buckets::ONE.all())
    }

    /// [`Registry::digest`], of the sites in the `buckets` of the set
    /// `differing` only.
    fn digest_in(&self, now_ms: i64, buckets: Buckets, differing: u64) -> Vec<DigestEntry> {
        let mut entries: Vec<DigestEntry> = self
            .runs(buckets, differing)
            .filter(|(_, entry)| entry.expires_at_ms > now_ms)
            .map(|(_, entry)| DigestEntry {
                site: entry.site,
                version: entry.version,
            })
            .collect();
        if let Some((_, advert)) = &self.local_signed
            && buckets.holds(differing, self.local_hash)
        {
            entries.push(DigestEntry {
                site: self.local_id,
                version: advert.version,
            });
        }
        entries
    }

    /// The key and entry of `site` in the view, if it is there.
    fn find(&self, site: &PeerId) -> Option<(ViewKey, &SiteEntry)> {
        self.locate(site, digest_order(peer_hash(site))).ok()
    }

    /// Where `site` (whose [`digest_order`] is `order`) is in the view: `Ok`
    /// with its key and entry, or `Err` with the key it would take, after
    /// the sites whose hashes collide with its own (`None` if none is left).
    fn locate(&self, site: &PeerId, order: u64) -> Result<(ViewKey, &SiteEntry), Option<ViewKey>> {
        // Nearly always the first of its order: one search of the tree.
        let first = ViewKey::first(order);
        if let Some(entry) = self.sites.get(&first)
            && entry.site == *site
        {
            return Ok((first, entry));
        }
        let mut free = Some(first);
        for (key, entry) in self.sites.range(
            first..=ViewKey {
                order,
                nth: u32::MAX,
            },
        ) {
            if entry.site == *site {
                return Ok((*key, entry));
            }
            free = key.nth.checked_add(1).map(|nth| ViewKey { order, nth });
        }
        Err(free)
    }

    /// The entries of the view in the `buckets` of the set `differing`, in
    /// view order: one run of the view per bucket.
    fn runs(
        &self,
        buckets: Buckets,
        differing: u64,
    ) -> impl Iterator<Item = (&ViewKey, &SiteEntry)> {
        (0..buckets.count())
            .filter(move |bucket| differing >> bucket & 1 == 1)
            .flat_map(move |bucket| {
                let (start, end) = buckets.orders(bucket);
                self.sites.range((
                    Bound::Included(ViewKey::first(start)),
                    end.map_or(Bound::Unbounded, |end| Bound::Excluded(ViewKey::first(end))),
                ))
            })
    }

    /// After a peer's digest differed from ours in the `buckets` of the set
    /// `differing` (`theirs` lists its entries there): push what it lacks,
    /// pull what we lack.
    fn reconcile(
        &mut self,
        now_ms: i64,
        peer: PeerId,
        theirs: &[DigestEntry],
        buckets: Buckets,
        differing: u64,
    ) {
        let (they_lack, we_lack) = self.lacking(now_ms, peer, theirs, buckets, differing);
        let push = self.adverts_for(now_ms, &they_lack);
        if !push.is_empty() {
            let data = self.encode_counted(&Message::Adverts(push));
            self.transmits
                .push_back(Transmit::Request { to: peer, data });
        }
        if !we_lack.is_empty() {
            let data = self.encode_counted(&Message::Pull(we_lack));
            self.transmits
                .push_back(Transmit::Request { to: peer, data });
        }
    }

    /// Compares a peer's digest with ours: the sites whose adverts it lacks
    /// or holds older (in our digest's order, never its own), and those we
    /// lack or hold older (in its order, never ours). Where `theirs` lists
    /// a site more than once, its last version is the one it holds, while
    /// each listing is weighed on its own for what we lack. `theirs` covers
    /// the `buckets` of the set `differing`: what it lacks is sought there
    /// only (the other buckets are in sync).
    ///
    /// Only the runs of our view in those buckets are walked; each site
    /// `theirs` lists is looked up.
    fn lacking(
        &self,
        now_ms: i64,
        peer: PeerId,
        theirs: &[DigestEntry],
        buckets: Buckets,
        differing: u64,
    ) -> (Vec<PeerId>, Vec<PeerId>) {
        let orders: Vec<u64> = theirs
            .iter()
            .map(|entry| digest_order(peer_hash(&entry.site)))
            .collect();
        let place = |i: usize| (orders[i], &theirs[i].site);
        let mut order: Vec<usize> = (0..theirs.len()).collect();
        // Stable: listings of one site stay in their order, the last last.
        order.sort_by(|&a, &b| place(a).cmp(&place(b)));
        // Per listing of theirs: whether we lack that version.
        let mut we_lack_listing = vec![false; theirs.len()];
        // The version they hold of each site they list, in view order.
        let mut held: Vec<((u64, &PeerId), u64)> = Vec::with_capacity(theirs.len());
        for group in order.chunk_by(|&a, &b| theirs[a].site == theirs[b].site) {
            let (order, site) = place(group[0]);
            let mine = self
                .locate(site, order)
                .ok()
                .map(|(_, entry)| entry)
                .filter(|entry| entry.expires_at_ms > now_ms)
                .map(|entry| entry.version);
            held.push((
                (order, site),
                weigh(theirs, group, mine, &mut we_lack_listing),
            ));
        }
        let held_of = |order: u64, site: &PeerId| {
            held.binary_search_by(|(listed, _)| listed.cmp(&(order, site)))
                .ok()
                .map(|at| held[at].1)
        };
        let mut they_lack = Vec::new();
        for (key, entry) in self.runs(buckets, differing) {
            if entry.expires_at_ms > now_ms
                && entry.site != peer
                && held_of(key.order, &entry.site).is_none_or(|v| v < entry.version)
            {
                they_lack.push(entry.site);
            }
        }
        if let Some((_, advert)) = &self.local_signed
            && self.local_id != peer
            && held_of(digest_order(self.local_hash), &self.local_id)
                .is_none_or(|v| v < advert.version)
            && buckets.holds(differing, self.local_hash)
        {
            they_lack.push(self.local_id);
        }
        let we_lack = theirs
            .iter()
            .zip(we_lack_listing)
            .filter(|(entry, lack)| *lack && entry.site != self.local_id)
            .map(|(entry, _)| entry.site)
            .take(self.config.sites_max)
            .collect();
        (they_lack, we_lack)
    }

    /// Signed adverts we hold for `sites`, as many as fit one message.
    fn adverts_for(&self, now_ms: i64, sites: &[PeerId]) -> Vec<SignedAdvert> {
        // Leave room for the envelope and the `want` list.
        let budget = self.config.message_max_bytes / 2;
        let mut used = 0;
        let mut adverts = Vec::new();
        // A request naming a site many times gets its advert once.
        let sites: BTreeSet<&PeerId> = sites.iter().collect();
        for site in sites {
            let signed = if *site == self.local_id {
                self.local_signed.as_ref().map(|(signed, _)| signed)
            } else {
                self.find(site)
                    .map(|(_, entry)| entry)
                    .filter(|e| e.expires_at_ms > now_ms)
                    .map(|e| &e.verified.signed)
            };
            let Some(signed) = signed else { continue };
            let size = signed.body.len() + signed.signature.len() + signed.public_key.len() + 16;
            if used + size > budget {
                break;
            }
            used += size;
            adverts.push(signed.clone());
        }
        adverts
    }

    /// Verifies and applies one advert.
    fn apply(&mut self, now_ms: i64, signed: SignedAdvert) -> Verdict {
        let verified = match crate::advert::verify_with(self.verifier.as_deref(), signed) {
            Ok(verified) => verified,
            Err(
                AdvertError::BadKey | AdvertError::BadSignature | AdvertError::WrongSigner { .. },
            ) => {
                self.stats.dropped_forged += 1;
                return Verdict::Reject;
            }
            Err(e) => {
                tracing::debug!(error = %e, "dropping an invalid advert");
                self.stats.dropped_undecodable += 1;
                return Verdict::Reject;
            }
        };
        self.apply_verified(now_ms, verified)
    }

    /// Applies one verified advert.
    fn apply_verified(&mut self, now_ms: i64, verified: Arc<VerifiedAdvert>) -> Verdict {
        let advert = &verified.advert;
        if advert.site == self.local_id {
            // Our own advert coming back to us.
            return Verdict::Ignore;
        }
        if let Some(allowed) = &self.config.allowed_sites
            && !allowed.contains(&advert.site)
        {
            self.stats.dropped_not_allowed += 1;
            return Verdict::Ignore;
        }
        if self.is_expired(advert, now_ms) {
            self.stats.dropped_expired += 1;
            return Verdict::Ignore;
        }
        if advert.issued_at_ms > now_ms.saturating_add(self.config.clock_skew_max_ms) {
            // Issued in our future: the issuer's clock (or ours) is off by
            // more than the allowance. Not the relaying peer's fault.
            self.stats.dropped_expired += 1;
            return Verdict::Ignore;
        }
        if let Some(&version) = self.forgotten.get(&advert.site) {
            if advert.version <= version {
                // A relay of what the operator forgot.
                self.stats.dropped_stale += 1;
                return Verdict::Ignore;
            }
            self.forgotten.remove(&advert.site);
        }
        let fresh_until_ms = self.fresh_until(advert, now_ms);
        let site = advert.site;
        let site_hash = peer_hash(&site);
        let full = self.sites.len() >= self.config.sites_max;
        let (previous, key) = match self.locate(&site, digest_order(site_hash)) {
            Ok((key, _)) => {
                let entry = self.sites.get_mut(&key).expect("just found");
                if entry.version == advert.version {
                    self.stats.adverts_duplicate += 1;
                    return Verdict::Ignore;
                }
                if entry.version > advert.version {
                    self.stats.dropped_stale += 1;
                    return Verdict::Ignore;
                }
                let Some(rate_tat_ms) = rate_allows(&self.config, entry.rate_tat_ms, now_ms) else {
                    self.stats.dropped_rate += 1;
                    return Verdict::Ignore;
                };
                (Some((entry, rate_tat_ms)), key)
            }
            Err(Some(key)) if !full => (None, key),
            Err(_) => {
                self.stats.dropped_full += 1;
                return Verdict::Ignore;
            }
        };
        self.stats.adverts_applied += 1;
        let config = &self.config;
        match &previous {
            Some((previous, _)) if previous.state == SiteState::Alive => {
                self.events.push_back(RegistryEvent::SiteUpdated {
                    site,
                    version: advert.version,
                });
                if previous.advert().addrs != advert.addrs {
                    self.events.push_back(RegistryEvent::SiteAddrs {
                        site,
                        addrs: advert.addrs.clone(),
                    });
                }
            }
            _ => {
                self.events.push_back(RegistryEvent::SiteAlive {
                    site,
                    name: advert.site_name.clone(),
                });
                self.events.push_back(RegistryEvent::SiteUpdated {
                    site,
                    version: advert.version,
                });
                self.events.push_back(RegistryEvent::SiteAddrs {
                    site,
                    addrs: advert.addrs.clone(),
                });
            }
        }
        let rate_tat_ms = match &previous {
            Some((_, rate_tat_ms)) => *rate_tat_ms,
            None => {
                rate_allows(config, i64::MIN, now_ms).expect("a site's first advert is allowed")
            }
        };
        let entry = SiteEntry {
            site,
            site_hash,
            version: advert.version,
            expires_at_ms: config.expires_at(advert),
            verified,
            fresh_until_ms,
            state: SiteState::Alive,
            rate_tat_ms,
        };
        let deadline_ms = config.liveness_deadline(entry.state, entry.fresh_until_ms);
        self.digest.add(&entry);
        match previous {
            Some((previous, _)) => {
                self.deadline
                    .removed(config.liveness_deadline(previous.state, previous.fresh_until_ms));
                self.digest.remove(previous);
                *previous = entry;
            }
            None => {
                self.sites.insert(key, entry);
            }
        }
        self.deadline.added(deadline_ms);
        Verdict::Accept
    }

    /// Whether an advert is past its TTL by the issuer's clock, allowing skew.
    fn is_expired(&self, advert: &Advert, now_ms: i64) -> bool {
        self.config.expires_at(advert) <= now_ms
    }

    /// Until when (our clock) an advert received at `now_ms` counts as fresh:
    /// at most its TTL from now, and no longer than the issuer's clock allows.
    fn fresh_until(&self, advert: &Advert, now_ms: i64) -> i64 {
        let ttl = self.config.ttl_of(advert);
        let by_issuer = advert
            .issued_at_ms
            .saturating_add(ttl)
            .saturating_add(self.config.clock_skew_max_ms);
        now_ms.saturating_add(ttl).min(by_issuer.max(now_ms))
    }

    /// Brings every entry's liveness to `now_ms`, announcing changes in view
    /// order. While time runs forward, liveness only advances (alive,
    /// suspect, gone, forgotten), each entry at its deadline: the view is
    /// visited only when the first deadline is due, or the clock stepped back.
    fn update_liveness(&mut self, now_ms: i64) {
        let due = now_ms < self.liveness_at_ms || self.deadline.at_ms <= now_ms;
        self.liveness_at_ms = now_ms;
        if !due {
            return;
        }
        let config = &self.config;
        let mut forget = Vec::new();
        for (key, entry) in &mut self.sites {
            let site = &entry.site;
            let state = config.liveness(entry.fresh_until_ms, now_ms);
            if state == SiteState::Gone && now_ms >= config.forget_at(entry.fresh_until_ms) {
                forget.push(*key);
            }
            if state == entry.state {
                continue;
            }
            entry.state = state;
            self.events.push_back(match state {
                SiteState::Alive => RegistryEvent::SiteAlive {
                    site: *site,
                    name: entry.advert().site_name.clone(),
                },
                SiteState::Suspect => RegistryEvent::SiteSuspect { site: *site },
                SiteState::Gone => RegistryEvent::SiteGone { site: *site },
            });
        }
        for key in forget {
            let entry = self
                .sites
                .remove(&key)
                .expect("forgotten sites are in the view");
            self.digest.remove(&entry);
        }
        self.deadline = DeadlineBound::of(&self.sites, &self.config);
    }

    /// Makes the deadline bound exact if the next timer would not hide it.
    fn settle_deadline(&mut self) {
        let next_timer_ms = self
            .next_refresh_ms
            .map_or(self.next_anti_entropy_ms, |refresh| {
                refresh.min(self.next_anti_entropy_ms)
            });
        if !self.deadline.exact && self.deadline.at_ms < next_timer_ms {
            self.deadline = DeadlineBound::of(&self.sites, &self.config);
        }
    }

    fn decode(&mut self, data: &[u8]) -> Option<Message> {
        match wire::decode(data, self.config.message_max_bytes) {
            Ok(message) => Some(message),
            Err(WireError::Oversized { .. }) => {
                self.stats.dropped_oversized += 1;
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "dropping an undecodable message");
                self.stats.dropped_undecodable += 1;
                None
            }
        }
    }

    fn encode_counted(&mut self, message: &Message) -> Vec<u8> {
        let data = wire::encode(message);
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += data.len() as u64;
        data
    }
}

/// Whether a site whose adverts' theoretical arrival time is `tat_ms` may
/// have one more applied at `now_ms` (generic cell rate algorithm: at most
/// `advert_burst` at once, then one per `advert_interval_min_ms`); if so,
/// the time after it. While the clock runs forward the time is never more
/// than a burst ahead of it; a time further ahead means the clock stepped
/// back, and is forgotten (the site starts afresh) rather than silencing
/// the site for as long as the step.
fn rate_allows(config: &RegistryConfig, tat_ms: i64, now_ms: i64) -> Option<i64> {
    let interval_ms = config.advert_interval_min_ms.max(1);
    let burst_ms = interval_ms.saturating_mul(i64::from(config.advert_burst.max(1)));
    let tat_ms = if tat_ms > now_ms.saturating_add(burst_ms) {
        now_ms
    } else {
        tat_ms
    };
    if tat_ms.saturating_add(interval_ms) > now_ms.saturating_add(burst_ms) {
        return None;
    }
    Some(tat_ms.max(now_ms).saturating_add(interval_ms))
}

/// Weighs the listings `group` (indices into `theirs`, all of one site)
/// against our version of that site: marks in `lacking` those newer than
/// ours, and returns the version of the last listing.
fn weigh(theirs: &[DigestEntry], group: &[usize], mine: Option<u64>, lacking: &mut [bool]) -> u64 {
    for &i in group {
        lacking[i] = mine.is_none_or(|v| v < theirs[i].version);
    }
    let last = group.last().expect("chunks are non-empty");
    theirs[*last].version
}

/// One entry's share of its bucket's hash ([`bucket_hashes`]); `site_hash`
/// is [`peer_hash`].
fn digest_entry_hash(site_hash: u64, version: u64) -> u64 {
    SplitMix64(site_hash ^ version).next()
}

/// The bucket of a site (by its [`peer_hash`]) in the finest split of the
/// digest, [`DIGEST_BUCKETS_MAX`] buckets: the top bits of the mixed hash,
/// so that a coarser split joins neighbouring buckets.
fn digest_bucket(site_hash: u64) -> usize {
    let bits = DIGEST_BUCKETS_MAX.trailing_zeros();
    usize::try_from(digest_order(site_hash) >> (64 - bits)).expect("below DIGEST_BUCKETS_MAX")
}

/// A site's place in the digest's order (by its [`peer_hash`]): the sites
/// of a bucket, in any split, are a range of it ([`Buckets::orders`]).
fn digest_order(site_hash: u64) -> u64 {
    SplitMix64(site_hash).next()
}

/// An order-independent hash of each bucket of digest entries: equal sets
/// hash equal whatever order they were collected in. The sum of each
/// entry's [`digest_entry_hash`], so that it can be kept up to date entry
/// by entry.
fn bucket_hashes(entries: &[DigestEntry], buckets: Buckets) -> Vec<u64> {
    let mut hashes = vec![0u64; buckets.count()];
    for entry in entries {
        let site_hash = peer_hash(&entry.site);
        let hash = &mut hashes[buckets.of(site_hash)];
        *hash = hash.wrapping_add(digest_entry_hash(site_hash, entry.version));
    }
    hashes
}

/// How a digest is split into buckets: a power of two of them, at most
/// [`DIGEST_BUCKETS_MAX`]. Sets of buckets are bit sets (`u64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Buckets {
    /// log2 of the number of buckets.
    log2: u32,
}

/// Entries per bucket aimed at: a mismatch then resends a few dozen.
const DIGEST_BUCKET_ENTRIES: usize = 16;

const _: () = assert!(DIGEST_BUCKETS_MAX.is_power_of_two() && DIGEST_BUCKETS_MAX <= 64);

impl Buckets {
    /// One bucket: the whole digest.
    const ONE: Buckets = Buckets { log2: 0 };

    /// The split for a digest of `count` entries.
    fn for_entries(count: usize) -> Buckets {
        let count = (count / DIGEST_BUCKET_ENTRIES)
            .next_power_of_two()
            .min(DIGEST_BUCKETS_MAX);
        Buckets {
            log2: count.trailing_zeros(),
        }
    }

    /// The split into `count` buckets, if that is one.
    fn split(count: usize) -> Option<Buckets> {
        (count.is_power_of_two() && count <= DIGEST_BUCKETS_MAX).then(|| Buckets {
            log2: count.trailing_zeros(),
        })
    }

    /// The split and the set of a [`Message::DigestPart`], if valid.
    fn of_part(count: u16, differing: &[u16]) -> Option<(Buckets, u64)> {
        let buckets = Buckets::split(usize::from(count))?;
        let mut set = 0u64;
        for &bucket in differing {
            if usize::from(bucket) >= buckets.count() {
                return None;
            }
            set |= 1 << bucket;
        }
        Some((buckets, set))
    }

    fn count(self) -> usize {
        1 << self.log2
    }

    /// The count as sent.
    fn wire(self) -> u16 {
        u16::try_from(self.count()).expect("at most DIGEST_BUCKETS_MAX")
    }

    /// The bucket of a site, by its [`peer_hash`].
    fn of(self, site_hash: u64) -> usize {
        digest_bucket(site_hash) >> (DIGEST_BUCKETS_MAX.trailing_zeros() - self.log2)
    }

    /// The range of [`digest_order`]s of `bucket`: from, and up to (not
    /// included) unless it is the last.
    fn orders(self, bucket: usize) -> (u64, Option<u64>) {
        if self.log2 == 0 {
            return (0, None);
        }
        let shift = 64 - self.log2;
        let start = (bucket as u64) << shift;
        let end = (bucket + 1 < self.count()).then(|| ((bucket + 1) as u64) << shift);
        (start, end)
    }

    /// Whether the set `set` holds the bucket of a site.
    fn holds(self, set: u64, site_hash: u64) -> bool {
        set >> self.of(site_hash) & 1 == 1
    }

    /// The set of every bucket.
    fn all(self) -> u64 {
        u64::MAX >> (64 - self.count())
    }

    /// The set of the buckets whose hashes differ.
    fn differing(self, mine: &[u64], theirs: &[u64]) -> u64 {
        mine.iter()
            .zip(theirs)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .fold(0, |set, (bucket, _)| set | 1 << bucket)
    }

    /// The buckets of a set, ascending.
    fn indices(self, set: u64) -> Vec<u16> {
        (0..self.wire())
            .filter(|&bucket| set >> bucket & 1 == 1)
            .collect()
    }
}

/// FNV-1a of a peer id's bytes.
fn peer_hash(peer: &PeerId) -> u64 {
    PeerBytes::of(peer)
        .as_slice()
        .iter()
        .fold(0xCBF2_9CE4_8422_2325, |h, byte| {
            (h ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01B3)
        })
}

/// A small, fast, seedable generator (SplitMix64): enough for choosing
/// gossip partners; never used for secrets.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..bound` (`bound > 0`).
    fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "below() needs a positive bound");
        self.next() % bound
    }
}

#[cfg(test)]
mod tests {
    //! The view's summaries (digest hash, deadline bound, reconciliation by
    //! merging) against plain passes over the whole view, kept here as the
    //! reference: same events, states, digests, timers and reconciliations,
    //! under random adverts and a clock that also steps back.

    use proptest::prelude::*;

    use super::*;
    use crate::advert::CapacitySummary;

    const SHAPE: NodeShape = NodeShape {
        cores: 2,
        memory_mib: 4096,
        disk_gib: 20,
    };

    fn config() -> RegistryConfig {
        RegistryConfig {
            advert_ttl_ms: 10_000,
            refresh_ms: 3_000,
            anti_entropy_ms: 1_000,
            suspect_ms: 5_000,
            forget_ms: 20_000,
            clock_skew_max_ms: 2_000,
            ..RegistryConfig::default()
        }
    }

    fn keypair(index: u8) -> Keypair {
        Keypair::ed25519_from_bytes([index; 32]).unwrap()
    }

    fn advert(keypair: &Keypair, version: u64, issued_at_ms: i64, ttl_ms: u32) -> Vec<u8> {
        let advert = Advert {
            site: keypair.public().to_peer_id(),
            site_name: format!("site-{version}"),
            version,
            issued_at_ms,
            ttl_ms,
            capacity: CapacitySummary {
                total_nodes: 4,
                node: SHAPE,
                steps: vec![(0, 2)],
                horizon_end_ms: 1_000_000,
            },
            gateway: None,
            addrs: vec![format!("/ip4/10.0.0.{}/tcp/1", version % 3)],
            software: "test".into(),
        };
        wire::encode(&Message::Advert(
            SignedAdvert::sign(&advert, keypair).unwrap(),
        ))
    }

    /// FNV-1a of a peer id's bytes.
    fn reference_peer_hash(site: &PeerId) -> u64 {
        let mut h: u64 = 0xCBF2_9CE4_8422_2325;
        for byte in site.to_bytes() {
            h = (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3);
        }
        h
    }

    /// The digest hash by its definition: FNV-1a of each peer id's bytes,
    /// mixed with the version, summed.
    fn reference_digest_hash(entries: &[DigestEntry]) -> u64 {
        entries.iter().fold(0u64, |sum, entry| {
            let h = reference_peer_hash(&entry.site);
            sum.wrapping_add(SplitMix64(h ^ entry.version).next())
        })
    }

    /// The bucket of a site among `2^log2` by its definition: the top bits
    /// of its mixed peer hash.
    fn reference_bucket(site: &PeerId, log2: u32) -> usize {
        if log2 == 0 {
            return 0;
        }
        usize::try_from(SplitMix64(reference_peer_hash(site)).next() >> (64 - log2)).unwrap()
    }

    /// The hashes of `2^log2` buckets by their definition: the digest hash
    /// of the entries in each.
    fn reference_bucket_hashes(entries: &[DigestEntry], log2: u32) -> Vec<u64> {
        (0..1usize << log2)
            .map(|bucket| {
                let inside: Vec<DigestEntry> = entries
                    .iter()
                    .filter(|entry| reference_bucket(&entry.site, log2) == bucket)
                    .copied()
                    .collect();
                reference_digest_hash(&inside)
            })
            .collect()
    }

    /// `poll_timeout` as a pass over the view.
    fn reference_poll_timeout(registry: &Registry) -> Option<i64> {
        let config = &registry.config;
        let mut next = registry.next_anti_entropy_ms;
        if let Some(refresh) = registry.next_refresh_ms {
            next = next.min(refresh);
        }
        for entry in registry.sites.values() {
            let at = match entry.state {
                SiteState::Alive => entry.fresh_until_ms,
                SiteState::Suspect => entry.fresh_until_ms + config.suspect_ms,
                SiteState::Gone => entry.fresh_until_ms + config.suspect_ms + config.forget_ms,
            };
            next = next.min(at);
        }
        Some(next)
    }

    /// Liveness as a pass over the view (leaves the indexes stale: the
    /// registry is only looked at afterwards).
    fn reference_update_liveness(registry: &mut Registry, now_ms: i64) {
        let suspect_ms = registry.config.suspect_ms;
        let forget_ms = registry.config.forget_ms;
        let mut forget = Vec::new();
        for (key, entry) in &mut registry.sites {
            let site = &entry.site;
            let state = if now_ms < entry.fresh_until_ms {
                SiteState::Alive
            } else if now_ms < entry.fresh_until_ms + suspect_ms {
                SiteState::Suspect
            } else {
                SiteState::Gone
            };
            if state == SiteState::Gone && now_ms >= entry.fresh_until_ms + suspect_ms + forget_ms {
                forget.push(*key);
            }
            if state == entry.state {
                continue;
            }
            entry.state = state;
            registry.events.push_back(match state {
                SiteState::Alive => RegistryEvent::SiteAlive {
                    site: *site,
                    name: entry.advert().site_name.clone(),
                },
                SiteState::Suspect => RegistryEvent::SiteSuspect { site: *site },
                SiteState::Gone => RegistryEvent::SiteGone { site: *site },
            });
        }
        for key in forget {
            registry.sites.remove(&key);
        }
    }

    /// What a peer's digest lacks (in the buckets of `set`, of `2^log2`)
    /// and what we lack, through maps.
    fn reference_lacking(
        registry: &Registry,
        now_ms: i64,
        peer: PeerId,
        theirs: &[DigestEntry],
        (log2, set): (u32, u64),
    ) -> (Vec<PeerId>, Vec<PeerId>) {
        let theirs_by_site: BTreeMap<PeerId, u64> =
            theirs.iter().map(|e| (e.site, e.version)).collect();
        let mine = registry.digest(now_ms);
        let mine_by_site: BTreeMap<PeerId, u64> =
            mine.iter().map(|e| (e.site, e.version)).collect();
        let they_lack = mine
            .iter()
            .filter(|entry| entry.site != peer)
            .filter(|entry| set >> reference_bucket(&entry.site, log2) & 1 == 1)
            .filter(|entry| {
                theirs_by_site
                    .get(&entry.site)
                    .is_none_or(|v| *v < entry.version)
            })
            .map(|entry| entry.site)
            .collect();
        let we_lack = theirs
            .iter()
            .filter(|entry| entry.site != registry.local_id)
            .filter(|entry| {
                mine_by_site
                    .get(&entry.site)
                    .is_none_or(|v| *v < entry.version)
            })
            .map(|entry| entry.site)
            .take(registry.config.sites_max)
            .collect();
        (they_lack, we_lack)
    }

    fn states(registry: &Registry) -> Vec<(PeerId, SiteState, i64)> {
        registry
            .sites
            .values()
            .map(|entry| (entry.site, entry.state, entry.fresh_until_ms))
            .collect()
    }

    fn check_indexes(registry: &Registry) {
        let exact = DeadlineBound::of(&registry.sites, &registry.config).at_ms;
        assert!(registry.deadline.at_ms <= exact);
        if registry.deadline.exact {
            assert_eq!(registry.deadline.at_ms, exact);
        }
        assert_eq!(registry.poll_timeout(), reference_poll_timeout(registry));
    }

    /// Only some steps look at the digest, so that the view also changes
    /// while the summary describes an earlier instant.
    fn check_digest(registry: &mut Registry, now_ms: i64) {
        let entries = registry.digest(now_ms);
        assert_eq!(
            registry.digest_summary(now_ms),
            (reference_digest_hash(&entries), entries.len())
        );
        for log2 in [0, 1, 3, 6] {
            let buckets = Buckets { log2 };
            assert_eq!(
                registry.bucket_hashes(now_ms, buckets),
                (reference_bucket_hashes(&entries, log2), entries.len())
            );
            // The entries of each bucket (one run of the view) are those
            // the bucket's hash covers.
            let reference = reference_bucket_hashes(&entries, log2);
            for (bucket, hash) in reference.iter().enumerate() {
                let inside = registry.digest_in(now_ms, buckets, 1 << bucket);
                assert_eq!(reference_digest_hash(&inside), *hash, "bucket {bucket}");
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Gossip of an advert: site, version, issued (from now), TTL.
        Advert(u8, u64, i64, u32),
        /// The clock moves (also back).
        Clock(i64),
        /// A timer.
        Timeout,
        /// This site changes its advert.
        Local(u32),
        /// A peer's digest: (site, version) listings; site 6 is us, 7 the
        /// peer; covering `2^log2` buckets of which those of a set differ.
        Digest(Vec<(u8, u64)>, u32, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6, 1u64..8, -15_000i64..3_000, 1u32..30_000)
                .prop_map(|(s, v, i, t)| Op::Advert(s, v, i, t)),
            3 => (-8_000i64..25_000).prop_map(Op::Clock),
            3 => Just(Op::Timeout),
            1 => (0u32..4).prop_map(Op::Local),
            2 => (prop::collection::vec((0u8..8, 0u64..9), 0..12), 0u32..=6, any::<u64>())
                .prop_map(|(listings, log2, set)| Op::Digest(listings, log2, set)),
        ]
    }

    /// Sites whose peer hashes collide share a digest order: each keeps
    /// its own key, the later one after the earlier.
    #[test]
    fn sites_whose_hashes_collide_keep_their_own_places() {
        let now = 1_000_000;
        let (a, c) = (keypair(1), keypair(2));
        let (a_id, c_id) = (a.public().to_peer_id(), c.public().to_peer_id());
        let mut registry = Registry::new(config(), keypair(6), 0, 9, now);
        // Site c, as if its hash were a's: at the first key of a's order.
        registry.handle_gossip(now, &advert(&c, 1, now, 10_000));
        let (c_key, c_entry) = registry.find(&c_id).expect("c is in the view");
        let c_entry = c_entry.clone();
        registry.sites.remove(&c_key);
        let a_order = digest_order(peer_hash(&a_id));
        registry.sites.insert(ViewKey::first(a_order), c_entry);

        let applied = |registry: &mut Registry, version| {
            registry.handle_gossip(now, &advert(&a, version, now, 10_000))
        };
        assert_eq!(applied(&mut registry, 1), Verdict::Accept);
        let (key, entry) = registry.find(&a_id).expect("a is in the view");
        assert_eq!(
            key,
            ViewKey {
                order: a_order,
                nth: 1
            }
        );
        assert_eq!((entry.site, entry.version), (a_id, 1));
        assert_eq!(applied(&mut registry, 1), Verdict::Ignore);
        assert_eq!(registry.stats.adverts_duplicate, 1);
        assert_eq!(applied(&mut registry, 2), Verdict::Accept);
        let (key, entry) = registry.find(&a_id).expect("a is in the view");
        assert_eq!((key.nth, entry.version), (1, 2));
        // The earlier site is where it was, untouched.
        let first = &registry.sites[&ViewKey::first(a_order)];
        assert_eq!((first.site, first.version), (c_id, 1));
        assert_eq!(registry.sites.len(), 2);
        assert_eq!(
            registry.site_state(&a_id),
            Some(SiteState::Alive),
            "found past the colliding site"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn indexes_decide_as_passes_over_the_view(ops in prop::collection::vec(op(), 1..80)) {
            let sites: Vec<Keypair> = (0..6).map(keypair).collect();
            let me = keypair(6);
            let peer = keypair(7).public().to_peer_id();
            let mut now = 1_000_000;
            let mut registry = Registry::new(config(), me.clone(), 0, 9, now);
            registry.peer_connected(peer);
            for op in ops {
                match op {
                    Op::Advert(site, version, issued, ttl) => {
                        let data = advert(&sites[usize::from(site)], version, now + issued, ttl);
                        registry.handle_gossip(now, &data);
                    }
                    Op::Clock(step) => now += step,
                    Op::Timeout => {
                        let mut reference = registry.clone();
                        registry.update_liveness(now);
                        reference_update_liveness(&mut reference, now);
                        prop_assert_eq!(&registry.events, &reference.events);
                        prop_assert_eq!(states(&registry), states(&reference));
                        // The timers too (liveness has nothing left to do).
                        registry.handle_timeout(now);
                    }
                    Op::Local(free) => registry.set_local(
                        now,
                        LocalAdvert {
                            site_name: "me".into(),
                            capacity: CapacitySummary {
                                total_nodes: 4,
                                node: SHAPE,
                                steps: vec![(0, free)],
                                horizon_end_ms: 1_000_000,
                            },
                            gateway: None,
                            addrs: vec![],
                            software: "test".into(),
                        },
                    ),
                    Op::Digest(listings, log2, set) => {
                        let theirs: Vec<DigestEntry> = listings
                            .iter()
                            .map(|&(site, version)| DigestEntry {
                                site: match site {
                                    6 => me.public().to_peer_id(),
                                    7 => peer,
                                    _ => sites[usize::from(site)].public().to_peer_id(),
                                },
                                version,
                            })
                            .collect();
                        let buckets = Buckets { log2 };
                        let set = set & buckets.all();
                        prop_assert_eq!(
                            registry.lacking(now, peer, &theirs, buckets, set),
                            reference_lacking(&registry, now, peer, &theirs, (log2, set))
                        );
                        check_digest(&mut registry, now);
                    }
                }
                check_indexes(&registry);
            }
        }
    }
}
