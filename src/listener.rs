//! Accept loops and the life of one connection:
//!
//! ```text
//! accept ─(starttls: plaintext dialogue)─▶ ClientHello ─▶ host lookup ─▶ handshake
//!         timeouts.dialogue                 └──── one deadline: timeouts.handshake ───┘
//!   ─▶ backend connect ─▶ PROXY header ─(starttls: drop the backend's greeting)─▶ relay
//!      connect_timeout                                                          idle timeout
//! ```
//!
//! An SMTP listener with `require_tls: false` may instead hand a client that
//! never says STARTTLS to the default host's backend in plaintext.
//!
//! Every phase has a deadline; every connection has one tracing span with
//! `listener`, `client.addr`, then `sni`, `tls.version` and `backend` as they
//! become known. A connection holds a permit of the global connection limit
//! and a slot of its address's limits ([`crate::limiter`]) for as long as it
//! lives; an address over its limits is turned away at accept, before any
//! task exists for it.
//!
//! Mail listeners refuse a ClientHello whose ALPN offers only protocols they
//! do not speak (the ALPACA attack): a browser sent to a mail port must not
//! get a TLS session with the mail server's certificate.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::server::Acceptor;
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::acme::challenge::{Challenges, ACME_TLS_ALPN};
use crate::config::{Backend, Listener, ProxyProtocol, Timeouts};
use crate::limiter::{ClientLimiter, Refusal, Slot};
use crate::metrics::ListenerMetrics;
use crate::protocol::{BackendGreeting, Protocol, TlsMode};
use crate::proxy_header::{self, TlsFacts};
use crate::read_ahead::ReadAhead;
use crate::relay::{self, RelayEnd};
use crate::starttls::{self, Phase};
use crate::tls::hosts::{Host, HostTable, Matched};
use crate::{protocol, tls};

/// A TLS alert record: fatal `unrecognized_name` (RFC 6066 §3), sent when
/// `unknown_sni: reject` refuses a name before any handshake state exists.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// A TLS alert record: fatal `no_application_protocol` (RFC 7301 §3.2), sent
/// when a ClientHello offers ALPN and none of it is the listener's.
const ALERT_NO_APPLICATION_PROTOCOL: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x78];

/// What every connection of one listener needs.
#[derive(Debug)]
pub struct ListenerCtx {
    pub listener: Listener,
    /// Its certificate resolver looks names up in `table`, the very
    /// snapshot connections route with: certificate and route cannot come
    /// from two different configurations.
    pub tls: Arc<ServerConfig>,
    pub table: Arc<HostTable>,
    pub timeouts: Timeouts,
    /// The name STARTTLS greetings and SMTP goodbyes use before SNI is known.
    pub hostname: String,
    /// Open ACME challenges: http-01 tokens, tls-alpn-01 certificates.
    pub challenges: Arc<Challenges>,
    pub metrics: Arc<ListenerMetrics>,
    /// Open connections and handshake buckets per client address: one per
    /// listener name, handed on by reloads so the counts stay right.
    pub limiter: Arc<ClientLimiter>,
}

/// Cancellation for the two stages of shutdown.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    /// Stop accepting; abandon connections still before their relay.
    pub accepting: CancellationToken,
    /// The grace period is over: end relays too.
    pub relays: CancellationToken,
}

