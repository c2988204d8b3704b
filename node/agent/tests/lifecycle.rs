//! The cluster lifecycle with real agents on loopback and the `sim`
//! compute driver (no root needed): at its start a cluster's nodes boot at
//! every site of it, each site takes a VLAN id from its pool, and at the
//! window's end everything is torn down and the ids return to the pool.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Member, eventually, start_federation_with};
use serde_json::json;
use vcfed::api::ClusterDetail;
use vcfed_storage::ClusterState;

async fn detail(member: &Member, id: &str) -> ClusterDetail {
    member
        .client
        .get(&format!("/v1/clusters/{id}"))
        .await
        .unwrap()
}

/// The cluster's state at a site, once the site knows it.
async fn state(member: &Member, id: &str) -> Option<ClusterState> {
    let found: Result<ClusterDetail, _> = member.client.get(&format!("/v1/clusters/{id}")).await;
    found.ok().map(|d| d.record.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_at_every_site_for_its_window_and_is_torn_down() {
    let members = start_federation_with(&[("site-a", 2), ("site-b", 4)], "driver = \"sim\"").await;
    let (a, b) = (&members[0], &members[1]);

    // 4 compute nodes at A, which has 2 slots: the frontend and 1 node at A,
    // 3 at B. The window is short so the test sees its end.
    let created: ClusterDetail = a
        .client
        .post(
            "/v1/clusters",
            &json!({ "name": "short", "nodes": 4, "duration": "6s" }),
        )
        .await
        .unwrap();
    let id = created.record.id.clone();

    // The master shows every node once the worker reported its own.
    eventually("running at A and B", Duration::from_secs(15), || async {
        state(a, &id).await == Some(ClusterState::Running)
            && state(b, &id).await == Some(ClusterState::Running)
            && detail(a, &id).await.nodes.len() == 5
    })
    .await;
    let at_a = detail(a, &id).await;
    let at_b = detail(b, &id).await;
    let nodes = |d: &ClusterDetail| -> Vec<(u32, bool, String)> {
        d.nodes
            .iter()
            .map(|n| {
                (
                    n.index,
                    n.frontend,
                    n.state["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        nodes(&at_a),
        [
            (0, true, "serving".into()),
            (1, false, "installed".into()),
            (2, false, "installed".into()),
            (3, false, "installed".into()),
            (4, false, "installed".into())
        ]
    );
    let sites: Vec<&str> = at_a.nodes.iter().map(|n| n.site.as_str()).collect();
    assert_eq!(sites, ["site-a", "site-a", "site-b", "site-b", "site-b"]);
    assert_eq!(
        nodes(&at_b),
        [
            (2, false, "installed".into()),
            (3, false, "installed".into()),
            (4, false, "installed".into())
        ]
    );
    for d in [&at_a, &at_b] {
        let network = d
            .network
            .as_ref()
            .expect("the network of a running cluster");
        assert_eq!(network.vlan, Some(100), "the lowest id of the pool");
        assert_eq!(Some(network.segment), d.record.segment);
        assert_eq!(network.tunnels.len(), 1);
    }
    assert_eq!(at_a.network.unwrap().tunnels[0].site, "site-b");

    eventually("finished at A and B", Duration::from_secs(20), || async {
        detail(a, &id).await.record.state == ClusterState::Finished
            && detail(b, &id).await.record.state == ClusterState::Finished
    })
    .await;
    for member in [a, b] {
        let d = detail(member, &id).await;
        assert!(d.network.is_none() && d.nodes.is_empty(), "{d:?}");
        let events: Vec<vcfed_storage::Event> =
            member.client.get("/v1/events?limit=1000").await.unwrap();
        let kinds: Vec<&str> = events
            .iter()
            .filter(|e| e.subject == id)
            .map(|e| e.kind.as_str())
            .collect();
        assert!(kinds.contains(&"cluster.run.started"), "{kinds:?}");
        assert!(kinds.contains(&"cluster.run.ended"), "{kinds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_cluster_stops_everywhere() {
    let members = start_federation_with(&[("site-a", 1), ("site-b", 4)], "driver = \"sim\"").await;
    let (a, b) = (&members[0], &members[1]);
    let created: ClusterDetail = a
        .client
        .post(
            "/v1/clusters",
            &json!({ "name": "gone", "nodes": 2, "duration": "1h" }),
        )
        .await
        .unwrap();
    let id = created.record.id.clone();
    eventually("running at B", Duration::from_secs(15), || async {
        state(b, &id).await == Some(ClusterState::Running)
    })
    .await;
    let _: serde_json::Value = a
        .client
        .call(
            hyper::Method::DELETE,
            &format!("/v1/clusters/{id}"),
            None::<&()>,
        )
        .await
        .unwrap();
    eventually("stopped at A and B", Duration::from_secs(15), || async {
        let (da, db) = (detail(a, &id).await, detail(b, &id).await);
        da.record.state == ClusterState::Finished
            && db.record.state == ClusterState::Finished
            && da.network.is_none()
            && db.network.is_none()
            && db.nodes.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_never_ran_at_a_site_still_finishes_there() {
    // driver = "none" (the default): nothing starts, but the window's end
    // is still the cluster's end at every site.
    let members = start_federation_with(&[("site-a", 1), ("site-b", 4)], "").await;
    let (a, b) = (&members[0], &members[1]);
    let created: ClusterDetail = a
        .client
        .post(
            "/v1/clusters",
            &json!({ "name": "idle", "nodes": 2, "duration": "3s" }),
        )
        .await
        .unwrap();
    let id = created.record.id.clone();
    eventually("reserved at B", Duration::from_secs(15), || async {
        state(b, &id).await == Some(ClusterState::Reserved)
    })
    .await;
    assert!(detail(a, &id).await.network.is_none());
    eventually("finished at A and B", Duration::from_secs(15), || async {
        state(a, &id).await == Some(ClusterState::Finished)
            && state(b, &id).await == Some(ClusterState::Finished)
    })
    .await;
}
