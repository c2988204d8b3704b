//! `vcfed gateway`: the overlay data plane alone, with its peers and
//! segments given in a file (see [`crate::gateway_config`]), for debugging
//! and benchmarks; and the key helpers scripts need to write such files.

// Output goes through `outln!`, which survives a closed stdout; the lint
// `print_stdout` stays on to catch a stray `println!`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::{Args, Subcommand};

use crate::identity;
use crate::usage::UsageError;

/// Arguments of `vcfed gateway`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GatewayArgs {
    /// The gateway's config file: key file, listen address, peers, segments.
    /// Runs the gateway until SIGTERM or Ctrl-C (needs root or
    /// CAP_NET_ADMIN).
    /// (The global `-c/--config` given on the command line, or
    /// VCFED_GATEWAY_CONFIG.)
    #[arg(skip)]
    pub config: Option<PathBuf>,
    /// Key helpers.
    #[command(subcommand)]
    pub command: Option<GatewayCommand>,
}

/// `vcfed gateway ...`
#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Write a new WireGuard private key (base64, mode 0600) and print its
    /// public key.
    Genkey {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of a private key file.
    Pubkey {
        /// The private key file.
        #[arg(long)]
        key: PathBuf,
    },
}

/// Runs `vcfed gateway`.
pub(crate) async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    match (args.command, args.config) {
        (Some(GatewayCommand::Genkey { out, force }), _) => genkey(&out, force),
        (Some(GatewayCommand::Pubkey { key }), _) => {
            let private = crate::gateway_config::read_private_key(&key)
                .map_err(|problem| UsageError(format!("{}: {problem}", key.display())))?;
            outln!("{}", public_key_base64(private));
            Ok(())
        }
        (None, Some(config)) => run_gateway(&config).await,
        (None, None) => Err(UsageError(
            "no config file: pass --config FILE or set VCFED_GATEWAY_CONFIG".to_owned(),
        )
        .into()),
    }
}

/// The base64 public key of a private key.
pub(crate) fn public_key_base64(private: [u8; 32]) -> String {
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(private));
    STANDARD.encode(public.as_bytes())
}

async fn run_gateway(path: &Path) -> anyhow::Result<()> {
    let config = crate::gateway_config::load(path)?;
    let path = path.to_owned();
    let done = spawn_gateway("it needs root or CAP_NET_ADMIN", move || async move {
        let (updates, watched) = tokio::sync::watch::channel(config);
        let stop = crate::agent::termination_signal();
        // Installed now: SIGHUP's default action would end the process.
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        tokio::spawn(reload_on_sighup(path, updates, hangups));
        vcfed_overlay::linux::run_reloadable(watched, stop).await
    })?;
    done.await
        .context("the gateway thread ended without an answer")?
}

/// Runs a gateway loop (`run`, built inside the runtime: signal handlers
/// need its reactor) on a thread of its own with a single-threaded runtime,
/// for `vcfed gateway` and the agent alike. The loop runs where the I/O
/// driver wakes up, so no readiness event is handed between threads (with
/// `block_on` on the CLI's multi-threaded runtime that hand-off, two
/// context switches per packet, was most of the CPU time). The receiver
/// gets the loop's end; a permission error says what the gateway `needs`.
pub(crate) fn spawn_gateway<F, Fut>(
    needs: &'static str,
    run: F,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<anyhow::Result<()>>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<
            Output = Result<vcfed_overlay::linux::ShellStats, vcfed_overlay::linux::ShellError>,
        >,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vcfed-gateway".to_owned())
        .spawn(move || {
            let ended = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the gateway's runtime")
                .and_then(|runtime| {
                    let stats = runtime.block_on(run()).map_err(|e| {
                        let what = if e.is_permission_denied() {
                            format!("running the gateway ({needs})")
                        } else {
                            "running the gateway".to_owned()
                        };
                        anyhow::Error::new(e).context(what)
                    })?;
                    tracing::debug!(?stats, "gateway counters");
                    Ok(())
                });
            let _ = done_tx.send(ended);
        })
        .context("starting the gateway thread")?;
    Ok(done_rx)
}

/// Reads the config file again on every SIGHUP and hands it to the running
/// gateway (segments and peers change without a restart); a file that no
/// longer loads is logged and the running configuration kept.
async fn reload_on_sighup(
    path: PathBuf,
    updates: tokio::sync::watch::Sender<vcfed_overlay::linux::GatewayConfig>,
    hangups: std::io::Result<tokio::signal::unix::Signal>,
) {
    let Ok(mut hangups) = hangups else {
        tracing::warn!("cannot handle SIGHUP; restart the gateway to change its configuration");
        return;
    };
    while hangups.recv().await.is_some() {
        match crate::gateway_config::load(&path) {
            Ok(config) => {
                tracing::info!(file = %path.display(), "SIGHUP: configuration read again");
                updates.send_replace(config);
            }
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "SIGHUP: the configuration does not load; keeping the running one"
            ),
        }
    }
}

fn genkey(out: &Path, force: bool) -> anyhow::Result<()> {
    crate::identity::refuse_overwrite(out, force)?;
    let mut private = crate::identity::random_bytes::<32>()?;
    // Clamped as WireGuard stores private keys; x25519 clamps anyway.
    private[0] &= 248;
    private[31] &= 127;
    private[31] |= 64;
    identity::write_file(
        out,
        format!("{}\n", STANDARD.encode(private)).as_bytes(),
        0o600,
    )
    .with_context(|| format!("writing {}", out.display()))?;
    outln!("{}", public_key_base64(private));
    Ok(())
}
