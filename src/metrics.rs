//! Prometheus metrics (prometheus-client), served by the admin endpoint.
//!
//! Passive: counters and gauges that any layer may bump, knowing nothing of
//! who bumps them or who reads them; this module imports nothing from the
//! crate. One [`Metrics`] per server. Hot-path counters (per connection, per
//! byte) are looked up once per listener context ([`ListenerMetrics`]) and
//! bumped with one atomic add; certificate gauges are filled at scrape time
//! from what the operator side reads of the certificates being served
//! ([`CertGauge`]), so they are never stale; so are the `process_*`
//! metrics ([`process`]). Latency histograms are resolved per listener and
//! per backend once, too: an observation takes a lock and allocates nothing.
//! The exposition is OpenMetrics or the Prometheus text format
//! ([`exposition`]).

mod exposition;
mod process;

pub use exposition::Format;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostOutcome {
    host: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// Seconds from accept (implicit TLS) or from the STARTTLS go-ahead to a
/// finished handshake: a local client takes milliseconds, a phone on a bad
/// network a second or more; past 10 s the handshake deadline is near.
const HANDSHAKE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Seconds to connect to a backend and send its PROXY header: well under a
/// millisecond on loopback or a LAN; past a second something is wrong.
const BACKEND_BUCKETS: [f64; 11] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5,
];

fn handshake_histogram() -> Histogram {
    Histogram::new(HANDSHAKE_BUCKETS)
}

