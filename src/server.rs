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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::acme::challenge::Challenges;
use crate::acme::{self, Managed};
use crate::config::names::HostPattern;
use crate::config::{diff, CertSource, Config, Listener};
use crate::metrics::Metrics;
use crate::ops::control::{self, Control, ControlError};
use crate::ops::notify::{self, Notifier};
use crate::ops::reload::{self, Reloader, Watcher};
use crate::ops::reports::AcmeReports;
use crate::ops::View;
use crate::proxy::context::{ListenerCtx, Stop};
use crate::proxy::limiter::ClientLimiter;
use crate::proxy::listener::accept_loop;
use crate::tls::certs::{self, CertError, LoadedCert};
use crate::tls::hosts::{CertSlot, Host, HostTable, NoDefaultHost, Served, Source};
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
    #[error("notify: {0}")]
    Notify(String),
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

/// How often an unwritable `state_dir` is tried again (and a writable one
/// checked, for `portcullis_state_dir_writable`).
const STATE_PROBE: Duration = Duration::from_secs(60);

/// How long sessions get to close once the grace period is over.
const FINAL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A host's certificate slot, kept across reloads for ACME hosts whose names
/// do not change (their task and certificate go on as they were).
#[derive(Clone, Debug)]
struct HostSlot {
    names: Vec<HostPattern>,
    slot: Arc<CertSlot>,
    acme: bool,
}

/// Everything built from one config, before anything is swapped in.
struct Snapshot {
    table: HostTable,
    slots: Vec<HostSlot>,
    /// ACME hosts that need a new task (new, or their names changed).
    new_acme: Vec<Managed>,
}

/// Which socket serves a configured address. An address with port 0 gets
/// a fresh port when bound, so it is only "the same" within its listener.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum BindKey {
    Addr(SocketAddr),
    Ephemeral(String, SocketAddr),
}

impl BindKey {
    fn new(listener: &str, addr: SocketAddr) -> BindKey {
        if addr.port() == 0 {
            BindKey::Ephemeral(listener.to_string(), addr)
        } else {
            BindKey::Addr(addr)
        }
    }
}

/// A bound socket and its accept loop's settings, swapped on reload.
struct Bound {
    listener: String,
    ctx: Arc<ArcSwap<ListenerCtx>>,
    /// Stops this accept loop only (the address left the config).
    listen: CancellationToken,
    /// Ends this address's relays (the grace after its removal is over).
    relays: CancellationToken,
    local: Option<SocketAddr>,
}

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
    sockets: Vec<(BindKey, Arc<ArcSwap<ListenerCtx>>, TcpListener, String)>,
    /// `None` when `state_dir` cannot be written.
    control: Option<Control>,
    /// Whether `state_dir` could be written at start.
    writable: bool,
    reloads: (
        mpsc::Sender<reload::Request>,
        mpsc::Receiver<reload::Request>,
    ),
    /// Watching since before the files were read (`bind_file`).
    watcher: Option<Watcher>,
    metrics: Arc<Metrics>,
    /// The admin endpoint's socket (`admin.bind`).
    admin: Option<TcpListener>,
    notifier: Arc<ArcSwapOption<Notifier>>,
}

impl Server {
    /// Loads certificates and binds every listener address and the control
    /// socket. Must be called inside a tokio runtime.
    pub fn bind(config: &Config) -> Result<Server, Vec<BuildError>> {
        Server::bind_from(config, None)
    }

