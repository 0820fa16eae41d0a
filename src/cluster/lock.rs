//! The order lock of one host: `locks/<first name>`, created only when
//! absent (compare-and-swap on its create revision), bound to a lease of
//! [`TTL`] that a task keeps alive while the node orders. A node that stops
//! (or is cut off) loses it within [`TTL`]; the certificate is written only
//! while the lock is still the one this node created.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::keys::{CertRecord, Key};
use super::{Cluster, ClusterError, REQUEST_TIMEOUT};

/// The lease of a lock: long enough to ride out a leader election, short
/// enough that a node that died holding it delays the others by little.
pub const TTL: Duration = Duration::from_secs(30);
/// How often the lease is renewed while the lock is held.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Bound on one renewal; a failed one is tried again after [`RENEW_RETRY`].
const RENEW_TIMEOUT: Duration = Duration::from_secs(4);
const RENEW_RETRY: Duration = Duration::from_secs(2);
/// The lease is taken for lost this long before it would run out unrenewed:
/// the order stops while etcd may still hold the lock for us.
const MARGIN: Duration = Duration::from_secs(5);

/// The lock of one host, held by this node; released when dropped.
pub struct Lock {
    cluster: Arc<Cluster>,
    name: String,
    lease: i64,
    /// The lock key's create revision: the lock is still ours while the
    /// key has it.
    revision: i64,
    keeper: JoinHandle<()>,
    /// Cancelled once the lease is gone (or taken for gone).
    lost: CancellationToken,
    released: bool,
}

/// What asking for a lock gives.
pub enum Acquired {
    Held(Lock),
    /// Another node holds it (its name).
    Elsewhere(String),
    /// This node's previous run holds it, until its lease runs out.
    EarlierRun,
    /// It was let go between the compare and the look: ask again soon.
    JustReleased,
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
                if holder == self.node() {
                    return Ok(Acquired::EarlierRun);
                }
                return Ok(Acquired::Elsewhere(holder));
            }
            (false, None) => {
                self.revoke(lease).await;
                return Ok(Acquired::JustReleased);
            }
        };
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(self.clone(), lease, lost.clone()));
        Ok(Acquired::Held(Lock {
            cluster: self.clone(),
            name: name.to_string(),
            lease,
            revision,
            keeper,
            lost,
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

/// Renews the lease at once, then every [`KEEP_ALIVE`] after the last
/// renewal, until aborted. A failed renewal is tried again every
/// [`RENEW_RETRY`]; once etcd says the lease is gone, or it would run out
/// within [`MARGIN`] unrenewed, `lost` is cancelled: the order stops.
async fn keep_alive(cluster: Arc<Cluster>, lease: i64, lost: CancellationToken) {
    let mut renewed_at = Instant::now();
    let mut next = renewed_at;
    loop {
        tokio::time::sleep_until(next).await;
        match tokio::time::timeout(RENEW_TIMEOUT, renew(&cluster, lease)).await {
            Ok(Ok(true)) => {
                renewed_at = Instant::now();
                next = renewed_at + KEEP_ALIVE;
                continue;
            }
            Ok(Ok(false)) => {
                warn!("the order lock's lease ran out: stopping this order; another node may order the certificate");
                lost.cancel();
                return;
            }
            Ok(Err(e)) => debug!(error = %e, "the order lock's lease not renewed; trying again"),
            Err(_) => debug!("the order lock's lease not renewed in time; trying again"),
        }
        if renewed_at.elapsed() + MARGIN + RENEW_RETRY >= TTL {
            warn!(
                "the order lock's lease could not be renewed for {} s (etcd does not answer): stopping this order before the lock runs out",
                renewed_at.elapsed().as_secs()
            );
            lost.cancel();
            return;
        }
        next = Instant::now() + RENEW_RETRY;
    }
}

/// One renewal: `Ok(false)` when etcd says the lease is gone.
async fn renew(cluster: &Cluster, lease: i64) -> Result<bool, etcd_client::Error> {
    let Ok(mut client) = cluster.client().await else {
        return Err(etcd_client::Error::InvalidArgs(
            "no connection to etcd".into(),
        ));
    };
    let opened = client.lease_keep_alive(lease).await;
    let (mut keeper, mut stream) = match opened {
        Ok(pair) => pair,
        // etcd-client sends the first renewal itself, and says so.
        Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
            return Ok(false)
        }
        Err(e) => return Err(e),
    };
    keeper.keep_alive().await?;
    match stream.message().await? {
        Some(r) => Ok(r.ttl() > 0),
        // A stream that ended: try again, it says nothing of the lease.
        None => Err(etcd_client::Error::InvalidArgs(
            "keep-alive stream ended".into(),
        )),
    }
}

impl Lock {
    /// The node holding it: this one.
    pub fn node(&self) -> &str {
        self.cluster.node()
    }

    /// Resolves once the lease is gone or taken for gone: whatever is done
    /// under the lock should stop.
    pub async fn lost(&self) {
        self.lost.cancelled().await
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
