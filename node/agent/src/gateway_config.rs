//! The configuration file of `vcfed gateway --config FILE`: the data plane
//! alone, with its peers and segments given explicitly.
//!
//! ```toml
//! private_key_file = "tunnel.key"   # base64 WireGuard key, mode 0600
//! listen = "0.0.0.0:7782"           # UDP address of the data plane
//! # inner_mtu = 1440                # WAN path MTU - 60; default for a 1500-byte path
//! # link_prefix = "vcf"             # names of the links the gateway creates
//! # busy_poll = "0s"                # poll this long after a packet instead of sleeping (max 1s)
//! # nice = 0                        # the data plane thread's niceness, -20 (first served) to 19
//!
//! [[peers]]
//! index = 2                         # 1 to 16777215, unique
//! public_key = "hDWy...Ez4="        # the peer's `vcfed gateway pubkey`
//! endpoint = "203.0.113.7:7782"     # optional: where to reach it first
//!
//! [[segments]]
//! id = 100                          # the segment id both ends use
//! peers = [2]                       # which peers carry it too
//! bridge = "br-site"                # bridge mode: an existing bridge
//! # trunk = "eth1"                  # or trunk mode: eth1.<vlan> in a new bridge
//! # vlan = 100
//! # (neither: a new bridge <prefix>b<id> that local ports are attached to)
//! ```
//!
//! Errors are [`ConfigError`]s, like the site configuration's: file, line,
//! column, the field as a dotted path (`segments[1].trunk`) and a hint.

// `ConfigError` is large by design; see `config/mod.rs`.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use toml::Spanned;
use vcfed_overlay::encap::INNER_MTU_DEFAULT;
use vcfed_overlay::gateway::{PEERS_MAX, PeerConfig};
use vcfed_overlay::linux::{
    GatewayConfig, IFNAME_LEN_MAX, INNER_MTU_MAX, INNER_MTU_MIN, LINK_PREFIX_DEFAULT, SEGMENTS_MAX,
    SegmentConfig, SiteLink, link_names, segment_bridge_name,
};

use crate::config::diagnostics::{ConfigError, Source};

/// Longest `link_prefix`, bytes.
pub(crate) const LINK_PREFIX_LEN_MAX: usize = 8;
/// Highest peer index: WireGuard session indices keep 24 bits for it.
pub(crate) const PEER_INDEX_MAX: u32 = 0x00ff_ffff;

/// Reads and checks the gateway configuration at `path`, including the
/// private key file it names.
pub(crate) fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(path, &e))?;
    parse(&text, path)
}

/// Parses and checks gateway configuration `text` read from `path`
/// (relative paths are resolved against its directory).
pub(crate) fn parse(text: &str, path: &Path) -> Result<GatewayConfig, ConfigError> {
    parse_with_key_reader(text, path, read_private_key)
}

/// [`parse`] with the private key file read by `read_key` (given the
/// resolved path) instead of [`read_private_key`]: the text alone decides
/// the outcome, which is what the fuzz target `gateway_config` (`fuzz/`)
/// needs. A text may name any file; reading `/dev/zero` there would only
/// measure the fuzzer's patience.
pub fn parse_with_key_reader(
    text: &str,
    path: &Path,
    read_key: impl FnOnce(&Path) -> Result<[u8; 32], String>,
) -> Result<GatewayConfig, ConfigError> {
    let source = Source { path, text };
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|e| source.error(e.span(), None, e.message().to_owned(), None))?;
    let raw: RawGatewayFile =
        serde_path_to_error::deserialize(deserializer).map_err(|e| source.deserialize_error(e))?;
    raw.check(&source, read_key)
}

/// Reads a WireGuard private key file (base64, like `wg genkey` writes),
/// refusing one that other users can read.
pub(crate) fn read_private_key(path: &Path) -> Result<[u8; 32], String> {
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "it is readable by other users (mode {mode:o}); run `chmod 600 {}`",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    decode_key(text.trim()).ok_or_else(|| "it is not a WireGuard key (32 bytes in base64)".into())
}

