//! Port 80. `GET /.well-known/acme-challenge/<token>` answers with the key
//! authorization of an open http-01 challenge (exact token match,
//! `text/plain`). Any other request is redirected to `https://<host><path>`,
//! or, when the host names a backend for this listener, forwarded to it whole
//! with a PROXY header. Nothing else is served on port 80.
//!
//! Answers close the connection (`Connection: close`). A forwarded connection
//! is relayed as it is from then on: the backend serves whatever follows.
//! A request with two Host headers is refused, so portcullis and the backend
//! never disagree on which host it is for.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::info;

use super::backend;
use super::context::{ListenerCtx, Stop};
use super::outcome::{Outcome, Ready};
use super::runtime::Live;
use crate::config::names::Hostname;
use crate::tls::hosts::Matched;

/// Longest request head read: a request line and ordinary headers.
const HEAD_LIMIT: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;
const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// What to do with one request head.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// An http-01 key authorization.
    Challenge(String),
    /// No such challenge (or not GET/HEAD).
    NotFound,
    Redirect(String),
    /// Forward the request to the host's backend.
    Forward(Hostname),
    BadRequest(&'static str),
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    /// The Host header without its port, lowercase; `None` if absent or not a name.
    pub host: Option<Hostname>,
    /// Bytes of the head including the blank line.
    pub len: usize,
    /// The body that follows, as its headers say.
    pub body: BodyLength,
}

/// How long a request's body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyLength {
    /// No Content-Length and no Transfer-Encoding: none.
    None,
    Exactly(u64),
    /// Chunked, or a Content-Length that is not one number.
    Unknown,
}

/// Parses a request head; `Ok(None)`: incomplete, read more.
pub fn parse(buf: &[u8]) -> Result<Option<Head>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many headers"),
        Err(_) => return Err("malformed request"),
    };
    let path = req.path.unwrap_or("/");
    // RFC 9112 §3.2.2: in an absolute-form target the URL's authority wins
    // over the Host header.
    let authority = path
        .strip_prefix("http://")
        .or_else(|| path.strip_prefix("https://"))
        .map(|rest| rest.split(['/', '?']).next().unwrap_or_default());
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let header = hosts.next().and_then(|h| std::str::from_utf8(h.value).ok());
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let host = authority.or(header).and_then(|v| {
        let v = v.trim();
        // `name:port`; an IPv6 literal (`[::1]:80`) is not a name.
        let name = v.rsplit_once(':').map_or(v, |(n, _)| n);
        Hostname::parse(name).ok()
    });
    let mut body = BodyLength::None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            body = BodyLength::Unknown;
        } else if h.name.eq_ignore_ascii_case("content-length") && body == BodyLength::None {
            body = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .map_or(BodyLength::Unknown, BodyLength::Exactly);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            body = BodyLength::Unknown;
        }
    }
    Ok(Some(Head {
        method: req.method.unwrap_or_default().to_string(),
        path: path.to_string(),
        host,
        len,
        body,
    }))
}

/// The answer to a request, given the open challenges and whether its host
/// has a backend on this listener.
pub fn answer(
    head: &Head,
    challenge: impl Fn(&str) -> Option<String>,
    forwards: impl Fn(&Hostname) -> bool,
) -> Answer {
    if let Some(token) = head.path.strip_prefix(CHALLENGE_PREFIX) {
        let readable = head.method == "GET" || head.method == "HEAD";
        return match challenge(token) {
            Some(key_auth) if readable => Answer::Challenge(key_auth),
            _ => Answer::NotFound,
        };
    }
    let Some(host) = &head.host else {
        return Answer::BadRequest("no Host header with a DNS name");
    };
    if forwards(host) {
        return Answer::Forward(host.clone());
    }
    if !head.path.starts_with('/') {
        return Answer::BadRequest("the request target is not a path");
    }
    Answer::Redirect(format!("https://{}{}", host.as_str(), head.path))
}

/// The HTTP response for an answer that is not a forward.
fn response(answer: &Answer, head_only: bool) -> Vec<u8> {
    let (status, body, location) = match answer {
        Answer::Challenge(k) => ("200 OK", k.clone(), None),
        Answer::NotFound => ("404 Not Found", "not found\n".to_string(), None),
        Answer::Redirect(to) => (
            "301 Moved Permanently",
            format!("moved to {to}\n"),
            Some(to.as_str()),
        ),
        Answer::BadRequest(why) => ("400 Bad Request", format!("{why}\n"), None),
        Answer::Forward(_) => ("500 Internal Server Error", String::new(), None),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(to) = location {
        out.push_str(&format!("Location: {to}\r\n"));
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&body);
    }
    out.into_bytes()
}

