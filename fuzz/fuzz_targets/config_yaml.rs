//! The config loader: `Config::parse` on arbitrary text (what `Config::load`
//! reads: UTF-8). A config that parses re-parses to the same result after a
//! trip through the YAML emitter; a config that fails says why.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new("/etc/portcullis");
    match Config::parse(text, base) {
        Ok(config) => {
            let value: serde_yaml::Value =
                serde_yaml::from_str(text).expect("parsed once, parses as YAML");
            let again = serde_yaml::to_string(&value).expect("YAML emits");
            match Config::parse(&again, base) {
                Ok(c) => assert_eq!(format!("{c:?}"), format!("{config:?}"), "{again}"),
                Err(p) => panic!("re-emitted config refused: {p:?}\n{again}"),
            }
            assert!(!config.listeners.is_empty() && !config.hosts.is_empty());
            assert!(config.max_connections > 0);
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a reason");
            for p in &problems {
                assert!(!p.message.is_empty(), "empty problem at {}", p.path);
            }
        }
    }
});
