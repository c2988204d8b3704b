//! Gossip discovery with real agents on loopback: five sites bootstrapped
//! from the first one see each other, see capacity changes, notice a dead
//! site and its return, and never see an agent without the federation key.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{Site, eventually, free_port, start, vcfed, view};
use vcfed::api::{HoldBody, InstantArg, OwnerBody};
use vcfed::federation::SitesReport;
use vcfed_registry::SiteState;
use vcfed_storage::Reservation;

/// Gossip timing of the test federation (short, so the test is quick).
const TIMING: &str = "advert_ttl = \"3s\"\nadvert_refresh = \"1s\"\nanti_entropy = \"500ms\"";
const TTL: Duration = Duration::from_secs(3);
const REFRESH: Duration = Duration::from_secs(1);

fn state_of(report: &SitesReport, peer_id: &str) -> Option<SiteState> {
    report
        .sites
        .iter()
        .find(|s| s.peer_id == peer_id)
        .map(|s| s.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_agents_discover_each_other_by_gossip() {
    let keys = tempfile::tempdir().unwrap();
    let psk = keys.path().join("federation.psk");
    let wrong_psk = keys.path().join("other.psk");
    for path in [&psk, &wrong_psk] {
        let out = vcfed(&["psk", "generate", "--out", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", common::stderr(&out));
    }
    let settings = format!("psk_file = \"{}\"\n{TIMING}", psk.display());

    // Agent 1 first; everyone else bootstraps from it alone.
    let port = free_port();
    let first = Site::init_with("site-1", 4, &format!("/ip4/127.0.0.1/tcp/{port}"), &[]);
    first.add_federation_settings(&settings);
    let first = start(first).await;
    let bootstrap = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", first.peer_id);
    let started = Instant::now();
    let mut members = vec![first];
    for i in 2..=5 {
        let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
        let site = Site::init_with(
            &format!("site-{i}"),
            4 + i,
            &listen,
            &["--bootstrap", &bootstrap],
        );
        site.add_federation_settings(&settings);
        members.push(start(site).await);
    }
    let ids: Vec<String> = members.iter().map(|m| m.peer_id.clone()).collect();

    let full_view = eventually(
        "every agent sees all 5 sites alive",
        Duration::from_secs(20),
        || async {
            for member in &members {
                let report = view(&member.client).await;
                if ids
                    .iter()
                    .any(|id| state_of(&report, id) != Some(SiteState::Alive))
                {
                    return false;
                }
            }
            true
        },
    )
    .await;
    eprintln!(
        "full view at all 5 agents {:.2}s after the last agent started ({:.2}s after the first)",
        full_view.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // A capacity change at agent 4 reaches everyone.
    let agent4 = &members[3];
    let hold = HoldBody {
        key: "k4".into(),
        cluster_id: "c".into(),
        requester: None,
        start: InstantArg::Text("now".into()),
        end: InstantArg::Text("+1h".into()),
        nodes: 3,
        shape: None,
        lease_s: Some(600),
    };
    let _: Reservation = agent4.client.post("/v1/reservations", &hold).await.unwrap();
    let _: Reservation = agent4
        .client
        .post("/v1/reservations/k4/commit", &OwnerBody::default())
        .await
        .unwrap();
    let id4 = ids[3].clone();
    let change = eventually(
        "agent 4's capacity change is seen everywhere",
        Duration::from_secs(10),
        || async {
            for member in &members {
                let report = view(&member.client).await;
                let Some(site) = report.sites.iter().find(|s| s.peer_id == id4) else {
                    return false;
                };
                if site.free_now != 8 - 3 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    eprintln!(
        "capacity change seen by all in {:.2}s",
        change.as_secs_f64()
    );

    // Steady state: payload bytes each agent sends per second.
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for member in &members {
            v.push(view(&member.client).await.stats.bytes_sent);
        }
        v
    };
    let window = Duration::from_secs(5);
    tokio::time::sleep(window).await;
    let mut rates = Vec::new();
    for (member, before) in members.iter().zip(&before) {
        let after = view(&member.client).await.stats.bytes_sent;
        rates.push((after - before) as f64 / window.as_secs_f64());
    }
    eprintln!(
        "steady-state gossip payload per agent: {rates:.0?} bytes/s (refresh 1s, anti-entropy 0.5s)"
    );

    // Agent 3 dies: the others mark it gone within TTL + one refresh interval.
    let id3 = ids[2].clone();
    let version_before = view(&members[0].client)
        .await
        .sites
        .iter()
        .find(|s| s.peer_id == id3)
        .unwrap()
        .version;
    members[2].agent.as_mut().unwrap().kill();
    let gone = eventually(
        "agent 3 is gone everywhere",
        TTL + REFRESH + Duration::from_secs(5),
        || async {
            for (i, member) in members.iter().enumerate() {
                if i != 2 && state_of(&view(&member.client).await, &id3) != Some(SiteState::Gone) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    eprintln!(
        "agent 3 marked gone {:.2}s after SIGKILL (TTL 3s + refresh 1s)",
        gone.as_secs_f64()
    );
    assert!(
        gone <= TTL + REFRESH + Duration::from_millis(1500),
        "gone after {gone:?}"
    );

    // Agent 3 restarts with no bootstrap: it rejoins through the peers its
    // ledger remembers, with a higher advert version.
    let config = std::fs::read_to_string(&members[2].site.config_path).unwrap();
    let without_bootstrap: String = config
        .lines()
        .map(|line| {
            if line.starts_with("bootstrap = ") {
                "bootstrap = []"
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&members[2].site.config_path, without_bootstrap).unwrap();
    members[2].agent = Some(members[2].site.spawn());
    common::wait_ready(&members[2].client).await;
    // With no bootstrap it can only have found the others in its ledger.
    let log = members[2].agent.as_ref().unwrap().log();
    assert!(log.contains("dialing known peers"), "{log}");
    eventually(
        "agent 3 is alive again everywhere",
        Duration::from_secs(15),
        || async {
            for member in &members {
                let report = view(&member.client).await;
                let Some(site) = report.sites.iter().find(|s| s.peer_id == id3) else {
                    return false;
                };
                if site.state != SiteState::Alive || site.version <= version_before {
                    return false;
                }
            }
            true
        },
    )
    .await;

    // An agent with another federation key never gets in.
    let intruder = Site::init_with(
        "intruder",
        4,
        "/ip4/127.0.0.1/tcp/0",
        &["--bootstrap", &bootstrap],
    );
    intruder.add_federation_settings(&format!("psk_file = \"{}\"\n{TIMING}", wrong_psk.display()));
    let intruder = start(intruder).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    for member in &members {
        let report = view(&member.client).await;
        assert_eq!(
            state_of(&report, &intruder.peer_id),
            None,
            "the intruder appears in a member's view"
        );
        assert_eq!(report.sites.len(), 5);
    }
    let intruder_view = view(&intruder.client).await;
    assert_eq!(intruder_view.sites.len(), 1, "the intruder sees nobody");
    assert_eq!(intruder_view.connected_peers, 0);

    // The CLI shows the same view.
    let out = vcfed(&["sites", "--config", members[0].site.config_arg()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("site-1 (this site)") && text.contains("site-5"),
        "{text}"
    );

    for member in &mut members {
        let status = member
            .agent
            .as_mut()
            .unwrap()
            .terminate(Duration::from_secs(10));
        assert!(status.success(), "agent exit {status:?}");
    }
}

/// `vcfed join` waits for the outcome and says it: joined (with the site's
/// name), refused for the private federation's key, the wrong peer id,
/// nothing listening; only the address that answered is remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_says_what_happened_and_remembers_only_what_answered() {
    let keys = tempfile::tempdir().unwrap();
    let psk = keys.path().join("federation.psk");
    let other_psk = keys.path().join("other.psk");
    for path in [&psk, &other_psk] {
        let out = vcfed(&["psk", "generate", "--out", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", common::stderr(&out));
    }
    let member = |name: &str, key: &std::path::Path| {
        let site = Site::init_with(name, 2, &format!("/ip4/127.0.0.1/tcp/{}", free_port()), &[]);
        site.add_federation_settings(&format!("psk_file = \"{}\"\n{TIMING}", key.display()));
        site
    };
    let port_a = free_port();
    let a = Site::init_with("join-a", 2, &format!("/ip4/127.0.0.1/tcp/{port_a}"), &[]);
    a.add_federation_settings(&format!("psk_file = \"{}\"\n{TIMING}", psk.display()));
    let a = start(a).await;
    let mut b = start(member("join-b", &psk)).await;
    let outsider = start(member("join-x", &other_psk)).await;
    let addr_a = format!("/ip4/127.0.0.1/tcp/{port_a}/p2p/{}", a.peer_id);

    let joined = vcfed(&["join", "--config", b.site.config_arg(), &addr_a]);
    assert!(joined.status.success(), "{}", common::stderr(&joined));
    let said = String::from_utf8_lossy(&joined.stdout);
    assert!(said.contains("joined join-a"), "{said}");

    let refused = vcfed(&["join", "--config", outsider.site.config_arg(), &addr_a]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "{}",
        common::stderr(&refused)
    );
    assert!(
        common::stderr(&refused).contains("pre-shared key"),
        "{}",
        common::stderr(&refused)
    );

    eprintln!("refused: {}", common::stderr(&refused).trim());
    let wrong_id = format!("/ip4/127.0.0.1/tcp/{port_a}/p2p/{}", outsider.peer_id);
    let wrong = vcfed(&["join", "--config", b.site.config_arg(), &wrong_id]);
    assert_eq!(wrong.status.code(), Some(2), "{}", common::stderr(&wrong));
    assert!(
        common::stderr(&wrong).contains(&format!("not {}", outsider.peer_id)),
        "{}",
        common::stderr(&wrong)
    );

    eprintln!("wrong peer id: {}", common::stderr(&wrong).trim());
    let nobody = format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
        free_port(),
        outsider.peer_id
    );
    let started = Instant::now();
    let unreachable = vcfed(&["join", "--config", b.site.config_arg(), &nobody]);
    assert_eq!(
        unreachable.status.code(),
        Some(1),
        "{}",
        common::stderr(&unreachable)
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    eprintln!(
        "unreachable said in {:?}: {}",
        started.elapsed(),
        common::stderr(&unreachable).trim()
    );

    // B remembers A, and nothing of the addresses that failed.
    let status = b.agent.as_mut().unwrap().terminate(Duration::from_secs(10));
    assert!(status.success(), "agent exit {status:?}");
    let ledger = vcfed_storage::Ledger::open(&b.site.config().ledger_path()).unwrap();
    let peers = ledger.peers().unwrap();
    assert!(peers.iter().any(|p| p.peer_id == a.peer_id), "{peers:?}");
    assert!(
        peers.iter().all(|p| p.peer_id != outsider.peer_id),
        "{peers:?}"
    );
}
