//! Test harness: a real portcullis on 127.0.0.1:0, real TLS clients, and small
//! real backends that parse the PROXY header they receive.
//!
//! Tools from Debian packages (openssl, python3, postfix, dovecot) are looked up
//! with [`tool`]; when one is missing the test says so loudly and skips, unless
//! `PORTCULLIS_REQUIRE_TOOLS=1` (set by `.ci/run`) turns the skip into a failure.
#![allow(dead_code)]
pub mod acme;
pub mod bind;
pub mod etcd;
pub mod mail;
pub mod node;
pub mod process;
pub mod site;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::config::names::HostPattern;
use portcullis::config::Config;
use portcullis::server::Server;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Whether an external program is installed. Missing: skip loudly, or fail
/// when `PORTCULLIS_REQUIRE_TOOLS=1`.
pub fn tool(name: &str, test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        let msg = format!("SKIPPED {test}: `{name}` is not installed (bash .ci/run installs it)");
        if std::env::var("PORTCULLIS_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{msg}, and PORTCULLIS_REQUIRE_TOOLS=1 forbids skipping");
        }
        say_skipped(&msg);
    }
    found
}

/// Prints a skip notice where it is seen: straight to the process's stderr,
/// past libtest's capture (which would swallow `eprintln!` of a passing test).
pub fn say_skipped(msg: &str) {
    use std::io::Write;
    let _ = write!(std::io::stderr(), "\n!!! {msg}\n\n");
}

/// A loopback port that was free a moment ago, for a daemon (Pebble,
/// Postfix, Dovecot) or a listener whose port must be known in advance.
/// Picked below the kernel's ephemeral range, so that no `127.0.0.1:0` bind
/// elsewhere in the test run can be handed the same port before it is used.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 {
        (10_000, low)
    } else {
        (40_000, 60_000)
    };
    // Never the same port twice in one test binary: a port handed to one
    // test stays free until its daemon binds it, and another test running
    // beside it could otherwise draw it in that window (seen once in CI:
    // AddrInUse in tests/acme.rs).
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let port = fastrand::u16(from..to);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port in {from}..{to}");
}

/// A DER certificate as PEM, for openssl and curl.
pub fn cert_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<String> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// A scratch directory that Postfix and Dovecot (which drop privileges) can enter.
pub fn scratch() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// Writes a certificate + key for `names` into `dir`, returns (cert, key) paths.
pub fn cert_files(dir: &Path, tag: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let patterns: Vec<HostPattern> = names
        .iter()
        .map(|n| HostPattern::parse(n).unwrap())
        .collect();
    let (cert, key) = portcullis::tls::certs::generate_self_signed(&patterns).unwrap();
    let (c, k) = (
        dir.join(format!("{tag}.crt")),
        dir.join(format!("{tag}.key")),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

/// A running portcullis. Dropping it shuts it down.
pub struct Proxy {
    pub addrs: BTreeMap<String, Vec<SocketAddr>>,
    pub dir: tempfile::TempDir,
    /// Set by [`Proxy::start_file`]: asks the server to reload its file.
    pub reloader: Option<portcullis::ops::reload::Reloader>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Starts portcullis on `yaml` (write `127.0.0.1:0` binds); relative paths
    /// in it are relative to a fresh scratch directory, [`Proxy::dir`].
    pub async fn start(yaml: &str) -> Proxy {
        Proxy::start_in(scratch(), yaml).await
    }

    pub async fn start_in(dir: tempfile::TempDir, yaml: &str) -> Proxy {
        init_logging();
        let config = Config::parse(yaml, dir.path())
            .unwrap_or_else(|p| panic!("test config invalid: {p:#?}\n{yaml}"));
        let server = Server::bind(&config).unwrap_or_else(|e| panic!("bind: {e:?}"));
        Proxy::launch(dir, server, None)
    }

    /// Writes `yaml` to `dir/portcullis.yaml` and starts portcullis from that
    /// file (as `portcullis run` does): reloads re-read it and it is watched.
    pub async fn start_file(dir: tempfile::TempDir, yaml: &str) -> Proxy {
        init_logging();
        let path = dir.path().join("portcullis.yaml");
        std::fs::write(&path, yaml).unwrap();
        let server = Server::bind_file(&path).unwrap_or_else(|e| panic!("bind: {e:?}\n{yaml}"));
        let reloader = Some(server.reloader());
        Proxy::launch(dir, server, reloader)
    }

    /// Runs a bound server until [`Proxy::shutdown`] or drop.
    fn launch(
        dir: tempfile::TempDir,
        server: Server,
        reloader: Option<portcullis::ops::reload::Reloader>,
    ) -> Proxy {
        let addrs = server.local_addrs();
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Proxy {
            addrs,
            dir,
            reloader,
            stop: Some(tx),
            done: Some(done),
        }
    }

    /// The config file of a [`Proxy::start_file`] proxy.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.yaml")
    }

    /// Replaces the config file in one rename (a reader never sees half of
    /// it), as an editor or config management does.
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.path().join("portcullis.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    /// Asks the server to re-read its config file and waits for the outcome.
    pub async fn reload(&self) -> Result<portcullis::config::diff::Changes, String> {
        let r = self.reloader.as_ref().expect("started with start_file");
        tokio::time::timeout(Duration::from_secs(10), r.reload("test"))
            .await
            .expect("reload answered within 10 s")
    }

    /// The first address of a listener.
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener][0]
    }

    /// Asks for a graceful shutdown and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Every log line of this test binary, for tests that assert what the log says.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        if std::env::var_os("RUST_LOG").is_some() {
            eprint!("{}", String::from_utf8_lossy(buf));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures logs (debug and up) for [`log_line`]; `RUST_LOG=…` also prints them.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "debug,h2=warn,hyper=warn,tower=warn,tonic=warn,hickory_proto=warn",
        ))
        .with_ansi(false)
        .with_writer(|| LogSink)
        .try_init();
}

