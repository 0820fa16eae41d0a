//! The control socket: `state_dir/control.sock`, owner-only (the socket is
//! 0600 inside the 0700 `state_dir`), so only the account portcullis runs as
//! (and root) can ask it anything. One JSON request line in, one JSON answer
//! out, then close. `portcullis certs`, `renew` and `reload` use it, and
//! the runtime view: `status`, `sessions`, `drain` and `enable`
//! ([`super::status`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::reload::Reloader;
use super::status::{self, SessionsReport, StatusReport};
use super::{View, Views};
use crate::acme::{self, HostHandle, Outcome};
use crate::cluster::Cluster;
use crate::config::{names, CertSource, Config};
use crate::proxy::runtime::Runtime;
use crate::tls::certs::{self, LoadedCert};

const SOCKET: &str = "control.sock";
/// A request line is small; anything longer is not ours.
const REQUEST_LIMIT: u64 = 4096;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A renewal is an ACME order: seconds normally, minutes at worst.
pub const RENEW_TIMEOUT: Duration = Duration::from_secs(10 * 60);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Certs,
    Renew {
        force: bool,
        name: Option<String>,
        /// Order from `acme.staging` and keep nothing.
        #[serde(default)]
        dry_run: bool,
    },
    Reload,
    /// The cluster store as this node sees it.
    Cluster,
    /// Listeners, backends and a certificates summary.
    Status,
    /// The live sessions, of one listener or all.
    Sessions {
        listener: Option<String>,
    },
    /// Takes a listener (by name) or a backend (by `address:port`) out of
    /// service until `Enable`; open sessions continue.
    Drain {
        name: String,
    },
    Enable {
        name: String,
    },
    /// Starts `binary` (the running one's own when `None`), hands it every
    /// listening socket, and drains this process.
    Upgrade {
        binary: Option<PathBuf>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Certs(Vec<CertRow>),
    Renew(Vec<RenewRow>),
    /// What the reload changed, as the log line says it.
    Reload(String),
    Cluster(ClusterRow),
    Status(StatusReport),
    Sessions(SessionsReport),
    /// What a drain or enable did, in words.
    Switched(String),
    /// Which process serves now, in words.
    Upgraded(String),
    Error(String),
}

/// One host in `portcullis certs`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRow {
    pub names: Vec<String>,
    /// files, self-signed, acme, placeholder (acme, nothing issued yet).
    pub source: String,
    /// The served certificate's key: `ecdsa-p256`, `rsa-2048`, … (a host
    /// with two key types has a row for each).
    #[serde(default)]
    pub key_type: String,
    pub issuer: String,
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
    /// RFC 3339; `None` for certificates portcullis does not renew, or when
    /// no instance is running.
    pub next_renewal: Option<String>,
    pub last_error: Option<String>,
    /// In a cluster: the node holding the host's order lock, if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_by: Option<String>,
    /// `key: rollover`: where the host is in the cycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The chain and key files served (as certbot's `certificates` shows
    /// them); `None` for a certificate in memory only (a placeholder, or an
    /// issued one that could not be stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_path: Option<PathBuf>,
}

/// The cluster store in `portcullis certs`: this node's view of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRow {
    /// This node.
    pub node: String,
    pub endpoints: Vec<String>,
    /// RFC 3339; `None` while the store answers.
    pub down_since: Option<String>,
    pub last_error: Option<String>,
    /// RFC 3339: when this node last read the whole store.
    pub last_sync: Option<String>,
    /// Every node that ever synced, by name.
    pub nodes: Vec<NodeRow>,
}

/// A node of the cluster and when it last synced (RFC 3339, its clock).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRow {
    pub node: String,
    pub synced_at: String,
}

/// One host in `portcullis renew`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRow {
    pub host: String,
    /// renewed, not_due or failed.
    pub outcome: String,
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another portcullis is running with this state_dir ({} answers)", .0.display())]
    Running(PathBuf),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// The bound control socket.
#[derive(Debug)]
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
}

