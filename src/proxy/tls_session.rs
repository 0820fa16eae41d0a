//! A relayed TLS session over rustls's unbuffered API: the session owns
//! its buffers, and an idle one owns none.
//!
//! rustls's buffered connection (what tokio-rustls drives) keeps a 4 KiB
//! receive buffer for the life of the session: it sizes it for one read
//! before every read and never gives it back. An IMAP client in IDLE holds
//! its session for hours, so that buffer was 40 % of an idle session's
//! memory. Here the received bytes live in `incoming`, taken for a read
//! (one `recv` of up to 64 KiB, as [`super::read_ahead`] does) and handed
//! back once processed; the bytes to send live in `outgoing` until written.
//!
//! The ClientHello has already been read (and looked at) by rustls's
//! `Acceptor`; the bytes it read are replayed into the unbuffered
//! connection, which takes the handshake from there with the config the
//! host lookup chose.
//!
//! TLS 1.3's session ticket is not sent on its own after the handshake: it
//! goes out with the first bytes the session writes (the backend's
//! greeting, a web response), one system call and one wake-up of the
//! client fewer per connection. TLS 1.2's last flight, which the client
//! waits for, is sent at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedStatus, WriteTraffic,
};
use rustls::{CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::read_ahead::{poll_recv, Leftover};

/// Plaintext encrypted per write call at most (four full records).
const WRITE: usize = 64 * 1024;

/// Where the session stands, after everything received has been processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// More bytes from the client are needed (handshake, or next record).
    Input,
    /// The handshake is done; application data may be written.
    Traffic,
    /// Both sides have sent close_notify.
    Closed,
}

pub struct TlsSession {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received and not yet processed, from `head` on; no allocation when
    /// empty.
    incoming: Vec<u8>,
    head: usize,
    /// Encoded for the client and not yet written, from `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
    /// Decrypted and not yet read.
    plain: Leftover,
    /// The client's close_notify arrived: end of its data.
    peer_closed: bool,
    /// The client's TCP stream ended.
    eof: bool,
    /// Our close_notify is queued.
    closing: bool,
    /// A TLS error ended the session: its alert is all that may still go.
    failed: Option<rustls::Error>,
    sni: Option<String>,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("io", &self.io)
            .field("buffered", &self.buffered())
            .field("peer_closed", &self.peer_closed)
            .field("closing", &self.closing)
            .finish_non_exhaustive()
    }
}

