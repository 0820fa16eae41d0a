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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::protocol::line::{LineBuf, TooLong};
use crate::protocol::{Action, Dialogue};

/// TLS record type of a handshake message: the first byte of a ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How the plaintext phase ended.
#[derive(Debug)]
pub enum Phase {
    /// STARTTLS accepted: the socket is ready for the TLS handshake.
    Upgrade(TcpStream),
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

/// Writes `bytes` and closes; errors mean the client is gone already.
async fn close_with(socket: &mut TcpStream, bytes: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = socket.write_all(bytes).await;
        let _ = socket.shutdown().await;
    })
    .await;
}

/// Runs the dialogue from greeting to upgrade (or goodbye).
pub async fn dialogue(
    mut socket: TcpStream,
    d: &mut dyn Dialogue,
    deadline: Duration,
    handshake: Duration,
    stop: &CancellationToken,
) -> Phase {
    let until = Instant::now() + deadline;
    if socket.write_all(&d.greeting()).await.is_err() {
        return Phase::Ended;
    }
    let mut lines = LineBuf::new(d.line_limit());
    let mut buf = [0u8; 1024];
    loop {
        while let Some(line) = lines.next_line() {
            let line = match line {
                Ok(l) => l,
                Err(TooLong) => {
                    info!(limit = d.line_limit(), "command line too long");
                    close_with(&mut socket, &d.too_long()).await;
                    return Phase::Ended;
                }
            };
            match d.line(&line) {
                Action::Reply(r) => {
                    if socket.write_all(&r).await.is_err() {
                        return Phase::Ended;
                    }
                }
                Action::Close(r) => {
                    debug!("dialogue closed the session");
                    close_with(&mut socket, &r).await;
                    return Phase::Ended;
                }
                Action::StartTls(r) => {
                    if !lines.pending().is_empty() {
                        warn!(
                            bytes = lines.pending().len(),
                            "command pipelined after STARTTLS"
                        );
                        close_with(&mut socket, &d.injected(lines.pending())).await;
                        return Phase::Ended;
                    }
                    if socket.write_all(&r).await.is_err() {
                        return Phase::Ended;
                    }
                    return expect_client_hello(socket, d, handshake).await;
                }
                Action::PassThrough { hello, line } => {
                    return Phase::PassThrough {
                        socket,
                        hello,
                        line,
                        pending: lines.take_pending(),
                    };
                }
            }
        }
        let read = tokio::select! {
            r = tokio::time::timeout_at(until, socket.read(&mut buf)) => r,
            _ = stop.cancelled() => {
                close_with(&mut socket, &d.shutting_down()).await;
                return Phase::Ended;
            }
        };
        match read {
            Ok(Ok(0)) => {
                debug!("client left during the plaintext dialogue");
                return Phase::Ended;
            }
            Ok(Ok(n)) => lines.push(&buf[..n]),
            Ok(Err(e)) => {
                debug!(error = %e, "client read failed during the plaintext dialogue");
                return Phase::Ended;
            }
            Err(_) => {
                info!(deadline = ?deadline, "plaintext dialogue timed out");
                close_with(&mut socket, &d.timed_out()).await;
                return Phase::Ended;
            }
        }
    }
}

/// After "go ahead": the next byte must open a TLS handshake record. Anything
/// else is a command smuggled behind STARTTLS and ends the session.
async fn expect_client_hello(
    mut socket: TcpStream,
    d: &mut dyn Dialogue,
    handshake: Duration,
) -> Phase {
    let mut first = [0u8; 512];
    match tokio::time::timeout(handshake, socket.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 && first[0] == TLS_HANDSHAKE_RECORD => Phase::Upgrade(socket),
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
