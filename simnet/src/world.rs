//! The harness: builds a federation of [`FedSite`]s on the simnet engine,
//! drives the workload, checks the invariants as the run goes and writes
//! the report.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use crate::{
    CrashFaults, Faults, PartitionFaults, PartitionKind, Rng, Sim, SimConfig, SiteId, SkewFaults,
    TraceKind,
};
use libp2p_identity::Keypair;
use serde::Serialize;
use vcfed_registry::RegistryConfig;
use vcfed_storage::{ClusterState, PartState, ReservationFilter, ReservationState, Usage};

use crate::checks::{self, Found, LifecycleChecks, LifecycleReport};
use crate::dataplane::DataPlane;
use crate::site::{
    CreateOutcome, Directory, FedSite, Input, Observation, PlantedBug, Presence, SiteSettings,
};
use vcfed_node_core::cluster::{ClusterConfig, ClusterRequest};

/// Unix ms at which every run starts (2023-11-14): a fixed instant keeps
/// runs reproducible.
pub const START_MS: i64 = 1_700_000_000_000;
/// How long after its lease a hold may still be `held` at a site that is
/// up (the hold-resolution invariant).
const HOLD_RESOLUTION_SLACK_MS: i64 = 2_000;
/// How long after its reserve deadline a cluster may still be `reserving`
/// at a master that is up (the reserve-deadline invariant): the master's
/// timer fires at the deadline, by its own clock.
const RESERVE_DEADLINE_SLACK_MS: i64 = 2_000;
const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
/// Violations recorded per run; the first one matters most.
const VIOLATIONS_MAX: usize = 20;
/// Trace lines printed with a violation.
const TRACE_LINES: usize = 40;
/// Versions remembered per site for the convergence check.
const VERSIONS_KEPT: usize = 16;
/// A change not seen everywhere after this long counts as not converged, ms.
const CHANGE_TRACK_MS: i64 = 120_000;

/// A fault that can be switched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Random message loss.
    Loss,
    /// Duplicated messages.
    Dup,
    /// Messages held back past later ones.
    Reorder,
    /// Partitions (halves, isolated site, asymmetric) and healing.
    Partition,
    /// Site crashes and restarts.
    Crash,
    /// Clock skew and drift.
    Skew,
    /// Capped uplinks.
    Bandwidth,
    /// Sites that join the federation during the run.
    Join,
    /// Sites that leave the federation for good.
    Leave,
    /// Gateways that go down for a while (the data plane only).
    Gateway,
    /// A worker site of a running cluster goes down for longer than the
    /// masters' grace period, and may come back (see `heal.rs`).
    SiteLoss,
}

impl Fault {
    /// Every fault.
    pub const ALL: [Fault; 11] = [
        Fault::Loss,
        Fault::Dup,
        Fault::Reorder,
        Fault::Partition,
        Fault::Crash,
        Fault::Skew,
        Fault::Bandwidth,
        Fault::Join,
        Fault::Leave,
        Fault::Gateway,
        Fault::SiteLoss,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Loss => "loss",
            Fault::Dup => "dup",
            Fault::Reorder => "reorder",
            Fault::Partition => "partition",
            Fault::Crash => "crash",
            Fault::Skew => "skew",
            Fault::Bandwidth => "bandwidth",
            Fault::Join => "join",
            Fault::Leave => "leave",
            Fault::Gateway => "gateway",
            Fault::SiteLoss => "site-loss",
        }
    }

    /// Parses a comma-separated list (`all` and `none` allowed).
    pub fn parse_list(text: &str) -> Result<BTreeSet<Fault>, String> {
        let mut faults = BTreeSet::new();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "all" => faults.extend(Fault::ALL),
                "none" => {}
                _ => {
                    let fault = Fault::ALL
                        .into_iter()
                        .find(|f| f.name() == word)
                        .ok_or_else(|| {
                            format!(
                                "unknown fault {word:?}: use loss, dup, reorder, partition, crash, skew, bandwidth, join, leave, gateway, site-loss, all or none"
                            )
                        })?;
                    faults.insert(fault);
                }
            }
        }
        Ok(faults)
    }

    /// The list as the command line writes it.
    pub fn list(faults: &BTreeSet<Fault>) -> String {
        if faults.is_empty() {
            return "none".to_owned();
        }
        faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Everything that defines a run (with the seed).
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Number of sites.
    pub sites: usize,
    /// Simulated time, ms.
    pub duration_ms: i64,
    /// Faults on.
    pub faults: BTreeSet<Fault>,
    /// Faults stop this long before the end, ms.
    pub calm_ms: i64,
    /// Cluster requests per site per simulated hour.
    pub requests_per_site_hour: f64,
    /// Share of accepted clusters deleted later.
    pub delete_share: f64,
    /// Most compute nodes one request asks for.
    pub nodes_max: u32,
    /// A window starts this long after its request at the earliest, ms.
    pub window_start_min_ms: i64,
    /// ... and at the latest, ms.
    pub window_start_max_ms: i64,
    /// Shortest window, ms.
    pub window_length_min_ms: i64,
    /// Longest window, ms.
    pub window_length_max_ms: i64,
    /// Node slots of the largest site (the smallest has 4).
    pub capacity_max: u32,
    /// Message loss probability (with `loss`).
    pub loss: f64,
    /// Duplication probability (with `dup`).
    pub dup: f64,
    /// Gossip mesh degree (gossipsub's D).
    pub mesh_degree: usize,
    /// Advert re-sign period, ms.
    pub advert_refresh_ms: i64,
    /// Advert TTL, ms.
    pub advert_ttl_ms: i64,
    /// Anti-entropy period, ms.
    pub anti_entropy_ms: i64,
    /// After the calm starts, every cluster must be settled within this, ms.
    pub settle_bound_ms: i64,
    /// After the calm starts, every view must be complete within this, ms.
    pub convergence_bound_ms: i64,
    /// Stop at the first violation.
    pub stop_at_first_violation: bool,
    /// A planted bug (tests).
    pub plant: Option<PlantedBug>,
}

impl Options {
    /// Defaults for `sites` sites: the production gossip timing up to 100
    /// sites, slower above (see docs/SIMNET.md, "Scaling the gossip").
    pub fn new(sites: usize) -> Options {
        let (refresh, ttl, anti_entropy) = gossip_timing(sites);
        Options {
            sites,
            duration_ms: 30 * MINUTE_MS,
            faults: [
                Fault::Loss,
                Fault::Dup,
                Fault::Partition,
                Fault::Crash,
                Fault::Skew,
            ]
            .into_iter()
            .collect(),
            calm_ms: 10 * MINUTE_MS,
            requests_per_site_hour: 6.0,
            delete_share: 0.3,
            nodes_max: 16,
            window_start_min_ms: MINUTE_MS,
            window_start_max_ms: 20 * MINUTE_MS,
            window_length_min_ms: 5 * MINUTE_MS,
            window_length_max_ms: HOUR_MS,
            capacity_max: 16,
            loss: 0.02,
            dup: 0.02,
            mesh_degree: 6,
            advert_refresh_ms: refresh,
            advert_ttl_ms: ttl,
            anti_entropy_ms: anti_entropy,
            settle_bound_ms: 5 * MINUTE_MS,
            // Sites that were down when an advert went out learn it only by
            // anti-entropy, an epidemic of about log2(n) rounds and more.
            convergence_bound_ms: (anti_entropy * 15).max(60_000),
            stop_at_first_violation: false,
            plant: None,
        }
    }

