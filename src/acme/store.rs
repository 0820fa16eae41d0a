//! Certificates issued over ACME, on disk:
//!
//! ```text
//! state_dir/certs/<first name>/fullchain.pem   leaf first, then the chain (0644)
//!                              privkey.pem     PKCS#8 (0600)
//!                              meta.json       names, directory, issued_at
//! state_dir/certs/<first name>~<key type>/      the same, for a host's second
//!                                               key type (`key_types: [a, b]`)
//! ```
//!
//! `certs/<first name>` is a symlink to a version directory
//! `certs/.<first name>.<serial>/` (certbot's live/archive idea): a new
//! certificate is written whole into its own directory, then the link is
//! switched with one rename, so a reader (portcullis at start, or Postfix and
//! Dovecot pointed at these files) never sees a new key beside an old chain.
//! The previous version is kept; older ones are removed. A new pair is checked
//! in memory (key matches, names covered) before anything is written. A pair
//! that does not load is reported and never served.

use std::path::{Path, PathBuf};

use rustls::crypto::CryptoProvider;
use serde::{Deserialize, Serialize};

use super::Lineage;
use crate::tls::certs::{self, CertError, LoadedCert};
use crate::tls::store;

/// What the certificate files do not say themselves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The host's names when it was ordered.
    pub names: Vec<String>,
    /// The ACME directory that issued it: staging and production never mix.
    pub directory: String,
    /// RFC 3339.
    pub issued_at: String,
}

#[derive(Debug)]
pub struct Stored {
    pub cert: LoadedCert,
    pub meta: Meta,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("{}: {message}", path.display())]
    Meta { path: PathBuf, message: String },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `state_dir/certs/<first name>` (`~<key type>` for a second key type).
pub fn host_dir(state_dir: &Path, lineage: &Lineage) -> PathBuf {
    state_dir.join("certs").join(lineage.id())
}

/// The stored certificate of a host, `Ok(None)` when there is none yet.
pub fn load(
    state_dir: &Path,
    lineage: &Lineage,
    provider: &CryptoProvider,
) -> Result<Option<Stored>, StoreError> {
    let names = &lineage.names;
    let dir = host_dir(state_dir, lineage);
    let (chain, key, meta) = paths(&dir);
    if !chain.exists() && !key.exists() {
        return Ok(None);
    }
    let cert = certs::load_files(&chain, &key, names, provider)?;
    let text = std::fs::read_to_string(&meta).map_err(|e| StoreError::Meta {
        path: meta.clone(),
        message: format!("cannot read: {e}"),
    })?;
    let meta = serde_json::from_str(&text).map_err(|e| StoreError::Meta {
        path: meta,
        message: e.to_string(),
    })?;
    Ok(Some(Stored { cert, meta }))
}

/// When the stored certificate with `serial` was issued (by this machine's
/// clock), if it is the one stored for `names`.
pub fn issued_at(
    state_dir: &Path,
    lineage: &Lineage,
    serial: &str,
) -> Option<std::time::SystemTime> {
    let link = host_dir(state_dir, lineage);
    let version = std::fs::read_link(&link).ok()?;
    let name = version.file_name()?.to_str()?;
    if !name.ends_with(&format!(".{serial}")) {
        return None;
    }
    let text = std::fs::read_to_string(paths(&link).2).ok()?;
    let meta: Meta = serde_json::from_str(&text).ok()?;
    humantime::parse_rfc3339(&meta.issued_at).ok()
}

/// Checks a newly issued pair in memory: it parses, the key matches, the
/// names are covered.
pub fn check(
    state_dir: &Path,
    lineage: &Lineage,
    chain_pem: &str,
    key_pem: &str,
    provider: &CryptoProvider,
) -> Result<LoadedCert, StoreError> {
    let (chain, key, _) = paths(&host_dir(state_dir, lineage));
    Ok(certs::load_pem(
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        &chain,
        &key,
        &lineage.names,
        provider,
    )?)
}

