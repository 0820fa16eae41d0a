//! Live reload end to end: a session relaying through route, certificate and
//! listener changes and a refused config; certificate files replaced under a
//! running server (in place, by rename, certbot's symlink flip); hosts added
//! and removed; refused reloads that leave the old snapshot serving; a
//! handshake loop across many reloads; SIGHUP and `portcullis reload` on the
//! real binary. Loopback only, every wait bounded.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cert_files, log_line, log_lines, read_until, scratch, tls_connect, Backend, Proxy};
use portcullis::config::names::HostPattern;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const QUICK: Duration = Duration::from_secs(10);

/// The DER of the leaf certificate a session was given.
fn leaf(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

/// The DER of the first certificate in a PEM text.
fn pem_der(pem: &[u8]) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem).expect("PEM");
    p.contents
}

fn file_der(path: &Path) -> Vec<u8> {
    pem_der(&std::fs::read(path).unwrap())
}

/// A fresh certificate + key (PEM) for `name`.
fn new_pair(name: &str) -> (String, String) {
    portcullis::tls::certs::generate_self_signed(&[HostPattern::parse(name).unwrap()]).unwrap()
}

/// The leaf certificate one handshake with `sni` is served.
async fn served(addr: SocketAddr, sni: &str) -> Vec<u8> {
    let tls = tls_connect(addr, Some(sni))
        .await
        .unwrap_or_else(|e| panic!("handshake with SNI {sni}: {e}"));
    leaf(&tls)
}