    /// The command line that replays this run with `seed`.
    pub fn replay_command(&self, seed: u64) -> String {
        let defaults = Options::new(self.sites);
        let mut command = format!(
            "vcfed simnet --sites {} --seed {seed} --duration {} --faults {}",
            self.sites,
            format_duration(self.duration_ms),
            Fault::list(&self.faults)
        );
        let mut flag = |name: &str, value: String, default: String| {
            if value != default {
                command.push_str(&format!(" --{name} {value}"));
            }
        };
        flag(
            "calm",
            format_duration(self.calm_ms),
            format_duration(defaults.calm_ms),
        );
        flag(
            "requests-per-site-hour",
            self.requests_per_site_hour.to_string(),
            defaults.requests_per_site_hour.to_string(),
        );
        flag("loss", self.loss.to_string(), defaults.loss.to_string());
        flag("dup", self.dup.to_string(), defaults.dup.to_string());
        flag(
            "mesh-degree",
            self.mesh_degree.to_string(),
            defaults.mesh_degree.to_string(),
        );
        flag(
            "advert-refresh",
            format_duration(self.advert_refresh_ms),
            format_duration(defaults.advert_refresh_ms),
        );
        flag(
            "anti-entropy",
            format_duration(self.anti_entropy_ms),
            format_duration(defaults.anti_entropy_ms),
        );
        flag(
            "window-start",
            format_range(self.window_start_min_ms, self.window_start_max_ms),
            format_range(defaults.window_start_min_ms, defaults.window_start_max_ms),
        );
        flag(
            "window-length",
            format_range(self.window_length_min_ms, self.window_length_max_ms),
            format_range(defaults.window_length_min_ms, defaults.window_length_max_ms),
        );
        flag(
            "nodes-max",
            self.nodes_max.to_string(),
            defaults.nodes_max.to_string(),
        );
        flag(
            "capacity-max",
            self.capacity_max.to_string(),
            defaults.capacity_max.to_string(),
        );
        if let Some(plant) = self.plant {
            command.push_str(&format!(" --plant-bug {}", plant.name()));
        }
        command
    }
}

/// Gossip timing by federation size: production's defaults (TTL 30 s,
/// refresh 10 s, anti-entropy 2 s) up to 100 sites; above, the periods grow
/// with the size so that the gossip per site stays bounded.
pub fn gossip_timing(sites: usize) -> (i64, i64, i64) {
    let sites = i64::try_from(sites).unwrap_or(i64::MAX);
    if sites <= 100 {
        return (10_000, 30_000, 2_000);
    }
    let refresh = sites.saturating_mul(600);
    (refresh, refresh * 3, sites.saturating_mul(20))
}

fn format_range(min_ms: i64, max_ms: i64) -> String {
    format!("{}..{}", format_duration(min_ms), format_duration(max_ms))
}

fn format_duration(ms: i64) -> String {
    if ms % HOUR_MS == 0 {
        format!("{}h", ms / HOUR_MS)
    } else if ms % MINUTE_MS == 0 {
        format!("{}m", ms / MINUTE_MS)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A broken invariant.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    /// Which invariant.
    pub invariant: &'static str,
    /// Simulated time since the start, ms.
    pub at_ms: i64,
    /// The site where it was seen.
    pub site: Option<SiteId>,
    /// What exactly.
    pub detail: String,
    /// The command that replays the run.
    pub replay: String,
    /// The last events before it.
    pub trace: Vec<String>,
}

/// Requests and how they ended.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestReport {
    /// Requests sent.
    pub sent: u64,
    /// Not answered: the site was down.
    pub site_down: u64,
    /// Accepted by the site (it became master).
    pub accepted: u64,
    /// Refused at once, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Accepted and reserved (and still so at the end, not started).
    pub reserved: u64,
    /// Accepted and starting at the master at the end.
    pub starting: u64,
    /// Accepted and running at the master at the end.
    pub running: u64,
    /// Accepted, then failed, by reason.
    pub failed: BTreeMap<String, u64>,
    /// Finished: deleted, or the window is over.
    pub finished: u64,
    /// Still reserving or stopping at the end.
    pub unsettled: u64,
    /// Deletes sent.
    pub deletes: u64,
}

/// Gossip convergence.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConvergenceReport {
    /// Advert changes published while faults were on / after.
    pub changes_faulty: u64,
    /// Changes published in the calm.
    pub changes_calm: u64,
    /// Changes seen by every site that was up when it was published.
    pub converged: u64,
    /// Changes some site never saw within two minutes (superseded ones count
    /// as seen once a newer version is).
    pub not_converged: u64,
    /// Time until the last site saw a change, calm phase, ms: p50, p90, p99, max.
    pub calm_ms: Percentiles,
    /// Same while faults were on.
    pub faulty_ms: Percentiles,
    /// Gossip hops to the last site (calm phase).
    pub calm_hops: Percentiles,
    /// From the start of the calm until every site knew every site's
    /// current advert, ms.
    pub full_view_after_calm_ms: Option<i64>,
}

/// Percentiles of a sample.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: i64,
    /// 90th.
    pub p90: i64,
    /// 99th.
    pub p99: i64,
    /// Largest.
    pub max: i64,
}

impl Percentiles {
    fn of(mut samples: Vec<i64>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: usize| samples[(samples.len() - 1) * q / 100];
        Percentiles {
            count: samples.len() as u64,
            p50: at(50),
            p90: at(90),
            p99: at(99),
            max: at(100),
        }
    }
}

/// Traffic.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrafficReport {
    /// Messages sent per site per simulated second (mean over sites).
    pub msgs_per_site_s: f64,
    /// Bytes sent per site per simulated second (mean).
    pub bytes_per_site_s: f64,
    /// The busiest site's bytes per second.
    pub bytes_per_site_s_max: f64,
    /// Gossip (publish + forward) bytes received per site per second.
    pub gossip_bytes_per_site_s: f64,
    /// Anti-entropy bytes (both directions) per site per second.
    pub anti_entropy_bytes_per_site_s: f64,
    /// Cluster protocol bytes per site per second.
    pub cluster_bytes_per_site_s: f64,
    /// Per kind: messages and bytes.
    pub by_kind: BTreeMap<String, (u64, u64)>,
    /// Per kind: messages lost, duplicated and reordered (held back).
    pub faults_by_kind: BTreeMap<String, [u64; 3]>,
    /// Gossip copies dropped by the seen cache.
    pub gossip_duplicates: u64,
    /// Network faults: lost, duplicated, reordered, partitioned, to a down site.
    pub lost: u64,
    /// Duplicated.
    pub duplicated: u64,
    /// Reordered.
    pub reordered: u64,
    /// Dropped by partitions.
    pub partitioned: u64,
    /// Dropped at a down or restarted site.
    pub dest_down: u64,
    /// Crashes.
    pub crashes: u64,
    /// Partitions.
    pub partitions: u64,
}

/// Sites joining and leaving, gateways failing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MembershipReport {
    /// Sites that joined during the run.
    pub joined: u64,
    /// Sites that left for good.
    pub left: u64,
    /// Gateway outages.
    pub gateway_outages: u64,
}

/// The report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Sites.
    pub sites: usize,
    /// Simulated time, ms.
    pub duration_ms: i64,
    /// Faults on.
    pub faults: String,
    /// Gossip timing used: refresh, TTL, anti-entropy (ms) and mesh degree.
    pub gossip: (i64, i64, i64, usize),
    /// Requests.
    pub requests: RequestReport,
    /// Broken invariants.
    pub violations: Vec<Violation>,
    /// Gossip convergence.
    pub convergence: ConvergenceReport,
    /// Traffic.
    pub traffic: TrafficReport,
    /// The cluster lifecycle.
    pub lifecycle: LifecycleReport,
    /// Membership and data-plane faults.
    pub membership: MembershipReport,
    /// Worker sites lost (`site-loss`) and the clusters healed.
    pub heal: HealReport,
    /// Hash of the whole trace (hex).
    pub trace_hash: String,
    /// Events processed.
    pub events: u64,
    /// Wall time, ms.
    pub wall_ms: u64,
    /// Simulated seconds per wall second.
    pub speedup: f64,
    /// The command that replays this run.
    pub replay: String,
}

