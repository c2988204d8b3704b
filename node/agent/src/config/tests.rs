//! Tests of loading the site configuration: every rule, and where each error points.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;

use super::diagnostics::line_column;
use super::*;

const PATH: &str = "/etc/vcfed/vcfed.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(PATH))
}

fn parse_err(text: &str) -> ConfigError {
    match parse(text) {
        Ok(config) => panic!("config was accepted: {config:?}\n---\n{text}"),
        Err(e) => e,
    }
}

/// Asserts where an error points and that its message and hint say what they should.
#[track_caller]
fn assert_error(e: &ConfigError, line: usize, field: &str, message: &str) {
    assert_eq!(e.path, Path::new(PATH), "{e}");
    assert_eq!(e.line, Some(line), "{e}");
    assert!(e.column.is_some(), "{e}");
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(
        e.message.contains(message),
        "message {:?} lacks {message:?}",
        e.message
    );
}

/// A valid config with `[site]` on line 1 and every section on a known line, with `extra`
/// appended; tests that break one section write their own text instead.
fn minimal(extra: &str) -> String {
    format!(
        "[site]\n\
         name = \"site-a\"\n\
         data_dir = \"data\"\n\
         \n\
         [inventory]\n\
         node = {{ cores = 2, memory_mib = 4096, disk_gib = 20 }}\n\
         nodes = 4\n\
         \n\
         [clusters]\n\
         vlans = \"100-199\"\n\
         {extra}"
    )
}

const PEER: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

#[test]
fn template_round_trips_defaults() {
    let params = InitParams::new("site-a".to_owned(), PathBuf::from("/var/lib/vcfed"));
    let config = parse(&render_template(&params)).expect("template parses");

    assert_eq!(config.site.name, "site-a");
    assert_eq!(config.site.data_dir, Path::new("/var/lib/vcfed"));
    assert_eq!(config.api.listen, params.api_listen);
    assert_eq!(config.api.token_file, Path::new("/var/lib/vcfed/api.token"));
    assert_eq!(config.federation.listen, params.federation_listen);
    assert!(config.federation.bootstrap.is_empty());
    assert_eq!(config.federation.psk_file, None);
    assert!(config.federation.allow_peers.is_empty());
    assert_eq!(config.inventory.node, params.node);
    assert_eq!(config.inventory.source, InventorySource::Nodes(4));
    assert_eq!(config.clusters.vlans, params.vlans);
    assert_eq!(config.gateway.listen, params.gateway_listen);
    assert_eq!(config.gateway.endpoint, None);
    assert_eq!(config.gateway.site_link, None);
}

#[test]
fn template_round_trips_unusual_values() {
    let mut params = InitParams::new(
        "x1-y".to_owned(),
        PathBuf::from(r#"/srv/my "vcfed" data\dir/'it's'"#),
    );
    params.api_listen = "[::1]:9000".parse().expect("valid");
    params.federation_listen = vec![
        "/ip4/0.0.0.0/tcp/7781".parse().expect("valid"),
        "/ip6/::/udp/7781/quic-v1".parse().expect("valid"),
    ];
    params.gateway_listen = "10.0.0.1:1".parse().expect("valid");
    params.nodes = 1;
    params.node = NodeShape {
        cores: 64,
        memory_mib: 1 << 40,
        disk_gib: 1,
    };
    params.vlans = VlanRange {
        first: 1,
        last: 4094,
    };
    params.bootstrap = vec![
        format!("/dns4/peer.example.org/tcp/7781/p2p/{PEER}")
            .parse()
            .expect("valid"),
    ];

    let text = render_template(&params);
    let config = parse(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));

    assert_eq!(config.site.name, params.site);
    assert_eq!(config.site.data_dir, params.data_dir);
    assert_eq!(config.api.listen, params.api_listen);
    assert_eq!(config.api.token_file, params.data_dir.join("api.token"));
    assert_eq!(config.federation.listen, params.federation_listen);
    assert_eq!(config.federation.bootstrap, params.bootstrap);
    assert_eq!(config.gateway.listen, params.gateway_listen);
    assert_eq!(config.inventory.node, params.node);
    assert_eq!(config.inventory.source, InventorySource::Nodes(1));
    assert_eq!(config.clusters.vlans, params.vlans);
}

#[test]
fn template_comments_every_field() {
    let text = render_template(&InitParams::new("a".to_owned(), PathBuf::from("/d")));
    for field in [
        "name =",
        "data_dir =",
        "listen =",
        "bootstrap =",
        "# psk_file =",
        "# allow_peers =",
        "# token_file =",
        "nodes =",
        "cores =",
        "memory_mib =",
        "disk_gib =",
        "# [[inventory.hosts]]",
        "vlans =",
        "# endpoint =",
        "# bridge =",
        "# trunk =",
    ] {
        let line = text
            .lines()
            .position(|line| line.starts_with(field))
            .unwrap_or_else(|| panic!("template lacks {field:?}"));
        let previous = text.lines().nth(line - 1).expect("a line before");
        assert!(
            previous.starts_with('#'),
            "{field:?} has no comment above it"
        );
    }
}

#[test]
fn minimal_config_gets_defaults() {
    let config = parse(&minimal("")).expect("valid");

    assert_eq!(config.path, Path::new(PATH));
    assert_eq!(config.site.name, "site-a");
    // Relative paths resolve against the config file's directory, not the working one.
    assert_eq!(config.site.data_dir, Path::new("/etc/vcfed/data"));
    assert_eq!(
        config.federation.listen,
        vec![
            DEFAULT_FEDERATION_LISTEN
                .parse::<Multiaddr>()
                .expect("valid")
        ]
    );
    assert!(config.federation.bootstrap.is_empty());
    assert_eq!(config.federation.psk_file, None);
    assert!(config.federation.allow_peers.is_empty());
    assert_eq!(
        config.api.listen,
        DEFAULT_API_LISTEN.parse::<SocketAddr>().expect("valid")
    );
    assert_eq!(
        config.api.token_file,
        Path::new("/etc/vcfed/data/api.token")
    );
    assert_eq!(config.inventory.slots(), 4);
    assert_eq!(
        config.clusters.vlans,
        VlanRange {
            first: 100,
            last: 199
        }
    );
    assert_eq!(
        config.gateway.listen,
        DEFAULT_GATEWAY_LISTEN.parse::<SocketAddr>().expect("valid")
    );
    assert_eq!(config.gateway.site_link, None);
    assert_eq!(
        config.federation_key_path(),
        Path::new("/etc/vcfed/data/federation.key")
    );
    assert_eq!(
        config.tunnel_key_path(),
        Path::new("/etc/vcfed/data/tunnel.key")
    );
    assert_eq!(config.ledger_path(), Path::new("/etc/vcfed/data/ledger.db"));
}

#[test]
fn optional_fields_are_read_and_paths_resolved() {
    let config = parse(&minimal(&format!(
        "[federation]\n\
         listen = [\"/ip4/0.0.0.0/tcp/1\", \"/ip6/::/tcp/1\"]\n\
         bootstrap = [\"/ip4/192.0.2.1/tcp/7781/p2p/{PEER}\"]\n\
         psk_file = \"keys/federation.psk\"\n\
         allow_peers = [\"{PEER}\"]\n\
         [api]\n\
         listen = \"[::1]:8000\"\n\
         token_file = \"/run/vcfed/api.token\"\n\
         [gateway]\n\
         listen = \"0.0.0.0:9000\"\n\
         endpoint = \"gw.example.org:9000\"\n\
         trunk = \"eth1.100\"\n"
    )))
    .expect("valid");

    assert_eq!(config.federation.listen.len(), 2);
    assert_eq!(config.federation.bootstrap.len(), 1);
    assert_eq!(
        config.federation.psk_file.as_deref(),
        Some(Path::new("/etc/vcfed/keys/federation.psk"))
    );
    assert_eq!(
        config.federation.allow_peers,
        vec![PEER.parse::<PeerId>().expect("valid")]
    );
    assert_eq!(config.api.listen.port(), 8000);
    assert_eq!(config.api.token_file, Path::new("/run/vcfed/api.token"));
    assert_eq!(
        config.gateway.endpoint.as_deref(),
        Some("gw.example.org:9000")
    );
    assert_eq!(
        config.gateway.site_link,
        Some(SiteLink::Trunk("eth1.100".to_owned()))
    );
}

