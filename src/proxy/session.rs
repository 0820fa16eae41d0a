//! The life of one connection, from accept to its `session closed` line:
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
//! `session` (its id in [`super::runtime`]), `listener`, `client.addr`, then
//! `sni`, `tls.version` and `backend` as they become known. A connection
//! holds its place among the live sessions, a permit of the global
//! connection limit and a slot of its address's limits ([`super::limiter`])
//! for as long as it lives; an address over its limits is turned away at
//! accept, before any task exists for it. A drained backend
//! (`portcullis drain`) gets a new session's goodbye instead of a connect.
//!
//! Mail listeners refuse a ClientHello whose ALPN offers only protocols they
//! do not speak (the ALPACA attack): a browser sent to a mail port must not
//! get a TLS session with the mail server's certificate.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::backend::{self, Opened};
use super::context::{ListenerCtx, Stop};
use super::handshake::{self, Client, Refused};
use super::limiter::Slot;
use super::outcome::{Outcome, Ready};
use super::proxy_header::TlsFacts;
use super::relay;
use super::runtime::{Live, Registered};
use super::starttls::{self, Phase};
use super::tls_session::TlsSession;
use crate::metrics::ListenerMetrics;
use crate::protocol::{self, BackendGreeting, Protocol, TlsMode};
use crate::tls;
use crate::tls::hosts::{Host, Matched};

/// What a connection holds for as long as it lives: its share of
/// `max_connections` and of its address's `connections_per_ip`, and its
/// place among the live sessions (`portcullis sessions`).
pub(super) struct Held {
    pub(super) _permit: OwnedSemaphorePermit,
    /// `None` for an exempt address.
    pub(super) _slot: Option<Slot>,
    pub(super) session: Registered,
}

/// One connection, start to end. The checks before the relay run boxed, so
/// a session that has reached its relay (and may idle in it for hours)
/// keeps only the relay's state in its task.
pub(super) async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    stop: Stop,
    held: Held,
) {
    let open = Open::new(ctx.metrics.clone());
    let mut session = Outcome::new();
    let live = held.session.live();
    let ready = Box::pin(prepare(socket, peer, &ctx, &stop, live, &mut session)).await;
    let idle = ctx.timeouts.idle;
    // The context holds the host table, certificates and keys of the
    // configuration this connection was accepted under: a session that
    // idles for days must not keep an old configuration alive.
    drop(ctx);
    let metrics = &open.0;
    let meter = relay::Meter {
        up: &metrics.up,
        down: &metrics.down,
        session: live.bytes(),
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
    metrics.session(session.label);
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

/// A connection as accepted: its two ends, its listener's settings and the
/// shutdown tokens.
struct Accepted<'a> {
    peer: SocketAddr,
    local: SocketAddr,
    ctx: &'a ListenerCtx,
    stop: &'a Stop,
    live: &'a Live,
}

/// Everything before the relay: dialogue, handshake, routing, backend.
async fn prepare(
    socket: TcpStream,
    peer: SocketAddr,
    ctx: &ListenerCtx,
    stop: &Stop,
    live: &Live,
    session: &mut Outcome,
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
        return super::http::serve(socket, peer, local, ctx, stop, live, session).await;
    }
    let at = Accepted {
        peer,
        local,
        ctx,
        stop,
        live,
    };
    let (socket, deadline, greeting) = if ctx.listener.tls == TlsMode::Starttls {
        match before_tls(socket, &at, session).await {
            Ok(upgrade) => upgrade,
            Err(done) => return done,
        }
    } else {
        let deadline = tokio::time::Instant::now() + ctx.timeouts.handshake;
        (socket, deadline, BackendGreeting::Keep)
    };

    // The handshake phase began when its deadline was set.
    let began = deadline
        .checked_sub(ctx.timeouts.handshake)
        .unwrap_or_else(tokio::time::Instant::now);
    let shaken = tokio::select! {
        r = handshake::handshake(socket, ctx, deadline) => r,
        _ = stop.accepting.cancelled() => Err(Refused::Shutdown),
    };
    if let Some(outcome) = handshake::outcome(&shaken) {
        ctx.metrics.handshake(outcome);
    }
    if shaken.is_ok() {
        ctx.metrics.handshake_took(began.elapsed());
    }
    let (client, host, matched) = match shaken {
        Ok(ok) => ok,
        Err(refused) => {
            refused.end(session);
            return None;
        }
    };
    match client {
        Client::Web(client) => {
            let name = client
                .get_ref()
                .1
                .server_name()
                .unwrap_or_default()
                .to_owned();
            super::web::serve(*client, &name, ctx, stop, session).await;
            None
        }
        Client::Relay(client) => routed(client, &host, matched, greeting, &at, session).await,
    }
}

/// A STARTTLS listener's plaintext dialogue, up to the upgrade: the socket,
/// the handshake's deadline and what the backend's greeting is worth then.
/// `Err`: the session went another way (ended, or SMTP without TLS), with
/// what it hands the relay.
async fn before_tls(
    socket: TcpStream,
    at: &Accepted<'_>,
    session: &mut Outcome,
) -> Result<(TcpStream, tokio::time::Instant, BackendGreeting), Option<Ready>> {
    let ctx = at.ctx;
    let Some(mut dialogue) = protocol::dialogue(
        ctx.listener.protocol,
        &ctx.hostname,
        ctx.listener.require_tls,
    ) else {
        return Err(None);
    };
    let phase = starttls::dialogue(
        socket,
        dialogue.as_mut(),
        ctx.timeouts.dialogue,
        ctx.timeouts.handshake,
        &at.stop.accepting,
    )
    .await;
    match phase {
        Phase::Upgrade { socket, deadline } => {
            ctx.metrics.starttls.inc();
            Ok((socket, deadline, dialogue.backend_greeting()))
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
            Err(plaintext_session(socket, at, opening, session).await)
        }
        Phase::Ended => {
            session.end("dialogue_ended", None);
            Err(None)
        }
    }
}

