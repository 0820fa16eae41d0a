//! `portcullis upgrade` (and SIGUSR2) on the server's side. The old process
//! starts the new binary, hands it every listening socket
//! ([`crate::ops::handover`]) and waits, serving on, until it serves too;
//! then it stops accepting, stops its ACME tasks, control socket and admin
//! endpoint, tells the new process to go, and once that one says it took
//! over, drains its sessions as a shutdown does. A new process that fails
//! to start, to read its config or to bind, or that is not ready in time,
//! is told to give up and ended, and the old one serves on, nothing
//! closed; a new process that does not say it took over (it died, or was
//! told to stop) leaves the old one accepting again.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::running::{copy_listener, Running, Services};
use crate::ops::control::{Control, ControlError};
use crate::ops::handover::{self, Offer, Peer, Successor, Word};
use crate::ops::reload::{answer, Upgrade};

/// How long a new process may take from its start to serving: reading its
/// config and certificates, binding what was not handed over.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a new process waits for the old one to stop its services
/// before it starts its own anyway (the old one is stuck).
const GO_WITHIN: Duration = Duration::from_secs(30);
/// Bound on the old process's services (ACME tasks, control socket, admin
/// endpoint) stopping; they stop at their next step, at once in practice.
const SERVICES_STOP: Duration = Duration::from_secs(10);
/// How long a new process has, once told to go, to say it took over.
const STARTED_WITHIN: Duration = Duration::from_secs(10);
/// How long a new process that did not take over gets to end on SIGTERM.
const END_WITHIN: Duration = Duration::from_secs(15);

type Reply = Option<oneshot::Sender<Result<String, String>>>;

static OWN_BINARY: OnceLock<Option<PathBuf>> = OnceLock::new();

/// This process's binary, as its path was given at start: once a package
/// upgrade has replaced the file, or a symlink has been moved to another
/// version, that path runs the new one. A bare name (found in `$PATH`) is
/// taken as the file it resolved to.
pub(super) fn own_binary() -> Option<PathBuf> {
    OWN_BINARY
        .get_or_init(|| {
            let argv0 = std::env::args_os().next().map(PathBuf::from);
            match argv0 {
                Some(p) if p.components().count() > 1 => std::path::absolute(p).ok(),
                _ => std::env::current_exe().ok(),
            }
        })
        .clone()
}

/// A new process on its way up, started by a blocking task. Dropped (the
/// old process is stopping), the task gives up and ends the new process.
pub(super) struct Pending {
    task: JoinHandle<Result<Started, String>>,
    cancel: Arc<AtomicBool>,
    reply: Reply,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

/// A new process that said it serves.
pub(super) struct Started {
    pid: u32,
    version: String,
    link: Link,
    child: Child,
}

/// The connection to a new process: dropped before it took over, it tells
/// that process to give up (`abort`), so a close without it always means
/// this process died.
struct Link(Option<Peer>);

impl Link {
    fn peer(&self) -> Option<&Peer> {
        self.0.as_ref()
    }

    /// The new process took over: close without a word.
    fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(peer) = &self.0 {
            let _ = peer.send("abort", None);
        }
    }
}

/// How an upgrade that got as far as `ready` ended.
pub(super) enum Handover {
    /// The new process took over: drain.
    Done,
    /// It did not: this process accepts again and serves on.
    Resumed,
    /// This process was told to stop meanwhile; the new one gave up.
    Stopping,
}

/// Waits for the upgrade under way, if any (forever when none is).
pub(super) async fn finished(pending: &mut Option<Pending>) -> Result<Started, String> {
    match pending {
        Some(p) => match (&mut p.task).await {
            Ok(outcome) => outcome,
            Err(e) => Err(format!("upgrade task: {e}")),
        },
        None => std::future::pending().await,
    }
}

/// Says why an upgrade did not happen, to whoever asked and in the log.
fn refuse(reply: Reply, why: String) {
    error!(error = %why, "upgrade failed: still serving here, nothing closed");
    answer(reply, Err(format!("{why}; still serving, nothing closed")));
}