#[test]
fn relative_paths_of_a_bare_file_name_stay_relative() {
    let config = Config::parse(&minimal(""), Path::new(CONFIG_FILE_NAME)).expect("valid");
    assert_eq!(config.site.data_dir, Path::new("data"));
}

#[test]
fn hosts_inventory_counts_slots_per_host() {
    let config = parse(
        "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
         [inventory]\n\
         node = { cores = 2, memory_mib = 4096, disk_gib = 20 }\n\
         [[inventory.hosts]]\n\
         name = \"cpu-bound\"\n\
         cores = 7\n\
         memory_mib = 1000000\n\
         disk_gib = 1000\n\
         [[inventory.hosts]]\n\
         name = \"memory-bound\"\n\
         cores = 64\n\
         memory_mib = 10000\n\
         disk_gib = 1000\n\
         [[inventory.hosts]]\n\
         name = \"too-small\"\n\
         cores = 1\n\
         memory_mib = 1000000\n\
         disk_gib = 1000\n",
    )
    .expect("valid");

    let InventorySource::Hosts(hosts) = &config.inventory.source else {
        panic!("expected hosts, got {:?}", config.inventory.source);
    };
    let per_host: Vec<u32> = hosts
        .iter()
        .map(|host| host.slots(&config.inventory.node))
        .collect();
    // 7/2 cores = 3; 10000/4096 MiB = 2; 1/2 cores = 0.
    assert_eq!(per_host, [3, 2, 0]);
    assert_eq!(config.inventory.slots(), 5);
    assert_eq!(config.clusters.vlans, VlanRange { first: 7, last: 7 });
}

#[test]
fn hosts_without_room_for_a_slot_are_refused() {
    let e = parse_err(
        "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
         [inventory]\n\
         node = { cores = 8, memory_mib = 4096, disk_gib = 20 }\n\
         [[inventory.hosts]]\n\
         name = \"h1\"\n\
         cores = 4\n\
         memory_mib = 65536\n\
         disk_gib = 100\n",
    );
    assert_error(&e, 8, "inventory", "no host has room for one node slot");
    assert!(e.message.contains("8 cores"), "{e}");
}

#[test]
fn too_many_slots_are_refused() {
    let e = parse_err(
        "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
         [inventory]\n\
         node = { cores = 1, memory_mib = 1, disk_gib = 1 }\n\
         hosts = [\n\
           { name = \"a\", cores = 4294967295, memory_mib = 4294967295, disk_gib = 4294967295 },\n\
           { name = \"b\", cores = 1, memory_mib = 1, disk_gib = 1 },\n\
         ]\n",
    );
    assert_error(&e, 8, "inventory", "more than the 4294967295");
}

#[test]
fn missing_field_names_field_and_table_line() {
    let e = parse_err(
        "# site config\n\
         [site]\n\
         data_dir = \"/d\"\n\
         [inventory]\n\
         node = { cores = 2, memory_mib = 4096, disk_gib = 20 }\n\
         nodes = 4\n\
         [clusters]\n\
         vlans = \"100-199\"\n",
    );
    assert_error(&e, 2, "site.name", "required field is missing");
    assert_eq!(
        e.hint.as_deref(),
        Some("add `name = \"site-a\"` to the [site] table")
    );
}

#[test]
fn missing_table_is_named_without_a_line() {
    let e = parse_err(
        "[site]\nname = \"s\"\ndata_dir = \"/d\"\n\
         [inventory]\nnode = { cores = 2, memory_mib = 4096, disk_gib = 20 }\nnodes = 4\n",
    );
    assert_eq!(e.line, None, "{e}");
    assert_eq!(e.field.as_deref(), Some("clusters"));
    assert!(e.message.contains("[clusters]"), "{e}");
    assert!(
        e.hint
            .as_deref()
            .is_some_and(|hint| hint.contains("vcfed init")),
        "{e}"
    );
}

#[test]
fn missing_field_inside_host_entry_names_the_entry() {
    let e = parse_err(
        "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
         [inventory]\n\
         node = { cores = 1, memory_mib = 1, disk_gib = 1 }\n\
         [[inventory.hosts]]\n\
         name = \"h1\"\ncores = 1\nmemory_mib = 1\ndisk_gib = 1\n\
         [[inventory.hosts]]\n\
         name = \"h2\"\ncores = 1\nmemory_mib = 1\n",
    );
    assert_error(
        &e,
        13,
        "inventory.hosts[1].disk_gib",
        "required field is missing",
    );
    assert_eq!(
        e.hint.as_deref(),
        Some("add `disk_gib = 2000` to `inventory.hosts[1]`")
    );
}

#[test]
fn wrong_type_names_field_and_value_position() {
    let e = parse_err(&minimal("").replace("nodes = 4", "nodes = \"four\""));
    assert_error(&e, 7, "inventory.nodes", "invalid type: string \"four\"");
    assert_eq!(e.column, Some(9));
    assert_eq!(e.hint.as_deref(), Some("write it like `nodes = 4`"));

    // serde's Rust type names are replaced by the TOML ones.
    let e = parse_err(&minimal("").replace("node = {", "node = 5\nx = {"));
    assert_error(
        &e,
        6,
        "inventory.node",
        "invalid type: integer `5`, expected a table",
    );
    let e = parse_err(&minimal("[federation]\nbootstrap = \"x\"\n"));
    assert_error(&e, 12, "federation.bootstrap", "expected an array");
}

#[test]
fn wrong_type_inside_host_entry() {
    let e = parse_err(
        "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
         [inventory]\n\
         node = { cores = 1, memory_mib = 1, disk_gib = 1 }\n\
         [[inventory.hosts]]\n\
         name = \"h1\"\ncores = 1\nmemory_mib = 1\ndisk_gib = 1\n\
         [[inventory.hosts]]\n\
         name = \"h2\"\ncores = -3\nmemory_mib = 1\ndisk_gib = 1\n",
    );
    assert_error(
        &e,
        15,
        "inventory.hosts[1].cores",
        "invalid value: integer `-3`, expected a non-negative integer",
    );
}

#[test]
fn bad_vlan_ranges_are_refused() {
    for (vlans, message) in [
        (
            "0-10",
            "invalid VLAN range \"0-10\": VLAN ids must be within 1-4094",
        ),
        ("100-4095", "VLAN ids must be within 1-4094"),
        (
            "5000",
            "invalid VLAN range \"5000\": VLAN ids must be within 1-4094",
        ),
        ("70000", "VLAN ids must be within 1-4094"),
        (
            "200-100",
            "the first id 200 is greater than the last id 100",
        ),
        ("abc", "invalid VLAN range \"abc\": expected \"FIRST-LAST\""),
        ("", "expected \"FIRST-LAST\""),
        ("1-2-3", "expected \"FIRST-LAST\""),
        ("-5", "expected \"FIRST-LAST\""),
        ("+5", "expected \"FIRST-LAST\""),
    ] {
        let e = parse_err(&minimal("").replace("\"100-199\"", &format!("{vlans:?}")));
        assert_error(&e, 10, "clusters.vlans", message);
        assert_eq!(e.column, Some(9), "{e}");
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("\"FIRST-LAST\""))
        );
    }
}

