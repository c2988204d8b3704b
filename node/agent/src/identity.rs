//! The site's secrets on disk: federation identity, tunnel key, API token.
//!
//! - `federation.key`: the Ed25519 identity in the libp2p keypair encoding
//!   (protobuf), so the peer id derives from it and libp2p loads it as is.
//! - `tunnel.key` / `tunnel.pub`: the X25519 key of the gateway's WireGuard
//!   sessions, base64 like `wg genkey` / `wg pubkey` write them.
//! - `api.token`: the bearer token of the local HTTP API.
//!
//! Secret files are created with mode 0600 through a temporary file and a
//! rename, so a crash never leaves a half-written key; loading refuses a
//! secret that other users can read, as ssh does.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use libp2p_identity::{Keypair, PeerId};
use ring::rand::{SecureRandom, SystemRandom};

/// File name of the federation identity inside the data dir.
pub const FEDERATION_KEY_FILE: &str = "federation.key";
/// File name of the tunnel private key inside the data dir.
pub const TUNNEL_KEY_FILE: &str = "tunnel.key";
/// File name of the tunnel public key inside the data dir.
pub const TUNNEL_PUB_FILE: &str = "tunnel.pub";
/// File name of the API token inside the data dir.
pub const API_TOKEN_FILE: &str = "api.token";
/// Random bytes in an API token.
const TOKEN_BYTES: usize = 32;
/// Permission bits refused on a private key: any for the group or others.
const KEY_MODE_REFUSED: u32 = 0o077;
/// Permission bits refused on the API token: it may be shared read-only
/// with an operators' group (0640, 0440), never written or run by the group
/// and never reached by other users.
const TOKEN_MODE_REFUSED: u32 = 0o037;

/// Errors reading or writing the site's secrets.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written. The OS error is the source, not
    /// part of the message: `{e:#}` prints the chain, and would print it twice.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A secret exists and would be overwritten.
    #[error("{path} already exists; pass --force to replace it (the site gets a new identity)")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A secret is open to more users than its kind allows.
    #[error("{path} has mode {mode:03o}, which opens it to {who}; {fix}")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Who may reach it that should not: "other users" or "its group".
        who: &'static str,
        /// The chmod that makes it acceptable.
        fix: String,
    },
    /// A secret does not decode.
    #[error("{path} is not a valid {what}: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The system random source failed.
    #[error("the system random source failed")]
    Random,
}

/// The secrets of one site, loaded.
pub struct SiteKeys {
    /// Federation identity.
    pub federation: Keypair,
    /// WireGuard private key of the gateway.
    pub tunnel: x25519_dalek::StaticSecret,
    /// The API bearer token.
    pub api_token: String,
}

impl std::fmt::Debug for SiteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach logs.
        f.debug_struct("SiteKeys")
            .field("peer_id", &self.peer_id())
            .field("tunnel_public_key", &self.tunnel_public_key())
            .finish_non_exhaustive()
    }
}

impl SiteKeys {
    /// The site's peer id in the federation.
    pub fn peer_id(&self) -> PeerId {
        self.federation.public().to_peer_id()
    }

    /// The gateway's WireGuard public key, base64.
    pub fn tunnel_public_key(&self) -> String {
        STANDARD.encode(x25519_dalek::PublicKey::from(&self.tunnel).as_bytes())
    }
}

/// Where a site's secrets live.
#[derive(Debug, Clone)]
pub struct KeyPaths {
    /// Federation identity.
    pub federation: PathBuf,
    /// Tunnel private key.
    pub tunnel: PathBuf,
    /// Tunnel public key (not secret).
    pub tunnel_pub: PathBuf,
    /// API token.
    pub api_token: PathBuf,
}

impl KeyPaths {
    /// The standard layout: keys in `data_dir`, the token at `api_token`.
    pub fn new(data_dir: &Path, api_token: &Path) -> KeyPaths {
        KeyPaths {
            federation: data_dir.join(FEDERATION_KEY_FILE),
            tunnel: data_dir.join(TUNNEL_KEY_FILE),
            tunnel_pub: data_dir.join(TUNNEL_PUB_FILE),
            api_token: api_token.to_owned(),
        }
    }

