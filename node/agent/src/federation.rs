//! The agent's federation shell: feeds the registry core from libp2p, the
//! ledger and the wall clock, and carries out what the core asks.
//!
//! One task owns the [`Registry`] core. It never waits on the swarm: what
//! the core wants sent goes through a bounded outbox drained by a second
//! task, so a busy swarm cannot stall the core and the swarm's own event
//! channel can always be drained. Gossip is best-effort: when the outbox is
//! full a message is dropped and counted, and anti-entropy repairs the loss.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use libp2p_identity::PeerId;
use multiaddr::{Multiaddr, Protocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use vcfed_registry::p2p::{self, GossipId, InboundRequestId, P2pConfig, P2pEvent, P2pHandle};
use vcfed_registry::{
    GatewayInfo, Registry, RegistryConfig, RegistryEvent, RegistryStats, SiteState, Verdict,
};
use vcfed_storage::ClusterRecord;

use vcfed_node_core::cluster::{
    ClusterConfig, ClusterCore, ClusterRequest, CreateError, DeleteError, ForgetError, ReportedNode,
};

use vcfed_node_core::federation::{
    ADVERT_TOPIC, Federation, FederationEvent, LocalSite, MESSAGE_MAX_BYTES,
    Outgoing as CoreOutgoing, REQUEST_TIMEOUT_MS,
};
use vcfed_node_core::ledger::LedgerAccess;

use crate::config::Config;
use crate::identity::SiteKeys;
use crate::ledger::SharedLedger;
use crate::time::now_ms;

/// Queued outgoing messages before new ones are dropped.
const OUTBOX_MAX: usize = 1024;
/// Queued commands from the API.
const COMMANDS_MAX: usize = 64;
/// How often disconnected sites are considered for a redial.
const RECONNECT_TICK: Duration = Duration::from_secs(2);
/// Longest the shell sleeps without looking at its timers.
const WAKE_MAX: Duration = Duration::from_secs(1);
/// Longest the local advert goes without a recomputation, however long
/// [`advert_capacity`] says it holds: a safety net for a ledger write that
/// nobody reported and for steps of the wall clock.
const ADVERT_RECOMPUTE_MAX_MS: i64 = 60_000;
/// Peers whose last written addresses are remembered, to skip rewriting them.
const REMEMBERED_MAX: usize = 4096;
/// First and longest wait between redials of one peer.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Most peers this site dials on its own; beyond that gossip carries the view.
const DIALED_PEERS_MAX: usize = 64;
/// How long an RPC may take.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(REQUEST_TIMEOUT_MS.unsigned_abs());

/// One site as `GET /v1/sites` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteSummary {
    /// Site name.
    pub name: String,
    /// Peer id of its agent.
    pub peer_id: String,
    /// Whether it is this site.
    pub local: bool,
    /// alive, suspect or gone.
    pub state: SiteState,
    /// Node slots free now, per its latest advert.
    pub free_now: u32,
    /// Node slots in all.
    pub total_nodes: u32,
    /// Round-trip time in ms, if measured.
    pub rtt_ms: Option<f64>,
    /// Age of its latest advert, ms.
    pub advert_age_ms: i64,
    /// Version of its latest advert.
    pub version: u64,
    /// Its federation addresses.
    pub addrs: Vec<String>,
}

/// What `GET /v1/sites` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SitesReport {
    /// Every known site, this one first.
    pub sites: Vec<SiteSummary>,
    /// Peers connected right now.
    pub connected_peers: usize,
    /// Counters of the gossip core.
    pub stats: RegistryStats,
    /// Outgoing messages dropped because the outbox was full.
    pub outbox_dropped: u64,
    /// What the transport refused: connections, RPC frames, requests.
    #[serde(default)]
    pub transport: p2p::P2pStats,
}

/// Talks to the federation task.
#[derive(Clone, Debug)]
pub struct FederationHandle {
    commands: mpsc::Sender<Command>,
    /// Ledger changes, apart from the commands: a notification is never
    /// lost (it waits as a permit) and a burst of them is one.
    capacity: Arc<Notify>,
    peer_id: PeerId,
}

#[derive(Debug)]
enum Command {
    Sites {
        reply: oneshot::Sender<SitesReport>,
    },
    Join {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<Joined, JoinError>>,
    },
    CreateCluster {
        id: String,
        request: ClusterRequest,
        reply: oneshot::Sender<Result<ClusterRecord, CreateError>>,
    },
    DeleteCluster {
        id: String,
        reply: oneshot::Sender<Result<ClusterRecord, DeleteError>>,
    },
    ReportNodes {
        cluster: String,
        nodes: Vec<ReportedNode>,
    },
    ForgetSite {
        site: String,
        force: bool,
        reply: oneshot::Sender<Result<Forgotten, ForgetSiteError>>,
    },
}

