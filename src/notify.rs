//! Notifications to the operator (the "Axigen pattern": the mail server tells
//! its admin about its own certificates): a short plain-text email through the
//! operator's own Postfix and/or a JSON POST to a webhook, on each issuance,
//! renewal and renewal failure, and once a day while a certificate is within
//! [`EXPIRY_WARNING`] of its end.
//!
//! Delivery runs in a task of its own and only ever logs: a notification that
//! cannot be sent must never fail, or hold up, the ACME runner that asked for
//! it. Every phase has a deadline (connect, the whole SMTP exchange, the
//! webhook request).
//!
//! The SMTP client is sans-IO: `Transaction` takes each server reply and
//! says what to send next; `send_mail` owns the socket.
//!
//! ```text
//! Greeting ─2xx─▶ Ehlo ─2xx─▶ MailFrom ─2xx─▶ RcptTo(0..n) ─any accepted─▶ Data ─3xx─▶ Body ─2xx─▶ Quit
//!                  └─5xx─▶ Helo ─2xx─┘        (a refusal anywhere else: Quit with the reply)
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::BodyWrapper;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::config::{Backend, Notify, ProxyProtocol};
use crate::protocol::smtp::reply_len;

/// How close to its end a certificate gets an `Expiring` notification.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);
/// At most one `Expiring` notification per host in this time.
pub const EXPIRY_REPEAT: Duration = Duration::from_secs(24 * 3600);
/// The whole SMTP exchange, greeting to QUIT.
const SMTP_DEADLINE: Duration = Duration::from_secs(30);
/// The webhook request, connect to response headers.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// A server reply longer than this is not SMTP.
const MAX_REPLY: usize = 64 * 1024;
/// SMTP's line limit is 998 octets plus CRLF (RFC 5321 4.5.3.1.6).
const MAX_LINE: usize = 998;
/// How much of a server reply goes into a log line.
const REPLY_SHOWN: usize = 300;

/// The v2 signature (HAProxy proxy-protocol.txt 2.2).
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Something the operator should hear about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A certificate was issued; `renewal` is false for the first one of this host.
    Issued {
        host: String,
        names: Vec<String>,
        serial: String,
        issuer: String,
        not_after: SystemTime,
        renewal: bool,
    },
    /// An issuance/renewal attempt failed; `not_after` of the certificate
    /// still served, if any real one.
    RenewalFailed {
        host: String,
        names: Vec<String>,
        error: String,
        next_try: SystemTime,
        not_after: Option<SystemTime>,
    },
    /// Sent by [`Notifier::check_expiry`] at most once per 24 h per host.
    Expiring {
        host: String,
        names: Vec<String>,
        not_after: SystemTime,
        source: String,
    },
}

impl Event {
    /// The event's name in the JSON and the log: issued, renewed,
    /// renewal_failed, expiring.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Issued { renewal: false, .. } => "issued",
            Event::Issued { renewal: true, .. } => "renewed",
            Event::RenewalFailed { .. } => "renewal_failed",
            Event::Expiring { .. } => "expiring",
        }
    }

    pub fn host(&self) -> &str {
        match self {
            Event::Issued { host, .. }
            | Event::RenewalFailed { host, .. }
            | Event::Expiring { host, .. } => host,
        }
    }

    fn names(&self) -> &[String] {
        match self {
            Event::Issued { names, .. }
            | Event::RenewalFailed { names, .. }
            | Event::Expiring { names, .. } => names,
        }
    }

    /// A subject an operator can filter on: `[portcullis] ` and a fixed phrase.
    pub fn subject(&self, now: SystemTime) -> String {
        let host = one_line(self.host());
        match self {
            Event::Issued { renewal: false, .. } => {
                format!("[portcullis] certificate issued: {host}")
            }
            Event::Issued { renewal: true, .. } => {
                format!("[portcullis] certificate renewed: {host}")
            }
            Event::RenewalFailed { .. } => format!("[portcullis] RENEWAL FAILED: {host}"),
            Event::Expiring { not_after, .. } => match days_left(*not_after, now) {
                Some(1) => format!("[portcullis] certificate expires in 1 day: {host}"),
                Some(n) => format!("[portcullis] certificate expires in {n} days: {host}"),
                None => format!("[portcullis] certificate EXPIRED: {host}"),
            },
        }
    }

    /// The plain-text body, `\n` line endings; `config` is the config
    /// file for the commands it suggests (`FILE` when unknown).
    pub fn body(&self, now: SystemTime, config: Option<&Path>) -> String {
        let config = config.map_or("FILE".into(), |p| p.display().to_string());
        let host = self.host();
        let names = self.names().join(", ");
        let mut b = String::new();
        // Writing to a String cannot fail: the results below are ignored.
        match self {
            Event::Issued {
                serial,
                issuer,
                not_after,
                renewal,
                ..
            } => {
                let what = if *renewal {
                    "renewed the certificate"
                } else {
                    "obtained the first certificate"
                };
                let _ = writeln!(b, "portcullis {what} for {host}.\n");
                let _ = writeln!(b, "Names:     {names}");
                let _ = writeln!(b, "Serial:    {serial}");
                let _ = writeln!(b, "Issuer:    {issuer}");
                let _ = writeln!(b, "Not after: {}", rfc3339(*not_after));
                let _ = writeln!(
                    b,
                    "\nIt is served already, on every listener: nothing was restarted \
                     and nothing needs to be done."
                );
            }
            Event::RenewalFailed {
                error,
                next_try,
                not_after,
                ..
            } => {
                let _ = writeln!(b, "portcullis could not obtain a certificate for {host}.\n");
                let _ = writeln!(b, "Names:     {names}");
                let _ = writeln!(b, "Error:     {}", indent(error));
                let _ = writeln!(b, "Next try:  {}", rfc3339(*next_try));
                match not_after {
                    Some(t) => {
                        let _ = writeln!(b, "Served:    a certificate valid until {}", rfc3339(*t));
                        let _ = writeln!(b, "           ({})", left(*t, now));
                    }
                    None => {
                        let _ = writeln!(
                            b,
                            "Served:    no certificate from the CA yet (clients see a placeholder)"
                        );
                    }
                }
                let _ = writeln!(b, "\nWhat to do:");
                write_todo(&mut b, host, "acme", &config);
            }
            Event::Expiring {
                not_after, source, ..
            } => {
                let _ = writeln!(
                    b,
                    "The certificate for {host} {}, on {}.\n",
                    left(*not_after, now),
                    rfc3339(*not_after)
                );
                let _ = writeln!(b, "Names:     {names}");
                let _ = writeln!(b, "Source:    {source}");
                let _ = writeln!(b, "\nWhat to do:");
                write_todo(&mut b, host, source, &config);
                let _ = writeln!(
                    b,
                    "\nThis reminder comes once a day until the certificate is replaced."
                );
            }
        }
        b
    }

    /// The webhook's JSON document.
    pub fn json(&self, now: SystemTime) -> serde_json::Value {
        let mut v = serde_json::json!({
            "event": self.kind(),
            "host": self.host(),
            "names": self.names(),
        });
        let fields: Vec<(&str, serde_json::Value)> = match self {
            Event::Issued {
                serial,
                issuer,
                not_after,
                ..
            } => vec![
                ("not_after", rfc3339(*not_after).into()),
                ("serial", serial.as_str().into()),
                ("issuer", issuer.as_str().into()),
            ],
            Event::RenewalFailed {
                error,
                next_try,
                not_after,
                ..
            } => vec![
                ("not_after", not_after.map(rfc3339).into()),
                ("error", error.as_str().into()),
                ("next_try", rfc3339(*next_try).into()),
            ],
            Event::Expiring {
                not_after, source, ..
            } => vec![
                ("not_after", rfc3339(*not_after).into()),
                ("source", source.as_str().into()),
                ("days_left", days_left(*not_after, now).unwrap_or(0).into()),
            ],
        };
        if let Some(map) = v.as_object_mut() {
            for (k, value) in fields {
                map.insert(k.to_string(), value);
            }
            map.insert("time".into(), rfc3339(now).into());
        }
        v
    }
}