/// Handshakes (every 50 ms, at most 5 s) until `sni` is served `want`;
/// returns how long it took.
async fn await_cert(addr: SocketAddr, sni: &str, want: &[u8]) -> Duration {
    let start = Instant::now();
    for _ in 0..100 {
        if let Ok(tls) = tls_connect(addr, Some(sni)).await {
            if leaf(&tls) == want {
                return start.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tag = format!("{}.", sni.split('.').next().unwrap_or(sni));
    panic!(
        "{sni} was not served the new certificate within 5 s; its watch and reload lines:\n{}",
        log_lines(&["portcullis::"])
            .into_iter()
            .filter(|l| (l.contains("watch") || l.contains("reload")) && l.contains(&tag))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A relayed session and the greeting its backend sent.
async fn session(addr: SocketAddr, sni: &str) -> (TlsStream<TcpStream>, String) {
    let mut tls = tls_connect(addr, Some(sni))
        .await
        .unwrap_or_else(|e| panic!("handshake with SNI {sni}: {e}"));
    let greeting = read_until(&mut tls, b"\r\n").await;
    (tls, String::from_utf8_lossy(&greeting).into_owned())
}

/// Sends `data` through an echoing session, checks the same bytes come back.
async fn round_trip(tls: &mut TlsStream<TcpStream>, data: &[u8]) {
    let (mut r, mut w) = tokio::io::split(&mut *tls);
    let write = async {
        w.write_all(data).await.expect("write");
        w.flush().await.expect("flush");
    };
    let read = async {
        let mut got = vec![0u8; data.len()];
        r.read_exact(&mut got).await.map(|_| got)
    };
    let ((), got) = tokio::time::timeout(QUICK, async { tokio::join!(write, read) })
        .await
        .expect("round trip within 10 s");
    let got = got.expect("echo read");
    if let Some(i) = got.iter().zip(data).position(|(a, b)| a != b) {
        panic!("echo differs at byte {i} of {}", data.len());
    }
}

/// `name=value` of a log line (the value up to the next space).
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split(&format!(" {name}="))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
}

/// The address a listener added by a reload got (its "listening" line).
async fn listening(listener: &str) -> SocketAddr {
    let line = log_line(&["listening", &format!(" listener={listener} ")]).await;
    field(&line, "addr").parse().unwrap()
}

/// Waits (up to 5 s) until `n` log lines have every one of `needles`.
async fn await_lines(needles: &[&str], n: usize) -> Vec<String> {
    for _ in 0..100 {
        let lines = log_lines(needles);
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} log lines with {needles:?}");
}

/// A failed reload's ERROR line: (the line, its reload_failures).
async fn failure_line(needles: &[&str]) -> (String, u64) {
    let mut all = vec![
        "ERROR",
        "reload failed; still serving the previous configuration",
        "trigger=\"test\"",
    ];
    all.extend_from_slice(needles);
    let line = log_line(&all).await;
    let n = field(&line, "reload_failures").parse().unwrap();
    (line, n)
}

fn t1_yaml(imaps: SocketAddr, pop: SocketAddr, cert: &Path, key: &Path, pop3s: bool) -> String {
    let (listener, backend) = if pop3s {
        (
            "\n  pop3s_t1: { bind: \"127.0.0.1:0\", protocol: pop3, tls: implicit }",
            format!("\n  pop3s_t1: \"{pop}\""),
        )
    } else {
        ("", String::new())
    };
    format!(
        r#"
state_dir: state
timeouts: {{ shutdown_grace: 5s }}
listeners:
  imaps_t1: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}{listener}
backends:
  imaps_t1: "{imaps}"{backend}
hosts:
  - names: [t1.test]
    certificate: {{ cert: {}, key: {} }}
"#,
        cert.display(),
        key.display()
    )
}

/// One IMAPS session stays up and byte-exact through a route change, a
/// certificate replacement, a listener added and removed, and a refused
/// config; each change is visible to new connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_session_survives_every_kind_of_reload() {
    let dir = scratch();
    let (crt1, key1) = cert_files(dir.path(), "t1-first", &["t1.test"]);
    let old = Backend::start("* OK t1-old\r\n", true).await;
    let new = Backend::start("* OK t1-new\r\n", true).await;
    let pop = Backend::start("+OK t1-pop\r\n", true).await;
    let proxy = Proxy::start_file(dir, &t1_yaml(old.addr, pop.addr, &crt1, &key1, false)).await;
    let imaps = proxy.addr("imaps_t1");

    let (mut open, greeting) = session(imaps, "t1.test").await;
    assert_eq!(greeting, "* OK t1-old\r\n");
    round_trip(&mut open, b"a1 NOOP\r\n").await;

    // 1. The host's backend moves: new sessions go to the new backend.
    proxy.write_config(&t1_yaml(new.addr, pop.addr, &crt1, &key1, false));
    let changes = proxy.reload().await.expect("route change");
    assert_eq!(
        changes.to_string(),
        format!("backends moved: t1.test/imaps_t1 → {}", new.addr)
    );
    log_line(&[
        "configuration reloaded",
        "trigger=\"test\"",
        &format!("changes=backends moved: t1.test/imaps_t1 → {}", new.addr),
    ])
    .await;
    let (_, greeting) = session(imaps, "t1.test").await;
    assert_eq!(greeting, "* OK t1-new\r\n");
    round_trip(&mut open, b"a2 NOOP after the move\r\n").await;
    assert_eq!(old.connections(), 1, "the old backend got no new session");
    assert_eq!(new.connections(), 1);

    // 2. New certificate files for the host: the next handshake shows them.
    let (crt2, key2) = cert_files(proxy.dir.path(), "t1-second", &["t1.test"]);
    proxy.write_config(&t1_yaml(new.addr, pop.addr, &crt2, &key2, false));
    let changes = proxy.reload().await.expect("certificate change");
    assert_eq!(changes.to_string(), "certificates replaced: t1.test");
    assert_ne!(file_der(&crt1), file_der(&crt2));
    assert_eq!(served(imaps, "t1.test").await, file_der(&crt2));
    round_trip(&mut open, b"a3 NOOP after the new certificate\r\n").await;

    // 3. A listener added accepts; removed, it refuses new connections while
    //    its open session drains.
    proxy.write_config(&t1_yaml(new.addr, pop.addr, &crt2, &key2, true));
    let changes = proxy.reload().await.expect("listener added");
    assert_eq!(
        changes.to_string(),
        format!(
            "backends moved: t1.test/pop3s_t1 → {}; listeners added: pop3s_t1",
            pop.addr
        )
    );
    let pop3s = listening("pop3s_t1").await;
    let (mut on_pop3s, greeting) = session(pop3s, "t1.test").await;
    assert_eq!(greeting, "+OK t1-pop\r\n");
    assert_eq!(leaf(&on_pop3s), file_der(&crt2));
    round_trip(&mut open, b"a4 NOOP with pop3s added\r\n").await;

    proxy.write_config(&t1_yaml(new.addr, pop.addr, &crt2, &key2, false));
    let changes = proxy.reload().await.expect("listener removed");
    assert_eq!(
        changes.to_string(),
        "backends moved: t1.test/pop3s_t1 → none; listeners removed: pop3s_t1"
    );
    log_line(&[
        "address removed: no new connections there, open sessions drain",
        "listener=pop3s_t1",
    ])
    .await;
    // Until its socket is closed a connect may still land in the backlog
    // (then reset); within 2 s it must be refused outright.
    let mut refused = false;
    for _ in 0..40 {
        match TcpStream::connect(pop3s).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(
        refused,
        "the removed listener still takes connections after 2 s"
    );
    round_trip(&mut on_pop3s, b"USER draining\r\n").await;
    assert_eq!(pop.connections(), 1);

    // 4. A config that does not parse: refused, logged, the old one serves.
    proxy.write_config("listeners: { imaps_t1: [unclosed\n");
    let err = proxy.reload().await.expect_err("invalid YAML is refused");
    let config = proxy.config_path().display().to_string();
    assert!(err.contains(&config) && err.contains("YAML"), "{err}");
    failure_line(&[&config]).await;
    assert_eq!(served(imaps, "t1.test").await, file_der(&crt2));
    let (_, greeting) = session(imaps, "t1.test").await;
    assert_eq!(greeting, "* OK t1-new\r\n");

    // Still the first backend, still byte-exact: 64 KiB both ways.
    let data: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    round_trip(&mut open, &data).await;
    assert_eq!(old.connections(), 1, "the open session never moved");
    drop((open, on_pop3s));
    proxy.shutdown().await;
}

/// Returns once the server's run loop has started, and with it the file
/// watcher: a file changed before that is not seen (see
/// `a_certificate_replaced_while_starting_is_picked_up`).
async fn watching(proxy: &Proxy) {
    let changes = proxy.reload().await.expect("the start config reloads");
    assert!(changes.is_empty(), "{changes}");
}

fn one_host_yaml(listener: &str, host: &str, cert: &Path, key: &Path) -> String {
    format!(
        r#"
state_dir: state
listeners:
  {listener}: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends: {{ {listener}: 127.0.0.1:9 }}
hosts:
  - names: [{host}]
    certificate: {{ cert: {}, key: {} }}
"#,
        cert.display(),
        key.display()
    )
}

/// Certificate files rewritten in place, then replaced by a rename in the
/// same directory: no signal, the watcher reloads, the next handshake shows
/// the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_rewritten_or_renamed_over_are_picked_up() {
    let dir = scratch();
    let (crt, key) = cert_files(dir.path(), "t2a", &["t2a.test"]);
    let proxy = Proxy::start_file(dir, &one_host_yaml("imaps_t2a", "t2a.test", &crt, &key)).await;
    let addr = proxy.addr("imaps_t2a");
    watching(&proxy).await;
    assert_eq!(served(addr, "t2a.test").await, file_der(&crt));
    let needles = [
        "configuration reloaded",
        "trigger=\"file change\"",
        "certificates replaced: t2a.test",
    ];

    // In place: truncate and write, cert then key.
    let (cert_pem, key_pem) = new_pair("t2a.test");
    std::fs::write(&crt, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    let took = await_cert(addr, "t2a.test", &pem_der(cert_pem.as_bytes())).await;
    eprintln!("in-place rewrite served after {took:?}");
    await_lines(&needles, 1).await;
    log_line(&["watched file changed", "t2a."]).await;

    // By rename: new files beside the old, renamed over them.
    let (cert_pem, key_pem) = new_pair("t2a.test");
    let (crt_new, key_new) = (crt.with_extension("crt.new"), key.with_extension("key.new"));
    std::fs::write(&crt_new, &cert_pem).unwrap();
    std::fs::write(&key_new, &key_pem).unwrap();
    std::fs::rename(&crt_new, &crt).unwrap();
    std::fs::rename(&key_new, &key).unwrap();
    let took = await_cert(addr, "t2a.test", &pem_der(cert_pem.as_bytes())).await;
    eprintln!("rename served after {took:?}");
    await_lines(&needles, 2).await;
    proxy.shutdown().await;
}

/// certbot's layout: `live/<name>/*.pem` are relative symlinks into
/// `archive/<name>/`; a renewal writes `fullchain2.pem`/`privkey2.pem` and
/// flips each link (a new link renamed over the old). Twice, so the watch
/// follows the links' new targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certbot_renewal_flipping_symlinks_is_picked_up() {
    use std::os::unix::fs::symlink;
    let dir = scratch();
    let archive = dir.path().join("le/archive/t2b.test");
    let live = dir.path().join("le/live/t2b.test");
    std::fs::create_dir_all(&archive).unwrap();
    std::fs::create_dir_all(&live).unwrap();
    let issue = |n: u32| {
        let (cert_pem, key_pem) = new_pair("t2b.test");
        std::fs::write(archive.join(format!("fullchain{n}.pem")), &cert_pem).unwrap();
        std::fs::write(archive.join(format!("privkey{n}.pem")), &key_pem).unwrap();
        for kind in ["fullchain", "privkey"] {
            let target = format!("../../archive/t2b.test/{kind}{n}.pem");
            let tmp = live.join(format!("{kind}.pem.tmp"));
            symlink(&target, &tmp).unwrap();
            std::fs::rename(&tmp, live.join(format!("{kind}.pem"))).unwrap();
        }
        pem_der(cert_pem.as_bytes())
    };
    let first = issue(1);
    let (crt, key) = (live.join("fullchain.pem"), live.join("privkey.pem"));
    let proxy = Proxy::start_file(dir, &one_host_yaml("imaps_t2b", "t2b.test", &crt, &key)).await;
    let addr = proxy.addr("imaps_t2b");
    watching(&proxy).await;
    assert_eq!(served(addr, "t2b.test").await, first);
    let needles = [
        "configuration reloaded",
        "trigger=\"file change\"",
        "certificates replaced: t2b.test",
    ];
    for n in [2, 3] {
        let renewed = issue(n);
        let took = await_cert(addr, "t2b.test", &renewed).await;
        eprintln!("certbot renewal {n} served after {took:?}");
        await_lines(&needles, n as usize - 1).await;
    }
    proxy.shutdown().await;
}

fn t3_yaml(a: (&Path, &Path), b: Option<(&Path, &Path)>, reject: bool) -> String {
    let mut yaml = format!(
        r#"
state_dir: state
listeners:
  imaps_t3: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends: {{ imaps_t3: 127.0.0.1:9 }}
default_host: t3a.test
hosts:
  - names: [t3a.test]
    certificate: {{ cert: {}, key: {} }}
"#,
        a.0.display(),
        a.1.display()
    );
    if let Some((crt, key)) = b {
        yaml += &format!(
            "  - names: [t3b.test]\n    certificate: {{ cert: {}, key: {} }}\n",
            crt.display(),
            key.display()
        );
    }
    if reject {
        yaml += "unknown_sni: reject\n";
    }
    yaml
}

fn is_unrecognized_name_alert(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::UnrecognisedName
        ))
    )
}