impl FederationHandle {
    /// This site's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The federation view.
    pub async fn sites(&self) -> anyhow::Result<SitesReport> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Sites { reply })
            .await
            .context("the federation task has stopped")?;
        answer.await.context("the federation task has stopped")
    }

    /// The ledger changed: re-advertise if the free capacity did.
    pub fn capacity_changed(&self) {
        // Not a command: with the command queue full it would be dropped,
        // and the shell recomputes its advert only when told or when
        // `advert_capacity` says it is due.
        self.capacity.notify_one();
    }

    /// Asks for a new cluster, mastered by this site. Answers once the
    /// request is accepted (the reservation then proceeds) or refused.
    pub async fn create_cluster(
        &self,
        id: String,
        request: ClusterRequest,
    ) -> anyhow::Result<Result<ClusterRecord, CreateError>> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::CreateCluster { id, request, reply })
            .await
            .context("the federation task has stopped")?;
        answer.await.context("the federation task has stopped")
    }

    /// Deletes a cluster this site masters.
    pub async fn delete_cluster(
        &self,
        id: String,
    ) -> anyhow::Result<Result<ClusterRecord, DeleteError>> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::DeleteCluster { id, reply })
            .await
            .context("the federation task has stopped")?;
        answer.await.context("the federation task has stopped")
    }

    /// Sends the states of this site's nodes of `cluster` to its master
    /// (nothing at the master). Best effort: with the queue full the report
    /// is dropped, and the next one carries the same states.
    pub fn report_nodes(&self, cluster: String, nodes: Vec<ReportedNode>) {
        let _ = self
            .commands
            .try_send(Command::ReportNodes { cluster, nodes });
    }

    /// Forgets a site that vanished: `site` is its name or peer id.
    pub async fn forget_site(
        &self,
        site: String,
        force: bool,
    ) -> Result<Forgotten, ForgetSiteError> {
        let stopped = || ForgetSiteError::Failed("the federation task has stopped".to_owned());
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::ForgetSite { site, force, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Dials a member by address (ending in /p2p/<peer id>) and waits (at
    /// most [`JOIN_WAIT`], then [`JOIN_ADVERT_WAIT`] for its advert) for
    /// the outcome. The address is remembered only once it answered.
    pub async fn join(&self, addr: Multiaddr) -> Result<Joined, JoinError> {
        let stopped = || JoinError::Refused("the federation task has stopped".to_owned());
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Join { addr, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// A site forgotten (`vcfed sites forget`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    /// Its name, if known.
    pub site: Option<String>,
    /// Its peer id.
    pub peer_id: String,
    /// The live clusters mastered here whose parts at the site ended
    /// (`--force`), each healed by its policy.
    pub ended: Vec<String>,
}

/// Why a site was not forgotten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgetSiteError {
    /// No such site in the view or the remembered peers.
    #[error("no site {0:?} in this site's view or its remembered peers (see `vcfed sites`)")]
    Unknown(String),
    /// That is this site.
    #[error("{0} is this site")]
    Local(String),
    /// The site is alive.
    #[error(
        "{0} is alive in the federation: only a site that is gone can be forgotten (it would \
         be learnt again at its next advert)"
    )]
    Alive(String),
    /// The site holds nodes of live clusters mastered here.
    #[error(
        "{site} still holds nodes of live clusters mastered here: {}; `--force` ends those \
         parts (each cluster heals by its policy)",
        clusters.join(", ")
    )]
    HoldsParts {
        /// The site.
        site: String,
        /// The clusters.
        clusters: Vec<String>,
    },
    /// The ledger failed.
    #[error("{0}")]
    Failed(String),
}

/// How long `join` waits for the member to answer: longer than the
/// transport's own handshake timeout (10 s), so that a handshake a private
/// federation stalls is reported as such, not as silence.
pub const JOIN_WAIT: Duration = Duration::from_secs(15);
/// How long `join` then waits for the member's advert (its site name).
pub const JOIN_ADVERT_WAIT: Duration = Duration::from_secs(3);

/// A join that worked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Joined {
    /// The member's peer id.
    pub peer_id: String,
    /// Its site name, once its advert arrived (it may come later).
    pub site: Option<String>,
}

/// Why a join did not work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The address is not one to join (no /p2p/<peer id>, this site's own).
    #[error("{0}")]
    BadAddress(String),
    /// Something answered, and the connection failed: another peer id, the
    /// private federation's key, an allow-list.
    #[error("{0}")]
    Refused(String),
    /// Nothing answered in time.
    #[error("{0}")]
    Unreachable(String),
}

