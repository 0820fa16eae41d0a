//! Every request to the CA goes through [`CaClient`], which wraps the HTTPS
//! client instant-acme is given. It does two things instant-acme does not:
//!
//! - **Names the request in errors.** An answer that is not a success and
//!   not an ACME problem document (a proxy's HTML error page, a load
//!   balancer's 502) becomes [`CaError`]: `GET https://…/directory: HTTP 502
//!   Bad Gateway: <body>`, where instant-acme alone would report a JSON
//!   error. A 5xx with a problem document is reported the same way, with the
//!   problem's type and detail.
//! - **Rides out what fails on the way.** No connection, or a 5xx answer, is
//!   tried again [`RETRIES`] times with short jittered waits, or after the
//!   answer's `Retry-After` when that is short. Sending the same request
//!   twice is safe in ACME: every POST is signed over a one-time nonce, so a
//!   copy the CA has already seen is refused with `badNonce`, which
//!   instant-acme answers by signing anew.
//!
//! What a request's own content is refused for (4xx problems, rate limits)
//! passes through untouched: retrying it would only fail again.

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

/// Retries after the first try, for a failed connection or a 5xx answer.
pub const RETRIES: u32 = 3;
/// The first wait; doubled for each retry, then spread ±50 %.
const FIRST_WAIT: Duration = Duration::from_millis(250);
/// A `Retry-After` longer than this is not waited for inside an order: the
/// error goes up, and the order's own backoff takes over.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(10);
/// How much of an error body goes into a message.
const BODY_SHOWN: usize = 200;

/// A request to the CA that failed: what was asked, and what came back (an
/// HTTP status and what the body said), or the transport error.
#[derive(Debug)]
pub struct CaError {
    pub method: Method,
    pub url: String,
    /// `None`: no answer at all (connection refused, TLS, timeout).
    pub status: Option<StatusCode>,
    /// What the body said: a problem document's type and detail, or the
    /// start of the text.
    pub detail: String,
    /// The answer's `Retry-After`, as a wait from when it came.
    pub retry_after: Option<Duration>,
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
    /// Worth trying again soon: the CA or the way to it failed, and said
    /// nothing about the request itself.
    pub fn is_transient(&self) -> bool {
        self.status.is_none_or(|s| s.is_server_error())
            && self.retry_after.is_none_or(|d| d <= RETRY_AFTER_CAP)
    }
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
                let error = match inner.request(copy).await {
                    Ok(answer) => match inspect(&parts.method, &parts.uri, answer).await {
                        Ok(answer) => return Ok(answer),
                        Err(e) => e,
                    },
                    Err(e) => CaError {
                        method: parts.method.clone(),
                        url: parts.uri.to_string(),
                        status: None,
                        detail: String::new(),
                        retry_after: None,
                        source: Some(Box::new(e)),
                    },
                };
                if retries >= RETRIES || !error.is_transient() {
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

/// The answer as it came, or a [`CaError`] for one that is neither a
/// success nor a problem document instant-acme can read (or is a 5xx).
async fn inspect(
    method: &Method,
    uri: &Uri,
    mut answer: BytesResponse,
) -> Result<BytesResponse, CaError> {
    let status = answer.parts.status;
    let fine = status.is_success() || status.is_redirection() || status.is_informational();
    if fine {
        return Ok(answer);
    }
    let error = |detail: String, source: Option<Box<dyn StdError + Send + Sync>>| CaError {
        method: method.clone(),
        url: uri.to_string(),
        status: Some(status),
        detail,
        retry_after: retry_after(&answer.parts.headers, SystemTime::now()),
        source,
    };
    let body = match answer.body.into_bytes().await {
        Ok(b) => b,
        Err(e) => return Err(error("the answer broke off".into(), Some(e))),
    };
    let problem = serde_json::from_slice::<instant_acme::Problem>(&body).ok();
    match problem {
        // A 4xx problem document is the CA's answer to this request:
        // instant-acme reads it (badNonce among them).
        Some(_) if !status.is_server_error() => Ok(BytesResponse {
            parts: answer.parts,
            body: Box::new(body),
        }),
        Some(p) => {
            let detail = match (p.r#type, p.detail) {
                (Some(t), Some(d)) => format!("{t}: {d}"),
                (Some(t), None) => t,
                (None, Some(d)) => d,
                (None, None) => String::new(),
            };
            Err(error(detail, None))
        }
        None => Err(error(shown(&body), None)),
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
        let text = failure(client.request(post("{}")).await);
        assert_eq!(
            text,
            "POST https://ca.test/acme/new-order: HTTP 502 Bad Gateway: <html> <body>502 Bad Gateway</body> </html>"
        );
        assert_eq!(seen.lock().unwrap().len(), 4, "three retries");
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_5xx_is_retried_with_the_same_request() {
        let (client, seen) = ca(&[
            Some((500, HTML, "oops")),
            None,
            Some((201, NONE, "{\"status\":\"pending\"}")),
        ]);
        let started = tokio::time::Instant::now();
        let mut answer = client.request(post("{\"payload\":\"x\"}")).await.unwrap();
        assert_eq!(answer.parts.status, 201);
        let body = answer.body.into_bytes().await.unwrap();
        assert_eq!(&body[..], b"{\"status\":\"pending\"}");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert!(seen
            .iter()
            .all(|(m, b)| *m == Method::POST && &b[..] == b"{\"payload\":\"x\"}"));
        // two waits: 250 ms then 500 ms, each spread ±50 %
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(375) && waited <= Duration::from_millis(1125));
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
        client.request(post("{}")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn no_connection_is_retried_then_says_why() {
        let (client, seen) = ca(&[None, None, None, None]);
        let get = Request::builder()
            .method(Method::GET)
            .uri("https://127.0.0.1:9/dir")
            .body(BodyWrapper::default())
            .unwrap();
        let text = failure(client.request(get).await);
        assert_eq!(
            text,
            "GET https://127.0.0.1:9/dir: Connection refused (os error 111)"
        );
        assert_eq!(seen.lock().unwrap().len(), 4);
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
