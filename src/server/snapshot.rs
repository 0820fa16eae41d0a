//! What one config builds before anything is swapped in: every host's
//! certificate (loaded, generated, kept from the running server, or a
//! placeholder until ACME issues one), the host table, and each listener's
//! settings.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tracing::{error, info, warn};

use super::BuildError;
use crate::acme::challenge::Challenges;
use crate::acme::{self, Lineage, Managed};
use crate::config::names::{self, HostPattern};
use crate::config::{self, CertSource, Config, KeyType, Listener};
use crate::discovery::Discovery;
use crate::metrics::Metrics;
use crate::ops::control;
use crate::ops::notify::Notifier;
use crate::proxy::context::ListenerCtx;
use crate::proxy::limiter::ClientLimiter;
use crate::proxy::runtime::Runtime;
use crate::tls::certs::{self, CertError, LoadedCert};
use crate::tls::hosts::{CertSlot, Host, HostTable, Served, Source};
use crate::tls::resolver::CertResolver;
use crate::tls::TlsContext;

/// A host's certificate and, for a host with two file pairs, its second;
/// `None` where nothing is loaded (ACME, self-signed under `check`, errors).
pub type HostCerts = Option<(LoadedCert, Option<LoadedCert>)>;

/// Loads the certificate of every host (and the second pair of a host with
/// two); self-signed ones are created (and stored) when `generate` is
/// true, skipped otherwise (`portcullis check`). Returns every failure,
/// not just the first.
pub fn load_certificates(
    config: &Config,
    provider: &rustls::crypto::CryptoProvider,
    generate: bool,
) -> (Vec<HostCerts>, Vec<BuildError>) {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for (index, host) in config.hosts.iter().enumerate() {
        let result = match &host.certificate {
            CertSource::Files {
                cert,
                key,
                second: None,
            } => certs::load_files(cert, key, &host.names, provider).map(|c| (c, None)),
            CertSource::Files {
                cert,
                key,
                second: Some((cert2, key2)),
            } => certs::load_two((cert, key), (cert2, key2), &host.names, provider)
                .map(|(a, b)| (a, Some(b))),
            CertSource::SelfSigned if generate => {
                certs::self_signed(&config.state_dir, &host.names, provider).map(|c| (c, None))
            }
            CertSource::SelfSigned | CertSource::Acme => {
                loaded.push(None);
                continue;
            }
        };
        match result {
            Ok(c) => loaded.push(Some(c)),
            Err(source) => {
                loaded.push(None);
                errors.push(BuildError::Certificate {
                    index,
                    name: host.names[0].to_string(),
                    source,
                });
            }
        }
    }
    (loaded, errors)
}

/// A host's certificate slot (two for a host with two key types or two
/// file pairs), kept across reloads for ACME hosts whose names and key
/// types do not change (their task and certificate go on as they were).
#[derive(Clone, Debug)]
pub(super) struct HostSlot {
    pub(super) names: Vec<HostPattern>,
    pub(super) slot: Arc<CertSlot>,
    /// `certificate: acme`: the lineage its task keeps.
    pub(super) lineage: Option<Lineage>,
    /// The host's second certificate.
    pub(super) second: bool,
}

impl HostSlot {
    pub(super) fn acme(&self) -> bool {
        self.lineage.is_some()
    }
}

/// Everything built from one config, before anything is swapped in.
pub(super) struct Snapshot {
    pub(super) table: HostTable,
    pub(super) slots: Vec<HostSlot>,
    /// ACME hosts that need a new task (new, or their names changed).
    pub(super) new_acme: Vec<Managed>,
}

