#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use super::*;
use vcfed_storage::{ClusterPart, NodeShape};

const SHAPE: NodeShape = NodeShape {
    cores: 1,
    memory_mib: 512,
    disk_gib: 1,
};

fn gateway(site: &str) -> Option<GatewayRef> {
    Some(GatewayRef {
        endpoint: format!("{site}.example:7782"),
        public_key: format!("key-{site}"),
    })
}

fn part(site: &str, attempt: u32, nodes: u32, frontend: bool, state: PartState) -> ClusterPart {
    ClusterPart {
        site: site.into(),
        peer_id: Some(format!("peer-{site}")),
        attempt,
        nodes,
        frontend,
        state,
        reservation_key: None,
        gateway: gateway(site),
        first_node: None,
        lost_at_ms: None,
    }
}

/// Cluster "c" mastered by site-a: 1 node there (plus the frontend),
/// 2 at site-b (two attempts, one released), 2 at site-c; window [100, 200).
fn record(state: ClusterState) -> ClusterRecord {
    ClusterRecord {
        id: "c".into(),
        name: "c".into(),
        master_site: "site-a".into(),
        request: serde_json::json!({
            "name": "c",
            "nodes": 5,
            "shape": SHAPE,
            "window": Window::new(100, 200).unwrap(),
        }),
        state,
        reason: None,
        parts: vec![
            part("site-c", 1, 2, false, PartState::Committed),
            part("site-a", 0, 1, true, PartState::Committed),
            part("site-b", 2, 2, false, PartState::Committed),
            part("site-b", 1, 3, false, PartState::Released),
        ],
        segment: Some(0x1234_5678),
        epoch: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

fn indices(plan: &RunPlan) -> Vec<(u32, bool)> {
    plan.nodes.iter().map(|n| (n.index, n.frontend)).collect()
}

#[test]
fn every_site_numbers_the_nodes_the_same_way() {
    let record = record(ClusterState::Reserved);
    let a = plan(&record, "site-a", "peer-site-a", 150).unwrap();
    let b = plan(&record, "site-b", "peer-site-b", 150).unwrap();
    let c = plan(&record, "site-c", "peer-site-c", 150).unwrap();
    assert!(a.master && !b.master && !c.master);
    assert_eq!(indices(&a), [(0, true), (1, false)]);
    assert_eq!(indices(&b), [(2, false), (3, false)]);
    assert_eq!(indices(&c), [(4, false), (5, false)]);
    for p in [&a, &b, &c] {
        assert_eq!(p.segment, 0x1234_5678);
        assert_eq!(p.subnet, Ipv4Addr::new(198, 19, 0x78, 0));
        assert_eq!(p.end_ms, 200);
        assert_eq!(p.peers.len(), 2, "{p:?}");
    }
    let sites: Vec<&str> = a.peers.iter().map(|p| p.site.as_str()).collect();
    assert_eq!(sites, ["site-b", "site-c"]);
    assert_eq!(a.peers[0].gateway, gateway("site-b"));
}

#[test]
fn a_cluster_runs_only_in_its_window_and_live_states() {
    let live = record(ClusterState::Reserved);
    assert!(plan(&live, "site-a", "peer-site-a", 99).is_none());
    assert!(plan(&live, "site-a", "peer-site-a", 100).is_some());
    assert!(plan(&live, "site-a", "peer-site-a", 199).is_some());
    assert!(plan(&live, "site-a", "peer-site-a", 200).is_none());
    for state in [ClusterState::Starting, ClusterState::Running] {
        assert!(plan(&record(state), "site-b", "peer-site-b", 150).is_some());
    }
    for state in [
        ClusterState::Requested,
        ClusterState::Reserving,
        ClusterState::Stopping,
        ClusterState::Finished,
        ClusterState::Failed,
    ] {
        assert!(plan(&record(state), "site-a", "peer-site-a", 150).is_none());
    }
    // A site without a committed part runs nothing.
    assert!(plan(&live, "site-d", "peer-site-d", 150).is_none());
    let mut no_segment = live.clone();
    no_segment.segment = None;
    assert!(plan(&no_segment, "site-a", "peer-site-a", 150).is_none());
}

#[test]
fn reconcile_starts_resumes_and_stops() {
    let record = record(ClusterState::Reserved);
    let planned = plan(&record, "site-a", "peer-site-a", 150).unwrap();
    let run = |id: &str| ClusterRun {
        cluster_id: id.into(),
        vlan: 100,
        started_at_ms: 0,
    };
    // Fresh: start.
    assert_eq!(
        reconcile(std::slice::from_ref(&planned), &BTreeSet::new(), &[]),
        [Action::Start(planned.clone())]
    );
    // Started by an earlier process: start again (resume).
    assert_eq!(
        reconcile(
            std::slice::from_ref(&planned),
            &BTreeSet::new(),
            &[run("c")]
        ),
        [Action::Start(planned.clone())]
    );
    // Running here: nothing to do.
    let running: BTreeSet<String> = ["c".to_owned()].into();
    assert!(reconcile(std::slice::from_ref(&planned), &running, &[run("c")]).is_empty());
    // No longer planned: stop, whether this process or an earlier one started it.
    assert_eq!(
        reconcile(&[], &running, &[run("c"), run("old")]),
        [
            Action::Stop {
                cluster: "c".into()
            },
            Action::Stop {
                cluster: "old".into()
            }
        ]
    );
}

#[test]
fn states_move_forward_only() {
    assert_eq!(
        next_state(ClusterState::Reserved, false),
        Some(ClusterState::Starting)
    );
    assert_eq!(
        next_state(ClusterState::Starting, true),
        Some(ClusterState::Running)
    );
    assert_eq!(next_state(ClusterState::Running, false), None);
    assert_eq!(next_state(ClusterState::Stopping, true), None);
    let live = record(ClusterState::Running);
    assert_eq!(state_after_stop(&live, 150), None);
    assert_eq!(state_after_stop(&live, 200), Some(ClusterState::Finished));
    assert_eq!(state_after_stop(&record(ClusterState::Finished), 300), None);
}

#[test]
fn all_up_needs_every_node_in_its_final_state() {
    let planned = plan(
        &record(ClusterState::Reserved),
        "site-a",
        "peer-site-a",
        150,
    )
    .unwrap();
    let ip = Ipv4Addr::new(198, 19, 0, 1);
    let status = |index, frontend, state| NodeStatus {
        index,
        frontend,
        state,
    };
    let serving = status(0, true, NodeState::Serving { ip });
    let leased = status(1, false, NodeState::Leased { ip, server: ip });
    let installed = status(1, false, NodeState::Installed { ip, server: ip });
    assert!(!all_up(&planned, std::slice::from_ref(&serving)));
    assert!(!all_up(&planned, &[serving.clone(), leased]));
    assert!(all_up(&planned, &[serving, installed]));
}

#[test]
fn the_cluster_is_up_when_every_node_of_every_site_is() {
    let planned = plan(
        &record(ClusterState::Reserved),
        "site-a",
        "peer-site-a",
        150,
    )
    .unwrap();
    assert_eq!(
        planned.cluster_nodes,
        (0..6).collect::<Vec<u32>>(),
        "the frontend and 5 compute nodes"
    );
    let node = |index: u32, state: &str| vcfed_storage::NodeRecord {
        site: "any".into(),
        index,
        frontend: index == 0,
        state: serde_json::json!({ "state": state }),
        updated_at_ms: 0,
    };
    let mut nodes: Vec<_> = (1..6).map(|i| node(i, "installed")).collect();
    assert!(!cluster_up(&planned, &nodes), "no frontend");
    nodes.push(node(0, "serving"));
    assert!(cluster_up(&planned, &nodes));
    nodes[2] = node(3, "leased");
    assert!(!cluster_up(&planned, &nodes));
}

#[test]
fn a_master_is_up_when_every_site_is_a_worker_when_its_nodes_are() {
    let record = record(ClusterState::Starting);
    let master = plan(&record, "site-a", "peer-site-a", 150).unwrap();
    let worker = plan(&record, "site-b", "peer-site-b", 150).unwrap();
    let ip = Ipv4Addr::new(198, 19, 0, 1);
    let installed = |index| NodeStatus {
        index,
        frontend: false,
        state: NodeState::Installed { ip, server: ip },
    };
    let serving = NodeStatus {
        index: 0,
        frontend: true,
        state: NodeState::Serving { ip },
    };
    let never = || -> Result<Vec<vcfed_storage::NodeRecord>, ()> {
        panic!("a worker, or a master whose own nodes are not up, reads no stored states")
    };
    assert_eq!(
        site_up(&worker, &[installed(2), installed(3)], never),
        Ok(true)
    );
    assert_eq!(site_up(&worker, &[installed(2)], never), Ok(false));
    assert_eq!(site_up(&master, &[installed(1)], never), Ok(false));
    let own = [serving, installed(1)];
    let stored = |indices: &[u32]| {
        let nodes = indices
            .iter()
            .map(|&index| vcfed_storage::NodeRecord {
                site: "any".into(),
                index,
                frontend: index == 0,
                state: serde_json::json!({ "state": if index == 0 { "serving" } else { "installed" } }),
                updated_at_ms: 0,
            })
            .collect();
        move || -> Result<_, ()> { Ok(nodes) }
    };
    assert_eq!(site_up(&master, &own, stored(&[0, 1, 2, 3, 4])), Ok(false));
    assert_eq!(
        site_up(&master, &own, stored(&[0, 1, 2, 3, 4, 5])),
        Ok(true)
    );
}

#[test]
fn workers_boot_once_the_tunnel_to_the_master_is_up() {
    let live = record(ClusterState::Starting);
    let master = plan(&live, "site-a", "peer-site-a", 150).unwrap();
    let worker = plan(&live, "site-b", "peer-site-b", 150).unwrap();
    assert!(may_boot(&master, |_| false), "the master boots at once");
    assert!(!may_boot(&worker, |_| false));
    assert!(may_boot(&worker, |gateway| gateway.public_key == "key-site-a"));
    // A master without a gateway can never be reached: boot anyway.
    let mut no_gateway = live.clone();
    for part in no_gateway.parts.iter_mut().filter(|p| p.site == "site-a") {
        part.gateway = None;
    }
    let worker = plan(&no_gateway, "site-b", "peer-site-b", 150).unwrap();
    assert!(may_boot(&worker, |_| false));
}

#[test]
fn workers_report_on_change_and_every_period() {
    let live = record(ClusterState::Running);
    let master = plan(&live, "site-a", "peer-site-a", 150).unwrap();
    let worker = plan(&live, "site-b", "peer-site-b", 150).unwrap();
    assert!(
        !report_due(&master, true, None, 0),
        "the master keeps its own"
    );
    assert!(report_due(&worker, false, None, 0), "the first report");
    assert!(report_due(&worker, true, Some(1_000), 1_001));
    assert!(!report_due(
        &worker,
        false,
        Some(1_000),
        1_000 + REPORT_EVERY_MS - 1
    ));
    assert!(report_due(
        &worker,
        false,
        Some(1_000),
        1_000 + REPORT_EVERY_MS
    ));
}

#[test]
fn only_overdue_clusters_that_run_nowhere_here_finish_idle() {
    let live = record(ClusterState::Running);
    let mut other = record(ClusterState::Reserved);
    other.id = "other".into();
    let records = [live, other];
    let run = ClusterRun {
        cluster_id: "c".into(),
        vlan: 100,
        started_at_ms: 0,
    };
    let none = BTreeSet::new();
    let ids = |finished: Vec<&ClusterRecord>| -> Vec<String> {
        finished.into_iter().map(|r| r.id.clone()).collect()
    };
    assert!(
        finish_idle(&records, &[], &none, 199).is_empty(),
        "not over yet"
    );
    assert_eq!(ids(finish_idle(&records, &[], &none, 200)), ["c", "other"]);
    // What still runs here is finished when it is torn down.
    assert_eq!(
        ids(finish_idle(
            &records,
            std::slice::from_ref(&run),
            &none,
            200
        )),
        ["other"]
    );
    let running: BTreeSet<String> = ["other".to_owned()].into();
    assert_eq!(
        ids(finish_idle(&records, &[run], &running, 200)),
        Vec::<String>::new()
    );
}

#[test]
fn numbers_given_at_commit_survive_a_lost_part_and_replacements_follow_them() {
    // b's part (3, 4) was fenced; its replacement at c was numbered after
    // every number used (6, 7); a part being committed again (a's and
    // c's, with the new list) still counts.
    let mut record = record(ClusterState::Running);
    let numbered = |site: &str, attempt, nodes, frontend, state, first| ClusterPart {
        first_node: Some(first),
        ..part(site, attempt, nodes, frontend, state)
    };
    record.parts = vec![
        numbered("site-a", 0, 1, true, PartState::Committing, 1),
        numbered("site-b", 1, 2, false, PartState::Releasing, 3),
        numbered("site-c", 1, 1, false, PartState::Committed, 2),
        numbered("site-c", 2, 2, false, PartState::Committing, 6),
    ];
    record.parts[1].lost_at_ms = Some(150);
    let a = plan(&record, "site-a", "peer-site-a", 150).unwrap();
    let c = plan(&record, "site-c", "peer-site-c", 150).unwrap();
    assert_eq!(indices(&a), [(0, true), (1, false)]);
    assert_eq!(indices(&c), [(2, false), (6, false), (7, false)]);
    assert_eq!(a.cluster_nodes, [0, 1, 2, 6, 7]);
    assert_eq!(c.cluster_nodes, a.cluster_nodes);
    // The fenced site is nobody's peer, and b runs nothing.
    let sites: Vec<&str> = a.peers.iter().map(|p| p.site.as_str()).collect();
    assert_eq!(sites, ["site-c"]);
    assert!(plan(&record, "site-b", "peer-site-b", 150).is_none());
    // Parts stored without numbers (before epochs) follow the numbered
    // ones, in (site, attempt) order.
    record.parts[2].first_node = None;
    let c = plan(&record, "site-c", "peer-site-c", 150).unwrap();
    assert_eq!(indices(&c), [(6, false), (7, false), (8, false)]);
}
