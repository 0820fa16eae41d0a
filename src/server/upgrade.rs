//! `portcullis upgrade` (and SIGUSR2) on the server's side. The old process
//! starts the new binary, hands it every listening socket
//! ([`crate::ops::handover`]) and waits until it serves; then it stops
//! accepting, stops its ACME tasks, control socket and admin endpoint, tells
//! the new process to start its own, and drains its sessions as a shutdown
//! does. A new process that fails to start, to read its config or to bind
//! is ended and the old one serves on, nothing closed.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::running::Running;
use crate::ops::handover::{self, Offer, Peer, Successor};
use crate::ops::reload::Upgrade;

/// How long a new process may take from its start to serving: reading its
/// config and certificates, binding what was not handed over.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a new process waits for the old one to stop its services
/// before it starts its own anyway.
const GO_WITHIN: Duration = Duration::from_secs(30);
/// Bound on the old process's services (ACME tasks, control socket, admin
/// endpoint) stopping.
const SERVICES_STOP: Duration = Duration::from_secs(10);
/// How long a new process that did not take over gets to end on SIGTERM.
const END_WITHIN: Duration = Duration::from_secs(15);

static OWN_BINARY: OnceLock<Option<PathBuf>> = OnceLock::new();

/// This process's binary, as its path was at start: once a package upgrade
/// has replaced the file, that path runs the new one.
pub(super) fn own_binary() -> Option<PathBuf> {
    OWN_BINARY
        .get_or_init(|| std::env::current_exe().ok())
        .clone()
}

/// A new process that serves on the sockets this one handed it.
pub(super) struct NewProcess {
    pid: u32,
    peer: Peer,
    reply: Option<oneshot::Sender<Result<String, String>>>,
}

impl Running {
    /// Starts a new process and hands it the sockets: `Some` once it serves;
    /// `None` when it did not, said to whoever asked and in the log, with
    /// this process serving on as before.
    pub(super) async fn upgrade(&mut self, ask: Upgrade) -> Option<NewProcess> {
        let Upgrade {
            reason,
            binary,
            reply,
        } = ask;
        info!(trigger = reason, "upgrade: starting a new process");
        match self.launch(binary).await {
            Ok((pid, peer)) => Some(NewProcess { pid, peer, reply }),
            Err(e) => {
                error!(error = %e, "upgrade failed: still serving here, nothing closed");
                if let Some(r) = reply {
                    let _ = r.send(Err(e));
                }
                None
            }
        }
    }

    async fn launch(&self, binary: Option<PathBuf>) -> Result<(u32, Peer), String> {
        let config = self
            .config_file
            .clone()
            .ok_or("this instance was not started from a config file")?;
        let binary = binary
            .or_else(own_binary)
            .ok_or("cannot tell which binary this process runs: give --binary")?;
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
        tokio::task::spawn_blocking(move || start_new(&binary, &config, &sockets))
            .await
            .map_err(|e| format!("upgrade task: {e}"))?
    }

    /// Gives way to `new`: stops accepting (the sockets accept in the new
    /// process), stops the services and tells the new process to start
    /// them, then drains. Sessions already accepted here finish their
    /// handshake or STARTTLS dialogue and relay as usual; those still
    /// before their relay once the handshake timeout is over get their
    /// protocol's goodbye; the rest relay until they end or the grace does.
    pub(super) async fn step_down(mut self, new: NewProcess) {
        let NewProcess { pid, peer, reply } = new;
        let grace = self.config.timeouts.shutdown_grace;
        let open = self.tracker.len();
        info!(
            new_pid = pid,
            open_sessions = open,
            grace = ?grace,
            "upgrade: the new process serves; no new connections here, draining"
        );
        if let Some(r) = reply {
            let _ = r.send(Ok(format!(
                "process {pid} serves now; process {} stopped accepting and drains {open} open session(s), at most {}",
                std::process::id(),
                humantime::format_duration(grace)
            )));
        }
        crate::ops::systemd::main_pid(pid);
        handover::mark_handed_over();
        for bound in self.bound.values() {
            bound.listen.cancel();
        }
        self.accepts.close();
        self.accepts.wait().await;
        self.background_stop.cancel();
        self.acme = None;
        self.watcher = None;
        self.background.close();
        if tokio::time::timeout(SERVICES_STOP, self.background.wait())
            .await
            .is_err()
        {
            warn!("upgrade: background tasks still stopping; the new process starts its own");
        }
        if let Err(e) = peer.send("go", None) {
            warn!(error = %e, "upgrade: cannot tell the new process to start its services; it starts them within 30 s");
        }
        drop(peer);

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
/// until that has stopped its services.
pub(super) async fn take_over(successor: Successor) {
    if let Err(e) = successor.ready() {
        warn!(error = %e, "upgrade: cannot tell the old process this one serves");
    }
    info!("upgrade: serving; waiting for the old process to stop its ACME tasks, control socket and admin endpoint");
    match tokio::task::spawn_blocking(move || successor.wait_go(GO_WITHIN)).await {
        Ok(Ok(())) => info!("upgrade: the old process stepped down; starting the services here"),
        Ok(Err(e)) => warn!(error = %e, "upgrade: starting the services here anyway"),
        Err(e) => warn!(error = %e, "upgrade: starting the services here anyway"),
    }
}

/// Starts `binary` on `config`, hands it `sockets`, and waits until it
/// serves (its pid, and the connection to it) or fails (why; it is ended).
fn start_new(
    binary: &Path,
    config: &Path,
    sockets: &[(String, OwnedFd)],
) -> Result<(u32, Peer), String> {
    let offer = Offer::open().map_err(|e| format!("cannot open the upgrade socket: {e}"))?;
    let mut child = Command::new(binary)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env(handover::ENV, offer.name())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let pid = child.id();
    info!(pid, binary = %binary.display(), "upgrade: new process started");
    let deadline = Instant::now() + READY_WITHIN;
    let outcome = {
        let mut gone = || exited(&mut child);
        offer.accept(pid, deadline, &mut gone).and_then(|peer| {
            handover::send_sockets(&peer, sockets)
                .map_err(|e| format!("cannot hand over the sockets: {e}"))?;
            let (text, _) = peer.recv_until(deadline, &mut gone)?;
            match (text.as_str(), text.strip_prefix("failed ")) {
                ("ready", _) => Ok(peer),
                (_, Some(why)) => Err(why.to_string()),
                _ => Err(format!("unexpected message {text:?}")),
            }
        })
    };
    outcome.map(|peer| (pid, peer)).map_err(|why| {
        end(&mut child);
        format!("new process {pid} ({}): {why}", binary.display())
    })
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
