//! The operator's blocks: `admin:`, `notify:` and `log:`.

use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::names::Hostname;
use super::walk::{field, Walk};
use super::{Acme, Admin, Backend, LogConfig, LogFormat, Notify};

const ADMIN_KEYS: &[&str] = &["bind"];
const NOTIFY_KEYS: &[&str] = &["email", "from", "smtp", "webhook"];
const LOG_KEYS: &[&str] = &["format", "level"];

impl Walk<'_> {
    pub(super) fn admin(&mut self, v: &Value) -> Option<Admin> {
        let m = self.mapping(v, "admin", ADMIN_KEYS)?;
        let bind = self
            .required(m, "admin", "bind")
            .and_then(|b| self.string(b, "admin.bind"))
            .and_then(|s| self.socket_addr(&s, "admin.bind"))?;
        Some(Admin { bind })
    }

    pub(super) fn notify(
        &mut self,
        v: &Value,
        acme: Option<&Acme>,
        default_host: &Hostname,
        connect: Duration,
    ) -> Option<Notify> {
        let m = self.mapping(v, "notify", NOTIFY_KEYS)?;
        let email = self.recipients(m, acme);
        let from = match field(m, "from").and_then(|v| self.string(v, "notify.from")) {
            Some(f) => match mail_address(&f) {
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
        let webhook = self.webhook(m);
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

    /// `notify.email`, or else the ACME contacts' addresses.
    fn recipients(&mut self, m: &Mapping, acme: Option<&Acme>) -> Vec<String> {
        let mut email = Vec::new();
        if let Some(v) = field(m, "email") {
            for (p, s) in self.strings(v, "notify.email") {
                match mail_address(&s) {
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
                .filter_map(mail_address)
                .collect();
        }
        email
    }

    fn webhook(&mut self, m: &Mapping) -> Option<String> {
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
        webhook
    }

    pub(super) fn log(&mut self, v: Option<&Value>) -> LogConfig {
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

/// `s` if it is a bare address (`local@domain`, no display name, nothing
/// a header or an SMTP command would choke on).
fn mail_address(s: &str) -> Option<String> {
    let (local, domain) = s.rsplit_once('@')?;
    let plain = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_graphic() && !b"<>,;\"\\".contains(&b))
    };
    (plain(local) && plain(domain) && !domain.contains('@')).then(|| s.to_string())
}
