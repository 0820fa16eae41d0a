//! What an operator's Prometheus and Grafana read, checked with
//! Prometheus's own tool: a real scrape after sessions, refused handshakes
//! and reloads passes `promtool check metrics` as served by default
//! (Prometheus text 0.0.4) and parses as OpenMetrics when that is asked
//! for, each under the content type that names it; the shipped alerting
//! rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`); every metric the alerts and the Grafana
//! dashboard query is one a scrape has, and README lists every one.
//!
//! Loopback only; a missing promtool or curl skips with a SKIPPED line, or
//! fails under `PORTCULLIS_REQUIRE_TOOLS=1` (Debian's `prometheus` package
//! ships promtool; `bash .ci/run` installs it).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{sample, tls_connect, Backend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on one curl or promtool run.
const LIMIT: Duration = Duration::from_secs(30);
const GREETING: &[u8] = b"* OK echo backend ready\r\n";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// One `/metrics` answer as curl saw it.
#[derive(Debug)]
struct Scrape {
    content_type: String,
    body: String,
}

/// `curl http://ADDR/metrics`, with `Accept: accept` if given (curl's own
/// is `*/*`).
async fn scrape(admin: &str, accept: Option<&str>) -> Scrape {
    let url = format!("http://{admin}/metrics");
    let header = accept.map(|a| format!("Accept: {a}"));
    let mut args = vec!["-sS", "--noproxy", "*", "--max-time", "10"];
    if let Some(h) = &header {
        args.extend(["-H", h.as_str()]);
    }
    args.extend(["-w", "\n%{http_code} %{content_type}", &url]);
    let (ok, out, err) = common::run_cmd("curl", &args, b"", LIMIT).await;
    assert!(ok, "curl {url} failed: {err}");
    let (body, tail) = out.rsplit_once('\n').expect("curl's status line");
    let (status, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    assert_eq!(status, "200", "{out}");
    Scrape {
        content_type: content_type.to_string(),
        body: body.to_string(),
    }
}

/// `promtool ARGS` in `dir`, fed `stdin`: (success, stdout + stderr).
async fn promtool(args: &[&str], dir: &Path, stdin: &[u8]) -> (bool, String) {
    use std::process::Stdio;
    let mut child = tokio::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn promtool");
    let mut input = child.stdin.take().expect("piped stdin");
    let data = stdin.to_vec();
    tokio::spawn(async move {
        let _ = input.write_all(&data).await;
        let _ = input.shutdown().await;
    });
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("promtool {args:?} ran past {LIMIT:?}"))
        .expect("promtool ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A TLS session through the proxy to the echo backend and back.
async fn echo_session(addr: std::net::SocketAddr, sni: &str) {
    let mut tls = tls_connect(addr, Some(sni))
        .await
        .unwrap_or_else(|e| panic!("handshake with {sni}: {e}"));
    tls.write_all(b"a1 NOOP\r\n").await.unwrap();
    let mut got = vec![0u8; GREETING.len() + 9];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut got))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(&got[..GREETING.len()], GREETING);
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
}

/// A client that trusts no certificate: it refuses the proxy's with an
/// alert, as a client missing an intermediate or a CA would.
async fn distrusting_client(addr: std::net::SocketAddr, sni: &str) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let err = common::tls_connect_with(addr, Some(sni), Arc::new(config))
        .await
        .expect_err("a client trusting nothing refuses the certificate");
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
}

/// A TLS 1.2 client offering only RSA cipher suites, to a host whose one
/// certificate is ECDSA: nothing in common.
async fn incompatible_client(addr: std::net::SocketAddr, sni: &str) {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256],
        ..default_provider()
    };
    // It fails before any certificate is seen: no verifier needed.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let err = common::tls_connect_with(addr, Some(sni), Arc::new(config))
        .await
        .expect_err("no cipher suite in common");
    assert!(format!("{err:?}").contains("HandshakeFailure"), "{err:?}");
}

/// How long the STARTTLS client dawdles before STARTTLS: time the
/// handshake histogram must not count.
const DAWDLE: Duration = Duration::from_millis(1200);