/// A join waiting for its outcome.
struct PendingJoin {
    addr: Multiaddr,
    reply: oneshot::Sender<Result<Joined, JoinError>>,
    /// When to give up: on an answer before it connects, on its advert after.
    deadline_ms: i64,
    connected: bool,
}

/// Starts the swarm and the registry core. Fails (before anything is
/// listening for long) on a bad PSK file or an unusable listen address.
pub async fn start(
    config: &Config,
    keys: &SiteKeys,
    ledger: SharedLedger,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(FederationHandle, tokio::task::JoinHandle<()>)> {
    let psk = match &config.federation.psk_file {
        Some(path) => {
            // A missing, unreadable, too open or malformed key file is a
            // configuration error: the site must not start without it.
            let bad = |why: String| crate::usage::UsageError(format!("federation.psk_file: {why}"));
            let bytes = crate::identity::read_secret(path).map_err(|e| bad(e.to_string()))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| bad(format!("{} is not text", path.display())))?;
            Some(p2p::parse_psk(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?)
        }
        None => None,
    };
    let allowed_sites = (!config.federation.allow_peers.is_empty()).then(|| {
        let mut allowed: BTreeSet<PeerId> = config.federation.allow_peers.iter().copied().collect();
        // Our own id is always allowed (libp2p never dials itself anyway).
        allowed.insert(keys.peer_id());
        allowed
    });
    let (handle, events) = p2p::spawn(P2pConfig {
        keypair: keys.federation.clone(),
        listen: config.federation.listen.clone(),
        bootstrap: config.federation.bootstrap.clone(),
        psk,
        allow_peers: allowed_sites.clone(),
        topic: ADVERT_TOPIC.to_owned(),
        message_max_bytes: MESSAGE_MAX_BYTES,
        request_timeout: REQUEST_TIMEOUT,
        idle_connection_timeout: Duration::from_secs(3600),
    })
    .await
    .map_err(|e| match e {
        // Worded like the API's bind failure: which address, which setting.
        p2p::P2pError::Listen { addr, source } => anyhow::Error::new(source).context(format!(
            "binding the federation listener to {addr} (federation.listen in {})",
            config.path.display()
        )),
        e => anyhow::Error::new(e).context("starting the federation transport"),
    })?;

    let gossip = config.federation.gossip;
    let registry_config = RegistryConfig {
        advert_ttl_ms: u32::try_from(gossip.advert_ttl.as_millis()).unwrap_or(u32::MAX),
        refresh_ms: millis(gossip.advert_refresh),
        anti_entropy_ms: millis(gossip.anti_entropy),
        suspect_ms: millis(gossip.advert_refresh),
        message_max_bytes: MESSAGE_MAX_BYTES,
        allowed_sites: allowed_sites.clone(),
        ..RegistryConfig::default()
    };
    let version = ledger
        .run(|ledger| ledger.advert_version())
        .await
        .context("reading the advert version")?;
    let (local_id, local_name) = (keys.peer_id(), config.site.name.clone());
    // What this site tells the sites it shares a cluster with about its gateway.
    let gateway = config
        .gateway
        .endpoint
        .clone()
        .map(|endpoint| vcfed_storage::GatewayRef {
            endpoint,
            public_key: keys.tunnel_public_key(),
        });
    let cluster_config = ClusterConfig {
        heal_grace_ms: millis(config.clusters.heal_grace),
        lease_ms: millis(config.clusters.lease),
        reserve_deadline_ms: millis(config.clusters.reserve_deadline),
        ..ClusterConfig::default()
    };
    let cluster = ledger
        .run(move |ledger| {
            let mut cluster = ClusterCore::new(local_id, local_name, gateway, cluster_config);
            cluster.resume(ledger, now_ms())?;
            Ok(cluster)
        })
        .await
        .context("resuming the clusters this site masters")?;
    let seed = crate::identity::random_bytes::<8>()?;
    let registry = Registry::new(
        registry_config,
        keys.federation.clone(),
        version,
        u64::from_le_bytes(seed),
        now_ms(),
    );

    let (outbox_tx, outbox_rx) = mpsc::channel(OUTBOX_MAX);
    tokio::spawn(outbox_loop(handle.clone(), outbox_rx));
    let (commands_tx, commands_rx) = mpsc::channel(COMMANDS_MAX);
    let capacity = Arc::new(Notify::new());
    let local = LocalSite {
        name: config.site.name.clone(),
        gateway: config.gateway.endpoint.clone().map(|endpoint| GatewayInfo {
            endpoint,
            tunnel_public_key: x25519_dalek::PublicKey::from(&keys.tunnel).to_bytes(),
        }),
        addrs: Vec::new(),
    };
    let fed = Federation::new(
        registry,
        cluster,
        local,
        Some(ADVERT_RECOMPUTE_MAX_MS),
        now_ms(),
    );
    let mut shell = Shell {
        fed,
        p2p: handle,
        outbox: outbox_tx,
        outbox_dropped: 0,
        ledger,
        listen_addrs: Vec::new(),
        connected: BTreeSet::new(),
        dial_targets: BTreeMap::new(),
        remembered: BTreeMap::new(),
        joins: BTreeMap::new(),
        capacity: capacity.clone(),
    };
    for addr in &config.federation.bootstrap {
        if let Some(Protocol::P2p(peer)) = addr.iter().last() {
            shell
                .dial_targets
                .entry(peer)
                .or_insert_with(|| DialTarget::new(vec![strip_p2p(addr)]));
        }
    }
    // The shell runs on a thread of its own: it calls the ledger (SQLite,
    // fsync) synchronously from the cores, which must not stall the
    // runtime that serves the API and the swarm.
    let task = tokio::task::spawn_blocking(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the federation thread's runtime");
                return;
            }
        };
        shell.load_known_peers();
        // Until the sites it will dial are heard from (or a refresh round
        // passes), a request that needs them is answered "not known yet",
        // not "the federation is full".
        let expected: Vec<PeerId> = shell.dial_targets.keys().copied().collect();
        shell.fed.registry_mut().expect_sites(now_ms(), expected);
        shell.fed.refresh_advert(&mut shell.ledger, now_ms());
        runtime.block_on(shell.run(events, commands_rx, stop));
    });
    Ok((
        FederationHandle {
            commands: commands_tx,
            capacity,
            peer_id: keys.peer_id(),
        },
        task,
    ))
}

