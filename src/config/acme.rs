//! `acme:` (directory, contact, challenges, EAB, key type, renewal lead)
//! and what it needs from the hosts and listeners.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::names::HostPattern;
use super::walk::{field, Walk};
use super::{defaults, Acme, CertSource, Challenge, Eab, Host, KeyType, Listener};
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
    "renew_before",
];
const EAB_KEYS: &[&str] = &["kid", "hmac_key"];

/// The longest `acme.renew_before`: longer than any certificate lives.
const MAX_RENEW_BEFORE: Duration = Duration::from_secs(365 * 24 * 3600);

impl Walk<'_> {
    pub(super) fn acme(&mut self, v: &Value) -> Option<Acme> {
        let m = self.mapping(v, "acme", ACME_KEYS)?;
        let directory = self.directory(m);
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
        let challenges = self.challenges(m);
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

    /// `letsencrypt`, `letsencrypt-staging` or an `https://` URL.
    fn directory(&mut self, m: &Mapping) -> Option<String> {
        self
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

    /// In preference order, each once; both when left out.
    fn challenges(&mut self, m: &Mapping) -> Option<Vec<Challenge>> {
        match field(m, "challenges") {
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
}
