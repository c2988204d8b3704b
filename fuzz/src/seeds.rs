//! The seed corpus: real values, encoded as peers, kernels and operators
//! send them. `VCFED_WRITE_SEEDS=1` writes them under `corpus/<target>/`;
//! without it the test checks that the committed files are these bytes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use vcfed::api_types::{CreateClusterBody, HoldBody, InstantArg, JoinBody, OwnerBody};
use vcfed::config::{InitParams, render_template};
use vcfed_node_core::cluster::{ClusterMsg, ReportedNode};
use vcfed_overlay::encap::{Encapsulator, INNER_MTU_DEFAULT};
use vcfed_overlay::offload::{F_NEEDS_CSUM, GSO_TCPV4, Offload};
use vcfed_registry::wire::{self, DigestEntry, Message};
use vcfed_storage::{ClusterPart, GatewayRef, NodeShape, PartState, Window};

use super::*;

/// Every target's seeds, by name.
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut all = Vec::new();
    let mut add = |target, name, bytes| all.push((target, name, bytes));

    // registry_wire: one message of each kind, then a conversation.
    let peer = |site| keypair(site).public().to_peer_id();
    let digest = vec![
        DigestEntry {
            site: peer(1),
            version: 5,
        },
        DigestEntry {
            site: peer(4),
            version: 9,
        },
    ];
    add(
        "registry_wire",
        "advert",
        wire::encode(&Message::Advert(signed_advert(4, 1))),
    );
    add(
        "registry_wire",
        "digest",
        wire::encode(&Message::Digest(digest.clone())),
    );
    add(
        "registry_wire",
        "pull",
        wire::encode(&Message::Pull(vec![peer(1), peer(2)])),
    );
    add(
        "registry_wire",
        "cluster",
        wire::encode(&Message::Cluster(reserve().encode())),
    );
    let mut conversation = Vec::new();
    let buckets = Message::DigestBuckets {
        count: 4,
        hashes: vec![1, 2, 3, 4],
    };
    push_record(&mut conversation, 1, &wire::encode(&buckets));
    let part = Message::DigestPart {
        buckets: 4,
        differing: vec![0, 3],
        entries: digest,
    };
    push_record(&mut conversation, 2, &wire::encode(&part));
    push_record(
        &mut conversation,
        0,
        &wire::encode(&Message::Advert(signed_advert(5, 2))),
    );
    push_record(
        &mut conversation,
        1,
        &wire::encode(&Message::DigestHash { hash: 7, count: 3 }),
    );
    push_record(&mut conversation, 0b0101_0011, &[]);
    add("registry_core", "conversation", conversation);

    // registry_advert: a body, and a signed advert.
    let mut body = vec![0];
    body.extend(postcard::to_allocvec(&advert(1, 5)).expect("encoding into a Vec"));
    add("registry_advert", "body", body);
    let mut signed = vec![1];
    signed.extend(postcard::to_allocvec(&signed_advert(1, 5)).expect("encoding into a Vec"));
    add("registry_advert", "signed", signed);

    // cluster_msg: the protocol's messages, bare and in the envelope.
    add("cluster_msg", "reserve", reserve().encode());
    add("cluster_msg", "commit", commit().encode());
    let nodes = ClusterMsg::Nodes {
        cluster: "c-00aa".into(),
        nodes: vec![ReportedNode {
            index: 2,
            frontend: false,
            state_json: r#"{"state":"running"}"#.into(),
        }],
    };
    add("cluster_msg", "nodes", nodes.encode());
    add(
        "cluster_msg",
        "held-enveloped",
        wire::encode(&Message::Cluster(
            ClusterMsg::Held {
                cluster: "c-00aa".into(),
                attempt: 1,
                lease_expires_at_ms: 1_000_030_000,
                gateway: Some(gateway()),
            }
            .encode(),
        )),
    );

    // cluster_worker: a master reserves, commits, reports and releases;
    // another reserves more than is left.
    let enveloped = |msg: &ClusterMsg| wire::encode(&Message::Cluster(msg.encode()));
    let mut exchange = Vec::new();
    push_record(&mut exchange, 1, &enveloped(&reserve()));
    push_record(&mut exchange, 1 | 1 << 2, &enveloped(&commit()));
    push_record(&mut exchange, 1, &enveloped(&nodes));
    push_record(&mut exchange, 2, &enveloped(&reserve()));
    push_record(
        &mut exchange,
        1 | 40 << 2,
        &enveloped(&ClusterMsg::Release {
            cluster: "c-00aa".into(),
            attempt: 1,
        }),
    );
    add("cluster_worker", "exchange", exchange);

    // rpc_frame: frames of registry messages, read whole and trickled.
    let frame = |payload: &[u8]| {
        let mut out = u32::try_from(payload.len())
            .expect("small")
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(payload);
        out
    };
    let mut stream = vec![0, 0];
    stream.extend(frame(&wire::encode(&Message::Ack)));
    stream.extend(frame(&[]));
    stream.extend(frame(&wire::encode(&Message::Cluster(reserve().encode()))));
    add("rpc_frame", "frames", stream);
    let mut trickled = vec![3, 1];
    trickled.extend(frame(&wire::encode(&Message::InSync)));
    add("rpc_frame", "trickled", trickled);

    // overlay_decap: inner packets as the far gateway makes them.
    let packets = |offload: Offload, frame: &[u8], mtu: usize| {
        let mut encapsulator = Encapsulator::new(
            Ipv4Addr::new(169, 254, 77, 1),
            Ipv4Addr::new(169, 254, 77, 2),
            mtu,
        );
        let mut out = Vec::new();
        encapsulator
            .encapsulate(100, offload, frame, |packet| out.push(packet.to_vec()))
            .expect("the frame fits");
        out
    };
    let small = ethernet([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], 60);
    let full = ethernet([0xff; 6], [2, 0, 0, 0, 0, 2], 1514);
    let mut sequence = Vec::new();
    for packet in packets(Offload::NONE, &small, INNER_MTU_DEFAULT) {
        push_record(&mut sequence, 1, &packet);
    }
    // Fragments out of order, then the timer.
    for packet in packets(Offload::NONE, &full, INNER_MTU_DEFAULT)
        .iter()
        .rev()
    {
        push_record(&mut sequence, 3, packet);
    }
    push_record(&mut sequence, 255, &[]);
    add("overlay_decap", "whole-and-fragments", sequence);
    let super_frame = ethernet([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], 3000);
    let mut sequence = Vec::new();
    for packet in packets(tcp_offload(), &super_frame, 600) {
        push_record(&mut sequence, 1, &packet);
    }
    add("overlay_decap", "super-frame", sequence);

    // overlay_frame: metadata and a frame.
    let mut plain = Offload::NONE.to_wire().to_vec();
    plain.extend_from_slice(&small);
    add("overlay_frame", "plain", plain);
    let mut gso = tcp_offload().to_wire().to_vec();
    gso.extend_from_slice(&super_frame);
    add("overlay_frame", "super-frame", gso);
    let mut tagged = Offload::NONE.to_wire().to_vec();
    tagged.extend(vcfed_overlay::frame::tag_vlan(&small, 100));
    add("overlay_frame", "tagged", tagged);

    // overlay_switch: peers join, addresses are learnt, a peer leaves.
    let a = ethernet([0xff; 6], [2, 0, 0, 0, 0, 0xa], 60);
    let b_to_a = ethernet([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb], 60);
    let a_to_b = ethernet([2, 0, 0, 0, 0, 0xb], [2, 0, 0, 0, 0, 0xa], 60);
    let mut ops = Vec::new();
    push_record(&mut ops, 4 | 1 << 3, &[]);
    push_record(&mut ops, 4 | 2 << 3, &[]);
    push_record(&mut ops, 0, &a);
    push_record(&mut ops, 2 | 1 << 3, &b_to_a);
    push_record(&mut ops, 0, &a_to_b);
    push_record(&mut ops, 6, &[50]);
    push_record(&mut ops, 5 | 1 << 3, &[]);
    push_record(&mut ops, 0, &a_to_b);
    push_record(&mut ops, 7, &[]);
    add("overlay_switch", "learn-and-leave", ops);

    // api_json: the request bodies, as the CLI sends them.
    let json = |kind: u8, value: serde_json::Value| {
        let mut out = vec![kind];
        out.extend(serde_json::to_vec(&value).expect("JSON"));
        out
    };
    let hold = HoldBody {
        key: "k-1".into(),
        cluster_id: "c-00aa".into(),
        requester: None,
        start: InstantArg::Text("+1h".into()),
        end: InstantArg::Ms(1_764_010_000_000),
        nodes: 2,
        shape: Some(shape()),
        lease_s: Some(60),
    };
    add(
        "api_json",
        "hold",
        json(0, serde_json::to_value(&hold).expect("JSON")),
    );
    let owner = OwnerBody {
        requester: Some("site-b".into()),
    };
    add(
        "api_json",
        "owner",
        json(1, serde_json::to_value(&owner).expect("JSON")),
    );
    let join = JoinBody {
        addr: format!("/ip4/198.18.0.1/tcp/7781/p2p/{}", peer(1)),
    };
    add(
        "api_json",
        "join",
        json(2, serde_json::to_value(&join).expect("JSON")),
    );
    let create = CreateClusterBody {
        name: "hpc".into(),
        nodes: 6,
        cores: Some(2),
        memory_mib: None,
        disk_gib: None,
        start: Some(InstantArg::Text("2026-11-24T10:00:00Z".into())),
        duration: "2h 30m".into(),
        image: Some("debian".into()),
        heal: None,
    };
    add(
        "api_json",
        "create",
        json(3, serde_json::to_value(&create).expect("JSON")),
    );

    // site_config: the file `vcfed init` writes.
    let mut init = InitParams::new("site-a".into(), "/var/lib/vcfed".into());
    add("site_config", "init", render_template(&init).into_bytes());
    init.bootstrap = vec![
        format!("/ip4/198.18.0.2/tcp/7781/p2p/{}", peer(2))
            .parse()
            .expect("a multiaddr"),
    ];
    add(
        "site_config",
        "init-bootstrap",
        render_template(&init).into_bytes(),
    );

    // gateway_config: the module's example, bridge and trunk mode.
    add(
        "gateway_config",
        "bridge",
        GATEWAY_BRIDGE.as_bytes().to_vec(),
    );
    add("gateway_config", "trunk", GATEWAY_TRUNK.as_bytes().to_vec());
    all
}

