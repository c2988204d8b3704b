//! `vcfed cluster ...`: the cluster commands of the CLI.

// Output goes through `outln!`, which survives a closed stdout; the lint
// `print_stdout` stays on to catch a stray `println!`. Progress and notes go
// to stderr, so that `--json` output stays one document.
#![allow(clippy::print_stderr)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::bail;
use vcfed_storage::{ClusterRecord, ClusterState};

use clap::{Args, Subcommand};

use crate::api_types::{ClusterDetail, CreateClusterBody, InstantArg};
use crate::cli::{ConfigArg, client_for, non_empty, print_json, print_table};
use crate::client::{ApiClient, segment};
use crate::time::{format_instant, now_ms, parse_instant};
use crate::usage::UsageError;
use vcfed_node_core::cluster::Heal;
use vcfed_node_core::words::count;

/// How long `--wait` waits.
const WAIT_MAX: Duration = Duration::from_secs(300);
/// How often `--wait` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// `vcfed cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Ask this site for a cluster; it becomes the master and borrows
    /// nodes from other sites if it has too few.
    Create(ClusterCreateArgs),
    /// List the clusters this site masters or serves.
    List(ListClustersArgs),
    /// Show one cluster with its per-site parts.
    Show(ClusterNameArgs),
    /// Delete a cluster (at its master): releases its nodes at every site.
    Delete(ClusterNameArgs),
}

/// Arguments of `vcfed cluster create`.
#[derive(Debug, Args)]
pub struct ClusterCreateArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Cluster name.
    #[arg(long)]
    name: String,
    /// Compute nodes (the frontend comes on top, at this site).
    #[arg(long)]
    nodes: u32,
    /// Cores per node [default: this site's node slot].
    #[arg(long)]
    cores: Option<u32>,
    /// Memory per node, MiB [default: this site's node slot].
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Disk per node, GiB [default: this site's node slot].
    #[arg(long)]
    disk_gib: Option<u64>,
    /// Start: `now`, `+2h`, RFC 3339 or unix ms.
    #[arg(long, default_value = "now")]
    start: String,
    /// How long the cluster runs, e.g. 2h.
    #[arg(long)]
    duration: String,
    /// Image the nodes install.
    #[arg(long)]
    image: Option<String>,
    /// When a worker site holding some of the nodes is lost (gone from the
    /// federation and silent for `clusters.heal_grace`): `replace` its
    /// nodes at other sites, `shrink` the cluster, or `none` (only record
    /// it). The lost site is cut off from the cluster's network unless
    /// `none`.
    #[arg(long, value_name = "POLICY", default_value = "replace", value_parser = parse_heal)]
    heal: Heal,
    /// Wait until the nodes are reserved (or the request failed), showing
    /// progress; exits non-zero if the cluster failed or was deleted
    /// meanwhile. With --json: the accepted cluster on one line at once,
    /// the settled one on a line at the end.
    #[arg(long)]
    wait: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `vcfed cluster list`.
#[derive(Debug, Args)]
pub struct ListClustersArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Also list finished and failed clusters.
    #[arg(long)]
    all: bool,
    /// List only clusters in these states (repeatable, or a comma list):
    /// requested, reserving, reserved, starting, running, stopping,
    /// finished, failed.
    #[arg(long = "state", value_name = "STATE", value_delimiter = ',', value_parser = parse_state)]
    states: Vec<ClusterState>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// A cluster named by id or name.
#[derive(Debug, Args)]
pub struct ClusterNameArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Cluster name or id.
    name: String,
    /// For delete: wait until every site released its nodes, naming the
    /// sites still waited for.
    #[arg(long)]
    wait: bool,
    /// For delete --wait: how long to wait, e.g. 90s or 10m.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_heal(text: &str) -> Result<Heal, String> {
    Heal::parse(text).ok_or_else(|| {
        let names: Vec<&str> = Heal::ALL.iter().map(|heal| heal.as_str()).collect();
        format!("expected one of {}", names.join(", "))
    })
}