/// What the core asked to send, on its way to the swarm.
enum Outgoing {
    Publish(Vec<u8>),
    Request {
        to: PeerId,
        data: Vec<u8>,
    },
    Respond {
        request: InboundRequestId,
        data: Vec<u8>,
    },
    Validate {
        id: GossipId,
        source: PeerId,
        verdict: Verdict,
    },
    Dial(Multiaddr),
}

async fn outbox_loop(p2p: P2pHandle, mut outbox: mpsc::Receiver<Outgoing>) {
    while let Some(outgoing) = outbox.recv().await {
        let result = match outgoing {
            Outgoing::Publish(data) => p2p.publish(data).await,
            Outgoing::Request { to, data } => p2p.request(to, data).await.map(|_| ()),
            Outgoing::Respond { request, data } => p2p.respond(request, data).await,
            Outgoing::Validate {
                id,
                source,
                verdict,
            } => {
                let validation = match verdict {
                    Verdict::Accept => p2p::Validation::Accept,
                    Verdict::Ignore => p2p::Validation::Ignore,
                    Verdict::Reject => p2p::Validation::Reject,
                };
                p2p.report_validation(id, source, validation).await
            }
            Outgoing::Dial(addr) => p2p.dial(addr).await,
        };
        match result {
            Ok(()) => {}
            Err(p2p::P2pError::Closed) => return,
            Err(e) => tracing::debug!(error = %e, "federation send failed"),
        }
    }
}

/// A peer this site keeps dialing until connected, with backoff.
#[derive(Debug)]
struct DialTarget {
    addrs: Vec<Multiaddr>,
    /// Which address the next redial uses: libp2p drops a second dial to a
    /// peer while one is pending, so each attempt tries one address, in turn.
    next_addr: usize,
    next_attempt: tokio::time::Instant,
    backoff: Duration,
}

impl DialTarget {
    fn new(addrs: Vec<Multiaddr>) -> DialTarget {
        DialTarget {
            addrs,
            next_addr: 0,
            next_attempt: tokio::time::Instant::now(),
            backoff: BACKOFF_MIN,
        }
    }
}

struct Shell {
    /// The site core's federation: the registry core, the cluster core and
    /// the glue between them (advert timing, publish gate, demux).
    fed: Federation,
    p2p: P2pHandle,
    outbox: mpsc::Sender<Outgoing>,
    outbox_dropped: u64,
    ledger: SharedLedger,
    listen_addrs: Vec<Multiaddr>,
    connected: BTreeSet<PeerId>,
    dial_targets: BTreeMap<PeerId, DialTarget>,
    remembered: BTreeMap<PeerId, (Option<String>, Vec<String>)>,
    /// Joins waiting for their outcome, by the peer they dial.
    joins: BTreeMap<PeerId, Vec<PendingJoin>>,
    /// Told of ledger changes by the handle.
    capacity: Arc<Notify>,
}

