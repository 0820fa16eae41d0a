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
            let message = e.to_string();
            vec![Problem {
                path: String::new(),
                message: format!("YAML: {}", duplicate_at(text, &message).unwrap_or(message)),
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

/// The YAML parser reports a duplicate key at the start of the mapping
/// that holds it (`… duplicate entry with key "imaps" at line 8 column 7`):
/// the message with the lines of both occurrences instead, found at the
/// same indentation within that mapping (the top level's come without a
/// place: the whole file then). `None` when it is not such a
/// message, or the mapping is written inline.
fn duplicate_at(text: &str, message: &str) -> Option<String> {
    let (head, rest) = message.split_once("duplicate entry with key \"")?;
    let (key, rest) = rest.split_once('"')?;
    // The top level's duplicates come without a place.
    let (line, column) = match rest.strip_prefix(" at line ") {
        Some(at) => at.split_once(" column ")?,
        None => ("1", "1"),
    };
    let (line, column): (usize, usize) = (line.parse().ok()?, column.trim().parse().ok()?);
    let indent = column.checked_sub(1)?;
    let quoted = format!("\"{key}\"");
    let mut found = Vec::new();
    for (i, l) in text.lines().enumerate().skip(line.checked_sub(1)?) {
        let body = l.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        // The mapping's first line may be a sequence item (`- names: …`);
        // any later line left of its keys ends it.
        if i + 1 > line && l.len() - body.len() < indent {
            break;
        }
        let own = body.strip_prefix("- ").map_or(body, str::trim_start);
        let keyed = [key, quoted.as_str()].iter().any(|k| {
            own.strip_prefix(k)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        });
        if l.len() - own.len() == indent && keyed {
            found.push(i + 1);
        }
    }
    let [first, second, ..] = found[..] else {
        return None;
    };
    Some(format!(
        "{head}duplicate key \"{key}\" at line {second} column {column} (first at line {first})"
    ))
}

mod tests;
