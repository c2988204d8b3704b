//! The network-namespace driver: each node is a namespace with a veth on
//! the cluster's bridge. The frontend runs dnsmasq (DHCP and a TFTP root
//! with the install file, and an iPXE script for VMs, see [`super::pxe`]);
//! a compute node runs busybox `udhcpc` to get its
//! address from the frontend and busybox `tftp` to fetch the install file,
//! then reports `installed`.
//!
//! Everything the driver creates carries the `vcfn-` prefix (namespaces,
//! `vcfn-<site tag>-<cluster tag>-<node>`) or `vn`/`vp` (veth ends), with
//! short tags of the site and the cluster id, so `cleanup_stale` can remove
//! what a crashed agent of this site left, and nothing of another site on
//! the same machine.
//! Processes are children of the agent; they are killed on stop, and a
//! frontend whose dnsmasq dies is restarted (a bounded number of times).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::installer::Installer;
use super::{ComputeDriver, DriverError, NodeSpec, NodeState, NodeStatus, pxe, short_tag};

/// Prefix of the driver's namespaces.
pub const NETNS_PREFIX: &str = "vcfn-";
/// Name of the install file the frontend serves.
pub const INSTALL_FILE: &str = "install.cfg";
/// Restarts of a dead frontend before it is reported failed.
const FRONTEND_RESTARTS_MAX: u32 = 3;

/// What the driver runs for one node.
struct RunningNode {
    spec: NodeSpec,
    dir: PathBuf,
    netns: String,
    host_veth: String,
    child: Option<Child>,
    /// The frontend's HTTP server (the network installer), if it serves one.
    http: Option<Child>,
    restarts: u32,
    exit: Option<String>,
}

/// The netns driver of one site.
pub struct NetnsDriver {
    state_dir: PathBuf,
    /// Short tag of the site's name, in every namespace name.
    site_tag: String,
    /// The namespace the site's bridges live in (`None`: the agent's own).
    site_netns: Option<String>,
    /// The network installer frontends serve to VMs, if this machine has
    /// what it is built from.
    installer: Option<Installer>,
    /// Where the installer's files were built, once, and the bytes a node
    /// fetches; every frontend links them into its web root.
    installer_files: Option<(PathBuf, u64)>,
    nodes: BTreeMap<String, BTreeMap<u32, RunningNode>>,
}

impl std::fmt::Debug for NetnsDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetnsDriver")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl NetnsDriver {
    /// The driver of site `site`, keeping its files under `state_dir`,
    /// whose cluster bridges are in the namespace `site_netns` (`None`: the
    /// agent's own).
    pub fn new(state_dir: PathBuf, site: &str, site_netns: Option<String>) -> NetnsDriver {
        NetnsDriver {
            state_dir,
            site_tag: short_tag(site),
            site_netns,
            installer: None,
            installer_files: None,
            nodes: BTreeMap::new(),
        }
    }

    /// Frontends also serve the built-in network installer (over HTTP,
    /// with busybox httpd) to nodes that boot with iPXE.
    pub fn with_installer(mut self, installer: Installer) -> NetnsDriver {
        self.installer = Some(installer);
        self
    }

    /// The installer's files, built into the state dir the first time a
    /// frontend needs them (`None`: no installer).
    fn installer_files(&mut self) -> Result<Option<(PathBuf, u64)>, DriverError> {
        let Some(installer) = &self.installer else {
            return Ok(None);
        };
        if self.installer_files.is_none() {
            let dir = self.state_dir.join("installer");
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
            }
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            let bytes = installer
                .write(&dir)
                .map_err(|detail| DriverError::Command {
                    command: "building the network installer".to_owned(),
                    detail,
                })?;
            self.installer_files = Some((dir, bytes));
        }
        Ok(self.installer_files.clone())
    }

    /// Runs `ip ARGS` in the site's namespace.
    fn site_ip(&self, args: &[&str]) -> Result<String, DriverError> {
        match &self.site_netns {
            Some(netns) => {
                let mut full = vec!["-n", netns.as_str()];
                full.extend_from_slice(args);
                run("ip", &full)
            }
            None => run("ip", args),
        }
    }

    /// The namespace name of node `index` of `cluster`.
    pub fn netns_name(&self, cluster: &str, index: u32) -> String {
        format!(
            "{NETNS_PREFIX}{}-{}-{index}",
            self.site_tag,
            short_tag(cluster)
        )
    }

    fn node_dir(&self, spec: &NodeSpec) -> PathBuf {
        self.state_dir
            .join(&spec.cluster)
            .join(spec.index.to_string())
    }
}