/// `429 Too Many Requests` (RFC 6585 §4) for a client over its per-address
/// limit, sent at accept before its request is read.
pub fn too_many(phrase: &str, retry_after: u64) -> Vec<u8> {
    format!(
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nRetry-After: {retry_after}\r\nConnection: close\r\n\r\n{phrase}\n",
        phrase.len() + 1
    )
    .into_bytes()
}

/// What a client hears when its host's backend is down or drained.
const UNAVAILABLE: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 20\r\nConnection: close\r\n\r\nbackend unavailable\n";

/// Serves one connection on an http listener: answers it, or returns the
/// client and its backend (the request head already sent on) for the relay.
pub(crate) async fn serve(
    mut socket: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: &ListenerCtx,
    stop: &Stop,
    live: &Live,
    session: &mut Outcome,
) -> Option<Ready> {
    tracing::Span::current().record("tls.version", "none");
    let (buf, head) = request(&mut socket, ctx, stop, session).await?;
    let table = &ctx.table;
    // Looked up first: in a cluster the answer may be in the store.
    let readable = head.method == "GET" || head.method == "HEAD";
    let posted = match head.path.strip_prefix(CHALLENGE_PREFIX) {
        Some(token) if readable => ctx.challenges.http_answer(token).await,
        _ => None,
    };
    let answer = answer(
        &head,
        |_| posted.clone(),
        |host| {
            let (found, how) = table.lookup(Some(host.as_str()));
            matches!(how, Matched::Exact | Matched::Wildcard)
                && found.is_some_and(|h| h.backends.contains_key(&ctx.listener.name))
        },
    );
    note(&answer, &head, session);
    let Answer::Forward(host) = answer else {
        let head_only = head.method == "HEAD";
        let _ = socket.write_all(&response(&answer, head_only)).await;
        let _ = socket.shutdown().await;
        return None;
    };
    tracing::Span::current().record("sni", host.as_str());
    let (found, _) = table.lookup(Some(host.as_str()));
    let Some(backend) = found.and_then(|h| h.backends.get(&ctx.listener.name).cloned()) else {
        session.fail(
            "no_backend",
            format!("host {host} has no backend on this listener"),
        );
        return None;
    };
    tracing::Span::current().record("backend", tracing::field::display(backend.address));
    live.routed(Some(host.as_str()), backend.address);
    let gate = ctx.runtime.backend(backend.address);
    if gate.as_ref().is_some_and(|g| g.is_drained()) {
        session.end(
            "backend_drained",
            format!("backend {} is drained", backend.address),
        );
        let _ = socket.write_all(UNAVAILABLE).await;
        let _ = socket.shutdown().await;
        return None;
    }
    let upstream = tokio::select! {
        r = backend::connect(&backend, peer, local, None) => r,
        _ = stop.accepting.cancelled() => Err(io::Error::other("shutting down")),
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            ctx.metrics.backend_failed(backend.address);
            if let Some(g) = &gate {
                g.failed(e.to_string());
            }
            session.fail("backend_unavailable", e.to_string());
            let _ = socket.write_all(UNAVAILABLE).await;
            let _ = socket.shutdown().await;
            return None;
        }
    };
    if let Err(e) = upstream.write_all(&buf).await {
        session.fail("backend_unavailable", e.to_string());
        return None;
    }
    session.count_up(buf.len());
    Some(Ready::Plain(socket, upstream))
}

/// The request head, within `timeouts.handshake`; a bad one is answered
/// with a 400. `None`: the session is over.
async fn request(
    socket: &mut TcpStream,
    ctx: &ListenerCtx,
    stop: &Stop,
    session: &mut Outcome,
) -> Option<(Vec<u8>, Head)> {
    let read = tokio::time::timeout(ctx.timeouts.handshake, read_head(socket, HEAD_LIMIT));
    tokio::select! {
        r = read => match r {
            Ok(Ok(got)) => Some(got),
            Ok(Err(Unread::Bad(why))) => {
                session.end("bad_request", why.to_string());
                let _ = socket.write_all(&response(&Answer::BadRequest(why), false)).await;
                None
            }
            Ok(Err(Unread::Io(e))) => {
                session.end("client_left", e.to_string());
                None
            }
            Err(_) => {
                session.end("request_timeout", None);
                None
            }
        },
        _ = stop.accepting.cancelled() => {
            session.end("shutdown", None);
            None
        }
    }
}

