//! Where a configuration error is: [`ConfigError`], and the [`Source`] that turns the byte
//! spans kept by the first pass into `file:line:column`, a dotted field path and a hint.
//!
//! Both configuration files of the crate use it: the site's (`vcfed.toml`, [`super`]) and the
//! gateway's ([`crate::gateway_config`]).

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

/// Longest Linux interface name, in bytes (`IFNAMSIZ` is 16 including the NUL).
const IFNAME_BYTES_MAX: usize = 15;

/// Why a configuration was refused.
///
/// Its `Display` is one paragraph, `FILE:LINE:COLUMN: field `FIELD`: MESSAGE`, with the hint
/// on a second, indented line; parts that are not known are left out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The configuration file, as given by the caller.
    pub path: PathBuf,
    /// 1-based line the problem is on; `None` when the problem has no place in the file (the
    /// file cannot be read, or a whole top-level table is missing).
    pub line: Option<usize>,
    /// 1-based column, in characters, within `line`.
    pub column: Option<usize>,
    /// Dotted path of the field at fault, e.g. `inventory.hosts[1].cores`; `None` for syntax
    /// errors and unreadable files.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is something more useful to say than the message.
    pub hint: Option<String>,
}

impl ConfigError {
    /// A configuration file that cannot be read (missing, no permission,
    /// not UTF-8): no line to point at, the I/O error in the message.
    pub(crate) fn unreadable(path: &Path, error: &std::io::Error) -> ConfigError {
        ConfigError {
            path: path.to_path_buf(),
            line: None,
            column: None,
            field: None,
            message: format!("cannot read the configuration file: {error}"),
            hint: None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// The text being parsed and where it came from, to turn byte spans into error locations.
/// Shared with the other configuration files of the crate (`vcfed gateway`'s).
pub(crate) struct Source<'a> {
    pub(crate) path: &'a Path,
    pub(crate) text: &'a str,
}

impl Source<'_> {
    /// An error located at the start of `span`, or nowhere when `span` is `None`.
    pub(crate) fn error(
        &self,
        span: Option<Range<usize>>,
        field: Option<String>,
        message: String,
        hint: Option<String>,
    ) -> ConfigError {
        let (line, column) = span.map(|span| line_column(self.text, span.start)).unzip();
        ConfigError {
            path: self.path.to_path_buf(),
            line,
            column,
            field,
            message,
            hint,
        }
    }

    /// An error about the value `at`, which is the field `field`.
    pub(crate) fn invalid<T>(
        &self,
        at: &Spanned<T>,
        field: &str,
        message: String,
        hint: Option<String>,
    ) -> ConfigError {
        self.error(Some(at.span()), Some(field.to_owned()), message, hint)
    }

    /// Turns a serde error into a config error, naming the field serde was at and adding a
    /// hint for the kinds of mistakes people make: a missing field, a misspelled one, a value
    /// of the wrong type.
    pub(crate) fn deserialize_error(
        &self,
        error: serde_path_to_error::Error<toml::de::Error>,
    ) -> ConfigError {
        let path = field_path(error.path());
        let error = error.into_inner();
        let message = error.message();

        if let Some(name) = quoted_after(message, "missing field `") {
            let field = join_field(&path, name);
            if path.is_empty() {
                // The span of a missing top-level table is the whole document, which says
                // nothing about where to add it.
                return self.error(
                    None,
                    Some(field),
                    format!("required table [{name}] is missing"),
                    Some(format!(
                        "add a [{name}] table; `vcfed init` writes a complete, commented example"
                    )),
                );
            }
            let hint =
                example(&field).map(|example| format!("add `{example}` to {}", table_label(&path)));
            return self.error(
                error.span(),
                Some(field),
                "required field is missing".to_owned(),
                hint,
            );
        }

        if let Some(name) = quoted_after(message, "unknown field `") {
            // serde_path_to_error already includes the unknown key in the path.
            let table = path
                .strip_suffix(name)
                .map(|parent| parent.trim_end_matches('.'))
                .unwrap_or_default();
            return self.error(
                error.span(),
                Some(path.clone()),
                format!("unknown field `{name}`"),
                unknown_field_hint(name, table, message),
            );
        }

        let field = (!path.is_empty()).then_some(path);
        let hint = field
            .as_deref()
            .and_then(example)
            .map(|example| format!("write it like `{example}`"));
        self.error(error.span(), field, in_toml_terms(message), hint)
    }

    /// A path from the file, resolved against the config file's directory.
    pub(crate) fn path_value(
        &self,
        value: Spanned<PathBuf>,
        field: &str,
    ) -> Result<PathBuf, ConfigError> {
        if value.get_ref().as_os_str().is_empty() {
            return Err(self.invalid(
                &value,
                field,
                "path is empty".to_owned(),
                example(field).map(|example| format!("write it like `{example}`")),
            ));
        }
        let value = value.into_inner();
        if value.is_absolute() {
            return Ok(value);
        }
        let dir = self.path.parent().unwrap_or(Path::new(""));
        Ok(dir.join(value))
    }

    /// The socket address in `value`, or `default` when the field is absent.
    pub(crate) fn socket_addr(
        &self,
        value: Option<Spanned<String>>,
        field: &str,
        default: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let Some(value) = value else {
            return Ok(default
                .parse()
                .expect("the default listen addresses are valid socket addresses"));
        };
        value.get_ref().parse::<SocketAddr>().map_err(|e| {
            self.invalid(
                &value,
                field,
                format!("invalid socket address {:?}: {e}", value.get_ref()),
                Some(format!(
                    "write an IP address and a port from 0 to 65535, e.g. \"{default}\"; host \
                     names are not accepted here"
                )),
            )
        })
    }

    pub(crate) fn ifname(
        &self,
        value: Spanned<String>,
        field: &str,
    ) -> Result<String, ConfigError> {
        if let Some(problem) = ifname_problem(value.get_ref()) {
            return Err(self.invalid(
                &value,
                field,
                format!("invalid interface name {:?}: {problem}", value.get_ref()),
                Some(format!(
                    "a Linux interface name is 1 to {IFNAME_BYTES_MAX} bytes without '/', ':' \
                     or whitespace, e.g. \"br-site\" or \"eth1\""
                )),
            ));
        }
        Ok(value.into_inner())
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    // Spans from the toml crate fall on character boundaries; this only guards the slicing.
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The dotted field path of a serde path, such as `inventory.hosts[1].cores`, without the
/// segments that `toml::Spanned` adds internally.
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;

    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key.starts_with("$__serde_spanned_private_") {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

fn join_field(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// The text between `prefix` and the next backtick in `message`, e.g. the field name in
/// serde's "missing field `name`".
fn quoted_after<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(quoted, _)| quoted)
}

/// `message` with serde's name for the expected type (the Rust type, such as `u32` or
/// `struct RawSite`) replaced by the TOML one that the user writes.
fn in_toml_terms(message: &str) -> String {
    let Some((found, expected)) = message.rsplit_once(", expected ") else {
        return message.to_owned();
    };
    // A number past the type's range: "integer `99999999999`, expected u32".
    let max = match expected {
        "u32" => Some(u64::from(u32::MAX)),
        "u64" => Some(u64::MAX),
        _ => None,
    };
    if let Some(max) = max
        && let Some(number) = quoted_after(found, "invalid value: integer `")
        && !number.starts_with('-')
    {
        return format!("{number} is too large: at most {max}");
    }
    let expected = match expected {
        "u32" | "u64" => "a non-negative integer",
        "a sequence" => "an array",
        "path string" => "a string",
        table if table.starts_with("struct ") => "a table",
        other => other,
    };
    format!("{found}, expected {expected}")
}

/// How to refer to the table at dotted path `table` in a hint.
fn table_label(table: &str) -> String {
    if table.is_empty() {
        "the top level".to_owned()
    } else if table.ends_with(']') {
        format!("`{table}`")
    } else {
        format!("the [{table}] table")
    }
}

/// The fields serde lists as expected in `message` (its "unknown field `x`, expected one of
/// `a`, `b`"), with a guess at the one meant when `name` is a near miss.
fn unknown_field_hint(name: &str, table: &str, message: &str) -> Option<String> {
    let (_, expected) = message.split_once(", expected")?;
    let accepted: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let list = accepted
        .iter()
        .map(|field| format!("`{field}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut hint = format!("{} accepts {list}", table_label(table));
    let closest = accepted
        .iter()
        .map(|field| (edit_distance(name, field), *field))
        .min();
    if let Some((distance, field)) = closest
        && distance <= 2
    {
        hint = format!("did you mean `{field}`? {hint}");
    }
    Some(hint)
}

/// Levenshtein distance between `a` and `b`, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, b_char) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(a_char != *b_char);
            let delete = previous[j + 1] + 1;
            let insert = current[j] + 1;
            current.push(substitute.min(delete).min(insert));
        }
        previous = current;
    }
    previous[b.len()]
}

/// A correct line for `field` (indices like `[1]` are ignored), for hints.
pub(super) fn example(field: &str) -> Option<&'static str> {
    let mut normalized = String::with_capacity(field.len());
    let mut in_index = false;
    for c in field.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            _ if !in_index => normalized.push(c),
            _ => {}
        }
    }
    Some(match normalized.as_str() {
        "site.name" => r#"name = "site-a""#,
        "site.data_dir" => r#"data_dir = "/var/lib/vcfed""#,
        "federation.listen" => r#"listen = ["/ip4/0.0.0.0/tcp/7781"]"#,
        "federation.bootstrap" => r#"bootstrap = ["/ip4/203.0.113.7/tcp/7781/p2p/12D3KooW..."]"#,
        "federation.psk_file" => r#"psk_file = "federation.psk""#,
        "federation.allow_peers" => r#"allow_peers = ["12D3KooW..."]"#,
        "federation.advert_ttl" => r#"advert_ttl = "30s""#,
        "federation.advert_refresh" => r#"advert_refresh = "10s""#,
        "federation.anti_entropy" => r#"anti_entropy = "2s""#,
        "api.listen" => r#"listen = "127.0.0.1:7780""#,
        "api.token_file" => r#"token_file = "api.token""#,
        "api.connections_max" => "connections_max = 1024",
        "api.requests_max" => "requests_max = 64",
        "api.client_timeout" => r#"client_timeout = "10s""#,
        "inventory.node" => "node = { cores = 2, memory_mib = 4096, disk_gib = 20 }",
        "inventory.node.cores" => "cores = 2",
        "inventory.node.memory_mib" => "memory_mib = 4096",
        "inventory.node.disk_gib" => "disk_gib = 20",
        "inventory.nodes" => "nodes = 4",
        "inventory.hosts" => {
            r#"hosts = [{ name = "h1", cores = 32, memory_mib = 131072, disk_gib = 2000 }]"#
        }
        "inventory.hosts.name" => r#"name = "h1""#,
        "inventory.hosts.cores" => "cores = 32",
        "inventory.hosts.memory_mib" => "memory_mib = 131072",
        "inventory.hosts.disk_gib" => "disk_gib = 2000",
        "clusters.vlans" => r#"vlans = "100-199""#,
        "clusters.heal_grace" => r#"heal_grace = "60s""#,
        "clusters.lease" => r#"lease = "30s""#,
        "clusters.reserve_deadline" => r#"reserve_deadline = "60s""#,
        "gateway.listen" => r#"listen = "0.0.0.0:7782""#,
        "gateway.endpoint" => r#"endpoint = "gw.example.org:7782""#,
        "gateway.bridge" => r#"bridge = "br-site""#,
        "gateway.trunk" => r#"trunk = "eth1""#,
        "libvirt.hosts" => r#"hosts = ["qemu:///system", "qemu+ssh://root@hv2/system"]"#,
        "libvirt.pool" => r#"pool = "default""#,
        "libvirt.base_image" => r#"base_image = "/var/lib/libvirt/images/node-base.qcow2""#,
        "libvirt.frontend_image" => r#"frontend_image = "/var/lib/libvirt/images/frontend.qcow2""#,
        "libvirt.console_dir" => r#"console_dir = "/var/lib/vcfed/consoles""#,
        "libvirt.keep_volumes" => "keep_volumes = false",
        "libvirt.accel" => r#"accel = "auto""#,
        "libvirt.shutdown_timeout_s" => "shutdown_timeout_s = 10",
        "libvirt.memory_mib" => "memory_mib = 2048",
        "libvirt.remote_bridge" => r#"remote_bridge = "br{vlan}""#,
        "installer.kernel" => r#"kernel = "/boot/vmlinuz-6.1.0-18-amd64""#,
        "installer.initrd" => r#"initrd = "/srv/installer/initrd.gz""#,
        "installer.args" => r#"args = "console=ttyS0 auto=true priority=critical""#,
        // The file of `vcfed gateway --config` (see `gateway_config`).
        "private_key_file" => r#"private_key_file = "tunnel.key""#,
        "listen" => r#"listen = "0.0.0.0:7782""#,
        "inner_mtu" => "inner_mtu = 1440",
        "link_prefix" => r#"link_prefix = "vcf""#,
        "peers" => r#"peers = [{ index = 2, public_key = "...", endpoint = "203.0.113.7:7782" }]"#,
        "peers.index" => "index = 2",
        "peers.public_key" => r#"public_key = "hDWy...Ez4=""#,
        "peers.endpoint" => r#"endpoint = "203.0.113.7:7782""#,
        "segments" => r#"segments = [{ id = 100, peers = [2], bridge = "br-site" }]"#,
        "segments.id" => "id = 100",
        "segments.peers" => "peers = [2, 3]",
        "segments.bridge" => r#"bridge = "br-site""#,
        "segments.trunk" => r#"trunk = "eth1""#,
        "segments.vlan" => "vlan = 100",
        _ => return None,
    })
}

/// What is wrong with `name` as a Linux interface name, if anything; the kernel's rules
/// (`dev_valid_name`).
pub(super) fn ifname_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".to_owned());
    }
    if name.len() > IFNAME_BYTES_MAX {
        return Some(format!(
            "it is {} bytes long, more than {IFNAME_BYTES_MAX}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Some("\".\" and \"..\" are not interface names".to_owned());
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace())
    {
        return Some(format!("it contains {c:?}"));
    }
    None
}
