//! The plumbing of the federated demo: sites as network namespaces on one
//! machine, joined by a "WAN", each running its own `vcfed run`.
//!
//! ```text
//!   root namespace            <prefix>-wan namespace
//!   <prefix>-host ─────────── bridge "wan" ─┬─ <prefix>-a: wan0 198.18.N.1  agent site-a
//!   198.18.N.254                            ├─ <prefix>-b: wan0 198.18.N.2  agent site-b
//!                                           └─ <prefix>-c: wan0 198.18.N.3  agent site-c
//! ```
//!
//! Each agent runs inside its site's namespace (entered with `nsenter
//! --net`, so the node namespaces it creates are ordinary named ones) with
//! the `netns` driver: its gateway's segment bridges and its nodes' veths
//! are in the site namespace, its nodes in namespaces of their own. The
//! host end lets the demo (and the user) reach each site's API.
//!
//! Everything is named from the [`DemoSpec`], so [`down`] finds it again
//! after a crash or a `--keep`, and tests can run several federations side
//! by side under different prefixes. Only 198.18.0.0/15 is used.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::InitArgs;
use crate::client::ApiClient;
use crate::config::Config;
use crate::driver::libvirt::{DOMAIN_PREFIX, Virsh, default_pool, parse_names};
use crate::driver::netns::NETNS_PREFIX;
use crate::driver::short_tag;

/// API port of every demo site (each has its own address).
pub const API_PORT: u16 = 7780;
/// Federation port of every demo site.
pub const FEDERATION_PORT: u16 = 7781;
/// Gateway port of every demo site.
pub const GATEWAY_PORT: u16 = 7782;
/// How long an agent gets to stop on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Names and sizes of a demo federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoSpec {
    /// Prefix of its namespaces and of the host's veth (at most 9 bytes).
    pub prefix: String,
    /// Site names are `<site_prefix>-a`, `-b`, ...
    pub site_prefix: String,
    /// The WAN is 198.18.`wan_octet`.0/24.
    pub wan_octet: u8,
    /// Node slots of each site, in order.
    pub nodes: Vec<u32>,
    /// What the compute nodes are.
    pub driver: DemoDriver,
    /// `clusters.heal_grace` of every site (`None`: the default, 60 s).
    pub heal_grace: Option<&'static str>,
}

/// What the demo's compute nodes are (`vcfed demo --driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DemoDriver {
    /// Network namespaces that boot with busybox (fast, needs no libvirt).
    #[default]
    Netns,
    /// libvirt virtual machines (QEMU, software emulation) that
    /// network-boot with iPXE; needs a running libvirtd.
    Libvirt,
}

/// The `[libvirt]` table of a demo site: software emulation (KVM is not
/// reliable in nested sandboxes), small VMs, and a short ACPI grace: the
/// VMs run no OS that would shut down cleanly.
const DEMO_LIBVIRT: &str = "[libvirt]\naccel = \"tcg\"\nmemory_mib = 256\nshutdown_timeout_s = 2\n";

impl Default for DemoSpec {
    fn default() -> Self {
        DemoSpec {
            prefix: "vcfd".to_owned(),
            site_prefix: "site".to_owned(),
            wan_octet: 0,
            nodes: vec![2, 3, 3],
            driver: DemoDriver::Netns,
            heal_grace: None,
        }
    }
}

impl DemoSpec {
    /// Demo federation number `n` (`vcfed demo --instance`): the default
    /// for 0; otherwise its own namespaces, site names (node namespaces
    /// are tagged by site) and WAN, 198.18.`n`.0/24.
    pub fn instance(n: u8) -> DemoSpec {
        if n == 0 {
            return DemoSpec::default();
        }
        DemoSpec {
            prefix: format!("vcfd{n}"),
            site_prefix: format!("site{n}"),
            wan_octet: n,
            ..DemoSpec::default()
        }
    }