/// Certificates and the host table for `config`. ACME hosts whose names are
/// in `previous` keep their slot (and their task); the rest start fresh.
pub(super) fn build(
    config: &Config,
    tls: &TlsContext,
    previous: &[HostSlot],
) -> Result<Snapshot, Vec<BuildError>> {
    let (loaded, errors) = load_certificates(config, &tls.provider, true);
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut hosts = Vec::new();
    let mut new_acme = Vec::new();
    let mut slots = Vec::new();
    for (index, (host, cert)) in config.hosts.iter().zip(loaded).enumerate() {
        let mut served = Vec::new();
        match (&host.certificate, cert) {
            (CertSource::Acme, _) => {
                let first = host.names[0].to_string();
                let key_types = config
                    .acme
                    .as_ref()
                    .map_or(&[KeyType::EcdsaP256][..], |a| a.key_types_for(&first));
                for lineage in Lineage::of(&host.names, key_types) {
                    let kept = previous.iter().find(|p| {
                        p.lineage.as_ref().is_some_and(|l| {
                            (l.key_type, l.second) == (lineage.key_type, lineage.second)
                                && same_names(&l.names, &lineage.names)
                        })
                    });
                    // Kept: with the names as the running task knows them.
                    let (slot, lineage) = match kept {
                        Some(p) => (p.slot.clone(), p.lineage.clone().unwrap_or(lineage)),
                        None => {
                            let (slot, managed) =
                                acme_slot(config, tls, previous, index, host, &lineage)?;
                            new_acme.push(managed);
                            (slot, lineage)
                        }
                    };
                    slots.push(HostSlot {
                        names: lineage.names.clone(),
                        slot: slot.clone(),
                        second: lineage.second,
                        lineage: Some(lineage),
                    });
                    served.push(slot);
                }
            }
            (source, Some((cert, second))) => {
                for (i, cert) in std::iter::once(cert).chain(second).enumerate() {
                    let slot = files_slot(host, source, cert);
                    slots.push(HostSlot {
                        names: host.names.clone(),
                        slot: slot.clone(),
                        lineage: None,
                        second: i > 0,
                    });
                    served.push(slot);
                }
            }
            (_, None) => continue,
        };
        let mut served = served.into_iter();
        let Some(cert) = served.next() else {
            continue;
        };
        hosts.push(Host {
            names: host.names.clone(),
            cert,
            alt: served.next(),
            backends: host.backends.clone(),
        });
    }
    let table = HostTable::new(hosts, &config.default_host, config.unknown_sni)
        .map_err(|e| vec![e.into()])?;
    Ok(Snapshot {
        table,
        slots,
        new_acme,
    })
}

/// The slot of an ACME host that has no running task yet: what it serves
/// until its certificate is issued ([`acme_start`]), and the task to start.
fn acme_slot(
    config: &Config,
    tls: &TlsContext,
    previous: &[HostSlot],
    index: usize,
    host: &config::Host,
    lineage: &Lineage,
) -> Result<(Arc<CertSlot>, Managed), Vec<BuildError>> {
    let directory = config.acme.as_ref().map(|a| a.directory.as_str());
    // A host switched from certificate files to acme
    // (the migration from certbot) keeps its files'
    // certificate until the first ACME one is issued.
    let before = previous
        .iter()
        .find(|p| !p.acme() && p.second == lineage.second && same_names(&p.names, &host.names))
        .map(|p| p.slot.load());
    let (served, order_now) = acme_start(
        &config.state_dir,
        lineage,
        directory,
        &tls.provider,
        before.as_deref(),
    )
    .map_err(|source| {
        vec![BuildError::Certificate {
            index,
            name: host.names[0].to_string(),
            source,
        }]
    })?;
    let slot = Arc::new(CertSlot::new(served));
    let managed = Managed {
        lineage: lineage.clone(),
        slot: slot.clone(),
        order_now,
    };
    Ok((slot, managed))
}

/// The slot of a host served from files or self-signed.
fn files_slot(host: &config::Host, source: &CertSource, cert: LoadedCert) -> Arc<CertSlot> {
    if !cert.info.uncovered.is_empty() {
        warn!(
            host = %host.names[0],
            uncovered = %cert.info.uncovered.join(", "),
            "certificate does not cover every name of its host"
        );
    }
    let source = match source {
        CertSource::Files { .. } => Source::Files,
        _ => Source::SelfSigned,
    };
    Arc::new(CertSlot::new(Served::new(cert.key, cert.info, source)))
}

