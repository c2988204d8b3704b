//! Tests of the cluster core on a simulated federation.
//!
//! The simulator drives every site's [`ClusterCore`] and in-memory [`Ledger`]
//! on a virtual clock: no sleeps, sockets or tokio. The network is a queue of
//! envelopes ordered by delivery time; loss, duplication and latency (hence
//! reordering) come from a seeded SplitMix64, so a failing seed replays
//! exactly. The [`SiteDirectory`] each core sees is built from the other
//! sites' ledgers (their "adverts"), refreshed before every call (perfect
//! gossip) or only every so often (stale gossip).
//!
//! After every event, the site it touched is checked: no instant of any
//! window is overbooked (brute force over the window boundaries of the
//! reservations that count), and no cluster it masters has more nodes taken
//! than asked, or is `reserved` without exactly the nodes asked committed.
//! The sweeps check the end state of every cluster once the faults stopped.
//!
//! A failing simulation panics with `seed N:` and the last events; replay it
//! with `VCFED_SIM_SEEDS=N cargo test -p vcfed --lib cluster`, or run a
//! longer sweep with `VCFED_SIM_SEEDS=0..20000`.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use libp2p_identity::{Keypair, PeerId};
use vcfed_registry::Candidate;
use vcfed_storage::{
    ClusterRecord, ClusterState, Inventory, InventoryHost, Ledger, NodeShape, PartState,
    Reservation, ReservationFilter, ReservationState, Usage, Window, min_free,
};

use super::{
    ClusterConfig, ClusterCore, ClusterMsg, ClusterRequest, CreateError, DeleteError, ReportedNode,
    SiteDirectory,
};

/// Virtual time at which every simulation starts, unix ms.
const T0_MS: i64 = 1_700_000_000_000;
const SECOND_MS: i64 = 1_000;
const HOUR_MS: i64 = 3_600_000;
/// Events one simulation may process before it is declared stuck.
const STEPS_MAX: u64 = 100_000;
/// How often every site sweeps expired holds, ms.
const SWEEP_PERIOD_MS: i64 = 5_000;
/// Last lines of the event trace kept for a failure message.
const TRACE_LINES_MAX: usize = 80;
/// Seeds of the concurrent-masters sweep.
const CONCURRENT_SEEDS: u64 = 100;
/// Seeds of the message-fault sweep.
const FAULT_SEEDS: u64 = 200;

/// The node slot every simulated site offers.
/// The gateway each simulated site tells the others about.
fn gateway_of(site: &str) -> vcfed_storage::GatewayRef {
    vcfed_storage::GatewayRef {
        endpoint: format!("{site}.gw:7782"),
        public_key: format!("key-of-{site}"),
    }
}

fn slot() -> NodeShape {
    NodeShape {
        cores: 4,
        memory_mib: 8192,
        disk_gib: 40,
    }
}

/// The node shape the tests ask for (fits the slot).
fn shape() -> NodeShape {
    NodeShape {
        cores: 2,
        memory_mib: 4096,
        disk_gib: 20,
    }
}

/// A window that starts an hour after `now_ms` and lasts two hours.
fn window_after(now_ms: i64) -> Window {
    Window {
        start_ms: now_ms + HOUR_MS,
        end_ms: now_ms + 3 * HOUR_MS,
    }
}

fn request(nodes: u32, window: Window) -> ClusterRequest {
    ClusterRequest {
        name: "sim".to_owned(),
        nodes,
        shape: shape(),
        window,
        image: None,
    }
}

/// A window between one and five hours after [`T0_MS`], from half an hour
/// to two hours long, so that random windows overlap in part or not at all.
fn random_window(rng: &mut SplitMix64) -> Window {
    let start_ms = T0_MS + HOUR_MS + rng.between(0, 2 * HOUR_MS);
    let end_ms = start_ms + rng.between(HOUR_MS / 2, 2 * HOUR_MS);
    Window { start_ms, end_ms }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, seedable, good enough for
/// choosing faults.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo <= hi, "empty range {lo}..={hi}");
        lo + (self.next_u64() % ((hi - lo) as u64 + 1)) as i64
    }

    fn chance_per_mille(&mut self, per_mille: u64) -> bool {
        self.next_u64() % 1000 < per_mille
    }
}

/// What one site publishes about itself: its free capacity over time.
#[derive(Debug, Clone)]
struct Advert {
    peer: PeerId,
    name: String,
    node: NodeShape,
    capacity: u32,
    /// Reservations that counted when the advert was taken.
    usages: Vec<Usage>,
}

/// The registry's view as one site sees it: the other sites' adverts.
struct Directory {
    adverts: Vec<Advert>,
}

impl SiteDirectory for Directory {
    fn candidates(&self, start_ms: i64, end_ms: i64, shape: &NodeShape) -> Vec<Candidate> {
        let Some(window) = Window::new(start_ms, end_ms) else {
            return Vec::new();
        };
        let mut candidates: Vec<Candidate> = self
            .adverts
            .iter()
            .filter(|advert| shape.fits_in(&advert.node))
            .map(|advert| Candidate {
                site: advert.peer,
                name: advert.name.clone(),
                free: min_free(advert.capacity, &advert.usages, window),
                rtt: None,
            })
            .filter(|candidate| candidate.free > 0)
            .collect();
        // The registry's order: most free first, then by name.
        candidates.sort_by(|a, b| b.free.cmp(&a.free).then_with(|| a.name.cmp(&b.name)));
        candidates
    }

    fn site_name(&self, site: &PeerId) -> Option<String> {
        self.adverts
            .iter()
            .find(|advert| advert.peer == *site)
            .map(|advert| advert.name.clone())
    }

    fn offers_shape(&self, shape: &NodeShape) -> bool {
        self.adverts
            .iter()
            .any(|advert| shape.fits_in(&advert.node))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Request,
    Reply,
}

#[derive(Debug, Clone)]
struct Envelope {
    from: usize,
    to: usize,
    flow: Flow,
    msg: ClusterMsg,
    /// Order of sending; both copies of a duplicate share it.
    sent_seq: u64,
}

/// Network behaviour: faulty until `until_ms`, then calm (no loss, no
/// duplicates, fixed latency).
#[derive(Debug, Clone)]
struct Faults {
    loss_per_mille: u64,
    dup_per_mille: u64,
    latency_min_ms: i64,
    latency_max_ms: i64,
    until_ms: i64,
    calm_latency_ms: i64,
}

impl Faults {
    /// A perfect network with a fixed latency.
    fn none(latency_ms: i64) -> Faults {
        Faults {
            loss_per_mille: 0,
            dup_per_mille: 0,
            latency_min_ms: latency_ms,
            latency_max_ms: latency_ms,
            until_ms: T0_MS,
            calm_latency_ms: latency_ms,
        }
    }
}

struct Site {
    name: String,
    peer: PeerId,
    capacity: u32,
    ledger: Ledger,
    core: ClusterCore,
    /// False while the site is cut off: every message to or from it is lost.
    reachable: bool,
    advert: Advert,
    published_at_ms: i64,
}

/// Per message kind: how often it was sent, lost, duplicated, reordered.
#[derive(Debug, Default)]
struct Stats {
    sent: BTreeMap<&'static str, u64>,
    lost: BTreeMap<&'static str, u64>,
    duplicated: BTreeMap<&'static str, u64>,
    reordered: BTreeMap<&'static str, u64>,
    /// Clusters that ended reserved, failed, deleted, or refused at `create`.
    reserved: u64,
    deleted: u64,
    failed: u64,
    refused: u64,
    /// Events processed.
    steps: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        for (mine, theirs) in [
            (&mut self.sent, &other.sent),
            (&mut self.lost, &other.lost),
            (&mut self.duplicated, &other.duplicated),
            (&mut self.reordered, &other.reordered),
        ] {
            for (kind, count) in theirs {
                *mine.entry(kind).or_default() += count;
            }
        }
        self.reserved += other.reserved;
        self.deleted += other.deleted;
        self.failed += other.failed;
        self.refused += other.refused;
        self.steps += other.steps;
    }
}

type EnvelopeFilter = Box<dyn Fn(&Envelope) -> bool>;

