//! The YAML contract (see README "Configuration") turned into a typed, validated
//! [`Config`]. Parsing walks the YAML tree once and collects *every* problem with
//! its key path (`hosts[1].backends.imaps: invalid address "10.0.0.5:99999"`)
//! before failing, the way `nginx -t` does; unknown keys are errors at every
//! level, because a typo in a routing map is a security bug.
//!
//! This module reads no file other than the config itself and opens no socket:
//! certificates are loaded by [`crate::tls::certs`], listeners bound by
//! [`crate::server`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::names::{HostPattern, Hostname};

/// Every default in one place.
pub mod defaults {
    use std::time::Duration;
    /// ClientHello read plus the rest of the handshake.
    pub const HANDSHAKE: Duration = Duration::from_secs(10);
    /// Greeting to STARTTLS takes a client well under a second.
    pub const DIALOGUE: Duration = Duration::from_secs(60);
    pub const CONNECT: Duration = Duration::from_secs(5);
    /// Longer than the 29 minutes RFC 2177 lets an IMAP IDLE client stay silent.
    pub const IDLE: Duration = Duration::from_secs(31 * 60);
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// Each proxied session costs two descriptors; 20,000 per process is common.
    pub const MAX_CONNECTIONS: usize = 9_000;
    pub const STATE_DIR: &str = "./state";
    /// Per client address and listener: an office of a hundred behind one
    /// NAT address (Thunderbird keeps up to five IMAP connections per
    /// account, a phone two or three) stays below it; eight mail listeners
    /// of one address still leave most of `max_connections` to others.
    pub const CONNECTIONS_PER_IP: u32 = 500;
    /// New connections (TLS handshakes) per second from one address,
    /// sustained; a mail client opens a handful per minute.
    pub const HANDSHAKES_PER_IP: u32 = 20;
    /// New connections allowed at once above that rate (a client starting
    /// up, a webmail after a restart).
    pub const HANDSHAKE_BURST: u32 = 100;
    /// Never limited: a webmail or load balancer on the same machine.
    pub const EXEMPT: [&str; 2] = ["127.0.0.0/8", "::1/128"];
    pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
    pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
}

#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    /// `None`: no host uses `certificate: acme`.
    pub acme: Option<Acme>,
    pub listeners: BTreeMap<String, Listener>,
    pub hosts: Vec<Host>,
    /// Certificate and route for clients that send no SNI.
    pub default_host: Hostname,
    pub unknown_sni: UnknownSni,
    pub max_connections: usize,
    pub timeouts: Timeouts,
    pub log: LogConfig,
    /// `/metrics` and `/healthz`; off unless configured.
    pub admin: Option<Admin>,
    /// Who hears about issuance, renewal and expiry; off unless configured.
    pub notify: Option<Notify>,
}

/// The `admin:` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admin {
    pub bind: SocketAddr,
}

/// The `notify:` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    /// Recipients (bare addresses); defaults to the ACME contacts.
    pub email: Vec<String>,
    /// The envelope and header sender.
    pub from: String,
    /// The SMTP server mail goes through: the operator's own Postfix, as a
    /// backend (PROXY v2 unless `proxy_protocol` says otherwise).
    pub smtp: Option<Backend>,
    /// An `http://` or `https://` URL that gets each event as JSON.
    pub webhook: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub bind: Vec<SocketAddr>,
    pub protocol: Protocol,
    pub tls: TlsMode,
    /// ALPN IDs accepted and selected, in preference order: as written,
    /// else the protocol's own ([`crate::protocol::alpn`]). A ClientHello
    /// offering only others is refused; empty: any offer is accepted.
    pub alpn: Vec<Vec<u8>>,
    /// The name in STARTTLS greetings; `None` = `default_host`.
    pub hostname: Option<Hostname>,
    /// SMTP STARTTLS only: refuse everything but the upgrade before TLS
    /// (submission). `false` lets plaintext mail through (an MX on port 25).
    pub require_tls: bool,
    /// Per client address: `limits:` with this listener's own overrides.
    pub limits: Limits,
}

/// What one client address may do on one listener (IPv6 clients count per
/// /64, IPv4-mapped IPv6 ones as IPv4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; the next one is refused.
    pub connections_per_ip: u32,
    /// New connections per second, sustained (a token bucket's refill rate).
    pub handshakes_per_ip: u32,
    /// New connections allowed at once above that rate (the bucket's size).
    pub handshake_burst: u32,
    /// Addresses never limited.
    pub exempt: Vec<IpNet>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections_per_ip: defaults::CONNECTIONS_PER_IP,
            handshakes_per_ip: defaults::HANDSHAKES_PER_IP,
            handshake_burst: defaults::HANDSHAKE_BURST,
            exempt: defaults::EXEMPT
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Smtp,
    Pop3,
    Sieve,
    Tcp,
    Http,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Implicit,
    Starttls,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    None,
    V1,
    V2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    pub proxy_protocol: ProxyProtocol,
    pub connect_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSource {
    SelfSigned,
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Obtained and renewed over ACME; stored under `state_dir/certs/`.
    Acme,
}

/// The `acme:` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acme {
    /// The directory URL (`letsencrypt` and `letsencrypt-staging` expanded).
    pub directory: String,
    /// `mailto:` URLs.
    pub contact: Vec<String>,
    /// In preference order; only those a listener can answer.
    pub challenges: Vec<Challenge>,
    /// Extra roots trusted for the ACME server's own HTTPS (a test CA).
    pub ca_roots: Option<PathBuf>,
    pub profile: Option<String>,
    pub eab: Option<Eab>,
    pub key_type: KeyType,
    /// Renew this long before expiry instead of at a third of the lifetime
    /// remaining (ignored where the CA offers ARI).
    pub renew_before: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Challenge {
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    #[serde(rename = "http-01")]
    Http01,
}

impl Challenge {
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::TlsAlpn01 => "tls-alpn-01",
            Challenge::Http01 => "http-01",
        }
    }
}

/// External account binding: a key id and the MAC key the CA handed out.
#[derive(Clone, PartialEq, Eq)]
pub struct Eab {
    pub kid: String,
    pub hmac_key: Vec<u8>,
}

impl fmt::Debug for Eab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Eab").field("kid", &self.kid).finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
pub enum KeyType {
    #[default]
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

#[derive(Clone, Debug)]
pub struct Host {
    pub names: Vec<HostPattern>,
    pub certificate: CertSource,
    /// Listener name → backend, with the top-level defaults already merged in.
    pub backends: BTreeMap<String, Backend>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownSni {
    /// Serve `default_host`'s certificate and route.
    Default,
    /// Abort the handshake with an `unrecognized_name` alert.
    Reject,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub handshake: Duration,
    /// The whole plaintext dialogue before STARTTLS.
    pub dialogue: Duration,
    pub connect: Duration,
    pub idle: Duration,
    pub shutdown_grace: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `portcullis=debug`); `RUST_LOG` wins when set.
    pub level: String,
}

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