impl Running {
    /// Starts a new process for `ask` and hands it the sockets, on a
    /// blocking task; `None` when it could not even start (said already).
    pub(super) fn begin_upgrade(&self, ask: Upgrade) -> Option<Pending> {
        let Upgrade {
            reason,
            binary,
            reply,
        } = ask;
        info!(trigger = reason, "upgrade: starting a new process");
        let prepared = self
            .config_file
            .clone()
            .ok_or_else(|| "this instance was not started from a config file".to_string());
        let prepared = prepared.and_then(|config| {
            let binary = binary
                .or_else(own_binary)
                .ok_or("cannot tell which binary this process runs: give --binary")?;
            Ok((config, binary, self.upgrade_sockets()?))
        });
        let (config, binary, sockets) = match prepared {
            Ok(p) => p,
            Err(why) => {
                refuse(reply, why);
                return None;
            }
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let cancelled = cancel.clone();
        let drained = self.runtime.drained();
        let task = tokio::task::spawn_blocking(move || {
            start_new(&binary, &config, (&sockets, &drained), &cancelled)
        });
        Some(Pending {
            task,
            cancel,
            reply,
        })
    }

    /// Copies of every socket a new process takes over, by key.
    fn upgrade_sockets(&self) -> Result<Vec<(String, OwnedFd)>, String> {
        let copy = |what: &str, fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| format!("cannot copy the {what} socket: {e}"))
        };
        let mut sockets = Vec::new();
        for (key, bound) in &self.bound {
            if let Some(fd) = &bound.socket {
                sockets.push((key.wire(), copy(&bound.listener, fd)?));
            }
        }
        if let Some(fd) = &self.control_socket {
            sockets.push(("control".to_string(), copy("control", fd)?));
        }
        if let Some((key, fd)) = &self.admin_socket {
            sockets.push((key.clone(), copy("admin", fd)?));
        }
        Ok(sockets)
    }

    /// Once the upgrade task ended: gives way to the new process if it
    /// serves, unless `shutdown` fires first.
    pub(super) async fn upgraded<F: Future<Output = ()>>(
        &mut self,
        mut pending: Pending,
        outcome: Result<Started, String>,
        mut shutdown: Pin<&mut F>,
    ) -> Handover {
        let reply = pending.reply.take();
        let Started {
            pid,
            version,
            link,
            child,
        } = match outcome {
            Ok(started) => started,
            Err(why) => {
                refuse(reply, why);
                return Handover::Resumed;
            }
        };
        let open = self.tracker.len();
        info!(
            new_pid = pid,
            version = %version,
            open_sessions = open,
            "upgrade: the new process serves; stopping accepting and the services here"
        );
        for bound in self.bound.values() {
            bound.listen.cancel();
        }
        self.accepts.close();
        self.accepts.wait().await;
        handover::mark_handed_over(true);
        self.background_stop.cancel();
        self.acme = None;
        self.background.close();
        let stopped = tokio::select! {
            done = tokio::time::timeout(SERVICES_STOP, self.background.wait()) => done.is_ok(),
            _ = shutdown.as_mut() => {
                return self.given_up(pid, Some((link, child)), reply, "this process was told to stop", Handover::Stopping);
            }
        };
        if !stopped {
            warn!("upgrade: background tasks still stopping after 10 s; telling the new process to go anyway");
        }
        // Told to go, the new process names itself systemd's main process
        // and answers `started`; nothing else counts.
        if let Some(Err(e)) = link.peer().map(|p| p.send("go", None)) {
            let why = format!("it cannot be told to go: {e}");
            return self.given_up(pid, Some((link, child)), reply, &why, Handover::Resumed);
        }
        let mut child = child;
        let heard = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + STARTED_WITHIN;
            let heard = match link.peer() {
                Some(p) => p.recv_until(deadline, &mut || exited(&mut child)),
                None => Err("no connection".into()),
            };
            (link, child, heard)
        });
        let heard = tokio::select! {
            heard = heard => heard,
            _ = shutdown.as_mut() => {
                // The blocking wait ends within STARTED_WITHIN; the link it
                // holds then tells the new process to give up.
                let why = "this process was told to stop";
                return self.given_up(pid, None, reply, why, Handover::Stopping);
            }
        };
        let (link, child, heard) = match heard {
            Ok(heard) => heard,
            Err(e) => {
                // The task panicked: link and child went with it (the link
                // said abort as it dropped).
                let why = format!("upgrade task: {e}");
                return self.given_up(pid, None, reply, &why, Handover::Resumed);
            }
        };
        match heard {
            Ok((text, _)) if text == "started" => {}
            Ok((text, _)) => {
                let why = text.strip_prefix("failed ").unwrap_or(&text).to_string();
                return self.given_up(pid, Some((link, child)), reply, &why, Handover::Resumed);
            }
            Err(why) => {
                return self.given_up(pid, Some((link, child)), reply, &why, Handover::Resumed)
            }
        }
        link.done();
        reap(child);
        self.watcher = None;
        // The new process holds every socket now; the ones it did not take
        // (gone from the config) close here.
        self.drop_socket_copies();
        let grace = self.config.timeouts.shutdown_grace;
        info!(
            new_pid = pid,
            open_sessions = self.tracker.len(),
            grace = ?grace,
            "upgrade: the new process took over; draining here"
        );
        answer(reply, Ok(format!(
            "process {pid} (portcullis {version}) serves now; process {} stopped accepting and drains {open} open session(s), at most {}",
            std::process::id(),
            humantime::format_duration(grace)
        )));
        Handover::Done
    }

    /// New process `pid` did not take over (`why`): it is told to give up
    /// and ended (unless a task holding its link and child does that),
    /// systemd hears this process is the main one again, and unless this
    /// process is stopping it accepts again.
    fn given_up(
        &mut self,
        pid: u32,
        new: Option<(Link, Child)>,
        reply: Reply,
        why: &str,
        how: Handover,
    ) -> Handover {
        if let Some((link, mut child)) = new {
            drop(link);
            let ended = std::thread::Builder::new()
                .name("upgrade-end".into())
                .spawn(move || end(&mut child));
            if let Err(e) = ended {
                warn!(error = %e, pid, "cannot wait for the new process to end");
            }
        }
        crate::ops::systemd::main_pid(std::process::id());
        let resumed = matches!(how, Handover::Resumed);
        let again = if resumed {
            error!(new_pid = pid, reason = %why, "upgrade failed: the new process did not take over; accepting here again");
            self.resume();
            "; this one accepts again"
        } else {
            error!(new_pid = pid, reason = %why, "upgrade given up: stopping");
            ""
        };
        answer(
            reply,
            Err(format!(
                "new process {pid} did not take over ({why}){again}"
            )),
        );
        how
    }

    /// Accepts again on the copies of the sockets and starts the services
    /// again: the new process died before it took over.
    fn resume(&mut self) {
        handover::mark_handed_over(false);
        self.background_stop = tokio_util::sync::CancellationToken::new();
        self.background.reopen();
        self.accepts.reopen();
        for (key, bound) in std::mem::take(&mut self.bound) {
            let socket = bound.socket.as_ref().map(copy_listener);
            let relays = Some(bound.relays);
            match socket {
                Some(Ok(socket)) => {
                    self.start_accepting(key, bound.listener, bound.ctx, socket, relays)
                }
                failed => {
                    let why = match failed {
                        Some(Err(e)) => e.to_string(),
                        _ => "no copy of it".into(),
                    };
                    error!(listener = %bound.listener, addr = ?bound.local, error = %why, "cannot accept on this address again: restart portcullis");
                    if let Some(addr) = bound.local {
                        self.metrics.accepting(&bound.listener, addr, false);
                    }
                }
            }
        }
        let control = self.control_socket.as_ref().and_then(|fd| {
            let socket = fd
                .try_clone()
                .map(std::os::unix::net::UnixListener::from)
                .map_err(|e| ControlError::Io {
                    path: self.config.state_dir.clone(),
                    source: e,
                })
                .and_then(|s| Control::inherited(s, &self.config.state_dir));
            match socket {
                Ok(Some(control)) => Some(control),
                Ok(None) => None,
                Err(e) => {
                    error!(error = %e, "cannot serve the control socket again; binding it anew");
                    None
                }
            }
        });
        // A control socket not served here is bound again by the next
        // state_dir probe.
        self.control_serving = control.is_some();
        let admin = self
            .admin_socket
            .as_ref()
            .and_then(|(_, fd)| copy_listener(fd).ok());
        self.start_services(Services {
            pending_acme: Vec::new(),
            control,
            admin,
        });
    }

    /// The drain after a new process took over. Sessions accepted here
    /// finish their handshake or STARTTLS dialogue and relay as usual;
    /// those still before their relay once the handshake timeout is over
    /// get their protocol's goodbye; the rest relay until they end or the
    /// grace does.
    pub(super) async fn drain_after_upgrade(self) {
        let grace = self.config.timeouts.shutdown_grace;
        let began = tokio::time::Instant::now();
        self.tracker.close();
        let settle = self.config.timeouts.handshake.min(grace);
        if tokio::time::timeout(settle, self.tracker.wait())
            .await
            .is_err()
        {
            self.stop.accepting.cancel();
        }
        self.finish(grace.saturating_sub(began.elapsed())).await;
    }
}

