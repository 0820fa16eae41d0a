//! The async driver of the plaintext dialogues in [`crate::protocol`]: it
//! owns the client socket until the upgrade, feeds the dialogue whole lines and
//! carries out its actions, under one deadline for the whole phase.
//!
//! The STARTTLS boundary is a security boundary (CVE-2011-0411 and the 2021
//! "NO STARTTLS" study): any byte that follows the STARTTLS command before the
//! TLS handshake ends the session. We check twice: bytes already buffered
//! behind the command line, and — after our "go ahead" — that the first byte
//! the client sends starts a TLS handshake record. Nothing of the plaintext
//! phase reaches TLS or the backend; the dialogue and its buffer are dropped
//! at the upgrade.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::protocol::line::LineBuf;
use crate::protocol::{Action, Dialogue};

/// TLS record type of a handshake message: the first byte of a ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How the plaintext phase ended.
#[derive(Debug)]
pub enum Phase {
    /// STARTTLS accepted and a ClientHello is arriving; the TLS handshake must
    /// finish by `deadline` (one deadline from the "go ahead" to its end).
    Upgrade {
        socket: TcpStream,
        deadline: Instant,
    },
    /// SMTP without TLS where that is allowed: see [`Action::PassThrough`].
    /// `pending` is what the client sent after the first forwarded line.
    PassThrough {
        socket: TcpStream,
        hello: Vec<u8>,
        line: Vec<u8>,
        pending: Vec<u8>,
    },
    /// The dialogue closed the session (QUIT, errors, deadline, shutdown).
    Ended,
}

/// Where the conversation itself stopped; the caller adds deadlines and goodbyes.
enum Step {
    /// The client left, or a read or write failed.
    Gone,
    /// Send this, then close.
    Close(Vec<u8>),
    Upgrade,
    PassThrough {
        hello: Vec<u8>,
        line: Vec<u8>,
        pending: Vec<u8>,
    },
}

/// Writes `bytes` and closes, within 5 s; errors mean the client is gone already.
pub async fn close_with<S: AsyncWrite + Unpin>(socket: &mut S, bytes: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = socket.write_all(bytes).await;
        let _ = socket.shutdown().await;
    })
    .await;
}

/// Runs the dialogue from greeting to upgrade (or goodbye). Everything —
/// reads and writes alike — happens before `deadline` and gives way to `stop`,
/// so a client that sends but never reads cannot hold the session.
pub async fn dialogue(
    mut socket: TcpStream,
    d: &mut dyn Dialogue,
    deadline: Duration,
    handshake: Duration,
    stop: &CancellationToken,
) -> Phase {
    let until = Instant::now() + deadline;
    let step = tokio::select! {
        r = tokio::time::timeout_at(until, converse(&mut socket, d)) => Some(r),
        _ = stop.cancelled() => None,
    };
    match step {
        None => {
            close_with(&mut socket, &d.shutting_down()).await;
            Phase::Ended
        }
        Some(Err(_)) => {
            info!(deadline = ?deadline, "plaintext dialogue timed out");
            close_with(&mut socket, &d.timed_out()).await;
            Phase::Ended
        }
        Some(Ok(Step::Gone)) => Phase::Ended,
        Some(Ok(Step::Close(r))) => {
            close_with(&mut socket, &r).await;
            Phase::Ended
        }
        Some(Ok(Step::Upgrade)) => {
            let deadline = Instant::now() + handshake;
            expect_client_hello(socket, d, deadline).await
        }
        Some(Ok(Step::PassThrough {
            hello,
            line,
            pending,
        })) => Phase::PassThrough {
            socket,
            hello,
            line,
            pending,
        },
    }
}

async fn converse(socket: &mut TcpStream, d: &mut dyn Dialogue) -> Step {
    if socket.write_all(&d.greeting()).await.is_err() {
        return Step::Gone;
    }
    let mut lines = LineBuf::new(d.line_limit());
    let mut buf = [0u8; 1024];
    loop {
        while let Some(line) = lines.next_line() {
            let Ok(line) = line else {
                info!(limit = d.line_limit(), "command line too long");
                return Step::Close(d.too_long());
            };
            match d.line(&line) {
                Action::Reply(r) => {
                    if socket.write_all(&r).await.is_err() {
                        return Step::Gone;
                    }
                }
                Action::Close(r) => {
                    debug!("dialogue closed the session");
                    return Step::Close(r);
                }
                Action::StartTls(r) => {
                    if !lines.pending().is_empty() {
                        warn!(
                            bytes = lines.pending().len(),
                            "command pipelined after STARTTLS"
                        );
                        return Step::Close(d.injected(lines.pending()));
                    }
                    if socket.write_all(&r).await.is_err() {
                        return Step::Gone;
                    }
                    return Step::Upgrade;
                }
                Action::PassThrough { hello, line } => {
                    return Step::PassThrough {
                        hello,
                        line,
                        pending: lines.take_pending(),
                    };
                }
            }
        }
        match socket.read(&mut buf).await {
            Ok(0) => {
                debug!("client left during the plaintext dialogue");
                return Step::Gone;
            }
            Ok(n) => lines.push(&buf[..n]),
            Err(e) => {
                debug!(error = %e, "client read failed during the plaintext dialogue");
                return Step::Gone;
            }
        }
    }
}

/// After "go ahead": the next byte must open a TLS handshake record. Anything
/// else is a command smuggled behind STARTTLS and ends the session.
async fn expect_client_hello(
    mut socket: TcpStream,
    d: &mut dyn Dialogue,
    deadline: Instant,
) -> Phase {
    let mut first = [0u8; 512];
    match tokio::time::timeout_at(deadline, socket.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 && first[0] == TLS_HANDSHAKE_RECORD => {
            Phase::Upgrade { socket, deadline }
        }
        Ok(Ok(0)) => {
            debug!("client left after STARTTLS");
            Phase::Ended
        }
        Ok(Ok(n)) => {
            warn!(
                bytes = n,
                "plaintext instead of a TLS handshake after STARTTLS"
            );
            close_with(&mut socket, &d.injected(&first[..n])).await;
            Phase::Ended
        }
        Ok(Err(e)) => {
            debug!(error = %e, "client read failed after STARTTLS");
            Phase::Ended
        }
        Err(_) => {
            info!("TLS handshake timed out");
            Phase::Ended
        }
    }
}
