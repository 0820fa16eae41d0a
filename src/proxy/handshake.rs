//! The TLS handshake of a session, under one deadline: the ClientHello,
//! an ACME tls-alpn-01 validation answered on the spot, the ALPN check
//! (ALPACA), the host lookup, then the rest of the handshake with the
//! certificate of the host the session is routed to.

use std::io;
use std::sync::Arc;

use rustls::server::Acceptor;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use tracing::info;

use super::context::ListenerCtx;
use super::outcome::{is_expected, Outcome};
use super::read_ahead::ReadAhead;
use super::tls_session::TlsSession;
use crate::acme::challenge::ACME_TLS_ALPN;
use crate::protocol::TlsMode;
use crate::tls::hosts::{Host, Matched};

/// A TLS alert record: fatal `unrecognized_name` (RFC 6066 §3), sent when
/// `unknown_sni: reject` refuses a name before any handshake state exists.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// A TLS alert record: fatal `no_application_protocol` (RFC 7301 §3.2), sent
/// when a ClientHello offers ALPN and none of it is the listener's.
const ALERT_NO_APPLICATION_PROTOCOL: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x78];

/// Why a connection ended before its relay began.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
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

/// A finished handshake: the client's TLS session, its host, how its SNI
/// led there.
pub(super) type Shaken = (Client, Arc<Host>, Matched);

/// The client's side of a finished handshake.
pub(super) enum Client {
    /// Relayed to a backend: buffers only while bytes move.
    Relay(Box<TlsSession>),
    /// Answered here (`web`): one HTTP/1.1 exchange on rustls's own stream.
    Web(Box<TlsStream<ReadAhead>>),
}

impl Client {
    /// The SNI the client sent, lowercase.
    pub(super) fn server_name(&self) -> Option<&str> {
        match self {
            Client::Relay(s) => s.server_name(),
            Client::Web(s) => s.get_ref().1.server_name(),
        }
    }
}

impl Refused {
    /// Ends `session` the way this refusal is reported.
    pub(super) fn end(self, session: &mut Outcome) {
        match self {
            Refused::Handshake(e) if is_expected(&e) => session.end("client_left", e.to_string()),
            Refused::Handshake(e) => session.end("handshake_failed", e.to_string()),
            Refused::HandshakeTimeout => session.end("handshake_timeout", None),
            Refused::UnknownSni => session.end("unknown_sni", None),
            Refused::Alpn(why) => session.end("alpn_refused", why),
            Refused::Challenge(Ok(())) => {
                info!("acme tls-alpn-01 challenge answered");
                session.end("acme_challenge", None);
            }
            Refused::Challenge(Err(e)) => session.end("acme_challenge", e.to_string()),
            r @ Refused::NoChallenge => session.end("acme_challenge", r.to_string()),
            Refused::Shutdown => session.end("shutdown", None),
        }
    }
}

/// The `outcome` of `portcullis_handshakes_total`; `None` for what is not a
/// client's handshake (ACME validators, shutdown).
pub(super) fn outcome(shaken: &Result<Shaken, Refused>) -> Option<&'static str> {
    match shaken {
        Ok((client, _, _)) if client.server_name().is_none() => Some("no_sni"),
        Ok(_) => Some("ok"),
        Err(Refused::Handshake(e)) if is_expected(e) => Some("client_left"),
        Err(Refused::Handshake(e)) => Some(failure(e)),
        Err(Refused::HandshakeTimeout) => Some("timeout"),
        Err(Refused::UnknownSni) => Some("unknown_sni"),
        Err(Refused::Alpn(_)) => Some("alpn_refused"),
        Err(_) => None,
    }
}

/// Why a handshake failed, as the operator tells causes apart: an old
/// client (incompatible), a client that distrusts the certificate
/// (client_alert), a scanner or plaintext on a TLS port (not_tls).
fn failure(e: &io::Error) -> &'static str {
    let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::PeerIncompatible(_)) => "incompatible",
        Some(rustls::Error::AlertReceived(_)) => "client_alert",
        Some(rustls::Error::InvalidMessage(_)) => "not_tls",
        _ => "alert",
    }
}

/// The handshake: ClientHello, host lookup, rest of the handshake, under one deadline.
pub(super) async fn handshake(
    socket: TcpStream,
    ctx: &ListenerCtx,
    deadline: tokio::time::Instant,
) -> Result<Shaken, Refused> {
    let work = async {
        let mut start = LazyConfigAcceptor::new(Acceptor::default(), ReadAhead::recording(socket))
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
            let cert = match sni.as_deref() {
                Some(name) => ctx.challenges.tls_alpn_answer(name).await,
                None => None,
            };
            let Some(cert) = cert else {
                return Err(Refused::NoChallenge);
            };
            start.io.stop_recording();
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
        // Names portcullis answers itself speak HTTP/1.1 only. (rustls
        // gives the SNI lowercase, as the host table relies on too.)
        let client = match (&ctx.web_tls, &sni) {
            (Some(web), Some(name)) if ctx.discovery.serves(name) => {
                start.io.stop_recording();
                let stream = start
                    .into_stream(web.clone())
                    .await
                    .map_err(Refused::Handshake)?;
                Client::Web(Box::new(stream))
            }
            _ => {
                // The ClientHello again, to a connection that owns no
                // buffer while the session idles (`tls_session`).
                let (socket, replay) = start.io.into_replay();
                let session = TlsSession::accept(socket, ctx.tls.clone(), replay, sni)
                    .await
                    .map_err(Refused::Handshake)?;
                Client::Relay(Box::new(session))
            }
        };
        Ok((client, host, matched))
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

#[cfg(test)]
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