/// In the new process, once it accepts: says so to the old one and waits
/// for its word; once told to go (or when the old one is gone, or stuck),
/// names itself systemd's main process and says it took over. `false`:
/// the old one serves on, or `stop` fired; this process must drain and
/// exit without starting anything.
pub(super) async fn take_over(successor: Successor, stop: Arc<AtomicBool>) -> bool {
    if let Err(e) = successor.ready() {
        warn!(error = %e, "upgrade: cannot tell the old process this one serves; it serves on, so this one ends");
        return false;
    }
    info!("upgrade: serving; waiting for the old process to stop its ACME tasks, control socket and admin endpoint");
    let waited = tokio::task::spawn_blocking(move || {
        let word = successor.wait_go(GO_WITHIN, &stop);
        (successor, word)
    })
    .await;
    let Ok((successor, word)) = waited else {
        warn!("upgrade: the wait for the old process failed; this one ends");
        return false;
    };
    match &word {
        Word::Go => info!("upgrade: the old process stepped down; taking over"),
        Word::Gone => warn!("upgrade: the old process ended without a word; taking over"),
        Word::Silent => {
            warn!("upgrade: no word from the old process within 30 s; taking over anyway")
        }
        Word::Abandoned(why) => {
            warn!(reason = %why, "upgrade: not taking over; draining what this one accepted, then exiting");
            return false;
        }
    }
    crate::ops::systemd::main_pid(std::process::id());
    if let Err(e) = successor.started() {
        if word != Word::Gone {
            warn!(error = %e, "upgrade: cannot tell the old process; taking over anyway");
        }
    }
    true
}

