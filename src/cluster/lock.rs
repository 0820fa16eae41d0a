//! The order lock of one host: `locks/<first name>`, created only when
//! absent (compare-and-swap on its create revision), bound to a lease of
//! [`TTL`] that a task keeps alive while the node orders. A node that stops
//! (or is cut off) loses it within [`TTL`]; the certificate is written only
//! while the lock is still the one this node created.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::keys::{CertRecord, Key};
use super::{Cluster, ClusterError, REQUEST_TIMEOUT};

/// The lease of a lock: long enough to ride out a leader election, short
/// enough that a node that died holding it delays the others by little.
pub const TTL: Duration = Duration::from_secs(30);
/// How often the lease is renewed while the lock is held.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The lock of one host, held by this node; released when dropped.
pub struct Lock {
    cluster: Arc<Cluster>,
    name: String,
    lease: i64,
    /// The lock key's create revision: the lock is still ours while the
    /// key has it.
    revision: i64,
    keeper: JoinHandle<()>,
    released: bool,
}

/// What asking for a lock gives.
pub enum Acquired {
    Held(Lock),
    /// Another node holds it (its name).
    Elsewhere(String),
}

impl Cluster {
    /// Takes the order lock of the host whose first name is `name`.
    pub async fn lock(self: &Arc<Self>, name: &str) -> Result<Acquired, ClusterError> {
        let ttl = TTL.as_secs() as i64;
        let lease = self
            .run("grant a lease", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?
            .id();
        let key = self.key(&Key::Lock(name.to_string()));
        let node = self.node().to_string();
        let resp = self
            .run(&format!("lock {key}"), |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        node.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(key.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                self.revoke(lease).await;
                return Err(e);
            }
        };
        let there = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                (
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.lease(),
                    kv.create_revision(),
                )
            }),
            _ => None,
        });
        let revision = match (resp.succeeded(), there) {
            (true, _) => resp.header().map_or(0, |h| h.revision()),
            // Our own put, whose answer was lost and which was sent again.
            (false, Some((_, l, rev))) if l == lease => rev,
            (false, Some((holder, _, _))) => {
                self.revoke(lease).await;
                return Ok(Acquired::Elsewhere(holder));
            }
            // Released between the compare and the get: try again later.
            (false, None) => {
                self.revoke(lease).await;
                return Ok(Acquired::Elsewhere("(just released)".into()));
            }
        };
        let keeper = tokio::spawn(keep_alive(self.clone(), lease));
        Ok(Acquired::Held(Lock {
            cluster: self.clone(),
            name: name.to_string(),
            lease,
            revision,
            keeper,
            released: false,
        }))
    }

    async fn revoke(&self, lease: i64) {
        let revoked = self
            .run("revoke a lease", |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await;
        if let Err(e) = revoked {
            debug!(error = %e, "lease not revoked; it expires by itself");
        }
    }
}

/// Renews the lease every [`KEEP_ALIVE`] until aborted; a renewal that
/// fails is tried again at the next tick (the lease outlives two misses).
async fn keep_alive(cluster: Arc<Cluster>, lease: i64) {
    loop {
        tokio::time::sleep(KEEP_ALIVE).await;
        let renewed = cluster
            .run("keep the lock's lease alive", |mut c| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
        match renewed {
            Ok(Some(r)) if r.ttl() > 0 => {}
            Ok(_) => {
                warn!("the order lock's lease is gone: the certificate will not be written to the cluster");
                return;
            }
            Err(e) => warn!(error = %e, "cannot renew the order lock's lease; trying again"),
        }
    }
}

impl Lock {
    /// The node holding it: this one.
    pub fn node(&self) -> &str {
        self.cluster.node()
    }

    /// Publishes a challenge answer; it goes with the lock.
    pub async fn post(&self, key: &Key, value: &str) -> Result<(), ClusterError> {
        self.cluster.put_leased(key, value, self.lease).await
    }

    /// Writes the host's certificate, if the lock is still ours; `Ok(false)`
    /// when it is not (its lease ran out, another node holds it now).
    pub async fn write(&self, record: &CertRecord) -> Result<bool, ClusterError> {
        let value = serde_json::to_vec(record).map_err(|e| ClusterError::Corrupt {
            key: "certs".into(),
            message: e.to_string(),
        })?;
        let lock_key = self.cluster.key(&Key::Lock(self.name.clone()));
        let cert_key = self.cluster.key(&Key::Cert(self.name.clone()));
        let revision = self.revision;
        let resp = self
            .cluster
            .run(&format!("write {cert_key}"), |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        lock_key.clone(),
                        CompareOp::Equal,
                        revision,
                    )])
                    .and_then([TxnOp::put(cert_key.clone(), value.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    /// Lets the lock go at once (its challenge answers with it).
    pub async fn release(mut self) {
        self.keeper.abort();
        self.released = true;
        let lease = self.lease;
        let revoke = self.cluster.revoke(lease);
        if tokio::time::timeout(REQUEST_TIMEOUT * 2, revoke)
            .await
            .is_err()
        {
            debug!("lock not released in time; its lease expires by itself");
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.keeper.abort();
        if !self.released {
            // Dropped mid-attempt (a timeout, shutdown): released in the
            // background, or by the lease running out.
            let (cluster, lease) = (self.cluster.clone(), self.lease);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { cluster.revoke(lease).await });
            }
        }
    }
}
