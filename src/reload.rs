//! Live reconfiguration: what asks for a reload (SIGHUP, `portcullis
//! reload`, a changed config or certificate file), and how a reload is
//! described in the log.
//!
//! The reload itself is [`crate::server`]'s: read, parse, validate (the same
//! code as `portcullis check`), build the whole new snapshot, then swap. This
//! module only carries requests to it and watches files.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{Backend, Config, Listener};

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

/// Asks the running server to reload; cheap to clone.
#[derive(Clone, Debug)]
pub struct Reloader(pub(crate) mpsc::Sender<Request>);

impl Reloader {
    /// Reloads and waits for the outcome.
    pub async fn reload(&self, reason: &'static str) -> Result<Changes, String> {
        let (tx, rx) = oneshot::channel();
        let request = Request {
            reason,
            reply: Some(tx),
        };
        if self.0.send(request).await.is_err() {
            return Err("the server has stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the server has stopped".into()))
    }

    /// Asks for a reload without waiting (a signal handler, a file watcher).
    pub fn trigger(&self, reason: &'static str) {
        let request = Request {
            reason,
            reply: None,
        };
        // A full queue already holds a reload that will read the same files.
        let _ = self.0.try_send(request);
    }
}

/// What a reload changed, for its log line and for `portcullis reload`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub hosts_added: Vec<String>,
    pub hosts_removed: Vec<String>,
    /// `host/listener`.
    pub backends_moved: Vec<String>,
    pub certificates_replaced: Vec<String>,
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    pub listeners_changed: Vec<String>,
    /// `default_host`, `unknown_sni`, `acme`, `timeouts`: in effect at once.
    pub settings_changed: Vec<String>,
    /// Settings read only at start.
    pub need_restart: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("nothing changed");
        }
        let parts = [
            ("hosts added", &self.hosts_added),
            ("hosts removed", &self.hosts_removed),
            ("backends moved", &self.backends_moved),
            ("certificates replaced", &self.certificates_replaced),
            ("listeners added", &self.listeners_added),
            ("listeners removed", &self.listeners_removed),
            ("listeners changed", &self.listeners_changed),
            ("settings changed", &self.settings_changed),
            ("needs a restart to apply", &self.need_restart),
        ];
        let mut first = true;
        for (label, items) in parts.iter().filter(|(_, items)| !items.is_empty()) {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{label}: {}", items.join(", "))?;
        }
        Ok(())
    }
}

/// The difference between two configs, certificates aside (the server adds
/// those: only it knows what each host served).
pub fn diff(old: &Config, new: &Config) -> Changes {
    let hosts = |c: &Config| -> BTreeMap<String, BTreeMap<String, Backend>> {
        c.hosts
            .iter()
            .map(|h| (host_key(&h.names), h.backends.clone()))
            .collect()
    };
    let (old_hosts, new_hosts) = (hosts(old), hosts(new));
    let mut changes = Changes {
        hosts_added: added(&old_hosts, &new_hosts),
        hosts_removed: added(&new_hosts, &old_hosts),
        ..Changes::default()
    };
    for (host, backends) in &new_hosts {
        let Some(before) = old_hosts.get(host) else {
            continue;
        };
        let listeners: BTreeSet<&String> = backends.keys().chain(before.keys()).collect();
        for l in listeners {
            if backends.get(l) != before.get(l) {
                let to = backends
                    .get(l)
                    .map_or("none".to_string(), |b| b.address.to_string());
                changes.backends_moved.push(format!("{host}/{l} → {to}"));
            }
        }
    }
    let listeners = |c: &Config| -> BTreeMap<String, Listener> { c.listeners.clone() };
    let (old_l, new_l) = (listeners(old), listeners(new));
    changes.listeners_added = added(&old_l, &new_l);
    changes.listeners_removed = added(&new_l, &old_l);
    changes.listeners_changed = new_l
        .iter()
        .filter(|(name, l)| old_l.get(*name).is_some_and(|o| o != *l))
        .map(|(name, _)| name.clone())
        .collect();
    for (what, differs) in [
        ("timeouts", old.timeouts != new.timeouts),
        ("default_host", old.default_host != new.default_host),
        ("unknown_sni", old.unknown_sni != new.unknown_sni),
        ("acme", old.acme != new.acme),
        ("notify", old.notify != new.notify),
    ] {
        if differs {
            changes.settings_changed.push(what.to_string());
        }
    }
    for (what, differs) in [
        ("state_dir", old.state_dir != new.state_dir),
        (
            "max_connections",
            old.max_connections != new.max_connections,
        ),
        ("log", old.log != new.log),
        ("admin", old.admin != new.admin),
    ] {
        if differs {
            changes.need_restart.push(what.to_string());
        }
    }
    changes
}

