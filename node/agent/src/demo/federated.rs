//! The federated demo: three sites in network namespaces, a cluster larger
//! than the site it is asked of, and every step of its start until each
//! node has installed from the master's frontend across the tunnels.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use vcfed_storage::{ClusterState, PartState};

use super::federation::{DemoDriver, DemoFederation, DemoSpec};
use super::{DemoArgs, step};
use crate::api_types::ClusterDetail;
use crate::cli::print_table;
use crate::client::ApiClient;
use crate::federation::SitesReport;

/// Compute nodes the demo asks for (the first site has 2 slots).
pub const DEMO_CLUSTER_NODES: u32 = 6;
/// Compute nodes `--heal` asks for: the master keeps 1, one worker takes 3,
/// and the other worker (3 slots) has room for all of them.
pub const HEAL_CLUSTER_NODES: u32 = 4;
/// `clusters.heal_grace` of the `--heal` demo's sites (the shortest allowed).
const HEAL_GRACE: &str = "10s";
/// How long `--heal` waits for the lost site's nodes to be replaced and up.
const HEAL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the demo waits for the cluster to come up (namespaces).
const UP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the demo waits for the cluster to come up (VMs under software
/// emulation: firmware, then iPXE's DHCP and TFTP, on few cores).
const UP_TIMEOUT_VMS: Duration = Duration::from_secs(300);
/// How long the demo waits for gossip and for teardown.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the demo polls the sites.
const POLL: Duration = Duration::from_millis(100);

/// What the federated demo did, as `--report` writes it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DemoReport {
    /// The sites, in order (the first is the master).
    pub sites: Vec<String>,
    /// The cluster's id.
    pub cluster: String,
    /// The frontend's address.
    pub frontend_ip: Option<String>,
    /// Every node as the demo last saw it.
    pub nodes: Vec<ReportNode>,
    /// Seconds from the command's start to the end of each phase.
    pub phases: Vec<(String, f64)>,
    /// What was left after teardown (nothing, normally).
    pub left_behind: Vec<String>,
    /// With `--heal`: the lost worker site and what came of it.
    #[serde(default)]
    pub heal: Option<HealReport>,
}

/// What `vcfed demo --heal` saw, seconds from the site's loss.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HealReport {
    /// The worker site that was lost.
    pub lost_site: String,
    /// The numbers of its nodes.
    pub lost_nodes: Vec<u32>,
    /// The site its nodes were replaced at.
    pub replaced_at: String,
    /// The numbers of the replacement nodes.
    pub replacement_nodes: Vec<u32>,
    /// The master declared the site lost and fenced its part.
    pub fenced_after_s: Option<f64>,
    /// The master's record at full size again (replacements committed).
    pub committed_after_s: Option<f64>,
    /// Every replacement node installed from the frontend.
    pub installed_after_s: Option<f64>,
    /// The lost site, back, stopped its nodes and freed its VLAN id.
    pub stood_down_after_s: Option<f64>,
}

/// One node of [`DemoReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportNode {
    /// Node number.
    pub index: u32,
    /// The site it runs at.
    pub site: String,
    /// Whether it is the frontend.
    pub frontend: bool,
    /// Its state: serving, booting, leased, installed or failed.
    pub state: String,
    /// Its address.
    pub ip: Option<String>,
    /// The DHCP/TFTP server it booted from.
    pub server: Option<String>,
    /// Seconds from the cluster's start (every part committed) to the
    /// node installed.
    #[serde(default)]
    pub installed_after_s: Option<f64>,
    /// Bytes of the OS its install wrote (the built-in installer).
    #[serde(default)]
    pub bytes: Option<u64>,
    /// Seconds from the cluster's start to the node up from its own disk.
    #[serde(default)]
    pub up_after_s: Option<f64>,
}

