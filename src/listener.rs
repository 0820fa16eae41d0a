//! Accept loops and the life of one connection on an implicit-TLS listener:
//!
//! ```text
//! accept ─▶ ClientHello ─▶ host lookup ─▶ handshake ─▶ backend connect ─▶ PROXY header ─▶ relay
//!           └──── one deadline: timeouts.handshake ───┘   connect_timeout               idle timeout
//! ```
//!
//! Every phase has a deadline; every connection has one tracing span with
//! `listener`, `client.addr`, then `sni`, `tls.version` and `backend` as they
//! become known. A connection holds a permit of the global connection limit
//! for as long as it lives.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::server::Acceptor;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::{Backend, Listener, ProxyProtocol, Timeouts};
use crate::hosts::{Host, HostTable, Matched};
use crate::proxy_header::{self, TlsFacts};
use crate::relay::{self, RelayEnd};
use crate::{protocol, tls};

/// A TLS alert record: fatal `unrecognized_name` (RFC 6066 §3), sent when
/// `unknown_sni: reject` refuses a name before any handshake state exists.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// What every connection of one listener needs.
#[derive(Debug)]
pub struct ListenerCtx {
    pub listener: Listener,
    pub tls: Arc<ServerConfig>,
    pub table: Arc<ArcSwap<HostTable>>,
    pub timeouts: Timeouts,
}

/// Cancellation for the two stages of shutdown.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    /// Stop accepting; abandon connections still before their relay.
    pub accepting: CancellationToken,
    /// The grace period is over: end relays too.
    pub relays: CancellationToken,
}

/// Accepts until `stop.accepting` fires; each connection becomes a tracked task.
pub async fn accept_loop(
    tcp: TcpListener,
    ctx: Arc<ListenerCtx>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: Stop,
) {
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // the semaphore is never closed; nothing to serve without it
            },
            _ = stop.accepting.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = tcp.accept() => a,
            _ = stop.accepting.cancelled() => return,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                warn!(listener = %ctx.listener.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let span = tracing::info_span!(
            "conn",
            listener = %ctx.listener.name,
            client.addr = %peer,
            sni = tracing::field::Empty,
            tls.version = tracing::field::Empty,
            backend = tracing::field::Empty,
        );
        let ctx = ctx.clone();
        let stop = stop.clone();
        tracker.spawn(connection(socket, peer, ctx, stop, permit).instrument(span));
    }
}

/// Why a connection ended before its relay began.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("TLS handshake failed")]
    Handshake(#[source] io::Error),
    #[error("unknown SNI refused")]
    UnknownSni,
    #[error("shutting down")]
    Shutdown,
}

/// The handshake: ClientHello, host lookup, rest of the handshake, under one deadline.
async fn handshake(
    socket: TcpStream,
    ctx: &ListenerCtx,
) -> Result<(TlsStream<TcpStream>, Arc<Host>, Matched), Refused> {
    let work = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), socket)
            .await
            .map_err(Refused::Handshake)?;
        let sni = start.client_hello().server_name().map(str::to_owned);
        if let Some(sni) = &sni {
            tracing::Span::current().record("sni", sni.as_str());
        }
        let (host, matched) = ctx.table.load().lookup(sni.as_deref());
        let Some(host) = host else {
            let mut socket = start.io;
            let _ = socket.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            return Err(Refused::UnknownSni);
        };
        let stream = start
            .into_stream(ctx.tls.clone())
            .await
            .map_err(Refused::Handshake)?;
        Ok((stream, host, matched))
    };
    match tokio::time::timeout(ctx.timeouts.handshake, work).await {
        Ok(r) => r,
        Err(_) => Err(Refused::HandshakeTimeout),
    }
}

/// Resets, EOFs and timeouts are the network being the network: debug, not warn.
fn is_expected(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    stop: Stop,
    _permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let _ = socket.set_nodelay(true);
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            debug!(error = %e, "connection gone before it could be served");
            return;
        }
    };
    let shaken = tokio::select! {
        r = handshake(socket, &ctx) => r,
        _ = stop.accepting.cancelled() => Err(Refused::Shutdown),
    };
    let (mut client, host, matched) = match shaken {
        Ok(ok) => ok,
        Err(Refused::Handshake(e)) if is_expected(&e) => {
            debug!(error = %e, "client left during the TLS handshake");
            return;
        }
        Err(Refused::Handshake(e)) => {
            info!(error = %e, "TLS handshake failed");
            return;
        }
        Err(r @ Refused::UnknownSni) => {
            info!(sni.match = Matched::Rejected.as_str(), "{r}");
            return;
        }
        Err(r) => {
            info!("{r}");
            return;
        }
    };
    let (_, conn) = client.get_ref();
    let version = conn
        .protocol_version()
        .map(tls::version_name)
        .unwrap_or("unknown");
    let cipher = conn
        .negotiated_cipher_suite()
        .map(tls::cipher_name)
        .unwrap_or_default();
    let sni = conn.server_name().map(str::to_owned);
    tracing::Span::current().record("tls.version", version);

    let greeting_name = sni.clone().unwrap_or_else(|| host.label());
    let Some(backend) = host.backends.get(&ctx.listener.name) else {
        warn!(host = %host.label(), "no backend for this host on this listener");
        goodbye(&mut client, &ctx, &greeting_name).await;
        return;
    };
    tracing::Span::current().record("backend", tracing::field::display(backend.address));

    let facts = TlsFacts {
        version,
        cipher: &cipher,
        sni: sni.as_deref(),
    };
    let upstream = tokio::select! {
        r = connect(backend, peer, local, &facts) => r,
        _ = stop.accepting.cancelled() => Err(io::Error::other("shutting down")),
    };
    let upstream = match upstream {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "backend unavailable");
            goodbye(&mut client, &ctx, &greeting_name).await;
            return;
        }
    };
    debug!(sni.match = matched.as_str(), cipher = %cipher, "relaying");
    let stats = relay::relay(client, upstream, ctx.timeouts.idle, &stop.relays).await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match &stats.end {
        RelayEnd::Error(e) if !is_expected(e) => info!(
            bytes.up = stats.up, bytes.down = stats.down, duration_ms,
            outcome = stats.end.as_str(), error = %e, "session closed"
        ),
        _ => info!(
            bytes.up = stats.up,
            bytes.down = stats.down,
            duration_ms,
            outcome = stats.end.as_str(),
            "session closed"
        ),
    }
}

/// Connects to the backend and sends its PROXY header.
async fn connect(
    backend: &Backend,
    peer: SocketAddr,
    local: SocketAddr,
    facts: &TlsFacts<'_>,
) -> io::Result<TcpStream> {
    let mut stream =
        tokio::time::timeout(backend.connect_timeout, TcpStream::connect(backend.address))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", backend.connect_timeout),
                )
            })??;
    let _ = stream.set_nodelay(true);
    let header = match backend.proxy_protocol {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => Some(proxy_header::v1(peer, local)),
        ProxyProtocol::V2 => Some(proxy_header::v2(peer, local, Some(facts))?),
    };
    if let Some(h) = header {
        stream.write_all(&h).await?;
    }
    Ok(stream)
}

/// The protocol's "try later" line, then close_notify and close.
async fn goodbye(client: &mut TlsStream<TcpStream>, ctx: &ListenerCtx, hostname: &str) {
    if let Some(line) = protocol::unavailable(ctx.listener.protocol, hostname) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = client.write_all(&line).await;
            let _ = client.shutdown().await;
        })
        .await;
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
    }
}
