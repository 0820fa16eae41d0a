//! The top: from a validated [`Config`] to a running server. `Server` binds
//! (`bind`: sockets; `snapshot`: certificates, host table, listener
//! settings) and runs (`running`: the live state; `reload`: rebuild, swap).
//!
//! Load every certificate, build the host table, bind every address, then
//! accept until shutdown. Shutdown is two-staged: stop accepting
//! (connections still in their handshake are dropped), then give relays
//! `timeouts.shutdown_grace` to finish before ending them.

mod bind;
mod reload;
mod running;
mod snapshot;
mod upgrade;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::acme::challenge::Challenges;
use crate::acme::Managed;
use crate::cluster::{Cluster, ClusterError};
use crate::config::{diff, Config};
use crate::metrics::Metrics;
use crate::ops::control::{Control, ControlError};
use crate::ops::handover::{Inherited, Successor};
use crate::ops::notify::Notifier;
use crate::ops::reload::{self as reload_request, Ask, Reloader, Watcher};
use crate::proxy::runtime::Runtime;
use crate::tls::certs::CertError;
use crate::tls::hosts::{HostTable, NoDefaultHost};
use crate::tls::{store, TlsContext};
use bind::{bind_admin, bind_listeners, Sockets};
use running::Running;
pub use snapshot::load_certificates;
use snapshot::{build, notifier, HostSlot};
use upgrade::own_binary;

