//! The trace of a run: a stable hash over every event in order (for
//! determinism checks) and the last events in full (for failure reports).

use std::collections::VecDeque;
use std::fmt;

use crate::SiteId;
use crate::rng::mix64;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TraceKind {
    /// A message reached its site.
    Deliver,
    /// A message was lost by the network.
    Lost,
    /// A message was dropped by a partition.
    Partitioned,
    /// A message was dropped because its destination was down or restarted.
    DestDown,
    /// A message was duplicated.
    Duplicated,
    /// A site's timer fired.
    Timer,
    /// A site took an input (workload).
    Input,
    /// A site crashed.
    Crash,
    /// A site restarted.
    Restart,
    /// A partition began.
    PartitionStart,
    /// The partition healed.
    Heal,
    /// Faults stopped for good.
    Calm,
}

impl TraceKind {
    fn code(self) -> u64 {
        self as u64
    }
}

/// One event of the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEvent {
    /// True time, ms since the start.
    pub at_ms: i64,
    /// What.
    pub kind: TraceKind,
    /// The site it happened at (the receiver for messages).
    pub site: Option<SiteId>,
    /// The other site (the sender for messages).
    pub peer: Option<SiteId>,
    /// Message kind, input kind or detail.
    pub label: &'static str,
    /// Message length, bytes.
    pub len: usize,
    /// A fingerprint of the message or input.
    pub fingerprint: u64,
}

impl fmt::Display for TraceEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.at_ms.div_euclid(1000);
        let millis = self.at_ms.rem_euclid(1000);
        write!(f, "t+{secs}.{millis:03}s {:?}", self.kind)?;
        match (self.peer, self.site) {
            (Some(from), Some(to)) => write!(f, " site{from}→site{to}")?,
            (None, Some(site)) => write!(f, " site{site}")?,
            _ => {}
        }
        if !self.label.is_empty() {
            write!(f, " {}", self.label)?;
        }
        if self.len > 0 {
            write!(f, " {}B", self.len)?;
        }
        if self.fingerprint != 0 {
            write!(f, " #{:08x}", self.fingerprint & 0xFFFF_FFFF)?;
        }
        Ok(())
    }
}

/// The trace: hash of everything, the last events kept.
#[derive(Debug, Clone)]
pub struct Trace {
    hash: u64,
    events: u64,
    recent: VecDeque<TraceEvent>,
    keep: usize,
}

impl Trace {
    /// An empty trace keeping the last `keep` events.
    pub fn new(keep: usize) -> Trace {
        Trace {
            hash: 0x7ACE_7ACE_7ACE_7ACE,
            events: 0,
            recent: VecDeque::with_capacity(keep.min(4096)),
            keep,
        }
    }

    /// Records an event.
    pub fn record(&mut self, event: TraceEvent) {
        let site = event.site.map_or(u64::MAX, |s| s as u64);
        let peer = event.peer.map_or(u64::MAX, |s| s as u64);
        #[allow(clippy::cast_sign_loss)] // hashing the bits
        let fields = [
            event.at_ms as u64,
            event.kind.code(),
            site,
            peer,
            event.len as u64,
            event.fingerprint,
        ];
        for field in fields {
            self.hash = mix64(self.hash.rotate_left(23) ^ field);
        }
        self.events += 1;
        if self.keep == 0 {
            return;
        }
        if self.recent.len() == self.keep {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }

    /// The hash over every event so far: equal for equal runs.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// Events recorded.
    pub fn len(&self) -> u64 {
        self.events
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// The last events, oldest first.
    pub fn recent(&self) -> impl Iterator<Item = &TraceEvent> {
        self.recent.iter()
    }
}
