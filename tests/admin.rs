//! The admin endpoint as an operator's monitoring sees it: `/metrics` after a
//! known sequence of sessions, counted exactly and scraped with real curl,
//! then read back by Python's `prometheus_client` parser (what proves the
//! text is valid exposition format); `/healthz` turning 503 for an expired or
//! nearly expired certificate and back to 200 after a reload; wrong paths and
//! methods refused.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{log_line, read_until, tls_connect, Backend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on one curl or python run.
const LIMIT: Duration = Duration::from_secs(20);
/// What the echo backend says first, before it echoes.
const GREETING: &[u8] = b"* OK echo backend ready\r\n";

/// One HTTP answer as curl saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

/// `curl -X METHOD http://ADDR/PATH`, with a deadline and no proxy from the
/// environment.
async fn curl(method: &str, addr: &str, path: &str) -> Answer {
    curl_accept(method, addr, path, "*/*").await
}

/// [`curl`] with `Accept: accept`.
async fn curl_accept(method: &str, addr: &str, path: &str, accept: &str) -> Answer {
    let url = format!("http://{addr}{path}");
    let accept = format!("Accept: {accept}");
    let (ok, out, err) = common::run_cmd(
        "curl",
        &[
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "-H",
            &accept,
            "-X",
            method,
            "-w",
            "\n%{http_code} %{content_type}",
            &url,
        ],
        b"",
        LIMIT,
    )
    .await;
    assert!(ok, "curl {method} {url} failed: {err}");
    let (body, tail) = out
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no status line from curl: {out:?}"));
    let (status, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    Answer {
        status: status.parse().unwrap_or_else(|_| panic!("status {tail:?}")),
        content_type: content_type.to_string(),
        body: body.to_string(),
    }
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
fn value<'a>(text: &'a str, series: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
}

/// A python3 that can import `module`: the one on PATH, or Debian's own
/// (where `apt-get install python3-…` puts modules, when PATH leads to
/// another Python first). None: skipped loudly, or a failure under
/// `PORTCULLIS_REQUIRE_TOOLS=1`, like [`common::tool`].
async fn python_with(module: &str, package: &str, test: &str) -> Option<String> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join("python3").is_file()))
        .unwrap_or(false);
    let mut candidates = Vec::new();
    if on_path {
        candidates.push("python3");
    }
    if Path::new("/usr/bin/python3").is_file() {
        candidates.push("/usr/bin/python3");
    }
    for python in candidates {
        let import = format!("import {module}");
        let (ok, _, _) = common::run_cmd(python, &["-c", &import], b"", LIMIT).await;
        if ok {
            return Some(python.to_string());
        }
    }
    let msg = format!(
        "SKIPPED {test}: no python3 with the `{module}` module (Debian package {package}; bash .ci/run installs it)"
    );
    if std::env::var("PORTCULLIS_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{msg}, and PORTCULLIS_REQUIRE_TOOLS=1 forbids skipping");
    }
    common::say_skipped(&msg);
    None
}

/// A certificate's notAfter, as Unix time.
fn not_after(cert: &Path) -> i64 {
    let pem = std::fs::read(cert).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    cert.validity().not_after.timestamp()
}

fn rfc3339(unix: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix as u64)).to_string()
}

/// A TLS session that gets the backend's greeting and `payload` echoed
/// back, then closes cleanly; returns the bytes it sent and received
/// through the relay.
async fn echo_session(addr: std::net::SocketAddr, sni: Option<&str>, payload: &[u8]) -> (u64, u64) {
    let mut tls = tls_connect(addr, sni)
        .await
        .unwrap_or_else(|e| panic!("handshake with SNI {sni:?}: {e}"));
    tls.write_all(payload).await.unwrap();
    tls.flush().await.unwrap();
    let mut got = vec![0u8; GREETING.len() + payload.len()];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("SNI {sni:?}: no echo within 10 s"))
        .unwrap();
    assert_eq!(&got[..GREETING.len()], GREETING, "SNI {sni:?}: greeting");
    assert!(
        got[GREETING.len()..] == *payload,
        "SNI {sni:?}: echo differs"
    );
    tls.shutdown().await.unwrap();
    // The relay closes its side after the backend's: read to that end.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("SNI {sni:?}: session not closed within 10 s of ours"))
        .unwrap_or_else(|e| panic!("SNI {sni:?}: unclean close: {e}"));
    assert!(
        rest.is_empty(),
        "SNI {sni:?}: bytes after the echo: {rest:?}"
    );
    (payload.len() as u64, got.len() as u64)
}