struct Sim {
    seed: u64,
    now_ms: i64,
    config: ClusterConfig,
    sites: Vec<Site>,
    index: BTreeMap<PeerId, usize>,
    /// Messages in flight by (delivery time, sequence).
    queue: BTreeMap<(i64, u64), Envelope>,
    seq: u64,
    /// Highest `sent_seq` delivered per (from, to) link, to spot reordering.
    last_delivered: BTreeMap<(usize, usize), u64>,
    rng: SplitMix64,
    faults: Faults,
    /// 0: adverts are refreshed before every core call.
    gossip_period_ms: i64,
    next_sweep_ms: i64,
    /// Messages matching this are lost on delivery.
    drop_if: Option<EnvelopeFilter>,
    /// Once a delivered message matches, the site is cut off.
    cut_after: Option<(usize, EnvelopeFilter)>,
    stats: Stats,
    steps: u64,
    trace: VecDeque<String>,
}

fn kind(msg: &ClusterMsg) -> &'static str {
    match msg {
        ClusterMsg::Reserve { .. } => "reserve",
        ClusterMsg::Commit { .. } => "commit",
        ClusterMsg::Release { .. } => "release",
        ClusterMsg::Held { .. } => "held",
        ClusterMsg::Denied { .. } => "denied",
        ClusterMsg::Committed { .. } => "committed",
        ClusterMsg::Released { .. } => "released",
        ClusterMsg::Refused { .. } => "refused",
        ClusterMsg::Nodes { .. } => "nodes",
        ClusterMsg::NodesNoted { .. } => "nodes-noted",
    }
}

const ALL_KINDS: [&str; 8] = [
    "reserve",
    "commit",
    "release",
    "held",
    "denied",
    "committed",
    "released",
    "refused",
];

impl Sim {
    fn new(seed: u64, capacities: &[u32], config: ClusterConfig, faults: Faults) -> Sim {
        let mut sites = Vec::new();
        let mut index = BTreeMap::new();
        for (i, &capacity) in capacities.iter().enumerate() {
            let name = char::from(b'A' + u8::try_from(i).expect("few sites")).to_string();
            let mut ledger = Ledger::open_in_memory().expect("an in-memory ledger opens");
            let inventory = Inventory {
                node: slot(),
                hosts: vec![InventoryHost {
                    name: format!("{name}-host"),
                    cores: 64,
                    memory_mib: 262_144,
                    disk_gib: 4_000,
                    slots: capacity,
                }],
            };
            ledger
                .set_inventory(&inventory, T0_MS)
                .expect("the inventory is valid");
            let peer = Keypair::generate_ed25519().public().to_peer_id();
            index.insert(peer, i);
            let advert = Advert {
                peer,
                name: name.clone(),
                node: slot(),
                capacity,
                usages: Vec::new(),
            };
            sites.push(Site {
                core: ClusterCore::new(peer, name.clone(), Some(gateway_of(&name)), config.clone()),
                name,
                peer,
                capacity,
                ledger,
                reachable: true,
                advert,
                published_at_ms: T0_MS,
            });
        }
        Sim {
            seed,
            now_ms: T0_MS,
            config,
            sites,
            index,
            queue: BTreeMap::new(),
            seq: 0,
            last_delivered: BTreeMap::new(),
            rng: SplitMix64(seed),
            faults,
            gossip_period_ms: 0,
            next_sweep_ms: T0_MS + SWEEP_PERIOD_MS,
            drop_if: None,
            cut_after: None,
            stats: Stats::default(),
            steps: 0,
            trace: VecDeque::new(),
        }
    }

    /// Panics with the seed and the end of the trace.
    fn fail(&self, what: &str) -> ! {
        let mut trace = String::new();
        for line in &self.trace {
            let _ = writeln!(trace, "  {line}");
        }
        panic!(
            "seed {}: at t+{}ms: {what}\nlast events:\n{trace}",
            self.seed,
            self.now_ms - T0_MS
        );
    }

    fn log(&mut self, line: String) {
        if self.trace.len() == TRACE_LINES_MAX {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("t+{}ms {line}", self.now_ms - T0_MS));
    }

    fn create(&mut self, site: usize, id: &str, nodes: u32) -> Result<ClusterRecord, CreateError> {
        let window = window_after(self.now_ms);
        self.create_request(site, id, request(nodes, window))
    }

    fn create_request(
        &mut self,
        site: usize,
        id: &str,
        request: ClusterRequest,
    ) -> Result<ClusterRecord, CreateError> {
        self.publish();
        let directory = self.directory(site);
        let now_ms = self.now_ms;
        let entry = &mut self.sites[site];
        let created = entry.core.create(
            &mut entry.ledger,
            &directory,
            now_ms,
            id.to_owned(),
            request,
        );
        let line = match &created {
            Ok(record) => format!("{} creates {id}: {}", self.sites[site].name, record.state),
            Err(e) => format!("{} refuses {id}: {e}", self.sites[site].name),
        };
        self.log(line);
        self.check_site(site);
        self.flush();
        created
    }

    fn delete(&mut self, site: usize, id: &str) -> Result<ClusterRecord, DeleteError> {
        let now_ms = self.now_ms;
        let entry = &mut self.sites[site];
        let deleted = entry.core.delete(&mut entry.ledger, now_ms, id);
        self.log(format!(
            "{} deletes {id}: {:?}",
            self.sites[site].name,
            deleted.as_ref().map(|r| r.state)
        ));
        self.check_site(site);
        self.flush();
        deleted
    }

    /// The site's process restarts: a fresh core over the same ledger.
    fn restart(&mut self, site: usize) {
        let now_ms = self.now_ms;
        let entry = &mut self.sites[site];
        entry.core = ClusterCore::new(
            entry.peer,
            entry.name.clone(),
            Some(gateway_of(&entry.name)),
            self.config.clone(),
        );
        if let Err(e) = entry.core.resume(&mut entry.ledger, now_ms) {
            self.fail(&format!("resume failed: {e:#}"));
        }
        self.log(format!("{} restarted", self.sites[site].name));
        self.check_site(site);
        self.flush();
    }

    /// Refreshes the adverts that are due.
    fn publish(&mut self) {
        let now_ms = self.now_ms;
        for site in &mut self.sites {
            if self.gossip_period_ms > 0 && now_ms < site.published_at_ms + self.gossip_period_ms {
                continue;
            }
            let active = site
                .ledger
                .reservations(ReservationFilter::Active, now_ms)
                .expect("the ledger reads");
            site.advert.usages = active
                .iter()
                .map(|r| Usage {
                    window: r.window,
                    nodes: r.nodes,
                })
                .collect();
            site.published_at_ms = now_ms;
        }
    }

