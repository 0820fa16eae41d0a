//! Prometheus metrics (prometheus-client), served by the admin endpoint.
//!
//! Passive: counters and gauges that any layer may bump, knowing nothing of
//! who bumps them or who reads them; this module imports nothing from the
//! crate. One [`Metrics`] per server. Hot-path counters (per connection, per
//! byte) are looked up once per listener context ([`ListenerMetrics`]) and
//! bumped with one atomic add; certificate gauges are filled at scrape time
//! from what the operator side reads of the certificates being served
//! ([`CertGauge`]), so they are never stale.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AddressLabels {
    listener: String,
    address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    listener: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    listener: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    host: String,
    name: String,
    source: String,
    /// A host may serve two certificates (`ecdsa-p256` and `rsa-2048`).
    key_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RenewalLabels {
    host: String,
    key_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// Session outcomes that exist from the start at 0, so that an alert on
/// `increase(...)` sees the first one (a series that appears at 1 shows no
/// increase). The others appear when they first happen.
const SESSION_OUTCOMES_AT_ZERO: [&str; 5] = [
    "closed",
    "handshake_failed",
    "no_backend",
    "backend_unavailable",
    "backend_refused",
];

/// Handshake outcomes, as the `outcome` label spells them.
pub const HANDSHAKE_OUTCOMES: [&str; 7] = [
    "ok",
    "no_sni",
    "unknown_sni",
    "alpn_refused",
    "alert",
    "timeout",
    "client_left",
];

/// Why connections are refused at accept, as the `reason` label spells them
/// (the per-address limiter's reasons).
const REFUSALS: [&str; 2] = ["per_ip_connections", "per_ip_rate"];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    open: Family<ListenerLabel, Gauge>,
    connections: Family<ListenerLabel, Counter>,
    refused: Family<RefusedLabels, Counter>,
    handshakes: Family<OutcomeLabels, Counter>,
    starttls: Family<ListenerLabel, Counter>,
    sessions: Family<OutcomeLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    backend_failures: Family<BackendLabel, Counter>,
    accepting: Family<AddressLabels, Gauge>,
    /// The same, readable: the family cannot be iterated.
    accept_state: Mutex<BTreeMap<String, bool>>,
    not_after: Family<CertLabels, Gauge>,
    next_renewal: Family<RenewalLabels, Gauge>,
    renewals: Family<Outcome, Counter>,
    reloads: Family<Outcome, Counter>,
    state_dir_writable: Gauge,
    store_write_failures: Counter,
    /// Registered only with a cluster store (`Metrics::with_cluster`).
    cluster: Option<ClusterMetrics>,
    scrape: Mutex<()>,
}

