//! `backends:`, `hosts:` (names, certificate, backend overrides) and
//! `default_host:`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::listeners::Listeners;
use super::names::{HostPattern, Hostname};
use super::walk::{field, join, kind, Walk};
use super::{Backend, CertSource, Host, ProxyProtocol};

const HOST_KEYS: &[&str] = &["names", "certificate", "backends", "acme"];
const BACKEND_KEYS: &[&str] = &["address", "proxy_protocol", "connect_timeout"];
const CERT_FILE_KEYS: &[&str] = &["cert", "key"];

/// A backend as written, before the listener's defaults are merged in.
pub(super) struct RawBackend {
    pub(super) address: SocketAddr,
    pub(super) proxy_protocol: ProxyProtocol,
    pub(super) connect_timeout: Option<Duration>,
}

impl Walk<'_> {
    pub(super) fn backend(&mut self, v: &Value, path: &str) -> Option<RawBackend> {
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
    pub(super) fn backend_map(
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

    pub(super) fn hosts(
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

    pub(super) fn host(
        &mut self,
        v: &Value,
        path: &str,
        listeners: &Listeners,
        defaults: &BTreeMap<String, RawBackend>,
        connect: Duration,
    ) -> Option<Host> {
        let m = self.mapping(v, path, HOST_KEYS)?;
        let names_path = join(path, "names");
        let names = match self.required(m, path, "names") {
            Some(v) => self.patterns(v, &names_path),
            None => Vec::new(),
        };
        if matches!(field(m, "names"), Some(Value::Sequence(n)) if n.is_empty()) {
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
        let acme = field(m, "acme").map(|v| self.host_acme(v, &join(path, "acme")));
        if acme.is_some() && certificate.as_ref().is_some_and(|c| *c != CertSource::Acme) {
            self.err(
                &join(path, "acme"),
                "only a `certificate: acme` host has ACME settings",
            );
        }
        Some(Host {
            names,
            certificate: certificate?,
            backends,
            acme: acme.map_or(Some(None), |a| a.map(Some))?,
        })
    }

    pub(super) fn cert_source(&mut self, v: &Value, path: &str) -> Option<CertSource> {
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
                let (cert, key) = self.file_pair(v, path)?;
                Some(CertSource::Files {
                    cert,
                    key,
                    second: None,
                })
            }
            // Two pairs, one ECDSA and one RSA (checked when they load).
            Value::Sequence(items) => {
                if items.len() != 2 {
                    self.err(
                        path,
                        format!(
                            "a list of certificate files has two {{ cert, key }} pairs (one ECDSA, one RSA), found {}",
                            items.len()
                        ),
                    );
                    return None;
                }
                let first = self.file_pair(&items[0], &format!("{path}[0]"));
                let second = self.file_pair(&items[1], &format!("{path}[1]"));
                let ((cert, key), second) = (first?, second?);
                Some(CertSource::Files {
                    cert,
                    key,
                    second: Some(second),
                })
            }
            other => {
                self.err(
                    path,
                    format!(
                        "expected self-signed, acme, {{ cert, key }} or a list of two, found {}",
                        kind(other)
                    ),
                );
                None
            }
        }
    }

    /// `{ cert: FILE, key: FILE }`, paths made absolute.
    fn file_pair(&mut self, v: &Value, path: &str) -> Option<(PathBuf, PathBuf)> {
        let m = self.mapping(v, path, CERT_FILE_KEYS)?;
        let cert = self
            .required(m, path, "cert")
            .and_then(|c| self.string(c, &join(path, "cert")));
        let key = self
            .required(m, path, "key")
            .and_then(|k| self.string(k, &join(path, "key")));
        Some((self.path(&cert?), self.path(&key?)))
    }

    /// `default_host`, or the first host's first exact name.
    pub(super) fn default_host_of(&mut self, m: &Mapping, hosts: &[Host]) -> Option<Hostname> {
        match field(m, "default_host") {
            Some(v) => self.default_host(v, hosts),
            None => hosts.first().and_then(|h| first_exact(&h.names)).or_else(|| {
                if !hosts.is_empty() {
                    self.err(
                        "default_host",
                        "missing, and the first host has no exact (non-wildcard) name to default to",
                    );
                }
                None
            }),
        }
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
}

fn first_exact(names: &[HostPattern]) -> Option<Hostname> {
    names.iter().find_map(|n| match n {
        HostPattern::Exact(h) => Some(h.clone()),
        HostPattern::Wildcard(_) => None,
    })
}
