//! Targeted tests of the cluster core: a few sites exchange what their cores
//! send, one step at a time, as each test scripts it.
//!
//! The harness relays the requests a core queues ([`ClusterCore::poll_transmit`])
//! and their answers between in-memory sites, through one first-in first-out
//! queue with no latency; time moves only when a test lets it, and then the
//! cores' timers fire in order. Besides that it does only what a test asks:
//! cut a site off, lose the messages a rule names, restart a site. There is
//! no randomness and no fault model here: random faults (loss, duplication,
//! reordering, partitions, crashes, skew) over many seeds are simnet's
//! sweep (`simnet/tests/sweep.rs`), which drives this core as the agent does.
//! The [`SiteDirectory`] each core sees is computed from the other sites'
//! ledgers at every call (perfect gossip).
//!
//! After every step, the site it touched is checked: no instant of any
//! window is overbooked (brute force over the window starts of the
//! reservations that count), and no cluster it masters has more nodes taken
//! than asked, or is `reserved` without exactly the nodes asked committed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use libp2p_identity::{Keypair, PeerId};
use vcfed_registry::{Candidate, Warming};
use vcfed_storage::{
    ClusterPart, ClusterRecord, ClusterState, Inventory, InventoryHost, Ledger, NodeShape,
    PartState, Reservation, ReservationFilter, ReservationState, Usage, Window, min_free,
};

use super::{
    ClusterConfig, ClusterCore, ClusterMsg, ClusterRequest, CreateError, DeleteError, Heal,
    ReportedNode, SiteDirectory,
};

/// Virtual time at which every test starts, unix ms.
const T0_MS: i64 = 1_700_000_000_000;
const SECOND_MS: i64 = 1_000;
const HOUR_MS: i64 = 3_600_000;
/// Deliveries and timer rounds one test may take before it is declared
/// stuck (two cores answering each other forever).
const STEPS_MAX: u64 = 100_000;
/// Last lines of the event trace kept for a failure message.
const TRACE_LINES_MAX: usize = 80;
/// Site indices, for readability.
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// The gateway each test site tells the others about.
fn gateway_of(site: &str) -> vcfed_storage::GatewayRef {
    vcfed_storage::GatewayRef {
        endpoint: format!("{site}.gw:7782"),
        public_key: format!("key-of-{site}"),
    }
}

/// The node slot every test site offers.
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
        name: "test".to_owned(),
        nodes,
        shape: shape(),
        window,
        image: None,
        heal: Heal::Replace,
    }
}

/// What a core sees of the other sites: their free capacity, read from
/// their ledgers when it asks.
struct Directory {
    /// (peer, name, capacity, reservations that count).
    sites: Vec<(PeerId, String, u32, Vec<Usage>)>,
    /// The sites cut off: `gone` in this view.
    gone: BTreeSet<PeerId>,
    /// What the view says of its warm-up.
    warming: Option<Warming>,
}

impl SiteDirectory for Directory {
    fn candidates(&self, start_ms: i64, end_ms: i64, shape: &NodeShape) -> Vec<Candidate> {
        let Some(window) = Window::new(start_ms, end_ms) else {
            return Vec::new();
        };
        if !shape.fits_in(&slot()) {
            return Vec::new();
        }
        let mut candidates: Vec<Candidate> = self
            .sites
            .iter()
            .map(|(peer, name, capacity, usages)| Candidate {
                site: *peer,
                name: name.clone(),
                free: min_free(*capacity, usages, window),
                rtt: None,
            })
            .filter(|candidate| candidate.free > 0)
            .collect();
        // The registry's order: most free first, then by name.
        candidates.sort_by(|a, b| b.free.cmp(&a.free).then_with(|| a.name.cmp(&b.name)));
        candidates
    }

    fn site_name(&self, site: &PeerId) -> Option<String> {
        let mut sites = self.sites.iter();
        sites.find(|s| s.0 == *site).map(|s| s.1.clone())
    }

    fn offers_shape(&self, shape: &NodeShape) -> bool {
        !self.sites.is_empty() && shape.fits_in(&slot())
    }

    fn is_gone(&self, site: &PeerId) -> bool {
        self.gone.contains(site)
    }

    fn any_alive(&self) -> bool {
        self.sites.iter().any(|s| !self.gone.contains(&s.0))
    }

