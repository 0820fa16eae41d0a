//! The host table: every configured name → its host (certificate and backends).
//! The one lookup rule, used by the certificate resolver and by routing alike:
//! exact name, then one-label wildcard, then `default_host` (no SNI, or unknown
//! SNI under `unknown_sni: default`), else refuse.
//!
//! A table is immutable once built; a reload builds a new one and swaps it.
//! Only a host's certificate changes in place: it sits in a [`CertSlot`] that
//! its one writer (the host's ACME task) swaps on renewal.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;

use crate::config::names::{HostPattern, Hostname};
use crate::config::{Backend, UnknownSni};
use crate::tls::certs::CertInfo;

/// One `hosts[]` entry, ready to serve.
#[derive(Debug)]
pub struct Host {
    pub names: Vec<HostPattern>,
    pub cert: Arc<CertSlot>,
    /// Listener name → backend.
    pub backends: BTreeMap<String, Backend>,
}

/// Where the certificate a host serves came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Files,
    SelfSigned,
    /// Issued over ACME.
    Acme,
    /// `certificate: acme` but nothing issued yet: a self-signed stand-in.
    Placeholder,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Files => "files",
            Source::SelfSigned => "self-signed",
            Source::Acme => "acme",
            Source::Placeholder => "placeholder",
        }
    }
}

/// A certificate as served: the key rustls signs with, and what it says.
#[derive(Debug)]
pub struct Served {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    pub source: Source,
}

/// The certificate a host serves now. The next handshake on every listener
/// sees a swap; sessions already open keep the certificate they were given.
#[derive(Debug)]
pub struct CertSlot(ArcSwap<Served>);

impl CertSlot {
    pub fn new(served: Served) -> CertSlot {
        CertSlot(ArcSwap::from_pointee(served))
    }

    pub fn load(&self) -> Arc<Served> {
        self.0.load_full()
    }

    /// For the slot's one writer.
    pub fn store(&self, served: Served) {
        self.0.store(Arc::new(served));
    }

    /// The key rustls needs, without cloning the rest.
    pub fn key(&self) -> Arc<CertifiedKey> {
        self.0.load().key.clone()
    }
}

impl Host {
    /// The name to greet with and log: the first configured name.
    pub fn label(&self) -> String {
        self.names
            .first()
            .map(|n| n.to_string())
            .unwrap_or_default()
    }
}

/// How a client's SNI led to its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matched {
    Exact,
    Wildcard,
    /// The client sent no SNI: `default_host`.
    NoSni,
    /// The SNI matched no host and `unknown_sni: default` served `default_host`.
    UnknownDefault,
    /// The SNI matched no host and `unknown_sni: reject` refuses it.
    Rejected,
}

impl Matched {
    pub fn as_str(self) -> &'static str {
        match self {
            Matched::Exact => "exact",
            Matched::Wildcard => "wildcard",
            Matched::NoSni => "no_sni",
            Matched::UnknownDefault => "unknown_sni",
            Matched::Rejected => "rejected",
        }
    }
}

#[derive(Debug)]
pub struct HostTable {
    exact: Names,
    /// Keyed by the wildcard's base: `*.example.org` → `example.org`.
    wildcard: Names,
    default: Arc<Host>,
    unknown_sni: UnknownSni,
}

#[derive(Debug, thiserror::Error)]
#[error("default_host {0} is not among the names of any host")]
pub struct NoDefaultHost(Hostname);

impl HostTable {
    pub fn new(
        hosts: Vec<Host>,
        default_host: &Hostname,
        unknown_sni: UnknownSni,
    ) -> Result<HostTable, NoDefaultHost> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for host in hosts {
            let host = Arc::new(host);
            for name in &host.names {
                match name {
                    HostPattern::Exact(n) => exact.insert(n.as_str().to_string(), host.clone()),
                    HostPattern::Wildcard(base) => {
                        wildcard.insert(base.as_str().to_string(), host.clone())
                    }
                };
            }
        }
        let (default, _) = find(&exact, &wildcard, default_host.as_str());
        let default = default.ok_or_else(|| NoDefaultHost(default_host.clone()))?;
        Ok(HostTable {
            exact,
            wildcard,
            default,
            unknown_sni,
        })
    }

    /// The host for a ClientHello's SNI (`None` = the client sent none).
    pub fn lookup(&self, sni: Option<&str>) -> (Option<Arc<Host>>, Matched) {
        let Some(sni) = sni else {
            return (Some(self.default.clone()), Matched::NoSni);
        };
        // rustls already lowercases SNI; this keeps the rule true for any caller.
        let name: Cow<'_, str> = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(sni.to_ascii_lowercase())
        } else {
            Cow::Borrowed(sni)
        };
        match find(&self.exact, &self.wildcard, name.trim_end_matches('.')) {
            (Some(h), how) => (Some(h), how),
            (None, _) if self.unknown_sni == UnknownSni::Default => {
                (Some(self.default.clone()), Matched::UnknownDefault)
            }
            (None, _) => (None, Matched::Rejected),
        }
    }
}

type Names = HashMap<String, Arc<Host>>;

/// Exact name first, then the wildcard one label up.
fn find(exact: &Names, wildcard: &Names, name: &str) -> (Option<Arc<Host>>, Matched) {
    if let Some(h) = exact.get(name) {
        return (Some(h.clone()), Matched::Exact);
    }
    match crate::config::names::parent(name).and_then(|p| wildcard.get(p)) {
        Some(h) => (Some(h.clone()), Matched::Wildcard),
        None => (None, Matched::Rejected),
    }
}
