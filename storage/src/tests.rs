use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const SHAPE: NodeShape = NodeShape {
    cores: 2,
    memory_mib: 4096,
    disk_gib: 20,
};

fn inventory(slots: u32) -> Inventory {
    Inventory {
        node: SHAPE,
        hosts: vec![InventoryHost {
            name: "nodes".into(),
            cores: 2 * slots,
            memory_mib: 4096 * u64::from(slots),
            disk_gib: 20 * u64::from(slots),
            slots,
        }],
    }
}

fn ledger(slots: u32) -> Ledger {
    let mut ledger = Ledger::open_in_memory().unwrap();
    ledger.set_inventory(&inventory(slots), 0).unwrap();
    ledger
}

fn request(key: &str, start_ms: i64, end_ms: i64, nodes: u32, lease_ms: i64) -> HoldRequest {
    HoldRequest {
        key: key.into(),
        cluster_id: format!("cluster-{key}"),
        requester: "site-a".into(),
        window: Window::new(start_ms, end_ms).unwrap(),
        nodes,
        shape: SHAPE,
        lease_ms,
    }
}

fn held(outcome: HoldOutcome) -> Reservation {
    match outcome {
        HoldOutcome::Held(reservation) => reservation,
        HoldOutcome::Denied { available } => panic!("denied, {available} available"),
    }
}

#[test]
fn migrates_from_empty_and_reopens_with_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let mut ledger = Ledger::open(&path).unwrap();
        assert_eq!(
            ledger.schema_version().unwrap() as usize,
            schema::MIGRATIONS.len()
        );
        ledger.set_inventory(&inventory(4), 0).unwrap();
        held(ledger.hold(&request("a", 0, 100, 2, 10), 0).unwrap());
        ledger.commit("a", "site-a", 1).unwrap();
        ledger
            .upsert_peer(
                "12D3KooWpeer",
                Some("site-b"),
                &["/ip4/198.18.0.2/tcp/7781".into()],
                1,
            )
            .unwrap();
    }
    let ledger = Ledger::open(&path).unwrap();
    assert_eq!(
        ledger.schema_version().unwrap() as usize,
        schema::MIGRATIONS.len()
    );
    assert_eq!(ledger.capacity().unwrap(), 4);
    assert_eq!(ledger.inventory().unwrap(), Some(inventory(4)));
    assert_eq!(
        ledger.reservation("a").unwrap().unwrap().state,
        ReservationState::Committed
    );
    assert_eq!(
        ledger.peers().unwrap()[0].site_name.as_deref(),
        Some("site-b")
    );
}

