//! What senders and mail clients discover about each of `domains:`: the
//! MTA-STS policy (RFC 8461), Thunderbird's autoconfig and Outlook's
//! autodiscover documents, and the DNS records that point to them (RFC
//! 6186 SRV, `_mta-sts`, `_smtp._tls`). Built once per configuration from
//! the listeners and hosts, so a document offers only the ports that exist,
//! with their TLS modes.
//!
//! Sans-IO: [`Discovery::answer`] maps one HTTP request to one [`Reply`];
//! `proxy::web` reads and writes the bytes.

mod autoconfig;
mod mta_sts;
mod records;

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::names::Hostname;
use crate::config::{Config, Listener, LoginName, MailDomain};
use crate::protocol::{Protocol, TlsMode};

pub use records::records;

/// The longest request body read: an Outlook autodiscover request is
/// about 400 bytes.
pub const BODY_LIMIT: usize = 8 * 1024;

/// The documents of every configured domain, by the name they are served at.
#[derive(Debug, Default)]
pub struct Discovery {
    sites: HashMap<String, (Arc<Documents>, Site)>,
}

/// Which of a domain's names a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Site {
    MtaSts,
    Autoconfig,
    Autodiscover,
}

/// One domain's documents, ready to send.
#[derive(Debug)]
struct Documents {
    policy: Option<String>,
    thunderbird: Option<String>,
    outlook: Option<autoconfig::Outlook>,
}

/// An HTTP answer: status, content type, body.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// For a 405: the methods the path takes.
    pub allow: Option<&'static str>,
    /// Seconds a client may cache it.
    pub max_age: Option<u64>,
}

impl Reply {
    /// A plain-text answer, uncached.
    pub fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
            allow: None,
            max_age: None,
        }
    }

    fn ok(content_type: &'static str, body: String) -> Reply {
        Reply {
            status: 200,
            content_type,
            body,
            allow: None,
            max_age: Some(3600),
        }
    }

    /// The reason phrase of the status.
    pub fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            411 => "Length Required",
            413 => "Content Too Large",
            421 => "Misdirected Request",
            _ => "Error",
        }
    }
}

const MTA_STS_PATH: &str = "/.well-known/mta-sts.txt";
const AUTOCONFIG_PATHS: [&str; 2] = [
    "/mail/config-v1.1.xml",
    "/.well-known/autoconfig/mail/config-v1.1.xml",
];
const AUTODISCOVER_PATH: &str = "/autodiscover/autodiscover.xml";

impl Discovery {
    pub fn new(config: &Config) -> Discovery {
        let mut sites = HashMap::new();
        for d in &config.domains {
            let docs = Arc::new(Documents {
                policy: d.mta_sts.as_ref().map(mta_sts::policy),
                thunderbird: d
                    .autoconfig
                    .as_ref()
                    .map(|a| autoconfig::thunderbird(&d.name, a, &services(config, &a.server))),
                outlook: d
                    .autoconfig
                    .as_ref()
                    .map(|a| autoconfig::Outlook::new(a, services(config, &a.server))),
            });
            for name in d.service_names() {
                let site = match name.split('.').next() {
                    Some("mta-sts") => Site::MtaSts,
                    Some("autoconfig") => Site::Autoconfig,
                    _ => Site::Autodiscover,
                };
                sites.insert(name, (docs.clone(), site));
            }
        }
        Discovery { sites }
    }

