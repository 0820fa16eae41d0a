//! ACME: the runner and what the server sees of it here; a host's task in
//! `task`, one order in `order`; the account (`account`), the CA's HTTP
//! (`transport`, `retry`), challenge answers (`challenge`), when to renew
//! (`schedule`), the order budget (`budget`) and the store (`store`).
//!
//! One task per host with `certificate: acme` obtains its certificate,
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
pub mod dns01;
mod order;
pub mod retry;
pub mod rollover;
pub mod schedule;
pub mod store;
mod task;
pub mod transport;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use instant_acme::Account;
use rustls::crypto::CryptoProvider;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::follow::Certs;
use crate::cluster::keys::CertRecord;
use crate::cluster::Cluster;
use crate::config;
use crate::config::names::{self, HostPattern};
use crate::tls::hosts::CertSlot;
use budget::OrderBudget;
use challenge::Challenges;
pub use order::{IssueError, Unstored};
use task::HostTask;

/// One certificate of a `certificate: acme` host: its names and its key
/// type. A host with two `key_types` has two lineages, each ordered,
/// stored, renewed and shown on its own, by a task of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lineage {
    pub names: Vec<HostPattern>,
    pub key_type: config::KeyType,
    /// The host's second key type: stored beside the first, apart.
    pub second: bool,
}

impl Lineage {
    /// The lineages of a host ordered with `key_types`, first one first.
    pub fn of(names: &[HostPattern], key_types: &[config::KeyType]) -> Vec<Lineage> {
        key_types
            .iter()
            .enumerate()
            .map(|(i, t)| Lineage {
                names: names.to_vec(),
                key_type: *t,
                second: i > 0,
            })
            .collect()
    }

    /// The host's first name.
    pub fn first(&self) -> String {
        self.names
            .first()
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// What it is stored and known by: the first name, as a host with one
    /// key type always was; `<first name>~<key type>` for the second
    /// (`~` is in no host name, so it cannot meet another host's).
    pub fn id(&self) -> String {
        if self.second {
            format!("{}~{}", self.first(), self.key_type.as_str())
        } else {
            self.first()
        }
    }
}

/// A lineage of a host with `certificate: acme`, as the server built it.
#[derive(Debug)]
pub struct Managed {
    pub lineage: Lineage,
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
    /// The store several instances share, when there is one.
    cluster: Option<Arc<Cluster>>,
    /// By first name: a host's lineages order one at a time, as their
    /// challenges are for the same names (a tls-alpn-01 answer is one per
    /// name, a dns-01 record is removed by name).
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Shared {
    /// The same, ordering from `directory` (`acme.staging`) for a dry run:
    /// its own account (stored by directory, never in the cluster store),
    /// and a new key each time, so no key kept for DANE is touched.
    fn dry_run(&self, directory: &str) -> Shared {
        let mut config = self.config.clone();
        config.directory = directory.to_string();
        config.key = config::KeyPolicy::New;
        config.tlsa = None;
        for h in config.per_host.values_mut() {
            h.key = None;
        }
        Shared {
            config,
            state_dir: self.state_dir.clone(),
            provider: self.provider.clone(),
            challenges: self.challenges.clone(),
            account: Default::default(),
            hooks: self.hooks.clone(),
            cluster: None,
            turns: Default::default(),
        }
    }

    /// The turn `first`'s host's orders take one at a time.
    fn turn(&self, first: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock().unwrap_or_else(PoisonError::into_inner);
        turns.entry(first.to_string()).or_default().clone()
    }
}

/// The account every host orders with.
#[derive(Default)]
struct AccountCache {
    account: Option<Account>,
    /// The stored credentials are of an account the CA no longer knows, and
    /// could not be moved aside (a read-only state_dir): register anew.
    stored_rejected: bool,
    /// In a cluster: the revision of the account's key.
    shared_revision: Option<i64>,
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
    /// A certificate another node ordered was taken from the cluster store.
    Adopted { names: Vec<String>, serial: String },
    /// `key: rollover`: a next key was made; `records` are to be published
    /// (served by `check` for `wait_ttls` TTLs) before it is used.
    NextKey {
        names: Vec<String>,
        records: Vec<String>,
        check: Vec<String>,
        wait_ttls: u32,
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
    /// By lineage ([`Lineage::id`]): what to write once `state_dir` can
    /// be written.
    pub unstored: Arc<Mutex<HashMap<String, Unstored>>>,
    /// Where certificates from the cluster store go: each host's task.
    pub routes: Arc<Routes>,
    /// The store several instances share, when there is one.
    pub cluster: Option<Arc<Cluster>>,
}

/// The way from the cluster store to each lineage's task, by
/// [`Lineage::id`] (the first name for a host with one key type);
/// kept across runners, as the store is followed for the server's life.
#[derive(Debug, Default)]
pub struct Routes(Mutex<HashMap<String, mpsc::Sender<Ask>>>);

impl Routes {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Ask>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes the route of `name` if it still leads to `to`.
    fn remove(&self, name: &str, to: &mpsc::Sender<Ask>) {
        let mut map = self.map();
        if map.get(name).is_some_and(|s| s.same_channel(to)) {
            map.remove(name);
        }
    }
}

impl Certs for Routes {
    fn record(&self, record: CertRecord) {
        let Some(first) = record.names.first().cloned() else {
            return;
        };
        let Some(to) = self.map().get(&first).cloned() else {
            return; // not a host of this node's config
        };
        // A full queue has work for the task; the next full read brings
        // the record again.
        let _ = to.try_send(Ask::Adopt(Box::new(record)));
    }
}

impl Hooks {
    fn report(&self, event: Event) {
        self.events.report(event);
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Unstored>> {
        self.unstored.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When the served certificate `serial` of lineage `id` was issued, if
    /// it is waiting to be stored.
    fn unstored_issued_at(&self, id: &str, serial: &str) -> Option<SystemTime> {
        let pending = self.pending();
        let u = pending.get(id).filter(|u| u.serial == serial)?;
        humantime::parse_rfc3339(&u.meta.issued_at).ok()
    }
}

/// A renewal asked for through the control socket.
#[derive(Debug)]
struct Request {
    force: bool,
    /// Order from `acme.staging` instead, and keep nothing.
    dry_run: bool,
    reply: oneshot::Sender<Outcome>,
}

/// What a host's task is asked: a renewal, to store again what could not
/// be stored (`state_dir` can be written again), or to take a certificate
/// from the cluster store.
#[derive(Debug)]
enum Ask {
    Renew(Request),
    Store,
    Adopt(Box<CertRecord>),
}

/// What a `portcullis renew` gets back for one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Renewed {
        serial: String,
        not_after: i64,
    },
    NotDue {
        at: SystemTime,
    },
    Failed(String),
    /// Another node holds the host's order lock: it orders, this node
    /// takes the certificate when it is written.
    Elsewhere {
        node: String,
    },
    /// Another node had renewed it already: taken from the cluster store.
    Adopted {
        serial: String,
        not_after: i64,
        node: String,
    },
    /// `renew --dry-run`: the staging CA issued it; neither served nor
    /// stored.
    DryRun {
        serial: String,
        directory: String,
    },
}

/// What `portcullis certs` shows of a host's ACME task.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub next_renewal: Option<SystemTime>,
    pub failures: u32,
    pub last_error: Option<String>,
    /// `key: rollover`: where the host is in the cycle.
    pub key: Option<String>,
}

/// The control socket's way into one lineage's ACME task.
#[derive(Clone, Debug)]
pub struct HostHandle {
    pub names: Vec<String>,
    /// [`Lineage::id`].
    pub id: String,
    pub key_type: config::KeyType,
    requests: mpsc::Sender<Ask>,
    status: Arc<Mutex<Status>>,
}

impl HostHandle {
    /// The host's first name: its key in the store and in the logs.
    pub fn first(&self) -> &str {
        self.names.first().map_or("", String::as_str)
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Renews now when due (or always, with `force`) and waits for the
    /// outcome; with `dry_run`, orders from the staging directory and keeps
    /// nothing.
    pub async fn renew(&self, force: bool, dry_run: bool) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        let ask = Ask::Renew(Request {
            force,
            dry_run,
            reply,
        });
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
        if dns01::ledger_exists(&state_dir) {
            // Records an earlier run left up (a crash mid-order) go first.
            let (dir, c) = (state_dir.clone(), config.clone());
            tracker.spawn(async move { dns01::clean_up(&dir, &c).await });
        }
        Runner {
            shared: Arc::new(Shared {
                config,
                state_dir,
                provider,
                challenges,
                account: tokio::sync::Mutex::default(),
                cluster: hooks.cluster.clone(),
                hooks,
                turns: Mutex::default(),
            }),
            tasks: Vec::new(),
            tracker,
            stop,
        }
    }