/// Runs a `vcfed cluster` command.
pub(crate) async fn run(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Create(args) => {
            let client = client_for(&args.config)?;
            let start = parse_instant(&args.start, now_ms())
                .map_err(|e| UsageError(format!("--start: {e}")))?;
            let body = CreateClusterBody {
                name: args.name.clone(),
                nodes: args.nodes,
                cores: args.cores,
                memory_mib: args.memory_mib,
                disk_gib: args.disk_gib,
                start: Some(InstantArg::Ms(start)),
                duration: args.duration.clone(),
                image: args.image.clone(),
                heal: Some(args.heal),
            };
            let record: ClusterRecord = client.post("/v1/clusters", &body).await?;
            if !args.wait {
                return show(&record, args.json);
            }
            // The id first, whatever happens next (the master may die
            // while it reserves): with --json, one object per line, the
            // accepted record now and the settled one at the end.
            if args.json {
                outln!("{}", serde_json::to_string(&record)?);
            } else {
                show(&record, false)?;
            }
            let record = wait(&client, &record.id, args.json, |state| {
                state != ClusterState::Reserving
            })
            .await?;
            if args.json {
                outln!("{}", serde_json::to_string(&record)?);
            }
            match record.state {
                ClusterState::Failed => bail!(
                    "cluster {} failed: {}",
                    record.name,
                    record.reason.as_deref().unwrap_or("no reason given")
                ),
                ClusterState::Stopping | ClusterState::Finished => bail!(
                    "cluster {} ({}) was deleted before its nodes were reserved; it is {}",
                    record.name,
                    record.id,
                    record.state
                ),
                _ => Ok(()),
            }
        }
        ClusterCommand::List(args) => {
            let client = client_for(&args.config)?;
            let all: Vec<ClusterRecord> = client.get("/v1/clusters").await?;
            let total = all.len();
            let clusters: Vec<ClusterRecord> = all
                .into_iter()
                .filter(|c| listed(c.state, args.all, &args.states))
                .collect();
            if args.json {
                return print_json(&clusters);
            }
            let hidden = total - clusters.len();
            if hidden > 0 && args.states.is_empty() {
                eprintln!(
                    "({} finished or failed not shown; --all lists them)",
                    count(u64::try_from(hidden).unwrap_or(u64::MAX), "cluster")
                );
            }
            let mut rows = vec![
                [
                    "NAME", "ID", "STATE", "MASTER", "NODES", "SITES", "START", "END",
                ]
                .map(str::to_owned)
                .to_vec(),
            ];
            for cluster in &clusters {
                let live: Vec<_> = cluster
                    .parts
                    .iter()
                    .filter(|p| p.state != vcfed_storage::PartState::Released)
                    .collect();
                let mut sites: Vec<&str> = live.iter().map(|p| p.site.as_str()).collect();
                sites.dedup();
                let (start, end) = window_of(cluster);
                rows.push(vec![
                    cluster.name.clone(),
                    cluster.id.clone(),
                    cluster.state.to_string(),
                    cluster.master_site.clone(),
                    live.iter().map(|p| p.nodes).sum::<u32>().to_string(),
                    sites.join(","),
                    start,
                    end,
                ]);
            }
            print_table(&rows);
            Ok(())
        }
        ClusterCommand::Show(args) => {
            let name = non_empty(&args.name, "the cluster name or id")?;
            let client = client_for(&args.config)?;
            let detail: ClusterDetail = client
                .get(&format!("/v1/clusters/{}", segment(name)))
                .await?;
            show_detail(&detail, args.json)
        }
        ClusterCommand::Delete(args) => {
            let name = non_empty(&args.name, "the cluster name or id")?;
            let client = client_for(&args.config)?;
            let record: ClusterRecord = client
                .call(
                    hyper::Method::DELETE,
                    &format!("/v1/clusters/{}", segment(name)),
                    None::<&()>,
                )
                .await?;
            if !args.wait || record.state.is_terminal() {
                return show(&record, args.json);
            }
            let record = wait_released(&client, &record.id, args.timeout).await?;
            show(&record, args.json)
        }
    }
}

