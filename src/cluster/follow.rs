//! Following the store: read everything under the prefix, then watch it
//! from the next revision. Certificate records go to the ACME layer as
//! they come; locks, nodes and challenge answers are mirrored. A broken
//! watch is opened again from the last revision seen; a compacted one, and
//! every [`RECONCILE`], starts over with a full read (the backstop). While
//! etcd does not answer, the node says so and tries again, at a pace that
//! slows down to [`RETRY_MAX`]: a watch that keeps failing never turns
//! into a stream of full reads.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchOptions};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::keys::{CertRecord, Key, NodeRecord};
use super::{Cluster, ClusterError, Mirror, Quiet};

/// A full read this often, whatever the watch says.
pub const RECONCILE: Duration = Duration::from_secs(60);
/// After a failed read, or a watch that ended early, the next read;
/// doubled up to [`RETRY_MAX`], with some jitter.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// This node's `nodes/<node>` record is written at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// A watch that lived this long was fine: the pace is back to [`RETRY_MIN`].
const LIVED_LONG: Duration = Duration::from_secs(RECONCILE.as_secs() / 2);
/// A watch that cannot be opened, or breaks sooner than this after it
/// opened, is opened again once, after [`REOPEN`]; a second such failure
/// in a row ends the watch.
const QUICK_BREAK: Duration = Duration::from_secs(5);
/// How often a quiet watch is asked whether it is alive, and how long
/// its answer may take.
const PROBE: Duration = Duration::from_secs(2);
const PROBE_ANSWER: Duration = Duration::from_secs(2);
/// The pause before opening a watch again (up to twice as long).
const REOPEN: Duration = Duration::from_millis(250);

/// Who installs the certificates the store holds.
pub trait Certs: Send + Sync {
    /// A host's record, as read or as just written by a node.
    fn record(&self, record: CertRecord);
}

impl Cluster {
    /// Follows the store until `stop`, handing every certificate record to
    /// `certs`.
    pub async fn follow(self: Arc<Self>, certs: Arc<dyn Certs>, stop: CancellationToken) {
        // After a failed full read: back to the minimum once one succeeds.
        let mut read_retry = RETRY_MIN;
        // After a watch that ended early: back to the minimum only after
        // one that lived long, so a store that reads but does not watch
        // is read at a slowing pace, not in a loop.
        let mut watch_retry = RETRY_MIN;
        let mut reported: Option<Instant> = None;
        let watch_failed = Quiet::new(Duration::from_secs(60));
        loop {
            let report = reported.is_none_or(|at| at.elapsed() >= REPORT_EVERY);
            let synced = tokio::select! {
                r = self.sync(certs.as_ref(), report) => r,
                _ = stop.cancelled() => return,
            };
            let revision = match synced {
                Ok(rev) => {
                    if report {
                        reported = Some(Instant::now());
                    }
                    read_retry = RETRY_MIN;
                    rev
                }
                Err(e) => {
                    self.set_health(Err(&e));
                    if !pause(read_retry, &stop).await {
                        return;
                    }
                    read_retry = (read_retry * 2).min(RETRY_MAX);
                    continue;
                }
            };
            let opened = Instant::now();
            let ended = tokio::select! {
                r = self.watch(revision, certs.as_ref()) => r,
                _ = stop.cancelled() => return,
            };
            let Err(why) = ended else {
                // Time for the full read.
                watch_retry = RETRY_MIN;
                continue;
            };
            let lived = opened.elapsed();
            if lived >= LIVED_LONG {
                watch_retry = RETRY_MIN;
            }
            match watch_failed.due() {
                Some(more) => warn!(
                    reason = %why,
                    lived_s = lived.as_secs(),
                    also_failed_since = more,
                    next_read_in_s = watch_retry.as_secs(),
                    "cluster store watch failed: reading the whole store again"
                ),
                None => {
                    debug!(reason = %why, "cluster store watch failed: reading the whole store again")
                }
            }
            if !pause(watch_retry, &stop).await {
                return;
            }
            watch_retry = (watch_retry * 2).min(RETRY_MAX);
        }
    }