/// Two good sessions, one without SNI, one unknown name refused, one to a
/// host whose backend is down: every counter says exactly that, and the
/// output parses as Prometheus exposition format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_sequence_of_sessions_exactly() {
    let test = "metrics_count_a_known_sequence_of_sessions_exactly";
    if !common::tool("curl", test) {
        return;
    }
    let dir = common::scratch();
    let (mail_crt, mail_key) = common::cert_files(
        dir.path(),
        "mail",
        &["mail.example.test", "imap.example.test"],
    );
    let (down_crt, down_key) = common::cert_files(dir.path(), "down", &["down.example.test"]);
    let echo = Backend::start("* OK echo backend ready\r\n", true).await;
    let dead = format!("127.0.0.1:{}", common::free_port()); // nothing listens there
    let admin = format!("127.0.0.1:{}", common::free_port());
    let yaml = format!(
        r#"
state_dir: state
admin: {{ bind: "{admin}" }}
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
unknown_sni: reject
hosts:
  - names: [mail.example.test, imap.example.test]
    certificate: {{ cert: {mail_crt}, key: {mail_key} }}
    backends:
      imaps: "{echo}"
  - names: [down.example.test]
    certificate: {{ cert: {down_crt}, key: {down_key} }}
    backends:
      imaps: "{dead}"
"#,
        echo = echo.addr,
        mail_crt = mail_crt.display(),
        mail_key = mail_key.display(),
        down_crt = down_crt.display(),
        down_key = down_key.display(),
    );
    let proxy = Proxy::start_in(dir, &yaml).await;
    let imaps = proxy.addr("imaps");

    // 1, 2: SNI mail.example.test, relayed both ways (one small, one
    // spanning several TLS records)
    let big: Vec<u8> = (0..40_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (mut up, mut down) = echo_session(imaps, Some("mail.example.test"), b"a1 NOOP\r\n").await;
    let (u, d) = echo_session(imaps, Some("mail.example.test"), &big).await;
    (up, down) = (up + u, down + d);
    log_line(&[
        "session closed",
        "outcome=closed",
        "sni=\"mail.example.test\"",
        &format!("bytes.up={}", big.len()),
        &format!("bytes.down={}", GREETING.len() + big.len()),
    ])
    .await;
    // 3: no SNI: default_host (the first host) serves it
    let (u, d) = echo_session(imaps, None, b"a2 LOGOUT\r\n").await;
    (up, down) = (up + u, down + d);
    // 4: unknown SNI under unknown_sni: reject
    let err = tls_connect(imaps, Some("nobody.example.net"))
        .await
        .expect_err("an unknown name must be refused");
    assert!(
        format!("{err:?}").contains("UnrecognisedName"),
        "expected an unrecognized_name alert, got {err:?}"
    );
    // 5: the handshake completes, the backend is down
    let mut tls = tls_connect(imaps, Some("down.example.test"))
        .await
        .expect("handshake for down.example.test");
    let bye = read_until(&mut tls, b"\r\n").await;
    assert!(
        String::from_utf8_lossy(&bye).starts_with("* BYE [UNAVAILABLE]"),
        "the client hears why: {:?}",
        String::from_utf8_lossy(&bye)
    );
    drop(tls);
    // the operator sees the same outcome in the log, at warn, with the backend
    log_line(&[
        "WARN",
        "session closed",
        "outcome=backend_unavailable",
        "sni=\"down.example.test\"",
        &format!("backend={dead}"),
    ])
    .await;
    assert_eq!(
        echo.connections(),
        3,
        "sessions 1-3 reached the echo backend"
    );

    // The last session's task may still be ending: scrape until it has.
    let mut text = String::new();
    let open = "portcullis_connections_open{listener=\"imaps\"}";
    for _ in 0..50 {
        let answer = curl("GET", &admin, "/metrics").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        text = answer.body;
        if value(&text, open) == Some("0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expect = |series: String, want: String| {
        assert_eq!(
            value(&text, &series),
            Some(want.as_str()),
            "{series}\n--- /metrics was:\n{text}"
        );
    };
    let s = |x: &str| x.to_string();
    expect(s(open), s("0"));
    expect(
        s("portcullis_connections_total{listener=\"imaps\"}"),
        s("5"),
    );
    for (outcome, n) in [
        ("ok", 3), // the two echo sessions and down.example.test
        ("no_sni", 1),
        ("unknown_sni", 1),
        ("alpn_refused", 0),
        ("alert", 0),
        ("timeout", 0),
        ("client_left", 0),
        ("incompatible", 0),
        ("client_alert", 0),
        ("not_tls", 0),
    ] {
        expect(
            format!("portcullis_handshakes_total{{listener=\"imaps\",outcome=\"{outcome}\"}}"),
            n.to_string(),
        );
    }
    for (outcome, n) in [
        ("closed", 3),
        ("unknown_sni", 1),
        ("backend_unavailable", 1),
    ] {
        expect(
            format!("portcullis_sessions_total{{listener=\"imaps\",outcome=\"{outcome}\"}}"),
            n.to_string(),
        );
    }
    // Every other outcome is absent or 0 (the ones worth alerting on
    // exist from the start, at 0, so the first one shows as an increase).
    let others: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("portcullis_sessions_total{"))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert_eq!(others.len(), 3, "no other session outcome: {others:#?}");
    for outcome in ["backend_refused", "no_backend", "handshake_failed"] {
        expect(
            format!("portcullis_sessions_total{{listener=\"imaps\",outcome=\"{outcome}\"}}"),
            s("0"),
        );
    }
    expect(
        format!("portcullis_backend_connect_failures_total{{backend=\"{dead}\"}}"),
        s("1"),
    );
    // the working backend never failed: there from the start, at 0
    expect(
        format!(
            "portcullis_backend_connect_failures_total{{backend=\"{}\"}}",
            echo.addr
        ),
        s("0"),
    );
    expect(
        s("portcullis_relayed_bytes_total{listener=\"imaps\",direction=\"up\"}"),
        up.to_string(),
    );
    expect(
        s("portcullis_relayed_bytes_total{listener=\"imaps\",direction=\"down\"}"),
        down.to_string(),
    );
    expect(
        format!("portcullis_listener_accepting{{listener=\"imaps\",address=\"{imaps}\"}}"),
        s("1"),
    );
    for (host, name, file) in [
        ("mail.example.test", "mail.example.test", &mail_crt),
        ("mail.example.test", "imap.example.test", &mail_crt),
        ("down.example.test", "down.example.test", &down_crt),
    ] {
        expect(
            format!("portcullis_certificate_expiry_timestamp_seconds{{host=\"{host}\",name=\"{name}\",source=\"files\",key_type=\"ecdsa-p256\"}}"),
            not_after(file).to_string(),
        );
    }
    eprintln!(
        "--- /metrics (portcullis_ samples):\n{}",
        text.lines()
            .filter(|l| l.starts_with("portcullis_"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Valid exposition format: Python's prometheus_client reads it all, with
    // the types the HELP/TYPE lines declare, as OpenMetrics when that is
    // asked for (`_total` counters, `# EOF`) and, the same numbers, as the
    // Prometheus text format served by default.
    let Some(python) = python_with("prometheus_client", "python3-prometheus-client", test).await
    else {
        return;
    };
    let open_metrics = curl_accept("GET", &admin, "/metrics", "application/openmetrics-text").await;
    assert!(
        open_metrics
            .content_type
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "{open_metrics:?}"
    );
    let om = parse_metrics(&python, "openmetrics", &open_metrics.body).await;
    for (name, kind, samples) in [
        ("portcullis_connections_open", "gauge", 1),
        ("portcullis_connections", "counter", 1),
        ("portcullis_handshakes", "counter", 10),
        ("portcullis_connections_refused", "counter", 2),
        ("portcullis_starttls_upgrades", "counter", 1),
        ("portcullis_sessions", "counter", 6),
        ("portcullis_relayed_bytes", "counter", 2),
        ("portcullis_backend_connect_failures", "counter", 2),
        ("portcullis_config_reloads", "counter", 2),
        ("portcullis_listener_accepting", "gauge", 1),
        (
            "portcullis_certificate_expiry_timestamp_seconds",
            "gauge",
            3,
        ),
        ("portcullis_certificate_not_after_seconds", "gauge", 3),
        ("portcullis_config_last_reload_successful", "gauge", 1),
        ("portcullis_max_connections", "gauge", 1),
        ("portcullis_build_info", "gauge", 1),
        // sum, count and 13 buckets
        ("portcullis_handshake_duration_seconds", "histogram", 15),
        // two backends, 14 samples each
        (
            "portcullis_backend_connect_duration_seconds",
            "histogram",
            28,
        ),
        ("process_open_fds", "gauge", 1),
    ] {
        assert!(
            om.families.contains(&(name.into(), kind.into(), samples)),
            "prometheus_client did not read {name} as a {kind} with {samples} sample(s); it read:\n{:#?}",
            om.families
        );
    }
    let lines = open_metrics
        .body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    assert_eq!(om.samples.len(), lines, "{:#?}", om.samples);
    assert_eq!(
        om.samples
            .get("portcullis_handshakes_total{listener=\"imaps\",outcome=\"ok\"}")
            .map(String::as_str),
        Some("3")
    );
    let classic = parse_metrics(&python, "text", &text).await;
    let without_process = |samples: &std::collections::BTreeMap<String, String>| {
        samples
            .iter()
            .filter(|(k, _)| !k.starts_with("process_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        without_process(&classic.samples),
        without_process(&om.samples),
        "both parsers read the same numbers (but the process's, two scrapes apart)"
    );
    assert_eq!(classic.families.len(), om.families.len());
}

/// What Python's prometheus_client read from an exposition.
struct Parsed {
    /// (family, type, number of samples)
    families: Vec<(String, String, usize)>,
    /// `name{labels sorted}` → value
    samples: std::collections::BTreeMap<String, String>,
}

/// Parses `text` with prometheus_client's `openmetrics` parser or its
/// Prometheus `text` (0.0.4) parser; a parse error fails the test.
async fn parse_metrics(python: &str, format: &str, text: &str) -> Parsed {
    const SCRIPT: &str = r#"
import sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse
else:
    from prometheus_client.parser import text_string_to_metric_families as parse
for f in parse(sys.stdin.read()):
    print("family", f.name, f.type, len(f.samples))
    for s in f.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        v = int(s.value) if s.value == int(s.value) else s.value
        print("sample", "%s{%s}" % (s.name, labels), v)
"#;
    let (ok, out, err) =
        common::run_cmd(python, &["-c", SCRIPT, format], text.as_bytes(), LIMIT).await;
    assert!(
        ok,
        "prometheus_client ({format}) cannot parse /metrics: {err}\n--- /metrics was:\n{text}"
    );
    let mut parsed = Parsed {
        families: Vec::new(),
        samples: Default::default(),
    };
    for line in out.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["family", name, kind, n] => {
                parsed
                    .families
                    .push((name.to_string(), kind.to_string(), n.parse().unwrap()))
            }
            ["sample", series, value] => {
                parsed.samples.insert(series.to_string(), value.to_string());
            }
            _ => panic!("unexpected line from the parser script: {line:?}"),
        }
    }
    parsed
}

/// A proxy with one self-signed host and the admin endpoint; its address.
async fn minimal_with_admin() -> (Proxy, String) {
    let admin = format!("127.0.0.1:{}", common::free_port());
    let proxy = Proxy::start(&format!(
        r#"
state_dir: state
admin: {{ bind: "{admin}" }}
listeners: {{ imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }} }}
backends: {{ imaps: "127.0.0.1:9" }}
hosts: [ {{ names: [mail.example.test], certificate: self-signed }} ]
"#
    ))
    .await;
    (proxy, admin)
}

/// Prometheus picks its parser by Content-Type: the body must be in the
/// format the header names, or counters lose their type (the Prometheus
/// text parser reads `# TYPE portcullis_connections counter` followed by
/// `portcullis_connections_total` as a counter with no samples and an
/// untyped series).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_content_type_names_the_format_of_the_body() {
    let test = "metrics_content_type_names_the_format_of_the_body";
    if !common::tool("curl", test) {
        return;
    }
    let (_proxy, admin) = minimal_with_admin().await;
    let answer = curl("GET", &admin, "/metrics").await;
    let Some(python) = python_with("prometheus_client", "python3-prometheus-client", test).await
    else {
        return;
    };
    let format = if answer
        .content_type
        .starts_with("application/openmetrics-text")
    {
        "openmetrics"
    } else {
        assert!(
            answer.content_type.starts_with("text/plain; version=0.0.4"),
            "not a Prometheus content type: {answer:?}"
        );
        "text"
    };
    let parsed = parse_metrics(&python, format, &answer.body).await;
    assert!(
        parsed
            .families
            .contains(&("portcullis_connections".into(), "counter".into(), 1)),
        "served as {:?}, the {format} parser reads the counter portcullis_connections as {:?}",
        answer.content_type,
        parsed
            .families
            .iter()
            .filter(|f| f.0.starts_with("portcullis_connections"))
            .collect::<Vec<_>>()
    );
}