    fn letter(index: usize) -> char {
        char::from(b'a' + u8::try_from(index % 26).unwrap_or(0))
    }

    /// The name of site `index`.
    pub fn site_name(&self, index: usize) -> String {
        format!("{}-{}", self.site_prefix, Self::letter(index))
    }

    /// The namespace of site `index`.
    pub fn netns(&self, index: usize) -> String {
        format!("{}-{}", self.prefix, Self::letter(index))
    }

    /// The WAN namespace.
    pub fn wan_netns(&self) -> String {
        format!("{}-wan", self.prefix)
    }

    /// The host's veth into the WAN.
    pub fn host_link(&self) -> String {
        format!("{}-host", self.prefix)
    }

    /// The WAN address of site `index`.
    pub fn ip(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            198,
            18,
            self.wan_octet,
            u8::try_from(index + 1).unwrap_or(250),
        )
    }

    /// The host's WAN address.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.wan_octet, 254)
    }
}

/// One site of a demo federation.
#[derive(Debug)]
pub struct DemoSite {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub netns: String,
    /// Its WAN address.
    pub ip: Ipv4Addr,
    /// Its config file.
    pub config_path: PathBuf,
    /// Its agent's log.
    pub log_path: PathBuf,
    /// Its agent's peer id.
    pub peer_id: String,
    agent: Option<Child>,
}

impl DemoSite {
    /// The process id of its agent, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// A client of its API.
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        let config = Config::load(&self.config_path)?;
        crate::cli::client_from_config(&config)
    }
}

/// A running demo federation; torn down on drop.
#[derive(Debug)]
pub struct DemoFederation {
    /// What it was built from.
    pub spec: DemoSpec,
    /// Its sites, in order.
    pub sites: Vec<DemoSite>,
    /// The `vcfed` binary the agents run [default: this program].
    pub agent_exe: PathBuf,
    torn_down: bool,
}

/// The tools the federated demo runs, with the Debian package of each.
pub const DEMO_TOOLS: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("dnsmasq", "dnsmasq-base"),
    ("busybox", "busybox-static"),
];

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether `tool` is on the PATH.
fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Debian packages of the demo's tools that are missing here.
pub fn missing_packages() -> Vec<&'static str> {
    DEMO_TOOLS
        .into_iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(_, package)| package)
        .collect()
}

/// What to install before the demo, if anything can and should be: as
/// root, with apt-get, unless told not to.
pub fn install_plan(
    missing: &[&'static str],
    root: bool,
    apt: bool,
    allowed: bool,
) -> Option<Vec<&'static str>> {
    (!missing.is_empty() && root && apt && allowed).then(|| missing.to_vec())
}

/// Installs `packages` with apt-get, as CI does, showing apt's own errors.
pub fn install_packages(packages: &[&str]) -> Result<(), String> {
    let run = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("apt-get: {e}"))
            .and_then(|status| {
                status
                    .success()
                    .then_some(())
                    .ok_or_else(|| format!("`apt-get {}` failed ({status})", args.join(" ")))
            })
    };
    run(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend_from_slice(packages);
    run(&install)
}

/// Whether apt-get is here (a Debian or Ubuntu machine).
pub fn has_apt() -> bool {
    on_path("apt-get")
}

