//! ACME: one task per host with `certificate: acme` obtains its certificate,
//! stores it, swaps it into the host's [`CertSlot`] and renews it, for ever.
//!
//! ```text
//! wait (renewal time | ARI poll | backoff | `portcullis renew`)
//!   → order → challenge (tls-alpn-01 or http-01, by preference) → finalize
//!     with a CSR (rcgen) → store atomically → swap the slot
//! ```
//!
//! A failure keeps the current certificate serving, is logged with the CA's
//! problem document, and is retried after an exponential, jittered backoff.
//! Inside an attempt, what fails on the way is tried again first (see
//! [`transport`] and [`retry`]), and an account the CA has forgotten is
//! registered anew. Whatever the clocks say, a host orders again no sooner
//! than [`schedule::floor`] after an issuance, and the whole process no
//! faster than its [`budget`] allows.
//!
//! What happens is reported as [`Event`]s to an [`Observer`] the server
//! hands in (metrics, notifications): acme reads the config and the TLS
//! layer, and imports nothing of the proxy or the operator side.

pub mod account;
pub mod budget;
pub mod challenge;
pub mod retry;
pub mod schedule;
pub mod store;
pub mod transport;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeStatus, ChallengeType,
    Identifier, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::names::{self, HostPattern};
use crate::config::{self, Challenge, KeyType};
use crate::tls::certs::CertInfo;
use crate::tls::hosts::{CertSlot, Served, Source};
use budget::OrderBudget;
use challenge::Challenges;
use retry::retrying;
use schedule::{Lifetime, Window};

/// How long the CA may take to settle an order while we poll it.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);
/// A whole attempt, account to stored certificate: a CA or proxy that
/// accepts and then stalls must not hold the host's task for ever.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const ARI_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest single sleep: wall-clock jumps (suspend, NTP) are noticed
/// within this.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// After an ARI request fails for another reason than "not offered".
const ARI_RETRY: Duration = Duration::from_secs(3600);

/// A host with `certificate: acme`, as the server built it.
#[derive(Debug)]
pub struct Managed {
    pub names: Vec<HostPattern>,
    pub slot: Arc<CertSlot>,
    /// Why a new order is needed right away (no certificate yet, names
    /// changed, …); `None` when the served one just needs renewing in time.
    pub order_now: Option<String>,
}

/// What the ACME tasks share.
struct Shared {
    config: config::Acme,
    state_dir: PathBuf,
    provider: Arc<CryptoProvider>,
    challenges: Arc<Challenges>,
    /// Opened on first use, then reused by every host.
    account: tokio::sync::Mutex<AccountCache>,
    hooks: Hooks,
}

/// The account every host orders with.
#[derive(Default)]
struct AccountCache {
    account: Option<Account>,
    /// The stored credentials are of an account the CA no longer knows, and
    /// could not be moved aside (a read-only state_dir): register anew.
    stored_rejected: bool,
}

/// What an ACME task reports as it goes, for whoever keeps count and tells
/// the operator: acme itself knows nothing of metrics or notifications.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A certificate was issued for `names` and is served from now on;
    /// `renewal`: the host had one from the CA already.
    Issued {
        names: Vec<String>,
        serial: String,
        issuer: String,
        not_after: SystemTime,
        renewal: bool,
    },
    /// An attempt failed; `not_after` of the certificate from the CA still
    /// served, if there is one.
    Failed {
        names: Vec<String>,
        error: String,
        next_try: SystemTime,
        not_after: Option<SystemTime>,
    },
    /// A certificate was written to `state_dir`.
    Stored,
    /// An issued certificate could not be written: served, not kept.
    NotStored,
}

/// Hears every [`Event`]; the server hands one in, implemented on the
/// operator side. Called on the ACME task: it must not block.
pub trait Observer: Send + Sync + std::fmt::Debug {
    fn report(&self, event: Event);
}

/// What the ACME tasks take from the server, which outlives any one runner:
/// who hears what they do, the order budget, and the certificates served
/// but not stored yet.
#[derive(Clone, Debug)]
pub struct Hooks {
    /// Metrics and notifications.
    pub events: Arc<dyn Observer>,
    /// Process-wide: every new order, `portcullis renew` included, takes from it.
    pub orders: Arc<OrderBudget>,
    /// By the host's names: what to write once `state_dir` can be written.
    pub unstored: Arc<Mutex<HashMap<Vec<String>, Unstored>>>,
}