/// A host added by a reload is served by SNI; removed, its name falls back
/// to the unknown_sni policy: default_host's certificate, or with `reject`
/// an unrecognized_name alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_added_and_removed_by_a_reload() {
    let dir = scratch();
    let a = cert_files(dir.path(), "t3a", &["t3a.test"]);
    let b = cert_files(dir.path(), "t3b", &["t3b.test"]);
    let (a_der, b_der) = (file_der(&a.0), file_der(&b.0));
    let a = (a.0.as_path(), a.1.as_path());
    let b = (b.0.as_path(), b.1.as_path());
    let proxy = Proxy::start_file(dir, &t3_yaml(a, None, false)).await;
    let addr = proxy.addr("imaps_t3");
    assert_eq!(
        served(addr, "t3b.test").await,
        a_der,
        "unknown: default_host"
    );

    proxy.write_config(&t3_yaml(a, Some(b), false));
    let changes = proxy.reload().await.expect("host added");
    assert_eq!(changes.to_string(), "hosts added: t3b.test");
    assert_eq!(served(addr, "t3b.test").await, b_der);
    assert_eq!(served(addr, "t3a.test").await, a_der);

    proxy.write_config(&t3_yaml(a, None, false));
    let changes = proxy.reload().await.expect("host removed");
    assert_eq!(changes.to_string(), "hosts removed: t3b.test");
    log_line(&["configuration reloaded", "changes=hosts removed: t3b.test"]).await;
    assert_eq!(
        served(addr, "t3b.test").await,
        a_der,
        "removed: default_host"
    );

    // With `unknown_sni: reject` the removed name gets an alert.
    proxy.write_config(&t3_yaml(a, Some(b), true));
    proxy.reload().await.expect("reject, t3b back");

    assert_eq!(served(addr, "t3b.test").await, b_der);
    proxy.write_config(&t3_yaml(a, None, true));
    let changes = proxy.reload().await.expect("host removed under reject");
    assert_eq!(changes.to_string(), "hosts removed: t3b.test");
    let e = tls_connect(addr, Some("t3b.test"))
        .await
        .expect_err("a removed host under unknown_sni: reject");
    assert!(is_unrecognized_name_alert(&e), "{e:?}");
    assert_eq!(served(addr, "t3a.test").await, a_der);
    proxy.shutdown().await;
}

