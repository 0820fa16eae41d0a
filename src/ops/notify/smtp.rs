//! The SMTP client that sends notification emails through the operator's
//! own server, sans-IO: [`Transaction`] takes each server reply and says what
//! to send next; [`send_mail`] owns the socket, sends the PROXY header of the
//! connection itself first, and holds every phase to a deadline.
//!
//! ```text
//! Greeting ─2xx─▶ Ehlo ─2xx─▶ MailFrom ─2xx─▶ RcptTo(0..n) ─any accepted─▶ Data ─3xx─▶ Body ─2xx─▶ Quit
//!                  └─5xx─▶ Helo ─2xx─┘        (a refusal anywhere else: Quit with the reply)
//! ```

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use ppp::v2::{Addresses, Builder, Command, Protocol, Version};

use super::message::{domain, one_line};
use crate::config::{Backend, ProxyProtocol};
use crate::protocol::smtp::reply_len;
use crate::proxy::proxy_header;

/// The whole SMTP exchange, greeting to QUIT.
const SMTP_DEADLINE: Duration = Duration::from_secs(30);
/// A server reply longer than this is not SMTP.
const MAX_REPLY: usize = 64 * 1024;
/// How much of a server reply goes into a log line.
const REPLY_SHOWN: usize = 300;

/// DATA's payload: dot-stuffed (RFC 5321 4.5.2), ending in `CRLF.CRLF`.
/// `message` has CRLF line endings and ends with one.
pub(super) fn dot_stuff(message: &[u8]) -> Vec<u8> {
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
pub(super) fn own_proxy_header(
    version: ProxyProtocol,
    ours: SocketAddr,
    theirs: SocketAddr,
) -> Option<Vec<u8>> {
    match version {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => Some(proxy_header::v1(ours, theirs)),
        // With no address and no TLV nothing can overflow its length: the
        // build does not fail.
        ProxyProtocol::V2 => Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            Addresses::Unspecified,
        )
        .build()
        .ok(),
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
pub(super) struct Refusal {
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
pub(super) enum MailError {
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
pub(super) async fn send_mail(
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
    let talk = exchange(&mut stream, addr, backend.proxy_protocol, &mut tx);
    match tokio::time::timeout(SMTP_DEADLINE, talk).await {
        Ok(r) => r,
        Err(_) => Err(MailError::Timeout {
            addr,
            step: tx.step(),
        }),
    }
}

/// The PROXY header, then the transaction reply by reply, then QUIT.
async fn exchange(
    stream: &mut TcpStream,
    addr: SocketAddr,
    proxy: ProxyProtocol,
    tx: &mut Transaction<'_>,
) -> Result<(), MailError> {
    let (ours, theirs) = (stream.local_addr(), stream.peer_addr());
    let header = match (ours, theirs) {
        (Ok(ours), Ok(theirs)) => own_proxy_header(proxy, ours, theirs),
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
    for _ in 0..tx.to.len() + 8 {
        let step = tx.step();
        let bytes = match read_reply(stream, &mut buf).await {
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
                    let _ = read_reply(stream, &mut buf).await;
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
}

#[cfg(test)]
mod tests {
    use super::super::message::tests::to;
    use super::*;

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
}