/// Waits (up to 5 s) for a log line that contains every one of `needles`.
pub async fn log_line(needles: &[&str]) -> String {
    for _ in 0..100 {
        {
            let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner());
            let text = String::from_utf8_lossy(&logs);
            if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner());
    panic!(
        "no log line with {needles:?}; the log was:\n{}",
        String::from_utf8_lossy(&logs)
    );
}

/// Every captured log line with every one of `needles`, now (no waiting).
pub fn log_lines(needles: &[&str]) -> Vec<String> {
    let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Accepts any certificate: the tests assert *which* certificate was served.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub fn client_config(alpn: &[&str]) -> Arc<ClientConfig> {
    client_config_versions(rustls::DEFAULT_VERSIONS, alpn)
}

pub fn client_config_versions(
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&str],
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(c)
}

/// A TLS client session. `sni: None` sends no SNI at all.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: Option<&str>,
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_with(addr, sni, client_config(&[])).await
}

pub async fn tls_connect_with(
    addr: SocketAddr,
    sni: Option<&str>,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tls_over(tcp, sni, config).await
}

/// A TCP connection to `addr` from the loopback address `source` (any of
/// 127.0.0.0/8): a client other than 127.0.0.1 for the per-address limits.
pub async fn connect_from(source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse().expect("an IPv4 literal"), 0))?;
    socket.connect(addr).await
}

/// A TLS client session over a connection already open (no SNI: `None`).
pub async fn tls_over(
    tcp: TcpStream,
    sni: Option<&str>,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut config = (*config).clone();
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => {
            config.enable_sni = false;
            ServerName::IpAddress(tcp.peer_addr()?.ip().into())
        }
    };
    tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// The DNS names of the certificate a session was given.
pub fn served_names(tls: &TlsStream<TcpStream>) -> Vec<String> {
    let (_, conn) = tls.get_ref();
    let cert = &conn.peer_certificates().expect("a certificate")[0];
    san_names(cert)
}

pub fn san_names(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let mut out = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for gn in &ext.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = gn {
                out.push(n.to_string());
            }
        }
    }
    out
}

/// Reads until `needle` arrives (or EOF / 10 s), returns everything read.
pub async fn read_until<R: AsyncReadExt + Unpin>(r: &mut R, needle: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        while !buf.windows(needle.len()).any(|w| w == needle) {
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    buf
}

/// What a test backend saw of one connection's PROXY header.
#[derive(Clone, Debug, Default)]
pub struct SeenHeader {
    pub version: u8,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// TLV type → value.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl SeenHeader {
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }

    /// The SSL TLV, decoded.
    pub fn ssl(&self) -> Option<SslTlv> {
        let v = self.tlv(0x20)?;
        let client = v[0];
        let verify = u32::from_be_bytes([v[1], v[2], v[3], v[4]]);
        let mut subs = Vec::new();
        let mut rest = &v[5..];
        while rest.len() >= 3 {
            let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
            subs.push((
                rest[0],
                String::from_utf8_lossy(&rest[3..3 + len]).into_owned(),
            ));
            rest = &rest[3 + len..];
        }
        Some(SslTlv {
            client,
            verify,
            subs,
        })
    }
}

