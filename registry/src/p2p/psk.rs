//! Pre-shared key files in the libp2p/IPFS `swarm.key` format:
//!
//! ```text
//! /key/swarm/psk/1.0.0/
//! /base16/
//! <64 hex digits>
//! ```

use std::fmt::Write as _;

use super::P2pError;

const HEADER: &str = "/key/swarm/psk/1.0.0/";
const ENCODING: &str = "/base16/";
const KEY_BYTES: usize = 32;

/// Parses a PSK file in the libp2p/IPFS swarm.key format into 32 bytes.
///
/// Line endings may be `\n` or `\r\n` and surrounding whitespace on a line is
/// ignored; anything after the key line other than blank lines is refused.
/// Error messages never echo the key line, which is secret.
pub fn parse_psk(text: &str) -> Result<[u8; 32], P2pError> {
    let mut lines = text.lines().map(str::trim);
    let header = lines.next().unwrap_or_default();
    if header != HEADER {
        // The offending line is not echoed: a bare key pasted without the
        // header would otherwise end up in logs.
        return Err(P2pError::InvalidPsk(format!(
            "the first line must be {HEADER:?}"
        )));
    }
    let encoding = lines.next().unwrap_or_default();
    if encoding != ENCODING {
        return Err(P2pError::InvalidPsk(format!(
            "the second line must be {ENCODING:?}, the only supported encoding"
        )));
    }
    let Some(hex) = lines.next() else {
        return Err(P2pError::InvalidPsk(
            "the third line must hold the key, found end of file".to_owned(),
        ));
    };
    if lines.any(|line| !line.is_empty()) {
        return Err(P2pError::InvalidPsk(
            "unexpected content after the key line".to_owned(),
        ));
    }
    let digits = hex.chars().count();
    if digits != KEY_BYTES * 2 {
        return Err(P2pError::InvalidPsk(format!(
            "the key must be {} hex digits, found {digits} characters",
            KEY_BYTES * 2
        )));
    }
    let mut key = [0u8; KEY_BYTES];
    let mut chars = hex.chars();
    for byte in &mut key {
        let (Some(high), Some(low)) = (
            chars.next().and_then(|c| c.to_digit(16)),
            chars.next().and_then(|c| c.to_digit(16)),
        ) else {
            return Err(P2pError::InvalidPsk(
                "the key contains a character that is not a hex digit".to_owned(),
            ));
        };
        *byte = u8::try_from(high * 16 + low).expect("two hex digits are at most 0xff");
    }
    Ok(key)
}

/// Renders a PSK in the swarm.key format, with a trailing newline.
pub fn format_psk(key: &[u8; 32]) -> String {
    let mut text = String::with_capacity(HEADER.len() + ENCODING.len() + KEY_BYTES * 2 + 3);
    text.push_str(HEADER);
    text.push('\n');
    text.push_str(ENCODING);
    text.push('\n');
    for byte in key {
        write!(text, "{byte:02x}").expect("writing to a String cannot fail");
    }
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> [u8; 32] {
        std::array::from_fn(|i| u8::try_from(i * 7 + 3).unwrap())
    }

    #[test]
    fn round_trip() {
        let text = format_psk(&key());
        assert_eq!(
            text,
            "/key/swarm/psk/1.0.0/\n/base16/\n030a11181f262d343b424950575e656c737a81888f969da4abb2b9c0c7ced5dc\n"
        );
        assert_eq!(parse_psk(&text).unwrap(), key());
    }

    #[test]
    fn accepts_crlf_uppercase_and_missing_final_newline() {
        let text = format!("{HEADER}\r\n{ENCODING}\r\n{}\r\n", "AB".repeat(32));
        assert_eq!(parse_psk(&text).unwrap(), [0xab; 32]);
        assert_eq!(parse_psk(text.trim_end()).unwrap(), [0xab; 32]);
    }

    #[test]
    fn matches_libp2p_pnet_format() {
        let ours = format_psk(&key());
        let theirs = libp2p::pnet::PreSharedKey::new(key()).to_key_file();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn bad_inputs_are_refused_with_a_reason() {
        let good_hex = "00".repeat(32);
        let cases = [
            ("", "first line"),
            ("/key/swarm/psk/2.0.0/\n/base16/\n", "first line"),
            ("/key/swarm/psk/1.0.0/\n/base64/\nAAAA\n", "second line"),
            ("/key/swarm/psk/1.0.0/\n/base16/\n", "third line"),
            ("/key/swarm/psk/1.0.0/\n/base16/\nabcd\n", "64 hex digits"),
            (
                &format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "0g".repeat(32)),
                "not a hex digit",
            ),
            (
                // 64 bytes but multi-byte characters: must not panic on slicing.
                &format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "é".repeat(32)),
                "32 characters",
            ),
            (
                &format!("/key/swarm/psk/1.0.0/\n/base16/\n{good_hex}\nextra\n"),
                "after the key",
            ),
        ];
        for (text, reason) in cases {
            let error = parse_psk(text).unwrap_err();
            assert!(
                matches!(error, P2pError::InvalidPsk(_)),
                "{text:?}: {error:?}"
            );
            let message = error.to_string();
            assert!(message.contains(reason), "{text:?}: {message}");
        }
        // The secret key line never appears in an error.
        for secret in [
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{}zz\n", "5a".repeat(31)),
            format!("{}\n", "5a".repeat(32)),
        ] {
            let message = parse_psk(&secret).unwrap_err().to_string();
            assert!(!message.contains("5a5a"), "{message}");
        }
    }
}