impl Shell {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<P2pEvent>,
        mut commands: mpsc::Receiver<Command>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut stopped = std::pin::pin!(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        });
        let mut reconnect = tokio::time::interval(RECONNECT_TICK);
        reconnect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let capacity = self.capacity.clone();
        loop {
            let next = self.fed.poll_timeout();
            // Never sleep long: deadlines are on the wall clock, which may step.
            let wake = next.map_or(WAKE_MAX, |at| {
                Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)).min(WAKE_MAX)
            });
            tokio::select! {
                () = &mut stopped => break,
                event = events.recv() => match event {
                    Some(event) => self.on_p2p_event(event).await,
                    None => {
                        tracing::warn!("the federation transport stopped");
                        break;
                    }
                },
                Some(command) = commands.recv() => self.on_command(command).await,
                () = capacity.notified() => self.capacity_changed(),
                _ = tokio::time::sleep(wake) => {
                    // Time moves the advertised steps (a reservation starts or
                    // ends, a hold's lease runs out): the core recomputes the
                    // advert when it stops holding, and runs the cluster's
                    // timers, which commit and release this site's own holds.
                    if let Err(e) = self.fed.handle_timeout(&mut self.ledger, now_ms()) {
                        tracing::error!(error = %format!("{e:#}"), "federation timers failed");
                    }
                }
                _ = reconnect.tick() => self.redial(),
            }
            self.drain().await;
            self.settle_joins();
        }
        self.p2p.shutdown().await;
        tracing::info!("federation stopped");
    }

    async fn on_p2p_event(&mut self, event: P2pEvent) {
        let now = now_ms();
        match event {
            P2pEvent::Listening { addr } => {
                tracing::info!(%addr, "federation listening");
                if !self.listen_addrs.contains(&addr) {
                    self.listen_addrs.push(addr);
                }
                let addrs = self.advertised_addrs();
                self.fed.set_addrs(addrs, &mut self.ledger, now);
            }
            P2pEvent::PeerConnected { peer, addr } => {
                tracing::debug!(%peer, %addr, "peer connected");
                self.connected.insert(peer);
                self.join_connected(peer);
                if let Some(target) = self.dial_targets.get_mut(&peer) {
                    target.backoff = BACKOFF_MIN;
                }
                self.fed.registry_mut().peer_connected(peer);
            }
            P2pEvent::PeerDisconnected { peer } => {
                tracing::debug!(%peer, "peer disconnected");
                self.connected.remove(&peer);
                self.fed.registry_mut().peer_disconnected(peer);
            }
            P2pEvent::PeerAddresses { peer, addrs } => {
                let addrs: Vec<String> = addrs.iter().map(|a| strip_p2p(a).to_string()).collect();
                self.remember_peer(peer, None, addrs);
            }
            P2pEvent::Rtt { peer, rtt } => self.fed.registry_mut().peer_rtt(peer, rtt),
            P2pEvent::Gossip { id, source, data } => {
                let verdict = self.fed.handle_gossip(now, &data);
                self.send(Outgoing::Validate {
                    id,
                    source,
                    verdict,
                });
            }
            P2pEvent::Request {
                peer,
                request,
                data,
            } => {
                let answer = match self.fed.handle_request(&mut self.ledger, now, peer, &data) {
                    Ok(answer) => answer,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), %peer, "handling a cluster request failed");
                        None
                    }
                };
                if let Some(answer) = answer {
                    self.send(Outgoing::Respond {
                        request,
                        data: answer,
                    });
                }
            }
            P2pEvent::Response { peer, data, .. } => {
                if let Err(e) = self.fed.handle_response(&mut self.ledger, now, peer, &data) {
                    tracing::error!(error = %format!("{e:#}"), %peer, "handling a cluster answer failed");
                }
            }
            P2pEvent::RequestFailed { peer, error, .. } => {
                tracing::debug!(%peer, %error, "federation request failed");
            }
            P2pEvent::ConnectionFailed { peer, error } => {
                tracing::debug!(peer = ?peer, %error, "federation connection failed");
                if let Some(peer) = peer {
                    self.join_failed(peer, &error);
                }
            }
        }
    }

    /// Schedules a re-advertisement soon; changes in a burst share one.
    fn capacity_changed(&mut self) {
        self.fed.capacity_changed(now_ms());
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Sites { reply } => {
                let _ = reply.send(self.report());
            }
            Command::CreateCluster { id, request, reply } => {
                let created = self.fed.create(&mut self.ledger, now_ms(), id, request);
                let _ = reply.send(created);
            }
            Command::DeleteCluster { id, reply } => {
                let deleted = self.fed.delete(&mut self.ledger, now_ms(), &id);
                let _ = reply.send(deleted);
            }
            Command::ReportNodes { cluster, nodes } => {
                if let Err(e) = self.fed.report_nodes(&mut self.ledger, &cluster, nodes) {
                    tracing::warn!(%cluster, error = %format!("{e:#}"), "reporting node states failed");
                }
            }
            Command::ForgetSite { site, force, reply } => {
                let _ = reply.send(self.forget_site(&site, force));
            }
            Command::Join { addr, reply } => {
                let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                    let _ = reply.send(Err(JoinError::BadAddress(format!(
                        "{addr} does not end in /p2p/<peer id>"
                    ))));
                    return;
                };
                if peer == self.fed.registry().local_id() {
                    let _ = reply.send(Err(JoinError::BadAddress(
                        "that is this site's own address".to_owned(),
                    )));
                    return;
                }
                if let Err(e) = self.p2p.dial(addr.clone()).await {
                    let _ = reply.send(Err(JoinError::BadAddress(e.to_string())));
                    return;
                }
                let pending = PendingJoin {
                    addr,
                    reply,
                    deadline_ms: now_ms() + millis(JOIN_WAIT),
                    connected: false,
                };
                self.joins.entry(peer).or_default().push(pending);
                if self.connected.contains(&peer) {
                    self.join_connected(peer);
                }
            }
        }
    }

    /// `vcfed sites forget`: finds the site by name or peer id in the view
    /// or the remembered peers, then has the core forget it.
    fn forget_site(&mut self, site: &str, force: bool) -> Result<Forgotten, ForgetSiteError> {
        let failed = |e: &dyn std::fmt::Display| ForgetSiteError::Failed(e.to_string());
        let now = now_ms();
        let local = self.fed.registry().local_id();
        let in_view = self
            .fed
            .registry()
            .sites(now)
            .into_iter()
            .find(|view| view.site.to_string() == site || view.advert.site_name == site)
            .map(|view| (view.site, Some(view.advert.site_name.clone())));
        let mut remembered = || -> Result<Option<(PeerId, Option<String>)>, ForgetSiteError> {
            let peers = self
                .ledger
                .with(|ledger| ledger.peers())
                .map_err(|e| failed(&e))?;
            Ok(peers
                .into_iter()
                .find(|p| p.peer_id == site || p.site_name.as_deref() == Some(site))
                .and_then(|p| Some((p.peer_id.parse().ok()?, p.site_name))))
        };
        let (peer, name) = match in_view {
            Some(found) => found,
            None => remembered()?.ok_or_else(|| ForgetSiteError::Unknown(site.to_owned()))?,
        };
        if peer == local {
            return Err(ForgetSiteError::Local(site.to_owned()));
        }
        let shown = name.clone().unwrap_or_else(|| peer.to_string());
        match self.fed.forget_site(&mut self.ledger, now, &peer, force) {
            Ok(ended) => {
                tracing::warn!(site = %shown, %peer, ended = ?ended, "site forgotten");
                self.connected.remove(&peer);
                Ok(Forgotten {
                    site: name,
                    peer_id: peer.to_string(),
                    ended,
                })
            }
            Err(ForgetError::Alive) => Err(ForgetSiteError::Alive(shown)),
            Err(ForgetError::HoldsParts(clusters)) => Err(ForgetSiteError::HoldsParts {
                site: shown,
                clusters,
            }),
            Err(ForgetError::Ledger(e)) => Err(failed(&e)),
        }
    }

    /// Carries out what the core asked, events first (see the core's contract).
    async fn drain(&mut self) {
        self.fed.drain(&mut self.ledger);
        while let Some(event) = self.fed.poll_event() {
            let event = match event {
                FederationEvent::Published { version } => {
                    tracing::debug!(version, "advert version persisted");
                    continue;
                }
                FederationEvent::PersistFailed { version, error } => {
                    tracing::error!(%error, version, "cannot persist the advert version; not publishing it");
                    continue;
                }
                FederationEvent::Registry(event) => event,
            };
            match event {
                // The federation persists versions itself.
                RegistryEvent::PersistVersion(_) => {}
                RegistryEvent::SiteAlive { site, name } => {
                    tracing::info!(site = %name, peer = %site, "site alive")
                }
                RegistryEvent::SiteUpdated { site, version } => {
                    tracing::debug!(peer = %site, version, "site advert updated");
                }
                RegistryEvent::SiteSuspect { site } => tracing::info!(peer = %site, "site suspect"),
                RegistryEvent::SiteGone { site } => tracing::warn!(peer = %site, "site gone"),
                RegistryEvent::SiteAddrs { site, addrs } => {
                    let name = self.fed.registry().site_name(&site);
                    let parsed: Vec<Multiaddr> =
                        addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    if !parsed.is_empty() && self.make_room_for_target(&site) {
                        let target = self
                            .dial_targets
                            .entry(site)
                            .or_insert_with(|| DialTarget::new(Vec::new()));
                        target.addrs = parsed;
                    }
                    self.remember_peer(site, name, addrs);
                }
            }
        }
        while let Some(outgoing) = self.fed.poll_transmit() {
            self.send(match outgoing {
                CoreOutgoing::Publish(data) => Outgoing::Publish(data),
                CoreOutgoing::Request { to, data, .. } => Outgoing::Request { to, data },
            });
        }
    }

    /// Whether `site` is or can become a dial target: beyond
    /// [`DIALED_PEERS_MAX`], a target whose site is gone makes room.
    fn make_room_for_target(&mut self, site: &PeerId) -> bool {
        if self.dial_targets.contains_key(site) || self.dial_targets.len() < DIALED_PEERS_MAX {
            return true;
        }
        let gone = self
            .dial_targets
            .keys()
            .find(|peer| {
                self.fed.registry().site_state(peer) == Some(SiteState::Gone)
                    && !self.connected.contains(*peer)
            })
            .copied();
        match gone {
            Some(peer) => {
                self.dial_targets.remove(&peer);
                true
            }
            None => false,
        }
    }

    fn send(&mut self, outgoing: Outgoing) {
        if self.outbox.try_send(outgoing).is_err() {
            self.outbox_dropped += 1;
        }
    }

    /// Dials the targets that are not connected and whose backoff elapsed.
    fn redial(&mut self) {
        let now = tokio::time::Instant::now();
        let mut dials = Vec::new();
        for (peer, target) in &mut self.dial_targets {
            if self.connected.contains(peer) || target.next_attempt > now || target.addrs.is_empty()
            {
                continue;
            }
            let addr = &target.addrs[target.next_addr % target.addrs.len()];
            dials.push(addr.clone().with(Protocol::P2p(*peer)));
            target.next_addr = target.next_addr.wrapping_add(1);
            target.next_attempt = now + target.backoff;
            target.backoff = (target.backoff * 2).min(BACKOFF_MAX);
        }
        for addr in dials {
            self.send(Outgoing::Dial(addr));
        }
    }

    fn load_known_peers(&mut self) {
        let peers = match self.ledger.blocking(|ledger| ledger.peers()) {
            Ok(peers) => peers,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read known peers");
                return;
            }
        };
        for peer in peers.into_iter().take(DIALED_PEERS_MAX) {
            let Ok(id) = peer.peer_id.parse::<PeerId>() else {
                continue;
            };
            let addrs: Vec<Multiaddr> = peer.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            if !addrs.is_empty() {
                self.dial_targets
                    .entry(id)
                    .or_insert_with(|| DialTarget::new(addrs));
            }
        }
        if !self.dial_targets.is_empty() {
            tracing::info!(peers = self.dial_targets.len(), "dialing known peers");
        }
    }

    fn remember_peer(&mut self, peer: PeerId, name: Option<String>, addrs: Vec<String>) {
        if addrs.is_empty() && name.is_none() {
            return;
        }
        // Identify repeats itself: write (and fsync) only what is new.
        let entry = (name.clone(), addrs.clone());
        if self.remembered.get(&peer) == Some(&entry) {
            return;
        }
        if self.remembered.len() >= REMEMBERED_MAX {
            self.remembered.clear();
        }
        self.remembered.insert(peer, entry);
        let id = peer.to_string();
        let result = self
            .ledger
            .blocking(move |ledger| ledger.upsert_peer(&id, name.as_deref(), &addrs, now_ms()));
        if let Err(e) = result {
            tracing::warn!(error = %format!("{e:#}"), %peer, "cannot remember a peer");
        }
    }

    /// The addresses this site advertises: loopback addresses only help on
    /// this host, so they go out only if there is nothing else.
    fn advertised_addrs(&self) -> Vec<String> {
        let routable: Vec<&Multiaddr> = self
            .listen_addrs
            .iter()
            .filter(|a| !is_loopback(a))
            .collect();
        let chosen: Vec<&Multiaddr> = if routable.is_empty() {
            self.listen_addrs.iter().collect()
        } else {
            routable
        };
        chosen
            .into_iter()
            .take(vcfed_registry::advert::ADVERT_ADDRS_MAX)
            .map(ToString::to_string)
            .collect()
    }

    /// A peer a join dials answered: remember the address it was reached
    /// at, and wait a little for its advert to name its site.
    fn join_connected(&mut self, peer: PeerId) {
        let Some(pending) = self.joins.get_mut(&peer) else {
            return;
        };
        let deadline_ms = now_ms() + millis(JOIN_ADVERT_WAIT);
        let mut addrs = Vec::new();
        for join in pending.iter_mut().filter(|join| !join.connected) {
            join.connected = true;
            join.deadline_ms = deadline_ms;
            addrs.push(strip_p2p(&join.addr));
        }
        if let Some(addr) = addrs.first() {
            self.dial_targets
                .entry(peer)
                .or_insert_with(|| DialTarget::new(Vec::new()))
                .addrs = vec![addr.clone()];
            self.remember_peer(peer, None, vec![addr.to_string()]);
        }
        self.settle_joins();
    }

    /// A dial of a peer a join waits for failed: the joins that have not
    /// connected fail with the reason.
    fn join_failed(&mut self, peer: PeerId, error: &str) {
        let Some(pending) = self.joins.remove(&peer) else {
            return;
        };
        let (connected, failed): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|join| join.connected);
        for join in failed {
            let _ = join.reply.send(Err(join_refusal(&join.addr, peer, error)));
        }
        if !connected.is_empty() {
            self.joins.insert(peer, connected);
        }
    }

    /// Answers the joins whose outcome is known: connected and named by
    /// their advert, connected and out of time (named later), or out of
    /// time without an answer.
    fn settle_joins(&mut self) {
        if self.joins.is_empty() {
            return;
        }
        let now = now_ms();
        let names: BTreeMap<PeerId, String> = self
            .fed
            .registry()
            .sites(now)
            .into_iter()
            .filter(|view| !view.local)
            .map(|view| (view.site, view.advert.site_name.clone()))
            .collect();
        let joins = std::mem::take(&mut self.joins);
        for (peer, pending) in joins {
            for join in pending {
                let name = names.get(&peer);
                if join.connected && (name.is_some() || now >= join.deadline_ms) {
                    let _ = join.reply.send(Ok(Joined {
                        peer_id: peer.to_string(),
                        site: name.cloned(),
                    }));
                } else if !join.connected && now >= join.deadline_ms {
                    let _ = join.reply.send(Err(JoinError::Unreachable(format!(
                        "no answer from {} within {} s: is the address right and the site's federation port open?",
                        join.addr,
                        JOIN_WAIT.as_secs()
                    ))));
                } else {
                    self.joins.entry(peer).or_default().push(join);
                }
            }
        }
    }

    fn report(&self) -> SitesReport {
        let now = now_ms();
        let sites = self
            .fed
            .registry()
            .sites(now)
            .into_iter()
            .map(|view| SiteSummary {
                name: view.advert.site_name.clone(),
                peer_id: view.site.to_string(),
                local: view.local,
                state: view.state,
                free_now: view.free_now,
                total_nodes: view.advert.capacity.total_nodes,
                rtt_ms: view.rtt.map(|rtt| rtt.as_secs_f64() * 1000.0),
                advert_age_ms: view.advert_age_ms,
                version: view.advert.version,
                addrs: view.advert.addrs.clone(),
            })
            .collect();
        SitesReport {
            sites,
            connected_peers: self.connected.len(),
            stats: self.fed.registry().stats(),
            outbox_dropped: self.outbox_dropped,
            transport: self.p2p.stats(),
        }
    }
}