    /// Reads everything, rebuilds the mirror, hands over the records, and
    /// (`report`) says this node synced; the revision read at.
    async fn sync(&self, certs: &dyn Certs, report: bool) -> Result<i64, ClusterError> {
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
        if report {
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
        }
        self.set_health(Ok(()));
        Ok(revision)
    }

    /// Watches from `revision + 1` until it is time for a full read
    /// (`Ok`), or until the watch cannot go on (`Err`, why): cancelled or
    /// compacted by etcd, or not opened or broken soon after opening twice
    /// in a row. A break after a while is mended by opening it again from
    /// the last revision seen.
    async fn watch(&self, mut revision: i64, certs: &dyn Certs) -> Result<(), String> {
        let until = Instant::now() + RECONCILE;
        let mut quick_failures = 0;
        loop {
            let opened_at = Instant::now();
            let why = match tokio::time::timeout_at(until, self.open_watch(revision)).await {
                Err(_) => return Ok(()),
                Ok(Err(why)) => why,
                Ok(Ok(mut stream)) => {
                    // A stream can hang without breaking (a member that
                    // lost its peers, a connection no keepalive caught):
                    // etcd is asked for a progress answer every [`PROBE`],
                    // and a stream that does not give one is opened again.
                    let mut probe = tokio::time::interval_at(Instant::now() + PROBE, PROBE);
                    let mut asked: Option<Instant> = None;
                    loop {
                        let next = tokio::select! {
                            next = tokio::time::timeout_at(until, stream.message()) => next,
                            _ = probe.tick() => {
                                match asked {
                                    Some(at) if at.elapsed() >= PROBE_ANSWER => {
                                        break "no answer to a progress request: opening the watch again".to_string();
                                    }
                                    Some(_) => {}
                                    None => {
                                        if let Err(e) = stream.request_progress().await {
                                            break format!("progress request: {e}");
                                        }
                                        asked = Some(Instant::now());
                                    }
                                }
                                continue;
                            }
                        };
                        let resp = match next {
                            Err(_) => return Ok(()), // time for a full read
                            Ok(Ok(Some(r))) => r,
                            Ok(Ok(None)) => break "the stream ended".to_string(),
                            Ok(Err(e)) => break super::classify("watch", e).to_string(),
                        };
                        // Any answer shows the stream alive.
                        asked = None;
                        // The answer to a progress request (watch id -1): etcd
                        // 3.4 sends the store's current revision whether or not
                        // this watch has caught up with it, so it says nothing
                        // of what was seen.
                        if resp.watch_id() == -1 {
                            continue;
                        }
                        if resp.compact_revision() > 0 {
                            return Err(format!(
                                "compacted: etcd no longer has revision {} (oldest {})",
                                revision + 1,
                                resp.compact_revision()
                            ));
                        }
                        if resp.canceled() {
                            return Err(format!("cancelled by etcd: {}", resp.cancel_reason()));
                        }
                        tracing::trace!(
                            node = %self.node(),
                            watch_id = resp.watch_id(),
                            created = resp.created(),
                            events = resp.events().len(),
                            header = resp.header().map(|h| h.revision()),
                            revision,
                            "watch answer"
                        );
                        let mut seen = Vec::with_capacity(resp.events().len());
                        for event in resp.events() {
                            let Some(kv) = event.kv() else { continue };
                            seen.push(kv.mod_revision());
                            let put = event.event_type() == EventType::Put;
                            let record = self.apply(&mut self.mirror(), kv, put);
                            if let Some(r) = record {
                                certs.record(r);
                            }
                        }
                        revision = advance(
                            revision,
                            &seen,
                            resp.created(),
                            resp.events().is_empty(),
                            resp.header().map(|h| h.revision()),
                        );
                    }
                }
            };
            if opened_at.elapsed() >= QUICK_BREAK {
                quick_failures = 0;
            }
            quick_failures += 1;
            if quick_failures >= 2 {
                return Err(why);
            }
            debug!(reason = %why, "watch broken: opening it again from the last revision");
            let again = Instant::now() + REOPEN.mul_f64(1.0 + fastrand::f64());
            if again >= until {
                return Ok(());
            }
            tokio::time::sleep_until(again).await;
        }
    }