    /// Sessions a listener can route: (listener, host) pairs with a backend.
    pub fn route_count(&self) -> usize {
        self.hosts.iter().map(|h| h.backends.len()).sum()
    }

    /// Backends that an SMTP listener with `require_tls: false` hands plaintext
    /// sessions to while a TLS-only listener uses them too: if such a backend
    /// accepts AUTH without TLS (as submission behind portcullis does), a
    /// client can send credentials in plaintext there. As (plaintext listener,
    /// TLS listener, address).
    pub fn plaintext_auth_risks(&self) -> Vec<(String, String, SocketAddr)> {
        let mut out = Vec::new();
        let plain = self.listeners.values().filter(|l| {
            (l.protocol, l.tls, l.require_tls) == (Protocol::Smtp, TlsMode::Starttls, false)
        });
        for p in plain {
            for t in self.listeners.values().filter(|t| t.name != p.name) {
                if t.protocol != Protocol::Smtp || (t.tls == TlsMode::Starttls && !t.require_tls) {
                    continue;
                }
                let shared = self.hosts.iter().find_map(|h| {
                    let a = h.backends.get(&p.name)?.address;
                    let b = h.backends.get(&t.name)?.address;
                    (a == b).then_some(a)
                });
                if let Some(addr) = shared {
                    out.push((p.name.clone(), t.name.clone(), addr));
                }
            }
        }
        out
    }

    /// ACME challenges the CA validates on a port no listener binds: tls-alpn-01
    /// on 443, http-01 on 80. Fine behind a port forward, so a warning.
    pub fn acme_port_warnings(&self) -> Vec<String> {
        let Some(acme) = &self.acme else {
            return Vec::new();
        };
        if !self.hosts.iter().any(|h| h.certificate == CertSource::Acme) {
            return Vec::new();
        }
        let binds = |port: u16, fits: &dyn Fn(&Listener) -> bool| {
            self.listeners
                .values()
                .any(|l| fits(l) && l.bind.iter().any(|a| a.port() == port))
        };
        let mut out = Vec::new();
        for c in &acme.challenges {
            let (port, ok) = match c {
                Challenge::TlsAlpn01 => (443, binds(443, &|l| l.tls == TlsMode::Implicit)),
                Challenge::Http01 => (80, binds(80, &|l| l.protocol == Protocol::Http)),
            };
            if !ok {
                out.push(format!(
                    "the CA validates {} on port {port}, and no listener that answers it binds port {port}: forward port {port} to it, or the challenge fails (portcullis then tries the next one)",
                    c.as_str()
                ));
            }
        }
        out
    }

    /// Listener names that some host has no backend for: a client reaching that
    /// host there is turned away. Not an error (a webmail host needs no IMAP).
    pub fn unrouted(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for l in self
            .listeners
            .values()
            .filter(|l| l.protocol != Protocol::Http)
        {
            for h in &self.hosts {
                if !h.backends.contains_key(&l.name) {
                    out.push((l.name.clone(), h.names[0].to_string()));
                }
            }
        }
        out
    }
}

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
];
const ADMIN_KEYS: &[&str] = &["bind"];
const NOTIFY_KEYS: &[&str] = &["email", "from", "smtp", "webhook"];
const LISTENER_KEYS: &[&str] = &[
    "bind",
    "protocol",
    "tls",
    "alpn",
    "hostname",
    "require_tls",
    "limits",
];
const LIMIT_KEYS: &[&str] = &[
    "connections_per_ip",
    "handshakes_per_ip",
    "handshake_burst",
    "exempt",
];
const BACKEND_KEYS: &[&str] = &["address", "proxy_protocol", "connect_timeout"];
const ACME_KEYS: &[&str] = &[
    "directory",
    "contact",
    "terms_of_service_agreed",
    "challenges",
    "ca_roots",
    "profile",
    "eab",
    "key_type",
    "renew_before",
];
const EAB_KEYS: &[&str] = &["kid", "hmac_key"];
const HOST_KEYS: &[&str] = &["names", "certificate", "backends"];
const CERT_FILE_KEYS: &[&str] = &["cert", "key"];
const TIMEOUT_KEYS: &[&str] = &["handshake", "dialogue", "connect", "idle", "shutdown_grace"];
const LOG_KEYS: &[&str] = &["format", "level"];

/// The longest deadline accepted anywhere.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest `acme.renew_before`: longer than any certificate lives.
const MAX_RENEW_BEFORE: Duration = Duration::from_secs(365 * 24 * 3600);

/// More sessions than any process can hold descriptors for.
const MAX_CONNECTIONS_LIMIT: u64 = 1_000_000;

/// The largest per-address limit: anything above is no limit at all.
const MAX_PER_IP: u64 = 1_000_000;

/// Listener name → the listener, or `None` where its definition has problems.
type Listeners = BTreeMap<String, Option<Listener>>;

/// A backend as written, before the listener's defaults are merged in.
struct RawBackend {
    address: SocketAddr,
    proxy_protocol: ProxyProtocol,
    connect_timeout: Option<Duration>,
}

struct Walk<'b> {
    problems: Vec<Problem>,
    base: &'b Path,
    /// Every host name seen so far → the host that listed it first.
    seen_names: BTreeMap<HostPattern, String>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn kind(v: &Value) -> &'static str {
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
fn field<'v>(m: &'v Mapping, key: &str) -> Option<&'v Value> {
    m.get(key).filter(|v| !v.is_null())
}

