//! Every request to the CA goes through [`CaClient`], which wraps the HTTPS
//! client instant-acme is given. It does what instant-acme does not:
//!
//! - **Names the request in errors.** An answer that is not a success and
//!   not an ACME problem document (a proxy's HTML error page, a load
//!   balancer's 502), any 5xx, and a 429 become [`CaError`]: `GET
//!   https://…/directory: HTTP 502 Bad Gateway: <body>`, where instant-acme
//!   alone would report a JSON error or lose the `Retry-After`.
//! - **Bounds each try** ([`TRY_TIMEOUT`]): a CA, or a load balancer in front
//!   of one, that takes the connection and never answers.
//! - **Sends again only what is safe to send again.** A GET or HEAD (the
//!   directory, a nonce, a renewal window) that got no answer or a 5xx, and a
//!   POST whose connection was never made, are tried again [`RETRIES`] times
//!   with short jittered waits, or after the answer's short `Retry-After`.
//!   Any other POST is not: the CA may have carried it out before the answer
//!   was lost, and instant-acme would sign and send it as new (two orders,
//!   or a certificate finalized twice). Whether to make such an ACME
//!   operation again is [`super::retry`]'s call, which knows what it does.
//!
//! What the CA says of a request itself (4xx problems but 429) passes
//! through untouched: instant-acme reads it (`badNonce` among them).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use tracing::debug;

/// Retries after the first try, for what is safe to send again.
pub const RETRIES: u32 = 3;
/// The first wait; doubled for each retry, then spread ±50 %.
const FIRST_WAIT: Duration = Duration::from_millis(250);
/// A `Retry-After` longer than this is not waited for inside an order: the
/// error goes up, and the host's backoff takes over.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(10);
/// One try, from sending the request to the end of the answer.
pub const TRY_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of an error body goes into a message.
const BODY_SHOWN: usize = 200;

/// A request to the CA that failed: what was asked, and what came back (an
/// HTTP status and what the body said), or why nothing came back.
#[derive(Debug)]
pub struct CaError {
    pub method: Method,
    pub url: String,
    /// `None`: no answer at all (connection refused, TLS, timeout, reset).
    pub status: Option<StatusCode>,
    /// What the body said: a problem document's type and detail, or the
    /// start of the text.
    pub detail: String,
    /// The answer's `Retry-After`, as a wait from when it came.
    pub retry_after: Option<Duration>,
    /// Whether the CA may have received the request: false only when the
    /// connection was never made.
    pub sent: bool,
    pub(crate) source: Option<Box<dyn StdError + Send + Sync>>,
}