/// The "what to do" lines for a certificate from `source`; `config` is the
/// config file the commands need.
fn write_todo(b: &mut String, host: &str, source: &str, config: &str) {
    let _ = writeln!(b, "  portcullis certs --config {config}");
    let _ = writeln!(
        b,
        "      every certificate, its next renewal and last error"
    );
    if source == "files" {
        let _ = writeln!(
            b,
            "  This certificate comes from files that portcullis does not renew\n  \
             (certbot's, for example): check the tool that renews them.\n  \
             portcullis picks up the new files by itself when they change."
        );
        return;
    }
    let _ = writeln!(b, "  portcullis renew --config {config} {host}");
    let _ = writeln!(b, "      tries again now");
    let _ = writeln!(
        b,
        "  Check that ports 80 and 443 reach portcullis from the internet:\n  \
         the CA's challenges (http-01, tls-alpn-01) come in there."
    );
}

/// Continuation lines of a multi-line value, indented under its label.
fn indent(s: &str) -> String {
    s.trim_end().replace('\n', "\n           ")
}

/// A header value on one line: control characters (CR, LF) become spaces.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Whole days until `not_after`, rounded up; `None` once it has passed.
fn days_left(not_after: SystemTime, now: SystemTime) -> Option<u64> {
    let left = not_after.duration_since(now).ok()?;
    if left.is_zero() {
        return None;
    }
    Some(left.as_secs().div_ceil(24 * 3600).max(1))
}