/// Progress of a run, for the caller to show.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Simulated ms done.
    pub simulated_ms: i64,
    /// Simulated ms in all.
    pub duration_ms: i64,
    /// Requests sent so far.
    pub requests: u64,
    /// Violations so far.
    pub violations: usize,
}

#[derive(Debug)]
struct Change {
    published_at: i64,
    calm: bool,
    missing: Vec<u64>,
    missing_count: usize,
    hops_max: u16,
}

#[derive(Debug, Clone)]
struct Tracked {
    master: SiteId,
    /// When the request is sent, true time.
    sent_at: i64,
    outcome: Option<CreateOutcome>,
    verified_reserved: bool,
    /// Whether a violation of the reserve deadline was reported for it.
    overdue_reported: bool,
}

/// One run in progress.
struct World {
    options: Options,
    seed: u64,
    sim: Sim<FedSite>,
    directory: Arc<Directory>,
    /// known[i * n + j]: the version of j's advert in i's view.
    known: Vec<u64>,
    /// Versions each site published, with when (true time), newest last.
    published: Vec<Vec<(u64, i64)>>,
    changes: BTreeMap<(SiteId, u64), Change>,
    latencies_calm: Vec<i64>,
    latencies_faulty: Vec<i64>,
    hops_calm: Vec<i64>,
    not_converged: u64,
    changes_calm: u64,
    changes_faulty: u64,
    full_view_after_calm_ms: Option<i64>,
    convergence_violated: bool,
    clusters: BTreeMap<String, Tracked>,
    in_flight: Vec<BTreeSet<String>>,
    requests: RequestReport,
    violations: Vec<Violation>,
    dataplane: Arc<DataPlane>,
    lifecycle: LifecycleChecks,
    /// When each site that joins late should join, true ms (removed once
    /// it did).
    joins: BTreeMap<SiteId, i64>,
    /// When each leaving site should leave, true ms (removed once it did).
    leaves: BTreeMap<SiteId, i64>,
    /// Gateway outages: (down at, up at, site), true ms, by start.
    outages: Vec<(i64, i64, SiteId)>,
    next_outage: usize,
    /// Gateways down, with when they come back.
    gateways_down: BTreeMap<SiteId, i64>,
    /// Bootstrap choices.
    membership_rng: Rng,
    /// The cluster cores' reserve deadline, ms.
    reserve_deadline_ms: i64,
    membership: MembershipReport,
    /// The `site-loss` fault and what came of it.
    losses: heal::Losses,
    /// Clusters whose fence violation was reported.
    fence_reported: BTreeSet<String>,
}

#[path = "heal.rs"]
mod heal;
pub use heal::{HEAL_BOUND_MS, HealReport, heal_for};

/// Runs one simulation and reports.
pub fn run(options: &Options, seed: u64, progress: &mut dyn FnMut(Progress)) -> Report {
    let wall = Instant::now();
    let mut world = World::new(options.clone(), seed);
    world.schedule_workload();
    let end = START_MS + options.duration_ms;
    let check_every = 1_000;
    let progress_every = (options.duration_ms / 20).max(MINUTE_MS);
    let mut next_check = START_MS + check_every;
    let mut next_progress = START_MS + progress_every;
    loop {
        let until = next_check.min(end);
        match world.sim.step_until(until) {
            Some(stepped) => world.after_step(stepped.site, stepped.kind),
            None => {
                let now = world.sim.now_ms();
                world.periodic(now);
                next_check += check_every;
                if now >= next_progress {
                    next_progress += progress_every;
                    progress(Progress {
                        simulated_ms: now - START_MS,
                        duration_ms: options.duration_ms,
                        requests: world.requests.sent,
                        violations: world.violations.len(),
                    });
                }
                if now >= end {
                    break;
                }
            }
        }
        if options.stop_at_first_violation && !world.violations.is_empty() {
            break;
        }
    }
    world.close_losses();
    if world.violations.is_empty() || !options.stop_at_first_violation {
        world.final_checks();
        let mut found = Vec::new();
        world.lifecycle.final_checks(&world.sim, &mut found);
        world.record_found(found);
    }
    world.report(wall.elapsed())
}

impl World {
    fn new(options: Options, seed: u64) -> World {
        let n = options.sites;
        let mut setup = Rng::derive(seed, 7);
        let mut keys = Vec::with_capacity(n);
        for _ in 0..n {
            let mut secret = [0u8; 32];
            for chunk in secret.chunks_mut(8) {
                chunk.copy_from_slice(&setup.next_u64().to_le_bytes());
            }
            let keypair = Keypair::ed25519_from_bytes(secret)
                .expect("any 32 bytes are an Ed25519 secret key");
            keys.push(keypair);
        }
        let peers: Vec<_> = keys.iter().map(|k| k.public().to_peer_id()).collect();
        let index = peers.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let directory = Arc::new(Directory { peers, index });
        let mut membership_rng = Rng::derive(seed, 9);
        let (joins, leaves) = membership_schedule(&options, &mut membership_rng);
        let members: Vec<bool> = (0..n).map(|site| !joins.contains_key(&site)).collect();
        let mesh = build_mesh(&members, options.mesh_degree, &mut setup);
        let dataplane = Arc::new(DataPlane::new(n));
        let settings = Arc::new(SiteSettings {
            registry: RegistryConfig {
                advert_ttl_ms: u32::try_from(options.advert_ttl_ms).unwrap_or(u32::MAX),
                refresh_ms: options.advert_refresh_ms,
                anti_entropy_ms: options.anti_entropy_ms,
                // As the federation shell: suspect for one refresh.
                suspect_ms: options.advert_refresh_ms,
                message_max_bytes: vcfed_node_core::federation::MESSAGE_MAX_BYTES,
                ..RegistryConfig::default()
            },
            cluster: ClusterConfig::default(),
            // Holds are swept as their leases run out; this bounds the
            // event log, as the agent's sweep does every second.
            sweep_ms: 60_000,
            plant: options.plant,
            verifier: Some(Arc::new(super::verify::CachingVerifier::default())),
            mesh_min: (options.mesh_degree / 2).max(1),
        });
        let sites: Vec<FedSite> = keys
            .into_iter()
            .zip(mesh)
            .enumerate()
            .map(|(i, (keypair, mesh))| {
                let capacity =
                    u32::try_from(setup.between(4, i64::from(options.capacity_max.max(4))))
                        .expect("a small positive number");
                // A pool that every site's committed nodes fit in (each
                // cluster takes at least one slot), with room for a run
                // that is still being torn down.
                let first = u16::try_from(setup.between(2, 3000)).expect("below 4094");
                let size = u16::try_from(capacity + 4).expect("a small number");
                FedSite::new(
                    i,
                    keypair,
                    capacity,
                    settings.clone(),
                    directory.clone(),
                    mesh,
                    members[i],
                    (first, first + size - 1),
                    dataplane.clone(),
                    START_MS,
                )
                .expect("an in-memory ledger opens")
            })
            .collect();
        let mut config = SimConfig::new(seed, n, START_MS);
        config.trace_keep = TRACE_LINES;
        config.faults = faults_for(&options);
        let outages = gateway_schedule(&options, &mut Rng::derive(seed, 10));
        World {
            reserve_deadline_ms: settings.cluster.reserve_deadline_ms,
            lifecycle: LifecycleChecks::new(directory.clone()),
            dataplane,
            joins,
            leaves,
            outages,
            next_outage: 0,
            gateways_down: BTreeMap::new(),
            membership_rng,
            membership: MembershipReport::default(),
            losses: heal::Losses::new(Rng::derive(seed, 11), START_MS),
            fence_reported: BTreeSet::new(),
            seed,
            sim: Sim::new(config, sites),
            directory,
            known: vec![0; n * n],
            published: vec![Vec::new(); n],
            changes: BTreeMap::new(),
            latencies_calm: Vec::new(),
            latencies_faulty: Vec::new(),
            hops_calm: Vec::new(),
            not_converged: 0,
            changes_calm: 0,
            changes_faulty: 0,
            full_view_after_calm_ms: None,
            convergence_violated: false,
            clusters: BTreeMap::new(),
            in_flight: vec![BTreeSet::new(); n],
            requests: RequestReport::default(),
            violations: Vec::new(),
            options,
        }
    }