/// Accepts until `listen` fires (a child of `stop.accepting`, or the
/// address left the config); each connection becomes a tracked
/// task with the listener settings current when it was accepted (a reload
/// swaps them for later connections only).
pub async fn accept_loop(
    tcp: TcpListener,
    settings: Arc<ArcSwap<ListenerCtx>>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: Stop,
    listen: CancellationToken,
) {
    let mut failing = false;
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // the semaphore is never closed; nothing to serve without it
            },
            _ = listen.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = tcp.accept() => a,
            _ = listen.cancelled() => return,
        };
        let ctx = settings.load_full();
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                warn!(listener = %ctx.listener.name, error = %e, "accept failed");
                // Out of descriptors or memory: the address is not serving.
                // (A connection aborted before accept is not the listener's fault.)
                use rustix::io::Errno;
                let exhausted = matches!(
                    Errno::from_io_error(&e),
                    Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
                );
                if let (true, Ok(local)) = (exhausted, tcp.local_addr()) {
                    ctx.metrics
                        .all()
                        .accepting(&ctx.listener.name, local, false);
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if failing {
            if let Ok(local) = tcp.local_addr() {
                ctx.metrics.all().accepting(&ctx.listener.name, local, true);
            }
            failing = false;
        }
        let slot = match ctx.limiter.admit(peer.ip(), &ctx.listener.limits) {
            Ok(slot) => slot,
            Err(refusal) => {
                turn_away(socket, &ctx, refusal, permit, &tracker);
                continue;
            }
        };
        ctx.metrics.connections.inc();
        let span = tracing::info_span!(
            "conn",
            listener = %ctx.listener.name,
            client.addr = %peer,
            sni = tracing::field::Empty,
            tls.version = tracing::field::Empty,
            backend = tracing::field::Empty,
        );
        let stop = stop.clone();
        let held = Held {
            _permit: permit,
            _slot: slot,
        };
        tracker.spawn(connection(socket, peer, ctx, stop, held).instrument(span));
    }
}

/// What a connection holds for as long as it lives: its share of
/// `max_connections` and of its address's `connections_per_ip`.
struct Held {
    _permit: OwnedSemaphorePermit,
    /// `None` for an exempt address.
    _slot: Option<Slot>,
}

/// Turns away a client over its address's limits, without waiting for it:
/// where the server speaks first, the protocol's "try later" goes into the
/// socket's send buffer if it fits (a fresh socket's always does), then the
/// socket closes; implicit TLS just closes. Port 80 gets its 429 from a
/// short-lived task (see [`linger`]).
fn turn_away(
    socket: TcpStream,
    ctx: &ListenerCtx,
    refusal: Refusal,
    permit: OwnedSemaphorePermit,
    tracker: &TaskTracker,
) {
    ctx.metrics.refused(refusal.reason.label());
    let words = match (ctx.listener.protocol, ctx.listener.tls) {
        (Protocol::Http, _) => {
            let answer =
                crate::http::too_many(refusal.reason.phrase(), refusal.reason.retry_after());
            // The client has sent its request already: closed unread, the
            // kernel would answer with a reset, and the client might drop
            // the 429 with it. A second at most, and only so many at once
            // (none of them holds a share of max_connections).
            drop(permit);
            if let Ok(lingering) = LINGERING.try_acquire() {
                tracker.spawn(linger(socket, answer, lingering));
            } else {
                let _ = socket.try_write(&answer);
            }
            return;
        }
        (protocol, TlsMode::Starttls) => {
            protocol::too_many(protocol, &ctx.hostname, refusal.reason.phrase())
        }
        _ => None,
    };
    if let Some(words) = words {
        // Never waits: an accepted stream starts out writable, and a short
        // write just loses the words, not the close.
        let _ = socket.try_write(&words);
    }
    drop(permit);
}

