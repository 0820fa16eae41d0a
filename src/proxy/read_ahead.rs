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

#[derive(Debug)]
pub struct ReadAhead {
    inner: TcpStream,
    /// Bytes received and not yet read, from `at` on.
    ahead: Vec<u8>,
    at: usize,
    /// Every byte read so far, while recording.
    recorded: Option<Vec<u8>>,
}

impl ReadAhead {
    pub fn new(inner: TcpStream) -> ReadAhead {
        ReadAhead {
            inner,
            ahead: Vec::new(),
            at: 0,
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
        bytes.extend_from_slice(&self.ahead[self.at..]);
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
        let me = self;
        if me.at < me.ahead.len() {
            let n = out.remaining().min(me.ahead.len() - me.at);
            out.put_slice(&me.ahead[me.at..me.at + n]);
            me.at += n;
            if me.at == me.ahead.len() {
                // Drained: give the memory back.
                me.ahead = Vec::new();
                me.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= AHEAD / 2 {
            return Pin::new(&mut me.inner).poll_read(cx, out);
        }
        loop {
            // Readiness first: a socket with nothing to read costs no buffer.
            ready!(me.inner.poll_read_ready(cx))?;
            let mut ahead = Vec::with_capacity(AHEAD);
            match me.inner.try_read_buf(&mut ahead) {
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(n) => {
                    let take = out.remaining().min(n);
                    out.put_slice(&ahead[..take]);
                    if take < n {
                        me.ahead = ahead;
                        me.at = take;
                    }
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale; poll_read_ready registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
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
