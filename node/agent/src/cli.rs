//! The `vcfed` command line: argument parsing, exit codes, output.
//!
//! Exit codes: 0 on success, 1 when an operation fails, 2 for bad usage or a
//! bad config (nothing was written or started then).

// Errors go to stderr for the user; output goes through `outln!`, which
// survives a closed stdout.
#![allow(clippy::print_stderr)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use multiaddr::Multiaddr;
use vcfed_node_core::words::count;
use vcfed_storage::{NodeShape, Reservation};

use crate::api_types::{CapacityReport, HoldBody, InstantArg, JoinBody, OwnerBody, SiteInfo};
use crate::client::{ApiClient, segment};
use crate::config::{self, Config, ConfigError, InitParams, VlanRange};
use crate::federation::SitesReport;
use crate::identity::{self, IdentityError};
use crate::out::StdoutFailed;
use crate::time::{format_instant, now_ms, parse_duration_ms, parse_instant};
// Defined in a leaf module; `cli::UsageError` still names it.
pub use crate::usage::UsageError;

/// Federated virtual clusters: one agent per site, pooling sites' machines
/// into virtual clusters.
#[derive(Debug, Parser)]
#[command(name = "vcfed", version, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr. RUST_LOG sets the level (default: info for
    /// `run`, warn otherwise).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "VCFED_LOG_FORMAT", global = true)]
    pub log_format: LogFormat,
    /// The site's config file (written by `vcfed init`), before or after
    /// the subcommand; for `vcfed init`, where to write it [default:
    /// DATA_DIR/vcfed.toml]; for `vcfed gateway`, the gateway's config
    /// (or VCFED_GATEWAY_CONFIG).
    #[arg(
        long,
        short = 'c',
        env = "VCFED_CONFIG",
        global = true,
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a site: write a commented config and generate the site's keys
    /// and API token.
    Init(InitArgs),
    /// Run the site agent until SIGTERM or Ctrl-C.
    Run(ConfigArg),
    /// Show the site: name, peer id, capacity.
    Status(StatusArgs),
    /// Show free nodes over a time window, as steps.
    Capacity(CapacityArgs),
    /// Hold, commit, release and list local reservations.
    #[command(subcommand)]
    Reservation(ReservationCommand),
    /// Create, list, show and delete virtual clusters.
    #[command(subcommand)]
    Cluster(crate::cluster_cli::ClusterCommand),
    /// List the federation's sites as this site sees them.
    Sites(SitesArgs),
    /// Show the site's event log (all of it, or one cluster's), and with
    /// --follow as it grows.
    Events(crate::events_cli::EventsArgs),
    /// Connect the running agent to a federation member.
    Join(JoinArgs),
    /// Federation pre-shared keys (private federations).
    #[command(subcommand)]
    Psk(PskCommand),
    /// Run a demo on this machine: as root, a federation of three sites in
    /// network namespaces builds one cluster from all their nodes; without
    /// root (or with --local), a tour of one site.
    Demo(crate::demo::DemoArgs),
    /// Run the overlay data plane alone (`--config FILE`), for debugging and
    /// benchmarks; `genkey` and `pubkey` make its WireGuard keys.
    Gateway(crate::gateway::GatewayArgs),
    /// Simulate a whole federation on a virtual clock under faults and check
    /// its invariants (deterministic: a seed replays a run).
    Simnet(crate::simnet_cli::SimnetArgs),
    /// Print a shell completion script: `vcfed completions bash >
    /// /etc/bash_completion.d/vcfed` (or zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `vcfed man > /usr/share/man/man1/vcfed.1`.
    Man,
}

/// Where the site's config is: given to a command in code, or else the
/// global `-c/--config` (or VCFED_CONFIG) of the command line.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArg {
    /// The site's config file.
    #[arg(skip)]
    pub config: Option<PathBuf>,
}