    /// [`Server::bind`], for the config read from `file` when there is one
    /// (notification emails name it in the commands they suggest).
    fn bind_from(config: &Config, file: Option<&Path>) -> Result<Server, Vec<BuildError>> {
        let tls = TlsContext::new().map_err(|e| vec![e.into()])?;
        let writable = store::open_state_dir(&config.state_dir).map_err(|source| {
            vec![BuildError::StateDir {
                path: config.state_dir.clone(),
                source,
            }]
        })?;
        let control = match (Control::bind(&config.state_dir), &writable) {
            (Ok(c), _) => Some(c),
            (Err(e @ ControlError::Running(_)), _) | (Err(e), Ok(())) => {
                return Err(vec![e.into()])
            }
            (Err(e), Err(_)) => {
                warn!(error = %e, "no control socket: portcullis certs, renew and reload cannot reach this instance (SIGHUP still reloads)");
                None
            }
        };
        let metrics = Metrics::new();
        metrics.state_dir_writable(writable.is_ok());
        if let Err(e) = &writable {
            warn!(
                state_dir = %config.state_dir.display(),
                error = %e,
                "state_dir is not writable: serving what is stored; certificates issued now are served but not kept across a restart, self-signed ones are made anew at each start"
            );
        }
        let snapshot = build(config, &tls, &[])?;
        let table = Arc::new(ArcSwap::from_pointee(snapshot.table));
        let challenges = Arc::new(Challenges::default());
        let notifier = Arc::new(ArcSwapOption::from(
            notifier(config, file, None).map_err(|e| vec![BuildError::Notify(e)])?,
        ));

        let v4_any = v4_any_ports(config.listeners.values());
        let mut sockets = Vec::new();
        let mut errors = Vec::new();
        for l in config.listeners.values() {
            let ctx = Arc::new(
                listener_ctx(config, l, &tls, &table.load_full(), &challenges, &metrics)
                    .map_err(|e| vec![e])?,
            );
            for addr in &l.bind {
                // Each address its own: a reload may give it to another listener.
                let settings = Arc::new(ArcSwap::new(ctx.clone()));
                match bind_socket(*addr, &v4_any) {
                    Ok(s) => {
                        sockets.push((BindKey::new(&l.name, *addr), settings, s, l.name.clone()))
                    }
                    Err(source) => errors.push(BuildError::Bind {
                        listener: l.name.clone(),
                        addr: *addr,
                        source,
                    }),
                }
            }
        }
        let admin = match &config.admin {
            Some(a) => match bind_socket(a.bind, &v4_any) {
                Ok(s) => Some(s),
                Err(source) => {
                    errors.push(BuildError::Bind {
                        listener: "admin".into(),
                        addr: a.bind,
                        source,
                    });
                    None
                }
            },
            None => None,
        };
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
        })
    }

    /// Loads the config from `path` and binds it; reloads read the same file
    /// and it is watched for changes. The watch starts before the files are
    /// read, so a change made while starting is not missed.
    pub fn bind_file(path: &Path) -> Result<Server, Vec<String>> {
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
        let mut server = Server::bind_from(&config, Some(path))
            .map_err(|es| es.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
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

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            config,
            config_file,
            tls,
            table,
            challenges,
            slots,
            pending_acme,
            sockets,
            control,
            writable,
            reloads: (reload_tx, mut reload_rx),
            watcher,
            metrics,
            admin,
            notifier,
        } = self;
        let stop = Stop::default();
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(config.max_connections));
        let accepts = TaskTracker::new();
        let background = TaskTracker::new();
        let background_stop = CancellationToken::new();

        let mut state = Running {
            config,
            config_file,
            tls,
            table,
            challenges,
            slots,
            bound: BTreeMap::new(),
            acme: None,
            views: Arc::new(ArcSwap::from_pointee(Vec::new())),
            watcher,
            reload_failures: 0,
            metrics: metrics.clone(),
            notifier: notifier.clone(),
            stop: stop.clone(),
            limit,
            tracker: tracker.clone(),
            accepts: accepts.clone(),
            background: background.clone(),
            background_stop: background_stop.clone(),
            acme_hooks: acme::Hooks {
                events: Arc::new(AcmeReports {
                    metrics: metrics.clone(),
                    notifier: notifier.clone(),
                }),
                orders: Arc::default(),
                unstored: Arc::default(),
            },
            writable,
            reloader: Reloader(reload_tx.clone()),
            control_serving: control.is_some(),
        };
        for (key, ctx, socket, name) in sockets {
            state.start_accepting(key, name, ctx, socket);
        }
        state.sync_acme(pending_acme);
        state.publish_views();
        let reloader = Reloader(reload_tx);
        if let Some(control) = control {
            background.spawn(control.serve(
                state.views.clone(),
                Some(reloader.clone()),
                background_stop.clone(),
            ));
        }
        drop(reloader);
        background.spawn(notify::expiry_watch(
            notifier,
            state.views.clone(),
            background_stop.clone(),
        ));
        if let Some(admin) = admin {
            background.spawn(crate::ops::admin::serve(
                admin,
                metrics,
                state.views.clone(),
                background_stop.clone(),
            ));
        }

        tokio::pin!(shutdown);
        let mut probe =
            tokio::time::interval_at(tokio::time::Instant::now() + STATE_PROBE, STATE_PROBE);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                request = reload_rx.recv() => match request {
                    Some(r) => {
                        state.reload(r).await;
                        state.probe_state_dir();
                    }
                    None => break,
                },
                _ = probe.tick() => state.probe_state_dir(),
            }
        }

        let shutdown_grace = state.config.timeouts.shutdown_grace;
        background_stop.cancel();
        state.acme = None;
        state.watcher = None;
        accepts.close();
        info!(open_sessions = tracker.len(), grace = ?shutdown_grace, "shutting down: no new connections");
        stop.accepting.cancel();
        accepts.wait().await;
        tracker.close();
        if tokio::time::timeout(shutdown_grace, tracker.wait())
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
        background.close();
        background.wait().await;
        info!("stopped");
    }
}