/// Polls the cluster until `done(state)`, printing each change of its parts.
async fn wait(
    client: &ApiClient,
    id: &str,
    quiet: bool,
    done: impl Fn(ClusterState) -> bool,
) -> anyhow::Result<ClusterRecord> {
    let started = Instant::now();
    let mut last: Option<ClusterRecord> = None;
    loop {
        let record: ClusterRecord = client.get(&format!("/v1/clusters/{}", segment(id))).await?;
        let changed = last
            .as_ref()
            .is_none_or(|l| l.state != record.state || l.parts != record.parts);
        if changed && !quiet {
            outln!(
                "[{:>5.1}s] {}",
                started.elapsed().as_secs_f64(),
                progress_line(&record)
            );
        }
        if done(record.state) {
            return Ok(record);
        }
        if started.elapsed() > WAIT_MAX {
            bail!(
                "cluster {id} is still {} after {}s; `vcfed cluster show {id}` follows it",
                record.state,
                WAIT_MAX.as_secs()
            );
        }
        last = Some(record);
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls a deleted cluster until it is over, naming on stderr the sites
/// that still hold parts of it each time that set changes; after `timeout`,
/// fails naming them.
async fn wait_released(
    client: &ApiClient,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<ClusterRecord> {
    let started = Instant::now();
    let mut last_holding: Option<Vec<String>> = None;
    loop {
        let record: ClusterRecord = client.get(&format!("/v1/clusters/{}", segment(id))).await?;
        if record.state.is_terminal() {
            return Ok(record);
        }
        let holding = sites_holding(&record);
        if last_holding.as_ref() != Some(&holding) {
            eprintln!(
                "[{:>5.1}s] {} is {}; waiting for {} to release: {}",
                started.elapsed().as_secs_f64(),
                record.name,
                record.state,
                count(u64::try_from(holding.len()).unwrap_or(u64::MAX), "site"),
                holding.join(", ")
            );
            last_holding = Some(holding.clone());
        }
        if started.elapsed() >= timeout {
            bail!(
                "cluster {} is still {} after {}: {} still {} parts of it ({}); \
                 `vcfed cluster show {id}` follows it",
                record.name,
                record.state,
                humantime::format_duration(timeout),
                count(u64::try_from(holding.len()).unwrap_or(u64::MAX), "site"),
                if holding.len() == 1 { "holds" } else { "hold" },
                holding.join(", ")
            );
        }
        tokio::time::sleep(POLL_INTERVAL.min(timeout.saturating_sub(started.elapsed()))).await;
    }
}

/// The sites that still hold a part of `record`, sorted, each once.
fn sites_holding(record: &ClusterRecord) -> Vec<String> {
    let sites: std::collections::BTreeSet<&str> = record
        .parts
        .iter()
        .filter(|p| p.state != vcfed_storage::PartState::Released)
        .map(|p| p.site.as_str())
        .collect();
    sites.into_iter().map(str::to_owned).collect()
}

/// Every cluster state, for `--state` and its error.
const CLUSTER_STATES: [ClusterState; 8] = [
    ClusterState::Requested,
    ClusterState::Reserving,
    ClusterState::Reserved,
    ClusterState::Starting,
    ClusterState::Running,
    ClusterState::Stopping,
    ClusterState::Finished,
    ClusterState::Failed,
];

/// A `--state` value; clap turns the error into a usage error (exit 2).
fn parse_state(text: &str) -> Result<ClusterState, String> {
    CLUSTER_STATES
        .into_iter()
        .find(|state| state.as_str() == text.trim())
        .ok_or_else(|| {
            let valid: Vec<&str> = CLUSTER_STATES.iter().map(|s| s.as_str()).collect();
            format!(
                "unknown state {text:?}; the states are {}",
                valid.join(", ")
            )
        })
}

/// Whether `cluster list` shows a cluster in `state`: the states asked for,
/// or without any, the clusters that are not over (all of them with
/// `--all`).
fn listed(state: ClusterState, all: bool, states: &[ClusterState]) -> bool {
    if !states.is_empty() {
        return states.contains(&state);
    }
    all || !state.is_terminal()
}

pub(crate) fn progress_line(record: &ClusterRecord) -> String {
    let parts: Vec<String> = record
        .parts
        .iter()
        .map(|p| {
            format!(
                "{}:{}{} {}",
                p.site,
                p.nodes,
                if p.frontend { "+fe" } else { "" },
                p.state
            )
        })
        .collect();
    format!("{} — {}", record.state, parts.join(", "))
}

fn window_of(record: &ClusterRecord) -> (String, String) {
    let window = &record.request["window"];
    let at = |key: &str| {
        window[key]
            .as_i64()
            .map(format_instant)
            .unwrap_or_else(|| "-".to_owned())
    };
    (at("start_ms"), at("end_ms"))
}

/// Prints a cluster with its parts, its network at this site and its nodes.
pub(crate) fn show_detail(detail: &ClusterDetail, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(detail);
    }
    show(&detail.record, false)?;
    if let Some(network) = &detail.network {
        outln!();
        let bridge = match (&network.bridge, &network.error) {
            (Some(bridge), _) => bridge.clone(),
            (None, Some(error)) => format!("not set up: {error}"),
            (None, None) => "being set up".to_owned(),
        };
        match network.vlan {
            Some(vlan) => outln!(
                "network  VLAN {vlan} here, segment {:#010x}, bridge {bridge}",
                network.segment
            ),
            None => outln!("network  {bridge}"),
        }
        for tunnel in &network.tunnels {
            outln!(
                "tunnel   {} ({}) {}",
                tunnel.site,
                tunnel.endpoint.as_deref().unwrap_or("no gateway endpoint"),
                if tunnel.up { "up" } else { "down" }
            );
        }
    }
    if !detail.nodes.is_empty() {
        outln!();
        let mut rows = vec![
            ["NODE", "SITE", "ROLE", "STATE", "ADDRESS", "SERVER"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for node in &detail.nodes {
            let field = |key: &str| {
                node.state[key]
                    .as_str()
                    .map_or_else(|| "-".to_owned(), str::to_owned)
            };
            let state = match (node.state["reason"].as_str(), node.state["bytes"].as_u64()) {
                (Some(reason), _) => format!("{}: {reason}", field("state")),
                (None, Some(bytes)) => format!("{} ({} MiB)", field("state"), bytes >> 20),
                (None, None) => field("state"),
            };
            rows.push(vec![
                node.index.to_string(),
                node.site.clone(),
                if node.frontend { "frontend" } else { "compute" }.to_owned(),
                state,
                field("ip"),
                field("server"),
            ]);
        }
        print_table(&rows);
    }
    Ok(())
}

/// Prints a cluster with its parts.
pub(crate) fn show(record: &ClusterRecord, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(record);
    }
    let (start, end) = window_of(record);
    let nodes = record.request["nodes"].as_u64().unwrap_or(0);
    outln!("cluster  {} ({})", record.name, record.id);
    match &record.reason {
        Some(reason) => outln!("state    {} — {reason}", record.state),
        None => outln!("state    {}", record.state),
    }
    outln!("master   {} (hosts the frontend)", record.master_site);
    outln!("window   {start} .. {end}");
    outln!("nodes    {nodes}");
    let heal = record.request["heal"].as_str().unwrap_or("replace");
    let lost: Vec<&vcfed_storage::ClusterPart> = record
        .parts
        .iter()
        .filter(|p| p.lost_at_ms.is_some())
        .collect();
    if lost.is_empty() {
        outln!("heal     {heal}");
    } else {
        let live: u64 = record
            .parts
            .iter()
            .filter(|p| p.lost_at_ms.is_none() && vcfed_node_core::lifecycle::in_cluster(p.state))
            .map(|p| u64::from(p.nodes))
            .sum();
        let sites: BTreeSet<&str> = lost.iter().map(|p| p.site.as_str()).collect();
        let sites: Vec<&str> = sites.into_iter().collect();
        let how = match heal {
            "replace" if live >= nodes => "its nodes were replaced".to_owned(),
            "replace" => format!(
                "short of {} until room is found",
                count(nodes - live, "node")
            ),
            "shrink" => format!("goes on with {}", count(live, "compute node")),
            _ => "its part stays (heal none)".to_owned(),
        };
        outln!(
            "heal     {heal}: lost {} (gone and silent); {how}; membership epoch {}",
            sites.join(", "),
            record.epoch
        );
    }
    let mut rows = vec![
        [
            "SITE", "NODES", "NUMBERS", "FRONTEND", "ATTEMPT", "STATE", "LOST",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for part in &record.parts {
        let numbers = match part.first_node {
            Some(first) if part.nodes > 0 => format!("{first}-{}", first + part.nodes - 1),
            _ => "-".to_owned(),
        };
        rows.push(vec![
            part.site.clone(),
            part.nodes.to_string(),
            numbers,
            if part.frontend {
                "yes".to_owned()
            } else {
                String::new()
            },
            part.attempt.to_string(),
            part.state.to_string(),
            part.lost_at_ms.map_or_else(String::new, format_instant),
        ]);
    }
    print_table(&rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_hides_clusters_that_are_over_unless_asked() {
        for state in CLUSTER_STATES {
            assert_eq!(listed(state, false, &[]), !state.is_terminal(), "{state}");
            assert!(listed(state, true, &[]), "{state}");
        }
        let asked = [ClusterState::Failed, ClusterState::Running];
        assert!(listed(ClusterState::Failed, false, &asked));
        assert!(!listed(ClusterState::Finished, true, &asked));
    }

    #[test]
    fn an_unknown_state_lists_the_valid_ones() {
        assert_eq!(parse_state("failed"), Ok(ClusterState::Failed));
        let err = parse_state("done").unwrap_err();
        assert!(err.contains("unknown state \"done\""), "{err}");
        assert!(err.contains("requested, reserving, reserved"), "{err}");
    }
}