    /// Cluster requests as a Poisson process over the run, before the calm
    /// ends (so that the last ones can settle), and some deletes.
    fn schedule_workload(&mut self) {
        let options = &self.options;
        let mut rng = Rng::derive(self.seed, 8);
        let rate_per_ms = options.requests_per_site_hour * options.sites as f64 / HOUR_MS as f64;
        if rate_per_ms <= 0.0 {
            return;
        }
        #[allow(clippy::cast_possible_truncation)] // a positive mean far below i64::MAX
        let mean_ms = ((1.0 / rate_per_ms).round() as i64).max(1);
        let last_ms =
            START_MS + options.duration_ms - options.settle_bound_ms.max(options.calm_ms / 2);
        let mut at = START_MS + 30_000;
        let mut schedule = Vec::new();
        for number in 0u64.. {
            at += rng.exponential_ms(mean_ms);
            if at >= last_ms {
                break;
            }
            let site = rng.index(options.sites);
            let id = format!("c{number}-s{site}");
            let nodes = u32::try_from(rng.between(1, i64::from(options.nodes_max.max(1))))
                .expect("a small positive number");
            let start_in_ms = rng.between(
                options.window_start_min_ms,
                options.window_start_max_ms.max(options.window_start_min_ms),
            );
            let length_ms = rng.between(
                options.window_length_min_ms,
                options
                    .window_length_max_ms
                    .max(options.window_length_min_ms),
            );
            let delete_at = rng
                .chance(options.delete_share)
                .then(|| at + rng.between(5_000, 20 * MINUTE_MS))
                .filter(|&t| t < last_ms);
            schedule.push((at, site, id, nodes, start_in_ms, length_ms, delete_at));
        }
        for (at, site, id, nodes, start_in_ms, length_ms, delete_at) in schedule {
            self.requests.sent += 1;
            self.lifecycle.track(&id, site, nodes);
            self.clusters.insert(
                id.clone(),
                Tracked {
                    master: site,
                    sent_at: at,
                    outcome: None,
                    verified_reserved: false,
                    overdue_reported: false,
                },
            );
            let create = Input::Create {
                id: id.clone(),
                nodes,
                start_in_ms,
                length_ms,
                heal: heal::heal_for(&id),
            };
            self.sim.schedule_input(at, site, "create", create);
            if let Some(delete_at) = delete_at {
                self.requests.deletes += 1;
                self.sim
                    .schedule_input(delete_at, site, "delete", Input::Delete { id });
            }
        }
    }

    fn violation(&mut self, invariant: &'static str, site: Option<SiteId>, detail: String) {
        if self.violations.len() >= VIOLATIONS_MAX {
            return;
        }
        self.sim.note(site, "VIOLATION", 0);
        let trace = self.sim.trace().recent().map(ToString::to_string).collect();
        self.violations.push(Violation {
            invariant,
            at_ms: self.sim.elapsed_ms(),
            site,
            detail,
            replay: self.options.replay_command(self.seed),
            trace,
        });
    }

    fn after_step(&mut self, site: Option<SiteId>, kind: TraceKind) {
        // The data plane follows the engine's partitions.
        match (kind, site) {
            (TraceKind::PartitionStart | TraceKind::Heal | TraceKind::Calm, _) => {
                let sim = &self.sim;
                self.dataplane.set_reach_all(|a, b| sim.can_reach(a, b));
            }
            (TraceKind::Restart, Some(site)) => {
                let sim = &self.sim;
                self.dataplane
                    .set_reach_of(site, |a, b| sim.can_reach(a, b));
            }
            _ => {}
        }
        let Some(site) = site else {
            return;
        };
        if kind == TraceKind::Crash {
            self.forget_view(site);
        }
        if !self.sim.sites()[site].has_observations() {
            return;
        }
        let observations = self.sim.site_mut(site).take_observations();
        let mut touched = false;
        let mut ticks = Vec::new();
        for observation in observations {
            match observation {
                Observation::Published { version } => self.published_version(site, version),
                Observation::Learned {
                    site: of,
                    version,
                    hops,
                } => self.learned(site, of, version, hops),
                Observation::Created { id, outcome } => self.created(site, id, outcome),
                Observation::LedgerTouched => touched = true,
                Observation::CoreError(e) => self.violation("core error", Some(site), e),
                Observation::RecordsTouched => self.lifecycle.touched(site),
                Observation::NodesReported { cluster } => self.lifecycle.nodes_touched(cluster),
                Observation::Runner(tick) => {
                    touched = true;
                    self.lifecycle.touched(site);
                    ticks.push(tick);
                }
                Observation::Joined => {
                    self.membership.joined += 1;
                    self.joins.remove(&site);
                }
                Observation::Left => {
                    self.membership.left += 1;
                    self.leaves.remove(&site);
                    self.forget_view(site);
                }
            }
        }
        if touched {
            self.check_capacity(site);
            self.check_mastered(site);
        }
        for tick in ticks {
            let mut found = Vec::new();
            self.lifecycle
                .after_tick(&self.sim, site, &tick, &mut found);
            self.record_found(found);
        }
    }

    fn record_found(&mut self, found: Vec<Found>) {
        for found in found {
            self.violation(found.invariant, found.site, found.detail);
        }
    }

