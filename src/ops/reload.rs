//! Live reconfiguration: what asks for a reload (SIGHUP, `portcullis
//! reload`, a changed config or certificate file). What a reload changed is
//! [`crate::config::diff`]'s to say.
//!
//! The reload itself is [`crate::server`]'s: read, parse, validate (the same
//! code as `portcullis check`), build the whole new snapshot, then swap. This
//! module only carries requests to it and watches files.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::diff::Changes;

/// Events closer together than this are one change (an editor's write,
/// rename and chmod; certbot's four symlink flips).
const DEBOUNCE: Duration = Duration::from_millis(300);

/// One reload asked for.
#[derive(Debug)]
pub struct Request {
    /// `SIGHUP`, `portcullis reload`, `file change`.
    pub reason: &'static str,
    pub reply: Option<oneshot::Sender<Result<Changes, String>>>,
}

/// One binary upgrade asked for (`portcullis upgrade`, SIGUSR2): start
/// `binary` (this process's own when `None`), hand it the sockets, drain.
#[derive(Debug)]
pub struct Upgrade {
    /// `SIGUSR2`, `portcullis upgrade`.
    pub reason: &'static str,
    pub binary: Option<PathBuf>,
    /// What happened, in words: the new process's pid, or why not.
    pub reply: Option<oneshot::Sender<Result<String, String>>>,
}

/// What the running server is asked to do between serving.
#[derive(Debug)]
pub enum Ask {
    Reload(Request),
    Upgrade(Upgrade),
}

/// Asks the running server to reload (or upgrade); cheap to clone.
#[derive(Clone, Debug)]
pub struct Reloader(pub(crate) mpsc::Sender<Ask>);

/// Why a request got no outcome: the process stopped taking them.
const GONE: &str = "this process is stopping, or has handed over to a new one: ask again";

/// Sends `outcome` to whoever asked, if anyone waits for it.
pub fn answer<T>(reply: Option<oneshot::Sender<Result<T, String>>>, outcome: Result<T, String>) {
    if let Some(reply) = reply {
        let _ = reply.send(outcome);
    }
}

impl Reloader {
    /// Reloads and waits for the outcome.
    pub async fn reload(&self, reason: &'static str) -> Result<Changes, String> {
        let (tx, rx) = oneshot::channel();
        let request = Request {
            reason,
            reply: Some(tx),
        };
        self.ask(Ask::Reload(request), rx).await
    }

    /// Upgrades to `binary` and waits for the outcome.
    pub async fn upgrade(&self, binary: Option<PathBuf>) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        let request = Upgrade {
            reason: "portcullis upgrade",
            binary,
            reply: Some(tx),
        };
        self.ask(Ask::Upgrade(request), rx).await
    }

    async fn ask<T>(
        &self,
        ask: Ask,
        outcome: oneshot::Receiver<Result<T, String>>,
    ) -> Result<T, String> {
        if self.0.send(ask).await.is_err() {
            return Err(GONE.into());
        }
        outcome.await.unwrap_or_else(|_| Err(GONE.into()))
    }

    /// Asks for an upgrade to this process's own binary without waiting
    /// (a signal handler); the outcome is logged.
    pub fn trigger_upgrade(&self, reason: &'static str) {
        let request = Upgrade {
            reason,
            binary: None,
            reply: None,
        };
        if self.0.try_send(Ask::Upgrade(request)).is_err() {
            warn!(
                trigger = reason,
                "upgrade not started: the server is busy or stopping; try again"
            );
        }
    }

    /// Asks for a reload without waiting (a signal handler, a file watcher).
    pub fn trigger(&self, reason: &'static str) {
        let request = Request {
            reason,
            reply: None,
        };
        // A full queue already holds a reload that will read the same files.
        let _ = self.0.try_send(Ask::Reload(request));
    }
}