/// A host as the log names it: its names, comma-joined.
pub fn host_key(names: &[crate::names::HostPattern]) -> String {
    crate::names::to_strings(names).join(",")
}

fn added<V>(old: &BTreeMap<String, V>, new: &BTreeMap<String, V>) -> Vec<String> {
    new.keys()
        .filter(|k| !old.contains_key(*k))
        .cloned()
        .collect()
}

/// The files a reload reads: the config and every `{ cert, key }` file.
pub fn watched_files(config_file: &Path, config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config_file.to_path_buf()];
    for h in &config.hosts {
        if let crate::config::CertSource::Files { cert, key } = &h.certificate {
            files.push(cert.clone());
            files.push(key.clone());
        }
    }
    files
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

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/portcullis")).unwrap()
    }

    const BASE: &str = r#"
listeners:
  imaps: { bind: "127.0.0.1:10993", protocol: imap, tls: implicit }
  pop3s: { bind: "127.0.0.1:10995", protocol: pop3, tls: implicit }
backends: { imaps: 127.0.0.1:20143, pop3s: 127.0.0.1:20110 }
hosts:
  - names: [mail.example.test]
    certificate: self-signed
  - names: [old.example.test]
    certificate: self-signed
"#;

    #[test]
    fn changes_name_what_moved() {
        let old = parse(BASE);
        assert!(diff(&old, &old).is_empty());
        assert_eq!(diff(&old, &old).to_string(), "nothing changed");
        let new = parse(
            &BASE
                .replace("old.example.test", "new.example.test")
                .replace("pop3s: { bind", "pop3: { bind")
                .replace("10995\", protocol: pop3, tls: implicit", "10110\", protocol: pop3, tls: starttls")
                .replace("pop3s: 127.0.0.1:20110", "pop3: 127.0.0.1:20110")
                .replace(
                    "  - names: [mail.example.test]\n    certificate: self-signed\n",
                    "  - names: [mail.example.test]\n    certificate: self-signed\n    backends: { imaps: 127.0.0.1:20144 }\n",
                )
                .replace("hosts:", "max_connections: 10\nunknown_sni: reject\nhosts:"),
        );
        let c = diff(&old, &new);
        assert_eq!(c.hosts_added, ["new.example.test"]);
        assert_eq!(c.hosts_removed, ["old.example.test"]);
        assert!(
            c.backends_moved
                .contains(&"mail.example.test/imaps → 127.0.0.1:20144".to_string()),
            "{c:?}"
        );
        assert!(
            c.backends_moved
                .contains(&"mail.example.test/pop3 → 127.0.0.1:20110".to_string()),
            "{c:?}"
        );
        assert_eq!(c.listeners_added, ["pop3"]);
        assert_eq!(c.listeners_removed, ["pop3s"]);
        assert_eq!(c.need_restart, ["max_connections"]);
        assert_eq!(c.settings_changed, ["unknown_sni"]);
        let text = c.to_string();
        assert!(
            text.starts_with(
                "hosts added: new.example.test; hosts removed: old.example.test; backends moved: "
            ),
            "{text}"
        );
        assert!(
            text.ends_with("needs a restart to apply: max_connections"),
            "{text}"
        );
    }
}
