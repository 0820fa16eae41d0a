//! dns-01 (RFC 8555 §8.4): the challenge's TXT record at
//! `_acme-challenge.<name>`, added by a TSIG-signed RFC 2136 update, waited
//! for at the zone's authoritative servers, and removed once the order no
//! longer needs it: when its guard drops, after a success or a failure.
//!
//! What is up is listed in `state_dir/acme/dns-01.json` before it is added
//! and struck off once removed, so a record left by a crash or a restart
//! is removed at the next start ([`clean_up`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::config::{Acme, Dns};
use crate::dns::{self, DnsError, Updater};
use crate::tls::store;

/// How often the authoritative servers are asked whether they serve it.
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Dns01Error {
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("TSIG secret file {}: {why}", path.display())]
    Secret { path: PathBuf, why: String },
    #[error(
        "{name} is not in zone {zone} (acme.dns.zone): its dns-01 record cannot be added there"
    )]
    NotInZone { name: String, zone: String },
    #[error("{name} TXT was added at {server}, but {waiting} did not serve it within {} s", timeout.as_secs())]
    NotVisible {
        name: String,
        server: std::net::SocketAddr,
        waiting: String,
        timeout: Duration,
    },
}

/// One record the order put up; removed when dropped.
pub struct Published {
    updater: Arc<Updater>,
    entry: Entry,
    state_dir: PathBuf,
    /// The addition got no answer: the server may still apply it, even
    /// after the removal (a frozen BIND runs its queue in any order).
    late: bool,
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Published")
            .field("name", &self.entry.name)
            .field("server", &self.entry.server)
            .finish()
    }
}

/// A record as the ledger lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    server: std::net::SocketAddr,
    zone: String,
    name: String,
    value: String,
}

/// One writer of the ledger at a time, in this process.
static LEDGER: Mutex<()> = Mutex::new(());

/// The updater for `dns`, its secret read from its file (which must not be
/// readable by group or others).
pub fn updater(dns: &Dns) -> Result<Updater, Dns01Error> {
    let path = &dns.tsig.secret_file;
    let secret = |why: String| Dns01Error::Secret {
        path: path.clone(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| secret(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(secret(format!(
            "open to group or others (mode {mode:03o}): chmod 600 it"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| secret(e.to_string()))?;
    let bytes = decode_secret(&text, &dns.tsig.name).map_err(secret)?;
    Ok(Updater::new(dns.server, &dns.zone, &dns.tsig, bytes)?)
}

/// The secret of a key file: bare base64 (comment lines starting with
/// `#`, `;` or `//` aside), the `secret "…";` of a BIND `key` clause
/// (tsig-keygen's output), or the `secret: …` of Knot's keymgr. A BIND
/// clause names its key: it must be `key_name`.
fn decode_secret(text: &str, key_name: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('#') && !l.starts_with(';') && !l.starts_with("//")
        })
        .collect();
    let joined = lines.join(" ");
    let b64 = if let Some(rest) = joined.strip_prefix("key ") {
        // key "NAME" { algorithm …; secret "…"; };
        let named = rest.trim_start().trim_start_matches('"');
        let name = named.split(['"', ' ', '{']).next().unwrap_or_default();
        if name.trim_end_matches('.') != key_name.trim_end_matches('.') {
            return Err(format!(
                "the key in this file is {name:?}, not tsig.name {key_name:?}"
            ));
        }
        let body = &named[named.find('{').ok_or("a key clause without { … }")?..];
        let at = body
            .split(';')
            .map(str::trim)
            .find_map(|stmt| stmt.trim_start_matches('{').trim().strip_prefix("secret"))
            .ok_or("a key clause without a secret")?;
        at.trim().trim_matches('"').to_string()
    } else if let Some(line) = lines.iter().find_map(|l| l.strip_prefix("secret:")) {
        line.trim().to_string()
    } else if lines.len() == 1 {
        lines[0].to_string()
    } else {
        return Err(
            "expected the key's base64 secret, or a BIND key file (tsig-keygen's output)".into(),
        );
    };
    match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
        Ok(bytes) if !bytes.is_empty() => Ok(bytes),
        _ => Err("the secret is not base64".into()),
    }
}

/// Adds the TXT record `value` for `identifier`, and returns once every
/// server in `dns.check` serves it.
pub async fn publish(
    dns: &Dns,
    identifier: &str,
    value: &str,
    state_dir: &Path,
) -> Result<Published, Dns01Error> {
    let updater = Arc::new(updater(dns)?);
    let name = dns::challenge_name(identifier);
    if !updater.covers(&name) {
        return Err(Dns01Error::NotInZone {
            name,
            zone: updater.zone(),
        });
    }
    let entry = Entry {
        server: dns.server,
        zone: updater.zone(),
        name: name.clone(),
        value: value.to_string(),
    };
    ledger(state_dir, |l| {
        if !l.contains(&entry) {
            l.push(entry.clone())
        }
    });
    let guard = |late| Published {
        updater: updater.clone(),
        entry: entry.clone(),
        state_dir: state_dir.to_path_buf(),
        late,
    };
    match updater.add_txt(&name, value).await {
        Ok(()) => {}
        // No answer: the update may still be applied, so a guard removes
        // it as it drops (or the next start does).
        Err(e @ DnsError::Timeout { .. }) => {
            drop(guard(true));
            return Err(e.into());
        }
        // Refused, or never sent: nothing was added.
        Err(e) => {
            ledger(state_dir, |l| l.retain(|x| *x != entry));
            return Err(e.into());
        }
    }
    let published = guard(false);
    info!(name = %name, server = %dns.server, "dns-01 record added");
    wait_visible(dns, &name, value).await?;
    Ok(published)
}

/// Asks each of `dns.check` until it serves `value` at `name`, for at most
/// `dns.propagation_timeout`.
async fn wait_visible(dns: &Dns, name: &str, value: &str) -> Result<(), Dns01Error> {
    let deadline = tokio::time::Instant::now() + dns.propagation_timeout;
    let mut waiting: Vec<std::net::SocketAddr> = dns.check.clone();
    loop {
        let mut still = Vec::new();
        for server in waiting {
            match dns::txt(server, name).await {
                Ok(values) if values.iter().any(|v| v == value) => {}
                Ok(_) => still.push(server),
                Err(e) => {
                    debug!(server = %server, error = %e, "dns-01 record not seen yet");
                    still.push(server);
                }
            }
        }
        if still.is_empty() {
            debug!(name = %name, "dns-01 record served by every server checked");
            return Ok(());
        }
        if tokio::time::Instant::now() + POLL > deadline {
            let waiting: Vec<String> = still.iter().map(ToString::to_string).collect();
            return Err(Dns01Error::NotVisible {
                name: name.to_string(),
                server: dns.server,
                waiting: waiting.join(", "),
                timeout: dns.propagation_timeout,
            });
        }
        waiting = still;
        tokio::time::sleep(POLL).await;
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        let (updater, entry, dir, late) = (
            self.updater.clone(),
            self.entry.clone(),
            self.state_dir.clone(),
            self.late,
        );
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // left in the ledger: removed at the next start
        };
        rt.spawn(async move { remove(&updater, &entry, &dir, late).await });
    }
}

/// Waits before each try of a removal.
const REMOVE_TRIES: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
];