#[test]
fn refuses_a_ledger_from_a_newer_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    drop(Ledger::open(&path).unwrap());
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = Ledger::open(&path).unwrap_err();
    assert!(
        matches!(err, LedgerError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade vcfed"));
}

#[test]
fn hold_never_overbooks_and_reports_what_is_free() {
    let mut ledger = ledger(4);
    held(ledger.hold(&request("a", 0, 100, 3, 50), 0).unwrap());
    assert_eq!(
        ledger.hold(&request("b", 50, 150, 2, 50), 0).unwrap(),
        HoldOutcome::Denied { available: 1 }
    );
    // Outside the first window the whole site is free.
    held(ledger.hold(&request("c", 100, 150, 4, 50), 0).unwrap());
    assert_eq!(
        ledger.free_steps(Window::new(0, 200).unwrap(), 0).unwrap(),
        vec![
            Step { at_ms: 0, free: 1 },
            Step {
                at_ms: 100,
                free: 0
            },
            Step {
                at_ms: 150,
                free: 4
            }
        ]
    );
    assert_eq!(
        ledger
            .reservations(ReservationFilter::All, 0)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn a_shape_larger_than_the_slot_is_denied() {
    let mut ledger = ledger(4);
    let mut big = request("a", 0, 10, 1, 10);
    big.shape.cores = 64;
    assert_eq!(
        ledger.hold(&big, 0).unwrap(),
        HoldOutcome::Denied { available: 0 }
    );
}

#[test]
fn retries_are_idempotent_and_conflicts_refused() {
    let mut ledger = ledger(4);
    let first = held(ledger.hold(&request("a", 0, 100, 3, 50), 0).unwrap());
    let again = held(ledger.hold(&request("a", 0, 100, 3, 50), 5).unwrap());
    assert_eq!(first, again);
    assert!(matches!(
        ledger.hold(&request("a", 0, 100, 2, 50), 5),
        Err(LedgerError::KeyConflict(_))
    ));
    let committed = ledger.commit("a", "site-a", 6).unwrap();
    assert_eq!(committed.state, ReservationState::Committed);
    assert_eq!(committed.lease_expires_at_ms, None);
    assert_eq!(ledger.commit("a", "site-a", 7).unwrap(), committed);
    assert_eq!(
        held(ledger.hold(&request("a", 0, 100, 3, 50), 8).unwrap()),
        committed
    );
    assert_eq!(
        ledger.available(Window::new(0, 100).unwrap(), 8).unwrap(),
        1
    );
}

#[test]
fn only_the_requester_may_commit_or_release() {
    let mut ledger = ledger(4);
    held(ledger.hold(&request("a", 0, 100, 1, 50), 0).unwrap());
    assert!(matches!(
        ledger.commit("a", "site-x", 1),
        Err(LedgerError::NotOwner { .. })
    ));
    assert!(matches!(
        ledger.release("a", "site-x", 1),
        Err(LedgerError::NotOwner { .. })
    ));
    assert!(matches!(
        ledger.commit("nope", "site-a", 1),
        Err(LedgerError::UnknownReservation(_))
    ));
    assert_eq!(
        ledger.reservation("a").unwrap().unwrap().state,
        ReservationState::Held
    );
}

#[test]
fn leases_run_out_and_the_sweep_records_it() {
    let mut ledger = ledger(4);
    held(ledger.hold(&request("a", 0, 100, 4, 10), 0).unwrap());
    assert_eq!(
        ledger.available(Window::new(0, 100).unwrap(), 9).unwrap(),
        0
    );
    // At the lease's end the hold stops counting, swept or not.
    assert_eq!(
        ledger.available(Window::new(0, 100).unwrap(), 10).unwrap(),
        4
    );
    let err = ledger.commit("a", "site-a", 10).unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::WrongState {
                state: ReservationState::Expired,
                ..
            }
        ),
        "{err}"
    );
    held(ledger.hold(&request("b", 0, 100, 1, 10), 11).unwrap());
    let swept = ledger.sweep_expired(21).unwrap();
    assert_eq!(
        swept.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    assert!(ledger.sweep_expired(22).unwrap().is_empty());
    assert_eq!(
        ledger.reservation("a").unwrap().unwrap().state,
        ReservationState::Expired
    );
    assert!(
        ledger
            .reservations(ReservationFilter::Active, 22)
            .unwrap()
            .is_empty()
    );
    let kinds: Vec<String> = ledger
        .events(0, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(
        kinds.contains(&"reservation.expired".to_owned()),
        "{kinds:?}"
    );
}

#[test]
fn restart_keeps_commitments_and_drops_expired_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let mut ledger = Ledger::open(&path).unwrap();
        ledger.set_inventory(&inventory(8), 0).unwrap();
        for i in 0..4 {
            held(
                ledger
                    .hold(&request(&format!("c{i}"), 0, 1000, 1, 100), 0)
                    .unwrap(),
            );
            ledger.commit(&format!("c{i}"), "site-a", 1).unwrap();
            held(
                ledger
                    .hold(&request(&format!("h{i}"), 0, 1000, 1, 100), 0)
                    .unwrap(),
            );
        }
    }
    let mut ledger = Ledger::open(&path).unwrap();
    ledger.sweep_expired(500).unwrap();
    let active = ledger.reservations(ReservationFilter::Active, 500).unwrap();
    assert_eq!(
        active.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["c0", "c1", "c2", "c3"]
    );
    let expired = ledger.reservations(ReservationFilter::All, 500).unwrap();
    assert!(
        expired
            .iter()
            .filter(|r| r.key.starts_with('h'))
            .all(|r| r.state == ReservationState::Expired)
    );
}

#[test]
fn shrinking_the_inventory_keeps_reservations() {
    let mut ledger = ledger(4);
    held(ledger.hold(&request("a", 0, 100, 4, 50), 0).unwrap());
    ledger.commit("a", "site-a", 0).unwrap();
    ledger.set_inventory(&inventory(2), 1).unwrap();
    assert_eq!(
        ledger.reservation("a").unwrap().unwrap().state,
        ReservationState::Committed
    );
    assert_eq!(
        ledger.available(Window::new(0, 100).unwrap(), 1).unwrap(),
        0
    );
    assert_eq!(
        ledger.hold(&request("b", 50, 60, 1, 50), 1).unwrap(),
        HoldOutcome::Denied { available: 0 }
    );
}

#[test]
fn invalid_holds_write_nothing() {
    let mut ledger = ledger(4);
    for bad in [
        request("", 0, 10, 1, 10),
        request("a", 0, 10, 0, 10),
        request("a", 0, 10, 1, 0),
        {
            let mut r = request("a", 0, 10, 1, 10);
            r.key = "k".repeat(KEY_LEN_MAX + 1);
            r
        },
    ] {
        assert!(
            matches!(ledger.hold(&bad, 0), Err(LedgerError::Invalid(_))),
            "{bad:?}"
        );
    }
    assert!(
        ledger
            .reservations(ReservationFilter::All, 0)
            .unwrap()
            .is_empty()
    );
}

fn part(site: &str, attempt: u32, nodes: u32, frontend: bool, state: PartState) -> ClusterPart {
    ClusterPart {
        site: site.into(),
        peer_id: Some(format!("peer-{site}")),
        attempt,
        nodes,
        frontend,
        state,
        reservation_key: Some(format!("c-1/{attempt}")),
        gateway: (attempt == 2).then(|| GatewayRef {
            endpoint: format!("{site}.example:7782"),
            public_key: "a2V5".into(),
        }),
        first_node: None,
        lost_at_ms: None,
    }
}

#[test]
fn clusters_round_trip_with_parts() {
    let mut ledger = ledger(4);
    let record = ClusterRecord {
        id: "c-1".into(),
        name: "demo".into(),
        master_site: "site-a".into(),
        request: serde_json::json!({ "nodes": 10 }),
        state: ClusterState::Requested,
        reason: None,
        parts: vec![part("site-a", 0, 4, true, PartState::Held)],
        segment: Some(77),
        epoch: 0,
        created_at_ms: 5,
        updated_at_ms: 5,
    };
    assert_eq!(ledger.insert_cluster(&record).unwrap(), record);
    assert_eq!(ledger.insert_cluster(&record).unwrap(), record);
    let parts = [
        part("site-a", 0, 0, true, PartState::Committed),
        part("site-b", 1, 6, false, PartState::Released),
        part("site-b", 2, 4, false, PartState::Committing),
    ];
    let updated = ledger
        .update_cluster("c-1", ClusterState::Reserved, None, Some(&parts), 9)
        .unwrap();
    assert_eq!(updated.parts, parts);
    assert_eq!(updated.state, ClusterState::Reserved);
    let failed = ledger
        .update_cluster("c-1", ClusterState::Failed, Some("site-b gone"), None, 10)
        .unwrap();
    assert_eq!(failed.reason.as_deref(), Some("site-b gone"));
    assert_eq!(failed.parts, parts);
    assert_eq!(ledger.clusters().unwrap(), vec![failed]);
    assert!(
        ledger
            .update_cluster("nope", ClusterState::Failed, None, None, 10)
            .is_err()
    );
}

#[test]
fn a_live_cluster_is_found_by_name_at_its_master() {
    let mut ledger = ledger(4);
    let cluster = |id: &str, master: &str, at: i64| ClusterRecord {
        id: id.into(),
        name: "dup".into(),
        master_site: master.into(),
        request: serde_json::json!({ "nodes": 1 }),
        state: ClusterState::Reserving,
        reason: None,
        parts: Vec::new(),
        segment: None,
        epoch: 0,
        created_at_ms: at,
        updated_at_ms: at,
    };
    ledger
        .insert_cluster(&cluster("c-old", "site-a", 1))
        .unwrap();
    ledger
        .insert_cluster(&cluster("c-elsewhere", "site-b", 2))
        .unwrap();
    let found = |ledger: &Ledger| {
        ledger
            .live_cluster_named("site-a", "dup")
            .unwrap()
            .map(|c| c.id)
    };
    assert_eq!(found(&ledger).as_deref(), Some("c-old"));
    assert_eq!(ledger.live_cluster_named("site-a", "other").unwrap(), None);
    // Stopping is still live: its nodes are not all back yet.
    ledger
        .update_cluster("c-old", ClusterState::Stopping, None, None, 3)
        .unwrap();
    assert_eq!(found(&ledger).as_deref(), Some("c-old"));
    ledger
        .update_cluster("c-old", ClusterState::Finished, None, None, 4)
        .unwrap();
    assert_eq!(found(&ledger), None, "a finished cluster frees its name");
    ledger
        .insert_cluster(&cluster("c-new", "site-a", 5))
        .unwrap();
    ledger
        .update_cluster("c-new", ClusterState::Failed, Some("no room"), None, 6)
        .unwrap();
    assert_eq!(found(&ledger), None, "a failed cluster frees its name");
}

#[test]
fn peers_merge_addresses() {
    let mut ledger = ledger(1);
    ledger.upsert_peer("p1", None, &["/a".into()], 1).unwrap();
    let peer = ledger
        .upsert_peer("p1", Some("site-b"), &["/b".into(), "/a".into()], 2)
        .unwrap();
    assert_eq!(peer.addrs, ["/b", "/a"]);
    let many: Vec<String> = (0..40).map(|i| format!("/{i}")).collect();
    let capped = ledger.upsert_peer("p1", None, &many, 2).unwrap();
    assert_eq!(capped.addrs.len(), PEER_ADDRS_MAX);
    assert_eq!(capped.addrs.last().map(String::as_str), Some("/39"));
    assert_eq!((peer.first_seen_ms, capped.last_seen_ms), (1, 2));
    assert_eq!(
        ledger
            .upsert_peer("p1", None, &[], 3)
            .unwrap()
            .site_name
            .as_deref(),
        Some("site-b")
    );
    assert!(ledger.remove_peer("p1").unwrap());
    assert!(ledger.peers().unwrap().is_empty());
}

/// One step of the calendar property test.
#[derive(Debug, Clone)]
enum Op {
    Hold {
        key: u8,
        start_ms: i64,
        len_ms: i64,
        nodes: u32,
        lease_ms: i64,
    },
    Commit {
        key: u8,
    },
    Release {
        key: u8,
    },
    Advance {
        ms: i64,
    },
    Sweep,
    RetryLast,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..12, 0i64..200, 1i64..100, 1u32..5, 1i64..60)
            .prop_map(|(key, start_ms, len_ms, nodes, lease_ms)| Op::Hold { key, start_ms, len_ms, nodes, lease_ms }),
        2 => (0u8..12).prop_map(|key| Op::Commit { key }),
        1 => (0u8..12).prop_map(|key| Op::Release { key }),
        2 => (0i64..30).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Sweep),
        2 => Just(Op::RetryLast),
    ]
}