/// A WireGuard key from its base64 text.
pub(crate) fn decode_key(text: &str) -> Option<[u8; 32]> {
    STANDARD
        .decode(text)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGatewayFile {
    private_key_file: Spanned<PathBuf>,
    listen: Spanned<String>,
    inner_mtu: Option<Spanned<u32>>,
    link_prefix: Option<Spanned<String>>,
    busy_poll: Option<Spanned<String>>,
    nice: Option<Spanned<i64>>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    segments: Vec<RawSegment>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    index: Spanned<u32>,
    public_key: Spanned<String>,
    endpoint: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    id: Spanned<u32>,
    peers: Spanned<Vec<Spanned<u32>>>,
    bridge: Option<Spanned<String>>,
    trunk: Option<Spanned<String>>,
    vlan: Option<Spanned<u16>>,
}

impl RawGatewayFile {
    fn check(
        self,
        source: &Source<'_>,
        read_key: impl FnOnce(&Path) -> Result<[u8; 32], String>,
    ) -> Result<GatewayConfig, ConfigError> {
        let key_path = source.path_value(self.private_key_file.clone(), "private_key_file")?;
        let private_key = read_key(&key_path).map_err(|problem| {
            source.invalid(
                &self.private_key_file,
                "private_key_file",
                format!("{}: {problem}", key_path.display()),
                Some(
                    "`vcfed gateway genkey --out FILE` writes a key with mode 0600 (so does \
                     `wg genkey`)"
                        .to_owned(),
                ),
            )
        })?;
        let own_public =
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(private_key))
                .to_bytes();
        let listen = source.socket_addr(Some(self.listen), "listen", "0.0.0.0:7782")?;

        let inner_mtu = match self.inner_mtu {
            None => INNER_MTU_DEFAULT,
            Some(mtu) => {
                let value = usize::try_from(*mtu.get_ref()).unwrap_or(usize::MAX);
                if !(INNER_MTU_MIN..=INNER_MTU_MAX).contains(&value) {
                    return Err(source.invalid(
                        &mtu,
                        "inner_mtu",
                        format!("{value} is outside {INNER_MTU_MIN}-{INNER_MTU_MAX}"),
                        Some(format!(
                            "set it to the WAN path MTU minus 60 (IPv4, UDP, WireGuard), e.g. \
                             {INNER_MTU_DEFAULT} for a 1500-byte path"
                        )),
                    ));
                }
                value
            }
        };

        let link_prefix = match self.link_prefix {
            None => LINK_PREFIX_DEFAULT.to_owned(),
            Some(prefix) => {
                let text = prefix.get_ref();
                let valid = (1..=LINK_PREFIX_LEN_MAX).contains(&text.len())
                    && text
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
                if !valid {
                    return Err(source.invalid(
                        &prefix,
                        "link_prefix",
                        format!("invalid link prefix {text:?}"),
                        Some(format!(
                            "use 1 to {LINK_PREFIX_LEN_MAX} lowercase letters and digits, e.g. \
                             \"{LINK_PREFIX_DEFAULT}\""
                        )),
                    ));
                }
                prefix.into_inner()
            }
        };

        let busy_poll = source.busy_poll(self.busy_poll, "busy_poll")?;
        let nice = source.nice(self.nice, "nice")?;
        let peers = check_peers(self.peers, source, &own_public)?;
        let segments = check_segments(self.segments, source, &peers, &link_prefix)?;
        Ok(GatewayConfig {
            busy_poll,
            nice,
            private_key,
            listen,
            inner_mtu,
            peers: peers.into_values().collect(),
            segments,
            link_prefix,
        })
    }
}

fn check_peers(
    raw: Vec<RawPeer>,
    source: &Source<'_>,
    own_public: &[u8; 32],
) -> Result<BTreeMap<u32, PeerConfig>, ConfigError> {
    if raw.len() > PEERS_MAX {
        return Err(source.error(
            None,
            Some("peers".to_owned()),
            format!("{} peers, more than {PEERS_MAX}", raw.len()),
            None,
        ));
    }
    let mut peers = BTreeMap::new();
    let mut keys = BTreeSet::new();
    for (i, peer) in raw.into_iter().enumerate() {
        let index = *peer.index.get_ref();
        if !(1..=PEER_INDEX_MAX).contains(&index) {
            return Err(source.invalid(
                &peer.index,
                &format!("peers[{i}].index"),
                format!("{index} is outside 1-{PEER_INDEX_MAX}"),
                Some("number the peers 1, 2, 3, ...".to_owned()),
            ));
        }
        if peers.contains_key(&index) {
            return Err(source.invalid(
                &peer.index,
                &format!("peers[{i}].index"),
                format!("index {index} is used by an earlier peer"),
                Some("give every peer its own index".to_owned()),
            ));
        }
        let Some(public_key) = decode_key(peer.public_key.get_ref().trim()) else {
            return Err(source.invalid(
                &peer.public_key,
                &format!("peers[{i}].public_key"),
                "not a WireGuard public key (32 bytes in base64)".to_owned(),
                Some("`vcfed gateway pubkey --key FILE` at the peer prints it".to_owned()),
            ));
        };
        if &public_key == own_public {
            return Err(source.invalid(
                &peer.public_key,
                &format!("peers[{i}].public_key"),
                "this is the gateway's own public key".to_owned(),
                Some("list the other gateways' keys, not this one's".to_owned()),
            ));
        }
        if !keys.insert(public_key) {
            return Err(source.invalid(
                &peer.public_key,
                &format!("peers[{i}].public_key"),
                "the same key as an earlier peer".to_owned(),
                None,
            ));
        }
        let endpoint = match peer.endpoint {
            None => None,
            Some(endpoint) => Some(source.socket_addr(
                Some(endpoint),
                &format!("peers[{i}].endpoint"),
                "203.0.113.7:7782",
            )?),
        };
        peers.insert(
            index,
            PeerConfig {
                index,
                public_key,
                endpoint,
            },
        );
    }
    Ok(peers)
}