/// Starts a node's process: dnsmasq for the frontend, the boot script for
/// a compute node.
fn spawn(node: &RunningNode) -> Result<Child, DriverError> {
    let log =
        std::fs::File::create(node.dir.join("log")).map_err(|e| io(&node.dir.join("log"), e))?;
    let log2 = log.try_clone().map_err(|e| io(&node.dir.join("log"), e))?;
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &node.netns]);
    if node.spec.frontend {
        let [a, b, c, _] = node.spec.subnet.octets();
        command.args([
            "dnsmasq",
            "--no-daemon",
            "--port=0",
            "--interface=eth0",
            "--bind-interfaces",
            "--log-dhcp",
            // dnsmasq pings an address before offering it, and with several
            // clients booting at once that check loses replies: a cluster's
            // network is fresh, so there is nothing to detect.
            "--no-ping",
            "--dhcp-authoritative",
        ]);
        command.arg(format!(
            "--dhcp-range={a}.{b}.{c}.10,{a}.{b}.{c}.250,255.255.255.0,1h"
        ));
        command.arg("--enable-tftp");
        command.arg(format!("--tftp-root={}", node.dir.join("tftp").display()));
        // iPXE (a VM's boot ROM) gets the boot script, which fetches the
        // install file; everyone else gets the install file itself.
        command.arg(format!("--dhcp-match=set:ipxe,{}", pxe::IPXE_OPTION));
        command.arg(format!("--dhcp-boot=tag:ipxe,{}", pxe::BOOT_SCRIPT));
        command.arg(format!("--dhcp-boot=tag:!ipxe,{INSTALL_FILE}"));
        command.arg(format!(
            "--dhcp-leasefile={}",
            node.dir.join("leases").display()
        ));
        command.arg(format!(
            "--pid-file={}",
            node.dir.join("dnsmasq.pid").display()
        ));
    } else {
        command.args(["sh", &node.dir.join("node.sh").display().to_string()]);
    }
    command.stdin(Stdio::null()).stdout(log).stderr(log2);
    command.spawn().map_err(|e| DriverError::Command {
        command: format!("{command:?}"),
        detail: e.to_string(),
    })
}

