//! The event loop: a virtual clock, a deterministic queue of events, the
//! simulated network and the fault schedule.

use std::collections::{BTreeMap, VecDeque};

use crate::SiteId;
use crate::clock::SiteClock;
use crate::config::{PartitionKind, SimConfig};
use crate::rng::{Rng, mix64};
use crate::trace::{Trace, TraceEvent, TraceKind};

/// What the network carries: the engine needs its size (for bandwidth and
/// statistics), a label (for statistics and the trace) and a fingerprint
/// (for the trace hash).
pub trait Payload: Clone {
    /// Bytes on the wire.
    fn wire_len(&self) -> usize;
    /// Short name of the message kind, e.g. `gossip`.
    fn kind(&self) -> &'static str;
    /// A hash of the content: equal messages, equal fingerprints.
    fn fingerprint(&self) -> u64;
}

/// One simulated site, driven by the engine. Implementations keep their
/// volatile state in memory and their durable state somewhere that survives
/// [`Site::crash`].
///
/// After every call the engine sends what the site queued with
/// [`Ctx::send`] and asks [`Site::poll_timeout`] when to call
/// [`Site::handle_timeout`] next (a call may come earlier; it must be
/// harmless).
pub trait Site {
    /// Messages between sites.
    type Msg: Payload;
    /// Inputs from outside the federation (the workload).
    type Input;

    /// The site boots: at the start of the run and after every restart.
    fn start(&mut self, ctx: &mut Ctx<'_, Self::Msg>);
    /// A message from `from` arrived.
    fn handle_message(&mut self, ctx: &mut Ctx<'_, Self::Msg>, from: SiteId, msg: Self::Msg);
    /// The timer armed through [`Site::poll_timeout`] fired.
    fn handle_timeout(&mut self, ctx: &mut Ctx<'_, Self::Msg>);
    /// An input from outside arrived.
    fn handle_input(&mut self, ctx: &mut Ctx<'_, Self::Msg>, input: Self::Input);
    /// The site crashed: volatile state is lost. `start` follows at restart.
    fn crash(&mut self);
    /// When the site next wants [`Site::handle_timeout`], by its own clock.
    fn poll_timeout(&self) -> Option<i64>;
}

/// What a site sees of the world during one call.
#[derive(Debug)]
pub struct Ctx<'a, M> {
    site: SiteId,
    now_ms: i64,
    true_ms: i64,
    outbox: &'a mut Vec<(SiteId, M)>,
    rng: &'a mut Rng,
}

impl<M> Ctx<'_, M> {
    /// The site this call is for.
    pub fn site(&self) -> SiteId {
        self.site
    }

    /// The site's own clock (skewed and drifting), unix ms. Protocol code
    /// uses only this.
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// True time, unix ms: for measurements by the harness, never for
    /// protocol decisions (no real site can read it).
    pub fn true_ms(&self) -> i64 {
        self.true_ms
    }

    /// Sends `msg` to `to` through the simulated network.
    pub fn send(&mut self, to: SiteId, msg: M) {
        self.outbox.push((to, msg));
    }

    /// This site's random stream.
    pub fn rng(&mut self) -> &mut Rng {
        self.rng
    }
}

/// What one step of the engine did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stepped {
    /// True time of the step, unix ms.
    pub at_ms: i64,
    /// The site whose code ran, if one did.
    pub site: Option<SiteId>,
    /// What happened.
    pub kind: TraceKind,
}

/// Per-site traffic counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SiteTraffic {
    /// Messages sent.
    pub sent_msgs: u64,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Messages received.
    pub recv_msgs: u64,
    /// Bytes received.
    pub recv_bytes: u64,
}

/// Counters of the network and the faults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Per message kind: (messages, bytes) sent.
    pub by_kind: BTreeMap<&'static str, (u64, u64)>,
    /// Messages lost to random loss.
    pub lost: u64,
    /// Messages duplicated.
    pub duplicated: u64,
    /// Messages held back (reordered).
    pub reordered: u64,
    /// Per message kind: the faults that struck it, so that a sweep can
    /// show it exercised every fault on every kind of message.
    pub faults_by_kind: BTreeMap<&'static str, KindFaults>,
    /// Messages dropped by a partition.
    pub partitioned: u64,
    /// Messages dropped because their destination was down or restarted.
    pub dest_down: u64,
    /// Crashes.
    pub crashes: u64,
    /// Partitions.
    pub partitions: u64,
    /// Events processed.
    pub events: u64,
}

