//! From a validated [`Config`] to running listeners: load every certificate,
//! build the host table, bind every address, then accept until shutdown.
//!
//! Shutdown is two-staged: stop accepting (connections still in their
//! handshake are dropped), then give relays `timeouts.shutdown_grace` to finish
//! before ending them.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::acme::challenge::Challenges;
use crate::acme::{self, Managed};
use crate::config::{CertSource, Config, Listener};
use crate::control::{self, Control, ControlError, View};
use crate::hosts::{CertSlot, Host, HostTable, NoDefaultHost, Served, Source};
use crate::listener::{accept_loop, ListenerCtx, Stop};
use crate::names::HostPattern;
use crate::tls::certs::{self, CertError, LoadedCert};
use crate::tls::resolver::CertResolver;
use crate::tls::{store, TlsContext};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("hosts[{index}] ({name}): {source}")]
    Certificate {
        index: usize,
        name: String,
        source: CertError,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    DefaultHost(#[from] NoDefaultHost),
    #[error("state_dir {}: {source}", path.display())]
    StateDir {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("control socket: {0}")]
    Control(#[from] ControlError),
    #[error("listeners.{listener}: cannot listen on {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// Loads the certificate of every host; self-signed ones are created (and
/// stored) when `generate` is true, skipped otherwise (`portcullis check`).
/// Returns every failure, not just the first.
pub fn load_certificates(
    config: &Config,
    provider: &rustls::crypto::CryptoProvider,
    generate: bool,
) -> (Vec<Option<LoadedCert>>, Vec<BuildError>) {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for (index, host) in config.hosts.iter().enumerate() {
        let result = match &host.certificate {
            CertSource::Files { cert, key } => certs::load_files(cert, key, &host.names, provider),
            CertSource::SelfSigned if generate => {
                certs::self_signed(&config.state_dir, &host.names, provider)
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

/// How long sessions get to close once the grace period is over.
const FINAL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A server with its sockets bound, ready to [`run`](Server::run).
pub struct Server {
    listeners: Vec<(Arc<ListenerCtx>, Vec<TcpListener>)>,
    max_connections: usize,
    shutdown_grace: std::time::Duration,
    acme: Option<acme::Manager>,
    control: Control,
    /// Every host's names and certificate slot, for the control socket.
    views: Vec<(Vec<String>, Arc<CertSlot>)>,
}

impl Server {
    /// Loads certificates and binds every listener address and the control
    /// socket. Must be called inside a tokio runtime.
    pub fn bind(config: &Config) -> Result<Server, Vec<BuildError>> {
        let tls = TlsContext::new().map_err(|e| vec![e.into()])?;
        store::create_private_dir(&config.state_dir).map_err(|source| {
            vec![BuildError::StateDir {
                path: config.state_dir.clone(),
                source,
            }]
        })?;
        let control = Control::bind(&config.state_dir).map_err(|e| vec![e.into()])?;
        let (loaded, errors) = load_certificates(config, &tls.provider, true);
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut hosts = Vec::new();
        let mut managed = Vec::new();
        let mut views = Vec::new();
        for (index, (host, cert)) in config.hosts.iter().zip(loaded).enumerate() {
            let served = match (&host.certificate, cert) {
                (CertSource::Acme, _) => {
                    let acme = config.acme.as_ref().map(|a| a.directory.as_str());
                    let (served, order_now) =
                        acme_start(&config.state_dir, &host.names, acme, &tls.provider).map_err(
                            |source| {
                                vec![BuildError::Certificate {
                                    index,
                                    name: host.names[0].to_string(),
                                    source,
                                }]
                            },
                        )?;
                    let slot = Arc::new(CertSlot::new(served));
                    managed.push(Managed {
                        names: host.names.clone(),
                        slot: slot.clone(),
                        order_now,
                    });
                    slot
                }
                (source, Some(cert)) => {
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
                    Arc::new(CertSlot::new(Served {
                        key: cert.key,
                        info: cert.info,
                        source,
                    }))
                }
                (_, None) => continue,
            };
            views.push((
                host.names.iter().map(|n| n.to_string()).collect(),
                served.clone(),
            ));
            hosts.push(Host {
                names: host.names.clone(),
                cert: served,
                backends: host.backends.clone(),
            });
        }
        let challenges = Arc::new(Challenges::default());
        let acme = match (&config.acme, managed.is_empty()) {
            (Some(a), false) => Some(acme::Manager::new(
                a.clone(),
                config.state_dir.clone(),
                tls.provider.clone(),
                challenges.clone(),
                managed,
            )),
            _ => None,
        };
        let table = HostTable::new(hosts, &config.default_host, config.unknown_sni)
            .map_err(|e| vec![e.into()])?;
        let table = Arc::new(ArcSwap::from_pointee(table));
        let resolver = Arc::new(CertResolver::new(table.clone()));

        let v4_any = v4_any_ports(config.listeners.values());
        let mut listeners = Vec::new();
        let mut errors = Vec::new();
        for l in config.listeners.values() {
            let server_config = tls
                .server_config(l, resolver.clone())
                .map_err(|e| vec![e.into()])?;
            let mut sockets = Vec::new();
            for addr in &l.bind {
                match bind_socket(*addr, &v4_any) {
                    Ok(s) => sockets.push(s),
                    Err(source) => errors.push(BuildError::Bind {
                        listener: l.name.clone(),
                        addr: *addr,
                        source,
                    }),
                }
            }
            let ctx = ListenerCtx {
                listener: l.clone(),
                tls: server_config,
                table: table.clone(),
                timeouts: config.timeouts,
                hostname: l
                    .hostname
                    .as_ref()
                    .unwrap_or(&config.default_host)
                    .to_string(),
                challenges: challenges.clone(),
            };
            listeners.push((Arc::new(ctx), sockets));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Server {
            listeners,
            max_connections: config.max_connections,
            shutdown_grace: config.timeouts.shutdown_grace,
            acme,
            control,
            views,
        })
    }

    /// Where each listener is bound (port 0 resolved to the real port).
    pub fn local_addrs(&self) -> BTreeMap<String, Vec<SocketAddr>> {
        self.listeners
            .iter()
            .map(|(ctx, sockets)| {
                let addrs = sockets.iter().filter_map(|s| s.local_addr().ok()).collect();
                (ctx.listener.name.clone(), addrs)
            })
            .collect()
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop = Stop::default();
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let accepts = TaskTracker::new();
        for (ctx, sockets) in self.listeners {
            for socket in sockets {
                if let Ok(addr) = socket.local_addr() {
                    info!(listener = %ctx.listener.name, addr = %addr, "listening");
                }
                accepts.spawn(accept_loop(
                    socket,
                    ctx.clone(),
                    limit.clone(),
                    tracker.clone(),
                    stop.clone(),
                ));
            }
        }
        accepts.close();

        let background = TaskTracker::new();
        let background_stop = CancellationToken::new();
        let handles = match self.acme {
            Some(m) => m.start(background_stop.clone(), &background),
            None => Vec::new(),
        };
        let views = self
            .views
            .into_iter()
            .map(|(names, slot)| View {
                acme: handles.iter().find(|h| h.names == names).cloned(),
                names,
                slot,
            })
            .collect();
        background.spawn(self.control.serve(Arc::new(views), background_stop.clone()));
        background.close();

        shutdown.await;
        background_stop.cancel();

        info!(open_sessions = tracker.len(), grace = ?self.shutdown_grace, "shutting down: no new connections");
        stop.accepting.cancel();
        accepts.wait().await;
        tracker.close();
        if tokio::time::timeout(self.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = tracker.len(),
                "grace period over: closing remaining sessions"
            );
            stop.relays.cancel();
            // Every phase watches one of the two tokens or has its own short
            // deadline; this bound only keeps a bug from hanging the exit.
            if tokio::time::timeout(FINAL_WAIT, tracker.wait())
                .await
                .is_err()
            {
                warn!(sessions = tracker.len(), "sessions still open at exit");
            }
        }
        background.wait().await;
        info!("stopped");
    }
}

/// What an ACME host serves at start-up, and why it needs an order now (if
/// it does): the stored certificate while it is valid, else a self-signed
/// placeholder. A stored pair that does not load is reported and never served.
fn acme_start(
    state_dir: &std::path::Path,
    names: &[HostPattern],
    directory: Option<&str>,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(Served, Option<String>), CertError> {
    let wanted: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let reason = match acme::store::load(state_dir, names, provider) {
        Ok(Some(stored)) if stored.cert.info.not_after > certs::unix_now() => {
            let reason = if stored.meta.names != wanted {
                Some("the host's names changed since the stored certificate was issued")
            } else if Some(stored.meta.directory.as_str()) != directory {
                Some("the stored certificate is from another ACME directory")
            } else {
                None
            };
            info!(
                host = %wanted[0],
                serial = %stored.cert.info.serial,
                not_after = %control::rfc3339(stored.cert.info.not_after),
                "serving the stored ACME certificate"
            );
            let served = Served {
                key: stored.cert.key,
                info: stored.cert.info,
                source: Source::Acme,
            };
            return Ok((served, reason.map(String::from)));
        }
        Ok(Some(_)) => "the stored certificate has expired".to_string(),
        Ok(None) => "no certificate issued yet".to_string(),
        Err(e) => {
            error!(host = %wanted[0], error = %e, "stored ACME certificate unusable: not served, ordering a new one");
            "the stored certificate is unusable".to_string()
        }
    };
    let placeholder = certs::self_signed(state_dir, names, provider)?;
    warn!(host = %wanted[0], reason = %reason, "serving a self-signed placeholder until the ACME certificate is issued");
    Ok((
        Served {
            key: placeholder.key,
            info: placeholder.info,
            source: Source::Placeholder,
        },
        Some(reason),
    ))
}

/// Ports on which some listener binds `0.0.0.0`: an `[::]` socket on the same
/// port must then be IPv6-only, or the two binds collide. Elsewhere `[::]` is
/// dual-stack and takes IPv4 clients too.
fn v4_any_ports<'a>(listeners: impl Iterator<Item = &'a Listener>) -> BTreeSet<u16> {
    let mut v4_any = BTreeSet::new();
    for l in listeners {
        for a in &l.bind {
            if a.ip() == Ipv4Addr::UNSPECIFIED {
                v4_any.insert(a.port());
            }
        }
    }
    v4_any
}

fn bind_socket(addr: SocketAddr, v4_any_ports: &BTreeSet<u16>) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if let SocketAddr::V6(v6) = addr {
        let dual = v6.ip().is_unspecified() && !v4_any_ports.contains(&addr.port());
        socket.set_only_v6(!dual)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
