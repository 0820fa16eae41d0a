//! Retrying one ACME operation (an account, a new order, an authorization,
//! a challenge, a poll, finalize, the certificate) inside an attempt, when it
//! failed for a reason that says nothing about the request:
//!
//! - `badNonce` that outlived instant-acme's own three tries (a CA under load
//!   rejects nonces at random): called again at once, signed with the fresh
//!   nonce the refusal carried (RFC 8555 §6.5);
//! - a 5xx answer that outlived [`super::transport`]'s retries: called again
//!   after a short jittered wait, or the answer's short `Retry-After`.
//!
//! Calling the operation again (rather than resending bytes) signs it anew.
//! Anything else goes up at once: the attempt fails and the host's backoff
//! takes over. No connection at all is not retried here: the transport has
//! tried four times already, and a CA that is down should fail fast.

use std::time::Duration;

use tracing::info;

use super::transport::{self, CaError};

/// Retries after `badNonce`.
const NONCE_RETRIES: u32 = 5;
/// Retries after a transient CA error.
const CA_RETRIES: u32 = 3;
/// The first wait after a CA error; doubled per retry, spread ±50 %.
const FIRST_WAIT: Duration = Duration::from_millis(500);

/// Why an operation failed, for deciding whether to call it again.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    Nonce,
    /// A 5xx, with the answer's `Retry-After`.
    Ca(Option<Duration>),
    /// About the request itself, or no way to the CA at all.
    Final,
}

/// What `e` says about trying again.
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
            Some(ca) if ca.status.is_some() && ca.is_transient() => Failure::Ca(ca.retry_after),
            _ => Failure::Final,
        },
        _ => Failure::Final,
    }
}

/// The retry state of one operation.
#[derive(Debug)]
pub struct Again {
    what: &'static str,
    nonce: u32,
    ca: u32,
}

impl Again {
    pub fn new(what: &'static str) -> Again {
        Again {
            what,
            nonce: 0,
            ca: 0,
        }
    }

    /// After a failed call: `Ok` once it is time to call again, `Err(e)` when
    /// `e` is final or the retries are spent.
    pub async fn after(&mut self, e: instant_acme::Error) -> Result<(), instant_acme::Error> {
        let wait = match failure(&e) {
            Failure::Nonce if self.nonce < NONCE_RETRIES => {
                self.nonce += 1;
                Duration::ZERO
            }
            Failure::Ca(retry_after) if self.ca < CA_RETRIES => {
                self.ca += 1;
                retry_after
                    .unwrap_or_else(|| transport::backoff(FIRST_WAIT, self.ca, fastrand::f64()))
            }
            _ => return Err(e),
        };
        info!(
            operation = self.what,
            error = %super::causes(&e),
            retry_in_ms = wait.as_millis() as u64,
            "ACME request failed on the way; trying it again"
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

    fn ca(status: Option<u16>, retry_after: Option<u64>) -> instant_acme::Error {
        instant_acme::Error::Other(Box::new(CaError {
            method: http::Method::POST,
            url: "https://ca.test/x".into(),
            status: status.map(|s| http::StatusCode::from_u16(s).unwrap()),
            detail: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
            source: None,
        }))
    }

    #[test]
    fn only_failures_on_the_way_are_retried() {
        assert_eq!(failure(&problem("badNonce")), Failure::Nonce);
        assert_eq!(failure(&problem("rateLimited")), Failure::Final);
        assert_eq!(failure(&problem("unauthorized")), Failure::Final);
        assert_eq!(failure(&ca(Some(500), None)), Failure::Ca(None));
        assert_eq!(
            failure(&ca(Some(503), Some(2))),
            Failure::Ca(Some(Duration::from_secs(2)))
        );
        assert_eq!(failure(&ca(Some(503), Some(3600))), Failure::Final);
        assert_eq!(failure(&ca(Some(404), None)), Failure::Final);
        assert_eq!(failure(&ca(None, None)), Failure::Final, "no connection");
        assert_eq!(failure(&instant_acme::Error::Crypto), Failure::Final);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_per_kind() {
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
        let result: Result<(), _> = retrying!("test", async {
            calls += 1;
            Err(ca(Some(502), None))
        });
        assert!(result.is_err());
        assert_eq!(calls, 1 + CA_RETRIES);

        let mut calls = 0;
        let result = retrying!("test", async {
            calls += 1;
            match calls {
                1 => Err(ca(Some(500), None)),
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