/// The global `-c/--config` (or VCFED_CONFIG), set once by [`main`].
static CONFIG_FILE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// Arguments of `vcfed init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Site name: lowercase letters, digits and '-', at most 63.
    #[arg(long, env = "VCFED_SITE")]
    pub site: String,
    /// Directory for the site's keys and ledger (created, mode 0700).
    #[arg(long, env = "VCFED_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Where to write the config: the global `-c/--config` given on the
    /// command line [default: DATA_DIR/vcfed.toml].
    #[arg(skip)]
    pub config: Option<PathBuf>,
    /// Replace an existing config and keys (the site gets a new identity).
    #[arg(long)]
    pub force: bool,
    /// Address of the local HTTP API.
    #[arg(long, default_value = config::DEFAULT_API_LISTEN)]
    pub api_listen: SocketAddr,
    /// Federation listen address (repeatable).
    #[arg(long = "listen", default_value = config::DEFAULT_FEDERATION_LISTEN)]
    pub listen: Vec<Multiaddr>,
    /// UDP address of the gateway's data plane.
    #[arg(long, default_value = config::DEFAULT_GATEWAY_LISTEN)]
    pub gateway_listen: SocketAddr,
    /// Federation member to join through, ending in /p2p/<peer id> (repeatable).
    #[arg(long)]
    pub bootstrap: Vec<Multiaddr>,
    /// Node slots of the site (the `nodes = N` shorthand of the inventory).
    #[arg(long, default_value_t = 4)]
    pub nodes: u32,
    /// Cores of one node slot.
    #[arg(long, default_value_t = 2)]
    pub node_cores: u32,
    /// Memory of one node slot, MiB.
    #[arg(long, default_value_t = 4096)]
    pub node_memory_mib: u64,
    /// Disk of one node slot, GiB.
    #[arg(long, default_value_t = 20)]
    pub node_disk_gib: u64,
    /// VLAN ids this site may give to clusters.
    #[arg(long, default_value = "100-199")]
    pub vlans: VlanRange,
}

/// Arguments of `vcfed status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `vcfed sites`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SitesArgs {
    #[command(subcommand)]
    command: Option<SitesCommand>,
    #[command(flatten)]
    config: ConfigArg,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// `vcfed sites ...`
#[derive(Debug, Subcommand)]
pub enum SitesCommand {
    /// Forget a site that vanished: drop it from this site's view and its
    /// remembered addresses. Refused while the site is alive, or while it
    /// holds nodes of live clusters this site masters, unless --force,
    /// which ends those parts first (each cluster heals by its policy).
    Forget(ForgetArgs),
}

/// Arguments of `vcfed sites forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The site's name or peer id.
    site: String,
    /// Also end its parts of live clusters mastered here.
    #[arg(long)]
    force: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `vcfed join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// A member's federation address, ending in /p2p/<peer id>
    /// (`vcfed status` at that site prints it).
    addr: Multiaddr,
}

/// `vcfed psk ...`
#[derive(Debug, Subcommand)]
pub enum PskCommand {
    /// Write a new random pre-shared key (mode 0600). Give the same file to
    /// every site of the federation as `federation.psk_file`.
    Generate {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

/// Arguments of `vcfed capacity`.
#[derive(Debug, Args)]
pub struct CapacityArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Window start: `now`, `+2h`, RFC 3339 or unix ms.
    #[arg(long, default_value = "now")]
    from: String,
    /// Window end [default: 7 days after --from].
    #[arg(long)]
    to: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// `vcfed reservation ...`
#[derive(Debug, Subcommand)]
pub enum ReservationCommand {
    /// Hold nodes for a window; the hold expires after its lease unless committed.
    Hold(HoldArgs),
    /// Commit a hold.
    Commit(KeyArgs),
    /// Release a hold or a commitment.
    Release(KeyArgs),
    /// List reservations that take capacity (or all with --all).
    List(ListArgs),
}

/// Arguments of `vcfed reservation hold`.
#[derive(Debug, Args)]
pub struct HoldArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Number of nodes.
    #[arg(long)]
    nodes: u32,
    /// Window start: `now`, `+2h`, RFC 3339 or unix ms.
    #[arg(long, default_value = "now")]
    start: String,
    /// Window length, e.g. 2h.
    #[arg(long)]
    duration: String,
    /// Lease of the hold before it must be committed, e.g. 60s.
    #[arg(long, default_value = "60s")]
    lease: String,
    /// Idempotency key [default: a fresh one].
    #[arg(long)]
    key: Option<String>,
    /// Cluster the nodes are for [default: "local"].
    #[arg(long, default_value = "local")]
    cluster: String,
    /// Commit at once.
    #[arg(long)]
    commit: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// A reservation named by its key.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The reservation's key.
    key: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `vcfed reservation list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Include released and expired reservations.
    #[arg(long)]
    all: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Entry point of the binary: parses arguments, sets up logging and the
