//! A real ACME server for the ACME tests: Let's Encrypt's Pebble (Debian's
//! `pebble` package, 2.4.0), with `pebble-challtestsrv` as its DNS server
//! (every name resolves to 127.0.0.1), and an [`AriProxy`] in front of it for
//! the renewal-information (RFC 9773) endpoint Pebble 2.4 lacks.
//!
//! Everything runs on free loopback ports in its own scratch directory, so the
//! tests run in parallel; dropping a [`Pebble`] or [`AriProxy`] kills its
//! processes. Pebble's own HTTPS API is served with a certificate for
//! 127.0.0.1 from a CA generated per run ([`PebblePorts::ca_roots`]); the
//! certificates Pebble issues chain to a different root, which Pebble
//! generates at each start ([`Pebble::root_der`]).
//!
//! Pebble runs with `PEBBLE_VA_NOSLEEP=1` (no random validation delays),
//! `PEBBLE_AUTHZREUSE=0` (a fresh authorization for every order) and
//! `PEBBLE_WFE_NONCEREJECT=0` (no random `badNonce` rejections; see
//! [`PebblePorts::nonce_reject_percent`]).
//!
//! What Pebble 2.4 does, for the tests' expectations: it validates each
//! challenge with three concurrent requests or handshakes (its log: "Starting
//! 3 validations"); http-01 requests carry `Host: NAME:PORT`, the port
//! included; tls-alpn-01 handshakes send SNI = the name and ALPN
//! `acme-tls/1`, and work with TLS 1.2 or 1.3. A restarted Pebble has a new
//! root and forgets every account and order.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tool;

/// The ARI proxy, run with `python3 -c`.
const ARI_PROXY: &str = include_str!("../fixtures/acme/ari_proxy.py");
/// Bound on a server starting to answer.
const START: Duration = Duration::from_secs(20);
/// Bound on one HTTPS request of [`https_get`].
const REQUEST: Duration = Duration::from_secs(10);

/// The programs every ACME test runs; a missing one skips loudly.
pub fn tools(test: &str) -> bool {
    ["pebble", "pebble-challtestsrv", "python3"]
        .iter()
        .all(|t| tool(t, test))
}

pub use super::free_port;

/// What a Pebble will listen on, and the CA its API certificate comes from:
/// known before it starts, so a portcullis config can name them first.
pub struct PebblePorts {
    /// `https://127.0.0.1:PORT/dir`.
    pub directory: String,
    /// PEM of the CA of Pebble's (and the [`AriProxy`]'s) HTTPS listener.
    pub ca_roots: PathBuf,
    /// The ACME API port.
    pub listen: u16,
    /// The management API port (`/roots/0`, `/intermediates/0`).
    pub management: u16,
    /// Lifetime of the certificates Pebble issues (its default: 5 years).
    pub cert_validity: Option<Duration>,
    /// Percentage of good nonces Pebble rejects with `badNonce` (default 0).
    pub nonce_reject_percent: u8,
    /// The DNS server Pebble resolves names and checks dns-01 at; its own
    /// challtestsrv when `None`.
    pub dns_server: Option<std::net::SocketAddr>,
    dns: u16,
    dns_management: u16,
    dir: tempfile::TempDir,
}

impl PebblePorts {
    /// Starts Pebble on these ports. Its validator connects to `http_port`
    /// for http-01 and `tls_port` for tls-alpn-01, on 127.0.0.1.
    pub async fn start(self, http_port: u16, tls_port: u16) -> Pebble {
        let d = self.dir.path();
        let mut config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{}", self.listen),
            "managementListenAddress": format!("127.0.0.1:{}", self.management),
            "certificate": d.join("cert.pem"),
            "privateKey": d.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(v) = self.cert_validity {
            config["pebble"]["certificateValidityPeriod"] = v.as_secs().into();
        }
        std::fs::write(d.join("pebble.json"), config.to_string()).expect("write pebble.json");

        let dns = spawn(
            Command::new("pebble-challtestsrv")
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .arg("-dns01")
                .arg(format!("127.0.0.1:{}", self.dns))
                .arg("-management")
                .arg(format!("127.0.0.1:{}", self.dns_management)),
            &d.join("challtestsrv.log"),
        );
        let pebble = spawn(
            Command::new("pebble")
                .arg("-config")
                .arg(d.join("pebble.json"))
                .arg("-dnsserver")
                .arg(
                    self.dns_server
                        .map_or(format!("127.0.0.1:{}", self.dns), |a| a.to_string()),
                )
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_AUTHZREUSE", "0")
                .env(
                    "PEBBLE_WFE_NONCEREJECT",
                    self.nonce_reject_percent.to_string(),
                ),
            &d.join("pebble.log"),
        );
        let mut p = Pebble {
            directory: self.directory.clone(),
            ca_roots: self.ca_roots.clone(),
            http_port,
            tls_port,
            procs: Procs { pebble, dns },
            ports: self,
        };
        p.wait_ready().await;
        p
    }
}