    /// Sites join and leave when their time comes (retried every second
    /// while the site is down); membership changes stop with the faults.
    fn membership_events(&mut self, now: i64) {
        if !self.sim.faults_active() {
            self.joins.clear();
            self.leaves.clear();
            return;
        }
        let n = self.options.sites;
        let due: Vec<SiteId> = self
            .joins
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(site, _)| *site)
            .collect();
        for site in due {
            // The operator gives the address of a member that stays.
            let members: Vec<SiteId> = (0..n)
                .filter(|&s| s != site && checks::alive(&self.sim, s))
                .filter(|s| !self.leaves.contains_key(s))
                .collect();
            if !self.sim.is_up(site) || members.is_empty() {
                continue;
            }
            let bootstrap = members[self.membership_rng.index(members.len())];
            self.sim
                .schedule_input(now, site, "join", Input::Join { bootstrap });
            self.joins.insert(site, now + 1_000);
        }
        let due: Vec<SiteId> = self
            .leaves
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(site, _)| *site)
            .collect();
        for site in due {
            let members = (0..n)
                .filter(|&s| self.sim.sites()[s].presence() == Presence::Member)
                .count();
            if !self.sim.is_up(site) || members <= 2 {
                continue;
            }
            self.sim.schedule_input(now, site, "leave", Input::Leave);
            self.leaves.insert(site, now + 1_000);
        }
    }

    /// Gateways go down and come back as scheduled; all are up once the
    /// faults stop.
    fn gateway_events(&mut self, now: i64) {
        let back: Vec<SiteId> = self
            .gateways_down
            .iter()
            .filter(|(_, up_at)| **up_at <= now || !self.sim.faults_active())
            .map(|(site, _)| *site)
            .collect();
        for site in back {
            self.gateways_down.remove(&site);
            self.dataplane.set_gateway_up(site, true);
            self.sim.note(Some(site), "gateway-up", 0);
        }
        let down_max = (self.options.sites / 10).max(1);
        while let Some(&(down_at, up_at, site)) = self.outages.get(self.next_outage) {
            if down_at > now || !self.sim.faults_active() {
                break;
            }
            self.next_outage += 1;
            if self.gateways_down.contains_key(&site) || self.gateways_down.len() >= down_max {
                continue;
            }
            self.gateways_down.insert(site, up_at);
            self.dataplane.set_gateway_up(site, false);
            self.membership.gateway_outages += 1;
            self.sim.note(Some(site), "gateway-down", 0);
        }
    }

    fn created(&mut self, site: SiteId, id: String, outcome: CreateOutcome) {
        match &outcome {
            CreateOutcome::Accepted => {
                self.requests.accepted += 1;
                self.in_flight[site].insert(id.clone());
            }
            CreateOutcome::Rejected(kind) => {
                *self
                    .requests
                    .rejected
                    .entry((*kind).to_owned())
                    .or_default() += 1;
            }
        }
        if let Some(tracked) = self.clusters.get_mut(&id) {
            tracked.outcome = Some(outcome);
        }
    }

    fn forget_view(&mut self, site: SiteId) {
        let n = self.options.sites;
        self.known[site * n..(site + 1) * n].fill(0);
        let word = site / 64;
        let bit = 1u64 << (site % 64);
        let mut done = Vec::new();
        for (key, change) in &mut self.changes {
            if change.missing[word] & bit != 0 {
                change.missing[word] &= !bit;
                change.missing_count -= 1;
                if change.missing_count == 0 {
                    done.push(*key);
                }
            }
        }
        for key in done {
            self.complete_change(key);
        }
    }

    fn published_version(&mut self, site: SiteId, version: u64) {
        let now = self.sim.now_ms();
        let versions = &mut self.published[site];
        versions.push((version, now));
        if versions.len() > VERSIONS_KEPT {
            versions.remove(0);
        }
        let n = self.options.sites;
        let mut missing = vec![0u64; n.div_ceil(64)];
        let mut missing_count = 0;
        for other in 0..n {
            if other != site
                && checks::alive(&self.sim, other)
                && self.known[other * n + site] < version
            {
                missing[other / 64] |= 1 << (other % 64);
                missing_count += 1;
            }
        }
        let calm = !self.sim.faults_active();
        if calm {
            self.changes_calm += 1;
        } else {
            self.changes_faulty += 1;
        }
        if missing_count == 0 {
            return;
        }
        self.changes.insert(
            (site, version),
            Change {
                published_at: now,
                calm,
                missing,
                missing_count,
                hops_max: 0,
            },
        );
    }

    fn learned(&mut self, site: SiteId, of: SiteId, version: u64, hops: Option<u16>) {
        let n = self.options.sites;
        let previous = self.known[site * n + of];
        if version <= previous {
            return;
        }
        self.known[site * n + of] = version;
        let word = site / 64;
        let bit = 1u64 << (site % 64);
        let mut done = Vec::new();
        for (key, change) in self.changes.range_mut((of, previous + 1)..=(of, version)) {
            if change.missing[word] & bit != 0 {
                change.missing[word] &= !bit;
                change.missing_count -= 1;
                if let Some(hops) = hops {
                    change.hops_max = change.hops_max.max(hops);
                }
                if change.missing_count == 0 {
                    done.push(*key);
                }
            }
        }
        for key in done {
            self.complete_change(key);
        }
    }

    fn complete_change(&mut self, key: (SiteId, u64)) {
        let Some(change) = self.changes.remove(&key) else {
            return;
        };
        let latency = self.sim.now_ms() - change.published_at;
        if change.calm {
            self.latencies_calm.push(latency);
            self.hops_calm.push(i64::from(change.hops_max));
        } else {
            self.latencies_faulty.push(latency);
        }
    }

    /// No instant of any window has more nodes held and committed than the
    /// site has.
    fn check_capacity(&mut self, site: SiteId) {
        let now = self.sim.local_now_ms(site);
        let fed_site = &self.sim.sites()[site];
        let capacity = u64::from(fed_site.capacity());
        let active = match fed_site
            .ledger()
            .reservations(ReservationFilter::Active, now)
        {
            Ok(active) => active,
            Err(e) => {
                self.violation(
                    "core error",
                    Some(site),
                    format!("reading reservations: {e}"),
                );
                return;
            }
        };
        let usages: Vec<Usage> = active
            .iter()
            .map(|r| Usage {
                window: r.window,
                nodes: r.nodes,
            })
            .collect();
        for reservation in &active {
            let peak = vcfed_storage::peak_usage(&usages, reservation.window);
            if peak > capacity {
                let detail = format!(
                    "{} holds and commits {peak} nodes of {capacity} during {}..{} (reservation {})",
                    fed_site.name(),
                    reservation.window.start_ms - START_MS,
                    reservation.window.end_ms - START_MS,
                    reservation.key
                );
                self.violation("capacity", Some(site), detail);
                return;
            }
        }
    }

    /// Clusters mastered here that reached `reserved` have exactly N nodes
    /// committed across their sites, the frontend at the master.
    fn check_mastered(&mut self, site: SiteId) {
        let ids: Vec<String> = self.in_flight[site].iter().cloned().collect();
        for id in ids {
            let record = match self.sim.sites()[site].ledger().cluster(&id) {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(e) => {
                    self.violation(
                        "core error",
                        Some(site),
                        format!("reading cluster {id}: {e}"),
                    );
                    continue;
                }
            };
            // The runner may move a cluster on from `reserved` in the same
            // step that reserved it (a site that restarts resumes both).
            let reached = matches!(
                record.state,
                ClusterState::Reserved | ClusterState::Starting | ClusterState::Running
            );
            if reached && !self.clusters.get(&id).is_some_and(|t| t.verified_reserved) {
                if let Some(detail) = self.reserved_problem(site, &record) {
                    self.violation("reserved cluster", Some(site), detail);
                }
                if let Some(tracked) = self.clusters.get_mut(&id) {
                    tracked.verified_reserved = true;
                }
            }
            if record.state == ClusterState::Reserving
                && let Some(detail) = taken_problem(&record)
            {
                self.violation("nodes taken", Some(site), detail);
            }
            if record.state.is_terminal() || reached {
                self.in_flight[site].remove(&id);
            }
        }
    }

    fn reserved_problem(
        &self,
        master: SiteId,
        record: &vcfed_storage::ClusterRecord,
    ) -> Option<String> {
        let sites = self.sim.sites();
        let request: ClusterRequest = match serde_json::from_value(record.request.clone()) {
            Ok(request) => request,
            Err(e) => return Some(format!("cluster {}: unreadable request: {e}", record.id)),
        };
        let committed: Vec<_> = record
            .parts
            .iter()
            .filter(|p| p.state == PartState::Committed)
            .collect();
        let nodes: u32 = committed.iter().map(|p| p.nodes).sum();
        if nodes != request.nodes {
            return Some(format!(
                "cluster {} reserved with {nodes} committed nodes, {} asked: {:?}",
                record.id, request.nodes, record.parts
            ));
        }
        if let Some(part) = record
            .parts
            .iter()
            .find(|p| matches!(p.state, PartState::Held | PartState::Committing))
        {
            return Some(format!(
                "cluster {} reserved with a part still {}: {part:?}",
                record.id, part.state
            ));
        }
        let frontends: Vec<_> = record.parts.iter().filter(|p| p.frontend).collect();
        let master_name = sites[master].name();
        if frontends.len() != 1
            || frontends[0].site != master_name
            || frontends[0].state != PartState::Committed
        {
            return Some(format!(
                "cluster {}: the frontend is not committed at the master: {:?}",
                record.id, record.parts
            ));
        }
        let master_peer = sites[master].peer().to_string();
        for part in committed {
            let Some(key) = &part.reservation_key else {
                return Some(format!("cluster {}: a part without key", record.id));
            };
            let holder = part
                .peer_id
                .as_deref()
                .and_then(|p| p.parse().ok())
                .and_then(|p| self.directory.index.get(&p).copied());
            let Some(holder) = holder else {
                return Some(format!(
                    "cluster {}: part at unknown site {}",
                    record.id, part.site
                ));
            };
            let expected = part.nodes + u32::from(part.frontend);
            match sites[holder].ledger().reservation(key) {
                Ok(Some(r))
                    if r.state == ReservationState::Committed
                        && r.nodes == expected
                        && r.requester == master_peer => {}
                Ok(other) => {
                    return Some(format!(
                        "cluster {}: part {key} at {} is committed at the master but the site has {:?}",
                        record.id,
                        sites[holder].name(),
                        other.map(|r| (r.state, r.nodes))
                    ));
                }
                Err(e) => return Some(format!("reading {key}: {e}")),
            }
        }
        None
    }

    /// Checks that run every simulated second.
    fn periodic(&mut self, now: i64) {
        let n = self.options.sites;
        self.membership_events(now);
        self.gateway_events(now);
        self.site_loss_events(now);
        self.follow_losses(now);
        if (now - START_MS) % 10_000 == 0 {
            self.check_fences();
        }
        if (now - START_MS) % 10_000 == 0 {
            let mut found = Vec::new();
            self.lifecycle
                .periodic(&self.sim, now, self.sim.calm_at_ms(), &mut found);
            self.record_found(found);
        }
        // Changes that never reached everyone.
        let stale: Vec<_> = self
            .changes
            .iter()
            .filter(|(_, c)| now - c.published_at > CHANGE_TRACK_MS)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.changes.remove(&key);
            self.not_converged += 1;
        }
        // Holds resolved within lease + bound, reservations ended by their
        // deadline (every 10 s).
        if (now - START_MS) % 10_000 == 0 {
            for site in 0..n {
                if checks::alive(&self.sim, site) {
                    self.check_holds(site);
                    self.check_reserve_deadlines(site);
                }
            }
        }
        if let Some(calm_at) = self.sim.calm_at_ms()
            && self.full_view_after_calm_ms.is_none()
            && !self.convergence_violated
        {
            if self.full_view(now) {
                self.full_view_after_calm_ms = Some(now - calm_at);
            } else if now - calm_at > self.options.convergence_bound_ms {
                self.convergence_violated = true;
                let detail = self.first_gap(now);
                self.violation("gossip convergence", None, detail);
            }
        }
    }

    fn check_holds(&mut self, site: SiteId) {
        let now = self.sim.local_now_ms(site);
        // A site sweeps a hold when its lease runs out (its own timer, on
        // its own clock); what is left is slack for a site that was just
        // restarted.
        let bound = HOLD_RESOLUTION_SLACK_MS;
        // The earliest lease of a held reservation says whether one is late
        // (one indexed read); the list is read only to name it.
        match self.sim.sites()[site].ledger().next_lease_expiry(i64::MIN) {
            Ok(earliest) if earliest.is_none_or(|at| at + bound >= now) => return,
            Ok(_) => {}
            Err(e) => {
                self.violation("core error", Some(site), format!("{e}"));
                return;
            }
        }
        let reservations = match self.sim.sites()[site]
            .ledger()
            .reservations(ReservationFilter::All, now)
        {
            Ok(all) => all,
            Err(e) => {
                self.violation("core error", Some(site), format!("{e}"));
                return;
            }
        };
        let late = reservations.iter().find(|r| {
            r.state == ReservationState::Held
                && r.lease_expires_at_ms.is_some_and(|at| at + bound < now)
        });
        if let Some(late) = late {
            let detail = format!(
                "hold {} at {} is still held {} ms after its lease ran out",
                late.key,
                self.sim.sites()[site].name(),
                now - late.lease_expires_at_ms.unwrap_or(now)
            );
            self.violation("hold resolution", Some(site), detail);
        }
    }

    /// No cluster stays `reserving` at its master longer than the reserve
    /// deadline after it was created or the master last started (a
    /// restarted master gives a decided commit a new deadline).
    fn check_reserve_deadlines(&mut self, site: SiteId) {
        let local = self.sim.local_now_ms(site);
        let fed_site = &self.sim.sites()[site];
        let up_since = fed_site.up_since_ms().unwrap_or_else(|| self.sim.now_ms());
        let up_since_local = self.sim.clock(site).local(up_since);
        let bound = self.reserve_deadline_ms + RESERVE_DEADLINE_SLACK_MS;
        let mut overdue = Vec::new();
        for id in &self.in_flight[site] {
            if self.clusters.get(id).is_some_and(|t| t.overdue_reported) {
                continue;
            }
            let Ok(Some(record)) = fed_site.ledger().cluster(id) else {
                continue;
            };
            let since = record.created_at_ms.max(up_since_local);
            if record.state == ClusterState::Reserving && local - since > bound {
                overdue.push((id.clone(), local - since));
            }
        }
        for (id, for_ms) in overdue {
            let detail = format!(
                "cluster {id} is still reserving at its master {} after {for_ms} ms (deadline {} ms)",
                self.sim.sites()[site].name(),
                bound - RESERVE_DEADLINE_SLACK_MS
            );
            self.violation("reserve deadline", Some(site), detail);
            if let Some(tracked) = self.clusters.get_mut(&id) {
                tracked.overdue_reported = true;
            }
        }
    }

    /// The version every site must know of `of`: the newest published at
    /// least a second ago (what is younger may still be on its way).
    fn required_version(&self, of: SiteId, now: i64) -> u64 {
        self.published[of]
            .iter()
            .rev()
            .find(|(_, at)| *at + 1_000 <= now)
            .map_or(0, |(v, _)| *v)
    }

    fn full_view(&self, now: i64) -> bool {
        let n = self.options.sites;
        let required: Vec<u64> = (0..n).map(|j| self.required_version(j, now)).collect();
        let alive: Vec<bool> = (0..n).map(|i| checks::alive(&self.sim, i)).collect();
        (0..n)
            .filter(|&i| alive[i])
            .all(|i| (0..n).all(|j| i == j || !alive[j] || self.known[i * n + j] >= required[j]))
    }

    fn first_gap(&self, now: i64) -> String {
        let n = self.options.sites;
        let mut gaps = 0;
        let mut first = None;
        let alive: Vec<bool> = (0..n).map(|i| checks::alive(&self.sim, i)).collect();
        for i in (0..n).filter(|&i| alive[i]) {
            for j in (0..n).filter(|&j| j != i && alive[j]) {
                let required = self.required_version(j, now);
                if self.known[i * n + j] < required {
                    gaps += 1;
                    first.get_or_insert((i, j, self.known[i * n + j], required));
                }
            }
        }
        match first {
            Some((i, j, known, required)) => format!(
                "{gaps} (site, site) pairs still differ {} ms after the calm; e.g. site{i} has site{j} at version {known}, current {required}",
                self.options.convergence_bound_ms
            ),
            None => "views differ".to_owned(),
        }
    }

    /// At the end (faults stopped at least the settle bound ago): every
    /// cluster settled, no commitment without its cluster.
    fn final_checks(&mut self) {
        let Some(calm_at) = self.sim.calm_at_ms() else {
            return;
        };
        if self.sim.now_ms() - calm_at < self.options.settle_bound_ms {
            return;
        }
        let ids: Vec<(String, SiteId)> = self
            .clusters
            .iter()
            .filter(|(_, t)| t.outcome == Some(CreateOutcome::Accepted))
            .map(|(id, t)| (id.clone(), t.master))
            .collect();
        let mut unsettled = Vec::new();
        for (id, master) in &ids {
            let record = self.sim.sites()[*master].ledger().cluster(id);
            let Ok(Some(record)) = record else {
                continue;
            };
            // A cluster whose master left, or with a part at a site that
            // left, waits for answers that never come until its window
            // ends: not a fault of the protocol.
            let gone = self.sim.sites()[*master].presence() != Presence::Member
                || record.parts.iter().any(|p| {
                    p.state != PartState::Released
                        && p.peer_id
                            .as_deref()
                            .and_then(|peer| self.directory.site_of(peer))
                            .is_some_and(|s| self.sim.sites()[s].presence() != Presence::Member)
                });
            let state = record.state;
            match state {
                ClusterState::Reserved | ClusterState::Starting | ClusterState::Running => {
                    match state {
                        ClusterState::Reserved => self.requests.reserved += 1,
                        ClusterState::Starting => self.requests.starting += 1,
                        _ => self.requests.running += 1,
                    }
                    if !gone
                        && record
                            .parts
                            .iter()
                            .any(|p| !matches!(p.state, PartState::Committed | PartState::Released))
                    {
                        unsettled.push(format!("{id} {state} with parts in flight"));
                    }
                }
                ClusterState::Failed => {
                    let reason = record.reason.unwrap_or_default();
                    *self.requests.failed.entry(reason).or_default() += 1;
                }
                ClusterState::Finished => self.requests.finished += 1,
                state if !gone => unsettled.push(format!("{id} {state}")),
                _ => {}
            }
        }
        self.requests.unsettled = unsettled.len() as u64;
        if let Some(first) = unsettled.first() {
            let detail = format!(
                "{} clusters not settled {} ms after faults stopped, e.g. {first}",
                unsettled.len(),
                self.sim.now_ms() - calm_at
            );
            self.violation("settled after faults", None, detail);
        }
        self.check_leaks();
    }

    /// Every commitment a member keeps belongs to a part its master counts
    /// (unless the master left).
    fn check_leaks(&mut self) {
        let sites = self.sim.sites();
        let mut leak = None;
        'sites: for (index, site) in sites.iter().enumerate() {
            if site.presence() != Presence::Member {
                continue;
            }
            let now = self.sim.local_now_ms(index);
            let Ok(active) = site.ledger().reservations(ReservationFilter::Active, now) else {
                continue;
            };
            for r in active.iter().filter(|r| r.window.end_ms > now) {
                let Some(tracked) = self.clusters.get(&r.cluster_id) else {
                    continue;
                };
                if sites[tracked.master].presence() != Presence::Member {
                    continue;
                }
                let master = &sites[tracked.master];
                let record = master.ledger().cluster(&r.cluster_id).ok().flatten();
                // A cluster that finished because its window is over (by
                // the master's clock) keeps its parts committed; each
                // site's reservation ends with the window by its own clock.
                let master_now = self.sim.local_now_ms(tracked.master);
                let counted = record.as_ref().is_some_and(|record| {
                    let over = record.state == ClusterState::Finished
                        && vcfed_node_core::lifecycle::window_of(record)
                            .is_some_and(|w| w.end_ms <= master_now);
                    (!record.state.is_terminal() || over)
                        && record.parts.iter().any(|p| {
                            p.reservation_key.as_deref() == Some(r.key.as_str())
                                && p.peer_id.as_deref() == Some(site.peer().to_string().as_str())
                                && p.state == PartState::Committed
                        })
                });
                if !counted {
                    leak = Some((
                        index,
                        format!(
                            "{} keeps {} ({:?}, {} nodes) but its master {} has {:?}",
                            site.name(),
                            r.key,
                            r.state,
                            r.nodes,
                            master.name(),
                            record.map(|c| c.state)
                        ),
                    ));
                    break 'sites;
                }
            }
        }
        if let Some((site, detail)) = leak {
            self.violation("leaked reservation", Some(site), detail);
        }
    }

    fn report(mut self, wall: std::time::Duration) -> Report {
        let n = self.options.sites;
        let now = self.sim.now_ms();
        // A run stopped at a violation has not sent the later requests.
        self.requests.sent = 0;
        for tracked in self.clusters.values().filter(|t| t.sent_at <= now) {
            self.requests.sent += 1;
            if tracked.outcome.is_none() {
                self.requests.site_down += 1;
            }
        }
        let seconds = self.options.duration_ms as f64 / 1000.0;
        let per_site_s = |total: u64| total as f64 / n as f64 / seconds;
        let stats = self.sim.stats().clone();
        let kind_bytes = |kind: &str| stats.by_kind.get(kind).map_or(0, |(_, bytes)| *bytes);
        let mut sent_msgs = 0;
        let mut sent_bytes = 0;
        let mut max_bytes = 0;
        let mut duplicates = 0;
        for site in 0..n {
            let traffic = self.sim.traffic(site);
            sent_msgs += traffic.sent_msgs;
            sent_bytes += traffic.sent_bytes;
            max_bytes = max_bytes.max(traffic.sent_bytes);
            duplicates += self.sim.sites()[site].gossip_duplicates();
        }
        let traffic = TrafficReport {
            msgs_per_site_s: per_site_s(sent_msgs),
            bytes_per_site_s: per_site_s(sent_bytes),
            bytes_per_site_s_max: max_bytes as f64 / seconds,
            gossip_bytes_per_site_s: per_site_s(kind_bytes("gossip")),
            anti_entropy_bytes_per_site_s: per_site_s(
                kind_bytes("anti-entropy-request") + kind_bytes("anti-entropy-response"),
            ),
            cluster_bytes_per_site_s: per_site_s(
                stats
                    .by_kind
                    .iter()
                    .filter(|(kind, _)| kind.starts_with("cluster-"))
                    .map(|(_, (_, bytes))| bytes)
                    .sum(),
            ),
            by_kind: stats
                .by_kind
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            faults_by_kind: stats
                .faults_by_kind
                .iter()
                .map(|(k, f)| ((*k).to_owned(), [f.lost, f.duplicated, f.reordered]))
                .collect(),
            gossip_duplicates: duplicates,
            lost: stats.lost,
            duplicated: stats.duplicated,
            reordered: stats.reordered,
            partitioned: stats.partitioned,
            dest_down: stats.dest_down,
            crashes: stats.crashes,
            partitions: stats.partitions,
        };
        let not_converged = self.not_converged + self.changes.len() as u64;
        let convergence = ConvergenceReport {
            changes_faulty: self.changes_faulty,
            changes_calm: self.changes_calm,
            converged: (self.latencies_calm.len() + self.latencies_faulty.len()) as u64,
            not_converged,
            calm_ms: Percentiles::of(std::mem::take(&mut self.latencies_calm)),
            faulty_ms: Percentiles::of(std::mem::take(&mut self.latencies_faulty)),
            calm_hops: Percentiles::of(std::mem::take(&mut self.hops_calm)),
            full_view_after_calm_ms: self.full_view_after_calm_ms,
        };
        let wall_ms = u64::try_from(wall.as_millis()).unwrap_or(u64::MAX);
        Report {
            seed: self.seed,
            sites: n,
            duration_ms: self.options.duration_ms,
            faults: Fault::list(&self.options.faults),
            gossip: (
                self.options.advert_refresh_ms,
                self.options.advert_ttl_ms,
                self.options.anti_entropy_ms,
                self.options.mesh_degree,
            ),
            requests: self.requests.clone(),
            violations: self.violations.clone(),
            convergence,
            traffic,
            lifecycle: self.lifecycle.report(),
            membership: self.membership.clone(),
            heal: self.losses.report.clone(),
            trace_hash: format!("{:016x}", self.sim.trace().hash()),
            events: stats.events,
            wall_ms,
            speedup: self.options.duration_ms as f64 / (wall_ms.max(1) as f64),
            replay: self.options.replay_command(self.seed),
        }
    }
}

