//! What `GET /metrics` shows, in the OpenMetrics text format that
//! Prometheus scrapes (the `prometheus-client` crate's encoder).
//!
//! Nothing here keeps state: every scrape gathers a [`Snapshot`] (the
//! federation task's report, two ledger counts and the runner's counters)
//! and encodes it into a fresh registry, so the numbers are exactly what
//! the agent holds at that instant and no second copy of them can drift.

use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use vcfed_registry::SiteState;
use vcfed_storage::{ClusterState, ReservationState};

use crate::api::ApiStats;
use crate::federation::SitesReport;
use crate::runner::{GatewayCounters, RunnerCounters};

/// `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prefix of every metric name.
const PREFIX: &str = "vcfed";

/// A label set of one label.
type Label = [(&'static str, &'static str); 1];

/// Everything one scrape shows.
#[derive(Debug)]
pub struct Snapshot {
    /// The federation task's view and gossip counters.
    pub federation: SitesReport,
    /// Reservations per state, every state listed.
    pub reservations: Vec<(ReservationState, u64)>,
    /// Clusters per state, every state listed.
    pub clusters: Vec<(ClusterState, u64)>,
    /// The runner's counters, if this agent runs clusters.
    pub runner: Option<RunnerCounters>,
    /// The API server's connections and refusals.
    pub api: ApiStats,
}

/// The snapshot in the OpenMetrics text format, ending in `# EOF`.
pub fn encode(snapshot: &Snapshot) -> String {
    let mut registry = Registry::with_prefix(PREFIX);
    register_gossip(&mut registry, &snapshot.federation);
    register_federation(&mut registry, &snapshot.federation);
    register_api(&mut registry, &snapshot.api);

    let reservations = Family::<Label, Gauge>::default();
    for (state, count) in &snapshot.reservations {
        reservations
            .get_or_create(&[("state", state.as_str())])
            .set(gauge(*count));
    }
    registry.register(
        "reservations",
        "Reservations of this site's nodes by state; a hold whose lease ran out counts as expired",
        reservations,
    );
    let clusters = Family::<Label, Gauge>::default();
    for (state, count) in &snapshot.clusters {
        clusters
            .get_or_create(&[("state", state.as_str())])
            .set(gauge(*count));
    }
    registry.register(
        "clusters",
        "Clusters in this site's ledger (mastered or served here) by state",
        clusters,
    );

    if let Some(runner) = &snapshot.runner {
        registry.register(
            "runner_node_retries",
            "Nodes the runner started again after they failed to start or to boot",
            counter(runner.node_retries()),
        );
        registry.register(
            "runner_clusters_blocked",
            "Clusters due to run here that cannot start (no free VLAN id, no bridge, ...)",
            gauge_of(runner.clusters_blocked()),
        );
        if let Some(gateway) = runner.gateway() {
            register_gateway(&mut registry, &gateway);
        }
    }

    let mut out = String::new();
    // Writing into a String cannot fail; the encoder's only errors are the
    // writer's.
    text::encode(&mut out, &registry).expect("writing to a String never fails");
    out
}

/// The registry core's counters, as they accumulate since the agent started.
fn register_gossip(registry: &mut Registry, report: &SitesReport) {
    let stats = &report.stats;
    registry.register(
        "gossip_adverts_applied",
        "Site adverts received and applied (new versions)",
        counter(stats.adverts_applied),
    );
    registry.register(
        "gossip_adverts_duplicate",
        "Site adverts received that repeated a version already held",
        counter(stats.adverts_duplicate),
    );
    let dropped = Family::<Label, Counter>::default();
    for (reason, count) in [
        ("stale", stats.dropped_stale),
        ("expired", stats.dropped_expired),
        ("forged", stats.dropped_forged),
        ("undecodable", stats.dropped_undecodable),
        ("oversized", stats.dropped_oversized),
        ("view_full", stats.dropped_full),
        ("not_allowed", stats.dropped_not_allowed),
        ("rate", stats.dropped_rate),
    ] {
        dropped.get_or_create(&[("reason", reason)]).inc_by(count);
    }
    registry.register(
        "gossip_dropped",
        "Gossip messages or adverts dropped, by reason",
        dropped,
    );
    registry.register(
        "gossip_messages_sent",
        "Gossip and anti-entropy messages sent",
        counter(stats.messages_sent),
    );
    registry.register_with_unit(
        "gossip_sent",
        "Bytes of gossip and anti-entropy messages sent",
        Unit::Bytes,
        counter(stats.bytes_sent),
    );
}