    /// The secret files that already exist.
    pub fn existing(&self) -> Vec<&Path> {
        [&self.federation, &self.tunnel, &self.api_token]
            .into_iter()
            .map(PathBuf::as_path)
            .filter(|path| path.exists())
            .collect()
    }
}

/// `N` bytes from the system's secure random source (secrets, ids, seeds).
pub fn random_bytes<const N: usize>() -> Result<[u8; N], IdentityError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Random)?;
    Ok(bytes)
}

/// Refuses to replace `path` unless `force`: the usage error users get when
/// a generated file already exists.
pub fn refuse_overwrite(path: &Path, force: bool) -> Result<(), crate::usage::UsageError> {
    if path.exists() && !force {
        return Err(crate::usage::UsageError(format!(
            "{} already exists; pass --force to replace it",
            path.display()
        )));
    }
    Ok(())
}

/// Generates fresh secrets and writes them. Without `force`, refuses (and
/// writes nothing) if any secret file exists.
pub fn generate(paths: &KeyPaths, force: bool) -> Result<SiteKeys, IdentityError> {
    if !force && let Some(path) = paths.existing().first() {
        return Err(IdentityError::Exists {
            path: path.to_path_buf(),
        });
    }
    let federation = Keypair::ed25519_from_bytes(random_bytes::<32>()?)
        .expect("any 32 bytes are an Ed25519 secret key");
    let tunnel = x25519_dalek::StaticSecret::from(random_bytes::<32>()?);
    let token_bytes = random_bytes::<TOKEN_BYTES>()?;
    let keys = SiteKeys {
        federation,
        tunnel,
        api_token: URL_SAFE_NO_PAD.encode(token_bytes),
    };

    let encoded = keys
        .federation
        .to_protobuf_encoding()
        .expect("an Ed25519 keypair always encodes");
    write_file(&paths.federation, &encoded, 0o600)?;
    let tunnel_line = format!("{}\n", STANDARD.encode(keys.tunnel.to_bytes()));
    write_file(&paths.tunnel, tunnel_line.as_bytes(), 0o600)?;
    write_file(
        &paths.tunnel_pub,
        format!("{}\n", keys.tunnel_public_key()).as_bytes(),
        0o644,
    )?;
    write_file(
        &paths.api_token,
        format!("{}\n", keys.api_token).as_bytes(),
        0o600,
    )?;
    Ok(keys)
}

/// Loads the site's secrets, checking that no other user can read them.
pub fn load(paths: &KeyPaths) -> Result<SiteKeys, IdentityError> {
    let encoded = read_secret(&paths.federation)?;
    let federation =
        Keypair::from_protobuf_encoding(&encoded).map_err(|e| IdentityError::Malformed {
            path: paths.federation.clone(),
            what: "libp2p keypair",
            detail: e.to_string(),
        })?;
    let tunnel_text = String::from_utf8(read_secret(&paths.tunnel)?).unwrap_or_default();
    let tunnel_bytes: [u8; 32] = STANDARD
        .decode(tunnel_text.trim())
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| IdentityError::Malformed {
            path: paths.tunnel.clone(),
            what: "WireGuard private key",
            detail: "expected 32 bytes in base64".to_owned(),
        })?;
    let api_token = load_token(&paths.api_token)?;
    Ok(SiteKeys {
        federation,
        tunnel: x25519_dalek::StaticSecret::from(tunnel_bytes),
        api_token,
    })
}