impl ComputeDriver for NetnsDriver {
    fn start_node(&mut self, spec: &NodeSpec) -> Result<(), DriverError> {
        let installer_files = if spec.frontend {
            self.installer_files()?
        } else {
            None
        };
        if let Some(node) = self
            .nodes
            .get_mut(&spec.cluster)
            .and_then(|nodes| nodes.get_mut(&spec.index))
        {
            if !matches!(state_of(node), NodeState::Failed { .. }) {
                return Ok(());
            }
            tracing::info!(cluster = %spec.cluster, node = spec.index, "restarting a failed node");
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let tag = short_tag(&spec.cluster);
        let netns = self.netns_name(&spec.cluster, spec.index);
        let host_veth = format!("vn{tag}{:x}", spec.index);
        let peer_veth = format!("vp{tag}{:x}", spec.index);
        let dir = self.node_dir(spec);
        // A fresh boot: nothing of an earlier one (a lease, "installed")
        // may be mistaken for this one's progress.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;

        // A leftover from a crash is replaced, not reused half-configured.
        if list_netns()?.contains(&netns) {
            kill_netns_processes(&netns);
            let _ = run("ip", &["netns", "del", &netns]);
        }
        let _ = self.site_ip(&["link", "del", &host_veth]);
        run("ip", &["netns", "add", &netns])?;
        let setup = (|| {
            self.site_ip(&[
                "link", "add", &host_veth, "type", "veth", "peer", "name", &peer_veth,
            ])?;
            self.site_ip(&["link", "set", &host_veth, "master", &spec.bridge, "up"])?;
            self.site_ip(&["link", "set", &peer_veth, "netns", &netns])?;
            let mac = spec
                .mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            run(
                "ip",
                &["-n", &netns, "link", "set", &peer_veth, "name", "eth0"],
            )?;
            run(
                "ip",
                &["-n", &netns, "link", "set", "eth0", "address", &mac, "up"],
            )?;
            run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
            if spec.frontend {
                let [a, b, c, _] = spec.subnet.octets();
                run(
                    "ip",
                    &[
                        "-n",
                        &netns,
                        "addr",
                        "add",
                        &format!("{a}.{b}.{c}.1/24"),
                        "dev",
                        "eth0",
                    ],
                )?;
                let tftp = dir.join("tftp");
                std::fs::create_dir_all(&tftp).map_err(|e| io(&tftp, e))?;
                let install = format!("# vcfed install file\ncluster = {}\n", spec.cluster);
                write(&tftp.join(INSTALL_FILE), &install)?;
                write(
                    &tftp.join(pxe::BOOT_SCRIPT),
                    &pxe::boot_script(INSTALL_FILE),
                )?;
                if let (Some(installer), Some((files, bytes))) = (&self.installer, &installer_files)
                {
                    link_files(files, &tftp)?;
                    let bytes = *bytes;
                    let server = Ipv4Addr::new(a, b, c, 1);
                    write_installer_cgi(&dir, server, &installer.kernel_args(server))?;
                    tracing::info!(cluster = %spec.cluster, bytes, "the frontend serves the network installer");
                }
            } else {
                write_node_scripts(&dir)?;
            }
            Ok(())
        })();
        if let Err(e) = setup {
            let _ = run("ip", &["netns", "del", &netns]);
            let _ = self.site_ip(&["link", "del", &host_veth]);
            return Err(e);
        }
        let mut node = RunningNode {
            spec: spec.clone(),
            dir,
            netns,
            host_veth,
            child: None,
            http: None,
            restarts: 0,
            exit: None,
        };
        node.child = Some(spawn(&node)?);
        if spec.frontend && self.installer.is_some() {
            node.http = Some(spawn_http(&node)?);
        }
        tracing::info!(cluster = %spec.cluster, node = spec.index, frontend = spec.frontend, netns = %node.netns, "node started");
        self.nodes
            .entry(spec.cluster.clone())
            .or_default()
            .insert(spec.index, node);
        Ok(())
    }

    fn poll(&mut self, cluster: &str) -> Vec<NodeStatus> {
        let Some(nodes) = self.nodes.get_mut(cluster) else {
            return Vec::new();
        };
        let mut restart = Vec::new();
        for (index, node) in nodes.iter_mut() {
            if let Some(child) = &mut node.child
                && let Ok(Some(status)) = child.try_wait()
            {
                node.child = None;
                if !status.success() {
                    node.exit = Some(format!("{status}: {}", last_line(&node.dir.join("log"))));
                    if node.spec.frontend && node.restarts < FRONTEND_RESTARTS_MAX {
                        restart.push(*index);
                    }
                }
            }
        }
        for index in restart {
            let node = nodes.get_mut(&index).expect("listed above");
            let child = spawn(node);
            node.restarts += 1;
            match child {
                Ok(child) => {
                    tracing::warn!(cluster, node = index, "frontend restarted");
                    node.child = Some(child);
                    node.exit = None;
                }
                Err(e) => node.exit = Some(e.to_string()),
            }
        }
        nodes
            .iter()
            .map(|(index, node)| NodeStatus {
                index: *index,
                frontend: node.spec.frontend,
                state: state_of(node),
            })
            .collect()
    }

    fn stop_cluster(&mut self, cluster: &str) -> Result<(), DriverError> {
        let nodes = self.nodes.remove(cluster).unwrap_or_default();
        let mut failed = None;
        for (_, mut node) in nodes {
            for mut child in [node.child.take(), node.http.take()].into_iter().flatten() {
                let _ = child.kill();
                let _ = child.wait();
            }
            kill_netns_processes(&node.netns);
            if let Err(e) = run("ip", &["netns", "del", &node.netns])
                && list_netns()?.contains(&node.netns)
            {
                failed = Some(e);
            }
            // Gone with the namespace (its peer end was in it), normally.
            let _ = self.site_ip(&["link", "del", &node.host_veth]);
        }
        // Also what an earlier process of this site left for the cluster.
        let own = format!("{NETNS_PREFIX}{}-{}-", self.site_tag, short_tag(cluster));
        for netns in list_netns()?.into_iter().filter(|n| n.starts_with(&own)) {
            kill_netns_processes(&netns);
            if let Err(e) = run("ip", &["netns", "del", &netns]) {
                failed = Some(e);
            }
        }
        let dir = self.state_dir.join(cluster);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            failed = Some(io(&dir, e));
        }
        match failed {
            Some(e) => Err(e),
            None => {
                tracing::info!(cluster, "nodes stopped");
                Ok(())
            }
        }
    }

