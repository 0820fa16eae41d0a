//! ACME end to end: portcullis obtains, serves, stores and renews its
//! certificates from a real Pebble ([`common::acme`] says what it needs).
//!
//! Each test has its own Pebble, its own host names (`imap.TAG.test`,
//! `smtp.TAG.test`) and listener names (`imaps-TAG`, …): every test of this
//! binary shares one captured log, so every log needle names the test's own
//! host (`acme{host=imap.TAG.test}`) or listener.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use portcullis::ops::control::{self, CertRow, Request, Response};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::acme::{chains_to, free_port, https_get, tools, AriProxy, Pebble};
use common::site::*;
use common::{log_line, read_until, tls_connect, Backend, Proxy};

// --- harness self-tests ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_pebble_serves_directory_and_root() {
    if !tools("harness_pebble_serves_directory_and_root") {
        return;
    }
    let pebble = Pebble::start(free_port(), free_port()).await;
    let r = https_get(&pebble.directory, &pebble.ca_roots).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let dir = r.json();
    let base = pebble.directory.trim_end_matches("/dir");
    for key in ["newNonce", "newAccount", "newOrder"] {
        let url = dir[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key}: {dir}"));
        assert!(url.starts_with(base), "{key}: {url}");
    }
    assert!(dir.get("renewalInfo").is_none(), "Pebble 2.4 has no ARI");

    let root = pebble.root_der().await;
    let (_, cert) = x509_parser::parse_x509_certificate(&root).expect("root parses");
    assert!(cert.is_ca(), "the root is a CA");
    assert_eq!(pebble.orders(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_ari_proxy_adds_renewal_info() {
    if !tools("harness_ari_proxy_adds_renewal_info") {
        return;
    }
    let pebble = Pebble::start(free_port(), free_port()).await;
    let ari = AriProxy::start(&pebble).await;
    let base = format!("https://127.0.0.1:{}", ari.port);

    let r = https_get(&ari.directory, &pebble.ca_roots).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), ari.log());
    let dir = r.json();
    assert_eq!(dir["renewalInfo"], format!("{base}/ari"));
    // Pebble builds its URLs from the Host header: the proxy's.
    assert_eq!(dir["newOrder"], format!("{base}/order-plz"), "{dir}");

    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    ari.set_window(start, start + Duration::from_secs(3600), 42);
    let r = https_get(&format!("{base}/ari/x.y"), &pebble.ca_roots).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("42"));
    let w = r.json();
    assert_eq!(w["suggestedWindow"]["start"], "2023-11-14T22:13:20Z");
    assert_eq!(w["suggestedWindow"]["end"], "2023-11-14T23:13:20Z");
    assert_eq!(ari.ari_requests(), ["x.y"]);
    assert!(ari.replaces_seen().is_empty());
}

