//! `key: rollover` (RFC 7671 §8.1, RFC 7672 §8.1): the next key is made
//! ahead of time and kept in `state_dir/keys/<first name>.next.pem` (0600),
//! its state beside it (`.next.json`): its SPKI digest, when it was made,
//! since when its `TLSA 3 1 1` record has been served at every
//! `acme.tlsa.check` server under every owner name, and that record's TTL.
//! An order uses it only once it has been served for `wait_ttls` TTLs (so
//! caches hold it before the certificate changes); then it is the
//! certificate's key, and a new next key is made, to be published.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{KeyType, TlsaCheck};
use crate::dns;
use crate::tls::store;

/// The next key's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Next {
    /// Lower-case hex SHA-256 of its SubjectPublicKeyInfo: the `3 1 1` data.
    pub spki_sha256: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339: since when every check server serves its record; `None`
    /// while one does not.
    pub seen_since: Option<String>,
    /// The record's TTL, as served (the longest seen).
    pub ttl: Option<u32>,
}

fn paths(state_dir: &Path, first: &str) -> (PathBuf, PathBuf) {
    let dir = state_dir.join("keys");
    (
        dir.join(format!("{first}.next.pem")),
        dir.join(format!("{first}.next.json")),
    )
}

/// The next key's state, if there is one.
pub fn load(state_dir: &Path, first: &str) -> Option<Next> {
    let text = std::fs::read_to_string(paths(state_dir, first).1).ok()?;
    serde_json::from_str(&text).ok()
}

/// The next key itself.
pub fn key(state_dir: &Path, first: &str) -> Option<rcgen::KeyPair> {
    let pem = std::fs::read_to_string(paths(state_dir, first).0).ok()?;
    rcgen::KeyPair::from_pem(&pem).ok()
}

fn save(state_dir: &Path, first: &str, next: &Next) -> Result<(), String> {
    let (_, meta) = paths(state_dir, first);
    let bytes = serde_json::to_vec_pretty(next).map_err(|e| e.to_string())?;
    store::write_atomic(&meta, &bytes, 0o600).map_err(|e| format!("{}: {e}", meta.display()))
}

/// The next key's state, made (with the key) when there is none; `true`
/// when it was made now (its records are to be published).
pub fn ensure(state_dir: &Path, first: &str, key_type: KeyType) -> Result<(Next, bool), String> {
    if let (Some(next), Some(_)) = (load(state_dir, first), key(state_dir, first)) {
        return Ok((next, false));
    }
    let (pem_path, _) = paths(state_dir, first);
    if let Some(dir) = pem_path.parent() {
        store::create_private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let key = rcgen::KeyPair::generate_for(crate::tls::certs::key_algorithm(key_type))
        .map_err(|e| e.to_string())?;
    store::write_atomic(&pem_path, key.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| format!("{}: {e}", pem_path.display()))?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let next = Next {
        spki_sha256: crate::tls::certs::sha256_hex(&spki),
        created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        seen_since: None,
        ttl: None,
    };
    save(state_dir, first, &next)?;
    info!(next_key = %next.spki_sha256, "key rollover: a next key is made; publish its TLSA 3 1 1 record (portcullis tlsa) before the next renewal");
    Ok((next, true))
}

/// The next key is the certificate's now: a new one is made in its place.
pub fn rolled(state_dir: &Path, first: &str, key_type: KeyType) -> Result<(Next, bool), String> {
    let (pem, meta) = paths(state_dir, first);
    let _ = std::fs::remove_file(meta);
    let _ = std::fs::remove_file(pem);
    ensure(state_dir, first, key_type)
}

/// Asks every check server for every owner's TLSA records and notes since
/// when the next key's `3 1 1` record is served by them all.
pub async fn look(
    state_dir: &Path,
    first: &str,
    tlsa: &TlsaCheck,
    owners: &[String],
) -> Option<Next> {
    let mut next = load(state_dir, first)?;
    let mut ttl = 0u32;
    let mut missing = None;
    'all: for server in &tlsa.check {
        for owner in owners {
            let served = match dns::tlsa(*server, owner).await {
                Ok(records) => records,
                Err(e) => {
                    missing = Some(e.to_string());
                    break 'all;
                }
            };
            let found = served.iter().find(|r| {
                (r.usage, r.selector, r.matching) == (3, 1, 1) && r.data_hex == next.spki_sha256
            });
            match found {
                Some(r) => ttl = ttl.max(r.ttl),
                None => {
                    missing = Some(format!("{server} does not serve it at {owner}"));
                    break 'all;
                }
            }
        }
    }
    let before = next.clone();
    match missing {
        None => {
            if next.seen_since.is_none() {
                info!(next_key = %next.spki_sha256, "key rollover: the next key's TLSA record is served by every check server");
            }
            next.seen_since.get_or_insert_with(|| {
                humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
            });
            next.ttl = Some(next.ttl.unwrap_or(0).max(ttl));
        }
        Some(why) => {
            if next.seen_since.is_some() {
                warn!(next_key = %next.spki_sha256, why = %why, "key rollover: the next key's TLSA record is no longer served: waiting again");
            }
            next.seen_since = None;
        }
    }
    if next != before {
        if let Err(e) = save(state_dir, first, &next) {
            warn!(error = %e, "key rollover state not saved");
        }
    }
    Some(next)
}

