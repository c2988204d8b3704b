//! The site agent: `vcfed run`.
//!
//! Start-up order matters: everything that can be wrong with the site's
//! config, keys or ledger is found before the API listens, so a broken site
//! fails at once with a clear message instead of half-starting.
//!
//! The data dir is locked before the ledger is opened: one site is one agent,
//! and a second agent on the same data dir (a copied config with other ports)
//! would share the ledger and tell the federation another address for the
//! same site. The lock is an advisory `flock` on [`LOCK_FILE_NAME`], held
//! until the agent's task ends; the kernel drops it when its holder dies, so
//! a restart after a crash or SIGKILL needs no clean-up.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vcfed_storage::{Inventory, InventoryHost, Ledger};

use crate::api::{self, ApiState, CapacityTotals, SiteInfo};
use crate::config::{Config, InventorySource};
use crate::identity::{self, KeyPaths};
use crate::ledger::SharedLedger;
use crate::time::now_ms;

/// The lock file in the data dir; it holds the pid of the agent that has it.
pub const LOCK_FILE_NAME: &str = "agent.lock";

/// How often expired holds are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A started agent: its API address and the handle to wait for its end.
pub struct RunningAgent {
    /// Where the API listens (the real port when the config asked for 0).
    pub api_addr: SocketAddr,
    /// Finishes when the agent has shut down.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Loads everything the agent needs and starts it; it runs until `shutdown`
/// resolves. Errors here are start-up errors: nothing is listening yet.
pub async fn start(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningAgent> {
    check_data_dir(&config.site.data_dir)?;
    let keys = identity::load(&key_paths(&config))
        .context("loading the site's keys (did you run `vcfed init`?)")?;
    let data_dir_lock = lock_data_dir(&config.site.data_dir)?;
    let inventory = ledger_inventory(&config);
    let ledger_path = config.ledger_path();
    let mut ledger = Ledger::open(&ledger_path)
        .with_context(|| format!("opening the ledger {}", ledger_path.display()))?;
    let now = now_ms();
    ledger
        .set_inventory(&inventory, now)
        .context("writing the inventory to the ledger")?;
    let expired = ledger
        .sweep_expired(now)
        .context("sweeping expired holds")?;
    if !expired.is_empty() {
        tracing::info!(count = expired.len(), "expired holds released at start");
    }
    let ledger = SharedLedger::new(ledger);

    let site = SiteInfo {
        name: config.site.name.clone(),
        peer_id: keys.peer_id().to_string(),
        tunnel_public_key: keys.tunnel_public_key(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        node: inventory.node,
        capacity: totals(&inventory),
        free_now: 0,
        vlans: config.clusters.vlans.to_string(),
    };
    let listener =
        api::bind(config.api.listen, &api::ApiLimits::of(&config.api)).with_context(|| {
            format!(
                "binding the API to {} (api.listen in {})",
                config.api.listen,
                config.path.display()
            )
        })?;
    let api_addr = listener
        .local_addr()
        .context("reading the API's local address")?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (federation, federation_task) =
        crate::federation::start(&config, &keys, ledger.clone(), stop_rx.clone())
            .await
            .context("starting the federation")?;
    let runner = crate::runner::start(
        &config,
        keys.peer_id().to_string(),
        keys.tunnel.to_bytes(),
        ledger.clone(),
        Some(federation.clone()),
        stop_rx.clone(),
    )
    .await
    .context("starting the cluster runner")?;
    let mut state = ApiState::new(
        site.clone(),
        ledger.clone(),
        &keys.api_token,
        federation.clone(),
        api::ApiLimits::of(&config.api),
    );
    state = state
        .with_network(runner.board.clone())
        .with_runner(runner.counters.clone());
    let state = Arc::new(state);
    let sweeper = tokio::spawn(sweep_loop(ledger.clone(), federation, stop_rx.clone()));
    let mut api_stop = stop_rx;
    let task = tokio::spawn(async move {
        // Held until the agent has stopped, the ledger included.
        let _data_dir_lock = data_dir_lock;
        tracing::info!(
            site = %site.name,
            peer_id = %site.peer_id,
            api = %api_addr,
            nodes = site.capacity.nodes,
            "agent ready"
        );
        // Under systemd (Type=notify): started, and what it serves.
        notify_service(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("site {}, API on {api_addr}", site.name)),
        ]);
        let stop_tx = Arc::new(stop_tx);
        let stopper = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            notify_service(&[sd_notify::NotifyState::Stopping]);
            let _ = stopper.send(true);
        });
        // Likewise if the runner or the gateway fails: the site's clusters
        // would be neither followed nor reachable.
        let (runner_task, gateway) = (runner.task, runner.gateway);
        let runner_stop = stop_tx.clone();
        let runner = tokio::spawn(async move {
            let ended = runner_task.await;
            let asked = *runner_stop.borrow();
            let _ = runner_stop.send(true);
            match ended {
                Ok(()) if asked => Ok(()),
                Ok(()) => Err(anyhow::anyhow!("the cluster runner stopped unexpectedly")),
                Err(e) => Err(anyhow::anyhow!("the cluster runner failed: {e}")),
            }
        });
        let gateway_stop = stop_tx.clone();
        let gateway = tokio::spawn(async move {
            let Some(done) = gateway else {
                return Ok(());
            };
            let ended = done
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the gateway thread died")));
            let asked = *gateway_stop.borrow();
            let _ = gateway_stop.send(true);
            match ended {
                Err(e) => Err(e),
                Ok(()) if asked => Ok(()),
                Ok(()) => Err(anyhow::anyhow!("the gateway stopped unexpectedly")),
            }
        });
        // The federation ends only when told to; if it ends on its own (a
        // panic, a dead transport), the agent stops too rather than serving
        // an API for a site the federation no longer sees.
        let federation_stop = stop_tx.subscribe();
        let federation = tokio::spawn(async move {
            let ended = federation_task.await;
            if *federation_stop.borrow() {
                return Ok(());
            }
            let _ = stop_tx.send(true);
            match ended {
                Ok(()) => Err(anyhow::anyhow!("the federation task stopped unexpectedly")),
                Err(e) => Err(anyhow::anyhow!("the federation task failed: {e}")),
            }
        });
        let served = api::serve(listener, state, async move {
            let _ = api_stop.wait_for(|stop| *stop).await;
        })
        .await;
        let _ = sweeper.await;
        runner.await.context("runner monitor")??;
        gateway.await.context("gateway monitor")??;
        let federation = federation.await.context("federation monitor")?;
        served.context("serving the API")?;
        federation?;
        tracing::info!("agent stopped");
        Ok(())
    });
    Ok(RunningAgent { api_addr, task })
}

