//! One host's ACME task: when to renew (renewal time, ARI window,
//! backoff, `portcullis renew`), the attempt, and what follows it: the new
//! certificate swapped in, or a failure logged and retried.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::CertificateIdentifier;
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::order::{IssueError, Issued};
use super::schedule::{self, Lifetime, Window};
use super::{causes, store, Ask, Event, Managed, Outcome, Shared, Status};
use crate::config::names::{self, HostPattern};
use crate::config::Challenge;
use crate::tls::certs::CertInfo;
use crate::tls::hosts::{CertSlot, Served, Source};

/// A whole attempt, account to stored certificate: a CA or proxy that
/// accepts and then stalls must not hold the host's task for ever.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const ARI_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest single sleep: wall-clock jumps (suspend, NTP) are noticed
/// within this.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// After an ARI request fails for another reason than "not offered".
const ARI_RETRY: Duration = Duration::from_secs(3600);

/// The certificate being served, as the scheduler sees it.
#[derive(Clone, Debug)]
struct Current {
    life: Lifetime,
    /// For ARI and `replaces`; `None` if the certificate has no AKI.
    id: Option<CertificateIdentifier<'static>>,
}

/// Whether the CA answers ARI requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ari {
    Unknown,
    Offered,
    NotOffered,
}

pub(super) struct HostTask {
    shared: Arc<Shared>,
    names: Vec<HostPattern>,
    slot: Arc<CertSlot>,
    status: Arc<Mutex<Status>>,
    current: Option<Current>,
    order_now: Option<String>,
    ari: Ari,
    window: Option<Window>,
    /// When to ask for the ARI window next.
    ari_poll: SystemTime,
    failures: u32,
    retry_at: Option<SystemTime>,
    /// No renewal of its own accord before this: set at each issuance to
    /// [`schedule::floor`] later, so a clock or a CA that makes every new
    /// certificate look due cannot make the host order in a loop. Monotonic:
    /// a clock stepped back (fixed) must not push it years away.
    earliest: Option<std::time::Instant>,
    /// Where in the renewal window this certificate renews (0..1).
    draw: f64,
    /// Challenge types in the order the next attempt tries them: rotated
    /// after a failure, so a port the CA cannot reach is not tried for ever.
    challenges: Vec<Challenge>,
}

impl HostTask {
    pub(super) fn new(shared: Arc<Shared>, host: Managed, status: Arc<Mutex<Status>>) -> HostTask {
        let served = host.slot.load();
        let current =
            (served.source == Source::Acme).then(|| current(&served.key.cert, &served.info));
        // The floor after the served certificate's issuance holds across
        // restarts and runner restarts: a clock ahead must not make every
        // start order again. (A certificate for other names or from another
        // CA is replaced at once.) An issuance "in the future" means the
        // clock was ahead and has been fixed since: no floor then.
        let names = names::to_strings(&host.names);
        let issued = current
            .as_ref()
            .filter(|_| host.order_now.is_none())
            .and_then(|_| {
                shared
                    .hooks
                    .unstored_issued_at(&names, &served.info.serial)
                    .or_else(|| {
                        store::issued_at(&shared.state_dir, &host.names, &served.info.serial)
                    })
            });
        let now = SystemTime::now();
        let earliest = current.as_ref().zip(issued).and_then(|(c, at)| {
            let skew = schedule::skew(at, c.life, shared.config.renew_before);
            let until = at + schedule::floor(c.life, skew);
            let left = until.duration_since(now).ok().filter(|_| at <= now)?;
            Some(std::time::Instant::now() + left)
        });
        HostTask {
            names: host.names,
            slot: host.slot,
            status,
            current,
            order_now: host.order_now,
            ari: Ari::Unknown,
            window: None,
            ari_poll: SystemTime::now(),
            failures: 0,
            retry_at: None,
            earliest,
            draw: fastrand::f64(),
            challenges: shared.config.challenges.clone(),
            shared,
        }
    }

    /// When the served certificate should be replaced (never before
    /// `earliest`; `portcullis renew --force` does not ask).
    fn renew_at(&self, now: SystemTime) -> SystemTime {
        let at = match (&self.current, &self.order_now) {
            (Some(c), None) => schedule::renewal_time(
                now,
                c.life,
                self.window,
                self.shared.config.renew_before,
                self.draw,
            ),
            _ => now,
        };
        let floor = self
            .earliest
            .map(|e| now + e.saturating_duration_since(std::time::Instant::now()));
        at.max(floor.unwrap_or(UNIX_EPOCH))
    }