#[test]
fn vlan_range_parses_and_displays() {
    assert_eq!(
        "100-199".parse(),
        Ok(VlanRange {
            first: 100,
            last: 199
        })
    );
    assert_eq!(
        " 1 - 4094 ".parse(),
        Ok(VlanRange {
            first: 1,
            last: 4094
        })
    );
    assert_eq!(
        "42".parse(),
        Ok(VlanRange {
            first: 42,
            last: 42
        })
    );
    assert_eq!(
        "9-3".parse::<VlanRange>(),
        Err(ParseVlanRangeError::Reversed { first: 9, last: 3 })
    );

    let range = VlanRange {
        first: 100,
        last: 199,
    };
    assert_eq!(range.to_string(), "100-199");
    assert_eq!(range.len(), 100);
    assert!(!range.is_empty());
    assert_eq!(
        VlanRange {
            first: 1,
            last: 4094
        }
        .len(),
        4094
    );
    assert_eq!(VlanRange { first: 5, last: 4 }.len(), 0);
}

#[test]
fn bad_socket_address_is_refused() {
    let e = parse_err(&minimal("[api]\nlisten = \"localhost:99999\"\n"));
    assert_error(
        &e,
        12,
        "api.listen",
        "invalid socket address \"localhost:99999\"",
    );
    assert!(
        e.hint
            .as_deref()
            .is_some_and(|h| h.contains("127.0.0.1:7780"))
    );

    let e = parse_err(&minimal("[gateway]\nlisten = \"0.0.0.0\"\n"));
    assert_error(
        &e,
        12,
        "gateway.listen",
        "invalid socket address \"0.0.0.0\"",
    );
}

#[test]
fn bad_multiaddr_is_refused() {
    let e = parse_err(&minimal(
        "[federation]\nlisten = [\"/ip4/0.0.0.0/tcp/1\", \"not-a-multiaddr\"]\n",
    ));
    assert_error(
        &e,
        12,
        "federation.listen[1]",
        "invalid multiaddress \"not-a-multiaddr\"",
    );
    assert_eq!(e.column, Some(33));
}

#[test]
fn empty_listen_list_is_refused() {
    let e = parse_err(&minimal("[federation]\nlisten = []\n"));
    assert_error(&e, 12, "federation.listen", "at least one");
}

#[test]
fn bootstrap_without_peer_id_is_refused() {
    let e = parse_err(&minimal(
        "[federation]\nbootstrap = [\n  \"/ip4/192.0.2.1/tcp/7781\",\n]\n",
    ));
    assert_error(
        &e,
        13,
        "federation.bootstrap[0]",
        "does not end in /p2p/<peer id>",
    );
    assert!(
        e.hint
            .as_deref()
            .is_some_and(|h| h.contains("/ip4/192.0.2.1/tcp/7781/p2p/")),
        "{e}"
    );
}

#[test]
fn bad_peer_id_is_refused() {
    let e = parse_err(&minimal("[federation]\nallow_peers = [\"bob\"]\n"));
    assert_error(
        &e,
        12,
        "federation.allow_peers[0]",
        "invalid peer id \"bob\"",
    );
}

#[test]
fn both_nodes_and_hosts_are_refused() {
    let e = parse_err(&minimal(
        "[[inventory.hosts]]\nname = \"h1\"\ncores = 1\nmemory_mib = 1\ndisk_gib = 1\n",
    ));
    assert_error(&e, 7, "inventory", "both `nodes` and `hosts` are set");
    assert!(e.hint.is_some());
}

#[test]
fn neither_nodes_nor_hosts_is_refused() {
    let e = parse_err(&minimal("").replace("nodes = 4\n", ""));
    assert_error(&e, 5, "inventory", "neither `nodes` nor `hosts` is set");
    assert!(e.hint.as_deref().is_some_and(|h| h.contains("nodes = 4")));
}

#[test]
fn unknown_field_is_refused_with_the_valid_ones() {
    let e = parse_err(&minimal("").replace("vlans =", "vlan ="));
    assert_error(&e, 10, "clusters.vlan", "unknown field `vlan`");
    assert_eq!(
        e.hint.as_deref(),
        Some(
            "did you mean `vlans`? the [clusters] table accepts `vlans`, `driver`, \
             `heal_grace`, `lease`, `reserve_deadline`"
        )
    );

    let e = parse_err(&minimal("[gateway]\ncolour = \"blue\"\n"));
    assert_error(&e, 12, "gateway.colour", "unknown field `colour`");
    assert_eq!(
        e.hint.as_deref(),
        Some(
            "the [gateway] table accepts `listen`, `endpoint`, `bridge`, `trunk`, `busy_poll`, `nice`"
        )
    );

    let e = parse_err(&minimal("[sites]\n"));
    assert_error(&e, 11, "sites", "unknown field `sites`");
    assert!(
        e.hint
            .as_deref()
            .is_some_and(|h| h.starts_with("did you mean `site`? the top level accepts")),
        "{e}"
    );
}

#[test]
fn bad_site_names_are_refused() {
    for (name, message) in [
        ("", "it is empty"),
        ("Site-A", "'S' is not a lowercase letter"),
        ("site_a", "'_' is not a lowercase letter"),
        ("-site", "starts or ends with '-'"),
        ("site-", "starts or ends with '-'"),
        (&"a".repeat(64), "64 characters long"),
    ] {
        let e = parse_err(&minimal("").replace("\"site-a\"", &format!("{name:?}")));
        assert_error(&e, 2, "site.name", message);
        assert!(e.hint.as_deref().is_some_and(|h| h.contains("lowercase")));
    }
    parse(&minimal("").replace("\"site-a\"", &format!("{:?}", "a".repeat(63))))
        .expect("63 characters are allowed");
}

#[test]
fn bad_interface_names_are_refused() {
    for (line, message) in [
        ("bridge = \"\"", "it is empty"),
        (
            "bridge = \"a-very-long-name0\"",
            "17 bytes long, more than 15",
        ),
        ("trunk = \"eth0:1\"", "it contains ':'"),
        ("trunk = \"eth 0\"", "it contains ' '"),
        ("bridge = \"a/b\"", "it contains '/'"),
        ("bridge = \"..\"", "are not interface names"),
    ] {
        let e = parse_err(&minimal(&format!("[gateway]\n{line}\n")));
        let field = line.split(' ').next().expect("a key");
        assert_error(&e, 12, &format!("gateway.{field}"), message);
    }
    let config =
        parse(&minimal("[gateway]\nbridge = \"br-site-fifteen\"\n")).expect("15 bytes fit");
    assert_eq!(
        config.gateway.site_link,
        Some(SiteLink::Bridge("br-site-fifteen".to_owned()))
    );
}

#[test]
fn site_links_the_agent_cannot_use_are_refused() {
    let e = parse_err(&minimal("[gateway]\nbridge = \"vcfb12\"\n"));
    assert_error(&e, 12, "gateway.bridge", "named like the gateway's own");
    parse(&minimal("[gateway]\ntrunk = \"enp0s31f6x\"\n")).expect("10 bytes fit");
    let e = parse_err(&minimal("[gateway]\ntrunk = \"enp0s31f6xy\"\n"));
    assert_error(
        &e,
        12,
        "gateway.trunk",
        "too long for its VLAN sub-interfaces",
    );
    let e = parse_err(&minimal("").replace("vlans =", "driver = \"qemu\"\nvlans ="));
    assert_error(&e, 10, "clusters.driver", "unknown compute driver \"qemu\"");
    let netns = minimal("").replace("vlans =", "driver = \"netns\"\nvlans =");
    assert_eq!(parse(&netns).unwrap().clusters.driver, DriverKind::Netns);
}

