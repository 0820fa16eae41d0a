//! What the ACME tasks report, turned into metrics and notifications.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::notify::{self, Notifier};
use crate::acme;
use crate::metrics::Metrics;

/// The [`acme::Observer`] the server hands the ACME runner.
#[derive(Debug)]
pub struct AcmeReports {
    pub metrics: Arc<Metrics>,
    /// Swapped when a reload changes `notify:`.
    pub notifier: Arc<ArcSwapOption<Notifier>>,
}

impl AcmeReports {
    fn notify(&self, event: notify::Event) {
        if let Some(n) = self.notifier.load_full() {
            n.send(event);
        }
    }
}

impl acme::Observer for AcmeReports {
    fn report(&self, event: acme::Event) {
        match event {
            acme::Event::Issued {
                names,
                serial,
                issuer,
                not_after,
                renewal,
            } => {
                let host = names.first().map(String::as_str).unwrap_or_default();
                self.metrics.renewal(host, true);
                self.notify(notify::Event::Issued {
                    host: names.first().cloned().unwrap_or_default(),
                    names,
                    serial,
                    issuer,
                    not_after,
                    renewal,
                });
            }
            acme::Event::Failed {
                names,
                error,
                next_try,
                not_after,
            } => {
                let host = names.first().map(String::as_str).unwrap_or_default();
                self.metrics.renewal(host, false);
                self.notify(notify::Event::RenewalFailed {
                    host: names.first().cloned().unwrap_or_default(),
                    names,
                    error,
                    next_try,
                    not_after,
                });
            }
            acme::Event::Adopted { .. } => self.metrics.adopted(),
            acme::Event::NextKey {
                names,
                records,
                check,
                wait_ttls,
            } => self.notify(notify::Event::PublishTlsa {
                host: names.first().cloned().unwrap_or_default(),
                names,
                records,
                check,
                wait_ttls,
            }),
            acme::Event::Stored => self.metrics.state_dir_writable(true),
            acme::Event::NotStored => self.metrics.store_write_failed(),
        }
    }
}