/// Why the federated demo cannot run here, if it cannot.
pub fn check_environment(driver: DemoDriver) -> Result<(), String> {
    if !is_root() {
        return Err("it needs root (network namespaces, TAP devices, bridges)".to_owned());
    }
    let missing = missing_packages();
    if !missing.is_empty() {
        let tools: Vec<&str> = DEMO_TOOLS
            .into_iter()
            .filter(|(_, package)| missing.contains(package))
            .map(|(tool, _)| tool)
            .collect();
        return Err(format!(
            "{} not found (Debian: apt-get install {})",
            tools.join(", "),
            missing.join(" ")
        ));
    }
    if driver == DemoDriver::Libvirt {
        let answer = Command::new("virsh")
            .args(["-c", LIBVIRT_URI, "version"])
            .stdin(Stdio::null())
            .output();
        match answer {
            Err(_) => {
                return Err(
                    "virsh not found (Debian: apt-get install libvirt-daemon-system qemu-system-x86)"
                        .to_owned(),
                );
            }
            Ok(out) if !out.status.success() => {
                return Err(format!(
                    "libvirt at {LIBVIRT_URI} does not answer ({}); start it: `virtlogd -d && libvirtd -d` (or `systemctl start libvirtd`)",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// The hypervisor of the demo's libvirt sites.
const LIBVIRT_URI: &str = "qemu:///system";

/// The libvirt domains and storage pools of the demo's sites (all of them
/// on this machine's libvirtd, whatever the spec's driver: a demo of
/// either kind may have left them): (domains, pools). Nothing without a
/// libvirtd.
fn libvirt_objects(spec: &DemoSpec) -> (Vec<String>, Vec<String>) {
    let virsh = Virsh::new(LIBVIRT_URI);
    let names = |args: &[&str]| virsh.run(args).map(|t| parse_names(&t)).unwrap_or_default();
    let sites: Vec<String> = (0..spec.nodes.len()).map(|i| spec.site_name(i)).collect();
    let domains = names(&["list", "--all", "--name"])
        .into_iter()
        .filter(|d| {
            sites
                .iter()
                .any(|s| d.starts_with(&format!("{DOMAIN_PREFIX}{}-", short_tag(s))))
        })
        .collect();
    let pools = names(&["pool-list", "--all", "--name"])
        .into_iter()
        .filter(|p| sites.iter().any(|s| *p == default_pool(s)))
        .collect();
    (domains, pools)
}

/// Removes the demo sites' VMs (with their volumes) and storage pools.
fn remove_libvirt_objects(spec: &DemoSpec) -> Vec<String> {
    let (domains, pools) = libvirt_objects(spec);
    let virsh = Virsh::new(LIBVIRT_URI);
    let ok = |args: &[&str]| virsh.run(args).is_ok();
    let mut removed = Vec::new();
    for domain in domains {
        ok(&["destroy", &domain]);
        if ok(&["undefine", &domain]) {
            removed.push(format!("VM {domain}"));
        }
    }
    for pool in pools {
        // Its volumes are files in the site's directory.
        let volumes = virsh.run(&["vol-list", &pool]).unwrap_or_default();
        for volume in parse_names(&volumes) {
            ok(&["vol-delete", &volume, "--pool", &pool]);
        }
        ok(&["pool-destroy", &pool]);
        if ok(&["pool-undefine", &pool]) {
            removed.push(format!("storage pool {pool}"));
        }
    }
    removed
}

impl DemoFederation {
    /// Builds the namespaces and links and initialises every site under
    /// `dir`; no agent runs yet. Leftovers of an earlier federation of the
    /// same spec are removed first. On error, what was built is removed.
    pub fn build(spec: DemoSpec, dir: &Path) -> anyhow::Result<DemoFederation> {
        if spec.prefix.len() > 9 || spec.nodes.is_empty() || spec.nodes.len() > 26 {
            bail!("a demo prefix has at most 9 bytes and a federation 1 to 26 sites");
        }
        down(&spec);
        let mut federation = DemoFederation {
            spec,
            sites: Vec::new(),
            agent_exe: std::env::current_exe().context("finding the vcfed binary")?,
            torn_down: false,
        };
        federation.build_network()?;
        for index in 0..federation.spec.nodes.len() {
            let site = federation.init_site(index, dir)?;
            federation.sites.push(site);
        }
        if federation.spec.driver == DemoDriver::Libvirt {
            // QEMU runs as its own user: it must reach the sites' pools
            // (search only: nothing in the directory is listable).
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir)?.permissions().mode();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
                .with_context(|| format!("letting QEMU reach {}", dir.display()))?;
        }
        Ok(federation)
    }

    fn build_network(&self) -> anyhow::Result<()> {
        let spec = &self.spec;
        let wan = spec.wan_netns();
        ip(&["netns", "add", &wan])?;
        ip(&["-n", &wan, "link", "set", "lo", "up"])?;
        ip(&["-n", &wan, "link", "add", "wan", "type", "bridge"])?;
        ip(&["-n", &wan, "link", "set", "wan", "up"])?;
        let host = spec.host_link();
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "host", "netns", &wan,
        ])?;
        ip(&["-n", &wan, "link", "set", "host", "master", "wan", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", spec.host_ip()),
            "dev",
            &host,
        ])?;
        ip(&["link", "set", &host, "up"])?;
        for index in 0..spec.nodes.len() {
            let netns = spec.netns(index);
            let port = format!("p{}", DemoSpec::letter(index));
            ip(&["netns", "add", &netns])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &netns, "link", "add", "wan0", "type", "veth", "peer", "name", &port,
                "netns", &wan,
            ])?;
            ip(&["-n", &wan, "link", "set", &port, "master", "wan", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{}/24", spec.ip(index)),
                "dev",
                "wan0",
            ])?;
            ip(&["-n", &netns, "link", "set", "wan0", "up"])?;
        }
        Ok(())
    }

    fn init_site(&self, index: usize, dir: &Path) -> anyhow::Result<DemoSite> {
        let spec = &self.spec;
        let name = spec.site_name(index);
        let data_dir = dir.join(&name);
        let ip = spec.ip(index);
        let bootstrap = match self.sites.first() {
            None => Vec::new(),
            Some(first) => vec![
                format!(
                    "/ip4/{}/tcp/{FEDERATION_PORT}/p2p/{}",
                    first.ip, first.peer_id
                )
                .parse()
                .context("the bootstrap address")?,
            ],
        };
        let init = InitArgs {
            site: name.clone(),
            data_dir: data_dir.clone(),
            config: None,
            force: true,
            api_listen: (ip, API_PORT).into(),
            listen: vec![
                format!("/ip4/{ip}/tcp/{FEDERATION_PORT}")
                    .parse()
                    .context("the listen address")?,
            ],
            gateway_listen: (ip, GATEWAY_PORT).into(),
            bootstrap,
            nodes: spec.nodes[index],
            node_cores: 1,
            node_memory_mib: 512,
            node_disk_gib: 1,
            vlans: "100-199".parse().context("the VLAN range")?,
        };
        let outcome = crate::cli::write_site(&init)?;
        let config_path = outcome.config_path;
        // Quick gossip for a small federation on one machine; the netns
        // driver; and the gateway endpoint the other sites use.
        let text = std::fs::read_to_string(&config_path)?;
        let text = text
            .replacen(
                "[federation]\n",
                "[federation]\nadvert_ttl = \"3s\"\nadvert_refresh = \"1s\"\nanti_entropy = \"500ms\"\n",
                1,
            )
            .replacen(
                "[clusters]\n",
                &format!(
                    "[clusters]\ndriver = \"{}\"\n{}",
                    match spec.driver {
                        DemoDriver::Netns => "netns",
                        DemoDriver::Libvirt => "libvirt",
                    },
                    spec.heal_grace
                        .map(|grace| format!("heal_grace = \"{grace}\"\n"))
                        .unwrap_or_default()
                ),
                1,
            )
            .replacen(
                "[gateway]\n",
                &format!("[gateway]\nendpoint = \"{ip}:{GATEWAY_PORT}\"\n"),
                1,
            );
        let text = match spec.driver {
            DemoDriver::Netns => text,
            DemoDriver::Libvirt => format!("{text}\n{DEMO_LIBVIRT}"),
        };
        std::fs::write(&config_path, text)
            .with_context(|| format!("writing {}", config_path.display()))?;
        Config::load(&config_path)?;
        Ok(DemoSite {
            peer_id: outcome.peer_id,
            name,
            netns: spec.netns(index),
            ip,
            log_path: data_dir.join("agent.log"),
            config_path,
            agent: None,
        })
    }

    /// Starts the agent of site `index` in its namespace (its log goes to
    /// `agent.log` in its data dir, at `RUST_LOG`, by default info).
    pub fn start_agent(&mut self, index: usize) -> anyhow::Result<()> {
        if self
            .sites
            .get(index)
            .context("no such site")?
            .agent
            .is_some()
        {
            return Ok(());
        }
        let exe = self.agent_exe.clone();
        let site = self.sites.get_mut(index).context("no such site")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&site.log_path)
            .with_context(|| format!("opening {}", site.log_path.display()))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", site.netns))
            .arg("--")
            .arg(exe)
            .args(["run", "--config"])
            .arg(&site.config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting an agent with nsenter")?;
        site.agent = Some(child);
        Ok(())
    }

    /// What of the clusters' networks and nodes exists at site `index`:
    /// its gateway's segment links, node veths and node namespaces.
    pub fn cluster_leftovers(&self, index: usize) -> Vec<String> {
        let Some(site) = self.sites.get(index) else {
            return Vec::new();
        };
        let links = Command::new("ip")
            .args(["-o", "-n", &site.netns, "link", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut left: Vec<String> = links
            .lines()
            .filter_map(|line| line.split(':').nth(1))
            .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
            .filter(|name| name.starts_with(crate::links::LINK_PREFIX) || name.starts_with("vn"))
            .map(|name| format!("link {name} in {}", site.netns))
            .collect();
        let prefix = format!("{NETNS_PREFIX}{}-", short_tag(&site.name));
        left.extend(
            list_netns()
                .into_iter()
                .filter(|n| n.starts_with(&prefix))
                .map(|n| format!("namespace {n}")),
        );
        let domain = format!("{DOMAIN_PREFIX}{}-", short_tag(&site.name));
        left.extend(
            libvirt_objects(&self.spec)
                .0
                .into_iter()
                .filter(|d| d.starts_with(&domain))
                .map(|d| format!("VM {d}")),
        );
        left
    }

    /// Whether the agent of site `index` runs (it may have exited).
    pub fn agent_running(&mut self, index: usize) -> bool {
        self.sites
            .get_mut(index)
            .and_then(|s| s.agent.as_mut())
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Cuts site `index` off the WAN (its link down): nothing reaches it,
    /// its nodes included, and nothing leaves it.
    pub fn cut_site(&self, index: usize) -> anyhow::Result<()> {
        let netns = &self.sites.get(index).context("no such site")?.netns;
        ip(&["-n", netns, "link", "set", "wan0", "down"])
    }

    /// Puts site `index` back on the WAN.
    pub fn reconnect_site(&self, index: usize) -> anyhow::Result<()> {
        let netns = &self.sites.get(index).context("no such site")?.netns;
        ip(&["-n", netns, "link", "set", "wan0", "up"])
    }

    /// Kills the agent of site `index` with SIGKILL, as a crash would.
    pub fn kill_agent(&mut self, index: usize) {
        if let Some(mut child) = self.sites.get_mut(index).and_then(|s| s.agent.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the agent of site `index` with SIGTERM (it stops its nodes and
    /// removes its gateway's links), killing it after a grace period.
    pub fn stop_agent(&mut self, index: usize) {
        let Some(mut child) = self.sites.get_mut(index).and_then(|s| s.agent.take()) else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops every agent and removes every namespace, link and process.
    /// Returns what could not be removed (nothing, normally).
    pub fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        for index in 0..self.sites.len() {
            self.stop_agent(index);
        }
        down(&self.spec);
        leftovers(&self.spec)
    }
}

impl Drop for DemoFederation {
    fn drop(&mut self) {
        let left = self.teardown();
        if !left.is_empty() {
            tracing::warn!(?left, "the demo federation left these behind");
        }
    }
}

/// Removes everything a demo federation of `spec` may have left: its
/// agents and their nodes' processes, its node, site and WAN namespaces
/// and the host's veth. Returns what it removed.
pub fn down(spec: &DemoSpec) -> Vec<String> {
    let mut removed = Vec::new();
    let netns = list_netns();
    let sites: Vec<String> = netns
        .iter()
        .filter(|n| is_site_netns(spec, n))
        .cloned()
        .collect();
    // Agents first, gracefully: they stop their own nodes and links.
    for site in &sites {
        for pid in netns_pids(site) {
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline && sites.iter().any(|s| !netns_pids(s).is_empty()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // VMs outlive their agents (a restart adopts them): remove them here.
    removed.extend(remove_libvirt_objects(spec));
    let node_prefixes = node_netns_prefixes(spec);
    let nodes = netns
        .iter()
        .filter(|n| node_prefixes.iter().any(|p| n.starts_with(p.as_str())));
    for name in nodes
        .chain(&sites)
        .chain(netns.iter().filter(|n| **n == spec.wan_netns()))
    {
        for pid in netns_pids(name) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        if ip(&["netns", "del", name]).is_ok() {
            removed.push(format!("namespace {name}"));
        }
    }
    // Deleting the WAN namespace took the host veth's peer, and the veth
    // with it; this is for a WAN namespace that was already gone.
    if ip(&["link", "del", &spec.host_link()]).is_ok() {
        removed.push(format!("link {}", spec.host_link()));
    }
    removed
}

/// What of a demo federation of `spec` exists now.
pub fn leftovers(spec: &DemoSpec) -> Vec<String> {
    let node_prefixes = node_netns_prefixes(spec);
    let mut left: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| {
            is_site_netns(spec, n)
                || *n == spec.wan_netns()
                || node_prefixes.iter().any(|p| n.starts_with(p.as_str()))
        })
        .map(|n| format!("namespace {n}"))
        .collect();
    let (domains, pools) = libvirt_objects(spec);
    left.extend(domains.into_iter().map(|d| format!("VM {d}")));
    left.extend(pools.into_iter().map(|p| format!("storage pool {p}")));
    if Command::new("ip")
        .args(["link", "show", &spec.host_link()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        left.push(format!("link {}", spec.host_link()));
    }
    left
}

/// The prefixes of the names of the sites' node namespaces (see the netns
/// driver).
fn node_netns_prefixes(spec: &DemoSpec) -> Vec<String> {
    (0..spec.nodes.len())
        .map(|index| format!("{NETNS_PREFIX}{}-", short_tag(&spec.site_name(index))))
        .collect()
}

fn is_site_netns(spec: &DemoSpec, name: &str) -> bool {
    name.strip_prefix(&format!("{}-", spec.prefix))
        .is_some_and(|rest| rest.len() == 1 && rest.bytes().all(|b| b.is_ascii_lowercase()))
}

fn list_netns() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|line| line.split_whitespace().next())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn netns_pids(netns: &str) -> Vec<String> {
    Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_are_installed_only_as_root_with_apt_and_when_allowed() {
        let missing = vec!["dnsmasq-base", "busybox-static"];
        assert_eq!(
            install_plan(&missing, true, true, true),
            Some(missing.clone())
        );
        assert_eq!(install_plan(&missing, false, true, true), None, "not root");
        assert_eq!(
            install_plan(&missing, true, false, true),
            None,
            "no apt-get"
        );
        assert_eq!(
            install_plan(&missing, true, true, false),
            None,
            "--no-install"
        );
        assert_eq!(install_plan(&[], true, true, true), None, "nothing missing");
    }

    #[test]
    fn every_tool_names_the_package_ci_installs() {
        let ci = include_str!("../../../../.ci/run");
        for (tool, package) in DEMO_TOOLS {
            assert!(
                ci.split_whitespace().any(|word| word == package),
                "{tool}: .ci/run does not install {package}"
            );
        }
    }
}