    fn cleanup_stale(&mut self, keep: &BTreeSet<String>) -> Result<(), DriverError> {
        let keep_tags: BTreeSet<String> = keep.iter().map(|cluster| short_tag(cluster)).collect();
        let own = format!("{NETNS_PREFIX}{}-", self.site_tag);
        for netns in list_netns()? {
            let Some(rest) = netns.strip_prefix(&own) else {
                continue;
            };
            let tag = rest.split('-').next().unwrap_or_default();
            if !keep_tags.contains(tag) {
                tracing::info!(%netns, "removing a stale node namespace");
                kill_netns_processes(&netns);
                let _ = run("ip", &["netns", "del", &netns]);
                // The host end of its veth is in the site namespace.
                if let Some(index) = rest.rsplit('-').next().and_then(|i| i.parse::<u32>().ok()) {
                    let _ = self.site_ip(&["link", "del", &format!("vn{tag}{index:x}")]);
                }
            }
        }
        Ok(())
    }
}

impl Drop for NetnsDriver {
    fn drop(&mut self) {
        let clusters: Vec<String> = self.nodes.keys().cloned().collect();
        for cluster in clusters {
            let _ = self.stop_cluster(&cluster);
        }
    }
}

fn state_of(node: &RunningNode) -> NodeState {
    if node.spec.frontend {
        let [a, b, c, _] = node.spec.subnet.octets();
        return match (&node.child, &node.exit) {
            (Some(_), _) => NodeState::Serving {
                ip: Ipv4Addr::new(a, b, c, 1),
            },
            (None, Some(reason)) => NodeState::Failed {
                reason: reason.clone(),
            },
            (None, None) => NodeState::Failed {
                reason: "dnsmasq exited".to_owned(),
            },
        };
    }
    let lease = std::fs::read_to_string(node.dir.join("lease")).unwrap_or_default();
    let mut fields = lease.split_whitespace();
    let ip = fields.next().and_then(|f| f.parse().ok());
    let server = fields.next().and_then(|f| f.parse().ok());
    let state = std::fs::read_to_string(node.dir.join("state")).unwrap_or_default();
    match (state.trim(), ip, server) {
        ("installed", Some(ip), Some(server)) => NodeState::Installed { ip, server },
        (_, Some(ip), Some(server)) if node.exit.is_none() => NodeState::Leased { ip, server },
        _ => match &node.exit {
            Some(reason) => NodeState::Failed {
                reason: reason.clone(),
            },
            None => NodeState::Booting,
        },
    }
}

/// Puts every file of `from` into `to`: a hard link, or a copy across file
/// systems.
fn link_files(from: &Path, to: &Path) -> Result<(), DriverError> {
    for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let source = entry.map_err(|e| io(from, e))?.path();
        let target = to.join(source.file_name().unwrap_or_default());
        if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).map_err(|e| io(&source, e))?;
        }
    }
    Ok(())
}