/// Invalid YAML, a key that does not match its certificate and a missing
/// certificate file: each reload is refused with the file or key path, an
/// ERROR line counts the failures, and the old snapshot keeps serving (the
/// first valid reload after them finds nothing changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reloads_keep_the_old_snapshot_serving() {
    let dir = scratch();
    let (crt, key) = cert_files(dir.path(), "t4", &["t4.test"]);
    let (_, other_key) = cert_files(dir.path(), "t4-other", &["t4.test"]);
    let missing = dir.path().join("t4-missing.crt");
    let good = one_host_yaml("imaps_t4", "t4.test", &crt, &key);
    let proxy = Proxy::start_file(dir, &good).await;
    let addr = proxy.addr("imaps_t4");
    let der = file_der(&crt);
    assert_eq!(served(addr, "t4.test").await, der);
    let config = proxy.config_path().display().to_string();

    let cases = [
        (
            "invalid YAML",
            "listeners: { imaps_t4: [unclosed\n".to_string(),
            vec![config.clone(), "YAML: ".to_string()],
        ),
        (
            "key not matching",
            one_host_yaml("imaps_t4", "t4.test", &crt, &other_key),
            vec![
                "hosts[0] (t4.test): ".to_string(),
                format!("{} does not match the certificate in", other_key.display()),
            ],
        ),
        (
            "missing certificate",
            one_host_yaml("imaps_t4", "t4.test", &missing, &key),
            vec![
                "hosts[0] (t4.test): ".to_string(),
                format!("{}: cannot read", missing.display()),
            ],
        ),
    ];
    let mut failures = 0;
    for (what, yaml, wanted) in &cases {
        proxy.write_config(yaml);
        let err = proxy.reload().await.expect_err(what);
        for w in wanted {
            assert!(err.contains(w.as_str()), "{what}: no {w:?} in {err}");
        }
        let needles: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let (line, n) = failure_line(&needles).await;
        assert!(
            n > failures,
            "{what}: reload_failures did not count up: {line}"
        );
        failures = n;
        assert_eq!(served(addr, "t4.test").await, der, "{what}: old cert");
    }
    proxy.write_config(&good);
    let changes = proxy.reload().await.expect("the good config again");
    assert!(changes.is_empty(), "{changes}");
    proxy.shutdown().await;
}