#[test]
fn both_bridge_and_trunk_are_refused() {
    let e = parse_err(&minimal("[gateway]\nbridge = \"br0\"\ntrunk = \"eth1\"\n"));
    assert_error(&e, 13, "gateway", "both `bridge` and `trunk` are set");
}

#[test]
fn endpoints_are_checked() {
    for good in [
        "gw.example.org:7782",
        "gw.example.org.:1",
        "192.0.2.1:65535",
        "[2001:db8::1]:7782",
        "localhost:7782",
    ] {
        let config = parse(&minimal(&format!("[gateway]\nendpoint = {good:?}\n")))
            .unwrap_or_else(|e| panic!("{good}: {e}"));
        assert_eq!(config.gateway.endpoint.as_deref(), Some(good));
    }
    for (bad, message) in [
        ("gw.example.org", "it has no port"),
        ("gw.example.org:0", "not a number from 1 to 65535"),
        ("gw.example.org:65536", "not a number from 1 to 65535"),
        ("2001:db8::1:7782", "must be written in brackets"),
        ("[2001:db8::zz]:7782", "is not an IPv6 address"),
        ("192.0.2.300:7782", "neither an IP address nor a DNS name"),
        (
            "gw_1.example.org:7782",
            "neither an IP address nor a DNS name",
        ),
        (":7782", "neither an IP address nor a DNS name"),
    ] {
        let e = parse_err(&minimal(&format!("[gateway]\nendpoint = {bad:?}\n")));
        assert_error(&e, 12, "gateway.endpoint", message);
    }
}

#[test]
fn zero_sizes_are_refused() {
    let e = parse_err(&minimal("").replace("cores = 2", "cores = 0"));
    assert_error(&e, 6, "inventory.node.cores", "must be at least 1, not 0");
    assert_eq!(e.column, Some(18));
    assert_eq!(e.hint.as_deref(), Some("write it like `cores = 2`"));

    let e = parse_err(&minimal("").replace("disk_gib = 20", "disk_gib = 0"));
    assert_error(&e, 6, "inventory.node.disk_gib", "must be at least 1");

    let e = parse_err(&minimal("").replace("nodes = 4", "nodes = 0"));
    assert_error(&e, 7, "inventory.nodes", "must be at least 1");
}

#[test]
fn duplicate_and_empty_host_names_are_refused() {
    let hosts = |first: &str, second: &str| {
        format!(
            "[site]\nname = \"s\"\ndata_dir = \"/d\"\n[clusters]\nvlans = \"7\"\n\
             [inventory]\n\
             node = {{ cores = 1, memory_mib = 1, disk_gib = 1 }}\n\
             hosts = [\n\
               {{ name = {first:?}, cores = 1, memory_mib = 1, disk_gib = 1 }},\n\
               {{ name = {second:?}, cores = 1, memory_mib = 1, disk_gib = 1 }},\n\
             ]\n"
        )
    };
    let e = parse_err(&hosts("h1", "h1"));
    assert_error(
        &e,
        10,
        "inventory.hosts[1].name",
        "duplicate host name \"h1\"",
    );
    assert!(e.message.contains("inventory.hosts[0]"), "{e}");

    let e = parse_err(&hosts("h1", ""));
    assert_error(&e, 10, "inventory.hosts[1].name", "host name is empty");
}

#[test]
fn empty_paths_are_refused() {
    let e = parse_err(&minimal("").replace("data_dir = \"data\"", "data_dir = \"\""));
    assert_error(&e, 3, "site.data_dir", "path is empty");
}

#[test]
fn syntax_error_has_a_line_but_no_field() {
    let e = parse_err(&minimal("[gateway]\nlisten = \"0.0.0.0:1\n"));
    assert_eq!(e.line, Some(12), "{e}");
    assert_eq!(e.field, None, "{e}");
}

#[test]
fn columns_count_characters_not_bytes() {
    let e = parse_err(&minimal("").replace("nodes = 4", "nodes = 4 # größe\nnodes2 = 1"));
    assert_error(&e, 8, "inventory.nodes2", "unknown field");
    assert_eq!(line_column("ä\näöü x", "ä\näöü ".len()), (2, 5));
}

#[test]
fn unreadable_file_is_reported_without_a_line() {
    let path = Path::new("/nonexistent/vcfed-config-test/vcfed.toml");
    let e = Config::load(path).expect_err("the file does not exist");
    assert_eq!(e.path, path);
    assert_eq!(e.line, None);
    assert_eq!(e.field, None);
    assert!(e.message.contains("cannot read"), "{e}");
    assert!(e.message.contains("os error 2"), "{e}");
}

#[test]
fn error_display_is_one_paragraph_with_location_field_and_hint() {
    let e = parse_err(&minimal("").replace("\"100-199\"", "\"0-10\""));
    assert_eq!(
        e.to_string(),
        "/etc/vcfed/vcfed.toml:10:9: field `clusters.vlans`: invalid VLAN range \"0-10\": \
         VLAN ids must be within 1-4094\n  hint: write it as \"FIRST-LAST\" or a single \
         \"ID\", with ids within 1-4094, e.g. \"100-199\""
    );

    let e = ConfigError {
        path: PathBuf::from("x.toml"),
        line: None,
        column: None,
        field: None,
        message: "cannot read".to_owned(),
        hint: None,
    };
    assert_eq!(e.to_string(), "x.toml: cannot read");
}

#[test]
fn node_shape_fits_in_each_dimension() {
    let slot = NodeShape {
        cores: 2,
        memory_mib: 4096,
        disk_gib: 20,
    };
    assert!(slot.fits_in(&slot));
    assert!(NodeShape { cores: 1, ..slot }.fits_in(&slot));
    for bigger in [
        NodeShape { cores: 3, ..slot },
        NodeShape {
            memory_mib: 4097,
            ..slot
        },
        NodeShape {
            disk_gib: 21,
            ..slot
        },
    ] {
        assert!(!bigger.fits_in(&slot), "{bigger:?}");
    }
}

#[test]
fn init_defaults_match_the_documented_ones() {
    let params = InitParams::new("a".to_owned(), PathBuf::from("/d"));
    assert_eq!(params.api_listen.to_string(), DEFAULT_API_LISTEN);
    assert_eq!(params.gateway_listen.to_string(), DEFAULT_GATEWAY_LISTEN);
    assert_eq!(
        params.federation_listen[0].to_string(),
        DEFAULT_FEDERATION_LISTEN
    );
    assert_eq!(params.nodes, 4);
    assert_eq!(params.vlans.to_string(), "100-199");
    assert!(params.bootstrap.is_empty());
}

#[test]
fn gossip_timing_is_read_and_checked() {
    let config = parse(&minimal(
        "[federation]\nadvert_ttl = \"3s\"\nadvert_refresh = \"1s\"\nanti_entropy = \"500ms\"\n",
    ))
    .unwrap();
    assert_eq!(
        config.federation.gossip,
        GossipTiming {
            advert_ttl: Duration::from_secs(3),
            advert_refresh: Duration::from_secs(1),
            anti_entropy: Duration::from_millis(500),
        }
    );
    assert_eq!(
        parse(&minimal("")).unwrap().federation.gossip,
        GossipTiming::default()
    );

    let e = parse_err(&minimal("[federation]\nadvert_ttl = \"15s\"\n"));
    assert_error(
        &e,
        12,
        "federation.advert_ttl",
        "at least twice advert_refresh",
    );
    let e = parse_err(&minimal("[federation]\nanti_entropy = \"soon\"\n"));
    assert_error(&e, 12, "federation.anti_entropy", "invalid duration");
    let e = parse_err(&minimal("[federation]\nanti_entropy = \"1ms\"\n"));
    assert_error(&e, 12, "federation.anti_entropy", "out of range");
}

