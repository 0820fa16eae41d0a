//! `acme:` (directory, contact, challenges, EAB, key type, renewal lead)
//! and what it needs from the hosts and listeners.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::names::HostPattern;
use std::net::SocketAddr;

use super::walk::{field, join, Walk};
use super::{
    defaults, Acme, CertSource, Challenge, Dns, Eab, Host, HostAcme, KeyPolicy, KeyType, Listener,
    TlsaCheck, Tsig, TsigAlgo,
};
use crate::protocol::{Protocol, TlsMode};

const ACME_KEYS: &[&str] = &[
    "directory",
    "contact",
    "terms_of_service_agreed",
    "challenges",
    "ca_roots",
    "profile",
    "eab",
    "key_type",
    "key_types",
    "renew_before",
    "dns",
    "key",
    "tlsa",
    "staging",
];
const TLSA_KEYS: &[&str] = &["check", "wait_ttls"];
const EAB_KEYS: &[&str] = &["kid", "hmac_key"];
const HOST_ACME_KEYS: &[&str] = &["challenges", "dns", "key", "key_type", "key_types"];
const DNS_KEYS: &[&str] = &["server", "zone", "tsig", "check", "propagation_timeout"];
const TSIG_KEYS: &[&str] = &["name", "algorithm", "secret_file"];
/// Whether `name` lies in `zone` (both lower-case, no trailing dot).
fn in_zone(name: &str, zone: &str) -> bool {
    name == zone || name.ends_with(&format!(".{zone}"))
}

/// The longest `propagation_timeout`: within an attempt's 5 minutes, with
/// time left for the CA (a zone whose secondaries take longer needs
/// fixing, not waiting for).
const MAX_PROPAGATION: Duration = Duration::from_secs(4 * 60);

/// The longest `acme.renew_before`: longer than any certificate lives.
const MAX_RENEW_BEFORE: Duration = Duration::from_secs(365 * 24 * 3600);