/// Loads the API token alone (what the CLI needs to talk to the agent).
pub fn load_token(path: &Path) -> Result<String, IdentityError> {
    let token = String::from_utf8(read_checked(path, TOKEN_MODE_REFUSED)?).unwrap_or_default();
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(IdentityError::Malformed {
            path: path.to_owned(),
            what: "API token",
            detail: "expected one line of printable characters".to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// Reads a secret file after checking that no other user can read it.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, IdentityError> {
    read_checked(path, KEY_MODE_REFUSED)
}

/// Reads `path` after checking that none of the permission bits `refused`
/// is set.
fn read_checked(path: &Path, refused: u32) -> Result<Vec<u8>, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & refused != 0 {
        let who = if mode & refused & 0o007 != 0 {
            "other users"
        } else {
            "its group"
        };
        let shown = path.display();
        let fix = if refused == TOKEN_MODE_REFUSED {
            format!("run `chmod 640 {shown}` to share it with its group, or `chmod 600 {shown}`")
        } else {
            format!("run `chmod 600 {shown}`")
        };
        return Err(IdentityError::TooOpen {
            path: path.to_owned(),
            mode,
            who,
            fix,
        });
    }
    fs::read(path).map_err(io)
}

/// Writes `contents` to `path` with `mode`, atomically: a temporary file in
/// the same directory, fsync, rename, fsync of the directory.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    // The mode given to open() is filtered by the umask; set it exactly.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> KeyPaths {
        KeyPaths::new(dir, &dir.join(API_TOKEN_FILE))
    }

    #[test]
    fn generated_keys_load_back_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        let made = generate(&paths, false).unwrap();
        for path in [&paths.federation, &paths.tunnel, &paths.api_token] {
            assert_eq!(
                fs::metadata(path).unwrap().permissions().mode() & 0o777,
                0o600,
                "{path:?}"
            );
        }
        let loaded = load(&paths).unwrap();
        assert_eq!(loaded.peer_id(), made.peer_id());
        assert_eq!(loaded.tunnel_public_key(), made.tunnel_public_key());
        assert_eq!(loaded.api_token, made.api_token);
        assert_eq!(
            fs::read_to_string(&paths.tunnel_pub).unwrap().trim(),
            made.tunnel_public_key()
        );
        assert!(!format!("{loaded:?}").contains(&loaded.api_token));
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        let first = generate(&paths, false).unwrap();
        let err = generate(&paths, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(load(&paths).unwrap().peer_id(), first.peer_id());
        let second = generate(&paths, true).unwrap();
        assert_ne!(second.peer_id(), first.peer_id());
    }

    #[test]
    fn refuses_secrets_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        generate(&paths, false).unwrap();
        fs::set_permissions(&paths.tunnel, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&paths).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn the_token_may_be_shared_with_a_group_but_not_with_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        let made = generate(&paths, false).unwrap();
        for mode in [0o600, 0o400, 0o640, 0o440] {
            fs::set_permissions(&paths.api_token, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(
                load_token(&paths.api_token).unwrap(),
                made.api_token,
                "{mode:o}"
            );
        }
        for (mode, who) in [
            (0o644, "other users"),
            (0o604, "other users"),
            (0o602, "other users"),
            (0o660, "its group"),
            (0o650, "its group"),
        ] {
            fs::set_permissions(&paths.api_token, fs::Permissions::from_mode(mode)).unwrap();
            let err = load_token(&paths.api_token).unwrap_err().to_string();
            assert!(err.contains(who), "{mode:o}: {err}");
            assert!(err.contains("chmod 640"), "{mode:o}: {err}");
        }
        // The keys stay private to their owner.
        fs::set_permissions(&paths.federation, fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_secret(&paths.federation).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn a_missing_file_names_the_os_error_once() {
        let dir = tempfile::tempdir().unwrap();
        let err = anyhow::Error::from(load_token(&dir.path().join("api.token")).unwrap_err());
        let text = format!("{err:#}");
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{text}"
        );
        assert!(text.contains("api.token"), "{text}");
    }

    #[test]
    fn malformed_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        generate(&paths, false).unwrap();
        write_file(&paths.federation, b"garbage", 0o600).unwrap();
        let err = load(&paths).unwrap_err();
        assert!(
            err.to_string()
                .contains("federation.key is not a valid libp2p keypair"),
            "{err}"
        );
    }
}
