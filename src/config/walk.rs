//! The walk over the YAML tree: the helpers every section uses (each keeps
//! the key path it is at, so a problem names it) and the top level, which
//! hands each block to its section's file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::names::HostPattern;
use super::{defaults, Config, Host, Limits, Listener, Problem, Timeouts, UnknownSni};

const TOP_KEYS: &[&str] = &[
    "state_dir",
    "acme",
    "listeners",
    "backends",
    "hosts",
    "default_host",
    "unknown_sni",
    "max_connections",
    "timeouts",
    "log",
    "admin",
    "notify",
    "limits",
    "store",
    "domains",
];
const TIMEOUT_KEYS: &[&str] = &["handshake", "dialogue", "connect", "idle", "shutdown_grace"];

/// The longest deadline accepted anywhere.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// More sessions than any process can hold descriptors for.
const MAX_CONNECTIONS_LIMIT: u64 = 1_000_000;

/// One pass over the YAML tree: what it has built so far, and every
/// problem found on the way, with its key path.
pub(super) struct Walk<'b> {
    pub(super) problems: Vec<Problem>,
    pub(super) base: &'b Path,
    /// Every host name seen so far → the host that listed it first.
    pub(super) seen_names: BTreeMap<HostPattern, String>,
}

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// `key` of a mapping, with an explicit `null` read as absent.
pub(super) fn field<'v>(m: &'v Mapping, key: &str) -> Option<&'v Value> {
    m.get(key).filter(|v| !v.is_null())
}