    fn directory(&self, viewer: usize) -> Directory {
        let adverts = self
            .sites
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != viewer)
            .map(|(_, site)| site.advert.clone())
            .collect();
        Directory { adverts }
    }

    /// Drains every core's outputs into the network.
    fn flush(&mut self) {
        for from in 0..self.sites.len() {
            while let Some((peer, msg)) = self.sites[from].core.poll_transmit() {
                let Some(&to) = self.index.get(&peer) else {
                    self.fail(&format!(
                        "{} sends to an unknown peer {peer}",
                        self.sites[from].name
                    ));
                };
                if to == from {
                    self.fail(&format!(
                        "{} sends {msg:?} to itself",
                        self.sites[from].name
                    ));
                }
                self.send(from, to, Flow::Request, msg);
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, flow: Flow, msg: ClusterMsg) {
        let kind = kind(&msg);
        *self.stats.sent.entry(kind).or_default() += 1;
        self.seq += 1;
        let sent_seq = self.seq;
        let faulty = self.now_ms < self.faults.until_ms;
        if faulty && self.rng.chance_per_mille(self.faults.loss_per_mille) {
            *self.stats.lost.entry(kind).or_default() += 1;
            self.log(format!(
                "{}->{} {msg:?} LOST",
                self.sites[from].name, self.sites[to].name
            ));
            return;
        }
        let copies = if faulty && self.rng.chance_per_mille(self.faults.dup_per_mille) {
            *self.stats.duplicated.entry(kind).or_default() += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let latency_ms = if faulty {
                self.rng
                    .between(self.faults.latency_min_ms, self.faults.latency_max_ms)
            } else {
                self.faults.calm_latency_ms
            };
            self.seq += 1;
            let envelope = Envelope {
                from,
                to,
                flow,
                msg: msg.clone(),
                sent_seq,
            };
            self.queue
                .insert((self.now_ms + latency_ms, self.seq), envelope);
        }
    }

    /// Runs events until `until_ms` (or, if `stop_when_quiet`, until no
    /// message is in flight and no core has a timer).
    fn run(&mut self, until_ms: i64, stop_when_quiet: bool) {
        loop {
            self.flush();
            let next_msg = self.queue.keys().next().map(|(at, _)| *at);
            let next_timer = self
                .sites
                .iter()
                .filter_map(|s| s.core.poll_timeout())
                .min();
            if stop_when_quiet && next_msg.is_none() && next_timer.is_none() {
                return;
            }
            let next = [next_msg, next_timer, Some(self.next_sweep_ms)]
                .into_iter()
                .flatten()
                .min()
                .expect("a sweep is always scheduled");
            if next > until_ms {
                self.now_ms = self.now_ms.max(until_ms);
                return;
            }
            self.now_ms = self.now_ms.max(next);
            self.steps += 1;
            if self.steps > STEPS_MAX {
                self.fail("the simulation does not settle (too many events)");
            }
            if next_msg.is_some_and(|at| at <= self.now_ms) {
                self.deliver_next();
            } else if next_timer.is_some_and(|at| at <= self.now_ms) {
                self.fire_timers();
            } else {
                self.sweep();
                self.next_sweep_ms += SWEEP_PERIOD_MS;
            }
        }
    }

    fn run_until(&mut self, until_ms: i64) {
        self.run(until_ms, false);
    }

    fn run_quiet(&mut self, until_ms: i64) {
        self.run(until_ms, true);
    }

    fn sweep(&mut self) {
        let now_ms = self.now_ms;
        for site in &mut self.sites {
            site.ledger
                .sweep_expired(now_ms)
                .expect("the sweep succeeds");
        }
    }

    fn fire_timers(&mut self) {
        let now_ms = self.now_ms;
        for i in 0..self.sites.len() {
            if self.sites[i]
                .core
                .poll_timeout()
                .is_none_or(|at| at > now_ms)
            {
                continue;
            }
            self.publish();
            let directory = self.directory(i);
            let site = &mut self.sites[i];
            if let Err(e) = site
                .core
                .handle_timeout(&mut site.ledger, &directory, now_ms)
            {
                self.fail(&format!(
                    "handle_timeout at {} failed: {e:#}",
                    self.sites[i].name
                ));
            }
            if self.sites[i]
                .core
                .poll_timeout()
                .is_some_and(|at| at < now_ms)
            {
                self.fail(&format!(
                    "{} has a timer in the past after handling timeouts",
                    self.sites[i].name
                ));
            }
            self.check_site(i);
        }
    }

    fn deliver_next(&mut self) {
        let Some((_, envelope)) = self.queue.pop_first() else {
            return;
        };
        let (from, to) = (envelope.from, envelope.to);
        let route = format!("{}->{}", self.sites[from].name, self.sites[to].name);
        if !self.sites[from].reachable || !self.sites[to].reachable {
            self.log(format!("{route} {:?} dropped (site cut off)", envelope.msg));
            return;
        }
        if self
            .drop_if
            .as_ref()
            .is_some_and(|drop_if| drop_if(&envelope))
        {
            self.log(format!("{route} {:?} dropped (filter)", envelope.msg));
            return;
        }
        let last = self.last_delivered.entry((from, to)).or_default();
        if envelope.sent_seq < *last {
            *self.stats.reordered.entry(kind(&envelope.msg)).or_default() += 1;
        } else {
            *last = envelope.sent_seq;
        }
        self.log(format!("{route} {:?}", envelope.msg));
        self.publish();
        let directory = self.directory(to);
        let now_ms = self.now_ms;
        let from_peer = self.sites[from].peer;
        let site = &mut self.sites[to];
        match envelope.flow {
            Flow::Request => {
                match site.core.handle_request(
                    &mut site.ledger,
                    &directory,
                    now_ms,
                    from_peer,
                    envelope.msg.clone(),
                ) {
                    Ok(Some(answer)) => self.send(to, from, Flow::Reply, answer),
                    Ok(None) => self.fail(&format!("a request got no answer: {:?}", envelope.msg)),
                    Err(e) => self.fail(&format!("handle_request failed: {e:#}")),
                }
            }
            Flow::Reply => {
                if let Err(e) = site.core.handle_reply(
                    &mut site.ledger,
                    &directory,
                    now_ms,
                    from_peer,
                    envelope.msg.clone(),
                ) {
                    self.fail(&format!("handle_reply failed: {e:#}"));
                }
            }
        }
        self.check_site(to);
        if self
            .cut_after
            .as_ref()
            .is_some_and(|(_, matches)| matches(&envelope))
        {
            let (site, _) = self.cut_after.take().expect("checked above");
            self.log(format!("{} is cut off", self.sites[site].name));
            self.sites[site].reachable = false;
        }
    }

    /// The invariants that hold after every event at `site`.
    fn check_site(&self, site: usize) {
        self.check_capacity(site);
        self.check_mastered(site);
    }

    /// A master never has more nodes held or committed than asked, and a
    /// cluster it calls reserved has exactly the nodes asked, committed.
    fn check_mastered(&self, site: usize) {
        let entry = &self.sites[site];
        for record in entry.ledger.clusters().expect("the ledger reads") {
            if record.master_site != entry.name {
                continue;
            }
            let nodes = record.request["nodes"]
                .as_u64()
                .expect("the request has nodes");
            let sum = |states: &[PartState]| -> u64 {
                let parts = record.parts.iter().filter(|p| states.contains(&p.state));
                parts.map(|p| u64::from(p.nodes)).sum()
            };
            let committed = sum(&[PartState::Committed]);
            let taken = sum(&[PartState::Held, PartState::Committing, PartState::Committed]);
            let bad = match record.state {
                ClusterState::Reserving => taken > nodes,
                ClusterState::Reserved => committed != nodes || taken != nodes,
                _ => false,
            };
            if bad {
                self.fail(&format!(
                    "{} is {} with {taken} nodes taken, {committed} committed, {nodes} asked: {:#?}",
                    record.id, record.state, record.parts
                ));
            }
        }
    }

    /// No instant of any window holds more nodes than the site has.
    fn check_capacity(&self, site: usize) {
        let entry = &self.sites[site];
        let active = entry
            .ledger
            .reservations(ReservationFilter::Active, self.now_ms)
            .expect("the ledger reads");
        for reservation in &active {
            let at_ms = reservation.window.start_ms;
            let used: u64 = active
                .iter()
                .filter(|r| r.window.start_ms <= at_ms && at_ms < r.window.end_ms)
                .map(|r| u64::from(r.nodes))
                .sum();
            if used > u64::from(entry.capacity) {
                self.fail(&format!(
                    "site {} is overbooked at {at_ms}: {used} nodes of {}: {active:#?}",
                    entry.name, entry.capacity
                ));
            }
        }
    }

    /// The reservations of `cluster` at `site` that take capacity now.
    fn counting(&self, site: usize, cluster: &str) -> Vec<Reservation> {
        self.sites[site]
            .ledger
            .reservations(ReservationFilter::Active, self.now_ms)
            .expect("the ledger reads")
            .into_iter()
            .filter(|r| r.cluster_id == cluster)
            .collect()
    }

    fn committed_nodes(&self, site: usize, cluster: &str) -> u32 {
        self.counting(site, cluster)
            .iter()
            .filter(|r| r.state == ReservationState::Committed)
            .map(|r| r.nodes)
            .sum()
    }

    fn record(&self, site: usize, cluster: &str) -> ClusterRecord {
        match self.sites[site]
            .ledger
            .cluster(cluster)
            .expect("the ledger reads")
        {
            Some(record) => record,
            None => self.fail(&format!(
                "site {} has no record of {cluster}",
                self.sites[site].name
            )),
        }
    }

    fn in_flight(&self) -> usize {
        self.sites.iter().map(|s| s.core.in_flight()).sum()
    }

    /// Checks a cluster that should have settled (reserved or failed) and
    /// whose holds have had time to run out; returns its state.
    fn check_settled(&self, master: usize, cluster: &str, nodes: u32) -> ClusterState {
        let record = self.record(master, cluster);
        if record.master_site != self.sites[master].name {
            self.fail(&format!(
                "{cluster}: master is {} in its record",
                record.master_site
            ));
        }
        match record.state {
            ClusterState::Reserved => self.check_reserved(master, &record, nodes),
            ClusterState::Failed => {
                self.check_nothing_held(cluster);
                self.check_workers_finished(master, cluster);
            }
            state => self.fail(&format!(
                "{cluster} did not settle: {state}; parts {:#?}",
                record.parts
            )),
        }
        record.state
    }

    /// A reserved cluster has exactly `nodes` compute nodes in committed
    /// parts, and every site's committed reservations match its parts.
    fn check_reserved(&self, master: usize, record: &ClusterRecord, nodes: u32) {
        let cluster = record.id.as_str();
        let Some(local) = record.parts.iter().find(|p| p.frontend) else {
            self.fail(&format!("{cluster}: no frontend part"));
        };
        if local.state != PartState::Committed
            || local.site != self.sites[master].name
            || local.attempt != 0
        {
            self.fail(&format!("{cluster}: frontend part {local:?}"));
        }
        let committed: u32 = record
            .parts
            .iter()
            .filter(|p| p.state == PartState::Committed)
            .map(|p| p.nodes)
            .sum();
        if committed != nodes {
            self.fail(&format!(
                "{cluster} is reserved with {committed} committed nodes, {nodes} asked: {:#?}",
                record.parts
            ));
        }
        for part in &record.parts {
            if !matches!(part.state, PartState::Committed | PartState::Released) {
                self.fail(&format!(
                    "{cluster} is reserved with a part still {}: {part:?}",
                    part.state
                ));
            }
        }
        for (i, site) in self.sites.iter().enumerate() {
            let peer = site.peer.to_string();
            let mut expected: u32 = record
                .parts
                .iter()
                .filter(|p| {
                    p.state == PartState::Committed && p.peer_id.as_deref() == Some(peer.as_str())
                })
                .map(|p| p.nodes)
                .sum();
            if i == master {
                // The master's own reservation includes the frontend.
                expected += 1;
            }
            let counting = self.counting(i, cluster);
            let held: Vec<&Reservation> = counting
                .iter()
                .filter(|r| r.state != ReservationState::Committed)
                .collect();
            if !held.is_empty() {
                self.fail(&format!(
                    "{cluster}: site {} still has uncommitted holds: {held:#?}",
                    site.name
                ));
            }
            let committed = self.committed_nodes(i, cluster);
            if committed != expected {
                self.fail(&format!(
                    "{cluster}: site {} has {committed} committed nodes, the master's record says {expected}: {:#?}",
                    site.name, record.parts
                ));
            }
            if i != master && committed > 0 {
                let worker = self.record(i, cluster);
                if worker.state != ClusterState::Reserved
                    || worker.master_site != self.sites[master].name
                {
                    self.fail(&format!(
                        "{cluster}: worker {} has the record {worker:?}",
                        site.name
                    ));
                }
                // Every site numbers the nodes from its own list of the
                // committed parts: it must be the master's.
                let parts = |r: &ClusterRecord| {
                    let mut parts: Vec<(String, u32, u32)> = r
                        .parts
                        .iter()
                        .filter(|p| p.state == PartState::Committed)
                        .map(|p| (p.site.clone(), p.attempt, p.nodes))
                        .collect();
                    parts.sort();
                    parts
                };
                if parts(&worker) != parts(record) {
                    self.fail(&format!(
                        "{cluster}: worker {} knows the committed parts {:?}, the master {:?}",
                        site.name,
                        parts(&worker),
                        parts(record)
                    ));
                }
            }
        }
    }

    /// Every worker's own record of the cluster, if it has one, is finished.
    fn check_workers_finished(&self, master: usize, cluster: &str) {
        for (i, site) in self.sites.iter().enumerate() {
            if i == master {
                continue;
            }
            let record = site.ledger.cluster(cluster).expect("the ledger reads");
            if let Some(record) = record.filter(|r| r.state != ClusterState::Finished) {
                self.fail(&format!(
                    "{cluster}: worker {} still has {record:#?}",
                    site.name
                ));
            }
        }
    }

    /// No site holds anything for the cluster.
    fn check_nothing_held(&self, cluster: &str) {
        for (i, site) in self.sites.iter().enumerate() {
            let counting = self.counting(i, cluster);
            if !counting.is_empty() {
                self.fail(&format!(
                    "{cluster}: site {} still holds {counting:#?}",
                    site.name
                ));
            }
        }
    }
}

fn compute_nodes_committed(record: &ClusterRecord) -> u32 {
    record
        .parts
        .iter()
        .filter(|p| p.state == PartState::Committed)
        .map(|p| p.nodes)
        .sum()
}

fn committed_parts_at(record: &ClusterRecord, site: &str) -> u32 {
    record
        .parts
        .iter()
        .filter(|p| p.site == site && p.state == PartState::Committed)
        .map(|p| p.nodes)
        .sum()
}

#[test]
fn happy_path_master_keeps_its_share_and_workers_commit_the_rest() {
    let mut sim = Sim::new(1, &[4, 4, 4], ClusterConfig::default(), Faults::none(10));
    let created = sim
        .create(0, "c1", 10)
        .expect("the federation has 11 free nodes");
    assert_eq!(created.state, ClusterState::Reserving);
    sim.run_quiet(T0_MS + 60 * SECOND_MS);
    assert!(
        sim.now_ms < T0_MS + SECOND_MS,
        "reserving on a perfect network takes a few round trips"
    );

    let record = sim.record(0, "c1");
    assert_eq!(record.state, ClusterState::Reserved);
    assert_eq!(record.master_site, "A");
    let frontend = record
        .parts
        .iter()
        .find(|p| p.frontend)
        .expect("the master's part");
    assert_eq!(
        (frontend.site.as_str(), frontend.nodes, frontend.state),
        ("A", 3, PartState::Committed)
    );
    assert_eq!(compute_nodes_committed(&record), 10);
    assert_eq!(
        committed_parts_at(&record, "B") + committed_parts_at(&record, "C"),
        7
    );
    assert!(committed_parts_at(&record, "B") > 0 && committed_parts_at(&record, "C") > 0);

    // The frontend's slot comes on top of the master's share.
    let local = sim.sites[0]
        .ledger
        .reservation("c1/0")
        .unwrap()
        .expect("the master's reservation");
    assert_eq!((local.nodes, local.state), (4, ReservationState::Committed));
    assert_eq!(
        sim.committed_nodes(1, "c1") + sim.committed_nodes(2, "c1"),
        7
    );
    for (worker, name) in [(1, "B"), (2, "C")] {
        assert_eq!(
            sim.committed_nodes(worker, "c1"),
            committed_parts_at(&record, name)
        );
        let own = sim.record(worker, "c1");
        assert_eq!(own.state, ClusterState::Reserved);
        assert_eq!(own.master_site, "A");
        assert_eq!(
            committed_parts_at(&own, name),
            committed_parts_at(&record, name)
        );
        // The worker learnt the cluster's segment and every other site's
        // gateway with the commit: what it needs to build the network.
        assert_eq!(own.segment, record.segment);
        assert!(own.segment.is_some());
        for site in ["A", "B", "C"] {
            let part = own
                .parts
                .iter()
                .find(|p| p.site == site)
                .expect("every site of the cluster");
            assert_eq!(
                part.gateway,
                Some(gateway_of(site)),
                "{site}'s gateway at {name}"
            );
        }
        assert!(own.parts.iter().any(|p| p.site == "A" && p.frontend));
    }
    // The master learnt each worker's gateway from its Held.
    for part in record
        .parts
        .iter()
        .filter(|p| p.state == PartState::Committed)
    {
        assert_eq!(part.gateway, Some(gateway_of(&part.site)));
    }
    assert_eq!(sim.in_flight(), 0);
    assert_eq!(sim.check_settled(0, "c1", 10), ClusterState::Reserved);
}

#[test]
fn a_cluster_that_fits_at_the_master_stays_local() {
    let mut sim = Sim::new(2, &[8, 4], ClusterConfig::default(), Faults::none(10));
    let record = sim.create(0, "local", 5).expect("A has room");
    assert_eq!(record.state, ClusterState::Reserved);
    assert_eq!(record.parts.len(), 1);
    sim.run_quiet(T0_MS + 60 * SECOND_MS);
    assert_eq!(
        sim.stats.sent.values().sum::<u64>(),
        0,
        "no message for a local cluster"
    );
    assert_eq!(sim.check_settled(0, "local", 5), ClusterState::Reserved);
}

/// B answers `Held`, then dies before the commit reaches it.
fn kill_b_after_its_held(sim: &mut Sim) {
    let b = 1;
    sim.cut_after = Some((
        b,
        Box::new(move |e: &Envelope| e.from == b && matches!(e.msg, ClusterMsg::Held { .. })),
    ));
}

#[test]
fn worker_killed_after_held_the_master_replans_onto_another_site() {
    // B (listed first among equals) gets all 7 remote nodes; C could take them too.
    let mut sim = Sim::new(3, &[4, 8, 8], ClusterConfig::default(), Faults::none(10));
    kill_b_after_its_held(&mut sim);
    sim.create(0, "c2", 10).expect("the federation has room");
    sim.run_until(T0_MS + 30 * SECOND_MS);

    let record = sim.record(0, "c2");
    assert_eq!(
        record.state,
        ClusterState::Reserved,
        "parts: {:#?}",
        record.parts
    );
    assert_eq!(compute_nodes_committed(&record), 10);
    assert_eq!(committed_parts_at(&record, "B"), 0);
    assert_eq!(committed_parts_at(&record, "C"), 7);
    assert_eq!(sim.committed_nodes(2, "c2"), 7);
    assert!(!sim.sites[1].reachable);
    assert_eq!(sim.counting(1, "c2").len(), 1, "B's hold lasts its lease");

    // B's hold runs out by itself.
    let lease_end = T0_MS + sim.config.lease_ms + SECOND_MS;
    sim.run_until(lease_end);
    sim.sweep();
    assert!(
        sim.counting(1, "c2").is_empty(),
        "B still holds {:#?}",
        sim.counting(1, "c2")
    );

    // The master keeps releasing at B; once B is back the cluster settles.
    assert_eq!(sim.sites[0].core.in_flight(), 1);
    sim.sites[1].reachable = true;
    sim.run_quiet(sim.now_ms + 5 * 60 * SECOND_MS);
    assert_eq!(sim.in_flight(), 0);
    assert_eq!(sim.check_settled(0, "c2", 10), ClusterState::Reserved);
}

#[test]
fn worker_killed_after_held_fails_cleanly_when_no_site_has_room() {
    // A keeps 3, B holds 4 and C 3: without B there is no room for the rest.
    let mut sim = Sim::new(4, &[4, 4, 4], ClusterConfig::default(), Faults::none(10));
    kill_b_after_its_held(&mut sim);
    sim.create(0, "c3", 10).expect("the federation has room");
    sim.run_until(T0_MS + 30 * SECOND_MS);

    let record = sim.record(0, "c3");
    assert_eq!(
        record.state,
        ClusterState::Failed,
        "parts: {:#?}",
        record.parts
    );
    assert!(sim.counting(0, "c3").is_empty());
    assert!(sim.counting(2, "c3").is_empty(), "C was told to release");

    sim.run_until(T0_MS + sim.config.lease_ms + SECOND_MS);
    sim.sweep();
    sim.check_nothing_held("c3");
    assert!(
        sim.sites[1]
            .ledger
            .reservations(ReservationFilter::All, sim.now_ms)
            .unwrap()
            .iter()
            .all(|r| r.state == ReservationState::Expired)
    );
}

/// Two masters (A and B) each need nodes at C at about the same time.
fn concurrent_masters(seed: u64) -> (Stats, [ClusterState; 2]) {
    let mut rng = SplitMix64(seed ^ 0x5EED_CAFE);
    let capacities = [
        rng.between(2, 6) as u32,
        rng.between(2, 6) as u32,
        rng.between(3, 10) as u32,
    ];
    let faults = Faults {
        loss_per_mille: 0,
        dup_per_mille: 0,
        latency_min_ms: 1,
        latency_max_ms: rng.between(1, 800),
        until_ms: i64::MAX,
        calm_latency_ms: 1,
    };
    let mut sim = Sim::new(seed, &capacities, ClusterConfig::default(), faults);
    sim.gossip_period_ms = if rng.chance_per_mille(500) {
        0
    } else {
        rng.between(100, 3_000)
    };
    let [a, b, c] = capacities;
    // Each asks for more than its own share plus all of the other master, so
    // both need C; together they may need more than C has.
    let nodes_a = (a - 1) + b + rng.between(1, i64::from(c)) as u32;
    let nodes_b = (b - 1) + a + rng.between(1, i64::from(c)) as u32;
    // Windows that overlap in part, or not at all.
    let (window_a, window_b) = (random_window(&mut rng), random_window(&mut rng));
    let b_delay_ms = rng.between(0, 1_000);

    let mut created = [false, false];
    created[0] = sim
        .create_request(0, "from-a", request(nodes_a, window_a))
        .is_ok();
    sim.run_until(T0_MS + b_delay_ms);
    created[1] = sim
        .create_request(1, "from-b", request(nodes_b, window_b))
        .is_ok();

    let config = sim.config.clone();
    let settle_ms = config.reserve_deadline_ms
        + config.release_backoff_max_ms
        + config.lease_ms
        + 10 * SECOND_MS;
    sim.run_until(T0_MS + b_delay_ms + settle_ms);
    sim.sweep();
    if sim.in_flight() != 0 {
        sim.fail("a cluster is still in flight on a lossless network");
    }
    let mut states = [ClusterState::Failed, ClusterState::Failed];
    for (master, (id, nodes)) in [("from-a", nodes_a), ("from-b", nodes_b)]
        .into_iter()
        .enumerate()
    {
        if created[master] {
            states[master] = sim.check_settled(master, id, nodes);
        } else {
            // Refused at create: nothing anywhere, not even a record.
            sim.check_nothing_held(id);
            if sim.sites[master].ledger.cluster(id).unwrap().is_some() {
                sim.fail(&format!("{id} was refused but is stored"));
            }
        }
    }
    (sim.stats, states)
}

#[test]
fn concurrent_masters_never_overbook_the_site_they_compete_for() {
    let mut reserved = 0;
    let mut failed = 0;
    let sweep = seeds(CONCURRENT_SEEDS);
    let full = sweep.end - sweep.start >= CONCURRENT_SEEDS;
    let mut totals = Stats::default();
    for seed in sweep {
        let (stats, states) = concurrent_masters(seed);
        totals.add(&stats);
        for state in states {
            match state {
                ClusterState::Reserved => reserved += 1,
                _ => failed += 1,
            }
        }
    }
    assert!(
        !full || (reserved > 0 && failed > 0),
        "the sweep should see both outcomes: {reserved} reserved, {failed} not"
    );
    // Stale views make masters ask for nodes another master took meanwhile:
    // the worker's ledger must have denied some.
    let denied = totals.sent.get("denied").copied().unwrap_or(0);
    assert!(!full || denied > 0, "no reserve was denied: {totals:?}");
    eprintln!("{reserved} reserved, {failed} failed or refused, {denied} reserves denied");
}

/// What happens to the federation at a given virtual time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Happening {
    /// A cluster request arrives at a master.
    Create {
        master: usize,
        id: String,
        nodes: u32,
    },
    /// The requester deletes a cluster at its master.
    Delete { master: usize, id: String },
    /// A site's process restarts (its core is rebuilt from the ledger).
    Restart(usize),
    /// A site is cut off from the network.
    Cut(usize),
    /// A cut-off site is reachable again.
    Heal(usize),
}