impl Walk<'_> {
    fn err(&mut self, path: &str, message: impl fmt::Display) {
        self.problems.push(Problem {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    /// `v` as a mapping whose keys are all in `keys`; reports every other key.
    fn mapping<'v>(&mut self, v: &'v Value, path: &str, keys: &[&str]) -> Option<&'v Mapping> {
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
    fn named<'v>(&mut self, v: &'v Value, path: &str) -> Vec<(String, &'v Value)> {
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

    fn de<T: DeserializeOwned>(&mut self, v: &Value, path: &str) -> Option<T> {
        serde_yaml::from_value(v.clone())
            .map_err(|e| self.err(path, e))
            .ok()
    }

    fn required<'v>(&mut self, m: &'v Mapping, path: &str, key: &str) -> Option<&'v Value> {
        let v = field(m, key);
        if v.is_none() {
            self.err(&join(path, key), "missing");
        }
        v
    }

    fn string(&mut self, v: &Value, path: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(path, format!("expected a string, found {}", kind(other)));
                None
            }
        }
    }

    /// A string or a list of strings.
    fn strings(&mut self, v: &Value, path: &str) -> Vec<(String, String)> {
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

    fn path(&self, s: &str) -> PathBuf {
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// `30s`, `31m`, `1h 30m`, or a bare number of seconds; above zero and at
    /// most a week (a longer deadline is a typo, and would overflow).
    fn duration(&mut self, v: &Value, path: &str) -> Option<Duration> {
        self.duration_upto(v, path, MAX_DURATION)
    }

    fn duration_upto(&mut self, v: &Value, path: &str, max: Duration) -> Option<Duration> {
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

    fn socket_addr(&mut self, s: &str, path: &str) -> Option<SocketAddr> {
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

    fn config(&mut self, root: &Value) -> Option<Config> {
        let m = self.mapping(root, "", TOP_KEYS)?;

        let state_dir = match field(m, "state_dir") {
            Some(v) => self.string(v, "state_dir").map(|s| self.path(&s)),
            None => Some(self.path(defaults::STATE_DIR)),
        };
        let acme = field(m, "acme").and_then(|v| self.acme(v));

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
        let listeners: BTreeMap<String, Listener> = listeners
            .into_iter()
            .filter_map(|(name, l)| Some((name, l?)))
            .collect();

        let default_host = match field(m, "default_host") {
            Some(v) => self.default_host(v, &hosts),
            None => hosts.first().and_then(|h| first_exact(&h.names)).or_else(|| {
                if !hosts.is_empty() {
                    self.err(
                        "default_host",
                        "missing, and the first host has no exact (non-wildcard) name to default to",
                    );
                }
                None
            }),
        };
        let unknown_sni = field(m, "unknown_sni")
            .map(|v| self.de(v, "unknown_sni"))
            .unwrap_or(Some(UnknownSni::Default));
        let max_connections = match field(m, "max_connections") {
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
        };
        let log = self.log(field(m, "log"));
        let admin = field(m, "admin").and_then(|v| self.admin(v));

        if listeners.is_empty() && field(m, "listeners").is_some() {
            self.err("listeners", "at least one listener is needed");
        }
        if hosts.is_empty() && field(m, "hosts").is_some() {
            self.err("hosts", "at least one host is needed");
        }
        let acme = self.acme_fits(acme, field(m, "acme").is_some(), &listeners, &hosts);
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
        })
    }

    fn admin(&mut self, v: &Value) -> Option<Admin> {
        let m = self.mapping(v, "admin", ADMIN_KEYS)?;
        let bind = self
            .required(m, "admin", "bind")
            .and_then(|b| self.string(b, "admin.bind"))
            .and_then(|s| self.socket_addr(&s, "admin.bind"))?;
        Some(Admin { bind })
    }

    fn notify(
        &mut self,
        v: &Value,
        acme: Option<&Acme>,
        default_host: &Hostname,
        connect: Duration,
    ) -> Option<Notify> {
        let m = self.mapping(v, "notify", NOTIFY_KEYS)?;
        let address = |s: &str| {
            let (local, domain) = s.rsplit_once('@')?;
            let plain = |p: &str| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_graphic() && !b"<>,;\"\\".contains(&b))
            };
            (plain(local) && plain(domain) && !domain.contains('@')).then(|| s.to_string())
        };
        let mut email = Vec::new();
        if let Some(v) = field(m, "email") {
            for (p, s) in self.strings(v, "notify.email") {
                match address(&s) {
                    Some(a) => email.push(a),
                    None => self.err(
                        &p,
                        format!("{s:?}: expected an address like postmaster@example.org"),
                    ),
                }
            }
        } else if let Some(acme) = acme {
            email = acme
                .contact
                .iter()
                .filter_map(|c| c.strip_prefix("mailto:"))
                .filter_map(address)
                .collect();
        }
        let from = match field(m, "from").and_then(|v| self.string(v, "notify.from")) {
            Some(f) => match address(&f) {
                Some(a) => a,
                None => {
                    self.err(
                        "notify.from",
                        format!("{f:?}: expected an address like portcullis@example.org"),
                    );
                    return None;
                }
            },
            None => format!("portcullis@{}", default_host.as_str()),
        };
        let smtp = field(m, "smtp")
            .and_then(|v| self.backend(v, "notify.smtp"))
            .map(|b| Backend {
                address: b.address,
                proxy_protocol: b.proxy_protocol,
                connect_timeout: b.connect_timeout.unwrap_or(connect),
            });
        let webhook = field(m, "webhook").and_then(|v| self.string(v, "notify.webhook"));
        if let Some(url) = &webhook {
            // What the webhook client will parse: a scheme, a host, a path.
            let ok = ["http://", "https://"]
                .iter()
                .any(|p| url.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
                && url
                    .parse::<http::Uri>()
                    .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()));
            if !ok {
                self.err(
                    "notify.webhook",
                    format!("{url:?}: expected an http:// or https:// URL"),
                );
            }
        }
        if !email.is_empty() && smtp.is_none() && field(m, "smtp").is_none() {
            self.err(
                "notify.smtp",
                "missing: mail to notify.email goes through an SMTP backend, e.g. smtp: 127.0.0.1:20025",
            );
        }
        if email.is_empty() && webhook.is_none() && field(m, "email").is_none() {
            self.err(
                "notify",
                "nobody to notify: set email (default: the acme contacts, and there are none) or webhook",
            );
        }
        Some(Notify {
            email,
            from,
            smtp,
            webhook,
        })
    }

    /// Every listener name, with `None` where its body has problems: a broken
    /// listener still exists for the backends that name it.
    fn listeners(&mut self, v: &Value, limits: &Limits) -> Listeners {
        let mut out = BTreeMap::new();
        let mut seen: BTreeMap<SocketAddr, String> = BTreeMap::new();
        for (name, v) in self.named(v, "listeners") {
            let path = format!("listeners.{name}");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                self.err(&path, "listener names use letters, digits, '_' and '-'");
                continue;
            }
            let Some(l) = self.listener(&name, v, &path, limits) else {
                out.insert(name, None);
                continue;
            };
            for addr in l.bind.iter().filter(|a| a.port() != 0) {
                if let Some(other) = seen.insert(*addr, name.clone()) {
                    self.err(
                        &format!("{path}.bind"),
                        format!("{addr} is already bound by listener {other:?}"),
                    );
                }
            }
            out.insert(name, Some(l));
        }
        out
    }

    fn listener(&mut self, name: &str, v: &Value, path: &str, limits: &Limits) -> Option<Listener> {
        let m = self.mapping(v, path, LISTENER_KEYS)?;
        let bind_path = join(path, "bind");
        let bind: Vec<SocketAddr> = match self.required(m, path, "bind") {
            Some(v) => self
                .strings(v, &bind_path)
                .into_iter()
                .filter_map(|(p, s)| self.socket_addr(&s, &p))
                .collect(),
            None => Vec::new(),
        };
        if bind.is_empty() && field(m, "bind").is_some() {
            self.err(&bind_path, "at least one address is needed");
        }
        let protocol: Option<Protocol> = self
            .required(m, path, "protocol")
            .and_then(|v| self.de(v, &join(path, "protocol")));
        let tls: Option<TlsMode> = match field(m, "tls") {
            Some(v) => self.de(v, &join(path, "tls")),
            None if protocol == Some(Protocol::Http) => Some(TlsMode::None),
            None => {
                self.err(&join(path, "tls"), "missing (implicit or starttls)");
                None
            }
        };
        // Written: exactly that list (`[]`: any offer accepted). Left out:
        // the protocol's own IDs (see `protocol::alpn`), filled in below.
        let alpn: Option<Vec<Vec<u8>>> = field(m, "alpn").map(|v| {
            self.strings(v, &join(path, "alpn"))
                .into_iter()
                .filter_map(|(p, s)| {
                    if s.is_empty() || s.len() > 255 {
                        self.err(&p, "an ALPN protocol name is 1 to 255 bytes");
                        None
                    } else {
                        Some(s.into_bytes())
                    }
                })
                .collect()
        });
        let hostname = match field(m, "hostname") {
            Some(v) => self.string(v, &join(path, "hostname")).and_then(|s| {
                Hostname::parse(&s)
                    .map_err(|e| self.err(&join(path, "hostname"), format!("{s:?}: {e}")))
                    .ok()
            }),
            None => None,
        };
        let require_tls = match field(m, "require_tls") {
            Some(v) => self.de::<bool>(v, &join(path, "require_tls")),
            None => Some(true),
        };
        let limits = match field(m, "limits") {
            Some(v) => self.limits(v, &join(path, "limits"), limits),
            None => limits.clone(),
        };
        let (protocol, tls) = (protocol?, tls?);
        match (protocol, tls) {
            (
                Protocol::Imap | Protocol::Smtp | Protocol::Pop3 | Protocol::Tcp,
                TlsMode::Implicit,
            ) => {}
            (
                Protocol::Imap | Protocol::Smtp | Protocol::Pop3 | Protocol::Sieve,
                TlsMode::Starttls,
            ) => {}
            (Protocol::Http, TlsMode::None) => {}
            (Protocol::Http, _) => self.err(
                &join(path, "tls"),
                "http listeners are plaintext (port 80: ACME http-01 and redirects); leave tls out",
            ),
            (Protocol::Sieve, _) => self.err(
                &join(path, "tls"),
                "ManageSieve has no implicit-TLS port; it needs tls: starttls",
            ),
            (Protocol::Tcp, _) => self.err(
                &join(path, "tls"),
                "tcp has no STARTTLS; it needs tls: implicit",
            ),
            (_, TlsMode::None) => self.err(
                &join(path, "tls"),
                format!("{protocol:?} needs TLS: implicit or starttls").to_lowercase(),
            ),
        }
        if field(m, "alpn").is_some() && tls == TlsMode::None {
            self.err(&join(path, "alpn"), "ALPN only applies to TLS listeners");
        }
        let alpn = alpn.unwrap_or_else(|| {
            crate::protocol::alpn(protocol)
                .iter()
                .map(|id| id.to_vec())
                .collect()
        });
        if field(m, "hostname").is_some() && tls != TlsMode::Starttls {
            self.err(
                &join(path, "hostname"),
                "only STARTTLS listeners greet with a name",
            );
        }
        if field(m, "require_tls").is_some()
            && (protocol, tls) != (Protocol::Smtp, TlsMode::Starttls)
        {
            self.err(
                &join(path, "require_tls"),
                "only SMTP STARTTLS listeners can let plaintext through; everything else requires TLS",
            );
        }
        Some(Listener {
            name: name.to_string(),
            bind,
            protocol,
            tls,
            alpn,
            hostname,
            require_tls: require_tls?,
            limits,
        })
    }

    /// A `limits:` block at `path`; what it leaves out comes from `base`.
    fn limits(&mut self, v: &Value, path: &str, base: &Limits) -> Limits {
        let mut limits = base.clone();
        let Some(m) = self.mapping(v, path, LIMIT_KEYS) else {
            return limits;
        };
        for (key, slot) in [
            ("connections_per_ip", &mut limits.connections_per_ip),
            ("handshakes_per_ip", &mut limits.handshakes_per_ip),
            ("handshake_burst", &mut limits.handshake_burst),
        ] {
            let Some(v) = field(m, key) else {
                continue;
            };
            match v.as_u64().filter(|n| (1..=MAX_PER_IP).contains(n)) {
                Some(n) => *slot = n as u32,
                None => self.err(
                    &join(path, key),
                    format!(
                        "expected a whole number from 1 to {MAX_PER_IP}, found {}",
                        serde_yaml::to_string(v).unwrap_or_default().trim()
                    ),
                ),
            }
        }
        if let Some(v) = field(m, "exempt") {
            let path = join(path, "exempt");
            limits.exempt = self
                .strings(v, &path)
                .into_iter()
                .filter_map(|(p, s)| self.network(&s, &p))
                .collect();
        }
        limits
    }

    /// `10.0.0.0/8`, `2001:db8::/32`, or one address; host bits are dropped.
    fn network(&mut self, s: &str, path: &str) -> Option<IpNet> {
        let net = s
            .parse::<IpNet>()
            .ok()
            .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from));
        if net.is_none() {
            self.err(
                path,
                format!("invalid network {s:?} (expected an address or address/prefix, e.g. 10.0.0.0/8 or 2001:db8::/32)"),
            );
        }
        net.map(|n| n.trunc())
    }

    fn backend(&mut self, v: &Value, path: &str) -> Option<RawBackend> {
        match v {
            Value::String(s) => Some(RawBackend {
                address: self.socket_addr(s, path)?,
                proxy_protocol: ProxyProtocol::V2,
                connect_timeout: None,
            }),
            Value::Mapping(_) => {
                let m = self.mapping(v, path, BACKEND_KEYS)?;
                let address = self
                    .required(m, path, "address")
                    .and_then(|a| self.string(a, &join(path, "address")))
                    .and_then(|s| self.socket_addr(&s, &join(path, "address")));
                let proxy_protocol = field(m, "proxy_protocol")
                    .map(|p| self.de(p, &join(path, "proxy_protocol")))
                    .unwrap_or(Some(ProxyProtocol::V2));
                let connect_timeout = match field(m, "connect_timeout") {
                    Some(t) => Some(self.duration(t, &join(path, "connect_timeout"))?),
                    None => None,
                };
                Some(RawBackend {
                    address: address?,
                    proxy_protocol: proxy_protocol?,
                    connect_timeout,
                })
            }
            other => {
                self.err(
                    path,
                    format!(
                        "expected an address or a mapping with `address`, found {}",
                        kind(other)
                    ),
                );
                None
            }
        }
    }

    /// `listener name → backend`; every name must be a configured listener.
    fn backend_map(
        &mut self,
        v: &Value,
        path: &str,
        listeners: &Listeners,
    ) -> BTreeMap<String, RawBackend> {
        let mut out = BTreeMap::new();
        for (name, v) in self.named(v, path) {
            let p = join(path, &name);
            let backend = self.backend(v, &p);
            match listeners.get(&name) {
                None if !listeners.is_empty() => {
                    self.err(&p, format!("no listener named {name:?}"));
                    continue;
                }
                _ => {}
            }
            if let Some(b) = backend {
                out.insert(name, b);
            }
        }
        out
    }

    fn hosts(
        &mut self,
        v: &Value,
        listeners: &Listeners,
        defaults: &BTreeMap<String, RawBackend>,
        connect: Duration,
    ) -> Vec<Host> {
        let Value::Sequence(items) = v else {
            self.err("hosts", format!("expected a list, found {}", kind(v)));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("hosts[{i}]");
            if let Some(h) = self.host(item, &path, listeners, defaults, connect) {
                out.push(h);
            }
        }
        out
    }

    fn host(
        &mut self,
        v: &Value,
        path: &str,
        listeners: &Listeners,
        defaults: &BTreeMap<String, RawBackend>,
        connect: Duration,
    ) -> Option<Host> {
        let m = self.mapping(v, path, HOST_KEYS)?;
        let names_path = join(path, "names");
        let names: Vec<HostPattern> = match self.required(m, path, "names") {
            Some(v) => self
                .strings(v, &names_path)
                .into_iter()
                .filter_map(|(p, s)| {
                    HostPattern::parse(&s)
                        .map_err(|e| self.err(&p, format!("{s:?}: {e}")))
                        .ok()
                })
                .collect(),
            None => Vec::new(),
        };
        if names.is_empty() && field(m, "names").is_some() {
            self.err(&names_path, "at least one name is needed");
        }
        for n in &names {
            if let Some(first) = self.seen_names.insert(n.clone(), path.to_string()) {
                self.err(&names_path, format!("{n} is already listed under {first}"));
            }
        }
        let certificate = match self.required(m, path, "certificate") {
            Some(v) => self.cert_source(v, &join(path, "certificate")),
            None => None,
        };
        let overrides = match field(m, "backends") {
            Some(v) => self.backend_map(v, &join(path, "backends"), listeners),
            None => BTreeMap::new(),
        };
        let mut backends = BTreeMap::new();
        for name in listeners.keys() {
            if let Some(raw) = overrides.get(name).or_else(|| defaults.get(name)) {
                backends.insert(
                    name.clone(),
                    Backend {
                        address: raw.address,
                        proxy_protocol: raw.proxy_protocol,
                        connect_timeout: raw.connect_timeout.unwrap_or(connect),
                    },
                );
            }
        }
        if names.is_empty() {
            return None;
        }
        Some(Host {
            names,
            certificate: certificate?,
            backends,
        })
    }

    fn cert_source(&mut self, v: &Value, path: &str) -> Option<CertSource> {
        match v {
            Value::String(s) if s == "self-signed" => Some(CertSource::SelfSigned),
            Value::String(s) if s == "acme" => Some(CertSource::Acme),
            Value::String(s) => {
                self.err(
                    path,
                    format!("unknown certificate source {s:?} (expected self-signed, acme or {{ cert, key }})"),
                );
                None
            }
            Value::Mapping(_) => {
                let m = self.mapping(v, path, CERT_FILE_KEYS)?;
                let cert = self
                    .required(m, path, "cert")
                    .and_then(|c| self.string(c, &join(path, "cert")));
                let key = self
                    .required(m, path, "key")
                    .and_then(|k| self.string(k, &join(path, "key")));
                Some(CertSource::Files {
                    cert: self.path(&cert?),
                    key: self.path(&key?),
                })
            }
            other => {
                self.err(
                    path,
                    format!(
                        "expected self-signed, acme or {{ cert, key }}, found {}",
                        kind(other)
                    ),
                );
                None
            }
        }
    }

    fn acme(&mut self, v: &Value) -> Option<Acme> {
        let m = self.mapping(v, "acme", ACME_KEYS)?;
        let directory = self
            .required(m, "acme", "directory")
            .and_then(|v| self.string(v, "acme.directory"))
            .and_then(|d| match d.as_str() {
                "letsencrypt" => Some(defaults::LETSENCRYPT.to_string()),
                "letsencrypt-staging" => Some(defaults::LETSENCRYPT_STAGING.to_string()),
                url if url.starts_with("https://") && url.len() > "https://".len() => {
                    Some(url.to_string())
                }
                other => {
                    self.err(
                        "acme.directory",
                        format!("{other:?}: expected letsencrypt, letsencrypt-staging or an https:// URL"),
                    );
                    None
                }
            });
        let contact = match field(m, "contact") {
            Some(v) => self
                .strings(v, "acme.contact")
                .into_iter()
                .filter_map(|(p, s)| {
                    let ok = s.strip_prefix("mailto:").is_some_and(|a| a.contains('@'));
                    if !ok {
                        self.err(&p, format!("{s:?}: expected mailto:postmaster@example.com"));
                    }
                    ok.then_some(s)
                })
                .collect(),
            None => Vec::new(),
        };
        match self
            .required(m, "acme", "terms_of_service_agreed")
            .map(|v| self.de::<bool>(v, "acme.terms_of_service_agreed"))
        {
            Some(Some(true)) | Some(None) | None => {}
            Some(Some(false)) => self.err(
                "acme.terms_of_service_agreed",
                "the CA issues nothing until you agree to its terms: read them, then set true",
            ),
        }
        let challenges = match field(m, "challenges") {
            Some(v) => {
                let list: Option<Vec<Challenge>> = self.de(v, "acme.challenges");
                match list {
                    Some(l) if l.is_empty() => {
                        self.err("acme.challenges", "at least one challenge is needed");
                        None
                    }
                    Some(mut l) => {
                        let mut seen = Vec::new();
                        l.retain(|c| {
                            !seen.contains(c) && {
                                seen.push(*c);
                                true
                            }
                        });
                        Some(l)
                    }
                    None => None,
                }
            }
            None => Some(vec![Challenge::TlsAlpn01, Challenge::Http01]),
        };
        let ca_roots = field(m, "ca_roots")
            .and_then(|v| self.string(v, "acme.ca_roots"))
            .map(|s| self.path(&s));
        let profile = field(m, "profile").and_then(|v| self.string(v, "acme.profile"));
        // Outer None: not written; inner None: written with problems.
        let eab = field(m, "eab").map(|v| self.eab(v));
        let key_type = field(m, "key_type")
            .map(|v| self.de(v, "acme.key_type"))
            .unwrap_or(Some(KeyType::default()));
        let renew_before = field(m, "renew_before")
            .map(|v| self.duration_upto(v, "acme.renew_before", MAX_RENEW_BEFORE));
        Some(Acme {
            directory: directory?,
            contact,
            challenges: challenges?,
            ca_roots,
            profile,
            eab: eab.map_or(Some(None), |e| e.map(Some))?,
            key_type: key_type?,
            renew_before: renew_before.map_or(Some(None), |d| d.map(Some))?,
        })
    }

    fn eab(&mut self, v: &Value) -> Option<Eab> {
        use base64::Engine;
        let m = self.mapping(v, "acme.eab", EAB_KEYS)?;
        let kid = self
            .required(m, "acme.eab", "kid")
            .and_then(|v| self.string(v, "acme.eab.kid"));
        let hmac_key = self
            .required(m, "acme.eab", "hmac_key")
            .and_then(|v| self.string(v, "acme.eab.hmac_key"))
            .and_then(|s| {
                let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                match engine.decode(s.trim_end_matches('=')) {
                    Ok(k) if !k.is_empty() => Some(k),
                    _ => {
                        self.err(
                            "acme.eab.hmac_key",
                            "expected the base64url key the CA gave you",
                        );
                        None
                    }
                }
            });
        Some(Eab {
            kid: kid?,
            hmac_key: hmac_key?,
        })
    }

    /// Checks what `acme:` and `certificate: acme` need from each other and
    /// from the listeners; keeps only the challenges some listener answers.
    fn acme_fits(
        &mut self,
        acme: Option<Acme>,
        written: bool,
        listeners: &BTreeMap<String, Listener>,
        hosts: &[Host],
    ) -> Option<Acme> {
        let acme_hosts: Vec<usize> = (0..hosts.len())
            .filter(|&i| hosts[i].certificate == CertSource::Acme)
            .collect();
        for &i in &acme_hosts {
            if !written {
                self.err(
                    &format!("hosts[{i}].certificate"),
                    "acme needs an `acme:` block (directory, contact, terms_of_service_agreed)",
                );
            }
            for n in &hosts[i].names {
                if let HostPattern::Wildcard(_) = n {
                    self.err(
                        &format!("hosts[{i}].names"),
                        format!("{n}: wildcard certificates need dns-01, which portcullis does not do; use {{ cert, key }} files"),
                    );
                }
            }
        }
        let mut acme = acme?;
        let answers = |c: &Challenge| match c {
            Challenge::Http01 => listeners.values().any(|l| l.protocol == Protocol::Http),
            Challenge::TlsAlpn01 => listeners.values().any(|l| l.tls == TlsMode::Implicit),
        };
        let wanted = acme.challenges.clone();
        acme.challenges.retain(answers);
        if acme.challenges.is_empty() && !acme_hosts.is_empty() {
            let wanted: Vec<&str> = wanted.iter().map(|c| c.as_str()).collect();
            self.err(
                "acme.challenges",
                format!(
                    "no listener can answer {}: http-01 needs a `protocol: http` listener (port 80), tls-alpn-01 a `tls: implicit` one (port 443)",
                    wanted.join(" or ")
                ),
            );
        }
        Some(acme)
    }

    fn default_host(&mut self, v: &Value, hosts: &[Host]) -> Option<Hostname> {
        let s = self.string(v, "default_host")?;
        let name = Hostname::parse(&s)
            .map_err(|e| self.err("default_host", format!("{s:?}: {e}")))
            .ok()?;
        if !hosts.is_empty()
            && !hosts
                .iter()
                .any(|h| h.names.iter().any(|p| p.matches(&name)))
        {
            self.err(
                "default_host",
                format!("{name} is not among the names of any host"),
            );
        }
        Some(name)
    }

    fn timeouts(&mut self, v: Option<&Value>) -> Timeouts {
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

    fn log(&mut self, v: Option<&Value>) -> LogConfig {
        let mut log = LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        };
        let Some(m) = v.and_then(|v| self.mapping(v, "log", LOG_KEYS)) else {
            return log;
        };
        if let Some(f) = field(m, "format").and_then(|f| self.de(f, "log.format")) {
            log.format = f;
        }
        if let Some(l) = field(m, "level").and_then(|l| self.string(l, "log.level")) {
            match bad_log_directive(&l) {
                Some(bad) => self.err(
                    "log.level",
                    format!("{bad:?} is not a level (error, warn, info, debug, trace, off) or target=level"),
                ),
                None => log.level = l,
            }
        }
        log
    }
}