/// When the next key may be used: `wait_ttls` TTLs after every server
/// served its record; `None` while one does not.
pub fn usable_from(next: &Next, wait_ttls: u32) -> Option<SystemTime> {
    let since = humantime::parse_rfc3339(next.seen_since.as_deref()?).ok()?;
    let ttl = u64::from(next.ttl.unwrap_or(0));
    Some(since + Duration::from_secs(ttl * u64::from(wait_ttls)))
}

/// Where the host is in the cycle, for `portcullis certs`.
pub fn describe(next: &Next, wait_ttls: u32) -> String {
    let short = &next.spki_sha256[..next.spki_sha256.len().min(16)];
    match usable_from(next, wait_ttls) {
        None => format!(
            "next key {short}… not served in DNS yet: publish its TLSA 3 1 1 record (portcullis tlsa)"
        ),
        Some(at) if at <= SystemTime::now() => {
            format!("next key {short}… served: it is used at the next renewal")
        }
        Some(at) => format!(
            "next key {short}… served; used at a renewal from {}",
            humantime::format_rfc3339_seconds(at)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_next_key_is_made_once_kept_private_and_replaced_when_rolled() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        assert!(load(state, "mx.example.test").is_none());
        let (a, made) = ensure(state, "mx.example.test", KeyType::EcdsaP256).unwrap();
        assert!(made);
        assert_eq!(a.spki_sha256.len(), 64);
        assert_eq!(
            ensure(state, "mx.example.test", KeyType::EcdsaP256).unwrap(),
            (a.clone(), false),
            "made once"
        );
        use std::os::unix::fs::PermissionsExt;
        let pem = state.join("keys/mx.example.test.next.pem");
        assert_eq!(
            std::fs::metadata(&pem).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k = key(state, "mx.example.test").unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&k);
        assert_eq!(crate::tls::certs::sha256_hex(&spki), a.spki_sha256);
        let (b, made) = rolled(state, "mx.example.test", KeyType::EcdsaP256).unwrap();
        assert!(made);
        assert_ne!(a.spki_sha256, b.spki_sha256);
    }

    #[test]
    fn the_next_key_waits_for_its_ttls() {
        let mut n = Next {
            spki_sha256: "ab".repeat(32),
            created_at: "2030-01-01T00:00:00Z".into(),
            seen_since: None,
            ttl: None,
        };
        assert_eq!(usable_from(&n, 2), None);
        assert!(describe(&n, 2).contains("not served in DNS yet"));
        n.seen_since = Some("2030-01-01T00:00:00Z".into());
        n.ttl = Some(3600);
        let at = usable_from(&n, 2).unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(at).to_string(),
            "2030-01-01T02:00:00Z"
        );
        assert!(describe(&n, 2).contains("used at a renewal from 2030-01-01T02:00:00Z"));
    }
}