/// Several clusters at random masters over a network that loses, duplicates
/// and reorders every kind of message until the faults stop; some seeds also
/// cut sites off for a while or restart them mid-way.
fn faulty_federation(seed: u64) -> Stats {
    let mut rng = SplitMix64(seed);
    let site_count = rng.between(3, 4) as usize;
    let capacities: Vec<u32> = (0..site_count).map(|_| rng.between(2, 8) as u32).collect();
    let total: u32 = capacities.iter().sum();
    let config = ClusterConfig {
        // Short leases make holds run out before their commit.
        lease_ms: if rng.chance_per_mille(300) {
            rng.between(2, 6) * SECOND_MS
        } else {
            30 * SECOND_MS
        },
        ..ClusterConfig::default()
    };
    let latency_max_ms = rng.between(50, 4_000);
    let faults = Faults {
        loss_per_mille: rng.between(0, 400) as u64,
        dup_per_mille: rng.between(0, 300) as u64,
        latency_min_ms: 1,
        latency_max_ms,
        until_ms: T0_MS + rng.between(5, 40) * SECOND_MS,
        calm_latency_ms: 5,
    };
    let faults_until_ms = faults.until_ms;
    let mut sim = Sim::new(seed, &capacities, config.clone(), faults);
    sim.gossip_period_ms = if rng.chance_per_mille(300) {
        0
    } else {
        rng.between(500, 10_000)
    };

    let mut schedule: Vec<(i64, Happening)> = Vec::new();
    for k in 0..rng.between(2, 5) {
        let at_ms = T0_MS + rng.between(0, 10_000);
        let master = rng.between(0, site_count as i64 - 1) as usize;
        let nodes = rng.between(1, i64::from(total / 2)) as u32;
        let id = format!("c{k}");
        if rng.chance_per_mille(250) {
            let delete_at_ms = at_ms + rng.between(0, 40 * SECOND_MS);
            schedule.push((
                delete_at_ms,
                Happening::Delete {
                    master,
                    id: id.clone(),
                },
            ));
        }
        schedule.push((at_ms, Happening::Create { master, id, nodes }));
    }
    if rng.chance_per_mille(300) {
        // A cut ends before the faults do, so the bound after them holds.
        let site = rng.between(0, site_count as i64 - 1) as usize;
        let from_ms = rng.between(T0_MS, faults_until_ms);
        schedule.push((from_ms, Happening::Cut(site)));
        schedule.push((rng.between(from_ms, faults_until_ms), Happening::Heal(site)));
    }
    if rng.chance_per_mille(300) {
        let site = rng.between(0, site_count as i64 - 1) as usize;
        schedule.push((
            rng.between(T0_MS, faults_until_ms),
            Happening::Restart(site),
        ));
    }
    schedule.sort();

    let mut created = Vec::new();
    let mut deleted = Vec::new();
    let mut last_create_ms = T0_MS;
    for (at_ms, happening) in schedule {
        sim.run_until(at_ms);
        match happening {
            Happening::Create { master, id, nodes } => {
                last_create_ms = at_ms;
                if sim
                    .create_request(master, &id, request(nodes, random_window(&mut rng)))
                    .is_ok()
                {
                    created.push((master, id, nodes));
                } else {
                    sim.stats.refused += 1;
                    sim.check_nothing_held(&id);
                }
            }
            Happening::Delete { master, id } => {
                // Deleting a cluster that was refused at create is "unknown".
                let known = created.iter().any(|(_, created_id, _)| *created_id == id);
                match sim.delete(master, &id) {
                    Ok(_) if known => deleted.push(id),
                    Err(DeleteError::Unknown(_)) if !known => {}
                    answer => sim.fail(&format!("delete of {id}: {answer:?}")),
                }
            }
            Happening::Restart(site) => sim.restart(site),
            Happening::Cut(site) => sim.sites[site].reachable = false,
            Happening::Heal(site) => sim.sites[site].reachable = true,
        }
    }
    // Reservation ends by its deadline; after that and the faults, a release
    // is retried within the longest backoff, and holds run out with their lease.
    let settle_from_ms = (last_create_ms + config.reserve_deadline_ms).max(faults_until_ms);
    // By its deadline, every reservation has ended one way or the other.
    sim.run_until(settle_from_ms + 1);
    for (master, id, _) in &created {
        let state = sim.record(*master, id).state;
        let ended = if deleted.contains(id) {
            matches!(
                state,
                ClusterState::Stopping | ClusterState::Finished | ClusterState::Failed
            )
        } else {
            matches!(state, ClusterState::Reserved | ClusterState::Failed)
        };
        if !ended {
            sim.fail(&format!("{id} is still {state} after its reserve deadline"));
        }
    }
    let end_ms = settle_from_ms
        + config.release_backoff_max_ms
        + config.lease_ms
        + 2 * latency_max_ms
        + 10 * SECOND_MS;
    sim.run_until(end_ms);
    sim.sweep();
    if sim.in_flight() != 0 {
        sim.fail(&format!(
            "{} clusters still in flight long after the faults stopped",
            sim.in_flight()
        ));
    }
    for (master, id, nodes) in &created {
        if deleted.contains(id) {
            let state = sim.record(*master, id).state;
            if !matches!(state, ClusterState::Finished | ClusterState::Failed) {
                sim.fail(&format!("{id} was deleted but is {state}"));
            }
            sim.check_nothing_held(id);
            sim.check_workers_finished(*master, id);
            sim.stats.deleted += 1;
            continue;
        }
        match sim.check_settled(*master, id, *nodes) {
            ClusterState::Reserved => sim.stats.reserved += 1,
            _ => sim.stats.failed += 1,
        }
    }
    sim.stats.steps = sim.steps;
    sim.stats
}

