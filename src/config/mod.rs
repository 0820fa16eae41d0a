//! The configuration: the YAML contract (README "Configuration") as typed
//! values (`schema`, [`names`], [`defaults`]), the walk that checks and builds
//! them (`walk`, then one file per section), the warnings `portcullis check`
//! prints (`checks`) and what a reload changed ([`diff`]).
//!
//! Parsing walks the YAML tree once and collects *every* problem with its key
//! path (`hosts[1].backends.imaps: invalid address "10.0.0.5:99999"`) before
//! failing, the way `nginx -t` does; unknown keys are errors at every level,
//! because a typo in a routing map is a security bug.
//!
//! Nothing here reads a file other than the config itself or opens a socket:
//! certificates are loaded by `tls::certs`, listeners bound by `server`. Every
//! layer above reads these values; this one imports only [`crate::protocol`].

mod acme;
mod checks;
pub mod defaults;
pub mod diff;
mod domains;
mod hosts;
mod listeners;
pub mod names;
mod operator;
mod schema;
mod store;
mod walk;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde_yaml::Value;

pub use checks::tlsa_owners;
pub use schema::*;
use walk::Walk;

/// One problem found in a config, with the key path it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

/// Everything wrong with a config file; never empty.
#[derive(Debug)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {p}", self.file)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a config file. Relative paths in it are taken
    /// relative to the file's own directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![Problem {
                path: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|problems| ConfigError { file, problems })
    }

    /// Parses config text; `base` anchors relative paths.
    pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
        let root: Value = serde_yaml::from_str(text).map_err(|e| {
            vec![Problem {
                path: String::new(),
                message: format!("YAML: {e}"),
            }]
        })?;
        let mut w = Walk {
            problems: Vec::new(),
            base,
            seen_names: BTreeMap::new(),
        };
        let config = w.config(&root);
        match config {
            Some(c) if w.problems.is_empty() => Ok(c),
            _ => Err(w.problems),
        }
    }
}

mod tests;