    pub(super) async fn run(mut self, mut requests: mpsc::Receiver<Ask>, stop: CancellationToken) {
        if let Some(reason) = &self.order_now {
            info!(reason = %reason, "ordering a certificate");
        }
        loop {
            let now = SystemTime::now();
            let renew_at = self.renew_at(now);
            let due = renew_at.max(self.retry_at.unwrap_or(UNIX_EPOCH));
            let poll_ari = self.current.as_ref().is_some_and(|c| c.id.is_some())
                && self.ari != Ari::NotOffered;
            let wake = if poll_ari {
                due.min(self.ari_poll)
            } else {
                due
            };
            self.set_status(|s| s.next_renewal = Some(due));
            let sleep = wake.duration_since(now).unwrap_or_default().min(MAX_SLEEP);
            let request = tokio::select! {
                _ = tokio::time::sleep(sleep) => None,
                r = requests.recv() => match r {
                    Some(r) => Some(r),
                    None => return,
                },
                _ = stop.cancelled() => return,
            };
            if let Some(Ask::Store) = request {
                self.store_again();
                continue;
            }
            if let Some(Ask::Renew(request)) = request {
                let outcome = if request.force || renew_at <= SystemTime::now() {
                    let why = if request.force {
                        "forced by portcullis renew"
                    } else {
                        "due; asked by portcullis renew"
                    };
                    tokio::select! {
                        o = self.attempt(why) => o,
                        _ = stop.cancelled() => return,
                    }
                } else {
                    Outcome::NotDue { at: renew_at }
                };
                let _ = request.reply.send(outcome);
                continue;
            }
            let now = SystemTime::now();
            if poll_ari && self.ari_poll <= now && due > now {
                tokio::select! {
                    _ = self.poll_ari() => {},
                    _ = stop.cancelled() => return,
                }
            } else if due <= now {
                let why = if self.order_now.is_some() {
                    "no usable certificate"
                } else if self.retry_at.is_some() {
                    "retry after a failure"
                } else if self.window.is_some() {
                    "inside the CA's ARI window"
                } else {
                    "renewal time reached"
                };
                tokio::select! {
                    _ = self.attempt(why) => {},
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    /// Stores the served certificate that could not be stored when it was
    /// issued, if there is one: a restart then serves it instead of
    /// ordering again.
    fn store_again(&mut self) {
        let names = names::to_strings(&self.names);
        let mut pending = self.shared.hooks.pending();
        let Some(u) = pending.get(&names) else {
            return;
        };
        let dir = &self.shared.state_dir;
        match store::write(
            dir,
            &self.names,
            &u.chain_pem,
            &u.key_pem,
            &u.meta,
            &u.serial,
        ) {
            Ok(()) => {
                info!(serial = %u.serial, "the certificate that could not be stored is stored now");
                pending.remove(&names);
                drop(pending);
                self.shared.hooks.report(Event::Stored);
                // Only the store's own error goes: a failed renewal since stays.
                self.set_status(|s| {
                    if s.failures == 0 {
                        s.last_error = None;
                    }
                });
            }
            Err(e) => debug!(error = %causes(&e), "the certificate still cannot be stored"),
        }
    }

    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Asks the CA for the certificate's renewal window (RFC 9773).
    async fn poll_ari(&mut self) {
        let Some(id) = self.current.as_ref().and_then(|c| c.id.clone()) else {
            return;
        };
        let now = SystemTime::now();
        let account = match tokio::time::timeout(ARI_TIMEOUT, self.shared.account()).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                debug!(error = %causes(&e), "ARI: no account yet");
                self.ari_poll = now + ARI_RETRY;
                return;
            }
            Err(_) => {
                debug!("ARI: no account within the ARI timeout");
                self.ari_poll = now + ARI_RETRY;
                return;
            }
        };
        let asked = tokio::time::timeout(ARI_TIMEOUT, account.renewal_info(&id)).await;
        let Ok(answer) = asked else {
            warn!("ARI request timed out; keeping the previous window");
            self.ari_poll = now + ARI_RETRY;
            return;
        };
        match answer {
            Ok((info, retry_after)) => {
                let (start, end) = (info.suggested_window.start, info.suggested_window.end);
                if start.unix_timestamp() < 0 || end <= start {
                    warn!(start = %start, end = %end, "ARI window unusable; ignoring it");
                    self.ari_poll = schedule::ari_poll(now, Some(retry_after));
                    return;
                }
                let window = Window {
                    start: start.into(),
                    end: end.into(),
                };
                if self.window != Some(window) {
                    info!(
                        start = %humantime::format_rfc3339_seconds(window.start),
                        end = %humantime::format_rfc3339_seconds(window.end),
                        explanation = info.explanation_url.as_deref(),
                        "ARI renewal window"
                    );
                }
                self.ari = Ari::Offered;
                self.window = Some(window);
                self.ari_poll = schedule::ari_poll(now, Some(retry_after));
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                debug!("the CA offers no ARI: renewing at a third of the lifetime left");
                self.ari = Ari::NotOffered;
            }
            Err(e) => {
                warn!(error = %causes(&e), "ARI request failed; keeping the previous window");
                self.ari_poll = now + ARI_RETRY;
            }
        }
    }

    /// One order, start to finish; the result is logged, swapped in and returned.
    async fn attempt(&mut self, why: &str) -> Outcome {
        let started = std::time::Instant::now();
        let replaces = match (self.ari, &self.current) {
            (Ari::Offered, Some(c)) => c.id.clone(),
            _ => None,
        };
        let preference: Vec<&str> = self.challenges.iter().map(|c| c.as_str()).collect();
        info!(
            reason = why,
            challenges = %preference.join(","),
            replaces = replaces.as_ref().map(|r| r.to_string()),
            "renewing"
        );
        // One order per attempt, paid for before its deadline starts. (An
        // order made again because it was refused without becoming an order
        // — a forgotten account, `replaces` — costs nothing more.)
        self.shared.hooks.orders.take().await;
        let work = self.shared.order(&self.names, replaces, &self.challenges);
        let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(IssueError::TimedOut(ATTEMPT_TIMEOUT)),
        };
        match result {
            Ok(issued) => self.issued(issued, started),
            Err(e) => self.failed(&e),
        }
    }

    /// After a failed attempt: back off, lead with the next challenge type.
    fn failed(&mut self, e: &IssueError) -> Outcome {
        self.challenges.rotate_left(1);
        self.failures += 1;
        // The CA's own Retry-After, when it asked for a longer wait.
        let asked = e.retry_after().map(|d| d.min(schedule::BACKOFF_MAX));
        let wait = schedule::backoff(self.failures, fastrand::f64()).max(asked.unwrap_or_default());
        let next = SystemTime::now() + wait;
        self.retry_at = Some(next);
        let message = causes(e);
        warn!(
            error = %message,
            failures = self.failures,
            retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())),
            next_try = %humantime::format_rfc3339_seconds(next),
            "certificate order failed; the current certificate keeps serving"
        );
        self.set_status(|s| {
            s.failures = self.failures;
            s.last_error = Some(message.clone());
        });
        let served = self.slot.load();
        self.shared.hooks.report(Event::Failed {
            names: names::to_strings(&self.names),
            error: message.clone(),
            next_try: next,
            not_after: (served.source == Source::Acme).then(|| unix(served.info.not_after)),
        });
        Outcome::Failed(message)
    }

    /// After an issuance: the new certificate is served from now on.
    fn issued(&mut self, issued: Issued, started: std::time::Instant) -> Outcome {
        let info = issued.cert.info.clone();
        info!(
            names = %info.sans.join(","),
            serial = %info.serial,
            issuer = %info.issuer,
            not_after = %humantime::format_rfc3339_seconds(unix(info.not_after)),
            took_ms = started.elapsed().as_millis() as u64,
            "certificate issued"
        );
        match &issued.write_error {
            Some(e) => {
                // Served anyway: throwing it away would order another one,
                // and burn the CA's rate limit, on every retry.
                error!(
                    error = %causes(e),
                    "the new certificate could not be stored: it is served now, but a restart will order again"
                );
                self.shared.hooks.report(Event::NotStored);
            }
            None => self.shared.hooks.report(Event::Stored),
        }
        let current = current(&issued.cert.key.cert, &info);
        let now = SystemTime::now();
        let skew = schedule::skew(now, current.life, self.shared.config.renew_before);
        let floor = schedule::floor(current.life, skew);
        if let Some(skew) = skew {
            warn_of_clock_skew(skew, now, current.life, now + floor);
        }
        self.earliest = Some(std::time::Instant::now() + floor);
        self.current = Some(current);
        let names = names::to_strings(&self.names);
        self.shared.hooks.report(Event::Issued {
            names: names.clone(),
            serial: info.serial.clone(),
            issuer: info.issuer.clone(),
            not_after: unix(info.not_after),
            renewal: self.slot.load().source == Source::Acme,
        });
        self.slot.store(Served {
            key: issued.cert.key,
            info: info.clone(),
            source: Source::Acme,
        });
        match issued.unstored {
            Some(u) => self.shared.hooks.pending().insert(names, u),
            None => self.shared.hooks.pending().remove(&names),
        };
        self.order_now = None;
        self.failures = 0;
        self.retry_at = None;
        self.window = None;
        self.ari_poll = SystemTime::now();
        self.draw = fastrand::f64();
        self.set_status(|s| {
            s.failures = 0;
            s.last_error = issued.write_error.as_ref().map(|e| causes(e));
        });
        Outcome::Renewed {
            serial: info.serial,
            not_after: info.not_after,
        }
    }
}

/// Says that a certificate just issued does not fit this machine's clock:
/// without the floor, a clock ahead was an order loop.
fn warn_of_clock_skew(skew: schedule::Skew, now: SystemTime, life: Lifetime, next: SystemTime) {
    let why = match skew {
        schedule::Skew::Behind => "the certificate just issued is not valid yet by this machine's clock: is the clock behind?",
        schedule::Skew::Ahead => "the certificate just issued is already due for renewal by this machine's clock: is the clock ahead?",
    };
    warn!(
        now = %humantime::format_rfc3339_seconds(now),
        not_before = %humantime::format_rfc3339_seconds(life.not_before),
        not_after = %humantime::format_rfc3339_seconds(life.not_after),
        no_order_before = %humantime::format_rfc3339_seconds(next),
        "{why}"
    );
}

fn unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

fn current(chain: &[CertificateDer<'static>], info: &CertInfo) -> Current {
    Current {
        life: Lifetime {
            not_before: unix(info.not_before),
            not_after: unix(info.not_after),
        },
        id: chain
            .first()
            .and_then(|leaf| CertificateIdentifier::try_from(leaf).ok())
            .map(CertificateIdentifier::into_owned),
    }
}