/// Watches the directories of the files a reload reads and triggers a
/// reload, debounced, when anything in them changes. Directories, not files:
/// editors and config management replace files by rename, certbot flips
/// symlinks, and a watch on the old file would see none of that.
pub struct Watcher {
    inner: notify::RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
    /// The files (and their link targets) whose change means a reload; a
    /// log file or anything else in the same directory does not.
    files: std::sync::Arc<std::sync::Mutex<HashSet<PathBuf>>>,
}

/// Whether an event on `path` concerns one of `files`: the file itself, its
/// link target, or a Kubernetes-style `..data` link flip beside it.
fn concerns(files: &HashSet<PathBuf>, path: &Path) -> bool {
    files.contains(path)
        || path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".."))
            && files.iter().any(|f| f.parent() == path.parent())
}

impl Watcher {
    pub fn start(reloader: Reloader) -> notify::Result<Watcher> {
        let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
        let files = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
        let wanted = files.clone();
        let inner =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                // Opens and reads are not changes; a close after writing is.
                Ok(e)
                    if e.kind.is_access()
                        && !matches!(
                            e.kind,
                            notify::EventKind::Access(notify::event::AccessKind::Close(
                                notify::event::AccessMode::Write
                            ))
                        ) => {}
                Ok(e) => {
                    let wanted = wanted
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    for p in e.paths.into_iter().filter(|p| concerns(&wanted, p)) {
                        let _ = tx.send(p);
                    }
                }
                Err(e) => warn!(error = %e, "file watch error"),
            })?;
        tokio::spawn(async move {
            while let Some(path) = rx.recv().await {
                // Quiet for DEBOUNCE: then read everything once.
                while let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                info!(path = %path.display(), "watched file changed");
                reloader.trigger("file change");
            }
        });
        Ok(Watcher {
            inner,
            dirs: BTreeSet::new(),
            files,
        })
    }

    /// Watches the directories of `files`, and of what they link to.
    pub fn watch(&mut self, files: &[PathBuf]) {
        // Hashed, not ordered: 10,000 hosts are 20,000 files, and ordering
        // paths compares them component by component.
        let mut dirs = BTreeSet::new();
        let mut wanted = HashSet::with_capacity(files.len() * 2);
        for f in files {
            // One lstat for a plain file; the full resolution only for a
            // link (certbot's live/ into archive/, a Kubernetes ..data).
            let is_link = std::fs::symlink_metadata(f).is_ok_and(|m| m.file_type().is_symlink());
            let target = is_link.then(|| std::fs::canonicalize(f).ok()).flatten();
            for p in std::iter::once(f.clone()).chain(target) {
                if let Some(d) = p.parent() {
                    dirs.insert(d.to_path_buf());
                }
                wanted.insert(p);
            }
        }
        *self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = wanted;
        for gone in self.dirs.difference(&dirs) {
            let _ = self.inner.unwatch(gone);
        }
        for new in dirs.difference(&self.dirs) {
            if let Err(e) = self.inner.watch(new, RecursiveMode::NonRecursive) {
                warn!(dir = %new.display(), error = %e, "cannot watch for changes; SIGHUP still reloads");
            }
        }
        self.dirs = dirs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_on_watched_files_count() {
        let files: HashSet<PathBuf> = [
            "/etc/p/portcullis.yaml",
            "/etc/tls/tls.crt",
            "/etc/le/archive/x/fullchain3.pem",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert!(concerns(&files, Path::new("/etc/p/portcullis.yaml")));
        assert!(concerns(
            &files,
            Path::new("/etc/le/archive/x/fullchain3.pem")
        ));
        assert!(
            concerns(&files, Path::new("/etc/tls/..data")),
            "Kubernetes secret flip"
        );
        assert!(!concerns(&files, Path::new("/etc/p/portcullis.log")));
        assert!(!concerns(&files, Path::new("/etc/p/.portcullis.yaml.swp")));
        assert!(!concerns(&files, Path::new("/var/..data")));
    }
}
