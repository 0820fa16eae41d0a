//! Certificates from PEM files and self-signed ones generated with rcgen.
//!
//! A file pair is accepted only whole: the chain parses, the key parses and
//! matches the first certificate, and the certificate covers at least one of
//! the host's names. Self-signed certificates live in
//! `state_dir/self-signed/<first name>/` and are reused across restarts as long
//! as they still name the same hosts and are not close to expiry.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::names::HostPattern;
use crate::tls::store;

/// Self-signed certificates are valid this long and replaced this close to the end.
const SELF_SIGNED_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
const SELF_SIGNED_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Clone, Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// What an operator wants to know about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names in the subjectAltName extension, lowercase.
    pub sans: Vec<String>,
    pub issuer: String,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    /// Hexadecimal, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// The host's names this certificate does not cover (logged as a warning).
    pub uncovered: Vec<String>,
    /// The key's algorithm and size, spelled as `acme.key_types` spells
    /// them where it can: `ecdsa-p256`, `ecdsa-p384`, `rsa-2048`, `rsa-4096`.
    pub key_type: String,
    /// The chain and key files it was read from (or stored to); `None`
    /// when it lives in memory only.
    pub files: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: bad PEM: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("{}: no PEM private key in it (expected -----BEGIN PRIVATE KEY----- or an EC/RSA key)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: unusable private key: {source}", path.display())]
    Key {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: unreadable certificate: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{} does not match the certificate in {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: covers none of the host's names ({names}); it is for: {sans}", cert.display())]
    CoversNone {
        cert: PathBuf,
        names: String,
        sans: String,
    },
    #[error("{} and {} are both {kind}: two certificates of a host are one ECDSA and one RSA", first.display(), second.display())]
    SameKind {
        first: PathBuf,
        second: PathBuf,
        kind: &'static str,
    },
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{}: cannot write: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Two pairs of one host (`certificate: [ {cert, key}, {cert, key} ]`):
/// each loads as [`load_files`] does, and they are of different kinds,
/// one ECDSA and one RSA (a client that takes one of two ECDSA
/// certificates takes either, so the second would never be served).
pub fn load_two(
    first: (&Path, &Path),
    second: (&Path, &Path),
    names: &[HostPattern],
    provider: &CryptoProvider,
) -> Result<(LoadedCert, LoadedCert), CertError> {
    let a = load_files(first.0, first.1, names, provider)?;
    let b = load_files(second.0, second.1, names, provider)?;
    let family = |c: &LoadedCert| c.info.key_type.split('-').next().unwrap_or("").to_string();
    if family(&a) == family(&b) {
        return Err(CertError::SameKind {
            first: first.0.to_path_buf(),
            second: second.0.to_path_buf(),
            kind: if family(&a) == "rsa" {
                "RSA"
            } else if family(&a) == "ecdsa" {
                "ECDSA"
            } else {
                "of one kind"
            },
        });
    }
    Ok((a, b))
}

/// Loads a full chain and its key from PEM files and checks them against `names`.
pub fn load_files(
    cert: &Path,
    key: &Path,
    names: &[HostPattern],
    provider: &CryptoProvider,
) -> Result<LoadedCert, CertError> {
    load_pem(&read(cert)?, &read(key)?, cert, key, names, provider)
}

/// [`load_files`] on PEM already in memory; `cert` and `key` name the files in errors.
pub fn load_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert: &Path,
    key: &Path,
    names: &[HostPattern],
    provider: &CryptoProvider,
) -> Result<LoadedCert, CertError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: cert.to_path_buf(),
            message: pem_message(&e),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::NoKey {
            path: key.to_path_buf(),
        },
        e => CertError::Pem {
            path: key.to_path_buf(),
            message: pem_message(&e),
        },
    })?;
    let mut info = cert_info(&chain[0], names).map_err(|message| CertError::Parse {
        path: cert.to_path_buf(),
        message,
    })?;
    info.files = Some((cert.to_path_buf(), key.to_path_buf()));
    if info.uncovered.len() == names.len() {
        return Err(CertError::CoversNone {
            cert: cert.to_path_buf(),
            names: join(names.iter().map(|n| n.to_string())),
            sans: join(info.sans.iter().cloned()),
        });
    }
    let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => CertError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        },
        source => CertError::Key {
            path: key.to_path_buf(),
            source,
        },
    })?;
    Ok(LoadedCert {
        key: Arc::new(certified),
        info,
    })
}

fn join(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "no DNS names".to_string()
    } else {
        v.join(", ")
    }
}

/// Names, issuer and expiry of an end-entity certificate, and which of `names` it misses.
pub fn cert_info(der: &CertificateDer<'_>, names: &[HostPattern]) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for gn in &ext.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = gn {
                sans.push(n.to_ascii_lowercase());
            }
        }
    }
    let patterns: Vec<HostPattern> = sans
        .iter()
        .filter_map(|s| HostPattern::parse(s).ok())
        .collect();
    let uncovered = names
        .iter()
        .filter(|name| !patterns.iter().any(|san| covers(san, name)))
        .map(|n| n.to_string())
        .collect();
    Ok(CertInfo {
        sans,
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: hex_upper(cert.tbs_certificate.raw_serial()),
        uncovered,
        key_type: key_type_of(cert.public_key()),
        files: None,
    })
}

