//! The federated demo on the real kernel: three sites in network
//! namespaces, each with its own agent and gateway. Needs root, iproute2,
//! nsenter, dnsmasq and busybox; with CI=true their absence is a failure.
//!
//! - `vcfed demo` itself: every node at the worker sites leased its address
//!   from the master's frontend and fetched the install file over the
//!   tunnels, and nothing is left afterwards.
//! - A worker agent killed while its cluster runs, then restarted, brings
//!   back its segment, tunnels and nodes without the other sites noticing.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a failed unwrap is a failed test

mod common;

use common::eventually;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use vcfed::api::ClusterDetail;
use vcfed::client::ApiClient;
use vcfed::demo::federated::DemoReport;
use vcfed::demo::federation::{self, DemoFederation, DemoSpec};
use vcfed_storage::ClusterState;

/// Whether the environment can run these tests; in CI it must.
fn environment_ready() -> bool {
    match federation::check_environment(federation::DemoDriver::Netns) {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the demo tests cannot run in CI: {why}"
            );
            eprintln!("skipping a demo test: {why}");
            false
        }
    }
}

/// Runs `vcfed demo` with `args` (in a temporary directory, with a
/// report); its output and report, once it succeeded.
fn run_demo(args: &[&str]) -> (String, DemoReport) {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let started = Instant::now();
    let out = Command::new(common::vcfed_bin())
        .arg("demo")
        .args(args)
        .arg("--dir")
        .arg(dir.path().join("sites"))
        .arg("--report")
        .arg(&report_path)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the demo failed:\n{stdout}\n{}",
        common::stderr(&out)
    );
    eprintln!(
        "vcfed demo {} took {:.1}s",
        args.join(" "),
        started.elapsed().as_secs_f64()
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    (stdout, report)
}

