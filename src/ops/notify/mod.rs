//! Notifications: the [`Notifier`] and the expiry watch here; what a message
//! says in `message`, the SMTP client that sends it in `smtp`, the webhook
//! client in `webhook`.
//!
//! Notifications to the operator (the "Axigen pattern": the mail server tells
//! its admin about its own certificates): a short plain-text email through the
//! operator's own Postfix and/or a JSON POST to a webhook, on each issuance,
//! renewal and renewal failure, and once a day while a certificate is within
//! [`EXPIRY_WARNING`] of its end.
//!
//! Delivery runs in a task of its own and only ever logs: a notification that
//! cannot be sent must never fail, or hold up, the ACME runner that asked for
//! it. Every phase has a deadline (connect, the whole SMTP exchange, the
//! webhook request).

mod message;
mod smtp;
mod webhook;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Views;
use crate::config::{Backend, Notify};
use message::message;
pub use message::Event;
use smtp::send_mail;
use webhook::Webhook;

/// How close to its end a certificate gets an `Expiring` notification.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);
/// At most one `Expiring` notification per host in this time.
pub const EXPIRY_REPEAT: Duration = Duration::from_secs(24 * 3600);

/// Sends [`Event`]s to the operator by email and/or webhook.
pub struct Notifier {
    from: String,
    to: Vec<String>,
    smtp: Option<Backend>,
    webhook: Option<Webhook>,
    /// When each host last got an `Expiring` notification.
    expiry_sent: Mutex<HashMap<String, SystemTime>>,
    /// For the commands the emails suggest.
    config_path: Option<PathBuf>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("smtp", &self.smtp)
            .field("webhook", &self.webhook.as_ref().map(|w| &w.shown))
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// `ca_roots`: extra PEM roots for the webhook's HTTPS (tests); native
    /// roots otherwise.
    pub fn new(config: &Notify, ca_roots: Option<&Path>) -> Result<Notifier, String> {
        let webhook = config
            .webhook
            .as_deref()
            .map(|url| Webhook::new(url, ca_roots))
            .transpose()?;
        Ok(Notifier {
            from: config.from.clone(),
            to: config.email.clone(),
            smtp: config.smtp.clone(),
            webhook,
            expiry_sent: Mutex::new(HashMap::new()),
            config_path: None,
        })
    }

    /// The config file, for the commands the emails suggest
    /// (`portcullis renew --config FILE NAME`); `FILE` without it.
    pub fn with_config_path(mut self, path: &Path) -> Notifier {
        self.config_path = Some(path.to_path_buf());
        self
    }

    /// Takes over `old`'s record of expiry warnings sent, so a reload that
    /// changes `notify:` does not warn about every host again the same day.
    pub fn with_history_of(self, old: &Notifier) -> Notifier {
        let sent = old
            .expiry_sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        *self.expiry_sent.lock().unwrap_or_else(|e| e.into_inner()) = sent;
        self
    }

    /// Delivers `event` in a task of its own and returns at once; the
    /// outcome is logged (`notification sent` / `notification failed`).
    pub fn send(self: &Arc<Self>, event: Event) {
        self.send_at(event, SystemTime::now());
    }