fn check_segments(
    raw: Vec<RawSegment>,
    source: &Source<'_>,
    peers: &BTreeMap<u32, PeerConfig>,
    prefix: &str,
) -> Result<Vec<SegmentConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(source.error(
            None,
            Some("segments".to_owned()),
            "no segments: the gateway would carry nothing".to_owned(),
            Some(
                "add a [[segments]] table with `id`, `peers` and `bridge` (or `trunk` and `vlan`)"
                    .to_owned(),
            ),
        ));
    }
    if raw.len() > SEGMENTS_MAX {
        return Err(source.error(
            None,
            Some("segments".to_owned()),
            format!("{} segments, more than {SEGMENTS_MAX}", raw.len()),
            None,
        ));
    }
    let mut segments: Vec<SegmentConfig> = Vec::with_capacity(raw.len());
    // Which segment uses a site bridge or a trunk VLAN: sharing one would
    // join two segments into one network.
    let mut site_sides: BTreeMap<String, u32> = BTreeMap::new();
    for (i, segment) in raw.into_iter().enumerate() {
        let field = |name: &str| format!("segments[{i}].{name}");
        let id = *segment.id.get_ref();
        if segments.iter().any(|s| s.id == id) {
            return Err(source.invalid(
                &segment.id,
                &field("id"),
                format!("segment {id} is listed twice"),
                None,
            ));
        }
        let mut segment_peers = Vec::new();
        for peer in segment.peers.get_ref() {
            let index = *peer.get_ref();
            if !peers.contains_key(&index) {
                return Err(source.invalid(
                    peer,
                    &field("peers"),
                    format!("no peer has index {index}"),
                    Some("list indices of [[peers]] entries".to_owned()),
                ));
            }
            if segment_peers.contains(&index) {
                return Err(source.invalid(
                    peer,
                    &field("peers"),
                    format!("peer {index} is listed twice"),
                    None,
                ));
            }
            segment_peers.push(index);
        }

        let (site_link, used) = match (segment.bridge, segment.trunk, segment.vlan) {
            (Some(_), Some(trunk), _) => {
                return Err(source.invalid(
                    &trunk,
                    &field("trunk"),
                    "both `bridge` and `trunk` are set".to_owned(),
                    Some(
                        "set `bridge` to join an existing Linux bridge, or `trunk` and `vlan` to \
                         carry the segment as an 802.1Q VLAN; not both"
                            .to_owned(),
                    ),
                ));
            }
            (Some(_), None, Some(vlan)) => {
                return Err(source.invalid(
                    &vlan,
                    &field("vlan"),
                    "`vlan` needs `trunk`; a bridge-mode segment has no VLAN".to_owned(),
                    None,
                ));
            }
            (Some(bridge), None, None) => {
                let at = bridge.span();
                let name = source.ifname(bridge, &field("bridge"))?;
                if name
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_prefix('b'))
                    .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
                {
                    return Err(source.error(
                        Some(at),
                        Some(field("bridge")),
                        format!(
                            "{name:?} is named like the gateway's own segment bridges, which it \
                             deletes when it stops"
                        ),
                        Some(format!(
                            "rename the site bridge, or change `link_prefix` (now {prefix:?})"
                        )),
                    ));
                }
                (SiteLink::Bridge(name.clone()), Some((name, at)))
            }
            (None, Some(trunk), vlan) => {
                let Some(vlan) = vlan else {
                    return Err(source.invalid(
                        &trunk,
                        &field("vlan"),
                        "`trunk` needs `vlan`, the segment's VLAN id at this site".to_owned(),
                        Some("add `vlan = 100` (1 to 4094)".to_owned()),
                    ));
                };
                let vlan_id = *vlan.get_ref();
                if !(1..=4094).contains(&vlan_id) {
                    return Err(source.invalid(
                        &vlan,
                        &field("vlan"),
                        format!("{vlan_id} is outside 1-4094"),
                        None,
                    ));
                }
                let at = trunk.span();
                let trunk = source.ifname(trunk, &field("trunk"))?;
                let key = format!("{trunk}.{vlan_id}");
                (
                    SiteLink::Trunk {
                        trunk,
                        vlan: vlan_id,
                    },
                    Some((key, at)),
                )
            }
            (None, None, Some(vlan)) => {
                return Err(source.invalid(
                    &vlan,
                    &field("vlan"),
                    "`vlan` needs `trunk`".to_owned(),
                    Some("add `trunk = \"eth1\"`, the interface that carries the VLANs".to_owned()),
                ));
            }
            (None, None, None) => (SiteLink::SegmentBridge, None),
        };
        if let Some((key, at)) = used
            && let Some(other) = site_sides.insert(key.clone(), id)
        {
            return Err(source.error(
                Some(at),
                Some(field(if matches!(site_link, SiteLink::Bridge(_)) {
                    "bridge"
                } else {
                    "trunk"
                })),
                format!("{key} already carries segment {other}"),
                Some("each segment needs its own bridge or VLAN".to_owned()),
            ));
        }
        let config = SegmentConfig {
            id,
            peers: segment_peers,
            site_link,
        };
        let names = link_names(prefix, &config);
        let too_long = [Some(&names.tap), Some(&names.bridge), names.vlan.as_ref()]
            .into_iter()
            .flatten()
            .find(|name| name.len() > IFNAME_LEN_MAX);
        if let Some(name) = too_long {
            return Err(source.invalid(
                &segment.id,
                &field("id"),
                format!(
                    "the interface name {name:?} would be {} bytes, more than {IFNAME_LEN_MAX}",
                    name.len()
                ),
                Some(format!(
                    "use a shorter `link_prefix`, a smaller segment id or a shorter trunk name \
                     (the gateway names its bridge {:?})",
                    segment_bridge_name(prefix, id)
                )),
            ));
        }
        segments.push(config);
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    const PEER_KEY: &str = "hDWyl8Q0ezyS1N2+9a1S9Vw3lw4J8KXxFIpcKmQFEz4=";

    fn files() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("gw.key");
        crate::identity::write_file(
            &key,
            format!("{}\n", STANDARD.encode([7u8; 32])).as_bytes(),
            0o600,
        )
        .unwrap();
        Files { dir }
    }

    impl Files {
        fn parse(&self, text: &str) -> Result<GatewayConfig, ConfigError> {
            let path = self.dir.path().join("gateway.toml");
            let mut file = std::fs::File::create(&path).unwrap();
            file.write_all(text.as_bytes()).unwrap();
            load(&path)
        }

        fn err(&self, text: &str) -> ConfigError {
            match self.parse(text) {
                Ok(config) => panic!("accepted: {config:?}\n{text}"),
                Err(e) => e,
            }
        }
    }

    fn with_segment(segment: &str) -> String {
        format!(
            "private_key_file = \"gw.key\"\nlisten = \"198.18.0.1:7782\"\n\
             [[peers]]\nindex = 2\npublic_key = \"{PEER_KEY}\"\nendpoint = \"198.18.0.2:7782\"\n\
             [[segments]]\n{segment}\n"
        )
    }

    /// A valid file with one more top-level `setting`.
    fn with_setting(setting: &str) -> String {
        with_segment("id = 1\npeers = [2]\nbridge = \"br0\"")
            .replace("listen", &format!("{setting}\nlisten"))
    }

    #[test]
    fn a_full_file_loads() {
        let f = files();
        let config = f
            .parse(&with_segment("id = 100\npeers = [2]\nbridge = \"br-site\""))
            .unwrap();
        assert_eq!(config.private_key, [7; 32]);
        assert_eq!(config.listen, "198.18.0.1:7782".parse().unwrap());
        assert_eq!(config.inner_mtu, INNER_MTU_DEFAULT);
        assert_eq!(config.busy_poll, std::time::Duration::ZERO);
        assert_eq!(config.nice, 0);
        assert_eq!(config.link_prefix, "vcf");
        assert_eq!(config.peers.len(), 1);
        assert_eq!(config.peers[0].index, 2);
        assert_eq!(
            config.peers[0].endpoint,
            Some("198.18.0.2:7782".parse().unwrap())
        );
        assert_eq!(
            config.segments,
            [SegmentConfig {
                id: 100,
                peers: vec![2],
                site_link: SiteLink::Bridge("br-site".into()),
            }]
        );
        let trunk = f
            .parse(&with_segment(
                "id = 7\npeers = []\ntrunk = \"eth1\"\nvlan = 100",
            ))
            .unwrap();
        assert_eq!(
            trunk.segments[0].site_link,
            SiteLink::Trunk {
                trunk: "eth1".into(),
                vlan: 100
            }
        );
        let own = f.parse(&with_segment("id = 7\npeers = [2]")).unwrap();
        assert_eq!(own.segments[0].site_link, SiteLink::SegmentBridge);
        assert!(!format!("{own:?}").contains("private_key:"));
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let f = files();
        let cases = [
            (
                with_segment("id = 1\npeers = [3]\nbridge = \"br0\""),
                "segments[0].peers",
                "no peer has index 3",
            ),
            (
                with_segment("id = 1\npeers = [2]\nbridge = \"br0\"\ntrunk = \"eth1\""),
                "segments[0].trunk",
                "both",
            ),
            (
                with_segment("id = 1\npeers = [2]\ntrunk = \"eth1\""),
                "segments[0].vlan",
                "needs `vlan`",
            ),
            (
                with_segment("id = 1\npeers = [2]\ntrunk = \"eth1\"\nvlan = 4095"),
                "segments[0].vlan",
                "outside",
            ),
            (
                with_segment("id = 1\npeers = [2]\ntrunk = \"enp10s0f1np1\"\nvlan = 4000"),
                "segments[0].id",
                "more than 15",
            ),
            (
                with_segment("id = 4294967295\npeers = [2]\nbridge = \"br0\"")
                    .replace("listen", "link_prefix = \"vcfed\"\nlisten"),
                "segments[0].id",
                "more than 15",
            ),
            (
                with_segment("id = 1\npeers = [2]\nbridge = \"vcfb3\""),
                "segments[0].bridge",
                "deletes",
            ),
            (
                with_segment(
                    "id = 1\npeers = [2]\nbridge = \"br0\"\n[[segments]]\nid = 2\npeers = [2]\nbridge = \"br0\"",
                ),
                "segments[1].bridge",
                "already carries segment 1",
            ),
            (
                with_segment("id = 1\npeers = [2]\nbridge = \"br0\"").replace(PEER_KEY, "abc"),
                "peers[0].public_key",
                "not a WireGuard public key",
            ),
            (
                with_segment("id = 1\npeers = [2]\nbridge = \"br0\"")
                    .replace("198.18.0.2:7782", "gw.example.org:7782"),
                "peers[0].endpoint",
                "invalid socket address",
            ),
            (with_setting("inner_mtu = 100"), "inner_mtu", "outside"),
            (
                with_setting("busy_poll = \"5s\""),
                "busy_poll",
                "out of range",
            ),
            (with_setting("nice = -21"), "nice", "out of range"),
            (
                with_segment("id = 1\npeers = [2]\nbridge = \"br0\"\ncolour = 3"),
                "segments[0].colour",
                "unknown field",
            ),
        ];
        for (text, field, message) in cases {
            let e = f.err(&text);
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.message.contains(message), "{e}");
            assert!(e.line.is_some(), "{e}");
        }
        let e = f.err("private_key_file = \"gw.key\"\nlisten = \"198.18.0.1:7782\"\n");
        assert_eq!(e.field.as_deref(), Some("segments"), "{e}");
    }

    #[test]
    fn the_key_must_be_private_and_valid() {
        let f = files();
        let key = f.dir.path().join("gw.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = f.err(&with_segment("id = 1\npeers = [2]"));
        assert_eq!(e.field.as_deref(), Some("private_key_file"));
        assert!(e.message.contains("chmod 600"), "{e}");
        crate::identity::write_file(&key, b"not base64\n", 0o600).unwrap();
        let e = f.err(&with_segment("id = 1\npeers = [2]"));
        assert!(e.message.contains("not a WireGuard key"), "{e}");
        // The gateway's own key is no peer.
        let own = STANDARD.encode(
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7u8; 32])).to_bytes(),
        );
        crate::identity::write_file(&key, STANDARD.encode([7u8; 32]).as_bytes(), 0o600).unwrap();
        let e = f.err(&with_segment("id = 1\npeers = [2]").replace(PEER_KEY, &own));
        assert_eq!(e.field.as_deref(), Some("peers[0].public_key"));
    }
}