/// The server while it runs: the one writer of the host table, the listener
/// set and the ACME tasks.
struct Running {
    config: Config,
    config_file: Option<PathBuf>,
    tls: TlsContext,
    table: Arc<ArcSwap<HostTable>>,
    challenges: Arc<Challenges>,
    slots: Vec<HostSlot>,
    bound: BTreeMap<BindKey, Bound>,
    acme: Option<acme::Runner>,
    views: Arc<ArcSwap<Vec<View>>>,
    watcher: Option<Watcher>,
    reload_failures: u64,
    metrics: Arc<Metrics>,
    notifier: Arc<ArcSwapOption<Notifier>>,
    stop: Stop,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    accepts: TaskTracker,
    background: TaskTracker,
    background_stop: CancellationToken,
    /// What every ACME runner shares, across reloads: metrics,
    /// notifications, the order budget, certificates not stored yet.
    acme_hooks: acme::Hooks,
    /// Whether `state_dir` could be written when last tried.
    writable: bool,
    /// For a control socket bound late (`state_dir` writable again).
    reloader: Reloader,
    control_serving: bool,
}

impl Running {
    /// Tries writing to `state_dir` again: says when that changes, and binds
    /// the control socket once it can.
    fn probe_state_dir(&mut self) {
        let state_dir = self.config.state_dir.clone();
        let now = store::probe_writable(&state_dir);
        match (&now, self.writable) {
            (Ok(()), false) => {
                info!(state_dir = %state_dir.display(), "state_dir is writable again: new certificates are stored")
            }
            (Err(e), true) => {
                warn!(state_dir = %state_dir.display(), error = %e, "state_dir is no longer writable: new certificates are served but not kept")
            }
            _ => {}
        }
        self.writable = now.is_ok();
        self.metrics.state_dir_writable(self.writable);
        if !self.writable {
            return;
        }
        if let Some(acme) = &self.acme {
            acme.store_pending();
        }
        if self.control_serving {
            return;
        }
        match Control::bind(&state_dir) {
            Ok(control) => {
                info!(
                    "control socket ready: portcullis certs, renew and reload reach this instance"
                );
                self.background.spawn(control.serve(
                    self.views.clone(),
                    Some(self.reloader.clone()),
                    self.background_stop.clone(),
                ));
                self.control_serving = true;
            }
            Err(e) => debug!(error = %e, "control socket still unavailable"),
        }
    }

