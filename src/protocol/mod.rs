//! The protocols, pure: what each mail protocol says to a client, in its own
//! words, and the plaintext dialogues spoken before STARTTLS (one file per
//! protocol; `line` frames the lines). Lines in, an [`Action`] out; the
//! driver in `proxy::starttls` owns the socket. Imports nothing of the crate.
//!
//! ```text
//!  greeting ─▶ ExpectCommand ──STARTTLS──▶ Action::StartTls ─▶ (driver: TLS handshake, backend)
//!                │    ▲
//!                │    └─ Reply (CAPABILITY, NOOP, refusals; errors count against a budget)
//!                ├─ Close (QUIT/LOGOUT, too many errors, line too long)
//!                └─ PassThrough (SMTP with require_tls: false: plaintext mail to the backend)
//! ```

pub mod imap;
pub mod line;
pub mod pop3;
pub mod sieve;
pub mod smtp;

use serde::Deserialize;

/// What a listener speaks: `listeners.NAME.protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Smtp,
    Pop3,
    Sieve,
    Tcp,
    Http,
}

/// When TLS starts: `listeners.NAME.tls`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Implicit,
    Starttls,
    None,
}

/// Bad commands tolerated before the dialogue says goodbye.
pub const MAX_ERRORS: u32 = 10;

/// Counts bad commands; the last one allowed is answered, then goodbye.
#[derive(Debug, Default)]
pub struct ErrorBudget(u32);

impl ErrorBudget {
    /// `reply` (a complete reply, CRLF included) to a bad command; once the
    /// budget is spent, `reply` and then `goodbye`, and the session closes.
    pub fn refuse(&mut self, reply: String, goodbye: &str) -> Action {
        self.0 += 1;
        if self.0 >= MAX_ERRORS {
            Action::Close(format!("{reply}{goodbye}").into_bytes())
        } else {
            Action::Reply(reply.into_bytes())
        }
    }
}

/// What the driver must do after a client line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this, keep reading.
    Reply(Vec<u8>),
    /// Send this, then the TLS handshake. Nothing may follow the command.
    StartTls(Vec<u8>),
    /// Send this, then close.
    Close(Vec<u8>),
    /// SMTP where TLS is optional and the client went on without it: connect
    /// the backend, send `hello`, take its greeting and reply, then forward
    /// `line` and relay in plaintext.
    PassThrough { hello: Vec<u8>, line: Vec<u8> },
}

/// What the backend's first words are worth once the client is on TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendGreeting {
    /// An SMTP reply, possibly multi-line: drop it (the client had ours).
    DropSmtpReply,
    /// One line (`* OK …`, `+OK …`): drop it.
    DropLine,
    /// Pass it on (ManageSieve re-sends capabilities after TLS, RFC 5804 §2.2).
    Keep,
}

/// One side of a plaintext dialogue.
pub trait Dialogue: Send {
    fn greeting(&self) -> Vec<u8>;
    /// The reply to one command line (without its line ending).
    fn line(&mut self, line: &[u8]) -> Action;
    /// Longest command line accepted, CRLF included.
    fn line_limit(&self) -> usize;
    /// Before closing on a line longer than [`Dialogue::line_limit`].
    fn too_long(&self) -> Vec<u8>;
    /// Before closing because bytes followed the STARTTLS command (`after` is
    /// what followed, to quote an IMAP tag).
    fn injected(&self, after: &[u8]) -> Vec<u8>;
    fn shutting_down(&self) -> Vec<u8>;
    fn timed_out(&self) -> Vec<u8>;
    fn backend_greeting(&self) -> BackendGreeting;
}

/// The dialogue for a STARTTLS listener.
pub fn dialogue(
    protocol: Protocol,
    hostname: &str,
    require_tls: bool,
) -> Option<Box<dyn Dialogue>> {
    match protocol {
        Protocol::Smtp => Some(Box::new(smtp::SmtpDialogue::new(hostname, require_tls))),
        Protocol::Imap => Some(Box::new(imap::ImapDialogue::new(hostname))),
        Protocol::Pop3 => Some(Box::new(pop3::Pop3Dialogue::new(hostname))),
        Protocol::Sieve => Some(Box::new(sieve::SieveDialogue::new(hostname))),
        Protocol::Tcp | Protocol::Http => None,
    }
}