impl TlsSession {
    /// Completes the handshake: `replay` is what the `Acceptor` read (the
    /// ClientHello), `ahead` what was received after it.
    pub async fn accept(
        io: TcpStream,
        config: Arc<ServerConfig>,
        replay: Vec<u8>,
        sni: Option<String>,
    ) -> Result<TlsSession, io::Error> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut session = TlsSession {
            io,
            conn,
            incoming: replay,
            head: 0,
            outgoing: Vec::new(),
            sent: 0,
            plain: Leftover::default(),
            peer_closed: false,
            eof: false,
            closing: false,
            failed: None,
            sni,
        };
        std::future::poll_fn(|cx| session.poll_handshake(cx)).await?;
        Ok(session)
    }

    /// The negotiated parameters: version, suite, ALPN, resumption.
    pub fn state(&self) -> &CommonState {
        &self.conn
    }

    /// The SNI the client sent (lowercase, as rustls gives it).
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// Bytes this session holds in buffers right now (none when idle).
    pub fn buffered(&self) -> usize {
        self.incoming.capacity() + self.outgoing.capacity() + self.plain.capacity()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let next = self.process(cx, None)?;
            if !self.conn.is_handshaking() {
                // TLS 1.2 ends with the server's flight, which the client
                // waits for; TLS 1.3 leaves only the ticket, which waits
                // for the first write.
                if self.conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
                    ready!(self.poll_send(cx))?;
                }
                return Poll::Ready(Ok(()));
            }
            match next {
                // Traffic before the handshake is done: rustls may send
                // (half-RTT), the client's Finished is still to come.
                Next::Input | Next::Traffic => {
                    ready!(self.poll_send(cx))?;
                    if ready!(self.poll_receive(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "tls handshake eof",
                        )));
                    }
                }
                Next::Closed => {
                    return Poll::Ready(Err(io::Error::other("handshake ended early")));
                }
            }
        }
    }

    /// Processes what has been received: decrypted data goes to `out` as
    /// far as it has room, the rest to `plain`; records for the client go to
    /// `outgoing`. On an error, the alert rustls queued is encoded (and sent
    /// if the socket takes it at once).
    fn process(&mut self, cx: &mut Context<'_>, out: Option<&mut ReadBuf<'_>>) -> io::Result<Next> {
        if let Some(e) = &self.failed {
            return Err(invalid(e.clone()));
        }
        match self.process_records(out) {
            Ok(next) => Ok(next),
            Err(e) => {
                // rustls queued its alert: handed out (before anything
                // received is looked at again) while it has records to
                // send, then sent if the socket takes it at once. Nothing
                // else is done with the session after this (`failed`).
                for _ in 0..8 {
                    if !self.conn.wants_write() {
                        break;
                    }
                    let _ = process_once(
                        &mut self.conn,
                        (&mut self.incoming, &mut self.head),
                        &mut self.outgoing,
                        (&mut self.plain, None),
                        &mut self.peer_closed,
                    );
                }
                self.failed = Some(e.clone());
                let _ = self.poll_send(cx);
                Err(invalid(e))
            }
        }
    }

    fn process_records(
        &mut self,
        mut out: Option<&mut ReadBuf<'_>>,
    ) -> Result<Next, rustls::Error> {
        loop {
            let step = process_once(
                &mut self.conn,
                (&mut self.incoming, &mut self.head),
                &mut self.outgoing,
                (&mut self.plain, out.as_deref_mut()),
                &mut self.peer_closed,
            )?;
            if self.incoming.is_empty() && self.incoming.capacity() > 0 {
                self.incoming = Vec::new();
            }
            match step {
                Step::Again => {}
                Step::Stop(next) => return Ok(next),
            }
        }
    }

    /// Writes `outgoing` to the socket; `Ready` once all of it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// One `recv` into `incoming`; the bytes received (0: end of stream).
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.head > 0 {
            // What is left of a record cut short: a few bytes.
            self.incoming.drain(..self.head);
            self.head = 0;
        }
        let n = ready!(poll_recv(&self.io, cx, &mut self.incoming))?;
        self.eof |= n == 0;
        Poll::Ready(Ok(n))
    }

    /// Runs `f` with rustls's `WriteTraffic`, the state once the handshake
    /// is done and everything received is processed (`process` first);
    /// `None` in any other state (closed both ways).
    fn with_traffic<T>(
        &mut self,
        f: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<T>,
    ) -> io::Result<Option<T>> {
        // Always the unprocessed bytes, never an empty slice: rustls may
        // hold offsets into them (a handshake message split over records).
        let UnbufferedStatus { discard, state } = self
            .conn
            .process_tls_records(&mut self.incoming[self.head..]);
        let result: Result<io::Result<Option<T>>, rustls::Error> = match state {
            Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                Ok(f(&mut traffic, &mut self.outgoing).map(Some))
            }
            Ok(_) => Ok(Ok(None)),
            Err(e) => Err(e),
        };
        advance(&mut self.incoming, &mut self.head, discard);
        match result {
            Ok(r) => r,
            Err(e) => {
                self.failed = Some(e.clone());
                Err(invalid(e))
            }
        }
    }

    /// Encrypts `data` (at most [`WRITE`] of it) into `outgoing`.
    fn encrypt(&mut self, data: &[u8]) -> io::Result<usize> {
        let data = &data[..data.len().min(WRITE)];
        let written = self.with_traffic(|traffic, outgoing| {
            let at = outgoing.len();
            // A record's overhead is at most 22 bytes in TLS 1.3 (29 in 1.2).
            let mut room = data.len() + data.len().div_ceil(16 * 1024) * 64 + 64;
            loop {
                outgoing.resize(at + room, 0);
                match traffic.encrypt(data, &mut outgoing[at..]) {
                    Ok(n) => {
                        outgoing.truncate(at + n);
                        return Ok(data.len());
                    }
                    Err(EncryptError::InsufficientSize(s)) if s.required_size > room => {
                        room = s.required_size;
                    }
                    Err(e) => {
                        outgoing.truncate(at);
                        return Err(io::Error::other(e.to_string()));
                    }
                }
            }
        })?;
        written.ok_or_else(|| io::ErrorKind::BrokenPipe.into())
    }

    /// Queues close_notify, unless both sides have closed already.
    fn queue_close_notify(&mut self) -> io::Result<()> {
        self.with_traffic(|traffic, outgoing| {
            let at = outgoing.len();
            outgoing.resize(at + 64, 0);
            match traffic.queue_close_notify(&mut outgoing[at..]) {
                Ok(n) => {
                    outgoing.truncate(at + n);
                    Ok(())
                }
                Err(e) => {
                    outgoing.truncate(at);
                    Err(io::Error::other(e.to_string()))
                }
            }
        })
        .map(|_| ())
    }
}

enum Step {
    Again,
    Stop(Next),
}