#[test]
fn changed_fields_names_what_differs_in_file_order() {
    let running = parse(&minimal("")).unwrap();
    assert!(running.changed_fields(&running.clone()).is_empty());

    let text = minimal("[api]\nlisten = \"127.0.0.1:9999\"\n").replace("100-199", "200-299");
    let edited = parse(&text).unwrap();
    assert_eq!(
        running.changed_fields(&edited),
        ["api.listen", "clusters.vlans"]
    );

    let edited = parse(&minimal("").replace("nodes = 4", "nodes = 5")).unwrap();
    assert_eq!(running.changed_fields(&edited), ["inventory"]);
}

#[test]
fn a_refresh_too_slow_for_the_ttl_is_blamed_on_the_refresh() {
    let e = parse_err(&minimal("[federation]\nadvert_refresh = \"1h\"\n"));
    assert_error(
        &e,
        12,
        "federation.advert_refresh",
        "advert_ttl (30s, the default) must be at least twice advert_refresh (1h)",
    );
    let hint = e.hint.unwrap_or_default();
    assert!(
        hint.contains("lower advert_refresh to at most 15s"),
        "{hint}"
    );
    assert!(hint.contains("raise advert_ttl to at least 2h"), "{hint}");

    // Both set: the refresh line, and a message naming both values.
    let e = parse_err(&minimal(
        "[federation]\nadvert_ttl = \"10s\"\nadvert_refresh = \"6s\"\n",
    ));
    assert_error(
        &e,
        13,
        "federation.advert_refresh",
        "advert_ttl (10s) must be at least twice advert_refresh (6s)",
    );
}

#[test]
fn numbers_past_their_range_say_too_large_with_the_maximum() {
    let e = parse_err(&minimal("").replace("nodes = 4", "nodes = 99999999999"));
    assert_error(
        &e,
        7,
        "inventory.nodes",
        "99999999999 is too large: at most 4294967295",
    );
}

#[test]
fn sizes_the_ledger_cannot_store_are_config_errors() {
    let e =
        parse_err(&minimal("").replace("memory_mib = 4096", "memory_mib = 18446744073709551615"));
    assert_error(
        &e,
        6,
        "inventory.node.memory_mib",
        "18446744073709551615 is too large: at most 9223372036854775807",
    );
    let text = minimal("").replace(
        "nodes = 4",
        "hosts = [{ name = \"h1\", cores = 4, memory_mib = 8192, disk_gib = 9223372036854775808 }]",
    );
    let e = parse_err(&text);
    assert_error(
        &e,
        7,
        "inventory.hosts[0].disk_gib",
        "is too large: at most 9223372036854775807",
    );
}

/// `minimal` with a `[libvirt]` table holding `lines`, which start on line 12.
fn with_libvirt(lines: &str) -> String {
    minimal(&format!("[libvirt]\n{lines}\n"))
}

#[test]
fn libvirt_table_absent_gets_defaults() {
    let config = parse(&minimal("")).expect("valid");
    let libvirt = &config.libvirt;

    assert_eq!(libvirt.hosts, ["qemu:///system"]);
    assert_eq!(libvirt.pool, None);
    assert_eq!(libvirt.base_image, None);
    // Like the API token, the default resolves against the data dir at load.
    assert_eq!(libvirt.console_dir, Path::new("/etc/vcfed/data/consoles"));
    assert!(!libvirt.keep_volumes);
    assert_eq!(libvirt.accel, Accel::Auto);
    assert_eq!(libvirt.shutdown_timeout_s, 10);
    assert_eq!(libvirt.shutdown_timeout(), Duration::from_secs(10));
    assert_eq!(libvirt.memory_mib, None);
    assert_eq!(libvirt.remote_bridge, "br{vlan}");
    assert_eq!(libvirt.remote_bridge_for(100), "br100");
    assert_eq!(*libvirt, LibvirtConfig::new(&config.site.data_dir));

    // An empty table means the same as none.
    assert_eq!(parse(&with_libvirt("")).expect("valid").libvirt, *libvirt);
}

#[test]
fn libvirt_keys_are_read() {
    let text = with_libvirt(
        "hosts = [\"qemu:///system\", \"qemu+ssh://root@hv2/system\", \"test:///default\"]\n\
         pool = \"vcfed_nodes-1.0\"\n\
         base_image = \"/srv/images/node.qcow2\"\n\
         frontend_image = \"/srv/images/frontend.qcow2\"\n\
         console_dir = \"/var/log/vcfed/consoles\"\n\
         keep_volumes = true\n\
         accel = \"tcg\"\n\
         shutdown_timeout_s = 30\n\
         memory_mib = 2048\n\
         remote_bridge = \"vlan{vlan}br\"",
    )
    .replace("vlans =", "driver = \"libvirt\"\nvlans =");
    let config = parse(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));

    assert_eq!(config.clusters.driver, DriverKind::Libvirt);
    assert_eq!(config.clusters.driver.as_str(), "libvirt");
    assert_eq!(
        config.libvirt,
        LibvirtConfig {
            hosts: vec![
                "qemu:///system".to_owned(),
                "qemu+ssh://root@hv2/system".to_owned(),
                "test:///default".to_owned(),
            ],
            pool: Some("vcfed_nodes-1.0".to_owned()),
            base_image: Some(PathBuf::from("/srv/images/node.qcow2")),
            frontend_image: Some(PathBuf::from("/srv/images/frontend.qcow2")),
            console_dir: PathBuf::from("/var/log/vcfed/consoles"),
            keep_volumes: true,
            accel: Accel::Tcg,
            shutdown_timeout_s: 30,
            memory_mib: Some(2048),
            remote_bridge: "vlan{vlan}br".to_owned(),
        }
    );
    assert_eq!(config.libvirt.remote_bridge_for(7), "vlan7br");
    assert_eq!(config.libvirt.remote_bridge_for(4094), "vlan4094br");
    assert_eq!(config.libvirt.shutdown_timeout(), Duration::from_secs(30));

    for (accel, expected) in [
        ("auto", Accel::Auto),
        ("kvm", Accel::Kvm),
        ("tcg", Accel::Tcg),
    ] {
        let config = parse(&with_libvirt(&format!("accel = {accel:?}"))).expect("valid");
        assert_eq!(config.libvirt.accel, expected);
        assert_eq!(expected.as_str(), accel);
    }
}