/// `ecdsa-p256`, `rsa-2048`, …: what a certificate's key is.
fn key_type_of(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> String {
    use x509_parser::public_key::PublicKey;
    match spki.parsed() {
        Ok(PublicKey::RSA(k)) if k.key_size() > 0 => format!("rsa-{}", k.key_size()),
        Ok(PublicKey::RSA(_)) => "rsa".to_string(),
        Ok(PublicKey::EC(k)) => format!("ecdsa-p{}", k.key_size()),
        _ if spki.algorithm.algorithm == x509_parser::oid_registry::OID_SIG_ED25519 => {
            "ed25519".to_string()
        }
        _ => "unknown".to_string(),
    }
}

/// rustls-pki-types prints markers and lines as byte lists; say them as text.
fn pem_message(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "cut short: no \"{}\" line (a half-written file?)",
            String::from_utf8_lossy(end_marker)
        ),
        E::IllegalSectionStart { line } => {
            format!("bad section start {:?}", String::from_utf8_lossy(line))
        }
        other => other.to_string(),
    }
}

/// Upper-case hex, as serials are shown.
fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Whether a certificate name (`san`) is valid for a configured name.
fn covers(san: &HostPattern, name: &HostPattern) -> bool {
    match name {
        HostPattern::Exact(h) => san.matches(h),
        HostPattern::Wildcard(_) => san == name,
    }
}

/// The directory a host's self-signed certificate lives in.
pub fn self_signed_dir(state_dir: &Path, names: &[HostPattern]) -> PathBuf {
    let first = names
        .first()
        .map(|n| n.to_string().replace('*', "_wildcard"))
        .unwrap_or_else(|| "_".to_string());
    state_dir.join("self-signed").join(first)
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The host's self-signed certificate: the stored one while it still fits,
/// otherwise a new one, stored before it is used. When it cannot be stored
/// (`state_dir` read-only or full) the new one is kept in memory for as long
/// as the process runs (reloads serve the same one), and the next start
/// makes another.
pub fn self_signed(
    state_dir: &Path,
    names: &[HostPattern],
    provider: &CryptoProvider,
) -> Result<LoadedCert, CertError> {
    let dir = self_signed_dir(state_dir, names);
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    let fits = |c: &LoadedCert| {
        let wanted: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
        let have: BTreeSet<String> = c.info.sans.iter().cloned().collect();
        let fresh = c.info.not_after > unix_now() + SELF_SIGNED_RENEW_BEFORE.as_secs() as i64;
        wanted == have && fresh
    };
    if let Ok(stored) = load_files(&cert_path, &key_path, names, provider) {
        if fits(&stored) {
            return Ok(stored);
        }
    }
    let mut unstored = UNSTORED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((cert, key)) = unstored.get(&dir) {
        let kept = load_pem(
            cert.as_bytes(),
            key.as_bytes(),
            &cert_path,
            &key_path,
            names,
            provider,
        );
        if let Some(kept) = kept.ok().filter(fits) {
            return Ok(kept);
        }
    }
    let (cert_pem, key_pem) = generate_self_signed(names)?;
    let stored = store::create_private_dir(&dir)
        .and_then(|()| store::write_atomic(&key_path, key_pem.as_bytes(), 0o600))
        .and_then(|()| store::write_atomic(&cert_path, cert_pem.as_bytes(), 0o644));
    match stored {
        Ok(()) => {
            unstored.remove(&dir);
            load_files(&cert_path, &key_path, names, provider)
        }
        Err(e) => {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot store the self-signed certificate: serving one made now, a new one at each start"
            );
            let (cert, key) = (cert_pem.as_bytes(), key_pem.as_bytes());
            let made = load_pem(cert, key, &cert_path, &key_path, names, provider)?;
            unstored.insert(dir, (cert_pem, key_pem));
            Ok(made)
        }
    }
}

/// Self-signed certificates that could not be stored, by the directory
/// they belong in: (certificate PEM, key PEM).
static UNSTORED: Mutex<BTreeMap<PathBuf, (String, String)>> = Mutex::new(BTreeMap::new());

/// A fresh ECDSA P-256 certificate for `names`, as (certificate PEM, key PEM).
pub fn generate_self_signed(names: &[HostPattern]) -> Result<(String, String), rcgen::Error> {
    let sans = crate::config::names::to_strings(names);
    let mut params = rcgen::CertificateParams::new(sans.clone())?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        sans.first().cloned().unwrap_or_default(),
    );
    dn.push(rcgen::DnType::OrganizationName, "portcullis self-signed");
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + SELF_SIGNED_LIFETIME;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Lower-case hex of SHA-256 (DANE's `x 1 1` data), from the TLS
/// provider's own hash.
pub fn sha256_hex(data: &[u8]) -> String {
    let rustls::SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        unreachable!("a TLS 1.3 suite")
    };
    hex(suite.common.hash_provider.hash(data).as_ref())
}