/// A gossipsub-like mesh: every site links to `degree / 2` random others
/// and links are both ways, so degrees average `degree`.
/// Only the sites that are members at the start take part; the others
/// join later through a member.
fn build_mesh(members: &[bool], degree: usize, rng: &mut Rng) -> Vec<Vec<SiteId>> {
    let n = members.len();
    let mut links: Vec<BTreeSet<SiteId>> = vec![BTreeSet::new(); n];
    let member_ids: Vec<SiteId> = (0..n).filter(|&s| members[s]).collect();
    let m = member_ids.len();
    if m < 2 {
        return vec![Vec::new(); n];
    }
    let out = (degree / 2).max(1).min(m - 1);
    for &site in &member_ids {
        let mut tries = 0;
        while links[site].len() < out && tries < 100 * out {
            tries += 1;
            let other = member_ids[rng.index(m)];
            if other != site {
                links[site].insert(other);
                links[other].insert(site);
            }
        }
    }
    links.into_iter().map(|l| l.into_iter().collect()).collect()
}

/// Which sites join late and which leave, and when (true ms): with `join`
/// a tenth of the sites (at least one) join during the faulty phase; with
/// `leave` a twentieth (at least one) of the others leave in it. Fewer
/// than four sites: nobody moves.
fn membership_schedule(
    options: &Options,
    rng: &mut Rng,
) -> (BTreeMap<SiteId, i64>, BTreeMap<SiteId, i64>) {
    let n = options.sites;
    let span = (options.duration_ms - options.calm_ms).max(0);
    let mut joins = BTreeMap::new();
    let mut leaves = BTreeMap::new();
    if n < 4 || span < 2 * MINUTE_MS {
        return (joins, leaves);
    }
    let mut order: Vec<SiteId> = (0..n).collect();
    rng.shuffle(&mut order);
    let joiners = if options.faults.contains(&Fault::Join) {
        (n / 10).max(1)
    } else {
        0
    };
    let leavers = if options.faults.contains(&Fault::Leave) {
        (n / 20).max(1)
    } else {
        0
    };
    for &site in &order[..joiners] {
        joins.insert(site, START_MS + rng.between(30_000, span - 30_000));
    }
    for &site in &order[joiners..joiners + leavers] {
        leaves.insert(site, START_MS + rng.between(MINUTE_MS, span));
    }
    (joins, leaves)
}

