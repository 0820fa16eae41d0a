//! RSA beside ECDSA: a host with two certificates, one of each, serves the
//! ECDSA one to clients that offer its signature scheme and the RSA one to
//! the rest. Checked with real clients (`openssl s_client`) against
//! certificates a real Pebble issued (`key_types`), and against two file
//! pairs; `portcullis check` refuses pairs that cannot work together.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::acme::{tools, Pebble};
use common::site::*;
use common::{Backend, Proxy};

/// Bound on one openssl run.
const OPENSSL: Duration = Duration::from_secs(20);

/// An RSA-only TLS 1.3 client, and an RSA-only TLS 1.2 one.
const RSA_TLS13: &[&str] = &["-tls1_3", "-sigalgs", "RSA-PSS+SHA256"];
const RSA_TLS12: &[&str] = &["-tls1_2", "-sigalgs", "RSA+SHA256"];
/// openssl as it comes: offers ECDSA and RSA schemes.
const DEFAULT: &[&str] = &[];

fn have_openssl(test: &str) -> bool {
    common::tool("openssl", test)
}

/// What `openssl s_client` was served, read back by `openssl x509 -text`.
#[derive(Debug)]
struct Served {
    /// `rsaEncryption` or `id-ecPublicKey`.
    algorithm: String,
    issuer: String,
    /// `TLSv1.2`, `TLSv1.3`.
    protocol: String,
    /// The leaf, DER.
    der: Vec<u8>,
}

impl Served {
    fn rsa(&self) -> bool {
        self.algorithm == "rsaEncryption"
    }

    fn ecdsa(&self) -> bool {
        self.algorithm == "id-ecPublicKey"
    }

    fn placeholder(&self) -> bool {
        self.issuer.contains("portcullis self-signed")
    }
}

/// Connects with `openssl s_client` and the extra arguments `client`;
/// `None` when the handshake gave no certificate.
async fn openssl_served(addr: SocketAddr, sni: &str, client: &[&str]) -> Option<Served> {
    let connect = addr.to_string();
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-servername",
        sni,
        "-showcerts",
    ];
    args.extend_from_slice(client);
    let (_, out, _) = common::run_cmd("openssl", &args, b"", OPENSSL).await;
    let start = out.find("-----BEGIN CERTIFICATE-----")?;
    let end_marker = "-----END CERTIFICATE-----";
    let end = start + out[start..].find(end_marker)? + end_marker.len();
    let pem = &out[start..end];
    let protocol = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Protocol")
                .map(|r| r.trim_start_matches([' ', ':']))
        })
        .or_else(|| {
            out.lines()
                .find_map(|l| l.strip_prefix("New, ").and_then(|r| r.split(',').next()))
        })?
        .trim()
        .to_string();
    let (_, text, _) = common::run_cmd(
        "openssl",
        &["x509", "-noout", "-text"],
        pem.as_bytes(),
        OPENSSL,
    )
    .await;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
    };
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()?
        .to_vec();
    Some(Served {
        algorithm: field("Public Key Algorithm:")?,
        issuer: field("Issuer:")?,
        protocol,
        der,
    })
}

/// The `3 1 1` data of a certificate: SHA-256 of its SubjectPublicKeyInfo.
fn spki_sha256(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate parses");
    portcullis::tls::certs::sha256_hex(cert.public_key().raw)
}

