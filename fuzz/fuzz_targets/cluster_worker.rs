//! The worker side of the reservation protocol
//! (`node/core/src/cluster/worker.rs`) taking what masters send, decoded
//! as a site decodes it (`federation::cluster_payload`), against an
//! in-memory ledger of 8 node slots: the decoded values (windows, shapes,
//! leases, parts) reach the ledger as a hostile master chooses them.
//!
//! Input: records (see `vcfed_fuzz::records`), each a federation message;
//! the tag's low 2 bits pick the sending site, its high bits move the clock
//! (by up to 63 s, past leases).
//!
//! Asserts: no panic; every answer is an answer (never a request) and
//! survives its own encoding; the ledger never books more nodes than the
//! site has, at any instant.

#![no_main]

use libfuzzer_sys::fuzz_target;
use libp2p_identity::PeerId;
use vcfed_fuzz::keypair;
use vcfed_node_core::cluster::{ClusterConfig, ClusterCore, ClusterMsg, SiteDirectory};
use vcfed_node_core::federation::cluster_payload;
use vcfed_registry::Candidate;
use vcfed_storage::{Inventory, InventoryHost, Ledger, NodeShape, Reservation, ReservationFilter};

const SLOTS: u32 = 8;
const START_MS: i64 = 1_000_000;

/// A directory that knows no sites: a worker answers whoever asks.
struct Nobody;

impl SiteDirectory for Nobody {
    fn candidates(&self, _: i64, _: i64, _: &NodeShape) -> Vec<Candidate> {
        Vec::new()
    }
    fn site_name(&self, _: &PeerId) -> Option<String> {
        None
    }
    fn offers_shape(&self, _: &NodeShape) -> bool {
        false
    }
    fn is_gone(&self, _: &PeerId) -> bool {
        false
    }
    fn any_alive(&self) -> bool {
        true
    }
    fn warming(&self, _: i64) -> Option<vcfed_registry::Warming> {
        None
    }
}

fn ledger() -> Ledger {
    let mut ledger = Ledger::open_in_memory().expect("an in-memory ledger");
    let node = NodeShape {
        cores: 2,
        memory_mib: 4096,
        disk_gib: 20,
    };
    let inventory = Inventory {
        node,
        hosts: vec![InventoryHost {
            name: "host-0".into(),
            cores: 16,
            memory_mib: 32_768,
            disk_gib: 160,
            slots: SLOTS,
        }],
    };
    ledger
        .set_inventory(&inventory, START_MS)
        .expect("a small inventory");
    ledger
}

fuzz_target!(|data: &[u8]| {
    let mut ledger = ledger();
    let local = keypair(0).public().to_peer_id();
    let mut core = ClusterCore::new(local, "site-0".into(), None, ClusterConfig::default());
    let masters: Vec<PeerId> = (1..=4)
        .map(|site| keypair(site).public().to_peer_id())
        .collect();
    let mut now_ms = START_MS;
    for (tag, bytes) in vcfed_fuzz::records(data) {
        now_ms += i64::from(tag >> 2) * 1_000;
        let Some(msg) = cluster_payload(bytes) else {
            continue;
        };
        let from = masters[usize::from(tag & 3)];
        let answer = match core.handle_request(&mut ledger, &Nobody, now_ms, from, msg) {
            Ok(answer) => answer,
            // The shell logs a ledger error and answers nothing; SQLite
            // in memory has no I/O to fail, so none is expected.
            Err(e) => panic!("ledger error on a peer's message: {e}"),
        };
        if let Some(answer) = answer {
            assert!(
                matches!(
                    answer,
                    ClusterMsg::Held { .. }
                        | ClusterMsg::Denied { .. }
                        | ClusterMsg::Committed { .. }
                        | ClusterMsg::Released { .. }
                        | ClusterMsg::Refused { .. }
                        | ClusterMsg::NodesNoted { .. }
                ),
                "not an answer: {answer:?}"
            );
            assert_eq!(ClusterMsg::decode(&answer.encode()).as_ref(), Some(&answer));
        }
        while core.poll_transmit().is_some() {}
        // Never overbooked: at the start of every reservation that takes
        // capacity, the nodes of those that cover that instant fit the slots.
        let active: Vec<Reservation> = ledger
            .reservations(ReservationFilter::All, now_ms)
            .expect("the ledger answers")
            .into_iter()
            .filter(|r| r.counts_at(now_ms))
            .collect();
        for at in active.iter().map(|r| r.window.start_ms) {
            let booked: u64 = active
                .iter()
                .filter(|r| r.window.start_ms <= at && at < r.window.end_ms)
                .map(|r| u64::from(r.nodes))
                .sum();
            assert!(booked <= u64::from(SLOTS), "{booked} nodes booked at {at}");
        }
    }
});