/// Fails unless this user can list `data_dir`: every later step (keys,
/// lock, ledger) would fail on it with a message about one file.
fn check_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(data_dir) {
        Ok(_) => Ok(()),
        Err(e) => Err(anyhow::anyhow!(data_dir_problem(data_dir, &e))),
    }
}

/// What an I/O error `error` on the data dir means for the user.
fn data_dir_problem(data_dir: &Path, error: &std::io::Error) -> String {
    let dir = data_dir.display();
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot read the data dir {dir}: permission denied; run the agent as the user \
             that owns it (`vcfed init` made it mode 0700 for its user)"
        ),
        std::io::ErrorKind::NotFound => format!(
            "the data dir {dir} does not exist; `vcfed init --data-dir {dir}` creates a site there"
        ),
        _ => format!("cannot read the data dir {dir}: {error}"),
    }
}

/// Takes the exclusive lock on `data_dir` and writes our pid into the lock
/// file; the lock lasts as long as the returned file is open.
///
/// Another live agent holding it is a usage error (exit code 2): nothing has
/// been started, and the fix is to stop that agent or give this one its own
/// site.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<File> {
    let path = data_dir.join(LOCK_FILE_NAME);
    // Not truncated on open: until we hold the lock, the pid in it is the
    // holder's, which the refusal names.
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            // The holder may not have written its pid yet; then none is named.
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!(" (pid {pid})"),
                Err(_) => String::new(),
            };
            return Err(crate::usage::UsageError(format!(
                "the data dir {} is in use by another vcfed agent{holder}; one agent per site",
                data_dir.display()
            ))
            .into());
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    let write_pid = |file: &mut File| -> std::io::Result<()> {
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_data()
    };
    write_pid(&mut file).with_context(|| format!("writing our pid to {}", path.display()))?;
    Ok(file)
}

/// The key files of a configured site.
pub fn key_paths(config: &Config) -> KeyPaths {
    KeyPaths::new(&config.site.data_dir, &config.api.token_file)
}

