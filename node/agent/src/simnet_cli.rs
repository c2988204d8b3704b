//! `vcfed simnet`: the command line of the simulator (`vcfed-simnet`),
//! which runs the whole federation in one process on a virtual clock and a
//! seeded faulty network, driving the site core exactly as the agent does.
//! See docs/SIMNET.md for the model, the faults, the invariants and how to
//! replay a seed.

// Errors go to stderr for the user; output goes through `outln!`, which
// survives a closed stdout.
#![allow(clippy::print_stderr)]

use std::ops::Range;

use clap::Args;

use vcfed_simnet::{Fault, Options, PlantedBug, minutes, render, run, world};

use crate::time::parse_duration_ms;
use crate::usage::UsageError;

/// Arguments of `vcfed simnet`.
#[derive(Debug, Clone, Args)]
pub struct SimnetArgs {
    /// Number of sites.
    #[arg(long, default_value_t = 20, env = "VCFED_SIMNET_SITES")]
    pub sites: usize,
    /// Seed of the run: the same seed replays the same run.
    #[arg(long, default_value_t = 1, conflicts_with = "seeds")]
    pub seed: u64,
    /// Sweep seeds A..B (B excluded) or A..=B.
    #[arg(long)]
    pub seeds: Option<String>,
    /// Simulated time, e.g. 30m, 2h.
    #[arg(long, default_value = "30m")]
    pub duration: String,
    /// Faults, comma-separated: loss, dup, reorder, partition, crash, skew,
    /// bandwidth, join, leave, gateway, site-loss, or all / none.
    #[arg(long, default_value = "loss,dup,partition,crash,skew")]
    pub faults: String,
    /// Faults stop this long before the end; the invariants that say
    /// "eventually" are checked in this calm.
    #[arg(long, default_value = "10m")]
    pub calm: String,
    /// Cluster requests per site per simulated hour.
    #[arg(long, default_value_t = 6.0)]
    pub requests_per_site_hour: f64,
    /// When a requested window starts, after the request: MIN..MAX.
    #[arg(long, default_value = "1m..20m")]
    pub window_start: String,
    /// How long a requested window is: MIN..MAX.
    #[arg(long, default_value = "5m..1h")]
    pub window_length: String,
    /// Message loss probability (with the `loss` fault).
    #[arg(long, default_value_t = 0.02)]
    pub loss: f64,
    /// Duplication probability (with the `dup` fault).
    #[arg(long, default_value_t = 0.02)]
    pub dup: f64,
    /// Gossip mesh degree.
    #[arg(long, default_value_t = 6)]
    pub mesh_degree: usize,
    /// Most compute nodes one request asks for.
    #[arg(long, default_value_t = 16)]
    pub nodes_max: u32,
    /// Node slots of the largest site (the smallest has 4).
    #[arg(long, default_value_t = 16)]
    pub capacity_max: u32,
    /// Advert refresh period [default: 10s up to 100 sites, then 0.6 s per site].
    #[arg(long)]
    pub advert_refresh: Option<String>,
    /// Anti-entropy period [default: 2s up to 100 sites, then 20 ms per site].
    #[arg(long)]
    pub anti_entropy: Option<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Plant a bug to check that the invariants catch it.
    #[arg(long, hide = true, value_parser = ["commit-without-hold", "leak-vlan", "no-reserve-deadline", "replace-without-fence"])]
    pub plant_bug: Option<String>,
}

impl SimnetArgs {
    /// The run options the arguments describe.
    pub fn options(&self) -> Result<Options, UsageError> {
        let bad = |e: String| UsageError(e);
        if self.sites == 0 || self.sites > 100_000 {
            return Err(bad("--sites must be 1 to 100000".to_owned()));
        }
        let mut options = Options::new(self.sites);
        options.duration_ms = parse_duration_ms(&self.duration).map_err(bad)?;
        options.calm_ms = parse_duration_ms(&self.calm).map_err(bad)?;
        if options.duration_ms <= 0 {
            return Err(bad("--duration must be positive".to_owned()));
        }
        options.faults = Fault::parse_list(&self.faults).map_err(bad)?;
        options.requests_per_site_hour = self.requests_per_site_hour.max(0.0);
        (options.window_start_min_ms, options.window_start_max_ms) =
            parse_duration_range(&self.window_start, "--window-start")?;
        (options.window_length_min_ms, options.window_length_max_ms) =
            parse_duration_range(&self.window_length, "--window-length")?;
        if options.window_length_min_ms <= 0 {
            return Err(bad("--window-length must be positive".to_owned()));
        }
        if !(0.0..=1.0).contains(&self.loss) || !(0.0..=1.0).contains(&self.dup) {
            return Err(bad("--loss and --dup are probabilities (0 to 1)".to_owned()));
        }
        options.loss = self.loss;
        options.dup = self.dup;
        options.mesh_degree = self.mesh_degree.max(1);
        if self.nodes_max == 0 {
            return Err(bad("--nodes-max must be at least 1".to_owned()));
        }
        options.nodes_max = self.nodes_max;
        options.capacity_max = self.capacity_max.clamp(4, 100_000);
        if let Some(refresh) = &self.advert_refresh {
            options.advert_refresh_ms = parse_duration_ms(refresh).map_err(bad)?.max(1_000);
            options.advert_ttl_ms = options.advert_refresh_ms * 3;
        }
        if let Some(anti_entropy) = &self.anti_entropy {
            options.anti_entropy_ms = parse_duration_ms(anti_entropy).map_err(bad)?.max(100);
        }
        options.plant = self
            .plant_bug
            .as_deref()
            .and_then(|name| PlantedBug::ALL.into_iter().find(|p| p.name() == name));
        Ok(options)
    }