/// What the model expects of a reservation.
#[derive(Debug, Clone)]
struct ModelEntry {
    request: HoldRequest,
    state: ReservationState,
    lease_expires_at_ms: i64,
}

impl ModelEntry {
    fn counts_at(&self, now_ms: i64) -> bool {
        self.state == ReservationState::Committed
            || (self.state == ReservationState::Held && self.lease_expires_at_ms > now_ms)
    }
}

/// Nodes in use at instant `t` by the reservations that count at `now_ms`.
fn used_at(entries: &[Reservation], now_ms: i64, t: i64) -> u64 {
    entries
        .iter()
        .filter(|r| r.counts_at(now_ms) && r.window.start_ms <= t && t < r.window.end_ms)
        .map(|r| u64::from(r.nodes))
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random holds, commits, releases, lease expiries and retries: at every
    /// instant held + committed never exceeds capacity, every admission
    /// decision matches a brute-force model, and retries change nothing.
    #[test]
    fn calendar_never_overbooks(ops in prop::collection::vec(op(), 1..80)) {
        const CAPACITY: u32 = 6;
        let mut ledger = ledger(CAPACITY);
        let mut model: BTreeMap<String, ModelEntry> = BTreeMap::new();
        let mut now_ms = 0i64;
        let mut last: Option<Op> = None;

        for step in ops {
            let step = match step {
                Op::RetryLast => match last.clone() {
                    Some(previous) => previous,
                    None => continue,
                },
                other => other,
            };
            let before = ledger.reservations(ReservationFilter::All, now_ms).unwrap();
            let is_retry = last.as_ref().is_some_and(|l| format!("{l:?}") == format!("{step:?}"));
            match &step {
                Op::Hold { key, start_ms, len_ms, nodes, lease_ms } => {
                    let key = format!("k{key}");
                    let req = HoldRequest {
                        key: key.clone(),
                        cluster_id: "c".into(),
                        requester: "site-a".into(),
                        window: Window::new(*start_ms, start_ms + len_ms).unwrap(),
                        nodes: *nodes,
                        shape: SHAPE,
                        lease_ms: *lease_ms,
                    };
                    let got = ledger.hold(&req, now_ms);
                    match model.get(&key) {
                        Some(entry) if entry.request.window != req.window || entry.request.nodes != req.nodes => {
                            prop_assert!(matches!(got, Err(LedgerError::KeyConflict(_))), "{got:?}");
                        }
                        Some(entry) if entry.counts_at(now_ms) => {
                            let reservation = held(got.unwrap());
                            prop_assert_eq!(reservation.state, entry.state);
                        }
                        Some(_) => prop_assert!(matches!(got, Err(LedgerError::WrongState { .. })), "{got:?}"),
                        None => {
                            let fits = (req.window.start_ms..req.window.end_ms).all(|t| {
                                let used: u64 = model
                                    .values()
                                    .filter(|e| e.counts_at(now_ms))
                                    .filter(|e| e.request.window.start_ms <= t && t < e.request.window.end_ms)
                                    .map(|e| u64::from(e.request.nodes))
                                    .sum();
                                used + u64::from(req.nodes) <= u64::from(CAPACITY)
                            });
                            match got.unwrap() {
                                HoldOutcome::Held(reservation) => {
                                    prop_assert!(fits, "admitted a hold that does not fit");
                                    prop_assert_eq!(reservation.lease_expires_at_ms, Some(now_ms + lease_ms));
                                    model.insert(key, ModelEntry {
                                        request: req,
                                        state: ReservationState::Held,
                                        lease_expires_at_ms: now_ms + lease_ms,
                                    });
                                }
                                HoldOutcome::Denied { available } => {
                                    prop_assert!(!fits, "denied a hold that fits");
                                    prop_assert!(available < *nodes);
                                }
                            }
                        }
                    }
                }
                Op::Commit { key } => {
                    let key = format!("k{key}");
                    let got = ledger.commit(&key, "site-a", now_ms);
                    match model.get_mut(&key) {
                        None => prop_assert!(matches!(got, Err(LedgerError::UnknownReservation(_)))),
                        Some(entry) if entry.counts_at(now_ms) => {
                            prop_assert_eq!(got.unwrap().state, ReservationState::Committed);
                            entry.state = ReservationState::Committed;
                        }
                        Some(entry) => {
                            prop_assert!(got.is_err());
                            if entry.state == ReservationState::Held {
                                entry.state = ReservationState::Expired;
                            }
                        }
                    }
                }
                Op::Release { key } => {
                    let key = format!("k{key}");
                    let got = ledger.release(&key, "site-a", now_ms);
                    match model.get_mut(&key) {
                        None => prop_assert!(got.is_err()),
                        Some(entry) => {
                            let got = got.unwrap();
                            if matches!(entry.state, ReservationState::Held | ReservationState::Committed) {
                                entry.state = ReservationState::Released;
                            }
                            prop_assert_eq!(got.state, entry.state);
                        }
                    }
                }
                Op::Advance { ms } => now_ms += ms,
                Op::Sweep => {
                    let swept = ledger.sweep_expired(now_ms).unwrap();
                    for reservation in swept {
                        let entry = model.get_mut(&reservation.key).unwrap();
                        prop_assert_eq!(entry.state, ReservationState::Held);
                        prop_assert!(entry.lease_expires_at_ms <= now_ms);
                        entry.state = ReservationState::Expired;
                    }
                }
                Op::RetryLast => unreachable!("replaced above"),
            }

            let after = ledger.reservations(ReservationFilter::All, now_ms).unwrap();
            // The active ones are those that count, at this instant and
            // at the next lease's end.
            for at in [now_ms, now_ms + 1_000] {
                let counting: Vec<&Reservation> = after.iter().filter(|r| r.counts_at(at)).collect();
                let active = ledger.reservations(ReservationFilter::Active, at).unwrap();
                prop_assert_eq!(active.iter().collect::<Vec<_>>(), counting);
            }
            // A repeated hold, commit or release changes nothing.
            if is_retry && !matches!(step, Op::Advance { .. } | Op::Sweep) {
                prop_assert_eq!(&before, &after, "retry of {:?} changed the ledger", step);
            }
            // The core invariant, at every instant where usage can change.
            for reservation in &after {
                let t = reservation.window.start_ms;
                prop_assert!(used_at(&after, now_ms, t) <= u64::from(CAPACITY), "overbooked at {t}");
            }
            for reservation in &after {
                let entry = &model[&reservation.key];
                // The ledger may mark an unswept expired hold `expired` on a
                // failed commit exactly when the model does.
                prop_assert_eq!(reservation.state, entry.state, "state of {}", reservation.key);
            }
            last = Some(step);
        }
    }
}