/// runtime, runs the command and maps errors to exit codes.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let json = wants_json(&matches);
    let mut cli = cli;
    let typed = matches!(
        matches.value_source("config"),
        Some(clap::parser::ValueSource::CommandLine)
    );
    let typed = typed.then(|| cli.config.clone()).flatten();
    // `init` writes where it is told, never where VCFED_CONFIG points; the
    // gateway has a config of its own, and its own variable.
    match &mut cli.command {
        Command::Init(args) => args.config = typed,
        Command::Gateway(args) => {
            args.config =
                typed.or_else(|| std::env::var_os("VCFED_GATEWAY_CONFIG").map(PathBuf::from));
        }
        _ => {}
    }
    let _ = CONFIG_FILE.set(cli.config.clone());
    // The demo prints its own story; its agents' logs would drown it.
    let default_level = if matches!(cli.command, Command::Run(_)) {
        "info"
    } else if matches!(&cli.command, Command::Gateway(args) if args.command.is_none()) {
        // boringtun warns on every handshake retry to a peer that is down, and
        // netlink-packet-route on every kernel attribute newer than itself.
        "info,boringtun=error,netlink_packet_route=error"
    } else {
        "warn"
    };
    init_logging(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(run(cli.command))
    }));
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            if json {
                // For scripts that read `--json` output: the error too.
                crate::outln!("{}", error_json(&e));
            }
            exit_code(&e)
        }
        Err(payload) => match payload.downcast::<StdoutFailed>() {
            // The reader of our output went away (`vcfed sites | head -1`):
            // it has what it wanted, so the command succeeded. Exit 0, as
            // tools that treat EPIPE as the end do, and not the 141 of a
            // death by SIGPIPE, which `set -o pipefail` would count as a
            // failure of the pipeline.
            Ok(failed) if failed.is_closed() => ExitCode::SUCCESS,
            Ok(failed) => {
                eprintln!("error: writing to stdout: {}", failed.0);
                ExitCode::FAILURE
            }
            Err(payload) => std::panic::resume_unwind(payload),
        },
    }
}

/// Runs one command.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init(args) => init(&args).map(|_| ()),
        Command::Run(args) => {
            let config = load_config(&args)?;
            let reloader = tokio::spawn(crate::agent::reload_on_hangup(config.clone())?);
            let agent = crate::agent::start(config, crate::agent::termination_signal()).await?;
            let ended = agent.task.await;
            reloader.abort();
            ended.context("agent task")?
        }
        Command::Status(args) => status(&args).await,
        Command::Capacity(args) => capacity(&args).await,
        Command::Reservation(command) => reservation(command).await,
        Command::Sites(args) => sites(&args).await,
        Command::Events(args) => crate::events_cli::run(&args).await,
        Command::Cluster(command) => crate::cluster_cli::run(command).await,
        Command::Join(args) => {
            let client = client_for(&args.config)?;
            let joined: serde_json::Value = client
                .post(
                    "/v1/peers",
                    &JoinBody {
                        addr: args.addr.to_string(),
                    },
                )
                .await?;
            let peer = joined["joined"].as_str().unwrap_or_default();
            match joined["site"].as_str() {
                Some(site) => outln!(
                    "joined {site} (peer {peer}); `vcfed sites` shows the federation as it is learnt"
                ),
                None => outln!(
                    "joined peer {peer}; its site shows in `vcfed sites` once its advert arrives"
                ),
            }
            Ok(())
        }
        Command::Psk(PskCommand::Generate { out, force }) => generate_psk(&out, force),
        Command::Demo(args) => crate::demo::run(&args).await,
        Command::Gateway(args) => crate::gateway::run(args).await,
        Command::Simnet(args) => crate::simnet_cli::command(&args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vcfed", &mut script);
            crate::outln!("{}", String::from_utf8_lossy(&script).trim_end());
            Ok(())
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            crate::outln!("{}", String::from_utf8_lossy(&page).trim_end());
            Ok(())
        }
    }
}