/// Starts `binary` on `config`, hands it `sockets`, and waits until it
/// serves, or fails (why; it is told so and ended), or `cancel` is set.
fn start_new(
    binary: &Path,
    config: &Path,
    (sockets, drained): (&[(String, OwnedFd)], &[String]),
    cancel: &AtomicBool,
) -> Result<Started, String> {
    let offer = Offer::open().map_err(|e| format!("cannot open the upgrade socket: {e}"))?;
    let mut child = Command::new(binary)
        .arg("run")
        .arg("--config")
        .arg(config)
        .envs(offer.env())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let pid = child.id();
    info!(pid, binary = %binary.display(), "upgrade: new process started");
    let deadline = Instant::now() + READY_WITHIN;
    let outcome = {
        let mut gone = || {
            if cancel.load(Ordering::SeqCst) {
                return Some("this process is stopping".to_string());
            }
            exited(&mut child)
        };
        converse(&offer, sockets, drained, deadline, &mut gone)
    };
    match outcome {
        Ok((peer, version)) => Ok(Started {
            pid,
            version,
            link: Link(Some(peer)),
            child,
        }),
        Err(why) => {
            end(&mut child);
            Err(format!("new process {pid} ({}): {why}", binary.display()))
        }
    }
}

/// The exchange up to `ready`: the peer and the new process's version. On
/// any failure after it connected, it is told to give up (`abort`).
fn converse(
    offer: &Offer,
    sockets: &[(String, OwnedFd)],
    drained: &[String],
    deadline: Instant,
    gone: &mut dyn FnMut() -> Option<String>,
) -> Result<(Peer, String), String> {
    let peer = offer.accept(deadline, gone)?;
    let answer = handover::send_sockets(&peer, sockets, drained)
        .map_err(|e| format!("cannot hand over the sockets: {e}"))
        .and_then(|()| peer.recv_until(deadline, gone));
    let why = match answer {
        Ok((text, _)) => match (text.strip_prefix("ready"), text.strip_prefix("failed ")) {
            (Some(version), _) => return Ok((peer, version.trim().to_string())),
            (_, Some(why)) => return Err(why.to_string()),
            _ => format!("unexpected message {text:?}"),
        },
        Err(e) if Instant::now() > deadline => {
            format!("{e}: not ready within {}s", READY_WITHIN.as_secs())
        }
        Err(e) => e,
    };
    let _ = peer.send("abort", None);
    Err(why)
}

/// Why `child` is gone, if it is.
fn exited(child: &mut Child) -> Option<String> {
    match child.try_wait() {
        Ok(Some(status)) => Some(format!("exited ({status}) before it was ready")),
        _ => None,
    }
}

/// Ends a new process that did not take over, and reaps it: SIGTERM first
/// (it drains anything it accepted), SIGKILL after [`END_WITHIN`].
fn end(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + END_WITHIN;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reaps the new process whenever it ends while this one still runs, so
/// that it does not linger as a zombie (chained upgrades, a stop).
fn reap(mut child: Child) {
    let spawned = std::thread::Builder::new()
        .name("upgrade-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot watch the new process; it is reaped when this one exits");
    }
}
