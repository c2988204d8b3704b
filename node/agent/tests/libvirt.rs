//! The libvirt driver on a real libvirtd (QEMU under software emulation):
//! a federation of three sites in network namespaces whose compute nodes
//! are virtual machines. Needs root, libvirtd and QEMU besides what the
//! demo needs, and for the install a kernel, busybox-static and extlinux;
//! with CI=true their absence is a failure.
//!
//! One test walks a cluster's life, because VMs are slow to boot under TCG:
//! - three VMs at the two worker sites (two at one) network-boot across
//!   the tunnels from the master's frontend, install their disks with the
//!   frontend's installer, reboot and come up from their disks: their
//!   serial consoles show the lease, the install and the boot from disk,
//!   the frontend's log the DHCP acks, and its report log each install;
//! - with the master's agent (and so its frontend) stopped, a node that is
//!   reset comes up again from its disk;
//! - a worker's agent is killed with SIGKILL while its VMs run: they run
//!   on, and the restarted agent adopts them (same QEMU processes) instead
//!   of making them again;
//! - a delete leaves no VM, no volume and no volume row in any ledger, and
//!   the teardown no storage pool.
//!
//! The others drive the driver alone: its failures (an unreachable
//! libvirtd, a missing base image, a NIC with no bridge, a VM that never
//! gets a lease, a full pool), base images, a site of two hosts, a pool of
//! iSCSI LUNs, and a frontend image.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a failed unwrap is a failed test

mod common;

use common::eventually;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vcfed::api::ClusterDetail;
use vcfed::client::ApiClient;
use vcfed::config::{Accel, LibvirtConfig};
use vcfed::demo::federation::{self, DemoDriver, DemoFederation, DemoSpec};
use vcfed::driver::libvirt::{LibvirtDriver, LibvirtSettings};
use vcfed::driver::netns::NetnsDriver;
use vcfed::driver::{ComputeDriver, NodeSpec, NodeState, node_mac};
use vcfed::ledger::SharedLedger;
use vcfed_storage::{ClusterState, Ledger};

/// Whether this machine has what the frontend's network installer is built
/// from (a kernel, busybox-static, extlinux); in CI it must.
fn installer_here() -> bool {
    match vcfed::driver::installer::InstallerSource::find(None) {
        Ok(_) => true,
        Err(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the network installer cannot be built in CI: {why}"
            );
            eprintln!("no network installer here ({why}): VMs fetch the install file only");
            false
        }
    }
}