/// The inventory as the ledger stores it.
pub fn ledger_inventory(config: &Config) -> Inventory {
    let node = config.inventory.node;
    let hosts = match &config.inventory.source {
        InventorySource::Nodes(nodes) => vec![InventoryHost {
            name: "nodes".to_owned(),
            cores: node.cores.saturating_mul(*nodes),
            memory_mib: node.memory_mib.saturating_mul(u64::from(*nodes)),
            disk_gib: node.disk_gib.saturating_mul(u64::from(*nodes)),
            slots: *nodes,
        }],
        InventorySource::Hosts(hosts) => hosts
            .iter()
            .map(|host| InventoryHost {
                name: host.name.clone(),
                cores: host.cores,
                memory_mib: host.memory_mib,
                disk_gib: host.disk_gib,
                slots: host.slots(&node),
            })
            .collect(),
    };
    Inventory { node, hosts }
}

fn totals(inventory: &Inventory) -> CapacityTotals {
    CapacityTotals {
        nodes: inventory.slots(),
        hosts: u32::try_from(inventory.hosts.len()).unwrap_or(u32::MAX),
        cores: inventory.hosts.iter().map(|h| u64::from(h.cores)).sum(),
        memory_mib: inventory.hosts.iter().map(|h| h.memory_mib).sum(),
        disk_gib: inventory.hosts.iter().map(|h| h.disk_gib).sum(),
    }
}

/// Marks holds whose lease ran out as expired, every [`SWEEP_INTERVAL`].
async fn sweep_loop(
    ledger: SharedLedger,
    federation: crate::federation::FederationHandle,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        match ledger.run(|ledger| ledger.sweep_expired(now_ms())).await {
            Ok(expired) => {
                if !expired.is_empty() {
                    federation.capacity_changed();
                }
                for reservation in expired {
                    tracing::info!(key = %reservation.key, cluster = %reservation.cluster_id, "hold expired");
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "sweeping expired holds failed"),
        }
    }
}

/// Installs the SIGHUP handler of `vcfed run` and returns the loop that
/// serves it: on every SIGHUP the config file is read again and compared with
/// the `running` one.
///
/// Nothing in the file can be applied to a running agent (the log level comes
/// from `RUST_LOG`, not the file), so a reload says which fields changed and
/// need a restart, or that nothing did; a file that no longer loads is
/// reported with its error. The agent keeps running on `running` in every
/// case: an operator's `kill -HUP` (or a closed terminal) must never stop a
/// site. Like [`termination_signal`], the handler is installed at once, so
/// call it inside a tokio runtime and before the agent starts.
pub fn reload_on_hangup(
    running: Config,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    Ok(async move {
        while hangups.recv().await.is_some() {
            let file = running.path.display();
            tracing::info!(signal = "SIGHUP", %file, "signal received; reloading the configuration");
            notify_service(&[sd_notify::NotifyState::Reloading]);
            match Config::load(&running.path) {
                Err(e) => tracing::error!(
                    error = %format!("{e:#}"),
                    "the configuration does not load; the agent keeps running with the one it started with"
                ),
                Ok(reloaded) => {
                    let changed = running.changed_fields(&reloaded);
                    if changed.is_empty() {
                        tracing::info!("configuration unchanged");
                    } else {
                        tracing::warn!(
                            fields = %changed.join(", "),
                            "config changed: these fields need a restart to take effect"
                        );
                    }
                }
            }
            // Running, with the configuration it started with either way.
            notify_service(&[sd_notify::NotifyState::Ready]);
        }
    })
}

/// Tells the service manager (systemd, `Type=notify`) about the agent's
/// state, if one is listening (`NOTIFY_SOCKET`); a no-op otherwise.
fn notify_service(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
///
/// The handlers are installed when this is called, not when the future is
/// first polled, so a signal that arrives in between is not lost (nor
/// handled by the default action, which would kill the process). Call it
/// inside a tokio runtime.
pub fn termination_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::warn!("cannot install signal handlers; stop the agent with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Root reads any directory, so a test run as root cannot make one
    // unreadable: the message is checked from the error itself.
    #[test]
    fn an_unreadable_data_dir_says_permission_denied() {
        let error = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let message = data_dir_problem(Path::new("/var/lib/vcfed"), &error);
        assert!(
            message.starts_with("cannot read the data dir /var/lib/vcfed: permission denied"),
            "{message}"
        );
        let error = std::io::Error::from(std::io::ErrorKind::NotFound);
        let message = data_dir_problem(Path::new("/var/lib/vcfed"), &error);
        assert!(message.contains("does not exist"), "{message}");
    }
}