impl Hooks {
    fn report(&self, event: Event) {
        self.events.report(event);
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<String>, Unstored>> {
        self.unstored.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When the served certificate `serial` of `names` was issued, if it is
    /// waiting to be stored.
    fn unstored_issued_at(&self, names: &[String], serial: &str) -> Option<SystemTime> {
        let pending = self.pending();
        let u = pending.get(names).filter(|u| u.serial == serial)?;
        humantime::parse_rfc3339(&u.meta.issued_at).ok()
    }
}

/// A renewal asked for through the control socket.
#[derive(Debug)]
struct Request {
    force: bool,
    reply: oneshot::Sender<Outcome>,
}

/// What a host's task is asked: a renewal, or to store again what could not
/// be stored (`state_dir` can be written again).
#[derive(Debug)]
enum Ask {
    Renew(Request),
    Store,
}

/// What a `portcullis renew` gets back for one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Renewed { serial: String, not_after: i64 },
    NotDue { at: SystemTime },
    Failed(String),
}

/// What `portcullis certs` shows of a host's ACME task.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub next_renewal: Option<SystemTime>,
    pub failures: u32,
    pub last_error: Option<String>,
}

/// The control socket's way into one host's ACME task.
#[derive(Clone, Debug)]
pub struct HostHandle {
    pub names: Vec<String>,
    requests: mpsc::Sender<Ask>,
    status: Arc<Mutex<Status>>,
}

impl HostHandle {
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Renews now when due (or always, with `force`) and waits for the outcome.
    pub async fn renew(&self, force: bool) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        let ask = Ask::Renew(Request { force, reply });
        if self.requests.send(ask).await.is_err() {
            return Outcome::Failed("the ACME task has stopped".into());
        }
        outcome
            .await
            .unwrap_or_else(|_| Outcome::Failed("the ACME task has stopped".into()))
    }
}