/// The seeds of a sweep: `0..default`, or what `VCFED_SIM_SEEDS` says
/// (`N` for one seed, to replay a failure, or `A..B` for a longer sweep).
fn seeds(default: u64) -> std::ops::Range<u64> {
    let Ok(text) = std::env::var("VCFED_SIM_SEEDS") else {
        return 0..default;
    };
    let parsed = match text.split_once("..") {
        Some((from, to)) => from
            .parse()
            .ok()
            .zip(to.parse().ok())
            .map(|(from, to)| from..to),
        None => text.parse().ok().map(|seed: u64| seed..seed + 1),
    };
    parsed.unwrap_or_else(|| panic!("VCFED_SIM_SEEDS={text:?}: expected N or A..B"))
}

#[test]
fn message_faults_never_overbook_and_every_cluster_settles() {
    let mut totals = Stats::default();
    let sweep = seeds(FAULT_SEEDS);
    let count = sweep.end - sweep.start;
    for seed in sweep {
        totals.add(&faulty_federation(seed));
    }
    eprintln!("{count} seeds: {totals:#?}");
    if count < FAULT_SEEDS {
        return;
    }
    assert!(totals.reserved > 0, "no cluster was reserved: {totals:?}");
    assert!(totals.failed > 0, "no cluster failed: {totals:?}");
    // The sweep must have exercised every fault on every kind of message.
    for kind in ALL_KINDS {
        for (fault, counts) in [
            ("lost", &totals.lost),
            ("duplicated", &totals.duplicated),
            ("reordered", &totals.reordered),
        ] {
            let count = counts.get(kind).copied().unwrap_or(0);
            assert!(
                count > 0,
                "no {kind} message was {fault} in {count} seeds: {totals:?}"
            );
        }
    }
}

