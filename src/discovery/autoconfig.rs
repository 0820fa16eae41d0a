//! Mail client autoconfiguration: Thunderbird's `config-v1.1.xml` (the
//! autoconfig format of the Mozilla ISP database) and Outlook's POX
//! autodiscover response, from the services the listeners offer.

use super::{placeholder, xml_escape, Service};
use crate::config::names::Hostname;
use crate::config::{Autoconfig, LoginName};
use crate::protocol::Protocol;

/// Thunderbird's document: one `incomingServer` per IMAP and POP3 service,
/// one `outgoingServer` per submission service, best first.
pub(super) fn thunderbird(domain: &Hostname, a: &Autoconfig, services: &[Service]) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str("<clientConfig version=\"1.1\">\n");
    out.push_str(&format!("  <emailProvider id=\"{domain}\">\n"));
    out.push_str(&format!("    <domain>{domain}</domain>\n"));
    let name = xml_escape(&a.display_name);
    out.push_str(&format!("    <displayName>{name}</displayName>\n"));
    out.push_str(&format!(
        "    <displayShortName>{name}</displayShortName>\n"
    ));
    for s in services {
        let (element, kind) = match s.protocol {
            Protocol::Imap => ("incomingServer", "imap"),
            Protocol::Pop3 => ("incomingServer", "pop3"),
            Protocol::Smtp => ("outgoingServer", "smtp"),
            _ => continue,
        };
        let socket = if s.implicit { "SSL" } else { "STARTTLS" };
        out.push_str(&format!("    <{element} type=\"{kind}\">\n"));
        out.push_str(&format!("      <hostname>{}</hostname>\n", a.server));
        out.push_str(&format!("      <port>{}</port>\n", s.port));
        out.push_str(&format!("      <socketType>{socket}</socketType>\n"));
        out.push_str("      <authentication>password-cleartext</authentication>\n");
        out.push_str(&format!(
            "      <username>{}</username>\n",
            placeholder(a.username)
        ));
        out.push_str(&format!("    </{element}>\n"));
    }
    out.push_str("  </emailProvider>\n</clientConfig>\n");
    out
}

/// Outlook's answer, all but the login name, which comes from the request.
#[derive(Debug)]
pub(super) struct Outlook {
    server: Hostname,
    username: LoginName,
    services: Vec<Service>,
}

const RESPONSE_SCHEMA: &str =
    "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006";
const OUTLOOK_SCHEMA: &str =
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a";

impl Outlook {
    pub(super) fn new(a: &Autoconfig, services: Vec<Service>) -> Outlook {
        Outlook {
            server: a.server.clone(),
            username: a.username,
            services,
        }
    }

    /// The response to an autodiscover request body: one `Protocol` per
    /// IMAP, POP3 and submission service.
    pub(super) fn response(&self, request: &[u8]) -> Result<String, &'static str> {
        let address = email_address(request)?;
        let login = match self.username {
            LoginName::Address => address,
            LoginName::Localpart => address.split('@').next().unwrap_or_default(),
        };
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n");
        out.push_str(&format!("<Autodiscover xmlns=\"{RESPONSE_SCHEMA}\">\n"));
        out.push_str(&format!("  <Response xmlns=\"{OUTLOOK_SCHEMA}\">\n"));
        out.push_str("    <Account>\n      <AccountType>email</AccountType>\n      <Action>settings</Action>\n");
        for s in &self.services {
            let kind = match s.protocol {
                Protocol::Imap => "IMAP",
                Protocol::Pop3 => "POP3",
                Protocol::Smtp => "SMTP",
                _ => continue,
            };
            let encryption = if s.implicit { "SSL" } else { "TLS" };
            out.push_str("      <Protocol>\n");
            out.push_str(&format!("        <Type>{kind}</Type>\n"));
            out.push_str(&format!("        <Server>{}</Server>\n", self.server));
            out.push_str(&format!("        <Port>{}</Port>\n", s.port));
            out.push_str("        <DomainRequired>off</DomainRequired>\n");
            out.push_str(&format!(
                "        <LoginName>{}</LoginName>\n",
                xml_escape(login)
            ));
            out.push_str("        <SPA>off</SPA>\n");
            out.push_str(&format!("        <Encryption>{encryption}</Encryption>\n"));
            out.push_str("        <AuthRequired>on</AuthRequired>\n");
            out.push_str("      </Protocol>\n");
        }
        out.push_str("    </Account>\n  </Response>\n</Autodiscover>\n");
        Ok(out)
    }
}

/// The `<EMailAddress>` of an autodiscover request, if it is an address.
fn email_address(request: &[u8]) -> Result<&str, &'static str> {
    const MISSING: &str = "the request has no EMailAddress";
    let text = std::str::from_utf8(request).map_err(|_| "the request is not UTF-8")?;
    let (_, rest) = text.split_once("<EMailAddress>").ok_or(MISSING)?;
    let (address, _) = rest.split_once("</EMailAddress>").ok_or(MISSING)?;
    let address = address.trim();
    let (local, domain) = address
        .rsplit_once('@')
        .ok_or("EMailAddress is not an address")?;
    // RFC 5322 dot-atom characters; a quoted local part is not taken.
    let atom = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b);
    let fits = !local.is_empty()
        && address.len() <= 254
        && local.bytes().all(atom)
        && Hostname::parse(domain).is_ok();
    if !fits {
        return Err("EMailAddress is not an address");
    }
    Ok(address)
}