/// Writes a checked pair into a new version directory and switches
/// `certs/<first name>` to it in one rename.
pub fn write(
    state_dir: &Path,
    lineage: &Lineage,
    chain_pem: &str,
    key_pem: &str,
    meta: &Meta,
    serial: &str,
) -> Result<(), StoreError> {
    let link = host_dir(state_dir, lineage);
    // `.<first>~<key type>.<SERIAL>` for a second key type: the cleanup
    // below tells it from the first's `.<first>.<SERIAL>`.
    let first = lineage.id();
    let certs = state_dir.join("certs");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Write { path, source }
    };
    let version_name = format!(".{first}.{serial}");
    let version = certs.join(&version_name);
    let (chain, key, meta_path) = paths(&version);
    let meta_json = serde_json::to_vec_pretty(meta).map_err(|e| StoreError::Meta {
        path: meta_path.clone(),
        message: e.to_string(),
    })?;
    let written = store::create_private_dir(&version)
        .map_err(io(&version))
        .and_then(|()| store::write_atomic(&key, key_pem.as_bytes(), 0o600).map_err(io(&key)))
        .and_then(|()| store::write_atomic(&chain, chain_pem.as_bytes(), 0o644).map_err(io(&chain)))
        .and_then(|()| store::write_atomic(&meta_path, &meta_json, 0o644).map_err(io(&meta_path)));
    if let Err(e) = written {
        // A version the link never pointed at: nothing to keep (a full
        // disk left it half written).
        let _ = std::fs::remove_dir_all(&version);
        return Err(e);
    }

    let previous = std::fs::read_link(&link).ok();
    if std::fs::symlink_metadata(&link).is_ok_and(|m| m.is_dir()) {
        // A plain directory (written before versions existed): moved aside,
        // then removed with the other old versions below.
        let aside = certs.join(format!(".{first}.plain-{}", certs::unix_now()));
        std::fs::rename(&link, &aside).map_err(io(&link))?;
    }
    let tmp = certs.join(format!(".{first}.link"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&version_name, &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &link).map_err(io(&link))?;
    std::fs::File::open(&certs)
        .and_then(|d| d.sync_all())
        .map_err(io(&certs))?;

    // Keep the current and the previous version; older ones go.
    let keep = |name: &str| {
        name == version_name || previous.as_deref().is_some_and(|p| p == Path::new(name))
    };
    if let Ok(entries) = std::fs::read_dir(&certs) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // `.<first>.<SERIAL>` or `.<first>.plain-<time>`; another host's
            // versions (`.<first>.x.<SERIAL>`) have a dot in the rest.
            let ours = name
                .strip_prefix(&format!(".{first}."))
                .map(|rest| rest.strip_prefix("plain-").unwrap_or(rest))
                .is_some_and(|rest| {
                    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit())
                });
            if ours && !keep(&name) && entry.path().is_dir() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

/// [`check`], then [`write`].
pub fn save(
    state_dir: &Path,
    lineage: &Lineage,
    chain_pem: &str,
    key_pem: &str,
    meta: Meta,
    provider: &CryptoProvider,
) -> Result<Stored, StoreError> {
    let cert = check(state_dir, lineage, chain_pem, key_pem, provider)?;
    write(
        state_dir,
        lineage,
        chain_pem,
        key_pem,
        &meta,
        &cert.info.serial,
    )?;
    Ok(Stored { cert, meta })
}

/// The stored pair of a host as PEM text, with its metadata: what is on
/// disk, not checked (`check` it before serving it).
pub fn load_pem(state_dir: &Path, lineage: &Lineage) -> Option<(String, String, Meta)> {
    let (chain, key, meta) = paths(&host_dir(state_dir, lineage));
    let meta = serde_json::from_str(&std::fs::read_to_string(meta).ok()?).ok()?;
    Some((
        std::fs::read_to_string(chain).ok()?,
        std::fs::read_to_string(key).ok()?,
        meta,
    ))
}

/// `state_dir/certs/<first name>/privkey.pem`.
pub fn key_path(state_dir: &Path, lineage: &Lineage) -> PathBuf {
    paths(&host_dir(state_dir, lineage)).1
}

