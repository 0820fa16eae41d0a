//! The byte relay between a client and its backend, both ways, until both
//! sides have closed, the session idles out, or shutdown's grace runs out.
//!
//! Half-close is honoured: when one side stops sending, the other side's write
//! half is shut down and the opposite direction keeps flowing (a client that
//! sends QUIT and shuts down its write side still gets the final reply). Once
//! one direction has ended, the other gets at most [`HALF_CLOSED_IDLE`] of
//! silence, so a peer that never closes cannot pin the session for 31 minutes.
//!
//! Memory: IMAP clients hold thousands of sessions open and silent, so a
//! session owns no relay buffer at all. Both directions are polled by one
//! future; a read goes into a buffer on the stack of the poll and is written
//! on at once. Only when the writer cannot take everything (the other side
//! reads slower than this one sends) is the rest kept, on the heap, until it
//! is written. An idle session is its two sockets, rustls's state and a few
//! words of bookkeeping.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest read: one TLS record's worth of plaintext.
const BURST: usize = 64 * 1024;
/// Silence allowed after one direction has closed.
pub const HALF_CLOSED_IDLE: Duration = Duration::from_secs(60);

/// Why a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions reached end-of-stream.
    Closed,
    IdleTimeout,
    /// Shutdown's grace period ran out.
    Shutdown,
    /// A read or write failed (reset, broken pipe, TLS error).
    Error(io::Error),
}

impl RelayEnd {
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::Shutdown => "shutdown",
            RelayEnd::Error(_) => "error",
        }
    }
}

#[derive(Debug)]
pub struct RelayStats {
    /// Bytes from the client to the backend.
    pub up: u64,
    /// Bytes from the backend to the client.
    pub down: u64,
    pub end: RelayEnd,
}

/// One direction: read from one side, write to the other.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet taken by the writer, from `at` on.
    held: Option<Box<[u8]>>,
    at: usize,
    /// The writer has taken bytes it may still buffer (rustls does).
    unflushed: bool,
    /// The reader reached end-of-stream.
    eof: bool,
    /// The writer's side is shut down: this direction is over.
    done: bool,
    /// A read failed after earlier reads of the same burst brought bytes:
    /// those are written (and flushed) first, then the error ends the relay.
    failed: Option<io::Error>,
    count: u64,
}