/// The message faults that struck one kind of message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindFaults {
    /// Lost to random loss.
    pub lost: u64,
    /// Duplicated.
    pub duplicated: u64,
    /// Held back (reordered).
    pub reordered: u64,
}

#[derive(Debug, Clone)]
struct SiteRuntime {
    up: bool,
    /// Bumped at every restart: messages sent to an earlier incarnation are
    /// dropped (their connection is gone).
    incarnation: u64,
    clock: SiteClock,
    /// The earliest pending timer, true time, and its generation.
    timer_at: Option<i64>,
    timer_generation: u64,
    /// The last wake-up converted to true time, (local, true): sites ask
    /// for the same instant call after call, and the clock never changes.
    wake_converted: Option<(i64, i64)>,
    /// When the uplink is free again, true time in µs.
    uplink_free_us: i64,
    traffic: SiteTraffic,
}

#[derive(Debug, Clone)]
struct Partition {
    kind: PartitionKind,
    /// Side of each site (0 or 1), or the isolated site.
    side: Vec<bool>,
    isolated: Option<SiteId>,
}

impl Partition {
    fn blocks(&self, from: SiteId, to: SiteId) -> bool {
        match self.kind {
            PartitionKind::Halves => self.side[from] != self.side[to],
            PartitionKind::Isolate => {
                from != to && (self.isolated == Some(from) || self.isolated == Some(to))
            }
            PartitionKind::Asymmetric => !self.side[from] && self.side[to],
        }
    }
}

#[derive(Debug)]
enum Event<M, I> {
    Deliver {
        from: SiteId,
        to: SiteId,
        incarnation: u64,
        msg: M,
    },
    Timer {
        site: SiteId,
        generation: u64,
    },
    Input {
        site: SiteId,
        input: I,
        label: &'static str,
    },
    Crash,
    Restart {
        site: SiteId,
    },
    PartitionStart,
    Heal,
    Calm,
}

/// The events of one instant, in the order they were scheduled.
type Bucket<S> = VecDeque<Event<<S as Site>::Msg, <S as Site>::Input>>;

/// Most events in the queue; beyond it a run is broken (a message storm).
pub const QUEUE_MAX: usize = 50_000_000;
/// Most emptied buckets kept for reuse.
const SPARE_BUCKETS_MAX: usize = 256;
/// Largest emptied bucket kept for reuse, events (a few MB at most are kept).
const SPARE_BUCKET_EVENTS_MAX: usize = 256;

/// A simulation of `S` sites. See the crate docs.
pub struct Sim<S: Site> {
    config: SimConfig,
    sites: Vec<S>,
    runtime: Vec<SiteRuntime>,
    /// Queued events by time; within one instant, in the order they were
    /// scheduled (a bucket queue: events cluster on few distinct
    /// milliseconds, so this beats a binary heap of millions of entries).
    /// Events live in their bucket, so that the events of one instant are
    /// read one after another from memory.
    queue: BTreeMap<i64, Bucket<S>>,
    queued: usize,
    /// Emptied buckets, reused for later instants (their allocations).
    spare_buckets: Vec<Bucket<S>>,
    /// Events scheduled so far.
    scheduled: u64,
    now_ms: i64,
    net_rng: Rng,
    fault_rng: Rng,
    site_rngs: Vec<Rng>,
    link_salt: u64,
    partition: Option<Partition>,
    faults_active: bool,
    calm_at_ms: Option<i64>,
    last_heal_ms: Option<i64>,
    trace: Trace,
    stats: NetStats,
    outbox: Vec<(SiteId, S::Msg)>,
    started: bool,
}