/// A self-signed ECDSA certificate for `names` valid from `from` to
/// `until`, written to `dir/TAG.crt` and `dir/TAG.key` (over what is there).
fn write_cert(
    dir: &Path,
    tag: &str,
    names: &[&str],
    from: time::OffsetDateTime,
    until: time::OffsetDateTime,
) -> (PathBuf, PathBuf) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    params.not_before = from;
    params.not_after = until;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (
        dir.join(format!("{tag}.crt")),
        dir.join(format!("{tag}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// `/healthz` is what a load balancer or an uptime check looks at: 503 and
/// the host's name for an expired certificate, 200 once a good one is
/// reloaded, 503 again a few days before expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_for_an_expired_or_expiring_certificate_until_it_is_replaced() {
    let test = "healthz_fails_for_an_expired_or_expiring_certificate_until_it_is_replaced";
    if !common::tool("curl", test) {
        return;
    }
    let dir = common::scratch();
    let names = ["mail.example.test", "imap.example.test"];
    common::cert_files(dir.path(), "fine", &["fine.example.test"]);
    let (crt, _) = write_cert(
        dir.path(),
        "mail",
        &names,
        rcgen::date_time_ymd(2020, 1, 1),
        rcgen::date_time_ymd(2021, 1, 1),
    );
    let admin = format!("127.0.0.1:{}", common::free_port());
    let yaml = format!(
        r#"
state_dir: state
admin: {{ bind: "{admin}" }}
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
backends: {{ imaps: "127.0.0.1:9" }}
hosts:
  - names: [fine.example.test]
    certificate: {{ cert: fine.crt, key: fine.key }}
  - names: [mail.example.test, imap.example.test]
    certificate: {{ cert: mail.crt, key: mail.key }}
"#
    );
    let proxy = Proxy::start_file(dir, &yaml).await;
    let dir = proxy.dir.path();

    // expired: 503, one line naming the host, its source and the date
    let health = curl("GET", &admin, "/healthz").await;
    assert_eq!(health.status, 503, "{health:?}");
    assert_eq!(health.content_type, "text/plain");
    assert_eq!(
        health.body, "certificate for mail.example.test (files) expired at 2021-01-01T00:00:00Z\n",
        "only the expired host is named"
    );
    let metrics = curl("GET", &admin, "/metrics").await.body;
    assert_eq!(
        value(
            &metrics,
            "portcullis_certificate_expiry_timestamp_seconds{host=\"mail.example.test\",name=\"imap.example.test\",source=\"files\",key_type=\"ecdsa-p256\"}"
        ),
        Some("1609459200"),
        "{metrics}"
    );

    // a good pair over the same files, reloaded: healthy
    common::cert_files(dir, "mail", &names);
    proxy
        .reload()
        .await
        .expect("reload with a good certificate");
    let health = curl("GET", &admin, "/healthz").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (200, "ok\n"),
        "{health:?}"
    );

    // three days (and an hour) from expiry: inside the 7-day margin
    let now = time::OffsetDateTime::now_utc();
    let soon = now + time::Duration::days(3) + time::Duration::hours(1);
    write_cert(dir, "mail", &names, now - time::Duration::days(80), soon);
    proxy
        .reload()
        .await
        .expect("reload with an expiring certificate");
    let health = curl("GET", &admin, "/healthz").await;
    assert_eq!(health.status, 503, "{health:?}");
    assert_eq!(
        health.body,
        format!(
            "certificate for mail.example.test (files) expires in 3 days, at {}, and has not been renewed\n",
            rfc3339(not_after(&crt))
        )
    );
    let left = not_after(&crt)
        - SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!(left > 3 * 86_400, "the certificate is the one just written");
}

/// Only `GET /metrics` and `GET /healthz`: another path is 404, another
/// method 405, each with a hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_refuses_other_paths_and_methods() {
    if !common::tool("curl", "admin_refuses_other_paths_and_methods") {
        return;
    }
    let (proxy, admin) = minimal_with_admin().await;
    let cases = [
        ("GET", "/nope", 404, "try /metrics or /healthz\n"),
        ("GET", "/", 404, "try /metrics or /healthz\n"),
        ("POST", "/metrics", 405, "GET only\n"),
        ("DELETE", "/healthz", 405, "GET only\n"),
        ("GET", "/healthz?verbose=1", 200, "ok\n"),
    ];
    for (method, path, status, body) in cases {
        let got = curl(method, &admin, path).await;
        assert_eq!(
            (got.status, got.body.as_str()),
            (status, body),
            "{method} {path}: {got:?}"
        );
    }
    proxy.shutdown().await;
}
