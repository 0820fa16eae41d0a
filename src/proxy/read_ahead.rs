//! A TCP stream that reads ahead for rustls, and holds no buffer while idle.
//!
//! rustls asks its transport for at most 4 KiB at a time, so a 16 KiB TLS
//! record costs four or five `recv` calls. [`ReadAhead`] answers a small
//! read from one large `recv` into a buffer taken for the occasion and
//! handed back as soon as rustls has taken everything in it: an idle session
//! owns no buffer here, a busy one makes a quarter of the system calls.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// One `recv` of at most this much.
const AHEAD: usize = 64 * 1024;

/// Bytes received (or decrypted) ahead of the reader, handed out from `at`
/// on; the memory goes back as soon as the last of them is read.
#[derive(Debug, Default)]
pub(super) struct Leftover {
    bytes: Vec<u8>,
    at: usize,
}

impl Leftover {
    pub(super) fn is_empty(&self) -> bool {
        self.at == self.bytes.len()
    }

    /// What is not handed out yet.
    pub(super) fn rest(&self) -> &[u8] {
        &self.bytes[self.at..]
    }

    pub(super) fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// Takes `bytes` to hand out, in place of what is left (nothing).
    fn refill(&mut self, bytes: Vec<u8>) {
        *self = Leftover { bytes, at: 0 };
    }

    pub(super) fn extend(&mut self, more: &[u8]) {
        self.bytes.extend_from_slice(more);
    }

    /// Hands out as much as `out` takes; false when there was nothing.
    pub(super) fn read_into(&mut self, out: &mut ReadBuf<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let n = out.remaining().min(self.bytes.len() - self.at);
        out.put_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        if self.is_empty() {
            // Drained: give the memory back.
            *self = Leftover::default();
        }
        true
    }
}

/// One `recv` appended to `buf` (room for up to 64 KiB made first); the
/// bytes received, 0 at end of stream. Readiness comes first, so a socket
/// with nothing to read costs no buffer: an empty `buf` is released again
/// when the readiness was stale.
pub(super) fn poll_recv(
    socket: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut Vec<u8>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(socket.poll_read_ready(cx))?;
        if buf.capacity() - buf.len() < AHEAD / 4 {
            buf.reserve(AHEAD);
        }
        match socket.try_read_buf(buf) {
            Ok(n) => return Poll::Ready(Ok(n)),
            // Stale; poll_read_ready registers the waker.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if buf.is_empty() {
                    *buf = Vec::new();
                }
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

#[derive(Debug)]
pub struct ReadAhead {
    inner: TcpStream,
    /// Bytes received and not yet read.
    ahead: Leftover,
    /// Every byte read so far, while recording.
    recorded: Option<Vec<u8>>,
}

impl ReadAhead {
    pub fn new(inner: TcpStream) -> ReadAhead {
        ReadAhead {
            inner,
            ahead: Leftover::default(),
            recorded: None,
        }
    }

    /// A stream that keeps a copy of every byte it hands out, for
    /// [`ReadAhead::into_replay`]: rustls's `Acceptor` reads the ClientHello
    /// through it, and the session's own TLS connection reads it again.
    pub fn recording(inner: TcpStream) -> ReadAhead {
        ReadAhead {
            recorded: Some(Vec::new()),
            ..ReadAhead::new(inner)
        }
    }

    /// Stops keeping a copy: rustls's own stream reads on.
    pub fn stop_recording(&mut self) {
        self.recorded = None;
    }

    /// The socket, and every byte received on it that was not consumed
    /// elsewhere: what was read while recording, then what is still ahead.
    pub fn into_replay(self) -> (TcpStream, Vec<u8>) {
        let mut bytes = self.recorded.unwrap_or_default();
        bytes.extend_from_slice(self.ahead.rest());
        (self.inner, bytes)
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = out.filled().len();
        let polled = me.poll_ahead(cx, out);
        if let (Some(copy), Poll::Ready(Ok(()))) = (&mut me.recorded, &polled) {
            copy.extend_from_slice(&out.filled()[before..]);
        }
        polled
    }
}

impl ReadAhead {
    fn poll_ahead(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.ahead.read_into(out) {
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= AHEAD / 2 {
            return Pin::new(&mut self.inner).poll_read(cx, out);
        }
        let mut received = Vec::new();
        if ready!(poll_recv(&self.inner, cx, &mut received))? > 0 {
            self.ahead.refill(received);
            self.ahead.read_into(out);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_receive_and_nothing_is_kept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut peer = TcpStream::connect(addr).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let mut r = ReadAhead::new(socket);
        let sent: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.unwrap();
        peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(r.ahead.capacity(), 0, "a drained stream holds no buffer");
        // writes pass through
        r.write_all(b"ok").await.unwrap();
        let mut back = [0u8; 2];
        peer.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ok");
    }
}