#[test]
fn advert_version_only_goes_up_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let mut ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.advert_version().unwrap(), 0);
        ledger.set_advert_version(7).unwrap();
        ledger.set_advert_version(3).unwrap();
        assert_eq!(ledger.advert_version().unwrap(), 7);
    }
    assert_eq!(Ledger::open(&path).unwrap().advert_version().unwrap(), 7);
}

#[test]
fn migration_2_keeps_cluster_parts_of_a_version_1_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute_batch(
            "INSERT INTO clusters VALUES ('c', 'n', 'site-a', '{}', 'reserved', NULL, 1, 1);
             INSERT INTO cluster_parts VALUES ('c', 'site-b', 3, 'c/1');",
        )
        .unwrap();
    }
    let ledger = Ledger::open(&path).unwrap();
    assert_eq!(
        ledger.schema_version().unwrap() as usize,
        schema::MIGRATIONS.len()
    );
    let cluster = ledger.cluster("c").unwrap().unwrap();
    assert_eq!(cluster.parts.len(), 1);
    assert_eq!(cluster.parts[0].site, "site-b");
    assert_eq!(cluster.parts[0].nodes, 3);
    assert_eq!(cluster.parts[0].state, PartState::Held);
    assert_eq!(cluster.parts[0].reservation_key.as_deref(), Some("c/1"));
}

