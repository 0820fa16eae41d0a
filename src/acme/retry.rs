//! Making one ACME operation again inside an attempt (an account, a new
//! order, fetching an authorization, a challenge, a poll, finalize, the
//! certificate) when it failed for a reason that says nothing about the
//! request:
//!
//! - `badNonce` that outlived instant-acme's own three tries (a CA under load
//!   rejects nonces at random): made again at once, signed with the fresh
//!   nonce the refusal carried (RFC 8555 §6.5), up to [`NONCE_RETRIES`] times;
//! - a request that got a 5xx, or no answer once sent (for a GET or HEAD,
//!   after [`super::transport`]'s own tries): made again after short
//!   jittered waits (or the answer's short `Retry-After`) for up to
//!   [`RETRY_FOR`]. The CA may have carried it out before the answer was
//!   lost: the callers of operations that change something (a challenge,
//!   finalize) look at the CA's state first (see `authorize` and `finalize`
//!   in [`super`]); a new order made twice leaves an unused order behind,
//!   which is harmless.
//!
//! A request that never left (the connection refused) was tried four times
//! by [`super::transport`] already: a CA that cannot be reached at all fails
//! the attempt at once. Anything else is the CA's answer to the request and
//! goes up: the attempt fails and the host's backoff takes over.

use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use super::transport::{self, CaError};

/// Retries after `badNonce`.
const NONCE_RETRIES: u32 = 5;
/// How long an operation is made again after failures on the way: at 30 %
/// of all answers lost, about one in a hundred thousand operations still
/// fails.
pub const RETRY_FOR: Duration = Duration::from_secs(30);
/// The first wait after a failure on the way; doubled per retry up to
/// [`LONGEST_WAIT`], spread ±50 %.
const FIRST_WAIT: Duration = Duration::from_millis(250);
const LONGEST_WAIT: Duration = Duration::from_secs(4);

/// Why an operation failed, for deciding whether to make it again.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    Nonce,
    /// Lost on the way: a 5xx (with its `Retry-After`), or no answer once sent.
    OnTheWay(Option<Duration>),
    /// About the request itself, or no way to the CA at all.
    Final,
}

/// What `e` says about making the operation again.
pub fn failure(e: &instant_acme::Error) -> Failure {
    match e {
        instant_acme::Error::Api(p)
            if p.r#type
                .as_deref()
                .is_some_and(|t| t.ends_with(":badNonce")) =>
        {
            Failure::Nonce
        }
        instant_acme::Error::Other(inner) => match inner.downcast_ref::<CaError>() {
            Some(ca) if ca.sent && ca.is_transient() => Failure::OnTheWay(ca.retry_after),
            _ => Failure::Final,
        },
        _ => Failure::Final,
    }
}

/// The retry state of one operation.
#[derive(Debug)]
pub struct Again {
    what: &'static str,
    nonces: u32,
    /// When the first failure on the way happened.
    since: Option<Instant>,
    waits: u32,
}

impl Again {
    pub fn new(what: &'static str) -> Again {
        Again {
            what,
            nonces: 0,
            since: None,
            waits: 0,
        }
    }