const GATEWAY_BRIDGE: &str = r#"private_key_file = "tunnel.key"
listen = "0.0.0.0:7782"
inner_mtu = 1440
link_prefix = "vcf"

[[peers]]
index = 2
public_key = "hDWyl8Q0ezyS1N2+9a1S9Vw3lw4J8KXxFIpcKmQFEz4="
endpoint = "198.18.0.7:7782"

[[segments]]
id = 100
peers = [2]
bridge = "br-site"
"#;

const GATEWAY_TRUNK: &str = r#"private_key_file = "/etc/vcfed/tunnel.key"
listen = "198.18.0.1:7782"

[[peers]]
index = 2
public_key = "hDWyl8Q0ezyS1N2+9a1S9Vw3lw4J8KXxFIpcKmQFEz4="

[[peers]]
index = 3
public_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
endpoint = "198.18.0.9:7782"

[[segments]]
id = 7
peers = [2, 3]
trunk = "eth1"
vlan = 100

[[segments]]
id = 8
peers = [3]
"#;

fn shape() -> NodeShape {
    NodeShape {
        cores: 2,
        memory_mib: 4096,
        disk_gib: 20,
    }
}

fn gateway() -> GatewayRef {
    GatewayRef {
        endpoint: "198.18.0.1:7782".into(),
        public_key: "hDWyl8Q0ezyS1N2+9a1S9Vw3lw4J8KXxFIpcKmQFEz4=".into(),
    }
}