#[test]
fn migration_5_keeps_the_rows_of_a_version_4_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let mut conn = Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for migration in &schema::MIGRATIONS[..4] {
            tx.execute_batch(migration).unwrap();
        }
        tx.pragma_update(None, "user_version", 4).unwrap();
        tx.execute_batch(
            "INSERT INTO clusters VALUES ('c', 'n', 'site-a', '{}', 'running', NULL, 1, 1, 7);
             INSERT INTO cluster_parts VALUES ('c', 'site-a', NULL, 0, 2, 1, 'committed', 'c/0', NULL);
             INSERT INTO cluster_runs VALUES ('c', 100, 2);
             INSERT INTO cluster_nodes VALUES ('c', 'site-a', 0, 1, '{\"state\":\"serving\"}', 3);",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let mut ledger = Ledger::open(&path).unwrap();
    assert_eq!(
        ledger.schema_version().unwrap() as usize,
        schema::MIGRATIONS.len()
    );
    let cluster = ledger.cluster("c").unwrap().unwrap();
    assert_eq!(cluster.segment, Some(7));
    assert_eq!(cluster.parts.len(), 1);
    assert_eq!(cluster.parts[0].state, PartState::Committed);
    assert_eq!(ledger.runs().unwrap()[0].vlan, 100);
    assert_eq!(
        ledger.nodes("c").unwrap()[0].state,
        serde_json::json!({ "state": "serving" })
    );
    assert!(ledger.volumes().unwrap().is_empty());
    ledger.record_volume(&volume("c", 0, "c-0.qcow2")).unwrap();
    assert_eq!(ledger.volumes().unwrap(), [volume("c", 0, "c-0.qcow2")]);
}

#[test]
fn runs_take_the_lowest_free_vlan_and_give_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut ledger = Ledger::open(&path).unwrap();
    assert_eq!(ledger.start_run("a", 100, 102, 1).unwrap().vlan, 100);
    assert_eq!(ledger.start_run("b", 100, 102, 2).unwrap().vlan, 101);
    // Idempotent: a cluster that runs keeps its id and start time.
    let again = ledger.start_run("a", 100, 102, 3).unwrap();
    assert_eq!((again.vlan, again.started_at_ms), (100, 1));
    assert_eq!(ledger.start_run("c", 100, 102, 4).unwrap().vlan, 102);
    assert!(matches!(
        ledger.start_run("d", 100, 102, 5),
        Err(LedgerError::VlansExhausted {
            first: 100,
            last: 102
        })
    ));
    assert!(ledger.end_run("a", 6).unwrap());
    assert!(!ledger.end_run("a", 7).unwrap());
    assert_eq!(ledger.start_run("d", 100, 102, 8).unwrap().vlan, 100);
    for bad in [(0, 10), (10, 4095), (20, 10)] {
        assert!(matches!(
            ledger.start_run("e", bad.0, bad.1, 9),
            Err(LedgerError::Invalid(_))
        ));
    }
    drop(ledger);
    // Durable: a restarted agent knows what it had started.
    let ledger = Ledger::open(&path).unwrap();
    let runs: Vec<(String, u16)> = ledger
        .runs()
        .unwrap()
        .into_iter()
        .map(|run| (run.cluster_id, run.vlan))
        .collect();
    assert_eq!(
        runs,
        [("b".into(), 101), ("c".into(), 102), ("d".into(), 100)]
    );
}

#[test]
fn node_states_are_replaced_per_site_and_forgotten_with_the_run() {
    let mut ledger = ledger(4);
    ledger.start_run("c", 1, 10, 0).unwrap();
    let node = |site: &str, index: u32, state: &str| NodeRecord {
        site: site.into(),
        index,
        frontend: index == 0,
        state: serde_json::json!({ "state": state }),
        updated_at_ms: 5,
    };
    ledger
        .set_nodes(
            "c",
            "a",
            &[node("a", 0, "serving"), node("a", 1, "booting")],
        )
        .unwrap();
    ledger
        .set_nodes("c", "b", &[node("b", 2, "booting")])
        .unwrap();
    ledger
        .set_nodes(
            "c",
            "a",
            &[node("a", 0, "serving"), node("a", 1, "installed")],
        )
        .unwrap();
    let nodes = ledger.nodes("c").unwrap();
    assert_eq!(
        nodes,
        [
            node("a", 0, "serving"),
            node("a", 1, "installed"),
            node("b", 2, "booting")
        ]
    );
    ledger.end_run("c", 6).unwrap();
    assert!(ledger.nodes("c").unwrap().is_empty());
}

#[test]
fn the_sweep_prunes_the_event_log_even_with_nothing_expired() {
    let mut ledger = ledger(4);
    let logged = ledger.events(0, u32::MAX).unwrap().len();
    let extra = usize::try_from(EVENTS_MAX).unwrap() + 10 - logged;
    for i in 0..extra {
        ledger
            .record_event(0, "test", &i.to_string(), serde_json::json!({}))
            .unwrap();
    }
    assert!(ledger.sweep_expired(0).unwrap().is_empty());
    let kept = ledger.events(0, u32::MAX).unwrap();
    assert_eq!(kept.len(), usize::try_from(EVENTS_MAX).unwrap());
    assert_eq!(kept.last().unwrap().subject, (extra - 1).to_string());
    // At the bound, the next sweep has nothing to do.
    assert!(ledger.sweep_expired(0).unwrap().is_empty());
    assert_eq!(
        ledger.events(0, u32::MAX).unwrap().len(),
        usize::try_from(EVENTS_MAX).unwrap()
    );
}

#[test]
fn sweeps_see_every_change_between_them() {
    // The sweep's first read decides whether it writes: every way of
    // adding, committing or releasing a hold must show in it.
    let mut ledger = ledger(4);
    assert!(ledger.sweep_expired(0).unwrap().is_empty());
    held(ledger.hold(&request("a", 0, 100, 1, 10), 0).unwrap());
    held(ledger.hold(&request("b", 0, 100, 1, 20), 0).unwrap());
    held(ledger.hold(&request("c", 0, 100, 1, 30), 0).unwrap());
    assert!(ledger.sweep_expired(9).unwrap().is_empty());
    let swept = ledger.sweep_expired(10).unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].key, "a");
    ledger.commit("b", "site-a", 11).unwrap();
    ledger.release("c", "site-a", 12).unwrap();
    assert!(ledger.sweep_expired(40).unwrap().is_empty());
    held(ledger.hold(&request("d", 0, 100, 1, 5), 40).unwrap());
    assert!(ledger.sweep_expired(44).unwrap().is_empty());
    let swept = ledger.sweep_expired(45).unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].key, "d");
    assert!(ledger.sweep_expired(1_000).unwrap().is_empty());
}