    pub fn config(&self) -> &config::Acme {
        &self.shared.config
    }

    /// Starts the task of one lineage.
    pub fn add(&mut self, host: Managed) {
        let (tx, rx) = mpsc::channel(8);
        let status = Arc::new(Mutex::new(Status::default()));
        let names = names::to_strings(&host.lineage.names);
        let id = host.lineage.id();
        let key_type = host.lineage.key_type;
        let stop = self.stop.child_token();
        self.tasks.push((
            HostHandle {
                names,
                id: id.clone(),
                key_type,
                requests: tx.clone(),
                status: status.clone(),
            },
            stop.clone(),
        ));
        self.shared.hooks.routes.map().insert(id, tx);
        let first = host.lineage.first();
        let span = if host.lineage.second {
            tracing::info_span!("acme", host = %first, key_type = key_type.as_str())
        } else {
            tracing::info_span!("acme", host = %first)
        };
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
            .filter(|(h, _)| pending.contains_key(&h.id))
        {
            // A full queue has work for the task already; the next probe asks again.
            let _ = handle.requests.try_send(Ask::Store);
        }
    }

    /// Stops the tasks of lineages (by [`Lineage::id`] and names) `keep`
    /// says no to.
    pub fn retain(&mut self, keep: impl Fn(&str, &[String]) -> bool) {
        let routes = &self.shared.hooks.routes;
        self.tasks.retain(|(handle, stop)| {
            let kept = keep(&handle.id, &handle.names);
            if !kept {
                stop.cancel();
                routes.remove(&handle.id, &handle.requests);
            }
            kept
        });
    }

    /// The task of the lineage `id` for `names`.
    pub fn handle(&self, id: &str, names: &[String]) -> Option<HostHandle> {
        self.tasks
            .iter()
            .find(|(h, _)| h.id == id && h.names == names)
            .map(|(h, _)| h.clone())
    }

    pub fn has(&self, id: &str, names: &[String]) -> bool {
        self.tasks
            .iter()
            .any(|(h, _)| h.id == id && h.names == names)
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        for (handle, stop) in &self.tasks {
            stop.cancel();
            self.shared
                .hooks
                .routes
                .remove(&handle.id, &handle.requests);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