impl Control {
    /// Binds `state_dir/control.sock`, replacing a stale one; refuses when
    /// another instance still answers on it. Inside a tokio runtime.
    pub fn bind(state_dir: &Path) -> Result<Control, ControlError> {
        let path = socket_path(state_dir);
        let io_err = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(ControlError::Running(path));
            }
            std::fs::remove_file(&path).map_err(io_err)?;
        }
        let listener = UnixListener::bind(&path).map_err(io_err)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        Ok(Control { listener, path })
    }

    /// The control socket the process this one replaces was serving
    /// ([`super::handover`]), when it is `state_dir`'s; `None` when it is
    /// another's (the config moved `state_dir`).
    pub fn inherited(
        socket: std::os::unix::net::UnixListener,
        state_dir: &Path,
    ) -> Result<Option<Control>, ControlError> {
        let path = socket_path(state_dir);
        let io_err = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        let bound = socket.local_addr().map_err(io_err)?;
        // The same file, however the config spells state_dir.
        let same = |a: &Path| std::fs::canonicalize(a).ok();
        if bound
            .as_pathname()
            .and_then(same)
            .is_none_or(|b| Some(b) != same(&path))
        {
            return Ok(None);
        }
        socket.set_nonblocking(true).map_err(io_err)?;
        let listener = UnixListener::from_std(socket).map_err(io_err)?;
        Ok(Some(Control { listener, path }))
    }

    /// A copy of the listening socket, to hand to a new process.
    pub fn socket(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.listener.as_fd().try_clone_to_owned()
    }

    /// Answers requests until `stop` fires, then removes the socket file
    /// (unless a new process serves it now, [`super::handover`]).
    /// `views` is swapped on reload; `reloader` is `None` when the server
    /// has no config file to reload from.
    pub async fn serve(
        self,
        views: Views,
        runtime: Arc<Runtime>,
        cluster: Option<Arc<Cluster>>,
        reloader: Option<Reloader>,
        stop: CancellationToken,
        answers: TaskTracker,
    ) {
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = stop.cancelled() => break,
            };
            match accepted {
                Ok((stream, _)) => {
                    let views = views.load_full();
                    let runtime = runtime.clone();
                    let reloader = reloader.clone();
                    let cluster = cluster.clone();
                    let stop = stop.clone();
                    answers.spawn(async move {
                        let served = Served {
                            views: &views,
                            runtime: &runtime,
                            cluster: cluster.as_deref(),
                            reloader: reloader.as_ref(),
                        };
                        answer(stream, served, &stop).await;
                    });
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if !super::handover::handed_over() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What the control socket answers from.
#[derive(Clone, Copy)]
struct Served<'a> {
    views: &'a [View],
    runtime: &'a Runtime,
    cluster: Option<&'a Cluster>,
    reloader: Option<&'a Reloader>,
}

/// Reads one request and answers it. `stop` ends the wait for the request,
/// and for the outcome of anything but an upgrade: that one ends as the
/// process hands over, and its answer must still reach the operator (the
/// caller waits for `answers` before the process exits).
async fn answer(stream: UnixStream, served: Served<'_>, stop: &CancellationToken) {
    let (read, mut write) = stream.into_split();
    let read = async {
        let mut line = String::new();
        let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, REQUEST_LIMIT));
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
            Ok(Ok(_)) => Some(serde_json::from_str::<Request>(&line)),
            _ => None,
        }
    };
    let stopped = || {
        Response::Error(
            "this process is stopping, or has handed over to a new one: ask again".into(),
        )
    };
    let request = tokio::select! {
        r = read => r,
        _ = stop.cancelled() => None,
    };
    let response = match request {
        None if stop.is_cancelled() => stopped(),
        None => return,
        Some(Err(e)) => Response::Error(format!("bad request: {e}")),
        Some(Ok(request @ Request::Upgrade { .. })) => {
            debug!(?request, "control request");
            handle(request, served).await
        }
        Some(Ok(request)) => {
            debug!(?request, "control request");
            tokio::select! {
                r = handle(request, served) => r,
                _ = stop.cancelled() => stopped(),
            }
        }
    };
    if let Ok(mut json) = serde_json::to_vec(&response) {
        json.push(b'\n');
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(&json)).await;
    }
}