#[test]
fn the_next_lease_expiry_is_the_earliest_held_lease_after_the_instant() {
    // Callers wake at this instant (to sweep, or to re-advertise): every
    // write that adds, commits, releases or expires a hold must show.
    let mut ledger = ledger(4);
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), None);
    held(ledger.hold(&request("a", 0, 100, 1, 10), 0).unwrap());
    held(ledger.hold(&request("b", 0, 100, 1, 20), 0).unwrap());
    held(ledger.hold(&request("c", 0, 100, 1, 30), 0).unwrap());
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(10));
    assert_eq!(ledger.next_lease_expiry(9).unwrap(), Some(10));
    // A lease that runs out at the instant no longer counts then.
    assert_eq!(ledger.next_lease_expiry(10).unwrap(), Some(20));
    // An unswept hold whose lease ran out is still the earliest of all.
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(10));
    ledger.commit("b", "site-a", 11).unwrap();
    assert_eq!(ledger.next_lease_expiry(10).unwrap(), Some(30));
    assert_eq!(ledger.sweep_expired(11).unwrap().len(), 1);
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(30));
    ledger.release("c", "site-a", 12).unwrap();
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), None);
    held(ledger.hold(&request("d", 0, 100, 1, 5), 40).unwrap());
    assert_eq!(ledger.next_lease_expiry(40).unwrap(), Some(45));
    assert_eq!(ledger.next_lease_expiry(45).unwrap(), None);
}

#[test]
fn cached_statements_are_not_compiled_again_on_every_use() {
    let mut ledger = ledger(4);
    for i in 0..3 {
        let record = ClusterRecord {
            id: format!("c-{i}"),
            name: "demo".into(),
            master_site: "site-a".into(),
            request: serde_json::json!({ "nodes": 4 }),
            state: ClusterState::Requested,
            reason: None,
            parts: vec![part("site-a", 0, 4, true, PartState::Held)],
            segment: None,
            epoch: 0,
            created_at_ms: 5,
            updated_at_ms: 5,
        };
        ledger.insert_cluster(&record).unwrap();
    }
    for round in 0..4 {
        for i in 0..3 {
            assert!(
                ledger.cluster(&format!("c-{i}")).unwrap().is_some(),
                "{round}"
            );
        }
    }
    // The statement `cluster` ran, back from the cache: its binding changed
    // a dozen times (and the cache cleared it as often), yet it was
    // compiled once.
    let stmt = ledger
        .conn
        .prepare_cached(clusters::CLUSTER_PARTS_SQL)
        .unwrap();
    assert!(stmt.get_status(rusqlite::StatementStatus::Run) >= 12);
    assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
}

#[test]
fn the_remembered_next_lease_expiry_follows_every_write() {
    // The answer is remembered between writes: each way of changing the
    // held leases, and a write undone by a rollback, must show in the next
    // answer.
    let mut ledger = ledger(4);
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), None);
    held(ledger.hold(&request("a", 0, 100, 1, 30), 0).unwrap());
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(30));
    // Asked again with nothing written, and with another instant.
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(30));
    assert_eq!(ledger.next_lease_expiry(30).unwrap(), None);
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(30));
    // An earlier lease.
    held(ledger.hold(&request("b", 0, 100, 1, 20), 0).unwrap());
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(20));
    ledger.commit("b", "site-a", 1).unwrap();
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(30));
    ledger.release("a", "site-a", 2).unwrap();
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), None);
    held(ledger.hold(&request("c", 0, 100, 1, 10), 5).unwrap());
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(15));
    assert_eq!(ledger.sweep_expired(15).unwrap().len(), 1);
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), None);

    // A hold written and rolled back, asked about inside the transaction
    // (which sees it) and after the rollback (which undoes it without
    // counting a change).
    ledger.conn.execute_batch("BEGIN").unwrap();
    ledger
        .conn
        .execute(
            "INSERT INTO reservations (idem_key, cluster_id, requester, start_ms, end_ms, nodes,
                 cores, memory_mib, disk_gib, state, lease_expires_at_ms, created_at_ms, updated_at_ms)
             VALUES ('d', 'cluster-d', 'site-a', 0, 100, 1, 2, 4096, 20, 'held', 50, 20, 20)",
            [],
        )
        .unwrap();
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(50));
    ledger.conn.execute_batch("ROLLBACK").unwrap();
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), None);
    // The same, remembered before the transaction.
    held(ledger.hold(&request("e", 0, 100, 1, 40), 20).unwrap());
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(60));
    ledger.conn.execute_batch("BEGIN").unwrap();
    ledger
        .conn
        .execute(
            "UPDATE reservations SET state = 'released' WHERE idem_key = 'e'",
            [],
        )
        .unwrap();
    ledger.conn.execute_batch("ROLLBACK").unwrap();
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(60));
}

#[test]
fn a_file_ledger_sees_the_next_lease_expiry_another_connection_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut ledger = Ledger::open(&path).unwrap();
    ledger.set_inventory(&inventory(4), 0).unwrap();
    held(ledger.hold(&request("a", 0, 100, 1, 30), 0).unwrap());
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), Some(30));
    let other = Connection::open(&path).unwrap();
    other
        .execute(
            "UPDATE reservations SET state = 'released' WHERE idem_key = 'a'",
            [],
        )
        .unwrap();
    assert_eq!(ledger.next_lease_expiry(i64::MIN).unwrap(), None);
}

/// What a ledger's database and connection are like, beyond its rows.
fn database_settings(conn: &Connection) -> (Vec<String>, Vec<String>) {
    let schema = conn
        .prepare("SELECT type || ' ' || name || ': ' || COALESCE(sql, '') FROM sqlite_schema ORDER BY name")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let pragmas = [
        "user_version",
        "foreign_keys",
        "synchronous",
        "journal_mode",
        "page_size",
        "encoding",
        "auto_vacuum",
        "integrity_check",
    ]
    .iter()
    .map(|pragma| {
        let value: rusqlite::types::Value = conn
            .query_row(&format!("PRAGMA {pragma}"), [], |row| row.get(0))
            .unwrap();
        format!("{pragma} = {value:?}")
    })
    .collect();
    (schema, pragmas)
}

