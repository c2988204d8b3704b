//! The overlay data plane on a real kernel: `vcfed gateway` processes in
//! network namespaces.
//!
//! Each test builds its own lab: "sites" are namespaces whose `wan`
//! interfaces meet on a WAN bridge (in a hub namespace) with addresses in
//! 198.18.0.0/24; each site has a Linux bridge; "VMs" are namespaces with a
//! veth into their site's bridge and addresses in 198.19.0.0/16. One
//! gateway runs per site; an attacker, where a test needs one, is a
//! namespace on the WAN bridge at 198.18.0.100. Every name carries the test
//! process's pid and a counter, every wait is bounded (helpers run under
//! `timeout`), and a guard kills the gateways and deletes the namespaces,
//! also when a test panics. A test that measures throughput runs alone.
//!
//! The tests need root, `ip netns`, `ping` and `python3`. Without them they
//! print why and pass, except under `CI=true`, where they fail.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use common::vcfed_bin;
use vcfed_overlay::gateway::HANDSHAKES_PER_S_MAX;

/// The UDP port of every gateway (each site has its own namespace).
const GATEWAY_PORT: u16 = 7782;
/// How long a lab waits for the first traffic after the gateways start.
const FIRST_TRAFFIC_WITHIN: Duration = Duration::from_secs(15);
/// How long a restarted gateway may take to carry traffic again.
const RECOVERY_WITHIN: Duration = Duration::from_secs(5);
/// How long a test insists that traffic does not get through.
const NOTHING_THROUGH_FOR: Duration = Duration::from_secs(3);

static LABS: AtomicU32 = AtomicU32::new(0);
/// Labs share the machine, except one that measures throughput: it waits
/// for the others and they for it (the lock prefers a waiting writer).
static TURNS: RwLock<()> = RwLock::new(());

/// A lab's hold on [`TURNS`].
enum Turn {
    Shared {
        _guard: RwLockReadGuard<'static, ()>,
    },
    Alone {
        _guard: RwLockWriteGuard<'static, ()>,
    },
}

