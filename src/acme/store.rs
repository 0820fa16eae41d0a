//! Certificates issued over ACME, on disk:
//!
//! ```text
//! state_dir/certs/<first name>/fullchain.pem   leaf first, then the chain (0644)
//!                              privkey.pem     PKCS#8 (0600)
//!                              meta.json       names, directory, issued_at
//! ```
//!
//! A new pair is checked whole in memory (key matches, names covered) before
//! anything is written; each file is replaced atomically. A pair that does not
//! load is reported and never served.

use std::path::{Path, PathBuf};

use rustls::crypto::CryptoProvider;
use serde::{Deserialize, Serialize};

use crate::names::HostPattern;
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

/// `state_dir/certs/<first name>`.
pub fn host_dir(state_dir: &Path, names: &[HostPattern]) -> PathBuf {
    let first = names.first().map(|n| n.to_string()).unwrap_or_default();
    state_dir.join("certs").join(first)
}

/// The stored certificate of a host, `Ok(None)` when there is none yet.
pub fn load(
    state_dir: &Path,
    names: &[HostPattern],
    provider: &CryptoProvider,
) -> Result<Option<Stored>, StoreError> {
    let dir = host_dir(state_dir, names);
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

/// Checks a newly issued pair and, only if it is whole, stores it.
pub fn save(
    state_dir: &Path,
    names: &[HostPattern],
    chain_pem: &str,
    key_pem: &str,
    meta: Meta,
    provider: &CryptoProvider,
) -> Result<Stored, StoreError> {
    let dir = host_dir(state_dir, names);
    let (chain, key, meta_path) = paths(&dir);
    let cert = certs::load_pem(
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        &chain,
        &key,
        names,
        provider,
    )?;
    let write = |path: &Path, bytes: &[u8], mode: u32| {
        store::write_atomic(path, bytes, mode).map_err(|source| StoreError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    store::create_private_dir(&dir).map_err(|source| StoreError::Write {
        path: dir.clone(),
        source,
    })?;
    let meta_json = serde_json::to_vec_pretty(&meta).map_err(|e| StoreError::Meta {
        path: meta_path.clone(),
        message: e.to_string(),
    })?;
    // Key first: a crash between the two leaves a pair that does not match,
    // which the next start reports and replaces rather than serves.
    write(&key, key_pem.as_bytes(), 0o600)?;
    write(&chain, chain_pem.as_bytes(), 0o644)?;
    write(&meta_path, &meta_json, 0o644)?;
    Ok(Stored { cert, meta })
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

    fn names() -> Vec<HostPattern> {
        ["mail.example.test", "imap.example.test"]
            .iter()
            .map(|n| HostPattern::parse(n).unwrap())
            .collect()
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
        let (chain, key) = certs::generate_self_signed(&names()).unwrap();
        save(d.path(), &names(), &chain, &key, meta(), &provider).unwrap();
        let back = load(d.path(), &names(), &provider).unwrap().unwrap();
        assert_eq!(back.meta, meta());
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
    fn a_broken_pair_is_refused_before_anything_is_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let (chain, key) = certs::generate_self_signed(&names()).unwrap();
        save(d.path(), &names(), &chain, &key, meta(), &provider).unwrap();
        let (_, other_key) = certs::generate_self_signed(&names()).unwrap();
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