/// Removes a record and strikes it off the ledger once the server no
/// longer serves it; one that cannot be removed after [`REMOVE_TRIES`]
/// stays listed, for the next start. A removal that got no answer is made
/// again: the server may apply it, or a late addition, after it answers
/// again. After a `late` addition (one that got no answer), the record is
/// looked for once more at the next try, and removed again if it came back.
async fn remove(updater: &Updater, entry: &Entry, state_dir: &Path, late: bool) -> bool {
    let (mut removed, mut recheck) = (false, late);
    for (i, wait) in REMOVE_TRIES.iter().enumerate() {
        tokio::time::sleep(*wait).await;
        let last = i + 1 == REMOVE_TRIES.len();
        let then = if last { "at the next start" } else { "shortly" };
        if removed {
            if !served(updater, entry).await {
                break;
            }
            // The late addition came after the removal: there is one.
            (removed, recheck) = (false, false);
        }
        match updater.delete_txt(&entry.name, &entry.value).await {
            Ok(()) if served(updater, entry).await => {
                // The late addition, applied after this removal.
                recheck = false;
                warn!(name = %entry.name, "dns-01 record still served after its removal: removed again {then}");
            }
            Ok(()) => {
                info!(name = %entry.name, server = %entry.server, "dns-01 record removed");
                removed = true;
                if !recheck {
                    break;
                }
            }
            Err(e) => {
                warn!(name = %entry.name, error = %e, "dns-01 record not removed: tried again {then}");
            }
        }
    }
    if removed {
        ledger(state_dir, |l| l.retain(|e| e != entry));
    }
    removed
}

/// Whether the primary still serves the record (a late addition applied
/// after its removal). `false` when it does not answer: the removal it
/// answered stands.
async fn served(updater: &Updater, entry: &Entry) -> bool {
    dns::txt(updater.server(), &entry.name)
        .await
        .is_ok_and(|values| values.contains(&entry.value))
}