/// Gateway outages (down at, up at, site), true ms: with `gateway`, about
/// one per site per hour (at least one every 3 min) during the faulty
/// phase, each 10 s to 2 min long.
fn gateway_schedule(options: &Options, rng: &mut Rng) -> Vec<(i64, i64, SiteId)> {
    let n = options.sites;
    let span = (options.duration_ms - options.calm_ms).max(0);
    let mut outages = Vec::new();
    if !options.faults.contains(&Fault::Gateway) || n == 0 {
        return outages;
    }
    let every_ms = (HOUR_MS / i64::try_from(n).unwrap_or(1)).min(3 * MINUTE_MS);
    let mut at = START_MS;
    loop {
        at += rng.exponential_ms(every_ms);
        if at >= START_MS + span {
            return outages;
        }
        let site = rng.index(n);
        let length = rng.between(10_000, 2 * MINUTE_MS);
        outages.push((at, at + length, site));
    }
}

/// A master that took more nodes than asked (held, committing or
/// committed parts) while it reserves.
fn taken_problem(record: &vcfed_storage::ClusterRecord) -> Option<String> {
    let asked = record.request["nodes"].as_u64()?;
    let taken: u64 = record
        .parts
        .iter()
        .filter(|p| {
            p.lost_at_ms.is_none()
                && matches!(
                    p.state,
                    PartState::Held | PartState::Committing | PartState::Committed
                )
        })
        .map(|p| u64::from(p.nodes))
        .sum();
    (taken > asked).then(|| {
        format!(
            "cluster {} is reserving with {taken} nodes taken, {asked} asked: {:?}",
            record.id, record.parts
        )
    })
}