/// How an answer ends the session (a forward ends with its relay).
fn note(answer: &Answer, head: &Head, session: &mut Outcome) {
    match answer {
        Answer::Challenge(_) => {
            info!(path = %head.path, "acme http-01 challenge answered");
            session.end("acme_challenge", None);
        }
        Answer::NotFound if head.path.starts_with(CHALLENGE_PREFIX) => {
            session.end(
                "acme_challenge",
                format!("no open challenge for {}", head.path),
            );
        }
        Answer::BadRequest(why) => session.end("bad_request", why.to_string()),
        Answer::NotFound => session.end("not_found", None),
        Answer::Redirect(_) => session.end("redirected", None),
        Answer::Forward(_) => {}
    }
}

/// Why no request head was read.
pub(crate) enum Unread {
    Io(io::Error),
    /// Not a request we take: answered with a 400 saying this.
    Bad(&'static str),
}

/// Reads until a whole request head is in (at most `limit` bytes); returns
/// everything read so far.
pub(crate) async fn read_head(
    socket: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: usize,
) -> Result<(Vec<u8>, Head), Unread> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = socket.read(&mut chunk).await.map_err(Unread::Io)?;
        if n == 0 {
            return Err(Unread::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a request",
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse(&buf) {
            Ok(Some(head)) => return Ok((buf, head)),
            Ok(None) if buf.len() < limit => continue,
            Ok(None) => return Err(Unread::Bad("request head longer than 8 KiB")),
            Err(why) => return Err(Unread::Bad(why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn heads_parse_at_every_split() {
        let text = "GET /a?b=c HTTP/1.1\r\nHost: Mail.Example.Test:80\r\nUser-Agent: t\r\n\r\n";
        for cut in 0..text.len() {
            assert_eq!(parse(&text.as_bytes()[..cut]), Ok(None), "cut at {cut}");
        }
        let h = head(text);
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/a?b=c");
        assert_eq!(h.host.unwrap().as_str(), "mail.example.test");
        assert_eq!(h.len, text.len());
        assert_eq!(
            parse(b"\x16\x03\x01\x00\x05hello\r\n\r\n"),
            Err("malformed request")
        );
    }

    #[test]
    fn answers() {
        let open = |t: &str| (t == "tok").then(|| "tok.thumb".to_string());
        let forwards = |h: &Hostname| h.as_str() == "webmail.example.test";
        let cases = [
            (
                "GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: mail.example.test\r\n\r\n",
                Answer::Challenge("tok.thumb".into()),
            ),
            (
                "HEAD /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a.test\r\n\r\n",
                Answer::Challenge("tok.thumb".into()),
            ),
            (
                "POST /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a.test\r\n\r\n",
                Answer::NotFound,
            ),
            (
                "GET /.well-known/acme-challenge/tok2 HTTP/1.1\r\nHost: a.test\r\n\r\n",
                Answer::NotFound,
            ),
            (
                "GET /.well-known/acme-challenge/to HTTP/1.1\r\n\r\n",
                Answer::NotFound,
            ),
            (
                "GET /mail/?x=1 HTTP/1.1\r\nHost: mail.example.test:80\r\n\r\n",
                Answer::Redirect("https://mail.example.test/mail/?x=1".into()),
            ),
            (
                "GET / HTTP/1.1\r\nHost: webmail.example.test\r\n\r\n",
                Answer::Forward(Hostname::parse("webmail.example.test").unwrap()),
            ),
            (
                "GET / HTTP/1.0\r\n\r\n",
                Answer::BadRequest("no Host header with a DNS name"),
            ),
            (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                Answer::BadRequest("no Host header with a DNS name"),
            ),
            (
                "GET http://evil.test/ HTTP/1.1\r\nHost: mail.example.test\r\n\r\n",
                Answer::BadRequest("the request target is not a path"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(answer(&head(text), open, forwards), want, "{text:?}");
        }
    }

    #[test]
    fn responses_carry_length_type_and_location() {
        let r = String::from_utf8(response(&Answer::Challenge("tok.thumb".into()), false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain\r\n"));
        assert!(r.contains("Content-Length: 9\r\n"));
        assert!(r.ends_with("\r\n\r\ntok.thumb"));
        let r = String::from_utf8(response(&Answer::Redirect("https://a.test/x".into()), true))
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 301 Moved Permanently\r\n"));
        assert!(r.contains("Location: https://a.test/x\r\n"));
        assert!(r.ends_with("\r\n\r\n"), "HEAD: no body");
    }
}