/// Removes what an earlier run left up (a crash, a restart mid-order), with
/// the dns settings that name its server and zone.
pub async fn clean_up(state_dir: &Path, acme: &Acme) {
    let mut left = Vec::new();
    ledger(state_dir, |l| left = l.clone());
    for entry in left {
        let dns = std::iter::once(acme.dns.as_ref())
            .chain(acme.per_host.values().map(|h| h.dns.as_ref()))
            .flatten()
            .find(|d| d.server == entry.server && d.zone == entry.zone);
        let Some(dns) = dns else {
            warn!(name = %entry.name, server = %entry.server, "a dns-01 record left by an earlier run is in a zone no longer configured: remove it by hand");
            ledger(state_dir, |l| l.retain(|e| *e != entry));
            continue;
        };
        match updater(dns) {
            Ok(u) => {
                remove(&u, &entry, state_dir, true).await;
            }
            Err(e) => {
                warn!(name = %entry.name, error = %e, "a dns-01 record left by an earlier run cannot be removed now")
            }
        }
    }
}

/// Whether an earlier run kept a ledger (it may list records left up).
pub fn ledger_exists(state_dir: &Path) -> bool {
    state_dir.join("acme").join("dns-01.json").exists()
}

/// Reads the ledger, lets `change` edit it, writes it back when changed.
/// A ledger that cannot be read or written is logged, never fatal.
fn ledger(state_dir: &Path, change: impl FnOnce(&mut Vec<Entry>)) {
    let _one = LEDGER.lock().unwrap_or_else(PoisonError::into_inner);
    let path = state_dir.join("acme").join("dns-01.json");
    let mut entries: Vec<Entry> = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "unreadable dns-01 ledger; starting a new one");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    };
    let before = entries.clone();
    change(&mut entries);
    if entries == before {
        return;
    }
    let written = serde_json::to_vec_pretty(&entries)
        .map_err(std::io::Error::other)
        .and_then(|bytes| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            store::write_atomic(&path, &bytes, 0o600)
        });
    if let Err(e) = written {
        warn!(path = %path.display(), error = %e, "dns-01 ledger not written: a record left up by a crash would not be removed at the next start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_bare_or_in_a_bind_or_knot_key_file() {
        let ok = |text: &str| decode_secret(text, "portcullis-acme");
        assert_eq!(ok("c2VjcmV0\n"), Ok(b"secret".to_vec()));
        assert_eq!(ok("# the acme key\nc2VjcmV0\n"), Ok(b"secret".to_vec()));
        let bind =
            "key \"portcullis-acme\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0\";\n};\n";
        assert_eq!(ok(bind), Ok(b"secret".to_vec()));
        // A key whose name holds "secret" is still read right.
        let named = "key \"acme-secret\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0\";\n};\n";
        assert_eq!(decode_secret(named, "acme-secret"), Ok(b"secret".to_vec()));
        assert_eq!(
            ok(named),
            Err(
                "the key in this file is \"acme-secret\", not tsig.name \"portcullis-acme\"".into()
            )
        );
        let knot =
            "key:\n  - id: portcullis-acme\n    algorithm: hmac-sha256\n    secret: c2VjcmV0\n";
        assert_eq!(ok(knot), Ok(b"secret".to_vec()));
        assert!(ok("not base64!").is_err());
        assert!(ok("").is_err());
        assert!(ok("c2Vj\ncmV0\n").is_err(), "two lines: which one?");
        assert!(ok("key \"portcullis-acme\" { algorithm hmac-sha256; };").is_err());
    }

    #[test]
    fn a_secret_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "c2VjcmV0").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let dns = Dns {
            server: "127.0.0.1:53".parse().unwrap(),
            zone: "example.test".into(),
            tsig: crate::config::Tsig {
                name: "k".into(),
                algorithm: Default::default(),
                secret_file: path.clone(),
            },
            check: vec!["127.0.0.1:53".parse().unwrap()],
            propagation_timeout: Duration::from_secs(1),
        };
        let e = updater(&dns).unwrap_err().to_string();
        assert!(
            e.contains("open to group or others (mode 644): chmod 600 it"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(updater(&dns).is_ok());
    }

    #[test]
    fn the_ledger_lists_what_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let e = Entry {
            server: "127.0.0.1:53".parse().unwrap(),
            zone: "example.test".into(),
            name: "_acme-challenge.example.test".into(),
            value: "v".into(),
        };
        ledger(dir.path(), |l| l.push(e.clone()));
        let mut seen = Vec::new();
        ledger(dir.path(), |l| seen = l.clone());
        assert_eq!(seen, vec![e.clone()]);
        ledger(dir.path(), |l| l.retain(|x| *x != e));
        ledger(dir.path(), |l| seen = l.clone());
        assert!(seen.is_empty());
    }
}
