//! The site configuration parser (`node/agent/src/config`): `vcfed.toml`
//! as an operator (or a configuration tool) writes it.
//!
//! Asserts: no panic, also while an error names its line and column; an
//! error's line and column lie in the text; an accepted configuration is
//! accepted again the same and differs from itself in nothing.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vcfed::config::Config;
use vcfed_fuzz::check_config_error;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/vcfed/vcfed.toml");
    match Config::parse(text, path) {
        Ok(config) => {
            assert!(config.changed_fields(&config).is_empty());
            assert_eq!(Config::parse(text, path).ok(), Some(config));
        }
        Err(e) => check_config_error(&e, text),
    }
});