async fn handle(request: Request, served: Served<'_>) -> Response {
    let Served {
        views,
        runtime,
        cluster,
        reloader,
    } = served;
    match request {
        Request::Status => Response::Status(status::status(runtime, views)),
        Request::Sessions { listener } => match status::sessions(runtime, listener.as_deref()) {
            Ok(r) => Response::Sessions(r),
            Err(e) => Response::Error(e),
        },
        Request::Drain { name } => switched(status::switch(runtime, &name, true)),
        Request::Enable { name } => switched(status::switch(runtime, &name, false)),
        Request::Cluster => match cluster {
            Some(c) => Response::Cluster(cluster_row(c)),
            None => Response::Error("no cluster store is configured (store: etcd)".into()),
        },
        Request::Reload => match reloader {
            Some(r) => match r.reload("portcullis reload").await {
                Ok(changes) => Response::Reload(changes.to_string()),
                Err(e) => Response::Error(format!(
                    "reload failed, still serving the previous configuration: {e}"
                )),
            },
            None => Response::Error("this instance was not started from a config file".into()),
        },
        Request::Upgrade { binary } => match reloader {
            Some(r) => match r.upgrade(binary).await {
                Ok(words) => Response::Upgraded(words),
                Err(e) => Response::Error(format!("upgrade failed: {e}")),
            },
            None => Response::Error("this instance was not started from a config file".into()),
        },
        Request::Certs => {
            let mut rows: Vec<CertRow> = views.iter().map(row).collect();
            if let Some(c) = cluster {
                let mirror = c.mirror();
                for r in &mut rows {
                    let first = r.names.first().map_or("", String::as_str);
                    r.locked_by = mirror.locks.get(first).cloned();
                }
            }
            Response::Certs(rows)
        }
        Request::Renew {
            force,
            name,
            dry_run,
        } => {
            let targets: Vec<&HostHandle> = views
                .iter()
                .filter(|v| name.as_ref().is_none_or(|n| v.names.contains(n)))
                .filter_map(|v| v.acme.as_ref())
                .collect();
            if targets.is_empty() {
                return Response::Error(match name {
                    Some(n) => format!("no host with certificate: acme is named {n}"),
                    None => "no host has certificate: acme".into(),
                });
            }
            info!(force, dry_run, hosts = targets.len(), "renewal requested");
            // One task per host, so renewals run side by side.
            let tasks: Vec<_> = targets
                .into_iter()
                .map(|h| {
                    let h = h.clone();
                    tokio::spawn(async move {
                        let outcome = tokio::time::timeout(RENEW_TIMEOUT, h.renew(force, dry_run))
                            .await
                            .unwrap_or_else(|_| Outcome::Failed("timed out".into()));
                        renew_row(&h.id, outcome)
                    })
                })
                .collect();
            let mut rows = Vec::new();
            for t in tasks {
                if let Ok(row) = t.await {
                    rows.push(row);
                }
            }
            Response::Renew(rows)
        }
    }
}

fn switched(done: Result<String, String>) -> Response {
    match done {
        Ok(words) => Response::Switched(words),
        Err(e) => Response::Error(e),
    }
}

fn renew_row(host: &str, outcome: Outcome) -> RenewRow {
    let (outcome, detail) = match outcome {
        Outcome::Renewed { serial, not_after } => (
            "renewed",
            format!("serial {serial}, not after {}", rfc3339(not_after)),
        ),
        Outcome::NotDue { at } => (
            "not_due",
            format!(
                "renews at {} (--force renews now)",
                humantime::format_rfc3339_seconds(at)
            ),
        ),
        Outcome::Failed(e) => ("failed", e),
        Outcome::Elsewhere { node } => (
            "elsewhere",
            format!("node {node} holds the order lock and orders it; this node takes the certificate when it is written"),
        ),
        Outcome::Adopted {
            serial,
            not_after,
            node,
        } => (
            "renewed",
            format!(
                "serial {serial}, not after {}, ordered by node {node}",
                rfc3339(not_after)
            ),
        ),
        Outcome::DryRun { serial, directory } => (
            "dry_run",
            format!("{directory} issued serial {serial}; not served, not stored"),
        ),
    };
    RenewRow {
        host: host.to_string(),
        outcome: outcome.into(),
        detail,
    }
}