fn reserve() -> ClusterMsg {
    ClusterMsg::Reserve {
        cluster: "c-00aa".into(),
        name: "hpc".into(),
        attempt: 1,
        nodes: 3,
        shape: shape(),
        window: Window::new(1_000_000, 8_200_000).expect("a window"),
        lease_ms: 30_000,
        segment: 100,
        gateway: Some(gateway()),
    }
}

fn commit() -> ClusterMsg {
    let part = |site: &str, nodes, first| ClusterPart {
        site: site.into(),
        peer_id: Some(keypair(1).public().to_peer_id().to_string()),
        attempt: 1,
        nodes,
        frontend: first == 1,
        state: PartState::Committed,
        reservation_key: Some(format!("c-00aa/{site}")),
        gateway: Some(gateway()),
        first_node: Some(first),
        lost_at_ms: None,
    };
    ClusterMsg::Commit {
        cluster: "c-00aa".into(),
        name: "hpc".into(),
        nodes: 6,
        attempt: 1,
        segment: 100,
        epoch: 2,
        parts: vec![part("site-a", 3, 1), part("site-b", 3, 4)],
    }
}

/// The metadata of a TCP/IPv4 super-frame.
fn tcp_offload() -> Offload {
    Offload {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 66,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    }
}

/// An IPv4 Ethernet frame of `len` bytes.
fn ethernet(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend((14..len).map(|i| u8::try_from(i % 251).expect("below 251")));
    frame
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// The configuration seeds are files the parsers accept: a fuzzer that
/// starts from an accepted file reaches every check behind the syntax.
#[test]
fn configuration_seeds_are_accepted() {
    let init = render_template(&InitParams::new("site-a".into(), "/var/lib/vcfed".into()));
    if let Err(e) = vcfed::config::Config::parse(&init, Path::new("/etc/vcfed/vcfed.toml")) {
        panic!("{e}");
    }
    for text in [GATEWAY_BRIDGE, GATEWAY_TRUNK] {
        let parsed = vcfed::gateway_config::parse_with_key_reader(
            text,
            Path::new("/etc/vcfed/gateway.toml"),
            |_| Ok([7; 32]),
        );
        if let Err(e) = parsed {
            panic!("{e}\n{text}");
        }
    }
}

#[test]
fn write() {
    let rewrite = std::env::var_os("VCFED_WRITE_SEEDS").is_some();
    for (target, name, bytes) in seeds() {
        let dir = corpus().join(target);
        let path = dir.join(format!("seed-{name}"));
        if rewrite {
            std::fs::create_dir_all(&dir).expect("corpus directory");
            std::fs::write(&path, &bytes).expect("seed written");
        } else {
            let committed =
                std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                committed == bytes,
                "{} is stale: run VCFED_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml",
                path.display()
            );
        }
    }
}
