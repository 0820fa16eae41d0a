//! `domains:` — per mail domain, the MTA-STS policy and the client
//! autoconfiguration portcullis serves, and the host it adds for their
//! names (`mta-sts.`, `autoconfig.`, `autodiscover.`) where no host of
//! `hosts:` covers them already.

use std::time::Duration;

use serde_yaml::Value;

use super::names::{HostPattern, Hostname};
use super::walk::{field, join, kind, Walk};
use super::{Autoconfig, CertSource, Host, LoginName, MailDomain, MtaSts, StsMode};

const DOMAIN_KEYS: &[&str] = &["mta_sts", "autoconfig", "certificate", "acme"];
const MTA_STS_KEYS: &[&str] = &["mode", "mx", "max_age", "report_to"];
const AUTOCONFIG_KEYS: &[&str] = &["server", "display_name", "username"];

/// A week: long enough that a sender keeps the policy across an outage,
/// short enough that a change of MX reaches senders soon.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// RFC 8461 §3.2: at most 31557600 seconds (a year).
const MAX_MAX_AGE: Duration = Duration::from_secs(31_557_600);

impl Walk<'_> {
    /// `domains:`. Adds to `hosts` one host per domain for the service
    /// names no host covers, with the domain's `certificate:` (default:
    /// `acme` when there is an `acme:` block, else `self-signed`).
    pub(super) fn domains(
        &mut self,
        v: &Value,
        hosts: &mut Vec<Host>,
        acme: bool,
        default_host: Option<&Hostname>,
    ) -> Vec<MailDomain> {
        let mut out = Vec::new();
        for (key, v) in self.named(v, "domains") {
            let path = join("domains", &key);
            let name = match Hostname::parse(&key) {
                Ok(n) => n,
                Err(e) => {
                    self.err(&path, format!("{key:?}: {e}"));
                    continue;
                }
            };
            if out.iter().any(|d: &MailDomain| d.name == name) {
                self.err(&path, format!("{name} is listed twice"));
                continue;
            }
            if let Some(d) = self.domain(v, &path, name, hosts, acme, default_host) {
                out.push(d);
            }
        }
        out
    }

    fn domain(
        &mut self,
        v: &Value,
        path: &str,
        name: Hostname,
        hosts: &mut Vec<Host>,
        acme: bool,
        default_host: Option<&Hostname>,
    ) -> Option<MailDomain> {
        let m = self.mapping(v, path, DOMAIN_KEYS)?;
        let mta_sts = field(m, "mta_sts").map(|v| self.mta_sts(v, &join(path, "mta_sts"), &name));
        let autoconfig = field(m, "autoconfig")
            .map(|v| self.autoconfig(v, &join(path, "autoconfig"), &name, hosts, default_host));
        if mta_sts.is_none() && autoconfig.is_none() {
            self.err(path, "nothing to serve: give mta_sts, autoconfig or both");
        }
        let certificate = match field(m, "certificate") {
            Some(v) => self.cert_source(v, &join(path, "certificate")),
            None if acme => Some(CertSource::Acme),
            None => Some(CertSource::SelfSigned),
        };
        let host_acme = field(m, "acme").map(|v| self.host_acme(v, &join(path, "acme")));
        if host_acme.is_some() && certificate.as_ref().is_some_and(|c| *c != CertSource::Acme) {
            self.err(
                &join(path, "acme"),
                "only a `certificate: acme` domain has ACME settings",
            );
        }
        let domain = MailDomain {
            name,
            mta_sts: mta_sts.map_or(Some(None), |m| m.map(Some))?,
            autoconfig: autoconfig.map_or(Some(None), |a| a.map(Some))?,
        };
        // Names a host already covers are served with its certificate.
        let names: Vec<HostPattern> = domain
            .service_names()
            .iter()
            .filter_map(|s| Hostname::parse(s).ok())
            .filter(|n| !hosts.iter().any(|h| h.covers(n)))
            .map(HostPattern::Exact)
            .collect();
        if !names.is_empty() {
            hosts.push(Host {
                names,
                certificate: certificate?,
                backends: Default::default(),
                acme: host_acme.map_or(Some(None), |a| a.map(Some))?,
            });
        }
        Some(domain)
    }

    fn mta_sts(&mut self, v: &Value, path: &str, domain: &Hostname) -> Option<MtaSts> {
        let m = self.mapping(v, path, MTA_STS_KEYS)?;
        let mode = match self.required(m, path, "mode") {
            Some(v) => self.de::<StsMode>(v, &join(path, "mode")),
            None => None,
        };
        let mx_path = join(path, "mx");
        let mx = match field(m, "mx") {
            Some(v) => self.patterns(v, &mx_path),
            None => Vec::new(),
        };
        if mx.is_empty() && mode.is_some_and(|m| m != StsMode::None) {
            self.err(
                &mx_path,
                "at least one MX host name is needed (the names of the domain's MX records)",
            );
        }
        let max_age = match field(m, "max_age") {
            Some(v) => self.duration_upto(v, &join(path, "max_age"), MAX_MAX_AGE),
            None => Some(DEFAULT_MAX_AGE),
        };
        let report_to = match field(m, "report_to") {
            Some(v) => self
                .strings(v, &join(path, "report_to"))
                .into_iter()
                .filter_map(|(p, s)| {
                    let ok = (s.starts_with("mailto:") && s.len() > 7 && s.contains('@'))
                        || s.starts_with("https://");
                    // `,` and `!` separate URIs in the record (RFC 8460 §3).
                    let plain = !s.contains([',', '!', ';', '"', ' ']);
                    if ok && plain {
                        Some(s)
                    } else {
                        self.err(
                            &p,
                            format!("{s:?}: expected mailto:ADDRESS or https://URL, without , ! ; or spaces"),
                        );
                        None
                    }
                })
                .collect(),
            // RFC 5321 §4.5.1: every domain that takes mail has a postmaster.
            None => vec![format!("mailto:postmaster@{domain}")],
        };
        if matches!(field(m, "report_to"), Some(Value::Sequence(s)) if s.is_empty()) {
            self.err(
                &join(path, "report_to"),
                "at least one address is needed (RFC 8460: a TLS-RPT record without rua is invalid)",
            );
        }
        Some(MtaSts {
            mode: mode?,
            mx,
            max_age: max_age?,
            report_to,
        })
    }

    fn autoconfig(
        &mut self,
        v: &Value,
        path: &str,
        domain: &Hostname,
        hosts: &[Host],
        default_host: Option<&Hostname>,
    ) -> Option<Autoconfig> {
        let m = match v {
            Value::Bool(true) => None,
            Value::Mapping(_) => Some(self.mapping(v, path, AUTOCONFIG_KEYS)?),
            other => {
                self.err(
                    path,
                    format!(
                        "expected true or {{ server, display_name, username }}, found {}",
                        kind(other)
                    ),
                );
                return None;
            }
        };
        let server_path = join(path, "server");
        let server = match m.and_then(|m| field(m, "server")) {
            Some(v) => self.string(v, &server_path).and_then(|s| {
                Hostname::parse(&s)
                    .map_err(|e| self.err(&server_path, format!("{s:?}: {e}")))
                    .ok()
            }),
            None => default_host.cloned(),
        };
        if let Some(s) = &server {
            if !hosts.iter().any(|h| h.covers(s)) {
                self.err(
                    &server_path,
                    format!("{s} is not a name of any host: clients need a certificate for it"),
                );
            }
        }
        let display_name = match m.and_then(|m| field(m, "display_name")) {
            Some(v) => self.string(v, &join(path, "display_name")),
            None => Some(domain.to_string()),
        };
        let username = match m.and_then(|m| field(m, "username")) {
            Some(v) => self.de::<LoginName>(v, &join(path, "username")),
            None => Some(LoginName::default()),
        };
        Some(Autoconfig {
            server: server?,
            display_name: display_name?,
            username: username?,
        })
    }
}