#[test]
fn three_sites_carry_ping_tcp_broadcast_and_full_size_frames() {
    let Some(mut lab) = Lab::new() else { return };
    let sites = lab.sites(3);
    let a = lab.vm(sites[0], "brs", 1);
    let b = lab.vm(sites[1], "brs", 2);
    let c = lab.vm(sites[2], "brs", 3);
    lab.start_mesh(&sites, &[(100, "brs")]);

    let took = lab.eventually_ping(&a, &b, FIRST_TRAFFIC_WITHIN);
    eprintln!("first ping A -> B after {took:?}");
    lab.eventually_ping(&a, &c, FIRST_TRAFFIC_WITHIN);
    lab.eventually_ping(&b, &c, FIRST_TRAFFIC_WITHIN);
    lab.eventually_ping(&c, &a, FIRST_TRAFFIC_WITHIN);

    // ARP crossed the overlay: B and C resolved A's address to A's MAC.
    for vm in [&b, &c] {
        let neighbours = lab.run_in(&vm.ns, &["ip", "neigh", "show", &a.ip]);
        let text = String::from_utf8_lossy(&neighbours.stdout);
        assert!(text.contains(&a.mac), "{} neighbours: {text}", vm.ns);
    }

    // A full 1500-byte packet with DF set crosses a 1500-byte WAN.
    let started = Instant::now();
    let out = lab.run_in(
        &a.ns,
        &[
            "ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s", "1472", &b.ip,
        ],
    );
    assert!(
        out.status.success(),
        "ping -M do -s 1472 failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("three 1500-byte DF pings in {:?}", started.elapsed());

    // A broadcast from A reaches B and C.
    let started = Instant::now();
    let listeners: Vec<Child> = [&b, &c]
        .iter()
        .map(|vm| lab.spawn_in(&vm.ns, &["python3", "-c", UDP_LISTEN, "9999", "8"]))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let sent = lab.run_in(
        &a.ns,
        &[
            "python3",
            "-c",
            UDP_BROADCAST,
            "198.19.255.255",
            "9999",
            "10",
        ],
    );
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    for listener in listeners {
        let out = wait_output(listener, Duration::from_secs(10));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("hello 198.19.0.1"),
            "listener got {text:?}"
        );
    }
    eprintln!("broadcast reached B and C in {:?}", started.elapsed());

    // A TCP transfer arrives whole.
    let started = Instant::now();
    let size = (8 << 20).to_string();
    let server = lab.spawn_in(&b.ns, &["python3", "-c", TCP_SINK, &b.ip, "5001"]);
    let sent = lab.run_in(&a.ns, &["python3", "-c", TCP_SOURCE, &b.ip, "5001", &size]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let received = wait_output(server, Duration::from_secs(30));
    let sent = String::from_utf8_lossy(&sent.stdout).trim().to_owned();
    let received = String::from_utf8_lossy(&received.stdout).trim().to_owned();
    assert_eq!(received, sent, "bytes and SHA-256 of the transfer");
    eprintln!(
        "8 MiB TCP transfer A -> B checked in {:?}",
        started.elapsed()
    );

    // It crossed as TCP super-frames: read whole from A's TAP, written
    // whole to B's (the kernels cut the segments), far fewer than the
    // 5800 frames of 1448 bytes that 8 MiB makes.
    let log_a = lab.stop_gateway(sites[0]);
    let log_b = lab.stop_gateway(sites[1]);
    let (sent_super, received_super) = (
        counter(&log_a, "super_frames_from_local"),
        counter(&log_b, "super_frames_to_local"),
    );
    eprintln!(
        "super-frames: {sent_super} read at A ({} frames in all), {received_super} written at B",
        counter(&log_a, "frames_from_local")
    );
    assert!(sent_super > 0 && received_super > 0, "{log_a}\n{log_b}");
    assert!(
        counter(&log_a, "frames_from_local") < 2_000,
        "8 MiB took more frames than super-frames would: {log_a}"
    );

    // The pings, ARP and broadcasts rode the interactive lane: A marked
    // them, and B's kernel steered them to B's interactive socket, while
    // the transfer's super-frames came through the bulk one.
    let (marked, steered, received) = (
        counter(&log_a, "interactive_frames"),
        counter(&log_b, "interactive_datagrams_received"),
        counter(&log_b, "datagrams_received"),
    );
    eprintln!(
        "interactive lane: {marked} frames marked at A; at B {steered} of {received} datagrams"
    );
    assert!(marked > 0 && steered > 0, "{log_a}\n{log_b}");
    // B wrote the pings to its TAP's interactive queue, so the kernel
    // queued B's replies there too.
    assert!(
        counter(&log_b, "interactive_frames_from_local") > 0,
        "{log_b}"
    );
    assert!(
        received - steered > 1_000,
        "the transfer took the bulk socket: {log_b}"
    );
    assert_eq!(counter(&log_b, "replays"), 0, "{log_b}");
}

#[test]
fn a_vm_that_moves_to_another_site_is_learnt_there() {
    let Some(mut lab) = Lab::new() else { return };
    let sites = lab.sites(3);
    let a = lab.vm(sites[0], "brs", 1);
    let m = lab.vm(sites[1], "brs", 2);
    lab.start_mesh(&sites, &[(100, "brs")]);
    lab.eventually_ping(&a, &m, FIRST_TRAFFIC_WITHIN);

    // Live migration, as the network sees it: the VM's port leaves B's
    // bridge and shows up on C's with the same MAC and address.
    let started = Instant::now();
    let m = lab.move_vm(m, sites[2], "brs");
    // A migrated VM announces itself (here: by talking first).
    lab.eventually_ping(&m, &a, Duration::from_secs(5));
    lab.eventually_ping(&a, &m, Duration::from_secs(5));
    eprintln!("moved VM reachable at C after {:?}", started.elapsed());
}

#[test]
fn a_restarted_gateway_carries_traffic_again_within_seconds() {
    let Some(mut lab) = Lab::new() else { return };
    let sites = lab.sites(2);
    let a = lab.vm(sites[0], "brs", 1);
    let b = lab.vm(sites[1], "brs", 2);
    lab.start_mesh(&sites, &[(100, "brs")]);
    lab.eventually_ping(&a, &b, FIRST_TRAFFIC_WITHIN);

    lab.kill_gateway(1);
    assert!(!lab.ping(&a, &b), "traffic crossed without B's gateway");
    assert_eq!(
        lab.links_with_prefix(sites[1], "vcf"),
        Vec::<String>::new(),
        "a killed gateway leaves no TAP behind"
    );
    let restarted = Instant::now();
    lab.start_gateway(1);
    let took = lab.eventually_ping(&a, &b, RECOVERY_WITHIN);
    eprintln!(
        "traffic recovered {:?} after the restart (ping answered after {took:?})",
        restarted.elapsed()
    );

    // A clean stop leaves the site as it found it: only its own bridge.
    lab.stop_gateway(1);
    assert_eq!(lab.links_with_prefix(sites[1], "vcf"), Vec::<String>::new());
    assert!(lab.link_exists(sites[1], "brs"), "the site bridge stays");
}

/// The data-plane knobs: `busy_poll` keeps A's loop polling while packets
/// come and lets it sleep after; `nice` sets B's loop thread alone.
#[test]
fn a_busy_polling_gateway_polls_while_packets_come_and_sleeps_after() {
    let Some(mut lab) = Lab::alone() else { return };
    let sites = lab.sites(2);
    let a = lab.vm(sites[0], "brs", 1);
    let b = lab.vm(sites[1], "brs", 2);
    // No IPv6 (router solicitations, MLD reports): the idle gateway must
    // see no packet at all.
    for ns in [&lab.sites[0], &lab.sites[1], &a.ns, &b.ns] {
        for scope in ["all", "default", "lo"] {
            let key = format!("net.ipv6.conf.{scope}.disable_ipv6=1");
            let out = lab.run_in(ns, &["sysctl", "-q", "-w", &key]);
            assert!(out.status.success(), "sysctl {key} in {ns}");
        }
    }
    lab.ensure_key(1);
    lab.gateways[0].busy_poll = Some("300ms");
    lab.gateways[1].nice = Some(-7);
    lab.start_mesh(&sites, &[(100, "brs")]);
    lab.eventually_ping(&a, &b, FIRST_TRAFFIC_WITHIN);
    let polling = lab.gateways[0].child.as_ref().unwrap().id();
    let sleeping = lab.gateways[1].child.as_ref().unwrap().id();
    let threads = thread_niceness(sleeping);
    assert!(
        threads
            .iter()
            .any(|(name, nice)| name == "vcfed-gateway" && *nice == -7)
            && threads
                .iter()
                .all(|(name, nice)| name == "vcfed-gateway" || *nice != -7),
        "nice = -7 is the loop thread's alone: {threads:?}"
    );

    // A ping every 50 ms: A's gateway never gets 300 ms without a packet,
    // so it polls all along; B's sleeps between packets.
    let (cpu_a, cpu_b, started) = (cpu_ms(polling), cpu_ms(sleeping), Instant::now());
    let out = lab.run_in(&a.ns, &["ping", "-c", "30", "-i", "0.05", "-q", &b.ip]);
    let wall_ms = u64::try_from(started.elapsed().as_millis()).unwrap();
    let (cpu_a, cpu_b) = (cpu_ms(polling) - cpu_a, cpu_ms(sleeping) - cpu_b);
    let summary = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "pings every 50 ms for {wall_ms} ms: CPU {cpu_a} ms at the polling gateway, {cpu_b} ms at the other; {summary}"
    );
    assert!(out.status.success(), "pings lost: {summary}");
    assert!(
        cpu_a * 10 >= wall_ms * 3 && cpu_a >= cpu_b * 3,
        "the busy-polling gateway used {cpu_a} ms of CPU in {wall_ms} ms, the other {cpu_b} ms"
    );

    // Once packets stop, it polls 300 ms more, then sleeps.
    std::thread::sleep(Duration::from_millis(500));
    let (cpu_a, started) = (cpu_ms(polling), Instant::now());
    std::thread::sleep(Duration::from_millis(1500));
    let cpu_a = cpu_ms(polling) - cpu_a;
    let wall_ms = u64::try_from(started.elapsed().as_millis()).unwrap();
    eprintln!("idle for {wall_ms} ms: CPU {cpu_a} ms at the polling gateway");
    assert!(
        cpu_a * 100 <= wall_ms * 15,
        "an idle busy-polling gateway used {cpu_a} ms of CPU in {wall_ms} ms"
    );
    lab.eventually_ping(&a, &b, Duration::from_secs(2));
}

#[test]
fn a_peer_with_the_wrong_key_gets_nothing_through() {
    let Some(mut lab) = Lab::new() else { return };
    let sites = lab.sites(3);
    let a = lab.vm(sites[0], "brs", 1);
    let b = lab.vm(sites[1], "brs", 2);
    let c = lab.vm(sites[2], "brs", 3);
    // C runs with a key that A and B do not know.
    lab.replace_key(2);
    lab.start_mesh(&sites, &[(100, "brs")]);
    lab.eventually_ping(&a, &b, FIRST_TRAFFIC_WITHIN);
    lab.never_ping(&c, &a, NOTHING_THROUGH_FOR);
    lab.never_ping(&a, &c, NOTHING_THROUGH_FOR);
    lab.never_ping(&c, &b, NOTHING_THROUGH_FOR);

    let log = lab.stop_gateway(0);
    let dropped = counter(&log, "datagrams_dropped");
    assert!(dropped > 0, "A counted C's datagrams as dropped: {log}");
}