/// A running Pebble and its DNS server. Dropping it kills both.
pub struct Pebble {
    /// `https://127.0.0.1:PORT/dir`.
    pub directory: String,
    /// PEM of the CA of Pebble's HTTPS listener: what `acme.ca_roots` names.
    pub ca_roots: PathBuf,
    /// Where its validator connects for http-01 and tls-alpn-01.
    pub http_port: u16,
    pub tls_port: u16,
    // Killed before the directory is removed.
    procs: Procs,
    ports: PebblePorts,
}

/// Pebble and its DNS server, killed on drop.
struct Procs {
    pebble: Child,
    dns: Child,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in [&mut self.pebble, &mut self.dns] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pebble {
    /// Free ports and a listener CA for a Pebble to be started later, with
    /// [`PebblePorts::start`].
    pub fn reserve() -> PebblePorts {
        let dir = super::scratch();
        write_listener_pki(dir.path());
        let listen = free_port();
        PebblePorts {
            directory: format!("https://127.0.0.1:{listen}/dir"),
            ca_roots: dir.path().join("ca.pem"),
            listen,
            management: free_port(),
            cert_validity: None,
            nonce_reject_percent: 0,
            dns_server: None,
            dns: free_port(),
            dns_management: free_port(),
            dir,
        }
    }

    /// Starts a Pebble now, on free ports.
    pub async fn start(http_port: u16, tls_port: u16) -> Pebble {
        Pebble::reserve().start(http_port, tls_port).await
    }

    pub fn ports(&self) -> &PebblePorts {
        &self.ports
    }

    /// Kills Pebble and its DNS server; [`PebblePorts::start`] brings it back
    /// on the same ports and listener CA. Pebble keeps no state: a restarted
    /// one has a new root, and knows no earlier account or order. Its log
    /// continues in the same file, so [`Pebble::orders`] keeps counting.
    pub fn stop(self) -> PebblePorts {
        drop(self.procs);
        self.ports
    }

    /// Waits until the directory answers; panics with the logs after [`START`].
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START;
        loop {
            let exited = [
                ("pebble", self.procs.pebble.try_wait()),
                ("pebble-challtestsrv", self.procs.dns.try_wait()),
            ];
            if let Some((name, Ok(Some(status)))) =
                exited.iter().find(|(_, e)| matches!(e, Ok(Some(_))))
            {
                panic!("{name} exited ({status}) while starting:\n{}", self.log());
            }
            let dns_up = std::net::TcpStream::connect(("127.0.0.1", self.ports.dns)).is_ok();
            if dns_up {
                if let Ok(r) = try_https_get(&self.directory, &self.ca_roots).await {
                    if r.status == 200 {
                        return;
                    }
                }
            }
            if Instant::now() > deadline {
                panic!("Pebble did not answer within {START:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// DER of the root the certificates Pebble issues chain to.
    pub async fn root_der(&self) -> Vec<u8> {
        let url = format!("https://127.0.0.1:{}/roots/0", self.ports.management);
        let r = https_get(&url, &self.ca_roots).await;
        assert_eq!(r.status, 200, "{url}: {}", r.text());
        CertificateDer::from_pem_slice(&r.body)
            .unwrap_or_else(|e| panic!("{url} is no PEM certificate ({e:?}): {}", r.text()))
            .to_vec()
    }

    /// Points every name Pebble validates at `ip` (its DNS server's default
    /// A record; 127.0.0.1 at start): the instance listening there answers.
    pub async fn set_default_ipv4(&self, ip: &str) {
        let body = serde_json::json!({ "ip": ip }).to_string();
        let request = format!(
            "POST /set-default-ipv4 HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(("127.0.0.1", self.ports.dns_management))
            .await
            .expect("challtestsrv management port");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let read = s.read_to_string(&mut answer);
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("challtestsrv answers within 5 s")
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
            "set-default-ipv4: {answer}"
        );
    }

    /// New orders Pebble has accepted so far (its log says `Added order`).
    pub fn orders(&self) -> usize {
        self.log().matches("Added order").count()
    }

    /// Certificates Pebble has issued so far (`Issued certificate serial`).
    pub fn issued(&self) -> usize {
        self.log().matches("Issued certificate serial").count()
    }

    /// Pebble's log, then its DNS server's.
    pub fn log(&self) -> String {
        let d = self.ports.dir.path();
        format!(
            "--- pebble ---\n{}--- pebble-challtestsrv ---\n{}",
            read(&d.join("pebble.log")),
            read(&d.join("challtestsrv.log"))
        )
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| format!("({}: {e})\n", p.display()))
}

/// Starts `command` with stdout and stderr appended to `log`.
fn spawn(command: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let err = out.try_clone().expect("log file");
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"))
}

/// `ca.pem`, and `cert.pem` + `key.pem` for 127.0.0.1 and localhost from it.
fn write_listener_pki(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "pebble listener CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf_cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
}

/// Whether `chain` (leaf first, as served) chains to `root_der` and covers
/// the DNS name `name`, by rustls's own server-certificate verifier. Says
/// why not on stderr.
pub fn chains_to(root_der: &[u8], chain: &[Vec<u8>], name: &str) -> bool {
    let Some((leaf, intermediates)) = chain.split_first() else {
        eprintln!("chains_to: empty chain");
        return false;
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(root_der.to_vec()))
        .expect("root certificate");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    match verifier.verify_server_cert(
        &CertificateDer::from(leaf.as_slice()),
        &intermediates,
        &server_name,
        &[],
        UnixTime::now(),
    ) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("chains_to({name}): {e}");
            false
        }
    }
}

/// One HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// GETs `https://127.0.0.1:PORT/path`, trusting only the PEM CA `ca`;
/// panics on a connection or TLS failure.
pub async fn https_get(url: &str, ca: &Path) -> HttpResponse {
    try_https_get(url, ca)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// [`https_get`], with connection and TLS failures as errors (a server that
/// is down, for one). An HTTP/1.0 request: the body ends at EOF.
pub async fn try_https_get(url: &str, ca: &Path) -> std::io::Result<HttpResponse> {
    let rest = url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("not an https URL: {url}"));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: std::net::SocketAddr = authority
        .parse()
        .unwrap_or_else(|_| panic!("{url}: the host must be an IP literal with a port"));
    let path = if path.is_empty() { "/" } else { path };

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(std::io::Error::other)? {
        roots
            .add(c.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let raw = tokio::time::timeout(REQUEST, async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
        tls.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match tls.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
                // A server that closes without close_notify (Python's ssl).
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        Ok::<_, std::io::Error>(raw)
    })
    .await
    .map_err(|_| std::io::Error::other(format!("no answer within {REQUEST:?}")))??;

    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => {
            return Err(std::io::Error::other(format!(
                "bad HTTP response: {:?}",
                String::from_utf8_lossy(&raw)
            )))
        }
    };
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut body = raw[head_len..].to_vec();
    if let Some((_, n)) = headers.iter().find(|(k, _)| k == "content-length") {
        body.truncate(n.trim().parse().unwrap_or(body.len()));
    }
    Ok(HttpResponse {
        status: parsed.code.unwrap_or(0),
        headers,
        body,
    })
}

/// An HTTPS reverse proxy in front of a Pebble that adds ARI (RFC 9773) and,
/// when asked, faults ([`AriProxy::set_faults`]):
/// `tests/fixtures/acme/ari_proxy.py`. Its directory is Pebble's plus
/// `renewalInfo`; `GET /ari/<certid>` answers the window of
/// [`AriProxy::set_window`]; a newOrder's `replaces` is reflected in the
/// order, as RFC 9773 requires. Its certificate is from the same listener
/// CA as Pebble's, so [`Pebble::ca_roots`] works for both. Dropping it
/// kills it.
pub struct AriProxy {
    /// `https://127.0.0.1:PORT/dir`.
    pub directory: String,
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl AriProxy {
    /// Starts a proxy for a running Pebble, on a free port.
    pub async fn start(pebble: &Pebble) -> AriProxy {
        AriProxy::start_for(pebble.ports(), 0).await
    }

    /// Starts a proxy for a Pebble that may not run yet (until it does, the
    /// proxy answers 502), on `port` (0: a free one).
    pub async fn start_for(pebble: &PebblePorts, port: u16) -> AriProxy {
        let dir = super::scratch();
        let state = dir.path();
        let pki = pebble.dir.path();
        let mut proxy = AriProxy {
            directory: String::new(),
            port: 0,
            child: spawn(
                Command::new("python3")
                    .arg("-c")
                    .arg(ARI_PROXY)
                    .arg(state)
                    .arg(pki.join("cert.pem"))
                    .arg(pki.join("key.pem"))
                    .arg(pki.join("ca.pem"))
                    .arg(pebble.listen.to_string())
                    .arg(port.to_string()),
                &state.join("proxy.log"),
            ),
            dir,
        };
        // Until a test says otherwise: no renewal wanted for a year. Asked
        // again every second, so that a test's new window is seen at once.
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        proxy.set_window(now + 365 * day, now + 366 * day, 1);

        let deadline = Instant::now() + START;
        let port_file = proxy.dir.path().join("port");
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!("ari_proxy exited ({status}):\n{}", proxy.log());
            }
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                proxy.port = p.trim().parse().expect("port file");
                break;
            }
            if Instant::now() > deadline {
                panic!("ari_proxy did not start within {START:?}:\n{}", proxy.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy.directory = format!("https://127.0.0.1:{}/dir", proxy.port);
        proxy
    }

    /// The window (and `Retry-After`, in seconds) every `GET /ari/…` answers
    /// from now on.
    pub fn set_window(&self, start: SystemTime, end: SystemTime, retry_after_secs: u64) {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
        let w = serde_json::json!({
            "start": secs(start), "end": secs(end), "retry_after": retry_after_secs,
        });
        self.write_json("window", &w);
    }

    /// From now on, `percent` of all requests (0 to 100) get `status` and
    /// `body` (HTML) instead of reaching Pebble; status 0 closes the
    /// connection without an answer.
    pub fn set_faults(&self, percent: u8, status: u16, body: &str) {
        let spec = serde_json::json!({
            "percent": percent, "status": status, "body": body, "content_type": "text/html",
        });
        self.write_json("faults", &spec);
    }

    /// [`AriProxy::set_faults`] for every request, with a `Retry-After` of
    /// `secs` (a load balancer that says when to come back).
    pub fn set_outage(&self, status: u16, body: &str, secs: u64) {
        let spec = serde_json::json!({
            "percent": 100, "status": status, "body": body, "content_type": "text/html",
            "retry_after": secs,
        });
        self.write_json("faults", &spec);
    }

    /// From now on, every finalize's answer is lost on the way back (a load
    /// balancer that timed out while the CA acted: the client gets a 504),
    /// every challenge "ready" answer breaks off halfway, and of all other
    /// requests `percent` lose their answer the same way as finalize.
    pub fn set_lost_answers(&self, percent: u8) {
        let lost = |paths: Option<&[&str]>, percent: u8| {
            serde_json::json!({
                "paths": paths, "percent": percent, "status": 504, "lost": true,
                "body": "<html><body>Gateway Timeout</body></html>", "content_type": "text/html",
            })
        };
        let cut = serde_json::json!({ "paths": ["/chalZ/"], "percent": 100, "cut": true });
        let specs = serde_json::json!([
            lost(Some(&["/finalize-order/"]), 100),
            cut,
            lost(None, percent)
        ]);
        self.write_json("faults", &specs);
    }

    /// No more faults.
    pub fn clear_faults(&self) {
        let _ = std::fs::remove_file(self.dir.path().join("faults.json"));
    }

    /// Requests answered with a fault so far.
    pub fn faults_injected(&self) -> usize {
        self.lines("faults.txt").len()
    }

    /// Writes `STATE/NAME.json` in one rename: the proxy never reads half.
    fn write_json(&self, name: &str, value: &serde_json::Value) {
        let (tmp, path) = (
            self.dir.path().join(format!("{name}.tmp")),
            self.dir.path().join(format!("{name}.json")),
        );
        std::fs::write(&tmp, value.to_string()).expect("write the proxy's file");
        std::fs::rename(&tmp, &path).expect("rename the proxy's file");
    }

    /// Every `replaces` value of a newOrder so far, in order.
    pub fn replaces_seen(&self) -> Vec<String> {
        self.lines("replaces.txt")
    }

    /// Every certid asked for with `GET /ari/<certid>` so far, in order.
    pub fn ari_requests(&self) -> Vec<String> {
        self.lines("ari.txt")
    }

    fn lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The proxy's request log and errors.
    pub fn log(&self) -> String {
        read(&self.dir.path().join("proxy.log"))
    }
}

impl Drop for AriProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
