//! Pure calendar arithmetic: how many nodes are in use over a window.
//!
//! The ledger loads the reservations that count (committed ones, and held ones
//! whose lease has not run out) and asks these functions for the usage step
//! function. Nothing here touches SQLite or a clock, so the property tests can
//! check it against a brute-force model.

use serde::{Deserialize, Serialize};

/// A half-open time window `[start_ms, end_ms)` in unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Window {
    /// First millisecond of the window.
    pub start_ms: i64,
    /// First millisecond after the window.
    pub end_ms: i64,
}

impl Window {
    /// A window; `None` unless `start_ms < end_ms`.
    pub fn new(start_ms: i64, end_ms: i64) -> Option<Window> {
        (start_ms < end_ms).then_some(Window { start_ms, end_ms })
    }

    /// Whether the two windows share at least one millisecond.
    pub(crate) fn overlaps(&self, other: &Window) -> bool {
        self.start_ms < other.end_ms && other.start_ms < self.end_ms
    }

    /// Length of the window in milliseconds (always positive).
    pub fn duration_ms(&self) -> i64 {
        // Saturates: a window from i64::MIN to i64::MAX is "as long as can be".
        self.end_ms.saturating_sub(self.start_ms)
    }
}

/// From `at_ms` until the next step (or the end of the asked window), `free`
/// nodes are free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Unix ms at which this level starts.
    pub at_ms: i64,
    /// Free node slots from then on.
    pub free: u32,
}

/// Nodes of one reservation over its window, as the calendar sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// When the nodes are taken.
    pub window: Window,
    /// How many.
    pub nodes: u32,
}

/// The largest number of nodes in use at any instant of `window`.
pub fn peak_usage(usages: &[Usage], window: Window) -> u64 {
    usage_steps(usages, window)
        .into_iter()
        .map(|(_, used)| used)
        .max()
        .unwrap_or(0)
}

/// Free nodes over `window` as steps: the first step is at `window.start_ms`,
/// consecutive steps always differ in `free`.
pub(crate) fn free_steps(capacity: u32, usages: &[Usage], window: Window) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for (at_ms, used) in usage_steps(usages, window) {
        let free = u64::from(capacity).saturating_sub(used);
        // `free <= capacity`, a u32, so the conversion cannot fail.
        let free = u32::try_from(free).expect("free never exceeds a u32 capacity");
        if steps.last().is_some_and(|last| last.free == free) {
            continue;
        }
        steps.push(Step { at_ms, free });
    }
    steps
}

/// The fewest free nodes at any instant of `window`.
pub fn min_free(capacity: u32, usages: &[Usage], window: Window) -> u32 {
    free_steps(capacity, usages, window)
        .into_iter()
        .map(|step| step.free)
        .min()
        .unwrap_or(capacity)
}

/// Usage as `(at_ms, nodes in use from then on)`, starting at `window.start_ms`;
/// only times inside the window appear.
fn usage_steps(usages: &[Usage], window: Window) -> Vec<(i64, u64)> {
    let mut deltas: Vec<(i64, i64)> = Vec::with_capacity(usages.len() * 2);
    for usage in usages.iter().filter(|u| u.window.overlaps(&window)) {
        let nodes = i64::from(usage.nodes);
        deltas.push((usage.window.start_ms.max(window.start_ms), nodes));
        if usage.window.end_ms < window.end_ms {
            deltas.push((usage.window.end_ms, -nodes));
        }
    }
    deltas.sort_unstable();

    let mut steps = vec![(window.start_ms, 0u64)];
    let mut used: i64 = 0;
    let mut index = 0;
    while index < deltas.len() {
        let at_ms = deltas[index].0;
        while index < deltas.len() && deltas[index].0 == at_ms {
            used += deltas[index].1;
            index += 1;
        }
        assert!(used >= 0, "a usage ends only after it started");
        let used = u64::try_from(used).expect("asserted non-negative above");
        match steps.last_mut() {
            Some(last) if last.0 == at_ms => last.1 = used,
            _ => steps.push((at_ms, used)),
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn window(start_ms: i64, end_ms: i64) -> Window {
        Window::new(start_ms, end_ms).expect("test windows are non-empty")
    }

    #[test]
    fn empty_calendar_is_all_free() {
        assert_eq!(
            free_steps(4, &[], window(0, 10)),
            vec![Step { at_ms: 0, free: 4 }]
        );
        assert_eq!(peak_usage(&[], window(0, 10)), 0);
    }

    #[test]
    fn steps_follow_overlapping_usages() {
        let usages = [
            Usage {
                window: window(2, 6),
                nodes: 1,
            },
            Usage {
                window: window(4, 8),
                nodes: 2,
            },
            Usage {
                window: window(-5, 1),
                nodes: 3,
            },
        ];
        assert_eq!(
            free_steps(4, &usages, window(0, 10)),
            vec![
                Step { at_ms: 0, free: 1 },
                Step { at_ms: 1, free: 4 },
                Step { at_ms: 2, free: 3 },
                Step { at_ms: 4, free: 1 },
                Step { at_ms: 6, free: 2 },
                Step { at_ms: 8, free: 4 },
            ]
        );
        assert_eq!(peak_usage(&usages, window(0, 10)), 3);
        assert_eq!(peak_usage(&usages, window(6, 7)), 2);
    }

    #[test]
    fn back_to_back_usages_do_not_overlap() {
        let usages = [
            Usage {
                window: window(0, 5),
                nodes: 2,
            },
            Usage {
                window: window(5, 10),
                nodes: 2,
            },
        ];
        assert_eq!(peak_usage(&usages, window(0, 10)), 2);
        assert_eq!(
            free_steps(2, &usages, window(0, 10)),
            vec![Step { at_ms: 0, free: 0 }]
        );
    }

    proptest! {
        /// The step function agrees with counting usage at every millisecond.
        #[test]
        fn steps_match_brute_force(
            raw in prop::collection::vec((0i64..50, 1i64..20, 1u32..5), 0..12),
            start in 0i64..40,
            len in 1i64..30,
        ) {
            let usages: Vec<Usage> = raw
                .iter()
                .map(|&(s, l, n)| Usage { window: window(s, s + l), nodes: n })
                .collect();
            let asked = window(start, start + len);
            let capacity = 10;
            let steps = free_steps(capacity, &usages, asked);
            prop_assert_eq!(steps[0].at_ms, asked.start_ms);
            for t in asked.start_ms..asked.end_ms {
                let used: u64 = usages
                    .iter()
                    .filter(|u| u.window.start_ms <= t && t < u.window.end_ms)
                    .map(|u| u64::from(u.nodes))
                    .sum();
                let free = u32::try_from(10u64.saturating_sub(used)).unwrap();
                let step = steps.iter().rev().find(|s| s.at_ms <= t).unwrap();
                prop_assert_eq!(step.free, free, "at {}", t);
            }
            for pair in steps.windows(2) {
                prop_assert!(pair[0].at_ms < pair[1].at_ms);
                prop_assert_ne!(pair[0].free, pair[1].free);
            }
        }
    }
}
