//! What `portcullis check` warns about: a config that is valid, and still
//! probably not what the operator meant.

use std::net::SocketAddr;

use std::collections::BTreeMap;

use super::names::HostPattern;
use super::{CertSource, Challenge, Config, Host, Listener};
use crate::protocol::{Protocol, TlsMode};

/// The owner names of `host`'s TLSA records: `_PORT._tcp.NAME` for each
/// port of a TLS listener (implicit or STARTTLS) that carries it, and each
/// of its exact names. Port 0 (the kernel picks one) names no service.
pub fn tlsa_owners(listeners: &BTreeMap<String, Listener>, host: &Host) -> Vec<String> {
    let mut ports: Vec<u16> = listeners
        .iter()
        .filter(|(name, l)| l.tls != TlsMode::None && host.backends.contains_key(*name))
        .flat_map(|(_, l)| l.bind.iter().map(|a| a.port()))
        .filter(|&p| p != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let mut out = Vec::new();
    for n in &host.names {
        if let HostPattern::Exact(h) = n {
            for p in &ports {
                out.push(format!("_{p}._tcp.{}", h.as_str()));
            }
        }
    }
    out
}

impl Listener {
    /// Whether HTTPS for `domains:` (MTA-STS, autoconfig) is answered here:
    /// implicit TLS, `tcp`, speaking HTTP/1.1 (or taking any ALPN).
    pub fn is_web(&self) -> bool {
        self.protocol == Protocol::Tcp
            && self.tls == TlsMode::Implicit
            && (self.alpn.is_empty() || self.alpn.iter().any(|a| a == b"http/1.1"))
    }
}

impl Config {
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
        // The challenges some ACME host is ordered with (its own, or the
        // global list), each once.
        let mut used: Vec<Challenge> = Vec::new();
        for h in self
            .hosts
            .iter()
            .filter(|h| h.certificate == CertSource::Acme)
        {
            let first = h.names.first().map(ToString::to_string).unwrap_or_default();
            for c in acme.challenges_for(&first) {
                if !used.contains(&c) {
                    used.push(c);
                }
            }
        }
        let mut out = Vec::new();
        for c in &used {
            let (port, ok) = match c {
                Challenge::TlsAlpn01 => (443, binds(443, &|l| l.tls == TlsMode::Implicit)),
                Challenge::Http01 => (80, binds(80, &|l| l.protocol == Protocol::Http)),
                // The CA asks DNS, not this machine.
                Challenge::Dns01 => continue,
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
    /// Whether `host` is the one `domains:` added for its service names
    /// (`mta-sts.`, `autoconfig.`, `autodiscover.`), which has no backends.
    pub fn is_domains_host(&self, host: &Host) -> bool {
        host.backends.is_empty()
            && host.names.iter().all(|n| {
                self.domains
                    .iter()
                    .any(|d| d.service_names().iter().any(|s| *s == n.to_string()))
            })
    }

    /// MTA-STS `mx` names no host serves: a sender checks the MX's
    /// certificate against them, so that certificate comes from elsewhere.
    pub fn mta_sts_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.domains {
            let Some(p) = &d.mta_sts else { continue };
            for mx in &p.mx {
                let served = self.hosts.iter().any(|h| match mx {
                    HostPattern::Exact(n) => h.covers(n),
                    HostPattern::Wildcard(_) => h.names.contains(mx),
                });
                if !served {
                    out.push(format!(
                        "domains.{}.mta_sts.mx: {mx} is not a name of any host here: senders will check its certificate, which portcullis does not serve",
                        d.name
                    ));
                }
            }
        }
        out
    }

    pub fn unrouted(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for l in self
            .listeners
            .values()
            .filter(|l| l.protocol != Protocol::Http)
        {
            for h in self.hosts.iter().filter(|h| !self.is_domains_host(h)) {
                if !h.backends.contains_key(&l.name) {
                    out.push((l.name.clone(), h.names[0].to_string()));
                }
            }
        }
        out
    }
}
