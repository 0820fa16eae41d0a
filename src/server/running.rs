//! The server while it runs: the one writer of the host table, the
//! listener set and the ACME tasks; started from a bound [`Server`], shut
//! down in two stages.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::bind::BindKey;
use super::snapshot::HostSlot;
use super::Server;
use crate::acme::challenge::Challenges;
use crate::acme::{self, Managed};
use crate::cluster::Cluster;
use crate::config::{names, Config};
use crate::metrics::Metrics;
use crate::ops::control::Control;
use crate::ops::notify::{self, Notifier};
use crate::ops::reload::{self, Reloader, Watcher};
use crate::ops::reports::AcmeReports;
use crate::ops::View;
use crate::proxy::context::{ListenerCtx, Stop};
use crate::proxy::listener::accept_loop;
use crate::proxy::runtime::{Runtime, Topology};
use crate::tls::hosts::{HostTable, Source};
use crate::tls::{store, TlsContext};

/// A socket's copy, or `None` (said at debug: that socket is bound afresh
/// by a new process, and the upgrade fails if it cannot be).
fn copy(socket: std::io::Result<OwnedFd>) -> Option<OwnedFd> {
    socket
        .map_err(|e| debug!(error = %e, "cannot copy a listening socket"))
        .ok()
}

/// A tokio listening socket from a copy of one.
pub(super) fn copy_listener(fd: &OwnedFd) -> std::io::Result<TcpListener> {
    crate::ops::handover::tcp_listener(fd.try_clone()?)
}

/// How long the control socket's last answers get to be written at exit.
const ANSWERS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long sessions get to close once the grace period is over.
const FINAL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A bound socket and its accept loop's settings, swapped on reload.
pub(super) struct Bound {
    pub(super) listener: String,
    pub(super) ctx: Arc<ArcSwap<ListenerCtx>>,
    /// Stops this accept loop only (the address left the config).
    pub(super) listen: CancellationToken,
    /// Ends this address's relays (the grace after its removal is over).
    pub(super) relays: CancellationToken,
    pub(super) local: Option<SocketAddr>,
    /// A copy of the socket, for a new process to take over
    /// (`portcullis upgrade`); `None` if it could not be copied.
    pub(super) socket: Option<OwnedFd>,
}

/// What starts once the process this one replaces has stopped its own
/// (`portcullis upgrade`), or at once: the ACME tasks, the control socket,
/// the admin endpoint.
pub(super) struct Services {
    pub(super) pending_acme: Vec<Managed>,
    pub(super) control: Option<Control>,
    pub(super) admin: Option<TcpListener>,
}

/// The server while it runs: the one writer of the host table, the listener
/// set and the ACME tasks.
pub(super) struct Running {
    pub(super) config: Config,
    pub(super) config_file: Option<PathBuf>,
    pub(super) tls: TlsContext,
    pub(super) table: Arc<ArcSwap<HostTable>>,
    pub(super) challenges: Arc<Challenges>,
    pub(super) slots: Vec<HostSlot>,
    pub(super) bound: BTreeMap<BindKey, Bound>,
    pub(super) acme: Option<acme::Runner>,
    pub(super) views: Arc<ArcSwap<Vec<View>>>,
    pub(super) watcher: Option<Watcher>,
    pub(super) reload_failures: u64,
    pub(super) metrics: Arc<Metrics>,
    pub(super) notifier: Arc<ArcSwapOption<Notifier>>,
    pub(super) stop: Stop,
    pub(super) limit: Arc<Semaphore>,
    pub(super) tracker: TaskTracker,
    pub(super) accepts: TaskTracker,
    pub(super) background: TaskTracker,
    pub(super) background_stop: CancellationToken,
    /// What every ACME runner shares, across reloads: metrics,
    /// notifications, the order budget, certificates not stored yet.
    pub(super) acme_hooks: acme::Hooks,
    /// Whether `state_dir` could be written when last tried.
    pub(super) writable: bool,
    /// For a control socket bound late (`state_dir` writable again).
    pub(super) reloader: Reloader,
    pub(super) control_serving: bool,
    /// The store several instances share, followed for the server's life.
    pub(super) cluster: Option<Arc<Cluster>>,
    /// Live sessions and drain switches; told what the config names after
    /// each start and reload.
    pub(super) runtime: Arc<Runtime>,
    /// Copies of the control socket and of the admin endpoint's (with its
    /// key), for a new process to take over.
    pub(super) control_socket: Option<OwnedFd>,
    pub(super) admin_socket: Option<(String, OwnedFd)>,
    /// The control socket's answers under way: an upgrade's is written as
    /// the process hands over, and waited for before it exits.
    pub(super) answers: TaskTracker,
}

