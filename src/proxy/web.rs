//! HTTPS that portcullis answers itself: on a web listener (`tcp`,
//! implicit TLS, HTTP/1.1), a session whose SNI is one of `domains:`'
//! names (`mta-sts.`, `autoconfig.`, `autodiscover.`) gets one answer from
//! [`crate::discovery`] and is closed; no backend sees it. The handshake
//! offered it HTTP/1.1 alone, whatever the listener's ALPN.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::server::TlsStream;

use super::context::{ListenerCtx, Stop};
use super::http::{self, BodyLength, Head, Unread};
use super::outcome::Outcome;
use super::read_ahead::ReadAhead;
use crate::discovery::{Discovery, Reply, BODY_LIMIT};

const HEAD_LIMIT: usize = 8 * 1024;

/// Reads one request (within `timeouts.handshake`), answers it, closes.
pub(super) async fn serve(
    mut client: TlsStream<ReadAhead>,
    sni: &str,
    ctx: &ListenerCtx,
    stop: &Stop,
    session: &mut Outcome,
) {
    let read = tokio::time::timeout(ctx.timeouts.handshake, request(&mut client));
    let got = tokio::select! {
        r = read => r,
        _ = stop.accepting.cancelled() => {
            session.end("shutdown", None);
            return;
        }
    };
    let (head, body) = match got {
        Ok(Ok(got)) => got,
        Ok(Err(Refusal::Io(e))) => {
            session.end("client_left", super::outcome::reason(&e));
            return;
        }
        Ok(Err(Refusal::Reply(reply))) => {
            session.end("bad_request", reply.body.trim_end().to_string());
            let sent = send(&mut client, &reply, false).await;
            session.count_down(sent);
            return;
        }
        Err(_) => {
            session.end("request_timeout", None);
            return;
        }
    };
    // The Host header names the site, and it must be the name the
    // certificate was chosen for (RFC 9110 §7.4: else 421); the SNI when
    // there is none.
    let host = head.host.as_ref().map_or(sni, |h| h.as_str());
    let reply = if host == sni {
        ctx.discovery.answer(host, &head.method, &head.path, &body)
    } else {
        Reply::text(
            421,
            &format!("{host} is not served on a connection for {sni}"),
        )
    };
    let path = head.path.split('?').next().unwrap_or_default();
    session.end(
        "answered",
        format!("{} {host}{path}: {}", head.method, reply.status),
    );
    session.count_up(head.len + body.len());
    let sent = send(&mut client, &reply, head.method == "HEAD").await;
    session.count_down(sent);
}

/// Why a request was not read whole.
enum Refusal {
    Io(std::io::Error),
    /// Answered with this, then closed.
    Reply(Reply),
}

/// The request head, and its body where the answer needs one.
async fn request(client: &mut TlsStream<ReadAhead>) -> Result<(Head, Vec<u8>), Refusal> {
    let (buf, head) = match http::read_head(client, HEAD_LIMIT).await {
        Ok(got) => got,
        Err(Unread::Io(e)) => return Err(Refusal::Io(e)),
        Err(Unread::Bad(why)) => return Err(Refusal::Reply(Reply::text(400, why))),
    };
    if !Discovery::wants_body(&head.method, &head.path) {
        return Ok((head, Vec::new()));
    }
    let len = match head.body {
        BodyLength::Exactly(n) if n <= BODY_LIMIT as u64 => n as usize,
        BodyLength::Exactly(_) => return Err(Refusal::Reply(Reply::text(413, "body over 8 KiB"))),
        _ => {
            return Err(Refusal::Reply(Reply::text(
                411,
                "a Content-Length is needed",
            )))
        }
    };
    let mut body = buf.get(head.len..).unwrap_or_default().to_vec();
    if body.len() < len {
        let start = body.len();
        body.resize(len, 0);
        client
            .read_exact(&mut body[start..])
            .await
            .map_err(Refusal::Io)?;
    }
    body.truncate(len);
    Ok((head, body))
}

/// Writes the reply, then close_notify; the bytes written.
async fn send(client: &mut TlsStream<ReadAhead>, reply: &Reply, head_only: bool) -> usize {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.reason(),
        reply.content_type,
        reply.body.len()
    );
    if let Some(allow) = reply.allow {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    if let Some(age) = reply.max_age {
        out.push_str(&format!("Cache-Control: max-age={age}\r\n"));
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&reply.body);
    }
    if client.write_all(out.as_bytes()).await.is_err() {
        return 0;
    }
    let _ = client.shutdown().await;
    drain(client).await;
    out.len()
}

/// What the client still sends (a body not read, as for a 413) is read
/// and dropped, bounded, before the socket closes: closed with unread
/// bytes, it would be reset, and the client might never see the answer.
async fn drain(client: &mut TlsStream<ReadAhead>) {
    const LIMIT: usize = 64 * 1024;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(1);
    let mut buf = [0u8; 4096];
    let mut read = 0;
    while read < LIMIT {
        match tokio::time::timeout(WAIT, client.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => read += n,
            _ => return,
        }
    }
}