/// After the handshake: the host's backend on this listener, connected,
/// sent the PROXY header with the TLS facts and past its greeting; or the
/// protocol's goodbye.
async fn routed(
    mut client: Box<TlsSession>,
    host: &Host,
    matched: Matched,
    greeting: BackendGreeting,
    at: &Accepted<'_>,
    session: &mut Outcome,
) -> Option<Ready> {
    let ctx = at.ctx;
    let conn = client.state();
    let version = conn
        .protocol_version()
        .map(tls::version_name)
        .unwrap_or("unknown");
    let cipher = conn
        .negotiated_cipher_suite()
        .map(tls::cipher_name)
        .unwrap_or_default();
    let sni = client.server_name().map(str::to_owned);
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
    at.live.routed(sni.as_deref(), backend.address);
    let gate = ctx.runtime.backend(backend.address);
    if gate.as_ref().is_some_and(|g| g.is_drained()) {
        session.end(
            "backend_drained",
            format!("backend {} is drained", backend.address),
        );
        goodbye(&mut client, ctx, &greeting_name).await;
        return None;
    }

    // The backend hears only names the operator configured (Dovecot's
    // local_name): an unknown SNI served by default_host is not passed on.
    let configured = matches!(matched, Matched::Exact | Matched::Wildcard);
    let facts = TlsFacts {
        version,
        cipher: &cipher,
        sni: sni.as_deref().filter(|_| configured),
    };
    let began = tokio::time::Instant::now();
    let upstream = tokio::select! {
        r = backend::connect(backend, at.peer, at.local, Some(&facts)) => r,
        _ = at.stop.accepting.cancelled() => Err(io::Error::other("shutting down")),
    };
    let mut upstream = match upstream {
        Ok(s) => {
            ctx.metrics
                .backend_connected(backend.address, began.elapsed());
            s
        }
        Err(e) => {
            ctx.metrics.backend_failed(backend.address);
            if let Some(g) = &gate {
                g.failed(e.to_string());
            }
            session.fail("backend_unavailable", e.to_string());
            goodbye(&mut client, ctx, &greeting_name).await;
            return None;
        }
    };
    if greeting != BackendGreeting::Keep {
        let backend = backend.address;
        let name = &greeting_name;
        drop_greeting(
            &mut client,
            &mut upstream,
            greeting,
            backend,
            name,
            ctx,
            session,
        )
        .await?;
    }
    debug!(sni.match = matched.as_str(), cipher = %cipher, "relaying");
    Some(Ready::Tls(client, upstream))
}

/// The client had our greeting before STARTTLS: it must not get the
/// backend's too, unless it is a refusal, which the client must hear.
/// `None`: the session is over.
async fn drop_greeting(
    client: &mut TlsSession,
    upstream: &mut TcpStream,
    greeting: BackendGreeting,
    backend: SocketAddr,
    greeting_name: &str,
    ctx: &ListenerCtx,
    session: &mut Outcome,
) -> Option<()> {
    let (words, early) = match backend::read_reply(upstream, greeting, ctx.timeouts.dialogue).await
    {
        Ok(got) => got,
        Err(e) => {
            ctx.metrics.backend_failed(backend);
            if let Some(g) = ctx.runtime.backend(backend) {
                g.failed(format!("no greeting: {e}"));
            }
            session.fail("backend_unavailable", format!("no greeting: {e}"));
            goodbye(client, ctx, greeting_name).await;
            return None;
        }
    };
    if !backend::is_positive(&words) {
        let reply = String::from_utf8_lossy(&words).trim_end().to_string();
        session.fail("backend_refused", reply);
        starttls::close_with(client, &words).await;
        return None;
    }
    if !early.is_empty() && client.write_all(&early).await.is_err() {
        session.end("client_left", None);
        return None;
    }
    Some(())
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
    at: &Accepted<'_>,
    opening: Opening<'_>,
    session: &mut Outcome,
) -> Option<Ready> {
    let ctx = at.ctx;
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
    at.live.routed(None, backend.address);
    let gate = ctx.runtime.backend(backend.address);
    if gate.as_ref().is_some_and(|g| g.is_drained()) {
        session.end(
            "backend_drained",
            format!("backend {} is drained", backend.address),
        );
        starttls::close_with(&mut client, &protocol::smtp::unavailable(&ctx.hostname)).await;
        return None;
    }
    let opened = tokio::select! {
        r = backend::open_plaintext(&backend, at.peer, at.local, opening.hello, ctx.timeouts.dialogue) => r,
        _ = at.stop.accepting.cancelled() => Err(Opened::Failed(io::Error::other("shutting down"))),
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
            if let Some(g) = &gate {
                g.failed(e.to_string());
            }
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

/// The protocol's "try later" line, then close_notify and close.
async fn goodbye(client: &mut TlsSession, ctx: &ListenerCtx, hostname: &str) {
    let line = protocol::unavailable(ctx.listener.protocol, hostname).unwrap_or_default();
    starttls::close_with(client, &line).await;
}
