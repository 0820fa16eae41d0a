//! `listeners:` and `limits:` (global, and each listener's own).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde_yaml::{Mapping, Value};

use super::names::Hostname;
use super::walk::{field, join, Walk};
use super::{Limits, Listener};
use crate::protocol::{Protocol, TlsMode};

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

/// The largest per-address limit: anything above is no limit at all.
const MAX_PER_IP: u64 = 1_000_000;

/// Listener name → the listener, or `None` where its definition has problems.
pub(super) type Listeners = BTreeMap<String, Option<Listener>>;

impl Walk<'_> {
    /// Every listener name, with `None` where its body has problems: a broken
    /// listener still exists for the backends that name it.
    pub(super) fn listeners(&mut self, v: &Value, limits: &Limits) -> Listeners {
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
        let bind = self.bind(m, path);
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
        let alpn = self.alpn(m, path);
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
        self.protocol_fits(m, path, protocol, tls);
        let alpn = alpn.unwrap_or_else(|| {
            crate::protocol::alpn(protocol)
                .iter()
                .map(|id| id.to_vec())
                .collect()
        });
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

    fn bind(&mut self, m: &Mapping, path: &str) -> Vec<SocketAddr> {
        let bind_path = join(path, "bind");
        let bind: Vec<SocketAddr> = match self.required(m, path, "bind") {
            Some(v) => self
                .strings(v, &bind_path)
                .into_iter()
                .filter_map(|(p, s)| self.socket_addr(&s, &p))
                .collect(),
            None => Vec::new(),
        };
        // Only when none was written: a bad one has said so already.
        if matches!(field(m, "bind"), Some(Value::Sequence(s)) if s.is_empty()) {
            self.err(&bind_path, "at least one address is needed");
        }
        bind
    }

    /// Written: exactly that list (`[]`: any offer accepted). Left out
    /// (`None`): the protocol's own IDs (see `protocol::alpn`).
    fn alpn(&mut self, m: &Mapping, path: &str) -> Option<Vec<Vec<u8>>> {
        field(m, "alpn").map(|v| {
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
        })
    }

    /// What each protocol allows of `tls`, `alpn`, `hostname` and `require_tls`.
    fn protocol_fits(&mut self, m: &Mapping, path: &str, protocol: Protocol, tls: TlsMode) {
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
    }

    /// A `limits:` block at `path`; what it leaves out comes from `base`.
    pub(super) fn limits(&mut self, v: &Value, path: &str, base: &Limits) -> Limits {
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
}
