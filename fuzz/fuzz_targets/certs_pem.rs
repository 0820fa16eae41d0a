//! PEM and certificate loading: `certs::load_pem` on a PEM pair (certificate
//! chain, NUL, key) and `certs::cert_info` on raw DER (inputs starting with
//! 0x30, a DER SEQUENCE).
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use portcullis::config::names::HostPattern;
use portcullis::tls::certs::{cert_info, load_pem};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::CertificateDer;

static PROVIDER: LazyLock<CryptoProvider> =
    LazyLock::new(rustls::crypto::aws_lc_rs::default_provider);

static NAMES: LazyLock<Vec<HostPattern>> = LazyLock::new(|| {
    ["mail.example.test", "*.example.test", "other.test"]
        .iter()
        .filter_map(|n| HostPattern::parse(n).ok())
        .collect()
});

fuzz_target!(|data: &[u8]| {
    let names = NAMES.as_slice();
    if data.first() == Some(&0x30) {
        let der = CertificateDer::from(data);
        if let Ok(info) = cert_info(&der, names) {
            check(&info, names);
        }
        return;
    }
    let (cert, key) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (cert_path, key_path) = (Path::new("cert.pem"), Path::new("key.pem"));
    if let Ok(loaded) = load_pem(cert, key, cert_path, key_path, names, &PROVIDER) {
        check(&loaded.info, names);
        // Loaded whole: a chain whose first certificate is the one described,
        // covering at least one name.
        let first = loaded
            .key
            .cert
            .first()
            .expect("a loaded chain is not empty");
        // … and the files it was read from.
        assert_eq!(
            loaded.info.files,
            Some((cert_path.to_path_buf(), key_path.to_path_buf()))
        );
        let described = cert_info(first, names).map(|mut i| {
            i.files = loaded.info.files.clone();
            i
        });
        assert_eq!(described.as_ref(), Ok(&loaded.info));
        assert!(loaded.info.uncovered.len() < names.len());
    }
});

fn check(info: &portcullis::tls::certs::CertInfo, names: &[HostPattern]) {
    for san in &info.sans {
        assert_eq!(*san, san.to_ascii_lowercase());
    }
    let all: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    for u in &info.uncovered {
        assert!(all.contains(u), "uncovered {u} is not one of the names");
    }
    assert!(info.serial.bytes().all(|b| b.is_ascii_hexdigit()));
}