/// The federation view and the shell's transport numbers.
fn register_federation(registry: &mut Registry, report: &SitesReport) {
    let sites = Family::<Label, Gauge>::default();
    for (state, name) in [
        (SiteState::Alive, "alive"),
        (SiteState::Suspect, "suspect"),
        (SiteState::Gone, "gone"),
    ] {
        let count = report.sites.iter().filter(|s| s.state == state).count();
        sites
            .get_or_create(&[("state", name)])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    registry.register(
        "federation_sites",
        "Sites in this agent's federation view (itself included) by liveness",
        sites,
    );
    registry.register(
        "federation_connected_peers",
        "Federation peers connected right now",
        gauge_of(u64::try_from(report.connected_peers).unwrap_or(u64::MAX)),
    );
    let transport = &report.transport;
    let refused = Family::<Label, Counter>::default();
    for (reason, count) in [
        ("handshake_failed", transport.inbound_handshake_failed),
        ("connection_denied", transport.inbound_denied),
        ("connection_failed", transport.inbound_failed_other),
        ("rpc_frame_oversized", transport.rpc_frames_oversized),
        ("rpc_frame_truncated", transport.rpc_frames_truncated),
        ("rpc_request_refused", transport.rpc_requests_refused),
        ("gossip_oversized", transport.gossip_oversized),
    ] {
        refused.get_or_create(&[("reason", reason)]).inc_by(count);
    }
    registry.register(
        "federation_refused",
        "Federation input the transport refused, by reason: inbound connections whose \
         handshake failed (no or another pre-shared key, not libp2p, too slow), denied (over a \
         connection limit, not allowed) or failed otherwise; RPC frames over the size limit or \
         cut short; requests beyond the unanswered ones allowed; gossip over the size limit",
        refused,
    );
    registry.register(
        "federation_outbox_dropped",
        "Outgoing federation messages dropped because the outbox was full",
        counter(report.outbox_dropped),
    );
}

/// The API server's limits at work.
fn register_api(registry: &mut Registry, api: &ApiStats) {
    registry.register(
        "api_connections",
        "Connections to the API open now",
        gauge_of(api.connections_open),
    );
    let refused = Family::<Label, Counter>::default();
    for (reason, count) in [
        ("connections_max", api.connections_refused),
        ("busy", api.requests_busy),
        ("header_timeout", api.headers_timed_out),
        ("body_timeout", api.bodies_timed_out),
        ("write_timeout", api.writes_timed_out),
    ] {
        refused.get_or_create(&[("reason", reason)]).inc_by(count);
    }
    registry.register(
        "api_refused",
        "API connections and requests refused, by reason: over api.connections_max (503), \
         over api.requests_max (503 busy), headers or body not sent within api.client_timeout \
         (connection closed, or 408), answers not taken within api.client_timeout (connection \
         closed)",
        refused,
    );
}

/// Labels with values known only at run time (site and cluster names).
type Labels = Vec<(&'static str, String)>;

/// The gateway's counters: per peer site and per cluster segment.
fn register_gateway(registry: &mut Registry, gateway: &GatewayCounters) {
    type PeerField = fn(&vcfed_overlay::gateway::PeerStats) -> u64;
    let per_peer: [(&str, &str, Option<Unit>, PeerField); 8] = [
        (
            "gateway_tx_datagrams",
            "Datagrams sent to a peer gateway (data, handshakes, keepalives)",
            None,
            |p| p.tx_datagrams,
        ),
        (
            "gateway_tx",
            "UDP payload bytes sent to a peer gateway",
            Some(Unit::Bytes),
            |p| p.tx_bytes,
        ),
        (
            "gateway_rx_datagrams",
            "Authenticated datagrams received from a peer gateway",
            None,
            |p| p.rx_datagrams,
        ),
        (
            "gateway_rx",
            "UDP payload bytes of authenticated datagrams from a peer gateway",
            Some(Unit::Bytes),
            |p| p.rx_bytes,
        ),
        (
            "gateway_rx_dropped",
            "Datagrams for a peer's sessions refused (failed authentication, replay, no session)",
            None,
            |p| p.rx_dropped,
        ),
        (
            "gateway_rx_replays",
            "Of those, replays: data packets its sessions had seen, or older than the replay window, and replayed handshake initiations",
            None,
            |p| p.rx_replays,
        ),
        (
            "gateway_inner_dropped",
            "Decrypted packets from a peer dropped (not GRE, bad or timed-out fragments, bad offload metadata)",
            None,
            |p| p.inner_dropped,
        ),
        (
            "gateway_handshakes",
            "WireGuard sessions established with a peer gateway",
            None,
            |p| p.handshakes,
        ),
    ];
    for (name, help, unit, field) in per_peer {
        let family = Family::<Labels, Counter>::default();
        for (site, stats) in &gateway.peers {
            family
                .get_or_create(&vec![("peer", site.clone())])
                .inc_by(field(stats));
        }
        match unit {
            Some(unit) => registry.register_with_unit(name, help, unit, family),
            None => registry.register(name, help, family),
        }
    }
    let frames = Family::<Labels, Counter>::default();
    for (cluster, segment, stats) in &gateway.segments {
        for (way, count) in [
            ("unicast", stats.unicast),
            ("flooded", stats.flooded),
            ("delivered", stats.delivered),
            ("dropped", stats.dropped),
        ] {
            frames
                .get_or_create(&vec![
                    ("cluster", cluster.clone()),
                    ("segment", segment.to_string()),
                    ("way", way.to_owned()),
                ])
                .inc_by(count);
        }
    }
    let stats = &gateway.datagrams;
    let dropped = Family::<Label, Counter>::default();
    for (reason, count) in [
        ("junk", stats.junk),
        ("bad_mac", stats.bad_mac),
        ("cookie_reply", stats.cookie_replies),
        ("rate_limited", stats.rate_limited),
        ("unknown_peer", stats.unknown_peer),
        ("replay", stats.replays),
        ("refused", stats.refused),
    ] {
        dropped.get_or_create(&[("reason", reason)]).inc_by(count);
    }
    registry.register(
        "gateway_datagrams_dropped",
        "Datagrams the gateway dropped: junk, bad_mac (not for its key), cookie_reply (a handshake over the rate limit, answered with a cookie instead), rate_limited (a handshake with a cookie, under load, over its address's limit), unknown_peer, replay, refused (failed authentication, no session)",
        dropped,
    );
    registry.register(
        "gateway_segment_frames",
        "Frames a cluster segment's switch handled: unicast and flooded to peers, delivered to this site, dropped",
        frames,
    );
}

fn counter(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}

fn gauge_of(value: u64) -> Gauge {
    let gauge_metric = Gauge::default();
    gauge_metric.set(gauge(value));
    gauge_metric
}

/// A count as a gauge's value; no count here comes near `i64::MAX`.
fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateways_drops_show_by_reason_and_replays_by_peer() {
        let mut gateway = GatewayCounters::default();
        gateway.datagrams.replays = 3;
        gateway.datagrams.cookie_replies = 7;
        let peer = vcfed_overlay::gateway::PeerStats {
            rx_replays: 2,
            ..Default::default()
        };
        gateway.peers.push(("site-b".to_owned(), peer));
        let mut registry = Registry::with_prefix(PREFIX);
        register_gateway(&mut registry, &gateway);
        let mut text = String::new();
        text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"vcfed_gateway_datagrams_dropped_total{reason="replay"} 3"#,
            r#"vcfed_gateway_datagrams_dropped_total{reason="cookie_reply"} 7"#,
            r#"vcfed_gateway_datagrams_dropped_total{reason="rate_limited"} 0"#,
            r#"vcfed_gateway_rx_replays_total{peer="site-b"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