/// What a failed connection to a member means, for the person who joins.
fn join_refusal(addr: &Multiaddr, peer: PeerId, error: &str) -> JoinError {
    // The transport's own hint; the answer below says it better.
    let error = error
        .trim_end_matches(" (check that both sites use the same pre-shared key)")
        .trim();
    let lower = error.to_lowercase();
    let at = strip_p2p(addr);
    if let Some(rest) = error.split("Unexpected peer ID ").nth(1) {
        let obtained = rest.split_whitespace().next().unwrap_or("another peer");
        JoinError::Refused(format!(
            "the site at {at} is {obtained}, not {peer}; copy the address again from `vcfed status` there"
        ))
    } else if lower.contains("peer id") || lower.contains("did not match") {
        JoinError::Refused(format!("the site at {at} is not {peer} ({error})"))
    } else if lower.contains("connection refused") {
        JoinError::Unreachable(format!(
            "{at}: connection refused (is the agent running, and is that its federation port?)"
        ))
    } else if [
        "handshake",
        "negotiat",
        "noise",
        "pre-shared",
        "timeout",
        "timed out",
    ]
    .iter()
    .any(|word| lower.contains(word))
    {
        JoinError::Refused(format!(
            "{at} broke off the handshake: a private federation refuses sites without its pre-shared key, so check that both use the same `federation.psk_file` ({error})"
        ))
    } else {
        JoinError::Refused(format!("{at}: {error}"))
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|protocol| match protocol {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// The address without a trailing /p2p/<peer id>.
fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|protocol| !matches!(protocol, Protocol::P2p(_)))
        .collect()
}
