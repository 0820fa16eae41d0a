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
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use tracing::{debug, warn};

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
}

/// Whether the store answers, as the operator sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Since when it has not answered; `None` while it does.
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

/// The etcd cluster and this node's place in it.
pub struct Cluster {
    config: Etcd,
    options: ConnectOptions,
    client: tokio::sync::Mutex<Option<Client>>,
    health: Mutex<Health>,
    mirror: Mutex<Mirror>,
    /// The current second and the lookups made in it.
    lookups: Mutex<(u64, u32)>,
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
            client: tokio::sync::Mutex::new(None),
            health: Mutex::default(),
            mirror: Mutex::default(),
            lookups: Mutex::default(),
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
        lock(&self.health).clone()
    }

    pub fn mirror(&self) -> MutexGuard<'_, Mirror> {
        lock(&self.mirror)
    }

    /// Says the store answered (`Ok`) or not, and logs each change.
    fn set_health(&self, result: Result<(), &ClusterError>, synced: bool) {
        let mut h = lock(&self.health);
        match result {
            Ok(()) => {
                if let Some(since) = h.down_since.take() {
                    let down = SystemTime::now().duration_since(since).unwrap_or_default();
                    warn!(
                        down_for = %humantime::format_duration(Duration::from_secs(down.as_secs())),
                        "cluster store reachable again: following it, orders allowed"
                    );
                }
                h.last_error = None;
                if synced {
                    h.last_sync = Some(SystemTime::now());
                }
            }
            Err(e) => {
                if h.down_since.is_none() {
                    warn!(error = %e, "cluster store unreachable: serving the certificates this node has, ordering none until it is back");
                    h.down_since = Some(SystemTime::now());
                }
                h.last_error = Some(e.to_string());
            }
        }
    }

    async fn client(&self) -> Result<Client, ClusterError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let endpoints = &self.config.endpoints;
        let connect = Client::connect(endpoints, Some(self.options.clone()));
        let client = match tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(classify("connecting", e)),
            Err(_) => return Err(ClusterError::Unreachable("connecting: no answer".into())),
        };
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Runs one request, bounded in time, and again after what fails on the
    /// way (a leader election, a member gone, an auth token expired).
    async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ClusterError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut pause = Duration::from_millis(200);
        let mut tries = 0;
        loop {
            tries += 1;
            let client = self.client().await?;
            let error = match tokio::time::timeout(REQUEST_TIMEOUT, f(client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if token_expired(&e) => {
                    debug!(what, "etcd auth token expired; authenticating again");
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.refresh_token()).await;
                    classify(what, e)
                }
                Ok(Err(e)) => classify(what, e),
                Err(_) => ClusterError::Unreachable(format!("{what}: no answer")),
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

    /// Everything under the prefix, and the revision it was read at.
    async fn read_all(&self) -> Result<(Vec<etcd_client::KeyValue>, i64), ClusterError> {
        let prefix = self.config.prefix.clone();
        let mut resp = self
            .run("read the store", |mut c| {
                let p = prefix.clone();
                async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((resp.take_kvs(), revision))
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

    /// A challenge answer from etcd itself, within the lookup budget.
    async fn look_up(&self, key: &Key) -> Option<Vec<u8>> {
        {
            let now = crate::tls::certs::unix_now() as u64;
            let mut budget = lock(&self.lookups);
            if budget.0 != now {
                *budget = (now, 0);
            }
            if budget.1 >= LOOKUPS_PER_SECOND {
                return None;
            }
            budget.1 += 1;
        }
        let k = self.key(key);
        let client = self.client().await.ok()?;
        let get = async move {
            let mut c = client;
            c.get(k, None).await
        };
        let resp = tokio::time::timeout(Duration::from_secs(2), get)
            .await
            .ok()?
            .ok()?;
        resp.kvs().first().map(|kv| kv.value().to_vec())
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

/// Unreachable (try again later) or refused (a mistake to fix: wrong
/// password, no permission on the prefix).
fn classify(what: &str, e: etcd_client::Error) -> ClusterError {
    use tonic::Code;
    let message = match &e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    };
    let refused = matches!(&e, etcd_client::Error::GRpcStatus(s)
        if matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument | Code::FailedPrecondition | Code::ResourceExhausted)
            && !token_expired(&e));
    if refused {
        ClusterError::Refused {
            what: what.to_string(),
            message,
        }
    } else {
        ClusterError::Unreachable(format!("{what}: {message}"))
    }
}

/// etcd's answer to a simple auth token that timed out: authenticate again.
fn token_expired(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("invalid auth token"))
}