    /// After a failed call: `Ok` once it is time to call again, `Err(e)` when
    /// `e` is final or the retries are spent.
    pub async fn after(&mut self, e: instant_acme::Error) -> Result<(), instant_acme::Error> {
        let wait = match failure(&e) {
            Failure::Nonce if self.nonces < NONCE_RETRIES => {
                self.nonces += 1;
                Duration::ZERO
            }
            Failure::OnTheWay(retry_after) => {
                let since = *self.since.get_or_insert_with(Instant::now);
                self.waits += 1;
                let wait = retry_after.unwrap_or_else(|| {
                    transport::backoff(FIRST_WAIT, self.waits, fastrand::f64()).min(LONGEST_WAIT)
                });
                if since.elapsed() + wait > RETRY_FOR {
                    return Err(e);
                }
                wait
            }
            _ => return Err(e),
        };
        info!(
            operation = self.what,
            error = %super::causes(&e),
            retry_in_ms = wait.as_millis() as u64,
            "ACME request failed on the way; making it again"
        );
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// Runs `$op` (an expression giving a future of a `Result<_,
/// instant_acme::Error>`, evaluated anew for each call) until it succeeds or
/// [`Again::after`] gives up; the last `Result`.
macro_rules! retrying {
    ($what:expr, $op:expr) => {{
        let mut again = $crate::acme::retry::Again::new($what);
        loop {
            match $op.await {
                Ok(v) => break Ok(v),
                Err(e) => {
                    if let Err(e) = again.after(e).await {
                        break Err(e);
                    }
                }
            }
        }
    }};
}
pub(crate) use retrying;

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(kind: &str) -> instant_acme::Error {
        let json = format!("{{\"type\":\"urn:ietf:params:acme:error:{kind}\",\"detail\":\"x\"}}");
        instant_acme::Error::Api(serde_json::from_str(&json).unwrap())
    }

    fn ca(
        method: &str,
        status: Option<u16>,
        retry_after: Option<u64>,
        sent: bool,
    ) -> instant_acme::Error {
        instant_acme::Error::Other(Box::new(CaError {
            method: method.parse().unwrap(),
            url: "https://ca.test/x".into(),
            status: status.map(|s| http::StatusCode::from_u16(s).unwrap()),
            detail: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
            sent,
            source: None,
        }))
    }

    #[test]
    fn only_failures_on_the_way_are_retried() {
        assert_eq!(failure(&problem("badNonce")), Failure::Nonce);
        assert_eq!(failure(&problem("rateLimited")), Failure::Final);
        assert_eq!(failure(&problem("unauthorized")), Failure::Final);
        assert_eq!(
            failure(&ca("POST", Some(500), None, true)),
            Failure::OnTheWay(None)
        );
        assert_eq!(
            failure(&ca("POST", Some(503), Some(2), true)),
            Failure::OnTheWay(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            failure(&ca("POST", None, None, true)),
            Failure::OnTheWay(None),
            "no answer once sent"
        );
        assert_eq!(
            failure(&ca("POST", Some(503), Some(3600), true)),
            Failure::Final
        );
        assert_eq!(failure(&ca("POST", Some(404), None, true)), Failure::Final);
        assert_eq!(
            failure(&ca("POST", Some(429), Some(60), true)),
            Failure::Final
        );
        assert_eq!(
            failure(&ca("POST", None, None, false)),
            Failure::Final,
            "the CA is unreachable"
        );
        assert_eq!(
            failure(&ca("GET", Some(500), None, true)),
            Failure::OnTheWay(None)
        );
        assert_eq!(
            failure(&ca("GET", None, None, false)),
            Failure::Final,
            "the CA is unreachable"
        );
        assert_eq!(failure(&instant_acme::Error::Crypto), Failure::Final);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_by_count_for_nonces_and_by_time_on_the_way() {
        let mut calls = 0;
        let start = tokio::time::Instant::now();
        let result: Result<(), _> = retrying!("test", async {
            calls += 1;
            Err(problem("badNonce"))
        });
        assert!(result.is_err());
        assert_eq!(calls, 1 + NONCE_RETRIES);
        assert_eq!(start.elapsed(), Duration::ZERO, "no wait after badNonce");

        let mut calls = 0;
        let start = tokio::time::Instant::now();
        let result: Result<(), _> = retrying!("test", async {
            calls += 1;
            Err(ca("POST", Some(502), None, true))
        });
        assert!(result.is_err());
        assert!(start.elapsed() <= RETRY_FOR, "{:?}", start.elapsed());
        assert!(calls >= 8, "about ten calls in {RETRY_FOR:?}: {calls}");

        let mut calls = 0;
        let result = retrying!("test", async {
            calls += 1;
            match calls {
                1 => Err(ca("POST", Some(500), None, true)),
                2 => Err(problem("badNonce")),
                _ => Ok(calls),
            }
        });
        assert_eq!(result.unwrap(), 3);

        let mut calls = 0;
        let result: Result<(), _> = retrying!("test", async {
            calls += 1;
            Err(problem("malformed"))
        });
        assert!(result.is_err());
        assert_eq!(calls, 1, "a final answer is not retried");
    }
}