/// The chain and key files of the lineage's stored certificate.
pub fn files(state_dir: &Path, lineage: &Lineage) -> (PathBuf, PathBuf) {
    let (chain, key, _) = paths(&host_dir(state_dir, lineage));
    (chain, key)
}

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("fullchain.pem"),
        dir.join("privkey.pem"),
        dir.join("meta.json"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    use crate::config::names::HostPattern;

    fn host_names() -> Vec<HostPattern> {
        ["mail.example.test", "imap.example.test"]
            .iter()
            .map(|n| HostPattern::parse(n).unwrap())
            .collect()
    }

    fn names() -> Lineage {
        Lineage {
            names: host_names(),
            key_type: crate::config::KeyType::EcdsaP256,
            second: false,
        }
    }

    fn meta() -> Meta {
        Meta {
            names: vec!["mail.example.test".into(), "imap.example.test".into()],
            directory: "https://127.0.0.1:14000/dir".into(),
            issued_at: "2026-11-22T10:00:00Z".into(),
        }
    }

    #[test]
    fn a_saved_pair_loads_back_with_owner_only_key() {
        let d = tempfile::tempdir().unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        assert!(load(d.path(), &names(), &provider).unwrap().is_none());
        let (chain, key) = certs::generate_self_signed(&host_names()).unwrap();
        save(d.path(), &names(), &chain, &key, meta(), &provider).unwrap();
        let back = load(d.path(), &names(), &provider).unwrap().unwrap();
        assert_eq!(back.meta, meta());
        let serial = &back.cert.info.serial;
        let at = issued_at(d.path(), &names(), serial).unwrap();
        assert_eq!(
            at,
            humantime::parse_rfc3339("2026-11-22T10:00:00Z").unwrap()
        );
        assert_eq!(issued_at(d.path(), &names(), "00"), None, "another serial");
        assert_eq!(
            back.cert.info.sans,
            ["mail.example.test", "imap.example.test"]
        );
        let dir = host_dir(d.path(), &names());
        assert!(dir.ends_with("certs/mail.example.test"));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.join("privkey.pem")), 0o600);
        assert_eq!(mode(dir.clone()), 0o700);
    }

    #[test]
    fn each_certificate_gets_its_own_version_and_the_link_switches() {
        let d = tempfile::tempdir().unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let mut serials = Vec::new();
        for _ in 0..3 {
            let (chain, key) = certs::generate_self_signed(&host_names()).unwrap();
            let s = save(d.path(), &names(), &chain, &key, meta(), &provider).unwrap();
            let back = load(d.path(), &names(), &provider).unwrap().unwrap();
            assert_eq!(back.cert.info.serial, s.cert.info.serial);
            serials.push(s.cert.info.serial);
        }
        let link = host_dir(d.path(), &names());
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new(&format!(".mail.example.test.{}", serials[2]))
        );
        let mut versions: Vec<String> = std::fs::read_dir(d.path().join("certs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        versions.sort();
        let mut want = vec![
            "mail.example.test".to_string(),
            format!(".mail.example.test.{}", serials[1]),
            format!(".mail.example.test.{}", serials[2]),
        ];
        want.sort();
        assert_eq!(versions, want, "current and previous kept, older removed");

        // A store from before versions (a plain directory) is set aside.
        let plain = tempfile::tempdir().unwrap();
        let dir = host_dir(plain.path(), &names());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("fullchain.pem"), "old").unwrap();
        let (chain, key) = certs::generate_self_signed(&host_names()).unwrap();
        save(plain.path(), &names(), &chain, &key, meta(), &provider).unwrap();
        assert!(load(plain.path(), &names(), &provider).unwrap().is_some());
    }

    #[test]
    fn a_second_key_type_has_its_own_directory_and_versions() {
        let d = tempfile::tempdir().unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let rsa = Lineage {
            key_type: crate::config::KeyType::Rsa2048,
            second: true,
            ..names()
        };
        assert_eq!(rsa.id(), "mail.example.test~rsa-2048");
        assert!(host_dir(d.path(), &rsa).ends_with("certs/mail.example.test~rsa-2048"));
        let (chain, key) = certs::generate_self_signed(&host_names()).unwrap();
        let first = save(d.path(), &names(), &chain, &key, meta(), &provider).unwrap();
        // Three versions of the second: the first's version stays.
        let mut last = String::new();
        for _ in 0..3 {
            let (chain, key) = certs::generate_self_signed(&host_names()).unwrap();
            last = save(d.path(), &rsa, &chain, &key, meta(), &provider)
                .unwrap()
                .cert
                .info
                .serial;
        }
        let back = load(d.path(), &names(), &provider).unwrap().unwrap();
        assert_eq!(back.cert.info.serial, first.cert.info.serial);
        let back = load(d.path(), &rsa, &provider).unwrap().unwrap();
        assert_eq!(back.cert.info.serial, last);
        let versions = std::fs::read_dir(d.path().join("certs"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(
            versions, 3,
            "the first's one, the second's current and previous"
        );
    }

    #[test]
    fn a_version_that_cannot_be_written_whole_leaves_nothing_behind() {
        let d = tempfile::tempdir().unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let (chain, key) = certs::generate_self_signed(&host_names()).unwrap();
        let first = save(d.path(), &names(), &chain, &key, meta(), &provider).unwrap();
        // The next version's directory is taken by a file: its files cannot
        // be written (as a full disk would refuse them).
        let (chain2, key2) = certs::generate_self_signed(&host_names()).unwrap();
        let next = check(d.path(), &names(), &chain2, &key2, &provider).unwrap();
        let version = d
            .path()
            .join("certs")
            .join(format!(".mail.example.test.{}", next.info.serial));
        std::fs::create_dir_all(&version).unwrap();
        std::fs::create_dir(version.join("privkey.pem")).unwrap();
        let serial = &next.info.serial;
        assert!(write(d.path(), &names(), &chain2, &key2, &meta(), serial).is_err());
        assert!(!version.exists(), "the half-written version is gone");
        let back = load(d.path(), &names(), &provider).unwrap().unwrap();
        assert_eq!(
            back.cert.info.serial, first.cert.info.serial,
            "the old pair serves"
        );
    }

    #[test]
    fn a_broken_pair_is_refused_before_anything_is_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let (chain, key) = certs::generate_self_signed(&host_names()).unwrap();
        save(d.path(), &names(), &chain, &key, meta(), &provider).unwrap();
        let (_, other_key) = certs::generate_self_signed(&host_names()).unwrap();
        let err = save(d.path(), &names(), &chain, &other_key, meta(), &provider).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        let half = &chain[..chain.len() / 2];
        assert!(save(d.path(), &names(), half, &key, meta(), &provider).is_err());
        let back = load(d.path(), &names(), &provider).unwrap().unwrap();
        assert_eq!(
            back.cert.key.cert[0].as_ref(),
            rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
                .next()
                .unwrap()
                .unwrap()
                .as_ref(),
            "the good pair is still there"
        );
        // corrupted on disk: reported, not served
        let dir = host_dir(d.path(), &names());
        std::fs::write(dir.join("fullchain.pem"), "garbage").unwrap();
        assert!(load(d.path(), &names(), &provider).is_err());
    }
}