/// What an ACME host serves at start-up, and why it needs an order now (if
/// it does): the stored certificate while it is valid, else the certificate
/// `files` the host served before it was switched to acme (while valid),
/// else the stored certificate if it has expired, else a self-signed
/// placeholder. A stored pair that does not load is reported and never
/// served.
fn acme_start(
    state_dir: &std::path::Path,
    lineage: &Lineage,
    directory: Option<&str>,
    provider: &rustls::crypto::CryptoProvider,
    files: Option<&Served>,
) -> Result<(Served, Option<String>), CertError> {
    let names = &lineage.names[..];
    let wanted = names::to_strings(names);
    let valid_files =
        files.filter(|f| f.source == Source::Files && f.info.not_after > certs::unix_now());
    let reason = match acme::store::load(state_dir, lineage, provider) {
        Ok(Some(stored)) => {
            let expired = stored.cert.info.not_after <= certs::unix_now();
            // An operator's change is ordered at once. An expired one is
            // only due: the floor after its issuance holds
            // (acme::schedule::floor), and with the clock ahead of the CA's
            // it is still valid for everyone else, so it is served (not a
            // placeholder) until it is replaced.
            let order_now = if stored.meta.names != wanted {
                Some("the host's names changed since the stored certificate was issued")
            } else if Some(stored.meta.directory.as_str()) != directory {
                Some("the stored certificate is from another ACME directory")
            } else if stored.cert.info.key_type != lineage.key_type.as_str() {
                Some("the stored certificate's key is of another type than acme.key_types says")
            } else {
                None
            };
            let (serial, not_after) = (&stored.cert.info.serial, stored.cert.info.not_after);
            let not_after = control::rfc3339(not_after);
            if !expired {
                info!(host = %wanted[0], serial = %serial, not_after = %not_after, "serving the stored ACME certificate");
            } else if valid_files.is_none() {
                warn!(host = %wanted[0], serial = %serial, not_after = %not_after, "the stored ACME certificate has expired by this machine's clock: serving it until its replacement is issued");
            }
            if !expired || valid_files.is_none() {
                let served = Served::new(stored.cert.key, stored.cert.info, Source::Acme);
                return Ok((served, order_now.map(String::from)));
            }
            "the stored certificate has expired".to_string()
        }
        Ok(None) => "no certificate issued yet".to_string(),
        Err(e) => {
            error!(host = %wanted[0], error = %e, "stored ACME certificate unusable: not served, ordering a new one");
            "the stored certificate is unusable".to_string()
        }
    };
    if let Some(f) = valid_files {
        info!(host = %wanted[0], reason = %reason, not_after = %control::rfc3339(f.info.not_after), "serving the previous certificate files until the ACME certificate is issued");
        return Ok((
            Served::new(f.key.clone(), f.info.clone(), f.source),
            Some(reason),
        ));
    }
    let placeholder = certs::self_signed(state_dir, names, provider)?;
    warn!(host = %wanted[0], reason = %reason, "serving a self-signed placeholder until the ACME certificate is issued");
    Ok((
        Served::new(placeholder.key, placeholder.info, Source::Placeholder),
        Some(reason),
    ))
}

/// The same set of names, in any order: the same certificate.
fn same_names(a: &[HostPattern], b: &[HostPattern]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    a == b
}

/// The per-listener settings every connection reads.
pub(super) fn listener_ctx(
    config: &Config,
    l: &Listener,
    tls: &TlsContext,
    table: &Arc<HostTable>,
    challenges: &Arc<Challenges>,
    metrics: &Arc<Metrics>,
    runtime: &Arc<Runtime>,
) -> Result<ListenerCtx, BuildError> {
    let mut backends: Vec<SocketAddr> = config
        .hosts
        .iter()
        .filter_map(|h| h.backends.get(&l.name).map(|b| b.address))
        .collect();
    backends.sort();
    backends.dedup();
    let resolver = Arc::new(CertResolver::new(table.clone()));
    let discovery = match l.is_web() {
        true => Arc::new(Discovery::new(config)),
        false => Arc::default(),
    };
    let web_tls = match discovery.is_empty() {
        true => None,
        false => {
            let http1 = Listener {
                alpn: vec![b"http/1.1".to_vec()],
                ..l.clone()
            };
            Some(tls.server_config(&http1, resolver.clone())?)
        }
    };
    Ok(ListenerCtx {
        listener: l.clone(),
        tls: tls.server_config(l, resolver)?,
        table: table.clone(),
        discovery,
        web_tls,
        timeouts: config.timeouts,
        hostname: l
            .hostname
            .as_ref()
            .unwrap_or(&config.default_host)
            .to_string(),
        challenges: challenges.clone(),
        metrics: Arc::new(metrics.listener(&l.name, &backends)),
        limiter: ClientLimiter::new(&l.name),
        runtime: runtime.clone(),
        gate: runtime.gate(&l.name),
    })
}

/// The notifier for `config.notify`, if any; its emails name `file` in the
/// commands they suggest, and it remembers the warnings `old` sent.
pub(super) fn notifier(
    config: &Config,
    file: Option<&Path>,
    old: Option<&Notifier>,
) -> Result<Option<Arc<Notifier>>, String> {
    let Some(n) = &config.notify else {
        return Ok(None);
    };
    let mut notifier = Notifier::new(n, None)?;
    if let Some(file) = file {
        notifier = notifier.with_config_path(file);
    }
    if let Some(old) = old {
        notifier = notifier.with_history_of(old);
    }
    Ok(Some(Arc::new(notifier)))
}