impl Running {
    /// Takes over a bound server: its sockets accept. Returns the receiver
    /// of reload requests, and the services to start next
    /// ([`Running::start_services`]).
    pub(super) fn start(server: Server) -> (Running, mpsc::Receiver<reload::Ask>, Services) {
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
            reloads: (reload_tx, reload_rx),
            watcher,
            metrics,
            admin,
            notifier,
            cluster,
            runtime,
            drained,
        } = server;
        let admin_socket = match (&admin, &config.admin) {
            (Some(socket), Some(a)) => copy(socket.as_fd().try_clone_to_owned())
                .map(|fd| (super::bind::admin_key(a.bind), fd)),
            _ => None,
        };
        let mut state = Running {
            limit: Arc::new(Semaphore::new(config.max_connections)),
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
            stop: Stop::default(),
            tracker: TaskTracker::new(),
            accepts: TaskTracker::new(),
            background: TaskTracker::new(),
            background_stop: CancellationToken::new(),
            acme_hooks: acme::Hooks {
                events: Arc::new(AcmeReports {
                    metrics: metrics.clone(),
                    notifier: notifier.clone(),
                }),
                orders: Arc::default(),
                unstored: Arc::default(),
                routes: Arc::default(),
                cluster: cluster.clone(),
            },
            writable,
            reloader: Reloader(reload_tx),
            control_serving: control.is_some(),
            cluster: cluster.clone(),
            runtime,
            control_socket: None,
            admin_socket,
            answers: TaskTracker::new(),
        };
        // Drained in the process this one replaces: so here, before the
        // first accept.
        for name in &drained {
            state
                .runtime
                .set_drained(&crate::proxy::runtime::Target::Listener(name.clone()), true);
        }
        for (key, ctx, socket, name) in sockets {
            state.start_accepting(key, name, ctx, socket, None);
        }
        state.publish_topology();
        for name in &drained {
            match state.runtime.target(name) {
                Ok(target) => {
                    state.runtime.set_drained(&target, true);
                    info!(target = %target, "upgrade: drained, as in the old process");
                }
                Err(e) => {
                    info!(error = %e, "upgrade: drained in the old process, gone from the config")
                }
            }
        }
        let services = Services {
            pending_acme,
            control,
            admin,
        };
        (state, reload_rx, services)
    }

    /// Starts the ACME tasks and the background tasks: control socket,
    /// expiry watch, admin endpoint, and following the cluster store.
    pub(super) fn start_services(&mut self, services: Services) {
        let Services {
            pending_acme,
            control,
            admin,
        } = services;
        self.sync_acme(pending_acme);
        self.publish_views();
        let (views, stop) = (&self.views, &self.background_stop);
        let cluster = self.cluster.clone();
        if let Some(cluster) = &cluster {
            let certs = self.acme_hooks.routes.clone();
            let follow = cluster.clone().follow(certs, stop.clone());
            self.background.spawn(follow);
        }
        let watch = notify::expiry_watch(self.notifier.clone(), views.clone(), stop.clone());
        self.background.spawn(watch);
        if let Some(admin) = admin {
            let metrics = self.metrics.clone();
            let serve =
                crate::ops::admin::serve(admin, metrics, views.clone(), cluster, stop.clone());
            self.background.spawn(serve);
        }
        if let Some(control) = control {
            self.serve_control(control);
        }
    }

    /// Answers on the control socket until the services stop, keeping a
    /// copy of it for a new process (`portcullis upgrade`).
    fn serve_control(&mut self, control: Control) {
        self.control_socket = copy(control.socket());
        self.background.spawn(control.serve(
            self.views.clone(),
            self.runtime.clone(),
            self.cluster.clone(),
            Some(self.reloader.clone()),
            self.background_stop.clone(),
            self.answers.clone(),
        ));
        self.control_serving = true;
    }

    /// Tries writing to `state_dir` again: says when that changes, and binds
    /// the control socket once it can.
    pub(super) fn probe_state_dir(&mut self) {
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
                self.serve_control(control);
            }
            Err(e) => debug!(error = %e, "control socket still unavailable"),
        }
    }

    pub(super) fn start_accepting(
        &mut self,
        key: BindKey,
        listener: String,
        ctx: Arc<ArcSwap<ListenerCtx>>,
        socket: TcpListener,
        relays: Option<CancellationToken>,
    ) {
        let local = socket.local_addr().ok();
        let copied = copy(socket.as_fd().try_clone_to_owned());
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
            relays: relays.unwrap_or_else(|| self.stop.relays.child_token()),
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
                socket: copied,
            },
        );
    }

    /// Starts tasks for new ACME hosts, stops those of hosts that are gone.
    pub(super) fn sync_acme(&mut self, new: Vec<Managed>) {
        let wanted: Vec<(String, Vec<String>)> = self
            .slots
            .iter()
            .filter_map(|s| s.lineage.as_ref())
            .map(|l| (l.id(), names::to_strings(&l.names)))
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
        runner.retain(|id, names| wanted.iter().any(|(i, n)| i == id && n == names));
        let mut new = new;
        if fresh {
            // Hosts whose slot was kept need their task again.
            for (s, lineage) in self
                .slots
                .iter()
                .filter_map(|s| Some((s, s.lineage.as_ref()?)))
            {
                if !new.iter().any(|m| m.lineage == *lineage) {
                    new.push(Managed {
                        lineage: lineage.clone(),
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
            if !runner.has(&m.lineage.id(), &names::to_strings(&m.lineage.names)) {
                runner.add(m);
            }
        }
    }

    pub(super) fn publish_views(&self) {
        let views = self
            .slots
            .iter()
            .map(|s| {
                let names = names::to_strings(&s.names);
                let acme = s.lineage.as_ref().and_then(|l| {
                    let runner = self.acme.as_ref()?;
                    runner.handle(&l.id(), &names)
                });
                View {
                    acme,
                    names,
                    slot: s.slot.clone(),
                }
            })
            .collect();
        self.views.store(Arc::new(views));
    }

    /// Tells the runtime view what the config names now: listeners with
    /// their bound addresses, backends with the listeners routing to them.
    /// Drain switches of names that are gone are forgotten.
    pub(super) fn publish_topology(&self) {
        let mut topology = Topology::default();
        for name in self.config.listeners.keys() {
            topology.listeners.insert(name.clone(), Vec::new());
        }
        for b in self.bound.values() {
            if let (Some(addrs), Some(a)) = (topology.listeners.get_mut(&b.listener), b.local) {
                addrs.push(a);
            }
        }
        for host in &self.config.hosts {
            for (listener, backend) in &host.backends {
                let users = topology.backends.entry(backend.address).or_default();
                if !users.contains(listener) {
                    users.push(listener.clone());
                }
            }
        }
        for addrs in topology.listeners.values_mut() {
            addrs.sort();
        }
        for users in topology.backends.values_mut() {
            users.sort();
        }
        self.runtime.configure(topology);
    }

    /// Stops accepting, gives open sessions the grace period, ends the
    /// rest, and waits for the background tasks.
    pub(super) async fn shut_down(mut self) {
        let shutdown_grace = self.config.timeouts.shutdown_grace;
        self.background_stop.cancel();
        self.acme = None;
        self.watcher = None;
        self.accepts.close();
        info!(open_sessions = self.tracker.len(), grace = ?shutdown_grace, "shutting down: no new connections");
        self.stop.accepting.cancel();
        self.accepts.wait().await;
        self.drop_socket_copies();
        self.tracker.close();
        self.finish(shutdown_grace).await;
    }

    /// Closes the copies kept for a new process: once no accept loop holds
    /// a socket either, it is closed, and clients are refused at once
    /// instead of waiting in its queue.
    pub(super) fn drop_socket_copies(&mut self) {
        for bound in self.bound.values_mut() {
            bound.socket = None;
        }
        self.control_socket = None;
        self.admin_socket = None;
    }

    /// Gives the open sessions `grace` to end, then ends the rest; waits
    /// for the background tasks.
    pub(super) async fn finish(self, grace: std::time::Duration) {
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = self.tracker.len(),
                "grace period over: closing remaining sessions"
            );
            self.stop.accepting.cancel();
            self.stop.relays.cancel();
            // Every phase watches one of the two tokens or has its own short
            // deadline; this bound only keeps a bug from hanging the exit.
            if tokio::time::timeout(FINAL_WAIT, self.tracker.wait())
                .await
                .is_err()
            {
                warn!(sessions = self.tracker.len(), "sessions still open at exit");
            }
        }
        self.background.close();
        if tokio::time::timeout(FINAL_WAIT, self.background.wait())
            .await
            .is_err()
        {
            warn!("background tasks still running at exit");
        }
        self.answers.close();
        if tokio::time::timeout(ANSWERS_WAIT, self.answers.wait())
            .await
            .is_err()
        {
            debug!("control answers still being written at exit");
        }
        info!(pid = std::process::id(), "stopped");
    }
}