impl Half {
    /// Moves bytes until the reader has nothing more for now (`Pending`) or
    /// this direction is over (`Ready(Ok)`); `moved` is set when a read
    /// brought bytes.
    fn poll_move<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        tally: Tally<'_>,
        moved: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.poll_held(cx, w))?;
            if let Some(end) = self.poll_end(cx, w) {
                return end;
            }
            // Read until the buffer is full or the reader has nothing more
            // for now, then write once: a TLS reader hands out one record
            // (16 KiB) per read, and four of them make one system call.
            let mut stack = [MaybeUninit::<u8>::uninit(); BURST];
            let mut buf = ReadBuf::uninit(&mut stack);
            let dry = match self.read_burst(cx, r, &mut buf) {
                Ok(dry) => dry,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let data = buf.filled();
            if data.is_empty() {
                if self.eof {
                    continue;
                }
                ready!(self.poll_flushed(cx, w))?;
                return Poll::Pending;
            }
            *moved = true;
            self.count += data.len() as u64;
            tally.add(data.len() as u64);
            ready!(self.write_burst(cx, w, data))?;
            if dry {
                // The reader's waker is registered: done for now.
                ready!(self.poll_flushed(cx, w))?;
                return Poll::Pending;
            }
        }
    }

    /// Writes what the writer could not take before, if anything.
    fn poll_held<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        if let Some(held) = &self.held {
            while self.at < held.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &held[self.at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.at += n;
                self.unflushed = true;
            }
            self.held = None;
        }
        Poll::Ready(Ok(()))
    }

    /// `Some` once this direction ends: a read failed (what came before it
    /// is flushed first), or the reader reached end-of-stream (flushed,
    /// then the writer's side shut down).
    fn poll_end<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Option<Poll<io::Result<()>>> {
        if let Some(e) = self.failed.take() {
            // Flushed first (a flush error is moot: the relay ends anyway).
            if self.unflushed && Pin::new(&mut *w).poll_flush(cx).is_pending() {
                self.failed = Some(e);
                return Some(Poll::Pending);
            }
            return Some(Poll::Ready(Err(e)));
        }
        if !self.eof {
            return None;
        }
        Some(self.poll_shut(cx, w))
    }

    fn poll_shut<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_flushed(cx, w))?;
        ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
        self.done = true;
        Poll::Ready(Ok(()))
    }

    /// Flushes the writer if it took bytes since its last flush.
    fn poll_flushed<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        if self.unflushed {
            ready!(Pin::new(&mut *w).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Reads into `buf` until it is full or the reader has nothing more for
    /// now; `true` in that case (its waker is registered). A read that fails
    /// after earlier reads brought bytes is kept in `failed`: the bytes go
    /// first.
    fn read_burst<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        buf: &mut ReadBuf<'_>,
    ) -> io::Result<bool> {
        while buf.remaining() > 0 {
            let before = buf.filled().len();
            match Pin::new(&mut *r).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    self.eof = true;
                    break;
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) if buf.filled().is_empty() => return Err(e),
                Poll::Ready(Err(e)) => {
                    // A client that closes without close_notify right
                    // after its last command: the command still goes.
                    self.failed = Some(e);
                    break;
                }
                Poll::Pending => return Ok(true),
            }
        }
        Ok(false)
    }

    /// Writes `data` on; what the writer cannot take now is kept in `held`
    /// (the writer's waker is registered).
    fn write_burst<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
        data: &[u8],
    ) -> Poll<io::Result<()>> {
        let mut at = 0;
        while at < data.len() {
            match Pin::new(&mut *w).poll_write(cx, &data[at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    at += n;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.held = Some(data[at..].into());
                    self.at = 0;
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Where a relay counts the bytes it moves, as they move (a session in
/// IMAP IDLE may last for hours; its bytes should not wait for its end).
#[derive(Clone, Copy)]
pub struct Meter<'a> {
    pub up: &'a Counter,
    pub down: &'a Counter,
    /// The session's own count, for `portcullis sessions`.
    pub session: &'a Bytes,
}

impl<'a> Meter<'a> {
    fn upward(&self) -> Tally<'a> {
        Tally(self.up, &self.session.up)
    }

    fn downward(&self) -> Tally<'a> {
        Tally(self.down, &self.session.down)
    }
}

/// One direction's two counts: the listener's metric and the session's own.
#[derive(Clone, Copy)]
struct Tally<'a>(&'a Counter, &'a AtomicU64);

impl Tally<'_> {
    fn add(self, n: u64) {
        self.0.inc_by(n);
        self.1.fetch_add(n, Ordering::Relaxed);
    }
}

/// One session's bytes so far, up (client to backend) and down.
#[derive(Debug, Default)]
pub struct Bytes {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

/// Relays until both sides close, `idle` passes without a byte, or `stop` fires.
pub async fn relay<C, B>(
    client: C,
    backend: B,
    idle: Duration,
    stop: &CancellationToken,
    meter: Meter<'_>,
) -> RelayStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Instant::now();
    Relay {
        client,
        backend,
        up: Half::default(),
        down: Half::default(),
        idle,
        last,
        timer: tokio::time::sleep_until(last + idle),
        cancelled: stop.cancelled(),
        meter,
        up_first: false,
    }
    .await
}

pin_project_lite::pin_project! {
    /// The whole relay state of a session: a hand-written future rather than
    /// an `async` block, so it holds each field once.
    struct Relay<'a, C, B> {
        client: C,
        backend: B,
        up: Half,
        down: Half,
        idle: Duration,
        // When a read last brought bytes, either way.
        last: Instant,
        #[pin]
        timer: tokio::time::Sleep,
        #[pin]
        cancelled: tokio_util::sync::WaitForCancellationFuture<'a>,
        meter: Meter<'a>,
        // Which direction is polled first, alternating: a direction that
        // always has data must not starve the other.
        up_first: bool,
    }
}