// --- reload ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_acme_certificate_unless_the_names_change() {
    if !tools("a_reload_keeps_the_acme_certificate_unless_the_names_change") {
        return;
    }
    let site = Site::new("t7").await;
    let pebble = Pebble::start(site.http, site.imaps).await;
    let yaml = site.config(&pebble.directory, &pebble.ca_roots, "http-01");
    let proxy = Proxy::start_file(common::scratch(), &yaml).await;
    let imaps = proxy.addr(&site.imaps());
    let first = wait_issued(imaps, &site.names[0], None)
        .await
        .unwrap_or_else(|| panic!("no certificate:\n{}", pebble.log()));
    let s1 = serial(&first[0]);

    // Same names, another backend: the certificate and its task stay.
    let other = Backend::start("* OK other\r\n", true).await;
    let moved = yaml.replace(&site.backend.addr.to_string(), &other.addr.to_string());
    assert_ne!(moved, yaml);
    proxy.write_config(&moved);
    let changes = proxy.reload().await.expect("reload");
    assert!(changes.certificates_replaced.is_empty(), "{changes}");
    assert!(!changes.backends_moved.is_empty(), "{changes}");
    let after = served_chain(imaps, &site.names[0]).await.unwrap();
    assert_eq!(serial(&after[0]), s1, "the ACME certificate is kept");
    assert_eq!(cert_row(&site).await.source, "acme");
    assert_eq!(pebble.orders(), 1, "no new order");
    // ... and the task still answers: a forced renewal works after the reload.
    let row = renew(&site, true).await;
    assert_eq!(row.outcome, "renewed", "{row:?}");
    let s2 = serial(&wait_issued(imaps, &site.names[0], Some(&s1)).await.unwrap()[0]);

    // A third name: a new certificate is ordered for the new set of names.
    let third = format!("pop.{}.test", site.tag);
    let grown = moved.replace(
        &format!("[{}, {}]", site.names[0], site.names[1]),
        &format!("[{}, {}, {third}]", site.names[0], site.names[1]),
    );
    assert_ne!(grown, moved);
    proxy.write_config(&grown);
    proxy.reload().await.expect("reload");
    let mut covered = false;
    for _ in 0..100 {
        let c = served_chain(imaps, &third).await.unwrap();
        if serial(&c[0]) != s2 && chains_to(&pebble.root_der().await, &c, &third) {
            covered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        covered,
        "no certificate for the new name:\n{}",
        pebble.log()
    );
    assert_eq!(pebble.orders(), 3);
}

// --- 1. issuance ---

