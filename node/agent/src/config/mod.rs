//! The site configuration file, `vcfed.toml`.
//!
//! `vcfed init` writes a commented file with [`render_template`]; `vcfed run --config FILE`
//! reads it with [`Config::load`]. A bad file is refused before anything starts, with a
//! [`ConfigError`] that names the file, the line and column, the field (as a dotted path such
//! as `inventory.hosts[1].cores`) and, where one helps, a hint saying how to fix it.
//!
//! Loading takes two passes. Serde first deserializes the TOML into private `Raw*` structs that
//! reject unknown fields and keep the byte span of every value that a later check looks at
//! ([`toml::Spanned`]). A second pass then checks the rules serde cannot express (name syntax,
//! address forms, VLAN bounds, "exactly one of", capacity) and builds the public types. Keeping
//! the spans is what lets every error, including the semantic ones, name a line.
//!
//! Relative paths in the file are resolved against the directory that holds the file, so a
//! configuration means the same thing whatever the working directory of `vcfed` is. The paths
//! of `[libvirt]` and `[installer]` are the exception: they must be absolute, because libvirt
//! may use them on another host, where this file's directory means nothing, and because the
//! installer's kernel and initrd are files of the system (under `/boot`, say), not of the
//! configuration.
//!
//! The submodules follow the two passes: `checks` holds the `Raw*` structs and the rules of
//! the second pass, `types` the checked types it builds, `diagnostics` the machinery that turns
//! a byte span into `file:line:column` with a hint (shared with [`crate::gateway_config`]), and
//! `template` the file that `vcfed init` writes.

// `ConfigError` is a plain struct of location fields (about 128 bytes) so that callers can read
// them directly. It is built at most once per start-up, so the size of `Result` costs nothing
// worth boxing for.
#![allow(clippy::result_large_err)]

use std::path::Path;

mod checks;
pub(crate) mod diagnostics;
mod template;
mod types;

#[cfg(test)]
mod tests;

pub use diagnostics::ConfigError;
pub use template::{InitParams, render_template};
pub use types::{
    Accel, ApiConfig, ClustersConfig, Config, DriverKind, FederationConfig, GatewayConfig,
    GossipTiming, Host, InstallerConfig, Inventory, InventorySource, LibvirtConfig, NodeShape,
    ParseVlanRangeError, SiteConfig, SiteLink, VlanRange,
};

use checks::RawConfig;
use diagnostics::Source;

/// Default address of the local HTTP API: loopback only, so it is not exposed by accident.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7780";
/// Default listen address of the federation (libp2p) transport.
pub const DEFAULT_FEDERATION_LISTEN: &str = "/ip4/0.0.0.0/tcp/7781";
/// Default UDP address of the data-plane gateway.
pub const DEFAULT_GATEWAY_LISTEN: &str = "0.0.0.0:7782";
/// libvirt connection URI of the one hypervisor host used when `libvirt.hosts` is not set:
/// the local system libvirtd.
pub const DEFAULT_LIBVIRT_HOST: &str = "qemu:///system";
/// `libvirt.remote_bridge` when not set.
pub const DEFAULT_LIBVIRT_REMOTE_BRIDGE: &str = "br{vlan}";
/// `libvirt.shutdown_timeout_s` when not set, in seconds.
pub const DEFAULT_LIBVIRT_SHUTDOWN_TIMEOUT_S: u64 = 10;
/// Conventional file name of the site configuration.
pub const CONFIG_FILE_NAME: &str = "vcfed.toml";

impl Config {
    /// Reads and checks the configuration file at `path`.
    ///
    /// An unreadable file (missing, no permission, not UTF-8) gives an error without a line
    /// whose message includes the I/O error.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(path, &e))?;
        Config::parse(&text, path)
    }

    /// Parses and checks configuration `text` that was read from `path`.
    ///
    /// `path` names the file in errors, and relative paths in the text are resolved against
    /// its directory.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let source = Source { path, text };
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| source.error(e.span(), None, e.message().to_owned(), None))?;
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| source.deserialize_error(e))?;
        raw.check(&source)
    }
}