/// The line a client gets when its session cannot reach a backend, or `None`
/// where the protocol has no words for it (`tcp`: the connection just closes).
pub fn unavailable(protocol: Protocol, hostname: &str) -> Option<Vec<u8>> {
    match protocol {
        Protocol::Imap => Some(imap::BYE_UNAVAILABLE.to_vec()),
        Protocol::Pop3 => Some(pop3::ERR_UNAVAILABLE.to_vec()),
        Protocol::Smtp => Some(smtp::unavailable(hostname)),
        Protocol::Sieve => Some(sieve::BYE_UNAVAILABLE.to_vec()),
        Protocol::Tcp | Protocol::Http => None,
    }
}

/// The ALPN IDs (RFC 7301) a listener of `protocol` speaks unless its
/// config names others: IANA's `imap`, `pop3` and `managesieve`; for SMTP
/// the unregistered `smtp` (Delta Chat sends it) and `submission` (Dovecot
/// 2.4 knows it). A ClientHello that offers ALPN but none of these is
/// refused: a browser lured to a mail port must not get a TLS session with
/// the mail server's certificate (the ALPACA attack, RFC 9325 §3.8). `tcp`
/// and `http` have none: nothing is refused.
pub fn alpn(protocol: Protocol) -> &'static [&'static [u8]] {
    match protocol {
        Protocol::Imap => &[b"imap"],
        Protocol::Pop3 => &[b"pop3"],
        Protocol::Sieve => &[b"managesieve"],
        Protocol::Smtp => &[b"smtp", b"submission"],
        Protocol::Tcp | Protocol::Http => &[],
    }
}

/// The line a client over its per-address limit hears before the close, on
/// a listener where the server speaks first; `phrase` says which limit.
/// `None` where the protocol has no words before TLS.
pub fn too_many(protocol: Protocol, hostname: &str, phrase: &str) -> Option<Vec<u8>> {
    match protocol {
        Protocol::Imap => Some(imap::too_many(phrase)),
        Protocol::Pop3 => Some(pop3::too_many(phrase)),
        Protocol::Smtp => Some(smtp::too_many(hostname, phrase)),
        Protocol::Sieve => Some(sieve::too_many(phrase)),
        Protocol::Tcp | Protocol::Http => None,
    }
}

/// Feeds `input` to a dialogue through the line framer the way the driver
/// does, in the given pieces; returns every action up to the first that ends
/// the dialogue, and a marker for an over-long line.
#[cfg(test)]
pub(crate) fn script(d: &mut dyn Dialogue, pieces: &[&[u8]]) -> Vec<Action> {
    let mut lines = line::LineBuf::new(d.line_limit());
    let mut out = Vec::new();
    for piece in pieces {
        lines.push(piece);
        while let Some(l) = lines.next_line() {
            let action = match l {
                Ok(l) => d.line(&l),
                Err(line::TooLong) => Action::Close(d.too_long()),
            };
            let done = !matches!(action, Action::Reply(_));
            out.push(action);
            if done {
                return out;
            }
        }
    }
    out
}

/// Asserts that `input` gives `want`, and the same when split at every byte.
#[cfg(test)]
pub(crate) fn assert_script(make: &dyn Fn() -> Box<dyn Dialogue>, input: &[u8], want: &[Action]) {
    let whole = script(make().as_mut(), &[input]);
    assert_eq!(whole, want, "input {:?}", String::from_utf8_lossy(input));
    for split in 0..=input.len() {
        let parts = script(make().as_mut(), &[&input[..split], &input[split..]]);
        assert_eq!(parts, whole, "split at {split}");
    }
}

#[cfg(test)]
pub(crate) fn reply(s: &str) -> Action {
    Action::Reply(s.as_bytes().to_vec())
}

#[cfg(test)]
pub(crate) fn close(s: &str) -> Action {
    Action::Close(s.as_bytes().to_vec())
}

#[cfg(test)]
pub(crate) fn starttls(s: &str) -> Action {
    Action::StartTls(s.as_bytes().to_vec())
}
