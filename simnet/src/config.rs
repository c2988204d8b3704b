//! What a run simulates: how many sites, the network, and which faults at
//! which rates. Everything random about a run derives from [`SimConfig::seed`].

/// The simulated network when nothing goes wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    /// Fastest one-way latency of a link, ms. Each pair of sites gets a base
    /// latency drawn once, uniform in `[latency_min_ms, latency_max_ms]`.
    pub latency_min_ms: i64,
    /// Slowest base one-way latency of a link, ms.
    pub latency_max_ms: i64,
    /// Extra delay of each message, uniform in `[0, jitter_ms]`. Jitter
    /// larger than the gap between two sends reorders them.
    pub jitter_ms: i64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            latency_min_ms: 5,
            latency_max_ms: 80,
            jitter_ms: 10,
        }
    }
}

/// Which partitions the fault schedule may create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PartitionKind {
    /// The sites split at random into two halves that cannot talk.
    Halves,
    /// One site is cut off from every other.
    Isolate,
    /// One random half cannot send to the other; the other way works.
    Asymmetric,
}

/// Partitions: how often, how long.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionFaults {
    /// Mean time between the end of one partition and the start of the next, ms.
    pub every_ms: i64,
    /// Shortest partition, ms.
    pub length_min_ms: i64,
    /// Longest partition, ms.
    pub length_max_ms: i64,
    /// Kinds to choose from (uniformly).
    pub kinds: Vec<PartitionKind>,
}

/// Site crashes: how often, how long down.
#[derive(Debug, Clone, PartialEq)]
pub struct CrashFaults {
    /// Mean time between two crashes anywhere in the federation, ms.
    pub every_ms: i64,
    /// Shortest downtime, ms.
    pub down_min_ms: i64,
    /// Longest downtime, ms.
    pub down_max_ms: i64,
    /// Most sites down at once (at least one).
    pub down_max: usize,
}

/// Clock skew and drift between sites.
#[derive(Debug, Clone, PartialEq)]
pub struct SkewFaults {
    /// Each site's offset is uniform in `[-offset_max_ms, offset_max_ms]`.
    pub offset_max_ms: i64,
    /// Each site's drift is uniform in `[-drift_max_ppm, drift_max_ppm]`.
    pub drift_max_ppm: i64,
}

/// The faults of a run; each is off when its rate is zero or it is `None`.
/// Message faults, partitions and crashes stop at `stop_after_ms` (then
/// every partition heals and every crashed site restarts): the calm phase
/// is where "eventually" properties are checked. Skew never stops.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Faults {
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Probability that a message is held back (reordered past later ones).
    pub reorder: f64,
    /// Longest hold-back of a reordered message, ms.
    pub reorder_delay_max_ms: i64,
    /// Partitions, if any.
    pub partitions: Option<PartitionFaults>,
    /// Crashes, if any.
    pub crashes: Option<CrashFaults>,
    /// Clock skew and drift, if any.
    pub skew: Option<SkewFaults>,
    /// Uplink bandwidth of every site, bytes per second; messages queue
    /// behind each other on a capped uplink.
    pub uplink_bytes_per_s: Option<u64>,
    /// When faults stop, ms after the start (`None`: never).
    pub stop_after_ms: Option<i64>,
}

/// One run.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Everything random derives from it.
    pub seed: u64,
    /// Number of sites.
    pub sites: usize,
    /// True time at the start, unix ms.
    pub start_ms: i64,
    /// The network.
    pub net: NetConfig,
    /// The faults.
    pub faults: Faults,
    /// Trace events kept for a failure report.
    pub trace_keep: usize,
}

impl SimConfig {
    /// A run of `sites` sites without faults.
    pub fn new(seed: u64, sites: usize, start_ms: i64) -> SimConfig {
        SimConfig {
            seed,
            sites,
            start_ms,
            net: NetConfig::default(),
            faults: Faults::default(),
            trace_keep: 200,
        }
    }
}
