//! The report of a run as text, for the command and for failing tests.

use std::fmt::Write as _;

use crate::world::{self, Report};

/// `ms` as minutes and seconds, `12m05s`.
pub fn minutes(ms: i64) -> String {
    format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
}

/// The report as text.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let r = &report.requests;
    let c = &report.convergence;
    let t = &report.traffic;
    let _ = writeln!(
        out,
        "simnet seed {}: {} sites, {} simulated in {:.1} s wall ({:.0}× real time), faults {}, trace {}",
        report.seed,
        report.sites,
        minutes(report.duration_ms),
        report.wall_ms as f64 / 1000.0,
        report.speedup,
        report.faults,
        report.trace_hash
    );
    let _ = writeln!(
        out,
        "  gossip: refresh {} ms, ttl {} ms, anti-entropy {} ms, mesh degree {}",
        report.gossip.0, report.gossip.1, report.gossip.2, report.gossip.3
    );
    let _ = writeln!(
        out,
        "  requests: {} sent, {} accepted, {} rejected, {} lost to a down site; {} deletes",
        r.sent,
        r.accepted,
        r.rejected.values().sum::<u64>(),
        r.site_down,
        r.deletes
    );
    for (why, count) in &r.rejected {
        let _ = writeln!(out, "    rejected {count:>5}  {why}");
    }
    let _ = writeln!(
        out,
        "  accepted clusters at the end: {} reserved, {} starting, {} running, {} finished (deleted or window over), {} failed, {} unsettled",
        r.reserved,
        r.starting,
        r.running,
        r.finished,
        r.failed.values().sum::<u64>(),
        r.unsettled
    );
    for (why, count) in &r.failed {
        let _ = writeln!(out, "    failed {count:>7}  {why}");
    }
    let l = &report.lifecycle;
    let m = &report.membership;
    let _ = writeln!(
        out,
        "  lifecycle: {} runs started, {} nodes booted, {} clusters running at their master, {} finished by their window (per site); at most {} runs at a site",
        l.runs_started, l.nodes_booted, l.running_at_master, l.finished_by_window, l.runs_max
    );
    let _ = writeln!(
        out,
        "  membership: {} sites joined, {} left; {} gateway outages",
        m.joined, m.left, m.gateway_outages
    );
    let h = &report.heal;
    if h.sites_lost > 0 {
        let at = |q: usize| {
            h.heal_ms
                .get((h.heal_ms.len().saturating_sub(1)) * q / 100)
                .map_or("-".to_owned(), |ms| format!("{:.1}", *ms as f64 / 1000.0))
        };
        let _ = writeln!(
            out,
            "  site loss: {} worker sites lost, {} parts fenced; replace clusters whole again: {} (p50 {} s, max {} s after the loss), {} late, {} never",
            h.sites_lost,
            h.parts_fenced,
            h.healed,
            at(50),
            at(100),
            h.healed_late,
            h.not_healed
        );
        for never in &h.never {
            let _ = writeln!(out, "    never whole again: {never}");
        }
    }
    let _ = writeln!(
        out,
        "  convergence of advert changes: {} calm, {} under faults; {} seen everywhere, {} not within 2 min",
        c.changes_calm, c.changes_faulty, c.converged, c.not_converged
    );
    let p = |p: &world::Percentiles| {
        format!(
            "p50 {} p90 {} p99 {} max {} (n={})",
            p.p50, p.p90, p.p99, p.max, p.count
        )
    };
    let _ = writeln!(out, "    calm, ms to the last site:   {}", p(&c.calm_ms));
    let _ = writeln!(out, "    calm, gossip hops:          {}", p(&c.calm_hops));
    let _ = writeln!(out, "    under faults, ms:           {}", p(&c.faulty_ms));
    let _ = writeln!(
        out,
        "    full view after the calm began: {}",
        c.full_view_after_calm_ms
            .map_or("never".to_owned(), |ms| format!("{ms} ms"))
    );
    let _ = writeln!(
        out,
        "  traffic per site: {:.1} msg/s, {:.0} B/s (max {:.0}); gossip {:.0} B/s, anti-entropy {:.0} B/s, cluster {:.1} B/s",
        t.msgs_per_site_s,
        t.bytes_per_site_s,
        t.bytes_per_site_s_max,
        t.gossip_bytes_per_site_s,
        t.anti_entropy_bytes_per_site_s,
        t.cluster_bytes_per_site_s
    );
    let _ = writeln!(
        out,
        "  network: {} lost, {} duplicated, {} reordered, {} cut by {} partitions, {} to down sites ({} crashes); {} gossip duplicates",
        t.lost,
        t.duplicated,
        t.reordered,
        t.partitioned,
        t.partitions,
        t.dest_down,
        t.crashes,
        t.gossip_duplicates
    );
    if report.violations.is_empty() {
        let _ = writeln!(out, "  invariants: all held ({} events)", report.events);
    } else {
        let _ = writeln!(out, "  INVARIANT VIOLATIONS: {}", report.violations.len());
        for (i, v) in report.violations.iter().enumerate() {
            let _ = writeln!(
                out,
                "  - [{}] at t+{} ms{}: {}",
                v.invariant,
                v.at_ms,
                v.site.map_or(String::new(), |s| format!(" site{s}")),
                v.detail
            );
            let _ = writeln!(out, "    replay: {}", v.replay);
            if i == 0 {
                let _ = writeln!(out, "    trace before it:");
                for line in &v.trace {
                    let _ = writeln!(out, "      {line}");
                }
            }
        }
    }
    out
}