/// Whether the command line asked for JSON output (`--json` on the
/// command that runs).
fn wants_json(matches: &clap::ArgMatches) -> bool {
    let mut current = matches;
    while let Some((_, sub)) = current.subcommand() {
        current = sub;
    }
    matches!(current.try_get_one::<bool>("json"), Ok(Some(true)))
}

/// An error as `--json` output: its message, the exit code, and for an
/// error the agent answered, its HTTP status and error code.
pub fn error_json(e: &anyhow::Error) -> serde_json::Value {
    let exit = if exit_code(e) == ExitCode::from(2) {
        2
    } else {
        1
    };
    let mut error = serde_json::json!({ "message": format!("{e:#}"), "exit": exit });
    if let Some(crate::client::ClientError::Api { status, code, .. }) = e
        .chain()
        .find_map(|c| c.downcast_ref::<crate::client::ClientError>())
    {
        error["status"] = status.as_u16().into();
        error["code"] = code.as_str().into();
    }
    serde_json::json!({ "error": error })
}

/// Exit code for an error: 2 for anything the user typed wrong (usage,
/// config, or what the agent refused as invalid: a bad request, or a name
/// or key it does not know), 1 otherwise (the agent unreachable, no
/// capacity, a conflict with the site's state, a failure).
pub fn exit_code(e: &anyhow::Error) -> ExitCode {
    let usage = e.chain().any(|cause| {
        cause.is::<ConfigError>()
            || cause.is::<UsageError>()
            || matches!(
                cause.downcast_ref::<IdentityError>(),
                Some(IdentityError::Exists { .. })
            )
            || matches!(
                cause.downcast_ref::<crate::client::ClientError>(),
                Some(crate::client::ClientError::Api { status, .. })
                    if *status == hyper::StatusCode::BAD_REQUEST
                        || *status == hyper::StatusCode::NOT_FOUND
                        || *status == hyper::StatusCode::UNPROCESSABLE_ENTITY
            )
    });
    if usage {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only for a person at a terminal, and never with NO_COLOR set.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Loads the config named by `--config` / `VCFED_CONFIG`.
pub fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    let global = CONFIG_FILE.get().and_then(Option::as_ref);
    let Some(path) = arg.config.as_ref().or(global) else {
        return Err(UsageError(
            "no config file: pass --config FILE or set VCFED_CONFIG (`vcfed init` writes DATA_DIR/vcfed.toml)".to_owned(),
        )
        .into());
    };
    Ok(Config::load(path)?)
}

/// A client for the agent of the config named by `arg`.
pub fn client_for(arg: &ConfigArg) -> anyhow::Result<ApiClient> {
    let config = load_config(arg)?;
    client_from_config(&config)
}

/// A client for the agent configured by `config`.
pub fn client_from_config(config: &Config) -> anyhow::Result<ApiClient> {
    let token = identity::load_token(&config.api.token_file).context("reading the API token")?;
    Ok(ApiClient::new(connect_addr(config.api.listen), token))
}

/// Where to connect to reach an agent listening on `listen`: a wildcard
/// listen address is reached through loopback.
pub fn connect_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// What `vcfed init` created.
#[derive(Debug)]
pub struct InitOutcome {
    /// The config file written.
    pub config_path: PathBuf,
    /// The site's peer id.
    pub peer_id: String,
    /// The site's tunnel public key, base64.
    pub tunnel_public_key: String,
}

/// `vcfed init`: validates everything, then writes keys and config. Writes
/// nothing if anything is wrong or would be overwritten without `--force`.
pub fn init(args: &InitArgs) -> anyhow::Result<InitOutcome> {
    let outcome = write_site(args)?;
    let config = Config::load(&outcome.config_path)?;
    outln!("initialised site {}", config.site.name);
    outln!("  config            {}", outcome.config_path.display());
    outln!("  data dir          {}", config.site.data_dir.display());
    outln!("  peer id           {}", outcome.peer_id);
    outln!("  tunnel public key {}", outcome.tunnel_public_key);
    outln!(
        "  API               http://{} (token in {})",
        config.api.listen,
        config.api.token_file.display()
    );
    outln!();
    outln!(
        "start it with: vcfed run --config {}",
        outcome.config_path.display()
    );
    Ok(outcome)
}

/// What `vcfed init` writes, without printing anything.
pub fn write_site(args: &InitArgs) -> anyhow::Result<InitOutcome> {
    let data_dir = absolute(&args.data_dir)?;
    let config_path = match &args.config {
        Some(path) => absolute(path)?,
        None => data_dir.join(config::CONFIG_FILE_NAME),
    };
    let params = InitParams {
        api_listen: args.api_listen,
        federation_listen: args.listen.clone(),
        gateway_listen: args.gateway_listen,
        nodes: args.nodes,
        node: NodeShape {
            cores: args.node_cores,
            memory_mib: args.node_memory_mib,
            disk_gib: args.node_disk_gib,
        },
        vlans: args.vlans,
        bootstrap: args.bootstrap.clone(),
        ..InitParams::new(args.site.clone(), data_dir.clone())
    };
    let text = config::render_template(&params);
    // The template goes through the same checks as any config, so a bad
    // flag is reported exactly as a bad config line would be.
    let config = Config::parse(&text, &config_path).map_err(|e| flag_error(&e))?;
    if config_path.exists() && !args.force {
        return Err(UsageError(format!(
            "{} already exists; pass --force to replace it (the site gets a new identity)",
            config_path.display()
        ))
        .into());
    }
    let paths = crate::agent::key_paths(&config);
    if let Some(existing) = paths.existing().first()
        && !args.force
    {
        return Err(IdentityError::Exists {
            path: existing.to_path_buf(),
        }
        .into());
    }

    create_private_dir(&data_dir)?;
    let keys = identity::generate(&paths, args.force)?;
    identity::write_file(&config_path, text.as_bytes(), 0o644)?;
    Ok(InitOutcome {
        config_path,
        peer_id: keys.peer_id().to_string(),
        tunnel_public_key: keys.tunnel_public_key(),
    })
}

/// A refusal of the config that `vcfed init` would write, told in terms of
/// the flag that set the field: the file it names is not written yet.
fn flag_error(e: &ConfigError) -> UsageError {
    let flag = match e.field.as_deref() {
        Some("site.name") => "--site",
        Some("site.data_dir") => "--data-dir",
        Some("api.listen") => "--api-listen",
        Some("gateway.listen") => "--gateway-listen",
        Some("inventory.nodes") => "--nodes",
        Some("inventory.node.cores") => "--node-cores",
        Some("inventory.node.memory_mib") => "--node-memory-mib",
        Some("inventory.node.disk_gib") => "--node-disk-gib",
        Some("clusters.vlans") => "--vlans",
        Some(field) if field.starts_with("federation.listen") => "--listen",
        Some(field) if field.starts_with("federation.bootstrap") => "--bootstrap",
        _ => "the flags",
    };
    // A hint that shows a config line would not help someone writing flags.
    let hint = e
        .hint
        .as_deref()
        .filter(|hint| !hint.starts_with("write it like `"))
        .map(|hint| format!("\n  hint: {hint}"))
        .unwrap_or_default();
    UsageError(format!("{flag}: {}{hint}", e.message))
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data dir {}", dir.display()))
}

async fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let client = client_for(&args.config)?;
    let site: SiteInfo = client.get("/v1/site").await?;
    if args.json {
        return print_json(&site);
    }
    outln!("site        {}", site.name);
    outln!("peer id     {}", site.peer_id);
    outln!("version     {}", site.version);
    outln!("tunnel key  {}", site.tunnel_public_key);
    outln!(
        "node slot   {}, {} MiB memory, {} GiB disk",
        count(site.node.cores, "core"),
        site.node.memory_mib,
        site.node.disk_gib
    );
    outln!(
        "capacity    {} on {} ({}, {} MiB, {} GiB)",
        count(site.capacity.nodes, "node"),
        count(site.capacity.hosts, "host"),
        count(site.capacity.cores, "core"),
        site.capacity.memory_mib,
        site.capacity.disk_gib
    );
    outln!("free now    {}", count(site.free_now, "node"));
    outln!("vlans       {}", site.vlans);
    let report: SitesReport = client.get("/v1/sites").await?;
    if let Some(local) = report.sites.iter().find(|s| s.local) {
        for addr in &local.addrs {
            outln!("join at     {addr}/p2p/{}", site.peer_id);
        }
    }
    let alive = report
        .sites
        .iter()
        .filter(|s| !s.local && s.state == vcfed_registry::SiteState::Alive)
        .count();
    outln!(
        "federation  {} alive, {} connected",
        count(u64::try_from(alive).unwrap_or(u64::MAX), "other site"),
        count(
            u64::try_from(report.connected_peers).unwrap_or(u64::MAX),
            "peer"
        )
    );
    Ok(())
}