/// Starts the frontend's HTTP server: the installer's files and its CGI
/// scripts, from the TFTP root.
fn spawn_http(node: &RunningNode) -> Result<Child, DriverError> {
    let log = std::fs::File::create(node.dir.join("http.log"))
        .map_err(|e| io(&node.dir.join("http.log"), e))?;
    let mut command = Command::new("ip");
    command.args([
        "netns",
        "exec",
        &node.netns,
        "busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
    ]);
    command.arg(node.dir.join("tftp"));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    command.spawn().map_err(|e| DriverError::Command {
        command: format!("{command:?}"),
        detail: e.to_string(),
    })
}

/// The installer's CGI scripts in the frontend's web root: `boot` tells a
/// node's iPXE what to boot (the installer, or its own disk once it
/// reported `installed`); `report` records that report. What nodes
/// reported is the cluster's (`<cluster>/installed`, `<cluster>/reports.log`),
/// not the frontend's: a frontend started again does not install them again.
fn write_installer_cgi(dir: &Path, server: Ipv4Addr, args: &str) -> Result<(), DriverError> {
    let cgi = dir.join("tftp/cgi-bin");
    let cluster_dir = dir.parent().unwrap_or(dir);
    let state = cluster_dir.join("installed");
    for d in [&cgi, &state] {
        std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
    }
    let state = state.display();
    let log = cluster_dir.join("reports.log");
    let log = log.display();
    let mac = "mac=$(echo \"$QUERY_STRING\" | sed -n 's/.*mac=\\([0-9a-f-]*\\).*/\\1/p')";
    // Three tries at fetching the installer (a busy frontend, a lossy
    // tunnel), then the node fails with the reason.
    let fetch = format!(
        "kernel http://{server}/vmlinuz {args} && \
         initrd http://{server}/installer.img && boot ||"
    );
    let installer = format!(
        "#!ipxe\n{fetch} sleep 3 ||\n{fetch} sleep 10 ||\n{fetch} echo {marker} failed fetching the installer from {server}\n",
        marker = pxe::MARKER
    );
    let boot = format!(
        "#!/bin/sh\n\
         {mac}\n\
         printf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
         if [ -n \"$mac\" ] && [ -e '{state}'/\"$mac\" ]; then\n\
           printf '#!ipxe\\necho {MARKER} booting from its disk\\nexit\\n'\n\
         else\n\
           cat <<'EOF'\n\
         {installer}\
         EOF\n\
         fi\n",
        MARKER = pxe::MARKER
    );
    let report = format!(
        "#!/bin/sh\n\
         {mac}\n\
         bytes=$(echo \"$QUERY_STRING\" | sed -n 's/.*bytes=\\([0-9]*\\).*/\\1/p')\n\
         printf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
         [ -n \"$mac\" ] || {{ echo 'no mac'; exit 0; }}\n\
         : > '{state}'/\"$mac\"\n\
         echo \"$(date +%s) $mac installed ${{bytes:-0}}\" >> '{log}'\n\
         echo ok\n"
    );
    for (name, text) in [("boot", boot), ("report", report)] {
        let path = cgi.join(name);
        write(&path, &text)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io(&path, e))?;
    }
    Ok(())
}

/// The boot sequence of a compute node: DHCP from the frontend, then the
/// install file over TFTP from the server DHCP named.
fn write_node_scripts(dir: &Path) -> Result<(), DriverError> {
    let dir_text = dir.display().to_string();
    let hook = format!(
        "#!/bin/sh\n\
         # udhcpc hook: configure the lease and record it for the driver.\n\
         case \"$1\" in\n\
           bound|renew)\n\
             ip addr flush dev \"$interface\"\n\
             ip addr add \"$ip/${{mask:-24}}\" dev \"$interface\"\n\
             echo \"$ip ${{siaddr:-$serverid}} ${{boot_file:-{INSTALL_FILE}}}\" > '{dir_text}/lease'\n\
             ;;\n\
         esac\n"
    );
    write(&dir.join("udhcpc.sh"), &hook)?;
    let script = format!(
        "#!/bin/sh\n\
         set -e\n\
         for attempt in 1 2 3; do\n\
           busybox udhcpc -i eth0 -q -n -t 10 -T 1 -s '{dir_text}/udhcpc.sh' && break\n\
           [ \"$attempt\" = 3 ] && exit 1\n\
         done\n\
         echo leased > '{dir_text}/state'\n\
         read ip server boot < '{dir_text}/lease'\n\
         busybox tftp -g -r \"$boot\" -l '{dir_text}/installed.cfg' \"$server\"\n\
         echo installed > '{dir_text}/state'\n"
    );
    write(&dir.join("node.sh"), &script)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("udhcpc.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .map_err(|e| io(&dir.join("udhcpc.sh"), e))
}

fn list_netns() -> Result<Vec<String>, DriverError> {
    let output = run("ip", &["netns", "list"])?;
    Ok(output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn kill_netns_processes(netns: &str) {
    let Ok(pids) = run("ip", &["netns", "pids", netns]) else {
        return;
    };
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// Runs a command, returning its stdout, or an error with its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, DriverError> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DriverError::Command {
            command: format!("{program} {}", args.join(" ")),
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(DriverError::Command {
            command: format!("{program} {}", args.join(" ")),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn write(path: &Path, text: &str) -> Result<(), DriverError> {
    std::fs::write(path, text).map_err(|e| io(path, e))
}

fn io(path: &Path, source: std::io::Error) -> DriverError {
    DriverError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The last non-empty line of a node's log (see [`pxe::last_console_line`]).
fn last_line(path: &Path) -> String {
    pxe::last_console_line(&std::fs::read_to_string(path).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cgi(dir: &Path, name: &str, query: &str) -> String {
        let out = Command::new("sh")
            .arg(dir.join("tftp/cgi-bin").join(name))
            .env("QUERY_STRING", query)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// The installer's CGI: the installer until a node reports installed,
    /// then its own disk; reports land in the cluster's log.
    #[test]
    fn the_boot_cgi_sends_a_node_to_the_installer_then_to_its_disk() {
        let cluster = tempfile::tempdir().unwrap();
        let frontend = cluster.path().join("0");
        let server = Ipv4Addr::new(198, 19, 9, 1);
        write_installer_cgi(
            &frontend,
            server,
            &format!("console=ttyS0 quiet vcfed.server={server}"),
        )
        .unwrap();
        let first = cgi(&frontend, "boot", "mac=02-aa-bb-cc-dd-ee");
        assert!(
            first.starts_with("Content-Type: text/plain\r\n\r\n#!ipxe\n"),
            "{first}"
        );
        assert!(first.contains("kernel http://198.19.9.1/vmlinuz console=ttyS0"));
        assert!(first.contains("initrd http://198.19.9.1/installer.img && boot ||"));
        assert_eq!(
            first.matches("kernel http://").count(),
            3,
            "three tries: {first}"
        );
        assert!(first.contains("VCFED-NODE failed fetching the installer from 198.19.9.1"));

        assert!(
            cgi(
                &frontend,
                "report",
                "mac=02-aa-bb-cc-dd-ee&state=installed&bytes=42"
            )
            .contains("ok")
        );
        let reports = std::fs::read_to_string(cluster.path().join("reports.log")).unwrap();
        assert!(
            reports.ends_with(" 02-aa-bb-cc-dd-ee installed 42\n"),
            "{reports}"
        );
        let then = cgi(&frontend, "boot", "mac=02-aa-bb-cc-dd-ee");
        assert!(then.contains("booting from its disk\nexit\n"), "{then}");
        // Another node still gets the installer; a query with no MAC does.
        assert!(cgi(&frontend, "boot", "mac=02-00-00-00-00-01").contains("kernel http://"));
        assert!(cgi(&frontend, "boot", "").contains("kernel http://"));
        // A hostile MAC cannot name a file outside the state directory.
        assert!(cgi(&frontend, "report", "mac=../../x&state=installed").contains("no mac"));
    }
}