/// First issuance for a host with two names by `challenges`; what a user sees.
async fn issues_for_two_names(tag: &'static str, challenges: &str, answered: (&str, String)) {
    let (site, pebble, proxy, _, chain) = issued_site(tag, challenges).await;
    let s = serial(&chain[0]);

    log_line(&[
        "serving a self-signed placeholder until the ACME certificate is issued",
        &site.host_field(),
    ])
    .await;
    log_line(&[&site.span(), "ordering a certificate"]).await;
    log_line(&[&site.span(), "ACME account registered"]).await;
    let (message, listener) = answered;
    log_line(&[&format!("listener={listener} "), message]).await;
    let issued = log_line(&[&site.span(), "certificate issued", &format!("serial={s} ")]).await;
    let names = format!("names={},{} ", site.names[0], site.names[1]);
    for field in [names.as_str(), "issuer=", "not_after=", "took_ms="] {
        assert!(issued.contains(field), "{field}: {issued}");
    }

    // Every listener, every name: Pebble's chain, for both names.
    let root = pebble.root_der().await;
    for listener in [site.imaps(), site.smtps()] {
        for sni in &site.names {
            let c = served_chain(proxy.addr(&listener), sni)
                .await
                .unwrap_or_else(|e| panic!("{listener} {sni}: {e}"));
            assert_eq!(serial(&c[0]), s, "{listener} {sni}");
            assert_eq!(common::san_names(&c[0]), site.names, "{listener} {sni}");
            for name in &site.names {
                assert!(chains_to(&root, &c, name), "{listener} {sni}: {name}");
            }
        }
    }

    // The store: the served chain, an owner-only key, the metadata, the account.
    assert_eq!(stored_chain(&site), chain);
    assert_eq!(mode(&site.host_dir().join("privkey.pem")), 0o600);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(site.host_dir().join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["names"], serde_json::json!(site.names));
    assert_eq!(meta["directory"], pebble.directory);
    let account = portcullis::acme::account::credentials_path(&site.state_dir(), &pebble.directory);
    assert_eq!(mode(&account), 0o600);
    assert_eq!((pebble.orders(), pebble.issued()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_a_certificate_served_on_every_listener() {
    if !tools("http01_issues_a_certificate_served_on_every_listener") {
        return;
    }
    issues_for_two_names(
        "t1h",
        "http-01",
        ("acme http-01 challenge answered", "http-t1h".into()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_a_certificate_served_on_every_listener() {
    if !tools("tls_alpn01_issues_a_certificate_served_on_every_listener") {
        return;
    }
    issues_for_two_names(
        "t1a",
        "tls-alpn-01, http-01",
        ("acme tls-alpn-01 challenge answered", "imaps-t1a".into()),
    )
    .await;
}

// --- 2. restart ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_the_stored_certificate_without_ordering() {
    if !tools("restart_serves_the_stored_certificate_without_ordering") {
        return;
    }
    let (site, pebble, proxy, yaml, chain) = issued_site("t2r", "http-01").await;
    let s = serial(&chain[0]);
    proxy.shutdown().await;
    assert_eq!(pebble.orders(), 1);

    let proxy = Proxy::start(&yaml).await;
    // At once: the very first handshake.
    let c = served_chain(proxy.addr(&site.imaps()), &site.names[1])
        .await
        .expect("handshake");
    assert_eq!(c, chain, "the stored chain, at once");
    log_line(&[
        "serving the stored ACME certificate",
        &site.host_field(),
        &format!("serial={s} "),
    ])
    .await;
    let row = cert_row(&site).await;
    assert_eq!(
        (row.source.as_str(), row.serial.as_str()),
        ("acme", s.as_str())
    );
    assert_eq!(row.last_error, None);
    let next = row.next_renewal.expect("a renewal time");
    assert!(
        humantime::parse_rfc3339(&next).is_ok_and(|t| t > SystemTime::now() + 30 * DAY),
        "next renewal {next}: not now"
    );
    // Long enough for an order to show up in Pebble's log (one takes ~0.7 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(pebble.orders(), 1, "no new order:\n{}", pebble.log());
}

// --- 3. renewal under load ---

/// Full handshakes to `addr` in a loop, until stopped, 2,000 handshakes or
/// 60 s: each one's serial, or its error.
struct Hammer {
    seen: Arc<Mutex<Vec<Result<String, String>>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Hammer {
    fn start(addr: SocketAddr, sni: String) -> Hammer {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            for _ in 0..2000 {
                if st.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let r = match served_chain(addr, &sni).await {
                    Ok(chain) if !chain.is_empty() => Ok(serial(&chain[0])),
                    Ok(_) => Err("no certificate".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                s.lock().unwrap().push(r);
            }
        });
        Hammer { seen, stop, task }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    async fn finish(self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("handshake loop");
        Arc::try_unwrap(self.seen).unwrap().into_inner().unwrap()
    }
}

/// Writes `data` and reads back exactly as many bytes.
async fn echo<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S, data: &[u8]) -> Vec<u8> {
    let mut back = vec![0u8; data.len()];
    let (mut r, mut w) = tokio::io::split(s);
    let io = async { tokio::try_join!(w.write_all(data), r.read_exact(&mut back)).map(|_| ()) };
    tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .expect("echo within 10 s")
        .expect("echo");
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewal_swaps_the_certificate_under_live_sessions_and_handshakes() {
    if !tools("renewal_swaps_the_certificate_under_live_sessions_and_handshakes") {
        return;
    }
    let (mut site, pebble, proxy, _, chain) = issued_site("t3s", "http-01").await;
    let (old, imaps) = (serial(&chain[0]), proxy.addr(&site.imaps()));

    // An IMAPS session relayed to the echo backend, PROXY header first.
    let mut session = tls_connect(imaps, Some(&site.names[0])).await.unwrap();
    let client = session.get_ref().0.local_addr().unwrap();
    assert_eq!(read_until(&mut session, b"\r\n").await, b"* OK echo\r\n");
    // (Earlier handshakes reached the backend too: skip their headers.)
    let mut h = site.backend.next_header().await;
    for _ in 0..1000 {
        if h.source == Some(client) {
            break;
        }
        h = site.backend.next_header().await;
    }
    assert_eq!(h.source, Some(client), "the client's address");
    assert_eq!(h.version, 2);
    assert_eq!(h.destination, Some(imaps));
    assert_eq!(
        h.tlv(0x02),
        Some(site.names[0].as_bytes()),
        "authority = SNI"
    );
    let before: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    assert!(echo(&mut session, &before).await == before);

    let hammer = Hammer::start(imaps, site.names[0].clone());
    let warm = eventually(Duration::from_secs(20), || async {
        (hammer.count() >= 20).then_some(())
    });
    warm.await.expect("20 handshakes before the renewal");

    let row = renew(&site, true).await;
    assert_eq!(row.outcome, "renewed", "{row:?}\n{}", pebble.log());
    let new = row
        .detail
        .strip_prefix("serial ")
        .and_then(|d| d.split(',').next())
        .unwrap_or_else(|| panic!("detail: {}", row.detail))
        .to_string();
    assert_ne!(new, old);
    // The next handshake, on either listener, gets the new certificate.
    for listener in [site.imaps(), site.smtps()] {
        let c = served_chain(proxy.addr(&listener), &site.names[1])
            .await
            .unwrap();
        assert_eq!(serial(&c[0]), new, "{listener}");
        assert!(chains_to(&pebble.root_der().await, &c, &site.names[1]));
    }
    let at_renewal = hammer.count();
    let after = eventually(Duration::from_secs(20), || async {
        (hammer.count() >= at_renewal + 20 || hammer.task.is_finished()).then_some(())
    });
    after.await.expect("20 handshakes after the renewal");
    let seen = hammer.finish().await;

    let failures: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "handshakes failed: {failures:?}");
    let serials: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().ok()).collect();
    let switch = serials
        .iter()
        .position(|s| **s == new)
        .expect("the loop saw the new certificate");
    assert!(switch > 0, "the loop saw the old one first");
    assert!(serials[..switch].iter().all(|s| **s == old), "{serials:?}");
    assert!(
        serials[switch..].iter().all(|s| **s == new),
        "never back to the old one"
    );
    println!(
        "renewal under load: {} full handshakes, 0 failed ({switch} before the swap)",
        seen.len()
    );

    // The session opened before the renewal relays on, byte-exact.
    let after: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 13 % 253) as u8).collect();
    assert!(echo(&mut session, &after).await == after, "byte-exact");
    let (_, conn) = session.get_ref();
    assert_eq!(
        serial(&conn.peer_certificates().unwrap()[0]),
        old,
        "same session"
    );
}

// --- 4. ARI ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ari_window_triggers_a_renewal_that_replaces_the_old_certificate() {
    if !tools("ari_window_triggers_a_renewal_that_replaces_the_old_certificate") {
        return;
    }
    let site = Site::new("t4w").await;
    let pebble = Pebble::start(site.http, site.imaps).await;
    let ari = AriProxy::start(&pebble).await;
    let far = now_secs() + 365 * DAY;
    ari.set_window(far, far + DAY, 1);
    let yaml = site.config(&ari.directory, &pebble.ca_roots, "http-01");
    let proxy = Proxy::start(&yaml).await;
    let imaps = proxy.addr(&site.imaps());
    let first = wait_issued(imaps, &site.names[0], None)
        .await
        .unwrap_or_else(|| panic!("no certificate:\n{}\n{}", pebble.log(), ari.log()));
    let old = serial(&first[0]);
    let id = instant_acme::CertificateIdentifier::try_from(&CertificateDer::from(first[0].clone()))
        .expect("an ARI id")
        .to_string();

    // Polled right after issuance: a window a year away, so nothing happens.
    log_line(&[
        &site.span(),
        "ARI renewal window",
        &format!("start={}", rfc3339(far)),
    ])
    .await;
    assert!(ari.ari_requests().contains(&id), "{:?}", ari.ari_requests());
    assert!(ari.replaces_seen().is_empty());

    // The CA moves the window to now. Right after an issuance that is held
    // off by the floor (an hour): a CA whose window is always over must not
    // make portcullis order in a loop.
    let start = now_secs();
    ari.set_window(start, start + Duration::from_secs(2), 1);
    log_line(&[
        &site.span(),
        "ARI renewal window",
        &format!("start={}", rfc3339(start)),
    ])
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        common::log_lines(&[&site.span(), "renewing"]).len(),
        1,
        "only the first order"
    );
    let next = cert_row(&site).await.next_renewal.expect("a next renewal");
    let next = humantime::parse_rfc3339(&next).unwrap();
    let floor = next.duration_since(start).unwrap_or_default();
    assert!(
        floor > Duration::from_secs(3500) && floor <= Duration::from_secs(3600),
        "next renewal an hour after the issuance: {floor:?}"
    );

    // Two hours later (the stored issuance time moved back), a restart
    // serves the stored certificate and heeds the window at once: renewed
    // without being asked.
    proxy.shutdown().await;
    site.age_stored_certificate(2 * HOUR);
    let proxy = Proxy::start(&yaml).await;
    let imaps = proxy.addr(&site.imaps());
    let renewed = wait_issued(imaps, &site.names[0], Some(&old)).await;
    // One window for every certificate: stop before it renews the new one too.
    ari.set_window(far, far + DAY, 3600);
    let renewed = renewed.unwrap_or_else(|| panic!("no renewal:\n{}\n{}", pebble.log(), ari.log()));
    log_line(&[
        &site.span(),
        "ARI renewal window",
        &format!("start={}", rfc3339(start)),
    ])
    .await;
    let new = serial(&renewed[0]);
    log_line(&[
        &site.span(),
        "certificate issued",
        &format!("serial={new} "),
    ])
    .await;
    assert_eq!(
        ari.replaces_seen().first(),
        Some(&id),
        "the renewal order replaces the first certificate"
    );
    for sni in &site.names {
        assert!(chains_to(&pebble.root_der().await, &renewed, sni));
    }
    assert_eq!(stored_chain(&site)[0], renewed[0], "stored too");
}

// --- 5. faults ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_down_at_start_placeholder_then_renew_once_it_is_up() {
    if !tools("ca_down_at_start_placeholder_then_renew_once_it_is_up") {
        return;
    }
    let site = Site::new("t5d").await;
    let ports = Pebble::reserve();
    let yaml = site.config(&ports.directory, &ports.ca_roots, "http-01, tls-alpn-01");
    let proxy = Proxy::start(&yaml).await;
    log_line(&[
        "serving a self-signed placeholder until the ACME certificate is issued",
        &site.host_field(),
    ])
    .await;
    let failed = log_line(&[
        &site.span(),
        "certificate order failed; the current certificate keeps serving",
    ])
    .await;
    for field in ["error=", "failures=1 ", "retry_in="] {
        assert!(failed.contains(field), "{field}: {failed}");
    }
    // Still serving: the placeholder, on every listener.
    for listener in [site.imaps(), site.smtps()] {
        let c = served_chain(proxy.addr(&listener), &site.names[0])
            .await
            .unwrap();
        assert!(is_placeholder(&c), "{listener}");
    }
    let row = cert_row(&site).await;
    assert_eq!(row.source, "placeholder");
    assert!(row.last_error.is_some(), "{row:?}");

    // The CA comes up; `portcullis renew` (not forced: a placeholder is due).
    let pebble = ports.start(site.http, site.imaps).await;
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let config = site.config_path();
    let config = config.to_str().unwrap();
    let (ok, out, err) = common::run_cmd(
        bin,
        &["renew", "--config", config, &site.names[1]],
        b"",
        CONTROL,
    )
    .await;
    assert!(ok, "renew failed: {out}{err}\n{}", pebble.log());
    let prefix = format!("{}: renewed: serial ", site.names[0]);
    let new = out
        .trim()
        .strip_prefix(&prefix)
        .and_then(|d| d.split(',').next())
        .unwrap_or_else(|| panic!("renew said: {out}"));
    let c = served_chain(proxy.addr(&site.imaps()), &site.names[1])
        .await
        .unwrap();
    assert_eq!(serial(&c[0]), new);
    let root = pebble.root_der().await;
    for sni in &site.names {
        assert!(chains_to(&root, &c, sni), "{sni}");
    }

    let (ok, out, err) =
        common::run_cmd(bin, &["certs", "--config", config, "--json"], b"", CONTROL).await;
    assert!(ok, "{out}{err}");
    let row: CertRow = serde_json::from_str(out.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("certs --json: {e}: {out}"));
    assert_eq!((row.source.as_str(), row.serial.as_str()), ("acme", new));
    assert_eq!(row.last_error, None);
}

