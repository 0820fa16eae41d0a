//! The accept loop of one bound address: a permit of `max_connections`,
//! the client address's limits ([`super::limiter`]), then one tracked task
//! per connection (`session`), inside the connection's span.
//!
//! An address over its limits is turned away here, before any task exists
//! for it: where the server speaks first it hears its protocol's "try
//! later", port 80 its 429. So is every client of a drained listener
//! (`portcullis drain`): its sockets stay bound and keep accepting, so no
//! connection waits in the kernel's queue, and each hears its protocol's
//! goodbye where the server speaks first, or is closed at once.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::context::{ListenerCtx, Stop};
use super::http;
use super::limiter::Refusal;
use super::session::{connection, Held};
use crate::protocol::{self, Protocol, TlsMode};

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
                failing |= accept_failed(&e, &tcp, &ctx);
                // EMFILE and friends: back off instead of spinning on the error.
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
        if ctx.gate.is_drained() {
            drained(socket, &ctx);
            drop(permit);
            continue;
        }
        let slot = match ctx.limiter.admit(peer.ip(), &ctx.listener.limits) {
            Ok(slot) => slot,
            Err(refusal) => {
                turn_away(socket, &ctx, refusal, permit, &tracker);
                continue;
            }
        };
        ctx.metrics.connections.inc();
        let registered = ctx.runtime.register(ctx.gate.clone(), peer);
        let span = tracing::info_span!(
            "conn",
            session = %registered.id(),
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
            session: registered,
        };
        tracker.spawn(connection(socket, peer, ctx, stop, held).instrument(span));
    }
}

/// Logs a failed accept; true when it means the address is not serving
/// (out of descriptors or memory), which its health and metrics then say.
/// A connection aborted before accept is not the listener's fault.
fn accept_failed(e: &io::Error, tcp: &TcpListener, ctx: &ListenerCtx) -> bool {
    warn!(listener = %ctx.listener.name, error = %e, "accept failed");
    use rustix::io::Errno;
    let exhausted = matches!(
        Errno::from_io_error(e),
        Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
    );
    match (exhausted, tcp.local_addr()) {
        (true, Ok(local)) => {
            ctx.metrics
                .all()
                .accepting(&ctx.listener.name, local, false);
            true
        }
        _ => false,
    }
}

/// Turns away a client of a drained listener: its protocol's goodbye where
/// the server speaks first (never waiting, as [`turn_away`]), then close.
fn drained(socket: TcpStream, ctx: &ListenerCtx) {
    debug!(listener = %ctx.listener.name, "turned away: listener drained");
    if ctx.listener.tls == TlsMode::Starttls {
        if let Some(words) = protocol::unavailable(ctx.listener.protocol, &ctx.hostname) {
            let _ = socket.try_write(&words);
        }
    }
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
            let answer = http::too_many(refusal.reason.phrase(), refusal.reason.retry_after());
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