    /// The seeds to run.
    pub fn seed_range(&self) -> Result<Range<u64>, UsageError> {
        let Some(text) = &self.seeds else {
            return Ok(self.seed..self.seed + 1);
        };
        parse_seeds(text).ok_or_else(|| {
            UsageError(format!(
                "--seeds {text:?}: write A..B (B excluded) or A..=B"
            ))
        })
    }
}

/// `MIN..MAX` durations, MIN ≤ MAX, neither negative.
fn parse_duration_range(text: &str, flag: &str) -> Result<(i64, i64), UsageError> {
    let bad = || UsageError(format!("{flag} {text:?}: write MIN..MAX, e.g. 1m..20m"));
    let (min, max) = text.split_once("..").ok_or_else(bad)?;
    let min = parse_duration_ms(min.trim()).map_err(|_| bad())?;
    let max = parse_duration_ms(max.trim()).map_err(|_| bad())?;
    if min < 0 || max < min {
        return Err(bad());
    }
    Ok((min, max))
}

fn parse_seeds(text: &str) -> Option<Range<u64>> {
    let (start, end) = text.split_once("..")?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = match end.strip_prefix('=') {
        Some(last) => last.trim().parse::<u64>().ok()?.checked_add(1)?,
        None => end.trim().parse().ok()?,
    };
    (start < end).then_some(start..end)
}

/// `vcfed simnet`: runs the seeds, prints progress on stderr and the
/// reports on stdout; fails if any run broke an invariant.
pub(crate) fn command(args: &SimnetArgs) -> anyhow::Result<()> {
    // The cores log every give-up and re-plan at warn, which under injected
    // faults is thousands of lines; the report says what matters. RUST_LOG
    // brings them back.
    if std::env::var_os("RUST_LOG").is_none() {
        return tracing::subscriber::with_default(
            tracing::subscriber::NoSubscriber::default(),
            || command_inner(args),
        );
    }
    command_inner(args)
}

fn command_inner(args: &SimnetArgs) -> anyhow::Result<()> {
    let options = args.options()?;
    let seeds = args.seed_range()?;
    let sweep = seeds.end - seeds.start > 1;
    let mut reports = Vec::new();
    let mut failing = Vec::new();
    for seed in seeds {
        let mut progress = |p: world::Progress| {
            if !sweep {
                eprintln!(
                    "seed {seed}: {}/{} simulated, {} requests, {} violations",
                    minutes(p.simulated_ms),
                    minutes(p.duration_ms),
                    p.requests,
                    p.violations
                );
            }
        };
        let report = run(&options, seed, &mut progress);
        if sweep {
            eprintln!(
                "seed {seed}: {} violations, {} events, {:.1} s wall, trace {}",
                report.violations.len(),
                report.events,
                report.wall_ms as f64 / 1000.0,
                report.trace_hash
            );
        }
        if !report.violations.is_empty() {
            failing.push(seed);
        }
        if !args.json {
            outln!("{}", render(&report));
        }
        reports.push(report);
    }
    if args.json {
        let json = if reports.len() == 1 {
            serde_json::to_string_pretty(&reports[0])?
        } else {
            serde_json::to_string_pretty(&reports)?
        };
        outln!("{json}");
    }
    if failing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "invariants broken with seeds {failing:?} (each report above has the replay command)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_ranges_parse() {
        assert_eq!(parse_seeds("0..100"), Some(0..100));
        assert_eq!(parse_seeds("5..=7"), Some(5..8));
        assert_eq!(parse_seeds("7..7"), None);
        assert_eq!(parse_seeds("x..2"), None);
    }

    #[test]
    fn fault_lists_parse_and_print() {
        let faults = Fault::parse_list("loss,dup,partition,crash,skew").unwrap();
        assert_eq!(Fault::list(&faults), "loss,dup,partition,crash,skew");
        assert_eq!(Fault::parse_list("all").unwrap().len(), 11);
        assert!(Fault::parse_list("site-loss").is_ok());
        assert_eq!(
            parse_duration_range("1m..20m", "--w").unwrap(),
            (60_000, 1_200_000)
        );
        assert!(parse_duration_range("20m..1m", "--w").is_err());
        assert!(Fault::parse_list("none").unwrap().is_empty());
        assert!(Fault::parse_list("lightning").is_err());
    }
}