/// Runs the federated demo.
pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (dir, remove_after) = super::demo_dir(args);
    let mut report = DemoReport::default();
    // Ctrl-C drops the tour, and with it the federation, which tears down.
    let result = tokio::select! {
        result = tour(args, &dir, started, &mut report) => result,
        () = crate::agent::termination_signal() => Err(anyhow::anyhow!("interrupted; the demo federation was removed")),
    };
    if let Some(path) = &args.report {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if remove_after {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result?;
    outln!("\ndemo finished in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Seconds since the start, for the progress lines.
fn at(started: Instant) -> String {
    format!("[{:>5.1}s]", started.elapsed().as_secs_f64())
}

async fn tour(
    args: &DemoArgs,
    dir: &Path,
    started: Instant,
    report: &mut DemoReport,
) -> anyhow::Result<()> {
    let spec = DemoSpec {
        driver: args.driver,
        heal_grace: args.heal.then_some(HEAL_GRACE),
        ..DemoSpec::instance(args.instance)
    };
    let cluster_nodes = if args.heal {
        HEAL_CLUSTER_NODES
    } else {
        DEMO_CLUSTER_NODES
    };

    step(&format!(
        "build 3 sites, each a network namespace joined by a veth WAN (198.18.{}.0/24)",
        spec.wan_octet
    ));
    let mut federation = DemoFederation::build(spec.clone(), dir)?;
    let mut rows = vec![
        ["SITE", "NAMESPACE", "WAN ADDRESS", "NODE SLOTS"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for (site, nodes) in federation.sites.iter().zip(&spec.nodes) {
        rows.push(vec![
            site.name.clone(),
            site.netns.clone(),
            site.ip.to_string(),
            nodes.to_string(),
        ]);
    }
    print_table(&rows);
    report.sites = federation.sites.iter().map(|s| s.name.clone()).collect();

    step(match spec.driver {
        DemoDriver::Netns => {
            "start an agent per site (ledger, federation, API, gateway, netns driver)"
        }
        DemoDriver::Libvirt => {
            "start an agent per site (ledger, federation, API, gateway, libvirt driver: nodes are VMs)"
        }
    });
    let mut clients = Vec::new();
    for index in 0..federation.sites.len() {
        federation.start_agent(index)?;
        let client = federation.sites[index].client()?;
        super::local::wait_ready(&client)
            .await
            .with_context(|| format!("see {}", federation.sites[index].log_path.display()))?;
        clients.push(client);
    }
    outln!("{} 3 agents up", at(started));

    step("gossip: every site learns every site's free capacity");
    let count = federation.sites.len();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let mut complete = true;
        for client in &clients {
            let view: SitesReport = client.get("/v1/sites").await?;
            let alive = view
                .sites
                .iter()
                .filter(|s| s.state == vcfed_registry::SiteState::Alive)
                .count();
            complete &= alive == count;
        }
        if complete {
            break;
        }
        if Instant::now() > deadline {
            bail!("the sites did not all see each other within {STEP_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    let view: SitesReport = clients[0].get("/v1/sites").await?;
    let seen: Vec<String> = view
        .sites
        .iter()
        .map(|s| format!("{} ({} free)", s.name, s.free_now))
        .collect();
    outln!(
        "{} gossip view complete at every site: {}",
        at(started),
        seen.join(", ")
    );
    report_phase(report, started, "gossip view complete");

    let master = &federation.sites[0].name;
    step(&format!(
        "ask {master} for a cluster of {cluster_nodes} nodes: more than its {} slots",
        spec.nodes[0]
    ));
    let created: ClusterDetail = clients[0]
        .post(
            "/v1/clusters",
            &serde_json::json!({
                "name": "demo",
                "nodes": cluster_nodes,
                "duration": "1h",
            }),
        )
        .await?;
    let id = created.record.id.clone();
    report.cluster = id.clone();
    outln!(
        "{} {master} is the master of {id}: it keeps the frontend and what fits, and asks the others",
        at(started)
    );

    let up_timeout = match spec.driver {
        DemoDriver::Netns => UP_TIMEOUT,
        DemoDriver::Libvirt => UP_TIMEOUT_VMS,
    };
    // VMs install their disk and boot from it when the frontend serves the
    // built-in installer (this machine has a kernel, busybox-static and
    // extlinux); otherwise they fetch the install file, as namespaces do.
    let done_state = if spec.driver == DemoDriver::Libvirt
        && crate::driver::installer::InstallerSource::find(None).is_ok()
    {
        "up"
    } else {
        "installed"
    };
    follow(
        &federation,
        &clients,
        &id,
        (cluster_nodes, done_state),
        started,
        up_timeout,
        report,
    )
    .await?;
    let total = started.elapsed().as_secs_f64();
    print_summary(report, total);
    // What the demo is for: nodes at every site booted from the master.
    let frontend = report.frontend_ip.clone();
    if let Some(stray) = report
        .nodes
        .iter()
        .find(|n| !n.frontend && n.server != frontend)
    {
        bail!(
            "node {} at {} booted from {:?}, not from the frontend {frontend:?}",
            stray.index,
            stray.site,
            stray.server
        );
    }

    if args.heal {
        heal_tour(
            &mut federation,
            &mut clients,
            &id,
            cluster_nodes,
            started,
            report,
        )
        .await?;
    }

    if args.keep {
        step("the federation keeps running; try (as root):");
        for site in &federation.sites {
            outln!(
                "  vcfed cluster show demo --config {}",
                site.config_path.display()
            );
        }
        outln!(
            "  vcfed sites --config {}",
            federation.sites[0].config_path.display()
        );
        outln!("  ip netns list        # the sites, the WAN and every node");
        let down = match args.instance {
            0 => "vcfed demo --down".to_owned(),
            n => format!("vcfed demo --down --instance {n}"),
        };
        outln!("press Ctrl-C here, or run `{down}` elsewhere, to remove everything");
        outln!("(site files stay in {})", dir.display());
        crate::agent::termination_signal().await;
    } else {
        step("delete the cluster: every site stops its nodes and frees its VLAN id");
        let deleted_at = Instant::now();
        let _: serde_json::Value = clients[0]
            .call(
                hyper::Method::DELETE,
                &format!("/v1/clusters/{}", crate::client::segment(&id)),
                None::<&()>,
            )
            .await?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        'wait: loop {
            for client in &clients {
                let detail: ClusterDetail = client
                    .get(&format!("/v1/clusters/{}", crate::client::segment(&id)))
                    .await?;
                if !detail.record.state.is_terminal() || detail.network.is_some() {
                    if Instant::now() > deadline {
                        bail!("the cluster is not torn down everywhere within {STEP_TIMEOUT:?}");
                    }
                    tokio::time::sleep(POLL).await;
                    continue 'wait;
                }
            }
            break;
        }
        outln!(
            "{} finished at every site in {:.1}s",
            at(started),
            deleted_at.elapsed().as_secs_f64()
        );
        // The gateways drop the segments just after the runners stop.
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left: Vec<String> = (0..federation.sites.len())
                .flat_map(|index| federation.cluster_leftovers(index))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the cluster left behind: {}", left.join(", "));
            }
            tokio::time::sleep(POLL).await;
        }
        outln!(
            "{} no node, segment bridge or TAP left at any site; VLAN ids back in the pools",
            at(started)
        );
    }

    step("remove the federation: agents, namespaces, links");
    let left = federation.teardown();
    report.left_behind = left.clone();
    if !left.is_empty() {
        bail!("left behind: {}", left.join(", "));
    }
    outln!("{} nothing left behind", at(started));
    Ok(())
}

/// Follows the cluster from the request until every node is up, printing
/// each step as it happens.
async fn follow(
    federation: &DemoFederation,
    clients: &[ApiClient],
    id: &str,
    (cluster_nodes, done_state): (u32, &str),
    started: Instant,
    up_timeout: Duration,
    report: &mut DemoReport,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + up_timeout;
    let mut last_parts = String::new();
    let mut reserved = false;
    let mut committed_at = None;
    let mut tunnels_up = false;
    let mut frontend_up = false;
    let mut nodes: BTreeMap<u32, ReportNode> = BTreeMap::new();
    loop {
        // The master shows every node: the workers report theirs to it.
        let at_master: ClusterDetail = clients[0]
            .get(&format!("/v1/clusters/{}", crate::client::segment(id)))
            .await?;
        let record = &at_master.record;
        if record.state == ClusterState::Failed {
            bail!(
                "the cluster failed: {}",
                record.reason.as_deref().unwrap_or("no reason given")
            );
        }
        let parts = crate::cluster_cli::progress_line(record);
        if parts != last_parts {
            outln!("{} {parts}", at(started));
            last_parts = parts;
        }
        let committed = !record.parts.is_empty()
            && record
                .parts
                .iter()
                .all(|p| matches!(p.state, PartState::Committed | PartState::Released));
        if !reserved && committed && record.state != ClusterState::Reserving {
            reserved = true;
            committed_at = Some(Instant::now());
            let holders: Vec<String> = record
                .parts
                .iter()
                .filter(|p| p.state == PartState::Committed)
                .map(|p| format!("{} {}", p.site, p.nodes))
                .collect();
            outln!(
                "{} committed everywhere: {} (+ the frontend at the master)",
                at(started),
                holders.join(", ")
            );
            report_phase(report, started, "reserved and committed");
        }
        if !tunnels_up
            && let Some(network) = &at_master.network
            && !network.tunnels.is_empty()
            && network.tunnels.iter().all(|t| t.up)
        {
            tunnels_up = true;
            let peers: Vec<&str> = network.tunnels.iter().map(|t| t.site.as_str()).collect();
            outln!(
                "{} tunnels up: {} ⇄ {} (WireGuard, segment {:#010x}, VLAN {} at {})",
                at(started),
                federation.sites[0].name,
                peers.join(", "),
                network.segment,
                network.vlan.unwrap_or_default(),
                federation.sites[0].name
            );
            report_phase(report, started, "tunnels up");
        }
        for node in &at_master.nodes {
            let field = |key: &str| node.state[key].as_str().map(str::to_owned);
            let seen = ReportNode {
                index: node.index,
                site: node.site.clone(),
                frontend: node.frontend,
                state: field("state").unwrap_or_default(),
                ip: field("ip"),
                server: field("server"),
                installed_after_s: None,
                bytes: node.state["bytes"].as_u64(),
                up_after_s: None,
            };
            let known = nodes.get(&node.index);
            let mut seen = seen;
            // The bytes an install wrote, and the server it installed
            // from, stay with the node after it (`up` names neither).
            seen.bytes = seen.bytes.or(known.and_then(|k| k.bytes));
            seen.server = seen.server.or(known.and_then(|k| k.server.clone()));
            if known.is_some_and(|known| {
                (&known.state, &known.ip, &known.server, known.bytes)
                    == (&seen.state, &seen.ip, &seen.server, seen.bytes)
            }) {
                continue;
            }
            let since_start = committed_at.map(|at: Instant| at.elapsed().as_secs_f64());
            seen.installed_after_s = known.and_then(|k| k.installed_after_s);
            seen.up_after_s = known.and_then(|k| k.up_after_s);
            if seen.state == "installed" {
                seen.installed_after_s = since_start;
            }
            if seen.state == "up" {
                seen.up_after_s = since_start;
            }
            announce(&seen, started);
            if seen.state == "failed" {
                let log = federation
                    .sites
                    .iter()
                    .find(|s| s.name == seen.site)
                    .map(|s| s.log_path.display().to_string())
                    .unwrap_or_default();
                bail!(
                    "node {} at {} failed: {}; see {log}",
                    seen.index,
                    seen.site,
                    field("reason").unwrap_or_default(),
                );
            }
            if seen.frontend && seen.state == "serving" && !frontend_up {
                frontend_up = true;
                report.frontend_ip = seen.ip.clone();
                report_phase(report, started, "frontend up");
            }
            nodes.insert(node.index, seen);
        }
        report.nodes = nodes.values().cloned().collect();
        let installed = nodes
            .values()
            .filter(|n| !n.frontend && n.state == done_state)
            .count();
        if frontend_up && installed == cluster_nodes as usize {
            report_phase(
                report,
                started,
                if done_state == "up" {
                    "all nodes installed and up from disk"
                } else {
                    "all nodes installed"
                },
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {installed} of {cluster_nodes} nodes installed within {up_timeout:?}; \
                 the agents' logs are agent.log in each site's directory"
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `--heal`: loses the worker site that holds the most nodes, follows the
/// master as it fences the site and replaces its nodes at the other worker,
/// then brings the site back and follows it standing down.
async fn heal_tour(
    federation: &mut DemoFederation,
    clients: &mut [ApiClient],
    id: &str,
    cluster_nodes: u32,
    started: Instant,
    report: &mut DemoReport,
) -> anyhow::Result<()> {
    let path = format!("/v1/clusters/{}", crate::client::segment(id));
    let detail: ClusterDetail = clients[0].get(&path).await?;
    let victim_part = detail
        .record
        .parts
        .iter()
        .filter(|p| !p.frontend && p.state == PartState::Committed)
        .max_by_key(|p| p.nodes)
        .context("the cluster has no worker part")?;
    let victim_name = victim_part.site.clone();
    let victim = federation
        .sites
        .iter()
        .position(|s| s.name == victim_name)
        .context("the worker is a demo site")?;
    let master = federation.sites[0].name.clone();
    let mut heal = HealReport {
        lost_site: victim_name.clone(),
        lost_nodes: detail
            .nodes
            .iter()
            .filter(|n| n.site == victim_name)
            .map(|n| n.index)
            .collect(),
        ..HealReport::default()
    };
    step(&format!(
        "lose {victim_name}: kill its agent (SIGKILL) and cut its WAN link, its {} nodes with it",
        heal.lost_nodes.len()
    ));
    federation.kill_agent(victim);
    federation.cut_site(victim)?;
    let lost_at = Instant::now();
    report_phase(report, started, "worker site lost");
    outln!(
        "{} {victim_name} is gone; {master} waits until it is gone from its gossip view and \
         silent for heal_grace ({HEAL_GRACE}) before it acts",
        at(started)
    );
    let frontend = report.frontend_ip.clone();
    let mut announced: BTreeMap<u32, String> = BTreeMap::new();
    let deadline = Instant::now() + HEAL_TIMEOUT;
    loop {
        let detail: ClusterDetail = clients[0].get(&path).await?;
        let record = &detail.record;
        let since = lost_at.elapsed().as_secs_f64();
        let fenced = record
            .parts
            .iter()
            .any(|p| p.site == victim_name && p.lost_at_ms.is_some());
        if fenced && heal.fenced_after_s.is_none() {
            heal.fenced_after_s = Some(since);
            let tunnel_gone = detail
                .network
                .as_ref()
                .is_some_and(|n| n.tunnels.iter().all(|t| t.site != victim_name));
            outln!(
                "{} {master} declared {victim_name} lost {since:.1}s after the loss and fenced it: \
                 its part released, membership epoch {}{}",
                at(started),
                record.epoch,
                if tunnel_gone {
                    format!(", no tunnel to {victim_name} in the segment any more")
                } else {
                    String::new()
                }
            );
            report_phase(report, started, "lost site fenced");
        }
        let replacements: Vec<&vcfed_storage::ClusterPart> = record
            .parts
            .iter()
            .filter(|p| !p.frontend && p.site != victim_name && p.lost_at_ms.is_none())
            .filter(|p| {
                p.first_node
                    .is_some_and(|first| heal.lost_nodes.iter().all(|&n| n < first))
            })
            .collect();
        let live: u32 = record
            .parts
            .iter()
            .filter(|p| p.lost_at_ms.is_none() && p.state == PartState::Committed)
            .map(|p| p.nodes)
            .sum();
        if fenced && live >= cluster_nodes && heal.committed_after_s.is_none() {
            heal.committed_after_s = Some(since);
            heal.replaced_at = replacements
                .iter()
                .map(|p| p.site.clone())
                .collect::<Vec<_>>()
                .join(", ");
            heal.replacement_nodes = replacements
                .iter()
                .flat_map(|p| {
                    let first = p.first_node.unwrap_or_default();
                    first..first + p.nodes
                })
                .collect();
            outln!(
                "{} replacement committed at {}: nodes {:?} (new numbers and MACs), the cluster \
                 at full size again {since:.1}s after the loss",
                at(started),
                heal.replaced_at,
                heal.replacement_nodes
            );
            report_phase(report, started, "replacement committed");
        }
        for node in detail
            .nodes
            .iter()
            .filter(|n| heal.replacement_nodes.contains(&n.index))
        {
            let state = node.state["state"].as_str().unwrap_or("?").to_owned();
            if announced.get(&node.index) != Some(&state) {
                let server = node.state["server"].as_str().unwrap_or("?");
                outln!(
                    "{} node {} at {}: {state}{}",
                    at(started),
                    node.index,
                    node.site,
                    if state == "installed" {
                        format!(" from {server}, across the tunnel")
                    } else {
                        String::new()
                    }
                );
                if state == "failed" {
                    bail!("replacement node {} failed: {}", node.index, node.state);
                }
                announced.insert(node.index, state);
            }
        }
        let installed: Vec<&vcfed_storage::NodeRecord> = detail
            .nodes
            .iter()
            .filter(|n| heal.replacement_nodes.contains(&n.index))
            .filter(|n| n.state["state"] == "installed" || n.state["state"] == "up")
            .collect();
        if !heal.replacement_nodes.is_empty() && installed.len() == heal.replacement_nodes.len() {
            if let Some(stray) = installed
                .iter()
                .find(|n| n.state["server"].as_str().map(str::to_owned) != frontend)
            {
                bail!(
                    "replacement node {} booted from {}, not from the frontend {frontend:?}",
                    stray.index,
                    stray.state["server"]
                );
            }
            heal.installed_after_s = Some(since);
            outln!(
                "{} every replacement node installed from the frontend {since:.1}s after the loss",
                at(started)
            );
            report_phase(report, started, "replacement nodes installed");
            break;
        }
        if Instant::now() > deadline {
            report.heal = Some(heal);
            bail!(
                "the cluster was not whole again within {HEAL_TIMEOUT:?} of losing {victim_name}; \
                 see {}",
                federation.sites[0].log_path.display()
            );
        }
        tokio::time::sleep(POLL).await;
    }

    step(&format!(
        "bring {victim_name} back: reconnect its WAN link and restart its agent"
    ));
    federation.reconnect_site(victim)?;
    federation.start_agent(victim)?;
    super::local::wait_ready(&clients[victim])
        .await
        .with_context(|| format!("see {}", federation.sites[victim].log_path.display()))?;
    let deadline = Instant::now() + STEP_TIMEOUT + STEP_TIMEOUT;
    loop {
        let detail: ClusterDetail = clients[victim].get(&path).await?;
        let left = federation.cluster_leftovers(victim);
        if detail.record.state.is_terminal() && detail.network.is_none() && left.is_empty() {
            let since = lost_at.elapsed().as_secs_f64();
            heal.stood_down_after_s = Some(since);
            outln!(
                "{} {victim_name} learnt from {master} that its part is released and stood down: \
                 it stopped its nodes and freed their VLAN id and slots (the cluster is {} there)",
                at(started),
                detail.record.state
            );
            report_phase(report, started, "lost site stood down");
            break;
        }
        if Instant::now() > deadline {
            report.heal = Some(heal);
            bail!(
                "{victim_name} did not stand down after it came back (left: {}); see {}",
                left.join(", "),
                federation.sites[victim].log_path.display()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let detail: ClusterDetail = clients[0].get(&path).await?;
    outln!();
    crate::cluster_cli::show(&detail.record, false)?;
    report.heal = Some(heal);
    Ok(())
}

fn report_phase(report: &mut DemoReport, started: Instant, name: &str) {
    report
        .phases
        .push((name.to_owned(), started.elapsed().as_secs_f64()));
}

fn announce(node: &ReportNode, started: Instant) {
    let what = match (node.frontend, node.state.as_str()) {
        (true, "serving") => format!(
            "frontend up at {}: dnsmasq serves DHCP and TFTP",
            node.ip.as_deref().unwrap_or("?")
        ),
        (_, "booting") => "booting (network boot: DHCP, then TFTP)".to_owned(),
        (false, "installing") => format!(
            "installing: {} MiB of the OS written from {}",
            node.bytes.unwrap_or_default() >> 20,
            node.server.as_deref().unwrap_or("?")
        ),
        (false, "installed") if node.bytes.is_some() => format!(
            "installed: its disk written ({} MiB from {}), {:.1}s after the cluster's start; rebooting",
            node.bytes.unwrap_or_default() >> 20,
            node.server.as_deref().unwrap_or("?"),
            node.installed_after_s.unwrap_or_default()
        ),
        (false, "up") => format!(
            "up from its own disk at {}, {:.1}s after the cluster's start",
            node.ip.as_deref().unwrap_or("?"),
            node.up_after_s.unwrap_or_default()
        ),
        (false, "installed") if node.server.is_some() && node.installed_after_s.is_some() => {
            format!(
                "installed: fetched install.cfg over TFTP from {}, {:.1}s after the cluster's start",
                node.server.as_deref().unwrap_or("?"),
                node.installed_after_s.unwrap_or_default()
            )
        }
        (_, "leased") => format!(
            "leased {} from {}",
            node.ip.as_deref().unwrap_or("?"),
            node.server.as_deref().unwrap_or("?")
        ),
        (_, "installed") => format!(
            "installed: fetched install.cfg over TFTP from {}",
            node.server.as_deref().unwrap_or("?")
        ),
        (_, other) => other.to_owned(),
    };
    let role = if node.frontend { "frontend" } else { "node" };
    outln!(
        "{} {role} {} at {}: {what}",
        at(started),
        node.index,
        node.site
    );
}

fn print_summary(report: &DemoReport, total: f64) {
    step("the cluster: every node installed from the master's frontend");
    let mut rows = vec![
        [
            "NODE",
            "SITE",
            "ROLE",
            "STATE",
            "ADDRESS",
            "BOOTED FROM",
            "INSTALLED AFTER",
            "UP AFTER",
            "OS BYTES",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for node in &report.nodes {
        rows.push(vec![
            node.index.to_string(),
            node.site.clone(),
            if node.frontend { "frontend" } else { "compute" }.to_owned(),
            node.state.clone(),
            node.ip.clone().unwrap_or_default(),
            node.server.clone().unwrap_or_default(),
            node.installed_after_s
                .map(|s| format!("{s:.1}s"))
                .unwrap_or_default(),
            node.up_after_s
                .map(|s| format!("{s:.1}s"))
                .unwrap_or_default(),
            node.bytes.map(|b| b.to_string()).unwrap_or_default(),
        ]);
    }
    print_table(&rows);
    outln!();
    let mut previous = 0.0;
    let mut rows = vec![["PHASE", "TOOK", "AT"].map(str::to_owned).to_vec()];
    for (name, at) in &report.phases {
        rows.push(vec![
            name.clone(),
            format!("{:.1}s", at - previous),
            format!("{at:.1}s"),
        ]);
        previous = *at;
    }
    print_table(&rows);
    outln!("from the command to every node installed: {total:.1}s");
    outln!(
        "(INSTALLED AFTER: from the cluster's start, every part committed, to the node installed)"
    );
}
