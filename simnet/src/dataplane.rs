//! The data plane, modelled minimally: which gateway tunnels are up.
//!
//! In production a worker boots its nodes once the WireGuard session
//! between its gateway and the master's is up (the gateway reports its
//! sessions, by peer key, through a watch channel). A gateway has a peer
//! for every site that one of its segments names, and a session needs a
//! peer on both sides; one session carries every segment the two share.
//! simnet models exactly that and nothing below it (no frames, no
//! handshakes): the tunnel between sites `a` and `b` is up when
//!
//! - both sites are alive (up and members of the federation),
//! - both gateways are up (the `gateway` fault takes one down for a while),
//! - the network between them is not partitioned, either way,
//! - each carries some segment that names the other as a peer (each
//!   runner publishes what it carries after every tick, as the agent's
//!   runner publishes to its gateway).
//!
//! The sites write their own liveness and segments; the harness writes
//! the gateways' state and the reachability matrix (from the engine's
//! partitions). Reads happen inside a site's call, writes between calls:
//! everything stays deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use vcfed_node_core::runner::Segment;
use vcfed_storage::GatewayRef;

use crate::SiteId;

/// Segments a site's gateway carries: segment id → peer sites.
pub type Carried = BTreeMap<u32, BTreeSet<SiteId>>;

/// The shared state of the simulated data plane.
#[derive(Debug)]
pub struct DataPlane {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    sites: usize,
    alive: Vec<bool>,
    gateway_up: Vec<bool>,
    /// reach[from * sites + to]: a message from `from` gets to `to`
    /// (meaningful only while both are alive).
    reach: Vec<bool>,
    carried: Vec<Carried>,
}