    fn start_accepting(
        &mut self,
        key: BindKey,
        listener: String,
        ctx: Arc<ArcSwap<ListenerCtx>>,
        socket: TcpListener,
    ) {
        let local = socket.local_addr().ok();
        if let Some(addr) = local {
            info!(listener = %listener, addr = %addr, "listening");
            self.metrics.accepting(&listener, addr, true);
        }
        // Children of the server's tokens: shutdown stops them all; a
        // reload that removes this address stops its accepting at once and
        // its relays after the grace period. Connections still in their
        // handshake or dialogue carry on to their relay.
        let listen = self.stop.accepting.child_token();
        let stop = Stop {
            accepting: self.stop.accepting.clone(),
            relays: self.stop.relays.child_token(),
        };
        self.accepts.spawn(accept_loop(
            socket,
            ctx.clone(),
            self.limit.clone(),
            self.tracker.clone(),
            stop.clone(),
            listen.clone(),
        ));
        self.bound.insert(
            key,
            Bound {
                listener,
                ctx,
                listen,
                relays: stop.relays,
                local,
            },
        );
    }

    /// Starts tasks for new ACME hosts, stops those of hosts that are gone.
    fn sync_acme(&mut self, new: Vec<Managed>) {
        let wanted: Vec<Vec<String>> = self
            .slots
            .iter()
            .filter(|s| s.acme)
            .map(|s| crate::config::names::to_strings(&s.names))
            .collect();
        let Some(config) = self.config.acme.clone().filter(|_| !wanted.is_empty()) else {
            self.acme = None;
            return;
        };
        // A changed acme: block restarts every task with the new settings;
        // certificates stay in their slots, and are replaced at once when
        // they come from another directory (staging → production).
        let old_directory = self.acme.as_ref().map(|r| r.config().directory.clone());
        if self.acme.as_ref().is_some_and(|r| *r.config() != config) {
            self.acme = None;
        }
        let moved = old_directory.is_some_and(|d| d != config.directory);
        let fresh = self.acme.is_none();
        let runner = self.acme.get_or_insert_with(|| {
            acme::Runner::new(
                config,
                self.config.state_dir.clone(),
                self.tls.provider.clone(),
                self.challenges.clone(),
                self.background.clone(),
                self.background_stop.clone(),
                self.acme_hooks.clone(),
            )
        });
        runner.retain(|names| wanted.iter().any(|w| w == names));
        let mut new = new;
        if fresh {
            // Hosts whose slot was kept need their task again.
            for s in self.slots.iter().filter(|s| s.acme) {
                if !new.iter().any(|m| m.names == s.names) {
                    new.push(Managed {
                        names: s.names.clone(),
                        slot: s.slot.clone(),
                        order_now: if s.slot.load().source != Source::Acme {
                            Some("no certificate issued yet".to_string())
                        } else if moved {
                            Some("the ACME directory changed".to_string())
                        } else {
                            None
                        },
                    });
                }
            }
        }
        for m in new {
            if !runner.has(&crate::config::names::to_strings(&m.names)) {
                runner.add(m);
            }
        }
    }

    fn publish_views(&self) {
        let views = self
            .slots
            .iter()
            .map(|s| {
                let names = crate::config::names::to_strings(&s.names);
                View {
                    acme: self.acme.as_ref().and_then(|r| r.handle(&names)),
                    names,
                    slot: s.slot.clone(),
                }
            })
            .collect();
        self.views.store(Arc::new(views));
    }

    async fn reload(&mut self, request: reload::Request) {
        let result = self.try_reload();
        self.metrics.reload(result.is_ok());
        match &result {
            Ok(changes) => info!(
                trigger = request.reason,
                changes = %changes,
                "configuration reloaded"
            ),
            Err(e) => {
                self.reload_failures += 1;
                error!(
                    trigger = request.reason,
                    error = %e,
                    reload_failures = self.reload_failures,
                    "reload failed; still serving the previous configuration"
                );
            }
        }
        if let Some(reply) = request.reply {
            let _ = reply.send(result);
        }
    }

