//! The byte relay between a client and its backend, both ways, until both
//! sides have closed, the session idles out, or shutdown's grace runs out.
//!
//! Half-close is honoured: when one side stops sending, the other side's write
//! half is shut down and the opposite direction keeps flowing (a client that
//! sends QUIT and shuts down its write side still gets the final reply). Once
//! one direction has ended, the other gets at most [`HALF_CLOSED_IDLE`] of
//! silence, so a peer that never closes cannot pin the session for 31 minutes.
//!
//! Memory: IMAP clients hold thousands of sessions open and silent, so an idle
//! direction waits on a small inline buffer; a [`BURST`]-sized heap buffer is
//! taken only while reads keep filling the small one, and given back as soon as
//! the source runs dry.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Inline buffer an idle direction waits on.
const SMALL: usize = 1024;
/// Buffer for a direction that is moving data: one TLS record's worth.
const BURST: usize = 16 * 1024;
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

/// Progress both directions report to the idle watchdog.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last byte read either way.
    last_ms: AtomicU64,
    half_closed: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has moved for `idle` (or the half-closed limit).
    async fn idle(&self, idle: Duration) {
        loop {
            let limit = if self.half_closed.load(Ordering::Relaxed) {
                idle.min(HALF_CLOSED_IDLE)
            } else {
                idle
            };
            let deadline = self.last() + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Copies `r` to `w` until end-of-stream, then shuts `w`'s write side.
async fn pump<R, W>(mut r: R, mut w: W, count: &AtomicU64, activity: &Activity) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut small = [0u8; SMALL];
    let mut burst: Option<Box<[u8]>> = None;
    loop {
        let n = match burst.as_deref_mut() {
            Some(buf) => r.read(buf).await?,
            None => r.read(&mut small).await?,
        };
        if n == 0 {
            activity.half_closed.store(true, Ordering::Relaxed);
            return w.shutdown().await;
        }
        activity.touch();
        let data = match burst.as_deref() {
            Some(buf) => &buf[..n],
            None => &small[..n],
        };
        w.write_all(data).await?;
        w.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        let capacity = burst.as_ref().map_or(SMALL, |b| b.len());
        if n < capacity {
            burst = None;
        } else if burst.is_none() {
            burst = Some(vec![0u8; BURST].into_boxed_slice());
        }
    }
}

/// Relays until both sides close, `idle` passes without a byte, or `stop` fires.
pub async fn relay<C, B>(
    client: C,
    backend: B,
    idle: Duration,
    stop: &CancellationToken,
) -> RelayStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (client_r, client_w) = tokio::io::split(client);
    let (backend_r, backend_w) = tokio::io::split(backend);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        half_closed: AtomicBool::new(false),
    };
    let both = async {
        tokio::try_join!(
            pump(client_r, backend_w, &up, &activity),
            pump(backend_r, client_w, &down, &activity),
        )
    };
    let end = tokio::select! {
        r = both => match r {
            Ok(_) => RelayEnd::Closed,
            Err(e) => RelayEnd::Error(e),
        },
        _ = activity.idle(idle) => RelayEnd::IdleTimeout,
        _ = stop.cancelled() => RelayEnd::Shutdown,
    };
    RelayStats {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_kept() {
        let (client, mut client_peer) = duplex(64);
        let (backend, mut backend_peer) = duplex(64);
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(
                async move { relay(client, backend, Duration::from_secs(5), &stop).await },
            );
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
        let stats = relay(client, backend, Duration::from_secs(31 * 60), &stop).await;
        assert!(matches!(stats.end, RelayEnd::IdleTimeout));
    }

    #[tokio::test]
    async fn stop_ends_a_live_session() {
        let (client, _c) = duplex(64);
        let (backend, _b) = duplex(64);
        let stop = CancellationToken::new();
        stop.cancel();
        let stats = relay(client, backend, Duration::from_secs(60), &stop).await;
        assert!(matches!(stats.end, RelayEnd::Shutdown));
    }
}