#[test]
fn restart_before_the_commit_decision_fails_and_releases_everything() {
    let mut sim = Sim::new(5, &[4, 4, 4], ClusterConfig::default(), Faults::none(10));
    // The workers hold, but A crashes before their answers arrive.
    sim.drop_if = Some(Box::new(|e: &Envelope| e.to == 0 && e.flow == Flow::Reply));
    sim.create(0, "c5", 10).expect("the federation has room");
    sim.run_until(T0_MS + 500);
    assert_eq!(sim.record(0, "c5").state, ClusterState::Reserving);
    assert_eq!(sim.counting(1, "c5").len(), 1);
    assert_eq!(sim.counting(2, "c5").len(), 1);

    sim.drop_if = None;
    sim.restart(0);
    sim.run_quiet(T0_MS + 10 * SECOND_MS);
    let record = sim.record(0, "c5");
    assert_eq!(record.state, ClusterState::Failed);
    assert!(
        record.parts.iter().all(|p| p.state == PartState::Released),
        "{:#?}",
        record.parts
    );
    // Released at once, without waiting for the leases.
    assert!(sim.now_ms < T0_MS + sim.config.lease_ms);
    sim.check_nothing_held("c5");
    for site in 0..3 {
        for reservation in sim.sites[site]
            .ledger
            .reservations(ReservationFilter::All, sim.now_ms)
            .unwrap()
        {
            assert_eq!(
                reservation.state,
                ReservationState::Released,
                "{reservation:?}"
            );
        }
    }
    assert_eq!(sim.in_flight(), 0);
}