    /// A watch of the prefix from `revision + 1`, with progress
    /// notifications; why not.
    async fn open_watch(&self, revision: i64) -> Result<etcd_client::WatchStream, String> {
        let client = self.client().await.map_err(|e| e.to_string())?;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_progress_notify();
        let mut w = client
            .watch_client()
            .max_decoding_message_size(super::MAX_MESSAGE);
        let prefix = self.config.prefix.clone();
        match tokio::time::timeout(super::REQUEST_TIMEOUT, w.watch(prefix, Some(options))).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(super::classify("open the watch", e).to_string()),
            Err(_) => Err("open the watch: no answer".into()),
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

/// The revision a watch has seen everything up to, after one response
/// (not cancelled, not compacted): the events' own revisions (`events`);
/// the header's only for a progress notification (no events, and not the
/// `created` answer). The `created` answer and a catch-up batch carry the
/// store's current revision, which the events up to it have not reached
/// yet: taking it would skip them when the watch is opened again.
fn advance(
    revision: i64,
    events: &[i64],
    created: bool,
    no_events: bool,
    header: Option<i64>,
) -> i64 {
    let from_events = events.iter().copied().fold(revision, i64::max);
    match header {
        Some(h) if no_events && !created => from_events.max(h),
        _ => from_events,
    }
}

/// `d` give or take a quarter, within [`RETRY_MIN`]..=[`RETRY_MAX`]: nodes
/// cut off together do not all come back at the same instant.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() / 2.0)
        .clamp(RETRY_MIN, RETRY_MAX)
}

/// Waits about `d`; `false` when stopped meanwhile.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(jitter(d)) => true,
        _ = stop.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_advances_by_events_and_progress_only() {
        // The `created` answer: the current revision, not seen yet.
        assert_eq!(advance(10, &[], true, true, Some(50)), 10);
        // A catch-up batch: its events, not the header's revision.
        assert_eq!(advance(10, &[11, 12, 14], false, false, Some(50)), 14);
        // Deletions and puts alike; never backwards.
        assert_eq!(advance(20, &[15], false, false, Some(50)), 20);
        // A progress notification: everything up to the header is seen.
        assert_eq!(advance(14, &[], false, true, Some(50)), 50);
        assert_eq!(advance(14, &[], false, true, Some(3)), 14);
        assert_eq!(advance(14, &[], false, true, None), 14);
        // Events whose key/value was missing: no events seen, not progress.
        assert_eq!(advance(14, &[], false, false, Some(50)), 14);
    }

    #[test]
    fn pauses_stay_within_bounds() {
        for _ in 0..1000 {
            let j = jitter(RETRY_MIN);
            assert!((RETRY_MIN..=RETRY_MIN.mul_f64(1.25)).contains(&j), "{j:?}");
            let j = jitter(Duration::from_secs(4));
            assert!(
                (Duration::from_secs(3)..=Duration::from_secs(5)).contains(&j),
                "{j:?}"
            );
            let j = jitter(RETRY_MAX);
            assert!((RETRY_MAX.mul_f64(0.75)..=RETRY_MAX).contains(&j), "{j:?}");
        }
        let mut retry = RETRY_MIN;
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(retry.as_secs());
            retry = (retry * 2).min(RETRY_MAX);
        }
        assert_eq!(seen, [1, 2, 4, 8, 10, 10]);
    }
}
