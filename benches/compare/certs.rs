//! One self-signed ECDSA P-256 certificate per host name, generated with
//! rcgen and written three ways so every proxy reads the same key and
//! certificate: `<name>.crt` + `<name>.key` (portcullis, nginx) and
//! `<name>.pem` with both (HAProxy's crt-list).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Cert {
    pub name: String,
    /// DER of the certificate, which the client pins per SNI name.
    pub der: Vec<u8>,
    pub crt: PathBuf,
    pub key: PathBuf,
    /// Certificate then key in one file.
    pub pem: PathBuf,
}

/// Generates and writes a certificate for `name` into `dir`.
pub fn generate(dir: &Path, name: &str) -> io::Result<Cert> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(io::Error::other)?;
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).map_err(io::Error::other)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).map_err(io::Error::other)?;
    let cert_pem = cert.pem();
    let key_pem = key.serialize_pem();
    let crt = dir.join(format!("{name}.crt"));
    let keyfile = dir.join(format!("{name}.key"));
    let pem = dir.join(format!("{name}.pem"));
    fs::write(&crt, &cert_pem)?;
    fs::write(&keyfile, &key_pem)?;
    fs::write(&pem, format!("{cert_pem}{key_pem}"))?;
    Ok(Cert {
        name: name.to_string(),
        der: cert.der().to_vec(),
        crt,
        key: keyfile,
        pem,
    })
}

/// `count` certificates named `h00000.scale.test`, … in `dir`.
pub fn generate_many(dir: &Path, count: usize) -> io::Result<Vec<Cert>> {
    fs::create_dir_all(dir)?;
    (0..count)
        .map(|i| generate(dir, &format!("h{i:05}.scale.test")))
        .collect()
}