pub fn row(view: &View) -> CertRow {
    let served = view.slot.load();
    let status = view.acme.as_ref().map(HostHandle::status);
    CertRow {
        names: view.names.clone(),
        source: served.source.as_str().into(),
        // An ACME lineage's own type: its placeholder is of another.
        key_type: view.acme.as_ref().map_or_else(
            || served.info.key_type.clone(),
            |h| h.key_type.as_str().to_string(),
        ),
        issuer: served.info.issuer.clone(),
        serial: served.info.serial.clone(),
        not_after: rfc3339(served.info.not_after),
        next_renewal: status
            .as_ref()
            .and_then(|s| s.next_renewal)
            .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        last_error: status.as_ref().and_then(|s| s.last_error.clone()),
        locked_by: None,
        key: status.and_then(|s| s.key),
        cert_path: served.info.files.as_ref().map(|(c, _)| c.clone()),
        key_path: served.info.files.as_ref().map(|(_, k)| k.clone()),
    }
}

/// What `portcullis certs` shows of the cluster store.
pub fn cluster_row(cluster: &Cluster) -> ClusterRow {
    let health = cluster.health();
    let time = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let mut nodes: Vec<NodeRow> = cluster
        .mirror()
        .nodes
        .iter()
        .map(|(node, r)| NodeRow {
            node: node.clone(),
            synced_at: r.synced_at.clone(),
        })
        .collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    ClusterRow {
        node: cluster.node().to_string(),
        endpoints: cluster.endpoints().to_vec(),
        down_since: health.down_since.map(time),
        last_error: health.last_error,
        last_sync: health.last_sync.map(time),
        nodes,
    }
}

/// A Unix time as RFC 3339, to the second.
pub fn rfc3339(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no running portcullis answers on {}", .0.display())]
    NotRunning(PathBuf),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: unreadable answer: {message}", path.display())]
    Answer { path: PathBuf, message: String },
    #[error("{}: no answer within {}", path.display(), humantime::format_duration(*limit))]
    Timeout { path: PathBuf, limit: Duration },
}

/// Sends one request to the instance running on `state_dir`.
pub async fn request(
    state_dir: &Path,
    request: &Request,
    limit: Duration,
) -> Result<Response, ClientError> {
    let path = socket_path(state_dir);
    let io_err = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning(path));
        }
        Err(e) => return Err(io_err(e)),
    };
    let mut json = serde_json::to_vec(request).map_err(|e| ClientError::Answer {
        path: path.clone(),
        message: e.to_string(),
    })?;
    json.push(b'\n');
    stream.write_all(&json).await.map_err(io_err)?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    match tokio::time::timeout(limit, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => serde_json::from_str(&line).map_err(|e| ClientError::Answer {
            path: path.clone(),
            message: e.to_string(),
        }),
        Ok(Err(e)) => Err(io_err(e)),
        Err(_) => Err(ClientError::Timeout { path, limit }),
    }
}

