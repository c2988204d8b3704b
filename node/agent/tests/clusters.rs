//! Federated cluster requests with real agents on loopback: the receiving
//! site becomes master and reserves the rest at workers; bad requests hold
//! nothing anywhere; competing masters never overbook a worker.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{Member, eventually, start_federation, start_federation_with, vcfed};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use vcfed_storage::{ClusterRecord, ClusterState, PartState, Reservation};

async fn create(member: &Member, body: Value) -> (StatusCode, Value) {
    let (status, bytes) = member
        .client
        .raw(Method::POST, "/v1/clusters", Some(&body))
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

async fn cluster(member: &Member, id: &str) -> ClusterRecord {
    member
        .client
        .get(&format!("/v1/clusters/{id}"))
        .await
        .unwrap()
}

async fn wait_settled(member: &Member, id: &str) -> ClusterRecord {
    let started = Instant::now();
    loop {
        let record = cluster(member, id).await;
        if record.state != ClusterState::Reserving && record.state != ClusterState::Stopping {
            return record;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "cluster {id} still {}",
            record.state
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn active(member: &Member) -> Vec<Reservation> {
    member.client.get("/v1/reservations").await.unwrap()
}

/// Nodes of the reservations that count now, at the busiest instant.
fn peak(reservations: &[Reservation]) -> u32 {
    reservations
        .iter()
        .map(|r| r.window.start_ms)
        .map(|t| {
            reservations
                .iter()
                .filter(|r| r.window.start_ms <= t && t < r.window.end_ms)
                .map(|r| r.nodes)
                .sum::<u32>()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_masters_a_cluster_larger_than_itself() {
    let mut members = start_federation(&[("site-a", 4), ("site-b", 4), ("site-c", 4)]).await;

    // 10 nodes at A, which has 4 slots: the frontend and 3 nodes stay at A,
    // the other 7 are borrowed from B and C. Through the CLI, with --wait.
    let out = vcfed(&[
        "cluster",
        "create",
        "--config",
        members[0].site.config_arg(),
        "--name",
        "big",
        "--nodes",
        "10",
        "--duration",
        "1h",
        "--wait",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{text}", common::stderr(&out));
    assert!(text.contains("reserved"), "{text}");

    let out = vcfed(&[
        "cluster",
        "show",
        "big",
        "--json",
        "--config",
        members[0].site.config_arg(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let record: ClusterRecord = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record.state, ClusterState::Reserved);
    assert_eq!(record.master_site, "site-a");
    let committed: Vec<_> = record
        .parts
        .iter()
        .filter(|p| p.state == PartState::Committed)
        .collect();
    assert_eq!(
        committed.iter().map(|p| p.nodes).sum::<u32>(),
        10,
        "{committed:?}"
    );
    let at = |site: &str| {
        committed
            .iter()
            .filter(|p| p.site == site)
            .map(|p| p.nodes)
            .sum::<u32>()
    };
    assert_eq!((at("site-a"), at("site-b") + at("site-c")), (3, 7));
    assert!(committed.iter().any(|p| p.site == "site-a" && p.frontend));

    // The workers committed exactly their share and know the cluster.
    for worker in &members[1..] {
        let reservations = active(worker).await;
        let name = worker.site.config().site.name;
        let held: u32 = reservations
            .iter()
            .filter(|r| r.cluster_id == record.id)
            .map(|r| r.nodes)
            .sum();
        assert_eq!(held, at(&name), "{name}");
        assert!(
            reservations
                .iter()
                .all(|r| r.state == vcfed_storage::ReservationState::Committed)
        );
        let theirs = cluster(worker, &record.id).await;
        assert_eq!(theirs.master_site, "site-a");
        assert_eq!(theirs.state, ClusterState::Reserved);
        // `cluster list --json` there: the request is the cluster's (10
        // nodes), the worker's share is its part.
        let out = vcfed(&[
            "cluster",
            "list",
            "--json",
            "--config",
            worker.site.config_arg(),
        ]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        let listed: Vec<ClusterRecord> = serde_json::from_slice(&out.stdout).unwrap();
        let listed = listed.iter().find(|c| c.id == record.id).expect("listed");
        assert_eq!(listed.request["nodes"], 10, "{name}: {:?}", listed.request);
        let own: u32 = listed
            .parts
            .iter()
            .filter(|p| p.site == name)
            .map(|p| p.nodes)
            .sum();
        assert_eq!(own, at(&name), "{name}");
    }

    // Delete releases everywhere.
    let out = vcfed(&[
        "cluster",
        "delete",
        "big",
        "--wait",
        "--config",
        members[0].site.config_arg(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    for member in &members {
        assert!(
            active(member).await.is_empty(),
            "{:?}",
            active(member).await
        );
    }

    // Bad requests: a clear 4xx, and nothing held anywhere afterwards.
    let base = json!({"name": "bad", "nodes": 2, "duration": "1h"});
    let with = |patch: Value| {
        let mut body = base.clone();
        body.as_object_mut()
            .unwrap()
            .extend(patch.as_object().unwrap().clone());
        body
    };
    let cases = [
        (
            with(json!({"nodes": 0})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            with(json!({"duration": "0s"})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            with(json!({"start": "2020-01-01T00:00:00Z"})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            with(json!({"cores": 999})),
            StatusCode::BAD_REQUEST,
            "unknown_shape",
        ),
        (
            with(json!({"nodes": 50})),
            StatusCode::CONFLICT,
            "insufficient_capacity",
        ),
    ];
    for (body, status, code) in cases {
        let (got, answer) = create(&members[0], body.clone()).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str().unwrap()),
            (status, code),
            "{body}: {answer}"
        );
    }
    let (_, answer) = create(&members[0], with(json!({"nodes": 50}))).await;
    assert_eq!(answer["error"]["available"], 11, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("11 nodes"),
        "{answer}"
    );
    for member in &members {
        assert!(active(member).await.is_empty());
    }

    // Request → reserved latency over 100 requests that each borrow nodes.
    let mut latencies = Vec::new();
    for i in 0..100 {
        let started = Instant::now();
        let (status, answer) = create(
            &members[0],
            json!({"name": format!("l{i}"), "nodes": 5, "duration": "10m"}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        let id = answer["id"].as_str().unwrap().to_owned();
        let record = wait_settled(&members[0], &id).await;
        latencies.push(started.elapsed());
        assert_eq!(record.state, ClusterState::Reserved, "{record:?}");
        let (status, _) = members[0]
            .client
            .raw(Method::DELETE, &format!("/v1/clusters/{id}"), None::<&()>)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        wait_settled(&members[0], &id).await;
    }
    latencies.sort();
    eprintln!(
        "request → reserved over 100 requests (5 nodes: 3 at the master, 2 borrowed): median {:.1} ms, p99 {:.1} ms",
        latencies[49].as_secs_f64() * 1000.0,
        latencies[98].as_secs_f64() * 1000.0
    );

    for member in &mut members {
        assert!(
            member
                .agent
                .as_mut()
                .unwrap()
                .terminate(Duration::from_secs(10))
                .success()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_masters_never_overbook_a_worker() {
    let mut members = start_federation(&[("site-a", 3), ("site-b", 3), ("site-c", 4)]).await;
    for round in 0..5 {
        // A and B each need all of C's 4 nodes for the same hour.
        let body = |name: &str| json!({"name": name, "nodes": 6, "duration": "1h"});
        let (a, b) = tokio::join!(
            create(&members[0], body(&format!("a{round}"))),
            create(&members[1], body(&format!("b{round}")))
        );
        let mut ids = Vec::new();
        for ((status, answer), member) in [(a, &members[0]), (b, &members[1])] {
            if status == StatusCode::CREATED {
                ids.push((member, answer["id"].as_str().unwrap().to_owned()));
            }
        }
        let mut reserved = 0;
        for (member, id) in &ids {
            if wait_settled(member, id).await.state == ClusterState::Reserved {
                reserved += 1;
            }
        }
        let at_c = active(&members[2]).await;
        assert!(peak(&at_c) <= 4, "round {round}: C overbooked: {at_c:?}");
        assert!(reserved <= 1, "round {round}: both masters got C's nodes");
        // Clean up for the next round, and wait until holds of failed
        // attempts are gone (released, or expired by their lease).
        for (member, id) in &ids {
            let _ = member
                .client
                .raw(Method::DELETE, &format!("/v1/clusters/{id}"), None::<&()>)
                .await;
        }
        eventually("everything released", Duration::from_secs(40), || async {
            for member in &members {
                if !active(member).await.is_empty() {
                    return false;
                }
            }
            true
        })
        .await;
    }
    for member in &mut members {
        assert!(
            member
                .agent
                .as_mut()
                .unwrap()
                .terminate(Duration::from_secs(10))
                .success()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_taken_while_its_cluster_is_live() {
    let members = start_federation(&[("site-a", 4)]).await;
    let config = members[0].site.config_arg();
    let create_dup = || {
        vcfed(&[
            "cluster",
            "create",
            "--config",
            config,
            "--name",
            "dup",
            "--nodes",
            "1",
            "--duration",
            "1h",
            "--json",
        ])
    };
    let out = create_dup();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let first: ClusterRecord = serde_json::from_slice(&out.stdout).unwrap();

    let out = create_dup();
    assert_eq!(out.status.code(), Some(1), "{}", common::stderr(&out));
    let expected = format!(r#"a live cluster named "dup" exists: {}"#, first.id);
    assert!(
        common::stderr(&out).contains(&expected),
        "{}",
        common::stderr(&out)
    );
    let (status, body) = create(
        &members[0],
        json!({"name": "dup", "nodes": 1, "duration": "1h"}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "name_taken");
    // The name still names one cluster.
    let out = vcfed(&["cluster", "show", "dup", "--json", "--config", config]);
    assert!(out.status.success(), "{}", common::stderr(&out));

    let out = vcfed(&["cluster", "delete", "dup", "--wait", "--config", config]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(
        cluster(&members[0], &first.id).await.state,
        ClusterState::Finished
    );
    let out = create_dup();
    assert!(
        out.status.success(),
        "a finished cluster frees its name: {}",
        common::stderr(&out)
    );
    let second: ClusterRecord = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(second.id, first.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_hides_clusters_that_are_over_and_filters_by_state() {
    let members = start_federation(&[("site-a", 4)]).await;
    let config = members[0].site.config_arg();
    let create_named = |name: &str| {
        let out = vcfed(&[
            "cluster",
            "create",
            "--config",
            config,
            "--name",
            name,
            "--nodes",
            "1",
            "--duration",
            "1h",
            "--wait",
            "--json",
        ]);
        assert!(out.status.success(), "{}", common::stderr(&out));
    };
    create_named("gone");
    create_named("live");
    let out = vcfed(&["cluster", "delete", "gone", "--wait", "--config", config]);
    assert!(out.status.success(), "{}", common::stderr(&out));

    let names = |extra: &[&str]| -> Vec<String> {
        let out = vcfed(&[&["cluster", "list", "--json", "--config", config], extra].concat());
        assert!(out.status.success(), "{extra:?}: {}", common::stderr(&out));
        let list: Vec<ClusterRecord> = serde_json::from_slice(&out.stdout).unwrap();
        let mut names: Vec<String> = list.into_iter().map(|c| c.name).collect();
        names.sort();
        names
    };
    assert_eq!(names(&[]), ["live"]);
    assert_eq!(names(&["--all"]), ["gone", "live"]);
    assert_eq!(names(&["--state", "finished"]), ["gone"]);
    assert_eq!(names(&["--state", "finished,reserved"]), ["gone", "live"]);
    assert_eq!(
        names(&["--state", "failed", "--state", "reserved"]),
        ["live"]
    );

    let out = vcfed(&["cluster", "list", "--config", config]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("gone"), "{text}");
    assert!(
        common::stderr(&out).contains("1 cluster finished or failed not shown; --all lists them"),
        "{}",
        common::stderr(&out)
    );

    let out = vcfed(&["cluster", "list", "--state", "done", "--config", config]);
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("requested, reserving, reserved, starting"),
        "{}",
        common::stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_wait_names_the_sites_it_waits_for_and_times_out() {
    let mut members = start_federation(&[("site-a", 2), ("site-b", 4)]).await;
    let config = members[0].site.config_arg().to_owned();
    // Two nodes at A hold the frontend and one node; the others are B's.
    let out = vcfed(&[
        "cluster",
        "create",
        "--config",
        &config,
        "--name",
        "wide",
        "--nodes",
        "3",
        "--duration",
        "1h",
        "--wait",
        "--json",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    // A line as accepted, a line as settled.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let record: ClusterRecord = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(
        record.parts.iter().any(|p| p.site == "site-b"),
        "{record:?}"
    );

    // B is gone: its part cannot be released.
    drop(members[1].agent.take());
    let started = Instant::now();
    let out = vcfed(&[
        "cluster",
        "delete",
        "wide",
        "--wait",
        "--timeout",
        "2s",
        "--config",
        &config,
    ]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "{err}");
    assert!(
        err.contains("waiting for "),
        "progress names the sites: {err}"
    );
    assert!(err.contains("site-b"), "{err}");
    assert!(err.contains("after 2s"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("error:") && l.contains("site-b") && l.contains("parts")),
        "{err}"
    );

    let out = vcfed(&[
        "cluster",
        "delete",
        "wide",
        "--timeout",
        "soon",
        "--config",
        &config,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
}

/// `vcfed sites forget`: refused for a site that is alive, for one that
/// holds nodes of a live cluster mastered here (naming the cluster), and
/// for a name nobody knows; with --force, the vanished worker's part is
/// fenced and replaced at once, and the site leaves the view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_site_is_forgotten_and_with_force_its_parts_end() {
    // A long grace period: nothing heals by itself during the test.
    let mut members = start_federation_with(
        &[("site-a", 2), ("site-b", 4), ("site-c", 4)],
        "heal_grace = \"30m\"",
    )
    .await;
    let config = members[0].site.config_arg().to_owned();
    let out = vcfed(&[
        "cluster",
        "create",
        "--config",
        &config,
        "--name",
        "lose",
        "--nodes",
        "4",
        "--duration",
        "1h",
        "--wait",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let record = cluster(&members[0], "lose").await;
    let worker = record
        .parts
        .iter()
        .find(|p| !p.frontend && p.state == PartState::Committed)
        .expect("a worker part")
        .site
        .clone();
    let (lost, other) = if worker == "site-b" {
        (1, "site-c")
    } else {
        (2, "site-b")
    };

    let forget = |site: &str, force: bool| {
        let mut args = vec!["sites", "forget", site, "--config", config.as_str()];
        if force {
            args.push("--force");
        }
        vcfed(&args)
    };
    let out = forget(&worker, false);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("is alive"),
        "{}",
        common::stderr(&out)
    );
    let out = forget("site-zz", false);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("no site \"site-zz\""),
        "{}",
        common::stderr(&out)
    );

    members[lost].agent.take().expect("running").kill();
    let peer = members[lost].peer_id.clone();
    eventually(
        "site-a sees the worker gone",
        Duration::from_secs(20),
        || async {
            let report = common::view(&members[0].client).await;
            report
                .sites
                .iter()
                .find(|s| s.peer_id == peer)
                .is_some_and(|s| s.state == vcfed_registry::SiteState::Gone)
        },
    )
    .await;
    let out = forget(&worker, false);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(
        err.contains("still holds nodes") && err.contains(&record.id),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");

    let out = forget(&worker, true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        text.contains(&format!("forgot {worker}")) && text.contains(&record.id),
        "{text}"
    );
    // Fenced at once and replaced at the other worker; the site is gone
    // from the view.
    let healed = eventually(
        "the cluster is whole again at the other worker",
        Duration::from_secs(20),
        || async {
            let record = cluster(&members[0], "lose").await;
            let fenced = record.parts.iter().any(|p| {
                p.site == worker && p.lost_at_ms.is_some() && p.state != PartState::Committed
            });
            let replaced: u32 = record
                .parts
                .iter()
                .filter(|p| p.site == other && p.state == PartState::Committed)
                .map(|p| p.nodes)
                .sum();
            fenced && replaced == 3
        },
    )
    .await;
    eprintln!(
        "whole again {:.1}s after the forced forget",
        healed.as_secs_f64()
    );
    // Gone from the view, and the other sites' relays of its old adverts
    // (anti-entropy every 500 ms here) do not bring it back.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        let report = common::view(&members[0].client).await;
        assert!(report.sites.iter().all(|s| s.peer_id != peer), "{report:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events: Vec<vcfed_storage::Event> = members[0]
        .client
        .get("/v1/events?limit=1000")
        .await
        .unwrap();
    let lost_event = events
        .iter()
        .find(|e| e.kind == "cluster.part_lost")
        .expect("a cluster.part_lost event");
    assert!(
        lost_event.detail["reason"]
            .as_str()
            .unwrap()
            .contains("forgotten")
    );
    assert!(events.iter().any(|e| e.kind == "cluster.healed"));
}

/// `cluster create --wait --json` prints the cluster as soon as it is
/// accepted (one JSON object per line), and a cluster deleted while it is
/// reserved ends the wait with an error that says so, not with success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_wait_prints_the_id_at_once_and_fails_for_a_cluster_deleted_meanwhile() {
    let members = start_federation(&[("site-a", 2), ("site-b", 4)]).await;
    let config = members[0].site.config_arg().to_owned();
    // The worker stops answering: the reservation waits for it.
    let worker = members[1].agent.as_ref().expect("running").pid();
    common::signal(worker, "STOP");
    let create = std::process::Command::new(common::vcfed_bin())
        .args([
            "cluster",
            "create",
            "--config",
            &config,
            "--name",
            "doomed",
            "--nodes",
            "3",
            "--duration",
            "1h",
            "--wait",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(
        "the cluster is reserving at site-a",
        Duration::from_secs(10),
        || async {
            let all: Vec<ClusterRecord> = members[0].client.get("/v1/clusters").await.unwrap();
            all.iter()
                .any(|c| c.name == "doomed" && c.state == ClusterState::Reserving)
        },
    )
    .await;
    let out = vcfed(&["cluster", "delete", "doomed", "--config", &config]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let out = create.wait_with_output().unwrap();
    common::signal(worker, "CONT");
    assert!(
        !out.status.success(),
        "create --wait succeeded for a deleted cluster"
    );
    let err = common::stderr(&out);
    assert!(
        err.contains("was deleted before its nodes were reserved"),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first: ClusterRecord = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first.name, "doomed");
    assert_eq!(first.state, ClusterState::Reserving);
    // Then the settled record, then (`--json` errors are JSON) the error.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let last: ClusterRecord = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(last.id, first.id);
    let error: Value = serde_json::from_str(lines[2]).unwrap();
    assert!(error.to_string().contains("was deleted"), "{error}");
    assert!(matches!(
        last.state,
        ClusterState::Stopping | ClusterState::Finished
    ));
}

/// A restarted agent has an empty view although it remembers its peers:
/// a request that needs them waits for their adverts instead of being
/// refused as if the federation were full; with a remembered site that
/// stays silent it answers 503 `federation_not_ready` (bounded), and once
/// the warm-up is over, the real answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_site_tells_not_heard_yet_from_full() {
    let mut members = start_federation(&[("site-a", 2), ("site-b", 4)]).await;
    let body = |name: &str| json!({"name": name, "nodes": 4, "duration": "1h"});

    // Restart site-a: its first request needs site-b (it has one compute
    // slot besides the frontend's), whose advert it has not heard yet.
    members[0].agent.take().expect("running").kill();
    members[0].agent = Some(members[0].site.spawn());
    common::wait_ready(&members[0].client).await;
    let asked = Instant::now();
    let (status, answer) = create(&members[0], body("after-restart")).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    eprintln!(
        "created {:.2}s after the restarted agent's API answered",
        asked.elapsed().as_secs_f64()
    );
    let id = answer["id"].as_str().unwrap().to_owned();
    assert_eq!(
        wait_settled(&members[0], &id).await.state,
        ClusterState::Reserved
    );

    // Its slots are needed again below.
    let (status, _) = members[0]
        .client
        .raw::<Value>(Method::DELETE, &format!("/v1/clusters/{id}"), None)
        .await
        .unwrap();
    assert!(status.is_success(), "{status}");
    eventually("the cluster ends", Duration::from_secs(20), || async {
        cluster(&members[0], &id).await.state == ClusterState::Finished
    })
    .await;

    // Now site-b is down for good and site-a restarts with a slow refresh
    // (a warm-up of 20.5 s, room for a slow start on a loaded machine):
    // "not known yet", then "too few nodes".
    members[1].agent.take().expect("running").kill();
    members[0].agent.take().expect("running").kill();
    let config = std::fs::read_to_string(&members[0].site.config_path).unwrap();
    let slow = config.replace(
        common::FAST_GOSSIP,
        "advert_ttl = \"40s\"\nadvert_refresh = \"20s\"\nanti_entropy = \"500ms\"",
    );
    assert_ne!(config, slow, "the fast gossip settings are in the config");
    std::fs::write(&members[0].site.config_path, slow).unwrap();
    let started = Instant::now();
    members[0].agent = Some(members[0].site.spawn());
    common::wait_ready(&members[0].client).await;
    let asked = Instant::now();
    let (status, answer) = create(&members[0], body("site-b-silent")).await;
    let waited = asked.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"]["code"], "federation_not_ready", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("heard from 0 of the 1 sites") && message.contains("try again in"),
        "{message}"
    );
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "the request waits about 5 s first, it waited {waited:?}"
    );
    // Nothing was stored or held for the refused request.
    let list: Vec<ClusterRecord> = members[0].client.get("/v1/clusters").await.unwrap();
    assert!(list.iter().all(|c| c.name != "site-b-silent"), "{list:?}");
    // After the warm-up, the federation's real state: too few nodes.
    assert!(
        started.elapsed() < Duration::from_millis(20_500),
        "the answer came after the warm-up: the test cannot tell"
    );
    let remaining = Duration::from_millis(20_500).saturating_sub(started.elapsed());
    tokio::time::sleep(remaining + Duration::from_millis(200)).await;
    let (status, answer) = create(&members[0], body("site-b-silent")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["code"], "insufficient_capacity", "{answer}");
}