#[test]
fn in_memory_ledgers_are_independent_copies_of_a_migrated_one() {
    // In-memory ledgers start as copies of one migrated once per process:
    // each is the same as a ledger migrated on its own connection, with
    // the connection set up the same, and shares nothing with the others.
    let mut first = ledger(4);
    let second = Ledger::open_in_memory().unwrap();
    let migrated = Ledger::setup(Connection::open_in_memory().unwrap(), None).unwrap();
    assert_eq!(
        database_settings(&second.conn),
        database_settings(&migrated.conn)
    );
    assert!(
        second
            .conn
            .db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG)
            .unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = Ledger::open(&dir.path().join("ledger.db")).unwrap();
    assert_eq!(
        second.schema_version().unwrap(),
        file.schema_version().unwrap()
    );
    assert_eq!(
        database_settings(&second.conn).0,
        database_settings(&file.conn).0
    );

    held(first.hold(&request("a", 0, 100, 1, 30), 0).unwrap());
    assert_eq!(
        first.reservations(ReservationFilter::All, 0).unwrap().len(),
        1
    );
    assert!(
        second
            .reservations(ReservationFilter::All, 0)
            .unwrap()
            .is_empty()
    );
    assert_eq!(second.inventory().unwrap(), None);
    assert!(second.events(0, u32::MAX).unwrap().is_empty());
    let third = Ledger::open_in_memory().unwrap();
    assert!(
        third
            .reservations(ReservationFilter::All, 0)
            .unwrap()
            .is_empty()
    );
    assert_eq!(third.capacity().unwrap(), 0);
}

#[test]
fn state_names_round_trip_and_match_serde() {
    // The name a state is stored under is also its JSON name (the API
    // shows both), and reading it back gives the same state.
    fn check<S>(all: &[S], as_str: fn(S) -> &'static str, parse: fn(&str) -> Option<S>)
    where
        S: Copy + std::fmt::Debug + std::fmt::Display + PartialEq + serde::Serialize,
    {
        for &state in all {
            let name = as_str(state);
            assert_eq!(parse(name), Some(state));
            assert_eq!(state.to_string(), name);
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(name)
            );
        }
        assert_eq!(parse("no-such-state"), None);
    }
    check(
        ReservationState::ALL,
        ReservationState::as_str,
        ReservationState::parse,
    );
    check(ClusterState::ALL, ClusterState::as_str, ClusterState::parse);
    check(PartState::ALL, PartState::as_str, PartState::parse);
}

#[test]
fn counts_by_state_list_every_state_and_see_lapsed_holds_as_expired() {
    use ReservationState::{Committed, Expired, Held, Released};
    let mut ledger = ledger(8);
    assert_eq!(
        ledger.reservation_counts(0).unwrap(),
        [(Held, 0), (Committed, 0), (Released, 0), (Expired, 0)]
    );
    held(ledger.hold(&request("a", 0, 100, 1, 10), 0).unwrap());
    held(ledger.hold(&request("b", 0, 100, 1, 50), 0).unwrap());
    held(ledger.hold(&request("c", 0, 100, 1, 50), 0).unwrap());
    held(ledger.hold(&request("d", 0, 100, 1, 50), 0).unwrap());
    ledger.commit("c", "site-a", 1).unwrap();
    ledger.release("d", "site-a", 1).unwrap();
    // "a" lapsed at 10 but no sweep has rewritten it.
    assert_eq!(
        ledger.reservation_counts(20).unwrap(),
        [(Held, 1), (Committed, 1), (Released, 1), (Expired, 1)]
    );

    let counts = ledger.cluster_counts().unwrap();
    assert_eq!(counts.len(), ClusterState::ALL.len());
    assert!(counts.iter().all(|(_, n)| *n == 0));
    let record = ClusterRecord {
        id: "c-1".into(),
        name: "demo".into(),
        master_site: "site-a".into(),
        request: serde_json::json!({ "nodes": 1 }),
        state: ClusterState::Requested,
        reason: None,
        parts: Vec::new(),
        segment: None,
        epoch: 0,
        created_at_ms: 5,
        updated_at_ms: 5,
    };
    ledger.insert_cluster(&record).unwrap();
    let counts = ledger.cluster_counts().unwrap();
    assert!(counts.contains(&(ClusterState::Requested, 1)));
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), 1);
}

fn volume(cluster_id: &str, node: u32, name: &str) -> VolumeRecord {
    VolumeRecord {
        host: "qemu+ssh://root@hv1/system".into(),
        pool: "default".into(),
        name: name.into(),
        cluster_id: cluster_id.into(),
        node,
        size_bytes: 20 << 30,
        created_at_ms: 5,
    }
}

#[test]
fn volumes_are_listed_in_order_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let other_host = VolumeRecord {
        host: "qemu:///system".into(),
        ..volume("b", 1, "b-1.qcow2")
    };
    let recorded = [
        volume("b", 1, "b-1.qcow2"),
        volume("a", 2, "a-2.qcow2"),
        other_host.clone(),
        volume("a", 0, "a-0.qcow2"),
        VolumeRecord {
            size_bytes: i64::MAX as u64,
            ..volume("b", 0, "b-0.qcow2")
        },
    ];
    {
        let mut ledger = Ledger::open(&path).unwrap();
        for volume in &recorded {
            ledger.record_volume(volume).unwrap();
        }
    }
    // A restarted agent finds every volume its driver had made.
    let ledger = Ledger::open(&path).unwrap();
    assert_eq!(
        ledger.volumes().unwrap(),
        [
            recorded[3].clone(),
            recorded[1].clone(),
            recorded[4].clone(),
            recorded[0].clone(),
            other_host,
        ]
    );
    assert_eq!(
        ledger.cluster_volumes("a").unwrap(),
        [recorded[3].clone(), recorded[1].clone()]
    );
    assert!(ledger.cluster_volumes("z").unwrap().is_empty());
}