/// `portcullis certs` without a running instance: what is on disk. Nothing is
/// generated or ordered.
pub fn offline_rows(config: &Config, provider: &CryptoProvider) -> Vec<CertRow> {
    let mut rows = Vec::new();
    for host in &config.hosts {
        let names = names::to_strings(&host.names);
        // (source, key type when known beforehand, what is on disk)
        let mut found: Vec<(&str, Option<&str>, Result<LoadedCert, String>)> = Vec::new();
        match &host.certificate {
            CertSource::Files { cert, key, second } => {
                for (cert, key) in
                    std::iter::once((cert, key)).chain(second.iter().map(|(c, k)| (c, k)))
                {
                    let loaded = certs::load_files(cert, key, &host.names, provider);
                    found.push(("files", None, loaded.map_err(|e| e.to_string())));
                }
            }
            CertSource::SelfSigned => {
                let dir = certs::self_signed_dir(&config.state_dir, &host.names);
                let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
                let loaded = certs::load_files(&c, &k, &host.names, provider);
                found.push(("self-signed", None, loaded.map_err(|e| e.to_string())));
            }
            CertSource::Acme => {
                let first = names.first().map_or("", String::as_str);
                let types = config
                    .acme
                    .as_ref()
                    .map_or(&[crate::config::KeyType::EcdsaP256][..], |a| {
                        a.key_types_for(first)
                    });
                for lineage in acme::Lineage::of(&host.names, types) {
                    let loaded = match acme::store::load(&config.state_dir, &lineage, provider) {
                        Ok(Some(s)) => Ok(s.cert),
                        Ok(None) => Err("nothing issued yet".to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    found.push(("acme", Some(lineage.key_type.as_str()), loaded));
                }
            }
        }
        for (source, key_type, loaded) in found {
            let mut row = CertRow {
                names: names.clone(),
                source: source.into(),
                key_type: key_type.unwrap_or_default().to_string(),
                ..CertRow::default()
            };
            match loaded {
                Ok(c) => {
                    (row.cert_path, row.key_path) = c.info.files.unzip();
                    row.key_type = c.info.key_type;
                    row.issuer = c.info.issuer;
                    row.serial = c.info.serial;
                    row.not_after = rfc3339(c.info.not_after);
                }
                Err(e) => row.last_error = Some(e),
            }
            rows.push(row);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use arc_swap::ArcSwap;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    /// A new process (`portcullis upgrade`) serves the control socket it
    /// was handed when it is its own state_dir's, however spelled.
    #[tokio::test]
    async fn an_inherited_control_socket_is_taken_for_its_own_state_dir_only() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let control = Control::bind(&a).unwrap();
        let handed = std::os::unix::net::UnixListener::from(control.socket().unwrap());
        let elsewhere = Control::inherited(handed.try_clone().unwrap(), &b).unwrap();
        assert!(elsewhere.is_none());
        let spelled = d.path().join("b/../a");
        let taken = Control::inherited(handed, &spelled).unwrap();
        assert!(taken.is_some());
    }

    #[tokio::test]
    async fn bad_requests_get_an_error_and_a_second_instance_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let control = Control::bind(d.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(socket_path(d.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            Control::bind(d.path()),
            Err(ControlError::Running(_))
        ));
        let stop = CancellationToken::new();
        let views = Arc::new(ArcSwap::from_pointee(Vec::new()));
        let runtime = Runtime::new();
        let served = tokio::spawn(control.serve(
            views,
            runtime,
            None,
            None,
            stop.clone(),
            TaskTracker::new(),
        ));

        let mut s = UnixStream::connect(socket_path(d.path())).await.unwrap();
        s.write_all(b"{\"command\":\"reboot\"}\n").await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        let answer: Response = serde_json::from_str(&answer).unwrap();
        assert!(
            matches!(&answer, Response::Error(e) if e.starts_with("bad request")),
            "{answer:?}"
        );

        let renew = Request::Renew {
            dry_run: false,
            force: false,
            name: None,
        };
        let got = request(d.path(), &renew, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, Response::Error("no host has certificate: acme".into()));
        let got = request(d.path(), &Request::Certs, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, Response::Certs(Vec::new()));

        stop.cancel();
        served.await.unwrap();
        assert!(!socket_path(d.path()).exists(), "socket removed at exit");
        assert!(matches!(
            request(d.path(), &Request::Certs, Duration::from_secs(5)).await,
            Err(ClientError::NotRunning(_))
        ));
        // A stale socket file (a crash) does not block the next start.
        let stale = std::os::unix::net::UnixListener::bind(socket_path(d.path())).unwrap();
        drop(stale);
        assert!(Control::bind(d.path()).is_ok());
    }
}
