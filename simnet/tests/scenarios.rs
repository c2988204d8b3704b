//! Workloads the CI sweep (`sweep.rs`) seldom produces, run under message
//! faults with every invariant checked.
//!
//! Contention: a few small sites, many requests for long windows that
//! overlap, so that masters ask for nodes another master took meanwhile and
//! workers deny; every message of the reservation protocol, denials
//! included, must meet loss, duplication and reordering (refusals excepted:
//! the CI sweep strikes those, and these denials are what it seldom has).

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code

use vcfed_node_core::cluster::ClusterMsg;
use vcfed_simnet::{Fault, Options, Report, run};

const MINUTE_MS: i64 = 60_000;
/// The messages of the reservation protocol, as simnet labels them.
const RESERVATION_KINDS: [&str; 8] = ClusterMsg::RESERVATION_LABELS;
/// The message faults, in the order of `TrafficReport::faults_by_kind`.
const MESSAGE_FAULTS: [&str; 3] = ["lost", "duplicated", "reordered"];
const CONTENTION_SEEDS: u64 = 50;

fn contention_options() -> Options {
    let mut options = Options::new(8);
    // Every site has 4 slots and most requests need several of them.
    options.capacity_max = 4;
    options.nodes_max = 10;
    options.duration_ms = 20 * MINUTE_MS;
    options.calm_ms = 10 * MINUTE_MS;
    options.settle_bound_ms = 5 * MINUTE_MS;
    options.faults = [
        Fault::Loss,
        Fault::Dup,
        Fault::Reorder,
        Fault::Partition,
        Fault::Crash,
        Fault::Skew,
    ]
    .into_iter()
    .collect();
    options.loss = 0.1;
    options.dup = 0.1;
    options.requests_per_site_hour = 3_600.0;
    options.window_start_min_ms = 2 * MINUTE_MS;
    options.window_start_max_ms = 30 * MINUTE_MS;
    options.window_length_min_ms = 30 * MINUTE_MS;
    options.window_length_max_ms = 2 * 60 * MINUTE_MS;
    options
}

#[test]
fn contending_masters_never_overbook_and_every_message_meets_every_fault() {
    let options = contention_options();
    let reports: Vec<Report> = (0..CONTENTION_SEEDS)
        .map(|seed| run(&options, seed, &mut |_| {}))
        .collect();
    let mut failures = String::new();
    for report in reports.iter().filter(|r| !r.violations.is_empty()) {
        failures.push_str(&vcfed_simnet::render(report));
    }
    assert!(failures.is_empty(), "invariants broken:\n{failures}");
    let sum = |f: &dyn Fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let reserved = sum(&|r| r.requests.reserved + r.requests.running + r.requests.finished);
    let failed = sum(&|r| r.requests.failed.values().sum());
    eprintln!("{reserved} clusters reserved, {failed} failed");
    assert!(
        reserved > 0 && failed > 0,
        "both outcomes: {reserved} reserved, {failed} failed"
    );
    for kind in RESERVATION_KINDS {
        let faults =
            |fault: usize| sum(&|r| r.traffic.faults_by_kind.get(kind).map_or(0, |f| f[fault]));
        eprintln!(
            "{kind}: {} lost, {} duplicated, {} reordered",
            faults(0),
            faults(1),
            faults(2)
        );
        // Refusals (mostly a commit that came after its hold's lease ran
        // out) need long partitions and crashes: sweep.rs strikes those.
        if kind == "cluster-refused" {
            continue;
        }
        for (fault, name) in MESSAGE_FAULTS.iter().enumerate() {
            assert!(faults(fault) > 0, "no {kind} message was {name}");
        }
    }
}

/// Room to spare and no other fault: every worker site lost by
/// `site-loss` is fenced, and every `replace` cluster is whole again within
/// the grace period + 30 s of the loss.
#[test]
fn lost_worker_sites_are_replaced_in_time_when_there_is_room() {
    let mut options = Options::new(12);
    options.duration_ms = 40 * MINUTE_MS;
    options.calm_ms = 10 * MINUTE_MS;
    options.faults = [Fault::SiteLoss].into_iter().collect();
    // About 30 nodes taken at a time of about 120.
    options.requests_per_site_hour = 1.5;
    options.nodes_max = 12;
    options.capacity_max = 16;
    options.window_start_min_ms = 20_000;
    options.window_start_max_ms = 5 * MINUTE_MS;
    options.window_length_min_ms = 15 * MINUTE_MS;
    options.window_length_max_ms = 40 * MINUTE_MS;
    let reports: Vec<Report> = (0..12)
        .map(|seed| run(&options, seed, &mut |_| {}))
        .collect();
    let mut failures = String::new();
    for report in reports.iter().filter(|r| !r.violations.is_empty()) {
        failures.push_str(&vcfed_simnet::render(report));
    }
    assert!(failures.is_empty(), "invariants broken:\n{failures}");
    let sum = |f: &dyn Fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let lost = sum(&|r| r.heal.sites_lost);
    let fenced = sum(&|r| r.heal.parts_fenced);
    let healed = sum(&|r| r.heal.healed);
    let mut times: Vec<i64> = reports
        .iter()
        .flat_map(|r| r.heal.heal_ms.clone())
        .collect();
    times.sort_unstable();
    eprintln!(
        "{lost} sites lost, {fenced} parts fenced, {healed} replace clusters whole again; \
         ms from the loss: p50 {:?}, max {:?}",
        times.get(times.len() / 2),
        times.last()
    );
    assert!(
        lost > 0 && fenced > 0 && healed > 0,
        "{lost} lost, {fenced} fenced, {healed} healed"
    );
    let late = sum(&|r| r.heal.healed_late);
    let never = sum(&|r| r.heal.not_healed);
    assert_eq!(
        (late, never),
        (0, 0),
        "replace clusters whole again late or never"
    );
}