#[test]
fn frames_of_one_segment_never_reach_another() {
    let Some(mut lab) = Lab::new() else { return };
    let sites = lab.sites(2);
    // All four VMs share one subnet: only the segments keep them apart.
    let a1 = lab.vm(sites[0], "brs1", 1);
    let b1 = lab.vm(sites[1], "brs1", 2);
    let a2 = lab.vm(sites[0], "brs2", 3);
    let b2 = lab.vm(sites[1], "brs2", 4);
    lab.start_mesh(&sites, &[(1, "brs1"), (2, "brs2")]);
    lab.eventually_ping(&a1, &b1, FIRST_TRAFFIC_WITHIN);
    lab.eventually_ping(&a2, &b2, FIRST_TRAFFIC_WITHIN);
    lab.never_ping(&a1, &b2, NOTHING_THROUGH_FOR);
    lab.never_ping(&b1, &a2, NOTHING_THROUGH_FOR);
    // ARP from segment 1 never resolved a segment-2 address.
    let neighbours = lab.run_in(&a1.ns, &["ip", "neigh", "show", &b2.ip]);
    assert!(
        !String::from_utf8_lossy(&neighbours.stdout).contains(&b2.mac),
        "a1 learnt b2's MAC across segments"
    );
}

#[test]
fn segment_bridges_survive_a_crash_and_vanish_at_a_clean_stop() {
    let Some(mut lab) = Lab::new() else { return };
    let sites = lab.sites(2);
    // Segment-bridge mode: the gateway makes vcfb7 and the VMs join it.
    lab.start_mesh_with(&sites, &[(7, None)]);
    for site in &sites {
        lab.eventually(
            "the gateway creates its segment bridge",
            FIRST_TRAFFIC_WITHIN,
            || lab.link_exists(*site, "vcfb7"),
        );
    }
    let a = lab.vm(sites[0], "vcfb7", 1);
    let b = lab.vm(sites[1], "vcfb7", 2);
    lab.eventually_ping(&a, &b, FIRST_TRAFFIC_WITHIN);

    // A crash leaves the bridge, with the VM still in it; a restart reuses it.
    lab.kill_gateway(1);
    assert_eq!(lab.links_with_prefix(sites[1], "vcf"), ["vcfb7"]);
    lab.start_gateway(1);
    lab.eventually_ping(&a, &b, RECOVERY_WITHIN);

    // Restarted with segment 8 instead of 7: the stale bridge goes.
    lab.kill_gateway(1);
    lab.configure(1, &[(8, None)]);
    lab.start_gateway(1);
    lab.eventually(
        "the restarted gateway replaces vcfb7 with vcfb8",
        FIRST_TRAFFIC_WITHIN,
        || lab.links_with_prefix(sites[1], "vcf") == ["vcfb8", "vcft8"],
    );

    // A clean stop removes what the gateway made.
    lab.stop_gateway(1);
    assert_eq!(lab.links_with_prefix(sites[1], "vcf"), Vec::<String>::new());
}

#[test]
fn trunk_mode_sets_up_and_removes_its_vlan_or_fails_cleanly() {
    let Some(mut lab) = Lab::new() else { return };
    let sites = lab.sites(2);
    lab.configure(0, &[(7, None)]);
    let config = lab.gateways[0].config.clone();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("trunk = \"wan\"\nvlan = 100\n");
    std::fs::write(&config, text).unwrap();
    let vlans_work = Command::new("ip")
        .args([
            "-n",
            &lab.sites[0],
            "link",
            "add",
            "link",
            "wan",
            "name",
            "probe.5",
        ])
        .args(["type", "vlan", "id", "5"])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    lab.start_gateway(0);
    if vlans_work {
        ip(&["-n", &lab.sites[0], "link", "del", "probe.5"]);
        lab.eventually("wan.100 in vcfb7", FIRST_TRAFFIC_WITHIN, || {
            lab.link_exists(sites[0], "wan.100") && lab.link_exists(sites[0], "vcfb7")
        });
        lab.stop_gateway(0);
        assert!(
            !lab.link_exists(sites[0], "wan.100"),
            "the VLAN it made goes"
        );
    } else {
        // This kernel has no 8021q (like the machine the project is built
        // on): creating wan.100 fails after the segment bridge and the TAP
        // exist, and the gateway must take them down again.
        let (status, log) = lab.wait_exit(0, Duration::from_secs(10));
        assert_eq!(status.code(), Some(1), "{log}");
        assert!(
            log.contains("creating VLAN sub-interface wan.100 of wan"),
            "{log}"
        );
    }
    assert_eq!(lab.links_with_prefix(sites[0], "vcf"), Vec::<String>::new());
    assert!(lab.link_exists(sites[0], "wan"), "the trunk stays");
}

