//! The netns compute driver on the real kernel: a frontend serving DHCP and
//! TFTP, compute nodes that lease an address from it and fetch the install
//! file, and a stop that leaves nothing behind. Needs root, iproute2,
//! dnsmasq and busybox; with CI=true their absence is a failure.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a failed unwrap is a failed test

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use vcfed::driver::netns::{NETNS_PREFIX, NetnsDriver};
use vcfed::driver::{ComputeDriver, NodeSpec, NodeState, node_mac, short_tag};

/// Whether the environment can run this test; in CI it must.
fn environment_ready() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tools = ["ip", "dnsmasq", "busybox"].iter().all(|tool| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if root && tools {
        return true;
    }
    let why = format!("needs root ({root}) and ip, dnsmasq, busybox ({tools})");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the netns driver test cannot run in CI: {why}"
    );
    eprintln!("skipping the netns driver test: {why}");
    false
}

/// The test's "site" namespace (holding the cluster bridge), deleted even
/// if the test panics. A namespace of its own keeps the host's bridge
/// filtering rules out of the test.
struct SiteNetns(String);

impl Drop for SiteNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?}");
}

#[test]
fn nodes_lease_from_the_frontend_and_install_over_tftp() {
    if !environment_ready() {
        return;
    }
    let site = SiteNetns(format!("vtsite-{}", std::process::id()));
    ip(&["netns", "add", &site.0]);
    ip(&["-n", &site.0, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &site.0, "link", "set", "br0", "up"]);
    let state = tempfile::tempdir().unwrap();
    let cluster = format!("c-test-{}", std::process::id());
    let mut driver = NetnsDriver::new(state.path().to_owned(), "site-t", Some(site.0.clone()));
    let spec = |index: u32| NodeSpec {
        cluster: cluster.clone(),
        index,
        frontend: index == 0,
        bridge: "br0".to_owned(),
        subnet: Ipv4Addr::new(198, 19, 42, 0),
        mac: node_mac(&cluster, index),
        vlan: 100,
        shape: None,
    };
    for index in 0..3 {
        driver.start_node(&spec(index)).unwrap();
    }
    driver.start_node(&spec(1)).unwrap(); // idempotent

    let started = Instant::now();
    loop {
        let nodes = driver.poll(&cluster);
        assert_eq!(nodes.len(), 3);
        if let Some(failed) = nodes
            .iter()
            .find(|n| matches!(n.state, NodeState::Failed { .. }))
        {
            let mut logs = String::new();
            for index in 0..3 {
                let log = state
                    .path()
                    .join(&cluster)
                    .join(index.to_string())
                    .join("log");
                logs += &format!(
                    "--- node {index}:\n{}\n",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            panic!("node failed: {failed:?}\n{logs}");
        }
        let installed = nodes
            .iter()
            .filter(|n| matches!(n.state, NodeState::Installed { .. }))
            .count();
        if installed == 2 {
            assert!(
                matches!(nodes[0].state, NodeState::Serving { ip } if ip == Ipv4Addr::new(198, 19, 42, 1))
            );
            for node in &nodes[1..] {
                let NodeState::Installed { ip, server } = node.state else {
                    unreachable!()
                };
                assert_eq!(server, Ipv4Addr::new(198, 19, 42, 1));
                assert_eq!(ip.octets()[..3], [198, 19, 42]);
            }
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nodes not installed in 30 s: {nodes:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "2 nodes leased and installed in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    driver.stop_cluster(&cluster).unwrap();
    let netns = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let tag = format!(
        "{NETNS_PREFIX}{}-{}",
        short_tag("site-t"),
        short_tag(&cluster)
    );
    assert!(!netns.contains(&tag), "namespaces left behind: {netns}");
    let links = String::from_utf8(
        Command::new("ip")
            .args(["-n", &site.0, "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !links.contains(&format!("vn{}", short_tag(&cluster))),
        "veths left behind"
    );
    assert!(!state.path().join(&cluster).exists());
}