/// `text` with the commented-out section that starts at the line `# [table]` uncommented:
/// its header and its `key = value` lines, up to the blank line that ends it. Also returns
/// the keys in the order they appear, each checked to have a comment above it.
fn uncomment_section(text: &str, table: &str) -> (String, Vec<String>) {
    let header = format!("# [{table}]");
    let start = text
        .lines()
        .position(|line| line == header)
        .unwrap_or_else(|| panic!("the template has a [{table}] section"));
    let end = text
        .lines()
        .enumerate()
        .position(|(i, line)| i > start && line.is_empty())
        .unwrap_or(usize::MAX);
    let mut keys = Vec::new();
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let uncommented = line.strip_prefix("# ").unwrap_or(line);
            let is_key = uncommented
                .split_once(" = ")
                .is_some_and(|(key, _)| key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            if i == start || (start < i && i < end && is_key) {
                if is_key {
                    let key = uncommented.split(' ').next().expect("a key");
                    keys.push(key.to_owned());
                    let comment = text.lines().nth(i - 1).expect("a line before");
                    assert!(comment.starts_with("# "), "{key} has no comment above it");
                }
                uncommented.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect();
    (lines.join("\n"), keys)
}

#[test]
fn template_documents_libvirt_and_its_example_parses() {
    let params = InitParams::new("site-a".to_owned(), PathBuf::from("/var/lib/vcfed"));
    // The section is commented out; uncomment its header and `key = value` lines.
    let (text, keys) = uncomment_section(&render_template(&params), "libvirt");
    assert_eq!(
        keys,
        [
            "hosts",
            "pool",
            "base_image",
            "frontend_image",
            "console_dir",
            "keep_volumes",
            "accel",
            "shutdown_timeout_s",
            "memory_mib",
            "remote_bridge",
        ],
        "every key of [libvirt] is documented, in the struct's order"
    );

    let config = parse(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
    // The keys with a default show it; the others show an example.
    let defaults = LibvirtConfig::new(&params.data_dir);
    assert_eq!(
        config.libvirt,
        LibvirtConfig {
            pool: Some("default".to_owned()),
            base_image: Some(PathBuf::from("/var/lib/libvirt/images/node-base.qcow2")),
            frontend_image: Some(PathBuf::from("/var/lib/libvirt/images/frontend.qcow2")),
            memory_mib: Some(2048),
            ..defaults
        }
    );
    // Left commented out, it changes nothing.
    assert_eq!(
        parse(&render_template(&params)).expect("valid").libvirt,
        LibvirtConfig::new(&params.data_dir)
    );
}

#[test]
fn libvirt_host_uris_are_checked() {
    for good in [
        "qemu:///system",
        "qemu:///session",
        "test:///default",
        "qemu+ssh://root@hv2/system",
        "qemu+ssh://root@hv2.example.org:2222/system?keyfile=/root/.ssh/id_ed25519",
        "qemu+tls://192.0.2.5/system",
        "qemu+libssh2://[2001:db8::1]:22/system",
        "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",
        "qemu://hv3/system",
    ] {
        let config = parse(&with_libvirt(&format!("hosts = [{good:?}]")))
            .unwrap_or_else(|e| panic!("{good}: {e}"));
        assert_eq!(config.libvirt.hosts, [good]);
    }
    for (bad, message) in [
        (
            "xen:///system",
            "driver \"xen\" is not \"qemu\" or \"test\"",
        ),
        ("qemu+shh://hv2/system", "transport \"shh\" is not one of"),
        ("hv2", "no \"://\""),
        ("qemu://hv2", "no path"),
        ("qemu:///", "path is empty"),
        ("qemu:// /system", "contains ' '"),
        ("qemu+ssh://root@hv2:0/system", "port \"0\" is not a number"),
        ("qemu+ssh://@hv2/system", "user name before '@' is empty"),
        ("qemu+ssh://root@/system", "host \"\" is neither"),
        ("qemu+ssh://hv_2/system", "host \"hv_2\" is neither"),
        ("qemu+tcp://[2001:db8::zz]/system", "is not an IPv6 address"),
    ] {
        let e = parse_err(&with_libvirt(&format!(
            "hosts = [\"qemu:///system\", {bad:?}]"
        )));
        assert_error(&e, 12, "libvirt.hosts[1]", message);
        assert!(
            e.message.contains(&format!("invalid libvirt URI {bad:?}")),
            "{e}"
        );
        assert_eq!(e.column, Some(28), "{e}");
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("\"qemu+ssh://root@hv2/system\"")),
            "{e}"
        );
    }
}

#[test]
fn duplicate_and_missing_libvirt_hosts_are_refused() {
    let e = parse_err(&with_libvirt(
        "hosts = [\n  \"qemu:///system\",\n  \"qemu+ssh://hv2/system\",\n  \"qemu:///system\",\n]",
    ));
    assert_error(
        &e,
        15,
        "libvirt.hosts[2]",
        "duplicate host \"qemu:///system\", already listed as libvirt.hosts[0]",
    );

    let e = parse_err(&with_libvirt("hosts = []"));
    assert_error(&e, 12, "libvirt.hosts", "needs at least one");
    assert!(
        e.hint
            .as_deref()
            .is_some_and(|h| h.contains("hosts = [\"qemu:///system\"]")),
        "{e}"
    );
}

#[test]
fn libvirt_paths_must_be_absolute() {
    for key in ["base_image", "frontend_image", "console_dir"] {
        let e = parse_err(&with_libvirt(&format!("{key} = \"images/node.qcow2\"")));
        assert_error(
            &e,
            12,
            &format!("libvirt.{key}"),
            "\"images/node.qcow2\" is a relative path",
        );
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("write an absolute path")),
            "{e}"
        );
        let e = parse_err(&with_libvirt(&format!("{key} = \"\"")));
        assert_error(&e, 12, &format!("libvirt.{key}"), "path is empty");
    }
    // Existence is the driver's business: a missing image is a failed node, not a bad file.
    let config = parse(&with_libvirt(
        "base_image = \"/nonexistent/vcfed/node.qcow2\"",
    ))
    .expect("not checked for existence");
    assert_eq!(
        config.libvirt.base_image.as_deref(),
        Some(Path::new("/nonexistent/vcfed/node.qcow2"))
    );
}

#[test]
fn libvirt_pool_names_are_checked() {
    for (pool, message) in [
        ("", "it is empty"),
        ("my pool", "' ' is not a letter, digit, '_', '.' or '-'"),
        ("pools/a", "'/' is not a letter"),
        (&"p".repeat(65), "65 characters long, more than 64"),
    ] {
        let e = parse_err(&with_libvirt(&format!("pool = {pool:?}")));
        assert_error(&e, 12, "libvirt.pool", message);
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("virsh pool-list"))
        );
    }
    let long = "p".repeat(64);
    let config = parse(&with_libvirt(&format!("pool = {long:?}"))).expect("64 characters fit");
    assert_eq!(config.libvirt.pool, Some(long));
}

#[test]
fn libvirt_remote_bridge_is_checked() {
    for (bridge, message) in [
        ("br-cluster", "has no {vlan} placeholder"),
        ("br{vlan}-{vlan}", "has 2 {vlan} placeholders, not one"),
        (
            "bridge-clust{vlan}",
            "gives \"bridge-clust4094\" for VLAN 4094, not a valid interface name: it is 16 \
             bytes long, more than 15",
        ),
        ("br:{vlan}", "it contains ':'"),
        ("br/{vlan}", "it contains '/'"),
        ("br {vlan}", "it contains ' '"),
    ] {
        let e = parse_err(&with_libvirt(&format!("remote_bridge = {bridge:?}")));
        assert_error(&e, 12, "libvirt.remote_bridge", message);
        assert!(
            e.hint.as_deref().is_some_and(|h| h.contains("br{vlan}")),
            "{e}"
        );
    }
    // 15 bytes for VLAN 4094 is the longest Linux allows.
    let config =
        parse(&with_libvirt("remote_bridge = \"bridge-clus{vlan}\"")).expect("15 bytes fit");
    assert_eq!(config.libvirt.remote_bridge_for(4094), "bridge-clus4094");
    assert_eq!(config.libvirt.remote_bridge_for(1), "bridge-clus1");
}

#[test]
fn libvirt_numbers_are_bounded() {
    for (line, field, message) in [
        (
            "shutdown_timeout_s = 0",
            "shutdown_timeout_s",
            "0 is out of range: use 1 to 600",
        ),
        (
            "shutdown_timeout_s = 601",
            "shutdown_timeout_s",
            "601 is out of range: use 1 to 600",
        ),
        (
            "memory_mib = 63",
            "memory_mib",
            "63 is out of range: use 64 to 1048576",
        ),
        (
            "memory_mib = 1048577",
            "memory_mib",
            "1048577 is out of range: use 64 to 1048576",
        ),
        (
            "shutdown_timeout_s = -1",
            "shutdown_timeout_s",
            "expected a non-negative integer",
        ),
    ] {
        let e = parse_err(&with_libvirt(line));
        assert_error(&e, 12, &format!("libvirt.{field}"), message);
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.starts_with("write it like")),
            "{e}"
        );
    }
    for (line, timeout_s, memory_mib) in [
        ("shutdown_timeout_s = 1\nmemory_mib = 64", 1, 64),
        (
            "shutdown_timeout_s = 600\nmemory_mib = 1048576",
            600,
            1_048_576,
        ),
    ] {
        let config = parse(&with_libvirt(line)).expect("the bounds are allowed");
        assert_eq!(config.libvirt.shutdown_timeout_s, timeout_s);
        assert_eq!(config.libvirt.memory_mib, Some(memory_mib));
    }
}

