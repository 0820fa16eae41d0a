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
use super::{
    causes, rollover, store, Ask, Event, Lineage, Managed, Outcome, Shared, Status, Unstored,
};
use crate::cluster::keys::{CertRecord, Key};
use crate::cluster::lock::{Acquired, Lock};
use crate::cluster::{Cluster, ClusterError};
use crate::config::names::{self, HostPattern};
use crate::config::{Challenge, KeyPolicy};
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
/// In a cluster, the next look after another node held the lock or the
/// store did not answer: the lock's lease outlives a node that died with it.
const CLUSTER_WAIT: Duration = Duration::from_secs(30);
/// How often a `key: rollover` host asks DNS about its next key.
const KEY_LOOK: Duration = Duration::from_secs(10 * 60);

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
    /// Which of the host's certificates this task keeps.
    lineage: Lineage,
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
    /// In a cluster: no attempt before this (another node holds the lock,
    /// or the store does not answer); not a failure.
    cluster_wait: Option<SystemTime>,
    /// `key: rollover`: when DNS is next asked whether the next key's
    /// TLSA record is served.
    key_look: Option<SystemTime>,
    /// In a cluster: a certificate this node ordered but could not write
    /// to the store; written when the store lets it.
    unpublished: Option<CertRecord>,
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
        let names = names::to_strings(&host.lineage.names);
        let id = host.lineage.id();
        let issued = current
            .as_ref()
            .filter(|_| host.order_now.is_none())
            .and_then(|_| {
                shared
                    .hooks
                    .unstored_issued_at(&id, &served.info.serial)
                    .or_else(|| {
                        store::issued_at(&shared.state_dir, &host.lineage, &served.info.serial)
                    })
            });
        let now = SystemTime::now();
        let earliest = current.as_ref().zip(issued).and_then(|(c, at)| {
            let skew = schedule::skew(at, c.life, shared.config.renew_before);
            let until = at + schedule::floor(c.life, skew);
            let left = until.duration_since(now).ok().filter(|_| at <= now)?;
            Some(std::time::Instant::now() + left)
        });
        let task = HostTask {
            names: host.lineage.names.clone(),
            lineage: host.lineage,
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
            challenges: shared
                .config
                .challenges_for(&names.first().map(ToString::to_string).unwrap_or_default()),
            cluster_wait: None,
            key_look: None,
            unpublished: None,
            shared,
        };
        // Known before the task first runs: `certs` may ask at once.
        let due = task.renew_at(SystemTime::now());
        task.set_status(|s| s.next_renewal = Some(due));
        task
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
            let due = renew_at
                .max(self.retry_at.unwrap_or(UNIX_EPOCH))
                .max(self.cluster_wait.unwrap_or(UNIX_EPOCH));
            let poll_ari = self.current.as_ref().is_some_and(|c| c.id.is_some())
                && self.ari != Ari::NotOffered;
            let mut wake = if poll_ari {
                due.min(self.ari_poll)
            } else {
                due
            };
            if self.unpublished.is_some() {
                wake = wake.min(now + CLUSTER_WAIT);
            }
            let rollover = self.rollover();
            if rollover {
                wake = wake.min(*self.key_look.get_or_insert(now));
            }
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
            if let Some(Ask::Adopt(record)) = request {
                let behind = self.unpublished.is_none();
                self.adopt(*record);
                // The store turned out behind this node: written at once.
                if behind && self.unpublished.is_some() {
                    tokio::select! {
                        _ = self.publish_again() => {},
                        _ = stop.cancelled() => return,
                    }
                }
                continue;
            }
            if let Some(Ask::Renew(request)) = request {
                let outcome = if request.dry_run {
                    tokio::select! {
                        o = self.dry_run() => o,
                        _ = stop.cancelled() => return,
                    }
                } else if request.force || renew_at <= SystemTime::now() {
                    let why = if request.force {
                        "forced by portcullis renew"
                    } else {
                        "due; asked by portcullis renew"
                    };
                    tokio::select! {
                        o = self.attempt(why, request.force) => o,
                        _ = stop.cancelled() => return,
                    }
                } else {
                    Outcome::NotDue { at: renew_at }
                };
                let _ = request.reply.send(outcome);
                continue;
            }
            let now = SystemTime::now();
            if self.unpublished.is_some() {
                tokio::select! {
                    _ = self.publish_again() => {},
                    _ = stop.cancelled() => return,
                }
            }
            if rollover && self.key_look.is_some_and(|t| t <= now) {
                tokio::select! {
                    _ = self.look_at_next_key() => {},
                    _ = stop.cancelled() => return,
                }
            }
            if poll_ari && self.ari_poll <= now && due > now {
                tokio::select! {
                    _ = self.poll_ari() => {},
                    _ = stop.cancelled() => return,
                }
            } else if due <= now {
                let why = if self.order_now.is_some() {
                    "no usable certificate"
                } else if self.cluster_wait.is_some() {
                    "waited for the cluster"
                } else if self.retry_at.is_some() {
                    "retry after a failure"
                } else if self.window.is_some() {
                    "inside the CA's ARI window"
                } else {
                    "renewal time reached"
                };
                tokio::select! {
                    _ = self.attempt(why, false) => {},
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    /// `portcullis renew --dry-run`: an order from `acme.staging` with the
    /// host's names and challenges, under the host's turn; the certificate
    /// is checked, then dropped: nothing is served, stored or notified.
    async fn dry_run(&mut self) -> Outcome {
        let Some(staging) = self.shared.config.staging.clone() else {
            return Outcome::Failed(format!(
                "no staging directory is known for {}: set acme.staging to the CA's test directory",
                self.shared.config.directory
            ));
        };
        // Its challenges would be answered by this node alone, and a
        // tls-alpn-01 answer here would shadow a real order's of the
        // same name made on another node.
        if self.shared.cluster.is_some() {
            return Outcome::Failed(
                "a dry run is not made with store.etcd: its challenges would be answered by this node alone".into(),
            );
        }
        // An order like any other: it takes from the order budget.
        self.shared.hooks.orders.take().await;
        let dry = self.shared.dry_run(&staging);
        let turn = self.shared.turn(&self.lineage.first());
        let _turn = turn.lock().await;
        info!(directory = %staging, "dry run: ordering from the staging directory; nothing is served or stored");
        let challenges = self.challenges.clone();
        match tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            dry.order(&self.lineage, None, &challenges, None),
        )
        .await
        {
            Ok(Ok(issued)) => {
                let serial = issued.cert.info.serial.clone();
                info!(serial = %serial, "dry run: the staging CA issued a certificate; dropped");
                Outcome::DryRun {
                    serial,
                    directory: staging,
                }
            }
            Ok(Err(e)) => {
                let why = causes(&e);
                warn!(error = %why, "dry run failed");
                Outcome::Failed(format!("dry run against {staging}: {why}"))
            }
            Err(_) => Outcome::Failed(format!(
                "dry run against {staging}: no certificate within {}",
                humantime::format_duration(ATTEMPT_TIMEOUT)
            )),
        }
    }

    /// Whether this host rolls its key over (and there is where to look).
    fn rollover(&self) -> bool {
        let acme = &self.shared.config;
        acme.tlsa.is_some() && acme.key_for(&self.first()) == KeyPolicy::Rollover
    }

    /// Asks DNS whether the next key's TLSA record is served, and says
    /// where the host is in the cycle (`portcullis certs`).
    async fn look_at_next_key(&mut self) {
        self.key_look = Some(SystemTime::now() + KEY_LOOK);
        let first = self.first();
        let acme = &self.shared.config;
        let (Some(tlsa), Some(host)) = (&acme.tlsa, acme.per_host.get(&first)) else {
            return;
        };
        let dir = &self.shared.state_dir;
        rollover::look(dir, &first, tlsa, &host.tlsa_owners).await;
        self.describe_next_key();
    }

    /// Says where the host is in the key's cycle, from what was last seen.
    fn describe_next_key(&mut self) {
        let acme = &self.shared.config;
        let wait = acme.tlsa.as_ref().map_or(2, |t| t.wait_ttls);
        let said = match rollover::load(&self.shared.state_dir, &self.first()) {
            Some(next) => rollover::describe(&next, wait),
            None => "no next key yet: one is made at the next order".to_string(),
        };
        self.set_status(|s| s.key = Some(said));
    }

    /// Stores the served certificate that could not be stored when it was
    /// issued, if there is one: a restart then serves it instead of
    /// ordering again.
    fn store_again(&mut self) {
        let id = self.lineage.id();
        let mut pending = self.shared.hooks.pending();
        let Some(u) = pending.get(&id) else {
            return;
        };
        let dir = &self.shared.state_dir;
        match store::write(
            dir,
            &self.lineage,
            &u.chain_pem,
            &u.key_pem,
            &u.meta,
            &u.serial,
        ) {
            Ok(()) => {
                info!(serial = %u.serial, "the certificate that could not be stored is stored now");
                pending.remove(&id);
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

    /// One order, start to finish; the result is logged, swapped in and
    /// returned. In a cluster, under the host's lock, after a look at what
    /// the store has (another node may have renewed it a moment ago).
    async fn attempt(&mut self, why: &str, force: bool) -> Outcome {
        // One order per attempt, paid for before the lock is taken (a lock
        // held while waiting for the budget would keep the other nodes
        // waiting too) and before the deadline starts. (An order made again
        // because it was refused without becoming an order — a forgotten
        // account, `replaces` — costs nothing more.)
        self.shared.hooks.orders.take().await;
        // The host's other key type may be ordering: its turn first.
        let turn = self.shared.turn(&self.lineage.first());
        let _turn = turn.lock().await;
        let lock = match self.shared.cluster.clone() {
            None => None,
            Some(cluster) => match self.lock(&cluster, force).await {
                Ok(lock) => Some(lock),
                Err(outcome) => return outcome,
            },
        };
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
        let challenges = self.challenges.clone();
        let work = self
            .shared
            .order(&self.lineage, replaces, &challenges, lock.as_ref());
        let lost = async {
            match &lock {
                Some(l) => l.lost().await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            r = tokio::time::timeout(ATTEMPT_TIMEOUT, work) => match r {
                Ok(r) => r,
                Err(_) => Err(IssueError::TimedOut(ATTEMPT_TIMEOUT)),
            },
            _ = lost => Err(IssueError::LockLost),
        };
        let outcome = match result {
            Ok(issued) => {
                if let Some(lock) = &lock {
                    self.publish(lock, &issued).await;
                }
                self.issued(issued, started)
            }
            Err(e) => self.failed(&e),
        };
        if let Some(lock) = lock {
            lock.release().await;
        }
        if self.rollover() {
            self.describe_next_key();
        }
        outcome
    }

    /// The host's order lock, and a look at the store under it: `Err` with
    /// what to answer when this node is not to order now.
    async fn lock(&mut self, cluster: &Arc<Cluster>, force: bool) -> Result<Lock, Outcome> {
        let first = self.lineage.id();
        // Looked at again after a while, at a time of its own (nodes that
        // waited together do not all come back together).
        let waiting = |task: &mut HostTask, why: String, wait: Duration| {
            let jitter = Duration::from_millis(fastrand::u64(0..=wait.as_millis() as u64 / 2));
            task.cluster_wait = Some(SystemTime::now() + wait + jitter);
            task.set_status(|s| s.last_error = Some(why));
        };
        // No lock asked for while etcd is known not to answer (after a
        // first look, which at start may take a moment).
        for _ in 0..100 {
            let h = cluster.health();
            // Read once, or refused already: no use waiting.
            let first_failed = h
                .last_error
                .is_some_and(|e| e != crate::cluster::NOT_SYNCED);
            if h.last_sync.is_some() || first_failed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let health = cluster.health();
        if let Some(since) = health.down_since {
            let why = format!(
                "cluster store unreachable since {}{}",
                humantime::format_rfc3339_seconds(since),
                health
                    .last_error
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            warn!(error = %why, "no order while the cluster store does not answer; the current certificate keeps serving");
            waiting(self, why.clone(), CLUSTER_WAIT);
            return Err(Outcome::Failed(format!("not ordered: {why}")));
        }
        let lock = match cluster.lock(&first).await {
            Ok(Acquired::Held(lock)) => lock,
            Ok(Acquired::Elsewhere(node)) => {
                info!(node = %node, "another node is ordering this certificate; taking it from the cluster store when it is written");
                waiting(self, format!("node {node} is ordering it"), CLUSTER_WAIT);
                return Err(Outcome::Elsewhere { node });
            }
            Ok(Acquired::EarlierRun) => {
                let why = format!(
                    "this node's previous run holds the order lock until its lease runs out (at most {} s)",
                    crate::cluster::lock::TTL.as_secs()
                );
                info!("{why}");
                waiting(self, why.clone(), crate::cluster::lock::TTL);
                return Err(Outcome::Failed(format!("not ordered yet: {why}")));
            }
            Ok(Acquired::JustReleased) => {
                let why =
                    "the order lock was let go a moment ago: looking at the store again shortly";
                waiting(self, why.to_string(), Duration::from_secs(2));
                return Err(Outcome::Failed(format!("not ordered yet: {why}")));
            }
            Err(e @ ClusterError::Refused { .. }) => {
                error!(error = %e, "no order: the cluster store refused the order lock (check the etcd user's permissions on the prefix); the current certificate keeps serving");
                waiting(self, e.to_string(), CLUSTER_WAIT);
                return Err(Outcome::Failed(format!("not ordered: {e}")));
            }
            Err(e) => {
                warn!(error = %e, "no order: the cluster store does not answer; the current certificate keeps serving");
                waiting(self, e.to_string(), CLUSTER_WAIT);
                return Err(Outcome::Failed(format!("not ordered: {e}")));
            }
        };
        let stored = match cluster.get(&Key::Cert(first)).await {
            Ok(found) => {
                found.and_then(|(bytes, _)| serde_json::from_slice::<CertRecord>(&bytes).ok())
            }
            Err(e) => {
                lock.release().await;
                warn!(error = %e, "no order: the cluster store's certificate could not be read; the current certificate keeps serving");
                waiting(self, e.to_string(), CLUSTER_WAIT);
                return Err(Outcome::Failed(format!("not ordered: {e}")));
            }
        };
        self.cluster_wait = None;
        let adopted = stored.and_then(|r| self.adopt(r));
        match adopted {
            Some(outcome) if !force && self.renew_at(SystemTime::now()) > SystemTime::now() => {
                lock.release().await;
                Err(outcome)
            }
            _ => Ok(lock),
        }
    }

    /// Writes a certificate this node just ordered to the store, while the
    /// lock is still ours; kept to be written later when it cannot be.
    async fn publish(&mut self, lock: &Lock, issued: &Issued) {
        let record = CertRecord {
            names: issued.meta.names.clone(),
            directory: issued.meta.directory.clone(),
            issued_at: issued.meta.issued_at.clone(),
            serial: issued.cert.info.serial.clone(),
            not_after: issued.cert.info.not_after,
            chain_pem: issued.chain_pem.clone(),
            key_pem: issued.key_pem.clone(),
            node: lock.node().to_string(),
        };
        match lock.write(&record).await {
            Ok(true) => {
                info!(serial = %record.serial, "certificate written to the cluster store");
                self.unpublished = None;
            }
            Ok(false) => {
                error!("the order lock ran out while ordering: the new certificate is served here, and written to the cluster store once no newer one is there");
                self.unpublished = Some(record);
            }
            Err(e) => {
                error!(error = %e, "the new certificate cannot be written to the cluster store: it is served here, and written once the store answers");
                self.unpublished = Some(record);
            }
        }
    }

    /// Writes what [`publish`](Self::publish) could not, under the lock,
    /// unless the store has a newer certificate by now (then that one serves).
    async fn publish_again(&mut self) {
        let (Some(cluster), Some(record)) = (self.shared.cluster.clone(), self.unpublished.clone())
        else {
            return;
        };
        let Ok(Acquired::Held(lock)) = cluster.lock(&self.lineage.id()).await else {
            return;
        };
        let stored = cluster.get(&Key::Cert(self.lineage.id())).await;
        if let Ok(found) = stored {
            let there = found.and_then(|(b, _)| serde_json::from_slice::<CertRecord>(&b).ok());
            match there {
                Some(t) if t.not_after >= record.not_after => {
                    self.unpublished = None;
                    self.adopt(t);
                }
                _ => {
                    if let Ok(true) = lock.write(&record).await {
                        info!(serial = %record.serial, "the certificate ordered earlier is written to the cluster store now");
                        self.unpublished = None;
                    }
                }
            }
        }
        lock.release().await;
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
        let life = current(&issued.cert.key.cert, &info).life;
        let now = SystemTime::now();
        let skew = schedule::skew(now, life, self.shared.config.renew_before);
        if let Some(skew) = skew {
            warn_of_clock_skew(skew, now, life, now + schedule::floor(life, Some(skew)));
        }
        self.shared.hooks.report(Event::Issued {
            names: names::to_strings(&self.names),
            serial: info.serial.clone(),
            issuer: info.issuer.clone(),
            not_after: unix(info.not_after),
            renewal: self.slot.load().source == Source::Acme,
        });
        self.install(issued, now);
        Outcome::Renewed {
            serial: info.serial,
            not_after: info.not_after,
        }
    }

    /// Serves `new` from now on, issued at `issued_at` (by this clock or
    /// another node's): stored in `state_dir` (or kept to be), the schedule
    /// started again, and no renewal sooner than the floor after it.
    fn install(&mut self, new: Issued, issued_at: SystemTime) {
        let info = new.cert.info.clone();
        let id = self.lineage.id();
        let written = store::write(
            &self.shared.state_dir,
            &self.lineage,
            &new.chain_pem,
            &new.key_pem,
            &new.meta,
            &info.serial,
        );
        let write_error = written.err().map(|e| {
            // Served anyway: throwing it away would order another one,
            // and burn the CA's rate limit, on every retry.
            error!(
                error = %causes(&e),
                "the new certificate could not be stored: it is served now, but a restart will order again"
            );
            self.shared.hooks.report(Event::NotStored);
            self.shared.hooks.pending().insert(
                id.clone(),
                Unstored {
                    chain_pem: new.chain_pem,
                    key_pem: new.key_pem,
                    meta: new.meta,
                    serial: info.serial.clone(),
                },
            );
            causes(&e)
        });
        let mut info = info;
        if write_error.is_none() {
            self.shared.hooks.report(Event::Stored);
            self.shared.hooks.pending().remove(&id);
            info.files = Some(store::files(&self.shared.state_dir, &self.lineage));
        }
        let current = current(&new.cert.key.cert, &info);
        // The floor after an issuance "in the future" (another node's clock
        // ahead of this one) starts now.
        let now = SystemTime::now();
        let from = issued_at.min(now);
        let skew = schedule::skew(from, current.life, self.shared.config.renew_before);
        let until = from + schedule::floor(current.life, skew);
        let left = until.duration_since(now).unwrap_or_default();
        self.earliest = Some(std::time::Instant::now() + left);
        self.current = Some(current);
        self.slot
            .store(Served::new(new.cert.key, info, Source::Acme));
        self.order_now = None;
        self.failures = 0;
        self.retry_at = None;
        self.cluster_wait = None;
        self.window = None;
        self.ari_poll = SystemTime::now();
        self.draw = fastrand::f64();
        self.set_status(|s| {
            s.failures = 0;
            s.last_error = write_error;
        });
    }

    /// Takes a certificate from the cluster store, if it is this host's and
    /// newer than the one served; what a `renew` would answer, if taken.
    /// One that does not load is refused, and the served one stays.
    fn adopt(&mut self, record: CertRecord) -> Option<Outcome> {
        let names = names::to_strings(&self.names);
        if record.names != names || record.directory != self.shared.config.directory {
            // The nodes' configs disagree on this host (or one moved to
            // another CA first): each orders its own and they take turns
            // at the key, which the operator should hear of.
            warn!(node = %record.node, names = %record.names.join(","), directory = %record.directory, "the cluster store's certificate for this host is for other names or another CA, so another node's config differs from this one: left alone; give every node the same names, in the same order, and the same acme.directory");
            return None;
        }
        let served = self.slot.load();
        // Two certificates issued in the same second expire in the same
        // second: the store's, the one written last, wins the tie, so every
        // node ends up serving the same one.
        let newer = served.source != Source::Acme
            || self.order_now.is_some()
            || record.not_after >= served.info.not_after;
        if served.info.serial == record.serial || !newer {
            // This node serves a newer one than the store holds (ordered
            // here while the store could not be written, then restarted):
            // written to the store at the next look.
            let ahead = served.source == Source::Acme
                && served.info.serial != record.serial
                && served.info.not_after > record.not_after;
            if ahead && self.unpublished.is_none() {
                let stored = self.local_record();
                // Only what is on disk can be written, and only if newer.
                if let Some(mine) = stored.filter(|m| m.not_after > record.not_after) {
                    info!(serial = %mine.serial, "this node serves a newer certificate than the cluster store holds: writing it there");
                    self.unpublished = Some(mine);
                }
            }
            return None;
        }
        let dir = &self.shared.state_dir;
        let checked = store::check(
            dir,
            &self.lineage,
            &record.chain_pem,
            &record.key_pem,
            &self.shared.provider,
        );
        let cert = match checked {
            Ok(c) => c,
            Err(e) => {
                error!(node = %record.node, error = %causes(&e), "the cluster store's certificate for this host is unusable: not served");
                return None;
            }
        };
        // What the certificate itself says, not what the record claims.
        let info = cert.info.clone();
        let newer = served.source != Source::Acme
            || self.order_now.is_some()
            || info.not_after >= served.info.not_after;
        if served.info.serial == info.serial || !newer {
            return None;
        }
        info!(
            serial = %info.serial,
            node = %record.node,
            not_after = %humantime::format_rfc3339_seconds(unix(info.not_after)),
            "certificate taken from the cluster store"
        );
        let issued_at =
            humantime::parse_rfc3339(&record.issued_at).unwrap_or_else(|_| SystemTime::now());
        let meta = store::Meta {
            names: record.names,
            directory: record.directory,
            issued_at: record.issued_at,
        };
        self.install(
            Issued {
                cert,
                chain_pem: record.chain_pem,
                key_pem: record.key_pem,
                meta,
            },
            issued_at,
        );
        self.shared.hooks.report(Event::Adopted {
            names,
            serial: info.serial.clone(),
        });
        Some(Outcome::Adopted {
            serial: info.serial,
            not_after: info.not_after,
            node: record.node,
        })
    }

    /// The certificate stored in `state_dir` for this host, as a record
    /// for the cluster store.
    fn local_record(&self) -> Option<CertRecord> {
        let (chain_pem, key_pem, meta) = store::load_pem(&self.shared.state_dir, &self.lineage)?;
        let cert = store::check(
            &self.shared.state_dir,
            &self.lineage,
            &chain_pem,
            &key_pem,
            &self.shared.provider,
        )
        .ok()?;
        let node = self.shared.cluster.as_ref()?.node().to_string();
        Some(CertRecord {
            names: meta.names,
            directory: meta.directory,
            issued_at: meta.issued_at,
            serial: cert.info.serial.clone(),
            not_after: cert.info.not_after,
            chain_pem,
            key_pem,
            node,
        })
    }

    fn first(&self) -> String {
        self.names
            .first()
            .map(|n| n.to_string())
            .unwrap_or_default()
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