impl Walk<'_> {
    pub(super) fn acme(&mut self, v: &Value) -> Option<Acme> {
        let m = self.mapping(v, "acme", ACME_KEYS)?;
        let directory = self.directory(m);
        let staging = self.staging(m, directory.as_deref());
        let contact = self.contact(m);
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
        let challenges = self.challenges(m, "acme.challenges");
        let dns = field(m, "dns").map(|v| self.dns(v, "acme.dns"));
        let key = field(m, "key")
            .map(|v| self.de::<KeyPolicy>(v, "acme.key"))
            .unwrap_or(Some(KeyPolicy::default()));
        let tlsa = field(m, "tlsa").map(|v| self.tlsa(v));
        let ca_roots = field(m, "ca_roots")
            .and_then(|v| self.string(v, "acme.ca_roots"))
            .map(|s| self.path(&s));
        let profile = field(m, "profile").and_then(|v| self.string(v, "acme.profile"));
        // Outer None: not written; inner None: written with problems.
        let eab = field(m, "eab").map(|v| self.eab(v));
        let key_types = self
            .key_types(m, "acme")
            .unwrap_or(Some(vec![KeyType::default()]));
        let renew_before = field(m, "renew_before")
            .map(|v| self.duration_upto(v, "acme.renew_before", MAX_RENEW_BEFORE));
        Some(Acme {
            directory: directory?,
            contact,
            challenges: challenges?,
            ca_roots,
            profile,
            eab: eab.map_or(Some(None), |e| e.map(Some))?,
            key_types: key_types?,
            renew_before: renew_before.map_or(Some(None), |d| d.map(Some))?,
            dns: dns.map_or(Some(None), |d| d.map(Some))?,
            key: key?,
            tlsa: tlsa.map_or(Some(None), |t| t.map(Some))?,
            per_host: BTreeMap::new(),
            staging,
        })
    }

    /// A host's own `acme: { challenges, dns }`.
    pub(super) fn host_acme(&mut self, v: &Value, path: &str) -> Option<HostAcme> {
        let m = self.mapping(v, path, HOST_ACME_KEYS)?;
        let challenges =
            field(m, "challenges").map(|_| self.challenges(m, &join(path, "challenges")));
        let dns = field(m, "dns").map(|v| self.dns(v, &join(path, "dns")));
        let key = field(m, "key").map(|v| self.de::<KeyPolicy>(v, &join(path, "key")));
        let key_types = self.key_types(m, path);
        Some(HostAcme {
            challenges: challenges.map_or(Some(None), |c| c.map(Some))?,
            dns: dns.map_or(Some(None), |d| d.map(Some))?,
            key: key.map_or(Some(None), |k| k.map(Some))?,
            key_types: key_types.map_or(Some(None), |k| k.map(Some))?,
            tlsa_owners: Vec::new(),
        })
    }

    /// `key_type: T` or `key_types: [T, U]` under `path`: outer `None`
    /// when neither is written. Two at most, not both ECDSA or both RSA
    /// (a client takes either kind, so a second of the same kind would
    /// never be served).
    fn key_types(&mut self, m: &Mapping, path: &str) -> Option<Option<Vec<KeyType>>> {
        let one = field(m, "key_type");
        let list = field(m, "key_types");
        let list_path = join(path, "key_types");
        if one.is_some() && list.is_some() {
            self.err(
                &list_path,
                "give key_type (one) or key_types (a list), not both",
            );
            return Some(None);
        }
        if let Some(v) = one {
            return Some(
                self.de::<KeyType>(v, &join(path, "key_type"))
                    .map(|t| vec![t]),
            );
        }
        let list: Vec<KeyType> = match self.de(list?, &list_path) {
            Some(l) => l,
            None => return Some(None),
        };
        let problem = match list.as_slice() {
            [] => Some("at least one key type is needed".to_string()),
            [_] => None,
            [a, b] if a.is_ecdsa() == b.is_ecdsa() => Some(format!(
                "{} and {} are both {}: give one ECDSA and one RSA type (a client that can take one can take the other)",
                a.as_str(),
                b.as_str(),
                if a.is_ecdsa() { "ECDSA" } else { "RSA" }
            )),
            [_, _] => None,
            _ => Some("at most two: one ECDSA and one RSA type".to_string()),
        };
        if let Some(p) = problem {
            self.err(&list_path, p);
            return Some(None);
        }
        Some(Some(list))
    }

    /// `tlsa: { check: [IP:PORT…], wait_ttls }`.
    fn tlsa(&mut self, v: &Value) -> Option<TlsaCheck> {
        let path = "acme.tlsa";
        let m = self.mapping(v, path, TLSA_KEYS)?;
        let check: Vec<SocketAddr> = self
            .required(m, path, "check")
            .map(|v| self.strings(v, "acme.tlsa.check"))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(p, s)| self.socket_addr(&s, &p))
            .collect();
        if check.is_empty() {
            self.err(
                "acme.tlsa.check",
                "at least one DNS server (IP:port) is needed",
            );
            return None;
        }
        let wait_ttls = field(m, "wait_ttls")
            .map(|v| self.de::<u32>(v, "acme.tlsa.wait_ttls"))
            .unwrap_or(Some(2))?;
        Some(TlsaCheck { check, wait_ttls })
    }

    /// `dns: { server, zone, tsig: { name, algorithm, secret_file }, check,
    /// propagation_timeout }`.
    fn dns(&mut self, v: &Value, path: &str) -> Option<Dns> {
        let m = self.mapping(v, path, DNS_KEYS)?;
        let server = self
            .required(m, path, "server")
            .and_then(|v| self.string(v, &join(path, "server")))
            .and_then(|s| self.socket_addr(&s, &join(path, "server")));
        let zone = self
            .required(m, path, "zone")
            .and_then(|v| self.string(v, &join(path, "zone")))
            .and_then(|z| {
                let z = z.trim_end_matches('.').to_ascii_lowercase();
                match crate::config::names::Hostname::parse(&z) {
                    Ok(_) => Some(z),
                    Err(e) => {
                        self.err(&join(path, "zone"), format!("{z:?}: {e}"));
                        None
                    }
                }
            });
        let tsig = self
            .required(m, path, "tsig")
            .and_then(|v| self.tsig(v, &join(path, "tsig")));
        let check = match field(m, "check") {
            Some(v) => {
                let list: Vec<SocketAddr> = self
                    .strings(v, &join(path, "check"))
                    .into_iter()
                    .filter_map(|(p, s)| self.socket_addr(&s, &p))
                    .collect();
                (!list.is_empty()).then_some(list)
            }
            None => server.map(|s| vec![s]),
        };
        let propagation_timeout = match field(m, "propagation_timeout") {
            Some(v) => self.duration_upto(v, &join(path, "propagation_timeout"), MAX_PROPAGATION),
            None => Some(defaults::DNS_PROPAGATION_TIMEOUT),
        };
        Some(Dns {
            server: server?,
            zone: zone?,
            tsig: tsig?,
            check: check?,
            propagation_timeout: propagation_timeout?,
        })
    }

    fn tsig(&mut self, v: &Value, path: &str) -> Option<Tsig> {
        let m = self.mapping(v, path, TSIG_KEYS)?;
        let name = self
            .required(m, path, "name")
            .and_then(|v| self.string(v, &join(path, "name")));
        let algorithm = field(m, "algorithm")
            .map(|v| self.de::<TsigAlgo>(v, &join(path, "algorithm")))
            .unwrap_or(Some(TsigAlgo::default()));
        let secret_file = self
            .required(m, path, "secret_file")
            .and_then(|v| self.string(v, &join(path, "secret_file")))
            .map(|s| self.path(&s));
        Some(Tsig {
            name: name?,
            algorithm: algorithm?,
            secret_file: secret_file?,
        })
    }

    /// `letsencrypt`, `letsencrypt-staging` or an `https://` URL.
    fn directory(&mut self, m: &Mapping) -> Option<String> {
        self.required(m, "acme", "directory")
            .and_then(|v| self.directory_url(v, "acme.directory"))
    }

    /// `acme.staging`: where `renew --dry-run` orders; Let's Encrypt's
    /// staging directory for Let's Encrypt, else none unless written.
    fn staging(&mut self, m: &Mapping, directory: Option<&str>) -> Option<String> {
        match field(m, "staging") {
            Some(v) => self.directory_url(v, "acme.staging"),
            None if directory == Some(defaults::LETSENCRYPT) => {
                Some(defaults::LETSENCRYPT_STAGING.to_string())
            }
            None => None,
        }
    }

    fn directory_url(&mut self, v: &Value, path: &str) -> Option<String> {
        self.string(v, path).and_then(|d| match d.as_str() {
            "letsencrypt" => Some(defaults::LETSENCRYPT.to_string()),
            "letsencrypt-staging" => Some(defaults::LETSENCRYPT_STAGING.to_string()),
            url if url.starts_with("https://") && url.len() > "https://".len() => {
                Some(url.to_string())
            }
            other => {
                self.err(
                    path,
                    format!(
                        "{other:?}: expected letsencrypt, letsencrypt-staging or an https:// URL"
                    ),
                );
                None
            }
        })
    }

    fn contact(&mut self, m: &Mapping) -> Vec<String> {
        match field(m, "contact") {
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
        }
    }

    /// In preference order, each once; tls-alpn-01 and http-01 when left out.
    fn challenges(&mut self, m: &Mapping, path: &str) -> Option<Vec<Challenge>> {
        match field(m, "challenges") {
            Some(v) => {
                let list: Option<Vec<Challenge>> = self.de(v, path);
                match list {
                    Some(l) if l.is_empty() => {
                        self.err(path, "at least one challenge is needed");
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
        }
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
    pub(super) fn acme_fits(
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
        }
        let mut acme = acme?;
        let answers = |c: &Challenge| match c {
            Challenge::Http01 => listeners.values().any(|l| l.protocol == Protocol::Http),
            Challenge::TlsAlpn01 => listeners.values().any(|l| l.tls == TlsMode::Implicit),
            // The CA asks DNS, not a listener.
            Challenge::Dns01 => true,
        };
        let unanswered = |wanted: &[Challenge]| {
            let wanted: Vec<&str> = wanted.iter().map(|c| c.as_str()).collect();
            format!(
                "no listener can answer {}: http-01 needs a `protocol: http` listener (port 80), tls-alpn-01 a `tls: implicit` one (port 443)",
                wanted.join(" or ")
            )
        };
        let wanted = acme.challenges.clone();
        acme.challenges.retain(answers);
        let mut global_used = false;
        for &i in &acme_hosts {
            let host = &hosts[i];
            let mut own = host.acme.clone().unwrap_or_default();
            if let Some(c) = own.challenges.as_mut() {
                let wanted = c.clone();
                c.retain(answers);
                if c.is_empty() {
                    self.err(&format!("hosts[{i}].acme.challenges"), unanswered(&wanted));
                }
            } else {
                global_used = true;
            }
            let effective = own
                .challenges
                .clone()
                .unwrap_or_else(|| acme.challenges.clone());
            let dns = own.dns.as_ref().or(acme.dns.as_ref());
            for n in &host.names {
                if let HostPattern::Wildcard(_) = n {
                    if !effective.contains(&Challenge::Dns01) {
                        self.err(
                            &format!("hosts[{i}].names"),
                            format!("{n}: a wildcard certificate needs dns-01: give the host `acme: {{ challenges: [dns-01] }}` and an `acme.dns` (server, zone, tsig)"),
                        );
                    }
                }
            }
            if effective.contains(&Challenge::Dns01) {
                match dns {
                    None => self.err(
                        &format!("hosts[{i}].acme"),
                        "dns-01 needs `acme.dns` or the host's own `acme.dns`: server, zone, tsig",
                    ),
                    Some(d) => {
                        for n in &host.names {
                            let base = n.to_string();
                            let base = base.strip_prefix("*.").unwrap_or(&base).to_string();
                            if !in_zone(&base, &d.zone) {
                                self.err(
                                    &format!("hosts[{i}].names"),
                                    format!("{n}: _acme-challenge.{base} is not in zone {} (acme.dns.zone): its dns-01 record cannot be added there", d.zone),
                                );
                            }
                        }
                    }
                }
            }
            let rollover = own.key.unwrap_or(acme.key) == KeyPolicy::Rollover;
            let two = own.key_types.as_ref().unwrap_or(&acme.key_types).len() > 1;
            if rollover && two {
                self.err(
                    &format!("hosts[{i}]"),
                    "key: rollover with two key_types is not supported yet: roll one key type over, or use key: reuse",
                );
            }
            if rollover {
                own.tlsa_owners = super::tlsa_owners(listeners, host);
                if acme.tlsa.is_none() {
                    self.err(
                        &format!("hosts[{i}]"),
                        "key: rollover needs `acme.tlsa: { check: [IP:PORT] }`, the DNS servers the next key's TLSA record is looked for at",
                    );
                }
                if own.tlsa_owners.is_empty() {
                    self.err(
                        &format!("hosts[{i}]"),
                        "key: rollover needs a TLS listener that carries the host: a TLSA record names a TLS port",
                    );
                }
            }
            if host.acme.is_some() || rollover {
                let first = host
                    .names
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                acme.per_host.insert(first, own);
            }
        }
        if acme.challenges.is_empty() && global_used {
            self.err("acme.challenges", unanswered(&wanted));
        }
        Some(acme)
    }
}