impl<C, B> Future for Relay<'_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = RelayStats;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayStats> {
        let mut me = self.project();
        let end = 'end: {
            if me.cancelled.as_mut().poll(cx).is_ready() {
                break 'end RelayEnd::Shutdown;
            }
            let mut moved = false;
            *me.up_first = !*me.up_first;
            let (a, b) = if *me.up_first {
                let a = me
                    .up
                    .poll_move(cx, me.client, me.backend, me.meter.upward(), &mut moved);
                let b =
                    me.down
                        .poll_move(cx, me.backend, me.client, me.meter.downward(), &mut moved);
                (a, b)
            } else {
                let b =
                    me.down
                        .poll_move(cx, me.backend, me.client, me.meter.downward(), &mut moved);
                let a = me
                    .up
                    .poll_move(cx, me.client, me.backend, me.meter.upward(), &mut moved);
                (a, b)
            };
            match (a, b) {
                (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => {
                    break 'end RelayEnd::Error(e)
                }
                (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => break 'end RelayEnd::Closed,
                _ => {}
            }
            if moved {
                *me.last = Instant::now();
            }
            // Once one direction is over the other gets at most HALF_CLOSED_IDLE.
            let limit = if me.up.done || me.down.done {
                (*me.idle).min(HALF_CLOSED_IDLE)
            } else {
                *me.idle
            };
            let deadline = *me.last + limit;
            // The timer is moved only when it fires (or must fire sooner),
            // not on every byte.
            if deadline < me.timer.deadline() {
                me.timer.as_mut().reset(deadline);
            }
            while me.timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    break 'end RelayEnd::IdleTimeout;
                }
                me.timer.as_mut().reset(deadline);
            }
            return Poll::Pending;
        };
        Poll::Ready(RelayStats {
            up: me.up.count,
            down: me.down.count,
            end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    /// A meter nobody reads.
    fn meter() -> Meter<'static> {
        static C: std::sync::OnceLock<Counter> = std::sync::OnceLock::new();
        static B: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
        let c = C.get_or_init(Counter::default);
        Meter {
            up: c,
            down: c,
            session: B.get_or_init(Bytes::default),
        }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_kept() {
        let (client, mut client_peer) = duplex(64);
        let (backend, mut backend_peer) = duplex(64);
        let stop = CancellationToken::new();
        let task = tokio::spawn(async move {
            relay(client, backend, Duration::from_secs(5), &stop, meter()).await
        });
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client_peer.write_all(&sent).await.unwrap();
            client_peer.shutdown().await.unwrap(); // client is done sending
            let mut reply = Vec::new();
            client_peer.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::new();
        backend_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        // after the client's half-close the backend can still answer
        backend_peer.write_all(b"221 bye\r\n").await.unwrap();
        backend_peer.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"221 bye\r\n");
        let stats = task.await.unwrap();
        assert!(matches!(stats.end, RelayEnd::Closed), "{stats:?}");
        assert_eq!((stats.up, stats.down), (100_000, 9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_session_idles_out() {
        let (client, _c) = duplex(64);
        let (backend, _b) = duplex(64);
        let stop = CancellationToken::new();
        let stats = relay(
            client,
            backend,
            Duration::from_secs(31 * 60),
            &stop,
            meter(),
        )
        .await;
        assert!(matches!(stats.end, RelayEnd::IdleTimeout));
    }

    /// Both directions saturated at once: neither starves the other.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_directions_move_when_both_are_busy() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        use tokio::net::{TcpListener, TcpStream};
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (b, _) = l.accept().await.unwrap();
            (a, b)
        }
        let (client, client_peer) = pair().await;
        let (backend, backend_peer) = pair().await;
        let stop = CancellationToken::new();
        let relay_stop = stop.clone();
        let relayed = tokio::spawn(async move {
            relay(
                client,
                backend,
                Duration::from_secs(60),
                &relay_stop,
                meter(),
            )
            .await
        });
        let (cr, mut cw) = client_peer.into_split();
        let (br, mut bw) = backend_peer.into_split();
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            let b = vec![1u8; 1 << 16];
            while tokio::time::Instant::now() < deadline && cw.write_all(&b).await.is_ok() {}
        });
        tasks.spawn(async move {
            let b = vec![2u8; 1 << 16];
            while tokio::time::Instant::now() < deadline && bw.write_all(&b).await.is_ok() {}
        });
        for (mut r, n) in [(br, up.clone()), (cr, down.clone())] {
            tasks.spawn(async move {
                let mut b = vec![0u8; 1 << 16];
                while let Ok(Ok(k)) = tokio::time::timeout_at(deadline, r.read(&mut b)).await {
                    if k == 0 {
                        break;
                    }
                    n.fetch_add(k as u64, Ordering::Relaxed);
                }
            });
        }
        tokio::time::sleep_until(deadline).await;
        stop.cancel();
        let _ = relayed.await;
        tasks.abort_all();
        let (up, down) = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
        assert!(up > 0 && down > 0, "up {up} down {down}");
        // Starving means next to nothing moves one way. The four peer tasks
        // share two CPUs with the relay, and how the scheduler places them
        // alone has made one way 3.5 times the other on a CI machine: the
        // bound is an order of magnitude, not a fairness ratio.
        assert!(
            up < 10 * down && down < 10 * up,
            "one direction starved the other: up {up} bytes, down {down} bytes"
        );
    }

    #[tokio::test]
    async fn stop_ends_a_live_session() {
        let (client, _c) = duplex(64);
        let (backend, _b) = duplex(64);
        let stop = CancellationToken::new();
        stop.cancel();
        let stats = relay(client, backend, Duration::from_secs(60), &stop, meter()).await;
        assert!(matches!(stats.end, RelayEnd::Shutdown));
    }
}