#[test]
fn restart_after_the_commit_decision_resends_the_commits() {
    let mut sim = Sim::new(6, &[4, 4, 4], ClusterConfig::default(), Faults::none(10));
    // A decides to commit, then crashes before any commit leaves.
    sim.drop_if = Some(Box::new(|e: &Envelope| {
        matches!(e.msg, ClusterMsg::Commit { .. })
    }));
    sim.create(0, "c6", 10).expect("the federation has room");
    sim.run_until(T0_MS + 500);
    let record = sim.record(0, "c6");
    assert_eq!(record.state, ClusterState::Reserving);
    assert!(
        record
            .parts
            .iter()
            .filter(|p| !p.frontend)
            .all(|p| p.state == PartState::Committing),
        "{record:#?}"
    );

    sim.drop_if = None;
    sim.restart(0);
    sim.run_quiet(T0_MS + 10 * SECOND_MS);
    assert_eq!(sim.in_flight(), 0);
    assert_eq!(sim.check_settled(0, "c6", 10), ClusterState::Reserved);
}

#[test]
fn restart_resumes_the_release_of_a_site_given_up_after_it_committed() {
    // B commits its 7 nodes, but its answers never come back: A gives B up,
    // reserves at C instead, and must still take B's nodes back.
    let mut sim = Sim::new(7, &[4, 8, 8], ClusterConfig::default(), Faults::none(10));
    let b = 1;
    sim.cut_after = Some((
        b,
        Box::new(move |e: &Envelope| e.to == b && matches!(e.msg, ClusterMsg::Commit { .. })),
    ));
    sim.create(0, "c7", 10).expect("the federation has room");
    sim.run_until(T0_MS + 30 * SECOND_MS);
    let record = sim.record(0, "c7");
    assert_eq!(record.state, ClusterState::Reserved, "{:#?}", record.parts);
    assert_eq!(committed_parts_at(&record, "C"), 7);
    assert_eq!(
        sim.committed_nodes(b, "c7"),
        7,
        "B committed before it was cut off"
    );

    // A restarts while B is still unreachable; then B comes back.
    sim.restart(0);
    sim.run_until(sim.now_ms + 10 * SECOND_MS);
    sim.sites[b].reachable = true;
    sim.run_quiet(sim.now_ms + 5 * 60 * SECOND_MS);
    assert_eq!(
        sim.committed_nodes(b, "c7"),
        0,
        "B keeps nodes the cluster does not use"
    );
    assert_eq!(sim.in_flight(), 0);
    assert_eq!(sim.check_settled(0, "c7", 10), ClusterState::Reserved);
}

#[test]
fn bad_requests_are_refused_and_hold_nothing() {
    let mut sim = Sim::new(8, &[4, 4, 4], ClusterConfig::default(), Faults::none(10));
    let now_ms = sim.now_ms;
    let good = window_after(now_ms);
    let huge = NodeShape {
        cores: 1_000,
        memory_mib: 1 << 30,
        disk_gib: 1 << 20,
    };
    let cases: Vec<(&str, ClusterRequest)> = vec![
        ("zero-nodes", request(0, good)),
        (
            "zero-duration",
            request(
                2,
                Window {
                    start_ms: good.start_ms,
                    end_ms: good.start_ms,
                },
            ),
        ),
        (
            "negative-duration",
            request(
                2,
                Window {
                    start_ms: good.start_ms,
                    end_ms: good.start_ms - 1,
                },
            ),
        ),
        (
            "past-start",
            request(
                2,
                Window {
                    start_ms: now_ms - HOUR_MS,
                    end_ms: now_ms + HOUR_MS,
                },
            ),
        ),
        (
            "unknown-shape",
            ClusterRequest {
                shape: huge,
                ..request(2, good)
            },
        ),
        ("too-many", request(12, good)),
    ];
    for (id, bad) in cases {
        let refused = sim.create_request(0, id, bad);
        match (id, &refused) {
            (
                "zero-nodes" | "zero-duration" | "negative-duration" | "past-start",
                Err(CreateError::Invalid(_)),
            )
            | ("unknown-shape", Err(CreateError::UnknownShape(_))) => {}
            // 3 compute nodes at A (one slot is the frontend's) and 4 each at B and C.
            ("too-many", Err(CreateError::Insufficient { available: 11, .. })) => {}
            _ => panic!("{id}: unexpected answer {refused:?}"),
        }
        sim.run_quiet(sim.now_ms + 10 * SECOND_MS);
        assert_eq!(
            sim.stats.sent.values().sum::<u64>(),
            0,
            "{id}: a refused request sends nothing"
        );
        assert!(
            sim.sites[0].ledger.cluster(id).unwrap().is_none(),
            "{id} is stored"
        );
        for site in 0..3 {
            let all = sim.sites[site]
                .ledger
                .reservations(ReservationFilter::All, sim.now_ms)
                .unwrap();
            assert!(all.is_empty(), "{id}: site {site} holds {all:?}");
        }
    }

    // Exactly what the federation has is accepted.
    sim.create(0, "all", 11).expect("11 nodes fit");
    sim.run_quiet(sim.now_ms + 60 * SECOND_MS);
    assert_eq!(sim.check_settled(0, "all", 11), ClusterState::Reserved);
    // The same id again, and a site with no room left for a frontend.
    assert!(matches!(
        sim.create(0, "all", 1),
        Err(CreateError::Exists(_))
    ));
    assert!(matches!(
        sim.create(1, "more", 1),
        Err(CreateError::Insufficient { available: 0, .. })
    ));
    assert!(sim.sites[1].ledger.cluster("more").unwrap().is_none());
}

#[test]
fn delete_releases_at_every_site() {
    let mut sim = Sim::new(9, &[4, 4, 4], ClusterConfig::default(), Faults::none(10));
    sim.create(0, "c9", 10).expect("the federation has room");
    sim.run_quiet(T0_MS + 60 * SECOND_MS);
    assert_eq!(sim.check_settled(0, "c9", 10), ClusterState::Reserved);

    assert!(matches!(
        sim.delete(1, "c9"),
        Err(DeleteError::NotMaster(..))
    ));
    assert!(matches!(
        sim.delete(0, "nope"),
        Err(DeleteError::Unknown(_))
    ));
    let deleted = sim.delete(0, "c9").expect("A masters c9");
    assert_eq!(deleted.state, ClusterState::Stopping);
    sim.run_quiet(sim.now_ms + 60 * SECOND_MS);
    assert_eq!(sim.record(0, "c9").state, ClusterState::Finished);
    sim.check_nothing_held("c9");
    for worker in [1, 2] {
        assert_eq!(sim.record(worker, "c9").state, ClusterState::Finished);
    }
    assert_eq!(sim.in_flight(), 0);
    // The freed nodes can be reserved again.
    sim.create(0, "again", 10)
        .expect("the nodes are free again");
    sim.run_quiet(sim.now_ms + 60 * SECOND_MS);
    assert_eq!(sim.check_settled(0, "again", 10), ClusterState::Reserved);
}