/// The cluster store as this node sees it.
#[derive(Debug, Default)]
struct ClusterMetrics {
    up: Gauge,
    last_sync: Gauge,
    adopted: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::build())
    }

    /// With the cluster store's gauges too (`store: { etcd: … }`).
    pub fn with_cluster() -> Arc<Metrics> {
        let mut m = Metrics::build();
        let c = ClusterMetrics::default();
        m.registry.register(
            "cluster_store_up",
            "1 while the cluster store (etcd) answers and is followed, 0 while it does not (no orders then)",
            c.up.clone(),
        );
        m.registry.register(
            "cluster_last_sync_seconds",
            "When this node last read the whole cluster store (Unix time)",
            c.last_sync.clone(),
        );
        m.registry.register(
            "cluster_certificates_adopted",
            "Certificates another node ordered, taken from the cluster store and served here",
            c.adopted.clone(),
        );
        m.cluster = Some(c);
        Arc::new(m)
    }

    fn build() -> Metrics {
        let mut m = Metrics {
            open: Family::default(),
            connections: Family::default(),
            refused: Family::default(),
            handshakes: Family::default(),
            starttls: Family::default(),
            sessions: Family::default(),
            bytes: Family::default(),
            backend_failures: Family::default(),
            accepting: Family::default(),
            accept_state: Mutex::default(),
            not_after: Family::default(),
            next_renewal: Family::default(),
            renewals: Family::default(),
            reloads: Family::default(),
            state_dir_writable: Gauge::default(),
            store_write_failures: Counter::default(),
            cluster: None,
            scrape: Mutex::default(),
            registry: Registry::with_prefix("portcullis"),
        };
        m.register_connections();
        m.register_operations();
        for outcome in ["ok", "failed"] {
            drop(m.renewals.get_or_create(&Outcome { outcome }));
            drop(m.reloads.get_or_create(&Outcome { outcome }));
        }
        m
    }

    /// The counters of the connection path.
    fn register_connections(&mut self) {
        self.registry.register(
            "connections_open",
            "Client connections open now",
            self.open.clone(),
        );
        self.registry.register(
            "connections",
            "Client connections accepted (past the per-address limits)",
            self.connections.clone(),
        );
        self.registry.register(
            "connections_refused",
            "Client connections closed at accept by a per-address limit (per_ip_connections: too many open, per_ip_rate: too many new ones a second)",
            self.refused.clone(),
        );
        self.registry.register(
            "handshakes",
            "TLS handshakes by outcome (ok, no_sni, unknown_sni, alpn_refused: only protocols the listener does not speak offered, alert: failed, timeout, client_left: closed or reset mid-handshake)",
            self.handshakes.clone(),
        );
        self.registry.register(
            "starttls_upgrades",
            "STARTTLS commands that led to a TLS handshake",
            self.starttls.clone(),
        );
        self.registry.register(
            "sessions",
            "Connections ended, by outcome (as in the 'session closed' log line)",
            self.sessions.clone(),
        );
        self.registry.register(
            "relayed_bytes",
            "Bytes relayed: up is client to backend, down is backend to client",
            self.bytes.clone(),
        );
        self.registry.register(
            "backend_connect_failures",
            "Backend connections that failed (refused, timed out, no greeting)",
            self.backend_failures.clone(),
        );
        self.registry.register(
            "listener_accepting",
            "1 while the address accepts connections, 0 while accept fails",
            self.accepting.clone(),
        );
    }

    /// Certificates, renewals, reloads and the state directory.
    fn register_operations(&mut self) {
        self.registry.register(
            "certificate_not_after_seconds",
            "Expiry of the certificate served for each name (Unix time)",
            self.not_after.clone(),
        );
        self.registry.register(
            "certificate_next_renewal_seconds",
            "When portcullis next tries to renew the host's certificate (Unix time)",
            self.next_renewal.clone(),
        );
        self.registry.register(
            "certificate_renewals",
            "ACME issuance attempts by outcome (ok, failed)",
            self.renewals.clone(),
        );
        self.registry.register(
            "config_reloads",
            "Configuration reloads by outcome (ok, failed)",
            self.reloads.clone(),
        );
        self.registry.register(
            "state_dir_writable",
            "1 while state_dir can be written, 0 while it cannot (new certificates are then served but not kept)",
            self.state_dir_writable.clone(),
        );
        self.registry.register(
            "store_write_failures",
            "Issued certificates that could not be written to state_dir (served anyway)",
            self.store_write_failures.clone(),
        );
    }

    /// The counters of one listener, looked up once; `backends` (the
    /// listener's backends) start at 0 failures.
    pub fn listener(self: &Arc<Self>, name: &str, backends: &[SocketAddr]) -> ListenerMetrics {
        for outcome in SESSION_OUTCOMES_AT_ZERO {
            drop(self.sessions.get_or_create(&OutcomeLabels {
                listener: name.to_string(),
                outcome,
            }));
        }
        for b in backends {
            drop(self.backend_failures.get_or_create(&BackendLabel {
                backend: b.to_string(),
            }));
        }
        let l = || ListenerLabel {
            listener: name.to_string(),
        };
        let handshake = |outcome| {
            self.handshakes
                .get_or_create(&OutcomeLabels {
                    listener: name.to_string(),
                    outcome,
                })
                .clone()
        };
        let bytes = |direction| {
            self.bytes
                .get_or_create(&DirectionLabels {
                    listener: name.to_string(),
                    direction,
                })
                .clone()
        };
        let refused = |reason| {
            self.refused
                .get_or_create(&RefusedLabels {
                    listener: name.to_string(),
                    reason,
                })
                .clone()
        };
        ListenerMetrics {
            name: name.to_string(),
            open: self.open.get_or_create(&l()).clone(),
            connections: self.connections.get_or_create(&l()).clone(),
            refused: REFUSALS.map(refused),
            handshakes: HANDSHAKE_OUTCOMES.map(handshake),
            starttls: self.starttls.get_or_create(&l()).clone(),
            up: bytes("up"),
            down: bytes("down"),
            all: self.clone(),
        }
    }

    pub fn accepting(&self, listener: &str, address: SocketAddr, yes: bool) {
        let labels = AddressLabels {
            listener: listener.to_string(),
            address: address.to_string(),
        };
        self.accepting.get_or_create(&labels).set(i64::from(yes));
        let mut state = self
            .accept_state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.insert(format!("{listener} {address}"), yes);
    }

    /// The address is gone from the configuration.
    pub fn forget_address(&self, listener: &str, address: SocketAddr) {
        self.accepting.remove(&AddressLabels {
            listener: listener.to_string(),
            address: address.to_string(),
        });
        let mut state = self
            .accept_state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.remove(&format!("{listener} {address}"));
    }

    /// Addresses whose accept is failing now, as `listener address`.
    pub fn failing_addresses(&self) -> Vec<String> {
        let state = self
            .accept_state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn renewal(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.renewals.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn state_dir_writable(&self, yes: bool) {
        self.state_dir_writable.set(i64::from(yes));
    }

    /// An issued certificate could not be stored: `state_dir` is not writable.
    pub fn store_write_failed(&self) {
        self.store_write_failures.inc();
        self.state_dir_writable(false);
    }

    /// A certificate another node ordered is served here now.
    pub fn adopted(&self) {
        if let Some(c) = &self.cluster {
            c.adopted.inc();
        }
    }

    /// Whether the cluster store answers, and when this node last synced
    /// (Unix time): set at scrape time.
    pub fn cluster_state(&self, up: bool, last_sync: Option<i64>) {
        if let Some(c) = &self.cluster {
            c.up.set(i64::from(up));
            c.last_sync.set(last_sync.unwrap_or(0));
        }
    }

    pub fn reload(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&Outcome { outcome }).inc();
    }

    /// The exposition text, with the certificate gauges set from `certs`.
    pub fn encode(&self, certs: &[CertGauge]) -> String {
        // Two scrapes at once must not clear each other's certificate gauges.
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.not_after.clear();
        self.next_renewal.clear();
        for cert in certs {
            let host = cert.names.first().cloned().unwrap_or_default();
            for name in &cert.names {
                let labels = CertLabels {
                    host: host.clone(),
                    name: name.clone(),
                    source: cert.source.clone(),
                    key_type: cert.key_type.clone(),
                };
                self.not_after.get_or_create(&labels).set(cert.not_after);
            }
            if let Some(next) = cert.next_renewal {
                let key_type = cert.key_type.clone();
                self.next_renewal
                    .get_or_create(&RenewalLabels { host, key_type })
                    .set(next);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the certificate gauges show of one host's served certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertGauge {
    /// The host's names; the first one labels the host.
    pub names: Vec<String>,
    /// files, self-signed, acme, placeholder.
    pub source: String,
    /// `ecdsa-p256`, `rsa-2048`, …
    pub key_type: String,
    /// Unix time.
    pub not_after: i64,
    /// Unix time; `None` for certificates portcullis does not renew.
    pub next_renewal: Option<i64>,
}

/// One listener's counters, bumped on the connection path.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    name: String,
    pub open: Gauge,
    pub connections: Counter,
    /// Indexed like [`REFUSALS`].
    refused: [Counter; 2],
    /// Indexed like [`HANDSHAKE_OUTCOMES`].
    handshakes: [Counter; 7],
    pub starttls: Counter,
    pub up: Counter,
    pub down: Counter,
    all: Arc<Metrics>,
}

impl ListenerMetrics {
    pub fn all(&self) -> &Arc<Metrics> {
        &self.all
    }

    /// A connection turned away at accept; `reason` is the limiter's label.
    pub fn refused(&self, reason: &str) {
        if let Some(i) = REFUSALS.iter().position(|r| *r == reason) {
            self.refused[i].inc();
        }
    }

    pub fn handshake(&self, outcome: &str) {
        if let Some(i) = HANDSHAKE_OUTCOMES.iter().position(|o| *o == outcome) {
            self.handshakes[i].inc();
        }
    }

    pub fn session(&self, outcome: &'static str) {
        self.all
            .sessions
            .get_or_create(&OutcomeLabels {
                listener: self.name.clone(),
                outcome,
            })
            .inc();
    }

    pub fn backend_failed(&self, backend: SocketAddr) {
        self.all
            .backend_failures
            .get_or_create(&BackendLabel {
                backend: backend.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_certificates_are_exposed() {
        let m = Metrics::new();
        let l = m.listener("imaps", &["127.0.0.1:20144".parse().unwrap()]);
        l.connections.inc();
        l.open.inc();
        l.handshake("ok");
        l.handshake("unknown_sni");
        l.refused("per_ip_rate");
        l.session("closed");
        l.up.inc_by(10);
        l.backend_failed("127.0.0.1:20143".parse().unwrap());
        m.reload(false);
        m.accepting("imaps", "127.0.0.1:993".parse().unwrap(), false);
        let rows = vec![CertGauge {
            names: vec!["mail.example.org".into(), "imap.example.org".into()],
            source: "acme".into(),
            key_type: "ecdsa-p256".into(),
            not_after: 1893456000,          // 2030-01-01T00:00:00Z
            next_renewal: Some(1890777600), // 2029-12-01T00:00:00Z
        }];
        let text = m.encode(&rows);
        for line in [
            "portcullis_connections_total{listener=\"imaps\"} 1",
            "portcullis_connections_open{listener=\"imaps\"} 1",
            "portcullis_handshakes_total{listener=\"imaps\",outcome=\"ok\"} 1",
            "portcullis_handshakes_total{listener=\"imaps\",outcome=\"unknown_sni\"} 1",
            "portcullis_handshakes_total{listener=\"imaps\",outcome=\"alert\"} 0",
            "portcullis_handshakes_total{listener=\"imaps\",outcome=\"alpn_refused\"} 0",
            "portcullis_connections_refused_total{listener=\"imaps\",reason=\"per_ip_connections\"} 0",
            "portcullis_connections_refused_total{listener=\"imaps\",reason=\"per_ip_rate\"} 1",
            "portcullis_sessions_total{listener=\"imaps\",outcome=\"closed\"} 1",
            "portcullis_relayed_bytes_total{listener=\"imaps\",direction=\"up\"} 10",
            "portcullis_backend_connect_failures_total{backend=\"127.0.0.1:20143\"} 1",
            "portcullis_config_reloads_total{outcome=\"failed\"} 1",
            "portcullis_config_reloads_total{outcome=\"ok\"} 0",
            "portcullis_certificate_renewals_total{outcome=\"failed\"} 0",
            "portcullis_sessions_total{listener=\"imaps\",outcome=\"backend_unavailable\"} 0",
            "portcullis_backend_connect_failures_total{backend=\"127.0.0.1:20144\"} 0",
            "portcullis_certificate_not_after_seconds{host=\"mail.example.org\",name=\"imap.example.org\",source=\"acme\",key_type=\"ecdsa-p256\"} 1893456000",
            "portcullis_certificate_next_renewal_seconds{host=\"mail.example.org\",key_type=\"ecdsa-p256\"} 1890777600",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\nnot in\n{text}");
        }
        assert_eq!(m.failing_addresses(), vec!["imaps 127.0.0.1:993"]);
        // a certificate that is gone is gone from the next scrape
        assert!(!m.encode(&[]).contains("certificate_not_after_seconds{"));
    }
}