/// "expires in 10 days", or "expired".
fn left(not_after: SystemTime, now: SystemTime) -> String {
    match days_left(not_after, now) {
        Some(1) => "expires in 1 day".into(),
        Some(n) => format!("expires in {n} days"),
        None => "has EXPIRED".into(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// RFC 5322 3.3 date-time in UTC: `Tue, 01 Jul 2025 12:00:00 +0000`.
fn rfc5322_date(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(0),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(0),
    };
    let dt =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let weekday = &dt.weekday().to_string()[..3];
    let month = &dt.month().to_string()[..3];
    format!(
        "{weekday}, {:02} {month} {} {:02}:{:02}:{:02} +0000",
        dt.day(),
        dt.year(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

/// The domain of an address (config.rs has checked there is one).
fn domain(address: &str) -> &str {
    address.rsplit_once('@').map_or(address, |(_, d)| d)
}

/// The whole message, headers and body, CRLF line endings, not yet
/// dot-stuffed. A body that is not ASCII goes as base64, so the message is
/// 7-bit whatever the server supports.
fn message(
    from: &str,
    to: &[String],
    subject: &str,
    body: &str,
    date: SystemTime,
    id: &str,
) -> Vec<u8> {
    let subject = if subject.is_ascii() {
        subject.to_string()
    } else {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD.encode(subject);
        format!("=?utf-8?b?{b}?=")
    };
    let mut m = String::new();
    let _ = write!(m, "From: portcullis <{from}>\r\n");
    let _ = write!(m, "To: {}\r\n", to.join(",\r\n "));
    let _ = write!(m, "Subject: {subject}\r\n");
    let _ = write!(m, "Date: {}\r\n", rfc5322_date(date));
    let _ = write!(m, "Message-ID: <{id}@{}>\r\n", domain(from));
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    // RFC 3834: no vacation replies or other auto-answers to this.
    m.push_str("Auto-Submitted: auto-generated\r\n");
    if body.is_ascii() {
        m.push_str("Content-Transfer-Encoding: 7bit\r\n\r\n");
        for line in body.lines() {
            // The body is ASCII, so any byte boundary is a char boundary.
            let mut rest = line.trim_end_matches('\r');
            while rest.len() > MAX_LINE {
                let (head, tail) = rest.split_at(MAX_LINE);
                m.push_str(head);
                m.push_str("\r\n");
                rest = tail;
            }
            m.push_str(rest);
            m.push_str("\r\n");
        }
    } else {
        use base64::Engine as _;
        m.push_str("Content-Transfer-Encoding: base64\r\n\r\n");
        let crlf = body.lines().collect::<Vec<_>>().join("\r\n") + "\r\n";
        let b = base64::engine::general_purpose::STANDARD.encode(crlf);
        for chunk in b.as_bytes().chunks(76) {
            m.push_str(&String::from_utf8_lossy(chunk));
            m.push_str("\r\n");
        }
    }
    m.into_bytes()
}

/// DATA's payload: dot-stuffed (RFC 5321 4.5.2), ending in `CRLF.CRLF`.
/// `message` has CRLF line endings and ends with one.
fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The PROXY header for a connection of our own, from `ours` to `theirs`:
/// v2 `LOCAL` (no addresses: "use the connection's own"), which Postfix
/// honours. v1 has `UNKNOWN` for that, but Postfix refuses it (it would
/// sidestep address-based access control), so v1 states the connection's
/// real addresses instead, which comes to the same.
pub fn own_proxy_header(
    version: ProxyProtocol,
    ours: SocketAddr,
    theirs: SocketAddr,
) -> Option<Vec<u8>> {
    match version {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => Some(crate::proxy_header::v1(ours, theirs)),
        ProxyProtocol::V2 => {
            let mut h = V2_SIGNATURE.to_vec();
            // Version 2, command LOCAL; family and protocol UNSPEC; no addresses.
            h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
            Some(h)
        }
    }
}

/// One SMTP reply: its code and its text, lines joined.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Reply {
    code: u16,
    text: String,
}

impl Reply {
    /// Parses a complete reply (as measured by [`reply_len`]).
    fn parse(bytes: &[u8]) -> Option<Reply> {
        let code = bytes.get(..3)?;
        if !code.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let code = std::str::from_utf8(code).ok()?.parse().ok()?;
        let text = String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join(" / ");
        Some(Reply { code, text })
    }

    fn class(&self) -> u16 {
        self.code / 100
    }

    /// The reply for a log line: bounded, one line.
    fn shown(&self) -> String {
        let mut s = one_line(&self.text);
        if s.len() > REPLY_SHOWN {
            let mut cut = REPLY_SHOWN;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push('…');
        }
        s
    }
}

/// A step the server said no to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Refusal {
    step: String,
    reply: String,
}

/// What [`Transaction`] wants done next.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Send these bytes, then feed the server's reply.
    Send(Vec<u8>),
    /// Say QUIT and close. Empty: the message was accepted for every
    /// recipient; otherwise what was refused (when only some recipients
    /// were, the others got the message).
    Quit(Vec<Refusal>),
}

/// Where a [`Transaction`] is: named for the reply it expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Ehlo,
    Helo,
    MailFrom,
    RcptTo(usize),
    Data,
    Body,
    Done,
}

/// The client side of one message's SMTP exchange, sans-IO.
struct Transaction<'a> {
    helo: &'a str,
    from: &'a str,
    to: &'a [String],
    /// The dot-stuffed payload.
    data: Vec<u8>,
    state: State,
    accepted: usize,
    refused: Vec<Refusal>,
    /// The server took the message (for at least one recipient).
    delivered: bool,
}

impl<'a> Transaction<'a> {
    fn new(helo: &'a str, from: &'a str, to: &'a [String], message: &[u8]) -> Self {
        Transaction {
            helo,
            from,
            to,
            data: dot_stuff(message),
            state: State::Greeting,
            accepted: 0,
            refused: Vec::new(),
            delivered: false,
        }
    }

    /// The step whose reply is awaited, for error messages.
    fn step(&self) -> String {
        match self.state {
            State::Greeting => "greeting".into(),
            State::Ehlo => "EHLO".into(),
            State::Helo => "HELO".into(),
            State::MailFrom => format!("MAIL FROM:<{}>", self.from),
            State::RcptTo(i) => format!("RCPT TO:<{}>", self.to.get(i).map_or("", |s| s)),
            State::Data => "DATA".into(),
            State::Body => "the message".into(),
            State::Done => "QUIT".into(),
        }
    }

    fn refuse(&mut self, reply: &Reply) -> Action {
        let refusal = Refusal {
            step: self.step(),
            reply: reply.shown(),
        };
        self.refused.push(refusal);
        self.state = State::Done;
        Action::Quit(std::mem::take(&mut self.refused))
    }

    /// `i < to.len()`: both callers check it before asking.
    fn rcpt(&mut self, i: usize) -> Action {
        self.state = State::RcptTo(i);
        Action::Send(format!("RCPT TO:<{}>\r\n", self.to[i]).into_bytes())
    }

    fn on_reply(&mut self, reply: &Reply) -> Action {
        let ok = reply.class() == 2;
        match self.state {
            State::Greeting if ok => {
                self.state = State::Ehlo;
                Action::Send(format!("EHLO {}\r\n", self.helo).into_bytes())
            }
            // An old server that knows no EHLO (RFC 5321 3.2).
            State::Ehlo if reply.code == 500 || reply.code == 502 => {
                self.state = State::Helo;
                Action::Send(format!("HELO {}\r\n", self.helo).into_bytes())
            }
            State::Ehlo | State::Helo if ok => {
                self.state = State::MailFrom;
                Action::Send(format!("MAIL FROM:<{}>\r\n", self.from).into_bytes())
            }
            State::MailFrom if ok && !self.to.is_empty() => self.rcpt(0),
            State::RcptTo(i) => {
                if ok {
                    self.accepted += 1;
                } else {
                    self.refused.push(Refusal {
                        step: self.step(),
                        reply: reply.shown(),
                    });
                }
                if i + 1 < self.to.len() {
                    self.rcpt(i + 1)
                } else if self.accepted == 0 {
                    self.state = State::Done;
                    Action::Quit(std::mem::take(&mut self.refused))
                } else {
                    self.state = State::Data;
                    Action::Send(b"DATA\r\n".to_vec())
                }
            }
            State::Data if reply.class() == 3 => {
                self.state = State::Body;
                Action::Send(std::mem::take(&mut self.data))
            }
            State::Body if ok => {
                self.state = State::Done;
                self.delivered = true;
                Action::Quit(std::mem::take(&mut self.refused))
            }
            State::Done => Action::Quit(Vec::new()),
            _ => self.refuse(reply),
        }
    }
}