/// The first part of a `tracing` filter that is neither a level nor
/// `target=level`: a bare typo like `infoo` would silently mean "a target
/// named infoo" and switch all logging off.
fn bad_log_directive(filter: &str) -> Option<&str> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let is_level = |s: &str| LEVELS.contains(&s.to_ascii_lowercase().as_str());
    filter
        .split(',')
        .map(str::trim)
        .find(|d| match d.split_once('=') {
            Some((target, level)) => target.is_empty() || !is_level(level),
            None => !is_level(d),
        })
}

fn first_exact(names: &[HostPattern]) -> Option<Hostname> {
    names.iter().find_map(|n| match n {
        HostPattern::Exact(h) => Some(h.clone()),
        HostPattern::Wildcard(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::parse(text, Path::new("/etc/portcullis"))
            .map_err(|ps| ps.iter().map(|p| p.to_string()).collect())
    }

    /// `errs` are exactly the problems `expect` starts, in any order.
    fn assert_problems(errs: &[String], expect: &[&str]) {
        for e in expect {
            assert!(
                errs.iter().any(|got| got.starts_with(e)),
                "missing {e:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
    }

    const GOOD: &str = r#"
state_dir: state
listeners:
  imaps: { bind: ["127.0.0.1:10993", "[::1]:10993"], protocol: imap, tls: implicit }
  https: { bind: "127.0.0.1:10443", protocol: tcp, tls: implicit, alpn: [h2, http/1.1] }
backends:
  imaps: 127.0.0.1:10143
hosts:
  - names: [mail.example.test, IMAP.example.test]
    certificate: self-signed
    backends:
      https: { address: "127.0.0.1:8080", proxy_protocol: none, connect_timeout: 2s }
  - names: ["*.example.org"]
    certificate: { cert: /etc/ssl/org.pem, key: org.key }
default_host: mail.example.test
timeouts: { idle: 45m }
"#;

    #[test]
    fn admin_and_notify_blocks_parse_and_their_mistakes_are_named() {
        let c = parse(&format!(
            "{GOOD}admin: {{ bind: 127.0.0.1:9099 }}\nnotify: {{ email: [ops@example.test], smtp: 127.0.0.1:20025, webhook: \"https://hooks.example.test/x?k=1\" }}\n"
        ))
        .unwrap();
        assert_eq!(c.admin.unwrap().bind, "127.0.0.1:9099".parse().unwrap());
        let n = c.notify.unwrap();
        assert_eq!(n.email, ["ops@example.test"]);
        assert_eq!(n.from, "portcullis@mail.example.test");
        let smtp = n.smtp.unwrap();
        assert_eq!(smtp.address, "127.0.0.1:20025".parse().unwrap());
        assert_eq!(smtp.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(
            n.webhook.as_deref(),
            Some("https://hooks.example.test/x?k=1")
        );

        for (block, want) in [
            (
                "notify: { email: [ops@example.test] }",
                "notify.smtp: missing",
            ),
            (
                "notify: { webhook: \"https://hooks.example.test/a b\" }",
                "notify.webhook: \"https://hooks.example.test/a b\": expected an http",
            ),
            (
                "notify: { webhook: ftp://x }",
                "notify.webhook: \"ftp://x\": expected an http",
            ),
            (
                "notify: { from: nobody }",
                "notify.from: \"nobody\": expected an address",
            ),
            (
                "notify: { email: [\"a b@c\"], smtp: 127.0.0.1:25 }",
                "notify.email[0]: \"a b@c\": expected an address",
            ),
            ("notify: {}", "notify: nobody to notify"),
            (
                "admin: { bind: localhost:9099 }",
                "admin.bind: invalid address",
            ),
        ] {
            let errs = parse(&format!("{GOOD}{block}\n")).unwrap_err();
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "{block}: {errs:?}"
            );
        }
    }

    #[test]
    fn notify_email_defaults_to_the_acme_contacts() {
        let text = GOOD.replace(
            "hosts:",
            "acme: { directory: letsencrypt-staging, contact: [\"mailto:ops@example.test\"], terms_of_service_agreed: true }\nhosts:",
        ) + "notify: { smtp: 127.0.0.1:20025 }\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.notify.unwrap().email, ["ops@example.test"]);
    }

    #[test]
    fn a_good_config_parses_into_typed_values() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/portcullis/state"));
        assert_eq!(c.listeners["imaps"].bind.len(), 2);
        assert_eq!(
            c.listeners["https"].alpn,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert_eq!(c.hosts[0].names[1].to_string(), "imap.example.test");
        let https = &c.hosts[0].backends["https"];
        assert_eq!(https.proxy_protocol, ProxyProtocol::None);
        assert_eq!(https.connect_timeout, Duration::from_secs(2));
        // defaults merge in, and the host without an https override gets none
        assert_eq!(
            c.hosts[1].backends["imaps"].proxy_protocol,
            ProxyProtocol::V2
        );
        assert_eq!(
            c.hosts[1].backends["imaps"].connect_timeout,
            defaults::CONNECT
        );
        assert!(!c.hosts[1].backends.contains_key("https"));
        assert_eq!(
            c.hosts[1].certificate,
            CertSource::Files {
                cert: "/etc/ssl/org.pem".into(),
                key: "/etc/portcullis/org.key".into()
            }
        );
        assert_eq!(c.timeouts.idle, Duration::from_secs(45 * 60));
        assert_eq!(c.timeouts.handshake, defaults::HANDSHAKE);
        assert_eq!(
            c.unrouted(),
            vec![("https".to_string(), "*.example.org".to_string())]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let text = r#"
listeners:
  imaps: { bind: ["127.0.0.1:10993"], protocol: imap, tls: implict }
  pop3s: { bind: "127.0.0.1:10995", protocol: pop3, tls: implicit, colour: blue }
backends:
  imaps: 127.0.0.1:10143
  imap: 127.0.0.1:10144
hosts:
  - names: [a.example.test]
    certificate: self-signed
  - names: [b.example.test, "bad name"]
    certificate: self-signed
    backends:
      pop3s: "10.0.0.5:99999"
  - names: [a.example.test]
    certificate: { cert: x.pem }
default_host: nowhere.test
timeouts: { idle: forever, connect: 0s }
max_connections: 100000000
log: { level: infoo }
"#;
        let errs = parse(text).unwrap_err();
        let expect = [
            "listeners.imaps.tls: unknown variant `implict`, expected one of",
            "listeners.pop3s.colour: unknown key",
            "backends.imap: no listener named \"imap\"",
            "hosts[1].names[1]: \"bad name\": invalid label",
            "hosts[1].backends.pop3s: invalid address \"10.0.0.5:99999\"",
            "hosts[2].certificate.key: missing",
            "hosts[2].names: a.example.test is already listed under hosts[0]",
            "default_host: nowhere.test is not among the names of any host",
            "timeouts.idle: invalid duration forever",
            "timeouts.connect: 0s is out of range",
            "max_connections: expected a whole number from 1 to",
            "log.level: \"infoo\" is not a level",
        ];
        assert_problems(&errs, &expect);
    }

    #[test]
    fn missing_sections_and_bad_yaml_are_reported() {
        let errs = parse("state_dir: x\n").unwrap_err();
        assert_eq!(errs, vec!["listeners: missing", "hosts: missing"]);
        let errs = parse("listeners: [\n").unwrap_err();
        assert!(errs[0].starts_with("YAML: "), "{errs:?}");
        let errs = parse("- just\n- a list\n").unwrap_err();
        assert_eq!(errs, vec!["expected a mapping, found a list"]);
    }

    const ACME: &str = r#"
acme:
  directory: letsencrypt-staging
  contact: [mailto:postmaster@example.test]
  terms_of_service_agreed: true
  eab: { kid: kid-1, hmac_key: c2VjcmV0LWtleQ }
  key_type: ecdsa-p384
  renew_before: 30d
listeners:
  imaps: { bind: "127.0.0.1:10993", protocol: imap, tls: implicit }
  http: { bind: "127.0.0.1:10080", protocol: http }
backends:
  imaps: 127.0.0.1:10143
hosts:
  - names: [mail.example.test, imap.example.test]
    certificate: acme
    backends: { http: 127.0.0.1:8080 }
"#;

    #[test]
    fn the_acme_block_parses_with_its_defaults() {
        let c = parse(ACME).unwrap();
        let a = c.acme.unwrap();
        assert_eq!(a.directory, defaults::LETSENCRYPT_STAGING);
        assert_eq!(a.challenges, [Challenge::TlsAlpn01, Challenge::Http01]);
        assert_eq!(a.key_type, KeyType::EcdsaP384);
        assert_eq!(a.eab.unwrap().hmac_key, b"secret-key");
        assert_eq!(a.renew_before, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(c.hosts[0].certificate, CertSource::Acme);
        assert_eq!(
            c.hosts[0].backends["http"].address,
            "127.0.0.1:8080".parse().unwrap()
        );
    }

    #[test]
    fn acme_mistakes_are_reported_with_their_key_paths() {
        let text = ACME
            .replace("letsencrypt-staging", "http://acme.example.test/dir")
            .replace("mailto:postmaster@example.test", "postmaster@example.test")
            .replace("agreed: true", "agreed: false")
            .replace("c2VjcmV0LWtleQ", "not base64!")
            .replace("ecdsa-p384", "dsa")
            .replace("30d", "2y")
            .replace("imap.example.test", "\"*.example.org\"");
        let errs = parse(&text).unwrap_err();
        for want in [
            "acme.directory: \"http://acme.example.test/dir\": expected",
            "acme.contact[0]: \"postmaster@example.test\": expected mailto:",
            "acme.terms_of_service_agreed: the CA issues nothing",
            "acme.eab.hmac_key: expected the base64url key",
            "acme.key_type: ",
            "acme.renew_before: 2years is out of range",
            "hosts[0].names: *.example.org: wildcard certificates need dns-01",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(want)), "{want}: {errs:?}");
        }
    }

    #[test]
    fn acme_needs_its_block_and_a_listener_that_answers_a_challenge() {
        let no_block = r#"
listeners:
  imap: { bind: "127.0.0.1:10143", protocol: imap, tls: starttls }
hosts:
  - names: [a.example.test]
    certificate: acme
"#;
        let errs = parse(no_block).unwrap_err();
        assert!(errs[0].starts_with("hosts[0].certificate: acme needs an `acme:` block"));

        let no_listener = format!(
            "acme: {{ directory: letsencrypt, terms_of_service_agreed: true, challenges: [http-01] }}\n{no_block}"
        );
        let errs = parse(&no_listener).unwrap_err();
        assert!(
            errs[0].starts_with("acme.challenges: no listener can answer http-01"),
            "{errs:?}"
        );
        // tls-alpn-01 is dropped where no implicit-TLS listener could answer it.
        let with_http = ACME.replace("tls: implicit", "tls: starttls");
        assert_eq!(
            parse(&with_http).unwrap().acme.unwrap().challenges,
            [Challenge::Http01]
        );
    }

    #[test]
    fn challenges_on_ports_the_ca_does_not_use_are_warned_about() {
        let c = parse(ACME).unwrap();
        let w = c.acme_port_warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("the CA validates tls-alpn-01 on port 443"));
        assert!(w[1].starts_with("the CA validates http-01 on port 80"));
        let standard = ACME
            .replace("127.0.0.1:10993", "0.0.0.0:443")
            .replace("127.0.0.1:10080", "0.0.0.0:80");
        assert!(parse(&standard).unwrap().acme_port_warnings().is_empty());
    }

    #[test]
    fn http_listeners_are_plaintext() {
        let text = ACME.replace("protocol: http }", "protocol: http, tls: implicit }");
        let errs = parse(&text).unwrap_err();
        assert!(errs[0].starts_with("listeners.http.tls: http listeners are plaintext"));
    }

    #[test]
    fn default_host_defaults_to_the_first_exact_name() {
        let text = GOOD.replace("default_host: mail.example.test", "");
        assert_eq!(
            parse(&text).unwrap().default_host.as_str(),
            "mail.example.test"
        );
    }

    #[test]
    fn limits_have_defaults_merge_per_listener_and_name_their_mistakes() {
        let c = parse(GOOD).unwrap();
        let l = &c.listeners["imaps"].limits;
        assert_eq!(*l, Limits::default());
        assert_eq!(
            (l.connections_per_ip, l.handshakes_per_ip, l.handshake_burst),
            (500, 20, 100)
        );
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(l.exempt, [net("127.0.0.0/8"), net("::1/128")]);

        let text = GOOD.replace(
            "tls: implicit, alpn",
            "tls: implicit, limits: { connections_per_ip: 5, exempt: [] }, alpn",
        ) + "limits: { handshakes_per_ip: 7, exempt: [10.1.2.3/8, \"2001:db8::1\"] }\n";
        let c = parse(&text).unwrap();
        let imaps = &c.listeners["imaps"].limits;
        assert_eq!(
            (
                imaps.connections_per_ip,
                imaps.handshakes_per_ip,
                imaps.handshake_burst
            ),
            (500, 7, 100),
            "the global block over the defaults"
        );
        assert_eq!(imaps.exempt, [net("10.0.0.0/8"), net("2001:db8::1/128")]);
        let https = &c.listeners["https"].limits;
        assert_eq!(
            (https.connections_per_ip, https.handshakes_per_ip),
            (5, 7),
            "the listener's block over the global one"
        );
        assert!(https.exempt.is_empty());

        let text = GOOD.replace(
            "tls: implicit, alpn",
            "tls: implicit, limits: { connections_per_ip: 2000000 }, alpn",
        ) + "limits: { connections_per_ip: 0, handshakes_per_ip: 2.5, handshake_burst: many, exempt: [10.0.0.0/33, example.org], colour: red }\n";
        let errs = parse(&text).unwrap_err();
        let expect = [
            "limits.colour: unknown key",
            "limits.connections_per_ip: expected a whole number from 1 to 1000000, found 0",
            "limits.handshakes_per_ip: expected a whole number from 1 to 1000000, found 2.5",
            "limits.handshake_burst: expected a whole number from 1 to 1000000, found many",
            "limits.exempt[0]: invalid network \"10.0.0.0/33\"",
            "limits.exempt[1]: invalid network \"example.org\"",
            "listeners.https.limits.connections_per_ip: expected a whole number from 1 to 1000000, found 2000000",
        ];
        assert_problems(&errs, &expect);
    }

    #[test]
    fn mail_listeners_speak_their_protocols_alpn_ids_unless_told_otherwise() {
        let text = r#"
listeners:
  imaps: { bind: "127.0.0.1:1", protocol: imap, tls: implicit }
  imap:  { bind: "127.0.0.1:2", protocol: imap, tls: starttls }
  pop3s: { bind: "127.0.0.1:3", protocol: pop3, tls: implicit }
  smtps: { bind: "127.0.0.1:4", protocol: smtp, tls: implicit }
  smtp:  { bind: "127.0.0.1:5", protocol: smtp, tls: starttls, alpn: [smtp] }
  sieve: { bind: "127.0.0.1:6", protocol: sieve, tls: starttls }
  https: { bind: "127.0.0.1:7", protocol: tcp, tls: implicit, alpn: [http/1.1] }
  tcp:   { bind: "127.0.0.1:8", protocol: tcp, tls: implicit }
  open:  { bind: "127.0.0.1:9", protocol: imap, tls: implicit, alpn: [] }
  http:  { bind: "127.0.0.1:10", protocol: http }
hosts: [ { names: [mail.example.test], certificate: self-signed } ]
"#;
        let c = parse(text).unwrap();
        let alpn = |name: &str| -> Vec<String> {
            c.listeners[name]
                .alpn
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        };
        assert_eq!(alpn("imaps"), ["imap"]);
        assert_eq!(alpn("imap"), ["imap"]);
        assert_eq!(alpn("pop3s"), ["pop3"]);
        assert_eq!(alpn("smtps"), ["smtp", "submission"]);
        assert_eq!(alpn("smtp"), ["smtp"], "a written list is kept");
        assert_eq!(alpn("sieve"), ["managesieve"]);
        assert_eq!(alpn("https"), ["http/1.1"]);
        assert!(alpn("tcp").is_empty(), "tcp without alpn accepts anything");
        assert!(alpn("open").is_empty(), "alpn: [] turns the check off");
        assert!(alpn("http").is_empty());

        let errs =
            parse(&text.replace("protocol: http }", "protocol: http, alpn: [h2] }")).unwrap_err();
        assert_eq!(
            errs,
            ["listeners.http.alpn: ALPN only applies to TLS listeners"]
        );
    }

    #[test]
    fn two_listeners_cannot_share_an_address() {
        let text = GOOD.replace("127.0.0.1:10443", "127.0.0.1:10993");
        let errs = parse(&text).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("already bound by listener"), "{errs:?}");
    }
}
