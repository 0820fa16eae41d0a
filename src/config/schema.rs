//! The typed config: what the YAML means once the walk has checked it.
//! Plain values, built once per load and cloned into whatever needs them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::defaults;
use super::names::{HostPattern, Hostname};
use crate::protocol::{Protocol, TlsMode};

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
    /// Shared ACME state for several instances; `None`: `state_dir` alone.
    pub store: Option<Etcd>,
    /// MTA-STS and client autoconfiguration, per mail domain.
    pub domains: Vec<MailDomain>,
}

/// `store: { etcd: … }`: the etcd cluster several instances share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Etcd {
    /// Client URLs, `http://` or `https://`.
    pub endpoints: Vec<String>,
    /// Every key starts with it; ends with `/`.
    pub prefix: String,
    /// This instance's name among the others.
    pub node: String,
    pub tls: Option<EtcdTls>,
    /// etcd authentication: a user and the file holding its password.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// TLS to etcd: the CA that signed its server certificates, and a client
/// certificate when etcd asks for one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
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
    /// `{ cert, key }`, or a list of two such pairs of different key
    /// types (one ECDSA, one RSA): `second` is the other pair.
    Files {
        cert: PathBuf,
        key: PathBuf,
        second: Option<(PathBuf, PathBuf)>,
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
    /// `acme.key_types` (or `key_type`): one or two, at most one ECDSA and
    /// one RSA; each is a certificate of its own. The first is stored as a
    /// single `key_type` always was.
    pub key_types: Vec<KeyType>,
    /// Renew this long before expiry instead of at a third of the lifetime
    /// remaining (ignored where the CA offers ARI).
    pub renew_before: Option<Duration>,
    /// `acme.dns`: where dns-01 records are added, for hosts without their own.
    pub dns: Option<Dns>,
    /// `acme.key`: what each order does with the certificate's key.
    pub key: KeyPolicy,
    /// `acme.tlsa`: where rollover keys are looked for in DNS.
    pub tlsa: Option<TlsaCheck>,
    /// Hosts with their own `acme:` (challenges, dns, key), by first name.
    pub per_host: BTreeMap<String, HostAcme>,
    /// `acme.staging`: the directory `portcullis renew --dry-run` orders
    /// from; Let's Encrypt's staging for Let's Encrypt.
    pub staging: Option<String>,
}

/// What an order does with the key (RFC 7672 §8.1: a `TLSA 3 1 1` record
/// names the key, so a new key at every renewal breaks DANE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyPolicy {
    /// A new key at every order.
    #[default]
    New,
    /// The current certificate's key again, as long as it is of `key_type`.
    Reuse,
    /// The current key until the next one, made ahead of time, has its
    /// `TLSA 3 1 1` record served (`acme.tlsa.check`) for `wait_ttls` TTLs.
    Rollover,
}

/// `acme.tlsa`: where a `key: rollover` host's next key must be published
/// before it is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsaCheck {
    /// Authoritative servers asked (`IP:PORT`), each of which must serve it.
    pub check: Vec<std::net::SocketAddr>,
    /// How many of the record's TTLs it must have been served for.
    pub wait_ttls: u32,
}

impl Acme {
    /// The challenges `first`'s host is ordered with, in preference order.
    pub fn challenges_for(&self, first: &str) -> Vec<Challenge> {
        self.per_host
            .get(first)
            .and_then(|h| h.challenges.clone())
            .unwrap_or_else(|| self.challenges.clone())
    }

    /// What `first`'s host's orders do with its key.
    pub fn key_for(&self, first: &str) -> KeyPolicy {
        self.per_host
            .get(first)
            .and_then(|h| h.key)
            .unwrap_or(self.key)
    }

    /// The key types `first`'s host is ordered with, first one first.
    pub fn key_types_for(&self, first: &str) -> &[KeyType] {
        self.per_host
            .get(first)
            .and_then(|h| h.key_types.as_deref())
            .unwrap_or(&self.key_types)
    }

    /// Where `first`'s host adds its dns-01 records.
    pub fn dns_for(&self, first: &str) -> Option<&Dns> {
        self.per_host
            .get(first)
            .and_then(|h| h.dns.as_ref())
            .or(self.dns.as_ref())
    }
}

/// A host's own `acme:` settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAcme {
    pub challenges: Option<Vec<Challenge>>,
    pub dns: Option<Dns>,
    pub key: Option<KeyPolicy>,
    pub key_types: Option<Vec<KeyType>>,
    /// Filled in for `key: rollover`: the owners of its TLSA records
    /// (`_25._tcp.mx.example.org`), from the listeners that carry it.
    pub tlsa_owners: Vec<String>,
}

