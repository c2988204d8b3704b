//! Durability: an agent killed with SIGKILL in the middle of a burst of
//! holds and commits loses none that it acknowledged.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vcfed::api::{HoldBody, InstantArg, OwnerBody};
use vcfed_storage::{Ledger, Reservation, ReservationFilter, ReservationState};

/// Operations in the burst: holds, each followed by its commit.
const BURST_OPS: usize = 1000;
/// Acknowledged operations after which the agent is killed.
const KILL_AFTER_ACKS: usize = 500;
/// Concurrent clients.
const CLIENTS: usize = 8;

#[test]
fn sigkill_during_a_burst_loses_no_acknowledged_write() {
    let site = common::Site::init("site-a", 100_000);
    let mut agent = site.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = site.client();
    runtime.block_on(common::wait_ready(&client));

    // key -> strongest state the agent acknowledged.
    let acked: Arc<Mutex<BTreeMap<String, ReservationState>>> = Arc::default();
    let (killed_tx, killed_rx) = tokio::sync::watch::channel(false);
    let holds_per_client = BURST_OPS / 2 / CLIENTS;
    let pid = agent.pid();

    runtime.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let client = client.clone();
            let acked = acked.clone();
            let mut killed = killed_rx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..holds_per_client {
                    if *killed.borrow_and_update() {
                        return;
                    }
                    let key = format!("c{c}-{i}");
                    let body = HoldBody {
                        key: key.clone(),
                        cluster_id: format!("cluster-{c}"),
                        requester: None,
                        start: InstantArg::Text("+1h".into()),
                        end: InstantArg::Text("+2h".into()),
                        nodes: 1,
                        shape: None,
                        lease_s: Some(3600),
                    };
                    let Ok(_) = client
                        .post::<_, Reservation>("/v1/reservations", &body)
                        .await
                    else {
                        return;
                    };
                    acked
                        .lock()
                        .unwrap()
                        .insert(key.clone(), ReservationState::Held);
                    let path = format!("/v1/reservations/{key}/commit");
                    let Ok(_) = client
                        .post::<_, Reservation>(&path, &OwnerBody::default())
                        .await
                    else {
                        return;
                    };
                    acked
                        .lock()
                        .unwrap()
                        .insert(key, ReservationState::Committed);
                }
            }));
        }
        // Kill once enough acknowledgements are in, while clients are still busy.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let count: usize = acked
                .lock()
                .unwrap()
                .values()
                .map(|s| {
                    if *s == ReservationState::Committed {
                        2
                    } else {
                        1
                    }
                })
                .sum();
            if count >= KILL_AFTER_ACKS {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "burst too slow: {count} acks in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        common::signal(pid, "KILL");
        let _ = killed_tx.send(true);
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("clients stop")
                .unwrap();
        }
    });
    agent.kill();

    let acked = acked.lock().unwrap().clone();
    let acks: usize = acked
        .values()
        .map(|s| {
            if *s == ReservationState::Committed {
                2
            } else {
                1
            }
        })
        .sum();
    assert!(acks >= KILL_AFTER_ACKS, "{acks} acks");
    assert!(
        acks < BURST_OPS,
        "the kill must land mid-burst, but all {acks} ops were acknowledged"
    );

    let ledger =
        Ledger::open(&site.config().ledger_path()).expect("the ledger reopens after SIGKILL");
    let stored: BTreeMap<String, Reservation> = ledger
        .reservations(ReservationFilter::All, vcfed::time::now_ms())
        .unwrap()
        .into_iter()
        .map(|r| (r.key.clone(), r))
        .collect();
    for (key, state) in &acked {
        let reservation = stored
            .get(key)
            .unwrap_or_else(|| panic!("acknowledged hold {key} is lost"));
        if *state == ReservationState::Committed {
            assert_eq!(
                reservation.state,
                ReservationState::Committed,
                "acknowledged commit of {key} is lost"
            );
        } else {
            assert!(
                matches!(
                    reservation.state,
                    ReservationState::Held | ReservationState::Committed
                ),
                "{key}"
            );
        }
    }
    eprintln!(
        "{acks} acknowledged operations before SIGKILL, all {} reservations found",
        acked.len()
    );

    // The agent restarts on the same ledger and still has them.
    let mut agent = site.spawn();
    runtime.block_on(async {
        common::wait_ready(&client).await;
        let listed: Vec<Reservation> = client.get("/v1/reservations").await.unwrap();
        assert!(listed.len() >= acked.len());
    });
    assert!(agent.terminate(Duration::from_secs(10)).success());
}