async fn forget_site(args: &ForgetArgs) -> anyhow::Result<()> {
    let client = client_for(&args.config)?;
    let path = format!(
        "/v1/sites/{}{}",
        crate::client::segment(&args.site),
        if args.force { "?force=true" } else { "" }
    );
    let forgotten: crate::federation::Forgotten = client
        .call(hyper::Method::DELETE, &path, None::<&()>)
        .await?;
    if args.json {
        return print_json(&forgotten);
    }
    let name = forgotten.site.as_deref().unwrap_or(&forgotten.peer_id);
    outln!("forgot {name} (peer {})", forgotten.peer_id);
    if !forgotten.ended.is_empty() {
        outln!(
            "its parts of {} ended; each heals by its policy (`vcfed cluster show`)",
            forgotten.ended.join(", ")
        );
    }
    Ok(())
}

async fn sites(args: &SitesArgs) -> anyhow::Result<()> {
    if let Some(SitesCommand::Forget(forget)) = &args.command {
        return forget_site(forget).await;
    }
    let client = client_for(&args.config)?;
    let report: SitesReport = client.get("/v1/sites").await?;
    if args.json {
        return print_json(&report);
    }
    let mut rows = vec![
        [
            "SITE",
            "STATE",
            "FREE",
            "TOTAL",
            "RTT",
            "ADVERT AGE",
            "VERSION",
            "PEER ID",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for site in &report.sites {
        let name = if site.local {
            format!("{} (this site)", site.name)
        } else {
            site.name.clone()
        };
        let state = serde_json::to_value(site.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        rows.push(vec![
            name,
            state,
            site.free_now.to_string(),
            site.total_nodes.to_string(),
            site.rtt_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1}ms")),
            format!("{:.1}s", site.advert_age_ms as f64 / 1000.0),
            site.version.to_string(),
            site.peer_id.clone(),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn generate_psk(out: &Path, force: bool) -> anyhow::Result<()> {
    identity::refuse_overwrite(out, force)?;
    let key = identity::random_bytes::<32>()?;
    identity::write_file(out, vcfed_registry::p2p::format_psk(&key).as_bytes(), 0o600)?;
    outln!(
        "wrote a new federation key to {}; set federation.psk_file to it at every site",
        out.display()
    );
    Ok(())
}

async fn capacity(args: &CapacityArgs) -> anyhow::Result<()> {
    let client = client_for(&args.config)?;
    let now = now_ms();
    let from = parse_instant(&args.from, now).map_err(|e| UsageError(format!("--from: {e}")))?;
    let to = match &args.to {
        Some(to) => parse_instant(to, now).map_err(|e| UsageError(format!("--to: {e}")))?,
        None => from.saturating_add(crate::api::DEFAULT_CAPACITY_SPAN_MS),
    };
    let report: CapacityReport = client
        .get(&format!("/v1/capacity?from={from}&to={to}"))
        .await?;
    if args.json {
        return print_json(&report);
    }
    outln!(
        "{} in all; at least {} free from {} to {}",
        count(report.total_nodes, "node"),
        report.min_free,
        format_instant(report.from_ms),
        format_instant(report.to_ms)
    );
    let mut rows = vec![vec!["FROM".to_owned(), "FREE".to_owned()]];
    rows.extend(
        report
            .steps
            .iter()
            .map(|step| vec![step.at.clone(), step.free.to_string()]),
    );
    print_table(&rows);
    Ok(())
}

async fn reservation(command: ReservationCommand) -> anyhow::Result<()> {
    match command {
        ReservationCommand::Hold(args) => {
            let client = client_for(&args.config)?;
            let now = now_ms();
            let start =
                parse_instant(&args.start, now).map_err(|e| UsageError(format!("--start: {e}")))?;
            let duration = parse_duration_ms(&args.duration)
                .map_err(|e| UsageError(format!("--duration: {e}")))?;
            let lease_s = lease_seconds(&args.lease)?;
            let key = args
                .key
                .clone()
                .unwrap_or_else(|| format!("cli-{}-{}", std::process::id(), now));
            let body = HoldBody {
                key: key.clone(),
                cluster_id: args.cluster.clone(),
                requester: None,
                start: InstantArg::Ms(start),
                end: InstantArg::Ms(start.saturating_add(duration)),
                nodes: args.nodes,
                shape: None,
                lease_s: Some(lease_s),
            };
            let mut reservation: Reservation = client.post("/v1/reservations", &body).await?;
            if args.commit {
                reservation = client
                    .post(
                        &format!("/v1/reservations/{}/commit", segment(&key)),
                        &OwnerBody::default(),
                    )
                    .await?;
            }
            print_reservations(&[reservation], args.json)
        }
        ReservationCommand::Commit(args) => key_action(&args, "commit").await,
        ReservationCommand::Release(args) => key_action(&args, "release").await,
        ReservationCommand::List(args) => {
            let client = client_for(&args.config)?;
            let state = if args.all { "all" } else { "active" };
            let reservations: Vec<Reservation> = client
                .get(&format!("/v1/reservations?state={state}"))
                .await?;
            print_reservations(&reservations, args.json)
        }
    }
}

async fn key_action(args: &KeyArgs, action: &str) -> anyhow::Result<()> {
    let key = non_empty(&args.key, "the reservation key")?;
    let client = client_for(&args.config)?;
    let reservation: Reservation = client
        .post(
            &format!("/v1/reservations/{}/{action}", segment(key)),
            &OwnerBody::default(),
        )
        .await?;
    print_reservations(&[reservation], args.json)
}

/// The `--lease` of a hold in whole seconds, within what the API accepts:
/// checked here so that the refusal names the flag, not the API's field.
fn lease_seconds(text: &str) -> Result<u64, UsageError> {
    let lease_ms = parse_duration_ms(text).map_err(|e| UsageError(format!("--lease: {e}")))?;
    let lease_s = u64::try_from(lease_ms).unwrap_or(0).div_ceil(1000);
    if !(1..=crate::api::LEASE_S_MAX).contains(&lease_s) {
        let max =
            humantime::format_duration(std::time::Duration::from_secs(crate::api::LEASE_S_MAX));
        return Err(UsageError(format!(
            "--lease {text}: a hold's lease must be from 1s to {max}; commit the hold \
             (`vcfed reservation commit KEY`) to keep the nodes longer"
        )));
    }
    Ok(lease_s)
}

/// `text`, or a usage error if it is empty: an empty key or name would be
/// an empty URL segment, which names no resource.
pub(crate) fn non_empty<'a>(text: &'a str, what: &str) -> Result<&'a str, UsageError> {
    if text.is_empty() {
        return Err(UsageError(format!("{what} must not be empty")));
    }
    Ok(text)
}

/// Prints reservations as a table, or as JSON.
pub fn print_reservations(reservations: &[Reservation], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&reservations);
    }
    let mut rows = vec![
        [
            "KEY",
            "CLUSTER",
            "REQUESTER",
            "NODES",
            "START",
            "END",
            "STATE",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for r in reservations {
        let state = match r.lease_expires_at_ms {
            Some(at) if r.state == vcfed_storage::ReservationState::Held => {
                format!("held until {}", format_instant(at))
            }
            _ => r.state.to_string(),
        };
        rows.push(vec![
            r.key.clone(),
            r.cluster_id.clone(),
            r.requester.clone(),
            r.nodes.to_string(),
            format_instant(r.window.start_ms),
            format_instant(r.window.end_ms),
            state,
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows as left-aligned columns; the first row is the header.
pub fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        outln!("{}", line.join("  ").trim_end());
    }
}