/// `acme.dns` (or a host's): RFC 2136 updates of `zone` at `server`,
/// signed with `tsig`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dns {
    /// The zone's primary: where updates go (`IP:PORT`).
    pub server: std::net::SocketAddr,
    pub zone: String,
    pub tsig: Tsig,
    /// The authoritative servers that must serve a record before the CA is
    /// told to look (`IP:PORT`); `server` alone when not given.
    pub check: Vec<std::net::SocketAddr>,
    /// How long they get to serve it.
    pub propagation_timeout: Duration,
}

/// A TSIG key: its name as the DNS server knows it, its algorithm, and
/// the file holding its secret (base64, or a BIND key file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tsig {
    pub name: String,
    pub algorithm: TsigAlgo,
    pub secret_file: PathBuf,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum TsigAlgo {
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "hmac-sha384")]
    HmacSha384,
    #[serde(rename = "hmac-sha512")]
    HmacSha512,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Challenge {
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    #[serde(rename = "http-01")]
    Http01,
    #[serde(rename = "dns-01")]
    Dns01,
}

impl Challenge {
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::TlsAlpn01 => "tls-alpn-01",
            Challenge::Http01 => "http-01",
            Challenge::Dns01 => "dns-01",
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

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa2048 => "rsa-2048",
        }
    }

    pub fn is_ecdsa(self) -> bool {
        matches!(self, KeyType::EcdsaP256 | KeyType::EcdsaP384)
    }
}

#[derive(Clone, Debug)]
pub struct Host {
    pub names: Vec<HostPattern>,
    pub certificate: CertSource,
    /// Listener name → backend, with the top-level defaults already merged in.
    pub backends: BTreeMap<String, Backend>,
    /// `acme:` of a `certificate: acme` host: its own challenges and dns.
    pub acme: Option<HostAcme>,
}

impl Host {
    /// Whether `name` is one of the host's names or under its wildcard.
    pub fn covers(&self, name: &Hostname) -> bool {
        self.names.iter().any(|p| p.matches(name))
    }
}

/// The host that serves `name`, by the one lookup rule (as
/// `tls::hosts::HostTable` does at run time): an exact name first, then
/// a wildcard.
pub fn host_serving<'h>(hosts: &'h [Host], name: &Hostname) -> Option<&'h Host> {
    let exact = HostPattern::Exact(name.clone());
    hosts
        .iter()
        .find(|h| h.names.contains(&exact))
        .or_else(|| hosts.iter().find(|h| h.covers(name)))
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

/// `domains.<name>`: what portcullis tells senders and mail clients about
/// one mail domain (the part after the `@`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailDomain {
    pub name: Hostname,
    /// Served at `https://mta-sts.<name>/.well-known/mta-sts.txt`.
    pub mta_sts: Option<MtaSts>,
    /// Served at `autoconfig.<name>` (Thunderbird) and `autodiscover.<name>`
    /// (Outlook).
    pub autoconfig: Option<Autoconfig>,
}

impl MailDomain {
    /// The names portcullis answers HTTPS for on the domain's behalf.
    pub fn service_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.mta_sts.is_some() {
            out.push(format!("mta-sts.{}", self.name));
        }
        if self.autoconfig.is_some() {
            out.push(format!("autoconfig.{}", self.name));
            out.push(format!("autodiscover.{}", self.name));
        }
        out
    }
}

/// An MTA-STS policy (RFC 8461 §3.2) and where TLS reports go (RFC 8460).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtaSts {
    pub mode: StsMode,
    /// The MX host names (or `*.example.org`) a sender may deliver to.
    pub mx: Vec<HostPattern>,
    pub max_age: Duration,
    /// `rua` of the `_smtp._tls` record: `mailto:` or `https:` URIs.
    pub report_to: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StsMode {
    Enforce,
    Testing,
    None,
}

impl StsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StsMode::Enforce => "enforce",
            StsMode::Testing => "testing",
            StsMode::None => "none",
        }
    }
}

/// Client autoconfiguration: which server clients connect to, and how
/// they log in. The ports and TLS modes come from the listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Autoconfig {
    /// The name clients connect to; a name of one of `hosts`.
    pub server: Hostname,
    /// What a client shows for the account.
    pub display_name: String,
    pub username: LoginName,
}

/// What a user logs in with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoginName {
    /// The whole address, `user@example.org`.
    #[default]
    Address,
    /// The part before the `@`.
    Localpart,
}