/// Whether the environment can run these tests; in CI it must.
fn environment_ready() -> bool {
    match federation::check_environment(DemoDriver::Libvirt) {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the libvirt tests cannot run in CI: {why}"
            );
            eprintln!("skipping a libvirt test: {why}");
            false
        }
    }
}

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The VMs of `site` (by the driver's names) and their libvirt ids.
fn domains(site: &str) -> BTreeMap<String, String> {
    let prefix = format!("vcf-{}-", vcfed::driver::short_tag(site));
    virsh(&["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|name| name.starts_with(&prefix))
        .map(|name| (name.to_owned(), virsh(&["domid", name]).trim().to_owned()))
        .collect()
}

async fn detail(client: &ApiClient, id: &str) -> Option<ClusterDetail> {
    client.get(&format!("/v1/clusters/{id}")).await.ok()
}

/// Node number → (state, ip, server) of the nodes at `site`, as the master
/// shows them.
async fn nodes(client: &ApiClient, id: &str, site: &str) -> BTreeMap<u32, [String; 3]> {
    detail(client, id)
        .await
        .map(|d| {
            d.nodes
                .iter()
                .filter(|n| n.site == site)
                .map(|n| {
                    let field = |k: &str| n.state[k].as_str().unwrap_or_default().to_owned();
                    (n.index, [field("state"), field("ip"), field("server")])
                })
                .collect()
        })
        .unwrap_or_default()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_boot_across_the_tunnel_survive_an_agent_crash_and_leave_nothing() {
    if !environment_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The master has 1 slot (the frontend): both nodes are at the worker.
    let spec = DemoSpec {
        prefix: "vcfi".to_owned(),
        site_prefix: "lvs".to_owned(),
        wan_octet: 12,
        nodes: vec![1, 2, 1],
        driver: DemoDriver::Libvirt,
        heal_grace: None,
    };
    let mut federation = DemoFederation::build(spec.clone(), dir.path()).unwrap();
    federation.agent_exe = common::vcfed_bin().into();
    let mut clients = Vec::new();
    for index in 0..3 {
        federation.start_agent(index).unwrap();
        let client = federation.sites[index].client().unwrap();
        vcfed::demo::local::wait_ready(&client).await.unwrap();
        clients.push(client);
    }
    let (a, b) = (&clients[0], &clients[1]);
    eventually(
        "the sites see each other",
        Duration::from_secs(20),
        || async {
            let view: vcfed::federation::SitesReport = a.get("/v1/sites").await.unwrap();
            view.sites
                .iter()
                .filter(|s| s.state == vcfed_registry::SiteState::Alive)
                .count()
                == 3
        },
    )
    .await;

    let created: ClusterDetail = a
        .post(
            "/v1/clusters",
            &serde_json::json!({ "name": "vms", "nodes": 3, "duration": "1h" }),
        )
        .await
        .unwrap();
    let id = created.record.id;
    let started = Instant::now();
    let installs = installer_here();
    let done = if installs { "up" } else { "installed" };
    eventually(
        "both VMs installed (and up from disk)",
        Duration::from_secs(400),
        || async {
            let (at_b, at_c) = (nodes(a, &id, "lvs-b").await, nodes(a, &id, "lvs-c").await);
            at_b.len() + at_c.len() == 3 && at_b.values().chain(at_c.values()).all(|n| n[0] == done)
        },
    )
    .await;
    eprintln!(
        "both VMs {done} {:.1}s after the request",
        started.elapsed().as_secs_f64()
    );
    let frontend = nodes(a, &id, "lvs-a").await;
    let frontend_ip = frontend.get(&0).map(|n| n[1].clone()).unwrap();
    let frontend_dir = dir.path().join("lvs-a/nodes").join(&id).join("0");
    let frontend_log = read(&frontend_dir.join("log"));
    let reports = read(&dir.path().join("lvs-a/nodes").join(&id).join("reports.log"));
    let console_of = |site: &str, domain: &str| {
        read(
            &dir.path()
                .join(site)
                .join("consoles")
                .join(format!("{domain}.log")),
        )
    };
    // Nodes at both workers, two at one of them.
    let (at_b, at_c) = (domains("lvs-b"), domains("lvs-c"));
    assert!(
        !at_b.is_empty() && !at_c.is_empty() && at_b.len().max(at_c.len()) == 2,
        "{at_b:?} {at_c:?}"
    );
    for worker in ["lvs-b", "lvs-c"] {
        let booted = nodes(a, &id, worker).await;
        for (domain, [_, ip, _]) in domains(worker).keys().zip(booted.values()) {
            // What the VM printed: its lease from the master's frontend, then
            // the install, then its boot from its own disk.
            let console = console_of(worker, domain);
            assert!(console.contains("iPXE"), "{domain}: {console}");
            assert!(
                console.contains(&format!("VCFED-NODE leased {ip} {frontend_ip}")),
                "{domain}: {console}"
            );
            assert!(
                console.contains(&format!("VCFED-NODE installed {ip} {frontend_ip}")),
                "{domain}: {console}"
            );
            // What the frontend saw: a DHCP ack and the boot script sent to it.
            assert!(
                frontend_log.contains(&format!("DHCPACK(eth0) {ip} ")),
                "{ip}: {frontend_log}"
            );
            assert!(
                frontend_log.contains(&format!("/boot.ipxe to {ip}")),
                "boot.ipxe to {ip}: {frontend_log}"
            );
            if installs {
                assert!(console.contains("SYSLINUX"), "booted its disk: {console}");
                assert!(
                    console.contains(&format!("VCFED-NODE up {ip}")),
                    "{domain}: {console}"
                );
                // Its install reported to the frontend over the cluster network.
                let mac = virsh(&["domiflist", domain])
                    .split_whitespace()
                    .find(|w| w.len() == 17 && w.matches(':').count() == 5)
                    .unwrap()
                    .replace(':', "-");
                assert!(
                    reports.contains(&format!(" {mac} installed ")),
                    "{mac}: {reports}"
                );
            } else {
                assert!(
                    frontend_log.contains(&format!("/install.cfg to {ip}")),
                    "install.cfg to {ip}: {frontend_log}"
                );
            }
        }
    }
    eprintln!("installs reported to the frontend:\n{reports}");

    if installs {
        // A second boot needs no frontend: the master's agent stops (its
        // frontend with it), a node is reset, and it comes up from its disk.
        federation.stop_agent(0);
        let domain = at_c.keys().next().unwrap().clone();
        let ups = |console: &str| console.matches("VCFED-NODE up ").count();
        let before = ups(&console_of("lvs-c", &domain));
        let reset_at = Instant::now();
        virsh(&["reset", &domain]);
        eventually(
            "the reset node up again without the frontend",
            Duration::from_secs(180),
            || async { ups(&console_of("lvs-c", &domain)) > before },
        )
        .await;
        eprintln!(
            "up from its disk without the frontend {:.1}s after a reset",
            reset_at.elapsed().as_secs_f64()
        );
        federation.start_agent(0).unwrap();
        vcfed::demo::local::wait_ready(a).await.unwrap();
    }

    // A worker's agent crashes: its VMs run on, under libvirtd.
    let vms = at_b;
    federation.kill_agent(1);
    let running = domains("lvs-b");
    assert_eq!(running, vms, "the VMs outlive their agent");
    assert!(running.values().all(|id| id != "-"), "{running:?}");
    federation.start_agent(1).unwrap();
    vcfed::demo::local::wait_ready(b).await.unwrap();
    eventually(
        "the restarted worker reports its VMs again",
        Duration::from_secs(60),
        || async {
            let at_b = nodes(b, &id, "lvs-b").await;
            at_b.len() == vms.len() && at_b.values().all(|n| n[0] == done)
        },
    )
    .await;
    // Adopted, not made again: the same QEMU processes.
    assert_eq!(domains("lvs-b"), vms, "the VMs were made again");
    let at_b = detail(b, &id).await.unwrap();
    assert_eq!(at_b.record.state, ClusterState::Running);

    // Delete: every VM, volume and volume row goes.
    let _: serde_json::Value = a
        .call(
            hyper::Method::DELETE,
            &format!("/v1/clusters/{id}"),
            None::<&()>,
        )
        .await
        .unwrap();
    eventually(
        "the cluster finished at both sites",
        Duration::from_secs(60),
        || async {
            for client in [a, b] {
                match detail(client, &id).await {
                    Some(d) if d.record.state.is_terminal() => {}
                    _ => return false,
                }
            }
            true
        },
    )
    .await;
    // The runner stops the VMs just after the state changes (an ACPI
    // shutdown, then destroy after the demo's 2 s).
    eventually("no VM left", Duration::from_secs(30), || async {
        domains("lvs-b").is_empty() && domains("lvs-c").is_empty()
    })
    .await;
    for worker in ["lvs-b", "lvs-c"] {
        let pool = vcfed::driver::libvirt::default_pool(worker);
        let volumes = virsh(&["vol-list", &pool]);
        assert!(
            volumes.trim().is_empty(),
            "volumes left at {worker}: {volumes}"
        );
    }

    let left = federation.teardown();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(federation::leftovers(&spec).is_empty());
    for site in &federation.sites {
        let config = vcfed::config::Config::load(&site.config_path).unwrap();
        let ledger = Ledger::open(&config.ledger_path()).unwrap();
        assert_eq!(ledger.volumes().unwrap(), Vec::new(), "{}", site.name);
    }
}

/// A bridge of the test's own in this namespace, removed even on panic.
struct TestBridge(String);

impl TestBridge {
    /// `<prefix><pid>`, made and up.
    fn new(prefix: &str) -> TestBridge {
        let bridge = TestBridge(format!("{prefix}{}", std::process::id() % 100_000));
        for args in [
            vec!["link", "add", bridge.0.as_str(), "type", "bridge"],
            vec!["link", "set", bridge.0.as_str(), "up"],
        ] {
            assert!(Command::new("ip").args(&args).status().unwrap().success());
        }
        bridge
    }
}

/// A temporary directory QEMU (its own user) can reach, with a site's
/// data dir and ledger in it.
fn site_dir() -> (tempfile::TempDir, std::path::PathBuf, SharedLedger) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let ledger = SharedLedger::new(Ledger::open(&data_dir.join("ledger.db")).unwrap());
    (dir, data_dir, ledger)
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// The VMs and the default pool of a test's site on the system libvirtd,
/// removed even when the test fails.
struct SiteVms(String);

impl Drop for SiteVms {
    fn drop(&mut self) {
        for domain in domains(&self.0).keys() {
            virsh(&["destroy", domain]);
            virsh(&["undefine", domain]);
        }
        let pool = vcfed::driver::libvirt::default_pool(&self.0);
        virsh(&["pool-destroy", &pool]);
        virsh(&["pool-undefine", &pool]);
    }
}

fn settings(data_dir: &Path) -> LibvirtSettings {
    LibvirtSettings {
        site: format!("lvd-{}", std::process::id()),
        data_dir: data_dir.to_owned(),
        config: LibvirtConfig {
            accel: Accel::Tcg,
            shutdown_timeout_s: 1,
            memory_mib: Some(64),
            ..LibvirtConfig::new(data_dir)
        },
        boot_timeout: Duration::from_secs(4),
    }
}

/// What of `site`'s VMs and volumes exists in libvirt and in the ledger.
fn made(site: &str, ledger: &SharedLedger) -> (BTreeMap<String, String>, String, usize) {
    let pool = vcfed::driver::libvirt::default_pool(site);
    (
        domains(site),
        virsh(&["vol-list", &pool]).trim().to_owned(),
        ledger.blocking(|l| l.volumes().unwrap().len()),
    )
}

#[test]
fn failures_leave_nothing_half_made_and_an_unreachable_libvirtd_says_how_to_fix_it() {
    if !environment_ready() {
        return;
    }
    let (dir, data_dir, ledger) = site_dir();
    let frontend = || NetnsDriver::new(data_dir.join("nodes"), "lvd", None);

    // libvirtd unreachable: the error says so, and how to fix it.
    let mut unreachable = settings(&data_dir);
    unreachable.config.hosts =
        vec!["qemu+unix:///system?socket=/nonexistent/libvirt-sock".to_owned()];
    let error = LibvirtDriver::new(unreachable, ledger.clone(), frontend())
        .unwrap_err()
        .to_string();
    assert!(error.contains("start libvirtd"), "{error}");

    let bridge = TestBridge::new("vlb");
    let good = settings(&data_dir);
    let site = good.site.clone();
    let _cleanup = SiteVms(site.clone());
    let cluster = format!("c-fail-{}", std::process::id());
    let spec = NodeSpec {
        cluster: cluster.clone(),
        index: 1,
        frontend: false,
        bridge: bridge.0.clone(),
        subnet: Ipv4Addr::new(198, 19, 250, 0),
        mac: node_mac(&cluster, 1),
        vlan: 100,
        shape: None,
    };

    // A base image that is not there: the node does not start, and no
    // VM, volume or ledger row is left of it.
    let mut missing = settings(&data_dir);
    missing.config.base_image = Some(dir.path().join("no-such-image.qcow2"));
    let mut driver = LibvirtDriver::new(missing, ledger.clone(), frontend()).unwrap();
    let error = driver.start_node(&spec).unwrap_err().to_string();
    assert!(error.contains("no-such-image.qcow2"), "{error}");
    assert_eq!(made(&site, &ledger), (BTreeMap::new(), String::new(), 0));
    drop(driver);

    // A VM on a network with no frontend: it runs, gets no lease, and is
    // failed with the console's last line once the boot timeout passes.
    let mut driver = LibvirtDriver::new(good, ledger.clone(), frontend()).unwrap();
    // A VM whose NIC cannot be put on its bridge (there is no such
    // bridge): its start fails after libvirt made it, and what was made
    // (VM, volume, ledger row) is removed.
    let mut lost = spec.clone();
    lost.bridge = "vlnobridge0".to_owned();
    let error = driver.start_node(&lost).unwrap_err().to_string();
    assert!(error.contains("vlnobridge0"), "{error}");
    assert_eq!(made(&site, &ledger), (BTreeMap::new(), String::new(), 0));
    driver.start_node(&spec).unwrap();
    let (vms, volumes, rows) = made(&site, &ledger);
    assert_eq!((vms.len(), rows), (1, 1), "{vms:?} {volumes}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let reason = loop {
        let states = driver.poll(&cluster);
        assert_eq!(states.len(), 1);
        if let NodeState::Failed { reason } = &states[0].state {
            break reason.clone();
        }
        assert!(Instant::now() < deadline, "not failed: {states:?}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(reason.contains("no lease from the frontend"), "{reason}");
    // The runner's retry makes it again: the failed VM is replaced, not
    // doubled.
    driver.start_node(&spec).unwrap();
    let (again, _, rows) = made(&site, &ledger);
    assert_eq!((again.len(), rows), (1, 1), "{again:?}");
    assert_ne!(again, vms, "a new VM (a new libvirt id)");
    driver.stop_cluster(&cluster).unwrap();
    assert_eq!(made(&site, &ledger), (BTreeMap::new(), String::new(), 0));
    drop(driver);

    // A base image anywhere (not a volume of a pool): node volumes are
    // copy-on-write overlays of it.
    let image = dir.path().join("base.qcow2");
    let made_image = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .unwrap();
    assert!(made_image.success());
    let mut based = settings(&data_dir);
    based.config.base_image = Some(image.clone());
    let mut driver = LibvirtDriver::new(based, ledger.clone(), frontend()).unwrap();
    driver.start_node(&spec).unwrap();
    let pool = vcfed::driver::libvirt::default_pool(&site);
    let volume = virsh(&["vol-list", &pool]);
    let volume = volume.split_whitespace().next().unwrap();
    let xml = virsh(&["vol-dumpxml", volume, "--pool", &pool]);
    assert!(
        xml.contains(&format!("<path>{}</path>", image.display())),
        "{xml}"
    );
    driver.stop_cluster(&cluster).unwrap();
    assert_eq!(made(&site, &ledger), (BTreeMap::new(), String::new(), 0));
}

/// A site of two hypervisor hosts, both libvirt's built-in fake one (no
/// daemon, nothing runs): `test:///default` (16 CPUs, 3 GiB) and one of
/// the test's own (8 CPUs, 48 GiB). Nodes go to the host with the most free
/// memory among those with a free CPU, then to any with memory; each
/// node's host is in the ledger, and a stop clears both hosts.
#[test]
fn a_site_of_two_hosts_places_nodes_by_memory_and_cpus_and_keeps_track_of_them() {
    if Command::new("virsh").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "virsh is missing in CI"
        );
        eprintln!("skipping: no virsh");
        return;
    }
    let (dir, data_dir, ledger) = site_dir();
    let big = dir.path().join("big-host.xml");
    std::fs::write(
        &big,
        "<node>\n  <cpu><mhz>2000</mhz><model>x86_64</model><active>8</active><max>8</max>\
         <sockets>1</sockets><cores>8</cores><threads>1</threads><nodes>1</nodes></cpu>\n  \
         <memory>50331648</memory>\n</node>\n",
    )
    .unwrap();
    let hosts = [
        "test:///default".to_owned(),
        format!("test://{}", big.display()),
    ];
    let mut two = settings(&data_dir);
    two.config.hosts = hosts.to_vec();
    two.config.memory_mib = None;
    let mut driver = LibvirtDriver::new(
        two,
        ledger.clone(),
        NetnsDriver::new(data_dir.join("nodes"), "lvh", None),
    )
    .unwrap();
    let cluster = "c-hosts";
    let spec = |index: u32| NodeSpec {
        cluster: cluster.to_owned(),
        index,
        frontend: false,
        bridge: "unused".to_owned(),
        subnet: Ipv4Addr::new(198, 19, 251, 0),
        mac: node_mac(cluster, index),
        vlan: 101,
        shape: Some(vcfed_storage::NodeShape {
            cores: 1,
            memory_mib: 2048,
            disk_gib: 1,
        }),
    };
    for index in 1..=10 {
        driver.start_node(&spec(index)).unwrap();
    }
    // 8 on the big host while it has free CPUs, then the small one while it
    // has memory (3 GiB: one), then the big one again (CPUs are shared,
    // memory never is).
    let rows = ledger.blocking(|l| l.cluster_volumes(cluster).unwrap());
    let placed: Vec<&str> = rows.iter().map(|r| r.host.as_str()).collect();
    let mut expected = vec![hosts[1].as_str(); 8];
    expected.extend([hosts[0].as_str(), hosts[1].as_str()]);
    assert_eq!(placed, expected, "{rows:?}");
    let domains = driver.own_domains().unwrap();
    assert_eq!(domains.len(), 10, "{domains:?}");
    for row in &rows {
        let domain = row.name.trim_end_matches(".qcow2");
        assert_eq!(domains.get(domain), Some(&row.host), "{domain}");
    }
    // Every VM runs where it was put: none is reported gone.
    let states = driver.poll(cluster);
    assert_eq!(states.len(), 10);
    assert!(
        states.iter().all(|n| n.state == NodeState::Booting),
        "{states:?}"
    );
    // A node that fits no host is refused, and nothing is made of it.
    let mut huge = spec(11);
    huge.shape = Some(vcfed_storage::NodeShape {
        cores: 1,
        memory_mib: 65_536,
        disk_gib: 1,
    });
    let error = driver.start_node(&huge).unwrap_err().to_string();
    assert!(error.contains("no host has 65536 MiB free"), "{error}");
    assert_eq!(driver.own_domains().unwrap().len(), 10);
    driver.stop_cluster(cluster).unwrap();
    assert!(driver.own_domains().unwrap().is_empty());
    assert_eq!(ledger.blocking(|l| l.volumes().unwrap().len()), 0);
}

/// An iSCSI target of the test's own on tgtd (loopback only), removed even
/// on panic, with its libvirt pool.
struct Target {
    tid: String,
    pool: String,
}

impl Drop for Target {
    fn drop(&mut self) {
        virsh(&["pool-destroy", &self.pool]);
        virsh(&["pool-undefine", &self.pool]);
        let _ = Command::new("tgtadm")
            .args([
                "--lld", "iscsi", "--mode", "target", "--op", "delete", "--force",
            ])
            .args(["--tid", &self.tid])
            .status();
    }
}

fn tgtadm(args: &[&str]) {
    let status = Command::new("tgtadm")
        .args(["--lld", "iscsi"])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "tgtadm {args:?}");
}

/// A pool of LUNs (libvirt's `iscsi-direct`: QEMU reaches the target
/// itself, over loopback here): nodes are lent free LUNs of enough size,
/// which their VMs boot with; a node for which none is left is refused;
/// the LUNs go back at the stop, not deleted.
#[test]
fn an_iscsi_pool_lends_its_luns_to_nodes_and_takes_them_back() {
    if !environment_ready() {
        return;
    }
    let target_up = Command::new("tgtadm")
        .args(["--lld", "iscsi", "--mode", "target", "--op", "show"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !target_up {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "tgtd is not running in CI"
        );
        eprintln!(
            "skipping: no tgtd (Debian: apt-get install tgt; tgtd --iscsi portal=127.0.0.1:3260)"
        );
        return;
    }
    let pid = std::process::id();
    let (dir, data_dir, ledger) = site_dir();
    let iqn = format!("iqn.2026-12.dev.vcfed:test-{pid}");
    let target = Target {
        tid: (1000 + pid % 50_000).to_string(),
        pool: format!("vtiscsi-{pid}"),
    };
    tgtadm(&[
        "--mode",
        "target",
        "--op",
        "new",
        "--tid",
        &target.tid,
        "-T",
        &iqn,
    ]);
    for lun in ["1", "2"] {
        let file = dir.path().join(format!("lun{lun}.img"));
        std::fs::File::create(&file)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        tgtadm(&[
            "--mode",
            "logicalunit",
            "--op",
            "new",
            "--tid",
            &target.tid,
            "--lun",
            lun,
            "-b",
            file.to_str().unwrap(),
        ]);
    }
    tgtadm(&[
        "--mode",
        "target",
        "--op",
        "bind",
        "--tid",
        &target.tid,
        "-I",
        "ALL",
    ]);
    let pool_xml = dir.path().join("pool.xml");
    std::fs::write(
        &pool_xml,
        format!(
            "<pool type='iscsi-direct'>\n  <name>{}</name>\n  <source>\n    <host name='127.0.0.1'/>\n    \
             <device path='{iqn}'/>\n    <initiator><iqn name='iqn.2026-12.dev.vcfed:initiator'/></initiator>\n  \
             </source>\n</pool>\n",
            target.pool
        ),
    )
    .unwrap();
    virsh(&["pool-define", pool_xml.to_str().unwrap()]);
    virsh(&["pool-start", &target.pool]);
    let info = virsh(&["pool-info", &target.pool]);
    assert!(info.contains("running"), "the pool over the target: {info}");

    let bridge = TestBridge::new("vli");
    let mut lun_pool = settings(&data_dir);
    lun_pool.site = format!("lvi-{pid}");
    lun_pool.config.pool = Some(target.pool.clone());
    let site = lun_pool.site.clone();
    let _cleanup = SiteVms(site.clone());
    let mut driver = LibvirtDriver::new(
        lun_pool,
        ledger.clone(),
        NetnsDriver::new(data_dir.join("nodes"), "lvi", None),
    )
    .unwrap();
    let cluster = format!("c-luns-{pid}");
    let spec = |index: u32| NodeSpec {
        cluster: cluster.clone(),
        index,
        frontend: false,
        bridge: bridge.0.clone(),
        subnet: Ipv4Addr::new(198, 19, 252, 0),
        mac: node_mac(&cluster, index),
        vlan: 102,
        shape: Some(vcfed_storage::NodeShape {
            cores: 1,
            memory_mib: 64,
            disk_gib: 1,
        }),
    };
    driver.start_node(&spec(1)).unwrap();
    driver.start_node(&spec(2)).unwrap();
    let lent: Vec<String> = ledger.blocking(|l| {
        l.cluster_volumes(&cluster)
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect()
    });
    assert_eq!(lent, vec!["unit:0:0:1", "unit:0:0:2"], "one LUN each");
    // Their VMs run with those LUNs as disks (QEMU opened them over iSCSI
    // to start).
    let vms = domains(&site);
    assert_eq!(vms.len(), 2, "{vms:?}");
    for (domain, lun) in vms.keys().zip(&lent) {
        assert!(vms[domain] != "-", "{domain} runs");
        let xml = virsh(&["dumpxml", domain]);
        assert!(xml.contains(&format!("volume='{lun}'")), "{xml}");
    }
    let error = driver.start_node(&spec(3)).unwrap_err().to_string();
    assert!(error.contains("no free LUN"), "{error}");
    assert_eq!(domains(&site).len(), 2);

    driver.stop_cluster(&cluster).unwrap();
    assert!(domains(&site).is_empty());
    assert_eq!(ledger.blocking(|l| l.volumes().unwrap().len()), 0);
    let luns = virsh(&["vol-list", &target.pool]);
    assert!(
        luns.contains("unit:0:0:1") && luns.contains("unit:0:0:2"),
        "{luns}"
    );
}

/// A disk image whose boot sector writes `text` to the first serial port
/// and halts: a stand-in for a frontend image that needs no OS.
fn boot_sector_image(path: &Path, text: &str) {
    // xor ax,ax; mov ds,ax; mov si,msg; mov dx,0x3f8
    // next: lodsb; test al,al; jz done; out dx,al; jmp next
    // done: hlt; jmp done; msg: db text, 0
    let mut sector = vec![
        0x31, 0xC0, 0x8E, 0xD8, 0xBE, 0x15, 0x7C, 0xBA, 0xF8, 0x03, 0xAC, 0x84, 0xC0, 0x74, 0x03,
        0xEE, 0xEB, 0xF8, 0xF4, 0xEB, 0xFD,
    ];
    assert_eq!(sector.len(), 0x15, "the message starts at 0x7c15");
    sector.extend_from_slice(text.as_bytes());
    sector.push(0);
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xAA]);
    sector.resize(1 << 20, 0);
    std::fs::write(path, sector).unwrap();
}

/// With `frontend_image`, the master's frontend is a VM that boots from a
/// copy-on-write overlay of the image (not the network), learns the cluster
/// network from its SMBIOS strings, and is `serving` once it says so on its
/// console; no built-in frontend runs; the stop removes it and its overlay,
/// and leaves the image alone.
#[test]
fn a_frontend_image_boots_as_the_clusters_frontend_vm() {
    if !environment_ready() {
        return;
    }
    let pid = std::process::id();
    let (dir, data_dir, ledger) = site_dir();
    let image = dir.path().join("frontend.img");
    boot_sector_image(&image, "VCFED-FRONTEND serving\r\n");
    let bridge = TestBridge::new("vlf");
    let mut with_image = settings(&data_dir);
    with_image.site = format!("lvf-{pid}");
    with_image.config.frontend_image = Some(image.clone());
    with_image.boot_timeout = Duration::from_secs(60);
    let site = with_image.site.clone();
    let _cleanup = SiteVms(site.clone());
    let mut driver = LibvirtDriver::new(
        with_image,
        ledger.clone(),
        NetnsDriver::new(data_dir.join("nodes"), &site, None),
    )
    .unwrap();
    let cluster = format!("c-front-{pid}");
    let frontend = NodeSpec {
        cluster: cluster.clone(),
        index: 0,
        frontend: true,
        bridge: bridge.0.clone(),
        subnet: Ipv4Addr::new(198, 19, 253, 0),
        mac: node_mac(&cluster, 0),
        vlan: 103,
        shape: None,
    };
    driver.start_node(&frontend).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let states = driver.poll(&cluster);
        assert_eq!(states.len(), 1, "{states:?}");
        assert!(states[0].frontend);
        match &states[0].state {
            NodeState::Serving { ip } => {
                assert_eq!(*ip, Ipv4Addr::new(198, 19, 253, 1));
                break;
            }
            NodeState::Booting => {}
            other => panic!("{other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the frontend VM never said it serves"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let vms = domains(&site);
    assert_eq!(vms.len(), 1);
    let xml = virsh(&["dumpxml", vms.keys().next().unwrap()]);
    assert!(!xml.contains("<boot dev='network'/>"), "{xml}");
    assert!(xml.contains("vcfed.address=198.19.253.1/24"), "{xml}");
    let rows = ledger.blocking(|l| l.cluster_volumes(&cluster).unwrap());
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].node, 0);
    // No built-in frontend (dnsmasq in a namespace) was started.
    assert!(!data_dir.join("nodes").join(&cluster).exists());

    driver.stop_cluster(&cluster).unwrap();
    assert!(domains(&site).is_empty());
    assert_eq!(ledger.blocking(|l| l.volumes().unwrap().len()), 0);
    assert!(image.exists(), "the image is not the cluster's to remove");
}

/// A tmpfs of the test's own with a libvirt pool on it, removed even when
/// the test fails.
struct TinyPool {
    dir: std::path::PathBuf,
    pool: String,
}

impl Drop for TinyPool {
    fn drop(&mut self) {
        virsh(&["pool-destroy", &self.pool]);
        virsh(&["pool-undefine", &self.pool]);
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// A pool with no room left: the node fails with the pool's error, and no
/// VM, volume (not even a partial file) or ledger row is left of it.
#[test]
fn a_full_pool_fails_the_node_and_leaves_nothing() {
    if !environment_ready() {
        return;
    }
    let pid = std::process::id();
    let (dir, data_dir, ledger) = site_dir();
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs"])
        .arg(&full)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs");
    let tiny = TinyPool {
        dir: full.clone(),
        pool: format!("vtfull-{pid}"),
    };
    virsh(&[
        "pool-define-as",
        &tiny.pool,
        "dir",
        "--target",
        full.to_str().unwrap(),
    ]);
    virsh(&["pool-start", &tiny.pool]);
    // Fill it.
    std::fs::write(full.join("filler"), vec![0u8; 60 * 1024]).ok();

    let mut on_full = settings(&data_dir);
    on_full.site = format!("lvp-{pid}");
    on_full.config.pool = Some(tiny.pool.clone());
    let site = on_full.site.clone();
    let _cleanup = SiteVms(site.clone());
    let mut driver = LibvirtDriver::new(
        on_full,
        ledger.clone(),
        NetnsDriver::new(data_dir.join("nodes"), &site, None),
    )
    .unwrap();
    let cluster = format!("c-full-{pid}");
    let spec = NodeSpec {
        cluster: cluster.clone(),
        index: 1,
        frontend: false,
        bridge: "unused0".to_owned(),
        subnet: Ipv4Addr::new(198, 19, 254, 0),
        mac: node_mac(&cluster, 1),
        vlan: 104,
        shape: None,
    };
    let error = driver.start_node(&spec).unwrap_err().to_string();
    assert!(error.contains("No space left on device"), "{error}");
    assert!(domains(&site).is_empty());
    assert_eq!(ledger.blocking(|l| l.volumes().unwrap().len()), 0);
    let files: Vec<String> = std::fs::read_dir(&full)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, vec!["filler"], "no partial volume left");
}

/// An operator's own installer: the frontend serves its kernel and initrd
/// with its command line (`{frontend}` replaced by the frontend's address)
/// to a VM that network-boots, instead of the built-in installer.
#[test]
fn an_own_installer_is_what_the_frontend_boots_nodes_into() {
    if !environment_ready() {
        return;
    }
    let Some(kernel) = std::fs::read_dir("/boot").ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.display().to_string().contains("vmlinuz-"))
    }) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no kernel in /boot in CI"
        );
        eprintln!("skipping: no kernel in /boot");
        return;
    };
    let pid = std::process::id();
    let (dir, data_dir, ledger) = site_dir();
    // The "installer": busybox and an init that says what it was given.
    let stage = dir.path().join("own");
    std::fs::create_dir_all(stage.join("bin")).unwrap();
    for d in ["proc", "dev"] {
        std::fs::create_dir_all(stage.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", stage.join("bin/busybox")).unwrap();
    std::fs::write(
        stage.join("init"),
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         echo \"VCFED-NODE own-installer $(/bin/busybox cat /proc/cmdline)\"\n\
         while true; do /bin/busybox sleep 3600; done\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(stage.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let initrd = dir.path().join("own.img");
    let packed = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | busybox cpio -o -H newc > {}",
            stage.display(),
            initrd.display()
        ))
        .status()
        .unwrap();
    assert!(packed.success());

    let bridge = TestBridge::new("vlo");
    let own = vcfed::driver::installer::Installer::from_config(
        Some(&kernel),
        Some(&initrd),
        Some("console=ttyS0 quiet own.frontend={frontend}"),
    )
    .unwrap();
    let mut lv = settings(&data_dir);
    lv.site = format!("lvo-{pid}");
    lv.config.memory_mib = Some(256);
    lv.boot_timeout = Duration::from_secs(180);
    let site = lv.site.clone();
    let _cleanup = SiteVms(site.clone());
    let mut driver = LibvirtDriver::new(
        lv,
        ledger,
        NetnsDriver::new(data_dir.join("nodes"), &site, None).with_installer(own),
    )
    .unwrap();
    let cluster = format!("c-own-{pid}");
    let spec = |index: u32| NodeSpec {
        cluster: cluster.clone(),
        index,
        frontend: index == 0,
        bridge: bridge.0.clone(),
        subnet: Ipv4Addr::new(198, 19, 249, 0),
        mac: node_mac(&cluster, index),
        vlan: 105,
        shape: None,
    };
    driver.start_node(&spec(0)).unwrap();
    driver.start_node(&spec(1)).unwrap();
    let domain = domains(&site).keys().next().unwrap().clone();
    let console = data_dir.join("consoles").join(format!("{domain}.log"));
    let deadline = Instant::now() + Duration::from_secs(180);
    while !read(&console).contains("own-installer") {
        assert!(
            Instant::now() < deadline,
            "the own installer did not run: {}",
            read(&console)
        );
        let _ = driver.poll(&cluster);
        std::thread::sleep(Duration::from_millis(500));
    }
    let text = read(&console);
    assert!(
        text.contains("own.frontend=198.19.249.1"),
        "its command line, with the frontend's address: {text}"
    );
    driver.stop_cluster(&cluster).unwrap();
    assert!(domains(&site).is_empty());
}
