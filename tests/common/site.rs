//! One portcullis "site" for the ACME tests (tests/acme.rs, tests/chaos.rs):
//! a host `certificate: acme` with two names, its listeners on ports Pebble
//! validates against, an echo backend, and the helpers that ask it what it
//! serves, stores and says.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portcullis::ops::control::{self, CertRow, RenewRow, Request, Response};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::acme::{free_port, Pebble};
use super::{tls_connect, Backend, Proxy};

/// Bound on an issuance (Pebble takes about 0.7 s).
pub const ISSUE: Duration = Duration::from_secs(30);
/// Bound on one control-socket request.
pub const CONTROL: Duration = Duration::from_secs(120);
pub const DAY: Duration = Duration::from_secs(86_400);
pub const HOUR: Duration = Duration::from_secs(3600);

/// One portcullis site: a host `certificate: acme` with two names, and the
/// listeners `imaps-TAG` (implicit TLS, IMAP; Pebble's tlsPort), `smtps-TAG`
/// (implicit TLS, SMTP) and `http-TAG` (Pebble's httpPort), both mail
/// listeners routed to one echo backend that expects a PROXY header. The
/// state_dir (absolute) and the config file live in [`Site::dir`], which
/// outlives every proxy started on it.
pub struct Site {
    pub tag: &'static str,
    pub names: [String; 2],
    /// Fixed before Pebble starts: its validator connects here.
    pub http: u16,
    pub imaps: u16,
    pub dir: tempfile::TempDir,
    pub backend: Backend,
}

impl Site {
    pub async fn new(tag: &'static str) -> Site {
        Site {
            tag,
            names: [format!("imap.{tag}.test"), format!("smtp.{tag}.test")],
            http: free_port(),
            imaps: free_port(),
            dir: super::scratch(),
            backend: Backend::start("* OK echo\r\n", true).await,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.yaml")
    }

    /// `state_dir/certs/<first name>`.
    pub fn host_dir(&self) -> PathBuf {
        self.state_dir().join("certs").join(&self.names[0])
    }

    pub fn imaps(&self) -> String {
        format!("imaps-{}", self.tag)
    }

    pub fn smtps(&self) -> String {
        format!("smtps-{}", self.tag)
    }

    /// Moves the stored certificate's issuance time `ago` into the past, as
    /// if it had been issued then: a restart does not hold a renewal back
    /// for the hour after an issuance.
    pub fn age_stored_certificate(&self, ago: Duration) {
        let path = self.host_dir().join("meta.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut meta: serde_json::Value = serde_json::from_str(&text).unwrap();
        meta["issued_at"] = rfc3339(SystemTime::now() - ago).into();
        std::fs::write(&path, meta.to_string()).unwrap();
    }

    /// The ACME task's span, as the log prints it.
    pub fn span(&self) -> String {
        format!("acme{{host={}}}", self.names[0])
    }

    /// The `host=` field of start-up lines, as the log prints it.
    pub fn host_field(&self) -> String {
        format!("host={} ", self.names[0])
    }

    /// The config for `directory`, also written to [`Site::config_path`] for
    /// the CLI. `challenges`: the YAML list's items.
    pub fn config(&self, directory: &str, ca_roots: &Path, challenges: &str) -> String {
        let (tag, [n0, n1]) = (self.tag, &self.names);
        let yaml = format!(
            r#"
state_dir: {state}
acme:
  directory: {directory}
  contact: ["mailto:postmaster@{n0}"]
  terms_of_service_agreed: true
  challenges: [{challenges}]
  ca_roots: {ca_roots}
listeners:
  imaps-{tag}: {{ bind: "127.0.0.1:{imaps}", protocol: imap, tls: implicit }}
  smtps-{tag}: {{ bind: "127.0.0.1:0", protocol: smtp, tls: implicit }}
  http-{tag}: {{ bind: "127.0.0.1:{http}", protocol: http }}
backends:
  imaps-{tag}: "{backend}"
  smtps-{tag}: "{backend}"
hosts:
  - names: [{n0}, {n1}]
    certificate: acme
"#,
            state = self.state_dir().display(),
            ca_roots = ca_roots.display(),
            imaps = self.imaps,
            http = self.http,
            backend = self.backend.addr,
        );
        std::fs::write(self.config_path(), &yaml).expect("write config");
        yaml
    }
}

/// Polls `check` every 50 ms until it gives a value, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The chain a handshake with SNI `sni` is served, leaf first.
pub async fn served_chain(addr: SocketAddr, sni: &str) -> std::io::Result<Vec<Vec<u8>>> {
    let tls = tls_connect(addr, Some(sni)).await?;
    let (_, conn) = tls.get_ref();
    Ok(conn
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.to_vec())
        .collect())
}

/// Serial in upper-case hex, as portcullis logs and reports it.
pub fn serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate parses");
    cert.tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

pub fn is_placeholder(chain: &[Vec<u8>]) -> bool {
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).expect("certificate parses");
    cert.issuer().to_string().contains("portcullis self-signed")
}

/// Handshakes until the certificate served is an issued one (not the
/// placeholder) whose serial is not `old`; `None` after [`ISSUE`].
pub async fn wait_issued(addr: SocketAddr, sni: &str, old: Option<&str>) -> Option<Vec<Vec<u8>>> {
    eventually(ISSUE, || async move {
        let chain = served_chain(addr, sni).await.ok()?;
        let fresh = !is_placeholder(&chain) && Some(serial(&chain[0]).as_str()) != old;
        fresh.then_some(chain)
    })
    .await
}

/// Renews the site's host through the control socket.
pub async fn renew(site: &Site, force: bool) -> RenewRow {
    let request = Request::Renew {
        dry_run: false,
        force,
        name: Some(site.names[0].clone()),
    };
    match control::request(&site.state_dir(), &request, CONTROL).await {
        Ok(Response::Renew(mut rows)) if rows.len() == 1 => rows.remove(0),
        other => panic!("renew: {other:?}"),
    }
}

/// The site's host in `certs`, through the control socket.
pub async fn cert_row(site: &Site) -> CertRow {
    match control::request(&site.state_dir(), &Request::Certs, CONTROL).await {
        Ok(Response::Certs(rows)) => rows
            .into_iter()
            .find(|r| r.names == site.names)
            .expect("the host is listed"),
        other => panic!("certs: {other:?}"),
    }
}

pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The PEM chain in `fullchain.pem`, leaf first; panics if any block is broken.
pub fn stored_chain(site: &Site) -> Vec<Vec<u8>> {
    let path = site.host_dir().join("fullchain.pem");
    CertificateDer::pem_file_iter(&path)
        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
        .map(|c| {
            c.unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
                .to_vec()
        })
        .collect()
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Now, to the second (what the ARI proxy answers with).
pub fn now_secs() -> SystemTime {
    UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
}

/// Starts Pebble (validating on the site's ports) and portcullis, and waits
/// for the first certificate.
pub async fn issued_site(
    tag: &'static str,
    challenges: &str,
) -> (Site, Pebble, Proxy, String, Vec<Vec<u8>>) {
    let site = Site::new(tag).await;
    let pebble = Pebble::start(site.http, site.imaps).await;
    let yaml = site.config(&pebble.directory, &pebble.ca_roots, challenges);
    let proxy = Proxy::start(&yaml).await;
    let chain = wait_issued(proxy.addr(&site.imaps()), &site.names[0], None)
        .await
        .unwrap_or_else(|| panic!("{tag}: no certificate within {ISSUE:?}\n{}", pebble.log()));
    (site, pebble, proxy, yaml, chain)
}
