//! `vcfed events`: the site's event log (holds, commits, clusters, nodes),
//! all of it or one cluster's, and with `--follow` as it grows.

use std::time::Duration;

use clap::Args;
use vcfed_storage::Event;

use crate::api_types::ClusterDetail;
use crate::cli::{ConfigArg, client_for, non_empty, print_table};
use crate::client::{ApiClient, segment};
use crate::time::format_instant;

/// Events asked of the agent per call (its maximum).
const PAGE: u32 = 1000;
/// How often `--follow` asks for new events.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// Arguments of `vcfed events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Only the events of this cluster (id or name): its reservations,
    /// parts and nodes.
    #[arg(long)]
    cluster: Option<String>,
    /// Keep printing events as they happen, until Ctrl-C.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only the last N events before following or exiting.
    #[arg(long, default_value_t = 50)]
    last: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `vcfed events`.
pub(crate) async fn run(args: &EventsArgs) -> anyhow::Result<()> {
    let client = client_for(&args.config)?;
    let cluster = match &args.cluster {
        Some(name) => {
            let name = non_empty(name, "the cluster name or id")?;
            let detail: ClusterDetail = client
                .get(&format!("/v1/clusters/{}", segment(name)))
                .await?;
            Some(detail.record.id)
        }
        None => None,
    };
    let keep = |event: &Event| cluster.as_deref().is_none_or(|id| concerns(event, id));
    // Everything so far, to print the last ones.
    let (mut seen, mut after) = (Vec::new(), 0);
    loop {
        let page = fetch(&client, after).await?;
        let full = page.len() == PAGE as usize;
        after = page.last().map_or(after, |e| e.seq);
        seen.extend(page.into_iter().filter(|e| keep(e)));
        if seen.len() > args.last.saturating_mul(2).max(PAGE as usize) {
            seen.drain(..seen.len() - args.last);
        }
        if !full {
            break;
        }
    }
    let first = seen.len().saturating_sub(args.last);
    print(&seen[first..], args.json, true)?;
    if !args.follow {
        return Ok(());
    }
    let stop = crate::agent::termination_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        let page = fetch(&client, after).await?;
        after = page.last().map_or(after, |e| e.seq);
        let new: Vec<Event> = page.into_iter().filter(|e| keep(e)).collect();
        print(&new, args.json, false)?;
    }
}

async fn fetch(client: &ApiClient, after: i64) -> anyhow::Result<Vec<Event>> {
    Ok(client
        .get(&format!("/v1/events?after={after}&limit={PAGE}"))
        .await?)
}

/// Whether `event` is about cluster `id`: the cluster itself, one of its
/// reservations (`<id>/<n>`), or an event that names it in its detail.
fn concerns(event: &Event, id: &str) -> bool {
    event.subject == id
        || event
            .subject
            .strip_prefix(id)
            .is_some_and(|rest| rest.starts_with('/'))
        || event.detail["cluster"].as_str() == Some(id)
        || event.detail["cluster_id"].as_str() == Some(id)
}

fn print(events: &[Event], json: bool, header: bool) -> anyhow::Result<()> {
    if json {
        for event in events {
            crate::outln!("{}", serde_json::to_string(event)?);
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    if header {
        rows.push(
            ["SEQ", "AT", "EVENT", "SUBJECT", "DETAIL"]
                .map(str::to_owned)
                .to_vec(),
        );
    }
    for event in events {
        rows.push(vec![
            event.seq.to_string(),
            format_instant(event.at_ms),
            event.kind.clone(),
            event.subject.clone(),
            if event.detail.as_object().is_some_and(|o| o.is_empty()) || event.detail.is_null() {
                String::new()
            } else {
                event.detail.to_string()
            },
        ]);
    }
    if !rows.is_empty() {
        print_table(&rows);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(subject: &str, detail: serde_json::Value) -> Event {
        Event {
            seq: 1,
            at_ms: 0,
            kind: "k".into(),
            subject: subject.into(),
            detail,
        }
    }

    #[test]
    fn a_clusters_events_are_its_own_and_its_reservations() {
        let none = serde_json::json!({});
        assert!(concerns(&event("c-1", none.clone()), "c-1"));
        assert!(concerns(&event("c-1/2", none.clone()), "c-1"));
        assert!(!concerns(&event("c-10/2", none.clone()), "c-1"));
        assert!(!concerns(&event("c-10", none.clone()), "c-1"));
        assert!(concerns(
            &event("site-b", serde_json::json!({ "cluster": "c-1" })),
            "c-1"
        ));
    }
}