    /// Read, parse, validate, build, bind what is new; only then swap.
    fn try_reload(&mut self) -> Result<diff::Changes, String> {
        let Some(path) = self.config_file.clone() else {
            return Err("this server was not started from a config file".into());
        };
        let mut config = Config::load(&path).map_err(|e| e.to_string())?;
        // Watch the new files even if this reload fails: the operator may
        // be about to copy in the certificate it could not find.
        if let Some(w) = self.watcher.as_mut() {
            let mut files = diff::watched_files(&path, &self.config);
            files.extend(diff::watched_files(&path, &config));
            w.watch(&files);
        }
        let changes = diff::diff(&self.config, &config);
        // Read only at start: reported as needing a restart, not applied
        // (a new state_dir would split certificates from their ACME task).
        config.state_dir = self.config.state_dir.clone();
        config.max_connections = self.config.max_connections;
        config.log = self.config.log.clone();
        config.admin = self.config.admin.clone();
        let lines = |es: Vec<BuildError>| {
            es.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let snapshot = build(&config, &self.tls, &self.slots).map_err(lines)?;
        let table = Arc::new(snapshot.table);
        let notifier = if config.notify != self.config.notify {
            Some(
                notifier(
                    &config,
                    self.config_file.as_deref(),
                    self.notifier.load().as_deref(),
                )
                .map_err(|e| BuildError::Notify(e).to_string())?,
            )
        } else {
            None
        };

        // Contexts for every listener, and sockets for addresses not bound yet.
        let v4_any = v4_any_ports(config.listeners.values());
        let mut contexts = BTreeMap::new();
        let mut fresh = Vec::new();
        for l in config.listeners.values() {
            let mut ctx = listener_ctx(
                &config,
                l,
                &self.tls,
                &table,
                &self.challenges,
                &self.metrics,
            )
            .map_err(|e| e.to_string())?;
            // Open connections go on counting against the limiter they
            // were admitted by: the listener keeps it across the reload.
            if let Some(b) = self.bound.values().find(|b| b.listener == l.name) {
                ctx.limiter = b.ctx.load().limiter.clone();
            }
            contexts.insert(l.name.clone(), Arc::new(ctx));
            for addr in &l.bind {
                let key = BindKey::new(&l.name, *addr);
                if !self.bound.contains_key(&key) {
                    let socket = bind_socket(*addr, &v4_any).map_err(|source| {
                        BuildError::Bind {
                            listener: l.name.clone(),
                            addr: *addr,
                            source,
                        }
                        .to_string()
                    })?;
                    fresh.push((key, l.name.clone(), socket));
                }
            }
        }

        // Everything is built: swap.
        let mut changes = changes;
        for s in &snapshot.slots {
            let before = self.slots.iter().find(|o| o.names == s.names);
            if before.is_some_and(|o| o.slot.key().cert != s.slot.key().cert) {
                changes.certificates_replaced.push(diff::host_key(&s.names));
            }
        }
        self.table.store(table);
        if let Some(n) = notifier {
            self.notifier.store(n);
        }
        let keys: BTreeSet<BindKey> = config
            .listeners
            .values()
            .flat_map(|l| l.bind.iter().map(|a| BindKey::new(&l.name, *a)))
            .collect();
        let grace = config.timeouts.shutdown_grace;
        self.bound.retain(|key, b| {
            if keys.contains(key) {
                return true;
            }
            if let Some(a) = b.local {
                self.metrics.forget_address(&b.listener, a);
            }
            let addr = b.local.map(|a| a.to_string()).unwrap_or_default();
            info!(listener = %b.listener, addr = %addr, "address removed: no new connections there, open sessions drain");
            b.listen.cancel();
            let relays = b.relays.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                relays.cancel();
            });
            false
        });
        for l in config.listeners.values() {
            for addr in &l.bind {
                if let Some(b) = self.bound.get_mut(&BindKey::new(&l.name, *addr)) {
                    if let Some(ctx) = contexts.get(&l.name) {
                        b.ctx.store(ctx.clone());
                        if b.listener != l.name {
                            // The address moved to another listener: its
                            // health and metrics go with it.
                            if let Some(a) = b.local {
                                self.metrics.forget_address(&b.listener, a);
                                self.metrics.accepting(&l.name, a, true);
                            }
                            b.listener = l.name.clone();
                        }
                    }
                }
            }
        }
        for (key, name, socket) in fresh {
            let ctx = match contexts.get(&name) {
                Some(c) => Arc::new(ArcSwap::new(c.clone())),
                None => continue, // built above for every listener
            };
            self.start_accepting(key, name, ctx, socket);
        }
        self.config = config;
        self.slots = snapshot.slots;
        self.sync_acme(snapshot.new_acme);
        self.publish_views();
        if let (Some(w), Some(path)) = (self.watcher.as_mut(), &self.config_file) {
            w.watch(&diff::watched_files(path, &self.config));
        }
        Ok(changes)
    }
}

