//! `vcfed demo --local` (and `vcfed demo` without root): one site on this
//! machine, end to end, in a few seconds.
//!
//! It initialises a site in a fresh directory, runs its agent, and walks
//! through what a site does on its own: capacity, a hold and its commit, a
//! refused overbooking, a lease running out, and a restart that keeps every
//! commitment. Everything goes through the same code and API as `vcfed run`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vcfed_storage::{Reservation, ReservationState};

use crate::api_types::{CapacityReport, HoldBody, InstantArg, OwnerBody, SiteInfo};
use crate::cli::{InitArgs, client_from_config, print_reservations, print_table};
use crate::client::{ApiClient, ClientError};
use crate::config::{self, Config};
use crate::time::now_ms;

use super::{DemoArgs, step};

/// Nodes of the demo site.
const DEMO_NODES: u32 = 4;
/// Lease of the hold that the demo lets run out.
const SHORT_LEASE_S: u64 = 1;
/// How long the demo waits for the agent's API to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the demo.
pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (dir, remove_after) = super::demo_dir(args);
    let result = tour(args, &dir).await;
    if remove_after {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result?;
    outln!("\ndemo finished in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn tour(args: &DemoArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    step("initialise site demo-a");
    let api_listen = free_loopback_port().context("finding a free port for the demo API")?;
    let init = InitArgs {
        site: "demo-a".to_owned(),
        data_dir: dir.to_owned(),
        config: None,
        force: args.dir.is_some(),
        api_listen,
        listen: vec![
            config::DEFAULT_FEDERATION_LISTEN
                .parse()
                .expect("the default multiaddr parses"),
        ],
        gateway_listen: config::DEFAULT_GATEWAY_LISTEN
            .parse()
            .expect("the default address parses"),
        bootstrap: Vec::new(),
        nodes: DEMO_NODES,
        node_cores: 2,
        node_memory_mib: 4096,
        node_disk_gib: 20,
        vlans: "100-199".parse().expect("a valid VLAN range"),
    };
    let outcome = crate::cli::init(&init)?;
    let config = Config::load(&outcome.config_path)?;

    step("start the agent");
    let (agent, stop) = start_agent(&config).await?;
    let client = client_from_config(&config)?;
    wait_ready(&client).await?;
    let site: SiteInfo = client.get("/v1/site").await?;
    outln!(
        "agent of {} up at http://{} with {} free nodes",
        site.name,
        client.addr(),
        site.free_now
    );

    step("hold 3 nodes for cluster `demo`, 1h starting in 10 min, then commit");
    let start = now_ms() + 10 * 60 * 1000;
    let end = start + 60 * 60 * 1000;
    let held = hold(&client, "demo-1", "demo", start, end, 3, 30).await?;
    print_reservations(&[held], false)?;
    let committed: Reservation = client
        .post("/v1/reservations/demo-1/commit", &OwnerBody::default())
        .await?;
    print_reservations(&[committed], false)?;

    step("ask for 2 more nodes in the same hour: refused, never overbooked");
    match hold(&client, "demo-2", "other", start, end, 2, 30).await {
        Err(e) => match e.downcast_ref::<ClientError>() {
            Some(ClientError::Api { code, message, .. }) if code == "insufficient_capacity" => {
                outln!("refused: {message}");
            }
            _ => return Err(e),
        },
        Ok(_) => bail!("the site accepted an overbooking hold"),
    }

    step(&format!(
        "hold 1 node with a {SHORT_LEASE_S}s lease and let it run out"
    ));
    let short = hold(&client, "demo-3", "other", start, end, 1, SHORT_LEASE_S).await?;
    print_reservations(&[short], false)?;
    tokio::time::sleep(
        Duration::from_secs(SHORT_LEASE_S)
            + crate::agent::SWEEP_INTERVAL
            + Duration::from_millis(500),
    )
    .await;
    let swept: Reservation = client.get("/v1/reservations/demo-3").await?;
    if swept.state != ReservationState::Expired {
        bail!(
            "the short hold is {} after its lease, expected expired",
            swept.state
        );
    }
    print_reservations(&[swept], false)?;

    step("free capacity over the next 2 hours");
    let report: CapacityReport = client
        .get(&format!(
            "/v1/capacity?from={}&to={}",
            now_ms(),
            now_ms() + 2 * 3_600_000
        ))
        .await?;
    let mut rows = vec![vec!["FROM".to_owned(), "FREE".to_owned()]];
    rows.extend(
        report
            .steps
            .iter()
            .map(|s| vec![s.at.clone(), s.free.to_string()]),
    );
    print_table(&rows);

    step("restart the agent: commitments survive");
    let _ = stop.send(());
    agent.await.context("agent task")??;
    let (agent, stop) = start_agent(&config).await?;
    wait_ready(&client).await?;
    let active: Vec<Reservation> = client.get("/v1/reservations").await?;
    print_reservations(&active, false)?;
    if !active
        .iter()
        .any(|r| r.key == "demo-1" && r.state == ReservationState::Committed)
    {
        bail!("the committed reservation did not survive the restart");
    }

    if args.keep {
        step("the site keeps running; try:");
        let config_arg = config.path.display();
        outln!("  vcfed status --config {config_arg}");
        outln!("  vcfed capacity --config {config_arg}");
        outln!("  vcfed reservation list --all --config {config_arg}");
        outln!("press Ctrl-C to stop it (files stay in {})", dir.display());
        crate::agent::termination_signal().await;
    }
    let _ = stop.send(());
    agent.await.context("agent task")??;
    Ok(())
}

type AgentTask = tokio::task::JoinHandle<anyhow::Result<()>>;

async fn start_agent(
    config: &Config,
) -> anyhow::Result<(AgentTask, tokio::sync::oneshot::Sender<()>)> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = crate::agent::start(config.clone(), async move {
        let _ = stop_rx.await;
    })
    .await?;
    Ok((agent.task, stop_tx))
}

async fn hold(
    client: &ApiClient,
    key: &str,
    cluster: &str,
    start: i64,
    end: i64,
    nodes: u32,
    lease_s: u64,
) -> anyhow::Result<Reservation> {
    let body = HoldBody {
        key: key.to_owned(),
        cluster_id: cluster.to_owned(),
        requester: None,
        start: InstantArg::Ms(start),
        end: InstantArg::Ms(end),
        nodes,
        shape: None,
        lease_s: Some(lease_s),
    };
    Ok(client.post("/v1/reservations", &body).await?)
}

/// Polls the API until it answers or [`READY_TIMEOUT`] passes.
pub async fn wait_ready(client: &ApiClient) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match client.get::<SiteInfo>("/v1/site").await {
            Ok(_) => return Ok(()),
            Err(ClientError::Unreachable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn free_loopback_port() -> std::io::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    listener.local_addr()
}