#[test]
fn the_demo_installs_every_node_from_the_masters_frontend_and_leaves_nothing() {
    if !environment_ready() {
        return;
    }
    // Its own instance: a user's demo (instance 0) on this machine is left
    // alone.
    let (stdout, report) = run_demo(&["--instance", "7"]);
    for step in [
        "gossip view complete",
        "is the master",
        "committed everywhere",
        "tunnels up",
        "frontend up",
        "nothing left behind",
    ] {
        assert!(stdout.contains(step), "no {step:?} in:\n{stdout}");
    }

    let frontend = report.frontend_ip.clone().expect("the frontend's address");
    let master = &report.sites[0];
    let frontends: Vec<_> = report.nodes.iter().filter(|n| n.frontend).collect();
    assert_eq!(frontends.len(), 1);
    assert_eq!(
        &frontends[0].site, master,
        "the frontend runs at the master"
    );
    let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
    for node in report.nodes.iter().filter(|n| !n.frontend) {
        assert_eq!(node.state, "installed", "{node:?}");
        assert_eq!(
            node.server.as_ref(),
            Some(&frontend),
            "node {} leased and installed from the master's frontend",
            node.index
        );
        *per_site.entry(node.site.as_str()).or_default() += 1;
    }
    for worker in &report.sites[1..] {
        assert!(
            per_site.get(worker.as_str()).copied().unwrap_or(0) > 0,
            "no node at {worker}: {per_site:?}"
        );
    }
    assert_eq!(
        per_site.values().sum::<usize>(),
        vcfed::demo::federated::DEMO_CLUSTER_NODES as usize
    );
    assert!(report.left_behind.is_empty(), "{:?}", report.left_behind);
    let left = federation::leftovers(&DemoSpec::instance(7));
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `vcfed demo --heal`: a worker site of the running cluster is lost (its
/// agent killed, its link cut); the master fences it and replaces its nodes
/// at the other worker, where they install from the frontend across the
/// tunnels; the site, back, learns its part is released and stands down.
#[test]
fn a_lost_worker_site_is_fenced_replaced_and_stands_down_when_it_returns() {
    if !environment_ready() {
        return;
    }
    let (stdout, report) = run_demo(&["--heal", "--instance", "8"]);
    for step in [
        "declared",
        "replacement committed",
        "every replacement node installed from the frontend",
        "stood down",
        "nothing left behind",
    ] {
        assert!(stdout.contains(step), "no {step:?} in:\n{stdout}");
    }
    let heal = report.heal.expect("the heal report");
    eprintln!("{heal:?}");
    assert!(!heal.lost_nodes.is_empty());
    assert_eq!(heal.replacement_nodes.len(), heal.lost_nodes.len());
    // New numbers (and so new MACs): after every number used before.
    let highest_lost = heal.lost_nodes.iter().max().unwrap();
    assert!(
        heal.replacement_nodes.iter().all(|n| n > highest_lost),
        "{heal:?}"
    );
    assert!(heal.replaced_at != heal.lost_site && !heal.replaced_at.is_empty());
    assert!(report.sites[1..].contains(&heal.replaced_at), "{heal:?}");
    // Never on one signal: the site's silence must last the grace period
    // (10 s here) before it is fenced, and then it is fenced promptly.
    let fenced = heal.fenced_after_s.expect("fenced");
    assert!(
        (5.0..40.0).contains(&fenced),
        "fenced {fenced:.1}s after the loss"
    );
    let installed = heal.installed_after_s.expect("replacements installed");
    assert!(installed >= heal.committed_after_s.unwrap(), "{heal:?}");
    assert!(heal.stood_down_after_s.is_some(), "{heal:?}");
    assert!(report.left_behind.is_empty(), "{:?}", report.left_behind);
    let left = federation::leftovers(&DemoSpec::instance(8));
    assert!(left.is_empty(), "left behind: {left:?}");
}

async fn detail(client: &ApiClient, id: &str) -> Option<ClusterDetail> {
    client.get(&format!("/v1/clusters/{id}")).await.ok()
}

/// Node number → (state, updated_at_ms) of the nodes at `site`, as the
/// site queried shows them.
async fn nodes(client: &ApiClient, id: &str, site: &str) -> BTreeMap<u32, (String, i64)> {
    detail(client, id)
        .await
        .map(|d| {
            d.nodes
                .iter()
                .filter(|n| n.site == site)
                .map(|n| {
                    let state = n.state["state"].as_str().unwrap_or_default().to_owned();
                    (n.index, (state, n.updated_at_ms))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn all_installed(nodes: &BTreeMap<u32, (String, i64)>, count: usize) -> bool {
    nodes.len() == count && nodes.values().all(|(state, _)| state == "installed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_brings_its_segment_and_tunnels_back() {
    if !environment_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Names of its own, so it can run beside the other test.
    let spec = DemoSpec {
        prefix: "vcft".to_owned(),
        site_prefix: "rst".to_owned(),
        wan_octet: 9,
        nodes: vec![1, 2, 2],
        driver: federation::DemoDriver::Netns,
        heal_grace: None,
    };
    let mut federation = DemoFederation::build(spec.clone(), dir.path()).unwrap();
    federation.agent_exe = common::vcfed_bin().into();
    let mut clients = Vec::new();
    for index in 0..3 {
        federation.start_agent(index).unwrap();
        let client = federation.sites[index].client().unwrap();
        vcfed::demo::local::wait_ready(&client).await.unwrap();
        clients.push(client);
    }
    eventually(
        "every site sees every site",
        Duration::from_secs(20),
        || async {
            for client in &clients {
                let view: vcfed::federation::SitesReport = client.get("/v1/sites").await.unwrap();
                let alive = view
                    .sites
                    .iter()
                    .filter(|s| s.state == vcfed_registry::SiteState::Alive)
                    .count();
                if alive != 3 {
                    return false;
                }
            }
            true
        },
    )
    .await;

    // The master has 1 slot (the frontend): the 4 nodes are at B and C.
    let created: ClusterDetail = clients[0]
        .post(
            "/v1/clusters",
            &serde_json::json!({ "name": "restart", "nodes": 4, "duration": "1h" }),
        )
        .await
        .unwrap();
    let id = created.record.id;
    let (a, b, c) = (&clients[0], &clients[1], &clients[2]);
    eventually("every node installed", Duration::from_secs(60), || async {
        all_installed(&nodes(b, &id, "rst-b").await, 2)
            && all_installed(&nodes(c, &id, "rst-c").await, 2)
    })
    .await;
    let a_before = nodes(a, &id, "rst-a").await;
    let c_before = nodes(c, &id, "rst-c").await;
    let b_before = nodes(b, &id, "rst-b").await;
    let pids: Vec<Option<u32>> = federation.sites.iter().map(|s| s.agent_pid()).collect();

    // B crashes. A and C go on; B's nodes are cut off.
    let killed_at = std::time::SystemTime::now();
    federation.kill_agent(1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    federation.start_agent(1).unwrap();
    vcfed::demo::local::wait_ready(b).await.unwrap();
    let restarted = Instant::now();

    // B resumes from its ledger: same VLAN, segment and tunnels, and its
    // nodes boot again from A's frontend across the tunnel.
    eventually(
        "B's nodes reinstalled and its tunnels up",
        Duration::from_secs(60),
        || async {
            let Some(at_b) = detail(b, &id).await else {
                return false;
            };
            // Installed again: the install file was fetched over TFTP
            // after the crash (a fresh boot, not the old run's files).
            let renewed = at_b.nodes.iter().all(|n| {
                let fetched = dir
                    .path()
                    .join("rst-b/nodes")
                    .join(&id)
                    .join(n.index.to_string())
                    .join("installed.cfg");
                n.state["state"] == "installed"
                    && b_before.contains_key(&n.index)
                    && std::fs::metadata(&fetched)
                        .and_then(|m| m.modified())
                        .is_ok_and(|at| at > killed_at)
            });
            at_b.nodes.len() == 2
                && renewed
                && at_b.record.state == ClusterState::Running
                && at_b
                    .network
                    .as_ref()
                    .is_some_and(|n| n.tunnels.iter().all(|t| t.up))
        },
    )
    .await;
    eprintln!(
        "B back in {:.1}s after its restart",
        restarted.elapsed().as_secs_f64()
    );
    let at_a = detail(a, &id).await.unwrap();
    let tunnel_to_b = at_a
        .network
        .as_ref()
        .and_then(|n| n.tunnels.iter().find(|t| t.site == "rst-b"))
        .expect("A's tunnel to B");
    assert!(tunnel_to_b.up);

    // A's /metrics shows its tunnel to B by site name: sessions made
    // (before and after B's restart), traffic both ways, and the cluster's
    // segment delivering frames here.
    let (status, body) = a
        .raw(hyper::Method::GET, "/metrics", None::<&()>)
        .await
        .unwrap();
    assert_eq!(status, hyper::StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    let samples = common::parse_exposition(&text);
    let value = |series: &str| {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert!(value(r#"vcfed_gateway_handshakes_total{peer="rst-b"}"#) >= 2.0);
    assert!(value(r#"vcfed_gateway_tx_bytes_total{peer="rst-b"}"#) > 0.0);
    assert!(value(r#"vcfed_gateway_rx_datagrams_total{peer="rst-c"}"#) > 0.0);
    let delivered = samples
        .iter()
        .filter(|(series, _)| {
            series.starts_with("vcfed_gateway_segment_frames_total{")
                && series.contains(r#"way="delivered""#)
        })
        .map(|(_, value)| *value)
        .sum::<f64>();
    assert!(delivered > 0.0, "{text}");

    // The other sites were not touched: same agents, same nodes.
    assert_eq!(nodes(a, &id, "rst-a").await, a_before);
    assert_eq!(nodes(c, &id, "rst-c").await, c_before);
    // The master shows B's new node states too.
    eventually(
        "the master shows B's nodes again",
        Duration::from_secs(15),
        || async {
            let at_master = nodes(a, &id, "rst-b").await;
            all_installed(&at_master, 2)
                && at_master.iter().all(|(index, (_, at))| {
                    b_before.get(index).is_some_and(|(_, before)| at > before)
                })
        },
    )
    .await;
    for index in [0, 2] {
        assert!(federation.agent_running(index), "site {index}'s agent died");
        assert_eq!(federation.sites[index].agent_pid(), pids[index]);
    }
    assert_eq!(at_a.record.state, ClusterState::Running);

    let left = federation.teardown();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(federation::leftovers(&spec).is_empty());
}