fn faults_for(options: &Options) -> Faults {
    let on = |fault| options.faults.contains(&fault);
    let n = options.sites;
    let fault_span = (options.duration_ms - options.calm_ms).max(0);
    Faults {
        loss: if on(Fault::Loss) { options.loss } else { 0.0 },
        duplicate: if on(Fault::Dup) { options.dup } else { 0.0 },
        reorder: if on(Fault::Reorder) { 0.05 } else { 0.0 },
        reorder_delay_max_ms: 2_000,
        partitions: on(Fault::Partition).then(|| PartitionFaults {
            every_ms: 3 * MINUTE_MS,
            length_min_ms: 10_000,
            length_max_ms: 2 * MINUTE_MS,
            kinds: vec![
                PartitionKind::Halves,
                PartitionKind::Isolate,
                PartitionKind::Asymmetric,
            ],
        }),
        crashes: on(Fault::Crash).then(|| CrashFaults {
            // About one crash per site per hour, at least one a few minutes.
            every_ms: (HOUR_MS / i64::try_from(n.max(1)).unwrap_or(1)).min(3 * MINUTE_MS),
            down_min_ms: 5_000,
            down_max_ms: 3 * MINUTE_MS,
            down_max: (n / 10).max(1),
        }),
        skew: on(Fault::Skew).then_some(SkewFaults {
            offset_max_ms: 5_000,
            drift_max_ppm: 200,
        }),
        uplink_bytes_per_s: on(Fault::Bandwidth).then_some(1_000_000),
        stop_after_ms: Some(fault_span),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcfed_storage::{ClusterPart, ClusterRecord};

    fn part(site: &str, nodes: u32, state: PartState) -> ClusterPart {
        ClusterPart {
            site: site.to_owned(),
            peer_id: None,
            attempt: 0,
            nodes,
            frontend: site == "A",
            state,
            reservation_key: None,
            gateway: None,
            first_node: None,
            lost_at_ms: None,
        }
    }

    /// The nodes-taken check flags a master holding more than asked, and
    /// only that: released parts and parts still being asked do not count.
    #[test]
    fn the_nodes_taken_check_catches_a_master_that_takes_too_much() {
        let mut record = ClusterRecord {
            id: "c".to_owned(),
            name: "c".to_owned(),
            master_site: "A".to_owned(),
            request: serde_json::json!({ "nodes": 5 }),
            state: ClusterState::Reserving,
            reason: None,
            parts: vec![
                part("A", 2, PartState::Committed),
                part("B", 3, PartState::Held),
                part("C", 3, PartState::Released),
                part("D", 3, PartState::Reserving),
            ],
            segment: None,
            epoch: 0,
            created_at_ms: START_MS,
            updated_at_ms: START_MS,
        };
        assert_eq!(taken_problem(&record), None);
        record.parts.push(part("E", 1, PartState::Committing));
        let problem = taken_problem(&record).expect("6 nodes taken, 5 asked");
        assert!(problem.contains("6 nodes taken, 5 asked"), "{problem}");
    }
}