/// Asks each kind of client until every one gets an issued certificate
/// of the kind it can take; the three, or a panic naming what was served.
async fn wait_both(addr: SocketAddr, sni: &str, pebble: &Pebble) -> [Served; 3] {
    let got = eventually(ISSUE, || async move {
        let rsa13 = openssl_served(addr, sni, RSA_TLS13).await?;
        let rsa12 = openssl_served(addr, sni, RSA_TLS12).await?;
        let default = openssl_served(addr, sni, DEFAULT).await?;
        let done = [&rsa13, &rsa12].iter().all(|s| s.rsa() && !s.placeholder())
            && default.ecdsa()
            && !default.placeholder();
        done.then_some([rsa13, rsa12, default])
    })
    .await;
    let Some(got) = got else {
        let now = [
            openssl_served(addr, sni, RSA_TLS13).await,
            openssl_served(addr, sni, RSA_TLS12).await,
            openssl_served(addr, sni, DEFAULT).await,
        ];
        panic!(
            "not both issued within {ISSUE:?}: served {now:#?}\n{}",
            pebble.log()
        );
    };
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_issues_both_types_and_each_client_gets_the_one_it_can_take() {
    let test = "acme_issues_both_types_and_each_client_gets_the_one_it_can_take";
    if !tools(test) || !have_openssl(test) {
        return;
    }
    let site = Site::new("kt").await;
    let pebble = Pebble::start(site.http, site.imaps).await;
    let yaml = site
        .config(&pebble.directory, &pebble.ca_roots, "tls-alpn-01, http-01")
        .replace(
            "  terms_of_service_agreed: true\n",
            "  terms_of_service_agreed: true\n  key_types: [ecdsa-p256, rsa-2048]\n",
        );
    std::fs::write(site.config_path(), &yaml).unwrap();
    let proxy = Proxy::start(&yaml).await;
    let addr = proxy.addr(&site.imaps());
    let sni = site.names[0].as_str();

    let [rsa13, rsa12, default] = wait_both(addr, sni, &pebble).await;
    assert_eq!(rsa13.protocol, "TLSv1.3", "{rsa13:?}");
    assert_eq!(rsa12.protocol, "TLSv1.2", "{rsa12:?}");
    assert_eq!(default.protocol, "TLSv1.3", "{default:?}");
    assert_eq!(rsa13.der, rsa12.der, "one RSA certificate");
    assert_eq!(pebble.orders(), 2, "one order per key type");

    // Each in its own place on disk.
    let ecdsa_dir = site.host_dir();
    let rsa_dir = site
        .state_dir()
        .join("certs")
        .join(format!("{sni}~rsa-2048"));
    for (dir, leaf) in [(&ecdsa_dir, &default.der), (&rsa_dir, &rsa13.der)] {
        let chain = std::fs::read(dir.join("fullchain.pem")).unwrap();
        use rustls::pki_types::pem::PemObject;
        let stored = rustls::pki_types::CertificateDer::from_pem_slice(&chain).unwrap();
        assert_eq!(stored.as_ref(), leaf.as_slice(), "{}", dir.display());
        assert_eq!(mode(&dir.join("privkey.pem")), 0o600);
    }

    // `certs`: a line for each, with its key type.
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let config = site.config_path();
    let config = config.to_str().unwrap();
    let (ok, out, err) = common::run_cmd(bin, &["certs", "--config", config], b"", CONTROL).await;
    assert!(ok, "{out}{err}");
    let names = site.names.join(",");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(names.as_str()))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[0][1..3], ["acme", "ecdsa-p256"], "{out}");
    assert_eq!(rows[1][1..3], ["acme", "rsa-2048"], "{out}");
    let (ok, out, err) =
        common::run_cmd(bin, &["certs", "--config", config, "--json"], b"", CONTROL).await;
    assert!(ok, "{out}{err}");
    let serials: Vec<(String, String)> = out
        .lines()
        .map(|l| serde_json::from_str::<portcullis::ops::control::CertRow>(l).unwrap())
        .filter(|r| r.names == site.names)
        .map(|r| (r.key_type, r.serial))
        .collect();
    assert_eq!(
        serials,
        [
            ("ecdsa-p256".to_string(), serial(&default.der)),
            ("rsa-2048".to_string(), serial(&rsa13.der)),
        ]
    );

    // `tlsa`: the records of both keys.
    let (ok, out, err) =
        common::run_cmd(bin, &["tlsa", "--config", config, sni], b"", CONTROL).await;
    assert!(ok, "{out}{err}");
    for leaf in [&default.der, &rsa13.der] {
        let want = format!("IN TLSA 3 1 1 {}", spki_sha256(leaf));
        assert!(out.contains(&want), "{want} not in:\n{out}");
    }

    // `renew --force NAME` renews each, and says which is which.
    let request = portcullis::ops::control::Request::Renew {
        dry_run: false,
        force: true,
        name: Some(site.names[0].clone()),
    };
    match portcullis::ops::control::request(&site.state_dir(), &request, CONTROL).await {
        Ok(portcullis::ops::control::Response::Renew(rows)) => {
            let got: Vec<(&str, &str)> = rows
                .iter()
                .map(|r| (r.host.as_str(), r.outcome.as_str()))
                .collect();
            let rsa_id = format!("{sni}~rsa-2048");
            assert_eq!(
                got,
                [(sni, "renewed"), (rsa_id.as_str(), "renewed")],
                "{rows:?}"
            );
        }
        other => panic!("renew: {other:?}"),
    }
    let rsa_renewed = openssl_served(addr, sni, RSA_TLS13).await.unwrap();
    let ecdsa_renewed = openssl_served(addr, sni, DEFAULT).await.unwrap();
    assert!(rsa_renewed.rsa() && rsa_renewed.der != rsa13.der);
    assert!(ecdsa_renewed.ecdsa() && ecdsa_renewed.der != default.der);

    // A restart serves both from the store at once, with no new order.
    let orders = pebble.orders();
    let [rsa_before, ecdsa_before] = [
        openssl_served(addr, sni, RSA_TLS13).await.unwrap(),
        openssl_served(addr, sni, DEFAULT).await.unwrap(),
    ];
    proxy.shutdown().await;
    let proxy = Proxy::start(&yaml).await;
    let addr = proxy.addr(&site.imaps());
    let rsa_after = openssl_served(addr, sni, RSA_TLS13).await.unwrap();
    let ecdsa_after = openssl_served(addr, sni, DEFAULT).await.unwrap();
    assert_eq!(rsa_after.der, rsa_before.der);
    assert_eq!(ecdsa_after.der, ecdsa_before.der);
    assert_eq!(pebble.orders(), orders, "nothing ordered at a restart");
    proxy.shutdown().await;
}