/// Why an email was not (or not fully) delivered.
#[derive(Debug, thiserror::Error)]
enum MailError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr}: timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("{addr}: no reply to {step} within {SMTP_DEADLINE:?} of connecting")]
    Timeout { addr: SocketAddr, step: String },
    #[error("{addr}: {source} (waiting for the reply to {step})")]
    Io {
        addr: SocketAddr,
        step: String,
        source: io::Error,
    },
    #[error("{addr} closed the connection (waiting for the reply to {step})")]
    Closed { addr: SocketAddr, step: String },
    #[error("{addr} does not speak SMTP: {reply:?}")]
    NotSmtp { addr: SocketAddr, reply: String },
    #[error("{addr} refused {}", list(refused))]
    Refused {
        addr: SocketAddr,
        refused: Vec<Refusal>,
    },
    #[error(
        "{addr} refused {} (the other recipients got the message)",
        list(refused)
    )]
    PartlyRefused {
        addr: SocketAddr,
        refused: Vec<Refusal>,
    },
}

fn list(refused: &[Refusal]) -> String {
    refused
        .iter()
        .map(|r| format!("{}: {}", r.step, r.reply))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads one complete reply into `buf` (which may hold the start of it).
async fn read_reply(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(n) = reply_len(buf) {
            let rest = buf.split_off(n);
            return Ok(Some(std::mem::replace(buf, rest)));
        }
        if buf.len() > MAX_REPLY {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "reply too long"));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Delivers `message` to `to` through `backend`, with a PROXY header for
/// the connection itself.
async fn send_mail(
    backend: &Backend,
    from: &str,
    to: &[String],
    message: &[u8],
) -> Result<(), MailError> {
    let addr = backend.address;
    let mut stream = tokio::time::timeout(backend.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| MailError::ConnectTimeout {
            addr,
            after: backend.connect_timeout,
        })?
        .map_err(|source| MailError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    let mut tx = Transaction::new(domain(from), from, to, message);
    let exchange = async {
        let (ours, theirs) = (stream.local_addr(), stream.peer_addr());
        let header = match (ours, theirs) {
            (Ok(ours), Ok(theirs)) => own_proxy_header(backend.proxy_protocol, ours, theirs),
            (Err(source), _) | (_, Err(source)) => {
                return Err(MailError::Io {
                    addr,
                    step: "greeting".into(),
                    source,
                })
            }
        };
        if let Some(h) = header {
            stream.write_all(&h).await.map_err(|source| MailError::Io {
                addr,
                step: "greeting".into(),
                source,
            })?;
        }
        let mut buf = Vec::new();
        // Bounded: each reply moves the transaction one state on, and there
        // are at most 6 + recipients states.
        for _ in 0..to.len() + 8 {
            let step = tx.step();
            let bytes = match read_reply(&mut stream, &mut buf).await {
                Ok(Some(b)) => b,
                Ok(None) => return Err(MailError::Closed { addr, step }),
                Err(source) => return Err(MailError::Io { addr, step, source }),
            };
            let reply = Reply::parse(&bytes).ok_or_else(|| MailError::NotSmtp {
                addr,
                reply: String::from_utf8_lossy(&bytes[..bytes.len().min(REPLY_SHOWN)]).into(),
            })?;
            match tx.on_reply(&reply) {
                Action::Send(bytes) => {
                    stream
                        .write_all(&bytes)
                        .await
                        .map_err(|source| MailError::Io {
                            addr,
                            step: tx.step(),
                            source,
                        })?;
                }
                Action::Quit(refused) => {
                    // Politeness only: the outcome is known already.
                    if stream.write_all(b"QUIT\r\n").await.is_ok() {
                        let _ = read_reply(&mut stream, &mut buf).await;
                    }
                    return match refused {
                        r if r.is_empty() => Ok(()),
                        refused if tx.delivered => Err(MailError::PartlyRefused { addr, refused }),
                        refused => Err(MailError::Refused { addr, refused }),
                    };
                }
            }
        }
        Err(MailError::Timeout {
            addr,
            step: tx.step(),
        })
    };
    match tokio::time::timeout(SMTP_DEADLINE, exchange).await {
        Ok(r) => r,
        Err(_) => Err(MailError::Timeout {
            addr,
            step: tx.step(),
        }),
    }
}

/// Why a webhook POST failed.
#[derive(Debug, thiserror::Error)]
enum WebhookError {
    #[error("{url}: {message}")]
    Request { url: String, message: String },
    #[error("{url}: no response within {WEBHOOK_TIMEOUT:?}")]
    Timeout { url: String },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
}

type HttpClient = Client<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

struct Webhook {
    uri: http::Uri,
    /// The URL for log lines: scheme and authority only, since a webhook's
    /// path often is its secret (Slack, Mattermost).
    shown: String,
    client: HttpClient,
}

impl Webhook {
    fn new(url: &str, ca_roots: Option<&Path>) -> Result<Webhook, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("notify.webhook {url:?}: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "notify.webhook {url:?}: expected http:// or https://"
                ))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("notify.webhook {url:?}: no host"))?;
        let host_port = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, h)| h);
        let path = uri.path_and_query().map_or("", |p| p.as_str());
        let shown = format!(
            "{}://{host_port}{}",
            uri.scheme_str().unwrap_or("http"),
            if path.is_empty() || path == "/" {
                ""
            } else {
                "/…"
            }
        );
        let mut roots = RootCertStore::empty();
        if https {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
        if let Some(path) = ca_roots {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            roots.add_parsable_certificates(certs);
        }
        if https && roots.is_empty() {
            return Err(format!(
                "notify.webhook {shown}: no trusted roots for HTTPS (the system has none)"
            ));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup for notify.webhook: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(WEBHOOK_TIMEOUT));
        tcp.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Webhook { uri, shown, client })
    }

    async fn post(&self, json: &serde_json::Value) -> Result<(), WebhookError> {
        let url = self.shown.clone();
        let body = serde_json::to_vec(json).map_err(|e| WebhookError::Request {
            url: url.clone(),
            message: e.to_string(),
        })?;
        let request = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("portcullis/", env!("CARGO_PKG_VERSION")),
            )
            .body(BodyWrapper::from(body))
            .map_err(|e| WebhookError::Request {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let response = tokio::time::timeout(WEBHOOK_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| WebhookError::Timeout { url: url.clone() })?
            .map_err(|e| WebhookError::Request {
                url: url.clone(),
                message: error_chain(&e),
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(WebhookError::Status { url, status })
        }
    }
}

/// An error and its sources, `: `-joined (hyper's own message is only "client error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    // Bounded: error chains are short, and a cycle would be a bug elsewhere.
    for _ in 0..8 {
        let Some(inner) = source else { break };
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

/// Sends [`Event`]s to the operator by email and/or webhook.
pub struct Notifier {
    from: String,
    to: Vec<String>,
    smtp: Option<Backend>,
    webhook: Option<Webhook>,
    /// When each host last got an `Expiring` notification.
    expiry_sent: Mutex<HashMap<String, SystemTime>>,
    /// For the commands the emails suggest.
    config_path: Option<PathBuf>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("smtp", &self.smtp)
            .field("webhook", &self.webhook.as_ref().map(|w| &w.shown))
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// `ca_roots`: extra PEM roots for the webhook's HTTPS (tests); native
    /// roots otherwise.
    pub fn new(config: &Notify, ca_roots: Option<&Path>) -> Result<Notifier, String> {
        let webhook = config
            .webhook
            .as_deref()
            .map(|url| Webhook::new(url, ca_roots))
            .transpose()?;
        Ok(Notifier {
            from: config.from.clone(),
            to: config.email.clone(),
            smtp: config.smtp.clone(),
            webhook,
            expiry_sent: Mutex::new(HashMap::new()),
            config_path: None,
        })
    }

    /// The config file, for the commands the emails suggest
    /// (`portcullis renew --config FILE NAME`); `FILE` without it.
    pub fn with_config_path(mut self, path: &Path) -> Notifier {
        self.config_path = Some(path.to_path_buf());
        self
    }

    /// Takes over `old`'s record of expiry warnings sent, so a reload that
    /// changes `notify:` does not warn about every host again the same day.
    pub fn with_history_of(self, old: &Notifier) -> Notifier {
        let sent = old
            .expiry_sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        *self.expiry_sent.lock().unwrap_or_else(|e| e.into_inner()) = sent;
        self
    }

    /// Delivers `event` in a task of its own and returns at once; the
    /// outcome is logged (`notification sent` / `notification failed`).
    pub fn send(self: &Arc<Self>, event: Event) {
        self.send_at(event, SystemTime::now());
    }

    /// [`Notifier::send`] with the clock reading the texts are written for.
    fn send_at(self: &Arc<Self>, event: Event, now: SystemTime) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(
                event = event.kind(),
                host = event.host(),
                error = "no async runtime",
                "notification failed"
            );
            return;
        };
        let this = Arc::clone(self);
        runtime.spawn(async move { this.deliver(&event, now).await });
    }

    /// Email and webhook side by side; each outcome logged on its own.
    async fn deliver(&self, event: &Event, now: SystemTime) {
        let mail = async {
            let Some(backend) = self.smtp.as_ref().filter(|_| !self.to.is_empty()) else {
                return;
            };
            let to = self.to.join(",");
            let id = format!(
                "{}.{:016x}.portcullis",
                now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                fastrand::u64(..)
            );
            let message = message(
                &self.from,
                &self.to,
                &event.subject(now),
                &event.body(now, self.config_path.as_deref()),
                SystemTime::now(),
                &id,
            );
            match send_mail(backend, &self.from, &self.to, &message).await {
                Ok(()) => info!(
                    event = event.kind(),
                    host = event.host(),
                    to = %to,
                    smtp = %backend.address,
                    "notification sent"
                ),
                Err(e) => warn!(
                    event = event.kind(),
                    host = event.host(),
                    to = %to,
                    smtp = %backend.address,
                    error = %e,
                    "notification failed"
                ),
            }
        };
        let hook = async {
            let Some(webhook) = &self.webhook else {
                return;
            };
            match webhook.post(&event.json(now)).await {
                Ok(()) => info!(
                    event = event.kind(),
                    host = event.host(),
                    webhook = %webhook.shown,
                    "notification sent"
                ),
                Err(e) => warn!(
                    event = event.kind(),
                    host = event.host(),
                    webhook = %webhook.shown,
                    error = %e,
                    "notification failed"
                ),
            }
        };
        tokio::join!(mail, hook);
    }

    /// With every served certificate as (host label, names, not_after,
    /// source): sends `Expiring` for each that ends within
    /// [`EXPIRY_WARNING`] (or has ended), unless that host had one in the
    /// last [`EXPIRY_REPEAT`]. Self-signed and placeholder certificates are
    /// nobody's to renew and are skipped. Returns how many were sent.
    pub fn check_expiry(
        self: &Arc<Self>,
        certs: &[(String, Vec<String>, SystemTime, String)],
        now: SystemTime,
    ) -> usize {
        let due = self.expiring(certs, now);
        let n = due.len();
        for event in due {
            self.send_at(event, now);
        }
        n
    }

    /// The `Expiring` events due at `now`, each recorded as sent.
    fn expiring(
        &self,
        certs: &[(String, Vec<String>, SystemTime, String)],
        now: SystemTime,
    ) -> Vec<Event> {
        let mut sent = self.expiry_sent.lock().unwrap_or_else(|e| e.into_inner());
        let mut due = Vec::new();
        for (host, names, not_after, source) in certs {
            if source == "self-signed" || source == "placeholder" {
                continue;
            }
            let close = not_after
                .duration_since(now)
                .map_or(true, |left| left <= EXPIRY_WARNING);
            if !close {
                // Renewed (or replaced): the next time it gets close, warn at once.
                sent.remove(host);
                continue;
            }
            // Either way round: a clock stepped back must not mean a flood.
            let recent = sent.get(host).is_some_and(|last| {
                let apart = now
                    .duration_since(*last)
                    .or_else(|e| Ok::<_, ()>(e.duration()))
                    .unwrap_or(Duration::ZERO);
                apart < EXPIRY_REPEAT
            });
            if recent {
                continue;
            }
            sent.insert(host.clone(), now);
            due.push(Event::Expiring {
                host: host.clone(),
                names: names.clone(),
                not_after: *not_after,
                source: source.clone(),
            });
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// 2025-07-01T12:00:00Z, a Tuesday.
    fn noon() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_751_371_200)
    }

    fn names() -> Vec<String> {
        vec!["mail.example.org".into(), "imap.example.org".into()]
    }

    fn issued(renewal: bool) -> Event {
        Event::Issued {
            host: "mail.example.org".into(),
            names: names(),
            serial: "04a1b2".into(),
            issuer: "CN=R11, O=Let's Encrypt, C=US".into(),
            not_after: noon() + 90 * DAY,
            renewal,
        }
    }

    fn failed() -> Event {
        Event::RenewalFailed {
            host: "mail.example.org".into(),
            names: names(),
            error: "order invalid: urn:ietf:params:acme:error:connection\nsecond line".into(),
            next_try: noon() + Duration::from_secs(3600),
            not_after: Some(noon() + 12 * DAY),
        }
    }

    fn expiring(days: u32, source: &str) -> Event {
        Event::Expiring {
            host: "mail.example.org".into(),
            names: names(),
            not_after: noon() + DAY * days,
            source: source.into(),
        }
    }

    #[test]
    fn subjects_are_filterable() {
        let now = noon();
        assert_eq!(
            issued(false).subject(now),
            "[portcullis] certificate issued: mail.example.org"
        );
        assert_eq!(
            issued(true).subject(now),
            "[portcullis] certificate renewed: mail.example.org"
        );
        assert_eq!(
            failed().subject(now),
            "[portcullis] RENEWAL FAILED: mail.example.org"
        );
        assert_eq!(
            expiring(10, "acme").subject(now),
            "[portcullis] certificate expires in 10 days: mail.example.org"
        );
        // Part of a day left counts as a day.
        assert_eq!(
            expiring(1, "acme").subject(now + Duration::from_secs(60)),
            "[portcullis] certificate expires in 1 day: mail.example.org"
        );
        assert_eq!(
            expiring(0, "files").subject(now + Duration::from_secs(1)),
            "[portcullis] certificate EXPIRED: mail.example.org"
        );
        let sneaky = Event::Expiring {
            host: "a\r\nBcc: x@y".into(),
            names: vec![],
            not_after: now,
            source: "acme".into(),
        };
        assert!(!sneaky.subject(now).contains('\n'));
    }

    #[test]
    fn bodies_carry_the_facts() {
        let now = noon();
        let b = issued(false).body(now, None);
        assert!(b.contains("first certificate for mail.example.org"), "{b}");
        assert!(
            b.contains("Names:     mail.example.org, imap.example.org"),
            "{b}"
        );
        assert!(b.contains("Serial:    04a1b2"), "{b}");
        assert!(
            b.contains("Issuer:    CN=R11, O=Let's Encrypt, C=US"),
            "{b}"
        );
        assert!(b.contains("Not after: 2025-09-29T12:00:00Z"), "{b}");
        assert!(issued(true)
            .body(now, None)
            .contains("renewed the certificate"));

        let b = failed().body(now, None);
        assert!(
            b.contains("Error:     order invalid: urn:ietf:params:acme:error:connection\n           second line"),
            "{b}"
        );
        assert!(b.contains("Next try:  2025-07-01T13:00:00Z"), "{b}");
        assert!(b.contains("valid until 2025-07-13T12:00:00Z"), "{b}");
        assert!(b.contains("expires in 12 days"), "{b}");
        assert!(
            b.contains("portcullis renew --config FILE mail.example.org\n"),
            "{b}"
        );
        assert!(b.contains("ports 80 and 443"), "{b}");

        let b = expiring(10, "acme").body(now, None);
        assert!(
            b.contains("expires in 10 days, on 2025-07-11T12:00:00Z"),
            "{b}"
        );
        assert!(b.contains("portcullis certs --config FILE\n"), "{b}");
        assert!(
            b.contains("portcullis renew --config FILE mail.example.org\n"),
            "{b}"
        );
        let etc = Path::new("/etc/portcullis/config.yaml");
        let b = expiring(10, "acme").body(now, Some(etc));
        assert!(
            b.contains("portcullis renew --config /etc/portcullis/config.yaml mail.example.org\n"),
            "{b}"
        );
        let b = expiring(10, "files").body(now, None);
        assert!(b.contains("does not renew"), "{b}");
        assert!(!b.contains("portcullis renew"), "{b}");
    }

    #[test]
    fn dates_are_rfc5322_utc() {
        assert_eq!(rfc5322_date(noon()), "Tue, 01 Jul 2025 12:00:00 +0000");
        assert_eq!(
            rfc5322_date(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3723)),
            "Tue, 29 Feb 2000 01:02:03 +0000"
        );
    }

    fn to() -> Vec<String> {
        vec!["alice@example.test".into(), "bob@example.test".into()]
    }

    #[test]
    fn message_has_headers_and_crlf_only() {
        let body = "first\n.dot line\n.\nlast\r\n";
        let m = message(
            "portcullis@example.org",
            &to(),
            "[portcullis] certificate issued: x",
            body,
            noon(),
            "123.abc",
        );
        let text = String::from_utf8(m.clone()).unwrap();
        for h in [
            "From: portcullis <portcullis@example.org>\r\n",
            "To: alice@example.test,\r\n bob@example.test\r\n",
            "Subject: [portcullis] certificate issued: x\r\n",
            "Date: Tue, 01 Jul 2025 12:00:00 +0000\r\n",
            "Message-ID: <123.abc@example.org>\r\n",
            "MIME-Version: 1.0\r\n",
            "Content-Type: text/plain; charset=utf-8\r\n",
            "Content-Transfer-Encoding: 7bit\r\n",
            "Auto-Submitted: auto-generated\r\n",
        ] {
            assert!(text.contains(h), "{h:?} missing in {text}");
        }
        for (i, &b) in m.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(m[i - 1], b'\r', "bare LF at {i} in {text:?}");
            }
            if b == b'\r' {
                assert_eq!(m.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        assert!(
            text.ends_with("\r\n\r\nfirst\r\n.dot line\r\n.\r\nlast\r\n"),
            "{text:?}"
        );

        let data = dot_stuff(&m);
        let data = String::from_utf8(data).unwrap();
        assert!(
            data.ends_with("\r\nfirst\r\n..dot line\r\n..\r\nlast\r\n.\r\n"),
            "{data:?}"
        );
        // Only the terminator is a lone dot.
        assert_eq!(data.matches("\r\n.\r\n").count(), 1);
        assert_eq!(dot_stuff(b".a\r\nb"), b"..a\r\nb\r\n.\r\n");
    }

    #[test]
    fn long_lines_are_split_and_non_ascii_goes_as_base64() {
        let long = "x".repeat(2500);
        let m = message("a@b.c", &to(), "s", &long, noon(), "1");
        assert!(m.split(|&b| b == b'\n').all(|l| l.len() <= MAX_LINE + 1));
        let text = String::from_utf8(m).unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(body.replace("\r\n", ""), long);

        let m = message(
            "a@b.c",
            &to(),
            "grüße",
            "Fehler: Zertifikat ungültig\n",
            noon(),
            "1",
        );
        let text = String::from_utf8(m).unwrap();
        assert!(text.is_ascii(), "{text}");
        assert!(
            text.contains("Subject: =?utf-8?b?Z3LDvMOfZQ==?=\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Content-Transfer-Encoding: base64\r\n\r\n"),
            "{text}"
        );
        use base64::Engine as _;
        let encoded = text.split("\r\n\r\n").nth(1).unwrap().replace("\r\n", "");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, "Fehler: Zertifikat ungültig\r\n".as_bytes());
    }

    #[test]
    fn json_shapes() {
        let now = noon();
        let v = issued(true).json(now);
        assert_eq!(
            v,
            serde_json::json!({
                "event": "renewed",
                "host": "mail.example.org",
                "names": ["mail.example.org", "imap.example.org"],
                "not_after": "2025-09-29T12:00:00Z",
                "serial": "04a1b2",
                "issuer": "CN=R11, O=Let's Encrypt, C=US",
                "time": "2025-07-01T12:00:00Z",
            })
        );
        assert_eq!(issued(false).json(now)["event"], "issued");
        let v = failed().json(now);
        assert_eq!(v["event"], "renewal_failed");
        assert_eq!(v["not_after"], "2025-07-13T12:00:00Z");
        assert_eq!(v["next_try"], "2025-07-01T13:00:00Z");
        assert!(v["error"].as_str().unwrap().starts_with("order invalid"));
        let none = Event::RenewalFailed {
            host: "h".into(),
            names: vec![],
            error: "e".into(),
            next_try: now,
            not_after: None,
        };
        assert_eq!(none.json(now)["not_after"], serde_json::Value::Null);
        let v = expiring(10, "files").json(now);
        assert_eq!(v["event"], "expiring");
        assert_eq!(v["source"], "files");
        assert_eq!(v["days_left"], 10);
        assert_eq!(v["not_after"], "2025-07-11T12:00:00Z");
        assert_eq!(v["time"], "2025-07-01T12:00:00Z");
    }

    fn notifier() -> Notifier {
        let config = Notify {
            email: vec!["alice@example.test".into()],
            from: "portcullis@example.test".into(),
            smtp: None,
            webhook: None,
        };
        Notifier::new(&config, None).unwrap()
    }

    fn cert(
        host: &str,
        not_after: SystemTime,
        source: &str,
    ) -> (String, Vec<String>, SystemTime, String) {
        (host.into(), vec![host.into()], not_after, source.into())
    }

    #[test]
    fn expiry_warnings_come_once_a_day() {
        let n = notifier();
        let t0 = noon();
        let certs = [
            cert("soon.example", t0 + 10 * DAY, "acme"),
            cert("files.example", t0 + 13 * DAY, "files"),
            cert("later.example", t0 + 20 * DAY, "acme"),
            cert("selfsigned.example", t0 + DAY, "self-signed"),
            cert("placeholder.example", t0, "placeholder"),
            cert("gone.example", t0 - DAY, "acme"),
        ];
        let hosts = |events: Vec<Event>| -> Vec<String> {
            events.iter().map(|e| e.host().to_string()).collect()
        };
        assert_eq!(
            hosts(n.expiring(&certs, t0)),
            ["soon.example", "files.example", "gone.example"]
        );
        assert!(n.expiring(&certs, t0).is_empty(), "again at once: nothing");
        let almost = t0 + DAY - Duration::from_secs(1);
        assert!(n.expiring(&certs, almost).is_empty());
        // A clock stepped back an hour is not a new day either.
        assert!(n
            .expiring(&certs, t0 - Duration::from_secs(3600))
            .is_empty());
        assert_eq!(n.expiring(&certs, t0 + DAY).len(), 3);

        // Renewed: no longer close, so forgotten; close again: warned at once.
        let renewed = [cert("soon.example", t0 + 90 * DAY, "acme")];
        assert!(n.expiring(&renewed, t0 + DAY).is_empty());
        let close_again = [cert("soon.example", t0 + 2 * DAY, "acme")];
        assert_eq!(n.expiring(&close_again, t0 + DAY).len(), 1);
    }

    #[tokio::test]
    async fn check_expiry_counts_and_never_blocks_without_channels() {
        let n = Arc::new(notifier());
        let certs = [cert("soon.example", noon() + 10 * DAY, "acme")];
        assert_eq!(n.check_expiry(&certs, noon()), 1);
        assert_eq!(n.check_expiry(&certs, noon()), 0);
    }

    fn reply(s: &str) -> Reply {
        Reply::parse(s.as_bytes()).unwrap()
    }

    fn send(a: Action) -> String {
        match a {
            Action::Send(b) => String::from_utf8(b).unwrap(),
            other => panic!("expected Send, got {other:?}"),
        }
    }

    #[test]
    fn transaction_walks_the_happy_path() {
        let to = to();
        let mut t = Transaction::new("example.org", "p@example.org", &to, b".x\r\n");
        assert_eq!(
            send(t.on_reply(&reply("220 mx ESMTP\r\n"))),
            "EHLO example.org\r\n"
        );
        assert_eq!(
            send(t.on_reply(&reply("250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n"))),
            "MAIL FROM:<p@example.org>\r\n"
        );
        assert_eq!(
            send(t.on_reply(&reply("250 2.1.0 Ok\r\n"))),
            "RCPT TO:<alice@example.test>\r\n"
        );
        assert_eq!(
            send(t.on_reply(&reply("250 2.1.5 Ok\r\n"))),
            "RCPT TO:<bob@example.test>\r\n"
        );
        assert_eq!(send(t.on_reply(&reply("250 2.1.5 Ok\r\n"))), "DATA\r\n");
        assert_eq!(
            send(t.on_reply(&reply("354 End data with <CR><LF>.<CR><LF>\r\n"))),
            "..x\r\n.\r\n"
        );
        assert_eq!(
            t.on_reply(&reply("250 2.0.0 Ok: queued as 4Xy\r\n")),
            Action::Quit(vec![])
        );
        assert!(t.delivered);
    }

    #[test]
    fn transaction_falls_back_to_helo_and_reports_refusals() {
        let to = to();
        let mut t = Transaction::new("example.org", "p@example.org", &to, b"x\r\n");
        t.on_reply(&reply("220 old\r\n"));
        assert_eq!(
            send(t.on_reply(&reply("502 5.5.2 Error: command not recognized\r\n"))),
            "HELO example.org\r\n"
        );
        t.on_reply(&reply("250 old\r\n"));
        t.on_reply(&reply("250 ok\r\n"));
        // One recipient refused: the other still gets the message.
        t.on_reply(&reply(
            "550 5.1.1 <alice@example.test>: Recipient address rejected\r\n",
        ));
        assert_eq!(send(t.on_reply(&reply("250 ok\r\n"))), "DATA\r\n");
        t.on_reply(&reply("354 go\r\n"));
        let Action::Quit(refused) = t.on_reply(&reply("250 queued\r\n")) else {
            panic!("expected Quit");
        };
        assert!(t.delivered);
        assert_eq!(
            refused,
            [Refusal {
                step: "RCPT TO:<alice@example.test>".into(),
                reply: "550 5.1.1 <alice@example.test>: Recipient address rejected".into(),
            }]
        );

        // A refusal at a step that must succeed ends the transaction.
        let mut t = Transaction::new("example.org", "p@example.org", &to, b"x\r\n");
        t.on_reply(&reply("220 mx\r\n"));
        t.on_reply(&reply("250 mx\r\n"));
        let Action::Quit(refused) =
            t.on_reply(&reply("553-5.7.1 Sender\r\n553 5.7.1 not owned\r\n"))
        else {
            panic!("expected Quit");
        };
        assert_eq!(refused[0].step, "MAIL FROM:<p@example.org>");
        assert_eq!(refused[0].reply, "553-5.7.1 Sender / 553 5.7.1 not owned");
        assert!(!t.delivered);

        // A greeting of 554 (a server that does not want us).
        let mut t = Transaction::new("example.org", "p@example.org", &to, b"x\r\n");
        let Action::Quit(refused) = t.on_reply(&reply("554 go away\r\n")) else {
            panic!("expected Quit");
        };
        assert_eq!(refused[0].step, "greeting");
    }

    #[test]
    fn replies_parse_or_are_not_smtp() {
        assert_eq!(
            reply("250-a\r\n250 b\r\n"),
            Reply {
                code: 250,
                text: "250-a / 250 b".into()
            }
        );
        assert!(Reply::parse(b"HTTP/1.1 400 Bad\r\n").is_none());
        assert!(Reply::parse(b"2\r\n").is_none());
        let long = format!("550 {}\r\n", "é".repeat(400));
        assert!(reply(&long).shown().len() <= REPLY_SHOWN + '…'.len_utf8());
    }

    #[test]
    fn own_proxy_headers() {
        let ours: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let theirs: SocketAddr = "127.0.0.1:25".parse().unwrap();
        assert_eq!(own_proxy_header(ProxyProtocol::None, ours, theirs), None);
        assert_eq!(
            own_proxy_header(ProxyProtocol::V1, ours, theirs).unwrap(),
            b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 25\r\n"
        );
        let v2 = own_proxy_header(ProxyProtocol::V2, ours, theirs).unwrap();
        assert_eq!(v2.len(), 16);
        let header = ppp::v2::Header::try_from(v2.as_slice()).unwrap();
        assert_eq!(header.command, ppp::v2::Command::Local);
        assert_eq!(header.addresses, ppp::v2::Addresses::Unspecified);
        assert_eq!(header.length(), 0);
    }

    #[test]
    fn webhook_urls_are_checked_and_shown_without_their_path() {
        let w = Webhook::new("http://127.0.0.1:8080/hooks/T0/B1/secret", None).unwrap();
        assert_eq!(w.shown, "http://127.0.0.1:8080/…");
        let w = Webhook::new("http://user:pw@127.0.0.1:8080", None).unwrap();
        assert_eq!(w.shown, "http://127.0.0.1:8080");
        assert!(Webhook::new("ftp://127.0.0.1/", None).is_err());
        assert!(Webhook::new("not a url", None).is_err());
        let missing = Webhook::new(
            "https://127.0.0.1/",
            Some(Path::new("/nonexistent/roots.pem")),
        );
        assert!(missing.err().unwrap().contains("/nonexistent/roots.pem"));
    }
}