/// The signature algorithm of keys of `key_type`: the one place a
/// `key_type` becomes a key.
pub fn key_algorithm(key_type: crate::config::KeyType) -> &'static rcgen::SignatureAlgorithm {
    use crate::config::KeyType;
    match key_type {
        KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
    }
}

/// Lower-case hex: DANE data, tls-alpn-01 digests in the cluster store.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<HostPattern> {
        list.iter()
            .map(|n| HostPattern::parse(n).unwrap())
            .collect()
    }

    fn provider() -> CryptoProvider {
        rustls::crypto::aws_lc_rs::default_provider()
    }

    fn write_pair(dir: &Path, tag: &str, for_names: &[&str]) -> (PathBuf, PathBuf) {
        let (c, k) = generate_self_signed(&names(for_names)).unwrap();
        let (cp, kp) = (
            dir.join(format!("{tag}.crt")),
            dir.join(format!("{tag}.key")),
        );
        std::fs::write(&cp, c).unwrap();
        std::fs::write(&kp, k).unwrap();
        (cp, kp)
    }

    #[test]
    fn a_matching_pair_loads_and_reports_its_names() {
        let d = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(d.path(), "a", &["mail.example.test", "*.example.org"]);
        let want = names(&[
            "mail.example.test",
            "x.example.org",
            "*.example.org",
            "other.test",
        ]);
        let loaded = load_files(&c, &k, &want, &provider()).unwrap();
        assert_eq!(loaded.info.sans, vec!["mail.example.test", "*.example.org"]);
        assert_eq!(loaded.info.uncovered, vec!["other.test"]);
        assert!(loaded.info.not_after > unix_now());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (c, _) = write_pair(d.path(), "a", &["mail.example.test"]);
        let (_, k) = write_pair(d.path(), "b", &["mail.example.test"]);
        let err = load_files(&c, &k, &names(&["mail.example.test"]), &provider()).unwrap_err();
        assert!(matches!(err, CertError::Mismatch { .. }), "{err}");
        assert!(
            err.to_string().contains("does not match the certificate"),
            "{err}"
        );
    }

    #[test]
    fn a_certificate_for_other_names_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(d.path(), "a", &["www.elsewhere.test"]);
        let err = load_files(&c, &k, &names(&["mail.example.test"]), &provider()).unwrap_err();
        assert!(
            err.to_string().contains("covers none of the host's names"),
            "{err}"
        );
    }

    #[test]
    fn broken_files_are_named_in_the_error() {
        let d = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(d.path(), "a", &["mail.example.test"]);
        let n = names(&["mail.example.test"]);
        let missing = d.path().join("nope.pem");
        let err = load_files(&missing, &k, &n, &provider()).unwrap_err();
        assert!(err.to_string().contains("nope.pem: cannot read"), "{err}");
        let garbage = d.path().join("garbage.pem");
        std::fs::write(&garbage, "hello\n").unwrap();
        assert!(matches!(
            load_files(&garbage, &k, &n, &provider()),
            Err(CertError::NoCertificate { .. })
        ));
        assert!(matches!(
            load_files(&c, &garbage, &n, &provider()),
            Err(CertError::NoKey { .. })
        ));
        // a half-written certificate file: PEM cut in the middle
        let pem = std::fs::read_to_string(&c).unwrap();
        std::fs::write(&garbage, &pem[..pem.len() / 2]).unwrap();
        assert!(load_files(&garbage, &k, &n, &provider()).is_err());
    }

    #[test]
    fn a_self_signed_certificate_that_cannot_be_stored_is_served_from_memory() {
        let d = tempfile::tempdir().unwrap();
        // `self-signed` is a file here: nothing can be written below it.
        std::fs::write(d.path().join("self-signed"), "in the way").unwrap();
        let n = names(&["mail.example.test"]);
        let first = self_signed(d.path(), &n, &provider()).unwrap();
        assert_eq!(first.info.sans, ["mail.example.test"]);
        let again = self_signed(d.path(), &n, &provider()).unwrap();
        assert_eq!(
            first.key.cert, again.key.cert,
            "the same one while the process runs"
        );
        let more = names(&["mail.example.test", "imap.example.test"]);
        let other = self_signed(d.path(), &more, &provider()).unwrap();
        assert_ne!(first.key.cert, other.key.cert, "other names, another one");
    }

    #[test]
    fn self_signed_certificates_persist_until_the_names_change() {
        let d = tempfile::tempdir().unwrap();
        let n = names(&["mail.example.test", "*.example.test"]);
        let first = self_signed(d.path(), &n, &provider()).unwrap();
        let again = self_signed(d.path(), &n, &provider()).unwrap();
        assert_eq!(first.key.cert, again.key.cert, "reused across restarts");
        let key = self_signed_dir(d.path(), &n).join("key.pem");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let more = names(&["mail.example.test", "*.example.test", "imap.example.test"]);
        let changed = self_signed(d.path(), &more, &provider()).unwrap();
        assert_ne!(first.key.cert, changed.key.cert);
        assert_eq!(changed.info.sans.len(), 3);
    }
}