/// Writes `answer`, says it is done (FIN), and reads what the client sent
/// until it closes too, for a second at most; then closes.
async fn linger(
    mut socket: TcpStream,
    answer: Vec<u8>,
    _lingering: tokio::sync::SemaphorePermit<'static>,
) {
    let _ = tokio::time::timeout(LINGER, async {
        socket.write_all(&answer).await?;
        socket.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut left = LINGER_READ;
        while left > 0 {
            match socket.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<(), io::Error>(())
    })
    .await;
}

/// Turned-away port-80 clients read from at once, at most.
static LINGERING: Semaphore = Semaphore::const_new(64);

/// How long, and how much, a turned-away port-80 client is read from.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_READ: usize = 16 * 1024;

/// Why a connection ended before its relay began.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("TLS handshake failed")]
    Handshake(#[source] io::Error),
    #[error("unknown SNI refused")]
    UnknownSni,
    /// The reason names what was offered and what the listener speaks.
    #[error("ALPN refused: {0}")]
    Alpn(String),
    #[error("shutting down")]
    Shutdown,
    /// An `acme-tls/1` handshake: answered (or not) and done.
    #[error("acme-tls/1 challenge")]
    Challenge(Result<(), io::Error>),
    #[error("acme-tls/1 handshake for a name with no open challenge")]
    NoChallenge,
}

/// The handshake: ClientHello, host lookup, rest of the handshake, under one deadline.
async fn handshake(
    socket: TcpStream,
    ctx: &ListenerCtx,
    deadline: tokio::time::Instant,
) -> Result<(TlsStream<ReadAhead>, Arc<Host>, Matched), Refused> {
    let work = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), ReadAhead::new(socket))
            .await
            .map_err(Refused::Handshake)?;
        let hello = start.client_hello();
        let sni = hello.server_name().map(str::to_owned);
        if let Some(sni) = &sni {
            tracing::Span::current().record("sni", sni.as_str());
        }
        // tls-alpn-01 (RFC 8737): the CA's validator offers acme-tls/1 and
        // nothing else. Answered before the normal lookup, then closed.
        if ctx.listener.tls == TlsMode::Implicit && only_acme_tls(hello.alpn()) {
            let cert = sni.as_deref().and_then(|n| ctx.challenges.tls_alpn(n));
            let Some(cert) = cert else {
                return Err(Refused::NoChallenge);
            };
            return Err(Refused::Challenge(answer_challenge(start, cert, ctx).await));
        }
        // ALPACA (RFC 9325 §3.8): refused before any certificate is chosen.
        if let Some(why) = alpn_refusal(hello.alpn(), &ctx.listener.alpn) {
            let mut socket = start.io;
            let _ = socket.write_all(&ALERT_NO_APPLICATION_PROTOCOL).await;
            return Err(Refused::Alpn(why));
        }
        // One snapshot of the host table for both the certificate and the
        // route: a reload landing mid-handshake cannot pair them across two.
        let (host, matched) = ctx.table.lookup(sni.as_deref());
        let Some(host) = host else {
            let mut socket = start.io;
            let _ = socket.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            return Err(Refused::UnknownSni);
        };
        // The listener's config resolves the certificate from the same
        // table snapshot (see `ListenerCtx::tls`): the routed host's.
        let stream = start
            .into_stream(ctx.tls.clone())
            .await
            .map_err(Refused::Handshake)?;
        Ok((stream, host, matched))
    };
    match tokio::time::timeout_at(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(Refused::HandshakeTimeout),
    }
}

/// Why a ClientHello's ALPN offer is refused, if it is: it offers
/// protocols and none is one of `speaks`. A client that sends no ALPN (most
/// mail clients) is never refused, nor anyone on a listener with an empty
/// list (`tcp` without `alpn`, or `alpn: []`).
fn alpn_refusal<'a>(
    offered: Option<impl Iterator<Item = &'a [u8]>>,
    speaks: &[Vec<u8>],
) -> Option<String> {
    if speaks.is_empty() {
        return None;
    }
    let offered: Vec<&[u8]> = offered?.collect();
    if offered.iter().any(|o| speaks.iter().any(|s| s == o)) {
        return None;
    }
    Some(format!(
        "client offered {}; this listener speaks {}",
        alpn_names(offered.iter().copied()),
        alpn_names(speaks.iter().map(Vec::as_slice)),
    ))
}

/// ALPN IDs for a log line: escaped, and at most eight of them.
fn alpn_names<'a>(ids: impl ExactSizeIterator<Item = &'a [u8]>) -> String {
    const SHOWN: usize = 8;
    let total = ids.len();
    let mut out: Vec<String> = ids
        .take(SHOWN)
        .map(|id| id.escape_ascii().to_string())
        .collect();
    if total == 0 {
        return "an empty list".to_string();
    }
    if total > SHOWN {
        out.push(format!("and {} more", total - SHOWN));
    }
    out.join(", ")
}