/// What a user reads when the CA cannot be reached: the log line, `certs`
/// and `renew` must say why (here: connection refused), not only that the
/// connection failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_ca_error_says_why() {
    if !tools("unreachable_ca_error_says_why") {
        return;
    }
    let site = Site::new("t5u").await;
    let ports = Pebble::reserve(); // never started: nothing listens there
    let yaml = site.config(&ports.directory, &ports.ca_roots, "http-01");
    let _proxy = Proxy::start(&yaml).await;
    let failed = log_line(&[
        &site.span(),
        "certificate order failed; the current certificate keeps serving",
    ])
    .await;
    let row = renew(&site, true).await;
    assert_eq!(row.outcome, "failed", "{row:?}");
    for (what, text) in [("log", failed.as_str()), ("renew", row.detail.as_str())] {
        assert!(
            text.to_lowercase().contains("connection refused"),
            "the {what} does not say why the CA at {} is unreachable: {text}",
            ports.directory
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_challenge_is_reported_and_the_placeholder_keeps_serving() {
    if !tools("failed_challenge_is_reported_and_the_placeholder_keeps_serving") {
        return;
    }
    let site = Site::new("t5c").await;
    // Pebble's validator fetches http-01 tokens from a port nobody listens on.
    let pebble = Pebble::start(free_port(), site.imaps).await;
    let yaml = site.config(&pebble.directory, &pebble.ca_roots, "http-01");
    let proxy = Proxy::start(&yaml).await;
    let error = eventually(ISSUE, || async { cert_row(&site).await.last_error })
        .await
        .unwrap_or_else(|| panic!("no failure reported:\n{}", pebble.log()));
    let failed = log_line(&[
        &site.span(),
        "certificate order failed; the current certificate keeps serving",
    ])
    .await;
    assert!(failed.contains("failures=1 "), "{failed}");
    println!("challenge failure: {error}");
    assert!(
        error.contains("connection refused") || error.contains("Connection refused"),
        "{error}"
    );
    assert!(
        error.contains(&site.names[0]) || error.contains(&site.names[1]),
        "names the failing name: {error}"
    );

    let row = renew(&site, true).await;
    assert_eq!(row.outcome, "failed", "{row:?}");
    assert!(row.detail.contains("onnection refused"), "{row:?}");
    let c = served_chain(proxy.addr(&site.imaps()), &site.names[0])
        .await
        .unwrap();
    assert!(is_placeholder(&c), "the placeholder keeps serving");
    assert_eq!(pebble.issued(), 0);
    assert!(!site.host_dir().join("fullchain.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_challenge_type_gives_way_to_the_next_one() {
    if !tools("a_failed_challenge_type_gives_way_to_the_next_one") {
        return;
    }
    let site = Site::new("t5r").await;
    // tls-alpn-01 is preferred, but the CA's validator is pointed at a dead
    // port for it (a mail-only box with nothing on 443); http-01 works.
    let pebble = Pebble::start(site.http, free_port()).await;
    let yaml = site.config(&pebble.directory, &pebble.ca_roots, "tls-alpn-01, http-01");
    let proxy = Proxy::start(&yaml).await;
    let failed = log_line(&[
        &site.span(),
        "certificate order failed; the current certificate keeps serving",
    ])
    .await;
    assert!(
        failed.contains("tls-alpn-01")
            || failed.contains("TlsAlpn01")
            || failed.contains("acme-tls"),
        "{failed}"
    );
    // The next attempt (asked for now instead of after the backoff) leads
    // with http-01 and succeeds.
    let row = renew(&site, false).await;
    assert_eq!(row.outcome, "renewed", "{row:?}");
    log_line(&[&site.span(), "renewing", "challenges=http-01,tls-alpn-01"]).await;
    let chain = served_chain(proxy.addr(&site.imaps()), &site.names[0])
        .await
        .unwrap();
    assert!(!is_placeholder(&chain));
    assert!(chains_to(&pebble.root_der().await, &chain, &site.names[1]));
}

/// Issue, stop, damage `fullchain.pem` with `damage`, restart: the damaged
/// pair is reported and never served, and a fresh certificate replaces it.
async fn damaged_store_is_replaced(tag: &'static str, damage: fn(&[u8]) -> Vec<u8>) {
    let (site, pebble, proxy, yaml, chain) = issued_site(tag, "http-01").await;
    let old = serial(&chain[0]);
    proxy.shutdown().await;
    let path = site.host_dir().join("fullchain.pem");
    std::fs::write(&path, damage(&std::fs::read(&path).unwrap())).unwrap();

    let proxy = Proxy::start(&yaml).await;
    let imaps = proxy.addr(&site.imaps());
    let first = served_chain(imaps, &site.names[0])
        .await
        .expect("handshake");
    assert_ne!(serial(&first[0]), old, "the damaged pair is not served");
    let unusable = log_line(&[
        "stored ACME certificate unusable: not served, ordering a new one",
        &site.host_field(),
    ])
    .await;
    assert!(unusable.contains("ERROR"), "{unusable}");
    log_line(&[
        "serving a self-signed placeholder until the ACME certificate is issued",
        &site.host_field(),
    ])
    .await;
    println!(
        "{tag}: {unusable}\n{tag}: first handshake after the restart: {}",
        if is_placeholder(&first) {
            "placeholder"
        } else {
            "fresh certificate"
        }
    );
    let fresh = wait_issued(imaps, &site.names[0], Some(&old))
        .await
        .unwrap_or_else(|| panic!("no fresh certificate:\n{}", pebble.log()));
    assert!(
        is_placeholder(&first) || first == fresh,
        "the first handshake got the placeholder (or already the fresh one)"
    );
    for sni in &site.names {
        assert!(chains_to(&pebble.root_der().await, &fresh, sni));
    }
    assert_eq!(stored_chain(&site), fresh, "whole on disk again");
    assert_eq!(mode(&site.host_dir().join("privkey.pem")), 0o600);
    assert_eq!(pebble.issued(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_store_is_reported_and_replaced() {
    if !tools("garbage_in_the_store_is_reported_and_replaced") {
        return;
    }
    damaged_store_is_replaced("t5g", |_| b"garbage\n".to_vec()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_written_chain_in_the_store_is_reported_and_replaced() {
    if !tools("half_written_chain_in_the_store_is_reported_and_replaced") {
        return;
    }
    // The leaf whole, the intermediate cut off: it must not pass for a chain.
    damaged_store_is_replaced("t5h", |pem| {
        let marker = b"-----BEGIN CERTIFICATE-----";
        let second = pem
            .windows(marker.len())
            .rposition(|w| w == marker)
            .filter(|&i| i > 0)
            .expect("two certificates");
        pem[..second + (pem.len() - second) / 2].to_vec()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_state_dir_is_refused_naming_the_path() {
    if !tools("unusable_state_dir_is_refused_naming_the_path") {
        return;
    }
    let dir = common::scratch();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory\n").unwrap();
    let state = file.join("state");
    let yaml = format!(
        r#"
state_dir: {state}
acme:
  directory: https://127.0.0.1:9/dir
  terms_of_service_agreed: true
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends:
  imaps: 127.0.0.1:9
hosts:
  - names: [imap.t5s.test]
    certificate: acme
"#,
        state = state.display()
    );
    let config = portcullis::config::Config::parse(&yaml, dir.path()).expect("valid config");
    let errors = match portcullis::server::Server::bind(&config) {
        Ok(_) => panic!("bound with state_dir under a regular file"),
        Err(e) => e,
    };
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let want = format!("state_dir {}: ", state.display());
    assert!(text.iter().any(|t| t.starts_with(&want)), "{text:?}");

    // What `portcullis run` says.
    let path = dir.path().join("portcullis.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let (ok, out, err) = common::run_cmd(
        bin,
        &["run", "--config", path.to_str().unwrap()],
        b"",
        Duration::from_secs(20),
    )
    .await;
    assert!(!ok, "run started: {out}{err}");
    assert!(err.contains(&want) || out.contains(&want), "{out}{err}");
}

/// `portcullis renew --dry-run`: an order from `acme.staging` (here the
/// same Pebble) with the host's names and challenges; nothing served,
/// stored or swapped. Without a staging directory it says what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_orders_from_staging_and_keeps_nothing() {
    if !tools("a_dry_run_orders_from_staging_and_keeps_nothing") {
        return;
    }
    let site = Site::new("dryrun").await;
    let pebble = Pebble::start(site.http, site.imaps).await;
    let plain = site.config(&pebble.directory, &pebble.ca_roots, "http-01");
    let yaml = plain.replace(
        "  challenges: [",
        &format!("  staging: {}\n  challenges: [", pebble.directory),
    );
    std::fs::write(site.config_path(), &yaml).unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    let proxy = Proxy::start_file(dir, &yaml).await;
    let imaps = proxy.addr(&site.imaps());
    let first = wait_issued(imaps, &site.names[0], None)
        .await
        .unwrap_or_else(|| panic!("no certificate\n{}", pebble.log()));
    let stored = std::fs::read(site.host_dir().join("fullchain.pem")).unwrap();
    assert_eq!(pebble.orders(), 1);

    let dry_run = |site: &Site| {
        let request = Request::Renew {
            dry_run: true,
            force: false,
            name: Some(site.names[0].clone()),
        };
        let state = site.state_dir();
        async move {
            match control::request(&state, &request, CONTROL).await {
                Ok(Response::Renew(mut rows)) if rows.len() == 1 => rows.remove(0),
                other => panic!("renew --dry-run: {other:?}"),
            }
        }
    };
    let row = dry_run(&site).await;
    assert_eq!(row.outcome, "dry_run", "{row:?}\n{}", pebble.log());
    assert!(row.detail.contains(&pebble.directory), "{row:?}");
    assert!(row.detail.contains("not served, not stored"), "{row:?}");
    assert_eq!(pebble.orders(), 2, "one order at the staging directory");
    let issued_serial = row
        .detail
        .split("issued serial ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap()
        .to_string();
    assert_ne!(issued_serial, serial(&first[0]));
    // Nothing changed: the same certificate served, stored and listed.
    let served = served_chain(imaps, &site.names[0]).await.unwrap();
    assert_eq!(serial(&served[0]), serial(&first[0]));
    assert_eq!(
        std::fs::read(site.host_dir().join("fullchain.pem")).unwrap(),
        stored
    );
    assert_eq!(cert_row(&site).await.serial, serial(&first[0]));
    assert!(cert_row(&site).await.last_error.is_none());

    // A CA without a known staging directory: the dry run says what to set.
    proxy.write_config(&plain);
    proxy.reload().await.expect("reload");
    let row = dry_run(&site).await;
    assert_eq!(row.outcome, "failed", "{row:?}");
    assert!(
        row.detail
            .contains("no staging directory is known for https://127.0.0.1:"),
        "{row:?}"
    );
    assert!(row.detail.contains("set acme.staging"), "{row:?}");
    assert_eq!(pebble.orders(), 2, "no order");
}