    /// [`Notifier::send`] with the clock reading the texts are written for.
    fn send_at(self: &Arc<Self>, event: Event, now: SystemTime) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(
                event = event.kind(),
                host = event.host(),
                error = "no async runtime",
                "notification failed"
            );
            return;
        };
        let this = Arc::clone(self);
        runtime.spawn(async move { this.deliver(&event, now).await });
    }

    /// Email and webhook side by side; each outcome logged on its own.
    async fn deliver(&self, event: &Event, now: SystemTime) {
        let mail = async {
            let Some(backend) = self.smtp.as_ref().filter(|_| !self.to.is_empty()) else {
                return;
            };
            let to = self.to.join(",");
            let id = format!(
                "{}.{:016x}.portcullis",
                now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                fastrand::u64(..)
            );
            let message = message(
                &self.from,
                &self.to,
                &event.subject(now),
                &event.body(now, self.config_path.as_deref()),
                SystemTime::now(),
                &id,
            );
            match send_mail(backend, &self.from, &self.to, &message).await {
                Ok(()) => info!(
                    event = event.kind(),
                    host = event.host(),
                    to = %to,
                    smtp = %backend.address,
                    "notification sent"
                ),
                Err(e) => warn!(
                    event = event.kind(),
                    host = event.host(),
                    to = %to,
                    smtp = %backend.address,
                    error = %e,
                    "notification failed"
                ),
            }
        };
        let hook = async {
            let Some(webhook) = &self.webhook else {
                return;
            };
            match webhook.post(&event.json(now)).await {
                Ok(()) => info!(
                    event = event.kind(),
                    host = event.host(),
                    webhook = %webhook.shown,
                    "notification sent"
                ),
                Err(e) => warn!(
                    event = event.kind(),
                    host = event.host(),
                    webhook = %webhook.shown,
                    error = %e,
                    "notification failed"
                ),
            }
        };
        tokio::join!(mail, hook);
    }

    /// With every served certificate as (host label, names, not_after,
    /// source): sends `Expiring` for each that ends within
    /// [`EXPIRY_WARNING`] (or has ended), unless that host had one in the
    /// last [`EXPIRY_REPEAT`]. Self-signed and placeholder certificates are
    /// nobody's to renew and are skipped. Returns how many were sent.
    pub fn check_expiry(
        self: &Arc<Self>,
        certs: &[(String, Vec<String>, SystemTime, String)],
        now: SystemTime,
    ) -> usize {
        let due = self.expiring(certs, now);
        let n = due.len();
        for event in due {
            self.send_at(event, now);
        }
        n
    }

    /// The `Expiring` events due at `now`, each recorded as sent.
    fn expiring(
        &self,
        certs: &[(String, Vec<String>, SystemTime, String)],
        now: SystemTime,
    ) -> Vec<Event> {
        let mut sent = self.expiry_sent.lock().unwrap_or_else(|e| e.into_inner());
        let mut due = Vec::new();
        for (host, names, not_after, source) in certs {
            if source == "self-signed" || source == "placeholder" {
                continue;
            }
            let close = not_after
                .duration_since(now)
                .map_or(true, |left| left <= EXPIRY_WARNING);
            if !close {
                // Renewed (or replaced): the next time it gets close, warn at once.
                sent.remove(host);
                continue;
            }
            // Either way round: a clock stepped back must not mean a flood.
            let recent = sent.get(host).is_some_and(|last| {
                let apart = now
                    .duration_since(*last)
                    .or_else(|e| Ok::<_, ()>(e.duration()))
                    .unwrap_or(Duration::ZERO);
                apart < EXPIRY_REPEAT
            });
            if recent {
                continue;
            }
            sent.insert(host.clone(), now);
            due.push(Event::Expiring {
                host: host.clone(),
                names: names.clone(),
                not_after: *not_after,
                source: source.clone(),
            });
        }
        due
    }
}

/// How often served certificates are checked for coming expiry (the
/// notifier itself sends at most one warning a day per host).
const EXPIRY_CHECK: Duration = Duration::from_secs(3600);

/// Warns about certificates close to expiry, hourly, from a minute after start.
pub async fn expiry_watch(
    notifier: Arc<ArcSwapOption<Notifier>>,
    views: Views,
    stop: CancellationToken,
) {
    let mut next = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {},
            _ = stop.cancelled() => return,
        }
        next += EXPIRY_CHECK;
        let Some(n) = notifier.load_full() else {
            continue;
        };
        let rows: Vec<_> = views.load().iter().map(super::control::row).collect();
        n.check_expiry(&expiry_rows(rows), SystemTime::now());
    }
}