/// The running ACME tasks, one per host, added and removed as the config
/// changes. Dropping the runner stops them all.
pub struct Runner {
    shared: Arc<Shared>,
    tasks: Vec<(HostHandle, CancellationToken)>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Runner {
    /// Tasks run under `stop` (shutdown) and are tracked by `tracker`.
    pub fn new(
        config: config::Acme,
        state_dir: PathBuf,
        provider: Arc<CryptoProvider>,
        challenges: Arc<Challenges>,
        tracker: TaskTracker,
        stop: CancellationToken,
        hooks: Hooks,
    ) -> Runner {
        Runner {
            shared: Arc::new(Shared {
                config,
                state_dir,
                provider,
                challenges,
                account: tokio::sync::Mutex::default(),
                hooks,
            }),
            tasks: Vec::new(),
            tracker,
            stop,
        }
    }

    pub fn config(&self) -> &config::Acme {
        &self.shared.config
    }

    /// Starts the task of one host.
    pub fn add(&mut self, host: Managed) {
        let (tx, rx) = mpsc::channel(8);
        let status = Arc::new(Mutex::new(Status::default()));
        let names = names::to_strings(&host.names);
        let stop = self.stop.child_token();
        self.tasks.push((
            HostHandle {
                names: names.clone(),
                requests: tx,
                status: status.clone(),
            },
            stop.clone(),
        ));
        let first = names.first().cloned().unwrap_or_default();
        let span = tracing::info_span!("acme", host = %first);
        let task = HostTask::new(self.shared.clone(), host, status);
        self.tracker.spawn(task.run(rx, stop).instrument(span));
    }

    /// Asks every host to store what it could not store before (the server
    /// found `state_dir` writable).
    pub fn store_pending(&self) {
        let pending = self.shared.hooks.pending();
        for (handle, _) in self
            .tasks
            .iter()
            .filter(|(h, _)| pending.contains_key(&h.names))
        {
            // A full queue has work for the task already; the next probe asks again.
            let _ = handle.requests.try_send(Ask::Store);
        }
    }

    /// Stops the tasks of hosts `keep` says no to.
    pub fn retain(&mut self, keep: impl Fn(&[String]) -> bool) {
        self.tasks.retain(|(handle, stop)| {
            let kept = keep(&handle.names);
            if !kept {
                stop.cancel();
            }
            kept
        });
    }

    pub fn handle(&self, names: &[String]) -> Option<HostHandle> {
        self.tasks
            .iter()
            .find(|(h, _)| h.names == names)
            .map(|(h, _)| h.clone())
    }

    pub fn has(&self, names: &[String]) -> bool {
        self.tasks.iter().any(|(h, _)| h.names == names)
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        for (_, stop) in &self.tasks {
            stop.cancel();
        }
    }
}

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

struct HostTask {
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
    fn new(shared: Arc<Shared>, host: Managed, status: Arc<Mutex<Status>>) -> HostTask {
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

    async fn run(mut self, mut requests: mpsc::Receiver<Ask>, stop: CancellationToken) {
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

/// An error with every cause behind it: `client error (Connect)` alone does
/// not tell an operator that the CA refused the connection.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
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

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Account(#[from] account::AccountError),
    #[error("{0}")]
    Acme(#[from] instant_acme::Error),
    #[error("{name}: the CA offers none of the configured challenges ({offered})")]
    NoChallenge { name: String, offered: String },
    #[error("{name}: authorization is {status}")]
    Authorization { name: String, status: String },
    #[error("order invalid: {0}")]
    Invalid(String),
    #[error(transparent)]
    Challenge(#[from] challenge::ChallengeError),
    #[error("key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("the issued certificate is unusable: {0}")]
    Store(#[from] store::StoreError),
    #[error("no result within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
}

/// A certificate just issued and checked; `write_error` if it could not be stored.
struct Issued {
    cert: crate::tls::certs::LoadedCert,
    write_error: Option<store::StoreError>,
    /// What to write when `state_dir` can be written again (with `write_error`).
    unstored: Option<Unstored>,
}

/// A certificate served but not stored, kept to be stored later.
#[derive(Debug)]
pub struct Unstored {
    chain_pem: String,
    key_pem: String,
    meta: store::Meta,
    serial: String,
}

impl IssueError {
    /// The CA does not know the stored account (deactivated, or a test CA
    /// that restarted): a new one must be registered.
    fn is_unknown_account(&self) -> bool {
        matches!(self, IssueError::Acme(instant_acme::Error::Api(p))
            if p.r#type.as_deref().is_some_and(|t| t.ends_with(":accountDoesNotExist")))
    }

    /// How long the CA asked us to wait (`Retry-After` on its error answer).
    fn retry_after(&self) -> Option<Duration> {
        let acme = match self {
            IssueError::Acme(e) | IssueError::Account(account::AccountError::Acme(e)) => e,
            _ => return None,
        };
        match acme {
            instant_acme::Error::Other(inner) => inner
                .downcast_ref::<transport::CaError>()
                .and_then(|ca| ca.retry_after),
            _ => None,
        }
    }
}

impl Shared {
    /// Drops `failed` (an account the CA no longer knows) and moves its
    /// stored credentials aside (kept, not deleted, in case an operator
    /// wants them back). Another host that failed with the same account a
    /// moment later finds it gone already, and keeps the new one.
    async fn forget_account(&self, failed: &Account) {
        let mut cache = self.account.lock().await;
        if cache.account.as_ref().is_none_or(|a| a.id() != failed.id()) {
            return;
        }
        cache.account = None;
        let path = account::credentials_path(&self.state_dir, &self.config.directory);
        let suffix = format!(
            "rejected-{}-{:08x}",
            crate::tls::certs::unix_now(),
            fastrand::u32(..)
        );
        let aside = path.with_extension(suffix);
        match std::fs::rename(&path, &aside) {
            Ok(()) => {
                warn!(moved_to = %aside.display(), "the CA does not know the stored ACME account; registering a new one")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                warn!("the CA does not know the ACME account; registering a new one")
            }
            Err(e) => {
                cache.stored_rejected = true;
                warn!(path = %path.display(), error = %e, "the CA does not know the stored ACME account, and its credentials cannot be moved aside; registering a new one")
            }
        }
    }

    async fn account(&self) -> Result<Account, account::AccountError> {
        let mut cache = self.account.lock().await;
        if let Some(a) = &cache.account {
            return Ok(a.clone());
        }
        let stored = !cache.stored_rejected;
        let mut again = retry::Again::new("account");
        let a = loop {
            let opened = account::open(&self.config, &self.state_dir, &self.provider, stored);
            match opened.await {
                Ok(a) => break a,
                // A lost answer to a registration may leave an unused
                // account at the CA: harmless, and rare.
                Err(account::AccountError::Acme(e)) => again.after(e).await?,
                Err(e) => return Err(e),
            }
        };
        if !stored {
            cache.stored_rejected = false;
        }
        cache.account = Some(a.clone());
        Ok(a)
    }

    /// An account, then an order for `names`; an account the CA has
    /// forgotten (deactivated, or a CA that lost its database, as a
    /// restarted test CA does) is registered anew and the order placed
    /// again, once, now.
    async fn order(
        &self,
        names: &[HostPattern],
        replaces: Option<CertificateIdentifier<'static>>,
        challenges: &[Challenge],
    ) -> Result<Issued, IssueError> {
        let account = self.account().await?;
        match self
            .issue(&account, names, replaces.clone(), challenges)
            .await
        {
            Err(e) if e.is_unknown_account() => {
                self.forget_account(&account).await;
                let account = self.account().await?;
                let again = self.issue(&account, names, replaces, challenges).await;
                if again.as_ref().is_err_and(IssueError::is_unknown_account) {
                    self.forget_account(&account).await;
                }
                again
            }
            other => other,
        }
    }

    /// Orders a certificate for `names` with `account` and stores it.
    async fn issue(
        &self,
        account: &Account,
        names: &[HostPattern],
        replaces: Option<CertificateIdentifier<'static>>,
        challenges: &[Challenge],
    ) -> Result<Issued, IssueError> {
        let mut order = self.new_order(account, names, replaces).await?;
        let posted = self.authorize(&mut order, challenges).await?;
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(ORDER_TIMEOUT);
        let status = retrying!("order status", order.poll_ready(&retry))?;
        if status != OrderStatus::Ready {
            return Err(IssueError::Invalid(problems(&mut order).await));
        }
        drop(posted);

        let key = match self.config.key_type {
            KeyType::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
            KeyType::EcdsaP384 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?,
            KeyType::Rsa2048 => rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?,
        };
        let csr = csr(names, &key)?;
        finalize(&mut order, &csr).await?;
        let chain = retrying!("certificate", order.poll_certificate(&retry))?;
        let key_pem = key.serialize_pem();
        let cert = store::check(&self.state_dir, names, &chain, &key_pem, &self.provider)?;
        let meta = store::Meta {
            names: names::to_strings(names),
            directory: self.config.directory.clone(),
            issued_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        let serial = cert.info.serial.clone();
        let write_error =
            store::write(&self.state_dir, names, &chain, &key_pem, &meta, &serial).err();
        let unstored = write_error.as_ref().map(|_| Unstored {
            chain_pem: chain,
            key_pem,
            meta,
            serial,
        });
        Ok(Issued {
            cert,
            write_error,
            unstored,
        })
    }

    /// A new order for `names` (naming the certificate it `replaces`, where
    /// the CA takes that; a second order without it, paid for from the
    /// order budget, where it does not).
    async fn new_order(
        &self,
        account: &Account,
        names: &[HostPattern],
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Result<instant_acme::Order, IssueError> {
        let identifiers: Vec<Identifier> = names
            .iter()
            .map(|n| Identifier::Dns(n.to_string()))
            .collect();
        let new = || match &self.config.profile {
            Some(p) => NewOrder::new(&identifiers).profile(p),
            None => NewOrder::new(&identifiers),
        };
        let Some(id) = replaces else {
            return Ok(retrying!("new order", account.new_order(&new()))?);
        };
        let replacing = retrying!("new order", account.new_order(&new().replaces(id.clone())));
        match replacing {
            Ok(o) => Ok(o),
            // The CA may refuse the `replaces` itself (already replaced, an
            // id it does not know): an order without it is still a good one.
            Err(instant_acme::Error::Api(problem))
                if problem.r#type.as_deref().is_some_and(|t| {
                    t.ends_with(":alreadyReplaced") || t.ends_with(":malformed")
                }) =>
            {
                warn!(problem = %problem, "the CA refused the order with `replaces`; ordering without it");
                Ok(retrying!("new order", account.new_order(&new()))?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Answers a challenge of each pending authorization of `order`, in the
    /// order of preference `challenges`; the answers stay up as long as the
    /// returned guards live. A fetch that failed on the way is made again;
    /// so is a challenge whose "ready" got no answer, unless the CA's state
    /// shows it was taken (made twice, the CA would refuse it).
    async fn authorize(
        &self,
        order: &mut instant_acme::Order,
        challenges: &[Challenge],
    ) -> Result<Vec<challenge::Posted>, IssueError> {
        let mut posted = Vec::new();
        // Names whose challenge response is up, and those also set ready.
        let (mut up, mut ready): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
        // Names whose "ready" got no answer: look before sending it again.
        let mut unsure: Vec<String> = Vec::new();
        // Each fetch or challenge gets its own retries: a fresh state after
        // every success.
        let mut fetch = retry::Again::new("authorization");
        let mut set = retry::Again::new("challenge");
        'fetch: loop {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = match authz {
                    Ok(a) => a,
                    Err(e) => {
                        fetch.after(e).await?;
                        continue 'fetch;
                    }
                };
                fetch = retry::Again::new("authorization");
                let name = authz.identifier().to_string();
                if ready.contains(&name) {
                    continue;
                }
                let was_unsure = unsure.contains(&name);
                if was_unsure {
                    retrying!("authorization", authz.refresh())?;
                    unsure.retain(|n| *n != name);
                }
                if validated(authz.status, &name)? {
                    ready.push(name);
                    continue;
                }
                let kind = pick(&authz, challenges).map_err(|offered| IssueError::NoChallenge {
                    name: name.clone(),
                    offered,
                })?;
                // The lost "ready" was taken when the CA is validating (or
                // has validated) it. (Boulder keeps a challenge pending while
                // it validates: sent again there, it just validates again.)
                let taken = authz.challenges.iter().any(|c| {
                    c.r#type == challenge_type(kind) && c.status != ChallengeStatus::Pending
                });
                if was_unsure && taken {
                    ready.push(name);
                    continue;
                }
                let Some(mut ch) = authz.challenge(challenge_type(kind)) else {
                    continue; // just picked
                };
                if !up.contains(&name) {
                    posted.push(self.post(&ch, kind, &name)?);
                    up.push(name.clone());
                }
                debug!(name = %name, challenge = kind.as_str(), "challenge ready");
                match ch.set_ready().await {
                    Ok(()) => {
                        ready.push(name);
                        set = retry::Again::new("challenge");
                    }
                    Err(e) => {
                        set.after(e).await?;
                        unsure.push(name);
                        continue 'fetch;
                    }
                }
            }
            return Ok(posted);
        }
    }

    /// Puts up the answer to `ch` for `name`: the key authorization at its
    /// http-01 token, or a tls-alpn-01 certificate; it stays up as long as
    /// the returned guard lives.
    fn post(
        &self,
        ch: &instant_acme::ChallengeHandle<'_>,
        kind: Challenge,
        name: &str,
    ) -> Result<challenge::Posted, IssueError> {
        let key_auth = ch.key_authorization();
        Ok(match kind {
            Challenge::Http01 => self.challenges.post_http(&ch.token, key_auth.as_str()),
            Challenge::TlsAlpn01 => {
                let digest = key_auth.digest();
                let cert = challenge::tls_alpn_cert(name, digest.as_ref(), &self.provider)?;
                self.challenges.post_tls_alpn(name, cert)
            }
        })
    }
}

/// Whether an authorization is validated already (maybe earlier, with
/// another challenge type: then it lists only that one, RFC 8555 §7.1.4);
/// `false` while pending; an error in any other state.
fn validated(status: AuthorizationStatus, name: &str) -> Result<bool, IssueError> {
    match status {
        AuthorizationStatus::Pending => Ok(false),
        AuthorizationStatus::Valid => Ok(true),
        other => Err(IssueError::Authorization {
            name: name.to_string(),
            status: format!("{other:?}").to_lowercase(),
        }),
    }
}

/// The first of `challenges` (in order of preference) the authorization
/// offers; `Err` lists what it offers instead.
fn pick(
    authz: &instant_acme::AuthorizationHandle<'_>,
    challenges: &[Challenge],
) -> Result<Challenge, String> {
    let offers = |c: &Challenge| {
        authz
            .challenges
            .iter()
            .any(|x| x.r#type == challenge_type(*c))
    };
    challenges.iter().copied().find(offers).ok_or_else(|| {
        let offered: Vec<String> = authz
            .challenges
            .iter()
            .map(|c| format!("{:?}", c.r#type))
            .collect();
        offered.join(", ")
    })
}

/// Finalizes `order` with `csr`. When that got no answer (or a 5xx), the
/// CA may have taken it: its order state says whether to send it again
/// (`ready`) or go on to the certificate (`processing`, `valid`); sent
/// twice, the CA would refuse the second and the certificate it issued for
/// the first would be thrown away.
async fn finalize(order: &mut instant_acme::Order, csr: &[u8]) -> Result<(), IssueError> {
    let mut again = retry::Again::new("finalize");
    loop {
        let Err(e) = order.finalize_csr(csr).await else {
            return Ok(());
        };
        again.after(e).await?;
        let status = retrying!("order status", order.refresh())?.status;
        match status {
            OrderStatus::Ready => continue,
            OrderStatus::Processing | OrderStatus::Valid => return Ok(()),
            _ => return Err(IssueError::Invalid(problems(order).await)),
        }
    }
}

/// A CSR naming every host name as a SAN and nothing else.
fn csr(names: &[HostPattern], key: &rcgen::KeyPair) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(names::to_strings(names))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    Ok(params.serialize_request(key)?.der().to_vec())
}

fn challenge_type(c: Challenge) -> ChallengeType {
    match c {
        Challenge::Http01 => ChallengeType::Http01,
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    }
}

/// The CA's problem documents for an invalid order: the order's own and each
/// failed challenge's.
async fn problems(order: &mut instant_acme::Order) -> String {
    let mut out = Vec::new();
    if let Some(e) = &order.state().error {
        out.push(e.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let name = authz.identifier().to_string();
        if let Ok(state) = authz.refresh().await {
            for c in &state.challenges {
                if let Some(e) = &c.error {
                    out.push(format!("{name} {:?}: {e}", c.r#type));
                }
            }
        }
    }
    if out.is_empty() {
        "the CA gave no reason".into()
    } else {
        out.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    #[test]
    fn errors_carry_their_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = IssueError::Account(account::AccountError::Acme(instant_acme::Error::Other(
            Box::new(io),
        )));
        assert_eq!(causes(&e), "ACME account: connection refused");
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Outer(#[source] std::io::Error);
        let outer = Outer(std::io::Error::other(
            "tcp connect error: Connection refused (os error 111)",
        ));
        assert_eq!(
            causes(&outer),
            "client error (Connect): tcp connect error: Connection refused (os error 111)"
        );
    }

    #[test]
    fn every_key_type_makes_a_csr_for_every_name() {
        let names: Vec<HostPattern> = ["mail.example.test", "imap.example.test"]
            .iter()
            .map(|n| HostPattern::parse(n).unwrap())
            .collect();
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_RSA_SHA256,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let der = csr(&names, &key).unwrap();
            let (_, req) =
                x509_parser::certification_request::X509CertificationRequest::from_der(&der)
                    .unwrap();
            let mut sans = Vec::new();
            for ext in req.requested_extensions().into_iter().flatten() {
                if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                    for n in &san.general_names {
                        sans.push(n.to_string());
                    }
                }
            }
            assert_eq!(
                sans,
                ["DNSName(mail.example.test)", "DNSName(imap.example.test)"],
                "{alg:?}"
            );
        }
    }
}