/// Why a server could not be built, or a reload was refused.
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
    #[error("notify: {0}")]
    Notify(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("listeners.{listener}: cannot listen on {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("admin.bind: cannot listen on {addr}: {source}")]
    AdminBind { addr: SocketAddr, source: io::Error },
}

/// How often an unwritable `state_dir` is tried again (and a writable one
/// checked, for `portcullis_state_dir_writable`).
const STATE_PROBE: Duration = Duration::from_secs(60);

/// A server with its sockets bound, ready to [`run`](Server::run).
pub struct Server {
    config: Config,
    config_file: Option<PathBuf>,
    tls: TlsContext,
    table: Arc<ArcSwap<HostTable>>,
    challenges: Arc<Challenges>,
    slots: Vec<HostSlot>,
    pending_acme: Vec<Managed>,
    /// Bound at start, handed to their accept loops by `run`.
    sockets: Sockets,
    /// `None` when `state_dir` cannot be written.
    control: Option<Control>,
    /// Whether `state_dir` could be written at start.
    writable: bool,
    reloads: (
        mpsc::Sender<reload_request::Ask>,
        mpsc::Receiver<reload_request::Ask>,
    ),
    /// Watching since before the files were read (`bind_file`).
    watcher: Option<Watcher>,
    metrics: Arc<Metrics>,
    /// The admin endpoint's socket (`admin.bind`).
    admin: Option<TcpListener>,
    notifier: Arc<ArcSwapOption<Notifier>>,
    /// The store several instances share (`store.etcd`), when there is one.
    cluster: Option<Arc<Cluster>>,
    /// Live sessions and drain switches (`portcullis status`, `drain`).
    runtime: Arc<Runtime>,
    /// Listeners and backends drained in the process this one replaces.
    drained: Vec<String>,
}

impl Server {
    /// Loads certificates and binds every listener address and the control
    /// socket. Must be called inside a tokio runtime.
    pub fn bind(config: &Config) -> Result<Server, Vec<BuildError>> {
        Server::bind_from(config, None, &mut Inherited::default())
    }

    /// [`Server::bind`], for the config read from `file` when there is one
    /// (notification emails name it in the commands they suggest), taking
    /// the sockets a replaced process handed over where they fit.
    fn bind_from(
        config: &Config,
        file: Option<&Path>,
        inherited: &mut Inherited,
    ) -> Result<Server, Vec<BuildError>> {
        let tls = TlsContext::new().map_err(|e| vec![e.into()])?;
        let writable = store::open_state_dir(&config.state_dir).map_err(|source| {
            vec![BuildError::StateDir {
                path: config.state_dir.clone(),
                source,
            }]
        })?;
        let handed = match inherited
            .take("control")
            .map(std::os::unix::net::UnixListener::from)
        {
            Some(socket) => {
                Control::inherited(socket, &config.state_dir).map_err(|e| vec![e.into()])?
            }
            None => None,
        };
        let bound = match handed {
            Some(control) => Ok(control),
            None => Control::bind(&config.state_dir),
        };
        let control = match (bound, &writable) {
            (Ok(c), _) => Some(c),
            (Err(e @ ControlError::Running(_)), _) | (Err(e), Ok(())) => {
                return Err(vec![e.into()])
            }
            (Err(e), Err(_)) => {
                warn!(error = %e, "no control socket: portcullis certs, renew and reload cannot reach this instance (SIGHUP still reloads)");
                None
            }
        };
        let cluster = match &config.store {
            Some(etcd) => Some(Arc::new(Cluster::new(etcd).map_err(|e| vec![e.into()])?)),
            None => None,
        };
        let metrics = match cluster {
            Some(_) => Metrics::with_cluster(),
            None => Metrics::new(),
        };
        metrics.state_dir_writable(writable.is_ok());
        metrics.max_connections(config.max_connections);
        if let Err(e) = &writable {
            warn!(
                state_dir = %config.state_dir.display(),
                error = %e,
                "state_dir is not writable: serving what is stored; certificates issued now are served but not kept across a restart, self-signed ones are made anew at each start"
            );
        }
        let snapshot = build(config, &tls, &[])?;
        let table = Arc::new(ArcSwap::from_pointee(snapshot.table));
        let challenges = Arc::new(match &cluster {
            Some(c) => Challenges::clustered(c.clone(), tls.provider.clone()),
            None => Challenges::default(),
        });
        let notifier = Arc::new(ArcSwapOption::from(
            notifier(config, file, None).map_err(|e| vec![BuildError::Notify(e)])?,
        ));

        let runtime = Runtime::new();
        let (sockets, mut errors) = bind_listeners(
            config,
            &tls,
            &table.load_full(),
            &challenges,
            &metrics,
            &runtime,
            inherited,
        )?;
        let admin = bind_admin(config, &mut errors, inherited);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Server {
            config: config.clone(),
            config_file: file.map(Path::to_path_buf),
            tls,
            table,
            challenges,
            slots: snapshot.slots,
            pending_acme: snapshot.new_acme,
            sockets,
            control,
            writable: writable.is_ok(),
            reloads: mpsc::channel(4),
            watcher: None,
            metrics,
            admin,
            notifier,
            cluster,
            runtime,
            drained: std::mem::take(&mut inherited.drained),
        })
    }

    /// Loads the config from `path` and binds it; reloads read the same file
    /// and it is watched for changes. The watch starts before the files are
    /// read, so a change made while starting is not missed.
    pub fn bind_file(path: &Path) -> Result<Server, Vec<String>> {
        Server::bind_file_with(path, Inherited::default())
    }

    /// [`Server::bind_file`] in a process that replaces another
    /// (`portcullis upgrade`): the sockets it handed over serve the
    /// addresses they served there; those the config no longer names close.
    pub fn bind_file_with(path: &Path, mut inherited: Inherited) -> Result<Server, Vec<String>> {
        // Fixed now, as started: an upgrade later runs what is at this path.
        own_binary();
        // Absolute, so the watcher's (absolute) event paths compare with it
        // and with the state_dir below it.
        let path =
            &std::path::absolute(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let reloads = mpsc::channel(4);
        let mut watcher = match Watcher::start(Reloader(reloads.0.clone())) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "cannot watch files for changes; SIGHUP still reloads");
                None
            }
        };
        if let Some(w) = watcher.as_mut() {
            w.watch(&[path.to_path_buf()]);
        }
        let config = Config::load(path).map_err(|e| vec![e.to_string()])?;
        if let Some(w) = watcher.as_mut() {
            w.watch(&diff::watched_files(path, &config));
        }
        let mut server = Server::bind_from(&config, Some(path), &mut inherited)
            .map_err(|es| es.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
        for key in inherited.keys() {
            info!(
                socket = key,
                "upgrade: the config no longer names this socket; closed here"
            );
        }
        server.reloads = reloads;
        server.watcher = watcher;
        Ok(server)
    }

    /// A handle that asks this server to reload its config file.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.reloads.0.clone())
    }

    /// Where the admin endpoint listens, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Where each listener is bound (port 0 resolved to the real port).
    pub fn local_addrs(&self) -> BTreeMap<String, Vec<SocketAddr>> {
        let mut out: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
        for (_, _, socket, name) in &self.sockets {
            if let Ok(a) = socket.local_addr() {
                out.entry(name.clone()).or_default().push(a);
            }
        }
        out
    }

    /// Serves until `shutdown` resolves, then drains; or until a new
    /// process took over (`portcullis upgrade`), then drains too.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.serve(None, shutdown).await;
    }

    /// [`Server::run`] in a process that replaces another: it accepts at
    /// once, says so, and starts its ACME tasks, control socket and admin
    /// endpoint once the other has stopped its own.
    pub async fn run_replacing(self, successor: Successor, shutdown: impl Future<Output = ()>) {
        self.serve(Some(successor), shutdown).await;
    }

    async fn serve(self, successor: Option<Successor>, shutdown: impl Future<Output = ()>) {
        let (mut state, mut reload_rx, services) = Running::start(self);
        tokio::pin!(shutdown);
        if let Some(successor) = successor {
            // A signal while waiting: the old process hears this one will
            // not take over (and accepts again); this one stops before it
            // ever started its services.
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let taking = upgrade::take_over(successor, stop.clone());
            tokio::pin!(taking);
            let go = tokio::select! {
                go = &mut taking => go,
                _ = &mut shutdown => {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    // Within a tick. Unless the old process said go in
                    // that moment: this one is the main process then, and
                    // its stop is the service's.
                    if taking.await {
                        crate::ops::systemd::stopping();
                    }
                    false
                }
            };
            if !go {
                state.shut_down().await;
                return;
            }
        }
        state.start_services(services);
        crate::ops::systemd::ready("serving");
        let mut probe =
            tokio::time::interval_at(tokio::time::Instant::now() + STATE_PROBE, STATE_PROBE);
        let mut upgrading: Option<upgrade::Pending> = None;
        let handed_over = loop {
            tokio::select! {
                _ = &mut shutdown => break false,
                request = reload_rx.recv() => match request {
                    Some(Ask::Reload(r)) => {
                        state.reload(r).await;
                        state.probe_state_dir();
                    }
                    Some(Ask::Upgrade(u)) if upgrading.is_some() => {
                        let why = "an upgrade is already under way; this process serves on";
                        warn!(trigger = u.reason, "upgrade not started: {why}");
                        reload_request::answer(u.reply, Err(why.into()));
                    }
                    Some(Ask::Upgrade(u)) => upgrading = state.begin_upgrade(u),
                    None => break false,
                },
                outcome = upgrade::finished(&mut upgrading) => {
                    if let Some(pending) = upgrading.take() {
                        match state.upgraded(pending, outcome, shutdown.as_mut()).await {
                            upgrade::Handover::Done => break true,
                            upgrade::Handover::Resumed => {}
                            upgrade::Handover::Stopping => break false,
                        }
                    }
                }
                _ = probe.tick() => state.probe_state_dir(),
            }
        };
        if !handed_over {
            // An upgrade under way is given up: its new process is ended.
            drop(upgrading);
            crate::ops::systemd::stopping();
            state.shut_down().await;
            return;
        }
        // What was asked of this process meanwhile is the new one's now.
        reload_rx.close();
        while let Ok(ask) = reload_rx.try_recv() {
            let why = "this process has handed over to a new one: ask again".to_string();
            match ask {
                Ask::Reload(r) => reload_request::answer(r.reply, Err(why)),
                Ask::Upgrade(u) => {
                    warn!(trigger = u.reason, "upgrade not started: {why}");
                    reload_request::answer(u.reply, Err(why));
                }
            }
        }
        state.drain_after_upgrade().await;
    }
}