/// An IMAP session that waits [`DAWDLE`] in plaintext, upgrades with
/// STARTTLS and has one command echoed by the backend.
async fn starttls_session(addr: std::net::SocketAddr, sni: &str) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let greeting = common::read_until(&mut tcp, b"\r\n").await;
    assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
    tokio::time::sleep(DAWDLE).await;
    tcp.write_all(b"a1 STARTTLS\r\n").await.unwrap();
    let ok = common::read_until(&mut tcp, b"\r\n").await;
    assert!(ok.starts_with(b"a1 OK"), "{ok:?}");
    let mut tls = common::tls_over(tcp, Some(sni), common::client_config(&[]))
        .await
        .expect("handshake after STARTTLS");
    tls.write_all(b"a2 NOOP\r\n").await.unwrap();
    // The backend's greeting was dropped (the client had ours): the echo.
    let echo = common::read_until(&mut tls, b"\r\n").await;
    assert_eq!(echo, b"a2 NOOP\r\n");
    let _ = tls.shutdown().await;
}

fn config(admin: &str, echo: &str, crt: &Path, key: &Path) -> String {
    format!(
        r#"
state_dir: state
max_connections: 500
admin: {{ bind: "{admin}" }}
listeners:
  imaps: {{ bind: "127.0.0.1:0", protocol: imap, tls: implicit }}
  imap: {{ bind: "127.0.0.1:0", protocol: imap, tls: starttls }}
unknown_sni: reject
hosts:
  - names: [mail.example.test]
    certificate: {{ cert: {crt}, key: {key} }}
    backends:
      imaps: "{echo}"
      imap: "{echo}"
"#,
        crt = crt.display(),
        key = key.display(),
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A proxy that has served two sessions and refused four handshakes
/// (unknown name, distrusted certificate, no cipher in common, plaintext), been reloaded once well and once with a broken file: its
/// admin address and the proxy.
async fn busy_proxy() -> (Proxy, String, Backend) {
    let dir = common::scratch();
    let (crt, key) = common::cert_files(dir.path(), "mail", &["mail.example.test"]);
    let echo = Backend::start("* OK echo backend ready\r\n", true).await;
    let admin = format!("127.0.0.1:{}", common::free_port());
    let yaml = config(&admin, &echo.addr.to_string(), &crt, &key);
    let proxy = Proxy::start_file(dir, &yaml).await;
    let imaps = proxy.addr("imaps");
    echo_session(imaps, "mail.example.test").await;
    echo_session(imaps, "mail.example.test").await;
    starttls_session(proxy.addr("imap"), "mail.example.test").await;
    tls_connect(imaps, Some("nobody.example.net"))
        .await
        .expect_err("unknown name refused");
    distrusting_client(imaps, "mail.example.test").await;
    incompatible_client(imaps, "mail.example.test").await;
    let mut plain = tokio::net::TcpStream::connect(imaps).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut rest)).await;
    proxy.reload().await.expect("reload of the same file");
    proxy.write_config("listeners: [\n");
    proxy.reload().await.expect_err("a broken file is refused");
    (proxy, admin, echo)
}

/// The sample names and families of a Prometheus 0.0.4 text: what a query
/// can name.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            out.insert(n.to_string());
        }
    }
    out
}

