//! `vcfed demo`: the README's quick start.
//!
//! As root, it builds a federation of three sites on this machine, each a
//! network namespace with its own agent, ledger, gateway and bridge, joined
//! by veth "WAN" links in 198.18.0.0/15, submits to the first site a
//! cluster larger than it, and shows every step until each node has leased
//! its address from the master's frontend and installed over TFTP across
//! the tunnels ([`federated`], on the plumbing of [`federation`]).
//!
//! Without root (or without iproute2, dnsmasq or busybox), it says so,
//! points to `vcfed simnet`, and tours one site instead ([`local`]).

// Output goes through `outln!`, which survives a closed stdout; the lint
// `print_stdout` stays on to catch a stray `println!`.

use std::path::PathBuf;

use clap::Args;

pub mod federated;
pub mod federation;
pub mod local;

/// Arguments of `vcfed demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the federation (or the site) running after the tour, until
    /// Ctrl-C; `vcfed demo --down` removes it from another shell.
    #[arg(long)]
    pub keep: bool,
    /// Remove every namespace, link and process a kept (or crashed) demo
    /// federation left, and exit.
    #[arg(long, conflicts_with_all = ["keep", "local"])]
    pub down: bool,
    /// Tour one site only (what the demo does without root).
    #[arg(long)]
    pub local: bool,
    /// Directory for the demo's sites [default: a fresh temporary
    /// directory, removed afterwards unless --keep].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write the federated demo's outcome (nodes, phases) to this
    /// file, as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Which demo federation: 0 is `vcfd-*` namespaces with sites
    /// `site-a`.. on 198.18.0.0/24; N is `vcfdN-*`, `siteN-a`.. on
    /// 198.18.N.0/24, so that several can run side by side (give the same
    /// number to `--down`).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub instance: u8,
    /// What the compute nodes are: network namespaces, or libvirt virtual
    /// machines that network-boot with iPXE (needs a running libvirtd).
    #[arg(long, value_enum, default_value_t = federation::DemoDriver::Netns)]
    pub driver: federation::DemoDriver,
    /// After the cluster runs, lose a worker site (kill its agent, cut its
    /// link): watch the master fence it and replace its nodes at the other
    /// site, then bring the site back and watch it stand down.
    #[arg(long, conflicts_with_all = ["local", "keep"])]
    pub heal: bool,
    /// Do not install missing tools (iproute2, util-linux, dnsmasq-base,
    /// busybox-static); without this, a root run on Debian or Ubuntu
    /// installs them with apt-get first.
    #[arg(long)]
    pub no_install: bool,
}

/// Runs the demo.
pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if args.down {
        let spec = federation::DemoSpec::instance(args.instance);
        let removed = federation::down(&spec);
        if removed.is_empty() {
            outln!("no demo federation was running");
        } else {
            outln!("removed: {}", removed.join(", "));
        }
        let left = federation::leftovers(&spec);
        if !left.is_empty() {
            anyhow::bail!("could not remove: {}", left.join(", "));
        }
        return Ok(());
    }
    if !args.local {
        let missing = federation::missing_packages();
        let plan = federation::install_plan(
            &missing,
            federation::is_root(),
            federation::has_apt(),
            !args.no_install,
        );
        if let Some(packages) = plan {
            outln!(
                "Installing what the federated demo runs: {} (apt-get; --no-install skips this)",
                packages.join(" ")
            );
            if let Err(e) = federation::install_packages(&packages) {
                outln!("Could not install them: {e}.");
            }
        }
        match federation::check_environment(args.driver) {
            Ok(()) => return federated::run(args).await,
            Err(why) => {
                outln!(
                    "The federated demo (3 sites in network namespaces) cannot run here: {why}."
                );
                outln!(
                    "Run it as root with iproute2, dnsmasq and busybox installed, or try \
                     `vcfed simnet`, which simulates a whole federation without root."
                );
                outln!("Touring a single site instead.");
            }
        }
    }
    local::run(args).await
}

/// Where the demo keeps its sites, and whether to remove it afterwards:
/// `--dir`, kept; or a fresh temporary directory, removed unless `--keep`.
fn demo_dir(args: &DemoArgs) -> (PathBuf, bool) {
    match &args.dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("vcfed-demo-{}", std::process::id())),
            !args.keep,
        ),
    }
}

fn step(title: &str) {
    outln!("\n==> {title}");
}