/// One call of `process_tls_records`, its state handled and its bytes
/// discarded.
fn process_once(
    conn: &mut UnbufferedServerConnection,
    (incoming, head): (&mut Vec<u8>, &mut usize),
    outgoing: &mut Vec<u8>,
    (plain, mut out): (&mut Leftover, Option<&mut ReadBuf<'_>>),
    peer_closed: &mut bool,
) -> Result<Step, rustls::Error> {
    let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut incoming[*head..]);
    let step = state.and_then(|state| match state {
        ConnectionState::ReadTraffic(mut records) => {
            while let Some(record) = records.next_record() {
                let record = record?;
                discard += record.discard;
                let mut payload = record.payload;
                if let Some(out) = out.as_deref_mut() {
                    let n = out.remaining().min(payload.len());
                    out.put_slice(&payload[..n]);
                    payload = &payload[n..];
                }
                plain.extend(payload);
            }
            Ok(Step::Again)
        }
        ConnectionState::ReadEarlyData(mut records) => {
            // Never offered (max_early_data_size is 0): dropped if any.
            while let Some(record) = records.next_record() {
                discard += record?.discard;
            }
            Ok(Step::Again)
        }
        ConnectionState::EncodeTlsData(mut encode) => {
            let at = outgoing.len();
            let mut room = 4096;
            loop {
                outgoing.resize(at + room, 0);
                match encode.encode(&mut outgoing[at..]) {
                    Ok(n) => {
                        outgoing.truncate(at + n);
                        break;
                    }
                    Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
                    Err(EncodeError::AlreadyEncoded) => {
                        outgoing.truncate(at);
                        break;
                    }
                }
            }
            Ok(Step::Again)
        }
        // Written by the caller before it waits for input or returns.
        ConnectionState::TransmitTlsData(transmit) => {
            transmit.done();
            Ok(Step::Again)
        }
        ConnectionState::PeerClosed => {
            *peer_closed = true;
            Ok(Step::Again)
        }
        ConnectionState::Closed => Ok(Step::Stop(Next::Closed)),
        ConnectionState::BlockedHandshake => Ok(Step::Stop(Next::Input)),
        ConnectionState::WriteTraffic(_) => Ok(Step::Stop(Next::Traffic)),
        _ => Ok(Step::Stop(Next::Input)),
    });
    advance(incoming, head, discard);
    step
}

/// Discards `n` processed bytes by moving the start, not the bytes: a read
/// of four records would otherwise move the later ones three times. (Also
/// after an error: the record that failed is not processed again.)
fn advance(incoming: &mut Vec<u8>, head: &mut usize, n: usize) {
    *head = (*head + n).min(incoming.len());
    if *head == incoming.len() {
        incoming.clear();
        *head = 0;
    }
}

/// rustls's errors as tokio-rustls reports them, so callers tell causes
/// apart the same way (`handshake::failure`).
fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for TlsSession {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.plain.read_into(out) {
                return Poll::Ready(Ok(()));
            }
            if me.peer_closed {
                return Poll::Ready(Ok(()));
            }
            let before = out.filled().len();
            let next = me.process(cx, Some(out))?;
            if out.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            if !me.plain.is_empty() || me.peer_closed {
                continue;
            }
            if next == Next::Closed {
                return Poll::Ready(Ok(()));
            }
            // What is waiting to go (the TLS 1.3 ticket, an alert) goes
            // now if the socket takes it; reading never waits for it.
            if let Poll::Ready(Err(e)) = me.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if me.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            ready!(me.poll_receive(cx))?;
        }
    }
}

