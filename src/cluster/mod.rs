//! The cluster store (`store: { etcd: … }`): instances share the ACME
//! account, each host's certificate, a lock per host and the challenge
//! answers through etcd, under the key layout of [`keys`].
//!
//! [`Cluster`] is the connection and what this node knows of the others:
//! whether the store answers (and since when not), and a mirror of the
//! locks, nodes and challenge answers that [`follow`] keeps current while
//! it hands every certificate record to the ACME layer. [`lock`] is the
//! per-host order lock. Every request is bounded in time; while etcd is
//! down, instances serve what they have and order nothing.

pub mod follow;
pub mod keys;
pub mod lock;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::Etcd;
use keys::{Key, NodeRecord};

/// Connecting to one endpoint; the client then tries the others.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One request to etcd, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries of a request that failed on the way (a leader election, a member
/// gone): about 3 s of pauses, enough for a new leader.
const TRIES: u32 = 5;
/// Challenge lookups that miss the mirror and ask etcd itself, per second:
/// a client asking for random tokens cannot turn into load on etcd.
const LOOKUPS_PER_SECOND: u32 = 20;
/// A challenge lookup in etcd, connection included: the CA's validation
/// request waits for it.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Keys per request of a full read: one answer stays far below any
/// message size limit (a certificate record is 3 to 7 KB).
const PAGE: i64 = 100;
/// The largest answer taken from etcd (tonic's default is 4 MiB): a watch
/// catching up after a break sends up to 1000 revisions in one message.
const MAX_MESSAGE: usize = 64 << 20;
/// A message that could repeat is logged at most this often.
const QUIET: Duration = Duration::from_secs(60);
/// [`Health::last_error`] from the start until the first full read.
pub const NOT_SYNCED: &str = "not synced with the cluster store yet";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("store.etcd: {0}")]
    Setup(String),
    #[error("cluster store unreachable: {0}")]
    Unreachable(String),
    #[error("cluster store refused {what}: {message}")]
    Refused { what: String, message: String },
    #[error("cluster store: {key} holds something unreadable: {message}")]
    Corrupt { key: String, message: String },
    /// etcd no longer knows the lease (it ran out, or was revoked): what
    /// was bound to it is gone. Not tried again.
    #[error("the order lock's lease ran out")]
    LeaseGone,
}

/// Whether the store answers, as the operator sees it. A node starts
/// down (since its start, [`NOT_SYNCED`]) and is up from its first full
/// read of the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Since when it has not answered (or since the start, before the
    /// first full read); `None` while it does.
    pub down_since: Option<SystemTime>,
    pub last_error: Option<String>,
    /// When this node last read the whole store and followed it.
    pub last_sync: Option<SystemTime>,
}

/// What this node knows of the others, kept by [`follow`].
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    /// First name → the node holding its order lock.
    pub locks: HashMap<String, String>,
    pub nodes: HashMap<String, NodeRecord>,
    /// Token → key authorization.
    pub http01: HashMap<String, String>,
    /// Name → hex SHA-256 of the key authorization.
    pub tls_alpn01: HashMap<String, String>,
}

/// [`Health`] and what the log has been told of it.
#[derive(Debug)]
struct HealthState {
    shown: Health,
    /// A failure was logged, and not yet the return.
    down_logged: bool,
}