    fn warming(&self, now_ms: i64) -> Option<Warming> {
        self.warming.filter(|warming| now_ms < warming.until_ms)
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

struct Site {
    name: String,
    peer: PeerId,
    capacity: u32,
    ledger: Ledger,
    core: ClusterCore,
    /// False while the site is cut off: every message to or from it is lost.
    reachable: bool,
}

/// Which messages a test loses on purpose.
type LossRule = Box<dyn Fn(&Envelope) -> bool>;

/// Sites A, B, C, ... and the messages between them.
struct Fed {
    now_ms: i64,
    config: ClusterConfig,
    sites: Vec<Site>,
    index: BTreeMap<PeerId, usize>,
    /// Sent and not yet delivered, oldest first.
    wire: VecDeque<Envelope>,
    /// Messages this matches are lost when their turn comes.
    lose: Option<LossRule>,
    /// Messages sent (requests and answers), per kind.
    sent: BTreeMap<&'static str, u64>,
    steps: u64,
    trace: VecDeque<String>,
    /// The warm-up every site's view is in.
    warming: Option<Warming>,
}

impl Fed {
    /// One site per capacity (node slots), named A, B, C, ...
    fn new(capacities: &[u32]) -> Fed {
        let config = ClusterConfig::default();
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
            let core =
                ClusterCore::new(peer, name.clone(), Some(gateway_of(&name)), config.clone());
            sites.push(Site {
                name,
                peer,
                capacity,
                ledger,
                core,
                reachable: true,
            });
        }
        Fed {
            now_ms: T0_MS,
            config,
            sites,
            index,
            wire: VecDeque::new(),
            lose: None,
            warming: None,
            sent: BTreeMap::new(),
            steps: 0,
            trace: VecDeque::new(),
        }
    }

    /// Panics with the end of the trace.
    fn fail(&self, what: &str) -> ! {
        let mut trace = String::new();
        for line in &self.trace {
            let _ = writeln!(trace, "  {line}");
        }
        panic!(
            "at t+{}ms: {what}\nlast events:\n{trace}",
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
        // Named after its id: a master refuses a second live cluster of a name.
        let request = ClusterRequest {
            name: id.to_owned(),
            ..request(nodes, window)
        };
        self.create_request(site, id, request)
    }

    fn create_request(
        &mut self,
        site: usize,
        id: &str,
        request: ClusterRequest,
    ) -> Result<ClusterRecord, CreateError> {
        let directory = self.directory(site);
        let entry = &mut self.sites[site];
        let created = entry.core.create(
            &mut entry.ledger,
            &directory,
            self.now_ms,
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
        let entry = &mut self.sites[site];
        let deleted = entry.core.delete(&mut entry.ledger, self.now_ms, id);
        let state = deleted.as_ref().map(|r| r.state);
        self.log(format!("{} deletes {id}: {state:?}", self.sites[site].name));
        self.check_site(site);
        self.flush();
        deleted
    }

    /// The site's process restarts: a fresh core over the same ledger.
    fn restart(&mut self, site: usize) {
        let entry = &mut self.sites[site];
        let gateway = Some(gateway_of(&entry.name));
        entry.core = ClusterCore::new(entry.peer, entry.name.clone(), gateway, self.config.clone());
        if let Err(e) = entry.core.resume(&mut entry.ledger, self.now_ms) {
            self.fail(&format!("resume failed: {e:#}"));
        }
        self.log(format!("{} restarted", self.sites[site].name));
        self.check_site(site);
        self.flush();
    }

    /// Cuts a site off (`false`) or reconnects it: messages to or from a
    /// site that is cut off are lost when their turn comes.
    fn reach(&mut self, site: usize, reachable: bool) {
        self.log(format!("{} reachable: {reachable}", self.sites[site].name));
        self.sites[site].reachable = reachable;
        if !reachable {
            // The others' gossip views say so (at once, here).
            let peer = self.sites[site].peer;
            for other in &mut self.sites {
                other.core.site_gone(&peer);
            }
        }
    }

    /// What `viewer` knows of the other sites: their ledgers, now.
    fn directory(&self, viewer: usize) -> Directory {
        let others = self.sites.iter().enumerate().filter(|(i, _)| *i != viewer);
        let sites = others
            .map(|(_, site)| {
                let active = site
                    .ledger
                    .reservations(ReservationFilter::Active, self.now_ms)
                    .expect("the ledger reads");
                let usages = active.iter().map(|r| Usage {
                    window: r.window,
                    nodes: r.nodes,
                });
                let usages = usages.collect();
                (site.peer, site.name.clone(), site.capacity, usages)
            })
            .collect();
        let gone = self
            .sites
            .iter()
            .filter(|site| !site.reachable)
            .map(|site| site.peer)
            .collect();
        Directory {
            sites,
            gone,
            warming: self.warming,
        }
    }

    /// Puts what every core queued on the wire.
    fn flush(&mut self) {
        for from in 0..self.sites.len() {
            while let Some((peer, msg)) = self.sites[from].core.poll_transmit() {
                let name = &self.sites[from].name;
                let Some(&to) = self.index.get(&peer) else {
                    self.fail(&format!("{name} sends to an unknown peer {peer}"));
                };
                if to == from {
                    self.fail(&format!("{name} sends {msg:?} to itself"));
                }
                self.send(from, to, Flow::Request, msg);
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, flow: Flow, msg: ClusterMsg) {
        *self.sent.entry(kind(&msg)).or_default() += 1;
        self.wire.push_back(Envelope {
            from,
            to,
            flow,
            msg,
        });
    }

    /// Delivers the oldest message on the wire (or loses it, if a site it
    /// travels between is cut off or the loss rule names it); `None` when
    /// nothing is on the wire.
    fn deliver(&mut self) -> Option<(Envelope, bool)> {
        self.flush();
        let envelope = self.wire.pop_front()?;
        self.step();
        let (from, to) = (envelope.from, envelope.to);
        let route = format!("{}->{}", self.sites[from].name, self.sites[to].name);
        let cut = !self.sites[from].reachable || !self.sites[to].reachable;
        if cut || self.lose.as_ref().is_some_and(|lose| lose(&envelope)) {
            self.log(format!("{route} {:?} LOST", envelope.msg));
            return Some((envelope, false));
        }
        self.log(format!("{route} {:?}", envelope.msg));
        let directory = self.directory(to);
        let from_peer = self.sites[from].peer;
        let site = &mut self.sites[to];
        let (ledger, msg) = (&mut site.ledger, envelope.msg.clone());
        match envelope.flow {
            Flow::Request => {
                match site
                    .core
                    .handle_request(ledger, &directory, self.now_ms, from_peer, msg)
                {
                    Ok(Some(answer)) => self.send(to, from, Flow::Reply, answer),
                    Ok(None) => self.fail(&format!("a request got no answer: {:?}", envelope.msg)),
                    Err(e) => self.fail(&format!("handle_request failed: {e:#}")),
                }
            }
            Flow::Reply => {
                if let Err(e) =
                    site.core
                        .handle_reply(ledger, &directory, self.now_ms, from_peer, msg)
                {
                    self.fail(&format!("handle_reply failed: {e:#}"));
                }
            }
        }
        self.check_site(to);
        self.flush();
        Some((envelope, true))
    }

    /// Delivers until the wire is empty, without moving the clock.
    fn deliver_all(&mut self) {
        while self.deliver().is_some() {}
    }

    /// Delivers until a message that `matches` arrived (and was handled).
    fn deliver_until(&mut self, matches: impl Fn(&Envelope) -> bool) {
        loop {
            match self.deliver() {
                Some((envelope, true)) if matches(&envelope) => return,
                Some(_) => {}
                None => self.fail("the awaited message was never sent"),
            }
        }
    }

    /// Lets time pass until `until_ms`: delivers everything on the wire,
    /// then moves the clock to the next timer of any core and fires it.
    /// With `stop_when_quiet`, stops as soon as nothing is on the wire and
    /// no core has a timer, leaving the clock where the last event was.
    fn run(&mut self, until_ms: i64, stop_when_quiet: bool) {
        loop {
            self.deliver_all();
            let next_timer = self
                .sites
                .iter()
                .filter_map(|s| s.core.poll_timeout())
                .min();
            if stop_when_quiet && next_timer.is_none() {
                return;
            }
            match next_timer {
                Some(at) if at <= until_ms => {
                    self.now_ms = self.now_ms.max(at);
                    self.sweep();
                    self.fire_timers();
                }
                _ => {
                    self.now_ms = self.now_ms.max(until_ms);
                    self.sweep();
                    return;
                }
            }
        }
    }

    fn run_until(&mut self, until_ms: i64) {
        self.run(until_ms, false);
    }

    fn run_quiet(&mut self, until_ms: i64) {
        self.run(until_ms, true);
    }

    fn step(&mut self) {
        self.steps += 1;
        if self.steps > STEPS_MAX {
            self.fail("the exchange does not settle (too many steps)");
        }
    }

    /// Every site marks the holds whose lease ran out (the agent does it
    /// every second; leases stop counting at their expiry either way).
    fn sweep(&mut self) {
        for site in &mut self.sites {
            site.ledger
                .sweep_expired(self.now_ms)
                .expect("the sweep succeeds");
        }
    }

    fn fire_timers(&mut self) {
        self.step();
        let now_ms = self.now_ms;
        for i in 0..self.sites.len() {
            if self.sites[i]
                .core
                .poll_timeout()
                .is_none_or(|at| at > now_ms)
            {
                continue;
            }
            let directory = self.directory(i);
            let site = &mut self.sites[i];
            if let Err(e) = site
                .core
                .handle_timeout(&mut site.ledger, &directory, now_ms)
            {
                self.fail(&format!("handle_timeout at {i} failed: {e:#}"));
            }
            if self.sites[i]
                .core
                .poll_timeout()
                .is_some_and(|at| at < now_ms)
            {
                let name = &self.sites[i].name;
                self.fail(&format!(
                    "{name} has a timer in the past after handling timeouts"
                ));
            }
            self.check_site(i);
        }
        self.flush();
    }
}

/// Checks of what the sites hold and record.
impl Fed {
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
            // Lost parts no longer count: they are being released, or (by
            // `none`) only recorded.
            let sum = |states: &[PartState]| -> u64 {
                let parts = record
                    .parts
                    .iter()
                    .filter(|p| states.contains(&p.state) && p.lost_at_ms.is_none());
                parts.map(|p| u64::from(p.nodes)).sum()
            };
            let committed = sum(&[PartState::Committed]);
            let taken = sum(&[PartState::Held, PartState::Committing, PartState::Committed]);
            let lost = record.parts.iter().any(|p| p.lost_at_ms.is_some());
            let bad = match record.state {
                ClusterState::Reserving => taken > nodes,
                ClusterState::Reserved if lost => taken > nodes,
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
    let mut fed = Fed::new(&[4, 4, 4]);
    let created = fed
        .create(0, "c1", 10)
        .expect("the federation has 11 free nodes");
    assert_eq!(created.state, ClusterState::Reserving);
    fed.run_quiet(T0_MS + 60 * SECOND_MS);
    assert_eq!(
        fed.now_ms, T0_MS,
        "reserving on a perfect network takes a few round trips and no timer"
    );

    let record = fed.record(0, "c1");
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
    let local = fed.sites[0]
        .ledger
        .reservation("c1/0")
        .unwrap()
        .expect("the master's reservation");
    assert_eq!((local.nodes, local.state), (4, ReservationState::Committed));
    assert_eq!(
        fed.committed_nodes(1, "c1") + fed.committed_nodes(2, "c1"),
        7
    );
    for (worker, name) in [(1, "B"), (2, "C")] {
        assert_eq!(
            fed.committed_nodes(worker, "c1"),
            committed_parts_at(&record, name)
        );
        let own = fed.record(worker, "c1");
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
    assert_eq!(fed.in_flight(), 0);
    assert_eq!(fed.check_settled(0, "c1", 10), ClusterState::Reserved);
}

#[test]
fn a_cluster_that_fits_at_the_master_stays_local() {
    let mut fed = Fed::new(&[8, 4]);
    let record = fed.create(0, "local", 5).expect("A has room");
    assert_eq!(record.state, ClusterState::Reserved);
    assert_eq!(record.parts.len(), 1);
    fed.run_quiet(T0_MS + 60 * SECOND_MS);
    assert_eq!(
        fed.sent.values().sum::<u64>(),
        0,
        "no message for a local cluster"
    );
    assert_eq!(fed.check_settled(0, "local", 5), ClusterState::Reserved);
}

#[test]
fn worker_killed_after_held_the_master_replans_onto_another_site() {
    // B (listed first among equals) gets all 7 remote nodes; C could take them too.
    let mut fed = Fed::new(&[4, 8, 8]);
    fed.create(A, "c2", 10).expect("the federation has room");
    // B answers `Held`, then dies before the commit reaches it.
    fed.deliver_until(|e| e.from == B && matches!(e.msg, ClusterMsg::Held { .. }));
    fed.reach(B, false);
    // Well before B's lease (30 s from its Held, at T0) runs out.
    fed.run_until(T0_MS + 20 * SECOND_MS);

    let record = fed.record(0, "c2");
    assert_eq!(
        record.state,
        ClusterState::Reserved,
        "parts: {:#?}",
        record.parts
    );
    assert_eq!(compute_nodes_committed(&record), 10);
    assert_eq!(committed_parts_at(&record, "B"), 0);
    assert_eq!(committed_parts_at(&record, "C"), 7);
    assert_eq!(fed.committed_nodes(2, "c2"), 7);
    assert!(!fed.sites[1].reachable);
    assert_eq!(fed.counting(1, "c2").len(), 1, "B's hold lasts its lease");

    // B's hold runs out by itself.
    let lease_end = T0_MS + fed.config.lease_ms + SECOND_MS;
    fed.run_until(lease_end);
    fed.sweep();
    assert!(
        fed.counting(1, "c2").is_empty(),
        "B still holds {:#?}",
        fed.counting(1, "c2")
    );

    // The master keeps releasing at B; once B is back the cluster settles.
    assert_eq!(fed.sites[0].core.in_flight(), 1);
    fed.reach(B, true);
    fed.run_quiet(fed.now_ms + 5 * 60 * SECOND_MS);
    assert_eq!(fed.in_flight(), 0);
    assert_eq!(fed.check_settled(0, "c2", 10), ClusterState::Reserved);
}

#[test]
fn worker_killed_after_held_fails_cleanly_when_no_site_has_room() {
    // A keeps 3, B holds 4 and C 3: without B there is no room for the rest.
    let mut fed = Fed::new(&[4, 4, 4]);
    fed.create(A, "c3", 10).expect("the federation has room");
    // B answers `Held`, then dies before the commit reaches it.
    fed.deliver_until(|e| e.from == B && matches!(e.msg, ClusterMsg::Held { .. }));
    fed.reach(B, false);
    fed.run_until(T0_MS + 30 * SECOND_MS);

    let record = fed.record(0, "c3");
    assert_eq!(
        record.state,
        ClusterState::Failed,
        "parts: {:#?}",
        record.parts
    );
    assert!(fed.counting(0, "c3").is_empty());
    assert!(fed.counting(2, "c3").is_empty(), "C was told to release");

    fed.run_until(T0_MS + fed.config.lease_ms + SECOND_MS);
    fed.sweep();
    fed.check_nothing_held("c3");
    assert!(
        fed.sites[1]
            .ledger
            .reservations(ReservationFilter::All, fed.now_ms)
            .unwrap()
            .iter()
            .all(|r| r.state == ReservationState::Expired)
    );
}

#[test]
fn restart_before_the_commit_decision_fails_and_releases_everything() {
    let mut fed = Fed::new(&[4, 4, 4]);
    // The workers hold, but A crashes before their answers arrive.
    fed.lose = Some(Box::new(|e: &Envelope| e.to == A && e.flow == Flow::Reply));
    fed.create(A, "c5", 10).expect("the federation has room");
    fed.deliver_all();
    assert_eq!(fed.record(0, "c5").state, ClusterState::Reserving);
    assert_eq!(fed.counting(1, "c5").len(), 1);
    assert_eq!(fed.counting(2, "c5").len(), 1);

    fed.lose = None;
    fed.restart(A);
    fed.run_quiet(T0_MS + 10 * SECOND_MS);
    let record = fed.record(0, "c5");
    assert_eq!(record.state, ClusterState::Failed);
    assert!(
        record.parts.iter().all(|p| p.state == PartState::Released),
        "{:#?}",
        record.parts
    );
    // Released at once, without waiting for the leases.
    assert!(fed.now_ms < T0_MS + fed.config.lease_ms);
    fed.check_nothing_held("c5");
    for site in 0..3 {
        for reservation in fed.sites[site]
            .ledger
            .reservations(ReservationFilter::All, fed.now_ms)
            .unwrap()
        {
            assert_eq!(
                reservation.state,
                ReservationState::Released,
                "{reservation:?}"
            );
        }
    }
    assert_eq!(fed.in_flight(), 0);
}

#[test]
fn restart_after_the_commit_decision_resends_the_commits() {
    let mut fed = Fed::new(&[4, 4, 4]);
    // A decides to commit, then crashes before any commit leaves.
    fed.lose = Some(Box::new(|e: &Envelope| {
        matches!(e.msg, ClusterMsg::Commit { .. })
    }));
    fed.create(A, "c6", 10).expect("the federation has room");
    fed.deliver_all();
    let record = fed.record(0, "c6");
    assert_eq!(record.state, ClusterState::Reserving);
    assert!(
        record
            .parts
            .iter()
            .filter(|p| !p.frontend)
            .all(|p| p.state == PartState::Committing),
        "{record:#?}"
    );

    fed.lose = None;
    fed.restart(A);
    fed.run_quiet(T0_MS + 10 * SECOND_MS);
    assert_eq!(fed.in_flight(), 0);
    assert_eq!(fed.check_settled(0, "c6", 10), ClusterState::Reserved);
}

#[test]
fn restart_resumes_the_release_of_a_site_given_up_after_it_committed() {
    // B commits its 7 nodes, but its answers never come back: A gives B up,
    // reserves at C instead, and must still take B's nodes back.
    let mut fed = Fed::new(&[4, 8, 8]);
    fed.create(A, "c7", 10).expect("the federation has room");
    fed.deliver_until(|e| e.to == B && matches!(e.msg, ClusterMsg::Commit { .. }));
    fed.reach(B, false);
    fed.run_until(T0_MS + 30 * SECOND_MS);
    let record = fed.record(0, "c7");
    assert_eq!(record.state, ClusterState::Reserved, "{:#?}", record.parts);
    assert_eq!(committed_parts_at(&record, "C"), 7);
    assert_eq!(
        fed.committed_nodes(B, "c7"),
        7,
        "B committed before it was cut off"
    );

    // A restarts while B is still unreachable; then B comes back.
    fed.restart(0);
    fed.run_until(fed.now_ms + 10 * SECOND_MS);
    fed.reach(B, true);
    fed.run_quiet(fed.now_ms + 5 * 60 * SECOND_MS);
    assert_eq!(
        fed.committed_nodes(B, "c7"),
        0,
        "B keeps nodes the cluster does not use"
    );
    assert_eq!(fed.in_flight(), 0);
    assert_eq!(fed.check_settled(0, "c7", 10), ClusterState::Reserved);
}

#[test]
fn bad_requests_are_refused_and_hold_nothing() {
    let mut fed = Fed::new(&[4, 4, 4]);
    let now_ms = fed.now_ms;
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
        let refused = fed.create_request(0, id, bad);
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
        fed.run_quiet(fed.now_ms + 10 * SECOND_MS);
        assert_eq!(
            fed.sent.values().sum::<u64>(),
            0,
            "{id}: a refused request sends nothing"
        );
        assert!(
            fed.sites[0].ledger.cluster(id).unwrap().is_none(),
            "{id} is stored"
        );
        for site in 0..3 {
            let all = fed.sites[site]
                .ledger
                .reservations(ReservationFilter::All, fed.now_ms)
                .unwrap();
            assert!(all.is_empty(), "{id}: site {site} holds {all:?}");
        }
    }

    // Exactly what the federation has is accepted.
    fed.create(0, "all", 11).expect("11 nodes fit");
    fed.run_quiet(fed.now_ms + 60 * SECOND_MS);
    assert_eq!(fed.check_settled(0, "all", 11), ClusterState::Reserved);
    // The same id again, and a site with no room left for a frontend.
    assert!(matches!(
        fed.create(0, "all", 1),
        Err(CreateError::Exists(_))
    ));
    assert!(matches!(
        fed.create(1, "more", 1),
        Err(CreateError::Insufficient { available: 0, .. })
    ));
    assert!(fed.sites[1].ledger.cluster("more").unwrap().is_none());
}

#[test]
fn a_view_still_warming_up_answers_not_ready_instead_of_full() {
    let mut fed = Fed::new(&[4, 4, 4]);
    let until_ms = fed.now_ms + 9_500;
    fed.warming = Some(Warming {
        heard: 1,
        expected: 2,
        until_ms,
    });
    // More than the view shows: not known yet, and nothing is held.
    match fed.create(0, "big", 12) {
        Err(
            e @ CreateError::NotReady {
                retry_after_s: 10,
                warming:
                    Warming {
                        heard: 1,
                        expected: 2,
                        ..
                    },
            },
        ) => assert!(
            e.to_string().contains("heard from 1 of the 2 sites") && e.to_string().contains("10 s"),
            "{e}"
        ),
        other => panic!("unexpected answer {other:?}"),
    }
    assert!(fed.sites[0].ledger.cluster("big").unwrap().is_none());
    // A shape no site seen yet offers: not known yet either.
    let huge = ClusterRequest {
        shape: NodeShape {
            cores: 1024,
            ..shape()
        },
        ..request(2, window_after(fed.now_ms))
    };
    assert!(matches!(
        fed.create_request(0, "huge", huge),
        Err(CreateError::NotReady { .. })
    ));
    // What the view already covers is accepted while it warms up.
    fed.create(0, "fits", 7).expect("the sites heard have room");
    fed.run_quiet(fed.now_ms + 60 * SECOND_MS);
    assert_eq!(fed.check_settled(0, "fits", 7), ClusterState::Reserved);
    // Once the warm-up is over, the same request gets the real answer.
    fed.now_ms = fed.now_ms.max(until_ms);
    assert!(matches!(
        fed.create(0, "big", 12),
        Err(CreateError::Insufficient { .. })
    ));
}

#[test]
fn a_workers_record_keeps_the_clusters_request_and_its_own_part_apart() {
    let mut fed = Fed::new(&[4, 4, 4]);
    fed.create(0, "c9", 10).expect("the federation has room");
    fed.run_quiet(T0_MS + 60 * SECOND_MS);
    assert_eq!(fed.check_settled(0, "c9", 10), ClusterState::Reserved);
    for worker in [1, 2] {
        let record = fed.record(worker, "c9");
        assert_eq!(record.request["nodes"], 10, "the request is the cluster's");
        let name = &fed.sites[worker].name;
        let own: u32 = record
            .parts
            .iter()
            .filter(|p| &p.site == name)
            .map(|p| p.nodes)
            .sum();
        assert!((3..=4).contains(&own), "{name}'s part: {own}");
    }
}

#[test]
fn delete_releases_at_every_site() {
    let mut fed = Fed::new(&[4, 4, 4]);
    fed.create(0, "c9", 10).expect("the federation has room");
    fed.run_quiet(T0_MS + 60 * SECOND_MS);
    assert_eq!(fed.check_settled(0, "c9", 10), ClusterState::Reserved);

    assert!(matches!(
        fed.delete(1, "c9"),
        Err(DeleteError::NotMaster(..))
    ));
    assert!(matches!(
        fed.delete(0, "nope"),
        Err(DeleteError::Unknown(_))
    ));
    let deleted = fed.delete(0, "c9").expect("A masters c9");
    assert_eq!(deleted.state, ClusterState::Stopping);
    fed.run_quiet(fed.now_ms + 60 * SECOND_MS);
    assert_eq!(fed.record(0, "c9").state, ClusterState::Finished);
    fed.check_nothing_held("c9");
    for worker in [1, 2] {
        assert_eq!(fed.record(worker, "c9").state, ClusterState::Finished);
    }
    assert_eq!(fed.in_flight(), 0);
    // The freed nodes can be reserved again.
    fed.create(0, "again", 10)
        .expect("the nodes are free again");
    fed.run_quiet(fed.now_ms + 60 * SECOND_MS);
    assert_eq!(fed.check_settled(0, "again", 10), ClusterState::Reserved);
}

#[test]
fn a_name_is_unique_among_the_live_clusters_of_a_master() {
    let mut fed = Fed::new(&[4, 4, 4]);
    let named = |fed: &Fed, name: &str, nodes: u32| ClusterRequest {
        name: name.to_owned(),
        ..request(nodes, window_after(fed.now_ms))
    };
    fed.create_request(0, "c1", named(&fed, "dup", 5))
        .expect("the federation has room");
    fed.run_quiet(fed.now_ms + 60 * SECOND_MS);
    let assert_taken = |refused: Result<ClusterRecord, CreateError>| match refused {
        Err(CreateError::NameTaken { name, id }) => {
            assert_eq!((name.as_str(), id.as_str()), ("dup", "c1"));
        }
        other => panic!("expected the name to be taken, got {other:?}"),
    };
    assert_taken(fed.create_request(0, "c2", named(&fed, "dup", 2)));
    assert!(fed.sites[0].ledger.cluster("c2").unwrap().is_none());
    // Names are per master: B may have its own "dup".
    fed.create_request(1, "c3", named(&fed, "dup", 2))
        .expect("another master's name does not count");
    fed.run_quiet(fed.now_ms + 60 * SECOND_MS);

    // A stopping cluster still has its name: its nodes are not all back.
    let deleted = fed.delete(0, "c1").expect("A masters c1");
    assert_eq!(
        deleted.state,
        ClusterState::Stopping,
        "c1 has nodes at B or C"
    );
    assert_taken(fed.create_request(0, "c4", named(&fed, "dup", 2)));
    fed.run_quiet(fed.now_ms + 60 * SECOND_MS);
    assert_eq!(fed.record(0, "c1").state, ClusterState::Finished);
    fed.create_request(0, "c4", named(&fed, "dup", 2))
        .expect("a finished cluster frees its name");
    fed.run_quiet(fed.now_ms + 60 * SECOND_MS);
    assert_eq!(fed.check_settled(0, "c4", 2), ClusterState::Reserved);
}

#[test]
fn delete_retries_an_unreachable_worker_until_it_comes_back() {
    let mut fed = Fed::new(&[4, 4, 4]);
    fed.create(0, "c10", 10).expect("the federation has room");
    fed.run_quiet(T0_MS + 60 * SECOND_MS);
    assert_eq!(fed.check_settled(0, "c10", 10), ClusterState::Reserved);

    fed.reach(B, false);
    fed.delete(0, "c10").expect("A masters c10");
    fed.run_until(fed.now_ms + 5 * 60 * SECOND_MS);
    let record = fed.record(0, "c10");
    assert_eq!(record.state, ClusterState::Stopping);
    let b_part = record
        .parts
        .iter()
        .find(|p| p.site == "B")
        .expect("B has a part");
    assert_eq!(b_part.state, PartState::Releasing);
    let releases = fed.sent["release"];
    // One release to C, and to B the first try plus backed-off retries.
    assert!(
        (5..20).contains(&releases),
        "{releases} releases in 5 minutes"
    );
    assert!(fed.counting(2, "c10").is_empty());
    assert_eq!(
        fed.committed_nodes(1, "c10"),
        4,
        "B keeps its nodes while cut off"
    );

    fed.reach(B, true);
    fed.run_quiet(fed.now_ms + 2 * 60 * SECOND_MS);
    assert_eq!(fed.record(0, "c10").state, ClusterState::Finished);
    assert_eq!(fed.record(1, "c10").state, ClusterState::Finished);
    fed.check_nothing_held("c10");
    assert_eq!(fed.in_flight(), 0);
}

#[test]
fn delete_gives_up_on_an_unreachable_worker_once_the_window_has_passed() {
    let mut fed = Fed::new(&[4, 4, 4]);
    let window = Window {
        start_ms: T0_MS + 10 * SECOND_MS,
        end_ms: T0_MS + 5 * 60 * SECOND_MS,
    };
    fed.create_request(0, "c11", request(10, window))
        .expect("the federation has room");
    fed.run_quiet(T0_MS + 5 * SECOND_MS);
    assert_eq!(fed.check_settled(0, "c11", 10), ClusterState::Reserved);

    fed.reach(B, false);
    fed.delete(0, "c11").expect("A masters c11");
    fed.run_until(window.end_ms - SECOND_MS);
    assert_eq!(fed.record(0, "c11").state, ClusterState::Stopping);
    fed.run_quiet(window.end_ms + 2 * fed.config.release_backoff_max_ms);
    assert_eq!(fed.record(0, "c11").state, ClusterState::Finished);
    assert_eq!(fed.in_flight(), 0);
    // B never heard of the delete: its committed nodes lie in the past.
    let at_b = fed.counting(1, "c11");
    assert!(
        at_b.iter().all(|r| r.window.end_ms <= fed.now_ms),
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
    let mut fed = Fed::new(&[4, 4, 4]);
    let now = fed.now_ms;
    let window = Window::new(now, now + HOUR_MS).unwrap();
    fed.create_request(0, "c1", request(10, window))
        .expect("room for 11 nodes");
    fed.run_quiet(T0_MS + 60 * SECOND_MS);
    assert_eq!(fed.record(0, "c1").state, ClusterState::Reserved);
    let at_b = committed_parts_at(&fed.record(0, "c1"), "B");

    // B reports its nodes (the numbers it derives for them): they reach
    // the master, filed under B.
    let b_peer = fed.sites[1].peer.to_string();
    let plan = crate::lifecycle::plan(&fed.record(1, "c1"), "B", &b_peer, fed.now_ms).unwrap();
    let indices: Vec<u32> = plan.nodes.iter().map(|n| n.index).collect();
    assert_eq!(indices.len(), at_b as usize);
    let site = &mut fed.sites[1];
    let sent = site
        .core
        .report_nodes(&site.ledger, "c1", reported(&indices, "installed"))
        .unwrap();
    assert!(sent);
    fed.flush();
    fed.run_quiet(fed.now_ms + 10 * SECOND_MS);
    let stored = fed.sites[0].ledger.nodes("c1").unwrap();
    assert_eq!(stored.len(), at_b as usize);
    assert!(
        stored
            .iter()
            .all(|n| n.site == "B" && n.state["state"] == "installed")
    );
    // The master reports to nobody.
    let master = &mut fed.sites[0];
    assert!(
        !master
            .core
            .report_nodes(&master.ledger, "c1", Vec::new())
            .unwrap()
    );

    // Reports the master cannot trust are refused and change nothing.
    let stranger = Keypair::generate_ed25519().public().to_peer_id();
    let directory = fed.directory(0);
    let now = fed.now_ms;
    let c_peer = fed.sites[2].peer.to_string();
    let at_c = crate::lifecycle::plan(&fed.record(2, "c1"), "C", &c_peer, now).unwrap();
    let twice = [indices[0], indices[0]];
    let bad = [
        (stranger, reported(&indices, "installed")),
        // C's nodes, the frontend's number, one node twice, a bogus state.
        (
            fed.sites[1].peer,
            reported(&[at_c.nodes[0].index], "installed"),
        ),
        (fed.sites[1].peer, reported(&[0], "installed")),
        (fed.sites[1].peer, reported(&twice, "installed")),
        (fed.sites[1].peer, reported(&indices, "exploded")),
        (
            fed.sites[1].peer,
            vec![ReportedNode {
                index: 1,
                frontend: false,
                state_json: "not json".to_owned(),
            }],
        ),
        (
            fed.sites[1].peer,
            vec![ReportedNode {
                index: 1,
                frontend: false,
                state_json: format!("{{\"x\":\"{}\"}}", "a".repeat(2000)),
            }],
        ),
    ];
    for (from, nodes) in bad {
        let master = &mut fed.sites[0];
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
    assert_eq!(fed.sites[0].ledger.nodes("c1").unwrap(), stored);
}

#[test]
fn a_site_replaced_after_the_commit_decision_updates_every_sites_parts() {
    // A holds only the frontend; B and C take the 4 nodes, D has room too.
    let mut fed = Fed::new(&[1, 2, 2, 2]);
    // Every Commit to C is lost until C's hold has expired: C then refuses
    // the commit, and the master replaces it with D, after B committed with
    // a list of parts that named C.
    fed.lose = Some(Box::new(|e: &Envelope| {
        e.to == C && matches!(e.msg, ClusterMsg::Commit { .. })
    }));
    fed.create(0, "c9", 4).expect("the federation has room");
    fed.run_until(T0_MS + 45 * SECOND_MS);
    fed.lose = None;
    fed.run_quiet(T0_MS + 120 * SECOND_MS);

    let record = fed.record(0, "c9");
    assert_eq!(record.state, ClusterState::Reserved, "{:#?}", record.parts);
    assert_eq!(committed_parts_at(&record, "C"), 0);
    assert_eq!(committed_parts_at(&record, "B"), 2);
    assert_eq!(committed_parts_at(&record, "D"), 2);
    // check_settled compares every worker's committed parts with the
    // master's: B learnt that D replaced C.
    assert_eq!(fed.check_settled(0, "c9", 4), ClusterState::Reserved);
}

/// The number of every node of `record`'s committed parts, by site.
fn numbers_by_site(record: &ClusterRecord) -> BTreeMap<String, Vec<u32>> {
    let mut by_site: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for part in record
        .parts
        .iter()
        .filter(|p| p.state == PartState::Committed && p.lost_at_ms.is_none())
    {
        let first = part
            .first_node
            .expect("a committed part has its first number");
        by_site
            .entry(part.site.clone())
            .or_default()
            .extend(first..first + part.nodes);
    }
    by_site
}

/// The events of `kind` at `site`.
fn events_of(fed: &Fed, site: usize, kind: &str) -> Vec<serde_json::Value> {
    let events = fed.sites[site]
        .ledger
        .events(0, 1000)
        .expect("the ledger reads");
    events
        .into_iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.detail)
        .collect()
}

/// A cluster of 10 at A over sites of 4: A keeps 3 (and the frontend), B
/// commits 4, C 3; D has room. Returns the federation.
fn cluster_over_a_and_b(heal: Heal) -> Fed {
    let mut fed = Fed::new(&[4, 4, 4, 4]);
    let request = ClusterRequest {
        name: "c1".to_owned(),
        heal,
        ..request(10, window_after(fed.now_ms))
    };
    fed.create_request(0, "c1", request).expect("there is room");
    fed.run_quiet(T0_MS + 10 * SECOND_MS);
    let record = fed.record(0, "c1");
    assert_eq!(record.state, ClusterState::Reserved);
    let numbers = numbers_by_site(&record);
    assert_eq!(numbers["A"], vec![1, 2, 3]);
    assert_eq!(numbers["B"], vec![4, 5, 6, 7], "{:#?}", record.parts);
    assert_eq!(numbers["C"], vec![8, 9, 10]);
    fed
}

#[test]
fn a_lost_worker_is_fenced_and_its_nodes_replaced_with_new_numbers() {
    let mut fed = cluster_over_a_and_b(Heal::Replace);
    let lost_at = fed.now_ms;
    fed.reach(1, false);
    // Gone at once in this view, but not yet silent for the grace period:
    // nothing happens before it ends.
    fed.run_until(lost_at + fed.config.heal_grace_ms - SECOND_MS);
    let record = fed.record(0, "c1");
    assert_eq!(committed_parts_at(&record, "B"), 4, "fenced too early");
    assert!(record.parts.iter().all(|p| p.lost_at_ms.is_none()));

    fed.run_until(lost_at + fed.config.heal_grace_ms + 30 * SECOND_MS);
    let record = fed.record(0, "c1");
    let lost: Vec<_> = record.parts.iter().filter(|p| p.site == "B").collect();
    assert_eq!(lost.len(), 1, "{:#?}", record.parts);
    assert_eq!(
        lost[0].state,
        PartState::Releasing,
        "fenced, and released until B answers"
    );
    assert!(lost[0].lost_at_ms.is_some());
    assert_eq!(
        record.state,
        ClusterState::Reserved,
        "healing never fails the cluster"
    );
    assert_eq!(
        record.epoch, 2,
        "one epoch for the fence, one for the replacement"
    );
    // The replacement is at D (the only site with room for 4), with
    // numbers after every number used before: B's 4..=7 are never reused.
    let numbers = numbers_by_site(&record);
    assert_eq!(numbers["A"], vec![1, 2, 3]);
    assert_eq!(numbers["C"], vec![8, 9, 10]);
    assert_eq!(numbers["D"], vec![11, 12, 13, 14]);
    assert!(!numbers.contains_key("B"));
    assert_eq!(fed.committed_nodes(3, "c1"), 4);
    // C and D know the cluster's parts as the master does, at the same
    // epoch: B is in no list.
    for site in [2, 3] {
        let at = fed.record(site, "c1");
        assert_eq!(at.epoch, record.epoch);
        assert_eq!(numbers_by_site(&at), numbers);
    }
    // Visible: the loss and the healing, in the master's event log.
    let lost_events = events_of(&fed, 0, "cluster.part_lost");
    assert_eq!(lost_events.len(), 1);
    assert_eq!(lost_events[0]["site"], "B");
    assert_eq!(lost_events[0]["fenced"], true);
    let healed = events_of(&fed, 0, "cluster.healed");
    assert_eq!(healed.len(), 1);
    assert_eq!(healed[0]["nodes"], 10);
    let after_ms = healed[0]["after_ms"].as_i64().expect("a duration");
    assert!(
        after_ms < 30 * SECOND_MS,
        "replaced {after_ms} ms after the loss"
    );

    // B comes back: the master's release reaches it; its part ends there
    // and its slots are free again.
    fed.reach(1, true);
    fed.run_until(fed.now_ms + 2 * fed.config.release_backoff_max_ms);
    assert_eq!(fed.committed_nodes(1, "c1"), 0, "B still holds its nodes");
    assert_eq!(fed.record(1, "c1").state, ClusterState::Finished);
    let record = fed.record(0, "c1");
    let at_b: Vec<_> = record.parts.iter().filter(|p| p.site == "B").collect();
    assert_eq!(at_b[0].state, PartState::Released);
    assert_eq!(record.state, ClusterState::Reserved);
}

#[test]
fn shrink_fences_the_lost_part_and_goes_on_with_fewer_nodes() {
    let mut fed = cluster_over_a_and_b(Heal::Shrink);
    let lost_at = fed.now_ms;
    fed.reach(1, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 30 * SECOND_MS);
    let record = fed.record(0, "c1");
    assert_eq!(record.state, ClusterState::Reserved);
    assert_eq!(record.epoch, 1);
    let numbers = numbers_by_site(&record);
    assert_eq!(
        numbers.keys().collect::<Vec<_>>(),
        vec!["A", "C"],
        "{:#?}",
        record.parts
    );
    assert!(
        fed.counting(3, "c1").is_empty(),
        "nothing reserved elsewhere"
    );
    let at_c = fed.record(2, "c1");
    assert_eq!((at_c.epoch, numbers_by_site(&at_c)), (1, numbers));
    assert!(events_of(&fed, 0, "cluster.healed").is_empty());
    assert_eq!(events_of(&fed, 0, "cluster.part_lost").len(), 1);
}

#[test]
fn none_records_the_loss_and_keeps_the_part() {
    let mut fed = cluster_over_a_and_b(Heal::None);
    let lost_at = fed.now_ms;
    fed.reach(1, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 30 * SECOND_MS);
    let record = fed.record(0, "c1");
    let at_b: Vec<_> = record.parts.iter().filter(|p| p.site == "B").collect();
    assert_eq!(at_b[0].state, PartState::Committed, "not fenced");
    assert!(at_b[0].lost_at_ms.is_some(), "but the loss is recorded");
    assert_eq!(record.epoch, 0);
    let lost_events = events_of(&fed, 0, "cluster.part_lost");
    assert_eq!(lost_events.len(), 1, "recorded once");
    assert_eq!(lost_events[0]["fenced"], false);
    fed.reach(1, true);
    fed.run_until(fed.now_ms + 60 * SECOND_MS);
    assert_eq!(fed.committed_nodes(1, "c1"), 4, "B keeps its nodes");
}

#[test]
fn a_master_that_sees_no_other_site_alive_fences_nobody() {
    let mut fed = cluster_over_a_and_b(Heal::Replace);
    let lost_at = fed.now_ms;
    // Everyone else is gone: A is more likely the one cut off.
    for site in 1..4 {
        fed.reach(site, false);
    }
    fed.run_until(lost_at + 3 * fed.config.heal_grace_ms);
    let record = fed.record(0, "c1");
    assert_eq!(committed_parts_at(&record, "B"), 4, "{:#?}", record.parts);
    assert!(events_of(&fed, 0, "cluster.part_lost").is_empty());
    // Once another site is seen again, the loss of B (still gone and
    // silent) is acted on.
    fed.reach(2, true);
    fed.reach(3, true);
    fed.run_until(fed.now_ms + fed.config.heal_retry_ms + 30 * SECOND_MS);
    let record = fed.record(0, "c1");
    assert_eq!(committed_parts_at(&record, "B"), 0, "{:#?}", record.parts);
    assert_eq!(compute_nodes_committed(&record), 10);
}

#[test]
fn a_short_cluster_is_replaced_once_room_appears() {
    // D is full (a cluster of its own) when B is lost; C has 1 slot left.
    let mut fed = cluster_over_a_and_b(Heal::Replace);
    let window = window_after(fed.now_ms);
    let filler = ClusterRequest {
        name: "filler".to_owned(),
        ..request(3, window)
    };
    fed.create_request(3, "filler", filler)
        .expect("D has room for itself");
    fed.run_quiet(fed.now_ms + 10 * SECOND_MS);
    let lost_at = fed.now_ms;
    fed.reach(1, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 30 * SECOND_MS);
    let record = fed.record(0, "c1");
    assert_eq!(
        compute_nodes_committed(&record),
        6,
        "short: {:#?}",
        record.parts
    );
    assert!(events_of(&fed, 0, "cluster.healed").is_empty());
    for site in 0..4 {
        fed.check_capacity(site);
    }
    // Room appears at D: a retry takes it.
    fed.delete(3, "filler").expect("D masters it");
    fed.run_until(fed.now_ms + fed.config.heal_retry_ms + 30 * SECOND_MS);
    let record = fed.record(0, "c1");
    assert_eq!(compute_nodes_committed(&record), 10, "{:#?}", record.parts);
    assert_eq!(events_of(&fed, 0, "cluster.healed").len(), 1);
}

#[test]
fn a_master_restarted_while_replacing_finishes_the_job() {
    let mut fed = cluster_over_a_and_b(Heal::Replace);
    let lost_at = fed.now_ms;
    fed.reach(1, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms);
    // The watch fired: B is fenced, C's hold is asked for. The master
    // restarts before the answer.
    let record = fed.record(0, "c1");
    assert!(
        record
            .parts
            .iter()
            .any(|p| p.site == "B" && p.lost_at_ms.is_some()),
        "{:#?}",
        record.parts
    );
    fed.restart(0);
    fed.run_until(fed.now_ms + 2 * fed.config.heal_grace_ms + fed.config.heal_retry_ms);
    let record = fed.record(0, "c1");
    assert_eq!(compute_nodes_committed(&record), 10, "{:#?}", record.parts);
    for site in 0..4 {
        fed.check_capacity(site);
    }
    let numbers = numbers_by_site(&record);
    let all: Vec<u32> = numbers.values().flatten().copied().collect();
    let unique: BTreeSet<u32> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "a number used twice: {numbers:?}");
    assert!(
        unique.iter().all(|n| !(4..=7).contains(n)),
        "B's numbers reused: {numbers:?}"
    );
}

#[test]
fn a_worker_keeps_the_newest_list_of_parts() {
    let mut fed = cluster_over_a_and_b(Heal::Replace);
    let lost_at = fed.now_ms;
    fed.reach(1, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 30 * SECOND_MS);
    let before = fed.record(2, "c1");
    assert_eq!(before.epoch, 2);
    // A commit of the first epoch, delayed or repeated, arrives at C.
    let master = fed.sites[0].peer;
    let stale_parts: Vec<_> = before
        .parts
        .iter()
        .cloned()
        .map(|mut p| {
            p.first_node = None;
            p
        })
        .collect();
    let attempt = before
        .parts
        .iter()
        .find(|p| p.site == "C")
        .expect("C's part")
        .attempt;
    let directory = fed.directory(2);
    let site = &mut fed.sites[2];
    let answer = site
        .core
        .handle_request(
            &mut site.ledger,
            &directory,
            fed.now_ms,
            master,
            ClusterMsg::Commit {
                cluster: "c1".to_owned(),
                name: "c1".to_owned(),
                nodes: 4,
                attempt,
                segment: before.segment.expect("a segment"),
                epoch: 0,
                parts: stale_parts,
            },
        )
        .expect("the ledger works");
    assert!(
        matches!(answer, Some(ClusterMsg::Committed { .. })),
        "{answer:?}"
    );
    assert_eq!(
        fed.record(2, "c1"),
        before,
        "a stale list changed C's record"
    );
}

// Healing under message faults, restarts and old records (found in review).

/// A survivor that stops answering while the replacement is reserved, and
/// then goes gone, is declared lost too (the watch once skipped a cluster
/// in the middle of healing for good).
#[test]
fn a_second_loss_during_healing_is_declared_too() {
    let mut fed = cluster_over_a_and_b(Heal::Replace);
    let lost_at = fed.now_ms;
    // C stays reachable in the view but never gets its re-commit.
    fed.lose = Some(Box::new(|e: &Envelope| {
        e.to == C && matches!(e.msg, ClusterMsg::Commit { .. })
    }));
    fed.reach(B, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 5 * SECOND_MS);
    let record = fed.record(0, "c1");
    assert!(
        record
            .parts
            .iter()
            .any(|p| p.site == "B" && p.lost_at_ms.is_some())
    );
    // Now C dies too: gone in the view, silent since the cluster's creation.
    fed.reach(C, false);
    fed.run_until(fed.now_ms + 10 * 60 * SECOND_MS);
    let record = fed.record(0, "c1");
    let c: Vec<_> = record.parts.iter().filter(|p| p.site == "C").collect();
    assert!(
        c.iter().all(|p| p.lost_at_ms.is_some()),
        "C gone and silent for 10 min but never declared lost: {:?}; in flight {}, next timer {:?}",
        record
            .parts
            .iter()
            .map(|p| (&p.site, p.attempt, p.state, p.lost_at_ms.is_some()))
            .collect::<Vec<_>>(),
        fed.sites[A].core.in_flight(),
        fed.sites[A].core.poll_timeout().map(|t| t - fed.now_ms)
    );
}

/// The parts of `record` in the cluster (committed or being committed, not
/// lost), with their first numbers.
fn listed_parts(record: &ClusterRecord) -> Vec<(String, u32, Option<u32>)> {
    let mut parts: Vec<_> = record
        .parts
        .iter()
        .filter(|p| crate::lifecycle::in_cluster(p.state) && p.lost_at_ms.is_none())
        .map(|p| (p.site.clone(), p.attempt, p.first_node))
        .collect();
    parts.sort();
    parts
}

/// A commit lists only parts committed or decided: a replacement still
/// being reserved, and then never held, never reaches a survivor's list.
#[test]
fn a_replacement_never_held_never_reaches_the_survivors_list() {
    let mut fed = cluster_over_a_and_b(Heal::Replace);
    let lost_at = fed.now_ms;
    // D never gets the reserve (D is not gone in the view): given up.
    fed.lose = Some(Box::new(|e: &Envelope| {
        e.to == 3 && matches!(e.msg, ClusterMsg::Reserve { .. })
    }));
    fed.reach(B, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 5 * 60 * SECOND_MS);
    let master = fed.record(A, "c1");
    let at_c = fed.record(C, "c1");
    assert_eq!(
        listed_parts(&at_c),
        listed_parts(&master),
        "C's list (epoch {}) differs from the master's (epoch {}): {:?}",
        at_c.epoch,
        master.epoch,
        master
            .parts
            .iter()
            .map(|p| (&p.site, p.attempt, p.state, p.first_node))
            .collect::<Vec<_>>()
    );
}

/// Reordering: C's `Committed` to the fence's commit arrives after D is
/// held; the list with D goes out under a new epoch, and C's late answer
/// (of the older epoch) does not close its part before it has D's number.
#[test]
fn a_late_committed_does_not_leave_a_survivor_on_an_older_list() {
    use std::cell::RefCell;
    use std::rc::Rc;
    let mut fed = cluster_over_a_and_b(Heal::Replace);
    let lost_at = fed.now_ms;
    let delayed: Rc<RefCell<Vec<Envelope>>> = Rc::default();
    let keep = delayed.clone();
    fed.lose = Some(Box::new(move |e: &Envelope| {
        let hit = e.from == C
            && e.flow == Flow::Reply
            && matches!(e.msg, ClusterMsg::Committed { .. })
            && keep.borrow().is_empty();
        if hit {
            keep.borrow_mut().push(e.clone());
        }
        hit
    }));
    fed.reach(B, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + SECOND_MS);
    assert_eq!(delayed.borrow().len(), 1, "C's answer was held back");
    fed.lose = None;
    let late = delayed.borrow_mut().pop().expect("held back");
    fed.wire.push_back(late);
    fed.run_until(fed.now_ms + 5 * 60 * SECOND_MS);
    let master = fed.record(A, "c1");
    let at_c = fed.record(C, "c1");
    assert_eq!(
        listed_parts(&at_c),
        listed_parts(&master),
        "C (epoch {}) vs master (epoch {})",
        at_c.epoch,
        master.epoch
    );
}

/// Commits delivered newest first: C never applies an older list last
/// (every changed list has its own epoch).
#[test]
fn reordered_commits_never_take_a_survivor_back_to_an_older_list() {
    use std::cell::RefCell;
    use std::rc::Rc;
    // A keeps 3, B 4, C 3; D and E have room for 4 each.
    let mut fed = Fed::new(&[4, 4, 4, 4, 4]);
    let request = ClusterRequest {
        name: "c1".to_owned(),
        ..request(10, window_after(fed.now_ms))
    };
    fed.create_request(A, "c1", request).expect("there is room");
    fed.run_quiet(T0_MS + 10 * SECOND_MS);
    let lost_at = fed.now_ms;
    let held: Rc<RefCell<Vec<Envelope>>> = Rc::default();
    let keep = held.clone();
    // D never gets its reserve (given up, E replaces it); every commit to
    // C is held back meanwhile.
    fed.lose = Some(Box::new(move |e: &Envelope| {
        if e.to == 3 && matches!(e.msg, ClusterMsg::Reserve { .. }) {
            return true;
        }
        if e.to == C && matches!(e.msg, ClusterMsg::Commit { .. }) {
            keep.borrow_mut().push(e.clone());
            return true;
        }
        false
    }));
    fed.reach(B, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 20 * SECOND_MS);
    fed.lose = None;
    let master = fed.record(A, "c1");
    assert!(
        listed_parts(&master).iter().any(|p| p.0 == "E"),
        "{:#?}",
        master.parts
    );
    // The held-back commits arrive newest first.
    let mut late = std::mem::take(&mut *held.borrow_mut());
    assert!(late.len() >= 2, "{late:?}");
    late.reverse();
    fed.wire.extend(late);
    fed.run_until(fed.now_ms + 5 * 60 * SECOND_MS);
    let master = fed.record(A, "c1");
    let at_c = fed.record(C, "c1");
    assert_eq!(
        listed_parts(&at_c),
        listed_parts(&master),
        "C (epoch {}) vs master (epoch {})",
        at_c.epoch,
        master.epoch
    );
}

/// A cluster stored before migration 6 (no first_node anywhere) that heals:
/// survivors keep their numbers, replacements do not reuse any.
#[test]
fn a_cluster_from_before_epochs_keeps_its_numbers_when_healed() {
    let mut fed = cluster_over_a_and_b(Heal::Replace);
    for site in [A, B, C] {
        let mut record = fed.record(site, "c1");
        for part in &mut record.parts {
            part.first_node = None;
        }
        let now = fed.now_ms;
        fed.sites[site]
            .ledger
            .update_cluster("c1", record.state, None, Some(&record.parts), now)
            .expect("the ledger writes");
    }
    fed.restart(A);
    // What every site runs before the loss (numbered the legacy way).
    let peer_c = fed.sites[C].peer.to_string();
    let plan_c = |fed: &Fed| {
        let record = fed.record(C, "c1");
        let window = crate::lifecycle::window_of(&record).expect("a window");
        crate::lifecycle::plan(&record, "C", &peer_c, window.start_ms)
            .expect("C runs")
            .nodes
            .iter()
            .map(|n| n.index)
            .collect::<Vec<_>>()
    };
    assert_eq!(plan_c(&fed), vec![8, 9, 10]);
    let lost_at = fed.now_ms;
    fed.reach(B, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 30 * SECOND_MS);
    let record = fed.record(A, "c1");
    assert_eq!(compute_nodes_committed(&record), 10, "{:#?}", record.parts);
    assert_eq!(
        plan_c(&fed),
        vec![8, 9, 10],
        "C's running nodes renumbered: {:?}",
        record
            .parts
            .iter()
            .map(|p| (&p.site, p.attempt, p.state, p.first_node))
            .collect::<Vec<_>>()
    );
    let numbers = numbers_by_site(&record);
    assert!(
        numbers["D"].iter().all(|n| *n > 10),
        "D reuses numbers of the cluster: {numbers:?}"
    );
}

/// A survivor's re-commit that is never answered, in a shrink cluster whose
/// window then ends: the master stops resending it at the window's end.
#[test]
fn a_live_commit_stops_at_the_windows_end() {
    let mut fed = cluster_over_a_and_b(Heal::Shrink);
    let end = fed.record(A, "c1");
    let end = crate::lifecycle::window_of(&end).expect("a window").end_ms;
    fed.run_until(end - 90 * SECOND_MS);
    fed.lose = Some(Box::new(|e: &Envelope| {
        e.to == C && matches!(e.msg, ClusterMsg::Commit { .. })
    }));
    fed.reach(B, false);
    fed.run_until(end + 60 * 60 * SECOND_MS);
    let commits_then = fed.sent["commit"];
    fed.run_until(end + 2 * 60 * 60 * SECOND_MS);
    assert_eq!(
        (
            fed.sites[A].core.in_flight(),
            fed.sent["commit"] - commits_then
        ),
        (0, 0),
        "still committing an hour after the window ended"
    );
}

/// A round of replacement that lasts longer than `heal_retry_ms` and ends
/// short is retried once room appears.
#[test]
fn a_long_failed_healing_round_is_retried() {
    // A..G; G is full with a cluster of its own.
    let mut fed = Fed::new(&[4, 4, 4, 4, 4, 4, 4]);
    let c1 = ClusterRequest {
        name: "c1".to_owned(),
        ..request(10, window_after(fed.now_ms))
    };
    fed.create_request(A, "c1", c1).expect("there is room");
    fed.run_quiet(T0_MS + 10 * SECOND_MS);
    let filler = ClusterRequest {
        name: "filler".to_owned(),
        ..request(3, window_after(fed.now_ms))
    };
    fed.create_request(6, "filler", filler)
        .expect("G has room for itself");
    fed.run_quiet(fed.now_ms + 10 * SECOND_MS);
    let record = fed.record(A, "c1");
    assert_eq!(compute_nodes_committed(&record), 10);
    // D, E and F never get a reserve: each is given up after its tries.
    fed.lose = Some(Box::new(|e: &Envelope| {
        (3..=5).contains(&e.to) && matches!(e.msg, ClusterMsg::Reserve { .. })
    }));
    let lost_at = fed.now_ms;
    fed.reach(B, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 60 * SECOND_MS);
    let record = fed.record(A, "c1");
    assert_eq!(compute_nodes_committed(&record), 6, "short");
    // Room appears at G (never tried, never excluded).
    fed.delete(6, "filler").expect("G masters it");
    fed.run_until(fed.now_ms + 10 * 60 * SECOND_MS);
    let record = fed.record(A, "c1");
    assert_eq!(
        compute_nodes_committed(&record),
        10,
        "never retried: {:?}",
        record
            .parts
            .iter()
            .map(|p| (&p.site, p.attempt, p.state))
            .collect::<Vec<_>>()
    );
}

/// The master restarts mid-replacement with one replacement part held and
/// another still reserving, while the lost part is still being released.
#[test]
fn a_restart_with_a_held_replacement_part_heals() {
    let mut fed = Fed::new(&[4, 4, 4, 2, 2]);
    let c1 = ClusterRequest {
        name: "c1".to_owned(),
        ..request(10, window_after(fed.now_ms))
    };
    fed.create_request(A, "c1", c1).expect("there is room");
    fed.run_quiet(T0_MS + 10 * SECOND_MS);
    fed.lose = Some(Box::new(|e: &Envelope| {
        e.to == 4 && matches!(e.msg, ClusterMsg::Reserve { .. })
    }));
    let lost_at = fed.now_ms;
    fed.reach(B, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + SECOND_MS);
    let record = fed.record(A, "c1");
    eprintln!(
        "BEFORE {:?}",
        record
            .parts
            .iter()
            .map(|p| (&p.site, p.attempt, p.state))
            .collect::<Vec<_>>()
    );
    fed.restart(A);
    let record = fed.record(A, "c1");
    eprintln!(
        "AFTER RESTART {:?}",
        record
            .parts
            .iter()
            .map(|p| (&p.site, p.attempt, p.state))
            .collect::<Vec<_>>()
    );
    fed.lose = None;
    fed.run_until(fed.now_ms + 10 * 60 * SECOND_MS);
    let record = fed.record(A, "c1");
    eprintln!(
        "END {:?}",
        record
            .parts
            .iter()
            .map(|p| (&p.site, p.attempt, p.state))
            .collect::<Vec<_>>()
    );
    assert_eq!(compute_nodes_committed(&record), 10);
    assert!(
        record
            .parts
            .iter()
            .all(|p| !matches!(p.state, PartState::Held | PartState::Reserving))
    );
    for site in 0..5 {
        fed.check_capacity(site);
    }
}

#[test]
fn a_delete_while_healing_releases_everything() {
    let mut fed = cluster_over_a_and_b(Heal::Replace);
    // D's answers are lost: its hold stays.
    fed.lose = Some(Box::new(|e: &Envelope| {
        e.from == 3 && e.flow == Flow::Reply
    }));
    let lost_at = fed.now_ms;
    fed.reach(B, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + SECOND_MS);
    fed.delete(A, "c1").expect("A masters it");
    fed.lose = None;
    fed.run_until(fed.now_ms + 10 * 60 * SECOND_MS);
    for site in [A, C, 3] {
        assert!(
            fed.counting(site, "c1").is_empty(),
            "site {site} holds {:?}",
            fed.counting(site, "c1")
        );
    }
    let record = fed.record(A, "c1");
    eprintln!(
        "{} {:?}",
        record.state,
        record
            .parts
            .iter()
            .map(|p| (&p.site, p.attempt, p.state))
            .collect::<Vec<_>>()
    );
    fed.reach(B, true);
    fed.run_until(fed.now_ms + 10 * 60 * SECOND_MS);
    assert!(fed.counting(B, "c1").is_empty());
    assert_eq!(fed.record(A, "c1").state, ClusterState::Finished);
    assert_eq!(fed.in_flight(), 0);
}

/// Sites given up in one healing round are tried again in later rounds,
/// while the master stays in flight (the lost site's release keeps it
/// there).
#[test]
fn sites_given_up_once_are_tried_again_in_later_rounds() {
    let mut fed = Fed::new(&[4, 4, 4, 4]);
    let c1 = ClusterRequest {
        name: "c1".to_owned(),
        ..request(10, window_after(fed.now_ms))
    };
    fed.create_request(A, "c1", c1).expect("there is room");
    fed.run_quiet(T0_MS + 10 * SECOND_MS);
    fed.lose = Some(Box::new(|e: &Envelope| {
        e.to == 3 && matches!(e.msg, ClusterMsg::Reserve { .. })
    }));
    let lost_at = fed.now_ms;
    fed.reach(B, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 10 * SECOND_MS);
    assert_eq!(compute_nodes_committed(&fed.record(A, "c1")), 6, "short");
    // D's trouble was brief.
    fed.lose = None;
    fed.run_until(fed.now_ms + 30 * 60 * SECOND_MS);
    let record = fed.record(A, "c1");
    assert_eq!(
        compute_nodes_committed(&record),
        10,
        "{:?}",
        record
            .parts
            .iter()
            .map(|p| (&p.site, p.attempt, p.state))
            .collect::<Vec<_>>()
    );
}

/// No other site has room for the replacements: the master's own free
/// slots take them, held and committed in its own ledger, numbered after
/// every number used.
#[test]
fn the_master_replaces_lost_nodes_in_its_own_free_slots_last() {
    let mut fed = Fed::new(&[8, 4, 4]);
    let window = window_after(fed.now_ms);
    let filler = |name: &str, nodes| ClusterRequest {
        name: name.to_owned(),
        ..request(nodes, window)
    };
    // A keeps 4 slots busy for now; C is full.
    fed.create_request(0, "filler-a", filler("filler-a", 3))
        .expect("A has room");
    fed.create_request(2, "filler-c", filler("filler-c", 3))
        .expect("C has room");
    fed.run_quiet(fed.now_ms + 10 * SECOND_MS);
    fed.create_request(0, "c1", filler("c1", 6))
        .expect("A and B have room");
    fed.run_quiet(fed.now_ms + 10 * SECOND_MS);
    let record = fed.record(0, "c1");
    assert_eq!(committed_parts_at(&record, "A"), 3, "{:#?}", record.parts);
    assert_eq!(committed_parts_at(&record, "B"), 3, "{:#?}", record.parts);
    fed.delete(0, "filler-a").expect("A masters it");
    fed.run_quiet(fed.now_ms + 10 * SECOND_MS);

    let lost_at = fed.now_ms;
    fed.reach(1, false);
    fed.run_until(lost_at + fed.config.heal_grace_ms + 30 * SECOND_MS);
    let record = fed.record(0, "c1");
    assert_eq!(compute_nodes_committed(&record), 6, "{:#?}", record.parts);
    assert_eq!(committed_parts_at(&record, "A"), 6, "{:#?}", record.parts);
    assert_eq!(
        fed.committed_nodes(0, "c1"),
        7,
        "the frontend and 6 nodes at A"
    );
    let numbers = numbers_by_site(&record);
    assert_eq!(numbers["A"], vec![1, 2, 3, 7, 8, 9]);
    for site in 0..3 {
        fed.check_capacity(site);
    }
    let plan = crate::lifecycle::plan(
        &record,
        "A",
        &fed.sites[0].peer.to_string(),
        window.start_ms,
    )
    .expect("it runs at A");
    let here: Vec<u32> = plan.nodes.iter().map(|n| n.index).collect();
    assert_eq!(here, [0, 1, 2, 3, 7, 8, 9]);
    // A restart keeps the extra part; a delete releases it with the rest.
    fed.restart(0);
    fed.run_quiet(fed.now_ms + 10 * SECOND_MS);
    assert_eq!(fed.committed_nodes(0, "c1"), 7);
    fed.delete(0, "c1").expect("A masters it");
    fed.run_until(fed.now_ms + 10 * SECOND_MS);
    assert!(
        fed.counting(0, "c1").is_empty(),
        "{:?}",
        fed.counting(0, "c1")
    );
}

// Hostile or broken masters (found by the fuzz target `cluster_worker`).

/// A commit whose parts the ledger cannot store (a node numbered 0, two
/// parts of one site and attempt, another site under the worker's name, a
/// part without nodes) is
/// refused before the hold is committed: the worker once committed the
/// hold, then failed to store the cluster's record with a ledger error,
/// leaving nodes committed to a cluster it knew nothing of.
#[test]
fn a_commit_with_parts_the_ledger_refuses_is_refused_before_committing() {
    let mut fed = Fed::new(&[4, 4]);
    let master = fed.sites[0].peer;
    let worker_id = fed.sites[1].peer.to_string();
    let directory = fed.directory(1);
    let now_ms = fed.now_ms;
    let site = &mut fed.sites[1];
    let reserve = ClusterMsg::Reserve {
        cluster: "c-00aa".to_owned(),
        name: "hpc".to_owned(),
        attempt: 1,
        nodes: 3,
        shape: shape(),
        window: window_after(now_ms),
        lease_ms: 30 * SECOND_MS,
        segment: 100,
        gateway: Some(gateway_of("A")),
    };
    let answer = site
        .core
        .handle_request(&mut site.ledger, &directory, now_ms, master, reserve)
        .expect("the ledger works");
    assert!(
        matches!(answer, Some(ClusterMsg::Held { .. })),
        "{answer:?}"
    );
    let part = |site: &str, peer_id: Option<String>, first_node| ClusterPart {
        site: site.to_owned(),
        peer_id,
        attempt: 1,
        nodes: 3,
        frontend: false,
        state: PartState::Committed,
        reservation_key: Some(format!("c-00aa/{site}")),
        gateway: Some(gateway_of(site)),
        first_node,
        lost_at_ms: None,
    };
    let master_part = |first_node| part("A", Some(master.to_string()), first_node);
    let own = part("B", Some(worker_id.clone()), Some(4));
    for parts in [
        // The fuzzer's input: the master's part numbered from 0.
        vec![master_part(Some(0)), own.clone()],
        vec![master_part(Some(1)), master_part(Some(1)), own.clone()],
        vec![master_part(Some(1)), part("B", None, Some(7)), own.clone()],
        // The fuzzer's second: a part without nodes or the frontend.
        vec![
            ClusterPart {
                nodes: 0,
                ..master_part(Some(1))
            },
            own.clone(),
        ],
    ] {
        let commit = ClusterMsg::Commit {
            cluster: "c-00aa".to_owned(),
            name: "hpc".to_owned(),
            nodes: 4,
            attempt: 1,
            segment: 100,
            epoch: 1,
            parts: parts.clone(),
        };
        let answer = site
            .core
            .handle_request(&mut site.ledger, &directory, now_ms, master, commit)
            .expect("a refused commit is no ledger error");
        assert!(
            matches!(answer, Some(ClusterMsg::Refused { .. })),
            "{answer:?} for {parts:#?}"
        );
        let hold = site.ledger.reservation("c-00aa/1").unwrap().unwrap();
        assert_eq!(hold.state, ReservationState::Held);
        assert!(site.ledger.cluster("c-00aa").unwrap().is_none());
    }
    // The same commit with parts it can store goes through.
    let commit = ClusterMsg::Commit {
        cluster: "c-00aa".to_owned(),
        name: "hpc".to_owned(),
        nodes: 4,
        attempt: 1,
        segment: 100,
        epoch: 1,
        parts: vec![master_part(Some(1)), own],
    };
    let answer = site
        .core
        .handle_request(&mut site.ledger, &directory, now_ms, master, commit)
        .expect("the ledger works");
    assert!(
        matches!(answer, Some(ClusterMsg::Committed { .. })),
        "{answer:?}"
    );
    assert!(site.ledger.cluster("c-00aa").unwrap().is_some());
}