#[test]
fn bad_gateway_configs_exit_2_and_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("gw.key");
    let out = Command::new(vcfed_bin())
        .args(["gateway", "genkey", "--out", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let public = String::from_utf8(out.stdout).unwrap();
    let out = Command::new(vcfed_bin())
        .args(["gateway", "pubkey", "--key", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), public);

    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "private_key_file = \"gw.key\"\nlisten = \"198.18.0.1:7782\"\n\
         [[segments]]\nid = 1\npeers = [2]\nbridge = \"br0\"\n",
    )
    .unwrap();
    let out = Command::new(vcfed_bin())
        .args(["gateway", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
    let text = common::stderr(&out);
    assert!(
        text.contains("gateway.toml:5:")
            && text.contains("field `segments[0].peers`: no peer has index 2"),
        "{text}"
    );
}

/// Datagrams per second of each flood. The flooder sends at most this
/// rate times [`FLOOD_FOR`] datagrams, at this rate, and stops a second
/// after [`FLOOD_FOR`] whatever it has sent.
const FLOOD_RATE: u32 = 20_000;
/// How long each measured transfer runs.
const TRANSFER_FOR: Duration = Duration::from_secs(3);
/// How long each flood runs: it starts before the transfer and ends after
/// it (the transfer's helpers take a few hundred ms to start).
const FLOOD_FOR: Duration = Duration::from_secs(4);
/// The attacker's address on the WAN.
const ATTACKER_IP: &str = "198.18.0.100";

/// An attacker on the WAN floods B's gateway, one flood after the other,
/// while a TCP transfer runs from A to B: junk, packets it recorded on the
/// WAN and replays, and handshake initiations for B's key. The transfer is
/// measured without a flood before and after, and under each flood; the
/// figures are printed, then checked.
#[test]
fn a_gateway_under_junk_replay_and_handshake_floods_keeps_the_transfer_going() {
    let Some(mut lab) = Lab::alone() else { return };
    let sites = lab.sites(2);
    let a = lab.vm(sites[0], "brs", 1);
    let b = lab.vm(sites[1], "brs", 2);
    let attacker = lab.attacker();
    lab.start_mesh(&sites, &[(100, "brs")]);
    lab.eventually_ping(&a, &b, FIRST_TRAFFIC_WITHIN);
    let target = wan_ip(sites[1]);
    let port = GATEWAY_PORT.to_string();
    let started = Instant::now();

    // An on-path attacker records data packets for B's gateway at the WAN
    // bridge while a transfer runs (not measured: the capture takes CPU).
    let capture = lab.dir.path().join("captured");
    let capture_path = capture.to_str().unwrap();
    let sniffer = lab.spawn_in(
        &lab.hub,
        &[
            "python3",
            "-c",
            CAPTURE,
            &format!("p{}", sites[1]),
            &target,
            &port,
            "2000",
            "5",
            capture_path,
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    lab.transfer(&a, &b, Duration::from_secs(2));
    let captured = wait_output(sniffer, Duration::from_secs(10));
    let captured = String::from_utf8_lossy(&captured.stdout).trim().to_owned();
    assert!(
        captured.parse::<u32>().is_ok_and(|n| n > 0),
        "no data packet captured: {captured:?}"
    );

    // Without a flood, then each flood followed by a transfer without one:
    // each flood is compared with the transfers on either side of it, so
    // that a change in what else runs on the machine weighs little. A
    // build elsewhere on a 2-core machine can still halve one 3-s
    // transfer: a flood that keeps less than half is measured once more,
    // and the test fails if it does again.
    let gateway_pid = lab.gateways[sites[1]].child.as_ref().unwrap().id();
    let b64_key = lab.gateways[sites[1]].public_key.clone();
    let mut rows = vec![lab.measure(&a, &b, gateway_pid, None)];
    for (kind, extra) in [
        ("junk", capture_path),
        ("replay", capture_path),
        ("handshake", b64_key.as_str()),
    ] {
        for _attempt in 0..2 {
            let flood = Flood {
                kind,
                attacker: &attacker,
                target: &target,
                extra,
            };
            rows.push(lab.measure(&a, &b, gateway_pid, Some(flood)));
            rows.push(lab.measure(&a, &b, gateway_pid, None));
            if kept(&rows, rows.len() - 2) >= 0.5 {
                break;
            }
        }
    }
    assert!(
        lab.gateways[sites[1]]
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "B's gateway died under the floods:\n{}",
        lab.logs()
    );
    // Honest traffic still crosses at once.
    lab.eventually_ping(&a, &b, RECOVERY_WITHIN);
    lab.eventually_ping(&b, &a, RECOVERY_WITHIN);
    let log = lab.stop_gateway(sites[1]);

    eprintln!("transfer A -> B under floods of {FLOOD_RATE} datagrams/s at B's gateway:");
    eprintln!("flood         sent  replies  Gbit/s   kept  CPU ms: B's gateway  attacker");
    for (i, row) in rows.iter().enumerate() {
        let Some(kind) = row.flood else {
            eprintln!("{:<9} {:>26.2} {:>22}", "none", row.gbit_s, row.cpu_ms);
            continue;
        };
        eprintln!(
            "{kind:<9} {:>8} {:>8} {:>7.2} {:>5.0}% {:>16} {:>9}",
            row.sent,
            row.replies,
            row.gbit_s,
            100.0 * kept(&rows, i),
            row.cpu_ms,
            row.attacker_cpu_ms
        );
    }
    let count = |name| counter(&log, name);
    eprintln!(
        "B's gateway: datagrams_received={} datagrams_dropped={} junk={} bad_mac={} refused={} \
         replays={} cookie_replies={} rate_limited={} unknown_peer={} (in {:?})",
        count("datagrams_received"),
        count("datagrams_dropped"),
        count("junk"),
        count("bad_mac"),
        count("refused"),
        count("replays"),
        count("cookie_replies"),
        count("rate_limited"),
        count("unknown_peer"),
        started.elapsed()
    );
    // The last measurement of each flood is the one that counts.
    for (i, row) in rows.iter().enumerate() {
        let Some(kind) = row.flood else { continue };
        if rows[i + 1..].iter().any(|later| later.flood == Some(kind)) {
            continue;
        }
        assert!(
            kept(&rows, i) >= 0.5,
            "the {kind} flood took the transfer to {:.2} Gbit/s, under half of {:.2}, twice",
            row.gbit_s,
            row.gbit_s / kept(&rows, i)
        );
    }
    // Per flood: datagrams sent, cookie replies received, times run.
    let totals = |kind: &str| {
        rows.iter()
            .filter(|row| row.flood == Some(kind))
            .fold((0, 0, 0), |(sent, replies, times), row| {
                (sent + row.sent, replies + row.replies, times + 1)
            })
    };
    let sent = |kind: &str| totals(kind).0;
    // Most of each flood reached the gateway and was counted by kind (the
    // kernel may drop some at the socket while the gateway is busy).
    let junk = count("junk") + count("bad_mac") + count("refused");
    assert!(
        junk >= sent("junk") / 2,
        "{junk} of {} junk datagrams counted: {log}",
        sent("junk")
    );
    assert!(
        count("replays") >= sent("replay") / 2,
        "{} of {} replayed packets counted as replays: {log}",
        count("replays"),
        sent("replay")
    );
    // Under the handshake flood the gateway answered with cookies, and did
    // the DH for no more of the attacker's initiations than the gateway
    // takes before it is under load: the attacker answers no cookie, so
    // beyond that it got none. A flood runs for at most FLOOD_FOR and a
    // second, so it touches at most that many one-second windows and one.
    let (_, cookies_received, times) = totals("handshake");
    assert!(count("cookie_replies") > 0, "no cookie replies: {log}");
    assert!(cookies_received > 0, "no cookie reply reached the attacker");
    let windows = FLOOD_FOR.as_secs() + 2;
    let dh_max = HANDSHAKES_PER_S_MAX * windows * times;
    assert!(
        count("unknown_peer") <= dh_max,
        "{} initiations got a DH, more than {dh_max}: {log}",
        count("unknown_peer")
    );
}

/// Receives one UDP datagram on port argv[1] within argv[2] seconds and
/// prints it with the sender's address, or prints "timeout".
const UDP_LISTEN: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
try:
    data, addr = s.recvfrom(100)
    print(data.decode(), addr[0])
except socket.timeout:
    print("timeout")
"#;

/// Sends argv[3] broadcasts "hello" to argv[1]:argv[2], 0.2 s apart.
const UDP_BROADCAST: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for _ in range(int(sys.argv[3])):
    s.sendto(b"hello", (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.2)
"#;

/// Accepts one TCP connection on argv[1]:argv[2] and prints the byte count
/// and SHA-256 of everything received.
const TCP_SINK: &str = r#"
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(20)
c, _ = s.accept()
c.settimeout(20)
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(65536)
    if not b:
        break
    h.update(b)
    n += len(b)
print(n, h.hexdigest())
"#;

/// Sends argv[3] pseudo-random bytes to argv[1]:argv[2] (retrying the
/// connection for 10 s) and prints their count and SHA-256.
const TCP_SOURCE: &str = r#"
import hashlib, random, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(5).randbytes(size)
deadline = time.time() + 10
while True:
    try:
        c = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.1)
c.settimeout(20)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print(size, hashlib.sha256(data).hexdigest())
"#;

/// Records UDP payloads of WireGuard data packets that leave bridge port
/// argv[1] for argv[2]:argv[3], splitting UDP GSO packets (read with their
/// virtio header), until argv[4] are held or argv[5] seconds pass; writes
/// them to argv[6] (2-byte little-endian length, then the bytes) and
/// prints how many.
const CAPTURE: &str = r#"
import socket, struct, sys, time
iface, dst, port = sys.argv[1], socket.inet_aton(sys.argv[2]), int(sys.argv[3])
count, seconds, path = int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
# ETH_P_ALL: only such sockets see the packets a port sends.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
s.bind((iface, 3))
s.settimeout(0.2)
got, deadline = [], time.time() + seconds
while len(got) < count and time.time() < deadline:
    try:
        pkt = s.recv(70000)
    except socket.timeout:
        continue
    gso_type, gso_size = pkt[1], struct.unpack_from("<H", pkt, 4)[0]
    ip = pkt[10 + 14:]
    if pkt[10 + 12:10 + 14] != b"\x08\x00" or len(ip) < 28 or ip[9] != 17 or ip[16:20] != dst:
        continue
    ihl = (ip[0] & 15) * 4
    if struct.unpack_from("!H", ip, ihl + 2)[0] != port:
        continue
    payload = ip[ihl + 8:]
    size = gso_size if gso_type and gso_size else len(payload)
    got += [payload[i:i + size] for i in range(0, len(payload), size) if payload[i] == 4]
with open(path, "wb") as f:
    for p in got[:count]:
        f.write(struct.pack("<H", len(p)) + p)
print(len(got[:count]))
"#;

/// Floods argv[2]:argv[3] with argv[1] datagrams at argv[4] per second for
/// argv[5] seconds (a fixed count; it stops a second after that in any
/// case) and prints how many it sent, how many cookie replies came back
/// and the CPU time it used (ms). `junk`: random bytes, handshake messages with a wrong mac1, data
/// packets with a real receiver index (from the capture file argv[6]) and
/// a random body; `replay`: the captured packets; `handshake`: initiations
/// with a random body and the right mac1 for the base64 public key argv[6].
const FLOOD: &str = r#"
import base64, hashlib, random, socket, struct, sys, time
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
rate, seconds, extra = int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
rng = random.Random(19)
def captured():
    data, i, out = open(extra, "rb").read(), 0, []
    while i < len(data):
        n = struct.unpack_from("<H", data, i)[0]
        out.append(data[i + 2:i + 2 + n])
        i += 2 + n
    return out
if kind == "junk":
    index = captured()[0][4:8]
    pool = []
    for i in range(1024):
        pool.append([
            lambda: rng.randbytes(rng.randrange(0, 1400)),
            lambda: b"\x01\0\0\0" + rng.randbytes(144),
            lambda: b"\x02\0\0\0" + rng.randbytes(88),
            lambda: b"\x04\0\0\0" + index + struct.pack("<Q", rng.randrange(1 << 62, 1 << 63))
                + rng.randbytes(rng.randrange(16, 1400)),
        ][i % 4]())
elif kind == "replay":
    pool = captured()
else:
    key = hashlib.blake2s(b"mac1----" + base64.b64decode(extra)).digest()
    pool = []
    for _ in range(1024):
        body = b"\x01\0\0\0" + rng.randbytes(112)
        pool.append(body + hashlib.blake2s(body, key=key, digest_size=16).digest() + bytes(16))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
total, sent, replies = int(rate * seconds), 0, 0
start = time.monotonic()
def receive():
    global replies
    try:
        while True:
            replies += s.recv(2048)[:1] == b"\x03"
    except BlockingIOError:
        pass
print("flooding", file=sys.stderr, flush=True)
i = 0
while i < total and time.monotonic() < start + seconds + 1:
    due = start + i / rate
    now = time.monotonic()
    if now < due:
        time.sleep(due - now)
    for _ in range(32):
        try:
            s.sendto(pool[i % len(pool)], (host, port))
            sent += 1
        except BlockingIOError:
            pass
        i += 1
    receive()
time.sleep(0.3)
receive()
print(sent, replies, round(time.process_time() * 1000))
"#;

/// Accepts one TCP connection on argv[1]:argv[2] and prints the bytes
/// received and the seconds from the first to the end.
const TCP_RATE_SINK: &str = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(20)
c, _ = s.accept()
c.settimeout(20)
buf = bytearray(1 << 20)
n = c.recv_into(buf)
first = time.monotonic()
while True:
    got = c.recv_into(buf)
    if not got:
        break
    n += got
print(n, time.monotonic() - first)
"#;

/// Sends to argv[1]:argv[2] (retrying the connection for 10 s) for argv[3]
/// seconds, as fast as TCP goes.
const TCP_RATE_SOURCE: &str = r#"
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.time() + 10
while True:
    try:
        c = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.1)
c.settimeout(20)
chunk = bytes(1 << 18)
end = time.monotonic() + seconds
while time.monotonic() < end:
    c.sendall(chunk)
c.close()
"#;

/// A flood from the attacker's namespace at B's gateway (see [`FLOOD`]).
struct Flood<'a> {
    kind: &'static str,
    attacker: &'a str,
    target: &'a str,
    extra: &'a str,
}

/// One measured transfer.
struct Measured {
    /// Under which flood, if any.
    flood: Option<&'static str>,
    gbit_s: f64,
    /// CPU time of B's gateway during the transfer.
    cpu_ms: u64,
    /// Datagrams the flooder sent.
    sent: u64,
    /// Cookie replies it received.
    replies: u64,
    /// CPU time the flooder used (it shares the machine's cores).
    attacker_cpu_ms: u64,
}

/// A VM: a namespace with `eth0` in a site's bridge.
#[derive(Debug, Clone)]
struct Vm {
    ns: String,
    ip: String,
    mac: String,
    number: u8,
}

/// One site's gateway: its key, config and process.
struct Gateway {
    key: PathBuf,
    public_key: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// `busy_poll` for its config file, if set.
    busy_poll: Option<&'static str>,
    /// `nice` for its config file, if set.
    nice: Option<i32>,
}

/// Namespaces, links and processes of one test; all removed on drop.
struct Lab {
    /// Held while the lab lives (released after its cleanup): shared, or
    /// alone for a test that measures throughput.
    _turn: Turn,
    id: String,
    dir: tempfile::TempDir,
    namespaces: Vec<String>,
    hub: String,
    sites: Vec<String>,
    gateways: Vec<Gateway>,
}

impl Lab {
    /// A new lab, or `None` (after saying why) where namespaces cannot be
    /// made; under `CI=true` that is a failure.
    fn new() -> Option<Lab> {
        let turn = TURNS.read().unwrap_or_else(PoisonError::into_inner);
        Lab::with_turn(Turn::Shared { _guard: turn })
    }

    /// Like [`Lab::new`], once no other lab of this process runs, and none
    /// starts until this one is gone: for measurements that other tests'
    /// traffic and CPU would skew.
    fn alone() -> Option<Lab> {
        let turn = TURNS.write().unwrap_or_else(PoisonError::into_inner);
        Lab::with_turn(Turn::Alone { _guard: turn })
    }

    fn with_turn(turn: Turn) -> Option<Lab> {
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let id = format!("vo{}n{n}", std::process::id());
        match prerequisites(&id) {
            Ok(()) => {}
            Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("the overlay tests cannot run under CI=true: {why}")
            }
            Err(why) => {
                eprintln!("skipping the overlay namespace test: {why}");
                return None;
            }
        }
        let mut lab = Lab {
            _turn: turn,
            hub: format!("{id}-wan"),
            id,
            dir: tempfile::tempdir().unwrap(),
            namespaces: Vec::new(),
            sites: Vec::new(),
            gateways: Vec::new(),
        };
        let hub = lab.hub.clone();
        lab.add_namespace(&hub);
        ip(&["-n", &hub, "link", "add", "wan", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "wan", "up"]);
        Some(lab)
    }

    /// `count` sites on the WAN, each with a site bridge `brs`, returning
    /// their indices.
    fn sites(&mut self, count: usize) -> Vec<usize> {
        (0..count)
            .map(|_| {
                let index = self.sites.len();
                let ns = format!("{}-s{index}", self.id);
                self.add_namespace(&ns);
                let port = format!("p{index}");
                ip(&[
                    "-n", &ns, "link", "add", "wan", "type", "veth", "peer", "name", &port,
                    "netns", &self.hub,
                ]);
                ip(&["-n", &self.hub, "link", "set", &port, "master", "wan", "up"]);
                let address = format!("{}/24", wan_ip(index));
                ip(&["-n", &ns, "addr", "add", &address, "dev", "wan"]);
                ip(&["-n", &ns, "link", "set", "wan", "up"]);
                ip(&["-n", &ns, "link", "add", "brs", "type", "bridge"]);
                ip(&["-n", &ns, "link", "set", "brs", "up"]);
                self.sites.push(ns);
                index
            })
            .collect()
    }

    /// An attacker's namespace on the WAN, at [`ATTACKER_IP`].
    fn attacker(&mut self) -> String {
        let ns = format!("{}-atk", self.id);
        self.add_namespace(&ns);
        ip(&[
            "-n", &ns, "link", "add", "wan", "type", "veth", "peer", "name", "pa", "netns",
            &self.hub,
        ]);
        ip(&["-n", &self.hub, "link", "set", "pa", "master", "wan", "up"]);
        let address = format!("{ATTACKER_IP}/24");
        ip(&["-n", &ns, "addr", "add", &address, "dev", "wan"]);
        ip(&["-n", &ns, "link", "set", "wan", "up"]);
        ns
    }

    /// A transfer from `from` to `to` for [`TRANSFER_FOR`] (under `flood`
    /// if given), with the CPU time gateway process `gateway_pid` used
    /// meanwhile.
    fn measure(&self, from: &Vm, to: &Vm, gateway_pid: u32, flood: Option<Flood<'_>>) -> Measured {
        let flooder = flood.as_ref().map(|flood| {
            let rate = FLOOD_RATE.to_string();
            let seconds = FLOOD_FOR.as_secs_f64().to_string();
            let mut flooder = self.spawn_in(
                flood.attacker,
                &[
                    "python3",
                    "-c",
                    FLOOD,
                    flood.kind,
                    flood.target,
                    &GATEWAY_PORT.to_string(),
                    &rate,
                    &seconds,
                    flood.extra,
                ],
            );
            // It says when it starts (bounded: it runs under `timeout`).
            let mut stderr = BufReader::new(flooder.stderr.take().unwrap());
            let mut line = String::new();
            stderr.read_line(&mut line).unwrap();
            if line.trim() != "flooding" {
                stderr.read_to_string(&mut line).unwrap();
                panic!("the {} flooder did not start: {line}", flood.kind);
            }
            flooder
        });
        let cpu_started = cpu_ms(gateway_pid);
        let gbit_s = self.transfer(from, to, TRANSFER_FOR);
        let cpu_ms = cpu_ms(gateway_pid) - cpu_started;
        let (mut sent, mut replies, mut attacker_cpu_ms) = (0, 0, 0);
        if let Some(flooder) = flooder {
            let out = wait_output(flooder, Duration::from_secs(10));
            let text = String::from_utf8_lossy(&out.stdout);
            let numbers: Vec<u64> = text
                .split_whitespace()
                .map(|n| n.parse().unwrap())
                .collect();
            [sent, replies, attacker_cpu_ms] = numbers[..].try_into().unwrap();
        }
        Measured {
            flood: flood.map(|flood| flood.kind),
            gbit_s,
            cpu_ms,
            sent,
            replies,
            attacker_cpu_ms,
        }
    }

    /// A TCP transfer from `from` to `to` for `duration`, as fast as it
    /// goes; returns its throughput in Gbit/s.
    fn transfer(&self, from: &Vm, to: &Vm, duration: Duration) -> f64 {
        let sink = self.spawn_in(&to.ns, &["python3", "-c", TCP_RATE_SINK, &to.ip, "5002"]);
        let seconds = duration.as_secs_f64().to_string();
        let sent = self.run_in(
            &from.ns,
            &["python3", "-c", TCP_RATE_SOURCE, &to.ip, "5002", &seconds],
        );
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        let out = wait_output(sink, Duration::from_secs(30));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut fields = text.split_whitespace();
        let (Some(bytes), Some(seconds)) = (fields.next(), fields.next()) else {
            panic!(
                "the sink printed {text:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let bytes: f64 = bytes.parse().unwrap();
        let seconds: f64 = seconds.parse().unwrap();
        bytes * 8.0 / seconds.max(1e-3) / 1e9
    }

    /// A VM numbered `number` (its address is 198.19.0.`number`) on
    /// `bridge` of site `site`; the bridge is made if it is missing.
    fn vm(&mut self, site: usize, bridge: &str, number: u8) -> Vm {
        let vm = Vm {
            ns: format!("{}-vm{number}", self.id),
            ip: format!("198.19.0.{number}"),
            mac: format!("02:00:00:00:00:{number:02x}"),
            number,
        };
        self.add_namespace(&vm.ns);
        self.plug(&vm, site, bridge);
        ip(&["-n", &vm.ns, "link", "set", "eth0", "address", &vm.mac]);
        let address = format!("{}/16", vm.ip);
        ip(&["-n", &vm.ns, "addr", "add", &address, "dev", "eth0"]);
        ip(&["-n", &vm.ns, "link", "set", "eth0", "up"]);
        vm
    }

    /// Moves `vm` to `bridge` at `site`: its old port goes away and a new
    /// one, with the same MAC and address, comes up.
    fn move_vm(&mut self, vm: Vm, site: usize, bridge: &str) -> Vm {
        ip(&["-n", &vm.ns, "link", "del", "eth0"]);
        self.plug(&vm, site, bridge);
        ip(&["-n", &vm.ns, "link", "set", "eth0", "address", &vm.mac]);
        let address = format!("{}/16", vm.ip);
        ip(&["-n", &vm.ns, "addr", "add", &address, "dev", "eth0"]);
        ip(&["-n", &vm.ns, "link", "set", "eth0", "up"]);
        vm
    }

    /// A veth from `bridge` at `site` to `eth0` in the VM's namespace.
    fn plug(&mut self, vm: &Vm, site: usize, bridge: &str) {
        let ns = self.sites[site].clone();
        if !self.link_exists(site, bridge) {
            ip(&["-n", &ns, "link", "add", bridge, "type", "bridge"]);
            ip(&["-n", &ns, "link", "set", bridge, "up"]);
        }
        let port = format!("vm{}", vm.number);
        ip(&[
            "-n", &ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &vm.ns,
        ]);
        ip(&["-n", &ns, "link", "set", &port, "master", bridge, "up"]);
    }

    /// Starts a full mesh of gateways at `sites`, each carrying every
    /// segment `(id, site bridge)` in bridge mode.
    fn start_mesh(&mut self, sites: &[usize], segments: &[(u32, &str)]) {
        let segments: Vec<(u32, Option<&str>)> =
            segments.iter().map(|(id, br)| (*id, Some(*br))).collect();
        self.start_mesh_with(sites, &segments);
    }

    /// Like [`Lab::start_mesh`]; a segment without a bridge runs in
    /// segment-bridge mode.
    fn start_mesh_with(&mut self, sites: &[usize], segments: &[(u32, Option<&str>)]) {
        for site in sites {
            self.ensure_key(*site);
        }
        for site in sites {
            self.configure(*site, segments);
        }
        for site in sites {
            self.start_gateway(*site);
        }
    }

    /// Gives site `site` a key (once).
    fn ensure_key(&mut self, site: usize) {
        while self.gateways.len() <= site {
            let index = self.gateways.len();
            let key = self.dir.path().join(format!("site{index}.key"));
            let public_key = genkey(&key);
            self.gateways.push(Gateway {
                key,
                public_key,
                config: self.dir.path().join(format!("site{index}.toml")),
                log: self.dir.path().join(format!("site{index}.log")),
                child: None,
                busy_poll: None,
                nice: None,
            });
        }
    }

    /// Gives site `site`'s gateway a new private key, leaving its peers
    /// with the old public key.
    fn replace_key(&mut self, site: usize) {
        self.ensure_key(site);
        let fresh = self.dir.path().join(format!("site{site}-other.key"));
        genkey(&fresh);
        let old_public = self.gateways[site].public_key.clone();
        self.gateways[site].key = fresh;
        // The peers keep expecting the old key.
        self.gateways[site].public_key = old_public;
    }

    /// Writes the config of site `site`: every other site with a key is a
    /// peer of every segment.
    fn configure(&mut self, site: usize, segments: &[(u32, Option<&str>)]) {
        self.ensure_key(site);
        let gateway = &self.gateways[site];
        let mut text = format!(
            "private_key_file = {:?}\nlisten = \"{}:{GATEWAY_PORT}\"\n",
            gateway.key.display().to_string(),
            wan_ip(site)
        );
        if let Some(busy_poll) = gateway.busy_poll {
            text.push_str(&format!("busy_poll = {busy_poll:?}\n"));
        }
        if let Some(nice) = gateway.nice {
            text.push_str(&format!("nice = {nice}\n"));
        }
        let peers: Vec<usize> = (0..self.gateways.len()).filter(|p| *p != site).collect();
        for peer in &peers {
            text.push_str(&format!(
                "[[peers]]\nindex = {}\npublic_key = \"{}\"\nendpoint = \"{}:{GATEWAY_PORT}\"\n",
                peer + 1,
                self.gateways[*peer].public_key,
                wan_ip(*peer)
            ));
        }
        let indices: Vec<String> = peers.iter().map(|p| (p + 1).to_string()).collect();
        for (id, bridge) in segments {
            text.push_str(&format!(
                "[[segments]]\nid = {id}\npeers = [{}]\n",
                indices.join(", ")
            ));
            if let Some(bridge) = bridge {
                text.push_str(&format!("bridge = \"{bridge}\"\n"));
            }
        }
        std::fs::write(&gateway.config, text).unwrap();
    }

    /// Starts site `site`'s gateway in its namespace.
    fn start_gateway(&mut self, site: usize) {
        let ns = self.sites[site].clone();
        let gateway = &mut self.gateways[site];
        assert!(gateway.child.is_none(), "gateway {site} already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&gateway.log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, vcfed_bin(), "gateway", "--config"])
            .arg(&gateway.config)
            .env(
                "RUST_LOG",
                "info,boringtun=error,netlink_packet_route=error",
            )
            .env("VCFED_LOG_FORMAT", "text")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        gateway.child = Some(child);
    }

    /// SIGKILLs site `site`'s gateway.
    fn kill_gateway(&mut self, site: usize) {
        let mut child = self.gateways[site].child.take().expect("the gateway runs");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERMs site `site`'s gateway, waits (bounded) for a clean exit and
    /// returns its log.
    fn stop_gateway(&mut self, site: usize) -> String {
        let mut child = self.gateways[site].child.take().expect("the gateway runs");
        common::signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gateway {site} ignored SIGTERM for 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(&self.gateways[site].log).unwrap_or_default();
        assert!(
            status.success(),
            "gateway {site} exited with {status}: {log}"
        );
        log
    }

    /// Waits (bounded) for site `site`'s gateway to exit by itself and
    /// returns its status and log.
    fn wait_exit(&mut self, site: usize, within: Duration) -> (std::process::ExitStatus, String) {
        let mut child = self.gateways[site].child.take().expect("the gateway runs");
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gateway {site} still runs after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(&self.gateways[site].log).unwrap_or_default();
        (status, log)
    }

    /// Runs a command in namespace `ns` to completion.
    fn run_in(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Starts a command in namespace `ns`, bounded by `timeout 30`; the
    /// caller waits for it with [`wait_output`].
    fn spawn_in(&self, ns: &str, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", ns, "timeout", "30"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// One ping from `from` to `to`, waiting at most 0.3 s for the answer
    /// (callers retry; a short wait measures recovery times finely).
    fn ping(&self, from: &Vm, to: &Vm) -> bool {
        self.run_in(&from.ns, &["ping", "-c", "1", "-W", "0.3", "-q", &to.ip])
            .status
            .success()
    }

    /// Pings until one answers, at most `within`; returns how long it took.
    fn eventually_ping(&self, from: &Vm, to: &Vm, within: Duration) -> Duration {
        let what = format!("ping {} -> {}", from.ip, to.ip);
        self.eventually(&what, within, || self.ping(from, to))
    }

    /// Pings for `duration` and fails if any answer comes back.
    fn never_ping(&self, from: &Vm, to: &Vm, duration: Duration) {
        let started = Instant::now();
        while started.elapsed() < duration {
            assert!(
                !self.ping(from, to),
                "ping {} -> {} got through",
                from.ns,
                to.ns
            );
        }
    }

    /// Polls `check` every 100 ms until it holds, at most `within`.
    fn eventually(
        &self,
        what: &str,
        within: Duration,
        mut check: impl FnMut() -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            if check() {
                return started.elapsed();
            }
            if started.elapsed() > within {
                panic!("{what}: not within {within:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The gateways' logs, for failure messages.
    fn logs(&self) -> String {
        self.gateways
            .iter()
            .enumerate()
            .map(|(i, g)| {
                format!(
                    "--- gateway {i} ---\n{}",
                    std::fs::read_to_string(&g.log).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Names of the links at `site` that start with `prefix`, sorted.
    fn links_with_prefix(&self, site: usize, prefix: &str) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.sites[site], "-o", "link", "show"])
            .output()
            .unwrap();
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .filter(|name| name.starts_with(prefix))
            .collect();
        names.sort();
        names
    }

    fn link_exists(&self, site: usize, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.sites[site], "link", "show", "dev", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    fn add_namespace(&mut self, ns: &str) {
        ip(&["netns", "add", ns]);
        self.namespaces.push(ns.to_owned());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for gateway in &mut self.gateways {
            if let Some(mut child) = gateway.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The WAN address of site `index`.
fn wan_ip(index: usize) -> String {
    format!("198.18.0.{}", index + 1)
}

/// Writes a new key with `vcfed gateway genkey`, returning its public key.
fn genkey(path: &Path) -> String {
    let out = Command::new(vcfed_bin())
        .args(["gateway", "genkey", "--out"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Runs `ip args...` and fails the test if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        common::stderr(&out)
    );
}

/// Waits at most `within` for `child` to finish and returns its output.
fn wait_output(mut child: Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "a helper process ran longer than {within:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of counter `name` in the gateway's "gateway stopped" line.
fn counter(log: &str, name: &str) -> u64 {
    let log = strip_ansi(log);
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains("gateway stopped"))
        .unwrap_or_else(|| panic!("no \"gateway stopped\" line in:\n{log}"));
    let pattern = format!("{name}=");
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(&pattern))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// The throughput of flood row `i` as a share of the mean of the rows
/// without a flood on either side.
fn kept(rows: &[Measured], i: usize) -> f64 {
    let baseline = (rows[i - 1].gbit_s + rows[i + 1].gbit_s) / 2.0;
    rows[i].gbit_s / baseline
}

/// CPU time (user and system) process `pid` has used, ms.
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime, fields 14 and 15 of proc(5), in clock ticks of
    // 10 ms (USER_HZ is 100 on Linux).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks * 10
}

/// The name and niceness of each thread of process `pid`.
fn thread_niceness(pid: u32) -> Vec<(String, i32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap();
        let stat = std::fs::read_to_string(path.join("stat")).unwrap();
        // Field 19 of proc(5), the 17th after the command name.
        let nice = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .nth(16)
            .unwrap();
        threads.push((name.trim().to_owned(), nice.parse().unwrap()));
    }
    threads
}

/// `text` without ANSI escape sequences (colours in the logs).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Whether this machine can run the lab: root, `ip netns`, ping, python3.
fn prerequisites(id: &str) -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("cannot run id(1): {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root (network namespaces need CAP_SYS_ADMIN)".to_owned());
    }
    let probe = format!("{id}-probe");
    let added = Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .map_err(|e| format!("cannot run ip(8): {e} (install iproute2)"))?;
    if !added.status.success() {
        return Err(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&added.stderr).trim()
        ));
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    for (tool, args, package) in [
        ("ping", &["-V"][..], "iputils-ping"),
        ("python3", &["-c", "pass"][..], "python3"),
    ] {
        let works = Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !works {
            return Err(format!("{tool} is missing (install {package})"));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing".to_owned());
    }
    Ok(())
}

#[test]
fn sighup_changes_segments_without_a_restart() {
    let Some(mut lab) = Lab::new() else { return };
    let sites = lab.sites(2);
    lab.start_mesh_with(&sites, &[(7, None)]);
    for site in &sites {
        lab.eventually("segment 7 is set up", FIRST_TRAFFIC_WITHIN, || {
            lab.link_exists(*site, "vcfb7")
        });
    }
    let a = lab.vm(sites[0], "vcfb7", 1);
    let b = lab.vm(sites[1], "vcfb7", 2);
    lab.eventually_ping(&a, &b, FIRST_TRAFFIC_WITHIN);
    let pid = lab.gateways[1].child.as_ref().unwrap().id();

    // Site 1 adds segment 8: it appears, and segment 7 keeps working.
    lab.configure(1, &[(7, None), (8, None)]);
    common::signal(pid, "HUP");
    lab.eventually("segment 8 is added", FIRST_TRAFFIC_WITHIN, || {
        lab.links_with_prefix(sites[1], "vcf") == ["vcfb7", "vcfb8", "vcft7", "vcft8"]
    });
    lab.eventually_ping(&a, &b, RECOVERY_WITHIN);

    // A file that does not load changes nothing.
    std::fs::write(&lab.gateways[1].config, "not = [valid").unwrap();
    common::signal(pid, "HUP");
    lab.eventually_ping(&a, &b, RECOVERY_WITHIN);

    // Segment 7 goes: its links go, the gateway keeps running.
    lab.configure(1, &[(8, None)]);
    common::signal(pid, "HUP");
    lab.eventually("segment 7 is removed", FIRST_TRAFFIC_WITHIN, || {
        lab.links_with_prefix(sites[1], "vcf") == ["vcfb8", "vcft8"]
    });
    assert_eq!(lab.gateways[1].child.as_ref().unwrap().id(), pid);
    let log = lab.stop_gateway(1);
    assert!(log.contains("keeping the running one"), "{log}");
    assert_eq!(lab.links_with_prefix(sites[1], "vcf"), Vec::<String>::new());
}