impl AsyncWrite for TlsSession {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        // At most one write's worth waits in `outgoing`.
        if me.sent < me.outgoing.len() && me.outgoing.len() - me.sent >= WRITE {
            ready!(me.poll_send(cx))?;
        }
        if me.closing || me.process(cx, None)? == Next::Closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = me.encrypt(data)?;
        // Sent now if the socket takes it; the rest by the next write or flush.
        if let Poll::Ready(Err(e)) = me.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_send(cx))?;
        Pin::new(&mut me.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.closing && me.failed.is_none() {
            me.closing = true;
            if me.process(cx, None)? != Next::Closed {
                me.queue_close_notify()?;
            }
        }
        ready!(me.poll_send(cx))?;
        Pin::new(&mut me.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    struct Pair {
        server: TlsSession,
        client: tokio_rustls::client::TlsStream<TcpStream>,
    }

    fn configs(tls12: bool) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec!["mail.example.test".into()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let mut server = ServerConfig::builder_with_provider(crate::tls::hkdf::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        server.send_tls13_tickets = 1;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A client handshake against a server that replays the first bytes it
    /// read, as the Acceptor hands them over.
    async fn pair(tls12: bool) -> Pair {
        let (server_config, client_config) = configs(tls12);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("mail.example.test").unwrap();
            tokio_rustls::TlsConnector::from(client_config)
                .connect(name, tcp)
                .await
                .unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        // some of the ClientHello read before, as the Acceptor would have
        let mut first = vec![0u8; 10];
        let n = loop {
            tcp.readable().await.unwrap();
            match tcp.try_read(&mut first) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        };
        first.truncate(n);
        let server = TlsSession::accept(tcp, server_config, first, None)
            .await
            .unwrap();
        let client = client.await.unwrap();
        Pair { server, client }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_an_idle_session_holds_no_buffer() {
        for tls12 in [false, true] {
            let Pair {
                mut server,
                mut client,
            } = pair(tls12).await;
            // the server speaks first (an IMAP greeting), the ticket with it
            server.write_all(b"* OK ready\r\n").await.unwrap();
            server.flush().await.unwrap();
            let mut greeting = [0u8; 12];
            client.read_exact(&mut greeting).await.unwrap();
            assert_eq!(&greeting, b"* OK ready\r\n");
            // a megabyte each way, in odd pieces
            let big: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
            let sent = big.clone();
            let writer = tokio::spawn(async move {
                for piece in sent.chunks(77_777) {
                    client.write_all(piece).await.unwrap();
                }
                client.flush().await.unwrap();
                client
            });
            let mut got = vec![0u8; big.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(got == big, "upload intact (TLS 1.2: {tls12})");
            let mut client = writer.await.unwrap();
            let reader = tokio::spawn(async move {
                let mut got = vec![0u8; 1_000_003];
                client.read_exact(&mut got).await.unwrap();
                (client, got)
            });
            for piece in big.chunks(50_000) {
                server.write_all(piece).await.unwrap();
            }
            server.flush().await.unwrap();
            let (mut client, got) = reader.await.unwrap();
            assert!(got == big, "download intact (TLS 1.2: {tls12})");
            // idle: nothing buffered
            assert_eq!(server.buffered(), 0);
            // close_notify from the client is the end of its data...
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            // ...and the server still writes after it (half-close), then closes
            server.write_all(b"* BYE\r\n").await.unwrap();
            server.shutdown().await.unwrap();
            let mut tail = Vec::new();
            client.read_to_end(&mut tail).await.unwrap();
            assert_eq!(tail, b"* BYE\r\n");
        }
    }

    /// A TLS 1.2 client whose second flight starts a handshake message in
    /// one record and interleaves another record before its end: refused,
    /// never a panic (rustls keeps offsets into the unprocessed bytes of a
    /// message split over records; they must be handed back every time).
    #[tokio::test]
    async fn a_handshake_message_cut_by_another_record_is_refused() {
        let (server_config, client_config) = configs(true);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("mail.example.test").unwrap();
            let mut conn = rustls::ClientConnection::new(client_config, name).unwrap();
            let mut hello = Vec::new();
            conn.write_tls(&mut hello).unwrap();
            tcp.write_all(&hello).await.unwrap();
            // the server's first flight, up to ServerHelloDone
            let mut flight = vec![0u8; 16 * 1024];
            let _ = tcp.read(&mut flight).await.unwrap();
            // a ClientKeyExchange header promising 33 bytes, then a CCS
            tcp.write_all(&[0x16, 0x03, 0x03, 0x00, 0x04, 0x10, 0x00, 0x00, 0x21])
                .await
                .unwrap();
            tcp.write_all(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01])
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                tcp.read_to_end(&mut answer),
            )
            .await;
            answer
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let e = TlsSession::accept(tcp, server_config, Vec::new(), None)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("Interleaved"), "{e}");
        // closed, with nothing but an alert if anything (rustls sends none
        // for this one, with either API)
        let answer = client.await.unwrap();
        assert!(answer.is_empty() || answer[0] == 0x15, "{answer:?}");
    }

    #[tokio::test]
    async fn a_close_without_close_notify_is_an_unexpected_eof() {
        let Pair { mut server, client } = pair(false).await;
        let (tcp, _) = client.into_inner();
        drop(tcp);
        let mut buf = [0u8; 16];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn garbage_after_the_handshake_is_an_error_with_an_alert() {
        let Pair { mut server, client } = pair(false).await;
        let (mut tcp, _) = client.into_inner();
        // an application-data record that does not decrypt
        tcp.write_all(&[0x17, 0x03, 0x03, 0x00, 0x20])
            .await
            .unwrap();
        tcp.write_all(&[0x55; 32]).await.unwrap();
        let mut buf = [0u8; 16];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // nothing more is encrypted after the alert: reads and writes fail
        // with the same error, and a shutdown sends nothing else
        assert!(server.write_all(b"* BYE\r\n").await.is_err());
        assert!(server.read(&mut buf).await.is_err());
        let _ = server.shutdown().await;
        drop(server);
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tcp.read_to_end(&mut answer),
        )
        .await;
        // the ticket (held for the first write) never went; the alert did
        assert!(
            answer.iter().any(|b| *b == 0x15 || *b == 0x17),
            "{answer:?}"
        );
    }
}