fn backend_histogram() -> Histogram {
    Histogram::new(BACKEND_BUCKETS)
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

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
pub const HANDSHAKE_OUTCOMES: [&str; 10] = [
    "ok",
    "no_sni",
    "unknown_sni",
    "alpn_refused",
    "alert",
    "timeout",
    "client_left",
    "incompatible",
    "client_alert",
    "not_tls",
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
    handshake_seconds: Histograms<ListenerLabel>,
    backend_connect_seconds: Histograms<BackendLabel>,
    accepting: Family<AddressLabels, Gauge>,
    /// The same, readable: the family cannot be iterated.
    accept_state: Mutex<BTreeMap<String, bool>>,
    expiry: Family<CertLabels, Gauge>,
    next_renewal: Family<RenewalLabels, Gauge>,
    /// The names before 0.4.0, kept for a release so alerts written on
    /// them do not go silent: an absent series never fires.
    old_not_after: Family<CertLabels, Gauge>,
    old_next_renewal: Family<RenewalLabels, Gauge>,
    renewals: Family<HostOutcome, Counter>,
    last_renewal: Family<HostLabel, Gauge>,
    reloads: Family<Outcome, Counter>,
    last_reload_ok: Gauge,
    last_reload_success: Gauge,
    max_connections: Gauge,
    state_dir_writable: Gauge,
    store_write_failures: Counter,
    /// Registered only with a cluster store (`Metrics::with_cluster`).
    cluster: Option<ClusterMetrics>,
    scrape: Mutex<()>,
    /// `process_*`, which take no prefix.
    process: Registry,
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
            handshake_seconds: Family::new_with_constructor(handshake_histogram),
            backend_connect_seconds: Family::new_with_constructor(backend_histogram),
            accepting: Family::default(),
            accept_state: Mutex::default(),
            expiry: Family::default(),
            next_renewal: Family::default(),
            old_not_after: Family::default(),
            old_next_renewal: Family::default(),
            renewals: Family::default(),
            last_renewal: Family::default(),
            reloads: Family::default(),
            last_reload_ok: Gauge::default(),
            last_reload_success: Gauge::default(),
            max_connections: Gauge::default(),
            state_dir_writable: Gauge::default(),
            store_write_failures: Counter::default(),
            cluster: None,
            scrape: Mutex::default(),
            registry: Registry::with_prefix("portcullis"),
            process: Registry::default(),
        };
        m.register_connections();
        m.register_operations();
        m.register_process();
        for outcome in ["ok", "failed"] {
            drop(m.reloads.get_or_create(&Outcome { outcome }));
        }
        // The configuration a server starts with was loaded: a success,
        // as Prometheus counts its own.
        m.last_reload_ok.set(1);
        m.last_reload_success.set(unix_now());
        m
    }

    /// Build info and the `process_*` metrics.
    fn register_process(&mut self) {
        let info = Family::<VersionLabel, Gauge>::default();
        info.get_or_create(&VersionLabel {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
        self.registry.register(
            "build_info",
            "Always 1; the version label is the running portcullis's version",
            info,
        );
        self.registry.register(
            "max_connections",
            "max_connections: the most client connections open at once, all listeners together",
            self.max_connections.clone(),
        );
        self.process
            .register_collector(Box::new(process::ProcessCollector));
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
            "TLS handshakes by outcome (ok, no_sni, unknown_sni, alpn_refused: only protocols the listener does not speak offered, incompatible: no TLS version or cipher in common, client_alert: the client refused (mostly: does not trust the certificate), not_tls: bytes that are no TLS handshake, alert: other failures, timeout, client_left: closed or reset mid-handshake)",
            self.handshakes.clone(),
        );
        self.registry.register(
            "handshake_duration_seconds",
            "Time from accept (implicit TLS) or the STARTTLS go-ahead to a completed TLS handshake",
            self.handshake_seconds.clone(),
        );
        self.registry.register(
            "backend_connect_duration_seconds",
            "Time to connect to a backend and send its PROXY header, for connections that succeeded",
            self.backend_connect_seconds.clone(),
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
            "certificate_expiry_timestamp_seconds",
            "Expiry (notAfter) of the certificate served for each name, Unix time",
            self.expiry.clone(),
        );
        self.registry.register(
            "certificate_next_renewal_timestamp_seconds",
            "When portcullis next tries to renew the host's certificate, Unix time",
            self.next_renewal.clone(),
        );
        self.registry.register(
            "certificate_not_after_seconds",
            "Deprecated, removed in 0.5.0: portcullis_certificate_expiry_timestamp_seconds",
            self.old_not_after.clone(),
        );
        self.registry.register(
            "certificate_next_renewal_seconds",
            "Deprecated, removed in 0.5.0: portcullis_certificate_next_renewal_timestamp_seconds",
            self.old_next_renewal.clone(),
        );
        self.registry.register(
            "certificate_renewals",
            "ACME issuance attempts by host and outcome (ok, failed)",
            self.renewals.clone(),
        );
        self.registry.register(
            "certificate_last_renewal_success_timestamp_seconds",
            "When the host's certificate was last issued by the CA, Unix time (since this process started)",
            self.last_renewal.clone(),
        );
        self.registry.register(
            "config_reloads",
            "Configuration reloads by outcome (ok, failed)",
            self.reloads.clone(),
        );
        self.registry.register(
            "config_last_reload_successful",
            "1 if the last configuration reload (or the start) succeeded, 0 if it failed and the previous configuration is still served",
            self.last_reload_ok.clone(),
        );
        self.registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (start or reload), Unix time",
            self.last_reload_success.clone(),
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
        let mut backend_connect = Vec::with_capacity(backends.len());
        for b in backends {
            let label = BackendLabel {
                backend: b.to_string(),
            };
            drop(self.backend_failures.get_or_create(&label));
            let h = self.backend_connect_seconds.get_or_create(&label).clone();
            backend_connect.push((*b, h));
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
            handshake_seconds: self.handshake_seconds.get_or_create(&l()).clone(),
            backend_connect,
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

    /// An ACME issuance attempt for `host` (its first name) ended.
    pub fn renewal(&self, host: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        let host = host.to_string();
        if ok {
            self.last_renewal
                .get_or_create(&HostLabel { host: host.clone() })
                .set(unix_now());
        }
        self.renewals
            .get_or_create(&HostOutcome { host, outcome })
            .inc();
    }

    /// `max_connections`, set once at start (changing it needs a restart).
    pub fn max_connections(&self, n: usize) {
        self.max_connections
            .set(i64::try_from(n).unwrap_or(i64::MAX));
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
        self.last_reload_ok.set(i64::from(ok));
        if ok {
            self.last_reload_success.set(unix_now());
        }
    }

    /// The exposition text in `format`, with the certificate gauges set
    /// from `certs`.
    pub fn encode(&self, certs: &[CertGauge], format: Format) -> String {
        // Two scrapes at once must not clear each other's certificate gauges.
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.expiry.clear();
        self.next_renewal.clear();
        self.old_not_after.clear();
        self.old_next_renewal.clear();
        for cert in certs {
            let host = cert.names.first().cloned().unwrap_or_default();
            for name in &cert.names {
                let labels = CertLabels {
                    host: host.clone(),
                    name: name.clone(),
                    source: cert.source.clone(),
                    key_type: cert.key_type.clone(),
                };
                self.expiry.get_or_create(&labels).set(cert.not_after);
                self.old_not_after
                    .get_or_create(&labels)
                    .set(cert.not_after);
            }
            if let Some(next) = cert.next_renewal {
                // A host portcullis renews: its renewal counters exist from
                // the start, at 0, so the first failure shows as an increase.
                for outcome in ["ok", "failed"] {
                    let labels = HostOutcome {
                        host: host.clone(),
                        outcome,
                    };
                    drop(self.renewals.get_or_create(&labels));
                }
                let labels = RenewalLabels {
                    host,
                    key_type: cert.key_type.clone(),
                };
                self.next_renewal.get_or_create(&labels).set(next);
                self.old_next_renewal.get_or_create(&labels).set(next);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        use prometheus_client::encoding::text;
        let _ = text::encode_registry(&mut out, &self.registry);
        let _ = text::encode_registry(&mut out, &self.process);
        let _ = text::encode_eof(&mut out);
        match format {
            Format::OpenMetrics => out,
            Format::Prometheus => exposition::to_prometheus(&out),
        }
    }
}

/// Now, Unix time in seconds.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
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
    handshakes: [Counter; 10],
    pub starttls: Counter,
    handshake_seconds: Histogram,
    /// The listener's backends' connect histograms (a handful: a linear
    /// search beats hashing).
    backend_connect: Vec<(SocketAddr, Histogram)>,
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

    /// A handshake completed `took` after its phase began.
    pub fn handshake_took(&self, took: Duration) {
        self.handshake_seconds.observe(took.as_secs_f64());
    }

    /// A backend connection (and its PROXY header) succeeded in `took`.
    pub fn backend_connected(&self, backend: SocketAddr, took: Duration) {
        match self.backend_connect.iter().find(|(a, _)| *a == backend) {
            Some((_, h)) => h.observe(took.as_secs_f64()),
            // Not one of the listener's configured backends: looked up.
            None => self
                .all
                .backend_connect_seconds
                .get_or_create(&BackendLabel {
                    backend: backend.to_string(),
                })
                .observe(took.as_secs_f64()),
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
        l.handshake("client_alert");
        l.handshake_took(Duration::from_millis(30));
        l.backend_connected(
            "127.0.0.1:20144".parse().unwrap(),
            Duration::from_micros(300),
        );
        m.reload(false);
        m.renewal("mail.example.org", false);
        m.max_connections(4096);
        m.accepting("imaps", "127.0.0.1:993".parse().unwrap(), false);
        let rows = vec![CertGauge {
            names: vec!["mail.example.org".into(), "imap.example.org".into()],
            source: "acme".into(),
            key_type: "ecdsa-p256".into(),
            not_after: 1893456000,          // 2030-01-01T00:00:00Z
            next_renewal: Some(1890777600), // 2029-12-01T00:00:00Z
        }];
        let text = m.encode(&rows, Format::OpenMetrics);
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
            "portcullis_certificate_renewals_total{host=\"mail.example.org\",outcome=\"failed\"} 1",
            "portcullis_certificate_renewals_total{host=\"mail.example.org\",outcome=\"ok\"} 0",
            "portcullis_handshakes_total{listener=\"imaps\",outcome=\"client_alert\"} 1",
            "portcullis_handshake_duration_seconds_bucket{le=\"0.025\",listener=\"imaps\"} 0",
            "portcullis_handshake_duration_seconds_bucket{le=\"0.05\",listener=\"imaps\"} 1",
            "portcullis_handshake_duration_seconds_count{listener=\"imaps\"} 1",
            "portcullis_backend_connect_duration_seconds_bucket{le=\"0.00025\",backend=\"127.0.0.1:20144\"} 0",
            "portcullis_backend_connect_duration_seconds_bucket{le=\"0.0005\",backend=\"127.0.0.1:20144\"} 1",
            "portcullis_config_last_reload_successful 0",
            "portcullis_max_connections 4096",
            concat!("portcullis_build_info{version=\"", env!("CARGO_PKG_VERSION"), "\"} 1"),
            "portcullis_sessions_total{listener=\"imaps\",outcome=\"backend_unavailable\"} 0",
            "portcullis_backend_connect_failures_total{backend=\"127.0.0.1:20144\"} 0",
            "portcullis_certificate_expiry_timestamp_seconds{host=\"mail.example.org\",name=\"imap.example.org\",source=\"acme\",key_type=\"ecdsa-p256\"} 1893456000",
            "portcullis_certificate_next_renewal_timestamp_seconds{host=\"mail.example.org\",key_type=\"ecdsa-p256\"} 1890777600",
            "portcullis_certificate_not_after_seconds{host=\"mail.example.org\",name=\"imap.example.org\",source=\"acme\",key_type=\"ecdsa-p256\"} 1893456000",
            "portcullis_certificate_next_renewal_seconds{host=\"mail.example.org\",key_type=\"ecdsa-p256\"} 1890777600",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\nnot in\n{text}");
        }
        assert_eq!(m.failing_addresses(), vec!["imaps 127.0.0.1:993"]);
        // a certificate that is gone is gone from the next scrape
        let gone = m.encode(&[], Format::OpenMetrics);
        assert!(!gone.contains("certificate_expiry_timestamp_seconds{"));
        assert!(!gone.contains("certificate_not_after_seconds{"));
        // the process metrics, unprefixed, before the one `# EOF`
        assert!(gone.ends_with("\n# EOF\n"), "{gone}");
        assert_eq!(gone.matches("# EOF").count(), 1);
        assert!(gone.contains("\nprocess_open_fds "), "{gone}");
        // a good reload: 1 again, and its time
        m.reload(true);
        let text = m.encode(&[], Format::Prometheus);
        assert!(text
            .lines()
            .any(|l| l == "portcullis_config_last_reload_successful 1"));
        assert!(text.contains("# TYPE portcullis_connections_total counter\n"));
        assert!(!text.contains("# EOF"));
    }
}