impl fmt::Display for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.url)?;
        if let Some(status) = self.status {
            write!(f, ": HTTP {status}")?;
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

impl StdError for CaError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl CaError {
    /// The CA or the way to it failed, and said nothing about the request
    /// itself: worth trying again soon (if it is safe to).
    pub fn is_transient(&self) -> bool {
        self.status.is_none_or(|s| s.is_server_error())
            && self.retry_after.is_none_or(|d| d <= RETRY_AFTER_CAP)
    }

    /// A GET or HEAD: reading, never changing anything at the CA.
    fn is_read(&self) -> bool {
        self.method == Method::GET || self.method == Method::HEAD
    }

    /// Whether this client may send the same request again.
    fn may_resend(&self) -> bool {
        self.is_transient() && (self.is_read() || !self.sent)
    }

    /// No answer to a request: `source` says why.
    fn unanswered(
        method: &Method,
        uri: &Uri,
        sent: bool,
        source: Box<dyn StdError + Send + Sync>,
    ) -> CaError {
        CaError {
            method: method.clone(),
            url: uri.to_string(),
            status: None,
            detail: String::new(),
            retry_after: None,
            sent,
            source: Some(source),
        }
    }
}

/// Whether the connection for a request was never made, so the request
/// never left: hyper says so of a connect error, and a refused connection
/// says so itself.
fn never_sent(e: &instant_acme::Error) -> bool {
    let mut next: Option<&(dyn StdError + 'static)> = match e {
        // `Other` is transparent: its own source() skips the inner error.
        instant_acme::Error::Other(inner) => Some(inner.as_ref()),
        other => Some(other),
    };
    while let Some(err) = next {
        if let Some(h) = err.downcast_ref::<hyper_util::client::legacy::Error>() {
            if h.is_connect() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        next = err.source();
    }
    false
}

/// The CA's HTTPS client, with errors named and transient failures retried.
pub struct CaClient {
    /// Shared with each request's future, which must own what it uses.
    inner: Arc<dyn HttpClient>,
}

impl CaClient {
    pub fn new(inner: Box<dyn HttpClient>) -> CaClient {
        CaClient {
            inner: Arc::from(inner),
        }
    }
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let inner = self.inner.clone();
        let (parts, body) = req.into_parts();
        Box::pin(async move {
            // Each try sends its own copy of the request.
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(never) => match never {},
            };
            let mut retries = 0;
            loop {
                let mut copy = Request::builder()
                    .method(parts.method.clone())
                    .uri(parts.uri.clone());
                if let Some(headers) = copy.headers_mut() {
                    *headers = parts.headers.clone();
                }
                let copy = copy.body(if body.is_empty() {
                    BodyWrapper::default()
                } else {
                    BodyWrapper::from(body.to_vec())
                })?;
                let (method, uri) = (&parts.method, &parts.uri);
                let tried = tokio::time::timeout(TRY_TIMEOUT, async {
                    match inner.request(copy).await {
                        Ok(answer) => inspect(method, uri, answer).await,
                        Err(e) => Err(CaError::unanswered(
                            method,
                            uri,
                            !never_sent(&e),
                            Box::new(e),
                        )),
                    }
                })
                .await;
                let error = match tried {
                    Ok(Ok(answer)) => return Ok(answer),
                    Ok(Err(e)) => e,
                    Err(_) => {
                        let late = format!(
                            "no answer within {}",
                            humantime::format_duration(TRY_TIMEOUT)
                        );
                        CaError::unanswered(method, uri, true, late.into())
                    }
                };
                if retries >= RETRIES || !error.may_resend() {
                    return Err(instant_acme::Error::Other(Box::new(error)));
                }
                retries += 1;
                let wait = error
                    .retry_after
                    .unwrap_or_else(|| backoff(FIRST_WAIT, retries, fastrand::f64()));
                debug!(
                    error = %crate::acme::causes(&error),
                    retry_in_ms = wait.as_millis() as u64,
                    "CA request failed on the way; trying again"
                );
                tokio::time::sleep(wait).await;
            }
        })
    }
}

/// The answer, its body read whole (within the try's deadline), or a
/// [`CaError`] for one that broke off, or is neither a success nor a problem
/// document instant-acme can read (or is a 5xx).
async fn inspect(
    method: &Method,
    uri: &Uri,
    mut answer: BytesResponse,
) -> Result<BytesResponse, CaError> {
    let status = answer.parts.status;
    let body = match answer.body.into_bytes().await {
        Ok(b) => b,
        // Sent, and maybe carried out: lost on the way like no answer at all.
        Err(e) => {
            let broke = format!("the answer (HTTP {status}) broke off");
            return Err(CaError::unanswered(
                method,
                uri,
                true,
                format!("{broke}: {e}").into(),
            ));
        }
    };
    let fine = status.is_success() || status.is_redirection() || status.is_informational();
    if fine {
        return Ok(BytesResponse {
            parts: answer.parts,
            body: Box::new(body),
        });
    }
    let error = |detail: String| CaError {
        method: method.clone(),
        url: uri.to_string(),
        status: Some(status),
        detail,
        retry_after: retry_after(&answer.parts.headers, SystemTime::now()),
        sent: true,
        source: None,
    };
    let problem = serde_json::from_slice::<instant_acme::Problem>(&body).ok();
    match problem {
        // A 4xx problem document is the CA's answer to this request:
        // instant-acme reads it (badNonce among them). But a 429's
        // Retry-After (a rate limit) must not be lost on the way.
        Some(_) if !status.is_server_error() && status != StatusCode::TOO_MANY_REQUESTS => {
            Ok(BytesResponse {
                parts: answer.parts,
                body: Box::new(body),
            })
        }
        Some(p) => {
            let detail = match (p.r#type, p.detail) {
                (Some(t), Some(d)) => format!("{t}: {d}"),
                (Some(t), None) => t,
                (None, Some(d)) => d,
                (None, None) => String::new(),
            };
            Err(error(detail))
        }
        None => Err(error(shown(&body))),
    }
}