/// The notifier for `config.notify`, if any; its emails name `file` in the
/// commands they suggest, and it remembers the warnings `old` sent.
fn notifier(
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

/// The per-listener settings every connection reads.
fn listener_ctx(
    config: &Config,
    l: &Listener,
    tls: &TlsContext,
    table: &Arc<HostTable>,
    challenges: &Arc<Challenges>,
    metrics: &Arc<Metrics>,
) -> Result<ListenerCtx, BuildError> {
    let mut backends: Vec<SocketAddr> = config
        .hosts
        .iter()
        .filter_map(|h| h.backends.get(&l.name).map(|b| b.address))
        .collect();
    backends.sort();
    backends.dedup();
    Ok(ListenerCtx {
        listener: l.clone(),
        tls: tls.server_config(l, Arc::new(CertResolver::new(table.clone())))?,
        table: table.clone(),
        timeouts: config.timeouts,
        hostname: l
            .hostname
            .as_ref()
            .unwrap_or(&config.default_host)
            .to_string(),
        challenges: challenges.clone(),
        metrics: Arc::new(metrics.listener(&l.name, &backends)),
        limiter: ClientLimiter::new(&l.name),
    })
}

/// Certificates and the host table for `config`. ACME hosts whose names are
/// in `previous` keep their slot (and their task); the rest start fresh.
fn build(
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
        let mut names = host.names.clone();
        let served = match (&host.certificate, cert) {
            (CertSource::Acme, _) => {
                match previous
                    .iter()
                    .find(|p| p.acme && same_names(&p.names, &names))
                {
                    Some(p) => {
                        // Keep the names as the running task knows them.
                        names = p.names.clone();
                        p.slot.clone()
                    }
                    None => {
                        let directory = config.acme.as_ref().map(|a| a.directory.as_str());
                        // A host switched from certificate files to acme
                        // (the migration from certbot) keeps its files'
                        // certificate until the first ACME one is issued.
                        let before = previous
                            .iter()
                            .find(|p| !p.acme && same_names(&p.names, &names))
                            .map(|p| p.slot.load());
                        let (served, order_now) = acme_start(
                            &config.state_dir,
                            &host.names,
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
                        new_acme.push(Managed {
                            names: host.names.clone(),
                            slot: slot.clone(),
                            order_now,
                        });
                        slot
                    }
                }
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
        slots.push(HostSlot {
            names,
            slot: served.clone(),
            acme: host.certificate == CertSource::Acme,
        });
        hosts.push(Host {
            names: host.names.clone(),
            cert: served,
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

/// What an ACME host serves at start-up, and why it needs an order now (if
/// it does): the stored certificate while it is valid, else the certificate
/// `files` the host served before it was switched to acme (while valid),
/// else the stored certificate if it has expired, else a self-signed
/// placeholder. A stored pair that does not load is reported and never
/// served.
fn acme_start(
    state_dir: &std::path::Path,
    names: &[HostPattern],
    directory: Option<&str>,
    provider: &rustls::crypto::CryptoProvider,
    files: Option<&Served>,
) -> Result<(Served, Option<String>), CertError> {
    let wanted = crate::config::names::to_strings(names);
    let valid_files =
        files.filter(|f| f.source == Source::Files && f.info.not_after > certs::unix_now());
    let reason = match acme::store::load(state_dir, names, provider) {
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
                let served = Served {
                    key: stored.cert.key,
                    info: stored.cert.info,
                    source: Source::Acme,
                };
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
            Served {
                key: f.key.clone(),
                info: f.info.clone(),
                source: f.source,
            },
            Some(reason),
        ));
    }
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

/// The same set of names, in any order: the same certificate.
fn same_names(a: &[HostPattern], b: &[HostPattern]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    a == b
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