#[test]
fn libvirt_unknown_values_and_keys_are_refused() {
    let e = parse_err(&with_libvirt("accel = \"fast\""));
    assert_error(&e, 12, "libvirt.accel", "unknown accelerator \"fast\"");
    let hint = e.hint.unwrap_or_default();
    for allowed in ["\"auto\"", "\"kvm\"", "\"tcg\""] {
        assert!(hint.contains(allowed), "{hint}");
    }

    let e = parse_err(&with_libvirt("keep_volumes = \"yes\""));
    assert_error(&e, 12, "libvirt.keep_volumes", "expected a boolean");
    assert_eq!(
        e.hint.as_deref(),
        Some("write it like `keep_volumes = false`")
    );

    let e = parse_err(&with_libvirt("host = [\"qemu:///system\"]"));
    assert_error(&e, 12, "libvirt.host", "unknown field `host`");
    assert_eq!(
        e.hint.as_deref(),
        Some(
            "did you mean `hosts`? the [libvirt] table accepts `hosts`, `pool`, `base_image`, \
             `frontend_image`, `console_dir`, `keep_volumes`, `accel`, `shutdown_timeout_s`, `memory_mib`, \
             `remote_bridge`"
        )
    );

    let e = parse_err(&minimal("").replace("vlans =", "driver = \"qemu\"\nvlans ="));
    assert!(
        e.hint.as_deref().is_some_and(|h| h.contains("\"libvirt\"")),
        "{e}"
    );
}

#[test]
fn changed_libvirt_fields_need_a_restart() {
    let running = parse(&minimal("")).unwrap();
    let edited = parse(&with_libvirt(
        "hosts = [\"qemu+ssh://hv2/system\"]\naccel = \"kvm\"\nremote_bridge = \"vl{vlan}\"",
    ))
    .unwrap();
    assert_eq!(
        running.changed_fields(&edited),
        ["libvirt.hosts", "libvirt.accel", "libvirt.remote_bridge"]
    );
    let edited = parse(&with_libvirt(
        "pool = \"p\"\nbase_image = \"/i\"\nfrontend_image = \"/f\"\nconsole_dir = \"/c\"\nkeep_volumes = true\n\
         shutdown_timeout_s = 5\nmemory_mib = 512",
    ))
    .unwrap();
    assert_eq!(
        running.changed_fields(&edited),
        [
            "libvirt.pool",
            "libvirt.base_image",
            "libvirt.frontend_image",
            "libvirt.console_dir",
            "libvirt.keep_volumes",
            "libvirt.shutdown_timeout_s",
            "libvirt.memory_mib",
        ]
    );
}

/// `minimal` with an `[installer]` table holding `lines`, which start on line 12.
fn with_installer(lines: &str) -> String {
    minimal(&format!("[installer]\n{lines}\n"))
}

#[test]
fn installer_table_absent_gets_defaults() {
    let config = parse(&minimal("")).expect("valid");
    assert_eq!(
        config.installer,
        InstallerConfig {
            kernel: None,
            initrd: None,
            args: None,
        }
    );
    assert_eq!(config.installer, InstallerConfig::default());
    // An empty table means the same as none.
    assert_eq!(
        parse(&with_installer("")).expect("valid").installer,
        InstallerConfig::default()
    );
}

#[test]
fn installer_keys_are_read() {
    let text = with_installer(
        "kernel = \"/srv/installer/linux\"\n\
         initrd = \"/srv/installer/initrd.gz\"\n\
         args = \"console=ttyS0 auto=true priority=critical url=http://deploy.example.org/p.cfg\"",
    );
    let config = parse(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
    assert_eq!(
        config.installer,
        InstallerConfig {
            kernel: Some(PathBuf::from("/srv/installer/linux")),
            initrd: Some(PathBuf::from("/srv/installer/initrd.gz")),
            args: Some(
                "console=ttyS0 auto=true priority=critical url=http://deploy.example.org/p.cfg"
                    .to_owned()
            ),
        }
    );

    // A kernel alone is for the built-in installer; existence is checked by whoever serves it.
    let config = parse(&with_installer(
        "kernel = \"/nonexistent/boot/vmlinuz-6.1.0-18-amd64\"",
    ))
    .expect("not checked for existence");
    assert_eq!(
        config.installer,
        InstallerConfig {
            kernel: Some(PathBuf::from("/nonexistent/boot/vmlinuz-6.1.0-18-amd64")),
            ..InstallerConfig::default()
        }
    );

    // An own installer without arguments, and arguments of exactly the longest length.
    let config =
        parse(&with_installer("kernel = \"/k\"\ninitrd = \"/i\"")).expect("args are optional");
    assert_eq!(config.installer.args, None);
    let longest = "a".repeat(1024);
    let config = parse(&with_installer(&format!(
        "kernel = \"/k\"\ninitrd = \"/i\"\nargs = {longest:?}"
    )))
    .expect("1024 bytes fit");
    assert_eq!(config.installer.args, Some(longest));
}

#[test]
fn template_documents_installer_and_its_example_parses() {
    let params = InitParams::new("site-a".to_owned(), PathBuf::from("/var/lib/vcfed"));
    let template = render_template(&params);
    for needle in [
        "/boot/vmlinuz-*",
        "/lib/modules/<version>",
        "wget -q -O- \"http://<frontend>/cgi-bin/report?mac=<mac with - separators>&state=installed\"",
    ] {
        assert!(template.contains(needle), "the template lacks {needle:?}");
    }
    let (text, keys) = uncomment_section(&template, "installer");
    assert_eq!(
        keys,
        ["kernel", "initrd", "args"],
        "every key of [installer] is documented, in the struct's order"
    );
    let config = parse(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
    assert_eq!(
        config.installer,
        InstallerConfig {
            kernel: Some(PathBuf::from("/boot/vmlinuz-6.1.0-18-amd64")),
            initrd: Some(PathBuf::from("/srv/installer/initrd.gz")),
            args: Some(
                "console=ttyS0 auto=true priority=critical \
                 url=http://deploy.example.org/preseed.cfg"
                    .to_owned()
            ),
        }
    );
    // Left commented out, it changes nothing.
    assert_eq!(
        parse(&template).expect("valid").installer,
        InstallerConfig::default()
    );
}

#[test]
fn installer_paths_must_be_absolute() {
    for (lines, line, key) in [
        ("kernel = \"boot/vmlinuz\"", 12, "kernel"),
        (
            "kernel = \"/boot/vmlinuz\"\ninitrd = \"boot/vmlinuz\"",
            13,
            "initrd",
        ),
    ] {
        let e = parse_err(&with_installer(lines));
        assert_error(
            &e,
            line,
            &format!("installer.{key}"),
            "\"boot/vmlinuz\" is a relative path",
        );
        assert_eq!(e.column, Some(10), "{e}");
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("[installer]") && h.contains("write an absolute path")),
            "{e}"
        );
    }
    let e = parse_err(&with_installer("kernel = \"\""));
    assert_error(&e, 12, "installer.kernel", "path is empty");
}

#[test]
fn installer_initrd_needs_a_kernel_and_args_an_initrd() {
    let e = parse_err(&with_installer("initrd = \"/srv/installer/initrd.gz\""));
    assert_error(
        &e,
        12,
        "installer.initrd",
        "an own installer needs its kernel too: set installer.kernel",
    );
    assert!(
        e.hint.as_deref().is_some_and(|h| h.contains("kernel = ")),
        "{e}"
    );

    for lines in [
        "args = \"auto=true\"",
        "kernel = \"/boot/vmlinuz-6.1.0-18-amd64\"\nargs = \"auto=true\"",
    ] {
        let e = parse_err(&with_installer(lines));
        let line = 11 + lines.lines().count();
        assert_error(&e, line, "installer.args", "installer.initrd is not set");
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("set installer.initrd")),
            "{e}"
        );
    }
}

