//! `portcullis tlsa HOST`: the DANE TLSA records (RFC 6698, RFC 7672) of a
//! host's certificate as it is on disk, in zone-file form. `3 1 1` names
//! the certificate's own key (SHA-256 of its SubjectPublicKeyInfo), one
//! record for each TLS port the host is served on; with `--issuer`, also
//! `2 1 1`, the key of the CA that issued it. With `acme: { key: reuse }`
//! the `3 1 1` record stays valid across renewals; with `key: rollover`
//! the next key's record is printed too, to be published ahead of it.
//! A host with two certificates (`key_types: [ecdsa-p256, rsa-2048]`, two
//! file pairs) gets the records of both: a DANE client may be served either.

use std::path::PathBuf;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::config::{CertSource, Config, Host, KeyPolicy};

/// The records for the host named `name`, one line each.
pub fn records(config: &Config, name: &str, issuer: bool) -> Result<Vec<String>, String> {
    let wanted = name.trim_end_matches('.').to_ascii_lowercase();
    let host = config
        .hosts
        .iter()
        .find(|h| h.names.iter().any(|n| n.to_string() == wanted))
        .ok_or_else(|| format!("no host is named {name}"))?;
    let mut chains = Vec::new();
    for path in chain_files(config, host)? {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("{}: {e:?}", path.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        chains.push((path, chain));
    }
    // A `key: rollover` host's next key, waiting to be published.
    let first = host
        .names
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    let next = match &config.acme {
        Some(a) if a.key_for(&first) == KeyPolicy::Rollover => {
            crate::acme::rollover::load(&config.state_dir, &first).map(|n| n.spki_sha256)
        }
        _ => None,
    };
    let owners = crate::config::tlsa_owners(&config.listeners, host);
    if owners.is_empty() {
        return Err(format!(
            "no TLS listener carries {name}: a TLSA record names a TLS port"
        ));
    }
    let lines = |usage: u8, digest: &str, note: &str| -> Vec<String> {
        owners
            .iter()
            .map(|owner| format!("{owner}. IN TLSA {usage} 1 1 {digest}{note}"))
            .collect()
    };
    let mut out = Vec::new();
    for (_, chain) in &chains {
        out.extend(lines(3, &spki_sha256(&chain[0])?, ""));
    }
    if let Some(next) = next {
        out.extend(lines(
            3,
            &next,
            " ; the next key: publish it now, it is used once served",
        ));
    }
    if issuer {
        for (path, chain) in &chains {
            let ca = chain.get(1).ok_or_else(|| {
                format!("{}: no issuer certificate after the leaf", path.display())
            })?;
            for line in lines(2, &spki_sha256(ca)?, "") {
                // Both certificates may come from one issuer.
                if !out.contains(&line) {
                    out.push(line);
                }
            }
        }
    }
    Ok(out)
}

/// Where the host's certificate chains are (two for a host with two key
/// types or file pairs), leaf first.
fn chain_files(config: &Config, host: &Host) -> Result<Vec<PathBuf>, String> {
    match &host.certificate {
        CertSource::Files { cert, second, .. } => Ok(std::iter::once(cert.clone())
            .chain(second.iter().map(|(c, _)| c.clone()))
            .collect()),
        CertSource::Acme => {
            let first = host.names[0].to_string();
            let types = config
                .acme
                .as_ref()
                .map_or(&[crate::config::KeyType::EcdsaP256][..], |a| {
                    a.key_types_for(&first)
                });
            let mut files = Vec::new();
            for lineage in crate::acme::Lineage::of(&host.names, types) {
                let dir = crate::acme::store::host_dir(&config.state_dir, &lineage);
                let chain = dir.join("fullchain.pem");
                if !chain.exists() {
                    return Err(format!(
                        "{}: no {} certificate issued yet for this host",
                        chain.display(),
                        lineage.key_type.as_str()
                    ));
                }
                files.push(chain);
            }
            Ok(files)
        }
        CertSource::SelfSigned => Err(
            "a self-signed certificate is made anew when it cannot be kept: no TLSA record can follow it"
                .into(),
        ),
    }
}

/// Lower-case hex of the SHA-256 of a certificate's SubjectPublicKeyInfo.
fn spki_sha256(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    Ok(crate::tls::certs::sha256_hex(spki))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> Config {
        let yaml = format!(
            r#"
state_dir: {state}
listeners:
  smtp: {{ bind: "127.0.0.1:2525", protocol: smtp, tls: starttls }}
  submissions: {{ bind: "127.0.0.1:4465", protocol: smtp, tls: implicit }}
  imaps: {{ bind: "127.0.0.1:9993", protocol: imap, tls: implicit }}
  http: {{ bind: "127.0.0.1:8080", protocol: http }}
backends:
  smtp: 127.0.0.1:25
  submissions: 127.0.0.1:465
hosts:
  - names: [mx.example.test, "*.example.test"]
    certificate: {{ cert: {cert}, key: {key} }}
  - names: [other.example.test]
    certificate: self-signed
"#,
            state = dir.join("state").display(),
            cert = cert.display(),
            key = key.display(),
        );
        Config::parse(&yaml, dir).unwrap()
    }

    #[test]
    fn records_name_each_tls_port_of_the_host_and_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["mx.example.test".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let c = config(dir.path(), &cert_path, &key_path);

        let want =
            crate::tls::certs::sha256_hex(&rcgen::PublicKeyData::subject_public_key_info(&key));
        let lines = records(&c, "MX.example.test.", false).unwrap();
        assert_eq!(
            lines,
            [
                format!("_2525._tcp.mx.example.test. IN TLSA 3 1 1 {want}"),
                format!("_4465._tcp.mx.example.test. IN TLSA 3 1 1 {want}"),
            ],
            "the host's TLS listeners only (no imaps backend, no http), no wildcard owner"
        );
        let e = records(&c, "mx.example.test", true).unwrap_err();
        assert!(e.contains("no issuer certificate after the leaf"), "{e}");
        let e = records(&c, "other.example.test", false).unwrap_err();
        assert!(e.contains("self-signed"), "{e}");
        let e = records(&c, "nobody.example.test", false).unwrap_err();
        assert_eq!(e, "no host is named nobody.example.test");
    }
}
