//! The backend side of a session: connect and send the PROXY header under
//! one deadline, read the backend's greeting (or one SMTP reply), and open a
//! plaintext SMTP session (greeting, the client's own EHLO).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::proxy_header::{self, TlsFacts};
use crate::config::{Backend, ProxyProtocol};
use crate::protocol::{self, BackendGreeting};

/// Connects to the backend and sends its PROXY header; `facts` describe the
/// client's TLS session, `None` for a plaintext one.
pub(crate) async fn connect(
    backend: &Backend,
    peer: SocketAddr,
    local: SocketAddr,
    facts: Option<&TlsFacts<'_>>,
) -> io::Result<TcpStream> {
    let header = match backend.proxy_protocol {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => Some(proxy_header::v1(peer, local)),
        ProxyProtocol::V2 => Some(proxy_header::v2(peer, local, facts)?),
    };
    // One deadline for the connect and the header: a backend that accepts but
    // never reads must not hold the session.
    let open = async {
        let mut stream = TcpStream::connect(backend.address).await?;
        let _ = stream.set_nodelay(true);
        if let Some(h) = header {
            stream.write_all(&h).await?;
        }
        Ok(stream)
    };
    tokio::time::timeout(backend.connect_timeout, open)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", backend.connect_timeout),
            )
        })?
}

/// Longest backend greeting accepted (Postfix's multi-line banners are short).
const GREETING_LIMIT: usize = 16 * 1024;

/// Reads the backend's greeting or one SMTP reply; returns it and any bytes
/// that came after it.
pub(super) async fn read_reply(
    upstream: &mut TcpStream,
    kind: BackendGreeting,
    limit: Duration,
) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            let end = match kind {
                BackendGreeting::DropSmtpReply => protocol::smtp::reply_len(&buf),
                BackendGreeting::DropLine => buf.iter().position(|&b| b == b'\n').map(|i| i + 1),
                BackendGreeting::Keep => Some(0), // nothing to wait for
            };
            if let Some(end) = end {
                let rest = buf.split_off(end);
                return Ok((buf, rest));
            }
            if buf.len() > GREETING_LIMIT {
                return Err(io::Error::other("backend greeting too long"));
            }
            let n = upstream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "backend closed before its greeting",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "backend greeting timed out"))?
}

/// SMTP 2xx, IMAP `* OK`, POP3 `+OK`: the backend is willing.
pub(super) fn is_positive(reply: &[u8]) -> bool {
    reply.starts_with(b"2") || reply.starts_with(b"* OK") || reply.starts_with(b"+OK")
}

/// Why a plaintext backend session could not be opened.
pub(super) enum Opened {
    Failed(io::Error),
    /// The backend's own negative reply, for the client to hear.
    Refused(Vec<u8>),
}

/// Connects, sends the PROXY header, takes the greeting and answers it with
/// the client's HELO/EHLO; both replies must be positive.
pub(super) async fn open_plaintext(
    backend: &Backend,
    peer: SocketAddr,
    local: SocketAddr,
    hello: &[u8],
    limit: Duration,
) -> Result<TcpStream, Opened> {
    let mut upstream = connect(backend, peer, local, None)
        .await
        .map_err(Opened::Failed)?;
    let smtp = BackendGreeting::DropSmtpReply;
    let (greeting, _) = read_reply(&mut upstream, smtp, limit)
        .await
        .map_err(Opened::Failed)?;
    if !is_positive(&greeting) {
        return Err(Opened::Refused(greeting));
    }
    upstream.write_all(hello).await.map_err(Opened::Failed)?;
    let (reply, _) = read_reply(&mut upstream, smtp, limit)
        .await
        .map_err(Opened::Failed)?;
    if !is_positive(&reply) {
        return Err(Opened::Refused(reply));
    }
    Ok(upstream)
}