impl<S: Site> std::fmt::Debug for Sim<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.config.seed)
            .field("sites", &self.sites.len())
            .field("now_ms", &self.now_ms)
            .finish_non_exhaustive()
    }
}

impl<S: Site> Sim<S> {
    /// A simulation of `sites` (one per [`SimConfig::sites`]); nothing runs
    /// before the first [`Sim::step_until`].
    pub fn new(config: SimConfig, sites: Vec<S>) -> Sim<S> {
        assert_eq!(config.sites, sites.len(), "one site per configured site");
        let seed = config.seed;
        let mut clock_rng = Rng::derive(seed, 1);
        let runtime = (0..sites.len())
            .map(|_| {
                let clock = match &config.faults.skew {
                    Some(skew) => SiteClock {
                        offset_ms: clock_rng.between(-skew.offset_max_ms, skew.offset_max_ms),
                        drift_ppm: clock_rng
                            .between(-skew.drift_max_ppm, skew.drift_max_ppm)
                            .clamp(-crate::clock::DRIFT_PPM_MAX, crate::clock::DRIFT_PPM_MAX),
                        epoch_ms: config.start_ms,
                    },
                    None => SiteClock::exact(config.start_ms),
                };
                SiteRuntime {
                    up: true,
                    incarnation: 0,
                    clock,
                    timer_at: None,
                    timer_generation: 0,
                    wake_converted: None,
                    uplink_free_us: 0,
                    traffic: SiteTraffic::default(),
                }
            })
            .collect();
        let site_rngs = (0..sites.len())
            .map(|i| Rng::derive(seed, 1000 + i as u64))
            .collect();
        let trace = Trace::new(config.trace_keep);
        Sim {
            now_ms: config.start_ms,
            net_rng: Rng::derive(seed, 2),
            fault_rng: Rng::derive(seed, 3),
            link_salt: mix64(seed ^ 0x11AC_11AC),
            config,
            sites,
            runtime,
            queue: BTreeMap::new(),
            queued: 0,
            spare_buckets: Vec::new(),
            scheduled: 0,
            site_rngs,
            partition: None,
            faults_active: true,
            calm_at_ms: None,
            last_heal_ms: None,
            trace,
            stats: NetStats::default(),
            outbox: Vec::new(),
            started: false,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// True time, unix ms.
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// Milliseconds since the start.
    pub fn elapsed_ms(&self) -> i64 {
        self.now_ms - self.config.start_ms
    }

    /// Site `site`'s clock reading now.
    pub fn local_now_ms(&self, site: SiteId) -> i64 {
        self.runtime[site].clock.local(self.now_ms)
    }

    /// Site `site`'s clock.
    pub fn clock(&self, site: SiteId) -> SiteClock {
        self.runtime[site].clock
    }

    /// The sites.
    pub fn sites(&self) -> &[S] {
        &self.sites
    }

    /// One site, mutably (for inspection by the harness).
    pub fn site_mut(&mut self, site: SiteId) -> &mut S {
        &mut self.sites[site]
    }

    /// Whether a site is up.
    pub fn is_up(&self, site: SiteId) -> bool {
        self.runtime[site].up
    }

    /// Whether `from` can reach `to` right now.
    pub fn can_reach(&self, from: SiteId, to: SiteId) -> bool {
        self.runtime[to].up && !self.partition.as_ref().is_some_and(|p| p.blocks(from, to))
    }

    /// Whether faults are still being injected.
    pub fn faults_active(&self) -> bool {
        self.faults_active
    }

    /// When faults stopped for good, true time.
    pub fn calm_at_ms(&self) -> Option<i64> {
        self.calm_at_ms
    }

    /// When the last partition healed or the last site restarted, true time.
    pub fn last_heal_ms(&self) -> Option<i64> {
        self.last_heal_ms
    }

    /// The trace.
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// Network counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// A site's traffic counters.
    pub fn traffic(&self, site: SiteId) -> SiteTraffic {
        self.runtime[site].traffic
    }

    /// Queues an input for `site` at true time `at_ms` (not before now).
    /// An input for a site that is down then is dropped.
    pub fn schedule_input(
        &mut self,
        at_ms: i64,
        site: SiteId,
        label: &'static str,
        input: S::Input,
    ) {
        assert!(site < self.sites.len(), "no site {site}");
        let at_ms = at_ms.max(self.now_ms);
        self.push(at_ms, Event::Input { site, input, label });
    }

    /// Records a line of the harness (an invariant check, a measurement) in
    /// the trace, so that it shows in failure reports and the hash.
    pub fn note(&mut self, site: Option<SiteId>, label: &'static str, fingerprint: u64) {
        self.trace.record(TraceEvent {
            at_ms: self.now_ms - self.config.start_ms,
            kind: TraceKind::Input,
            site,
            peer: None,
            label,
            len: 0,
            fingerprint,
        });
    }

    /// Runs the next event due at or before `until_ms` (true time) and says
    /// what it was; `None` once nothing is left before `until_ms` (the clock
    /// then stands at `until_ms`).
    pub fn step_until(&mut self, until_ms: i64) -> Option<Stepped> {
        if !self.started {
            self.start();
        }
        loop {
            let first = self.queue.first_entry();
            let Some(mut bucket) = first.filter(|bucket| *bucket.key() <= until_ms) else {
                self.now_ms = self.now_ms.max(until_ms);
                return None;
            };
            let at_ms = *bucket.key();
            let event = bucket
                .get_mut()
                .pop_front()
                .expect("buckets in the queue are never empty");
            if bucket.get().is_empty() {
                let (_, emptied) = bucket.remove_entry();
                if self.spare_buckets.len() < SPARE_BUCKETS_MAX
                    && emptied.capacity() <= SPARE_BUCKET_EVENTS_MAX
                {
                    self.spare_buckets.push(emptied);
                }
            }
            self.queued -= 1;
            assert!(at_ms >= self.now_ms, "events never run in the past");
            self.now_ms = at_ms;
            if let Some(stepped) = self.run(event) {
                self.stats.events += 1;
                return Some(stepped);
            }
        }
    }

    /// Runs every event up to `until_ms`.
    pub fn run_until(&mut self, until_ms: i64) {
        while self.step_until(until_ms).is_some() {}
    }

    fn start(&mut self) {
        self.started = true;
        for site in 0..self.sites.len() {
            self.call(site, |s, ctx| s.start(ctx));
        }
        let faults = self.config.faults.clone();
        if let Some(partitions) = &faults.partitions {
            let at = self.now_ms + self.fault_rng.exponential_ms(partitions.every_ms);
            self.push(at, Event::PartitionStart);
        }
        if let Some(crashes) = &faults.crashes {
            let at = self.now_ms + self.fault_rng.exponential_ms(crashes.every_ms);
            self.push(at, Event::Crash);
        }
        if let Some(stop) = faults.stop_after_ms {
            self.push(self.config.start_ms + stop, Event::Calm);
        }
    }

    fn push(&mut self, at_ms: i64, event: Event<S::Msg, S::Input>) {
        assert!(
            self.queued < QUEUE_MAX,
            "event queue overflow: a message storm"
        );
        self.scheduled += 1;
        let spare_buckets = &mut self.spare_buckets;
        self.queue
            .entry(at_ms)
            .or_insert_with(|| spare_buckets.pop().unwrap_or_default())
            .push_back(event);
        self.queued += 1;
    }

    fn record(
        &mut self,
        kind: TraceKind,
        site: Option<SiteId>,
        peer: Option<SiteId>,
        label: &'static str,
        len: usize,
        fingerprint: u64,
    ) {
        self.trace.record(TraceEvent {
            at_ms: self.now_ms - self.config.start_ms,
            kind,
            site,
            peer,
            label,
            len,
            fingerprint,
        });
    }

    /// Runs one event; `None` for events that turned out to be no-ops
    /// (stale timers).
    fn run(&mut self, event: Event<S::Msg, S::Input>) -> Option<Stepped> {
        let at_ms = self.now_ms;
        let stepped = move |kind, site| Stepped { at_ms, site, kind };
        match event {
            Event::Deliver {
                from,
                to,
                incarnation,
                msg,
            } => {
                let (len, label, fp) = (msg.wire_len(), msg.kind(), msg.fingerprint());
                let runtime = &self.runtime[to];
                if !runtime.up || runtime.incarnation != incarnation {
                    self.stats.dest_down += 1;
                    self.record(TraceKind::DestDown, Some(to), Some(from), label, len, fp);
                    return Some(stepped(TraceKind::DestDown, None));
                }
                if self.partition.as_ref().is_some_and(|p| p.blocks(from, to)) {
                    self.stats.partitioned += 1;
                    self.record(TraceKind::Partitioned, Some(to), Some(from), label, len, fp);
                    return Some(stepped(TraceKind::Partitioned, None));
                }
                let traffic = &mut self.runtime[to].traffic;
                traffic.recv_msgs += 1;
                traffic.recv_bytes += len as u64;
                self.record(TraceKind::Deliver, Some(to), Some(from), label, len, fp);
                self.call(to, |s, ctx| s.handle_message(ctx, from, msg));
                Some(stepped(TraceKind::Deliver, Some(to)))
            }
            Event::Timer { site, generation } => {
                let runtime = &mut self.runtime[site];
                if !runtime.up || runtime.timer_generation != generation {
                    return None;
                }
                runtime.timer_at = None;
                self.record(TraceKind::Timer, Some(site), None, "", 0, 0);
                self.call(site, |s, ctx| s.handle_timeout(ctx));
                Some(stepped(TraceKind::Timer, Some(site)))
            }
            Event::Input { site, input, label } => {
                if !self.runtime[site].up {
                    self.record(TraceKind::DestDown, Some(site), None, label, 0, 0);
                    return Some(stepped(TraceKind::DestDown, None));
                }
                self.record(TraceKind::Input, Some(site), None, label, 0, 0);
                self.call(site, |s, ctx| s.handle_input(ctx, input));
                Some(stepped(TraceKind::Input, Some(site)))
            }
            Event::Crash => self.crash_one(),
            Event::Restart { site } => {
                if self.runtime[site].up {
                    return None;
                }
                self.restart(site);
                Some(stepped(TraceKind::Restart, Some(site)))
            }
            Event::PartitionStart => {
                if !self.faults_active {
                    return None;
                }
                self.start_partition();
                Some(stepped(TraceKind::PartitionStart, None))
            }
            Event::Heal => {
                // A heal without a partition (the calm came first) is a no-op.
                self.partition.take()?;
                self.last_heal_ms = Some(self.now_ms);
                self.record(TraceKind::Heal, None, None, "", 0, 0);
                if self.faults_active
                    && let Some(partitions) = self.config.faults.partitions.clone()
                {
                    let at = self.now_ms + self.fault_rng.exponential_ms(partitions.every_ms);
                    self.push(at, Event::PartitionStart);
                }
                Some(stepped(TraceKind::Heal, None))
            }
            Event::Calm => {
                self.faults_active = false;
                self.calm_at_ms = Some(self.now_ms);
                self.last_heal_ms = Some(self.now_ms);
                self.partition = None;
                self.record(TraceKind::Calm, None, None, "", 0, 0);
                for site in 0..self.sites.len() {
                    if !self.runtime[site].up {
                        self.restart(site);
                    }
                }
                Some(stepped(TraceKind::Calm, None))
            }
        }
    }

    /// Crashes `site` now (if up) for `down_ms`; it restarts then, or when
    /// the calm begins, whichever comes first. The harness's targeted
    /// faults (a worker site of a running cluster lost) use it.
    pub fn crash_site(&mut self, site: SiteId, down_ms: i64) -> bool {
        if !self.runtime[site].up {
            return false;
        }
        self.take_down(site, "site-loss");
        self.push(self.now_ms + down_ms.max(1), Event::Restart { site });
        true
    }

    /// Crashes `site` (up): its timer and volatile state are gone.
    fn take_down(&mut self, site: SiteId, label: &'static str) {
        let runtime = &mut self.runtime[site];
        runtime.up = false;
        runtime.timer_at = None;
        runtime.timer_generation += 1;
        self.stats.crashes += 1;
        self.record(TraceKind::Crash, Some(site), None, label, 0, 0);
        self.sites[site].crash();
    }

    fn crash_one(&mut self) -> Option<Stepped> {
        let crashes = self.config.faults.crashes.clone()?;
        if !self.faults_active {
            return None;
        }
        let next = self.now_ms + self.fault_rng.exponential_ms(crashes.every_ms);
        self.push(next, Event::Crash);
        let down = self.runtime.iter().filter(|r| !r.up).count();
        let up: Vec<SiteId> = (0..self.sites.len())
            .filter(|&s| self.runtime[s].up)
            .collect();
        if down >= crashes.down_max.max(1) || up.is_empty() {
            return None;
        }
        let site = up[self.fault_rng.index(up.len())];
        self.take_down(site, "");
        let downtime = self.fault_rng.between(
            crashes.down_min_ms,
            crashes.down_max_ms.max(crashes.down_min_ms),
        );
        self.push(self.now_ms + downtime, Event::Restart { site });
        Some(Stepped {
            at_ms: self.now_ms,
            site: Some(site),
            kind: TraceKind::Crash,
        })
    }

    fn restart(&mut self, site: SiteId) {
        let runtime = &mut self.runtime[site];
        runtime.up = true;
        runtime.incarnation += 1;
        runtime.uplink_free_us = 0;
        self.last_heal_ms = Some(self.now_ms);
        self.record(TraceKind::Restart, Some(site), None, "", 0, 0);
        self.call(site, |s, ctx| s.start(ctx));
    }

    fn start_partition(&mut self) {
        let Some(partitions) = self.config.faults.partitions.clone() else {
            return;
        };
        if partitions.kinds.is_empty() || self.sites.len() < 2 {
            return;
        }
        let kind = partitions.kinds[self.fault_rng.index(partitions.kinds.len())];
        let n = self.sites.len();
        let mut order: Vec<SiteId> = (0..n).collect();
        self.fault_rng.shuffle(&mut order);
        let mut side = vec![false; n];
        for &site in &order[..n / 2] {
            side[site] = true;
        }
        let isolated = (kind == PartitionKind::Isolate).then(|| order[0]);
        self.partition = Some(Partition {
            kind,
            side,
            isolated,
        });
        self.stats.partitions += 1;
        let label = match kind {
            PartitionKind::Halves => "halves",
            PartitionKind::Isolate => "isolate",
            PartitionKind::Asymmetric => "asymmetric",
        };
        self.record(TraceKind::PartitionStart, isolated, None, label, 0, 0);
        let length = self.fault_rng.between(
            partitions.length_min_ms,
            partitions.length_max_ms.max(partitions.length_min_ms),
        );
        self.push(self.now_ms + length, Event::Heal);
    }

    /// Runs site code, then sends what it queued and re-arms its timer.
    fn call(&mut self, site: SiteId, f: impl FnOnce(&mut S, &mut Ctx<'_, S::Msg>)) {
        let mut outbox = std::mem::take(&mut self.outbox);
        {
            let mut ctx = Ctx {
                site,
                now_ms: self.runtime[site].clock.local(self.now_ms),
                true_ms: self.now_ms,
                outbox: &mut outbox,
                rng: &mut self.site_rngs[site],
            };
            f(&mut self.sites[site], &mut ctx);
        }
        for (to, msg) in outbox.drain(..) {
            self.transmit(site, to, msg);
        }
        self.outbox = outbox;
        self.arm_timer(site);
    }

    fn arm_timer(&mut self, site: SiteId) {
        let Some(local_at) = self.sites[site].poll_timeout() else {
            return;
        };
        let runtime = &mut self.runtime[site];
        let true_at = match runtime.wake_converted {
            Some((local, true_at)) if local == local_at => true_at,
            _ => {
                let true_at = runtime.clock.true_time_of(local_at);
                runtime.wake_converted = Some((local_at, true_at));
                true_at
            }
        };
        let at = true_at.max(self.now_ms);
        // An earlier pending timer stays: the site is woken then, finds
        // nothing due, and re-arms. Only an earlier instant needs a new event.
        if runtime.timer_at.is_some_and(|pending| pending <= at) {
            return;
        }
        runtime.timer_at = Some(at);
        runtime.timer_generation += 1;
        let generation = runtime.timer_generation;
        self.push(at, Event::Timer { site, generation });
    }

    /// Base one-way latency of the link between two sites (symmetric),
    /// derived from the seed without storing n² numbers.
    fn link_latency_ms(&self, a: SiteId, b: SiteId) -> i64 {
        let net = &self.config.net;
        let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
        let span = net.latency_max_ms.saturating_sub(net.latency_min_ms).max(0);
        let draw = mix64(self.link_salt ^ (lo << 32) ^ hi);
        let offset = if span == 0 {
            0
        } else {
            let span = span.unsigned_abs() + 1;
            i64::try_from(draw % span).expect("below an i64 span")
        };
        net.latency_min_ms + offset
    }

    fn transmit(&mut self, from: SiteId, to: SiteId, msg: S::Msg) {
        assert!(to < self.sites.len(), "message to unknown site {to}");
        let (len, label) = (msg.wire_len(), msg.kind());
        let traffic = &mut self.runtime[from].traffic;
        traffic.sent_msgs += 1;
        traffic.sent_bytes += len as u64;
        let entry = self.stats.by_kind.entry(label).or_default();
        entry.0 += 1;
        entry.1 += len as u64;
        let faults = &self.config.faults;
        let (loss, duplicate, reorder, reorder_max) = if self.faults_active {
            (
                faults.loss,
                faults.duplicate,
                faults.reorder,
                faults.reorder_delay_max_ms,
            )
        } else {
            (0.0, 0.0, 0.0, 0)
        };
        if self.partition.as_ref().is_some_and(|p| p.blocks(from, to)) {
            self.stats.partitioned += 1;
            let fp = msg.fingerprint();
            self.record(TraceKind::Partitioned, Some(to), Some(from), label, len, fp);
            return;
        }
        if self.net_rng.chance(loss) {
            self.stats.lost += 1;
            self.stats.faults_by_kind.entry(label).or_default().lost += 1;
            let fp = msg.fingerprint();
            self.record(TraceKind::Lost, Some(to), Some(from), label, len, fp);
            return;
        }
        // A capped uplink sends one message after another.
        let now_us = self.now_ms * 1000;
        let mut depart_us = now_us;
        if let Some(rate) = self.config.faults.uplink_bytes_per_s.filter(|r| *r > 0) {
            let runtime = &mut self.runtime[from];
            depart_us = runtime.uplink_free_us.max(now_us);
            let serialise_us = i64::try_from(len as u64 * 1_000_000 / rate).unwrap_or(i64::MAX / 4);
            runtime.uplink_free_us = depart_us + serialise_us;
            depart_us = runtime.uplink_free_us;
        }
        let depart_ms = (depart_us + 999) / 1000;
        let base = self.link_latency_ms(from, to);
        let jitter = self.config.net.jitter_ms.max(0);
        let mut delay = base + self.net_rng.between(0, jitter);
        if self.net_rng.chance(reorder) {
            self.stats.reordered += 1;
            self.stats
                .faults_by_kind
                .entry(label)
                .or_default()
                .reordered += 1;
            delay += self.net_rng.between(0, reorder_max.max(0));
        }
        let incarnation = self.runtime[to].incarnation;
        if self.net_rng.chance(duplicate) {
            self.stats.duplicated += 1;
            self.stats
                .faults_by_kind
                .entry(label)
                .or_default()
                .duplicated += 1;
            let fp = msg.fingerprint();
            self.record(TraceKind::Duplicated, Some(to), Some(from), label, len, fp);
            let again = base + self.net_rng.between(0, jitter + reorder_max.max(0));
            self.push(
                depart_ms + again,
                Event::Deliver {
                    from,
                    to,
                    incarnation,
                    msg: msg.clone(),
                },
            );
        }
        self.push(
            depart_ms + delay,
            Event::Deliver {
                from,
                to,
                incarnation,
                msg,
            },
        );
    }
}