/// Reloads every ~40 handshakes while clients handshake without pause:
/// two configs that differ (backend address, an extra host) alternate, so
/// every reload swaps. No handshake fails, no connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handshakes_never_fail_across_fifty_reloads() {
    const HANDSHAKES: usize = 2000;
    const RELOADS: usize = 50;
    const CLIENTS: usize = 4;
    const LIMIT: Duration = Duration::from_secs(60);
    let dir = scratch();
    let (crt, key) = cert_files(dir.path(), "t5", &["t5.test"]);
    let x = Backend::start("* OK t5-x\r\n", true).await;
    let y = Backend::start("* OK t5-y\r\n", true).await;
    let yaml = |second: bool| {
        let extra = if second {
            "  - names: [t5-extra.test]\n    certificate: self-signed\n"
        } else {
            ""
        };
        format!(
            r#"
state_dir: state
listeners:
  imaps_t5: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends: {{ imaps_t5: "{}" }}
hosts:
  - names: [t5.test]
    certificate: {{ cert: {}, key: {} }}
{extra}"#,
            if second { y.addr } else { x.addr },
            crt.display(),
            key.display()
        )
    };
    let proxy = Proxy::start_file(dir, &yaml(false)).await;
    let addr = proxy.addr("imaps_t5");

    let started = Instant::now();
    let claimed = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let by_backend = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (claimed, finished, refused, problems, by_backend) = (
            claimed.clone(),
            finished.clone(),
            refused.clone(),
            problems.clone(),
            by_backend.clone(),
        );
        clients.push(tokio::spawn(async move {
            while claimed.fetch_add(1, Ordering::SeqCst) < HANDSHAKES && started.elapsed() < LIMIT {
                let outcome = match tls_connect(addr, Some("t5.test")).await {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        refused.fetch_add(1, Ordering::SeqCst);
                        Err(format!("connect: {e}"))
                    }
                    Err(e) => Err(format!("handshake: {e}")),
                    Ok(mut tls) => {
                        let greeting = read_until(&mut tls, b"\r\n").await;
                        match greeting.as_slice() {
                            b"* OK t5-x\r\n" => Ok(0),
                            b"* OK t5-y\r\n" => Ok(1),
                            other => Err(format!("greeting: {:?}", String::from_utf8_lossy(other))),
                        }
                    }
                };
                match outcome {
                    Ok(i) => {
                        by_backend[i].fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => problems.lock().unwrap().push(e),
                }
                finished.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    let mut reloads = 0;
    let mut swapped = 0;
    let mut slowest = Duration::ZERO;
    for i in 1..=RELOADS {
        // Spread the reloads over the whole run.
        while finished.load(Ordering::SeqCst) < i * HANDSHAKES / (RELOADS + 1)
            && started.elapsed() < LIMIT
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        proxy.write_config(&yaml(i % 2 == 1));
        let t = Instant::now();
        let changes = proxy
            .reload()
            .await
            .unwrap_or_else(|e| panic!("reload {i}: {e}"));
        slowest = slowest.max(t.elapsed());
        reloads += 1;
        if !changes.is_empty() {
            swapped += 1;
        }
    }
    for c in clients {
        tokio::time::timeout(LIMIT, c)
            .await
            .expect("clients finish")
            .unwrap();
    }
    let elapsed = started.elapsed();
    let done = finished.load(Ordering::SeqCst);
    let problems = problems.lock().unwrap().clone();
    let refused = refused.load(Ordering::SeqCst);
    let per = [
        by_backend[0].load(Ordering::SeqCst),
        by_backend[1].load(Ordering::SeqCst),
    ];
    eprintln!(
        "handshake loop: {done} handshakes ({CLIENTS} clients), {reloads} reloads ({swapped} swapped), \
         {} failed handshakes, {refused} refused connections, {elapsed:?}, slowest reload {slowest:?}, \
         sessions per backend x={} y={}",
        problems.len() - refused,
        per[0],
        per[1]
    );
    assert!(
        problems.is_empty(),
        "{} problems: {problems:?}",
        problems.len()
    );
    assert_eq!(done, HANDSHAKES, "stopped by the {LIMIT:?} limit");
    assert_eq!(reloads, RELOADS);
    assert_eq!(swapped, RELOADS, "every reload swapped a different config");
    assert!(per[0] > 0 && per[1] > 0, "both configs served: {per:?}");
    proxy.shutdown().await;
}

/// `portcullis run` as a subprocess with its stderr collected; killed when
/// dropped.
struct Running {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn start(config: &Path) -> Running {
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Running { child, lines }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .collect()
    }

    /// Waits (up to 10 s) for a line with every one of `needles`.
    async fn wait_log(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + QUICK;
        loop {
            if let Some(l) = self.lines_with(needles).into_iter().next() {
                return l;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("portcullis exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needles:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let sent = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// SIGTERM, then the exit status (bounded).
    async fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        let deadline = Instant::now() + QUICK;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `portcullis reload --config F`: (exit code, stdout, stderr), bounded.
async fn cli_reload(config: &Path) -> (i32, String, String) {
    let out = tokio::time::timeout(
        QUICK,
        tokio::process::Command::new(BIN)
            .args(["reload", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("portcullis reload within 10 s")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn t6_yaml(extra: &str) -> String {
    format!(
        r#"
state_dir: state
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends: {{ imaps: 127.0.0.1:9 }}
hosts:
  - names: [t6.test]
    certificate: self-signed
{extra}"#
    )
}

/// The binary: SIGHUP reloads (trigger="SIGHUP"), `portcullis reload`
/// prints `reloaded: <changes>`, and a refused reload exits 1 with the
/// reason while the instance keeps serving the old snapshot.
///
/// A self-signed certificate deleted from state_dir is made anew by the
/// next reload: a change the file watcher does not see, so which trigger
/// applies it is certain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_portcullis_reload_on_the_binary() {
    let dir = scratch();
    let config = dir.path().join("portcullis.yaml");
    std::fs::write(&config, t6_yaml("")).unwrap();
    let stored = dir.path().join("state/self-signed/t6.test");
    let mut run = Running::start(&config);
    let line = run.wait_log(&["listening", "listener=imaps"]).await;
    let addr: SocketAddr = field(&line, "addr").parse().unwrap();
    let deadline = Instant::now() + QUICK;
    while std::os::unix::net::UnixStream::connect(dir.path().join("state/control.sock")).is_err() {
        assert!(
            Instant::now() < deadline,
            "no control socket:\n{}",
            run.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = served(addr, "t6.test").await;

    // SIGHUP.
    std::fs::remove_dir_all(&stored).unwrap();
    run.signal("-HUP");
    run.wait_log(&[
        "configuration reloaded",
        "trigger=\"SIGHUP\"",
        "changes=certificates replaced: t6.test",
    ])
    .await;
    let second = served(addr, "t6.test").await;
    assert_ne!(second, first);
    assert_eq!(second, file_der(&stored.join("cert.pem")));

    // portcullis reload.
    std::fs::remove_dir_all(&stored).unwrap();
    let (code, out, err) = cli_reload(&config).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "reloaded: certificates replaced: t6.test\n", "{err}");
    run.wait_log(&[
        "configuration reloaded",
        "trigger=\"portcullis reload\"",
        "changes=certificates replaced: t6.test",
    ])
    .await;
    let third = served(addr, "t6.test").await;
    assert_ne!(third, second);
    assert_eq!(third, file_der(&stored.join("cert.pem")));

    // A host added to the file: `portcullis reload` or the watcher, whichever
    // reads it first, reports it; the other finds nothing changed.
    std::fs::write(
        &config,
        t6_yaml("  - names: [t6b.test]\n    certificate: self-signed\n"),
    )
    .unwrap();
    let (code, out, err) = cli_reload(&config).await;
    assert_eq!(code, 0, "{out}{err}");
    if out != "reloaded: hosts added: t6b.test\n" {
        assert_eq!(out, "reloaded: nothing changed\n");
        run.wait_log(&[
            "configuration reloaded",
            "trigger=\"file change\"",
            "changes=hosts added: t6b.test",
        ])
        .await;
    }
    assert_eq!(
        common::san_names(&served(addr, "t6b.test").await),
        ["t6b.test"]
    );

    // Refused: a key that does not match its certificate.
    common::cert_files(dir.path(), "t6c", &["t6c.test"]);
    common::cert_files(dir.path(), "t6c-other", &["t6c.test"]);
    std::fs::write(
        &config,
        t6_yaml("  - names: [t6c.test]\n    certificate: { cert: t6c.crt, key: t6c-other.key }\n"),
    )
    .unwrap();
    let (code, out, err) = cli_reload(&config).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.starts_with(
            "reload failed, still serving the previous configuration: hosts[1] (t6c.test): "
        ) && err.contains("t6c-other.key does not match the certificate in"),
        "{err}"
    );
    let line = run
        .wait_log(&[
            "ERROR",
            "reload failed; still serving the previous configuration",
            "trigger=\"portcullis reload\"",
            "t6c-other.key does not match",
        ])
        .await;
    assert!(field(&line, "reload_failures").parse::<u64>().unwrap() >= 1);
    assert_eq!(served(addr, "t6.test").await, third);
    let e = served(addr, "t6c.test").await;
    assert_eq!(e, third, "t6c.test is unknown: default_host's certificate");

    let status = run.stop().await;
    assert!(status.success(), "{status}:\n{}", run.log());
}

/// A reload that changes only `unknown_sni` (or `default_host`) takes
/// effect and says so, in the log line and to `portcullis reload`
/// (`config::diff` compares the unknown-SNI policy too; it once reported
/// "nothing changed").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_sni_policy_change_is_reported() {
    let dir = scratch();
    let (crt, key) = cert_files(dir.path(), "t8", &["t8.test"]);
    let yaml = one_host_yaml("imaps_t8", "t8.test", &crt, &key);
    let proxy = Proxy::start_file(dir, &yaml).await;
    let addr = proxy.addr("imaps_t8");
    assert_eq!(served(addr, "nobody.t8.test").await, file_der(&crt));
    proxy.write_config(&format!("{yaml}unknown_sni: reject\n"));
    let changes = proxy.reload().await.expect("unknown_sni: reject");
    let e = tls_connect(addr, Some("nobody.t8.test"))
        .await
        .expect_err("the new policy applies");
    assert!(is_unrecognized_name_alert(&e), "{e:?}");
    assert!(
        !changes.is_empty(),
        "unknown_sni changed from default to reject and applies, yet the reload reports {changes:?} (\"{changes}\")"
    );
    proxy.shutdown().await;
}

/// A certificate replaced after `Server::bind_file` has read it but before
/// `Server::run` starts is picked up: the file watch starts before the files
/// are read, so the change is not missed. `main.rs` calls exactly these two
/// in a row, and a certbot renewal can land while portcullis starts (found
/// as a flaky certbot test; here made certain by replacing the files
/// between the two calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_while_starting_is_picked_up() {
    common::init_logging();
    let dir = scratch();
    let (crt, key) = cert_files(dir.path(), "t7", &["t7.test"]);
    let config = dir.path().join("portcullis.yaml");
    std::fs::write(&config, one_host_yaml("imaps_t7", "t7.test", &crt, &key)).unwrap();
    let server = portcullis::server::Server::bind_file(&config).expect("bind");
    let addr = server.local_addrs()["imaps_t7"][0];

    // Renewed while starting: written beside, renamed over.
    let (cert_pem, key_pem) = new_pair("t7.test");
    std::fs::write(dir.path().join("t7.crt.new"), &cert_pem).unwrap();
    std::fs::write(dir.path().join("t7.key.new"), &key_pem).unwrap();
    std::fs::rename(dir.path().join("t7.crt.new"), &crt).unwrap();
    std::fs::rename(dir.path().join("t7.key.new"), &key).unwrap();

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    await_cert(addr, "t7.test", &pem_der(cert_pem.as_bytes())).await;
    let _ = tx.send(());
    let _ = done.await;
}

/// The migration from certbot: a host switched from certificate files to
/// `acme` keeps serving its files' certificate until the first ACME
/// certificate is issued — here never, the CA being unreachable — instead
/// of a self-signed placeholder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_switched_to_acme_keeps_its_files_certificate_until_issued() {
    let dir = scratch();
    let (crt, key) = cert_files(dir.path(), "t6", &["t6.test"]);
    let files_yaml = one_host_yaml("imaps_t6", "t6.test", &crt, &key);
    let proxy = Proxy::start_file(dir, &files_yaml).await;
    let addr = proxy.addr("imaps_t6");
    watching(&proxy).await;
    assert_eq!(served(addr, "t6.test").await, file_der(&crt));

    // Nothing listens on the CA's port: every order fails.
    let dead_ca = common::free_port();
    let acme_yaml = files_yaml
        .replace(
            &format!("certificate: {{ cert: {}, key: {} }}", crt.display(), key.display()),
            "certificate: acme",
        )
        .replace(
            "hosts:",
            &format!(
                "acme:\n  directory: https://127.0.0.1:{dead_ca}/dir\n  contact: [\"mailto:postmaster@t6.test\"]\n  terms_of_service_agreed: true\n  challenges: [tls-alpn-01]\nhosts:"
            ),
        );
    assert!(acme_yaml.contains("certificate: acme"), "{acme_yaml}");
    proxy.write_config(&acme_yaml);
    let changes = proxy.reload().await.expect("the acme config loads");
    assert!(changes.to_string().contains("acme"), "{changes}");
    log_line(&[
        "serving the previous certificate files until the ACME certificate is issued",
        "t6.test",
    ])
    .await;
    // The order fails (connection refused) and the files' certificate stays.
    log_line(&["certificate order failed", "t6.test"]).await;
    assert_eq!(served(addr, "t6.test").await, file_der(&crt));
    assert!(
        log_lines(&["serving a self-signed placeholder", "t6.test"]).is_empty(),
        "no placeholder was ever served for t6.test"
    );
    proxy.shutdown().await;
}