#[test]
fn recording_a_volume_again_is_idempotent_and_other_fields_replace_it() {
    let mut ledger = ledger(4);
    let first = volume("a", 1, "disk.qcow2");
    ledger.record_volume(&first).unwrap();
    ledger.record_volume(&first).unwrap();
    assert_eq!(ledger.volumes().unwrap(), std::slice::from_ref(&first));
    // The same place, made anew for another node after a crash.
    let remade = VolumeRecord {
        cluster_id: "b".into(),
        node: 3,
        size_bytes: 40 << 30,
        created_at_ms: 9,
        ..first.clone()
    };
    ledger.record_volume(&remade).unwrap();
    assert_eq!(ledger.volumes().unwrap(), std::slice::from_ref(&remade));
    assert!(ledger.cluster_volumes("a").unwrap().is_empty());
    // Another pool is another volume.
    let elsewhere = VolumeRecord {
        pool: "fast".into(),
        ..first
    };
    ledger.record_volume(&elsewhere).unwrap();
    assert_eq!(ledger.volumes().unwrap(), [elsewhere, remade]);
}

#[test]
fn forgetting_a_volume_says_whether_it_was_recorded() {
    let mut ledger = ledger(4);
    let kept = volume("a", 0, "a-0.qcow2");
    let gone = volume("a", 1, "a-1.qcow2");
    ledger.record_volume(&kept).unwrap();
    ledger.record_volume(&gone).unwrap();
    assert!(
        ledger
            .forget_volume(&gone.host, &gone.pool, &gone.name)
            .unwrap()
    );
    assert!(
        !ledger
            .forget_volume(&gone.host, &gone.pool, &gone.name)
            .unwrap()
    );
    assert!(
        !ledger
            .forget_volume("qemu:///system", &kept.pool, &kept.name)
            .unwrap()
    );
    assert_eq!(ledger.volumes().unwrap(), [kept]);
}

#[test]
fn invalid_volumes_write_nothing() {
    let mut ledger = ledger(4);
    let bad = [
        VolumeRecord {
            size_bytes: i64::MAX as u64 + 1,
            ..volume("a", 0, "huge")
        },
        VolumeRecord {
            size_bytes: u64::MAX,
            ..volume("a", 0, "huge")
        },
        VolumeRecord {
            size_bytes: 0,
            ..volume("a", 0, "empty")
        },
        VolumeRecord {
            host: String::new(),
            ..volume("a", 0, "no-host")
        },
        VolumeRecord {
            pool: String::new(),
            ..volume("a", 0, "no-pool")
        },
        volume("a", 0, ""),
        volume("", 0, "no-cluster"),
        volume("a", 0, &"n".repeat(VOLUME_TEXT_LEN_MAX + 1)),
        volume(&"c".repeat(NAME_LEN_MAX + 1), 0, "long-cluster"),
    ];
    for volume in &bad {
        let err = ledger.record_volume(volume).unwrap_err();
        assert!(matches!(err, LedgerError::Invalid(_)), "{volume:?}: {err}");
    }
    let err = ledger.record_volume(&bad[1]).unwrap_err().to_string();
    assert!(err.contains("18446744073709551615 bytes"), "{err}");
    assert!(ledger.volumes().unwrap().is_empty());
}

#[test]
fn migration_6_numbers_and_epochs_round_trip_and_old_rows_have_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let mut conn = Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for migration in &schema::MIGRATIONS[..5] {
            tx.execute_batch(migration).unwrap();
        }
        tx.pragma_update(None, "user_version", 5).unwrap();
        tx.execute_batch(
            "INSERT INTO clusters VALUES ('old', 'n', 'site-a', '{}', 'running', NULL, 1, 1, 7);
             INSERT INTO cluster_parts VALUES ('old', 'site-a', NULL, 0, 2, 1, 'committed', 'old/0', NULL);",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let mut ledger = Ledger::open(&path).unwrap();
    let old = ledger.cluster("old").unwrap().unwrap();
    assert_eq!(old.epoch, 0);
    assert_eq!(
        (old.parts[0].first_node, old.parts[0].lost_at_ms),
        (None, None)
    );

    let mut lost = part("site-b", 1, 4, false, PartState::Releasing);
    lost.first_node = Some(4);
    lost.lost_at_ms = Some(1234);
    let mut kept = part("site-a", 0, 3, true, PartState::Committed);
    kept.first_node = Some(1);
    let record = ClusterRecord {
        id: "c-1".into(),
        name: "healed".into(),
        master_site: "site-a".into(),
        request: serde_json::json!({ "nodes": 7 }),
        state: ClusterState::Running,
        reason: None,
        parts: vec![kept.clone(), lost.clone()],
        segment: Some(9),
        epoch: 1,
        created_at_ms: 5,
        updated_at_ms: 5,
    };
    assert_eq!(ledger.insert_cluster(&record).unwrap(), record);
    // The epoch only ever rises.
    let raised = ledger
        .update_cluster_epoch("c-1", ClusterState::Running, None, Some(3), None, 6)
        .unwrap();
    assert_eq!(raised.epoch, 3);
    let kept_epoch = ledger
        .update_cluster_epoch("c-1", ClusterState::Running, None, Some(2), None, 7)
        .unwrap();
    assert_eq!(kept_epoch.epoch, 3);
    let plain = ledger
        .update_cluster("c-1", ClusterState::Running, None, None, 8)
        .unwrap();
    assert_eq!(plain.epoch, 3);
    assert_eq!(plain.parts, vec![kept, lost]);
    // A part number below 1 is refused (0 is the frontend's).
    let mut bad = part("site-c", 1, 1, false, PartState::Committed);
    bad.first_node = Some(0);
    assert!(
        ledger
            .update_cluster("c-1", ClusterState::Running, None, Some(&[bad]), 9)
            .is_err()
    );
    assert_eq!(ledger.cluster("c-1").unwrap().unwrap().parts.len(), 2);
}