/// An RSA pair for `names`, as `common::cert_files` writes an ECDSA one.
fn rsa_files(dir: &Path, tag: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::CertificateParams::new(sans)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (
        dir.join(format!("{tag}.crt")),
        dir.join(format!("{tag}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn files_config(backend: &Backend, pairs: &[(&Path, &Path)]) -> String {
    let list: Vec<String> = pairs
        .iter()
        .map(|(c, k)| format!("{{ cert: {}, key: {} }}", c.display(), k.display()))
        .collect();
    format!(
        r#"
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends:
  imaps: "{backend}"
hosts:
  - names: [mail.pairs.test]
    certificate: [{list}]
"#,
        backend = backend.addr,
        list = list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_file_pairs_serve_each_client_the_one_it_can_take() {
    let test = "two_file_pairs_serve_each_client_the_one_it_can_take";
    if !have_openssl(test) {
        return;
    }
    let dir = common::scratch();
    let names = ["mail.pairs.test"];
    let (ec, ek) = common::cert_files(dir.path(), "ecdsa", &names);
    let (rc, rk) = rsa_files(dir.path(), "rsa", &names);
    let backend = Backend::start("* OK echo\r\n", true).await;
    // Either order: the pick is by kind, not by place.
    for pairs in [
        [(ec.as_path(), ek.as_path()), (rc.as_path(), rk.as_path())],
        [(rc.as_path(), rk.as_path()), (ec.as_path(), ek.as_path())],
    ] {
        let proxy = Proxy::start(&files_config(&backend, &pairs)).await;
        let addr = proxy.addr("imaps");
        let rsa13 = openssl_served(addr, names[0], RSA_TLS13).await.unwrap();
        let rsa12 = openssl_served(addr, names[0], RSA_TLS12).await.unwrap();
        let default = openssl_served(addr, names[0], DEFAULT).await.unwrap();
        assert!(rsa13.rsa() && rsa13.protocol == "TLSv1.3", "{rsa13:?}");
        assert!(rsa12.rsa() && rsa12.protocol == "TLSv1.2", "{rsa12:?}");
        assert!(default.ecdsa(), "{default:?}");
        // A TLS 1.2 client offering ECDSA too gets ECDSA.
        let ec12 = openssl_served(addr, names[0], &["-tls1_2"]).await.unwrap();
        assert!(ec12.ecdsa() && ec12.protocol == "TLSv1.2", "{ec12:?}");
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_pairs_that_cannot_work_together() {
    let dir = common::scratch();
    let names = ["mail.pairs.test"];
    let (ec, ek) = common::cert_files(dir.path(), "ecdsa", &names);
    let (ec2, ek2) = common::cert_files(dir.path(), "ecdsa2", &names);
    let (rc, rk) = rsa_files(dir.path(), "rsa", &names);
    let (rc2, rk2) = rsa_files(dir.path(), "rsa2", &names);
    let backend = Backend::start("* OK echo\r\n", true).await;
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let check = |pairs: Vec<(&Path, &Path)>| {
        let path = dir.path().join("check.yaml");
        std::fs::write(&path, files_config(&backend, &pairs)).unwrap();
        let out = std::process::Command::new(bin)
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(vec![(&ec, &ek), (&rc, &rk)]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = check(vec![(&rc, &rk), (&rc2, &rk2)]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("hosts[0] (mail.pairs.test): ") && err.contains("are both RSA"),
        "{err}"
    );
    let (code, err) = check(vec![(&ec, &ek), (&ec2, &ek2)]);
    assert_eq!(code, Some(1));
    assert!(err.contains("are both ECDSA"), "{err}");
    // The RSA certificate with the ECDSA key: named as any mismatch is.
    let (code, err) = check(vec![(&ec, &ek), (&rc, &ek2)]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!(
            "{} does not match the certificate in {}",
            ek2.display(),
            rc.display()
        )),
        "{err}"
    );
    let (code, err) = check(vec![(&ec, &ek)]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("hosts[0].certificate: a list of certificate files has two"),
        "{err}"
    );
}
