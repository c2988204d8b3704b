//! The local HTTP API's JSON bodies (`node/agent/src/api_types.rs`): the
//! request bodies the server reads (`api.rs`) with the text in them that
//! it parses (instants, durations, multiaddrs), and the response bodies
//! the CLI client reads.
//!
//! Input: byte 0 picks the body type, the rest is the JSON.
//!
//! Asserts: no panic; a body that deserializes serializes to JSON that
//! deserializes to the same body (compared as values, or directly where
//! the type has `PartialEq`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use vcfed::api_types::{
    CapacityReport, ClusterDetail, CreateClusterBody, ErrorBody, HoldBody, InstantArg, JoinBody,
    OwnerBody, SiteInfo,
};
use vcfed::federation::SitesReport;
use vcfed::time::{parse_duration_ms, parse_instant};
use vcfed_storage::{ClusterRecord, Event, Reservation};

/// The server's clock for relative instants.
const NOW_MS: i64 = 1_764_000_000_000;

/// Deserializes `json` as the server's `Json` extractor and the client do,
/// and checks the round trip; returns the body.
fn body<T: Serialize + DeserializeOwned>(json: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(json).ok()?;
    let once = serde_json::to_value(&value).expect("a body serializes");
    let again: T = serde_json::from_value(once.clone()).expect("a body's JSON reads back");
    assert_eq!(
        serde_json::to_value(&again).expect("a body serializes"),
        once
    );
    Some(value)
}

/// [`body`], comparing the bodies themselves.
fn same<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(json: &[u8]) {
    if let Some(value) = body::<T>(json) {
        let text = serde_json::to_vec(&value).expect("a body serializes");
        assert_eq!(serde_json::from_slice::<T>(&text).ok(), Some(value));
    }
}

fn instant(arg: &InstantArg) {
    if let InstantArg::Text(text) = arg {
        let _ = parse_instant(text, NOW_MS);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, json)) = data.split_first() else {
        return;
    };
    match kind % 12 {
        0 => {
            if let Some(hold) = body::<HoldBody>(json) {
                instant(&hold.start);
                instant(&hold.end);
            }
        }
        1 => {
            body::<OwnerBody>(json);
        }
        2 => {
            if let Some(join) = body::<JoinBody>(json)
                && let Ok(addr) = join.addr.parse::<multiaddr::Multiaddr>()
            {
                // What a peer's address prints as reads back as itself.
                assert_eq!(
                    addr.to_string().parse::<multiaddr::Multiaddr>().ok(),
                    Some(addr)
                );
            }
        }
        3 => {
            if let Some(create) = body::<CreateClusterBody>(json) {
                if let Some(start) = &create.start {
                    instant(start);
                }
                let _ = parse_duration_ms(&create.duration);
            }
        }
        4 => same::<SiteInfo>(json),
        5 => same::<CapacityReport>(json),
        6 => {
            body::<ErrorBody>(json);
        }
        7 => {
            body::<ClusterDetail>(json);
        }
        8 => same::<Vec<Reservation>>(json),
        9 => same::<Vec<ClusterRecord>>(json),
        10 => same::<Vec<Event>>(json),
        _ => {
            body::<SitesReport>(json);
        }
    }
});
