//! `portcullis dns DOMAIN`: the DNS records that make senders and mail
//! clients find what portcullis serves for a domain, in zone-file form.

use super::{mta_sts, services, web_listener, Service};
use crate::config::Config;
use crate::protocol::Protocol;

/// The RFC 6186 / RFC 8314 SRV service of a client service.
fn srv_name(s: &Service) -> Option<&'static str> {
    Some(match (s.protocol, s.implicit) {
        (Protocol::Imap, true) => "_imaps",
        (Protocol::Imap, false) => "_imap",
        (Protocol::Pop3, true) => "_pop3s",
        (Protocol::Pop3, false) => "_pop3",
        (Protocol::Smtp, true) => "_submissions",
        (Protocol::Smtp, false) => "_submission",
        // RFC 5804 §1.8: ManageSieve over STARTTLS only.
        (Protocol::Sieve, false) => "_sieve",
        _ => return None,
    })
}

/// The client services RFC 6186 (and RFC 8314) name: an absent one is
/// published with target `.`, "decidedly not available", so that clients
/// do not guess.
const CLIENT_SERVICES: [&str; 6] = [
    "_submissions",
    "_submission",
    "_imaps",
    "_imap",
    "_pop3s",
    "_pop3",
];

/// The records for `name`, one per line, with `;` comments saying what
/// each is for.
pub fn records(config: &Config, name: &str) -> Result<Vec<String>, String> {
    let d = super::domain(config, name).ok_or_else(|| {
        let known: Vec<&str> = config.domains.iter().map(|d| d.name.as_str()).collect();
        if known.is_empty() {
            format!("no domain is named {name}: the config has no `domains:`")
        } else {
            format!("no domain is named {name} (domains: {})", known.join(", "))
        }
    })?;
    let domain = d.name.as_str();
    let mut out = Vec::new();
    if let Some(p) = &d.mta_sts {
        out.push(format!(
            "; MTA-STS (RFC 8461), mode {}: the policy is at https://mta-sts.{domain}/.well-known/mta-sts.txt; the id changes with it",
            p.mode.as_str()
        ));
        out.push(format!(
            "_mta-sts.{domain}. IN TXT \"v=STSv1; id={}\"",
            mta_sts::id(p)
        ));
        out.push("; SMTP TLS reporting (RFC 8460): where senders report failures".into());
        out.push(format!(
            "_smtp._tls.{domain}. IN TXT {}",
            txt(&format!("v=TLSRPTv1; rua={}", p.report_to.join(",")))
        ));
    }
    if let Some(a) = &d.autoconfig {
        let offered = services(config, &a.server);
        out.push("; mail clients (RFC 6186, RFC 8314): the services the listeners offer".into());
        for s in &offered {
            if let Some(srv) = srv_name(s) {
                out.push(format!(
                    "{srv}._tcp.{domain}. IN SRV 0 1 {} {}.",
                    s.port, a.server
                ));
            }
        }
        for srv in CLIENT_SERVICES {
            if !offered.iter().any(|s| srv_name(s) == Some(srv)) {
                out.push(format!("{srv}._tcp.{domain}. IN SRV 0 0 0 . ; not offered"));
            }
        }
        // Clients reach HTTPS on 443, whatever port the listener binds
        // behind a forward.
        out.push("; Outlook looks for autodiscover here".into());
        out.push(format!(
            "_autodiscover._tcp.{domain}. IN SRV 0 1 443 autodiscover.{domain}."
        ));
    }
    let names = d.service_names();
    let web = match web_port(config) {
        Some(443) => String::new(),
        Some(p) => format!(" (its port {p}; clients use 443: forward 443 to it)"),
        None => String::new(),
    };
    out.push(format!(
        "; and A/AAAA (or CNAME) records taking {} to this server's HTTPS listener{web}",
        names.join(", ")
    ));
    Ok(out)
}

/// The port of the listener that serves the domains over HTTPS.
fn web_port(config: &Config) -> Option<u16> {
    web_listener(config.listeners.values())?
        .bind
        .iter()
        .map(|a| a.port())
        .find(|&p| p != 0)
}

/// A TXT record's data in zone-file form: quoted strings of at most 255
/// bytes each (RFC 1035 §3.3.14), which resolvers join again.
fn txt(value: &str) -> String {
    let mut parts = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let mut end = rest.len().min(255);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (part, tail) = rest.split_at(end);
        parts.push(format!("\"{part}\""));
        rest = tail;
    }
    parts.join(" ")
}