#[test]
fn installer_args_are_one_bounded_line() {
    let own = "kernel = \"/k\"\ninitrd = \"/i\"\n";
    let e = parse_err(&with_installer(&format!(
        "{own}args = {:?}",
        "a".repeat(1025)
    )));
    assert_error(
        &e,
        14,
        "installer.args",
        "the command line is 1025 bytes long, more than 1024",
    );
    assert!(
        e.hint.as_deref().is_some_and(|h| h.contains("preseed")),
        "{e}"
    );

    for (args, shown) in [
        ("auto=true\npriority=critical", "'\\n'"),
        ("auto=true\tpriority=critical", "'\\t'"),
        ("auto=true\r", "'\\r'"),
    ] {
        let e = parse_err(&with_installer(&format!("{own}args = {args:?}")));
        assert_error(
            &e,
            14,
            "installer.args",
            &format!("the command line contains the control character {shown}"),
        );
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("without newlines or tabs")),
            "{e}"
        );
    }
    // A TOML multi-line string is located where it starts.
    let e = parse_err(&with_installer(&format!(
        "{own}args = \"\"\"\nauto=true\npriority=critical\"\"\""
    )));
    assert_error(&e, 14, "installer.args", "control character '\\n'");
}

#[test]
fn installer_unknown_keys_are_refused() {
    let e = parse_err(&with_installer("kernal = \"/boot/vmlinuz\""));
    assert_error(&e, 12, "installer.kernal", "unknown field `kernal`");
    assert_eq!(
        e.hint.as_deref(),
        Some("did you mean `kernel`? the [installer] table accepts `kernel`, `initrd`, `args`")
    );

    let e = parse_err(&with_installer("kernel = 1"));
    assert_error(&e, 12, "installer.kernel", "expected a string");
    assert_eq!(
        e.hint.as_deref(),
        Some("write it like `kernel = \"/boot/vmlinuz-6.1.0-18-amd64\"`")
    );
}

#[test]
fn changed_installer_fields_need_a_restart() {
    let running = parse(&minimal("")).unwrap();
    let edited = parse(&with_installer("kernel = \"/boot/vmlinuz-6.1.0-18-amd64\"")).unwrap();
    assert_eq!(running.changed_fields(&edited), ["installer.kernel"]);

    let running = parse(&with_installer(
        "kernel = \"/k\"\ninitrd = \"/i\"\nargs = \"auto=true\"",
    ))
    .unwrap();
    let edited = parse(&with_installer(
        "kernel = \"/k\"\ninitrd = \"/j\"\nargs = \"auto=false\"",
    ))
    .unwrap();
    assert_eq!(
        running.changed_fields(&edited),
        ["installer.initrd", "installer.args"]
    );
    assert!(running.changed_fields(&running.clone()).is_empty());
}

#[test]
fn heal_grace_defaults_to_a_minute_and_is_bounded() {
    let config = parse(&minimal("")).unwrap();
    assert_eq!(config.clusters.heal_grace, Duration::from_secs(60));
    let config = parse(&minimal("heal_grace = \"5m\"\n")).unwrap();
    assert_eq!(config.clusters.heal_grace, Duration::from_secs(300));
    let e = parse_err(&minimal("heal_grace = \"2s\"\n"));
    assert_error(&e, 11, "clusters.heal_grace", "\"2s\" is out of range");
    assert!(e.hint.unwrap_or_default().contains("between 10s and 1h"));
    let e = parse_err(&minimal("heal_grace = \"soon\"\n"));
    assert_error(&e, 11, "clusters.heal_grace", "invalid duration \"soon\"");
}

#[test]
fn lease_and_reserve_deadline_are_config_with_bounds() {
    let config = parse(&minimal("")).unwrap();
    assert_eq!(
        (config.clusters.lease, config.clusters.reserve_deadline),
        (Duration::from_secs(30), Duration::from_secs(60))
    );
    let config = parse(&minimal("lease = \"2m\"\nreserve_deadline = \"5m\"\n")).unwrap();
    assert_eq!(
        (config.clusters.lease, config.clusters.reserve_deadline),
        (Duration::from_secs(120), Duration::from_secs(300))
    );
    let e = parse_err(&minimal("lease = \"1h\"\n"));
    assert_error(&e, 11, "clusters.lease", "\"1h\" is out of range");
    assert!(e.hint.unwrap_or_default().contains("between 5s and 10m"));
    let e = parse_err(&minimal("reserve_deadline = \"1s\"\n"));
    assert_error(
        &e,
        11,
        "clusters.reserve_deadline",
        "\"1s\" is out of range",
    );
}

#[test]
fn api_limits_are_config_with_bounds() {
    let config = parse(&minimal("")).unwrap();
    assert_eq!(
        (
            config.api.connections_max,
            config.api.requests_max,
            config.api.client_timeout
        ),
        (1024, 64, Duration::from_secs(10))
    );
    let config = parse(&minimal(
        "[api]\nconnections_max = 64\nrequests_max = 8\nclient_timeout = \"2s\"\n",
    ))
    .unwrap();
    assert_eq!(
        (
            config.api.connections_max,
            config.api.requests_max,
            config.api.client_timeout
        ),
        (64, 8, Duration::from_secs(2))
    );
    let e = parse_err(&minimal("[api]\nconnections_max = 2\n"));
    assert_error(&e, 12, "api.connections_max", "2 is out of range");
    assert!(e.hint.unwrap_or_default().contains("between 16 and 16384"));
    let e = parse_err(&minimal("[api]\nrequests_max = 0\n"));
    assert_error(&e, 12, "api.requests_max", "0 is out of range");
    let e = parse_err(&minimal("[api]\nclient_timeout = \"1h\"\n"));
    assert_error(&e, 12, "api.client_timeout", "\"1h\" is out of range");
    assert!(e.hint.unwrap_or_default().contains("between 1s and 5m"));
}

#[test]
fn the_gateways_busy_poll_is_off_by_default_and_bounded() {
    let config = parse(&minimal("")).unwrap();
    assert_eq!(config.gateway.busy_poll, Duration::ZERO);
    let config = parse(&minimal("[gateway]\nbusy_poll = \"200ms\"\n")).unwrap();
    assert_eq!(config.gateway.busy_poll, Duration::from_millis(200));
    let e = parse_err(&minimal("[gateway]\nbusy_poll = \"2s\"\n"));
    assert_error(&e, 12, "gateway.busy_poll", "\"2s\" is out of range");
    assert!(e.hint.unwrap_or_default().contains("between 0s and 1s"));
    let e = parse_err(&minimal("[gateway]\nbusy_poll = \"soon\"\n"));
    assert_error(&e, 12, "gateway.busy_poll", "invalid duration");
}

#[test]
fn the_gateways_niceness_is_unchanged_by_default_and_bounded() {
    assert_eq!(parse(&minimal("")).unwrap().gateway.nice, 0);
    let config = parse(&minimal("[gateway]\nnice = -20\n")).unwrap();
    assert_eq!(config.gateway.nice, -20);
    let e = parse_err(&minimal("[gateway]\nnice = -21\n"));
    assert_error(&e, 12, "gateway.nice", "-21 is out of range");
    assert!(e.hint.unwrap_or_default().contains("between -20"));
    let e = parse_err(&minimal("[gateway]\nnice = 99999999999\n"));
    assert_error(&e, 12, "gateway.nice", "out of range");
}