impl DataPlane {
    /// A data plane of `sites` sites, none alive yet, every gateway up and
    /// no partition.
    pub fn new(sites: usize) -> DataPlane {
        DataPlane {
            inner: Mutex::new(Inner {
                sites,
                alive: vec![false; sites],
                gateway_up: vec![true; sites],
                reach: vec![true; sites * sites],
                carried: vec![Carried::new(); sites],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A site booted (`true`) or crashed or left (`false`); a site that is
    /// not alive carries nothing.
    pub fn set_alive(&self, site: SiteId, alive: bool) {
        let mut inner = self.lock();
        inner.alive[site] = alive;
        if !alive {
            inner.carried[site].clear();
        }
    }

    /// The segments a site's gateway carries now.
    pub fn set_carried(&self, site: SiteId, carried: Carried) {
        self.lock().carried[site] = carried;
    }

    /// Whether `site`'s gateway carries `segment` to `peer` now.
    pub fn carries(&self, site: SiteId, segment: u32, peer: SiteId) -> bool {
        self.lock().carried[site]
            .get(&segment)
            .is_some_and(|peers| peers.contains(&peer))
    }

    /// A site's gateway went down or came back.
    pub fn set_gateway_up(&self, site: SiteId, up: bool) {
        self.lock().gateway_up[site] = up;
    }

    /// Whether a site's gateway is up.
    pub fn gateway_up(&self, site: SiteId) -> bool {
        self.lock().gateway_up[site]
    }

    /// Sets the reachability of every pair (after a partition started or
    /// healed).
    pub fn set_reach_all(&self, reach: impl Fn(SiteId, SiteId) -> bool) {
        let mut inner = self.lock();
        let n = inner.sites;
        for from in 0..n {
            for to in 0..n {
                inner.reach[from * n + to] = reach(from, to);
            }
        }
    }

    /// Sets the reachability of every pair involving `site` (after it
    /// restarted: entries computed while it was down say nothing).
    pub fn set_reach_of(&self, site: SiteId, reach: impl Fn(SiteId, SiteId) -> bool) {
        let mut inner = self.lock();
        let n = inner.sites;
        for other in 0..n {
            inner.reach[site * n + other] = reach(site, other);
            inner.reach[other * n + site] = reach(other, site);
        }
    }

    /// Whether the tunnel (the session) between `local` and `peer` is up
    /// (see the module docs).
    pub fn tunnel_up(&self, local: SiteId, peer: SiteId) -> bool {
        let inner = self.lock();
        let n = inner.sites;
        if local >= n || peer >= n || local == peer {
            return false;
        }
        let names =
            |a: SiteId, b: SiteId| inner.carried[a].values().any(|peers| peers.contains(&b));
        inner.alive[local]
            && inner.alive[peer]
            && inner.gateway_up[local]
            && inner.gateway_up[peer]
            && inner.reach[local * n + peer]
            && inner.reach[peer * n + local]
            && names(local, peer)
            && names(peer, local)
    }
}

/// A site's gateway as the site core's runner sees it: the shared data
/// plane, seen from `site`. What it carries is published to the data plane
/// when it changes, as the agent's runner tells its gateway.
#[derive(Debug)]
pub struct SimPlane {
    site: SiteId,
    plane: Arc<DataPlane>,
    carried: Carried,
}

impl SimPlane {
    /// Site `site`'s view of `plane`, carrying nothing yet.
    pub fn new(site: SiteId, plane: Arc<DataPlane>) -> SimPlane {
        SimPlane {
            site,
            plane,
            carried: Carried::new(),
        }
    }
}

impl vcfed_node_core::runner::DataPlane for SimPlane {
    fn carry(&mut self, segments: &[Segment<'_>]) {
        let carried: Carried = segments
            .iter()
            .map(|segment| {
                let peers = segment
                    .plan
                    .peers
                    .iter()
                    .filter_map(|peer| site_of_key(&peer.gateway.as_ref()?.public_key))
                    .collect();
                (segment.plan.segment, peers)
            })
            .collect();
        if carried != self.carried {
            self.plane.set_carried(self.site, carried.clone());
            self.carried = carried;
        }
    }

    fn bridge(&self, _segment: u32) -> Option<Result<String, String>> {
        Some(Ok(SIM_BRIDGE.to_owned()))
    }

    fn tunnel_up(&self, gateway: &GatewayRef) -> bool {
        // A key that names no simulated site has no tunnel to wait for (as
        // the agent treats a key that is not an X25519 key).
        site_of_key(&gateway.public_key).is_none_or(|peer| self.plane.tunnel_up(self.site, peer))
    }

    fn refuses_another(&self, _running: usize) -> Option<String> {
        None
    }
}

/// The name of every simulated segment's bridge.
const SIM_BRIDGE: &str = "sim";

/// The site whose simulated gateway key is `public_key` (`simkey-<index>`).
pub fn site_of_key(public_key: &str) -> Option<SiteId> {
    public_key.strip_prefix("simkey-")?.parse().ok()
}

/// The simulated gateway key of `site`.
pub fn key_of_site(site: SiteId) -> String {
    format!("simkey-{site}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_needs_both_sites_gateways_reach_and_peers() {
        let plane = DataPlane::new(3);
        plane.set_alive(0, true);
        plane.set_alive(1, true);
        let carry = |segment: u32, peer: SiteId| Carried::from([(segment, BTreeSet::from([peer]))]);
        plane.set_carried(0, carry(7, 1));
        assert!(!plane.tunnel_up(0, 1), "the peer carries nothing yet");
        plane.set_carried(1, carry(8, 0));
        assert!(
            plane.tunnel_up(0, 1) && plane.tunnel_up(1, 0),
            "one session for every segment the two share"
        );
        plane.set_carried(1, carry(8, 2));
        assert!(!plane.tunnel_up(0, 1), "the peer does not name us");
        plane.set_carried(1, carry(7, 0));
        plane.set_gateway_up(1, false);
        assert!(!plane.tunnel_up(0, 1));
        plane.set_gateway_up(1, true);
        plane.set_reach_all(|from, to| !(from == 1 && to == 0));
        assert!(!plane.tunnel_up(0, 1), "one way cut is enough");
        plane.set_reach_of(1, |_, _| true);
        assert!(plane.tunnel_up(0, 1));
        plane.set_alive(1, false);
        assert!(!plane.tunnel_up(0, 1));
        plane.set_alive(1, true);
        assert!(!plane.tunnel_up(0, 1), "a restarted site carries nothing");
        assert_eq!(site_of_key(&key_of_site(12)), Some(12));
    }
}