#[test]
fn delete_retries_an_unreachable_worker_until_it_comes_back() {
    let mut sim = Sim::new(10, &[4, 4, 4], ClusterConfig::default(), Faults::none(10));
    sim.create(0, "c10", 10).expect("the federation has room");
    sim.run_quiet(T0_MS + 60 * SECOND_MS);
    assert_eq!(sim.check_settled(0, "c10", 10), ClusterState::Reserved);

    sim.sites[1].reachable = false;
    sim.delete(0, "c10").expect("A masters c10");
    sim.run_until(sim.now_ms + 5 * 60 * SECOND_MS);
    let record = sim.record(0, "c10");
    assert_eq!(record.state, ClusterState::Stopping);
    let b_part = record
        .parts
        .iter()
        .find(|p| p.site == "B")
        .expect("B has a part");
    assert_eq!(b_part.state, PartState::Releasing);
    let releases = sim.stats.sent["release"];
    // One release to C, and to B the first try plus backed-off retries.
    assert!(
        (5..20).contains(&releases),
        "{releases} releases in 5 minutes"
    );
    assert!(sim.counting(2, "c10").is_empty());
    assert_eq!(
        sim.committed_nodes(1, "c10"),
        4,
        "B keeps its nodes while cut off"
    );

    sim.sites[1].reachable = true;
    sim.run_quiet(sim.now_ms + 2 * 60 * SECOND_MS);
    assert_eq!(sim.record(0, "c10").state, ClusterState::Finished);
    assert_eq!(sim.record(1, "c10").state, ClusterState::Finished);
    sim.check_nothing_held("c10");
    assert_eq!(sim.in_flight(), 0);
}

#[test]
fn delete_gives_up_on_an_unreachable_worker_once_the_window_has_passed() {
    let mut sim = Sim::new(11, &[4, 4, 4], ClusterConfig::default(), Faults::none(10));
    let window = Window {
        start_ms: T0_MS + 10 * SECOND_MS,
        end_ms: T0_MS + 5 * 60 * SECOND_MS,
    };
    sim.create_request(0, "c11", request(10, window))
        .expect("the federation has room");
    sim.run_quiet(T0_MS + 5 * SECOND_MS);
    assert_eq!(sim.check_settled(0, "c11", 10), ClusterState::Reserved);

    sim.sites[1].reachable = false;
    sim.delete(0, "c11").expect("A masters c11");
    sim.run_until(window.end_ms - SECOND_MS);
    assert_eq!(sim.record(0, "c11").state, ClusterState::Stopping);
    sim.run_quiet(window.end_ms + 2 * sim.config.release_backoff_max_ms);
    assert_eq!(sim.record(0, "c11").state, ClusterState::Finished);
    assert_eq!(sim.in_flight(), 0);
    // B never heard of the delete: its committed nodes lie in the past.
    let at_b = sim.counting(1, "c11");
    assert!(
        at_b.iter().all(|r| r.window.end_ms <= sim.now_ms),
        "{at_b:?}"
    );
}

fn reported(indices: &[u32], state: &str) -> Vec<ReportedNode> {
    indices
        .iter()
        .map(|&index| ReportedNode {
            index,
            frontend: false,
            state_json: format!(
                r#"{{"state":"{state}","ip":"198.19.0.{index}","server":"198.19.0.1"}}"#
            ),
        })
        .collect()
}

#[test]
fn workers_report_their_nodes_and_the_master_stores_them() {
    let mut sim = Sim::new(1, &[4, 4, 4], ClusterConfig::default(), Faults::none(10));
    let now = sim.now_ms;
    let window = Window::new(now, now + HOUR_MS).unwrap();
    sim.create_request(0, "c1", request(10, window))
        .expect("room for 11 nodes");
    sim.run_quiet(T0_MS + 60 * SECOND_MS);
    assert_eq!(sim.record(0, "c1").state, ClusterState::Reserved);
    let at_b = committed_parts_at(&sim.record(0, "c1"), "B");

    // B reports its nodes (the numbers it derives for them): they reach
    // the master, filed under B.
    let b_peer = sim.sites[1].peer.to_string();
    let plan = crate::lifecycle::plan(&sim.record(1, "c1"), "B", &b_peer, sim.now_ms).unwrap();
    let indices: Vec<u32> = plan.nodes.iter().map(|n| n.index).collect();
    assert_eq!(indices.len(), at_b as usize);
    let site = &mut sim.sites[1];
    let sent = site
        .core
        .report_nodes(&site.ledger, "c1", reported(&indices, "installed"))
        .unwrap();
    assert!(sent);
    sim.flush();
    sim.run_quiet(sim.now_ms + 10 * SECOND_MS);
    let stored = sim.sites[0].ledger.nodes("c1").unwrap();
    assert_eq!(stored.len(), at_b as usize);
    assert!(
        stored
            .iter()
            .all(|n| n.site == "B" && n.state["state"] == "installed")
    );
    // The master reports to nobody.
    let master = &mut sim.sites[0];
    assert!(
        !master
            .core
            .report_nodes(&master.ledger, "c1", Vec::new())
            .unwrap()
    );

    // Reports the master cannot trust are refused and change nothing.
    let stranger = Keypair::generate_ed25519().public().to_peer_id();
    let directory = sim.directory(0);
    let now = sim.now_ms;
    let c_peer = sim.sites[2].peer.to_string();
    let at_c = crate::lifecycle::plan(&sim.record(2, "c1"), "C", &c_peer, now).unwrap();
    let twice = [indices[0], indices[0]];
    let bad = [
        (stranger, reported(&indices, "installed")),
        // C's nodes, the frontend's number, one node twice, a bogus state.
        (
            sim.sites[1].peer,
            reported(&[at_c.nodes[0].index], "installed"),
        ),
        (sim.sites[1].peer, reported(&[0], "installed")),
        (sim.sites[1].peer, reported(&twice, "installed")),
        (sim.sites[1].peer, reported(&indices, "exploded")),
        (
            sim.sites[1].peer,
            vec![ReportedNode {
                index: 1,
                frontend: false,
                state_json: "not json".to_owned(),
            }],
        ),
        (
            sim.sites[1].peer,
            vec![ReportedNode {
                index: 1,
                frontend: false,
                state_json: format!("{{\"x\":\"{}\"}}", "a".repeat(2000)),
            }],
        ),
    ];
    for (from, nodes) in bad {
        let master = &mut sim.sites[0];
        let answer = master
            .core
            .handle_request(
                &mut master.ledger,
                &directory,
                now,
                from,
                ClusterMsg::Nodes {
                    cluster: "c1".to_owned(),
                    nodes,
                },
            )
            .unwrap();
        assert!(
            matches!(answer, Some(ClusterMsg::Refused { .. })),
            "{answer:?}"
        );
    }
    assert_eq!(sim.sites[0].ledger.nodes("c1").unwrap(), stored);
}

#[test]
fn a_site_replaced_after_the_commit_decision_updates_every_sites_parts() {
    // A holds only the frontend; B and C take the 4 nodes, D has room too.
    let mut sim = Sim::new(5, &[1, 2, 2, 2], ClusterConfig::default(), Faults::none(10));
    // Every Commit to C is lost until C's hold has expired: C then refuses
    // the commit, and the master replaces it with D, after B committed with
    // a list of parts that named C.
    let c = 2;
    sim.drop_if = Some(Box::new(move |e: &Envelope| {
        e.to == c && matches!(e.msg, ClusterMsg::Commit { .. })
    }));
    sim.create(0, "c9", 4).expect("the federation has room");
    sim.run_until(T0_MS + 45 * SECOND_MS);
    sim.drop_if = None;
    sim.run_quiet(T0_MS + 120 * SECOND_MS);

    let record = sim.record(0, "c9");
    assert_eq!(record.state, ClusterState::Reserved, "{:#?}", record.parts);
    assert_eq!(committed_parts_at(&record, "C"), 0);
    assert_eq!(committed_parts_at(&record, "B"), 2);
    assert_eq!(committed_parts_at(&record, "D"), 2);
    // check_settled compares every worker's committed parts with the
    // master's: B learnt that D replaced C.
    assert_eq!(sim.check_settled(0, "c9", 4), ClusterState::Reserved);
}