/// The etcd cluster and this node's place in it.
pub struct Cluster {
    config: Etcd,
    options: ConnectOptions,
    /// The connection, once made (the client reconnects by itself).
    client: Arc<Mutex<Option<Client>>>,
    /// A connection is being made: one at a time.
    connecting: Arc<AtomicBool>,
    health: Mutex<HealthState>,
    mirror: Mutex<Mirror>,
    /// The current second and the lookups made in it.
    lookups: Mutex<(u64, u32)>,
    /// Lookups refused for the budget, logged once a minute.
    over_budget: Quiet,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.config.prefix)
            .field("node", &self.config.node)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Reads the TLS files and the password: a mistake there stops the
    /// start. Connects on first use, so an etcd that is down at start
    /// leaves the instance serving what it has.
    pub fn new(config: &Etcd) -> Result<Cluster, ClusterError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p)
                    .map_err(|e| ClusterError::Setup(format!("tls: {}: {e}", p.display())))
            };
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(t);
        }
        if let (Some(user), Some(file)) = (&config.user, &config.password_file) {
            let password = std::fs::read_to_string(file).map_err(|e| {
                ClusterError::Setup(format!("password_file {}: {e}", file.display()))
            })?;
            options = options.with_user(user, password.trim_end_matches(['\r', '\n']));
        }
        Ok(Cluster {
            config: config.clone(),
            options,
            client: Arc::default(),
            connecting: Arc::default(),
            health: Mutex::new(HealthState {
                shown: Health {
                    down_since: Some(SystemTime::now()),
                    last_error: Some(NOT_SYNCED.into()),
                    last_sync: None,
                },
                down_logged: false,
            }),
            mirror: Mutex::default(),
            lookups: Mutex::default(),
            over_budget: Quiet::new(QUIET),
        })
    }

    /// This instance's node name.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    pub fn endpoints(&self) -> &[String] {
        &self.config.endpoints
    }

    pub fn key(&self, key: &Key) -> String {
        key.under(&self.config.prefix)
    }

    pub fn health(&self) -> Health {
        lock(&self.health).shown.clone()
    }

    pub fn mirror(&self) -> MutexGuard<'_, Mirror> {
        lock(&self.mirror)
    }

    /// Says a full read of the store succeeded (`Ok`) or why it failed,
    /// and logs each change.
    fn set_health(&self, result: Result<(), &ClusterError>) {
        let mut state = lock(&self.health);
        let state = &mut *state;
        let h = &mut state.shown;
        match result {
            Ok(()) => {
                let since = h.down_since.take();
                if state.down_logged {
                    let down = since
                        .and_then(|s| SystemTime::now().duration_since(s).ok())
                        .unwrap_or_default();
                    warn!(
                        down_for = %humantime::format_duration(Duration::from_secs(down.as_secs())),
                        "cluster store reachable again: following it, orders allowed"
                    );
                } else if h.last_sync.is_none() {
                    info!("cluster store read: following it");
                }
                state.down_logged = false;
                h.last_error = None;
                h.last_sync = Some(SystemTime::now());
            }
            Err(e) => {
                if !state.down_logged {
                    if matches!(e, ClusterError::Refused { .. }) {
                        error!(error = %e, "cluster store refuses this node (check its etcd user, password, certificate and permissions on the prefix): serving the certificates this node has, ordering none until it is fixed");
                    } else {
                        warn!(error = %e, "cluster store unreachable: serving the certificates this node has, ordering none until it is back");
                    }
                    state.down_logged = true;
                }
                // Before the first read: down since the start.
                h.down_since.get_or_insert_with(SystemTime::now);
                h.last_error = Some(e.to_string());
            }
        }
    }

    /// The connection, made on first use. One connect at a time (with a
    /// user it authenticates over the network); whoever asks meanwhile is
    /// told so at once rather than made to wait. The connect goes on when
    /// the one who started it gives up waiting.
    async fn client(&self) -> Result<Client, ClusterError> {
        if let Some(c) = lock(&self.client).as_ref() {
            return Ok(c.clone());
        }
        if self.connecting.swap(true, Ordering::AcqRel) {
            return Err(ClusterError::Unreachable("connecting".into()));
        }
        let done = Done(self.connecting.clone());
        // Made while we looked?
        if let Some(c) = lock(&self.client).as_ref() {
            return Ok(c.clone());
        }
        let slot = self.client.clone();
        let endpoints = self.config.endpoints.clone();
        let options = self.options.clone();
        let connect = tokio::spawn(async move {
            let _done = done;
            let connect = Client::connect(endpoints, Some(options));
            let client = match tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(classify("connecting", e)),
                Err(_) => return Err(ClusterError::Unreachable("connecting: no answer".into())),
            };
            *lock(&slot) = Some(client.clone());
            Ok(client)
        });
        connect
            .await
            .unwrap_or_else(|e| Err(ClusterError::Unreachable(format!("connecting: {e}"))))
    }

    /// Runs one request, bounded in time, and again after what fails on the
    /// way (a leader election, a member gone, a connection being made, an
    /// auth token expired). A refusal, and [`ClusterError::LeaseGone`], are
    /// not tried again.
    async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ClusterError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut pause = Duration::from_millis(200);
        let mut tries = 0;
        loop {
            tries += 1;
            let error = match self.client().await {
                Err(e) => e,
                Ok(client) => {
                    match tokio::time::timeout(REQUEST_TIMEOUT, f(client.clone())).await {
                        Ok(Ok(v)) => return Ok(v),
                        Ok(Err(e)) if kind(&e) == Kind::Reauthenticate => {
                            debug!(what, error = %e, "etcd auth token no longer valid; authenticating again");
                            let again =
                                tokio::time::timeout(REQUEST_TIMEOUT, client.refresh_token()).await;
                            match again.map(|r| r.map_err(|e| classify("authenticating again", e)))
                            {
                                Ok(Err(refused @ ClusterError::Refused { .. })) => {
                                    return Err(refused)
                                }
                                _ => classify(what, e),
                            }
                        }
                        Ok(Err(e)) => classify(what, e),
                        Err(_) => ClusterError::Unreachable(format!("{what}: no answer")),
                    }
                }
            };
            if !matches!(error, ClusterError::Unreachable(_)) || tries >= TRIES {
                return Err(error);
            }
            debug!(what, error = %error, "etcd request failed on the way; trying again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// The value at `key` and its modification revision, if there is one
    /// (a linearizable read: a node cut off from the majority gets an
    /// error, never a stale answer).
    pub async fn get(&self, key: &Key) -> Result<Option<(Vec<u8>, i64)>, ClusterError> {
        let k = self.key(key);
        let resp = self
            .run(&format!("get {k}"), |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Writes `value` at `key` unless something is there already; returns
    /// what is there then (ours or the one written first) and its revision.
    pub async fn put_if_absent(
        &self,
        key: &Key,
        value: Vec<u8>,
    ) -> Result<(Vec<u8>, i64), ClusterError> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
        let k = self.key(key);
        let resp = self
            .run(&format!("create {k}"), |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(k.clone(), value.clone(), None)])
                    .or_else([TxnOp::get(k.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            return Ok((value, revision));
        }
        let there = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
            _ => None,
        });
        // Deleted between the compare and the get: ours is as good, and
        // the next one to need it writes it again.
        Ok(there.unwrap_or((value, revision)))
    }

    /// Deletes `key` if it still holds the value last modified at `revision`.
    pub async fn delete_if_unchanged(&self, key: &Key, revision: i64) -> Result<(), ClusterError> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let k = self.key(key);
        self.run(&format!("delete {k}"), |mut c| {
            let txn = Txn::new()
                .when([Compare::mod_revision(k.clone(), CompareOp::Equal, revision)])
                .and_then([TxnOp::delete(k.clone(), None)]);
            async move { c.txn(txn).await }
        })
        .await?;
        Ok(())
    }

    /// Says when this node last synced, at `revision`.
    async fn report_sync(&self, revision: i64) -> Result<(), ClusterError> {
        let record = NodeRecord {
            synced_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            revision,
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let k = self.key(&Key::Node(self.config.node.clone()));
        self.run("report this node's sync", |mut c| {
            let (k, v) = (k.clone(), value.clone());
            async move { c.put(k, v, None::<PutOptions>).await }
        })
        .await?;
        Ok(())
    }

    /// Everything under the prefix, and the revision it was read at: read
    /// in pages of [`PAGE`] keys, every page at the first one's revision,
    /// so the whole is one moment of the store however large it is. Read
    /// again from the start if that revision is compacted meanwhile.
    async fn read_all(&self) -> Result<(Vec<etcd_client::KeyValue>, i64), ClusterError> {
        let prefix = self.config.prefix.as_bytes().to_vec();
        let end = range_end(&prefix);
        for _ in 0..3 {
            let mut kvs = Vec::new();
            let mut from = prefix.clone();
            let mut revision = 0;
            loop {
                let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
                if revision > 0 {
                    options = options.with_revision(revision);
                }
                let page = self
                    .run("read the store", |c| {
                        let mut kv = c.kv_client().max_decoding_message_size(MAX_MESSAGE);
                        let (from, options) = (from.clone(), options.clone());
                        async move {
                            match kv.get(from, Some(options)).await {
                                Err(e) if compacted(&e) => Ok(None),
                                other => other.map(Some),
                            }
                        }
                    })
                    .await?;
                let Some(mut page) = page else {
                    debug!(
                        revision,
                        "the store was compacted while read: reading it again"
                    );
                    break;
                };
                if revision == 0 {
                    revision = page.header().map_or(0, |h| h.revision());
                }
                let more = page.more();
                let batch = page.take_kvs();
                let next = batch.last().map(|kv| after(kv.key()));
                kvs.extend(batch);
                match next {
                    Some(next) if more => from = next,
                    _ => return Ok((kvs, revision)),
                }
            }
        }
        Err(ClusterError::Unreachable(
            "read the store: compacted while read, three times".into(),
        ))
    }

    /// The http-01 answer for `token` that another node posted: from the
    /// mirror, or (the watch may be a moment behind the CA) from etcd.
    pub async fn http01(&self, token: &str) -> Option<String> {
        if let Some(k) = self.mirror().http01.get(token) {
            return Some(k.clone());
        }
        let value = self.look_up(&Key::Http01(token.to_string())).await?;
        String::from_utf8(value).ok()
    }

    /// The tls-alpn-01 digest (hex) for `name` that another node posted.
    pub async fn tls_alpn01(&self, name: &str) -> Option<String> {
        if let Some(d) = self.mirror().tls_alpn01.get(name) {
            return Some(d.clone());
        }
        let value = self.look_up(&Key::TlsAlpn01(name.to_string())).await?;
        String::from_utf8(value).ok()
    }

    /// A challenge answer from etcd itself, within the lookup budget and
    /// [`LOOKUP_TIMEOUT`] (connection included).
    async fn look_up(&self, key: &Key) -> Option<Vec<u8>> {
        if !self.lookup_allowed(false) {
            return None;
        }
        let k = self.key(key);
        let ask = async {
            let mut client = self.client().await.ok()?;
            // Counted only now: a lookup made, not one that found no connection.
            if !self.lookup_allowed(true) {
                return None;
            }
            client.get(k, None).await.ok()
        };
        let resp = tokio::time::timeout(LOOKUP_TIMEOUT, ask).await.ok()??;
        resp.kvs().first().map(|kv| kv.value().to_vec())
    }

    /// Whether this second's lookup budget has room; `spend` takes one.
    fn lookup_allowed(&self, spend: bool) -> bool {
        self.lookup_allowed_at(crate::tls::certs::unix_now() as u64, spend)
    }

    /// [`Self::lookup_allowed`] in second `now`.
    fn lookup_allowed_at(&self, now: u64, spend: bool) -> bool {
        let allowed = {
            let mut budget = lock(&self.lookups);
            if budget.0 != now {
                *budget = (now, 0);
            }
            let room = budget.1 < LOOKUPS_PER_SECOND;
            if room && spend {
                budget.1 += 1;
            }
            room
        };
        if !allowed {
            if let Some(more) = self.over_budget.due() {
                warn!(
                    per_second = LOOKUPS_PER_SECOND,
                    also_refused_since = more,
                    "challenge lookups in etcd over budget: a token not in this node's copy of the store is answered as unknown"
                );
            }
        }
        allowed
    }

    /// Publishes a challenge answer under `lease` (the order lock's): it
    /// goes when the lock does.
    pub(crate) async fn put_leased(
        &self,
        key: &Key,
        value: &str,
        lease: i64,
    ) -> Result<(), ClusterError> {
        let k = self.key(key);
        self.run(&format!("put {k}"), |mut c| {
            let (k, v) = (k.clone(), value.to_string());
            async move { c.put(k, v, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await?;
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Clears the "connecting" flag when the connect ends, however it ends.
struct Done(Arc<AtomicBool>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Lets a message that could repeat through at most once per period.
#[derive(Debug)]
pub(crate) struct Quiet {
    period: Duration,
    /// When it last went through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Quiet {
    pub(crate) fn new(period: Duration) -> Quiet {
        Quiet {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last one)` when this one may be said.
    pub(crate) fn due(&self) -> Option<u64> {
        let mut s = lock(&self.state);
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.period => {
                s.1 += 1;
                None
            }
            _ => {
                s.0 = Some(now);
                Some(std::mem::take(&mut s.1))
            }
        }
    }
}

/// The end of the range of keys starting with `prefix` (etcd's
/// `--prefix`): `prefix` with its last byte below 0xff raised by one.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        // Every key (etcd's `\0`: to the end).
        None => vec![0],
    }
}

/// The first key after `key`: where the next page starts.
fn after(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// etcd no longer has the revision asked for.
fn compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::OutOfRange && s.message().contains("required revision has been compacted"))
}

/// What an error from etcd calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Try again: the network, a leader election, a busy member.
    Temporary,
    /// The auth token expired, or predates a change of users and roles:
    /// authenticate again, then try again.
    Reauthenticate,
    /// A mistake to fix (password, permissions, a full database).
    Refused,
    /// The lease is gone.
    LeaseGone,
}

/// What `e` calls for, by etcd's own messages (etcd 3.4,
/// `api/v3rpc/rpctypes`) and, for the rest, the gRPC code.
fn kind(e: &etcd_client::Error) -> Kind {
    use tonic::Code;
    let etcd_client::Error::GRpcStatus(s) = e else {
        return Kind::Temporary;
    };
    let m = s.message();
    if m.contains("invalid auth token") || m.contains("revision of auth store is old") {
        return Kind::Reauthenticate;
    }
    match s.code() {
        Code::NotFound if m.contains("requested lease not found") => Kind::LeaseGone,
        // A member that lost its leader, or the leader just changed.
        Code::FailedPrecondition if m.contains("not leader") || m.contains("no leader") => {
            Kind::Temporary
        }
        // A member whose applied index lags its committed one.
        Code::ResourceExhausted if m.contains("too many requests") => Kind::Temporary,
        Code::PermissionDenied
        | Code::Unauthenticated
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::ResourceExhausted => Kind::Refused,
        _ => Kind::Temporary,
    }
}

/// Unreachable (try again later), refused (a mistake to fix: wrong
/// password, no permission on the prefix) or the lease gone.
fn classify(what: &str, e: etcd_client::Error) -> ClusterError {
    let message = match &e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    };
    match kind(&e) {
        Kind::Refused => ClusterError::Refused {
            what: what.to_string(),
            message,
        },
        Kind::LeaseGone => ClusterError::LeaseGone,
        Kind::Temporary | Kind::Reauthenticate => {
            ClusterError::Unreachable(format!("{what}: {message}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn status(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(Status::new(code, message))
    }

    fn classified(code: Code, message: &str) -> ClusterError {
        classify("read the store", status(code, message))
    }

    #[test]
    fn what_fails_on_the_way_is_tried_again_and_mistakes_are_not() {
        // etcd 3.4's own errors (api/v3rpc/rpctypes/error.go).
        let temporary = [
            (Code::Unavailable, "etcdserver: no leader"),
            (Code::FailedPrecondition, "etcdserver: not leader"),
            (Code::FailedPrecondition, "etcdserver: no leader"),
            (Code::Unavailable, "etcdserver: leader changed"),
            (Code::Unavailable, "etcdserver: request timed out"),
            (Code::ResourceExhausted, "etcdserver: too many requests"),
            (Code::Unavailable, "tcp connect error"),
            (Code::Unknown, "transport error"),
            (Code::DeadlineExceeded, "deadline"),
            (Code::Unauthenticated, "etcdserver: invalid auth token"),
            (
                Code::InvalidArgument,
                "etcdserver: revision of auth store is old",
            ),
        ];
        for (code, m) in temporary {
            let e = classified(code, m);
            assert!(
                matches!(e, ClusterError::Unreachable(ref s) if s.contains(m)),
                "{code:?} {m}: {e:?}"
            );
        }
        let refused = [
            (Code::PermissionDenied, "etcdserver: permission denied"),
            (
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            (Code::InvalidArgument, "etcdserver: user name is empty"),
            (Code::FailedPrecondition, "etcdserver: user name not found"),
            (
                Code::FailedPrecondition,
                "etcdserver: authentication is not enabled",
            ),
            (Code::Unauthenticated, "unauthenticated"),
            (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
            ),
            (Code::InvalidArgument, "etcdserver: request is too large"),
        ];
        for (code, m) in refused {
            let e = classified(code, m);
            assert!(
                matches!(e, ClusterError::Refused { ref what, ref message } if what == "read the store" && message == m),
                "{code:?} {m}: {e:?}"
            );
        }
        let gone = classified(Code::NotFound, "etcdserver: requested lease not found");
        assert!(matches!(gone, ClusterError::LeaseGone), "{gone:?}");
        assert_eq!(gone.to_string(), "the order lock's lease ran out");
        assert!(matches!(
            classified(Code::NotFound, "etcdserver: member not found"),
            ClusterError::Unreachable(_)
        ));
        let other = classify("connecting", etcd_client::Error::InvalidArgs("x".into()));
        assert!(matches!(other, ClusterError::Unreachable(_)), "{other:?}");

        assert_eq!(
            kind(&status(
                Code::Unauthenticated,
                "etcdserver: invalid auth token"
            )),
            Kind::Reauthenticate
        );
        assert_eq!(
            kind(&status(
                Code::InvalidArgument,
                "etcdserver: revision of auth store is old"
            )),
            Kind::Reauthenticate
        );
        assert!(compacted(&status(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )));
        assert!(!compacted(&status(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision"
        )));
    }

    #[test]
    fn pages_cover_the_prefix_and_nothing_twice() {
        assert_eq!(range_end(b"/portcullis/"), b"/portcullis0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), vec![0]);
        // Every key under the prefix is in [prefix, end); no other is.
        let (p, end) = (b"/portcullis/".as_slice(), range_end(b"/portcullis/"));
        for inside in [
            &b"/portcullis/"[..],
            b"/portcullis/certs/x",
            b"/portcullis/\xff\xff",
        ] {
            assert!(inside >= p && inside < end.as_slice(), "{inside:?}");
        }
        for outside in [
            &b"/portcullis"[..],
            b"/portcullis0",
            b"/portcullis1/x",
            b"/portcullit",
        ] {
            assert!(!(outside >= p && outside < end.as_slice()), "{outside:?}");
        }
        // The next page starts after the last key, before anything that
        // follows it: nothing read twice, nothing skipped.
        let last = b"/portcullis/certs/a.test".as_slice();
        let next = after(last);
        assert!(next.as_slice() > last);
        for later in [
            &b"/portcullis/certs/a.test\0x"[..],
            b"/portcullis/certs/a.test.",
            b"/portcullis/certs/a.testa",
            b"/portcullis/certs/b",
        ] {
            assert!(next.as_slice() <= later, "{later:?}");
        }
        assert_eq!(next, b"/portcullis/certs/a.test\0");
    }

    fn config(endpoint: &str, password_file: Option<std::path::PathBuf>) -> Etcd {
        Etcd {
            endpoints: vec![endpoint.to_string()],
            prefix: "/portcullis/".into(),
            node: "mx1".into(),
            tls: None,
            user: password_file.as_ref().map(|_| "portcullis".to_string()),
            password_file,
        }
    }

    #[test]
    fn a_node_is_down_until_its_first_full_read() {
        let cluster = Cluster::new(&config("http://127.0.0.1:1", None)).unwrap();
        let h = cluster.health();
        assert!(h.down_since.is_some(), "{h:?}");
        assert_eq!(h.last_error.as_deref(), Some(NOT_SYNCED));
        assert_eq!(h.last_sync, None);
        let started = h.down_since;

        // A failed first read: still down since the start, with the reason.
        let e = ClusterError::Unreachable("read the store: tcp connect error".into());
        cluster.set_health(Err(&e));
        let h = cluster.health();
        assert_eq!(h.down_since, started);
        assert_eq!(h.last_error, Some(e.to_string()));

        cluster.set_health(Ok(()));
        let h = cluster.health();
        assert_eq!((h.down_since, h.last_error), (None, None));
        assert!(h.last_sync.is_some());

        // Down again: since now.
        cluster.set_health(Err(&e));
        let h = cluster.health();
        assert!(h.down_since.is_some() && h.down_since >= started, "{h:?}");
        assert!(h.last_sync.is_some());
    }

    /// An etcd that accepts connections and never answers: the connect
    /// (which authenticates, with a user) hangs.
    async fn silent_etcd() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        (format!("http://{addr}"), task)
    }

    #[tokio::test]
    async fn one_connect_at_a_time_and_lookups_wait_two_seconds_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "secret\n").unwrap();
        let (endpoint, server) = silent_etcd().await;
        let cluster = Arc::new(Cluster::new(&config(&endpoint, Some(password))).unwrap());

        let started = std::time::Instant::now();
        let first = tokio::spawn({
            let c = cluster.clone();
            async move { c.client().await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Meanwhile: told at once, not queued behind the connect.
        let second = tokio::time::timeout(Duration::from_millis(200), cluster.client()).await;
        assert!(
            matches!(second, Ok(Err(ClusterError::Unreachable(ref m))) if m == "connecting"),
            "{:?}",
            second.map(|r| r.map(|_| ()))
        );
        // A challenge lookup gives up within its two seconds.
        let asked = std::time::Instant::now();
        assert_eq!(cluster.http01("token").await, None);
        assert!(
            asked.elapsed() < Duration::from_millis(2500),
            "{:?}",
            asked.elapsed()
        );
        // The connect itself ends (no answer) within its own bound.
        let first = first.await.unwrap();
        assert!(
            matches!(first, Err(ClusterError::Unreachable(_))),
            "{first:?}"
        );
        assert!(started.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(1));
        // And the next one may try again.
        assert!(!cluster.connecting.load(Ordering::Acquire));
        server.abort();
    }

    #[test]
    fn lookups_count_only_when_made() {
        let cluster = Cluster::new(&config("http://127.0.0.1:1", None)).unwrap();
        for _ in 0..100 {
            assert!(cluster.lookup_allowed_at(7, false));
        }
        for _ in 0..LOOKUPS_PER_SECOND {
            assert!(cluster.lookup_allowed_at(7, true));
        }
        assert!(!cluster.lookup_allowed_at(7, true));
        assert!(!cluster.lookup_allowed_at(7, false));
        assert!(cluster.lookup_allowed_at(8, false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_message_goes_through_once_a_period() {
        let quiet = Quiet::new(Duration::from_secs(60));
        assert_eq!(quiet.due(), Some(0));
        assert_eq!(quiet.due(), None);
        assert_eq!(quiet.due(), None);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(quiet.due(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(quiet.due(), Some(3));
        assert_eq!(quiet.due(), None);
    }
}