impl Walk<'_> {
    pub(super) fn err(&mut self, path: &str, message: impl fmt::Display) {
        self.problems.push(Problem {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    /// `v` as a mapping whose keys are all in `keys`; reports every other key.
    pub(super) fn mapping<'v>(
        &mut self,
        v: &'v Value,
        path: &str,
        keys: &[&str],
    ) -> Option<&'v Mapping> {
        let Value::Mapping(m) = v else {
            self.err(path, format!("expected a mapping, found {}", kind(v)));
            return None;
        };
        for k in m.keys() {
            match k.as_str() {
                Some(k) if keys.contains(&k) => {}
                Some(k) => self.err(
                    &join(path, k),
                    format!("unknown key (expected one of: {})", keys.join(", ")),
                ),
                None => self.err(path, format!("keys must be strings, found {}", kind(k))),
            }
        }
        Some(m)
    }

    /// A mapping with free-form string keys (listener names): each key and value.
    pub(super) fn named<'v>(&mut self, v: &'v Value, path: &str) -> Vec<(String, &'v Value)> {
        let Value::Mapping(m) = v else {
            self.err(path, format!("expected a mapping, found {}", kind(v)));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in m {
            match k.as_str() {
                Some(name) => out.push((name.to_string(), v)),
                None => self.err(path, format!("keys must be strings, found {}", kind(k))),
            }
        }
        out
    }

    pub(super) fn de<T: DeserializeOwned>(&mut self, v: &Value, path: &str) -> Option<T> {
        serde_yaml::from_value(v.clone())
            .map_err(|e| self.err(path, e))
            .ok()
    }

    pub(super) fn required<'v>(
        &mut self,
        m: &'v Mapping,
        path: &str,
        key: &str,
    ) -> Option<&'v Value> {
        let v = field(m, key);
        if v.is_none() {
            self.err(&join(path, key), "missing");
        }
        v
    }

    pub(super) fn string(&mut self, v: &Value, path: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(path, format!("expected a string, found {}", kind(other)));
                None
            }
        }
    }

    /// A string or a list of strings.
    pub(super) fn strings(&mut self, v: &Value, path: &str) -> Vec<(String, String)> {
        match v {
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let p = format!("{path}[{i}]");
                    self.string(item, &p).map(|s| (p, s))
                })
                .collect(),
            other => self
                .string(other, path)
                .map(|s| vec![(path.to_string(), s)])
                .unwrap_or_default(),
        }
    }

    /// A name or a list of names, each a host name or `*.` wildcard.
    pub(super) fn patterns(&mut self, v: &Value, path: &str) -> Vec<HostPattern> {
        self.strings(v, path)
            .into_iter()
            .filter_map(|(p, s)| {
                HostPattern::parse(&s)
                    .map_err(|e| self.err(&p, format!("{s:?}: {e}")))
                    .ok()
            })
            .collect()
    }

    pub(super) fn path(&self, s: &str) -> PathBuf {
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// `30s`, `31m`, `1h 30m`, or a bare number of seconds; above zero and at
    /// most a week (a longer deadline is a typo, and would overflow).
    pub(super) fn duration(&mut self, v: &Value, path: &str) -> Option<Duration> {
        self.duration_upto(v, path, MAX_DURATION)
    }

    pub(super) fn duration_upto(
        &mut self,
        v: &Value,
        path: &str,
        max: Duration,
    ) -> Option<Duration> {
        let d = match v {
            Value::Number(n) => n.as_u64().map(Duration::from_secs),
            Value::String(s) => humantime::parse_duration(s).ok(),
            _ => None,
        };
        if let Some(d) = d.filter(|d| d.is_zero() || *d > max) {
            let (shown, max) = (
                humantime::format_duration(d),
                humantime::format_duration(max),
            );
            self.err(
                path,
                format!("{shown} is out of range (above 0, at most {max})"),
            );
            return None;
        }
        if d.is_none() {
            self.err(
                path,
                format!(
                    "invalid duration {} (examples: 10s, 31m, 1h)",
                    serde_yaml::to_string(v).unwrap_or_default().trim()
                ),
            );
        }
        d
    }

    pub(super) fn socket_addr(&mut self, s: &str, path: &str) -> Option<SocketAddr> {
        let parsed = s.parse::<SocketAddr>();
        if parsed.is_err() {
            self.err(
                path,
                format!(
                    "invalid address {s:?} (expected IP:port, e.g. 127.0.0.1:10143 or [::1]:10143)"
                ),
            );
        }
        parsed.ok()
    }

    /// The whole config, block by block, in the order their problems are
    /// reported.
    pub(super) fn config(&mut self, root: &Value) -> Option<Config> {
        let m = self.mapping(root, "", TOP_KEYS)?;
        let state_dir = self.state_dir(m);
        let acme = field(m, "acme").and_then(|v| self.acme(v));
        let (listeners, mut hosts, timeouts) = self.routes(m);
        let default_host = self.default_host_of(m, &hosts);
        let domains = match field(m, "domains") {
            Some(v) => {
                let acme = field(m, "acme").is_some();
                self.domains(v, &mut hosts, acme, default_host.as_ref())
            }
            None => Vec::new(),
        };
        let unknown_sni = field(m, "unknown_sni")
            .map(|v| self.de(v, "unknown_sni"))
            .unwrap_or(Some(UnknownSni::Default));
        let max_connections = self.max_connections(m);
        let log = self.log(field(m, "log"));
        let admin = field(m, "admin").and_then(|v| self.admin(v));
        let store = field(m, "store").and_then(|v| self.store(v));

        if !domains.is_empty() && !listeners.values().any(Listener::is_web) {
            self.err(
                "domains",
                "MTA-STS and autoconfig are served over HTTPS: add a listener with protocol: tcp, tls: implicit (port 443)",
            );
        }
        // Only when none was written: a bad one has said so already.
        if matches!(field(m, "listeners"), Some(Value::Mapping(l)) if l.is_empty()) {
            self.err("listeners", "at least one listener is needed");
        }
        if matches!(field(m, "hosts"), Some(Value::Sequence(h)) if h.is_empty()) {
            self.err("hosts", "at least one host is needed");
        }
        let acme = self.acme_fits(acme, field(m, "acme").is_some(), &listeners, &hosts);
        if let (Some(a), Some(_)) = (&acme, &store) {
            let rolls = a.key == super::KeyPolicy::Rollover
                || a.per_host
                    .values()
                    .any(|h| h.key == Some(super::KeyPolicy::Rollover));
            if rolls {
                self.err(
                    "store",
                    "key: rollover does not work with store.etcd yet (each node would make its own next key): use key: reuse",
                );
            }
            let two = a.key_types.len() > 1
                || a.per_host
                    .values()
                    .any(|h| h.key_types.as_ref().is_some_and(|t| t.len() > 1));
            if two {
                self.err(
                    "store",
                    "two key_types do not work with store.etcd yet (the store keeps one certificate per host): give each host one key type",
                );
            }
        }
        let notify = match (field(m, "notify"), &default_host) {
            (Some(v), Some(d)) => self.notify(v, acme.as_ref(), d, timeouts.connect),
            _ => None,
        };
        Some(Config {
            state_dir: state_dir?,
            acme,
            listeners,
            hosts,
            default_host: default_host?,
            unknown_sni: unknown_sni?,
            max_connections: max_connections?,
            timeouts,
            log,
            admin,
            notify,
            store,
            domains,
        })
    }

    /// What routes a session: `limits`, `listeners`, `backends`,
    /// `timeouts` (a backend's connect deadline) and `hosts`.
    fn routes(&mut self, m: &Mapping) -> (BTreeMap<String, Listener>, Vec<Host>, Timeouts) {
        let limits = match field(m, "limits") {
            Some(v) => self.limits(v, "limits", &Limits::default()),
            None => Limits::default(),
        };
        let listeners = match self.required(m, "", "listeners") {
            Some(v) => self.listeners(v, &limits),
            None => BTreeMap::new(),
        };
        let defaults = match field(m, "backends") {
            Some(v) => self.backend_map(v, "backends", &listeners),
            None => BTreeMap::new(),
        };
        let timeouts = self.timeouts(field(m, "timeouts"));
        let hosts = match self.required(m, "", "hosts") {
            Some(v) => self.hosts(v, &listeners, &defaults, timeouts.connect),
            None => Vec::new(),
        };
        let listeners = listeners
            .into_iter()
            .filter_map(|(name, l)| Some((name, l?)))
            .collect();
        (listeners, hosts, timeouts)
    }

    fn state_dir(&mut self, m: &Mapping) -> Option<PathBuf> {
        match field(m, "state_dir") {
            Some(v) => self.string(v, "state_dir").map(|s| self.path(&s)),
            None => Some(self.path(defaults::STATE_DIR)),
        }
    }

    fn max_connections(&mut self, m: &Mapping) -> Option<usize> {
        match field(m, "max_connections") {
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n <= MAX_CONNECTIONS_LIMIT => Some(n as usize),
                _ => {
                    self.err(
                        "max_connections",
                        format!("expected a whole number from 1 to {MAX_CONNECTIONS_LIMIT}"),
                    );
                    None
                }
            },
            None => Some(defaults::MAX_CONNECTIONS),
        }
    }

    pub(super) fn timeouts(&mut self, v: Option<&Value>) -> Timeouts {
        let mut t = Timeouts {
            handshake: defaults::HANDSHAKE,
            dialogue: defaults::DIALOGUE,
            connect: defaults::CONNECT,
            idle: defaults::IDLE,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
        };
        let Some(m) = v.and_then(|v| self.mapping(v, "timeouts", TIMEOUT_KEYS)) else {
            return t;
        };
        for (key, slot) in [
            ("handshake", &mut t.handshake),
            ("dialogue", &mut t.dialogue),
            ("connect", &mut t.connect),
            ("idle", &mut t.idle),
            ("shutdown_grace", &mut t.shutdown_grace),
        ] {
            if let Some(v) = field(m, key) {
                if let Some(d) = self.duration(v, &join("timeouts", key)) {
                    *slot = d;
                }
            }
        }
        t
    }
}