/// Every `portcullis_…` and `process_…` metric name in `text` (a PromQL
/// expression, a rules file, a dashboard).
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["portcullis_", "process_"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(prefix) {
            let start = from + i;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            // `job="portcullis"` or a file name is no metric.
            let word_start = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            if word_start {
                out.insert(text[start..end].to_string());
            }
            from = end.max(start + 1);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_scrape_passes_promtool_and_says_what_happened() {
    let test = "a_real_scrape_passes_promtool_and_says_what_happened";
    if !common::tool("curl", test) || !common::tool("promtool", test) {
        return;
    }
    let started = unix_now();
    let (_proxy, admin, echo) = busy_proxy().await;

    // Prometheus text 0.0.4 by default (curl sends `Accept: */*`), and it
    // passes promtool's parser and lint: HELP on every metric, counters
    // named `_total`, units in base units.
    let text = scrape(&admin, None).await;
    assert_eq!(
        text.content_type, "text/plain; version=0.0.4; charset=utf-8",
        "{text:?}"
    );
    let (ok, out) = promtool(&["check", "metrics"], &repo("."), text.body.as_bytes()).await;
    assert!(
        ok,
        "promtool check metrics failed:\n{out}\n--- /metrics was:\n{}",
        text.body
    );
    assert!(!text.body.contains("# EOF"));
    // Prometheus's own scrape asks for OpenMetrics first: it gets it, and
    // the same samples.
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let om = scrape(&admin, Some(prometheus_accept)).await;
    assert_eq!(
        om.content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "{om:?}"
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    let samples = |t: &str| -> BTreeSet<String> {
        t.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("process_"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(samples(&om.body), samples(&text.body), "same samples");
    // A scraper asking for text gets text.
    let plain = scrape(&admin, Some("text/plain;version=0.0.4")).await;
    assert!(plain.content_type.starts_with("text/plain; version=0.0.4"));

    let body = &text.body;
    let expect = |series: &str, want: &str| {
        assert_eq!(
            sample(body, series),
            Some(want),
            "{series}\n--- /metrics was:\n{body}"
        );
    };
    for (outcome, n) in [
        ("ok", "2"),
        ("unknown_sni", "1"),
        ("client_alert", "1"),
        ("not_tls", "1"),
        ("incompatible", "1"),
        ("alert", "0"),
    ] {
        expect(
            &format!("portcullis_handshakes_total{{listener=\"imaps\",outcome=\"{outcome}\"}}"),
            n,
        );
    }
    // Latency of the completed handshakes and the backend connects.
    let handshakes = |listener: &str, le: &str, n: &str| {
        let series = format!(
            "portcullis_handshake_duration_seconds_bucket{{le=\"{le}\",listener=\"{listener}\"}}"
        );
        expect(&series, n);
    };
    handshakes("imaps", "+Inf", "2");
    expect(
        "portcullis_handshake_duration_seconds_count{listener=\"imaps\"}",
        "2",
    );
    // On the STARTTLS listener the clock starts at the go-ahead: the
    // client's dawdling before STARTTLS is not handshake time.
    handshakes("imap", "+Inf", "1");
    handshakes("imap", "1.0", "1");
    let backend = format!("backend=\"{}\"", echo.addr);
    expect(
        &format!("portcullis_backend_connect_duration_seconds_count{{{backend}}}"),
        "3",
    );
    expect(
        &format!("portcullis_backend_connect_duration_seconds_bucket{{le=\"2.5\",{backend}}}"),
        "3",
    );
    // The failed reload is the last one: 0, and the time of the good one.
    expect("portcullis_config_last_reload_successful", "0");
    expect("portcullis_config_reloads_total{outcome=\"ok\"}", "1");
    expect("portcullis_config_reloads_total{outcome=\"failed\"}", "1");
    let last_ok: i64 = sample(
        body,
        "portcullis_config_last_reload_success_timestamp_seconds",
    )
    .and_then(|v| v.parse().ok())
    .expect("last reload success time");
    assert!((started..=unix_now()).contains(&last_ok), "{last_ok}");
    expect("portcullis_max_connections", "500");
    expect(
        &format!(
            "portcullis_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        ),
        "1",
    );
    // The certificate's expiry under its new name, and the old one kept.
    let expiry = "{host=\"mail.example.test\",name=\"mail.example.test\",source=\"files\",key_type=\"ecdsa-p256\"}";
    let new = sample(
        body,
        &format!("portcullis_certificate_expiry_timestamp_seconds{expiry}"),
    );
    assert!(
        new.is_some_and(|v| v.parse::<i64>().is_ok_and(|t| t > unix_now())),
        "{body}"
    );
    assert_eq!(
        sample(
            body,
            &format!("portcullis_certificate_not_after_seconds{expiry}")
        ),
        new
    );
    // The process, as an operator's node dashboard shows it.
    let number = |name: &str| -> f64 {
        sample(body, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing\n{body}"))
    };
    assert!(number("process_open_fds") >= 3.0);
    assert!(number("process_max_fds") >= number("process_open_fds"));
    assert!(number("process_resident_memory_bytes") > 1e6);
    assert!(number("process_cpu_seconds_total") > 0.0);
    let start = number("process_start_time_seconds");
    assert!(start > 1.6e9 && start <= unix_now() as f64 + 1.0, "{start}");
}

#[tokio::test]
async fn shipped_alerting_rules_pass_promtool_and_their_unit_tests() {
    let test = "shipped_alerting_rules_pass_promtool_and_their_unit_tests";
    if !common::tool("promtool", test) {
        return;
    }
    let dir = repo("deploy/prometheus");
    let (ok, out) = promtool(&["check", "rules", "alerts.yaml"], &dir, b"").await;
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts_test.yaml"], &dir, b"").await;
    assert!(ok, "promtool test rules:\n{out}");
    // Every alert has a unit test that fires it.
    let rules = std::fs::read_to_string(dir.join("alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts_test.yaml")).unwrap();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "alerts_test.yaml has no test for {name}"
            );
        }
    }
}

/// Every metric the alerts and the dashboard query exists: a typo or a
/// rename would leave a panel empty and an alert silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_query_only_metrics_portcullis_exports() {
    let test = "alerts_and_dashboard_query_only_metrics_portcullis_exports";
    if !common::tool("curl", test) {
        return;
    }
    let (_proxy, admin, _echo) = busy_proxy().await;
    let mut known = names(&scrape(&admin, None).await.body);
    // The cluster store's metrics exist only with `store:`, the renewal
    // ones only for ACME hosts (a CA is another test's business): their
    // names from the same registry, fed what the store and an ACME task
    // report.
    let cluster = portcullis::metrics::Metrics::with_cluster();
    cluster.renewal("mail.example.test", true);
    let acme = portcullis::metrics::CertGauge {
        names: vec!["mail.example.test".into()],
        source: "acme".into(),
        key_type: "ecdsa-p256".into(),
        not_after: unix_now() + 90 * 86_400,
        next_renewal: Some(unix_now() + 60 * 86_400),
    };
    known.extend(names(
        &cluster.encode(&[acme], portcullis::metrics::Format::Prometheus),
    ));
    // Every metric is documented where operators look: README's list.
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let undocumented: Vec<&String> = known
        .iter()
        .filter(|n| {
            // a histogram's samples are documented by its family
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|x| n.strip_suffix(x))
                .filter(|f| known.contains(*f));
            family.is_none()
        })
        .filter(|n| !readme.contains(&format!("`{n}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "README.md does not list {undocumented:?}"
    );
    for suffix in ["bucket", "sum", "count"] {
        let histograms: Vec<String> = known
            .iter()
            .filter(|n| n.ends_with("_seconds"))
            .map(|n| format!("{n}_{suffix}"))
            .collect();
        known.extend(histograms);
    }
    assert!(known.contains("portcullis_cluster_store_up"));

    let dashboard = std::fs::read_to_string(repo("deploy/grafana/portcullis.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard queries: {exprs:#?}");
    let alerts = std::fs::read_to_string(repo("deploy/prometheus/alerts.yaml")).unwrap();
    for (file, text) in [
        ("deploy/grafana/portcullis.json", exprs.join("\n")),
        ("deploy/prometheus/alerts.yaml", alerts),
    ] {
        let used = referenced(&text);
        assert!(used.len() >= 8, "{file}: {used:?}");
        let unknown: Vec<&String> = used.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "{file} queries metrics portcullis does not export: {unknown:?}"
        );
    }
}

/// Every `expr` of a Grafana dashboard (panels, nested rows, templating).
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn metric_names_are_found_in_queries() {
    let used = referenced(
        "sum by (job) (rate(portcullis_handshakes_total{job=\"portcullis\"}[5m])) / process_max_fds",
    );
    let want: BTreeSet<String> = ["portcullis_handshakes_total", "process_max_fds"]
        .map(String::from)
        .into();
    assert_eq!(used, want);
}