/// `PP2_TYPE_SSL`: client flags, verify result, sub-TLVs as (type, text).
#[derive(Debug)]
pub struct SslTlv {
    pub client: u8,
    pub verify: u32,
    pub subs: Vec<(u8, String)>,
}

/// A plaintext backend: reads a PROXY header (v1 or v2, or none when
/// `expect_header` is false), greets with `greeting`, then echoes every byte.
pub struct Backend {
    pub addr: SocketAddr,
    pub headers: mpsc::UnboundedReceiver<SeenHeader>,
    seen: Arc<Mutex<usize>>,
}

impl Backend {
    pub async fn start(greeting: &'static str, expect_header: bool) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                *count.lock().unwrap() += 1;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let header = if expect_header {
                        match read_proxy_header(&mut s).await {
                            Some(h) => h,
                            None => return,
                        }
                    } else {
                        SeenHeader::default()
                    };
                    let _ = tx.send(header);
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Backend {
            addr,
            headers: rx,
            seen,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        *self.seen.lock().unwrap()
    }

    pub async fn next_header(&mut self) -> SeenHeader {
        tokio::time::timeout(Duration::from_secs(10), self.headers.recv())
            .await
            .expect("backend saw no connection within 10 s")
            .expect("backend task ended")
    }
}

/// Reads exactly one PROXY header, byte-exact (nothing past it is consumed).
pub async fn read_proxy_header(s: &mut TcpStream) -> Option<SeenHeader> {
    let mut first = [0u8; 16];
    s.read_exact(&mut first[..5]).await.ok()?;
    if &first[..5] == b"PROXY" {
        let mut line = first[..5].to_vec();
        while !line.ends_with(b"\r\n") && line.len() < 108 {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.ok()?;
            line.push(b[0]);
        }
        let text = String::from_utf8(line).ok()?;
        let parts: Vec<&str> = text.trim_end().split(' ').collect();
        let addr = |ip: &str, port: &str| {
            format!("{ip}:{port}")
                .parse()
                .ok()
                .or_else(|| format!("[{ip}]:{port}").parse().ok())
        };
        return Some(SeenHeader {
            version: 1,
            source: addr(parts[2], parts[4]),
            destination: addr(parts[3], parts[5]),
            tlvs: Vec::new(),
        });
    }
    s.read_exact(&mut first[5..]).await.ok()?;
    let len = u16::from_be_bytes([first[14], first[15]]) as usize;
    let mut all = first.to_vec();
    all.resize(16 + len, 0);
    s.read_exact(&mut all[16..]).await.ok()?;
    let header = ppp::v2::Header::try_from(all.as_slice()).ok()?;
    let (source, destination) = match header.addresses {
        ppp::v2::Addresses::IPv4(a) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        ppp::v2::Addresses::IPv6(a) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        _ => (None, None),
    };
    let tlvs = header
        .tlvs()
        .filter_map(|t| t.ok())
        .map(|t| (t.kind, t.value.to_vec()))
        .collect();
    Some(SeenHeader {
        version: 2,
        source,
        destination,
        tlvs,
    })
}

/// `GET /metrics` from an admin endpoint (`admin.bind`), the body.
pub async fn scrape(admin: &str) -> String {
    admin_get(admin, "/metrics").await.1
}

/// `GET path` from an admin endpoint: the status line and the body.
pub async fn admin_get(admin: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(admin).await.expect("admin endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("{path} answered within 10 s"))
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((head, body)) => (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        ),
        None => panic!("no HTTP answer from {admin}: {text:?}"),
    }
}

/// One sample of a `/metrics` text, `name{labels}` exactly as exposed.
pub fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
}

/// Runs a command with a deadline, returns (exit ok, stdout, stderr).
pub async fn run_cmd(
    program: &str,
    args: &[&str],
    stdin: &[u8],
    limit: Duration,
) -> (bool, String, String) {
    use std::process::Stdio;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    tokio::spawn(async move {
        let _ = input.write_all(&data).await;
        let _ = input.shutdown().await;
    });
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} ran past {limit:?}"))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