    /// Whether `name` (lowercase) is one portcullis answers HTTPS for.
    pub fn serves(&self, name: &str) -> bool {
        self.sites.contains_key(name)
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Whether a request must send its body before it can be answered:
    /// only an autodiscover POST has one worth reading.
    pub fn wants_body(method: &str, path: &str) -> bool {
        method == "POST" && path_only(path).eq_ignore_ascii_case(AUTODISCOVER_PATH)
    }

    /// The answer to `method path` for `host` (lowercase, no port).
    pub fn answer(&self, host: &str, method: &str, path: &str, body: &[u8]) -> Reply {
        let Some((docs, site)) = self.sites.get(host) else {
            return Reply::text(421, &format!("{host} is not served here"));
        };
        let path = path_only(path);
        let readable = method == "GET" || method == "HEAD";
        match *site {
            Site::MtaSts if path == MTA_STS_PATH => match (&docs.policy, readable) {
                (Some(p), true) => Reply::ok("text/plain", p.clone()),
                (Some(_), false) => not_allowed("GET, HEAD"),
                (None, _) => Reply::text(404, "not found"),
            },
            Site::Autoconfig | Site::Autodiscover if AUTOCONFIG_PATHS.contains(&path) => {
                match (&docs.thunderbird, readable) {
                    (Some(x), true) => Reply::ok("application/xml; charset=utf-8", x.clone()),
                    (Some(_), false) => not_allowed("GET, HEAD"),
                    (None, _) => Reply::text(404, "not found"),
                }
            }
            Site::Autoconfig | Site::Autodiscover
                if path.eq_ignore_ascii_case(AUTODISCOVER_PATH) =>
            {
                match (&docs.outlook, method) {
                    (Some(o), "POST") => match o.response(body) {
                        Ok(xml) => Reply {
                            max_age: None,
                            ..Reply::ok("application/xml; charset=utf-8", xml)
                        },
                        Err(why) => Reply::text(400, why),
                    },
                    (Some(_), _) => not_allowed("POST"),
                    (None, _) => Reply::text(404, "not found"),
                }
            }
            _ => Reply::text(404, "not found"),
        }
    }
}

fn not_allowed(allow: &'static str) -> Reply {
    Reply {
        allow: Some(allow),
        ..Reply::text(405, &format!("only {allow}"))
    }
}

/// The path without its query.
fn path_only(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or_default()
}

/// One service a mail client may use: its protocol, port and TLS mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    pub protocol: Protocol,
    /// TLS from the first byte; else STARTTLS.
    pub implicit: bool,
    pub port: u16,
}

/// The services a client of `server` can use: each TLS listener of IMAP,
/// POP3, submission or ManageSieve that routes `server` to a backend,
/// implicit TLS first (RFC 8314 §3). SMTP without `require_tls` (port 25,
/// for other servers) is not a client's.
pub fn services(config: &Config, server: &Hostname) -> Vec<Service> {
    let Some(host) = crate::config::host_serving(&config.hosts, server) else {
        return Vec::new();
    };
    let mut out: Vec<Service> = config
        .listeners
        .values()
        .filter(|l| host.backends.contains_key(&l.name))
        .filter_map(|l| {
            let client = match (l.protocol, l.tls) {
                (_, TlsMode::None) => false,
                (Protocol::Imap | Protocol::Pop3 | Protocol::Sieve, _) => true,
                (Protocol::Smtp, TlsMode::Implicit) => true,
                (Protocol::Smtp, TlsMode::Starttls) => l.require_tls,
                _ => false,
            };
            let port = l.bind.iter().map(|a| a.port()).find(|&p| p != 0)?;
            client.then_some(Service {
                protocol: l.protocol,
                implicit: l.tls == TlsMode::Implicit,
                port,
            })
        })
        .collect();
    out.sort_by_key(|s| (rank(s.protocol), !s.implicit, s.port));
    out.dedup();
    out
}

fn rank(p: Protocol) -> u8 {
    match p {
        Protocol::Imap => 0,
        Protocol::Pop3 => 1,
        Protocol::Smtp => 2,
        _ => 3,
    }
}

/// The listener clients reach the domains' HTTPS on ([`Listener::is_web`]):
/// one bound to 443 first, then one that names http/1.1 in its ALPN (a
/// `tcp` listener without ALPN may be LDAPS or XMPP passed through).
pub fn web_listener<'c>(listeners: impl IntoIterator<Item = &'c Listener>) -> Option<&'c Listener> {
    listeners
        .into_iter()
        .filter(|l| l.is_web())
        .min_by_key(|l| {
            (
                !l.bind.iter().any(|a| a.port() == 443),
                !l.alpn.iter().any(|a| a == b"http/1.1"),
            )
        })
}

/// `name` with `&`, `<`, `>`, `"` and `'` escaped for XML.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// What a user logs in with, as Thunderbird's placeholder.
fn placeholder(u: LoginName) -> &'static str {
    match u {
        LoginName::Address => "%EMAILADDRESS%",
        LoginName::Localpart => "%EMAILLOCALPART%",
    }
}

/// The domain named `name` of `config`, if configured.
pub fn domain<'c>(config: &'c Config, name: &str) -> Option<&'c MailDomain> {
    let wanted = name.trim_end_matches('.').to_ascii_lowercase();
    config.domains.iter().find(|d| d.name.as_str() == wanted)
}

#[cfg(test)]
mod tests;
