//! How a session ends: what it hands the relay once every check has passed
//! ([`Ready`]), and the one `session closed` line it leaves ([`Outcome`]).
//! Shared by the session and the port-80 handler.

use std::io;
use std::time::Instant;

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::relay::{RelayEnd, RelayStats};
use super::tls_session::TlsSession;

/// What a connection hands the relay once every check has passed.
pub(crate) enum Ready {
    Tls(Box<TlsSession>, TcpStream),
    Plain(TcpStream, TcpStream),
}

/// What the one line at a connection's end says. Listener, client address,
/// SNI, TLS version and backend are on the connection's span.
#[derive(Debug)]
pub(crate) struct Outcome {
    started: Instant,
    up: u64,
    down: u64,
    /// `outcome=` in the line, and the sessions metric's label.
    pub(crate) label: &'static str,
    reason: Option<String>,
    /// The outcome is the operator's business (a backend down), not the
    /// client's (a scanner's failed handshake).
    warn: bool,
}

impl Outcome {
    pub(crate) fn new() -> Outcome {
        Outcome {
            started: Instant::now(),
            up: 0,
            down: 0,
            label: "closed",
            reason: None,
            warn: false,
        }
    }

    /// Ends the session before its relay.
    pub(crate) fn end(&mut self, outcome: &'static str, reason: impl Into<Option<String>>) {
        self.label = outcome;
        self.reason = reason.into();
    }

    /// Like [`Outcome::end`], for outcomes the operator should look at.
    pub(crate) fn fail(&mut self, outcome: &'static str, reason: String) {
        self.end(outcome, reason);
        self.warn = true;
    }

    pub(crate) fn relayed(&mut self, stats: RelayStats) {
        self.up += stats.up;
        self.down += stats.down;
        self.label = stats.end.as_str();
        if let RelayEnd::Error(e) = &stats.end {
            self.reason = reason(e);
            if is_expected(e) {
                // A reset, or a TCP close without TLS close_notify: how many
                // clients end a session. Not an error of anyone's.
                self.label = "closed";
            }
        }
    }

    /// Bytes the session moved before its relay (an HTTP request head).
    pub(crate) fn count_up(&mut self, n: usize) {
        self.up += n as u64;
    }

    /// Bytes the session sent before (or instead of) a relay: an answer.
    pub(crate) fn count_down(&mut self, n: usize) {
        self.down += n as u64;
    }

    pub(crate) fn log(&self) {
        // tracing fixes an event's level at compile time: one field list, two levels.
        macro_rules! line {
            ($level:ident) => {
                $level!(
                    bytes.up = self.up,
                    bytes.down = self.down,
                    duration_ms = self.started.elapsed().as_millis() as u64,
                    outcome = %self.label,
                    reason = self.reason.as_deref(),
                    "session closed"
                )
            };
        }
        if self.warn {
            line!(warn);
        } else {
            line!(info);
        }
    }
}

/// What the log says of an I/O error that ended a session. An expected one
/// is not worth rustls's text (its close_notify error carries a
/// documentation URL): a reset says so in a word, and a TCP close without
/// close_notify is a plain close, no reason at all.
pub(crate) fn reason(e: &io::Error) -> Option<String> {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => None,
        kind if is_expected(e) => Some(kind.to_string()),
        _ => Some(e.to_string()),
    }
}

/// Resets, EOFs and timeouts are the network being the network: debug, not warn.
pub(crate) fn is_expected(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}
