//! Following the store: read everything under the prefix, then watch it
//! from the next revision. Certificate records go to the ACME layer as
//! they come; locks, nodes and challenge answers are mirrored. A broken
//! watch is opened again from the last revision seen; a compacted one, and
//! every [`RECONCILE`], starts over with a full read (the backstop). While
//! etcd does not answer, the node says so and tries again.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchOptions};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::keys::{CertRecord, Key, NodeRecord};
use super::{Cluster, ClusterError, Mirror};

/// A full read this often, whatever the watch says.
pub const RECONCILE: Duration = Duration::from_secs(60);
/// After a failed read, the next one; doubled up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Who installs the certificates the store holds.
pub trait Certs: Send + Sync {
    /// A host's record, as read or as just written by a node.
    fn record(&self, record: CertRecord);
}

impl Cluster {
    /// Follows the store until `stop`, handing every certificate record to
    /// `certs`.
    pub async fn follow(self: Arc<Self>, certs: Arc<dyn Certs>, stop: CancellationToken) {
        let mut retry = RETRY_MIN;
        loop {
            let synced = tokio::select! {
                r = self.sync(certs.as_ref()) => r,
                _ = stop.cancelled() => return,
            };
            let revision = match synced {
                Ok(rev) => {
                    retry = RETRY_MIN;
                    rev
                }
                Err(e) => {
                    self.set_health(Err(&e), false);
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {},
                        _ = stop.cancelled() => return,
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            };
            tokio::select! {
                _ = self.watch(revision, certs.as_ref()) => {},
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Reads everything, rebuilds the mirror, hands over the records, and
    /// says this node synced; the revision read at.
    async fn sync(&self, certs: &dyn Certs) -> Result<i64, ClusterError> {
        let (kvs, revision) = self.read_all().await?;
        let mut fresh = Mirror::default();
        let mut records = Vec::new();
        for kv in &kvs {
            if let Some(record) = self.apply(&mut fresh, kv, true) {
                records.push(record);
            }
        }
        *self.mirror() = fresh;
        for r in records {
            certs.record(r);
        }
        self.report_sync(revision).await?;
        // Our own record, without waiting for the watch to bring it.
        self.mirror().nodes.insert(
            self.node().to_string(),
            NodeRecord {
                synced_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
                revision,
            },
        );
        self.set_health(Ok(()), true);
        Ok(revision)
    }

    /// Watches from `revision + 1` until the stream breaks for good or it
    /// is time for a full read.
    async fn watch(&self, mut revision: i64, certs: &dyn Certs) {
        let until = tokio::time::Instant::now() + RECONCILE;
        while tokio::time::Instant::now() < until {
            let Ok(client) = self.client().await else {
                return;
            };
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1)
                .with_progress_notify();
            let prefix = self.config.prefix.clone();
            let opened = tokio::time::timeout(super::REQUEST_TIMEOUT, async move {
                let mut c = client;
                c.watch(prefix, Some(options)).await
            })
            .await;
            let mut stream = match opened {
                Ok(Ok(s)) => s,
                _ => return,
            };
            loop {
                let next = tokio::time::timeout_at(until, stream.message()).await;
                let resp = match next {
                    Err(_) => return, // time for a full read
                    Ok(Ok(Some(r))) => r,
                    Ok(Ok(None)) | Ok(Err(_)) => break, // open again from `revision`
                };
                if resp.compact_revision() > 0 || resp.canceled() {
                    debug!(
                        reason = resp.cancel_reason(),
                        "watch cancelled: reading the whole store"
                    );
                    return;
                }
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    revision = revision.max(kv.mod_revision());
                    let put = event.event_type() == EventType::Put;
                    let record = self.apply(&mut self.mirror(), kv, put);
                    if let Some(r) = record {
                        certs.record(r);
                    }
                }
                if let Some(h) = resp.header() {
                    revision = revision.max(h.revision());
                }
            }
            debug!("watch broken: opening it again from the last revision");
        }
    }

    /// Applies one key's new value (`put`) or deletion to `mirror`; a
    /// certificate record is returned for the ACME layer.
    fn apply(&self, mirror: &mut Mirror, kv: &KeyValue, put: bool) -> Option<CertRecord> {
        let key = Key::parse(&self.config.prefix, kv.key())?;
        let text = || String::from_utf8_lossy(kv.value()).into_owned();
        match (key, put) {
            (Key::Cert(name), true) => match serde_json::from_slice(kv.value()) {
                Ok(r) => return Some(r),
                Err(e) => {
                    warn!(host = %name, error = %e, "cluster store: unreadable certificate record; ignored")
                }
            },
            (Key::Lock(n), true) => {
                mirror.locks.insert(n, text());
            }
            (Key::Lock(n), false) => {
                mirror.locks.remove(&n);
            }
            (Key::Http01(t), true) => {
                mirror.http01.insert(t, text());
            }
            (Key::Http01(t), false) => {
                mirror.http01.remove(&t);
            }
            (Key::TlsAlpn01(n), true) => {
                mirror.tls_alpn01.insert(n, text());
            }
            (Key::TlsAlpn01(n), false) => {
                mirror.tls_alpn01.remove(&n);
            }
            (Key::Node(n), true) => {
                if let Ok(r) = serde_json::from_slice(kv.value()) {
                    mirror.nodes.insert(n, r);
                }
            }
            (Key::Node(n), false) => {
                mirror.nodes.remove(&n);
            }
            (Key::Cert(_) | Key::Account(_), _) => {}
        }
        None
    }
}