fn only_acme_tls<'a>(alpn: Option<impl Iterator<Item = &'a [u8]>>) -> bool {
    let mut protocols = match alpn {
        Some(p) => p,
        None => return false,
    };
    protocols.next() == Some(ACME_TLS_ALPN) && protocols.next().is_none()
}

/// Completes an `acme-tls/1` handshake with the challenge certificate, then
/// closes: the validator only looks at the certificate.
async fn answer_challenge(
    start: tokio_rustls::StartHandshake<ReadAhead>,
    cert: Arc<rustls::sign::CertifiedKey>,
    ctx: &ListenerCtx,
) -> Result<(), io::Error> {
    let mut config = ServerConfig::builder_with_provider(ctx.tls.crypto_provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(cert)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    let mut stream = start.into_stream(Arc::new(config)).await?;
    stream.shutdown().await
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

/// What a connection hands the relay once every check has passed.
pub(crate) enum Ready {
    Tls(Box<TlsStream<ReadAhead>>, TcpStream),
    Plain(TcpStream, TcpStream),
}

/// What the one line at a connection's end says. Listener, client address,
/// SNI, TLS version and backend are on the connection's span.
#[derive(Debug)]
pub(crate) struct Session {
    started: Instant,
    up: u64,
    down: u64,
    outcome: &'static str,
    reason: Option<String>,
    /// The outcome is the operator's business (a backend down), not the
    /// client's (a scanner's failed handshake).
    warn: bool,
}

impl Session {
    fn new() -> Session {
        Session {
            started: Instant::now(),
            up: 0,
            down: 0,
            outcome: "closed",
            reason: None,
            warn: false,
        }
    }

    /// Ends the session before its relay.
    pub(crate) fn end(&mut self, outcome: &'static str, reason: impl Into<Option<String>>) {
        self.outcome = outcome;
        self.reason = reason.into();
    }

    /// Like [`Session::end`], for outcomes the operator should look at.
    pub(crate) fn fail(&mut self, outcome: &'static str, reason: String) {
        self.end(outcome, reason);
        self.warn = true;
    }

    fn relayed(&mut self, stats: relay::RelayStats) {
        self.up += stats.up;
        self.down += stats.down;
        self.outcome = stats.end.as_str();
        if let RelayEnd::Error(e) = &stats.end {
            self.reason = Some(e.to_string());
            if is_expected(e) {
                // A reset, or a TCP close without TLS close_notify: how many
                // clients end a session. Not an error of anyone's.
                self.outcome = "closed";
            }
        }
    }

    /// Bytes the session moved before its relay (an HTTP request head).
    pub(crate) fn count_up(&mut self, n: usize) {
        self.up += n as u64;
    }

    fn log(&self) {
        // tracing fixes an event's level at compile time: one field list, two levels.
        macro_rules! line {
            ($level:ident) => {
                $level!(
                    bytes.up = self.up,
                    bytes.down = self.down,
                    duration_ms = self.started.elapsed().as_millis() as u64,
                    outcome = %self.outcome,
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

/// One connection, start to end. The checks before the relay run boxed, so
/// a session that has reached its relay (and may idle in it for hours)
/// keeps only the relay's state in its task.
async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    stop: Stop,
    _held: Held,
) {
    let open = Open::new(ctx.metrics.clone());
    let mut session = Session::new();
    let ready = Box::pin(prepare(socket, peer, &ctx, &stop, &mut session)).await;
    let idle = ctx.timeouts.idle;
    // The context holds the host table, certificates and keys of the
    // configuration this connection was accepted under: a session that
    // idles for days must not keep an old configuration alive.
    drop(ctx);
    let metrics = &open.0;
    let meter = relay::Meter {
        up: &metrics.up,
        down: &metrics.down,
    };
    match ready {
        Some(Ready::Tls(client, upstream)) => {
            session.relayed(relay::relay(client, upstream, idle, &stop.relays, meter).await)
        }
        Some(Ready::Plain(client, upstream)) => {
            session.relayed(relay::relay(client, upstream, idle, &stop.relays, meter).await)
        }
        None => {}
    }
    session.log();
    metrics.session(session.outcome);
}

/// Counts a connection in `connections_open` for as long as it lives,
/// however it ends.
struct Open(Arc<ListenerMetrics>);

impl Open {
    fn new(metrics: Arc<ListenerMetrics>) -> Open {
        metrics.open.inc();
        Open(metrics)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.dec();
    }
}

/// Everything before the relay: dialogue, handshake, routing, backend.
async fn prepare(
    socket: TcpStream,
    peer: SocketAddr,
    ctx: &ListenerCtx,
    stop: &Stop,
    session: &mut Session,
) -> Option<Ready> {
    let _ = socket.set_nodelay(true);
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            session.end("client_left", e.to_string());
            return None;
        }
    };
    if ctx.listener.protocol == Protocol::Http {
        return crate::http::serve(socket, peer, local, ctx, stop, session).await;
    }
    let mut greeting = BackendGreeting::Keep;
    let (socket, deadline) = if ctx.listener.tls == TlsMode::Starttls {
        let mut dialogue = protocol::dialogue(
            ctx.listener.protocol,
            &ctx.hostname,
            ctx.listener.require_tls,
        )?;
        greeting = dialogue.backend_greeting();
        let phase = starttls::dialogue(
            socket,
            dialogue.as_mut(),
            ctx.timeouts.dialogue,
            ctx.timeouts.handshake,
            &stop.accepting,
        )
        .await;
        match phase {
            Phase::Upgrade { socket, deadline } => {
                ctx.metrics.starttls.inc();
                (socket, deadline)
            }
            Phase::PassThrough {
                socket,
                hello,
                line,
                pending,
            } => {
                let opening = Opening {
                    hello: &hello,
                    line: &line,
                    pending: &pending,
                };
                return plaintext_session(socket, peer, local, ctx, stop, opening, session).await;
            }
            Phase::Ended => {
                session.end("dialogue_ended", None);
                return None;
            }
        }
    } else {
        (socket, tokio::time::Instant::now() + ctx.timeouts.handshake)
    };

    let shaken = tokio::select! {
        r = handshake(socket, ctx, deadline) => r,
        _ = stop.accepting.cancelled() => Err(Refused::Shutdown),
    };
    let handshake_outcome = match &shaken {
        Ok((stream, _, _)) if stream.get_ref().1.server_name().is_none() => Some("no_sni"),
        Ok(_) => Some("ok"),
        Err(Refused::Handshake(e)) if is_expected(e) => Some("client_left"),
        Err(Refused::Handshake(_)) => Some("alert"),
        Err(Refused::HandshakeTimeout) => Some("timeout"),
        Err(Refused::UnknownSni) => Some("unknown_sni"),
        Err(Refused::Alpn(_)) => Some("alpn_refused"),
        Err(_) => None, // ACME validators and shutdown: not client handshakes
    };
    if let Some(outcome) = handshake_outcome {
        ctx.metrics.handshake(outcome);
    }
    let (mut client, host, matched) = match shaken {
        Ok(ok) => ok,
        Err(Refused::Handshake(e)) if is_expected(&e) => {
            session.end("client_left", e.to_string());
            return None;
        }
        Err(Refused::Handshake(e)) => {
            session.end("handshake_failed", e.to_string());
            return None;
        }
        Err(Refused::HandshakeTimeout) => {
            session.end("handshake_timeout", None);
            return None;
        }
        Err(Refused::UnknownSni) => {
            session.end("unknown_sni", None);
            return None;
        }
        Err(Refused::Alpn(why)) => {
            session.end("alpn_refused", why);
            return None;
        }
        Err(Refused::Challenge(Ok(()))) => {
            info!("acme tls-alpn-01 challenge answered");
            session.end("acme_challenge", None);
            return None;
        }
        Err(Refused::Challenge(Err(e))) => {
            session.end("acme_challenge", e.to_string());
            return None;
        }
        Err(r @ Refused::NoChallenge) => {
            session.end("acme_challenge", r.to_string());
            return None;
        }
        Err(Refused::Shutdown) => {
            session.end("shutdown", None);
            return None;
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
        session.fail(
            "no_backend",
            format!("host {} has no backend on this listener", host.label()),
        );
        goodbye(&mut client, ctx, &greeting_name).await;
        return None;
    };
    tracing::Span::current().record("backend", tracing::field::display(backend.address));

    // The backend hears only names the operator configured (Dovecot's
    // local_name): an unknown SNI served by default_host is not passed on.
    let configured = matches!(matched, Matched::Exact | Matched::Wildcard);
    let facts = TlsFacts {
        version,
        cipher: &cipher,
        sni: sni.as_deref().filter(|_| configured),
    };
    let upstream = tokio::select! {
        r = connect(backend, peer, local, Some(&facts)) => r,
        _ = stop.accepting.cancelled() => Err(io::Error::other("shutting down")),
    };
    let mut upstream = match upstream {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics.backend_failed(backend.address);
            session.fail("backend_unavailable", e.to_string());
            goodbye(&mut client, ctx, &greeting_name).await;
            return None;
        }
    };
    if greeting != BackendGreeting::Keep {
        // The client had our greeting before STARTTLS; it must not get a second
        // one, unless it is a refusal: that the client must hear.
        let (words, early) = match read_reply(&mut upstream, greeting, ctx.timeouts.dialogue).await
        {
            Ok(got) => got,
            Err(e) => {
                ctx.metrics.backend_failed(backend.address);
                session.fail("backend_unavailable", format!("no greeting: {e}"));
                goodbye(&mut client, ctx, &greeting_name).await;
                return None;
            }
        };
        if !is_positive(&words) {
            let reply = String::from_utf8_lossy(&words).trim_end().to_string();
            session.fail("backend_refused", reply);
            starttls::close_with(&mut client, &words).await;
            return None;
        }
        if !early.is_empty() && client.write_all(&early).await.is_err() {
            session.end("client_left", None);
            return None;
        }
    }
    debug!(sni.match = matched.as_str(), cipher = %cipher, "relaying");
    Some(Ready::Tls(Box::new(client), upstream))
}

/// What an SMTP client said before it went on without TLS.
struct Opening<'a> {
    hello: &'a [u8],
    line: &'a [u8],
    pending: &'a [u8],
}

/// SMTP without TLS (`require_tls: false`): the default host's backend gets a
/// PROXY header without TLS facts, the client's own HELO/EHLO, then the
/// client's first mail command and everything after it.
async fn plaintext_session(
    mut client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: &ListenerCtx,
    stop: &Stop,
    opening: Opening<'_>,
    session: &mut Session,
) -> Option<Ready> {
    tracing::Span::current().record("tls.version", "none");
    let (host, _) = ctx.table.lookup(None);
    let backend = host.and_then(|h| h.backends.get(&ctx.listener.name).cloned());
    let Some(backend) = backend else {
        session.fail(
            "no_backend",
            "the default host has no backend on this listener".into(),
        );
        starttls::close_with(&mut client, &protocol::smtp::unavailable(&ctx.hostname)).await;
        return None;
    };
    tracing::Span::current().record("backend", tracing::field::display(backend.address));
    let opened = tokio::select! {
        r = open_plaintext(&backend, peer, local, opening.hello, ctx.timeouts.dialogue) => r,
        _ = stop.accepting.cancelled() => Err(Opened::Failed(io::Error::other("shutting down"))),
    };
    let mut upstream = match opened {
        Ok(s) => s,
        Err(Opened::Refused(words)) => {
            // A 554 from postscreen must stay a 554, or the sender retries for days.
            let reply = String::from_utf8_lossy(&words).trim_end().to_string();
            session.fail("backend_refused", reply);
            starttls::close_with(&mut client, &words).await;
            return None;
        }
        Err(Opened::Failed(e)) => {
            ctx.metrics.backend_failed(backend.address);
            session.fail("backend_unavailable", e.to_string());
            starttls::close_with(&mut client, &protocol::smtp::unavailable(&ctx.hostname)).await;
            return None;
        }
    };
    if upstream.write_all(opening.line).await.is_err()
        || upstream.write_all(opening.pending).await.is_err()
    {
        session.fail("backend_unavailable", "backend closed after EHLO".into());
        let _ = client
            .write_all(&protocol::smtp::unavailable(&ctx.hostname))
            .await;
        return None;
    }
    debug!("relaying without TLS");
    Some(Ready::Plain(client, upstream))
}

/// Why a plaintext backend session could not be opened.
enum Opened {
    Failed(io::Error),
    /// The backend's own negative reply, for the client to hear.
    Refused(Vec<u8>),
}

/// Connects, sends the PROXY header, takes the greeting and answers it with
/// the client's HELO/EHLO; both replies must be positive.
async fn open_plaintext(
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

/// SMTP 2xx, IMAP `* OK`, POP3 `+OK`: the backend is willing.
fn is_positive(reply: &[u8]) -> bool {
    reply.starts_with(b"2") || reply.starts_with(b"* OK") || reply.starts_with(b"+OK")
}

/// Longest backend greeting accepted (Postfix's multi-line banners are short).
const GREETING_LIMIT: usize = 16 * 1024;

/// Reads the backend's greeting or one SMTP reply; returns it and any bytes
/// that came after it.
async fn read_reply(
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

/// The protocol's "try later" line, then close_notify and close.
async fn goodbye(client: &mut TlsStream<ReadAhead>, ctx: &ListenerCtx, hostname: &str) {
    let line = protocol::unavailable(ctx.listener.protocol, hostname).unwrap_or_default();
    starttls::close_with(client, &line).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(offered: Option<&[&str]>, speaks: &[&str]) -> Option<String> {
        let speaks: Vec<Vec<u8>> = speaks.iter().map(|s| s.as_bytes().to_vec()).collect();
        alpn_refusal(offered.map(|o| o.iter().map(|s| s.as_bytes())), &speaks)
    }

    #[test]
    fn alpn_offers_are_refused_only_when_nothing_offered_is_spoken() {
        // no ALPN at all: most mail clients
        assert_eq!(refusal(None, &["imap"]), None);
        // iOS Mail on 993; Delta Chat and Dovecot on SMTP ports
        assert_eq!(refusal(Some(&["imap"]), &["imap"]), None);
        assert_eq!(
            refusal(Some(&["h2", "smtp"]), &["smtp", "submission"]),
            None
        );
        // a browser sent to a mail port
        assert_eq!(
            refusal(Some(&["h2", "http/1.1"]), &["imap"]).as_deref(),
            Some("client offered h2, http/1.1; this listener speaks imap")
        );
        assert_eq!(
            refusal(Some(&["imap"]), &["smtp", "submission"]).as_deref(),
            Some("client offered imap; this listener speaks smtp, submission")
        );
        // an empty list on the listener accepts anything (tcp without alpn)
        assert_eq!(refusal(Some(&["h2"]), &[]), None);
        // odd bytes are escaped, long offers cut short
        let many: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let why = refusal(Some(&many), &["pop3"]).unwrap();
        assert!(why.starts_with("client offered p0, p1,"), "{why}");
        assert!(
            why.contains("p7, and 12 more; this listener speaks pop3"),
            "{why}"
        );
        let why =
            alpn_refusal(Some([&b"\x00\n\xff"[..]].into_iter()), &[b"imap".to_vec()]).unwrap();
        assert_eq!(
            why,
            "client offered \\x00\\n\\xff; this listener speaks imap"
        );
        let why = alpn_refusal(Some(std::iter::empty()), &[b"imap".to_vec()]).unwrap();
        assert_eq!(
            why,
            "client offered an empty list; this listener speaks imap"
        );
    }
}