/// What the expiry watch looks at: (host, names, not_after, source) of
/// each certificate served. A host's second certificate (another key
/// type) is its own entry, `<first name>~<key type>`: keyed by the host
/// alone, one certificate renewed in time would reset the other's warning
/// at every check.
fn expiry_rows(
    rows: Vec<super::control::CertRow>,
) -> Vec<(String, Vec<String>, SystemTime, String)> {
    let mut seen = std::collections::HashSet::new();
    rows.into_iter()
        .filter_map(|r| {
            let not_after = humantime::parse_rfc3339(&r.not_after).ok()?;
            let first = r.names.first()?.clone();
            let host = if seen.insert(first.clone()) {
                first
            } else {
                format!("{first}~{}", r.key_type)
            };
            Some((host, r.names, not_after, r.source))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::message::tests::{noon, DAY};
    use super::*;

    fn notifier() -> Notifier {
        let config = Notify {
            email: vec!["alice@example.test".into()],
            from: "portcullis@example.test".into(),
            smtp: None,
            webhook: None,
        };
        Notifier::new(&config, None).unwrap()
    }

    fn cert(
        host: &str,
        not_after: SystemTime,
        source: &str,
    ) -> (String, Vec<String>, SystemTime, String) {
        (host.into(), vec![host.into()], not_after, source.into())
    }

    #[test]
    fn expiry_warnings_come_once_a_day() {
        let n = notifier();
        let t0 = noon();
        let certs = [
            cert("soon.example", t0 + 10 * DAY, "acme"),
            cert("files.example", t0 + 13 * DAY, "files"),
            cert("later.example", t0 + 20 * DAY, "acme"),
            cert("selfsigned.example", t0 + DAY, "self-signed"),
            cert("placeholder.example", t0, "placeholder"),
            cert("gone.example", t0 - DAY, "acme"),
        ];
        let hosts = |events: Vec<Event>| -> Vec<String> {
            events.iter().map(|e| e.host().to_string()).collect()
        };
        assert_eq!(
            hosts(n.expiring(&certs, t0)),
            ["soon.example", "files.example", "gone.example"]
        );
        assert!(n.expiring(&certs, t0).is_empty(), "again at once: nothing");
        let almost = t0 + DAY - Duration::from_secs(1);
        assert!(n.expiring(&certs, almost).is_empty());
        // A clock stepped back an hour is not a new day either.
        assert!(n
            .expiring(&certs, t0 - Duration::from_secs(3600))
            .is_empty());
        assert_eq!(n.expiring(&certs, t0 + DAY).len(), 3);

        // Renewed: no longer close, so forgotten; close again: warned at once.
        let renewed = [cert("soon.example", t0 + 90 * DAY, "acme")];
        assert!(n.expiring(&renewed, t0 + DAY).is_empty());
        let close_again = [cert("soon.example", t0 + 2 * DAY, "acme")];
        assert_eq!(n.expiring(&close_again, t0 + DAY).len(), 1);
    }

    #[tokio::test]
    async fn check_expiry_counts_and_never_blocks_without_channels() {
        let n = Arc::new(notifier());
        let certs = [cert("soon.example", noon() + 10 * DAY, "acme")];
        assert_eq!(n.check_expiry(&certs, noon()), 1);
        assert_eq!(n.check_expiry(&certs, noon()), 0);
    }

    #[test]
    fn a_hosts_second_certificate_is_warned_about_on_its_own() {
        let n = notifier();
        let t0 = noon();
        let row = |key_type: &str, not_after: SystemTime| super::super::control::CertRow {
            names: vec!["mx.example.test".into()],
            source: "acme".into(),
            key_type: key_type.into(),
            issuer: String::new(),
            serial: String::new(),
            not_after: humantime::format_rfc3339_seconds(not_after).to_string(),
            ..Default::default()
        };
        let rows = || {
            expiry_rows(vec![
                row("ecdsa-p256", t0 + 60 * DAY),
                row("rsa-2048", t0 + 2 * DAY),
            ])
        };
        assert_eq!(rows()[1].0, "mx.example.test~rsa-2048");
        assert_eq!(n.expiring(&rows(), t0).len(), 1, "the RSA one");
        // The ECDSA one, far from expiry, does not reset the RSA one's.
        assert!(n
            .expiring(&rows(), t0 + Duration::from_secs(3600))
            .is_empty());
    }
}