/// The start of a body, on one line, printable.
fn shown(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(BODY_SHOWN)]);
    let mut out: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    if body.len() > BODY_SHOWN {
        out.push_str(" …");
    }
    out
}

/// `Retry-After` (RFC 9110 §10.2.3: seconds, or an HTTP date) as a wait from `now`.
fn retry_after(headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// The wait before retry number `n` (1 = the first): `first`, doubled per
/// retry, spread ±50 % by `draw` (0..1) so that many clients do not retry
/// in step.
pub fn backoff(first: Duration, n: u32, draw: f64) -> Duration {
    let doublings = n.saturating_sub(1).min(8);
    first
        .saturating_mul(1 << doublings)
        .mul_f64(0.5 + draw.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// What the scripted CA answers, in order: a status, headers and a
    /// body, or no connection.
    type Answer = Option<(u16, &'static [(&'static str, &'static str)], &'static str)>;

    /// Every request the scripted CA got: its method and body.
    type Seen = Arc<Mutex<Vec<(Method, Bytes)>>>;

    /// A CA that answers from a script and records every request body.
    struct Scripted {
        answers: Mutex<VecDeque<Answer>>,
        seen: Seen,
    }

    impl HttpClient for Scripted {
        fn request(
            &self,
            req: Request<BodyWrapper<Bytes>>,
        ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>>
        {
            let answer = self.answers.lock().unwrap().pop_front().flatten();
            let seen = self.seen.clone();
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                seen.lock().unwrap().push((parts.method, body));
                let Some((status, headers, text)) = answer else {
                    let refused = std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "Connection refused (os error 111)",
                    );
                    return Err(instant_acme::Error::Other(Box::new(refused)));
                };
                let mut rsp = http::Response::builder().status(status);
                for (k, v) in headers {
                    rsp = rsp.header(*k, *v);
                }
                let full = http_body_util::Full::new(Bytes::from_static(text.as_bytes()));
                Ok(BytesResponse::from(rsp.body(full).unwrap()))
            })
        }
    }

    fn ca(answers: &[Answer]) -> (CaClient, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let client = CaClient::new(Box::new(Scripted {
            answers: Mutex::new(answers.iter().cloned().collect()),
            seen: seen.clone(),
        }));
        (client, seen)
    }

    fn post(body: &str) -> Request<BodyWrapper<Bytes>> {
        Request::builder()
            .method(Method::POST)
            .uri("https://ca.test/acme/new-order")
            .body(BodyWrapper::from(body.as_bytes().to_vec()))
            .unwrap()
    }

    fn failure(r: Result<BytesResponse, instant_acme::Error>) -> String {
        match r {
            Ok(_) => panic!("succeeded"),
            Err(instant_acme::Error::Other(e)) => {
                let ca = e.downcast_ref::<CaError>().expect("a CaError");
                crate::acme::causes(ca)
            }
            Err(e) => panic!("not a CaError: {e}"),
        }
    }

    const NONE: &[(&str, &str)] = &[];
    const HTML: &[(&str, &str)] = &[("content-type", "text/html")];
    const PROBLEM: &[(&str, &str)] = &[("content-type", "application/problem+json")];

    #[tokio::test(start_paused = true)]
    async fn a_proxy_error_page_names_the_request_and_the_status() {
        let page = "<html>\n<body>502 Bad Gateway</body>\n</html>\n";
        let (client, seen) = ca(&[Some((502, HTML, page)); 4]);
        let text = failure(client.request(get("https://ca.test/dir")).await);
        assert_eq!(
            text,
            "GET https://ca.test/dir: HTTP 502 Bad Gateway: <html> <body>502 Bad Gateway</body> </html>"
        );
        assert_eq!(seen.lock().unwrap().len(), 4, "three retries");
    }

    fn get(url: &str) -> Request<BodyWrapper<Bytes>> {
        Request::builder()
            .method(Method::GET)
            .uri(url)
            .body(BodyWrapper::default())
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_that_failed_on_the_way_is_sent_again() {
        let (client, seen) = ca(&[
            Some((500, HTML, "oops")),
            None,
            Some((200, NONE, "{\"newNonce\":\"x\"}")),
        ]);
        let started = tokio::time::Instant::now();
        let mut answer = client.request(get("https://ca.test/dir")).await.unwrap();
        assert_eq!(answer.parts.status, 200);
        let body = answer.body.into_bytes().await.unwrap();
        assert_eq!(&body[..], b"{\"newNonce\":\"x\"}");
        assert_eq!(seen.lock().unwrap().len(), 3);
        // two waits: 250 ms then 500 ms, each spread ±50 %
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(375) && waited <= Duration::from_millis(1125));
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_is_sent_again_only_if_it_never_left() {
        // The connection refused twice: the POST never left, so again.
        let (client, seen) = ca(&[None, None, Some((201, NONE, "{}"))]);
        let answer = client.request(post("{\"payload\":\"x\"}")).await.unwrap();
        assert_eq!(answer.parts.status, 201);
        let seen_posts = seen.lock().unwrap().clone();
        assert_eq!(seen_posts.len(), 3);
        for (m, b) in seen_posts {
            assert_eq!((m, &b[..]), (Method::POST, &b"{\"payload\":\"x\"}"[..]));
        }
        // A 5xx: the CA may have carried it out. Not sent again here.
        let (client, seen) = ca(&[Some((502, HTML, "bad gateway")), Some((201, NONE, "{}"))]);
        let text = failure(client.request(post("{}")).await);
        assert_eq!(
            text,
            "POST https://ca.test/acme/new-order: HTTP 502 Bad Gateway: bad gateway"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_keeps_its_problem_and_retry_after() {
        let limited = "{\"type\":\"urn:ietf:params:acme:error:rateLimited\",\"detail\":\"too many certificates (5) already issued\"}";
        let (client, seen) = ca(&[Some((429, &[("retry-after", "86400")], limited))]);
        let r = client.request(post("{}")).await;
        let Err(instant_acme::Error::Other(e)) = r else {
            panic!("not an error")
        };
        let error = e.downcast_ref::<CaError>().unwrap();
        assert_eq!(
            error.to_string(),
            "POST https://ca.test/acme/new-order: HTTP 429 Too Many Requests: urn:ietf:params:acme:error:rateLimited: too many certificates (5) already issued"
        );
        assert_eq!(error.retry_after, Some(Duration::from_secs(86400)));
        assert!(!error.is_transient());
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_ca_says_of_the_request_itself_passes_through_once() {
        let bad_nonce = "{\"type\":\"urn:ietf:params:acme:error:badNonce\",\"detail\":\"stale\"}";
        let (client, seen) = ca(&[Some((400, PROBLEM, bad_nonce))]);
        let answer = client.request(post("{}")).await.unwrap();
        assert_eq!(answer.parts.status, 400, "instant-acme reads it");
        assert_eq!(seen.lock().unwrap().len(), 1);

        let (client, seen) = ca(&[Some((404, HTML, "<h1>Not Found</h1>"))]);
        let text = failure(client.request(post("{}")).await);
        assert_eq!(
            text,
            "POST https://ca.test/acme/new-order: HTTP 404 Not Found: <h1>Not Found</h1>"
        );
        assert_eq!(seen.lock().unwrap().len(), 1, "a 4xx is not retried");
    }

    #[tokio::test(start_paused = true)]
    async fn a_5xx_problem_document_is_named_and_a_long_retry_after_is_left_to_the_backoff() {
        let down = "{\"type\":\"urn:ietf:params:acme:error:serverInternal\",\"detail\":\"down for maintenance\"}";
        let (client, seen) = ca(&[Some((503, &[("retry-after", "3600")], down))]);
        let r = client.request(post("{}")).await;
        let Err(instant_acme::Error::Other(e)) = r else {
            panic!("not an error")
        };
        let error = e.downcast_ref::<CaError>().unwrap();
        assert_eq!(error.retry_after, Some(Duration::from_secs(3600)));
        assert!(!error.is_transient());
        assert_eq!(
            error.to_string(),
            "POST https://ca.test/acme/new-order: HTTP 503 Service Unavailable: urn:ietf:params:acme:error:serverInternal: down for maintenance"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);

        // a short Retry-After is waited for, exactly
        let (client, _) = ca(&[
            Some((503, &[("retry-after", "2")], down)),
            Some((200, NONE, "{}")),
        ]);
        let started = tokio::time::Instant::now();
        client.request(get("https://ca.test/dir")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn no_connection_is_retried_then_says_why() {
        let (client, seen) = ca(&[None, None, None, None]);
        let text = failure(client.request(get("https://127.0.0.1:9/dir")).await);
        assert_eq!(
            text,
            "GET https://127.0.0.1:9/dir: Connection refused (os error 111)"
        );
        assert_eq!(seen.lock().unwrap().len(), 4);
    }

    /// A body that fails after its headers (`stall`: never ends instead).
    struct BadBody {
        stall: bool,
    }

    impl http_body::Body for BadBody {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            if self.stall {
                return std::task::Poll::Pending;
            }
            let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
            std::task::Poll::Ready(Some(Err(reset)))
        }
    }

    /// A CA whose 200 answers break off (or stall) in their bodies.
    struct BadBodies {
        stall: bool,
        seen: Arc<Mutex<usize>>,
    }

    impl HttpClient for BadBodies {
        fn request(
            &self,
            _: Request<BodyWrapper<Bytes>>,
        ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>>
        {
            *self.seen.lock().unwrap() += 1;
            let body = BadBody { stall: self.stall };
            let rsp = http::Response::builder().status(200).body(body).unwrap();
            Box::pin(async move { Ok(BytesResponse::from(rsp)) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_breaks_off_or_stalls_is_lost_on_the_way() {
        for stall in [false, true] {
            let seen = Arc::new(Mutex::new(0));
            let client = CaClient::new(Box::new(BadBodies {
                stall,
                seen: seen.clone(),
            }));
            let started = tokio::time::Instant::now();
            // A POST may have been carried out: not sent again here, and
            // reported as sent without an answer (retry.rs makes it again).
            let Err(instant_acme::Error::Other(e)) = client.request(post("{}")).await else {
                panic!("no error")
            };
            let error = e.downcast_ref::<CaError>().unwrap();
            assert_eq!((error.status, error.sent), (None, true), "{error}");
            assert!(error.is_transient());
            assert_eq!(*seen.lock().unwrap(), 1);
            if stall {
                assert_eq!(started.elapsed(), TRY_TIMEOUT, "bounded by the try");
            } else {
                let text = crate::acme::causes(error);
                assert!(text.contains("(HTTP 200 OK) broke off: reset"), "{text}");
            }
            // A read is sent again.
            assert!(client.request(get("https://ca.test/dir")).await.is_err());
            assert_eq!(*seen.lock().unwrap(), 1 + 1 + RETRIES as usize);
        }
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert(http::header::RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        h.insert(http::header::RETRY_AFTER, later.parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        h.insert(http::header::RETRY_AFTER, past.parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        h.insert(http::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h, now), None);
    }

    #[test]
    fn waits_double_with_jitter() {
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(backoff(FIRST_WAIT, 1, 0.5)), 250);
        assert_eq!(ms(backoff(FIRST_WAIT, 2, 0.5)), 500);
        assert_eq!(ms(backoff(FIRST_WAIT, 3, 0.5)), 1000);
        assert_eq!(ms(backoff(FIRST_WAIT, 1, 0.0)), 125);
        assert_eq!(ms(backoff(FIRST_WAIT, 1, 1.0)), 375);
        assert_eq!(ms(backoff(FIRST_WAIT, u32::MAX, 0.5)), 64_000, "bounded");
    }
}
